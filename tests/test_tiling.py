from __future__ import annotations

import random

import pytest
import torch
from PIL import Image

from broker_worker.model import tiling
from tests import internvl_reference as internvl

MODES = ["RGB", "RGBA", "L", "P", "CMYK"]


def noise(width: int, height: int, mode: str, seed_value: int) -> Image.Image:
    base = Image.effect_noise((width, height), 30 + seed_value % 50).convert("L")
    image = Image.merge(
        "RGB", [base, base.transpose(Image.Transpose.FLIP_LEFT_RIGHT), base.transpose(Image.Transpose.FLIP_TOP_BOTTOM)]
    )
    if mode == "RGBA":
        image.putalpha(base)
        return image
    return image.convert(mode)


def cases(count: int, stream: int = 2024) -> list[tuple[int, int, int, str]]:
    rng = random.Random(stream)
    return [
        (rng.randint(20, 1600), rng.randint(20, 1600), rng.randint(1, 24), MODES[k % len(MODES)]) for k in range(count)
    ]


@pytest.mark.parametrize(("width", "height", "max_num", "mode"), cases(120))
def test_dynamic_preprocess_tiles_are_byte_identical(width: int, height: int, max_num: int, mode: str) -> None:
    image = noise(width, height, mode, width)
    expected = internvl.tiles(image, 1, max_num, 448, True)
    actual = tiling.dynamic_preprocess(image, min_num=1, max_num=max_num, image_size=448, use_thumbnail=True)
    assert [t.size for t in actual] == [t.size for t in expected]
    assert [t.mode for t in actual] == [t.mode for t in expected]
    assert [t.tobytes() for t in actual] == [t.tobytes() for t in expected]


@pytest.mark.parametrize(("width", "height", "max_num", "mode"), cases(24, stream=2025))  # sizes of its own
def test_tile_image_equals_internvl_pipeline(width: int, height: int, max_num: int, mode: str) -> None:
    image = noise(width, height, mode, height)
    expected = internvl.pixel_values(image, max_num=max_num)
    actual = tiling.tile_image(image, max_num=max_num, image_size=448, use_thumbnail=True)
    assert actual.dtype == torch.float32
    assert torch.equal(actual, expected)


@pytest.mark.parametrize("use_thumbnail", [True, False])
def test_tile_image_without_thumbnail_and_other_tile_size(use_thumbnail: bool) -> None:
    image = noise(700, 300, "RGB", 3)
    expected = torch.stack([internvl.transform(224)(t) for t in internvl.tiles(image, 1, 6, 224, use_thumbnail)])
    assert torch.equal(tiling.tile_image(image, max_num=6, image_size=224, use_thumbnail=use_thumbnail), expected)


def test_build_transform_matches_internvl() -> None:
    image = noise(500, 200, "RGBA", 1)
    assert torch.equal(tiling.build_transform(448)(image), internvl.transform(448)(image))


@pytest.mark.parametrize(
    ("size", "max_num", "grid"),
    [
        ((800, 600), 12, (4, 3)),
        ((448, 448), 12, (1, 1)),
        ((1200, 400), 6, (3, 1)),
        ((500, 900), 6, (1, 2)),
        ((900, 300), 2, (2, 1)),
        ((2000, 50), 12, (12, 1)),
        ((100, 100), 4, (1, 1)),
    ],
)
def test_grid_choice(size: tuple[int, int], max_num: int, grid: tuple[int, int]) -> None:
    assert tiling.choose_grid(*size, 1, max_num, 448) == grid
    assert internvl.grid(*size, 1, max_num, 448) == grid


def test_exact_tie_prefers_larger_grid_for_large_images() -> None:
    # aspect 1.0: (1,1), (2,2) tie; the later grid wins when the image is larger than half its area.
    assert tiling.choose_grid(1000, 1000, 1, 4, 448) == (2, 2)
    assert tiling.choose_grid(300, 300, 1, 4, 448) == (1, 1)
