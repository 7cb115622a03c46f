"""evaluate(): worst case, batch-size independence, refusals, masking warnings, resume; results, leaderboard, CLI."""
import importlib.util
import json
import tarfile
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image
from safetensors.torch import save_file

from robust_resnets.evaluation import GradientMaskingWarning, evaluate
from robust_resnets.evaluation.leaderboard import leaderboard_rows, render_html, render_markdown
from robust_resnets.evaluation.results import (
    MODEL_INFO_FIELDS, find_reported, format_eps, parse_eps, read_results, reported_entries, result_to_dict,
    robustbench_model_info, write_json,
)

SHARED_DATA = Path(__file__).resolve().parents[1].parent / 'shared' / 'data'
CIFAR_CLASSES = ['airplane', 'automobile', 'bird', 'cat', 'deer', 'dog', 'frog', 'horse', 'ship', 'truck']


def tiny_cnn(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(2), nn.Flatten(),
                         nn.Linear(16, 10)).eval()


def data(n: int = 12, seed: int = 0, model: nn.Module = None):
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, 256, (n, 3, 8, 8), dtype=torch.uint8, generator=g)
    if model is None:
        return x, torch.randint(0, 10, (n,), generator=g)
    with torch.no_grad():
        y = model(x.float() / 255).argmax(1)
    y[::3] = (y[::3] + 1) % 10  # some examples wrong from the start
    return x, y


@settings(max_examples=6, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(seed=st.integers(0, 1000), eps=st.sampled_from([2 / 255, 8 / 255, 32 / 255]))
def test_robust_accuracy_never_exceeds_clean_and_worst_case_is_the_and(seed, eps):
    model = tiny_cnn(seed % 5)
    x, y = data(9, seed, model)
    r = evaluate(model, x, y, attacks='clean,fgsm,pgd3,cw3', eps=eps, progress=False, check_masking=False)
    clean = r.attacks['clean'].correct
    for name in ('fgsm', 'pgd3', 'cw3'):
        assert (r.attacks[name].correct <= clean).all()
        assert r.accuracy[name] <= r.accuracy['clean']
    assert torch.equal(r.worst_case, clean & r.attacks['fgsm'].correct & r.attacks['pgd3'].correct
                       & r.attacks['cw3'].correct)
    assert r.robust_accuracy == pytest.approx(r.worst_case.float().mean().item())


def test_numbers_do_not_depend_on_the_batch_size_and_repeat():
    model = tiny_cnn(1)
    x, y = data(10, 3, model)
    kw = dict(attacks='clean,pgd4r2,cw3', eps=8 / 255, progress=False, check_masking=False, seed=7)
    a = evaluate(model, x, y, batch_size=3, **kw)
    b = evaluate(model, x, y, batch_size=10, **kw)
    c = evaluate(model, x, y, batch_size=3, **kw)
    for name in ('clean', 'pgd4r2', 'cw3'):
        assert torch.equal(a.attacks[name].correct, b.attacks[name].correct)
        assert torch.equal(a.attacks[name].correct, c.attacks[name].correct)
    assert a.batch_size == 3 and b.batch_size == 10


def test_float_and_uint8_images_agree():
    model = tiny_cnn(2)
    x, y = data(6, 1, model)
    a = evaluate(model, x, y, attacks='clean,pgd2', progress=False, check_masking=False)
    b = evaluate(model, x.float() / 255, y, attacks='clean,pgd2', progress=False, check_masking=False)
    assert a.accuracy == b.accuracy


def test_refuses_train_mode_randomised_models_and_bad_inputs():
    model = tiny_cnn()
    x, y = data(4)
    with pytest.raises(ValueError, match='train mode'):
        evaluate(model.train(), x, y, attacks='clean', progress=False)
    r = evaluate(model.train(), x, y, attacks='clean', progress=False, allow_train_mode=True)
    assert model.training and r.n_examples == 4
    model.eval()

    class Noisy(nn.Module):
        def forward(self, inp):
            return model(inp) + torch.randn(inp.shape[0], 10)

    noisy = Noisy().eval()

    with pytest.raises(ValueError, match='randomised'):
        evaluate(noisy, x, y, attacks='clean', progress=False)
    with pytest.warns(GradientMaskingWarning, match='randomised'):
        evaluate(noisy, x, y, attacks='clean', progress=False, allow_randomized=True)
    with pytest.raises(ValueError, match=r'\[0, 1\]'):
        evaluate(model, x.float(), y, attacks='clean', progress=False)  # 0..255 floats: not [0, 1]
    with pytest.raises(ValueError, match='labels'):
        evaluate(model, x, y[:3], attacks='clean', progress=False)
    with pytest.raises(ValueError, match='class indices below'):
        evaluate(model, x, y + 10, attacks='clean', progress=False)
    with pytest.raises(ValueError, match='Unknown attack'):
        evaluate(model, x, y, attacks='clean,pgd', progress=False)


def test_refuses_a_submodule_left_in_train_mode():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.AdaptiveAvgPool2d(2),
                          nn.Flatten(), nn.Linear(16, 10)).eval()
    model[1].train()
    x, y = data(4)
    with pytest.raises(ValueError, match=r'train mode \(1\)'):
        evaluate(model, x, y, attacks='clean', progress=False)
    running_mean = model[1].running_mean.clone()
    evaluate(model, x, y, attacks='clean', progress=False, allow_train_mode=True)
    assert not torch.equal(model[1].running_mean, running_mean)  # why it is refused: the statistics moved


def test_warns_on_gradient_masking():
    inner = tiny_cnn(3)

    class Quantised(nn.Module):  # rounding the input zeroes every input gradient
        def forward(self, inp):
            return inner(torch.round(inp * 4) / 4)

    model = Quantised().eval()
    x, y = data(8, 0, model)
    with pytest.warns(GradientMaskingWarning, match='whole image box'):
        r = evaluate(model, x, y, attacks='clean,pgd5', progress=False)
    assert r.unbounded_accuracy > 0 and r.warnings
    # a plain linear model: PGD with an unbounded eps fools every example, no warning
    torch.manual_seed(0)
    linear = nn.Sequential(nn.Flatten(), nn.Linear(3 * 8 * 8, 10)).eval()
    x, y = data(8, 0, linear)
    with warnings.catch_warnings():
        warnings.simplefilter('error', GradientMaskingWarning)
        r = evaluate(linear, x, y, attacks='clean,pgd20', progress=False)
    assert r.unbounded_accuracy == 0


def test_resumes_from_the_state_file(tmp_path):
    model = tiny_cnn(4)
    x, y = data(12, 2, model)
    kw = dict(attacks='clean,pgd3,cw3', eps=8 / 255, batch_size=2, progress=False, check_masking=False)
    full = evaluate(model, x, y, **kw)
    state = tmp_path / 'state.json'

    class Interrupting(nn.Module):
        def __init__(self, limit):
            super().__init__()
            self.inner, self.calls, self.limit = model, 0, limit

        def forward(self, inp):
            self.calls += 1
            if self.calls > self.limit:
                raise KeyboardInterrupt
            return self.inner(inp)

    with pytest.raises(KeyboardInterrupt):
        evaluate(Interrupting(16).eval(), x, y, state_path=state, **kw)
    saved = json.loads(state.read_text())
    assert saved['attacks']['clean']['complete'] and not saved['attacks'].get('cw3', {}).get('complete')
    assert saved['attacks']['pgd3']['done'] > 0  # the batches finished before Ctrl-C are kept
    resumed = evaluate(model, x, y, state_path=state, **kw)
    for name in ('clean', 'pgd3', 'cw3'):
        assert torch.equal(full.attacks[name].correct, resumed.attacks[name].correct)
    with pytest.raises(ValueError, match='different evaluation'):
        evaluate(model, x, y, state_path=state, **dict(kw, attacks='clean,pgd4'))


def test_state_file_of_other_weights_is_not_reused(tmp_path):
    x, y = data(12, 2, tiny_cnn(4))
    kw = dict(attacks='clean,pgd2', eps=8 / 255, progress=False, check_masking=False)
    state = tmp_path / 'state.json'
    evaluate(tiny_cnn(4), x, y, state_path=state, **kw)
    with pytest.raises(ValueError, match='different evaluation'):  # same architecture, other parameters
        evaluate(tiny_cnn(5), x, y, state_path=state, **kw)
    torch.manual_seed(0)
    with_bn = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.AdaptiveAvgPool2d(2), nn.Flatten(),
                            nn.Linear(16, 10)).eval()
    evaluate(with_bn, x, y, state_path=tmp_path / 'bn.json', **kw)
    with torch.no_grad():
        with_bn[1].running_var.mul_(4)  # same parameters, other buffers
    with pytest.raises(ValueError, match='different evaluation'):
        evaluate(with_bn, x, y, state_path=tmp_path / 'bn.json', **kw)
    old = dict(json.loads(state.read_text()), version=1)  # written before the weights were fingerprinted
    state.write_text(json.dumps(old))
    with pytest.raises(ValueError, match='another version of robust-resnets .* delete it'):
        evaluate(tiny_cnn(4), x, y, state_path=state, **kw)


def _linear_setup(n=8):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(3 * 8 * 8, 10)).eval()
    x, y = data(n, 5, model)
    return model, x, y


def test_autoattack_through_evaluate_results_json_and_leaderboard(tmp_path):
    model, x, y = _linear_setup()
    r = evaluate(model, x, y, attacks='clean,pgd5,aa', eps=8 / 255, batch_size=4, progress=False, check_masking=False)
    aa = r.attacks['aa']
    assert aa.spec.attacks == ('apgd-ce', 'apgd-t', 'fab-t', 'square')
    assert list(aa.components)[0] == 'apgd-ce'
    assert r.accuracy['aa'] <= r.accuracy['clean'] and (aa.correct <= r.attacks['clean'].correct).all()
    data_ = result_to_dict(r, model='wrn_a4.cifar10_robustbench', dataset='cifar10')
    assert data_['model']['robustbench_id'] == 'Huang2022Revisiting_WRN-A4'
    assert data_['robustbench'] is None and data_['data']['full_test_set'] is False  # 8 images: no RobustBench entry
    info = robustbench_model_info(r, dataset='cifar10', architecture='wrn_a4',
                                  robustbench_id='Huang2022Revisiting_WRN-A4')
    assert set(info) <= set(MODEL_INFO_FIELDS)
    assert info['eps'] == '8/255' and info['clean_acc'] == f"{100 * r.clean_accuracy:.2f}"
    assert info['autoattack_acc'] == f"{100 * r.accuracy['aa']:.2f}" and info['reported'] == '65.79'
    settings_ = data_['attacks']['pgd5']['settings']
    assert settings_.pop('step_size') == pytest.approx(2 * (8 / 255) / 5)  # pgd5: 2 eps / steps
    assert settings_ == {'kind': 'pgd', 'eps': 8 / 255, 'norm': 'Linf', 'steps': 5, 'restarts': 1, 'random_start': True}
    path = write_json(data_, tmp_path / 'out' / 'r.json')
    assert read_results(path)['clean_accuracy'] == r.clean_accuracy
    assert not [p for p in path.parent.iterdir() if p.name != 'r.json']  # no temporary files left
    rows = leaderboard_rows([path])
    assert rows[0]['RobustBench AA'] == '65.79' and rows[0]['model'] == 'wrn_a4.cifar10_robustbench'
    assert 'wrn_a4.cifar10_robustbench' in render_markdown(rows) and '<table>' in render_html(rows)
    (tmp_path / 'bad.json').write_text('{"schema": "other"}')
    with pytest.raises(ValueError, match='not a robust-resnets results file'):
        read_results(tmp_path / 'bad.json')


def _made_up_result(*, eps: float, norm: str = 'Linf', robust=(1, 1, 0, 0)):
    """An EvaluationResult with chosen per-example flags: clean all correct, 'pgd2' as given."""
    from robust_resnets.attacks.spec import parse_attack
    from robust_resnets.evaluation.evaluate import AttackResult, EvaluationResult

    n = len(robust)
    attacks = {name: AttackResult(parse_attack(name, eps=eps, norm=norm), torch.tensor(flags, dtype=torch.bool))
               for name, flags in (('clean', [True] * n), ('pgd2', list(map(bool, robust))))}
    return EvaluationResult(attacks=attacks, n_examples=n, eps=eps, norm=norm, seed=0, batch_size=n, device='cpu')


def test_reported_numbers_only_for_pretrained_tags_at_the_same_threat_model():
    def matched(result, **kw):
        out = result_to_dict(result, dataset='cifar10', **kw)
        assert (out['robustbench_reported'] is None) == (out['model']['robustbench_id'] is None)
        info = robustbench_model_info(result, dataset='cifar10', architecture='wrn_a4',
                                      robustbench_id=out['model']['robustbench_id'])
        assert ('reported' in info) == (out['robustbench_reported'] is not None)
        return out['model']['robustbench_id']

    at_8, at_2, l2 = _made_up_result(eps=8 / 255), _made_up_result(eps=2 / 255), _made_up_result(eps=0.5, norm='L2')
    assert matched(at_8, model='wrn_a4.cifar10_robustbench') == 'Huang2022Revisiting_WRN-A4'
    assert matched(at_2, model='wrn_a4.cifar10_robustbench') is None  # RobustBench reports 8/255
    assert matched(l2, model='wrn_a4.cifar10_robustbench') is None
    assert matched(at_8, model='wrn_a4', checkpoint='mine.pt') is None  # a user's own weights
    assert matched(at_8, model='wrn_a4', random_init=True) is None
    assert matched(at_8, model='wrn_a4') is None  # no tag: not a published model
    assert matched(at_8, model='wrn_a4', checkpoint='mine.pt', robustbench_id='Huang2022Revisiting_WRN-A4') \
        == 'Huang2022Revisiting_WRN-A4'  # named by the user
    assert result_to_dict(at_2, model='wrn_a4', dataset='cifar10', checkpoint='mine.pt',
                          robustbench_id='Huang2022Revisiting_WRN-A4')['robustbench_reported'] is None
    assert matched(at_8, model='wrn_a4.cifar10_trades') is None  # Huang et al.'s TRADES model is not RobustBench's
    reported = dict(weights='wrn_a4.cifar10_robustbench', dataset='cifar10', threat_model='Linf')
    assert find_reported(**reported, eps=8 / 255)['robustbench_id'] == 'Huang2022Revisiting_WRN-A4'
    assert find_reported(**reported, eps=2 / 255) is None
    assert result_to_dict(at_8, model='wrn_a4', dataset='cifar10', random_init=True)['random_init'] is True


def test_leaderboard_ranks_within_an_eps_and_names_the_weights(tmp_path):
    files = {
        'a4_8.json': result_to_dict(_made_up_result(eps=8 / 255, robust=(1, 1, 1, 0)),
                                    model='wrn_a4.cifar10_robustbench', dataset='cifar10'),
        'a4_2.json': result_to_dict(_made_up_result(eps=2 / 255, robust=(1, 1, 0, 0)),
                                    model='wrn_a4', dataset='cifar10', checkpoint='/runs/a4/best.safetensors'),
        'a4_2_rand.json': result_to_dict(_made_up_result(eps=2 / 255, robust=(0, 0, 0, 0)),
                                         model='wrn_a4', dataset='cifar10', random_init=True),
        'a4_16.json': result_to_dict(_made_up_result(eps=16 / 255, robust=(1, 1, 1, 1)),
                                     model='wrn_a4', dataset='cifar10', checkpoint='other.pt'),
    }
    paths = [write_json(d, tmp_path / name) for name, d in files.items()]
    rows = leaderboard_rows(paths)
    assert [(r['threat model'], r['model']) for r in rows] == [
        ('Linf 2/255', 'wrn_a4 (checkpoint best.safetensors)'), ('Linf 2/255', 'wrn_a4 (random init)'),
        ('Linf 8/255', 'wrn_a4.cifar10_robustbench'), ('Linf 16/255', 'wrn_a4 (checkpoint other.pt)')]
    assert rows[2]['RobustBench AA'] == '65.79' and rows[2]['delta AA'] == '-'  # no AutoAttack run
    # an older file holding RobustBench's numbers for another eps: not compared
    stale = dict(files['a4_2.json'], robustbench_reported=files['a4_8.json']['robustbench_reported'])
    assert leaderboard_rows([write_json(stale, tmp_path / 'stale.json')])[0]['RobustBench AA'] == '-'


def test_eps_spelling():
    assert parse_eps('8/255') == pytest.approx(8 / 255) and parse_eps('0.5') == 0.5
    assert format_eps(8 / 255) == '8/255' and format_eps(0.5) == '0.5'
    assert [format_eps(e) for e in (1.0, 3.0, 12.0, 4 / 255, 0.0)] == ['1', '3', '12', '4/255', '0']
    assert parse_eps('0.8/255') == pytest.approx(0.8 / 255) and parse_eps(' 8 / 255 ') == 8 / 255
    for bad in ('eight', '8/0', '1/2/3', 'nan', 'inf', '8/255x', ''):
        with pytest.raises(ValueError, match='eps'):
            parse_eps(bad)


def _write_images(root: Path, per_class: int, size: int = 32) -> None:
    rng = np.random.default_rng(0)
    for c in CIFAR_CLASSES:
        (root / 'test' / c).mkdir(parents=True)
        for i in range(per_class):
            Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(root / 'test' / c / f'{i:04d}.png')


@pytest.fixture
def tiny_registered_model():
    """A very small timm-registered model, so that the CLI can build it by name."""
    import timm
    from timm.models import register_model

    name = '_rr_test_tiny_cnn'
    if not timm.is_model(name):
        def _rr_test_tiny_cnn(pretrained=False, num_classes=10, **kwargs):
            model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(2), nn.Flatten(),
                                  nn.Linear(16, num_classes))
            model.num_classes = num_classes
            model.pretrained_cfg = {}
            return model
        register_model(_rr_test_tiny_cnn)
    return name


def _run_cli(argv):
    from robust_resnets.cli import main

    return main(argv)


def test_cli_eval_and_leaderboard(tmp_path, monkeypatch, capsys, tiny_registered_model):
    monkeypatch.setenv('ROBUST_RESNETS_CACHE', str(tmp_path / 'cache'))
    _write_images(tmp_path / 'cifar', per_class=1)
    out = tmp_path / 'results' / 'tiny.json'
    rc = _run_cli(['eval', tiny_registered_model, '--random-init', '--data-dir', str(tmp_path / 'cifar'),
                   '--n-examples', '6', '--attacks', 'clean,fgsm,pgd2', '--out', str(out), '--quiet',
                   '--no-masking-check'])
    assert rc == 0
    printed = capsys.readouterr().out
    assert 'pgd2' in printed and 'worst case' in printed
    saved = read_results(out)
    assert saved['data']['n_examples'] == 6 and saved['random_init'] is True
    assert not out.with_name(out.name + '.state.json').exists()
    assert _run_cli(['leaderboard', str(out), '--out', str(tmp_path / 'lb.md')]) == 0
    assert tiny_registered_model in (tmp_path / 'lb.md').read_text()
    # clear one-line errors for bad input
    assert _run_cli(['eval', tiny_registered_model, '--data-dir', str(tmp_path / 'cifar')]) == 1
    assert 'no pretrained weights' in capsys.readouterr().err
    assert _run_cli(['eval', tiny_registered_model, '--random-init', '--data-dir', str(tmp_path / 'nowhere')]) == 1
    assert 'No cifar10 data in' in capsys.readouterr().err


def test_eval_takes_the_tags_dataset(tmp_path, capsys):
    """A tag is scored on the dataset it was trained on: --dataset defaults to it, and another is refused."""
    from robust_resnets.evaluation.sources import load_model

    with pytest.raises(ValueError, match='trained on cifar100, so cifar10 labels would not score it. Pass --dataset '
                                         'cifar100'):
        load_model('wrn_28_10.cifar100_trades', dataset='cifar10', random_init=True)
    # SVHN and CIFAR-10 both have 10 classes: only the tag tells them apart
    assert _run_cli(['eval', 'robnet_free.svhn_pgd_at', '--random-init', '--data-dir', str(tmp_path)]) == 1
    assert 'trained on svhn' in capsys.readouterr().err
    assert _run_cli(['eval', 'robnet_free.svhn_pgd_at', '--dataset', 'cifar10', '--random-init',
                     '--data-dir', str(tmp_path)]) == 1
    assert 'no svhn loader' in capsys.readouterr().err


def test_cli_eval_checks_out_before_the_evaluation(tmp_path, monkeypatch, capsys, tiny_registered_model):
    monkeypatch.setenv('ROBUST_RESNETS_CACHE', str(tmp_path / 'cache'))
    _write_images(tmp_path / 'cifar', per_class=1)
    out = tmp_path / 'tiny.json'
    base = ['eval', tiny_registered_model, '--random-init', '--n-examples', '4', '--attacks', 'clean', '--quiet',
            '--no-masking-check']
    # refused before any data is read (the data folder does not exist)
    assert _run_cli([*base, '--data-dir', str(tmp_path / 'nowhere'), '--out', str(tmp_path)]) == 1
    assert 'is a directory' in capsys.readouterr().err
    out.write_text('earlier results')
    assert _run_cli([*base, '--data-dir', str(tmp_path / 'nowhere'), '--out', str(out)]) == 1
    assert 'already exists; pass --overwrite or choose another --out' in capsys.readouterr().err
    assert out.read_text() == 'earlier results'
    assert _run_cli([*base, '--data-dir', str(tmp_path / 'cifar'), '--out', str(out), '--overwrite']) == 0
    assert read_results(out)['data']['n_examples'] == 4
    assert not Path(f'{out}.state.json').exists()
    # a run interrupted after its progress was saved leaves only OUT.state.json: the same command resumes
    import robust_resnets.evaluation as evaluation

    resumed, evaluate_ = tmp_path / 'resumed.json', evaluation.evaluate

    def evaluate_then_interrupt(*args, **kwargs):
        evaluate_(*args, **kwargs)
        raise KeyboardInterrupt

    with monkeypatch.context() as m:
        m.setattr(evaluation, 'evaluate', evaluate_then_interrupt)
        assert _run_cli([*base, '--data-dir', str(tmp_path / 'cifar'), '--out', str(resumed)]) == 130
    assert 'robust-resnets eval: interrupted' in capsys.readouterr().err
    assert Path(f'{resumed}.state.json').exists() and not resumed.exists()
    assert _run_cli([*base, '--data-dir', str(tmp_path / 'cifar'), '--out', str(resumed)]) == 0
    assert f'resuming from {resumed}.state.json' in capsys.readouterr().err
    assert read_results(resumed)['clean_accuracy'] == read_results(out)['clean_accuracy']
    assert not Path(f'{resumed}.state.json').exists()


def test_cli_eval_names_the_mistake(tmp_path, monkeypatch, capsys):
    """Common mistakes get one line naming the problem and the fix, not a traceback."""
    import timm

    monkeypatch.setenv('ROBUST_RESNETS_CACHE', str(tmp_path / 'cache'))
    _write_images(tmp_path / 'cifar', per_class=1)
    data = ['--data-dir', str(tmp_path / 'cifar'), '--n-examples', '2', '--attacks', 'clean', '--quiet']

    def error(argv):
        assert _run_cli(argv) == 1
        return capsys.readouterr().err

    assert "Did you mean 'robust_resnet_a1.cifar10_trades'?" in error(['eval', 'robust_resnet_a1.cifar10_trade', *data])
    assert 'did you mean --eps 8/255?' in error(['eval', 'wrn_22_5', '--random-init', '--eps', '8', *data])
    torch.save({'epoch': 3, 'note': 'no weights'}, tmp_path / 'meta.pt')
    assert 'holds no tensors' in error(['eval', 'wrn_22_5', '--checkpoint', str(tmp_path / 'meta.pt'), *data])
    tiny = {'depths': [1, 1, 1], 'widths': [1, 1, 1]}
    torch.save(timm.create_model('wrn_22_5', **tiny).state_dict(), tmp_path / 'tiny.pt')
    err = error(['eval', 'wrn_22_5', '--checkpoint', str(tmp_path / 'tiny.pt'), *data])
    assert 'does not fit wrn_22_5 as built here: missing keys: ' in err and 'shape mismatches (checkpoint vs model)' in err
    assert len(err.splitlines()) == 1
    run = tmp_path / 'run100'
    run.mkdir()
    torch.save(timm.create_model('wrn_22_5', num_classes=100, **tiny).state_dict(), run / 'last.pt')
    (run / 'config.json').write_text(json.dumps({'architecture': 'wrn_22_5', 'model_args': tiny}))
    err = error(['eval', 'wrn_22_5', '--checkpoint', str(run / 'last.pt'), *data])
    assert 'has a 100-class head' in err and 'pass --dataset cifar100' in err
    safetensors_file = tmp_path / 'tiny.safetensors'
    save_file(timm.create_model('wrn_22_5', **tiny).state_dict(), str(safetensors_file))
    err = error(['eval', 'wrn_22_5', '--checkpoint', str(safetensors_file), '--key', 'state_dict_ema', *data])
    assert "no 'state_dict_ema' in it" in err and 'drop --key' in err
    assert "Unknown attack 'pgdx'" in error(['eval', 'wrn_22_5', '--random-init', '--attacks', 'clean,pgdx',
                                             '--data-dir', str(tmp_path / 'no-data-here')])  # before any loading
    err = error(['eval', 'vit_small_convstem', '--random-init', '--dataset', 'cifar10', *data])
    assert 'vit_small_convstem does not take cifar10 images ((3, 32, 32))' in err and '(3, 224, 224)' in err


def test_eval_builds_a_stopped_runs_model_from_its_train_config(tmp_path):
    """Before a run exports config.json, its last.pt loads with the model arguments of train_config.yaml."""
    import timm
    import yaml

    from robust_resnets.evaluation.sources import load_model
    tiny = {'depths': [1, 1, 1], 'widths': [1, 1, 1]}
    model = timm.create_model('preact_resnet', **tiny)
    torch.save({'state_dict': model.state_dict(), 'step': 2}, tmp_path / 'last.pt')
    (tmp_path / 'train_config.yaml').write_text(yaml.safe_dump({'model': {'name': 'preact_resnet', 'kwargs': tiny}}))
    loaded = load_model('preact_resnet', dataset='cifar10', checkpoint=tmp_path / 'last.pt')
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(loaded(x), model.eval()(x))


def test_cli_eval_seed_makes_random_init_repeatable(tmp_path, monkeypatch, tiny_registered_model):
    from robust_resnets.evaluation import sources

    monkeypatch.setenv('ROBUST_RESNETS_CACHE', str(tmp_path / 'cache'))
    _write_images(tmp_path / 'cifar', per_class=1)
    built = []
    load_model = sources.load_model

    def recording_load_model(*args, **kwargs):
        model = load_model(*args, **kwargs)
        built.append({k: v.clone() for k, v in model.state_dict().items()})
        return model

    monkeypatch.setattr(sources, 'load_model', recording_load_model)
    for seed in (3, 3, 4):
        assert _run_cli(['eval', tiny_registered_model, '--random-init', '--data-dir', str(tmp_path / 'cifar'),
                         '--n-examples', '2', '--attacks', 'clean', '--quiet', '--seed', str(seed)]) == 0
    same = [torch.equal(built[0][k], built[1][k]) for k in built[0]]
    other = [torch.equal(built[0][k], built[2][k]) for k in built[0]]
    assert all(same) and not any(other)


@pytest.mark.skipif(not (SHARED_DATA / 'cifar10-jpeg.tar.gz').is_file(),
                    reason='../shared/data/cifar10-jpeg.tar.gz is not present (real CIFAR-10 JPEGs)')
def test_short_evaluation_on_real_cifar10_jpegs(tmp_path, monkeypatch):
    import timm

    import robust_resnets  # noqa: F401
    from robust_resnets.data import load_cifar_tensors

    monkeypatch.setenv('ROBUST_RESNETS_CACHE', str(tmp_path / 'cache'))
    with tarfile.open(SHARED_DATA / 'cifar10-jpeg.tar.gz') as tar:  # the first two test images of every class
        members = [m for m in tar if m.isfile() and m.name.startswith('test/') and m.name.endswith(('0000.jpg', '0001.jpg'))]
        tar.extractall(tmp_path / 'cifar10', members=members, filter='data')
    images, labels = load_cifar_tensors(root=tmp_path / 'cifar10')
    assert images.shape == (20, 3, 32, 32) and sorted(labels.tolist()) == sorted(list(range(10)) * 2)
    model = timm.create_model('preact_resnet', depths=(1, 1, 1), widths=(1, 1, 1)).eval()
    r = evaluate(model, images[:8], labels[:8], attacks='clean,pgd2,cw2', batch_size=8, progress=False,
                 check_masking=False)
    assert r.n_examples == 8 and r.robust_accuracy <= r.clean_accuracy


@pytest.mark.skipif(importlib.util.find_spec('robustbench') is None,
                    reason='robustbench is not installed (optional extra: pip install robust-resnets[robustbench])')
def test_robustbench_benchmark_runs_through_the_adapter(tmp_path, monkeypatch):
    from robust_resnets.evaluation.robustbench_adapter import benchmark

    monkeypatch.setenv('ROBUST_RESNETS_CACHE', str(tmp_path / 'cache'))
    _write_images(tmp_path / 'cifar', per_class=1)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(3 * 32 * 32, 10)).eval()
    clean, robust = benchmark(model, n_examples=10, dataset='cifar10', threat_model='Linf', data_dir=tmp_path / 'cifar',
                              device='cpu', batch_size=10)
    assert 0 <= robust <= clean <= 1
    import sys

    assert sys.modules['autoattack'].AutoAttack.__module__ == 'robust_resnets.evaluation.robustbench_adapter'
    from robustbench.model_zoo.enums import BenchmarkDataset, ThreatModel

    # RobustBench's own enums get the same default radius
    again = benchmark(model, n_examples=10, dataset=BenchmarkDataset.cifar_10, threat_model=ThreatModel.Linf,
                      data_dir=tmp_path / 'cifar', device='cpu', batch_size=10)
    assert again == (clean, robust)


def test_robustbench_entries_name_published_weights_of_their_dataset_and_threat_model():
    from robust_resnets.evaluation.results import _reported
    from robust_resnets.weights import get_manifest

    manifest = get_manifest()
    entries = {(e['robustbench_id'], e['dataset']): e for e in reported_entries()}
    for name, ids in _reported()['weights'].items():
        weights = manifest[name]
        matching = [entries.get((i, weights.dataset)) for i in ids]
        assert all(e is not None and e['threat_model'] == weights.threat_model
                   and e['model_info']['eps'] == weights.eps for e in matching), name


# --- AutoAttack's own checks, the AutoAttack batch size on resume, seeds ------------------------------------------
class _Quantised(nn.Module):
    """Rounds its input to quarters: zero input gradient everywhere."""

    def forward(self, inp):
        return torch.floor(inp * 4) / 4


def test_autoattack_checks_reach_the_result_and_the_json(tmp_path):
    """pyautoattack's warnings (probability outputs, zero gradients) are passed on once each, not swallowed.

    (APGD checks for zero gradients with the DLR loss only.)
    """
    import logging

    torch.manual_seed(0)
    model = nn.Sequential(_Quantised(), nn.Flatten(), nn.Linear(3 * 8 * 8, 10), nn.Softmax(dim=1)).eval()
    x, y = data(12, 0, model)
    logger = logging.getLogger('auto-attack')
    before = (logger.level, logger.propagate, list(logger.handlers))
    with pytest.warns(GradientMaskingWarning) as record:
        r = evaluate(model, x, y, attacks='clean,aa:apgd-dlr', batch_size=4, progress=False)
    assert (logger.level, logger.propagate, list(logger.handlers)) == before
    probability = [w for w in r.warnings if 'probability distribution' in w]
    zero_gradient = [w for w in r.warnings if 'zero gradient' in w]
    assert len(probability) == 1 and len(zero_gradient) == 1  # three batches, one message each
    assert probability[0].startswith('AutoAttack (apgd-dlr): ')  # checks the DLR loss only
    assert {str(w.message) for w in record} >= set(probability + zero_gradient)
    # AutoAttack alone still gets the check with an eps covering the whole box
    assert r.unbounded_accuracy is not None and any('whole image box' in w for w in r.warnings)
    saved = read_results(write_json(result_to_dict(r, model='m', dataset='cifar10'), tmp_path / 'r.json'))
    assert saved['checks']['warnings'] == r.warnings


def test_autoattack_warnings_survive_a_resume(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(3 * 8 * 8, 10), nn.Softmax(dim=1)).eval()
    x, y = data(8, 1, model)
    kw = dict(attacks='clean,aa:apgd-ce', batch_size=4, progress=False, check_masking=False,
              state_path=tmp_path / 'state.json')
    with pytest.warns(GradientMaskingWarning, match='probability distribution'):
        first = evaluate(model, x, y, **kw)
    with pytest.warns(GradientMaskingWarning, match='probability distribution'):
        resumed = evaluate(model, x, y, **kw)  # complete in the state file: nothing runs again
    assert resumed.warnings == first.warnings and len(first.warnings) == 1


def test_autoattack_keeps_its_batch_size_on_resume(tmp_path):
    """AutoAttack's random draws follow its batches: a resumed run keeps the batch size it started with, whatever
    the new one (an automatic size can differ from start to start), and the state is not refused for it."""
    model, x, y = _linear_setup()
    kw = dict(eps=8 / 255, progress=False, check_masking=False)
    state = tmp_path / 'aa.json'
    first = evaluate(model, x, y, attacks='clean,aa:apgd-ce', batch_size=4, state_path=state, **kw)
    data = json.loads(state.read_text())
    assert data['attacks']['aa:apgd-ce']['batch_size'] == 4
    data['attacks']['aa:apgd-ce'] = {'batch_size': 4}  # interrupted before its first batch ended
    state.write_text(json.dumps(data))
    sizes = []
    evaluate_mod = importlib.import_module('robust_resnets.evaluation.evaluate')  # the package's evaluate is the function
    real = evaluate_mod.iter_autoattack

    def spy(*args, batch_size, **kwargs):
        sizes.append(batch_size)
        return real(*args, batch_size=batch_size, **kwargs)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(evaluate_mod, 'iter_autoattack', spy)
        resumed = evaluate(model, x, y, attacks='clean,aa:apgd-ce', batch_size=8, state_path=state, **kw)
    assert sizes == [4] and resumed.accuracy == first.accuracy
    old = dict(json.loads(state.read_text()), version=3)  # written before AutoAttack kept its batch size
    state.write_text(json.dumps(old))
    with pytest.raises(ValueError, match=r'another version of robust-resnets \(state version 3, expected 4\)'):
        evaluate(model, x, y, attacks='clean,aa:apgd-ce', batch_size=4, state_path=state, **kw)


def test_autoattack_interrupted_within_an_attack_resumes_with_its_next_batch(tmp_path):
    """Ctrl-C between AutoAttack's batches, then a resume: the batches (and so the random draws) are those of
    the straight run, each example attacked once per attack, and the result is the straight run's."""
    model, x, y = _linear_setup(12)
    kw = dict(attacks='clean,aa:apgd-ce+apgd-t', eps=2 / 255, batch_size=2, progress=False, check_masking=False)
    evaluate_mod = importlib.import_module('robust_resnets.evaluation.evaluate')
    real = evaluate_mod.iter_autoattack

    def recording(batches, stop_after=None):
        def run(*args, **kwargs):
            for item in real(*args, **kwargs):
                if stop_after is not None and len(batches) == stop_after:
                    raise KeyboardInterrupt
                batches.append((item[0], item[1].tolist()))
                yield item
        return run

    straight_batches = []
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(evaluate_mod, 'iter_autoattack', recording(straight_batches))
        straight = evaluate(model, x, y, **kw)
    assert {a for a, _ in straight_batches} == {'apgd-ce', 'apgd-t'}
    for stop in (1, 2, len(straight_batches) - 2):
        state, batches = tmp_path / f'state{stop}.json', []
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(evaluate_mod, 'iter_autoattack', recording(batches, stop_after=stop))
            with pytest.raises(KeyboardInterrupt):
                evaluate(model, x, y, state_path=state, **kw)
            mp.setattr(evaluate_mod, 'iter_autoattack', recording(batches))
            resumed = evaluate(model, x, y, state_path=state, **kw)
        assert batches == straight_batches, stop
        assert torch.equal(resumed.attacks['aa:apgd-ce+apgd-t'].correct, straight.attacks['aa:apgd-ce+apgd-t'].correct)
        assert resumed.attacks['aa:apgd-ce+apgd-t'].components == straight.attacks['aa:apgd-ce+apgd-t'].components


def test_example_seeds_stay_in_int64_for_any_seed():
    import zlib

    from robust_resnets.evaluation.evaluate import _example_seeds

    for seed in (2 ** 20, 2 ** 31, 2 ** 62, 2 ** 63 - 1):
        seeds = _example_seeds(seed, 'pgd20', 10000)
        assert seeds.dtype == torch.int64 and (seeds >= 0).all() and seeds.unique().numel() == 10000
    # small seeds keep the draws of earlier versions
    assert _example_seeds(7, 'cw40', 3).tolist() == [(7 * 1_000_003 + zlib.crc32(b'cw40')) * 10_000_019 + i
                                                    for i in range(3)]
    model = tiny_cnn(1)
    x, y = data(4, 3, model)
    kw = dict(attacks='clean,pgd2', progress=False, check_masking=False)
    assert evaluate(model, x, y, seed=2 ** 31, **kw).n_examples == 4
    assert evaluate(model, x, y, seed=np.int64(3), **kw).seed == 3  # numpy and torch integers are integers
    for bad in (-1, 2 ** 63, 1.5, True):
        with pytest.raises(ValueError, match=r'seed must be an integer from 0 to 2\*\*63 - 1'):
            evaluate(model, x, y, seed=bad, **kw)


# --- subsets are not RobustBench entries -------------------------------------------------------------------------
def _tiled(n: int, *, aa: bool = False, eps: float = 8 / 255):
    """A made-up result on n examples: clean all correct, pgd2 (and aa) correct on half."""
    from robust_resnets.attacks.spec import parse_attack
    from robust_resnets.evaluation.evaluate import AttackResult, EvaluationResult

    half = torch.arange(n) % 2 == 0
    names = ('clean', 'pgd2') + (('aa',) if aa else ())
    attacks = {name: AttackResult(parse_attack(name, eps=eps), torch.ones(n, dtype=torch.bool) if name == 'clean'
                                  else half.clone()) for name in names}
    return EvaluationResult(attacks=attacks, n_examples=n, eps=eps, norm='Linf', seed=0, batch_size=n, device='cpu')


def test_robustbench_entry_only_for_the_full_test_set():
    from robust_resnets.evaluation.results import FULL_TEST_SET, full_test_set

    full = result_to_dict(_tiled(10000, aa=True), model='wrn_a4.cifar10_robustbench', dataset='cifar10')
    assert full['data']['full_test_set'] is True
    assert set(full['robustbench']) <= set(MODEL_INFO_FIELDS)
    assert full['robustbench']['clean_acc'] == '100.00' and full['robustbench']['autoattack_acc'] == '50.00'
    subset = result_to_dict(_tiled(1000, aa=True), model='wrn_a4.cifar10_robustbench', dataset='cifar10')
    assert subset['data']['full_test_set'] is False and subset['robustbench'] is None
    assert subset['robustbench_reported']['autoattack_acc'] == '65.79'  # RobustBench's own numbers stay, to compare
    assert FULL_TEST_SET == {'cifar10': 10000, 'cifar100': 10000, 'imagenet': 5000}
    assert full_test_set(dataset='imagenet', n_examples=5000, preprocessing={'subset': 'robustbench'}) is True
    assert full_test_set(dataset='imagenet', n_examples=5000, preprocessing={'subset': 'all'}) is False
    assert full_test_set(dataset='cifar100', n_examples=10000, split='train') is False
    other = result_to_dict(_tiled(10000), model='m', dataset='svhn')
    assert other['data']['full_test_set'] is None and other['robustbench'] is None


def test_leaderboard_marks_rows_on_a_subset(tmp_path):
    from robust_resnets.evaluation.leaderboard import NOTE

    paths = [write_json(result_to_dict(_tiled(n, aa=True), model='wrn_a4.cifar10_robustbench', dataset='cifar10'),
                        tmp_path / f'{n}.json') for n in (10000, 1000)]
    rows = {r['n']: r for r in leaderboard_rows(paths)}
    assert set(rows) == {'10000', '1000 (subset)'}
    assert rows['10000']['delta AA'] == f'{50 - 65.79:+.2f}'
    assert rows['1000 (subset)']['delta AA'] == f'{50 - 65.79:+.2f} (subset)'
    assert '(subset): on fewer or other images than the test set RobustBench reports on' in NOTE


# --- stock timm models ---------------------------------------------------------------------------------------------
def test_a_stock_timm_model_is_standardised_in_front(tmp_path, monkeypatch):
    """timm's models do not standardise inside: their cfg's mean/std go in front, and the results say so."""
    import timm

    from robust_resnets.evaluation.sources import PixelInputModel, load_model, model_notes

    model = load_model('resnet18.a1_in1k', dataset='cifar10', random_init=True)
    assert isinstance(model, PixelInputModel) and not model.training
    assert model.num_classes == 10 and model.get_classifier().out_features == 10
    cfg = timm.models.get_pretrained_cfg('resnet18.a1_in1k')
    assert model.pretrained_cfg['mean'] == (0.0, 0.0, 0.0) and model.pretrained_cfg['std'] == (1.0, 1.0, 1.0)
    assert model.pretrained_cfg['input_size'] == cfg.input_size and model.pretrained_cfg['crop_pct'] == cfg.crop_pct
    x = torch.rand(2, 3, 32, 32)
    mean, std = torch.tensor(cfg.mean).view(1, 3, 1, 1), torch.tensor(cfg.std).view(1, 3, 1, 1)
    with torch.no_grad():
        assert torch.allclose(model(x), model.model((x - mean) / std), atol=1e-6)
        assert torch.allclose(model.forward_features(x), model.model.forward_features((x - mean) / std), atol=1e-6)
        final, _ = model.forward_intermediates(x)
        assert torch.allclose(final, model.model.forward_features((x - mean) / std), atol=1e-6)
    note, = model_notes(model, name='resnet18.a1_in1k')
    assert 'mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225)' in note
    # the published weights' path (create_model(pretrained=True)) is wrapped too; no download here
    create_model = timm.create_model
    monkeypatch.setattr(timm, 'create_model', lambda name, pretrained=False, **kw: create_model(name, **kw))
    assert isinstance(load_model('resnet18.a1_in1k', dataset='imagenet'), PixelInputModel)
    monkeypatch.undo()
    # this package's models standardise inside (or not at all): left as they are; so is a checkpoint
    assert not isinstance(load_model('preact_resnet', dataset='cifar10', random_init=True), PixelInputModel)
    torch.save(create_model('resnet18', num_classes=10).state_dict(), tmp_path / 'mine.pt')
    assert not isinstance(load_model('resnet18', dataset='cifar10', checkpoint=tmp_path / 'mine.pt'), PixelInputModel)


def test_cli_eval_notes_the_standardisation_of_a_stock_timm_model(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv('ROBUST_RESNETS_CACHE', str(tmp_path / 'cache'))
    _write_images(tmp_path / 'cifar', per_class=1)
    out = tmp_path / 'r.json'
    assert _run_cli(['eval', 'resnet18.a1_in1k', '--random-init', '--data-dir', str(tmp_path / 'cifar'),
                     '--n-examples', '2', '--attacks', 'clean', '--quiet', '--out', str(out)]) == 0
    assert 'note: resnet18.a1_in1k is a timm model whose pretrained cfg standardises inputs' in capsys.readouterr().err
    notes = read_results(out)['notes']
    assert len(notes) == 1 and 'std=(0.229, 0.224, 0.225)' in notes[0]


def test_cli_eval_step_size_and_seed_are_checked(tmp_path, monkeypatch, capsys, tiny_registered_model):
    monkeypatch.setenv('ROBUST_RESNETS_CACHE', str(tmp_path / 'cache'))
    _write_images(tmp_path / 'cifar', per_class=1)
    base = ['eval', tiny_registered_model, '--random-init', '--data-dir', str(tmp_path / 'cifar'), '--n-examples', '2',
            '--attacks', 'clean,pgd2', '--quiet', '--no-masking-check']
    assert _run_cli([*base, '--step-size', '2']) == 1  # larger than the pixel range: refused
    assert 'did you mean --step-size 2/255?' in capsys.readouterr().err
    assert _run_cli([*base, '--step-size', '0.8']) == 0  # Huang et al.'s CLI spelling of 0.8/255: warned about
    err = capsys.readouterr().err
    assert 'warning: --step-size 0.8 is larger than eps (8/255)' in err and 'did you mean --step-size 0.8/255?' in err
    assert _run_cli([*base, '--step-size', '16/255', '--eps', '4/255']) == 0  # > eps (2.5 * eps / steps is in use)
    err = capsys.readouterr().err
    assert 'warning: --step-size 16/255 is larger than eps (4/255)' in err and 'did you mean' not in err
    assert _run_cli([*base, '--step-size', '8/255']) == 0  # a step of eps (FGSM's) is not warned about
    assert 'warning' not in capsys.readouterr().err
    assert _run_cli([*base, '--norm', 'L2', '--eps', '0.5', '--step-size', '1.5']) == 0  # L2 steps may exceed 1
    capsys.readouterr()
    assert _run_cli([*base, '--seed', str(2 ** 64)]) == 1
    assert '--seed must be an integer from 0 to 2**63 - 1, got 18446744073709551616' in capsys.readouterr().err


# --- the RobustBench adapter ---------------------------------------------------------------------------------------
def test_the_autoattack_shim_refuses_attacks_it_would_not_run():
    from robust_resnets.evaluation.robustbench_adapter import AutoAttack

    model, _, _ = _linear_setup()
    with pytest.raises(ValueError, match="pass version='custom' to run exactly these attacks"):
        AutoAttack(model, eps=8 / 255, attacks_to_run=['apgd-ce'], version='standard', device='cpu')
    custom = AutoAttack(model, eps=8 / 255, attacks_to_run=['apgd-ce'], version='custom', device='cpu')
    assert custom.attacks_to_run == ['apgd-ce']
    assert AutoAttack(model, eps=8 / 255, device='cpu').attacks_to_run == ['apgd-ce', 'apgd-t', 'fab-t', 'square']


@pytest.mark.skipif(importlib.util.find_spec('robustbench') is None,
                    reason='robustbench is not installed (optional extra: pip install robust-resnets[robustbench])')
def test_robustbench_benchmark_refuses_a_cifar_preprocessing_it_would_ignore(tmp_path, monkeypatch):
    from robust_resnets.evaluation.robustbench_adapter import benchmark

    monkeypatch.setenv('ROBUST_RESNETS_CACHE', str(tmp_path / 'cache'))
    _write_images(tmp_path / 'cifar', per_class=1)
    model = nn.Sequential(nn.Flatten(), nn.Linear(3 * 32 * 32, 10)).eval()
    with pytest.raises(ValueError, match='cannot apply another preprocessing'):
        benchmark(model, n_examples=10, dataset='cifar10', data_dir=tmp_path / 'cifar', device='cpu',
                  preprocessing='Res256Crop224')


def test_threat_model_defaults_follow_the_norm(tmp_path, monkeypatch, capsys, tiny_registered_model):
    """Without --eps, each norm gets RobustBench's radius (an L2 run is not run at the Linf radius), and a
    Linf radius above 1 is refused by evaluate itself, not only by the command line."""
    monkeypatch.setenv('ROBUST_RESNETS_CACHE', str(tmp_path / 'cache'))
    _write_images(tmp_path / 'cifar', per_class=1)
    base = ['eval', tiny_registered_model, '--random-init', '--data-dir', str(tmp_path / 'cifar'), '--n-examples',
            '4', '--attacks', 'clean,pgd2', '--quiet', '--no-masking-check']
    for norm, eps in (('L2', 0.5), ('Linf', 8 / 255)):
        out = tmp_path / f'{norm}.json'
        assert _run_cli([*base, '--norm', norm, '--out', str(out)]) == 0
        result = json.loads(out.read_text())
        assert result['threat_model']['eps'] == pytest.approx(eps)
        assert result['attacks']['pgd2']['settings']['step_size'] == pytest.approx(eps)  # 2 * eps / 2 steps
    capsys.readouterr()
    assert _run_cli([*base, '--norm', 'L2', '--dataset', 'imagenet']) == 1
    assert 'give one with --eps' in capsys.readouterr().err
    model = tiny_cnn()
    x, y = data(4, 0, model)
    with pytest.raises(ValueError, match=r'eps=8 is larger than the whole \[0, 1\] pixel range.*eps=8/255\?'):
        evaluate(model, x, y, attacks='clean', eps=8, progress=False)
    assert evaluate(model, x, y, attacks='clean', eps=8, norm='L2', progress=False).n_examples == 4


def test_an_untagged_name_evaluates_its_default_tag(tmp_path, capsys):
    """eval ARCH resolves to the tag timm.create_model(ARCH, pretrained=True) loads, and says so; with
    --checkpoint or --random-init the name is kept."""
    from robust_resnets.evaluation.sources import resolve_model_name

    assert resolve_model_name('robust_resnet_a1') == 'robust_resnet_a1.cifar10_trades'
    assert resolve_model_name('robust_resnet_a1', checkpoint='w.pt') == 'robust_resnet_a1'
    assert resolve_model_name('robust_resnet_a1', random_init=True) == 'robust_resnet_a1'
    assert resolve_model_name('resnet18') == 'resnet18'  # no manifest entries: timm's own
    assert _run_cli(['eval', 'robust_resnet_a1', '--data-dir', str(tmp_path), '--attacks', 'clean']) == 1
    err = capsys.readouterr().err
    assert 'resolves to its default tag, robust_resnet_a1.cifar10_trades' in err
    assert 'robust-resnets eval robust_resnet_a1.cifar10_trades --checkpoint ORIGINAL' in err


def test_eval_takes_an_exported_model_folder(tmp_path, monkeypatch, capsys):
    """A finished training run (timm's config.json + model.safetensors) is evaluated by its path or as
    local-dir:PATH, with its architecture, model_args, weights and dataset."""
    import timm

    monkeypatch.setenv('ROBUST_RESNETS_CACHE', str(tmp_path / 'cache'))
    _write_images(tmp_path / 'cifar', per_class=1)
    tiny = {'depths': [1, 1, 1], 'widths': [1, 1, 1]}
    run = tmp_path / 'runs' / 'r1'
    run.mkdir(parents=True)
    model = timm.create_model('preact_resnet', **tiny).eval()
    save_file(model.state_dict(), str(run / 'model.safetensors'))
    (run / 'config.json').write_text(json.dumps({'architecture': 'preact_resnet', 'model_args': tiny,
                                                 'training': {'dataset': 'cifar10'}}))
    common = ['--data-dir', str(tmp_path / 'cifar'), '--n-examples', '4', '--attacks', 'clean', '--quiet']
    for name in (str(run), f'local-dir:{run}'):
        out = tmp_path / f'{len(name)}.json'
        assert _run_cli(['eval', name, *common, '--out', str(out)]) == 0
        result = json.loads(out.read_text())
        assert result['model']['name'] == 'preact_resnet' and result['data']['dataset'] == 'cifar10'
        assert result['model']['checkpoint'] == str(run / 'model.safetensors')
    # the weights file itself, or its architecture mistaken, is answered with the command that fits
    capsys.readouterr()
    assert _run_cli(['eval', str(run / 'model.safetensors'), *common]) == 1
    assert (f"is a weights file, not a model: evaluate its folder (robust-resnets eval {run}), or name the "
            f"architecture: robust-resnets eval preact_resnet --checkpoint {run / 'model.safetensors'}") \
        in capsys.readouterr().err
    assert _run_cli(['eval', 'robust_resnet_a0', '--checkpoint', str(run / 'model.safetensors'), *common]) == 1
    assert (f"holds weights for 'preact_resnet' (says {run / 'config.json'}), not 'robust_resnet_a0'; evaluate it "
            f"with: robust-resnets eval preact_resnet --checkpoint") in capsys.readouterr().err
    (run / 'model.safetensors').unlink()
    assert _run_cli(['eval', f'local-dir:{run}', *common]) == 1
    assert 'is not an exported model: it needs config.json and model.safetensors' in capsys.readouterr().err
