"""Training the fusion ranker with Ray Train (``TorchTrainer``, V2).

- :mod:`.stage`: ``train_ranker`` (``adrec train``: Ray Train, saves ``RUN/ranker``) and ``fit_local`` (no Ray);
- :mod:`.trainer`: ``make_trainer``, the one ``TorchTrainer`` factory (``adrec train`` and tuning trials);
- :mod:`.loop`: the per-worker loop: the selection phase, the refit phase, the Ray Train worker function;
- :mod:`.state`: ``TrainingState`` (model, optimizer, weight average, progress): an epoch, an evaluation,
  a checkpoint and its restore;
- :mod:`.average`: the weight EMA (torch's ``AveragedModel``);
- :mod:`.session`: where the loop reports and checkpoints (this process, or a Ray Train worker);
- :mod:`.data`: the splits as arrays, recency weights, batches on the device;
- :mod:`.finish`: a finished state -> the calibrated ranker.

The loop: one ``torch.set_num_threads(cfg.torch_threads)`` per worker, bf16 autocast on GPU only,
gradient accumulation (``grad_accum`` micro-batches of ``batch_size`` rows per optimizer step), a
checkpoint each epoch through ``ray.train.report(metrics, checkpoint=...)``; after a worker failure
the restarted group continues from the latest checkpoint and never redoes an epoch it holds.
"""

from adrec.ranking.train.data import prepare_data
from adrec.ranking.train.finish import finish
from adrec.ranking.train.loop import fit, train_loop_per_worker
from adrec.ranking.train.session import STATE_FILE, LocalSession, load_state
from adrec.ranking.train.stage import fit_local, train_ranker
from adrec.ranking.train.trainer import make_trainer, resume_key

__all__ = ["train_ranker", "fit_local", "make_trainer", "resume_key", "prepare_data", "finish", "fit",
           "train_loop_per_worker", "LocalSession", "load_state", "STATE_FILE"]
