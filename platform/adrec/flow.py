"""The stages of the flow, each on a run folder, in the order data moves through them.

The CLI, the Ray job entrypoints under ``pipelines/`` and the demo all call these functions,
so a stage behaves the same however it is started.
"""

from __future__ import annotations

import logging

from adrec.config import AdrecConfig, save_config
from adrec.run import RunDir

log = logging.getLogger(__name__)


def prepare(cfg: AdrecConfig, run: RunDir) -> dict:
    from adrec.features.pipeline import prepare as _prepare

    run.path.mkdir(parents=True, exist_ok=True)
    save_config(cfg, run.config_path)
    return _prepare(cfg, run)


def candidates(cfg: AdrecConfig, run: RunDir, show_progress: bool = True) -> dict:
    """Fit the candidate sources, then the two-stage top-K recommender that builds on them."""
    from adrec.topk import fit_candidate_stage

    return fit_candidate_stage(cfg, run, show_progress=show_progress)


def train(cfg: AdrecConfig, run: RunDir) -> dict:
    """Fine-tune the ranker on Ray Train, then publish the run's model version for Serve."""
    from adrec.model_version import publish
    from adrec.ranking.train import train_ranker
    from adrec.runtime import init_ray

    save_config(cfg, run.config_path)
    init_ray(cfg.ray)
    result = train_ranker(cfg, run)
    publish(run)
    return result


def evaluate(cfg: AdrecConfig, run: RunDir, show_progress: bool = True) -> dict:
    from adrec.evaluation.stage import evaluate as _evaluate

    return _evaluate(cfg, run, show_progress=show_progress)


