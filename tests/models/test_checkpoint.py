"""State-dict layout: exactly the official safetensors keys, for loading and for saving.

The expected keys and shapes are written out here from the official module tree, not taken
from the model code, then compared with what the model loads, holds and saves.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

from vlmtune.models.loading import load
from vlmtune.models.phi3v import Phi3VForCausalLM

DATA = Path(__file__).parent / "data"

REAL = {"hidden": 3072, "inter": 8192, "layers": 32, "vocab": 32064, "clip": 1024, "clip_inter": 4096}
REAL |= {"clip_layers": 24, "image": 336, "patch": 14}
TINY = {"hidden": 64, "inter": 128, "layers": 2, "vocab": 265, "clip": 32, "clip_inter": 64}
TINY |= {"clip_layers": 2, "image": 56, "patch": 14}


def official_keys(hidden, inter, layers, vocab, clip, clip_inter, clip_layers, image, patch) -> dict[str, tuple]:
    """Key → shape of an official Phi-3-Vision checkpoint with these sizes (MHA: kv heads = heads)."""
    keys: dict[str, tuple] = {"model.embed_tokens.weight": (vocab, hidden)}
    for i in range(layers):
        p = f"model.layers.{i}."
        keys[p + "self_attn.qkv_proj.weight"] = (3 * hidden, hidden)
        keys[p + "self_attn.o_proj.weight"] = (hidden, hidden)
        keys[p + "mlp.gate_up_proj.weight"] = (2 * inter, hidden)
        keys[p + "mlp.down_proj.weight"] = (hidden, inter)
        keys[p + "input_layernorm.weight"] = (hidden,)
        keys[p + "post_attention_layernorm.weight"] = (hidden,)
    keys["model.norm.weight"] = (hidden,)
    keys["lm_head.weight"] = (vocab, hidden)
    v = "model.vision_embed_tokens."
    keys[v + "glb_GN"] = (1, 1, 4 * clip)
    keys[v + "sub_GN"] = (1, 1, 1, 4 * clip)
    keys[v + "img_projection.0.weight"] = (hidden, 4 * clip)
    keys[v + "img_projection.0.bias"] = (hidden,)
    keys[v + "img_projection.2.weight"] = (hidden, hidden)
    keys[v + "img_projection.2.bias"] = (hidden,)
    c = v + "img_processor.vision_model."
    keys[c + "embeddings.class_embedding"] = (clip,)
    keys[c + "embeddings.patch_embedding.weight"] = (clip, 3, patch, patch)
    keys[c + "embeddings.position_embedding.weight"] = ((image // patch) ** 2 + 1, clip)
    for norm in ("pre_layrnorm", "post_layernorm"):
        keys[c + norm + ".weight"] = keys[c + norm + ".bias"] = (clip,)
    for j in range(clip_layers):
        p = c + f"encoder.layers.{j}."
        for proj in ("q_proj", "k_proj", "v_proj", "out_proj"):
            keys[p + f"self_attn.{proj}.weight"] = (clip, clip)
            keys[p + f"self_attn.{proj}.bias"] = (clip,)
        for norm in ("layer_norm1", "layer_norm2"):
            keys[p + norm + ".weight"] = keys[p + norm + ".bias"] = (clip,)
        keys[p + "mlp.fc1.weight"], keys[p + "mlp.fc1.bias"] = (clip_inter, clip), (clip_inter,)
        keys[p + "mlp.fc2.weight"], keys[p + "mlp.fc2.bias"] = (clip, clip_inter), (clip,)
    return keys


def test_key_list_reproduces_the_published_parameter_count():
    assert sum(math.prod(s) for s in official_keys(**REAL).values()) == 4_146_621_440


def tiny_official_config() -> dict:
    """The published Phi-3.5-vision config.json with the sizes shrunk to the tiny model."""
    config = json.loads((DATA / "phi35_vision_instruct.config.json").read_text())
    config.update(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
        vocab_size=265,
        pad_token_id=259,
        max_position_embeddings=4096,
        original_max_position_embeddings=64,
        torch_dtype="float32",
    )
    config["rope_scaling"] = {"long_factor": [2.0] * 16, "short_factor": [1.0] * 16, "type": "su"}
    config["img_processor"] = {**config["img_processor"], "image_dim_out": 32, "num_img_tokens": 4}
    # the official files do not describe the (hard-coded) CLIP tower; a smaller one must be described
    config["vision_config"] = {
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 2,
        "image_size": 56,
        "patch_size": 14,
    }
    return config


@pytest.fixture
def official_checkpoint(tmp_path) -> tuple[Path, dict[str, torch.Tensor]]:
    generator = torch.Generator().manual_seed(0)
    tensors = {k: torch.randn(s, generator=generator) for k, s in official_keys(**TINY).items()}
    directory = tmp_path / "official"
    directory.mkdir()
    save_file(tensors, directory / "model.safetensors", metadata={"format": "pt"})
    (directory / "config.json").write_text(json.dumps(tiny_official_config()))
    return directory, tensors


def assert_same_tensors(model: torch.nn.Module, tensors: dict[str, torch.Tensor]) -> None:
    state = model.state_dict()
    assert set(state) == set(tensors)
    for key, value in tensors.items():
        assert torch.equal(state[key], value), key


def test_official_layout_loads_strictly_and_saves_unchanged(official_checkpoint, tmp_path):
    directory, tensors = official_checkpoint
    model, info = Phi3VForCausalLM.from_pretrained(directory, output_loading_info=True)
    assert info["missing_keys"] == set() and info["unexpected_keys"] == set()
    assert info["mismatched_keys"] == set() and not info["error_msgs"]
    assert_same_tensors(model, tensors)  # the module tree itself carries the official names
    model.save_pretrained(tmp_path / "saved")
    saved = load_file(tmp_path / "saved" / "model.safetensors")
    assert {k: tuple(v.shape) for k, v in saved.items()} == official_keys(**TINY)
    assert all(torch.equal(saved[k], tensors[k]) for k in tensors)
    again = Phi3VForCausalLM.from_pretrained(tmp_path / "saved")
    assert_same_tensors(again, tensors)


def test_shared_embedding_copy_is_ignored(official_checkpoint):
    directory, tensors = official_checkpoint
    with_wte = {**tensors, "model.vision_embed_tokens.wte.weight": tensors["model.embed_tokens.weight"].clone()}
    save_file(with_wte, directory / "model.safetensors", metadata={"format": "pt"})
    model, info = Phi3VForCausalLM.from_pretrained(directory, output_loading_info=True)
    assert info["missing_keys"] == set() and info["unexpected_keys"] == set()
    assert_same_tensors(model, tensors)
    assert not model.config.tie_word_embeddings
    assert model.lm_head.weight.data_ptr() != model.model.embed_tokens.weight.data_ptr()


def test_auto_class_loads_official_config_without_remote_code(official_checkpoint):
    directory, _ = official_checkpoint
    model = AutoModelForCausalLM.from_pretrained(directory)  # config has auto_map and flash_attention_2
    assert isinstance(model, Phi3VForCausalLM)
    assert model.config._attn_implementation == "sdpa"  # flash-attn is not installed
    assert model.config.vision_config._attn_implementation == "sdpa"


@pytest.mark.parametrize("name", ["microsoft/Phi-3-vision-128k-instruct", "microsoft/Phi-3.5-vision-instruct"])
def test_real_size_architecture_on_meta(name):
    model, processor = load(name, random_init=True, device="meta", dtype=torch.bfloat16)
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert shapes == official_keys(**REAL)
    assert sum(p.numel() for p in model.parameters()) == 4_146_621_440
    assert model.config.image_token_id == processor.image_token_id == 32044
    num_crops, tokens = (16, 2509) if "Phi-3-vision" in name else (4, 757)  # preprocessor defaults
    assert processor.image_processor.num_crops == num_crops
    assert processor.image_processor.calc_num_image_tokens_from_image_size(1000, 1000) == tokens


def test_vlmtune_directory_round_trip(tiny, make_image, tmp_path):
    model, processor = tiny
    model.save_pretrained(tmp_path)
    processor.save_pretrained(tmp_path)
    again, again_processor = load(tmp_path)
    assert_same_tensors(again, model.state_dict())
    batch = processor("<|image_1|>\nWhat?", [make_image(90, 70)])
    batch2 = again_processor("<|image_1|>\nWhat?", [make_image(90, 70)])
    assert all(torch.equal(batch[k], batch2[k]) for k in batch)
    with torch.no_grad():
        torch.testing.assert_close(again(**batch2).logits, model(**batch).logits, rtol=0, atol=0)
