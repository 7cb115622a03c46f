"""The ``robust-resnets`` command line: one module per subcommand in this package.

Each subcommand module defines ``register(subparsers) -> None``, which adds its parser and sets
``func`` (a callable taking the parsed ``argparse.Namespace`` and returning an exit code). Heavy
imports stay inside ``func`` so that ``robust-resnets --help`` is instant.
"""
from __future__ import annotations

import argparse
import importlib
import importlib.util
import os
import sys
from typing import List, Optional

__all__ = ['main', 'build_parser']

#: Subcommands, in the order ``--help`` lists them.
COMMANDS = ('models', 'eval', 'leaderboard', 'convert', 'publish', 'train')


def build_parser() -> argparse.ArgumentParser:
    from robust_resnets import __version__

    parser = argparse.ArgumentParser(
        prog='robust-resnets',
        description='Adversarially robust image classifiers for timm: list, evaluate, convert, publish, train.')
    parser.add_argument('--version', action='version', version=f'robust-resnets {__version__}')
    subparsers = parser.add_subparsers(dest='command', metavar='COMMAND')
    for name in COMMANDS:
        module_name = f'{__name__}.{name}'
        if importlib.util.find_spec(module_name) is None:
            continue
        importlib.import_module(module_name).register(subparsers)
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    """Entry point of the ``robust-resnets`` console script."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, 'func', None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print(f'robust-resnets {args.command}: interrupted', file=sys.stderr)
        return 130
    except BrokenPipeError:  # output piped into a reader that stopped (`| head`): nothing more to say
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second error at exit
        return 0
    except (ValueError, OSError, RuntimeError) as e:
        # user-facing failures carry their own explanation: print it, not a traceback
        print(f'robust-resnets {args.command}: error: {e}', file=sys.stderr)
        return 1
