"""The adversarial-training loop: one process, or DDP when launched by ``torchrun``.

:func:`train` runs a :class:`~robust_resnets.training.config.TrainConfig` into a run directory::

    RUN_DIR/
      train_config.yaml    the resolved recipe
      metrics.jsonl        one JSON line per epoch (loss, train accuracies, held-out clean and PGD accuracy)
      last.pt              full training state (atomic; what --resume continues from)
      best.pt              weights with the best held-out PGD accuracy
      model.safetensors    final weights (the EMA when enabled) and
      config.json          its timm config, for timm.create_model(..., pretrained_cfg_overlay=dict(file=...))

Under ``torchrun`` every process trains its slice of each global batch (gloo on CPU, NCCL on GPU);
all random choices derive from ``(seed, step)``, so a resumed run, or a run on another number of
processes, sees the same batches, augmentations and attack starts. Mixup/CutMix are the exception:
each process mixes within its own slice (as timm's and the authors' DDP training), so mixed runs
resume exactly but depend on the number of processes.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import signal
import threading
import time
from pathlib import Path
from typing import Any, Dict, Iterator, List, NamedTuple, Optional, Union

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
import yaml
from torch import Tensor

from timm.utils import ModelEmaV3

from ..files import atomic_path, write_text
from .config import RUN_CONTROL_KEYS, ConfigError, TrainConfig, _flatten, config_from_dict, config_to_dict
from .data import (BatchPlan, TrainingData, _EVAL, augment, derive_seed, gather_batch, load_training_data,
                   seeded_global_rngs)
from .imagenet_data import ImageFolderTrainingData, ImageNetBatches, load_imagenet_training_data
from .losses import Objective, get_objective

__all__ = ['train', 'TrainingDiverged', 'TrainingInterrupted', 'WeightAverage', 'build_optimizer', 'build_scheduler', 'evaluate']

CHECKPOINT_VERSION = 1
_MIX = 6  # stream tag for derive_seed: the mixup/CutMix draws of a step
_NORM_TYPES = (nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm)


class _PassOutputs(NamedTuple):
    """What one forward/backward pass gives the step: its loss and logits, and the labels scored."""

    loss: Tensor
    clean_logits: Optional[Tensor]
    adv_logits: Optional[Tensor]
    labels: Tensor


class TrainingInterrupted(KeyboardInterrupt):
    """Ctrl-C stopped the run once its current step was done; ``checkpoint`` holds that step.

    Attributes:
        step: The optimizer steps done (and saved).
        checkpoint: The run's ``last.pt``.
    """

    def __init__(self, step: int, checkpoint: Path) -> None:
        super().__init__(f"stopped by Ctrl-C after step {step}; saved in '{checkpoint}'")
        self.step, self.checkpoint = step, checkpoint


class _StopRequest:
    """A SIGINT handler: the first Ctrl-C asks the run to stop after its current step; one more, at least a
    second later, stops at once (a launcher that passes a Ctrl-C on to processes that also got it from the
    terminal delivers two at once). torchrun passes one on to its workers, and kills them after its
    ``--shutdown-timeout`` (30 s); a second Ctrl-C makes it end them at once itself.

    Data-loading worker processes forked while it is installed inherit it and ignore Ctrl-C: the run stops them.
    """

    def __init__(self, *, announce: bool) -> None:
        self.requested = False
        self._first: Optional[float] = None
        self._announce = announce
        self._installed = False
        self._pid = os.getpid()

    def __call__(self, signum: int, frame: Any) -> None:
        if os.getpid() != self._pid:  # a forked data-loading worker
            return
        now = time.monotonic()
        if self._first is None:
            self._first, self.requested = now, True
            if self._announce:  # os.write: safe inside a signal handler, unlike print
                os.write(2, b'\nCtrl-C: the run stops after its current step and saves it; press '
                         b'Ctrl-C again to stop at once (losing the steps since the last checkpoint).\n')
        elif now - self._first > 1.0:
            raise KeyboardInterrupt

    def install(self) -> None:
        """Handles SIGINT from now on, where Python's default handler is in place (else leaves it alone)."""
        self._installed = threading.current_thread() is threading.main_thread() and \
            signal.getsignal(signal.SIGINT) is signal.default_int_handler
        if self._installed:
            signal.signal(signal.SIGINT, self)

    def uninstall(self) -> None:
        """Gives Ctrl-C back to Python's default handler."""
        if self._installed:
            signal.signal(signal.SIGINT, signal.default_int_handler)


class TrainingDiverged(RuntimeError):
    """The loss became non-finite; the run directory keeps its last good checkpoint."""


# --- distributed ---------------------------------------------------------------------------------------
@dataclasses.dataclass
class _Dist:
    rank: int = 0
    world_size: int = 1
    device: torch.device = torch.device('cpu')
    owns_group: bool = False

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def _setup_distributed(device_choice: str) -> _Dist:
    world_size = int(os.environ.get('WORLD_SIZE', '1'))
    use_cuda = torch.cuda.is_available() if device_choice == 'auto' else device_choice == 'cuda'
    if device_choice == 'cuda' and not torch.cuda.is_available():
        raise RuntimeError("run.device is 'cuda' but no CUDA device is available; use --set run.device=cpu.")
    if world_size <= 1:
        return _Dist(device=torch.device('cuda' if use_cuda else 'cpu'))
    local_rank = int(os.environ.get('LOCAL_RANK', '0'))
    owns = False
    if not dist.is_initialized():
        dist.init_process_group(backend='nccl' if use_cuda else 'gloo')
        owns = True
    device = torch.device('cpu')
    if use_cuda:
        torch.cuda.set_device(local_rank)
        device = torch.device('cuda', local_rank)
    return _Dist(rank=dist.get_rank(), world_size=dist.get_world_size(), device=device, owns_group=owns)


def _all_reduce(t: Tensor, d: _Dist, op=None) -> Tensor:
    if d.enabled:
        dist.all_reduce(t, op=op or dist.ReduceOp.SUM)
    return t


def _broadcast_buffers(module: nn.Module, d: _Dist) -> None:
    """Gives every process rank 0's buffers (batch-norm statistics), one collective per dtype."""
    if not d.enabled:
        return
    by_dtype: Dict[torch.dtype, List[Tensor]] = {}
    for b in module.buffers():
        by_dtype.setdefault(b.dtype, []).append(b)
    for buffers in by_dtype.values():
        flat = torch.cat([b.reshape(-1) for b in buffers])
        dist.broadcast(flat, src=0)
        offset = 0
        for b in buffers:
            b.copy_(flat[offset:offset + b.numel()].view_as(b))
            offset += b.numel()


def _broadcast_object(obj: Any, d: _Dist) -> Any:
    if not d.enabled:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


# --- model, optimiser, schedule, averaging -------------------------------------------------------------
def _create_model(cfg: TrainConfig, num_classes: int, model_args: Dict[str, Any], *, starting_weights: bool = True
                  ) -> nn.Module:
    """The run's model, built with ``model_args`` (:func:`_built_model_args`), with its starting weights
    (``model.pretrained``/``model.pretrained_file``) unless ``starting_weights`` is False (a resumed run)."""
    import timm

    import robust_resnets  # noqa: F401  (registers the models)

    kwargs = dict(model_args)
    kwargs['num_classes'] = cfg.model.num_classes or num_classes
    pretrained = starting_weights and (cfg.model.pretrained or cfg.model.pretrained_file is not None)
    if pretrained and cfg.model.pretrained_file is not None:
        path = Path(cfg.model.pretrained_file)
        # a pickled training state is opened here once, so that which weights it holds is never guessed
        kwargs['pretrained_cfg_overlay'] = dict(file=str(path)) if path.suffix == '.safetensors' else \
            dict(state_dict=_unambiguous_state_dict(path))
    try:
        return timm.create_model(cfg.model.name, pretrained=pretrained, **kwargs)
    except RuntimeError as e:
        if 'Unknown model' in str(e):
            raise ValueError(f"model.name '{cfg.model.name}' is not a registered model; list them with "
                             f"`robust-resnets models`.") from None
        raise
    except TypeError as e:
        if 'keyword argument' not in str(e):
            raise
        raise ValueError(f"model.kwargs {dict(cfg.model.kwargs)} do not fit model.name '{cfg.model.name}' ({e}); "
                         f"give its constructor's arguments, or 'model.kwargs={{}}' for its defaults.") from None


def _unambiguous_state_dict(path: Path) -> Dict[str, torch.Tensor]:
    """The weights of a pickled checkpoint, out of its training-state wrappers; one holding both trained and
    averaged weights is refused (timm's own loading would take the average unasked)."""
    from robust_resnets.models.layers import strip_checkpoint_wrappers
    from robust_resnets.weights.convert import load_original_checkpoint

    try:
        return strip_checkpoint_wrappers(load_original_checkpoint(path))
    except ValueError as e:
        if 'ambiguous' not in str(e):
            raise ValueError(f"model.pretrained_file: {e}") from None
        raise ValueError(f"model.pretrained_file '{path}' holds both trained weights and their moving average, so "
                         f"which to start from is ambiguous; give a run's model.safetensors (its final weights), or "
                         f"save the one you want, e.g. torch.save(torch.load(f)['state_dict_ema'], "
                         f"'ema.pt').") from None


def _is_norm_param_owner(module: nn.Module) -> bool:
    return isinstance(module, _NORM_TYPES) or type(module).__name__.lower().endswith('norm2d')


def _no_decay_ids(model: nn.Module, rule: str) -> set:
    """ids of the parameters that ``optim.no_weight_decay`` exempts from weight decay."""
    if rule == 'norm':
        return {id(p) for m in model.modules() if _is_norm_param_owner(m) for p in m.parameters(recurse=False)}
    if rule == 'bias':
        return {id(p) for name, p in model.named_parameters() if name.endswith('bias')}
    if rule == '1d':
        return {id(p) for name, p in model.named_parameters() if p.ndim <= 1 or name.endswith('bias')}
    return set()


def build_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    """SGD or AdamW over the model's parameters; those ``optim.no_weight_decay`` names form a group without
    weight decay."""
    o = cfg.optim
    exempt = _no_decay_ids(model, o.no_weight_decay)
    decay = [p for p in model.parameters() if p.requires_grad and id(p) not in exempt]
    no_decay = [p for p in model.parameters() if p.requires_grad and id(p) in exempt]
    groups = [dict(params=decay, weight_decay=o.weight_decay)]
    if no_decay:
        groups.append(dict(params=no_decay, weight_decay=0.0))
    if o.name == 'adamw':
        return torch.optim.AdamW(groups, lr=o.lr, betas=tuple(o.betas), weight_decay=o.weight_decay)
    return torch.optim.SGD(groups, lr=o.lr, momentum=o.momentum, nesterov=o.nesterov, weight_decay=o.weight_decay)


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: TrainConfig, *, steps_per_epoch: int):
    """The learning-rate schedule, stepped once per epoch or per step (``schedule.interval``)."""
    s = cfg.schedule
    per_epoch = 1 if s.interval == 'epoch' else steps_per_epoch
    total = cfg.run.epochs * per_epoch
    if s.name == 'onecycle':
        if float(s.pct_start * total) == 1.0:  # torch's OneCycleLR divides by zero on a one-step rise
            raise ConfigError(f"schedule onecycle: its rise (schedule.pct_start {s.pct_start} x {total} "
                              f"{'epochs' if s.interval == 'epoch' else 'steps'}) is exactly one step, which torch's "
                              f'OneCycleLR cannot schedule; change run.epochs or schedule.pct_start.')
        # as torch's OneCycleLR (and the Gowal/Rebuffi/SCORE code): cosine, momentum cycled 0.95 -> 0.85 -> 0.95
        return torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=cfg.optim.lr, total_steps=total,
                                                   pct_start=s.pct_start)
    warmup = s.warmup_epochs * per_epoch
    milestones = [m * per_epoch for m in s.milestones]
    floor = s.min_lr / cfg.optim.lr

    def factor(t: int) -> float:
        if t < warmup:  # a warm-up that ends within a step reaches the peak there, never above it
            return s.warmup_start + (1 - s.warmup_start) * min((t + 1) / warmup, 1.0)
        if s.name == 'multistep':
            return s.gamma ** sum(t >= m for m in milestones)
        if s.name == 'cosine':
            return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * (t - warmup) / max(total - warmup, 1)))
        return 1.0

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


class WeightAverage(ModelEmaV3):
    """Gowal et al.'s weight averaging (timm's ``ModelEmaV3`` with their decay schedule).

    Up to ``warmup_steps`` updates the average copies the model; then its decay is
    ``min(decay, (1 + t) / (10 + t))`` (t: updates since the warm-up) or ``decay`` when not
    ``dynamic``. Buffers (normalisation statistics) are copied from the model.
    """

    def __init__(self, model: nn.Module, *, decay: float, warmup_steps: int, dynamic: bool = True) -> None:
        super().__init__(model, decay=decay, exclude_buffers=True)
        self.warmup_steps = warmup_steps
        self.dynamic = dynamic

    def get_decay(self, step: Optional[int] = None) -> float:
        if step is None:
            return self.decay
        if step < self.warmup_steps:
            return 0.0
        if not self.dynamic:
            return self.decay
        t = step - self.warmup_steps
        return min(self.decay, (1.0 + t) / (10.0 + t))


# --- batch-norm and parameter contexts -----------------------------------------------------------------
def _batch_norms(model: nn.Module) -> List[nn.modules.batchnorm._BatchNorm]:
    return [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]


@contextlib.contextmanager
def _frozen_bn_stats(model: nn.Module) -> Iterator[None]:
    """Train-mode batch norm normalises with batch statistics but leaves the running ones untouched."""
    bns = [(m, m.track_running_stats) for m in _batch_norms(model)]
    for m, _ in bns:
        m.track_running_stats = False
    try:
        yield
    finally:
        for m, flag in bns:
            m.track_running_stats = flag


@contextlib.contextmanager
def _attack_mode(model: nn.Module, bn_mode: str) -> Iterator[None]:
    """Parameters frozen; eval mode (bn_mode 'eval') or train mode with frozen BN statistics ('train')."""
    params = [p for p in model.parameters() if p.requires_grad]
    was_training = model.training
    for p in params:
        p.requires_grad_(False)
    try:
        if bn_mode == 'eval':
            model.eval()
            yield
        else:
            model.train()
            with _frozen_bn_stats(model):
                yield
    finally:
        for p in params:
            p.requires_grad_(True)
        model.train(was_training)


# --- evaluation ----------------------------------------------------------------------------------------
def _autocast(device: torch.device, enabled: bool):
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=enabled)


def evaluate(model: nn.Module, images: Tensor, labels: Tensor, *, cfg: TrainConfig, device: torch.device,
             amp: bool = False, channels_last: bool = False, rank: int = 0, world_size: int = 1) -> Dict[str, float]:
    """Clean and PGD accuracy (the training threat model, ``eval.pgd_steps`` steps) of ``model`` in eval mode.

    Under DDP each rank evaluates a contiguous share and the counts are summed.
    """
    from robust_resnets.attacks.pgd import pgd_attack

    n = images.shape[0] if cfg.eval.max_examples is None else min(cfg.eval.max_examples, images.shape[0])
    lo, hi = rank * n // world_size, (rank + 1) * n // world_size
    bs = max(cfg.eval.batch_size // world_size, 1)
    counts = torch.zeros(3, dtype=torch.float64, device=device)  # clean correct, pgd correct, total
    was_training = model.training
    model.eval()
    params = [p for p in model.parameters() if p.requires_grad]
    for p in params:
        p.requires_grad_(False)
    try:
        for start in range(lo, hi, bs):
            stop = min(start + bs, hi)
            x = images[start:stop].to(device).float().div_(255)
            if channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            y = labels[start:stop].to(device)
            with torch.no_grad(), _autocast(device, amp):
                counts[0] += (model(x).argmax(1) == y).sum()
            if cfg.eval.pgd_steps > 0:
                seeds = torch.tensor([derive_seed(cfg.run.seed, _EVAL, i) for i in range(start, stop)])
                with _autocast(device, amp):
                    x_adv = pgd_attack(model, x, y, eps=cfg.attack.eps, steps=cfg.eval.pgd_steps,
                                       step_size=cfg.eval.pgd_step_size, norm=cfg.attack.norm, loss_fn='ce',
                                       random_start=True, example_seeds=seeds)
                    with torch.no_grad():
                        counts[1] += (model(x_adv).argmax(1) == y).sum()
            counts[2] += stop - start
    finally:
        for p in params:
            p.requires_grad_(True)
        model.train(was_training)
    if world_size > 1:
        dist.all_reduce(counts)
    total = max(counts[2].item(), 1.0)
    out = {'val_clean_acc': counts[0].item() / total}
    if cfg.eval.pgd_steps > 0:
        out['val_pgd_acc'] = counts[1].item() / total
    return out


# --- checkpoints ---------------------------------------------------------------------------------------
def _atomic_torch_save(obj: Any, path: Path) -> None:
    with atomic_path(path, sole_writer=True) as tmp:  # only rank 0 writes checkpoints
        torch.save(obj, tmp)


def _drop_records_after(metrics: Path, step: int) -> None:
    """Rewrites ``metrics.jsonl`` without the epoch records past ``step`` (events stay)."""
    if not metrics.is_file():
        return
    lines = metrics.read_text().splitlines(keepends=True)
    kept = []
    for line in lines:
        try:
            record = json.loads(line)
        except ValueError:  # a line cut off when the process was killed, or a blank one
            continue
        if 'event' in record or record.get('step', 0) <= step:
            kept.append(line if line.endswith('\n') else line + '\n')
    if kept != lines:
        write_text(''.join(kept), metrics)


def _rng_state(device: torch.device) -> Dict[str, Any]:
    state = {'torch': torch.get_rng_state()}
    if device.type == 'cuda':
        state['cuda'] = torch.cuda.get_rng_state(device)
    return state


def _set_rng_state(state: Dict[str, Any], device: torch.device) -> None:
    torch.set_rng_state(state['torch'])
    if device.type == 'cuda' and 'cuda' in state:
        torch.cuda.set_rng_state(state['cuda'], device)


def _built_model_args(cfg: TrainConfig) -> Dict[str, Any]:
    """The arguments the run's model is built with beside its architecture: a manifest tag's ``model_args``
    (``model.name`` may name a tag, whose architecture it builds) or those recorded with an untagged
    ``model.pretrained_file`` (checked against ``model.kwargs``), then ``model.kwargs``."""
    from robust_resnets.weights import get_manifest
    from robust_resnets.weights.pretrained import recorded_model_args

    if cfg.model.pretrained_file is not None and not Path(cfg.model.pretrained_file).is_file():
        raise FileNotFoundError(f"model.pretrained_file '{cfg.model.pretrained_file}' does not exist.")
    if '.' in cfg.model.name:
        entry = get_manifest().get(cfg.model.name)
        base = dict(entry.model_args) if entry is not None else {}
    elif cfg.model.pretrained_file is not None:
        try:
            base = recorded_model_args(Path(cfg.model.pretrained_file), architecture=cfg.model.name,
                                       kwargs=cfg.model.kwargs)
        except ValueError as e:
            raise ValueError(f"model.pretrained_file: {e} In a recipe: set model.name to the file's architecture, "
                             f"and 'model.kwargs={{}}' to build it as recorded.") from None
    else:
        base = {}
    return {**base, **cfg.model.kwargs}


def _export(model: nn.Module, cfg: TrainConfig, run_dir: Path, model_args: Dict[str, Any],
            extra: Dict[str, Any]) -> None:
    """Writes timm's ``config.json``, then ``model.safetensors``, into the run directory (each atomically).

    ``model.safetensors`` comes last: its presence marks a finished export.
    """
    from timm.models._hub import save_config_for_hf

    from robust_resnets.weights.convert import save_safetensors

    training = {'recipe': cfg.description, 'objective': cfg.objective.name, 'epochs': cfg.run.epochs,
                'threat_model': {'norm': cfg.attack.norm, 'eps': cfg.attack.eps},
                'dataset': cfg.data.dataset, 'ema': cfg.ema.enabled, **extra}
    # timm's save_for_hf refuses to run without a Hub-capable huggingface_hub under timm 1.0.9
    with atomic_path(run_dir / 'config.json') as tmp:
        save_config_for_hf(model, tmp, model_config={'training': training}, model_args=model_args)
        # newer timm records the head's arguments among model_args too; they are the config's num_classes and
        # pretrained_cfg, and keeping them out lets create_model(arch, num_classes=N, **model_args) fine-tune
        config = json.loads(Path(tmp).read_text(encoding='utf-8'))
        for key in ('num_classes', 'global_pool'):
            config.get('model_args', {}).pop(key, None)
        Path(tmp).write_text(json.dumps(config, indent=2) + '\n', encoding='utf-8')
    with atomic_path(run_dir / 'model.safetensors', sole_writer=True) as tmp:
        save_safetensors({k: v.contiguous() for k, v in model.state_dict().items()}, tmp, metadata={'format': 'pt'})


# --- the loop ------------------------------------------------------------------------------------------
def _resolve_flag(value: Union[bool, str], device: torch.device) -> bool:
    return device.type == 'cuda' if value == 'auto' else bool(value)


def _load_checkpoint(path: Path) -> Dict[str, Any]:
    ckpt = torch.load(path, map_location='cpu', weights_only=False)
    if ckpt.get('format_version') != CHECKPOINT_VERSION:
        raise ValueError(f"'{path}' was written by an incompatible trainer version "
                         f"({ckpt.get('format_version')}, expected {CHECKPOINT_VERSION}).")
    return ckpt


def _refuse_changes(saved: Dict[str, Any], cfg: TrainConfig, run_dir: Path) -> None:
    """Raises ConfigError when ``cfg`` differs from the run's saved config in more than the run-control keys."""
    saved, now = _flatten(saved), _flatten(config_to_dict(cfg))
    changed = sorted(k for k in set(saved) | set(now) if saved.get(k) != now.get(k) and k not in RUN_CONTROL_KEYS)
    if changed:
        longer = ''
        if {'run.epochs', 'optim.lr'} & set(changed):
            exported = run_dir / 'model.safetensors'
            if exported.is_file() or (saved.get('ema.enabled') and (run_dir / 'last.pt').is_file()):
                # last.pt holding the weights and their average is ambiguous as a start: its export is not
                when = '' if exported.is_file() else ' once the run has finished (resume it to the end first)'
                start = f'model.pretrained_file={exported}{when}'
            else:
                start = f"model.pretrained_file={run_dir / 'last.pt'}"
            longer = f' To train on from its weights with another schedule, start a new run: --set {start} --out NEW_RUN.'
        raise ConfigError(f"The config differs from the one '{run_dir}' was started with, in: "
                          f"{', '.join(changed)}. Resume with the run's own train_config.yaml (only "
                          f"{', '.join(RUN_CONTROL_KEYS)} may change).{longer}")


def _check_run_dir(cfg: TrainConfig, run_dir: Path, resume: bool) -> Optional[Dict[str, Any]]:
    """Validates the run directory; returns the checkpoint to resume from (None for a new run)."""
    last = run_dir / 'last.pt'
    started = (run_dir / 'train_config.yaml').is_file()
    if resume:
        if not last.is_file():
            if started:  # it ended before its first checkpoint: start it again, from step 0
                _refuse_changes(yaml.safe_load((run_dir / 'train_config.yaml').read_text()), cfg, run_dir)
                return None
            raise FileNotFoundError(f"Nothing to resume in '{run_dir}': it has no last.pt. Start the run without "
                                    f"--resume.")
        ckpt = _load_checkpoint(last)
        _refuse_changes(ckpt['config'], cfg, run_dir)
        return ckpt
    if last.exists():
        raise FileExistsError(f"'{run_dir}' already holds a run; pass --resume to continue it, or choose a new --out.")
    if started:
        raise FileExistsError(f"'{run_dir}' holds a run that ended before its first checkpoint; pass --resume to "
                              f"start it again there, or choose a new --out.")
    if run_dir.exists() and not run_dir.is_dir():
        raise FileExistsError(f"--out '{run_dir}' is a file; give the directory the run should go to.")
    others = sorted(p.name for p in run_dir.iterdir()) if run_dir.is_dir() else []
    if others:  # e.g. a converted model's folder, whose model.safetensors and config.json the export would replace
        raise FileExistsError(f"'{run_dir}' is not a run directory but holds files ({', '.join(others[:4])}"
                              f"{', ...' if len(others) > 4 else ''}); choose a new or empty --out.")
    return None


def _hyper(cfg: TrainConfig, objective: Objective) -> Dict[str, float]:
    return {name: getattr(cfg.objective, name) for name in objective.hyper_params}


def train(cfg: TrainConfig, out_dir: Union[str, Path], *, resume: bool = False,
          data: Optional[Union[TrainingData, ImageFolderTrainingData]] = None) -> Dict[str, Any]:
    """Runs (or resumes) a training recipe into ``out_dir``.

    Args:
        cfg: The recipe.
        out_dir: Run directory (created; must not hold another run unless ``resume``).
        resume: Continue the run in ``out_dir`` from its ``last.pt``.
        data: In-memory data to use instead of loading ``cfg.data`` (for programmatic use and tests).

    Returns:
        A summary: 'status' ('finished' or 'stopped' at ``run.max_steps``), 'step', 'epoch' and the
        last evaluation's metrics.

    Raises:
        TrainingDiverged: The loss became non-finite (the last good checkpoint is kept).
        TrainingInterrupted: Ctrl-C stopped the run after a step, which ``last.pt`` holds (a KeyboardInterrupt).
        ConfigError, FileNotFoundError, FileExistsError, ValueError: Bad config, data or run directory.
    """
    d = _setup_distributed(cfg.run.device)
    try:
        return _train(cfg, Path(out_dir), resume, data, d)
    finally:
        if d.owns_group and dist.is_initialized():
            dist.destroy_process_group()


def _build_mixer(cfg: TrainConfig, num_classes: int, micro_batch: int):
    """timm's Mixup for ``data.mixup_alpha``/``data.cutmix_alpha`` (None when batches are not mixed)."""
    if not cfg.data.mixing:
        return None
    if micro_batch % 2:
        raise ConfigError(f'Mixup/CutMix pair each image with another of the same forward pass; the images per '
                          f'process and pass ({micro_batch}) must be even. Change run.batch_size or '
                          f'run.grad_accum_steps.')
    from timm.data import Mixup

    return Mixup(mixup_alpha=cfg.data.mixup_alpha, cutmix_alpha=cfg.data.cutmix_alpha, prob=cfg.data.mixup_prob,
                 switch_prob=cfg.data.mixup_switch_prob, mode='batch', label_smoothing=cfg.objective.label_smoothing,
                 num_classes=num_classes)


def _load_data(cfg: TrainConfig, *, progress: bool) -> Union[TrainingData, ImageFolderTrainingData]:
    if cfg.data.dataset == 'imagenet':
        return load_imagenet_training_data(cfg.data, cfg.eval)
    return load_training_data(cfg.data, cfg.eval, progress=progress)


def _train(cfg: TrainConfig, run_dir: Path, resume: bool, data: Optional[Union[TrainingData, ImageFolderTrainingData]],
           d: _Dist) -> Dict[str, Any]:
    from robust_resnets.attacks.apgd import apgd_attack
    from robust_resnets.attacks.pgd import pgd_attack

    config_from_dict(config_to_dict(cfg))  # validate programmatic configs too
    accum_steps = cfg.run.grad_accum_steps
    if cfg.run.batch_size % (d.world_size * accum_steps):
        processes = f"{d.world_size} process{'es' if d.world_size > 1 else ''}"
        if cfg.run.batch_size % d.world_size or accum_steps == 1:
            raise ConfigError(f'run.batch_size ({cfg.run.batch_size}) must divide evenly over {processes}.')
        per_process = cfg.run.batch_size // d.world_size
        fits = [n for n in range(2, per_process + 1) if per_process % n == 0][:3]
        raise ConfigError(f'run.batch_size ({cfg.run.batch_size}) must divide evenly over {processes} x {accum_steps} '
                          f'passes of run.grad_accum_steps; {per_process} images a process split into '
                          f"{' or '.join(map(str, fits))} passes.")
    micro_batch = cfg.run.batch_size // (d.world_size * accum_steps)  # images per forward/backward pass
    # rank 0 checks the run directory (which all processes must see) and tells the others
    ckpt, error = None, None
    if d.main:
        try:
            ckpt = _check_run_dir(cfg, run_dir, resume)
        except (ValueError, FileNotFoundError, FileExistsError) as e:
            error = e
    error, from_checkpoint = _broadcast_object((error, ckpt is not None), d)
    if error is not None:
        raise error
    if from_checkpoint and not d.main:
        ckpt = _load_checkpoint(run_dir / 'last.pt')
    device = d.device
    if device.type == 'cuda':
        torch.backends.cudnn.benchmark = True
    amp = _resolve_flag(cfg.run.amp, device)
    channels_last = _resolve_flag(cfg.run.channels_last, device)
    objective = get_objective(cfg.objective.name)
    hyper = _hyper(cfg, objective)

    if data is None:
        if d.enabled and not d.main:
            dist.barrier()  # rank 0 decodes the images and fills the cache first; the others read the cache
        try:
            data = _load_data(cfg, progress=d.main and cfg.run.progress)
        finally:  # on an error too: the others then meet it themselves
            if d.enabled and d.main:
                dist.barrier()
    from_files = isinstance(data, ImageFolderTrainingData)
    if from_files != (cfg.data.dataset == 'imagenet'):
        raise ValueError(f"data.dataset is '{cfg.data.dataset}' but the data given are "
                         f"{'image files' if from_files else 'in-memory tensors'}.")
    generated = None if from_files else data.generated_images
    if cfg.data.generated_fraction > 0 and generated is None:
        raise ValueError('data.generated_fraction > 0 but the data has no generated images.')
    if device.type == 'cuda' and not from_files:  # the training set lives on the GPU; generated data stays in host memory
        data = dataclasses.replace(data, train_images=data.train_images.to(device),
                                   train_labels=data.train_labels.to(device))
    plan = BatchPlan(n_train=data.n_train if from_files else data.train_images.shape[0],
                     n_generated=0 if generated is None else generated.shape[0],
                     batch_size=cfg.run.batch_size, generated_fraction=cfg.data.generated_fraction,
                     seed=cfg.run.seed, crop_padding=cfg.data.crop_padding, flip=cfg.data.flip,
                     rotation=cfg.data.rotation)
    spe = plan.steps_per_epoch
    total_steps = cfg.run.epochs * spe
    mixer = _build_mixer(cfg, cfg.model.num_classes or data.num_classes, micro_batch)
    if mixer is not None and 'label_smoothing' in hyper:
        hyper['label_smoothing'] = 0.0  # the mixed targets carry it

    torch.manual_seed(cfg.run.seed)
    # once: the export records what was built; a resumed run needs neither its starting weights nor their file
    model_args = ckpt['model_args'] if ckpt is not None and 'model_args' in ckpt else _built_model_args(cfg)
    raw = _create_model(cfg, data.num_classes, model_args, starting_weights=ckpt is None).to(device)
    if channels_last:
        raw = raw.to(memory_format=torch.channels_last)
    optimizer = build_optimizer(raw, cfg)
    scheduler = build_scheduler(optimizer, cfg, steps_per_epoch=spe)
    ema = None
    if cfg.ema.enabled:
        ema = WeightAverage(raw, decay=cfg.ema.decay, warmup_steps=round(cfg.ema.warmup_epochs * spe),
                            dynamic=cfg.ema.dynamic)

    step, best, accum = 0, None, None
    last_eval: Dict[str, float] = {}  # the newest validation metrics
    if ckpt is not None:
        raw.load_state_dict(ckpt['model'])
        optimizer.load_state_dict(ckpt['optimizer'])
        scheduler.load_state_dict(ckpt['scheduler'])
        if ema is not None:  # 'ema' in checkpoints written before the key was timm's
            ema.module.load_state_dict(ckpt['state_dict_ema'] if 'state_dict_ema' in ckpt else ckpt['ema'])
        step, best = ckpt['step'], ckpt['best']
        # the running totals of the epoch so far, summed over the processes: rank 0 carries them on
        accum = ckpt['accum'] if d.main else None
        last_eval = ckpt.get('last_eval', {})  # absent from checkpoints written before it was kept
        _set_rng_state(ckpt['rng'], device)
    ckpt_loaded = ckpt is not None
    # resuming a run that already ended: nothing to train, and its exported weights and metrics stay as they are
    already_exported = ckpt_loaded and step >= total_steps and (run_dir / 'model.safetensors').is_file()
    del ckpt
    if d.main:  # created only once the data and the model are in place
        run_dir.mkdir(parents=True, exist_ok=True)
        # the recipe, without this launch's stop point: `--resume` from it runs on to the end; a resumed run
        # writes it again, with the run-control values it changed (e.g. run.grad_accum_steps) for the next resume
        recipe = dataclasses.replace(cfg, run=dataclasses.replace(cfg.run, max_steps=None))
        write_text(yaml.safe_dump(config_to_dict(recipe), sort_keys=False), run_dir / 'train_config.yaml')
    if d.enabled:
        dist.barrier()
    accum = accum if accum is not None else torch.zeros(5, dtype=torch.float64)
    accum = accum.to(device)  # loss sum, steps, clean correct, adversarial correct, examples

    net: nn.Module = raw
    ddp = None
    if d.enabled:
        net = ddp = nn.parallel.DistributedDataParallel(raw, device_ids=[device.index] if device.type == 'cuda' else None)
    attack_net: nn.Module = raw
    if cfg.run.compile:
        net, attack_net = torch.compile(net), torch.compile(raw)
    eval_model = ema.module if ema is not None else raw

    metrics_path = run_dir / 'metrics.jsonl'
    if d.main and resume and not already_exported:
        # epochs logged after the checkpoint (or, with none, at all) are trained and logged again
        _drop_records_after(metrics_path, step)

    def log(record: Dict[str, Any]) -> None:
        if d.main:
            with metrics_path.open('a') as f:
                f.write(json.dumps(record) + '\n')

    saved_at = [step if ckpt_loaded else None]

    def save_checkpoint() -> None:
        totals = _all_reduce(accum.clone(), d)  # every process calls this, so all take part
        saved_at[0] = step  # on every process: whether to save again is decided alike everywhere
        if not d.main:
            return
        _atomic_torch_save({
            'format_version': CHECKPOINT_VERSION, 'config': config_to_dict(cfg), 'model_args': model_args, 'step': step,
            'epoch': step // spe, 'model': raw.state_dict(), 'optimizer': optimizer.state_dict(),
            'scheduler': scheduler.state_dict(),
            # timm's key: timm.models.load_checkpoint(model, 'last.pt', use_ema=True) loads the average
            'state_dict_ema': ema.module.state_dict() if ema is not None else None,
            'rng': _rng_state(device), 'best': best, 'accum': totals.cpu(), 'last_eval': last_eval,
        }, run_dir / 'last.pt')

    if d.main and step == 0:
        log({'event': 'start', 'steps_per_epoch': spe, 'total_steps': total_steps, 'world_size': d.world_size,
             'grad_accum_steps': accum_steps, 'device': str(device), 'amp': amp, 'channels_last': channels_last,
             'params': sum(p.numel() for p in raw.parameters())})
    elif d.main and not already_exported:
        log({'event': 'resume', 'step': step, 'epoch': step / spe, 'world_size': d.world_size,
             'grad_accum_steps': accum_steps})

    progress = None
    if d.main and cfg.run.progress:
        from tqdm.auto import tqdm
        progress = tqdm(total=total_steps, initial=step, unit='step', dynamic_ncols=True,
                        desc=f'epoch {min(step // spe + 1, cfg.run.epochs)}/{cfg.run.epochs}')

    def forward_backward(x: Tensor, y: Tensor, *, attack_seeds: Tensor, mix_seed: int) -> _PassOutputs:
        """One forward/backward pass on a part of the step's batch; its gradients add to the parameters'."""
        targets = y  # class indices, or the soft targets of mixed batches
        if mixer is not None:
            # timm's Mixup draws from numpy; each pass mixes its own images (pairs and draws), as in the
            # authors' and timm's DDP training, so mixed runs depend on the number of processes and passes
            with seeded_global_rngs(mix_seed):
                x, targets = mixer(x, y)
            y = targets.argmax(1)  # the dominant class, for the training accuracies
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)

        x_adv = None
        if objective.adversarial:
            with _attack_mode(raw, cfg.objective.attack_bn), _autocast(device, amp):
                attack_targets = targets
                if objective.attack_target == 'clean_probs':
                    with torch.no_grad():
                        attack_targets = F.softmax(attack_net(x).float(), dim=1)
                if cfg.attack.name == 'apgd':
                    x_adv = apgd_attack(attack_net, x, attack_targets, eps=cfg.attack.eps, steps=cfg.attack.steps,
                                        norm=cfg.attack.norm, loss_fn=objective.attack_loss)
                else:
                    x_adv = pgd_attack(attack_net, x, attack_targets, eps=cfg.attack.eps, steps=cfg.attack.steps,
                                       step_size=cfg.attack.step_size, norm=cfg.attack.norm,
                                       loss_fn=objective.attack_loss, random_start=cfg.attack.random_start,
                                       init_std=cfg.attack.init_std, example_seeds=attack_seeds)
        raw.train()
        with _autocast(device, amp):
            clean_logits = adv_logits = None
            if objective.needs_clean_logits:
                freeze = objective.adversarial and cfg.objective.bn_update == 'adversarial'
                with _frozen_bn_stats(raw) if freeze else contextlib.nullcontext():
                    clean_logits = net(x)
            if objective.adversarial:
                adv_logits = net(x_adv)
            loss = objective.loss(clean_logits, adv_logits, targets, **hyper)
        (loss / accum_steps).backward()  # the passes' mean losses average to the step's
        return _PassOutputs(loss.detach().double(), clean_logits, adv_logits, y)

    bns = _batch_norms(raw)
    status = 'finished'
    epoch_start = time.time()
    file_batches = None
    if from_files:
        stop = total_steps if cfg.run.max_steps is None else min(total_steps, max(cfg.run.max_steps, step))
        file_batches = iter(ImageNetBatches(data, cfg.data, plan=plan, start=step, stop=stop, rank=d.rank,
                                            world_size=d.world_size, device=device))
    raw.train()
    stop_request = _StopRequest(announce=d.main)
    stop_request.install()
    try:
        while step < total_steps:
            if cfg.run.max_steps is not None and step >= cfg.run.max_steps:
                status = 'stopped'
                break
            epoch = step // spe
            # every step's randomness derives from (seed, step, rank): resumes exactly from the step counter
            torch.manual_seed(derive_seed(cfg.run.seed, step, d.rank))
            batch = plan.step(step, rank=d.rank, world_size=d.world_size)
            if file_batches is not None:
                x_rank, y_rank = next(file_batches)
            else:
                images_u8, y_rank = gather_batch(data, batch, device=device)
                x_rank = augment(images_u8, crop_offsets=batch.crop_offsets, crop_padding=cfg.data.crop_padding,
                                 flips=batch.flips, angles=batch.angles if cfg.data.rotation else None)
            optimizer.zero_grad(set_to_none=True)
            step_loss = torch.zeros((), dtype=torch.float64, device=device)
            for micro in range(accum_steps):
                part = slice(micro * micro_batch, (micro + 1) * micro_batch)
                if cfg.run.bn_momentum is not None:
                    # the first step's passes average into the running statistics (1, 1/2, 1/3, ...)
                    for m in bns:
                        m.momentum = 1.0 / (micro + 1) if step == 0 else cfg.run.bn_momentum
                last_pass = micro == accum_steps - 1
                # gradients add up locally; DDP reduces them over the processes in the step's last pass
                with ddp.no_sync() if ddp is not None and not last_pass else contextlib.nullcontext():
                    outputs = forward_backward(x_rank[part], y_rank[part], attack_seeds=batch.attack_seeds[part],
                                                mix_seed=derive_seed(cfg.run.seed, _MIX, step,
                                                                     d.rank * accum_steps + micro))
                step_loss += outputs.loss
                with torch.no_grad():
                    if outputs.clean_logits is not None:
                        accum[2] += (outputs.clean_logits.argmax(1) == outputs.labels).sum()
                    if outputs.adv_logits is not None:
                        accum[3] += (outputs.adv_logits.argmax(1) == outputs.labels).sum()
                    accum[4] += outputs.labels.numel()
            step_loss /= accum_steps

            # one reduction per step: any process's non-finite loss, and any process's Ctrl-C
            flags = torch.stack([(~torch.isfinite(step_loss)).to(torch.int32),
                                 torch.tensor(int(stop_request.requested), dtype=torch.int32, device=device)])
            non_finite, stop_now = _all_reduce(flags, d, dist.ReduceOp.MAX if d.enabled else None).tolist()
            if non_finite:
                kept = f"the last good checkpoint is '{run_dir / 'last.pt'}' (step {saved_at[0]})" \
                    if saved_at[0] is not None else 'no checkpoint was written yet'
                log({'event': 'diverged', 'step': step, 'epoch': epoch})
                raise TrainingDiverged(
                    f'The training loss became non-finite at step {step} (epoch {epoch + 1}); {kept}. Lower '
                    f'optim.lr, set optim.grad_clip, or disable run.amp, then start again or --resume.')
            if cfg.optim.grad_clip is not None:
                nn.utils.clip_grad_norm_(raw.parameters(), cfg.optim.grad_clip)
            optimizer.step()
            # each process updated the batch-norm statistics with its own share of the batch; one model goes
            # on (rank 0's, as DDP's next forward and the checkpoint hold it) to the next attack, average, eval
            _broadcast_buffers(raw, d)
            step += 1
            if cfg.schedule.interval == 'step' and step < total_steps:
                scheduler.step()
            if ema is not None:
                ema.update(raw, step=step)

            accum[0] += step_loss
            accum[1] += 1
            if progress is not None:
                progress.update(1)
                if step % cfg.run.log_every == 0:
                    progress.set_postfix(loss=f'{step_loss.item():.4f}', lr=f"{optimizer.param_groups[0]['lr']:.4g}")

            if step % spe == 0:  # end of an epoch
                epoch_done = step // spe
                totals = _all_reduce(accum.clone(), d)
                record: Dict[str, Any] = {
                    'epoch': epoch_done, 'step': step, 'lr': optimizer.param_groups[0]['lr'],
                    'train_loss': totals[0].item() / max(totals[1].item(), 1),
                }
                if cfg.schedule.interval == 'epoch' and step < total_steps:
                    scheduler.step()
                if objective.needs_clean_logits:
                    record['train_clean_acc'] = totals[2].item() / max(totals[4].item(), 1)
                if objective.adversarial:
                    record['train_adv_acc'] = totals[3].item() / max(totals[4].item(), 1)
                accum.zero_()
                if epoch_done % cfg.eval.every == 0 or step == total_steps:
                    last_eval = evaluate(eval_model, data.eval_images, data.eval_labels, cfg=cfg, device=device,
                                         amp=amp, channels_last=channels_last, rank=d.rank, world_size=d.world_size)
                    record.update(last_eval)
                    score = last_eval.get('val_pgd_acc', last_eval['val_clean_acc'])
                    if best is None or score > best['score']:
                        best = {'score': score, 'epoch': epoch_done}
                        if d.main:
                            _atomic_torch_save({'model': eval_model.state_dict(), 'epoch': epoch_done,
                                                'metrics': last_eval, 'config': config_to_dict(cfg)},
                                               run_dir / 'best.pt')
                record['epoch_time_s'] = round(time.time() - epoch_start, 3)
                epoch_start = time.time()
                log(record)
                if progress is not None:
                    progress.set_description(f'epoch {min(epoch_done + 1, cfg.run.epochs)}/{cfg.run.epochs}')
                    progress.write(' '.join(f'{k}={v:.4f}' if isinstance(v, float) else f'{k}={v}'
                                            for k, v in record.items()))
                save_checkpoint()
                # a Ctrl-C during the evaluation or the save stops here, on the checkpoint just written, not a
                # step later (under torchrun the processes have 30 s before they are killed); all are here
                if not stop_now:
                    stop_now = _all_reduce(torch.tensor(int(stop_request.requested), dtype=torch.int32, device=device),
                                           d, dist.ReduceOp.MAX if d.enabled else None).item()
            elif cfg.run.checkpoint_every and step % cfg.run.checkpoint_every == 0:
                save_checkpoint()
            if stop_now and step < total_steps and (cfg.run.max_steps is None or step < cfg.run.max_steps):
                status = 'interrupted'
                break
    finally:
        stop_request.uninstall()
        if progress is not None:
            progress.close()
        if file_batches is not None:
            file_batches.close()  # stops the data-loading workers

    if status in ('stopped', 'interrupted'):
        if saved_at[0] != step:
            save_checkpoint()
        log({'event': status, 'step': step, 'epoch': step / spe})
    elif d.main and not already_exported:
        _export(eval_model, cfg, run_dir, model_args,
                {'final_metrics': last_eval, 'best_epoch': (best or {}).get('epoch')})
        log({'event': 'end', 'step': step, **last_eval})
    if d.enabled:
        dist.barrier()
    if status == 'interrupted':
        raise TrainingInterrupted(step, run_dir / 'last.pt')
    return {'status': status, 'step': step, 'epoch': step / spe, 'steps_per_epoch': spe, **last_eval}
