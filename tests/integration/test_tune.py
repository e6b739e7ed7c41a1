"""Ray Tune on the local Ray: a ranker search promotes a servable model; an ALS search survives an
interruption (resumed with Tuner.restore, finished trials are not rerun)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import struct
import threading
from pathlib import Path

import pandas as pd
import pytest
import yaml
from adrec.config import load_config
from adrec.model_version import live_dir
from adrec.run import RunDir
from adrec.tuning import SearchInterrupted, tune
from ray import tune as ray_tune

pytestmark = pytest.mark.ray


def _copy_run(src: RunDir, dst: Path) -> RunDir:
    """A private copy of the shared tiny run (prepared, candidates fitted), without its ranker."""
    dst.mkdir(parents=True)
    for name in ("features", "candidates", "raw"):
        if (src.path / name).exists():
            shutil.copytree(src.path / name, dst / name)
    for name in ("config.yaml", "manifest.json"):
        shutil.copy2(src.path / name, dst / name)
    return RunDir(dst)


def _space(path: Path, data: dict) -> Path:
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def _scalars(trial_dir: Path) -> dict[str, list[tuple[int, float]]]:
    """TensorBoard scalars of a trial's event file(s), read with tensorboardX's protobufs."""
    from tensorboardX.proto import event_pb2

    out: dict[str, list] = {}
    for f in trial_dir.glob("events.out.tfevents.*"):
        data, i = f.read_bytes(), 0
        while i < len(data):
            (n,) = struct.unpack("<Q", data[i:i + 8])
            ev = event_pb2.Event()
            ev.ParseFromString(data[i + 12:i + 12 + n])
            i += 12 + n + 4
            for v in ev.summary.value:
                out.setdefault(v.tag, []).append((ev.step, v.simple_value))
    return out


class InterruptAfter(ray_tune.Callback):
    """Interrupts the search like Ctrl-C (SIGUSR1, which Tune handles the same way as SIGINT: it saves
    the experiment state and returns) once ``n`` trials have completed. Disarmed when the search is
    restored, since Tune saves its callbacks with the experiment."""

    def __init__(self, n: int):
        self.n, self.done, self.armed = n, 0, True

    def __getstate__(self):
        return {"n": self.n, "done": 0, "armed": False}

    def on_trial_complete(self, iteration, trials, trial, **info):
        self.done += 1
        if self.armed and self.done == self.n:
            assert threading.current_thread() is threading.main_thread()
            assert signal.getsignal(signal.SIGUSR1) not in (signal.SIG_DFL, signal.SIG_IGN, None)
            os.kill(os.getpid(), signal.SIGUSR1)


# make test-all (two minutes on 2 cores): make test runs the ALS search and its resumption.
@pytest.mark.slow
def test_ranker_search_promotes_a_model_that_serves(tiny_run, tiny_cfg, tmp_path):
    from adrec.ranking.base import load_ranker
    from adrec.serving.recommender import Recommender

    run = _copy_run(tiny_run, tmp_path / "run")
    space = _space(tmp_path / "ranker.yaml", {
        "trainable": "ranker",
        "base": {"ranker": {"tiny_encoder": True, "epochs": 2}},
        "space": {"ranker.lr": {"loguniform": [1.0e-3, 5.0e-3]}, "ranker.embed_dim": {"choice": [8, 16]}},
        "metric": "valid_auc", "mode": "max", "num_samples": 2, "max_concurrent": 1,
        "scheduler": {"asha": {"grace_period": 1, "max_t": 2}},
        "resources_per_trial": {"cpu": 1, "gpu": 0},
    })
    summary = tune(tiny_cfg, run, space, verbose=0)

    results = json.loads((run.tune / "results.json").read_text())
    assert results["complete"] and len(results["trials"]) == 2 == summary["trials"]
    best = results["best"]
    assert best["trial_id"] == summary["best_trial"]
    values = [t["best_valid_auc"] for t in results["trials"]]
    assert best["best_valid_auc"] == max(values) and 0.5 < best["best_valid_auc"] <= 1
    for t in results["trials"]:
        assert t["status"] in ("completed", "stopped by ASHA", "early-stopped"), t
        # One TensorBoard run per trial, with the per-epoch training and validation curves.
        tags = _scalars(Path(t["path"]))
        assert {"ray/tune/train_loss", "ray/tune/valid_auc", "ray/tune/valid_logloss"} <= set(tags), t["path"]
        assert [step for step, _ in tags["ray/tune/valid_auc"]] == list(range(1, t["epochs"] + 1))
    report = (run.report / "tune.md").read_text()
    assert best["trial_id"] + " *" in report and "| ranker.lr" in report

    # The best trial is the run's model: ranker, config and the model version `adrec serve` loads.
    saved = yaml.safe_load((run.path / "config.yaml").read_text())
    assert saved["ranker"]["lr"] == pytest.approx(best["params"]["ranker.lr"])
    assert saved["ranker"]["embed_dim"] == best["params"]["ranker.embed_dim"]
    assert load_ranker(run.ranker).info["tune"]["trial_id"] == best["trial_id"]
    assert json.loads((live_dir(run) / "version.json").read_text())["tune"]["trial_id"] == best["trial_id"]
    rec = Recommender(live_dir(run), pseudonym_key=b"test-key")
    assert rec.ranker.cfg.embed_dim == best["params"]["ranker.embed_dim"]
    raw_user = str(pd.read_csv(run.raw / "impressions.csv")["user_id"].iloc[0])
    top = rec.recommend(raw_user, 5)
    assert len(top) == 5 and all(0 < r["click_prob"] < 1 for r in top)


def test_als_search_resumes_after_an_interruption_without_rerunning_finished_trials(tiny_run, tiny_cfg, tmp_path):
    run = _copy_run(tiny_run, tmp_path / "run")
    space = _space(tmp_path / "als.yaml", {
        "trainable": "als",
        "space": {"candidates.factors": {"grid": [8, 16, 24, 32]},
                  "candidates.regularization": {"loguniform": [1.0e-3, 1.0e-1]}},
        "metric": "valid_recall@100", "mode": "max", "num_samples": 1, "max_concurrent": 1,
        "scheduler": "fifo", "resources_per_trial": {"cpu": 1},
    })
    with pytest.raises(SearchInterrupted, match="interrupted after 2 of 4 trials"):
        tune(tiny_cfg, run, space, callbacks=[InterruptAfter(2)], verbose=0)
    partial = json.loads((run.tune / "results.json").read_text())
    assert not partial["complete"]
    first = {t["trial_id"]: t for t in partial["trials"] if t["status"] == "completed"}
    assert len(first) == 2
    lines = {tid: (Path(t["path"]) / "result.json").read_text() for tid, t in first.items()}
    assert not (run.path / "model").exists()  # nothing promoted from a partial search

    summary = tune(tiny_cfg, run, space, verbose=0)  # the same command again: resumes
    assert summary["resumed"] and summary["trials"] == 4
    results = json.loads((run.tune / "results.json").read_text())
    assert results["complete"] and results["resumed"]
    trials = {t["trial_id"]: t for t in results["trials"]}
    assert set(first) < set(trials) and all(t["status"] == "completed" for t in trials.values())
    assert sorted(t["params"]["candidates.factors"] for t in trials.values()) == [8, 16, 24, 32]
    for tid, t in first.items():  # finished trials were kept as they were, not run again
        assert (Path(t["path"]) / "result.json").read_text() == lines[tid]
        assert trials[tid]["valid_recall@100"] == t["valid_recall@100"]
        assert trials[tid]["iterations"] == 1

    # Promotion: the best ALS config is the run's config, and the candidates were refitted with it.
    best = results["best"]
    assert best["best_valid_recall@100"] == max(t["best_valid_recall@100"] for t in trials.values())
    saved = yaml.safe_load((run.path / "config.yaml").read_text())
    assert saved["candidates"]["factors"] == best["params"]["candidates.factors"]
    als = json.loads((run.candidates / "als" / "source.json").read_text())
    assert als["params"]["factors"] == best["params"]["candidates.factors"]
    assert run.manifest()["stages"]["tune"]["trial_id"] == best["trial_id"]

    # Rerunning the command after promotion (as the CLI does: from the run's now promoted config.yaml)
    # is the same search: restored, nothing rerun, the same trial promoted again.
    before = {tid: (Path(t["path"]) / "result.json").read_text() for tid, t in trials.items()}
    again = tune(load_config(run.path / "config.yaml"), run, space, verbose=0)
    assert again["resumed"] and again["best_trial"] == best["trial_id"] and again["trials"] == 4
    assert {tid: (Path(t["path"]) / "result.json").read_text() for tid, t in trials.items()} == before
    assert not list(run.tune.glob("als-*"))  # no earlier search archived
