"""Off-policy estimators on a logged bandit sample: IPS, self-normalised IPS, doubly robust, and the on-policy mean.

A *round* is one logged impression: the action shown at one position, its reward (a click), the logging
policy's probability of that action at that position (``pscore``), and the evaluation policy's
probability of the same action at the same position (``action_prob``). With ``w = action_prob / pscore``
per round, the estimates of the evaluation policy's expected reward at position ``p`` are (``R_p``: the
rounds at ``p``, ``n_p`` of them)::

    IPS_p   = sum_{R_p} w * r / n_p
    SNIPS_p = sum_{R_p} w * r / sum_{R_p} w            (normalised per position)
    DR_p    = sum_{R_p} (w * (r - q_hat) + q_pi) / n_p

``q_hat``: the direct model's estimate for the logged action, ``q_pi``: its expected value under the
evaluation policy in that round (see :func:`bandit_sample`, which also derives both from an estimate per
action and the evaluation policy's action distribution). Positions are estimated independently (as obp
does with ``position``) and the overall value is their average weighted by the rounds at each position
(``n_p / n``): the policy's reward per impression, its CTR when rewards are clicks. For IPS and DR that
is the plain mean over rounds (what obp computes); SNIPS differs from obp's, which normalises over all
rounds at once.

Confidence intervals are percentile bootstrap intervals (seeded): rounds are resampled with
replacement, or whole groups of rounds (``group``: a served list) when given, since the positions of
one list share a user and a moment.

numpy only; nothing here knows where the sample came from (:mod:`adrec.evaluation.policy_eval` reads
adrec's feedback log into one; ``benchmarks/ope.py`` the Open Bandit Dataset).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field

import numpy as np

from adrec.errors import DataError

log = logging.getLogger(__name__)

#: The estimators :func:`estimate` knows, in report order.
ESTIMATORS = ("ips", "snips", "dr")
_LABELS = {"ips": "IPS", "snips": "SNIPS", "dr": "DR", "on_policy": "on-policy mean"}


class SampleError(DataError):
    """A logged sample that an estimator cannot use; the message says which array and how to fix it."""


@dataclass(frozen=True)
class BanditSample:
    """A validated logged bandit sample (build it with :func:`bandit_sample`)."""

    reward: np.ndarray  # (n,) float
    pscore: np.ndarray  # (n,) logging probability of the shown action at its position, in (0, 1]
    action_prob: np.ndarray  # (n,) evaluation probability of the same, in [0, 1]
    position: np.ndarray  # (n,) int >= 0
    q_hat: np.ndarray | None = None  # (n,) direct model at the logged action
    q_pi: np.ndarray | None = None  # (n,) direct model's expected value under the evaluation policy
    group: np.ndarray | None = None  # (n,) int codes of the bootstrap's resampling units

    @property
    def n(self) -> int:
        return int(self.reward.shape[0])

    @property
    def weights(self) -> np.ndarray:
        return self.action_prob / self.pscore

    @property
    def has_direct_model(self) -> bool:
        return self.q_hat is not None and self.q_pi is not None


def _vector(name: str, x, n: int | None, dtype=np.float64) -> np.ndarray:
    a = np.asarray(x, dtype=dtype)
    if a.ndim != 1:
        raise SampleError(f"{name} must be one value per logged round (1-D), got shape {a.shape}")
    if n is not None and a.shape[0] != n:
        raise SampleError(f"{name} has {a.shape[0]} values but reward has {n}: every array holds one value per "
                          "logged round, in the same order")
    if a.dtype.kind == "f" and not np.all(np.isfinite(a)):
        bad = int(np.flatnonzero(~np.isfinite(a))[0])
        raise SampleError(f"{name}[{bad}] is {a[bad]}: every value must be finite")
    return a


def _per_position(name: str, x, n: int, position: np.ndarray) -> np.ndarray:
    """(n, n_actions) as it is, or (n, n_actions, n_positions) at each round's position (obp's layout)."""
    a = np.asarray(x, dtype=np.float64)
    if a.ndim == 3:
        if a.shape[0] != n:
            raise SampleError(f"{name} has {a.shape[0]} rows but reward has {n}")
        if position.max(initial=0) >= a.shape[2]:
            raise SampleError(f"{name} has {a.shape[2]} positions but position reaches {int(position.max())}")
        a = a[np.arange(n), :, position]
    if a.ndim != 2 or a.shape[0] != n:
        raise SampleError(f"{name} must be (rounds, actions) or (rounds, actions, positions) with {n} rounds, "
                          f"got shape {np.shape(x)}")
    if not np.all(np.isfinite(a)):
        raise SampleError(f"{name} holds non-finite values")
    return a


def bandit_sample(reward, pscore, action_prob=None, position=None, *, q_hat=None, q_pi=None,
                  estimated_rewards=None, action=None, action_dist=None, group=None) -> BanditSample:
    """Check a logged sample and return it as a :class:`BanditSample`.

    The evaluation policy is given either per round (``action_prob``; for DR also ``q_hat`` and ``q_pi``)
    or as its distribution over actions (``action_dist``: (rounds, actions) or obp's (rounds, actions,
    positions), with ``action``: the logged action's index); ``estimated_rewards`` (the direct model's
    estimate for every action, same layout) then gives ``q_hat`` and ``q_pi``.

    Refused, with the array and round named: a propensity of 0 (the logging policy could not have shown
    that action: the log or its propensities are wrong) or above 1, an evaluation probability outside
    [0, 1], arrays of different lengths, negative or non-integer positions.
    """
    r = _vector("reward", reward, None)
    n = r.shape[0]
    if n == 0:
        raise SampleError("the logged sample is empty: there is nothing to estimate from")
    p = _vector("pscore", pscore, n)
    if np.any(p <= 0) or np.any(p > 1):
        i = int(np.flatnonzero((p <= 0) | (p > 1))[0])
        raise SampleError(f"pscore[{i}] = {float(p[i])}: a logging propensity must lie in (0, 1] (0 means the logging "
                          "policy could not have shown that action there; above 1 is not a probability)")
    if position is None:
        pos = np.zeros(n, np.int64)
    else:
        raw = np.asarray(position)
        pos = _vector("position", raw, n, dtype=np.float64)
        if np.any(pos < 0) or np.any(pos != np.round(pos)):
            raise SampleError("position must hold integers >= 0 (0 = the top of the list)")
        pos = pos.astype(np.int64)
    if action_dist is not None:
        if action is None:
            raise SampleError("action_dist needs action: the index of the logged action in each round")
        act = _vector("action", action, n, dtype=np.float64).astype(np.int64)
        dist = _per_position("action_dist", action_dist, n, pos)
        if np.any(act < 0) or np.any(act >= dist.shape[1]):
            raise SampleError(f"action must index the {dist.shape[1]} actions of action_dist")
        if np.any(dist < -1e-12) or np.any(np.abs(dist.sum(axis=1) - 1) > 1e-6):
            raise SampleError("action_dist must be a probability distribution over actions in every round "
                              "(non-negative, summing to 1 at each round's position)")
        derived = dist[np.arange(n), act]
        if action_prob is not None and not np.allclose(_vector("action_prob", action_prob, n), derived, atol=1e-9):
            raise SampleError("action_prob disagrees with action_dist at the logged actions: give one of them")
        action_prob = derived
        if estimated_rewards is not None:
            est = _per_position("estimated_rewards", estimated_rewards, n, pos)
            if est.shape != dist.shape:
                raise SampleError(f"estimated_rewards has {est.shape[1]} actions, action_dist {dist.shape[1]}")
            q_hat, q_pi = est[np.arange(n), act], (dist * est).sum(axis=1)
    elif estimated_rewards is not None:
        raise SampleError("estimated_rewards needs action_dist (and action): the expected value under the "
                          "evaluation policy is taken over its distribution; or pass q_hat and q_pi")
    if action_prob is None:
        raise SampleError("the evaluation policy is missing: pass action_prob (per round) or action_dist")
    e = _vector("action_prob", action_prob, n)
    if np.any(e < 0) or np.any(e > 1 + 1e-12):
        i = int(np.flatnonzero((e < 0) | (e > 1 + 1e-12))[0])
        raise SampleError(f"action_prob[{i}] = {float(e[i])}: an evaluation probability must lie in [0, 1]")
    if (q_hat is None) != (q_pi is None):
        raise SampleError("the direct model needs both q_hat (at the logged action) and q_pi (expected under the "
                          "evaluation policy), or estimated_rewards with action_dist")
    qh = None if q_hat is None else _vector("q_hat", q_hat, n)
    qp = None if q_pi is None else _vector("q_pi", q_pi, n)
    g = None
    if group is not None:
        _, g = np.unique(np.asarray(group), return_inverse=True)
        g = _vector("group", g.reshape(-1), n, dtype=np.int64)
    return BanditSample(r, p, np.clip(e, 0.0, 1.0), pos, qh, qp, g)


# ---- the estimators -----------------------------------------------------------------------------------
def _position_values(name: str, s: BanditSample, counts: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Per position: (value, rounds) under bootstrap ``counts`` per round ((b, n) multiplicities; None = 1).

    Returns arrays of shape (b, n_positions) (b = 1 without counts).
    """
    c = np.ones((1, s.n)) if counts is None else counts
    n_pos = int(s.position.max()) + 1
    onehot = np.zeros((s.n, n_pos))
    onehot[np.arange(s.n), s.position] = 1.0
    rounds = c @ onehot  # (b, P)
    w = s.weights
    if name == "ips":
        num, den = c @ (onehot * (w * s.reward)[:, None]), rounds
    elif name == "snips":
        num, den = c @ (onehot * (w * s.reward)[:, None]), c @ (onehot * w[:, None])
    elif name == "dr":
        if not s.has_direct_model:
            raise SampleError("DR needs the direct model's estimates (q_hat and q_pi, or estimated_rewards)")
        num, den = c @ (onehot * (w * (s.reward - s.q_hat) + s.q_pi)[:, None]), rounds
    elif name == "on_policy":
        num, den = c @ (onehot * s.reward[:, None]), rounds
    else:
        raise SampleError(f"unknown estimator {name!r}; use one of {', '.join(ESTIMATORS)} or on_policy")
    with np.errstate(invalid="ignore", divide="ignore"):
        vals = np.where(den > 0, num / np.where(den > 0, den, 1.0), np.nan)
    return vals, rounds


def _overall(vals: np.ndarray, rounds: np.ndarray) -> np.ndarray:
    """Positions averaged by their rounds; positions without a value (SNIPS with no weight) left out."""
    ok = np.isfinite(vals) & (rounds > 0)
    tot = np.where(ok, rounds, 0.0).sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(tot > 0, np.where(ok, vals * rounds, 0.0).sum(axis=1) / np.where(tot > 0, tot, 1.0), np.nan)


@dataclass
class Estimate:
    """One estimator's value with its bootstrap interval (``replicates``: the bootstrap values, not serialised)."""

    name: str
    value: float
    low: float
    high: float
    level: float
    n_boot: int
    by_position: dict[int, float] = field(default_factory=dict)
    replicates: np.ndarray | None = field(default=None, repr=False, compare=False)

    @property
    def label(self) -> str:
        return _LABELS.get(self.name, self.name)

    def to_dict(self) -> dict:
        return {"estimator": self.name, "value": _num(self.value), "low": _num(self.low), "high": _num(self.high),
                "level": self.level, "n_boot": self.n_boot,
                "by_position": {str(k): _num(v) for k, v in self.by_position.items()}}


def _num(x: float) -> float | None:
    return None if x is None or not math.isfinite(x) else round(float(x), 8)


def _bootstrap_counts(s: BanditSample, n_boot: int, rng: np.random.Generator, chunk: int):
    """Multiplicities per round for ``n_boot`` resamples of rounds (or of whole groups), in chunks."""
    if s.group is None:
        units, of_round = s.n, None
    else:
        units, of_round = int(s.group.max()) + 1, s.group
    done = 0
    while done < n_boot:
        b = min(chunk, n_boot - done)
        c = rng.multinomial(units, np.full(units, 1.0 / units), size=b).astype(np.float64)
        yield c if of_round is None else c[:, of_round]
        done += b


def estimate(sample: BanditSample, estimators=None, *, n_boot: int = 1000, level: float = 0.95,
             seed: int = 0, chunk: int = 200) -> dict[str, Estimate]:
    """The estimators' values on ``sample``, each with a percentile bootstrap interval.

    Every estimator sees the same ``n_boot`` resamples (drawn from ``seed``), so their intervals are
    comparable and a difference between two estimators can be read off their replicates. ``estimators``:
    by default all of :data:`ESTIMATORS` (without DR for a sample without a direct model).
    """
    if n_boot < 1:
        raise SampleError(f"n_boot must be at least 1, got {n_boot}")
    if not 0 < level < 1:
        raise SampleError(f"level must lie strictly between 0 and 1 (e.g. 0.95), got {level}")
    if estimators is None:
        estimators = ESTIMATORS if sample.has_direct_model else ("ips", "snips")
    names = list(estimators)
    for nm in names:
        if nm not in ESTIMATORS and nm != "on_policy":
            raise SampleError(f"unknown estimator {nm!r}; use one of {', '.join(ESTIMATORS)} or on_policy")
    rng = np.random.default_rng(seed)
    reps: dict[str, list[np.ndarray]] = {nm: [] for nm in names}
    for counts in _bootstrap_counts(sample, n_boot, rng, chunk):
        for nm in names:
            reps[nm].append(_overall(*_position_values(nm, sample, counts)))
    out = {}
    alpha = (1 - level) / 2
    for nm in names:
        vals, rounds = _position_values(nm, sample)
        r = np.concatenate(reps[nm])
        finite = r[np.isfinite(r)]
        low, high = (np.quantile(finite, [alpha, 1 - alpha]) if len(finite) else (math.nan, math.nan))
        out[nm] = Estimate(nm, float(_overall(vals, rounds)[0]), float(low), float(high), level, n_boot,
                           {int(p): float(v) for p, v in enumerate(vals[0]) if rounds[0, p] > 0}, r)
    return out


def on_policy(reward, position=None, *, group=None, n_boot: int = 1000, level: float = 0.95,
              seed: int = 0) -> Estimate:
    """The mean reward of a policy's own log (its on-policy value), with the same bootstrap as :func:`estimate`."""
    r = _vector("reward", reward, None)
    s = bandit_sample(r, np.ones_like(r), np.ones_like(r), position, group=group)
    return estimate(s, ("on_policy",), n_boot=n_boot, level=level, seed=seed)["on_policy"]


def diagnostics(sample: BanditSample) -> dict:
    """How much the log supports the evaluation policy: the weights' mean (near 1 when the evaluation
    policy's probabilities sum to 1 over what the logging policy could show), their largest value, the
    share of rounds with a non-zero weight, and Kish's effective sample size (sum w)^2 / sum w^2."""
    w = sample.weights
    sw, sw2 = float(w.sum()), float((w ** 2).sum())
    return {"rounds": sample.n, "positions": int(sample.position.max()) + 1, "mean_weight": round(float(w.mean()), 6),
            "max_weight": round(float(w.max()), 6), "nonzero_weight_share": round(float((w > 0).mean()), 6),
            "effective_sample_size": round(sw * sw / sw2, 2) if sw2 > 0 else 0.0}


def relative_error(est: Estimate, truth: Estimate, level: float | None = None) -> dict:
    """``|estimate - truth| / truth`` with a bootstrap interval: the two replicate sets (independent logs,
    same number of resamples) are paired replicate by replicate."""
    lv = est.level if level is None else level
    err = abs(est.value - truth.value) / truth.value if truth.value else math.nan
    low = high = math.nan
    if est.replicates is not None and truth.replicates is not None:
        m = min(len(est.replicates), len(truth.replicates))
        with np.errstate(invalid="ignore", divide="ignore"):
            r = np.abs(est.replicates[:m] - truth.replicates[:m]) / truth.replicates[:m]
        r = r[np.isfinite(r)]
        if len(r):
            low, high = (float(x) for x in np.quantile(r, [(1 - lv) / 2, 1 - (1 - lv) / 2]))
    return {"value": _num(err), "low": _num(low), "high": _num(high), "level": lv}
