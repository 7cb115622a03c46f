"""Adversarial attacks on [0, 1] image classifiers: FGSM, PGD, APGD, CW-k and AutoAttack.

``pyautoattack`` is imported only when AutoAttack runs.
"""
from .apgd import apgd_attack
from .cw import cw_attack
from .fgsm import fgsm_attack
from .pgd import ce_loss, cw_loss, pgd_attack, project
from .autoattack import autoattack_attack, build_autoattack, iter_autoattack
from .spec import DEFAULT_ATTACKS, AttackSpec, default_eps, default_step_size, parse_attack, parse_attacks

__all__ = [
    'pgd_attack', 'apgd_attack', 'fgsm_attack', 'cw_attack', 'autoattack_attack', 'build_autoattack', 'iter_autoattack',
    'ce_loss', 'cw_loss', 'project', 'AttackSpec', 'parse_attack', 'parse_attacks', 'DEFAULT_ATTACKS',
    'default_eps', 'default_step_size',
]
