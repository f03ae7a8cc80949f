"""Phi3VConfig against the two published config.json files."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from huggingface_hub.errors import StrictDataclassClassValidationError
from transformers import AutoConfig, Phi3Config

from vlmtune.models.phi3v import Phi3VConfig
from vlmtune.models.phi3v.presets import OFFICIAL_CONFIGS, OFFICIAL_PREPROCESSORS

DATA = Path(__file__).parent / "data"
# Keys transformers itself manages: the load path, the writing version, and the runtime attention choice.
RUNTIME_KEYS = {"_name_or_path", "transformers_version", "_attn_implementation"}


def test_presets_match_official_files(official_configs):
    assert official_configs == OFFICIAL_CONFIGS
    for stem, name in [
        ("phi3_vision_128k_instruct", "microsoft/Phi-3-vision-128k-instruct"),
        ("phi35_vision_instruct", "microsoft/Phi-3.5-vision-instruct"),
    ]:
        assert json.loads((DATA / f"{stem}.preprocessor_config.json").read_text()) == OFFICIAL_PREPROCESSORS[name]
    for config in official_configs.values():
        for key in ("short_factor", "long_factor"):
            assert len(config["rope_scaling"][key]) == 48  # head_dim 96 / 2


@pytest.mark.parametrize("name", sorted(OFFICIAL_CONFIGS))
def test_official_config_parses(official_configs, name):
    raw = official_configs[name]
    config = Phi3VConfig.from_dict(json.loads(json.dumps(raw)))
    rope = config.rope_parameters
    assert rope["rope_type"] == "longrope"
    assert rope["short_factor"] == raw["rope_scaling"]["short_factor"]
    assert rope["long_factor"] == raw["rope_scaling"]["long_factor"]
    assert rope["original_max_position_embeddings"] == 4096
    assert rope["rope_theta"] == 10000.0
    assert config.sliding_window == raw["sliding_window"]
    assert config.pad_token_id == 32000  # absent from the Phi-3-vision file: the official default
    # CLIP ViT-L/14-336 as hard-coded by the official code, feature layer -2, 12x12 merged tokens per crop
    vision = config.vision_config
    assert (vision.hidden_size, vision.num_hidden_layers, vision.num_attention_heads) == (1024, 24, 16)
    assert (vision.intermediate_size, vision.image_size, vision.patch_size) == (4096, 336, 14)
    assert (vision.hidden_act, vision.layer_norm_eps) == ("quick_gelu", 1e-5)
    assert config.vision_feature_layer == -2 and config.tokens_per_side == 12
    assert config.image_token_id == 32044
    # flash-attn is not installed here: the file's flash_attention_2 wish must not stick
    assert config._attn_implementation is None


@pytest.mark.parametrize("name", sorted(OFFICIAL_CONFIGS))
def test_official_config_round_trip_keeps_every_field(official_configs, name, tmp_path):
    raw = official_configs[name]
    config = Phi3VConfig.from_dict(json.loads(json.dumps(raw)))
    config.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    for key, value in raw.items():
        if key not in RUNTIME_KEYS:
            assert saved[key] == value, key
    assert saved["rope_scaling"]["type"] == "su" and "rope_parameters" not in saved
    reloaded = Phi3VConfig.from_pretrained(tmp_path)
    assert reloaded.to_dict() | {"_name_or_path": ""} == config.to_dict() | {"_name_or_path": ""}
    assert AutoConfig.from_pretrained(tmp_path).__class__ is Phi3VConfig


def test_su_rope_with_top_level_original_max_position():
    """transformers' own Phi3Config fails on this form (KeyError); Phi3VConfig must not."""
    text = {"hidden_size": 64, "num_attention_heads": 2, "max_position_embeddings": 1024}
    rope = {"type": "su", "short_factor": [1.0] * 16, "long_factor": [2.0] * 16}
    with pytest.raises(KeyError, match="original_max_position_embeddings"):
        Phi3Config(**text, rope_scaling=dict(rope), original_max_position_embeddings=64)
    config = Phi3VConfig(**text, rope_scaling=dict(rope), original_max_position_embeddings=64)
    assert config.rope_parameters["original_max_position_embeddings"] == 64
    assert config.rope_parameters["rope_type"] == "longrope"
    config = Phi3VConfig.from_dict({**text, "rope_scaling": dict(rope), "original_max_position_embeddings": 64})
    assert config.rope_parameters["original_max_position_embeddings"] == 64


def test_caller_attention_choice_wins(official_configs):
    raw = official_configs["microsoft/Phi-3.5-vision-instruct"]
    config = Phi3VConfig.from_dict(json.loads(json.dumps(raw)), attn_implementation="eager")
    assert config._attn_implementation == "eager"
    assert config.vision_config._attn_implementation == "eager"
    config = Phi3VConfig.from_dict({**raw, "_attn_implementation": "sdpa"})
    assert config._attn_implementation == "sdpa"


def test_unsupported_layouts_are_rejected():
    with pytest.raises(NotImplementedError, match="hd_transform_order"):
        Phi3VConfig(embd_layer={"hd_transform_order": "glb_sub"})
    with pytest.raises(NotImplementedError, match="type_feature"):
        Phi3VConfig(img_processor={"image_dim_out": 1024, "num_img_tokens": 144, "type_feature": "cls_patch"})
    with pytest.raises(StrictDataclassClassValidationError, match="image_dim_out"):
        Phi3VConfig(img_processor={"image_dim_out": 768, "num_img_tokens": 144})
    with pytest.raises(ValueError, match="not supported"):
        Phi3VConfig(rope_scaling={"type": "yarn", "short_factor": [1.0] * 48, "long_factor": [1.0] * 48})


def test_feature_layer_comes_from_img_processor():
    config = Phi3VConfig(img_processor={"image_dim_out": 1024, "num_img_tokens": 144, "layer_idx": -1})
    assert config.vision_feature_layer == -1
