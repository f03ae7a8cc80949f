"""Offline checks of the k8s/ manifests, each returning a list of errors (empty = passes).

- kubectl_load: the objects `kubectl apply -f DIR` would send, in its order, read by kubectl's own loader.
- object_errors: one object as the API server would take it: a known built-in or KubeRay kind, valid
  against its schema (crd_errors or core_errors) and KubeRay's rules (operator_errors).
- crd_errors: RayJob/RayCluster against KubeRay's CRD openAPIV3Schema, strict like `kubectl apply`'s
  server-side field validation: unknown fields are errors, int32/int64 ranges, list-map key uniqueness,
  nullable. Fields guarded by CEL rules (x-kubernetes-validations) cannot be evaluated offline and are
  reported instead of silently accepted.
- operator_errors: the rules KubeRay's operator enforces beyond the schema (ray-operator
  controllers/ray/utils/validation.go): names, submissionMode, replicas, runtimeEnvYAML, TTL, auth.
- core_errors: built-in kinds (and every pod template inside the RayJobs) against the Kubernetes
  OpenAPI schemas shipped with kubernetes-validate, strict.
- wiring_errors: that the pieces fit together: namespace, entrypoint commands and config path, ConfigMaps
  and volume claims, image, GPUs vs the vlmtune config, deadlines, storage, secrets, security context.

Schemas come from ../shared/k8s/crds next to the repository when present, else from the vendored
tests/infra/data/kuberay-crd-schemas.json.gz (regenerate: python -m tests.infra.k8s_checks --vendor DIR).
"""

from __future__ import annotations

import argparse
import copy
import gzip
import json
import os
import re
import shlex
import subprocess
from collections.abc import Iterator
from functools import cache
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import yaml

from vlmtune.config import Config

from .k8s_render import kubectl

REPO = Path(__file__).resolve().parents[2]
SHARED_CRDS = REPO.parent / "shared" / "k8s" / "crds"
VENDORED = Path(__file__).with_name("data") / "kuberay-crd-schemas.json.gz"
CRD_FILES = {"RayJob": "ray.io_rayjobs.yaml", "RayCluster": "ray.io_rayclusters.yaml"}
API_VERSION = "ray.io/v1"
K8S_VERSIONS = ("1.29", kubernetes_validate.latest_version())  # oldest and newest we claim to support

# KubeRay: MaxRayClusterNameLength = 53; RayJob names get a 6-character suffix for their cluster.
MAX_RAYJOB_NAME = 47
MAX_RAYCLUSTER_NAME = 53
SUBMISSION_MODES = ("K8sJobMode", "HTTPMode", "InteractiveMode", "SidecarMode")
DNS1035 = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")
SECRET_NAME = re.compile(r"(KEY|TOKEN|SECRET|PASSWORD|PASSWD|CREDENTIAL)", re.IGNORECASE)
# Kinds that live outside namespaces (the ones a deployment of vlmtune could plausibly contain).
CLUSTER_SCOPED = {"Namespace", "PersistentVolume", "StorageClass", "ClusterRole", "ClusterRoleBinding",
                  "PriorityClass", "CustomResourceDefinition"}


# ------------------------------------------------------------------------------ kubectl apply -f loading


class KubectlError(RuntimeError):
    pass


NOOP_LABEL = "vlmtune.io/not-a-label"


def kubectl_load(directory: Path) -> list[dict]:
    """The objects `kubectl apply -f DIRECTORY` would send, in the order it would send them.

    This is kubectl's own file loader (the -f handling all kubectl commands share: the *.json, *.yaml and
    *.yml files directly in the folder, in name order, split into documents, parsed as kubectl parses
    YAML), run offline: `kubectl label --local` needs no API server, unlike `apply --dry-run=client`. It
    removes a label no object has, so objects come back as loaded (an empty labels map added where there
    was none is dropped here). A file kubectl cannot load (no kind, bad YAML) raises KubectlError with
    kubectl's message. KUBECONFIG points nowhere: no cluster is ever contacted."""
    res = subprocess.run([kubectl(), "label", "--local", "-f", str(directory), "-o", "json", f"{NOOP_LABEL}-"],
                         capture_output=True, text=True, timeout=60, env={**os.environ, "KUBECONFIG": os.devnull})
    if res.returncode != 0:
        raise KubectlError(res.stderr.strip() or res.stdout.strip())
    text, decoder, objs, i = res.stdout, json.JSONDecoder(), [], 0
    while True:  # one JSON object per loaded document, separated by newlines
        i = len(text) - len(text[i:].lstrip())
        if i == len(text):
            break
        obj, i = decoder.raw_decode(text, i)
        if obj.get("metadata", {}).get("labels") == {}:
            del obj["metadata"]["labels"]
        objs.append(obj)
    return objs


# ------------------------------------------------------------------------------------------ CRD schemas


def extract_schemas(crd_dir: Path) -> dict:
    out: dict[str, Any] = {"source": (crd_dir / "SOURCE.md").read_text().strip()}
    for kind, name in CRD_FILES.items():
        loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)  # libyaml: 10x faster on these 1-2 MB files
        crd = yaml.load((crd_dir / name).read_text(), Loader=loader)
        assert crd["spec"]["names"]["kind"] == kind
        version = next(v for v in crd["spec"]["versions"] if v["name"] == API_VERSION.split("/")[1])
        out[kind] = version["schema"]["openAPIV3Schema"]
    return out


def vendor(crd_dir: Path, dest: Path = VENDORED) -> None:
    blob = json.dumps(extract_schemas(crd_dir), sort_keys=True, separators=(",", ":")).encode()
    dest.parent.mkdir(parents=True, exist_ok=True)
    with open(dest, "wb") as raw, gzip.GzipFile(fileobj=raw, mode="wb", mtime=0, compresslevel=9) as gz:
        gz.write(blob)


@cache
def schemas(vendored: bool = False) -> tuple[str, dict]:
    """(where they came from, {kind: openAPIV3Schema, 'source': SOURCE line}): the CRDs next to the
    repository when present, else (or when asked) the vendored copy."""
    if SHARED_CRDS.is_dir() and not vendored:
        return str(SHARED_CRDS), extract_schemas(SHARED_CRDS)
    return str(VENDORED), json.loads(gzip.decompress(VENDORED.read_bytes()))


OBJECT_META = {
    "type": "object",
    "properties": {
        "name": {"type": "string"}, "generateName": {"type": "string"}, "namespace": {"type": "string"},
        "labels": {"type": "object", "additionalProperties": {"type": "string"}},
        "annotations": {"type": "object", "additionalProperties": {"type": "string"}},
        "finalizers": {"type": "array", "items": {"type": "string"}},
        "ownerReferences": {"type": "array", "items": {"type": "object"}},
    },
    "additionalProperties": False,
}


def _strict(s: Any) -> Any:
    """Structural schema -> JSON Schema that rejects what the API server's strict field validation rejects."""
    if isinstance(s, list):
        return [_strict(x) for x in s]
    if not isinstance(s, dict):
        return s
    s = {k: (_strict(v) if k in ("properties", "items", "additionalProperties", "anyOf", "allOf", "oneOf", "not")
             else v) for k, v in s.items()}
    if "properties" in s:
        s["properties"] = {k: _strict(v) for k, v in s["properties"].items()}
    if s.pop("nullable", False) and "type" in s:
        s["type"] = [s["type"], "null"]
    if s.get("x-kubernetes-int-or-string") and "type" not in s and "anyOf" not in s:
        s["anyOf"] = [{"type": "integer"}, {"type": "string"}]
    if s.get("type") == "object" and "additionalProperties" not in s and not s.get(
            "x-kubernetes-preserve-unknown-fields"):
        s["additionalProperties"] = False
    return s


def _fmt(validator, fmt, instance, schema):
    bounds = {"int32": 2**31, "int64": 2**63}
    if fmt in bounds and isinstance(instance, int) and not -bounds[fmt] <= instance < bounds[fmt]:
        yield jsonschema.ValidationError(f"{instance} does not fit {fmt}")


def _list_type(validator, kind, instance, schema):
    if not isinstance(instance, list):
        return
    if kind == "set" and len({json.dumps(x, sort_keys=True) for x in instance}) != len(instance):
        yield jsonschema.ValidationError("duplicate items in a list of type set")
    if kind == "map":
        keys = schema.get("x-kubernetes-list-map-keys", [])
        props = schema.get("items", {}).get("properties", {})
        seen = set()
        for item in instance:
            key = tuple(item.get(k, props.get(k, {}).get("default")) for k in keys)
            if key in seen:
                yield jsonschema.ValidationError(f"duplicate list-map key {dict(zip(keys, key, strict=True))}")
            seen.add(key)


def _cel(validator, rules, instance, schema):
    yield jsonschema.ValidationError("CEL rule(s) not evaluated offline, check by hand: "
                                     + "; ".join(r.get("message", r["rule"]) for r in rules))


StrictValidator = jsonschema.validators.extend(jsonschema.Draft7Validator, {
    "format": _fmt, "x-kubernetes-list-type": _list_type, "x-kubernetes-validations": _cel})


@cache
def _crd_validator(kind: str, vendored: bool) -> jsonschema.protocols.Validator:
    schema = _strict(copy.deepcopy(schemas(vendored)[1][kind]))
    schema["properties"]["metadata"] = OBJECT_META
    schema["required"] = sorted({*schema.get("required", []), "apiVersion", "kind", "metadata", "spec"})
    return StrictValidator(schema)


def crd_errors(obj: dict, vendored: bool = False) -> list[str]:
    kind = obj.get("kind")
    if kind not in CRD_FILES:
        return [f"{kind}: not a KubeRay kind"]
    errors = [] if obj.get("apiVersion") == API_VERSION else [f"apiVersion must be {API_VERSION}"]
    for err in sorted(_crd_validator(kind, vendored).iter_errors(obj), key=lambda e: list(map(str, e.absolute_path))):
        errors.append(f"{kind} {'.'.join(map(str, err.absolute_path)) or '<root>'}: {err.message[:300]}")
    if kind == "RayJob" and isinstance(obj.get("spec", {}).get("rayClusterSpec"), dict):
        # The RayCluster KubeRay will create from this RayJob must be valid under the RayCluster CRD too.
        cluster = {"apiVersion": API_VERSION, "kind": "RayCluster",
                   "metadata": {"name": obj["metadata"].get("name", "x")}, "spec": obj["spec"]["rayClusterSpec"]}
        errors += [f"as RayCluster: {e}" for e in crd_errors(cluster, vendored) if not e.startswith("apiVersion")]
    return errors


# -------------------------------------------------------------------------------------- operator rules


def _groups(spec: dict) -> Iterator[tuple[str, dict]]:
    yield "head", spec.get("headGroupSpec", {})
    for group in spec.get("workerGroupSpecs", []) or []:
        yield group.get("groupName", "?"), group


def _version(text: str) -> tuple[int, ...] | None:
    m = re.fullmatch(r"v?(\d+)\.(\d+)(?:\.(\d+))?", str(text))
    return tuple(int(x or 0) for x in m.groups()) if m else None


def cluster_spec_errors(spec: dict) -> list[str]:
    errors = []
    autoscaling = bool(spec.get("enableInTreeAutoscaling"))
    for name, group in _groups(spec):
        if not group.get("template", {}).get("spec", {}).get("containers"):
            errors.append(f"{name} group: needs at least one container")
        params = group.get("rayStartParams", {}) or {}
        if any(params.get(k) for k in ("num-cpus", "num-gpus", "memory", "resources")) and group.get("resources"):
            errors.append(f"{name} group: resources set both in rayStartParams and resources")
        if "labels" in params:
            errors.append(f"{name} group: rayStartParams['labels'] is not supported; use the labels field")
        if name == "head":
            continue
        lo, hi, n = group.get("minReplicas"), group.get("maxReplicas"), group.get("replicas")
        if not autoscaling and (lo is None or hi is None):
            errors.append(f"worker group {name}: minReplicas and maxReplicas are required without autoscaling")
        if (lo is not None and lo < 0) or (hi is not None and hi < 0):
            errors.append(f"worker group {name}: negative min/maxReplicas")
        if lo is not None and hi is not None and lo > hi:
            errors.append(f"worker group {name}: minReplicas {lo} > maxReplicas {hi}")
        # KubeRay silently clamps replicas into [min, max]: the GPU count would not be what the file says.
        if n is not None and lo is not None and hi is not None and not lo <= n <= hi:
            errors.append(f"worker group {name}: replicas {n} outside [minReplicas {lo}, maxReplicas {hi}]")
        if group.get("numOfHosts", 1) < 1:
            errors.append(f"worker group {name}: numOfHosts must be >= 1")
    auth = spec.get("authOptions") or {}
    if auth.get("mode", "disabled") == "token":
        version = _version(spec.get("rayVersion", ""))
        if version is None or version < (2, 52, 0):
            errors.append(f"authOptions.mode token needs rayVersion >= 2.52.0, got {spec.get('rayVersion')!r}")
    if auth.get("enableK8sTokenAuth"):
        errors.append("authOptions.enableK8sTokenAuth is not supported for RayJob")
    return errors


def operator_errors(obj: dict) -> list[str]:
    if obj.get("kind") != "RayJob":
        return []
    errors = []
    meta = obj.get("metadata", {})
    # generateName gets 5 random characters appended by the API server.
    name = meta.get("name") or (meta["generateName"] + "x" * 5 if meta.get("generateName") else "")
    if len(name) > MAX_RAYJOB_NAME:
        errors.append(f"RayJob name {name!r} is longer than {MAX_RAYJOB_NAME} characters")
    if not DNS1035.match(name):
        errors.append(f"RayJob name {name!r} is not a DNS-1035 label")
    spec = obj.get("spec", {})
    mode = spec.get("submissionMode", "K8sJobMode")
    if mode not in SUBMISSION_MODES:
        errors.append(f"submissionMode {mode!r} is not one of {', '.join(SUBMISSION_MODES)}")
    shutdown, ttl = spec.get("shutdownAfterJobFinishes", False), spec.get("ttlSecondsAfterFinished", 0)
    if ttl < 0:
        errors.append("ttlSecondsAfterFinished must be >= 0")
    if ttl > 0 and not shutdown:
        errors.append("ttlSecondsAfterFinished needs shutdownAfterJobFinishes: true")
    if spec.get("suspend") and not shutdown:
        errors.append("suspend needs shutdownAfterJobFinishes: true")
    backoff = spec.get("backoffLimit")
    if backoff is not None and backoff < 0:
        errors.append("backoffLimit must be >= 0")
    if mode == "InteractiveMode" and backoff:
        errors.append("backoffLimit is incompatible with InteractiveMode")
    for key in ("activeDeadlineSeconds", "preRunningDeadlineSeconds"):
        if key in spec and spec[key] <= 0:
            errors.append(f"{key} must be positive")
    cluster = spec.get("rayClusterSpec")
    if not cluster and not spec.get("clusterSelector"):
        errors.append("one of rayClusterSpec or clusterSelector is required")
    if mode == "SidecarMode":
        if "submitterPodTemplate" in spec or "submitterConfig" in spec:
            errors.append("SidecarMode supports neither submitterPodTemplate nor submitterConfig")
        policy = (cluster or {}).get("headGroupSpec", {}).get("template", {}).get("spec", {}).get("restartPolicy")
        if policy not in (None, "Never"):
            errors.append("SidecarMode needs the head restartPolicy unset or Never")
    if mode == "K8sJobMode" and "submitterPodTemplate" in spec:
        policy = spec["submitterPodTemplate"].get("spec", {}).get("restartPolicy")
        if policy not in ("Never", "OnFailure"):
            errors.append("the submitter pod template is a Job's: restartPolicy must be Never or OnFailure")
    try:
        env = yaml.safe_load(spec.get("runtimeEnvYAML", "") or "{}")
        if not isinstance(env, dict):
            errors.append("runtimeEnvYAML must be a YAML mapping")
    except yaml.YAMLError as e:
        errors.append(f"runtimeEnvYAML is not valid YAML: {e}")
    if cluster:
        errors += cluster_spec_errors(cluster)
    return errors


# ----------------------------------------------------------------------------------- built-in schemas


def pod_templates(obj: dict) -> Iterator[tuple[str, dict]]:
    """(where, PodTemplateSpec) for every pod a RayJob will create."""
    spec = obj.get("spec", {})
    for name, group in _groups(spec.get("rayClusterSpec", {}) or {}):
        if "template" in group:
            yield f"{name} group", group["template"]
    if "submitterPodTemplate" in spec:
        yield "submitter", spec["submitterPodTemplate"]


def core_errors(obj: dict) -> list[str]:
    """Built-in objects as themselves; RayJobs through their pod templates (as v1 PodTemplate objects)."""
    if obj.get("kind") in CRD_FILES:
        targets = [(where, {"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": "t"}, "template": t})
                   for where, t in pod_templates(obj)]
    else:
        targets = [(obj.get("kind", "?"), obj)]
    errors = []
    for where, target in targets:
        for version in K8S_VERSIONS:
            try:
                kubernetes_validate.validate(target, version, strict=True)
            except kubernetes_validate.ValidationError as e:
                errors.append(f"{where} (Kubernetes {version}): {'.'.join(map(str, e.path))}: {e.message[:300]}")
            except kubernetes_validate.SchemaNotFoundError:
                kind = f"{target.get('apiVersion')}/{target['kind']}"
                errors.append(f"{where}: {kind} is neither a Kubernetes {version} nor a KubeRay kind")
    return errors


def object_errors(obj: dict) -> list[str]:
    """What the API server (with KubeRay's CRDs) and KubeRay's operator would reject in one object."""
    if obj.get("kind") in CRD_FILES:
        return crd_errors(obj) + core_errors(obj) + operator_errors(obj)
    return core_errors(obj)


# --------------------------------------------------------------------------------------------- wiring


def _containers(template: dict) -> list[dict]:
    spec = template.get("spec", {})
    return list(spec.get("containers", [])) + list(spec.get("initContainers", []))


def _quantity(value: Any) -> float:
    text = str(value)
    suffixes = {"Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "m": 1e-3, "k": 1e3, "M": 1e6, "G": 1e9, "T": 1e12}
    for suffix, factor in suffixes.items():
        if text.endswith(suffix):
            return float(text[: -len(suffix)]) * factor
    return float(text)


def entrypoint_commands(entrypoint: str) -> tuple[list[list[str]], list[str]]:
    """(the commands a RayJob's entrypoint runs, in order; errors).

    KubeRay pastes the entrypoint unquoted into the submitter's bash command line (`ray job submit ... --
    <entrypoint> ; fi ; ray job logs ...`), so a shell operator outside quotes would end `ray job submit`
    there and run the rest in the submitter pod. Several commands therefore go in one quoted
    `bash -c '<command> && <command>'`; Ray quotes it again for the head's shell (shlex.join)."""
    def words(text: str) -> list[str]:
        lex = shlex.shlex(text, posix=True, punctuation_chars=True)
        lex.whitespace_split = True
        return list(lex)

    def is_operator(word: str) -> bool:
        return bool(word) and set(word) <= set("();<>|&")

    try:
        outer = words(entrypoint)
    except ValueError as e:
        return [], [f"entrypoint does not parse as a shell command line: {e}"]
    if not outer:
        return [], ["entrypoint is empty"]
    if ops := [w for w in outer if is_operator(w)]:
        return [], [f"entrypoint has shell operators {ops} outside quotes: KubeRay puts it unquoted into the "
                    "submitter's `ray job submit` command line, so they would act in the submitter pod; "
                    "wrap several commands in one bash -c '... && ...'"]
    if outer[0] not in ("bash", "sh") or outer[1:2] != ["-c"]:
        return [outer], []
    if len(outer) != 3:
        return [], [f"entrypoint {outer[0]} -c takes exactly one quoted script, got {outer[2:]}"]
    commands: list[list[str]] = [[]]
    for word in words(outer[2]):
        if word == "&&":
            commands.append([])
        elif is_operator(word):
            return [], [f"entrypoint script: only `&&` chains commands (each runs if the previous one "
                        f"succeeded), found {word!r}"]
        else:
            commands[-1].append(word)
    if not all(commands):
        return [], ["entrypoint script has an empty command around `&&`"]
    return commands, []


def config_path(command: list[str]) -> str | None:
    for i, word in enumerate(command):
        if word == "--config" and i + 1 < len(command):
            return command[i + 1]
        if word.startswith("--config="):
            return word.split("=", 1)[1]
    return None


def config_of(objs: list[dict], rayjob: dict, path: str) -> tuple[dict | None, str | None, list[str]]:
    """(the ConfigMap a config path of the entrypoint is read from, its key, errors)."""
    head = rayjob["spec"].get("rayClusterSpec", {}).get("headGroupSpec", {}).get("template", {})
    volumes = {v["name"]: v for v in head.get("spec", {}).get("volumes", [])}
    for container in head.get("spec", {}).get("containers", [])[:1]:
        for mount in container.get("volumeMounts", []):
            prefix = mount["mountPath"].rstrip("/") + "/"
            volume = volumes.get(mount["name"], {})
            if path.startswith(prefix) and "configMap" in volume:
                key = path[len(prefix):]
                items = {i["path"]: i["key"] for i in volume["configMap"].get("items", [])}
                key = items.get(key, key) if items else key
                name = volume["configMap"]["name"]
                cms = [o for o in objs if o["kind"] == "ConfigMap" and o["metadata"]["name"] == name]
                if not cms:
                    return None, key, [f"ConfigMap {name} (mounted at {mount['mountPath']}) is not in the manifests"]
                if key not in cms[0].get("data", {}):
                    return cms[0], key, [f"ConfigMap {name} has no key {key!r} for {path}"]
                return cms[0], key, []
    return None, None, [f"entrypoint config {path} is not inside a ConfigMap mount of the head container"]


def _mount_covers(container: dict, volumes: dict, path: str, claim: str) -> bool:
    for mount in container.get("volumeMounts", []):
        volume = volumes.get(mount["name"], {})
        if volume.get("persistentVolumeClaim", {}).get("claimName") != claim or mount.get("readOnly"):
            continue
        prefix = mount["mountPath"].rstrip("/") + "/"
        if (path.rstrip("/") + "/").startswith(prefix):
            return True
    return False


@cache
def dockerfile_facts() -> dict[str, str]:
    """WORKDIR, USER and the RAY_VERSION default of docker/Dockerfile (parsed with BuildKit's parser)."""
    import dockerfile

    facts: dict[str, str] = {}
    for cmd in dockerfile.parse_file(str(REPO / "docker" / "Dockerfile")):
        if cmd.cmd in ("WORKDIR", "USER"):
            facts[cmd.cmd] = cmd.value[0]
        elif cmd.cmd == "ARG" and cmd.value[0].startswith("RAY_VERSION="):
            facts["RAY_VERSION"] = cmd.value[0].split("=", 1)[1]
    return facts


def image_errors(image: str) -> list[str]:
    """A pullable, pinned image: registry/repository:tag or @sha256 digest. A bare name is what the kustomize
    source holds (`vlmtune`, rewritten by its `images:`): left in manifests that are applied as they are,
    the nodes would try docker.io/library/vlmtune."""
    name, _, digest = image.partition("@")
    last = name.rsplit("/", 1)[-1]
    repo, tag = (name.rsplit(":", 1) if ":" in last else (name, ""))
    if "/" not in repo:
        return [f"image {image!r} names no registry or repository (the kustomize placeholder, not rendered?)"]
    if not digest and tag in ("", "latest"):
        return [f"image {image!r} is not pinned to a tag or digest: nodes could run different builds"]
    return []


def namespace_errors(objs: list[dict]) -> list[str]:
    """One namespace for everything, created by these manifests, or `kubectl apply -f` stops on it."""
    created = {o["metadata"]["name"] for o in objs if o["kind"] == "Namespace"}
    used = {o["metadata"].get("namespace") for o in objs if o["kind"] not in CLUSTER_SCOPED}
    if len(used) != 1 or None in used:
        return [f"namespaced objects must all name the same namespace, found {sorted(map(str, used))}"]
    if not used <= created:
        return [f"namespace {used.pop()} is not created by these manifests (kubectl apply -f would fail: "
                "namespaces not found)"]
    return []


def wiring_errors(objs: list[dict]) -> list[str]:
    errors: list[str] = namespace_errors(objs)
    pvcs = {o["metadata"]["name"]: o for o in objs if o["kind"] == "PersistentVolumeClaim"}
    configmaps = {o["metadata"]["name"] for o in objs if o["kind"] == "ConfigMap"}
    for o in objs:
        if o["kind"] == "Secret" and (o.get("data") or o.get("stringData")):
            errors.append(f"Secret {o['metadata']['name']} carries values in the manifests")
    images = set()
    image = dockerfile_facts()
    workdir = image.get("WORKDIR")
    uid = image.get("USER", "").split(":")[0]
    for job in (o for o in objs if o["kind"] == "RayJob"):
        jname = job["metadata"]["name"]
        spec = job["spec"]
        commands, errs = entrypoint_commands(spec.get("entrypoint", ""))
        errors += [f"{jname}: {e}" for e in errs]
        cfgs: dict[str, Config] = {}  # script -> the config it runs with
        for cmd in commands:
            if cmd[0] != "python" or len(cmd) < 2:
                errors.append(f"{jname}: entrypoint runs {shlex.join(cmd)!r}, not python jobs/<job>.py --config ...")
                continue
            script, path = cmd[1], config_path(cmd)
            if not (REPO / script).is_file():
                errors.append(f"{jname}: entrypoint script {script} is not in the repository")
            if path is None:
                errors.append(f"{jname}: entrypoint {script} has no --config PATH")
                continue
            cm, key, errs = config_of(objs, job, path)
            errors += [f"{jname}: {e}" for e in errs]
            if cm is not None and key in cm.get("data", {}):
                try:
                    cfgs[script] = Config.model_validate(yaml.safe_load(cm["data"][key]))
                except Exception as e:  # pydantic or YAML: either way the job would die at start
                    errors.append(f"{jname}: {path} is not a valid vlmtune config: {str(e)[:300]}")
        for key, why in (("preRunningDeadlineSeconds", "pods that cannot start (no GPU nodes, unbound volume, "
                                                       "image not found) would hold the job forever"),
                         ("activeDeadlineSeconds", "a hung run would hold the GPUs forever")):
            if not spec.get(key):
                errors.append(f"{jname}: no {key}: {why}")
        cluster = spec.get("rayClusterSpec", {})
        if cluster.get("rayVersion") != image.get("RAY_VERSION"):
            errors.append(f"{jname}: rayVersion {cluster.get('rayVersion')} != the image's Ray "
                          f"{image.get('RAY_VERSION')}")
        gpus_total, pod_cpus = 0.0, []
        for where, template in pod_templates(job):
            pod = template.get("spec", {})
            volumes = {v["name"]: v for v in pod.get("volumes", [])}
            security = pod.get("securityContext", {})
            if not security.get("runAsNonRoot") or security.get("runAsUser") == 0:
                errors.append(f"{jname} {where}: pod must run as non-root (runAsNonRoot, runAsUser != 0)")
            if str(security.get("runAsUser")) != uid:
                errors.append(f"{jname} {where}: runAsUser {security.get('runAsUser')} != the image's USER {uid}")
            for v in volumes.values():
                ref = v.get("configMap", {})
                if ref and not ref.get("optional") and ref.get("name") not in configmaps:
                    errors.append(f"{jname} {where}: volume {v['name']} mounts ConfigMap {ref.get('name')}, which is "
                                  "not in the manifests (the pod would wait in ContainerCreating)")
            for c in _containers(template):
                images.add(c.get("image"))
                res = c.get("resources", {})
                if res.get("requests") != res.get("limits") or not res.get("limits"):
                    errors.append(f"{jname} {where} {c['name']}: resource requests must equal limits")
                sc = c.get("securityContext", {})
                if sc.get("allowPrivilegeEscalation") is not False:
                    errors.append(f"{jname} {where} {c['name']}: allowPrivilegeEscalation must be false")
                if "ALL" not in sc.get("capabilities", {}).get("drop", []) or sc.get("capabilities", {}).get("add"):
                    errors.append(f"{jname} {where} {c['name']}: capabilities must drop ALL and add none")
                if sc.get("privileged"):
                    errors.append(f"{jname} {where} {c['name']}: privileged")
                if not sc.get("readOnlyRootFilesystem"):
                    errors.append(f"{jname} {where} {c['name']}: root filesystem must be read-only")
                mounts = {m["mountPath"]: volumes.get(m["name"], {}) for m in c.get("volumeMounts", [])}
                if "emptyDir" not in mounts.get("/tmp", {}):
                    errors.append(f"{jname} {where} {c['name']}: read-only root needs an emptyDir at /tmp")
                for env in c.get("env", []):
                    if SECRET_NAME.search(env["name"]) and "value" in env:
                        errors.append(f"{jname} {where} {c['name']}: {env['name']} is inline; use a secretKeyRef")
                    ref = env.get("valueFrom", {})
                    if SECRET_NAME.search(env["name"]) and "secretKeyRef" not in ref:
                        errors.append(f"{jname} {where} {c['name']}: {env['name']} must come from a Secret")
                if where == "submitter":
                    continue
                if workdir and c.get("workingDir", workdir) != workdir:
                    errors.append(f"{jname} {where} {c['name']}: workingDir {c.get('workingDir')} != image "
                                  f"WORKDIR {workdir} (the entrypoint's relative script path)")
                if mounts.get("/dev/shm", {}).get("emptyDir", {}).get("medium") != "Memory":
                    errors.append(f"{jname} {where} {c['name']}: /dev/shm must be a memory-backed emptyDir")
                claims = {v["persistentVolumeClaim"]["claimName"] for v in volumes.values()
                          if "persistentVolumeClaim" in v}
                for claim in claims:
                    pvc = pvcs.get(claim)
                    if pvc is None:
                        errors.append(f"{jname} {where}: PVC {claim} is not in the manifests")
                    elif "ReadWriteMany" not in pvc["spec"].get("accessModes", []):
                        errors.append(f"{jname}: PVC {claim} must be ReadWriteMany (head and workers write)")
                for cfg in cfgs.values():
                    for label, p in (("cluster.storage_path", cfg.cluster.storage_path),
                                     ("data.shards.dir", cfg.data.shards.dir)):
                        if "://" not in p and not any(_mount_covers(c, volumes, p, cl) for cl in claims):
                            errors.append(f"{jname} {where} {c['name']}: {label}={p} is not on a writable PVC mount")
                    if cfg.tracking.dir and "://" not in cfg.tracking.dir and not any(
                            _mount_covers(c, volumes, cfg.tracking.dir, cl) for cl in claims):
                        errors.append(f"{jname} {where}: tracking.dir={cfg.tracking.dir} is not on a PVC mount")
        for name, group in _groups(cluster):
            if name == "head":
                continue
            replicas = group.get("replicas", 0) * group.get("numOfHosts", 1)
            for c in group.get("template", {}).get("spec", {}).get("containers", []):
                limits = c.get("resources", {}).get("limits", {})
                gpus_total += replicas * _quantity(limits.get("nvidia.com/gpu", 0))
                pod_cpus.append((name, _quantity(limits.get("cpu", 0)), _quantity(limits.get("nvidia.com/gpu", 0))))
        if (cfg := cfgs.get("jobs/train.py")) is not None:
            c = cfg.cluster
            want = c.num_workers * c.gpus_per_worker if c.use_gpu else 0
            if gpus_total != want:
                errors.append(f"{jname}: worker groups request {gpus_total:g} GPUs but the config wants "
                              f"cluster.num_workers x gpus_per_worker = {want:g}")
            for group, cpus, gpus in pod_cpus:
                per_pod = int(gpus // c.gpus_per_worker) if c.use_gpu else 0
                if per_pod * c.cpus_per_worker > cpus:
                    errors.append(f"{jname} group {group}: {per_pod} workers x {c.cpus_per_worker:g} CPUs do not fit "
                                  f"the pod's {cpus:g} CPUs")
    if len(images) > 1:
        errors.append(f"containers use different images: {sorted(map(str, images))}")
    errors += [e for i in sorted(map(str, images)) for e in image_errors(i)]
    return list(dict.fromkeys(errors))  # one config read by several commands: each error once


def main() -> None:
    parser = argparse.ArgumentParser(description="Vendor KubeRay CRD schemas for the offline k8s tests")
    parser.add_argument("--vendor", type=Path, required=True, help="directory with ray.io_*.yaml and SOURCE.md")
    vendor(parser.parse_args().vendor)


if __name__ == "__main__":
    main()
