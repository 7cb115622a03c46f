"""ImageNet validation images for robustness evaluation: RobustBench's 5,000-image subset and preprocessing.

RobustBench evaluates ImageNet models on a fixed list of 5,000 validation images (shipped here as
``imagenet_test_image_ids.txt``, in RobustBench's order), resized so that a centre crop of
``crop_pct`` covers the image (short side to ``res / crop_pct``, e.g. 256 for 224 at 0.875) and
centre-cropped to ``res``: RobustBench's ``Res256Crop224`` (bilinear, its default) or
``BicubicRes256Crop224`` (bicubic, e.g. for Singh et al.'s ConvStem models), as the model's
pretrained cfg says. Labels are the standard ImageNet-1k indices: the position of the WordNet id
in sorted order (``imagenet_wnids.txt``).
"""
from __future__ import annotations

import math
from functools import lru_cache
from importlib import resources
from pathlib import Path
from typing import Callable, List, Optional, Sequence, Tuple, Union

import torch
from PIL import Image
from torch import Tensor

from .folder import interleave_classes, is_archive, list_image_folder, read_images

__all__ = ['imagenet_subset_ids', 'imagenet_wnids', 'imagenet_transform', 'load_imagenet_tensors', 'wnid_labels']

SUBSETS = ('robustbench', 'all')


@lru_cache(maxsize=None)
def imagenet_subset_ids() -> Tuple[str, ...]:
    """RobustBench's 5,000 ImageNet validation images as ``<wnid>/<file name>``, in its evaluation order."""
    text = resources.files(__package__).joinpath('imagenet_test_image_ids.txt').read_text()
    return tuple(line.strip() for line in text.splitlines() if line.strip())


@lru_cache(maxsize=None)
def imagenet_wnids() -> Tuple[str, ...]:
    """The 1,000 ImageNet-1k WordNet ids in label order."""
    text = resources.files(__package__).joinpath('imagenet_wnids.txt').read_text()
    return tuple(line.strip() for line in text.splitlines() if line.strip())


def wnid_labels(items: Sequence[Tuple[str, str]], *, where: str) -> List[int]:
    """The ImageNet-1k label of each ``(WordNet id, image path)`` pair, e.g. from :func:`list_image_folder`.

    Raises:
        ValueError: A class folder is not an ImageNet-1k WordNet id (``where`` names the folder).
    """
    index = {w: i for i, w in enumerate(imagenet_wnids())}
    unknown = sorted({c for c, _ in items if c not in index})
    if unknown:
        raise ValueError(f'{where} has class folders that are not ImageNet-1k WordNet ids, e.g. {unknown[:3]}; '
                         f'expected one folder per class named by its WordNet id, e.g. n01440764/<image>.')
    return [index[c] for c, _ in items]


def imagenet_transform(*, resolution: int = 224, crop_pct: float = 0.875, interpolation: str = 'bilinear'
                       ) -> Callable[[Image.Image], Image.Image]:
    """PIL -> PIL preprocessing: resize the short side to ``floor(resolution / crop_pct)``, centre-crop ``resolution``.

    The defaults are RobustBench's default ImageNet preprocessing, ``Res256Crop224`` (bilinear resize to
    256, centre crop 224); ``interpolation='bicubic'`` gives its ``BicubicRes256Crop224``. timm models
    give their own ``crop_pct`` and ``interpolation`` in their pretrained cfg.

    Raises:
        ValueError: ``crop_pct`` outside (0, 1], or an unknown interpolation.
    """
    from torchvision import transforms

    if not 0 < crop_pct <= 1:
        raise ValueError(f'crop_pct must be in (0, 1], got {crop_pct}.')
    try:
        mode = transforms.InterpolationMode(interpolation)
    except ValueError:
        raise ValueError(f"Unknown interpolation '{interpolation}'; use 'bicubic', 'bilinear' or 'nearest'.") from None
    return transforms.Compose([
        transforms.Resize(int(math.floor(resolution / crop_pct)), interpolation=mode),
        transforms.CenterCrop(resolution),
    ])


def _val_root(root: Path) -> Tuple[Path, Optional[str]]:
    """(directory or archive, sub-folder holding the wnid folders)."""
    if is_archive(root):
        return root, 'val'
    if (root / 'val').is_dir():
        return root, 'val'
    return root, None


def load_imagenet_tensors(
        *,
        root: Union[str, Path],
        n_examples: Optional[int] = 5000,
        subset: str = 'robustbench',
        resolution: int = 224,
        crop_pct: float = 0.875,
        interpolation: str = 'bilinear',
        progress: bool = True,
) -> Tuple[Tensor, Tensor]:
    """Returns preprocessed ImageNet validation images as ``(uint8 N x 3 x res x res, int64 labels N)``.

    Args:
        root: ImageNet folder holding ``val/<wnid>/<image>``, the ``val`` folder itself, or a .tar(.gz)
            archive with ``val/<wnid>/<image>`` (like ``DATA/imagenet-sample-224.tar.gz``).
        n_examples: Number of images (the first ones of the subset, at most 5,000 of RobustBench's); None
            for all.
        subset: 'robustbench' for RobustBench's 5,000-image list (every listed file must exist), or 'all'
            for every image found, class-interleaved.
        resolution: Output side length.
        crop_pct: Fraction of the resized short side kept by the centre crop.
        interpolation: Resize interpolation ('bilinear': RobustBench's ``Res256Crop224``; 'bicubic': its
            ``BicubicRes256Crop224``).
        progress: Show a progress bar while decoding.

    Raises:
        FileNotFoundError: No such folder, or it lacks images of RobustBench's subset.
        ValueError: Unknown subset, ``n_examples`` out of range, class folders that are not WordNet ids, or
            an image that cannot be decoded.
    """
    if subset not in SUBSETS:
        raise ValueError(f"Unknown ImageNet subset '{subset}'; use one of {SUBSETS}.")
    if n_examples is not None and n_examples < 1:
        raise ValueError(f'n_examples must be positive, got {n_examples}.')
    n_listed = len(imagenet_subset_ids())
    if subset == 'robustbench' and n_examples is not None and n_examples > n_listed:
        raise ValueError(f"RobustBench's ImageNet subset has {n_listed} images, fewer than n_examples={n_examples}; "
                         f"ask for at most {n_listed}, or use subset='all' (--imagenet-subset all).")
    root = Path(root).expanduser()
    if not root.exists():
        raise FileNotFoundError(f'ImageNet folder {root} does not exist; pass the folder that holds val/<wnid>/.')
    source, subdir = _val_root(root)
    items = list_image_folder(source, subdir=subdir)
    labels = wnid_labels(items, where=str(root))
    if subset == 'robustbench':
        by_id = {f'{c}/{Path(p).name}': j for j, (c, p) in enumerate(items)}
        ids = imagenet_subset_ids()[:n_examples]
        missing = [i for i in ids if i not in by_id]
        if missing:
            raise FileNotFoundError(
                f'{len(missing)} of the {len(ids)} images of RobustBench\'s ImageNet subset are not in {root} '
                f'(e.g. {missing[0]}). Point root at the full ImageNet validation set, or use subset=\'all\' '
                f'(--imagenet-subset all) to evaluate on the images that are there.')
        picked = [by_id[i] for i in ids]
    else:
        picked = interleave_classes(labels)[:n_examples]
    transform = imagenet_transform(resolution=resolution, crop_pct=crop_pct, interpolation=interpolation)
    images = read_images(source, [items[j][1] for j in picked], transform=transform, progress=progress)
    return images, torch.tensor([labels[j] for j in picked], dtype=torch.int64)
