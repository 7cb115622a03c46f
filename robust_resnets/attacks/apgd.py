"""Auto-PGD (APGD), the step-size-free PGD of Croce & Hein, as used for adversarial training.

APGD (F. Croce and M. Hein, "Reliable evaluation of adversarial robustness with an ensemble of diverse
parameter-free attacks", ICML 2020) is PGD with momentum and a step size that starts at twice the radius
and is halved at checkpoints where the loss stopped increasing; each halving restarts from the best point.

Singh, Croce & Hein ("Revisiting Adversarial Training for ImageNet: Architectures, Training and
Generalization across Threat Models", NeurIPS 2023) train with APGD as the inner maximisation: Linf
eps=4/255, 2 iterations, cross-entropy on the (mixup/cutmix, label-smoothed) soft targets, no random start,
the model in eval mode, and the point of highest loss (the clean image included) as the training input.
``apgd_attack`` returns that point.
"""
from __future__ import annotations

from typing import Union

import torch
import torch.nn as nn
from torch import Tensor

from .pgd import NORMS, LossFn, _step, project, resolve_loss

__all__ = ['apgd_attack']


def _loss_and_grad(model: nn.Module, loss: LossFn, x: Tensor, labels: Tensor, *, with_grad: bool):
    """Per-example loss at ``x`` and, with ``with_grad``, its gradient with respect to ``x``."""
    if not with_grad:
        with torch.no_grad():
            return loss(model(x), labels), None
    x = x.detach().requires_grad_(True)
    with torch.enable_grad():
        per_example = loss(model(x), labels)
        grad, = torch.autograd.grad(per_example.sum(), x)
    return per_example.detach(), grad


def _check_args(images: Tensor, labels: Tensor, *, eps: float, steps: int, norm: str, loss_fn: Union[LossFn, str],
                rho: float, momentum: float, initial_step: float) -> None:
    if norm not in NORMS:
        raise ValueError(f"Unknown threat model norm '{norm}'. APGD supports {NORMS}; "
                         f"evaluate 'L1' robustness with AutoAttack (autoattack_attack(..., norm='L1')).")
    if eps < 0 or steps < 0 or not initial_step > 0:
        raise ValueError(f'APGD needs eps >= 0, steps >= 0 and initial_step > 0; got eps={eps}, steps={steps}, '
                         f'initial_step={initial_step}.')
    if not (0 <= rho <= 1 and 0 <= momentum <= 1):
        raise ValueError(f'APGD needs rho and momentum in [0, 1] (0.75 in the paper); got rho={rho}, '
                         f'momentum={momentum}.')
    if images.shape[0] != labels.shape[0]:
        raise ValueError(f'images has {images.shape[0]} examples but labels has {labels.shape[0]}.')
    soft = labels.is_floating_point()
    if labels.dim() != (2 if soft else 1):
        raise ValueError(f'labels must be class indices (N,) or soft targets (N x K float probabilities); '
                         f'got shape {tuple(labels.shape)} and dtype {labels.dtype}.')
    if soft and loss_fn == 'cw':
        raise ValueError("The 'cw' loss needs class-index labels (N,), got soft targets; use loss_fn='ce'.")


def apgd_attack(
        model: nn.Module,
        images: Tensor,
        labels: Tensor,
        *,
        eps: float,
        steps: int,
        norm: str = 'Linf',
        loss_fn: Union[LossFn, str] = 'ce',
        rho: float = 0.75,
        momentum: float = 0.75,
        initial_step: float = 2.0,
) -> Tensor:
    """Runs APGD from the clean images and returns, per example, the highest-loss point it visited.

    The clean images count as the first point, so the loss of the result is never below the clean loss.
    The schedule follows Croce & Hein's code (pyautoattack's ``APGDAttack`` started from ``x_init=images``,
    and the ``apgd_train`` of Singh et al.). The model's train/eval mode is left as it is (Singh et al. attack
    in eval mode), and parameter gradients are not touched.

    Args:
        model: Classifier taking [0, 1] images.
        images: Clean images, N x C x H x W in [0, 1]. Values outside the box (e.g. random erasing's noise)
            are clamped into it for the first point, as in the references; the ball stays centred on them.
        labels: Class indices (N,) or soft targets (N x K class probabilities, e.g. after mixup/cutmix).
        eps: Radius of the threat model ball.
        steps: Iterations (forward passes after the clean one; the last one needs no backward pass).
            0 returns the clean images (clamped to [0, 1]).
        norm: 'Linf' or 'L2'.
        loss_fn: Per-example loss to maximise, ``loss(logits, labels) -> (N,)``; 'ce' (index or soft
            labels) or 'cw' (index labels) built in.
        rho: A checkpoint halves the step size where the loss increased in at most this fraction of the
            steps since the last one.
        momentum: Weight of the new projected gradient step against the previous update (0.75 in the paper
            and hard-coded in the reference codes).
        initial_step: Initial step size as a multiple of ``eps``.

    Returns:
        Highest-loss images, same shape, dtype and device as ``images``, within eps of them and in [0, 1].
    """
    _check_args(images, labels, eps=eps, steps=steps, norm=norm, loss_fn=loss_fn, rho=rho, momentum=momentum,
                initial_step=initial_step)
    images = images.detach()
    # the first point is the clean image clamped to the box, as in the references: training images may hold
    # values outside [0, 1] (random erasing's noise), and every later iterate is clamped too
    start = images.clamp(0, 1)
    if steps == 0:
        return start
    loss = resolve_loss(loss_fn)
    per_example = (-1,) + (1,) * (images.dim() - 1)
    step_size = torch.full((images.shape[0],), initial_step * eps, dtype=images.dtype, device=images.device)

    x = start
    x_loss, grad = _loss_and_grad(model, loss, x, labels, with_grad=True)
    best, best_loss, best_grad = x.clone(), x_loss.clone(), grad.clone()
    x_prev = x

    interval = max(int(0.22 * steps), 1)
    interval_shrink = max(int(0.03 * steps), 1)
    interval_min = max(int(0.06 * steps), 1)
    since_check = 0
    # history[i + 1] is the loss of iterate i + 1. history[0] stands for the point before the first step and
    # stays 0, not the clean loss: the reference codes read their zero-initialised loss buffer at index -1
    # there, so the first checkpoint compares the first iterate's loss with 0. Reproduced on purpose.
    history = x_loss.new_zeros((steps + 1, images.shape[0]))
    best_at_last_check = best_loss.clone()
    halved_at_last_check = torch.ones_like(best_loss, dtype=torch.bool)  # no "stalled" halving at the first check

    for i in range(steps):
        z = project(x + _step(grad, step_size=step_size.view(per_example), norm=norm), images, eps=eps, norm=norm)
        a = 1.0 if i == 0 else momentum  # the first update has no previous update to carry on
        # projected again even when a = 1, as in the references: for L2 around images outside the box,
        # ball projection and box clamp do not commute, so the second projection moves the point
        x_next = project(x + a * (z - x) + (1 - a) * (x - x_prev), images, eps=eps, norm=norm)
        x_prev, x = x, x_next

        last = i == steps - 1  # its gradient would never be used: skip the backward pass, as the references do
        x_loss, x_grad = _loss_and_grad(model, loss, x, labels, with_grad=not last)
        history[i + 1] = x_loss
        improved = x_loss > best_loss
        best[improved] = x[improved]
        best_loss[improved] = x_loss[improved]
        if last:
            break  # a checkpoint here could not change ``best``
        best_grad[improved] = x_grad[improved]
        grad = x_grad

        since_check += 1
        if since_check == interval:
            increases = (history[i + 2 - interval:i + 2] > history[i + 1 - interval:i + 1]).sum(dim=0)
            oscillating = increases <= interval * rho
            stalled = ~halved_at_last_check & (best_at_last_check >= best_loss)
            halve = oscillating | stalled
            halved_at_last_check = halve
            best_at_last_check = best_loss.clone()
            step_size[halve] /= 2
            x[halve] = best[halve]
            grad[halve] = best_grad[halve]
            interval = max(interval - interval_shrink, interval_min)
            since_check = 0
    return best
