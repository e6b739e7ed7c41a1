"""Training's publish: a run's features, candidates, two-stage recommender and ranker -> ``run/model``."""

from __future__ import annotations

import time
import uuid
from pathlib import Path

from adrec.features.pipeline import Features, latest_history
from adrec.model_version.writer import PSEUDONYM_KEY_FINGERPRINT, write_version
from adrec.run import RunDir


def publish(run: RunDir, ranker_dir: Path | None = None, target: Path | None = None, extra: dict | None = None) -> Path:
    """Assemble ``run/model`` (or ``target``) from the run's stages; an existing one is replaced atomically."""
    feats = Features(run)
    cand = run.require(run.candidates, "candidates")
    ranker_dir = Path(ranker_dir or run.require(run.ranker, "train"))
    topk = run.path / "topk"  # adrec.candidates.stage.TOPK_DIR (not imported: it pulls in the sources)
    stages = run.manifest().get("stages", {})
    cand_info = stages.get("candidates", {})
    info = {"version": time.strftime("%Y%m%d-%H%M%S") + "-" + uuid.uuid4().hex[:6], "run": run.path.name,
            "n_users": feats.spec.n_users, "n_items": feats.spec.n_items,
            "context_field": cand_info.get("context_field"), "topk": topk.is_dir(),
            # DP-SGD's spent epsilon and delta (ranker.dp), None without it.
            "privacy": stages.get("train", {}).get("privacy"),
            # Which key pseudonymized the users (a fingerprint): Serve refuses to serve it with another.
            PSEUDONYM_KEY_FINGERPRINT: stages.get("prepare", {}).get(PSEUDONYM_KEY_FINGERPRINT), **(extra or {})}
    hist = latest_history(feats.interactions, feats.spec.n_users, feats.spec.history_len)
    path, _ = write_version(target or run.model, info, features=run.features, history=hist, seen=cand / "seen.npz",
                            candidates=cand, ranker=ranker_dir, topk=topk if topk.is_dir() else None)
    return path
