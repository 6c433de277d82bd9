"""`ray up` of cluster_local.yaml, rehearsed on this machine over SSH to 127.0.0.1.

The fast checks read the local twin offline: Ray's schema accepts it, it runs the same scripts
as cluster.yaml in the same order, its Ray ports are not Ray's defaults, and the local options
of node_env.sh / stage_data.sh do what the twin needs. The `cluster` check runs
tests/support/rehearse_ray_up.sh for real (openssh-server, `ray up`, `ray exec`, `ray job submit`,
`ray down`) and asserts what the job saw on the head and that nothing it started is left.
"""

from __future__ import annotations

import copy
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "tests" / "support" / "rehearse_ray_up.sh"
SCRIPTS = ROOT / "scripts" / "cluster"
RAY_DEFAULT_PORTS = {6379, 8265, 10001, 52365, 8076, 5000}


def _load(name: str) -> dict:
    return yaml.safe_load((ROOT / name).read_text())


def _prepared(raw: dict) -> dict:
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = prepare_config(copy.deepcopy(raw))
    validate_config(config)
    return config


def _scripts_run(commands: list[str]) -> list[str]:
    """The project scripts a command list runs, in order (options stripped).

    A script named as an environment variable's value (`VAR=scripts/...`) is a file the run reads,
    not one it runs: the GPU stack file cluster.yaml hands setup.sh is such an option.
    """
    return [m for cmd in commands for m in re.findall(r"(?<!=)\bscripts/[\w/]+\.sh", cmd)]


# ------------------------------------------------------------------ the twin, offline
def test_ray_accepts_the_local_twin() -> None:
    config = _prepared(_load("cluster_local.yaml"))
    assert config["provider"]["type"] == "local"
    assert config["provider"]["head_ip"] == "127.0.0.1"
    assert config["auth"]["ssh_user"] == "root"


def test_twin_runs_the_same_scripts_as_the_aws_cluster() -> None:
    aws, local = _load("cluster.yaml"), _load("cluster_local.yaml")
    assert local["file_mounts"] == aws["file_mounts"]
    assert local["cluster_synced_files"] == aws["cluster_synced_files"]
    for key in ("setup_commands", "head_start_ray_commands", "worker_start_ray_commands"):
        assert _scripts_run(local[key]) == _scripts_run(aws[key]), key
    # Only node_env.sh takes other options; the bucket line users edit stays in cluster.yaml.
    assert "--no-bucket" in local["setup_commands"][0]
    assert "CHANGE-ME" in aws["setup_commands"][0]
    # The CUDA torch pin is the AWS nodes' alone: the CPU twin keeps the set-up CI uses.
    stack = "RAYTRAIN_AT_GPU_STACK=scripts/cluster/gpu_stack.sh"
    assert any(stack in cmd for cmd in aws["setup_commands"])
    assert not any("RAYTRAIN_AT_GPU_STACK" in cmd for cmd in local["setup_commands"])


def test_twin_ray_ports_are_explicit_and_not_rays_defaults() -> None:
    local = _load("cluster_local.yaml")
    head_start = next(c for c in local["head_start_ray_commands"] if "ray start" in c)
    flags = re.findall(r"--((?:[\w-]+-)?port)=(\d+)", head_start)
    ports = {flag: int(port) for flag, port in flags}
    for flag in ("port", "dashboard-port", "ray-client-server-port",
                 "dashboard-agent-listen-port", "object-manager-port", "node-manager-port",
                 "runtime-env-agent-port", "metrics-export-port"):
        assert flag in ports, f"--{flag} is left to Ray's default"
    assert not set(ports.values()) & RAY_DEFAULT_PORTS
    assert "--dashboard-host=127.0.0.1" in head_start
    # The rehearsal script checks exactly these ports before it starts.
    listed = re.search(r"RAY_PORTS=\(([\d ]+)\)", SCRIPT.read_text()).group(1).split()
    assert {str(p) for p in ports.values() if p < 26400} <= set(listed)


def _node_env(tmp_path: Path, *args: str) -> tuple[subprocess.CompletedProcess, Path]:
    home = tmp_path / "home"
    home.mkdir(exist_ok=True)
    env = {"HOME": str(home), "PATH": "/usr/bin:/bin:/usr/sbin:/sbin",
           "RAYTRAIN_AT_PROJECT": str(tmp_path / "project")}
    result = subprocess.run(["bash", str(SCRIPTS / "node_env.sh"), *args], env=env,
                            check=False, capture_output=True, text=True, timeout=30)
    return result, home / ".raytrain-at.env"


def test_node_env_local_options(tmp_path) -> None:
    result, env_file = _node_env(tmp_path, "--no-bucket", "--head-ip", "127.0.0.1",
                                 "--mlflow-port", "26390")
    assert result.returncode == 0, result.stderr
    text = env_file.read_text()
    assert "export MLFLOW_TRACKING_URI=http://127.0.0.1:26390" in text
    assert "export MLFLOW_PORT=26390" in text
    assert "RAYTRAIN_AT_BUCKET" not in text
    home = tmp_path / "home"
    assert f"export MLFLOW_ARTIFACTS_DESTINATION={home}/mlflow/artifacts" in text
    assert f"export RAYTRAIN_AT_BETON_SOURCE={home}/raytrain-at-betons/" in text


def test_node_env_without_local_options_writes_what_the_aws_cluster_had(tmp_path) -> None:
    result, env_file = _node_env(tmp_path, "--bucket", "my-bucket", "--region", "us-west-2")
    assert result.returncode == 0, result.stderr
    text = env_file.read_text()
    assert "export RAYTRAIN_AT_BUCKET=my-bucket" in text
    assert re.search(r"MLFLOW_TRACKING_URI=http://[\d.]+:5000\n", text)
    for local_only in ("MLFLOW_PORT", "MLFLOW_ARTIFACTS_DESTINATION", "BETON_SOURCE"):
        assert local_only not in text


def test_node_env_rejects_a_bad_port(tmp_path) -> None:
    result, env_file = _node_env(tmp_path, "--no-bucket", "--mlflow-port", "http")
    assert result.returncode == 2 and "--mlflow-port" in result.stderr
    assert not env_file.exists()


def test_stage_data_copies_from_a_local_source_without_bucket_or_aws(tmp_path) -> None:
    source = tmp_path / "betons"
    source.mkdir()
    (source / "a.beton").write_bytes(b"beton")
    (source / "notes.txt").write_text("not a dataset")
    env = {"HOME": str(tmp_path), "PATH": "/usr/bin:/bin", "AWS_CLI": "no-such-aws",
           "RAYTRAIN_AT_ENV_FILE": str(tmp_path / "none.env"),
           "RAYTRAIN_AT_BETON_SOURCE": f"{source}/", "RAYTRAIN_AT_DATA": str(tmp_path / "link"),
           "RAYTRAIN_AT_STAGE_ROOT": str(tmp_path / "disk")}
    result = subprocess.run(["bash", str(SCRIPTS / "stage_data.sh")], env=env,
                            check=False, capture_output=True, text=True, timeout=30)
    assert result.returncode == 0, result.stderr
    staged = tmp_path / "link"
    assert (staged / "a.beton").read_bytes() == b"beton"
    assert not (staged / "notes.txt").exists()


def test_rehearsal_script_rejects_unknown_arguments() -> None:
    result = subprocess.run(["bash", str(SCRIPT), "--bogus"], check=False,
                            capture_output=True, text=True, timeout=30)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "rehearse_ray_up.sh: unknown argument '--bogus' (try --help)"]


# ------------------------------------------------------------------ the rehearsal, for real
def _port_open(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(0.5)
        return s.connect_ex(("127.0.0.1", port)) == 0


@pytest.mark.cluster
def test_ray_up_exec_job_down_over_local_ssh() -> None:
    if os.geteuid() != 0 or not shutil.which("unshare") or not shutil.which("apt-get"):
        pytest.skip("needs root, unshare and apt-get (Debian) for the SSH server and namespace")
    env = dict(os.environ, RAYTRAIN_AT_BASE_VENV=sys.prefix)
    process = subprocess.Popen(["bash", str(SCRIPT)], env=env, stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        output, _ = process.communicate(timeout=600)
    except subprocess.TimeoutExpired:
        # The script's EXIT trap takes the cluster down and stops its namespace; if it hangs
        # too, SIGKILL to its group ends unshare, whose child (the node) then gets SIGKILL.
        os.killpg(process.pid, signal.SIGTERM)
        try:
            output, _ = process.communicate(timeout=150)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            output, _ = process.communicate()
        pytest.fail(f"the rehearsal took too long:\n{output[-4000:]}")
    assert process.returncode == 0, output[-6000:]

    job_line = next(line for line in output.splitlines() if line.startswith("REHEARSAL job "))
    seen = json.loads(job_line.removeprefix("REHEARSAL job "))
    home = seen["home"]
    assert home != os.path.expanduser("~") and "rehearse-ray-up." in home
    # setup.sh installed the file-mounted source into the node's venv; the env file reached Ray.
    assert seen["raytrain_at"] == f"{home}/raytrain-at/raytrain_at/__init__.py"
    assert seen["data"] == "/mnt/raytrain-at-data"
    assert "digits_val.beton" in seen["betons"]  # written by `ray exec raytrain-at ...`, staged
    assert seen["tracking"] == "http://127.0.0.1:26390" and seen["mlflow_health"] == "OK"

    # Nothing is left: the work folder, the launcher's files, the SSH server, Ray's and
    # MLflow's ports.
    work = re.search(r"work folder (/\S+)\)", output).group(1)
    assert not Path(work).exists()
    name = re.search(r"cluster (raytrain-at-rehearsal-\d+):", output).group(1)
    assert not Path(f"/tmp/ray/cluster-{name}.state").exists()
    cached = [p for p in Path("/tmp").glob("ray-config-*") if name in p.read_text()]
    assert not cached, f"the launcher's config cache is left: {cached}"
    ssh_port = int(re.search(r"SSH server on 127\.0\.0\.1:(\d+)", output).group(1))
    for port in (ssh_port, 26380, 26384, 26390):
        assert not _port_open(port), f"port {port} still answers after the rehearsal"
