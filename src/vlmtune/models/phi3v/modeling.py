"""Phi-3-Vision in native transformers: a CLIP ViT tower, HD crop features and the Phi-3 text model.

The hub's remote code stopped working with transformers 4.49 (removed cache APIs, tied-weight format,
flash-attention flags). This module rebuilds the model from transformers' own blocks: `Phi3Model` for text
(fused qkv / gate_up projections, LongRoPE), CLIP's embeddings and encoder layers for vision, and a small
`Phi3ImageEmbedding` that reproduces the official token layout of each image:

    [sub-image grid rows, each followed by sub_GN] [glb_GN] [global-view rows, each followed by sub_GN]

Parameter names are exactly those of the official safetensors files, so checkpoints load without any
key mapping and save back in the same layout.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn
from transformers import CLIPVisionConfig, Phi3ForCausalLM, Phi3Model
from transformers import initialization as init
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast
from transformers.modeling_utils import slice_logits_to_keep
from transformers.models.clip.modeling_clip import CLIPEncoder, CLIPVisionEmbeddings
from transformers.models.phi3.modeling_phi3 import Phi3PreTrainedModel
from transformers.utils import can_return_tuple

from .configuration import Phi3VConfig
from .image_processing import num_image_tokens


def merge_2x2(features: torch.Tensor) -> torch.Tensor:
    """[n, g*g, C] patch features → [n, g/2, g/2, 4C]: each token concatenates a 2x2 patch block.

    Channel order of merged token (r, c) is patches (2r, 2c), (2r, 2c+1), (2r+1, 2c), (2r+1, 2c+1).
    """
    n, num_patches, c = features.shape
    g = math.isqrt(num_patches)
    blocks = features.reshape(n, g // 2, 2, g // 2, 2, c).permute(0, 1, 3, 2, 4, 5)
    return blocks.reshape(n, g // 2, g // 2, 4 * c)


def tile_crops(crops: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
    """[rows*cols, s, s, D] row-major crops → one [rows*s, cols*s, D] grid, as the crops sit in the image."""
    _, s, _, d = crops.shape
    return crops.reshape(rows, cols, s, s, d).permute(0, 2, 1, 3, 4).reshape(rows * s, cols * s, d)


class CLIPVisionTransformer(nn.Module):
    """CLIP's vision transformer, assembled from transformers' CLIP blocks in the transformers 4 layout.

    transformers 5's `CLIPVisionModel` dropped its `vision_model` level and restores the old names only
    inside `from_pretrained`. Owning the blocks keeps the official names in the module tree itself, so
    `state_dict()`, PEFT target names and DeepSpeed's own checkpoints all use the official layout too.

    Only the layers up to the feature layer run. The later layers and `post_layernorm` stay so checkpoints
    round-trip; they never get a gradient (`loading.apply_freeze` freezes them for full fine-tuning).
    """

    def __init__(self, config: CLIPVisionConfig, feature_layer: int) -> None:
        super().__init__()
        self.embeddings = CLIPVisionEmbeddings(config)
        self.pre_layrnorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.encoder = CLIPEncoder(config)
        self.post_layernorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        # hidden_states[0] is the embedding output, hidden_states[i] the output of layer i - 1.
        num_layers = config.num_hidden_layers
        self.num_layers_used = feature_layer if feature_layer >= 0 else num_layers + 1 + feature_layer
        if not 0 <= self.num_layers_used <= num_layers:
            raise ValueError(f"feature layer {feature_layer} is outside a {num_layers}-layer tower")

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """[n, 3, S, S] → hidden states of the feature layer, [n, 1 + patches, C] (CLS first)."""
        hidden = self.pre_layrnorm(self.embeddings(pixel_values))
        for layer in self.encoder.layers[: self.num_layers_used]:
            hidden = layer(hidden, None)
        return hidden


class Phi3ImageEmbedding(nn.Module):
    """Turns HD crops into the projected image tokens of Phi-3-Vision, all images of a batch at once.

    CLIP runs once over the global view and the real crops of every image; the zero crops that pad each
    image to `num_crops + 1` are skipped (the official code encodes and then discards them).
    """

    def __init__(self, config: Phi3VConfig) -> None:
        super().__init__()
        vision = config.vision_config
        # The official checkpoints nest the tower one level deeper: img_processor.vision_model.*.
        self.img_processor = nn.ModuleDict({"vision_model": CLIPVisionTransformer(vision, config.vision_feature_layer)})
        dim = 4 * vision.hidden_size
        self.glb_GN = nn.Parameter(torch.zeros(1, 1, dim))  # separates the sub-image grid from the global view
        self.sub_GN = nn.Parameter(torch.zeros(1, 1, 1, dim))  # ends every row of tokens
        self.img_projection = nn.Sequential(
            nn.Linear(dim, config.hidden_size), nn.GELU(), nn.Linear(config.hidden_size, config.hidden_size)
        )
        self.tile_size = vision.image_size

    def forward(self, pixel_values: torch.Tensor, image_sizes: torch.Tensor | list) -> torch.Tensor:
        """pixel_values [n, 1 + num_crops, 3, S, S], image_sizes [n, 2] (HD H, W) → [sum N_i, hidden]."""
        slots_per_image = pixel_values.shape[1]
        sizes = image_sizes.tolist() if torch.is_tensor(image_sizes) else [list(s) for s in image_sizes]
        grids = [(h // self.tile_size, w // self.tile_size) for h, w in sizes]
        if any(1 + rows * cols > slots_per_image for rows, cols in grids):
            raise ValueError(f"image_sizes {sizes} need more crops than pixel_values holds ({slots_per_image})")
        keep = [i * slots_per_image + j for i, (rows, cols) in enumerate(grids) for j in range(1 + rows * cols)]
        crops = pixel_values.flatten(0, 1)[torch.tensor(keep, device=pixel_values.device)]
        merged = merge_2x2(self.img_processor["vision_model"](crops)[:, 1:])  # CLS dropped

        tokens, start = [], 0
        for rows, cols in grids:
            glb, subs = merged[start], merged[start + 1 : start + 1 + rows * cols]
            start += 1 + rows * cols
            tokens += [self.end_rows(tile_crops(subs, rows, cols)), self.glb_GN[0], self.end_rows(glb)]
        projection = self.img_projection[0].weight
        return self.img_projection(torch.cat(tokens).to(device=projection.device, dtype=projection.dtype))

    def end_rows(self, grid: torch.Tensor) -> torch.Tensor:
        """[R, C, D] → [R * (C + 1), D] with `sub_GN` appended to every row."""
        rows, _, dim = grid.shape
        return torch.cat([grid, self.sub_GN[0].expand(rows, 1, dim).to(grid.dtype)], dim=1).reshape(-1, dim)


class Phi3VPreTrainedModel(Phi3PreTrainedModel):
    """Phi-3 base class with the Phi-3-Vision config, initialisation and checkpoint rules."""

    config_class = Phi3VConfig
    config: Phi3VConfig
    _no_split_modules = ("Phi3DecoderLayer", "CLIPEncoderLayer")
    # The official model shares the text embedding as `vision_embed_tokens.wte`; some exports store it twice.
    _keys_to_ignore_on_load_unexpected = (r"vision_embed_tokens\.wte\.weight",)

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        super()._init_weights(module)
        if isinstance(module, CLIPVisionEmbeddings):
            init.normal_(module.class_embedding, std=module.embed_dim**-0.5)
            init.copy_(module.position_ids, torch.arange(module.num_positions).expand((1, -1)))
        elif isinstance(module, Phi3ImageEmbedding):
            # Random rather than the official zeros: in a fresh model, separators then differ from padding.
            init.normal_(module.glb_GN, std=self.config.initializer_range)
            init.normal_(module.sub_GN, std=self.config.initializer_range)


class Phi3VModel(Phi3VPreTrainedModel, Phi3Model):
    """`Phi3Model` plus `vision_embed_tokens`; image features replace the embeddings of image slots.

    Image slots are the positions of `config.image_token_id` or of negative ids (the official processor
    writes -k for image k). Features fill them in order of appearance, row-major over the batch, so the k-th
    image of the batch fills the k-th run of slots.
    """

    def __init__(self, config: Phi3VConfig) -> None:
        super().__init__(config)
        self.vision_embed_tokens = Phi3ImageEmbedding(config)
        # PreTrainedModel resolves the text attention implementation (e.g. None → sdpa) without passing it
        # down; the CLIP layers read theirs from the vision config.
        if config.vision_config._attn_implementation is None:
            config.vision_config._attn_implementation_internal = config._attn_implementation
        self.post_init()

    def image_slots(self, input_ids: torch.LongTensor) -> torch.Tensor:
        """Boolean mask of the positions that image features fill."""
        return (input_ids < 0) | (input_ids == self.config.image_token_id)

    def embed(
        self,
        input_ids: torch.LongTensor,
        pixel_values: torch.Tensor | None = None,
        image_sizes: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Token embeddings of `input_ids` with image features written into the image slots."""
        if pixel_values is None or pixel_values.shape[0] == 0:
            if (input_ids < 0).any():
                raise ValueError("input_ids hold negative image placeholders but no pixel_values were given")
            return self.embed_tokens(input_ids)
        if image_sizes is None:
            raise ValueError("pixel_values need image_sizes")
        slots = self.image_slots(input_ids)
        embeds = self.embed_tokens(input_ids.masked_fill(slots, 0))  # never look up negative ids
        features = self.vision_embed_tokens(pixel_values, image_sizes)
        num_slots = int(slots.sum())
        if num_slots != features.shape[0]:
            raise ValueError(f"input_ids have {num_slots} image slots but the images give {features.shape[0]}")
        return embeds.masked_scatter(slots.unsqueeze(-1), features.to(embeds.dtype))

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        pixel_values: torch.Tensor | None = None,
        image_sizes: torch.Tensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        **kwargs: Any,
    ) -> BaseModelOutputWithPast:
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids and inputs_embeds")
        if inputs_embeds is None:
            inputs_embeds = self.embed(input_ids, pixel_values, image_sizes)
        return super().forward(inputs_embeds=inputs_embeds, **kwargs)


class Phi3VForCausalLM(Phi3VPreTrainedModel, Phi3ForCausalLM):
    """Phi-3-Vision / Phi-3.5-Vision with an untied LM head.

    Inherits generation from `Phi3ForCausalLM`, including its LongRoPE rule: the first time a sequence grows
    past `original_max_position_embeddings`, the cache is dropped and everything is recomputed with the long
    factors. Pixels are passed to the model only when a step covers the whole prompt (prefill, or that
    recompute); decoding steps never run the vision tower.
    """

    def __init__(self, config: Phi3VConfig) -> None:
        # Not Phi3ForCausalLM.__init__: it would first build (and initialise) a text-only Phi3Model.
        Phi3PreTrainedModel.__init__(self, config)
        self.model = Phi3VModel(config)
        self.vocab_size = config.vocab_size
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    @can_return_tuple
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        pixel_values: torch.Tensor | None = None,
        image_sizes: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        **kwargs: Any,
    ) -> CausalLMOutputWithPast:
        """Labels are `input_ids`-aligned; positions labelled -100 are ignored (shifted CE in fp32).

        The KV cache travels in `kwargs` under whichever name the installed transformers uses
        (`past_key_values` up to 5.23, `cache` from 5.24), and comes back in the output the same way.

        Packed rows (several samples in one row, `position_ids` restarting at 0 for each, no attention mask,
        `use_cache=False`: see `data.collate.pack`) keep attention inside each sample.
        """
        outputs = self.model(
            input_ids=input_ids,
            pixel_values=pixel_values,
            image_sizes=image_sizes,
            attention_mask=attention_mask,
            position_ids=position_ids,
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
            **kwargs,
        )
        logits = self.lm_head(slice_logits_to_keep(outputs.last_hidden_state, logits_to_keep))
        loss = None
        if labels is not None:
            loss = self.loss_function(logits=logits, labels=labels, vocab_size=self.config.vocab_size, **kwargs)
        rest = {key: value for key, value in outputs.items() if key != "last_hidden_state"}
        return CausalLMOutputWithPast(loss=loss, logits=logits, **rest)

    def images_by_row(self, input_ids: torch.LongTensor, image_sizes: torch.Tensor | list) -> list[list[int]]:
        """Indices of the images whose features fill each row's slots (in order, row by row: see Phi3VModel)."""
        slots = self.model.image_slots(input_ids).sum(dim=1).tolist()
        sizes = torch.as_tensor(image_sizes).tolist()
        tile, side = self.model.vision_embed_tokens.tile_size, self.config.tokens_per_side
        rows, k = [], 0
        for i, left in enumerate(slots):
            rows.append([])
            while left > 0 and k < len(sizes):
                left -= num_image_tokens(*sizes[k], tile, side)
                rows[-1].append(k)
                k += 1
            if left != 0:
                raise ValueError(f"row {i} of input_ids has {slots[i]} image slots, which whole images do not fill")
        if k != len(sizes):
            raise ValueError(f"input_ids have slots for {k} images but {len(sizes)} were given")
        return rows

    def _expand_inputs_for_generation(
        self,
        expand_size: int = 1,
        is_encoder_decoder: bool = False,
        input_ids: torch.LongTensor | None = None,
        **model_kwargs: Any,
    ) -> tuple[torch.LongTensor | None, dict[str, Any]]:
        """Beam search and `num_return_sequences` repeat every row `expand_size` times. The generic version
        repeats each tensor along dim 0, right for pixel_values only when every row holds exactly one image;
        here each row's own images (several, or none) are repeated with it."""
        pixel_values, image_sizes = model_kwargs.pop("pixel_values", None), model_kwargs.pop("image_sizes", None)
        if pixel_values is not None and expand_size > 1 and input_ids is not None:
            order = [k for images in self.images_by_row(input_ids, image_sizes) for _ in range(expand_size)
                     for k in images]
            index = torch.tensor(order, dtype=torch.long, device=pixel_values.device)
            pixel_values = pixel_values[index]
            image_sizes = torch.as_tensor(image_sizes, device=pixel_values.device)[index]
        input_ids, model_kwargs = super()._expand_inputs_for_generation(
            expand_size=expand_size, is_encoder_decoder=is_encoder_decoder, input_ids=input_ids, **model_kwargs
        )
        if pixel_values is not None:
            model_kwargs.update(pixel_values=pixel_values, image_sizes=image_sizes)
        return input_ids, model_kwargs

    def prepare_inputs_for_generation(
        self,
        input_ids: torch.LongTensor,
        pixel_values: torch.Tensor | None = None,
        image_sizes: torch.Tensor | None = None,
        is_first_iteration: bool = False,
        **kwargs: Any,
    ) -> dict[str, Any]:
        model_inputs = super().prepare_inputs_for_generation(input_ids, is_first_iteration=is_first_iteration, **kwargs)
        cache = model_inputs.get("cache", model_inputs.get("past_key_values"))
        # A step without a cache recomputes the whole prompt, image slots included.
        if is_first_iteration or cache is None:
            model_inputs["pixel_values"] = pixel_values
            model_inputs["image_sizes"] = image_sizes
        return model_inputs
