"""Off-policy evaluation on a real log: the Open Bandit Dataset sample bundled in the ``obp`` package.

    python pipelines/benchmark_ope.py [--campaigns all men women] [--seeds 0 1 2] [--n-boot 500] [--out benchmarks]

ZOZOTOWN (fashion e-commerce) logged 3 recommendation positions under two policies at once: uniform
random and Bernoulli Thompson Sampling (BTS); the sample holds 10,000 impressions per policy and campaign
(all, men, women) with each impression's logged propensity (Saito et al., "Open Bandit Dataset and
Pipeline", arXiv:2008.07146; obp is Apache-2.0, the data are read in place from the installed package
and never copied). Per campaign and seed this estimates BTS's CTR from the *random* policy's log with
adrec's estimators (:mod:`adrec.evaluation.ope`) and obp's own (``obp.ope``: IPW, SNIPW, DR through
``OffPolicyEvaluation``) on the same arrays, and compares each with BTS's on-policy CTR (the mean click
of the BTS log): relative error ``|estimate - on-policy| / on-policy``, with bootstrap intervals.

- BTS's action distribution: obp's ``BernoulliTS(n_actions, len_list=3, is_zozotown_prior=True,
  campaign=...)`` ``compute_batch_action_dist`` (the policy's definition: Beta priors ZOZOTOWN used,
  Monte Carlo over ``n_sim`` draws with the seed); context-free, so one distribution for every round.
- Direct model for DR: a logistic regression on the random log (item one-hot, position one-hot, the
  user features one-hot, the user's affinity with the item), cross-fitted over 3 folds (each round's
  estimates come from the model fitted on the other folds), giving an estimate for every
  (round, item, position). Both libraries get the same array.
- Seeds vary the Monte Carlo draws of BTS's distribution, the folds and the bootstraps; the table
  reports medians over seeds.

obp's loader (``OpenBanditDataset``) does not run on pandas 3, so the CSVs are read here with pandas
the way its ``pre_process`` reads them (positions ranked densely from 0).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import logging
import math
import time
from pathlib import Path

import numpy as np
import pandas as pd
from adrec.evaluation import ope

log = logging.getLogger(__name__)

CAMPAIGNS = ("all", "men", "women")
LEN_LIST = 3
TARGET_ERROR = 0.25
OBP_NAMES = {"ips": "ipw", "snips": "snipw", "dr": "dr"}


def obd_folder() -> Path:
    """The OBD sample inside the installed obp package."""
    spec = importlib.util.find_spec("obp")
    if spec is None or not spec.origin:
        raise SystemExit("obp is not installed: pip install obp (the Open Bandit Dataset sample ships inside it)")
    folder = Path(spec.origin).parent / "dataset" / "obd"
    if not folder.is_dir():
        raise SystemExit(f"{folder} is missing: this obp build does not bundle the Open Bandit Dataset sample")
    return folder


def read_obd(policy: str, campaign: str, folder: Path | None = None) -> tuple[pd.DataFrame, pd.DataFrame]:
    """One (policy, campaign) log and its item table, as obp's pre_process reads them."""
    base = (folder or obd_folder()) / policy / campaign
    data = pd.read_csv(base / f"{campaign}.csv", index_col=0)
    items = pd.read_csv(base / "item_context.csv", index_col=0)
    data["position"] = pd.Series(data["position"]).rank(method="dense").astype(int).to_numpy() - 1
    return data, items


def bts_action_dist(campaign: str, n_actions: int, seed: int, n_sim: int) -> np.ndarray:
    """BTS's probability of each (item, position): (n_actions, LEN_LIST), from obp's policy definition."""
    from obp.policy import BernoulliTS

    pol = BernoulliTS(n_actions=n_actions, len_list=LEN_LIST, is_zozotown_prior=True, campaign=campaign,
                      random_state=seed)
    return pol.compute_batch_action_dist(n_rounds=1, n_sim=n_sim)[0]


def _user_features(data: pd.DataFrame) -> np.ndarray:
    cols = [c for c in data.columns if c.startswith("user_feature")]
    return pd.get_dummies(data[cols].astype(str), drop_first=True).to_numpy(np.float64)


def reward_model(data: pd.DataFrame, n_actions: int, seed: int, n_folds: int = 3, c: float = 1.0) -> np.ndarray:
    """Cross-fitted click estimates for every (round, item, position): (n, n_actions, LEN_LIST).

    A logistic regression is linear in its features (item and position one-hot, user features, the
    user-item affinity), so its estimate for any (item, position) of a round is read off its coefficients
    without building the n x items x positions rows."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import KFold

    n = len(data)
    item = data["item_id"].to_numpy(np.int64)
    pos = data["position"].to_numpy(np.int64)
    users = _user_features(data)
    aff = data[[f"user-item_affinity_{a}" for a in range(n_actions)]].to_numpy(np.float64)
    x = np.hstack([np.eye(n_actions)[item], np.eye(LEN_LIST)[pos], users, aff[np.arange(n), item][:, None]])
    y = data["click"].to_numpy(np.int64)
    out = np.empty((n, n_actions, LEN_LIST))
    for train, test in KFold(n_folds, shuffle=True, random_state=seed).split(x):
        m = LogisticRegression(C=c, max_iter=2000).fit(x[train], y[train])
        w = m.coef_[0]
        w_item, w_pos = w[:n_actions], w[n_actions:n_actions + LEN_LIST]
        w_user, w_aff = w[n_actions + LEN_LIST:-1], w[-1]
        logit = (m.intercept_[0] + users[test] @ w_user)[:, None, None] + w_item[None, :, None] \
            + w_pos[None, None, :] + w_aff * aff[test][:, :, None]
        out[test] = 1.0 / (1.0 + np.exp(-logit))
    return out


def _obp_estimates(feedback: dict, dist: np.ndarray, est: np.ndarray, n_boot: int, level: float,
                   seed: int) -> tuple[dict, dict, dict]:
    """obp's estimates (``OffPolicyEvaluation.estimate_policy_values``), its own bootstrap intervals
    (``estimate_intervals``), and bootstrap replicates for the relative error's interval made the way obp
    makes its intervals: the means of resampled per-round values of each estimator
    (``_estimate_round_rewards``, what ``estimate_interval`` resamples)."""
    from obp.ope import (
        DirectMethod,
        DoublyRobust,
        InverseProbabilityWeighting,
        OffPolicyEvaluation,
    )
    from obp.ope import SelfNormalizedInverseProbabilityWeighting as SNIPW

    # DM: not one of adrec's estimators; the one obp's reference OBD example (examples/obd) finds best on this
    # small sample, reported beside them as a reference
    estimators = [InverseProbabilityWeighting(), SNIPW(), DoublyRobust(), DirectMethod()]
    oe = OffPolicyEvaluation(bandit_feedback=feedback, ope_estimators=estimators)
    values = oe.estimate_policy_values(action_dist=dist, estimated_rewards_by_reg_model=est)
    intervals = oe.estimate_intervals(action_dist=dist, estimated_rewards_by_reg_model=est,
                                      alpha=1 - level, n_bootstrap_samples=n_boot, random_state=seed)
    rng = np.random.default_rng(seed + 7919)
    n = feedback["n_rounds"]
    idx = rng.integers(0, n, (n_boot, n))
    args = {k: feedback[k] for k in ("reward", "action", "position", "pscore")}
    reps = {}
    for e in estimators:
        extra = {"estimated_rewards_by_reg_model": est} if e.estimator_name in ("dr", "dm") else {}
        rounds = np.asarray(e._estimate_round_rewards(**args, action_dist=dist, **extra))
        reps[e.estimator_name] = rounds[idx].mean(axis=1)
    return values, intervals, reps


def bts_logged_frequency(bts: pd.DataFrame, n_actions: int) -> np.ndarray:
    """BTS's time-averaged probability of each (item, position) as it ran: the share of the BTS log's rounds
    at each position that showed each item (its actions only, never its clicks)."""
    f = np.zeros((n_actions, LEN_LIST))
    np.add.at(f, (bts["item_id"].to_numpy(np.int64), bts["position"].to_numpy(np.int64)), 1.0)
    return f / f.sum(axis=0, keepdims=True)


def run_campaign(campaign: str, seed: int, n_boot: int, level: float, n_sim: int, folder: Path | None = None,
                 bts_policy: str = "prior") -> dict:
    """One campaign and seed: every estimator's estimate and relative error, adrec's and obp's.

    ``bts_policy``: ``prior`` (obp's BernoulliTS with the ZOZOTOWN prior, the policy's definition) or
    ``logged`` (:func:`bts_logged_frequency`, the policy as it ran during the week)."""
    rnd, items = read_obd("random", campaign, folder)
    bts, _ = read_obd("bts", campaign, folder)
    n_actions = len(items)
    n = len(rnd)
    truth = ope.on_policy(bts["click"].to_numpy(), bts["position"].to_numpy(), n_boot=n_boot, level=level,
                          seed=seed + 1)
    t0 = time.perf_counter()
    one = bts_action_dist(campaign, n_actions, seed, n_sim) if bts_policy == "prior" else \
        bts_logged_frequency(bts, n_actions)
    dist = np.tile(one[None], (n, 1, 1))
    # How well the distribution matches the propensities BTS logged for what it showed (a check, not an input).
    at = one[bts["item_id"].to_numpy(np.int64), bts["position"].to_numpy(np.int64)]
    lp = bts["propensity_score"].to_numpy(np.float64)
    match = {"median_relative_difference": round(float(np.median(np.abs(at - lp) / lp)), 4),
             "correlation": round(float(np.corrcoef(at, lp)[0, 1]), 4)}
    t_policy = time.perf_counter() - t0
    est_rewards = reward_model(rnd, n_actions, seed)
    action = rnd["item_id"].to_numpy(np.int64)
    position = rnd["position"].to_numpy(np.int64)
    reward = rnd["click"].to_numpy(np.float64)
    pscore = rnd["propensity_score"].to_numpy(np.float64)

    t0 = time.perf_counter()
    sample = ope.bandit_sample(reward, pscore, position=position, action=action, action_dist=dist,
                               estimated_rewards=est_rewards)
    ours = ope.estimate(sample, n_boot=n_boot, level=level, seed=seed)
    t_ours = time.perf_counter() - t0

    t0 = time.perf_counter()
    feedback = {"n_rounds": n, "n_actions": n_actions, "action": action, "position": position, "reward": reward,
                "pscore": pscore}
    values, intervals, reps = _obp_estimates(feedback, dist, est_rewards, n_boot, level, seed)
    t_obp = time.perf_counter() - t0
    rows = {}
    for name, e in ours.items():
        key = OBP_NAMES[name]
        iv = intervals[key]
        lo_key = next(k for k in iv if "lower" in k)
        hi_key = next(k for k in iv if "upper" in k)
        obp_est = ope.Estimate(name, float(values[key]), float(iv[lo_key]), float(iv[hi_key]), level, n_boot,
                               replicates=reps[key])
        rows[name] = {"adrec": {**e.to_dict(), "relative_error": ope.relative_error(e, truth)},
                      "obp": {**obp_est.to_dict(), "relative_error": ope.relative_error(obp_est, truth),
                              "estimator": f"obp.ope.{type_name(key)}"}}
    iv = intervals["dm"]
    dm = ope.Estimate("dm", float(values["dm"]), float(iv[next(k for k in iv if "lower" in k)]),
                      float(iv[next(k for k in iv if "upper" in k)]), level, n_boot, replicates=reps["dm"])
    obp_dm = {**dm.to_dict(), "relative_error": ope.relative_error(dm, truth), "estimator": "obp.ope.DirectMethod"}
    return {"campaign": campaign, "seed": seed, "rounds": n, "actions": n_actions,
            "random_log_ctr": round(float(reward.mean()), 6), "random_log_clicks": int(reward.sum()),
            "on_policy": truth.to_dict(), "bts_clicks": int(bts["click"].sum()), "estimators": rows,
            "obp_dm": obp_dm, "noise": {name: noise_floor(e, truth) for name, e in ours.items()},
            "diagnostics": ope.diagnostics(sample), "policy_vs_bts_logged_propensities": match,
            "seconds": {"bts_action_dist": round(t_policy, 2), "adrec": round(t_ours, 2), "obp": round(t_obp, 2)}}


def noise_floor(est: ope.Estimate, truth: ope.Estimate) -> dict:
    """How far apart two logs' noise alone puts an estimate and the on-policy CTR: the bootstrap standard
    deviations of each (relative to the on-policy CTR), the z of their difference and its two-sided p-value,
    and the chance that an unbiased estimator with this noise lands within ``TARGET_ERROR`` of the truth
    (normal approximation, the truth's own noise included)."""
    from scipy.stats import norm

    sd_e, sd_t = float(np.std(est.replicates, ddof=1)), float(np.std(truth.replicates, ddof=1))
    sd = math.hypot(sd_e, sd_t)
    z = (est.value - truth.value) / sd if sd > 0 else math.nan
    return {"sd_estimate_rel": sd_e / truth.value, "sd_on_policy_rel": sd_t / truth.value, "z": z,
            "p_value": float(2 * norm.sf(abs(z))),
            "p_within_target_if_unbiased": float(2 * norm.cdf(TARGET_ERROR * truth.value / sd) - 1)}


def type_name(key: str) -> str:
    return {"ipw": "InverseProbabilityWeighting", "snipw": "SelfNormalizedInverseProbabilityWeighting",
            "dr": "DoublyRobust"}[key]


# ---- summary -----------------------------------------------------------------------------------------
def _median(xs) -> float | None:
    xs = [x for x in xs if x is not None]
    return float(np.median(xs)) if xs else None


def summarize(runs: list[dict]) -> dict:
    """Medians over seeds per campaign, estimator and library (value, bounds, relative error and bounds)."""
    out: dict = {}
    for campaign in dict.fromkeys(r["campaign"] for r in runs):
        rs = [r for r in runs if r["campaign"] == campaign]
        camp = {"on_policy": {k: _median([r["on_policy"][k] for r in rs]) for k in ("value", "low", "high")},
                "estimators": {}}
        for name in ope.ESTIMATORS:
            camp["estimators"][name] = {}
            for lib in ("adrec", "obp"):
                cells = [r["estimators"][name][lib] for r in rs]
                camp["estimators"][name][lib] = {
                    **{k: _median([c[k] for c in cells]) for k in ("value", "low", "high")},
                    "relative_error": {k: _median([c["relative_error"][k] for c in cells])
                                       for k in ("value", "low", "high")}}
        if all("obp_dm" in r for r in rs):
            camp["obp_dm"] = {**{k: _median([r["obp_dm"][k] for r in rs]) for k in ("value", "low", "high")},
                              "relative_error": {k: _median([r["obp_dm"]["relative_error"][k] for r in rs])
                                                 for k in ("value", "low", "high")}}
        if all("noise" in r for r in rs):
            camp["noise"] = {name: {k: _median([r["noise"][name][k] for r in rs]) for k in rs[0]["noise"][name]}
                             for name in ope.ESTIMATORS}
        out[campaign] = camp
    return out


def targets(summary: dict) -> dict:
    """The issue's targets on the medians: adrec's DR error within obp's DR error (per campaign), and the
    best estimator's relative error below TARGET_ERROR (per campaign)."""
    res = {}
    for campaign, camp in summary.items():
        est = camp["estimators"]
        ours_dr, obp_dr = est["dr"]["adrec"]["relative_error"]["value"], est["dr"]["obp"]["relative_error"]["value"]
        best = min(ope.ESTIMATORS, key=lambda n: est[n]["adrec"]["relative_error"]["value"])
        best_err = est[best]["adrec"]["relative_error"]["value"]
        res[campaign] = {"dr_within_obp": bool(ours_dr <= obp_dr + 1e-9), "adrec_dr_error": ours_dr,
                         "obp_dr_error": obp_dr, "best_estimator": best, "best_error": best_err,
                         "best_below_target": bool(best_err < TARGET_ERROR)}
    return res


def _cell(d: dict, digits: int = 4) -> str:
    v, lo, hi = d["value"], d["low"], d["high"]
    if v is None:
        return "-"
    return f"{v:.{digits}f} [{lo:.{digits}f}, {hi:.{digits}f}]" if lo is not None and hi is not None else f"{v:.{digits}f}"


def markdown(result: dict) -> str:
    s, t = result["summary"], result["targets"]
    p = result["protocol"]
    intro = (f"BTS's CTR estimated from the uniform-random log, compared with BTS's on-policy CTR. Medians over "
             f"seeds {p['seeds']}; {int(p['level'] * 100)}% bootstrap intervals ({p['n_boot']} resamples); relative "
             "error = |estimate - on-policy| / on-policy.")
    header = ("| campaign | on-policy CTR (BTS log) | estimator | adrec estimate | adrec rel. error | obp estimate "
              "| obp rel. error |")
    lines = ["# Off-policy evaluation on the Open Bandit Dataset (obp's bundled sample)", "", intro, "",
             header, "|---|--:|---|--:|--:|--:|--:|"]
    for campaign, camp in s.items():
        for name in ope.ESTIMATORS:
            e = camp["estimators"][name]
            lines.append(f"| {campaign} | {_cell(camp['on_policy'])} | {name.upper()} | {_cell(e['adrec'])} | "
                         f"{_cell(e['adrec']['relative_error'], 3)} | {_cell(e['obp'])} | "
                         f"{_cell(e['obp']['relative_error'], 3)} |")
    header = ("| campaign | adrec DR error | obp DR error | adrec DR within obp's | best estimator (adrec) | "
              f"its error | below {TARGET_ERROR} |")
    lines += ["", header, "|---|--:|--:|---|---|--:|---|"]
    for campaign, r in t.items():
        lines.append(f"| {campaign} | {r['adrec_dr_error']:.3f} | {r['obp_dr_error']:.3f} | "
                     f"{'yes' if r['dr_within_obp'] else 'no'} | {r['best_estimator'].upper()} | {r['best_error']:.3f} | "
                     f"{'yes' if r['best_below_target'] else 'no'} |")
    header = ("| campaign | rounds (random log) | clicks (random log) | CTR (random log) | clicks (BTS log) | "
              "weights: mean | max | effective sample size |")
    lines += ["", header, "|---|--:|--:|--:|--:|--:|--:|--:|"]
    for campaign in s:
        r = next(x for x in result["runs"] if x["campaign"] == campaign)
        d = r["diagnostics"]
        lines.append(f"| {campaign} | {r['rounds']} | {r['random_log_clicks']} | {r['random_log_ctr']:.4f} | "
                     f"{r['bts_clicks']} | {d['mean_weight']:.3f} | {d['max_weight']:.1f} | "
                     f"{d['effective_sample_size']:.0f} |")
    if all("noise" in camp for camp in s.values()):
        header = ("| campaign | best (adrec) | its error | sd of its estimate / on-policy | sd of the on-policy CTR / "
                  f"on-policy | z of the difference | p-value | P(error < {TARGET_ERROR}) if unbiased | obp DM error |")
        lines += ["", ("Sampling noise alone (bootstrap standard deviations of the two logs' estimates, medians over "
                       "seeds), and obp's DirectMethod on the same arrays:"), "", header,
                  "|---|---|--:|--:|--:|--:|--:|--:|--:|"]
        for campaign, camp in s.items():
            best = t[campaign]["best_estimator"]
            nz = camp["noise"][best]
            dm = camp.get("obp_dm")
            lines.append(f"| {campaign} | {best.upper()} | {t[campaign]['best_error']:.3f} | "
                         f"{nz['sd_estimate_rel']:.3f} | "
                         f"{nz['sd_on_policy_rel']:.3f} | {nz['z']:+.2f} | {nz['p_value']:.2f} | "
                         f"{nz['p_within_target_if_unbiased']:.2f} | "
                         f"{_cell(dm['relative_error'], 3) if dm else '-'} |")
    lines += ["", (f"Evaluation policy: {p['evaluation_policy']}. Direct model: {p['direct_model']}. "
                   f"obp {p['obp_version']}, scikit-learn {p['sklearn_version']}."), ""]
    return "\n".join(lines)


def plot(result: dict, path: Path) -> Path:
    from adrec.evaluation.plots import plot_estimates

    series: dict = {"adrec": {}, "obp": {}}
    for campaign, camp in result["summary"].items():
        for name in ope.ESTIMATORS:
            for lib, rows in series.items():
                re = camp["estimators"][name][lib]["relative_error"]
                rows[f"{campaign}: {name.upper()}"] = (re["value"], re["low"], re["high"])
    return plot_estimates(series, path, reference=("target", TARGET_ERROR),
                          title="OBD: relative error of BTS's CTR estimated from the random log",
                          xlabel="|estimate - on-policy| / on-policy (median over seeds, bootstrap intervals)")


POLICIES = {
    "prior": "obp BernoulliTS(is_zozotown_prior=True, campaign, len_list=3).compute_batch_action_dist(n_sim={n_sim}, "
             "random_state=seed)",
    "logged": "the BTS log's share of rounds showing each item at each position (its actions, not its clicks): "
              "BTS as it ran during the week",
}


def run_benchmark(campaigns, seeds, n_boot: int, level: float, n_sim: int, out: Path, bts_policy: str = "prior") -> dict:
    import obp
    import sklearn

    t0 = time.perf_counter()
    runs = []
    for campaign in campaigns:
        for seed in seeds:
            log.info("campaign %s, seed %d", campaign, seed)
            runs.append(run_campaign(campaign, seed, n_boot, level, n_sim, bts_policy=bts_policy))
    summary = summarize(runs)
    result = {
        "dataset": "Open Bandit Dataset, the sample bundled in obp (obp/dataset/obd; Saito et al., arXiv:2008.07146)",
        "protocol": {"campaigns": list(campaigns), "seeds": list(seeds), "n_boot": n_boot, "level": level,
                     "n_sim": n_sim, "behavior_log": "random", "ground_truth": "mean click of the bts log",
                     "bts_policy": bts_policy, "evaluation_policy": POLICIES[bts_policy].format(n_sim=n_sim),
                     "direct_model": "logistic regression (item one-hot, position one-hot, user features one-hot, "
                                     "user-item affinity; C=1), cross-fitted over 3 folds on the random log",
                     "bootstrap": "adrec: rounds resampled (multinomial counts), every estimator recomputed per "
                                  "resample; obp: its estimate_intervals for the estimate, and the same procedure "
                                  "(means of resampled per-round values) for the relative error",
                     "snips": "adrec normalises per position, obp over all rounds",
                     "obp_version": obp.__version__, "sklearn_version": sklearn.__version__},
        "summary": summary, "targets": targets(summary), "runs": runs,
        "seconds": round(time.perf_counter() - t0, 1)}
    out.mkdir(parents=True, exist_ok=True)
    stem = "ope_benchmark_obd" + ("" if bts_policy == "prior" else f"_{bts_policy}")
    (out / f"{stem}.json").write_text(json.dumps(result, indent=2) + "\n")
    body = markdown(result)
    png = plot(result, out / f"{stem}.png")
    (out / f"{stem}.md").write_text(body + f"\n![relative errors]({png.name})\n")
    return result


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--campaigns", nargs="+", default=list(CAMPAIGNS), choices=CAMPAIGNS)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--n-boot", type=int, default=500, help="bootstrap resamples (each library, each estimate)")
    ap.add_argument("--level", type=float, default=0.95)
    ap.add_argument("--n-sim", type=int, default=100_000, help="Monte Carlo draws of BTS's action distribution")
    ap.add_argument("--bts-policy", choices=sorted(POLICIES), default="prior",
                    help="BTS's action distribution: prior (obp's policy definition, default) or logged (its log's "
                         "action shares)")
    ap.add_argument("--out", type=Path, default=Path(__file__).resolve().parent)
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    res = run_benchmark(args.campaigns, args.seeds, args.n_boot, args.level, args.n_sim, args.out, args.bts_policy)
    print(markdown(res))
    ok = all(r["dr_within_obp"] and r["best_below_target"] for r in res["targets"].values())
    return 0 if ok else 1
