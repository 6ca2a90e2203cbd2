"""Prompt spans to input ids: control tokens come from the template, never from the client's text.

The tokenizer is not run on the rendered prompt, where it would read a ``<|im_start|>`` typed by a user as the
control token. The prompt is cut where the template or an image slot puts an added token, and each stretch of text
in between is encoded by the tokenizer's model alone, with no added-token matching: whatever the client wrote,
special and added tokens spelled out included, becomes ordinary text tokens. The tokenizer itself cuts a text at
its added tokens and encodes the stretches one by one, so an ordinary prompt gets exactly the ids that
``tokenizer(rendered_text)`` (InternVL's own pipeline) gives. InternVL's content tags stay tokens in client text
too (``CONTENT_TOKENS``): the model reads and writes them as content, and they open no turn or image slot.

Stretches are encoded one at a time and counted as they come: a prompt over the context is refused once the
count reaches it, after at most one message's text beyond the limit, never after tokenizing all of it. A stretch
longer than ``STRETCH_CHARS`` (only long assistant messages in a row make one) is cut between two spans, so no
single call to the tokenizer gets more than that or one message.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

from broker_worker.model.prompt import IMG_CONTEXT, IMG_END, IMG_START, Span
from broker_worker.protocol.errors import ErrorCode, JobError, invalid

#: Added tokens a client may write: grounding (``<ref>``/``<box>``/``<quad>``) and reasoning tags.
CONTENT_TOKENS = frozenset({"<ref>", "</ref>", "<box>", "</box>", "<quad>", "</quad>", "<think>", "</think>"})
STRETCH_CHARS = 262_144
Encode = Callable[[str], list[int]]


class PromptEncoder:
    def __init__(self, tokenizer: Any) -> None:
        self._token_ids: dict[str, int] = dict(tokenizer.added_tokens_encoder)
        special = {t: int(tokenizer.convert_tokens_to_ids(t)) for t in tokenizer.all_special_tokens}
        known = {**special, **self._token_ids}
        # The unknown token is what plain text maps to outside the vocabulary, not a control token.
        control = {t: i for t, i in known.items() if t not in CONTENT_TOKENS and t != tokenizer.unk_token}
        #: Ids that no client text may produce: every special and added token but the content tags (and unknown).
        self.control_ids = frozenset(control.values())
        self._in_template = _pattern(self._token_ids)  # the tokenizer cuts at every added token
        self._in_client = _pattern(t for t in self._token_ids if t in CONTENT_TOKENS)
        self._control = _pattern(control)
        self._image = tuple(_required(self._token_ids, t) for t in (IMG_START, IMG_CONTEXT, IMG_END))
        self._plain = plain_encoder(tokenizer)
        self._newline = self._plain("\n")
        self._head, self._tail = _framing(tokenizer)
        self._continued = self._offset_matters(tokenizer)

    def encode(self, spans: Iterable[Span], image_tokens: Sequence[int], limit: int) -> list[int]:
        """The prompt's input ids; 40303 as soon as their count reaches ``limit`` (the context length).

        ``image_tokens``: the number of ``<IMG_CONTEXT>`` ids of each image slot, in order.
        """
        out = _Ids(self.stretch, self._head, self._tail, limit)
        for span in spans:
            if span.kind == "image":
                if out.images == len(image_tokens):
                    raise invalid(f"more image slots than the {len(image_tokens)} images")
                start, context, end = self._image
                out.add_tokens([start, *[context] * image_tokens[out.images], end])
                out.images += 1
                continue
            pattern = self._in_template if span.kind == "template" else self._in_client
            for k, piece in enumerate(pattern.split(span.text)):  # odd pieces are the tokens it matched
                if k % 2:
                    out.add_tokens([self._token_ids[piece]])
                elif piece:
                    out.add_text(piece)
        if out.images != len(image_tokens):
            raise invalid(f"{out.images} image slots for {len(image_tokens)} images")
        return out.finish()

    def count(self, text: str) -> int:
        """Tokens of client text (an answer so far, say) after an added token."""
        pieces = self._in_client.split(text)  # odd pieces are content tags: one token each
        return sum(1 if k % 2 else len(self.stretch(p, at_start=False)) if p else 0 for k, p in enumerate(pieces))

    def stretch(self, text: str, *, at_start: bool) -> list[int]:
        """One stretch of text between added tokens, encoded as plain text."""
        ids = self._plain_at(text, at_start)
        return ids if self.control_ids.isdisjoint(ids) else self._spelled_out(text, at_start)

    def _plain_at(self, text: str, at_start: bool) -> list[int]:
        return self._plain(text) if at_start or not self._continued else self._after_newline(text)

    def _after_newline(self, text: str) -> list[int]:
        # A SentencePiece-style tokenizer puts a space before the text at the very start only: encode after a
        # newline, then drop the newline's ids.
        ids = self._plain("\n" + text)
        n = len(self._newline)
        return ids[n:] if ids[:n] == self._newline else self._plain(text)

    def _spelled_out(self, text: str, at_start: bool) -> list[int]:
        # This vocabulary merges some control token's letters into the token itself: encode those letters one by one.
        ids: list[int] = []
        for k, piece in enumerate(self._control.split(text)):  # odd pieces are control tokens spelled out
            for part in piece if k % 2 else [piece] if piece else []:
                ids += self._plain_at(part, at_start and not ids)
        if not self.control_ids.isdisjoint(ids):
            raise invalid("the text holds a control token that this tokenizer cannot encode as plain text")
        return ids

    def _offset_matters(self, tokenizer: Any) -> bool:
        """Whether a stretch after an added token encodes unlike one at the start (Metaspace ``first``)."""
        token = IMG_START
        stretches = ("Hello world", " again\nand")
        whole = list(tokenizer.encode(f"{token}{stretches[0]}{token}{stretches[1]}", add_special_tokens=False))
        tid = self._token_ids[token]
        plain = [tid, *self._plain(stretches[0]), tid, *self._plain(stretches[1])]
        continued = [tid, *self._after_newline(stretches[0]), tid, *self._after_newline(stretches[1])]
        return whole != plain and whole == continued


class _Ids:
    """Input ids as they are built, counted against the context."""

    def __init__(self, stretch: Callable[..., list[int]], head: list[int], tail: list[int], limit: int) -> None:
        self._stretch = stretch
        self._tail = tail
        self._limit = limit
        self._ids = list(head)
        self._text: list[str] = []  # text since the last token, encoded at the next one
        self._chars = 0
        self._at_start = True
        self.images = 0

    def add_text(self, text: str) -> None:
        if self._chars + len(text) > STRETCH_CHARS:
            self._flush()
        self._text.append(text)
        self._chars += len(text)

    def add_tokens(self, ids: list[int]) -> None:
        self._flush()
        self._grow(ids)

    def finish(self) -> list[int]:
        self._flush()
        self._grow(self._tail)
        return self._ids

    def _flush(self) -> None:
        if self._text:
            text, self._text, self._chars = "".join(self._text), [], 0
            self._grow(self._stretch(text, at_start=self._at_start))

    def _grow(self, ids: Sequence[int]) -> None:
        self._ids += ids
        self._at_start = False
        total = len(self._ids) + len(self._tail)
        if total >= self._limit:
            raise JobError(
                ErrorCode.CONTEXT_OVERFLOW,
                f"the prompt is at least {total} tokens (images included) and the context is {self._limit}; "
                "send fewer images, a lower max_input_tiles, or a shorter history",
            )


def plain_encoder(tokenizer: Any) -> Encode:
    """Encoding by the tokenizer's model alone: no added token, special or not, is matched in the text."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:  # a Python tokenizer (remote code), where split_special_tokens skips every added token
        return lambda text: list(tokenizer.encode(text, add_special_tokens=False, split_special_tokens=True))

    def encode(text: str) -> list[int]:
        # What the Rust tokenizer does to each stretch between added tokens: normalize, pre-tokenize, model.
        if backend.normalizer is not None:
            text = backend.normalizer.normalize_str(text)
        words = [(text, None)] if backend.pre_tokenizer is None else backend.pre_tokenizer.pre_tokenize_str(text)
        return [token.id for word, _ in words for token in backend.model.tokenize(word)]

    return encode


def _pattern(tokens: Iterable[str]) -> re.Pattern[str]:
    """Any of ``tokens`` as a group, longest first (the tokenizer's leftmost-longest match); never when empty."""
    ordered = sorted(tokens, key=len, reverse=True)
    return re.compile("(" + ("|".join(map(re.escape, ordered)) or "(?!)") + ")")


def _required(token_ids: Mapping[str, int], token: str) -> int:
    if token not in token_ids:
        raise ValueError(f"the tokenizer has no {token} token, which InternVL's image slots need")
    return token_ids[token]


def _framing(tokenizer: Any) -> tuple[list[int], list[int]]:
    """The ids the tokenizer puts around a text (a BOS for Llama and InternLM2, nothing for Qwen2)."""
    bare = list(tokenizer.encode("a", add_special_tokens=False))
    full = list(tokenizer.encode("a"))
    for i in range(len(full) - len(bare) + 1):
        if full[i : i + len(bare)] == bare:
            return full[:i], full[i + len(bare) :]
    return [], []
