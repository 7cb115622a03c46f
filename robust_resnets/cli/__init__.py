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
from typing import Callable, List, Optional

__all__ = ['main', 'build_parser', 'run_reporting_errors']

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
    return run_reporting_errors(args.func, args, prog=f'robust-resnets {args.command}')


def run_reporting_errors(func: Callable[[argparse.Namespace], Optional[int]], args: argparse.Namespace, *,
                         prog: str) -> int:
    """Runs a command; a user-facing failure prints one line naming ``prog`` (no traceback) and gives its exit code.

    Returns:
        The command's exit code; 1 after an error, 130 after Ctrl-C, 0 when the reader of a pipe stopped.
    """
    try:
        return int(func(args) or 0)
    except KeyboardInterrupt:
        print(f'{prog}: interrupted', file=sys.stderr)
        return 130
    except BrokenPipeError:  # output piped into a reader that stopped (`| head`): nothing more to say
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second error at exit
        return 0
    except (ValueError, OSError, RuntimeError) as e:
        # user-facing failures carry their own explanation: print it, not a traceback
        print(f'{prog}: error: {e}', file=sys.stderr)
        return 1
