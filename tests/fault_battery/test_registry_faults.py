"""The cluster's registry under attack and under races: a real ``mlflow server`` with the
basic-auth app on loopback, on a real PostgreSQL (a private cluster in a temporary folder, from
Debian's ``postgresql``), started by ``scripts/cluster/start_mlflow.sh`` as on the head.

Each case asserts that nothing was lost or wrongly registered.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import textwrap
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import torch

from raytrain_at.runtime.ports import free_local_port

ROOT = Path(__file__).resolve().parents[2]
SCRIPTS = ROOT / "scripts" / "cluster"
VENV_BIN = Path(sys.executable).parent


# ------------------------------------------------------------------ a head node's MLflow
class Head:
    """PostgreSQL, the credentials file and start_mlflow.sh's environment, in one folder."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.pg_port = free_local_port()
        setup = subprocess.run(
            ["bash", str(SCRIPTS / "setup_postgres.sh"), "--private", str(folder / "pg"),
             "--port", str(self.pg_port)], capture_output=True, text=True, timeout=120)
        assert setup.returncode == 0, setup.stdout + setup.stderr
        self.backend = setup.stdout.strip().splitlines()[-1]
        self.libpq = self.backend.replace("postgresql+psycopg2:", "postgresql:")
        self.credentials = folder / "credentials"
        made = subprocess.run(["bash", str(SCRIPTS / "mlflow_credentials.sh")],
                              env=dict(os.environ, RAYTRAIN_AT_MLFLOW_CREDENTIALS=str(
                                  self.credentials)), capture_output=True, text=True)
        assert made.returncode == 0, made.stderr
        values = dict(line.split("=", 1) for line in self.credentials.read_text().split())
        self.username = values["MLFLOW_TRACKING_USERNAME"]
        self.password = values["MLFLOW_TRACKING_PASSWORD"]
        self.port = free_local_port()
        self.uri = f"http://127.0.0.1:{self.port}"
        self.backups = folder / "backups"
        self.log = folder / "mlflow.log"

    def env(self, **extra: str) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
        env.update(RAYTRAIN_AT_ENV_FILE="/nonexistent", RAYTRAIN_AT_PROJECT=str(ROOT),
                   RAYTRAIN_AT_MLFLOW_CREDENTIALS=str(self.credentials),
                   MLFLOW_BIN=str(VENV_BIN / "mlflow"), MLFLOW_HOME=str(self.folder / "mlflow"),
                   MLFLOW_PORT=str(self.port), MLFLOW_HOST_IP="127.0.0.1", MLFLOW_WORKERS="2",
                   MLFLOW_LOG=str(self.log), MLFLOW_ARTIFACTS_DESTINATION=str(
                       self.folder / "artifacts"),
                   MLFLOW_BACKEND_STORE_URI=self.backend, MLFLOW_BACKUP_STORE=str(self.backups),
                   MLFLOW_DISABLE_TELEMETRY="true")
        env.update(extra)
        return env

    def client_env(self) -> dict[str, str]:
        """What node_env.sh hands a job: the tracking URI and the account."""
        env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
        env.update(MLFLOW_TRACKING_URI=self.uri, MLFLOW_TRACKING_USERNAME=self.username,
                   MLFLOW_TRACKING_PASSWORD=self.password, MLFLOW_DISABLE_TELEMETRY="true",
                   HF_HUB_OFFLINE="1")
        return env

    def start(self, **extra: str) -> subprocess.CompletedProcess:
        return subprocess.run(["bash", str(SCRIPTS / "start_mlflow.sh")], env=self.env(**extra),
                              capture_output=True, text=True, timeout=180)

    def stop(self) -> None:
        subprocess.run(["bash", str(SCRIPTS / "start_mlflow.sh"), "--stop"], env=self.env(),
                       capture_output=True, text=True, timeout=60)

    def backup(self) -> subprocess.CompletedProcess:
        return subprocess.run(["bash", str(SCRIPTS / "backup_mlflow.sh")], env=self.env(),
                              capture_output=True, text=True, timeout=120)

    def sql(self, query: str) -> str:
        done = subprocess.run(["psql", "-XtAq", "-d", self.libpq, "-c", query],
                              capture_output=True, text=True, timeout=60)
        assert done.returncode == 0, done.stderr
        return done.stdout.strip()

    def wipe(self) -> None:
        """What a new head sees: an empty database."""
        self.sql("drop schema public cascade; create schema public")

    def tables(self) -> int:
        return int(self.sql("select count(*) from information_schema.tables "
                            "where table_schema = current_schema()"))

    def close(self) -> None:
        self.stop()
        subprocess.run(["bash", str(SCRIPTS / "setup_postgres.sh"), "--stop",
                        str(self.folder / "pg")], capture_output=True, timeout=60)


@pytest.fixture(scope="module")
def head():
    # Not pytest's tmp_path: its folders are 0700, and the private PostgreSQL runs as the
    # `postgres` user when the tests run as root.
    folder = Path(tempfile.mkdtemp(prefix="raytrain-at-registry-", dir="/tmp"))
    folder.chmod(0o755)
    node = Head(folder)
    try:
        started = node.start()
        assert started.returncode == 0, started.stdout + started.stderr + _tail(node.log)
        yield node
    finally:
        node.close()
        shutil.rmtree(folder, ignore_errors=True)


def _tail(path: Path) -> str:
    return path.read_text()[-3000:] if path.exists() else ""


def _call(url: str, body: dict | None = None, auth: tuple[str, str] | None = None
          ) -> tuple[int, dict]:
    request = urllib.request.Request(url, data=None if body is None else json.dumps(
        body).encode(), headers={"Content-Type": "application/json"},
        method="GET" if body is None else "POST")
    if auth is not None:
        token = base64.b64encode(f"{auth[0]}:{auth[1]}".encode()).decode()
        request.add_header("Authorization", f"Basic {token}")
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            text = response.read()
            try:
                return response.status, json.loads(text or b"{}")
            except ValueError:  # /health answers plain text
                return response.status, {"text": text.decode()}
    except urllib.error.HTTPError as err:
        return err.code, {}


def _python(code: str, env: dict[str, str], *args: str, timeout: float = 240
            ) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", textwrap.dedent(code), *args], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            cwd=str(ROOT))


def _model_dir(folder: Path, seed: int) -> Path:
    from raytrain_at.models.model_files import ModelSpec, save_model_file

    torch.manual_seed(seed)
    spec = ModelSpec(name="test_resnet", num_classes=10, resolution=16, crop_pct=1.0)
    folder.mkdir(parents=True, exist_ok=True)
    save_model_file(folder / "model.safetensors", spec.build().eval(), spec)
    return folder


# ------------------------------------------------------------------ the cases
def test_basic_auth_refuses_anonymous_writes_and_keeps_credentials_out_of_the_run(head, tmp_path):
    """Basic-auth MLflow: an unauthenticated write gets 401; the job's credentials work and appear in no param, tag or artifact."""
    api = f"{head.uri}/api/2.0/mlflow"
    assert _call(f"{api}/experiments/create", {"name": "planted"})[0] == 401
    assert _call(f"{api}/experiments/create", {"name": "planted"},
                 auth=(head.username, "not-the-password"))[0] == 401
    assert _call(f"{api}/experiments/search?max_results=5")[0] == 401  # reads too
    assert _call(f"{head.uri}/health")[0] == 200  # the start script's probe stays open
    status, found = _call(f"{api}/experiments/get-by-name?experiment_name=planted",
                          auth=(head.username, head.password))
    assert status == 404 and not found, "an anonymous write went through"

    # A registration and a training run's record, made with the job's environment.
    model = _model_dir(tmp_path / "model", seed=3)
    cli = str(VENV_BIN / "raytrain-at")
    done = subprocess.run([cli, "register", str(model / "model.safetensors"), "--name",
                           "auth-net", "--unevaluated"], env=head.client_env(),
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    made = _python("""
        import os
        from raytrain_at.tracking.runs import TrainingRun
        run = TrainingRun(os.environ["MLFLOW_TRACKING_URI"], "auth-check", "job")
        run.log_params({"env": {k: v for k, v in os.environ.items() if "TRACKING_URI" in k}})
        run.log_metrics({"loss": 1.0}, step=0)
        run.finish()
        print(run.run_id)
        """, head.client_env())
    out, err = made.communicate(timeout=240)
    assert made.returncode == 0, err[-2000:]
    assert head.password not in done.stdout + done.stderr + out + err

    from mlflow.tracking import MlflowClient

    os.environ.update(MLFLOW_TRACKING_USERNAME=head.username,
                      MLFLOW_TRACKING_PASSWORD=head.password)
    try:
        client = MlflowClient(tracking_uri=head.uri, registry_uri=head.uri)
        texts: list[str] = []
        run_ids = [out.strip().splitlines()[-1]]
        versions = client.search_model_versions("name = 'auth-net'")
        assert [v.version for v in versions] == ["1"]  # registered once, with the credentials
        for version in versions:
            texts += [json.dumps(version.tags), version.description or "", version.source or ""]
            run_ids.append(version.run_id)
            from raytrain_at.registry.mlflow_registry import ModelRegistry

            model_id = ModelRegistry.logged_model_id(version)
            assert model_id
            logged = client.get_logged_model(model_id)
            texts += [json.dumps(logged.tags), json.dumps(logged.params)]
            artifacts = client.download_artifacts(version.run_id, "", str(tmp_path / "dl"))
            for path in Path(artifacts).rglob("*"):
                if path.is_file():
                    texts.append(path.read_bytes().decode("utf-8", "replace"))
        registered = client.get_registered_model("auth-net")
        texts += [json.dumps(registered.tags), registered.description or ""]
        for run_id in run_ids:
            run = client.get_run(run_id)
            texts += [json.dumps(run.data.params), json.dumps(run.data.tags)]
            assert run.data.tags.get("mlflow.user") in (None, head.username)
    finally:
        os.environ.pop("MLFLOW_TRACKING_USERNAME")
        os.environ.pop("MLFLOW_TRACKING_PASSWORD")
    blob = "\n".join(texts)
    assert len(blob) > 1000  # the record was read, not an empty list
    assert head.password not in blob
    assert head.password not in _tail(head.log) and head.password not in head.log.read_text()
    mlflow_home = head.folder / "mlflow"
    assert head.password not in (mlflow_home / "basic_auth.ini").read_text()
    assert (head.credentials.stat().st_mode & 0o777) == 0o600


REGISTER = """
    import json, sys, time
    from pathlib import Path
    from raytrain_at.registry.mlflow_registry import ModelRegistry
    folder, value, start = Path(sys.argv[1]), float(sys.argv[2]), float(sys.argv[3])
    registry = ModelRegistry()
    while time.time() < start:  # all four at once
        time.sleep(0.01)
    done = registry.register(
        name="race-net", model_dir=folder, params={"architecture": "test_resnet"},
        metrics={"robust_acc_linf": value, "clean_acc": 0.9}, tags={"trustworthy": "true"},
        comparable={"linf": "eps=0.0157 on digits n=16"}, eligible=True)
    print(json.dumps({"version": done.version, "taken": done.aliases_taken,
                      "notes": done.alias_notes}))
    """


def test_four_concurrent_evaluated_registrations_leave_the_champion_on_the_best(head, tmp_path):
    """4 concurrent evaluated registrations (processes): the champion alias ends on the best, each once registered."""
    from mlflow.tracking import MlflowClient

    values = [0.41, 0.77, 0.23, 0.65]
    start = time.time() + 8  # after every interpreter has imported MLflow
    procs = [_python(REGISTER, head.client_env(), str(_model_dir(tmp_path / f"m{i}", seed=i)),
                     str(value), str(start)) for i, value in enumerate(values)]
    outputs = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [0] * 4, [err[-1500:] for _, err in outputs]
    results = [json.loads(out.strip().splitlines()[-1]) for out, _ in outputs]
    by_value = {value: result["version"] for value, result in zip(values, results)}
    assert sorted(int(v) for v in by_value.values()) == [1, 2, 3, 4]
    os.environ.update(MLFLOW_TRACKING_USERNAME=head.username,
                      MLFLOW_TRACKING_PASSWORD=head.password)
    try:
        client = MlflowClient(tracking_uri=head.uri, registry_uri=head.uri)
        holder = client.get_model_version_by_alias("race-net", "champion-linf")
        assert len(client.search_model_versions("name = 'race-net'")) == 4
    finally:
        os.environ.pop("MLFLOW_TRACKING_USERNAME")
        os.environ.pop("MLFLOW_TRACKING_PASSWORD")
    assert str(holder.version) == by_value[max(values)]
    # The best one's registrant reports the alias as its own; nobody else does.
    taken = [value for value, result in zip(values, results) if result["taken"]]
    assert taken == [max(values)], results


def test_a_failed_restore_keeps_the_server_down_on_its_empty_database(head, tmp_path):
    """The PostgreSQL store's restore fails (corrupt, partial or missing dump): the server refuses to start on the empty database; a good dump restores every run."""
    from mlflow.tracking import MlflowClient

    os.environ.update(MLFLOW_TRACKING_USERNAME=head.username,
                      MLFLOW_TRACKING_PASSWORD=head.password)
    try:
        client = MlflowClient(tracking_uri=head.uri)
        experiment = client.create_experiment("kept")
        runs = sorted(client.create_run(experiment).info.run_id for _ in range(3))
        backup = head.backup()
        assert backup.returncode == 0, backup.stdout + backup.stderr
        good = sorted(p.name for p in head.backups.glob("*.dump"))[-1]
        head.stop()
        head.wipe()  # the head node was replaced: a new, empty database

        def refused(case: str) -> str:
            started = head.start()
            lines = started.stderr.strip().splitlines()
            assert started.returncode == 1, (case, started.stdout, started.stderr)
            assert len(lines) == 1 and lines[0].startswith("[mlflow] refusing to start"), lines
            assert head.tables() == 0, f"{case}: something was written to the database"
            with pytest.raises(OSError):
                urllib.request.urlopen(f"{head.uri}/health", timeout=2)
            return lines[0]

        # A newer dump whose content is not an archive (recorded digest matches it).
        planted = head.backups / "mlflow-29990101T000000Z.dump"
        planted.write_bytes(b"PGDMP" + os.urandom(4096))
        (head.backups / f"{planted.name}.sha256").write_text(
            hashlib.sha256(planted.read_bytes()).hexdigest() + "\n")
        assert "not a pg_dump archive" in refused("corrupt")
        # A partial download: the dump is shorter than its recorded digest says.
        planted.write_bytes((head.backups / good).read_bytes()[:50_000])
        (head.backups / f"{planted.name}.sha256").write_text(
            hashlib.sha256((head.backups / good).read_bytes()).hexdigest() + "\n")
        assert "partial or corrupted" in refused("partial")
        # A valid archive whose restore fails half-way (a table's data that cannot load).
        broken = head.backups / f"{planted.name}"
        data = bytearray((head.backups / good).read_bytes())
        data[len(data) // 2: len(data) // 2 + 2000] = os.urandom(2000)
        broken.write_bytes(bytes(data))
        (head.backups / f"{planted.name}.sha256").write_text(
            hashlib.sha256(bytes(data)).hexdigest() + "\n")
        # The archive may already fail its listing; either way nothing is restored.
        assert re.search("failed|not a pg_dump archive", refused("restore fails"))
        # No dump at all on a store that was initialised.
        for dump in head.backups.glob("*.dump*"):
            dump.rename(tmp_path / dump.name)
        assert "has no dump, though the store was initialised" in refused("missing")
        for dump in tmp_path.glob("*.dump*"):
            if not dump.name.startswith(planted.name):
                dump.rename(head.backups / dump.name)

        started = head.start()
        assert started.returncode == 0, started.stdout + started.stderr + _tail(head.log)
        assert "restored" in started.stdout and good in started.stdout
        kept = client.get_experiment_by_name("kept")
        assert kept is not None
        assert sorted(r.info.run_id for r in client.search_runs([kept.experiment_id])) == runs
    finally:
        os.environ.pop("MLFLOW_TRACKING_USERNAME")
        os.environ.pop("MLFLOW_TRACKING_PASSWORD")
        if head.start().returncode != 0:  # leave the module's server up for the next case
            head.start(RAYTRAIN_AT_MLFLOW_ALLOW_EMPTY="1")


def test_planted_runs_are_not_what_a_run_reference_resolves_to(head):
    """A planted run with a matching name but not FINISHED, not this tool's tag or by another creator is not what run:EXPERIMENT/NAME resolves to; another account cannot plant at all."""
    code = """
        import json, os
        from mlflow.tracking import MlflowClient
        from raytrain_at.model_refs import run_name_reference
        from raytrain_at.tracking.runs import RUN_NAME_TAG, TrainingRun
        uri = os.environ["MLFLOW_TRACKING_URI"]
        ours = TrainingRun(uri, "pretraining", "clean")
        ours.finish("FINISHED")
        client = MlflowClient(uri)
        experiment = ours.experiment_id
        running = client.create_run(experiment, tags={RUN_NAME_TAG: "clean",
                                                      "mlflow.user": os.environ["MLFLOW_TRACKING_USERNAME"]})
        other = client.create_run(experiment, tags={RUN_NAME_TAG: "clean",
                                                    "mlflow.user": "intruder"})
        client.set_terminated(other.info.run_id, "FINISHED")
        untagged = client.create_run(experiment, run_name="clean")
        client.set_terminated(untagged.info.run_id, "FINISHED")
        print(json.dumps({"ours": ours.run_id,
                          "resolved": run_name_reference("run:pretraining/clean", uri)}))
        """
    proc = _python(code, head.client_env())
    out, err = proc.communicate(timeout=240)
    assert proc.returncode == 0, err[-2000:]
    result = json.loads(out.strip().splitlines()[-1])
    assert result["resolved"] == f"runs:/{result['ours']}/model"

    # A second account (made by the admin) is refused every write: it cannot plant a run.
    api = f"{head.uri}/api/2.0/mlflow"
    admin = (head.username, head.password)
    status, _ = _call(f"{head.uri}/api/2.0/mlflow/users/create",
                      {"username": "visitor", "password": "visitor-password-123"}, auth=admin)
    assert status == 200
    status, found = _call(f"{api}/experiments/get-by-name?experiment_name=pretraining", auth=admin)
    experiment = found["experiment"]["experiment_id"]
    visitor = ("visitor", "visitor-password-123")
    assert _call(f"{api}/runs/create", {"experiment_id": experiment}, auth=visitor)[0] == 403
