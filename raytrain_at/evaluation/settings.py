"""How a model is evaluated: the one validated evaluation section, and the paper's protocol.

:class:`EvaluationSettings` is the attack side of every evaluation: which AutoAttack version,
which norms at which radii, how many images, the optional sweeps and corruptions. The command
line's request (:class:`raytrain_at.evaluation.evaluate.EvaluationRequest`) is these settings
plus the model and data it names; a Tune study's ``evaluation:`` section
(:class:`raytrain_at.tuning.spaces.StudyEvaluation`) is these settings plus which trials are
evaluated; the robust fine-tuning benchmark's default is :data:`BENCHMARK_EVALUATION`. So a
setting is spelled, defaulted and validated once, and a study hands its section to the request
as it is (:meth:`EvaluationSettings.settings`).

Units: radii in [0, 1] pixel scale (``4/255`` may be written as a fraction); a norm without a
radius uses the paper's (:data:`~raytrain_at.evaluation.threats.PAPER_EPS`) scaled from 224 px
to the evaluated side.
"""

from __future__ import annotations

import math
from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from raytrain_at.config_loader import StrictModel, parse_radius
from raytrain_at.evaluation.threats import NORMS, PAPER_EPS, Norm

# AutoAttack versions (raytrain_at.evaluation.autoattack.VERSIONS lists each one's attacks):
# standard (APGD-CE, APGD-T, FAB-T, Square), fast (APGD-CE + APGD-T), apgdt (APGD-T, 40
# iterations, 3 targets: the paper's cheaper protocol of Sec. 3.1).
Version = Literal["standard", "fast", "apgdt"]
# Evaluation kernels (raytrain_at.evaluation.kernels): exact (torch defaults) or fast.
Kernels = Literal["exact", "fast"]
# Corruption protocols (raytrain_at.evaluation.corruption_accuracy).
CorruptionProtocol = Literal["mix", "imagenet-c"]


def _positive(value: float, what: str) -> None:
    if not (math.isfinite(value) and value > 0):
        raise ValueError(f"{what} {value} must be a positive radius")


class EvaluationSettings(StrictModel):
    """What an evaluation attacks and how; see the module docstring.

    Attributes:
        version: AutoAttack version: ``standard``, ``fast`` or ``apgdt``.
        norms: threat models evaluated, in order (``[linf, l2, l1]``: the l_2 / l_1
            generalisation of an l_inf-trained model).
        eps: radius per norm in [0, 1] pixel units; a norm not given uses the paper's radius
            (4/255, 2.0, 75) at 224 px, scaled to the evaluated side.
        n: attack only the first ``n`` images (None: all of them).
        workers: Ray workers sharing the (chunk, norm) units.
        batch_size: images per chunk and attack batch.
        seed: AutoAttack seed.
        kernels: ``exact`` (torch defaults, as plain pyautoattack) or ``fast``.
        resolution: test-time side (None: the side the model was trained at).
        eps_sweep: radii of an extra sweep in ``sweep_norm`` (strictly increasing), giving the
            expected robustness; None: no sweep.
        sweep_norm: norm of the eps sweep.
        sweep_version: attack version of the sweeps.
        resolution_sweep: test-time sides of an extra resolution sweep (None: none).
        corruptions: also the common-corruption accuracy (ImageNet-C types).
        severity: corruption severity of the ``mix`` protocol, 1 to 5.
        corruption_protocol: ``mix`` (one type per image) or ``imagenet-c`` (15 x 5).
    """

    version: Version = "standard"
    norms: list[Norm] = Field(default_factory=lambda: list(NORMS), min_length=1)
    eps: dict[Norm, float] = Field(default_factory=dict)
    n: int | None = Field(default=None, ge=1)
    workers: int = Field(default=1, ge=1)
    batch_size: int = Field(default=250, ge=1)
    seed: int = 0
    kernels: Kernels = "exact"
    resolution: int | None = Field(default=None, ge=8)
    eps_sweep: list[float] | None = Field(default=None, min_length=1)
    sweep_norm: Norm = "linf"
    sweep_version: Version = "apgdt"
    resolution_sweep: list[int] | None = Field(default=None, min_length=1)
    corruptions: bool = False
    severity: int = Field(default=3, ge=1, le=5)
    corruption_protocol: CorruptionProtocol = "mix"

    @field_validator("eps", mode="before")
    @classmethod
    def _radii_as_fractions(cls, value: Any) -> Any:
        if isinstance(value, dict):
            return {norm: parse_radius(eps) for norm, eps in value.items()}
        return value

    @field_validator("eps_sweep", mode="before")
    @classmethod
    def _sweep_as_fractions(cls, value: Any) -> Any:
        return [parse_radius(eps) for eps in value] if isinstance(value, list) else value

    @model_validator(mode="after")
    def _consistent(self) -> EvaluationSettings:
        if len(set(self.norms)) != len(self.norms):
            raise ValueError(f"norms {self.norms} repeat a norm")
        for norm, eps in self.eps.items():
            _positive(eps, f"eps.{norm}")
        sweep = self.eps_sweep or []
        for eps in sweep:
            _positive(eps, "eps_sweep radius")
        if any(b <= a for a, b in zip(sweep, sweep[1:])):
            raise ValueError(f"eps_sweep {sweep} must be strictly increasing")
        for side in self.resolution_sweep or []:
            if side < 8:
                raise ValueError(f"resolution {side} in resolution_sweep is below 8 pixels")
        return self

    def settings(self, *, only_set: bool = False) -> dict[str, Any]:
        """These settings alone (a subclass's other fields left out), as keyword arguments of
        another evaluation model: ``EvaluationRequest(**study.settings(), model_ref=...)``.

        Args:
            only_set: only the settings given explicitly (the others keep the defaults of the
                model they are passed to).
        """
        return {name: getattr(self, name) for name in EvaluationSettings.model_fields
                if not only_set or name in self.model_fields_set}


# The paper's protocol (Sec. 3.1 and App. A.1): standard AutoAttack in l_inf 4/255, l_2 2 and
# l_1 75 (at 224 px) on every image of the test set.
PAPER_PROTOCOL = EvaluationSettings(version="standard", norms=list(NORMS), eps=dict(PAPER_EPS))

# The robust fine-tuning benchmark's five measurements (second paper): the paper's protocol
# plus common corruptions at severity 3 (one sampled type per image).
BENCHMARK_EVALUATION = PAPER_PROTOCOL.model_copy(
    update={"corruptions": True, "severity": 3, "corruption_protocol": "mix"})
