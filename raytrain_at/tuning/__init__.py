"""Ray Tune over the run config: search spaces from ``raytrain_at/tune_spaces/*.yaml``, validated
up front."""

from raytrain_at.tuning.spaces import (METRIC_MODES, Distribution, SchedulerSpec, SearchSpace,
                                       available_spaces, format_value, load_space,
                                       resolve_space, spaces_dir)

__all__ = [
    "METRIC_MODES", "Distribution", "SchedulerSpec", "SearchSpace", "available_spaces",
    "format_value", "load_space", "resolve_space", "spaces_dir",
]
