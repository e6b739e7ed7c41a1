"""``adrec evaluate-policy`` on the tiny trained run: a feedback log served epsilon-greedy over the live
version's own ranking (conditional propensities, as Serve's exploration logs them), written by the real
file writer; the command recomputes the version's probabilities from the version alone."""

from __future__ import annotations

import json

import numpy as np
import pytest
from adrec import cli
from adrec.evaluation.policy_eval import VersionRanking
from adrec.feedback import open_log
from adrec.model_version import live_dir, registry_of
from adrec.serving.recommender import Recommender

EPS, K, USERS = 0.3, 3, 40


def _served_log(run, cfg, path) -> float:
    """Lists served epsilon-greedy (EPS) over the version's ranking, clicks drawn from its predicted CTR;
    returns the log's CTR."""
    rec = Recommender(live_dir(run))
    ranking = VersionRanking(rec, cfg.candidates.n_candidates)
    rng = np.random.default_rng(0)
    records, n_imp, n_click = [], 0, 0
    for u, user in enumerate(list(rec.version.user_pos)[:USERS]):
        order, q = ranking(user, {}, [])
        shown = []
        for k in range(K):
            rem = [x for x in order if x not in shown]
            item = rem[0] if rng.random() >= EPS else rem[int(rng.integers(len(rem)))]
            prop = (1 - EPS) * (item == rem[0]) + EPS / len(rem)
            shown.append(item)
            ts = 1000.0 + 100 * u
            records.append({"event_id": f"i{u}-{k}", "user": user, "item": item, "type": "impression", "ts": ts,
                            "context": {}, "request_id": f"r{u}", "position": k, "propensity": prop,
                            "policy": "epsilon_greedy", "arm": None})
            n_imp += 1
        for k, item in enumerate(shown):  # the list's clicks follow it in the log, as they do in time
            if rng.random() < min(1.0, 3 * q[item]):
                records.append({"event_id": f"c{u}-{k}", "user": user, "item": item, "type": "click",
                                "ts": 1000.0 + 100 * u + 5, "context": {}})
                n_click += 1
    with open_log(path).writer() as w:
        w.append(records)
    return n_click / n_imp


def test_evaluate_policy_on_its_own_exploration_log(tiny_run, tiny_cfg, tmp_path, capsys):
    log_path = tmp_path / "events.jsonl"
    logged_ctr = _served_log(tiny_run, tiny_cfg, log_path)
    number = registry_of(tiny_run.location).live().number
    base = ["evaluate-policy", "--run", str(tiny_run.path), "--version", str(number), "--log", str(log_path),
            "--n-boot", "50"]
    # The version smoothed with the logging epsilon *is* the logging policy: every weight is 1, so IPS and
    # SNIPS are the log's own CTR.
    assert cli.main(base + ["--epsilon", str(EPS), "--out", str(tmp_path / "same")]) == 0
    rep = json.loads((tmp_path / "same" / "policy_eval.json").read_text())
    assert rep["logged"]["rounds"] == USERS * K and rep["logged"]["requests"] == USERS
    assert rep["diagnostics"]["mean_weight"] == pytest.approx(1.0, abs=1e-9)
    assert rep["diagnostics"]["max_weight"] == pytest.approx(1.0, abs=1e-9)
    assert rep["logged_ctr"]["value"] == pytest.approx(logged_ctr)
    for k in ("ips", "snips"):
        assert rep["estimates"][k]["value"] == pytest.approx(logged_ctr, abs=1e-7)  # (the report keeps 8 decimals)
    assert rep["estimates"]["dr"]["low"] <= rep["estimates"]["dr"]["value"] <= rep["estimates"]["dr"]["high"]
    assert (tmp_path / "same" / "policy_eval.png").read_bytes()[:4] == b"\x89PNG"
    assert "| IPS |" in capsys.readouterr().out
    # Deterministic top-K: only lists whose prefix matches the version's own top carry weight.
    assert cli.main(base + ["--out", str(tmp_path / "greedy")]) == 0
    d = json.loads((tmp_path / "greedy" / "policy_eval.json").read_text())["diagnostics"]
    assert 0.0 < d["nonzero_weight_share"] < 1.0
    assert d["max_weight"] > 1.0
