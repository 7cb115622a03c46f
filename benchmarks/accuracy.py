"""``python -m benchmarks accuracy``: the papers' accuracy columns, printed vs measured.

Reads every table in ``benchmarks/tables/*.yaml``, finds each row's released weights (the weights
manifest entry ``<model>.<dataset>_<method>``, or the row's ``weights`` field), evaluates the rows whose
weights are available (published on the Hub, shipped in the package, or ``<weights-dir>/<name>.safetensors``) with
:func:`robust_resnets.evaluation.evaluate`, and prints paper vs measured with the difference. Rows
without weights say so. Meant for a GPU; its running time is not measured yet (no weights are
published so far). ``--n-examples`` shortens a run; ``--list`` only prints the rows and their weights.
"""
from __future__ import annotations

import argparse
import fnmatch
import sys
from pathlib import Path
from typing import Any, Dict, List, Optional

import yaml

TABLES_DIR = Path(__file__).resolve().parent / 'tables'
#: paper column -> our attack name
COLUMNS = {'clean': 'clean', 'pgd20': 'pgd20', 'cw40': 'cw40', 'aa': 'aa', 'autoattack': 'aa'}


def load_rows(tables_dir: Path = TABLES_DIR) -> List[Dict[str, Any]]:
    """Every table row with printed accuracies, normalised to: table, label, model, dataset, method, eps, printed."""
    rows: List[Dict[str, Any]] = []
    for path in sorted(tables_dir.glob('*.yaml')):
        doc = yaml.safe_load(path.read_text()) or {}
        tables = doc.get('tables') or [dict(doc, id=path.stem, rows=doc.get('rows', []))]
        for table in tables:
            for i, row in enumerate(table.get('rows', [])):
                printed = {COLUMNS[k]: float(v) for k, v in {**row.get('printed', {}), **row}.items()
                           if k in COLUMNS and isinstance(v, (int, float))}
                if not printed:
                    continue
                rows.append({
                    'table': table['id'], 'label': row.get('label') or row.get('name') or f'row {i}',
                    'model': row.get('model'), 'model_args': row.get('model_args') or {},
                    'dataset': row.get('dataset', table.get('dataset', doc.get('dataset'))),
                    'method': str(row.get('method', table.get('method', doc.get('method', '')))),
                    'eps': row.get('eps', table.get('eps', doc.get('eps'))),
                    'resolution': row.get('resolution'), 'weights': row.get('weights'), 'printed': printed,
                })
    return rows


def find_weights(row: Dict[str, Any], weights_dir: Optional[Path]) -> Dict[str, Any]:
    """{'name': manifest name or None, 'file': local file or None, 'available': bool, 'why': reason if not}."""
    from robust_resnets.weights import entries_for_architecture

    if row['model_args']:
        return {'name': None, 'file': None, 'available': False, 'why': 'configuration row (no released weights)'}
    name = row['weights']
    if name is None and row['model']:
        method, eps = row['method'], row['eps']
        found = [e for e in entries_for_architecture(row['model']) if e.dataset == row['dataset']
                 and (not method or e.tag.endswith(f'_{method}')) and (eps is None or e.eps == str(eps))]
        if len(found) == 1:
            name = found[0].name
    if name is None:
        return {'name': None, 'file': None, 'available': False, 'why': 'no weights in the manifest'}
    local = weights_dir / f'{name}.safetensors' if weights_dir is not None else None
    if local is not None and local.is_file():
        return {'name': name, 'file': local, 'available': True, 'why': None}
    from robust_resnets.weights import get_weights

    weights = get_weights(name)
    if weights.published or weights.package_file:  # on the Hub, or shipped inside the package
        return {'name': name, 'file': None, 'available': True, 'why': None}
    return {'name': name, 'file': None, 'available': False, 'why': 'weights not published'}


def _fmt(x: Optional[float]) -> str:
    return '-' if x is None else f'{x:.2f}'


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog='python -m benchmarks accuracy', description=__doc__.splitlines()[0])
    parser.add_argument('--tables', default='*', help='fnmatch filter on table ids (default: all)')
    parser.add_argument('--data-dir', default='../shared/data', help='dataset folder (CIFAR) or ImageNet root')
    parser.add_argument('--weights-dir', default=None, help='folder with <name>.safetensors files')
    parser.add_argument('--n-examples', type=int, default=None, help='first N test images (default: all)')
    parser.add_argument('--batch-size', type=int, default=None)
    parser.add_argument('--device', default=None)
    parser.add_argument('--out-dir', default=None, help='write one results JSON per evaluated row here')
    parser.add_argument('--list', action='store_true', help='print rows and weight availability only')
    args = parser.parse_args(argv)

    import torch

    from robust_resnets.evaluation import evaluate
    from robust_resnets.evaluation.results import parse_eps, result_to_dict, write_json
    from robust_resnets.evaluation.sources import load_dataset, load_model

    weights_dir = Path(args.weights_dir) if args.weights_dir else None
    rows = [r for r in load_rows() if fnmatch.fnmatch(r['table'], args.tables)]
    device = torch.device(args.device or ('cuda' if torch.cuda.is_available() else 'cpu'))
    width = max([len('row')] + [len(r['label']) for r in rows])  # labels are printed whole
    print(f"{'table':26s} {'row':{width}s} {'weights':36s} {'column':7s} {'paper':>7s} {'ours':>7s} {'diff':>7s}")
    evaluated = 0
    for row in rows:
        w = find_weights(row, weights_dir)
        head = f"{row['table']:26s} {row['label']:{width}s} {w['name'] or row['model'] or '-':36s}"
        if not w['available'] or args.list:
            print(f"{head} {'':7s} {'':>7s} {'':>7s} {'':>7s}  {w['why'] or 'available'}")
            continue
        model = load_model(w['name'], dataset=row['dataset'], checkpoint=w['file'], device=device)
        images, labels, prep = load_dataset(row['dataset'], data_dir=args.data_dir, n_examples=args.n_examples,
                                            model=model, resolution=row['resolution'])
        eps = parse_eps(row['eps']) if row['eps'] else (4 / 255 if row['dataset'] == 'imagenet' else 8 / 255)
        attacks = list(dict.fromkeys(['clean', *row['printed']]))
        result = evaluate(model, images, labels, attacks=attacks, eps=eps, batch_size=args.batch_size, device=device)
        evaluated += 1
        for col, paper in row['printed'].items():
            ours = 100 * result.accuracy[col]
            print(f'{head} {col:7s} {paper:7.2f} {ours:7.2f} {ours - paper:+7.2f}')
        if args.out_dir:
            data = result_to_dict(result, model=w['name'], dataset=row['dataset'], preprocessing=prep,
                                  data_source=args.data_dir, extra={'benchmark_row': {k: row[k] for k in (
                                      'table', 'label', 'printed')}})
            write_json(data, Path(args.out_dir) / f"{row['table']}__{w['name']}.json")
    print(f'{len(rows)} rows, {evaluated} evaluated', file=sys.stderr)
    return 0


if __name__ == '__main__':
    sys.exit(main())
