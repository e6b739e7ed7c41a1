"""The library's subpackages form layers: every import (top-level or inside a function) points down.

An import inside a function is for cost (torch, Ray, transformers), never a way to hide a cycle, so this
walks both kinds. A module of the package root (``adrec/config.py``) counts as a unit of its own.
"""

from __future__ import annotations

import ast
from collections import defaultdict
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parents[2] / "platform" / "adrec"

#: Lowest first. A unit may import units of lower layers and, without a cycle, of its own layer.
LAYERS: list[set[str]] = [
    {"adrec", "errors", "keys", "config", "metrics"},
    {"run", "runtime", "torchfile", "storage"},
    {"data", "feedback"},
    {"features"},
    {"candidates", "ranking"},
    {"topk"},
    {"model_version"},
    {"evaluation", "serving", "online", "tuning"},
    {"flow"},
    {"demo", "cli", "__main__"},
]
LAYER_OF = {unit: i for i, layer in enumerate(LAYERS) for unit in layer}


def _unit(module: str) -> str:
    """``adrec.serving.app`` -> ``serving``; ``adrec`` (the package's __init__) -> ``adrec``."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else parts[0]


def _module_name(path: Path) -> str:
    rel = path.relative_to(PKG.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _imports(path: Path) -> list[tuple[str, int, bool]]:
    """(imported adrec module, line, deferred) for every import of ``adrec`` in the file."""
    tree = ast.parse(path.read_text(), filename=str(path))
    top_level = {id(node) for node in tree.body}
    name = _module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                targets = [".".join(base + ([node.module] if node.module else []))]
            else:
                targets = [node.module or ""]
            if targets[0] in ("adrec", "") or not node.module:
                # `from adrec import flow`: the names are modules of the package root
                targets = [f"{targets[0]}.{a.name}" if targets[0] else a.name for a in node.names]
        elif isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        else:
            continue
        for t in targets:
            if t == "adrec" or t.startswith("adrec."):
                out.append((t, node.lineno, id(node) not in top_level))
    return out


def _graph() -> dict[str, dict[str, list[str]]]:
    edges: dict[str, dict[str, list[str]]] = defaultdict(lambda: defaultdict(list))
    for path in sorted(PKG.rglob("*.py")):
        src = _unit(_module_name(path))
        for target, line, deferred in _imports(path):
            dst = _unit(target)
            if dst != src:
                where = f"{path.relative_to(PKG.parent)}:{line}{' (inside a function)' if deferred else ''}"
                edges[src][dst].append(where)
    return edges


def _cycles(edges: dict[str, dict[str, list[str]]]) -> list[list[str]]:
    """Strongly connected components of more than one unit (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in edges.get(v, {}):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(set(edges) | {w for d in edges.values() for w in d}):
        if v not in index:
            visit(v)
    return out


def test_walker_sees_both_kinds_of_import(tmp_path):
    # The walker itself: a deferred import and a relative one are found (else the tests below prove nothing).
    found = _imports(PKG / "cli.py")
    assert any(deferred for _, _, deferred in found), "cli.py imports stages inside main(): none were seen"
    assert any(not deferred for _, _, deferred in found)
    edges = _graph()
    assert "errors" in edges["cli"] and "data" in edges["features"]


def test_cycle_detection_finds_a_planted_cycle():
    assert _cycles({"a": {"b": ["x"]}, "b": {"c": ["y"]}, "c": {"a": ["z"]}, "d": {"a": ["w"]}}) == [["a", "b", "c"]]
    assert _cycles({"a": {"b": ["x"]}}) == []


def test_no_cycle_between_subpackages():
    edges = _graph()
    cycles = _cycles(edges)
    detail = []
    for comp in cycles:
        for a in comp:
            for b in comp:
                if b in edges.get(a, {}):
                    detail.append(f"  {a} -> {b}: {', '.join(edges[a][b][:3])}")
    assert not cycles, "import cycles between subpackages:\n" + "\n".join(detail)


def test_every_unit_has_a_layer():
    units = {_unit(_module_name(p)) for p in PKG.rglob("*.py")}
    assert units - set(LAYER_OF) == set(), "place these in LAYERS (tests/unit/test_layers.py)"


@pytest.mark.parametrize("src", sorted(LAYER_OF))
def test_imports_point_down(src):
    edges = _graph().get(src, {})
    up = {dst: where for dst, where in edges.items() if LAYER_OF.get(dst, -1) > LAYER_OF[src]}
    assert not up, f"{src} (layer {LAYER_OF[src]}) imports higher layers: " + "; ".join(
        f"{dst} (layer {LAYER_OF[dst]}) at {', '.join(w[:3])}" for dst, w in up.items())
