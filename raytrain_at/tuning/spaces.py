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
    scheduler: {kind: fifo}                               # every trial to its last epoch
    num_samples: 1                                        # Ray repeats the grid this often
    evaluation: {top: all, version: standard}             # AutoAttack of every completed trial
    paper:                                                # optional: the table it reproduces
      table: Table 7 (App. B.1)
      rows:                                               # one trial per row in paper mode
        - {label: "Conv4,4, L", point: {model.stem: "table7:1"},
           clean: 71.0, linf: 46.5, l2: 38.1, l1: 14.9, flops: 4.49}
    fast:                                                 # optional: `--fast`, early stopping
      scheduler: {kind: asha, grace_period: 20, reduction_factor: 2}   # time unit: epochs
      top: 1                                              # over the whole grid

A space with a ``paper`` table runs in *paper mode* by default: one trial per row (the table's
designs, not the grid's product), each to its full schedule (FIFO), every completed trial
evaluated as the ``evaluation`` section says, and the results set beside the published numbers.
``--fast`` (:meth:`SearchSpace.in_fast_mode`) runs the whole grid with the ``fast`` section's ASHA
scheduler instead and evaluates its best trials. ASHA's first rung must come after the trials'
learning-rate warm-up (``grace_period`` > ``optim.warmup_epochs``): before it, a design is judged
on how far its warm-up got, not on what it learns.

The file is read by the project's one YAML loader (:mod:`raytrain_at.config_loader`: a ``base:``
chain of spaces, dotted keys, ``4/255`` radii). A trial's sample is a nested dict
(``{"model": {"stem": "table7:4"}}``) deep-merged into the recipe with the ``fixed`` keys, never
written out as text. A Tune run starts many trials, so a typo in a key or a stem name must fail
here, before Ray starts anything: :func:`load_space` checks every key against the recipe's keys
(with a close-match hint), runs every grid and choice value (and both ends of each range) through
:func:`~raytrain_at.config.load_config`, builds the model on PyTorch's meta device for every stem /
model / resolution value (shape checks only), and checks the metric, mode and scheduler.

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
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, PrivateAttr, field_validator, model_validator

from raytrain_at.config import RunConfig, flatten, load_config, recipe_data
from raytrain_at.config_loader import (
    SPACES,
    StrictModel,
    deep_merge,
    flat_keys,
    nest,
    validate,
)
from raytrain_at.errors import UserError
from raytrain_at.evaluation.settings import EvaluationSettings
from raytrain_at.evaluation.threats import NORMS

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
class Distribution(StrictModel):
    """How one key is searched: exactly one of ``grid``, ``choice``, ``uniform``, ``loguniform``.

    Attributes:
        grid: every value is run (``tune.grid_search``); counts in :meth:`SearchSpace.grid_size`.
        choice: one value drawn per trial (``tune.choice``).
        uniform: ``[lo, hi]``, drawn uniformly (``tune.uniform``); float keys only.
        loguniform: ``[lo, hi]`` with ``lo > 0``, drawn log-uniformly (``tune.loguniform``).
    """

    grid: list[Any] | None = Field(default=None, min_length=1)
    choice: list[Any] | None = Field(default=None, min_length=1)
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
    def first(self) -> Any:
        """The first listed value, or the lower bound of a range."""
        if self.values is not None:
            return self.values[0]
        return self.bounds[0] if self.bounds is not None else None

    @property
    def bounds(self) -> tuple[float, float] | None:
        """``(lo, hi)`` of a range; None for a grid or choice."""
        return self.uniform if self.uniform is not None else self.loguniform


class SchedulerSpec(StrictModel):
    """The Tune trial scheduler. Time is counted in reported epochs (one report per epoch).

    Attributes:
        kind: ``asha`` (stop trials early that lag at a rung) or ``fifo`` (run every trial fully).
        grace_period: ASHA: epochs every trial runs before it can be stopped.
        reduction_factor: ASHA: keep the best 1/reduction_factor of trials at each rung.
        max_t: ASHA: the last epoch considered; None means the trials' ``schedule.epochs``.
    """

    kind: Literal["asha", "fifo"] = "fifo"
    grace_period: int = Field(default=1, ge=1)
    reduction_factor: float = Field(default=2.0, gt=1.0)
    max_t: int | None = Field(default=None, ge=1)

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


class StudyEvaluation(EvaluationSettings):
    """How a study's trials are evaluated with AutoAttack (and the best registered): the
    evaluation settings (:class:`~raytrain_at.evaluation.settings.EvaluationSettings`: version,
    norms, radii, n, workers, sweeps, corruptions) plus what they are applied to.

    Attributes:
        data: the test data the trials are reported on (.beton path, ``$VAR`` allowed, or a
            bundled name such as ``digits``, meaning its test split); None: the bundled training
            data's test split (an error for trials training on their own files).
        top: how many of the best completed trials are evaluated (0: none, nothing registered;
            ``all``: every completed trial, as the paper mode does).
        register_best: register the best evaluated trial's model in the MLflow registry.

    ``workers`` defaults to 2 here (the study's evaluations share the cluster); ``batch_size``,
    when not given, splits the ``n`` images into one chunk per worker.
    """

    data: str | None = None
    top: int | Literal["all"] = Field(default=1)
    workers: int = Field(default=2, ge=1)
    register_best: bool = True

    @field_validator("top")
    @classmethod
    def _top_not_negative(cls, value: int | str) -> int | str:
        if isinstance(value, int) and value < 0:
            raise ValueError(f"top {value} must be 0 or more, or 'all'")
        return value

    def count(self, completed: int) -> int:
        """How many of ``completed`` ranked trials are evaluated."""
        return completed if self.top == "all" else min(int(self.top), completed)


class PaperRow(StrictModel):
    """One row of the paper's table: the trial that reproduces it and the published numbers.

    Attributes:
        label: the table's name for the row (e.g. ``"Conv3,2, L, G, Conv3,2, L, G"``).
        point: the row's value of every searched key (``{"model.stem": "table7:6"}``).
        clean, linf, l2, l1: published clean and robust accuracy in percent (None: not given).
        flops: published GFLOPs of the design, where the table lists them.
    """

    label: str = Field(min_length=1)
    point: dict[str, Any] = Field(min_length=1)
    clean: float | None = Field(default=None, ge=0, le=100)
    linf: float | None = Field(default=None, ge=0, le=100)
    l2: float | None = Field(default=None, ge=0, le=100)
    l1: float | None = Field(default=None, ge=0, le=100)
    flops: float | None = Field(default=None, gt=0)

    def published(self) -> dict[str, float]:
        """The published accuracies as fractions, keyed as evaluation metrics (``clean_acc``,
        ``robust_acc_linf``, ...)."""
        values = {"clean_acc": self.clean, **{f"robust_acc_{norm}": getattr(self, norm)
                                              for norm in NORMS}}
        return {key: value / 100 for key, value in values.items() if value is not None}


class PaperTable(StrictModel):
    """The table a space reproduces (see the module docstring's paper mode).

    Attributes:
        table: which table, e.g. ``Table 7 (App. B.1)``.
        rows: its rows, one trial each in paper mode.
    """

    table: str = Field(min_length=1)
    rows: list[PaperRow] = Field(min_length=1)

    @model_validator(mode="after")
    def _distinct(self) -> PaperTable:
        labels = [row.label for row in self.rows]
        if len(set(labels)) != len(labels):
            raise ValueError(f"paper rows repeat a label: {labels}")
        points = [json.dumps(row.point, sort_keys=True) for row in self.rows]
        if len(set(points)) != len(points):
            raise ValueError("two paper rows have the same point")
        return self


class FastMode(StrictModel):
    """``--fast``: the whole grid with early stopping (ASHA), its best trials evaluated.

    Attributes:
        scheduler: the scheduler of the fast mode (``kind: asha``).
        top: how many of the best completed trials are evaluated.
    """

    scheduler: SchedulerSpec
    top: int = Field(default=1, ge=0)

    @model_validator(mode="after")
    def _early_stopping(self) -> FastMode:
        if self.scheduler.kind != "asha":
            raise ValueError("fast.scheduler.kind must be asha (the fast mode stops trials "
                             "early)")
        return self


# The Tune parameter of a paper-mode trial: the label of its paper row (one grid value per row).
PAPER_ROW_KEY = "paper_row"


class StudyFields(StrictModel):
    """The fields of a study that a search space and a benchmark share.

    Attributes:
        description: one line on what the study reproduces.
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
    num_samples: int = Field(default=1, ge=1)
    evaluation: StudyEvaluation = StudyEvaluation()

    def study_fields(self) -> dict[str, Any]:
        """These fields alone, as keyword arguments of a :class:`SearchSpace`."""
        return {name: getattr(self, name) for name in StudyFields.model_fields}


class SearchSpace(StudyFields):
    """A validated Ray Tune search space over the run config's dotted keys.

    Build it with :func:`load_space`, which also checks it against the base recipe; constructing
    it directly checks only the YAML's shape. The fields of :class:`StudyFields`, and:

    Attributes:
        paper: the table the space reproduces; with it the space runs in paper mode (one trial
            per row, to the end, every trial evaluated) unless :meth:`in_fast_mode`.
        fast: the ``--fast`` mode (ASHA over the whole grid), if the space offers one.
    """

    paper: PaperTable | None = None
    fast: FastMode | None = None

    _source: Path | None = PrivateAttr(None)
    _fast: bool = PrivateAttr(False)

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

    @property
    def runs_paper_rows(self) -> bool:
        """Paper mode: the space has a paper table and runs its rows (not ``--fast``)."""
        return self.paper is not None and not self._fast

    @property
    def study_mode(self) -> Literal["paper", "fast", "grid"]:
        """``paper`` (the table's rows, to the end), ``fast`` (``--fast``) or ``grid`` (a space
        without a paper table: the grid with the space's own scheduler)."""
        if self._fast:
            return "fast"
        return "paper" if self.paper is not None else "grid"

    def in_fast_mode(self) -> SearchSpace:
        """The space in its ``--fast`` mode: the whole grid, the ``fast`` section's ASHA
        scheduler and number of evaluated trials (validated again).

        Raises:
            UserError: the space has no ``fast`` section.
        """
        if self.fast is None:
            raise UserError(f"{self._where()} has no fast mode (no 'fast:' section)")
        fast = self.model_copy(update={
            "scheduler": self.fast.scheduler,
            "evaluation": self.evaluation.model_copy(update={"top": self.fast.top})})
        fast._source, fast._fast = self._source, True
        return fast.validate_against_config()

    def trial_points(self) -> list[dict[str, Any]] | None:
        """The trials' points in paper mode (one per row: ``{searched key: value}``); None when
        the grid decides them."""
        if not self.runs_paper_rows or self.paper is None:
            return None
        return [dict(row.point) for row in self.paper.rows]

    def paper_row(self, sample: Mapping[str, Any]) -> PaperRow | None:
        """The paper row whose point is this trial's sample (None: no row has it)."""
        if self.paper is None:
            return None
        point = self.flat_sample(sample)
        wanted = json.dumps(point, sort_keys=True)
        return next((row for row in self.paper.rows
                     if json.dumps(row.point, sort_keys=True) == wanted), None)

    def num_trials(self) -> int:
        """How many trials Ray Tune will start: ``grid_size() * num_samples``, or one per paper
        row (times ``num_samples``) in paper mode."""
        points = self.trial_points()
        return (len(points) if points is not None else self.grid_size()) * self.num_samples

    def to_tune_param_space(self) -> dict[str, Any]:
        """The ``param_space`` for ``ray.tune.Tuner``: the searched keys only, nested like the
        run config (``{"model": {"stem": grid_search([...])}}``), so the config Tune hands a
        trial is a nested sample that :meth:`trial_config` merges into the recipe as it is.
        In paper mode one grid over the rows' labels (``{"paper_row": grid_search([...])}``):
        Tune has no grid over combinations, and :meth:`flat_sample` maps a label back to its
        row's point.

        Fixed keys are not in it: :meth:`trial_values` adds them to every trial.
        """
        from ray import tune  # lazily: loading and validating a space must not need Ray

        if self.runs_paper_rows and self.paper is not None:
            return {PAPER_ROW_KEY: tune.grid_search([row.label for row in self.paper.rows])}
        makers = {"grid": tune.grid_search, "choice": tune.choice}
        space: dict[str, Any] = {}
        for key, dist in self.search.items():
            if dist.values is not None:
                space[key] = makers[dist.kind](list(dist.values))
            elif dist.bounds is not None:
                lo, hi = dist.bounds
                space[key] = (tune.uniform if dist.kind == "uniform" else tune.loguniform)(lo, hi)
        return nest(space)

    def flat_sample(self, sample: Mapping[str, Any]) -> dict[str, Any]:
        """A trial's sample (nested as Tune passes it, or dotted, or a paper row's label under
        ``paper_row``) as ``{searched key: value}``.

        Raises:
            UserError: a searched key is missing from ``sample`` or ``sample`` has other keys,
                or a paper row's label is not one of the table's.
        """
        flat = flat_keys(nest(sample, "trial sample key"))
        if PAPER_ROW_KEY in flat and self.paper is not None:
            label = flat.pop(PAPER_ROW_KEY)
            row = next((r for r in self.paper.rows if r.label == label), None)
            if row is None or flat:
                raise UserError(f"trial sample for search space {self.name!r}: paper row "
                                f"{label!r} is not one of {[r.label for r in self.paper.rows]}"
                                + (f" (unexpected {sorted(flat)})" if flat else ""))
            flat = dict(row.point)
        missing = [key for key in self.search if key not in flat]
        unknown = [key for key in flat if key not in self.search]
        if missing or unknown:
            raise UserError(f"trial sample for search space {self.name!r} does not match its "
                            f"keys: missing {missing}, unexpected {unknown}")
        return {key: flat[key] for key in self.search}

    def trial_values(self, sample: Mapping[str, Any]) -> dict[str, Any]:
        """What one trial changes in the recipe, as one nested dict: the fixed keys, then the
        sample (keys are disjoint, so the order only matters for reading)."""
        return deep_merge(nest(self.fixed), nest(self.flat_sample(sample)))

    def trial_config(self, sample: Mapping[str, Any]) -> RunConfig:
        """The validated run config of one trial: the recipe merged with the fixed keys and the
        trial's sample."""
        return validate(RunConfig, recipe_data(self.recipe, self.trial_values(sample)))

    def scheduler_max_t(self) -> int:
        """ASHA's last epoch: ``scheduler.max_t`` or the trials' ``schedule.epochs``."""
        if self.scheduler.max_t is not None:
            return self.scheduler.max_t
        return load_config(self.recipe, values={**self.fixed, **self._first_values()}
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

        fixed = dict(self.fixed)
        fixed_config = self._load_in_context(fixed, self._first_values(), "fixed overrides")
        if any(_affects_model(key) for key in self.fixed):
            _check_model(fixed_config, f"{where}: fixed overrides")
        for key, dist in self.search.items():
            self._check_distribution(key, dist, fixed, flat[key])
        self._check_combinations(fixed)
        trial_base = self._load({**fixed, **self._first_values()}, "first grid point")
        self._check_metric(trial_base)
        self._check_scheduler(trial_base, self.scheduler, "scheduler")
        self._check_evaluation_data(trial_base)
        self._check_paper()
        self._check_fast(trial_base)
        return self

    def _check_paper(self) -> None:
        """Paper mode reproduces the table: its rows are grid points of the searched keys, run
        to the end (FIFO) and all evaluated in every norm."""
        if self.paper is None:
            return
        where = self._where()
        ranged = [key for key, dist in self.search.items() if dist.grid is None]
        if ranged:
            raise UserError(f"{where}: a paper table needs grid keys only; {ranged[0]!r} is "
                            f"a {self.search[ranged[0]].kind}")
        for row in self.paper.rows:
            if set(row.point) != set(self.search):
                raise UserError(f"{where}: paper row {row.label!r} sets {sorted(row.point)}, "
                                f"the searched keys are {sorted(self.search)}")
            # Each value as the config parses it (5e-3 -> 0.005), as the grid holds it.
            config = self._load({**self.fixed, **row.point}, f"paper row {row.label!r}")
            parsed = {key: flatten(config)[key] for key in row.point}
            for key, value in parsed.items():
                if value not in (self.search[key].grid or []):
                    raise UserError(f"{where}: paper row {row.label!r}: {key}={value!r} is not "
                                    f"in its grid {self.search[key].grid}")
            row.point = parsed
        if not self.runs_paper_rows:
            return
        if self.scheduler.kind != "fifo":
            raise UserError(f"{where}: paper mode runs every row to its last epoch: scheduler "
                            f"must be fifo (early stopping is the 'fast:' mode)")
        if self.evaluation.top != "all" and int(self.evaluation.top) < len(self.paper.rows):
            raise UserError(f"{where}: paper mode evaluates every row: set evaluation.top to "
                            f"all (it is {self.evaluation.top})")
        missing = [norm for norm in NORMS if norm not in self.evaluation.norms]
        if missing:
            raise UserError(f"{where}: paper mode evaluates l_inf, l_2 and l_1: "
                            f"evaluation.norms lacks {', '.join(missing)}")

    def _check_fast(self, trial: RunConfig) -> None:
        """The fast mode's ASHA is checked like the space's own scheduler."""
        if self.fast is not None and not self._fast:
            self._check_scheduler(trial, self.fast.scheduler, "fast.scheduler")

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

    def _first_values(self, skip: str | None = None) -> dict[str, Any]:
        """The first value of every searched key (its first grid point or lower bound)."""
        return {key: dist.first for key, dist in self.search.items() if key != skip}

    def _load(self, values: dict[str, Any], what: str) -> RunConfig:
        try:
            return load_config(self.recipe, values=values)
        except UserError as exc:
            raise UserError(f"{self._where()}: {what}: {exc}") from None

    def _load_in_context(self, values: dict[str, Any], context: dict[str, Any], what: str
                         ) -> RunConfig:
        """Load ``values`` alone; if that fails, with ``context`` (other searched keys).

        Why both: alone, an error is the values' own and names them; but a cross-key rule
        (attack.eps_t2 >= attack.eps_t1, batch / worker divisibility) may need a searched key to
        complete them. When both fail for different reasons, the error with the context is
        reported, naming the context: it is the error of a trial that would run.
        """
        try:
            return load_config(self.recipe, values=values)
        except UserError as alone:
            if not context:
                raise UserError(f"{self._where()}: {what}: {alone}") from None
            try:
                return load_config(self.recipe, values={**values, **context})
            except UserError as together:
                if str(together) == str(alone):
                    raise UserError(f"{self._where()}: {what}: {alone}") from None
                raise UserError(f"{self._where()}: {what} (with {', '.join(_shown(context))}): "
                                f"{together}") from None

    def _check_key(self, key: str, section: str, flat: dict[str, Any]) -> None:
        if key == "recipe":
            raise UserError(f"{self._where()}: {section} key 'recipe': set the base recipe with "
                            "the top-level 'recipe:' field")
        if key not in flat:
            close = difflib.get_close_matches(key, list(flat), n=3, cutoff=0.6)
            hint = f" (did you mean {', '.join(close)}?)" if close else ""
            raise UserError(f"{self._where()}: unknown {section} key {key!r}{hint}")

    def _check_distribution(self, key: str, dist: Distribution, fixed: dict[str, Any],
                            default: Any) -> None:
        context = self._first_values(skip=key)
        if dist.bounds is not None:
            # A range only makes sense for a float key: an int key would get 1.7 at run time.
            if not isinstance(default, (float, type(None))):  # None: checked on the bounds below
                raise UserError(f"{self._where()}: search key {key!r} holds "
                                f"{type(default).__name__} values; use grid or choice, not "
                                f"{dist.kind}")
            for end in dist.bounds:
                config = self._load_in_context({**fixed, key: end}, context,
                                               f"search key {key!r} {dist.kind} bound {end!r}")
                if not isinstance(flatten(config)[key], float):
                    raise UserError(f"{self._where()}: search key {key!r} is not a float key; use "
                                    f"grid or choice, not {dist.kind}")
            return
        parsed = []
        for value in dist.values or []:
            config = self._load_in_context({**fixed, key: value}, context,
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

    def _check_combinations(self, fixed: dict[str, Any]) -> None:
        finite = {key: d.values for key, d in self.search.items() if d.values is not None}
        size = math.prod(len(v) for v in finite.values())
        if len(finite) < 2 or size > _MAX_CHECKED_COMBINATIONS:
            return
        ranges = {k: d.bounds[0] for k, d in self.search.items() if d.bounds is not None}
        for combo in itertools.product(*finite.values()):
            values = dict(zip(finite, combo))
            self._load({**fixed, **values, **ranges}, f"combination {_shown(values)}")

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

    def _check_scheduler(self, config: RunConfig, spec: SchedulerSpec, what: str) -> None:
        if spec.kind != "asha":
            return
        warmup = config.optim.warmup_epochs
        if spec.grace_period <= warmup:
            raise UserError(f"{self._where()}: {what}.grace_period "
                            f"{spec.grace_period} ends within the {warmup:g} warm-up "
                            f"epochs: ASHA would rank the trials on their warm-up; give a grace "
                            f"period above {warmup:g}")
        if "schedule.epochs" in self.search and spec.max_t is None:
            raise UserError(f"{self._where()}: schedule.epochs is searched: set scheduler.max_t "
                            "(the epoch at which ASHA's last rung ends)")
        epochs = config.schedule.epochs
        if "schedule.epochs" in self.search:  # the longest trials decide what ASHA can see
            dist = self.search["schedule.epochs"]
            top = max(dist.values) if dist.values is not None else (dist.bounds or (0, 0))[1]
            epochs = int(top)
        max_t = spec.max_t or epochs
        if max_t > epochs:
            raise UserError(f"{self._where()}: {what}.max_t {max_t} exceeds schedule.epochs "
                            f"{epochs}: no trial reports that many epochs")
        if spec.grace_period >= max_t:
            raise UserError(f"{self._where()}: {what}.grace_period "
                            f"{spec.grace_period} must be below the last epoch {max_t}, "
                            "or ASHA never stops a trial")


# --------------------------------------------------------------------------- helpers
def _shown(values: Mapping[str, Any]) -> list[str]:
    """``["attack.eps_t1=4.0", ...]``: values as an error message names them (not parsed)."""
    return [f"{key}={value}" for key, value in values.items()]


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
    return SPACES.bundled_dir()


def available_spaces() -> list[str]:
    """Names of the bundled search spaces (without ``.yaml``)."""
    return SPACES.available()


def resolve_space(path_or_name: str | os.PathLike[str]) -> Path:
    """A space file by path (``tune_spaces/x.yaml``, ``my.yaml``) or name (``x``).

    Raises:
        UserError: the file does not exist, or the name is not a bundled space.
    """
    return SPACES.resolve(path_or_name)


def load_space(path_or_name: str | os.PathLike[str]) -> SearchSpace:
    """Read, parse and validate a search space (see the module docstring).

    Args:
        path_or_name: a YAML path, or the name of a bundled space (:func:`spaces_dir`).

    Raises:
        UserError: one line naming the file and the culprit (unknown key with a close match,
            bad value or stem, unreported metric, wrong mode, bad scheduler).
    """
    data, path = SPACES.read(path_or_name)
    space = validate(SearchSpace, data, f"search space {str(path)!r}", noun="field")
    space._source = path
    return space.validate_against_config()
