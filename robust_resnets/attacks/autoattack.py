"""AutoAttack (Croce and Hein 2020) through the ``pyautoattack`` package.

AutoAttack runs its attacks one after another, each on the examples that are still classified
correctly. :func:`iter_autoattack` does the same, one attack and one batch at a time, so that a
caller can show progress and save a resumable state between batches; :func:`autoattack_attack`
is the one-call form. With the same seed and batch size the adversarial examples equal those of
``AutoAttack.run_standard_evaluation``. :func:`autoattack_settings` reads back the settings each
attack of a configured adversary runs with, for results files.
"""
from __future__ import annotations

import logging
import re
import warnings
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Set, Tuple, Union

import torch
import torch.nn as nn
from torch import Tensor

__all__ = [
    'AUTOATTACK_VERSIONS', 'AUTOATTACK_ATTACKS', 'AUTOATTACK_NORMS',
    'build_autoattack', 'autoattack_settings', 'iter_autoattack', 'autoattack_attack',
]

AUTOATTACK_VERSIONS = ('standard', 'plus', 'rand', 'custom')
AUTOATTACK_ATTACKS = ('apgd-ce', 'apgd-dlr', 'fab', 'square', 'apgd-t', 'fab-t')
AUTOATTACK_NORMS = ('Linf', 'L2', 'L1')


def build_autoattack(model: nn.Module, *, eps: float, norm: str = 'Linf', version: str = 'standard',
                     attacks: Optional[Sequence[str]] = None, seed: Optional[int] = 0,
                     device: Union[str, torch.device, None] = None):
    """Returns a configured ``pyautoattack.AutoAttack``; its ``attacks_to_run`` lists the attacks in order.

    A 'custom' version runs the attacks it names with the settings AutoAttack standard gives them for
    the norm (iterations, restarts, target classes, queries), so that e.g. ``['apgd-ce', 'apgd-t']``
    runs standard's first two attacks; APGD-DLR and FAB, which standard does not run, share the
    settings of APGD-CE and FAB-T (for Linf and L2 one restart, where 'plus' gives them five).

    Args:
        model: Classifier taking [0, 1] images, returning logits.
        eps: Radius of the threat model ball.
        norm: 'Linf', 'L2' or 'L1'.
        version: 'standard', 'plus', 'rand' (for randomised defences, EOT), or 'custom' with ``attacks``.
        attacks: The attacks of a 'custom' version, from :data:`AUTOATTACK_ATTACKS`, in the order to run.
        seed: Seed of every attack's random draws; None draws from the clock (not repeatable).
        device: Where the attacks run (default: the device of the model's parameters).
    """
    from pyautoattack import AutoAttack

    if version not in AUTOATTACK_VERSIONS:
        raise ValueError(f"Unknown AutoAttack version '{version}'; use one of {AUTOATTACK_VERSIONS}.")
    if norm not in AUTOATTACK_NORMS:
        raise ValueError(f"Unknown AutoAttack norm '{norm}'; use one of {AUTOATTACK_NORMS}.")
    if version == 'custom':
        unknown = [a for a in (attacks or ()) if a not in AUTOATTACK_ATTACKS]
        if not attacks or unknown:
            raise ValueError(f'A custom AutoAttack needs a non-empty list of attacks from {AUTOATTACK_ATTACKS}; '
                             f'got {list(attacks or ())}.')
    elif attacks:
        raise ValueError(f"AutoAttack version '{version}' fixes its attacks; pass version='custom' to choose them.")
    if device is None:
        param = next(model.parameters(), None)
        device = param.device if param is not None else torch.device('cpu')
    # pyautoattack's own 'custom' keeps its constructor defaults (5 restarts for APGD and FAB), not
    # standard's; so a custom list starts from the standard version and then runs only the named attacks
    adversary = AutoAttack(model, device=device, eps=eps, norm=norm, seed=seed,
                           version='standard' if version == 'custom' else version)
    if version == 'custom':
        adversary.attacks_to_run = list(attacks)
        adversary.version = 'custom'
    adversary.verbose = False
    return adversary


def autoattack_settings(adversary) -> Dict[str, Any]:
    """The settings a configured adversary runs with, read from it, as a JSON-ready dict.

    Args:
        adversary: From :func:`build_autoattack`, before it has run.

    Returns:
        ``version``, ``attacks`` (in order) and ``per_attack``: for each attack its ``n_iter`` and
        ``n_restarts``, plus ``eot_iter`` and ``use_largereps`` (APGD), ``n_target_classes``
        (targeted attacks) or ``n_queries`` (Square).
    """
    per_attack: Dict[str, Dict[str, Any]] = {}
    for attack in adversary.attacks_to_run:
        if attack in ('apgd-ce', 'apgd-dlr', 'apgd-t'):
            apgd = adversary.apgd_targeted if attack == 'apgd-t' else adversary.apgd
            out = {'n_iter': apgd.n_iter, 'n_restarts': apgd.n_restarts, 'eot_iter': apgd.eot_iter,
                   'use_largereps': apgd.use_largereps}
            if attack == 'apgd-t':
                out['n_target_classes'] = apgd.n_target_classes
        elif attack in ('fab', 'fab-t'):
            fab = adversary.fab
            out = {'n_iter': fab.n_iter, 'n_restarts': fab.n_restarts}
            if attack == 'fab-t':
                out['n_restarts'] = 1  # run_standard_evaluation sets fab.n_restarts = 1 before FAB-T, whatever it was
                out['n_target_classes'] = fab.n_target_classes
        elif attack == 'square':
            out = {'n_queries': adversary.square.n_queries, 'n_restarts': adversary.square.n_restarts}
        else:
            raise ValueError(f"Unknown AutoAttack attack '{attack}'; expected one of {AUTOATTACK_ATTACKS}.")
        per_attack[attack] = {k: (v if isinstance(v, bool) else int(v)) for k, v in out.items()}
    return {'version': adversary.version, 'attacks': list(adversary.attacks_to_run), 'per_attack': per_attack}


def warning_kind(message: str) -> str:
    """A warning with its numbers masked: pyautoattack's zero-gradient check prints a count that changes from
    batch to batch (and between an interrupted run and its resumption), one kind of warning all the same."""
    return re.sub(r'\d+', '#', message)


class _Collect(logging.Handler):
    """Keeps the WARNING records of pyautoattack's logger, once per message (numbers masked: the zero-gradient
    check prints a count that changes from batch to batch)."""

    def __init__(self) -> None:
        super().__init__(level=logging.WARNING)
        self.seen: Set[str] = set()
        self.new: List[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        msg = record.getMessage()
        key = warning_kind(msg)
        if key not in self.seen:
            self.seen.add(key)
            self.new.append(msg)


def iter_autoattack(
        adversary,
        images: Tensor,
        labels: Tensor,
        robust: Tensor,
        *,
        batch_size: int,
        skip: Sequence[str] = (),
        resume: Optional[Tuple[Tensor, int]] = None,
        on_start: Optional[Callable[[str, Tensor], None]] = None,
        on_warning: Optional[Callable[[str], None]] = None,
) -> Iterator[Tuple[str, Tensor, Tensor]]:
    """Runs the adversary's attacks in order on the examples flagged ``robust``, one batch at a time.

    After each batch it yields ``(attack, indices, adversarial images of those indices)``; the caller
    updates ``robust`` in place (False where the adversarial image is misclassified) before the next
    batch, which is how later attacks see only the examples that are left.

    pyautoattack checks every call for signs of an unreliable evaluation (outputs that are probabilities
    rather than logits, zero gradients, a dynamic or randomised model, too few classes for the targeted
    attacks) and logs a warning to its ``auto-attack`` logger. Here those warnings are collected instead
    of printed once per batch, and each kind is passed on once, as ``'AutoAttack (<attack>): <message>'``.

    Args:
        adversary: From :func:`build_autoattack`.
        images: Clean images, float in [0, 1] or uint8 (any device; batches move to the adversary's device).
        labels: True labels.
        robust: Boolean flags, N, on the device of ``images``: the examples still to attack.
        batch_size: Examples per batch.
        skip: Attacks already completed (from a resumed state).
        resume: For the first attack not skipped, the examples it started on and how many of them its finished
            batches covered (from a resumed state): it goes on with the next batch, so that its batches, and
            with them its random draws, are those of an uninterrupted run.
        on_start: Called with ``(attack, indices)`` when an attack starts on those examples (not when resumed).
        on_warning: Called with each of pyautoattack's warnings, once per kind, before the batch that raised
            it is yielded (default: ``warnings.warn`` with a ``UserWarning``).
    """
    attacks: List[str] = list(adversary.attacks_to_run)
    logger = logging.getLogger('auto-attack')
    level, propagate = logger.level, logger.propagate
    collect = _Collect()
    # its per-call checks would print every batch: they are collected, and passed on once each
    logger.setLevel(logging.WARNING)
    logger.propagate = False
    logger.addHandler(collect)

    def pass_on(attack: str) -> None:
        for msg in collect.new:
            text = f'AutoAttack ({attack}): {msg}'
            if on_warning is None:
                warnings.warn(text, UserWarning, stacklevel=3)
            else:
                on_warning(text)
        collect.new.clear()

    try:
        for attack in attacks:
            if attack in skip:
                continue
            if resume is not None:
                (todo, first), resume = resume, None
            else:
                todo, first = robust.nonzero().squeeze(1), 0
                if on_start is not None:
                    on_start(attack, todo)
            adversary.attacks_to_run = [attack]
            for start in range(first, todo.numel(), batch_size):
                idx = todo[start:start + batch_size]
                x, y = images[idx].to(adversary.device), labels[idx].to(adversary.device)
                x = x if x.is_floating_point() else x.float() / 255
                adv, _ = adversary.run_standard_evaluation(x, y, batch_size=idx.numel())
                pass_on(attack)
                yield attack, idx, adv.detach()
            yield attack, todo[:0], images[:0]  # end of this attack: lets the caller save its state
    finally:
        adversary.attacks_to_run = attacks
        logger.removeHandler(collect)
        logger.setLevel(level)
        logger.propagate = propagate


def autoattack_attack(
        model: nn.Module,
        images: Tensor,
        labels: Tensor,
        *,
        eps: float,
        norm: str = 'Linf',
        version: str = 'standard',
        attacks: Optional[Sequence[str]] = None,
        seed: Optional[int] = 0,
        batch_size: int = 250,
        device: Union[str, torch.device, None] = None,
) -> Tensor:
    """Returns AutoAttack's adversarial images (the clean image where no attack succeeded).

    Arguments are those of :func:`build_autoattack`, plus the batch size. pyautoattack's checks (probability
    outputs, zero gradients, ...) come out as ``UserWarning``s, once each (see :func:`iter_autoattack`).
    """
    adversary = build_autoattack(model, eps=eps, norm=norm, version=version, attacks=attacks, seed=seed,
                                 device=device)
    adv_images = images.detach().clone()
    with torch.no_grad():
        robust = torch.cat([
            model(images[i:i + batch_size].to(adversary.device)).argmax(1).to(images.device)
            == labels[i:i + batch_size] for i in range(0, images.shape[0], batch_size)])
    for _, idx, adv in iter_autoattack(adversary, images, labels, robust, batch_size=batch_size):
        if idx.numel() == 0:
            continue
        with torch.no_grad():
            fooled = (model(adv).argmax(1) != labels[idx].to(adv.device)).to(images.device)
        adv_images[idx[fooled]] = adv[fooled].to(images.dtype).to(images.device)
        robust[idx[fooled]] = False
    return adv_images
