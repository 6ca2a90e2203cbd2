"""From InternVL's ``prompt`` list to the model's prompt text: turns, image placeholders, tile budgets, templates.

Keeps InternVL's worker's rules (reference/internvl.md section 1.3): the system message is passed per request (never
written into shared model state), images are labelled ``Image-k: <image>\\n`` (``<image>\\n`` when the whole
conversation has one), the last user message with images shares ``max_input_tiles`` among its images and every
earlier image gets one tile. Fixed on purpose: roles are checked, a trailing assistant message is a prefill
of the answer only when it has text, and an empty answer no longer corrupts the template.

A prompt is rendered as spans that say who wrote each piece: the template (and the worker's image labels),
the client, or an image slot. ``prompt_tokens`` reads control tokens only in the template's spans, so client
text can never become one; ``sanitize`` also removes the worker's own marker strings from client text (to a
fixed point) so that even the plain rendered text carries no forged turn or image slot.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import Literal

from broker_worker.protocol.errors import invalid
from broker_worker.protocol.messages import ChatMessage

IMAGE_PLACEHOLDER = "<image>"
IMG_START, IMG_END, IMG_CONTEXT = "<img>", "</img>", "<IMG_CONTEXT>"
# Strings a user must not be able to inject: they would move image slots or forge turns. Each is "<", a body
# without "<" or ">", then ">": sanitize's linear fixed-point removal relies on that shape.
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
_FORBIDDEN_RE = re.compile("|".join(map(re.escape, _FORBIDDEN_IN_TEXT)))
_BODIES = frozenset(token[1:-1] for token in _FORBIDDEN_IN_TEXT)
_LONGEST_BODY = max(map(len, _BODIES))

INTERNVL_DEFAULT_SYSTEM = (
    "你是书生·万象，英文名是InternVL，是由上海人工智能实验室、清华大学及多家合作单位联合开发的多模态大语言模型。"
)
INTERNVL2_DEFAULT_SYSTEM = (
    "你是由上海人工智能实验室联合商汤科技开发的书生多模态大模型，英文名叫InternVL, 是一个有用无害的人工智能助手。"
)


SpanKind = Literal["template", "client", "image"]


@dataclass(frozen=True)
class Span:
    """A piece of the prompt and who wrote it: only ``template`` text may hold control tokens."""

    text: str
    kind: SpanKind = "client"


Spans = tuple[Span, ...]
IMAGE_SLOT = Span(IMAGE_PLACEHOLDER, "image")


def _template(text: str) -> Span:
    return Span(text, "template")


@dataclass(frozen=True)
class Template:
    """An InternVL conversation template (MPT separator style)."""

    name: str
    system: str  # format string with {system}
    user: str
    assistant: str
    sep: str
    default_system: str

    def spans(self, system: str, turns: Sequence[tuple[Spans, Spans]], question: Spans, answer_prefix: str) -> Spans:
        before, _, after = self.system.partition("{system}")
        user, assistant, sep = _template(self.user), _template(self.assistant), _template(self.sep)
        out = [_template(before), Span(system), _template(after), sep]
        for q, a in turns:
            out += [user, *q, sep, assistant, *a, sep]
        out += [user, *question, sep, assistant, Span(answer_prefix)]
        return tuple(span for span in out if span.text)

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
    # Earlier (question, answer) pairs. A question holds its image labels; an answer, one span per assistant message
    # (the prompt's encoder may cut between two long ones instead of tokenizing them as one huge text).
    turns: list[tuple[Spans, Spans]]
    last: Spans  # the question to answer
    images: list[str] = field(default_factory=list)  # base64, in image slot order
    budgets: list[int] = field(default_factory=list)  # max grid tiles per image

    @property
    def question(self) -> str:
        return _join(self.last)

    @property
    def history(self) -> list[tuple[str, str]]:
        return [(_join(q), _join(a)) for q, a in self.turns]

    def spans(self, template: Template, answer_prefix: str = "") -> Spans:
        system = template.default_system if self.system is None else self.system
        return template.spans(system, self.turns, self.last, answer_prefix)

    def render(self, template: Template, answer_prefix: str = "") -> str:
        """The prompt as InternVL's text (image slots as ``<image>``); the engine encodes ``spans`` instead."""
        return _join(self.spans(template, answer_prefix))


def _join(spans: Spans) -> str:
    return "".join(span.text for span in spans)


def sanitize(text: str) -> str:
    """``text`` without the marker strings, removed until none is left (one pass would let "<|im_st<|im_end|>art|>"
    close up into a new "<|im_start|>")."""
    if _FORBIDDEN_RE.search(text) is None:  # the usual case, at regex speed
        return text
    kept: list[str] = []  # pieces of the output; "<" and ">" are pieces of their own
    opens: list[int] = []  # indexes in ``kept`` of each "<" that a marker may still start from
    after_open = 0  # characters kept since the last open "<"
    for piece in filter(None, re.split(r"([<>])", text)):
        if piece == ">" and opens and after_open <= _LONGEST_BODY and "".join(kept[opens[-1] + 1 :]) in _BODIES:
            del kept[opens.pop() :]  # the text around it closes up: an earlier "<" may now start a marker
            after_open = len("".join(kept[opens[-1] + 1 :])) if opens else 0
            continue
        kept.append(piece)
        if piece == "<":
            opens.append(len(kept) - 1)
            after_open = 0
            continue
        after_open += len(piece)
        if piece == ">" or after_open > _LONGEST_BODY:
            opens.clear()  # a body holds no ">" and is short: no marker can start at these "<" any more
    return "".join(kept)


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
    questions: list[Spans] = []
    answers: list[list[Span]] = []
    images: list[str] = []
    for message in messages:
        if message.role == "user":
            labels = [_image_label(len(images) + k, total_images) for k in range(1, len(message.image) + 1)]
            images += message.image
            questions.append((*(span for label in labels for span in label), Span(sanitize(message.text))))
            answers.append([])
        elif message.role == "assistant":
            if not questions:
                raise invalid("an assistant message comes before any user message")
            answers[-1].append(Span(sanitize(message.text)))
        else:
            raise invalid("a system message is only allowed first")
    history = [(q, tuple(a)) for q, a in zip(questions[:-1], answers[:-1], strict=True)]
    budgets = tile_budgets([len(m.image) for m in messages if m.role == "user"], max_input_tiles)
    return Conversation(system, history, questions[-1], images, budgets)


def _image_label(number: int, total: int) -> Spans:
    if total == 1:
        return IMAGE_SLOT, _template("\n")
    return _template(f"Image-{number}: "), IMAGE_SLOT, _template("\n")


def _split_system(prompt: list[ChatMessage]) -> tuple[str | None, list[ChatMessage]]:
    if prompt and prompt[0].role == "system":
        return sanitize(prompt[0].text), prompt[1:]
    return None, prompt


def _drop_trailing_empty_assistant(messages: list[ChatMessage]) -> list[ChatMessage]:
    # InternVL's model worker drops a trailing assistant message (InternVL's app appends one with content None).
    while messages and messages[-1].role == "assistant":
        messages = messages[:-1]
    return messages
