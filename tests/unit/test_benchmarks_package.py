"""The benchmarks live outside the library: ``adrec`` never imports them, and the pipelines only forward to them."""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
LIBRARY = REPO / "platform" / "adrec"
FORWARDERS = sorted((REPO / "pipelines").glob("benchmark_*.py"))
# What benchmark, peer and test-support modules were called while they lived in the library.
BENCHMARK_NAMES = ("benchmark", "peers", "loadtest", "floor", "toy")


def _imported_modules(path: Path) -> list[tuple[int, str]]:
    """(line, absolute module name) of every import in a library file, top-level or inside a function."""
    package = ".".join(path.relative_to(LIBRARY.parent).with_suffix("").parts[:-1])
    out = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
            mod = node.module if not node.level else ".".join(p for p in (base, node.module) if p)
            out += [(node.lineno, f"{mod}.{a.name}") for a in node.names]
    return out


def test_no_benchmark_module_under_the_library():
    left = [str(p.relative_to(REPO)) for p in LIBRARY.rglob("*.py") if p.stem.startswith(BENCHMARK_NAMES)]
    assert not left, f"benchmark or test-support modules in the library: {left}"


def test_the_library_never_imports_benchmarks_or_tests():
    files = list(LIBRARY.rglob("*.py"))
    assert len(files) > 30  # the walk sees the package
    bad = [f"{p.relative_to(REPO)}:{line} imports {mod}" for p in files for line, mod in _imported_modules(p)
           if mod.split(".")[0] in ("benchmarks", "tests")
           or any(part.startswith(BENCHMARK_NAMES) for part in mod.split(".")[1:] if mod.startswith("adrec."))]
    assert not bad, "\n".join(bad)


def test_importing_adrec_loads_no_benchmark_code():
    code = ("import sys, adrec, adrec.cli; "
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('benchmarks', 'tests')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=REPO)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


# In `make test-all`: one interpreter start per forwarder (~20 s).
@pytest.mark.slow
def test_each_forwarder_is_thin_and_runs_from_anywhere(tmp_path):
    """``python pipelines/benchmark_X.py --help`` from another folder, with the repository root on no path:
    the forwarder finds the benchmarks package itself, and the bench extra is not needed to start."""
    assert {p.stem for p in FORWARDERS} >= {"benchmark_online", "benchmark_ranker", "benchmark_scale",
                                             "benchmark_serving",
                                             "benchmark_storage", "benchmark_topk", "benchmark_exposure",
                                             "benchmark_explain", "benchmark_privacy"}
    for p in FORWARDERS:
        tree = ast.parse(p.read_text())
        code = [n for n in tree.body if not (isinstance(n, ast.Expr) and isinstance(n.value, ast.Constant))]
        assert len(code) <= 5, f"{p.name} holds logic: {len(code)} statements"  # imports, sys.path, main
        assert any(isinstance(n, ast.ImportFrom) and n.module == f"benchmarks.{p.stem.removeprefix('benchmark_')}"
                   for n in code), f"{p.name} does not forward to its benchmark module"
    root = {str(REPO), str(REPO) + os.sep, "."}
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        e for e in os.environ.get("PYTHONPATH", "").split(os.pathsep) if e and e not in root))
    procs = {p.name: subprocess.Popen([sys.executable, str(p), "--help"], cwd=tmp_path, env=env, text=True,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE) for p in FORWARDERS}
    for name, proc in procs.items():
        stdout, stderr = proc.communicate(timeout=180)
        assert proc.returncode == 0, f"{name}: {stderr}"
        assert stdout.startswith("usage: ") and "--out" in stdout, f"{name}: {stdout}"
