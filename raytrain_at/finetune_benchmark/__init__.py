"""The robust fine-tuning benchmark (second paper): backbones x datasets x losses x protocols,
each configuration a Ray Tune study, measured five ways, tabulated with aggregates and plots."""

from raytrain_at.finetune_benchmark.runner import BenchmarkOutcome, run_benchmark
from raytrain_at.finetune_benchmark.spec import BenchmarkSpec, Configuration, load_benchmark

__all__ = ["BenchmarkOutcome", "BenchmarkSpec", "Configuration", "load_benchmark",
           "run_benchmark"]
