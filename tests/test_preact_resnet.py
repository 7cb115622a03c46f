"""Fidelity of the PreActResNet family to the authors' architectures and checkpoint layouts.

A functional re-statement of each original forward pass (Huang et al. 2022's PreActResNet with
RobustResBlock / basic blocks, RobustBench's DMWideResNet), written against the *original* state
dict keys, is the reference: a checkpoint in the original layout must load into our model through
``checkpoint_filter_fn`` and give the same logits.
"""
from __future__ import annotations

import re

import pytest
import timm
import torch
import torch.nn.functional as F

import robust_resnets  # noqa: F401
from robust_resnets import RobustResBlock
from robust_resnets.models.layers import CIFAR10_MEAN, CIFAR10_STD
from robust_resnets.models.preact_resnet import checkpoint_filter_fn, detect_layout


def _randomise(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, t in model.state_dict().items():
            if t.dtype.is_floating_point and not name.startswith('normalize.'):
                if name.endswith('running_var'):
                    t.copy_(torch.rand(t.shape, generator=g) + 0.5)
                else:
                    t.copy_(torch.randn(t.shape, generator=g) * (0.2 if t.dim() > 1 else 0.5))
    return model.eval()


# --- our keys -> the authors' keys (the inverse of the filter, written independently) -----------------
def to_huang2022(sd):
    out = {}
    for k, v in sd.items():
        k = re.sub(r'^stages\.(\d+)\.blocks\.(\d+)\.', r'blocks.\1.layer.\2.', k)
        k = k.replace('.shortcut.', '.shortcut.0.').replace('.norm1.', '.bn1.').replace('.norm2.', '.bn2.')
        k = re.sub(r'\.norm3\.(\d+)\.', r'.bn3.\1.', k)
        k = k.replace('.se_norm.', '.se_bn.').replace('.se.fc1.', '.se.fc.0.').replace('.se.fc2.', '.se.fc.2.')
        k = re.sub(r'^stem\.', 'stem_conv.', k)
        k = re.sub(r'^norm\.', 'norm1.', k)
        k = re.sub(r'^head\.fc\.', 'fc.', k)
        k = {'normalize.mean': 'mu', 'normalize.std': 'sigma'}.get(k, k)
        out[k] = v.clone()
    return out


def to_dm(sd):
    out = {}
    for k, v in sd.items():
        if k.startswith('normalize.'):
            continue  # RobustBench keeps mean/std out of its state dicts
        k = re.sub(r'^stages\.(\d+)\.blocks\.(\d+)\.', r'layer.\1.block.\2.', k)
        k = k.replace('.norm1.', '.batchnorm_0.').replace('.norm2.', '.batchnorm_1.')
        k = k.replace('.conv1.', '.conv_0.').replace('.conv2.', '.conv_1.')
        k = re.sub(r'^stem\.', 'init_conv.', k)
        k = re.sub(r'^norm\.', 'batchnorm.', k)
        k = re.sub(r'^head\.fc\.', 'logits.', k)
        out[k] = v.clone()
    return out


# --- functional references in the original layouts ----------------------------------------------------
def _bn(sd, p, x):
    return F.batch_norm(x, sd[p + 'running_mean'], sd[p + 'running_var'], sd[p + 'weight'], sd[p + 'bias'],
                        False, 0.0, 1e-5)


def ref_huang2022(sd, x, *, depths, strides=(1, 2, 2), robust, scales=8, cardinality=4, act=F.relu,
                  normalise=False):
    if normalise:
        x = (x - sd['mu'].view(1, 3, 1, 1)) / sd['sigma'].view(1, 3, 1, 1)
    out = F.conv2d(x, sd['stem_conv.weight'], padding=1)
    for i, (d, s0) in enumerate(zip(depths, strides)):
        for j in range(d):
            p, s = f'blocks.{i}.layer.{j}.', (s0 if j == 0 else 1)
            pre = act(_bn(sd, p + 'bn1.', out))
            short = F.conv2d(pre, sd[p + 'shortcut.0.weight'], stride=s) if p + 'shortcut.0.weight' in sd else out
            if not robust:
                h = F.conv2d(pre, sd[p + 'conv1.weight'], stride=s, padding=1)
                out = F.conv2d(act(_bn(sd, p + 'bn2.', h)), sd[p + 'conv2.weight'], padding=1) + short
                continue
            h = act(_bn(sd, p + 'bn2.', F.conv2d(out, sd[p + 'conv1.weight'])))  # reads the raw block input
            xs = torch.chunk(h, scales, 1)
            ys = []
            for k in range(scales - 1):
                inp = xs[k] if (k == 0 or s > 1) else xs[k] + ys[-1]
                conv = F.conv2d(inp, sd[p + f'conv2.{k}.weight'], stride=s, padding=1, groups=cardinality)
                ys.append(act(_bn(sd, p + f'bn3.{k}.', conv)))
            ys.append(xs[-1] if s == 1 else F.avg_pool2d(xs[-1], 3, s, 1))
            h = F.conv2d(torch.cat(ys, 1), sd[p + 'conv3.weight'])
            se_in = _bn(sd, p + 'se_bn.', h)
            gate = torch.sigmoid(F.linear(F.relu(F.linear(se_in.mean((2, 3)), sd[p + 'se.fc.0.weight'])),
                                          sd[p + 'se.fc.2.weight']))
            out = h + short + se_in * gate[:, :, None, None]
    out = act(_bn(sd, 'norm1.', out)).mean((2, 3))
    return F.linear(out, sd['fc.weight'], sd['fc.bias'])


def ref_dm(sd, x, *, depth, mean, std):
    n = (depth - 4) // 6
    out = F.conv2d((x - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1),
                   sd['init_conv.weight'], padding=1)
    for i, s0 in enumerate((1, 2, 2)):
        for j in range(n):
            p, s = f'layer.{i}.block.{j}.', (s0 if j == 0 else 1)
            pre = F.silu(_bn(sd, p + 'batchnorm_0.', out))
            short = F.conv2d(pre, sd[p + 'shortcut.weight'], stride=s) if p + 'shortcut.weight' in sd else out
            padded = F.pad(pre, (1, 1, 1, 1) if s == 1 else (0, 1, 0, 1))  # TF 'SAME' padding
            h = F.conv2d(padded, sd[p + 'conv_0.weight'], stride=s)
            out = F.conv2d(F.silu(_bn(sd, p + 'batchnorm_1.', h)), sd[p + 'conv_1.weight'], padding=1) + short
    out = F.avg_pool2d(F.silu(_bn(sd, 'batchnorm.', out)), 8).flatten(1)
    return F.linear(out, sd['logits.weight'], sd['logits.bias'])


def _load_original(name, original_sd, **kwargs):
    model = timm.create_model(name, **kwargs).eval()
    model.load_state_dict(checkpoint_filter_fn(original_sd, model), strict=True)
    return model


@pytest.mark.parametrize('name,kwargs,robust', [
    ('robust_resnet_a1', dict(depths=(2, 2, 1)), True),
    ('wrn_a1', dict(depths=(2, 2, 1)), False),
    ('wrn_28_10', dict(depths=(2, 1, 1), widths=(2, 2, 2)), False),
])
def test_huang2022_layout_gives_identical_logits(name, kwargs, robust):
    source = _randomise(timm.create_model(name, **kwargs))
    original = to_huang2022(source.state_dict())
    assert detect_layout(original) == 'huang2022'
    x = torch.rand(3, 3, 32, 32)
    ref = ref_huang2022(original, x, depths=kwargs['depths'], robust=robust)
    with torch.no_grad():
        out = _load_original(name, original, **kwargs)(x)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


def test_robustbench_wrn_a4_layout_with_silu_and_normalisation():
    """RobustBench's Huang2022Revisiting_WRN-A4: SiLU, CIFAR-10 standardisation inside (mu/sigma buffers)."""
    kwargs = dict(depths=(2, 1, 1), activations='SiLU', input_mean=CIFAR10_MEAN, input_std=CIFAR10_STD)
    source = _randomise(timm.create_model('wrn_a4', **kwargs))
    original = to_huang2022(source.state_dict())
    original['mu'] = original['mu'].view(3, 1, 1)
    x = torch.rand(2, 3, 32, 32)
    ref = ref_huang2022(original, x, depths=(2, 1, 1), robust=False, act=F.silu, normalise=True)
    with torch.no_grad():
        torch.testing.assert_close(_load_original('wrn_a4', original, **kwargs)(x), ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize('depth', [10, 16])
def test_dm_wide_resnet_layout_gives_identical_logits(depth):
    kwargs = dict(depths=((depth - 4) // 6,) * 3, widths=(2, 2, 2))
    source = _randomise(timm.create_model('wrn_28_10_swish', **kwargs))
    original = to_dm(source.state_dict())
    assert detect_layout(original) == 'dm_wrn'
    x = torch.rand(2, 3, 32, 32)
    ref = ref_dm(original, x, depth=depth, mean=CIFAR10_MEAN, std=CIFAR10_STD)
    with torch.no_grad():
        torch.testing.assert_close(_load_original('wrn_28_10_swish', original, **kwargs)(x), ref, rtol=1e-5, atol=1e-5)


def test_filter_unwraps_ddp_and_state_dict_wrappers():
    model = _randomise(timm.create_model('wrn_a1', depths=(1, 1, 1)))
    original = {'state_dict': {f'module.{k}': v for k, v in to_huang2022(model.state_dict()).items()}, 'epoch': 99}
    fresh = timm.create_model('wrn_a1', depths=(1, 1, 1)).eval()
    fresh.load_state_dict(checkpoint_filter_fn(original, fresh))
    x = torch.rand(1, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(fresh(x), model(x))


def test_unknown_layout_is_refused_with_guidance():
    with pytest.raises(ValueError, match='layout'):
        detect_layout({'foo.weight': torch.zeros(1)})


def test_robust_res_block_standalone_keywords():
    block = RobustResBlock(64, 16, stride=2, kernel_size=3, scales=8, base_width=10, cardinality=4, se_reduction=16,
                           activation='SiLU', normalization='BatchNorm')
    y = block(torch.rand(2, 64, 16, 16))
    assert y.shape == (2, 64, 8, 8)  # emits 4 * out_chs channels, like the authors' bottleneck planes
    assert block.out_channels == 64
    assert len(block.conv2) == 7 and block.conv2[0].groups == 4
    with pytest.raises(ValueError, match='split width 0'):
        RobustResBlock(16, 8, base_width=10)


def test_robust_res_block_single_scale():
    block = RobustResBlock(32, 16, scales=1, base_width=40, cardinality=1, se_reduction=4)
    assert block(torch.rand(1, 32, 8, 8)).shape == (1, 64, 8, 8)


def test_builder_validates_per_stage_lists():
    with pytest.raises(ValueError, match='one per stage'):
        timm.create_model('preact_resnet', depths=(1, 1, 1), widths=(1, 1))
    with pytest.raises(ValueError, match='Unknown block type'):
        timm.create_model('preact_resnet', depths=(1, 1, 1), block_types='bottleneck')
    with pytest.raises(ValueError, match='Unknown activation'):
        timm.create_model('preact_resnet', depths=(1, 1, 1), activations='NoSuchAct')
    with pytest.raises(ValueError, match='both input_mean and input_std'):
        timm.create_model('preact_resnet', depths=(1, 1, 1), input_mean=CIFAR10_MEAN)


def test_in_model_normalisation_is_not_in_cfg():
    model = timm.create_model('wrn_28_10_swish', depths=(1, 1, 1))
    assert tuple(model.pretrained_cfg['mean']) == (0.0, 0.0, 0.0)
    torch.testing.assert_close(model.normalize.mean.flatten(), torch.tensor(CIFAR10_MEAN))
    x = torch.rand(1, 3, 32, 32)
    torch.testing.assert_close(model.normalize(x), (x - model.normalize.mean) / model.normalize.std)
    with torch.device('meta'):  # the printout of a model built for counting shows no values
        assert 'channels=3' in repr(timm.create_model('wrn_28_10_swish').normalize)


@pytest.mark.parametrize('name,layer', [('Softplus', 'Softplus'), ('Swish', 'SiLU'), ('GELU', 'GELU'),
                                        ('LeakyReLU', 'LeakyReLU')])
def test_activations_of_the_authors_configs(name, layer):
    model = timm.create_model('preact_resnet', depths=(1, 1, 1), widths=(1, 1, 1), activations=name)
    acts = [m for m in model.modules() if type(m).__name__ == layer]
    assert len(acts) == 7  # two per block and the head's
    if name == 'Softplus':
        assert (acts[0].beta, acts[0].threshold) == (1.0, 20.0)


def test_layer_norm_has_the_authors_eps():
    model = timm.create_model('preact_resnet', depths=(1, 1, 1), widths=(1, 1, 1), normalizations='LayerNorm')
    assert {m.eps for m in model.modules() if isinstance(m, torch.nn.LayerNorm)} == {1e-5}
