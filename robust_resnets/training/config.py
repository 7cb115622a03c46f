"""Training configuration: nested dataclasses, YAML files (with ``base:`` inheritance) and ``key=value`` overrides.

A config file mirrors :class:`TrainConfig`: one mapping per section (``model``, ``data``,
``objective``, ``attack``, ``optim``, ``schedule``, ``ema``, ``eval``, ``run``). A file may name a
``base:`` file (relative to itself) or shipped recipe (``base: rrn_a1_trades``) whose values it
overrides; without a ``description`` of its own, the base's is kept with the keys the file changes named.
Unknown keys, wrong types and out-of-range values raise :class:`ConfigError` naming the key and the fix.

Example::

    cfg = load_config('rrn_a1_trades.yaml', overrides=['optim.lr=0.05', 'run.epochs=10'])
"""
from __future__ import annotations

import dataclasses
import difflib
import importlib.resources
import re
import typing
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence, Union

import yaml

__all__ = [
    'ConfigError', 'ModelConfig', 'DataConfig', 'ObjectiveConfig', 'AttackConfig', 'OptimConfig',
    'ScheduleConfig', 'EmaConfig', 'EvalConfig', 'RunConfig', 'TrainConfig', 'load_config', 'config_from_dict',
    'config_to_dict', 'apply_overrides', 'list_builtin_configs', 'resolve_config_path', 'RUN_CONTROL_KEYS',
    'SOFT_TARGET_OBJECTIVES',
]


class ConfigError(ValueError):
    """A training config that cannot be used; the message names the key and how to fix it."""


@dataclasses.dataclass
class ModelConfig:
    """The network: any registered timm model name, its keyword arguments, optional pretrained weights.

    Attributes:
        name: Registered model name, e.g. 'robust_resnet_a1' or 'wrn_28_10_swish'.
        kwargs: Extra keyword arguments for ``timm.create_model`` (e.g. ``activations: SiLU``).
        num_classes: Classifier outputs; None takes the dataset's class count.
        pretrained: Start from the model's registered pretrained weights (fine-tuning).
        pretrained_file: Start from a local weights file instead (``.safetensors``/``.pth``).
    """

    name: str = 'preact_resnet'
    kwargs: Dict[str, Any] = dataclasses.field(default_factory=dict)
    num_classes: Optional[int] = None
    pretrained: bool = False
    pretrained_file: Optional[str] = None


@dataclasses.dataclass
class DataConfig:
    """Training data, held-out split, augmentation and generated-data mixing.

    CIFAR batches live in memory and are augmented on the device (``crop_padding``, ``flip``,
    ``rotation``). ImageNet batches are decoded by ``workers`` processes through timm's training
    transform (random-resized crop, flip, RandAugment, colour jitter, random erasing). Mixup/CutMix
    (timm's ``Mixup``, one mixing per batch) works for both and turns the labels into soft targets.

    Attributes:
        dataset: 'cifar10', 'cifar100' or 'imagenet'.
        root: CIFAR: where :func:`robust_resnets.data.cifar.load_cifar_tensors` finds the data (torchvision
            files, an ImageFolder tree, or the ``cifar10-jpeg.tar.gz`` archive). ImageNet: a folder with
            ``train/<wnid>/`` and ``val/<wnid>/`` image folders.
        holdout: Training images held out (a fixed random subset) for the per-epoch validation.
        train_subset: Use only this many of the remaining training images (None: all).
        generated: A ``.npz`` of extra images (``image``: N x 32 x 32 x 3 uint8, ``label``: N), e.g. the
            1M DDPM sets, or the 500K TI ``.pickle`` (``data``, ``extrapolated_targets``).
        generated_fraction: Fraction of every batch drawn (uniformly, with replacement) from ``generated``.
        crop_padding: Random crop after zero padding by this many pixels (0 disables).
        flip: Random horizontal flip.
        rotation: Random rotation by up to this many degrees (20 in Huang et al.'s CIFAR-100 recipe).
        image_size: ImageNet: side of the training crops and of the evaluation images.
        workers: ImageNet: data-loading processes per training process.
        scale: ImageNet: area range of the random-resized crop.
        ratio: ImageNet: aspect-ratio range of the random-resized crop.
        interpolation: ImageNet: resize interpolation ('bicubic', 'bilinear').
        randaugment: ImageNet: timm RandAugment spec, e.g. 'rand-m9-mstd0.5-inc1' (null: none).
        color_jitter: ImageNet: colour-jitter strength (timm applies it only without RandAugment).
        random_erasing: ImageNet: probability of erasing one random box with per-pixel noise.
        mixup_alpha: Mixup's Beta(alpha, alpha) (0 disables mixup).
        cutmix_alpha: CutMix's Beta(alpha, alpha) (0 disables CutMix).
        mixup_prob: Probability that a batch is mixed at all.
        mixup_switch_prob: With both enabled, probability of CutMix instead of mixup for a batch.
    """

    dataset: str = 'cifar10'
    root: Optional[str] = None
    holdout: int = 1024
    train_subset: Optional[int] = None
    generated: Optional[str] = None
    generated_fraction: float = 0.0
    crop_padding: int = 4
    flip: bool = True
    rotation: float = 0.0
    image_size: int = 224
    workers: int = 8
    scale: List[float] = dataclasses.field(default_factory=lambda: [0.08, 1.0])
    ratio: List[float] = dataclasses.field(default_factory=lambda: [3 / 4, 4 / 3])
    interpolation: str = 'bicubic'
    randaugment: Optional[str] = None
    color_jitter: float = 0.0
    random_erasing: float = 0.0
    mixup_alpha: float = 0.0
    cutmix_alpha: float = 0.0
    mixup_prob: float = 1.0
    mixup_switch_prob: float = 0.5

    @property
    def mixing(self) -> bool:
        """Whether batches are mixed (mixup or CutMix), i.e. the targets are soft."""
        return self.mixup_prob > 0 and (self.mixup_alpha > 0 or self.cutmix_alpha > 0)


@dataclasses.dataclass
class ObjectiveConfig:
    """The training objective and its hyper-parameters (see :mod:`robust_resnets.training.losses`).

    Attributes:
        name: 'clean', 'pgd_at' (alias 'sat'), 'trades', 'mart' or 'score'.
        beta: Weight of the robust term (TRADES, MART, SCORE).
        label_smoothing: Label smoothing of the (clean) cross-entropy / SCORE targets; with mixup/CutMix it
            is applied to the mixed targets instead (as timm's ``Mixup``).
        clip_value: SCORE's robust-term clip.
        attack_bn: Batch-norm mode while the attack runs: 'eval' (running statistics; Huang et al.'s
            100-epoch recipes, Madry/TRADES/MART code) or 'train' (batch statistics, running statistics
            left untouched; the Gowal/Rebuffi-style recipes: Huang et al. "advanced", SCORE).
        bn_update: Which forward passes of the outer loss update the running statistics: 'all' or
            'adversarial' (the clean pass does not; Huang et al.'s ``--advnorm``).
    """

    name: str = 'trades'
    beta: float = 6.0
    label_smoothing: float = 0.0
    clip_value: float = 0.0
    attack_bn: str = 'eval'
    bn_update: str = 'all'


@dataclasses.dataclass
class AttackConfig:
    """The inner maximisation used for training.

    Attributes:
        name: 'pgd' (fixed step size) or 'apgd' (Auto-PGD from the clean image, keeping the highest-loss
            point; Singh et al. 2023's ImageNet training with 2 steps). APGD sets its own step sizes and
            has no random start: it needs ``random_start: false`` and ignores ``step_size``/``init_std``.
        norm: 'Linf' or 'L2'.
        eps: Radius of the ball, in [0, 1] pixel units: a number or a fraction such as 8/255 (a Linf radius
            above 1 is refused).
        step_size: PGD step size, in the units of ``eps``.
        steps: Attack steps.
        random_start: Start PGD from a random point near the clean image.
        init_std: Std of a Gaussian random start (0.001 in TRADES' code, the step size in the authors'
            PGD-AT/MART codes); null starts uniformly in the eps ball.
    """

    name: str = 'pgd'
    norm: str = 'Linf'
    eps: float = 8 / 255
    step_size: float = 2 / 255
    steps: int = 10
    random_start: bool = True
    init_std: Optional[float] = None


@dataclasses.dataclass
class OptimConfig:
    """The optimiser: SGD or AdamW.

    Attributes:
        name: 'sgd' or 'adamw' (decoupled weight decay).
        lr: Peak learning rate.
        momentum: SGD momentum (the one-cycle schedule cycles it between 0.85 and 0.95, as torch's OneCycleLR).
        nesterov: SGD Nesterov momentum.
        betas: AdamW's betas ((0.9, 0.95) in Singh et al.'s ImageNet recipe).
        weight_decay: Weight decay (L2 for SGD, decoupled for AdamW).
        no_weight_decay: Parameters that skip weight decay: 'none'; 'norm' (normalisation layers, the
            Gowal/Rebuffi-style recipes); 'bias' (biases, Singh et al.'s ConvNeXt runs); '1d' (every
            parameter with at most one dimension: biases, norm weights, layer scales; timm's rule and
            Singh et al.'s ViT runs).
        grad_clip: Clip the global gradient norm to this value (None: no clipping).
    """

    name: str = 'sgd'
    lr: float = 0.1
    momentum: float = 0.9
    nesterov: bool = False
    betas: List[float] = dataclasses.field(default_factory=lambda: [0.9, 0.999])
    weight_decay: float = 5e-4
    no_weight_decay: str = 'none'
    grad_clip: Optional[float] = None


@dataclasses.dataclass
class ScheduleConfig:
    """Learning-rate schedule.

    Attributes:
        name: 'multistep', 'cosine', 'onecycle' or 'constant'.
        interval: 'epoch' (update once per epoch, as the papers' code) or 'step'.
        milestones: Epochs (may be fractional) at which 'multistep' multiplies the rate by ``gamma``.
        gamma: Multi-step factor.
        warmup_epochs: Linear warm-up for 'multistep', 'cosine' and 'constant'.
        warmup_start: Fraction of the peak rate the warm-up starts from (0; 1e-4 in Singh et al.).
        min_lr: Rate the 'cosine' schedule ends at (0; 5e-6 in Singh et al.).
        pct_start: Fraction of the run 'onecycle' spends rising (0.025 in the Gowal/Rebuffi recipes).
    """

    name: str = 'multistep'
    interval: str = 'epoch'
    milestones: List[float] = dataclasses.field(default_factory=lambda: [75, 90])
    gamma: float = 0.1
    warmup_epochs: float = 0.0
    warmup_start: float = 0.0
    min_lr: float = 0.0
    pct_start: float = 0.025


@dataclasses.dataclass
class EmaConfig:
    """Exponential moving average of the weights (Gowal et al.'s weight averaging).

    Before ``warmup_epochs`` the average is a copy of the model; afterwards its decay is
    ``min(decay, (1 + t) / (10 + t))`` with t the steps since the warm-up (``dynamic: false`` uses
    ``decay`` directly). Normalisation statistics are copied from the model.

    Attributes:
        enabled: Keep an EMA and evaluate/export it.
        decay: Decay (tau).
        warmup_epochs: Epochs during which the EMA tracks the model exactly.
        dynamic: Use the ``(1 + t) / (10 + t)`` ramp.
    """

    enabled: bool = False
    decay: float = 0.995
    warmup_epochs: float = 0.0
    dynamic: bool = True


@dataclasses.dataclass
class EvalConfig:
    """Per-epoch evaluation on the held-out split.

    Attributes:
        split: 'holdout' (the ``data.holdout`` images) or 'test'.
        max_examples: Evaluate at most this many examples (None: all).
        batch_size: Global evaluation batch size.
        pgd_steps: Steps of the PGD evaluation (0 skips it).
        pgd_step_size: Its step size, in the units of ``attack.eps`` (e.g. 2/255); eps and norm are the
            training attack's.
        every: Evaluate every this many epochs (and always after the last).
    """

    split: str = 'holdout'
    max_examples: Optional[int] = None
    batch_size: int = 256
    pgd_steps: int = 20
    pgd_step_size: float = 2 / 255
    every: int = 1


@dataclasses.dataclass
class RunConfig:
    """How the run executes.

    Attributes:
        epochs: Training epochs.
        batch_size: Global batch size of an optimizer step (split evenly over the DDP processes and then
            over ``grad_accum_steps``).
        grad_accum_steps: Forward/backward passes whose gradients add up to one optimizer step: each process
            trains ``batch_size / (processes * grad_accum_steps)`` images at a time. A run's result does
            not depend on it, except through batch-norm statistics and mixup/CutMix pairs (like the number
            of processes), so a resumed run may change it.
        seed: Seed of everything random (data order, augmentation, attack starts, initialisation).
        device: 'auto' (CUDA when available), 'cpu' or 'cuda'.
        amp: bf16 autocast: 'auto' (on when running on CUDA), true or false.
        channels_last: channels_last memory format: 'auto' (on CUDA), true or false.
        compile: Wrap the model in ``torch.compile``.
        bn_momentum: Batch-norm momentum after the first step (None: the model's). When set, the first
            step uses momentum 1 (running statistics start from the first batch, as Haiku).
        max_steps: Stop (with a checkpoint) after this many optimizer steps in all; resume later.
        checkpoint_every: Also checkpoint every this many steps (epochs always end with one).
        progress: Show a progress bar.
        log_every: Steps between progress-bar postfix updates.
    """

    epochs: int = 100
    batch_size: int = 128
    grad_accum_steps: int = 1
    seed: int = 0
    device: str = 'auto'
    amp: Union[bool, str] = 'auto'
    channels_last: Union[bool, str] = 'auto'
    compile: bool = False
    bn_momentum: Optional[float] = None
    max_steps: Optional[int] = None
    checkpoint_every: Optional[int] = None
    progress: bool = True
    log_every: int = 10


@dataclasses.dataclass
class TrainConfig:
    """A complete training recipe."""

    model: ModelConfig = dataclasses.field(default_factory=ModelConfig)
    data: DataConfig = dataclasses.field(default_factory=DataConfig)
    objective: ObjectiveConfig = dataclasses.field(default_factory=ObjectiveConfig)
    attack: AttackConfig = dataclasses.field(default_factory=AttackConfig)
    optim: OptimConfig = dataclasses.field(default_factory=OptimConfig)
    schedule: ScheduleConfig = dataclasses.field(default_factory=ScheduleConfig)
    ema: EmaConfig = dataclasses.field(default_factory=EmaConfig)
    eval: EvalConfig = dataclasses.field(default_factory=EvalConfig)
    run: RunConfig = dataclasses.field(default_factory=RunConfig)
    description: str = ''


#: Keys that steer the execution of a run but not its result (run.grad_accum_steps: up to batch-norm statistics
#: and mixup pairs, like the number of processes): a resumed run may change them.
RUN_CONTROL_KEYS = ('run.max_steps', 'run.checkpoint_every', 'run.progress', 'run.log_every', 'description',
                    'data.root', 'data.workers', 'run.grad_accum_steps')
#: Keys that were renamed: the old name, and what to write instead.
_RENAMED = {'optim.decay_norm_params': "optim.no_weight_decay ('norm' for decay_norm_params: false, 'none' for true)"}

_CHOICES = {
    'data.dataset': ('cifar10', 'cifar100', 'imagenet'),
    'data.interpolation': ('bicubic', 'bilinear'),
    'attack.name': ('pgd', 'apgd'),
    'optim.name': ('sgd', 'adamw'),
    'optim.no_weight_decay': ('none', 'norm', 'bias', '1d'),
    'objective.attack_bn': ('eval', 'train'),
    'objective.bn_update': ('all', 'adversarial'),
    'attack.norm': ('Linf', 'L2'),
    'schedule.name': ('multistep', 'cosine', 'onecycle', 'constant'),
    'schedule.interval': ('epoch', 'step'),
    'eval.split': ('holdout', 'test'),
    'run.device': ('auto', 'cpu', 'cuda'),
}
_NON_NEGATIVE = ('data.holdout', 'data.crop_padding', 'data.rotation', 'data.workers', 'data.color_jitter',
                 'data.mixup_alpha', 'data.cutmix_alpha', 'schedule.min_lr', 'objective.beta', 'objective.clip_value',
                 'attack.eps', 'attack.step_size', 'attack.steps', 'optim.weight_decay', 'optim.momentum',
                 'schedule.warmup_epochs', 'ema.warmup_epochs', 'eval.pgd_steps', 'eval.pgd_step_size')
_POSITIVE = ('optim.lr', 'run.epochs', 'run.batch_size', 'eval.batch_size', 'eval.every', 'run.log_every',
             'data.image_size', 'run.grad_accum_steps')
#: Radii and steps in pixel units: fractions such as 8/255 are read as numbers, and a Linf one above 1 is refused.
_RADII = ('attack.eps', 'attack.step_size', 'attack.init_std', 'eval.pgd_step_size')
_PROBABILITIES = ('data.random_erasing', 'data.mixup_prob', 'data.mixup_switch_prob', 'schedule.warmup_start',
                  'objective.label_smoothing')
#: Objectives whose losses accept the soft targets of mixup/CutMix (cross-entropy based).
SOFT_TARGET_OBJECTIVES = ('clean', 'pgd_at', 'trades')


def _type_hints(cls: type) -> Dict[str, Any]:
    return typing.get_type_hints(cls)


def _describe(tp: Any) -> str:
    """'a number or null', 'true or false or a string', ... for an annotation."""
    if typing.get_origin(tp) is Union:
        return ' or '.join('null' if a is type(None) else _describe(a) for a in typing.get_args(tp))
    names = {bool: 'true or false', int: 'an integer', float: 'a number', str: 'a string'}
    if tp in names:
        return names[tp]
    return {list: 'a list', dict: 'a mapping'}.get(typing.get_origin(tp), str(tp))


_YAML12_FLOAT = re.compile(r'[-+]?(\.[0-9]+|[0-9]+(\.[0-9]*)?)[eE][-+]?[0-9]+')


def _yaml12_numbers(value: Any) -> Any:
    """``value`` with the strings YAML 1.2 reads as numbers (1e-3) made numbers, in nested mappings and lists too
    (free-form values such as ``model.kwargs`` have no annotation to coerce them)."""
    if isinstance(value, str) and _YAML12_FLOAT.fullmatch(value.strip()):
        return float(value)
    if isinstance(value, Mapping):
        return {k: _yaml12_numbers(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_yaml12_numbers(v) for v in value]
    return value


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Checks ``value`` against the annotation ``tp`` (ints become floats where floats are expected)."""
    origin = typing.get_origin(tp)
    if origin is Union:
        for arg in typing.get_args(tp):
            if arg is type(None):
                if value is None:
                    return None
                continue
            try:
                return _coerce(value, arg, key)
            except ConfigError:
                pass
        if key in _RADII and isinstance(value, str):  # 'attack.init_std': say that fractions are taken
            _fraction(value, key)
        raise ConfigError(f"'{key}' must be {_describe(tp)}, got {value!r}.")
    if origin in (list, List):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"'{key}' must be a list, got {value!r}.")
        (item_tp,) = typing.get_args(tp) or (Any,)
        return [_coerce(v, item_tp, f'{key}[{i}]') for i, v in enumerate(value)]
    if origin in (dict, Dict):
        if not isinstance(value, Mapping):
            raise ConfigError(f"'{key}' must be a mapping, got {value!r}.")
        return _yaml12_numbers(dict(value))
    if tp is Any:
        return _yaml12_numbers(value)
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"'{key}' must be true or false, got {value!r}.")
    if tp in (int, float):
        value = _yaml12_numbers(value)  # YAML 1.1 (PyYAML) reads 1e-3 as a string; YAML 1.2 and Python a number
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise ConfigError(f"'{key}' must be an integer, got {value!r}.")
    if tp is float:
        if key in _RADII and isinstance(value, str):
            value = _fraction(value, key)
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        raise ConfigError(f"'{key}' must be a number, got {value!r}.")
    if tp is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"'{key}' must be a string, got {value!r}.")
    raise ConfigError(f"'{key}' has an unsupported type {tp}.")


def _fraction(text: str, key: str) -> float:
    """A radius written as a fraction ('8/255') or a number, as ``robust-resnets eval --eps`` takes it."""
    from robust_resnets.evaluation.results import parse_eps  # here: the evaluation package loads torch

    try:
        return parse_eps(text)
    except ValueError:
        raise ConfigError(f"'{key}' must be a number or a fraction such as 8/255, got {text!r}.") from None


def _unknown_key(key: str, valid: Sequence[str]) -> ConfigError:
    if key in _RENAMED:
        return ConfigError(f"Config key '{key}' was replaced by {_RENAMED[key]}.")
    leaf = key.rsplit('.', 1)[-1]
    close = difflib.get_close_matches(leaf, valid, n=1)
    hint = f" Did you mean '{key.rsplit('.', 1)[0] + '.' if '.' in key else ''}{close[0]}'?" if close else ''
    return ConfigError(f"Unknown config key '{key}'.{hint} Valid keys here: {', '.join(sorted(valid))}.")


def _build(cls: type, values: Mapping[str, Any], prefix: str) -> Any:
    hints = _type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kwargs = {}
    for name, value in values.items():
        key = f'{prefix}{name}'
        if name not in fields:
            raise _unknown_key(key, list(fields))
        tp = hints[name]
        if dataclasses.is_dataclass(tp):
            if not isinstance(value, Mapping):
                raise ConfigError(f"'{key}' must be a mapping of {', '.join(f.name for f in dataclasses.fields(tp))}"
                                  f", got {value!r}.")
            kwargs[name] = _build(tp, value, f'{key}.')
        else:
            kwargs[name] = _coerce(value, tp, key)
    return cls(**kwargs)


def _validate(cfg: TrainConfig) -> None:
    flat = _flatten(config_to_dict(cfg))
    for key, choices in _CHOICES.items():
        if flat[key] not in choices:
            raise ConfigError(f"'{key}' is {flat[key]!r}; use one of {', '.join(map(repr, choices))}.")
    for key in _NON_NEGATIVE:
        if flat[key] < 0:
            raise ConfigError(f"'{key}' must be >= 0, got {flat[key]}.")
    for key in _POSITIVE:
        if flat[key] <= 0:
            raise ConfigError(f"'{key}' must be > 0, got {flat[key]}.")
    from robust_resnets.attacks.spec import check_pixel_units
    for key in _RADII:
        if flat[key] is None:  # attack.init_std: the attack's default
            continue
        try:
            check_pixel_units(flat[key], norm=cfg.attack.norm, name=key)
        except ValueError as e:
            raise ConfigError(str(e)) from None
    for key in ('run.amp', 'run.channels_last'):
        if flat[key] not in (True, False, 'auto'):
            raise ConfigError(f"'{key}' must be true, false or 'auto', got {flat[key]!r}.")
    for key in _PROBABILITIES:
        if not 0.0 <= flat[key] <= 1.0:
            raise ConfigError(f"'{key}' must be in [0, 1], got {flat[key]}.")
    if cfg.attack.name == 'apgd' and cfg.attack.random_start:
        raise ConfigError("attack.name 'apgd' starts from the clean image and has no random start; set "
                          "attack.random_start=false.")
    if cfg.schedule.min_lr >= cfg.optim.lr:
        raise ConfigError(f"'schedule.min_lr' ({cfg.schedule.min_lr}) must be below 'optim.lr' ({cfg.optim.lr}).")
    if len(cfg.optim.betas) != 2 or not all(0.0 <= b < 1.0 for b in cfg.optim.betas):
        raise ConfigError(f"'optim.betas' must be two numbers in [0, 1), got {cfg.optim.betas}.")
    for key, value in cfg.model.kwargs.items():
        if value is None:  # timm.create_model drops None arguments: the default would be built unsaid
            name, sep, rest = str(key).partition(':')
            hint = f" Did you mean '{name}: {rest}'? (YAML needs a space after the colon.)" if sep else ''
            raise ConfigError(f"'model.kwargs.{key}' is null, which timm ignores (the model's default is built); give "
                              f"it a value or remove it.{hint}")
    if not 0.0 <= cfg.data.generated_fraction < 1.0:
        raise ConfigError(f"'data.generated_fraction' must be in [0, 1), got {cfg.data.generated_fraction}.")
    if cfg.data.generated_fraction > 0 and not cfg.data.generated:
        raise ConfigError("'data.generated_fraction' > 0 needs 'data.generated' (path of the .npz of extra images).")
    if cfg.data.generated and cfg.data.generated_fraction == 0:
        raise ConfigError(f"'data.generated' ({cfg.data.generated}) is set but 'data.generated_fraction' is 0, so no "
                          f"batch would draw from it: set data.generated_fraction (the SCORE recipes: 0.7) or "
                          f"leave data.generated out.")
    if not 0.0 <= cfg.ema.decay < 1.0:
        raise ConfigError(f"'ema.decay' must be in [0, 1), got {cfg.ema.decay}.")
    if not 0.0 < cfg.schedule.pct_start < 1.0:
        raise ConfigError(f"'schedule.pct_start' must be in (0, 1), got {cfg.schedule.pct_start}.")
    if cfg.run.bn_momentum is not None and not 0.0 < cfg.run.bn_momentum <= 1.0:
        raise ConfigError(f"'run.bn_momentum' must be in (0, 1], got {cfg.run.bn_momentum}.")
    for key in ('run.max_steps', 'run.checkpoint_every', 'data.train_subset', 'eval.max_examples'):
        if flat[key] is not None and flat[key] <= 0:
            raise ConfigError(f"'{key}' must be a positive integer or null, got {flat[key]}.")
    from .losses import get_objective
    try:
        objective = get_objective(cfg.objective.name)
    except ValueError as e:
        raise ConfigError(f"'objective.name': {e}") from None
    if objective.adversarial and cfg.attack.steps == 0 and not cfg.attack.random_start:
        raise ConfigError(f"objective '{objective.name}' needs an attack: set 'attack.steps' > 0.")
    if objective.adversarial and cfg.attack.eps == 0:
        raise ConfigError(f"objective '{objective.name}' with 'attack.eps' 0 attacks nothing: set attack.eps (e.g. "
                          f"8/255) or train without an attack (objective.name: clean).")
    defaults = ObjectiveConfig()
    unused = [f'objective.{k}' for k in ('beta', 'label_smoothing', 'clip_value')
              if k not in objective.hyper_params and getattr(cfg.objective, k) != getattr(defaults, k)]
    if unused:
        takes = ', '.join(f'objective.{k}' for k in objective.hyper_params) or 'no hyper-parameters'
        raise ConfigError(f"objective '{objective.name}' does not use {', '.join(unused)} (it takes {takes}); "
                          f"remove {'them' if len(unused) > 1 else 'it'} or choose the objective that uses "
                          f"{'them' if len(unused) > 1 else 'it'}.")
    _validate_data(cfg)


def _validate_data(cfg: TrainConfig) -> None:
    """Checks the augmentation options against the dataset and the objective."""
    data = cfg.data
    if cfg.eval.split == 'test' and data.holdout:
        raise ConfigError(f"eval.split is 'test', so the data.holdout={data.holdout} held-out images would be "
                          f"neither trained on nor evaluated; set data.holdout=0 (train on all images, as the "
                          f"authors do), or keep eval.split=holdout.")
    if data.dataset == 'imagenet':
        if data.generated:
            raise ConfigError("'data.generated' (extra generated images) is for CIFAR; ImageNet runs take none.")
        if data.rotation or data.crop_padding:
            raise ConfigError("ImageNet runs crop with data.scale/data.ratio; set data.crop_padding=0 and "
                              "data.rotation=0.")
        if cfg.eval.max_examples is None:
            raise ConfigError("ImageNet runs decode their evaluation images into memory; set eval.max_examples "
                              "(e.g. --set eval.max_examples=1000).")
        for key, value in (('data.scale', data.scale), ('data.ratio', data.ratio)):
            if len(value) != 2 or not 0 < value[0] <= value[1]:
                raise ConfigError(f"'{key}' must be [low, high] with 0 < low <= high, got {value}.")
    else:
        heavy = {'data.randaugment': data.randaugment, 'data.color_jitter': data.color_jitter,
                 'data.random_erasing': data.random_erasing}
        used = [k for k, v in heavy.items() if v]
        if used:
            raise ConfigError(f"{', '.join(used)} need data.dataset 'imagenet' (timm's PIL training transform); "
                              f"CIFAR batches are augmented on the device with data.crop_padding, data.flip and "
                              f"data.rotation.")
    if data.mixing:
        from .losses import get_objective
        name = get_objective(cfg.objective.name).name
        if name not in SOFT_TARGET_OBJECTIVES:
            raise ConfigError(f"Mixup/CutMix produce soft targets, which objective '{name}' cannot take; use one of "
                              f"{', '.join(SOFT_TARGET_OBJECTIVES)} or set data.mixup_alpha=0 and data.cutmix_alpha=0.")


def _flatten(d: Mapping[str, Any], prefix: str = '') -> Dict[str, Any]:
    out = {}
    for k, v in d.items():
        if isinstance(v, Mapping) and f'{prefix}{k}' not in ('model.kwargs',):
            out.update(_flatten(v, f'{prefix}{k}.'))
        else:
            out[f'{prefix}{k}'] = v
    return out


def _merge(base: Dict[str, Any], override: Mapping[str, Any]) -> Dict[str, Any]:
    out = dict(base)
    for k, v in override.items():
        if isinstance(v, Mapping) and isinstance(out.get(k), Mapping) and k != 'kwargs':
            out[k] = _merge(out[k], v)
        else:
            out[k] = v
    return out


def config_from_dict(values: Mapping[str, Any]) -> TrainConfig:
    """Builds and validates a :class:`TrainConfig` from nested mappings (missing keys take defaults)."""
    if not isinstance(values, Mapping):
        raise ConfigError(f'A training config must be a mapping of sections, got {type(values).__name__}.')
    cfg = _build(TrainConfig, values, '')
    _validate(cfg)
    return cfg


def config_to_dict(cfg: TrainConfig) -> Dict[str, Any]:
    """The config as plain nested dicts (YAML/JSON serialisable)."""
    return dataclasses.asdict(cfg)


def _parse_override(item: str) -> tuple:
    if '=' not in item:
        raise ConfigError(f"Override '{item}' is not key=value; write e.g. --set optim.lr=0.05.")
    key, raw = item.split('=', 1)
    key = key.strip()
    if not key:
        raise ConfigError(f"Override '{item}' has an empty key; write e.g. --set optim.lr=0.05.")
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError as e:
        raise ConfigError(f"Override '{item}': the value is not valid YAML ({e}).") from None
    return key, value


def apply_overrides(values: Dict[str, Any], overrides: Sequence[str]) -> Dict[str, Any]:
    """Applies ``section.key=value`` overrides (values parsed as YAML) to nested config mappings.

    Keys are checked against :class:`TrainConfig`; ``model.kwargs.<name>=value`` sets a model argument.
    """
    before, values = values, _merge({}, values)
    keys = []
    for item in overrides:
        key, value = _parse_override(item)
        keys.append(key)
        parts = key.split('.')
        cls: Any = TrainConfig
        node = values
        for i, part in enumerate(parts):
            path = '.'.join(parts[:i + 1])
            if cls is None:  # inside model.kwargs: free-form
                pass
            else:
                names = [f.name for f in dataclasses.fields(cls)]
                if part not in names:
                    raise _unknown_key(path, names)
            last = i == len(parts) - 1
            if last:
                node[part] = value
                break
            if cls is not None:
                tp = _type_hints(cls)[part]
                cls = tp if dataclasses.is_dataclass(tp) else None
                if cls is None and path != 'model.kwargs':
                    raise ConfigError(f"'{path}' is a value, not a section; write --set {path}=VALUE.")
            child = node.get(part)
            if not isinstance(child, dict):
                child = {} if child is None else child
                if not isinstance(child, dict):
                    raise ConfigError(f"'{path}' is not a mapping; cannot set '{key}'.")
            node[part] = dict(child)
            node = node[part]
    _refuse_kept_model_kwargs(before, values, keys)
    return values


def _refuse_kept_model_kwargs(before: Dict[str, Any], after: Dict[str, Any], keys: Sequence[str], *,
                              file: Optional[Path] = None) -> None:
    """Another ``model.name`` with the recipe's ``model.kwargs`` left in place would build the new architecture
    with arguments written for the old one: the overrides (or the ``file`` that names a ``base:``) must say
    which arguments to use."""
    old, new = (before.get('model') or {}), (after.get('model') or {})
    kwargs_set = any(k == 'model.kwargs' or k.startswith('model.kwargs.') for k in keys)
    if new.get('name') == old.get('name') or not old.get('kwargs') or kwargs_set:
        return
    if file is not None:
        raise ConfigError(f"'{file}' sets model.name: {new.get('name')} but keeps its base's model.kwargs "
                          f"{old['kwargs']}, written for {old.get('name')}. Give its model: a 'kwargs: {{}}' to build "
                          f"{new.get('name')} as registered, or the arguments you want.")
    raise ConfigError(f"--set model.name={new.get('name')} keeps the recipe's model.kwargs {old['kwargs']}, "
                      f"written for {old.get('name')}. Add --set 'model.kwargs={{}}' to build "
                      f"{new.get('name')} as registered, or set the arguments you want "
                      f"(--set model.kwargs.NAME=VALUE).")


def list_builtin_configs() -> List[str]:
    """Names of the recipes shipped in ``robust_resnets/training/configs`` (without '.yaml')."""
    root = importlib.resources.files('robust_resnets.training') / 'configs'
    return sorted(p.name[:-5] for p in root.iterdir() if p.name.endswith('.yaml') and not p.name.startswith('_'))


def _shipped_recipe(name: str) -> Optional[Path]:
    """The shipped recipe file a bare name ('rrn_a1_trades' or 'rrn_a1_trades.yaml') names, else None."""
    path = Path(name)
    if len(path.parts) != 1:
        return None
    file = path.name if path.suffix in ('.yaml', '.yml') else f'{path.name}.yaml'
    builtin = Path(str(importlib.resources.files('robust_resnets.training') / 'configs' / file))
    return builtin if builtin.is_file() else None


def _validated_flat(values: Dict[str, Any]) -> Dict[str, Any]:
    """The flattened values of a complete config, validated (defaults filled in); a partial one's values as they
    are written."""
    try:
        return _flatten(config_to_dict(config_from_dict(values)))
    except ConfigError:
        return _flatten(values)


def resolve_config_path(name_or_path: Union[str, Path]) -> Path:
    """A config file path, or the name of a shipped recipe ('rrn_a1_trades' or 'rrn_a1_trades.yaml')."""
    path = Path(name_or_path)
    if path.is_file():
        return path
    builtin = _shipped_recipe(str(name_or_path))
    if builtin is not None:
        return builtin
    raise FileNotFoundError(f"Config '{name_or_path}' is neither a file nor a shipped recipe. Shipped recipes: "
                            f"{', '.join(list_builtin_configs())}.")


def _load_yaml_tree(path: Path, seen: tuple = ()) -> Dict[str, Any]:
    path = path.resolve()
    if path in seen:
        raise ConfigError(f"Config '{path}' inherits from itself through 'base:'.")
    try:
        values = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"Config '{path}' is not valid YAML: {e}") from None
    if not isinstance(values, dict):
        raise ConfigError(f"Config '{path}' must be a mapping of sections (model, data, objective, ...).")
    sections = [f.name for f in dataclasses.fields(TrainConfig)]
    for key in values:
        if key not in sections and key != 'base':
            raise _unknown_key(str(key), sections + ['base'])
    if 'base' not in values:
        return values
    base = values.pop('base')
    if not isinstance(base, str) or not base.strip():
        raise ConfigError(f"Config '{path}' has 'base: {'' if base is None else base}'; give one file (relative to it) "
                          f"or shipped recipe name, e.g. 'base: quick_cifar10', or remove the line.")
    base_path = path.parent / base
    if not base_path.is_file():
        shipped = _shipped_recipe(base)
        if shipped is None:
            close = difflib.get_close_matches(Path(base).stem, list_builtin_configs(), n=1)
            hint = f" Did you mean '{close[0]}'?" if close else ''
            raise FileNotFoundError(f"Config '{path}' names base '{base}', but '{base_path}' does not exist and no "
                                    f"shipped recipe has that name.{hint} Shipped recipes: "
                                    f"{', '.join(list_builtin_configs())}.")
        base_path = shipped
    base_values = _load_yaml_tree(base_path, seen + (path,))
    merged = _merge(base_values, values)
    own = list(_flatten(values))
    _refuse_kept_model_kwargs(base_values, merged, own, file=path)
    if 'description' not in values and base_values.get('description'):
        # the base's description would pass this file's run off as the base's: name what the file changes,
        # compared as validated values (a default written out, or 8/255 as a decimal, changes nothing)
        before, after = _validated_flat(base_values), _validated_flat(merged)
        changed = [k for k in own if k not in RUN_CONTROL_KEYS and (k not in before or before[k] != after.get(k))]
        if changed:
            merged['description'] = f"{base_values['description']} (with changes from {path.name}: " \
                                    f"{', '.join(changed)})"
    return merged


def load_config(path: Union[str, Path], *, overrides: Sequence[str] = ()) -> TrainConfig:
    """Loads a YAML recipe (a path or a shipped recipe name), applies ``key=value`` overrides, validates it.

    The recipe's ``description`` names the overrides that change what it trains (all but
    :data:`RUN_CONTROL_KEYS`, and only those that change a value), e.g.
    'Quick PGD-AT WRN-16-4, CIFAR-10 (with overrides model.name=resnet18)',
    so that a run of another model does not pass for the recipe; an override of ``description`` itself
    is taken as it is.

    Raises:
        FileNotFoundError: The file (or a ``base:`` it names) does not exist.
        ConfigError: An unknown key, a wrong type or an invalid value.
    """
    values = _load_yaml_tree(resolve_config_path(path))
    cfg = config_from_dict(apply_overrides(values, overrides))
    parsed = [(item.strip(), _parse_override(item)[0]) for item in overrides]
    try:
        base = _flatten(config_to_dict(config_from_dict(values)))
    except ConfigError:
        base = {}  # the recipe alone is incomplete: every override counts
    new = _flatten(config_to_dict(cfg))

    def changed(key: str) -> bool:  # a value the recipe (or the resumed run's config) does not have already
        k = key if key in new else 'model.kwargs'
        return k not in base or base[k] != new[k]

    changes = [item for item, key in parsed if key not in RUN_CONTROL_KEYS and changed(key)]
    if changes and 'description' not in (key for _, key in parsed):
        cfg.description = f"{cfg.description} (with overrides {', '.join(changes)})".lstrip()
    return cfg
