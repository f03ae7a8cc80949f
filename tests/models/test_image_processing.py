"""The HD transform and the image-token count of the official image_processing_phi3_v.py."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from vlmtune.models.phi3v import Phi3VImageProcessor
from vlmtune.models.phi3v.image_processing import CLIP_MEAN, CLIP_STD

DATA = Path(__file__).parent / "data"

# (width, height, num_crops) -> (padded H, padded W, tokens) for 336-px tiles, worked out by hand:
# scale = max s with s * ceil(s / ratio) <= num_crops, width = s * 336, height = int(width / ratio), then the
# height is padded up to a multiple of 336; N = (hc*wc + 1) * 144 + 1 + (hc + 1) * 12.
REAL_CASES = [
    (1000, 1000, 4, 672, 672, 757),  # 757 and 1921 are vLLM's reference values
    (1000, 1000, 16, 1344, 1344, 2509),
    (1000, 500, 16, 1008, 1680, 2353),
    (640, 480, 16, 1008, 1344, 1921),
    (4000, 100, 16, 336, 5376, 2473),  # extreme landscape: 1x16 crops
    (100, 4000, 16, 5376, 336, 2653),  # extreme portrait: 16x1 crops
    (4000, 100, 4, 336, 1344, 745),
    (10, 10, 16, 1344, 1344, 2509),  # tiny images are upscaled
    (10, 10, 4, 672, 672, 757),
    (336, 336, 1, 336, 336, 313),
    (700, 300, 16, 1008, 1680, 2353),  # 1680 / (700/300) truncates to 719, still 3 rows of crops
    (1000, 999, 16, 1344, 1344, 2509),
    (500, 1000, 16, 1680, 1008, 2377),
]


@pytest.mark.parametrize(("width", "height", "num_crops", "padded_h", "padded_w", "tokens"), REAL_CASES)
def test_token_count_and_hd_size(width, height, num_crops, padded_h, padded_w, tokens):
    processor = Phi3VImageProcessor(num_crops=num_crops)
    assert processor.calc_num_image_tokens_from_image_size(width, height) == tokens
    if width * height <= 1000 * 1000:  # the pixel path for the moderate sizes (the extremes are slow-ish)
        out = processor(Image.new("RGB", (width, height), (90, 120, 30)))
        assert out["image_sizes"].tolist() == [[padded_h, padded_w]]
        assert out["num_img_tokens"] == [tokens]
        assert out["pixel_values"].shape == (1, num_crops + 1, 3, 336, 336)
        assert out["pixel_values"].dtype == torch.float32
        assert (padded_h // 336) * (padded_w // 336) <= num_crops


def _white() -> torch.Tensor:
    return (1 - torch.tensor(CLIP_MEAN)) / torch.tensor(CLIP_STD)


def _tiny_processor(num_crops: int = 4) -> Phi3VImageProcessor:
    return Phi3VImageProcessor(num_crops=num_crops, num_img_tokens=4, tile_size=56)


def test_landscape_is_padded_top_and_bottom_with_white():
    # 250x100 at 4 crops: scale 2 -> 112x44, padded to 112x56: 6 white rows on top, 6 at the bottom
    colour = (200, 30, 60)
    out = _tiny_processor()(Image.new("RGB", (250, 100), colour))
    assert out["image_sizes"].tolist() == [[56, 112]]
    crops = out["pixel_values"][0, 1:3]  # 1 row x 2 columns of real crops
    white = _white()[:, None]
    content = (torch.tensor(colour) / 255 - torch.tensor(CLIP_MEAN)) / torch.tensor(CLIP_STD)
    for crop in crops:
        for row in [*range(6), *range(50, 56)]:
            torch.testing.assert_close(crop[:, row, :], white.expand(3, 56))
        torch.testing.assert_close(crop[:, 6:50, :], content[:, None, None].expand(3, 44, 56))


def test_portrait_is_padded_left_and_right_after_transposing_back():
    # 100x250: transposed to 250x100, resized and padded as above, transposed back -> H=112, W=56
    out = _tiny_processor()(Image.new("RGB", (100, 250), (200, 30, 60)))
    assert out["image_sizes"].tolist() == [[112, 56]]
    white = _white()[:, None]
    for crop in out["pixel_values"][0, 1:3]:  # 2 rows x 1 column
        for col in [*range(6), *range(50, 56)]:
            torch.testing.assert_close(crop[:, :, col], white.expand(3, 56))
        assert not torch.allclose(crop[:, :, 6:50], white[..., None].expand(3, 56, 44))


def test_orientation_is_preserved():
    """A portrait image whose top half is red and bottom half blue keeps red on top after the transform."""
    pixels = np.zeros((224, 112, 3), dtype=np.uint8)
    pixels[:112, :, 0] = 255
    pixels[112:, :, 2] = 255
    out = _tiny_processor()(Image.fromarray(pixels))
    h, w = out["image_sizes"][0].tolist()
    rows, cols = h // 56, w // 56
    grid = out["pixel_values"][0, 1 : 1 + rows * cols].reshape(rows, cols, 3, 56, 56)
    hd = grid.permute(2, 0, 3, 1, 4).reshape(3, h, w)
    red = (1 - CLIP_MEAN[0]) / CLIP_STD[0]
    assert hd[0, : h // 4].mean() == pytest.approx(red, abs=1e-3)
    assert hd[0, -h // 4 :].mean() < 0


def test_crops_are_row_major_zero_padded_and_global_view_is_bicubic(make_image):
    # 170x90 at 8 crops: scale 3 -> 168x88, padded to 168x112 (12 white rows each side): 2x3 + 2 zero crops
    image = make_image(170, 90, seed=3)
    out = _tiny_processor(num_crops=8)(image)
    assert out["image_sizes"].tolist() == [[112, 168]]
    stack = out["pixel_values"][0]
    assert stack.shape == (9, 3, 56, 56)
    assert torch.count_nonzero(stack[7:]) == 0
    hd = stack[1:7].reshape(2, 3, 3, 56, 56).permute(2, 0, 3, 1, 4).reshape(3, 112, 168)
    expected_global = F.interpolate(hd[None], size=(56, 56), mode="bicubic", align_corners=False)[0]
    torch.testing.assert_close(stack[0], expected_global)
    # the HD image is PIL's bilinear resize of the input, normalised, between the white bands
    resized = torch.from_numpy(np.asarray(image.resize((168, 88), Image.Resampling.BILINEAR)).copy())
    mean, std = torch.tensor(CLIP_MEAN)[:, None, None], torch.tensor(CLIP_STD)[:, None, None]
    torch.testing.assert_close(hd[:, 12:100], (resized.permute(2, 0, 1) / 255 - mean) / std)
    torch.testing.assert_close(hd[:, :12], _white()[:, None, None].expand(3, 12, 168))


def test_batch_of_images_and_num_crops_override(make_image):
    processor = _tiny_processor()
    out = processor([make_image(60, 60), make_image(300, 80, seed=1)], num_crops=8)
    assert out["pixel_values"].shape == (2, 9, 3, 56, 56)
    assert out["num_img_tokens"] == [
        processor.calc_num_image_tokens_from_image_size(60, 60, num_crops=8),
        processor.calc_num_image_tokens_from_image_size(300, 80, num_crops=8),
    ]


def test_transparent_background_becomes_white():
    rgba = Image.new("RGBA", (56, 56), (0, 0, 0, 0))
    out = _tiny_processor(num_crops=1)(rgba)
    torch.testing.assert_close(out["pixel_values"][0, 1], _white()[:, None, None].expand(3, 56, 56))


def test_official_preprocessor_config_loads_and_round_trips(tmp_path):
    shutil.copy(DATA / "phi3_vision_128k_instruct.preprocessor_config.json", tmp_path / "preprocessor_config.json")
    processor = Phi3VImageProcessor.from_pretrained(tmp_path)
    assert (processor.num_crops, processor.num_img_tokens, processor.tile_size) == (16, 144, 336)
    assert processor.image_mean == list(CLIP_MEAN) and processor.image_std == list(CLIP_STD)
    processor.save_pretrained(tmp_path / "saved")
    saved = json.loads((tmp_path / "saved" / "preprocessor_config.json").read_text())
    official = json.loads((DATA / "phi3_vision_128k_instruct.preprocessor_config.json").read_text())
    assert {k: saved[k] for k in official} == official
    again = Phi3VImageProcessor.from_pretrained(tmp_path / "saved")
    assert again.to_dict() == processor.to_dict()
