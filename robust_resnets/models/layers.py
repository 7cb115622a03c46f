"""Layers shared by the model families: input normalisation, and activation/norm lookup by name."""
from __future__ import annotations

from functools import partial
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, Type, Union

import torch
import torch.nn as nn
from timm.layers import LayerNorm2d, get_act_layer
from timm.models._features import feature_take_indices

__all__ = [
    'CIFAR10_MEAN', 'CIFAR10_STD', 'CIFAR100_MEAN', 'CIFAR100_STD',
    'InputNormalize', 'ClassifierHeadMixin', 'resolve_act_layer', 'resolve_norm_layer', 'LayerType',
    'strip_checkpoint_wrappers', 'holds_tensors', 'fill_input_normalize', 'fit_num_batches_tracked',
    'intermediate_indices',
]

CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2471, 0.2435, 0.2616)
CIFAR100_MEAN = (0.5071, 0.4865, 0.4409)
CIFAR100_STD = (0.2673, 0.2564, 0.2762)

LayerType = Union[str, Callable[..., nn.Module], Type[nn.Module]]


class ClassifierHeadMixin:
    """timm's ``get_classifier``/``reset_classifier`` for a model whose ``head`` is a timm ``ClassifierHead``
    (or ``NormMlpClassifierHead``): the head rebuilds its pooling and classifier itself."""

    @torch.jit.ignore
    def get_classifier(self) -> nn.Module:
        return self.head.fc

    def reset_classifier(self, num_classes: int, global_pool: Optional[str] = None) -> None:
        self.num_classes = num_classes
        self.head.reset(num_classes, global_pool)


def intermediate_indices(num_taps: int, indices: Optional[Union[int, List[int]]],
                         output_fmt: str = 'NCHW') -> Tuple[List[int], int]:
    """The taps ``forward_intermediates`` returns (timm's convention: the last n for an int, all for None) and the
    highest of them.

    Raises:
        ValueError: ``output_fmt`` is not 'NCHW', or an index is out of range.
    """
    if output_fmt != 'NCHW':
        raise ValueError(f"output_fmt must be 'NCHW' for this model, got {output_fmt!r}.")
    try:
        return feature_take_indices(num_taps, indices)
    except AssertionError:
        raise ValueError(f'indices={indices!r} is out of range for this model\'s {num_taps} feature taps '
                         f'(0..{num_taps - 1}, or a count up to {num_taps}).') from None


class InputNormalize(nn.Module):
    """Standardises [0, 1] pixels with a fixed per-channel mean and std, inside the model.

    Robust models are attacked in pixel space, so the normalisation that some checkpoints
    were trained with lives in the model (as buffers that travel with the weights), and the
    timm pretrained cfg of such a model keeps ``mean=0, std=1``.
    """

    def __init__(self, mean: Sequence[float], std: Sequence[float], *, in_chans: Optional[int] = None) -> None:
        """
        Args:
            mean: Per-channel mean.
            std: Per-channel standard deviation.
            in_chans: Input channels of the model, checked against ``len(mean)``.
        """
        super().__init__()
        if len(mean) != len(std):
            raise ValueError(f'mean has {len(mean)} channels but std has {len(std)}; give one value per channel.')
        if any(s <= 0 for s in std):
            raise ValueError(f'std must be positive, got {tuple(std)}.')
        if in_chans is not None and in_chans != len(mean):
            raise ValueError(f'The model standardises its input inside with {len(mean)}-channel mean={tuple(mean)}, '
                             f'std={tuple(std)}, but in_chans={in_chans}; pass input_mean and input_std with '
                             f'{in_chans} values each, or build it without in-model standardisation.')
        self.register_buffer('mean', torch.tensor(mean, dtype=torch.float32).view(-1, 1, 1))
        self.register_buffer('std', torch.tensor(std, dtype=torch.float32).view(-1, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std

    def extra_repr(self) -> str:
        if self.mean.is_meta:  # no values to show
            return f'channels={self.mean.shape[0]}'
        return f'mean={tuple(round(v, 4) for v in self.mean.flatten().tolist())}, ' \
               f'std={tuple(round(v, 4) for v in self.std.flatten().tolist())}'


class GroupNorm8(nn.GroupNorm):
    """GroupNorm with ``num_channels // 8`` groups: the authors' (Huang et al.) GroupNorm convention."""

    def __init__(self, num_channels: int, eps: float = 1e-5, affine: bool = True, **kwargs) -> None:
        super().__init__(max(num_channels // 8, 1), num_channels, eps=eps, affine=affine, **kwargs)


# the authors' LayerNorm2d is a channels-last nn.LayerNorm (eps 1e-5), timm's default eps is 1e-6
_LAYER_NORM_2D = partial(LayerNorm2d, eps=1e-5)

_NORM_LAYERS = {
    'batchnorm': nn.BatchNorm2d,
    'batchnorm2d': nn.BatchNorm2d,
    'groupnorm': GroupNorm8,
    'layernorm': _LAYER_NORM_2D,
    'layernorm2d': _LAYER_NORM_2D,
    'instancenorm': partial(nn.InstanceNorm2d, affine=False),
}

_ACT_ALIASES = {'leakyrelu': 'leaky_relu', 'swish': 'silu'}
#: Activations of the authors' configs that timm's ``get_act_layer`` does not name.
_ACT_LAYERS = {'softplus': nn.Softplus}  # beta 1, threshold 20, as Huang et al.'s Softplus


def resolve_act_layer(act: Optional[LayerType]) -> Callable[..., nn.Module]:
    """Returns an activation constructor for a name ('ReLU', 'SiLU', 'Swish', 'GELU', ...) or a class.

    Names follow the authors' configs (case-insensitive) and timm's ``get_act_layer``. Swish is
    x * sigmoid(x), i.e. SiLU.
    """
    if act is None:
        return nn.Identity
    if not isinstance(act, str):
        return act
    key = act.lower().replace('-', '_')
    key = _ACT_ALIASES.get(key, key)
    try:
        layer = _ACT_LAYERS.get(key) or get_act_layer(key)
    except KeyError:
        layer = None
    if layer is None:
        raise ValueError(f"Unknown activation '{act}'. Use a name such as 'ReLU', 'SiLU', 'GELU', 'Mish', "
                         f"'ELU', 'Softplus' or 'LeakyReLU', or pass an nn.Module class.")
    return layer


def resolve_norm_layer(norm: Optional[LayerType]) -> Callable[..., nn.Module]:
    """Returns a 2d normalisation constructor for 'BatchNorm', 'GroupNorm', 'LayerNorm', 'InstanceNorm' or a class."""
    if norm is None:
        return nn.Identity
    if not isinstance(norm, str):
        return norm
    key = norm.lower().replace('_', '').replace('-', '')
    if key not in _NORM_LAYERS:
        raise ValueError(f"Unknown normalization '{norm}'. Use one of 'BatchNorm', 'GroupNorm', 'LayerNorm', "
                         f"'InstanceNorm', or pass an nn.Module class.")
    return _NORM_LAYERS[key]


_WRAPPER_PREFIXES = ('module.', 'base_model.', 'model.', '_orig_mod.')


_TRAINED_KEYS = ('state_dict', 'model_state_dict', 'model')
_EMA_KEYS = ('state_dict_ema', 'model_ema', 'ema_state_dict', 'ema')


def holds_tensors(value: Any) -> bool:
    """Whether ``value`` is a dict with a tensor among its values (a state dict, or a checkpoint holding weights
    at its top level)."""
    return isinstance(value, dict) and any(torch.is_tensor(v) for v in value.values())


def strip_checkpoint_wrappers(state_dict: Dict[str, Any]) -> Dict[str, torch.Tensor]:
    """The tensors of a checkpoint, out of training-state wrappers (``state_dict``, ``model_state_dict``,
    ``model``, or an EMA's ``state_dict_ema``, ``model_ema``, ``ema_state_dict``, ``ema``) and
    ``module.``/``base_model.``/``model.``/``_orig_mod.`` prefixes in any order (DDP, EMA, input-normalising and
    torch.compile wrappers).

    Raises:
        ValueError: The file holds both the trained and the EMA weights, so which one to load is ambiguous.
    """
    trained = [k for k in _TRAINED_KEYS if holds_tensors(state_dict.get(k))]
    ema = [k for k in _EMA_KEYS if holds_tensors(state_dict.get(k))]
    if trained and ema:
        raise ValueError(f"The checkpoint holds both trained weights ({trained[0]!r}) and their moving average "
                         f"({ema[0]!r}), so which to load is ambiguous. Pick one with --key {ema[0]} (or --key "
                         f"{trained[0]}) of `robust-resnets eval --checkpoint` or `convert`, key= of "
                         f"load_original_checkpoint, or pass checkpoint[{ema[0]!r}] itself.")
    if trained or ema:
        state_dict = state_dict[(trained + ema)[0]]
    out = {}
    for k, v in state_dict.items():
        if not torch.is_tensor(v):
            continue
        stripped = True
        while stripped:
            stripped = False
            for prefix in _WRAPPER_PREFIXES:
                if k.startswith(prefix):
                    k, stripped = k[len(prefix):], True
        out[k] = v
    return out


def fit_num_batches_tracked(state_dict: Dict[str, torch.Tensor],
                            model_state: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """``state_dict`` with the model's batch-norm ``num_batches_tracked`` counters: ones the model lacks dropped,
    ones the checkpoint lacks (PyTorch < 0.4.1 saved none) filled with zeros."""
    out = {k: v for k, v in state_dict.items() if k in model_state or not k.endswith('num_batches_tracked')}
    for k, v in model_state.items():
        if k.endswith('num_batches_tracked') and k not in out:
            out[k] = torch.zeros_like(v)
    return out


def fill_input_normalize(state_dict: Dict[str, torch.Tensor], model_state: Dict[str, torch.Tensor]) -> None:
    """Gives ``state_dict`` the model's own ``normalize.mean/std`` where the checkpoint has none, or has them
    for another channel count (a model built with another ``in_chans`` and its own ``input_mean/std``, whose
    first conv timm adapts); statistics of the model's shape are left to the checkpoint."""
    for k in ('normalize.mean', 'normalize.std'):
        if k in model_state and (k not in state_dict or state_dict[k].numel() != model_state[k].numel()):
            state_dict[k] = model_state[k].clone()
