"""APGD: the exact schedule of pyautoattack's APGDAttack, the highest-loss contract, soft targets, autocast.

Differences from pyautoattack that are deliberate (both follow Singh et al.'s ``apgd_train``):
- ``apgd_attack`` skips the backward pass of the last iteration, whose gradient is never used; pyautoattack
  computes it. The returned highest-loss point is the same.
- the step size has the images' dtype, and the loss history the loss's dtype (float32 for float32 models);
  pyautoattack allocates both with the default dtype. The exactness tests therefore make float64 the default
  dtype while pyautoattack runs, so that both compute in float64 throughout.
Both references start the loss history from 0 rather than from the clean loss (their zero buffer read at
index -1); ``apgd_attack`` reproduces that, and the rugged 'sine' model below is where it matters.
"""
import pytest
import torch
import torch.nn as nn
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from robust_resnets.attacks import apgd_attack, ce_loss, cw_loss

EPS = {'Linf': 8 / 255, 'L2': 0.5}


class Sine(nn.Module):
    """A periodic activation: the loss goes down along some gradient steps, so checkpoints halve and restart."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.sin(30 * x)


def tiny_net(act: str = 'relu', dtype: torch.dtype = torch.float32, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), Sine() if act == 'sine' else nn.ReLU(),
                          nn.Conv2d(8, 8, 3, padding=1, stride=2), nn.ReLU(), nn.Flatten(), nn.Linear(128, 10))
    return model.to(dtype).eval()


def batch(n: int = 16, dtype: torch.dtype = torch.float32, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 3, 8, 8, generator=g).to(dtype), torch.randint(0, 10, (n,), generator=g)


def _size(delta: torch.Tensor, norm: str) -> torch.Tensor:
    d = delta.flatten(1)
    return d.abs().amax(1) if norm == 'Linf' else d.norm(dim=1)


@pytest.fixture
def float64_default():
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(previous)


@pytest.mark.parametrize('steps', [2, 5, 20])
@pytest.mark.parametrize('norm', ['Linf', 'L2'])
@pytest.mark.parametrize('act, eps_scale', [('relu', 1), ('sine', 4)])
def test_matches_pyautoattack(float64_default, act, eps_scale, norm, steps):
    from pyautoattack.autopgd_base import APGDAttack
    model = tiny_net(act, torch.float64)
    x, y = batch(dtype=torch.float64)
    eps = EPS[norm] * eps_scale
    reference = APGDAttack(model, n_iter=steps, norm=norm, eps=eps, loss='ce', device='cpu', seed=0)
    reference.init_hyperparam(x)
    expected = reference.attack_single_run(x, y, x_init=x.clone())[0]  # x_best: the highest-loss point
    adv = apgd_attack(model, x, y, eps=eps, steps=steps, norm=norm)
    # L2 normalises with clamp(norm, 1e-12) where pyautoattack adds 1e-12: agreement to ~1e-12, not bitwise
    torch.testing.assert_close(adv, expected, atol=1e-8, rtol=0)
    assert not torch.equal(adv, x)


@pytest.mark.parametrize('norm', ['Linf', 'L2'])
def test_inputs_outside_the_box_start_from_their_clamp_like_pyautoattack(float64_default, norm):
    # random erasing in pixel mode writes N(0, 1) noise into training images
    from pyautoattack.autopgd_base import APGDAttack
    model = tiny_net('sine', torch.float64)
    x, y = batch(dtype=torch.float64)
    x[:, :, 2:6, 2:6] = torch.randn(x.shape[0], x.shape[1], 4, 4, dtype=torch.float64)
    assert x.min() < 0 and x.max() > 1
    for steps in (2, 5):
        reference = APGDAttack(model, n_iter=steps, norm=norm, eps=EPS[norm], loss='ce', device='cpu', seed=0)
        reference.init_hyperparam(x)
        expected = reference.attack_single_run(x, y, x_init=x.clone())[0]
        adv = apgd_attack(model, x, y, eps=EPS[norm], steps=steps, norm=norm)
        torch.testing.assert_close(adv, expected, atol=1e-8, rtol=0)
        assert adv.min() >= 0 and adv.max() <= 1


def test_skips_the_last_backward_pass():
    counts = {'forward': 0, 'backward': 0}

    class Counter(nn.Module):
        def forward(self, x):
            counts['forward'] += 1
            if x.requires_grad:
                x.register_hook(lambda g: counts.__setitem__('backward', counts['backward'] + 1))
            return x

    model = nn.Sequential(Counter(), tiny_net())
    x, y = batch(4)
    apgd_attack(model, x, y, eps=EPS['Linf'], steps=3)
    assert counts == {'forward': 4, 'backward': 3}  # clean point + 3 iterates; no gradient at the last one


@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(seed=st.integers(0, 2 ** 16), n=st.integers(1, 4), eps_scale=st.floats(0, 4), norm=st.sampled_from(['Linf', 'L2']),
       steps=st.integers(1, 6), act=st.sampled_from(['relu', 'sine']), loss=st.sampled_from(['ce', 'cw']),
       train_mode=st.booleans())
def test_highest_loss_inside_ball_and_box(seed, n, eps_scale, norm, steps, act, loss, train_mode):
    model = tiny_net(act, seed=seed % 5)
    model.train(train_mode)  # no batch norm: train mode must just be left alone
    x, y = batch(n, seed=seed)
    x[0, 0, 0, 0], x[-1, 0, 0, 1] = 0.0, 1.0  # pixels on the box edges
    eps = EPS[norm] * eps_scale
    adv = apgd_attack(model, x, y, eps=eps, steps=steps, norm=norm, loss_fn=loss)
    assert adv.shape == x.shape and adv.dtype == x.dtype and not adv.requires_grad
    assert adv.min() >= 0 and adv.max() <= 1
    assert (_size(adv - x, norm) <= eps * (1 + 1e-5) + 1e-6).all()
    assert model.training == train_mode
    assert all(p.grad is None for p in model.parameters())
    loss_fn = ce_loss if loss == 'ce' else cw_loss
    with torch.no_grad():
        assert (loss_fn(model(adv), y) >= loss_fn(model(x), y)).all()  # the clean point is iterate 0


def test_soft_targets():
    model = tiny_net('sine')
    x, y = batch(8)
    one_hot = nn.functional.one_hot(y, 10).float()
    for norm in ('Linf', 'L2'):
        hard = apgd_attack(model, x, y, eps=EPS[norm] * 4, steps=5, norm=norm)
        torch.testing.assert_close(apgd_attack(model, x, one_hot, eps=EPS[norm] * 4, steps=5, norm=norm), hard)
    # mixup of two examples with label smoothing, as in Singh et al.'s training
    soft = 0.6 * one_hot + 0.4 * one_hot.roll(1, 0)
    soft = soft * 0.9 + 0.1 / 10
    adv = apgd_attack(model, x, soft, eps=4 / 255, steps=2)
    assert _size(adv - x, 'Linf').max() <= 4 / 255 + 1e-6
    with torch.no_grad():
        assert (ce_loss(model(adv), soft) >= ce_loss(model(x), soft)).all()
        assert (ce_loss(model(adv), soft) > ce_loss(model(x), soft)).any()
    with pytest.raises(ValueError, match='soft targets'):
        apgd_attack(model, x, soft, eps=4 / 255, steps=2, loss_fn='cw')
    with pytest.raises(ValueError, match='soft targets'):
        cw_loss(model(x), soft)
    with pytest.raises(ValueError, match='labels must be class indices'):
        apgd_attack(model, x, y[:, None], eps=4 / 255, steps=2)


def test_steps_zero_returns_the_clean_images():
    x, y = batch(4)
    adv = apgd_attack(tiny_net(), x, y, eps=EPS['Linf'], steps=0)
    assert torch.equal(adv, x) and adv is not x


@pytest.mark.parametrize('kwargs, match', [
    (dict(norm='L1'), 'AutoAttack'),
    (dict(norm='Lfoo'), 'norm'),
    (dict(eps=-0.1), 'eps >= 0'),
    (dict(steps=-1), 'steps >= 0'),
    (dict(initial_step=0.0), 'initial_step > 0'),
    (dict(rho=1.5), 'rho'),
])
def test_bad_arguments(kwargs, match):
    x, y = batch(2)
    args = dict(eps=EPS['Linf'], steps=2) | kwargs
    with pytest.raises(ValueError, match=match):
        apgd_attack(tiny_net(), x, y, **args)


def test_loss_precision():
    logits, y = torch.randn(3, 10), torch.tensor([0, 1, 2])
    assert ce_loss(logits.double(), y).dtype == torch.float64  # float64 models keep float64 losses
    assert ce_loss(logits.bfloat16(), y).dtype == torch.float32
    assert ce_loss(logits, nn.functional.one_hot(y, 10).double()).dtype == torch.float32


@pytest.mark.parametrize('norm', ['Linf', 'L2'])
def test_runs_under_bfloat16_autocast(norm):
    model = tiny_net()
    x, y = batch(8)
    with torch.autocast('cpu', dtype=torch.bfloat16):
        adv = apgd_attack(model, x, y, eps=EPS[norm], steps=3, norm=norm)
    assert adv.dtype == torch.float32 and adv.min() >= 0 and adv.max() <= 1
    assert (_size(adv - x, norm) <= EPS[norm] * (1 + 1e-5) + 1e-6).all()
    assert not torch.equal(adv, x)


@pytest.mark.parametrize('dtype', [torch.bfloat16, torch.float16])
@pytest.mark.parametrize('norm', ['Linf', 'L2'])
def test_half_precision_images_stay_in_the_ball(dtype, norm):
    model = tiny_net(dtype=dtype)
    x, y = batch(16, dtype)
    adv = apgd_attack(model, x, y, eps=EPS[norm], steps=5, norm=norm)
    assert adv.dtype == dtype and adv.min() >= 0 and adv.max() <= 1
    assert (_size(adv.float() - x.float(), norm) <= EPS[norm] * (1 + 1e-6)).all()
    assert not torch.equal(adv, x)
