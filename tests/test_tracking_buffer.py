"""The buffered MLflow run (raytrain_at.tracking.buffered): records reach a real MLflow store in
order and exactly once per record, survive an outage and a restart through the journal file,
and a dead server costs a bounded wait, never an exception in the training."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from raytrain_at.config import load_config
from raytrain_at.runtime.ports import free_local_port
from raytrain_at.tracking.buffered import (JOURNAL_FILE, SHORT_CLIENT_ENV, BufferedRun,
                                           read_journal, use_short_client_timeouts)
from raytrain_at.tracking.redact import redacted_config_dump, scrubbed, without_userinfo
from raytrain_at.tracking.runs import find_run_id
from raytrain_at.training.launch import _mark_failed, run_params

FAST_RETRY = (0.05, 0.2)


class Outage(MlflowClient):
    """A real client of a real store that fails while ``down``; with ``lose_answers`` a
    ``log_batch`` reaches the store and its answer is lost (the worst case for exactly-once)."""

    def __init__(self, uri: str) -> None:
        super().__init__(tracking_uri=uri)
        self.down = False
        self.lose_answers = False
        self.calls = 0

    def _gate(self) -> None:
        self.calls += 1
        if self.down:
            raise MlflowException("API request failed: connection refused (outage)")

    def search_runs(self, *args, **kwargs):
        self._gate()
        return super().search_runs(*args, **kwargs)

    def get_metric_history(self, *args, **kwargs):
        self._gate()
        return super().get_metric_history(*args, **kwargs)

    def log_batch(self, *args, **kwargs):
        self._gate()
        result = super().log_batch(*args, **kwargs)
        if self.lose_answers:
            raise MlflowException("API request failed: read timed out (answer lost)")
        return result


def _history(uri: str, run_id: str, key: str) -> list[tuple[int, float]]:
    return [(m.step, m.value) for m in MlflowClient(uri).get_metric_history(run_id, key)]


def _run(uri: str, name: str):
    client = MlflowClient(uri)
    return client.get_run(find_run_id(uri, "buffered", name))


def test_records_reach_mlflow_in_order_and_the_journal_empties(store, tmp_path) -> None:
    journal = tmp_path / "run" / JOURNAL_FILE
    run = BufferedRun(store, "buffered", "in-order", journal, retry_s=FAST_RETRY)
    run.log_params({"optim.lr": 0.1, "aug.names": ["flip", "crop"]})
    for step in (1, 2, 3):
        run.log_metrics({"train_loss": 1.0 / step, "epoch": step, "flag": True}, step=step)
    run.set_tags({"stage": "a"})
    run.set_tags({"stage": "b"})
    assert run.flush(30) and run.pending == 0
    assert run.finish()
    got = _run(store, "in-order")
    assert got.info.status == "FINISHED"
    assert got.data.params == {"optim.lr": "0.1", "aug.names": '["flip", "crop"]'}
    assert got.data.tags["stage"] == "b"
    assert _history(store, got.info.run_id, "train_loss") == [(1, 1.0), (2, 0.5), (3, 1 / 3)]
    assert "flag" not in got.data.metrics  # booleans are not metrics
    assert not journal.exists()  # nothing left to deliver


def test_a_buffered_run_names_its_creator_so_run_references_find_it(store, tmp_path,
                                                                    monkeypatch) -> None:
    """Training writes through the buffer: its run carries ``mlflow.user`` (the authenticated
    user on the cluster), which a ``run:`` reference requires, and resolves once FINISHED."""
    from raytrain_at.model_refs import find_model_run_id

    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", "trainer")
    run = BufferedRun(store, "buffered", "by-trainer", tmp_path / JOURNAL_FILE,
                      retry_s=FAST_RETRY)
    run.log_metrics({"train_loss": 1.0}, step=1)
    assert run.flush(30)
    got = _run(store, "by-trainer")
    assert got.data.tags["mlflow.user"] == "trainer"
    with pytest.raises(LookupError, match="RUNNING by trainer"):
        find_model_run_id(store, "buffered", "by-trainer")
    assert run.finish()
    assert find_model_run_id(store, "buffered", "by-trainer") == got.info.run_id


def test_an_outage_keeps_records_and_replays_each_step_exactly_once(store, tmp_path) -> None:
    client = Outage(store)
    journal = tmp_path / JOURNAL_FILE
    said: list[str] = []
    run = BufferedRun(store, "buffered", "outage", journal, client=client, say=said.append,
                      retry_s=FAST_RETRY)
    run.log_metrics({"train_loss": 0.9}, step=1)
    assert run.flush(30)
    client.down = True
    started = time.monotonic()
    for step in (2, 3, 4):
        run.log_metrics({"train_loss": 1.0 - step / 10, "step_lr": 0.01 * step}, step=step)
    assert time.monotonic() - started < 0.5  # logging never waits on the server
    assert not run.flush(1.0)
    assert [(r["key"], r["step"]) for r in read_journal(journal)] == [
        ("train_loss", 2), ("step_lr", 2), ("train_loss", 3), ("step_lr", 3),
        ("train_loss", 4), ("step_lr", 4)]
    # The server comes back, but the first batch's answer is lost after the store took it.
    client.down = False
    client.lose_answers = True
    time.sleep(0.5)
    client.lose_answers = False
    assert run.flush(30)
    assert run.finish()
    run_id = _run(store, "outage").info.run_id
    assert _history(store, run_id, "train_loss") == [(1, 0.9), (2, 0.8), (3, 0.7), (4, 0.6)]
    assert [s for s, _ in _history(store, run_id, "step_lr")] == [2, 3, 4]
    assert any("does not answer" in line and str(journal) in line for line in said), said
    assert any("answers again" in line for line in said), said


def test_a_restart_replays_the_journal_and_the_checkpoint_copy_once(store, tmp_path,
                                                                     monkeypatch) -> None:
    for name in SHORT_CLIENT_ENV:
        monkeypatch.delenv(name, raising=False)
    use_short_client_timeouts()
    dead = f"http://127.0.0.1:{free_local_port()}"  # nothing listens there
    # A first attempt delivered epoch 1, then lost its server and died with epochs 2-3 buffered;
    # its epoch-2 checkpoint carries a copy of what was undelivered then.
    first = BufferedRun(store, "buffered", "restart", tmp_path / "earlier" / JOURNAL_FILE,
                        retry_s=FAST_RETRY)
    first.log_params({"optim.lr": 0.1})
    first.log_metrics({"train_loss": 0.9}, step=1)
    assert first.flush(30)
    first.close()
    journal = tmp_path / JOURNAL_FILE
    crashed = BufferedRun(dead, "buffered", "restart", journal, retry_s=FAST_RETRY)
    crashed.log_metrics({"train_loss": 0.8}, step=2)
    checkpoint = tmp_path / "checkpoint_2"
    checkpoint.mkdir()
    copy = crashed.snapshot_into(checkpoint)
    crashed.log_metrics({"train_loss": 0.7}, step=3)
    crashed.close()
    assert [r["step"] for r in read_journal(journal)] == [2, 3]
    assert [r["step"] for r in read_journal(copy)] == [2]
    # The restarted worker: the checkpoint's copy first, then the journal, then epoch 3 again
    # (re-run after the restore, with another value) and the params again.
    restarted = BufferedRun(store, "buffered", "restart", journal,
                            restored=read_journal(copy), retry_s=FAST_RETRY)
    restarted.log_params({"optim.lr": 0.1})
    restarted.log_metrics({"train_loss": 0.75}, step=3)
    assert restarted.finish(timeout_s=30)
    got = _run(store, "restart")
    assert got.info.status == "FINISHED" and got.data.params == {"optim.lr": "0.1"}
    # Epoch 2 (in the copy and the journal) once; epoch 3's first value, replayed from the
    # journal, once; epoch 3 trained again is a new point at the same step.
    assert _history(store, got.info.run_id, "train_loss") == [(1, 0.9), (2, 0.8), (3, 0.7),
                                                               (3, 0.75)]
    assert not journal.exists()


def test_a_torn_journal_line_is_skipped(tmp_path) -> None:
    journal = tmp_path / JOURNAL_FILE
    good = {"kind": "metric", "key": "train_loss", "value": 0.5, "step": 1, "ts": 1}
    journal.write_text(json.dumps(good) + "\n" + '{"kind": "metric", "key": "tr')
    assert read_journal(journal) == [good]


def test_a_dead_server_costs_a_bounded_wait_and_one_line(tmp_path, monkeypatch) -> None:
    for name in SHORT_CLIENT_ENV:
        monkeypatch.delenv(name, raising=False)
    use_short_client_timeouts()
    dead = f"http://user:secret@127.0.0.1:{free_local_port()}"
    said: list[str] = []
    journal = tmp_path / JOURNAL_FILE
    run = BufferedRun(dead, "buffered", "dead", journal, say=said.append, retry_s=FAST_RETRY)
    started = time.monotonic()
    for step in range(1, 51):
        run.log_metrics({"step_loss": 1.0 / step}, step=step)
    assert time.monotonic() - started < 1.0
    started = time.monotonic()
    assert not run.finish(timeout_s=3)
    assert time.monotonic() - started < 15
    assert len(read_journal(journal)) == 50  # kept for the next resume
    end = said[-1]
    assert "did not answer within 3 s" in end and "50 tracking records" in end, said
    assert str(journal) in end
    assert not any("secret" in line for line in said), said


def test_marking_failed_never_hides_the_first_error(caplog) -> None:
    class Broken:
        def finish(self, status: str, timeout_s: float) -> bool:
            raise OSError("disk full while marking FAILED")

    with pytest.raises(ValueError, match="the original"):
        try:
            raise ValueError("the original")
        except ValueError:
            _mark_failed(Broken())
            raise
    assert "could not mark the MLflow run FAILED" in caplog.text


@pytest.mark.parametrize(("uri", "shown"), [
    ("http://alice:s3cret@mlflow.internal:5000/", "http://***@mlflow.internal:5000/"),
    ("https://token@host/path?x=1", "https://***@host/path?x=1"),
    ("http://127.0.0.1:5000", "http://127.0.0.1:5000"),
    ("sqlite:////tmp/mlflow.db", "sqlite:////tmp/mlflow.db"),
])
def test_tracking_uris_lose_their_credentials(uri: str, shown: str) -> None:
    assert without_userinfo(uri) == shown
    assert scrubbed(f"request to {uri}api/2.0 failed") == f"request to {shown}api/2.0 failed"


def test_params_and_model_metadata_hold_no_credentials() -> None:
    from raytrain_at.training.loop import training_metadata

    uri = "http://alice:s3cret@mlflow.internal:5000"
    config = load_config("quickstart", [f"tracking.tracking_uri={uri}"])
    params = run_params(config, None)
    assert params["tracking.tracking_uri"] == "http://***@mlflow.internal:5000"
    assert not any("s3cret" in str(v) for v in params.values())
    assert "s3cret" not in json.dumps(training_metadata(config, 1))
    dump = config.model_dump(mode="json")
    assert "s3cret" not in json.dumps(redacted_config_dump(dump))
    assert dump["tracking"]["tracking_uri"] == uri  # the config itself is untouched


def test_journal_path_is_beside_the_run_checkpoints(tmp_path) -> None:
    from raytrain_at.training.launch import PreparedRun

    config = load_config("quickstart")
    prepared = PreparedRun(config=config, train_path="t", heldout_path=None,
                           tracking_uri="sqlite:///x.db", run_name="r",
                           storage_path=str(tmp_path / "runs"))
    assert Path(prepared.worker_payload()["run_folder"]) == tmp_path / "runs" / "r"
