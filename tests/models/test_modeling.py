"""Phi3VForCausalLM on the tiny model: image features, generation, loss, attention, checkpointing."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from transformers import Phi3Config, Phi3ForCausalLM

from vlmtune.models.loading import load

PROMPT = "<|user|>\n<|image_1|>\nWhat is shown in this image?<|end|>\n<|assistant|>\n"


def _features(model, batch) -> torch.Tensor:
    with torch.no_grad():
        return model.model.vision_embed_tokens(batch["pixel_values"], batch["image_sizes"])


@pytest.mark.parametrize(("width", "height"), [(60, 60), (400, 10), (10, 400), (5, 5), (130, 90), (56, 56)])
def test_image_tokens_equal_feature_rows(tiny, make_image, width, height):
    model, processor = tiny
    out = processor.image_processor(make_image(width, height))
    h, w = out["image_sizes"][0].tolist()
    rows, cols, side = h // 56, w // 56, 2  # 56-px tiles of 4x4 patches -> 2x2 merged tokens
    expected = (rows * cols + 1) * side * side + 1 + (rows + 1) * side
    assert out["num_img_tokens"] == [expected]
    assert _features(model, out).shape == (expected, model.config.hidden_size)


class CropIdTower(nn.Module):
    """Stands in for CLIP: crop k (pixel [0, 0, 0] == k) gets the fixed features table[k], CLS first."""

    def __init__(self, table: torch.Tensor) -> None:
        super().__init__()
        self.table = table
        self.seen: list[int] = []

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        ids = pixel_values[:, 0, 0, 0].round().long()
        self.seen += ids.tolist()
        cls = torch.full((len(ids), 1, self.table.shape[-1]), float("nan"))  # must be dropped
        return torch.cat([cls, self.table[ids]], dim=1)


def reference_tokens(features, sizes, glb, sub, tile, side):
    """The official hd_feature_transform, token by token: features [n, 1 + crops, (2 side)^2, C] → [sum N, 4C]."""
    g = 2 * side

    def merged(crop: torch.Tensor, r: int, c: int) -> torch.Tensor:
        return torch.cat([crop[(2 * r + dr) * g + (2 * c + dc)] for dr in (0, 1) for dc in (0, 1)])

    out = []
    for i, (h, w) in enumerate(sizes):
        rows, cols = h // tile, w // tile
        for r in range(rows * side):
            for c in range(cols * side):
                crop = features[i, 1 + (r // side) * cols + c // side]
                out.append(merged(crop, r % side, c % side))
            out.append(sub)
        out.append(glb)
        for r in range(side):
            for c in range(side):
                out.append(merged(features[i, 0], r, c))
            out.append(sub)
    return torch.stack(out)


def test_embedding_assembly_matches_reference():
    model, _ = load("tiny-phi3v")
    embedding = model.model.vision_embed_tokens
    sizes = [[112, 168], [56, 56], [168, 56]]  # 2x3, 1x1 and 3x1 crop grids, num_crops = 6
    n, slots, patches, width = len(sizes), 7, 16, 32
    table = torch.randn(n * slots, patches, width, generator=torch.Generator().manual_seed(0))
    pixel_values = torch.zeros(n, slots, 3, 56, 56)
    for i in range(n):
        for j in range(slots):
            pixel_values[i, j] = i * slots + j  # crop id, readable by the stub tower
    embedding.img_processor["vision_model"] = tower = CropIdTower(table)
    captured = []
    embedding.img_projection.register_forward_hook(lambda module, args, output: captured.append(args[0]))
    with torch.no_grad():
        projected = embedding(pixel_values, torch.tensor(sizes))
    glb, sub = embedding.glb_GN.reshape(-1), embedding.sub_GN.reshape(-1)
    expected = reference_tokens(table.reshape(n, slots, patches, width), sizes, glb, sub, tile=56, side=2)
    torch.testing.assert_close(captured[0], expected, rtol=0, atol=0)
    assert projected.shape == (expected.shape[0], model.config.hidden_size)
    # CLIP saw each image's global view and real crops, once, in order; never the zero padding crops
    assert tower.seen == [0, 1, 2, 3, 4, 5, 6, 7, 8, 14, 15, 16, 17]


def test_negative_official_placeholders_equal_image_token_id(tiny, make_image):
    model, processor = tiny
    batch = processor(PROMPT, [make_image(100, 150)])
    official = batch["input_ids"].masked_fill(batch["input_ids"] == processor.image_token_id, -1)
    with torch.no_grad():
        ours = model(**batch).logits
        theirs = model(**{**batch, "input_ids": official}).logits
    torch.testing.assert_close(ours, theirs, rtol=0, atol=0)


def test_mismatched_inputs_raise(tiny, make_image):
    model, processor = tiny
    batch = processor(PROMPT, [make_image(100, 150)])
    truncated = {**batch, "input_ids": batch["input_ids"][:, :-40], "attention_mask": None}
    with pytest.raises(ValueError, match="image slots"):
        model(**truncated)
    negative = batch["input_ids"].masked_fill(batch["input_ids"] == processor.image_token_id, -1)
    with pytest.raises(ValueError, match="no pixel_values"):
        model(input_ids=negative)


def _generate(model, batch, **kwargs):
    return model.generate(**batch, do_sample=False, return_dict_in_generate=True, output_scores=True, **kwargs)


def test_generate_with_cache_equals_without(tiny_rope_switch, make_image):
    model, processor = tiny_rope_switch
    batch = processor("<|user|>\n<|image_1|>\nWhat is it?<|end|>\n<|assistant|>\n", [make_image(100, 150)])
    prompt_len, new = batch["input_ids"].shape[1], 24
    original_max = model.config.original_max_position_embeddings
    assert prompt_len < original_max < prompt_len + new  # crosses the LongRoPE switch while decoding
    vision_calls = []
    model.model.vision_embed_tokens.register_forward_hook(lambda *args: vision_calls.append(1))
    cached = _generate(model, batch, max_new_tokens=new, min_new_tokens=new, use_cache=True)
    # prefill + the full recompute when the sequence first exceeds original_max_position_embeddings
    assert len(vision_calls) == 2
    uncached = _generate(model, batch, max_new_tokens=new, min_new_tokens=new, use_cache=False)
    assert torch.equal(cached.sequences, uncached.sequences)
    for a, b in zip(cached.scores, uncached.scores, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


def test_batched_left_padded_generation_equals_single(tiny, make_image):
    model, processor = tiny
    prompts = ["<|image_1|>\nWhat?", "<|user|>\n<|image_1|>\nAnd this one?"]
    images = [[make_image(60, 60)], [make_image(300, 80, seed=1)]]
    batch = processor(prompts, images, padding_side="left")
    new = 6
    # keep every row on the same side of the LongRoPE switch: the batch's longest row decides it
    assert batch["input_ids"].shape[1] + new <= model.config.original_max_position_embeddings
    together = _generate(model, batch, max_new_tokens=new, min_new_tokens=new)
    for i, (prompt, imgs) in enumerate(zip(prompts, images, strict=True)):
        alone = _generate(model, processor(prompt, imgs), max_new_tokens=new, min_new_tokens=new)
        assert together.sequences[i, -new:].tolist() == alone.sequences[0, -new:].tolist()
        for a, b in zip(together.scores, alone.scores, strict=True):
            torch.testing.assert_close(a[i], b[0], rtol=1e-4, atol=1e-4)


def test_beam_search_repeats_each_rows_own_images(tiny, make_image):
    """num_beams repeats rows: row 0 holds two images, row 1 none, row 2 one; every beam sees its row's."""
    model, processor = tiny
    prompts = ["<|image_1|> and <|image_2|>?", "no image here", "just <|image_1|>"]
    images = [[make_image(60, 60), make_image(300, 80, seed=1)], [], [make_image(80, 200, seed=2)]]
    batch = processor(prompts, images, padding_side="left")
    assert model.images_by_row(batch["input_ids"], batch["image_sizes"]) == [[0, 1], [], [2]]
    beams = 3
    out = model.generate(**batch, max_new_tokens=2, num_beams=beams, do_sample=False, return_dict_in_generate=True,
                         output_scores=True)
    for i, (prompt, imgs) in enumerate(zip(prompts, images, strict=True)):
        greedy = _generate(model, processor(prompt, imgs), max_new_tokens=1)
        # At the first step only a row's first beam is live: its scores are the prompt's log-probabilities.
        torch.testing.assert_close(out.scores[0][beams * i], greedy.scores[0][0].log_softmax(-1), rtol=1e-4,
                                   atol=1e-4)


def test_text_only_and_mixed_batches(tiny, make_image):
    model, processor = tiny
    text = processor(["<|user|>\nHello<|end|>", "<|user|>\nA longer question<|end|>"], padding_side="left")
    out = model.generate(**text, max_new_tokens=3, min_new_tokens=3, do_sample=False)
    assert out.shape == (2, text["input_ids"].shape[1] + 3)
    mixed = processor(["<|image_1|> hi", "no image"], [[make_image(60, 60)], []], padding_side="right")
    with torch.no_grad():
        logits = model(**mixed).logits
    assert torch.isfinite(logits).all()


def test_loss_counts_only_target_positions(tiny, make_image):
    model, processor = tiny
    batch = processor(PROMPT + "Product: Trench coat<|end|>", [make_image(100, 150)])
    ids = batch["input_ids"]
    answer_len = len(processor.tokenizer("Product: Trench coat<|end|>", add_special_tokens=False)["input_ids"])
    labels = torch.full_like(ids, -100)
    labels[:, -answer_len:] = ids[:, -answer_len:]
    with torch.no_grad():
        out = model(**batch, labels=labels)
    manual = nn.functional.cross_entropy(out.logits[0, :-1].float(), labels[0, 1:], ignore_index=-100)
    torch.testing.assert_close(out.loss, manual)

    def loss_with_noise_at(position: int) -> torch.Tensor:
        def bump(module, args, output):
            output = output.clone()
            output[:, position] += 10 * torch.randn(output.shape[-1], generator=torch.Generator().manual_seed(1))
            return output

        handle = model.lm_head.register_forward_hook(bump)
        with torch.no_grad():
            loss = model(**batch, labels=labels).loss
        handle.remove()
        return loss

    ignored = ids.shape[1] - answer_len - 5  # logits here predict a prompt token (label -100)
    target = ids.shape[1] - answer_len  # logits here predict an answer token
    assert loss_with_noise_at(ignored) == out.loss
    assert loss_with_noise_at(target) != out.loss


@pytest.mark.parametrize("length", [40, 100])  # both sides of original_max_position_embeddings = 64
def test_text_stack_equals_transformers_phi3(tiny_rope_switch, length):
    model, _ = tiny_rope_switch
    c = model.config
    reference = Phi3ForCausalLM(
        Phi3Config(
            vocab_size=c.vocab_size,
            hidden_size=c.hidden_size,
            intermediate_size=c.intermediate_size,
            num_hidden_layers=c.num_hidden_layers,
            num_attention_heads=c.num_attention_heads,
            num_key_value_heads=c.num_key_value_heads,
            max_position_embeddings=c.max_position_embeddings,
            original_max_position_embeddings=c.original_max_position_embeddings,
            rope_parameters=dict(c.rope_parameters),
            pad_token_id=c.pad_token_id,
            attn_implementation="sdpa",
        )
    ).eval()
    assert reference.config.rope_parameters["rope_type"] == "longrope"
    text_weights = {k: v for k, v in model.state_dict().items() if "vision_embed_tokens" not in k}
    reference.load_state_dict(text_weights, strict=True)
    ids = torch.randint(3, 259, (2, length), generator=torch.Generator().manual_seed(length))
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids).logits, reference(input_ids=ids).logits, rtol=0, atol=0)


def test_long_rope_switch_changes_early_logits(tiny_rope_switch):
    """Sanity check of the test above: past 64 tokens the long factors apply to every position."""
    model, _ = tiny_rope_switch
    ids = torch.randint(3, 259, (1, 100), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        short, long = model(input_ids=ids[:, :40]).logits, model(input_ids=ids).logits[:, :40]
    assert not torch.allclose(short, long, atol=1e-3)


def _loss_and_grads(model, batch, labels) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    model.train()
    loss = model(**batch, labels=labels, use_cache=False).loss
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def _count_forward(module: nn.Module, attribute: str = "forward") -> list[int]:
    """Calls of `module.forward` (or of another callable attribute, e.g. its compiled forward, which is
    counted outside the graph: a hook inside would break it)."""
    calls: list[int] = []
    forward = getattr(module, attribute)

    def counted(*args, **kwargs):
        calls.append(1)
        return forward(*args, **kwargs)

    setattr(module, attribute, counted)
    return calls


def test_gradient_checkpointing_gives_same_loss_and_grads(make_image):
    plain, processor = load("tiny-phi3v")
    checkpointed, _ = load("tiny-phi3v")
    checkpointed.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    batch = processor(PROMPT + "A coat<|end|>", [make_image(100, 150)])
    labels = batch["input_ids"].masked_fill(batch["input_ids"] == processor.image_token_id, -100)
    text_mlp = checkpointed.model.layers[0].mlp
    vision_mlp = checkpointed.model.vision_embed_tokens.img_processor["vision_model"].encoder.layers[0].mlp
    counts = {"text": _count_forward(text_mlp), "vision": _count_forward(vision_mlp)}
    loss_a, grads_a = _loss_and_grads(plain, batch, labels)
    loss_b, grads_b = _loss_and_grads(checkpointed, batch, labels)
    # each checkpointed layer ran again in the backward pass (hooks do not fire on the recompute)
    assert {k: len(v) for k, v in counts.items()} == {"text": 2, "vision": 2}
    torch.testing.assert_close(loss_a, loss_b, rtol=0, atol=0)
    assert grads_a.keys() == grads_b.keys()
    assert any("img_processor" in name for name in grads_a)  # the vision tower is trained too
    for name in grads_a:
        torch.testing.assert_close(grads_a[name], grads_b[name], rtol=1e-6, atol=1e-7, msg=name)


@pytest.mark.slow
def test_compiled_blocks_under_gradient_checkpointing_give_same_loss_and_grads(make_image):
    """`model.compile` with gradient checkpointing compiles each layer's attention and MLP block, so that the
    checkpoint stays outside every graph (inductor refuses sdpa's kernel in a recomputed region): the blocks
    still run again in the backward pass, and loss and gradients are the uncompiled ones."""
    from torch._dynamo.utils import counters
    from transformers.models.clip.modeling_clip import CLIPEncoderLayer
    from transformers.models.phi3.modeling_phi3 import Phi3DecoderLayer

    from vlmtune.models.loading import compile_layers

    plain, processor = load("tiny-phi3v")
    compiled, _ = load("tiny-phi3v")
    compiled.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    layers = sum(isinstance(m, Phi3DecoderLayer | CLIPEncoderLayer) for m in compiled.modules())
    assert compile_layers(compiled) == 2 * layers
    batch = processor(PROMPT + "A coat<|end|>", [make_image(100, 150)])
    labels = batch["input_ids"].masked_fill(batch["input_ids"] == processor.image_token_id, -100)
    text_mlp = compiled.model.layers[0].mlp
    vision_mlp = compiled.model.vision_embed_tokens.img_processor["vision_model"].encoder.layers[0].mlp
    counts = {"text": _count_forward(text_mlp, "_compiled_call_impl"),
              "vision": _count_forward(vision_mlp, "_compiled_call_impl")}
    loss_a, grads_a = _loss_and_grads(plain, batch, labels)
    graphs = counters["stats"]["unique_graphs"]
    loss_b, grads_b = _loss_and_grads(compiled, batch, labels)
    assert counters["stats"]["unique_graphs"] > graphs and not sum(counters["graph_break"].values())
    assert {k: len(v) for k, v in counts.items()} == {"text": 2, "vision": 2}
    torch.testing.assert_close(loss_a, loss_b, rtol=1e-6, atol=1e-6)
    assert grads_a.keys() == grads_b.keys()
    for name in grads_a:
        torch.testing.assert_close(grads_a[name], grads_b[name], rtol=1e-5, atol=1e-6, msg=name)


def test_eager_and_sdpa_agree(make_image):
    eager, processor = load("tiny-phi3v", attn_implementation="eager")
    sdpa, _ = load("tiny-phi3v", attn_implementation="sdpa")
    assert eager.config.vision_config._attn_implementation == "eager"
    batch = processor(
        ["<|image_1|>\nWhat?", "<|image_1|>\nA longer one?"],
        [[make_image(60, 60)], [make_image(90, 200)]],
        padding_side="left",
    )
    with torch.no_grad():
        a, b = eager(**batch).logits, sdpa(**batch).logits
    real = batch["attention_mask"].bool()
    torch.testing.assert_close(a[real], b[real], rtol=1e-5, atol=1e-5)


def test_bfloat16(make_image):
    model, processor = load("tiny-phi3v", dtype=torch.bfloat16)
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())
    batch = processor(PROMPT, [make_image(100, 150)])  # float32 pixels into a bf16 model
    out = model(**batch, labels=batch["input_ids"].masked_fill(batch["input_ids"] == processor.image_token_id, -100))
    assert out.logits.dtype == torch.bfloat16 and torch.isfinite(out.loss)
    generated = model.generate(**batch, max_new_tokens=3, min_new_tokens=3, do_sample=False)
    assert generated.shape[1] == batch["input_ids"].shape[1] + 3


def test_slots_are_filled_in_order_across_the_batch(tiny, make_image):
    """Row 0 holds images 1 and 2, row 1 image 3: slot runs take the images' features in that order."""
    model, processor = tiny
    images = [[make_image(60, 60), make_image(300, 80, seed=1)], [make_image(80, 200, seed=2)]]
    batch = processor(["<|image_1|> and <|image_2|>?", "just <|image_1|>"], images, padding_side="left")
    with torch.no_grad():
        embeds = model.model.embed(batch["input_ids"], batch["pixel_values"], batch["image_sizes"])
        alone = [_features(model, processor.image_processor(im)) for ims in images for im in ims]
    slots = batch["input_ids"] == processor.image_token_id
    torch.testing.assert_close(embeds[0][slots[0]], torch.cat(alone[:2]))
    torch.testing.assert_close(embeds[1][slots[1]], alone[2])
    text = model.model.embed_tokens(batch["input_ids"].masked_fill(slots, 0))
    torch.testing.assert_close(embeds[~slots], text[~slots])
