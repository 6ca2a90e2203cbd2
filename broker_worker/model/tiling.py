"""InternVL's dynamic tiling: its ``dynamic_preprocess`` pipeline with byte-identical output, and a faster equivalent.

``build_transform``, ``find_closest_aspect_ratio`` and ``dynamic_preprocess`` keep the signatures of InternVL's
README helpers so code written against those can switch without a diff. ``tile_image`` returns exactly the tensor
``torch.stack([build_transform(s)(t) for t in dynamic_preprocess(...)])`` would, without per-tile work: one RGB
conversion of the resized image, one reshape into tiles and one batched ToTensor + Normalize.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from functools import lru_cache

import numpy as np
import torch
import torchvision.transforms as T
from PIL import Image
from torchvision.transforms.functional import InterpolationMode

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

Grid = tuple[int, int]  # (columns, rows)
_RESIZER = ThreadPoolExecutor(max_workers=2, thread_name_prefix="resize")


def _to_rgb(image: Image.Image) -> Image.Image:
    # InternVL's pipeline drops alpha instead of compositing it; kept on purpose for identical pixels.
    return image.convert("RGB") if image.mode != "RGB" else image


def build_transform(input_size: int) -> Callable[[Image.Image], torch.Tensor]:
    transform: Callable[[Image.Image], torch.Tensor] = T.Compose(
        [
            T.Lambda(_to_rgb),
            T.Resize((input_size, input_size), interpolation=InterpolationMode.BICUBIC),
            T.ToTensor(),
            T.Normalize(mean=IMAGENET_MEAN, std=IMAGENET_STD),
        ]
    )
    return transform


def candidate_grids(min_num: int, max_num: int) -> list[Grid]:
    """All (cols, rows) with min_num <= cols*rows <= max_num, ordered by area.

    Built through a set and a stable sort exactly like InternVL's ``dynamic_preprocess``, so equal-area candidates
    come in the same order.
    """
    ratios = {
        (i, j)
        for n in range(min_num, max_num + 1)
        for i in range(1, n + 1)
        for j in range(1, n + 1)
        if min_num <= i * j <= max_num
    }
    return sorted(ratios, key=lambda r: r[0] * r[1])


def find_closest_aspect_ratio(
    aspect_ratio: float, target_ratios: Iterable[Grid], width: int, height: int, image_size: int
) -> Grid:
    best_diff = float("inf")
    best: Grid = (1, 1)
    area = width * height
    for ratio in target_ratios:
        diff = abs(aspect_ratio - ratio[0] / ratio[1])
        if diff < best_diff:
            best_diff, best = diff, ratio
        elif diff == best_diff and area > 0.5 * image_size * image_size * ratio[0] * ratio[1]:
            best = ratio
    return best


@lru_cache(maxsize=256)
def choose_grid(width: int, height: int, min_num: int, max_num: int, image_size: int) -> Grid:
    return find_closest_aspect_ratio(width / height, candidate_grids(min_num, max_num), width, height, image_size)


def dynamic_preprocess(
    image: Image.Image, min_num: int = 1, max_num: int = 6, image_size: int = 448, use_thumbnail: bool = False
) -> list[Image.Image]:
    width, height = image.size
    cols, rows = choose_grid(width, height, min_num, max_num, image_size)
    resized = image.resize((image_size * cols, image_size * rows))
    tiles = []
    for k in range(cols * rows):
        left, top = (k % cols) * image_size, (k // cols) * image_size
        tiles.append(resized.crop((left, top, left + image_size, top + image_size)))
    if use_thumbnail and len(tiles) != 1:
        tiles.append(image.resize((image_size, image_size)))
    return tiles


def _normalize(tiles: np.ndarray) -> torch.Tensor:
    """(N, s, s, 3) uint8 -> (N, 3, s, s) float32, the same float32 operations ToTensor + Normalize apply."""
    out = torch.from_numpy(tiles).permute(0, 3, 1, 2).to(torch.float32, memory_format=torch.contiguous_format)
    mean = torch.as_tensor(IMAGENET_MEAN, dtype=torch.float32).view(1, 3, 1, 1)
    std = torch.as_tensor(IMAGENET_STD, dtype=torch.float32).view(1, 3, 1, 1)
    return out.div_(255).sub_(mean).div_(std)


def tile_image(
    image: Image.Image, max_num: int = 12, image_size: int = 448, use_thumbnail: bool = True
) -> torch.Tensor:
    """``(n_tiles, 3, image_size, image_size)`` float32, equal (``torch.equal``) to InternVL's pipeline."""
    width, height = image.size
    cols, rows = choose_grid(width, height, 1, max_num, image_size)
    s = image_size
    # The thumbnail resize runs beside the grid resize: Pillow releases the GIL while resampling, and these two
    # resizes are nearly all the time tiling takes.
    thumb = _RESIZER.submit(image.resize, (s, s)) if use_thumbnail and cols * rows != 1 else None
    grid = np.asarray(_to_rgb(image.resize((s * cols, s * rows))))
    # (rows*s, cols*s, 3) -> (rows, s, cols, s, 3) -> (rows, cols, s, s, 3): row-major tiles like InternVL's crops.
    tiles = grid.reshape(rows, s, cols, s, 3).transpose(0, 2, 1, 3, 4).reshape(rows * cols, s, s, 3)
    if thumb is not None:
        tiles = np.concatenate([tiles, np.asarray(_to_rgb(thumb.result()))[None]])
    return _normalize(np.ascontiguousarray(tiles) if tiles.flags.writeable else tiles.copy())
