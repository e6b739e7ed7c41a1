"""Plots write readable PNGs; the report writes metrics.json and a report.md linking every image."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

PLATFORM = str(Path(__file__).resolve().parents[2] / "platform")

from adrec.evaluation import (
    markdown_table,
    plot_calibration,
    plot_metric_bars,
    plot_robustness,
    plot_roc,
    write_report,
)
from adrec.metrics import calibration_bins, roc_points

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _ctr_data(seed=0, n=2000):
    rng = np.random.default_rng(seed)
    y = rng.binomial(1, 0.1, n)
    p = np.clip(0.08 + 0.15 * y + rng.normal(0, 0.06, n), 0.001, 0.999)
    return y, p


def _assert_png(path: Path) -> None:
    assert path.is_file()
    data = path.read_bytes()
    assert data[:8] == PNG_MAGIC
    assert len(data) > 5000  # not a blank canvas


def _metrics_json(path: Path) -> dict:
    return json.loads((path / "metrics.json").read_text())


# ---------------------------------------------------------------------- plots


def test_plot_roc_single_and_several_curves(tmp_path):
    y, p = _ctr_data()
    one = plot_roc(y, p, tmp_path / "roc.png", label="ranker")
    assert one == tmp_path / "roc.png"
    _assert_png(one)
    rng = np.random.default_rng(1)
    many = plot_roc(
        None, None, tmp_path / "sub" / "roc_all.png",
        curves={"ranker": (y, p), "popularity": (y, rng.random(y.size))},
    )
    _assert_png(many)
    with pytest.raises(ValueError):
        plot_roc(None, None, tmp_path / "x.png")


def test_roc_curve_points():
    fpr, tpr = roc_points([1, 0, 1, 0], [0.9, 0.8, 0.8, 0.1])
    # thresholds 0.9 | 0.8 (one pos + one neg tied) | 0.1
    assert fpr.tolist() == [0.0, 0.0, 0.5, 1.0]
    assert tpr.tolist() == [0.0, 0.5, 1.0, 1.0]
    # trapezoid area equals AUC with ties counted half
    assert np.trapezoid(tpr, fpr) == pytest.approx(0.875)


def _ref_roc(y, p):
    """One point per distinct score, from the highest down, written with a loop."""
    y, p = np.asarray(y, float), np.asarray(p, float)
    pts = [(0.0, 0.0)]
    for t in sorted(set(p.tolist()), reverse=True):
        sel = p >= t
        pts.append(((sel & (y == 0)).sum() / max((y == 0).sum(), 1), (sel & (y == 1)).sum() / max(y.sum(), 1)))
    return np.array(pts)


@pytest.mark.parametrize("seed", range(3))
def test_roc_points_match_a_loop(seed):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, 300)
    p = np.round(rng.random(300) * 0.6 + 0.3 * y, 2)  # ties
    fpr, tpr = roc_points(y, p)
    np.testing.assert_allclose(np.c_[fpr, tpr], _ref_roc(y, p), atol=1e-12)
    # a single class: the undefined axis is zeros, not nan
    fpr, tpr = roc_points(np.zeros(5), [0.1, 0.2, 0.2, 0.3, 0.4])
    np.testing.assert_allclose(tpr, 0.0)
    np.testing.assert_allclose(fpr, _ref_roc(np.zeros(5), [0.1, 0.2, 0.2, 0.3, 0.4])[:, 0])


@pytest.mark.parametrize("strategy", ["uniform", "quantile"])
def test_calibration_bins_match_a_loop(strategy):
    y, p = _ctr_data(seed=3)
    edges, counts, mean_p, rate = calibration_bins(y, p, 10, strategy)
    if strategy == "uniform":
        np.testing.assert_allclose(edges, np.arange(11) / 10)
    else:
        np.testing.assert_allclose(edges, np.unique(np.quantile(p, np.arange(11) / 10)))
    ref_counts, ref_p, ref_rate = [], [], []
    for i, (lo, hi) in enumerate(zip(edges[:-1], edges[1:])):
        sel = (p > lo if i else p >= lo) & (p <= hi if i < len(edges) - 2 else np.ones_like(p, bool))
        ref_counts.append(int(sel.sum()))
        if sel.any():
            ref_p.append(p[sel].mean())
            ref_rate.append(y[sel].mean())
    assert counts.tolist() == ref_counts and counts.sum() == len(p)
    np.testing.assert_allclose(mean_p, ref_p, rtol=1e-12)
    np.testing.assert_allclose(rate, ref_rate, rtol=1e-12)


@pytest.mark.parametrize("strategy", ["uniform", "quantile"])
def test_plot_calibration(tmp_path, strategy):
    y, p = _ctr_data()
    out = plot_calibration(y, p, tmp_path / f"cal_{strategy}.png", n_bins=10, strategy=strategy)
    _assert_png(out)


def test_plot_metric_bars_and_robustness(tmp_path):
    bars = plot_metric_bars(
        {
            "ranker": {"ctr.auc": 0.74, "topk.ndcg@10": 0.21, "topk.recall@10": 0.30},
            "ALS": {"ctr.auc": 0.69, "topk.ndcg@10": 0.18, "topk.recall@10": float("nan")},
            "popularity": {"topk.ndcg@10": 0.09},
        },
        tmp_path / "bars.png",
    )
    _assert_png(bars)
    rob = plot_robustness(
        {"ranker": {0.0: 0.74, 0.01: 0.73, 0.05: 0.69, 0.1: 0.62},
         "ranker+FGSM": {0.1: 0.70, 0.0: 0.735, 0.05: 0.72, 0.01: 0.733}},
        tmp_path / "robust.png",
    )
    _assert_png(rob)


def _run_py(code: str, **env) -> str:
    full_env = {k: v for k, v in os.environ.items() if k != "MPLBACKEND"}
    full_env["PYTHONPATH"] = os.pathsep.join(filter(None, [PLATFORM, os.environ.get("PYTHONPATH")]))
    full_env.update(env)
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         env=full_env, timeout=120)
    assert res.returncode == 0, res.stderr
    return res.stdout.strip()


def test_import_has_no_side_effects():
    out = _run_py(
        "import sys, logging; import adrec.evaluation;"
        "print(sorted(m for m in sys.modules if m.split('.')[0] in"
        " ('matplotlib','torch','ray','sklearn')))"
    )
    assert out == "[]"


def test_backend_agg_only_when_none_selected(tmp_path):
    code = (
        "import sys, matplotlib, numpy as np; from adrec.evaluation import plot_roc;"
        f"plot_roc(np.array([0,1,1]), np.array([.1,.6,.4]), r'{tmp_path}/b.png');"
        "print(matplotlib.get_backend().lower())"
    )
    assert _run_py(code) == "agg"
    assert _run_py(code, MPLBACKEND="pdf") == "pdf"  # a user's choice is left alone


# --------------------------------------------------------------------- report


def test_write_report_links_every_image_and_writes_sorted_metrics(tmp_path):
    report_dir = tmp_path / "run" / "report"
    y, p = _ctr_data()
    inside = plot_roc(y, p, report_dir / "figures" / "roc.png")
    outside = plot_calibration(y, p, tmp_path / "elsewhere" / "calibration.png")
    outside2 = plot_metric_bars({"m": {"a": 1.0}}, tmp_path / "other" / "calibration.png")
    metrics = {
        "topk.recall@10": np.float32(0.25),
        "ctr.auc": 0.75,
        "ctr.logloss": np.float64(0.31),
        "topk.coverage@10": 1,
        "ctr.calibration": float("nan"),
    }
    sections = {"Notes": "Trained on the **synthetic** log.\n"}
    tables = {
        "Per-model": pd.DataFrame({"model": ["ranker", "ALS"], "ctr.auc": [0.75, 0.7]}),
        "Records": [{"k": 10, "recall": 0.25}, {"k": 20, "recall": 0.4, "extra": "x|y"}],
    }
    images = {"ROC": inside, "Reliability": outside, "Bars [all]": outside2}
    path = write_report(report_dir, metrics, sections=sections, images=images, tables=tables)

    assert path == report_dir / "report.md"
    text = path.read_text()
    raw = (report_dir / "metrics.json").read_text()
    loaded = json.loads(raw)
    assert list(loaded) == sorted(loaded)
    assert loaded["ctr.auc"] == 0.75 and isinstance(loaded["topk.coverage@10"], float)
    assert loaded["topk.recall@10"] == pytest.approx(0.25)
    assert loaded["ctr.calibration"] is None  # strict JSON: no NaN literal
    assert "NaN" not in raw

    links = re.findall(r"!\[(?:\\.|[^\]\\])*\]\(<([^>]+)>\)", text)
    assert len(links) == len(images)
    for link in links:
        assert not Path(link).is_absolute()
        _assert_png(report_dir / link)
    assert "figures/roc.png" in links
    # two different files with the same name outside the report get distinct copies
    assert len(set(links)) == 3
    for caption in images:
        assert f"### {caption}" in text
    for key in metrics:
        assert key in text
    assert "## Notes" in text and "**synthetic**" in text
    assert "## Per-model" in text and "| ranker" in text
    assert r"x\|y" in text


def test_write_report_minimal_and_nested(tmp_path):
    path = write_report(tmp_path / "r", {"ctr": {"auc": 0.5}, "candidates.recall@100": 0.9})
    assert _metrics_json(tmp_path / "r") == {"candidates.recall@100": 0.9, "ctr.auc": 0.5}
    assert "ctr.auc" in path.read_text()
    with pytest.raises(TypeError):
        write_report(tmp_path / "bad", {"x": "high"})
    with pytest.raises(FileNotFoundError):
        write_report(tmp_path / "bad2", {"x": 1.0}, images={"gone": tmp_path / "nope.png"})


def test_markdown_table():
    md = markdown_table([{"model": "ranker", "auc": 0.7512345}, {"model": "ALS", "auc": 0.7}])
    lines = md.splitlines()
    assert lines[0].split("|")[1].strip() == "model"
    assert re.fullmatch(r"\| -+ \| -+: \|", lines[1])  # numeric column right-aligned
    assert "0.7512" in lines[2] and "0.7000" in lines[3]
    assert len({len(line) for line in lines}) == 1  # columns padded to equal width

    df = pd.DataFrame({"auc": [0.5, float("nan")]}, index=pd.Index(["a", "b"], name="model"))
    md2 = markdown_table(df, floatfmt=".2f")
    assert md2.splitlines()[0].split("|")[1].strip() == "model"
    assert "0.50" in md2 and "nan" in md2
    assert markdown_table({"k": [1, 2]}).splitlines()[2].strip("| ").strip() == "1"
    assert "a<br>b" in markdown_table([{"note": "a\nb"}])
