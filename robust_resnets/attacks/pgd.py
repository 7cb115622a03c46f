"""Projected gradient descent (Madry et al. 2018) in the Linf and L2 balls, with restarts.

The attack maximises a per-example loss of the logits inside the eps ball around each image and
inside the [0, 1] pixel box. ``loss_fn='ce'`` is cross-entropy (PGD); ``'cw'`` is the
Carlini-Wagner margin loss (the CW-k attack of Huang et al. is PGD on it).
"""
from __future__ import annotations

from typing import Callable, Optional, Union

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

__all__ = ['pgd_attack', 'ce_loss', 'cw_loss', 'resolve_loss', 'project', 'NORMS']

NORMS = ('Linf', 'L2')
LossFn = Callable[[Tensor, Tensor], Tensor]


def _loss_precision(logits: Tensor) -> Tensor:
    """Logits in float32 (float64 ones kept), so that losses are not computed in half precision."""
    return logits if logits.dtype == torch.float64 else logits.float()


def ce_loss(logits: Tensor, labels: Tensor) -> Tensor:
    """Per-example cross-entropy, the loss PGD maximises.

    ``labels`` are class indices (N,) or soft targets, class probabilities (N x K) such as mixup's.
    """
    logits = _loss_precision(logits)
    if labels.is_floating_point():
        labels = labels.to(logits.dtype)
    return F.cross_entropy(logits, labels, reduction='none')


def cw_loss(logits: Tensor, labels: Tensor, kappa: float = 0.0) -> Tensor:
    """Per-example Carlini-Wagner margin loss: -max(z_y - max_{j != y} z_j + kappa, 0).

    It is zero once an example is misclassified with margin ``kappa``, as in Huang et al.'s CW-k.
    """
    if labels.is_floating_point():
        raise ValueError("The CW loss needs class-index labels (N,), got soft targets; use loss_fn='ce' for those.")
    logits = _loss_precision(logits)
    true = logits.gather(1, labels[:, None]).squeeze(1)
    other = logits.scatter(1, labels[:, None], float('-inf')).amax(dim=1)
    return -(true - other + kappa).clamp(min=0)


_LOSSES = {'ce': ce_loss, 'cw': cw_loss}


def resolve_loss(loss_fn: Union[LossFn, str]) -> LossFn:
    """Returns the per-example loss for 'ce', 'cw' or a callable (returned unchanged)."""
    if callable(loss_fn):
        return loss_fn
    if loss_fn not in _LOSSES:
        raise ValueError(f"Unknown attack loss '{loss_fn}'. Use 'ce', 'cw' or a callable (logits, labels) -> (N,).")
    return _LOSSES[loss_fn]


def _check_norm(norm: str) -> None:
    if norm not in NORMS:
        raise ValueError(f"Unknown threat model norm '{norm}'. PGD supports {NORMS}; use AutoAttack for 'L1'.")


def _per_example_l2(x: Tensor) -> Tensor:
    return x.flatten(1).norm(p=2, dim=1).view(-1, *([1] * (x.dim() - 1)))


def project(adv: Tensor, images: Tensor, *, eps: float, norm: str) -> Tensor:
    """Projects ``adv`` onto the eps ball around ``images`` and then onto the [0, 1] box.

    The projection is computed in float32 (float64 kept). Half-precision images (bfloat16, float16) get the
    result rounded to their dtype towards the clean image, coordinate by coordinate: rounding to the nearest
    value could step outside the ball (8.47/255 at eps 8/255 in bfloat16), rounding towards ``images`` does not.

    Returns:
        Images of the dtype of ``images``, within eps of them and in [0, 1].
    """
    dtype = images.dtype
    x = images if dtype in (torch.float32, torch.float64) else images.float()
    delta = adv.to(x.dtype) - x
    if norm == 'Linf':
        delta = delta.clamp(-eps, eps)
    else:
        delta = delta * (eps / _per_example_l2(delta).clamp(min=1e-12)).clamp(max=1.0)
    # clipping to the box moves every coordinate towards images, so the ball constraint still holds
    out = (x + delta).clamp(0.0, 1.0)
    if out.dtype == dtype:
        return out
    rounded = out.to(dtype)
    # where rounding moved a coordinate away from the clean image, the neighbouring value towards it lies
    # between the exact result and the (representable) clean value: inside the ball and the box
    away = (rounded.to(x.dtype) - x).abs() > (out - x).abs()
    return torch.where(away, torch.nextafter(rounded, images), rounded)


def _random_delta(shape: torch.Size, *, eps: float, norm: str, generator: Optional[torch.Generator],
                  example_seeds: Optional[Tensor], restart: int, device: torch.device,
                  init_std: Optional[float] = None) -> Tensor:
    """Uniform noise in the Linf ball, or a uniformly random direction with a uniform radius in the L2 ball;
    with ``init_std``, Gaussian noise of that std (the start of the TRADES/MART/PGD-AT training codes)."""
    if example_seeds is not None:  # one generator per example: the draw does not depend on the batch
        parts = []
        for seed in example_seeds.tolist():
            g = torch.Generator().manual_seed((int(seed) * 1_000_003 + restart) % (2 ** 63))
            parts.append(_draw(shape[1:], 1, g, 'cpu')[0])
        raw = torch.stack(parts).to(device)
    else:
        g_device = generator.device if generator is not None else device
        raw = _draw(shape[1:], shape[0], generator, g_device).to(device)
    direction, radius = raw[:, :-1].view(shape), raw[:, -1]
    if init_std is not None:
        return torch.special.ndtri(direction.clamp(1e-7, 1 - 1e-7)) * init_std  # uniform -> normal
    if norm == 'Linf':
        return (direction * 2 - 1) * eps
    direction = torch.special.ndtri(direction.clamp(1e-7, 1 - 1e-7))  # uniform -> normal, same draw count
    direction = direction / _per_example_l2(direction).clamp(min=1e-12)
    return direction * (radius * eps).view(-1, *([1] * (len(shape) - 1)))


def _draw(shape: torch.Size, n: int, generator: Optional[torch.Generator], device) -> Tensor:
    """n rows of uniform draws: one per pixel of ``shape`` plus one for the L2 radius."""
    return torch.rand((n, int(torch.Size(shape).numel()) + 1), generator=generator, device=device)


def _step(grad: Tensor, *, step_size: float, norm: str) -> Tensor:
    if norm == 'Linf':
        return step_size * grad.sign()
    return step_size * grad / _per_example_l2(grad).clamp(min=1e-12)


def pgd_attack(
        model: nn.Module,
        images: Tensor,
        labels: Tensor,
        *,
        eps: float,
        steps: int,
        step_size: float,
        norm: str = 'Linf',
        loss_fn: Union[LossFn, str] = 'ce',
        random_start: bool = True,
        restarts: int = 1,
        generator: Optional[torch.Generator] = None,
        example_seeds: Optional[Tensor] = None,
        init_std: Optional[float] = None,
) -> Tensor:
    """Runs PGD and returns the adversarial images (detached, in [0, 1], within eps of ``images``).

    The model's train/eval mode is left as it is, and parameter gradients are not touched.

    Args:
        model: Classifier taking [0, 1] images.
        images: Clean images, N x C x H x W in [0, 1].
        labels: True labels, N.
        eps: Radius of the threat model ball.
        steps: Gradient steps per restart (0 returns the random start, or the images without one).
        step_size: Step length (of the sign step for Linf, of the normalised gradient for L2).
        norm: 'Linf' or 'L2'.
        loss_fn: Per-example loss to maximise, ``loss(logits, labels) -> (N,)``; 'ce' or 'cw' built in.
        random_start: Start from a uniformly random point of the ball.
        restarts: Independent runs; per example the first misclassified, else the highest-loss, run is kept.
        generator: Generator for the random starts (default: the global RNG on the images' device).
        example_seeds: One integer seed per example (N,); draws each example's random start from its own
            seed, so that results do not depend on how examples are batched. Overrides ``generator``.
        init_std: With ``random_start``, start from Gaussian noise of this std (projected into the ball and
            [0, 1]) instead of uniformly in the ball: 0.001 in TRADES' code, the step size in the PGD-AT/MART codes.

    Returns:
        Adversarial images, same shape, dtype and device as ``images``.
    """
    _check_norm(norm)
    if init_std is not None and not init_std > 0:
        raise ValueError(f'init_std must be a positive noise std such as 0.001, got {init_std!r}.')
    if eps < 0 or step_size < 0 or steps < 0 or restarts < 1:
        raise ValueError(f'PGD needs eps >= 0, step_size >= 0, steps >= 0 and restarts >= 1; got eps={eps}, '
                         f'step_size={step_size}, steps={steps}, restarts={restarts}.')
    if images.shape[0] != labels.shape[0]:
        raise ValueError(f'images has {images.shape[0]} examples but labels has {labels.shape[0]}.')
    if example_seeds is not None and example_seeds.shape[0] != images.shape[0]:
        raise ValueError(f'example_seeds needs one seed per example ({images.shape[0]}), got {example_seeds.shape[0]}.')
    loss = resolve_loss(loss_fn)
    images = images.detach()
    best = images.clone()
    best_loss = torch.full((images.shape[0],), float('-inf'), device=images.device)
    fooled = torch.zeros(images.shape[0], dtype=torch.bool, device=images.device)
    for restart in range(restarts):
        todo = (~fooled).nonzero().squeeze(1)
        if todo.numel() == 0:
            break
        x0, y = images[todo], labels[todo]
        if random_start and eps > 0:
            seeds = example_seeds[todo.cpu()] if example_seeds is not None else None
            delta = _random_delta(x0.shape, eps=eps, norm=norm, generator=generator, example_seeds=seeds,
                                  restart=restart, device=x0.device, init_std=init_std)
            adv = project(x0 + delta.to(x0.dtype), x0, eps=eps, norm=norm)
        else:
            adv = x0.clone()
        with torch.enable_grad():
            for _ in range(steps):
                adv.requires_grad_(True)
                grad, = torch.autograd.grad(loss(model(adv), y).sum(), adv)
                adv = project(adv.detach() + _step(grad, step_size=step_size, norm=norm), x0, eps=eps, norm=norm)
        adv = adv.detach()
        if restarts == 1:
            best[todo] = adv
            break
        with torch.no_grad():
            logits = model(adv)
            run_loss = loss(logits, y).float()
            run_fooled = logits.argmax(dim=1) != y
        better = run_fooled | (run_loss > best_loss[todo])
        idx = todo[better]
        best[idx] = adv[better]
        best_loss[idx] = run_loss[better]
        fooled[idx] = run_fooled[better]
    return best
