"""CW-k: PGD on the Carlini-Wagner margin loss, as Huang et al. (2022) report it (CW-40)."""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn
from torch import Tensor

from .pgd import pgd_attack

__all__ = ['cw_attack']


def cw_attack(
        model: nn.Module,
        images: Tensor,
        labels: Tensor,
        *,
        eps: float,
        steps: int = 40,
        step_size: float = 0.8 / 255,
        norm: str = 'Linf',
        random_start: bool = True,
        restarts: int = 1,
        generator: Optional[torch.Generator] = None,
        example_seeds: Optional[Tensor] = None,
) -> Tensor:
    """Returns adversarial images from PGD maximising the margin loss ``-max(z_y - max_{j != y} z_j, 0)``.

    Arguments are those of :func:`robust_resnets.attacks.pgd_attack`; the defaults are CW-40 with
    step 0.8/255 and a random start.
    """
    return pgd_attack(model, images, labels, eps=eps, steps=steps, step_size=step_size, norm=norm, loss_fn='cw',
                      random_start=random_start, restarts=restarts, generator=generator,
                      example_seeds=example_seeds)
