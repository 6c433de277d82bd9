"""The loader watchdog: a stuck FFCV pipeline becomes one line instead of a hang.

FFCV decodes in a producer thread (``EpochIterator``) and its consumer waits on the thread's queue
without a timeout, so a file damaged past its header (a sample whose size or pointer went astray)
leaves the consumer waiting forever once that thread dies or sticks; on a cluster that is a run
holding its GPUs for days. Here the wait is bounded: a producer that died is one line at once, one
that delivers no batch within the limit (``data.loader_timeout_s`` for training,
``$RAYTRAIN_AT_LOADER_TIMEOUT_S`` for evaluation) is one line then. The wait reproduces FFCV
1.0.2's ``EpochIterator.__next__`` (its queue, and on CUDA its stream hand-over), which is one
reason FFCV is pinned.
"""

from __future__ import annotations

import os
import queue
import time
from collections.abc import Iterator
from pathlib import Path

from raytrain_at.errors import UserError

# Longest wait for one batch before a loader is declared stuck: generous, as a cold page cache
# on a network disk can take minutes for a first ImageNet batch (tests set seconds).
DEFAULT_LOADER_TIMEOUT_S = 900.0
# Overrides the default where no setting reaches the loader (``evaluate``; training has
# ``data.loader_timeout_s``).
LOADER_TIMEOUT_ENV = "RAYTRAIN_AT_LOADER_TIMEOUT_S"


def default_loader_timeout() -> float:
    """``$RAYTRAIN_AT_LOADER_TIMEOUT_S``, else :data:`DEFAULT_LOADER_TIMEOUT_S`.

    Raises:
        UserError: the variable is not a positive number.
    """
    text = os.environ.get(LOADER_TIMEOUT_ENV)
    if not text:
        return DEFAULT_LOADER_TIMEOUT_S
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not (value > 0 and value < float("inf")):
        raise UserError(f"{LOADER_TIMEOUT_ENV}={text!r} is not a positive number of seconds")
    return value


def _next_within(epoch, timeout_s: float, path: Path):
    """The producer's next queue entry, waited for at most ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            return epoch.output_queue.get(timeout=max(0.01, min(1.0, deadline - time.monotonic())))
        except queue.Empty:
            pass
        if not epoch.is_alive() and epoch.output_queue.empty():
            epoch.close()
            raise UserError(f"dataset file {str(path)!r}: FFCV's reader stopped before the end "
                            "of the epoch (the file is damaged past its header; compare it "
                            "with its .beton.json or write it again)")
        if time.monotonic() >= deadline:
            epoch.close()
            raise UserError(f"dataset file {str(path)!r}: no batch within {timeout_s:g} s "
                            "(data.loader_timeout_s): FFCV's reader is stuck, the file may be "
                            "damaged past its header")


def watched_batches(epoch, timeout_s: float, path: Path) -> Iterator:
    """The batches of one FFCV epoch iterator, each awaited at most ``timeout_s`` seconds.

    Raises:
        UserError: naming ``path`` when the producer thread died or delivered nothing in time.
    """
    from ffcv.loader.epoch_iterator import IS_CUDA

    while True:
        entry = _next_within(epoch, timeout_s, path)
        if entry is None:  # FFCV's end-of-epoch mark
            epoch.close()
            return
        slot, batch = entry
        if IS_CUDA:  # as EpochIterator.__next__: wait for that slot's copies to finish
            epoch.current_stream.wait_stream(epoch.cuda_streams[slot])
        yield batch
