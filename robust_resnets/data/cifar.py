"""CIFAR-10 and CIFAR-100 as uint8 tensors, from torchvision's files or an ImageFolder of images.

Sources, tried in this order under ``root``:

1. torchvision's files (``cifar-10-batches-py`` / ``cifar-100-python``), downloaded there when
   ``download=True`` and the network allows; canonical order.
2. An ImageFolder ``<split>/<class>/<image>`` in ``root``, in a ``<dataset>-jpeg.tar.gz`` archive in
   ``root``, or ``root`` itself being such an archive (``DATA/cifar10-jpeg.tar.gz``). Class folders
   carry the dataset's class names (torchvision's, in the standard label order; ``plane``/``car`` and
   ``computer_keyboard`` are read as ``airplane``/``automobile`` and ``keyboard``) or the label
   numbers ``0``..``N-1``. Images come back class-interleaved (first image of every class, then the
   second, ...) so that the first N are class-balanced. Decoded once, then cached as ``.npz`` in
   ``$ROBUST_RESNETS_CACHE/data`` (default ``~/.cache/robust_resnets/data``), one file per source;
   the cache is rebuilt when the archive, or any image file of the folder, changes.
"""
from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from torch import Tensor

from ..files import atomic_path
from .folder import is_archive, load_image_folder

__all__ = ['CIFAR_DATASETS', 'CIFAR10_CLASSES', 'CIFAR100_CLASSES', 'load_cifar_tensors']

#: dataset -> (number of classes, torchvision folder name)
CIFAR_DATASETS = {'cifar10': (10, 'cifar-10-batches-py'), 'cifar100': (100, 'cifar-100-python')}
SPLITS = ('train', 'test')

#: The class names in label order, as torchvision (and the datasets' meta files) name them.
CIFAR10_CLASSES = ('airplane', 'automobile', 'bird', 'cat', 'deer', 'dog', 'frog', 'horse', 'ship', 'truck')
CIFAR100_CLASSES = (
    'apple', 'aquarium_fish', 'baby', 'bear', 'beaver', 'bed', 'bee', 'beetle', 'bicycle', 'bottle', 'bowl', 'boy',
    'bridge', 'bus', 'butterfly', 'camel', 'can', 'castle', 'caterpillar', 'cattle', 'chair', 'chimpanzee', 'clock',
    'cloud', 'cockroach', 'couch', 'crab', 'crocodile', 'cup', 'dinosaur', 'dolphin', 'elephant', 'flatfish',
    'forest', 'fox', 'girl', 'hamster', 'house', 'kangaroo', 'keyboard', 'lamp', 'lawn_mower', 'leopard', 'lion',
    'lizard', 'lobster', 'man', 'maple_tree', 'motorcycle', 'mountain', 'mouse', 'mushroom', 'oak_tree', 'orange',
    'orchid', 'otter', 'palm_tree', 'pear', 'pickup_truck', 'pine_tree', 'plain', 'plate', 'poppy', 'porcupine',
    'possum', 'rabbit', 'raccoon', 'ray', 'road', 'rocket', 'rose', 'sea', 'seal', 'shark', 'shrew', 'skunk',
    'skyscraper', 'snail', 'snake', 'spider', 'squirrel', 'streetcar', 'sunflower', 'sweet_pepper', 'table', 'tank',
    'telephone', 'television', 'tiger', 'tractor', 'train', 'trout', 'tulip', 'turtle', 'wardrobe', 'whale',
    'willow_tree', 'wolf', 'woman', 'worm')
_CLASSES = {'cifar10': CIFAR10_CLASSES, 'cifar100': CIFAR100_CLASSES}
#: Other spellings in circulation (PyTorch's tutorial; TensorFlow Datasets), which sort into other positions.
_ALIASES = {'cifar10': {'plane': 'airplane', 'car': 'automobile'}, 'cifar100': {'computer_keyboard': 'keyboard'}}
_CACHE_FORMAT = 2  # bump when the cached content changes (order, fields)


def _cache_root() -> Path:
    return Path(os.environ.get('ROBUST_RESNETS_CACHE', Path.home() / '.cache' / 'robust_resnets')) / 'data'


def _cache_path(source: Path, dataset: str, split: str) -> Path:
    """One cache file per (source location, dataset, split) in the user cache."""
    digest = hashlib.sha1(str(source.resolve()).encode()).hexdigest()[:12]
    return _cache_root() / f'{dataset}-{split}-{digest}.npz'


def _fingerprint(source: Path, dataset: str, split: str) -> str:
    """Changes when the archive (size, modification time) or any file of the split folder (name, size,
    modification time) changes, and with the dataset, the split and the cache format."""
    h = hashlib.sha256(f'{_CACHE_FORMAT}|{dataset}|{split}'.encode())
    if source.is_file():
        st = source.stat()
        h.update(f'|{st.st_size}|{st.st_mtime_ns}'.encode())
        return h.hexdigest()
    for class_dir in sorted(os.scandir(source / split), key=lambda e: e.name):
        if class_dir.is_dir():
            for f in sorted(os.scandir(class_dir.path), key=lambda e: e.name):
                st = f.stat()
                h.update(f'|{class_dir.name}/{f.name}|{st.st_size}|{st.st_mtime_ns}'.encode())
    return h.hexdigest()


def _save_npz(path: Path, images: Tensor, labels: Tensor, fingerprint: str) -> None:
    with atomic_path(path) as tmp, open(tmp, 'wb') as f:
        np.savez(f, images=images.numpy(), labels=labels.numpy(), fingerprint=np.array(fingerprint))


def _load_npz(path: Path, fingerprint: str) -> Optional[Tuple[Tensor, Tensor]]:
    try:
        with np.load(path) as data:
            if str(data['fingerprint']) != fingerprint:
                return None  # the source changed since the cache was written
            return torch.from_numpy(data['images'].copy()), torch.from_numpy(data['labels'].astype(np.int64))
    except (OSError, KeyError, ValueError):
        return None


def _label_order(found: Sequence[str], dataset: str, where: str) -> List[str]:
    """The class folder names in label order: the dataset's class names (or an alias) or its label numbers.

    Raises:
        ValueError: Another number of folders, or names that are neither.
    """
    names, aliases = _CLASSES[dataset], _ALIASES[dataset]
    if len(found) != len(names):
        raise ValueError(f'{where} has {len(found)} class folders, but {dataset} has {len(names)}. Check the dataset '
                         f'and its folder (eval: --dataset, --data-dir; train: data.dataset, data.root).')
    folder_of = {aliases.get(f, f): f for f in found}
    if set(folder_of) == set(names):
        return [folder_of[c] for c in names]
    if all(f.isdigit() for f in found) and sorted(int(f) for f in found) == list(range(len(names))):
        return sorted(found, key=int)
    unknown = sorted(f for f in found if aliases.get(f, f) not in names)
    raise ValueError(f'Class folders {unknown[:5]} in {where} are not {dataset} class names, so their labels are '
                     f'unknown. Name the folders as torchvision does ({", ".join(names[:3])}, ...) or by label '
                     f'number (0..{len(names) - 1}).')


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
                       download: bool = False, progress: bool = True) -> Tuple[Tensor, Tensor]:
    """Returns CIFAR-10/100 as ``(uint8 images N x 3 x 32 x 32, int64 labels N)``.

    Args:
        root: Folder with torchvision's CIFAR files or an ImageFolder layout ``<split>/<class>/*.jpg``, a
            folder holding ``<dataset>-jpeg.tar.gz``, or that archive itself.
        dataset: 'cifar10' or 'cifar100'.
        split: 'test' or 'train'.
        download: Let torchvision download its files into root when no source is found.
        progress: Show a progress bar while decoding images (not when they come from the cache).

    Raises:
        FileNotFoundError: No CIFAR source under root.
        ValueError: Unknown dataset or split; class folders that are not the dataset's classes; an empty
            class folder; an image that cannot be decoded or is not 32 x 32.
    """
    if dataset not in CIFAR_DATASETS:
        raise ValueError(f"Unknown CIFAR dataset '{dataset}'; use one of {sorted(CIFAR_DATASETS)}.")
    if split not in SPLITS:
        raise ValueError(f"Unknown split '{split}'; use 'train' or 'test'.")
    root = Path(root).expanduser()
    tv_folder = CIFAR_DATASETS[dataset][1]
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
    fingerprint = _fingerprint(source, dataset, split)
    cached = _load_npz(cache, fingerprint) if cache.exists() else None
    if cached is not None:
        return cached
    where = f'{source}' + ('' if is_archive(source) else f'/{split}')
    images, labels, _ = load_image_folder(source, subdir=split, interleave=True, progress=progress,
                                          classes=lambda found: _label_order(found, dataset, where))
    if tuple(images.shape[1:]) != (3, 32, 32):
        raise ValueError(f'Images in {where} are {tuple(images.shape[2:])} pixels; CIFAR images are 32 x 32.')
    _save_npz(cache, images, labels, fingerprint)
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
