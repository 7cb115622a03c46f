"""Leaderboards from results files: our measurements beside RobustBench's reported numbers."""
from __future__ import annotations

import html
from pathlib import Path
from typing import Any, Dict, List, Sequence, Union

from .results import full_test_set, read_results

__all__ = ['leaderboard_rows', 'render_markdown', 'render_html']

COLUMNS = ('model', 'dataset', 'threat model', 'n', 'clean', 'attacks', 'worst case', 'AutoAttack',
           'RobustBench clean', 'RobustBench AA', 'delta AA')
#: What the columns mean, printed under the table.
NOTE = ("Accuracies in %. attacks: every attack run other than clean and standard AutoAttack, by its name (custom "
        "AutoAttack lists as aa:<attack>+..., aa-plus, aa-rand). worst case: per example, correct under every attack "
        "in the attacks and AutoAttack columns, so it can be below each of them. AutoAttack: the standard version "
        "(aa), the one RobustBench reports. RobustBench columns: RobustBench's numbers for the same model; "
        "delta AA = ours - RobustBench, in points. (subset): on fewer or other images than the test set RobustBench "
        "reports on (all 10,000 for CIFAR-10/100, its 5,000 validation images for ImageNet), so the numbers carry "
        "sampling error and delta AA compares different images.")


def _pct(x) -> str:
    return '-' if x is None else f'{100 * x:.2f}'


def _weights_note(data: Dict[str, Any]) -> str:
    if data.get('random_init'):
        return ' (random init)'
    checkpoint = data['model'].get('checkpoint')
    return f' (checkpoint {Path(checkpoint).name})' if checkpoint else ''


def leaderboard_rows(paths: Sequence[Union[str, Path]]) -> List[Dict[str, str]]:
    """One row per results file, sorted by dataset, norm, eps, then worst-case accuracy (best first).

    The model column names the checkpoint file, or says "random init", when the weights are not a
    pretrained tag's. Every attack of a file is shown: the AutoAttack column holds standard AutoAttack,
    and the attacks column every other attack (other AutoAttack versions and custom lists included) as
    "name accuracy", so that the worst case is over the attacks the row shows. A row evaluated on a
    subset of the test set RobustBench reports on says "(subset)" in the n column and after its delta AA.
    """
    rows = []
    for path in paths:
        data = read_results(path)
        aa_name = next((name for name, a in data['attacks'].items() if a['settings'].get('kind') == 'autoattack'
                        and a['settings'].get('version') == 'standard'), None)
        others = ', '.join(f'{name} {_pct(a["accuracy"])}' for name, a in data['attacks'].items()
                           if a['settings'].get('kind') != 'clean' and name != aa_name)
        reported = data.get('robustbench_reported') or {}
        if reported.get('eps') != data['threat_model']['eps_text']:
            reported = {}  # reported at another radius: not comparable
        rb_aa = float(reported['autoattack_acc']) if reported.get('autoattack_acc') else None
        aa_acc = data['attacks'][aa_name]['accuracy'] if aa_name else None
        d = data['data']
        full = full_test_set(dataset=d['dataset'], n_examples=d['n_examples'], split=d.get('split', 'test'),
                             preprocessing=d.get('preprocessing'))
        subset = ' (subset)' if full is False else ''
        rows.append({
            'model': data['model']['name'] + _weights_note(data),
            'dataset': data['data']['dataset'],
            'threat model': f"{data['threat_model']['norm']} {data['threat_model']['eps_text']}",
            'n': f"{d['n_examples']}{subset}",
            'clean': _pct(data['clean_accuracy']),
            'attacks': others or '-',
            'worst case': _pct(data['robust_accuracy']),
            'AutoAttack': _pct(aa_acc),
            'RobustBench clean': reported.get('clean_acc') or '-',
            'RobustBench AA': reported.get('autoattack_acc') or '-',
            'delta AA': f'{100 * aa_acc - rb_aa:+.2f}{subset}' if aa_acc is not None and rb_aa is not None else '-',
            '_sort': (data['data']['dataset'], data['threat_model']['norm'], data['threat_model']['eps'],
                      -(data['robust_accuracy'] or 0.0)),
        })
    rows.sort(key=lambda r: r['_sort'])
    for r in rows:
        del r['_sort']
    return rows


def render_markdown(rows: List[Dict[str, Any]]) -> str:
    """A Markdown table, followed by what its columns mean."""
    lines = ['| ' + ' | '.join(COLUMNS) + ' |', '|' + '|'.join('---' for _ in COLUMNS) + '|']
    lines += ['| ' + ' | '.join(r[c].replace('|', '\\|') for c in COLUMNS) + ' |' for r in rows]
    return '\n'.join(lines) + '\n\n' + NOTE + '\n'


def render_html(rows: List[Dict[str, Any]], *, title: str = 'robust-resnets leaderboard') -> str:
    """A standalone HTML page with the same table and note."""
    head = ''.join(f'<th>{html.escape(c)}</th>' for c in COLUMNS)
    body = '\n'.join('<tr>' + ''.join(f'<td>{html.escape(r[c])}</td>' for c in COLUMNS) + '</tr>' for r in rows)
    return (f'<!DOCTYPE html>\n<html><head><meta charset="utf-8"><title>{html.escape(title)}</title>\n'
            '<style>table{border-collapse:collapse}td,th{border:1px solid #ccc;padding:4px 8px;text-align:right}'
            'td:first-child{text-align:left}</style></head>\n'
            f'<body><h1>{html.escape(title)}</h1>\n<p>{html.escape(NOTE)}</p>\n'
            f'<table><thead><tr>{head}</tr></thead>\n<tbody>\n{body}\n</tbody></table></body></html>\n')
