"""Runs ``robustbench.eval.benchmark`` (robustbench 1.1.1 from PyPI) with PyPI's ``pyautoattack``.

RobustBench imports ``autoattack`` (the GitHub package of Croce and Hein) and calls its old keyword
API (``bs=``, ``log_path=``, ``attacks_to_run=``); PyPI has that code as ``pyautoattack``, with a
keyword-only API (``batch_size=``, ``attacks=``). :func:`install` registers a small ``autoattack``
module that translates the old calls to ``pyautoattack`` (only when no real ``autoattack`` is
installed), plus a ``pkg_resources.resource_filename`` stand-in where setuptools no longer ships
``pkg_resources`` (robustbench's loaders import it). :func:`benchmark` calls RobustBench's own
``benchmark`` with CIFAR read by :func:`robust_resnets.data.load_cifar_tensors`, so it also runs offline
from a local copy. Install the extra with ``pip install robust-resnets[robustbench]``.
"""
from __future__ import annotations

import contextlib
import importlib.util
import logging
import sys
import types
from pathlib import Path
from typing import Any, Iterator, Optional, Tuple, Union

import torch
import torch.nn as nn

from ..attacks.spec import DEFAULT_EPS, default_eps

__all__ = ['install', 'benchmark', 'AutoAttack']

_SHIM_FLAG = '__robust_resnets_shim__'


class AutoAttack:
    """The GitHub ``autoattack.AutoAttack`` interface, backed by ``pyautoattack.AutoAttack``.

    As in GitHub's AutoAttack, ``attacks_to_run`` is for ``version='custom'`` only: with another version
    it is refused (a ValueError) rather than silently replaced by the version's own attacks.
    """

    def __init__(self, model: nn.Module, norm: str = 'Linf', eps: float = .3, seed: Optional[int] = None,
                 verbose: bool = True, attacks_to_run: Any = (), version: str = 'standard', is_tf_model: bool = False,
                 device: Union[str, torch.device] = 'cuda', log_path: Optional[str] = None) -> None:
        from pyautoattack import AutoAttack as _AutoAttack

        if is_tf_model:
            raise ValueError('TensorFlow models are not supported by this adapter; pass a PyTorch model.')
        attacks = list(attacks_to_run) if attacks_to_run else None
        if attacks and version != 'custom':
            raise ValueError(f"attacks_to_run={attacks} would be replaced by the attacks of version='{version}'; "
                             f"pass version='custom' to run exactly these attacks, or leave attacks_to_run empty.")
        self._aa = _AutoAttack(model, attacks=attacks, device=device, eps=eps, norm=norm, seed=seed,
                               version=version)
        self._aa.verbose = verbose
        self.model, self.norm, self.epsilon, self.seed, self.version, self.device = model, norm, eps, seed, version, device
        if log_path is not None:
            logger = logging.getLogger('auto-attack')
            logger.addHandler(logging.FileHandler(log_path))
            logger.setLevel(logging.DEBUG)

    def __getattr__(self, name: str) -> Any:  # apgd, fab, square, apgd_targeted, attacks_to_run, ...
        return getattr(self.__dict__['_aa'], name)

    def run_standard_evaluation(self, x_orig: torch.Tensor, y_orig: torch.Tensor, bs: int = 250,
                                return_labels: bool = False, state_path: Optional[Union[str, Path]] = None):
        x_adv, y_adv = self._aa.run_standard_evaluation(
            x_orig, y_orig, batch_size=bs, state_path=Path(state_path) if state_path is not None else None)
        return (x_adv, y_adv) if return_labels else x_adv

    def run_standard_evaluation_individual(self, x_orig: torch.Tensor, y_orig: torch.Tensor, bs: int = 250,
                                           return_labels: bool = False):
        adv = self._aa.run_standard_evaluation_individual(x_orig, y_orig, batch_size=bs)
        return adv if return_labels else {k: v[0] for k, v in adv.items()}

    def clean_accuracy(self, x_orig: torch.Tensor, y_orig: torch.Tensor, bs: int = 250) -> float:
        return self._aa.clean_accuracy(x_orig, y_orig, bs=bs)


def _state_module() -> types.ModuleType:
    from pyautoattack.state import EvaluationState as _EvaluationState

    class EvaluationState(_EvaluationState):
        """pyautoattack's state; robust flags read from disk come back as floats so that ``.mean()`` works."""

        @classmethod
        def from_disk(cls, path: Path) -> '_EvaluationState':
            state = super().from_disk(Path(path))
            state._robust_flags = state._robust_flags.float()
            return state

    module = types.ModuleType('autoattack.state')
    module.EvaluationState = EvaluationState
    return module


def _pkg_resources_module() -> types.ModuleType:
    from importlib import resources

    module = types.ModuleType('pkg_resources')

    def resource_filename(package: str, resource: str) -> str:
        return str(resources.files(package).joinpath(resource))

    module.resource_filename = resource_filename
    setattr(module, _SHIM_FLAG, True)
    return module


def install() -> bool:
    """Makes ``import autoattack`` give the pyautoattack-backed shim; returns False if a real one is installed."""
    if 'pkg_resources' not in sys.modules and importlib.util.find_spec('pkg_resources') is None:
        sys.modules['pkg_resources'] = _pkg_resources_module()
    existing = sys.modules.get('autoattack')
    if existing is not None and getattr(existing, _SHIM_FLAG, False):
        return True
    if existing is None and importlib.util.find_spec('autoattack') is not None:
        return False  # the GitHub autoattack is installed: RobustBench uses it as is
    module = types.ModuleType('autoattack')
    module.AutoAttack = AutoAttack
    module.state = _state_module()
    module.__path__ = []  # a package, so that `from autoattack.state import ...` resolves
    setattr(module, _SHIM_FLAG, True)
    sys.modules['autoattack'] = module
    sys.modules['autoattack.state'] = module.state
    return True


@contextlib.contextmanager
def _local_cifar(eval_module: types.ModuleType) -> Iterator[None]:
    """Routes RobustBench's CIFAR loading through load_cifar_tensors (local folders, archives, torchvision files).

    That loader gives the images as they are, RobustBench's default CIFAR preprocessing (``ToTensor``); another
    ``preprocessing`` is refused rather than ignored.
    """
    from robustbench.data import PREPROCESSINGS

    from robust_resnets.data import load_cifar_tensors

    original = eval_module.load_clean_dataset

    def load_clean_dataset(dataset, n_examples, data_dir, prepr):
        name = getattr(dataset, 'value', dataset)
        if name not in ('cifar10', 'cifar100'):
            return original(dataset, n_examples, data_dir, prepr)
        if prepr is not PREPROCESSINGS[None]:
            raise ValueError(f"robust-resnets' benchmark() reads {name} as it is (RobustBench's default ToTensor) and "
                             f"cannot apply another preprocessing ({prepr!r}); drop preprocessing=, or call "
                             f"robustbench.eval.benchmark itself (its loader downloads {name} with torchvision).")
        images, labels = load_cifar_tensors(root=data_dir, dataset=name, split='test')
        return images[:n_examples].float() / 255, labels[:n_examples]

    eval_module.load_clean_dataset = load_clean_dataset
    try:
        yield
    finally:
        eval_module.load_clean_dataset = original


def benchmark(model: nn.Module, *, n_examples: int = 10000, dataset: str = 'cifar10', threat_model: str = 'Linf',
              eps: Optional[float] = None, data_dir: Union[str, Path] = './data',
              device: Union[str, torch.device, None] = None, batch_size: int = 32, to_disk: bool = False,
              model_name: Optional[str] = None, preprocessing: Any = None,
              aa_state_path: Optional[Union[str, Path]] = None, log_path: Optional[str] = None) -> Tuple[float, float]:
    """Runs ``robustbench.eval.benchmark`` and returns its (clean accuracy, AutoAttack accuracy).

    Arguments are RobustBench's (``eps`` defaults to 8/255 for Linf CIFAR, 4/255 for Linf ImageNet,
    0.5 for L2 and 12 for L1). CIFAR comes from ``data_dir`` through
    :func:`robust_resnets.data.load_cifar_tensors`, with RobustBench's default preprocessing only.

    Raises:
        ImportError: robustbench is not installed.
        ValueError: A ``preprocessing`` other than the default for CIFAR.
    """
    if importlib.util.find_spec('robustbench') is None:
        raise ImportError('robustbench is not installed; pip install "robust-resnets[robustbench]" '
                          '(robustbench==1.1.1).')
    install()
    import robustbench.eval as rb_eval

    norm = getattr(threat_model, 'value', threat_model)  # a name or RobustBench's ThreatModel / BenchmarkDataset
    if eps is None and norm in DEFAULT_EPS:  # RobustBench's corruptions take no radius
        eps = default_eps(norm=norm, dataset=getattr(dataset, 'value', dataset))
    if isinstance(device, str):
        device = torch.device(device)
    with _local_cifar(rb_eval):
        return rb_eval.benchmark(model, n_examples=n_examples, dataset=dataset, threat_model=threat_model,
                                 to_disk=to_disk, model_name=model_name, data_dir=str(data_dir), device=device,
                                 batch_size=batch_size, eps=eps, log_path=log_path, preprocessing=preprocessing,
                                 aa_state_path=Path(aa_state_path) if aa_state_path is not None else None)
