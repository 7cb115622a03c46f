"""``robust-resnets publish``: upload a converted folder to the Hugging Face Hub."""
from __future__ import annotations

import argparse


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        'publish', help='upload a converted folder to the Hugging Face Hub',
        description='Check a folder written by `robust-resnets convert` and upload model.safetensors, config.json and '
                    'README.md to a model repo (created if needed). Uses your Hugging Face login or HF_TOKEN.')
    parser.add_argument('folder', metavar='DIR', help='folder written by `robust-resnets convert`')
    parser.add_argument('--repo-id', default=None, metavar='ORG/NAME',
                        help="target model repo (default: the manifest entry's hf_hub.repo_id)")
    parser.add_argument('--other-repo', action='store_true',
                        help="allow a --repo-id other than the manifest's (e.g. a staging copy)")
    parser.add_argument('--dry-run', action='store_true', help='show what would be sent, send nothing')
    parser.add_argument('--private', action='store_true', help='create the repo as private')
    parser.add_argument('--message', default=None, help='commit message')
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from robust_resnets.weights.publish import publish_folder

    plan, url = publish_folder(args.folder, repo_id=args.repo_id, other_repo=args.other_repo, dry_run=args.dry_run,
                               private=args.private, commit_message=args.message)
    verb = 'Would upload' if args.dry_run else 'Uploaded'
    print(f'{verb} {plan.name} to https://huggingface.co/{plan.repo_id}:')
    for name, size in plan.files:
        print(f'  {name}  {size} bytes')
    print(f'  model.safetensors sha256 {plan.sha256}')
    if url:
        print(f'Commit: {url}')
    return 0
