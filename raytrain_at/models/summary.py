"""One model described: name, stem, size, and what a weight load did."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from raytrain_at.models import create_robust_model, stem_spec_of, unwrap
from raytrain_at.models.complexity import complexity
from raytrain_at.models.stems import design_name
from raytrain_at.models.weights import load_backbone_weights


def describe_model(name: str, *, stem: str | None = None, weights: str | Path | None = None,
                   resolution: int = 224, num_classes: int = 1000) -> dict[str, Any]:
    """Build ``name`` (with an optional stem spec and clean weights) and describe it.

    Raises:
        UserError: unknown name, bad stem spec, unreadable or non-fitting checkpoint, bad
        resolution.
    """
    model = create_robust_model(name, num_classes=num_classes, stem=stem, resolution=resolution)
    report = None
    if weights is not None:
        report = load_backbone_weights(model, weights, model_name=name).summary()
    size = complexity(model, resolution)
    spec = stem_spec_of(unwrap(model))
    return {"model": name, "stem": design_name(spec) or "PatchStem", "stem_spec": spec,
            "num_classes": num_classes, "resolution": resolution,
            "params_m": round(size.params_m, 4), "flops_g": round(size.flops_g, 4),
            "weights": str(weights) if weights else None, "load_report": report}
