"""The run's ``topk`` folder: fit the two-stage recommender after the candidates stage and record it.

``adrec candidates`` runs :func:`adrec.candidates.stage.build_candidates`, then :func:`fit_topk`: the
two-stage recommender builds on the candidate sources (it fits its own, configured in ``topk``), and
what it adds is reported with the candidates stage's outputs as before: its recall in
``candidates/recall.json`` and its fit summary under the manifest's ``candidates.topk``.
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from pathlib import Path

import scipy.sparse as sp

from adrec.candidates.evaluate import recall_at
from adrec.candidates.stage import RECALL_KS, build_candidates, evaluated_users
from adrec.config import AdrecConfig
from adrec.features.pipeline import Features
from adrec.run import RunDir

from .data import TopKData
from .recommender import TwoStageRecommender

__all__ = ["TOPK_DIR", "fit_candidate_stage", "fit_topk", "topk_dir", "two_stage_recall"]

TOPK_DIR = "topk"  # the fitted TwoStageRecommender, in the run and in a model version

log = logging.getLogger(__name__)


def topk_dir(run: RunDir) -> Path:
    return run.path / TOPK_DIR


def fit_candidate_stage(cfg: AdrecConfig, run: RunDir, show_progress: bool = True) -> dict:
    """What ``adrec candidates`` runs: the candidate sources, then (``topk.enabled``) the two-stage
    recommender that builds on them; the candidates stage's manifest record."""
    info = build_candidates(cfg, run, show_progress=show_progress)
    return fit_topk(cfg, run) if cfg.topk.enabled else info


def fit_topk(cfg: AdrecConfig, run: RunDir, feats=None) -> dict:
    """Fit :class:`~adrec.topk.recommender.TwoStageRecommender` from ``cfg.topk`` under the evaluation
    protocol and save it in ``<run>/topk``: the re-ranker learns which candidates the *valid* split's
    positives were, with sources fitted on train only (and on an inner stage carved from train), then
    the sources are refitted on train + valid. Test rows never reach it; they score its recall, added
    to the candidates stage's ``recall.json`` and manifest record (returned, as updated).

    Needs the candidates stage's outputs (its record and seen matrix); ``feats``: the run's
    :class:`~adrec.features.pipeline.Features` when the caller has them loaded.
    """
    t0 = time.perf_counter()
    cand = run.require(run.candidates, "candidates")
    feats = feats if feats is not None else Features(run)
    # topk.ranker_features: the stage rankers start from the ranker section's configuration
    rec = TwoStageRecommender(**cfg.topk.recommender_kwargs(), lm_config=cfg.ranker).fit(TopKData.from_features(feats))
    target = topk_dir(run)
    tmp = target.parent / f".{target.name}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    rec.save(tmp)
    shutil.rmtree(target, ignore_errors=True)
    tmp.rename(target)
    log.info("candidates: two-stage top-K (%s re-ranker) fitted in %.1fs", rec.ranker, time.perf_counter() - t0)

    seen = sp.load_npz(cand / "seen.npz").tocsr()
    stage = run.manifest().get("stages", {}).get("candidates", {})
    recall = {**stage.get("recall", {}), **two_stage_recall(rec, feats, seen)}
    (cand / "recall.json").write_text(json.dumps(recall, indent=2))
    info = {k: v for k, v in stage.items() if k not in ("topk", "recall", "seconds", "finished_at")}
    info.update(topk={"ranker": rec.ranker, "sources": list(rec.sources), **rec.fit_info}, recall=recall,
                seconds=round(stage.get("seconds", 0.0) + time.perf_counter() - t0, 2))
    run.update_manifest("candidates", info)
    return info


def two_stage_recall(rec: TwoStageRecommender, feats, seen: sp.csr_matrix) -> dict[str, float]:
    """Recall@50/100/200 of the two-stage recommender's ordered lists, on users with test positives."""
    users, truth = evaluated_users(feats)
    keep = users < rec.n_users
    ids, _, _ = rec.rank_lists(users[keep], max(RECALL_KS), exclude=seen)
    truth = [t for t, k in zip(truth, keep) if k]
    return {f"two_stage.{k}": v for k, v in recall_at(ids, truth, RECALL_KS).items()}
