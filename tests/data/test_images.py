"""Image fetching and normalisation against a real loopback HTTP server."""

from __future__ import annotations

import io
import socket
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
from PIL import Image

from tests.data.conftest import jpeg_bytes, noisy_jpeg
from vlmtune.config import ImageConfig
from vlmtune.data.images import Fetcher, ImageError, decode_image, load_product_images, normalise_image

FAST = ImageConfig(timeout_s=1.0, retries=2, backoff_s=0.01, max_bytes=200_000, max_pixels=10_000_000,
                   max_side=256)


def fetch(url: str, cfg: ImageConfig = FAST) -> bytes:
    return Fetcher(cfg).fetch(url)


def test_good_image_is_resized_and_reencoded(server):
    cfg = FAST.model_copy(update={"max_bytes": 10**7})
    image = Image.open(io.BytesIO(normalise_image(fetch(server.url("/img/large.jpg"), cfg), cfg)))
    assert image.format == "JPEG" and image.size == (256, 128) and image.mode == "RGB"


def test_small_image_is_not_upscaled(server):
    image = Image.open(io.BytesIO(normalise_image(fetch(server.url("/img/good.jpg")), FAST)))
    assert image.size == (120, 80)


@pytest.mark.parametrize("resample", ["box", "bilinear", "bicubic", "lanczos"])
def test_every_resampling_filter_keeps_the_colours(resample):
    cfg = FAST.model_copy(update={"resample": resample})
    image = Image.open(io.BytesIO(normalise_image(jpeg_bytes((1000, 500), colour=(200, 30, 30)), cfg)))
    r, g, b = image.getpixel((128, 64))
    assert image.size == (256, 128) and abs(r - 200) < 6 and g < 40 and b < 40


def test_large_jpegs_are_decoded_at_a_reduced_dct_scale():
    """2000x1000 for a 256 px target: libjpeg decodes at 1/4 scale (500x250), never below the target."""
    image = decode_image(jpeg_bytes((2000, 1000)), FAST)
    assert image.size == (500, 250)
    assert decode_image(jpeg_bytes((2000, 1000)), FAST.model_copy(update={"max_side": 1200})).size == (2000, 1000)


def test_truncation_is_found_at_a_reduced_dct_scale_too():
    data = noisy_jpeg((1600, 1200))
    assert decode_image(data, FAST).size == (400, 300)
    with pytest.raises(ImageError, match="corrupt image"):
        decode_image(data[: len(data) // 2], FAST)


def test_404_is_not_retried(server):
    with pytest.raises(ImageError, match=r"^HTTP 404 Not Found$"):
        fetch(server.url("/status/404"))
    assert server.hits["/status/404"] == 1


def test_500_then_200_is_retried_until_it_succeeds(server):
    assert fetch(server.url("/flaky/good.jpg")) == server.files["good.jpg"]
    assert server.hits["/flaky/good.jpg"] == 3


def test_persistent_500_gives_up_after_the_configured_retries(server):
    with pytest.raises(ImageError, match=r"HTTP 503 Service Unavailable \(after 3 attempts\)"):
        fetch(server.url("/status/503"))
    assert server.hits["/status/503"] == 3


def test_slow_response_times_out_and_is_retried(server):
    cfg = FAST.model_copy(update={"timeout_s": 0.3, "retries": 1})
    with pytest.raises(ImageError, match=r"timed out after 0.3s \(after 2 attempts\)"):
        fetch(server.url("/slow"), cfg)
    assert server.hits["/slow"] == 2


@pytest.mark.parametrize("code", [429, 503])
def test_retry_after_is_honoured(server, code):
    """The backoff alone would retry after 0 s; the server asked for 1 s and gets it."""
    path = f"/busy/{code}/1/good.jpg"
    assert fetch(server.url(path)) == server.files["good.jpg"]
    first, second = server.times[path]
    assert 0.95 <= second - first < 3


def test_a_long_retry_after_is_cut_to_the_configured_maximum(server):
    path = "/busy/429/3600/good.jpg"
    start = time.monotonic()
    assert fetch(server.url(path), FAST.model_copy(update={"retry_after_max_s": 1})) == server.files["good.jpg"]
    assert 0.95 <= time.monotonic() - start < 3


def test_user_agent_is_configurable(server):
    fetch(server.url("/img/good.jpg"), FAST.model_copy(update={"user_agent": "acme-catalog-bot/2 (ops@acme.test)"}))
    assert server.headers["/img/good.jpg"]["User-Agent"] == "acme-catalog-bot/2 (ops@acme.test)"


def test_requests_to_one_host_are_capped(server):
    server.delay_s = 0.2
    fetcher = Fetcher(FAST.model_copy(update={"max_per_host": 2}))
    with ThreadPoolExecutor(8) as pool:
        assert all(pool.map(lambda _: fetcher.fetch(server.url("/delay/good.jpg")), range(8)))
    assert server.max_in_flight == 2


def test_one_fetcher_keeps_working_after_failures(server):
    """Error pages and oversized bodies are not left on pooled connections for the next request to read."""
    fetcher = Fetcher(FAST.model_copy(update={"max_bytes": 100_000, "retries": 0}))  # no retry to hide a bad reuse
    for path in ("/status/404", "/big", "/html", "/status/404"):
        with pytest.raises(ImageError):
            fetcher.fetch(server.url(path))
        assert fetcher.fetch(server.url("/img/good.jpg")) == server.files["good.jpg"]


def test_html_instead_of_an_image(server):
    with pytest.raises(ImageError, match=r"not an image \(got text/html\)"):
        fetch(server.url("/html"))
    data = fetch(server.url("/html-as-image"))  # server lies about the type
    with pytest.raises(ImageError, match=r"not an image \(HTML\)"):
        decode_image(data, FAST)


def test_size_cap(server):
    with pytest.raises(ImageError, match="exceeds the 200000 byte limit"):
        fetch(server.url("/big"))


def test_nobody_listening():
    with socket.socket() as s:  # a port that was free a moment ago: nothing listens there
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(ImageError, match=r"connection failed: .*refused.*\(after 2 attempts\)"):
        fetch(f"http://127.0.0.1:{port}/a.jpg", FAST.model_copy(update={"retries": 1}))


@pytest.mark.parametrize("name", ["truncated.jpg", "truncated-header.jpg"])
def test_truncated_jpeg_is_rejected(server, name):
    with pytest.raises(ImageError, match="corrupt image"):
        normalise_image(fetch(server.url(f"/img/{name}")), FAST)


def test_decompression_bomb_is_rejected_before_decoding(server):
    with pytest.raises(ImageError, match="decompression bomb: 5000x5000"):
        normalise_image(fetch(server.url("/img/bomb.png")), FAST)


@pytest.mark.parametrize("name", ["cmyk.jpg", "palette.png", "gray.png"])
def test_modes_become_rgb(server, name):
    image = decode_image(server.files[name], FAST)
    assert image.mode == "RGB"


def test_palette_transparency_is_composited_on_white(server):
    image = decode_image(server.files["palette.png"], FAST)
    assert image.getpixel((5, 5)) == (0, 0, 255)
    assert image.getpixel((30, 5)) == (255, 255, 255)  # the transparent half


def test_cmyk_colours_survive():
    image = decode_image(jpeg_bytes((20, 20), colour=(255, 0, 0, 0), mode="CMYK"), FAST)  # pure cyan
    r, g, b = image.getpixel((10, 10))
    assert r < 40 and g > 200 and b > 200


def test_exif_orientation_is_applied(server):
    image = decode_image(server.files["exif.jpg"], FAST)
    assert image.size == (30, 60)


def test_local_paths_and_missing_files(tmp_path):
    path = tmp_path / "p.jpg"
    path.write_bytes(jpeg_bytes())
    assert fetch(str(path)) == path.read_bytes()
    assert fetch(f"file://{path}") == path.read_bytes()
    with pytest.raises(ImageError, match="local file not found"):
        fetch(str(tmp_path / "nope.jpg"))
    with pytest.raises(ImageError, match="unsupported image source scheme 'ftp'"):
        fetch("ftp://shop.example/a.jpg")


def test_too_small():
    with pytest.raises(ImageError, match="too small: 8x8"):
        decode_image(jpeg_bytes((8, 8)), FAST)


def test_a_product_keeps_the_images_that_pass(server):
    sources = [server.url("/status/404"), server.url("/img/good.jpg"), server.url("/img/truncated.jpg")]
    product = load_product_images(sources, FAST, Fetcher(FAST))
    assert len(product.jpegs) == 1 and product.kept == [sources[1]]
    (first, why_first), (third, why_third) = product.failures
    assert (first, why_first) == (1, f"image {sources[0]}: HTTP 404 Not Found")
    assert third == 3 and why_third.startswith(f"image {sources[2]}: corrupt image")
