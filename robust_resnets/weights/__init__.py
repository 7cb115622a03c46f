"""Pretrained weights: the manifest, Hugging Face Hub loading, converters and publishing.

Light at import: huggingface_hub, safetensors and the converters load only when used.
"""
from .manifest import (
    ManifestError, PretrainedWeights, add_manifest_dir, entries_for_architecture, get_manifest, get_weights,
    load_manifest,
)
from .pretrained import resolve_pretrained_kwargs

__all__ = [
    'ManifestError', 'PretrainedWeights', 'add_manifest_dir', 'entries_for_architecture', 'get_manifest',
    'get_weights', 'load_manifest', 'resolve_pretrained_kwargs', 'register_manifest',
]


def register_manifest(*args, **kwargs):
    """Registers the manifest's tags with timm (see :func:`robust_resnets.weights.registry.register_manifest`)."""
    from .registry import register_manifest as _register

    return _register(*args, **kwargs)
