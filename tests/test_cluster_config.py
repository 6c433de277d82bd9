"""cluster.yaml and scripts/cluster/, checked offline (no cloud credentials, no network).

Ray's own schema accepts the config after Ray's own default-filling (`prepare_config` +
`validate_config`, what `ray up` runs before it touches AWS). The node commands are then executed
here, the way the launcher runs them, in a scratch HOME with stand-ins for `ray` and the `aws`
CLI: the head's start commands really start the MLflow server (bound to this machine's private
address and loopback, never 0.0.0.0), and a worker's start commands really write
MLFLOW_TRACKING_URI from $RAY_HEAD_IP and stage the datasets before `ray start`.
"""

from __future__ import annotations

import copy
import os
import re
import socket
import stat
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import yaml

from raytrain_at.runtime.ports import free_local_port

ROOT = Path(__file__).resolve().parents[1]
CLUSTER_YAML = ROOT / "cluster.yaml"
SCRIPTS = ROOT / "scripts" / "cluster"
BUCKET_PLACEHOLDER = "CHANGE-ME-your-bucket"


def _raw() -> dict:
    return yaml.safe_load(CLUSTER_YAML.read_text())


@pytest.fixture(scope="module")
def prepared() -> dict:
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = prepare_config(copy.deepcopy(_raw()))
    validate_config(config)
    return config


# ------------------------------------------------------------------ schema and structure
def test_ray_accepts_the_config(prepared) -> None:
    assert prepared["cluster_name"] == "raytrain-at"
    provider = prepared["provider"]
    assert provider["type"] == "aws" and provider["region"] == "us-west-2"
    assert provider["availability_zone"].startswith("us-west-2")
    assert provider["cache_stopped_nodes"] is True
    assert prepared["auth"] == {"ssh_user": "ubuntu"}  # keys come from the user's AWS set-up


def test_schema_rejects_a_broken_config() -> None:
    """The validation above is not vacuous: Ray's schema refuses an unknown node-type field."""
    from ray.autoscaler._private.util import prepare_config, validate_config

    broken = _raw()
    broken["available_node_types"]["gpu.a100.spot"]["gpus"] = 8
    with pytest.raises(Exception):
        validate_config(prepare_config(broken))


def test_head_is_cpu_only_and_gpu_workers_cover_a100_h100_spot_and_on_demand(prepared) -> None:
    types = prepared["available_node_types"]
    head = types[prepared["head_node_type"]]
    assert head["resources"].get("GPU", 0) == 0 and head["resources"].get("CPU", 0) == 0
    assert "GPU" not in head["resources"]
    workers = {name: t for name, t in types.items() if name != prepared["head_node_type"]}
    seen = set()
    for name, node_type in workers.items():
        config = node_type["node_config"]
        market = config.get("InstanceMarketOptions", {}).get("MarketType", "on-demand")
        gpu = {"p4d.24xlarge": "A100", "p5.48xlarge": "H100"}[config["InstanceType"]]
        seen.add((gpu, market))
        assert node_type["resources"]["GPU"] == 8 and node_type["resources"]["CPU"] >= 96
        assert node_type["min_workers"] == 0 and 1 <= node_type["max_workers"] <= 8
        assert config.get("IamInstanceProfile"), f"{name} cannot read the datasets from S3"
    assert seen == {("A100", "spot"), ("A100", "on-demand"), ("H100", "spot"),
                    ("H100", "on-demand")}
    # Spot is preferred, on-demand is the fallback (autoscaler v2 orders fitting types by it).
    for gpu in ("a100", "h100"):
        assert workers[f"gpu.{gpu}.spot"]["priority"] > workers[f"gpu.{gpu}.ondemand"]["priority"]


def test_file_mounts_copy_the_project_source_only(prepared) -> None:
    mounts = prepared["file_mounts"]
    assert "~/raytrain-at/raytrain_at" in mounts and "~/raytrain-at/pyproject.toml" in mounts
    for remote, local in mounts.items():
        assert remote.startswith("~/raytrain-at/")
        assert local not in (".", "./"), "mounting the checkout would hash .venv and datasets"
        assert (ROOT / local).exists(), f"file_mounts names {local}, which does not exist"


def test_setup_runs_the_readme_setup_script(prepared) -> None:
    setup = prepared["setup_commands"]
    assert any("bash scripts/setup.sh" in cmd for cmd in setup)
    # setup_commands run on the head and on every worker.
    assert setup == prepared["head_setup_commands"][:len(setup)]
    assert setup == prepared["worker_setup_commands"][:len(setup)]
    setup_sh = (ROOT / "scripts" / "setup.sh").read_text()
    for package in ("libopencv-dev", "libturbojpeg0-dev", "pkg-config"):
        assert package in setup_sh


def test_mlflow_server_script_binds_privately_with_s3_artifacts(prepared) -> None:
    assert any("scripts/cluster/start_mlflow.sh" in cmd
               for cmd in prepared["head_start_ray_commands"])
    assert not any("start_mlflow" in cmd for cmd in prepared["worker_start_ray_commands"])
    script = (SCRIPTS / "start_mlflow.sh").read_text()
    assert re.search(r"\bmlflow\b.*\bserver\b", script.replace('"$MLFLOW" server', "mlflow server"))
    assert '--host "$HOST_IP"' in script  # never 0.0.0.0: see the refusal test below
    assert "--artifacts-destination" in script and "s3://$BUCKET/mlflow-artifacts" in script
    assert "sqlite:///" in script and "nohup" in script and "mlflow.log" in script
    assert "mlflow.pid" in script


def test_workers_get_the_tracking_uri_and_stage_data_before_ray_starts(prepared) -> None:
    start = prepared["worker_start_ray_commands"]
    ray_start = next(i for i, cmd in enumerate(start) if "ray start" in cmd)
    assert "MLFLOW_TRACKING_URI=http://$RAY_HEAD_IP:5000" in start[ray_start]
    assert "--address=$RAY_HEAD_IP:6379" in start[ray_start]
    staged = [i for i, cmd in enumerate(start) if "scripts/cluster/stage_data.sh" in cmd]
    assert staged and staged[0] < ray_start


def test_no_secrets_in_config_or_scripts() -> None:
    secret_key = re.compile(r"secret|password|passwd|token|access_key|private_key|credential", re.I)

    def keys(node, path=""):
        if isinstance(node, dict):
            for key, value in node.items():
                yield f"{path}.{key}", key
                yield from keys(value, f"{path}.{key}")
        elif isinstance(node, list):
            for i, value in enumerate(node):
                yield from keys(value, f"{path}[{i}]")

    flagged = [path for path, key in keys(_raw()) if secret_key.search(str(key))]
    assert not flagged, f"secret-looking keys in cluster.yaml: {flagged}"
    # A literal value assigned to a secret-looking name (references like ${VAR} are fine).
    assignment = re.compile(r"(secret|password|passwd|token|access_key)\w*\s*[:=]\s*[\"']?"
                            r"[A-Za-z0-9/+_.-]{8,}", re.I)
    for path in [CLUSTER_YAML, *sorted(SCRIPTS.glob("*"))]:
        text = path.read_text()
        assert not assignment.search(text), f"{path.name} assigns a secret"
        assert not re.search(r"AKIA[0-9A-Z]{16}", text), f"{path.name} holds an AWS access key"
        assert "PRIVATE KEY" not in text, f"{path.name} holds a private key"


def test_cluster_scripts_parse_and_are_executable() -> None:
    scripts = sorted(SCRIPTS.glob("*.sh"))
    assert {p.name for p in scripts} >= {"start_mlflow.sh", "stage_data.sh", "node_env.sh"}
    for script in scripts:
        result = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
        assert result.returncode == 0, f"{script.name}: {result.stderr}"
        assert script.stat().st_mode & stat.S_IXUSR, f"{script.name} is not executable"


# ------------------------------------------------------------------ the commands, executed
def _private_ip() -> str | None:
    """This machine's address on its default route (what node_env.sh picks), if not loopback."""
    probe = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        probe.connect(("1.1.1.1", 1))
        ip = probe.getsockname()[0]
    except OSError:
        return None
    finally:
        probe.close()
    return None if ip.startswith("127.") else ip


@pytest.fixture
def node(tmp_path):
    """A scratch node: HOME with ~/raytrain-at -> this checkout, and stand-ins for `ray`
    (records its environment and arguments) and the `aws` CLI (`s3 sync` writes a .beton)."""
    home = tmp_path / "home"
    home.mkdir()
    (home / "raytrain-at").symlink_to(ROOT)
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    calls = tmp_path / "calls.log"
    stubs = {
        "ray": f'echo "ray $* | MLFLOW_TRACKING_URI=$MLFLOW_TRACKING_URI'
               f' RAYTRAIN_AT_DATA=$RAYTRAIN_AT_DATA RAY_AUTH_MODE=$RAY_AUTH_MODE" >> {calls}\n'
               'if [ "$1 $2" = "get-auth-token --generate" ]; then mkdir -p ~/.ray;'
               ' [ -s ~/.ray/auth_token ] || echo stub-token > ~/.ray/auth_token; fi\n',
        "aws": f'echo "aws $*" >> {calls}\n'
               'if [ "$1 $2" = "s3 sync" ]; then printf beton > "$4/imagenet_train.beton"; fi\n'
               'if [ "$1 $2" = "s3 ls" ]; then exit 1; fi\n',
    }
    for name, body in stubs.items():
        (bin_dir / name).write_text("#!/usr/bin/env bash\n" + body)
        (bin_dir / name).chmod(0o755)
    # RAYTRAIN_AT_PROJECT: a project without .venv, so the PATH that node_env.sh writes cannot
    # put the real `ray` (whose `ray stop` would stop every Ray on this machine) before the stub.
    fake_project = tmp_path / "project"
    fake_project.mkdir()
    env = {"HOME": str(home), "PATH": f"{bin_dir}:/usr/bin:/bin:/usr/sbin:/sbin",
           "RAYTRAIN_AT_PROJECT": str(fake_project),
           "MLFLOW_BIN": str(ROOT / ".venv" / "bin" / "mlflow"),
           "RAYTRAIN_AT_DATA_LINK": str(tmp_path / "raytrain-at-data"),
           "RAYTRAIN_AT_STAGE_ROOT": str(tmp_path / "nvme"), "LANG": "C.UTF-8"}
    (tmp_path / "nvme").mkdir()
    return {"home": home, "env": env, "calls": calls, "tmp": tmp_path}


def _run(commands: list[str], env: dict, timeout: float = 60) -> subprocess.CompletedProcess:
    """Run node commands the way Ray's command runner does: one bash each, after ~/.bashrc."""
    for cmd in commands:
        result = subprocess.run(["bash", "-c", f"source ~/.bashrc 2>/dev/null; {cmd}"], env=env,
                                capture_output=True, text=True, timeout=timeout)
        if result.returncode != 0:
            return result
    return result


def _first_setup_command(config: dict, bucket: str | None) -> str:
    cmd = config["setup_commands"][0]
    assert BUCKET_PLACEHOLDER in cmd, "the bucket line users edit is gone"
    return cmd if bucket is None else cmd.replace(BUCKET_PLACEHOLDER, bucket)


def test_unedited_bucket_placeholder_stops_setup(prepared, node) -> None:
    result = _run([_first_setup_command(prepared, None)], node["env"])
    assert result.returncode == 2 and "bucket" in result.stderr


def test_worker_start_commands_export_tracking_uri_and_stage_data(prepared, node) -> None:
    from ray.autoscaler._private.util import with_head_node_ip

    env = node["env"]
    setup = _run([_first_setup_command(prepared, "my-bucket")], env)
    assert setup.returncode == 0, setup.stderr
    # What the launcher does to worker commands: prefix `export RAY_HEAD_IP=<head ip>;`.
    commands = with_head_node_ip(prepared["worker_start_ray_commands"], "10.1.2.3")
    # Without the head's auth token (cluster_synced_files) a worker stops before `ray start`.
    refused = _run(commands, env)
    assert refused.returncode != 0 and "auth token" in refused.stderr
    assert "ray start" not in node["calls"].read_text()
    assert "~/.ray/auth_token" in prepared["cluster_synced_files"]
    (node["home"] / ".ray").mkdir()
    (node["home"] / ".ray" / "auth_token").write_text("synced-from-head")
    node["calls"].write_text("")
    for attempt in range(2):  # a restart runs them again: idempotent
        result = _run(commands, env)
        assert result.returncode == 0, result.stdout + result.stderr
    calls = node["calls"].read_text().splitlines()
    starts = [c for c in calls if c.startswith("ray start")]
    assert len(starts) == 2
    link = Path(env["RAYTRAIN_AT_DATA_LINK"])
    for line in starts:
        assert "--address=10.1.2.3:6379" in line
        assert "MLFLOW_TRACKING_URI=http://10.1.2.3:5000" in line
        assert f"RAYTRAIN_AT_DATA={link}" in line
        assert "RAY_AUTH_MODE=token" in line
    syncs = [c for c in calls if c.startswith("aws s3 sync")]
    assert len(syncs) == 2 and syncs[0].split()[3] == "s3://my-bucket/betons/"
    # Staged before Ray started, and reachable through the shared path.
    assert calls.index(syncs[0]) < calls.index(starts[0])
    assert link.is_symlink() and (link / "imagenet_train.beton").read_text() == "beton"
    assert Path(os.readlink(link)) == node["tmp"] / "nvme" / "raytrain-at-data"
    env_file = (node["home"] / ".raytrain-at.env").read_text()
    assert "export MLFLOW_TRACKING_URI=http://10.1.2.3:5000" in env_file
    # The storage root every node sees: a multi-node run refuses to start without one.
    assert "export RAYTRAIN_AT_STORAGE=s3://my-bucket/ray-results" in env_file
    assert "export RAYTRAIN_AT_BUCKET=my-bucket" in env_file
    assert f"export AWS_DEFAULT_REGION={prepared['provider']['region']}" in env_file
    bashrc = (node["home"] / ".bashrc").read_text()
    assert bashrc.count(".raytrain-at.env") == 2 and len(bashrc.splitlines()) == 1  # once


def _get(url: str, host: str | None = None) -> tuple[int, str]:
    request = urllib.request.Request(url, headers={"Host": host} if host else {})
    try:
        with urllib.request.urlopen(request, timeout=3) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as err:
        return err.code, ""


def test_head_start_commands_run_mlflow_on_private_ip_and_loopback(prepared, node) -> None:
    ip = _private_ip()
    if ip is None:
        pytest.skip("this machine has no non-loopback IPv4 address")
    env = dict(node["env"], MLFLOW_PORT=str(free_local_port()), MLFLOW_HOME=str(node["tmp"] / "mlflow"),
               MLFLOW_LOG=str(node["tmp"] / "mlflow.log"), MLFLOW_WORKERS="1")
    port = env["MLFLOW_PORT"]
    stop = str(SCRIPTS / "start_mlflow.sh") + " --stop"
    try:
        assert _run([_first_setup_command(prepared, "my-bucket")], env).returncode == 0
        result = _run(prepared["head_start_ray_commands"], env, timeout=120)
        assert result.returncode == 0, result.stdout + result.stderr + (
            node["tmp"] / "mlflow.log").read_text()
        ray_start = next(c for c in node["calls"].read_text().splitlines()
                         if c.startswith("ray start"))
        assert "--head" in ray_start and "--dashboard-host=127.0.0.1" in ray_start
        assert f"MLFLOW_TRACKING_URI=http://{ip}:5000" in ray_start  # the driver's tracking URI
        assert "RAY_AUTH_MODE=token" in ray_start
        token = node["home"] / ".ray" / "auth_token"
        assert token.read_text().strip() and stat.S_IMODE(token.stat().st_mode) == 0o600
        pid = int((node["tmp"] / "mlflow" / "mlflow.pid").read_text())

        # Both addresses answer; the API refuses foreign Host headers (DNS-rebinding guard).
        assert _get(f"http://{ip}:{port}/health") == (200, "OK")
        assert _get(f"http://127.0.0.1:{port}/health") == (200, "OK")
        api = f"http://127.0.0.1:{port}/api/2.0/mlflow/experiments/search?max_results=1"
        assert _get(api)[0] == 200
        assert _get(api, host=f"{ip}:{port}")[0] == 200
        assert _get(api, host="attacker.example")[0] == 403
        listening = subprocess.run(["ss", "-Hltn", f"sport = :{port}"], capture_output=True,
                                   text=True).stdout
        bound = sorted(line.split()[3] for line in listening.splitlines())
        assert bound == sorted([f"127.0.0.1:{port}", f"{ip}:{port}"]), bound

        # Idempotent: a second start leaves the running server alone.
        again = _run(["bash ~/raytrain-at/scripts/cluster/start_mlflow.sh"], env)
        assert again.returncode == 0 and "already running" in again.stdout
        assert int((node["tmp"] / "mlflow" / "mlflow.pid").read_text()) == pid
    finally:
        subprocess.run(["bash", "-c", stop], env=env, capture_output=True, timeout=30)
    deadline = time.time() + 10
    while time.time() < deadline and _port_open(port):
        time.sleep(0.2)
    assert not _port_open(port), "start_mlflow.sh --stop left the server running"


def _port_open(port: str) -> bool:
    with socket.socket() as s:
        s.settimeout(0.5)
        return s.connect_ex(("127.0.0.1", int(port))) == 0


def test_mlflow_script_refuses_to_bind_everywhere(node) -> None:
    env = dict(node["env"], MLFLOW_HOST_IP="0.0.0.0", RAYTRAIN_AT_BUCKET="my-bucket",
               MLFLOW_HOME=str(node["tmp"] / "mlflow"))
    result = _run(["bash ~/raytrain-at/scripts/cluster/start_mlflow.sh"], env)
    assert result.returncode == 2 and "refusing to bind" in result.stderr
