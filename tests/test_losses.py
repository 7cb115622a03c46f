"""Training objectives against direct, independent computations of their formulas.

The references are written in numpy (float64) from the papers' formulas; gradients are checked
against central finite differences of those references.
"""
import numpy as np
import pytest
import torch

from robust_resnets.training.losses import (
    OBJECTIVES, clean_loss, get_objective, mart_attack_loss, mart_loss, pgd_at_attack_loss, pgd_at_loss,
    score_attack_loss, score_loss, trades_attack_loss, trades_loss,
)

N, K = 6, 5


def _inputs(seed=0):
    rng = np.random.default_rng(seed)
    clean = rng.normal(scale=2.0, size=(N, K))
    adv = clean + rng.normal(scale=1.5, size=(N, K))
    labels = rng.integers(0, K, size=N)
    labels[0] = int(np.argmax(adv[0]))   # MART: an example whose top adversarial class is the label ...
    labels[1] = int(np.argmin(adv[1]))   # ... and one where it is not
    return clean, adv, labels


def _softmax(z):
    e = np.exp(z - z.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def _log_softmax(z):
    m = z.max(axis=1, keepdims=True)
    return z - m - np.log(np.exp(z - m).sum(axis=1, keepdims=True))


def _ce(z, y, ls=0.0):
    logp = _log_softmax(z)
    nll = -logp[np.arange(len(y)), y]
    return ((1 - ls) * nll + ls * (-logp).mean(axis=1)).mean()


def ref_trades(c, a, y, beta, ls):
    p, logp, logq = _softmax(c), _log_softmax(c), _log_softmax(a)
    return _ce(c, y, ls) + beta * (p * (logp - logq)).sum(axis=1).mean()


def ref_mart(c, a, y, beta):
    p_adv, p_nat = _softmax(a), _softmax(c)
    wrong = p_adv.copy()
    wrong[np.arange(len(y)), y] = -1
    hardest = wrong.argmax(axis=1)
    bce = _ce(a, y) + np.mean(-np.log(1.0001 - p_adv[np.arange(len(y)), hardest] + 1e-12))
    kl = (p_nat * (np.log(p_nat) - np.log(p_adv + 1e-12))).sum(axis=1)
    return bce + beta * np.mean(kl * (1.0000001 - p_nat[np.arange(len(y)), y]))


def ref_score(c, a, y, beta, ls, clip):
    k = c.shape[1]
    t = np.full((len(y), k), ls / (k - 1))
    t[np.arange(len(y)), y] = 1 - ls
    p, q = _softmax(c), _softmax(a)
    robust = np.maximum(((q - p) ** 2).sum(axis=1) - clip, 0)
    return ((p - t) ** 2).sum(axis=1).mean() + beta * robust.mean()


def _num_grad(f, c, a, h=1e-6):
    """Central differences of a scalar reference f(c, a) with respect to c and a."""
    grads = []
    for which in (0, 1):
        base = [c.copy(), a.copy()]
        g = np.zeros_like(base[which])
        for idx in np.ndindex(*g.shape):
            plus = [x.copy() for x in base]
            minus = [x.copy() for x in base]
            plus[which][idx] += h
            minus[which][idx] -= h
            g[idx] = (f(*plus) - f(*minus)) / (2 * h)
        grads.append(g)
    return grads


def _check(ours, ref, c, a, y, *, uses_clean=True, uses_adv=True):
    ct = torch.tensor(c, requires_grad=True)
    at = torch.tensor(a, requires_grad=True)
    yt = torch.tensor(y)
    value = ours(ct if uses_clean else None, at if uses_adv else None, yt)
    assert value.dim() == 0
    np.testing.assert_allclose(value.item(), ref(c, a, y), rtol=1e-9, atol=1e-10)
    value.backward()
    g_clean, g_adv = _num_grad(lambda c_, a_: ref(c_, a_, y), c, a)
    if uses_clean:
        np.testing.assert_allclose(ct.grad.numpy(), g_clean, rtol=1e-5, atol=1e-7)
    if uses_adv:
        np.testing.assert_allclose(at.grad.numpy(), g_adv, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize('ls', [0.0, 0.1])
def test_clean_and_pgd_at_losses(ls):
    c, a, y = _inputs(1)
    _check(lambda ct, at, yt: clean_loss(ct, at, yt, label_smoothing=ls), lambda c_, a_, y_: _ce(c_, y_, ls),
           c, a, y, uses_adv=False)
    _check(lambda ct, at, yt: pgd_at_loss(ct, at, yt, label_smoothing=ls), lambda c_, a_, y_: _ce(a_, y_, ls),
           c, a, y, uses_clean=False)


@pytest.mark.parametrize('beta,ls', [(6.0, 0.0), (5.0, 0.1)])
def test_trades_loss(beta, ls):
    c, a, y = _inputs(2)
    _check(lambda ct, at, yt: trades_loss(ct, at, yt, beta=beta, label_smoothing=ls),
           lambda c_, a_, y_: ref_trades(c_, a_, y_, beta, ls), c, a, y)


def test_trades_gradient_flows_through_the_clean_prediction():
    # the KL target softmax(f(x)) is not detached: beta changes the gradient w.r.t. the clean logits
    c, a, y = _inputs(3)
    grads = []
    for beta in (0.0, 6.0):
        ct = torch.tensor(c, requires_grad=True)
        trades_loss(ct, torch.tensor(a), torch.tensor(y), beta=beta).backward()
        grads.append(ct.grad)
    assert not torch.allclose(grads[0], grads[1])


@pytest.mark.parametrize('beta', [6.0, 1.0])
def test_mart_loss(beta):
    c, a, y = _inputs(4)
    _check(lambda ct, at, yt: mart_loss(ct, at, yt, beta=beta), lambda c_, a_, y_: ref_mart(c_, a_, y_, beta),
           c, a, y)


@pytest.mark.parametrize('beta,ls,clip', [(4.0, 0.0, 0.0), (3.0, 0.1, 0.05)])
def test_score_loss(beta, ls, clip):
    c, a, y = _inputs(5)
    _check(lambda ct, at, yt: score_loss(ct, at, yt, beta=beta, label_smoothing=ls, clip_value=clip),
           lambda c_, a_, y_: ref_score(c_, a_, y_, beta, ls, clip), c, a, y)


def _check_attack(ours, ref_per_example, a, target):
    at = torch.tensor(a, requires_grad=True)
    per_example = ours(at, target if isinstance(target, torch.Tensor) else torch.tensor(target))
    assert per_example.shape == (N,)
    np.testing.assert_allclose(per_example.detach().numpy(), ref_per_example(a), rtol=1e-9, atol=1e-12)
    per_example.sum().backward()
    (g,) = [_num_grad(lambda c_, a_: ref_per_example(a_).sum(), a, a)[1]]
    np.testing.assert_allclose(at.grad.numpy(), g, rtol=1e-5, atol=1e-7)


def test_attack_objectives():
    c, a, y = _inputs(6)
    p = _softmax(c)
    _check_attack(pgd_at_attack_loss, lambda a_: -_log_softmax(a_)[np.arange(N), y], a, y)
    assert mart_attack_loss is pgd_at_attack_loss
    _check_attack(trades_attack_loss, lambda a_: (p * (np.log(p) - _log_softmax(a_))).sum(axis=1), a, p)
    _check_attack(score_attack_loss, lambda a_: ((_softmax(a_) - p) ** 2).sum(axis=1), a, p)
    # both divergence objectives vanish at the clean point
    ct = torch.tensor(c)
    assert trades_attack_loss(ct, torch.softmax(ct, 1)).abs().max() < 1e-12
    assert score_attack_loss(ct, torch.softmax(ct, 1)).abs().max() < 1e-12


def test_half_precision_logits_are_promoted():
    c, a, y = _inputs(7)
    ct, at, yt = torch.tensor(c, dtype=torch.bfloat16), torch.tensor(a, dtype=torch.bfloat16), torch.tensor(y)
    for name in ('trades', 'mart', 'score'):
        assert OBJECTIVES[name].loss(ct, at, yt).dtype == torch.float32


def test_objective_registry():
    assert get_objective('SAT') is OBJECTIVES['pgd_at']
    assert get_objective('trades').attack_target == 'clean_probs'
    assert get_objective('mart').attack_target == 'labels'
    assert not get_objective('clean').adversarial
    assert not get_objective('pgd_at').needs_clean_logits
    with pytest.raises(ValueError, match="Unknown training objective 'tradez'"):
        get_objective('tradez')
