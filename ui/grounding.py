"""InternVL grounding output (``<ref>cat</ref><box>[[x1, y1, x2, y2]]</box>``, coordinates in 0-1000) drawn
on the image it refers to, as InternVL's own demo does."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass

from PIL import Image, ImageDraw

_GROUNDED = re.compile(r"(?:<ref>(?P<label>.*?)</ref>)?\s*<box>(?P<boxes>\[\[.*?\]\])</box>", re.DOTALL)
_COLORS = ["#e6194b", "#3cb44b", "#4363d8", "#f58231", "#911eb4", "#46f0f0", "#f032e6", "#bcf60c"]


@dataclass(frozen=True)
class Box:
    label: str
    x1: float
    y1: float
    x2: float
    y2: float  # 0-1000, relative to the image


def find_boxes(text: str) -> list[Box]:
    boxes: list[Box] = []
    for match in _GROUNDED.finditer(text):
        try:
            coords = json.loads(match.group("boxes"))
        except ValueError:
            continue
        label = (match.group("label") or "").strip()
        boxes += [Box(label, *map(float, c)) for c in coords if isinstance(c, list) and len(c) == 4]
    return boxes


def draw_boxes(image: Image.Image, boxes: list[Box]) -> Image.Image:
    out = image.convert("RGB")
    draw = ImageDraw.Draw(out)
    width, height = out.size
    for k, box in enumerate(boxes):
        color = _COLORS[k % len(_COLORS)]
        rect = (box.x1 / 1000 * width, box.y1 / 1000 * height, box.x2 / 1000 * width, box.y2 / 1000 * height)
        draw.rectangle(rect, outline=color, width=max(2, width // 200))
        if box.label:
            draw.text((rect[0] + 4, rect[1] + 2), box.label, fill=color)
    return out
