"""Reprints the papers' tables with the measured #P and #F beside the printed ones.

    python -m benchmarks complexity [--table ID ...] [--json OUT] [--verify-torchprofile]

#P is the parameter count and #F the MACs of one 3x32x32 (or the row's input size) eval forward,
counted in torchprofile's convention by :mod:`robust_resnets.complexity` on the ``meta`` device.
A printed value "matches" when the measured one, rounded to the printed precision, equals it.
``--verify-torchprofile`` also runs ``torchprofile.profile_macs`` on a real CPU forward for rows
under 2 GMACs, to show the meta counter agrees with the library.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any, Dict, Iterable, List, Optional

import torch
import yaml

from robust_resnets.files import write_text

TABLES_DIR = Path(__file__).resolve().parent / 'tables'


def load_tables(ids: Optional[Iterable[str]] = None) -> List[Dict[str, Any]]:
    """All tables of ``benchmarks/tables/*.yaml`` (optionally only those with the given ids)."""
    tables = []
    for path in sorted(TABLES_DIR.glob('*.yaml')):
        doc = yaml.safe_load(path.read_text())
        for table in doc.get('tables', []):
            table['file'] = path.name
            tables.append(table)
    if ids:
        wanted = set(ids)
        unknown = wanted - {t['id'] for t in tables}
        if unknown:
            raise SystemExit(f'Unknown table id(s) {sorted(unknown)}; known: {[t["id"] for t in tables]}')
        tables = [t for t in tables if t['id'] in wanted]
    return tables


def printed_matches(measured: float, printed: float) -> bool:
    """True when ``measured`` rounded to 3 significant digits (the papers' precision: 36.5M, 5.20G, 267M)
    equals the printed value."""
    return float(f'{measured:.3g}') == float(printed)


def measure_row(row: Dict[str, Any], cache: Dict[str, Dict[str, float]]) -> Dict[str, float]:
    """Parameters (M) and MACs (G) of a table row's model, built on ``meta``."""
    import robust_resnets  # noqa: F401  (registers the models)
    from robust_resnets.complexity import count_macs, count_params, create_for_counting

    key = json.dumps([row['model'], row.get('model_args', {}), row.get('input_size')], sort_keys=True)
    if key not in cache:
        model = create_for_counting(row['model'], **row.get('model_args', {}))
        size = tuple(row.get('input_size') or model.pretrained_cfg.get('input_size', (3, 32, 32)))
        cache[key] = {'params_m': count_params(model) / 1e6, 'macs_g': count_macs(model, input_size=size) / 1e9}
    return cache[key]


def verify_with_torchprofile(row: Dict[str, Any], macs_g: float) -> Optional[float]:
    """Relative difference between the meta counter and torchprofile on a real forward (small rows only)."""
    import timm
    from torchprofile import profile_macs

    if macs_g > 2.0:
        return None
    model = timm.create_model(row['model'], **row.get('model_args', {})).eval()
    size = tuple(row.get('input_size') or model.pretrained_cfg.get('input_size', (3, 32, 32)))
    ref = profile_macs(model, torch.rand(1, *size)) / 1e9
    return (macs_g - ref) / ref


def build_report(tables: List[Dict[str, Any]], *, verify: bool = False) -> List[Dict[str, Any]]:
    """Measured vs printed #P/#F for every row that has a registered model."""
    import timm

    import robust_resnets  # noqa: F401

    cache: Dict[str, Dict[str, float]] = {}
    report = []
    for table in tables:
        rows = []
        for row in table['rows']:
            printed = row['printed']
            entry = {'label': row['label'], 'model': row['model'], 'printed': printed,
                     'known_discrepancy': row.get('known_discrepancy')}
            if not timm.is_model(row['model']):
                entry['status'] = f"model '{row['model']}' is not registered yet"
                rows.append(entry)
                continue
            measured = measure_row(row, cache)
            entry['measured'] = measured
            for col in ('params_m', 'macs_g'):
                if printed.get(col) is not None:
                    entry[f'{col}_rel_diff'] = (measured[col] - printed[col]) / printed[col]
                    entry[f'{col}_match'] = printed_matches(measured[col], printed[col])
            if row.get('corrected_model_args'):
                fixed = measure_row(dict(row, model_args=row['corrected_model_args']), cache)
                entry['corrected'] = {'model_args': row['corrected_model_args'], 'measured': fixed, 'match': all(
                    printed_matches(fixed[c], printed[c]) for c in ('params_m', 'macs_g') if printed.get(c) is not None)}
            if verify:
                entry['torchprofile_rel_diff'] = verify_with_torchprofile(row, measured['macs_g'])
            rows.append(entry)
        report.append({'id': table['id'], 'title': table['title'], 'source': table['source'], 'rows': rows})
    return report


def _fmt(v: Optional[float], nd: int = 2) -> str:
    return '-' if v is None else f'{v:.{nd}f}'


def _sig3(v: Optional[float]) -> str:
    return '-' if v is None else f'{v:#.3g}'.rstrip('.')


def render(report: List[Dict[str, Any]]) -> str:
    """Markdown tables: label, printed and measured #P/#F, relative differences."""
    lines = []
    for table in report:
        lines += [f"### {table['title']}", f"source: {table['source']}", '',
                  '| row | model | #P printed | #P measured | diff | #F printed | #F measured | diff | |',
                  '|---|---|---:|---:|---:|---:|---:|---:|---|']
        for r in table['rows']:
            p = r['printed']
            if 'measured' not in r:
                lines.append(f"| {r['label']} | {r['model']} | {_sig3(p.get('params_m'))}M | - | - "
                             f"| {_sig3(p.get('macs_g'))}G | - | - | {r['status']} |")
                continue
            m = r['measured']
            ok = r.get('params_m_match', True) and r.get('macs_g_match', True)
            note = 'ok' if ok else (f"known discrepancy: {r['known_discrepancy']}" if r['known_discrepancy']
                                    else 'MISMATCH, unexplained')
            if r.get('torchprofile_rel_diff') is not None:
                note += f" (torchprofile {r['torchprofile_rel_diff']:+.1e})"
            lines.append(
                f"| {r['label']} | {r['model']} | {_sig3(p.get('params_m'))}M | {_fmt(m['params_m'])}M "
                f"| {_fmt(100 * r.get('params_m_rel_diff', 0), 1)}% | {_sig3(p.get('macs_g'))}G "
                f"| {_fmt(m['macs_g'], 3)}G | {_fmt(100 * r.get('macs_g_rel_diff', 0), 1)}% | {note} |")
            if r.get('corrected'):
                c = r['corrected']
                lines.append(f"| ↳ corrected {c['model_args']} | | | {_fmt(c['measured']['params_m'])}M | | "
                             f"| {_fmt(c['measured']['macs_g'], 3)}G | | {'ok' if c['match'] else 'MISMATCH'} |")
        lines.append('')
    return '\n'.join(lines)


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog='python -m benchmarks complexity', description=__doc__.split('\n')[0])
    parser.add_argument('--table', action='append', help='table id to reprint (repeatable); default all')
    parser.add_argument('--json', type=Path, help='also write the full report as JSON here')
    parser.add_argument('--verify-torchprofile', action='store_true',
                        help='cross-check MACs with torchprofile on real forwards of rows under 2 GMACs')
    args = parser.parse_args(argv)
    start = time.perf_counter()
    report = build_report(load_tables(args.table), verify=args.verify_torchprofile)
    print(render(report))
    rows = [r for t in report for r in t['rows'] if 'measured' in r]
    bad = [r for r in rows if not (r.get('params_m_match', True) and r.get('macs_g_match', True))]
    unexplained = [r for r in bad if not r['known_discrepancy']]
    print(f'{len(rows)} rows measured, {len(rows) - len(bad)} match the printed #P/#F, {len(bad)} do not '
          f'({len(bad) - len(unexplained)} documented as known discrepancies, {len(unexplained)} unexplained); '
          f'{time.perf_counter() - start:.1f} s')
    if args.json:
        write_text(json.dumps(report, indent=1), args.json)
    return 1 if unexplained else 0


if __name__ == '__main__':
    sys.exit(main())
