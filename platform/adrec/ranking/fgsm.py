"""FGSM on the fusion model's input embeddings: adversarial training and a robustness evaluation.

The perturbed inputs are what :meth:`FusionModel.embed` returns: the feature embeddings (every
``f:`` field and the pooled multi-valued fields of each row; the id and attribute embeddings of the
batch's items, candidates and history alike), the item text vectors that enter the model (the pooled
encoder outputs, cached or fresh) and, when the encoder is trained, the token-level inputs of its
trainable part (token embeddings for ``full``; the hidden states entering the trainable top layers
for ``last_n``). Item-side inputs are perturbed once per item of the batch (an item that appears as
candidate and in histories gets one perturbation). Each input moves by ``epsilon * sign(grad)``, so
the perturbation is bounded by ``epsilon`` in L-inf.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F

from adrec.metrics import auc

log = logging.getLogger(__name__)


def fgsm_perturb(loss: torch.Tensor, embeds: dict[str, torch.Tensor], epsilon: float,
                 keys: list[str] | None = None) -> dict[str, torch.Tensor]:
    """``embeds`` moved by ``epsilon * sign(d loss / d embed)`` (the ones in ``keys``, default all).

    The sign is detached, so gradients of a loss on the result still reach whatever produced
    ``embeds`` (adversarial training). Embeddings that do not require grad are returned unchanged.
    """
    if epsilon < 0:
        raise ValueError(f"epsilon must be >= 0, got {epsilon}")
    names = [k for k in (keys or list(embeds)) if k in embeds and embeds[k].requires_grad]
    out = dict(embeds)
    if epsilon == 0 or not names:
        return out
    grads = torch.autograd.grad(loss, [embeds[k] for k in names], retain_graph=True, allow_unused=True)
    for k, g in zip(names, grads):
        if g is not None:
            out[k] = embeds[k] + epsilon * g.detach().sign()
    return out


def require_grad(embeds: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Make every embedding a tensor FGSM can differentiate against (cached inputs become leaves)."""
    for k, v in embeds.items():
        if not v.requires_grad and v.is_floating_point():
            v.requires_grad_(True)
    return embeds


def _bce(logits: torch.Tensor, labels: torch.Tensor, weights: torch.Tensor | None) -> torch.Tensor:
    if weights is None:
        return F.binary_cross_entropy_with_logits(logits.float(), labels)
    per_row = F.binary_cross_entropy_with_logits(logits.float(), labels, reduction="none")
    return (per_row * weights).sum() / weights.sum().clamp(min=1e-12)


def _log1mexp(x: torch.Tensor) -> torch.Tensor:
    """log(1 - exp(x)) for x < 0, accurate at both ends (Maechler's switch at -log 2)."""
    x = x.clamp(max=-1e-7)
    return torch.where(x > -0.6931471805599453, torch.log(-torch.expm1(x)), torch.log1p(-torch.exp(x)))


#: pCTR's floor in the inverse-propensity weight of ``cvr_aux_loss="ipw"`` (a weight of at most 20): a clicked row the
#: click tower thought near-impossible would otherwise dominate its batch.
IPW_FLOOR = 0.05
CVR_AUX_LOSSES = ("none", "clicked", "ipw")


def esmm_loss(ctr_logits: torch.Tensor, cvr_logits: torch.Tensor, clicks: torch.Tensor, conversions: torch.Tensor,
              weights: torch.Tensor | None = None, cvr_weight: float = 1.0, aux: str = "none",
              aux_weight: float = 1.0, detach_ctr: bool = False) -> torch.Tensor:
    """ESMM's loss over every impression (Ma et al., SIGIR 2018): BCE(pCTR, click) + BCE(pCTCVR, click and
    conversion), pCTCVR = pCTR x pCVR. The CVR tower is never fitted on clicked rows alone: it learns through
    the product, over the whole impression space that serving scores. In log space, for stability:
    log pCTCVR = logsigmoid(ctr) + logsigmoid(cvr). ``cvr_weight`` scales the CTCVR term (ESMM: 1).

    ``aux`` adds ``aux_weight`` x a CVR loss of its own on the clicked rows (the only ones whose conversion is
    observed), so the CVR tower gets a direct gradient and not only one through the product:

    - ``"clicked"``: the mean over the batch's clicked rows of BCE(pCVR, conversion) (ESMM + an auxiliary
      CVR loss; biased towards the clicked population, which the CTCVR term keeps in check);
    - ``"ipw"``: ESCM²'s counterfactual-risk form (Wang et al., SIGIR 2022): the sum over the clicked rows of
      BCE(pCVR, conversion) / pCTR, over the batch's rows: an inverse-propensity estimate of the CVR loss over
      the entire impression space. pCTR is the click tower's own, detached (the weight is not a target) and
      floored at :data:`IPW_FLOOR`.

    ``detach_ctr``: pCTR enters the CTCVR product as a constant (stop-gradient): the CTCVR term then trains the
    CVR tower (and, through it, the shared embeddings) only, never the click tower, whose one loss is the
    click BCE, as in a single-task ranker. ESMM's own product sends the CTCVR gradient into pCTR too, which
    pulls pCTR down on every clicked impression that did not convert.

    ``weights`` (bagging, one per row) weigh each row in every term's sums."""
    if aux not in CVR_AUX_LOSSES:
        raise ValueError(f"the auxiliary CVR loss must be one of {CVR_AUX_LOSSES}, not {aux!r}")
    ctr_logits, cvr_logits = ctr_logits.float(), cvr_logits.float()
    y = clicks * conversions  # a conversion counts behind a click only (the data contract says it always is)
    log_p = F.logsigmoid(ctr_logits.detach() if detach_ctr else ctr_logits) + F.logsigmoid(cvr_logits)
    ctcvr = -(y * log_p + (1 - y) * _log1mexp(log_p))
    per_row = F.binary_cross_entropy_with_logits(ctr_logits, clicks, reduction="none") + cvr_weight * ctcvr
    w = torch.ones_like(per_row) if weights is None else weights.float()
    total = w.sum().clamp(min=1e-12)
    loss = (per_row * w).sum() / total
    if aux == "none":
        return loss
    cvr_bce = F.binary_cross_entropy_with_logits(cvr_logits, y, reduction="none") * clicks
    if aux == "clicked":
        aux_loss = (cvr_bce * w).sum() / (clicks * w).sum().clamp(min=1e-12)
    else:
        propensity = torch.sigmoid(ctr_logits.detach()).clamp(min=IPW_FLOOR)
        aux_loss = (cvr_bce / propensity * w).sum() / total
    return loss + aux_weight * aux_loss


@dataclass(frozen=True)
class EsmmTerms:
    """The weights of a two-task ranker's loss terms (:func:`esmm_loss`), from ``ranker.cvr_loss_weight``,
    ``ranker.cvr_aux_loss``, ``ranker.cvr_aux_weight`` and ``ranker.ctcvr_detach_ctr``: one object, so offline
    training, DP-SGD and the online learner fit the same loss."""

    ctcvr_weight: float = 1.0
    aux: str = "none"
    aux_weight: float = 1.0
    detach_ctr: bool = False

    @classmethod
    def of(cls, cfg) -> EsmmTerms:
        return cls(float(cfg.cvr_loss_weight), str(cfg.cvr_aux_loss), float(cfg.cvr_aux_weight),
                   bool(cfg.ctcvr_detach_ctr))

    def __call__(self, ctr_logits, cvr_logits, clicks, conversions, weights=None) -> torch.Tensor:
        return esmm_loss(ctr_logits, cvr_logits, clicks, conversions, weights, self.ctcvr_weight, self.aux,
                         self.aux_weight, self.detach_ctr)


ESMM_LOSS = EsmmTerms()  # ESMM's own loss: the CTCVR term at weight 1, no auxiliary term


def fgsm_loss(model, batch: dict[str, torch.Tensor], labels: torch.Tensor, epsilon: float,
              weights: torch.Tensor | None = None, esmm: EsmmTerms = ESMM_LOSS) -> torch.Tensor:
    """(Weighted) BCE on clean inputs, averaged with BCE on their FGSM perturbation when ``epsilon > 0``.

    ``labels``: (B,) clicks, or (B, 2) clicks and conversions for a two-task model (:func:`esmm_loss`, its terms
    weighted by ``esmm``).
    For an ensemble, the loss is the mean of the members' own losses (not the loss of their mean).
    """
    embeds = model.embed(batch)
    if epsilon > 0:
        require_grad(embeds)
    loss = _members_bce(model, embeds, batch, labels, weights, esmm)
    if epsilon <= 0:
        return loss
    adv = fgsm_perturb(loss, embeds, epsilon)
    return 0.5 * (loss + _members_bce(model, adv, batch, labels, weights, esmm))


def _members_bce(model, embeds, batch, labels, weights, esmm: EsmmTerms = ESMM_LOSS) -> torch.Tensor:
    """Mean over the ensemble members of each member's own loss (members are fitted independently)."""
    def member_weights(i):
        return weights[i] if weights is not None and weights.dim() == 2 else weights

    if labels.dim() == 2:  # clicks and conversions: the ESMM loss of each member's two towers
        ctr, cvr = model.member_task_logits(embeds, batch)
        return torch.stack([esmm(ctr[i], cvr[i], labels[:, 0], labels[:, 1], member_weights(i))
                            for i in range(len(ctr))]).mean()
    if hasattr(model, "member_logits"):
        logits = model.member_logits(embeds, batch)
        per = [_bce(z, labels, weights[i] if weights is not None and weights.dim() == 2 else weights)
               for i, z in enumerate(logits)]
        return torch.stack(per).mean()
    return _bce(model.forward_from(embeds, batch), labels, weights)


def attacked_logits(model, batch: dict[str, torch.Tensor], labels: torch.Tensor, epsilon: float) -> torch.Tensor:
    """Logits after a one-step FGSM attack of size ``epsilon`` against the true labels."""
    with torch.enable_grad():
        embeds = {k: v.detach() for k, v in model.embed(batch).items()}
        require_grad(embeds)
        logits = model.forward_from(embeds, batch)
        if epsilon == 0:
            return logits.detach()
        loss = F.binary_cross_entropy_with_logits(logits.float(), labels, reduction="sum")
        adv = fgsm_perturb(loss, embeds, epsilon)
        return model.forward_from(adv, batch).detach()


def robustness_auc(ranker, rows: pd.DataFrame, epsilons, batch_size: int = 4096) -> dict[float, float]:
    """AUC of ``ranker`` on ``rows`` (which need a ``label`` column) under FGSM at each epsilon.

    ``ranker`` is a :class:`~adrec.ranking.fusion.FusionRanker`; the attack uses the true labels
    and perturbs every input embedding (see the module docstring) by at most epsilon in L-inf.
    Epsilon 0 gives the clean AUC.
    """
    if "label" not in rows.columns:
        raise ValueError("robustness_auc needs rows with a 'label' column")
    y = rows["label"].to_numpy().astype(np.float64)
    model = ranker.model
    model.eval()
    out: dict[float, float] = {}
    for eps in epsilons:
        eps = float(eps)
        scores = []
        for i in range(0, len(rows), batch_size):
            chunk = rows.iloc[i:i + batch_size]
            batch = ranker.batch(chunk)
            labels = torch.as_tensor(y[i:i + batch_size], dtype=torch.float32)
            scores.append(attacked_logits(model, batch, labels, eps).numpy())
        out[eps] = float(auc(y, np.concatenate(scores))) if scores else float("nan")
        log.info("FGSM epsilon %.4g: AUC %.4f", eps, out[eps])
    return out
