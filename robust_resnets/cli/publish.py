"""``robust-resnets publish``: upload a converted folder to the Hugging Face Hub."""
from __future__ import annotations

import argparse
import json


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        'publish', help='upload a converted folder to the Hugging Face Hub',
        description='Check a folder written by `robust-resnets convert` and upload model.safetensors, config.json and '
                    'README.md to a model repo (created if needed). Uses your Hugging Face login or HF_TOKEN. '
                    "Prints the entry's hf_hub block with the upload's commit as its revision, to paste into the "
                    'manifest.')
    parser.add_argument('folder', metavar='DIR', help='folder written by `robust-resnets convert`')
    parser.add_argument('--repo-id', default=None, metavar='ORG/NAME',
                        help="target model repo (default: the manifest entry's hf_hub.repo_id)")
    parser.add_argument('--other-repo', action='store_true',
                        help="allow a --repo-id other than the manifest's (e.g. a staging copy)")
    parser.add_argument('--dry-run', action='store_true', help='show what would be sent, send nothing')
    parser.add_argument('--private', action='store_true', help='create the repo as private')
    parser.add_argument('--message', default=None, help='commit message')
    parser.add_argument('--allow-unknown-license', action='store_true',
                        help='upload weights whose licence is unknown (only once the authors agreed to '
                             'redistribution)')
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from robust_resnets.weights.publish import entry_published_by, pinned_hf_hub, publish_folder

    plan, commit = publish_folder(args.folder, repo_id=args.repo_id, other_repo=args.other_repo,
                                  dry_run=args.dry_run, private=args.private, commit_message=args.message,
                                  allow_unknown_license=args.allow_unknown_license)
    verb = 'Would upload' if args.dry_run else 'Uploaded'
    print(f'{verb} {plan.name} to https://huggingface.co/{plan.repo_id}:')
    for name, size in plan.files:
        print(f'  {name}  {size} bytes')
    print(f'  model.safetensors sha256 {plan.sha256}')
    if commit is None:
        return 0
    print(f'Commit: {commit.url}')
    weights = entry_published_by(plan)
    if weights is None:  # a copy elsewhere: the manifest keeps its pin
        return 0
    pinned = pinned_hf_hub(plan, commit)
    if pinned is None:
        print(f'Pin the download to this upload: find its commit id at {commit.url} and set "hf_hub": '
              f'{{"revision": "<commit id>"}} of {plan.name} in {weights.source_file}.')
    else:
        print(f'Pin the download to this upload: set "hf_hub" of {plan.name} in {weights.source_file} to')
        print(json.dumps(pinned, indent=2))
    return 0
