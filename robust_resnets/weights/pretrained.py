"""Hook that every model family's ``_create_*`` calls before timm builds a model with pretrained weights.

For a manifest tag (``timm.create_model('robust_resnet_a1.cifar10_trades', pretrained=True)``) it
merges the checkpoint's ``model_args`` into the build kwargs, finds the weights file (shipped inside
the package when the entry has a ``package_file``, else ``model.safetensors`` through the Hugging
Face cache), checks its sha256 against the manifest and hands the local file to timm with
``pretrained_cfg_overlay=dict(file=...)``; timm then loads it with the family's checkpoint
filter. timm itself never reaches the Hub, so this works with every timm >= 1.0.9. A local file
given as ``pretrained_cfg_overlay=dict(file=...)`` is used as is (it must be a ``.safetensors``).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, Mapping, Optional

from timm.models import is_model_pretrained

from .manifest import PretrainedWeights, entries_for_architecture, get_manifest

__all__ = ['resolve_pretrained_kwargs', 'check_weights_file']


def _tag_of(pretrained_cfg: Any) -> Optional[str]:
    if pretrained_cfg is None or isinstance(pretrained_cfg, str):
        return pretrained_cfg or None
    tag = pretrained_cfg.get('tag') if isinstance(pretrained_cfg, Mapping) else getattr(pretrained_cfg, 'tag', None)
    return tag or None


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
        f"pretrained_cfg_overlay=dict(file='./{weights.name}/model.safetensors')).")


def check_weights_file(path: Path, weights: PretrainedWeights) -> None:
    """Checks that a weights file is a safetensors file made for this entry (architecture, class count).

    Raises:
        FileNotFoundError: The file does not exist.
        ValueError: It is not a safetensors file, or its metadata names another architecture or class count.
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
    classes = meta.get('num_classes')
    if classes and int(classes) != weights.num_classes:
        raise ValueError(f'{path} has a {classes}-class head but {weights.name} has {weights.num_classes} classes '
                         f'({weights.dataset}); use the file made for {weights.name}. To fine-tune on another class '
                         f'count, pass num_classes=N to create_model instead.')


def _default_entry(variant: str) -> Optional[PretrainedWeights]:
    """The tag an untagged ``pretrained=True`` resolves to: the first entry that fits the plain architecture."""
    entries = entries_for_architecture(variant)
    plain = [w for w in entries if not w.model_args]
    if entries and not plain:
        raise RuntimeError(f"'{variant}' has no untagged pretrained weights; its checkpoints need specific "
                           f"arguments, so name one: {[w.name for w in entries]}.")
    return plain[0] if plain else None


def resolve_pretrained_kwargs(variant: str, pretrained: bool, kwargs: Dict[str, Any]) -> Dict[str, Any]:
    """Returns the ``build_model_with_cfg`` kwargs for ``variant`` with the manifest's weights resolved.

    Args:
        variant: Architecture name (no tag).
        pretrained: Whether weights are requested.
        kwargs: The entry point's kwargs, including timm's ``pretrained_cfg`` (a tag, a dict or None),
            ``pretrained_cfg_overlay`` and ``cache_dir``.

    Raises:
        RuntimeError: The weights are not published, not cached while offline, failed to download, or
            (shipped in the package) missing from this installation.
        ChecksumError: The file differs from the manifest (never loaded; a Hub download is also deleted).
        ValueError: A local file does not fit the architecture.
    """
    kwargs = dict(kwargs)
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
        if overlay.get('file') or overlay.get('state_dict') is not None:
            return kwargs  # the caller's own weights (a training run's export, a fine-tune): no manifest entry
        weights = _default_entry(variant)
        if weights is None:
            return kwargs
        if cfg_arg is None:
            kwargs['pretrained_cfg'] = weights.tag
    else:
        weights = get_manifest().get(f'{variant}.{tag}')
        if weights is None:
            return kwargs  # a tag from the family's own default_cfgs
        if not is_model_pretrained(weights.name):  # from a folder named in the environment after the import
            from .registry import register_manifest

            register_manifest()

    # the checkpoint's arguments override the entry point's defaults (which arrive here merged with the
    # caller's kwargs, so the two cannot be told apart): a tag always builds the architecture it was trained with
    args = dict(weights.model_args)
    if kwargs.get('in_chans', weights.input_size[0]) != weights.input_size[0]:
        # the checkpoint's per-channel input statistics cannot fit another channel count: the caller's apply
        for k in ('input_mean', 'input_std'):
            if k in kwargs:
                args.pop(k, None)
    kwargs.update(args)
    if not pretrained:
        return kwargs

    overlay = dict(kwargs.get('pretrained_cfg_overlay') or {})
    if overlay.get('state_dict') is not None:
        return kwargs
    if overlay.get('file'):
        check_weights_file(Path(overlay['file']), weights)
        return kwargs
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
