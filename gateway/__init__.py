"""HTTP gateway (no torch): the InternVL/FastChat worker and controller protocols and an OpenAI API over Redis."""
