"""Shared fixtures: one local Ray for the whole session, W&B offline, and no hub access."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Ray Train's controller polls its workers every 2 s (Ray's default), so a finished fit returned ~4 s after
# its last step. The suite runs dozens of short fits; every cluster it starts inherits 0.5 s polls.
os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.5")
# Every worker group start also starts Ray Train's preemption watcher, an actor process (~2 CPU-seconds of
# imports, on a 2-core machine ~1 s of each start) that polls node drains. No test drains a node (the elastic
# test SIGKILLs one) and vlmtune reads no drain notices (see train/loop.py, Requests), so tests go without it.
os.environ.setdefault("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")
# S3 tests talk to a local moto server (the s3_server fixture). Ray Train's workers sign their requests with
# whatever credentials the cluster started here inherits, so it gets test ones (never used elsewhere).
os.environ.setdefault("AWS_ACCESS_KEY_ID", "testing")
os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "testing")
os.environ.setdefault("AWS_EC2_METADATA_DISABLED", "true")


LOCAL_RAY = dict(address="local", num_cpus=4, include_dashboard=False, log_to_driver=False)


@pytest.fixture(scope="session")
def ray_local():
    """A real local Ray cluster shared by the tests that need one (starting Ray costs ~10 s)."""
    import ray

    if not ray.is_initialized():
        ray.init(**LOCAL_RAY)
    yield ray


FAILED = pytest.StashKey[bool]()


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_makereport(item, call):
    report = yield
    if report.when == "call" and report.failed:
        item.stash[FAILED] = True
    return report


@pytest.fixture(autouse=True)
def fresh_ray_after_a_failure(request):
    """A test that failed part-way (an assertion, a timeout) can leave a Ray Train controller, its workers
    or an actor pool holding the shared cluster's CPUs; every later fit would wait for them forever. So
    after a failure the next test gets a new local cluster."""
    yield
    ray = sys.modules.get("ray")
    if request.node.stash.get(FAILED, False) and ray is not None and ray.is_initialized():
        ray.shutdown()
        ray.init(**LOCAL_RAY)


@pytest.fixture(scope="session")
def sample_shards(ray_local, tmp_path_factory) -> str:
    """Shards of a 120-product synthetic catalog (5 train shards, 1 val shard), prepared with Ray Data."""
    from vlmtune.config import load_config
    from vlmtune.data.prepare import prepare

    out = tmp_path_factory.mktemp("sample") / "shards"
    cfg = load_config(overrides=["data.catalog.sample_size=120", f"data.shards.dir={out}",
                                 "data.shards.samples_per_shard=24", "data.shards.val_fraction=0.15",
                                 "data.images.max_side=128"])
    prepare(cfg.data)
    return str(out)


@pytest.fixture
def s3_server(tmp_path):
    """A real S3 API on loopback (moto's server) with an empty bucket `vlmtune`; yields its endpoint,
    host:port. Stopped, with everything in it, at the end of the test."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    log = (tmp_path / "moto.log").open("w")
    server = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)], stdout=log,
                              stderr=subprocess.STDOUT)
    endpoint = f"127.0.0.1:{port}"
    try:
        deadline = time.time() + 60
        while True:
            try:
                # not listening yet: refused at once, and retried; listening: its first request imports moto's S3
                # backend, which took over 2 s on a busy 2-core machine, so the answer is waited for
                urllib.request.urlopen(urllib.request.Request(f"http://{endpoint}/vlmtune", method="PUT"), timeout=30)
                break
            except (urllib.error.URLError, ConnectionError):
                if time.time() > deadline or server.poll() is not None:
                    raise RuntimeError(f"moto did not start: {(tmp_path / 'moto.log').read_text()[-2000:]}") from None
                time.sleep(0.2)
        yield endpoint
    finally:
        server.terminate()
        server.wait(timeout=30)
        log.close()
