"""One training stage of the demo model: its plan (``Schedule``), batches drawn beside the training step
(``Batches``), AdamW on the answer tokens, and a training-only probe (``Probe``) that gives the vision tower a direct
signal."""

from __future__ import annotations

import math
import random
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch

from broker_worker.model.demo_checkpoint import TOKENS_PER_TILE, in_memory
from broker_worker.model.demo_examples import collate, examples
from broker_worker.model.demo_images import KINDS, MAX_SIDE, words_of


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
