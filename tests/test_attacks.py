"""Attacks: invariants on random models (hypothesis), the analytic optimum on linear models, AutoAttack end to end."""
import pytest
import torch
import torch.nn as nn
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from robust_resnets.attacks import (
    autoattack_attack, cw_attack, cw_loss, default_eps, fgsm_attack, parse_attack, parse_attacks, pgd_attack,
)


def tiny_cnn(seed: int = 0, num_classes: int = 10) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(2), nn.Flatten(),
                         nn.Linear(16, num_classes)).eval()


def linear_model(weight: torch.Tensor, bias: torch.Tensor) -> nn.Module:
    model = nn.Sequential(nn.Flatten(), nn.Linear(weight.shape[1], weight.shape[0]))
    with torch.no_grad():
        model[1].weight.copy_(weight)
        model[1].bias.copy_(bias)
    return model.eval()


def _size(delta: torch.Tensor, norm: str) -> torch.Tensor:
    d = delta.flatten(1)
    return d.abs().amax(1) if norm == 'Linf' else d.norm(dim=1)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(seed=st.integers(0, 2 ** 16), n=st.integers(1, 4), eps=st.floats(0, 16 / 255), norm=st.sampled_from(['Linf', 'L2']),
       steps=st.integers(0, 3), restarts=st.integers(1, 2), random_start=st.booleans(),
       loss=st.sampled_from(['ce', 'cw']), train_mode=st.booleans())
def test_pgd_stays_in_ball_and_box(seed, n, eps, norm, steps, restarts, random_start, loss, train_mode):
    model = tiny_cnn(seed % 7)
    model.train(train_mode)
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(n, 3, 8, 8, generator=g)
    x[0, 0, 0, 0] = 0.0  # pixels on the box edges
    x[-1, 0, 0, 1] = 1.0
    y = torch.randint(0, 10, (n,), generator=g)
    adv = pgd_attack(model, x, y, eps=eps, steps=steps, step_size=eps / 2 + 1e-3, norm=norm, loss_fn=loss,
                     random_start=random_start, restarts=restarts, generator=g)
    assert adv.shape == x.shape and adv.dtype == x.dtype and not adv.requires_grad
    assert adv.min() >= 0 and adv.max() <= 1
    assert (_size(adv - x, norm) <= eps * (1 + 1e-5) + 1e-6).all()
    assert model.training == train_mode  # the attack leaves the mode alone
    assert all(p.grad is None for p in model.parameters())  # and parameter gradients


@settings(max_examples=4, deadline=None)
@given(seed=st.integers(0, 2 ** 16), norm=st.sampled_from(['Linf', 'L2']))
def test_seeded_runs_repeat_exactly(seed, norm):
    model = tiny_cnn(1)
    x = torch.rand(6, 3, 8, 8, generator=torch.Generator().manual_seed(seed))
    y = torch.arange(6) % 10
    kw = dict(eps=8 / 255 if norm == 'Linf' else 0.5, steps=3, step_size=2 / 255 if norm == 'Linf' else 0.1, norm=norm,
              restarts=2)
    a = pgd_attack(model, x, y, generator=torch.Generator().manual_seed(seed), **kw)
    b = pgd_attack(model, x, y, generator=torch.Generator().manual_seed(seed), **kw)
    assert torch.equal(a, b)
    seeds = torch.arange(6) + seed
    whole = pgd_attack(model, x, y, example_seeds=seeds, **kw)
    parts = torch.cat([pgd_attack(model, x[i:i + 4], y[i:i + 4], example_seeds=seeds[i:i + 4], **kw) for i in (0, 4)])
    assert torch.allclose(whole, parts, atol=1e-6)  # per-example seeds: batching does not matter


def test_robust_accuracy_never_exceeds_clean_with_restarts():
    model = tiny_cnn(2)
    x = torch.rand(16, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        y = model(x).argmax(1)
    adv = pgd_attack(model, x, y, eps=0.1, steps=5, step_size=0.03, restarts=3, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert (model(adv).argmax(1) == y).float().mean() <= 1.0
        # a restart never replaces a misclassified example by a correctly classified one
        single = pgd_attack(model, x, y, eps=0.1, steps=5, step_size=0.03, restarts=1,
                            generator=torch.Generator().manual_seed(0))
        fooled_single = model(single).argmax(1) != y
        fooled_multi = model(adv).argmax(1) != y
    assert (fooled_multi | ~fooled_single).all()


@pytest.mark.parametrize('norm', ['Linf', 'L2'])
@pytest.mark.parametrize('loss', ['ce', 'cw'])
def test_pgd_reaches_the_analytic_optimum_on_a_linear_classifier(norm, loss):
    # two classes: every loss here increases with w_other - w_true along x, so the optimum is the ball's extreme point
    g = torch.Generator().manual_seed(0)
    d = 3 * 4 * 4
    weight, bias = torch.randn(2, d, generator=g), torch.zeros(2)
    model = linear_model(weight, bias)
    eps = 4 / 255 if norm == 'Linf' else 0.3
    x = 0.2 + 0.6 * torch.rand(5, 3, 4, 4, generator=g)  # far from the box edges: the box is inactive
    y = torch.tensor([0, 1, 0, 1, 0])
    with torch.no_grad():  # every example stays correctly classified (the CW loss keeps a gradient), CE unsaturated
        margin = (x.flatten(1) @ (weight[1] - weight[0]))
        dual = 1 if norm == 'Linf' else 2  # the most an allowed perturbation moves the margin: eps * dual norm
        reach = eps * (weight[1] - weight[0]).norm(p=dual)
        bias_shift = torch.where(y == 1, 1.0, -1.0) * (reach + 1.0) - margin  # class-1 margin = +-(reach + 1)
    direction = (weight[1 - y] - weight[y])  # increases the loss
    if norm == 'Linf':
        optimum = x + eps * direction.sign().view_as(x)
    else:
        optimum = x + eps * (direction / direction.norm(dim=1, keepdim=True)).view_as(x)

    class Shifted(nn.Module):
        def forward(self, inp):
            out = model(inp)
            return out + torch.stack([torch.zeros_like(bias_shift), bias_shift], 1)[:inp.shape[0]]

    # Linf: sign steps of eps/4 pin every coordinate to the boundary within 8 steps from any start. L2: from the
    # centre, normalised steps along the constant gradient reach eps * direction after 4 steps and stay there.
    adv = pgd_attack(Shifted(), x, y, eps=eps, steps=10, step_size=eps / 4, norm=norm, loss_fn=loss,
                     random_start=norm == 'Linf', generator=torch.Generator().manual_seed(1))
    assert torch.allclose(adv, optimum, atol=1e-5)
    if norm == 'Linf':
        assert torch.allclose(fgsm_attack(Shifted(), x, y, eps=eps, loss_fn=loss), optimum, atol=1e-6)


def test_cw_loss_is_the_clamped_margin():
    logits = torch.tensor([[3.0, 1.0, 0.0], [0.0, 2.0, 5.0]])
    labels = torch.tensor([0, 1])
    assert torch.allclose(cw_loss(logits, labels), torch.tensor([-2.0, 0.0]))
    assert torch.allclose(cw_loss(logits, labels, kappa=1.0), torch.tensor([-3.0, 0.0]))


def test_cw_attack_defaults_are_cw40():
    model = tiny_cnn(3)
    x = torch.rand(3, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    y = torch.tensor([1, 2, 3])
    a = cw_attack(model, x, y, eps=8 / 255, generator=torch.Generator().manual_seed(5))
    b = pgd_attack(model, x, y, eps=8 / 255, steps=40, step_size=0.8 / 255, loss_fn='cw',
                   generator=torch.Generator().manual_seed(5))
    assert torch.equal(a, b)


def test_bad_arguments_are_refused():
    model = tiny_cnn()
    x, y = torch.rand(2, 3, 8, 8), torch.tensor([0, 1])
    with pytest.raises(ValueError, match='L1'):
        pgd_attack(model, x, y, eps=1.0, steps=1, step_size=0.1, norm='L1')
    with pytest.raises(ValueError, match='restarts'):
        pgd_attack(model, x, y, eps=0.1, steps=1, step_size=0.1, restarts=0)
    with pytest.raises(ValueError, match="Unknown attack loss"):
        pgd_attack(model, x, y, eps=0.1, steps=1, step_size=0.1, loss_fn='kl')


def test_attack_names():
    specs = parse_attacks('clean,fgsm,pgd20,cw40,pgd50r10,pgd7n,aa,aa-plus,aa-rand,aa:apgd-ce+square', eps=8 / 255)
    by_name = {s.name: s for s in specs}
    assert by_name['pgd20'].steps == 20 and by_name['pgd20'].step_size == pytest.approx(0.8 / 255)
    assert by_name['pgd20'].random_start and not by_name['pgd7n'].random_start
    assert by_name['pgd50r10'].restarts == 10
    assert by_name['cw40'].kind == 'cw' and by_name['cw40'].steps == 40
    assert by_name['aa'].version == 'standard' and by_name['aa-plus'].version == 'plus'
    assert by_name['aa:apgd-ce+square'].attacks == ('apgd-ce', 'square')
    assert parse_attack('pgd10', eps=0.5, norm='L2', step_size=0.1).step_size == 0.1
    for bad in ('pgd', 'pgd0', 'aa:nope', 'deepfool'):
        with pytest.raises(ValueError):
            parse_attack(bad, eps=8 / 255)
    with pytest.raises(ValueError, match='AutoAttack'):
        parse_attack('pgd10', eps=8.0, norm='L1')
    with pytest.raises(ValueError, match='repeat'):
        parse_attacks('pgd20,PGD20', eps=8 / 255)


def test_default_steps_cross_the_ball_and_radii_follow_the_norm():
    """eps/10 from 20 steps on (Huang et al.'s PGD-20, CW-40); fewer steps still travel 2 eps in all (at most
    eps each); RobustBench's radii per norm; a Linf value above 1 is refused with the /255 hint."""
    eps = 8 / 255
    steps = {k: parse_attack(k, eps=eps).step_size for k in ('pgd20', 'cw40', 'pgd100', 'pgd10', 'pgd5', 'pgd1')}
    assert steps == pytest.approx({'pgd20': eps / 10, 'cw40': eps / 10, 'pgd100': eps / 10, 'pgd10': eps / 5,
                                   'pgd5': 2 * eps / 5, 'pgd1': eps})
    assert default_eps(norm='Linf', dataset='cifar10') == pytest.approx(8 / 255)
    assert default_eps(norm='Linf', dataset='imagenet') == pytest.approx(4 / 255)
    assert (default_eps(norm='L2', dataset='cifar100'), default_eps(norm='L1', dataset='cifar10')) == (0.5, 12.0)
    with pytest.raises(ValueError, match='ImageNet has no usual L2 radius'):
        default_eps(norm='L2', dataset='imagenet')
    with pytest.raises(ValueError, match=r'eps=8 is larger .* did you mean eps=8/255\?'):
        parse_attack('clean', eps=8.0)
    with pytest.raises(ValueError, match=r'step_size=2 is larger .* did you mean step_size=2/255\?'):
        parse_attack('pgd20', eps=eps, step_size=2.0)
    assert parse_attack('pgd20', eps=3.0, norm='L2', step_size=1.5).step_size == 1.5


def test_autoattack_end_to_end_on_a_tiny_model():
    torch.manual_seed(0)
    model = linear_model(torch.randn(10, 3 * 8 * 8) * 0.05, torch.zeros(10))
    x = torch.rand(6, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        y = model(x).argmax(1)
    y[0] = (y[0] + 1) % 10  # one example misclassified from the start
    adv = autoattack_attack(model, x, y, eps=8 / 255, version='standard', batch_size=4)
    assert adv.shape == x.shape and adv.min() >= 0 and adv.max() <= 1
    assert ((adv - x).abs().flatten(1).amax(1) <= 8 / 255 + 1e-6).all()
    with torch.no_grad():
        robust = model(adv).argmax(1) == y
    assert not robust[0]
    assert robust.float().mean() <= (model(x).argmax(1) == y).float().mean()
    custom = autoattack_attack(model, x, y, eps=0.5, norm='L2', version='custom', attacks=['apgd-ce'], batch_size=6)
    assert ((custom - x).flatten(1).norm(dim=1) <= 0.5 + 1e-5).all()
    with pytest.raises(ValueError, match='custom'):
        autoattack_attack(model, x, y, eps=0.1, version='standard', attacks=['apgd-ce'])


def test_gaussian_start_has_the_given_std_and_stays_in_budget():
    """``init_std`` starts like the authors' training codes: x + std * N(0, 1), projected into the ball and [0, 1]."""
    from robust_resnets.attacks.pgd import pgd_attack

    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 8 * 8, 4))
    x = torch.rand(64, 3, 8, 8) * 0.5 + 0.25
    y = torch.randint(0, 4, (64,))
    g = torch.Generator().manual_seed(0)
    start = pgd_attack(model, x, y, eps=8 / 255, steps=0, step_size=0.0, init_std=1e-3, generator=g)
    assert abs((start - x).std().item() - 1e-3) < 1e-4
    wide = pgd_attack(model, x, y, eps=8 / 255, steps=0, step_size=0.0, init_std=1.0, generator=g)
    assert (wide - x).abs().max() <= 8 / 255 + 1e-6 and wide.min() >= 0 and wide.max() <= 1
    with pytest.raises(ValueError, match='init_std'):
        pgd_attack(model, x, y, eps=8 / 255, steps=1, step_size=0.01, init_std=0.0)


@pytest.mark.parametrize('norm', ['Linf', 'L2', 'L1'])
def test_custom_autoattack_runs_the_standard_settings_of_the_attacks_it_names(norm):
    from pyautoattack import AutoAttack

    from robust_resnets.attacks.autoattack import autoattack_settings, build_autoattack

    model = tiny_cnn()
    standard = autoattack_settings(build_autoattack(model, eps=0.1, norm=norm, version='standard'))
    custom = autoattack_settings(build_autoattack(model, eps=0.1, norm=norm, version='custom',
                                                  attacks=['square', 'apgd-ce', 'apgd-t']))
    assert custom['version'] == 'custom' and custom['attacks'] == ['square', 'apgd-ce', 'apgd-t']
    assert custom['per_attack'] == {a: standard['per_attack'][a] for a in ('square', 'apgd-ce', 'apgd-t')}
    # read from pyautoattack's own standard adversary, not from our code
    library = AutoAttack(model, eps=0.1, norm=norm, version='standard')
    assert custom['per_attack']['apgd-ce']['n_restarts'] == library.apgd.n_restarts
    assert custom['per_attack']['apgd-t']['n_target_classes'] == library.apgd_targeted.n_target_classes
    assert custom['per_attack']['square']['n_queries'] == library.square.n_queries
    if norm != 'L1':  # the walkthrough's bug: pyautoattack's own 'custom' gives APGD-CE five restarts
        assert custom['per_attack']['apgd-ce']['n_restarts'] == 1
        assert AutoAttack(model, eps=0.1, norm=norm, version='custom', attacks=['apgd-ce']).apgd.n_restarts == 5
    # APGD-DLR and FAB, not in standard, share the settings of APGD-CE and FAB-T
    more = autoattack_settings(build_autoattack(model, eps=0.1, norm=norm, version='custom',
                                                attacks=['apgd-dlr', 'fab']))['per_attack']
    assert more['apgd-dlr'] == standard['per_attack']['apgd-ce']
    assert more['fab'] == {k: v for k, v in standard['per_attack']['fab-t'].items() if k != 'n_target_classes'}


def test_autoattack_settings_are_what_each_attack_runs_with():
    """The settings read before a run equal those each attack object holds when AutoAttack calls it."""
    from robust_resnets.attacks.autoattack import autoattack_settings, build_autoattack, iter_autoattack

    model = tiny_cnn()
    x = torch.rand(3, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        y = model(x).argmax(1)  # all classified correctly
    for version in ('standard', 'plus', 'rand'):
        adversary = build_autoattack(model, eps=8 / 255, version=version)
        adversary.apgd.n_iter = 7  # a changed setting is read back, not a constant
        expected = autoattack_settings(adversary)
        assert expected['per_attack']['apgd-ce']['n_iter'] == 7
        seen = {}

        def spy(attack_name, obj, keys):
            def perturb(x_, y_):
                seen[attack_name()] = {k: getattr(obj, k) for k in keys}
                return x_  # no attack: every example stays robust, so every attack runs
            return perturb

        apgd_keys, fab_keys = ('n_iter', 'n_restarts', 'eot_iter', 'use_largereps'), ('n_iter', 'n_restarts')
        adversary.apgd.perturb = spy(lambda: f'apgd-{adversary.apgd.loss}', adversary.apgd, apgd_keys)
        adversary.apgd_targeted.perturb = spy(lambda: 'apgd-t', adversary.apgd_targeted,
                                              apgd_keys + ('n_target_classes',))
        adversary.fab.perturb = spy(lambda: 'fab-t' if adversary.fab.targeted else 'fab', adversary.fab,
                                    fab_keys + ('n_target_classes',))
        adversary.square.perturb = spy(lambda: 'square', adversary.square, ('n_queries', 'n_restarts'))
        for _ in iter_autoattack(adversary, x, y, torch.ones(3, dtype=torch.bool), batch_size=3):
            pass
        assert list(seen) == expected['attacks']
        for attack, settings_ in expected['per_attack'].items():
            assert {k: seen[attack][k] for k in settings_} == settings_, (version, attack)


@pytest.mark.parametrize('dtype', [torch.bfloat16, torch.float16])
@pytest.mark.parametrize('norm', ['Linf', 'L2'])
def test_half_precision_images_stay_in_the_ball(dtype, norm):
    """Rounding x + delta to bfloat16 used to step outside the ball (8.47/255 at 8/255): it now rounds towards x."""
    eps = 8 / 255 if norm == 'Linf' else 0.5
    model = tiny_cnn(3).to(dtype)
    x = torch.rand(32, 3, 8, 8, generator=torch.Generator().manual_seed(0)).to(dtype)
    y = torch.arange(32) % 10
    adv = pgd_attack(model, x, y, eps=eps, steps=5, step_size=eps / 4, norm=norm, example_seeds=torch.arange(32))
    assert adv.dtype == dtype and adv.min() >= 0 and adv.max() <= 1
    assert (_size(adv.float() - x.float(), norm) <= eps * (1 + 1e-6)).all()
    assert not torch.equal(adv, x)


def test_project_rounds_half_precision_towards_the_clean_image():
    from robust_resnets.attacks.pgd import project

    x = torch.tensor([0.5, 0.46, 0.9, 0.0], dtype=torch.bfloat16)
    for sign in (1, -1):
        out = project(x + sign, x, eps=8 / 255, norm='Linf')  # far outside: lands on the ball's edge, rounded
        assert out.dtype == torch.bfloat16 and ((out.float() - x.float()).abs() <= 8 / 255).all()
        assert (out >= 0).all() and (out <= 1).all()
    assert torch.equal(project(x.float() + 0.01, x.float(), eps=8 / 255, norm='Linf'), x.float() + 0.01)


def test_autoattack_checks_are_warned_once():
    """pyautoattack's per-call checks (here: outputs that are probabilities) come out once, not per batch."""
    import warnings

    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(3 * 8 * 8, 10), nn.Softmax(dim=1)).eval()
    x = torch.rand(6, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        y = model(x).argmax(1)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter('always')
        autoattack_attack(model, x, y, eps=8 / 255, version='custom', attacks=['apgd-ce'], batch_size=2)
    probability = [str(w.message) for w in caught if 'probability distribution' in str(w.message)]
    assert probability == ['AutoAttack (apgd-ce): it seems that the output is a probability distribution, please be '
                           'sure that the logits are used! See flags_doc.md for details.']
