"""Phi-3-Vision image processor: the HD transform of the official checkpoints, without torchvision.

Each image becomes a grid of `tile_size` crops (at most `num_crops` of them) plus one global view:

1. Portrait images are transposed so the long side is the width (and transposed back at the end).
2. scale = the largest s with s * ceil(s / ratio) <= num_crops; the image is resized (PIL bilinear, which is
   what torchvision does on PIL images) to width s * tile and the matching height.
3. The height is padded with white, centred, to a multiple of the tile.
4. Pixels are scaled to [0, 1] and normalised with the CLIP mean/std, so the padding becomes (1 - mean)/std.
5. The global view is a bicubic resize of the normalised, padded image to one tile.
6. Crops are cut row-major, stacked after the global view and zero-padded to `num_crops + 1` entries.

The number of image tokens an image needs follows from its padded size (H, W) alone:
N = (hc * wc + 1) * s^2 + 1 + (hc + 1) * s, with hc = H / tile, wc = W / tile and s the side of a crop's
token grid after the 2x2 merge (12 for the real model).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, ClassVar

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageOps
from transformers.image_processing_utils import BaseImageProcessor, BatchFeature

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def resize_target(width: int, height: int, num_crops: int, tile: int) -> tuple[int, int]:
    """(new_w, new_h) of step 2 for a landscape image (width >= height), in the official float arithmetic."""
    ratio = width / height
    scale = 1
    while scale * math.ceil(scale / ratio) <= num_crops:
        scale += 1
    scale -= 1
    new_w = int(scale * tile)
    return new_w, int(new_w / ratio)


def hd_size(width: int, height: int, num_crops: int, tile: int) -> tuple[int, int]:
    """(H, W) of the padded HD image for a `width` x `height` input, in the input's orientation."""
    portrait = width < height
    new_w, new_h = resize_target(max(width, height), min(width, height), num_crops, tile)
    padded_h = math.ceil(new_h / tile) * tile
    return (new_w, padded_h) if portrait else (padded_h, new_w)


def num_image_tokens(padded_h: int, padded_w: int, tile: int, tokens_per_side: int) -> int:
    """Image tokens for an HD image of size (padded_h, padded_w): sub-grid rows + separators + global view."""
    hc, wc = padded_h // tile, padded_w // tile
    s = tokens_per_side
    return (hc * wc + 1) * s * s + 1 + (hc + 1) * s


def to_rgb(image: Image.Image) -> Image.Image:
    """Any PIL mode → RGB. Transparency (alpha, or a palette's transparent colour) is composited onto white,
    as catalog PNGs with transparent backgrounds are meant to be seen; the official processor instead drops
    the alpha channel, which turns those backgrounds black. 16-bit grayscale is scaled down, not clipped."""
    if "A" in image.getbands() or image.info.get("transparency") is not None:
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    if image.mode in {"I;16", "I;16B", "I;16L", "I"}:
        image = image.point(lambda v: v / 256).convert("L")
    return image if image.mode == "RGB" else image.convert("RGB")


class Phi3VImageProcessor(BaseImageProcessor):
    """HD-crop image processor of Phi-3-Vision / Phi-3.5-Vision.

    Reads and writes the official `preprocessor_config.json` (`num_crops`, `num_img_tokens`, `image_mean`,
    `image_std`, `do_convert_rgb`); `tile_size` (336 for the official checkpoints) is an addition so smaller
    towers can be used. `num_img_tokens` is the per-crop token count s^2.

    Returns `pixel_values` [n, num_crops + 1, 3, tile, tile] (float32), `image_sizes` [n, 2] = (H, W) of the
    padded HD image, and `num_img_tokens` (one int per image).
    """

    model_input_names: ClassVar[list[str]] = ["pixel_values", "image_sizes"]

    def __init__(
        self,
        num_crops: int = 1,
        num_img_tokens: int = 144,
        image_mean: Sequence[float] = CLIP_MEAN,
        image_std: Sequence[float] = CLIP_STD,
        do_convert_rgb: bool = True,
        tile_size: int = 336,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.num_crops = num_crops
        self.num_img_tokens = num_img_tokens
        self.image_mean = list(image_mean)
        self.image_std = list(image_std)
        self.do_convert_rgb = do_convert_rgb
        self.tile_size = tile_size

    @property
    def tokens_per_side(self) -> int:
        side = math.isqrt(self.num_img_tokens)
        if side * side != self.num_img_tokens:
            raise ValueError(f"num_img_tokens={self.num_img_tokens} is not a square")
        return side

    def calc_num_image_tokens_from_image_size(self, width: int, height: int, num_crops: int | None = None) -> int:
        """Image tokens for a `width` x `height` image, without touching pixels."""
        padded_h, padded_w = hd_size(width, height, num_crops or self.num_crops, self.tile_size)
        return num_image_tokens(padded_h, padded_w, self.tile_size, self.tokens_per_side)

    def hd_transform(self, image: Image.Image, num_crops: int) -> Image.Image:
        """Steps 1-3: resize and white-pad to whole tiles; the HD image keeps the input's orientation."""
        tile = self.tile_size
        transposed = image.width < image.height
        if transposed:
            image = image.transpose(Image.Transpose.TRANSPOSE)
        new_w, new_h = resize_target(image.width, image.height, num_crops, tile)
        image = image.resize((new_w, new_h), Image.Resampling.BILINEAR)
        padded_h = math.ceil(new_h / tile) * tile
        top = (padded_h - new_h) // 2
        image = ImageOps.expand(image, border=(0, top, 0, padded_h - new_h - top), fill=(255, 255, 255))
        return image.transpose(Image.Transpose.TRANSPOSE) if transposed else image

    def crops(self, image: Image.Image, num_crops: int) -> tuple[torch.Tensor, tuple[int, int]]:
        """Steps 1-6 for one image: [num_crops + 1, 3, tile, tile] and the padded HD size (H, W)."""
        tile = self.tile_size
        image = to_rgb(image) if self.do_convert_rgb else image.convert("RGB")
        hd = self.hd_transform(image, num_crops)
        pixels = torch.from_numpy(np.asarray(hd, dtype=np.uint8).copy()).permute(2, 0, 1).float().div(255)
        mean = torch.tensor(self.image_mean, dtype=torch.float32)[:, None, None]
        std = torch.tensor(self.image_std, dtype=torch.float32)[:, None, None]
        pixels = (pixels - mean) / std
        h, w = pixels.shape[1:]
        global_view = F.interpolate(pixels[None], size=(tile, tile), mode="bicubic", align_corners=False)
        grid = pixels.reshape(3, h // tile, tile, w // tile, tile).permute(1, 3, 0, 2, 4)
        grid = grid.reshape(-1, 3, tile, tile)  # row-major over the crop grid
        out = torch.zeros(num_crops + 1, 3, tile, tile)
        out[0] = global_view[0]
        out[1 : 1 + grid.shape[0]] = grid
        return out, (h, w)

    def preprocess(
        self,
        images: Image.Image | Sequence[Image.Image],
        num_crops: int | None = None,
        return_tensors: str = "pt",
    ) -> BatchFeature:
        """HD-transform one image or a list of PIL images (numpy HWC uint8 arrays are accepted too)."""
        if return_tensors != "pt":
            raise ValueError(f"return_tensors must be 'pt', got {return_tensors!r}")
        num_crops = num_crops or self.num_crops
        images = [images] if isinstance(images, Image.Image | np.ndarray) else list(images)
        images = [Image.fromarray(im) if isinstance(im, np.ndarray) else im for im in images]
        tile, side = self.tile_size, self.tokens_per_side
        processed = [self.crops(im, num_crops) for im in images]
        sizes = [size for _, size in processed]
        data = {
            "pixel_values": torch.stack([px for px, _ in processed])
            if processed
            else torch.zeros(0, num_crops + 1, 3, tile, tile),
            "image_sizes": torch.tensor(sizes, dtype=torch.long).reshape(-1, 2),
            "num_img_tokens": [num_image_tokens(h, w, tile, side) for h, w in sizes],
        }
        return BatchFeature(data=data)

    def __call__(self, images: Image.Image | Sequence[Image.Image], **kwargs: Any) -> BatchFeature:
        return self.preprocess(images, **kwargs)

    def to_dict(self) -> dict[str, Any]:
        # The official preprocessor_config.json names its processor; official tools read it from there.
        return {**super().to_dict(), "processor_class": "Phi3VProcessor"}
