"""A two-node Ray cluster on this machine, as `ray start` builds one on a real cluster: a head
node (1 CPU, custom resource node_a) and a second node joining it (1 CPU, node_b), each with its
own temp dir, ports and worker-port range. `raytrain-at train --address` then runs a short
2-worker training on it through the CLI, as a user would on a cluster.

Each training worker needs 1 CPU and each node has 1, so the run can only be scheduled across both
nodes; the test also shows it directly: every worker writes its PID (RAYTRAIN_AT_PID_DIR, which the
raylets hand down to their workers), and Ray names each worker's log file after its PID in the
session folder of the node that started it. Checkpoints from both ranks land in the shared storage
path, and rank 0's MLflow run finishes.

Only the processes this test started are stopped (found by their temp dirs and process tree):
`ray stop` would stop every Ray on the machine, including other test sessions'.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from raytrain_at.runtime.ports import free_ports
from tests.support.rehearsal_procs import processes_of, stop

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
RUN_NAME = "two-node"


# ------------------------------------------------------------------ the cluster
@pytest.fixture(scope="module")
def cluster():
    # Short path: Ray's Unix sockets live under it and must stay below 108 bytes.
    base = Path(tempfile.mkdtemp(prefix="rt2n-", dir="/tmp"))
    pid_dir = base / "pids"
    pid_dir.mkdir()
    env = dict(os.environ)
    for key in ("RAY_ADDRESS", "MLFLOW_TRACKING_URI", "MLFLOW_EXPERIMENT_ID"):
        env.pop(key, None)
    env.update({
        # Ray 2.60 turns token auth on for `ray start --head` when ~/.ray/auth_token exists (a
        # local ray.init() creates it), but not for a joining node: set the mode and a token of
        # this cluster's own explicitly for every process, as cluster.yaml does.
        "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(32),
        "RAY_USAGE_STATS_ENABLED": "0",
        "RAYTRAIN_AT_PID_DIR": str(pid_dir),
    })
    # Outside Ray's defaults (10002-19999 worker ports, 52365 agent, 6379 GCS, 8265 dashboard),
    # so other Ray instances on this machine do not collide; bindable on every address.
    gcs, dashboard, *singles, workers_a, workers_b = free_ports(14, blocks=2, size=40, host="")
    common = ["--node-ip-address=127.0.0.1", "--num-cpus=1", "--num-gpus=0",
              "--object-store-memory=100000000", "--disable-usage-stats"]

    def node_ports(own: list[int], workers: int) -> list[str]:
        return [f"--node-manager-port={own[0]}", f"--object-manager-port={own[1]}",
                f"--dashboard-agent-listen-port={own[2]}",
                f"--dashboard-agent-grpc-port={own[3]}", f"--runtime-env-agent-port={own[4]}",
                f"--metrics-export-port={own[5]}",
                f"--min-worker-port={workers}", f"--max-worker-port={workers + 39}"]

    head = [str(BIN / "ray"), "start", "--head", f"--port={gcs}", "--include-dashboard=false",
            f"--dashboard-port={dashboard}", f"--temp-dir={base / 'a'}",
            '--resources={"node_a": 1}', *common, *node_ports(singles[:6], workers_a)]
    second = [str(BIN / "ray"), "start", f"--address=127.0.0.1:{gcs}",
              f"--temp-dir={base / 'b'}", '--resources={"node_b": 1}', *common,
              *node_ports(singles[6:], workers_b)]
    try:
        for command in (head, second):
            started = subprocess.run(command, env=env, capture_output=True, text=True,
                                     timeout=120)
            assert started.returncode == 0, started.stdout[-3000:] + started.stderr[-3000:]
        nodes = _nodes(f"127.0.0.1:{gcs}", env)
        deadline = time.time() + 60
        while len([n for n in nodes if n["Alive"]]) < 2 and time.time() < deadline:
            time.sleep(1)
            nodes = _nodes(f"127.0.0.1:{gcs}", env)
        yield {"address": f"127.0.0.1:{gcs}", "base": base, "env": env, "pid_dir": pid_dir}
    finally:
        stop(str(base))
        leftover = processes_of(str(base))
        shutil.rmtree(base, ignore_errors=True)
        assert not leftover, f"processes of the test cluster survived: {sorted(leftover)}"


def _nodes(address: str, env: dict) -> list[dict]:
    """ray.nodes() from a separate driver (this test process stays out of Ray)."""
    code = ("import json, ray; ray.init(address=%r, log_to_driver=False); "
            "print('NODES=' + json.dumps([{k: n[k] for k in ('NodeID', 'Alive', 'Resources', "
            "'NodeManagerAddress')} for n in ray.nodes()])); ray.shutdown()" % address)
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr[-3000:]
    line = next(l for l in out.stdout.splitlines() if l.startswith("NODES="))
    return json.loads(line[len("NODES="):])


def _log_dir(base: Path, node: str) -> Path:
    sessions = sorted((base / node).glob("session_2*"))
    assert len(sessions) == 1, sessions
    return sessions[0] / "logs"


def _node_of_pid(base: Path, pid: int) -> str:
    """'a' or 'b': whose session logs hold the files Ray names after this worker's PID."""
    owners = {node for node in ("a", "b")
              if list(_log_dir(base, node).glob(f"worker-*-{pid}.out"))
              or list(_log_dir(base, node).glob(f"python-core-worker-*_{pid}.log"))}
    assert len(owners) == 1, f"worker PID {pid} found in the logs of nodes {owners or 'none'}"
    return owners.pop()


def test_two_worker_training_spans_both_nodes(cluster, tmp_path) -> None:
    nodes = [n for n in _nodes(cluster["address"], cluster["env"]) if n["Alive"]]
    assert len(nodes) == 2
    assert sorted(n["Resources"].get("CPU") for n in nodes) == [1.0, 1.0]
    assert {"node_a", "node_b"} == {k for n in nodes for k in n["Resources"] if k.startswith(
        "node_")}

    storage = tmp_path / "shared-storage"
    env = dict(cluster["env"], RAYTRAIN_AT_HOME=str(tmp_path / "home"),
               MLFLOW_TRACKING_URI=f"sqlite:///{tmp_path / 'mlflow.db'}")
    command = [str(BIN / "raytrain-at"), "train", "quickstart", "--address", cluster["address"],
               "--no-preflight",  # what it checks is the placement of the training workers
               "--num-workers", "2", "--storage-path", str(storage), "--run-name", RUN_NAME,
               "--set", "schedule.epochs=1", "--set", "data.train_size=256",
               "--set", "data.heldout_size=64", "--set", "attack.heldout_steps=2",
               "--set", "scaling.cpus_per_worker=1", "--set", "scaling.max_failures_per_hour=0"]
    started = time.time()
    result = subprocess.run(command, env=env, cwd=tmp_path, capture_output=True, text=True,
                            timeout=900)
    output = result.stdout[-4000:] + result.stderr[-6000:]
    assert result.returncode == 0, output
    assert f"run {RUN_NAME}:" in result.stdout and "'epoch': 1" in result.stdout, output
    print(f"two-node training: {time.time() - started:.0f} s")

    # Each rank ran in a different node's raylet.
    pids = {rank: int((cluster["pid_dir"] / f"rank{rank}-epoch0.pid").read_text())
            for rank in (0, 1)}
    placed = {rank: _node_of_pid(cluster["base"], pid) for rank, pid in pids.items()}
    assert sorted(placed.values()) == ["a", "b"], placed

    # Checkpoints of both ranks in the shared storage path.
    checkpoints = sorted(p for p in (storage / "runs" / RUN_NAME).glob("checkpoint_*")
                         if p.is_dir())
    assert checkpoints, sorted(p.name for p in (storage / "runs" / RUN_NAME).iterdir())
    files = {p.name for p in checkpoints[-1].rglob("*") if p.is_file()}
    assert "model.safetensors" in files, files
    for rank in (0, 1):  # each rank's DeepSpeed ZeRO shard, written from its own node
        assert f"zero_pp_rank_{rank}_mp_rank_00_optim_states.pt" in files, (rank, files)

    # Rank 0's MLflow run (written from whichever node it landed on) finished.
    from mlflow.tracking import MlflowClient

    client = MlflowClient(env["MLFLOW_TRACKING_URI"])
    experiment = client.get_experiment_by_name("quickstart")
    runs = client.search_runs([experiment.experiment_id])
    assert [r.info.status for r in runs] == ["FINISHED"]
    assert runs[0].data.metrics["epoch"] == 1
