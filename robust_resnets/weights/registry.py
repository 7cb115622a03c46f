"""Puts every manifest entry into timm's pretrained cfg registry.

Every tag gets its pretrained cfg (``timm.create_model('arch.tag')`` builds it, and ``pretrained=True`` on a tag
whose weights are not published says where the original lives); ``timm.list_pretrained`` lists only the tags
whose weights can load (published on the Hub, or shipped inside the package). All tags:
``timm.list_models('arch*', include_tags=True)`` or ``robust_resnets.weights.get_manifest()``.
"""
from __future__ import annotations

import dataclasses
from typing import List, Mapping, Optional

from timm.models import get_pretrained_cfg, is_model
from timm.models import _registry as timm_registry
from timm.models._pretrained import DefaultCfg, PretrainedCfg

from .manifest import PretrainedWeights, get_manifest

__all__ = ['pretrained_cfg_for', 'register_manifest', 'is_registered', 'has_weights']


def has_weights(weights: PretrainedWeights) -> bool:
    """Whether the entry's weights can load: published on the Hub, or shipped inside the package."""
    return weights.published or weights.package_file is not None


def is_registered(name: str) -> bool:
    """Whether timm knows the pretrained cfg of ``arch.tag``."""
    return name in timm_registry._model_pretrained_cfgs


def pretrained_cfg_for(weights: PretrainedWeights, base: Optional[PretrainedCfg] = None) -> PretrainedCfg:
    """The timm pretrained cfg of a manifest entry, on top of the architecture's untagged cfg.

    Models take [0, 1] pixels (normalisation, where a checkpoint needs it, is inside the model), so
    mean and std are 0 and 1. The weight source is the Hub id; the loading hook resolves and checks
    the file before timm sees it.
    """
    base = base or PretrainedCfg()
    chans = weights.input_size[0]
    paper = weights.paper
    notes = tuple(n for n in (
        f'{weights.threat_model} eps={weights.eps}' if weights.threat_model else 'clean (not adversarially trained)',
        f'training: {weights.training}',
        f'extra data: {weights.extra_data}' if weights.extra_data else None,
        'weights shipped inside the package' if weights.package_file else
        None if weights.published else 'not yet published: see robust_resnets.weights.get_weights(name).original',
    ) if n)
    return dataclasses.replace(
        base,
        url=None, file=None, state_dict=None, source=None,
        hf_hub_id=weights.hf_hub_id, hf_hub_filename=weights.hf_filename,
        architecture=weights.architecture, tag=weights.tag,
        num_classes=weights.num_classes, input_size=tuple(weights.input_size),
        crop_pct=weights.crop_pct, interpolation=weights.interpolation,
        mean=(0.0,) * chans, std=(1.0,) * chans,
        license=weights.license, paper_name=paper['title'], paper_ids=f"arXiv:{paper['arxiv']}",
        origin_url=weights.original['locations'][0], notes=notes,
    )


def register_manifest(manifest: Optional[Mapping[str, PretrainedWeights]] = None) -> List[str]:
    """Registers the manifest's tags with timm and returns the names registered.

    Every tag gets its pretrained cfg; only those whose weights can load (:func:`has_weights`) are marked
    pretrained, so ``timm.list_pretrained`` lists them alone. Entries whose architecture is not registered
    with timm yet are skipped (call again once its family is imported). Calling twice updates the cfgs in
    place.
    """
    manifest = get_manifest() if manifest is None else manifest
    done: List[str] = []
    for name, weights in manifest.items():
        arch, tag = weights.architecture, weights.tag
        if not is_model(arch):
            continue
        cfg = pretrained_cfg_for(weights, get_pretrained_cfg(arch) or PretrainedCfg())
        default_cfg = timm_registry._model_default_cfgs.setdefault(arch, DefaultCfg())
        if tag not in default_cfg.cfgs:
            default_cfg.tags.append(tag)
        default_cfg.cfgs[tag] = cfg
        timm_registry._model_pretrained_cfgs[name] = cfg
        if has_weights(weights):
            timm_registry._model_has_pretrained.add(name)
        else:  # also when a re-read manifest no longer publishes it
            timm_registry._model_has_pretrained.discard(name)
        with_tags = timm_registry._model_with_tags[arch]
        if name not in with_tags:
            with_tags.append(name)
        done.append(name)
    return done
