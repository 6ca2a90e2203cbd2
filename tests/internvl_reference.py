"""InternVL's tiling written the straightforward way (per-tile crop, convert, transforms), used as the oracle."""

from __future__ import annotations

import torch
import torchvision.transforms as T
from PIL import Image
from torchvision.transforms.functional import InterpolationMode


def transform(size: int) -> T.Compose:
    return T.Compose(
        [
            T.Lambda(lambda im: im.convert("RGB") if im.mode != "RGB" else im),
            T.Resize((size, size), interpolation=InterpolationMode.BICUBIC),
            T.ToTensor(),
            T.Normalize(mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225)),
        ]
    )


def grid(width: int, height: int, min_num: int, max_num: int, size: int) -> tuple[int, int]:
    aspect = width / height
    ratios = set(
        (i, j)
        for n in range(min_num, max_num + 1)
        for i in range(1, n + 1)
        for j in range(1, n + 1)
        if min_num <= i * j <= max_num
    )
    best_diff, best = float("inf"), (1, 1)
    for i, j in sorted(ratios, key=lambda x: x[0] * x[1]):
        diff = abs(aspect - i / j)
        if diff < best_diff:
            best_diff, best = diff, (i, j)
        elif diff == best_diff and width * height > 0.5 * size * size * i * j:
            best = (i, j)
    return best


def tiles(
    image: Image.Image, min_num: int = 1, max_num: int = 6, size: int = 448, thumb: bool = False
) -> list[Image.Image]:
    i, j = grid(*image.size, min_num, max_num, size)
    resized = image.resize((size * i, size * j))
    out = [
        resized.crop(((k % i) * size, (k // i) * size, (k % i + 1) * size, (k // i + 1) * size)) for k in range(i * j)
    ]
    if thumb and len(out) != 1:
        out.append(image.resize((size, size)))
    return out


def pixel_values(image: Image.Image, max_num: int = 12, size: int = 448, thumb: bool = True) -> torch.Tensor:
    tf = transform(size)
    return torch.stack([tf(t) for t in tiles(image, max_num=max_num, size=size, thumb=thumb)])
