"""Pretrained weights: the manifest, Hugging Face Hub loading, converters and publishing."""
from .pretrained import resolve_pretrained_kwargs

__all__ = ['resolve_pretrained_kwargs']
