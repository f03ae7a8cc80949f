"""Image fetching and normalisation against a real loopback HTTP server."""

from __future__ import annotations

import io

import pytest
from PIL import Image

from vlmtune.config import ImageConfig
from vlmtune.data.images import ImageError, decode_image, fetch_bytes, load_product_image

FAST = ImageConfig(timeout_s=1.0, retries=2, backoff_s=0.01, max_bytes=200_000, max_pixels=10_000_000,
                   max_side=256)


def test_good_image_is_resized_and_reencoded(server):
    jpeg, size = load_product_image(server.url("/img/large.jpg"), FAST.model_copy(update={"max_bytes": 10**7}))
    assert size == (256, 128)
    image = Image.open(io.BytesIO(jpeg))
    assert image.format == "JPEG" and image.size == (256, 128) and image.mode == "RGB"


def test_small_image_is_not_upscaled(server):
    _, size = load_product_image(server.url("/img/good.jpg"), FAST)
    assert size == (120, 80)


def test_404_is_not_retried(server):
    with pytest.raises(ImageError, match="HTTP 404") as err:
        fetch_bytes(server.url("/status/404"), FAST)
    assert not err.value.retriable
    assert server.hits["/status/404"] == 1


def test_500_then_200_is_retried_until_it_succeeds(server):
    data = fetch_bytes(server.url("/flaky/good.jpg"), FAST)
    assert data == server.files["good.jpg"]
    assert server.hits["/flaky/good.jpg"] == 3


def test_persistent_500_gives_up_after_the_configured_retries(server):
    with pytest.raises(ImageError, match=r"HTTP 503.*after 3 attempts"):
        fetch_bytes(server.url("/status/503"), FAST)
    assert server.hits["/status/503"] == 3


def test_slow_response_times_out_and_is_retried(server):
    cfg = FAST.model_copy(update={"timeout_s": 0.3, "retries": 1})
    with pytest.raises(ImageError, match=r"timed out.*after 2 attempts"):
        fetch_bytes(server.url("/slow"), cfg)
    assert server.hits["/slow"] == 2


def test_html_instead_of_an_image(server):
    with pytest.raises(ImageError, match=r"not an image \(got text/html\)"):
        fetch_bytes(server.url("/html"), FAST)
    data = fetch_bytes(server.url("/html-as-image"), FAST)  # server lies about the type
    with pytest.raises(ImageError, match=r"not an image \(HTML\)"):
        decode_image(data, FAST)


def test_size_cap(server):
    with pytest.raises(ImageError, match="exceeds the 200000 byte limit"):
        fetch_bytes(server.url("/big"), FAST)


@pytest.mark.parametrize("name", ["truncated.jpg", "truncated-header.jpg"])
def test_truncated_jpeg_is_rejected(server, name):
    with pytest.raises(ImageError, match="corrupt image"):
        load_product_image(server.url(f"/img/{name}"), FAST)


def test_decompression_bomb_is_rejected_before_decoding(server):
    with pytest.raises(ImageError, match="decompression bomb: 5000x5000"):
        load_product_image(server.url("/img/bomb.png"), FAST)


@pytest.mark.parametrize("name", ["cmyk.jpg", "palette.png", "gray.png"])
def test_modes_become_rgb(server, name):
    image = decode_image(server.files[name], FAST)
    assert image.mode == "RGB"


def test_palette_transparency_is_composited_on_white(server):
    image = decode_image(server.files["palette.png"], FAST)
    assert image.getpixel((5, 5)) == (0, 0, 255)
    assert image.getpixel((30, 5)) == (255, 255, 255)  # the transparent half


def test_cmyk_colours_survive():
    from tests.data.conftest import jpeg_bytes

    image = decode_image(jpeg_bytes((20, 20), colour=(255, 0, 0, 0), mode="CMYK"), FAST)  # pure cyan
    r, g, b = image.getpixel((10, 10))
    assert r < 40 and g > 200 and b > 200


def test_exif_orientation_is_applied(server):
    image = decode_image(server.files["exif.jpg"], FAST)
    assert image.size == (30, 60)


def test_local_paths_and_missing_files(tmp_path):
    from tests.data.conftest import jpeg_bytes

    path = tmp_path / "p.jpg"
    path.write_bytes(jpeg_bytes())
    assert fetch_bytes(str(path), FAST) == path.read_bytes()
    assert fetch_bytes(f"file://{path}", FAST) == path.read_bytes()
    with pytest.raises(ImageError, match="local file not found"):
        fetch_bytes(str(tmp_path / "nope.jpg"), FAST)


def test_too_small(tmp_path):
    from tests.data.conftest import jpeg_bytes

    with pytest.raises(ImageError, match="too small: 8x8"):
        decode_image(jpeg_bytes((8, 8)), FAST)
