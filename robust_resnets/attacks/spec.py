"""Attack names as the command line and the results files spell them, and their settings.

Names (case-insensitive):

* ``clean``: no attack.
* ``fgsm``: one step of length eps.
* ``pgd<K>`` / ``cw<K>``: K steps of PGD on cross-entropy / on the CW margin loss, with a random
  start; ``pgd<K>r<R>`` adds R restarts (``pgd50r10``), ``pgd<K>n`` drops the random start.
* ``aa``: AutoAttack standard (APGD-CE, APGD-T, FAB-T, Square); ``aa-plus``; ``aa-rand`` (for
  randomised defences: APGD-CE and APGD-DLR with EOT).
* ``aa:<attack>+<attack>...``: the named AutoAttack attacks, in that order (``aa:apgd-ce+apgd-t``),
  each with the settings AutoAttack standard gives it for the norm: ``aa:apgd-ce`` is standard's
  first attack (for Linf and L2 one restart, not pyautoattack's custom default of five). APGD-DLR
  and FAB, which standard does not run, share APGD-CE's and FAB-T's settings. Attacks: apgd-ce,
  apgd-dlr, apgd-t, fab, fab-t, square.
"""
from __future__ import annotations

import dataclasses
import re
from typing import Any, Dict, Optional, Tuple

from .autoattack import AUTOATTACK_ATTACKS, AUTOATTACK_NORMS

__all__ = ['AttackSpec', 'parse_attack', 'parse_attacks', 'DEFAULT_ATTACKS', 'check_pixel_units', 'default_eps',
           'default_step_size']

#: Clean, PGD-20 and CW-40 as Huang et al. (2022) evaluate them, and AutoAttack standard (RobustBench's). Huang et
#: al.'s own eval_robustness.py (zhichao-lu/robust-residual-network at 8c6d2c2) runs only AutoAttack's APGD-CE and
#: APGD-T, with standard's settings (``attacks_to_run = ['apgd-ce', 'apgd-t']``): ``aa:apgd-ce+apgd-t`` here.
#: benchmarks/tables/huang2022.yaml says which of their tables' AA columns that is (``evaluation.aa_attack``).
DEFAULT_ATTACKS = ('clean', 'pgd20', 'cw40', 'aa')

_ITERATIVE = re.compile(r'^(pgd|cw)(\d+)(?:r(\d+))?(n?)$')
_AA_VERSIONS = {'aa': 'standard', 'aa-standard': 'standard', 'aa-plus': 'plus', 'aa+': 'plus', 'aa-rand': 'rand'}


@dataclasses.dataclass(frozen=True)
class AttackSpec:
    """One attack with every setting that changes its result.

    Attributes:
        name: The name as given (lower case), used as the key in results.
        kind: 'clean', 'fgsm', 'pgd', 'cw' or 'autoattack'.
        eps: Radius of the threat model ball.
        norm: 'Linf', 'L2' or 'L1'.
        steps: Gradient steps (pgd, cw, fgsm).
        step_size: Step length (pgd, cw, fgsm).
        restarts: Restarts (pgd, cw).
        random_start: Whether pgd/cw start from a random point of the ball.
        version: AutoAttack version.
        attacks: AutoAttack's attacks, in order (custom version; filled in for the others by the evaluation).
        per_attack: AutoAttack: each attack's settings as its configured adversary runs it (n_iter,
            n_restarts, ...; see :func:`~robust_resnets.attacks.autoattack.autoattack_settings`), filled
            in by the evaluation.
    """

    name: str
    kind: str
    eps: float = 0.0
    norm: str = 'Linf'
    steps: int = 0
    step_size: float = 0.0
    restarts: int = 1
    random_start: bool = False
    version: Optional[str] = None
    attacks: Tuple[str, ...] = ()
    per_attack: Dict[str, Dict[str, Any]] = dataclasses.field(default_factory=dict, hash=False)

    @property
    def needs_gradients(self) -> bool:
        return self.kind != 'clean'

    def settings(self) -> Dict[str, Any]:
        """The settings that apply to this kind of attack, as a JSON-ready dict."""
        if self.kind == 'clean':
            return {'kind': 'clean'}
        out: Dict[str, Any] = {'kind': self.kind, 'eps': self.eps, 'norm': self.norm}
        if self.kind == 'autoattack':
            out.update(version=self.version, attacks=list(self.attacks),
                       per_attack={a: dict(v) for a, v in self.per_attack.items()})
        else:
            out.update(steps=self.steps, step_size=self.step_size)
        if self.kind in ('pgd', 'cw'):
            out.update(restarts=self.restarts, random_start=self.random_start)
        return out


def default_step_size(eps: float, *, steps: int = 20) -> float:
    """The PGD/CW step for ``steps`` steps in a ball of radius ``eps``: eps/10 from 20 steps on (0.8/255 at
    8/255, the step of Huang et al.'s PGD-20 and CW-40), else 2 * eps / steps (at most eps), so that fewer
    steps still cross the ball (PGD-10: eps/5)."""
    return eps * max(0.1, min(1.0, 2.0 / steps))


def check_pixel_units(value: float, *, norm: str, name: str, text: Optional[str] = None) -> None:
    """Refuses a Linf radius or step above 1 (the whole [0, 1] pixel range): most likely one meant x/255.

    Args:
        value: The radius or step.
        norm: Its threat model; only Linf values are bounded.
        name: What the user set, as they spell it: a flag (``--eps``) or a key (``eps``, ``attack.eps``).
        text: The value as the user wrote it (default: ``value``).

    Raises:
        ValueError: A Linf value above 1, naming the likely fix.
    """
    if norm == 'Linf' and value > 1:
        shown = text if text is not None else f'{value:g}'
        written = f'{name} {shown}' if name.startswith('--') else f'{name}={shown}'
        raise ValueError(f'{written} is larger than the whole [0, 1] pixel range; Linf radii and steps are in pixel '
                         f'units: did you mean {written}/255?')


#: RobustBench's CIFAR radii per norm; ImageNet's Linf radius.
DEFAULT_EPS = {'Linf': 8 / 255, 'L2': 0.5, 'L1': 12.0}
IMAGENET_LINF_EPS = 4 / 255


def default_eps(*, norm: str, dataset: str) -> float:
    """The usual radius of a threat model: RobustBench's (CIFAR: Linf 8/255, L2 0.5, L1 12; ImageNet: Linf 4/255).

    Raises:
        ValueError: An unknown norm, or an ImageNet L2/L1 threat model (no common radius: give one).
    """
    if norm not in DEFAULT_EPS:
        raise ValueError(f"Unknown norm '{norm}'; use one of {tuple(DEFAULT_EPS)}.")
    if dataset == 'imagenet':
        if norm != 'Linf':
            raise ValueError(f'ImageNet has no usual {norm} radius (RobustBench ranks Linf 4/255 only); '
                             f'give one with --eps (eps=).')
        return IMAGENET_LINF_EPS
    return DEFAULT_EPS[norm]


def parse_attack(name: str, *, eps: float, norm: str = 'Linf', step_size: Optional[float] = None) -> AttackSpec:
    """Returns the :class:`AttackSpec` of an attack name (see the module docstring for the names)."""
    key = name.strip().lower()
    if norm not in AUTOATTACK_NORMS:
        raise ValueError(f"Unknown norm '{norm}'; use one of {AUTOATTACK_NORMS}.")
    if eps < 0:
        raise ValueError(f'eps must be non-negative, got {eps}.')
    check_pixel_units(eps, norm=norm, name='eps')
    if step_size is not None:
        check_pixel_units(step_size, norm=norm, name='step_size')
    if key == 'clean':
        return AttackSpec(name=key, kind='clean')
    if key in _AA_VERSIONS:
        return AttackSpec(name=key, kind='autoattack', eps=eps, norm=norm, version=_AA_VERSIONS[key])
    if key.startswith('aa:'):
        attacks = tuple(a for a in key[3:].split('+') if a)
        unknown = [a for a in attacks if a not in AUTOATTACK_ATTACKS]
        if not attacks or unknown:
            raise ValueError(f"Bad custom AutoAttack '{name}': give attacks from {AUTOATTACK_ATTACKS} joined "
                             f"by '+', e.g. 'aa:apgd-ce+square'.")
        return AttackSpec(name=key, kind='autoattack', eps=eps, norm=norm, version='custom', attacks=attacks)
    if norm == 'L1':
        raise ValueError(f"Attack '{name}' supports Linf and L2 only; for L1 use AutoAttack ('aa').")
    if key == 'fgsm':
        return AttackSpec(name=key, kind='fgsm', eps=eps, norm=norm, steps=1, step_size=eps)
    match = _ITERATIVE.match(key)
    if match:
        kind, steps, restarts, no_start = match.groups()
        if int(steps) < 1 or (restarts is not None and int(restarts) < 1):
            raise ValueError(f"Attack '{name}' needs at least one step and one restart.")
        return AttackSpec(name=key, kind=kind, eps=eps, norm=norm, steps=int(steps),
                          step_size=default_step_size(eps, steps=int(steps)) if step_size is None else float(step_size),
                          restarts=int(restarts or 1), random_start=not no_start)
    raise ValueError(f"Unknown attack '{name}'. Use clean, fgsm, pgd<K>[r<R>][n] (e.g. pgd20, pgd50r10), "
                     f"cw<K>[r<R>][n] (e.g. cw40), aa, aa-plus, aa-rand or aa:<attack>+<attack>.")


def parse_attacks(names, *, eps: float, norm: str = 'Linf', step_size: Optional[float] = None
                  ) -> Tuple[AttackSpec, ...]:
    """Parses a comma-separated string or a sequence of attack names; duplicates are an error."""
    if isinstance(names, str):
        names = [n for n in names.split(',') if n.strip()]
    specs = tuple(parse_attack(n, eps=eps, norm=norm, step_size=step_size) for n in names)
    seen = [s.name for s in specs]
    if not specs:
        raise ValueError('No attacks given; name at least one, e.g. clean,pgd20,cw40,aa.')
    if len(set(seen)) != len(seen):
        raise ValueError(f'Attack names repeat in {seen}; give each once.')
    return specs
