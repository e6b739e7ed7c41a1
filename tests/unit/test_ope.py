"""Off-policy evaluation: the estimators against hand computations and known policy values, the feedback
log as a logged bandit sample (written by the real writers), and the boundary errors of the estimators and
of ``adrec evaluate-policy``. No Ray."""

from __future__ import annotations

import itertools
import json

import numpy as np
import pytest
from adrec import cli
from adrec.errors import DataError
from adrec.evaluation import ope
from adrec.evaluation.policy_eval import (
    LoggedImpression,
    LoggedList,
    build_sample,
    list_rounds,
    read_logged,
)
from adrec.feedback import open_log

# ---- the estimators on a tiny log, by hand -----------------------------------------------------------------
# round  position  reward  pscore  action_prob  weight  q_hat  q_pi
#   0       0        1      0.50      1.0        2.0     0.6   0.7
#   1       0        0      0.25      0.5        2.0     0.2   0.7
#   2       0        0      0.25      0.0        0.0     0.3   0.7
#   3       1        1      0.50      0.5        1.0     0.4   0.3
#   4       1        0      0.50      1.0        2.0     0.1   0.3
TINY = dict(reward=[1, 0, 0, 1, 0], pscore=[0.5, 0.25, 0.25, 0.5, 0.5], action_prob=[1.0, 0.5, 0.0, 0.5, 1.0],
            position=[0, 0, 0, 1, 1], q_hat=[0.6, 0.2, 0.3, 0.4, 0.1], q_pi=[0.7, 0.7, 0.7, 0.3, 0.3])


def _tiny(**kw):
    d = {**TINY, **kw}
    return ope.bandit_sample(d["reward"], d["pscore"], d["action_prob"], d["position"], q_hat=d["q_hat"],
                             q_pi=d["q_pi"])


def test_estimators_match_the_hand_computation():
    est = ope.estimate(_tiny(), n_boot=50)
    # IPS: position 0: (2*1 + 2*0 + 0*0) / 3 = 2/3; position 1: (1*1 + 2*0) / 2 = 1/2; overall (2 + 1) / 5
    assert est["ips"].by_position[0] == pytest.approx(2 / 3)
    assert est["ips"].by_position[1] == pytest.approx(0.5)
    assert est["ips"].value == pytest.approx(0.6)
    # SNIPS: position 0: 2 / (2 + 2 + 0) = 0.5; position 1: 1 / (1 + 2) = 1/3; overall (3*0.5 + 2/3) / 5
    assert est["snips"].by_position[0] == pytest.approx(0.5)
    assert est["snips"].by_position[1] == pytest.approx(1 / 3)
    assert est["snips"].value == pytest.approx((1.5 + 2 / 3) / 5)
    # DR: position 0: [2*(1-.6)+.7, 2*(0-.2)+.7, 0+.7] = [1.5, .3, .7] -> 2.5/3; position 1: [1*(1-.4)+.3,
    # 2*(0-.1)+.3] = [.9, .1] -> .5; overall (2.5 + 1.0) / 5
    assert est["dr"].by_position[0] == pytest.approx(2.5 / 3)
    assert est["dr"].by_position[1] == pytest.approx(0.5)
    assert est["dr"].value == pytest.approx(0.7)
    d = ope.diagnostics(_tiny())
    assert d["mean_weight"] == pytest.approx(7 / 5)
    assert d["nonzero_weight_share"] == pytest.approx(0.8)
    assert d["effective_sample_size"] == pytest.approx(49 / 13, abs=0.01)  # (sum w)^2 / sum w^2 = 7^2 / 13


def test_snips_equals_ips_when_each_positions_weights_average_one():
    rng = np.random.default_rng(3)
    n = 400
    pos = np.repeat([0, 1], n // 2)
    w = rng.uniform(0.2, 3.0, n)
    for p in (0, 1):  # rescale so that the weights of each position average exactly 1
        w[pos == p] /= w[pos == p].mean()
    pscore = np.full(n, 0.25)
    s = ope.bandit_sample(rng.integers(0, 2, n), pscore, w * pscore, pos)
    est = ope.estimate(s, ("ips", "snips"), n_boot=20)
    assert est["snips"].value == pytest.approx(est["ips"].value, abs=1e-12)
    # and they differ once the weights do not average 1
    s2 = ope.bandit_sample(s.reward, pscore, np.clip(w * pscore * 1.5, 0, 1), pos)
    est2 = ope.estimate(s2, ("ips", "snips"), n_boot=20)
    assert abs(est2["snips"].value - est2["ips"].value) > 0.01


def test_dr_with_an_exact_direct_model_is_the_direct_model_and_with_a_zero_one_is_ips():
    s = _tiny(q_hat=TINY["reward"])  # the direct model knows each logged reward: the weighted residual vanishes
    est = ope.estimate(s, ("dr",), n_boot=10)["dr"]
    assert est.value == pytest.approx(np.mean(TINY["q_pi"]))
    zero = ope.estimate(_tiny(q_hat=[0.0] * 5, q_pi=[0.0] * 5), ("ips", "dr"), n_boot=10)
    assert zero["dr"].value == pytest.approx(zero["ips"].value)


def test_estimated_rewards_and_action_dist_give_q_hat_q_pi_and_action_prob():
    # 2 rounds, 3 actions; obp's layout (rounds, actions, positions) with 2 positions
    dist = np.zeros((2, 3, 2))
    dist[:, :, 0] = [0.5, 0.5, 0.0]
    dist[:, :, 1] = [0.0, 0.25, 0.75]
    est = np.zeros((2, 3, 2))
    est[:, :, 0] = [0.1, 0.2, 0.3]
    est[:, :, 1] = [0.4, 0.5, 0.6]
    s = ope.bandit_sample([1, 0], [0.5, 0.5], position=[0, 1], action=[1, 2], action_dist=dist,
                          estimated_rewards=est)
    assert s.action_prob.tolist() == pytest.approx([0.5, 0.75])
    assert s.q_hat.tolist() == pytest.approx([0.2, 0.6])
    assert s.q_pi.tolist() == pytest.approx([0.15, 0.25 * 0.5 + 0.75 * 0.6])


def test_ips_and_dr_recover_a_known_policy_value():
    """A context-free 4-armed bandit: 100 logs of 2,000 rounds under a uniform logging policy; the evaluation
    policy's value is known exactly. Averaged over the logs, IPS and DR (with a biased direct model) land
    on it; the direct model alone does not."""
    rng = np.random.default_rng(0)
    ctr = np.array([0.05, 0.1, 0.2, 0.4])
    pi = np.array([0.1, 0.1, 0.2, 0.6])
    truth = float(pi @ ctr)
    q = ctr * 0.5 + 0.05  # a biased direct model
    ips, dr = [], []
    for _ in range(100):
        a = rng.integers(0, 4, 2000)
        r = (rng.random(2000) < ctr[a]).astype(float)
        s = ope.bandit_sample(r, np.full(2000, 0.25), pi[a], q_hat=q[a], q_pi=np.full(2000, pi @ q))
        e = ope.estimate(s, ("ips", "dr"), n_boot=1)
        ips.append(e["ips"].value)
        dr.append(e["dr"].value)
    assert np.mean(ips) == pytest.approx(truth, abs=0.004)
    assert np.mean(dr) == pytest.approx(truth, abs=0.004)
    assert abs(float(pi @ q) - truth) > 0.09  # 0.1975 vs 0.295


def test_bootstrap_is_seeded_and_its_intervals_widen_with_the_level():
    rng = np.random.default_rng(1)
    n = 1000
    s = ope.bandit_sample(rng.integers(0, 2, n), np.full(n, 0.5), rng.uniform(0, 1, n), rng.integers(0, 3, n),
                          group=np.arange(n) // 3)
    a = ope.estimate(s, n_boot=300, seed=5, level=0.8)
    b = ope.estimate(s, n_boot=300, seed=5, level=0.8)
    c = ope.estimate(s, n_boot=300, seed=5, level=0.99)
    assert set(a) == {"ips", "snips"}  # no direct model: no DR
    for k in a:
        assert (a[k].low, a[k].high) == (b[k].low, b[k].high)
        assert a[k].low < a[k].value < a[k].high
        assert c[k].low < a[k].low and c[k].high > a[k].high


def test_relative_error_pairs_the_replicates():
    est = ope.Estimate("ips", 0.012, 0, 0, 0.95, 3, replicates=np.array([0.011, 0.012, 0.013]))
    truth = ope.Estimate("on_policy", 0.010, 0, 0, 0.95, 3, replicates=np.array([0.010, 0.010, 0.010]))
    r = ope.relative_error(est, truth)
    assert r["value"] == pytest.approx(0.2)
    assert r["low"] == pytest.approx(0.105, abs=1e-6)  # the 2.5% quantile of the paired errors .1, .2, .3
    assert r["high"] == pytest.approx(0.295, abs=1e-6)


@pytest.mark.parametrize("kw, message", [
    (dict(pscore=[0.5, 0.0, 0.25, 0.5, 0.5]), r"pscore\[1\] = 0.0"),
    (dict(pscore=[0.5, 1.5, 0.25, 0.5, 0.5]), r"pscore\[1\] = 1.5"),
    (dict(action_prob=[1.0, 0.5, 0.0, 0.5]), "action_prob has 4 values but reward has 5"),
    (dict(action_prob=[1.0, 0.5, -0.1, 0.5, 1.0]), r"action_prob\[2\]"),
    (dict(position=[0, 0, 0, 1, -1]), "position must hold integers"),
    (dict(reward=[1, 0, np.nan, 1, 0]), r"reward\[2\] is nan"),
])
def test_bad_samples_are_refused_with_the_array_named(kw, message):
    with pytest.raises(ope.SampleError, match=message):
        _tiny(**kw)


def test_other_boundary_errors():
    with pytest.raises(ope.SampleError, match="empty"):
        ope.bandit_sample([], [], [])
    with pytest.raises(ope.SampleError, match="probability distribution"):
        ope.bandit_sample([1], [0.5], action=[0], action_dist=[[0.5, 0.6]])
    with pytest.raises(ope.SampleError, match="DR needs"):
        ope.estimate(ope.bandit_sample([1], [0.5], [0.5]), ("dr",), n_boot=1)
    with pytest.raises(ope.SampleError, match="both q_hat"):
        ope.bandit_sample([1], [0.5], [0.5], q_hat=[0.1])
    with pytest.raises(ope.SampleError, match="level"):
        ope.estimate(_tiny(), n_boot=5, level=95)
    assert isinstance(ope.SampleError("x"), DataError)  # the CLI reports it as a data error (exit 2)


# ---- the logged lists: cumulative weights of conditional propensities ------------------------------------
def _list(items_props, user="u", rid="r"):
    return LoggedList(rid, user, {}, [LoggedImpression(f"{rid}-{k}", user, it, 0.0, {}, rid, k, p)
                                      for k, (it, p) in enumerate(items_props)])


def test_list_rounds_by_hand():
    # the candidate ranks A > B > C (predicted CTR .5, .3, .1), epsilon 0.3; the log shows A (propensity .8)
    # then C (propensity .1). Position 0: remaining A, B, C: P(A) = .7 + .3/3 = .8, E[q] = .7*.5 + .3*(.9/3) = .44.
    # Position 1, given A above: remaining B, C: P(C) = .3/2 = .15, E[q] = .7*.3 + .3*(.4/2) = .27, times the
    # weight of the prefix (.8/.8 = 1).
    r = list_rounds(_list([("A", 0.8), ("C", 0.1)]), ["A", "B", "C"], {"A": 0.5, "B": 0.3, "C": 0.1}, 0.3)
    assert r.pscore == pytest.approx([0.8, 0.08])
    assert r.action_prob == pytest.approx([0.8, 0.12])
    assert r.q_hat == pytest.approx([0.5, 0.1])
    assert r.q_pi == pytest.approx([0.44, 0.27])
    # deterministic: C is not the candidate's choice at position 1, and once the prefix differs all is 0
    r0 = list_rounds(_list([("B", 0.5), ("A", 0.5)]), ["A", "B", "C"], {"A": 0.5, "B": 0.3, "C": 0.1}, 0.0)
    assert r0.action_prob == [0.0, 0.0]
    assert r0.q_pi == pytest.approx([0.5, 0.0])


def _eps_greedy(order, eps, k):
    """Every ordered list of ``k`` items an epsilon-greedy policy over ``order`` can serve, with its
    probability, and the conditional probability of each position given the items above."""
    out = []
    for lst in itertools.permutations(order, k):
        cond, shown = [], []
        for it in lst:
            rem = [x for x in order if x not in shown]
            cond.append((1 - eps) * (it == rem[0]) + eps / len(rem))
            shown.append(it)
        out.append((lst, float(np.prod(cond)), cond))
    return out


def test_cascade_weights_recover_the_value_of_another_ranking_from_conditional_propensities():
    """Logging: epsilon-greedy (0.5) over A > B > C; evaluation: epsilon-greedy (0.2) over C > B > A; a
    click depends on the item and its position. The evaluation policy's CTR is computed exactly; IPS and
    DR on the log's conditional propensities, with the products up to each position, land on it, while
    weighting each position by its own conditional ratio alone does not."""
    ctr = {"A": 0.1, "B": 0.3, "C": 0.6}
    pos_factor = [1.0, 0.5]
    logging, evaluation = _eps_greedy(["A", "B", "C"], 0.5, 2), _eps_greedy(["C", "B", "A"], 0.2, 2)
    truth = sum(p * np.mean([ctr[it] * pos_factor[k] for k, it in enumerate(lst)]) for lst, p, _ in evaluation)
    rng = np.random.default_rng(0)
    n = 40000
    picks = rng.choice(len(logging), n, p=[p for _, p, _ in logging])
    logged = []
    for g, j in enumerate(picks):
        lst, _, cond = logging[j]
        logged.append(_list(list(zip(lst, cond)), rid=str(g)))
    for lst in logged:
        for k, imp in enumerate(lst.impressions):
            imp.click = int(rng.random() < ctr[imp.item] * pos_factor[k])

    class _Logged:
        lists = logged

    q = {"A": 0.2, "B": 0.2, "C": 0.2}  # a poor direct model: DR must still be unbiased
    s = build_sample(_Logged, lambda user, ctx, items: (["C", "B", "A"], q), epsilon=0.2, show_progress=False)
    est = ope.estimate(s, ("ips", "snips", "dr"), n_boot=1)
    for k in ("ips", "snips", "dr"):
        assert est[k].value == pytest.approx(truth, abs=0.01), k
    # the naive per-position ratio (conditional probabilities as if they were marginal) is biased
    eval_cond = {lst: cond for lst, _, cond in evaluation}
    cond_e = [c for lst in logged for c in eval_cond[tuple(i.item for i in lst.impressions)]]
    cond_p = [imp.propensity for lst in logged for imp in lst.impressions]
    naive = ope.estimate(ope.bandit_sample(s.reward, cond_p, cond_e, s.position), ("ips",), n_boot=1)["ips"]
    assert abs(naive.value - truth) > 0.03


# ---- the feedback log, written by the real writers ----------------------------------------------------------
def _impression(eid, user, item, ts, rid, pos, prop, **extra):
    rec = {"event_id": eid, "user": user, "item": item, "type": "impression", "ts": ts, "context": {"slot": "top"},
           "received_at": ts, "version": "v1", "request_id": rid, "position": pos, "propensity": prop,
           "policy": "epsilon_greedy", "arm": None}
    rec.update(extra)
    return rec


def _click(eid, user, item, ts):
    return {"event_id": eid, "user": user, "item": item, "type": "click", "ts": ts, "context": {}, "received_at": ts,
            "version": "v1"}


LOG = [
    _impression("i1", "u1", "a", 100.0, "r1", 0, 0.9),
    _impression("i2", "u1", "b", 100.0, "r1", 1, 0.5),
    _click("c1", "u1", "b", 130.0),  # attributed to i2 (same user and item, within the window)
    _impression("i3", "u2", "c", 200.0, "r2", 0, 0.05),
    _impression("i4", "u2", "a", 200.0, "r2", 2, 0.5),  # below a gap (position 1 was not reported)
    _click("c2", "u2", "a", 5000.0),  # outside the 60 s window: not attributed
    _click("c3", "u3", "z", 210.0),  # no impression at all
]


@pytest.mark.parametrize("kind", ["file", "segments"])
def test_read_logged_from_a_log_written_by_the_real_writer(tmp_path, kind):
    where = tmp_path / ("events.jsonl" if kind == "file" else "segs")
    log = open_log(where, kind=kind, **({"group_wait_s": 0.01} if kind == "segments" else {}))
    w = log.writer()
    w.append(LOG[:3])
    w.append(LOG[3:] + [LOG[0]])  # a re-sent event: the writer keeps one copy
    w.close()
    got = read_logged(open_log(where, kind=kind).records(), window_s=60.0)
    assert got.counts == {"impressions": 4, "impressions_without_propensity": 0, "impressions_below_a_gap": 1,
                          "rounds": 3, "requests": 2, "clicks": 3, "attributed_clicks": 1}
    by_req = {lst.request_id: lst for lst in got.lists}
    assert [(i.item, i.position, i.propensity, i.click) for i in by_req["r1"].impressions] == \
        [("a", 0, 0.9, 0), ("b", 1, 0.5, 1)]
    assert [(i.item, i.click) for i in by_req["r2"].impressions] == [("c", 0)]
    assert by_req["r1"].context == {"slot": "top"}
    assert got.policies == {"epsilon_greedy": 3} and got.arms == {"none": 3}


def test_impressions_without_a_propensity_are_refused_with_how_to_log_them(tmp_path):
    recs = LOG[:3] + [{k: v for k, v in _impression("i9", "u9", "a", 300.0, "r9", 0, 1.0).items()
                       if k not in ("propensity", "position", "request_id")}]
    with pytest.raises(DataError, match=r"1 of 3 impressions .* carry no propensity.*exploration on"):
        read_logged(recs, window_s=60.0)
    got = read_logged(recs, window_s=60.0, skip_unlogged=True)
    assert got.counts["impressions_without_propensity"] == 1 and got.counts["rounds"] == 2
    with pytest.raises(DataError, match="no impression with a propensity"):
        read_logged(recs[3:], window_s=60.0, skip_unlogged=True)


@pytest.mark.parametrize("bad, message", [
    (dict(propensity=0.0), r"propensity 0.0 is not a probability in \(0, 1\]"),
    (dict(propensity=1.2), "propensity 1.2"),
    (dict(position=-1), "position -1 is not a 0-based rank"),
    (dict(position=1.5), "position 1.5"),
])
def test_bad_logged_values_name_the_impression(bad, message):
    with pytest.raises(DataError, match=f"impression i1 .*{message}"):
        read_logged([_impression("i1", "u1", "a", 1.0, "r1", 0, 0.5, **bad)], window_s=60.0)


def test_two_impressions_at_one_position_of_a_list_are_refused():
    recs = [_impression("i1", "u1", "a", 1.0, "r1", 0, 0.5), _impression("i2", "u1", "b", 1.0, "r1", 0, 0.5)]
    with pytest.raises(DataError, match="request r1 .* two impressions at position 0"):
        read_logged(recs, window_s=60.0)


# ---- the command's boundary ---------------------------------------------------------------------------------
def _write_log(path, records):
    w = open_log(path).writer()
    w.append(records)
    w.close()


def test_cli_refuses_a_log_without_propensities(tmp_path, capsys):
    log_path = tmp_path / "events.jsonl"
    _write_log(log_path, [{k: v for k, v in r.items() if k != "propensity"} for r in LOG])
    rc = cli.main(["evaluate-policy", "--run", str(tmp_path / "run"), "--version", "1", "--log", str(log_path)])
    err = capsys.readouterr().err
    assert rc == 2
    assert "carry no propensity" in err and "serve.exploration.policy=epsilon_greedy" in err


def test_cli_names_a_missing_version(tmp_path, capsys):
    log_path = tmp_path / "events.jsonl"
    _write_log(log_path, LOG)
    rc = cli.main(["evaluate-policy", "--run", str(tmp_path / "run"), "--version", "3", "--log", str(log_path)])
    assert rc == 2
    assert "no committed version 3" in capsys.readouterr().err


@pytest.mark.parametrize("extra, message", [(["--epsilon", "1.5"], "--epsilon must lie in"),
                                            (["--level", "95"], "--level strictly between")])
def test_cli_checks_its_arguments_before_reading_the_log(tmp_path, capsys, extra, message):
    rc = cli.main(["evaluate-policy", "--run", str(tmp_path / "run"), "--version", "1", "--log",
                   str(tmp_path / "absent.jsonl")] + extra)
    assert rc == 2
    assert message in capsys.readouterr().err


def test_cli_requires_the_version(tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main(["evaluate-policy", "--run", str(tmp_path)])
    assert exc.value.code == 2
    assert "--version" in capsys.readouterr().err


def test_plot_estimates_writes_a_png(tmp_path):
    from adrec.evaluation.plots import plot_estimates

    p = plot_estimates({"adrec": {"IPS": (0.5, 0.4, 0.6), "DR": (0.45, float("nan"), 0.5)},
                        "obp": {"IPS": (0.5, 0.41, 0.59)}}, tmp_path / "e.png", reference=("truth", 0.48))
    assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    json.dumps(ope.estimate(_tiny(), n_boot=5)["dr"].to_dict())  # the report's entries are JSON
