"""A minimal ``internvl_chat`` remote-code config (written for these tests; the layout of InternVL's own)."""

from transformers import InternVLVisionConfig, PretrainedConfig, Qwen2Config


class InternVLChatConfig(PretrainedConfig):
    model_type = "internvl_chat"

    def __init__(
        self,
        vision_config=None,
        llm_config=None,
        template="internvl2_5",
        force_image_size=448,
        downsample_ratio=0.5,
        dynamic_image_size=True,
        use_thumbnail=True,
        ps_version="v2",
        **kwargs,
    ):
        super().__init__(**kwargs)
        self.vision_config = InternVLVisionConfig(**(vision_config or {}))
        self.llm_config = Qwen2Config(**(llm_config or {}))
        self.template = template
        self.force_image_size = force_image_size
        self.downsample_ratio = downsample_ratio
        self.dynamic_image_size = dynamic_image_size
        self.use_thumbnail = use_thumbnail
        self.ps_version = ps_version
        self.tie_word_embeddings = False

    def to_dict(self):
        output = super().to_dict()
        output["vision_config"] = self.vision_config.to_dict()
        output["llm_config"] = self.llm_config.to_dict()
        return output
