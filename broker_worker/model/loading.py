"""Load a local InternVL checkpoint: native ``-hf`` (``model_type: internvl``) or remote code (``internvl_chat``).

Refuses early, with the fix in the message, what cannot work: remote code whose LLM breaks on the installed
transformers (InternLM2, Phi3), quantization without CUDA, a directory that is not a checkpoint.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import KW_ONLY, dataclass
from pathlib import Path
from typing import Any, Literal

import torch

from broker_worker.model.device_map import DeviceMap, on_gpus, split_model
from broker_worker.model.prompt import CHATML, TEMPLATES, Template
from broker_worker.settings import Device, WorkerSettings

log = logging.getLogger("broker_worker.model.loading")

Format = Literal["native", "remote"]
_BROKEN_REMOTE_LLMS = {"InternLM2ForCausalLM": "InternLM2", "Phi3ForCausalLM": "Phi3"}


class CheckpointError(RuntimeError):
    """The checkpoint cannot be served here; the message says why and what to do."""


@dataclass(frozen=True)
class LoadOptions:
    model_path: Path
    _: KW_ONLY
    device: Device = "cpu"
    gpus: tuple[int, ...] | None = None
    load_8bit: bool = False
    load_4bit: bool = False
    vit_alpha: float = 0.5

    @classmethod
    def from_settings(cls, settings: WorkerSettings) -> LoadOptions:
        if settings.model_path is None:
            raise CheckpointError("no --model-path given (or --fake-engine for the fake model)")
        return cls(
            settings.model_path,
            device=settings.device,
            gpus=settings.gpu_list(),
            load_8bit=settings.load_8bit,
            load_4bit=settings.load_4bit,
            vit_alpha=settings.vit_alpha,
        )


@dataclass(kw_only=True)
class LoadedModel:
    model: Any
    tokenizer: Any
    format: Format
    template: Template
    image_size: int
    use_thumbnail: bool
    dynamic_image_size: bool
    tokens_per_tile: int
    context_len: int
    device: str


def read_config(path: Path) -> dict[str, Any]:
    config_file = path / "config.json"
    if not config_file.is_file():
        raise CheckpointError(f"{path} is not a checkpoint directory (no config.json); --model-path takes a local dir")
    data: dict[str, Any] = json.loads(config_file.read_text())
    return data


def detect_format(config: dict[str, Any]) -> Format:
    model_type = config.get("model_type")
    if model_type == "internvl":
        return "native"
    if model_type == "internvl_chat":
        return "remote"
    raise CheckpointError(f"model_type {model_type!r} is not InternVL (expected 'internvl' or 'internvl_chat')")


def num_llm_layers(config: dict[str, Any]) -> int:
    text = config.get("text_config") or config.get("llm_config") or {}
    return int(text["num_hidden_layers"])


def check_remote_llm(config: dict[str, Any], transformers_version: str) -> None:
    arch = ((config.get("llm_config") or {}).get("architectures") or ["?"])[0]
    family = _BROKEN_REMOTE_LLMS.get(arch)
    if family and int(transformers_version.split(".")[0]) >= 5:
        raise CheckpointError(
            f"this remote-code checkpoint uses a {family} LLM ({arch}), whose bundled code does not run on "
            f"transformers {transformers_version} (no GenerationMixin / removed modeling_attn_mask_utils). Fix: "
            "convert it to the native format with transformers' convert_internvl_weights_to_hf.py (InternLM2 "
            "models convert to Llama), or serve it from an environment with transformers<4.50."
        )


def device_map_for(opts: LoadOptions, config: dict[str, Any], fmt: Format) -> DeviceMap | str | None:
    if opts.device == "cpu":
        return None
    _require_cuda(opts.device)
    gpus = list(opts.gpus or range(torch.cuda.device_count()))
    if opts.device == "cuda" or len(gpus) == 1:
        return f"cuda:{gpus[0]}"
    arch = ((config.get("llm_config") or {}).get("architectures") or [""])[0]
    layout = split_model(
        num_llm_layers(config),
        len(gpus),
        opts.vit_alpha,
        remote_code=fmt == "remote",
        internlm2=arch == "InternLM2ForCausalLM",
    )
    return on_gpus(layout, gpus)


def quantization_config(opts: LoadOptions) -> Any:
    if not (opts.load_8bit or opts.load_4bit):
        return None
    if not torch.cuda.is_available():
        raise CheckpointError("--load-8bit/--load-4bit need a CUDA GPU (bitsandbytes); this machine has none")
    from transformers import BitsAndBytesConfig

    if opts.load_4bit:
        return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_compute_dtype=torch.bfloat16)
    return BitsAndBytesConfig(load_in_8bit=True)


def load(opts: LoadOptions) -> LoadedModel:
    import transformers

    started = time.perf_counter()
    config = read_config(opts.model_path)
    fmt = detect_format(config)
    if fmt == "remote":
        check_remote_llm(config, transformers.__version__)
    kwargs: dict[str, Any] = {"dtype": torch.float32 if opts.device == "cpu" else torch.bfloat16}
    device_map = device_map_for(opts, config, fmt)
    if device_map is not None:
        kwargs["device_map"] = device_map
    if (quant := quantization_config(opts)) is not None:
        kwargs["quantization_config"] = quant
    log.info("loading %s checkpoint %s (device=%s, %s)", fmt, opts.model_path, opts.device, _describe(device_map))
    loaded = _load_native(opts, kwargs) if fmt == "native" else _load_remote(opts, config, kwargs)
    log.info("loaded %s in %.2fs on %s", opts.model_path.name, time.perf_counter() - started, loaded.device)
    return loaded


def _load_native(opts: LoadOptions, kwargs: dict[str, Any]) -> LoadedModel:
    from transformers import AutoModelForImageTextToText, AutoTokenizer

    model = AutoModelForImageTextToText.from_pretrained(opts.model_path, **kwargs).eval()
    return native_loaded(model, AutoTokenizer.from_pretrained(opts.model_path))


def native_loaded(model: Any, tokenizer: Any) -> LoadedModel:
    """A transformers-native InternVL model as the serving code sees it, from its own config (also for a model
    built in memory: the demo model's training)."""
    cfg = model.config
    return LoadedModel(
        model=model,
        tokenizer=tokenizer,
        format="native",
        template=CHATML,
        image_size=_side(cfg.vision_config.image_size),
        use_thumbnail=True,
        dynamic_image_size=True,
        tokens_per_tile=int(cfg.image_seq_length),
        context_len=_context_len(cfg.text_config),
        device=str(model.device),
    )


def _load_remote(opts: LoadOptions, config: dict[str, Any], kwargs: dict[str, Any]) -> LoadedModel:
    from transformers import AutoModel, AutoTokenizer

    model = AutoModel.from_pretrained(opts.model_path, trust_remote_code=True, **kwargs).eval()
    tokenizer = AutoTokenizer.from_pretrained(opts.model_path, trust_remote_code=True, use_fast=False)
    # Same value for every request, so setting it once at load is not InternVL's model worker's per-request race.
    model.img_context_token_id = tokenizer.convert_tokens_to_ids("<IMG_CONTEXT>")
    template = TEMPLATES.get(config.get("template", ""), TEMPLATES["internvl2_5"])
    vision = config.get("vision_config") or {}
    image_size = _side(config.get("force_image_size") or vision.get("image_size") or 448)
    patch = _side(vision.get("patch_size") or 14)
    tokens = int((image_size // patch) ** 2 * float(config.get("downsample_ratio", 0.5)) ** 2)
    return LoadedModel(
        model=model,
        tokenizer=tokenizer,
        format="remote",
        template=template,
        image_size=image_size,
        use_thumbnail=bool(config.get("use_thumbnail", True)),
        dynamic_image_size=bool(config.get("dynamic_image_size", True)),
        tokens_per_tile=tokens,
        context_len=_context_len(model.language_model.config),
        device=str(model.device),
    )


def _side(value: Any) -> int:
    """Sizes are an int in InternVL configs and [height, width] in transformers' vision configs."""
    return int(value[0] if isinstance(value, list | tuple) else value)


def _context_len(text_config: Any) -> int:
    return int(getattr(text_config, "max_position_embeddings", 8192) or 8192)


def _require_cuda(device: str) -> None:
    if not torch.cuda.is_available():
        raise CheckpointError(f"--device {device} needs CUDA, and torch sees no GPU here; use --device cpu")


def _describe(device_map: DeviceMap | str | None) -> str:
    if isinstance(device_map, dict):
        return f"device map over GPUs {sorted(set(device_map.values()))}"
    return f"device {device_map or 'cpu'}"
