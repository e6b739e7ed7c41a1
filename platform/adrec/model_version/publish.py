"""Training's publish: a run's features, candidates, two-stage recommender and ranker -> a new live version."""

from __future__ import annotations

import time
import uuid
from pathlib import Path

from adrec.features.pipeline import Features, latest_history
from adrec.model_version.registry import VersionEntry, registry_of, staging_dir
from adrec.model_version.writer import PSEUDONYM_KEY_FINGERPRINT, write_version
from adrec.run import RunDir


def publish(run: RunDir, ranker_dir: Path | None = None, extra: dict | None = None,
            make_live: bool = True) -> VersionEntry:
    """Assemble a version from the run's stages and commit it as the run's next version (on the run's
    store: ``RUN/versions/<n>``), live unless ``make_live`` is off."""
    feats = Features(run)
    cand = run.require(run.candidates, "candidates")
    ranker_dir = Path(ranker_dir or run.require(run.ranker, "train"))
    topk = run.path / "topk"  # adrec.candidates.stage.TOPK_DIR (not imported: it pulls in the sources)
    stages = run.manifest().get("stages", {})
    cand_info = stages.get("candidates", {})
    info = {"version": time.strftime("%Y%m%d-%H%M%S") + "-" + uuid.uuid4().hex[:6], "run": run.name,
            "n_users": feats.spec.n_users, "n_items": feats.spec.n_items,
            "context_field": cand_info.get("context_field"), "topk": topk.is_dir(),
            # DP-SGD's spent epsilon and delta (ranker.dp), None without it.
            "privacy": stages.get("train", {}).get("privacy"),
            # Which key pseudonymized the users (a fingerprint): Serve refuses to serve it with another.
            PSEUDONYM_KEY_FINGERPRINT: stages.get("prepare", {}).get(PSEUDONYM_KEY_FINGERPRINT), **(extra or {})}
    hist = latest_history(feats.interactions, feats.spec.n_users, feats.spec.history_len)
    registry = registry_of(run.location)
    path, _ = write_version(staging_dir(registry, info["version"]), info, features=run.features, history=hist,
                            seen=cand / "seen.npz", candidates=cand, ranker=ranker_dir,
                            topk=topk if topk.is_dir() else None)
    return registry.commit(path, make_live=make_live)
