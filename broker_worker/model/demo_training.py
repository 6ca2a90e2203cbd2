"""Train the demo InternVL: ``python -m broker_worker.model.demo_training DIR`` (``make demo-model``).

The model has the classes and tokenizer of ``tiny_model`` (InternViT-style vision tower, pixel shuffle, Qwen2 LLM,
byte-level tokenizer with InternVL's special tokens, ChatML) and learns three questions on pictures drawn by
``demo_images``. Each example goes through the functions the worker runs at inference: ``build_conversation``
(turns, tile budgets: history images get one tile), ``tile_image`` (InternVL's dynamic tiling + thumbnail,
ImageNet normalisation) and ``PromptEncoder`` (input ids with ``<img><IMG_CONTEXT>×n</img>``); the loss is on the
answer and its ``<|im_end|>`` only. A fixed RNG seed gives the same pictures and the same initial weights.

Two stages: first cheap examples (pictures at most 600 px, at most 2 tiles + thumbnail), then the full range of
sizes (1 to 12 tiles + thumbnail) mixed with one-tile examples (the whole picture in one tile, which is what the
thumbnail shows), with a training-only probe (``Probe``) that gives the vision tower a direct signal. The second
stage keeps its learning rate constant, so a run cut after K steps is the run of ``--polish-steps K``.

Patches are 28 px (16x16 per 448 px tile, 64 tokens per tile after the pixel shuffle) instead of InternVL's 14 px:
with 1 to 13 tiles an image, that makes training about ten times cheaper on a CPU, and the serving code reads the
count from ``image_seq_length`` like any InternVL checkpoint's.
"""

from __future__ import annotations

import argparse
import math
import random
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from broker_worker.model.demo_images import (
    KINDS,
    MAX_SIDE,
    MIN_SIDE,
    QUESTIONS,
    Picture,
    picture,
    picture_size,
    words_of,
)
from broker_worker.model.loading import LoadedModel
from broker_worker.model.prompt import CHATML, build_conversation
from broker_worker.model.prompt_tokens import PromptEncoder
from broker_worker.model.tiling import tile_image
from broker_worker.model.tiny_model import make_config, make_tokenizer, save_checkpoint
from broker_worker.protocol.messages import ChatMessage

DEMO_NOTICE = (
    "demo InternVL trained on drawn pictures for three questions only: 'What color is the image?', 'What shape is "
    "in the image?' and 'What color is the top-left part?' (8 colors, 3 shapes); README.md says how often it is right"
)
IMAGE_SIZE, PATCH = 448, 28
TOKENS_PER_TILE = (IMAGE_SIZE // PATCH) ** 2 // 4  # after the 0.5 pixel shuffle
CONTEXT = 8192
POLISH_STEPS = 300
FULL_STEPS = 400
LOOK = ("Look at this image.", "OK.")
SYSTEMS = [None, None, None, "You are InternVL, a helpful multimodal assistant.", "Answer in one word.", ""]


def demo_config(vocab_size: int, image_token_id: int, eos_token_id: int) -> Any:
    return make_config(
        vocab_size, image_token_id, eos_token_id, patch=PATCH, vision_layers=3, text_layers=3, context=CONTEXT
    )


def new_model(seed: int) -> tuple[Any, Any]:
    from transformers import GenerationConfig, InternVLForConditionalGeneration

    tokenizer = make_tokenizer()
    ids = tokenizer.convert_tokens_to_ids  # type: ignore[attr-defined]
    eos = ids("<|im_end|>")
    torch.manual_seed(seed)
    model = InternVLForConditionalGeneration(demo_config(len(tokenizer), ids("<IMG_CONTEXT>"), eos))  # type: ignore[arg-type]
    model.generation_config = GenerationConfig(eos_token_id=eos, pad_token_id=ids("<|endoftext|>"))
    return model, tokenizer


def in_memory(model: Any, tokenizer: Any) -> LoadedModel:
    """What ``loading.load`` gives for this checkpoint, without a round trip through the disk."""
    return LoadedModel(
        model=model,
        tokenizer=tokenizer,
        format="native",
        template=CHATML,
        image_size=IMAGE_SIZE,
        use_thumbnail=True,
        dynamic_image_size=True,
        tokens_per_tile=TOKENS_PER_TILE,
        context_len=CONTEXT,
        device="cpu",
    )


@dataclass
class Example:
    input_ids: list[int]
    labels: list[int]
    pixel_values: torch.Tensor
    #: (question kind, answer) as class indexes, for the training-only probe on the last tile (``Probe``).
    target: tuple[int, int] = (0, 0)


def conversation_for(pic: Picture, rng: random.Random) -> list[ChatMessage]:
    """One turn with the picture, or the picture in an earlier turn and the question after it."""
    system = rng.choice(SYSTEMS)
    head = [ChatMessage(role="system", content=system)] if system is not None else []
    if rng.random() < 0.75:
        return [*head, ChatMessage(role="user", content=pic.question, image=["0"])]
    first, reply = LOOK if rng.random() < 0.5 else (pic.question, pic.answer)
    return [
        *head,
        ChatMessage(role="user", content=first, image=["0"]),
        ChatMessage(role="assistant", content=reply),
        ChatMessage(role="user", content=pic.question),
    ]


def encode(
    loaded: LoadedModel,
    encoder: PromptEncoder,
    messages: list[ChatMessage],
    image: Image.Image,
    max_tiles: int,
    answer: str,
) -> Example:
    """The engine's own prompt building (``InternVLEngine.prepare``) with the answer and ``<|im_end|>`` appended."""
    conversation = build_conversation(messages, max_tiles)
    (budget,) = conversation.budgets
    pixels = tile_image(image, max_num=budget, image_size=loaded.image_size, use_thumbnail=loaded.use_thumbnail)
    spans = conversation.spans(loaded.template)
    prompt = encoder.encode(spans, [loaded.tokens_per_tile * int(pixels.shape[0])], loaded.context_len)
    end = int(loaded.tokenizer.convert_tokens_to_ids("<|im_end|>"))
    answer_ids = [*encoder.stretch(answer, at_start=False), end]
    return Example(prompt + answer_ids, [-100] * len(prompt) + answer_ids, pixels)


def examples(
    loaded: LoadedModel, rng: random.Random, max_tiles: int, max_side: int, mix: tuple[float, ...] | None
) -> Iterator[Example]:
    """Endless examples; ``max_side`` scales pictures down (same aspect ratios) for the cheap first phase;
    ``mix``: how often each question kind comes (None: equally often)."""
    encoder = PromptEncoder(loaded.tokenizer)
    while True:
        w, h = picture_size(rng)
        scale = min(1.0, max_side / max(w, h))
        kind = rng.choice(KINDS) if mix is None else rng.choices(KINDS, weights=mix)[0]
        pic = picture(rng, kind, (max(MIN_SIDE // 2, int(w * scale)), max(MIN_SIDE // 2, int(h * scale))))
        tiles = max_tiles if rng.random() < 0.6 else rng.randint(1, max_tiles)
        example = encode(loaded, encoder, conversation_for(pic, rng), pic.image, tiles, pic.answer)
        example.target = (KINDS.index(pic.kind), words_of(pic.kind).index(pic.answer))
        yield example


class Batches(torch.utils.data.IterableDataset[dict[str, torch.Tensor]]):
    """Collated batches drawn in a loader process, beside the training step: first cheap ones, then full ones."""

    def __init__(self, tokenizer: Any, schedule: Schedule, seed: int) -> None:
        self.tokenizer, self.schedule, self.seed = tokenizer, schedule, seed

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        loaded = in_memory(None, self.tokenizer)  # the loader process builds prompts only
        rng = random.Random(self.seed)
        pad = int(self.tokenizer.convert_tokens_to_ids("<|endoftext|>"))
        plan = self.schedule
        few, full = examples(loaded, rng, plan.few_tiles, 600, plan.mix), examples(loaded, rng, 12, MAX_SIDE, plan.mix)
        for step in range(plan.steps):
            if step < plan.warm_steps:
                yield collate([next(few) for _ in range(plan.batch)], pad)
            else:
                cheap = round(plan.batch * plan.cheap)
                yield collate([next(few) for _ in range(cheap)] + [next(full) for _ in range(plan.batch - cheap)], pad)


def collate(batch: list[Example], pad_id: int) -> dict[str, torch.Tensor]:
    width = max(len(e.input_ids) for e in batch)
    ids = torch.full((len(batch), width), pad_id)
    labels = torch.full((len(batch), width), -100)
    mask = torch.zeros((len(batch), width), dtype=torch.long)
    for row, e in enumerate(batch):
        ids[row, : len(e.input_ids)] = torch.tensor(e.input_ids)
        labels[row, : len(e.labels)] = torch.tensor(e.labels)
        mask[row, : len(e.input_ids)] = 1
    pixels = torch.cat([e.pixel_values for e in batch])
    last_tile = torch.tensor([int(e.pixel_values.shape[0]) for e in batch]).cumsum(0) - 1
    targets = torch.tensor([e.target for e in batch])
    return {"input_ids": ids, "attention_mask": mask, "labels": labels, "pixel_values": pixels} | {
        "last_tile": last_tile,
        "targets": targets,
    }


def readout(tiles: torch.Tensor) -> torch.Tensor:
    """What ``Probe`` reads of each tile: each token where it is (the top-left quadrant), and pooled over the tile
    (a shape anywhere in it)."""
    return torch.cat([tiles.flatten(1), tiles.mean(1), tiles.amax(1)], dim=1)


class Probe(torch.nn.Module):
    """Training only, never saved: one linear read-out per question kind from the image tokens of each image's
    last tile (the thumbnail, or the only tile: the whole picture either way). Its loss gives the vision tower a
    direct signal while the LLM is still learning where to look."""

    def __init__(self, tokens: int, width: int) -> None:
        super().__init__()
        self.heads = torch.nn.ModuleList(torch.nn.Linear((tokens + 2) * width, len(words_of(k))) for k in KINDS)

    def loss(self, features: torch.Tensor, last_tile: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        flat = readout(features[last_tile])
        losses = [
            torch.nn.functional.cross_entropy(self.heads[int(kind)](row[None]), answer[None])
            for row, (kind, answer) in zip(flat, targets, strict=True)
        ]
        return torch.stack(losses).mean()


def answers_right(logits: torch.Tensor, labels: torch.Tensor) -> int:
    """Examples whose every answer token is the argmax (teacher forced)."""
    predicted = logits[:, :-1].argmax(-1)
    wanted = labels[:, 1:]
    wrong = (predicted != wanted) & (wanted != -100)
    return int((~wrong.any(dim=1)).sum())


@dataclass(frozen=True)
class Schedule:
    steps: int
    batch: int
    lr: float
    #: Steps at the start with at most 2 tiles + thumbnail an image (cheap), then the full range: 1 to 12 + thumbnail.
    warm_steps: int
    #: Cosine decay to 3 % over ``steps``; without it the rate stays put, so a run can be cut at any step.
    decay: bool = True
    #: Weight of the probe's loss (``Probe``), 0 for none.
    probe: float = 0.0
    #: Stop after this many steps (the rate still follows ``steps``); None: all of them.
    stop: int | None = None
    #: How often each question kind comes, in ``KINDS`` order; None: equally often.
    mix: tuple[float, ...] | None = None
    #: At most this many grid tiles an image in the cheap examples (1: the whole picture squashed into one tile,
    #: which is what the thumbnail shows).
    few_tiles: int = 2
    #: Share of cheap examples in each batch after the warm steps.
    cheap: float = 0.0

    def lr_at(self, step: int) -> float:
        warmup = 30
        if step < warmup:
            return self.lr * (step + 1) / warmup
        if not self.decay:
            return self.lr
        progress = (step - warmup) / max(1, self.steps - warmup)
        return self.lr * (0.03 + 0.97 * 0.5 * (1 + math.cos(math.pi * progress)))


def train(
    model: Any, tokenizer: Any, schedule: Schedule, seed: int, save: Callable[[], object], log_every: int = 20
) -> None:
    """AdamW on the answer tokens; ``save`` writes the checkpoint every 100 steps (a long run can be looked at)."""
    loader = torch.utils.data.DataLoader(Batches(tokenizer, schedule, seed), batch_size=None, num_workers=1)
    torch.manual_seed(seed)
    probe = Probe(TOKENS_PER_TILE, model.config.text_config.hidden_size)
    features: list[torch.Tensor] = []
    hook = model.model.multi_modal_projector.register_forward_hook(lambda _m, _i, out: features.append(out))
    params = [*model.parameters(), *(probe.parameters() if schedule.probe else [])]
    optimizer = torch.optim.AdamW(params, lr=schedule.lr, weight_decay=0.01)
    model.train()
    started, right, seen, loss_sum = time.monotonic(), 0, 0, 0.0
    for step, batch in enumerate(loader):
        if schedule.stop is not None and step >= schedule.stop:
            break
        for group in optimizer.param_groups:
            group["lr"] = schedule.lr_at(step)
        last_tile, targets = batch.pop("last_tile"), batch.pop("targets")
        features.clear()
        out = model(**batch)
        loss = out.loss
        if schedule.probe:
            loss = loss + schedule.probe * probe.loss(features[0], last_tile, targets)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        right += answers_right(out.logits.detach(), batch["labels"])
        seen += schedule.batch
        loss_sum += float(out.loss.detach())
        if (step + 1) % log_every == 0:
            print(
                f"step {step + 1}/{schedule.steps} loss {loss_sum / log_every:.4f} "
                f"answers right (teacher forced) {right / seen:.0%} lr {schedule.lr_at(step):.2e} "
                f"{time.monotonic() - started:.0f}s",
                flush=True,
            )
            right, seen, loss_sum = 0, 0, 0.0
        if (step + 1) % 100 == 0:
            model.eval()
            save()
            model.train()
    hook.remove()
    model.eval()


def make_demo_model(
    out_dir: str | Path,
    stages: list[Schedule],
    seed: int = 0,
    threads: int = 1,
    start: Path | None = None,
    done: int = 1,
) -> Path:
    """Train stage after stage (stage k draws pictures from a generator started at ``seed + k``, with a fresh
    optimizer); ``start``: a checkpoint written after the first ``done`` stages, to run only the later ones (the
    same weights as going on in one process)."""
    from transformers import InternVLForConditionalGeneration

    # One thread by default: on a busy shared CPU, two threads that wait on each other ran a step 5x slower.
    torch.set_num_threads(threads)
    model, tokenizer = new_model(seed)
    if start is not None:
        model = InternVLForConditionalGeneration.from_pretrained(start, dtype=torch.float32)
    recipe = {"seed": seed, "stages": [vars(stage) for stage in stages]}
    out = Path(out_dir)

    def save() -> Path:
        return save_checkpoint(model, tokenizer, out, DEMO_NOTICE, recipe)

    for k, stage in enumerate(stages):
        if start is None or k >= done:
            train(model, tokenizer, stage, seed + k, save)
    return save()


def arguments() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("directory")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--steps", type=int, default=1600)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--warm-steps", type=int, default=1200)
    parser.add_argument("--polish-steps", type=int, default=POLISH_STEPS, help="second stage: full range only")
    parser.add_argument("--full-steps", type=int, default=FULL_STEPS, help="third stage: full range, even mix")
    parser.add_argument("--polish-lr", type=float, default=1e-3)
    parser.add_argument("--probe", type=float, default=1.0, help="weight of the probe's loss in the second stage")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--start", type=Path, default=None, help="a checkpoint written after stage --start-stage")
    parser.add_argument("--start-stage", type=int, default=1, help="stages done in --start's checkpoint")
    return parser


def stages_of(args: argparse.Namespace) -> list[Schedule]:
    first = Schedule(args.steps, args.batch, args.lr, args.warm_steps, stop=args.warm_steps)
    mix = (0.2, 0.5, 0.3)  # shapes are the hardest to learn
    polish = Schedule(args.polish_steps, 12, args.polish_lr, 0, decay=False, probe=args.probe, mix=mix)
    # Third: the full range only, every question equally often (what the first two stages left weakest).
    full = Schedule(args.full_steps, 8, args.polish_lr, 0, decay=False, probe=args.probe)
    return [first, replace(polish, few_tiles=1, cheap=2 / 3), full]


def recipe_defaults() -> dict[str, object]:
    """The recipe ``make demo-model`` runs (saved with the weights as ``tiny_model.json``, beside the notice)."""
    args = arguments().parse_args(["-"])
    return {"seed": args.seed, "stages": [vars(stage) for stage in stages_of(args)]}


def main(argv: list[str] | None = None) -> int:
    args = arguments().parse_args(argv)
    path = make_demo_model(args.directory, stages_of(args), args.seed, args.threads, args.start, args.start_stage)
    print(f"wrote {path}; questions: {', '.join(QUESTIONS.values())}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
