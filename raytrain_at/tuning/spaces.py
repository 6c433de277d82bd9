"""Ray Tune search spaces as YAML, keyed by the run config's dotted names, validated up front.

A space names a base recipe, overrides applied to every trial (``fixed``), the searched keys
(``search``), the metric the training loop reports, and the trial scheduler::

    description: Table 7 - ConvNeXt-T stem designs
    recipe: table1_convnext_tiny_cvst_pretrained_heavy   # every trial starts from this recipe
    fixed:                                                # dotted overrides, every trial
      schedule.epochs: 50
    search:                                               # dotted key -> exactly one of:
      model.stem: {grid: [table7:1, table7:6]}            #   grid | choice: [v, ...]
      optim.lr: {loguniform: [1.0e-4, 1.0e-2]}            #   uniform | loguniform: [lo, hi]
    metric: heldout_robust_accuracy                       # a name the training loop reports
    mode: max
    scheduler: {kind: asha, grace_period: 1, reduction_factor: 2}   # time unit: reported epochs
    num_samples: 1                                        # Ray repeats the grid this often

Why a loader of its own: a Tune run starts many trials; a typo in a key or a stem name must fail
here, before Ray starts anything, not minutes later inside a worker. :func:`load_space` checks
every key against ``flatten(load_config(recipe))`` (with a close-match hint), runs every grid and
choice value (and both ends of each range) through :func:`~raytrain_at.config.load_config`, builds
the model on PyTorch's meta device for every stem / model / resolution value (shape checks only: no
memory, no weights), and checks the metric, mode and scheduler.

Write exponents with a dot in YAML (``5.0e-3``, not ``5e-3``): PyYAML reads ``5e-3`` as a string.
Values are replaced by the config's parsed value anyway, so such a string still becomes a float.
"""

from __future__ import annotations

import difflib
import functools
import itertools
import json
import math
import os
from fractions import Fraction
from importlib import resources
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import (BaseModel, ConfigDict, Field, PrivateAttr, ValidationError, field_validator,
                      model_validator)

from raytrain_at.config import RunConfig, flatten, load_config
from raytrain_at.errors import UserError

SPACES_DIR = "tune_spaces"

# What the training loop (raytrain_at/training/loop.py, ``train_epoch`` and ``evaluate_heldout``)
# reports once per epoch, with the direction that means "better". Only these can steer a search:
# a mismatched mode would make Tune keep the worst trials, so it is an error too.
METRIC_MODES: dict[str, Literal["max", "min"]] = {
    "heldout_robust_accuracy": "max",
    "heldout_clean_accuracy": "max",
    "train_accuracy": "max",
    "train_loss": "min",
}

# Finite spaces up to this many points are also checked combination by combination (cross-key
# rules such as attack.eps_t2 >= attack.eps_t1 or batch / worker divisibility); larger ones per key.
_MAX_CHECKED_COMBINATIONS = 512


# --------------------------------------------------------------------------- the YAML schema
class StrictSection(BaseModel):
    """A YAML section that refuses unknown fields (a typo is an error, not a silent default)."""

    model_config = ConfigDict(extra="forbid")


class Distribution(StrictSection):
    """How one key is searched: exactly one of ``grid``, ``choice``, ``uniform``, ``loguniform``.

    Attributes:
        grid: every value is run (``tune.grid_search``); counts in :meth:`SearchSpace.grid_size`.
        choice: one value drawn per trial (``tune.choice``).
        uniform: ``[lo, hi]``, drawn uniformly (``tune.uniform``); float keys only.
        loguniform: ``[lo, hi]`` with ``lo > 0``, drawn log-uniformly (``tune.loguniform``).
    """

    grid: list[Any] | None = Field(None, min_length=1)
    choice: list[Any] | None = Field(None, min_length=1)
    uniform: tuple[float, float] | None = None
    loguniform: tuple[float, float] | None = None

    @model_validator(mode="after")
    def _exactly_one(self) -> Distribution:
        given = [name for name in ("grid", "choice", "uniform", "loguniform")
                 if getattr(self, name) is not None]
        if len(given) != 1:
            raise ValueError("give exactly one of grid, choice, uniform, loguniform "
                             f"(got {', '.join(given) or 'none'})")
        values = self.values
        if values is not None:
            if any(isinstance(v, dict) for v in values):
                raise ValueError("values must be scalars or lists, not mappings")
            if len({json.dumps(v, sort_keys=True) for v in values}) != len(values):
                raise ValueError(f"{self.kind} has repeated values: {values}")
        bounds = self.bounds
        if bounds is not None:
            lo, hi = bounds
            if not (math.isfinite(lo) and math.isfinite(hi)) or lo >= hi:
                raise ValueError(f"{self.kind} needs finite [lo, hi] with lo < hi, "
                                 f"got [{lo}, {hi}]")
            if self.kind == "loguniform" and lo <= 0:
                raise ValueError(f"loguniform needs lo > 0, got {lo}")
        return self

    @property
    def kind(self) -> str:
        """``"grid"``, ``"choice"``, ``"uniform"`` or ``"loguniform"``."""
        return next(name for name in ("grid", "choice", "uniform", "loguniform")
                    if getattr(self, name) is not None)

    @property
    def values(self) -> list[Any] | None:
        """The listed values of a grid or choice; None for a range."""
        return self.grid if self.grid is not None else self.choice

    @property
    def bounds(self) -> tuple[float, float] | None:
        """``(lo, hi)`` of a range; None for a grid or choice."""
        return self.uniform if self.uniform is not None else self.loguniform


class SchedulerSpec(StrictSection):
    """The Tune trial scheduler. Time is counted in reported epochs (one report per epoch).

    Attributes:
        kind: ``asha`` (stop trials early that lag at a rung) or ``fifo`` (run every trial fully).
        grace_period: ASHA: epochs every trial runs before it can be stopped.
        reduction_factor: ASHA: keep the best 1/reduction_factor of trials at each rung.
        max_t: ASHA: the last epoch considered; None means the trials' ``schedule.epochs``.
    """

    kind: Literal["asha", "fifo"] = "fifo"
    grace_period: int = Field(1, ge=1)
    reduction_factor: float = Field(2.0, gt=1.0)
    max_t: int | None = Field(None, ge=1)

    @model_validator(mode="after")
    def _asha_options_only_for_asha(self) -> SchedulerSpec:
        # Silently ignoring a grace period would hide that the user thinks trials get stopped.
        extra = {"grace_period", "reduction_factor", "max_t"} & self.model_fields_set
        if self.kind == "fifo" and extra:
            raise ValueError(f"{', '.join(sorted(extra))} only apply to kind asha")
        return self


def evaluation_data(spec: StudyEvaluation, trial: RunConfig) -> str | None:
    """The data a study reports its best trials on: ``evaluation.data``, or the bundled
    dataset's test split when the trials train on a bundled one; None when neither is set."""
    from raytrain_at.data.write import BUNDLED

    if spec.data is not None:
        return spec.data
    return trial.data.train if trial.data.train in BUNDLED else None


class StudyEvaluation(StrictSection):
    """How the study's best trials are evaluated with AutoAttack (and the best registered).

    Attributes:
        data: the test data the best trials are reported on (.beton path, ``$VAR`` allowed, or a
            bundled name such as ``digits``, meaning its test split); None: the bundled training
            data's test split (an error for trials training on their own files).
        n: attack only the first ``n`` images (None: all of them).
        version: AutoAttack version: ``standard``, ``fast`` (APGD-CE + APGD-T) or ``apgdt``.
        norms: threat models evaluated, e.g. ``[linf, l2, l1]`` (the l_2 / l_1 generalisation).
        eps: radius per norm in [0, 1] pixel units (``4/255`` allowed); a norm not given uses the
            paper's radius (4/255, 2.0, 75) at the model's resolution.
        top: how many of the best completed trials are evaluated (0: none, nothing registered).
        workers: Ray tasks sharing the images (one chunk each).
        corruptions: also the common-corruption accuracy (ImageNet-C types) at ``severity``.
        severity: corruption severity, 1 to 5.
        eps_sweep: l_inf radii of an APGD-T sweep giving the expected robustness (None: no sweep).
        register_best: register the best evaluated trial's model in the MLflow registry.
    """

    data: str | None = None
    n: int | None = Field(None, ge=2)
    version: Literal["standard", "fast", "apgdt"] = "standard"
    norms: list[Literal["linf", "l2", "l1"]] = Field(["linf", "l2", "l1"], min_length=1)
    eps: dict[Literal["linf", "l2", "l1"], float] = Field(default_factory=dict)
    top: int = Field(1, ge=0)
    workers: int = Field(2, ge=1)
    corruptions: bool = False
    severity: int = Field(3, ge=1, le=5)
    eps_sweep: list[float] | None = Field(None, min_length=2)
    register_best: bool = True

    @field_validator("eps", mode="before")
    @classmethod
    def _radii_as_fractions(cls, value: Any) -> Any:
        if isinstance(value, dict):
            return {norm: _radius(eps) for norm, eps in value.items()}
        return value

    @field_validator("eps_sweep", mode="before")
    @classmethod
    def _sweep_as_fractions(cls, value: Any) -> Any:
        return [_radius(eps) for eps in value] if isinstance(value, list) else value

    @model_validator(mode="after")
    def _positive_radii(self) -> StudyEvaluation:
        for norm, eps in self.eps.items():
            if not (math.isfinite(eps) and eps > 0):
                raise ValueError(f"eps.{norm} {eps} must be a positive radius")
        for eps in self.eps_sweep or []:
            if not (math.isfinite(eps) and eps > 0):
                raise ValueError(f"eps_sweep radius {eps} must be positive")
        return self


class SearchSpace(StrictSection):
    """A validated Ray Tune search space over the run config's dotted keys.

    Build it with :func:`load_space`, which also checks it against the base recipe; constructing
    it directly checks only the YAML's shape.

    Attributes:
        description: one line on what the space reproduces.
        recipe: the base recipe (name or path) every trial starts from.
        fixed: dotted overrides applied to every trial, e.g. ``{"schedule.epochs": 50}``.
        search: dotted key -> :class:`Distribution`.
        metric: the reported metric that ranks trials (see :data:`METRIC_MODES`).
        mode: ``max`` or ``min``; must agree with the metric.
        scheduler: the trial scheduler.
        num_samples: how often Ray repeats the grid (and draws the other keys).
        evaluation: AutoAttack of the best trials after the search (see :class:`StudyEvaluation`).
    """

    description: str = Field(min_length=1)
    recipe: str = Field(min_length=1)
    fixed: dict[str, Any] = Field(default_factory=dict)
    search: dict[str, Distribution] = Field(min_length=1)
    metric: str = "heldout_robust_accuracy"
    mode: Literal["max", "min"] = "max"
    scheduler: SchedulerSpec = SchedulerSpec()
    num_samples: int = Field(1, ge=1)
    evaluation: StudyEvaluation = StudyEvaluation()

    _source: Path | None = PrivateAttr(None)

    # ----------------------------------------------------------------------- public API
    @property
    def name(self) -> str:
        """The file's stem (``table7_convnext_tiny_stems``), or ``"inline"`` if not from a file."""
        return self._source.stem if self._source is not None else "inline"

    @property
    def source(self) -> Path | None:
        """The YAML file the space was read from."""
        return self._source

    def flat_keys(self) -> list[str]:
        """The searched dotted keys, in file order."""
        return list(self.search)

    def grid_size(self) -> int:
        """Number of grid points (product of the grid lengths; 1 without grids).

        Ray runs ``grid_size() * num_samples`` trials; choice and range keys are drawn per trial.
        """
        return math.prod(len(d.grid) for d in self.search.values() if d.grid is not None)

    def num_trials(self) -> int:
        """How many trials Ray Tune will start: ``grid_size() * num_samples``."""
        return self.grid_size() * self.num_samples

    def to_tune_param_space(self) -> dict[str, Any]:
        """The ``param_space`` for ``ray.tune.Tuner``: searched keys only, flat dotted names.

        Fixed overrides are not in it: :meth:`trial_overrides` adds them to every trial.
        """
        from ray import tune  # lazily: loading and validating a space must not need Ray

        makers = {"grid": tune.grid_search, "choice": tune.choice}
        space: dict[str, Any] = {}
        for key, dist in self.search.items():
            if dist.values is not None:
                space[key] = makers[dist.kind](list(dist.values))
            else:
                lo, hi = dist.bounds
                space[key] = (tune.uniform if dist.kind == "uniform" else tune.loguniform)(lo, hi)
        return space

    def trial_overrides(self, sample: dict[str, Any]) -> list[str]:
        """Dotted ``key=value`` overrides of one trial for ``load_config(self.recipe, ...)``.

        Args:
            sample: the trial's config as Ray Tune passes it: one value per searched key.

        Returns:
            The fixed overrides, then the sampled ones (so a sample wins over nothing: keys are
            disjoint), each value written so that ``parse_override`` reads it back unchanged.

        Raises:
            UserError: a searched key is missing from ``sample`` or ``sample`` has other keys.
        """
        missing = [key for key in self.search if key not in sample]
        unknown = [key for key in sample if key not in self.search]
        if missing or unknown:
            raise UserError(f"trial sample for search space {self.name!r} does not match its "
                            f"keys: missing {missing}, unexpected {unknown}")
        return ([f"{key}={format_value(value)}" for key, value in self.fixed.items()]
                + [f"{key}={format_value(sample[key])}" for key in self.search])

    def fixed_overrides(self) -> list[str]:
        """The dotted ``key=value`` overrides every trial gets (the ``fixed`` section)."""
        return self._fixed_overrides()

    def sample_overrides(self, sample: dict[str, Any]) -> list[str]:
        """The searched part of :meth:`trial_overrides`: one ``key=value`` per searched key."""
        return self.trial_overrides(sample)[len(self.fixed):]

    def trial_config(self, sample: dict[str, Any]) -> RunConfig:
        """The validated run config of one trial (base recipe + fixed + sample)."""
        return load_config(self.recipe, self.trial_overrides(sample))

    def scheduler_max_t(self) -> int:
        """ASHA's last epoch: ``scheduler.max_t`` or the trials' ``schedule.epochs``."""
        if self.scheduler.max_t is not None:
            return self.scheduler.max_t
        return load_config(self.recipe, self._fixed_overrides() + self._first_values()
                           ).schedule.epochs

    # ----------------------------------------------------------------------- validation
    def validate_against_config(self) -> SearchSpace:
        """Check keys, values, metric and scheduler against the base recipe; see the module doc.

        Grid and choice values are replaced by the config's parsed value (``"5e-3"`` -> 0.005), so
        Ray and MLflow see the same typed values a trial runs with.

        Raises:
            UserError: naming the file and the culprit key, value or setting.
        """
        where = self._where()
        try:
            base = load_config(self.recipe)
        except UserError as exc:
            raise UserError(f"{where}: recipe {self.recipe!r}: {exc}") from None
        flat = flatten(base)
        for section, keys in (("fixed", self.fixed), ("search", self.search)):
            for key in keys:
                self._check_key(key, section, flat)
        both = sorted(set(self.fixed) & set(self.search))
        if both:
            raise UserError(f"{where}: key {both[0]!r} is both fixed and searched")

        fixed = self._fixed_overrides()
        fixed_config = self._load_in_context(fixed, self._first_values(), "fixed overrides")
        if any(_affects_model(key) for key in self.fixed):
            _check_model(fixed_config, f"{where}: fixed overrides")
        for key, dist in self.search.items():
            self._check_distribution(key, dist, fixed, flat[key])
        self._check_combinations(fixed)
        trial_base = self._load(fixed + self._first_values(), "first grid point")
        self._check_metric(trial_base)
        self._check_scheduler(trial_base)
        self._check_evaluation_data(trial_base)
        return self

    def _check_evaluation_data(self, trial: RunConfig) -> None:
        """The best trials are reported on test data, never on the held-out file that ranked
        them: a space training on its own files names ``evaluation.data``."""
        if self.evaluation.top == 0 or self.evaluation.data is not None:
            return
        if evaluation_data(self.evaluation, trial) is None:
            raise UserError(f"{self._where()}: evaluation.data is not set: name the test .beton "
                            f"the best trials are reported on (data.heldout "
                            f"{trial.data.heldout!r} selects checkpoints and ranks trials)")

    def _where(self) -> str:
        return f"search space {str(self._source) if self._source else self.name!r}"

    def _fixed_overrides(self) -> list[str]:
        return [f"{key}={format_value(value)}" for key, value in self.fixed.items()]

    def _first_values(self, skip: str | None = None) -> list[str]:
        firsts = []
        for key, dist in self.search.items():
            if key != skip:
                first = dist.values[0] if dist.values is not None else dist.bounds[0]
                firsts.append(f"{key}={format_value(first)}")
        return firsts

    def _load(self, overrides: list[str], what: str) -> RunConfig:
        try:
            return load_config(self.recipe, overrides)
        except UserError as exc:
            raise UserError(f"{self._where()}: {what}: {exc}") from None

    def _load_in_context(self, overrides: list[str], context: list[str], what: str) -> RunConfig:
        """Load ``overrides`` alone; if that fails, with ``context`` (other searched keys).

        Why both: alone, an error is the overrides' own and names them; but a cross-key rule
        (attack.eps_t2 >= attack.eps_t1, batch / worker divisibility) may need a searched key to
        complete them. When both fail for different reasons, the error with the context is
        reported, naming the context: it is the error of a trial that would run.
        """
        try:
            return load_config(self.recipe, overrides)
        except UserError as alone:
            if not context:
                raise UserError(f"{self._where()}: {what}: {alone}") from None
            try:
                return load_config(self.recipe, overrides + context)
            except UserError as together:
                if str(together) == str(alone):
                    raise UserError(f"{self._where()}: {what}: {alone}") from None
                raise UserError(f"{self._where()}: {what} (with {', '.join(context)}): "
                                f"{together}") from None

    def _check_key(self, key: str, section: str, flat: dict[str, Any]) -> None:
        if key == "recipe":
            raise UserError(f"{self._where()}: {section} key 'recipe': set the base recipe with "
                            "the top-level 'recipe:' field")
        if key not in flat:
            close = difflib.get_close_matches(key, list(flat), n=3, cutoff=0.6)
            hint = f" (did you mean {', '.join(close)}?)" if close else ""
            raise UserError(f"{self._where()}: unknown {section} key {key!r}{hint}")

    def _check_distribution(self, key: str, dist: Distribution, fixed: list[str],
                            default: Any) -> None:
        context = self._first_values(skip=key)
        if dist.bounds is not None:
            # A range only makes sense for a float key: an int key would get 1.7 at run time.
            if not isinstance(default, (float, type(None))):  # None: checked on the bounds below
                raise UserError(f"{self._where()}: search key {key!r} holds "
                                f"{type(default).__name__} values; use grid or choice, not "
                                f"{dist.kind}")
            for end in dist.bounds:
                config = self._load_in_context(fixed + [f"{key}={format_value(end)}"], context,
                                               f"search key {key!r} {dist.kind} bound {end!r}")
                if not isinstance(flatten(config)[key], float):
                    raise UserError(f"{self._where()}: search key {key!r} is not a float key; use "
                                    f"grid or choice, not {dist.kind}")
            return
        parsed = []
        for value in dist.values:
            config = self._load_in_context(fixed + [f"{key}={format_value(value)}"], context,
                                           f"search key {key!r} value {value!r}")
            if _affects_model(key):
                _check_model(config, f"{self._where()}: search key {key!r} value {value!r}")
            parsed.append(flatten(config)[key])
        if len({json.dumps(v, sort_keys=True) for v in parsed}) != len(parsed):
            raise UserError(f"{self._where()}: search key {key!r}: values {dist.values} repeat "
                            f"once parsed ({parsed})")
        if dist.grid is not None:
            dist.grid = parsed
        else:
            dist.choice = parsed

    def _check_combinations(self, fixed: list[str]) -> None:
        finite = {key: d.values for key, d in self.search.items() if d.values is not None}
        size = math.prod(len(v) for v in finite.values())
        if len(finite) < 2 or size > _MAX_CHECKED_COMBINATIONS:
            return
        ranges = [f"{k}={format_value(d.bounds[0])}" for k, d in self.search.items()
                  if d.bounds is not None]
        for combo in itertools.product(*finite.values()):
            overrides = [f"{k}={format_value(v)}" for k, v in zip(finite, combo)]
            self._load(fixed + overrides + ranges, f"combination {overrides}")

    def _check_metric(self, config: RunConfig) -> None:
        if self.metric not in METRIC_MODES:
            close = difflib.get_close_matches(self.metric, list(METRIC_MODES), n=1, cutoff=0.6)
            hint = f" (did you mean {close[0]}?)" if close else ""
            raise UserError(f"{self._where()}: metric {self.metric!r} is not reported by the "
                            f"training loop{hint}; reported: {', '.join(METRIC_MODES)}")
        if self.mode != METRIC_MODES[self.metric]:
            better = "higher" if METRIC_MODES[self.metric] == "max" else "lower"
            raise UserError(f"{self._where()}: mode {self.mode!r} would rank the worst trials "
                            f"first: {self.metric} is better when {better} "
                            f"(mode {METRIC_MODES[self.metric]})")
        # The loop reports held-out metrics only when there is a held-out set (digits runs get
        # the digits test split by default).
        has_heldout = config.data.heldout is not None or config.data.train == "digits"
        if self.metric.startswith("heldout_") and not has_heldout:
            raise UserError(f"{self._where()}: metric {self.metric!r} needs data.heldout, which "
                            f"recipe {self.recipe!r} does not set")

    def _check_scheduler(self, config: RunConfig) -> None:
        if self.scheduler.kind != "asha":
            return
        if "schedule.epochs" in self.search and self.scheduler.max_t is None:
            raise UserError(f"{self._where()}: schedule.epochs is searched: set scheduler.max_t "
                            "(the epoch at which ASHA's last rung ends)")
        epochs = config.schedule.epochs
        if "schedule.epochs" in self.search:  # the longest trials decide what ASHA can see
            dist = self.search["schedule.epochs"]
            epochs = max(dist.values) if dist.values is not None else int(dist.bounds[1])
        max_t = self.scheduler.max_t or epochs
        if max_t > epochs:
            raise UserError(f"{self._where()}: scheduler.max_t {max_t} exceeds schedule.epochs "
                            f"{epochs}: no trial reports that many epochs")
        if self.scheduler.grace_period >= max_t:
            raise UserError(f"{self._where()}: scheduler.grace_period "
                            f"{self.scheduler.grace_period} must be below the last epoch {max_t}, "
                            "or ASHA never stops a trial")


# --------------------------------------------------------------------------- helpers
def _radius(value: Any) -> Any:
    """``"8/255"`` as a float (as papers write radii); anything else is left to pydantic."""
    if isinstance(value, str) and "/" in value:
        try:
            return float(Fraction(value.strip()))
        except (ValueError, ZeroDivisionError):
            return value
    return value


def format_value(value: Any) -> str:
    """Write a value for a dotted override so that ``parse_override`` (YAML) reads it back as is.

    Strings are JSON-quoted (``"table7:4"``, ``"null"`` stays a string); floats always carry a dot
    before any exponent, because PyYAML reads ``1e-05`` as a string but ``1.0e-05`` as a float.
    """
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if not math.isfinite(value):
            return {math.inf: ".inf", -math.inf: "-.inf"}.get(value, ".nan")
        text = repr(value)
        mantissa, _, exponent = text.partition("e")
        if "." not in mantissa:
            mantissa += ".0"
        if exponent and exponent[0] not in "+-":
            exponent = "+" + exponent
        return f"{mantissa}e{exponent}" if exponent else mantissa
    if isinstance(value, str):
        return json.dumps(value)
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(format_value(v) for v in value) + "]"
    raise UserError(f"value {value!r} of type {type(value).__name__} cannot be a config override")


def _affects_model(key: str) -> bool:
    # Keys that change the architecture or its input size: checked by building the model.
    return key in ("model.name", "model.stem", "model.num_classes", "model.small_input",
                   "data.resolution")


def _check_model(config: RunConfig, what: str) -> None:
    """Build the trial's model on the meta device and run one batch at its training resolution.

    Mirrors ``training.loop.build_model`` without weights: catches a stem that does not fit the
    backbone (stride, width), an unknown stem name, and a resolution the model cannot take.
    """
    m = config.model
    _check_model_shape(m.name, m.stem, m.num_classes, m.small_input, config.data.resolution,
                       what)


@functools.lru_cache(maxsize=256)
def _check_model_shape(name: str, stem: str | None, num_classes: int, small_input: bool,
                       side: int, what: str) -> None:
    """:func:`_check_model` for one architecture, remembered: a benchmark validates the same
    backbone for many configurations (a failure raises, and is not cached)."""
    import torch  # lazily: spaces without model keys load without torch

    from raytrain_at.models import create_robust_model

    try:
        with torch.device("meta"):
            model = create_robust_model(name, num_classes=num_classes, stem=stem,
                                        small_input=small_input)
            # Two images: BatchNorm in train mode refuses a single value per channel, which a
            # small model at a small side reaches (e.g. test_resnet at 32 px) and training never
            # feeds it.
            model(torch.empty(2, 3, side, side))
    except UserError as exc:
        raise UserError(f"{what}: {exc}") from None
    except (RuntimeError, AssertionError, ValueError) as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise UserError(f"{what}: {name} with stem {stem!r} does not run on "
                        f"{side}x{side} images: {first}") from None


def spaces_dir() -> Path:
    """The bundled search spaces: package data, so a regular ``pip install`` ships them (the
    checkout's ``tune_spaces/`` is a link to this folder)."""
    return Path(str(resources.files("raytrain_at").joinpath(SPACES_DIR)))


def available_spaces() -> list[str]:
    """Names of the bundled search spaces (without ``.yaml``)."""
    return sorted(p.stem for p in spaces_dir().glob("*.yaml"))


def resolve_space(path_or_name: str | os.PathLike[str]) -> Path:
    """A space file by path (``tune_spaces/x.yaml``, ``my.yaml``) or name (``x``).

    Raises:
        UserError: the file does not exist, or the name is not a bundled space.
    """
    text = os.fspath(path_or_name)
    path = Path(text)
    if path.suffix in (".yaml", ".yml") or os.sep in text or "/" in text:
        if not path.is_file():
            raise UserError(f"search space file {text!r} does not exist")
        return path
    candidate = spaces_dir() / f"{text}.yaml"
    if not candidate.is_file():
        names = available_spaces()
        close = difflib.get_close_matches(text, names, n=1, cutoff=0.6)
        hint = f" (did you mean {close[0]}?)" if close else ""
        raise UserError(f"unknown search space {text!r}{hint}; available: {', '.join(names)}")
    return candidate


def load_space(path_or_name: str | os.PathLike[str]) -> SearchSpace:
    """Read, parse and validate a search space (see the module docstring).

    Args:
        path_or_name: a YAML path, or the name of a bundled space (:func:`spaces_dir`).

    Raises:
        UserError: one line naming the file and the culprit (unknown key with a close match,
            bad value or stem, unreported metric, wrong mode, bad scheduler).
    """
    path = resolve_space(path_or_name)
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise UserError(f"search space {str(path)!r} is not valid YAML: "
                        f"{str(exc).splitlines()[0]}") from None
    if not isinstance(data, dict):
        raise UserError(f"search space {str(path)!r} must be a mapping (description, recipe, "
                        "fixed, search, metric, mode, scheduler, num_samples)")
    try:
        space = SearchSpace.model_validate(data)
    except ValidationError as exc:
        raise UserError(f"search space {str(path)!r}: {validation_message(exc)}") from None
    space._source = path
    return space.validate_against_config()


def validation_message(error: ValidationError) -> str:
    """The first validation error as one line: ``where: what`` or ``unknown field 'x'``."""
    first = error.errors()[0]
    where = ".".join(str(part) for part in first["loc"])
    message = first["msg"].removeprefix("Value error, ")
    if first["type"] == "extra_forbidden":
        return f"unknown field {where!r}"
    value = first.get("input")
    if isinstance(value, (str, int, float)) and not isinstance(value, bool):
        message += f" (got {value!r})"  # name the culprit value, not only its place
    return f"{where}: {message}" if where else message
