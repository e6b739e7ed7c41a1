"""adrec.topk: the protocol stages, the two-stage re-ranker on a synthetic log with a planted recency
signal, the top-K stage's defaults and the benchmark's report.

No Ray; implicit, scikit-learn and (when installed) LightGBM are used for real.
"""

from __future__ import annotations

import importlib.util
import json

import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

from adrec.candidates import EASESource
from adrec.features.split import temporal_split
from adrec.metrics import topk_metrics
from adrec.topk import TopKData, TwoStageRecommender, build_source, item_tag_matrix
from adrec.topk.protocol import inner_stage, make_stage
from benchmarks.topk import run_benchmark

HAS_LIGHTGBM = importlib.util.find_spec("lightgbm") is not None
DAY = 86400


def test_build_source_knows_ease_and_the_colleagues_kinds():
    assert isinstance(build_source({"kind": "ease", "l2": 10.0, "n": 5}, "e"), EASESource)
    src = build_source({"kind": "itemitem", "K": 5, "n": 5}, "cos")
    assert src.name == "cos"


# ----------------------------------------------------------------------------- synthetic log
def planted_recency(n_users: int = 160, n_items: int = 60, days: float = 120.0, hot_days: float = 8.0,
                    seed: int = 0) -> TopKData:
    """Each item is "hot" for ``hot_days`` after its release; users are active for 15-30 days and
    mostly pick what is hot at the time (else a static, long-tailed popularity); 15% of their
    interactions are negatives (label 0). A user's last (test) items are what is hot at the end of
    their span: static models, which see the user's whole span at once, blur that."""
    rng = np.random.default_rng(seed)
    release = np.sort(rng.uniform(-hot_days, days, n_items))
    base = rng.pareto(2.0, n_items) + 1.0
    rows = []
    for u in range(n_users):
        start = rng.uniform(0, days - 30)
        times = np.sort(rng.uniform(start, start + rng.uniform(15, 30), int(rng.integers(15, 30))))
        taken = np.zeros(n_items, bool)
        for t in times:
            hot = (release <= t) & (t < release + hot_days)
            w = np.where(hot, 10.0, 0.0) + 0.3 * base
            w[taken] = 0.0
            i = int(rng.choice(n_items, p=w / w.sum()))
            taken[i] = True
            rows.append((u, i, int(t * DAY), int(rng.random() < 0.85)))
    df = pd.DataFrame(rows, columns=["user_idx", "item_idx", "ts", "label"])
    df["split"] = temporal_split(df["user_idx"].to_numpy(), df["ts"].to_numpy(), df["item_idx"].to_numpy())
    tags = sp.csr_matrix((np.ones(n_items, np.float32), (np.arange(n_items), np.arange(n_items) % 4)),
                         shape=(n_items, 4))
    return TopKData(df, n_users, n_items, n_items, tags)


SMALL_SOURCES = {
    "ease": {"kind": "ease", "l2": 20.0, "num_threads": 1, "n": 30},
    "itemitem": {"kind": "itemitem", "K": 20, "num_threads": 1, "n": 20},
    "popularity": {"kind": "popularity", "n": 20},
}
RANKERS = ["sklearn"] + (["lightgbm"] if HAS_LIGHTGBM else [])
FAST = {"sklearn": {"max_iter": 150}, "lightgbm": {"n_estimators": 150}}


@pytest.fixture(scope="module")
def synth() -> TopKData:
    return planted_recency()


@pytest.fixture(scope="module", params=RANKERS)
def fitted_two_stage(request, synth):
    # bare interactions (no prepared rows): without the language-model features (tests/unit/test_topk_lm.py)
    rec = TwoStageRecommender(sources=SMALL_SOURCES, ranker=request.param, ranker_params=FAST[request.param],
                              ranker_features=False)
    return rec.fit(synth)


def test_protocol_stages(synth):
    df = synth.interactions
    valid = make_stage(df, synth.n_users, synth.n_items, synth.n_catalog, "valid")
    test = make_stage(df, synth.n_users, synth.n_items, synth.n_catalog, "test")
    inner = inner_stage(df, synth.n_users, synth.n_items, synth.n_catalog)
    train = df[df["split"] == "train"]
    assert len(valid.known) == len(train)
    assert len(test.known) == int((df["split"] != "test").sum())
    assert len(inner.known) < len(train)
    key = ["user_idx", "item_idx", "ts"]
    assert len(inner.known.merge(train[key].astype("int64"), on=key)) == len(inner.known), "inner uses train rows only"
    # seen holds every known interaction whatever its label; positives only label 1
    assert valid.seen.nnz == len(train.drop_duplicates(["user_idx", "item_idx"]))
    assert valid.positives.nnz == len(train[train["label"] == 1].drop_duplicates(["user_idx", "item_idx"]))
    # truth = the target split's positives of evaluated users
    tpos = df[(df["split"] == "test") & (df["label"] == 1)]
    assert sorted(test.users.tolist()) == sorted(tpos["user_idx"].unique().tolist())
    assert sum(len(t) for t in test.truth) == len(tpos.drop_duplicates(["user_idx", "item_idx"]))
    # cutoff: last known time, never a target row's
    last_known = df[df["split"] != "test"].groupby("user_idx")["ts"].max()
    np.testing.assert_array_equal(test.cutoff[last_known.index.to_numpy()], last_known.to_numpy())


def test_two_stage_never_recommends_seen_items(fitted_two_stage, synth):
    df = synth.interactions
    users = np.arange(synth.n_users)
    ids, scores = fitted_two_stage.recommend(users, 10)
    assert ids.shape == (synth.n_users, 10) and ids.dtype == np.int64
    known = df[df["split"] != "test"]
    seen = known.groupby("user_idx")["item_idx"].apply(set).to_dict()
    for u in users:
        got = [int(i) for i in ids[u] if i >= 0]
        assert len(got) == len(set(got)) == 10, "a full list of distinct items"
        assert not (set(got) & seen.get(u, set())), f"user {u} got a train/valid item back"
        s = scores[u]
        assert np.all(np.diff(s) <= 0), "scores descend"
        same = np.diff(s) == 0
        assert np.all(np.diff(ids[u])[same] > 0), "ties go to the lower item index"
    # an unsorted batch with repeats gets the same rows as one user at a time
    sub = np.array([7, 3, 7, 0])
    ids_sub, _ = fitted_two_stage.recommend(sub, 10)
    np.testing.assert_array_equal(ids_sub, ids[sub])


def ndcg_at_10(stage, ids: np.ndarray) -> float:
    return topk_metrics(ids, stage.truth, stage.n_catalog, 10, prefix="topk")["topk.ndcg@10"]


def test_two_stage_beats_its_best_single_source_on_planted_recency(fitted_two_stage, synth):
    test = make_stage(synth.interactions, synth.n_users, synth.n_items, synth.n_catalog, "test")
    single = {}
    for name, spec in SMALL_SOURCES.items():
        src = build_source(spec, name).fit(test.positives)
        ids, _ = src.recommend(test.users, 10, test.seen[test.users])
        single[name] = ndcg_at_10(test, ids)
    ids, _ = fitted_two_stage.recommend(test.users, 10)
    ours = ndcg_at_10(test, ids)
    best = max(single.values())
    assert ours > 1.15 * best, (ours, single)


def test_two_stage_save_load_round_trip(fitted_two_stage, tmp_path):
    users = np.arange(20)
    before = fitted_two_stage.recommend(users, 10)
    fitted_two_stage.save(tmp_path / "m")
    meta = json.loads((tmp_path / "m" / "two_stage.json").read_text())
    assert meta["feature_names"] == fitted_two_stage.feature_names
    loaded = TwoStageRecommender.load(tmp_path / "m")
    after = loaded.recommend(users, 10)
    np.testing.assert_array_equal(before[0], after[0])
    np.testing.assert_allclose(before[1], after[1], rtol=1e-5)


def test_a_pickle_planted_in_a_versions_topk_folder_is_refused(fitted_two_stage, tmp_path):
    import pickle

    from adrec.errors import UnsafeFileError
    from adrec.model_version.layout import VersionPaths
    from adrec.model_version.reader import load_two_stage
    from adrec.topk import gbdt

    if fitted_two_stage.ranker != "sklearn":
        pytest.skip("the pickle was scikit-learn's format")
    marker = tmp_path / "ran"

    class Plant:  # unpickled, it would create the marker
        def __reduce__(self):
            return (open, (str(marker), "w"))

    topk = VersionPaths(tmp_path / "version").topk
    fitted_two_stage.save(topk)
    assert (topk / gbdt.SKLEARN_FILE).is_file() and not (topk / gbdt.LEGACY_PICKLE).exists()
    (topk / gbdt.SKLEARN_FILE).unlink()  # a version as older adrec wrote it, with a malicious ranker.pkl
    (topk / gbdt.LEGACY_PICKLE).write_bytes(pickle.dumps(Plant()))
    with pytest.raises(UnsafeFileError, match=r"ranker\.pkl is a pickled re-ranker.*`adrec candidates --run R`"):
        load_two_stage(tmp_path / "version")
    assert not marker.exists()


def test_two_stage_extra_scores_hook(synth):
    calls = []

    def item_index_score(users, items, known):  # a real (if weak) extra score: the item index
        calls.append(len(known))
        return np.asarray(items, np.float32)

    rec = TwoStageRecommender(sources=SMALL_SOURCES, ranker="sklearn", train_stages=("valid",),
                              ranker_params={"max_iter": 30}, extra_scores={"ctr": item_index_score},
                              ranker_features=False)
    rec.fit(synth)
    assert "extra.ctr" in rec.feature_names
    n_train = int((synth.interactions["split"] == "train").sum())
    assert calls[0] == n_train, "the re-ranker's training features see the train split only"
    ids, _ = rec.recommend(np.arange(5), 5)
    assert calls[-1] == int((synth.interactions["split"] != "test").sum())
    assert ids.shape == (5, 5)


def test_two_stage_needs_fit_and_checks_users(synth):
    rec = TwoStageRecommender(sources=SMALL_SOURCES)
    with pytest.raises(RuntimeError, match="not fitted"):
        rec.recommend(np.arange(2), 5)
    with pytest.raises(ValueError, match="train_stages"):
        TwoStageRecommender(train_stages=("test",))


def test_rank_lists_orders_by_the_reranker_and_applies_exclusions(fitted_two_stage, synth):
    rec = fitted_two_stage
    users = np.array([5, 2, 5, 9])
    ids, scores, sources = rec.rank_lists(users, 25, with_sources=True)
    # its first k are recommend()'s lists (one code path for serving, evaluate and the benchmark)
    np.testing.assert_array_equal(ids[:, :10], rec.recommend(users, 10)[0])
    # the re-ranker's own scores of the same candidates, sorted by hand: score desc, item asc
    cu, ci, s = rec.score_candidates(np.array([5]))
    by_hand = ci[np.lexsort((ci, -s))][:25]
    np.testing.assert_array_equal(ids[0][ids[0] >= 0], by_hand)
    np.testing.assert_allclose(scores[0][: len(by_hand)], np.sort(s)[::-1][: len(by_hand)])
    # sources: each item's proposers, by name, and never a name the model does not have
    assert len(sources) == 4 and all(len(row) == int((r >= 0).sum()) for row, r in zip(sources, ids))
    assert {n for row in sources for item in row for n in item} <= set(SMALL_SOURCES) | {"catalog"}
    assert all(item for row in sources for item in row)
    # exclude: a matrix indexed by user (e.g. a version's seen matrix with later impressions)
    drop = ids[1][:3]
    ex = sp.csr_matrix((np.ones(3, np.float32), (np.full(3, 2), drop)), shape=(synth.n_users, synth.n_items))
    ids_ex, _, _ = rec.rank_lists(np.array([2, 5]), 25, exclude=ex)
    assert not set(drop) & set(ids_ex[0].tolist())
    np.testing.assert_array_equal(ids_ex[0][:22], ids[1][3:25])  # the rest keep their order
    np.testing.assert_array_equal(ids_ex[1], ids[0])  # other users untouched


def test_rank_lists_with_exposure_weight_is_the_rerank_of_the_score_pool(fitted_two_stage, synth):
    from adrec.metrics import gini, item_exposure
    from adrec.topk.exposure import exposure_rerank

    rec = fitted_two_stage
    users = np.arange(40)
    provider = np.arange(synth.n_items) % 4
    old = rec.item_provider, rec.exposure_pool
    rec.item_provider, rec.exposure_pool = provider, 30
    try:
        pool, pool_sc, _ = rec.rank_lists(users, 30, exposure_weight=0.0)
        ids, sc, src = rec.rank_lists(users, 10, exposure_weight=0.6, with_sources=True)
    finally:
        rec.item_provider, rec.exposure_pool = old
    pos = exposure_rerank(pool, pool_sc, provider, 0.6, 10)
    np.testing.assert_array_equal(ids, np.take_along_axis(pool, pos, 1))
    np.testing.assert_allclose(sc, np.take_along_axis(pool_sc, pos, 1))
    assert [len(r) for r in src] == [int((r >= 0).sum()) for r in ids]
    # the same items per list are never repeated, and provider exposure is more even than by score
    assert all(len(set(r[r >= 0].tolist())) == int((r >= 0).sum()) for r in ids)
    def by_provider(top):
        return gini(np.bincount(provider, weights=item_exposure(top, synth.n_items), minlength=4))

    assert by_provider(ids) < by_provider(pool[:, :10])


def test_the_reports_exposure_tradeoff_curve(fitted_two_stage, synth, tmp_path):
    from adrec.evaluation.tradeoff import exposure_tradeoff

    rec = fitted_two_stage
    stage = make_stage(synth.interactions, synth.n_users, synth.n_items, synth.n_catalog, "test")
    old = rec.item_provider
    rec.item_provider = np.arange(synth.n_items) % 4
    try:
        metrics, body, img = exposure_tradeoff(rec, stage.users, stage.truth, None, synth.n_catalog, 10,
                                               [0.0, 0.5, 1.0], tmp_path)
        served = rec.rank_lists(stage.users, 10)[0]
    finally:
        rec.item_provider = old
    # w = 0 is the served lists (the recommender's own weight is 0)
    ndcg0 = topk_metrics(served, stage.truth, synth.n_catalog, 10)["topk.ndcg@10"]
    assert abs(metrics["exposure_tradeoff.w=0.ndcg@10"] - ndcg0) < 1e-12
    assert metrics["exposure_tradeoff.w=1.gini.providers"] < metrics["exposure_tradeoff.w=0.gini.providers"]
    assert img.is_file() and "w = 0" in body


def test_config_topk_source_params_match_the_constructors():
    import inspect

    from adrec.config import TOPK_SOURCE_PARAMS, build_config

    from adrec.errors import ConfigError
    from adrec.candidates.als import ALSSource
    from adrec.candidates.bpr import BPRSource
    from adrec.candidates.itemitem import ItemItemSource
    from adrec.candidates.popularity import PopularitySource

    def params(cls, drop=()):
        return {n for n in inspect.signature(cls.__init__).parameters
                if n not in ("self", "name", "show_progress", *drop)}

    assert TOPK_SOURCE_PARAMS["ease"] == params(EASESource)
    assert TOPK_SOURCE_PARAMS["als"] == params(ALSSource)
    assert TOPK_SOURCE_PARAMS["bpr"] == params(BPRSource)
    assert TOPK_SOURCE_PARAMS["popularity"] == params(PopularitySource)
    assert TOPK_SOURCE_PARAMS["bm25"] == params(ItemItemSource, drop=("kind",))
    assert TOPK_SOURCE_PARAMS["itemitem"] <= params(ItemItemSource, drop=("kind",))
    # every default builds, and the kwargs reach the recommender as given
    cfg = build_config()
    kw = cfg.topk.recommender_kwargs()
    for name, spec in kw["sources"].items():
        build_source(spec, name)
    assert TwoStageRecommender(**kw).source_specs["als"]["factors"] == cfg.topk.sources["als"].params["factors"]
    with pytest.raises(ConfigError, match="factorz"):
        build_config(overrides=["topk.sources={als: {kind: als, params: {factorz: 3}}}"])
    with pytest.raises(ConfigError, match="topk.rankr"):
        build_config(overrides=["topk.rankr=sklearn"])


def test_the_recommenders_defaults_are_the_topk_config_sections():
    from adrec.config import TopKConfig, TopKSourceConfig
    from adrec.topk.gbdt import resolve_ranker

    kw = TopKConfig().recommender_kwargs()
    rec = TwoStageRecommender()
    assert rec.source_specs == kw["sources"]
    assert (list(rec.train_stages), list(rec.last_n), list(rec.windows_days)) == (
        kw["train_stages"], kw["last_n"], kw["windows_days"])
    assert (rec.transition_span, rec.next_candidates, rec.rank_depth, rec.ranker_params, rec.batch_users,
            rec.seed) == (kw["transition_span"], kw["next_candidates"], kw["rank_depth"], kw["ranker_params"],
                          kw["batch_users"], kw["seed"])
    assert rec.ranker == resolve_ranker(kw["ranker"])
    # what a spec leaves out comes from TopKSourceConfig; what it gets wrong fails with the source's name
    assert TwoStageRecommender(sources={"pop": {"kind": "popularity"}}).source_specs["pop"] == (
        TopKSourceConfig(kind="popularity").spec())
    with pytest.raises(ValueError, match="'pop'"):
        TwoStageRecommender(sources={"pop": {"n": 3}})
    with pytest.raises(ValueError, match="factorz"):
        TwoStageRecommender(sources={"als": {"kind": "als", "factorz": 3}})


def test_item_tag_matrix_reads_code_columns():
    items = pd.DataFrame({
        "item_idx": [0, 1, 2],
        "c:item.genre": [1, 2, 0],
        "c:item.genres": [np.array([1, 3, 0]), np.array([2, 0, 0]), np.array([0, 0, 0])],
    })
    m = item_tag_matrix(items, 3).toarray()
    # genre codes 1..2 -> tags 1..2 (offset 0), genres codes 1..3 -> tags 4..6 (offset 3)
    assert m.shape[0] == 3
    assert m[0].nonzero()[0].tolist() == [1, 4, 6]
    assert m[1].nonzero()[0].tolist() == [2, 5]
    assert m[2].sum() == 0


# ----------------------------------------------------------------------------- benchmark report
def test_benchmark_report_on_a_small_log(synth, tmp_path):
    grids = {
        "most-popular": ("popularity", [{}]),
        "ease": ("ease", [{"l2": 5.0, "num_threads": 1}, {"l2": 50.0, "num_threads": 1}]),
        "itemitem-cosine": ("itemitem", [{"K": 10, "num_threads": 1}]),
    }
    res = run_benchmark(synth, tmp_path, repeats=1, grids=grids, dataset="synthetic",
                        two_stage_kwargs={"sources": SMALL_SOURCES, "ranker": "sklearn", "ranker_features": False,
                                          "ranker_params": {"max_iter": 50}, "train_stages": ("valid",)})
    data = json.loads((tmp_path / "topk_benchmark.json").read_text())
    assert set(data["methods"]) == {"most-popular", "ease", "itemitem-cosine", "adrec-two-stage"}
    for m in data["methods"].values():
        assert set(m["test"]) == {"precision@10", "recall@10", "ndcg@10", "map@10", "hitrate@10", "coverage@10"}
        assert m["fit_s"] >= 0 and m["recommend_s"] >= 0
    # the chosen EASE setting is the one with the best VALID ndcg
    trials = data["methods"]["ease"]["grid"]
    best = max(trials, key=lambda t: t["valid"]["ndcg@10"])
    assert data["methods"]["ease"]["params"] == best["params"]
    assert res["gain_over_best_peer"]["ndcg@10"]["best_peer"] in {"most-popular", "ease", "itemitem-cosine"}
    md = (tmp_path / "topk_benchmark.md").read_text()
    assert "| adrec-two-stage" in md and "ALS speed" in md


@pytest.mark.parametrize("ranker", RANKERS)
def test_graded_relevance_labels_the_targets_negatives_one_and_its_positives_two(synth, ranker, tmp_path):
    df = synth.interactions
    valid = make_stage(df, synth.n_users, synth.n_items, synth.n_catalog, "valid")
    tv = df[df["split"] == "valid"]
    assert len(valid.target) == len(tv) and set(valid.target["label"]) == {0, 1}
    inner = inner_stage(df, synth.n_users, synth.n_items, synth.n_catalog)
    assert (inner.target["label"] == 0).any()
    rec = TwoStageRecommender(sources=SMALL_SOURCES, ranker=ranker, ranker_params=FAST[ranker],
                              ranker_features=False, relevance="graded")
    rec.n_users, rec.n_items, rec.n_catalog, rec.item_tags = synth.n_users, synth.n_items, synth.n_catalog, synth.item_tags
    sources, index, lm = rec._fit_state(valid.known, None)
    x, y, g = rec._training_examples(valid, sources, index, lm)
    # each candidate's grade by hand: 2 = a valid positive, 1 = a valid row with label 0, 0 = neither
    cu, ci, _ = rec._features(valid.users, sources, index, valid.known, lm)
    grade = {(int(u), int(i)): 0 for u, i in zip(cu, ci)}
    for u, i, lab in tv[["user_idx", "item_idx", "label"]].itertuples(index=False):
        if (u, i) in grade:
            grade[(u, i)] = max(grade[(u, i)], 2 if lab == 1 else 1)
    pos_users = {u for (u, _), v in grade.items() if v == 2}
    want = np.array([grade[(int(u), int(i))] for u, i in zip(cu, ci) if int(u) in pos_users])
    np.testing.assert_array_equal(y, want)
    assert (y == 1).any() and (y == 2).any() and g.sum() == len(y)
    # the fitted recommender keeps the setting through save/load and still never proposes a seen item
    rec.fit(synth)
    assert rec.fit_info["positives"] > 0
    ids, _ = rec.recommend(valid.users[:20], 5)
    test = make_stage(df, synth.n_users, synth.n_items, synth.n_catalog, "test")
    for u, row in zip(valid.users[:20], ids):
        assert not set(row[row >= 0]) & set(test.seen[u].indices)
    back = TwoStageRecommender.load(rec.save(tmp_path / "ts"))
    assert back.relevance == "graded"
    np.testing.assert_array_equal(back.recommend(valid.users[:20], 5)[0], ids)
    with pytest.raises(ValueError, match="relevance"):
        TwoStageRecommender(relevance="stars")
