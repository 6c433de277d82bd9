"""raytrain_at: adversarially robust ImageNet classifiers trained at cluster scale.

Importing :mod:`raytrain_at.models` (which :func:`create_robust_model` and :func:`load_model` do)
registers the project's models with timm (``convnext_tiny_cvst`` ...). The package itself imports
nothing heavy, so ``raytrain-at --help`` answers without loading torch, timm, Ray or MLflow.
"""

from __future__ import annotations

import importlib
from typing import Any

from raytrain_at.errors import UserError

__version__ = "0.1.0"
__all__ = ["UserError", "__version__", "create_robust_model", "load_model"]

# Public names that need torch / timm, imported on first use (PEP 562).
_LAZY = {"create_robust_model": "raytrain_at.models", "load_model": "raytrain_at.model_refs"}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'raytrain_at' has no attribute {name!r}")
