"""Model families of robust-resnets; importing this module registers every model with timm."""
from .layers import InputNormalize
from .preact_resnet import PreActBasicBlock, PreActResNet, RobustResBlock

__all__ = ['InputNormalize', 'PreActBasicBlock', 'PreActResNet', 'RobustResBlock']
