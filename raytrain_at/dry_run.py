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
            "per_worker_batch_size": config.per_worker_batch_size}


def describe_run(config: RunConfig) -> str:
    """YAML text: the resolved config, then a ``ray_resources`` section."""
    import yaml

    resources = ray_resources(config)
    return (f"# resolved config of recipe {config.recipe or '(none)'}\n{to_yaml(config)}"
            "# what the run asks Ray for (Ray Train ScalingConfig)\n"
            + yaml.safe_dump({"ray_resources": resources}, sort_keys=False))


def describe_study(space) -> str:
    """YAML text for ``raytrain-at tune --dry-run``: the validated space (a
    :class:`~raytrain_at.tuning.spaces.SearchSpace`), its trial count and each trial's
    resources (its Train workers plus the Tune trial function's small CPU share)."""
    import yaml

    from raytrain_at.config import load_config
    from raytrain_at.tuning.study import TRIAL_DRIVER_CPU

    base = load_config(space.recipe, values=space.fixed)
    workers = ray_resources(base)
    trial_total = dict(cast("dict[str, float]", workers["total"]))
    trial_total["CPU"] = trial_total.get("CPU", 0.0) + TRIAL_DRIVER_CPU
    summary = {
        "space": space.name, "source": str(space.source) if space.source else None,
        "description": space.description, "recipe": space.recipe, "fixed": dict(space.fixed),
        "search": {k: d.model_dump(exclude_none=True) for k, d in space.search.items()},
        "metric": space.metric, "mode": space.mode,
        "scheduler": space.scheduler.model_dump(exclude_none=True),
        "trials": space.num_trials(),
        "ray_resources_per_trial": {"train_workers": workers, "total": trial_total},
    }
    return yaml.safe_dump(summary, sort_keys=False)


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
