"""The papers' tables, ``benchmarks/tables/*.yaml``: reading them and checking them against their schema.

The schema is described in ``benchmarks/tables/README.md``. :mod:`benchmarks.complexity` measures the tables'
#P/#F columns and :mod:`benchmarks.accuracy` their accuracy columns.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, Iterable, List, Mapping, Optional

import yaml

__all__ = ['TABLES_DIR', 'COMPLEXITY_COLUMNS', 'ACCURACY_COLUMNS', 'TableError', 'read_table_file', 'load_tables',
           'prints_complexity', 'describe_tables', 'tables_epilog']

TABLES_DIR = Path(__file__).resolve().parent / 'tables'
#: printed complexity columns: key -> (header, unit)
COMPLEXITY_COLUMNS = {'params_m': ('#P', 'M'), 'macs_g': ('#F', 'G')}
#: printed accuracy columns (percent), named as ``robust_resnets.evaluation.evaluate`` names the attacks
ACCURACY_COLUMNS = ('clean', 'pgd20', 'cw40', 'aa')
DATASETS = ('cifar10', 'cifar100', 'imagenet')

FILE_FIELDS = {'paper', 'sources', 'footnotes', 'tables'}
TABLE_FIELDS = {'id', 'title', 'source', 'dataset', 'threat_model', 'eps', 'training', 'columns', 'evaluation',
                'notes', 'rows'}
EVALUATION_FIELDS = {'n_examples', 'resolution', 'crop_pct', 'interpolation', 'aa_attack'}
ROW_FIELDS = {'label', 'model', 'model_args', 'weights', 'printed', 'source', 'input_size', 'resolution', 'epochs',
              'known_discrepancy', 'corrected_model_args', 'earlier_printed'}


class TableError(ValueError):
    """A table file that cannot be read or breaks the schema of ``benchmarks/tables/README.md``."""


def _is_num(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _check_row(row: Any, table: Mapping[str, Any], doc: Mapping[str, Any], where: str) -> List[str]:
    if not isinstance(row, dict):
        return [f'{where}: a row must be a mapping, got {type(row).__name__}']
    errors = []
    unknown = sorted(set(row) - ROW_FIELDS)
    if unknown:
        errors.append(f'{where}: unknown fields {unknown} (known: {sorted(ROW_FIELDS)})')
    missing = [k for k in ('label', 'model', 'weights', 'printed') if k not in row]
    if missing:
        errors.append(f"{where}: missing fields {missing} (write 'weights: null' for a row without released weights)")
        return errors
    if row['weights'] is not None and not (isinstance(row['weights'], str) and '.' in row['weights']):
        errors.append(f"{where}: weights must be a manifest name 'arch.tag' or null, got {row['weights']!r}")
    printed = row['printed']
    if not isinstance(printed, dict) or not printed:
        return errors + [f'{where}: printed must be a non-empty mapping of column -> number']
    for col, value in printed.items():
        if col not in table.get('columns', []):
            errors.append(f"{where}: printed column {col!r} is not in the table's columns {table.get('columns')}")
        if not _is_num(value):
            errors.append(f'{where}: printed {col} must be a number, got {value!r}')
    for key in ('model_args', 'corrected_model_args'):
        if key in row and not isinstance(row[key], dict):
            errors.append(f'{where}: {key} must be a mapping of keyword arguments')
    if 'source' in row and row['source'] not in doc['sources']:
        errors.append(f"{where}: source {row['source']!r} is not a key of the file's sources {sorted(doc['sources'])}")
    discrepancy = row.get('known_discrepancy') or {}
    if not isinstance(discrepancy, dict):
        return errors + [f'{where}: known_discrepancy must map a column to {{measured, note, footnote?}}']
    for col, d in discrepancy.items():
        if col not in COMPLEXITY_COLUMNS or col not in printed:
            errors.append(f'{where}: known_discrepancy names {col!r}; it must be a printed column among '
                          f'{sorted(COMPLEXITY_COLUMNS)}')
        if not isinstance(d, dict) or not _is_num(d.get('measured')) or not isinstance(d.get('note'), str) or \
                set(d) - {'measured', 'note', 'footnote'}:
            errors.append(f"{where}: known_discrepancy.{col} must be {{measured: <number we measure>, note: <short "
                          f"reason>, footnote: <key of footnotes, optional>}}, got {d!r}")
        elif 'footnote' in d and d['footnote'] not in doc.get('footnotes', {}):
            errors.append(f"{where}: footnote {d['footnote']!r} is not a key of the file's footnotes")
    if 'corrected_model_args' in row and not discrepancy:
        errors.append(f'{where}: corrected_model_args without known_discrepancy: if the printed configuration '
                      f'gives the printed figures, drop corrected_model_args')
    earlier = row.get('earlier_printed')
    if earlier is not None and not (isinstance(earlier, dict) and earlier.get('source') in doc['sources'] and all(
            k in printed and _is_num(v) for k, v in earlier.items() if k != 'source')):
        errors.append(f"{where}: earlier_printed must map printed columns to numbers plus 'source: <key of sources>'")
    return errors


def _check_aa_attack(name: Any, table: Mapping[str, Any], where: str) -> List[str]:
    """``evaluation.aa_attack``: an AutoAttack as ``robust-resnets eval --attacks`` names it, for a table with 'aa'."""
    from robust_resnets.attacks.spec import parse_attack

    if 'aa' not in (table.get('columns') or []):
        return [f"{where}: evaluation.aa_attack names the attack of the 'aa' column, which the table does not print"]
    try:
        spec = parse_attack(name, eps=0.0) if isinstance(name, str) else None
    except ValueError:
        spec = None
    if spec is None or spec.kind != 'autoattack':
        return [f"{where}: evaluation.aa_attack must name an AutoAttack as `robust-resnets eval --attacks` does "
                f"('aa', 'aa:apgd-ce+apgd-t', ...), got {name!r}"]
    if spec.name != name:  # results are keyed by the normalised name
        return [f"{where}: write evaluation.aa_attack as {spec.name!r}, the name its results carry, not {name!r}"]
    return []


def _check_table(table: Any, doc: Mapping[str, Any], where: str) -> List[str]:
    if not isinstance(table, dict):
        return [f'{where}: a table must be a mapping']
    where = f"{where} ({table.get('id', '?')})"
    errors = []
    unknown = sorted(set(table) - TABLE_FIELDS)
    if unknown:
        errors.append(f'{where}: unknown fields {unknown} (known: {sorted(TABLE_FIELDS)})')
    missing = [k for k in ('id', 'title', 'source', 'dataset', 'threat_model', 'eps', 'columns', 'evaluation', 'rows')
               if k not in table]
    if missing:
        return errors + [f'{where}: missing fields {missing}']
    if not str(table['id']).startswith(f"{doc['paper']['id']}_"):
        errors.append(f"{where}: id must start with the paper id '{doc['paper']['id']}_'")
    if table['source'] not in doc['sources']:
        errors.append(f"{where}: source {table['source']!r} is not a key of the file's sources "
                      f"{sorted(doc['sources'])}")
    if table['dataset'] not in DATASETS:
        errors.append(f"{where}: dataset must be one of {list(DATASETS)}, got {table['dataset']!r}")
    known = set(COMPLEXITY_COLUMNS) | set(ACCURACY_COLUMNS)
    if not isinstance(table['columns'], list) or not table['columns'] or set(table['columns']) - known:
        errors.append(f"{where}: columns must list some of {sorted(known)}, got {table['columns']!r}")
    ev = table['evaluation']
    if not isinstance(ev, dict) or set(ev) - EVALUATION_FIELDS or not isinstance(ev.get('n_examples'), int) or \
            ev['n_examples'] < 1:
        errors.append(f'{where}: evaluation must be {{n_examples: <test images the paper used>, resolution?, '
                      f'crop_pct?, interpolation?, aa_attack?}}, got {ev!r}')
    elif 'aa_attack' in ev:
        errors += _check_aa_attack(ev['aa_attack'], table, where)
    if not isinstance(table['rows'], list) or not table['rows']:
        return errors + [f'{where}: rows must be a non-empty list']
    for i, row in enumerate(table['rows']):
        label = row.get('label', '?') if isinstance(row, dict) else '?'
        errors += _check_row(row, table, doc, f'{where} row {i} ({label})')
    return errors


def read_table_file(path: Path) -> Dict[str, Any]:
    """Reads one table file and checks it against the schema of ``benchmarks/tables/README.md``.

    Args:
        path: A ``*.yaml`` table file.

    Returns:
        The file's mapping (``paper``, ``sources``, ``footnotes``, ``tables``), as written.

    Raises:
        TableError: The file is not valid YAML or breaks the schema; the message lists every problem.
    """
    try:
        doc = yaml.safe_load(path.read_text(encoding='utf-8'))
    except (OSError, yaml.YAMLError) as e:
        raise TableError(f'Cannot read table file {path}: {e}') from None
    if not isinstance(doc, dict):
        raise TableError(f'{path}: a table file is a mapping with {sorted(FILE_FIELDS)}; see '
                         f'benchmarks/tables/README.md.')
    errors = []
    unknown = sorted(set(doc) - FILE_FIELDS)
    if unknown:
        errors.append(f'unknown top-level fields {unknown} (known: {sorted(FILE_FIELDS)})')
    paper = doc.get('paper')
    if not isinstance(paper, dict) or not all(isinstance(paper.get(k), str) for k in ('id', 'title', 'arxiv')):
        errors.append("paper must be a mapping with string id, title and arxiv (e.g. arxiv: '2212.11005')")
    if not isinstance(doc.get('sources'), dict) or not doc['sources']:
        errors.append('sources must map a short key to where the numbers come from')
    if not isinstance(doc.get('footnotes', {}), dict):
        errors.append('footnotes must map a short key to a text')
    if not isinstance(doc.get('tables'), list) or not doc['tables']:
        errors.append('tables must be a non-empty list')
    if not errors:
        for i, table in enumerate(doc['tables']):
            errors += _check_table(table, doc, f'table {i}')
    if errors:
        raise TableError(f'{path} breaks the table schema (benchmarks/tables/README.md):\n  ' + '\n  '.join(errors))
    return doc


def load_tables(ids: Optional[Iterable[str]] = None, *, tables_dir: Path = TABLES_DIR) -> List[Dict[str, Any]]:
    """Every table of ``tables_dir/*.yaml``, checked, each with its file's context.

    Args:
        ids: Only these table ids (all when None).
        tables_dir: Folder of table files.

    Returns:
        The tables as written, each with ``file``, ``paper``, ``sources`` and ``footnotes`` of its file added.

    Raises:
        TableError: A file cannot be read or breaks the schema, two tables share an id, or an id is unknown.
    """
    paths = sorted(Path(tables_dir).glob('*.yaml'))
    if not paths:
        raise TableError(f'No table files (*.yaml) in {tables_dir}.')
    tables: List[Dict[str, Any]] = []
    for path in paths:
        doc = read_table_file(path)
        for table in doc['tables']:
            if any(t['id'] == table['id'] for t in tables):
                raise TableError(f"Table id {table['id']!r} of {path.name} is already used; ids must be unique.")
            tables.append(dict(table, file=path.name, paper=doc['paper'], sources=doc['sources'],
                               footnotes=doc.get('footnotes') or {}))
    if ids:
        wanted = list(dict.fromkeys(ids))
        unknown = [i for i in wanted if i not in {t['id'] for t in tables}]
        if unknown:
            raise TableError(f'Unknown table id(s) {unknown}; known: {[t["id"] for t in tables]} '
                             f'(python -m benchmarks complexity --list describes them)')
        tables = [t for t in tables if t['id'] in wanted]
    return tables


def prints_complexity(table: Mapping[str, Any]) -> bool:
    """Whether ``table`` prints a #P or #F column (what this benchmark measures)."""
    return bool(set(table['columns']) & set(COMPLEXITY_COLUMNS))


def describe_tables(tables: List[Dict[str, Any]]) -> str:
    """One line per table: its id, the columns it prints (#P/#F and accuracies) and its title."""
    width = max((len(t['id']) for t in tables), default=0)
    lines = []
    for t in tables:
        cols = (['#P/#F'] if prints_complexity(t) else []) + [c for c in t['columns'] if c in ACCURACY_COLUMNS]
        lines.append(f"  {t['id']:{width}s}  {' '.join(cols):25s} {t['title']}")
    return '\n'.join(lines)


def tables_epilog(command: str) -> str:
    """The ``--help`` epilog listing every table (read from the YAML files now)."""
    try:
        tables = load_tables()
    except TableError as e:
        return f'Cannot list the tables: {e}'
    return f'tables (benchmarks/tables/*.yaml): id, printed columns, title.\n{command}\n' + describe_tables(tables)
