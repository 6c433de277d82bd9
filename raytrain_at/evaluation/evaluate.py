"""``raytrain-at evaluate``: everything one evaluation does, from references to the result file.

Validate the request (model, data, radii, sizes) before any attack runs; then AutoAttack per norm
(sharded, resumable), the optional eps sweep, resolution sweep and corruption accuracy; the
guards; and one result JSON with its plots next to it.
"""

from __future__ import annotations

import datetime as dt
import logging
import math
import time
from pathlib import Path
from typing import Any, cast

from pydantic import Field

import raytrain_at
from raytrain_at.config_loader import validate
from raytrain_at.data.provenance import verify_beton
from raytrain_at.errors import UserError
from raytrain_at.evaluation import guards as checks
from raytrain_at.evaluation.corruption_accuracy import corruption_accuracy_on_device
from raytrain_at.evaluation.device_choice import evaluation_uses_gpu
from raytrain_at.evaluation.result import (DataInfo, EpsSweep, EvaluationResult, GuardOutcome,
                                           ModelInfo, ResolutionPoint, ResolutionSweep, SweepPoint,
                                           ThreatResult, write_result)
from raytrain_at.evaluation.runner import EvalJob, ThreatOutcome, merge, run_job
from raytrain_at.evaluation.settings import EvaluationSettings
from raytrain_at.evaluation.sweeps import expected_robustness, plot_eps_sweep, plot_resolution_sweep
from raytrain_at.evaluation.threats import PAPER_EPS, Norm, ThreatModel, scaled_eps
from raytrain_at.models.model_files import LoadedModel
from raytrain_at.runtime.storage import check_root, default_home, explicit_root, require_shared_root
from raytrain_at.runtime.ray_init import init_ray
log = logging.getLogger(__name__)


class EvaluationRequest(EvaluationSettings):
    """What to evaluate and how: the evaluation settings plus the model and data they apply to.

    Build it with :func:`evaluation_request` (one-line errors naming the setting) or directly
    (pydantic's errors). Radii are in [0, 1] pixel units (l_inf 4/255 = 4 grey levels).

    Attributes:
        model_ref: a model file, checkpoint folder, ``runs:/ID/model`` or ``models:/NAME@ALIAS``.
        data: a .beton file, or a bundled dataset's name (its test split).
        out: the result JSON (None: ``evaluation-<weights hash>.json`` here).
        state_root: where the resumable chunk records go (a folder or ``s3://``).
        address: the Ray cluster to join (None: local Ray when workers > 1).
        use_gpu: one GPU per worker (None: where this machine has GPUs; with ``address``, where
            the cluster has GPUs up or node types that have them, else a one-line error asking
            for True or False: :mod:`raytrain_at.evaluation.device_choice`).
        tracking_uri: the MLflow tracking URI that ``runs:/`` / ``models:/`` resolve against.
    """

    model_ref: str = Field(min_length=1)
    data: str = Field(min_length=1)
    out: Path | None = None
    state_root: str | Path | None = None
    address: str | None = None
    use_gpu: bool | None = None
    tracking_uri: str | None = None


def evaluation_request(**values: Any) -> EvaluationRequest:
    """An :class:`EvaluationRequest`, validated; a bad value is a one-line :class:`UserError`
    naming the setting (``evaluation setting 'severity': ... (got 7)``)."""
    return validate(EvaluationRequest, values, noun="evaluation setting")


def resize_side(resolution: int, crop_pct: float) -> int:
    """The side the shorter image side is resized to before the centre crop (as the decoder
    computes it: ``floor(resolution / crop_pct)``)."""
    return math.floor(resolution / crop_pct)


def preprocessing_text(resolution: int, crop_pct: float) -> str:
    """The evaluation preprocessing in words, as the result JSON records it."""
    if crop_pct >= 1.0:
        return (f"no crop: shorter side resized (bicubic) to {resolution} px; images stored at "
                f"{resolution} px (CIFAR at 32) reach the attack as stored")
    return (f"bicubic resize of the shorter side to {resize_side(resolution, crop_pct)} px, "
            f"centre crop {resolution}x{resolution} (crop_pct {crop_pct:g})")


def resolve_data(data: str, storage: Path) -> str:
    """A .beton path, or a bundled dataset's test split written once under ``storage``."""
    from raytrain_at.data.ffcv_loaders import inspect_beton
    from raytrain_at.data.write import BUNDLED, bundled_beton

    if data in BUNDLED:
        path = Path(bundled_beton(data, "test", storage))
        verify_beton(path, "--data")
        return str(path)
    path = Path(data).expanduser()
    inspect_beton(path)  # one-line errors for missing, foreign or truncated files
    verify_beton(path, "--data")  # and for one that differs from its recorded checksum
    # Absolute but not resolved: a staged file's link (the same path on every node) is what
    # workers open, not where it points on the driver's node.
    return str(path.absolute())


def _threat_result(outcome: ThreatOutcome) -> ThreatResult:
    return ThreatResult(norm=outcome.threat.norm, eps=outcome.threat.eps,
                        clean_accuracy=outcome.clean_accuracy,
                        robust_accuracy=outcome.robust_accuracy,
                        after_attack=outcome.after_attack, broken_by=outcome.broken_by,
                        max_perturbation=outcome.max_perturbation, status=outcome.status,
                        unconfirmed=outcome.unconfirmed)


def _outcome_guards(outcomes: list[ThreatOutcome]) -> list[checks.Guard]:
    found: list[checks.Guard] = []
    seen: dict[str, str] = {}
    for outcome in outcomes:
        label = outcome.threat.key
        seen.update(outcome.warnings)
        found.append(checks.robust_not_above_clean(label, outcome.clean_accuracy,
                                                   outcome.robust_accuracy))
        found.append(checks.perturbation_inside_ball(label, outcome.threat.eps,
                                                     outcome.max_perturbation))
        if "square" in outcome.broken_by:
            found.append(checks.square_found_little(label, outcome.broken_by["square"],
                                                    outcome.n))
    return checks.autoattack_guards(seen) + found


class Evaluation:
    """One evaluation request, validated at construction and run by :meth:`run`."""

    def __init__(self, request: EvaluationRequest) -> None:
        from raytrain_at.data.ffcv_loaders import inspect_beton
        from raytrain_at.data.inspection import beton_labels
        from raytrain_at.model_refs import resolve_model

        self.request = request
        home = default_home()
        explicit = explicit_root(str(request.state_root) if request.state_root else None)
        if request.address is not None:
            init_ray(request.address)
            require_shared_root(explicit, "evaluation")
        # One device for the attacks, the sweeps and the corruptions, chosen before anything is
        # written (with --address and nothing to tell by, the one line asking for the flag).
        self.use_gpu = evaluation_uses_gpu(request.use_gpu, request.address)
        # The chunk records: under the shared storage root (every node writes, the driver
        # merges), else this machine's home.
        if request.state_root and explicit:
            self.state_root: str = explicit
        elif explicit:
            self.state_root = f"{explicit}/eval-state"
        else:
            self.state_root = str(home / "eval-state")
        check_root(self.state_root)
        self.loaded: LoadedModel = resolve_model(request.model_ref,
                                                 tracking_uri=request.tracking_uri)
        self.spec = self.loaded.spec
        self.data_path = resolve_data(request.data, home)
        available = inspect_beton(self.data_path).num_samples
        n = request.n or available
        if n > available:
            raise UserError(f"--n {n} exceeds the {available} images of {request.data!r}")
        self.ids = list(range(n))
        top = int(beton_labels(self.data_path)[:n].max())
        if top >= self.spec.num_classes:
            raise UserError(f"{request.data!r} has label {top}, but the model has "
                            f"{self.spec.num_classes} classes")
        self.resolution = request.resolution or self.spec.resolution
        # Validate the resolutions on the model itself (ViT patch grid, minimum side) now.
        for side in {self.resolution, *(request.resolution_sweep or [])}:
            if side != self.spec.resolution:
                from raytrain_at.models import set_test_resolution, unwrap

                set_test_resolution(unwrap(self.spec.build()), side)
        self.out = Path(request.out or f"evaluation-{self.loaded.weights_sha256[:10]}.json")

    def threat(self, norm: Norm, resolution: int) -> ThreatModel:
        """The norm's radius: the user's, else the paper's scaled from 224 to ``resolution``."""
        if norm in self.request.eps:
            return ThreatModel(norm, self.request.eps[norm])
        return scaled_eps(ThreatModel(norm, PAPER_EPS[norm]), resolution, 224)

    def job(self, threats: list[ThreatModel], version: str, resolution: int) -> EvalJob:
        r = self.request
        return EvalJob(model_ref=r.model_ref, weights_sha256=self.loaded.weights_sha256,
                       data_path=self.data_path, ids=tuple(self.ids), resolution=resolution,
                       crop_pct=self.spec.crop_pct, threats=tuple(threats), version=version,
                       seed=r.seed, batch_size=r.batch_size, num_classes=self.spec.num_classes,
                       state_root=self.state_root, tracking_uri=r.tracking_uri,
                       kernels=r.kernels)

    def _run(self, job: EvalJob, label: str) -> dict[ThreatModel, ThreatOutcome]:
        r = self.request
        run_job(job, workers=r.workers, address=r.address, use_gpu=self.use_gpu,
                description=label)
        return merge(job)

    def run(self) -> EvaluationResult:
        r = self.request
        start = time.perf_counter()
        threats = [self.threat(norm, self.resolution) for norm in r.norms]
        outcomes = self._run(self.job(threats, r.version, self.resolution),
                             f"AutoAttack {r.version}")
        all_outcomes = list(outcomes.values())
        guard_list: list[checks.Guard] = []
        eps_sweep = resolution_sweep = corruption = None
        if r.eps_sweep:
            eps_sweep, sweep_outcomes, monotone = self._eps_sweep()
            all_outcomes += sweep_outcomes
            guard_list.append(monotone)
        if r.resolution_sweep:
            resolution_sweep, res_outcomes = self._resolution_sweep()
            all_outcomes += res_outcomes
        if r.corruptions:
            model = self.loaded.module
            if self.resolution != self.spec.resolution:
                from raytrain_at.model_refs import resolve_model

                model = resolve_model(r.model_ref, resolution=self.resolution,
                                      tracking_uri=r.tracking_uri).module
            corruption = corruption_accuracy_on_device(
                model, r.model_ref, tracking_uri=r.tracking_uri, use_gpu=self.use_gpu,
                address=r.address, resolution=self.resolution, data_path=self.data_path,
                ids=self.ids, crop_pct=self.spec.crop_pct, severity=r.severity, seed=r.seed,
                batch_size=r.batch_size, protocol=r.corruption_protocol)
        guard_list = _outcome_guards(all_outcomes) + guard_list
        first = next(iter(outcomes.values()))
        result = EvaluationResult(
            model=ModelInfo(reference=r.model_ref, weights_sha256=self.loaded.weights_sha256,
                            name=self.spec.name, stem=self.spec.stem,
                            num_classes=self.spec.num_classes,
                            trained_resolution=self.spec.resolution,
                            source_run=self.loaded.metadata.get("raytrain_at.source_run")),
            data=DataInfo(path=self.data_path, n=len(self.ids), resolution=self.resolution,
                          crop_pct=self.spec.crop_pct,
                          resize_side=resize_side(self.resolution, self.spec.crop_pct),
                          preprocessing=preprocessing_text(self.resolution,
                                                           self.spec.crop_pct)),
            version=r.version, kernels=r.kernels, seed=r.seed, batch_size=r.batch_size,
            workers=r.workers,
            clean_accuracy=first.clean_accuracy,
            threats={o.threat.norm: _threat_result(o) for o in outcomes.values()},
            eps_sweep=eps_sweep, resolution_sweep=resolution_sweep, corruptions=corruption,
            guards=[GuardOutcome(**g.as_dict()) for g in guard_list],
            trustworthy=all(g.passed for g in guard_list),
            wall_seconds=time.perf_counter() - start,
            code_version=raytrain_at.__version__,
            created=dt.datetime.now(dt.UTC).isoformat(timespec="seconds"))
        write_result(result, self.out)
        return result

    def _eps_sweep(self) -> tuple[EpsSweep, list[ThreatOutcome], checks.Guard]:
        r = self.request
        radii = cast("list[float]", r.eps_sweep)  # called only when set
        threats = [ThreatModel(r.sweep_norm, eps) for eps in radii]
        outcomes = self._run(self.job(threats, r.sweep_version, self.resolution),
                             f"eps sweep {r.sweep_version}")
        robust = [outcomes[t].robust_accuracy for t in threats]
        clean = outcomes[threats[0]].clean_accuracy
        plot = plot_eps_sweep(self.out.with_name(self.out.stem + "_eps.png"), r.sweep_norm,
                              clean, radii, robust,
                              f"{self.spec.name} ({r.sweep_version}, n={len(self.ids)})")
        sweep = EpsSweep(norm=r.sweep_norm, version=r.sweep_version, clean_accuracy=clean,
                         points=[SweepPoint(eps=e, robust_accuracy=a)
                                 for e, a in zip(radii, robust)],
                         expected_robustness=expected_robustness(clean, radii, robust),
                         plot=str(plot))
        monotone = checks.non_increasing(r.sweep_norm, [0.0, *radii], [clean, *robust])
        return sweep, list(outcomes.values()), monotone

    def _resolution_sweep(self) -> tuple[ResolutionSweep, list[ThreatOutcome]]:
        r = self.request
        points, every = [], []
        for side in cast("list[int]", r.resolution_sweep):  # called only when set
            # l_2 / l_1 radii grow with the side (constant budget per pixel, App. D.5).
            threats = [scaled_eps(self.threat(norm, self.resolution), side, self.resolution)
                       for norm in r.norms]
            outcomes = self._run(self.job(threats, r.sweep_version, side),
                                 f"resolution {side}")
            every += outcomes.values()
            points.append(ResolutionPoint(
                resolution=side, clean_accuracy=outcomes[threats[0]].clean_accuracy,
                robust_accuracy={t.norm: outcomes[t].robust_accuracy for t in threats},
                eps={t.norm: t.eps for t in threats}))
        main = r.norms[0]
        best = max(points, key=lambda p: p.robust_accuracy[main]).resolution
        plot = plot_resolution_sweep(
            self.out.with_name(self.out.stem + "_resolution.png"),
            [p.resolution for p in points], [p.clean_accuracy for p in points],
            {norm: [p.robust_accuracy[norm] for p in points] for norm in r.norms},
            self.spec.resolution, f"{self.spec.name} ({r.sweep_version}, n={len(self.ids)})")
        return ResolutionSweep(version=r.sweep_version, points=points, best_resolution=best,
                               plot=str(plot)), every


def evaluate(request: EvaluationRequest) -> tuple[EvaluationResult, Path]:
    """Validate, run and write one evaluation (see :class:`EvaluationRequest`); returns the
    result and the path of its JSON file."""
    evaluation = Evaluation(request)
    return evaluation.run(), evaluation.out

