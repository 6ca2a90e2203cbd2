"""Train the demo InternVL: ``python -m broker_worker.model.demo_training DIR`` (``make demo-model``).

The model (``demo_checkpoint``) learns three questions on pictures drawn by ``demo_images``, from examples built by
the worker's own prompt and tiling path (``demo_examples``), one stage after another (``demo_train_loop``). A fixed
RNG seed gives the same pictures and the same initial weights.

Three stages: first cheap examples (pictures at most 600 px, at most 2 tiles + thumbnail), then the full range of
sizes (1 to 12 tiles + thumbnail) mixed with one-tile examples (the whole picture in one tile, which is what the
thumbnail shows), with a training-only probe (``Probe``) that gives the vision tower a direct signal, then the full
range only, every question equally often. The second stage keeps its learning rate constant, so a run cut after K
steps is the run of ``--polish-steps K``.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import replace
from pathlib import Path

import torch

from broker_worker.model.demo_checkpoint import DEMO_NOTICE, new_model
from broker_worker.model.demo_images import QUESTIONS
from broker_worker.model.demo_train_loop import Schedule, train
from broker_worker.model.tiny_model import save_checkpoint

POLISH_STEPS = 300
FULL_STEPS = 400


def make_demo_model(
    out_dir: str | Path,
    stages: list[Schedule],
    seed: int = 0,
    threads: int = 1,
    start: Path | None = None,
    done: int = 1,
) -> Path:
    """Train stage after stage (stage k draws pictures from its own generator, started at the recipe's number
    plus k, with a fresh optimizer); ``start``: a checkpoint written after the first ``done`` stages, to run only
    the later ones (the same weights as going on in one process)."""
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
