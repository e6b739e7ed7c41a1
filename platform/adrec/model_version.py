"""A model version: one folder Serve (or anyone) can load on its own.

Layout::

    version.json             id, creation time, sizes, where it came from
    features/                spec.json, items.parquet, users.parquet (pseudonyms only)
    history.parquet          per user the most recent known positives (serving's starting history)
    seen.npz                 per user every known item (never recommended again)
    candidates/              the fitted candidate sources (MultiSource)
    topk/                    the two-stage top-K recommender that orders known users' lists
                             (TwoStageRecommender; absent when topk.enabled was off)
    ranker/                  the self-describing ranker (config, weights, encoder via save_pretrained)

Versions are published atomically: written to a temporary sibling, then renamed into place, so a
reader never sees half a version.
"""

from __future__ import annotations

import json
import shutil
import time
import uuid
from pathlib import Path

import pandas as pd

from adrec.run import RunDir


def publish(run: RunDir, ranker_dir: Path | None = None, target: Path | None = None, extra: dict | None = None) -> Path:
    """Assemble ``run/model`` (or ``target``) from the run's features, candidates and ranker."""
    from adrec.features.pipeline import Features, latest_history

    feats = Features(run)
    cand = run.require(run.candidates, "candidates")
    ranker_dir = Path(ranker_dir or run.require(run.ranker, "train"))
    target = Path(target or run.model)
    version = time.strftime("%Y%m%d-%H%M%S") + "-" + uuid.uuid4().hex[:6]
    tmp = target.parent / f".{target.name}.{version}.tmp"
    (tmp / "features").mkdir(parents=True)
    for name in ("spec.json", "items.parquet", "users.parquet"):
        shutil.copy2(run.features / name, tmp / "features" / name)
    hist = latest_history(feats.interactions, feats.spec.n_users, feats.spec.history_len)
    pd.DataFrame({"user_idx": range(len(hist)), "hist": [h.tolist() for h in hist]}).to_parquet(tmp / "history.parquet")
    shutil.copy2(cand / "seen.npz", tmp / "seen.npz")
    shutil.copytree(cand, tmp / "candidates", ignore=shutil.ignore_patterns("seen.npz", "recall.json"))
    shutil.copytree(ranker_dir, tmp / "ranker")
    topk = run.path / "topk"  # adrec.candidates.stage.TOPK_DIR (not imported: it pulls in the sources)
    if topk.is_dir():
        shutil.copytree(topk, tmp / "topk")
    cand_info = run.manifest().get("stages", {}).get("candidates", {})
    info = {"version": version, "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "run": run.path.name,
            "n_users": feats.spec.n_users, "n_items": feats.spec.n_items,
            "context_field": cand_info.get("context_field"), "topk": topk.is_dir(), **(extra or {})}
    (tmp / "version.json").write_text(json.dumps(info, indent=2))
    from adrec.serving.recommender import store_lists  # (it reads versions: imported here, not at the top)

    store_lists(tmp)  # once here, instead of in every Serve replica that loads the version
    old = None
    if target.exists():
        old = target.parent / f".{target.name}.old.{version}"
        target.rename(old)
    tmp.rename(target)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
    return target


def read_version(model_dir: Path) -> dict:
    path = Path(model_dir) / "version.json"
    if not path.is_file():
        raise FileNotFoundError(f"{model_dir} is not a model version (no version.json): run `adrec train` first")
    return json.loads(path.read_text())
