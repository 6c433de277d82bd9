"""Dry runs: the resolved config and what a run or a Tune study would ask Ray for.

Nothing is started and nothing is written: the config is validated as for a real run, and the
resources are those of the run's Ray Train ``ScalingConfig`` (the same function builds it).
"""

from __future__ import annotations

from typing import cast

from raytrain_at.config import RunConfig, to_yaml


def ray_resources(config: RunConfig) -> dict[str, object]:
    """Workers, resources per worker and in total, as Ray Train would request them."""
    from raytrain_at.training.launch import scaling_config

    scaling = scaling_config(config)
    per_worker = dict(scaling._resources_per_worker_not_none)  # what each worker actor gets
    return {"num_workers": scaling.num_workers, "per_worker": per_worker,
            "total": dict(scaling.total_resources),
            "per_worker_batch_size": config.per_worker_batch_size,
            # Worker-group restarts Ray Train may make in any hour (training.failure_budget).
            "failure_budget": failure_budget_text(config.scaling.max_failures_per_hour)}


def failure_budget_text(budget: int | None) -> str:
    """``scaling.max_failures_per_hour`` as the dry run states it."""
    return "unlimited restarts" if budget is None else f"{budget} restarts per hour"


def describe_run(config: RunConfig) -> str:
    """YAML text: the resolved config, then a ``ray_resources`` section."""
    import yaml

    resources = ray_resources(config)
    return (f"# resolved config of recipe {config.recipe or '(none)'}\n{to_yaml(config)}"
            "# what the run asks Ray for (Ray Train ScalingConfig)\n"
            + yaml.safe_dump({"ray_resources": resources}, sort_keys=False))


def describe_study(space) -> str:
    """YAML text for ``raytrain-at tune --dry-run``: the validated space (a
    :class:`~raytrain_at.tuning.spaces.SearchSpace`) in its mode, its trial count, each trial's
    resources (its Train workers plus the Tune trial function's small CPU share), how its trials
    are evaluated and, for a paper table, every trial with its schedule and published numbers."""
    import yaml

    from raytrain_at.config import load_config
    from raytrain_at.tuning.study import TRIAL_DRIVER_CPU

    base = load_config(space.recipe, values=space.fixed)
    workers = ray_resources(base)
    trial_total = dict(cast("dict[str, float]", workers["total"]))
    trial_total["CPU"] = trial_total.get("CPU", 0.0) + TRIAL_DRIVER_CPU
    spec = space.evaluation
    summary = {
        "space": space.name, "source": str(space.source) if space.source else None,
        "description": space.description, "study_mode": space.study_mode,
        "recipe": space.recipe, "fixed": dict(space.fixed),
        "search": {k: d.model_dump(exclude_none=True) for k, d in space.search.items()},
        "metric": space.metric, "mode": space.mode,
        "scheduler": space.scheduler.model_dump(exclude_unset=True),
        "trials": space.num_trials(),
        "ray_resources_per_trial": {"train_workers": workers, "total": trial_total},
        "evaluation": {"trials": spec.top, "version": spec.version, "norms": list(spec.norms),
                       "eps": dict(spec.eps) or "the paper's (4/255, 2, 75 at 224 px)",
                       "n": "all" if spec.n is None else spec.n, "data": spec.data},
    }
    if space.fast is not None and space.study_mode != "fast":
        summary["fast_mode"] = {"scheduler": space.fast.scheduler.model_dump(exclude_unset=True),
                                "evaluated_trials": space.fast.top,
                                "trials": space.grid_size() * space.num_samples}
    if space.paper is not None:
        summary["paper"] = {"table": space.paper.table, "rows": [_trial_line(space, row.point, row)
                                                                for row in space.paper.rows]}
    # Flow style for the innermost mappings and lists: one line per row's point and numbers.
    return yaml.safe_dump(summary, sort_keys=False, width=100, default_flow_style=None)


def _trial_line(space, point: dict, row) -> dict[str, object]:
    """One paper row as the dry run lists it: the trial's point, its length and early-stopping
    setting, and the published numbers."""
    config = space.trial_config(point)
    stops = space.scheduler.kind == "asha"
    return {"row": row.label, "point": dict(point), "epochs": config.schedule.epochs,
            "early_stopping": (f"ASHA after epoch {space.scheduler.grace_period}" if stops
                               else "none (full schedule)"),
            "published": {key: getattr(row, key) for key in ("flops", "clean", "linf", "l2",
                                                             "l1")
                          if getattr(row, key) is not None}}


def describe_benchmark(path: str, name: str | None = None) -> str:
    """YAML text for ``raytrain-at finetune-benchmark --dry-run``: the file, and every
    configuration (validated as a real run validates them) with its trial count."""
    import yaml

    from raytrain_at.finetune_benchmark.spec import configurations, load_benchmark

    spec, source = load_benchmark(path)
    configs = configurations(spec, f"finetune-benchmark-{name or source.stem}", source)
    summary = {"finetune_benchmark": name or source.stem, "source": str(source),
               "configurations": len(configs),
               "trials": sum(c.space.num_trials() for c in configs),
               "each": {c.key: c.space.num_trials() for c in configs}}
    return yaml.safe_dump(summary, sort_keys=False)
