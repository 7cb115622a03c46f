"""``python -m benchmarks accuracy``: the papers' accuracy columns, printed vs measured.

Every row of ``benchmarks/tables/*.yaml`` with printed accuracies and a ``weights:`` field (a weights manifest
name) is evaluated with :func:`robust_resnets.evaluation.evaluate` when its weights are available: published
on the Hub, shipped in the package, or ``<weights-dir>/<name>.safetensors``. Rows that refer to the same
weights with the same evaluation (dataset, resolution, threat model, eps, number of test images) share one
evaluation and are each compared against it, e.g. a README row and the RobustBench row of one checkpoint.

A printed ``aa`` column is evaluated with the AutoAttack its table's ``evaluation.aa_attack`` names (default ``aa``,
standard AutoAttack, RobustBench's; Huang et al.'s README tables ran ``aa:apgd-ce+apgd-t``). A printed accuracy
counts as reproduced when the measured one is within the tolerance of :func:`tolerance_pp`:
``--tolerance`` percentage points (default 0.5) on the paper's full test set, widened by two standard errors
of the subset's accuracy when ``--n-examples`` evaluates fewer images. A row that cannot be evaluated (no
weights, no data folder given, a file that does not load) gets a one-line reason; the others still run.
``--list`` prints the evaluations the run would do.
"""
from __future__ import annotations

import argparse
import fnmatch
import math
import sys
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

from benchmarks.paper_tables import ACCURACY_COLUMNS, TableError, load_tables, tables_epilog

#: default half-width, in percentage points, of "reproduced" on the full test set
TOLERANCE_PP = 0.5


def accuracy_rows(tables: List[Dict[str, Any]]) -> List[Dict[str, Any]]:
    """The rows of ``tables`` that print accuracies, each with the evaluation settings of its table.

    Args:
        tables: Tables from :func:`benchmarks.paper_tables.load_tables`.

    Returns:
        One dict per row: ``table``, ``label``, ``weights`` (manifest name or None), ``dataset``,
        ``threat_model``, ``eps``, ``n_examples``, ``resolution``, ``crop_pct``, ``interpolation``,
        ``printed`` (accuracy columns only, in percent) and ``attacks`` (printed column -> the attack that
        evaluates it, as :func:`robust_resnets.evaluation.evaluate` names it: ``aa`` from the table's
        ``evaluation.aa_attack``).
    """
    rows = []
    for table in tables:
        ev = table['evaluation']
        for row in table['rows']:
            printed = {c: float(v) for c, v in row['printed'].items() if c in ACCURACY_COLUMNS}
            if not printed:
                continue
            rows.append({'table': table['id'], 'label': row['label'], 'weights': row['weights'],
                         'dataset': table['dataset'], 'threat_model': table['threat_model'], 'eps': str(table['eps']),
                         'n_examples': ev['n_examples'], 'resolution': row.get('resolution', ev.get('resolution')),
                         'crop_pct': ev.get('crop_pct'), 'interpolation': ev.get('interpolation'),
                         'printed': printed,
                         'attacks': {c: ev.get('aa_attack', 'aa') if c == 'aa' else c for c in printed}})
    return rows


def evaluation_key(row: Dict[str, Any], *, n_examples: Optional[int] = None) -> Tuple[Any, ...]:
    """What makes two rows' evaluations the same: weights, dataset, preprocessing, threat model, eps, images."""
    return (row['weights'], row['dataset'], row['resolution'], row['crop_pct'], row['interpolation'],
            row['threat_model'], row['eps'], min(n_examples or row['n_examples'], row['n_examples']))


def plan_evaluations(rows: List[Dict[str, Any]], *,
                     n_examples: Optional[int] = None) -> Dict[Tuple[Any, ...], List[Dict[str, Any]]]:
    """Groups the rows that have weights by :func:`evaluation_key`: one evaluation per group."""
    groups: Dict[Tuple[Any, ...], List[Dict[str, Any]]] = {}
    for row in rows:
        if row['weights'] is not None:
            groups.setdefault(evaluation_key(row, n_examples=n_examples), []).append(row)
    return groups


def tolerance_pp(*, printed: float, n_evaluated: int, n_full: int, base: float = TOLERANCE_PP) -> float:
    """Largest |measured - printed| (percentage points) that still counts as reproduced.

    Args:
        printed: The paper's accuracy, in percent.
        n_evaluated: Test images we evaluated (the first ones of the paper's test set).
        n_full: Test images behind the printed figure.
        base: Tolerance on the full test set.

    Returns:
        ``base`` plus two standard errors of the accuracy of ``n_evaluated`` images drawn from ``n_full``
        (zero when all are evaluated).
    """
    p = min(max(printed / 100, 0.0), 1.0)
    n = min(n_evaluated, n_full)
    if n >= n_full or n_full < 2:
        return base
    return base + 2 * 100 * math.sqrt(p * (1 - p) / n * (n_full - n) / (n_full - 1))


def find_weights(name: str, weights_dir: Optional[Path]) -> Dict[str, Any]:
    """Where to load ``name`` from: ``{'file': local file or None, 'available': bool, 'why': reason if not}``."""
    from robust_resnets.weights import get_weights

    local = weights_dir / f'{name}.safetensors' if weights_dir is not None else None
    if local is not None and local.is_file():
        return {'file': local, 'available': True, 'why': None}
    try:
        weights = get_weights(name)
    except KeyError as e:
        return {'file': None, 'available': False, 'why': e.args[0]}
    if weights.published or weights.package_file:  # on the Hub, or shipped inside the package
        return {'file': None, 'available': True, 'why': None}
    where = f' and no {local}' if local is not None else ' (pass --weights-dir with <name>.safetensors)'
    return {'file': None, 'available': False, 'why': f'weights not published{where}'}


def _evaluate_group(rows: List[Dict[str, Any]], weights: Dict[str, Any], args: argparse.Namespace,
                    device: Any) -> Tuple[Any, Dict[str, float], int, Optional[Dict[str, Any]]]:
    """Runs one evaluation: (result, accuracy per attack name in percent, images evaluated, preprocessing).

    The attacks are the union of the rows' (``row['attacks']``), so that rows of one checkpoint whose ``aa``
    columns ran different AutoAttacks each get theirs.
    """
    from robust_resnets.evaluation import evaluate
    from robust_resnets.evaluation.results import parse_eps
    from robust_resnets.evaluation.sources import load_dataset, load_model

    first = rows[0]
    data_dir = args.imagenet_dir if first['dataset'] == 'imagenet' else args.data_dir
    n = min(args.n_examples or first['n_examples'], first['n_examples'])
    model = load_model(first['weights'], dataset=first['dataset'], checkpoint=weights['file'], device=device)
    cfg = getattr(model, 'pretrained_cfg', None) or {}
    for key in ('crop_pct', 'interpolation'):
        if first[key] is not None and cfg.get(key) != first[key]:
            raise ValueError(f"{first['weights']} is preprocessed with {key}={cfg.get(key)!r}, but the paper "
                             f"evaluated with {first[key]!r}; fix the manifest entry's {key} or the table's "
                             f"evaluation.{key}")
    images, labels, prep = load_dataset(first['dataset'], data_dir=data_dir, n_examples=n, model=model,
                                        resolution=first['resolution'])
    attacks = list(dict.fromkeys(['clean', *(a for r in rows for a in r['attacks'].values())]))
    result = evaluate(model, images, labels, attacks=attacks, eps=parse_eps(first['eps']),
                      norm=first['threat_model'], batch_size=args.batch_size, device=device)
    return result, {c: 100 * result.accuracy[c] for c in attacks}, len(labels), prep


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(
        prog='python -m benchmarks accuracy', description=__doc__.splitlines()[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=tables_epilog("--tables selects among these ids; 'python -m benchmarks complexity' measures "
                              'the #P/#F columns.'))
    parser.add_argument('--tables', default='*', metavar='PATTERN',
                        help="table id, or an fnmatch pattern of ids such as 'singh2023_*' (listed below); "
                             'default: all')
    parser.add_argument('--data-dir', default=None,
                        help='CIFAR-10/100 folder (torchvision files, an ImageFolder or the .tar.gz); no default: '
                             'CIFAR rows are skipped without it. A relative path is relative to the current folder')
    parser.add_argument('--imagenet-dir', default=None,
                        help='ImageNet root (val/<wnid>/*.JPEG or its archive); no default: ImageNet rows are '
                             'skipped without it')
    parser.add_argument('--weights-dir', type=Path, default=None, help='folder with <manifest name>.safetensors files')
    parser.add_argument('--n-examples', type=int, default=None,
                        help="first N test images (default: the paper's, 10000 on CIFAR, 5000 on ImageNet)")
    parser.add_argument('--tolerance', type=float, default=TOLERANCE_PP,
                        help=f'reproduced: |ours - paper| within this many points on the full test set, plus two '
                             f'standard errors on fewer images (default {TOLERANCE_PP})')
    parser.add_argument('--batch-size', type=int, default=None)
    parser.add_argument('--device', default=None)
    parser.add_argument('--out-dir', type=Path, default=None, help='write one results JSON per evaluation here')
    parser.add_argument('--list', action='store_true', help='print the evaluations the run would do, and stop')
    args = parser.parse_args(argv)
    if args.n_examples is not None and args.n_examples < 1:
        parser.error('--n-examples must be positive')

    try:
        every_table = load_tables()
    except TableError as e:
        print(e, file=sys.stderr)
        return 2
    selected = [t for t in every_table if fnmatch.fnmatch(t['id'], args.tables)]
    if not selected:
        print(f"No table id matches {args.tables!r}; known: {[t['id'] for t in every_table]} "
              f'(python -m benchmarks accuracy --help describes them).', file=sys.stderr)
        return 2
    rows = accuracy_rows(selected)
    if not rows:
        print(f"{', '.join(t['id'] for t in selected)}: no printed accuracies; `python -m benchmarks complexity "
              f"--table ID` measures their #P/#F.", file=sys.stderr)
        return 2
    width = max(len(r['label']) for r in rows)
    head = f"{'table':28s} {'row':{width}s} {'column':7s} {'paper':>6s} {'ours':>6s} {'diff':>6s} {'tol':>5s}"
    print(head)
    stats = {'evaluations': 0, 'reproduced': 0, 'differ': 0, 'skipped': 0, 'errors': 0}
    for row in rows:
        if row['weights'] is None:
            print(f"{row['table']:28s} {row['label']:{width}s} skipped: no released weights in the manifest")
            stats['skipped'] += 1

    groups = plan_evaluations(rows, n_examples=args.n_examples)
    device = None
    for key, group in groups.items():
        name, dataset = key[0], key[1]
        prefix = [f"{r['table']:28s} {r['label']:{width}s}" for r in group]
        weights = find_weights(name, args.weights_dir)
        data_dir = args.imagenet_dir if dataset == 'imagenet' else args.data_dir
        why = weights['why'] or (None if data_dir else
                                 f"no {'--imagenet-dir' if dataset == 'imagenet' else '--data-dir'} given")
        if args.list or why:
            for p in prefix:
                print(f"{p} {name}: " + (f'skipped: {why}' if why else f'would evaluate {key[-1]} images'))
            stats['skipped'] += 0 if args.list else len(group)
            continue
        if device is None:
            import torch

            device = torch.device(args.device or ('cuda' if torch.cuda.is_available() else 'cpu'))
        try:
            result, measured, n, prep = _evaluate_group(group, weights, args, device)
        except Exception as e:  # one row's broken file or data must not stop the others
            for p in prefix:
                print(f'{p} {name}: error: {type(e).__name__}: {e}')
            stats['errors'] += len(group)
            continue
        stats['evaluations'] += 1
        for row, p in zip(group, prefix):
            for col, paper in row['printed'].items():
                ours = measured[row['attacks'][col]]
                tol = tolerance_pp(printed=paper, n_evaluated=n, n_full=row['n_examples'], base=args.tolerance)
                ok = abs(ours - paper) <= tol
                stats['reproduced' if ok else 'differ'] += 1
                print(f"{p} {col:7s} {paper:6.2f} {ours:6.2f} {ours - paper:+6.2f} {tol:5.2f} "
                      f"{'reproduced' if ok else 'DIFFERS'}")
        if args.out_dir:
            from robust_resnets.evaluation.results import result_to_dict, write_json

            data = result_to_dict(result, model=name, dataset=dataset, preprocessing=prep, data_source=data_dir,
                                  checkpoint=weights['file'] and str(weights['file']), extra={'benchmark_rows': [
                                      {k: r[k] for k in ('table', 'label', 'printed', 'attacks')} for r in group]})
            write_json(data, args.out_dir / f"{name}{f'_{key[2]}px' if key[2] else ''}_n{n}.json")
    print(f"{len(rows)} rows with printed accuracies, {len(groups)} distinct evaluations of released weights; "
          f"{stats['evaluations']} run: {stats['reproduced']} printed figures reproduced, {stats['differ']} differ; "
          f"{stats['skipped']} rows skipped, {stats['errors']} rows failed")
    return 1 if stats['errors'] else 0


if __name__ == '__main__':
    sys.exit(main())
