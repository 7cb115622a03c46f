"""DDP entry point: ``torchrun --nproc_per_node=N -m robust_resnets.train --config CONFIG --out RUN_DIR``.

Takes the options of ``robust-resnets train``; each process trains its share of every global
batch (NCCL on GPUs, gloo on CPUs). Multi-node runs use torchrun's ``--nnodes``/``--rdzv-*`` options.
"""
from __future__ import annotations

import argparse
import sys
from typing import List, Optional


def main(argv: Optional[List[str]] = None) -> int:
    from robust_resnets.cli import run_reporting_errors
    from robust_resnets.cli.train import add_arguments, run

    parser = argparse.ArgumentParser(prog='python -m robust_resnets.train', description=__doc__.split('\n')[0])
    add_arguments(parser)
    args = parser.parse_args(argv)
    return run_reporting_errors(run, args, prog='robust_resnets.train')


if __name__ == '__main__':
    sys.exit(main())
