"""The evaluation result: a validated JSON document, its summary table, and reading it back.

One file holds everything an evaluation measured, so that ``register`` can log it and a person can
read it: per norm clean and robust accuracy with the per-attack breakdown and per-image outcome,
the eps and resolution sweeps, corruption accuracy, the guards, and what was evaluated (model
reference and weights hash, data, n, resolution, version, seed, wall time).

Every clean and robust accuracy carries its 95 % Wilson interval (``*_interval``, fractions), so a
small evaluation reads as what it is; a file written before the intervals existed gets them
computed from its counts when it is read.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

from pydantic import Field, ValidationError, model_validator
from rich.markup import escape
from rich.table import Table

from raytrain_at.config_loader import StrictModel
from raytrain_at.errors import UserError
from raytrain_at.evaluation.intervals import accuracy_interval, interval_text
from raytrain_at.evaluation.threats import ThreatModel

FORMAT = "raytrain_at.evaluation/1"
# A 95 % Wilson interval (low, high) of an accuracy, as fractions.
Interval = tuple[float, float]


def _fill(model, name: str, value) -> None:
    """Set a derived field inside an after-validator (plain assignment would validate again)."""
    model.__dict__[name] = value


class ModelInfo(StrictModel):
    reference: str
    weights_sha256: str
    name: str
    stem: str | None = None
    num_classes: int
    trained_resolution: int
    source_run: str | None = None


class DataInfo(StrictModel):
    path: str
    n: int = Field(gt=0)
    resolution: int = Field(gt=0)
    crop_pct: float
    # The preprocessing the attacks saw, spelled out (results written before it existed: None).
    resize_side: int | None = None
    preprocessing: str | None = None


class ThreatResult(StrictModel):
    norm: str
    eps: float = Field(gt=0)
    clean_accuracy: float = Field(ge=0, le=1)
    robust_accuracy: float = Field(ge=0, le=1)
    after_attack: dict[str, float]
    broken_by: dict[str, int]
    max_perturbation: float
    status: list[str] = Field(
        description="per image: misclassified, the breaking attack, or robust")
    unconfirmed: int = Field(0, description="fast kernels: breaks the exact model did not "
                             "confirm (those images were attacked again with exact kernels)")
    clean_interval: Interval | None = None
    robust_interval: Interval | None = None

    @property
    def n(self) -> int:
        return len(self.status)

    @model_validator(mode="after")
    def _intervals(self) -> ThreatResult:
        """95 % Wilson intervals over the images attacked (one status each)."""
        if self.status:
            if self.clean_interval is None:
                _fill(self, "clean_interval", accuracy_interval(self.clean_accuracy, self.n))
            if self.robust_interval is None:
                _fill(self, "robust_interval", accuracy_interval(self.robust_accuracy, self.n))
        return self


class SweepPoint(StrictModel):
    eps: float
    robust_accuracy: float
    robust_interval: Interval | None = None


class EpsSweep(StrictModel):
    norm: str
    version: str
    clean_accuracy: float
    points: list[SweepPoint]
    expected_robustness: float
    clean_interval: Interval | None = None
    plot: str | None = None


class ResolutionPoint(StrictModel):
    resolution: int
    clean_accuracy: float
    robust_accuracy: dict[str, float]
    eps: dict[str, float]
    clean_interval: Interval | None = None
    robust_interval: dict[str, Interval] | None = None


class ResolutionSweep(StrictModel):
    version: str
    points: list[ResolutionPoint]
    best_resolution: int
    plot: str | None = None


class CorruptionResult(StrictModel):
    """``mix``: one type per image at ``severity``; ``imagenet-c``: every type at severities 1-5
    (``severity`` 0), ``accuracy`` the mean over the 75 (type, severity) accuracies."""

    severity: int
    seed: int
    accuracy: float
    per_corruption: dict[str, float]
    counts: dict[str, int]
    protocol: str = "mix"
    per_severity: dict[str, float] | None = None


class GuardOutcome(StrictModel):
    name: str
    passed: bool
    detail: str


class EvaluationResult(StrictModel):
    format: str = FORMAT
    model: ModelInfo
    data: DataInfo
    version: str
    seed: int
    batch_size: int
    workers: int
    clean_accuracy: float
    # exact | fast (raytrain_at.evaluation.kernels); results written before it existed are exact.
    kernels: str = "exact"
    threats: dict[str, ThreatResult]
    eps_sweep: EpsSweep | None = None
    resolution_sweep: ResolutionSweep | None = None
    corruptions: CorruptionResult | None = None
    guards: list[GuardOutcome]
    trustworthy: bool
    wall_seconds: float
    code_version: str
    created: str
    clean_interval: Interval | None = None

    @model_validator(mode="after")
    def _intervals(self) -> EvaluationResult:
        """95 % Wilson intervals of the overall clean accuracy and the sweeps' points (the
        sweeps attack the same ``data.n`` images)."""
        n = self.data.n
        if self.clean_interval is None:
            _fill(self, "clean_interval", accuracy_interval(self.clean_accuracy, n))
        if self.eps_sweep is not None:
            sweep = self.eps_sweep
            if sweep.clean_interval is None:
                _fill(sweep, "clean_interval", accuracy_interval(sweep.clean_accuracy, n))
            for point in sweep.points:
                if point.robust_interval is None:
                    _fill(point, "robust_interval", accuracy_interval(point.robust_accuracy, n))
        for point in self.resolution_sweep.points if self.resolution_sweep else []:
            if point.clean_interval is None:
                _fill(point, "clean_interval", accuracy_interval(point.clean_accuracy, n))
            if point.robust_interval is None:
                _fill(point, "robust_interval", {norm: accuracy_interval(value, n)
                                                 for norm, value in point.robust_accuracy.items()})
        return self

    def metrics(self) -> dict[str, float]:
        """Flat metrics, as the registry logs them (fractions)."""
        out = {"clean_acc": self.clean_accuracy}
        for norm, threat in self.threats.items():
            out[f"robust_acc_{norm}"] = threat.robust_accuracy
        if self.corruptions is not None:
            out["corruption_acc"] = self.corruptions.accuracy
        if self.eps_sweep is not None:
            out[f"expected_robustness_{self.eps_sweep.norm}"] = self.eps_sweep.expected_robustness
        return out


def write_result(result: EvaluationResult, path: str | Path) -> Path:
    """Write atomically (a reader never sees half a file)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    with os.fdopen(handle, "w") as out:
        out.write(result.model_dump_json(indent=1))
    os.replace(tmp, path)
    return path


def read_result(path: str | Path) -> EvaluationResult:
    """Read and validate a result file; one-line errors for a missing or malformed file."""
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as exc:
        raise UserError(f"evaluation result {str(path)!r}: {exc.strerror or exc}") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise UserError(f"evaluation result {str(path)!r} is not JSON ({exc.msg} at line "
                        f"{exc.lineno})") from None
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise UserError(f"evaluation result {str(path)!r} is not a raytrain-at evaluation "
                        f"(format {data.get('format') if isinstance(data, dict) else None!r}, "
                        f"expected {FORMAT!r})")
    try:
        return EvaluationResult.model_validate(data)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"])
        raise UserError(f"evaluation result {str(path)!r}: {where}: {first['msg']}") from None


def _with_interval(accuracy: float, interval: Interval | None) -> str:
    """``87.5% [52.9, 97.8]`` (the interval in percent)."""
    return f"{accuracy:.1%} {interval_text(interval)}".rstrip()


def summary_table(result: EvaluationResult):
    """A rich table of the result (one screen)."""
    # The model by name and weights hash: a checkpoint path would wrap over several lines
    # (the result JSON and the caller's output carry the full reference).
    # Escaped: rich would read a bracketed hash that starts with a letter as a style tag.
    table = Table(title=escape(f"AutoAttack ({result.version}) - {result.model.name} "
                               f"[{result.model.weights_sha256[:12]}] - n={result.data.n} at "
                               f"{result.data.resolution}px"))
    table.add_column("threat")
    table.add_column("clean [95 % CI]", justify="right")
    table.add_column("robust [95 % CI]", justify="right")
    table.add_column("after each attack", justify="left")
    for threat in result.threats.values():
        steps = ", ".join(f"{a} {v:.1%}" for a, v in threat.after_attack.items())
        table.add_row(ThreatModel(threat.norm, threat.eps).label(),
                      _with_interval(threat.clean_accuracy, threat.clean_interval),
                      _with_interval(threat.robust_accuracy, threat.robust_interval), steps)
    if result.eps_sweep is not None:
        sweep = result.eps_sweep
        points = ", ".join(f"{ThreatModel(sweep.norm, p.eps).label().split()[1]} "
                           f"{p.robust_accuracy:.1%} {interval_text(p.robust_interval, 0)}"
                           for p in sweep.points)
        table.add_row(f"{sweep.norm} sweep ({sweep.version})",
                      _with_interval(sweep.clean_accuracy, sweep.clean_interval),
                      f"E={sweep.expected_robustness:.1%}", points)
    if result.resolution_sweep is not None:
        res = result.resolution_sweep
        points = ", ".join(f"{p.resolution}: " + "/".join(f"{v:.1%}" for v in
                                                          p.robust_accuracy.values())
                           for p in res.points)
        table.add_row(f"resolution ({res.version})", "", f"best {res.best_resolution}", points)
    if result.corruptions is not None:
        c = result.corruptions
        label = ("ImageNet-C mean (15 types x 5 severities)" if c.protocol == "imagenet-c"
                 else f"corruptions s{c.severity}")
        table.add_row(label, f"{c.accuracy:.1%}", "", "")
    failed = [g.name for g in result.guards if not g.passed]
    table.caption = ("all guards passed" if not failed
                     else "UNTRUSTWORTHY - failed guards: " + ", ".join(failed)) + escape(
        f"; [low, high]: 95 % Wilson interval over n={result.data.n}")
    return table
