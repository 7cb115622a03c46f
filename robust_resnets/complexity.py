"""Parameter and MAC counts, with the counting convention of the papers reproduced here.

Huang et al. 2022 report #F as MACs counted by ``torchprofile`` in eval mode on one 32x32 image.
That counter adds, beside convolutions and matrix products, one MAC per output element of
affine normalisations, elementwise products (the SE gate), average pools and means. It traces
the model with real tensors, which is slow and memory-hungry for 100M+ parameter models, so
:func:`count_macs` applies the same rules through ``torch.utils.flop_counter`` and runs on the
``meta`` device: no weights are allocated. ``tests/test_complexity.py`` checks it against
``torchprofile.profile_macs`` on real forwards of every model family.
"""
from __future__ import annotations

from math import prod
from typing import Any, Dict, Optional, Sequence, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode
from torch.utils.flop_counter import FlopCounterMode

__all__ = ['count_params', 'count_macs', 'model_complexity', 'create_for_counting']

aten = torch.ops.aten


def _conv_macs(x_shape, w_shape, *args, out_shape=None, **kwargs) -> int:
    transposed = bool(args[4]) if len(args) > 4 else bool(kwargs.get('transposed', False))
    if transposed:  # weight is (in, out / groups, *k): each input element meets out/groups * k weights
        return prod(x_shape) * w_shape[1] * prod(w_shape[2:])
    return prod(out_shape) * w_shape[1] * prod(w_shape[2:])


def _mm_macs(a_shape, b_shape, *args, out_shape=None, **kwargs) -> int:
    return prod(a_shape) * b_shape[-1]


def _addmm_macs(bias_shape, a_shape, b_shape, *args, out_shape=None, **kwargs) -> int:
    return prod(a_shape) * b_shape[-1]


def _bmm_macs(a_shape, b_shape, *args, out_shape=None, **kwargs) -> int:
    return prod(a_shape) * b_shape[-1]


def _baddbmm_macs(c_shape, a_shape, b_shape, *args, out_shape=None, **kwargs) -> int:
    return prod(a_shape) * b_shape[-1]


def _out_numel(*args, out_shape=None, **kwargs) -> int:
    shape = out_shape[0] if isinstance(out_shape, (tuple, list)) and out_shape and \
        isinstance(out_shape[0], (tuple, list, torch.Size)) else out_shape
    return prod(shape)


def _affine_norm(weight_index: int):
    def count(*args, out_shape=None, **kwargs) -> int:
        weight = args[weight_index] if len(args) > weight_index else None
        return _out_numel(out_shape=out_shape) if weight is not None else 0
    return count


def _sdpa_macs(q_shape, k_shape, v_shape, *args, out_shape=None, **kwargs) -> int:
    b, *heads, sq, d = q_shape
    skv, dv = k_shape[-2], v_shape[-1]
    return b * prod(heads) * sq * skv * (d + dv)


def _mul_macs(*args, out_shape=None, **kwargs) -> int:
    return _out_numel(out_shape=out_shape)


def _mapping() -> Dict[Any, Any]:
    mapping: Dict[Any, Any] = {
        aten.convolution: _conv_macs,
        aten._convolution: _conv_macs,
        aten.mm: _mm_macs,
        aten.addmm: _addmm_macs,
        aten.bmm: _bmm_macs,
        aten.baddbmm: _baddbmm_macs,
        aten.mul: _mul_macs,
        aten.mul_: _mul_macs,
        aten._native_batch_norm_legit_no_training: _affine_norm(1),
        aten._native_batch_norm_legit: _affine_norm(1),
        aten.native_batch_norm: _affine_norm(1),
        aten.native_layer_norm: _affine_norm(2),
        aten.native_group_norm: _affine_norm(1),
        aten.avg_pool2d: _out_numel,
        aten._adaptive_avg_pool2d: _out_numel,
        aten.mean: _out_numel,
        aten.leaky_relu: _out_numel,
        aten.upsample_bilinear2d: lambda *a, out_shape=None, **k: 4 * _out_numel(out_shape=out_shape),
    }
    for name in ('_scaled_dot_product_flash_attention', '_scaled_dot_product_efficient_attention',
                 '_scaled_dot_product_flash_attention_for_cpu', '_scaled_dot_product_cudnn_attention'):
        if hasattr(aten, name):  # which fused attention kernels exist depends on the torch release
            mapping[getattr(aten, name)] = _sdpa_macs
    return mapping


class _AttentionAsOneOp(TorchFunctionMode):
    """Counts ``F.scaled_dot_product_attention`` as torchprofile does (QK^T and AV only), whatever kernel runs.

    On ``meta`` tensors attention falls back to a decomposition whose scaling multiplies would be counted too.
    """

    def __init__(self, counter: FlopCounterMode) -> None:
        super().__init__()
        self.counter = counter
        self.adjustment = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is not F.scaled_dot_product_attention:
            return func(*args, **kwargs)
        before = self.counter.get_total_flops()
        out = func(*args, **kwargs)
        q, k, v = (a.shape for a in args[:3])
        self.adjustment += _sdpa_macs(q, k, v) - (self.counter.get_total_flops() - before)
        return out


def count_params(model: nn.Module, *, trainable_only: bool = False) -> int:
    """Number of parameters (all, or only those with ``requires_grad``)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)


def count_macs(
        model: nn.Module,
        *,
        input_size: Sequence[int] = (3, 32, 32),
        batch_size: int = 1,
) -> int:
    """Multiply-accumulates of one eval-mode forward, counted as ``torchprofile`` counts them.

    Args:
        model: The model; on the ``meta`` device for free counting, or on any real device.
        input_size: (C, H, W) of one input.
        batch_size: Images per forward.

    Returns:
        The MAC count (an int).
    """
    try:
        device = next(model.parameters()).device
    except StopIteration:
        device = torch.device('meta')
    was_training = model.training
    model.eval()
    try:
        x = torch.zeros((batch_size, *input_size), device=device)
        counter = FlopCounterMode(display=False, custom_mapping=_mapping())
        attention = _AttentionAsOneOp(counter)
        with counter, attention, torch.no_grad():
            model(x)
        return int(counter.get_total_flops() + attention.adjustment)
    finally:
        model.train(was_training)


def create_for_counting(name: str, **kwargs: Any) -> nn.Module:
    """Builds a timm model for counting: on ``meta`` (no memory), or on the CPU where a constructor cannot run on
    ``meta`` (timm 1.0.9's ViT and ConvNeXt read tensor values while building)."""
    import timm

    try:
        with torch.device('meta'):
            return timm.create_model(name, **kwargs)
    except (RuntimeError, NotImplementedError):
        return timm.create_model(name, **kwargs)


def model_complexity(name: str, *, input_size: Optional[Tuple[int, int, int]] = None,
                     **kwargs: Any) -> Dict[str, Any]:
    """Parameters and MACs of a registered timm model at its native input size, built on ``meta``.

    Args:
        name: timm model name (``robust_resnet_a1``...).
        input_size: (C, H, W); defaults to the model's pretrained cfg input size.
        **kwargs: Passed to ``timm.create_model``.

    Returns:
        ``{'model', 'params', 'macs', 'input_size'}``.
    """
    model = create_for_counting(name, **kwargs)
    size = tuple(input_size or model.pretrained_cfg.get('input_size', (3, 224, 224)))
    return {'model': name, 'params': count_params(model), 'macs': count_macs(model, input_size=size),
            'input_size': list(size)}
