"""Adversarial training: PGD-AT, TRADES, MART and SCORE recipes on CIFAR, and Singh et al.'s APGD training
with heavy augmentations on ImageNet; single process or DDP under ``torchrun``.

The loss functions (:mod:`.losses`) and the config (:mod:`.config`) import light; the loop
(:func:`train`) loads timm and the data code when called.
"""
from .config import ConfigError, TrainConfig, list_builtin_configs, load_config
from .losses import (
    OBJECTIVES, Objective, clean_loss, get_objective, mart_attack_loss, mart_loss, pgd_at_attack_loss, pgd_at_loss,
    score_attack_loss, score_loss, trades_attack_loss, trades_loss,
)

__all__ = [
    'ConfigError', 'TrainConfig', 'load_config', 'list_builtin_configs', 'train',
    'OBJECTIVES', 'Objective', 'get_objective', 'clean_loss', 'pgd_at_loss', 'pgd_at_attack_loss', 'trades_loss',
    'trades_attack_loss', 'mart_loss', 'mart_attack_loss', 'score_loss', 'score_attack_loss',
    'TrainingDiverged', 'TrainingInterrupted',
]


def __getattr__(name: str):
    """The loop's exceptions, imported with the loop on first use."""
    if name in ('TrainingDiverged', 'TrainingInterrupted'):
        from . import trainer
        return getattr(trainer, name)
    raise AttributeError(f'module {__name__!r} has no attribute {name!r}')


def train(*args, **kwargs):
    """Runs a training recipe; see :func:`robust_resnets.training.trainer.train`."""
    from .trainer import train as _train
    return _train(*args, **kwargs)
