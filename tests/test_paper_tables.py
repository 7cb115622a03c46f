"""The papers' tables (benchmarks/tables/*.yaml): schema, #P/#F reproduced or pinned, and their weights."""
from __future__ import annotations

import copy

import pytest
import yaml

import robust_resnets  # noqa: F401  (registers the models)
from benchmarks import accuracy
from benchmarks import complexity as bench
from benchmarks import paper_tables
from robust_resnets.weights import get_manifest

TABLES = paper_tables.load_tables()
MEASURED = [t for t in TABLES if set(t['columns']) & set(paper_tables.COMPLEXITY_COLUMNS)]
#: measurements shared by the tests (the same models recur in several tables)
CACHE: dict = {}
MANIFEST_METRICS = {'clean': 'clean', 'pgd20': 'pgd20', 'cw40': 'cw40', 'autoattack': 'aa', 'params_m': 'params_m'}


def test_tables_cover_the_papers():
    ids = {t['id'] for t in TABLES}
    assert ids >= {'huang2022_table1', 'huang2022_table2', 'huang2022_table3', 'huang2022_robustbench',
                   'huang2022_cifar10_trades', 'huang2022_cifar100_trades', 'huang2022_cifar10_sat',
                   'huang2022_cifar10_mart', 'singh2023_linf4', 'singh2023_linf4_robustbench'}
    table3 = {r['label']: r for r in next(t for t in TABLES if t['id'] == 'huang2022_table3')['rows']}
    assert table3['Ours WRN-A4']['printed'] == {'params_m': 147, 'macs_g': 40.4, 'aa': 65.79}
    assert table3['Ours WRN-A4']['weights'] == 'wrn_a4.cifar10_robustbench'


@pytest.mark.parametrize('table', MEASURED, ids=[t['id'] for t in MEASURED])
def test_printed_params_and_macs_are_reproduced_or_pinned(table):
    report = bench.build_report([table], cache=CACHE)[0]
    assert report['rows']
    for row in report['rows']:
        assert row['status'] in ('ok', 'known'), (row['label'], row['problems'])


def _wrn_28_10_table(**row_changes):
    table = copy.deepcopy(next(t for t in TABLES if t['id'] == 'huang2022_table3'))
    table['rows'] = [dict(table['rows'][0], **row_changes)]
    return bench.build_report([table], cache=CACHE)[0]['rows'][0]


def test_a_pinned_discrepancy_still_checks_both_columns():
    row = _wrn_28_10_table()
    assert row['status'] == 'known' and row['columns']['params_m']['status'] == 'match'
    assert row['columns']['macs_g']['status'] == 'known'
    # the other column regresses: caught although the row has a known discrepancy
    changed = _wrn_28_10_table(printed={'params_m': 40.0, 'macs_g': 5.20, 'aa': 59.53})
    assert changed['status'] == 'fail' and changed['problems'][0].startswith('#P: measured 36.48')
    # the model's #F moves away from the pinned value: caught too
    moved = _wrn_28_10_table(known_discrepancy={'macs_g': {'measured': 5.30, 'note': 'x'}})
    assert moved['status'] == 'fail' and 'pins 5.3' in moved['problems'][0]
    # a pin on a column that now matches must go
    stale = _wrn_28_10_table(printed={'params_m': 36.5, 'macs_g': 5.25, 'aa': 59.53})
    assert stale['status'] == 'fail' and 'drop the known_discrepancy' in stale['problems'][0]


def test_check_column_tolerates_only_the_pin():
    pinned = {'measured': 5.246, 'note': 'n'}
    assert bench.check_column(printed=5.20, measured=5.2456, discrepancy=pinned)['status'] == 'known'
    assert bench.check_column(printed=5.20, measured=5.2456 * 1.002, discrepancy=pinned)['status'] == 'fail'
    assert bench.check_column(printed=5.25, measured=5.2456, discrepancy=None)['status'] == 'match'
    assert bench.check_column(printed=5.20, measured=5.2456, discrepancy=None)['status'] == 'fail'


def test_printed_matches_uses_three_significant_digits():
    assert bench.printed_matches(19.22, 19.2) and bench.printed_matches(266.8, 267)
    assert not bench.printed_matches(5.246, 5.20) and not bench.printed_matches(9.586, 9.60)


def test_benchmark_command_prints_legend_table_and_footnotes(capsys, tmp_path):
    out = tmp_path / 'report.json'
    assert bench.main(['--table', 'huang2022_table3', '--json', str(out)]) == 0
    text = capsys.readouterr().out
    assert text.startswith('#P: parameters, in millions')
    assert 'match: the measured value rounded to 3 significant digits' in text
    assert '| Ours RobustResNet-A1 | robust_resnet_a1 | 19.2M | 19.22M |' in text
    assert '#F known: 5.25G printed for an equal-MAC config [1]' in text
    assert text.count("[1] WRN-28-10 (D=4 per stage") == 1  # the long reason once, under the table
    assert '7 rows of 1 tables measured: 3 match' in text
    assert yaml.safe_load(out.read_text())[0]['id'] == 'huang2022_table3'


def test_help_and_list_name_every_table(capsys):
    for main in (bench.main, accuracy.main):
        with pytest.raises(SystemExit) as info:
            main(['--help'])
        assert info.value.code == 0
        text = capsys.readouterr().out
        for table in TABLES:
            assert f"  {table['id']} " in text and table['title'] in text
    assert bench.main(['--list']) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [line.split()[0] for line in lines] == [t['id'] for t in TABLES]
    assert next(line for line in lines if line.split()[0] == 'singh2023_linf4').split()[1:3] == ['clean', 'aa']
    assert next(line for line in lines if line.split()[0] == 'huang2022_table3').split()[1:3] == ['#P/#F', 'aa']


def test_a_table_without_params_or_macs_says_so(capsys):
    assert bench.main(['--table', 'singh2023_linf4']) == 2  # nothing measured because of the selection
    captured = capsys.readouterr()
    assert captured.out == ''
    assert ('singh2023_linf4 prints no #P/#F; `python -m benchmarks accuracy --tables singh2023_linf4` evaluates '
            'its accuracy columns') in captured.err
    # with a measurable table beside it, the run measures that one and still says why the other is left out
    assert bench.main(['--table', 'singh2023_linf4', '--table', 'huang2022_table3']) == 0
    captured = capsys.readouterr()
    assert 'singh2023_linf4 prints no #P/#F' in captured.err
    assert '7 rows of 1 tables measured' in captured.out


def test_an_unknown_table_id_names_the_known_ones(capsys):
    assert bench.main(['--table', 'huang2022_table9']) == 2
    err = capsys.readouterr().err
    assert "Unknown table id(s) ['huang2022_table9']" in err and all(t['id'] in err for t in TABLES)
    assert accuracy.main(['--tables', 'huang2022_table9']) == 2
    err = capsys.readouterr().err
    assert "No table id matches 'huang2022_table9'" in err and all(t['id'] in err for t in TABLES)


def test_sources_are_public_citations():
    """Sources, footnotes and notes cite the authors' repositories (commit, date) or RobustBench, never this
    project's private copies of the READMEs."""
    for path in sorted(paper_tables.TABLES_DIR.glob('*.yaml')):
        text = path.read_text(encoding='utf-8')
        for word in ('shared/', 'seed'):
            assert word not in text.lower(), f'{path.name} mentions {word!r}'
        doc = yaml.safe_load(text)
        for key, source in doc['sources'].items():
            assert 'github.com/' in source or 'RobustBench' in source, f'{path.name} source {key}: {source}'


BAD_FILES = [
    ('not: [valid', 'Cannot read table file'),
    ('- a list', 'a table file is a mapping'),
    ('paper: {id: p, title: t, arxiv: "1"}\nsources: {s: x}\ntables: []', 'tables must be a non-empty list'),
]


@pytest.mark.parametrize('text,message', BAD_FILES)
def test_unreadable_table_file_is_refused(tmp_path, text, message):
    (tmp_path / 'bad.yaml').write_text(text)
    with pytest.raises(paper_tables.TableError, match=message):
        paper_tables.load_tables(tables_dir=tmp_path)


def _one_table_file(tmp_path, evaluation=None, columns=('params_m', 'aa'), **row_changes):
    row = {'label': 'r', 'model': 'wrn_28_10', 'weights': None, 'printed': {'params_m': 36.5}, **row_changes}
    doc = {'paper': {'id': 'p', 'title': 't', 'arxiv': '1'}, 'sources': {'s': 'x'},
           'tables': [{'id': 'p_t', 'title': 't', 'source': 's', 'dataset': 'cifar10', 'threat_model': 'Linf',
                       'eps': '8/255', 'columns': list(columns), 'evaluation': {'n_examples': 10, **(evaluation or {})},
                       'rows': [row]}]}
    (tmp_path / 'p.yaml').write_text(yaml.safe_dump(doc))


@pytest.mark.parametrize('change,message', [
    ({'weigths': None}, 'unknown fields'),
    ({'printed': {'macs_g': 5.2}}, "printed column 'macs_g' is not in the table's columns"),
    ({'known_discrepancy': {'params_m': {'note': 'no pin'}}}, 'must be {measured'),
    ({'known_discrepancy': {'aa': {'measured': 1, 'note': 'n'}}}, "known_discrepancy names 'aa'"),
    ({'weights': 'no_tag'}, "weights must be a manifest name"),
])
def test_schema_errors_name_the_row_and_field(tmp_path, change, message):
    _one_table_file(tmp_path)
    assert paper_tables.load_tables(tables_dir=tmp_path)[0]['id'] == 'p_t'
    _one_table_file(tmp_path, **change)
    with pytest.raises(paper_tables.TableError, match='row 0 \\(r\\)') as info:
        paper_tables.load_tables(tables_dir=tmp_path)
    assert message in str(info.value)


# --- weights and accuracies -------------------------------------------------------------------------------------
ROWS_WITH_WEIGHTS = [(t, r) for t in TABLES for r in t['rows'] if r['weights']]


def test_every_weights_tag_exists_and_fits_its_row():
    manifest = get_manifest()
    for table, row in ROWS_WITH_WEIGHTS:
        where = f"{table['id']} / {row['label']}: weights {row['weights']}"
        assert row['weights'] in manifest, f'{where} is not in the weights manifest'
        w = manifest[row['weights']]
        assert w.architecture == row['model'], where
        assert w.dataset == table['dataset'] and w.threat_model == table['threat_model'], where
        assert w.eps == str(table['eps']), where
        args = row.get('corrected_model_args') or row.get('model_args') or {}
        assert all(w.model_args.get(k) == v for k, v in args.items()), f'{where}: model_args differ from the entry'


def test_every_printed_manifest_entry_is_a_table_row():
    """Each entry of the tables' papers that reports a figure is referenced by a row printing that figure."""
    papers = {t['paper']['arxiv'] for t in TABLES}
    by_weights = {}
    for _, row in ROWS_WITH_WEIGHTS:
        by_weights.setdefault(row['weights'], []).append(row['printed'])
    checked = 0
    for name, w in get_manifest().items():
        reported = {MANIFEST_METRICS[k]: v for k, v in w.reported.items() if k in MANIFEST_METRICS and v is not None}
        if w.paper.get('arxiv') not in papers or not reported:
            continue  # clean initialisations and 8/255 fine-tunes: the READMEs print no figure for them
        assert name in by_weights, f'{name} reports {reported} but no table row has weights: {name}'
        for metric, value in reported.items():
            assert any(p.get(metric) == value for p in by_weights[name]), \
                f'{name}: reported {metric}={value} is printed by none of its rows {by_weights[name]}'
        checked += 1
    assert checked >= 60


def test_rows_of_one_checkpoint_share_one_evaluation():
    rows = accuracy.accuracy_rows(TABLES)
    groups = accuracy.plan_evaluations(rows)
    convnext_b = [g for k, g in groups.items() if k[0] == 'convnext_base_convstem.in1k_linf4']
    assert sorted(len(g) for g in convnext_b) == [1, 2]  # 224 px: README + RobustBench rows; 256 px: its own
    wrn_a4 = [g for k, g in groups.items() if k[0] == 'wrn_a4.cifar10_robustbench']
    assert [sorted(r['table'] for r in g) for g in wrn_a4] == [['huang2022_robustbench', 'huang2022_table3']]
    assert len(groups) == len({r['weights'] for r in rows if r['weights']}) + 2  # + the 256 and 320 px rows


def test_tolerance_widens_only_on_a_subset():
    assert accuracy.tolerance_pp(printed=60.0, n_evaluated=10000, n_full=10000) == accuracy.TOLERANCE_PP
    small = accuracy.tolerance_pp(printed=60.0, n_evaluated=500, n_full=10000)
    assert small == pytest.approx(0.5 + 2 * 100 * (0.24 / 500 * 9500 / 9999) ** 0.5)
    assert small > accuracy.tolerance_pp(printed=60.0, n_evaluated=5000, n_full=10000) > 0.5


def test_accuracy_reports_a_broken_row_and_goes_on(tmp_path, capsys):
    (tmp_path / 'robust_resnet_a1.cifar10_trades_extra500k.safetensors').write_bytes(b'not a safetensors file')
    code = accuracy.main(['--tables', 'huang2022_table3', '--weights-dir', str(tmp_path), '--data-dir',
                          str(tmp_path), '--n-examples', '2', '--device', 'cpu'])
    out = capsys.readouterr().out
    assert code == 1
    assert 'Ours RobustResNet-A1' in out and 'robust_resnet_a1.cifar10_trades_extra500k: error:' in out
    assert 'wrn_a4.cifar10_robustbench: skipped: weights not published' in out
    assert 'RST WRN-28-10' in out and 'skipped: no released weights' in out
    assert '1 rows failed' in out


def test_accuracy_skips_rows_without_a_data_folder(tmp_path, capsys):
    (tmp_path / 'convnext_iso_convstem.in1k_linf4.safetensors').write_bytes(b'')
    assert accuracy.main(['--tables', 'singh2023_linf4', '--weights-dir', str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert 'ConvNext-iso-CvSt' in out and 'convnext_iso_convstem.in1k_linf4: skipped: no --imagenet-dir given' in out
    assert 'vit_small_convstem.in1k_linf4: skipped: weights not published' in out


# --- which AutoAttack an 'aa' column ran -------------------------------------------------------------------------
def test_huang_et_al_readme_aa_columns_are_apgd_ce_and_apgd_t():
    """Their eval_robustness.py sets attacks_to_run = ['apgd-ce', 'apgd-t']; Table 3 and RobustBench are standard."""
    aa = {r['table']: r['attacks']['aa'] for r in accuracy.accuracy_rows(TABLES) if 'aa' in r['printed']}
    assert aa == {'huang2022_cifar10_trades': 'aa:apgd-ce+apgd-t', 'huang2022_cifar100_trades': 'aa:apgd-ce+apgd-t',
                  'huang2022_table3': 'aa', 'huang2022_robustbench': 'aa', 'singh2023_linf4': 'aa',
                  'singh2023_linf4_robustbench': 'aa'}


@pytest.mark.parametrize('evaluation,columns,message', [
    ({'aa_attack': 'pgd20'}, ('params_m', 'aa'), 'evaluation.aa_attack must name an AutoAttack'),
    ({'aa_attack': 'aa:apgd-x'}, ('params_m', 'aa'), 'evaluation.aa_attack must name an AutoAttack'),
    ({'aa_attack': 'aa:apgd-ce'}, ('params_m',), "the 'aa' column, which the table does not print"),
    ({'aa_attack': 'AA:APGD-CE'}, ('params_m', 'aa'), "write evaluation.aa_attack as 'aa:apgd-ce'"),
])
def test_aa_attack_must_be_an_autoattack_of_an_aa_column(tmp_path, evaluation, columns, message):
    _one_table_file(tmp_path, evaluation={'aa_attack': 'aa:apgd-ce+apgd-t'})
    assert paper_tables.load_tables(tables_dir=tmp_path)[0]['evaluation']['aa_attack'] == 'aa:apgd-ce+apgd-t'
    _one_table_file(tmp_path, evaluation=evaluation, columns=columns)
    with pytest.raises(paper_tables.TableError, match='p_t'):
        paper_tables.load_tables(tables_dir=tmp_path)
    with pytest.raises(paper_tables.TableError) as info:
        paper_tables.load_tables(tables_dir=tmp_path)
    assert message in str(info.value)


def test_accuracy_evaluates_the_aa_column_with_the_tables_autoattack(tmp_path, capsys, monkeypatch):
    """RRN-A1 of the CIFAR-10 TRADES table runs aa:apgd-ce+apgd-t, and its printed AA is compared with that."""
    import torch
    import torch.nn as nn

    import robust_resnets.evaluation as evaluation
    from robust_resnets.evaluation import sources

    row = next(r for t in TABLES if t['id'] == 'huang2022_cifar10_trades' for r in t['rows'] if r['label'] == 'RRN-A1')
    (tmp_path / f"{row['weights']}.safetensors").write_bytes(b'')
    run = {}

    class Result:
        accuracy = {'clean': 0.8546, 'pgd20': 0.5847, 'cw40': 0.5572, 'aa:apgd-ce+apgd-t': 0.5442}

    def fake_evaluate(model, images, labels, *, attacks, **kwargs):
        run['attacks'] = attacks
        return Result()

    monkeypatch.setattr(sources, 'load_model', lambda *a, **k: nn.Identity())
    monkeypatch.setattr(sources, 'load_dataset', lambda *a, **k: (torch.zeros(2, 3, 32, 32), torch.zeros(2), None))
    monkeypatch.setattr(evaluation, 'evaluate', fake_evaluate)
    assert accuracy.main(['--tables', 'huang2022_cifar10_trades', '--weights-dir', str(tmp_path), '--data-dir',
                          str(tmp_path), '--n-examples', '2']) == 0
    assert run['attacks'] == ['clean', 'pgd20', 'cw40', 'aa:apgd-ce+apgd-t']
    out = capsys.readouterr().out
    aa_line, = [line for line in out.splitlines() if 'RRN-A1' in line and ' aa ' in line]
    assert aa_line.split()[-6:-2] == ['aa', '54.42', '54.42', '+0.00'] and aa_line.endswith('reproduced')
