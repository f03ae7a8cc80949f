"""Phi-3-Vision configuration: transformers' `Phi3Config` plus the image path.

The official `config.json` files were written for remote code on transformers 4.38. They carry
`rope_scaling = {"type": "su", ...}`, `embd_layer`, `img_processor`, `auto_map` and
`_attn_implementation = "flash_attention_2"`, and they hard-code the CLIP tower in Python instead of
describing it. `Phi3VConfig` reads those files unchanged, writes them back in the same layout (so a
fine-tuned checkpoint still opens with the official code), and turns what the official code hard-coded
(the CLIP tower's shape, the feature layer, the image token id) into configuration.
"""

from __future__ import annotations

from typing import Any, ClassVar

from huggingface_hub.dataclasses import strict
from transformers import CLIPVisionConfig, Phi3Config, PreTrainedConfig
from transformers.configuration_utils import SubConfigSpec
from transformers.utils import is_flash_attn_2_available

# The tower the official code builds regardless of config.json (`CLIP_VIT_LARGE_PATCH14_336_CONFIG`).
CLIP_VIT_L14_336: dict[str, Any] = {
    "hidden_size": 1024,
    "intermediate_size": 4096,
    "num_hidden_layers": 24,
    "num_attention_heads": 16,
    "image_size": 336,
    "patch_size": 14,
    "hidden_act": "quick_gelu",
    "layer_norm_eps": 1e-5,
    "attention_dropout": 0.0,
    "projection_dim": 768,
}

# The only image-embedding layout the official checkpoints use (and the only one implemented here).
OFFICIAL_EMBD_LAYER: dict[str, Any] = {
    "embedding_cls": "image",
    "hd_transform_order": "sub_glb",
    "projection_cls": "mlp",
    "use_hd_transform": True,
    "with_learnable_separator": True,
}

CLIP_MODEL_NAME = "openai/clip-vit-large-patch14-336"


@strict
class Phi3VConfig(Phi3Config):
    """Configuration of `Phi3VForCausalLM`.

    Text fields are `Phi3Config`'s. Image fields:

    - `vision_config`: the CLIP tower (`CLIPVisionConfig`, default ViT-L/14 at 336 px, as the official code);
      the tile size of the HD transform is its `image_size`.
    - `img_processor`: the official dict (`image_dim_out`, `num_img_tokens`, optional `layer_idx` = feature
      layer, default -2, and `type_feature`, only "patch" = CLS dropped). Derived from `vision_config` when
      absent.
    - `embd_layer`: the official dict; only the published layout (HD transform, learnable separators,
      `sub_glb` order, 2-layer GELU MLP projector) is supported.
    - `image_token_id`: the id that marks image slots in `input_ids` (official processors write negative ids,
      which the model accepts too).
    """

    model_type = "phi3_v"
    sub_configs_defaults: ClassVar[dict[str, SubConfigSpec]] = {
        "vision_config": SubConfigSpec(config_class=CLIPVisionConfig, init_kwargs=CLIP_VIT_L14_336),
    }

    vision_config: dict | PreTrainedConfig | None = None
    img_processor: dict | None = None
    embd_layer: dict | None = None
    image_token_id: int = 32044

    def __post_init__(self, **kwargs):
        # The official files ask for flash_attention_2. Keep that wish only when nobody chose an
        # implementation and flash-attn is importable, so loading never fails on a machine without it.
        wish = kwargs.pop("_attn_implementation", None)
        usable = wish != "flash_attention_2" or is_flash_attn_2_available()
        if wish is not None and usable and kwargs.get("attn_implementation") is None:
            kwargs["attn_implementation"] = wish
        # The official files (and ours, for them) say `torch_dtype`; transformers 5 warns on that name.
        legacy_dtype = kwargs.pop("torch_dtype", None)
        super().__post_init__(**kwargs)
        if legacy_dtype is not None and self.dtype is None:
            self.dtype = legacy_dtype
        if self.embd_layer is None:
            self.embd_layer = dict(OFFICIAL_EMBD_LAYER)
        if self.img_processor is None:
            self.img_processor = {
                "image_dim_out": self.vision_config.hidden_size,
                "model_name": CLIP_MODEL_NAME,
                "name": "clip_vision_model",
                "num_img_tokens": self.tokens_per_side**2,
            }

    def convert_rope_params_to_dict(self, **kwargs) -> dict[str, Any]:
        """Accept the official `rope_scaling = {"type": "su", ...}` (LongRoPE under its old name).

        `Phi3Config` renames "su" only after standardising, so the top-level
        `original_max_position_embeddings` never reaches the rope dict and validation fails with a KeyError;
        renaming first avoids that.
        """
        rope_scaling = kwargs.pop("rope_scaling", None)
        if rope_scaling is not None:
            rope_scaling = dict(rope_scaling)
            rope_type = rope_scaling.pop("type", None) or rope_scaling.get("rope_type", "default")
            if rope_type not in ("su", "longrope", "default"):
                raise ValueError(f"rope_scaling type {rope_type!r} is not supported; expected 'su' (LongRoPE)")
            rope_scaling["rope_type"] = "longrope" if rope_type == "su" else rope_type
            kwargs["rope_scaling"] = rope_scaling
        kwargs = super().convert_rope_params_to_dict(**kwargs)
        rope = self.rope_parameters
        if rope.get("rope_type") == "longrope" and rope.get("factor") is None:
            # The value transformers derives anyway from the two lengths; stating it avoids its warning.
            rope["factor"] = self.max_position_embeddings / rope["original_max_position_embeddings"]
        return kwargs

    def validate_image_path(self) -> None:
        """Reject layouts the model does not implement instead of silently computing something else."""
        unsupported = {k: v for k, v in OFFICIAL_EMBD_LAYER.items() if self.embd_layer.get(k, v) != v}
        if unsupported:
            raise NotImplementedError(f"embd_layer {unsupported} is not supported (only {OFFICIAL_EMBD_LAYER})")
        if self.img_processor.get("type_feature", "patch") != "patch":
            raise NotImplementedError("img_processor.type_feature must be 'patch' (CLS token dropped)")
        if self.img_processor["image_dim_out"] != self.vision_config.hidden_size:
            raise ValueError(
                f"img_processor.image_dim_out={self.img_processor['image_dim_out']} does not match "
                f"vision_config.hidden_size={self.vision_config.hidden_size}"
            )
        if self.img_processor["num_img_tokens"] != self.tokens_per_side**2:
            raise ValueError(
                f"img_processor.num_img_tokens={self.img_processor['num_img_tokens']} does not match the "
                f"vision tower ({self.tokens_per_side}x{self.tokens_per_side} merged tokens per crop)"
            )
        patches = self.vision_config.image_size // self.vision_config.patch_size
        if patches % 2:
            raise ValueError(f"{patches}x{patches} patches per crop cannot be merged 2x2")

    @property
    def vision_feature_layer(self) -> int:
        """Index into CLIP's hidden states (0 = embeddings); -2 = output of the penultimate layer."""
        return self.img_processor.get("layer_idx", -2)

    @property
    def tokens_per_side(self) -> int:
        """Side of a crop's token grid after the 2x2 merge (12 for 336-px tiles and 14-px patches)."""
        return self.vision_config.image_size // self.vision_config.patch_size // 2

    def to_dict(self) -> dict[str, Any]:
        """Serialise in the official layout: `rope_scaling` {type: su, ...} and top-level `rope_theta`.

        transformers 5 would write `rope_parameters`, which the official remote code does not read.
        """
        out = super().to_dict()
        rope = dict(out.pop("rope_parameters", None) or {})
        out["rope_theta"] = rope.pop("rope_theta", self.default_theta)
        rope.pop("original_max_position_embeddings", None)
        rope.pop("factor", None)  # derived from the two lengths; the official code accepts only type + factors
        partial = rope.pop("partial_rotary_factor", 1.0)
        if partial != 1.0:
            out["partial_rotary_factor"] = partial
        rope_type = rope.pop("rope_type", "default")
        out["rope_scaling"] = None if rope_type == "default" else {"type": "su", **rope}
        return out

    def to_diff_dict(self) -> dict[str, Any]:
        """What `save_pretrained` writes: adds the official `torch_dtype` name next to `dtype` (here, not in
        `to_dict`, because transformers reads every `to_dict` key back as an attribute and warns on that one)."""
        out = super().to_diff_dict()
        if out.get("dtype") is not None:
            out["torch_dtype"] = out["dtype"]
        return out
