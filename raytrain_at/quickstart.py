"""The quickstart on the embedded default (local CPUs, no cluster, bundled digits).

Trains ConvNeXt-atto + ConvStem twice with Ray Train (2 CPU workers) and DeepSpeed: once
adversarially (2-step APGD, l_inf 8/255) and once clean, both tracked in MLflow, then prints their
held-out clean accuracy and l_inf APGD robust accuracy side by side. ``raytrain-at models`` prints
the model-size table (Table 14).
"""

from __future__ import annotations

import time

import timm
from rich.console import Console
from rich.table import Table

from raytrain_at.models import complexity, stem_spec_of
from raytrain_at.models.paper_tables import TABLE14
from raytrain_at.models.stems import design_name


def make_console() -> Console:
    """A console that does not squeeze tables to 80 columns when output is not a terminal."""
    console = Console()
    return console if console.is_terminal else Console(width=120)


def model_size_table(console: Console, resolution: int = 224) -> None:
    """Print params and FLOPs of every Table 14 model beside the paper's figures."""
    table = Table(title=f"Registered models at {resolution}x{resolution} (fvcore FLOPs)")
    for col in ("model", "stem", "params (M)", "paper", "FLOPs (G)", "paper"):
        table.add_column(col, justify="left" if col in ("model", "stem") else "right")
    with console.status("building models and counting FLOPs ..."):
        for name, row in TABLE14.items():
            backbone = timm.create_model(name, pretrained=False)
            size = complexity(backbone, resolution)
            table.add_row(name, design_name(stem_spec_of(backbone)) or "PatchStem",
                          f"{size.params_m:.2f}", f"{row.params_m:.2f}", f"{size.flops_g:.2f}",
                          f"{row.flops_g:.2f}")
    console.print(table)


# The two trainings compared: the recipe as is, and the same run without the attack.
VARIANTS: dict[str, list[str]] = {
    "adversarial (2-step APGD, l_inf 8/255)": [],
    "clean": ["objective.kind=clean", "attack.kind=none"],
}


def run_quickstart(extra_overrides: list[str] | None = None) -> dict[str, dict[str, float]]:
    """Entry point of ``raytrain-at quickstart``; returns the final metrics per variant."""
    from raytrain_at.config import load_config
    from raytrain_at.training.launch import launch, prepare_run

    console = make_console()
    stamp = time.strftime("%Y%m%d-%H%M%S")
    results: dict[str, dict[str, float]] = {}
    uri = None
    for index, (label, overrides) in enumerate(VARIANTS.items()):
        config = load_config("quickstart", overrides + list(extra_overrides or []))
        prepared = prepare_run(config, run_name=f"quickstart-{stamp}-{index}")
        uri = prepared.tracking_uri
        console.print(f"[bold]training {label}[/bold]: {config.model.name} on digits, "
                      f"{config.scaling.num_workers} Ray Train workers, DeepSpeed ZeRO-"
                      f"{config.optim.zero_stage}, {config.schedule.epochs} epochs "
                      f"(run {prepared.run_name})")
        started = time.perf_counter()
        result = launch(prepared)
        metrics = dict(result.metrics or {})
        metrics["minutes"] = (time.perf_counter() - started) / 60
        results[label] = metrics
    config = load_config("quickstart")
    table = Table(title=f"Held-out digits ({config.data.heldout_size or 297} images): "
                        f"EMA weights after {config.schedule.epochs} epochs")
    for col in ("training", "clean accuracy",
                f"l_inf {round(config.attack.eps * 255)}/255 APGD-{config.attack.heldout_steps} "
                "robust accuracy", "train minutes"):
        table.add_column(col, justify="left" if col == "training" else "right")
    for label, metrics in results.items():
        table.add_row(label, f"{metrics.get('heldout_clean_accuracy', float('nan')):.3f}",
                      f"{metrics.get('heldout_robust_accuracy', float('nan')):.3f}",
                      f"{metrics['minutes']:.1f}")
    console.print(table)
    console.print(f"Runs, params, per-epoch metrics and weights are in MLflow ({uri}): run "
                  "`mlflow ui` in this folder (or with --backend-store-uri set to it) and open "
                  "http://127.0.0.1:5000.", soft_wrap=True)
    return results
