"""adrec.ranking.train.privacy: the noise calibration against Opacus, per-example gradients against plain
autograd, and a DP-SGD fit of the tiny ranker that reports its epsilon. Real torch and Opacus, no Ray."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from adrec.config import DPConfig, RankerConfig
from tests.unit.test_ranking_model import needs_minilm


def test_noise_multiplier_matches_opacus_for_one_phase_and_composes_phases():
    from opacus.accountants.utils import get_noise_multiplier

    from adrec.ranking.train.privacy import _epsilon, noise_multiplier

    dp = DPConfig(target_epsilon=3.0, delta=1e-5)
    sigma = noise_multiplier(dp, [(0.01, 500)], tol=0.001)
    ref = get_noise_multiplier(target_epsilon=3.0, target_delta=1e-5, sample_rate=0.01, steps=500,
                               accountant="rdp", epsilon_tolerance=0.001)
    assert sigma == pytest.approx(ref, rel=0.02)
    assert _epsilon("rdp", [(sigma, 0.01, 500)], 1e-5) <= 3.0
    # a second phase needs more noise for the same budget; a larger budget less
    assert noise_multiplier(dp, [(0.01, 500), (0.008, 500)]) > sigma
    assert noise_multiplier(DPConfig(target_epsilon=8.0), [(0.01, 500)]) < sigma


def test_dp_config_refuses_what_its_clipping_does_not_cover():
    with pytest.raises(ValueError, match="frozen or lora"):
        RankerConfig(finetune="last_n", dp=DPConfig(target_epsilon=1.0))
    with pytest.raises(ValueError, match="fgsm_epsilon: 0: FGSM perturbs"):
        RankerConfig(fgsm_epsilon=0.1, dp=DPConfig(target_epsilon=1.0))
    with pytest.raises(ValueError, match="ensemble_bagging: false: bagging"):
        RankerConfig(ensemble=2, ensemble_bagging=True, dp=DPConfig(target_epsilon=1.0))
    assert RankerConfig(finetune="lora", dp=DPConfig(target_epsilon=1.0)).dp is not None  # the adapter is clipped


def _tiny(**kw) -> RankerConfig:
    base = dict(tiny_encoder=True, embed_dim=8, hidden=[16], cross_layers=1, cross_rank=4, att_hidden=8,
                max_text_len=16, batch_size=64, epochs=1, refit=False, ensemble=2, dropout=0.0)
    base.update(kw)
    return RankerConfig(**base)


@needs_minilm
def test_per_example_gradients_are_each_rows_own_autograd_gradient():
    from adrec.ranking.data import take
    from adrec.ranking.fusion import FusionRanker
    from adrec.ranking.train.data import prepare_data, to_device
    from adrec.ranking.train.privacy import PrivateTraining, _RowLoss, dense_rows
    from tests.support.toy import toy_features

    toy = toy_features()
    cfg = _tiny(dp=DPConfig(target_epsilon=3.0))
    data = prepare_data(cfg, toy)
    torch.manual_seed(0)
    model = FusionRanker.build(cfg, toy.spec, toy.items, toy.users).model
    model.eval()  # no dropout: the two computations must see the same function
    rows = np.flatnonzero((data["train"]["hist"] > 0).sum(1) > 1)[:3]  # rows with a history
    arrays = take(data["train"], rows)
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    per = PrivateTraining(cfg, data, 1)._per_example(model)
    batch = to_device(arrays, torch.device("cpu"))
    labels = torch.from_numpy(arrays["label"]).unsqueeze(1)
    grads, losses = per({n: p.detach() for n, p in named}, batch, labels, torch.ones(len(rows)))
    tables = {n for n, g in grads.items() if isinstance(g, tuple)}
    assert tables == {"members.0.emb.weight", "members.1.emb.weight"}  # as looked-up rows, not whole tables
    grads = {n: dense_rows(*g, dict(named)[n].shape[0]) if n in tables else g for n, g in grads.items()}
    loss_fn = _RowLoss(model)
    for i in range(len(rows)):
        one = to_device(take(arrays, [i]), torch.device("cpu"))  # the plain path: torch.unique of the row's items
        model.zero_grad()
        loss = loss_fn(one, labels[i:i + 1], torch.ones(1))
        loss.backward()
        assert float(loss.detach()) == pytest.approx(float(losses[i]), rel=1e-5)
        for n, p in named:
            ref = p.grad if p.grad is not None else torch.zeros_like(p)
            torch.testing.assert_close(grads[n][i], ref, rtol=1e-4, atol=1e-6)


@needs_minilm
def test_dp_sgd_fit_reports_the_epsilon_it_spent():
    from adrec.ranking.train import fit_local
    from tests.support.toy import toy_features

    cfg = _tiny(max_steps_per_epoch=3, epochs=2, early_stopping_patience=5,
                dp=DPConfig(target_epsilon=2.0, physical_batch=32))
    ranker, reports = fit_local(cfg, toy_features())
    info = ranker.info["privacy"]
    assert info["steps"] == 6  # 2 epochs x 3 noisy steps, all of them counted
    assert 0.0 < info["epsilon"] <= 2.0 and info["delta"] == 1e-5 and info["noise_multiplier"] > 0
    assert all(np.isfinite(r["train_loss"]) for r in reports)
    assert all(r["samples_per_s"] > 0 for r in reports)  # DP epochs count the rows their noisy steps took


# ---- a LoRA adapter trained privately (finetune=lora) ----------------------------------------------------
def _lora_model(cfg, toy):
    from adrec.ranking.fusion import FusionRanker

    torch.manual_seed(0)
    ranker = FusionRanker.build(cfg, toy.spec, toy.items, toy.users)
    with torch.no_grad():  # B starts at zero (the adapter a no-op, A's gradient zero): move it
        g = torch.Generator().manual_seed(1)
        for n, p in ranker.model.text.encoder.named_parameters():
            if "lora_B" in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.5)
    ranker.model.text.refresh()
    return ranker


@needs_minilm
def test_dp_clips_each_rows_gradient_over_the_adapter_too():
    """Per-example gradients with a LoRA adapter against plain autograd of each row alone (its candidate's text
    through the adapter), and the clipped sum against the hand computation sum_i min(1, C / |g_i|) g_i."""
    from adrec.ranking.data import take
    from adrec.ranking.train.data import prepare_data, to_device
    from adrec.ranking.train.privacy import PrivateTraining, _RowLoss, add_clipped, clip_factors, grad_norms
    from tests.support.toy import toy_features

    toy = toy_features()
    cfg = _tiny(finetune="lora", dp=DPConfig(target_epsilon=3.0, max_grad_norm=0.05))
    data = prepare_data(cfg, toy)
    model = _lora_model(cfg, toy).model
    model.eval()
    rows = np.flatnonzero((data["train"]["hist"] > 0).sum(1) > 1)[:4]
    arrays = take(data["train"], rows)
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    adapter = [n for n, _ in named if "lora_" in n]
    assert len(adapter) == 8  # 2 layers x (query, value) x (A, B): the adapter is among what DP-SGD clips
    labels = torch.from_numpy(arrays["label"]).unsqueeze(1)
    grads, losses = PrivateTraining(cfg, data, 1)._per_example(model)(
        {n: p.detach() for n, p in named}, to_device(arrays, torch.device("cpu")), labels, torch.ones(len(rows)))
    refs = []
    for i in range(len(rows)):
        one = to_device(take(arrays, [i]), torch.device("cpu"))
        one["fresh"] = one["item"]  # the plain path, its candidate's text encoded with gradients
        model.zero_grad()
        loss = _RowLoss(model)(one, labels[i:i + 1], torch.ones(1))
        loss.backward()
        assert float(loss.detach()) == pytest.approx(float(losses[i]), rel=1e-5)
        refs.append({n: (p.grad if p.grad is not None else torch.zeros_like(p)).clone() for n, p in named})
        for n in adapter:
            torch.testing.assert_close(grads[n][i], refs[i][n], rtol=1e-4, atol=1e-6)
    ref_norms = torch.stack([torch.sqrt(sum(g.pow(2).sum() for g in r.values())) for r in refs])
    torch.testing.assert_close(grad_norms(grads), ref_norms, rtol=1e-4, atol=1e-7)
    assert all(float(sum(r[n].pow(2).sum() for n in adapter)) > 0 for r in refs)
    C = cfg.dp.max_grad_norm
    assert bool((ref_norms > C).all())  # every row is clipped at this C
    summed = {n: torch.zeros_like(p) for n, p in named}
    add_clipped(summed, grads, clip_factors(grads, C))
    for n in [*adapter, "members.0.emb.weight", "members.0.deep.0.weight"]:
        hand = sum(min(1.0, C / float(ref_norms[i])) * refs[i][n] for i in range(len(rows)))
        torch.testing.assert_close(summed[n], hand, rtol=1e-4, atol=1e-7)
    clipped = torch.sqrt(sum(sum((min(1.0, C / float(ref_norms[i])) * refs[i][n]).pow(2).sum() for n in refs[i])
                             for i in range(len(rows)) if i == 0))
    assert float(clipped) == pytest.approx(C, rel=1e-3)  # row 0's clipped gradient has norm C exactly


@needs_minilm
def test_dp_sgd_trains_a_lora_adapter_reports_epsilon_and_serves_it_merged(tmp_path):
    from adrec.ranking.fusion import FusionRanker
    from adrec.ranking.train import fit_local
    from tests.support.toy import toy_features

    toy = toy_features()
    cfg = _tiny(finetune="lora", ensemble=1, max_steps_per_epoch=3, epochs=1,
                dp=DPConfig(target_epsilon=2.0, physical_batch=32))
    ranker, reports = fit_local(cfg, toy)
    info = ranker.info["privacy"]
    assert info["steps"] == 3 and 0.0 < info["epsilon"] <= 2.0
    assert np.isfinite(reports[-1]["train_loss"])
    lora_b = [p for n, p in ranker.model.text.encoder.named_parameters() if "lora_B" in n]
    assert lora_b and all(float(p.detach().abs().max()) > 0 for p in lora_b)  # B starts at zero: the adapter trained
    rows = toy.rows("test")
    unmerged = ranker.logits(rows)
    ranker.save(tmp_path / "ranker")
    assert (tmp_path / "ranker" / "adapter" / "adapter_model.safetensors").is_file()
    loaded = FusionRanker.load(tmp_path / "ranker")
    assert loaded.info["privacy"]["epsilon"] == pytest.approx(info["epsilon"])
    np.testing.assert_allclose(loaded.logits(rows), unmerged, rtol=1e-4, atol=1e-4)
