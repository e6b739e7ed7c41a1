"""How a served list is chosen from its scored pool: the objective's order, then an exploration policy.

- The **objective** (``serve.objective``) gives each pool item a value; the greedy list is the pool by
  value, best first (ties to the lower item index, as everywhere): ``relevance`` (the candidate list's own
  order: the two-stage re-ranker's for known users; the click probability for the others),
  ``expected_clicks`` (pCTR) or ``expected_value`` (bid x pCTR; bid x pCTCVR when the ranker gives
  pCTCVR: the ``ctcvr`` argument is that hook, today no ranker passes it).
- The **policy** (``serve.exploration.policy``) fills the list position by position from the items not
  placed yet, and says with what probability it put each item where it did, given the items above
  (its *propensity*: what off-policy evaluation divides by):

  - ``greedy`` (exploration off): the best remaining item, propensity 1.
  - ``epsilon_greedy``: the best remaining item with probability 1 - epsilon, else one of the ``m``
    remaining pool items uniformly (the best one included): the best gets 1 - epsilon + epsilon / m,
    every other remaining item epsilon / m. Exact.
  - ``thompson``: per item a Beta posterior of its click probability, ``Beta(s * p, s * (1 - p))``
    with ``p`` the ranker's pCTR and ``s`` = ``thompson_strength`` pseudo-impressions (the ranker's
    uncertainty, stated as a prior of that weight; no per-item counts from the log feed it yet). At each
    position a fresh draw of every remaining item, and the best remaining by drawn value (drawn pCTR,
    times the bid under expected_value). The propensity, P(item = argmax of a fresh draw over the remaining
    items), has no closed form: it is estimated from ``thompson_draws`` further draws of the whole pool
    plus the served draw itself, so the estimates of a position's alternatives sum to 1 and the served
    item's is at least 1 / (draws + 1).

Every request draws from a generator seeded by its ``request_id``, so a logged list can be replayed.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field

import numpy as np
from adrec.config import ExplorationConfig

GREEDY, EPSILON_GREEDY, THOMPSON = "greedy", "epsilon_greedy", "thompson"
RELEVANCE, EXPECTED_CLICKS, EXPECTED_VALUE = "relevance", "expected_clicks", "expected_value"
# Beta parameters from a click probability: kept off 0 and 1, where the posterior degenerates.
_P_EPS = 1e-6


def new_request_id() -> str:
    return uuid.uuid4().hex


def request_rng(request_id: str) -> np.random.Generator:
    """The request's generator: seeded by its id (a served list is reproducible from its log)."""
    return np.random.default_rng(int(request_id, 16))


def greedy_order(items: np.ndarray, values: np.ndarray, k: int) -> np.ndarray:
    """Positions of the best ``k`` by value (descending, ties to the lower item index)."""
    return np.lexsort((np.asarray(items), -np.asarray(values, np.float64)))[:k]


def objective_values(objective: str, click_probs: np.ndarray, bids: np.ndarray | None = None,
                     ctcvr: np.ndarray | None = None, list_order: bool = False) -> np.ndarray:
    """Each pool item's value under ``objective``. ``list_order``: the pool is already in relevance order
    (a two-stage list), whose value is then its rank; else relevance is the click probability."""
    p = np.asarray(click_probs, np.float64)
    if objective == RELEVANCE:
        return -np.arange(len(p), dtype=np.float64) if list_order else p
    if objective == EXPECTED_CLICKS:
        return p
    if objective == EXPECTED_VALUE:
        if bids is None:
            raise ValueError("objective expected_value needs the items' bids (schema items.bid)")
        return np.asarray(bids, np.float64) * (p if ctcvr is None else np.asarray(ctcvr, np.float64))
    raise ValueError(f"unknown objective {objective!r}")


@dataclass
class Selection:
    order: np.ndarray  # positions into the pool, in list order
    propensities: np.ndarray  # per list position: P(the policy put that item there | the items above)


def epsilon_propensities(m: int, epsilon: float) -> np.ndarray:
    """Over the ``m`` remaining items in greedy order: the probability that epsilon-greedy picks each."""
    out = np.full(m, epsilon / m)
    out[0] += 1.0 - epsilon
    return out


def thompson_alternatives(draws: np.ndarray, remaining: np.ndarray) -> np.ndarray:
    """Per pool item, the share of ``draws`` (draws x pool drawn values) whose best among ``remaining``
    (a boolean mask) it is: the Monte-Carlo estimate of P(item is picked next)."""
    masked = np.where(remaining[None, :], draws, -np.inf)
    best = masked.argmax(axis=1)
    return np.bincount(best, minlength=draws.shape[1]) / draws.shape[0]


def beta_params(click_probs: np.ndarray, strength: float) -> tuple[np.ndarray, np.ndarray]:
    p = np.clip(np.asarray(click_probs, np.float64), _P_EPS, 1 - _P_EPS)
    return strength * p, strength * (1 - p)


class Policy:
    """Fills a list of ``k`` from a pool (see the module)."""

    name = GREEDY

    def select(self, items: np.ndarray, values: np.ndarray, click_probs: np.ndarray, weights: np.ndarray,
               k: int, rng: np.random.Generator) -> Selection:
        order = greedy_order(items, values, k)
        return Selection(order, np.ones(len(order)))


class EpsilonGreedy(Policy):
    name = EPSILON_GREEDY

    def __init__(self, epsilon: float):
        self.epsilon = float(epsilon)

    def select(self, items, values, click_probs, weights, k, rng) -> Selection:
        remaining = list(greedy_order(items, values, len(items)))
        order, props = [], []
        for _ in range(min(k, len(remaining))):
            m = len(remaining)
            pick = int(rng.integers(m)) if rng.random() < self.epsilon else 0
            order.append(remaining.pop(pick))
            props.append(epsilon_propensities(m, self.epsilon)[pick])
        return Selection(np.asarray(order, np.int64), np.asarray(props))


class Thompson(Policy):
    """Sequential Thompson sampling over Beta posteriors of the click probability (see the module).
    ``weights`` multiply the drawn click probabilities (the bids under expected_value, else ones)."""

    name = THOMPSON

    def __init__(self, strength: float, draws: int):
        self.strength, self.draws = float(strength), int(draws)

    def select(self, items, values, click_probs, weights, k, rng) -> Selection:
        n = len(items)
        a, b = beta_params(click_probs, self.strength)
        w = np.asarray(weights, np.float64)
        k = min(k, n)
        served = rng.beta(a, b, size=(k, n)) * w  # a fresh draw per position
        estimate = rng.beta(a, b, size=(self.draws, n)) * w
        # Columns in item order, so that ties between drawn values (zero bids) go to the lower item index,
        # as in the greedy order; `by_item[c]` is the pool position of column c.
        by_item = np.argsort(items, kind="stable")
        served, estimate = served[:, by_item], estimate[:, by_item]
        remaining = np.ones(n, dtype=bool)  # by column
        order, props = [], []
        for j in range(k):
            col = int(np.argmax(np.where(remaining, served[j], -np.inf)))
            share = thompson_alternatives(estimate, remaining)[col]
            props.append((share * self.draws + 1.0) / (self.draws + 1.0))
            order.append(int(by_item[col]))
            remaining[col] = False
        return Selection(np.asarray(order, np.int64), np.asarray(props))


def make_policy(cfg: ExplorationConfig) -> Policy:
    if cfg.policy == "epsilon_greedy":
        return EpsilonGreedy(cfg.epsilon)
    if cfg.policy == "thompson":
        return Thompson(cfg.thompson_strength, cfg.thompson_draws)
    return Policy()


@dataclass
class Strategy:
    """A replica's ordering settings: the objective, the exploration policy and the pool size."""

    objective: str = RELEVANCE
    policy: Policy = field(default_factory=Policy)
    pool: int = 50

    @classmethod
    def from_settings(cls, settings) -> Strategy:
        """From a :class:`~adrec.config.ServeConfig` (or the app's args)."""
        return cls(settings.objective, make_policy(settings.exploration), settings.pool)

    @property
    def plain(self) -> bool:
        """Today's path: the relevance order, no exploration (nothing beyond the top k is scored)."""
        return self.objective == RELEVANCE and self.policy.name == GREEDY

    def choose(self, items: np.ndarray, click_probs: np.ndarray, bids: np.ndarray | None, k: int,
               rng: np.random.Generator, list_order: bool, ctcvr: np.ndarray | None = None) -> Selection:
        """The list of ``k`` from a scored pool (``list_order``: the pool is a two-stage list, in its order)."""
        values = objective_values(self.objective, click_probs, bids, ctcvr, list_order)
        weights = np.asarray(bids, np.float64) if self.objective == EXPECTED_VALUE else np.ones(len(items))
        return self.policy.select(np.asarray(items), values, np.asarray(click_probs, np.float64), weights, k, rng)
