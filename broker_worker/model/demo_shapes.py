"""Teach the demo InternVL shapes: ``python -m broker_worker.model.demo_shapes DIR`` (the end of ``make demo-model``).

``demo_training``'s three stages teach colors and quadrants, but left the shape question at chance: its vision
tower did not encode shape at all (a read-out trained on its features alone stayed near 45 %), and training
everything together never got it there. Three more phases, each from the previous one's weights:

1. ``vision``: the vision tower and projector alone (the LLM is not run), on one-tile pictures at most 600 px:
   a shape read-out (``Probe``'s shape head) on the last tile's features, plus a penalty for drifting from the
   starting features on color and quadrant pictures (so what the LLM already reads stays).
2. ``joint``: everything, the LLM at a ten times higher rate than the vision part (it needs ~250 steps at 3e-3
   before its shape answers rise from chance), the shape read-out carried over from phase 1.
3. ``polish``: lower rates, more quadrant examples and a fresh read-out on every kind (phase 2 lost some quadrants).

Each phase has a constant learning rate and fixed RNG seeds.
"""

from __future__ import annotations

import argparse
import copy
import json
import random
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from broker_worker.model.demo_checkpoint import DEMO_NOTICE, TOKENS_PER_TILE, in_memory
from broker_worker.model.demo_examples import collate, examples
from broker_worker.model.demo_images import MAX_SIDE, MIN_SIDE, picture, picture_size, words_of
from broker_worker.model.demo_train_loop import Probe, readout
from broker_worker.model.demo_training import recipe_defaults
from broker_worker.model.tiling import tile_image
from broker_worker.model.tiny_model import make_tokenizer, save_checkpoint

SHAPE = 1  # the shape question's index in demo_images.KINDS (and Probe's heads)


@dataclass(frozen=True)
class VisionPhase:
    steps: int = 400
    lr: float = 3e-3
    keep: float = 1.0  # weight of the drift penalty on color and quadrant features
    seed: int = 5


@dataclass(frozen=True)
class JointPhase:
    steps: int
    vision_lr: float
    llm_lr: float
    probe_lr: float
    probe: float  # weight of the read-out's loss
    shape_probe_only: bool  # True: phase 1's shape read-out on shape examples; False: a fresh one on every kind
    mix: tuple[float, float, float]  # color, shape, quadrant
    one_tile: int  # one-tile examples per batch (pictures at most 600 px)
    full: int  # full-range examples per batch (1 to 12 tiles + thumbnail)
    seed: int = 3


JOINT = JointPhase(300, 3e-4, 3e-3, 1e-3, 1.0, True, (0.2, 0.6, 0.2), 8, 1)
POLISH = JointPhase(300, 1e-4, 1e-3, 3e-3, 0.5, False, (0.3, 0.3, 0.4), 6, 2)


def vision_params(model: Any) -> list[torch.nn.Parameter]:
    return [*model.model.vision_tower.parameters(), *model.model.multi_modal_projector.parameters()]


def llm_params(model: Any) -> list[torch.nn.Parameter]:
    return [*model.model.language_model.parameters(), *model.lm_head.parameters()]


def features(model: Any, pixels: torch.Tensor) -> torch.Tensor:
    out = model.model.get_image_features(
        pixel_values=pixels, vision_feature_layer=-1, vision_feature_select_strategy="default"
    )
    return out.pooler_output  # type: ignore[no-any-return]


def one_tile(rng: random.Random, kind: str) -> tuple[torch.Tensor, int]:
    w, h = picture_size(rng)
    scale = min(1.0, 600 / max(w, h))
    pic = picture(rng, kind, (max(MIN_SIDE // 2, int(w * scale)), max(MIN_SIDE // 2, int(h * scale))))  # type: ignore[arg-type]
    return tile_image(pic.image, max_num=1, image_size=448, use_thumbnail=True), words_of(pic.kind).index(pic.answer)


def train_vision(model: Any, phase: VisionPhase) -> torch.nn.Linear:
    """Phase 1; returns the shape read-out it trained (phase 2 goes on with it)."""
    start = copy.deepcopy(model).eval()
    rng = random.Random(phase.seed)
    torch.manual_seed(phase.seed)
    head: torch.nn.Linear = Probe(TOKENS_PER_TILE, model.config.text_config.hidden_size).heads[SHAPE]  # type: ignore[assignment]
    vision = vision_params(model)
    groups = [{"params": vision, "lr": phase.lr}, {"params": list(head.parameters()), "lr": 3e-3}]
    optimizer = torch.optim.AdamW(groups, weight_decay=0.01)
    model.train()
    for step in range(phase.steps):
        shapes = [one_tile(rng, "shape") for _ in range(24)]
        others = [one_tile(rng, rng.choice(["color", "quadrant"]))[0] for _ in range(8)]
        pixels = torch.cat([t for t, _ in shapes] + others)
        answers = torch.tensor([a for _, a in shapes])
        feats = features(model, pixels)
        loss = torch.nn.functional.cross_entropy(head(readout(feats[:24])), answers)
        with torch.no_grad():
            kept = features(start, pixels[24:])
        drift = torch.nn.functional.mse_loss(feats[24:], kept) / kept.pow(2).mean()
        total: Any = loss + phase.keep * drift  # torch.Tensor.backward is not annotated
        total.backward()
        torch.nn.utils.clip_grad_norm_(vision, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if (step + 1) % 50 == 0:
            print(
                f"vision {step + 1}/{phase.steps}: read-out loss {float(loss):.3f}, drift {float(drift):.4f}",
                flush=True,
            )
    return head


def train_joint(model: Any, tokenizer: Any, phase: JointPhase, shape_head: torch.nn.Linear | None) -> None:
    """Phases 2 and 3: the answer's loss (as in ``demo_train_loop``) plus a read-out's."""
    loaded = in_memory(None, tokenizer)
    rng = random.Random(phase.seed)
    one = examples(loaded, rng, 1, 600, phase.mix)
    full = examples(loaded, rng, 12, MAX_SIDE, phase.mix)
    pad = int(tokenizer.convert_tokens_to_ids("<|endoftext|>"))
    torch.manual_seed(phase.seed)
    probe = Probe(TOKENS_PER_TILE, model.config.text_config.hidden_size)
    if phase.shape_probe_only and shape_head is not None:
        probe.heads[SHAPE].load_state_dict(shape_head.state_dict())
    vision, llm = vision_params(model), llm_params(model)
    groups = [
        {"params": vision, "lr": phase.vision_lr},
        {"params": llm, "lr": phase.llm_lr},
        {"params": list(probe.parameters()), "lr": phase.probe_lr},
    ]
    optimizer = torch.optim.AdamW(groups, weight_decay=0.01)
    projected: list[torch.Tensor] = []
    hook = model.model.multi_modal_projector.register_forward_hook(lambda _m, _i, out: projected.append(out))
    model.train()
    for step in range(phase.steps):
        batch = collate([next(one) for _ in range(phase.one_tile)] + [next(full) for _ in range(phase.full)], pad)
        last_tile, targets = batch.pop("last_tile"), batch.pop("targets")
        projected.clear()
        out = model(**batch)
        loss = out.loss + phase.probe * probe_loss(probe, projected[0], last_tile, targets, phase.shape_probe_only)
        loss.backward()
        torch.nn.utils.clip_grad_norm_([*vision, *llm], 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if (step + 1) % 50 == 0:
            print(f"joint {step + 1}/{phase.steps}: loss {float(out.loss):.3f}", flush=True)
    hook.remove()
    model.eval()


def probe_loss(
    probe: Probe, feats: torch.Tensor, last_tile: torch.Tensor, targets: torch.Tensor, shape_only: bool
) -> torch.Tensor:
    if not shape_only:
        return probe.loss(feats, last_tile, targets)
    shapes = targets[:, 0] == SHAPE
    if not shapes.any():
        return feats.sum() * 0
    logits = probe.heads[SHAPE](readout(feats[last_tile])[shapes])
    return torch.nn.functional.cross_entropy(logits, targets[shapes, 1])


def recipe() -> dict[str, object]:
    """``make demo-model``'s whole recipe: ``demo_training``'s stages, then these phases."""
    return recipe_defaults() | {"shape_phases": [asdict(VisionPhase()), asdict(JOINT), asdict(POLISH)]}


def teach_shapes(directory: str | Path, threads: int = 1) -> Path:
    from transformers import InternVLForConditionalGeneration

    torch.set_num_threads(threads)
    out = Path(directory)
    model = InternVLForConditionalGeneration.from_pretrained(out, dtype=torch.float32)
    tokenizer = make_tokenizer()
    head = train_vision(model, VisionPhase())
    train_joint(model, tokenizer, JOINT, head)
    train_joint(model, tokenizer, POLISH, None)
    path = save_checkpoint(model, tokenizer, out, DEMO_NOTICE, recipe())
    print(f"wrote {path}: {json.dumps(recipe()['shape_phases'])}")
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("directory", help="the checkpoint demo_training wrote; trained further in place")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    teach_shapes(args.directory, args.threads)
    return 0


if __name__ == "__main__":
    sys.exit(main())
