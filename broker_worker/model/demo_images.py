"""The pictures the demo model learns from and is checked on: solid colors, a shape on white, four colored quadrants.

Drawn here with PIL from a ``random.Random``, so the same generator state gives the same images on every machine. Sizes
run from 200 to 1600 px a side with aspect ratios from 1:3 to 3:1, so InternVL's tiling (max 12 tiles) cuts
them into 1 to 12 tiles plus the thumbnail. Each color is jittered per channel around its base RGB.
"""

from __future__ import annotations

import base64
import io
import math
import random
import re
from dataclasses import dataclass
from typing import Literal

from PIL import Image, ImageDraw

Kind = Literal["color", "shape", "quadrant"]
KINDS: tuple[Kind, ...] = ("color", "shape", "quadrant")
COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 20, 20),
    "green": (20, 160, 20),
    "blue": (20, 40, 220),
    "yellow": (240, 220, 20),
    "white": (250, 250, 250),
    "black": (10, 10, 10),
    "orange": (250, 140, 0),
    "purple": (130, 30, 160),
}
SHAPES = ("circle", "square", "triangle")
QUESTIONS: dict[Kind, str] = {
    "color": "What color is the image?",
    "shape": "What shape is in the image?",
    "quadrant": "What color is the top-left part?",
}
MIN_SIDE, MAX_SIDE = 200, 1600
MAX_ASPECT = 3.0


@dataclass(frozen=True)
class Picture:
    kind: Kind
    image: Image.Image
    answer: str

    @property
    def question(self) -> str:
        return QUESTIONS[self.kind]


def picture_size(rng: random.Random, max_aspect: float = MAX_ASPECT) -> tuple[int, int]:
    """Width and height: aspect ratio log-uniform in [1/max_aspect, max_aspect], sides in [MIN_SIDE, MAX_SIDE]."""
    ratio = math.exp(rng.uniform(-math.log(max_aspect), math.log(max_aspect)))  # width / height
    width = rng.uniform(max(MIN_SIDE, MIN_SIDE * ratio), min(MAX_SIDE, MAX_SIDE * ratio))
    return int(width), max(MIN_SIDE, min(MAX_SIDE, int(width / ratio)))


def jittered(rng: random.Random, name: str, jitter: int = 16) -> tuple[int, int, int]:
    r, g, b = (max(0, min(255, c + rng.randint(-jitter, jitter))) for c in COLORS[name])
    return r, g, b


def color_picture(rng: random.Random, size: tuple[int, int]) -> Picture:
    name = rng.choice(list(COLORS))
    return Picture("color", Image.new("RGB", size, jittered(rng, name)), name)


def shape_picture(rng: random.Random, size: tuple[int, int]) -> Picture:
    """A filled shape in a color other than white, on white: its side is 30 % to 75 % of the shorter side."""
    w, h = size
    image = Image.new("RGB", size, jittered(rng, "white"))
    shape = rng.choice(SHAPES)
    s = int(rng.uniform(0.3, 0.75) * min(w, h))
    x, y = rng.randint(0, w - s), rng.randint(0, h - s)
    fill = jittered(rng, rng.choice([c for c in COLORS if c != "white"]))
    draw = ImageDraw.Draw(image)
    if shape == "circle":
        draw.ellipse([x, y, x + s, y + s], fill=fill)
    elif shape == "square":
        draw.rectangle([x, y, x + s, y + s], fill=fill)
    else:
        draw.polygon([(x + s / 2, y), (x, y + s), (x + s, y + s)], fill=fill)
    return Picture("shape", image, shape)


def quadrant_picture(rng: random.Random, size: tuple[int, int]) -> Picture:
    """A 2x2 grid of four different colors; the answer is the top-left one."""
    w, h = size
    names = rng.sample(list(COLORS), 4)
    image = Image.new("RGB", size)
    draw = ImageDraw.Draw(image)
    for name, (x0, y0) in zip(names, [(0, 0), (w // 2, 0), (0, h // 2), (w // 2, h // 2)], strict=True):
        draw.rectangle([x0, y0, x0 + (w + 1) // 2, y0 + (h + 1) // 2], fill=jittered(rng, name))
    return Picture("quadrant", image, names[0])


DRAW = {"color": color_picture, "shape": shape_picture, "quadrant": quadrant_picture}


def picture(rng: random.Random, kind: Kind, size: tuple[int, int] | None = None) -> Picture:
    return DRAW[kind](rng, size or picture_size(rng))


def words_of(kind: Kind) -> tuple[str, ...]:
    """The answers a question of this kind chooses from."""
    return SHAPES if kind == "shape" else tuple(COLORS)


def answered(text: str, pic: Picture) -> bool:
    """The answer names the picture's color or shape (whole word, any case) and no other one of its set."""
    said = {w for w in words_of(pic.kind) if re.search(rf"\b{w}\b", text, re.IGNORECASE)}
    return said == {pic.answer}


def png_base64(image: Image.Image) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()
