"""``robust-resnets train``: run an adversarial-training recipe into a run directory.

Single process::

    robust-resnets train --config rrn_a1_trades --set data.root=DATA/cifar10-jpeg.tar.gz --out runs/a1

Many GPUs or nodes (DDP)::

    torchrun --nproc_per_node=8 -m robust_resnets.train --config rrn_a1_trades --out runs/a1
"""
from __future__ import annotations

import argparse
import sys
from typing import Optional

__all__ = ['register', 'add_arguments', 'run']


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Adds the training options to ``parser`` (shared by the CLI and ``python -m robust_resnets.train``)."""
    parser.add_argument('--config', metavar='CONFIG',
                        help='Recipe: a YAML file or the name of a shipped recipe (see --list). Optional with '
                             '--resume, which reuses the run\'s train_config.yaml.')
    parser.add_argument('--set', dest='overrides', action='append', default=[], metavar='KEY=VALUE',
                        help='Override a config value, e.g. --set optim.lr=0.05 --set run.epochs=10 (repeatable).')
    parser.add_argument('--out', metavar='RUN_DIR', help='Run directory (checkpoints, metrics, final weights).')
    parser.add_argument('--resume', action='store_true', help='Continue the run in RUN_DIR from its last.pt.')
    parser.add_argument('--list', action='store_true', help='List the shipped recipes, each with its description, and exit.')


def run(args: argparse.Namespace) -> int:
    """Loads the config and trains; returns the exit code."""
    import os
    from pathlib import Path

    from robust_resnets.training.config import list_builtin_configs, load_config

    if args.list:
        names = list_builtin_configs()
        width = max(map(len, names), default=0)
        print('\n'.join(f'{name:{width}s}  {load_config(name).description}'.rstrip() for name in names))
        return 0
    if not args.out:
        raise ValueError('--out RUN_DIR is required: the directory that receives checkpoints, metrics and weights.')
    config = args.config
    if config is None:
        if not args.resume:
            raise ValueError('--config is required (a YAML file or a shipped recipe name; see --list).')
        config = Path(args.out) / 'train_config.yaml'
        if not config.is_file():
            raise FileNotFoundError(f"Nothing to resume in '{args.out}': it has no train_config.yaml.")
    cfg = load_config(config, overrides=args.overrides)

    from robust_resnets.training.trainer import TrainingInterrupted, train

    try:
        summary = train(cfg, args.out, resume=args.resume)
    except FileExistsError as e:
        raise ValueError(str(e)) from None
    except KeyboardInterrupt as e:
        if int(os.environ.get('RANK', '0')) == 0 and (Path(args.out) / 'train_config.yaml').is_file():
            if isinstance(e, TrainingInterrupted):
                kept = f'goes on from step {e.step}, saved when Ctrl-C stopped it'
            elif (Path(args.out) / 'last.pt').is_file():
                step = _checkpoint_step(Path(args.out) / 'last.pt')
                kept = f"goes on from its last checkpoint{f' (step {step})' if step is not None else ''}"
            else:
                kept = 'starts again: no checkpoint was written yet'
            print(f'robust-resnets train: the run {kept}; continue it with: robust-resnets train --out {args.out} '
                  f'--resume', file=sys.stderr)
        raise
    if int(os.environ.get('RANK', '0')) != 0:  # under torchrun, one report
        return 0
    metrics = ' '.join(f'{k}={v:.4f}' for k, v in summary.items() if isinstance(v, float) and k != 'epoch')
    print(f"{summary['status']} at step {summary['step']} (epoch {summary['epoch']:g}) {metrics}".rstrip())
    if summary['status'] == 'stopped':
        print(f'resume with: robust-resnets train --out {args.out} --resume')
    return 0


def _checkpoint_step(path) -> Optional[int]:
    """The step a training checkpoint holds (None when it cannot be read)."""
    import torch

    try:  # memory-mapped: the tensors stay on disk
        return int(torch.load(path, map_location='cpu', mmap=True, weights_only=False)['step'])
    except Exception:  # noqa: BLE001  (a half-written or foreign file: the message goes without the step)
        return None


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        'train', help='Adversarially train a model from a recipe (PGD-AT, TRADES, MART, SCORE).',
        description='Adversarially train a model from a YAML recipe. Under torchrun, use '
                    '`torchrun --nproc_per_node=N -m robust_resnets.train ...` with the same options.')
    add_arguments(parser)
    parser.set_defaults(func=run)
