"""ImageNet training data: image folders decoded by worker processes through timm's training transform.

The images of a step are those of :class:`~robust_resnets.training.data.BatchPlan`'s global batch,
and each image's augmentation (crop, flip, RandAugment, erasing) is seeded from its own seed in that
plan. Like the CIFAR path, a run therefore resumes exactly from its step counter and sees the same
global batch whatever the number of processes or data workers.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Callable, Iterator, List, Optional, Tuple

import torch
from PIL import Image
from torch import Tensor

from .config import DataConfig, EvalConfig
from .data import BatchPlan, derive_seed, holdout_split, seeded_global_rngs

__all__ = ['ImageFolderTrainingData', 'load_imagenet_training_data', 'imagenet_train_transform', 'ImageNetBatches']

_AUGMENT = 5  # stream tag for derive_seed


@dataclasses.dataclass
class ImageFolderTrainingData:
    """Training images as files, evaluation images decoded in memory.

    Attributes:
        train_paths: Image files of the training set.
        train_labels: Their labels (int64).
        eval_images: uint8 N x 3 x H x W images of the per-epoch evaluation.
        eval_labels: Their labels.
        num_classes: Number of classes.
    """

    train_paths: List[str]
    train_labels: Tensor
    eval_images: Tensor
    eval_labels: Tensor
    num_classes: int

    @property
    def n_train(self) -> int:
        return len(self.train_paths)


def load_imagenet_training_data(data_cfg: DataConfig, eval_cfg: EvalConfig) -> ImageFolderTrainingData:
    """Lists ``root/train/<wnid>/`` and decodes the evaluation images (a fixed held-out subset of the
    training images, or the first ``eval.max_examples`` class-interleaved images of ``root/val``) with
    the evaluation preprocessing (resize to ``image_size / 0.875``, centre crop)."""
    from robust_resnets.data.folder import is_archive, list_image_folder, read_images
    from robust_resnets.data.imagenet import imagenet_transform, load_imagenet_tensors, wnid_labels

    if not data_cfg.root:
        raise ValueError("data.root is not set: point it at an ImageNet folder holding train/<wnid>/ and "
                         "val/<wnid>/, e.g. --set data.root=/data/imagenet.")
    root = Path(data_cfg.root).expanduser()
    if is_archive(root):
        raise ValueError(f"data.root '{root}' is an archive; training reads images at random, so extract it first "
                         f"(tar xf {root.name}) and point data.root at the folder.")
    items = list_image_folder(root, subdir='train')
    paths = [p for _, p in items]
    labels = torch.tensor(wnid_labels(items, where=str(root / 'train')), dtype=torch.int64)
    hold, rest = holdout_split(len(paths), data_cfg, eval_cfg)
    n_eval = eval_cfg.max_examples
    if eval_cfg.split == 'test':
        if not (root / 'val').is_dir():
            raise FileNotFoundError(f"eval.split is 'test' but {root} has no val/<wnid>/ folder; add the validation "
                                    f"images there, or evaluate held-out training images with --set eval.split=holdout "
                                    f"--set data.holdout=1000.")
        eval_images, eval_labels = load_imagenet_tensors(root=root, n_examples=n_eval, subset='all',
                                                         resolution=data_cfg.image_size,
                                                         interpolation=data_cfg.interpolation, progress=False)
    else:
        hold = hold[:n_eval]
        transform = imagenet_transform(resolution=data_cfg.image_size, interpolation=data_cfg.interpolation)
        eval_images = read_images(root, [paths[i] for i in hold.tolist()], transform=transform)
        eval_labels = labels[hold]
    return ImageFolderTrainingData([paths[i] for i in rest.tolist()], labels[rest].contiguous(), eval_images,
                                   eval_labels, 1000)


def posterize_keeping_any_bits(img: Image.Image, bits_to_keep: int, **_: object) -> Image.Image:
    """RandAugment's posterize for 0 to 8 kept bits, 0 giving a black image as Pillow gave before 10.x.

    timm's increasing-magnitude posterize (``inc1``) asks for 0 bits at the top magnitude, which recent
    Pillow refuses ("bits must be between or equal to 1 and 8"); the recipes were trained with Pillow
    versions that returned a black image there.
    """
    from PIL import ImageOps

    if bits_to_keep >= 8:
        return img
    if bits_to_keep <= 0:
        return Image.new(img.mode, img.size)
    return ImageOps.posterize(img, bits_to_keep)


def _posterize_with_any_bits(transform: Callable) -> None:
    """Points the posterize operations of every RandAugment in a transform at :func:`posterize_keeping_any_bits`."""
    from timm.data.auto_augment import RandAugment, posterize

    for t in getattr(transform, 'transforms', ()):
        if isinstance(t, RandAugment):
            for op in t.ops:
                if op.aug_fn is posterize:
                    op.aug_fn = posterize_keeping_any_bits


def imagenet_train_transform(data_cfg: DataConfig) -> Callable[[Image.Image], Tensor]:
    """timm's ImageNet training transform returning [0, 1] tensors (no standardisation: models take pixels).

    Random-resized crop (``scale``, ``ratio``, ``interpolation``), horizontal flip (``flip``),
    RandAugment (``randaugment``) or colour jitter (``color_jitter``), random erasing with per-pixel
    normal noise (``random_erasing``). RandAugment's posterize accepts 0 kept bits
    (:func:`posterize_keeping_any_bits`).
    """
    from timm.data import create_transform

    transform = create_transform(
        input_size=data_cfg.image_size, is_training=True, scale=tuple(data_cfg.scale), ratio=tuple(data_cfg.ratio),
        hflip=0.5 if data_cfg.flip else 0.0, vflip=0.0, color_jitter=data_cfg.color_jitter or None,
        auto_augment=data_cfg.randaugment, interpolation=data_cfg.interpolation,
        mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0),
        re_prob=data_cfg.random_erasing, re_mode='pixel', re_count=1)
    _posterize_with_any_bits(transform)
    return transform


class _SeededImages(torch.utils.data.Dataset):
    """Indexed by ``(image index, seed)``: decodes the image and augments it with every RNG seeded."""

    def __init__(self, paths: List[str], labels: Tensor, transform: Callable[[Image.Image], Tensor]) -> None:
        self.paths, self.labels, self.transform = paths, labels, transform

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, key: Tuple[int, int]) -> Tuple[Tensor, Tensor]:
        index, seed = key
        with Image.open(self.paths[index]) as img, seeded_global_rngs(seed):  # timm's transforms use them
            x = self.transform(img.convert('RGB'))
        return x, self.labels[index]


class _StepBatches(torch.utils.data.Sampler):
    """This rank's ``(index, seed)`` lists for steps ``start .. stop - 1`` of a batch plan."""

    def __init__(self, plan: BatchPlan, start: int, stop: int, rank: int, world_size: int) -> None:
        self.plan, self.start, self.stop, self.rank, self.world_size = plan, start, stop, rank, world_size

    def __len__(self) -> int:
        return max(self.stop - self.start, 0)

    def __iter__(self) -> Iterator[List[Tuple[int, int]]]:
        for step in range(self.start, self.stop):
            batch = self.plan.step(step, rank=self.rank, world_size=self.world_size)
            yield [(int(i), derive_seed(int(s), _AUGMENT))
                   for i, s in zip(batch.real_index.tolist(), batch.attack_seeds.tolist())]


class ImageNetBatches:
    """Iterates the augmented [0, 1] image batches and labels of steps ``start .. stop - 1`` on ``device``.

    Args:
        data: The training images.
        data_cfg: Augmentation options.
        plan: The run's batch plan (no generated data).
        start: First step (the resumed step counter).
        stop: Step to stop before.
        rank: This process's rank.
        world_size: Number of processes.
        device: Where the batches go.
    """

    def __init__(self, data: ImageFolderTrainingData, data_cfg: DataConfig, *, plan: BatchPlan, start: int,
                 stop: int, rank: int = 0, world_size: int = 1, device: Optional[torch.device] = None) -> None:
        dataset = _SeededImages(data.train_paths, data.train_labels, imagenet_train_transform(data_cfg))
        self.device = device or torch.device('cpu')
        self.loader = torch.utils.data.DataLoader(
            dataset, batch_sampler=_StepBatches(plan, start, stop, rank, world_size),
            num_workers=data_cfg.workers, pin_memory=self.device.type == 'cuda',
            persistent_workers=False, generator=torch.Generator())  # its own: the items seed themselves; the global stream stays untouched

    def __iter__(self) -> Iterator[Tuple[Tensor, Tensor]]:
        for x, y in self.loader:
            yield x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)
