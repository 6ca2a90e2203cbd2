"""The chat UI draws InternVL grounding boxes (<ref>/<box>, 0-1000 coordinates) like InternVL's demo."""

from __future__ import annotations

from PIL import Image

from ui.grounding import Box, draw_boxes, find_boxes


def test_find_boxes_with_and_without_labels() -> None:
    text = (
        "There is <ref>a cat</ref><box>[[100, 200, 500, 900]]</box> and two "
        "<ref>dogs</ref><box>[[0, 0, 10, 10], [990, 990, 1000, 1000]]</box>; also <box>[[1, 2, 3, 4]]</box>."
    )
    assert find_boxes(text) == [
        Box("a cat", 100, 200, 500, 900),
        Box("dogs", 0, 0, 10, 10),
        Box("dogs", 990, 990, 1000, 1000),
        Box("", 1, 2, 3, 4),
    ]
    assert find_boxes("no grounding here, <box>[[broken</box>") == []


def test_boxes_are_drawn_in_image_coordinates() -> None:
    image = Image.new("RGB", (200, 100), "white")
    out = draw_boxes(image, [Box("x", 500, 500, 1000, 1000)])
    assert out.getpixel((100, 50)) != (255, 255, 255)  # the box's top-left corner: (500/1000*200, 500/1000*100)
    assert out.getpixel((40, 20)) == (255, 255, 255)  # outside the box
    assert image.getpixel((100, 50)) == (255, 255, 255)  # the original is untouched
