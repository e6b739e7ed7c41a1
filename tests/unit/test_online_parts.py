"""Online learning parts that need neither Ray nor a trained model: attribution, the log reader,
progressive metrics, FTRL, row encoding, the online catalog and ALS fold-in, checkpoints."""

from __future__ import annotations

import json
import math
import pickle

import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
import torch

from adrec.config import OnlineConfig, build_config
from adrec.metrics import auc, calibration, logloss
from adrec.features.row_encoder import RowEncoder
from adrec.features.spec import FeatureSpec
from adrec.online.attribution import AttributionJoiner
from adrec.online.catalog import OnlineCatalog, fold_in_sources
from adrec.online.checkpoint import load_checkpoint, save_checkpoint
from adrec.errors import LogShrankError
from adrec.feedback.filelog import FilePosition, FileReader
from adrec.online.metrics import Progressive, ScoreBoard
from adrec.online.optim import FTRLProximal, parameter_groups, select_parameters


# ---- attribution ------------------------------------------------------------------------------------
def _labels(examples):
    return {e.event_id: e.label for e in examples}


def test_click_labels_most_recent_impression_within_window():
    j = AttributionJoiner(window_s=100)
    out = []
    out += j.impression("i1", "u", 7, 0.0, {}, ())
    out += j.impression("i2", "u", 7, 50.0, {}, ())
    out += j.impression("i3", "v", 7, 60.0, {}, ())  # another user: never labelled by u's click
    out += j.click("u", 7, 120.0)  # i1 (ts 0) is outside the window; i2 is the most recent inside it
    out += j.click("u", 7, 121.0)  # a second click on the same impression: a repeat, not a new label
    assert _labels(out) == {"i1": 0}  # the watermark (121) passed i1's window only
    out += j.impression("i4", "w", 1, 1000.0, {}, ())  # moves the watermark past every window above
    assert _labels(out) == {"i1": 0, "i2": 1, "i3": 0}
    assert [e.event_id for e in out] == ["i1", "i2", "i3"]  # deadline order
    assert j.counts["attributed_clicks"] == 1 and j.counts["repeat_clicks"] == 1
    rest = j.flush()
    assert _labels(rest) == {"i4": 0}
    assert j.counts["examples"] == 4 and j.counts["positives"] == 1


def test_click_before_its_impression_and_late_clicks():
    j = AttributionJoiner(window_s=100)
    out = j.click("u", 3, 10.0)  # reported before the impression it belongs to
    out += j.impression("i1", "u", 3, 5.0, {}, ())
    out += j.impression("i2", "u", 4, 500.0, {}, ())
    assert _labels(out) == {"i1": 1}
    out += j.click("u", 3, 20.0)  # i1 is final already: late, never learned
    out += j.click("x", 9, 450.0)  # no impression ever: expires as unattributed
    out += j.flush()
    assert _labels(out) == {"i1": 1, "i2": 0}
    assert j.counts["late_clicks"] == 1 and j.counts["unattributed_clicks"] == 1


def test_joiner_state_roundtrip_gives_the_same_examples():
    rng = np.random.default_rng(0)
    events = []
    t = 0.0
    for i in range(400):
        t += rng.exponential(5.0)
        u, it = f"u{rng.integers(5)}", int(rng.integers(6))
        events.append(("imp", f"e{i}", u, it, t))
        if rng.random() < 0.3:
            events.append(("clk", None, u, it, t + rng.uniform(0, 80)))
    events.sort(key=lambda e: e[4])

    def feed(j, evs):
        out = []
        for kind, eid, u, it, ts in evs:
            out += j.impression(eid, u, it, ts, {"slot": "1"}, (1, 2)) if kind == "imp" else j.click(u, it, ts)
        return out

    ref = AttributionJoiner(60, 5)
    full = feed(ref, events) + ref.flush()
    first = AttributionJoiner(60, 5)
    part = feed(first, events[:300])
    resumed = AttributionJoiner(1, 0)
    resumed.load_state_dict(pickle.loads(pickle.dumps(first.state_dict())))
    part += feed(resumed, events[300:]) + resumed.flush()
    assert [e.to_tuple() for e in part] == [e.to_tuple() for e in full]
    assert resumed.counts == ref.counts


def _conversions(examples):
    return {e.event_id: e.conversion for e in examples}


def test_a_conversion_labels_the_clicked_impression_behind_it():
    j = AttributionJoiner(window_s=100)
    out = j.impression("i1", "u", 7, 0.0, {}, ())
    out += j.impression("i2", "u", 7, 10.0, {}, ())  # the more recent one, never clicked
    out += j.impression("i3", "v", 7, 10.0, {}, ())  # another user: never labelled by u's conversion
    out += j.click("u", 7, 5.0)  # labels i1: i2 (ts 10) is after the click
    out += j.conversion("u", 7, 30.0)  # i1 and i2 are both in the window: the clicked i1 takes it
    out += j.conversion("x", 1, 31.0)  # no impression of (x, 1): unattributed, learned from by no one
    out += j.flush()
    assert _labels(out) == {"i1": 1, "i2": 0, "i3": 0}
    assert _conversions(out) == {"i1": 1, "i2": 0, "i3": 0}
    assert j.counts["conversions"] == 2 and j.counts["attributed_conversions"] == 1
    assert j.counts["unattributed_conversions"] == 1 and j.counts["converted_examples"] == 1


def test_a_conversion_before_its_click_counts_and_one_without_a_click_does_not():
    j = AttributionJoiner(window_s=100)
    out = j.impression("i1", "u", 3, 0.0, {}, ())
    out += j.impression("i2", "w", 4, 0.0, {}, ())
    out += j.conversion("u", 3, 20.0)  # logged before the click (clients report out of order)
    out += j.click("u", 3, 15.0)
    out += j.conversion("w", 4, 20.0)  # i2 is never clicked: a conversion counts behind a click only
    out += j.conversion("u", 3, 150.0)  # outside i1's window (ts 0 + 100)
    out += j.flush()
    assert _labels(out) == {"i1": 1, "i2": 0} and _conversions(out) == {"i1": 1, "i2": 0}
    assert j.counts["attributed_conversions"] == 2 and j.counts["unattributed_conversions"] == 1
    assert j.counts["converted_examples"] == 1


def test_joiner_state_with_conversions_roundtrips_and_reads_an_older_state():
    rng = np.random.default_rng(1)
    events, t = [], 0.0
    for i in range(300):
        t += rng.exponential(5.0)
        u, it = f"u{rng.integers(4)}", int(rng.integers(5))
        events.append(("imp", f"e{i}", u, it, t))
        if rng.random() < 0.4:
            c = t + rng.uniform(0, 40)
            events.append(("clk", None, u, it, c))
            if rng.random() < 0.5:
                events.append(("cnv", None, u, it, c + rng.uniform(0, 20)))
    events.sort(key=lambda e: e[4])

    def feed(j, evs):
        out = []
        for kind, eid, u, it, ts in evs:
            if kind == "imp":
                out += j.impression(eid, u, it, ts, {}, ())
            else:
                out += (j.click if kind == "clk" else j.conversion)(u, it, ts)
        return out

    ref = AttributionJoiner(60, 5)
    full = feed(ref, events) + ref.flush()
    assert 0 < sum(e.conversion for e in full) <= sum(e.label for e in full)
    assert all(e.label for e in full if e.conversion)
    first = AttributionJoiner(60, 5)
    part = feed(first, events[:250])
    resumed = AttributionJoiner(1, 0)
    resumed.load_state_dict(pickle.loads(pickle.dumps(first.state_dict())))
    part += feed(resumed, events[250:]) + resumed.flush()
    assert [e.to_tuple() for e in part] == [e.to_tuple() for e in full]
    # a checkpoint written before conversions: 7 fields per pending impression, read as not converted
    old = first.state_dict()
    old["pending"] = {k: v[:7] for k, v in old["pending"].items()}
    older = AttributionJoiner(1, 0)
    older.load_state_dict(old)
    assert all(v[7] is False for v in older.pending.values()) and len(older.pending) == len(first.pending)


# ---- the log reader ----------------------------------------------------------------------------------
def _rec(i, typ="impression"):
    return {"event_id": f"e{i}", "user": "u_1", "item": "a1", "type": typ, "ts": float(i), "context": {"slot": 1}}


def test_reader_consumes_complete_lines_only(tmp_path):
    path = tmp_path / "events.jsonl"
    lines = [json.dumps(_rec(i)) + "\n" for i in range(5)]
    path.write_text("".join(lines) + "not json\n" + json.dumps(_rec(9))[:20])  # a bad line, then a torn tail
    r = FileReader(path)
    res = r.read(FilePosition(0), 3)
    assert [e.event_id for e in res.events] == ["e0", "e1", "e2"]
    assert res.end.offset == sum(len(x) for x in lines[:3])
    res2 = r.read(res.end, 100)
    assert [e.event_id for e in res2.events] == ["e3", "e4"] and res2.bad_lines == 1
    assert res2.end.offset == sum(len(x) for x in lines) + len("not json\n")  # the torn tail is left alone
    with open(path, "a") as f:
        f.write(json.dumps(_rec(9))[20:] + "\n")  # the writer finishes the line
    res3 = r.read(res2.end, 100)
    assert [e.event_id for e in res3.events] == ["e9"] and res3.end.offset == path.stat().st_size
    with pytest.raises(LogShrankError):
        r.read(FilePosition(path.stat().st_size + 1), 1)


def test_the_reader_never_reads_past_the_committed_mark(tmp_path):
    from adrec.feedback.filelog import FileWriter

    path = tmp_path / "events.jsonl"
    log = FileWriter(path)
    log.append([_rec(0), _rec(1)])
    acked = path.stat().st_size
    with open(path, "ab") as f:  # complete lines the writer has not acknowledged (a batch still failing)
        f.write((json.dumps(_rec(2)) + "\n").encode())
    r = FileReader(path)
    res = r.read(FilePosition(0), 100)
    assert [e.event_id for e in res.events] == ["e0", "e1"] and res.end.offset == acked == r.size()
    assert r.read(FilePosition(acked), 100).records == []
    log.append([_rec(3)])  # the writer cuts the unacknowledged bytes, then appends and moves the mark
    res = r.read(FilePosition(acked), 100)
    assert [e.event_id for e in res.events] == ["e3"] and res.end.offset == path.stat().st_size
    log.close()


def test_the_watermark_never_passes_the_clock_plus_the_skew():
    clock = [1_800_000_000.0]
    now = clock[0]
    j = AttributionJoiner(window_s=1000, max_ahead_s=300, clock=lambda: clock[0])
    assert j.impression("i1", "u", 1, now - 50, {}, ()) == []  # final once the watermark passes now + 950
    assert j.click("v", 2, 1e18) == []  # nanoseconds: would finalise i1 at once
    assert j.impression("i2", "u", 3, now * 1e9, {}, ()) == []
    assert j.watermark == now + 300 and j.counts["future_ts_clamped"] == 2
    assert j.n_pending == 2 and j.counts["examples"] == 0 and j.counts["late_clicks"] == 0
    clock[0] = now + 2000  # time passes: a real event past i1's deadline labels it, as ever
    out = j.impression("i3", "u", 4, now + 1900, {}, ())
    assert [e.event_id for e in out] == ["i1"] and j.counts["future_ts_clamped"] == 2
    unbounded = AttributionJoiner(window_s=1000)  # no bound: the old behaviour (replays of foreign logs)
    unbounded.impression("i1", "u", 1, now - 50, {}, ())
    assert [e.event_id for e in unbounded.click("v", 2, 1e18)] == ["i1"]


def test_new_users_are_bounded_per_version():
    cat = OnlineCatalog({"known": 0}, [np.array([1])], hist_len=3, n_items=5, max_new_per_version=2)
    for u in ("n1", "n2", "n3", "n3", "known", "n4"):
        cat.impression(u, 1)
    cat.click("n3", 2)
    assert list(cat.new_users) == ["n1", "n2"] and cat.refused_users == 2 and cat.refused_events == 4
    assert "n3" not in cat.seen and "n3" not in cat.clicks and cat.index("n3") == -1
    assert cat.seen_matrix(sp.csr_matrix((1, 5))).shape == (3, 5)  # nothing of the refused users reaches a version
    cat.published()
    cat.click("n3", 2)
    assert cat.index("n3") == 3 and cat.refused_users == 2
    again = OnlineCatalog({"known": 0}, [np.array([1])], hist_len=3, n_items=5, max_new_per_version=2)
    again.load_state_dict(cat.state_dict())
    assert again.state_dict() == cat.state_dict()
    assert OnlineConfig().max_new_users_per_version == 10_000


def test_status_records_are_appended_once(tmp_path):
    from adrec.online.publish import StatusLog

    st = StatusLog(tmp_path)
    rec = {"event": "published", "version": "b-o000000800", "examples_learned": 800, "guard": {"events": 3}}
    assert st.append_once(rec) and not st.append_once(dict(rec))  # a replay of the same decision
    assert st.append_once({**rec, "event": "refused", "version": "b-o000001600", "examples_learned": 1600})
    assert [r["version"] for r in st.read()] == ["b-o000000800", "b-o000001600"]


# ---- progressive metrics -----------------------------------------------------------------------------
def test_progressive_metrics_match_the_offline_definitions():
    rng = np.random.default_rng(1)
    p = rng.uniform(0.001, 0.6, 5000)
    y = (rng.random(5000) < p).astype(int)
    m = Progressive()
    for i in range(0, 5000, 333):
        m.update(p[i:i + 333], y[i:i + 333])
    assert m.n == 5000 and m.clicks == y.sum()
    assert m.auc == pytest.approx(auc(y, p), abs=2e-4)
    assert m.logloss == pytest.approx(logloss(y, p), rel=1e-9)
    assert m.calibration == pytest.approx(calibration(y, p), rel=1e-9)
    board = ScoreBoard(["a", "b"], [2500.0], recent=1000)
    ts = np.arange(5000, dtype=float)
    board.update({"a": p, "b": np.full(5000, 0.5)}, y, ts)
    s = board.summary()
    assert s["segments"][0]["a"]["n"] == 2500 and s["segments"][1]["a"]["n"] == 2500
    assert s["segments"][1]["a"]["logloss"] == pytest.approx(logloss(y[2500:], p[2500:]), rel=1e-9)
    assert s["segments"][0]["b"]["auc"] == pytest.approx(0.5)
    assert s["recent"]["a"]["auc"] == pytest.approx(auc(y[-1000:], p[-1000:]))
    again = ScoreBoard(["a", "b"], [2500.0], recent=1000)
    again.load_state_dict(pickle.loads(pickle.dumps(board.state_dict())))
    assert again.summary() == s or json.dumps(again.summary()) == json.dumps(s)


# ---- FTRL ---------------------------------------------------------------------------------------------
def test_ftrl_learns_and_keeps_untouched_coordinates():
    torch.manual_seed(0)
    x = torch.randn(2000, 5)
    x[:, 4] = 0.0  # a feature that is never active: its weight must stay the served one exactly
    w_true = torch.tensor([1.5, -2.0, 0.5, 0.0, 0.0])
    y = (torch.rand(2000) < torch.sigmoid(x @ w_true)).float()
    w = torch.nn.Parameter(torch.full((5,), 0.3))
    opt = FTRLProximal([w], alpha=1.0, beta=1.0)
    for i in list(range(0, 2000, 50)) * 5:
        loss = torch.nn.functional.binary_cross_entropy_with_logits(x[i:i + 50] @ w, y[i:i + 50])
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert w[4].item() == torch.tensor(0.3).item()  # bit for bit
    assert (w[:3] - w_true[:3]).abs().max().item() < 0.3
    # L1 on the change: small moves are exactly zero, so the weights stay at the served ones.
    v = torch.nn.Parameter(torch.full((5,), 0.3))
    opt = FTRLProximal([v], alpha=0.5, l1=1e6)
    loss = torch.nn.functional.binary_cross_entropy_with_logits(x[:50] @ v, y[:50])
    loss.backward()
    opt.step()
    assert torch.equal(v.detach(), torch.full((5,), 0.3))


def test_parameter_groups_cover_the_model_without_the_encoder():
    class Toy(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = torch.nn.Embedding(10, 4)
            self.lin = torch.nn.Embedding(10, 1)
            self.att = torch.nn.Linear(4, 1)
            self.text_proj = torch.nn.Linear(3, 4)
            self.pos = torch.nn.Parameter(torch.zeros(2, 4))
            self.text = torch.nn.Module()
            self.text.encoder = torch.nn.Linear(3, 3)
            self.deep = torch.nn.Linear(4, 4)
            self.out = torch.nn.Linear(4, 1)
            self.bias = torch.nn.Parameter(torch.zeros(1))

    g = {k: sorted(n for n, _ in v) for k, v in parameter_groups(Toy()).items()}
    assert g["embeddings"] == ["emb.weight", "lin.weight"]
    assert g["fusion"] == ["att.bias", "att.weight", "pos", "text_proj.bias", "text_proj.weight"]
    assert g["head"] == ["bias", "deep.bias", "deep.weight", "out.bias", "out.weight"]
    assert not any(n.startswith("text.") for n, _ in select_parameters(Toy(), ["head", "fusion", "embeddings"]))

    class Ensemble(torch.nn.Module):  # heads inside members, as the fusion model's deep ensemble has them
        def __init__(self):
            super().__init__()
            self.text = torch.nn.Module()
            self.text.encoder = torch.nn.Linear(3, 3)
            self.members = torch.nn.ModuleList(Toy() for _ in range(2))

    g = {k: sorted(n for n, _ in v) for k, v in parameter_groups(Ensemble()).items()}
    assert "members.1.emb.weight" in g["embeddings"] and "members.0.att.weight" in g["fusion"]
    assert "members.1.pos" in g["fusion"] and "members.0.deep.weight" in g["head"]
    assert not any(n.startswith("text.") for names in g.values() for n in names)


# ---- row encoding --------------------------------------------------------------------------------------
def test_row_encoder_matches_the_feature_spec():
    spec = FeatureSpec(
        vocabs={"ctx.slot": {"1": 1, "2": 2}, "ctx.device": {"mobile": 1, "tablet": 2},
                "user.gender": {"f": 1, "m": 2}, "item.category": {"a": 1, "b": 2, "c": 3}},
        buckets={"user.age": [30.0, 50.0]}, multi_vocabs={"item.tags": {"x": 1, "y": 2}},
        multi_max_len={"item.tags": 2},
        crosses=[{"name": "x:user.gender*item.category", "a": "user.gender", "b": "item.category", "hash_size": 64},
                 {"name": "x:ctx.slot*item.category", "a": "ctx.slot", "b": "item.category", "hash_size": 32}],
        n_users=4, n_items=3, n_catalog=3, context=["ctx.slot", "ctx.device"], history_len=3)
    user_codes = pd.DataFrame({"user.gender": [1, 2, 0, 1], "user.age": [1, 2, 3, 0]})
    item_codes = pd.DataFrame({"item.category": [1, 3, 2], "item.tags": [np.array([1]), np.array([1, 2]), np.array([])]})
    users = np.array([0, 3, -1, 2, 1])
    items = np.array([2, 0, 1, -1, 1])
    contexts = [{"slot": "1", "device": "mobile"}, {"slot": 2}, {}, {"slot": "9", "device": "tablet"}, {"device": "tv"}]
    hists = [(0, 1), (), (2,), (1,), ()]
    fast = RowEncoder(spec, user_codes, item_codes).encode(users, items, contexts, hists)
    exact = RowEncoder(spec, user_codes, item_codes, exact=True).encode(users, items, contexts, hists)
    assert list(fast.columns) == list(exact.columns)
    for c in fast.columns:
        if c == "hist":
            assert [list(h) for h in fast[c]] == [list(h) for h in exact[c]]
        else:
            np.testing.assert_array_equal(fast[c].to_numpy(dtype=np.int64), exact[c].to_numpy(dtype=np.int64), err_msg=c)
    # One context for every row (a served request, ModelVersion.rows): the same codes as that dict per row.
    for one, slot_code in (({"slot": "2", "device": "tablet"}, 2), ({"slot": 1}, 1), ({}, 0), (None, 0)):
        fast = RowEncoder(spec, user_codes, item_codes).encode(users, items, one, hists)
        exact = RowEncoder(spec, user_codes, item_codes, exact=True).encode(users, items, [one or {}] * len(users), hists)
        assert list(fast.columns) == list(exact.columns)
        for c in fast.columns:
            if c != "hist":
                np.testing.assert_array_equal(fast[c].to_numpy(dtype=np.int64), exact[c].to_numpy(dtype=np.int64),
                                              err_msg=f"{one}: {c}")
        assert fast["f:ctx.slot"].tolist() == [slot_code] * len(users)


# ---- online catalog and ALS fold-in -----------------------------------------------------------------------
def test_catalog_histories_new_users_and_fold_in():
    from adrec.candidates.als import ALSSource
    from adrec.candidates.itemitem import ItemItemSource
    from adrec.candidates.merge import MultiSource
    from adrec.candidates.popularity import PopularitySource

    n_users, n_items = 30, 12
    train = sp.random(n_users, n_items, density=0.3, random_state=1, format="csr", dtype=np.float32)
    train.data[:] = 1.0
    train = sp.csr_matrix(train.multiply(np.arange(n_items) != 11))  # item 11: no training positive (cold)
    train.eliminate_zeros()
    multi = MultiSource([ALSSource(factors=4, iterations=5, seed=0, num_threads=1), ItemItemSource(K=5),
                         PopularitySource()], {"als": 0.6, "itemitem": 0.3, "popularity": 0.1}).fit(train)
    base_hist = [np.asarray(train[u].indices[-3:], dtype=np.int64) for u in range(n_users)]
    cat = OnlineCatalog({f"u{i}": i for i in range(n_users)}, base_hist, hist_len=3, n_items=n_items)
    cat.impression("new-a", 2)
    cat.click("new-a", 11)
    cat.click("new-a", 3)
    cat.click("u0", 11)
    cat.impression("new-b", 5)
    assert cat.index("new-a") == 30 and cat.index("new-b") == 31 and cat.base_index("new-a") == -1
    assert cat.history("new-a") == (11, 3)
    assert cat.history("u0") == tuple(base_hist[0].tolist() + [11])[-3:]
    assert cat.history("u1") == tuple(base_hist[1].tolist())
    seen = cat.seen_matrix(train)
    assert seen.shape == (32, n_items) and set(seen[30].indices) == {2, 3, 11} and set(seen[31].indices) == {5}

    before_item = multi["als"].item_factors[11].copy()
    info = fold_in_sources(multi, cat)
    assert info["new_users"] == 2 and info["users_refolded"] == 2 and info["items_refolded"] == 2
    als = multi["als"]
    assert als.user_factors.shape[0] == 32 and als.n_users == 32
    assert np.abs(als.user_factors[30]).sum() > 0  # folded from its clicks
    assert np.abs(als.user_factors[31]).sum() == 0  # no click: nothing to fold
    assert not np.allclose(als.item_factors[11], before_item)  # the cold item got a factor from its clicks
    assert multi["itemitem"].user_items.shape[0] == 32 and set(multi["itemitem"].user_items[30].indices) == {3, 11}
    ids, _, _ = multi.recommend(np.array([30]), 5, sp.csr_matrix(seen[30]))
    assert len(ids[0][ids[0] >= 0]) > 0 and not set(ids[0]) & {2, 3, 11}
    st = pickle.loads(pickle.dumps(cat.state_dict()))
    again = OnlineCatalog({f"u{i}": i for i in range(n_users)}, base_hist, 3, n_items)
    again.load_state_dict(st)
    assert again.state_dict() == cat.state_dict() and again.history("u0") == cat.history("u0")


# ---- checkpoints and config ---------------------------------------------------------------------------------
def test_checkpoint_is_replaced_atomically(tmp_path):
    assert load_checkpoint(tmp_path) is None
    save_checkpoint(tmp_path, {"offset": 10, "model": {"w": torch.ones(3)}})
    save_checkpoint(tmp_path, {"offset": 20, "model": {"w": torch.zeros(3)}})
    st = load_checkpoint(tmp_path)
    assert st["offset"] == 20 and torch.equal(st["model"]["w"], torch.zeros(3))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint.pt"]


def test_online_config_is_part_of_the_typed_config():
    cfg = build_config(overrides=["online.optimizer=sgd", "online.train_layers=[head]", "online.guard_margin=0.05"])
    assert isinstance(cfg.online, OnlineConfig) and cfg.online.optimizer == "sgd" and cfg.online.train_layers == ["head"]
    with pytest.raises(ValueError, match="online.optimiser"):
        build_config(overrides=["online.optimiser=sgd"])
    assert math.isclose(OnlineConfig().guard_margin, 0.01)
