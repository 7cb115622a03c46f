"""RobNets (Guo et al. 2020, "When NAS Meets Robustness", arXiv 1911.10695).

A RobNet is a DARTS-style cell network (see :mod:`robust_resnets.models.darts`) whose cells are
densely wired: node ``i`` of a cell sums one operation on every earlier state (the two cell inputs
and nodes ``0..i-1``), and the cell output concatenates the last ``multiplier`` nodes. An
*architecture code* lists, per cell, one two-bit code per edge in that order:

* ``'00'``: zero, ``'01'``: 3x3 separable convolution,
* ``'10'``: identity (a factorized reduction where the edge strides),
* ``'11'``: residual 3x3 separable convolution (separable convolution plus that identity).

``robnet_large_*`` share one cell code across all cells; ``robnet_free`` has one per cell. Every
batch norm inside the cells is non-affine, as in the authors' code (gmh14/RobNets
``models/basic_operations.py``); only the stem's are affine. RobNets take [0, 1] pixels, on
CIFAR-10, SVHN and ImageNet alike.
"""
from __future__ import annotations

from typing import Any, Dict, Optional, Sequence, Union

import torch
import torch.nn as nn
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model

from ..weights import resolve_pretrained_kwargs
from .darts import (
    ROBNETS_OP_KEY, CellNetwork, SepConv, Zero, cell_network_cfg, edge_drop_path, feature_cfg,
    filter_cell_network_checkpoint, preprocess_inputs, skip_connect,
)
from .layers import strip_checkpoint_wrappers

__all__ = [
    'ARCH_CODES', 'ROBNET_CONFIGS', 'ROBNET_OPS', 'ResSepConv', 'RobNetCell', 'RobNet', 'resolve_arch_code',
    'checkpoint_filter_fn', 'detect_layout', 'CHECKPOINT_LAYOUTS',
]

#: The released RobNet architecture codes (gmh14/RobNets ``architecture_code.py``).
ARCH_CODES: Dict[str, Sequence[Sequence[str]]] = {
    'robnet_large': [
        ['11', '11', '11', '11', '11', '01', '11', '01', '10', '11', '01', '01', '01', '11']],
    'robnet_free': [
        ['11', '10', '11', '11', '10', '11', '01', '01', '10', '11', '11', '00', '11', '01'],
        ['11', '00', '01', '10', '01', '00', '10', '10', '00', '01', '11', '10', '11', '00'],
        ['11', '11', '11', '01', '01', '11', '01', '00', '10', '00', '10', '10', '00', '11'],
        ['10', '11', '10', '01', '01', '10', '10', '01', '10', '11', '00', '00', '01', '10'],
        ['11', '11', '01', '00', '10', '10', '10', '01', '10', '01', '00', '10', '01', '11'],
        ['11', '10', '11', '11', '11', '01', '10', '11', '00', '10', '01', '11', '01', '11'],
        ['11', '11', '11', '10', '10', '01', '11', '10', '01', '10', '10', '10', '01', '10'],
        ['01', '11', '11', '11', '01', '11', '11', '11', '01', '11', '01', '11', '10', '00'],
        ['11', '11', '11', '11', '11', '01', '01', '11', '10', '01', '00', '10', '01', '11'],
        ['10', '11', '01', '00', '11', '11', '10', '11', '01', '11', '11', '11', '11', '00'],
        ['11', '10', '11', '00', '00', '00', '11', '00', '01', '10', '00', '01', '10', '11'],
        ['01', '11', '01', '11', '11', '10', '10', '11', '10', '11', '01', '11', '10', '00'],
        ['11', '11', '10', '10', '01', '00', '10', '11', '11', '01', '10', '10', '00', '01'],
        ['01', '11', '11', '11', '01', '01', '11', '01', '01', '11', '11', '01', '10', '10'],
        ['01', '11', '11', '11', '11', '01', '00', '01', '10', '10', '11', '10', '10', '11'],
        ['11', '11', '00', '11', '11', '01', '00', '01', '10', '00', '11', '01', '11', '11'],
        ['11', '11', '01', '11', '11', '10', '11', '10', '10', '10', '10', '10', '11', '11'],
        ['10', '11', '01', '11', '11', '01', '11', '00', '11', '11', '00', '10', '00', '01'],
        ['11', '10', '11', '11', '11', '11', '11', '10', '11', '00', '11', '01', '11', '11'],
        ['11', '11', '01', '01', '11', '11', '01', '00', '00', '10', '00', '01', '01', '11']],
}

ArchCode = Union[str, Sequence[Sequence[str]]]


class ResSepConv(nn.Module):
    """A 3x3 separable convolution plus an identity (or factorized-reduction) shortcut."""

    def __init__(self, chs: int, stride: int, affine: bool = False) -> None:
        super().__init__()
        self.sep = SepConv(chs, chs, 3, stride, 1, affine=affine)
        self.shortcut = skip_connect(chs, stride, affine=affine)

    def _original_names(self) -> Dict[str, str]:
        return {'sep': 'conv', 'shortcut': 'res'}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.sep(x) + self.shortcut(x)


#: RobNet edge codes -> constructor(channels, stride, affine).
ROBNET_OPS = {
    '00': lambda c, stride, affine: Zero(stride),
    '01': lambda c, stride, affine: SepConv(c, c, 3, stride, 1, affine=affine),
    '10': skip_connect,
    '11': lambda c, stride, affine: ResSepConv(c, stride, affine=affine),
}


def _n_edges(steps: int) -> int:
    return sum(2 + i for i in range(steps))


class RobNetCell(nn.Module):
    """A densely wired cell: node ``i`` sums the coded operations on all ``2 + i`` earlier states.

    Args:
        code: One edge code per edge, node by node (``sum(2 + i for i < steps)`` codes).
        prev_prev_chs: Channels of the output of the cell two back.
        prev_chs: Channels of the output of the previous cell.
        chs: Channels of every node.
        reduction: Whether this cell halves the resolution (edges from the cell inputs stride).
        reduction_prev: Whether the previous cell did.
        steps: Intermediate nodes.
        multiplier: Trailing states concatenated into the output.
        affine: Whether batch norms are affine (False in the released RobNets).
        drop_path_rate: Drop-path probability on the operations (not identity or zero edges) in training.
    """

    def __init__(self, code: Sequence[str], prev_prev_chs: int, prev_chs: int, chs: int, reduction: bool,
                 reduction_prev: bool, *, steps: int = 4, multiplier: int = 4, affine: bool = False,
                 drop_path_rate: float = 0.0) -> None:
        super().__init__()
        self.preprocess0, self.preprocess1 = preprocess_inputs(prev_prev_chs, prev_chs, chs, reduction_prev, affine)
        #: the state each edge reads: node n reads states 0 .. n + 1
        self.inputs = [j for node in range(steps) for j in range(2 + node)]
        self.ops = nn.ModuleList([
            ROBNET_OPS[code[k]](chs, 2 if reduction and j < 2 else 1, affine) for k, j in enumerate(self.inputs)])
        self.drop_path, self.dropped = edge_drop_path(self.ops, drop_path_rate)
        self.multiplier = multiplier
        self.out_channels = multiplier * chs

    def _original_names(self) -> Dict[str, str]:
        # the authors wrap every operation in a ``ChosenOperation`` whose child is ``op``
        return {'ops': '_ops', **{f'ops.{k}': f'_ops.{k}.op' for k in range(len(self.ops))}}

    def forward(self, s0: torch.Tensor, s1: torch.Tensor) -> torch.Tensor:
        states = [self.preprocess0(s0), self.preprocess1(s1)]
        node = states[0]
        for i, op in enumerate(self.ops):
            j = self.inputs[i]
            out = op(states[j])
            if self.dropped[i]:
                out = self.drop_path(out)
            node = out if j == 0 else node + out
            if j == len(states) - 1:  # the node's last edge
                states.append(node)
        return torch.cat(states[-self.multiplier:], dim=1)


def resolve_arch_code(arch_code: ArchCode, *, layers: int, steps: int, share: bool) -> Sequence[Sequence[str]]:
    """The per-cell codes of a RobNet: validated, one per cell."""
    if isinstance(arch_code, str):
        if arch_code not in ARCH_CODES:
            raise ValueError(f"Unknown architecture code '{arch_code}'; use one of {sorted(ARCH_CODES)} or pass "
                             f"a list of per-cell code lists.")
        arch_code = ARCH_CODES[arch_code]
    codes = [list(c) for c in arch_code]
    if not codes:
        raise ValueError('arch_code is empty; give one list of edge codes per cell, or one with share=True.')
    if share:
        codes = codes[:1] * layers
    elif len(codes) != layers:
        raise ValueError(f'arch_code has {len(codes)} cell codes but the network has {layers} cells; give one '
                         f'per cell, or set share=True to use the first for every cell.')
    n = _n_edges(steps)
    for i, code in enumerate(codes):
        if len(code) != n:
            raise ValueError(f'arch_code for cell {i} has {len(code)} edge codes; a cell with {steps} steps has {n}.')
        bad = [c for c in code if c not in ROBNET_OPS]
        if bad:
            raise ValueError(f'arch_code for cell {i} has unknown edge codes {bad}; use {sorted(ROBNET_OPS)}.')
    return codes


class RobNet(CellNetwork):
    """A RobNet from its architecture code (the authors' ``robnet(genotype_list, **model_param)``).

    Args:
        arch_code: A name in :data:`ARCH_CODES` ('robnet_large', 'robnet_free') or a list of
            per-cell edge-code lists.
        C: Node channels of the first cells.
        layers: Number of cells.
        steps: Intermediate nodes per cell.
        multiplier: Trailing nodes concatenated into a cell's output.
        share: Use the first cell code for every cell.
        affine: Whether the cells' batch norms are affine (False in the released RobNets).
        **kwargs: Stem, head and drop-path arguments of :class:`~robust_resnets.models.darts.CellNetwork`
            (``stem_type='imagenet'`` for the ImageNet RobNets).
    """

    def __init__(self, arch_code: ArchCode = 'robnet_large', C: int = 36, layers: int = 20, *, steps: int = 4,
                 multiplier: int = 4, share: bool = True, affine: bool = False, **kwargs: Any) -> None:
        if not 1 <= multiplier <= steps + 2:
            raise ValueError(f'multiplier must be in 1..steps + 2 = {steps + 2}, got {multiplier}.')
        self.arch_code = resolve_arch_code(arch_code, layers=layers, steps=steps, share=share)
        self._steps, self._multiplier, self._affine = steps, multiplier, affine
        super().__init__(C=C, layers=layers, **kwargs)

    def _make_cell(self, index: int, prev_prev_chs: int, prev_chs: int, chs: int, reduction: bool,
                   reduction_prev: bool) -> nn.Module:
        return RobNetCell(self.arch_code[index], prev_prev_chs, prev_chs, chs, reduction, reduction_prev,
                          steps=self._steps, multiplier=self._multiplier, affine=self._affine,
                          drop_path_rate=self.drop_path_rate)


# --- checkpoint layouts ------------------------------------------------------------------------------
CHECKPOINT_LAYOUTS = ('robnets', 'timm')


def detect_layout(state_dict: Dict[str, torch.Tensor]) -> str:
    """Names the layout of a RobNet state dict: 'timm' (ours) or 'robnets' (gmh14/RobNets ``.pth.tar``
    and Huang et al. 2022's copy of that code)."""
    keys = list(state_dict.keys())
    if any(k.startswith('head.fc.') for k in keys):
        return 'timm'
    if any(k.startswith('classifier.') for k in keys) and any(ROBNETS_OP_KEY.search(k) for k in keys):
        return 'robnets'
    raise ValueError('Unrecognised checkpoint layout for a RobNet: expected head.fc.* (ours) or classifier.* '
                     f"with cells.*._ops.*.op.* (gmh14/RobNets); first keys: {keys[:5]}.")


def checkpoint_filter_fn(state_dict: Dict[str, Any], model: RobNet,
                         layout: Optional[str] = None) -> Dict[str, torch.Tensor]:
    """Maps a RobNets checkpoint (``{'state_dict': ...}``, ``module.`` prefixes from DDP) to this model's keys.

    Args:
        state_dict: The loaded checkpoint.
        model: The model it will load into.
        layout: 'robnets' or 'timm'; detected when None.
    """
    state_dict = strip_checkpoint_wrappers(state_dict)
    layout = layout or detect_layout(state_dict)
    if layout not in CHECKPOINT_LAYOUTS:
        raise ValueError(f"Unknown layout '{layout}' for a RobNet; use one of {list(CHECKPOINT_LAYOUTS)}.")
    return filter_cell_network_checkpoint(state_dict, model, layout)


# --- creation ----------------------------------------------------------------------------------------
def _create_robnet(variant: str, pretrained: bool = False, *, arch_args: Optional[Dict[str, Any]] = None,
                   **kwargs: Any) -> RobNet:
    kwargs = resolve_pretrained_kwargs(variant, pretrained, kwargs, arch_args=arch_args)
    return build_model_with_cfg(
        RobNet, variant, pretrained,
        pretrained_filter_fn=checkpoint_filter_fn,
        feature_cfg=feature_cfg(kwargs),
        **kwargs,
    )


def _cfg(url: str = '', **kwargs: Any) -> Dict[str, Any]:
    return cell_network_cfg(url, **{
        'license': 'mit', 'paper_ids': 'arXiv:1911.10695',
        'paper_name': 'When NAS Meets Robustness: In Search of Robust Architectures against Adversarial Attacks',
        **kwargs})


default_cfgs = generate_default_cfgs({
    'robnet_free': _cfg(),
    'robnet_large_v1': _cfg(),
    'robnet_large_v2': _cfg(),
    'robnet_large_imagenet': _cfg(
        num_classes=1000, input_size=(3, 224, 224), pool_size=(7, 7), crop_pct=0.875, first_conv='stem.conv1'),
})

#: Released configurations (gmh14/RobNets ``experiments/*/config.py``: ``model_param``).
ROBNET_CONFIGS: Dict[str, Dict[str, Any]] = {
    'robnet_free': dict(arch_code='robnet_free', C=36, layers=20, share=False),
    'robnet_large_v1': dict(arch_code='robnet_large', C=36, layers=20, share=True),
    'robnet_large_v2': dict(arch_code='robnet_large', C=64, layers=33, share=True),
    'robnet_large_imagenet': dict(arch_code='robnet_large', C=48, layers=20, share=True, stem_type='imagenet',
                                  num_classes=1000),
}


def _robnet(variant: str, pretrained: bool, **kwargs: Any) -> RobNet:
    return _create_robnet(variant, pretrained, arch_args=ROBNET_CONFIGS[variant], **kwargs)


@register_model
def robnet_free(pretrained: bool = False, **kwargs: Any) -> RobNet:
    """RobNet-free: a searched code per cell, C=36, 20 cells (CIFAR-10 / SVHN release)."""
    return _robnet('robnet_free', pretrained, **kwargs)


@register_model
def robnet_large_v1(pretrained: bool = False, **kwargs: Any) -> RobNet:
    """RobNet-large (v1): the shared large code, C=36, 20 cells (CIFAR-10 / SVHN release)."""
    return _robnet('robnet_large_v1', pretrained, **kwargs)


@register_model
def robnet_large_v2(pretrained: bool = False, **kwargs: Any) -> RobNet:
    """RobNet-large-v2: the shared large code, C=64, 33 cells (CIFAR-10 release; Huang et al. 2022's baseline)."""
    return _robnet('robnet_large_v2', pretrained, **kwargs)


@register_model
def robnet_large_imagenet(pretrained: bool = False, **kwargs: Any) -> RobNet:
    """RobNet-large for ImageNet: the shared large code, C=48, 20 cells, ImageNet stem, 224x224 input."""
    return _robnet('robnet_large_imagenet', pretrained, **kwargs)
