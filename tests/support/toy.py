"""A tiny feature set built in memory with the real feature code (no Ray), for tests.

``toy_features()`` returns an object shaped like :class:`adrec.features.pipeline.Features`
(``spec``, ``interactions``, ``items``, ``users``) whose rows are encoded by the same
:class:`FeatureSpec`, split by the same temporal split and given histories by the same
``history_lists`` as the prepare stage. Clicks follow a hidden preference of user groups for item
categories and a slot effect, so a model can learn something in a few steps.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

from adrec.features.pipeline import entity_codes, history_lists
from adrec.features.spec import FeatureSpec, build_vocab
from adrec.features.split import temporal_split

_WORDS = ["eco", "garden", "sport", "shoe", "serum", "lamp", "phone", "trip", "coffee", "book", "game", "bike"]
_CATS = ["home", "beauty", "tech", "travel", "food"]
_TAGS = ["sale", "new", "premium", "kids", "green", "fast"]


@dataclass
class ToyFeatures:
    spec: FeatureSpec
    interactions: pd.DataFrame
    items: pd.DataFrame
    users: pd.DataFrame

    def rows(self, *splits: str) -> pd.DataFrame:
        return self.interactions[self.interactions["split"].isin(splits)]

    def field_columns(self) -> list[str]:
        return [f"f:{f}" for f in self.spec.fields]


def toy_features(n_users: int = 40, n_items: int = 30, n_rows: int = 1500, seed: int = 0, history_len: int = 5,
                 n_cold: int = 2, conversions: bool = False) -> ToyFeatures:
    """``n_items`` items appear in interactions; ``n_cold`` more exist only in the catalog (cold).

    ``conversions``: a ``conversion`` column too (issue 17), drawn given a click from the user's gender x the
    item's category (a signal of its own: clicks do not depend on gender) with a generator of its own, so
    the clicks are the same with or without it."""
    rng = np.random.default_rng(seed)
    n_all = n_items + n_cold
    cats = rng.choice(_CATS, n_all)
    items = pd.DataFrame({
        "item": [f"ad{i:03d}" for i in range(n_all)],
        "item.category": cats,
        "item.tags": ["|".join(sorted(set(rng.choice(_TAGS, rng.integers(1, 3))))) for _ in range(n_all)],
    })
    items["text"] = [f"{rng.choice(_WORDS)} {rng.choice(_WORDS)} offer | {c}" for c in cats]
    users = pd.DataFrame({"user": [f"u_{i:04d}" for i in range(n_users)],
                          "user.gender": rng.choice(["f", "m"], n_users), "text": ""})
    spec = FeatureSpec(
        vocabs={"ctx.slot": {"side": 1, "top": 2}, "user.gender": build_vocab(users["user.gender"]),
                "item.category": build_vocab(items["item.category"])},
        multi_vocabs={"item.tags": build_vocab(items["item.tags"], sep="|")},
        multi_max_len={"item.tags": 2},
        crosses=[{"name": "x:user.gender*item.category", "a": "user.gender", "b": "item.category", "hash_size": 64}],
        n_users=n_users, n_items=n_all, n_catalog=n_items, context=["ctx.slot"], history_len=history_len,
    )
    item_codes = spec.encode_entity("item", items)
    user_codes = spec.encode_entity("user", users)
    items_out = pd.DataFrame({"item_idx": np.arange(n_all), "item": items["item"], "text": items["text"]})
    for c in item_codes.columns:
        items_out[f"c:{c}"] = list(item_codes[c]) if c in spec.multi_vocabs else item_codes[c].to_numpy()
    for c in ("item.category", "item.tags"):
        items_out[c] = items[c]
    users_out = pd.DataFrame({"user_idx": np.arange(n_users), "user": users["user"], "text": users["text"]})
    for c in user_codes.columns:
        users_out[f"c:{c}"] = user_codes[c].to_numpy()
    users_out["user.gender"] = users["user.gender"]

    # Interactions: a hidden taste of each user for each category, plus a slot effect.
    taste = rng.normal(0, 1.2, (n_users, len(_CATS)))
    cat_idx = np.array([_CATS.index(c) for c in cats])
    u = rng.integers(0, n_users, n_rows)
    it = rng.integers(0, n_items, n_rows)
    slot = rng.choice(["top", "side"], n_rows)
    logit = -1.0 + taste[u, cat_idx[it]] + np.where(slot == "top", 0.7, -0.3)
    label = (rng.random(n_rows) < 1 / (1 + np.exp(-logit))).astype(np.int64)
    ts = np.sort(rng.integers(1_600_000_000, 1_600_000_000 + 86400 * 30, n_rows))
    rows = pd.DataFrame({"user_idx": u, "item_idx": it, "ts": ts, "label": label, "ctx.slot": slot})
    keys = ["user_idx", "item_idx", "ts", "label", "split"]
    if conversions:
        cr = np.random.default_rng([seed, 17])
        cvr_taste = cr.normal(0, 2.0, (2, len(_CATS)))
        female = (users["user.gender"].to_numpy() == "f").astype(int)
        p_cvr = 1 / (1 + np.exp(-(-0.5 + cvr_taste[female[u], cat_idx[it]])))
        rows["conversion"] = ((label == 1) & (cr.random(n_rows) < p_cvr)).astype(np.int64)
        keys.insert(4, "conversion")
    rows["split"] = temporal_split(u, ts, it)
    codes = spec.encode_rows(rows, entity_codes(users_out), entity_codes(items_out))
    inter = pd.concat([rows[keys], codes], axis=1)
    inter = inter.sort_values(["user_idx", "ts", "item_idx"], kind="stable").reset_index(drop=True)
    inter["hist"] = history_lists(inter["user_idx"].to_numpy(), inter["item_idx"].to_numpy(), inter["ts"].to_numpy(),
                                  inter["label"].to_numpy(), inter["split"].to_numpy(), history_len)
    return ToyFeatures(spec=spec, interactions=inter, items=items_out, users=users_out)
