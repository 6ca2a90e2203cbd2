"""Run by tests/test_fastchat.py with the FastChat venv's Python: the official ``openai`` SDK, unmodified.

Reads {"fastchat": url, "gateway": url, "model": name, "image": data URL} on stdin. Asks the same chats, plain
and streamed, through FastChat's openai_api_server and through the gateway's own /v1, then tries the OpenAI
details on the gateway: the usage chunk, a stop string taken from its greedy answer, n=2. Prints one JSON
object of what it saw; asserts nothing itself.
"""

from __future__ import annotations

import json
import sys
from typing import Any

from openai import BadRequestError, OpenAI

MAX_TOKENS = 12
LONG = 48  # the answer a stop string is taken from: long enough to hold two printable characters in a row


def chats(image: str) -> dict[str, list[dict[str, Any]]]:
    return {
        "text": [
            {"role": "system", "content": "Answer briefly."},
            {"role": "user", "content": "Say hi"},
            {"role": "assistant", "content": "Hi!"},
            {"role": "user", "content": "Now tell me a story about a cat."},
        ],
        "image": [
            {
                "role": "user",
                "content": [
                    {"type": "text", "text": "What is in this image?"},
                    {"type": "image_url", "image_url": {"url": image}},
                ],
            }
        ],
    }


def plain(client: OpenAI, model: str, messages: list[dict[str, Any]], **extra: Any) -> dict[str, Any]:
    reply = client.chat.completions.create(
        model=model, messages=messages, temperature=0, **({"max_tokens": MAX_TOKENS} | extra)
    )
    choice = reply.choices[0]
    return {"text": choice.message.content, "finish_reason": choice.finish_reason}


def streamed(client: OpenAI, model: str, messages: list[dict[str, Any]], **extra: Any) -> dict[str, Any]:
    chunks = list(
        client.chat.completions.create(
            model=model, messages=messages, temperature=0, stream=True, **({"max_tokens": MAX_TOKENS} | extra)
        )
    )
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    last = chunks[-1]
    return {
        "text": text,
        "chunks": len(chunks),
        "last_choices": [c.model_dump() for c in last.choices],
        "last_usage": last.usage.model_dump() if last.usage else None,
        "usage_chunks": sum(1 for c in chunks if c.usage),
    }


def stop_probe(text: str) -> str | None:
    """Two printable characters from the middle of ``text``, first seen there: a stop string to try."""
    for i in sorted(range(1, len(text) - 1), key=lambda i: abs(i - len(text) // 2)):
        probe = text[i : i + 2]
        if probe.isprintable() and "\ufffd" not in probe and text.find(probe) == i:
            return probe
    return None


def main() -> None:
    spec = json.load(sys.stdin)
    model, seen = spec["model"], {}
    for name in ("fastchat", "gateway"):
        client = OpenAI(base_url=spec[name] + "/v1", api_key="unused", max_retries=0, timeout=300)
        for chat, messages in chats(spec["image"]).items():
            seen[f"{name}/{chat}/plain"] = plain(client, model, messages)
            seen[f"{name}/{chat}/stream"] = streamed(client, model, messages)
    gateway = OpenAI(base_url=spec["gateway"] + "/v1", api_key="unused", max_retries=0, timeout=300)
    text = chats(spec["image"])["text"]
    seen["usage"] = streamed(gateway, model, text, stream_options={"include_usage": True})
    seen["long"] = plain(gateway, model, text, max_tokens=LONG)
    stop = seen["stop"] = stop_probe(seen["long"]["text"])
    if stop:
        seen["stop/string"] = plain(gateway, model, text, max_tokens=LONG, stop=stop)
        seen["stop/list"] = plain(gateway, model, text, max_tokens=LONG, stop=[stop, "never in the answer"])
        seen["stop/stream"] = streamed(gateway, model, text, max_tokens=LONG, stop=[stop])
    try:
        gateway.chat.completions.create(model=model, messages=text, n=2, max_tokens=MAX_TOKENS)
        seen["n=2"] = {"status": 200}
    except BadRequestError as exc:
        seen["n=2"] = {"status": exc.status_code, "body": exc.body}
    print(json.dumps(seen))


if __name__ == "__main__":
    main()
