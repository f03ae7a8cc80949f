"""load(), LoRA presets, freezing policy and adapter directories."""

from __future__ import annotations

import re

import pytest
import torch
from peft import PeftModel
from transformers import Phi3Config, Phi3ForCausalLM

from vlmtune.config import FreezeConfig, LoraConfig
from vlmtune.models.loading import (
    apply_freeze,
    apply_lora,
    load,
    lora_target_pattern,
    trainable_parameter_summary,
)

VISION = "model.vision_embed_tokens.img_processor."
PROMPT = "<|user|>\n<|image_1|>\nWhat is it?<|end|>\n<|assistant|>\nA coat<|end|>"


def test_tiny_is_deterministic_and_seeded():
    a, _ = load("tiny-phi3v")
    b, _ = load("tiny-phi3v")
    c, _ = load("tiny-phi3v", seed=1)
    state_a, state_b, state_c = a.state_dict(), b.state_dict(), c.state_dict()
    assert all(torch.equal(state_a[k], state_b[k]) for k in state_a)
    assert not torch.equal(state_a["lm_head.weight"], state_c["lm_head.weight"])
    torch.manual_seed(123)
    expected = torch.rand(1)
    torch.manual_seed(123)
    load("tiny-phi3v")
    assert torch.equal(torch.rand(1), expected)  # the global RNG is left alone


def test_num_crops_override():
    _, processor = load("tiny-phi3v", num_crops=2)
    assert processor.image_processor.num_crops == 2


def _lora_modules(model: PeftModel) -> list[str]:
    return [n.removeprefix("base_model.model.") for n, m in model.named_modules() if hasattr(m, "lora_A")]


def test_language_presets_never_touch_clip(tiny):
    model, _ = tiny
    peft_model = apply_lora(model, LoraConfig(targets=["language_attention", "language_mlp"]))
    names = _lora_modules(peft_model)
    assert len(names) == 2 * 4  # 2 layers x (qkv_proj, o_proj, gate_up_proj, down_proj)
    assert all(re.fullmatch(r"model\.layers\.\d\.(self_attn\.(qkv|o)_proj|mlp\.(gate_up|down)_proj)", n) for n in names)


def test_vision_presets_never_touch_text_and_skip_unused_layers(tiny):
    model, _ = tiny
    peft_model = apply_lora(model, LoraConfig(targets=["vision_tower", "projector"]))
    names = _lora_modules(peft_model)
    # the tiny tower has 2 layers and uses layer 0 only (feature layer -2): q, k, v, out, fc1, fc2
    vision = [n for n in names if n.startswith(VISION)]
    assert len(vision) == 6 and all(".encoder.layers.0." in n for n in vision)
    assert sorted(set(names) - set(vision)) == [
        "model.vision_embed_tokens.img_projection.0",
        "model.vision_embed_tokens.img_projection.2",
    ]


def test_lm_head_and_extra_targets(tiny):
    model, _ = tiny
    peft_model = apply_lora(model, LoraConfig(targets=["lm_head"], extra_target_modules=["layers.1.mlp.down_proj"]))
    assert sorted(_lora_modules(peft_model)) == ["lm_head", "model.layers.1.mlp.down_proj"]


def test_unmatched_targets_raise(tiny):
    model, _ = tiny
    with pytest.raises(ValueError, match="'no_such_proj'"):
        lora_target_pattern(model, ["language_attention"], ["no_such_proj"])
    with pytest.raises(ValueError, match="unknown LoRA target preset 'vision'"):
        lora_target_pattern(model, ["vision"])
    config = Phi3Config(hidden_size=32, num_attention_heads=2, num_hidden_layers=1, vocab_size=50, pad_token_id=0)
    text_only = Phi3ForCausalLM(config)
    with pytest.raises(ValueError, match="'projector' matches no linear layer"):
        lora_target_pattern(text_only, ["language_attention", "projector"])


def test_gradients_reach_lora_and_nothing_frozen(tiny, make_image):
    model, processor = tiny
    peft_model = apply_lora(
        model, LoraConfig(r=4, alpha=8, dropout=0.0, targets=["language_attention", "vision_tower"])
    )
    peft_model.train()
    batch = processor(PROMPT, [make_image(100, 150)])
    labels = batch["input_ids"].masked_fill(batch["input_ids"] == processor.image_token_id, -100)
    peft_model(**batch, labels=labels).loss.backward()
    for name, param in peft_model.named_parameters():
        if "lora_" in name:
            assert param.requires_grad and param.grad is not None, name
            if "lora_B" in name:  # B starts at zero, so A's gradient is zero at step 0; B's is not
                assert param.grad.abs().sum() > 0, name
        else:
            assert not param.requires_grad and param.grad is None, name
    summary = trainable_parameter_summary(peft_model)
    assert summary["lora"]["trainable"] == summary["all"]["trainable"] > 0


def test_freeze_vision_tower_keeps_text_embedding_trainable(tiny, make_image):
    model, processor = tiny
    apply_freeze(model, FreezeConfig(vision_tower=True, projector=False, embeddings=False))
    groups = {n: p.requires_grad for n, p in model.named_parameters()}
    assert groups["model.embed_tokens.weight"] and groups["lm_head.weight"]
    assert groups["model.vision_embed_tokens.img_projection.0.weight"] and groups["model.vision_embed_tokens.sub_GN"]
    assert not any(trainable for n, trainable in groups.items() if n.startswith(VISION))
    model.train()
    batch = processor(PROMPT, [make_image(100, 150)])
    labels = batch["input_ids"].masked_fill(batch["input_ids"] == processor.image_token_id, -100)
    model(**batch, labels=labels).loss.backward()
    assert model.model.embed_tokens.weight.grad is not None
    assert model.model.vision_embed_tokens.glb_GN.grad is not None
    summary = trainable_parameter_summary(model)
    assert summary["vision_tower"]["trainable"] == 0 and summary["embeddings"]["trainable"] > 0


def test_freeze_policy_groups_and_unused_clip_tail(tiny, make_image):
    model, processor = tiny
    apply_freeze(model, FreezeConfig(vision_tower=False, projector=True, embeddings=True))
    summary = trainable_parameter_summary(model)
    assert summary["projector"]["trainable"] == 0 and summary["embeddings"]["trainable"] == 0
    assert 0 < summary["vision_tower"]["trainable"] < summary["vision_tower"]["total"]
    # exactly the parameters that get a gradient are trainable: the CLIP layers past the feature layer
    # and post_layernorm never run, so they are frozen (DDP / DeepSpeed would wait for their gradients)
    model.train()
    batch = processor(PROMPT, [make_image(100, 150)])
    labels = batch["input_ids"].masked_fill(batch["input_ids"] == processor.image_token_id, -100)
    model(**batch, labels=labels).loss.backward()
    for name, param in model.named_parameters():
        assert param.requires_grad == (param.grad is not None), name


def test_adapter_directory_loads_base_and_adapter(tiny, make_image, tmp_path):
    model, processor = tiny
    peft_model = apply_lora(model, LoraConfig(targets=["language_attention", "projector"]))
    with torch.no_grad():  # make the adapter matter (B starts at zero)
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:
                param.normal_(std=0.1, generator=torch.Generator().manual_seed(0))
    peft_model.save_pretrained(tmp_path)
    processor.save_pretrained(tmp_path)
    loaded, loaded_processor = load(tmp_path)
    assert isinstance(loaded, PeftModel)
    batch = loaded_processor(PROMPT, [make_image(100, 150)])
    base, _ = load("tiny-phi3v")
    with torch.no_grad():
        expected = peft_model.eval()(**batch).logits
        torch.testing.assert_close(loaded(**batch).logits, expected, rtol=0, atol=1e-6)
        assert not torch.allclose(base(**batch).logits, expected, atol=1e-3)
