"""Hook that every model family's ``_create_*`` calls before timm builds a model with pretrained weights.

For a manifest tag (``timm.create_model('robust_resnet_a1.cifar10_trades', pretrained=True)``) it
merges the checkpoint's ``model_args`` into the build kwargs, finds the weights file (shipped inside
the package when the entry has a ``package_file``, else ``model.safetensors`` through the Hugging
Face cache), checks its sha256 against the manifest and hands the local file to timm with
``pretrained_cfg_overlay=dict(file=...)``; timm then loads it with the family's checkpoint
filter. timm itself never reaches the Hub, so this works with every timm >= 1.0.9.

An overlay that names its own weights (``pretrained_cfg_overlay=dict(file=...)``, ``url=``, ``hf_hub_id=`` or
``state_dict=``) is loaded by timm instead, and the manifest's file is not fetched; the tag still gives the
architecture's arguments. A local ``file`` must be a ``.safetensors`` made for the tag (its metadata is checked).
Without a tag, a local ``file`` builds the architecture recorded with it (:func:`recorded_architecture`): its
``model_args`` apply where the caller gives none, and a caller's argument or architecture that contradicts them
is refused.
"""
from __future__ import annotations

import inspect
import json
import math
from functools import lru_cache
from pathlib import Path
from typing import Any, Dict, Mapping, NamedTuple, Optional, Tuple

from .manifest import PretrainedWeights, entries_for_architecture, get_manifest

__all__ = ['resolve_pretrained_kwargs', 'check_weights_file', 'default_entry', 'recorded_architecture',
           'recorded_model_args', 'RecordedArchitecture']

#: Overlay keys that name a weight source of the caller's own, in the order timm prefers them.
_OWN_SOURCES = ('state_dict', 'file', 'hf_hub_id', 'url')


def _tag_of(pretrained_cfg: Any) -> Optional[str]:
    if pretrained_cfg is None or isinstance(pretrained_cfg, str):
        return pretrained_cfg or None
    tag = pretrained_cfg.get('tag') if isinstance(pretrained_cfg, Mapping) else getattr(pretrained_cfg, 'tag', None)
    return tag or None


def _own_source(overlay: Mapping[str, Any]) -> Optional[str]:
    """The overlay key that names the caller's own weights ('state_dict', 'file', 'hf_hub_id', 'url'), if any."""
    for k in _OWN_SOURCES:
        if (overlay.get(k) is not None) if k == 'state_dict' else overlay.get(k):
            return k
    return None


def _not_published_message(weights: PretrainedWeights) -> str:
    orig = weights.original
    if weights.trained_here:
        return (f"{weights.name} is trained by robust-resnets, but its weights are not shipped yet (weights_manifest: "
                f"no package_file, published=false). Train it with:\n    {'; '.join(orig['locations'])}\n"
                f"  then ship the run's weights with:\n    robust-resnets convert RUN/model.safetensors --to "
                f"{weights.name} --dtype float16 --out robust_resnets/weights/packaged/{weights.name}")
    where = '\n    '.join(orig['locations'])
    return (
        f"{weights.name} has no published weights yet (weights_manifest: published=false).\n"
        f"  The original checkpoint ({orig['layout']} layout; {orig['file']}) is at:\n    {where}\n"
        f"  Download it, then convert it with:\n    {weights.convert_command()}\n"
        f"  and load the result with timm.create_model('{weights.name}', pretrained=True, "
        f"pretrained_cfg_overlay=dict(file='./{weights.name}/model.safetensors')).\n"
        f"  To evaluate the original as it is: robust-resnets eval {weights.name} --checkpoint ORIGINAL")


def check_weights_file(path: Path, weights: PretrainedWeights) -> None:
    """Checks that a weights file is a safetensors file made for this entry (architecture, tag, model_args,
    class count), as far as its metadata says (``robust-resnets convert`` writes all of them).

    Raises:
        FileNotFoundError: The file does not exist.
        ValueError: It is not a safetensors file, or its metadata names another architecture, tag, model_args
            or class count.
    """
    if not path.is_file():
        raise FileNotFoundError(f'Pretrained file {path} does not exist; check the path given in '
                                f'pretrained_cfg_overlay=dict(file=...).')
    if path.suffix != '.safetensors':
        raise ValueError(f'{path} is not a .safetensors file. Pickled checkpoints are not loaded here; convert it '
                         f'with: {weights.convert_command().replace("CHECKPOINT", str(path))}')
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework='pt') as f:
            meta = f.metadata() or {}
    except (SafetensorError, OSError) as e:
        raise ValueError(f'{path} is not a readable safetensors file ({e}); re-download or re-convert it.') from e
    arch = meta.get('architecture')
    if arch and arch != weights.architecture:
        raise ValueError(f"{path} holds weights for '{arch}' (tag {meta.get('tag')!r}), not '{weights.architecture}'; "
                         f"create '{arch}.{meta.get('tag')}' instead, or pick the file made for {weights.name}.")
    file_args = meta.get('model_args')
    if file_args is not None:
        try:
            file_args = json.loads(file_args)
        except ValueError:
            raise ValueError(f"{path}: its metadata's model_args is not JSON ({file_args!r}); re-convert it with: "
                             f"{weights.convert_command()}") from None
    args_differ = file_args is not None and file_args != json.loads(json.dumps(dict(weights.model_args)))
    tag = meta.get('tag')
    if tag and tag != weights.tag:
        differ = f' (its model_args {file_args} differ from {dict(weights.model_args)})' if args_differ else ''
        raise ValueError(f"{path} was converted for {weights.architecture}.{tag}, not {weights.name}{differ}; "
                         f"create '{weights.architecture}.{tag}' instead, or pick the file made for {weights.name}.")
    if args_differ:
        raise ValueError(f'{path} was converted for {weights.name} with model_args {file_args}, but its manifest '
                         f'entry now builds it with {dict(weights.model_args)}; re-convert the original with: '
                         f'{weights.convert_command()}')
    classes = meta.get('num_classes')
    if classes and int(classes) != weights.num_classes:
        raise ValueError(f'{path} has a {classes}-class head but {weights.name} has {weights.num_classes} classes '
                         f'({weights.dataset}); use the file made for {weights.name}. To fine-tune on another class '
                         f'count, pass num_classes=N to create_model instead.')


def default_entry(variant: str) -> Optional[PretrainedWeights]:
    """The tag an untagged ``pretrained=True`` resolves to: the first entry that fits the plain architecture."""
    entries = entries_for_architecture(variant)
    plain = [w for w in entries if not w.model_args]
    if entries and not plain:
        raise RuntimeError(f"'{variant}' has no untagged pretrained weights; its checkpoints need specific "
                           f"arguments, so name one: {[w.name for w in entries]}.")
    return plain[0] if plain else None


@lru_cache(maxsize=None)
def _timm_takes_cache_dir() -> bool:
    """Whether this timm's ``build_model_with_cfg`` takes ``cache_dir`` (timm 1.0.9 passes it on to the model)."""
    from timm.models import build_model_with_cfg

    return 'cache_dir' in inspect.signature(build_model_with_cfg).parameters


def _timm_reaches_the_hub() -> bool:
    """Whether this timm can download from the Hub (timm 1.0.9 cannot with huggingface_hub >= 1.0)."""
    from timm.models import _hub

    return getattr(_hub, '_has_hf_hub', True)


def resolve_pretrained_kwargs(variant: str, pretrained: bool, kwargs: Dict[str, Any], *,
                              arch_args: Optional[Mapping[str, Any]] = None) -> Dict[str, Any]:
    """Returns the ``build_model_with_cfg`` kwargs for ``variant`` with the manifest's weights resolved.

    A tag builds the architecture its checkpoint was trained with: its ``model_args`` override the entry
    point's ``arch_args``, and a caller's argument that contradicts them is refused.

    Args:
        variant: Architecture name (no tag).
        pretrained: Whether weights are requested.
        kwargs: The caller's kwargs, including timm's ``pretrained_cfg`` (a tag, a dict or None),
            ``pretrained_cfg_overlay`` and ``cache_dir``.
        arch_args: The entry point's architecture arguments (the caller's kwargs override them).

    Raises:
        RuntimeError: The weights are not published, not cached while offline, failed to download, or
            (shipped in the package) missing from this installation; or an overlay names an ``hf_hub_id``
            that this timm cannot download (its Hub support is off).
        ChecksumError: The file differs from the manifest (never loaded; a Hub download is also deleted).
        ValueError: A local file does not fit the architecture, or a caller's argument contradicts the tag's.
        TypeError: ``cache_dir`` was given for weights that this timm (one without ``cache_dir``) downloads itself.
    """
    kwargs = _resolve(variant, pretrained, dict(kwargs), dict(arch_args or {}))
    overlay = kwargs.get('pretrained_cfg_overlay') or {}
    if pretrained and _own_source(overlay) == 'hf_hub_id' and not _timm_reaches_the_hub():
        import huggingface_hub
        import timm

        raise RuntimeError(f'timm {timm.__version__} cannot use huggingface_hub {huggingface_hub.__version__}, so it '
                           f"cannot fetch hf_hub_id={overlay['hf_hub_id']!r}; download the file and pass "
                           'pretrained_cfg_overlay=dict(file=huggingface_hub.hf_hub_download(repo_id, '
                           "'model.safetensors')) instead, or upgrade timm.")
    if 'cache_dir' not in kwargs or _timm_takes_cache_dir():
        return kwargs
    cache_dir = kwargs.pop('cache_dir')
    timm_downloads = _own_source(overlay) not in ('file', 'state_dict')
    if pretrained and cache_dir is not None and timm_downloads:
        import timm

        raise TypeError(f'timm {timm.__version__} takes no cache_dir for the weights it downloads itself '
                        f"('{variant}' with pretrained_cfg={kwargs.get('pretrained_cfg')!r}); set the "
                        'HF_HUB_CACHE (Hub) or TORCH_HOME (url) environment variable instead, or upgrade timm.')
    return kwargs


def _canonical(value: Any) -> Any:
    """An argument value in a form that compares by meaning: tensors and arrays as lists, activation names and
    classes as the layer they build, other strings in lower case."""
    from robust_resnets.models.layers import resolve_act_layer

    if callable(getattr(value, 'tolist', None)):
        value = value.tolist()
    if isinstance(value, (list, tuple)):
        return [_canonical(v) for v in value]
    if isinstance(value, Mapping):
        return {k: _canonical(v) for k, v in value.items()}
    if isinstance(value, (str, type)):
        try:
            return resolve_act_layer(value)
        except ValueError:
            return value.lower() if isinstance(value, str) else value
    return value


def _same_value(a: Any, b: Any) -> bool:
    """Whether two argument values mean the same: a tuple equals its list, a tensor its values, 'silu' equals
    'SiLU' and nn.SiLU, a single value equals a per-stage list of it, numbers within float rounding."""
    a, b = _canonical(a), _canonical(b)
    if isinstance(a, list) != isinstance(b, list):
        one, many = (b, a) if isinstance(a, list) else (a, b)
        return all(_same_value(one, v) for v in many)
    if isinstance(a, list):
        return len(a) == len(b) and all(_same_value(x, y) for x, y in zip(a, b))
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_same_value(a[k], b[k]) for k in a)
    numbers = (int, float)
    if isinstance(a, numbers) and isinstance(b, numbers) and not isinstance(a, bool) and not isinstance(b, bool):
        return math.isclose(a, b, rel_tol=1e-6, abs_tol=1e-12)
    return a == b


#: Arguments a saved ``model_args`` may hold that describe the head, not the architecture: the caller's apply.
_HEAD_ARGS = ('num_classes', 'global_pool')
#: Recorded arguments that timm adapts the weights to (first conv, position embedding): a caller's value applies.
_ADAPTED_ARGS = ('in_chans', 'img_size')


class RecordedArchitecture(NamedTuple):
    """What a weights file was made for, as recorded with it."""

    architecture: str
    model_args: Dict[str, Any]  # without the head's arguments
    num_classes: Optional[int]
    source: Path  # the file that says so


def recorded_architecture(path: Path) -> Optional[RecordedArchitecture]:
    """The architecture and ``model_args`` a weights file was made for, as recorded with it.

    Looked up in the file's safetensors metadata (``robust-resnets convert`` writes them), else in the timm
    ``config.json`` beside it (a training run's export, a Hub snapshot), else in the ``train_config.yaml``
    beside it (a training run's ``last.pt``/``best.pt`` before its export; a tag it names adds the tag's
    ``model_args``).

    Returns:
        The record, or None when nothing is recorded.

    Raises:
        ValueError: The record is unreadable.
    """
    meta: Dict[str, str] = {}
    if path.suffix == '.safetensors' and path.is_file():
        from safetensors import SafetensorError, safe_open

        try:
            with safe_open(str(path), framework='pt') as f:
                meta = f.metadata() or {}
        except (SafetensorError, OSError):
            pass  # not readable: timm's loader says so
    meta_arch = meta.get('architecture') or None
    if meta_arch and meta.get('model_args') is not None:
        try:
            args = json.loads(meta['model_args'])
        except ValueError:
            raise ValueError(f"{path}: its metadata's model_args is not JSON ({meta['model_args']!r}); "
                             f"re-convert it with `robust-resnets convert`.") from None
        return _architecture_record(meta_arch, args, meta.get('num_classes'), path)
    config, recipe = path.parent / 'config.json', path.parent / 'train_config.yaml'
    if config.is_file():
        try:
            data = json.loads(config.read_text(encoding='utf-8'))
        except (OSError, ValueError) as e:
            raise ValueError(f"'{config}' beside the weights is not readable JSON ({e}); fix or remove it.") from None
        data = data if isinstance(data, dict) else {}
        record = _architecture_record(data.get('architecture'), data.get('model_args'), data.get('num_classes'), config)
        if record is not None:
            return record
    if recipe.is_file():
        import yaml

        try:
            data = yaml.safe_load(recipe.read_text(encoding='utf-8'))
        except (OSError, yaml.YAMLError) as e:
            raise ValueError(f"'{recipe}' beside the weights is not readable YAML ({e}); fix or remove it.") from None
        model = data.get('model') if isinstance(data, dict) else None
        model = model if isinstance(model, dict) else {}
        name, args = model.get('name'), model.get('kwargs')
        if isinstance(name, str) and '.' in name:  # a tag: it built the architecture with its own arguments
            entry = get_manifest().get(name)
            args = {**(dict(entry.model_args) if entry is not None else {}), **(args or {})} \
                if isinstance(args, (Mapping, type(None))) else args
            name = name.split('.', 1)[0]
        record = _architecture_record(name, args, model.get('num_classes'), recipe)
        if record is not None:
            return record
    return _architecture_record(meta_arch, {}, meta.get('num_classes'), path) if meta_arch else None


def _architecture_record(arch: Any, args: Any, num_classes: Any, where: Path) -> Optional[RecordedArchitecture]:
    if not isinstance(arch, str) or not arch:
        return None
    args = args or {}
    if not isinstance(args, Mapping):
        raise ValueError(f"'{where}' gives the model arguments {args!r}, not a mapping; fix or remove it.")
    try:
        classes = int(num_classes) if num_classes is not None else args.get('num_classes')
    except (TypeError, ValueError):
        classes = None
    return RecordedArchitecture(arch, {k: v for k, v in args.items() if k not in _HEAD_ARGS},
                                int(classes) if isinstance(classes, int) else None, where)


def recorded_model_args(path: Path, *, architecture: str, kwargs: Mapping[str, Any]) -> Dict[str, Any]:
    """The ``model_args`` recorded with a weights file (:func:`recorded_architecture`; none when nothing is
    recorded), checked against the ``architecture`` it is about to be loaded into and the caller's ``kwargs``.

    The recorded arguments override an entry point's own (as a tag's do); the caller's ``in_chans`` and
    ``img_size`` apply over them, and so do its ``input_mean``/``input_std`` at another channel count.

    Raises:
        FileNotFoundError: The file does not exist.
        ValueError: The file was made for another architecture, or a build argument contradicts a recorded one.
    """
    return _checked_record(path, architecture=architecture, kwargs=kwargs)[0]


def _checked_record(path: Path, *, architecture: str,
                    kwargs: Mapping[str, Any]) -> Tuple[Dict[str, Any], Optional[int]]:
    """:func:`recorded_model_args` and the recorded class count (None when not recorded)."""
    if not path.is_file():
        raise FileNotFoundError(f'Pretrained file {path} does not exist; check its path.')
    recorded = recorded_architecture(path)
    if recorded is None:
        return {}, None
    arch, args, classes, where = recorded
    if arch != architecture:
        raise ValueError(f"{path} holds weights for '{arch}' (says {where}), not '{architecture}'; create '{arch}' "
                         f"with it instead.")
    # the caller's input size and channel count apply (timm adapts the weights), and at another channel count
    # so do its own input statistics, as for a tag
    adapted = [k for k in _ADAPTED_ARGS if k in kwargs]
    if 'in_chans' in kwargs and not _same_value(kwargs['in_chans'], args.get('in_chans', 3)):
        adapted += [k for k in ('input_mean', 'input_std') if k in kwargs]
    args = {k: v for k, v in args.items() if k not in adapted}
    clash = _clash(args, kwargs)
    if clash:
        raise ValueError(f'{path} was trained as {architecture} with {clash[0]} (says {where}), which contradicts '
                         f'your {clash[1]}. Drop the argument, or pick the weights made for it.')
    return args, classes


def _built_as_recorded(variant: str, kwargs: Dict[str, Any], caller: Mapping[str, Any], path: Path) -> Dict[str, Any]:
    """``kwargs`` with the ``model_args`` recorded with an untagged overlay's file, and its class count: kept
    where the caller asks for no other (timm then loads the file's head), else a fresh head (a fine-tune)."""
    args, classes = _checked_record(path, architecture=variant, kwargs=caller)
    kwargs = {**kwargs, **{k: v for k, v in args.items() if k not in caller}}
    if classes is not None and caller.get('num_classes', classes) == classes:
        kwargs['num_classes'] = classes
        kwargs['pretrained_cfg_overlay'] = {**kwargs['pretrained_cfg_overlay'], 'num_classes': classes}
    return kwargs


def _clash(trained: Mapping[str, Any], given: Mapping[str, Any]) -> Optional[Tuple[str, str]]:
    """The arguments of ``given`` that contradict those a checkpoint was ``trained`` with, as 'k=v' lists
    (trained, given); None when all agree."""
    keys = [k for k, v in trained.items() if k in given and not _same_value(given[k], v)]
    if not keys:
        return None
    return ', '.join(f'{k}={trained[k]!r}' for k in keys), ', '.join(f'{k}={given[k]!r}' for k in keys)


def _check_caller_args(weights: PretrainedWeights, tag_args: Mapping[str, Any], caller: Mapping[str, Any]) -> None:
    """Refuses a caller's argument that contradicts the architecture a tag was trained with (its entry point's
    arguments and the tag's ``model_args``)."""
    clash = _clash(tag_args, caller)
    if clash:
        raise ValueError(f"'{weights.name}' builds the architecture its checkpoint was trained with ({clash[0]}), "
                         f'which contradicts your {clash[1]}. Drop the argument, or create '
                         f"'{weights.architecture}' without a tag to build your own variant.")


def _resolve(variant: str, pretrained: bool, caller: Dict[str, Any], arch_args: Dict[str, Any]) -> Dict[str, Any]:
    """The build kwargs: the entry point's ``arch_args``, the ``caller``'s, then a manifest tag's ``model_args``
    and weights file (``cache_dir`` still in them)."""
    kwargs = {**arch_args, **caller}
    cfg_arg = kwargs.get('pretrained_cfg')
    if cfg_arg is not None and not isinstance(cfg_arg, str):
        source = cfg_arg.get('source') if isinstance(cfg_arg, Mapping) else getattr(cfg_arg, 'source', None)
        if source in ('hf-hub', 'local-dir') or not _tag_of(cfg_arg):
            return kwargs  # 'hf-hub:org/name' / 'local-dir:' models, or a complete cfg: timm loads them itself
    tag = _tag_of(cfg_arg)
    if tag is None:
        if not pretrained:
            return kwargs
        overlay = kwargs.get('pretrained_cfg_overlay') or {}
        if _own_source(overlay) == 'file':  # the caller's own file: built as recorded with it
            return _built_as_recorded(variant, kwargs, caller, Path(overlay['file']))
        if _own_source(overlay):
            return kwargs  # the caller's own weights (a fine-tune, a download): no manifest entry
        weights = default_entry(variant)
        if weights is None:
            return kwargs
        if cfg_arg is None:
            kwargs['pretrained_cfg'] = weights.tag
    else:
        weights = get_manifest().get(f'{variant}.{tag}')
        if weights is None:
            return kwargs  # a tag from the family's own default_cfgs
        from .registry import is_registered, register_manifest

        if not is_registered(weights.name):  # from a folder named in the environment after the import
            register_manifest()

    # a tag always builds the architecture it was trained with: its arguments override the entry point's
    args = dict(weights.model_args)
    skipped = ()
    if kwargs.get('in_chans', weights.input_size[0]) != weights.input_size[0]:
        # the checkpoint's per-channel input statistics cannot fit another channel count: the caller's apply
        skipped = tuple(k for k in ('input_mean', 'input_std') if k in caller)
        for k in skipped:
            args.pop(k, None)
    _check_caller_args(weights, {**{k: v for k, v in arch_args.items() if k not in skipped}, **args}, caller)
    kwargs.update(args)
    if not pretrained:
        return kwargs

    overlay = dict(kwargs.get('pretrained_cfg_overlay') or {})
    source = _own_source(overlay)
    if source == 'file':
        check_weights_file(Path(overlay['file']), weights)
    if source == 'url' and 'hf_hub_id' not in overlay:
        overlay['hf_hub_id'] = None  # timm prefers the tag's Hub id to a url
        kwargs['pretrained_cfg_overlay'] = overlay
    if source is not None:
        return kwargs  # the caller's own weights: timm loads them, the manifest's file is not fetched
    from .hub import download_weights, packaged_weights_file

    if weights.package_file is not None:
        path = packaged_weights_file(weights)
    elif not weights.published:
        raise RuntimeError(_not_published_message(weights))
    else:
        path = download_weights(weights, cache_dir=kwargs.get('cache_dir'))
    check_weights_file(path, weights)
    overlay['file'] = str(path)
    kwargs['pretrained_cfg_overlay'] = overlay
    return kwargs
