"""The weights manifest: one validated record per released checkpoint, keyed ``arch.tag``.

The manifest lives in ``weights_manifest/*.json`` at the repository top level (shipped in the wheel as
``robust_resnets/weights/manifest_data``). Each file describes one paper::

    {
      "paper": {"title": ..., "arxiv": ..., "authors": ..., "venue": ..., "code": ...},
      "defaults": {<entry fields shared by the paper's entries>},
      "entries": {"robust_resnet_a1.cifar10_trades": {<entry fields>}, ...}
    }

An entry is ``defaults`` updated by its own fields (a shallow merge); :data:`ENTRY_FIELDS` lists
the fields and :func:`validate_entry` the rules. A key may appear only once in each object (a pasted
entry beside its stale copy is refused, not silently shadowed). A published entry's ``hf_hub`` may pin
the ``revision`` (the commit ``robust-resnets publish`` made), so that a later upload to the same repo
does not change, or break the checksum of, what older installations download. Extra manifest folders
(test fixtures, private checkpoints) come from :func:`add_manifest_dir` or the
``ROBUST_RESNETS_MANIFEST_DIR`` environment variable (``os.pathsep``-separated folders).
"""
from __future__ import annotations

import json
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple

__all__ = [
    'ManifestError', 'PretrainedWeights', 'ENTRY_FIELDS', 'MANIFEST_DIR_ENV', 'PACKAGED_WEIGHTS_DIR', 'ORIGINS',
    'manifest_dirs', 'add_manifest_dir',
    'load_manifest', 'get_manifest', 'get_weights', 'entries_for_architecture', 'validate_entry', 'parse_eps',
    'is_commit_id',
]

MANIFEST_DIR_ENV = 'ROBUST_RESNETS_MANIFEST_DIR'


def _packaged_manifest_dir() -> Path:
    """The manifest shipped with the code: ``manifest_data`` (a symlink to ``weights_manifest/`` in a checkout),
    or ``weights_manifest/`` itself where the symlink became a plain file (torch.hub's GitHub zip, Windows)."""
    here = Path(__file__).resolve().parent
    inside = here / 'manifest_data'
    return inside if inside.is_dir() else here.parents[1] / 'weights_manifest'


_PACKAGED_DIR = _packaged_manifest_dir()
#: Weights files shipped inside the package (an entry's ``package_file`` is relative to this folder).
PACKAGED_WEIGHTS_DIR = Path(__file__).resolve().with_name('packaged')
ORIGINS = ('authors', 'robust-resnets')

_NAME_RE = re.compile(r'^[a-z0-9_]+\.[a-z0-9_]+$')
_SHA256_RE = re.compile(r'^[0-9a-f]{64}$')
_EPS_RE = re.compile(r'^\d+(\.\d+)?(/\d+)?$')
_REPO_ID_RE = re.compile(r'^[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9][A-Za-z0-9_.-]*$')
_COMMIT_RE = re.compile(r'^[0-9a-f]{40}$')


def is_commit_id(text: Any) -> bool:
    """Whether ``text`` is a full git commit id (40 lower-case hex digits), as a pinned ``hf_hub.revision`` must be."""
    return isinstance(text, str) and _COMMIT_RE.match(text) is not None

DATASET_CLASSES = {'cifar10': 10, 'cifar100': 100, 'svhn': 10, 'imagenet': 1000}
THREAT_MODELS = ('Linf', 'L2', 'L1')
REPORTED_METRICS = ('clean', 'pgd20', 'cw40', 'autoattack')

#: Entry fields: name -> (required, description).
ENTRY_FIELDS: Dict[str, Tuple[bool, str]] = {
    'dataset': (True, "training set: one of 'cifar10', 'cifar100', 'svhn', 'imagenet'"),
    'num_classes': (True, 'classifier outputs of the checkpoint'),
    'input_size': (True, '[channels, height, width] the checkpoint was trained and evaluated at'),
    'crop_pct': (False, 'centre-crop fraction of the evaluation transform (default 1.0)'),
    'interpolation': (False, "resize interpolation of the evaluation transform (default 'bilinear')"),
    'normalization': (True, '{"inside_model": bool, "mean": [...] | null, "std": [...] | null}'),
    'threat_model': (True, "'Linf', 'L2', 'L1', or null for a clean model"),
    'eps': (True, "perturbation budget as written in the paper, e.g. '8/255'; null for a clean model"),
    'training': (True, 'training method'),
    'extra_data': (True, 'extra training data, or null'),
    'paper': (True, '{"title", "arxiv", "authors", "venue"?, "code"?}'),
    'reported': (True, '{"clean", "pgd20", "cw40", "autoattack": percent or null, "params_m"?, "source"?}'),
    'original': (True, '{"locations": [...], "layout": str, "file": str, "notes"?}'),
    'hf_hub': (True, '{"repo_id": "org/name", "filename": "*.safetensors", "revision"?: commit id}: where the '
                     'file is published; "revision" (40 hex digits, printed by robust-resnets publish) pins the '
                     'commit it is downloaded from (default: the repo\'s main branch)'),
    'sha256': (True, 'hex sha256 of the published file, null until published'),
    'size': (True, 'bytes of the published file, null until published'),
    'license': (True, "licence of the weights (SPDX-style id, or 'unknown')"),
    'published': (True, 'true once the file is on the Hub with the sha256 above'),
    'model_args': (False, 'keyword arguments the architecture needs for this checkpoint'),
    'package_file': (False, "weights shipped inside the package: '<arch>.<tag>/model.safetensors', a path under "
                            'robust_resnets/weights/packaged/; loaded from there instead of the Hub'),
    'origin': (False, "'authors' (default: converted from the authors' release) or 'robust-resnets' (trained by this "
                      'project; `reported` then holds numbers measured here)'),
    'notes': (False, 'free text'),
}


class ManifestError(ValueError):
    """A manifest file or entry that breaks the schema."""


@dataclass(frozen=True)
class PretrainedWeights:
    """One released checkpoint, as the manifest describes it (like torchvision's ``Weights``)."""

    name: str
    dataset: str
    num_classes: int
    input_size: Tuple[int, int, int]
    normalization: Mapping[str, Any]
    threat_model: Optional[str]
    eps: Optional[str]
    training: str
    extra_data: Optional[str]
    paper: Mapping[str, Any]
    reported: Mapping[str, Any]
    original: Mapping[str, Any]
    hf_hub: Mapping[str, str]
    sha256: Optional[str]
    size: Optional[int]
    license: str
    published: bool
    model_args: Mapping[str, Any] = field(default_factory=dict)
    crop_pct: float = 1.0
    interpolation: str = 'bilinear'
    package_file: Optional[str] = None
    origin: Optional[str] = None
    notes: Optional[str] = None
    source_file: Optional[str] = None

    @property
    def architecture(self) -> str:
        return self.name.split('.', 1)[0]

    @property
    def tag(self) -> str:
        return self.name.split('.', 1)[1]

    @property
    def hf_hub_id(self) -> str:
        return self.hf_hub['repo_id']

    @property
    def hf_filename(self) -> str:
        return self.hf_hub['filename']

    @property
    def hf_revision(self) -> Optional[str]:
        """The Hub commit the file is downloaded from (None: the repo's main branch)."""
        return self.hf_hub.get('revision')

    @property
    def packaged_path(self) -> Optional[Path]:
        """Where the package holds this entry's weights file (None when it is not shipped in the package)."""
        return PACKAGED_WEIGHTS_DIR.joinpath(*self.package_file.split('/')) if self.package_file else None

    @property
    def trained_here(self) -> bool:
        """Whether this project trained the checkpoint (rather than converting the authors' release)."""
        return self.origin == 'robust-resnets'

    @property
    def eps_value(self) -> Optional[float]:
        """The perturbation budget as a float (8/255 -> 0.0314)."""
        return parse_eps(self.eps) if self.eps is not None else None

    def convert_command(self) -> str:
        """The command that turns the original checkpoint into a publishable folder."""
        layout = self.original.get('layout')
        return f'robust-resnets convert CHECKPOINT --to {self.name} --out ./{self.name}' + (
            f' --layout {layout}' if layout else '')

    def to_json(self) -> Dict[str, Any]:
        """The entry as it would appear in a manifest file (paper included)."""
        out = {k: getattr(self, k) for k in ENTRY_FIELDS if getattr(self, k) is not None or ENTRY_FIELDS[k][0]}
        out['input_size'] = list(self.input_size)
        out['model_args'] = dict(self.model_args)
        return out


def parse_eps(eps: str) -> float:
    """Parses an eps written as in papers ('8/255', '0.5') into a float."""
    if not isinstance(eps, str) or not _EPS_RE.match(eps):
        raise ManifestError(f"eps must be written like '8/255' or '0.5', got {eps!r}.")
    num, _, den = eps.partition('/')
    return float(num) / float(den or 1)


def _is_num(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def validate_entry(name: str, entry: Mapping[str, Any]) -> List[str]:
    """Returns the schema violations of one merged entry (empty when it is valid)."""
    errors: List[str] = []
    if not _NAME_RE.match(name):
        errors.append(f"key must be 'arch.tag' in lower case (letters, digits, '_'), got {name!r}")
    unknown = sorted(set(entry) - set(ENTRY_FIELDS))
    if unknown:
        errors.append(f'unknown fields {unknown} (known: {sorted(ENTRY_FIELDS)})')
    missing = [k for k, (req, _) in ENTRY_FIELDS.items() if req and k not in entry]
    if missing:
        errors.append(f'missing fields {missing}')
        return errors

    ds, nc = entry['dataset'], entry['num_classes']
    if ds not in DATASET_CLASSES:
        errors.append(f'dataset must be one of {sorted(DATASET_CLASSES)}, got {ds!r}')
    if not isinstance(nc, int) or isinstance(nc, bool) or nc < 1:
        errors.append(f'num_classes must be a positive integer, got {nc!r}')
    elif ds in DATASET_CLASSES and nc != DATASET_CLASSES[ds]:
        errors.append(f'num_classes={nc} does not match dataset {ds!r} ({DATASET_CLASSES[ds]} classes)')
    size = entry['input_size']
    if not (isinstance(size, (list, tuple)) and len(size) == 3 and all(isinstance(s, int) and s > 0 for s in size)):
        errors.append(f'input_size must be [channels, height, width] of positive integers, got {size!r}')
    if 'crop_pct' in entry and not (_is_num(entry['crop_pct']) and 0 < entry['crop_pct'] <= 1):
        errors.append(f"crop_pct must be in (0, 1], got {entry['crop_pct']!r}")
    if 'interpolation' in entry and entry['interpolation'] not in ('bilinear', 'bicubic', 'nearest'):
        errors.append(f"interpolation must be 'bilinear', 'bicubic' or 'nearest', got {entry['interpolation']!r}")

    norm = entry['normalization']
    if not isinstance(norm, Mapping) or set(norm) != {'inside_model', 'mean', 'std'} \
            or not isinstance(norm.get('inside_model'), bool):
        errors.append(f'normalization must be {{"inside_model": bool, "mean", "std"}}, got {norm!r}')
    elif norm['inside_model']:
        chans = size[0] if isinstance(size, (list, tuple)) and size else 3
        for k in ('mean', 'std'):
            v = norm[k]
            if not (isinstance(v, (list, tuple)) and len(v) == chans and all(_is_num(x) for x in v)):
                errors.append(f'normalization.{k} must list {chans} numbers when inside_model is true, got {v!r}')
        if isinstance(norm['std'], (list, tuple)) and any(_is_num(x) and x <= 0 for x in norm['std']):
            errors.append('normalization.std must be positive')
        args = entry.get('model_args') or {}
        for k, arg in (('mean', 'input_mean'), ('std', 'input_std')):
            if arg in args and list(args[arg]) != list(norm[k]):
                errors.append(f'model_args.{arg} {args[arg]} differs from normalization.{k} {norm[k]}')
    elif norm['mean'] is not None or norm['std'] is not None:
        errors.append('normalization.mean/std must be null when inside_model is false (models take [0, 1] pixels)')

    tm, eps = entry['threat_model'], entry['eps']
    if tm is not None and tm not in THREAT_MODELS:
        errors.append(f'threat_model must be one of {THREAT_MODELS} or null, got {tm!r}')
    if (tm is None) != (eps is None):
        errors.append('threat_model and eps must both be set (robust model) or both be null (clean model)')
    elif eps is not None:
        try:
            parse_eps(eps)
        except ManifestError as e:
            errors.append(str(e))
    for k in ('training', 'license'):
        if not isinstance(entry[k], str) or not entry[k]:
            errors.append(f'{k} must be a non-empty string')
    if entry['extra_data'] is not None and not isinstance(entry['extra_data'], str):
        errors.append('extra_data must be a string or null')

    paper = entry['paper']
    if not isinstance(paper, Mapping) or not all(isinstance(paper.get(k), str) and paper.get(k)
                                                 for k in ('title', 'arxiv', 'authors')):
        errors.append('paper must have non-empty "title", "arxiv" and "authors"')
    elif not re.match(r'^\d{4}\.\d{4,5}$', paper['arxiv']):
        errors.append(f"paper.arxiv must be an arXiv id like '2212.11005', got {paper['arxiv']!r}")

    rep = entry['reported']
    if not isinstance(rep, Mapping):
        errors.append('reported must be an object')
    else:
        extra = sorted(set(rep) - set(REPORTED_METRICS) - {'params_m', 'source'})
        if extra:
            errors.append(f'reported has unknown keys {extra}')
        for k in REPORTED_METRICS:
            if k not in rep:
                errors.append(f'reported.{k} is missing (use null where the paper gives no number)')
            elif rep[k] is not None and not (_is_num(rep[k]) and 0 <= rep[k] <= 100):
                errors.append(f'reported.{k} must be a percentage in [0, 100] or null, got {rep[k]!r}')
        if 'params_m' in rep and not (_is_num(rep['params_m']) and rep['params_m'] > 0):
            errors.append('reported.params_m must be a positive number')
        if any(rep.get(k) is not None for k in REPORTED_METRICS) and not rep.get('source'):
            errors.append('reported.source must say where the numbers come from')

    orig = entry['original']
    if not isinstance(orig, Mapping) or not isinstance(orig.get('locations'), list) or not orig['locations'] \
            or not all(isinstance(x, str) and x for x in orig['locations']) \
            or not isinstance(orig.get('layout'), str) or not isinstance(orig.get('file'), str):
        errors.append('original must have non-empty "locations" (list of strings), "layout" and "file"')
    elif set(orig) - {'locations', 'layout', 'file', 'notes'}:
        errors.append(f"original has unknown keys {sorted(set(orig) - {'locations', 'layout', 'file', 'notes'})}")

    hub = entry['hf_hub']
    if not isinstance(hub, Mapping) or not {'repo_id', 'filename'} <= set(hub) <= {'repo_id', 'filename', 'revision'}:
        errors.append('hf_hub must be {"repo_id": "org/name", "filename": "model.safetensors"} with an optional '
                      '"revision"')
    else:
        if not isinstance(hub['repo_id'], str) or not _REPO_ID_RE.match(hub['repo_id']):
            errors.append(f"hf_hub.repo_id must look like 'org/name', got {hub['repo_id']!r}")
        if not isinstance(hub['filename'], str) or not hub['filename'].endswith('.safetensors'):
            errors.append(f"hf_hub.filename must be a .safetensors file, got {hub['filename']!r}")
        if 'revision' in hub and not is_commit_id(hub['revision']):
            errors.append(f"hf_hub.revision must be the 40-hex-digit commit id the upload made (robust-resnets "
                          f"publish prints it), got {hub['revision']!r}; a branch or tag name can move")

    sha, nbytes, published = entry['sha256'], entry['size'], entry['published']
    if not isinstance(published, bool):
        errors.append('published must be true or false')
    if sha is not None and (not isinstance(sha, str) or not _SHA256_RE.match(sha)):
        errors.append(f'sha256 must be 64 lower-case hex digits or null, got {sha!r}')
    if nbytes is not None and (not isinstance(nbytes, int) or isinstance(nbytes, bool) or nbytes <= 0):
        errors.append(f'size must be a positive number of bytes or null, got {nbytes!r}')
    if published is True and (sha is None or nbytes is None):
        errors.append('a published entry needs its sha256 and size (robust-resnets convert prints both)')
    if 'package_file' in entry:
        if entry['package_file'] != f'{name}/model.safetensors':
            errors.append(f"package_file must be '{name}/model.safetensors' (one folder per entry under "
                          f"robust_resnets/weights/packaged/), got {entry['package_file']!r}")
        if sha is None or nbytes is None:
            errors.append('an entry with package_file needs its sha256 and size (robust-resnets convert prints both)')
    if 'origin' in entry and entry['origin'] not in ORIGINS:
        errors.append(f"origin must be one of {ORIGINS}, got {entry['origin']!r}")

    args = entry.get('model_args', {})
    if not isinstance(args, Mapping):
        errors.append('model_args must be an object')
    elif {'num_classes', 'pretrained', 'pretrained_cfg'} & set(args):
        errors.append('model_args must not set num_classes/pretrained/pretrained_cfg (num_classes is its own field)')
    if 'notes' in entry and not isinstance(entry['notes'], str):
        errors.append('notes must be a string')
    return errors


def _entry_from_json(name: str, raw: Mapping[str, Any], source_file: str) -> PretrainedWeights:
    kwargs = dict(raw)
    kwargs['input_size'] = tuple(kwargs['input_size'])
    kwargs.setdefault('model_args', {})
    return PretrainedWeights(name=name, source_file=source_file, **kwargs)


def _read_file(path: Path) -> Dict[str, PretrainedWeights]:
    def unique_keys(pairs: List[Tuple[str, Any]]) -> Dict[str, Any]:
        out: Dict[str, Any] = {}
        for k, v in pairs:
            if k in out:
                raise ManifestError(f'{path}: key {k!r} appears twice in one object, and JSON would keep only the '
                                    f'last; delete the stale copy (e.g. an entry pasted beside the old one).')
            out[k] = v
        return out

    try:
        doc = json.loads(path.read_text(encoding='utf-8'), object_pairs_hook=unique_keys)
    except json.JSONDecodeError as e:
        raise ManifestError(f'{path}: not valid JSON ({e}); fix the file.') from e
    if not isinstance(doc, dict) or not isinstance(doc.get('entries'), dict):
        raise ManifestError(f'{path}: a manifest file is an object with "entries" (and optional "paper", '
                            f'"defaults").')
    extra = set(doc) - {'paper', 'defaults', 'entries', '$comment'}
    if extra:
        raise ManifestError(f'{path}: unknown top-level keys {sorted(extra)}; use "paper", "defaults", "entries".')
    defaults = dict(doc.get('defaults') or {})
    if 'paper' in doc:
        defaults.setdefault('paper', doc['paper'])
    out: Dict[str, PretrainedWeights] = {}
    problems: List[str] = []
    for name, own in doc['entries'].items():
        if not isinstance(own, dict):
            problems.append(f'{name}: an entry is an object')
            continue
        merged = {**defaults, **own}
        errors = validate_entry(name, merged)
        if errors:
            problems.extend(f'{name}: {e}' for e in errors)
            continue
        out[name] = _entry_from_json(name, merged, str(path.resolve()))
    if problems:
        raise ManifestError(f'{path}: {len(problems)} schema error(s):\n  ' + '\n  '.join(problems))
    return out


_EXTRA_DIRS: List[Path] = []
_CACHE: Dict[Tuple[str, ...], Dict[str, PretrainedWeights]] = {}


def manifest_dirs() -> List[Path]:
    """Folders read by :func:`get_manifest`: the packaged manifest, then added and environment folders."""
    dirs = [_PACKAGED_DIR] + list(_EXTRA_DIRS)
    env = os.environ.get(MANIFEST_DIR_ENV, '')
    dirs += [Path(p) for p in env.split(os.pathsep) if p]
    return dirs


def add_manifest_dir(path: os.PathLike) -> None:
    """Adds a folder of manifest files (e.g. private or test checkpoints) for this process and registers
    its tags with timm.

    Raises:
        FileNotFoundError: No such folder.
        ManifestError: An entry is invalid or redefines a name (the folder is then not added).
    """
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f'Manifest folder {path} does not exist; create it with *.json manifest files.')
    if path not in _EXTRA_DIRS:
        _EXTRA_DIRS.append(path)
        try:
            get_manifest()
        except ManifestError:
            _EXTRA_DIRS.remove(path)
            raise
    from .registry import register_manifest

    register_manifest()


def load_manifest(dirs: Iterable[os.PathLike]) -> Dict[str, PretrainedWeights]:
    """Reads and validates every ``*.json`` manifest file of ``dirs``; later folders may not redefine a name."""
    out: Dict[str, PretrainedWeights] = {}
    for d in dirs:
        d = Path(d)
        if not d.is_dir():
            raise ManifestError(f'Manifest folder {d} does not exist (check {MANIFEST_DIR_ENV} or reinstall '
                                f'robust-resnets).')
        for path in sorted(d.glob('*.json')):
            for name, entry in _read_file(path).items():
                if name in out:
                    raise ManifestError(f'{name} is defined twice: in {out[name].source_file} and {path}; '
                                        f'keep one.')
                out[name] = entry
    return out


def get_manifest() -> Dict[str, PretrainedWeights]:
    """The merged manifest of :func:`manifest_dirs` (cached per set of folders)."""
    key = tuple(str(d) for d in manifest_dirs())
    if key not in _CACHE:
        _CACHE[key] = load_manifest(Path(k) for k in key)
    return _CACHE[key]


def get_weights(name: str) -> PretrainedWeights:
    """Looks up ``arch.tag`` in the manifest; the error names close matches."""
    manifest = get_manifest()
    if name in manifest:
        return manifest[name]
    arch = name.split('.', 1)[0]
    same_arch = sorted(n for n in manifest if n.split('.', 1)[0] == arch)
    hint = f' Tags of {arch}: {same_arch}.' if same_arch else \
        " See what exists with sorted(robust_resnets.weights.get_manifest())."
    raise KeyError(f'{name!r} is not in the weights manifest.{hint}')


def entries_for_architecture(arch: str) -> Sequence[PretrainedWeights]:
    """The manifest entries of one architecture, in manifest order (the first is its default)."""
    return [w for w in get_manifest().values() if w.architecture == arch]
