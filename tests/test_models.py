"""One parametrised suite over every model robust-resnets registers, in the spirit of timm's tests/test_models.py.

Each test builds a *reduced* instance of the model (fewer blocks, same block type, widths and
hyper-parameters) for real CPU compute, and the full model on the ``meta`` device where only
shapes matter. Families register their reduction in ``REDUCED_KWARGS`` below.
"""
from __future__ import annotations

import fnmatch

import pytest
import timm
import torch

import robust_resnets  # noqa: F401  (registers the models)
from robust_resnets.models import list_models

MODELS = list_models()

#: kwargs that shrink a model to a few blocks for real CPU compute; first matching pattern wins.
REDUCED_KWARGS = [
    ('preact_resnet', dict(depths=(1, 1, 1), widths=(1, 1, 1))),
    ('robust_resnet_*', dict(depths=(1, 1, 1))),
    ('wrn_*', dict(depths=(1, 1, 1))),
    ('vit_*_convstem', dict(depth=2, img_size=64)),  # two blocks: the first one's drop-path rate is 0
    ('convnext_iso_convstem', dict(depth=2)),
    ('convnext_*_convstem', dict(depths=(1, 1, 1, 1))),
    ('robnet_free', dict(layers=2, share=True)),  # one code per cell: 20 codes need 20 cells
    ('robnet_*', dict(layers=2)),
    ('advrush', dict(layers=2)),
    ('racl', dict(layers=2)),
]


def reduced_kwargs(name: str) -> dict:
    for pattern, kwargs in REDUCED_KWARGS:
        if fnmatch.fnmatch(name, pattern):
            return dict(kwargs)
    raise AssertionError(f'{name} has no entry in REDUCED_KWARGS; add one so the suite can run it on a CPU')


def input_size(model: torch.nn.Module) -> tuple:
    c, h, w = model.pretrained_cfg['input_size']
    return (c, min(h, 64), min(w, 64)) if h > 64 else (c, h, w)


def create_reduced(name: str, **kwargs) -> torch.nn.Module:
    torch.manual_seed(0)
    return timm.create_model(name, **reduced_kwargs(name), **kwargs)


def test_models_are_registered():
    expected = {f'robust_resnet_a{i}' for i in range(1, 5)} | {f'wrn_a{i}' for i in range(1, 5)} | {
        'wrn_28_10', 'wrn_34_10', 'wrn_34_12', 'wrn_46_14', 'wrn_70_16', 'wrn_34_r', 'wrn_28_10_swish',
        'wrn_70_16_swish', 'preact_resnet'}
    assert expected <= set(MODELS)
    assert set(timm.list_models('robust_resnet*')) >= {f'robust_resnet_a{i}' for i in range(1, 5)}


@pytest.mark.parametrize('name', MODELS)
def test_model_meta_full_size(name):
    """The full-size model builds and runs on meta with the cfg's input size and class count."""
    try:
        with torch.device('meta'):
            model = timm.create_model(name).eval()
    except RuntimeError as e:
        if timm.__version__ == '1.0.9':
            pytest.skip(f"timm 1.0.9's own {name.split('_')[0]} constructor cannot run on meta: {e}")
        raise
    with torch.device('meta'):
        out = model(torch.empty(2, *model.pretrained_cfg['input_size']))
    assert out.shape == (2, model.pretrained_cfg['num_classes'])
    assert model.num_classes == model.pretrained_cfg['num_classes']


@pytest.mark.parametrize('name', MODELS)
def test_model_forward_backward(name):
    model = create_reduced(name, num_classes=7).train()
    x = torch.rand(2, *input_size(model))
    out = model(x)
    assert out.shape == (2, 7)
    assert torch.isfinite(out).all()
    out.mean().backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None]
    # RobustResBlock keeps the authors' norm1, which only the projection shortcut reads: blocks without one
    # carry it unused (its weights still load from the checkpoints)
    unused_ok = [n for n in missing if n.endswith(('.norm1.weight', '.norm1.bias'))
                 and model.get_submodule(n.rsplit('.', 2)[0]).__class__.__name__ == 'RobustResBlock'
                 and model.get_submodule(n.rsplit('.', 2)[0]).shortcut is None]
    assert missing == unused_ok, f'parameters without gradient: {sorted(set(missing) - set(unused_ok))}'


@pytest.mark.parametrize('name', MODELS)
def test_model_eval_batch_independent(name):
    """In eval mode each example's logits do not depend on the rest of the batch."""
    model = create_reduced(name).eval()
    x = torch.rand(3, *input_size(model))
    with torch.no_grad():
        full = model(x)
        single = torch.cat([model(x[i:i + 1]) for i in range(3)])
    torch.testing.assert_close(full, single, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize('name', MODELS)
def test_model_default_cfg(name):
    from robust_resnets.complexity import create_for_counting

    model = create_for_counting(name)
    cfg = model.pretrained_cfg
    for key in ('input_size', 'num_classes', 'mean', 'std', 'first_conv', 'classifier', 'crop_pct', 'interpolation'):
        assert key in cfg, f'{name} cfg lacks {key}'
    assert len(cfg['input_size']) == 3 and cfg['input_size'][0] == 3
    # inputs are [0, 1] pixels: any normalisation lives in the model, never in the cfg
    assert tuple(cfg['mean']) == (0.0, 0.0, 0.0) and tuple(cfg['std']) == (1.0, 1.0, 1.0)
    first_conv = model.get_submodule(cfg['first_conv'] if isinstance(cfg['first_conv'], str) else cfg['first_conv'][0])
    assert isinstance(first_conv, torch.nn.Conv2d) and first_conv.in_channels == 3
    classifier = model.get_submodule(cfg['classifier'])
    assert classifier is model.get_classifier()
    assert classifier.out_features == cfg['num_classes']
    assert classifier.in_features == model.num_features


@pytest.mark.parametrize('name', MODELS)
def test_model_reset_classifier_and_pre_logits(name):
    model = create_reduced(name).eval()
    x = torch.rand(2, *input_size(model))
    with torch.no_grad():
        feats = model.forward_features(x)
        pre = model.forward_head(feats, pre_logits=True)
        assert pre.shape == (2, model.num_features)
        model.reset_classifier(5)
        assert model(x).shape == (2, 5)
        model.reset_classifier(0)
        assert model(x).shape == (2, model.num_features)
    headless = create_reduced(name, num_classes=0).eval()
    with torch.no_grad():
        assert headless(x).shape == (2, headless.num_features)


@pytest.mark.parametrize('name', MODELS)
def test_model_features_only(name):
    model = create_reduced(name).eval()
    if not getattr(model, 'feature_info', None):
        pytest.skip(f'{name} declares no feature_info')
    feat_model = create_reduced(name, features_only=True).eval()
    x = torch.rand(1, *input_size(model))
    with torch.no_grad():
        feats = feat_model(x)
    info = feat_model.feature_info
    assert len(feats) == len(info.channels())
    for f, chs, red in zip(feats, info.channels(), info.reduction()):
        assert f.shape[1] == chs
        assert x.shape[-1] // f.shape[-1] == red


@pytest.mark.parametrize('name', MODELS)
def test_model_forward_intermediates(name):
    """timm's forward_intermediates: the final features of forward_features, the taps of features_only, and
    stop_early and prune_intermediate_layers giving the same first tap."""
    model = create_reduced(name).eval()
    feat_model = create_reduced(name, features_only=True).eval()
    x = torch.rand(2, *input_size(model))
    with torch.no_grad():
        final, taps = model.forward_intermediates(x)
        torch.testing.assert_close(final, model.forward_features(x))
        feats = feat_model(x)
        last = model.forward_intermediates(x, indices=len(feats), intermediates_only=True)
        assert len(last) == len(feats)
        for a, b in zip(last, feats):
            torch.testing.assert_close(a, b)
        first = model.forward_intermediates(x, indices=[0], intermediates_only=True)[0]
        torch.testing.assert_close(model.forward_intermediates(x, indices=[0], stop_early=True)[1][0], first)
        if not type(model).prune_intermediate_layers.__module__.startswith('robust_resnets'):
            return  # timm's own (ConvStem ViT/ConvNeXt inherit it; timm 1.0.9's ConvNeXt keeps a stale head norm)
        assert model.prune_intermediate_layers([0]) == [0]
        torch.testing.assert_close(model.forward_intermediates(x, indices=[0], intermediates_only=True)[0], first)
        assert model(x).shape[:2] == (2, model.num_features)  # headless, the features of the first tap
    with pytest.raises(ValueError, match='out of range'):
        model.forward_intermediates(x, indices=[99])


@pytest.mark.parametrize('name', MODELS)
def test_model_grad_checkpointing(name):
    model = create_reduced(name).eval()
    x = torch.rand(2, *input_size(model), requires_grad=True)
    ref = model(x)
    model.set_grad_checkpointing(True)
    out = model(x)
    torch.testing.assert_close(out, ref)
    out.sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()


@pytest.mark.parametrize('name', MODELS)
def test_model_in_chans(name):
    """A model builds for one input channel, unless it standardises its input inside with three-channel
    statistics: then the error says so."""
    from robust_resnets.models.layers import InputNormalize

    if isinstance(getattr(create_reduced(name), 'normalize', None), InputNormalize):
        with pytest.raises(ValueError, match=r'3-channel mean=.*in_chans=1; pass input_mean and input_std'):
            create_reduced(name, in_chans=1)
        return
    model = create_reduced(name, in_chans=1).eval()
    c, h, w = input_size(model)
    with torch.no_grad():
        assert model(torch.rand(2, 1, h, w)).shape == (2, model.num_classes)


@pytest.mark.parametrize('name', MODELS)
def test_model_drop_path(name):
    """drop_path_rate drops residual branches in training only: in eval mode the model computes what the same
    weights without drop path compute (up to summation order)."""
    plain = create_reduced(name)
    dropping = create_reduced(name, drop_path_rate=0.5)
    dropping.load_state_dict(plain.state_dict())
    x = torch.rand(8, *input_size(plain))
    with torch.no_grad():
        torch.testing.assert_close(dropping.eval()(x), plain.eval()(x))
        torch.manual_seed(0)
        train_plain = plain.train()(x)
        torch.manual_seed(0)
        assert not torch.allclose(dropping.train()(x), train_plain)


@pytest.mark.parametrize('name', [m for m in MODELS if not m.endswith('_convstem')])
def test_model_torchscript(name):
    model = create_reduced(name).eval()
    x = torch.rand(2, *input_size(model))
    scripted = torch.jit.script(model)
    with torch.no_grad():
        torch.testing.assert_close(scripted(x), model(x))


@pytest.mark.parametrize('name', MODELS)
def test_model_group_matcher(name):
    from robust_resnets.complexity import create_for_counting

    model = create_for_counting(name)
    from timm.models import group_parameters
    groups = group_parameters(model, model.group_matcher(coarse=True))
    assert sum(len(v) for v in groups.values()) == len(list(model.parameters()))
