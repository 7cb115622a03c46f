"""Robustness evaluation: clean accuracy and accuracy under attacks, per example and worst case.

:func:`evaluate` is the one entry point. It runs every attack on the examples the model classifies
correctly, recomputes each attack's accuracy from the adversarial images it returns (and checks that
they lie in the threat model), and reports the per-example worst case over all attacks. Random
starts are drawn per example from the seed, so the numbers do not depend on the batch size (except
AutoAttack's, whose random draws follow its batches, as in AutoAttack itself).
"""
from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import math
import operator
import time
import warnings
import zlib
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn
from torch import Tensor

from ..attacks.autoattack import autoattack_settings, build_autoattack, iter_autoattack, warning_kind
from ..attacks.pgd import pgd_attack
from ..attacks.spec import DEFAULT_ATTACKS, AttackSpec, parse_attack, parse_attacks
from ..files import write_text

__all__ = ['evaluate', 'EvaluationResult', 'AttackResult', 'GradientMaskingWarning']

#: 2: the fingerprint holds a digest of the weights; 3: and AutoAttack's per-attack settings; 4: and AutoAttack's
#: batch size (its random draws follow its batches)
STATE_VERSION = 4
#: seeds :func:`evaluate` takes: the non-negative int64 values (torch generators and AutoAttack take them as they are)
SEED_RANGE = (0, 2 ** 63 - 1)


class GradientMaskingWarning(UserWarning):
    """A sign that gradient-based attacks are failing for a reason other than robustness."""


@dataclasses.dataclass
class AttackResult:
    """One attack's outcome.

    Attributes:
        spec: The attack and its settings.
        correct: Per example, classified correctly on the attack's adversarial image (bool, N, CPU);
            examples misclassified when clean count as not correct.
        seconds: Wall time of the attack.
        components: AutoAttack only: accuracy after each of its attacks, in order.
    """

    spec: AttackSpec
    correct: Tensor
    seconds: float = 0.0
    components: Dict[str, float] = dataclasses.field(default_factory=dict)

    @property
    def accuracy(self) -> float:
        return self.correct.float().mean().item() if self.correct.numel() else float('nan')


@dataclasses.dataclass
class EvaluationResult:
    """Everything :func:`evaluate` measured.

    Attributes:
        attacks: Results by attack name, in the order run.
        n_examples: Examples evaluated.
        eps: Threat model radius.
        norm: Threat model norm.
        seed: Seed of the attacks' random draws.
        batch_size: Batch size used.
        device: Device the evaluation ran on.
        unbounded_accuracy: Accuracy under PGD with an eps that covers the whole image box, on a
            sample (None when that check did not run); should be 0.
        warnings: Messages of the warnings raised: gradient masking signs, and AutoAttack's own checks
            (``'AutoAttack (<attack>): ...'``, once each).
        seconds: Total wall time.
    """

    attacks: Dict[str, AttackResult]
    n_examples: int
    eps: float
    norm: str
    seed: int
    batch_size: int
    device: str
    unbounded_accuracy: Optional[float] = None
    warnings: List[str] = dataclasses.field(default_factory=list)
    seconds: float = 0.0

    @property
    def accuracy(self) -> Dict[str, float]:
        """Accuracy per attack name."""
        return {name: r.accuracy for name, r in self.attacks.items()}

    @property
    def clean_accuracy(self) -> Optional[float]:
        return self.attacks['clean'].accuracy if 'clean' in self.attacks else None

    @property
    def worst_case(self) -> Tensor:
        """Per example, correct under every attack run (bool, N)."""
        flags = torch.ones(self.n_examples, dtype=torch.bool)
        for r in self.attacks.values():
            flags &= r.correct
        return flags

    @property
    def robust_accuracy(self) -> Optional[float]:
        """Per-example worst case over the attacks other than 'clean'; None if only 'clean' ran."""
        if all(r.spec.kind == 'clean' for r in self.attacks.values()):
            return None
        return self.worst_case.float().mean().item()


# --- helpers ----------------------------------------------------------------------------------------
def _as_input(x: Tensor) -> Tensor:
    """uint8 pixels -> float in [0, 1]; float images pass through."""
    return x if x.is_floating_point() else x.float().div_(255)


def _check_inputs(model: nn.Module, images: Tensor, labels: Tensor, allow_train_mode: bool) -> None:
    if images.dim() != 4:
        raise ValueError(f'images must be N x C x H x W, got shape {tuple(images.shape)}.')
    if labels.dim() != 1 or labels.shape[0] != images.shape[0]:
        raise ValueError(f'labels must be a vector of {images.shape[0]} class indices, got shape '
                         f'{tuple(labels.shape)}.')
    if images.shape[0] == 0:
        raise ValueError('No examples to evaluate.')
    if images.is_floating_point():
        lo, hi = images.min().item(), images.max().item()
        if lo < 0 or hi > 1:
            raise ValueError(f'images must be [0, 1] pixels (the models normalise inside), got values in '
                             f'[{lo:.3g}, {hi:.3g}]. Pass un-normalised images, or uint8 pixels.')
    elif images.dtype != torch.uint8:
        raise ValueError(f'images must be float in [0, 1] or uint8, got {images.dtype}.')
    training = [name or '(the model itself)' for name, m in model.named_modules() if m.training]
    if training and not allow_train_mode:
        shown = ', '.join(training[:5]) + (f' and {len(training) - 5} more' if len(training) > 5 else '')
        raise ValueError(f'The model has modules in train mode ({shown}): dropout and batch statistics change its '
                         f'outputs. Call model.eval() first, or pass allow_train_mode=True to evaluate it as it is.')


def _check_deterministic(model: nn.Module, x: Tensor, allow_randomized: bool) -> None:
    with torch.inference_mode():
        a, b = model(x).float(), model(x).float()
    diff = ((a - b).norm(dim=1) / a.norm(dim=1).clamp(min=1e-10)).max().item()
    if diff > 1e-4:
        msg = (f'The model gives different outputs for the same input (relative difference {diff:.2g}): it looks '
               f'randomised. Evaluate such a defence with expectation over transformations (attack aa-rand).')
        if not allow_randomized:
            raise ValueError(msg + ' Pass allow_randomized=True (--allow-randomized) to go on.')
        warnings.warn(msg, GradientMaskingWarning, stacklevel=3)


def _is_oom(e: BaseException) -> bool:
    return isinstance(e, torch.cuda.OutOfMemoryError) or 'out of memory' in str(e).lower()


def _auto_batch_size(model: nn.Module, sample: Tensor, n: int, device: torch.device) -> int:
    """The largest power-of-two batch (up to n and 4096) whose forward and input-gradient fit in memory."""
    if device.type != 'cuda':
        return min(n, 128)
    best, size = 0, 16
    while True:
        try:
            x = _as_input(sample[:1]).expand(size, *sample.shape[1:]).clone().requires_grad_(True)
            with torch.enable_grad():
                torch.autograd.grad(model(x).float().logsumexp(1).sum(), x)
            best = size
        except RuntimeError as e:
            if not _is_oom(e):
                raise
            break
        finally:
            x = None
            torch.cuda.empty_cache()
        if size >= min(n, 4096):
            break
        size *= 2
    if best == 0:
        raise RuntimeError('Not even a batch of 16 examples fits in GPU memory; pass a smaller batch_size.')
    return min(best, n)


def _example_seeds(seed: int, name: str, n: int) -> Tensor:
    """One int64 seed per example, from the evaluation's seed and the attack's name.

    The base is reduced modulo 2**62, so that it and base + n stay within int64 for any seed (seeds below
    450,000 keep the draws of earlier versions, which did not reduce it and overflowed for large seeds).
    """
    base = (seed * 1_000_003 + zlib.crc32(name.encode())) * 10_000_019 % 2 ** 62
    return base + torch.arange(n, dtype=torch.int64)


def _perturbation_ok(adv: Tensor, x: Tensor, eps: float, norm: str) -> bool:
    if adv.shape != x.shape or not torch.isfinite(adv).all() or adv.min() < 0 or adv.max() > 1:
        return False
    d = (adv - x).flatten(1).float()
    size = {'Linf': lambda: d.abs().amax(1), 'L2': lambda: d.norm(dim=1), 'L1': lambda: d.abs().sum(1)}[norm]()
    return bool((size <= eps * (1 + 1e-4) + 1e-5).all())


# --- resumable state --------------------------------------------------------------------------------
class _State:
    """Progress of an evaluation in a JSON file, rewritten atomically, so an interrupted run can resume."""

    def __init__(self, path: Optional[Path], fingerprint: Dict[str, Any], min_interval: float = 30.0) -> None:
        self.path, self.fingerprint, self.min_interval = path, fingerprint, min_interval
        self.attacks: Dict[str, Dict[str, Any]] = {}
        self._last_save = 0.0
        if path is not None and path.exists():
            try:
                data = json.loads(path.read_text())
            except (OSError, ValueError) as e:
                raise ValueError(f'Cannot read the evaluation state file {path} ({e}); delete it to start over.')
            if data.get('version') != STATE_VERSION:
                raise ValueError(f'The state file {path} was written by another version of robust-resnets '
                                 f'(state version {data.get("version")}, expected {STATE_VERSION}); delete it to '
                                 f'start over.')
            saved = data.get('fingerprint')
            if saved != fingerprint:
                differ = sorted(k for k in set(fingerprint) | set(saved or {})
                                if (saved or {}).get(k) != fingerprint.get(k))
                raise ValueError(f'The state file {path} belongs to a different evaluation (model weights, data, '
                                 f'attacks or settings differ: {", ".join(differ)}). Delete it, or pass another '
                                 f'state path.')
            self.attacks = data.get('attacks', {})

    def get(self, name: str) -> Dict[str, Any]:
        return self.attacks.setdefault(name, {})

    @staticmethod
    def encode(flags: Tensor) -> str:
        return ''.join('1' if f else '0' for f in flags.cpu().tolist())

    @staticmethod
    def decode(text: str, device: torch.device) -> Tensor:
        return torch.tensor([c == '1' for c in text], dtype=torch.bool, device=device)

    @contextlib.contextmanager
    def saved_on_interrupt(self) -> Iterator[None]:
        """Writes the progress of the last finished batch when the block is interrupted (Ctrl-C)."""
        try:
            yield
        except KeyboardInterrupt:
            self.save(force=True)
            raise

    def save(self, force: bool = False) -> None:
        if self.path is None or (not force and time.monotonic() - self._last_save < self.min_interval):
            return
        data = {'version': STATE_VERSION, 'fingerprint': self.fingerprint, 'attacks': self.attacks}
        write_text(json.dumps(data), self.path)
        self._last_save = time.monotonic()


def check_seed(seed: Any, *, name: str = 'seed') -> int:
    """``seed`` as an int when it is an integer (Python, numpy or torch) from 0 to 2**63 - 1.

    Raises:
        ValueError: It is not such an integer.
    """
    try:
        value = operator.index(seed) if not isinstance(seed, bool) else None
    except TypeError:
        value = None
    if value is None or not SEED_RANGE[0] <= value <= SEED_RANGE[1]:
        raise ValueError(f'{name} must be an integer from {SEED_RANGE[0]} to 2**63 - 1, got {seed!r}.')
    return value


def _fingerprint(model: nn.Module, images: Tensor, labels: Tensor, specs: Sequence[AttackSpec],
                 seed: int) -> Dict[str, Any]:
    """What a resumed evaluation must share with the interrupted one. The batch size is not part of it: every
    attack but AutoAttack draws per example, and an AutoAttack run keeps the batch size it started with."""
    digest = hashlib.sha1()
    digest.update(labels.cpu().numpy().tobytes())
    digest.update(images[:, :, ::4, ::4].contiguous().cpu().numpy().tobytes())
    return {
        'parameters': sum(p.numel() for p in model.parameters()), 'weights': _weights_digest(model),
        'data': digest.hexdigest(), 'n_examples': int(images.shape[0]), 'seed': seed,
        'attacks': {s.name: s.settings() for s in specs},
    }


def _weights_digest(model: nn.Module) -> str:
    """SHA-1 of every parameter and buffer: dtype, shape and values, in state_dict order (module names do not count)."""
    digest = hashlib.sha1()
    for tensor in model.state_dict().values():
        if not isinstance(tensor, Tensor):
            continue
        tensor = tensor.detach()
        digest.update(f'{tensor.dtype}{tuple(tensor.shape)}'.encode())
        digest.update(tensor.cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


# --- the evaluation ---------------------------------------------------------------------------------
class _Runner:
    """Runs batches with a batch size that halves on CUDA out-of-memory errors."""

    def __init__(self, batch_size: int, progress: bool) -> None:
        self.batch_size, self.progress = batch_size, progress

    def over(self, indices: Tensor, fn: Callable[[Tensor], None], *, desc: str, start: int = 0,
             on_done: Optional[Callable[[int], None]] = None) -> None:
        from tqdm.auto import tqdm

        n = indices.numel()
        bar = tqdm(total=n, initial=start, desc=desc, unit='ex', disable=not self.progress, leave=False)
        pos = start
        while pos < n:
            idx = indices[pos:pos + self.batch_size]
            try:
                fn(idx)
            except RuntimeError as e:
                if not _is_oom(e) or self.batch_size == 1:
                    raise
                torch.cuda.empty_cache()
                self.batch_size //= 2
                continue
            pos += idx.numel()
            bar.update(idx.numel())
            if on_done is not None:
                on_done(pos)
        bar.close()


def evaluate(
        model: nn.Module,
        images: Tensor,
        labels: Tensor,
        *,
        attacks: Union[str, Sequence[Union[str, AttackSpec]]] = DEFAULT_ATTACKS,
        eps: float = 8 / 255,
        norm: str = 'Linf',
        step_size: Optional[float] = None,
        batch_size: Optional[int] = None,
        device: Union[str, torch.device, None] = None,
        seed: int = 0,
        state_path: Union[str, Path, None] = None,
        progress: bool = True,
        allow_train_mode: bool = False,
        allow_randomized: bool = False,
        check_masking: bool = True,
) -> EvaluationResult:
    """Measures a classifier's clean accuracy and its accuracy under attacks.

    Args:
        model: Classifier taking [0, 1] images and returning logits, in eval mode.
        images: N x C x H x W, uint8 pixels or float in [0, 1].
        labels: N class indices.
        attacks: Attack names (a list, or one comma-separated string) or specs: 'clean', 'fgsm',
            'pgd20', 'cw40', 'pgd50r10', 'aa', 'aa-plus', 'aa-rand', 'aa:apgd-ce+square', ... (see
            :mod:`robust_resnets.attacks.spec`).
        eps: Threat model radius, in [0, 1] pixel units (RobustBench's: 8/255 for CIFAR Linf, 4/255 for
            ImageNet Linf, 0.5 for CIFAR L2, 12 for CIFAR L1; see :func:`robust_resnets.attacks.default_eps`).
        norm: 'Linf', 'L2' or 'L1' (L1: AutoAttack only).
        step_size: Step of PGD/CW (default eps / 10 from 20 steps on: 0.8/255 at eps 8/255, as in Huang et
            al.; 2 * eps / steps for fewer steps).
        batch_size: Examples per batch (default: the largest that fits on a GPU, 128 on a CPU). Results
            do not depend on it, except AutoAttack's.
        device: Where to run (default: where the model's parameters are). The model is moved there.
        seed: Seed of every random draw, 0 to 2**63 - 1.
        state_path: JSON file recording progress; an interrupted evaluation of the same weights with the
            same data and arguments (with AutoAttack: the same batch size) resumes from it.
        progress: Show tqdm progress bars.
        allow_train_mode: Evaluate a model that is in train mode instead of refusing.
        allow_randomized: Evaluate a model whose outputs vary between identical calls instead of refusing.
        check_masking: Warn on signs of gradient masking, including one extra PGD run with an eps that
            covers the whole image box on up to 100 examples (its accuracy should be 0). AutoAttack's own
            checks (probability outputs, zero gradients, dynamic models, too few classes) warn either way.

    Returns:
        An :class:`EvaluationResult`.

    Raises:
        ValueError: Bad images, labels, attack names or seed; a Linf eps or step above 1; a model in train
            mode or randomised (unless allowed); a state file from another evaluation.
    """
    t_start = time.perf_counter()
    seed = check_seed(seed)
    _check_inputs(model, images, labels, allow_train_mode)
    specs = _resolve_specs(attacks, eps=eps, norm=norm, step_size=step_size)
    if device is None:
        param = next(model.parameters(), None)
        device = param.device if param is not None else torch.device('cpu')
    device = torch.device(device)
    model = model.to(device)
    n = images.shape[0]
    images, labels = images.to(device), labels.to(device=device, dtype=torch.int64)
    _check_deterministic(model, _as_input(images[:8]), allow_randomized)
    # AutoAttack's adversaries are configured up front, so that their settings are in the specs (and the fingerprint)
    adversaries = {s.name: build_autoattack(model, eps=s.eps, norm=s.norm, version=s.version,
                                            attacks=list(s.attacks) if s.version == 'custom' else None, seed=seed,
                                            device=device)
                   for s in specs if s.kind == 'autoattack'}
    specs = tuple(_with_autoattack_settings(s, adversaries[s.name]) if s.name in adversaries else s for s in specs)
    if batch_size is None:
        batch_size = _auto_batch_size(model, images, n, device)
    elif batch_size < 1:
        raise ValueError(f'batch_size must be positive, got {batch_size}.')
    state = _State(Path(state_path), _fingerprint(model, images, labels, specs, seed)) \
        if state_path is not None else _State(None, {})
    runner = _Runner(batch_size, progress)
    raised: List[str] = []

    def warn(msg: str) -> None:
        raised.append(msg)
        warnings.warn(msg, GradientMaskingWarning, stacklevel=3)

    with state.saved_on_interrupt():
        # clean predictions: every attack starts from the examples classified correctly
        clean_state = state.get('clean')
        if clean_state.get('complete'):
            clean_correct = _State.decode(clean_state['correct'], device)
        else:
            clean_correct = torch.zeros(n, dtype=torch.bool, device=device)

            def clean_batch(idx: Tensor) -> None:
                with torch.inference_mode():
                    logits = model(_as_input(images[idx]))
                if logits.dim() != 2 or labels[idx].max() >= logits.shape[1] or labels[idx].min() < 0:
                    raise ValueError(f'Labels must be class indices below the model\'s {logits.shape[-1]} outputs; '
                                     f'got labels up to {labels.max().item()} (check the dataset and num_classes).')
                clean_correct[idx] = logits.argmax(1) == labels[idx]

            runner.over(torch.arange(n, device=device), clean_batch, desc='clean')
            clean_state.update(correct=_State.encode(clean_correct), complete=True)
            state.save(force=True)
        candidates = clean_correct.nonzero().squeeze(1)

        results: Dict[str, AttackResult] = {}
        for spec in specs:
            entry = state.get(spec.name)
            t0 = time.perf_counter() - float(entry.get('seconds', 0.0))
            if spec.kind == 'clean':
                results[spec.name] = AttackResult(spec, clean_correct.cpu(), seconds=0.0)
                continue
            correct = _State.decode(entry['correct'], device) if 'correct' in entry else clean_correct.clone()
            components: Dict[str, float] = dict(entry.get('components', {}))
            for msg in entry.get('warnings', ()):  # raised before an interruption: in the state file
                warn(msg)
            if not entry.get('complete'):
                def save(pos: Optional[int] = None, force: bool = False) -> None:
                    entry.update(correct=_State.encode(correct), seconds=time.perf_counter() - t0,
                                 components=components)
                    if pos is not None:
                        entry['done'] = pos
                    state.save(force=force)

                if spec.kind == 'autoattack':
                    def aa_warning(msg: str, entry: Dict[str, Any] = entry) -> None:
                        # once per kind: a resumed run repeats the zero-gradient check with another count
                        if warning_kind(msg) not in {warning_kind(m) for m in entry.setdefault('warnings', [])}:
                            entry['warnings'].append(msg)
                            warn(msg)

                    entry.setdefault('batch_size', runner.batch_size)  # its draws follow its batches: kept on resume
                    _run_autoattack(model, adversaries[spec.name], images, labels, spec, correct, components, runner,
                                    save, entry, batch_size=int(entry['batch_size']), on_warning=aa_warning)
                else:
                    _run_gradient_attack(model, images, labels, spec, correct, candidates, seed, runner, entry, save)
                entry['complete'] = True
                save(force=True)
            results[spec.name] = AttackResult(spec, correct.cpu(), seconds=time.perf_counter() - t0,
                                              components=components)

        result = EvaluationResult(attacks=results, n_examples=n, eps=eps, norm=norm, seed=seed,
                                  batch_size=runner.batch_size, device=str(device))
        if check_masking:
            _check_masking(result, warn)
            if any(s.needs_gradients for s in specs) and candidates.numel():
                result.unbounded_accuracy = _unbounded_accuracy(model, images, labels, candidates, specs, seed, norm)
                if result.unbounded_accuracy > 0:
                    warn(f'PGD with an eps covering the whole image box leaves {result.unbounded_accuracy:.1%} '
                         f'accuracy (it should reach 0%): gradients may be masked or obfuscated, so the robust '
                         f'accuracy may be overestimated.')
        result.warnings = raised
    result.seconds = time.perf_counter() - t_start
    return result


def _resolve_specs(attacks, *, eps: float, norm: str, step_size: Optional[float]) -> Tuple[AttackSpec, ...]:
    if isinstance(attacks, str) or all(isinstance(a, str) for a in attacks):
        return parse_attacks(attacks, eps=eps, norm=norm, step_size=step_size)
    specs = tuple(a if isinstance(a, AttackSpec) else parse_attack(a, eps=eps, norm=norm, step_size=step_size)
                  for a in attacks)
    names = [s.name for s in specs]
    if len(set(names)) != len(names):
        raise ValueError(f'Attack names repeat in {names}; give each once.')
    return specs


def _run_gradient_attack(model, images, labels, spec: AttackSpec, correct: Tensor, candidates: Tensor, seed: int,
                         runner: _Runner, entry: Dict[str, Any], save) -> None:
    seeds = _example_seeds(seed, spec.name, images.shape[0])
    loss = 'cw' if spec.kind == 'cw' else 'ce'

    def batch(idx: Tensor) -> None:
        x, y = _as_input(images[idx]), labels[idx]
        adv = pgd_attack(model, x, y, eps=spec.eps, steps=spec.steps, step_size=spec.step_size, norm=spec.norm,
                         loss_fn=loss, random_start=spec.random_start, restarts=spec.restarts,
                         example_seeds=seeds[idx.cpu()])
        if not _perturbation_ok(adv, x, spec.eps, spec.norm):
            raise RuntimeError(f'{spec.name} returned images outside the {spec.norm} ball of radius {spec.eps} or '
                               f'outside [0, 1]; the attack is broken.')
        with torch.inference_mode():
            correct[idx] = model(adv).argmax(1) == y

    runner.over(candidates, batch, desc=spec.name, start=int(entry.get('done', 0)), on_done=save)


def _with_autoattack_settings(spec: AttackSpec, adversary) -> AttackSpec:
    """The spec with the version, attacks and per-attack settings the configured adversary runs."""
    effective = autoattack_settings(adversary)
    return dataclasses.replace(spec, version=effective['version'], attacks=tuple(effective['attacks']),
                               per_attack=effective['per_attack'])


def _run_autoattack(model, adversary, images, labels, spec: AttackSpec, correct: Tensor, components: Dict[str, float],
                    runner: _Runner, save, entry: Dict[str, Any], *, batch_size: int,
                    on_warning: Callable[[str], None]) -> None:
    """Runs AutoAttack's attacks by batches; ``entry`` records the examples the current attack started on
    ('todo') and how many of them are done, so that a resume goes on with its next batch."""
    from tqdm.auto import tqdm

    n = images.shape[0]
    pos = int(entry.get('done', 0))
    resume = None
    if 'todo' in entry and entry.get('todo_attack') not in components:  # interrupted within that attack
        resume = (_State.decode(entry['todo'], images.device).nonzero().squeeze(1), pos)

    def on_start(attack: str, todo: Tensor) -> None:
        mask = torch.zeros(n, dtype=torch.bool)
        mask[todo.cpu()] = True
        entry.update(todo=_State.encode(mask), todo_attack=attack, done=0)  # one update: saved together

    bar = None
    for attack, idx, adv in iter_autoattack(adversary, images, labels, correct, batch_size=batch_size,
                                            skip=tuple(components), resume=resume, on_start=on_start,
                                            on_warning=on_warning):
        if bar is None:
            bar = tqdm(total=int(correct.sum()), desc=f'{spec.name} {attack}', unit='ex', disable=not runner.progress,
                       leave=False)
        if idx.numel() == 0:  # this attack is done
            components[attack] = correct.sum().item() / n  # from here on a resume skips it
            pos = 0
            save(pos, force=True)
            bar.close()
            bar = None
            continue
        x = _as_input(images[idx])
        if not _perturbation_ok(adv, x, spec.eps, spec.norm):
            raise RuntimeError(f'AutoAttack ({attack}) returned images outside the {spec.norm} ball of radius '
                               f'{spec.eps} or outside [0, 1].')
        with torch.inference_mode():
            correct[idx] &= model(adv).argmax(1) == labels[idx]
        bar.update(idx.numel())
        pos += idx.numel()
        save(pos)


def _check_masking(result: EvaluationResult, warn: Callable[[str], None]) -> None:
    acc = result.accuracy
    n = result.n_examples
    tol = max(1.5 / n, 0.001)
    runs: Dict[Tuple, List[AttackSpec]] = {}
    for r in result.attacks.values():
        s = r.spec
        if s.kind in ('pgd', 'cw'):
            runs.setdefault((s.kind, s.eps, s.norm, s.random_start), []).append(s)
    for group in runs.values():
        group = sorted(group, key=lambda s: (s.steps * s.restarts, s.name))
        for weak, strong in zip(group, group[1:]):
            if strong.steps * strong.restarts > weak.steps * weak.restarts and acc[strong.name] > acc[weak.name] + tol:
                warn(f'{strong.name} leaves a higher accuracy ({acc[strong.name]:.2%}) than the weaker {weak.name} '
                     f'({acc[weak.name]:.2%}): more attack steps should not help the model; gradients may be masked.')
    fgsm = [r for r in result.attacks.values() if r.spec.kind == 'fgsm']
    multi = [r for r in result.attacks.values() if r.spec.kind == 'pgd']
    for f in fgsm:
        for p in multi:
            reaches = p.spec.steps * p.spec.step_size >= p.spec.eps  # PGD can travel as far as FGSM's step
            if reaches and p.spec.norm == f.spec.norm and p.spec.eps == f.spec.eps and p.accuracy > f.accuracy + tol:
                warn(f'Single-step FGSM ({f.accuracy:.2%}) beats multi-step {p.spec.name} ({p.accuracy:.2%}): '
                     f'a sign of gradient masking.')
    for r in result.attacks.values():
        comps = list(r.components.items())
        if r.spec.kind == 'autoattack' and comps and comps[-1][0] == 'square' and len(comps) > 1:
            drop = comps[-2][1] - comps[-1][1]
            if drop > 0.002:
                warn(f'The black-box Square attack lowered AutoAttack\'s accuracy by {drop:.2%} after the white-box '
                     f'attacks: the gradients may be unreliable (gradient masking).')


def _unbounded_accuracy(model, images, labels, candidates, specs, seed: int, norm: str) -> float:
    """Accuracy under PGD-20 with an eps that reaches any image of the box, on up to 100 correct examples."""
    idx = candidates[:100]
    x, y = _as_input(images[idx]), labels[idx]
    if norm == 'L2':
        eps = math.sqrt(x[0].numel())
    else:
        norm, eps = 'Linf', 1.0
    adv = pgd_attack(model, x, y, eps=eps, steps=20, step_size=eps / 4, norm=norm, random_start=True,
                     example_seeds=_example_seeds(seed, 'unbounded', images.shape[0])[idx.cpu()])
    with torch.inference_mode():
        return (model(adv).argmax(1) == y).float().mean().item()
