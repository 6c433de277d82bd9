"""``raytrain-at``: thin commands that parse, validate and call one function each."""

from __future__ import annotations

import json
import sys
from dataclasses import replace
from pathlib import Path

import typer

from raytrain_at import __version__
from raytrain_at.bench.commands import bench_app
from raytrain_at.runtime.console import make_console, setup_console
from raytrain_at.errors import RunFailed, UserError
from raytrain_at.preflight.checks import PreflightBlocked
from raytrain_at.evaluation.threats import (NORMS, PAPER_RESOLUTIONS, PAPER_SWEEP_EPS,
                                            THREAT_TITLES, parse_eps, parse_eps_list,
                                            parse_norms)
from raytrain_at.registry.leaderboard_formats import FORMATS, print_table, render

# Only typer, rich and light project modules load at import time: every command imports the
# config (pydantic, yaml) and its heavy packages (torch, timm, Ray, MLflow) in its body, so
# ``--help`` and usage errors answer at once (tests/test_imports.py keeps that rule).
app = typer.Typer(add_completion=False, no_args_is_help=True,
                  context_settings={"help_option_names": ["-h", "--help"]},
                  help="Adversarially robust ImageNet classifiers: train, evaluate, register.")
data_app = typer.Typer(add_completion=False, no_args_is_help=True,
                       help="Write and inspect FFCV datasets.")
app.add_typer(data_app, name="data")
recipes_app = typer.Typer(add_completion=False, invoke_without_command=True,
                          help="List the paper's runs as recipes, or show one resolved.")
app.add_typer(recipes_app, name="recipes")
app.add_typer(bench_app, name="bench")


def _print_version(value: bool) -> None:
    if value:
        print(f"raytrain-at {__version__}")
        raise typer.Exit()


@app.callback()
def _options(
    version: bool = typer.Option(False, "--version", is_eager=True, callback=_print_version,
                                 help="print the version and exit"),
    verbose: bool = typer.Option(False, "--verbose", "-v",
                                 help="show every log line of Ray, DeepSpeed and the workers"),
) -> None:
    """Adversarially robust ImageNet classifiers: train, evaluate, register."""
    setup_console(verbose=verbose)


@recipes_app.callback()
def recipes_list(ctx: typer.Context) -> None:
    """The bundled recipes: model, epochs, attack, batch size and the paper row each reproduces."""
    if ctx.invoked_subcommand is not None:
        return
    from raytrain_at.recipe_table import recipe_table

    make_console().print(recipe_table())


@recipes_app.command("show")
def recipes_show(
    name: str = typer.Argument(..., help="recipe name (see `raytrain-at recipes`) or YAML file"),
    set_: list[str] = typer.Option(None, "--set", help="override, e.g. --set optim.lr=5e-4"),
    full: bool = typer.Option(False, help="one key per line instead of one line per section"),
) -> None:
    """Print a recipe resolved (its base chain and defaults filled in) as YAML, on one screen:
    the recipe's comments, its base chain, one line per config section."""
    if full:
        from raytrain_at.config import load_config, to_yaml

        print(to_yaml(load_config(name, list(set_ or []))), end="")
        return
    from raytrain_at.recipe_table import show_recipe

    print(show_recipe(name, list(set_ or [])), end="")


@app.command()
def quickstart(
    set_: list[str] = typer.Option(None, "--set", help="override the quickstart recipe"),
    eval_n: int = typer.Option(8, help="test digits attacked by the standard AutoAttack"),
) -> None:
    """Adversarial vs clean training on the embedded default (local CPUs, bundled digits), then
    AutoAttack l_inf / l_2 / l_1, registration and the leaderboard."""
    from raytrain_at.quickstart import run_quickstart

    if eval_n < 1:
        raise UserError(f"--eval-n {eval_n} must be at least 1")
    run_quickstart(list(set_ or []), eval_n=eval_n)


@app.command()
def models(resolution: int = typer.Option(224, help="input side for the FLOP count")) -> None:
    """Print every registered model's parameters and FLOPs beside the paper's Table 14."""
    from raytrain_at.quickstart import model_size_table

    if resolution < 32:
        raise UserError(f"--resolution {resolution} is below the minimum 32")
    model_size_table(make_console(), resolution)


@app.command()
def inspect(
    name: str = typer.Argument(..., help="timm model name, e.g. convnext_tiny_cvst"),
    stem: str = typer.Option(None, help="stem spec or design name, e.g. table7:4"),
    weights: str = typer.Option(None, help="clean checkpoint (.safetensors / .pth) or hub:NAME"),
    resolution: int = typer.Option(224, help="input side"),
    num_classes: int = typer.Option(1000, help="classifier outputs"),
) -> None:
    """Build one model (optionally with a stem spec and clean weights) and describe it as JSON."""
    from raytrain_at.models.summary import describe_model

    if num_classes < 1:
        raise UserError(f"--num-classes {num_classes} must be >= 1")
    print(json.dumps(describe_model(name, stem=stem, weights=weights, resolution=resolution,
                                    num_classes=num_classes), indent=2))


@app.command()
def train(
    recipe: str = typer.Argument(..., help="recipe name (e.g. quickstart) or YAML file"),
    set_: list[str] = typer.Option(None, "--set", help="override, e.g. --set optim.lr=5e-4"),
    num_workers: int = typer.Option(None, help="Ray Train workers (scaling.num_workers)"),
    address: str = typer.Option(None, help="Ray cluster address ('auto' on a cluster)"),
    run_name: str = typer.Option(None, help="stable name: re-running it resumes"),
    storage_path: str = typer.Option(None, help="where Ray keeps checkpoints"),
    single_process: bool = typer.Option(False, help="run one worker in this process, no Ray"),
    dry_run: bool = typer.Option(False, help="print the resolved config and the Ray resources "
                                 "the run would ask for, then stop"),
    allow_change: list[str] = typer.Option(None, "--allow-change", help="config keys a resume "
                                           "may change, e.g. --allow-change schedule.epochs "
                                           "(KEY[,KEY]; repeatable)"),
    # On a cluster (--address) by default: there a wrong device, a starved loader or an
    # unwritable storage root costs GPU-hours; on one machine the preflight's own Ray Train
    # start would add minutes to a run of minutes, so there it is asked for.
    preflight: bool = typer.Option(None, "--preflight/--no-preflight", show_default=False,
                                   help="run `raytrain-at preflight` first [default: on with "
                                   "--address, else off]"),
) -> None:
    """Adversarially train a model with Ray Train + DeepSpeed, tracked in MLflow."""
    from raytrain_at.config import load_config

    overrides = list(set_ or [])
    if num_workers is not None:
        overrides.append(f"scaling.num_workers={num_workers}")
    if dry_run:
        from raytrain_at.dry_run import describe_run

        print(describe_run(load_config(recipe, overrides)), end="")
        return
    from raytrain_at.training.launch import launch, prepare_run, run_single_process
    from raytrain_at.training.resume_check import parse_allowed

    prepared = prepare_run(load_config(recipe, overrides), run_name=run_name,
                           storage_path=storage_path, allow_change=parse_allowed(allow_change))
    # After train's own checks: their refusals come first.
    if preflight_wanted(preflight, address=address, single_process=single_process):
        _run_preflight(load_config(recipe, overrides), address, storage_path, None)
    if single_process:
        print(f"run {prepared.run_name}: {run_single_process(prepared)}")
        return
    result = launch(prepared, address=address)
    from raytrain_at.training.launch import run_folder
    from raytrain_at.training.progress import epoch_line

    metrics = dict(result.metrics or {})
    if "epoch" in metrics:
        print(f"run {prepared.run_name} done: "
              f"{epoch_line(metrics, prepared.config.schedule.epochs)}")
    if result.checkpoint is not None:
        path = result.checkpoint.path
        if "://" in prepared.storage_path and "://" not in path:  # Ray drops the scheme
            path = prepared.storage_path.split("://", 1)[0] + "://" + path
        print(f"latest checkpoint: {path}")
    _print_model_reference(prepared)
    print(f"full log: {run_folder(prepared) / 'console.log'}")


def preflight_wanted(flag: bool | None, *, address: str | None, single_process: bool) -> bool:
    """Whether ``train`` runs the preflight: as asked, else on a cluster (``--address``) only;
    never for a single-process run (it has no Ray workers to check)."""
    if single_process:
        return False
    return flag if flag is not None else address is not None


@app.command("preflight")
def preflight_command(
    recipe: str = typer.Argument(..., help="recipe name (e.g. quickstart) or YAML file"),
    set_: list[str] = typer.Option(None, "--set", help="override, e.g. --set optim.lr=5e-4"),
    address: str = typer.Option(None, help="Ray cluster address ('auto' on a cluster)"),
    storage_path: str = typer.Option(None, help="where Ray keeps checkpoints"),
    instance: str = typer.Option(None, help="instance type priced in the estimate "
                                 "[p4d.24xlarge for a GPU run, else local]"),
    loader_margin: float = typer.Option(1.0, min=0.0, help="the loader must deliver this many "
                                        "times the step's img/s (above 1: headroom)"),
) -> None:
    """Check a run on its own Ray workers before it spends money: device, all-reduce, storage,
    MLflow, data, weights, the real step and the loader's rate, wall time and cost."""
    from raytrain_at.config import load_config

    _run_preflight(load_config(recipe, list(set_ or [])), address, storage_path, instance,
                   loader_margin=loader_margin)


def _run_preflight(config, address: str | None, storage_path: str | None,
                   instance: str | None, *, loader_margin: float = 1.0) -> None:
    """The preflight; a blocker is one line on stderr and exit 1."""
    from raytrain_at.preflight.run import PreflightSettings, run_preflight

    settings = PreflightSettings(address=address, storage_path=storage_path, instance=instance,
                                 loader_margin=loader_margin)
    try:
        run_preflight(config, settings, make_console())
    except PreflightBlocked as exc:
        print(f"error: {exc}", file=sys.stderr)
        raise typer.Exit(1) from None


def _print_model_reference(prepared) -> None:
    """The run's selected model by reference, what ``model.init`` of a follow-up run (clean
    pre-training -> adversarial training), ``evaluate`` and ``register`` take."""
    from raytrain_at.tracking.runs import find_run_id

    try:
        run_id = find_run_id(prepared.tracking_uri, prepared.config.tracking.experiment,
                             prepared.run_name)
    except Exception as exc:  # noqa: BLE001 - the training itself succeeded
        print(f"model: (MLflow run not found: {exc})")
        return
    print(f"model: runs:/{run_id}/model")


@app.command()
def tune(
    space: str = typer.Option("quick_stems_cpu", help="tune_spaces/NAME.yaml, or its NAME"),
    recipe: str = typer.Option(None, help="replace the space's base recipe"),
    scheduler: str = typer.Option(None, help="asha or fifo (replaces the space's)"),
    fast: bool = typer.Option(False, help="the space's fast mode: the whole grid with ASHA "
                              "early stopping, the best trial evaluated (a paper-table space "
                              "otherwise runs every row to the end and evaluates all)"),
    num_samples: int = typer.Option(None, help="repeats of the grid (replaces the space's)"),
    address: str = typer.Option(None, help="Ray cluster address ('auto' on a cluster)"),
    max_concurrent: int = typer.Option(None, help="trials at a time [from cluster resources]"),
    name: str = typer.Option(None, help="study name [space-DATE-TIME]"),
    storage_path: str = typer.Option(None, help="Ray Train / Tune storage (folder or s3://)"),
    register_name: str = typer.Option(None, help="registered name of the best [tune-SPACE]"),
    dry_run: bool = typer.Option(False, help="validate the space, print the trials and what "
                                 "each asks Ray for, then stop"),
) -> None:
    """A Ray Tune study over a search space: each trial a short Ray Train run, ASHA, MLflow runs
    under one parent, results table and plot, the best trials evaluated and the best registered."""
    from raytrain_at.tuning.spaces import load_space
    from raytrain_at.tuning.study import StudyOptions, apply_options, run_study

    if scheduler not in (None, "asha", "fifo"):
        raise UserError(f"--scheduler {scheduler!r} must be asha or fifo")
    if max_concurrent is not None and max_concurrent < 1:
        raise UserError(f"--max-concurrent {max_concurrent} must be at least 1")
    options = StudyOptions(
        name=name, recipe=recipe, scheduler=scheduler, fast=fast, num_samples=num_samples,
        address=address,
        max_concurrent=max_concurrent, storage_path=storage_path, register_name=register_name)
    if dry_run:
        from raytrain_at.dry_run import describe_study

        print(describe_study(apply_options(load_space(space), options)), end="")
        return
    outcome = run_study(load_space(space), options)
    print(f"study {outcome.name}: results {outcome.results_csv}, plot {outcome.plot}, "
          f"MLflow parent run {outcome.parent_run_id}")
    if outcome.best is not None:
        print(f"best trial {outcome.best.trial_id} (run {outcome.best.run_id})"
              + (f", registered as {outcome.registered}" if outcome.registered else ""))


@app.command("finetune-benchmark")
def finetune_benchmark(
    ctx: typer.Context,
    spec: str = typer.Argument(..., help="fine-tuning benchmark YAML file, or a bundled one's "
                               "name (robust_finetune)"),
    name: str = typer.Option(None, help="benchmark name [the file's stem]; re-use it to resume"),
    address: str = typer.Option(None, help="Ray cluster address ('auto' on a cluster)"),
    storage_path: str = typer.Option(None, help="Ray Train / Tune storage (folder or s3://)"),
    dry_run: bool = typer.Option(False, help="validate every configuration, list them with their "
                                 "trial counts, then stop"),
) -> None:
    """The robust fine-tuning benchmark: every backbone x dataset x loss x protocol a Ray Tune
    study, its best measured (clean, AutoAttack l_inf / l_2 / l_1, corruptions); resumable."""
    from raytrain_at.finetune_benchmark import run_benchmark

    if ctx.info_name == "benchmark":  # the old name; `bench` is the speed benchmarks
        print("note: `raytrain-at benchmark` is now `raytrain-at finetune-benchmark`",
              file=sys.stderr)
    if dry_run:
        from raytrain_at.dry_run import describe_benchmark

        print(describe_benchmark(spec, name), end="")
        return
    outcome = run_benchmark(spec, name=name, address=address, storage_path=storage_path)
    print(f"fine-tuning benchmark {outcome.name}: {len(outcome.rows)} rows "
          f"({len(outcome.ran)} run now), results {outcome.results_csv}, plot {outcome.plot}")


app.command("benchmark", hidden=True)(finetune_benchmark)  # the old name, kept working


@app.command()
def evaluate(
    model_ref: str = typer.Argument(..., help="model.safetensors, checkpoint folder, "
                                    "runs:/ID/model "
                                    "or models:/NAME@ALIAS"),
    data: str = typer.Option(..., help=".beton file (e.g. robustbench5k.beton) or 'digits'"),
    norms: str = typer.Option(",".join(NORMS), help="comma-separated threat models"),
    eps_linf: str = typer.Option(None, help="l_inf radius in [0,1] pixels [4/255]"),
    eps_l2: str = typer.Option(None, help="l_2 radius [2, scaled with the side from 224]"),
    eps_l1: str = typer.Option(None, help="l_1 radius [75, scaled with the area from 224]"),
    version: str = typer.Option("standard", help="standard (APGD-CE, APGD-T, FAB-T, Square) | "
                                "fast (APGD-CE + APGD-T) | apgdt (APGD-T, 40 iterations, 3 "
                                "targets: the paper's cheaper protocol)"),
    kernels: str = typer.Option("exact", help="exact (torch defaults, as plain pyautoattack) | "
                                "fast (TF32 + channels_last on GPU, breaks checked with exact "
                                "kernels)"),
    n: int = typer.Option(None, help="evaluate the first N images [all]"),
    resolution: int = typer.Option(None, help="test-time side [the training side]"),
    workers: int = typer.Option(1, help="Ray workers, each on its own shard"),
    batch_size: int = typer.Option(250, help="images per chunk and attack batch"),
    seed: int = typer.Option(0, help="AutoAttack seed"),
    out: Path = typer.Option(None, help="result JSON [evaluation-<hash>.json]"),
    state_dir: str = typer.Option(None, help="resume state root, a folder or s3:// URI "
                                  "[$RAYTRAIN_AT_STORAGE/eval-state, else "
                                  "~/.raytrain_at/eval-state]"),
    address: str = typer.Option(None, help="Ray cluster address (auto on a cluster node)"),
    gpu: bool = typer.Option(None, "--gpu/--no-gpu",
                             help="one GPU per worker (corruptions too) [where this machine "
                             "has GPUs; with --address, where the cluster has GPUs up or node "
                             "types with GPUs (the autoscaler starts them); one of the two is "
                             "required with --address when it cannot tell]"),
    eps_sweep: str = typer.Option(None, help="also sweep radii: 'paper' (Table 5: 2,4,6,8/255) "
                                  "or a list like 1/255,2/255"),
    sweep_norm: str = typer.Option("linf", help="norm of the eps sweep"),
    sweep_version: str = typer.Option("apgdt", help="attack version of the sweeps"),
    resolution_sweep: str = typer.Option(None, help="also sweep sides: 'paper' (192..384 by 32) "
                                         "or a list like 224,256,288"),
    corruptions: bool = typer.Option(False, help="also accuracy under ImageNet-C corruptions"),
    corruption_protocol: str = typer.Option("mix", help="mix (one type per image at "
                                            "--severity) | imagenet-c (15 types x 5 severities, "
                                            "mean accuracy as RobustBench's)"),
    severity: int = typer.Option(3, help="corruption severity 1..5 of the mix protocol"),
    robustbench_json: Path = typer.Option(None, help="also write the result in RobustBench's "
                                          "model-info form (Linf / L2 / L1 records)"),
) -> None:
    """AutoAttack a model in l_inf / l_2 / l_1 (sharded, resumable); optional sweeps and
    corruptions; writes a result JSON and prints the summary."""
    from raytrain_at.evaluation.evaluate import evaluate as run_evaluation, evaluation_request
    from raytrain_at.evaluation.result import summary_table

    radii = {norm: parse_eps(text, f"--eps-{norm}")
             for norm, text in (("linf", eps_linf), ("l2", eps_l2), ("l1", eps_l1)) if text}
    request = evaluation_request(
        model_ref=model_ref, data=data, norms=parse_norms(norms), eps=radii, version=version,
        kernels=kernels, n=n, resolution=resolution, workers=workers, batch_size=batch_size,
        seed=seed, out=out, state_root=state_dir, address=address, use_gpu=gpu,
        eps_sweep=(list(PAPER_SWEEP_EPS) if eps_sweep == "paper"
                   else parse_eps_list(eps_sweep, "--eps-sweep") if eps_sweep else None),
        sweep_norm=parse_norms(sweep_norm)[0], sweep_version=sweep_version,
        resolution_sweep=(list(PAPER_RESOLUTIONS) if resolution_sweep == "paper"
                          else _int_list(resolution_sweep, "--resolution-sweep")
                          if resolution_sweep else None),
        corruptions=corruptions, severity=severity, corruption_protocol=corruption_protocol)
    if robustbench_json is not None:
        from raytrain_at.evaluation.robustbench_info import check_writable, write_model_info

        check_writable(robustbench_json)
    result, path = run_evaluation(request)
    console = make_console()
    console.print(summary_table(result))
    console.print(f"result: {path}")
    if robustbench_json is not None:
        console.print(f"RobustBench model info: {write_model_info(result, robustbench_json)}")


def _int_list(text: str, what: str) -> list[int]:
    try:
        values = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise UserError(f"{what} {text!r} is not a comma-separated list of integers") from None
    if not values:
        raise UserError(f"{what} names no value")
    return values


@app.command()
def register(
    model_ref: str = typer.Argument(..., help="model.safetensors, checkpoint folder, "
                                    "runs:/ID/model "
                                    "or models:/NAME@ALIAS"),
    name: str = typer.Option(..., help="registered model name"),
    eval_: Path = typer.Option(None, "--eval", help="result JSON of raytrain-at evaluate"),
    unevaluated: bool = typer.Option(False, help="register without an evaluation (tagged)"),
    force: bool = typer.Option(False, help="register even if the evaluation failed a guard"),
) -> None:
    """Log a model to MLflow and register a new version, with its robust accuracies; champion
    aliases move to it when it beats the holder."""
    from raytrain_at.registry.register import register_model

    done = register_model(model_ref, name, eval_path=eval_, unevaluated=unevaluated, force=force)
    print(f"registered {done.name} version {done.version} (logged model {done.model_id})")
    for note in done.alias_notes:
        print(f"  {note}")


@app.command("import")
def import_(
    source: str = typer.Argument(..., help="robustbench:NAME, e.g. "
                                 "robustbench:Singh2023Revisiting_ConvNeXt-T-ConvStem"),
    checkpoint: Path = typer.Argument(..., help="downloaded checkpoint (.pt/.pth/.safetensors)"),
    out: Path = typer.Option(..., help="model file to write (model.safetensors)"),
) -> None:
    """Import a published checkpoint (RobustBench's Singh2023Revisiting_* entries) as a model
    file that evaluate, register and train (model.init) take like our own."""
    from raytrain_at.models.robustbench import import_robustbench

    print(f"wrote {import_robustbench(source, checkpoint, out)}")


@app.command()
def leaderboard(
    norm: str = typer.Option("linf", help="sort by linf | l2 | l1 robust accuracy"),
    threat: str = typer.Option(None, hidden=True, help="old name of --norm"),
    size: str = typer.Option(None, help="small (<30M) | medium (30-80M) | large (>=80M)"),
    name: str = typer.Option(None, help="only this registered model"),
    format_: str = typer.Option("table", "--format",
                                help="table | markdown | html | csv | json"),
) -> None:
    """The registered models as the paper's Table 2 (with radius, data, n and 95 % intervals),
    best first; markdown and html group them by size as the paper does."""
    from raytrain_at.registry.register import leaderboard as rows_of

    if format_ not in FORMATS:
        raise UserError(f"--format {format_!r}: use one of {', '.join(FORMATS)}")
    norm = threat or norm
    shown = render(rows_of(norm, size, name), format_,
                   f"Registered robust models, sorted by {THREAT_TITLES.get(norm, norm)}")
    if format_ == "table":
        print_table(shown)
    else:
        print(shown)


@data_app.command("write-ffcv")
def write_ffcv(
    source: str = typer.Argument(..., help="ImageNet-style folder (or its root), a CIFAR, "
                                 "Flowers-102, Caltech-101, FGVC-Aircraft, Oxford-IIIT Pet, "
                                 "Stanford Cars or UC Merced folder, or 'digits'"),
    out: Path = typer.Argument(..., help="output .beton file"),
    subset: str = typer.Option(None, help="robustbench5k (ImageNet val) or heldout4k (ImageNet "
                               "train)"),
    split: str = typer.Option("train", help="train / val / trainval / test (as the dataset has "
                              "them), for roots and bundled data"),
    exclude_heldout: bool = typer.Option(False, help="leave the heldout4k images out (train)"),
    max_res: int = typer.Option(None, help="longest side after resizing [default: 500; "
                                "robustbench5k keeps original pixels]"),
    write_mode: str = typer.Option(None, help="raw | jpg | smart | proportion [default: "
                                   "proportion; raw for robustbench5k]"),
    jpeg_quality: int = typer.Option(90, help="JPEG quality 1..100"),
    compress_probability: float = typer.Option(0.5, help="JPEG share in proportion mode"),
    num_workers: int = typer.Option(2, help="writer processes"),
    digits_side: int = typer.Option(32, help="side of the upscaled digits"),
) -> None:
    """Convert a dataset to FFCV format (atomic: a failed write leaves no file)."""
    from raytrain_at.data.write import default_options, write_dataset

    options = default_options(subset)
    options = replace(options, jpeg_quality=jpeg_quality, compress_probability=compress_probability,
                      num_workers=num_workers,
                      max_resolution=options.max_resolution if max_res is None else max_res,
                      write_mode=options.write_mode if write_mode is None else write_mode)
    path = write_dataset(source, out, split=split, subset=subset,
                         exclude_heldout=exclude_heldout, options=options,
                         digits_side=digits_side)
    print(f"wrote {path}")


@data_app.command("info")
def data_info(path: Path = typer.Argument(..., help=".beton file")) -> None:
    """Validate a .beton file and print its size, fields and label counts as JSON."""
    from raytrain_at.data.inspection import describe_beton

    print(json.dumps(describe_beton(path), indent=2))


def main(argv: list[str] | None = None) -> None:
    """Console entry point: user errors become one line on stderr and exit code 2.

    A usage mistake (unknown option, missing argument, bad value) prints the command's usage line
    and one ``error:`` line; a :class:`UserError` from a command prints that line alone.

    Args:
        argv: the arguments (default: the process's); ``tune_stem.py`` passes ``tune ...``.
    """
    try:
        code = app(args=argv, prog_name="raytrain-at", standalone_mode=False)
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)
    except RunFailed as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(1)
    except typer.Abort:
        print("aborted", file=sys.stderr)
        sys.exit(130)
    except typer.TyperException as exc:  # typer's own click: usage errors, bad values (exit 2)
        _show_usage_error(exc)
        sys.exit(getattr(exc, "exit_code", 2))
    if isinstance(code, int) and code:  # typer.Exit(code) and Ctrl-C (130)
        sys.exit(code)


def _show_usage_error(exc: Exception) -> None:
    """The usage line of the command that failed, then one ``error:`` line (no help box)."""
    ctx = getattr(exc, "ctx", None)
    message = (exc.format_message()  # pyright: ignore[reportAttributeAccessIssue]  # click's
               if hasattr(exc, "format_message") else str(exc))
    if not message.strip():  # a group called without a command: typer has printed its help
        return
    if ctx is not None and message.lstrip().startswith("Usage:"):  # the same, as plain text
        print(message.rstrip(), file=sys.stderr)
        return
    if ctx is not None:
        print(ctx.get_usage(), file=sys.stderr)
    print(f"error: {' '.join(message.split())}", file=sys.stderr)


if __name__ == "__main__":
    main()
