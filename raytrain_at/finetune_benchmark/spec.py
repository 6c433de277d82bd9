"""The robust fine-tuning benchmark's study definition (YAML) and its configurations.

A benchmark (second paper: Heuillet et al. 2025, "A Guide to Robust Generalization", arXiv
2508.14079; docs/finetune-benchmark.md) crosses backbones x datasets x losses x protocols; every
cell is a *configuration*, fine-tuned with its own Ray Tune search over the backbone / head
learning rates, weight decay and the cosine switch (ASHA), and its best trial is measured five
ways (clean, AutoAttack l_inf / l_2 / l_1, common corruptions)::

    description: Robust fine-tuning benchmark
    recipe: robust_finetune_base          # every run starts from this recipe
    fixed: {attack.steps: 10}             # dotted overrides for every run
    backbones:                            # name -> timm model + a local checkpoint or models:/
      convnext_t_cvst: {model: convnext_tiny_cvst, weights: $RAYTRAIN_AT_CKPT/cn_t_cvst.safetensors,
                        family: convnext, pretraining: robust-in1k-linf4}
    datasets:                             # name -> .beton files (or a bundled name) and classes
      flowers102: {train: $RAYTRAIN_AT_DATA/flowers102_train.beton,   # val selects, test reports
                   val: $RAYTRAIN_AT_DATA/flowers102_val.beton,
                   test: $RAYTRAIN_AT_DATA/flowers102_test.beton, num_classes: 102}
    losses: [adversarial, trades]         # adversarial training; TRADES with beta = 1
    protocols:                            # name -> epochs and whether only the head trains
      full_5: {epochs: 5}
      full_50: {epochs: 50}
      linear_50: {epochs: 50, linear_probe: true}
    search: {optim.lr: {loguniform: [1.0e-5, 1.0e-3]}, ...}   # as in tune_spaces/
    scheduler: {kind: asha, grace_period: 1}
    evaluation: {eps: {linf: 4/255, l2: 2.0, l1: 75}, corruptions: true}

:func:`load_benchmark` turns every configuration into a :class:`SearchSpace` and validates it
(keys, values, the model on the meta device) before anything runs, so a typo in a backbone's
model name or a dataset's class count fails at once with a one-line message.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, field_validator

from raytrain_at.config_loader import FINETUNE_BENCHMARKS, StrictModel, validate
from raytrain_at.errors import UserError
from raytrain_at.evaluation.settings import BENCHMARK_EVALUATION
from raytrain_at.tuning.spaces import SchedulerSpec, SearchSpace, StudyEvaluation, StudyFields

NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")

# The two training losses of the benchmark, as run config overrides.
LOSSES: dict[str, dict[str, Any]] = {
    "adversarial": {"objective.kind": "adversarial"},
    "trades": {"objective.kind": "trades", "objective.trades_beta": 1.0},
}

# The paper's three protocols (full fine-tuning 5 and 50 epochs, linear probing 50 epochs).
PAPER_PROTOCOLS: dict[str, dict[str, Any]] = {
    "full_ft_5ep": {"epochs": 5},
    "full_ft_50ep": {"epochs": 50},
    "linear_probe_50ep": {"epochs": 50, "linear_probe": True},
}

# The benchmark's five measurements (second paper): clean, standard AutoAttack at the first
# paper's radii, and common corruptions at severity 3; the best trial of each configuration,
# never registered (a benchmark measures backbones, it does not pick champions).
PAPER_EVALUATION = StudyEvaluation(**BENCHMARK_EVALUATION.settings(only_set=True), top=1,
                                   register_best=False)

LINEAR_PROBE_KEY = "model.linear_probe"


class Backbone(StrictModel):
    """A pre-trained backbone: a timm model name and its weights.

    Attributes:
        model: timm model name (``model.name``), e.g. ``convnext_tiny_cvst``.
        weights: a local checkpoint (safetensors / state dict; ``$VAR`` allowed), or
            ``runs:/ID/model`` / ``models:/NAME@ALIAS`` (a registered model). Loaded with a new
            head for the dataset's classes.
        family: for the summary plots (default: the model name up to its first ``_``).
        pretraining: for the summary plots, e.g. ``robust-in1k-linf4`` or ``clean-in1k``.
        overrides: dotted overrides of this backbone's runs (e.g. ``model.stem``).
    """

    model: str = Field(min_length=1)
    weights: str = Field(min_length=1)
    family: str | None = None
    pretraining: str = "unspecified"
    overrides: dict[str, Any] = Field(default_factory=dict)


class Dataset(StrictModel):
    """A downstream dataset as FFCV files (``raytrain-at data write-ffcv``) or a bundled name.

    Attributes:
        train: training .beton (or ``digits``).
        val: validation .beton carved from the training data (``write-ffcv --split val``; or
            ``digits``): it selects each trial's checkpoint and ranks the trials.
        test: the test .beton (or ``digits``: its test split) the best trial is measured on.
        num_classes: classes of the new head.
        resolution: training and evaluation side in pixels (None: the recipe's).
        overrides: dotted overrides of this dataset's runs (e.g. ``model.small_input``).
    """

    train: str = Field(min_length=1)
    val: str = Field(min_length=1)
    test: str = Field(min_length=1)
    num_classes: int = Field(ge=2)
    resolution: int | None = Field(None, ge=16)
    overrides: dict[str, Any] = Field(default_factory=dict)


class Protocol(StrictModel):
    """How long and what trains: ``linear_probe`` trains the head only (backbone frozen)."""

    epochs: int = Field(ge=1)
    linear_probe: bool = False
    overrides: dict[str, Any] = Field(default_factory=dict)


class BenchmarkSpec(StudyFields):
    """A whole benchmark; see the module docstring. The study fields (recipe, fixed, search,
    metric, mode, scheduler, num_samples, evaluation) are a search space's
    (:class:`~raytrain_at.tuning.spaces.StudyFields`): every configuration's space gets them, with
    the configuration's own fixed keys added."""

    backbones: dict[str, Backbone] = Field(min_length=1)
    datasets: dict[str, Dataset] = Field(min_length=1)
    losses: list[Literal["adversarial", "trades"]] = Field(["adversarial", "trades"],
                                                          min_length=1)
    protocols: dict[str, Protocol] = Field(
        default_factory=lambda: {k: Protocol(**v) for k, v in PAPER_PROTOCOLS.items()},
        min_length=1)
    scheduler: SchedulerSpec = SchedulerSpec(kind="asha")
    evaluation: StudyEvaluation = PAPER_EVALUATION

    @field_validator("backbones", "datasets", "protocols")
    @classmethod
    def _safe_names(cls, value: dict[str, Any]) -> dict[str, Any]:
        for name in value:
            if not NAME.match(name):
                raise ValueError(f"name {name!r}: use letters, digits, '.', '_' or '-'")
        return value


@dataclass(frozen=True)
class Configuration:
    """One cell of the benchmark and the search space that fine-tunes it."""

    backbone: str
    dataset: str
    loss: str
    protocol: str
    family: str
    pretraining: str
    space: SearchSpace

    @property
    def key(self) -> str:
        """``backbone.dataset.loss.protocol``: file, MLflow and Ray name of the configuration."""
        return f"{self.backbone}.{self.dataset}.{self.loss}.{self.protocol}"


def configuration_space(spec: BenchmarkSpec, backbone: str, dataset: str, loss: str,
                        protocol: str, experiment: str) -> SearchSpace:
    """The (unvalidated) search space of one configuration: fixed overrides from every level."""
    b, d, p = spec.backbones[backbone], spec.datasets[dataset], spec.protocols[protocol]
    fixed: dict[str, Any] = dict(spec.fixed)
    fixed.update({"model.name": b.model, "model.init": b.weights, "model.new_head": True,
                  "model.pretrained": None, "model.num_classes": d.num_classes,
                  "data.train": d.train, "data.heldout": d.val,
                  "schedule.epochs": p.epochs, LINEAR_PROBE_KEY: p.linear_probe,
                  "tracking.experiment": experiment})
    if d.resolution is not None:
        fixed["data.resolution"] = d.resolution
    for extra in (b.overrides, d.overrides, LOSSES[loss], p.overrides):
        fixed.update(extra)
    scheduler = spec.scheduler
    if scheduler.kind == "asha" and scheduler.grace_period >= p.epochs:
        # Too short for ASHA to compare trials at a rung: every trial runs to the end.
        scheduler = SchedulerSpec(kind="fifo")
    evaluation = spec.evaluation.model_copy(update={"register_best": False, "top": 1,
                                                    "data": d.test})
    return SearchSpace(**{**spec.study_fields(), "fixed": fixed, "scheduler": scheduler,
                          "evaluation": evaluation,
                          "description": f"{spec.description}: {backbone} on {dataset}, {loss}, "
                                         f"{protocol}"})


def configurations(spec: BenchmarkSpec, experiment: str, source: Path | None = None
                   ) -> list[Configuration]:
    """Every configuration, validated (backbones x datasets x losses x protocols, in order)."""
    found = []
    for backbone, entry in spec.backbones.items():
        for dataset in spec.datasets:
            for loss in spec.losses:
                for protocol in spec.protocols:
                    space = configuration_space(spec, backbone, dataset, loss, protocol,
                                                experiment)
                    space._source = source
                    where = f"benchmark {str(source) if source else ''} {backbone}/{dataset}/" \
                            f"{loss}/{protocol}".replace("  ", " ")
                    try:
                        space.validate_against_config()
                    except UserError as exc:
                        raise UserError(f"{where}: {exc}") from None
                    found.append(Configuration(
                        backbone, dataset, loss, protocol,
                        entry.family or entry.model.split("_")[0], entry.pretraining, space))
    return found


def bundled_benchmark(name: str) -> Path:
    """The bundled benchmark ``name`` (package data: a regular ``pip install`` ships it; the
    checkout's ``finetune_benchmarks/`` is a link to the folder).

    Raises:
        UserError: no bundled benchmark of that name.
    """
    return FINETUNE_BENCHMARKS.resolve(name)


def load_benchmark(path: str | Path) -> tuple[BenchmarkSpec, Path]:
    """Read and check a benchmark file with the project's YAML loader (every configuration is
    validated by :func:`configurations`, which the runner calls before anything runs).

    Raises:
        UserError: missing file, bad YAML, or a one-line description of the first bad field.
    """
    data, source = FINETUNE_BENCHMARKS.read(path)
    return validate(BenchmarkSpec, data, f"fine-tuning benchmark {str(source)!r}",
                    noun="field"), source
