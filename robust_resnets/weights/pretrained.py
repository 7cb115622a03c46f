"""Hook that every model family's ``_create_*`` calls before timm builds a model with pretrained weights."""
from __future__ import annotations

from typing import Any, Dict


def resolve_pretrained_kwargs(variant: str, pretrained: bool, kwargs: Dict[str, Any]) -> Dict[str, Any]:
    """Returns the ``build_model_with_cfg`` kwargs with the pretrained file resolved (placeholder: unchanged)."""
    return kwargs
