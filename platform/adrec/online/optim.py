"""Online optimizers and the parameter groups the learner updates.

:class:`FTRLProximal` is McMahan et al.'s per-coordinate FTRL-Proximal (the "Ad Click Prediction: a
View from the Trenches" update), applied to the *change* from the weights the learner started from:
``w = w0 + delta`` with FTRL on ``delta``. A coordinate that never sees a gradient keeps its served
value exactly, L1 (``l1``) makes small changes exactly zero and L2 (``l2``) pulls the model back
toward the served weights; the per-coordinate step is ``alpha / (beta + sqrt(sum of squared grads))``.
"""

from __future__ import annotations

import torch
from torch import nn

GROUPS = ("head", "fusion", "embeddings")
# Module / parameter names of the fusion model's late-fusion parts (see adrec.ranking.model: the text
# projection, the target attention and the history positions), wherever they sit (e.g. in ensemble members).
_FUSION_NAMES = {"text_proj", "att", "pos", "hist_n"}


def parameter_groups(model: nn.Module) -> dict[str, list[tuple[str, nn.Parameter]]]:
    """The model's parameters outside the text encoder, by group.

    ``embeddings``: every :class:`nn.Embedding` (field/id embeddings, the wide weights, history-length
    embeddings); ``fusion``: the text projection, the target attention and history positions;
    ``head``: everything else (cross layers, MLP, output layer, bias), of every ensemble member.
    """
    emb_params = set()
    for name, mod in model.named_modules():
        if isinstance(mod, nn.Embedding):
            emb_params |= {id(p) for p in mod.parameters(recurse=False)}
    out: dict[str, list] = {g: [] for g in GROUPS}
    for name, p in model.named_parameters():
        if name.startswith("text."):  # the encoder: its pooled item-text cache must stay valid
            continue
        if id(p) in emb_params:
            out["embeddings"].append((name, p))
        elif _FUSION_NAMES & set(name.split(".")):
            out["fusion"].append((name, p))
        else:
            out["head"].append((name, p))
    return out


def select_parameters(model: nn.Module, layers: list[str]) -> list[tuple[str, nn.Parameter]]:
    groups = parameter_groups(model)
    chosen = [np_ for g in GROUPS if g in layers for np_ in groups[g]]
    if not chosen:
        raise ValueError(f"online.train_layers={layers} selects no parameter of the model")
    return chosen


class FTRLProximal(torch.optim.Optimizer):
    """Per-coordinate FTRL-Proximal on the change from the initial weights (see the module doc)."""

    def __init__(self, params, alpha: float = 0.02, beta: float = 1.0, l1: float = 0.0, l2: float = 0.0):
        if alpha <= 0:
            raise ValueError(f"alpha must be > 0, got {alpha}")
        super().__init__(params, dict(alpha=alpha, beta=beta, l1=l1, l2=l2))

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            alpha, beta, l1, l2 = group["alpha"], group["beta"], group["l1"], group["l2"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                g = p.grad
                st = self.state[p]
                if not st:
                    st["w0"] = p.detach().clone()
                    st["z"] = torch.zeros_like(p)
                    st["n"] = torch.zeros_like(p)
                    st["sqrt_n"] = torch.zeros_like(p)
                w0, z, n, sqrt_n = st["w0"], st["z"], st["n"], st["sqrt_n"]
                n.addcmul_(g, g)
                new_sqrt = n.sqrt()
                sigma = (new_sqrt - sqrt_n).div_(alpha)
                # z += g - sigma * (w - w0)
                z.add_(g).sub_(sigma.mul_(p.sub(w0)))
                sqrt_n.copy_(new_sqrt)
                denom = new_sqrt.add_(beta).div_(alpha)
                if l2:
                    denom.add_(l2)
                if l1:
                    delta = torch.where(z.abs() <= l1, torch.zeros_like(z), (torch.sign(z) * l1 - z) / denom)
                else:
                    delta = z.neg().div_(denom)
                p.copy_(w0.add(delta))
        return loss


def make_optimizer(params: list[nn.Parameter], cfg) -> torch.optim.Optimizer:
    """The optimizer ``cfg`` (an :class:`adrec.config.OnlineConfig`) names."""
    if cfg.optimizer == "ftrl":
        return FTRLProximal(params, alpha=cfg.lr, beta=cfg.ftrl_beta, l1=cfg.ftrl_l1, l2=cfg.ftrl_l2)
    if cfg.optimizer == "adagrad":
        return torch.optim.Adagrad(params, lr=cfg.lr)
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(params, lr=cfg.lr)
    raise ValueError(f"unknown online optimizer {cfg.optimizer!r}")
