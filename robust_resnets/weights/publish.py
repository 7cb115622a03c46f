"""Uploading a converted folder (model.safetensors, config.json, README.md) to the Hugging Face Hub.

Weights whose licence is unknown are not uploaded unless asked explicitly (the authors may not allow
redistribution). An upload's commit id is what the manifest entry's ``hf_hub.revision`` pins.
"""
from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Optional, Tuple

from .convert import OUTPUT_FILES
from .hub import sha256_file
from .manifest import PretrainedWeights, is_commit_id

__all__ = ['PublishPlan', 'UploadCommit', 'plan_upload', 'publish_folder', 'pinned_hf_hub', 'entry_published_by']

_COMMIT_URL_RE = re.compile(r'/commit/([0-9a-f]{40})(?:[/?#]|$)')


@dataclass(frozen=True)
class PublishPlan:
    """What an upload would send."""

    repo_id: str
    folder: Path
    files: Tuple[Tuple[str, int], ...]  # (name, bytes)
    name: str  # the manifest entry (arch.tag) the folder was converted for
    sha256: str  # of model.safetensors
    license: str  # of the weights: the manifest entry's, else the model card's


@dataclass(frozen=True)
class UploadCommit:
    """The commit an upload made."""

    url: str
    revision: Optional[str]  # its commit id (40 hex digits), for hf_hub.revision; None where the Hub did not say


def _card_license(readme: str) -> str:
    """The licence a model card's metadata block declares ('unknown' for an 'other' licence it does not name)."""
    import yaml

    parts = readme.split('---\n', 2)
    try:
        meta = yaml.safe_load(parts[1]) if readme.startswith('---\n') and len(parts) == 3 else None
    except yaml.YAMLError:
        meta = None
    meta = meta if isinstance(meta, dict) else {}
    lic = str(meta.get('license') or 'unknown')
    return str(meta.get('license_name') or 'unknown') if lic == 'other' else lic


def plan_upload(folder: os.PathLike, *, repo_id: Optional[str] = None, other_repo: bool = False,
                allow_unknown_license: bool = False) -> PublishPlan:
    """Checks that ``folder`` is a complete converted folder and lists what would be uploaded.

    Args:
        folder: A folder written by ``robust-resnets convert``.
        repo_id: The target model repo; by default the one the folder's manifest entry downloads from.
        other_repo: Allow a ``repo_id`` other than the manifest's (e.g. a staging copy).
        allow_unknown_license: Allow weights whose licence is unknown (once the authors agreed to
            redistribution).

    Raises:
        FileNotFoundError: The folder or one of its files is missing.
        ValueError: The repo id is malformed or not the manifest's, the weights file is unreadable or not the
            one the manifest checks for, the files disagree with each other, or the licence is unknown and
            ``allow_unknown_license`` is not set.
    """
    from safetensors import SafetensorError, safe_open

    from .manifest import get_manifest

    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f'{folder} is not a folder; create it with `robust-resnets convert`.')
    missing = [f for f in OUTPUT_FILES if not (folder / f).is_file()]
    if missing:
        raise FileNotFoundError(f'{folder} lacks {missing}; re-run `robust-resnets convert ... --out {folder}`.')
    try:
        with safe_open(str(folder / 'model.safetensors'), framework='pt') as f:
            meta = f.metadata() or {}
    except SafetensorError as e:
        raise ValueError(f'{folder / "model.safetensors"} is not a readable safetensors file ({e}); it is incomplete '
                         f'or damaged. Re-run `robust-resnets convert ... --out {folder} --overwrite`.') from e
    config = json.loads((folder / 'config.json').read_text(encoding='utf-8'))
    name = meta.get('name', '')
    if not name or meta.get('architecture') != config.get('architecture'):
        raise ValueError(f"{folder}: model.safetensors (architecture {meta.get('architecture')!r}) and config.json "
                         f"(architecture {config.get('architecture')!r}) do not belong together; re-run convert.")
    sha256 = sha256_file(folder / 'model.safetensors')
    readme = (folder / 'README.md').read_text(encoding='utf-8')
    if sha256 not in readme:
        raise ValueError(f'{folder}: README.md does not carry the sha256 of model.safetensors ({sha256}); the files '
                         f'come from different conversions. Re-run convert.')
    weights = get_manifest().get(name)
    lic = weights.license if weights is not None else _card_license(readme)
    if lic == 'unknown' and not allow_unknown_license:
        where = f'its manifest entry in {weights.source_file}' if weights is not None else f'{folder}/README.md'
        notes = f' ({weights.notes})' if weights is not None and weights.notes else ''
        raise ValueError(f"{name}: the licence of these weights is unknown ({where}){notes}, so uploading them may "
                         f"break the authors' terms. Ask the authors first; then set the entry's license and "
                         f're-convert, or, with their permission, pass --allow-unknown-license '
                         f'(allow_unknown_license=True).')
    expected = weights.hf_hub_id if weights is not None else None
    if repo_id is None:
        if expected is None:
            raise ValueError(f'{name} is not in the weights manifest, so it names no repo; pass --repo-id ORG/NAME.')
        repo_id = expected
    if repo_id.count('/') != 1 or not all(repo_id.split('/')):
        raise ValueError(f"--repo-id must be 'ORG/NAME', got {repo_id!r}.")
    if expected is not None and not other_repo:
        if repo_id != expected:
            raise ValueError(f"{name} downloads from {expected} (its manifest entry's hf_hub.repo_id), so "
                             f"timm.create_model('{name}', pretrained=True) would not find an upload to {repo_id}. "
                             f'Leave out --repo-id to upload to {expected}, or pass --other-repo to upload a copy '
                             f'elsewhere on purpose.')
        if weights.sha256 and weights.sha256 != sha256:
            raise ValueError(f"{name}'s manifest entry expects sha256 {weights.sha256}, but this model.safetensors has "
                             f'{sha256}: loading it would fail the checksum. Paste the entry that convert printed into '
                             f'{weights.source_file} first, or pass --other-repo to upload a copy elsewhere.')
    files = tuple((f, (folder / f).stat().st_size) for f in OUTPUT_FILES)
    return PublishPlan(repo_id=repo_id, folder=folder, files=files, name=name, sha256=sha256, license=lic)


def _commit_of(info: Any) -> UploadCommit:
    """The URL and commit id of what ``upload_folder`` returned (a ``CommitInfo``; older versions: its URL)."""
    url = str(getattr(info, 'commit_url', info))
    oid = getattr(info, 'oid', None)
    if not is_commit_id(oid):
        found = _COMMIT_URL_RE.search(url)
        oid = found.group(1) if found else None
    return UploadCommit(url=url, revision=oid)


def entry_published_by(plan: PublishPlan) -> Optional[PretrainedWeights]:
    """The manifest entry the plan uploads for, when it uploads to that entry's own repo (None for a copy elsewhere,
    whose upload the entry does not point to)."""
    from .manifest import get_manifest

    weights = get_manifest().get(plan.name)
    return weights if weights is not None and weights.hf_hub_id == plan.repo_id else None


def pinned_hf_hub(plan: PublishPlan, commit: UploadCommit) -> Optional[Dict[str, str]]:
    """The ``hf_hub`` block that pins the plan's manifest entry to ``commit``; None where the upload went to
    another repo than the entry's (or its commit id is unknown)."""
    weights = entry_published_by(plan)
    if weights is None or commit.revision is None:
        return None
    return {'repo_id': weights.hf_hub_id, 'filename': weights.hf_filename, 'revision': commit.revision}


def publish_folder(
        folder: os.PathLike,
        *,
        repo_id: Optional[str] = None,
        other_repo: bool = False,
        dry_run: bool = False,
        private: bool = False,
        token: Optional[str] = None,
        commit_message: Optional[str] = None,
        allow_unknown_license: bool = False,
) -> Tuple[PublishPlan, Optional[UploadCommit]]:
    """Uploads a converted folder to the model repo ``repo_id`` (created if needed).

    Args:
        folder: A folder written by ``robust-resnets convert``.
        repo_id: The target model repo; by default the one the folder's manifest entry downloads from.
        other_repo: Allow a ``repo_id`` other than the manifest's (e.g. a staging copy).
        dry_run: Check and list only; send nothing.
        private: Create the repo as private.
        token: A Hugging Face token (default: the login or ``HF_TOKEN``).
        commit_message: The commit message (default names the entry and the file's sha256).
        allow_unknown_license: Upload weights whose licence is unknown (once the authors agreed).

    Returns:
        The plan and the commit made (None for a dry run); the commit's ``revision`` is what the manifest
        entry's ``hf_hub.revision`` pins (:func:`pinned_hf_hub`).

    Raises:
        See :func:`plan_upload`.
    """
    plan = plan_upload(folder, repo_id=repo_id, other_repo=other_repo, allow_unknown_license=allow_unknown_license)
    if dry_run:
        return plan, None
    from huggingface_hub import HfApi

    api = HfApi(token=token)
    api.create_repo(plan.repo_id, repo_type='model', private=private, exist_ok=True)
    info = api.upload_folder(
        folder_path=str(plan.folder), repo_id=plan.repo_id, repo_type='model',
        allow_patterns=[name for name, _ in plan.files],
        commit_message=commit_message or f'Add {plan.name} (model.safetensors sha256 {plan.sha256})',
    )
    return plan, _commit_of(info)
