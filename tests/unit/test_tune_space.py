"""Search-space files: what loads, and every way a bad one is rejected by name (no Ray started)."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from adrec.cli import main
from adrec.config import build_config
from adrec.errors import ConfigError
from adrec.tuning.space import load_space, parse_space, to_param_space, trial_config

REPO = Path(__file__).resolve().parents[2]

GOOD = {
    "trainable": "ranker",
    "base": {"ranker": {"epochs": 3, "tiny_encoder": True}},
    "space": {
        "ranker.lr": {"loguniform": [1.0e-4, 1.0e-2]},
        "ranker.embed_dim": {"choice": [16, 32]},
        "ranker.dropout": {"uniform": [0.0, 0.3]},
        "ranker.cross_layers": {"grid": [1, 2]},
        "ranker.hidden": {"choice": [[64], [128, 64]]},
    },
    "metric": "valid_auc",
    "mode": "max",
    "num_samples": 3,
    "scheduler": {"asha": {"grace_period": 1, "max_t": 2}},
    "resources_per_trial": {"cpu": 1, "gpu": 0.5},
}


def _err(data) -> str:
    with pytest.raises(ConfigError) as exc:
        parse_space(data)
    return str(exc.value)


@pytest.mark.parametrize("name", ["ranker.yaml", "als.yaml"])
def test_shipped_space_files_load(name):
    spec, base = load_space(REPO / "tune_configs" / name)
    assert spec.name == Path(name).stem and spec.space
    assert build_config(base).to_dict() == base  # the merged base is a complete, valid config
    assert set(to_param_space(spec)) == set(spec.space)


def test_good_space_merges_base_over_the_run_config_and_counts_trials():
    run_cfg = build_config(overrides=["ranker.batch_size=64", "ranker.epochs=9"])
    spec, base = parse_space(GOOD, run_cfg)
    assert base["ranker"]["batch_size"] == 64  # from the run
    assert base["ranker"]["epochs"] == 3  # the space's base wins
    assert spec.expected_trials() == 3 * 2  # num_samples x grid
    assert spec.metric_name == "valid_auc" and spec.asha.max_t == 2
    assert spec.resources_per_trial.gpu == 0.5  # fractional GPU


def test_trial_config_applies_params_and_runs_only_the_selection_phase():
    spec, base = parse_space({**GOOD, "base": {"ranker": {"epochs": 5}}})
    cfg = trial_config(spec, base, {"ranker.lr": 0.003, "ranker.embed_dim": 16, "ranker.hidden": [64]})
    assert cfg.ranker.lr == 0.003 and cfg.ranker.embed_dim == 16 and cfg.ranker.hidden == [64]
    assert cfg.ranker.epochs == 2  # capped at ASHA's max_t
    assert cfg.ranker.refit is False


def test_unknown_top_level_key_is_named():
    msg = _err({**GOOD, "num_sample": 2})
    assert "unknown key 'num_sample'" in msg and "num_samples" in msg  # and lists the keys a file has


@pytest.mark.parametrize("key, named", [
    ("ranker.lrr", "ranker.lrr"),
    ("rankr.lr", "rankr"),
    ("ranker.lr.x", "ranker.lr.x"),
])
def test_unknown_space_key_is_named(key, named):
    msg = _err({**GOOD, "space": {key: {"uniform": [0.1, 0.2]}}})
    assert f"unknown key '{named}'" in msg


def test_unknown_base_key_is_named():
    assert "unknown key 'ranker.epoch'" in _err({**GOOD, "base": {"ranker": {"epoch": 2}}})


def test_unknown_scheduler_option_is_named():
    assert "unknown key 'scheduler.asha.grace'" in _err({**GOOD, "scheduler": {"asha": {"grace": 1}}})
    assert "hyperband" in _err({**GOOD, "scheduler": {"hyperband": {}}})


@pytest.mark.parametrize("space, words", [
    ({"data.synthetic.n_users": {"choice": [100, 200]}}, "cannot be searched by the ranker trainable"),
    ({"ranker.refit": {"choice": [True, False]}}, "sets it itself"),
    ({"ranker": {"choice": [1]}}, "is a section"),
    ({"ranker.lr": {"normal": [0, 1]}}, "unknown sampler 'normal'"),
    ({"ranker.lr": {"loguniform": [0, 1]}}, "loguniform needs low > 0"),
    ({"ranker.lr": {"uniform": [0.2, 0.1]}}, "low < high"),
    ({"ranker.dropout": {"uniform": [0.0, 1.5]}}, "ranker.dropout"),  # 1.5 is outside the config's range
    ({"ranker.embed_dim": {"choice": ["big"]}}, "ranker.embed_dim"),
    ({"ranker.lr": [0.1, 0.2]}, "must map to one sampler"),
])
def test_bad_space_entries_are_rejected(space, words):
    assert words in _err({**GOOD, "space": space})


def test_metric_must_be_one_the_trainable_reports():
    assert "metric 'auc'" in _err({**GOOD, "metric": "auc"})
    spec, _ = parse_space({"trainable": "als", "space": {"candidates.factors": {"grid": [8, 16]}}})
    assert spec.metric_name == "valid_recall@100"
    assert "cannot be searched by the als trainable" in _err({"trainable": "als", "space": GOOD["space"]})


def test_cli_reports_a_bad_space_file_by_key(tmp_path, capsys):
    run = tmp_path / "run"
    (run / "features").mkdir(parents=True)
    (run / "candidates").mkdir()
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({**GOOD, "space": {"ranker.learning_rate": {"loguniform": [1e-4, 1e-2]}}}))
    assert main(["tune", "--run", str(run), "--space", str(bad)]) == 2
    assert "unknown key 'ranker.learning_rate'" in capsys.readouterr().err
