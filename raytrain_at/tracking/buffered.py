"""Rank 0's MLflow run behind a buffer: training never waits on, or dies of, the tracking server.

Every param, tag and metric is first appended to a small JSON-lines journal (one record a line)
and handed to a background sender that delivers the records to MLflow in order. When the server
is slow or down, the records stay in the journal and the sender tries again with a growing
pause (1 s to 15 s); training goes on meanwhile. The journal holds only what is not delivered
yet: it lives in the run folder beside Ray's checkpoints, and a copy goes into every checkpoint
(:meth:`BufferedRun.snapshot_into`), so a restarted worker - on this node or another - finds the
records the crashed one could not send and replays them.

Delivery is exactly once per record: a metric record is ``(key, step, timestamp)``, the time it
was journaled. Before the sender first sends a key (in this process, or again after a failed send
whose answer was lost), it reads that key's history from the run, and it never sends a point the
run already holds. An epoch trained again after a resume from an earlier checkpoint is a new
record (same step, later time) and is logged as such. Params already logged are not sent again
(MLflow refuses changed values); tags are idempotent.

MLflow's HTTP client retries for minutes by default; :func:`use_short_client_timeouts` makes a dead
server cost seconds in this process (set before the first request, overridable by the user).
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from collections.abc import Callable, Iterable, MutableMapping
from pathlib import Path
from typing import Any

from mlflow.entities import Metric, Param, RunStatus, RunTag
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from raytrain_at.tracking.creator import MLFLOW_USER, run_creator
from raytrain_at.tracking.experiments import ensure_experiment
from raytrain_at.tracking.redact import scrubbed, without_userinfo
from raytrain_at.tracking.runs import RUN_NAME_TAG, param_text

log = logging.getLogger(__name__)

JOURNAL_FILE = "tracking-journal.jsonl"
# How long the end of a run waits for the server to take what is buffered.
FINAL_FLUSH_S = 120.0
# How long a failing run waits before it gives up marking the MLflow run FAILED.
FAILED_FLUSH_S = 10.0
# MLflow's own defaults: 7 retries with backoff factor 2 and a 120 s timeout (minutes per call).
SHORT_CLIENT_ENV = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "1",
                    "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
                    "MLFLOW_HTTP_REQUEST_BACKOFF_JITTER": "0",
                    "MLFLOW_HTTP_REQUEST_TIMEOUT": "20"}
# MLflow's log_batch limits.
_MAX_METRICS = 1000
_MAX_PARAMS_OR_TAGS = 100


def use_short_client_timeouts(environ: MutableMapping[str, str] = os.environ) -> None:
    """Make MLflow's HTTP client give up within seconds in this process (values the user set
    are kept)."""
    for name, value in SHORT_CLIENT_ENV.items():
        environ.setdefault(name, value)


def read_journal(path: Path) -> list[dict[str, Any]]:
    """The records of a journal file, in order ([] when there is none). A line that does not
    parse (the last one, torn by a crash) is skipped with a warning."""
    if not path.is_file():
        return []
    records = []
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except ValueError:
            log.warning("%s line %d is not a record (torn by a crash?): skipped", path, number)
            continue
        if isinstance(record, dict) and record.get("kind") in ("metric", "param", "tag"):
            records.append(record)
    return records


def _identity(record: dict[str, Any]) -> tuple:
    return (record["kind"], record["key"], record.get("step"), json.dumps(record.get("value")))


def _merged(*sources: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
    """The records of ``sources`` in order, each distinct record once (a checkpoint's copy and
    the run folder's journal overlap)."""
    seen: set[tuple] = set()
    out = []
    for source in sources:
        for record in source:
            if _identity(record) not in seen:
                seen.add(_identity(record))
                out.append({k: v for k, v in record.items() if k != "seq"})
    return out


def _write_lines(path: Path, records: list[dict[str, Any]]) -> None:
    """Replace ``path`` with ``records`` (through a synced temporary file), or remove it when
    there are none."""
    if not records:
        path.unlink(missing_ok=True)
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".partial")
    with partial.open("w") as handle:
        handle.writelines(json.dumps(r) + "\n" for r in records)
        handle.flush()
        os.fsync(handle.fileno())
    partial.replace(path)


def _is_refusal(exc: Exception) -> bool:
    """The server answered and refused the records (a 4xx other than timeout or throttling):
    sending them again cannot help."""
    if not isinstance(exc, MlflowException):
        return False
    status = exc.get_http_status_code()
    return 400 <= status < 500 and status not in (408, 429)


def _first_line(exc: Exception) -> str:
    return scrubbed((str(exc).strip().splitlines() or [type(exc).__name__])[0])[:200]


class BufferedRun:
    """The MLflow run of one training run, written through a journal and a background sender.

    The ``log_*``/``set_tags`` methods never touch the network and never raise for the server's
    sake; :meth:`flush` and :meth:`finish` wait a bounded time. Artifacts (:meth:`log_file`,
    :meth:`log_text`, :meth:`log_table`) go straight to the server once the run exists.

    Args:
        tracking_uri: the MLflow tracking URI.
        experiment: the experiment name (created if missing).
        run_name: the training run's name (its ``raytrain_at.run_name`` tag finds it again).
        journal: the journal file (its undelivered records are replayed first).
        restored: records from a restored checkpoint's journal copy, replayed first.
        say: gets the one-line messages for the user (outage, recovery, undelivered records).
        client: the MLflow client (default: one for ``tracking_uri``).
        retry_s: the first and the longest pause between delivery attempts.
    """

    def __init__(self, tracking_uri: str, experiment: str, run_name: str, journal: Path, *,
                 restored: Iterable[dict[str, Any]] = (),
                 say: Callable[[str], None] = log.warning,
                 client: MlflowClient | None = None,
                 retry_s: tuple[float, float] = (1.0, 15.0)) -> None:
        self.client = client or MlflowClient(tracking_uri=tracking_uri)
        self.where = without_userinfo(tracking_uri)
        self.experiment = experiment
        self.run_name = run_name
        self.creator = run_creator()  # the ``mlflow.user`` a ``run:`` reference checks
        self.journal = Path(journal)
        self.run_id: str | None = None
        self._say = say
        self._retry_s = retry_s
        self._cond = threading.Condition()
        self._pending = _merged(restored, read_journal(self.journal))
        self._seq = 0
        for record in self._pending:
            self._number(record)
        _write_lines(self.journal, self._pending)
        # (key, step, timestamp in ms) of the points the run holds: a record's identity, so a
        # replayed record is sent once while an epoch trained again after a resume from an
        # earlier checkpoint (same step, a later time) is logged as the new point it is.
        self._known: set[tuple[str, int, int]] = set()
        self._seeded: set[str] = set()  # keys whose history was read since the last doubt
        self._outage_since: float | None = None
        self._stopping = False
        self._hurry = False
        self._sender = threading.Thread(target=self._send_loop, name="mlflow-sender",
                                        daemon=True)
        self._sender.start()

    # ------------------------------------------------------------------ recording
    def _number(self, record: dict[str, Any]) -> dict[str, Any]:
        self._seq += 1
        record["seq"] = self._seq
        return record

    def _append(self, records: list[dict[str, Any]]) -> None:
        if not records:
            return
        with self._cond:
            for record in records:
                self._pending.append(self._number(record))
            self.journal.parent.mkdir(parents=True, exist_ok=True)
            with self.journal.open("a") as handle:
                handle.writelines(json.dumps(r) + "\n" for r in records)
            self._cond.notify_all()

    def log_params(self, params: dict[str, Any]) -> None:
        """Buffer params (those the run already holds are not sent again)."""
        self._append([{"kind": "param", "key": k, "value": param_text(v)}
                      for k, v in params.items()])

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        """Buffer the numeric values of ``metrics`` at ``step``."""
        now = int(time.time() * 1000)
        self._append([{"kind": "metric", "key": k, "value": float(v), "step": int(step),
                       "ts": now} for k, v in metrics.items()
                      if isinstance(v, (int, float)) and not isinstance(v, bool)])

    def set_tags(self, tags: dict[str, Any]) -> None:
        """Buffer tags."""
        self._append([{"kind": "tag", "key": k, "value": str(v)} for k, v in tags.items()])

    @property
    def pending(self) -> int:
        """How many records are not delivered yet."""
        with self._cond:
            return len(self._pending)

    def snapshot_into(self, directory: Path) -> Path:
        """Write the undelivered records into ``directory`` (a checkpoint being written)."""
        with self._cond:
            records = list(self._pending)
        target = Path(directory) / JOURNAL_FILE
        target.write_text("".join(json.dumps(r) + "\n" for r in records))
        return target

    # ------------------------------------------------------------------ waiting
    def flush(self, timeout_s: float) -> bool:
        """Wait up to ``timeout_s`` for every buffered record to reach the server (retrying at
        once rather than after the sender's pause).

        Returns:
            True when nothing is left to deliver and the run exists on the server.
        """
        deadline = time.monotonic() + timeout_s
        with self._cond:
            self._hurry = True
            self._cond.notify_all()
            try:
                while self._pending or self.run_id is None:
                    left = deadline - time.monotonic()
                    if left <= 0 or not self._sender.is_alive():
                        return False
                    self._cond.wait(min(left, 0.5))
                return True
            finally:
                self._hurry = False

    def finish(self, status: str = "FINISHED", timeout_s: float = FINAL_FLUSH_S) -> bool:
        """Deliver what is buffered (waiting up to ``timeout_s``), then end the run with
        ``status``; never raises for the server's sake.

        Returns:
            False, after one line to the user, when the server did not take everything: the
            records stay in the journal (and the last checkpoint) for the next resume.
        """
        delivered = self.flush(timeout_s)
        if delivered:
            try:
                self.client.set_terminated(str(self.run_id), status=status)
            except Exception as exc:  # noqa: BLE001 - the training itself is done
                self._say(f"MLflow at {self.where} did not take the run's end ({status}): "
                          f"{_first_line(exc)}")
                delivered = False
        else:
            self._say(f"MLflow at {self.where} did not answer within {timeout_s:.0f} s: "
                      f"{self.pending} tracking records (and the run's end, {status}) kept in "
                      f"{self.journal} and the last checkpoint; running the same command "
                      "again resumes this run and sends them")
        self.close()
        return delivered

    def close(self, timeout_s: float = 5.0) -> None:
        """Stop the sender (what is not delivered stays in the journal)."""
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        self._sender.join(timeout_s)

    # ------------------------------------------------------------------ artifacts
    def log_file(self, path: str | Path, artifact_path: str | None = None) -> None:
        self.client.log_artifact(self._run(), str(path), artifact_path)

    def log_text(self, text: str, name: str) -> None:
        self.client.log_text(self._run(), text, name)

    def log_table(self, columns: dict[str, list[Any]], name: str) -> None:
        self.client.log_table(self._run(), data=columns, artifact_file=name)

    def _run(self) -> str:
        if self.run_id is None:
            raise RuntimeError(f"the MLflow run of {self.run_name} does not exist yet "
                               "(flush first)")
        return self.run_id

    # ------------------------------------------------------------------ the sender
    def _send_loop(self) -> None:
        pause = self._retry_s[0]
        while True:
            with self._cond:
                while not self._stopping and not self._pending and self.run_id is not None:
                    self._cond.wait()
                if self._stopping:
                    return
                batch = self._next_batch()
            try:
                self._deliver(batch)
            except Exception as exc:  # noqa: BLE001 - any failure keeps the records
                if _is_refusal(exc):
                    kind = batch[0]["kind"] if batch else "run"
                    self._say(f"MLflow at {self.where} refused {len(batch)} {kind} records "
                              f"({_first_line(exc)}): dropped")
                    if not batch:  # the run itself cannot be created: nothing will be
                        return
                    self._done(batch)
                    continue
                self._doubt(batch, exc)
                with self._cond:
                    if not self._hurry and not self._stopping:
                        self._cond.wait(pause)
                pause = min(pause * 2, self._retry_s[1])
                continue
            self._done(batch)
            if self._outage_since is not None:
                self._say(f"MLflow at {self.where} answers again after "
                          f"{time.monotonic() - self._outage_since:.0f} s: delivering the "
                          "buffered records")
                self._outage_since = None
            pause = self._retry_s[0]

    def _next_batch(self) -> list[dict[str, Any]]:
        """The oldest records of one kind, as many as one ``log_batch`` takes."""
        if not self._pending:
            return []
        kind = self._pending[0]["kind"]
        limit = _MAX_METRICS if kind == "metric" else _MAX_PARAMS_OR_TAGS
        batch = []
        for record in self._pending:
            if record["kind"] != kind or len(batch) == limit:
                break
            batch.append(record)
        return batch

    def _done(self, batch: list[dict[str, Any]]) -> None:
        with self._cond:
            delivered = {id(r) for r in batch}
            self._pending = [r for r in self._pending if id(r) not in delivered]
            _write_lines(self.journal, self._pending)
            self._cond.notify_all()

    def _doubt(self, batch: list[dict[str, Any]], exc: Exception) -> None:
        """A failed send may still have reached the server: read those keys' history again
        before sending them."""
        self._seeded -= {r["key"] for r in batch if r["kind"] == "metric"}
        if self._outage_since is None:
            self._outage_since = time.monotonic()
            self._say(f"MLflow at {self.where} does not answer ({_first_line(exc)}): "
                      f"tracking records are kept in {self.journal} and sent when it answers; "
                      "training goes on")

    def _ensure_run(self) -> str:
        """The run's id: the run of this name if there is one (a resume, or a create whose
        answer was lost), else a new run."""
        if self.run_id is not None:
            return self.run_id
        experiment_id = ensure_experiment(self.client, self.experiment)
        existing = self.client.search_runs(
            [experiment_id], filter_string=f"tags.`{RUN_NAME_TAG}` = '{self.run_name}'",
            max_results=1)
        if existing:
            run_id = existing[0].info.run_id
            self.client.update_run(run_id, status=RunStatus.to_string(RunStatus.RUNNING))
        else:
            run_id = self.client.create_run(
                experiment_id, run_name=self.run_name,
                tags={RUN_NAME_TAG: self.run_name, MLFLOW_USER: self.creator}).info.run_id
        with self._cond:
            self.run_id = run_id
            self._cond.notify_all()
        return run_id

    def _deliver(self, batch: list[dict[str, Any]]) -> None:
        run_id = self._ensure_run()
        if not batch:
            return
        kind = batch[0]["kind"]
        if kind == "metric":
            for key in sorted({r["key"] for r in batch} - self._seeded):
                self._known |= {(key, m.step, m.timestamp)
                                for m in self.client.get_metric_history(run_id, key)}
                self._seeded.add(key)
            fresh: dict[tuple[str, int, int], Metric] = {}
            for r in batch:
                point = (r["key"], int(r["step"]), int(r["ts"]))
                if point not in self._known and point not in fresh:
                    fresh[point] = Metric(r["key"], float(r["value"]), point[2], point[1])
            if fresh:
                self.client.log_batch(run_id, metrics=list(fresh.values()))
            self._known |= set(fresh)
        elif kind == "param":
            logged = self.client.get_run(run_id).data.params
            params = {r["key"]: r["value"] for r in reversed(batch) if r["key"] not in logged}
            if params:
                self.client.log_batch(run_id, params=[Param(k, v) for k, v in params.items()])
        else:
            tags = {r["key"]: r["value"] for r in batch}  # the latest value of a key wins
            self.client.log_batch(run_id, tags=[RunTag(k, v) for k, v in tags.items()])
