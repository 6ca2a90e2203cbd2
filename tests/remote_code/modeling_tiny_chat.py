"""A minimal ``InternVLChatModel``: vision_model + mlp1 (pixel-shuffle projector) + language_model, and the
remote-code ``generate(pixel_values, input_ids, attention_mask, ...)`` contract (image rows of the text
embeddings replaced by vision features; only new tokens returned). Written for these tests."""

import torch
from torch import nn
from transformers import InternVLVisionModel, PreTrainedModel, Qwen2ForCausalLM

from .configuration_tiny_chat import InternVLChatConfig


class InternVLChatModel(PreTrainedModel):
    config_class = InternVLChatConfig
    main_input_name = "pixel_values"
    _no_split_modules = ["InternVLVisionLayer", "Qwen2DecoderLayer"]

    def __init__(self, config):
        super().__init__(config)
        width = config.vision_config.hidden_size * 4
        self.vision_model = InternVLVisionModel(config.vision_config)
        self.mlp1 = nn.Sequential(
            nn.LayerNorm(width),
            nn.Linear(width, config.llm_config.hidden_size),
            nn.GELU(),
            nn.Linear(config.llm_config.hidden_size, config.llm_config.hidden_size),
        )
        self.language_model = Qwen2ForCausalLM(config.llm_config)
        self.img_context_token_id = None
        self.post_init()

    def extract_feature(self, pixel_values):
        hidden = self.vision_model(pixel_values=pixel_values).last_hidden_state[:, 1:]
        n, length, channels = hidden.shape
        side = int(length**0.5)
        hidden = hidden.reshape(n, side, side // 2, channels * 2).permute(0, 2, 1, 3)
        hidden = hidden.reshape(n, side // 2, side // 2, channels * 4).permute(0, 2, 1, 3)
        return self.mlp1(hidden.reshape(n, -1, channels * 4))

    @torch.no_grad()
    def generate(self, pixel_values=None, input_ids=None, attention_mask=None, **generate_kwargs):
        assert self.img_context_token_id is not None
        embeds = self.language_model.get_input_embeddings()(input_ids)
        if pixel_values is not None:
            features = self.extract_feature(pixel_values.to(self.dtype))
            mask = input_ids == self.img_context_token_id
            embeds[mask] = features.reshape(-1, features.shape[-1]).to(embeds.dtype)
        return self.language_model.generate(inputs_embeds=embeds, attention_mask=attention_mask, **generate_kwargs)
