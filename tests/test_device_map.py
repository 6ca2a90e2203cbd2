from __future__ import annotations

import re

import pytest

from broker_worker.model.device_map import NATIVE_NAMES, REMOTE_NAMES, layers_per_gpu, on_gpus, split_model

LAYER_COUNTS = [1, 2, 3, 16, 24, 28, 32, 36, 40, 48, 60, 64, 80, 94]


def layer_gpus(device_map: dict[str, int]) -> dict[int, int]:
    out = {}
    for name, gpu in device_map.items():
        if m := re.search(r"layers\.(\d+)$", name):
            assert int(m.group(1)) not in out, f"layer {m.group(1)} mapped twice"
            out[int(m.group(1))] = gpu
    return out


@pytest.mark.parametrize("remote", [False, True])
@pytest.mark.parametrize("gpus", range(1, 9))
@pytest.mark.parametrize("layers", LAYER_COUNTS)
@pytest.mark.parametrize("alpha", [0.0, 0.5, 0.8])
def test_every_layer_once_balanced_last_layer_on_gpu0(remote: bool, gpus: int, layers: int, alpha: float) -> None:
    device_map = split_model(layers, gpus, alpha, remote_code=remote)
    if gpus == 1:
        assert device_map == {"": 0}
        return
    mapped = layer_gpus(device_map)
    assert sorted(mapped) == list(range(layers))  # every layer once, no phantom layer
    assert set(device_map.values()) <= set(range(gpus))
    assert mapped[layers - 1] == 0
    names = REMOTE_NAMES if remote else NATIVE_NAMES
    assert all(device_map[m] == 0 for m in names.on_first_gpu)
    per_gpu = [sum(1 for g in mapped.values() if g == k) for k in range(gpus)]
    assert per_gpu == layers_per_gpu(layers, gpus, alpha)
    rest = per_gpu[1:]
    assert max(rest) - min(rest) <= 1
    if layers >= 2 * gpus:
        assert min(per_gpu) >= 1
    # layers run GPU 0 -> 1 -> ... -> last GPU, then back to 0 for the last layer
    order = [mapped[i] for i in range(layers - 1)]
    assert order == sorted(order)


@pytest.mark.parametrize(
    ("layers", "gpus", "alpha", "expected"),
    [
        (32, 1, 0.5, [32]),  # the seed: everything on GPU 0
        (32, 1, 0.8, [32]),  # the seed: a phantom layers.32 from float error
        (32, 2, 0.5, [11, 21]),  # the seed: planned [11, 22] (sum 33), real [12, 20]
        (32, 4, 0.5, [5, 9, 9, 9]),  # the seed: planned [5, 10, 10, 10], 3 phantom keys
        (24, 8, 0.5, [2, 4, 3, 3, 3, 3, 3, 3]),  # the seed left GPU 7 empty
        (32, 8, 0.5, [2, 5, 5, 4, 4, 4, 4, 4]),
        (80, 4, 0.0, [20, 20, 20, 20]),
        (80, 4, 0.2, [17, 21, 21, 21]),
        (80, 4, 0.5, [11, 23, 23, 23]),
        (80, 4, 0.8, [5, 25, 25, 25]),
    ],
)
def test_seed_edge_cases_fixed(layers: int, gpus: int, alpha: float, expected: list[int]) -> None:
    assert layers_per_gpu(layers, gpus, alpha) == expected
    assert sum(expected) == layers


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
