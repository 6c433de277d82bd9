"""What the user sees on the console: quiet by default, everything with ``-v``.

The CLI calls :func:`setup_console` once. Quiet mode keeps Python warnings, MLflow's store
migrations, Ray's and DeepSpeed's INFO chatter off the console; the full worker output still goes
to the run folder's ``console.log`` (see :mod:`raytrain_at.runtime.worker_output`). The choice
travels to Ray workers as an environment variable, because they are separate processes.

Workers that have something for the user (rank 0's progress and epoch lines) print it with
:func:`user_line`; the driver shows exactly those lines of the worker output.
"""

from __future__ import annotations

import logging
import os
import sys
import warnings

from rich.console import Console

VERBOSE_ENV = "RAYTRAIN_AT_VERBOSE"
# Worker lines that start with this are for the user; the driver strips it and prints the rest.
USER_MARK = "[raytrain-at] "

# Warnings that every run would print and the user can do nothing about.
_NOISY_WARNINGS = (
    (".*torch.jit.script.*", FutureWarning),
    (".*all_gather_into_tensor.*", FutureWarning),
    (".*reduce_scatter_tensor.*", FutureWarning),
)
# Loggers whose INFO lines describe the machinery, not the run.
_CHATTY_LOGGERS = ("mlflow", "ray", "ray.train", "ray.tune", "DeepSpeed", "deepspeed",
                   "torch.distributed", "torch.utils.cpp_extension", "filelock", "alembic")


def is_verbose() -> bool:
    """Whether ``-v`` was given (in this process or the driver that started it)."""
    return os.environ.get(VERBOSE_ENV) == "1"


def setup_console(verbose: bool = False) -> None:
    """Configure logging and warnings for a command, and record the choice for Ray workers.

    Args:
        verbose: show INFO logs of every library and every worker line.
    """
    os.environ[VERBOSE_ENV] = "1" if verbose else "0"
    if not sys.stdout.isatty():
        # Ray colours the "(pid=...)" prefix of worker lines unless told otherwise.
        os.environ.setdefault("RAY_COLOR_PREFIX", "0")
    level = logging.INFO if verbose else logging.WARNING
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")
    quiet_libraries(verbose)


def quiet_libraries(verbose: bool | None = None) -> None:
    """Silence the libraries' INFO lines and known warnings (a no-op when verbose).

    Called by the CLI and, through Ray's worker setup hook, in every Ray worker process.
    """
    if verbose if verbose is not None else is_verbose():
        return
    # MLflow logs store migrations at INFO on every new database (MLFLOW_LOGGING_LEVEL wins).
    os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "WARNING")
    for name in _CHATTY_LOGGERS:
        logging.getLogger(name).setLevel(logging.WARNING)
    # Ray warns on every start that token authentication is on: that is the safe default, and
    # the user has nothing to do about it.
    logging.getLogger("ray._private.authentication.authentication_token_setup").setLevel(
        logging.ERROR)
    for message, category in _NOISY_WARNINGS:
        warnings.filterwarnings("ignore", message=message, category=category)


def user_line(text: str, transient: bool = False) -> None:
    """Print a line meant for the user from a Ray worker (the driver shows it as is).

    Args:
        text: one line.
        transient: a progress line, which the next line replaces on a terminal.
    """
    # Written to the stream, not print(): Ray Train patches print() in its workers to log the
    # text as well as print it, which would show the line twice.
    sys.stdout.write(f"{USER_MARK}{'~ ' if transient else ''}{text}\n")
    sys.stdout.flush()


def make_console() -> Console:
    """A rich console: no colour codes and no squeezing to 80 columns when not on a terminal."""
    console = Console()
    if console.is_terminal:
        return console
    return Console(width=150, no_color=True, highlight=False, soft_wrap=True)
