"""``python -m benchmarks speed {throughput,train,precision,matmul}``: GPU speed and precision benchmarks.

* ``throughput``: images/s of every registered model's forward pass (eval mode, no grad) in fp32 and in
  bf16 autocast with channels_last, CIFAR models at 32 px and ImageNet models at 224 px.
* ``train``: images/s of TRADES (PGD-10) adversarial training steps, the training package's loop
  (bf16 autocast, channels_last, optionally ``torch.compile``) against a plain fp32 loop written the
  way Huang et al.'s code does it (clean probabilities once, ten sign-gradient steps from uniform noise
  in eval-mode statistics, then cross-entropy + beta * KL), side by side in one process. Also the
  fraction of the GPU's measured bf16 matrix rate that each achieves, counting MACs x 2 x 3 FLOPs per
  pass and 11 passes per image.
* ``precision``: robust accuracy (PGD-20, APGD-CE) of one model on the same images in fp32 and through
  the bf16/channels_last path: does the fast path change the result beyond noise?
* ``autoattack``: AutoAttack (standard) on the first CIFAR-10 test images, :func:`robust_resnets.evaluation.evaluate`
  against ``robustbench.eval.benchmark`` at its default batch size (through our adapter): time and robust accuracy.
* ``matmul``: the measured bf16 matrix-product rate (the ceiling ``train`` reports against).

Each writes a JSON file (``--out``) with the device, versions, date and command beside its table.
Meant for a GPU; ``--device cpu`` with tiny settings checks the plumbing (tests/test_benchmarks_speed.py).
"""
from __future__ import annotations

import argparse
import contextlib
import datetime
import fnmatch
import json
import platform
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

PASSES_PER_IMAGE = 11  # TRADES PGD-10: ten attack passes and the training pass (the convention)


# --- shared --------------------------------------------------------------------------------------------
#: Packages whose versions every record names (those a GPU session installs from wheels included).
PACKAGES = ('torch', 'torchvision', 'timm', 'safetensors', 'huggingface_hub', 'numpy', 'pyautoattack', 'torchprofile',
            'robustbench', 'robust-resnets')


def environment(device: torch.device, *, command: Optional[str] = None) -> Dict[str, Any]:
    """Date, command, device (GPU name, CUDA, driver, memory) and package versions, written beside every result."""
    import importlib.metadata as md
    import subprocess

    import timm

    env: Dict[str, Any] = {
        'date': datetime.datetime.now(datetime.timezone.utc).isoformat(timespec='seconds'),
        'command': command or 'python -m benchmarks speed ' + ' '.join(sys.argv[2:]),
        'python': platform.python_version(), 'platform': platform.platform(),
        'torch': torch.__version__, 'timm': timm.__version__, 'device': str(device)}
    if device.type == 'cuda':
        props = torch.cuda.get_device_properties(device)
        env.update(gpu=torch.cuda.get_device_name(device), cuda=torch.version.cuda,
                   gpu_memory_gib=round(props.total_memory / 2 ** 30, 1), multiprocessors=props.multi_processor_count)
        try:
            env['driver'] = subprocess.run(['nvidia-smi', '--query-gpu=driver_version', '--format=csv,noheader'],
                                           capture_output=True, text=True, timeout=30).stdout.strip() or None
        except (OSError, subprocess.SubprocessError):
            env['driver'] = None
    else:
        env['cpu'] = platform.processor() or platform.machine()
        env['cpu_threads'] = torch.get_num_threads()
    versions = {}
    for name in PACKAGES:
        try:
            versions[name] = md.version(name)
        except md.PackageNotFoundError:
            versions[name] = None
    env['versions'] = versions
    return env


def _sync(device: torch.device) -> None:
    if device.type == 'cuda':
        torch.cuda.synchronize(device)


def time_call(fn: Callable[[], Any], *, device: torch.device, warmup: int, iters: int) -> float:
    """Median seconds per call of ``fn`` after ``warmup`` calls (host clock around a device sync)."""
    for _ in range(warmup):
        fn()
    _sync(device)
    times = []
    for _ in range(iters):
        start = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


def _autocast(device: torch.device, enabled: bool):
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=enabled)


def _write(out: Optional[str], payload: Dict[str, Any]) -> None:
    if out is not None:
        from robust_resnets.evaluation.results import write_json

        write_json(payload, out)


def _resolve_device(name: str) -> torch.device:
    if name == 'auto':
        name = 'cuda' if torch.cuda.is_available() else 'cpu'
    if name == 'cuda' and not torch.cuda.is_available():
        raise SystemExit('--device cuda: no CUDA device here; run on a GPU machine or pass --device cpu.')
    return torch.device(name)


# --- matmul ceiling ------------------------------------------------------------------------------------
def measure_matmul_tflops(device: torch.device, *, size: int = 8192, iters: int = 10) -> float:
    """Measured bf16 matrix-product rate in TFLOP/s (random operands, median of ``iters`` after warm-up)."""
    a = torch.randn(size, size, device=device, dtype=torch.bfloat16)
    b = torch.randn(size, size, device=device, dtype=torch.bfloat16)
    seconds = time_call(lambda: a @ b, device=device, warmup=3, iters=iters)
    return 2 * size ** 3 / seconds / 1e12


# --- inference throughput ------------------------------------------------------------------------------
def _input_size(model: nn.Module) -> tuple:
    return tuple(model.pretrained_cfg.get('input_size', (3, 32, 32)))


def inference_throughput(name: str, *, device: torch.device, batch_size: int, warmup: int, iters: int,
                         model_kwargs: Optional[Dict[str, Any]] = None) -> Dict[str, Any]:
    """Images/s of ``name``'s forward pass in fp32 and in bf16 autocast + channels_last."""
    import timm

    import robust_resnets  # noqa: F401

    model = timm.create_model(name, **(model_kwargs or {})).to(device).eval()
    size = _input_size(model)
    x = torch.rand(batch_size, *size, device=device)
    row: Dict[str, Any] = {'model': name, 'input_size': list(size), 'batch_size': batch_size}
    with torch.no_grad():
        row['fp32_img_s'] = batch_size / time_call(lambda: model(x), device=device, warmup=warmup, iters=iters)
        fast = model.to(memory_format=torch.channels_last)
        x_cl = x.contiguous(memory_format=torch.channels_last)
        with _autocast(device, True):
            row['bf16_cl_img_s'] = batch_size / time_call(lambda: fast(x_cl), device=device, warmup=warmup,
                                                          iters=iters)
    model = fast = None  # frees the weights before the cache is emptied
    if device.type == 'cuda':
        torch.cuda.empty_cache()
    return row


# --- adversarial training ------------------------------------------------------------------------------
def plain_trades_step(model: nn.Module, optimizer: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor, *,
                      eps: float = 8 / 255, step_size: float = 2 / 255, steps: int = 10, beta: float = 6.0) -> float:
    """One fp32 TRADES step as the authors' code does it (no autocast, contiguous NCHW, eager)."""
    model.eval()
    with torch.no_grad():
        p_clean = F.softmax(model(x), dim=1)
    x_adv = (x + torch.empty_like(x).uniform_(-eps, eps)).clamp(0, 1)
    for _ in range(steps):
        x_adv.requires_grad_(True)
        kl = F.kl_div(F.log_softmax(model(x_adv), dim=1), p_clean, reduction='sum')
        grad, = torch.autograd.grad(kl, x_adv)
        x_adv = torch.min(torch.max(x_adv.detach() + step_size * grad.sign(), x - eps), x + eps).clamp(0, 1)
    model.train()
    optimizer.zero_grad()
    logits = model(x)
    loss = F.cross_entropy(logits, y) + beta * F.kl_div(F.log_softmax(model(x_adv), dim=1),
                                                        F.softmax(logits, dim=1), reduction='batchmean')
    loss.backward()
    optimizer.step()
    return float(loss.detach())


def plain_loop_img_s(name: str, *, device: torch.device, batch_size: int, warmup: int, iters: int,
                     model_kwargs: Optional[Dict[str, Any]] = None) -> float:
    """Images/s of :func:`plain_trades_step` on random CIFAR-sized data."""
    import timm

    import robust_resnets  # noqa: F401

    torch.manual_seed(0)
    model = timm.create_model(name, **(model_kwargs or {})).to(device)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=2e-4)
    x = torch.rand(batch_size, 3, 32, 32, device=device)
    y = torch.randint(0, 10, (batch_size,), device=device)
    seconds = time_call(lambda: plain_trades_step(model, optimizer, x, y), device=device, warmup=warmup, iters=iters)
    return batch_size / seconds


def trainer_img_s(config: Dict[str, Any], *, steps: int) -> float:
    """Images/s of :func:`robust_resnets.training.trainer.train` running ``config`` over its second and third epochs.

    ``config`` is a training config as a nested dict; its ``run.epochs`` becomes 3 and the data become random
    in-memory CIFAR-sized images, ``steps`` batches an epoch. The epoch times read from the run's metrics
    include the per-epoch checkpoint and an 8-image evaluation, so the figure slightly understates the step rate.
    """
    from robust_resnets.training.config import config_from_dict
    from robust_resnets.training.data import TrainingData
    from robust_resnets.training.trainer import train

    cfg = config_from_dict({**config, 'run': {**config.get('run', {}), 'epochs': 3}})
    g = torch.Generator().manual_seed(0)
    n = cfg.run.batch_size * steps
    data = TrainingData(torch.randint(0, 256, (n, 3, 32, 32), dtype=torch.uint8, generator=g),
                        torch.randint(0, 10, (n,), generator=g),
                        torch.randint(0, 256, (8, 3, 32, 32), dtype=torch.uint8, generator=g),
                        torch.randint(0, 10, (8,), generator=g), 10)
    with tempfile.TemporaryDirectory() as tmp:
        train(cfg, Path(tmp) / 'run', data=data)
        records = [json.loads(line) for line in (Path(tmp) / 'run' / 'metrics.jsonl').read_text().splitlines()]
    epoch_times = [r['epoch_time_s'] for r in records if 'epoch_time_s' in r][1:]  # the first holds warm-up
    return n / (sum(epoch_times) / len(epoch_times))


def package_loop_img_s(name: str, *, device: torch.device, batch_size: int, steps: int, compile: bool,
                       model_kwargs: Optional[Dict[str, Any]] = None) -> float:
    """Images/s of the training package's TRADES loop (bf16, channels_last) over its second and third epochs
    (:func:`trainer_img_s`)."""
    return trainer_img_s({
        'model': {'name': name, 'kwargs': dict(model_kwargs or {})},
        'objective': {'name': 'trades', 'beta': 6.0},
        'attack': {'steps': 10, 'init_std': 0.001},
        'eval': {'pgd_steps': 0, 'batch_size': 8},
        'schedule': {'name': 'constant'},
        'run': {'batch_size': batch_size, 'device': device.type, 'amp': device.type == 'cuda',
                'channels_last': device.type == 'cuda', 'compile': compile, 'progress': False},
    }, steps=steps)


def training_speed(name: str, *, device: torch.device, batch_size: int, steps: int, warmup: int, compile: bool,
                   peak_tflops: Optional[float], model_kwargs: Optional[Dict[str, Any]] = None) -> Dict[str, Any]:
    """Both loops on one model and batch size, with speed-up and fractions of the measured bf16 rate."""
    from robust_resnets.complexity import count_macs, create_for_counting

    macs = count_macs(create_for_counting(name, **(model_kwargs or {})), input_size=(3, 32, 32))
    plain = plain_loop_img_s(name, device=device, batch_size=batch_size, warmup=warmup, iters=steps,
                             model_kwargs=model_kwargs)
    ours = package_loop_img_s(name, device=device, batch_size=batch_size, steps=steps, compile=compile,
                              model_kwargs=model_kwargs)
    flops_per_image = macs * 2 * 3 * PASSES_PER_IMAGE
    row = {'model': name, 'batch_size': batch_size, 'macs': macs, 'plain_fp32_img_s': plain, 'ours_img_s': ours,
           'speedup': ours / plain, 'compile': compile}
    if peak_tflops:
        row['ours_fraction_of_bf16_peak'] = ours * flops_per_image / (peak_tflops * 1e12)
        row['plain_fraction_of_bf16_peak'] = plain * flops_per_image / (peak_tflops * 1e12)
    return row


# --- precision -----------------------------------------------------------------------------------------
class Bf16ChannelsLast(nn.Module):
    """Runs a classifier in bf16 autocast on channels_last inputs and returns float32 logits."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model.to(memory_format=torch.channels_last)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with _autocast(x.device, True):
            return self.model(x.contiguous(memory_format=torch.channels_last)).float()


def precision_check(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, *, eps: float,
                    device: torch.device, attacks: str = 'clean,pgd20,aa:apgd-ce', seed: int = 0,
                    batch_size: Optional[int] = None) -> Dict[str, Any]:
    """Accuracies of the same model on the same images in fp32 and through :class:`Bf16ChannelsLast`."""
    import copy

    from robust_resnets.evaluation import evaluate

    out: Dict[str, Any] = {'n_examples': int(images.shape[0]), 'eps': eps, 'attacks': attacks}
    for label, net in (('fp32', model), ('bf16_channels_last', Bf16ChannelsLast(copy.deepcopy(model)))):
        result = evaluate(net.eval(), images, labels, attacks=attacks, eps=eps, device=device, seed=seed,
                          batch_size=batch_size, progress=False, check_masking=False)
        out[label] = dict(result.accuracy)
    # one standard error of an accuracy p on n images, the scale of "noise"
    n = out['n_examples']
    out['standard_error'] = {k: (v * (1 - v) / n) ** 0.5 for k, v in out['fp32'].items()}
    out['difference'] = {k: out['bf16_channels_last'][k] - v for k, v in out['fp32'].items()}
    return out


# --- AutoAttack: ours vs RobustBench ------------------------------------------------------------------
def autoattack_speed(model: nn.Module, *, data_dir: str, n_examples: int, device: torch.device, eps: float = 8 / 255,
                     batch_size: Optional[int] = None, robustbench_batch_size: int = 32) -> Dict[str, Any]:
    """Seconds and accuracies of AutoAttack standard on the first ``n_examples`` CIFAR-10 test images, ours
    (fp32, automatic batch size unless ``batch_size``) and RobustBench's ``benchmark`` (its default batch 32)."""
    from robust_resnets.data.cifar import load_cifar_tensors
    from robust_resnets.evaluation import evaluate
    from robust_resnets.evaluation.robustbench_adapter import benchmark

    model = model.to(device).eval()
    images, labels = load_cifar_tensors(root=data_dir, dataset='cifar10', split='test')
    images, labels = images[:n_examples], labels[:n_examples]
    _sync(device)
    start = time.perf_counter()
    ours = evaluate(model, images, labels, attacks='clean,aa', eps=eps, device=device, batch_size=batch_size,
                    progress=False, check_masking=False)
    _sync(device)
    ours_s = time.perf_counter() - start
    start = time.perf_counter()
    rb_clean, rb_robust = benchmark(model, n_examples=n_examples, dataset='cifar10', threat_model='Linf', eps=eps,
                                    data_dir=data_dir, device=device, batch_size=robustbench_batch_size)
    _sync(device)
    rb_s = time.perf_counter() - start
    return {'n_examples': n_examples, 'eps': eps,
            'ours': {'seconds': ours_s, 'clean': ours.accuracy['clean'], 'autoattack': ours.accuracy['aa']},
            'robustbench': {'seconds': rb_s, 'clean': rb_clean, 'autoattack': rb_robust,
                            'batch_size': robustbench_batch_size},
            'speedup': rb_s / ours_s}


def _load_trained(name: str, weights: str, model_kwargs: Dict[str, Any]) -> nn.Module:
    import timm

    import robust_resnets  # noqa: F401

    return timm.create_model(name, pretrained=True, **model_kwargs, pretrained_cfg_overlay=dict(file=str(weights)))


# --- command line --------------------------------------------------------------------------------------
def _models(pattern: str) -> List[str]:
    from robust_resnets.models import list_models

    names = [m for m in list_models() if any(fnmatch.fnmatch(m, p) for p in pattern.split(','))]
    if not names:
        raise SystemExit(f"--models '{pattern}' matches no registered model; list them with `robust-resnets models`.")
    return names


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog='python -m benchmarks speed', description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest='what', required=True)
    for name in ('throughput', 'train', 'precision', 'autoattack', 'matmul'):
        p = sub.add_parser(name)
        p.add_argument('--device', default='auto', choices=('auto', 'cuda', 'cpu'))
        p.add_argument('--out', default=None, help='write the result JSON here')
        p.add_argument('--model-kwargs', default='{}', help='JSON keyword arguments for every model (tiny CPU runs)')
        if name == 'matmul':
            p.add_argument('--size', type=int, default=8192, help='side of the square bf16 matrices')
        if name == 'throughput':
            p.add_argument('--models', default='*', help='comma-separated fnmatch patterns (default: all)')
            p.add_argument('--batch-size', type=int, default=256)
            p.add_argument('--warmup', type=int, default=5)
            p.add_argument('--iters', type=int, default=20)
        if name == 'train':
            p.add_argument('--models', default='robust_resnet_a1,wrn_28_10')
            p.add_argument('--batch-sizes', default='128,512')
            p.add_argument('--steps', type=int, default=10, help='timed steps (per epoch of the package loop)')
            p.add_argument('--warmup', type=int, default=3)
            p.add_argument('--compile', action='store_true', help='torch.compile in the package loop')
            p.add_argument('--peak-tflops', type=float, default=None, help='skip measuring the bf16 rate')
        if name in ('precision', 'autoattack'):
            p.add_argument('--model', required=True, help='registered model name')
            p.add_argument('--weights', required=True, help='.safetensors of the model')
            p.add_argument('--data-dir', required=True, help='CIFAR-10 (e.g. cifar10-jpeg.tar.gz)')
            p.add_argument('--n-examples', type=int, default=1000)
            p.add_argument('--eps', type=float, default=8 / 255)
            p.add_argument('--batch-size', type=int, default=None)
        if name == 'precision':
            p.add_argument('--attacks', default='clean,pgd20,aa:apgd-ce')
    args = parser.parse_args(argv)
    device = _resolve_device(args.device)
    model_kwargs = json.loads(args.model_kwargs)
    env = environment(device)

    if args.what == 'matmul':
        result: Dict[str, Any] = {'bf16_matmul_tflops': measure_matmul_tflops(device, size=args.size),
                                  'size': args.size}
        print(f"bf16 matmul: {result['bf16_matmul_tflops']:.1f} TFLOP/s")
    elif args.what == 'throughput':
        rows = []
        print(f"{'model':28s} {'input':>9s} {'fp32 img/s':>12s} {'bf16+cl img/s':>14s}")
        for name in _models(args.models):
            row = inference_throughput(name, device=device, batch_size=args.batch_size, warmup=args.warmup,
                                       iters=args.iters, model_kwargs=model_kwargs)
            rows.append(row)
            print(f"{name:28s} {row['input_size'][-1]:>7d}px {row['fp32_img_s']:12.1f} {row['bf16_cl_img_s']:14.1f}",
                  flush=True)
        result = {'rows': rows}
    elif args.what == 'train':
        peak = args.peak_tflops
        if peak is None and device.type == 'cuda':
            peak = measure_matmul_tflops(device)
        rows = []
        for name in args.models.split(','):
            for bs in (int(b) for b in args.batch_sizes.split(',')):
                row = training_speed(name, device=device, batch_size=bs, steps=args.steps, warmup=args.warmup,
                                     compile=args.compile, peak_tflops=peak, model_kwargs=model_kwargs)
                rows.append(row)
                frac = row.get('ours_fraction_of_bf16_peak')
                print(f"{name:20s} batch {bs:4d}: plain fp32 {row['plain_fp32_img_s']:9.1f} img/s, ours "
                      f"{row['ours_img_s']:9.1f} img/s, x{row['speedup']:.2f}"
                      + (f", {100 * frac:.1f}% of the bf16 peak" if frac is not None else ''), flush=True)
        result = {'bf16_matmul_tflops': peak, 'rows': rows}
    elif args.what == 'autoattack':
        result = autoattack_speed(_load_trained(args.model, args.weights, model_kwargs), data_dir=args.data_dir,
                                  n_examples=args.n_examples, device=device, eps=args.eps, batch_size=args.batch_size)
        for who in ('ours', 'robustbench'):
            r = result[who]
            print(f"{who:12s} {r['seconds']:8.1f} s  clean {100 * r['clean']:6.2f}  AutoAttack {100 * r['autoattack']:6.2f}")
        print(f"speed-up x{result['speedup']:.2f}")
    else:
        from robust_resnets.data.cifar import load_cifar_tensors

        model = _load_trained(args.model, args.weights, model_kwargs)
        images, labels = load_cifar_tensors(root=args.data_dir, dataset='cifar10', split='test')
        result = precision_check(model, images[:args.n_examples], labels[:args.n_examples], eps=args.eps,
                                 device=device, attacks=args.attacks, batch_size=args.batch_size)
        for key in result['fp32']:
            print(f"{key:12s} fp32 {100 * result['fp32'][key]:6.2f}  bf16+cl {100 * result['bf16_channels_last'][key]:6.2f}"
                  f"  diff {100 * result['difference'][key]:+.2f}  (1 s.e. {100 * result['standard_error'][key]:.2f})")
    _write(args.out, {'environment': env, **result})
    return 0


if __name__ == '__main__':
    with contextlib.suppress(KeyboardInterrupt):
        sys.exit(main())
