"""From the seed's ``prompt`` list to the model's prompt text: turns, image placeholders, tile budgets, templates.

Keeps the seed's rules (reference/internvl.md section 1.3): the system message is passed per request (never
written into shared model state), images are labelled ``Image-k: <image>\\n`` (``<image>\\n`` when the whole
conversation has one), the last user message with images shares ``max_input_tiles`` among its images and every
earlier image gets one tile. Fixed on purpose: roles are checked, a trailing assistant message is a prefill
of the answer only when it has text, and an empty answer no longer corrupts the template.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

from broker_worker.protocol.errors import invalid
from broker_worker.protocol.messages import ChatMessage

IMAGE_PLACEHOLDER = "<image>"
IMG_START, IMG_END, IMG_CONTEXT = "<img>", "</img>", "<IMG_CONTEXT>"
# Strings a user must not be able to inject: they would move image slots or forge turns.
_FORBIDDEN_IN_TEXT = (
    IMAGE_PLACEHOLDER,
    IMG_CONTEXT,
    IMG_START,
    IMG_END,
    "<|im_start|>",
    "<|im_end|>",
    "<|endoftext|>",
    "<|end|>",
    "<|user|>",
    "<|assistant|>",
    "<|system|>",
)

INTERNVL_DEFAULT_SYSTEM = (
    "你是书生·万象，英文名是InternVL，是由上海人工智能实验室、清华大学及多家合作单位联合开发的多模态大语言模型。"
)
INTERNVL2_DEFAULT_SYSTEM = (
    "你是由上海人工智能实验室联合商汤科技开发的书生多模态大模型，英文名叫InternVL, 是一个有用无害的人工智能助手。"
)


@dataclass(frozen=True)
class Template:
    """An InternVL conversation template (MPT separator style)."""

    name: str
    system: str  # format string with {system}
    user: str
    assistant: str
    sep: str
    default_system: str

    def render(self, system: str, turns: list[tuple[str, str]], question: str, answer_prefix: str = "") -> str:
        parts = [self.system.format(system=system), self.sep]
        for q, a in turns:
            parts += [self.user, q, self.sep, self.assistant, a, self.sep]
        parts += [self.user, question, self.sep, self.assistant, answer_prefix]
        return "".join(parts)

    @property
    def stop_token(self) -> str:
        return self.sep.strip()


_CHATML_SYSTEM = "<|im_start|>system\n{system}"
_INTERNVL2_5 = Template(
    "internvl2_5",
    _CHATML_SYSTEM,
    "<|im_start|>user\n",
    "<|im_start|>assistant\n",
    "<|im_end|>\n",
    INTERNVL_DEFAULT_SYSTEM,
)
# InternVL 1.5 / 2.0: the same ChatML roles without the newline after each turn; Hermes-2 renders identically.
_INTERNLM2 = replace(_INTERNVL2_5, name="internlm2-chat", sep="<|im_end|>", default_system=INTERNVL2_DEFAULT_SYSTEM)
_PHI3 = Template(
    "phi3-chat", "<|system|>\n{system}", "<|user|>\n", "<|assistant|>\n", "<|end|>", INTERNVL2_DEFAULT_SYSTEM
)
TEMPLATES = {t.name: t for t in (_INTERNVL2_5, _INTERNLM2, replace(_INTERNLM2, name="Hermes-2"), _PHI3)}
#: The chat template of the native ``-hf`` checkpoints is ChatML with no default system message.
CHATML = TEMPLATES["internvl2_5"]


@dataclass
class Conversation:
    system: str | None
    history: list[tuple[str, str]]
    question: str
    images: list[str] = field(default_factory=list)  # base64, in placeholder order
    budgets: list[int] = field(default_factory=list)  # max grid tiles per image

    def render(self, template: Template, answer_prefix: str = "") -> str:
        system = template.default_system if self.system is None else self.system
        return template.render(system, self.history, self.question, answer_prefix)


def sanitize(text: str) -> str:
    for token in _FORBIDDEN_IN_TEXT:
        text = text.replace(token, "")
    return text


def tile_budgets(images_per_message: list[int], max_input_tiles: int) -> list[int]:
    """Per image: the last message with images shares the budget, earlier images get 1 tile each."""
    with_images = [n for n in images_per_message if n > 0]
    budgets: list[int] = []
    for k, n in enumerate(with_images):
        last = k == len(with_images) - 1
        budgets += [max(1, max_input_tiles // n) if last else 1] * n
    return budgets


def build_conversation(prompt: list[ChatMessage], max_input_tiles: int) -> Conversation:
    system, messages = _split_system(prompt)
    messages = _drop_trailing_empty_assistant(messages)
    if not messages or messages[-1].role != "user":
        raise invalid("the prompt must end with a user message (optionally followed by an empty assistant one)")
    total_images = sum(len(m.image) for m in messages)
    turns: list[list[str]] = []
    images: list[str] = []
    for message in messages:
        if message.role == "user":
            prefix = "".join(_image_label(len(images) + k + 1, total_images) for k in range(len(message.image)))
            images += message.image
            turns.append([prefix + sanitize(message.text)])
        elif message.role == "assistant":
            if not turns:
                raise invalid("an assistant message comes before any user message")
            turns[-1].append(sanitize(message.text))
        else:
            raise invalid("a system message is only allowed first")
    history = [(t[0], "".join(t[1:])) for t in turns[:-1]]
    budgets = tile_budgets([len(m.image) for m in messages if m.role == "user"], max_input_tiles)
    return Conversation(system, history, turns[-1][0], images, budgets)


def _image_label(number: int, total: int) -> str:
    return f"{IMAGE_PLACEHOLDER}\n" if total == 1 else f"Image-{number}: {IMAGE_PLACEHOLDER}\n"


def _split_system(prompt: list[ChatMessage]) -> tuple[str | None, list[ChatMessage]]:
    if prompt and prompt[0].role == "system":
        return sanitize(prompt[0].text), prompt[1:]
    return None, prompt


def _drop_trailing_empty_assistant(messages: list[ChatMessage]) -> list[ChatMessage]:
    # The seed drops a trailing assistant message (InternVL's app appends one with content None).
    while messages and messages[-1].role == "assistant":
        messages = messages[:-1]
    return messages


def expand_images(prompt_text: str, tiles_per_image: list[int], tokens_per_tile: int) -> str:
    """Replace each ``<image>`` in order with ``<img><IMG_CONTEXT>×(tokens·tiles)</img>``."""
    pieces = prompt_text.split(IMAGE_PLACEHOLDER)
    if len(pieces) - 1 != len(tiles_per_image):
        raise invalid(f"{len(pieces) - 1} image placeholders for {len(tiles_per_image)} images")
    out = [pieces[0]]
    for tiles, rest in zip(tiles_per_image, pieces[1:], strict=True):
        out += [IMG_START, IMG_CONTEXT * (tokens_per_tile * tiles), IMG_END, rest]
    return "".join(out)
