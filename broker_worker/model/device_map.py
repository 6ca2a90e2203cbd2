"""Multi-GPU device maps for InternVL: InternVL's ``split_model`` layout, computed from the config, bugs fixed.

Layout: the vision model, projector, embeddings, final norm, rotary embedding, lm_head and the *last* LLM layer
sit on GPU 0 (so the first and last LLM steps share a device); GPU 0 counts as ``1 - vit_alpha`` of a GPU because
the vision model lives there too. Unlike InternVL's ``split_model``, every layer is mapped exactly once (no
phantom keys from ``ceil``), the other GPUs are balanced within one layer and none is left empty when
layers >= 2 * GPUs.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

DeviceMap = dict[str, int]


@dataclass(frozen=True)
class ModuleNames:
    """Where a checkpoint format keeps the modules a device map places."""

    layer_prefix: str
    on_first_gpu: tuple[str, ...]


REMOTE_NAMES = ModuleNames(  # internvl_chat remote code with a transformers LLM (Qwen2/3, Llama, Phi3 copy)
    layer_prefix="language_model.model.layers",
    on_first_gpu=(
        "vision_model",
        "mlp1",
        "language_model.model.embed_tokens",
        "language_model.model.norm",
        "language_model.model.rotary_emb",
        "language_model.lm_head",
    ),
)
REMOTE_INTERNLM2_NAMES = ModuleNames(
    layer_prefix="language_model.model.layers",
    on_first_gpu=(
        "vision_model",
        "mlp1",
        "language_model.model.tok_embeddings",
        "language_model.model.norm",
        "language_model.output",
    ),
)
NATIVE_NAMES = ModuleNames(  # transformers' InternVLForConditionalGeneration (-hf checkpoints)
    layer_prefix="model.language_model.layers",
    on_first_gpu=(
        "model.vision_tower",
        "model.multi_modal_projector",
        "model.language_model.embed_tokens",
        "model.language_model.norm",
        "model.language_model.rotary_emb",
        "lm_head",
    ),
)


def layers_per_gpu(num_layers: int, num_gpus: int, vit_alpha: float = 0.5) -> list[int]:
    """How many LLM layers each GPU holds (GPU 0's count includes the pinned last layer); sums to num_layers."""
    _check(num_layers, num_gpus, vit_alpha)
    if num_gpus == 1:
        return [num_layers]
    share0 = round(num_layers * (1 - vit_alpha) / (num_gpus - vit_alpha))
    first = min(max(share0, 1), max(1, num_layers - (num_gpus - 1)))
    rest, extra = divmod(num_layers - first, num_gpus - 1)
    return [first] + [rest + (1 if g < extra else 0) for g in range(num_gpus - 1)]


def split_model(
    num_layers: int, num_gpus: int, vit_alpha: float = 0.5, *, remote_code: bool = False, internlm2: bool = False
) -> DeviceMap:
    """Module name -> GPU index (0..num_gpus-1). ``{"": 0}`` for one GPU."""
    counts = layers_per_gpu(num_layers, num_gpus, vit_alpha)
    if num_gpus == 1:
        return {"": 0}
    names = _names(remote_code, internlm2)
    device_map: DeviceMap = {}
    layer = 0
    for gpu, count in enumerate(counts):
        # GPU 0's last slot is the pinned final layer, assigned below.
        for _ in range(count - 1 if gpu == 0 else count):
            device_map[f"{names.layer_prefix}.{layer}"] = gpu
            layer += 1
    device_map[f"{names.layer_prefix}.{num_layers - 1}"] = 0
    for module in names.on_first_gpu:
        device_map[module] = 0
    return device_map


def on_gpus(device_map: DeviceMap, gpus: Sequence[int]) -> DeviceMap:
    """Translate GPU indices 0..n-1 to the physical ids a worker was given (``--gpus 4,5``)."""
    return {name: gpus[index] for name, index in device_map.items()}


def _names(remote_code: bool, internlm2: bool) -> ModuleNames:
    if not remote_code:
        return NATIVE_NAMES
    return REMOTE_INTERNLM2_NAMES if internlm2 else REMOTE_NAMES


def _check(num_layers: int, num_gpus: int, vit_alpha: float) -> None:
    if not 0.0 <= vit_alpha < 1.0:
        raise ValueError(f"vit_alpha must be in [0, 1), got {vit_alpha}")
    if num_layers < 1:
        raise ValueError(f"num_layers must be >= 1, got {num_layers}")
    if num_gpus < 1:
        raise ValueError(f"num_gpus must be >= 1, got {num_gpus}")
