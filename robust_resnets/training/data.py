"""Training data for adversarial training: in-memory CIFAR tensors, the per-step batch plan and GPU augmentation.

Every random choice of a training step (which images, which generated images, crops, flips,
rotations, attack starts) is a function of ``(seed, step)`` alone. A run therefore resumes
exactly from its step counter, and a DDP run sees the same global batch as a single process:
each rank takes its contiguous slice of the globally planned batch. (Mixup/CutMix then mix within
each process's slice, with draws of ``(seed, step, rank)``: mixed runs still resume exactly, but
depend on the number of processes.)
"""
from __future__ import annotations

import contextlib
import dataclasses
import math
import pickle
import random
from pathlib import Path
from typing import Dict, Iterator, Optional, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from .config import DataConfig, EvalConfig

__all__ = ['TrainingData', 'BatchPlan', 'StepBatch', 'load_training_data', 'load_generated', 'holdout_split',
           'augment', 'gather_batch', 'derive_seed', 'seeded_global_rngs']

# stream tags for derive_seed
_PERM, _STEP, _HOLDOUT, _EVAL = 1, 2, 3, 4


def derive_seed(*parts: int) -> int:
    """A well-mixed 63-bit seed from integers (numpy's SeedSequence)."""
    lo, hi = np.random.SeedSequence([int(p) for p in parts]).generate_state(2)
    return int((int(hi) << 31) ^ int(lo)) & ((1 << 63) - 1)


@contextlib.contextmanager
def seeded_global_rngs(seed: int) -> Iterator[None]:
    """Seeds python's ``random``, numpy's and torch's CPU generators for a block, restoring them after.

    For library code that draws from the global generators (timm's transforms and ``Mixup``): its draws
    become a function of ``seed`` without disturbing the caller's random streams.
    """
    py_state, np_state = random.getstate(), np.random.get_state()
    try:
        with torch.random.fork_rng(devices=[]):
            random.seed(seed)
            np.random.seed(seed % (1 << 32))
            torch.default_generator.manual_seed(seed)  # the CPU generator only (torch.manual_seed seeds CUDA too)
            yield
    finally:
        random.setstate(py_state)
        np.random.set_state(np_state)


def _generator(*parts: int) -> torch.Generator:
    return torch.Generator().manual_seed(derive_seed(*parts))


@dataclasses.dataclass
class TrainingData:
    """Images as uint8 N x 3 x H x W tensors and int64 labels.

    Attributes:
        train_images: Training images.
        train_labels: Training labels.
        eval_images: Images of the per-epoch evaluation (held-out split or test set).
        eval_labels: Their labels.
        num_classes: Number of classes.
        generated_images: Extra (e.g. DDPM-generated) images, N x H x W x 3 uint8 (channels last, as stored).
        generated_labels: Their labels.
    """

    train_images: Tensor
    train_labels: Tensor
    eval_images: Tensor
    eval_labels: Tensor
    num_classes: int
    generated_images: Optional[Tensor] = None
    generated_labels: Optional[Tensor] = None

    def __post_init__(self) -> None:
        for name in ('train', 'eval'):
            images, labels = getattr(self, f'{name}_images'), getattr(self, f'{name}_labels')
            if images.dtype != torch.uint8 or images.dim() != 4 or images.shape[1] != 3:
                raise ValueError(f'{name}_images must be uint8 N x 3 x H x W, got {images.dtype} {tuple(images.shape)}.')
            if labels.shape != (images.shape[0],):
                raise ValueError(f'{name}_labels must have one label per image ({images.shape[0]}), '
                                 f'got shape {tuple(labels.shape)}.')
        if (self.generated_images is None) != (self.generated_labels is None):
            raise ValueError('Give both generated_images and generated_labels, or neither.')
        if self.generated_images is not None:
            g = self.generated_images
            if g.dtype != torch.uint8 or g.dim() != 4 or g.shape[3] != 3:
                raise ValueError(f'generated_images must be uint8 N x H x W x 3, got {g.dtype} {tuple(g.shape)}.')
            if g.shape[1:3] != self.train_images.shape[2:]:
                raise ValueError(f'generated images are {tuple(g.shape[1:3])} but training images are '
                                 f'{tuple(self.train_images.shape[2:])}.')


def load_generated(path: str | Path) -> Tuple[Tensor, Tensor]:
    """Loads extra training images: a ``.npz`` with ``image`` (N x H x W x 3 uint8) and ``label``, or the
    pseudo-labelled TI ``.pickle`` of Carmon et al. (``data``, ``extrapolated_targets``)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"Generated-data file '{path}' does not exist. Point data.generated at a .npz with "
                                f"'image' (N x 32 x 32 x 3 uint8) and 'label' arrays, e.g. the 1M DDPM cifar10_ddpm.npz.")
    if path.suffix == '.npz':
        with np.load(path) as f:
            missing = {'image', 'label'} - set(f.files)
            if missing:
                raise ValueError(f"'{path}' lacks the arrays {sorted(missing)} (has {sorted(f.files)}); a generated-data "
                                 f".npz needs 'image' (N x H x W x 3 uint8) and 'label' (N).")
            images, labels = f['image'], f['label']
    elif path.suffix in ('.pickle', '.pkl'):
        with path.open('rb') as f:
            obj = pickle.load(f)  # the user's own data file, as distributed by Carmon et al.
        images, labels = obj['data'], obj['extrapolated_targets']
    else:
        raise ValueError(f"Generated-data file '{path}' must be a .npz (image, label) or a .pickle (data, "
                         f"extrapolated_targets).")
    images = np.asarray(images)
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3:
        raise ValueError(f"'{path}': images must be uint8 N x H x W x 3, got {images.dtype} {images.shape}.")
    labels = np.asarray(labels)
    if labels.shape != (images.shape[0],) or not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f"'{path}': labels must be {images.shape[0]} integers, one per image, got {labels.dtype} "
                         f"{labels.shape}.")
    return torch.from_numpy(images), torch.from_numpy(labels.astype(np.int64))


def holdout_split(n: int, data_cfg: DataConfig, eval_cfg: EvalConfig) -> Tuple[Tensor, Tensor]:
    """``(held-out indices, training indices)`` of ``n`` training images: ``data.holdout`` of them, a fixed
    random subset independent of the run's seed, and at most ``data.train_subset`` of the rest.

    Raises:
        ValueError: ``eval.split`` is 'holdout' but ``data.holdout`` is 0.
    """
    if eval_cfg.split == 'holdout' and data_cfg.holdout == 0:
        raise ValueError("eval.split is 'holdout' but data.holdout is 0; hold out some training images "
                         "(e.g. --set data.holdout=1000) or use --set eval.split=test.")
    perm = torch.randperm(n, generator=_generator(_HOLDOUT))
    hold, rest = perm[:data_cfg.holdout], perm[data_cfg.holdout:]
    return hold, rest if data_cfg.train_subset is None else rest[:data_cfg.train_subset]


def load_training_data(data_cfg: DataConfig, eval_cfg: EvalConfig, *, progress: bool = False) -> TrainingData:
    """Loads CIFAR as tensors, holds out ``data.holdout`` training images (a fixed random subset) and
    loads the generated data, as the config says; ``progress`` shows a bar while images are decoded."""
    from robust_resnets.data.cifar import CIFAR_DATASETS, load_cifar_tensors

    if not data_cfg.root:
        raise ValueError("data.root is not set: point it at CIFAR, e.g. --set data.root=DATA/"
                         "cifar10-jpeg.tar.gz (or a folder with torchvision's CIFAR files).")
    images, labels = load_cifar_tensors(root=data_cfg.root, dataset=data_cfg.dataset, split='train',
                                        progress=progress)
    hold, rest = holdout_split(images.shape[0], data_cfg, eval_cfg)
    if eval_cfg.split == 'test':
        eval_images, eval_labels = load_cifar_tensors(root=data_cfg.root, dataset=data_cfg.dataset, split='test',
                                                      progress=progress)
    else:
        eval_images, eval_labels = images[hold], labels[hold]
    generated = load_generated(data_cfg.generated) if data_cfg.generated else (None, None)
    num_classes = CIFAR_DATASETS[data_cfg.dataset][0]
    if generated[0] is not None:
        size = tuple(generated[0].shape[1:3])
        if size != tuple(images.shape[2:]):
            raise ValueError(f"'{data_cfg.generated}': its images are {size} pixels, the {data_cfg.dataset} training "
                             f"images {tuple(images.shape[2:])}. Check data.generated.")
        if not bool(((generated[1] >= 0) & (generated[1] < num_classes)).all()):
            raise ValueError(f"'{data_cfg.generated}': its labels are not all in 0..{num_classes - 1}, the classes of "
                             f"{data_cfg.dataset}. Check data.generated and data.dataset.")
    return TrainingData(images[rest].contiguous(), labels[rest].contiguous(), eval_images, eval_labels,
                        num_classes, *generated)


@dataclasses.dataclass
class StepBatch:
    """One rank's share of a step's global batch: which images to take and how to augment them."""

    real_index: Tensor        # indices into the training set (may be empty)
    real_slots: Tensor        # their positions in this rank's batch
    generated_index: Tensor   # indices into the generated set (may be empty)
    generated_slots: Tensor
    crop_offsets: Tensor      # (n, 2) top/left offsets into the padded image
    flips: Tensor             # (n,) bool
    angles: Tensor            # (n,) degrees
    attack_seeds: Tensor      # (n,) int64 seeds of the attack's random starts


class BatchPlan:
    """The global batch of every step, derived from ``(seed, step)``.

    Real images are read as one stream through successive random permutations of the training
    set (every image is used equally often; every batch is full); generated images are drawn
    uniformly with replacement. An epoch is ``n_train // batch_size`` steps without generated data,
    or ``ceil(n_train / batch_size)`` with it, ``n_train`` counting the training images left after the
    hold-out (SCORE's code divides all 50,000 CIFAR-10 images, hold-out included: 98 steps an epoch at
    batch 512 where this gives 96).

    Args:
        n_train: Training images.
        n_generated: Generated images (0 for none).
        batch_size: Global batch size.
        generated_fraction: Fraction of every batch taken from the generated images.
        seed: Run seed.
        crop_padding: Padding of the random crop (0: no crop).
        flip: Random horizontal flips.
        rotation: Maximum rotation in degrees (0: none).
    """

    def __init__(self, *, n_train: int, n_generated: int, batch_size: int, generated_fraction: float, seed: int,
                 crop_padding: int, flip: bool, rotation: float) -> None:
        self.n_train, self.n_generated, self.batch_size, self.seed = n_train, n_generated, batch_size, seed
        self.n_gen_per_batch = int(batch_size * generated_fraction) if n_generated else 0
        if generated_fraction > 0 and not n_generated:
            raise ValueError('data.generated_fraction > 0 but no generated images were loaded.')
        self.n_real_per_batch = batch_size - self.n_gen_per_batch
        if self.n_gen_per_batch:
            self.steps_per_epoch = math.ceil(n_train / batch_size)
        else:
            self.steps_per_epoch = n_train // batch_size
        if self.steps_per_epoch < 1:
            raise ValueError(f'The batch size ({batch_size}) exceeds the training set ({n_train} images); lower '
                             f'run.batch_size or use more data.')
        self.crop_padding, self.flip, self.rotation = crop_padding, flip, rotation
        self._perms: Dict[int, Tensor] = {}

    def _permutation(self, p: int) -> Tensor:
        if p not in self._perms:
            if len(self._perms) > 2:
                self._perms.pop(min(self._perms))
            self._perms[p] = torch.randperm(self.n_train, generator=_generator(self.seed, _PERM, p))
        return self._perms[p]

    def real_indices(self, step: int) -> Tensor:
        """Training-set indices of the real images of global batch ``step``."""
        start = step * self.n_real_per_batch
        pos = torch.arange(start, start + self.n_real_per_batch)
        passes, offsets = pos // self.n_train, pos % self.n_train
        out = torch.empty_like(pos)
        for p in passes.unique().tolist():
            mask = passes == p
            out[mask] = self._permutation(p)[offsets[mask]]
        return out

    def step(self, step: int, *, rank: int = 0, world_size: int = 1) -> StepBatch:
        """This rank's share of the global batch of ``step`` (contiguous slices of the shuffled global batch)."""
        g = _generator(self.seed, _STEP, step)
        b = self.batch_size
        generated = torch.randint(self.n_generated, (self.n_gen_per_batch,), generator=g) \
            if self.n_gen_per_batch else torch.empty(0, dtype=torch.int64)
        order = torch.randperm(b, generator=g)  # mixes real and generated images over the ranks
        crops = torch.randint(2 * self.crop_padding + 1, (b, 2), generator=g)
        flips = torch.rand(b, generator=g) < 0.5
        angles = (torch.rand(b, generator=g) * 2 - 1) * self.rotation
        seeds = torch.randint(1 << 62, (b,), generator=g)
        source = torch.cat([self.real_indices(step), generated])
        is_generated = torch.arange(b) >= self.n_real_per_batch
        per_rank = b // world_size
        mine = order[rank * per_rank:(rank + 1) * per_rank]
        slots = torch.arange(per_rank)
        gen_mask = is_generated[mine]
        return StepBatch(
            real_index=source[mine[~gen_mask]], real_slots=slots[~gen_mask],
            generated_index=source[mine[gen_mask]], generated_slots=slots[gen_mask],
            crop_offsets=crops[mine], flips=flips[mine] if self.flip else torch.zeros(per_rank, dtype=torch.bool),
            angles=angles[mine], attack_seeds=seeds[mine])


def gather_batch(data: TrainingData, batch: StepBatch, *, device: torch.device) -> Tuple[Tensor, Tensor]:
    """The uint8 images (n x 3 x H x W, on ``device``) and labels of a step batch, before augmentation."""
    n = batch.real_slots.numel() + batch.generated_slots.numel()
    h, w = data.train_images.shape[2:]
    images = torch.empty((n, 3, h, w), dtype=torch.uint8, device=device)
    labels = torch.empty((n,), dtype=torch.int64, device=device)
    if batch.real_slots.numel():
        idx = batch.real_index.to(data.train_images.device)
        images[batch.real_slots.to(device)] = data.train_images[idx].to(device, non_blocking=True)
        labels[batch.real_slots.to(device)] = data.train_labels[idx].to(device, non_blocking=True)
    if batch.generated_slots.numel():
        gen = data.generated_images[batch.generated_index].permute(0, 3, 1, 2)
        images[batch.generated_slots.to(device)] = gen.to(device, non_blocking=True)
        labels[batch.generated_slots.to(device)] = data.generated_labels[batch.generated_index].to(device)
    return images, labels


def augment(images: Tensor, *, crop_offsets: Optional[Tensor] = None, crop_padding: int = 0,
            flips: Optional[Tensor] = None, angles: Optional[Tensor] = None) -> Tensor:
    """Per-example CIFAR augmentation of uint8 images, returning float [0, 1] images.

    In order: random crop after zero padding (torchvision ``RandomCrop(32, padding)``), horizontal
    flip, rotation about the centre with nearest-neighbour sampling and zero fill (torchvision
    ``RandomRotation``).

    Args:
        images: uint8 N x C x H x W.
        crop_offsets: (N, 2) top/left offsets in [0, 2 * crop_padding].
        crop_padding: Zero padding before cropping (0: no crop).
        flips: (N,) bool, flip where True.
        angles: (N,) rotation angles in degrees (None or all zero: no rotation).
    """
    x = images.float().div_(255)
    n, c, h, w = x.shape
    if crop_padding > 0 and crop_offsets is not None:
        p = crop_padding
        padded = F.pad(x, (p, p, p, p)).permute(0, 2, 3, 1)  # N x H+2p x W+2p x C
        offs = crop_offsets.to(x.device)
        rows = offs[:, 0, None] + torch.arange(h, device=x.device)
        cols = offs[:, 1, None] + torch.arange(w, device=x.device)
        batch = torch.arange(n, device=x.device)[:, None, None]
        x = padded[batch, rows[:, :, None], cols[:, None, :]].permute(0, 3, 1, 2)
    if flips is not None and bool(flips.any()):
        x = torch.where(flips.to(x.device)[:, None, None, None], x.flip(3), x)
    if angles is not None and bool((angles != 0).any()):
        theta = angles.to(x.device, torch.float32) * (math.pi / 180)
        cos, sin = theta.cos(), theta.sin()
        zero = torch.zeros_like(cos)
        # rotates the image counter-clockwise by theta (output pixel -> input sampling location)
        affine = torch.stack([torch.stack([cos, -sin, zero], 1), torch.stack([sin, cos, zero], 1)], 1)
        grid = F.affine_grid(affine, list(x.shape), align_corners=False)
        x = F.grid_sample(x, grid, mode='nearest', padding_mode='zeros', align_corners=False)
    return x.contiguous()
