"""The subset of kustomize that k8s/kustomization.yaml uses, rendered the way `kubectl apply -k` would.

Supported: resources (files), namespace, labels (metadata only), images (every containers/initContainers
list, CRDs included, as kustomize does), configMapGenerator (files, literals, options.labels) with
generatorOptions.disableNameSuffixHash: true, and replacements (source fieldPath -> target fieldPaths,
`[key=value]` list selectors, `[dotted.key]` map keys, scalar targets keeping their type). Anything else
in the kustomization is an error, so a new kustomize feature cannot be silently mis-rendered here;
tests/infra/test_k8s.py also compares this output with `kubectl kustomize` where kubectl exists.
"""

from __future__ import annotations

import copy
import re
from pathlib import Path
from typing import Any

import yaml

SUPPORTED = {"apiVersion", "kind", "namespace", "labels", "resources", "images", "configMapGenerator",
             "generatorOptions", "replacements"}
CLUSTER_SCOPED = {"Namespace", "CustomResourceDefinition", "ClusterRole", "ClusterRoleBinding", "PersistentVolume",
                  "StorageClass", "PriorityClass"}


class KustomizeError(ValueError):
    pass


def _load_docs(path: Path) -> list[dict]:
    docs = [d for d in yaml.safe_load_all(path.read_text()) if d is not None]
    for d in docs:
        if not isinstance(d, dict) or "kind" not in d or "metadata" not in d:
            raise KustomizeError(f"{path}: not a Kubernetes object: {str(d)[:80]}")
    return docs


def _generate_configmap(spec: dict, root: Path, options: dict) -> dict:
    unknown = set(spec) - {"name", "files", "literals", "options", "behavior"}
    if unknown:
        raise KustomizeError(f"configMapGenerator {spec.get('name')}: unsupported fields {sorted(unknown)}")
    if spec.get("behavior", "create") != "create":
        raise KustomizeError("configMapGenerator: only behavior 'create' is supported")
    if not options.get("disableNameSuffixHash"):
        raise KustomizeError("name suffix hashes are not rendered here: set generatorOptions.disableNameSuffixHash")
    data: dict[str, str] = {}
    for item in spec.get("files", []):
        key, _, rel = item.rpartition("=") if "=" in item else (Path(item).name, "", item)
        path = (root / rel).resolve()
        if root.resolve() not in path.parents:
            raise KustomizeError(f"{item}: outside the kustomization directory (kustomize's load restrictor)")
        data[key] = path.read_text()
    for item in spec.get("literals", []):
        key, sep, value = item.partition("=")
        if not sep:
            raise KustomizeError(f"literal {item!r} is not key=value")
        data[key] = value
    labels = {**options.get("labels", {}), **spec.get("options", {}).get("labels", {})}
    meta: dict[str, Any] = {"name": spec["name"]}
    if labels:
        meta["labels"] = dict(labels)
    return {"apiVersion": "v1", "kind": "ConfigMap", "metadata": meta, "data": data}


def _split_image(image: str) -> tuple[str, str]:
    """'repo/name:tag' -> ('repo/name', ':tag'); digests kept as '@sha256:...'."""
    if "@" in image:
        name, _, digest = image.partition("@")
        return name, "@" + digest
    head, _, last = image.rpartition("/")
    if ":" in last:
        last, _, tag = last.partition(":")
        return (f"{head}/{last}" if head else last), ":" + tag
    return image, ""


def _set_images(node: Any, images: list[dict]) -> None:
    if isinstance(node, dict):
        for key, value in node.items():
            if key in ("containers", "initContainers") and isinstance(value, list):
                for container in value:
                    if isinstance(container, dict) and "image" in container:
                        container["image"] = _new_image(container["image"], images)
            _set_images(value, images)
    elif isinstance(node, list):
        for item in node:
            _set_images(item, images)


def _new_image(image: str, images: list[dict]) -> str:
    name, suffix = _split_image(image)
    for rule in images:
        if rule["name"] == name:
            unknown = set(rule) - {"name", "newName", "newTag", "digest"}
            if unknown:
                raise KustomizeError(f"images: unsupported fields {sorted(unknown)}")
            name = rule.get("newName", name)
            if "digest" in rule:
                suffix = "@" + rule["digest"]
            elif "newTag" in rule:
                suffix = ":" + str(rule["newTag"])
            break
    return name + suffix


def split_path(path: str) -> list[str]:
    """kustomize's field path syntax: dots separate, except inside [...]."""
    parts, buf, depth = [], "", 0
    for ch in path:
        if ch == "[":
            depth += 1
        elif ch == "]":
            depth -= 1
        if ch == "." and depth == 0:
            parts.append(buf)
            buf = ""
        else:
            buf += ch
    parts.append(buf)
    return [p for p in parts if p]


def _step(node: Any, part: str, where: str) -> tuple[Any, Any]:
    """Return (container, key) for one path element, so the caller can read or assign."""
    m = re.fullmatch(r"\[([^=\]]+)=([^\]]*)\]", part)
    if m:
        if not isinstance(node, list):
            raise KustomizeError(f"{where}: {part} selects from a list, found {type(node).__name__}")
        for i, item in enumerate(node):
            if isinstance(item, dict) and str(item.get(m.group(1))) == m.group(2):
                return node, i
        raise KustomizeError(f"{where}: no list item with {m.group(1)}={m.group(2)}")
    key = part[1:-1] if part.startswith("[") else part
    if isinstance(node, list) and key.isdigit():
        return node, int(key)
    if not isinstance(node, dict) or key not in node:
        raise KustomizeError(f"{where}: field {key!r} not found")
    return node, key


def get_path(obj: dict, path: str) -> Any:
    node: Any = obj
    for part in split_path(path):
        container, key = _step(node, part, path)
        node = container[key]
    return node


def set_path(obj: dict, path: str, value: Any) -> None:
    parts = split_path(path)
    node: Any = obj
    for part in parts[:-1]:
        container, key = _step(node, part, path)
        node = container[key]
    container, key = _step(node, parts[-1], path)
    old = container[key]
    container[key] = _coerce(value, old, path)


def _coerce(value: Any, old: Any, path: str) -> Any:
    """kustomize copies a scalar's value into the target node and keeps the target's type (int stays int)."""
    if isinstance(old, (dict, list)) or isinstance(value, (dict, list)):
        return copy.deepcopy(value)
    if isinstance(old, bool):
        return str(value).lower() == "true"
    if isinstance(old, int):
        try:
            return int(str(value))
        except ValueError:
            raise KustomizeError(f"{path}: cannot put {value!r} into an integer field") from None
    if isinstance(old, float):
        return float(str(value))
    return str(value) if isinstance(old, str) else value


def _select(objs: list[dict], select: dict) -> list[dict]:
    unknown = set(select) - {"kind", "name", "namespace"}
    if unknown:
        raise KustomizeError(f"replacement select: unsupported fields {sorted(unknown)}")
    return [o for o in objs if all((o["kind"] if k == "kind" else o["metadata"].get(k)) == v
                                   for k, v in select.items())]


def _replace(objs: list[dict], replacements: list[dict]) -> None:
    for rep in replacements:
        unknown = set(rep) - {"source", "targets"}
        if unknown:
            raise KustomizeError(f"replacements: unsupported fields {sorted(unknown)}")
        source = rep["source"]
        found = _select(objs, {k: v for k, v in source.items() if k in ("kind", "name", "namespace")})
        if len(found) != 1:
            raise KustomizeError(f"replacement source {source} matches {len(found)} objects")
        value = get_path(found[0], source.get("fieldPath", "metadata.name"))
        for target in rep["targets"]:
            unknown = set(target) - {"select", "fieldPaths"}
            if unknown:
                raise KustomizeError(f"replacement target: unsupported fields {sorted(unknown)}")
            selected = _select(objs, target["select"])
            if not selected:
                raise KustomizeError(f"replacement target {target['select']} matches nothing")
            for obj in selected:
                for path in target["fieldPaths"]:
                    set_path(obj, path, value)


def render(directory: str | Path) -> list[dict]:
    """The objects `kubectl kustomize DIRECTORY` would print (order aside)."""
    root = Path(directory)
    kz = yaml.safe_load((root / "kustomization.yaml").read_text())
    unknown = set(kz) - SUPPORTED
    if unknown:
        raise KustomizeError(f"kustomization fields not supported by this renderer: {sorted(unknown)}")
    if kz.get("kind", "Kustomization") != "Kustomization":
        raise KustomizeError("kind must be Kustomization")
    objs: list[dict] = []
    for res in kz.get("resources", []):
        objs += _load_docs(root / res)
    options = kz.get("generatorOptions", {})
    if set(options) - {"disableNameSuffixHash", "labels"}:
        raise KustomizeError(f"generatorOptions: unsupported fields {sorted(set(options))}")
    for spec in kz.get("configMapGenerator", []):
        objs.append(_generate_configmap(spec, root, options))
    for entry in kz.get("labels", []):
        if set(entry) - {"pairs", "includeSelectors", "includeTemplates"}:
            raise KustomizeError(f"labels: unsupported fields {sorted(entry)}")
        if entry.get("includeSelectors") or entry.get("includeTemplates"):
            raise KustomizeError("labels: includeSelectors/includeTemplates are not rendered here")
        for obj in objs:
            obj["metadata"].setdefault("labels", {}).update(entry["pairs"])
    if "namespace" in kz:
        for obj in objs:
            if obj["kind"] not in CLUSTER_SCOPED:
                obj["metadata"]["namespace"] = kz["namespace"]
    _set_images(objs, kz.get("images", []))
    _replace(objs, kz.get("replacements", []))
    keys = [(o["kind"], o["metadata"]["name"]) for o in objs]
    duplicates = {k for k in keys if keys.count(k) > 1}
    if duplicates:
        raise KustomizeError(f"duplicate objects: {sorted(duplicates)}")
    return objs
