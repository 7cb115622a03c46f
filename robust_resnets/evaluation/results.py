"""Results files: our JSON schema for an evaluation, with a RobustBench ``model_info`` entry inside.

A results file holds the model, data and threat model, every attack with its settings, accuracy
and time (for AutoAttack: its version, attacks in order, and per attack the iterations, restarts,
target classes or queries its adversary was configured with), the per-example worst case, the run's environment, and under ``"robustbench"`` an entry in
RobustBench's ``model_info`` format (its field names; accuracies as percent strings with two
decimals, eps as RobustBench writes it, e.g. "8/255"). RobustBench reports on the full test set
(:data:`FULL_TEST_SET`), so that entry is written only for an evaluation of all of it; ``data.full_test_set``
says whether it was (false for a subset such as ``--n-examples 1000``), and ``notes`` how the model was adapted
(e.g. a stock timm model standardised in front).
"""
from __future__ import annotations

import datetime
import json
import math
import platform
from functools import lru_cache
from importlib import resources
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Union

from ..files import write_text
from .evaluate import EvaluationResult

__all__ = [
    'SCHEMA', 'MODEL_INFO_FIELDS', 'FULL_TEST_SET', 'full_test_set', 'result_to_dict', 'robustbench_model_info',
    'write_json', 'write_text', 'read_results',
    'reported_entries', 'find_reported', 'format_eps', 'parse_eps',
]

SCHEMA = 'robust-resnets/eval-result/1'
#: RobustBench's ModelInfo fields (robustbench.utils.ModelInfo), in its order.
MODEL_INFO_FIELDS = (
    'link', 'name', 'authors', 'additional_data', 'number_forward_passes', 'dataset', 'venue', 'architecture',
    'eps', 'clean_acc', 'reported', 'corruptions_acc', 'corruptions_acc_3d', 'corruptions_mce',
    'corruptions_mce_3d', 'autoattack_acc', 'footnote',
)
#: Test images behind RobustBench's numbers, per dataset (ImageNet: its 5,000-image validation subset).
FULL_TEST_SET = {'cifar10': 10000, 'cifar100': 10000, 'imagenet': 5000}


def full_test_set(*, dataset: str, n_examples: int, split: str = 'test',
                  preprocessing: Optional[Dict[str, Any]] = None) -> Optional[bool]:
    """Whether an evaluation covered the test set RobustBench reports on, so that it compares with RobustBench.

    Args:
        dataset: 'cifar10', 'cifar100', 'imagenet' or another name.
        n_examples: Images evaluated (the first ones of the test set).
        split: Data split.
        preprocessing: ImageNet's settings; its ``subset`` must be 'robustbench' (RobustBench's 5,000 images).

    Returns:
        True for all of :data:`FULL_TEST_SET`'s images, False for a subset (or other images), None for a
        dataset RobustBench does not list.
    """
    full = FULL_TEST_SET.get(dataset)
    if full is None:
        return None
    if split != 'test' or (preprocessing or {}).get('subset', 'robustbench') != 'robustbench':
        return False
    return n_examples >= full


def parse_eps(text: Union[str, float]) -> float:
    """'8/255' -> 0.0313..., '0.8/255' -> 0.00313..., '0.5' -> 0.5.

    Raises:
        ValueError: Not a finite number or a fraction of two numbers.
    """
    if isinstance(text, (int, float)):
        return float(text)
    try:
        top, _, bottom = text.strip().partition('/')
        value = float(top) / (float(bottom) if bottom else 1.0)
    except (ValueError, ZeroDivisionError):
        value = math.nan
    if not math.isfinite(value):
        raise ValueError(f"Bad eps '{text}'; give a number or a fraction such as 8/255.")
    return value


def format_eps(eps: float) -> str:
    """RobustBench's spelling: '8/255' when eps is below 1 and k/255 for a whole k, else the number ('0.5', '3')."""
    k = eps * 255
    if eps < 1 and abs(k - round(k)) < 1e-6 and round(k) > 0:
        return f'{round(k)}/255'
    return f'{eps:g}'


def _pct(x: Optional[float]) -> Optional[str]:
    return None if x is None else f'{100 * x:.2f}'


@lru_cache(maxsize=None)
def _reported() -> Dict[str, Any]:
    return json.loads(resources.files(__package__).joinpath('robustbench_reported.json').read_text())


def reported_entries() -> List[Dict[str, Any]]:
    """RobustBench's entries for the models this package ships: robustbench_id, dataset, threat_model, model_info."""
    return list(_reported()['entries'])


def find_reported(*, robustbench_id: Optional[str] = None, weights: Optional[str] = None,
                  dataset: Optional[str] = None, threat_model: Optional[str] = None,
                  eps: Optional[float] = None) -> Optional[Dict[str, Any]]:
    """RobustBench's entry by id, or the only one for published weights on a dataset and threat model.

    Args:
        robustbench_id: RobustBench's name for the model.
        weights: Pretrained weights as ``arch.tag`` (e.g. 'wrn_a4.cifar10_robustbench'), used when
            ``robustbench_id`` is None.
        dataset: Only entries for this dataset.
        threat_model: Only entries for this norm ('Linf', 'L2', 'L1').
        eps: Only entries reported at this radius (as :func:`format_eps` spells it).

    Returns:
        The entry (robustbench_id, dataset, threat_model, model_info), or None when none or several match.
    """
    entries = reported_entries()
    if robustbench_id is not None:
        ids = {robustbench_id}
    elif weights is not None:
        ids = set(_reported()['weights'].get(weights, ()))
    else:
        return None
    found = [e for e in entries if e['robustbench_id'] in ids
             and (dataset is None or e['dataset'] == dataset) and (threat_model is None or e['threat_model'] == threat_model)
             and (eps is None or e['model_info'].get('eps') == format_eps(eps))]
    return found[0] if len(found) == 1 else None


def robustbench_model_info(result: EvaluationResult, *, dataset: str, architecture: str,
                           robustbench_id: Optional[str] = None) -> Dict[str, Any]:
    """A RobustBench ``model_info`` entry for this evaluation.

    Paper fields (link, name, authors, venue, additional_data, reported) come from RobustBench's entry
    ``robustbench_id`` when it is given and reported on the same dataset and threat model (norm and
    eps); ``clean_acc`` and ``autoattack_acc`` are ours (``autoattack_acc`` only when AutoAttack
    standard ran). RobustBench's numbers are on the full test set: :func:`result_to_dict` writes this
    entry only for an evaluation of all of it (see :func:`full_test_set`).
    """
    known = find_reported(robustbench_id=robustbench_id, dataset=dataset, threat_model=result.norm,
                          eps=result.eps) if robustbench_id else None
    paper = dict(known['model_info']) if known else {}
    aa = [r for r in result.attacks.values() if r.spec.kind == 'autoattack' and r.spec.version == 'standard']
    info = {field: None for field in MODEL_INFO_FIELDS}
    info.update({k: paper.get(k) for k in ('link', 'name', 'authors', 'additional_data', 'venue', 'reported',
                                           'footnote')})
    info.update(
        number_forward_passes=1, dataset=dataset, architecture=paper.get('architecture', architecture),
        eps=format_eps(result.eps), clean_acc=_pct(result.clean_accuracy),
        autoattack_acc=_pct(aa[0].accuracy) if aa else None,
    )
    return {k: v for k, v in info.items() if v is not None}


def _versions() -> Dict[str, Optional[str]]:
    from importlib.metadata import PackageNotFoundError, version

    out: Dict[str, Optional[str]] = {'python': platform.python_version()}
    for pkg in ('robust-resnets', 'torch', 'timm', 'pyautoattack'):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            out[pkg] = None
    return out


def result_to_dict(result: EvaluationResult, *, model: str, dataset: str, architecture: Optional[str] = None,
                   tag: Optional[str] = None, checkpoint: Optional[str] = None, random_init: bool = False,
                   split: str = 'test', data_source: Optional[str] = None,
                   preprocessing: Optional[Dict[str, Any]] = None, robustbench_id: Optional[str] = None,
                   notes: Sequence[str] = (), extra: Optional[Dict[str, Any]] = None) -> Dict[str, Any]:
    """Our results JSON for an evaluation (see the module docstring).

    RobustBench's reported numbers are attached when RobustBench lists the model on the same dataset
    and threat model (norm and eps): the entry ``robustbench_id``, or else the entry for the pretrained
    tag's weights (not for a checkpoint or a random initialisation). Our own RobustBench entry
    (``"robustbench"``) is written only when the whole test set was evaluated (``data.full_test_set``);
    on a subset it is null, so that a subset's numbers do not pass for a RobustBench entry.

    Args:
        result: From :func:`robust_resnets.evaluation.evaluate`.
        model: Model name as given (timm name with optional .tag).
        dataset: 'cifar10', 'cifar100', 'imagenet' or another name.
        architecture: timm architecture (default: model without its tag).
        tag: Pretrained tag (default: the part of model after its first '.').
        checkpoint: Local checkpoint file the weights came from.
        random_init: The model kept its random initialisation (recorded as ``"random_init": true``).
        split: Data split.
        data_source: Where the data came from.
        preprocessing: Resize/crop settings, for ImageNet.
        robustbench_id: RobustBench's name for the model, for its reported numbers.
        notes: How the model was adapted for the evaluation (from
            :func:`~robust_resnets.evaluation.sources.model_notes`).
        extra: More top-level fields.
    """
    architecture = architecture or model.split('.')[0]
    tag = tag or model.partition('.')[2] or None
    pretrained = tag is not None and checkpoint is None and not random_init
    known = find_reported(robustbench_id=robustbench_id, weights=f'{architecture}.{tag}' if pretrained else None,
                          dataset=dataset, threat_model=result.norm, eps=result.eps)
    full = full_test_set(dataset=dataset, n_examples=result.n_examples, split=split, preprocessing=preprocessing)
    out: Dict[str, Any] = {
        'schema': SCHEMA,
        'model': {'name': model, 'architecture': architecture, 'tag': tag, 'checkpoint': checkpoint,
                  'robustbench_id': known['robustbench_id'] if known else robustbench_id},
        'data': {'dataset': dataset, 'split': split, 'n_examples': result.n_examples, 'full_test_set': full,
                 'source': data_source, 'preprocessing': preprocessing},
        'threat_model': {'norm': result.norm, 'eps': result.eps, 'eps_text': format_eps(result.eps)},
        'clean_accuracy': result.clean_accuracy,
        'robust_accuracy': result.robust_accuracy,
        'attacks': {
            name: {'accuracy': r.accuracy, 'settings': r.spec.settings(), 'seconds': round(r.seconds, 3),
                   **({'components': r.components} if r.components else {})}
            for name, r in result.attacks.items()},
        'worst_case_correct': ''.join('1' if f else '0' for f in result.worst_case.tolist()),
        'checks': {'unbounded_accuracy': result.unbounded_accuracy, 'warnings': list(result.warnings)},
        'run': {'seed': result.seed, 'batch_size': result.batch_size, 'device': result.device,
                'seconds': round(result.seconds, 3),
                'date': datetime.datetime.now(datetime.timezone.utc).isoformat(timespec='seconds'),
                'versions': _versions()},
        'robustbench': robustbench_model_info(result, dataset=dataset, architecture=architecture,
                                              robustbench_id=known['robustbench_id'] if known else robustbench_id)
        if full else None,
        'robustbench_reported': known['model_info'] if known else None,
        'notes': list(notes),
    }
    if random_init:
        out['random_init'] = True
    if extra:
        out.update(extra)
    return out


def write_json(data: Dict[str, Any], path: Union[str, Path]) -> Path:
    """Writes JSON atomically."""
    return write_text(json.dumps(data, indent=2) + '\n', path)


def read_results(path: Union[str, Path]) -> Dict[str, Any]:
    """Reads a results file written by :func:`write_json`, checking its schema."""
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise FileNotFoundError(f'Results file {path} does not exist.') from None
    except ValueError as e:
        raise ValueError(f'{path} is not valid JSON ({e}).') from None
    if not isinstance(data, dict) or data.get('schema') != SCHEMA:
        data = data if isinstance(data, dict) else {}
        given = (" (a training run's config.json)" if 'training' in data and 'architecture' in data else
                 " (a timm model config)" if 'pretrained_cfg' in data else
                 " (an evaluation's progress file)" if 'fingerprint' in data else
                 f" (schema {data['schema']!r}, not {SCHEMA!r})" if 'schema' in data else '')
        raise ValueError(f"{path} is not a robust-resnets results file{given}; pass a file written by "
                         f"`robust-resnets eval MODEL ... --out RESULTS.json`.")
    return data
