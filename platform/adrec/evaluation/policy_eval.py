"""``adrec evaluate-policy``: a candidate model version's CTR estimated on the serving policy's feedback log.

**The logged sample.** Serve with exploration on logs, on each impression record (top-level keys):
``request_id`` (the served list), ``position`` (0-based rank in it), ``propensity`` (the probability
that the serving policy put that item at that position *given the request and the items above it*),
``policy`` and ``arm``. Clicks are separate records, matched to impressions by the online learner's
attribution rules (:class:`~adrec.online.attribution.AttributionJoiner`, the run's
``online.attribution_window_s`` and ``online.lateness_s``): an impression's reward is 1 when a click
was attributed to it.

**The candidate's policy.** The version ranks each logged request the way Serve does
(:class:`~adrec.serving.request.Recommendation` over its own candidates for the logged user and
context); its policy fills each position with the best item of that ranking not shown above
(deterministic top-K), or, with ``epsilon`` > 0, with probability ``epsilon`` any of the remaining
items uniformly (its candidates plus the logged items it knows). Its probability of the logged item at
position ``k`` is taken given the logged items above, as the logged propensities are.

**Why cumulative weights.** The logged propensities are conditional on the items above, so the
probability of what the log shows at positions ``0..k`` is their product. Each position's reward is
weighted by the ratio of the two policies' products up to it (``W_k``): unbiased when a position's click
depends on the items at and above it (the cascade assumption), not on those below. Doubly robust uses
the candidate's own predicted CTR ``q`` as the direct model: ``W_k (r_k - q(a_k)) + W_{k-1} E[q]``, the
expectation over the candidate's choice at ``k`` given the logged items above (Cascade-DR, Kiyohara et
al., WSDM 2022). These cumulative quantities are handed to :mod:`adrec.evaluation.ope` as one round per
impression, estimated per position and averaged over the log's impressions: a CTR.
"""

from __future__ import annotations

import logging
import math
import tempfile
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from adrec import storage
from adrec.errors import DataError
from adrec.evaluation import ope

log = logging.getLogger(__name__)

#: Top-level keys of an impression record that exploration logs (see the module documentation).
LOGGED_KEYS = ("request_id", "position", "propensity")
HOW_TO_LOG = ("serve with exploration on (serve.exploration.policy=epsilon_greedy or thompson): each /recommend "
              "item then carries its position and propensity, and the client reports them with its impression "
              "(request_id, position, propensity) to /feedback")


@dataclass
class LoggedImpression:
    event_id: str
    user: str
    item: str
    ts: float
    context: dict
    request_id: str
    position: int
    propensity: float
    policy: str | None = None
    arm: str | None = None
    click: int = 0


@dataclass
class LoggedList:
    """One served list's impressions at positions 0..m-1, top first (its contiguous logged prefix)."""

    request_id: str
    user: str
    context: dict
    impressions: list[LoggedImpression]


@dataclass
class LoggedSample:
    lists: list[LoggedList]
    counts: dict = field(default_factory=dict)
    policies: dict = field(default_factory=dict)  # logging policy -> impressions
    arms: dict = field(default_factory=dict)


def _impression(rec: dict) -> LoggedImpression:
    eid = str(rec.get("event_id"))
    try:
        pos, prop = rec["position"], rec["propensity"]
        if isinstance(pos, bool) or not float(pos).is_integer() or int(pos) < 0:
            raise ValueError(f"position {pos!r} is not a 0-based rank")
        prop = float(prop)
        if not (0.0 < prop <= 1.0):
            raise ValueError(f"propensity {prop!r} is not a probability in (0, 1]")
        ctx = rec.get("context") or {}
        return LoggedImpression(eid, str(rec["user"]), str(rec["item"]), float(rec["ts"]),
                                dict(ctx) if isinstance(ctx, dict) else {}, str(rec["request_id"]), int(pos), prop,
                                None if rec.get("policy") is None else str(rec["policy"]),
                                None if rec.get("arm") is None else str(rec["arm"]))
    except (KeyError, TypeError, ValueError) as err:
        raise DataError(f"impression {eid} of the feedback log: {err}; an impression for off-policy evaluation "
                        f"carries {', '.join(LOGGED_KEYS)} with a 0-based position and a propensity in (0, 1]") from err


def read_logged(records: list[dict], window_s: float, lateness_s: float = 0.0,
                skip_unlogged: bool = False) -> LoggedSample:
    """The feedback log's records (in log order) as served lists with attributed clicks.

    Impressions without a propensity are refused (a :class:`DataError` saying how to log them), or with
    ``skip_unlogged`` left out and counted (a log whose exploration was switched on part-way).
    """
    from adrec.feedback import CLICK, IMPRESSION
    from adrec.online.attribution import AttributionJoiner

    joiner = AttributionJoiner(window_s, lateness_s, max_ahead_s=None)  # a replay: event time alone decides
    imps: dict[str, LoggedImpression] = {}
    unlogged = 0
    labels: dict[str, int] = {}
    for rec in records:
        typ = rec.get("type")
        try:
            user, item, ts = str(rec["user"]), str(rec["item"]), float(rec["ts"])
        except (KeyError, TypeError, ValueError):
            continue  # not a feedback event (the learner skips these too)
        if not math.isfinite(ts):
            continue
        if typ == IMPRESSION:
            if rec.get("propensity") is None:
                unlogged += 1
                continue
            imp = _impression(rec)
            if imp.event_id in imps:
                continue  # the writers' dedup keeps one; a second copy (another writer) counts once
            imps[imp.event_id] = imp
            done = joiner.impression(imp.event_id, user, item, ts, {}, ())
        elif typ == CLICK:
            done = joiner.click(user, item, ts)
        else:
            continue
        labels.update((ex.event_id, ex.label) for ex in done)
    labels.update((ex.event_id, ex.label) for ex in joiner.flush())
    if unlogged and not skip_unlogged:
        raise DataError(f"{unlogged} of {unlogged + len(imps)} impressions in the feedback log carry no propensity, "
                        f"so what the serving policy would have shown is unknown for them: {HOW_TO_LOG}. "
                        "(--skip-unlogged leaves them out, for a log whose exploration was switched on part-way.)")
    if not imps:
        raise DataError(f"the feedback log holds no impression with a propensity: {HOW_TO_LOG}")
    by_req: dict[str, list[LoggedImpression]] = {}
    for imp in imps.values():
        imp.click = int(labels.get(imp.event_id, 0))
        by_req.setdefault(imp.request_id, []).append(imp)
    lists, cut = [], 0
    for rid, group in by_req.items():
        group.sort(key=lambda i: i.position)
        positions = [i.position for i in group]
        if len(set(positions)) != len(positions):
            dup = next(p for p in positions if positions.count(p) > 1)
            raise DataError(f"request {rid} of the feedback log has two impressions at position {dup}: a served list "
                            "holds one item per position (were two lists logged under one request_id?)")
        keep = 0
        while keep < len(group) and group[keep].position == keep:
            keep += 1
        cut += len(group) - keep  # below a gap the items above are unknown, so their weight is too
        if keep:
            lists.append(LoggedList(rid, group[0].user, group[0].context, group[:keep]))
    kept = [i for lst in lists for i in lst.impressions]
    counts = {"impressions": len(imps) + unlogged, "impressions_without_propensity": unlogged,
              "impressions_below_a_gap": cut, "rounds": len(kept), "requests": len(lists),
              "clicks": int(joiner.counts["clicks"]), "attributed_clicks": int(joiner.counts["attributed_clicks"])}
    return LoggedSample(lists, counts, dict(Counter(i.policy or "unnamed" for i in kept)),
                        dict(Counter(i.arm or "none" for i in kept)))


# ---- the candidate's policy -----------------------------------------------------------------------------
#: A ranking policy: (user pseudonym, context, logged items of the list) -> (the items it can show, best first;
#: its predicted CTR per item, for at least those items).
Ranking = Callable[[str, dict, list[str]], tuple[list[str], dict[str, float]]]


@dataclass
class ListRounds:
    pscore: list[float]
    action_prob: list[float]
    q_hat: list[float]
    q_pi: list[float]


def list_rounds(lst: LoggedList, order: list[str], q: dict[str, float], epsilon: float) -> ListRounds:
    """One logged list's rounds under a ranking policy (see the module documentation): cumulative logging
    and evaluation probabilities up to each position, the direct model at the logged item, and the
    baseline term ``W_{k-1} E[q]`` of Cascade-DR."""
    out = ListRounds([], [], [], [])
    cum_p = cum_e = 1.0
    shown: set[str] = set()
    can_show = set(order)
    for imp in lst.impressions:
        remaining = [x for x in order if x not in shown]
        w_prev = cum_e / cum_p
        if remaining:
            best = remaining[0]
            e = (1 - epsilon) * (imp.item == best) + (epsilon / len(remaining) if imp.item in can_show
                                                      and imp.item not in shown else 0.0)
            base = (1 - epsilon) * q[best] + epsilon * float(np.mean([q[x] for x in remaining]))
        else:  # the candidate has nothing left to show here: it earns nothing at this position
            e, base = 0.0, 0.0
        cum_p *= imp.propensity
        cum_e *= e
        out.pscore.append(cum_p)
        out.action_prob.append(cum_e)
        out.q_hat.append(float(q.get(imp.item, 0.0)))
        out.q_pi.append(w_prev * base)
        shown.add(imp.item)
    return out


def build_sample(logged: LoggedSample, ranking: Ranking, epsilon: float = 0.0,
                 show_progress: bool = True) -> ope.BanditSample:
    """The logged lists under ``ranking`` as a :class:`~adrec.evaluation.ope.BanditSample` (one round per
    impression, bootstrap unit: the served list)."""
    from tqdm.auto import tqdm

    if not 0.0 <= epsilon <= 1.0:
        raise DataError(f"epsilon must lie in [0, 1], got {epsilon}")
    cols: dict[str, list] = {k: [] for k in ("reward", "position", "group", "pscore", "action_prob", "q_hat", "q_pi")}
    for g, lst in enumerate(tqdm(logged.lists, desc="scoring logged requests", disable=not show_progress)):
        order, q = ranking(lst.user, lst.context, [i.item for i in lst.impressions])
        r = list_rounds(lst, order, q, epsilon)
        cols["reward"] += [i.click for i in lst.impressions]
        cols["position"] += [i.position for i in lst.impressions]
        cols["group"] += [g] * len(lst.impressions)
        for k in ("pscore", "action_prob", "q_hat", "q_pi"):
            cols[k] += getattr(r, k)
    return ope.bandit_sample(cols["reward"], cols["pscore"], cols["action_prob"], cols["position"],
                             q_hat=cols["q_hat"], q_pi=cols["q_pi"], group=cols["group"])


class VersionRanking:
    """A model version's ranking of a logged request, as Serve ranks it (its candidates for the user and
    context, ordered by :class:`~adrec.serving.request.Recommendation`); its CTR ranker's click
    probabilities are the direct model. Logged items the version knows but did not propose follow its
    list, by predicted CTR; items it does not know it cannot show."""

    def __init__(self, rec, n_candidates: int):
        self.rec, self.n = rec, int(n_candidates)
        self.ranked_by: Counter = Counter()

    def __call__(self, user: str, context: dict, logged: list[str]) -> tuple[list[str], dict[str, float]]:
        from adrec.serving.request import Recommendation

        rec = self.rec
        u = rec.pseudonym_index(user)
        ctx = {k: str(v) for k, v in context.items()}
        req = Recommendation(rec, u, self.n, ctx, self.n)
        req.run(lambda items: rec.rank(u, items, ctx))
        self.ranked_by[req.ranked_by] += 1
        order = rec.item_ids(req.chosen)
        q = dict(zip(order, (float(x) for x in req.click_probs[req.order]))) if req.order is not None else {}
        pos = rec.version.item_pos
        extra = [it for it in dict.fromkeys(logged) if it in pos and it not in q]
        if extra:
            p = rec.rank(u, np.array([pos[it] for it in extra], np.int64), ctx)
            for j in np.argsort(-p, kind="stable"):
                order.append(extra[j])
                q[extra[j]] = float(p[j])
        return order, q


# ---- the command --------------------------------------------------------------------------------------
def find_version(run, version: str):
    """A run's committed version by number (``3``) or id: its registry entry."""
    from adrec.model_version import registry_of

    reg = registry_of(run.location)
    return reg.entry(int(version)) if str(version).isdigit() else reg.find(str(version))


def evaluate_policy(cfg, run, version: str, log_uri: str | None = None, out_uri: str | None = None, *,
                    epsilon: float = 0.0, n_boot: int = 1000, level: float = 0.95, seed: int = 0,
                    skip_unlogged: bool = False, show_progress: bool = True) -> dict:
    """Estimate version ``version``'s CTR on the run's feedback log; write ``policy_eval.json`` and
    ``policy_eval.png`` into ``out_uri`` (default ``RUN/report/policy_eval/<number>``); the report."""
    from adrec.feedback import open_log
    from adrec.model_version import materialize
    from adrec.serving.args import default_feedback_log
    from adrec.serving.recommender import Recommender

    # The arguments first: a typo should not cost a pass over the log.
    if not 0.0 <= epsilon <= 1.0:
        raise DataError(f"--epsilon must lie in [0, 1], got {epsilon}")
    if n_boot < 1 or not 0.0 < level < 1.0:
        raise DataError(f"--n-boot must be at least 1 and --level strictly between 0 and 1, got {n_boot} and {level}")
    log_uri = log_uri or cfg.serve.feedback_log or default_feedback_log(run.uri)
    feedback = open_log(log_uri)
    records = feedback.records()
    logged = read_logged(records, cfg.online.attribution_window_s, cfg.online.lateness_s, skip_unlogged)
    entry = find_version(run, version)
    ranking = VersionRanking(Recommender(materialize(entry.uri)), cfg.candidates.n_candidates)
    sample = build_sample(logged, ranking, epsilon, show_progress)
    est = ope.estimate(sample, n_boot=n_boot, level=level, seed=seed)
    logged_ctr = ope.on_policy(sample.reward, sample.position, group=sample.group, n_boot=n_boot, level=level,
                               seed=seed)
    diag = ope.diagnostics(sample)
    report = {
        "run": run.uri, "log": feedback.uri,
        "version": {"number": entry.number, "version": entry.version},
        "policy": {"kind": "the version's ranking, top-K filled position by position given the logged items above",
                   "epsilon": epsilon, "n_candidates": ranking.n, "ranked_by": dict(ranking.ranked_by),
                   "direct_model": "the version's own predicted CTR (its CTR ranker)"},
        "logged": {**logged.counts, "logging_policies": logged.policies, "arms": logged.arms},
        "logged_ctr": logged_ctr.to_dict(),
        "estimates": {k: v.to_dict() for k, v in est.items()},
        "diagnostics": diag,
        "bootstrap": {"n": n_boot, "level": level, "seed": seed, "unit": "served list (request_id)"},
        "weights": "cumulative over the positions above (logged propensities are conditional on them): cascade "
                   "assumption; DR is Cascade-DR",
    }
    if diag["nonzero_weight_share"] < 0.05:
        report["warning"] = (f"only {diag['nonzero_weight_share']:.1%} of the logged impressions have a non-zero "
                             "weight: the log barely covers this version's choices (little overlap); the estimates "
                             "rest on few lists. More exploration in serving, or --epsilon > 0, widens the overlap.")
        log.warning(report["warning"])
    out = storage.resolve(out_uri) if out_uri else run.store(f"report/policy_eval/{entry.number}")
    _write(out, report, est, logged_ctr)
    report["written"] = {"json": (out / "policy_eval.json").uri, "plot": (out / "policy_eval.png").uri}
    return report


def _write(out: storage.Location, report: dict, est: dict[str, ope.Estimate], logged_ctr: ope.Estimate) -> None:
    from adrec.evaluation.plots import plot_estimates

    title = f"CTR of version {report['version']['number']} estimated on the logged feedback"
    rows = {e.label: (e.value, e.low, e.high) for e in est.values()}
    with tempfile.TemporaryDirectory() as tmp:
        png = plot_estimates(rows, Path(tmp) / "policy_eval.png", reference=("logged policy's CTR", logged_ctr.value),
                             title=title, xlabel=f"CTR ({int(logged_ctr.level * 100)}% bootstrap intervals)")
        (out / "policy_eval.png").write_bytes(png.read_bytes())
    (out / "policy_eval.json").write_json(report)


def report_text(report: dict) -> str:
    """What ``adrec evaluate-policy`` prints: a table of the estimates."""
    head = (f"version {report['version']['number']} ({report['version']['version']}) on {report['log']}: "
            f"{report['logged']['rounds']} impressions of {report['logged']['requests']} lists")
    lines = [head, "",
             "| estimator | CTR | interval |", "|---|--:|---|"]
    lc = report["logged_ctr"]
    rows = [("logged policy (on-policy)", lc)] + [(k.upper(), v) for k, v in report["estimates"].items()]
    for name, e in rows:
        lines.append(f"| {name} | {_f(e['value'])} | [{_f(e['low'])}, {_f(e['high'])}] |")
    d = report["diagnostics"]
    lines += ["", (f"non-zero weights: {d['nonzero_weight_share']:.1%}; effective sample size "
                   f"{d['effective_sample_size']}; mean weight {d['mean_weight']}")]
    if "warning" in report:
        lines += ["", f"warning: {report['warning']}"]
    lines += ["", f"report: {report['written']['json']}", f"plot: {report['written']['plot']}"]
    return "\n".join(lines)


def _f(x) -> str:
    return "-" if x is None else f"{x:.4f}"
