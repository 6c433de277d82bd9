"""The quickstart on the embedded default (local CPUs, no cluster, bundled digits).

Trains ConvNeXt-atto + ConvStem twice with Ray Train (2 CPU workers) and DeepSpeed: once
adversarially (2-step APGD, l_inf 8/255) and once clean, both tracked in MLflow, then prints the
selected epoch of each (best on the validation digits carved from the training split: robust
accuracy for the adversarial run, clean accuracy for the clean one) with its clean and l_inf APGD
robust accuracy. The adversarially trained model (its selected weights, ``runs:/ID/model``) is
then evaluated on the test digits with the standard AutoAttack in l_inf, l_2 and l_1 (2 Ray
workers), registered in MLflow's model registry, and the leaderboard is printed.
``raytrain-at models`` prints the model-size table (Table 14).

Standard AutoAttack is expensive on a CPU: a chunk of 8 robust digits takes about 90 s per norm
and CPU core (APGD-T and FAB-T with 9 target classes, Square with 5,000 queries), and the cost is
mostly per model call, not per image. So the quickstart attacks the first ``eval_n`` test digits
(default 8) as one chunk, whose three (chunk, norm) units the two workers share; that keeps the
quickstart under 10 minutes on 2 cores. ``--eval-n`` raises it and ``raytrain-at evaluate``
takes the whole split.
"""

from __future__ import annotations

import time
from pathlib import Path

import timm
from rich.console import Console
from rich.table import Table

from raytrain_at.runtime.console import make_console
from raytrain_at.evaluation.threats import NORMS, Norm
from raytrain_at.models import complexity, stem_spec_of
from raytrain_at.models.paper_tables import TABLE14
from raytrain_at.models.stems import design_name
from raytrain_at.registry.leaderboard_formats import print_table
from raytrain_at.tracking.redact import without_userinfo


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


REGISTERED_NAME = "quickstart-convnext-atto-cvst"
QUICKSTART_EPS: dict[Norm, float] = {"l2": 1.0, "l1": 8.0}


def run_quickstart(extra_overrides: list[str] | None = None,
                   eval_n: int = 8) -> dict[str, dict[str, float]]:
    """Entry point of ``raytrain-at quickstart``; returns the final metrics per variant."""
    from raytrain_at.config import load_config
    from raytrain_at.training.launch import launch, prepare_run

    from raytrain_at.tracking.runs import find_run_id, metrics_at_step

    console = make_console()
    stamp = time.strftime("%Y%m%d-%H%M%S")
    results: dict[str, dict[str, float]] = {}
    models: dict[str, str] = {}
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
        run_id = find_run_id(uri, config.tracking.experiment, prepared.run_name)
        # The run's model is its selected epoch (best held-out score), not the last one.
        selected = int((result.metrics or {})["selected_epoch"])
        metrics = metrics_at_step(uri, run_id, ["heldout_clean_accuracy",
                                                "heldout_robust_accuracy"], selected)
        metrics.update(selected_epoch=selected, minutes=(time.perf_counter() - started) / 60)
        results[label] = metrics
        models[label] = f"runs:/{run_id}/model"
    config = load_config("quickstart")
    table = Table(title=f"Validation digits ({config.data.heldout_size or 150} images carved "
                        f"from the training split): the selected epoch's EMA weights")
    for col in ("training", "selected epoch", "clean accuracy",
                f"l_inf {round(config.attack.eps * 255)}/255 APGD-{config.attack.heldout_steps} "
                "robust accuracy", "train minutes"):
        table.add_column(col, justify="left" if col == "training" else "right")
    for label, metrics in results.items():
        table.add_row(label, f"{metrics['selected_epoch']}/{config.schedule.epochs}",
                      f"{metrics.get('heldout_clean_accuracy', float('nan')):.3f}",
                      f"{metrics.get('heldout_robust_accuracy', float('nan')):.3f}",
                      f"{metrics['minutes']:.1f}")
    console.print(table)
    adversarial = next(iter(VARIANTS))
    _evaluate_and_register(console, models[adversarial], config, eval_n, stamp)
    console.print(f"Runs, params, per-epoch metrics, weights and the registered models are in "
                  f"MLflow ({without_userinfo(uri or '')}): run `mlflow ui` in this folder "
                  "(or with --backend-store-uri "
                  "set to it) and open http://127.0.0.1:5000 (Models tab for the registry).",
                  soft_wrap=True)
    return results


def _evaluate_and_register(console: Console, model_ref: str, config, eval_n: int,
                           stamp: str) -> None:
    """Standard AutoAttack, registration, and the leaderboard. Radii: l_inf at the training
    radius; l_2 1.0 and l_1 8.0, because the paper's radii scaled from 224 to 32 pixels (0.29 and
    1.5) leave every upsampled 8x8 digit robust and would say nothing about generalisation."""
    from raytrain_at.evaluation.evaluate import EvaluationRequest, evaluate
    from raytrain_at.evaluation.result import summary_table
    from raytrain_at.registry.register import leaderboard, leaderboard_table, register_model

    console.print(f"[bold]evaluating[/bold] the adversarially trained model: standard AutoAttack "
                  f"in l_inf, l_2 and l_1 on the first {eval_n} test digits, 2 Ray workers")
    request = EvaluationRequest(
        model_ref=model_ref, data="digits", norms=list(NORMS),
        eps={**QUICKSTART_EPS, "linf": config.attack.eps}, version="standard", n=eval_n, workers=2,
        # One chunk: the 2 workers share its 3 (chunk, norm) units, 2 and 1.
        batch_size=eval_n, out=Path(f"quickstart-{stamp}-evaluation.json"))
    result, path = evaluate(request)
    console.print(summary_table(result))
    console.print(f"evaluation result: {path}")
    done = register_model(model_ref, REGISTERED_NAME, eval_path=path,
                          force=not result.trustworthy)
    console.print(f"registered {done.name} version {done.version}"
                  + ("" if result.trustworthy else " (forced: a guard failed, tagged)"))
    for note in done.alias_notes:
        console.print(f"  {note}")
    print_table(leaderboard_table(leaderboard("linf"), "linf"))  # wide enough for every cell
