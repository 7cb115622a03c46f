"""``robust-resnets models``: the registered architectures with parameters and MACs at their native input size."""
from __future__ import annotations

import argparse
import json
import sys


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        'models', help='list the registered architectures with #params and MACs',
        description='List the architectures robust-resnets registers with timm, with parameter count and MACs '
                    '(torchprofile convention, eval mode, one image at the native input size). Models are built '
                    'on the meta device, so nothing is allocated.')
    parser.add_argument('pattern', nargs='?', default='*', help="fnmatch filter, e.g. 'robust_resnet*' (default: all)")
    parser.add_argument('--json', action='store_true', help='print JSON for machines instead of a table')
    parser.add_argument('--no-macs', action='store_true', help='skip MAC counting (faster)')
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from robust_resnets.complexity import count_macs, count_params, create_for_counting
    from robust_resnets.models import list_models

    names = list_models(args.pattern)
    if not names:
        raise ValueError(f"no registered model matches '{args.pattern}'; run 'robust-resnets models' to see them all")
    rows = []
    for name in names:
        model = create_for_counting(name)
        size = tuple(model.pretrained_cfg.get('input_size', (3, 224, 224)))
        rows.append({'model': name, 'params': count_params(model),
                     'macs': None if args.no_macs else count_macs(model, input_size=size),
                     'input_size': list(size), 'num_classes': model.num_classes,
                     'paper': model.pretrained_cfg.get('paper_ids')})
    if args.json:
        json.dump(rows, sys.stdout, indent=1)
        print()
        return 0
    print(f"{'model':28s} {'params':>10s} {'MACs':>10s}  {'input':>11s}  paper")
    for r in rows:
        macs = '-' if r['macs'] is None else f"{r['macs'] / 1e9:.3f}G"
        size = 'x'.join(str(s) for s in r['input_size'])
        print(f"{r['model']:28s} {r['params'] / 1e6:9.2f}M {macs:>10s}  {size:>11s}  {r['paper'] or ''}")
    return 0
