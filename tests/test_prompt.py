"""InternVL's conversation rules (reference/internvl.md section 1.3), checked on its own table."""

from __future__ import annotations

import pytest

from broker_worker.model import tiling
from broker_worker.model.prompt import CHATML, TEMPLATES, build_conversation, sanitize, tile_budgets
from broker_worker.protocol.errors import JobError
from broker_worker.protocol.messages import ChatMessage

SIZES = {"a": (800, 600), "b": (640, 480), "c": (1200, 400), "d": (500, 900), "e": (900, 300)}


def user(text: str, *images: str) -> ChatMessage:
    return ChatMessage(role="user", content=text, image=list(images))


def assistant(text: str | None) -> ChatMessage:
    return ChatMessage(role="assistant", content=text)


def patches(images: list[str], budgets: list[int]) -> list[int]:
    counts = []
    for name, budget in zip(images, budgets, strict=True):
        cols, rows = tiling.choose_grid(*SIZES[name], 1, budget, 448)
        counts.append(cols * rows + (1 if cols * rows > 1 else 0))
    return counts


SYSTEM = ChatMessage(role="system", content="SYS")


@pytest.mark.parametrize(
    ("prompt", "question", "history", "num_patches"),
    [
        ([SYSTEM, user("What?", "a")], "<image>\nWhat?", [], [13]),
        (
            [SYSTEM, user("Q1", "b"), assistant("A1"), user("Q2", "c", "d")],
            "Image-2: <image>\nImage-3: <image>\nQ2",
            [("Image-1: <image>\nQ1", "A1")],
            [1, 4, 3],
        ),
        (
            [SYSTEM, user("Q1", "c", "d"), assistant("A1"), user("Q2")],
            "Q2",
            [("Image-1: <image>\nImage-2: <image>\nQ1", "A1")],
            [4, 3],
        ),
        (
            [SYSTEM, user("Q", "e", "e", "e", "e", "e")],
            "Image-1: <image>\nImage-2: <image>\nImage-3: <image>\nImage-4: <image>\nImage-5: <image>\nQ",
            [],
            [3, 3, 3, 3, 3],
        ),
        ([SYSTEM, user("Q1", "c"), assistant("A1"), user("Q2")], "Q2", [("<image>\nQ1", "A1")], [4]),
        ([SYSTEM, user("Q")], "Q", [], []),
    ],
)
def test_internvl_conversation_table(
    prompt: list[ChatMessage], question: str, history: list[tuple[str, str]], num_patches: list[int]
) -> None:
    conversation = build_conversation([*prompt, assistant(None)], max_input_tiles=12)
    assert conversation.question == question
    assert conversation.history == history
    assert conversation.system == "SYS"
    assert patches(conversation.images, conversation.budgets) == num_patches


def test_budgets_share_last_image_message() -> None:
    assert tile_budgets([1, 2], 12) == [1, 6, 6]
    assert tile_budgets([2, 0], 12) == [6, 6]
    assert tile_budgets([5], 3) == [1, 1, 1, 1, 1]


def test_render_chatml_with_history_matches_remote_code_prompt() -> None:
    conversation = build_conversation([SYSTEM, user("Q1"), assistant("A1"), user("Q2", "a")], 12)
    expected = (
        "<|im_start|>system\nSYS<|im_end|>\n<|im_start|>user\nQ1<|im_end|>\n<|im_start|>assistant\nA1"
        "<|im_end|>\n<|im_start|>user\n<image>\nQ2<|im_end|>\n<|im_start|>assistant\n"
    )
    assert conversation.render(CHATML) == expected


def test_render_other_templates() -> None:
    conversation = build_conversation([SYSTEM, user("Q1"), assistant("A1"), user("Q2")], 12)
    assert conversation.render(TEMPLATES["phi3-chat"]) == (
        "<|system|>\nSYS<|end|><|user|>\nQ1<|end|><|assistant|>\nA1<|end|><|user|>\nQ2<|end|><|assistant|>\n"
    )
    assert conversation.render(TEMPLATES["Hermes-2"]).startswith("<|im_start|>system\nSYS<|im_end|><|im_start|>user")


def test_no_system_message_uses_template_default() -> None:
    conversation = build_conversation([user("hi")], 12)
    assert conversation.render(CHATML).startswith(f"<|im_start|>system\n{CHATML.default_system}<|im_end|>")


def test_empty_history_answer_keeps_template_intact() -> None:
    text = build_conversation([user("Q1"), assistant(""), user("Q2")], 12).render(CHATML)
    assert "<|im_start|>assistant\n<|im_end|>\n<|im_start|>user\nQ2" in text


def test_injected_control_strings_are_removed() -> None:
    assert sanitize("a<image>b<IMG_CONTEXT>c<|im_end|>d") == "abcd"
    conversation = build_conversation([user("look <image> here", "a")], 12)
    assert conversation.question == "<image>\nlook  here"


def test_resume_prefix_continues_the_answer() -> None:
    text = build_conversation([user("Q")], 12).render(CHATML, answer_prefix="Once upon")
    assert text.endswith("<|im_start|>assistant\nOnce upon")


@pytest.mark.parametrize(
    "prompt",
    [
        [assistant("hi"), user("q")],
        [user("q"), ChatMessage(role="system", content="late")],
        [SYSTEM],
    ],
)
def test_malformed_prompts_are_typed_errors(prompt: list[ChatMessage]) -> None:
    with pytest.raises(JobError) as err:
        build_conversation(prompt, 12)
    assert err.value.code == 40001
