"""robust-resnets: adversarially robust image classifiers for timm.

Importing the package registers every model with timm, so ``timm.create_model('robust_resnet_a1')``
and ``timm.list_models('robust_resnet*')`` work. The import stays light: evaluation, data and
training code load only when used.
"""
from .models import InputNormalize, PreActBasicBlock, PreActResNet, RobustResBlock
from .scaling import robust_scaling, scale_by_depth, scale_by_width

__version__ = '0.1.0'

__all__ = [
    'InputNormalize', 'PreActBasicBlock', 'PreActResNet', 'RobustResBlock',
    'robust_scaling', 'scale_by_depth', 'scale_by_width', '__version__',
]
