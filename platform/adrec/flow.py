"""The stages of the flow, each on a run, in the order data moves through them.

The CLI, the Ray job entrypoints under ``pipelines/`` and the demo all call these functions,
so a stage behaves the same however it is started. Each stage names what it reads and writes of the run:
for a run on an object store those are pulled into the local cache before it and pushed after it
(:meth:`adrec.run.RunDir.pull`); model versions and the manifest go to the store directly.
"""

from __future__ import annotations

import logging

from adrec.config import AdrecConfig, save_config
from adrec.run import CONFIG_NAME, RunDir

log = logging.getLogger(__name__)


def prepare(cfg: AdrecConfig, run: RunDir) -> dict:
    from adrec.features.pipeline import prepare as _prepare

    run.path.mkdir(parents=True, exist_ok=True)
    save_config(cfg, run.config_path)
    out = _prepare(cfg, run)
    run.push(CONFIG_NAME, "raw", "features")
    return out


def candidates(cfg: AdrecConfig, run: RunDir, show_progress: bool = True) -> dict:
    """Fit the candidate sources, then the two-stage top-K recommender that builds on them."""
    from adrec.topk import TOPK_DIR, fit_candidate_stage

    run.pull("features")
    out = fit_candidate_stage(cfg, run, show_progress=show_progress)
    run.push("candidates", TOPK_DIR)
    return out


def train(cfg: AdrecConfig, run: RunDir) -> dict:
    """Fine-tune the ranker on Ray Train, then publish the run's model version for Serve."""
    from adrec.model_version import publish
    from adrec.ranking.train import train_ranker
    from adrec.ranking.train.stage import train_storage
    from adrec.runtime import init_ray
    from adrec.topk import TOPK_DIR

    run.pull("features", "candidates", TOPK_DIR)
    init_ray(cfg.ray)
    train_storage(cfg.ranker, run)  # a refusal (storage the nodes cannot share) before the run's config changes
    save_config(cfg, run.config_path)
    run.push(CONFIG_NAME)
    result = train_ranker(cfg, run)
    run.push("ranker")
    result["version"] = publish(run).number
    return result


def evaluate(cfg: AdrecConfig, run: RunDir, show_progress: bool = True) -> dict:
    from adrec.evaluation.stage import evaluate as _evaluate

    run.pull("features", "candidates")
    out = _evaluate(cfg, run, show_progress=show_progress)
    run.push("report")
    return out


