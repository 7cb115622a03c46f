"""ConvStem ViTs and ConvNeXts of Singh, Croce and Hein 2023 (arXiv 2303.01870).

"Revisiting Adversarial Training for ImageNet: Architectures, Training and Generalization across
Threat Models" replaces the patchify stem of ViTs and ConvNeXts by a small convolutional stem
(3x3 convolutions, each followed by a channels-first LayerNorm and GELU). Everything after the
stem is timm's own model:

* ``vit_small_convstem``, ``vit_base_convstem``: timm's ViT-S/16 (DeiT-S) and ViT-B/16 with the
  stem in ``patch_embed.proj`` (48-96-192-384 channels, then a 1x1 projection to the width).
* ``vit_medium_convstem``: DeiT-III Medium/16 (width 512, layer scale, no class-token position
  embedding) with the same stem projecting to 512.
* ``convnext_tiny_convstem`` .. ``convnext_large_convstem``: timm's ConvNeXts with a two-stage
  (T, S: 48-96) or three-stage (B: 64-96-128, L: 96-144-192) stem of total stride 4.
* ``convnext_iso_convstem``: the isotropic ConvNeXt-S (18 blocks of width 384, no layer scale)
  behind the ViT-S stem; timm has no isotropic ConvNeXt, so :class:`ConvNeXtIsotropic` builds it
  from timm's ``ConvNeXtBlock``.

Inputs are [0, 1] pixels. ``vit_small_convstem`` standardises them with the ImageNet mean and
std inside (its checkpoint was trained so; RobustBench wraps it the same way); the others take
[0, 1] pixels as they are, as RobustBench loads them. ``vit_medium_convstem`` and
``convnext_iso_convstem`` are not on RobustBench and their files could not be inspected here. The
authors' trainer standardises inside only with ``--model.add_normalization 1`` (their training
script passes 0), and then saves the mean and std as persistent ``normalize.*`` buffers: a file from
it standardises inside exactly when it carries those keys. Both models therefore default to no
normalisation (``input_norm=True`` adds it), and :func:`checkpoint_filter_fn` refuses a checkpoint
with normalisation buffers for a model built without them.
"""
from __future__ import annotations

import math
import re
from functools import partial
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.layers import LayerNorm2d, NormMlpClassifierHead, PatchEmbed, trunc_normal_
from timm.models import build_model_with_cfg, checkpoint_seq, generate_default_cfgs, register_model
from timm.models.convnext import ConvNeXt, ConvNeXtBlock
from timm.models.vision_transformer import VisionTransformer
from torch.utils.checkpoint import checkpoint

from ..weights import resolve_pretrained_kwargs
from .layers import (
    ClassifierHeadMixin, InputNormalize, fill_input_normalize, intermediate_indices, strip_checkpoint_wrappers,
)

__all__ = [
    'StemLayerNorm2d', 'ConvStem', 'ConvStemPatchEmbed', 'ConvStemVisionTransformer', 'ConvStemConvNeXt', 'ConvNeXtIsotropic',
    'checkpoint_filter_fn', 'detect_layout',
]


class StemLayerNorm2d(LayerNorm2d):
    """Channels-first LayerNorm of NCHW tensors from an explicit mean and biased variance over channels.

    Numerically it follows the authors' (and the official ConvNeXt) channels-first LayerNorm rather
    than ``F.layer_norm``: the two differ by float32 rounding (~1e-6 on unit-scale outputs), and this
    one lets converted checkpoints reproduce the authors' logits bit for bit.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mean = x.mean(1, keepdim=True)
        var = (x - mean).pow(2).mean(1, keepdim=True)
        x = (x - mean) / torch.sqrt(var + self.eps)
        return self.weight[:, None, None] * x + self.bias[:, None, None]


class ConvStem(nn.Sequential):
    """The convolutional stem of Singh et al.: [3x3 conv, LayerNorm, GELU] per width, then an optional 1x1 conv.

    Layer indices follow the authors' ``nn.Sequential`` (conv at 0, norm at 1, GELU at 2, ...), so
    their ``stem.N`` keys map one-to-one. Convolutions have biases; norms are channels-first
    LayerNorms with eps 1e-6 (:class:`StemLayerNorm2d`); GELU is the exact (erf) one.

    Args:
        in_chans: Input channels.
        widths: Output channels of each 3x3 convolution.
        strides: Stride of each 3x3 convolution (padding 1).
        out_chs: Output channels of a final 1x1 convolution (no norm or activation after it);
            None ends the stem with the last GELU.
    """

    def __init__(
            self,
            in_chans: int,
            widths: Sequence[int],
            strides: Sequence[int],
            out_chs: Optional[int] = None,
    ) -> None:
        if len(widths) != len(strides) or not widths:
            raise ValueError(f'ConvStem needs one stride per width, got widths={tuple(widths)}, '
                             f'strides={tuple(strides)}.')
        layers: List[nn.Module] = []
        prev = in_chans
        for width, stride in zip(widths, strides):
            layers += [nn.Conv2d(prev, width, kernel_size=3, stride=stride, padding=1),
                       StemLayerNorm2d(width, eps=1e-6), nn.GELU()]
            prev = width
        if out_chs is not None:
            layers.append(nn.Conv2d(prev, out_chs, kernel_size=1))
            prev = out_chs
        super().__init__(*layers)
        self.out_chs = prev
        self.stride = math.prod(strides)


class ConvStemPatchEmbed(PatchEmbed):
    """timm's ``PatchEmbed`` with a :class:`ConvStem` as its projection (stride-2 3x3 convs, then 1x1 to the width).

    Args:
        stem_widths: Channels of the 3x3 convolutions; their number n gives a total stride 2**n,
            which must equal ``patch_size``.
        **kwargs: ``PatchEmbed`` arguments (img_size, patch_size, in_chans, embed_dim, ...).
    """

    def __init__(self, *args: Any, stem_widths: Sequence[int] = (48, 96, 192, 384), **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        patch = self.proj
        stem = ConvStem(patch.in_channels, stem_widths, (2,) * len(stem_widths), out_chs=patch.out_channels)
        if (stem.stride, stem.stride) != tuple(self.patch_size):
            raise ValueError(f'{len(stem_widths)} stride-2 stem convolutions give stride {stem.stride}, but '
                             f'patch_size is {tuple(self.patch_size)}; use log2(patch_size) stem widths.')
        self.proj = stem.to(device=patch.weight.device, dtype=patch.weight.dtype)


def _input_normalize(input_norm: bool, input_mean: Sequence[float], input_std: Sequence[float],
                     in_chans: int) -> nn.Module:
    return InputNormalize(input_mean, input_std, in_chans=in_chans) if input_norm else nn.Identity()


class ConvStemVisionTransformer(VisionTransformer):
    """timm's ``VisionTransformer`` with a :class:`ConvStemPatchEmbed` and optional in-model input standardisation.

    Args:
        stem_widths: Channels of the stem's 3x3 convolutions (the last 1x1 conv maps to ``embed_dim``).
        input_norm: Standardise [0, 1] inputs inside the model (an InputNormalize named ``normalize``).
        input_mean: Per-channel mean of that standardisation (ImageNet's by default).
        input_std: Per-channel std of that standardisation.
        **kwargs: ``VisionTransformer`` arguments (embed_dim, depth, num_heads, init_values, ...).
    """

    def __init__(
            self,
            *,
            stem_widths: Sequence[int] = (48, 96, 192, 384),
            input_norm: bool = False,
            input_mean: Sequence[float] = IMAGENET_DEFAULT_MEAN,
            input_std: Sequence[float] = IMAGENET_DEFAULT_STD,
            **kwargs: Any,
    ) -> None:
        if 'embed_layer' in kwargs:
            raise ValueError('ConvStemVisionTransformer builds its own embed_layer; configure it with stem_widths.')
        super().__init__(embed_layer=partial(ConvStemPatchEmbed, stem_widths=tuple(stem_widths)), **kwargs)
        self.normalize = _input_normalize(input_norm, input_mean, input_std, kwargs.get('in_chans', 3))

    def forward_features(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        return super().forward_features(self.normalize(x), *args, **kwargs)

    def forward_intermediates(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        return super().forward_intermediates(self.normalize(x), *args, **kwargs)


class ConvStemConvNeXt(ConvNeXt):
    """timm's ``ConvNeXt`` with a :class:`ConvStem` of total stride 4 in place of the 4x4 patch stem.

    Args:
        stem_widths: Channels of the stem's 3x3 convolutions; the last must equal ``dims[0]``.
        stem_strides: Their strides; the product must be 4.
        input_norm: Standardise [0, 1] inputs inside the model (an InputNormalize named ``normalize``).
        input_mean: Per-channel mean of that standardisation (ImageNet's by default).
        input_std: Per-channel std of that standardisation.
        **kwargs: ``ConvNeXt`` arguments (depths, dims, ...).
    """

    def __init__(
            self,
            *,
            stem_widths: Sequence[int] = (48, 96),
            stem_strides: Sequence[int] = (2, 2),
            input_norm: bool = False,
            input_mean: Sequence[float] = IMAGENET_DEFAULT_MEAN,
            input_std: Sequence[float] = IMAGENET_DEFAULT_STD,
            **kwargs: Any,
    ) -> None:
        if kwargs.get('stem_type', 'patch') != 'patch' or kwargs.get('patch_size', 4) != 4:
            raise ValueError('ConvStemConvNeXt replaces the stem; leave stem_type and patch_size at their defaults.')
        super().__init__(**kwargs)
        stem = ConvStem(self.stem[0].in_channels, stem_widths, stem_strides)
        dims0 = self.stem[0].out_channels
        if stem.out_chs != dims0 or stem.stride != 4:
            raise ValueError(f'The stem must end with dims[0]={dims0} channels at stride 4; got {stem.out_chs} '
                             f'channels at stride {stem.stride} from stem_widths={tuple(stem_widths)}, '
                             f'stem_strides={tuple(stem_strides)}.')
        self.stem = stem.to(device=self.stem[0].weight.device, dtype=self.stem[0].weight.dtype)
        self.normalize = _input_normalize(input_norm, input_mean, input_std, kwargs.get('in_chans', 3))
        # timm's FeatureListNet (features_only) runs the children in registration order: normalize goes first
        for name in [n for n in self._modules if n != 'normalize']:
            self._modules[name] = self._modules.pop(name)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward_features(self.normalize(x))

    def forward_intermediates(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        return super().forward_intermediates(self.normalize(x), *args, **kwargs)


class ConvNeXtIsotropic(ClassifierHeadMixin, nn.Module):
    """Isotropic ConvNeXt (Liu et al. 2022, section 3.3) behind a :class:`ConvStem`, from timm's ``ConvNeXtBlock``.

    The authors' isotropic ConvNeXt-S: one resolution (stride 16) and width throughout, blocks of
    depthwise 7x7 conv, LayerNorm, MLP (4x) with GELU, no layer scale, then global average
    pooling, LayerNorm and the classifier.

    Args:
        dim: Width of every block.
        depth: Number of blocks.
        stem_widths: Channels of the stem's stride-2 3x3 convolutions (a final 1x1 conv maps to ``dim``).
        kernel_size: Depthwise kernel size.
        mlp_ratio: MLP expansion.
        ls_init_value: Layer-scale init value; None (the authors' setting) disables layer scale.
        input_norm: Standardise [0, 1] inputs inside the model (an InputNormalize named ``normalize``).
        input_mean: Per-channel mean of that standardisation (ImageNet's by default).
        input_std: Per-channel std of that standardisation.
        num_classes: Classifier outputs; 0 for a feature extractor.
        in_chans: Input channels.
        global_pool: Global pooling type of the head.
        drop_rate: Dropout before the classifier.
        drop_path_rate: Stochastic depth rate, increasing linearly over the blocks.
    """

    def __init__(
            self,
            dim: int = 384,
            depth: int = 18,
            *,
            stem_widths: Sequence[int] = (48, 96, 192, 384),
            kernel_size: int = 7,
            mlp_ratio: float = 4.,
            ls_init_value: Optional[float] = None,
            input_norm: bool = False,
            input_mean: Sequence[float] = IMAGENET_DEFAULT_MEAN,
            input_std: Sequence[float] = IMAGENET_DEFAULT_STD,
            num_classes: int = 1000,
            in_chans: int = 3,
            global_pool: str = 'avg',
            drop_rate: float = 0.,
            drop_path_rate: float = 0.,
    ) -> None:
        super().__init__()
        if depth < 1 or dim < 1:
            raise ValueError(f'dim and depth must be positive, got dim={dim}, depth={depth}.')
        self.num_classes = num_classes
        self.drop_rate = drop_rate
        self.grad_checkpointing = False
        self.normalize = _input_normalize(input_norm, input_mean, input_std, in_chans)
        self.stem = ConvStem(in_chans, stem_widths, (2,) * len(stem_widths), out_chs=dim)
        reduction = self.stem.stride
        dpr = torch.linspace(0, drop_path_rate, depth, device='cpu').tolist()
        self.blocks = nn.Sequential(*[
            ConvNeXtBlock(dim, kernel_size=kernel_size, mlp_ratio=mlp_ratio, ls_init_value=ls_init_value,
                          drop_path=dpr[i])
            for i in range(depth)])
        self.feature_info = [dict(num_chs=dim, reduction=reduction, module=f'blocks.{i}') for i in range(depth)]
        self.num_features = self.head_hidden_size = dim
        self.head = NormMlpClassifierHead(dim, num_classes, pool_type=global_pool, drop_rate=drop_rate,
                                          norm_layer=partial(LayerNorm2d, eps=1e-6))
        # the authors' init (trunc-normal 0.02, zero bias) for blocks and head; the stem keeps PyTorch's default
        for module in (self.blocks, self.head):
            module.apply(_init_linear_conv)

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> Dict[str, Any]:
        return dict(stem=r'^normalize|^stem', blocks=r'^blocks\.(\d+)' if coarse else [
            (r'^blocks\.(\d+)', None), (r'^head\.norm', (99999,))])

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.grad_checkpointing = enable

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(self.normalize(x))
        if self.grad_checkpointing and not torch.jit.is_scripting():
            return checkpoint_seq(self.blocks, x)
        return self.blocks(x)

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
        """The block outputs (the taps of ``features_only``) and the final features, as timm's models give them.

        Args:
            x: Input images in [0, 1].
            indices: The last n blocks for an int, these blocks for a list, all for None.
            norm: Unused (the final norm follows the pooling, in the head); timm's signature.
            stop_early: Stop after the last block asked for.
            output_fmt: 'NCHW', the only format.
            intermediates_only: Return the block outputs alone.

        Returns:
            The block outputs, or ``(forward_features(x), block outputs)``.
        """
        take, max_index = intermediate_indices(len(self.blocks), indices, output_fmt)
        intermediates = []
        x = self.stem(self.normalize(x))
        for i, block in enumerate(self.blocks[:max_index + 1] if stop_early else self.blocks):
            x = checkpoint(block, x, use_reentrant=False) if self.grad_checkpointing else block(x)
            if i in take:
                intermediates.append(x)
        return intermediates if intermediates_only else (x, intermediates)

    def prune_intermediate_layers(self, indices: Union[int, List[int]] = 1, prune_norm: bool = False,
                                  prune_head: bool = True) -> List[int]:
        """Drops the blocks after the last tap in ``indices`` (and the head, or its norm), as timm's models do;
        returns the taps kept."""
        take, max_index = intermediate_indices(len(self.blocks), indices)
        self.blocks = self.blocks[:max_index + 1]
        if prune_norm:
            self.head.norm = nn.Identity()
        if prune_head:
            self.reset_classifier(0, '')
        return take

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        return self.head(x, pre_logits=True) if pre_logits else self.head(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


def _init_linear_conv(module: nn.Module) -> None:
    if isinstance(module, (nn.Conv2d, nn.Linear)):
        trunc_normal_(module.weight, std=.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)


# --- checkpoint layouts ------------------------------------------------------------------------------
# The authors' models are timm models (timm 0.8) whose stem is a module holding an nn.Sequential named
# `stem`; the isotropic ConvNeXt is the official (facebookresearch) one. RobustBench re-exports the same keys.
_SINGH2023_RULES = (
    (r'^patch_embed\.proj\.stem\.', 'patch_embed.proj.'),
    (r'^stem\.stem\.', 'stem.'),
)
_SINGH2023_ISO_RULES = _SINGH2023_RULES + (
    (r'^blocks\.(\d+)\.dwconv\.', r'blocks.\1.conv_dw.'),
    (r'^blocks\.(\d+)\.pwconv1\.', r'blocks.\1.mlp.fc1.'),
    (r'^blocks\.(\d+)\.pwconv2\.', r'blocks.\1.mlp.fc2.'),
    (r'^head\.', 'head.fc.'),
    (r'^norm\.', 'head.norm.'),
)
CHECKPOINT_LAYOUTS = ('timm', 'singh2023', 'robustbench')


def detect_layout(state_dict: Dict[str, torch.Tensor]) -> str:
    """Names the layout of a ConvStem-family state dict: 'timm' (ours) or 'singh2023' (authors and RobustBench).

    RobustBench's re-exports use the authors' keys, so they are reported as 'singh2023'.
    """
    keys = [k for k in strip_checkpoint_wrappers(state_dict) if not k.startswith('normalize.')]
    if any(k.startswith(('patch_embed.proj.stem.', 'stem.stem.')) or '.dwconv.' in k for k in keys):
        return 'singh2023'
    if any(k.startswith(('patch_embed.proj.0.', 'stem.0.')) for k in keys):
        return 'timm'
    raise ValueError('Unrecognised checkpoint layout for a ConvStem model: no ConvStem keys found (first keys: '
                     f"{keys[:5]}). Pass layout= one of {list(CHECKPOINT_LAYOUTS)}.")


def resample_pos_embed(
        pos_embed: torch.Tensor,
        new_grid: Tuple[int, int],
        num_prefix_tokens: int = 1,
) -> torch.Tensor:
    """Bicubically resizes a square grid of ViT position embeddings, as the authors' evaluation does.

    Singh et al. (after DINO) interpolate with scale factor ``(new + 0.1) / old`` rather than to a
    target size; prefix-token (class) embeddings are kept as they are.

    Args:
        pos_embed: (1, prefix + old_h * old_w, dim) embeddings.
        new_grid: Target (height, width) in patches.
        num_prefix_tokens: Leading embeddings that are not on the grid (0 for DeiT-III's no_embed_class).

    Returns:
        (1, prefix + new_h * new_w, dim) embeddings.
    """
    prefix, grid = pos_embed[:, :num_prefix_tokens], pos_embed[:, num_prefix_tokens:]
    old = math.isqrt(grid.shape[1])
    if old * old != grid.shape[1]:
        raise ValueError(f'{grid.shape[1]} position embeddings after {num_prefix_tokens} prefix tokens do not form '
                         'a square grid; check num_prefix_tokens.')
    new_h, new_w = new_grid
    if (new_h, new_w) == (old, old):
        return pos_embed
    dim = grid.shape[-1]
    grid = grid.reshape(1, old, old, dim).permute(0, 3, 1, 2).float()
    grid = F.interpolate(grid, scale_factor=((new_h + 0.1) / old, (new_w + 0.1) / old), mode='bicubic')
    if grid.shape[-2:] != (new_h, new_w):
        raise RuntimeError(f'Position-embedding resize gave a {tuple(grid.shape[-2:])} grid, expected {new_grid}.')
    grid = grid.permute(0, 2, 3, 1).reshape(1, new_h * new_w, dim).to(pos_embed.dtype)
    return torch.cat([prefix, grid], dim=1)


def checkpoint_filter_fn(
        state_dict: Dict[str, Any],
        model: nn.Module,
        layout: Optional[str] = None,
) -> Dict[str, torch.Tensor]:
    """Maps an original checkpoint (the authors' layouts, RobustBench's re-exports) to this model's keys.

    Handles the authors' training-state wrappers, the ``module.`` (DDP), ``base_model.`` (their
    adversarial-training wrapper) and ``model.`` (``normalize_model``) prefixes, and EMA state dicts;
    fills the in-model normalisation buffers from the model when the checkpoint has none (RobustBench
    keeps them out); resizes ViT position embeddings to the model's grid as the authors did.

    Raises:
        ValueError: For an unknown layout, or a checkpoint carrying input-normalisation buffers for a
            model built without in-model normalisation.
    """
    state_dict = strip_checkpoint_wrappers(state_dict)
    layout = layout or detect_layout(state_dict)
    if layout not in CHECKPOINT_LAYOUTS:
        raise ValueError(f"Unknown layout '{layout}'; use one of {list(CHECKPOINT_LAYOUTS)}.")
    if layout != 'timm':
        rules = _SINGH2023_ISO_RULES if isinstance(model, ConvNeXtIsotropic) else _SINGH2023_RULES
        mapped = {}
        for k, v in state_dict.items():
            for pattern, repl in rules:
                k = re.sub(pattern, repl, k)
            mapped[k] = v
        state_dict = mapped
    model_sd = model.state_dict()
    has_norm = 'normalize.mean' in model_sd
    if not has_norm and any(k.startswith('normalize.') for k in state_dict):
        raise ValueError('The checkpoint standardises its inputs inside (it has normalize.mean/std) but the model '
                         'was built without; create it with input_norm=True.')
    fill_input_normalize(state_dict, model_sd)
    pos_embed = state_dict.get('pos_embed')
    if pos_embed is not None and 'pos_embed' in model_sd and pos_embed.shape != model_sd['pos_embed'].shape:
        prefix = 0 if getattr(model, 'no_embed_class', False) else model.num_prefix_tokens
        state_dict['pos_embed'] = resample_pos_embed(pos_embed, tuple(model.patch_embed.grid_size), prefix)
    for k, v in state_dict.items():
        if k in model_sd and v.shape != model_sd[k].shape and v.numel() == model_sd[k].numel():
            state_dict[k] = v.reshape(model_sd[k].shape)  # normalize buffers stored as (1, 3, 1, 1)
    return state_dict


# --- creation ----------------------------------------------------------------------------------------
_FAMILY_CLASSES: Dict[str, Callable[..., nn.Module]] = {
    'vit': ConvStemVisionTransformer, 'convnext': ConvStemConvNeXt, 'convnext_iso': ConvNeXtIsotropic}


def _create_convstem(variant: str, pretrained: bool = False, *, arch_args: Optional[Dict[str, Any]] = None,
                     **kwargs: Any) -> nn.Module:
    kwargs = resolve_pretrained_kwargs(variant, pretrained, kwargs, arch_args=arch_args)
    family = 'convnext_iso' if variant.startswith('convnext_iso') else variant.split('_')[0]
    model_cls = _FAMILY_CLASSES[family]
    depth = kwargs.get('depth', 18 if family == 'convnext_iso' else 12)
    if family == 'convnext_iso':  # features: the last three blocks, as timm's ViTs
        default_out = tuple(range(max(depth - 3, 0), depth))
        feature_cfg = dict(flatten_sequential=True, out_indices=kwargs.pop('out_indices', default_out))
    elif family == 'convnext':  # as timm's ConvNeXt (its forward_intermediates counts the stem in timm 1.0.9)
        feature_cfg = dict(flatten_sequential=True, out_indices=kwargs.pop('out_indices', (0, 1, 2, 3)))
    else:
        feature_cfg = dict(feature_cls='getter', out_indices=kwargs.pop('out_indices', min(3, depth)))
    return build_model_with_cfg(
        model_cls, variant, pretrained,
        pretrained_filter_fn=checkpoint_filter_fn,
        feature_cfg=feature_cfg,
        **kwargs,
    )


def _cfg(url: str = '', **kwargs: Any) -> Dict[str, Any]:
    return {
        'url': url,
        'num_classes': 1000, 'input_size': (3, 224, 224), 'pool_size': None,
        'crop_pct': 0.875, 'interpolation': 'bicubic', 'fixed_input_size': False,
        'mean': (0.0, 0.0, 0.0), 'std': (1.0, 1.0, 1.0),
        'paper_ids': 'arXiv:2303.01870',
        'paper_name': 'Revisiting Adversarial Training for ImageNet: Architectures, Training and Generalization '
                      'across Threat Models',
        **kwargs,
    }


_VIT = dict(first_conv='patch_embed.proj.0', classifier='head', fixed_input_size=True)
_CONVNEXT = dict(first_conv='stem.0', classifier='head.fc', pool_size=(7, 7))
_ISO = dict(first_conv='stem.0', classifier='head.fc', pool_size=(14, 14))

default_cfgs = generate_default_cfgs({
    'vit_small_convstem.in1k_linf4': _cfg(**_VIT),
    'vit_medium_convstem.in1k_linf4': _cfg(**_VIT),
    'vit_base_convstem.in1k_linf4': _cfg(**_VIT),
    'convnext_iso_convstem.in1k_linf4': _cfg(**_ISO),
    'convnext_tiny_convstem.in1k_linf4': _cfg(**_CONVNEXT),
    'convnext_small_convstem.in1k_linf4': _cfg(**_CONVNEXT),
    # the README reports ConvNeXt-B also at 256 and ConvNeXt-L also at 320 (same checkpoint, crop 0.875)
    'convnext_base_convstem.in1k_linf4': _cfg(**_CONVNEXT, test_input_size=(3, 256, 256), test_crop_pct=0.875),
    'convnext_large_convstem.in1k_linf4': _cfg(**_CONVNEXT, test_input_size=(3, 320, 320), test_crop_pct=0.875),
})

_VIT_STEM_8 = (48, 96, 192, 384)  # the authors' ConvBlock(48): widths 48 * (1, 2, 4, 8), then 1x1 to embed_dim


@register_model
def vit_small_convstem(pretrained: bool = False, **kwargs: Any) -> ConvStemVisionTransformer:
    """ViT-S/16-ConvStem (22.8M params): DeiT-S with the ConvStem; ImageNet mean/std standardisation inside."""
    args = dict(patch_size=16, embed_dim=384, depth=12, num_heads=6, stem_widths=_VIT_STEM_8, input_norm=True)
    return _create_convstem('vit_small_convstem', pretrained, arch_args=args, **kwargs)


@register_model
def vit_medium_convstem(pretrained: bool = False, **kwargs: Any) -> ConvStemVisionTransformer:
    """ViT-M/16-ConvStem (39.5M params): DeiT-III Medium (layer scale 1e-6, no class-token position embedding)."""
    args = dict(patch_size=16, embed_dim=512, depth=12, num_heads=8, no_embed_class=True, init_values=1e-6,
                stem_widths=_VIT_STEM_8)
    return _create_convstem('vit_medium_convstem', pretrained, arch_args=args, **kwargs)


@register_model
def vit_base_convstem(pretrained: bool = False, **kwargs: Any) -> ConvStemVisionTransformer:
    """ViT-B/16-ConvStem (87.1M params): ViT-B/16 with the ConvStem; takes [0, 1] pixels as they are."""
    args = dict(patch_size=16, embed_dim=768, depth=12, num_heads=12, stem_widths=_VIT_STEM_8)
    return _create_convstem('vit_base_convstem', pretrained, arch_args=args, **kwargs)


@register_model
def convnext_iso_convstem(pretrained: bool = False, **kwargs: Any) -> ConvNeXtIsotropic:
    """ConvNeXt-iso-ConvStem (23.0M params): isotropic ConvNeXt-S (18 x 384, no layer scale) with the ViT-S stem."""
    args = dict(dim=384, depth=18, stem_widths=_VIT_STEM_8)
    return _create_convstem('convnext_iso_convstem', pretrained, arch_args=args, **kwargs)


@register_model
def convnext_tiny_convstem(pretrained: bool = False, **kwargs: Any) -> ConvStemConvNeXt:
    """ConvNeXt-T-ConvStem (28.6M params): stem 48-96."""
    args = dict(depths=(3, 3, 9, 3), dims=(96, 192, 384, 768), stem_widths=(48, 96), stem_strides=(2, 2))
    return _create_convstem('convnext_tiny_convstem', pretrained, arch_args=args, **kwargs)


@register_model
def convnext_small_convstem(pretrained: bool = False, **kwargs: Any) -> ConvStemConvNeXt:
    """ConvNeXt-S-ConvStem (50.3M params): stem 48-96."""
    args = dict(depths=(3, 3, 27, 3), dims=(96, 192, 384, 768), stem_widths=(48, 96), stem_strides=(2, 2))
    return _create_convstem('convnext_small_convstem', pretrained, arch_args=args, **kwargs)


@register_model
def convnext_base_convstem(pretrained: bool = False, **kwargs: Any) -> ConvStemConvNeXt:
    """ConvNeXt-B-ConvStem (88.8M params): stem 64-96-128 (strides 2, 2, 1)."""
    args = dict(depths=(3, 3, 27, 3), dims=(128, 256, 512, 1024), stem_widths=(64, 96, 128), stem_strides=(2, 2, 1))
    return _create_convstem('convnext_base_convstem', pretrained, arch_args=args, **kwargs)


@register_model
def convnext_large_convstem(pretrained: bool = False, **kwargs: Any) -> ConvStemConvNeXt:
    """ConvNeXt-L-ConvStem (198.1M params): stem 96-144-192 (strides 2, 2, 1)."""
    args = dict(depths=(3, 3, 27, 3), dims=(192, 384, 768, 1536), stem_widths=(96, 144, 192), stem_strides=(2, 2, 1))
    return _create_convstem('convnext_large_convstem', pretrained, arch_args=args, **kwargs)
