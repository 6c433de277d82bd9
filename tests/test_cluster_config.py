"""cluster.yaml and scripts/cluster/, checked offline (no cloud credentials, no network).

Ray's own schema accepts the config after Ray's own default-filling (`prepare_config` +
`validate_config`, what `ray up` runs before it touches AWS). The node commands are then executed
here, the way the launcher runs them, in a scratch HOME with stand-ins for `ray` and the `aws`
CLI: the head's start commands really start the MLflow server (MLflow's basic-auth app on a
PostgreSQL store, bound to this machine's private address and loopback, never 0.0.0.0; the
PostgreSQL is a private cluster of Debian's server in a temporary folder instead of the system
one), and a worker's start commands really write MLFLOW_TRACKING_URI from $RAY_HEAD_IP and the
cluster's MLflow account, and stage the datasets before `ray start`.
"""

from __future__ import annotations

import base64
import copy
import os
import re
import shutil
import socket
import stat
import subprocess
import tempfile
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
    assert '"$MLFLOW" server --app-name basic-auth' in script
    assert '--host "$HOST_IP"' in script  # never 0.0.0.0: see the refusal test below
    assert "--artifacts-destination" in script and "s3://$BUCKET/mlflow-artifacts" in script
    # PostgreSQL by default (Debian's server on the head's socket); SQLite only when named.
    assert "BACKEND=${MLFLOW_BACKEND_STORE_URI:-postgresql+psycopg2:///mlflow" in script
    assert "nohup" in script and "mlflow.log" in script and "mlflow.pid" in script
    # The password reaches the server through its environment, never its command line.
    assert "MLFLOW_AUTH_ADMIN_PASSWORD=$SECRET" in script


def test_head_generates_credentials_and_a_database_before_mlflow_starts(prepared) -> None:
    start = prepared["head_start_ray_commands"]

    def at(script: str) -> int:
        return next(i for i, cmd in enumerate(start) if f"scripts/cluster/{script}" in cmd)

    mlflow = at("start_mlflow.sh")
    assert at("mlflow_credentials.sh") < mlflow and at("setup_postgres.sh") < mlflow
    assert at("mlflow_credentials.sh") < at("node_env.sh")  # so the env file holds the account
    assert at("schedule_backup.sh") < mlflow  # hourly pg_dump to S3
    assert "~/.raytrain-at/mlflow-credentials" in prepared["cluster_synced_files"]


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
    # Nor without the head's MLflow account (cluster_synced_files too).
    refused = _run(commands, env)
    assert refused.returncode != 0 and "no MLflow credentials" in refused.stderr
    assert "ray start" not in node["calls"].read_text()
    account = node["home"] / ".raytrain-at" / "mlflow-credentials"
    account.parent.mkdir(mode=0o700)
    account.write_text("MLFLOW_TRACKING_USERNAME=raytrain-at\n"
                       "MLFLOW_TRACKING_PASSWORD=SyncedFromHead0123456789\n")
    account.chmod(0o600)
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
    env_path = node["home"] / ".raytrain-at.env"
    env_file = env_path.read_text()
    assert "export MLFLOW_TRACKING_URI=http://10.1.2.3:5000" in env_file
    # The account reaches every job through the environment; the file is this user's alone.
    assert "export MLFLOW_TRACKING_USERNAME=raytrain-at" in env_file
    assert "export MLFLOW_TRACKING_PASSWORD=SyncedFromHead0123456789" in env_file
    assert stat.S_IMODE(env_path.stat().st_mode) == 0o600
    # The storage root every node sees: a multi-node run refuses to start without one.
    assert "export RAYTRAIN_AT_STORAGE=s3://my-bucket/ray-results" in env_file
    assert "export RAYTRAIN_AT_BUCKET=my-bucket" in env_file
    assert f"export AWS_DEFAULT_REGION={prepared['provider']['region']}" in env_file
    bashrc = (node["home"] / ".bashrc").read_text()
    assert bashrc.count(".raytrain-at.env") == 2 and len(bashrc.splitlines()) == 1  # once


def _get(url: str, host: str | None = None, auth: tuple[str, str] | None = None,
         body: bytes | None = None) -> tuple[int, str]:
    headers = {"Host": host} if host else {}
    if auth is not None:
        headers["Authorization"] = "Basic " + base64.b64encode(":".join(auth).encode()).decode()
    if body is not None:
        headers["Content-Type"] = "application/json"
    request = urllib.request.Request(url, data=body, headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=5) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as err:
        return err.code, ""


@pytest.fixture
def private_postgres():
    """A private PostgreSQL cluster (setup_postgres.sh --private) standing in for the head's
    system one, which a test must not touch. Not in tmp_path: its folders are 0700, and run as
    root the server runs as the `postgres` user."""
    folder = Path(tempfile.mkdtemp(prefix="raytrain-at-pg-", dir="/tmp"))
    folder.chmod(0o755)
    try:
        yield folder / "pg", free_local_port()
    finally:
        subprocess.run(["bash", str(SCRIPTS / "setup_postgres.sh"), "--stop", str(folder / "pg")],
                       capture_output=True, timeout=60)
        shutil.rmtree(folder, ignore_errors=True)


# Slow: initdb, MLflow's PostgreSQL migrations and the basic-auth app's start take ~40 s here.
@pytest.mark.slow
def test_head_start_commands_run_authenticated_mlflow_on_postgres(prepared, node,
                                                                  private_postgres) -> None:
    """The head's start commands as `ray up` runs them: the account is generated (0600), the
    database set up, the hourly dump scheduled, and MLflow's basic-auth app serves on the
    private IP and loopback: without the account every API call gets 401, with it the call
    works and lands in PostgreSQL."""
    ip = _private_ip()
    if ip is None:
        pytest.skip("this machine has no non-loopback IPv4 address")
    pg_folder, pg_port = private_postgres
    backend = f"postgresql+psycopg2:///mlflow?host={pg_folder}&port={pg_port}"
    crontab = node["tmp"] / "crontab"
    crontab_stub = node["tmp"] / "bin" / "crontab"  # never this machine's crontab
    crontab_stub.write_text(f'#!/usr/bin/env bash\nif [ "$1" = -l ]; then cat {crontab} '
                            f'2>/dev/null; else cat > {crontab}; fi\n')
    crontab_stub.chmod(0o755)
    env = dict(node["env"], MLFLOW_PORT=str(free_local_port()),
               MLFLOW_HOME=str(node["tmp"] / "mlflow"), MLFLOW_LOG=str(node["tmp"] / "mlflow.log"),
               MLFLOW_WORKERS="1", MLFLOW_BACKEND_STORE_URI=backend,
               MLFLOW_BACKUP_STORE=str(node["tmp"] / "backups"), MLFLOW_DISABLE_TELEMETRY="true")
    port = env["MLFLOW_PORT"]
    # The system cluster (sudo, systemd) becomes the private one; every other command as is.
    commands = [f"bash ~/raytrain-at/scripts/cluster/setup_postgres.sh --private {pg_folder} "
                f"--port {pg_port}" if "setup_postgres.sh" in cmd else cmd
                for cmd in prepared["head_start_ray_commands"]]
    stop = str(SCRIPTS / "start_mlflow.sh") + " --stop"
    try:
        assert _run([_first_setup_command(prepared, "my-bucket")], env).returncode == 0
        result = _run(commands, env, timeout=180)
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

        # The account: this user's alone, exported to jobs by the (0600) env file.
        account_file = node["home"] / ".raytrain-at" / "mlflow-credentials"
        assert stat.S_IMODE(account_file.stat().st_mode) == 0o600
        assert stat.S_IMODE(account_file.parent.stat().st_mode) == 0o700
        values = dict(line.split("=", 1) for line in account_file.read_text().split())
        account = (values["MLFLOW_TRACKING_USERNAME"], values["MLFLOW_TRACKING_PASSWORD"])
        assert len(account[1]) == 40
        env_path = node["home"] / ".raytrain-at.env"
        assert f"export MLFLOW_TRACKING_PASSWORD={account[1]}" in env_path.read_text()
        assert stat.S_IMODE(env_path.stat().st_mode) == 0o600
        # Nowhere else: not in the config, the server's command line (ps), its log.
        assert account[1] not in CLUSTER_YAML.read_text()
        assert account[1] not in Path(f"/proc/{pid}/cmdline").read_text()
        assert account[1] not in (node["tmp"] / "mlflow.log").read_text()
        assert account[1] not in node["calls"].read_text()

        # Both addresses answer /health (open); the API wants the account.
        assert _get(f"http://{ip}:{port}/health") == (200, "OK")
        assert _get(f"http://127.0.0.1:{port}/health") == (200, "OK")
        api = f"http://127.0.0.1:{port}/api/2.0/mlflow"
        search = f"{api}/experiments/search?max_results=1"
        create = f"{api}/experiments/create"
        assert _get(search)[0] == 401
        assert _get(create, body=b'{"name": "intruder"}')[0] == 401
        assert _get(search, auth=(account[0], "wrong-password"))[0] == 401
        assert _get(search, auth=account)[0] == 200
        assert _get(search, host=f"{ip}:{port}", auth=account)[0] == 200
        # The API refuses foreign Host headers (DNS-rebinding guard), account or not.
        assert _get(search, host="attacker.example", auth=account)[0] == 403
        assert _get(create, auth=account, body=b'{"name": "made-with-the-account"}')[0] == 200
        # ... and the write is in PostgreSQL, not in some SQLite file.
        libpq = backend.replace("postgresql+psycopg2:", "postgresql:")
        names = subprocess.run(["psql", "-XtAq", "-d", libpq, "-c", "select name from experiments"],
                               capture_output=True, text=True, timeout=30)
        assert names.returncode == 0, names.stderr
        assert "made-with-the-account" in names.stdout.split()
        assert "intruder" not in names.stdout.split()
        assert not list((node["tmp"] / "mlflow").glob("*.db*")) or all(
            p.name.startswith("basic_auth") for p in (node["tmp"] / "mlflow").glob("*.db*"))
        # The hourly dump, in this user's crontab (the stub's).
        assert re.search(r"^17 \* \* \* \* bash .*/scripts/cluster/backup_mlflow\.sh",
                         crontab.read_text(), re.M)

        listening = subprocess.run(["ss", "-Hltn", f"sport = :{port}"], capture_output=True,
                                   text=True).stdout
        bound = sorted(line.split()[3] for line in listening.splitlines())
        assert bound == sorted([f"127.0.0.1:{port}", f"{ip}:{port}"]), bound

        # Idempotent: a second start leaves the running server (and the account) alone.
        again = _run(["bash ~/raytrain-at/scripts/cluster/start_mlflow.sh"], env)
        assert again.returncode == 0 and "already running" in again.stdout
        assert int((node["tmp"] / "mlflow" / "mlflow.pid").read_text()) == pid
        _run(["bash ~/raytrain-at/scripts/cluster/mlflow_credentials.sh"], env)
        assert account_file.read_text().split()[1] == f"MLFLOW_TRACKING_PASSWORD={account[1]}"
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


# ------------------------------------------------------------------ NCCL and EFA on GPU nodes
def _gpu_probes(node, gpu: bool, efa: bool) -> dict:
    """The node's env with stand-ins for nvidia-smi, EFA's fi_info and the image's aws-ofi-nccl."""
    tmp = node["tmp"]
    probes = tmp / "probes"
    (probes / "ofi-nccl" / "lib").mkdir(parents=True, exist_ok=True)
    (probes / "ofi-nccl" / "lib" / "libnccl-net-ofi.so").write_text("")
    smi, fi_info = probes / "nvidia-smi", probes / "fi_info"
    smi.write_text("#!/bin/sh\necho 'GPU 0: NVIDIA A100-SXM4-40GB'\n" if gpu else
                   "#!/bin/sh\necho 'NVIDIA-SMI has failed' >&2; exit 9\n")
    fi_info.write_text('#!/bin/sh\n[ "$1 $2 $3 $4" = "-p efa -t FI_EP_RDM" ] && echo "provider: '
                       'efa"\n' if efa else "#!/bin/sh\necho 'fi_getinfo: -61 (No data)'; exit 1\n")
    for probe in (smi, fi_info):
        probe.chmod(0o755)
    return dict(node["env"], RAYTRAIN_AT_NVIDIA_SMI=str(smi), RAYTRAIN_AT_FI_INFO=str(fi_info),
                RAYTRAIN_AT_OFI_NCCL=str(probes / "ofi-nccl"), RAYTRAIN_AT_EFA_LIB="/efa-lib")


NCCL_NAMES = ("NCCL_DEBUG", "NCCL_SOCKET_IFNAME", "FI_PROVIDER", "FI_EFA_USE_DEVICE_RDMA",
              "NCCL_NET_PLUGIN", "LD_LIBRARY_PATH")


def _node_settings(env: dict, command: str) -> dict[str, str]:
    """Run one node_env.sh command, then what a `ray start` after it (a bash that sources the env
    file) sees of the NCCL/EFA variables."""
    result = _run([command], env)
    assert result.returncode == 0, result.stderr
    printed = _run(["source ~/.raytrain-at.env; source ~/.raytrain-at.env; "
                    + "; ".join(f'echo "{n}=${{{n}:-}}"' for n in NCCL_NAMES)], env)
    return {k: v for k, v in (line.split("=", 1) for line in printed.stdout.splitlines()) if v}


def test_gpu_nodes_get_nccl_settings_and_efa_nodes_the_efa_ones(prepared, node) -> None:
    command = _first_setup_command(prepared, "my-bucket")
    efa = _node_settings(_gpu_probes(node, gpu=True, efa=True), command)
    ofi = f"{node['tmp']}/probes/ofi-nccl/lib"
    assert efa == {"NCCL_DEBUG": "WARN", "NCCL_SOCKET_IFNAME": "^lo,docker", "FI_PROVIDER": "efa",
                   "FI_EFA_USE_DEVICE_RDMA": "1", "NCCL_NET_PLUGIN": "ofi",
                   "LD_LIBRARY_PATH": f"{ofi}:/efa-lib"}  # sourced twice, listed once
    # A GPU node launched without EFA interfaces (cluster.yaml's default): NCCL's, no EFA.
    plain = _node_settings(_gpu_probes(node, gpu=True, efa=False), command)
    assert plain == {"NCCL_DEBUG": "WARN", "NCCL_SOCKET_IFNAME": "^lo,docker"}
    # The head (CPU, nvidia-smi fails or is absent): none, even where EFA would answer.
    assert _node_settings(_gpu_probes(node, gpu=False, efa=True), command) == {}


def test_local_twin_gets_no_nccl_or_efa_settings(node) -> None:
    twin = yaml.safe_load((ROOT / "cluster_local.yaml").read_text())
    env = dict(node["env"], RAYTRAIN_AT_NVIDIA_SMI=str(node["tmp"] / "no-nvidia-smi"))
    assert _node_settings(env, twin["setup_commands"][0]) == {}


def _efa_block() -> dict:
    """The EFA node_config block docs/cluster.md tells users to add, as YAML."""
    docs = (ROOT / "docs" / "cluster.md").read_text()
    section = docs[docs.index("### Jobs larger than one node: EFA"):]
    block = section[section.index("```yaml\n") + 8:]
    return yaml.safe_load(block[:block.index("```")])


def test_documented_efa_interfaces_pass_rays_checks(prepared) -> None:
    """Ray's schema accepts the documented EFA block on a p4d type, and the AWS launcher's own
    step turns its interfaces into the subnets and groups it launches with."""
    from ray.autoscaler._private.aws.config import (
        _configure_subnets_and_groups_from_network_interfaces)
    from ray.autoscaler._private.util import prepare_config, validate_config

    block = _efa_block()
    interfaces = block["NetworkInterfaces"]
    assert [i["NetworkCardIndex"] for i in interfaces] == [0, 1, 2, 3]  # p4d: 4 EFA cards
    assert {i["InterfaceType"] for i in interfaces} == {"efa"}
    assert [i["DeviceIndex"] for i in interfaces] == [0, 1, 1, 1]
    raw = _raw()
    node_type = raw["available_node_types"]["gpu.a100.ondemand"]
    assert node_type["node_config"]["InstanceType"] == "p4d.24xlarge"
    node_type["node_config"].update(block)
    validate_config(prepare_config(raw))
    launched = _configure_subnets_and_groups_from_network_interfaces(node_type["node_config"])
    assert launched["SubnetIds"] == ["subnet-EDIT"] * 4
    assert block["Placement"]["GroupName"] == "raytrain-at"
