"""``raytrain-at``: thin commands that parse, validate and call one function each."""

from __future__ import annotations

import logging
import sys
from pathlib import Path
import warnings

import click
import typer

from raytrain_at.errors import UserError

app = typer.Typer(add_completion=False, no_args_is_help=True,
                  help="Adversarially robust ImageNet classifiers: train, evaluate, register.")
data_app = typer.Typer(add_completion=False, no_args_is_help=True,
                       help="Write and inspect FFCV datasets.")
app.add_typer(data_app, name="data")


@app.command()
def quickstart(
    set_: list[str] = typer.Option(None, "--set", help="override the quickstart recipe"),
) -> None:
    """Adversarial vs clean training on the embedded default (local CPUs, bundled digits)."""
    from raytrain_at.quickstart import run_quickstart

    run_quickstart(list(set_ or []))


@app.command()
def models(resolution: int = typer.Option(224, help="input side for the FLOP count")) -> None:
    """Print every registered model's parameters and FLOPs beside the paper's Table 14."""
    from raytrain_at.quickstart import make_console, model_size_table

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
    import json

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
) -> None:
    """Adversarially train a model with Ray Train + DeepSpeed, tracked in MLflow."""
    from raytrain_at.config import load_config
    from raytrain_at.training.launch import launch, prepare_run, run_single_process

    overrides = list(set_ or [])
    if num_workers is not None:
        overrides.append(f"scaling.num_workers={num_workers}")
    prepared = prepare_run(load_config(recipe, overrides), run_name=run_name,
                           storage_path=storage_path)
    if single_process:
        print(f"run {prepared.run_name}: {run_single_process(prepared)}")
        return
    result = launch(prepared, address=address)
    print(f"run {prepared.run_name}: {result.metrics}")
    if result.checkpoint is not None:
        print(f"latest checkpoint: {result.checkpoint.path}")


@data_app.command("write-ffcv")
def write_ffcv(
    source: str = typer.Argument(..., help="ImageNet-style folder (or its root), a CIFAR or "
                                 "Flowers-102 folder, or 'digits'"),
    out: Path = typer.Argument(..., help="output .beton file"),
    subset: str = typer.Option(None, help="robustbench5k (ImageNet val) or heldout4k (ImageNet "
                               "train)"),
    split: str = typer.Option("train", help="train / val / test, for roots and bundled data"),
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
    from dataclasses import replace

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
    import json

    from raytrain_at.data.inspection import describe_beton

    print(json.dumps(describe_beton(path), indent=2))


def main() -> None:
    """Console entry point: user errors become one line on stderr and exit code 2."""
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    warnings.filterwarnings("ignore", message=".*torch.jit.script.*", category=FutureWarning)
    try:
        app(standalone_mode=False)
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)
    except click.exceptions.Abort:
        print("aborted", file=sys.stderr)
        sys.exit(130)
    except click.ClickException as exc:
        exc.show()
        sys.exit(exc.exit_code)


if __name__ == "__main__":
    main()
