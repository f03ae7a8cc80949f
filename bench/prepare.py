"""prepare's throughput against img2dataset's, where its time goes, a two-node run, and the driver's memory for 1M rows.

    python bench/prepare.py                       # all four parts below, in this order
    python bench/prepare.py --only profile        # ms per image and stage, one thread, and the levers
    python bench/prepare.py --only throughput [--images 4000 --repeats 3 --threads 16 --processes 2]
    python bench/prepare.py --only two-nodes      # prepare on a head + one `ray start` worker node (loopback)
    python bench/prepare.py --only plan [--plan-rows 1000000]   # driver peak RSS while planning 1M rows

img2dataset is needed by this benchmark only, never to run or test vlmtune: on first use the benchmark installs it
into an environment of its own, outputs/bench/prepare/img2dataset-venv (pip, from the package index).

Throughput: a catalog of square 1200 px product photos (JPEG quality 92, a few hundred distinct pictures under
as many distinct URLs as --images) is served by a separate process on 127.0.0.1 over HTTP/1.1. Both tools turn it
into WebDataset shards with the same work per image: download, decode, resize the longer side to 672 px only if
bigger (img2dataset's `keep_ratio` equals this on square images), JPEG quality 90, 256 rows per shard, 16 fetch
threads in each of 2 worker processes (img2dataset: processes_count=2, thread_count=16; prepare: 2 Ray tasks at
a time with data.images.fetch_threads=16 and data.images.max_per_host=16). Runs alternate between the tools,
prepare's against an already running local Ray (as on a cluster), img2dataset's timed around its `download()`
call inside a process that has already imported it. Each run writes into a fresh directory. The figure is
prepare's images/s over img2dataset's, with min / median / max over the repeats.

Planning: a CSV of --plan-rows products whose image paths point at local files (the same few hundred photos,
reused) is planned into shards by a fresh process, which prints its peak RSS (the goal is < 1.5 GB for 1M rows).
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import logging
import os
import random
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from PIL import Image, ImageFilter

BENCH_DIR = Path("outputs/bench/prepare")
SIDE, TARGET, QUALITY, ROWS_PER_SHARD = 1200, 672, 90, 256
# img2dataset lives in an environment of its own: 1.25.4 (the latest) calls albumentations functions that 1.4
# removed (every image fails to resize with a newer one), and it brings OpenCV, which vlmtune has no use for.
I2D_VENV = BENCH_DIR / "img2dataset-venv"
I2D_REQUIREMENTS = ["img2dataset==1.25.4", "albumentations<1.4"]
HEADER = ["product_code", "title", "category1_code", "category2_code", "category3_code", "full_price", "price",
          "currency_code", "imageurl"]


# ------------------------------------------------------------------------------------------- the catalog


def product_photo(index: int, side: int = SIDE) -> bytes:
    """A square product photo: a drawn product, softened and with sensor-like noise, so JPEG decoding and
    encoding cost what they cost on real photos (~150-200 KB at 1200 px) rather than on flat drawings."""
    from vlmtune.data.sample import PRODUCTS, draw_product

    rng = random.Random(index)
    product = rng.choice(PRODUCTS)
    _, colour = rng.choice(product.colours)
    image = draw_product(product, colour, rng.random() < 0.4, rng.random() < 0.4, (side, side), rng)
    noise = Image.effect_noise((side, side), 18).convert("RGB")
    image = Image.blend(image.filter(ImageFilter.GaussianBlur(1.2)), noise, 0.12)
    buf = io.BytesIO()
    image.save(buf, format="JPEG", quality=92)
    return buf.getvalue()


def photo_dir(distinct: int) -> Path:
    directory = BENCH_DIR / f"photos-{distinct}"
    if not (directory / "done").exists():
        directory.mkdir(parents=True, exist_ok=True)
        for i in range(distinct):
            (directory / f"{i}.jpg").write_bytes(product_photo(i))
        (directory / "done").touch()
    return directory


def write_catalog(path: Path, n: int, image_for: Callable[[int], str]) -> Path:
    rng = random.Random(n)
    with path.open("w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh)
        writer.writerow(HEADER)
        for i in range(n):
            writer.writerow([10_000_000 + i, f"Product {i}", "Women", "Bags", "Totes", f"{rng.randint(100, 3000)}.00",
                             "", "USD", image_for(i)])
    return path


SERVER = """
import sys, pathlib
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
photos = [p.read_bytes() for p in sorted(pathlib.Path(sys.argv[1]).glob("*.jpg"), key=lambda p: int(p.stem))]
class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    def log_message(self, *args):
        pass
    def do_GET(self):
        body = photos[int(self.path.rsplit("/", 1)[1].split(".")[0]) % len(photos)]
        self.send_response(200)
        self.send_header("Content-Type", "image/jpeg")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
server.daemon_threads = True
print(server.server_address[1], flush=True)
server.serve_forever()
"""


class PhotoServer:
    """The catalog's images over HTTP from a separate process (so serving does not share the bench's GIL)."""

    def __init__(self, photos: Path):
        self.proc = subprocess.Popen([sys.executable, "-c", SERVER, str(photos)], stdout=subprocess.PIPE, text=True)
        self.base = f"http://127.0.0.1:{self.proc.stdout.readline().strip()}"

    def close(self) -> None:
        self.proc.terminate()
        self.proc.wait()


# ------------------------------------------------------------------------------------------ the two tools

IMG2DATASET = """
import json, sys, time
import img2dataset
args = json.loads(sys.argv[1])
start = time.perf_counter()
img2dataset.download(**args)
print(time.perf_counter() - start)
"""


def img2dataset_python() -> str:
    """The interpreter of the benchmark's own img2dataset environment, created on first use."""
    python = I2D_VENV / "bin" / "python"
    if subprocess.run([str(python), "-c", "import img2dataset"], capture_output=True).returncode if python.exists() \
            else True:
        print(f"installing {' '.join(I2D_REQUIREMENTS)} into {I2D_VENV} (once)", flush=True)
        subprocess.run([sys.executable, "-m", "venv", "--clear", str(I2D_VENV)], check=True)
        subprocess.run([str(python), "-m", "pip", "install", "--quiet", *I2D_REQUIREMENTS], check=True)
    return str(python)


def run_img2dataset(catalog: Path, out: Path, threads: int, processes: int) -> tuple[float, int]:
    args = dict(url_list=str(catalog), input_format="csv", url_col="imageurl", output_format="webdataset",
                output_folder=str(out), image_size=TARGET, resize_mode="keep_ratio", resize_only_if_bigger=True,
                encode_quality=QUALITY, processes_count=processes, thread_count=threads,
                number_sample_per_shard=ROWS_PER_SHARD, timeout=15, retries=0, enable_wandb=False)
    done = subprocess.run([img2dataset_python(), "-c", IMG2DATASET, json.dumps(args)], capture_output=True, text=True,
                          env={**os.environ, "NO_ALBUMENTATIONS_UPDATE": "1"})
    if done.returncode:
        raise RuntimeError(f"img2dataset failed: {done.stderr[-2000:]}")
    seconds = float(done.stdout.strip().splitlines()[-1])
    ok = sum(json.loads(p.read_text())["successes"] for p in out.glob("*_stats.json"))
    return seconds, ok


def prepare_config(catalog: Path, out: Path, threads: int, processes: int, extra: list[str] = ()):
    from vlmtune.config import load_config

    return load_config(overrides=[f"data.catalog.source={catalog}", f"data.shards.dir={out}",
                                  f"data.images.max_side={TARGET}", f"data.images.jpeg_quality={QUALITY}",
                                  f"data.images.fetch_threads={threads}", f"data.images.max_per_host={threads}",
                                  f"data.shards.samples_per_shard={ROWS_PER_SHARD}",
                                  f"data.shards.max_concurrent_tasks={processes}", *extra])


def run_prepare(catalog: Path, out: Path, threads: int, processes: int) -> tuple[float, int]:
    from vlmtune.data.prepare import prepare

    cfg = prepare_config(catalog, out, threads, processes)
    start = time.perf_counter()
    manifest = prepare(cfg.data)
    seconds = time.perf_counter() - start
    return seconds, manifest["totals"]["train"]["samples"] + manifest["totals"]["val"]["samples"]


def throughput(args) -> None:
    import ray

    server = PhotoServer(photo_dir(args.distinct))
    try:
        with tempfile.TemporaryDirectory(dir=BENCH_DIR) as tmp:
            root = Path(tmp)
            catalog = write_catalog(root / "catalog.csv", args.images, lambda i: f"{server.base}/img/{i}.jpg")
            ray.init(num_cpus=args.processes, include_dashboard=False, log_to_driver=False)
            rates: dict[str, list[float]] = {"img2dataset": [], "prepare": []}
            tools = {"img2dataset": run_img2dataset, "prepare": run_prepare}
            for repeat in range(args.repeats + 1):  # the first round warms both up and is not counted
                for name, run in tools.items():
                    seconds, ok = run(catalog, root / f"{name}-{repeat}", args.threads, args.processes)
                    if ok != args.images:
                        raise RuntimeError(f"{name} wrote {ok} of {args.images} images")
                    shutil.rmtree(root / f"{name}-{repeat}")
                    if repeat:
                        rates[name].append(ok / seconds)
                    print(f"  round {repeat}{' (warm-up)' if not repeat else ''}: {name:<12} {ok / seconds:8.1f} img/s",
                          flush=True)
            ray.shutdown()
    finally:
        server.close()
    ratios = [p / i for p, i in zip(rates["prepare"], rates["img2dataset"], strict=True)]
    print(f"\n{args.images} images ({SIDE} px → {TARGET} px, quality {QUALITY}), {args.processes} processes x "
          f"{args.threads} threads, {os.cpu_count()} cores, {args.repeats} rounds\n")
    print(f"{'tool':<14}{'min':>10}{'median':>10}{'max':>10}   images/s")
    for name, values in rates.items():
        print(f"{name:<14}{min(values):>10.1f}{statistics.median(values):>10.1f}{max(values):>10.1f}")
    print(f"\nratio prepare/img2dataset: median {statistics.median(ratios):.2f}x "
          f"(min {min(ratios):.2f}x, max {max(ratios):.2f}x; goal ≥ 1.0x)\n")


# --------------------------------------------------------------------------------------------- profile


def profile(args) -> None:
    """Median ms per image for each stage of prepare's per-image work, one thread, then what each lever costs."""
    from vlmtune.config import ImageConfig
    from vlmtune.data.images import Fetcher, decode_image, encode_jpeg, resize_max_side
    from vlmtune.data.shards import write_shard

    cfg = ImageConfig(max_side=TARGET, jpeg_quality=QUALITY, max_per_host=args.threads)
    stages: dict[str, list[float]] = {s: [] for s in ("fetch", "decode", "resize", "encode")}

    def timed(stage: str, fn, *fn_args):
        start = time.perf_counter()
        result = fn(*fn_args)
        stages[stage].append(time.perf_counter() - start)
        return result

    server = PhotoServer(photo_dir(args.distinct))
    fetcher, samples = Fetcher(cfg), []
    try:
        for i in range(args.profile_images):
            data = timed("fetch", fetcher.fetch, f"{server.base}/img/{i}.jpg")
            image = timed("resize", resize_max_side, timed("decode", decode_image, data, cfg), TARGET, cfg.resample)
            samples.append(({"id": str(i)}, [timed("encode", encode_jpeg, image, QUALITY)]))
    finally:
        server.close()
    with tempfile.TemporaryDirectory(dir=BENCH_DIR) as tmp:
        start = time.perf_counter()
        write_shard(f"{tmp}/shard.tar", samples)
        write_ms = (time.perf_counter() - start) / len(samples) * 1000
    print(f"\nper image, one thread, {args.profile_images} photos of {SIDE} px → {TARGET} px (median ms)\n")
    for stage, times in stages.items():
        print(f"  {stage:<28}{statistics.median(times) * 1000:8.2f}")
    print(f"  {'write (tar + sha256, mean)':<28}{write_ms:8.2f}")
    print(f"  {'total':<28}{sum(statistics.median(t) for t in stages.values()) * 1000 + write_ms:8.2f}")
    levers(cfg)


def levers(cfg) -> None:
    """The alternatives the defaults were chosen from, on the same photos."""
    from vlmtune.data.images import RESAMPLE, decode_image

    photos = [product_photo(i) for i in range(12)]
    large = [product_photo(i, side=2 * SIDE) for i in range(6)]
    decoded = [decode_image(p, cfg) for p in photos]

    def median_ms(fn, items) -> float:
        times = []
        for item in items * 3:
            start = time.perf_counter()
            fn(item)
            times.append(time.perf_counter() - start)
        return statistics.median(times) * 1000

    def full_decode(data: bytes) -> None:
        Image.open(io.BytesIO(data)).load()

    def encode(optimize: bool):
        return lambda im: im.save(io.BytesIO(), format="JPEG", quality=QUALITY, optimize=optimize)

    small = [im.resize((TARGET, TARGET)) for im in decoded]
    print("\nlevers (median ms per image)\n")
    for name, resample in RESAMPLE.items():
        ms = median_ms(lambda im, r=resample: im.resize((TARGET, TARGET), r, reducing_gap=3.0), decoded)
        print(f"  resize {SIDE} → {TARGET} px, {name:<10}{ms:8.2f}")
    print(f"  decode {2 * SIDE} px, full size      {median_ms(full_decode, large):8.2f}")
    print(f"  decode {2 * SIDE} px, DCT 1/2 (draft){median_ms(lambda d: decode_image(d, cfg), large):8.2f}")
    print(f"  encode {TARGET} px, optimize=True    {median_ms(encode(True), small):8.2f}")
    print(f"  encode {TARGET} px, optimize=False   {median_ms(encode(False), small):8.2f}\n")


# ------------------------------------------------------------------------------------------- two nodes


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _node(*args: str) -> list[str]:
    """`ray start` for one node on loopback, with agent ports of its own (two nodes share this machine)."""
    return [str(Path(sys.executable).parent / "ray"), "start", "--block", "--node-ip-address=127.0.0.1",
            "--num-cpus=1", "--disable-usage-stats", f"--dashboard-agent-listen-port={_free_port()}",
            f"--dashboard-agent-grpc-port={_free_port()}", f"--metrics-export-port={_free_port()}",
            f"--runtime-env-agent-port={_free_port()}", *args]


def two_nodes(args) -> None:
    """A head and one worker node (`ray start --address`), one CPU each; prepare says where its tasks ran."""
    import ray

    from vlmtune.data.prepare import prepare

    os.environ.setdefault("RAY_AUTH_MODE", "token")  # what `ray start` uses; the driver must agree
    port, temp_dir = _free_port(), tempfile.mkdtemp(prefix="raybench-", dir="/tmp")
    nodes = [_node("--head", f"--port={port}", "--include-dashboard=false", f"--temp-dir={temp_dir}",
                   f"--ray-client-server-port={_free_port()}"), _node(f"--address=127.0.0.1:{port}")]
    procs = [subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
             for cmd in nodes]
    server = PhotoServer(photo_dir(args.distinct))
    handler = logging.StreamHandler(sys.stdout)
    logging.getLogger("vlmtune").addHandler(handler)
    logging.getLogger("vlmtune").setLevel(logging.INFO)
    try:
        ray.init(address=f"127.0.0.1:{port}", log_to_driver=False)
        while sum(n["Alive"] for n in ray.nodes()) < 2:
            time.sleep(0.2)
        with tempfile.TemporaryDirectory(dir=BENCH_DIR) as tmp:
            catalog = write_catalog(Path(tmp) / "catalog.csv", 1000, lambda i: f"{server.base}/img/{i}.jpg")
            print("\ntwo-node run: 1000 images, head + worker node, 1 CPU each", flush=True)
            start = time.perf_counter()
            prepare(prepare_config(catalog, Path(tmp) / "shards", args.threads, 2).data)
            print(f"  {1000 / (time.perf_counter() - start):.1f} img/s\n")
    finally:
        logging.getLogger("vlmtune").removeHandler(handler)
        ray.shutdown()
        server.close()
        for proc in procs:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        shutil.rmtree(temp_dir, ignore_errors=True)


# ------------------------------------------------------------------------------------------- planning

PLAN = """
import json, resource, sys, time
import vlmtune.data.prepare  # everything prepare's driver has loaded when it plans (torch, transformers, …)
from vlmtune.config import load_config
from vlmtune.data.plan import plan_shards

cfg = load_config(overrides=[f"data.catalog.source={sys.argv[1]}"]).data
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
start = time.perf_counter()
plan = plan_shards(cfg)
print(json.dumps({"seconds": time.perf_counter() - start, "rows": plan.rows, "shards": len(plan.shards),
                  "rss_after_imports_mb": before / 1024,
                  "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""


def planning(args) -> None:
    photos = photo_dir(args.distinct)
    catalog = BENCH_DIR / f"catalog-{args.plan_rows}.csv"
    if not catalog.exists():
        write_catalog(catalog, args.plan_rows, lambda i: f"{photos.name}/{i % args.distinct}.jpg")
    done = subprocess.run([sys.executable, "-c", PLAN, str(catalog)], capture_output=True, text=True, check=True)
    result = json.loads(done.stdout.strip().splitlines()[-1])
    print(f"\nplanning {result['rows']:,} catalog rows ({catalog.stat().st_size / 1e6:.0f} MB CSV) into "
          f"{result['shards']:,} shards: {result['seconds']:.1f} s")
    print(f"  driver peak RSS {result['peak_rss_mb']:.0f} MB ({result['rss_after_imports_mb']:.0f} MB after imports; "
          f"goal < 1500 MB)\n")


PARTS = {"profile": profile, "throughput": throughput, "two-nodes": two_nodes, "plan": planning}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", choices=list(PARTS), action="append", help="run only these parts (repeatable)")
    parser.add_argument("--images", type=int, default=4000)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=16)
    parser.add_argument("--processes", type=int, default=2)
    parser.add_argument("--distinct", type=int, default=200, help="distinct photos behind the catalog's URLs")
    parser.add_argument("--profile-images", type=int, default=200)
    parser.add_argument("--plan-rows", type=int, default=1_000_000)
    args = parser.parse_args()
    BENCH_DIR.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("TQDM_DISABLE", "1")  # prepare's progress bar would drown the figures
    for name in args.only or PARTS:
        PARTS[name](args)


if __name__ == "__main__":
    main()
