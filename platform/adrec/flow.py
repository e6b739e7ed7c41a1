"""The stages of the flow, each on a run folder, in the order data moves through them.

The CLI, the Ray job entrypoints under ``pipelines/`` and the demo all call these functions,
so a stage behaves the same however it is started.
"""

from __future__ import annotations

import logging
from pathlib import Path

from adrec.config import AdrecConfig, ConfigError, load_config, save_config
from adrec.run import RunDir

log = logging.getLogger(__name__)

CONFIG_NAME = "config.yaml"


def resolve_config(run: RunDir, config: str | Path | None = None, overrides: list[str] | None = None,
                   fresh: bool = False) -> AdrecConfig:
    """The run's own config (written by prepare), else ``config``, else defaults; then overrides.

    ``fresh`` (prepare) starts from ``config`` or defaults even when the run has one.
    """
    stored = run.path / CONFIG_NAME
    if config is not None:
        return load_config(config, overrides)
    if stored.exists() and not fresh:
        return load_config(stored, overrides)
    return load_config(None, overrides)


def prepare(cfg: AdrecConfig, run: RunDir) -> dict:
    from adrec.features.pipeline import prepare as _prepare

    run.path.mkdir(parents=True, exist_ok=True)
    save_config(cfg, run.path / CONFIG_NAME)
    return _prepare(cfg, run)


def candidates(cfg: AdrecConfig, run: RunDir, show_progress: bool = True) -> dict:
    """Fit the candidate sources, then the two-stage top-K recommender that builds on them."""
    from adrec.candidates.stage import build_candidates
    from adrec.topk import fit_topk

    info = build_candidates(cfg, run, show_progress=show_progress)
    return fit_topk(cfg, run) if cfg.topk.enabled else info


def train(cfg: AdrecConfig, run: RunDir) -> dict:
    """Fine-tune the ranker on Ray Train, then publish the run's model version for Serve."""
    from adrec.model_version import publish
    from adrec.ranking.train import train_ranker
    from adrec.runtime import init_ray

    save_config(cfg, run.path / CONFIG_NAME)
    init_ray(cfg.ray)
    result = train_ranker(cfg, run)
    publish(run)
    return result


def evaluate(cfg: AdrecConfig, run: RunDir, show_progress: bool = True) -> dict:
    from adrec.evaluation.stage import evaluate as _evaluate

    return _evaluate(cfg, run, show_progress=show_progress)


def check_gpu_request(cfg: AdrecConfig) -> None:
    if cfg.ranker.use_gpu:
        import torch

        if not torch.cuda.is_available():
            raise ConfigError("--gpu was asked for, but torch sees no CUDA device on this machine")
