"""A loopback HTTP server that misbehaves on purpose, a loopback S3 server, and image factories for the data
tests."""

from __future__ import annotations

import io
import os
import socket
import threading
import time
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from PIL import Image


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# s3:// in these tests is a moto server on loopback. Shards are written by Ray tasks, so the worker processes
# must know the endpoint too: they inherit it from this environment, set before the session's Ray starts.
S3_PORT = _free_port()
os.environ["FSSPEC_S3_ENDPOINT_URL"] = f"http://127.0.0.1:{S3_PORT}"
for _key, _value in {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
                     "AWS_DEFAULT_REGION": "us-east-1"}.items():
    os.environ.setdefault(_key, _value)


def jpeg_bytes(size=(64, 48), colour=(200, 30, 30), mode="RGB", fmt="JPEG", **save) -> bytes:
    buf = io.BytesIO()
    Image.new(mode, size, colour).save(buf, format=fmt, **save)
    return buf.getvalue()


def noisy_jpeg(size=(300, 200)) -> bytes:
    """Random pixels, so the entropy-coded data is large enough to cut in the middle."""
    buf = io.BytesIO()
    Image.effect_noise(size, 80).convert("RGB").save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def palette_png_with_transparency() -> bytes:
    image = Image.new("P", (40, 40), 0)
    image.putpalette([255, 0, 0, 0, 0, 255] + [0] * 762)
    image.paste(1, (0, 0, 20, 40))
    buf = io.BytesIO()
    image.save(buf, format="PNG", transparency=0)
    return buf.getvalue()


def exif_rotated_jpeg() -> bytes:
    """A 60x30 image whose EXIF orientation (6 = rotate 90° clockwise) makes it 30x60 when displayed."""
    image = Image.new("RGB", (60, 30), (0, 128, 0))
    exif = Image.Exif()
    exif[0x0112] = 6
    buf = io.BytesIO()
    image.save(buf, format="JPEG", exif=exif.tobytes())
    return buf.getvalue()


def bomb_png(side=5000) -> bytes:
    buf = io.BytesIO()
    Image.new("L", (side, side), 0).save(buf, format="PNG", optimize=True)
    return buf.getvalue()


class CatalogServer:
    """Routes: /img/<name> from `files`; /status/<code>; /flaky/<name> (500 twice, then the image);
    /delay/<name> (the image after `delay_s`); /slow (sleeps longer than any test timeout); /html;
    /big (larger than the size cap); /busy/<code>/<seconds>/<name> (<code> with `Retry-After: <seconds>` on
    the first request, then the image). It records each request's time and headers, and the most requests
    it ever had in flight at once."""

    def __init__(self):
        self.files: dict[str, bytes] = {}
        self.hits: Counter = Counter()
        self.times: dict[str, list[float]] = {}
        self.headers: dict[str, dict] = {}
        self.flaky_failures = 2
        self.delay_s = 0.1
        self.in_flight = self.max_in_flight = 0
        lock = threading.Lock()
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"  # keep-alive, as image CDNs do: clients reuse their connections

            def log_message(self, *args):
                pass

            def _send(self, code: int, body: bytes, ctype: str = "image/jpeg"):
                self.send_response(code)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def do_GET(self):
                with lock:
                    server.in_flight += 1
                    server.max_in_flight = max(server.max_in_flight, server.in_flight)
                try:
                    self.route()
                finally:
                    with lock:
                        server.in_flight -= 1

            def route(self):
                path = self.path
                server.hits[path] += 1
                server.times.setdefault(path, []).append(time.monotonic())
                server.headers[path] = dict(self.headers)
                if path.startswith("/busy/"):
                    _, _, code, seconds, name = path.split("/")
                    if server.hits[path] == 1:
                        self.send_response(int(code))
                        self.send_header("Retry-After", seconds)
                        self.send_header("Content-Length", "0")
                        self.end_headers()
                        return None
                    return self._send(200, server.files[name])
                if path.startswith("/img/") and path[5:] in server.files:
                    return self._send(200, server.files[path[5:]])
                if path.startswith("/status/"):
                    return self._send(int(path.rsplit("/", 1)[1]), b"error page", "text/plain")
                if path.startswith("/flaky/"):
                    if server.hits[path] <= server.flaky_failures:
                        return self._send(500, b"try again", "text/plain")
                    return self._send(200, server.files[path[7:]])
                if path.startswith("/delay/"):
                    time.sleep(server.delay_s)
                    return self._send(200, server.files[path[7:]])
                if path == "/slow":
                    time.sleep(3)
                    return self._send(200, server.files.get("good.jpg", b""))
                if path == "/html":
                    return self._send(200, b"<!DOCTYPE html><html><body>Not found</body></html>", "text/html")
                if path == "/html-as-image":
                    return self._send(200, b"<!DOCTYPE html><html><body>oops</body></html>", "image/jpeg")
                if path == "/big":
                    return self._send(200, b"\xff" * 300_000)
                return self._send(404, b"not found", "text/plain")

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()
        self.base = f"http://127.0.0.1:{self.httpd.server_address[1]}"

    def url(self, path: str) -> str:
        return self.base + path

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def server():
    srv = CatalogServer()
    srv.files.update({
        "good.jpg": jpeg_bytes((120, 80)),
        "truncated.jpg": noisy_jpeg()[:-3000],
        "truncated-header.jpg": noisy_jpeg()[:300],
        "cmyk.jpg": jpeg_bytes((50, 40), colour=(0, 255, 255, 0), mode="CMYK"),
        "palette.png": palette_png_with_transparency(),
        "gray.png": jpeg_bytes((50, 40), colour=128, mode="L", fmt="PNG"),
        "exif.jpg": exif_rotated_jpeg(),
        "bomb.png": bomb_png(),
        "large.jpg": jpeg_bytes((2000, 1000)),
    })
    yield srv
    srv.close()


@pytest.fixture(scope="session")
def s3_bucket():
    """An empty bucket on a moto S3 server at FSSPEC_S3_ENDPOINT_URL; → 's3://<bucket>'."""
    import fsspec
    from moto.server import ThreadedMotoServer

    fsspec.config.set_conf_env(fsspec.config.conf)  # in case fsspec was imported before the variable was set
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=S3_PORT, verbose=False)
    server.start()
    fsspec.filesystem("s3").mkdir("vlmtune-test")
    yield "s3://vlmtune-test"
    server.stop()
