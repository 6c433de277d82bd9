"""An evaluation in RobustBench's model-info form, to set a result beside its leaderboard.

RobustBench keeps one JSON file per model and threat model (``model_info/imagenet/Linf/NAME.json``)
with the clean and AutoAttack accuracies as percentage strings and the radius as text
(``"4/255"`` for l_inf). We write one such record per evaluated norm, keyed by RobustBench's
threat-model name (``Linf``, ``L2``, ``L1``), and add what their files leave implicit because
their data set is fixed: the number of images and the data the attack ran on.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

from raytrain_at.errors import UserError
from raytrain_at.evaluation.result import EvaluationResult
from raytrain_at.evaluation.threats import AUTOATTACK_NORMS

THREAT_MODELS = AUTOATTACK_NORMS  # RobustBench names its threat models as AutoAttack does


def _eps_text(norm: str, eps: float) -> str:
    steps = eps * 255
    if norm == "linf" and abs(steps - round(steps)) < 1e-6:
        return f"{round(steps)}/255"
    return f"{eps:g}"


def model_info(result: EvaluationResult) -> dict[str, dict[str, Any]]:
    """RobustBench-style records of ``result``, one per threat model."""
    imported = result.model.reference
    out = {}
    for norm, threat in result.threats.items():
        out[THREAT_MODELS[norm]] = {
            "name": result.model.name, "architecture": result.model.name,
            "threat_model": THREAT_MODELS[norm], "eps": _eps_text(norm, threat.eps),
            "clean_acc": f"{100 * threat.clean_accuracy:.2f}",
            "autoattack_acc": f"{100 * threat.robust_accuracy:.2f}",
            "dataset": "imagenet" if result.model.num_classes == 1000 else "other",
            "data": result.data.path, "n": result.data.n,
            "resolution": result.data.resolution, "crop_pct": result.data.crop_pct,
            "attack_version": result.version, "seed": result.seed,
            "additional_data": False, "number_forward_passes": 1,
            # RobustBench flags entries whose evaluation it cannot vouch for; a failed guard or
            # a non-standard attack is exactly that.
            "unreliable": not result.trustworthy or result.version != "standard",
            "footnote": f"raytrain-at evaluation of {imported} on {result.data.n} images "
                        f"(weights sha256 {result.model.weights_sha256[:12]})",
            "link": "", "authors": "", "venue": "", "reported": "",
        }
    return out


def check_writable(path: str | Path) -> Path:
    """Fail before the attack runs if the file cannot be written where asked."""
    path = Path(path)
    if path.suffix != ".json":
        raise UserError(f"--robustbench-json {str(path)!r}: give a .json file name")
    if not path.parent.exists():
        raise UserError(f"--robustbench-json {str(path)!r}: folder {str(path.parent)!r} "
                        "does not exist")
    return path


def write_model_info(result: EvaluationResult, path: str | Path) -> Path:
    """Write :func:`model_info` atomically to ``path``."""
    path = check_writable(path)
    handle, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    with os.fdopen(handle, "w") as out:
        json.dump(model_info(result), out, indent=1)
    os.replace(tmp, path)
    return path
