"""The leaderboard: every attack of a results file shown, standard AutoAttack in its own column, the worst case explained."""
import re

import pytest
import torch
import torch.nn as nn

from robust_resnets.attacks.spec import parse_attack
from robust_resnets.evaluation import evaluate
from robust_resnets.evaluation.evaluate import AttackResult, EvaluationResult
from robust_resnets.evaluation.leaderboard import NOTE, leaderboard_rows, render_html, render_markdown
from robust_resnets.evaluation.results import read_results, result_to_dict, robustbench_model_info, write_json


def _result(flags, *, eps=8 / 255, norm='Linf'):
    """An EvaluationResult with chosen per-example flags per attack name; clean is all correct."""
    n = len(next(iter(flags.values())))
    attacks = {name: AttackResult(parse_attack(name, eps=eps, norm=norm), torch.tensor(list(map(bool, f))))
               for name, f in {'clean': [1] * n, **flags}.items()}
    return EvaluationResult(attacks=attacks, n_examples=n, eps=eps, norm=norm, seed=0, batch_size=n, device='cpu')


def _shown(row):
    """Attack name -> accuracy (%) as the attacks column shows them."""
    return {name: float(acc) for name, acc in re.findall(r'(\S+) (\d+\.\d\d)(?:, |$)', row['attacks'])}


@pytest.mark.parametrize('flags', [
    {'pgd2': (1, 1, 0, 0), 'aa:apgd-ce': (0, 0, 1, 1)},  # the walkthrough: pgd2 50.00, worst case 0.00
    {'pgd2': (1, 1, 1, 0), 'aa-plus': (1, 1, 0, 1), 'aa-rand': (1, 0, 1, 1), 'aa:apgd-ce+apgd-t': (0, 1, 1, 1)},
    {'aa': (1, 1, 1, 0), 'aa-plus': (1, 0, 1, 0), 'cw4': (1, 1, 0, 1)},
    {'aa': (1, 0, 1, 1)},
])
def test_every_attack_is_shown_and_the_worst_case_is_over_them(tmp_path, flags):
    result = _result(flags)
    row, = leaderboard_rows([write_json(result_to_dict(result, model='wrn_a4', dataset='cifar10', checkpoint='a.pt'),
                                        tmp_path / 'r.json')])
    shown = _shown(row)
    if row['AutoAttack'] != '-':
        shown['aa'] = float(row['AutoAttack'])
    assert shown == {name: pytest.approx(100 * r.accuracy) for name, r in result.attacks.items() if name != 'clean'}
    assert row['AutoAttack'] == ('-' if 'aa' not in flags else f"{100 * result.accuracy['aa']:.2f}")
    assert 'aa' not in _shown(row)  # standard AutoAttack in its own column only
    worst = torch.stack([torch.tensor(list(map(bool, flags[name]))) for name in shown]).all(0).float().mean()
    assert row['worst case'] == f'{100 * worst.item():.2f}' == f'{100 * result.robust_accuracy:.2f}'


def test_autoattack_column_and_delta_are_for_standard_autoattack_only(tmp_path):
    plus_only = result_to_dict(_result({'aa-plus': (1, 1, 0, 0)}), model='wrn_a4.cifar10_robustbench',
                               dataset='cifar10')
    both = result_to_dict(_result({'aa-plus': (1, 0, 0, 0), 'aa': (1, 1, 0, 0)}), model='wrn_a4.cifar10_robustbench',
                          dataset='cifar10')
    rows = leaderboard_rows([write_json(plus_only, tmp_path / 'plus.json'), write_json(both, tmp_path / 'both.json')])
    by_attacks = {r['attacks']: r for r in rows}
    assert set(by_attacks) == {'aa-plus 50.00', 'aa-plus 25.00'}
    assert by_attacks['aa-plus 50.00']['AutoAttack'] == '-' and by_attacks['aa-plus 50.00']['delta AA'] == '-'
    assert by_attacks['aa-plus 25.00']['AutoAttack'] == '50.00'
    delta = f"{50 - float(both['robustbench_reported']['autoattack_acc']):+.2f}"
    assert by_attacks['aa-plus 25.00']['delta AA'] == f'{delta} (subset)'  # four images, not RobustBench's 10,000
    plus_info = robustbench_model_info(_result({'aa-plus': (1, 1, 0, 0)}), dataset='cifar10', architecture='wrn_a4')
    assert plus_info.get('autoattack_acc') is None  # RobustBench's field is standard AutoAttack too


def test_rendered_tables_say_what_the_columns_mean(tmp_path):
    row = leaderboard_rows([write_json(result_to_dict(_result({'aa:apgd-ce': (1, 0)}), model='m', dataset='cifar10'),
                                       tmp_path / 'r.json')])
    markdown, page = render_markdown(row), render_html(row)
    assert '| aa:apgd-ce 50.00 |' in markdown and markdown.rstrip().endswith(NOTE)
    assert '<td>aa:apgd-ce 50.00</td>' in page and 'worst case: per example' in page
    assert 'standard version (aa)' in NOTE


def test_a_custom_autoattack_run_reaches_the_json_and_the_leaderboard(tmp_path):
    """The walkthrough end to end: clean,pgd2,aa:apgd-ce runs standard's APGD-CE and the row shows it."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(3 * 8 * 8, 10)).eval()
    x = torch.randint(0, 256, (8, 3, 8, 8), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        y = model(x.float() / 255).argmax(1)
    result = evaluate(model, x, y, attacks='clean,pgd2,aa:apgd-ce', eps=8 / 255, batch_size=8, progress=False,
                      check_masking=False)
    path = write_json(result_to_dict(result, model='linear', dataset='cifar10', random_init=True), tmp_path / 'r.json')
    settings = read_results(path)['attacks']['aa:apgd-ce']['settings']
    assert settings['version'] == 'custom' and settings['attacks'] == ['apgd-ce']
    assert settings['per_attack'] == {'apgd-ce': {'n_iter': 100, 'n_restarts': 1, 'eot_iter': 1,
                                                  'use_largereps': False}}
    row, = leaderboard_rows([path])
    assert _shown(row) == {'pgd2': pytest.approx(100 * result.accuracy['pgd2']),
                           'aa:apgd-ce': pytest.approx(100 * result.accuracy['aa:apgd-ce'])}
    assert row['worst case'] == f'{100 * result.robust_accuracy:.2f}' and row['AutoAttack'] == '-'


def test_cli_leaderboard_refuses_an_existing_out_without_overwrite(tmp_path, capsys):
    from robust_resnets.cli import main
    results = write_json(result_to_dict(_result({'pgd2': (1, 0)}), model='m', dataset='cifar10'), tmp_path / 'r.json')
    out = tmp_path / 'lb.md'
    out.write_text('kept\n')
    assert main(['leaderboard', str(results), '--out', str(out)]) == 1
    assert f'{out} already exists; pass --overwrite or choose another --out.' in capsys.readouterr().err
    assert out.read_text() == 'kept\n'
    assert main(['leaderboard', str(results), '--out', str(out), '--overwrite']) == 0
    assert '| pgd2 50.00 |' in out.read_text()
    assert sorted(p.name for p in tmp_path.iterdir()) == ['lb.md', 'r.json']  # no temporary file left
    # not even --overwrite writes the table over a results file it reads
    assert main(['leaderboard', str(results), '--out', str(results), '--overwrite']) == 1
    assert 'is one of the results files to read' in capsys.readouterr().err
    assert read_results(results)['schema']


def test_read_results_names_the_file_it_was_given(tmp_path):
    run_config = tmp_path / 'run' / 'config.json'  # what a training run exports beside model.safetensors
    run_config.parent.mkdir()
    run_config.write_text('{"architecture": "preact_resnet", "pretrained_cfg": {}, "training": {"recipe": "x"}}')
    with pytest.raises(ValueError, match=r"is not a robust-resnets results file \(a training run's config.json\); "
                                         r"pass a file written by `robust-resnets eval MODEL ... --out RESULTS.json`"):
        read_results(run_config)
    (tmp_path / 'other.json').write_text('{"schema": "other"}')
    with pytest.raises(ValueError, match=r"\(schema 'other', not 'robust-resnets/eval-result/1'\)"):
        read_results(tmp_path / 'other.json')
