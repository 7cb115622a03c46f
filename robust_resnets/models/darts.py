"""DARTS-style cell networks: AdvRush (Mok et al. 2021) and RACL (Dong et al. 2020).

A network is a stem, ``layers`` cells and a pool/linear head. Each cell reads the outputs of the
two previous cells, preprocesses them to ``C`` channels and builds intermediate nodes as sums of
operations on earlier states; the cell output concatenates some of the nodes. The cells at
``layers // 3`` and ``2 * layers // 3`` are reduction cells: they halve the resolution (the
operations reading the two cell inputs stride by 2) and double ``C``.

:class:`CellNetwork` holds what the searched families share (stem, cell stack, head, the timm
interface, the mapping to the authors' key names); :class:`DartsNetwork` builds its cells from a
DARTS :class:`Genotype`. The RobNets of ``robnet.py`` build on the same scaffolding.

Layers follow the authors' code (nutellamok/advrush ``eval/model.py``, ``operations.py``;
Huang et al. 2022 train both AdvRush and RACL with that code): non-inplace ReLUs (a state feeds
several operations), affine batch norms everywhere in AdvRush cells, no input normalisation.
"""
from __future__ import annotations

import re
from collections import OrderedDict, namedtuple
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn
from timm.layers import ClassifierHead, DropPath
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model
from torch.utils.checkpoint import checkpoint

from ..weights import resolve_pretrained_kwargs
from .layers import ClassifierHeadMixin, intermediate_indices, strip_checkpoint_wrappers

__all__ = [
    'Genotype', 'GENOTYPES', 'DARTS_CONFIGS', 'OPS', 'ReLUConvBN', 'SepConv', 'DilConv', 'Conv7x1x7', 'Zero',
    'FactorizedReduce', 'skip_connect', 'preprocess_inputs', 'resolve_genotype', 'CellNetwork', 'DartsCell',
    'edge_drop_path',
    'DartsNetwork', 'checkpoint_filter_fn', 'detect_layout', 'original_keys', 'filter_cell_network_checkpoint',
    'feature_cfg', 'ROBNETS_OP_KEY', 'CHECKPOINT_LAYOUTS',
]

#: A DARTS genotype: ``normal``/``reduce`` list ``(op_name, input_index)`` pairs, two per node; the
#: ``*_concat`` lists name the states concatenated into the cell output (0, 1 are the cell inputs).
Genotype = namedtuple('Genotype', 'normal normal_concat reduce reduce_concat')

#: Searched genotypes, as published in nutellamok/advrush ``genotypes.py`` (RACL: Dong et al. 2020).
GENOTYPES: Dict[str, Genotype] = {
    'advrush': Genotype(
        normal=[('sep_conv_3x3', 1), ('sep_conv_3x3', 0), ('sep_conv_5x5', 0), ('sep_conv_3x3', 1),
                ('sep_conv_3x3', 1), ('sep_conv_3x3', 0), ('skip_connect', 0), ('sep_conv_3x3', 1)],
        normal_concat=[2, 3, 4, 5],
        reduce=[('sep_conv_3x3', 0), ('sep_conv_3x3', 1), ('skip_connect', 0), ('dil_conv_3x3', 2),
                ('skip_connect', 0), ('avg_pool_3x3', 1), ('skip_connect', 0), ('skip_connect', 2)],
        reduce_concat=[2, 3, 4, 5]),
    'racl': Genotype(
        normal=[('sep_conv_3x3', 0), ('sep_conv_3x3', 1), ('sep_conv_5x5', 0), ('skip_connect', 1),
                ('sep_conv_3x3', 0), ('skip_connect', 3), ('sep_conv_3x3', 3), ('skip_connect', 4)],
        normal_concat=[2, 3, 4, 5],
        reduce=[('sep_conv_3x3', 0), ('sep_conv_5x5', 1), ('avg_pool_3x3', 0), ('dil_conv_3x3', 1),
                ('sep_conv_3x3', 0), ('sep_conv_5x5', 1), ('sep_conv_3x3', 2), ('dil_conv_3x3', 3)],
        reduce_concat=[2, 3, 4, 5]),
}


# --- operations --------------------------------------------------------------------------------------
class _IndexedOp(nn.Sequential):
    """A sequence of layers that the authors keep as ``<module>.op.<index>``."""

    def _original_names(self) -> Dict[str, str]:
        return {name: f'op.{i}' for i, name in enumerate(self._modules)}


class ReLUConvBN(_IndexedOp):
    """ReLU, bias-free convolution, batch norm."""

    def __init__(self, in_chs: int, out_chs: int, kernel_size: int = 1, stride: int = 1, padding: int = 0,
                 affine: bool = True) -> None:
        super().__init__(OrderedDict(
            act=nn.ReLU(inplace=False),
            conv=nn.Conv2d(in_chs, out_chs, kernel_size, stride=stride, padding=padding, bias=False),
            bn=nn.BatchNorm2d(out_chs, affine=affine),
        ))


class SepConv(_IndexedOp):
    """Two stacked ReLU-depthwise-pointwise-BN units; only the first depthwise convolution strides."""

    def __init__(self, in_chs: int, out_chs: int, kernel_size: int, stride: int, padding: int,
                 affine: bool = True) -> None:
        super().__init__(OrderedDict(
            act1=nn.ReLU(inplace=False),
            conv_dw1=nn.Conv2d(in_chs, in_chs, kernel_size, stride=stride, padding=padding, groups=in_chs,
                               bias=False),
            conv_pw1=nn.Conv2d(in_chs, in_chs, 1, bias=False),
            bn1=nn.BatchNorm2d(in_chs, affine=affine),
            act2=nn.ReLU(inplace=False),
            conv_dw2=nn.Conv2d(in_chs, in_chs, kernel_size, padding=padding, groups=in_chs, bias=False),
            conv_pw2=nn.Conv2d(in_chs, out_chs, 1, bias=False),
            bn2=nn.BatchNorm2d(out_chs, affine=affine),
        ))


class DilConv(_IndexedOp):
    """ReLU, dilated depthwise convolution, pointwise convolution, batch norm."""

    def __init__(self, in_chs: int, out_chs: int, kernel_size: int, stride: int, padding: int, dilation: int,
                 affine: bool = True) -> None:
        super().__init__(OrderedDict(
            act=nn.ReLU(inplace=False),
            conv_dw=nn.Conv2d(in_chs, in_chs, kernel_size, stride=stride, padding=padding, dilation=dilation,
                              groups=in_chs, bias=False),
            conv_pw=nn.Conv2d(in_chs, out_chs, 1, bias=False),
            bn=nn.BatchNorm2d(out_chs, affine=affine),
        ))


class Conv7x1x7(_IndexedOp):
    """ReLU, 1x7 then 7x1 convolution (each strided along its axis), batch norm: DARTS' ``conv_7x1_1x7``."""

    def __init__(self, chs: int, stride: int, affine: bool = True) -> None:
        super().__init__(OrderedDict(
            act=nn.ReLU(inplace=False),
            conv_1x7=nn.Conv2d(chs, chs, (1, 7), stride=(1, stride), padding=(0, 3), bias=False),
            conv_7x1=nn.Conv2d(chs, chs, (7, 1), stride=(stride, 1), padding=(3, 0), bias=False),
            bn=nn.BatchNorm2d(chs, affine=affine),
        ))


class Zero(nn.Module):
    """The 'none' operation: zeros at the output resolution (kept as a multiply, as the authors do)."""

    def __init__(self, stride: int = 1) -> None:
        super().__init__()
        self.stride = stride

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.stride > 1:
            x = x[:, :, ::self.stride, ::self.stride]
        return x.mul(0.)


class FactorizedReduce(nn.Module):
    """Halves the resolution: ReLU, two stride-2 1x1 convolutions on grids offset by one pixel,
    concatenated, batch norm."""

    def __init__(self, in_chs: int, out_chs: int, affine: bool = True) -> None:
        super().__init__()
        if out_chs % 2:
            raise ValueError(f'FactorizedReduce needs an even number of output channels, got {out_chs}; '
                             f'use an even C.')
        self.act = nn.ReLU(inplace=False)
        self.conv1 = nn.Conv2d(in_chs, out_chs // 2, 1, stride=2, bias=False)
        self.conv2 = nn.Conv2d(in_chs, out_chs // 2, 1, stride=2, bias=False)
        self.bn = nn.BatchNorm2d(out_chs, affine=affine)

    def _original_names(self) -> Dict[str, str]:
        return {'act': 'relu', 'conv1': 'conv_1', 'conv2': 'conv_2'}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.act(x)
        return self.bn(torch.cat([self.conv1(x), self.conv2(x[:, :, 1:, 1:])], dim=1))


def skip_connect(chs: int, stride: int, affine: bool = True) -> nn.Module:
    """Identity, or a :class:`FactorizedReduce` where the operation strides."""
    return nn.Identity() if stride == 1 else FactorizedReduce(chs, chs, affine=affine)


#: DARTS' operation set: name -> constructor(channels, stride, affine).
OPS: Dict[str, Callable[[int, int, bool], nn.Module]] = {
    'none': lambda c, stride, affine: Zero(stride),
    'avg_pool_3x3': lambda c, stride, affine: nn.AvgPool2d(3, stride=stride, padding=1, count_include_pad=False),
    'max_pool_3x3': lambda c, stride, affine: nn.MaxPool2d(3, stride=stride, padding=1),
    'skip_connect': skip_connect,
    'sep_conv_3x3': lambda c, stride, affine: SepConv(c, c, 3, stride, 1, affine=affine),
    'sep_conv_5x5': lambda c, stride, affine: SepConv(c, c, 5, stride, 2, affine=affine),
    'sep_conv_7x7': lambda c, stride, affine: SepConv(c, c, 7, stride, 3, affine=affine),
    'dil_conv_3x3': lambda c, stride, affine: DilConv(c, c, 3, stride, 2, 2, affine=affine),
    'dil_conv_5x5': lambda c, stride, affine: DilConv(c, c, 5, stride, 4, 2, affine=affine),
    'conv_7x1_1x7': lambda c, stride, affine: Conv7x1x7(c, stride, affine=affine),
}


def preprocess_inputs(prev_prev_chs: int, prev_chs: int, chs: int, reduction_prev: bool,
                      affine: bool) -> Tuple[nn.Module, nn.Module]:
    """The two input preprocessors of a cell; the older input is also halved when the previous cell reduced."""
    pre0 = FactorizedReduce(prev_prev_chs, chs, affine=affine) if reduction_prev \
        else ReLUConvBN(prev_prev_chs, chs, affine=affine)
    return pre0, ReLUConvBN(prev_chs, chs, affine=affine)


# --- cells -------------------------------------------------------------------------------------------
class DartsCell(nn.Module):
    """A cell built from a genotype: each node sums two operations on earlier states.

    Args:
        genotype: The architecture; its ``reduce`` half is used when ``reduction``.
        prev_prev_chs: Channels of the output of the cell two back.
        prev_chs: Channels of the output of the previous cell.
        chs: Channels of every node.
        reduction: Whether this cell halves the resolution.
        reduction_prev: Whether the previous cell did.
        affine: Whether batch norms have a learnable affine transform.
        drop_path_rate: Drop-path probability on non-identity operations in training.
    """

    def __init__(self, genotype: Genotype, prev_prev_chs: int, prev_chs: int, chs: int, reduction: bool,
                 reduction_prev: bool, *, affine: bool = True, drop_path_rate: float = 0.0) -> None:
        super().__init__()
        edges = genotype.reduce if reduction else genotype.normal
        concat = genotype.reduce_concat if reduction else genotype.normal_concat
        _check_genotype_half(edges, concat, 'reduce' if reduction else 'normal')
        self.preprocess0, self.preprocess1 = preprocess_inputs(prev_prev_chs, prev_chs, chs, reduction_prev, affine)
        self.indices = [int(index) for _, index in edges]
        self.concat = [int(i) for i in concat]
        self.ops = nn.ModuleList([
            OPS[name](chs, 2 if reduction and index < 2 else 1, affine) for name, index in edges])
        self.drop_path, self.dropped = edge_drop_path(self.ops, drop_path_rate)
        self.out_channels = len(self.concat) * chs

    def _original_names(self) -> Dict[str, str]:
        return {'ops': '_ops'}

    def forward(self, s0: torch.Tensor, s1: torch.Tensor) -> torch.Tensor:
        states = [self.preprocess0(s0), self.preprocess1(s1)]
        first = states[0]
        for i, op in enumerate(self.ops):  # node n sums edges 2n and 2n + 1
            out = op(states[self.indices[i]])
            if self.dropped[i]:
                out = self.drop_path(out)
            if i % 2 == 0:
                first = out
            else:
                states.append(first + out)
        return torch.cat([states[i] for i in self.concat], dim=1)


def edge_drop_path(ops: Sequence[nn.Module], rate: float) -> Tuple[nn.Module, List[bool]]:
    """DARTS' drop path of a cell: one ``DropPath(rate)`` (Identity at 0), and for each operation whether it
    applies (not to identity and zero edges)."""
    return (DropPath(rate) if rate > 0 else nn.Identity(),
            [rate > 0 and not isinstance(op, (nn.Identity, Zero)) for op in ops])


def _check_genotype_half(edges: Sequence[Tuple[str, int]], concat: Sequence[int], half: str) -> None:
    if not edges or len(edges) % 2:
        raise ValueError(f'Genotype.{half} must list two (op, input) pairs per node, got {len(edges)} pairs.')
    for k, (name, index) in enumerate(edges):
        if name not in OPS:
            raise ValueError(f"Genotype.{half}[{k}] names unknown operation '{name}'; use one of {sorted(OPS)}.")
        if not 0 <= int(index) < 2 + k // 2:
            raise ValueError(f'Genotype.{half}[{k}] reads state {index}, but node {k // 2} can only read states '
                             f'0..{1 + k // 2} (the two cell inputs and earlier nodes).')
    n_states = 2 + len(edges) // 2
    if not concat or any(not 0 <= int(i) < n_states for i in concat):
        raise ValueError(f'Genotype.{half}_concat={list(concat)} must name states in 0..{n_states - 1}.')


def resolve_genotype(genotype: Union[str, Genotype, Mapping[str, Any], Sequence[Any]]) -> Genotype:
    """A :class:`Genotype` from itself, a name in :data:`GENOTYPES`, a mapping or a 4-sequence."""
    if isinstance(genotype, str):
        if genotype.lower() not in GENOTYPES:
            raise ValueError(f"Unknown genotype '{genotype}'; use one of {sorted(GENOTYPES)} or pass a Genotype.")
        return GENOTYPES[genotype.lower()]
    if isinstance(genotype, Genotype):
        return genotype
    if isinstance(genotype, Mapping):
        return Genotype(**genotype)
    if isinstance(genotype, Sequence) and len(genotype) == 4:
        return Genotype(*genotype)
    raise ValueError(f'genotype must be a Genotype, a name in {sorted(GENOTYPES)}, a mapping with keys '
                     f'{Genotype._fields} or a 4-sequence, got {type(genotype).__name__}.')


# --- network scaffolding -----------------------------------------------------------------------------
STEM_TYPES = ('cifar', 'imagenet')


class CellNetwork(ClassifierHeadMixin, nn.Module):
    """Stem, cell stack and classifier head shared by the DARTS-style families.

    Subclasses implement :meth:`_make_cell`. The 'cifar' stem is a 3x3 convolution to
    ``stem_multiplier * C`` channels and an affine batch norm, feeding both inputs of the first
    cell; the 'imagenet' stem reduces by 4 (two stride-2 convolutions) for the older input and by
    8 (one more ReLU-conv-BN) for the newer one, and the first cell treats it as a reduction.

    Args:
        C: Node channels of the first cells (doubled at each reduction cell).
        layers: Number of cells.
        stem_type: 'cifar' or 'imagenet'.
        stem_multiplier: Stem width in units of ``C`` ('cifar' stem).
        num_classes: Classifier outputs; 0 for a feature extractor.
        in_chans: Input channels.
        global_pool: Global pooling type of the head.
        drop_rate: Dropout before the classifier.
        drop_path_rate: Drop-path probability on the cells' operations (not identity or zero edges) in
            training: DARTS' ``drop_path_prob``, one rate for every cell.
    """

    def __init__(self, *, C: int, layers: int, stem_type: str = 'cifar', stem_multiplier: int = 3,
                 num_classes: int = 10, in_chans: int = 3, global_pool: str = 'avg', drop_rate: float = 0.0,
                 drop_path_rate: float = 0.0) -> None:
        super().__init__()
        if C < 2 or C % 2 or layers < 1:
            raise ValueError(f'C must be an even number >= 2 and layers >= 1, got C={C}, layers={layers}.')
        if stem_type not in STEM_TYPES:
            raise ValueError(f"Unknown stem_type '{stem_type}'; use one of {STEM_TYPES}.")
        self.num_classes = num_classes
        self.drop_rate = drop_rate
        self.drop_path_rate = drop_path_rate
        self.grad_checkpointing = False
        self.stem_type = stem_type

        if stem_type == 'imagenet':
            self.stem = nn.Sequential(OrderedDict(
                conv1=nn.Conv2d(in_chans, C // 2, 3, stride=2, padding=1, bias=False),
                bn1=nn.BatchNorm2d(C // 2),
                act=nn.ReLU(inplace=False),
                conv2=nn.Conv2d(C // 2, C, 3, stride=2, padding=1, bias=False),
                bn2=nn.BatchNorm2d(C),
            ))
            self.stem_reduce = nn.Sequential(OrderedDict(
                act=nn.ReLU(inplace=False),
                conv=nn.Conv2d(C, C, 3, stride=2, padding=1, bias=False),
                bn=nn.BatchNorm2d(C),
            ))
            prev_prev_chs = prev_chs = C
            reduction_prev, stride = True, 8
            self.feature_info: List[Dict[str, Any]] = [dict(num_chs=C, reduction=4, module='stem')]
        else:
            stem_chs = stem_multiplier * C
            self.stem = nn.Sequential(OrderedDict(
                conv=nn.Conv2d(in_chans, stem_chs, 3, padding=1, bias=False),
                bn=nn.BatchNorm2d(stem_chs),
            ))
            self.stem_reduce = None
            prev_prev_chs = prev_chs = stem_chs
            reduction_prev, stride = False, 1
            self.feature_info = []

        self.reduction_cells = sorted({layers // 3, 2 * layers // 3})
        chs = C
        cells = []
        for i in range(layers):
            reduction = i in self.reduction_cells
            if reduction:
                chs *= 2
                tap = f'cells.{i - 1}' if i > 0 else 'stem' if self.stem_reduce is None else 'stem_reduce'
                self.feature_info.append(dict(num_chs=prev_chs, reduction=stride, module=tap))
                stride *= 2
            cell = self._make_cell(i, prev_prev_chs, prev_chs, chs, reduction, reduction_prev)
            cells.append(cell)
            reduction_prev = reduction
            prev_prev_chs, prev_chs = prev_chs, cell.out_channels
        self.cells = nn.ModuleList(cells)
        self.feature_info.append(dict(num_chs=prev_chs, reduction=stride, module=f'cells.{layers - 1}'))

        self.num_features = self.head_hidden_size = prev_chs
        self.head = ClassifierHead(prev_chs, num_classes, pool_type=global_pool, drop_rate=drop_rate)

    def _make_cell(self, index: int, prev_prev_chs: int, prev_chs: int, chs: int, reduction: bool,
                   reduction_prev: bool) -> nn.Module:
        raise NotImplementedError

    def _original_names(self) -> Dict[str, str]:
        names = {'head.fc': 'classifier'}
        if self.stem_type == 'imagenet':
            names.update(stem='stem0', stem_reduce='stem1')
        return names

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> Dict[str, Any]:
        return dict(stem=r'^stem', blocks=r'^cells\.(\d+)')

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.grad_checkpointing = enable

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        s0 = self.stem(x)
        s1 = self.stem_reduce(s0) if self.stem_reduce is not None else s0
        for cell in self.cells:
            if self.grad_checkpointing and not torch.jit.is_scripting():
                s0, s1 = s1, checkpoint(cell, s0, s1, use_reentrant=False)
            else:
                s0, s1 = s1, cell(s0, s1)
        return s1

    @torch.jit.ignore
    def forward_intermediates(
            self,
            x: torch.Tensor,
            indices: Optional[Union[int, List[int]]] = None,
            norm: bool = False,
            stop_early: bool = False,
            output_fmt: str = 'NCHW',
            intermediates_only: bool = False,
    ) -> Union[List[torch.Tensor], Tuple[torch.Tensor, List[torch.Tensor]]]:
        """The outputs at the ``feature_info`` taps (those of ``features_only``: the stem or the cell before
        each reduction, and the last cell) and the final features, as timm's models give them.

        Args:
            x: Input images.
            indices: The last n taps for an int, these taps for a list, all for None.
            norm: Unused (the network has no final norm); timm's signature.
            stop_early: Stop at the last tap asked for.
            output_fmt: 'NCHW', the only format.
            intermediates_only: Return the tap outputs alone.

        Returns:
            The tap outputs, or ``(forward_features(x), tap outputs)``.
        """
        take, max_index = intermediate_indices(len(self.feature_info), indices, output_fmt)
        wanted = {self.feature_info[i]['module'] for i in take}
        stop_at = self.feature_info[max_index]['module'] if stop_early else None
        intermediates: List[torch.Tensor] = []

        def tap(name: str, t: torch.Tensor) -> bool:
            if name in wanted:
                intermediates.append(t)
            return name == stop_at

        s0 = self.stem(x)
        done = tap('stem', s0)
        s1 = s0
        if self.stem_reduce is not None and not done:
            s1 = self.stem_reduce(s0)
            done = tap('stem_reduce', s1)
        for i, cell in enumerate(self.cells):
            if done:
                break
            if self.grad_checkpointing:
                s0, s1 = s1, checkpoint(cell, s0, s1, use_reentrant=False)
            else:
                s0, s1 = s1, cell(s0, s1)
            done = tap(f'cells.{i}', s1)
        return intermediates if intermediates_only else (s1, intermediates)

    def prune_intermediate_layers(self, indices: Union[int, List[int]] = 1, prune_norm: bool = False,
                                  prune_head: bool = True) -> List[int]:
        """Drops the cells after the last tap in ``indices`` (and the head), as timm's models do; returns the
        taps kept."""
        take, max_index = intermediate_indices(len(self.feature_info), indices)
        module = self.feature_info[max_index]['module']
        keep = int(module.split('.')[1]) + 1 if module.startswith('cells.') else 0
        truncated = keep < len(self.cells)
        self.cells = self.cells[:keep]
        if module == 'stem' and self.stem_reduce is not None:
            self.stem_reduce = None
        if truncated:
            self.num_features = self.head_hidden_size = self.feature_info[max_index]['num_chs']
        if prune_head or truncated:
            self.reset_classifier(0, '')
        return take

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        return self.head(x, pre_logits=pre_logits) if pre_logits else self.head(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


class DartsNetwork(CellNetwork):
    """A DARTS-style network from a genotype (the authors' ``NetworkCIFAR`` / ``AdvRush``).

    Args:
        genotype: A :class:`Genotype`, or a name in :data:`GENOTYPES` ('advrush', 'racl').
        C: Node channels of the first cells.
        layers: Number of cells.
        affine: Whether the cells' batch norms are affine (True in the authors' evaluation networks).
        **kwargs: Stem, head and drop-path arguments of :class:`CellNetwork`.
    """

    def __init__(self, genotype: Union[str, Genotype] = 'advrush', C: int = 36, layers: int = 20, *,
                 affine: bool = True, **kwargs: Any) -> None:
        self.genotype = resolve_genotype(genotype)
        self._affine = affine
        super().__init__(C=C, layers=layers, **kwargs)

    def _make_cell(self, index: int, prev_prev_chs: int, prev_chs: int, chs: int, reduction: bool,
                   reduction_prev: bool) -> nn.Module:
        return DartsCell(self.genotype, prev_prev_chs, prev_chs, chs, reduction, reduction_prev,
                         affine=self._affine, drop_path_rate=self.drop_path_rate)


# --- checkpoint layouts ------------------------------------------------------------------------------
def original_keys(model: nn.Module) -> Dict[str, str]:
    """Maps each state-dict key of a cell network to the authors' key for the same tensor.

    Modules that the authors name differently define ``_original_names()`` (our child path ->
    theirs, one or two levels deep); unnamed ``nn.Sequential`` children are numbered, as in the
    authors' ``nn.Sequential`` stems.
    """
    out = {}
    for key in model.state_dict():
        parts = key.split('.')
        module, orig, i = model, [], 0
        while i < len(parts) - 1:
            names = module._original_names() if hasattr(module, '_original_names') else {}
            two = '.'.join(parts[i:i + 2])
            if i + 2 < len(parts) and two in names:
                orig.append(names[two])
                module = module.get_submodule(two)
                i += 2
                continue
            name = parts[i]
            if name in names:
                orig.append(names[name])
            elif type(module) is nn.Sequential:
                orig.append(str(list(module._modules).index(name)))
            else:
                orig.append(name)
            module = module._modules[name]
            i += 1
        out[key] = '.'.join(orig + parts[-1:])
    return out


#: RobNets wrap each cell operation in ``ChosenOperation.op``; DARTS operations are not wrapped.
ROBNETS_OP_KEY = re.compile(r'\._ops\.\d+\.op\.(op|conv|res|conv_1|conv_2|bn)\.')

#: Checkpoint-only keys of training-time modules the evaluation network does not have.
_TRAINING_ONLY_PREFIXES = ('auxiliary_head.',)


def filter_cell_network_checkpoint(state_dict: Dict[str, Any], model: nn.Module,
                                   layout: str) -> Dict[str, torch.Tensor]:
    """Renames a stripped state dict from the authors' layout (or ours, 'timm') to this model's keys.

    Drops the auxiliary tower (training only), fills ``num_batches_tracked`` that pre-0.4.1
    PyTorch checkpoints lack, and keeps unknown keys so that strict loading names them.
    """
    if layout != 'timm':
        to_ours = {orig: ours for ours, orig in original_keys(model).items()}
        state_dict = {to_ours.get(k, k): v for k, v in state_dict.items()
                      if not k.startswith(_TRAINING_ONLY_PREFIXES)}
    from .layers import fit_num_batches_tracked

    return fit_num_batches_tracked(state_dict, model.state_dict())


CHECKPOINT_LAYOUTS = ('darts', 'timm')


def detect_layout(state_dict: Dict[str, torch.Tensor]) -> str:
    """Names the layout of a DartsNetwork state dict: 'timm' (ours) or 'darts' (nutellamok/advrush, DARTS,
    and Huang et al. 2022's copy)."""
    keys = list(state_dict.keys())
    if any(k.startswith('head.fc.') for k in keys):
        return 'timm'
    if any(k.startswith('classifier.') for k in keys) and any('._ops.' in k for k in keys):
        if any(ROBNETS_OP_KEY.search(k) for k in keys):
            raise ValueError('This is a RobNet checkpoint (RobNets op wrappers in its keys); load it into a '
                             'robnet_* model.')
        return 'darts'
    raise ValueError('Unrecognised checkpoint layout for a DARTS-style model: expected head.fc.* (ours) or '
                     f"classifier.* with cells.*._ops.* (the authors'); first keys: {keys[:5]}.")


def checkpoint_filter_fn(state_dict: Dict[str, Any], model: DartsNetwork,
                         layout: Optional[str] = None) -> Dict[str, torch.Tensor]:
    """Maps an AdvRush/RACL checkpoint to this model's keys.

    Accepts the authors' ``{'state_dict': ...}`` checkpoints and bare state dicts (``weights.pt``),
    with or without ``module.`` prefixes.

    Args:
        state_dict: The loaded checkpoint.
        model: The model it will load into.
        layout: 'darts' or 'timm'; detected when None.
    """
    state_dict = strip_checkpoint_wrappers(state_dict)
    layout = layout or detect_layout(state_dict)
    if layout not in CHECKPOINT_LAYOUTS:
        raise ValueError(f"Unknown layout '{layout}' for a DARTS-style model; use one of {list(CHECKPOINT_LAYOUTS)}.")
    return filter_cell_network_checkpoint(state_dict, model, layout)


# --- creation ----------------------------------------------------------------------------------------
def feature_cfg(kwargs: Mapping[str, Any]) -> Dict[str, Any]:
    """timm's ``feature_cfg`` for a cell network built with ``kwargs``: forward hooks, every tap."""
    layers = int(kwargs['layers'])
    n_taps = len({layers // 3, 2 * layers // 3}) + 1 + (kwargs.get('stem_type') == 'imagenet')
    return dict(feature_cls='hook', no_rewrite=True, out_indices=tuple(range(n_taps)))


def _create_darts(variant: str, pretrained: bool = False, *, arch_args: Optional[Dict[str, Any]] = None,
                  **kwargs: Any) -> DartsNetwork:
    kwargs = resolve_pretrained_kwargs(variant, pretrained, kwargs, arch_args=arch_args)
    return build_model_with_cfg(
        DartsNetwork, variant, pretrained,
        pretrained_filter_fn=checkpoint_filter_fn,
        feature_cfg=feature_cfg(kwargs),
        **kwargs,
    )


def cell_network_cfg(url: str = '', **kwargs: Any) -> Dict[str, Any]:
    """timm pretrained cfg of a CIFAR cell network (RobNet, DARTS-style): [0, 1] inputs, 32x32."""
    return {
        'url': url,
        'num_classes': 10, 'input_size': (3, 32, 32), 'pool_size': (8, 8),
        'crop_pct': 1.0, 'interpolation': 'bilinear', 'fixed_input_size': False,
        'mean': (0.0, 0.0, 0.0), 'std': (1.0, 1.0, 1.0),
        'first_conv': 'stem.conv', 'classifier': 'head.fc',
        **kwargs,
    }


default_cfgs = generate_default_cfgs({
    'advrush': cell_network_cfg(license='apache-2.0', paper_ids='arXiv:2108.01289',
                    paper_name='AdvRush: Searching for Adversarially Robust Neural Architectures'),
    'racl': cell_network_cfg(license='apache-2.0', paper_ids='arXiv:2009.00902',
                 paper_name='Adversarially Robust Neural Architectures'),
})


#: Huang et al. 2022's sizes (their Table of NAS baselines: AdvRush 32.6M / 4.97G, RACL 32.5M / 4.93G MACs);
#: the authors' own evaluation default is C=36, layers=20.
DARTS_CONFIGS: Dict[str, Dict[str, Any]] = {
    'advrush': dict(genotype='advrush', C=96, layers=23),
    'racl': dict(genotype='racl', C=104, layers=23),
}


@register_model
def advrush(pretrained: bool = False, **kwargs: Any) -> DartsNetwork:
    """AdvRush (Mok et al. 2021), C=96, 23 cells (32.6M params, 4.97G MACs)."""
    return _create_darts('advrush', pretrained, arch_args=DARTS_CONFIGS['advrush'], **kwargs)


@register_model
def racl(pretrained: bool = False, **kwargs: Any) -> DartsNetwork:
    """RACL (Dong et al. 2020), C=104, 23 cells (32.5M params, 4.93G MACs)."""
    return _create_darts('racl', pretrained, arch_args=DARTS_CONFIGS['racl'], **kwargs)
