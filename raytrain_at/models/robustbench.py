"""The paper's published checkpoints, as RobustBench distributes them, imported as model files.

The entries and their key layout are in :mod:`raytrain_at.models.robustbench_layout` (training
can also start from such a checkpoint directly). Checkpoints are read as RobustBench reads them:
a plain state dict, or one inside ``state_dict``, with or without a ``module.`` prefix; torch
files are read with ``weights_only=True`` (no unpickling).
"""

from __future__ import annotations

import logging
from pathlib import Path

from raytrain_at.errors import UserError
from raytrain_at.models.model_files import ModelSpec, file_sha256, save_model_file
from raytrain_at.models.robustbench_layout import ENTRIES, RobustBenchEntry, renamed_state

__all__ = ["ENTRIES", "PREFIX", "RobustBenchEntry", "entry_for", "entry_spec",
           "import_robustbench"]

log = logging.getLogger(__name__)

PREFIX = "robustbench:"


def entry_for(source: str) -> tuple[str, RobustBenchEntry]:
    """The entry ``robustbench:NAME`` names.

    Raises:
        UserError: not a ``robustbench:`` source, or an entry we cannot import.
    """
    if not source.startswith(PREFIX):
        raise UserError(f"import source {source!r}: expected robustbench:NAME, e.g. "
                        f"{PREFIX}{next(iter(ENTRIES))}")
    name = source[len(PREFIX):]
    if name not in ENTRIES:
        raise UserError(f"unknown RobustBench model {name!r} (importable: "
                        f"{', '.join(ENTRIES)})")
    return name, ENTRIES[name]


def entry_spec(entry: RobustBenchEntry) -> ModelSpec:
    """The spec of an imported model: 1,000 classes, 224 px, bicubic 256 -> 224 crop (the
    entries' ``BicubicRes256Crop224`` preprocessing), the entry's normalisation."""
    mean, std = entry.normalisation
    return ModelSpec(name=entry.model, num_classes=1000, resolution=224, crop_pct=0.875,
                     mean=mean, std=std)


def import_robustbench(source: str, checkpoint: str | Path, out: str | Path) -> Path:
    """Import a RobustBench checkpoint of the paper's models as a project model file.

    Args:
        source: ``robustbench:NAME``, e.g. ``robustbench:Singh2023Revisiting_ConvNeXt-T-ConvStem``.
        checkpoint: the downloaded checkpoint (``.pt`` / ``.pth`` / ``.safetensors``).
        out: the model file to write (atomically; nothing is written on an error).

    Returns:
        The written path.

    Raises:
        UserError: unknown name, unreadable checkpoint, or one of another architecture.
    """
    from raytrain_at.models.weights import read_state_dict

    name, entry = entry_for(source)
    out = Path(out)
    if out.suffix != ".safetensors":
        raise UserError(f"--out {str(out)!r}: a model file ends in .safetensors")
    state = renamed_state(read_state_dict(str(checkpoint)), entry, name, str(checkpoint))
    spec = entry_spec(entry)
    model = spec.build()
    try:
        missing, unexpected = model.backbone.load_state_dict(state, strict=False)
    except RuntimeError as exc:  # shapes that do not fit
        first = next((line.strip() for line in str(exc).splitlines()
                      if "size mismatch" in line), str(exc).splitlines()[0])
        raise UserError(f"checkpoint {str(checkpoint)!r} does not fit {name} ({entry.model}): "
                        f"{first[:240]}") from None
    if missing or unexpected:
        raise UserError(f"checkpoint {str(checkpoint)!r} does not fit {name} ({entry.model}): "
                        f"{len(missing)} tensors missing, {len(unexpected)} unexpected, e.g. "
                        f"{(list(missing) + list(unexpected))[:2]}")
    path = save_model_file(out, model.eval(), spec, {
        "raytrain_at.imported_from": source,
        "raytrain_at.checkpoint_sha256": file_sha256(checkpoint)})
    log.info("imported %s from %s into %s", name, checkpoint, path)
    return path
