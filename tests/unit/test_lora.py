"""LoRA fine-tuning of the text encoder (ranker.finetune=lora, peft): what trains, the saved adapter,
and the merged encoder serving the same logits as the adapted one (tiny random BERT, no Ray)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from tests.unit.test_ranking_model import build, needs_minilm

pytestmark = needs_minilm


@pytest.fixture(scope="module")
def toy():
    from tests.support.toy import toy_features

    return toy_features()


def _lora_names(model) -> set[str]:
    return {n for n, p in model.text.encoder.named_parameters() if "lora_" in n}


def test_only_the_adapter_of_the_target_projections_trains(toy):
    from adrec.ranking.fgsm import fgsm_loss

    r = build(toy, finetune="lora")
    m = r.model
    names = _lora_names(m)
    # 2 layers x (query, value) x (A, B); key, the FFN and the embeddings get none.
    assert len(names) == 8 and all((".query." in n or ".value." in n) for n in names)
    trainable = {n for n, p in m.text.encoder.named_parameters() if p.requires_grad}
    assert trainable == names
    assert {id(p) for p in m.encoder_parameters()} == {id(p) for n, p in m.text.encoder.named_parameters() if n in names}
    m.text.prepare_training()
    m.train()
    before = {n: p.detach().clone() for n, p in m.text.encoder.named_parameters()}
    rows = toy.rows("train").iloc[:64]
    b = r.batch(rows)
    b["fresh"] = torch.unique(b["item"][b["item"] > 0])
    opt = torch.optim.SGD(m.encoder_parameters(), lr=1.0)
    fgsm_loss(m, b, torch.tensor(rows["label"].to_numpy(dtype=np.float32)), 0.05).backward()  # FGSM on tokens too
    opt.step()
    changed = {n for n, p in m.text.encoder.named_parameters() if not torch.equal(p, before[n])}
    assert changed and changed <= names


def test_rank_alpha_dropout_and_targets_are_configurable(toy):
    from adrec.config import LoraSettings

    r = build(toy, finetune="lora", lora=LoraSettings(rank=3, alpha=6, dropout=0.0, target_modules=["key"]))
    names = _lora_names(r.model)
    assert names and all(".key." in n for n in names)
    a = next(p for n, p in r.model.text.encoder.named_parameters() if n.endswith("lora_A.default.weight"))
    assert a.shape[0] == 3


def test_adapter_saved_and_merged_weights_give_the_unmerged_logits(toy, tmp_path):
    from adrec.ranking.fusion import FusionRanker
    from adrec.ranking.lora import is_lora

    r = build(toy, finetune="lora")
    with torch.no_grad():  # B starts at zero (the adapter a no-op): move it so merging has something to merge
        g = torch.Generator().manual_seed(1)
        for n, p in r.model.text.encoder.named_parameters():
            if "lora_B" in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.5)
    r.model.text.refresh()
    rows = toy.rows("test")
    unmerged = r.logits(rows)
    r.save(tmp_path / "ranker")

    adapter = tmp_path / "ranker" / "adapter"
    conf = json.loads((adapter / "adapter_config.json").read_text())
    assert conf["r"] == 8 and conf["lora_alpha"] == 16 and sorted(conf["target_modules"]) == ["query", "value"]
    assert (adapter / "adapter_model.safetensors").is_file()
    assert not list((tmp_path / "ranker" / "encoder").glob("adapter*"))  # the serving encoder is a plain model

    loaded = FusionRanker.load(tmp_path / "ranker")
    enc = loaded.model.text.encoder
    assert not is_lora(enc) and not _lora_names(loaded.model) and not loaded.model.text.trainable
    cached = loaded.model.text.pooled.clone()
    loaded.model.text.refresh()  # item texts through the merged weights, not the saved cache
    np.testing.assert_allclose(loaded.model.text.pooled.numpy(), cached.numpy(), atol=1e-5)
    np.testing.assert_allclose(loaded.logits(rows), unmerged, rtol=0, atol=1e-4)

    # The adapter mattered (base weights give other texts), and a re-save keeps it byte for byte.
    base = build(toy, finetune="frozen")
    base.model.text.refresh()
    assert float((base.model.text.pooled - r.model.text.pooled).abs().max()) > 1e-3
    loaded.save(tmp_path / "again")
    for f in adapter.iterdir():
        assert (tmp_path / "again" / "adapter" / f.name).read_bytes() == f.read_bytes()


def test_no_text_tower_gives_zero_item_text(toy):
    r = build(toy, text_tower=False)
    r.model.text.refresh()
    assert not r.model.text.trainable and float(r.model.text.pooled.abs().max()) == 0.0
    assert np.isfinite(r.logits(toy.rows("test").iloc[:16])).all()
