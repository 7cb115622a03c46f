"""The fast gradient sign method (Goodfellow et al. 2015): one full-size gradient step."""
from __future__ import annotations

from typing import Union

import torch.nn as nn
from torch import Tensor

from .pgd import LossFn, pgd_attack

__all__ = ['fgsm_attack']


def fgsm_attack(model: nn.Module, images: Tensor, labels: Tensor, *, eps: float, norm: str = 'Linf',
                loss_fn: Union[LossFn, str] = 'ce') -> Tensor:
    """Returns ``images`` moved by one step of length eps along the loss gradient's sign (Linf) or direction (L2).

    Args:
        model: Classifier taking [0, 1] images.
        images: Clean images, N x C x H x W in [0, 1].
        labels: True labels, N.
        eps: Radius of the threat model ball (and the step length).
        norm: 'Linf' or 'L2'.
        loss_fn: Per-example loss to maximise; 'ce' or 'cw' built in.
    """
    return pgd_attack(model, images, labels, eps=eps, steps=1, step_size=eps, norm=norm, loss_fn=loss_fn,
                      random_start=False)
