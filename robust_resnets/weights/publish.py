"""Uploading a converted folder (model.safetensors, config.json, README.md) to the Hugging Face Hub."""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Tuple

from .convert import OUTPUT_FILES
from .hub import sha256_file

__all__ = ['PublishPlan', 'plan_upload', 'publish_folder']


@dataclass(frozen=True)
class PublishPlan:
    """What an upload would send."""

    repo_id: str
    folder: Path
    files: Tuple[Tuple[str, int], ...]  # (name, bytes)
    name: str  # the manifest entry (arch.tag) the folder was converted for
    sha256: str  # of model.safetensors


def plan_upload(folder: os.PathLike, *, repo_id: str) -> PublishPlan:
    """Checks that ``folder`` is a complete converted folder and lists what would be uploaded.

    Raises:
        FileNotFoundError: The folder or one of its files is missing.
        ValueError: The repo id is malformed, or the files disagree with each other.
    """
    folder = Path(folder)
    if '/' not in repo_id or repo_id.count('/') != 1 or not all(repo_id.split('/')):
        raise ValueError(f"--repo-id must be 'ORG/NAME', got {repo_id!r}.")
    if not folder.is_dir():
        raise FileNotFoundError(f'{folder} is not a folder; create it with `robust-resnets convert`.')
    missing = [f for f in OUTPUT_FILES if not (folder / f).is_file()]
    if missing:
        raise FileNotFoundError(f'{folder} lacks {missing}; re-run `robust-resnets convert ... --out {folder}`.')
    from safetensors import safe_open

    with safe_open(str(folder / 'model.safetensors'), framework='pt') as f:
        meta = f.metadata() or {}
    config = json.loads((folder / 'config.json').read_text(encoding='utf-8'))
    name = meta.get('name', '')
    if not name or meta.get('architecture') != config.get('architecture'):
        raise ValueError(f"{folder}: model.safetensors (architecture {meta.get('architecture')!r}) and config.json "
                         f"(architecture {config.get('architecture')!r}) do not belong together; re-run convert.")
    sha256 = sha256_file(folder / 'model.safetensors')
    if sha256 not in (folder / 'README.md').read_text(encoding='utf-8'):
        raise ValueError(f'{folder}: README.md does not carry the sha256 of model.safetensors ({sha256}); the files '
                         f'come from different conversions. Re-run convert.')
    files = tuple((f, (folder / f).stat().st_size) for f in OUTPUT_FILES)
    return PublishPlan(repo_id=repo_id, folder=folder, files=files, name=name, sha256=sha256)


def publish_folder(
        folder: os.PathLike,
        *,
        repo_id: str,
        dry_run: bool = False,
        private: bool = False,
        token: Optional[str] = None,
        commit_message: Optional[str] = None,
) -> Tuple[PublishPlan, Optional[str]]:
    """Uploads a converted folder to the model repo ``repo_id`` (created if needed).

    Returns:
        The plan and the commit URL (None for a dry run).
    """
    plan = plan_upload(folder, repo_id=repo_id)
    if dry_run:
        return plan, None
    from huggingface_hub import HfApi

    api = HfApi(token=token)
    api.create_repo(repo_id, repo_type='model', private=private, exist_ok=True)
    info = api.upload_folder(
        folder_path=str(plan.folder), repo_id=repo_id, repo_type='model',
        allow_patterns=[name for name, _ in plan.files],
        commit_message=commit_message or f'Add {plan.name} (model.safetensors sha256 {plan.sha256})',
    )
    return plan, str(getattr(info, 'commit_url', info))
