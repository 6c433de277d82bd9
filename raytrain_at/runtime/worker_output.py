"""Driver-side handling of Ray worker output: everything to a log file, the user's lines on screen.

Ray forwards every line its workers print (Ray Train's per-rank reports and checkpoint notes,
DeepSpeed's set-up, deprecation warnings, each with a ``(pid=...)`` prefix) to the driver's
console. Ray has no public filter for that stream, so in quiet mode this module replaces Ray's
printing handler on the driver's stream dispatcher with one that

* appends every line, with its process prefix, to the current run's ``console.log``, and
* prints only the lines a worker marked for the user
  (:func:`raytrain_at.runtime.console.user_line`): rank 0's progress and epoch lines. On a
  terminal, progress lines overwrite each other.

With ``-v`` Ray's own handler stays and this one only writes the file. If Ray's internals
change (the dispatcher is private), nothing is filtered and a warning says so.
"""

from __future__ import annotations

import logging
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any

from raytrain_at.runtime.console import USER_MARK, is_verbose

log = logging.getLogger(__name__)

# Lines of a progress bar: shown in place on a terminal (see console.user_line).
TRANSIENT_MARK = "~ "
_RAY_HANDLER = "ray_print_logs"
_OUR_HANDLER = "raytrain_at_logs"


class WorkerOutput:
    """The handler Ray's dispatcher calls with each batch of worker lines."""

    def __init__(self, show_user_lines: bool, stream: IO[str] | None = None) -> None:
        self.show_user_lines = show_user_lines
        self.stream = stream
        self._file: IO[str] | None = None
        self._lock = threading.Lock()
        self._pending = False  # a transient line is on screen, without its newline

    def __call__(self, batch: dict[str, Any]) -> None:
        if batch.get("pid") == "autoscaler":
            return  # its status table every 5 s (shown by Ray's own handler with -v)
        who = batch.get("actor_name") or batch.get("task_name") or ""
        prefix = f"({who + ' ' if who else ''}pid={batch.get('pid')}) "
        with self._lock:
            lines = [str(line) for line in batch.get("lines") or []]
            if self._file is not None:
                self._file.writelines(prefix + line + "\n" for line in lines)
                self._file.flush()
            if self.show_user_lines:
                for line in lines:
                    if USER_MARK in line:
                        self._show(line.split(USER_MARK, 1)[1])

    def _show(self, text: str) -> None:
        stream = self.stream or sys.stdout
        transient = text.startswith(TRANSIENT_MARK)
        text = text.removeprefix(TRANSIENT_MARK)
        if stream.isatty():
            clear = "\r\x1b[K" if self._pending else ""
            stream.write(f"{clear}{text}" if transient else f"{clear}{text}\n")
            self._pending = transient
        else:
            stream.write(text + "\n")
        stream.flush()

    def end_transient(self) -> None:
        """Finish an in-place progress line, so the next output starts on a fresh line."""
        with self._lock:
            if self._pending:
                (self.stream or sys.stdout).write("\n")
                self._pending = False

    def open(self, path: Path) -> None:
        with self._lock:
            self.close_file()
            path.parent.mkdir(parents=True, exist_ok=True)
            self._file = open(path, "a", encoding="utf-8")  # noqa: SIM115 - closed in close_file

    def close_file(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


_output: WorkerOutput | None = None


def install() -> None:
    """Route worker output through :class:`WorkerOutput` (after each ``ray.init``: a new Ray
    instance in the same process registers Ray's printing handler again)."""
    global _output
    try:
        from ray._private.ray_logging import global_worker_stdstream_dispatcher as dispatcher
    except ImportError:  # pragma: no cover - Ray moved its internals
        log.warning("cannot filter Ray worker output with this Ray version: showing all of it")
        return
    verbose = is_verbose()
    if _output is None:
        _output = WorkerOutput(show_user_lines=not verbose)
    _output.show_user_lines = not verbose
    dispatcher.remove_handler(_OUR_HANDLER)
    if not verbose:
        dispatcher.remove_handler(_RAY_HANDLER)
    dispatcher.add_handler(_OUR_HANDLER, _output)


@contextmanager
def worker_log_file(path: Path) -> Iterator[Path]:
    """Append all worker output to ``path`` while the block runs (one run's ``console.log``)."""
    if _output is not None:
        _output.open(path)
    try:
        yield path
    finally:
        if _output is not None:
            _output.end_transient()
            _output.close_file()


def finish_progress() -> None:
    """End an in-place progress line before the driver prints its own output."""
    if _output is not None:
        _output.end_transient()
