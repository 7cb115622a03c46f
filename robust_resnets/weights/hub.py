"""Finding a manifest entry's file (shipped in the package, or through the Hugging Face cache) and checking it.

Environment variables are read when a download happens (not when huggingface_hub was imported), so
``HF_HUB_OFFLINE``, ``HF_HUB_CACHE`` and ``HF_ENDPOINT`` set later in the process still apply.
"""
from __future__ import annotations

import hashlib
import os
import re
from pathlib import Path
from typing import Optional, Union

from .manifest import PretrainedWeights

__all__ = ['ChecksumError', 'sha256_file', 'verify_file', 'download_weights', 'packaged_weights_file',
           'hub_offline', 'download_command']

_TRUE = {'1', 'on', 'yes', 'true'}


class ChecksumError(RuntimeError):
    """A downloaded or cached file whose sha256 or size differs from the manifest."""


def hub_offline() -> bool:
    """Whether ``HF_HUB_OFFLINE`` (or ``TRANSFORMERS_OFFLINE``) asks for cache-only access."""
    return any(os.environ.get(k, '').strip().lower() in _TRUE for k in ('HF_HUB_OFFLINE', 'TRANSFORMERS_OFFLINE'))


def download_command(weights: PretrainedWeights) -> str:
    """The shell command that puts an entry's file into the Hugging Face cache, for the installed
    huggingface_hub: ``hf download`` (0.34 and newer) or ``huggingface-cli download`` (older)."""
    import huggingface_hub

    version = re.match(r'(\d+)\.(\d+)', huggingface_hub.__version__)
    new_cli = version is None or (int(version.group(1)), int(version.group(2))) >= (0, 34)
    revision = f' --revision {weights.hf_revision}' if weights.hf_revision else ''
    return (f"{'hf' if new_cli else 'huggingface-cli'} download {weights.hf_hub_id} {weights.hf_filename}"
            f'{revision}')


def sha256_file(path: Union[str, os.PathLike], chunk_size: int = 1 << 20) -> str:
    """Hex sha256 of a file."""
    digest = hashlib.sha256()
    with open(path, 'rb') as f:
        for chunk in iter(lambda: f.read(chunk_size), b''):
            digest.update(chunk)
    return digest.hexdigest()


def verify_file(path: Union[str, os.PathLike], *, sha256: str, size: Optional[int] = None) -> None:
    """Raises :class:`ChecksumError` when the file's size or sha256 differs from the expected ones."""
    path = Path(path)
    actual_size = path.stat().st_size
    if size is not None and actual_size != size:
        raise ChecksumError(f'{path} has {actual_size} bytes but the manifest says {size} (truncated or wrong file).')
    actual = sha256_file(path)
    if actual != sha256:
        raise ChecksumError(f'{path} has sha256 {actual} but the manifest says {sha256} (corrupted or replaced file).')


def _remove_cached(path: Path) -> None:
    """Deletes a cached Hub file: the snapshot link and the blob it points to."""
    target = path.resolve()
    for p in (path, target):
        try:
            p.unlink()
        except FileNotFoundError:
            pass


def _remove_incomplete(cache_dir: Optional[str], repo_id: str) -> None:
    """Deletes partial downloads of a repo (``blobs/*.incomplete``) that a failed download left."""
    from huggingface_hub import constants

    root = Path(cache_dir or os.environ.get('HF_HUB_CACHE') or constants.HF_HUB_CACHE)
    blobs = root / f"models--{repo_id.replace('/', '--')}" / 'blobs'
    if blobs.is_dir():
        for p in blobs.glob('*.incomplete'):
            p.unlink(missing_ok=True)


def download_weights(weights: PretrainedWeights, *, cache_dir: Optional[Union[str, os.PathLike]] = None) -> Path:
    """Returns the local path of a published entry's file, downloaded into (or found in) the HF cache.

    The file comes from the entry's pinned ``hf_hub.revision`` where it has one, else from the repo's main
    branch. It is checked against the manifest's sha256 and size; a mismatching file is deleted from the
    cache and :class:`ChecksumError` raised. Offline (``HF_HUB_OFFLINE=1``) only the cache is used.

    Raises:
        RuntimeError: The file is not published, not cached while offline, or the download failed.
        ChecksumError: The file differs from the manifest.
    """
    if not weights.published or weights.sha256 is None:
        raise RuntimeError(f'{weights.name} is not published yet; there is nothing to download.')
    from huggingface_hub import hf_hub_download
    from huggingface_hub.utils import LocalEntryNotFoundError

    cache_dir = str(cache_dir) if cache_dir is not None else os.environ.get('HF_HUB_CACHE') or None
    offline = hub_offline()
    kwargs = dict(repo_id=weights.hf_hub_id, filename=weights.hf_filename, revision=weights.hf_revision,
                  cache_dir=cache_dir, local_files_only=offline)
    if os.environ.get('HF_ENDPOINT'):
        kwargs['endpoint'] = os.environ['HF_ENDPOINT'].rstrip('/')
    try:
        path = Path(hf_hub_download(**kwargs))
    except LocalEntryNotFoundError as e:
        from huggingface_hub import constants

        where = f'the Hugging Face cache {cache_dir or constants.HF_HUB_CACHE}'
        at = f' (revision {weights.hf_revision})' if weights.hf_revision else ''
        if offline:
            raise RuntimeError(
                f'{weights.name}: HF_HUB_OFFLINE is set and {weights.hf_hub_id}/{weights.hf_filename}{at} is not '
                f'in {where}. Download it once online (unset HF_HUB_OFFLINE, or run `{download_command(weights)}`), '
                f"or pass a local copy with pretrained_cfg_overlay=dict(file='/path/to/{weights.hf_filename}').") \
                from e
        _remove_incomplete(cache_dir, weights.hf_hub_id)
        raise RuntimeError(f'{weights.name}: could not download {weights.hf_hub_id}/{weights.hf_filename} '
                           f'({e}). Check the network (HF_ENDPOINT={os.environ.get("HF_ENDPOINT", "default")}), '
                           f'or pass a local copy with pretrained_cfg_overlay=dict(file=...).') from e
    except Exception as e:  # network, HTTP and consistency errors of huggingface_hub
        _remove_incomplete(cache_dir, weights.hf_hub_id)
        raise RuntimeError(f'{weights.name}: downloading {weights.hf_hub_id}/{weights.hf_filename} failed '
                           f'({type(e).__name__}: {e}); nothing was kept. Retry, or pass a local copy with '
                           f'pretrained_cfg_overlay=dict(file=...).') from e
    try:
        verify_file(path, sha256=weights.sha256, size=weights.size)
    except ChecksumError as e:
        _remove_cached(path)
        raise ChecksumError(f'{weights.name}: {e} The file was deleted from the cache and not loaded; download it '
                            f'again, and if it still differs report it (the Hub copy or the manifest is wrong).') \
            from None
    return path


def packaged_weights_file(weights: PretrainedWeights) -> Path:
    """Returns the path of an entry's weights file shipped inside the package, checked against the manifest.

    Raises:
        RuntimeError: The entry has no packaged file, or this installation lacks it.
        ChecksumError: The file differs from the manifest (it is left in place and not loaded).
    """
    path = weights.packaged_path
    if path is None:
        raise RuntimeError(f'{weights.name} is not shipped inside the package (its manifest entry has no package_file).')
    if not path.is_file():
        raise RuntimeError(f'{weights.name}: the package should hold {path} but this installation lacks it. Reinstall '
                           f'robust-resnets (pip install --force-reinstall robust-resnets), or in a checkout restore '
                           f'it with `git checkout -- {weights.package_file}` under robust_resnets/weights/packaged/.')
    try:
        verify_file(path, sha256=weights.sha256, size=weights.size)
    except ChecksumError as e:
        raise ChecksumError(f'{weights.name}: {e} It was not loaded. Reinstall robust-resnets to restore the shipped '
                            f'file; if you replaced it on purpose, load yours with '
                            f"pretrained_cfg_overlay=dict(file='{path}').") from None
    return path
