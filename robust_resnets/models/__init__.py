"""Model families of robust-resnets; importing this module registers every model with timm."""
from __future__ import annotations

import fnmatch
from typing import List

import timm

from .convstem import ConvNeXtIsotropic, ConvStem, ConvStemConvNeXt, ConvStemVisionTransformer
from .darts import DartsNetwork
from .layers import InputNormalize
from .preact_resnet import PreActBasicBlock, PreActResNet, RobustResBlock
from .robnet import RobNet

__all__ = [
    'ConvNeXtIsotropic', 'ConvStem', 'ConvStemConvNeXt', 'ConvStemVisionTransformer', 'DartsNetwork', 'RobNet',
    'InputNormalize', 'PreActBasicBlock', 'PreActResNet', 'RobustResBlock', 'list_models']


def list_models(pattern: str = '*') -> List[str]:
    """Names of the timm models that robust-resnets registers, optionally filtered by an fnmatch pattern."""
    from timm.models import model_entrypoint

    return sorted(name for name in timm.list_models()
                  if model_entrypoint(name).__module__.startswith('robust_resnets.')
                  and fnmatch.fnmatch(name, pattern))


# pretrained tags of the weights manifest, once every family above is registered
from ..weights import register_manifest as _register_manifest  # noqa: E402

_register_manifest()
