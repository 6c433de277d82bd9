"""The cluster rehearsal (tests/support/cluster_rehearsal.sh): a Ray head and two worker nodes,
each in a mount namespace of its own where its disk (HOME, TMPDIR, Ray temp folder, staged
datasets) has the same path as the other nodes' and other content, an S3 store (moto) and the MLflow
server as on the cluster (basic-auth app, an unauthenticated write refused with 401, the account
handed to every node through the environment; a private PostgreSQL store, dumped to the bucket at
the end), through which the preflight (on by default with --address) and clean pre-training, the adversarial run from its reference with a killed
worker, the sharded evaluation with a killed driver and a lost node (equal to a single-process
one when resumed), registration and a client loading the champion all pass. A probe first checks
that a file the head writes under its HOME is not seen by the worker nodes' Ray tasks. The
script stops every process it started, by PID, pass or fail; this test checks that none is left.
About 6-9 minutes on 2 cores: run with ``-m cluster``. Needs root (or unprivileged user
namespaces) for ``unshare --mount``."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from tests.support.rehearsal_procs import processes_of

pytestmark = pytest.mark.cluster

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "tests" / "support" / "cluster_rehearsal.sh"


@pytest.mark.timeout(1500)
def test_rehearsal_end_to_end_stops_every_process() -> None:
    work = Path(tempfile.mkdtemp(prefix="rtr-", dir="/tmp"))
    env = dict(os.environ, PYTHON=sys.executable)
    for key in ("RAY_ADDRESS", "MLFLOW_TRACKING_URI", "RAYTRAIN_AT_STORAGE", "AWS_ENDPOINT_URL"):
        env.pop(key, None)
    result = subprocess.run(["bash", str(SCRIPT), "--work", str(work)], env=env,
                            capture_output=True, text=True, timeout=1450)
    output = result.stdout[-6000:] + result.stderr[-6000:]
    print(result.stdout)
    assert result.returncode == 0, output
    lines = result.stdout
    for expected in ("the head's written-by-the-head seen by the worker nodes' tasks: "
                     "[False, False]", "refused (exit", "MLflow run(s), step ", "clean model: runs:/",
                     "killed rank 1's worker process",
                     "completed 3 epochs after the kill", "killed the evaluation driver",
                     "node2 lost: its shard retried on node1", "champion predicts 200 digits",
                     "unauthenticated write: 401; the account from the environment: 200",
                     "latest dump: mlflow-", "REHEARSAL PASSED"):
        assert expected in lines, (expected, output)
    assert not processes_of(str(work)), "processes of the rehearsal survived"
    assert not work.exists()  # nothing left behind without --keep
