"""How often the demo model is right: fresh random pictures through the full path, greedy.

``python -m bench.demo_accuracy [--per-kind 200] [--seed N] [--model-path demo_model]`` starts a redis-server, one
worker serving the checkpoint and the gateway, then asks each picture's question through the gateway's
``/worker_generate_stream`` (gateway -> Redis -> worker -> client) with InternVL's list prompt, temperature 0,
``max_input_tiles`` 12. Pictures come from ``broker_worker.model.demo_images`` with a fresh RNG seed (printed;
``--seed`` repeats a run), so none was seen in training (that used seed 0's stream). Prints the accuracy per
question kind; exits 1 when one is under ``--bar``.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import httpx

from bench.measures import stack
from broker_worker.model.demo_images import KINDS, Picture, answered, picture, png_base64

ROOT = Path(__file__).resolve().parent.parent
MODEL = "demo-internvl"


def ask(base: str, pic: Picture) -> str:
    body = {
        "model": MODEL,
        "prompt": [
            {"role": "user", "content": pic.question, "image": [png_base64(pic.image)]},
            {"role": "assistant", "content": None},
        ],
        "temperature": 0.0,
        "top_p": 1.0,
        "max_new_tokens": 16,
        "max_input_tiles": 12,
        "repetition_penalty": 1.0,
    }
    raw = httpx.post(base + "/worker_generate_stream", json=body, timeout=300).content
    last = json.loads(raw.split(b"\0")[-2])
    if last["error_code"] != 0:
        raise RuntimeError(f"error_code {last['error_code']}: {last['text']}")
    return str(last["text"])


@dataclass
class Score:
    asked: int
    right: int
    wrong: list[str]  # the first few wrong answers, with their picture's size

    @property
    def accuracy(self) -> float:
        return self.right / self.asked if self.asked else 0.0


def measure(base: str, pictures: list[Picture], clients: int) -> dict[str, Score]:
    with ThreadPoolExecutor(clients) as pool:
        answers = list(pool.map(lambda p: ask(base, p), pictures))
    out: dict[str, Score] = {}
    for kind in KINDS:
        rows = [(p, a) for p, a in zip(pictures, answers, strict=True) if p.kind == kind]
        wrong = [f"{p.image.width}x{p.image.height} want {p.answer!r} got {a!r}" for p, a in rows if not answered(a, p)]
        out[kind] = Score(len(rows), len(rows) - len(wrong), wrong[:5])
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--per-kind", type=int, default=200)
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--model-path", type=Path, default=ROOT / "demo_model")
    parser.add_argument("--clients", type=int, default=3)
    parser.add_argument("--bar", type=float, default=0.95)
    args = parser.parse_args()
    seed = args.seed if args.seed is not None else int.from_bytes(os.urandom(4), "big")
    rng = random.Random(seed)
    pictures = [picture(rng, kind) for kind in KINDS for _ in range(args.per_kind)]
    rng.shuffle(pictures)
    started = time.monotonic()
    with (
        tempfile.TemporaryDirectory() as tmp,
        stack(Path(tmp), [{"model": MODEL, "model_path": args.model_path}]) as (
            _,
            base,
            _,
        ),
    ):
        results = measure(base, pictures, args.clients)
    print(f"pictures: RNG seed {seed}, {args.per_kind} per kind, {time.monotonic() - started:.0f} s")
    for kind, score in results.items():
        print(f"{kind:9} {score.right}/{score.asked} = {score.accuracy:.1%}")
        for line in score.wrong:
            print(f"    {line}")
    return 0 if all(score.accuracy >= args.bar for score in results.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
