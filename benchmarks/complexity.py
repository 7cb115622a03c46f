"""Reprints the papers' #P/#F columns beside the values measured for our models.

    python -m benchmarks complexity [--table ID ...] [--json OUT]
    python -m benchmarks complexity --list      # the table ids, what each prints, and its title

The tables are ``benchmarks/tables/*.yaml`` (schema: ``benchmarks/tables/README.md``), read and checked by
:mod:`benchmarks.paper_tables`. Every row with a printed #P or #F is measured with
:mod:`robust_resnets.complexity` on the ``meta`` device. A printed value must match the measured one (see
:func:`printed_matches`), or the row must declare that column a ``known_discrepancy`` pinned to the value we
measure, so that a change of the model shows up either way. The legend printed with the report says the rest.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any, Dict, Iterable, List, Mapping, Optional

from benchmarks.paper_tables import (
    COMPLEXITY_COLUMNS, TableError, describe_tables, load_tables, prints_complexity, tables_epilog,
)
from robust_resnets.files import write_text

#: a column pinned by ``known_discrepancy`` must measure within this relative distance of the pin
PIN_TOLERANCE = 1e-3


def printed_matches(measured: float, printed: float) -> bool:
    """Whether ``measured`` rounded to 3 significant digits (the papers' precision: 36.5M, 5.20G, 267M) equals
    ``printed``."""
    return float(f'{measured:.3g}') == float(printed)


def check_column(*, printed: float, measured: float, discrepancy: Optional[Mapping[str, Any]]) -> Dict[str, Any]:
    """Judges one printed #P or #F against the measured value.

    Args:
        printed: The paper's value.
        measured: Ours.
        discrepancy: The row's ``known_discrepancy`` entry for this column, or None.

    Returns:
        ``{'status', 'problem'}``: status 'match', 'known' (differs, and measures the pinned value) or 'fail'
        (problem then says what to fix).
    """
    match = printed_matches(measured, printed)
    if discrepancy is None:
        return {'status': 'match', 'problem': None} if match else {'status': 'fail', 'problem': (
            f'measured {measured:.4g} does not match the printed {printed:g}; find the cause, and if the paper is '
            f'wrong add a known_discrepancy pinned to {measured:.4g}')}
    if match:
        return {'status': 'fail', 'problem': f'measured {measured:.4g} now matches the printed {printed:g}: drop the '
                                             f'known_discrepancy'}
    pin = float(discrepancy['measured'])
    if abs(measured - pin) > PIN_TOLERANCE * abs(pin):
        return {'status': 'fail', 'problem': (
            f'measured {measured:.4g}, but the known_discrepancy pins {pin:g}: the model changed; if on purpose, '
            f'update the pin and its note')}
    return {'status': 'known', 'problem': None}


def measure(model: str, model_args: Mapping[str, Any], input_size: Optional[Iterable[int]],
            cache: Dict[str, Dict[str, float]]) -> Dict[str, float]:
    """Parameters (M) and MACs (G) of a registered model, built on ``meta`` (memoised in ``cache``)."""
    import robust_resnets  # noqa: F401  (registers the models)
    from robust_resnets.complexity import count_macs, count_params, create_for_counting

    key = json.dumps([model, dict(model_args), input_size and list(input_size)], sort_keys=True)
    if key not in cache:
        net = create_for_counting(model, **model_args)
        size = tuple(input_size or net.pretrained_cfg.get('input_size', (3, 32, 32)))
        cache[key] = {'params_m': count_params(net) / 1e6, 'macs_g': count_macs(net, input_size=size) / 1e9}
    return cache[key]


def _report_row(row: Mapping[str, Any], cache: Dict[str, Dict[str, float]]) -> Dict[str, Any]:
    import timm

    printed = {c: v for c, v in row['printed'].items() if c in COMPLEXITY_COLUMNS}
    entry: Dict[str, Any] = {'label': row['label'], 'model': row['model'], 'printed': printed, 'columns': {},
                             'problems': [], 'earlier_printed': row.get('earlier_printed')}
    if not timm.is_model(row['model']):
        entry['problems'].append(f"model {row['model']!r} is not registered; fix the name in the table")
        entry['status'] = 'fail'
        return entry
    measured = measure(row['model'], row.get('model_args') or {}, row.get('input_size'), cache)
    entry['measured'] = measured
    for col, value in printed.items():
        disc = (row.get('known_discrepancy') or {}).get(col)
        verdict = check_column(printed=value, measured=measured[col], discrepancy=disc)
        entry['columns'][col] = {'printed': value, 'measured': measured[col],
                                 'rel_diff': (measured[col] - value) / value, **verdict,
                                 'pinned': disc and disc['measured'], 'note': disc and disc['note'],
                                 'footnote': disc and disc.get('footnote')}
        if verdict['problem']:
            entry['problems'].append(f"{COMPLEXITY_COLUMNS[col][0]}: {verdict['problem']}")
    if row.get('corrected_model_args'):
        fixed = measure(row['model'], row['corrected_model_args'], row.get('input_size'), cache)
        ok = all(printed_matches(fixed[c], v) for c, v in printed.items())
        entry['corrected'] = {'model_args': row['corrected_model_args'], 'measured': fixed, 'match': ok}
        if not ok:
            entry['problems'].append('the corrected_model_args do not give the printed figures either')
    statuses = {c['status'] for c in entry['columns'].values()}
    entry['status'] = 'fail' if entry['problems'] else ('known' if 'known' in statuses else 'ok')
    return entry


def build_report(tables: List[Dict[str, Any]], *,
                 cache: Optional[Dict[str, Dict[str, float]]] = None) -> List[Dict[str, Any]]:
    """Measured vs printed #P/#F of every row of the tables that print #P or #F.

    Args:
        tables: Tables from :func:`load_tables`.
        cache: Measurements to reuse and extend (keyed by model, arguments and input size); a fresh one if None.

    Returns:
        One entry per such table: ``id``, ``title``, ``source``, ``footnotes`` (the texts its rows cite) and
        ``rows``; a row has ``printed``, ``measured``, per-column verdicts (``columns``), ``status`` ('ok',
        'known' or 'fail') and ``problems``.
    """
    cache = {} if cache is None else cache
    report = []
    for table in tables:
        if not prints_complexity(table):
            continue
        rows = [_report_row(row, cache) for row in table['rows']
                if set(row['printed']) & set(COMPLEXITY_COLUMNS)]
        cited = list(dict.fromkeys(c['footnote'] for r in rows for c in r['columns'].values() if c.get('footnote')))
        report.append({'id': table['id'], 'title': table['title'], 'source': table['sources'][table['source']],
                       'footnotes': {k: table['footnotes'][k] for k in cited}, 'rows': rows})
    return report


def legend(tables: List[Dict[str, Any]]) -> str:
    """What the report's columns and verdicts mean, and how to re-run one table."""
    ids = ', '.join(t['id'] for t in tables if prints_complexity(t))
    others = ', '.join(t['id'] for t in tables if not prints_complexity(t))
    return '\n'.join([
        '#P: parameters, in millions (M).',
        "#F: multiply-accumulates (MACs), in billions (G), of one forward in eval mode of one image at the model's "
        'input size (1x3x32x32 for CIFAR, 1x3x224x224 for ImageNet), counted in the convention of '
        'torchprofile.profile_macs: convolutions and matrix products, plus one MAC per output element of affine '
        'normalisations, elementwise products, average pools and means. The authors count MACs with that function '
        'and print them as FLOPs (models/resnet.py, main_dist.py, models/robnet.py of their repository). We count '
        'them with robust_resnets.complexity on the meta device; tests/test_complexity.py checks it against '
        'torchprofile for every model family.',
        'diff: (measured - printed) / printed.',
        'match: the measured value rounded to 3 significant digits equals the printed one (36.48M -> 36.5M, '
        '5.105G -> 5.11G).',
        f'known [n]: the printed value is not reproduced, for the reason given (footnote [n] under the table); the '
        f'table file pins the value we measure, which must stay within {PIN_TOLERANCE:.1%} of the pin, and the '
        f"row's other column must still match.",
        'FAIL: anything else; the run then exits with status 1.',
        f'One table: python -m benchmarks complexity --table ID (IDs: {ids}).',
        *([f'Tables that print no #P/#F ({others}): python -m benchmarks accuracy --tables ID evaluates their '
           f'accuracy columns.'] if others else []),
        'Every table, with what it prints: python -m benchmarks complexity --list.',
    ])


def _num(v: Optional[float], nd: int) -> str:
    return '-' if v is None else f'{v:.{nd}f}'


def _sig3(v: Optional[float]) -> str:
    return '-' if v is None else f'{v:#.3g}'.rstrip('.')


def render(report: List[Dict[str, Any]]) -> str:
    """Markdown tables: printed and measured #P/#F with their differences, the verdict, and footnotes."""
    lines = []
    for table in report:
        marks = {key: i + 1 for i, key in enumerate(table['footnotes'])}
        lines += [f"### {table['title']}", f"`{table['id']}`; source: {table['source']}", '',
                  '| row | model | #P printed | #P measured | diff | #F printed | #F measured | diff | check |',
                  '|---|---|---:|---:|---:|---:|---:|---:|---|']
        for r in table['rows']:
            cells = []
            for col, (_, unit) in COMPLEXITY_COLUMNS.items():
                c = r['columns'].get(col)
                nd = 2 if col == 'params_m' else 3
                cells += ['-', '-', '-'] if c is None else [
                    f"{_sig3(c['printed'])}{unit}", f"{_num(c['measured'], nd)}{unit}", f"{100 * c['rel_diff']:+.1f}%"]
            checks = []
            for col, c in r['columns'].items():
                if c['status'] == 'known':
                    mark = f" [{marks[c['footnote']]}]" if c.get('footnote') else ''
                    checks.append(f"{COMPLEXITY_COLUMNS[col][0]} known: {c['note']}{mark}")
            checks += [f'FAIL {p}' for p in r['problems']]
            if r.get('earlier_printed'):
                e = r['earlier_printed']
                checks.append('earlier printed ' + ', '.join(
                    f'{_sig3(e[c])}{u}' for c, (_, u) in COMPLEXITY_COLUMNS.items() if c in e) + f" ({e['source']})")
            lines.append(f"| {r['label']} | {r['model']} | " + ' | '.join(cells) + ' | '
                         + ('; '.join(checks) or 'match') + ' |')
            if r.get('corrected'):
                c = r['corrected']
                args = ', '.join(f'{k}={v}' for k, v in c['model_args'].items())
                lines.append(f"| ↳ corrected: {args} | | | {_num(c['measured']['params_m'], 2)}M | | | "
                             f"{_num(c['measured']['macs_g'], 3)}G | | {'match' if c['match'] else 'FAIL'} |")
        if marks:
            lines.append('')
            lines += [f'[{n}] {table["footnotes"][key].strip()}' for key, n in marks.items()]
        lines.append('')
    return '\n'.join(lines)


def summary(report: List[Dict[str, Any]], seconds: float) -> str:
    """One line: rows measured, how many match, are pinned known discrepancies, fail; and the time taken."""
    rows = [r for t in report for r in t['rows']]
    count = {s: sum(r['status'] == s for r in rows) for s in ('ok', 'known', 'fail')}
    known_cols = sum(c['status'] == 'known' for r in rows for c in r['columns'].values())
    return (f"{len(rows)} rows of {len(report)} tables measured: {count['ok']} match the printed #P/#F, "
            f"{count['known']} differ as documented ({known_cols} pinned columns), {count['fail']} fail; "
            f'{seconds:.1f} s')


def no_complexity_note(table_id: str) -> str:
    """What to say when a table that prints no #P/#F is selected for this benchmark."""
    return (f'{table_id} prints no #P/#F; `python -m benchmarks accuracy --tables {table_id}` evaluates its '
            f'accuracy columns')


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(
        prog='python -m benchmarks complexity', description=__doc__.split('\n')[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=tables_epilog("Only those with #P/#F are measured here; 'python -m benchmarks accuracy' "
                              'evaluates the accuracy columns.'))
    parser.add_argument('--table', action='append', metavar='ID',
                        help='table id to reprint (repeatable; listed below and by --list); default: every table '
                             'that prints #P/#F')
    parser.add_argument('--json', type=Path, help='also write the full report as JSON here')
    parser.add_argument('--list', action='store_true', help='list the table ids, their columns and titles, and stop')
    args = parser.parse_args(argv)
    start = time.perf_counter()
    try:
        every_table = load_tables()
        tables = load_tables(args.table)
    except TableError as e:
        print(e, file=sys.stderr)
        return 2
    if args.list:
        print(describe_tables(tables))
        return 0
    if args.table:
        for table in tables:
            if not prints_complexity(table):
                print(no_complexity_note(table['id']), file=sys.stderr)
        if not any(prints_complexity(t) for t in tables):
            print('Nothing measured: the selected tables print no #P/#F.', file=sys.stderr)
            return 2
    report = build_report(tables)
    print(legend(every_table), '', render(report), sep='\n')
    print(summary(report, time.perf_counter() - start))
    if args.json:
        write_text(json.dumps(report, indent=1), args.json)
    return 1 if any(r['status'] == 'fail' for t in report for r in t['rows']) else 0


if __name__ == '__main__':
    sys.exit(main())
