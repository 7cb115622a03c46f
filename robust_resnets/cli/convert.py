"""``robust-resnets convert``: an original checkpoint -> model.safetensors + config.json + README.md."""
from __future__ import annotations

import argparse
import json


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        'convert', help='convert an original checkpoint into a publishable safetensors folder',
        description='Open an original checkpoint safely (weights_only pickles or safetensors), map its keys with the '
                    "target family's checkpoint filter, load it strictly into the manifest entry's architecture, "
                    'and write model.safetensors, config.json and README.md into --out.')
    parser.add_argument('checkpoint', help='the original file (.pt, .pth, .pth.tar or .safetensors)')
    parser.add_argument('--to', required=True, metavar='NAME.TAG', help='manifest entry, e.g. robust_resnet_a1.cifar10_trades')
    parser.add_argument('--out', required=True, metavar='DIR', help='folder to write into (created if needed)')
    parser.add_argument('--layout', default=None, help='key layout of the original (default: detected)')
    parser.add_argument('--key', default=None, metavar='KEY',
                        help="the entry of a training state to convert, e.g. state_dict_ema of a file that also "
                             "holds the trained weights (default: the usual wrappers are unwrapped)")
    parser.add_argument('--dtype', default=None, choices=('float32', 'float16', 'bfloat16'),
                        help="storage dtype of the floating-point tensors (default: the model's float32)")
    parser.add_argument('--overwrite', action='store_true', help='replace files already in --out')
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import robust_resnets  # noqa: F401  (registers the architectures)
    from robust_resnets.weights.convert import convert_checkpoint
    from robust_resnets.weights.manifest import PACKAGED_WEIGHTS_DIR, get_weights

    result = convert_checkpoint(args.checkpoint, name=args.to, out_dir=args.out, layout=args.layout,
                                key=args.key, dtype=args.dtype, overwrite=args.overwrite)
    print(f'Wrote {result.out_dir}/model.safetensors, config.json, README.md '
          f'(layout {result.layout}; sha256 {result.sha256}; {result.size} bytes).')
    weights = get_weights(result.name)
    if 'package_file' in result.entry:
        print(f'To ship it inside the package, set this entry in {weights.source_file}:')
    else:
        print(f'After `robust-resnets publish {result.out_dir}` (to {result.entry["hf_hub"]["repo_id"]}), set '
              f'this entry in {weights.source_file} (or, to ship it inside the package, convert with --out '
              f'{PACKAGED_WEIGHTS_DIR}/{result.name}):')
    print(json.dumps({result.name: result.entry}, indent=2))
    return 0
