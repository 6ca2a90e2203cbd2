"""Write a tiny remote-code (``internvl_chat``) checkpoint: these files, random weights, the tiny tokenizer."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

HERE = Path(__file__).parent


def make_remote_checkpoint(out: Path, template: str = "internvl2_5") -> Path:
    import importlib.util
    import sys

    import torch
    from broker_worker.tiny_model import make_tokenizer

    out.mkdir(parents=True, exist_ok=True)
    for name in ("configuration_tiny_chat.py", "modeling_tiny_chat.py"):
        shutil.copy(HERE / name, out / name)
    package = "tiny_remote_code_build"
    spec = importlib.util.spec_from_file_location(package, HERE / "__init__.py", submodule_search_locations=[str(HERE)])
    assert spec is not None and spec.loader is not None
    sys.modules[package] = importlib.util.module_from_spec(spec)
    from importlib import import_module

    config_mod = import_module(f"{package}.configuration_tiny_chat")
    model_mod = import_module(f"{package}.modeling_tiny_chat")
    tokenizer = make_tokenizer()
    config = config_mod.InternVLChatConfig(
        vision_config={
            "hidden_size": 64,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "intermediate_size": 128,
            "image_size": [448, 448],
            "patch_size": [14, 14],
            "attention_bias": True,
        },
        llm_config={
            "vocab_size": len(tokenizer),
            "hidden_size": 64,
            "intermediate_size": 128,
            "num_hidden_layers": 3,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
            "max_position_embeddings": 8192,
            "tie_word_embeddings": False,
            "architectures": ["Qwen2ForCausalLM"],
        },
        template=template,
        architectures=["InternVLChatModel"],
        auto_map={
            "AutoConfig": "configuration_tiny_chat.InternVLChatConfig",
            "AutoModel": "modeling_tiny_chat.InternVLChatModel",
        },
    )
    torch.manual_seed(1)
    model_mod.InternVLChatModel(config).eval().save_pretrained(out)
    tokenizer.save_pretrained(out)
    data = json.loads((out / "config.json").read_text())
    assert data["model_type"] == "internvl_chat"
    return out
