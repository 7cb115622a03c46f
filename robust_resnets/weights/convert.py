"""Converting an original checkpoint into a publishable folder: model.safetensors, config.json, README.md.

The original is opened safely (``torch.load(weights_only=True)`` or safetensors), its keys are mapped
by the target family's ``checkpoint_filter_fn`` (layout detected by its ``detect_layout`` unless
given), loaded strictly into the manifest entry's architecture, and the folder is written
atomically (each file appears complete or not at all).
"""
from __future__ import annotations

import json
import os
import pickle
import sys
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any, Dict, List, Optional, Tuple

import torch

from ..files import give_umask_permissions
from ..models.layers import holds_tensors, strip_checkpoint_wrappers
from .hub import sha256_file
from . import manifest as _manifest
from .manifest import PretrainedWeights, get_weights

__all__ = ['ConversionResult', 'load_original_checkpoint', 'family_module', 'convert_checkpoint', 'model_card',
           'save_safetensors', 'state_dict_mismatch']

OUTPUT_FILES = ('model.safetensors', 'config.json', 'README.md')
#: Storage dtypes of ``convert_checkpoint(dtype=...)``: parameters are cast; buffers (normalisation statistics,
#: which can exceed float16's range) stay float32.
STORAGE_DTYPES = {'float32': torch.float32, 'float16': torch.float16, 'bfloat16': torch.bfloat16}
_HUB_DATASETS = {'cifar10': ('cifar10', 'CIFAR-10'), 'cifar100': ('cifar100', 'CIFAR-100'),
                 'svhn': ('svhn', 'SVHN'), 'imagenet': ('imagenet-1k', 'ImageNet-1k')}
_METRIC_NAMES = {'clean': 'Clean accuracy', 'pgd20': 'PGD-20 robust accuracy', 'cw40': 'CW-40 robust accuracy',
                 'autoattack': 'AutoAttack robust accuracy'}


@dataclass(frozen=True)
class ConversionResult:
    """What :func:`convert_checkpoint` wrote."""

    name: str
    out_dir: Path
    layout: str
    sha256: str
    size: int
    entry: Dict[str, Any]  # the manifest entry with sha256 and size, and package_file or published=True


def load_original_checkpoint(path: os.PathLike, *, key: Optional[str] = None) -> Dict[str, Any]:
    """Opens a checkpoint without executing code: safetensors, or a pickle through ``weights_only=True``.

    Args:
        path: The file.
        key: The entry of a training-state dict to return (e.g. ``'state_dict_ema'``); None returns it whole.

    Raises:
        FileNotFoundError: No such file.
        ValueError: The file is incomplete, corrupt or not a checkpoint, a ``key`` is given for a safetensors
            file, the pickle holds objects other than tensors and plain containers, it has no dict under
            ``key``, or (``key`` None) its tensors sit under entries other than the usual wrappers, so ``key``
            has to name one.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f'Checkpoint {path} does not exist.')
    safetensors = path.suffix == '.safetensors'
    if safetensors and key is not None:
        raise ValueError(f'{path} is a safetensors file: a flat state dict without entries, so there is no {key!r} '
                         f'in it to pick; drop --key (key=).')
    try:
        if safetensors:
            from safetensors.torch import load_file

            return load_file(str(path), device='cpu')
        obj = torch.load(str(path), map_location='cpu', weights_only=True)
    except (PermissionError, MemoryError):
        raise
    except Exception as e:  # on a damaged file: SafetensorError, or torch's OSError, RuntimeError, EOFError, ...
        if isinstance(e, pickle.UnpicklingError) and 'Unsupported global' in str(e):
            raise ValueError(
                f'{path} cannot be opened with torch.load(weights_only=True): it pickles objects other than tensors '
                f'({_first_line(e)}). Pickles can run code, so they are not unpickled fully here. In an '
                f'environment you trust, re-save only its state dict, e.g. torch.save(torch.load(p, '
                f"weights_only=False)['state_dict'], 'state_dict.pt'), and convert that.") from e
        raise ValueError(f"{path} is not a readable {'safetensors file' if safetensors else 'PyTorch checkpoint'}: "
                         f'it is incomplete, corrupt or another kind of file ({_first_line(e)}). Download it '
                         f'again, or check that it is the checkpoint you meant.') from e
    if not isinstance(obj, dict):
        raise ValueError(f'{path} holds a {type(obj).__name__}, not a state dict or a dict wrapping one.')
    if key is not None:
        if not isinstance(obj.get(key), dict):
            choices = sorted(k for k, v in obj.items() if isinstance(k, str) and isinstance(v, dict))
            raise ValueError(f'{path} has no state dict under {key!r}; its dict entries are {choices}.')
        obj = obj[key]
    nested = [str(k) for k, v in obj.items() if holds_tensors(v)]
    if not (holds_tensors(obj) or nested):
        raise ValueError(f'{path} holds no tensors (its top-level keys: {_first_lines([str(k) for k in obj], 5)}), '
                         f'so it is not a model checkpoint. Check the file.')
    if key is None and not holds_tensors(obj) and not _unwraps(obj):
        raise ValueError(f'{path} holds no tensors at its top level, and its state dict is not under a usual '
                         f"name (state_dict, model_state_dict, model, or an EMA's): the entries {nested} hold "
                         f'tensors. Name the one to load with --key {nested[0]} (key= of load_original_checkpoint).')
    return obj


def _unwraps(checkpoint: Dict[str, Any]) -> bool:
    """Whether the families' checkpoint filters find tensors in ``checkpoint`` (one ambiguous between the
    trained and the EMA weights counts: the filters name both)."""
    try:
        return bool(strip_checkpoint_wrappers(checkpoint))
    except ValueError:
        return True


def _first_line(error: BaseException) -> str:
    """The error's type and its first line; for torch's weights-only unpickler, the line that names the fault."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    if 'WeightsUnpickler error:' in str(error):
        after = str(error).split('WeightsUnpickler error:', 1)[1].strip().splitlines()
        lines = after[:1] or lines
    return f"{type(error).__name__}: {lines[0][:160]}" if lines else type(error).__name__


def family_module(arch: str) -> ModuleType:
    """The module that registered ``arch``; it exposes ``checkpoint_filter_fn`` and ``detect_layout``."""
    import timm

    if not timm.is_model(arch):
        raise ValueError(f"Architecture '{arch}' is not registered with timm (is its family implemented and imported "
                         f'by robust_resnets.models?).')
    module = sys.modules[timm.models.model_entrypoint(arch).__module__]
    for fn in ('checkpoint_filter_fn', 'detect_layout'):
        if not callable(getattr(module, fn, None)):
            raise ValueError(f'{module.__name__} (family of {arch}) has no {fn}(); it cannot convert checkpoints.')
    return module


def _first_lines(keys: List[str], n: int = 8) -> str:
    return ', '.join(keys[:n]) + (f' ... ({len(keys)} in all)' if len(keys) > n else '')


def state_dict_mismatch(state_dict: Dict[str, torch.Tensor], model: torch.nn.Module) -> Optional[str]:
    """What keeps ``state_dict`` from loading into ``model`` (missing and unexpected keys, shape mismatches, a
    few of each), or None when it fits."""
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(expected))
    wrong = sorted(k for k in set(expected) & set(state_dict) if tuple(state_dict[k].shape) != tuple(expected[k].shape))
    parts = []
    if missing:
        parts.append(f'missing keys: {_first_lines(missing)}')
    if unexpected:
        parts.append(f'unexpected keys: {_first_lines(unexpected)}')
    if wrong:
        parts.append('shape mismatches (checkpoint vs model): ' + _first_lines(
            [f'{k} {tuple(state_dict[k].shape)} vs {tuple(expected[k].shape)}' for k in wrong], 4))
    return '; '.join(parts) or None


def _detect_layout(module: ModuleType, raw: Dict[str, Any]) -> str:
    """Names the checkpoint's layout for the record; the family's filter does its own unwrapping and detection."""
    candidates = [raw] + [v for v in raw.values() if isinstance(v, dict)]
    for sd in candidates:
        keys = [k for k in sd if isinstance(k, str)]
        for prefix in ('module.', 'model.', 'base_model.', '_orig_mod.'):
            if keys and all(k.startswith(prefix) for k in keys):
                sd = {k[len(prefix):]: v for k, v in sd.items()}
        try:
            return module.detect_layout(sd)
        except (ValueError, KeyError, AttributeError, TypeError):
            continue
    return 'auto'


def _map_and_load(raw: Dict[str, Any], weights: PretrainedWeights,
                  layout: Optional[str]) -> Tuple[torch.nn.Module, str]:
    import timm

    module = family_module(weights.architecture)
    model = timm.create_model(weights.architecture, pretrained=False, num_classes=weights.num_classes,
                              **weights.model_args)
    detected = layout or _detect_layout(module, raw)
    state_dict = module.checkpoint_filter_fn(raw, model, layout=layout)
    mismatch = state_dict_mismatch(state_dict, model)
    if mismatch:
        raise RuntimeError(
            f"The checkpoint does not fit {weights.name} ({weights.architecture}, {weights.num_classes} classes, "
            f"model_args={dict(weights.model_args)}; layout {detected}): {mismatch}. Check that --to names the "
            f"right architecture and dataset, or force the key layout with --layout.")
    model.load_state_dict(state_dict, strict=True)
    return model.eval(), detected


def save_safetensors(tensors: Dict[str, torch.Tensor], path: os.PathLike, *, metadata: Dict[str, str]) -> None:
    """Writes a safetensors file that is byte-reproducible and readable like any file the process creates.

    safetensors writes its metadata in hash-map order, which changes from run to run (the tensors' entries and
    data are deterministic), and creates owner-only files. Here the metadata keys are sorted in place (the
    header keeps its length) and the file gets the permissions the umask gives.
    """
    from safetensors.torch import save_file

    save_file(tensors, str(path), metadata=metadata)
    with open(path, 'r+b') as f:
        size = int.from_bytes(f.read(8), 'little')
        header = json.loads(f.read(size))
        header['__metadata__'] = dict(sorted(header['__metadata__'].items()))
        text = json.dumps(header, separators=(',', ':'), ensure_ascii=False).encode('utf-8')
        if len(text) > size:
            raise RuntimeError(f'{path}: re-serialising its safetensors header changed its length ({len(text)} vs '
                               f'{size} bytes), so it was not rewritten; please report this.')
        f.seek(8)
        f.write(text + b' ' * (size - len(text)))  # safetensors pads its header with spaces
    give_umask_permissions(path)


def model_card(weights: PretrainedWeights, *, sha256: str, source_sha256: str) -> str:
    """The Hub model card (README.md): metadata block for the Hub, then usage and provenance."""
    import yaml

    hub_ds, ds_name = _HUB_DATASETS[weights.dataset]
    rep = weights.reported
    threat = f'{weights.threat_model} eps={weights.eps}' if weights.threat_model else 'none (clean model)'
    meta: Dict[str, Any] = {
        'tags': ['image-classification', 'timm', 'robust-resnets', 'adversarial-robustness'],
        'library_name': 'timm',
        'license': weights.license if weights.license not in ('unknown', 'other') else 'other',
    }
    if meta['license'] == 'other':  # the Hub's card spec: an 'other' licence names itself and links its terms
        meta['license_name'] = weights.license
        meta['license_link'] = _license_link(weights)
    meta['datasets'] = [hub_ds]
    metrics = [{'type': 'accuracy', 'name': f'{_METRIC_NAMES[k]}' + (f' ({threat})' if k != 'clean' else ''),
                'value': rep[k]} for k in _METRIC_NAMES if rep.get(k) is not None]
    if metrics:
        result: Dict[str, Any] = {
            'task': {'type': 'image-classification', 'name': 'Image Classification'},
            'dataset': {'type': hub_ds, 'name': ds_name, 'split': 'test'},
            'metrics': metrics,
        }
        if not weights.trained_here:
            result['source'] = {'name': f"{weights.paper['title']} (reported)",
                                'url': f"https://arxiv.org/abs/{weights.paper['arxiv']}"}
        meta['model-index'] = [{'name': weights.name, 'results': [result]}]
    rows = '\n'.join(f'| {_METRIC_NAMES[k]} | {rep[k] if rep.get(k) is not None else "not reported"} |'
                     for k in _METRIC_NAMES)
    norm = weights.normalization
    norm_text = (f"inside the model (mean {tuple(norm['mean'])}, std {tuple(norm['std'])})" if norm['inside_model']
                 else 'none')
    paper_ref = f"\"{weights.paper['title']}\" (arXiv [{weights.paper['arxiv']}](https://arxiv.org/abs/{weights.paper['arxiv']}))"
    if weights.trained_here:
        intro = (f'{weights.architecture} (architecture from {paper_ref}) adversarially trained on {ds_name} by '
                 f'robust-resnets ({weights.training}), for [timm](https://github.com/huggingface/pytorch-image-models).')
        numbers_title, numbers_note = 'Measured numbers', 'Measured by robust-resnets, not taken from a paper.'
        numbers_source = 'not measured yet'
        provenance = (f"- Trained by robust-resnets: {'; '.join(weights.original['locations'])}\n"
                      f"- sha256 of the training run's weights file: `{source_sha256}`")
    else:
        intro = (f'{weights.architecture} trained on {ds_name} ({weights.training}), from {paper_ref}, converted to '
                 f'safetensors for [timm](https://github.com/huggingface/pytorch-image-models) by robust-resnets.')
        numbers_title, numbers_note = 'Reported numbers', "These are the authors' numbers, not measured here."
        numbers_source = 'the paper'
        provenance = (f"- Original checkpoint ({weights.original['layout']} layout): "
                      f"{'; '.join(weights.original['locations'])}\n"
                      f"- sha256 of the original file: `{source_sha256}`")
    notes = f'\n## Notes\n\n{weights.notes}\n' if weights.notes else ''
    body = f"""
# {weights.name}

{intro}

- Threat model: {threat}
- Extra training data: {weights.extra_data or 'none'}
- Input: {weights.input_size[1]}x{weights.input_size[2]} RGB in [0, 1]; input standardisation: {norm_text}
- Classes: {weights.num_classes}

## Usage

```python
import timm
import robust_resnets  # registers the architectures and this tag

model = timm.create_model('{weights.name}', pretrained=True).eval()
```

## {numbers_title} ({weights.dataset} test set)

| Metric | Value |
| --- | --- |
{rows}

Source: {rep.get('source') or numbers_source}. {numbers_note}
{notes}
## Provenance

{provenance}
- sha256 of model.safetensors: `{sha256}`
- Licence: {weights.license}
"""
    return '---\n' + yaml.safe_dump(meta, sort_keys=False, allow_unicode=True) + '---\n' + body


def _license_link(weights: PretrainedWeights) -> str:
    """Where the terms of an entry's weights are (or should be) stated: the authors' code, else the original
    download, else the paper."""
    urls = [weights.paper.get('code')] + list(weights.original['locations'])
    return next((u for u in urls if isinstance(u, str) and u.startswith(('https://', 'http://'))),
                f"https://arxiv.org/abs/{weights.paper['arxiv']}")


def _config(weights: PretrainedWeights, model: torch.nn.Module) -> Dict[str, Any]:
    """timm's config.json: architecture, classes, model_args and the pretrained cfg (no weight source)."""
    from timm.models import get_pretrained_cfg

    from .registry import pretrained_cfg_for

    cfg = pretrained_cfg_for(weights, get_pretrained_cfg(weights.architecture)).to_dict(remove_source=True)
    cfg.pop('notes', None)
    return {
        'architecture': weights.architecture,
        'num_classes': weights.num_classes,
        'num_features': int(getattr(model, 'num_features', 0)),
        'model_args': dict(weights.model_args),
        'pretrained_cfg': cfg,
        'robust_resnets': {k: v for k, v in weights.to_json().items()
                           if k in ('dataset', 'threat_model', 'eps', 'training', 'extra_data', 'paper', 'reported')},
    }


def convert_checkpoint(
        checkpoint: os.PathLike,
        *,
        name: str,
        out_dir: os.PathLike,
        layout: Optional[str] = None,
        key: Optional[str] = None,
        dtype: Optional[str] = None,
        overwrite: bool = False,
) -> ConversionResult:
    """Converts an original checkpoint for the manifest entry ``name`` into ``out_dir``.

    Args:
        checkpoint: The authors' file (.pt/.pth/.pth.tar pickle, or .safetensors).
        name: Manifest entry, ``arch.tag``.
        out_dir: Folder to write model.safetensors, config.json and README.md into (created if needed).
        layout: Key layout of the original (family-specific, e.g. 'huang2022'); detected when None.
        key: The entry of a training state to convert (e.g. 'state_dict_ema' of a file that also holds the
            trained weights); None unwraps the usual wrappers.
        dtype: Storage dtype of the parameters ('float32', 'float16', 'bfloat16'); None stores the model's
            own (float32). Buffers stay float32. Models load any of them into their float32 parameters.
        overwrite: Replace files already in ``out_dir``.

    Raises:
        ValueError: Unknown entry or architecture, a file that cannot be opened safely, or ``out_dir``
            already holding converted files without ``overwrite``.
        RuntimeError: The mapped checkpoint does not load strictly into the architecture.
    """
    from robust_resnets import __version__

    try:
        weights = get_weights(name)
    except KeyError as e:
        raise ValueError(e.args[0]) from None
    if dtype is not None and dtype not in STORAGE_DTYPES:
        raise ValueError(f"dtype must be one of {sorted(STORAGE_DTYPES)} (or None for float32, the model's own), "
                         f'got {dtype!r}.')
    out_dir = Path(out_dir)
    existing = [f for f in OUTPUT_FILES if (out_dir / f).exists()]
    if existing and not overwrite:
        raise ValueError(f'{out_dir} already holds {existing}; pass --overwrite or choose another --out.')
    raw = load_original_checkpoint(checkpoint, key=key)
    model, detected = _map_and_load(raw, weights, layout)
    cast = STORAGE_DTYPES.get(dtype)
    params = {k for k, _ in model.named_parameters()}
    tensors = {k: (v.to(cast) if cast is not None and k in params else v).detach().cpu().contiguous()
               for k, v in model.state_dict().items()}
    source_sha256 = sha256_file(checkpoint)
    metadata = {
        'format': 'pt', 'name': weights.name, 'architecture': weights.architecture, 'tag': weights.tag,
        'num_classes': str(weights.num_classes), 'dataset': weights.dataset,
        'model_args': json.dumps(dict(weights.model_args), sort_keys=True),
        'source_file': Path(checkpoint).name, 'source_sha256': source_sha256, 'source_layout': detected,
        'converter': f'robust-resnets {__version__}', 'dtype': dtype or 'float32',
        **({'source_key': key} if key is not None else {}),
    }
    out_dir.mkdir(parents=True, exist_ok=True)
    # every file goes to a temporary name first; they are renamed into place only when all are written
    tmp = {f: out_dir / f'.{f}.tmp-{os.getpid()}' for f in OUTPUT_FILES}
    try:
        save_safetensors(tensors, tmp['model.safetensors'], metadata=metadata)
        sha256 = sha256_file(tmp['model.safetensors'])
        size = tmp['model.safetensors'].stat().st_size
        tmp['config.json'].write_text(json.dumps(_config(weights, model), indent=2) + '\n', encoding='utf-8')
        tmp['README.md'].write_text(model_card(weights, sha256=sha256, source_sha256=source_sha256), encoding='utf-8')
        for fname, path in tmp.items():
            os.replace(path, out_dir / fname)
    finally:
        for path in tmp.values():
            path.unlink(missing_ok=True)
    entry = {k: v for k, v in weights.to_json().items() if k != 'paper'}
    entry.update(sha256=sha256, size=size)
    if weights.hf_revision and sha256 != weights.sha256:  # a new file: its upload is pinned once published
        entry['hf_hub'] = {k: v for k, v in weights.hf_hub.items() if k != 'revision'}
    packaged = _manifest.PACKAGED_WEIGHTS_DIR
    if packaged in out_dir.resolve().parents:  # shipped inside the package, not (yet) on the Hub
        entry['package_file'] = (out_dir.resolve() / 'model.safetensors').relative_to(packaged).as_posix()
    else:
        entry['published'] = True
    return ConversionResult(name=weights.name, out_dir=out_dir, layout=detected, sha256=sha256, size=size, entry=entry)
