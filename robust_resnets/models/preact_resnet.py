"""Pre-activation ResNets for 32x32 inputs: RobustResNets, WRN-A*, Wide ResNets and the SCORE Swish WRNs.

One generic builder, :class:`PreActResNet`, assembles a stem convolution, three stages of
pre-activation blocks and a norm/act/pool/linear head. Every registered model is a named
configuration of it:

* ``robust_resnet_a1`` .. ``a4`` and ``wrn_a1`` .. ``a4``: Huang et al. 2022, "Revisiting Residual
  Networks for Adversarial Robustness" (arXiv 2212.11005), RobustResBlock or the basic block with
  the RobustScaling depths/widths.
* ``wrn_28_10`` .. ``wrn_70_16``: the pre-activation Wide ResNet baselines of the same paper.
* ``wrn_34_r``: WRN-34-R of Huang et al. 2021 (arXiv 2110.03825).
* ``wrn_28_10_swish``, ``wrn_70_16_swish``: the Swish WRNs of Pang et al. 2022 (SCORE) in
  RobustBench's DMWideResNet layout (input standardisation inside, TF-style 'same' padding).

Inputs are [0, 1] pixels; where a checkpoint expects standardised inputs the model holds an
:class:`~robust_resnets.models.layers.InputNormalize` in front.
"""
from __future__ import annotations

import math
import re
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn
from timm.layers import ClassifierHead, DropPath, create_act_layer, create_conv2d
from timm.models import build_model_with_cfg, checkpoint_seq, generate_default_cfgs, register_model

from ..weights import resolve_pretrained_kwargs
from .layers import (
    CIFAR10_MEAN, CIFAR10_STD, ClassifierHeadMixin, InputNormalize, LayerType, resolve_act_layer, resolve_norm_layer,
    fill_input_normalize, intermediate_indices, strip_checkpoint_wrappers,
)

__all__ = ['PreActBasicBlock', 'RobustResBlock', 'PreActStage', 'PreActResNet', 'checkpoint_filter_fn']

BLOCK_TYPES = ('basic', 'robust_res_block')


def _conv(in_chs: int, out_chs: int, kernel_size: int, stride: int = 1, groups: int = 1,
          padding: str = '') -> nn.Conv2d:
    """A bias-free convolution; padding '' is symmetric k//2, 'same' is TF-style (asymmetric when strided)."""
    return create_conv2d(in_chs, out_chs, kernel_size, stride=stride, groups=groups, padding=padding, bias=False)


class PreActBasicBlock(nn.Module):
    """Pre-activation basic block of Wide ResNets: BN-act-conv-BN-act-conv plus a shortcut.

    The projection shortcut (a strided 1x1 conv, present when the stride or width changes) reads
    the pre-activated input, as in every WRN of the papers reproduced here.

    Args:
        in_chs: Input channels.
        out_chs: Output channels.
        stride: Stride of the first convolution and of the shortcut.
        kernel_size: Kernel size of both convolutions.
        activation: Activation name or class.
        normalization: Normalisation name or class.
        padding: '' for symmetric padding, 'same' for TF-style padding (RobustBench's DMWideResNet).
        drop_path: Stochastic-depth rate of the residual branch in training.
    """

    expansion = 1

    def __init__(
            self,
            in_chs: int,
            out_chs: int,
            stride: int = 1,
            *,
            kernel_size: int = 3,
            activation: LayerType = 'ReLU',
            normalization: LayerType = 'BatchNorm',
            padding: str = '',
            drop_path: float = 0.0,
            **kwargs: Any,
    ) -> None:
        super().__init__()
        act_layer = resolve_act_layer(activation)
        norm_layer = resolve_norm_layer(normalization)
        self.out_channels = out_chs
        self.norm1 = norm_layer(in_chs)
        self.act1 = create_act_layer(act_layer, inplace=True)
        self.conv1 = _conv(in_chs, out_chs, kernel_size, stride=stride, padding=padding)
        self.norm2 = norm_layer(out_chs)
        self.act2 = create_act_layer(act_layer, inplace=True)
        self.conv2 = _conv(out_chs, out_chs, kernel_size, padding=padding)
        self.shortcut = _conv(in_chs, out_chs, 1, stride=stride) if stride != 1 or in_chs != out_chs else None
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.act1(self.norm1(x))
        shortcut = x
        if self.shortcut is not None:
            shortcut = self.shortcut(out)
        out = self.conv1(out)
        out = self.conv2(self.act2(self.norm2(out)))
        return self.drop_path(out) + shortcut


class ResidualSqueezeExcite(nn.Module):
    """The squeeze-and-excitation gate of RobustResBlock: avg-pool, bias-free FC-ReLU-FC-sigmoid, scale."""

    def __init__(self, channels: int, reduction: int = 16) -> None:
        super().__init__()
        hidden = channels // reduction
        if hidden < 1:
            raise ValueError(f'se_reduction={reduction} leaves no hidden units for {channels} channels; '
                             f'use se_reduction <= {channels}.')
        self.fc1 = nn.Linear(channels, hidden, bias=False)
        self.act = nn.ReLU(inplace=True)
        self.fc2 = nn.Linear(hidden, channels, bias=False)
        self.gate = nn.Sigmoid()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = x.mean((2, 3))
        y = self.gate(self.fc2(self.act(self.fc1(y))))
        return x * y[:, :, None, None]


class RobustResBlock(nn.Module):
    """RobustResBlock of Huang et al. 2022: a pre-activation bottleneck with hierarchical (Res2Net-style)
    aggregated convolutions and a residual squeeze-and-excitation branch.

    The block emits ``out_chs * expansion`` (= 4 * out_chs) channels: ``out_chs`` plays the role of
    the bottleneck ``planes`` of the authors' code, and the networks' channel configs count it so.

    Args:
        in_chs: Input channels.
        out_chs: Bottleneck planes; the output has ``4 * out_chs`` channels.
        stride: Stride of the split convolutions and of the shortcut.
        kernel_size: Kernel size of the split convolutions.
        scales: Number of hierarchical splits (1 disables the hierarchy).
        base_width: Split width per cardinality group, per 160 planes.
        cardinality: Groups of each split convolution (aggregated convolutions).
        se_reduction: Reduction ratio of the residual SE branch.
        activation: Activation name or class.
        normalization: Normalisation name or class.
        padding: '' for symmetric padding, 'same' for TF-style padding.
        drop_path: Stochastic-depth rate of the residual branches (convolutions and SE) in training.
    """

    expansion = 4

    def __init__(
            self,
            in_chs: int,
            out_chs: int,
            stride: int = 1,
            *,
            kernel_size: int = 3,
            scales: int = 8,
            base_width: int = 10,
            cardinality: int = 4,
            se_reduction: int = 64,
            activation: LayerType = 'ReLU',
            normalization: LayerType = 'BatchNorm',
            padding: str = '',
            drop_path: float = 0.0,
            **kwargs: Any,
    ) -> None:
        super().__init__()
        if scales < 1 or cardinality < 1 or base_width < 1:
            raise ValueError(f'scales, cardinality and base_width must be >= 1, got {scales}, {cardinality}, '
                             f'{base_width}.')
        act_layer = resolve_act_layer(activation)
        norm_layer = resolve_norm_layer(normalization)
        width = int(math.floor(out_chs * (base_width / 160))) * cardinality
        if width < 1:
            raise ValueError(f'RobustResBlock(out_chs={out_chs}, base_width={base_width}) has split width 0; '
                             f'raise out_chs or base_width so that out_chs * base_width >= 160.')
        out_features = out_chs * self.expansion
        self.scales = scales
        self.stride = stride
        self.out_channels = out_features

        self.norm1 = norm_layer(in_chs)
        self.act = create_act_layer(act_layer, inplace=True)
        self.conv1 = _conv(in_chs, width * scales, 1)
        self.norm2 = norm_layer(width * scales)
        n_convs = max(scales - 1, 1)
        self.conv2 = nn.ModuleList([
            _conv(width, width, kernel_size, stride=stride, groups=cardinality, padding=padding)
            for _ in range(n_convs)])
        self.norm3 = nn.ModuleList([norm_layer(width) for _ in range(n_convs)])
        # the last split bypasses the convolutions; when strided it is average-pooled instead
        self.pool = nn.AvgPool2d(kernel_size=3, stride=stride, padding=1) if stride > 1 and scales > 1 else None
        self.conv3 = _conv(width * scales, out_features, 1)
        self.se_norm = norm_layer(out_features)
        self.se = ResidualSqueezeExcite(out_features, reduction=se_reduction)
        self.shortcut = _conv(in_chs, out_features, 1, stride=stride) \
            if stride > 1 or in_chs != out_features else None
        self.drop_path = DropPath(drop_path) if drop_path > 0 else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = x
        if self.shortcut is not None:
            shortcut = self.shortcut(self.act(self.norm1(x)))
        # the bottleneck reads the block input itself; only the projection shortcut is pre-activated
        out = self.act(self.norm2(self.conv1(x)))
        if self.scales == 1:
            out = self.act(self.norm3[0](self.conv2[0](out)))
        else:
            splits = torch.chunk(out, self.scales, 1)
            ys: List[torch.Tensor] = []
            prev = splits[0]
            for s, (conv, norm) in enumerate(zip(self.conv2, self.norm3)):
                inp = splits[s]
                if s > 0 and self.stride == 1:
                    inp = inp + prev
                prev = self.act(norm(conv(inp)))
                ys.append(prev)
            last = splits[self.scales - 1]
            if self.pool is not None:
                last = self.pool(last)
            ys.append(last)
            out = torch.cat(ys, 1)
        out = self.conv3(out)
        se = self.se(self.se_norm(out))
        if self.drop_path is None:
            return out + shortcut + se  # the authors' summation order, for bit-exact outputs
        return self.drop_path(out + se) + shortcut


_BLOCKS = {'basic': PreActBasicBlock, 'basic_block': PreActBasicBlock, 'robust_res_block': RobustResBlock}


def _block_cls(block_type: str) -> type:
    if block_type not in _BLOCKS:
        raise ValueError(f"Unknown block type '{block_type}'; use 'basic' or 'robust_res_block'.")
    return _BLOCKS[block_type]


class PreActStage(nn.Module):
    """A stage of blocks; the first one strides and changes width."""

    def __init__(self, in_chs: int, out_chs: int, depth: int, stride: int, block_type: str, *,
                 drop_path_rates: Optional[Sequence[float]] = None, **block_kwargs: Any) -> None:
        super().__init__()
        block_cls = _block_cls(block_type)
        drop_path_rates = drop_path_rates or [0.0] * depth
        self.grad_checkpointing = False
        blocks = []
        for i in range(depth):
            block = block_cls(in_chs, out_chs, stride if i == 0 else 1, drop_path=drop_path_rates[i], **block_kwargs)
            in_chs = block.out_channels
            blocks.append(block)
        self.out_channels = in_chs
        self.blocks = nn.Sequential(*blocks)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.grad_checkpointing and not torch.jit.is_scripting():
            return checkpoint_seq(self.blocks, x)
        return self.blocks(x)


def _per_stage(value: Any, n: int, name: str) -> Tuple[Any, ...]:
    if isinstance(value, (list, tuple)):
        if len(value) != n:
            raise ValueError(f'{name} has {len(value)} entries but the network has {n} stages; give one per stage.')
        return tuple(value)
    return (value,) * n


class PreActResNet(ClassifierHeadMixin, nn.Module):
    """Generic pre-activation ResNet for small images (the authors' ``PreActResNet`` / WRN builder).

    Args:
        depths: Blocks per stage, e.g. (4, 4, 4) for WRN-28-10.
        widths: Widening factor per stage; stage i has ``base_channels[i] * widths[i]`` channels.
            Ignored when ``channels`` is given.
        channels: Explicit stage channels (bottleneck planes for RobustResBlock), overriding ``widths``.
        base_channels: Channels per stage at width 1 (16, 32, 64 as in WRNs).
        stem_chs: Output channels of the stem convolution.
        strides: Stride of each stage.
        block_types: 'basic' or 'robust_res_block', one for all stages or one per stage.
        kernel_sizes: Kernel size, one or one per stage.
        activations: Activation name/class, one or one per stage; the head uses the last.
        normalizations: Normalisation name/class, one or one per stage; the head uses the last.
        scales: RobustResBlock hierarchical splits.
        base_width: RobustResBlock split width per group per 160 planes.
        cardinality: RobustResBlock groups.
        se_reduction: RobustResBlock SE reduction.
        padding: '' for symmetric conv padding, 'same' for TF-style padding.
        input_mean: Per-channel mean of the in-model input standardisation; None for none.
        input_std: Per-channel std of the in-model input standardisation.
        num_classes: Classifier outputs; 0 for a feature extractor.
        in_chans: Input channels.
        global_pool: Global pooling type of the head.
        drop_rate: Dropout before the classifier.
        drop_path_rate: Stochastic-depth rate, increasing linearly over the blocks to this value.
    """

    def __init__(
            self,
            depths: Sequence[int] = (4, 4, 4),
            widths: Union[int, Sequence[float]] = (10, 10, 10),
            *,
            channels: Optional[Sequence[int]] = None,
            base_channels: Sequence[int] = (16, 32, 64),
            stem_chs: int = 16,
            strides: Sequence[int] = (1, 2, 2),
            block_types: Union[str, Sequence[str]] = 'basic',
            kernel_sizes: Union[int, Sequence[int]] = 3,
            activations: Union[LayerType, Sequence[LayerType]] = 'ReLU',
            normalizations: Union[LayerType, Sequence[LayerType]] = 'BatchNorm',
            scales: int = 8,
            base_width: int = 10,
            cardinality: int = 4,
            se_reduction: int = 64,
            padding: str = '',
            input_mean: Optional[Sequence[float]] = None,
            input_std: Optional[Sequence[float]] = None,
            num_classes: int = 10,
            in_chans: int = 3,
            global_pool: str = 'avg',
            drop_rate: float = 0.0,
            drop_path_rate: float = 0.0,
    ) -> None:
        super().__init__()
        n = len(depths)
        if n == 0 or any(int(d) < 1 for d in depths):
            raise ValueError(f'depths must be a non-empty list of positive block counts, got {tuple(depths)}.')
        if channels is None:
            widths = _per_stage(widths, n, 'widths')
            base_channels = _per_stage(tuple(base_channels), n, 'base_channels')
            channels = tuple(int(round(b * w)) for b, w in zip(base_channels, widths))
        channels = _per_stage(tuple(channels), n, 'channels')
        strides = _per_stage(tuple(strides), n, 'strides')
        block_types = _per_stage(block_types, n, 'block_types')
        kernel_sizes = _per_stage(kernel_sizes, n, 'kernel_sizes')
        activations = _per_stage(activations, n, 'activations')
        normalizations = _per_stage(normalizations, n, 'normalizations')
        if (input_mean is None) != (input_std is None):
            raise ValueError('Give both input_mean and input_std for in-model normalisation, or neither.')

        self.num_classes = num_classes
        self.drop_rate = drop_rate
        self.grad_checkpointing = False

        self.normalize = InputNormalize(input_mean, input_std, in_chans=in_chans) if input_mean is not None \
            else nn.Identity()
        self.stem = nn.Conv2d(in_chans, stem_chs, kernel_size=3, stride=1, padding=1, bias=False)

        self.feature_info: List[Dict[str, Any]] = []
        prev_chs = stem_chs
        reduction = 1
        stages = []
        dpr = torch.linspace(0, drop_path_rate, sum(int(d) for d in depths), device='cpu').split(
            [int(d) for d in depths])
        for i in range(n):
            stage = PreActStage(
                prev_chs, channels[i], int(depths[i]), strides[i], block_types[i], drop_path_rates=dpr[i].tolist(),
                kernel_size=kernel_sizes[i], activation=activations[i], normalization=normalizations[i],
                scales=scales, base_width=base_width, cardinality=cardinality, se_reduction=se_reduction,
                padding=padding)
            prev_chs = stage.out_channels
            reduction *= strides[i]
            self.feature_info.append(dict(num_chs=prev_chs, reduction=reduction, module=f'stages.{i}'))
            stages.append(stage)
        self.stages = nn.Sequential(*stages)

        self.num_features = self.head_hidden_size = prev_chs
        self.norm = resolve_norm_layer(normalizations[-1])(prev_chs)
        self.act = create_act_layer(resolve_act_layer(activations[-1]), inplace=True)
        self.head = ClassifierHead(prev_chs, num_classes, pool_type=global_pool, drop_rate=drop_rate)
        self.init_weights()

    @torch.jit.ignore
    def init_weights(self) -> None:
        """He-normal convolutions (fan-out), unit norms, zero linear bias: the authors' ``use_init``."""
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                fan_out = m.kernel_size[0] * m.kernel_size[1] * m.out_channels
                nn.init.normal_(m.weight, 0.0, math.sqrt(2.0 / fan_out))
            elif isinstance(m, (nn.BatchNorm2d, nn.GroupNorm)) and m.affine:
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear) and m.bias is not None:
                nn.init.zeros_(m.bias)

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> Dict[str, Any]:
        return dict(
            stem=r'^normalize|^stem',
            blocks=r'^stages\.(\d+)' if coarse else [
                (r'^stages\.(\d+)\.blocks\.(\d+)', None),
                (r'^norm', (99999,)),
            ],
        )

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        for stage in self.stages:
            stage.grad_checkpointing = enable

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        x = self.normalize(x)
        x = self.stem(x)
        x = self.stages(x)
        return self.act(self.norm(x))

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
        """The stage outputs (the taps of ``features_only``) and the final features, as timm's models give them.

        Args:
            x: Input images in [0, 1].
            indices: The last n stages for an int, these stages for a list, all for None.
            norm: Give the last stage's output after the final norm and activation.
            stop_early: Stop after the last stage asked for.
            output_fmt: 'NCHW', the only format.
            intermediates_only: Return the stage outputs alone.

        Returns:
            The stage outputs, or ``(forward_features(x), stage outputs)``.
        """
        take, max_index = intermediate_indices(len(self.stages), indices, output_fmt)
        last = len(self.stages) - 1
        intermediates = []
        x = self.stem(self.normalize(x))
        for i, stage in enumerate(self.stages[:max_index + 1] if stop_early else self.stages):
            x = stage(x)
            if i in take:
                intermediates.append(self.act(self.norm(x)) if norm and i == last else x)
        if intermediates_only:
            return intermediates
        if not stop_early or max_index == last:
            x = self.act(self.norm(x))
        return x, intermediates

    def prune_intermediate_layers(self, indices: Union[int, List[int]] = 1, prune_norm: bool = False,
                                  prune_head: bool = True) -> List[int]:
        """Drops the stages after the last tap in ``indices`` (and the head, and the final norm when asked or
        when stages went), as timm's models do; returns the taps kept."""
        take, max_index = intermediate_indices(len(self.stages), indices)
        truncated = max_index < len(self.stages) - 1
        self.stages = self.stages[:max_index + 1]
        if truncated:
            self.num_features = self.head_hidden_size = self.feature_info[max_index]['num_chs']
        if prune_norm or truncated:  # the final norm is sized for the last stage
            self.norm, self.act = nn.Identity(), nn.Identity()
        if prune_head or truncated:
            self.reset_classifier(0, '')
        return take

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        return self.head(x, pre_logits=pre_logits) if pre_logits else self.head(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


# --- checkpoint layouts ------------------------------------------------------------------------------
# Key renames from the authors' layouts to ours. Each is (pattern, replacement) on full keys.
_HUANG2022_RULES = (  # zhichao-lu/robust-residual-network and robustbench robust_resnet.py (PreActResNet)
    (r'^stem_conv\.', 'stem.'),
    (r'^blocks\.(\d+)\.layer\.(\d+)\.', r'stages.\1.blocks.\2.'),
    (r'\.shortcut\.0\.', '.shortcut.'),
    (r'\.bn1\.', '.norm1.'), (r'\.bn2\.', '.norm2.'),
    (r'\.bn3\.(\d+)\.', r'.norm3.\1.'), (r'\.bn3\.', '.norm3.0.'),
    (r'\.se_bn\.', '.se_norm.'),
    (r'\.se\.fc\.0\.', '.se.fc1.'), (r'\.se\.fc\.2\.', '.se.fc2.'),
    (r'^norm1\.', 'norm.'),
    (r'^fc\.', 'head.fc.'),
    (r'^mu$', 'normalize.mean'), (r'^sigma$', 'normalize.std'),
)
_ROBUSTWRN_RULES = (  # HanxunH/RobustWRN (RobustWideResNet), and TRADES-style WideResNet
    (r'^stem_conv\.', 'stem.'),
    (r'^conv1\.', 'stem.'),
    (r'^blocks\.(\d+)\.layer\.(\d+)\.', r'stages.\1.blocks.\2.'),
    (r'^block(\d)\.layer\.(\d+)\.', lambda m: f'stages.{int(m.group(1)) - 1}.blocks.{m.group(2)}.'),
    (r'\.convShortcut\.', '.shortcut.'),
    (r'\.bn1\.', '.norm1.'), (r'\.bn2\.', '.norm2.'),
    (r'^bn1\.', 'norm.'),
    (r'^fc\.', 'head.fc.'),
)
_DM_RULES = (  # RobustBench DMWideResNet (SCORE, Gowal et al.)
    (r'^init_conv\.', 'stem.'),
    (r'^layer\.(\d+)\.block\.(\d+)\.', r'stages.\1.blocks.\2.'),
    (r'\.batchnorm_0\.', '.norm1.'), (r'\.batchnorm_1\.', '.norm2.'),
    (r'\.conv_0\.', '.conv1.'), (r'\.conv_1\.', '.conv2.'),
    (r'^batchnorm\.', 'norm.'),
    (r'^logits\.', 'head.fc.'),
    (r'^mean$', 'normalize.mean'), (r'^std$', 'normalize.std'),
)
CHECKPOINT_LAYOUTS = {'huang2022': _HUANG2022_RULES, 'robustwrn': _ROBUSTWRN_RULES, 'dm_wrn': _DM_RULES}


def detect_layout(state_dict: Dict[str, torch.Tensor]) -> str:
    """Names the layout of a PreActResNet-family state dict: 'timm' (ours), 'huang2022', 'robustwrn' or 'dm_wrn'."""
    keys = list(state_dict.keys())
    if any(k.startswith('stages.') for k in keys):
        return 'timm'
    if any(k.startswith('init_conv.') or k.startswith('logits.') for k in keys):
        return 'dm_wrn'
    if any('convShortcut' in k or k.startswith('block1.') for k in keys) or \
            (any(k.startswith('bn1.') for k in keys) and not any(k.startswith('norm1.') for k in keys)):
        return 'robustwrn'
    if any(k.startswith('stem_conv.') or k.startswith('blocks.') for k in keys):
        return 'huang2022'
    raise ValueError('Unrecognised checkpoint layout for a PreActResNet-family model: none of the known key '
                     f"patterns matched (first keys: {keys[:5]}). If it is one of {sorted(CHECKPOINT_LAYOUTS)}, "
                     f"force it: `robust-resnets convert --layout NAME`, or layout= of checkpoint_filter_fn.")


def _check_robustwrn_shortcuts(model: nn.Module) -> None:
    """Refuses a model whose strided blocks keep their width: HanxunH/RobustWRN's 1x1 shortcut reads such a
    block's raw input where ours (and Huang et al.'s) reads it pre-activated, so its weights would compute
    something else here."""
    for name, m in model.named_modules():
        if isinstance(m, PreActBasicBlock) and m.shortcut is not None and m.shortcut.in_channels == m.out_channels:
            raise ValueError(
                f"Block {name} is strided with {m.out_channels} channels in and out: RobustWRN's shortcut reads "
                f"such a block's input before its norm and activation, ours after them, so a RobustWRN checkpoint "
                f"would not compute the same here. Widen the stage (channels) so that its width changes, as in "
                f"every RobustWRN configuration (WRN-34-R: 16, 320, 640, 512).")


def checkpoint_filter_fn(
        state_dict: Dict[str, Any],
        model: PreActResNet,
        layout: Optional[str] = None,
) -> Dict[str, torch.Tensor]:
    """Maps an original checkpoint (authors' layouts, RobustBench re-exports) to this model's keys.

    Handles ``state_dict``/``model_state_dict`` wrappers and ``module.``/``model.`` prefixes
    (DDP, EMA wrappers), drops ``num_batches_tracked`` counters the model lacks and fills those the
    checkpoint lacks (PyTorch < 0.4.1), and fills the in-model normalisation buffers from the model
    when the checkpoint has none (RobustBench keeps them out of its state dicts).
    """
    state_dict = strip_checkpoint_wrappers(state_dict)
    layout = layout or detect_layout(state_dict)
    if layout != 'timm':
        if layout not in CHECKPOINT_LAYOUTS:
            raise ValueError(f"Unknown layout '{layout}'; use one of {sorted(CHECKPOINT_LAYOUTS)} or 'timm'.")
        if layout == 'robustwrn':
            _check_robustwrn_shortcuts(model)
        rules = CHECKPOINT_LAYOUTS[layout]
        mapped = {}
        for k, v in state_dict.items():
            if layout == 'robustwrn' and k.startswith('sub_block1.'):
                continue  # TRADES' WideResNet builds an extra stage-1 copy that its forward never uses
            for pattern, repl in rules:
                k = re.sub(pattern, repl, k)
            mapped[k] = v
        state_dict = mapped
    model_sd = model.state_dict()
    for k in list(state_dict):  # RobustResBlock with scales=1 keeps a single conv2 in the authors' code
        if k not in model_sd and '.conv2.' in k:
            alt = k.replace('.conv2.', '.conv2.0.')
            if alt in model_sd:
                state_dict[alt] = state_dict.pop(k)
    from .layers import fit_num_batches_tracked

    out = fit_num_batches_tracked(state_dict, model_sd)
    fill_input_normalize(out, model_sd)
    for k in list(out):
        if k in model_sd and out[k].shape != model_sd[k].shape and out[k].numel() == model_sd[k].numel():
            out[k] = out[k].reshape(model_sd[k].shape)  # e.g. mu/sigma stored as (1, 3, 1, 1)
    return out


# --- creation ----------------------------------------------------------------------------------------
def _create_preact_resnet(variant: str, pretrained: bool = False, *, arch_args: Optional[Dict[str, Any]] = None,
                          **kwargs: Any) -> PreActResNet:
    kwargs = resolve_pretrained_kwargs(variant, pretrained, kwargs, arch_args=arch_args)
    return build_model_with_cfg(
        PreActResNet, variant, pretrained,
        pretrained_filter_fn=checkpoint_filter_fn,
        feature_cfg=dict(flatten_sequential=True, out_indices=(0, 1, 2)),
        **kwargs,
    )


def _cfg(url: str = '', **kwargs: Any) -> Dict[str, Any]:
    return {
        'url': url,
        'num_classes': 10, 'input_size': (3, 32, 32), 'pool_size': (8, 8),
        'crop_pct': 1.0, 'interpolation': 'bilinear', 'fixed_input_size': False,
        'mean': (0.0, 0.0, 0.0), 'std': (1.0, 1.0, 1.0),
        'first_conv': 'stem', 'classifier': 'head.fc',
        'license': 'mit',
        **kwargs,
    }


HUANG2022 = dict(paper_ids='arXiv:2212.11005', paper_name='Revisiting Residual Networks for Adversarial '
                 'Robustness: An Architectural Perspective')
HUANG2021 = dict(paper_ids='arXiv:2110.03825', paper_name='Exploring Architectural Ingredients of '
                 'Adversarially Robust Deep Neural Networks')
PANG2022 = dict(paper_ids='arXiv:2202.10103', paper_name='Robustness and Accuracy Could Be Reconcilable by '
                '(Proper) Definition')

default_cfgs = generate_default_cfgs({
    'preact_resnet': _cfg(),
    **{f'robust_resnet_a{i}': _cfg(**HUANG2022) for i in range(0, 5)},
    **{f'wrn_a{i}': _cfg(**HUANG2022) for i in range(1, 5)},
    **{name: _cfg(**HUANG2022) for name in ('wrn_28_10', 'wrn_34_10', 'wrn_34_12', 'wrn_46_14', 'wrn_70_16')},
    'wrn_22_5': _cfg(),
    'wrn_34_r': _cfg(**HUANG2021),
    'wrn_28_10_swish': _cfg(**PANG2022),
    'wrn_70_16_swish': _cfg(**PANG2022),
})

#: RobustScaling configurations of Huang et al. 2022 (README "How to use"): depths and widening factors.
ROBUST_SCALING_CONFIGS = {
    'a1': dict(depths=(14, 14, 7), widths=(5, 7, 3)),
    'a2': dict(depths=(17, 17, 8), widths=(7, 9, 4)),
    'a3': dict(depths=(22, 22, 11), widths=(8, 11, 5)),
    'a4': dict(depths=(27, 28, 13), widths=(10, 14, 6)),
}
#: This project's compact point of the same rule, ``robust_scaling(1e9)`` (0.97 GMACs; not in the paper).
COMPACT_SCALING_CONFIGS = {'a0': dict(depths=(8, 7, 4), widths=(3, 4, 2))}
#: RobustResBlock hyper-parameters of the released RobustResNets.
ROBUST_RES_BLOCK_ARGS = dict(block_types='robust_res_block', scales=8, base_width=10, cardinality=4, se_reduction=64)


def _wrn_depths(depth: int) -> Tuple[int, int, int]:
    if (depth - 4) % 6:
        raise ValueError(f'WRN depth must be 6n + 4, got {depth}.')
    n = (depth - 4) // 6
    return n, n, n


@register_model
def preact_resnet(pretrained: bool = False, **kwargs: Any) -> PreActResNet:
    """Generic pre-activation ResNet; configure it with PreActResNet's keyword arguments (WRN-28-10 by default)."""
    return _create_preact_resnet('preact_resnet', pretrained, **kwargs)


def _robust_resnet(name: str, pretrained: bool, **kwargs: Any) -> PreActResNet:
    args = dict(**{**ROBUST_SCALING_CONFIGS, **COMPACT_SCALING_CONFIGS}[name[-2:]], **ROBUST_RES_BLOCK_ARGS)
    return _create_preact_resnet(name, pretrained, arch_args=args, **kwargs)


def _wrn_a(name: str, pretrained: bool, **kwargs: Any) -> PreActResNet:
    args = dict(**ROBUST_SCALING_CONFIGS[name[-2:]], block_types='basic')
    return _create_preact_resnet(name, pretrained, arch_args=args, **kwargs)


def _wrn(name: str, depth: int, width: int, pretrained: bool, **kwargs: Any) -> PreActResNet:
    args = dict(depths=_wrn_depths(depth), widths=(width,) * 3, block_types='basic')
    return _create_preact_resnet(name, pretrained, arch_args=args, **kwargs)


@register_model
def robust_resnet_a0(pretrained: bool = False, **kwargs: Any) -> PreActResNet:
    """RobustResNet-A0 (3.79M params, 0.97G MACs): depths (8, 7, 4), widths (3, 4, 2); RobustScaling at 1 GMAC
    (not in the paper: this project's compact model, compared with the equal-MACs ``wrn_22_5``)."""
    return _robust_resnet('robust_resnet_a0', pretrained, **kwargs)


@register_model
def robust_resnet_a1(pretrained: bool = False, **kwargs: Any) -> PreActResNet:
    """RobustResNet-A1 (19.2M params, 5.11G MACs): depths (14, 14, 7), widths (5, 7, 3)."""
    return _robust_resnet('robust_resnet_a1', pretrained, **kwargs)


@register_model
def robust_resnet_a2(pretrained: bool = False, **kwargs: Any) -> PreActResNet:
    """RobustResNet-A2 (39.0M params, 10.8G MACs): depths (17, 17, 8), widths (7, 9, 4)."""
    return _robust_resnet('robust_resnet_a2', pretrained, **kwargs)


@register_model
def robust_resnet_a3(pretrained: bool = False, **kwargs: Any) -> PreActResNet:
    """RobustResNet-A3 (75.9M params, 19.9G MACs): depths (22, 22, 11), widths (8, 11, 5)."""
    return _robust_resnet('robust_resnet_a3', pretrained, **kwargs)


@register_model
def robust_resnet_a4(pretrained: bool = False, **kwargs: Any) -> PreActResNet:
    """RobustResNet-A4 (147M params, 39.4G MACs): depths (27, 28, 13), widths (10, 14, 6)."""
    return _robust_resnet('robust_resnet_a4', pretrained, **kwargs)


@register_model
def wrn_a1(pretrained: bool = False, **kwargs: Any) -> PreActResNet:
    """WRN-A1: the A1 scaling with the basic block."""
    return _wrn_a('wrn_a1', pretrained, **kwargs)


@register_model
def wrn_a2(pretrained: bool = False, **kwargs: Any) -> PreActResNet:
    """WRN-A2: the A2 scaling with the basic block."""
    return _wrn_a('wrn_a2', pretrained, **kwargs)


@register_model
def wrn_a3(pretrained: bool = False, **kwargs: Any) -> PreActResNet:
    """WRN-A3: the A3 scaling with the basic block."""
    return _wrn_a('wrn_a3', pretrained, **kwargs)


@register_model
def wrn_a4(pretrained: bool = False, **kwargs: Any) -> PreActResNet:
    """WRN-A4: the A4 scaling with the basic block (RobustBench's Huang2022Revisiting_WRN-A4 uses SiLU and
    CIFAR-10 normalisation inside: pass ``activations='SiLU', input_mean=..., input_std=...``)."""
    return _wrn_a('wrn_a4', pretrained, **kwargs)


@register_model
def wrn_28_10(pretrained: bool = False, **kwargs: Any) -> PreActResNet:
    """Pre-activation WRN-28-10 (36.5M params, 5.20G MACs)."""
    return _wrn('wrn_28_10', 28, 10, pretrained, **kwargs)


@register_model
def wrn_22_5(pretrained: bool = False, **kwargs: Any) -> PreActResNet:
    """Pre-activation WRN-22-5 (6.71M params, 0.97G MACs): the basic-block WRN with RobustResNet-A0's MACs."""
    return _wrn('wrn_22_5', 22, 5, pretrained, **kwargs)


@register_model
def wrn_34_10(pretrained: bool = False, **kwargs: Any) -> PreActResNet:
    """Pre-activation WRN-34-10 (46.2M params)."""
    return _wrn('wrn_34_10', 34, 10, pretrained, **kwargs)


@register_model
def wrn_34_12(pretrained: bool = False, **kwargs: Any) -> PreActResNet:
    """Pre-activation WRN-34-12 (66.5M params, 9.60G MACs)."""
    return _wrn('wrn_34_12', 34, 12, pretrained, **kwargs)


@register_model
def wrn_46_14(pretrained: bool = False, **kwargs: Any) -> PreActResNet:
    """Pre-activation WRN-46-14 (128M params, 18.6G MACs)."""
    return _wrn('wrn_46_14', 46, 14, pretrained, **kwargs)


@register_model
def wrn_70_16(pretrained: bool = False, **kwargs: Any) -> PreActResNet:
    """Pre-activation WRN-70-16 (267M params, 38.8G MACs)."""
    return _wrn('wrn_70_16', 70, 16, pretrained, **kwargs)


@register_model
def wrn_34_r(pretrained: bool = False, **kwargs: Any) -> PreActResNet:
    """WRN-34-R of Huang et al. 2021 (68.1M params, 19.1G MACs): depths (5, 5, 5), channels (320, 640, 512)."""
    args = dict(depths=(5, 5, 5), channels=(320, 640, 512), block_types='basic')
    return _create_preact_resnet('wrn_34_r', pretrained, arch_args=args, **kwargs)


@register_model
def wrn_28_10_swish(pretrained: bool = False, **kwargs: Any) -> PreActResNet:
    """Swish WRN-28-10 of Pang et al. 2022 (SCORE) in RobustBench's DMWideResNet layout (CIFAR-10 normalisation
    inside; pass ``input_mean``/``input_std`` for CIFAR-100 checkpoints)."""
    args = dict(depths=_wrn_depths(28), widths=(10, 10, 10), block_types='basic', activations='SiLU',
                padding='same', input_mean=CIFAR10_MEAN, input_std=CIFAR10_STD)
    return _create_preact_resnet('wrn_28_10_swish', pretrained, arch_args=args, **kwargs)


@register_model
def wrn_70_16_swish(pretrained: bool = False, **kwargs: Any) -> PreActResNet:
    """Swish WRN-70-16 of Pang et al. 2022 (SCORE) in RobustBench's DMWideResNet layout."""
    args = dict(depths=_wrn_depths(70), widths=(16, 16, 16), block_types='basic', activations='SiLU',
                padding='same', input_mean=CIFAR10_MEAN, input_std=CIFAR10_STD)
    return _create_preact_resnet('wrn_70_16_swish', pretrained, arch_args=args, **kwargs)
