"""The exponential moving average of the trainable weights (a cheap ensemble over training steps).

torch's :class:`~torch.optim.swa_utils.AveragedModel` with its EMA update
(:func:`~torch.optim.swa_utils.get_ema_multi_avg_fn`), over the trainable parameters only: the
frozen encoder layers never change, so averaging (and copying) them would only cost time and memory.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn


class _Trainable(nn.Module):
    """The trainable parameters of a model, shared with it (not copies)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.params = nn.ParameterList([p for p in model.parameters() if p.requires_grad])


def _warmup_ema(decay: float):
    """EMA update whose decay grows with the update count: min(decay, (1 + n) / (10 + n)).

    Warm-up as tf.train.ExponentialMovingAverage's num_updates, so a short fit (a few dozen steps) is
    not averaged back to its initial weights. ``n`` is AveragedModel's count before this update,
    which starts at 1 (the first call only copies the weights in).
    """

    def update(averaged, current, num_averaged) -> None:
        n = float(num_averaged)
        get_ema_multi_avg_fn(min(decay, (1.0 + n) / (10.0 + n)))(averaged, current, num_averaged)

    return update


class WeightAverage:
    """EMA of ``model``'s trainable weights, starting at their current values."""

    def __init__(self, model: nn.Module, decay: float):
        self._live = _Trainable(model)
        self._avg = AveragedModel(self._live, multi_avg_fn=_warmup_ema(decay))
        self._avg.update_parameters(self._live)  # the first update copies: the average starts here

    def update(self) -> None:
        """Fold in the current weights (after each optimizer step)."""
        self._avg.update_parameters(self._live)

    @torch.no_grad()
    def swap(self) -> None:
        """Exchange the live weights and the averaged ones (call twice to undo)."""
        for avg, live in zip(self._avg.module.parameters(), self._live.parameters(), strict=True):
            tmp = live.detach().clone()
            live.copy_(avg)
            avg.copy_(tmp)

    def state(self) -> dict:
        return {k: v.detach().cpu().clone() for k, v in self._avg.state_dict().items()}

    def load(self, state: dict) -> None:
        self._avg.load_state_dict(state)
