"""The meta-device MAC counter agrees with torchprofile, the counter the papers used."""
from __future__ import annotations

import pytest
import timm
import torch
from torchprofile import profile_macs

import robust_resnets  # noqa: F401
from robust_resnets.complexity import count_macs, count_params, model_complexity
from robust_resnets.scaling import network_macs

SMALL_CONFIGS = [
    ('preact_resnet', dict(depths=(2, 1, 1), widths=(2, 3, 1))),
    ('robust_resnet_a1', dict(depths=(2, 1, 1))),
    ('wrn_28_10_swish', dict(depths=(1, 1, 1), widths=(2, 2, 2))),  # TF 'same' padding path
    ('preact_resnet', dict(depths=(1, 1, 1), widths=(2, 2, 2), normalizations='GroupNorm')),
    ('vit_small_convstem', dict(depth=1, img_size=64)),  # attention counted as one op, on any device
    ('convnext_tiny_convstem', dict(depths=(1, 1, 1, 1))),
    ('robnet_large_v2', dict(C=4, layers=3)),  # RobNet cells (robnet.py)
    ('advrush', dict(C=4, layers=3)),  # DARTS cells (darts.py)
    ('racl', dict(C=4, layers=3)),
]


@pytest.mark.parametrize('name,kwargs', SMALL_CONFIGS)
def test_meta_count_matches_torchprofile(name, kwargs):
    model = timm.create_model(name, **kwargs).eval()
    size = (3, 64, 64) if 'convstem' in name else (3, 32, 32)
    reference = profile_macs(model, torch.rand(1, *size))
    try:
        with torch.device('meta'):
            meta_model = timm.create_model(name, **kwargs)
    except Exception as e:  # timm 1.0.9's ViT/ConvNeXt constructors call .item() and cannot build on meta
        pytest.skip(f'{name} cannot be built on the meta device with timm {timm.__version__}: {e}')
    ours = count_macs(meta_model, input_size=size)
    # torchprofile also counts a few scalar multiplications inside 'same' padding arithmetic
    assert abs(ours - reference) <= 16, (ours, reference)
    assert count_macs(model, input_size=size) == ours  # the same on a real device


def test_count_macs_scales_with_batch_and_restores_mode():
    model = timm.create_model('preact_resnet', depths=(1, 1, 1), widths=(1, 1, 1)).train()
    one = count_macs(model)
    assert count_macs(model, batch_size=3) == 3 * one
    assert model.training


@pytest.mark.parametrize('depths,widths,block', [((14, 14, 7), (5, 7, 3), 'robust_res_block'),
                                                 ((3, 2, 2), (2, 3, 1), 'basic')])
def test_network_macs_equals_whole_model_count(depths, widths, block):
    with torch.device('meta'):
        model = timm.create_model('preact_resnet', depths=depths, widths=widths, block_types=block)
    assert network_macs(depths, widths, block_type=block) == count_macs(model)


def test_model_complexity_of_registered_model():
    info = model_complexity('wrn_28_10')
    assert info['params'] == count_params(timm.create_model('wrn_28_10', depths=(4, 4, 4)))
    assert info['input_size'] == [3, 32, 32]
    assert 5.2e9 < info['macs'] < 5.3e9
