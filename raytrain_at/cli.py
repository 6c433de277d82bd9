"""``raytrain-at``: thin commands that parse, validate and call one function each."""

from __future__ import annotations

import logging
import sys
import warnings

import click
import typer

from raytrain_at.errors import UserError

app = typer.Typer(add_completion=False, no_args_is_help=True,
                  help="Adversarially robust ImageNet classifiers: train, evaluate, register.")


@app.command()
def quickstart() -> None:
    """Run the main job on the embedded default (CPU, bundled data)."""
    from raytrain_at.quickstart import run_quickstart

    run_quickstart()


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
