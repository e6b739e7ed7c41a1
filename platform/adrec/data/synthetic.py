"""The embedded synthetic ad log: deterministic by seed, written as files plus a schema YAML.

Clicks are drawn from hidden structure a good model can find:
- each user has an affinity for each category that depends on their age band and gender (a cross),
  plus a personal taste vector shared with the ad's latent vector (collaborative signal);
- the hour of day shifts the appetite for some categories (hour x category cross);
- each ad has a quality, and advertisers differ in how well their slots convert;
- the slot (position) multiplies the click probability by a decaying position bias;
- ad titles carry signal the way real ad titles do (issue 14, :func:`ad_texts`): category words (the
  category signal), a style word for each of the two strongest dimensions of the ad's own part of its
  latent vector (the part its category does not tell, which the users' tastes score), and a quality word
  for clearly good or poor ads; each of those words is replaced by a random one with probability 0.25
  (noise). So reading the title tells a model more than the category field does;
- with ``drift_at > 0`` the age/gender x category affinities are redrawn at that point of the timeline;
- conversions (issue 17, ``conversions``): a clicked impression converts with a probability that depends on
  what the click does not (:func:`conversion_logit`): the user's region x the ad's category, the user's age x
  the ad's price, the ad's landing quality, the device, and against the ad's click quality (a catchy ad
  draws clicks that convert less). Drawn from their own generators, so the clicks stay as they were.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from adrec.config import SyntheticConfig
from adrec.data.schema import DatasetSchema, write_schema

CATEGORIES = {
    "travel": ["flights", "hotel", "beach", "getaway", "resort", "cruise", "city break"],
    "finance": ["credit card", "savings", "loan", "invest", "mortgage", "cashback", "trading"],
    "gaming": ["console", "rpg", "esports", "controller", "multiplayer", "arcade", "quest"],
    "beauty": ["skincare", "serum", "lipstick", "fragrance", "salon", "glow", "makeup"],
    "sports": ["running shoes", "gym", "football", "cycling", "yoga mat", "marathon", "fitness"],
    "home": ["sofa", "kitchen", "garden", "mattress", "lamp", "decor", "cookware"],
    "tech": ["laptop", "smartphone", "headphones", "smartwatch", "tablet", "camera", "router"],
    "food": ["pizza", "meal kit", "coffee", "vegan", "burger", "sushi", "grocery"],
    "auto": ["suv", "electric car", "tyres", "car insurance", "test drive", "hybrid", "motorbike"],
    "fashion": ["sneakers", "jacket", "dress", "denim", "handbag", "sunglasses", "boots"],
}
# One pair of words per latent dimension (d = 8): the word for a positive and for a negative value.
STYLE_WORDS = [("luxury", "budget"), ("family", "solo"), ("classic", "trendy"), ("outdoor", "indoor"),
               ("bold", "calm"), ("local", "global"), ("quick", "slow"), ("playful", "serious")]
QUALITY_WORDS = ("award-winning", "top-rated", "bargain-bin", "no-frills")  # two good, two poor
TEXT_NOISE = 0.25  # chance that a signal word of a title is replaced by a random word of its kind
ADJECTIVES = ["premium", "new", "best", "limited", "smart", "easy", "top", "exclusive", "fast", "eco"]
HOOKS = ["deal", "sale", "offer", "today", "now", "for less", "free delivery", "50% off", "trial", "launch"]
REGIONS = ["north", "south", "east", "west", "central"]
DEVICES = ["mobile", "desktop", "tablet"]
N_SLOTS = 5
AGE_BANDS = np.array([18, 25, 35, 45, 55, 70])


def _sigmoid(x):
    return 1.0 / (1.0 + np.exp(-x))


def _names(prefix: str, idx: np.ndarray, width: int) -> np.ndarray:
    return np.char.add(prefix, np.char.zfill(idx.astype(str), width))


def _write_shards(folder: Path, cfg: SyntheticConfig, ad_pop: np.ndarray, draw, t0: int, span: int) -> None:
    """The log as Parquet shards of ``cfg.shard_rows`` impressions, each over its own slice of the
    timeline, drawn and written one at a time: memory holds one shard, the disk holds the log."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    folder.mkdir(parents=True, exist_ok=True)
    n_shards = -(-cfg.n_impressions // cfg.shard_rows)
    for k in range(n_shards):
        n = min(cfg.shard_rows, cfg.n_impressions - k * cfg.shard_rows)
        lo, hi = t0 + span * k // n_shards, t0 + span * (k + 1) // n_shards
        pq.write_table(pa.Table.from_pandas(draw(k, n, lo, hi, ad_pop), preserve_index=False),
                       folder / f"part-{k:05d}.parquet")


def ad_texts(rng, text_rng, cats: list[str], ad_cat: np.ndarray, ad_adv: np.ndarray, own_vec: np.ndarray,
             quality: np.ndarray) -> tuple[list[str], list[str]]:
    """Each ad's title and tags. ``rng`` draws what the titles always had (so the log's other draws, and
    its clicks, stay as they were); ``text_rng`` draws the signal words: the style words of the two
    strongest dimensions of ``own_vec`` (the ad's latent vector minus its category's) and a quality word
    for ``|quality| > 0.3``, each replaced by a random word of its kind with probability ``TEXT_NOISE``."""
    titles, tags = [], []
    for a in range(len(ad_cat)):
        words = CATEGORIES[cats[ad_cat[a]]]
        w = rng.choice(words, 2, replace=False)
        title = f"{rng.choice(ADJECTIVES)} {w[0]} {rng.choice(HOOKS)} from brand{ad_adv[a]}"
        style = []
        for dim in np.argsort(-np.abs(own_vec[a]))[:2]:
            if text_rng.random() < TEXT_NOISE:
                dim, sign = text_rng.integers(len(STYLE_WORDS)), text_rng.integers(2)
            else:
                sign = int(own_vec[a, dim] < 0)
            style.append(STYLE_WORDS[dim][sign])
        if abs(quality[a]) > 0.3:
            good = quality[a] > 0 if text_rng.random() >= TEXT_NOISE else text_rng.random() < 0.5
            style.append(QUALITY_WORDS[text_rng.integers(2) + (0 if good else 2)])
        titles.append(f"{title}, {' '.join(style)}")
        tags.append("|".join(sorted(set(w))))
    return titles, tags


def bids(cfg: SyntheticConfig, ad_adv: np.ndarray) -> np.ndarray:
    """Each ad's bid (what a click is worth to its advertiser): an advertiser's level times a per-ad spread.
    Drawn from a generator of their own, so every other draw of the log (and its clicks) stays as it was
    (``[seed, 23]``: ``[seed, 17]`` is the conversions')."""
    r = np.random.default_rng([cfg.seed, 23])
    level = r.lognormal(0.0, 0.6, cfg.n_advertisers)
    return np.round(level[ad_adv] * r.lognormal(0.0, 0.25, len(ad_adv)), 2)


class ConversionModel:
    """The hidden structure of conversions given a click; its own generator (``[seed, 17]``), so drawing it
    changes none of the log's other draws."""

    def __init__(self, seed: int, n_ads: int, n_cat: int):
        r = np.random.default_rng([seed, 17])
        self.region_aff = r.normal(0, 0.9, (len(REGIONS), n_cat))  # regions play no part in clicks
        self.landing = r.normal(0, 0.5, n_ads)  # the landing page's quality, unrelated to the click quality

    def logit(self, base_cvr: float, region: np.ndarray, age: np.ndarray, ad_cat: np.ndarray,
              price: np.ndarray, landing: np.ndarray, quality: np.ndarray, device: np.ndarray) -> np.ndarray:
        """Conversion logits of clicked impressions (arrays aligned per impression)."""
        age_z = (age - 44.0) / 15.0
        price_z = (np.log(price) - 3.5) / 0.8
        return (np.log(base_cvr / (1 - base_cvr))
                + self.region_aff[region, ad_cat]
                + 0.8 * age_z * price_z  # older users buy the expensive ads, younger ones the cheap ones
                + landing
                - 0.8 * quality  # catchy ads: more clicks, fewer conversions behind them
                + 0.4 * (device == "desktop"))


def generate(cfg: SyntheticConfig, out_dir: str | Path) -> Path:
    """Write the impressions (impressions.csv, or Parquet shards in impressions/ with ``shard_rows``),
    ads.csv, users.csv and schema.yaml into ``out_dir``; returns the schema path."""
    rng = np.random.default_rng(cfg.seed)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    cats = list(CATEGORIES)
    n_cat = len(cats)
    d = 8

    # Users: demographics and a latent taste.
    age = rng.integers(18, 70, cfg.n_users)
    band = np.searchsorted(AGE_BANDS, age, side="right") - 1
    gender = rng.choice(["f", "m"], cfg.n_users)
    g_idx = (gender == "m").astype(int)
    region = rng.choice(REGIONS, cfg.n_users)
    u_vec = rng.normal(0, 1, (cfg.n_users, d))
    activity = rng.lognormal(0, 0.8, cfg.n_users)

    # Ads: advertiser, category, title words, price, latent vector, quality.
    adv_cat = rng.integers(0, n_cat, cfg.n_advertisers)  # advertisers specialise in a category
    ad_adv = rng.integers(0, cfg.n_advertisers, cfg.n_ads)
    ad_cat = np.where(rng.random(cfg.n_ads) < 0.85, adv_cat[ad_adv], rng.integers(0, n_cat, cfg.n_ads))
    cat_vec = rng.normal(0, 1, (n_cat, d))
    ad_vec = cat_vec[ad_cat] + rng.normal(0, 0.6, (cfg.n_ads, d))
    quality = rng.normal(0, 0.4, cfg.n_ads)
    adv_quality = rng.normal(0, 0.3, cfg.n_advertisers)
    price = np.round(rng.lognormal(3.5, 0.8, cfg.n_ads), 2)
    titles, tags = ad_texts(rng, np.random.default_rng([cfg.seed, 14]), cats, ad_cat, ad_adv,
                            ad_vec - cat_vec[ad_cat], quality)

    def affinity(seed_shift: int):
        r = np.random.default_rng(cfg.seed + 1000 + seed_shift)
        demo = r.normal(0, 1.0, (len(AGE_BANDS), 2, n_cat))
        hour = r.normal(0, 0.5, (24, n_cat))
        return demo, hour

    conv = ConversionModel(cfg.seed, cfg.n_ads, n_cat) if cfg.conversions else None
    region_idx = np.array([REGIONS.index(x) for x in region]) if conv is not None else None

    demo_aff, hour_aff = affinity(0)
    demo_aff2, hour_aff2 = affinity(1)

    # Impressions: active users see more ads; time spread over `days`.
    p_user = activity / activity.sum()
    t0 = 1_700_000_000
    span = cfg.days * 86400

    def impressions(r, n: int, t_lo: int, t_hi: int, ad_pop=None, by_time: bool = False, cr=None) -> pd.DataFrame:
        """``n`` impressions in [t_lo, t_hi), drawn with ``r`` (conversions with ``cr``). The single-file log
        draws ``ad_pop`` here, after the users (kept so its data does not change); the sharded log draws it
        once for all shards."""
        u = r.choice(cfg.n_users, n, p=p_user)
        if ad_pop is None:
            ad_pop = r.lognormal(0, 1.0, cfg.n_ads)
        a = r.choice(cfg.n_ads, n, p=ad_pop / ad_pop.sum())
        ts = np.sort(r.integers(t_lo, t_hi, n))
        hour = (ts // 3600) % 24
        slot = r.integers(1, N_SLOTS + 1, n)
        device = r.choice(DEVICES, n, p=[0.6, 0.3, 0.1])
        drifted = np.zeros(n, dtype=bool)
        if cfg.drift_at > 0:
            drifted = ts >= t0 + cfg.drift_at * span if by_time else np.arange(n) >= int(cfg.drift_at * n)
        demo_term = np.where(drifted, demo_aff2[band[u], g_idx[u], ad_cat[a]], demo_aff[band[u], g_idx[u], ad_cat[a]])
        hour_term = np.where(drifted, hour_aff2[hour, ad_cat[a]], hour_aff[hour, ad_cat[a]])
        logit = (
            np.log(cfg.base_ctr / (1 - cfg.base_ctr))
            + 0.9 * demo_term
            + hour_term
            + 0.35 * (u_vec[u] * ad_vec[a]).sum(1) / np.sqrt(d)
            + quality[a]
            + adv_quality[ad_adv[a]]
            + 0.2 * (device == "mobile")
        )
        p = _sigmoid(logit) * (1 - cfg.position_bias) ** (slot - 1)
        clicked = (r.random(n) < p).astype(int)
        out = pd.DataFrame({
            "user_id": _names("user", u, 5),
            "ad_id": _names("ad", a, 4),
            "ts": ts,
            "slot": slot,
            "hour": hour,
            "device": device,
            "clicked": clicked,
        })
        if conv is not None:
            p_cvr = _sigmoid(conv.logit(cfg.base_cvr, region_idx[u], age[u], ad_cat[a], price[a], conv.landing[a],
                                        quality[a], device))
            out["converted"] = (clicked == 1) & (cr.random(n) < p_cvr)
            out["converted"] = out["converted"].astype(int)
        return out

    if cfg.shard_rows is None:
        impressions(rng, cfg.n_impressions, t0, t0 + span, cr=np.random.default_rng([cfg.seed, 17, 0])) \
            .to_csv(out / "impressions.csv", index=False)
        imp_table = {"path": "impressions.csv"}
    else:
        imp_table = {"path": "impressions", "format": "parquet"}
        _write_shards(out / "impressions", cfg, rng.lognormal(0, 1.0, cfg.n_ads),
                      lambda k, n, lo, hi, pop: impressions(np.random.default_rng([cfg.seed, 1, k]), n, lo, hi, pop, True,
                                                            np.random.default_rng([cfg.seed, 17, 1, k])),
                      t0, span)
    pd.DataFrame({
        "ad_id": [f"ad{i:04d}" for i in range(cfg.n_ads)],
        "title": titles,
        "category": [cats[c] for c in ad_cat],
        "advertiser": [f"brand{i}" for i in ad_adv],
        "tags": tags,
        "price": price,
        "bid": bids(cfg, ad_adv),
    }).to_csv(out / "ads.csv", index=False)
    pd.DataFrame({
        "user_id": [f"user{i:05d}" for i in range(cfg.n_users)],
        "age": age,
        "gender": gender,
        "region": region,
    }).to_csv(out / "users.csv", index=False)

    schema = DatasetSchema.model_validate({
        "interactions": {**imp_table, "user": "user_id", "item": "ad_id", "timestamp": "ts",
                         "label": "clicked", **({"conversion": "converted"} if cfg.conversions else {}),
                         "context": ["slot", "hour", "device"]},
        "items": {"path": "ads.csv", "id": "ad_id", "text": ["title", "category"],
                  "categorical": ["advertiser", "category"], "multi_valued": {"tags": "|"}, "numeric": ["price"],
                  "bid": "bid"},
        "users": {"path": "users.csv", "id": "user_id", "categorical": ["gender", "region"], "numeric": ["age"]},
    })
    schema_path = out / "schema.yaml"
    write_schema(schema, schema_path)
    return schema_path
