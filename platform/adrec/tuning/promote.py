"""Promoting a search's best trial to the run, and writing the search's results.

- ranker: the best trial's latest epoch checkpoint holds its best epoch's weights; they become the
  run's ranker (``RUN/ranker``, calibrated on the validation split exactly as ``adrec train`` does),
  the trial's config becomes ``RUN/config.yaml``, and ``adrec.model_version.publish`` assembles the
  model version ``adrec serve`` loads (``RUN/model``).
- als: the best trial's config becomes ``RUN/config.yaml`` and the candidates stage is refitted with
  it (on train + valid, as ``adrec candidates`` always fits); the model version is republished when
  the run has a ranker.

Results: ``RUN/tune/results.json`` (and a copy in the search's folder) and ``RUN/report/tune.md``.
"""

from __future__ import annotations

import json
import logging
import math
import time
from pathlib import Path
from typing import Any

from adrec.config import save_config
from adrec.run import RunDir
from adrec.tuning.search import SearchOutcome
from adrec.tuning.space import trial_config

log = logging.getLogger(__name__)

RESULTS_JSON = "results.json"
REPORT_MD = "tune.md"


def best_config(outcome: SearchOutcome):
    if outcome.best is None:
        raise RuntimeError(_no_best_message(outcome))
    return trial_config(outcome.spec, outcome.base, outcome.best["params"],
                        source=f"best trial {outcome.best['trial_id']}")


def _no_best_message(outcome: SearchOutcome) -> str:
    errors = [f"{r['trial_id']}: {r['error']}" for r in outcome.trials if r["error"]]
    msg = f"no trial of the search in {outcome.path} reported a finite {outcome.metric}"
    if errors:
        msg += "; errors:\n  " + "\n  ".join(errors[:5])
    return msg


def promote(run: RunDir, outcome: SearchOutcome) -> dict:
    """Make the best trial the run's model: ranker/config (and model version). Returns what was written."""
    from adrec.model_version import publish

    best = outcome.best
    cfg = best_config(outcome)
    tune_info = {"search": outcome.spec.name, "trial_id": best["trial_id"], "metric": outcome.metric,
                 "value": best[f"best_{outcome.metric}"], "params": best["params"], "trial_path": best["path"]}
    out: dict[str, Any] = {"trial_id": best["trial_id"]}
    if outcome.spec.trainable == "ranker":
        out["ranker"] = str(_promote_ranker(run, cfg, best, tune_info))
    else:
        from adrec.topk import fit_candidate_stage

        info = fit_candidate_stage(cfg, run)
        out["candidates"] = str(run.candidates)
        out["candidates_recall"] = {k: v for k, v in info.get("recall", {}).items() if k.startswith("union")}
    save_config(cfg, run.config_path)
    out["config"] = str(run.config_path)
    if (run.ranker / "ranker.json").is_file():
        out["model"] = publish(run, extra={"tune": tune_info}).uri
    else:
        log.warning("the run has no ranker yet: run `adrec train --run %s` to publish a model version", run.path)
        out["model"] = None
    run.update_manifest("tune", {**tune_info, "trainable": outcome.spec.trainable,
                                 "trials": len(outcome.trials), "seconds": round(outcome.seconds, 2),
                                 "promoted": out})
    log.info("promoted trial %s (%s %.4f): %s", best["trial_id"], outcome.metric,
             tune_info["value"], ", ".join(f"{k}={v}" for k, v in best["params"].items()))
    return out


def _promote_ranker(run: RunDir, cfg, best: dict, tune_info: dict) -> Path:
    from adrec.features.pipeline import Features
    from adrec.ranking.train import finish, prepare_data
    from adrec.tuning.trainables import ranker_checkpoint_state

    state = ranker_checkpoint_state(best["path"], best.get("last_metrics"))
    data = prepare_data(cfg.ranker, Features(run))
    ranker = finish(cfg.ranker, data, state)
    ranker.info.update({"tune": tune_info})
    ranker.save(run.ranker)
    return run.ranker


# ---- results ----------------------------------------------------------------------------------------------
def _json_safe(x: Any) -> Any:
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, dict):
        return {k: _json_safe(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_json_safe(v) for v in x]
    if hasattr(x, "item") and not isinstance(x, (str, bytes)):
        try:
            return _json_safe(x.item())
        except (TypeError, ValueError):
            pass
    return x


def results_dict(outcome: SearchOutcome, promoted: dict | None = None) -> dict:
    spec = outcome.spec
    return _json_safe({
        "name": spec.name,
        "trainable": spec.trainable,
        "metric": outcome.metric,
        "mode": spec.mode,
        "scheduler": "asha" if spec.asha else "fifo",
        "num_samples": spec.num_samples,
        "expected_trials": outcome.expected_trials,
        "complete": outcome.complete,
        "resumed": outcome.restored,
        "seconds": round(outcome.seconds, 2),
        "path": str(outcome.path),
        "space": spec.space,
        "best": None if outcome.best is None else {k: v for k, v in outcome.best.items() if k != "last_metrics"},
        "promoted": promoted,
        "trials": [{k: v for k, v in r.items() if k != "last_metrics"} | {"metrics": r["last_metrics"]}
                   for r in outcome.trials],
        "written": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    })


def trials_table(outcome: SearchOutcome) -> str:
    from adrec.evaluation.report import markdown_table

    metric = outcome.metric
    best_id = outcome.best["trial_id"] if outcome.best else None
    recs = []
    for r in outcome.trials:
        rec: dict[str, Any] = {"trial": r["trial_id"] + (" *" if r["trial_id"] == best_id else ""),
                               "status": r["status"]}
        for k in outcome.spec.space:
            v = r["params"].get(k)
            rec[k] = v if not isinstance(v, (list, dict)) else json.dumps(v)
        rec[f"best {metric}"] = r[f"best_{metric}"]
        m = r["last_metrics"]
        shown = ("valid_auc", "valid_logloss") if outcome.spec.trainable == "ranker" else ("valid_recall@100", "valid_ndcg@10")
        for k in shown:
            rec[f"last {k}"] = m.get(k)
        if outcome.spec.trainable == "ranker":
            rec["epochs"] = r.get("epochs")
        rec["seconds"] = r["seconds"]
        recs.append(rec)
    return markdown_table(recs, floatfmt=".4g") if recs else "(no trials)"


def report_markdown(outcome: SearchOutcome, promoted: dict | None, run: RunDir) -> str:
    spec = outcome.spec
    best = outcome.best
    lines = [f"# Tune: {spec.name} ({spec.trainable})", ""]
    lines.append(f"- metric: `{outcome.metric}` ({spec.mode}), scheduler: {'ASHA' if spec.asha else 'FIFO'}, "
                 f"trials: {len(outcome.trials)} of {outcome.expected_trials}"
                 f"{'' if outcome.complete else ' (interrupted: rerun the same command to resume)'}"
                 f"{', resumed' if outcome.restored else ''}, wall time {outcome.seconds:.1f} s")
    if best is not None:
        params = ", ".join(f"`{k}={json.dumps(v)}`" for k, v in best["params"].items())
        lines.append(f"- best trial: **{best['trial_id']}** with {outcome.metric} = "
                     f"{best[f'best_{outcome.metric}']:.4f} ({params})")
    if promoted:
        where = ", ".join(f"{k}: `{v}`" for k, v in promoted.items() if k in ("ranker", "candidates", "config", "model") and v)
        lines.append(f"- promoted: {where}")
    lines.append(f"- TensorBoard: `tensorboard --logdir {run.tune}`  (one run per trial; HPARAMS tab compares them)")
    lines += ["", trials_table(outcome), "", "`*` marks the best trial."]
    errors = [r for r in outcome.trials if r["error"]]
    if errors:
        lines += ["", "## Errors", ""] + [f"- {r['trial_id']}: {r['error']}" for r in errors]
    return "\n".join(lines) + "\n"


def write_results(run: RunDir, outcome: SearchOutcome, promoted: dict | None = None) -> dict[str, Path]:
    """``RUN/tune/results.json`` (plus a copy in the search folder) and ``RUN/report/tune.md``."""
    data = json.dumps(results_dict(outcome, promoted), indent=2, default=str)
    run.tune.mkdir(parents=True, exist_ok=True)
    paths = {"results": run.tune / RESULTS_JSON, "report": run.report / REPORT_MD}
    _atomic(paths["results"], data)
    if outcome.path.is_dir():
        _atomic(outcome.path / RESULTS_JSON, data)
    run.report.mkdir(parents=True, exist_ok=True)
    _atomic(paths["report"], report_markdown(outcome, promoted, run))
    return paths


def _atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    tmp.replace(path)
