"""Serving strategy without Ray: objectives, exploration policies and their propensities, A/B assignment,
the /feedback serving fields, and item bids from the schema into the item table."""

from __future__ import annotations

import hashlib
import math
import textwrap
from collections import Counter

import numpy as np
import pandas as pd
import pytest
from adrec.config import ABConfig, ExplorationConfig, build_config
from adrec.data import DataError, load_schema, read_dataset
from adrec.errors import ApiError
from adrec.features.rows import fill_bids
from adrec.serving.abtest import ArmAssigner, assigner, unit_hash
from adrec.serving.schemas import FeedbackRequest, validate
from adrec.serving.strategy import (
    EpsilonGreedy,
    Policy,
    Strategy,
    Thompson,
    beta_params,
    epsilon_propensities,
    make_policy,
    objective_values,
    request_rng,
    thompson_alternatives,
)
from pydantic import ValidationError
from scipy import integrate, stats

ITEMS = np.array([3, 1, 4, 0, 2])
PROBS = np.array([0.30, 0.10, 0.20, 0.05, 0.15])


# ---- objectives ---------------------------------------------------------------------------------------
def test_objective_values_order_by_relevance_clicks_or_value():
    bids = np.array([0.5, 4.0, 1.0, 1.0, 2.0])
    assert objective_values("expected_clicks", PROBS).tolist() == pytest.approx(PROBS.tolist())
    assert objective_values("expected_value", PROBS, bids) == pytest.approx(bids * PROBS)
    # pCTCVR, when a ranker gives it, replaces pCTR in the value
    ctcvr = PROBS / 10
    assert objective_values("expected_value", PROBS, bids, ctcvr) == pytest.approx(bids * ctcvr)
    # relevance: a two-stage list keeps its own order; other lists are ordered by the click probability
    assert np.argsort(-objective_values("relevance", PROBS, list_order=True)).tolist() == [0, 1, 2, 3, 4]
    assert objective_values("relevance", PROBS).tolist() == pytest.approx(PROBS.tolist())
    with pytest.raises(ValueError, match="bids"):
        objective_values("expected_value", PROBS)


def test_expected_value_can_put_a_less_clicked_item_first():
    bids = np.array([0.5, 4.0, 1.0, 1.0, 2.0])  # item 1: pCTR 0.10 but bid 4 -> value 0.4 > 0.15
    s = Strategy("expected_value", Policy(), 5)
    sel = s.choose(ITEMS, PROBS, bids, 3, request_rng("ab"), list_order=False)
    assert sel.order.tolist() == [1, 4, 2]  # values 0.40, 0.30, 0.20 (ties none)
    assert sel.propensities.tolist() == [1.0, 1.0, 1.0]
    clicks = Strategy("expected_clicks", Policy(), 5).choose(ITEMS, PROBS, bids, 3, request_rng("ab"), False)
    assert clicks.order.tolist() == [0, 2, 4]


# ---- epsilon-greedy -----------------------------------------------------------------------------------
@pytest.mark.parametrize("m,eps", [(1, 0.3), (5, 0.1), (7, 1.0), (4, 0.0)])
def test_epsilon_propensities_over_a_positions_alternatives_sum_to_one(m, eps):
    p = epsilon_propensities(m, eps)
    assert p.sum() == pytest.approx(1.0, abs=1e-12)
    assert p[0] == pytest.approx(1 - eps + eps / m)
    assert np.all(p > 0) or eps == 0


def test_epsilon_zero_is_greedy():
    greedy = Policy().select(ITEMS, PROBS, PROBS, np.ones(5), 4, request_rng("00"))
    for seed in ("01", "ff", "1234"):
        eps0 = EpsilonGreedy(0.0).select(ITEMS, PROBS, PROBS, np.ones(5), 4, request_rng(seed))
        assert eps0.order.tolist() == greedy.order.tolist() == [0, 2, 4, 1]
        assert eps0.propensities.tolist() == [1.0] * 4


def test_epsilon_greedy_frequencies_match_its_propensities():
    """The logged propensity of what was served is the frequency with which it is served (exact formula)."""
    pol, n = EpsilonGreedy(0.3), 20_000
    rng = np.random.default_rng(0)
    firsts, seconds, logged = Counter(), Counter(), {}
    for _ in range(n):
        sel = pol.select(ITEMS, PROBS, PROBS, np.ones(5), 2, rng)
        firsts[int(sel.order[0])] += 1
        logged[int(sel.order[0])] = sel.propensities[0]
        if sel.order[0] == 0:
            seconds[int(sel.order[1])] += 1
            logged[("2nd", int(sel.order[1]))] = sel.propensities[1]
    for pos, count in firsts.items():
        p = logged[pos]
        assert count / n == pytest.approx(p, abs=4 * math.sqrt(p * (1 - p) / n))
    # second position, given the best item first: 4 alternatives left
    assert logged[("2nd", 2)] == pytest.approx(0.7 + 0.3 / 4)
    assert logged[("2nd", 1)] == pytest.approx(0.3 / 4)
    total = sum(seconds.values())
    for pos, count in seconds.items():
        p = logged[("2nd", pos)]
        assert count / total == pytest.approx(p, abs=4 * math.sqrt(p * (1 - p) / total))


# ---- Thompson -----------------------------------------------------------------------------------------
def _exact_argmax(a: np.ndarray, b: np.ndarray, w: np.ndarray) -> np.ndarray:
    """P(item i has the largest w * theta, theta_j ~ Beta(a_j, b_j) independent): one integral per item."""
    out = []
    for i in range(len(a)):
        def f(t, i=i):
            others = [stats.beta.cdf(min(1.0, w[i] * t / w[j]), a[j], b[j]) for j in range(len(a)) if j != i]
            return stats.beta.pdf(t, a[i], b[i]) * np.prod(others)
        out.append(integrate.quad(f, 0, 1, limit=200)[0])
    return np.asarray(out)


@pytest.mark.parametrize("weights", [np.ones(3), np.array([1.0, 2.5, 0.8])])
def test_thompson_propensity_estimate_is_within_tolerance_of_the_exact_value(weights):
    items, probs = np.array([2, 0, 1]), np.array([0.30, 0.12, 0.25])  # pool order != item order
    a, b = beta_params(probs, 20.0)
    exact = _exact_argmax(a, b, weights)
    assert exact.sum() == pytest.approx(1.0, abs=1e-6)
    draws = 20_000
    pol = Thompson(20.0, draws)
    for seed in ("0a", "0b", "0c"):
        sel = pol.select(items, probs, probs, weights, 1, request_rng(seed))
        pick = int(sel.order[0])
        tol = 4 * math.sqrt(exact[pick] * (1 - exact[pick]) / draws) + 1 / draws
        assert sel.propensities[0] == pytest.approx(exact[pick], abs=tol)
    # the second position, given item 0 first: the exact two-item argmax
    rest = _exact_argmax(a[1:], b[1:], weights[1:])
    rng = np.random.default_rng(1)
    draws_rest = rng.beta(a, b, size=(draws, 3)) * weights
    est = thompson_alternatives(draws_rest, np.array([False, True, True]))
    assert est[0] == 0 and est[1:].sum() == pytest.approx(1.0)
    assert est[1:] == pytest.approx(rest, abs=4 * math.sqrt(0.25 / draws))


def test_thompson_propensities_over_alternatives_sum_to_one_and_the_served_one_is_positive():
    rng = np.random.default_rng(3)
    draws = rng.beta(*beta_params(PROBS, 5.0), size=(50, 5))
    for mask in (np.ones(5, bool), np.array([True, False, True, False, True])):
        est = thompson_alternatives(draws, mask)
        assert est.sum() == pytest.approx(1.0) and np.all(est[~mask] == 0)
    pol = Thompson(5.0, 3)  # very few draws: the served draw still counts, so propensities stay in (0, 1]
    for seed in range(20):
        sel = pol.select(ITEMS, PROBS, PROBS, np.ones(5), 5, np.random.default_rng(seed))
        assert np.all(sel.propensities >= 1 / 4) and np.all(sel.propensities <= 1)
        assert sorted(sel.order.tolist()) == [0, 1, 2, 3, 4]
        assert sel.propensities[-1] == pytest.approx(1.0)  # the last item left has no alternative


def test_a_request_id_replays_its_list():
    pol = make_policy(ExplorationConfig(policy="thompson"))
    one = pol.select(ITEMS, PROBS, PROBS, np.ones(5), 3, request_rng("c0ffee"))
    two = pol.select(ITEMS, PROBS, PROBS, np.ones(5), 3, request_rng("c0ffee"))
    assert one.order.tolist() == two.order.tolist() and one.propensities.tolist() == two.propensities.tolist()
    assert isinstance(make_policy(ExplorationConfig()), Policy) and make_policy(ExplorationConfig()).name == "greedy"


# ---- A/B ----------------------------------------------------------------------------------------------
AB = ABConfig(arms=[{"name": "control", "share": 0.3}, {"name": "treatment", "share": 0.7}], salt="exp-1")


def test_ab_assignment_is_a_stable_function_of_the_user():
    users = [f"u_{i:06x}" for i in range(2000)]
    first = [ArmAssigner(AB)(u) for u in users]
    assert [ArmAssigner(AB.model_copy())(u) for u in users] == first  # another replica, another process
    # the hash is SHA-256 of salt NUL pseudonym: nothing process-local (Python's hash() is salted per process)
    h = int.from_bytes(hashlib.sha256(b"exp-1\0u_000000").digest()[:8], "big") / 2.0 ** 64
    assert unit_hash("u_000000", "exp-1") == h
    assert first[0] == ("control" if h < 0.3 else "treatment")
    other = ArmAssigner(AB.model_copy(update={"salt": "exp-2"}))
    moved = sum(a != other(u) for a, u in zip(first, users)) / len(users)
    assert 0.3 < moved < 0.55  # a new salt re-draws: 2 * 0.3 * 0.7 = 0.42 expected
    assert assigner(None)("u_1") is None


@pytest.mark.parametrize("shares", [(0.5, 0.5), (0.3, 0.7), (0.1, 0.6, 0.3)])
def test_ab_assignment_is_near_the_configured_shares(shares):
    ab = ABConfig(arms=[{"name": f"a{i}", "share": s} for i, s in enumerate(shares)])
    n = 20_000
    counts = Counter(ArmAssigner(ab)(f"u_{i}") for i in range(n))
    for i, s in enumerate(shares):  # binomial tolerance: 4 standard deviations
        assert abs(counts[f"a{i}"] - n * s) < 4 * math.sqrt(n * s * (1 - s)), counts


def test_ab_config_is_checked():
    with pytest.raises(ValidationError, match="sum to 1"):
        ABConfig(arms=[{"name": "a", "share": 0.5}, {"name": "b", "share": 0.4}])
    with pytest.raises(ValidationError, match="unique"):
        ABConfig(arms=[{"name": "a", "share": 0.5}, {"name": "a", "share": 0.5}])
    with pytest.raises(ValidationError):
        ABConfig(arms=[{"name": "a", "share": 1.0}])
    cfg = build_config(overrides=["serve.objective=expected_value", "serve.exploration.policy=thompson",
                                  "serve.ab={arms: [{name: a, share: 0.5}, {name: b, share: 0.5, model_dir: /v}]}"])
    assert cfg.serve.ab.arms[1].model_dir == "/v" and cfg.serve.exploration.policy == "thompson"
    with pytest.raises(Exception, match="serve.exploration.epsilon"):
        build_config(overrides=["serve.exploration.epsilon=1.5"])


# ---- /feedback serving fields ---------------------------------------------------------------------------
def _imp(**kw) -> dict:
    return {"events": [{"event_id": "e1", "user_id": "u", "item": "a1", "type": "impression", "ts": 100.0, **kw}]}


def test_feedback_impressions_take_position_propensity_policy_and_request_id():
    req = validate(FeedbackRequest, _imp(position=2, propensity=0.25, policy="epsilon_greedy", request_id="r1"))
    e = req.events[0]
    assert (e.position, e.propensity, e.policy, e.request_id) == (2, 0.25, "epsilon_greedy", "r1")
    assert validate(FeedbackRequest, _imp(position=0, propensity=1, policy="greedy")).events[0].propensity == 1.0
    assert validate(FeedbackRequest, _imp()).events[0].propensity is None  # all optional


@pytest.mark.parametrize("fields,message", [
    ({"position": 0, "propensity": 0.0, "policy": "thompson"}, "propensity"),
    ({"position": 0, "propensity": 1.5, "policy": "thompson"}, "propensity"),
    ({"position": -1, "propensity": 0.5, "policy": "thompson"}, "position"),
    ({"position": 0, "propensity": 0.5, "policy": "random"}, "policy"),
    ({"position": 0, "propensity": 0.5}, "policy missing"),
    ({"position": 0, "propensity": 0.5, "policy": "greedy", "type": "click"}, "only impressions"),
    ({"arm": "treatment"}, "arm: unknown field"),  # the server decides the arm, never the client
])
def test_feedback_serving_fields_are_validated(fields, message):
    with pytest.raises(ApiError, match=message) as err:
        validate(FeedbackRequest, _imp(**fields))
    assert err.value.status == 422


# ---- bids ---------------------------------------------------------------------------------------------
def _schema(tmp_path, ads: str, extra: str = ""):
    (tmp_path / "imp.csv").write_text("user_id,ad_id,ts,clicked\nu1,a1,100,1\nu2,a2,200,0\nu3,a3,300,0\n")
    (tmp_path / "ads.csv").write_text(textwrap.dedent(ads).lstrip())
    (tmp_path / "schema.yaml").write_text(textwrap.dedent("""
        interactions: {path: imp.csv, user: user_id, item: ad_id, timestamp: ts, label: clicked}
        items:
          path: ads.csv
          id: ad_id
          bid: cpc
        """) + extra)
    return load_schema(tmp_path / "schema.yaml")


def test_bids_are_read_from_the_named_column(tmp_path):
    schema, root = _schema(tmp_path, "ad_id,cpc\na1,0.5\na2,2\na3,0\n")
    raw = read_dataset(schema, root, b"k")
    assert raw.items.set_index("item")["bid"].to_dict() == {"a1": 0.5, "a2": 2.0, "a3": 0.0}
    assert "item.cpc" not in raw.items  # a bid is not a ranker feature unless the schema lists it as one


def test_a_missing_bid_is_an_error_naming_the_column_unless_a_default_is_stated(tmp_path):
    schema, root = _schema(tmp_path, "ad_id,cpc\na1,0.5\na2,\na3,1\n")
    with pytest.raises(DataError, match=r"column 'cpc' \(items.bid\), row 3: no bid.*bid_default"):
        read_dataset(schema, root, b"k")
    schema, root = _schema(tmp_path, "ad_id,cpc\na1,0.5\na2,\n", extra="  bid_default: 0.25\n")
    items = read_dataset(schema, root, b"k").items.set_index("item")["bid"]
    assert items["a2"] == 0.25
    # an item of the interactions that the items table lacks (a3): the default, or an error
    catalog = pd.DataFrame({"item": ["a1", "a2", "a3"], "bid": [0.5, 0.25, np.nan]})
    assert fill_bids(catalog.copy(), schema.items)["bid"].tolist() == [0.5, 0.25, 0.25]
    no_default = schema.items.model_copy(update={"bid_default": None})
    with pytest.raises(DataError, match=r"'cpc' \(items.bid\): 1 item\(s\).*'a3'"):
        fill_bids(catalog.copy(), no_default)


def test_a_bid_that_is_not_a_number_or_negative_is_a_bad_row(tmp_path):
    for bad in ("cheap", "-1"):
        schema, root = _schema(tmp_path, f"ad_id,cpc\na1,0.5\na2,{bad}\na3,1\n")
        with pytest.raises(DataError, match=r"column 'cpc', row 3: not a bid"):
            read_dataset(schema, root, b"k")
