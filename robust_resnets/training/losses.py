"""Adversarial training objectives: PGD-AT ("SAT"), TRADES, MART and SCORE's LSE, plus clean training.

Each objective is a pair of public functions:

* the training loss, ``loss(clean_logits, adv_logits, labels, **hyper) -> scalar``, where
  ``clean_logits`` and ``adv_logits`` are the model's logits on the clean and the adversarial
  batch (PGD-AT and clean training ignore one of them);
* the attack objective the inner maximisation uses, a per-example loss ``(N,)`` of the logits on
  the candidate adversarial inputs and a target: the labels (PGD-AT, MART) or the model's
  probabilities on the clean inputs (TRADES, SCORE). It plugs into
  :func:`robust_resnets.attacks.pgd.pgd_attack` as ``loss_fn``.

The formulas follow the papers and the authors' code: nothing is detached in the outer losses
(gradients flow through the clean prediction that TRADES, MART and SCORE compare against), and the
small constants of the MART implementation are kept.

References:
    Madry et al. 2018 (arXiv:1706.06083); Zhang et al. 2019, TRADES (arXiv:1901.08573); Wang et al.
    2020, MART (ICLR 2020); Pang et al. 2022, SCORE (arXiv:2202.10103).
"""
from __future__ import annotations

import dataclasses
from typing import Callable, Dict, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

def _f32(x: Tensor) -> Tensor:
    """Half-precision logits (from autocast) are promoted to float32; float32/float64 stay as they are."""
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


__all__ = [
    'clean_loss', 'pgd_at_loss', 'pgd_at_attack_loss', 'trades_loss', 'trades_attack_loss',
    'mart_loss', 'mart_attack_loss', 'score_loss', 'score_attack_loss', 'score_soft_targets',
    'Objective', 'OBJECTIVES', 'get_objective',
]


def clean_loss(clean_logits: Tensor, adv_logits: Optional[Tensor], labels: Tensor, *,
               label_smoothing: float = 0.0) -> Tensor:
    """Standard (non-adversarial) training: cross-entropy on the clean logits.

    Args:
        clean_logits: Logits on the clean inputs, N x K.
        adv_logits: Unused (None); accepted for a uniform signature.
        labels: Class indices, N.
        label_smoothing: Label smoothing of the cross-entropy (PyTorch's convention: ``(1 - ls) *
            one_hot + ls / K``).
    """
    return F.cross_entropy(_f32(clean_logits), labels, label_smoothing=label_smoothing)


def pgd_at_loss(clean_logits: Optional[Tensor], adv_logits: Tensor, labels: Tensor, *,
                label_smoothing: float = 0.0) -> Tensor:
    """PGD adversarial training (Madry et al.; "SAT" in Huang et al.): cross-entropy on the adversarial logits.

    Args:
        clean_logits: Unused (None); accepted for a uniform signature.
        adv_logits: Logits on the adversarial inputs, N x K.
        labels: Class indices, N.
        label_smoothing: Label smoothing of the cross-entropy.
    """
    return F.cross_entropy(_f32(adv_logits), labels, label_smoothing=label_smoothing)


def pgd_at_attack_loss(adv_logits: Tensor, labels: Tensor) -> Tensor:
    """Attack objective of PGD-AT and MART: per-example cross-entropy to the labels, (N,)."""
    return F.cross_entropy(_f32(adv_logits), labels, reduction='none')


def trades_loss(clean_logits: Tensor, adv_logits: Tensor, labels: Tensor, *, beta: float = 6.0,
                label_smoothing: float = 0.0) -> Tensor:
    """TRADES: ``CE(f(x), y) + beta * KL(softmax f(x) || softmax f(x'))``, the KL averaged over the batch.

    Args:
        clean_logits: Logits on the clean inputs, N x K.
        adv_logits: Logits on the adversarial inputs, N x K.
        labels: Class indices, N.
        beta: Weight of the robust (KL) term, 1/lambda of the paper.
        label_smoothing: Label smoothing of the clean cross-entropy (0.1 in the Gowal/Rebuffi-style
            recipes with extra data, 0 in Huang et al.'s 100-epoch recipes).
    """
    clean_logits, adv_logits = _f32(clean_logits), _f32(adv_logits)
    natural = F.cross_entropy(clean_logits, labels, label_smoothing=label_smoothing)
    robust = F.kl_div(F.log_softmax(adv_logits, dim=1), F.log_softmax(clean_logits, dim=1),
                      reduction='batchmean', log_target=True)
    return natural + beta * robust


def trades_attack_loss(adv_logits: Tensor, clean_probs: Tensor) -> Tensor:
    """Attack objective of TRADES: per-example ``KL(clean_probs || softmax(adv_logits))``, (N,).

    ``clean_probs`` is the (detached) softmax of the model on the clean inputs.
    """
    log_q = F.log_softmax(_f32(adv_logits), dim=1)
    return (torch.xlogy(clean_probs, clean_probs) - clean_probs * log_q).sum(dim=1)


def mart_loss(clean_logits: Tensor, adv_logits: Tensor, labels: Tensor, *, beta: float = 6.0) -> Tensor:
    """MART: boosted CE on the adversarial logits plus a KL term weighted by the clean misclassification.

    ``BCE(p(x'), y) + beta * mean_i KL(p(x_i) || p(x'_i)) * (1 - p_y(x_i))``, where ``BCE = -log p_y(x')
    - log(1 - max_{k != y} p_k(x'))``. The constants (1.0001, 1e-12, 1.0000001) are those of the
    authors' implementation.

    Args:
        clean_logits: Logits on the clean inputs, N x K.
        adv_logits: Logits on the adversarial inputs, N x K.
        labels: Class indices, N.
        beta: Weight of the robust term.
    """
    clean_logits, adv_logits = _f32(clean_logits), _f32(adv_logits)
    adv_probs = F.softmax(adv_logits, dim=1)
    top2 = adv_probs.topk(2, dim=1).indices
    hardest_wrong = torch.where(top2[:, 0] == labels, top2[:, 1], top2[:, 0])
    boosted_ce = F.cross_entropy(adv_logits, labels) + F.nll_loss(
        torch.log(1.0001 - adv_probs + 1e-12), hardest_wrong)
    clean_probs = F.softmax(clean_logits, dim=1)
    true_probs = clean_probs.gather(1, labels[:, None]).squeeze(1)
    kl = (torch.xlogy(clean_probs, clean_probs) - clean_probs * torch.log(adv_probs + 1e-12)).sum(dim=1)
    return boosted_ce + beta * (kl * (1.0000001 - true_probs)).mean()


#: MART's inner maximisation is PGD on the cross-entropy, as in PGD-AT.
mart_attack_loss = pgd_at_attack_loss


def score_soft_targets(labels: Tensor, num_classes: int, label_smoothing: float = 0.0, *,
                       dtype: torch.dtype = torch.float32) -> Tensor:
    """SCORE's targets: ``(1 - K * ls / (K - 1)) * one_hot + ls / (K - 1)`` (true class 1 - ls, others ls/(K-1))."""
    one_hot = F.one_hot(labels, num_classes).to(dtype)
    if label_smoothing == 0:
        return one_hot
    off = label_smoothing / (num_classes - 1)
    return (1 - num_classes * off) * one_hot + off


def score_loss(clean_logits: Tensor, adv_logits: Tensor, labels: Tensor, *, beta: float = 4.0,
               label_smoothing: float = 0.0, clip_value: float = 0.0) -> Tensor:
    """SCORE (Pang et al. 2022) with the squared-error (LSE) divergence.

    ``mean_i ||p(x_i) - t_i||^2 + beta * mean_i relu(||p(x'_i) - p(x_i)||^2 - clip_value)``, with ``p``
    the softmax and ``t`` the targets of :func:`score_soft_targets`.

    Args:
        clean_logits: Logits on the clean inputs, N x K.
        adv_logits: Logits on the adversarial inputs, N x K.
        labels: Class indices, N.
        beta: Weight of the robust term (3.0 for the released checkpoints, 4.0 in the README example).
        label_smoothing: Label smoothing of the targets (0 in the SCORE recipe).
        clip_value: Robust-term values below this are not penalised (0 in the SCORE recipe).
    """
    clean_probs = F.softmax(_f32(clean_logits), dim=1)
    adv_probs = F.softmax(_f32(adv_logits), dim=1)
    targets = score_soft_targets(labels, clean_probs.shape[1], label_smoothing, dtype=clean_probs.dtype)
    natural = (clean_probs - targets).pow(2).sum(dim=1)
    robust = F.relu((adv_probs - clean_probs).pow(2).sum(dim=1) - clip_value)
    return natural.mean() + beta * robust.mean()


def score_attack_loss(adv_logits: Tensor, clean_probs: Tensor) -> Tensor:
    """Attack objective of SCORE: per-example ``||softmax(adv_logits) - clean_probs||^2``, (N,)."""
    return (F.softmax(_f32(adv_logits), dim=1) - clean_probs).pow(2).sum(dim=1)


@dataclasses.dataclass(frozen=True)
class Objective:
    """A training objective as the trainer uses it.

    Attributes:
        name: Name in configs.
        loss: The training loss, ``loss(clean_logits, adv_logits, labels, **hyper)``.
        attack_loss: Per-example attack objective, or None for clean training.
        attack_target: What the attack objective compares against: 'labels' or 'clean_probs'.
        needs_clean_logits: Whether the loss reads the clean logits (PGD-AT does not).
        hyper_params: The keyword hyper-parameters ``loss`` accepts.
    """

    name: str
    loss: Callable[..., Tensor]
    attack_loss: Optional[Callable[[Tensor, Tensor], Tensor]]
    attack_target: str
    needs_clean_logits: bool
    hyper_params: Tuple[str, ...]

    @property
    def adversarial(self) -> bool:
        return self.attack_loss is not None


OBJECTIVES: Dict[str, Objective] = {
    'clean': Objective('clean', clean_loss, None, 'labels', True, ('label_smoothing',)),
    'pgd_at': Objective('pgd_at', pgd_at_loss, pgd_at_attack_loss, 'labels', False, ('label_smoothing',)),
    'trades': Objective('trades', trades_loss, trades_attack_loss, 'clean_probs', True,
                        ('beta', 'label_smoothing')),
    'mart': Objective('mart', mart_loss, mart_attack_loss, 'labels', True, ('beta',)),
    'score': Objective('score', score_loss, score_attack_loss, 'clean_probs', True,
                       ('beta', 'label_smoothing', 'clip_value')),
}
_ALIASES = {'sat': 'pgd_at', 'madry': 'pgd_at', 'pgd': 'pgd_at', 'standard': 'clean', 'lse': 'score'}


def get_objective(name: str) -> Objective:
    """Returns the objective called ``name`` ('clean', 'pgd_at' (alias 'sat'), 'trades', 'mart', 'score')."""
    key = _ALIASES.get(name.lower(), name.lower())
    if key not in OBJECTIVES:
        raise ValueError(f"Unknown training objective '{name}'. Use one of {sorted(OBJECTIVES)} "
                         f"(aliases: {sorted(_ALIASES)}).")
    return OBJECTIVES[key]
