"""Run ``raytrain-at ARGS`` as a new process without paying for its imports each time.

Most CLI tests start the console script to see what a user sees: the exit code, stdout and
stderr. A fresh interpreter spends 6-20 s on 2 cores importing torch, timm, Ray, MLflow,
DeepSpeed and FFCV before the command does anything, and the suite starts dozens of them. Here a
multiprocessing fork server imports those once; every call forks a child from it, which sets
the call's environment and working folder, points its file descriptors 1 and 2 at files and
runs :func:`raytrain_at.cli.main` as the console script does. Each command still runs in a
process of its own (nothing leaks between calls or into the test process), and the server itself
never runs a torch operation, so no thread pool exists when it forks.

What differs from the real console script: import-time output is printed once, by the server
(DeepSpeed's "Setting accelerator to CPU" warning), not by each command; tests that check import
cost or the installed script itself (``tests/test_cli_usage.py::test_help_is_fast``,
``tests/test_packaging.py``, the quickstart) still start ``raytrain-at`` for real.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import subprocess
import sys
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path

# Imported once by the fork server (the slow ones, and the commands' own modules).
PRELOAD = ["torch", "numpy", "timm", "ray", "ray.train", "ray.tune", "mlflow", "deepspeed",
           "ffcv", "kornia", "raytrain_at.cli", "raytrain_at.training.launch",
           "raytrain_at.evaluation.evaluate", "raytrain_at.tuning.study",
           "raytrain_at.registry.mlflow_registry"]

_CONTEXT = mp.get_context("forkserver")
_CONTEXT.set_forkserver_preload(PRELOAD)


def _child(args: list[str], env: dict[str, str], cwd: str | None, out: str, err: str) -> None:
    # Whatever the server had buffered belongs to the server, not to this command.
    sys.stdout.flush()
    sys.stderr.flush()
    for fd, path in ((1, out), (2, err)):
        handle = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        os.dup2(handle, fd)
        os.close(handle)
    os.environ.clear()
    os.environ.update(env)
    if cwd is not None:
        os.chdir(cwd)
    from raytrain_at.cli import main

    main(args)  # its sys.exit(code) becomes this process's exit code


def run_cli(args: Sequence[str], *, env: Mapping[str, str] | None = None,
            cwd: str | Path | None = None,
            timeout: float = 180) -> subprocess.CompletedProcess[str]:
    """``raytrain-at *args`` in a forked process; the result reads like ``subprocess.run``'s.

    Args:
        args: the arguments after ``raytrain-at``.
        env: the whole environment of the command (default: this process's).
        cwd: its working folder (default: this process's).
        timeout: seconds before the command is killed and :class:`subprocess.TimeoutExpired`
            raised, as ``subprocess.run`` does.
    """
    with tempfile.TemporaryDirectory(prefix="raytrain-at-cli-") as folder:
        out, err = os.path.join(folder, "stdout"), os.path.join(folder, "stderr")
        process = _CONTEXT.Process(
            target=_child, args=(list(args), dict(os.environ if env is None else env),
                                 None if cwd is None else str(cwd), out, err))
        process.start()
        process.join(timeout)
        if process.is_alive():
            process.kill()
            process.join()
            raise subprocess.TimeoutExpired(["raytrain-at", *args], timeout)
        # A child that died before taking its descriptors wrote nothing of its own.
        stdout, stderr = (Path(path).read_text() if os.path.exists(path) else ""
                          for path in (out, err))
    return subprocess.CompletedProcess(["raytrain-at", *args], process.exitcode or 0,
                                       stdout, stderr)
