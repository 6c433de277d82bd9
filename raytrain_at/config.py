"""The run configuration: one typed, validated section per concern.

A run is described by a YAML file (a recipe) plus dotted overrides (``optim.lr=5e-4``). Every
section is a pydantic model that forbids unknown keys, so a typo in a recipe, an override or a
Ray Tune search space fails before any worker starts, with a one-line message naming the key.
``flatten`` turns a config into ``{"optim.lr": 0.001, ...}``: the MLflow params of a run and the
key space of Tune search spaces.

Units: radii are in [0, 1] pixel scale (``attack.eps: 4/255`` may be written as a fraction
string), learning rates are peak rates for the global batch, epochs count passes over the
training file.
"""

from __future__ import annotations

import difflib
from fractions import Fraction
from importlib import resources
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from raytrain_at.errors import UserError


def _fraction(value: Any) -> Any:
    """Accept ``"4/255"`` for radii, as written in papers."""
    if isinstance(value, str) and "/" in value:
        try:
            return float(Fraction(value.strip()))
        except (ValueError, ZeroDivisionError):
            return value
    return value


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class ModelSection(_Section):
    """Architecture. ``stem``: stem spec or design name (None: the model's default)."""

    name: str = "convnext_tiny_cvst"
    stem: str | None = None
    num_classes: int = Field(1000, ge=2)
    small_input: bool = False
    drop_path_rate: float = Field(0.0, ge=0.0, lt=1.0)
    # Initial weights: a clean checkpoint for the non-stem parameters (file or hub:NAME), or a
    # full checkpoint / registered model to fine-tune from (``init``).
    pretrained: str | None = None
    init: str | None = None
    new_head: bool = False
    # Linear probing: only the classifier head trains; every other parameter is frozen (left out
    # of the optimiser) and the backbone stays in eval mode (BatchNorm statistics, dropout and
    # drop-path unchanged), so its weights leave training bit-identical.
    linear_probe: bool = False


class DataSection(_Section):
    """Datasets (.beton files or ``digits``) and loading."""

    train: str = "digits"
    heldout: str | None = None
    resolution: int = Field(224, ge=16, le=2048)
    train_size: int | None = Field(None, ge=1)  # use only the first N training samples
    heldout_size: int | None = Field(None, ge=1)  # use only the first N held-out samples
    loader_workers: int = Field(2, ge=1)


class AugSection(_Section):
    """Augmentation preset (paper App. A.2 / D.2)."""

    preset: Literal["basic", "3aug", "heavy"] = "heavy"
    mixup_alpha: float = Field(0.8, ge=0.0)
    cutmix_alpha: float = Field(1.0, ge=0.0)
    erase_prob: float = Field(0.25, ge=0.0, le=1.0)


class AttackSection(_Section):
    """The inner maximisation in training and the held-out check each epoch."""

    kind: Literal["apgd", "pgd", "fgsm", "none"] = "apgd"
    norm: Literal["linf", "l2", "l1"] = "linf"
    eps: float = Field(4 / 255, gt=0.0)
    steps: int = Field(2, ge=1, le=100)
    heldout_steps: int = Field(1, ge=1, le=100)
    # Training attack start: the clean input (the paper's code, False) or a uniform random point
    # of the ball (True; one more forward-backward per step).
    random_start: bool = False
    eps_schedule: Literal["fixed", "linear", "epsilon_scheduling"] = "fixed"
    eps_t1: float = Field(0.0, ge=0.0)
    eps_t2: float = Field(0.0, ge=0.0)

    @field_validator("eps", mode="before")
    @classmethod
    def _eps_as_fraction(cls, value: Any) -> Any:
        return _fraction(value)

    @model_validator(mode="after")
    def _schedule_bounds(self) -> AttackSection:
        if self.eps_t2 < self.eps_t1:
            raise ValueError(f"attack.eps_t2 ({self.eps_t2}) must be >= attack.eps_t1 "
                             f"({self.eps_t1})")
        return self


class ObjectiveSection(_Section):
    kind: Literal["adversarial", "trades", "clean"] = "adversarial"
    label_smoothing: float = Field(0.1, ge=0.0, lt=1.0)
    trades_beta: float = Field(1.0, ge=0.0)


class OptimSection(_Section):
    """AdamW with linear warm-up then cosine decay per step (paper App. A.1).

    ``head_lr`` / ``head_weight_decay``: peak learning rate and weight decay of the classifier
    head's parameter group (None: ``lr`` / ``weight_decay``), as the robust fine-tuning benchmark
    searches them separately from the backbone's. ``schedule``: ``cosine`` decays to ``min_lr``
    (scaled by each group's peak) after the warm-up; ``constant`` keeps the peak.
    """

    lr: float = Field(1e-3, gt=0.0)
    min_lr: float = Field(1e-6, ge=0.0)
    weight_decay: float = Field(0.05, ge=0.0)
    head_lr: float | None = Field(None, gt=0.0)
    head_weight_decay: float | None = Field(None, ge=0.0)
    schedule: Literal["cosine", "constant"] = "cosine"
    betas: tuple[float, float] = (0.9, 0.95)
    warmup_epochs: float = Field(10, ge=0.0)
    grad_clip: float | None = Field(None, gt=0.0)
    ema_decay: float | None = Field(0.999, ge=0.0, lt=1.0)
    zero_stage: Literal[0, 1, 2] = 1


class ScheduleSection(_Section):
    """Epochs, batch, checkpoints. ``select_by``: the held-out metric that selects the run's
    model (``auto``: clean accuracy for clean training, APGD robust accuracy otherwise)."""

    epochs: int = Field(50, ge=1)
    global_batch_size: int = Field(1024, ge=1)
    checkpoint_every: int = Field(1, ge=1)
    log_every_steps: int = Field(50, ge=1)
    select_by: Literal["auto", "robust", "clean"] = "auto"


class ScalingSection(_Section):
    num_workers: int = Field(2, ge=1)
    use_gpu: bool = False
    cpus_per_worker: float = Field(1.0, gt=0.0)
    max_failures: int = Field(2, ge=0)
    precision: Literal["auto", "bf16", "fp32"] = "auto"
    channels_last: bool = True
    compile: bool = False


class TrackingSection(_Section):
    experiment: str = "raytrain-at"
    run_name: str | None = None
    storage_path: str | None = None
    tracking_uri: str | None = None


class RunConfig(_Section):
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
        if self.objective.kind != "clean" and self.attack.kind == "none":
            raise ValueError(f"objective.kind {self.objective.kind!r} needs an attack "
                             "(attack.kind is 'none')")
        return self

    @property
    def per_worker_batch_size(self) -> int:
        return self.schedule.global_batch_size // self.scaling.num_workers


# --------------------------------------------------------------------------- YAML and overrides
def _one_line(error: ValidationError) -> str:
    first = error.errors()[0]
    where = ".".join(str(p) for p in first["loc"])
    message = first["msg"].removeprefix("Value error, ")
    if not where:  # a check across sections: its message names the keys
        return message
    if first["type"] == "extra_forbidden":
        return f"unknown config key {where!r}"
    value = first.get("input")
    shown = "" if isinstance(value, dict) else f" (got {value!r})"
    return f"config key {where!r}: {message}{shown}"


def _deep_merge(base: dict, update: dict) -> dict:
    merged = dict(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _deep_merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def parse_override(text: str) -> tuple[list[str], Any]:
    """``"optim.lr=5e-4"`` -> (["optim", "lr"], 0.0005); the value is parsed as YAML."""
    if "=" not in text:
        raise UserError(f"override {text!r} is not of the form key=value")
    key, raw = text.split("=", 1)
    if not key or any(not part for part in key.split(".")):
        raise UserError(f"override {text!r} has an empty key")
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError:
        value = raw
    return key.split("."), value


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    """Apply dotted overrides to a nested dict (unknown keys are caught by validation)."""
    result = dict(data)
    for text in overrides:
        path, value = parse_override(text)
        update: Any = value
        for part in reversed(path):
            update = {part: update}
        result = _deep_merge(result, update)
    return result


def recipes_dir() -> Path:
    return Path(str(resources.files("raytrain_at").joinpath("recipes")))


def available_recipes() -> list[str]:
    return sorted(p.stem for p in recipes_dir().glob("*.yaml") if not p.stem.startswith("_"))


def _load_yaml(path: Path, seen: tuple[Path, ...] = ()) -> dict:
    """Read a recipe, resolving its ``base:`` chain (a recipe name or a path)."""
    if path in seen:
        raise UserError(f"recipe {str(path)!r} inherits from itself")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise UserError(f"recipe {str(path)!r} is not valid YAML: "
                        f"{str(exc).splitlines()[0]}") from None
    if not isinstance(data, dict):
        raise UserError(f"recipe {str(path)!r} must be a mapping of config sections")
    base = data.pop("base", None)
    if base is None:
        return data
    return _deep_merge(_load_yaml(resolve_recipe(str(base)), seen + (path,)), data)


def resolve_recipe(name_or_path: str) -> Path:
    """A recipe by name (``quickstart``) or path (``my.yaml``)."""
    path = Path(name_or_path)
    if path.suffix in (".yaml", ".yml"):
        if not path.is_file():
            raise UserError(f"recipe file {name_or_path!r} does not exist")
        return path
    candidate = recipes_dir() / f"{name_or_path}.yaml"
    if not candidate.is_file():
        close = difflib.get_close_matches(name_or_path, available_recipes(), n=1, cutoff=0.6)
        hint = f" (did you mean {close[0]}?)" if close else ""
        raise UserError(f"unknown recipe {name_or_path!r}{hint}; `raytrain-at recipes` lists "
                        "them")
    return candidate


def load_config(recipe: str | None = None, overrides: list[str] | None = None) -> RunConfig:
    """Build a validated :class:`RunConfig` from a recipe and dotted overrides.

    Raises:
        UserError: unknown recipe or key, or an invalid value (one line naming the key).
    """
    data: dict = {}
    if recipe is not None:
        path = resolve_recipe(recipe)
        data = _load_yaml(path)
        data.setdefault("recipe", path.stem)
    data = apply_overrides(data, overrides or [])
    try:
        return RunConfig.model_validate(data)
    except ValidationError as exc:
        raise UserError(_one_line(exc)) from None


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
