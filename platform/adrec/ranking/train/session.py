"""Where the training loop reports and checkpoints: in this process, or in a Ray Train worker.

A session gives the loop its rank, world size and device, the checkpoint to resume from (None on a
fresh start) and ``report(metrics, state)``, called once per epoch. A checkpoint is one file,
``state.pt``: the training state of :class:`adrec.ranking.train.state.TrainingState`, as plain state
(:mod:`adrec.torchfile`: tensors and plain values, read with ``weights_only=True``).
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import torch

from adrec import torchfile

STATE_FILE = "state.pt"


def load_state(folder: str | Path) -> dict:
    """The training state saved in a checkpoint folder (:class:`UnsafeFileError` for one holding objects)."""
    return torchfile.load(Path(folder) / STATE_FILE, "a training checkpoint",
                          "delete the checkpoint folder and train again (`adrec train --run R`)")


def save_state(state: dict, folder: str | Path) -> Path:
    """Write ``state`` as the checkpoint file of ``folder``, as plain state that :func:`load_state` reads."""
    path = Path(folder) / STATE_FILE
    torchfile.save(state, path)
    return path


class LocalSession:
    """One process, no Ray: the last reported state is kept in memory (``state``), metrics in ``reports``."""

    rank, world = 0, 1

    def __init__(self, checkpoint: dict | None = None):
        self.state = checkpoint
        self.reports: list[dict] = []
        self.device = torch.device("cpu")

    def worker_nodes(self) -> int:
        return 1

    def checkpoint(self) -> dict | None:
        return self.state

    def report(self, metrics: dict, state: dict) -> None:
        self.reports.append(metrics)
        self.state = state


class RaySession:
    """A Ray Train worker: rank 0 writes each epoch's checkpoint through ``ray.train.report``."""

    def __init__(self):
        import ray.train
        import ray.train.torch

        ctx = ray.train.get_context()
        self.rank, self.world = ctx.get_world_rank(), ctx.get_world_size()
        self.device = ray.train.torch.get_device()

    def worker_nodes(self) -> int:
        """How many distinct nodes the worker group spans (a collective: every worker calls it)."""
        import ray
        import torch.distributed as dist

        node = ray.get_runtime_context().get_node_id()
        if self.world == 1 or not dist.is_initialized():
            return 1
        nodes: list = [None] * self.world
        dist.all_gather_object(nodes, node)
        return len(set(nodes))

    def checkpoint(self) -> dict | None:
        import ray.train

        ckpt = ray.train.get_checkpoint()
        if ckpt is None:
            return None
        with ckpt.as_directory() as d:
            return load_state(d)

    def report(self, metrics: dict, state: dict) -> None:
        import ray.train

        if self.rank == 0:
            with tempfile.TemporaryDirectory(prefix="adrec-ckpt-") as d:
                save_state(state, d)
                ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(d))
        else:
            ray.train.report(metrics)
