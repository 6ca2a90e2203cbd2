"""``broker-batch``: run an OpenAI Batch API file through the workers' batch lane, straight over Redis (no
gateway), with bounded in-flight jobs, progress, and resumable results (README "Batch jobs")."""
