from __future__ import annotations

import re

import pytest

from broker_worker.model.device_map import NATIVE_NAMES, layers_per_gpu, on_gpus, split_model

LAYER_COUNTS = [1, 2, 3, 16, 24, 28, 32, 36, 40, 48, 60, 64, 80, 94]


def layer_gpus(device_map: dict[str, int]) -> dict[int, int]:
    out = {}
    for name, gpu in device_map.items():
        if m := re.search(r"layers\.(\d+)$", name):
            assert int(m.group(1)) not in out, f"layer {m.group(1)} mapped twice"
            out[int(m.group(1))] = gpu
    return out


@pytest.mark.parametrize("gpus", range(2, 9))
@pytest.mark.parametrize("layers", LAYER_COUNTS)
@pytest.mark.parametrize("alpha", [0.0, 0.5, 0.8])
def test_every_layer_once_balanced_last_layer_on_gpu0(gpus: int, layers: int, alpha: float) -> None:
    """Invariants on a grid of layouts; the counts themselves are pinned by the hand-computed tables below."""
    device_map = split_model(layers, gpus, alpha)
    mapped = layer_gpus(device_map)
    assert sorted(mapped) == list(range(layers))  # every layer once, no phantom layer
    assert set(device_map.values()) <= set(range(gpus))
    assert mapped[layers - 1] == 0
    assert all(device_map[m] == 0 for m in NATIVE_NAMES.on_first_gpu)
    per_gpu = [sum(1 for g in mapped.values() if g == k) for k in range(gpus)]
    rest = per_gpu[1:]
    assert max(rest) - min(rest) <= 1
    assert per_gpu[0] <= max(rest) + 1 or alpha == 0.0  # GPU 0 also holds the vision model
    if layers >= 2 * gpus:
        assert min(per_gpu) >= 1
    # layers run GPU 0 -> 1 -> ... -> last GPU, then back to 0 for the last layer
    order = [mapped[i] for i in range(layers - 1)]
    assert order == sorted(order)


def test_one_gpu_holds_everything() -> None:
    for layers in (1, 32, 94):
        for alpha in (0.0, 0.8):
            assert split_model(layers, 1, alpha) == {"": 0}


@pytest.mark.parametrize(
    ("layers", "gpus", "alpha", "expected"),
    [
        (32, 1, 0.5, [32]),  # the seed: everything on GPU 0
        (32, 1, 0.8, [32]),  # the seed: a phantom layers.32 from float error
        (32, 2, 0.5, [11, 21]),  # the seed: planned [11, 22] (sum 33), real [12, 20]
        (32, 4, 0.5, [5, 9, 9, 9]),  # the seed: planned [5, 10, 10, 10], 3 phantom keys
        (24, 8, 0.5, [2, 4, 3, 3, 3, 3, 3, 3]),  # InternVL's split_model left GPU 7 empty
        (32, 8, 0.5, [2, 5, 5, 4, 4, 4, 4, 4]),
        (80, 4, 0.0, [20, 20, 20, 20]),
        (80, 4, 0.2, [17, 21, 21, 21]),
        (80, 4, 0.5, [11, 23, 23, 23]),
        (80, 4, 0.8, [5, 25, 25, 25]),
        # By hand: GPU 0 gets round(L * (1 - a) / (G - a)) (at least 1), the others share the rest evenly,
        # the first ones one more when it does not divide.
        (1, 2, 0.5, [1, 0]),  # round(0.33) = 0 -> 1; nothing left for GPU 1
        (2, 2, 0.5, [1, 1]),  # round(0.67) = 1
        (3, 8, 0.0, [1, 1, 1, 0, 0, 0, 0, 0]),  # round(0.375) = 0 -> 1; 2 over 7 GPUs
        (16, 3, 0.8, [1, 8, 7]),  # round(1.45) = 1; 15 = 7 + 7 + 1
        (28, 7, 0.5, [2, 5, 5, 4, 4, 4, 4]),  # round(2.15) = 2; 26 = 6 x 4 + 2
        (36, 5, 0.8, [2, 9, 9, 8, 8]),  # round(1.71) = 2; 34 = 4 x 8 + 2
        (40, 6, 0.5, [4, 8, 7, 7, 7, 7]),  # round(3.64) = 4; 36 = 5 x 7 + 1
        (48, 2, 0.0, [24, 24]),
        (60, 3, 0.0, [20, 20, 20]),
        (94, 8, 0.5, [6, 13, 13, 13, 13, 12, 12, 12]),  # round(6.27) = 6; 88 = 7 x 12 + 4
    ],
)
def test_split_model_edge_cases_fixed(layers: int, gpus: int, alpha: float, expected: list[int]) -> None:
    assert layers_per_gpu(layers, gpus, alpha) == expected
    assert sum(expected) == layers
    mapped = layer_gpus(split_model(layers, gpus, alpha)) if gpus > 1 else {}
    assert [sum(1 for g in mapped.values() if g == k) for k in range(gpus)] == (expected if gpus > 1 else [0])


def test_whole_map_of_a_small_model() -> None:
    # 4 layers on 2 GPUs, alpha 0.5: GPU 0 holds round(4 x 0.5 / 1.5) = 1 layer, the last one; GPU 1 the rest.
    on_first = dict.fromkeys(NATIVE_NAMES.on_first_gpu, 0)
    layers = {"model.language_model.layers.0": 1, "model.language_model.layers.1": 1}
    layers |= {"model.language_model.layers.2": 1, "model.language_model.layers.3": 0}
    assert split_model(4, 2, 0.5) == on_first | layers


@pytest.mark.parametrize("alpha", [1.0, -0.1, 1.5])
def test_vit_alpha_out_of_range(alpha: float) -> None:
    with pytest.raises(ValueError, match="vit_alpha"):
        split_model(32, 4, alpha)


def test_one_gpu_with_alpha_one_is_refused_not_divided_by_zero() -> None:
    with pytest.raises(ValueError):
        split_model(32, 1, 1.0)


@pytest.mark.parametrize(("layers", "gpus"), [(0, 2), (32, 0)])
def test_degenerate_sizes(layers: int, gpus: int) -> None:
    with pytest.raises(ValueError):
        split_model(layers, gpus)


def test_names_per_format() -> None:
    native = split_model(4, 2)
    assert {"model.vision_tower", "model.multi_modal_projector", "lm_head"} <= set(native)
    assert "model.language_model.layers.3" in native
    remote = split_model(4, 2, remote_code=True)
    assert {"vision_model", "mlp1", "language_model.lm_head", "language_model.model.embed_tokens"} <= set(remote)
    internlm2 = split_model(4, 2, remote_code=True, internlm2=True)
    assert {"language_model.output", "language_model.model.tok_embeddings"} <= set(internlm2)


def test_gpu_subset() -> None:
    device_map = on_gpus(split_model(8, 2), [4, 5])
    assert set(device_map.values()) == {4, 5}
    assert device_map["model.vision_tower"] == 4
