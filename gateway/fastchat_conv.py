"""FastChat's string prompts: the conversation template this gateway hands FastChat, and its exact inverse.

FastChat's ``openai_api_server`` renders a chat with the template from ``/worker_get_conv_template`` and sends
the string (images separately, as ``images``). The gateway parses it back into turns, so the model sees the
same InternVL conversation as from the list prompt: its own chat template, default system prompt, image labels
and tile budgets. The template is chosen so the parse is unambiguous:

- ``ADD_COLON_TWO``: in fschat 0.2.36 the only separator style whose ``get_prompt`` carries images (as
  ``$$<image>$$`` per image before the text); every other style fails on a message with images.
- Every turn opens with ``<|im_start|>`` and closes with ``<|im_end|>``: the list form strips both from any
  text (``prompt.sanitize``), so a client can only make the string differ from its list form with text the
  list form would not keep. What such text forges in the string form (a turn), FastChat's own workers forge too.
- The system message defaults to empty, read back as "no system message" (the model's default). The one thing
  the string cannot carry is an explicitly empty system message: it too means the model's default here.
"""

from __future__ import annotations

from typing import Any

from pydantic import ValidationError

from broker_worker.protocol.errors import JobError, describe_problems, invalid
from broker_worker.protocol.images import strip_data_url
from broker_worker.protocol.messages import ChatMessage

TURN_START, TURN_END = "<|im_start|>", "<|im_end|>\n"
SYSTEM_HEAD = "system\n"
USER, ASSISTANT = "user", "assistant"
IMAGE = "$$<image>$$"  # fastchat.conversation.IMAGE_PLACEHOLDER_STR
ADD_COLON_TWO = 2  # fastchat.conversation.SeparatorStyle.ADD_COLON_TWO

CONV_TEMPLATE: dict[str, Any] = {
    "name": "internvl-gateway",
    "system_template": TURN_START + SYSTEM_HEAD + "{system_message}",
    "system_message": "",
    "roles": [TURN_START + USER, TURN_START + ASSISTANT],
    "messages": [],
    "offset": 0,
    "sep_style": ADD_COLON_TWO,
    "sep": TURN_END,
    "sep2": TURN_END,
    "stop_str": None,
    "stop_token_ids": None,
}


def conv_template() -> dict[str, Any]:
    """A fresh copy of the template (FastChat caches what it gets; nobody may change ours)."""
    return {k: list(v) if isinstance(v, list) else v for k, v in CONV_TEMPLATE.items()}


def not_rendered(why: str) -> JobError:
    return invalid(
        f"prompt: a string prompt must be a chat rendered with this gateway's conversation template "
        f"(POST /worker_get_conv_template, as FastChat's openai_api_server does); {why}. Raw text completion "
        "is not supported: send a chat, or InternVL's list prompt"
    )


def parse_prompt(prompt: str, images: list[str] | None) -> list[ChatMessage]:
    """The chat a rendered prompt came from, ``images`` (data URLs) placed where its ``$$<image>$$`` are.

    ``images=None`` (``/count_token``, which FastChat calls without them) drops the placeholders instead."""
    pieces = prompt.split(TURN_START)
    if len(pieces) < 3 or pieces[0] or not pieces[1].startswith(SYSTEM_HEAD) or not pieces[1].endswith(TURN_END):
        raise not_rendered("it does not begin with the template's system part")
    system = pieces[1][len(SYSTEM_HEAD) : -len(TURN_END)]
    messages = [_message("system", system, [])] if system else []
    turns = [_turn(piece) for piece in pieces[2:]]
    if turns[-1] != (ASSISTANT, None):
        raise not_rendered("it does not end with the assistant's blank turn")
    queue = list(images or [])
    for role, text in turns[:-1]:
        count = 0
        while role == USER and text is not None and text.startswith(IMAGE, len(IMAGE) * count):
            count += 1
        placed, queue = queue[:count], queue[count:]
        if images is not None and len(placed) < count:
            raise invalid(f"prompt: more {IMAGE} placeholders than images ({len(images)})")
        messages.append(_message(role, (text or "")[len(IMAGE) * count :], [_base64(url) for url in placed]))
    if queue:
        raise invalid(f"images: {len(images or [])} images for fewer {IMAGE} placeholders in user turns")
    return [*messages, ChatMessage(role="assistant", content=None)]


def _turn(piece: str) -> tuple[str, str | None]:
    """One ``role: text<|im_end|>\\n`` turn; ``role:`` alone is FastChat's rendering of an empty or blank one."""
    for role in (USER, ASSISTANT):
        if piece == role + ":":
            return role, None
        head = role + ": "
        if piece.startswith(head) and piece.endswith(TURN_END) and len(piece) >= len(head) + len(TURN_END):
            return role, piece[len(head) : -len(TURN_END)]
    raise not_rendered(f"{TURN_START}{piece[:40]!r} is not a user or assistant turn of the template")


def _message(role: str, content: str, images: list[str]) -> ChatMessage:
    try:
        return ChatMessage.model_validate({"role": role, "content": content, "image": images})
    except ValidationError as exc:
        raise invalid(f"prompt: a {role} turn: {describe_problems(exc.errors())}") from exc


def _base64(url: str) -> str:
    if not url.startswith("data:"):
        raise invalid("images: each must be a data: URL (base64); the gateway does not fetch remote images")
    return strip_data_url(url)
