"""Shared fixtures of the training tests: random in-memory CIFAR-shaped data and single-threaded torch."""
from __future__ import annotations

import pytest
import torch

from robust_resnets.training.data import TrainingData


def random_cifar_data(n_train: int = 48, n_eval: int = 16, n_generated: int = 0, seed: int = 0) -> TrainingData:
    """Random uint8 32x32 images with 10 random classes (and optional generated images)."""
    g = torch.Generator().manual_seed(seed)
    u8 = lambda *s: torch.randint(0, 256, s, dtype=torch.uint8, generator=g)  # noqa: E731
    lab = lambda n: torch.randint(0, 10, (n,), generator=g)  # noqa: E731
    gen = (u8(n_generated, 32, 32, 3), lab(n_generated)) if n_generated else (None, None)
    return TrainingData(u8(n_train, 3, 32, 32), lab(n_train), u8(n_eval, 3, 32, 32), lab(n_eval), 10, *gen)


@pytest.fixture
def one_thread():
    """Runs the test with one torch thread (the tests train tiny models; threads only add overhead)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def record_lrs(optimizer: torch.optim.Optimizer, scheduler, steps: int) -> list:
    """The learning rate of the first parameter group at each of ``steps`` optimiser steps."""
    lrs = []
    for _ in range(steps):
        lrs.append(optimizer.param_groups[0]['lr'])
        optimizer.step()
        scheduler.step()
    return lrs
