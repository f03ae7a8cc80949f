"""k8s/ offline: what `kubectl apply -k k8s/` would send, checked against the Kubernetes and KubeRay schemas,
KubeRay's operator rules and the wiring between manifests, config and image; then planted mistakes that
each check must catch (a check that passes everything proves nothing)."""

from __future__ import annotations

import copy
import gzip
import json
import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest
import yaml

from vlmtune.config import load_config

from . import k8s_checks as checks
from .kustomize_lite import KustomizeError, render

REPO = Path(__file__).resolve().parents[2]
K8S = REPO / "k8s"


@pytest.fixture(scope="module")
def rendered() -> list[dict]:
    return render(K8S)


def by(objs: list[dict], kind: str, name: str) -> dict:
    return next(o for o in objs if o["kind"] == kind and o["metadata"]["name"] == name)


def test_every_manifest_parses_and_is_part_of_the_kustomization():
    kz = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    files = sorted(p.name for p in K8S.glob("*.yaml") if p.name != "kustomization.yaml")
    used = set(kz["resources"]) | {f for g in kz["configMapGenerator"] for f in g.get("files", [])}
    assert sorted(used) == files, "every file in k8s/ is a resource or a generated ConfigMap, and nothing else"
    for name in files:
        docs = [d for d in yaml.safe_load_all((K8S / name).read_text()) if d is not None]
        assert docs, name


def test_rendering_gives_the_expected_objects(rendered):
    assert sorted((o["kind"], o["metadata"]["name"]) for o in rendered) == [
        ("ConfigMap", "vlmtune-config"), ("ConfigMap", "vlmtune-scale"), ("PersistentVolumeClaim", "vlmtune-data"),
        ("RayJob", "vlmtune-prepare"), ("RayJob", "vlmtune-train")]
    assert {o["metadata"]["namespace"] for o in rendered} == {"vlmtune"}
    steps = {o["metadata"]["name"]: o["metadata"]["labels"]["vlmtune.io/step"] for o in rendered}
    assert steps == {"vlmtune-config": "shared", "vlmtune-scale": "shared", "vlmtune-data": "shared",
                     "vlmtune-prepare": "prepare", "vlmtune-train": "train"}
    train = by(rendered, "RayJob", "vlmtune-train")
    worker = train["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]
    container = worker["template"]["spec"]["containers"][0]
    assert container["image"] == "ghcr.io/your-org/vlmtune:0.1.0"
    assert worker["replicas"] == worker["minReplicas"] == worker["maxReplicas"] == 2
    resources = container["resources"]
    assert resources["limits"]["nvidia.com/gpu"] == 8 == resources["requests"]["nvidia.com/gpu"]
    assert by(rendered, "ConfigMap", "vlmtune-config")["data"]["train.yaml"] == (K8S / "train.yaml").read_text()


def test_kustomization_settings_really_drive_the_output(tmp_path):
    """Change the one place (kustomization.yaml) and the rendered RayJob follows: replacements are live."""
    work = tmp_path / "k8s"
    shutil.copytree(K8S, work)
    kz = (work / "kustomization.yaml").read_text()
    kz = kz.replace("gpu_nodes=2", "gpu_nodes=3").replace("gpus_per_node=8", "gpus_per_node=4")
    kz = kz.replace('newTag: "0.1.0"', 'newTag: "0.2.0"').replace("namespace: vlmtune", "namespace: ml-team")
    (work / "kustomization.yaml").write_text(kz)
    objs = render(work)
    train = by(objs, "RayJob", "vlmtune-train")
    worker = train["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]
    limits = worker["template"]["spec"]["containers"][0]["resources"]["limits"]
    assert (worker["replicas"], worker["minReplicas"], worker["maxReplicas"], limits["nvidia.com/gpu"]) == (3, 3, 3, 4)
    images = {c["image"] for _, t in checks.pod_templates(train) for c in t["spec"]["containers"]}
    assert images == {"ghcr.io/your-org/vlmtune:0.2.0"}
    assert {o["metadata"]["namespace"] for o in objs} == {"ml-team"}
    # 12 GPUs no longer match cluster.num_workers=16 in train.yaml: the wiring check says so.
    assert any("request 12 GPUs" in e for e in checks.wiring_errors(objs))


def test_renderer_matches_kubectl_kustomize(rendered):
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.skip("kubectl not installed: the renderer is checked against it where it is")
    res = subprocess.run([kubectl, "kustomize", str(K8S)], capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr
    theirs = {(o["kind"], o["metadata"]["name"]): o for o in yaml.safe_load_all(res.stdout) if o}
    mine = {(o["kind"], o["metadata"]["name"]): o for o in rendered}
    assert mine == theirs


def test_renderer_refuses_what_it_does_not_implement(tmp_path):
    work = tmp_path / "k8s"
    shutil.copytree(K8S, work)
    original = (work / "kustomization.yaml").read_text()
    (work / "kustomization.yaml").write_text(original + "patches:\n  - path: extra.yaml\n")
    with pytest.raises(KustomizeError, match="patches"):
        render(work)
    (work / "kustomization.yaml").write_text(original.replace("[groupName=gpu].replicas", "[groupName=gpus].replicas"))
    with pytest.raises(KustomizeError, match="groupName=gpus"):
        render(work)
    (work / "kustomization.yaml").write_text(original.replace("NameSuffixHash: true", "NameSuffixHash: false"))
    with pytest.raises(KustomizeError, match="hash"):
        render(work)


def test_core_objects_validate_against_kubernetes_schemas(rendered):
    """ConfigMaps, the PVC, and every pod template in the RayJobs (Secret references included), strict."""
    errors = [e for o in rendered for e in checks.core_errors(o)]
    assert errors == []
    assert {o["kind"] for o in rendered if o["kind"] != "RayJob"} == {"ConfigMap", "PersistentVolumeClaim"}


def test_rayjobs_validate_against_kuberay_crds(rendered):
    where, schemas = checks.schemas()
    print(f"KubeRay schemas from {where}: {schemas['source'].splitlines()[1]}")
    jobs = [o for o in rendered if o["kind"] == "RayJob"]
    assert len(jobs) == 2
    assert [e for o in jobs for e in checks.crd_errors(o)] == []


def test_vendored_schemas_validate_too(rendered):
    """The copy in tests/infra/data is what runs where ../shared is absent: it must load and agree."""
    where, schemas = checks.schemas(vendored=True)
    assert where.endswith("kuberay-crd-schemas.json.gz") and "ray-project/kuberay" in schemas["source"]
    source_md = (Path(where).parent / "SOURCE.md").read_text()
    assert schemas["source"].splitlines()[1] in source_md
    assert [e for o in rendered if o["kind"] == "RayJob" for e in checks.crd_errors(o, vendored=True)] == []


def test_vendored_schemas_equal_the_shared_crds():
    if not checks.SHARED_CRDS.is_dir():
        pytest.skip(f"{checks.SHARED_CRDS} absent: nothing to compare the vendored copy with")
    vendored = json.loads(gzip.decompress(checks.VENDORED.read_bytes()))
    assert vendored == checks.extract_schemas(checks.SHARED_CRDS), "re-vendor: python -m tests.infra.k8s_checks"


def test_operator_rules(rendered):
    assert [e for o in rendered for e in checks.operator_errors(o)] == []


def test_wiring(rendered):
    assert checks.wiring_errors(rendered) == []


def test_k8s_config_is_a_valid_vlmtune_config():
    cfg = load_config(K8S / "train.yaml")
    assert cfg.data.catalog.source == "DBQ/Burberry.Product.prices.United.States"
    assert cfg.model.name_or_path == "microsoft/Phi-3-vision-128k-instruct" and cfg.model.lora.enabled
    assert cfg.cluster.use_gpu and cfg.cluster.gpus_per_worker == 1
    for path in (cfg.cluster.storage_path, cfg.data.shards.dir, cfg.eval.output_dir):
        assert path.startswith("/data/"), path


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


def _gpus(objs, n):
    _worker(objs)["resources"]["limits"]["nvidia.com/gpu"] = n
    _worker(objs)["resources"]["requests"]["nvidia.com/gpu"] = n


SECRET = {"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "vlmtune-secrets"},
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
    "ConfigMap value not a string": ("core", lambda o: by(o, "ConfigMap", "vlmtune-scale")["data"].update(gpu_nodes=2)),
    "secretKeyRef without key": ("core", lambda o: _worker(o)["env"][-1]["valueFrom"]["secretKeyRef"].pop("key")),
    "unknown field in a volume": ("core", lambda o: _head(o)["volumes"][0].update(emptyDirr={})),
    # wiring between manifests, config and image
    "entrypoint reads another config": ("wiring", lambda o: _spec(o).update(
        entrypoint="python jobs/train.py --config /config/phi3v.yaml")),
    "config mounted elsewhere": ("wiring", lambda o: _head(o)["containers"][0]["volumeMounts"][2].update(
        mountPath="/etc/vlmtune")),
    "entrypoint script missing": ("wiring", lambda o: _spec(o).update(
        entrypoint="python jobs/finetune.py --config /config/train.yaml")),
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
def test_planted_mistake_is_rejected(rendered, mistake):
    checker, mutate = PLANTED[mistake]
    objs = copy.deepcopy(rendered)
    mutate(objs)
    run = {
        "crd": lambda: [e for o in objs if o["kind"] == "RayJob" for e in checks.crd_errors(o)],
        "operator": lambda: [e for o in objs for e in checks.operator_errors(o)],
        "core": lambda: [e for o in objs for e in checks.core_errors(o)],
        "wiring": lambda: checks.wiring_errors(objs),
    }[checker]
    errors = run()
    assert errors, f"{checker} check accepted: {mistake}"
    print(f"{mistake}: {errors[0][:160]!r}")
