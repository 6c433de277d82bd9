"""The run configuration: one typed, validated section per concern.

A run is described by a YAML file (a recipe) plus dotted overrides (``optim.lr=5e-4``). Every
section is a pydantic model that forbids unknown keys, so a typo in a recipe, an override or a
Ray Tune search space fails before any worker starts, with a one-line message naming the key.
Recipes are read by :mod:`raytrain_at.config_loader`, like search spaces and benchmark specs.
``flatten`` turns a config into ``{"optim.lr": 0.001, ...}``: the MLflow params of a run and the
key space of Tune search spaces.

Units: radii are in [0, 1] pixel scale (``attack.eps: 4/255`` may be written as a fraction
string), learning rates are peak rates for the global batch, epochs count passes over the
training file.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, Field, field_validator, model_validator

from raytrain_at.config_loader import (
    RECIPES,
    StrictModel,
    deep_merge,
    nest,
    overrides_to_dict,
    parse_radius,
    validate,
)
from raytrain_at.evaluation.threats import Norm


class ModelSection(StrictModel):
    """Architecture. ``stem``: stem spec or design name (None: the model's default)."""

    name: str = "convnext_tiny_cvst"
    stem: str | None = None
    num_classes: int = Field(default=1000, ge=2)
    small_input: bool = False
    drop_path_rate: float = Field(default=0.0, ge=0.0, lt=1.0)
    # Layer-scale init value of ConvNeXt blocks (timm's ``ls_init_value``). None: the model's
    # own default, which for the isotropic ConvNeXt is none at all, as Liu et al. train it.
    layer_scale: float | None = Field(default=None, gt=0.0)
    # Initial weights: a clean checkpoint for the non-stem parameters (file or hub:NAME), or a
    # full checkpoint / registered model to fine-tune from (``init``).
    pretrained: str | None = None
    init: str | None = None
    new_head: bool = False
    # Linear probing: only the classifier head trains; every other parameter is frozen (left out
    # of the optimiser) and the backbone stays in eval mode (BatchNorm statistics, dropout and
    # drop-path unchanged), so its weights leave training bit-identical.
    linear_probe: bool = False


# Datasets whose images are stored at this side or below (CIFAR-10/100, the bundled digits) are
# evaluated at their native pixels: App. D.6 reports CIFAR "in the resolution of the dataset", and
# a resize + crop would throw away an eighth of a 32 px image's border.
NATIVE_SIDE = 32
# The paper's evaluation crop for larger images (App. A.4): resize the shorter side to
# side / 0.875 (256 for 224) with bicubic interpolation, then a centre crop of the side.
PAPER_CROP_PCT = 0.875


class DataSection(StrictModel):
    """Datasets (.beton files or ``digits``) and loading.

    ``eval_crop_pct``: the evaluation preprocessing of the held-out checks, the model file and
    AutoAttack: the shorter side is resized to ``resolution / eval_crop_pct`` and centre-cropped
    to ``resolution``; None decides by dataset (:attr:`evaluation_crop_pct`).
    """

    train: str = "digits"
    heldout: str | None = None
    resolution: int = Field(default=224, ge=16, le=2048)
    train_size: int | None = Field(default=None, ge=1)  # use only the first N training samples
    heldout_size: int | None = Field(default=None, ge=1)  # use only the first N held-out samples
    loader_workers: int = Field(default=2, ge=1)
    # Longest wait for one batch: a stuck FFCV reader (a damaged file) becomes one line.
    loader_timeout_s: float = Field(default=900.0, gt=0.0, allow_inf_nan=False)
    eval_crop_pct: float | None = Field(default=None, gt=0.0, le=1.0)

    @property
    def evaluation_crop_pct(self) -> float:
        """``eval_crop_pct``, else 1.0 (native pixels, no crop) for 32 px datasets and the
        paper's 0.875 for larger images."""
        if self.eval_crop_pct is not None:
            return self.eval_crop_pct
        return 1.0 if self.resolution <= NATIVE_SIDE else PAPER_CROP_PCT


class AugSection(StrictModel):
    """Augmentation preset (paper App. A.2 / D.2)."""

    preset: Literal["basic", "3aug", "heavy"] = "heavy"
    mixup_alpha: float = Field(default=0.8, ge=0.0)
    cutmix_alpha: float = Field(default=1.0, ge=0.0)
    erase_prob: float = Field(default=0.25, ge=0.0, le=1.0)


class AttackSection(StrictModel):
    """The inner maximisation in training and the held-out check each epoch."""

    kind: Literal["apgd", "pgd", "fgsm", "none"] = "apgd"
    norm: Norm = "linf"
    eps: float = Field(default=4 / 255, gt=0.0)
    steps: int = Field(default=2, ge=1, le=100)
    heldout_steps: int = Field(default=1, ge=1, le=100)
    # Training attack start: the clean input (the paper's code, False) or a uniform random point
    # of the ball (True; one more forward-backward per step).
    random_start: bool = False
    eps_schedule: Literal["fixed", "linear", "epsilon_scheduling"] = "fixed"
    eps_t1: float = Field(default=0.0, ge=0.0)
    eps_t2: float = Field(default=0.0, ge=0.0)

    @field_validator("eps", mode="before")
    @classmethod
    def _eps_as_fraction(cls, value: Any) -> Any:
        return parse_radius(value)

    @model_validator(mode="after")
    def _schedule_bounds(self) -> AttackSection:
        if self.eps_t2 < self.eps_t1:
            raise ValueError(f"attack.eps_t2 ({self.eps_t2}) must be >= attack.eps_t1 "
                             f"({self.eps_t1})")
        return self


class ObjectiveSection(StrictModel):
    """What the training step minimises (``training.objectives.training_step_loss``, the loss
    of ``WorkerLoop.train_step``).

    ``kind``: ``adversarial``, ``trades`` or ``clean``; ``label_smoothing`` of hard labels in
    [0, 1) (paper: 0.1); ``trades_beta``: weight of the KL term of TRADES.
    """

    kind: Literal["adversarial", "trades", "clean"] = "adversarial"
    label_smoothing: float = Field(default=0.1, ge=0.0, lt=1.0)
    trades_beta: float = Field(default=1.0, ge=0.0)


# DeepSpeed 0.19.8 accumulates bf16 gradients in fp32 only under ZeRO 1 or 2 (stage 0 raises
# "unsupported mix of model_dtype and grad_accum_dtype"); see training/engine.py.
BF16_NEEDS_ZERO = ("optim.zero_stage 0 cannot accumulate bf16 gradients in fp32: use "
                   "optim.zero_stage=1 (or 2), or scaling.precision=fp32")


class OptimSection(StrictModel):
    """AdamW with linear warm-up then cosine decay per step (paper App. A.1).

    ``head_lr`` / ``head_weight_decay``: peak learning rate and weight decay of the classifier
    head's parameter group (None: ``lr`` / ``weight_decay``), as the robust fine-tuning benchmark
    searches them separately from the backbone's. ``schedule``: ``cosine`` decays to ``min_lr``
    (scaled by each group's peak) after the warm-up; ``constant`` keeps the peak.
    """

    lr: float = Field(default=1e-3, gt=0.0)
    min_lr: float = Field(default=1e-6, ge=0.0)
    weight_decay: float = Field(default=0.05, ge=0.0)
    head_lr: float | None = Field(default=None, gt=0.0)
    head_weight_decay: float | None = Field(default=None, ge=0.0)
    schedule: Literal["cosine", "constant"] = "cosine"
    betas: tuple[float, float] = (0.9, 0.95)
    warmup_epochs: float = Field(default=10, ge=0.0)
    grad_clip: float | None = Field(default=None, gt=0.0)
    ema_decay: float | None = Field(default=0.999, ge=0.0, lt=1.0)
    zero_stage: Literal[0, 1, 2] = 1


class ScheduleSection(StrictModel):
    """Epochs, batch, checkpoints. ``select_by``: the held-out metric that selects the run's
    model (``auto``: clean accuracy for clean training, APGD robust accuracy otherwise)."""

    epochs: int = Field(default=50, ge=1)
    global_batch_size: int = Field(default=1024, ge=1)
    checkpoint_every: int = Field(default=1, ge=1)
    log_every_steps: int = Field(default=50, ge=1)
    select_by: Literal["auto", "robust", "clean"] = "auto"


class ScalingSection(StrictModel):
    num_workers: int = Field(default=2, ge=1)
    use_gpu: bool = False
    cpus_per_worker: float = Field(default=1.0, gt=0.0)
    # Ray's placement of the workers (training.placement): auto = STRICT_PACK when a GPU job
    # fits one node of the cluster (its collectives stay on that node's NVLink), else PACK.
    placement: Literal["auto", "pack", "strict_pack", "spread"] = "auto"
    # Worker-group failures Ray Train recovers from (from the latest good checkpoint) in any
    # sliding hour; None: no limit (spot capacity, where reclaims are routine). A failure that
    # retrying cannot fix (a non-finite loss, a bad input) stops the run whatever the budget.
    max_failures_per_hour: int | None = Field(default=3, ge=0)
    precision: Literal["auto", "bf16", "fp32"] = "auto"
    channels_last: bool = True
    compile: bool = False


class TrackingSection(StrictModel):
    experiment: str = "raytrain-at"
    run_name: str | None = None
    storage_path: str | None = None
    tracking_uri: str | None = None


class RunConfig(StrictModel):
    """A whole run. ``recipe`` names the YAML it came from."""

    recipe: str | None = None
    seed: int = 0
    model: ModelSection = ModelSection()
    data: DataSection = DataSection()
    aug: AugSection = AugSection()
    attack: AttackSection = AttackSection()
    objective: ObjectiveSection = ObjectiveSection()
    optim: OptimSection = OptimSection()
    schedule: ScheduleSection = ScheduleSection()
    scaling: ScalingSection = ScalingSection()
    tracking: TrackingSection = TrackingSection()

    @model_validator(mode="after")
    def _consistent(self) -> RunConfig:
        per_worker, rest = divmod(self.schedule.global_batch_size, self.scaling.num_workers)
        if rest:
            raise ValueError(f"schedule.global_batch_size {self.schedule.global_batch_size} is not "
                             f"divisible by scaling.num_workers {self.scaling.num_workers}")
        if self.aug.preset == "heavy" and per_worker % 2:
            raise ValueError(f"heavy augmentation (MixUp/CutMix) needs an even per-worker batch, "
                             f"got {per_worker}")
        if self.optim.zero_stage == 0 and self.bf16_requested:
            raise ValueError(BF16_NEEDS_ZERO)
        if self.objective.kind != "clean" and self.attack.kind == "none":
            raise ValueError(f"objective.kind {self.objective.kind!r} needs an attack "
                             "(attack.kind is 'none')")
        return self

    @property
    def bf16_requested(self) -> bool:
        """Whether the workers run bf16: asked for, or ``auto`` on GPU workers."""
        precision = self.scaling.precision
        return precision == "bf16" or (precision == "auto" and self.scaling.use_gpu)

    @property
    def per_worker_batch_size(self) -> int:
        return self.schedule.global_batch_size // self.scaling.num_workers


# --------------------------------------------------------------------------- YAML and overrides
def available_recipes() -> list[str]:
    """Names of the bundled recipes (bases such as ``_imagenet`` left out)."""
    return RECIPES.available()


def resolve_recipe(name_or_path: str) -> Path:
    """A recipe by name (``quickstart``) or path (``my.yaml``)."""
    return RECIPES.resolve(name_or_path)


def recipe_data(recipe: str | None, values: Mapping[str, Any] | None = None,
                overrides: list[str] | None = None) -> dict[str, Any]:
    """The unvalidated nested dict of a run: the recipe (with its ``base:`` chain), then
    ``values`` (dotted or nested keys: a space's fixed keys and a trial's sample), then the
    command line's ``key=value`` overrides."""
    data: dict[str, Any] = {}
    if recipe is not None:
        data, path = RECIPES.read(recipe)
        data.setdefault("recipe", path.stem)
    if values:
        data = deep_merge(data, nest(values))
    return deep_merge(data, overrides_to_dict(overrides or []))


def load_config(recipe: str | None = None, overrides: list[str] | None = None,
                values: Mapping[str, Any] | None = None) -> RunConfig:
    """Build a validated :class:`RunConfig` from a recipe, values and dotted overrides.

    Raises:
        UserError: unknown recipe or key, or an invalid value (one line naming the key).
    """
    return validate(RunConfig, recipe_data(recipe, values, overrides))


def flatten(config: BaseModel, prefix: str = "") -> dict[str, Any]:
    """``{"optim.lr": 0.001, ...}`` for MLflow params and Tune spaces."""
    flat: dict[str, Any] = {}
    for key, value in config:
        name = f"{prefix}{key}"
        if isinstance(value, BaseModel):
            flat.update(flatten(value, f"{name}."))
        else:
            flat[name] = list(value) if isinstance(value, tuple) else value
    return flat


def to_yaml(config: RunConfig) -> str:
    """The whole config as YAML, section by section (what ``recipes show`` prints)."""
    return yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False)
