"""The faithfulness check of the ranker's explanations, for the report.

For a seeded sample of evaluated users (``eval.explain_users``) and every item of their served top-K list:
the item's groups are attributed by Integrated Gradients (:class:`adrec.ranking.explain.Explainer`, the
attributions ``/recommend`` answers with ``explain=true``); then the item is re-scored twice, once with its
top-attributed group zeroed (its IG baseline) and once with a random other group zeroed. Faithful
attributions make the first drop in click probability larger. Reported: the share of items where it is
(``explain.faithfulness.top_beats_random``; 0.5 is chance), the mean drops (``.drop_top``, ``.drop_random``)
and how many items were checked (``.items``).
"""

from __future__ import annotations

import logging

import numpy as np

from adrec.evaluation.report import markdown_table

log = logging.getLogger(__name__)


def faithfulness(version, users: np.ndarray, top: np.ndarray, n_users: int, seed: int = 0) -> tuple[dict[str, float], str]:
    """The ``explain.faithfulness.*`` metrics and the report section (see the module)."""
    from adrec.ranking.explain import explainer_of  # torch and captum: only when checking

    ranker = version.ranker
    ex = explainer_of(ranker)
    if ex is None or n_users <= 0 or len(users) == 0:
        why = "the ranker has no input embeddings" if ex is None else "no users (eval.explain_users = 0)"
        return {}, f"Not measured: {why}."
    rng = np.random.default_rng(seed)
    pick = np.sort(rng.choice(len(users), size=min(n_users, len(users)), replace=False))
    drop_top, drop_rand = [], []
    for j in pick:
        items = top[j][top[j] >= 0]
        if not len(items):
            continue
        rows = version.rows(np.full(len(items), users[j], np.int64), items)
        attrs, _ = ex.attributions(rows)
        best = np.argmax(attrs, axis=1)
        other = (best + rng.integers(1, len(ex.groups), len(best))) % len(ex.groups)  # uniform among the rest
        full, without_top = ex.logits_without(rows, [ex.groups[g] for g in best])
        _, without_rand = ex.logits_without(rows, [ex.groups[g] for g in other])
        p = ex.probability(full)
        drop_top.append(p - ex.probability(without_top))
        drop_rand.append(p - ex.probability(without_rand))
    dt, dr = np.concatenate(drop_top), np.concatenate(drop_rand)
    m = {"explain.faithfulness.top_beats_random": float(np.mean(dt > dr)),
         "explain.faithfulness.drop_top": float(dt.mean()), "explain.faithfulness.drop_random": float(dr.mean()),
         "explain.faithfulness.items": float(len(dt))}
    body = (f"The served top-{top.shape[1]} items of {len(pick)} sampled users ({len(dt)} items): each item "
            f"re-scored with its top-attributed input group (Integrated Gradients, as `/recommend` with "
            f"`explain=true` answers) zeroed, and with a random other group of the {len(ex.groups)} zeroed. "
            f"Zeroing the top group lowers the click probability more than zeroing a random one for "
            f"{m['explain.faithfulness.top_beats_random']:.1%} of the items (50% is chance).\n\n"
            + markdown_table([{"zeroed group": "top-attributed", "mean drop in click probability": dt.mean()},
                              {"zeroed group": "random other", "mean drop in click probability": dr.mean()}]))
    log.info("explanations: top group beats a random one for %.3f of %d items", m[
        "explain.faithfulness.top_beats_random"], len(dt))
    return m, body
