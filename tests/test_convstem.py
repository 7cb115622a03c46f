"""ConvStem ViTs and ConvNeXts of Singh et al. 2023: sizes, stems, timm contract, checkpoint conversion."""
from __future__ import annotations

from collections import OrderedDict
from functools import lru_cache

import pytest
import timm
import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.models.convnext import ConvNeXt
from timm.models.vision_transformer import VisionTransformer

import robust_resnets  # noqa: F401  (registers the models)
from robust_resnets.complexity import count_macs, count_params
from robust_resnets.models.convstem import (
    ConvNeXtIsotropic, StemLayerNorm2d, checkpoint_filter_fn, detect_layout, resample_pos_embed,
)
from robust_resnets.models.layers import InputNormalize

# Parameter counts of the authors' builds, obtained by building them on `meta` (timm 1.0.31) with
# nmndeep/revisiting-at utils_architecture.get_new_model(arch, not_original=True) for vit_s, vit_m, vit_b,
# convnext_tiny/small/base/large, and models/convnext_iso.convnext_isotropic_small(dim=384, depth=18) with
# stem = ConvBlock(48, end_siz=8, fin_dim=384) (its branch in the authors' history, `updated` left False);
# RobustBench's get_convstem_models gives the same six numbers for the models it carries.
AUTHORS_PARAMS = {
    'vit_small_convstem': 22_777_576,
    'vit_medium_convstem': 39_527_272,
    'vit_base_convstem': 87_147_112,
    'convnext_iso_convstem': 23_035_624,
    'convnext_tiny_convstem': 28_627_432,
    'convnext_small_convstem': 50_261_992,
    'convnext_base_convstem': 88_753_416,
    'convnext_large_convstem': 198_134_680,
}
# (widths of the 3x3 convs, their strides, final 1x1 output or None) as in the authors' ConvBlock / ConvBlock1-3
STEMS = {
    'vit_small_convstem': ((48, 96, 192, 384), (2, 2, 2, 2), 384),
    'vit_medium_convstem': ((48, 96, 192, 384), (2, 2, 2, 2), 512),
    'vit_base_convstem': ((48, 96, 192, 384), (2, 2, 2, 2), 768),
    'convnext_iso_convstem': ((48, 96, 192, 384), (2, 2, 2, 2), 384),
    'convnext_tiny_convstem': ((48, 96), (2, 2), None),
    'convnext_small_convstem': ((48, 96), (2, 2), None),
    'convnext_base_convstem': ((64, 96, 128), (2, 2, 1), None),
    'convnext_large_convstem': ((96, 144, 192), (2, 2, 1), None),
}
IMG = 64  # input size of the real (CPU) forwards
SMALL = {  # reduced depth (and ViT image size) for real forwards on CPU
    'vit_small_convstem': dict(depth=2, img_size=IMG),
    'vit_medium_convstem': dict(depth=2, img_size=IMG),
    'convnext_iso_convstem': dict(depth=3),
    'convnext_tiny_convstem': dict(depths=(1, 1, 1, 1)),
}


def _meta(name: str, **kwargs) -> nn.Module:
    try:
        with torch.device('meta'):
            return timm.create_model(name, **kwargs)
    except (RuntimeError, NotImplementedError) as e:  # older timm (1.0.9) calls .item() on linspace in __init__
        if 'meta' not in str(e):
            raise
        pytest.skip(f'timm {timm.__version__} cannot build {name} on the meta device: {e}')


@lru_cache(maxsize=None)
def _meta_full(name: str) -> nn.Module:
    """The full-size model on `meta`, built once per session (the tests only read it)."""
    return _meta(name)


def _stem(model: nn.Module) -> nn.Sequential:
    return model.patch_embed.proj if isinstance(model, VisionTransformer) else model.stem


@pytest.mark.parametrize('name', sorted(AUTHORS_PARAMS))
def test_param_count_equals_authors_build(name):
    assert count_params(_meta_full(name)) == AUTHORS_PARAMS[name]


@pytest.mark.parametrize('name', sorted(STEMS))
def test_stem_matches_authors_layers(name):
    widths, strides, out_chs = STEMS[name]
    stem = _stem(_meta_full(name))
    expected_len = 3 * len(widths) + (out_chs is not None)
    assert len(stem) == expected_len
    for i, (width, stride) in enumerate(zip(widths, strides)):
        conv, norm, act = stem[3 * i], stem[3 * i + 1], stem[3 * i + 2]
        assert isinstance(conv, nn.Conv2d) and conv.out_channels == width
        assert conv.kernel_size == (3, 3) and conv.stride == (stride, stride) and conv.padding == (1, 1)
        assert conv.bias is not None
        assert isinstance(norm, StemLayerNorm2d) and norm.eps == 1e-6 and norm.normalized_shape == (width,)
        assert isinstance(act, nn.GELU) and act.approximate == 'none'
    if out_chs is not None:
        assert stem[-1].kernel_size == (1, 1) and stem[-1].out_channels == out_chs and stem[-1].bias is not None


def test_which_model_is_vit_m():
    model = _meta_full('vit_medium_convstem')  # DeiT-III Medium: width 512, 8 heads, layer scale, no class pos-embed
    assert model.embed_dim == 512 and len(model.blocks) == 12 and model.blocks[0].attn.num_heads == 8
    assert model.no_embed_class and model.pos_embed.shape == (1, 196, 512)
    gamma = timm.create_model('vit_medium_convstem', depth=1).blocks[0].ls1.gamma
    assert torch.equal(gamma.detach(), torch.full((512,), 1e-6))
    iso = _meta_full('convnext_iso_convstem')
    assert iso.blocks[0].gamma is None and len(iso.blocks) == 18


@pytest.mark.parametrize('name', sorted(AUTHORS_PARAMS))
def test_input_normalisation_and_cfg(name):
    model = _meta_full(name)
    if name == 'vit_small_convstem':  # RobustBench wraps ViT-S in normalize_model(ImageNet mean/std)
        assert isinstance(model.normalize, InputNormalize)
        norm = timm.create_model(name, depth=1).normalize
        assert torch.allclose(norm.mean.flatten(), torch.tensor(IMAGENET_DEFAULT_MEAN))
        assert torch.allclose(norm.std.flatten(), torch.tensor(IMAGENET_DEFAULT_STD))
    else:
        assert isinstance(model.normalize, nn.Identity)
    cfg = model.pretrained_cfg
    assert cfg['mean'] == (0.0, 0.0, 0.0) and cfg['std'] == (1.0, 1.0, 1.0)
    assert cfg['input_size'] == (3, 224, 224) and cfg['crop_pct'] == 0.875 and cfg['interpolation'] == 'bicubic'
    assert cfg['num_classes'] == 1000


@pytest.mark.parametrize('name', sorted(SMALL))
def test_forward_and_timm_contract(name):
    torch.manual_seed(0)
    model = timm.create_model(name, **SMALL[name]).eval()
    x = torch.rand(2, 3, IMG, IMG)
    with torch.no_grad():
        logits = model(x)
        feats = model.forward_features(x)
        pre = model.forward_head(feats, pre_logits=True)
        again = model.forward_head(feats)
    assert logits.shape == (2, 1000) and torch.isfinite(logits).all()
    assert pre.shape == (2, model.num_features)
    torch.testing.assert_close(again, logits)

    model.reset_classifier(10)
    with torch.no_grad():
        assert model(x).shape == (2, 10)
    model.reset_classifier(0)
    with torch.no_grad():
        assert model(x).shape == (2, model.num_features)


@pytest.mark.parametrize('name', sorted(SMALL))
def test_features_only(name):
    model = timm.create_model(name, features_only=True, **SMALL[name]).eval()
    with torch.no_grad():
        feats = model(torch.rand(1, 3, IMG, IMG))
    info = model.feature_info
    assert len(feats) == len(info.out_indices)
    for f, chs, red in zip(feats, info.channels(), info.reduction()):
        assert f.shape == (1, chs, IMG // red, IMG // red)
    if name.startswith('convnext_tiny'):
        assert info.reduction() == [4, 8, 16, 32]


def test_features_see_the_input_normalisation():
    feats = timm.create_model('vit_small_convstem', depth=2, img_size=IMG, features_only=True, out_indices=(1,)).eval()
    inner = feats.model
    x = torch.rand(1, 3, IMG, IMG)
    with torch.no_grad():
        got = feats(x)[0]
        normalised = VisionTransformer.forward_intermediates(inner, inner.normalize(x), indices=[1],
                                                             intermediates_only=True)[0]
        raw = VisionTransformer.forward_intermediates(inner, x, indices=[1], intermediates_only=True)[0]
    torch.testing.assert_close(got, normalised)
    assert not torch.allclose(got, raw)


@pytest.mark.parametrize('name', ['vit_small_convstem', 'convnext_iso_convstem'])
def test_grad_checkpointing_gives_same_gradients(name):
    torch.manual_seed(0)
    model = timm.create_model(name, **SMALL[name]).eval()
    x = torch.rand(1, 3, IMG, IMG)
    model(x).sum().backward()
    grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    model.set_grad_checkpointing(True)
    model(x).sum().backward()
    for g, p in zip(grads, model.parameters()):
        torch.testing.assert_close(p.grad, g)


# --- the authors' layout, rebuilt from timm pieces -------------------------------------------------------
class _AuthorsLayerNorm(nn.Module):
    """The authors' channels-first LayerNorm (explicit mean / biased variance, eps 1e-6)."""

    def __init__(self, chs: int) -> None:
        super().__init__()
        self.weight, self.bias = nn.Parameter(torch.ones(chs)), nn.Parameter(torch.zeros(chs))

    def forward(self, x):
        u = x.mean(1, keepdim=True)
        s = (x - u).pow(2).mean(1, keepdim=True)
        return self.weight[:, None, None] * ((x - u) / torch.sqrt(s + 1e-6)) + self.bias[:, None, None]


class _AuthorsStem(nn.Module):
    """A module holding `stem`, an nn.Sequential, as the authors' ConvBlock / ConvBlock1 / ConvBlock3 do."""

    def __init__(self, widths, strides, out_chs=None) -> None:
        super().__init__()
        layers, prev = [], 3
        for w, s in zip(widths, strides):
            layers += [nn.Conv2d(prev, w, 3, stride=s, padding=1), _AuthorsLayerNorm(w), nn.GELU()]
            prev = w
        if out_chs is not None:
            layers.append(nn.Conv2d(prev, out_chs, 1))
        self.stem = nn.Sequential(*layers)

    def forward(self, x):
        return self.stem(x)


class _AuthorsIsoBlock(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.dwconv = nn.Conv2d(dim, dim, 7, padding=3, groups=dim)
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.pwconv1, self.act, self.pwconv2 = nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim)

    def forward(self, x):
        y = self.dwconv(x).permute(0, 2, 3, 1)
        y = self.pwconv2(self.act(self.pwconv1(self.norm(y))))
        return x + y.permute(0, 3, 1, 2)


class _AuthorsIso(nn.Module):
    """The official isotropic ConvNeXt's layout (stem, blocks, norm on pooled features, head)."""

    def __init__(self, dim: int, depth: int) -> None:
        super().__init__()
        self.stem = _AuthorsStem((48, 96, 192, 384), (2, 2, 2, 2), dim)
        self.blocks = nn.Sequential(*[_AuthorsIsoBlock(dim) for _ in range(depth)])
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.head = nn.Linear(dim, 1000)

    def forward(self, x):
        return self.head(self.norm(self.blocks(self.stem(x)).mean([-2, -1])))


class _AuthorsNormalizer(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.register_buffer('mean', torch.tensor(IMAGENET_DEFAULT_MEAN).view(1, 3, 1, 1))
        self.register_buffer('std', torch.tensor(IMAGENET_DEFAULT_STD).view(1, 3, 1, 1))

    def forward(self, x):
        return (x - self.mean) / self.std


def _authors_reference(name: str) -> nn.Module:
    """The authors' construction (timm model, stem swapped in afterwards) at the reduced depth of SMALL."""
    widths, strides, out_chs = STEMS[name]
    if name == 'convnext_iso_convstem':
        return _AuthorsIso(384, SMALL[name]['depth'])
    if name.startswith('vit'):
        vit_args = {'vit_small_convstem': dict(embed_dim=384, num_heads=6),
                    'vit_medium_convstem': dict(embed_dim=512, num_heads=8, no_embed_class=True, init_values=1e-6)}
        ref = VisionTransformer(depth=SMALL[name]['depth'], img_size=IMG, **vit_args[name])
        ref.patch_embed.proj = _AuthorsStem(widths, strides, out_chs)
    else:
        ref = ConvNeXt(depths=SMALL[name]['depths'])
        ref.stem = _AuthorsStem(widths, strides, out_chs)
    if name == 'vit_small_convstem':  # normalize_model: Sequential(normalize, model)
        ref = nn.Sequential(OrderedDict(normalize=_AuthorsNormalizer(), model=ref))
    return ref


def _perturbed(model: nn.Module) -> nn.Module:
    torch.manual_seed(1)
    with torch.no_grad():  # move norms and layer scales away from their identity init
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model.eval()


@pytest.mark.parametrize('name,wrap', [(name, 'ddp_at') for name in sorted(SMALL)] + [
    ('convnext_tiny_convstem', 'plain'), ('vit_medium_convstem', 'ema')])
def test_authors_layout_converts_with_identical_logits(name, wrap):
    ref = _perturbed(_authors_reference(name))
    sd = ref.state_dict()
    if wrap == 'ddp_at':  # their adversarial-training wrapper (base_model) under DDP (module)
        ckpt = {f'module.base_model.{k}': v for k, v in sd.items()}
    elif wrap == 'ema':  # timm.utils.get_state_dict(model_ema) inside a training-state dict
        ckpt = {'state_dict_ema': dict(sd), 'epoch': 3}
    else:
        ckpt = dict(sd)
    assert detect_layout(ckpt) == 'singh2023'
    model = timm.create_model(name, **SMALL[name]).eval()
    model.load_state_dict(checkpoint_filter_fn(ckpt, model), strict=True)
    x = torch.rand(2, 3, IMG, IMG)
    with torch.no_grad():
        torch.testing.assert_close(model(x), ref(x), rtol=0, atol=2e-6)


def test_robustbench_vit_s_without_normalisation_buffers_loads():
    ref = _perturbed(_authors_reference('vit_small_convstem'))
    # RobustBench strips 'module.'/'model.' and keeps the ImageNormalizer buffers out of its file
    ckpt = {f'model.{k}': v for k, v in ref.model.state_dict().items()}
    model = timm.create_model('vit_small_convstem', **SMALL['vit_small_convstem']).eval()
    model.load_state_dict(checkpoint_filter_fn(ckpt, model, layout='robustbench'), strict=True)
    x = torch.rand(2, 3, IMG, IMG)
    with torch.no_grad():
        torch.testing.assert_close(model(x), ref(x), rtol=0, atol=2e-6)


def test_normalisation_buffers_for_a_model_without_them_is_an_error():
    ref = _authors_reference('vit_small_convstem')
    model = timm.create_model('vit_small_convstem', input_norm=False, depth=2)
    with pytest.raises(ValueError, match='input_norm=True'):
        checkpoint_filter_fn(ref.state_dict(), model)


def test_ambiguous_training_state_and_unknown_layout_are_errors():
    model = timm.create_model('convnext_tiny_convstem', **SMALL['convnext_tiny_convstem'])
    sd = model.state_dict()
    with pytest.raises(ValueError, match="state_dict_ema"):
        checkpoint_filter_fn({'model_state_dict': sd, 'state_dict_ema': sd}, model)
    with pytest.raises(ValueError, match='Unrecognised checkpoint layout'):
        detect_layout({'fc.weight': torch.zeros(1)})
    with pytest.raises(ValueError, match="Unknown layout"):
        checkpoint_filter_fn(sd, model, layout='huang2022')
    assert detect_layout(sd) == 'timm'
    assert checkpoint_filter_fn(sd, model).keys() == sd.keys()


def test_robustbench_builds_share_our_keys():
    convstem_models = pytest.importorskip('robustbench.model_zoo.architectures.convstem_models',
                                          reason='robustbench is not importable here',
                                          exc_type=ImportError)
    for rb_name, ours in [('vit_s_cvst', 'vit_small_convstem'), ('convnext_t_cvst', 'convnext_tiny_convstem')]:
        try:
            with torch.device('meta'):
                ref = convstem_models.get_convstem_models(rb_name)
        except RuntimeError as e:  # timm 1.0.9 (robustbench's pin) reads tensor values while building a ViT
            if 'meta' not in str(e):
                raise
            ref = convstem_models.get_convstem_models(rb_name)  # on the CPU: 23M / 29M parameters
        try:
            model = _meta(ours)
        except pytest.skip.Exception:
            model = timm.create_model(ours)
        converted = checkpoint_filter_fn(ref.state_dict(), model)
        assert set(converted) == set(model.state_dict())
        assert all(converted[k].shape == v.shape for k, v in model.state_dict().items())


# --- higher resolution -----------------------------------------------------------------------------------
@pytest.mark.parametrize('name,size', [('vit_small_convstem', 256), ('vit_medium_convstem', 320)])
def test_position_embeddings_resized_on_load(name, size):
    src = timm.create_model(name, depth=1).eval()  # 224 x 224: a 14 x 14 grid
    model = timm.create_model(name, depth=1, img_size=size).eval()
    model.load_state_dict(checkpoint_filter_fn(src.state_dict(), model), strict=True)
    grid = size // 16
    prefix = 0 if model.no_embed_class else 1
    assert model.pos_embed.shape == (1, prefix + grid * grid, model.embed_dim)
    if prefix:
        torch.testing.assert_close(model.pos_embed[:, 0], src.pos_embed[:, 0])
    with torch.no_grad():
        assert model(torch.rand(1, 3, size, size)).shape == (1, 1000)


def test_resample_pos_embed_follows_the_authors_scale_factor():
    # the authors (after DINO) interpolate the (dim, 14, 14) grid bicubically with scale factor (16 + 0.1) / 14
    torch.manual_seed(0)
    old, new, dim = 14, 16, 3
    grid = torch.randn(1, dim, old, old)
    tokens = grid.flatten(2).transpose(1, 2)  # row-major (h, w) token order, as ViTs flatten patches
    pos = torch.cat([torch.full((1, 1, dim), 7.0), tokens], dim=1)
    out = resample_pos_embed(pos, (new, new), num_prefix_tokens=1)
    expected = F.interpolate(grid, scale_factor=((new + 0.1) / old,) * 2, mode='bicubic')
    assert out.shape == (1, 1 + new * new, dim)
    torch.testing.assert_close(out[:, :1], pos[:, :1])
    torch.testing.assert_close(out[:, 1:], expected.flatten(2).transpose(1, 2))
    assert not torch.allclose(  # differs from resizing to the target size
        expected, F.interpolate(grid, size=(new, new), mode='bicubic'))
    with pytest.raises(ValueError, match='square grid'):
        resample_pos_embed(pos, (new, new), num_prefix_tokens=0)


def test_dynamic_img_size_runs_at_320():
    model = timm.create_model('vit_small_convstem', dynamic_img_size=True, depth=1).eval()
    with torch.no_grad():
        assert model(torch.rand(1, 3, 320, 320)).shape == (1, 1000)


def test_convnext_runs_at_higher_resolution():
    model = timm.create_model('convnext_tiny_convstem', **SMALL['convnext_tiny_convstem']).eval()
    with torch.no_grad():
        assert model(torch.rand(1, 3, 256, 256)).shape == (1, 1000)
    assert _meta_full('convnext_large_convstem').pretrained_cfg['test_input_size'] == (3, 320, 320)


# --- complexity ------------------------------------------------------------------------------------------
@pytest.mark.parametrize('name', sorted(AUTHORS_PARAMS))
def test_count_macs_on_meta(name):
    model = _meta_full(name)
    macs = count_macs(model, input_size=(3, 224, 224))
    # every weight is used at least once per position of the coarsest (7 x 7) grid
    assert macs > 49 * count_params(model)


@pytest.mark.parametrize('name', ['convnext_iso_convstem', 'convnext_tiny_convstem'])
def test_count_macs_equals_torchprofile(name):
    torchprofile = pytest.importorskip('torchprofile')
    model = timm.create_model(name, **SMALL[name]).eval()
    expected = torchprofile.profile_macs(model, torch.rand(1, 3, IMG, IMG))
    assert count_macs(_meta(name, **SMALL[name]), input_size=(3, IMG, IMG)) == expected


def test_bad_stem_configuration_is_an_error():
    with pytest.raises(ValueError, match='dims\\[0\\]'):
        timm.create_model('convnext_tiny_convstem', stem_widths=(48, 64), depths=(1, 1, 1, 1))
    with pytest.raises(ValueError, match='patch_size'):
        timm.create_model('vit_small_convstem', stem_widths=(48, 96, 192), depth=1)
    assert isinstance(_meta_full('convnext_iso_convstem'), ConvNeXtIsotropic)


def test_convnext_features_see_the_input_normalisation():
    kwargs = dict(SMALL['convnext_tiny_convstem'], input_norm=True)
    torch.manual_seed(0)
    model = timm.create_model('convnext_tiny_convstem', **kwargs).eval()
    torch.manual_seed(0)  # same construction, same initial weights
    feats = timm.create_model('convnext_tiny_convstem', features_only=True, out_indices=(0,), **kwargs).eval()
    x = torch.rand(1, 3, IMG, IMG)
    with torch.no_grad():
        got = feats(x)[0]
        torch.testing.assert_close(got, model.stages[0](model.stem(model.normalize(x))))
        assert not torch.allclose(got, model.stages[0](model.stem(x)))


@pytest.mark.parametrize('name', ['vit_medium_convstem', 'convnext_iso_convstem'])
def test_a_file_trained_with_normalisation_inside_says_so_and_needs_input_norm(name):
    # the authors' main.py with --model.add_normalization 1 saves normalize_model(model): the mean and std
    # are persistent buffers, so the file shows whether its model standardised inside
    ref = _perturbed(nn.Sequential(OrderedDict(normalize=_AuthorsNormalizer(), model=_authors_reference(name))))
    ckpt = {f'module.base_model.{k}': v for k, v in ref.state_dict().items()}
    plain = timm.create_model(name, **SMALL[name]).eval()
    with pytest.raises(ValueError, match='create it with input_norm=True'):
        checkpoint_filter_fn(ckpt, plain)
    model = timm.create_model(name, **SMALL[name], input_norm=True).eval()
    model.load_state_dict(checkpoint_filter_fn(ckpt, model), strict=True)
    x = torch.rand(2, 3, IMG, IMG)
    with torch.no_grad():
        torch.testing.assert_close(model(x), ref(x), rtol=0, atol=2e-6)
