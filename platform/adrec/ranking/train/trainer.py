"""The Ray Train ``TorchTrainer`` of the ranker, for ``adrec train`` and for tuning trials alike.

DDP over ``num_workers`` workers (gloo on CPU, NCCL on GPU, set up by Ray Train); after a worker
failure Ray Train restarts the worker group (``FailureConfig(max_failures)``) and the loop goes on
from the latest checkpoint. ``resume_key`` names a run by what it trains, so re-running the same
configuration on the same data resumes it.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path

from adrec.config import RankerConfig
from adrec.ranking.train.loop import train_loop_per_worker
from adrec.run import RunDir
from adrec.storage import Location, resolve

# Fields that do not change what is trained: they do not enter the resume key.
_NOT_IN_KEY = {"max_failures", "resume", "storage_path", "num_workers", "use_gpu", "torch_threads",
               "placement_strategy"}


def make_trainer(rc: RankerConfig, data: dict, *, name: str, storage_path: str | Path | Location,
                 train_loop: Callable[[dict], None] | None = None, loop_config: dict | None = None,
                 use_gpu: bool | None = None, resources_per_worker: dict | None = None,
                 num_to_keep: int = 2, callbacks: list | None = None, datasets: dict | None = None):
    """A ``TorchTrainer`` running ``train_loop`` (default :func:`train_loop_per_worker`) on ``data``.

    ``data`` goes once into the object store (with ``datasets``, the streamed feed of
    :mod:`adrec.ranking.train.feed`, it holds no rows: the workers stream their shards of ``datasets``,
    those in ``feed.SPLIT`` split between them, the others read whole by each); ``loop_config`` adds keys to the worker's config (a
    wrapper loop reads them). ``use_gpu`` defaults to ``rc.use_gpu``; ``resources_per_worker``,
    ``num_to_keep`` (checkpoints kept) and ``callbacks`` (Ray Train callbacks) go to Ray Train as
    they are. The run is ``storage_path/name`` (a local path or a URI): an existing one is resumed from its latest checkpoint.
    """
    import ray
    from ray.train import CheckpointConfig, DataConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    gpu = rc.use_gpu if use_gpu is None else use_gpu
    store = resolve(storage_path)
    streamed = {}
    if datasets:
        from adrec.ranking.train.feed import SPLIT

        streamed = {"datasets": datasets,
                    "dataset_config": DataConfig(datasets_to_split=[k for k in SPLIT if k in datasets])}
    return TorchTrainer(
        train_loop or train_loop_per_worker,
        train_loop_config={"ranker": json.loads(rc.model_dump_json()), "data": ray.put(data), **(loop_config or {})},
        torch_config=TorchConfig(backend="nccl" if gpu else "gloo"),
        scaling_config=ScalingConfig(num_workers=rc.num_workers, use_gpu=gpu, resources_per_worker=resources_per_worker,
                                     placement_strategy=rc.placement_strategy),
        run_config=RunConfig(
            name=name,
            # A remote location goes with its pyarrow filesystem: the one adrec resolved (endpoint and
            # credentials from the environment), so Ray Train writes exactly where adrec reads.
            storage_path=store.uri if store.is_local else store.path,
            storage_filesystem=None if store.is_local else store.fs,
            failure_config=FailureConfig(max_failures=rc.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=num_to_keep),
            callbacks=callbacks,
        ),
        **streamed,
    )


def resume_key(cfg: RankerConfig, data_fingerprint: str = "") -> str:
    """The Ray Train run name of a configuration on some data (fields that train nothing left out)."""
    d = {k: v for k, v in json.loads(cfg.model_dump_json()).items() if k not in _NOT_IN_KEY}
    h = hashlib.sha256((json.dumps(d, sort_keys=True) + data_fingerprint).encode()).hexdigest()
    return "ranker-" + h[:12]


def data_fingerprint(run: RunDir, features) -> str:
    """What the training data is: the prepare stage's run (data fingerprint, time) and the feature spec."""
    m = run.manifest().get("stages", {}).get("prepare", {})
    spec = hashlib.sha256(json.dumps(asdict(features.spec), sort_keys=True, default=str).encode()).hexdigest()
    return f"{m.get('data_fingerprint', '')}:{m.get('finished_at', '')}:{spec[:16]}:{features.row_count()}"
