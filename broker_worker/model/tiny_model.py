"""``broker-worker make-tiny-model DIR``: a random-weight native InternVL checkpoint (~375k parameters).

It has the real architecture (InternViT-style vision tower, pixel-shuffle projector, Qwen2 LLM), a real
byte-level tokenizer with every InternVL special token, the ChatML chat template and a processor config, so the
whole serving path runs offline on a CPU. Its weights are random: **its output is noise**, by design.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

SPECIAL_TOKENS = [
    "<|im_start|>",
    "<|im_end|>",
    "<img>",
    "</img>",
    "<IMG_CONTEXT>",
    "<video>",
    "<quad>",
    "</quad>",
    "<ref>",
    "</ref>",
    "<box>",
    "</box>",
]
CHAT_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' }}"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}{% for item in message['content'] %}"
    "{% if item['type'] == 'image' %}{{ '<IMG_CONTEXT>\\n' }}{% elif item['type'] == 'video' %}{{ '<video>\\n' }}"
    "{% elif item['type'] == 'text' %}{{ item['text'] }}{% endif %}{% endfor %}{% endif %}"
    "{{ '<|im_end|>\\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
NOISE_NOTICE = "tiny random-weight InternVL: its output is noise, it only proves the plumbing"


def byte_symbols() -> list[str]:
    """The 256 printable stand-ins byte-level BPE uses for bytes (printable bytes map to themselves)."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    shifted = iter(range(256, 512))
    return [chr(b) if b in keep else chr(next(shifted)) for b in range(256)]


def make_tokenizer() -> object:
    from transformers import Qwen2Tokenizer

    vocab = {symbol: i for i, symbol in enumerate(byte_symbols())}
    vocab["<|endoftext|>"] = len(vocab)
    named = {
        "start_image_token": "<img>",
        "end_image_token": "</img>",
        "context_image_token": "<IMG_CONTEXT>",
        "video_token": "<video>",
    }
    tokenizer = Qwen2Tokenizer(vocab=vocab, merges=[], extra_special_tokens=named)
    tokenizer.add_special_tokens({"additional_special_tokens": SPECIAL_TOKENS})
    return tokenizer


def make_config(
    vocab_size: int,
    image_token_id: int,
    eos_token_id: int,
    *,
    patch: int = 14,
    vision_layers: int = 2,
    text_layers: int = 4,
    context: int = 8192,
) -> Any:
    """A tiny InternVL config: 448 px tiles, pixel shuffle 0.5, so (448 / patch / 2)^2 image tokens a tile."""
    from transformers import InternVLConfig, InternVLVisionConfig, Qwen2Config

    vision = InternVLVisionConfig(
        hidden_size=64,
        num_hidden_layers=vision_layers,
        num_attention_heads=4,
        intermediate_size=128,
        image_size=[448, 448],
        patch_size=[patch, patch],
        norm_type="layer_norm",
        attention_bias=True,
        use_qk_norm=False,
    )
    text = Qwen2Config(
        vocab_size=vocab_size,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=text_layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=context,
        tie_word_embeddings=False,
        eos_token_id=eos_token_id,
    )
    return InternVLConfig(
        vision_config=vision.to_dict(),
        text_config=text.to_dict(),
        image_token_id=image_token_id,
        image_seq_length=(448 // patch // 2) ** 2,
        downsample_ratio=0.5,
        tie_word_embeddings=False,
    )


def make_tiny_model(out_dir: str | Path, seed: int = 0) -> Path:
    from transformers import GenerationConfig, InternVLForConditionalGeneration

    tokenizer = make_tokenizer()
    ids = tokenizer.convert_tokens_to_ids  # type: ignore[attr-defined]
    eos = ids("<|im_end|>")
    config = make_config(len(tokenizer), ids("<IMG_CONTEXT>"), eos)  # type: ignore[arg-type]
    torch.manual_seed(seed)
    model = InternVLForConditionalGeneration(config).eval()
    model.generation_config = GenerationConfig(eos_token_id=eos, pad_token_id=ids("<|endoftext|>"))
    return save_checkpoint(model, tokenizer, Path(out_dir), NOISE_NOTICE, {"seed": seed})


def save_checkpoint(model: Any, tokenizer: Any, out: Path, notice: str, recipe: dict[str, object]) -> Path:
    """Weights, tokenizer, chat template and processor config, with a README saying what the model is."""
    from transformers import GotOcr2ImageProcessor, InternVLProcessor, InternVLVideoProcessor

    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    image_processor = GotOcr2ImageProcessor(
        crop_to_patches=True,
        min_patches=1,
        max_patches=12,
        size={"height": 448, "width": 448},
        image_mean=[0.485, 0.456, 0.406],
        image_std=[0.229, 0.224, 0.225],
    )
    processor = InternVLProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        video_processor=InternVLVideoProcessor(),
        chat_template=CHAT_TEMPLATE,
        image_seq_length=int(model.config.image_seq_length),
    )
    processor.save_pretrained(out)
    (out / "README.md").write_text(f"# {out.name}\n\nA {notice}.\n")
    (out / "tiny_model.json").write_text(json.dumps({"notice": notice, **recipe}))
    return out
