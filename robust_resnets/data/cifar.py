"""CIFAR-10 and CIFAR-100 as uint8 tensors, from torchvision's files or an ImageFolder of images.

Sources, tried in this order under ``root``:

1. torchvision's files (``cifar-10-batches-py`` / ``cifar-100-python``), downloaded there when
   ``download=True`` and the network allows; canonical order.
2. An ImageFolder ``<split>/<class>/<image>`` in ``root``, in a ``<dataset>-jpeg.tar.gz`` archive in
   ``root``, or ``root`` itself being such an archive (``DATA/cifar10-jpeg.tar.gz``). Classes
   are the sorted folder names, which for CIFAR is the standard label order. Images come back
   class-interleaved (first image of every class, then the second, ...) so that the first N are
   class-balanced. Decoded once, then cached as ``.npz`` beside the source, or under
   ``~/.cache/robust_resnets/data`` when that folder is read-only.
"""
from __future__ import annotations

import hashlib
import os
import stat
from pathlib import Path
from typing import Optional, Tuple, Union

import numpy as np
import torch
from torch import Tensor

from ..files import atomic_path
from .folder import is_archive, load_image_folder

__all__ = ['CIFAR_DATASETS', 'load_cifar_tensors']

#: dataset -> (number of classes, torchvision folder name)
CIFAR_DATASETS = {'cifar10': (10, 'cifar-10-batches-py'), 'cifar100': (100, 'cifar-100-python')}
SPLITS = ('train', 'test')


def _cache_root() -> Path:
    return Path(os.environ.get('ROBUST_RESNETS_CACHE', Path.home() / '.cache' / 'robust_resnets')) / 'data'


def _writable(folder: Path) -> bool:
    """Writable by its permission bits too: a superuser may write into a folder marked read-only."""
    return os.access(folder, os.W_OK) and bool(folder.stat().st_mode & stat.S_IWUSR)


def _cache_path(source: Path, dataset: str, split: str) -> Path:
    """``<source dir>/<name>-<split>.npz`` if writable, else a per-source file in the user cache."""
    folder = source.parent if source.is_file() else source
    stem = source.name.split('.')[0] if source.is_file() else dataset
    beside = folder / f'{stem}-{split}.npz'
    if beside.exists() or _writable(folder):
        return beside
    digest = hashlib.sha1(str(source.resolve()).encode()).hexdigest()[:12]
    return _cache_root() / f'{dataset}-{split}-{digest}.npz'


def _stamp(source: Path, split: str) -> float:
    """Modification time of the archive, or of the split folder (the cache may be written beside it, in source)."""
    return (source if source.is_file() else source / split).stat().st_mtime


def _save_npz(path: Path, images: Tensor, labels: Tensor, stamp: float) -> None:
    with atomic_path(path) as tmp, open(tmp, 'wb') as f:
        np.savez(f, images=images.numpy(), labels=labels.numpy(), source_mtime=stamp)


def _load_npz(path: Path, stamp: float) -> Optional[Tuple[Tensor, Tensor]]:
    try:
        with np.load(path) as data:
            if float(data['source_mtime']) != stamp:
                return None  # the source changed since the cache was written
            return torch.from_numpy(data['images'].copy()), torch.from_numpy(data['labels'].astype(np.int64))
    except (OSError, KeyError, ValueError):
        return None


def _find_folder_source(root: Path, dataset: str, split: str) -> Optional[Path]:
    if is_archive(root):
        return root
    if (root / split).is_dir():
        return root
    for name in (f'{dataset}-jpeg.tar.gz', f'{dataset}.tar.gz', f'{dataset}-jpeg.tgz'):
        if (root / name).is_file():
            return root / name
    if (root / dataset / split).is_dir():
        return root / dataset
    return None


def load_cifar_tensors(*, root: Union[str, Path], dataset: str = 'cifar10', split: str = 'test',
                       download: bool = False) -> Tuple[Tensor, Tensor]:
    """Returns CIFAR-10/100 as ``(uint8 images N x 3 x 32 x 32, int64 labels N)``.

    Args:
        root: Folder with torchvision's CIFAR files or an ImageFolder layout ``<split>/<class>/*.jpg``, a
            folder holding ``<dataset>-jpeg.tar.gz``, or that archive itself.
        dataset: 'cifar10' or 'cifar100'.
        split: 'test' or 'train'.
        download: Let torchvision download its files into root when no source is found.

    Raises:
        FileNotFoundError: No CIFAR source under root.
        ValueError: Unknown dataset or split, or a folder whose classes or image size do not fit.
    """
    if dataset not in CIFAR_DATASETS:
        raise ValueError(f"Unknown CIFAR dataset '{dataset}'; use one of {sorted(CIFAR_DATASETS)}.")
    if split not in SPLITS:
        raise ValueError(f"Unknown split '{split}'; use 'train' or 'test'.")
    root = Path(root).expanduser()
    num_classes, tv_folder = CIFAR_DATASETS[dataset]
    if (root / tv_folder).is_dir() or (download and _find_folder_source(root, dataset, split) is None):
        return _load_torchvision(root, dataset, split, download)
    source = _find_folder_source(root, dataset, split)
    if source is None:
        raise FileNotFoundError(
            f'No {dataset} data in {root}: expected torchvision\'s {tv_folder}/ folder, an ImageFolder '
            f'{root}/{split}/<class>/*.jpg, or a {dataset}-jpeg.tar.gz archive. Point to the folder that holds one '
            f'(`robust-resnets eval --data-dir DIR`, `train --set data.root=DIR`), or download it where the network '
            f'allows (`eval --download`, `download=True`).')
    cache = _cache_path(source, dataset, split)
    stamp = _stamp(source, split)
    cached = _load_npz(cache, stamp) if cache.exists() else None
    if cached is not None:
        return cached
    images, labels, classes = load_image_folder(source, subdir=split, interleave=True, progress=True)
    if len(classes) != num_classes:
        raise ValueError(f'{source} has {len(classes)} class folders under {split}/, but {dataset} has '
                         f'{num_classes}. Check --dataset and --data-dir.')
    if tuple(images.shape[1:]) != (3, 32, 32):
        raise ValueError(f'Images in {source} are {tuple(images.shape[2:])} pixels; CIFAR images are 32 x 32.')
    _save_npz(cache, images, labels, stamp)
    return images, labels


def _load_torchvision(root: Path, dataset: str, split: str, download: bool) -> Tuple[Tensor, Tensor]:
    from torchvision.datasets import CIFAR10, CIFAR100

    cls = CIFAR10 if dataset == 'cifar10' else CIFAR100
    try:
        ds = cls(str(root), train=split == 'train', download=download)
    except RuntimeError as e:  # torchvision: "Dataset not found or corrupted"
        raise FileNotFoundError(f'torchvision could not load {dataset} from {root}: {e}') from e
    except OSError as e:  # network failure while downloading
        raise FileNotFoundError(f'Could not download {dataset} into {root} ({e}). Without network access, '
                                f'point root at a local copy (e.g. DATA/{dataset}-jpeg.tar.gz).') from e
    images = torch.from_numpy(np.ascontiguousarray(ds.data.transpose(0, 3, 1, 2)))
    return images, torch.tensor(ds.targets, dtype=torch.int64)
