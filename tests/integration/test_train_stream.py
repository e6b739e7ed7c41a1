"""The streamed training feed (``ranker.data_feed``, issue 13): a run prepared by the streaming pipeline trains
on Ray Train from its Parquet shards (``TorchTrainer(datasets=...)``, each worker iterating its shard), never
building the table in the driver, and reaches the in-memory path's valid AUC on the same data."""

from __future__ import annotations

import numpy as np
import pytest

from adrec import flow
from adrec.config import build_config
from adrec.features.pipeline import Features
from adrec.features.split import TRAIN, VALID
from adrec.ranking.train import train_ranker
from adrec.ranking.train.feed import BOTH, ShardFeed, streamed_data
from adrec.run import RunDir

STREAMING = ["data.dataset=synthetic", "data.synthetic.n_users=300", "data.synthetic.n_ads=120",
             "data.synthetic.n_impressions=12000", "data.pseudonym_key=test-key", "ranker.tiny_encoder=true",
             "ray.num_cpus=2", "features.pipeline=streaming"]


@pytest.fixture(scope="module")
def sharded_run(ray_session, tmp_path_factory):
    run = RunDir(tmp_path_factory.mktemp("stream-train"))
    flow.prepare(build_config(overrides=STREAMING), run)
    return run


def test_the_feed_holds_no_rows(sharded_run):
    """What the workers get is the catalogue and feeds naming dataset shards; the rows stay in Ray Data."""
    import ray.data

    cfg = build_config(overrides=STREAMING)
    features = Features(sharded_run)
    data, datasets = streamed_data(cfg.ranker, features, sharded_run)
    assert features.sharded and features._interactions is None  # the frame was never read
    assert set(datasets) == {TRAIN, VALID, BOTH}
    assert all(isinstance(ds, ray.data.Dataset) for ds in datasets.values())
    assert all(isinstance(data[k], ShardFeed) for k in datasets)
    assert not any(isinstance(v, np.ndarray) for v in data.values())
    counts = sharded_run.manifest()["stages"]["prepare"]["counts"]
    assert data[TRAIN].rows == counts["rows.train"] and data[VALID].rows == counts["rows.valid"]
    assert data["rates"]["ctr"] == pytest.approx(counts["positives.train"] / counts["rows.train"])
    # the stored per-split positives are what the shards hold
    labels = np.concatenate([b["label"] for b in datasets[VALID].iter_batches(batch_format="numpy")])
    assert len(labels) == counts["rows.valid"] and int(labels.sum()) == counts["positives.valid"]


def _train(run, *overrides):
    cfg = build_config(overrides=[*STREAMING, "ranker.epochs=1", "ranker.resume=false", *overrides])
    features = Features(run)
    summary = train_ranker(cfg, run, features)
    return summary, features


# In `make test-all`: two trainings (~100 s at load 10); the default run keeps the feed's own test above.
@pytest.mark.slow
def test_streamed_training_reaches_the_in_memory_auc(sharded_run):
    streamed, features = _train(sharded_run)
    assert streamed["data_feed"] == "streaming"
    assert features._interactions is None  # the driver never built the table
    assert all(s > 0 for s in streamed["samples_per_s"])
    assert [h["phase"] for h in streamed["history"]] == ["select", "refit"]  # both phases streamed
    memory, _ = _train(sharded_run, "ranker.data_feed=in_memory")
    assert memory["data_feed"] == "in_memory"
    assert streamed["valid_auc"] > 0.6
    assert streamed["valid_auc"] == pytest.approx(memory["valid_auc"], abs=0.03)


def test_two_workers_on_every_cpu_are_refused(sharded_run):
    """Workers holding every CPU would leave the streamed reads none and wait forever: refused up front."""
    from adrec.errors import ConfigError

    with pytest.raises(ConfigError, match="cpus_per_worker"):
        _train(sharded_run, "ranker.num_workers=2")


@pytest.mark.slow
def test_two_workers_split_the_shards(sharded_run):
    """Two DDP workers each stream half of train (an equal streaming split) and the whole of valid."""
    # 2 workers on the session's 2 CPUs: half a CPU each, so Ray Data's read tasks get the rest
    two, _ = _train(sharded_run, "ranker.num_workers=2", "ranker.cpus_per_worker=0.5",
                    "ranker.refit=false")
    one, _ = _train(sharded_run, "ranker.refit=false")
    assert two["num_workers"] == 2 and two["history"][0]["world_size"] == 2
    assert two["valid_auc"] == pytest.approx(one["valid_auc"], abs=0.04)
