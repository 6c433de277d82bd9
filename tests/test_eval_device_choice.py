"""Evaluation's GPU-or-CPU choice on a cluster whose GPU nodes are not up yet.

The node types come from the repository's own ``cluster.yaml`` as Ray's launcher fills it in
(``prepare_config``) and writes it on the head (``~/ray_bootstrap_config.yaml``, JSON), or from a
GCS ``ClusterConfig`` proto. The Ray test starts a CPU-only local Ray and reads what the
submitted shards ask for from the autoscaler's own input, the GCS's pending resource requests.
"""

from __future__ import annotations

import copy
import json
import time
from pathlib import Path

import pytest
import yaml

from raytrain_at.errors import UserError
from raytrain_at.evaluation.device_choice import (NodeType, choose_gpu, evaluation_uses_gpu,
                                                  node_types_from_bootstrap,
                                                  node_types_from_cluster_config,
                                                  read_bootstrap_node_types)
from raytrain_at.evaluation.runner import shard_resources

ROOT = Path(__file__).resolve().parents[1]
GPU_TYPES = {"gpu.a100.spot", "gpu.a100.ondemand", "gpu.h100.spot", "gpu.h100.ondemand"}


@pytest.fixture(scope="module")
def launcher_config() -> dict:
    """cluster.yaml as `ray up` puts it on the head: Ray's defaults filled in."""
    from ray.autoscaler._private.util import prepare_config

    return prepare_config(yaml.safe_load((ROOT / "cluster.yaml").read_text()))


def _home_with_bootstrap(tmp_path: Path, monkeypatch, config: dict | None) -> Path:
    home = tmp_path / "home"
    home.mkdir()
    if config is not None:  # `ray up` writes the bootstrap config as JSON
        (home / "ray_bootstrap_config.yaml").write_text(json.dumps(config))
    monkeypatch.setenv("HOME", str(home))
    return home


def _startable(types: list[NodeType]) -> set[str]:
    return {t.name for t in types if t.can_start_gpus}


def test_cluster_yaml_bootstrap_lists_gpu_types_that_can_start(launcher_config, tmp_path,
                                                               monkeypatch):
    _home_with_bootstrap(tmp_path, monkeypatch, launcher_config)
    types = read_bootstrap_node_types()
    assert types is not None and _startable(types) == GPU_TYPES
    head = next(t for t in types if t.name == "head.cpu")
    assert head.gpus == 0
    assert choose_gpu(None, address="auto", gpus_up=0, node_types=types) is True


def test_gpu_types_that_cannot_start_leave_the_cpu(launcher_config):
    no_gpu_nodes = copy.deepcopy(launcher_config)
    for name in GPU_TYPES:
        no_gpu_nodes["available_node_types"][name]["max_workers"] = 0
    types = node_types_from_bootstrap(no_gpu_nodes)
    assert _startable(types) == set()
    assert choose_gpu(None, address="auto", gpus_up=0, node_types=types) is False
    no_workers = dict(copy.deepcopy(launcher_config), max_workers=0)
    assert not choose_gpu(None, address="auto", gpus_up=0,
                          node_types=node_types_from_bootstrap(no_workers))


def test_gcs_cluster_config_node_groups():
    from ray.core.generated import autoscaler_pb2

    config = autoscaler_pb2.ClusterConfig()
    cpu = config.node_group_configs.add(name="cpu", max_count=-1)
    cpu.resources["CPU"] = 16
    gpu = config.node_group_configs.add(name="gpu", max_count=0)
    gpu.resources.update({"CPU": 96, "GPU": 8})
    assert not choose_gpu(None, address="auto", gpus_up=0,
                          node_types=node_types_from_cluster_config(config))
    gpu.max_count = -1  # no limit
    types = node_types_from_cluster_config(config)
    assert _startable(types) == {"gpu"}
    assert choose_gpu(None, address="auto", gpus_up=0, node_types=types)


def test_flags_win_and_gpus_up_need_no_node_types():
    gpu_types = [NodeType("gpu", 8.0, 4)]
    assert choose_gpu(False, address="auto", gpus_up=8, node_types=gpu_types) is False
    assert choose_gpu(True, address="auto", gpus_up=0, node_types=None) is True
    assert choose_gpu(None, address="auto", gpus_up=8, node_types=None) is True
    # This machine only: no GPU, nothing to wait for.
    assert choose_gpu(None, address=None, gpus_up=0, node_types=None) is False
    # --no-gpu asks Ray for CPUs only, whatever the node types say.
    assert shard_resources(choose_gpu(False, address="auto", gpus_up=0, node_types=gpu_types),
                           4, {"CPU": 8.0}) == (2, 0)
    assert shard_resources(True, 4, {"CPU": 8.0}) == (1, 1)


def test_address_without_node_types_or_gpus_asks_for_the_flag():
    with pytest.raises(UserError) as caught:
        choose_gpu(None, address="10.0.0.5:6379", gpus_up=0, node_types=None)
    text = str(caught.value)
    assert "\n" not in text and "--gpu" in text and "--no-gpu" in text
    assert "10.0.0.5:6379" in text


def test_a_flag_decides_without_asking_ray():
    import ray

    assert evaluation_uses_gpu(False, "auto") is False
    assert evaluation_uses_gpu(True, "auto") is True
    assert not ray.is_initialized()


# ---------------------------------------------------------------- with a real (CPU) Ray
@pytest.fixture(scope="module")
def cpu_ray():
    """A local Ray with one CPU and no GPU; yields its GCS address (what --address names)."""
    import ray

    ray.shutdown()
    ray.init(address="local", num_cpus=1, num_gpus=0, include_dashboard=False,
             log_to_driver=False)
    yield ray.get_runtime_context().gcs_address
    ray.shutdown()


def _pending_bundles(address: str, expected: int, timeout_s: float = 20.0
                     ) -> list[tuple[dict, int]]:
    """The resource bundles the autoscaler is asked for (the GCS's pending requests), once they
    count ``expected`` requests or the time is up: the GCS reports tasks one by one, so a busy
    machine can show the first shard's request before the second's."""
    from ray._raylet import GcsClient
    from ray.autoscaler.v2.sdk import get_cluster_resource_state

    client = GcsClient(address=address)
    deadline = time.monotonic() + timeout_s
    while True:
        state = get_cluster_resource_state(client)
        found = [(dict(r.request.resources_bundle), r.count)
                 for r in state.pending_resource_requests]
        if sum(count for _, count in found) >= expected or time.monotonic() > deadline:
            return found
        time.sleep(0.2)


def _job(tmp_path: Path):
    from raytrain_at.evaluation.runner import EvalJob
    from raytrain_at.evaluation.threats import ThreatModel

    # Never run (no GPU comes on this machine): a fixed state key needs no data file.
    return EvalJob(model_ref="unused", weights_sha256="0" * 64, data_path="unused.beton",
                   ids=tuple(range(8)), resolution=32, crop_pct=1.0,
                   threats=(ThreatModel("linf", 4 / 255),), version="apgdt", seed=0,
                   batch_size=4, num_classes=10, state_root=str(tmp_path / "state"),
                   state_key="device-choice")


def _model_file(tmp_path: Path) -> str:
    """An untrained 16 px test_resnet model file (the choice never looks at the weights)."""
    from raytrain_at.models.model_files import ModelSpec, save_model_file

    spec = ModelSpec(name="test_resnet", num_classes=10, resolution=16, crop_pct=1.0)
    path = tmp_path / "model.safetensors"
    save_model_file(path, spec.build(), spec)
    return str(path)


@pytest.mark.slow
def test_evaluation_asks_ray_for_gpus_the_cluster_can_start(cpu_ray, launcher_config, eval_home,
                                                            tmp_path, monkeypatch, capsys):
    """No GPU is up; cluster.yaml's GPU types (bootstrap file, then the GCS config) make the
    shards ask for a GPU each; without either, --address gets the one line and nothing runs."""
    import ray
    from ray.core.generated import autoscaler_pb2
    from ray.experimental.internal_kv import _internal_kv_del, _internal_kv_put

    from raytrain_at.cli import main
    from raytrain_at.evaluation.evaluate import Evaluation, evaluation_request
    from raytrain_at.evaluation.runner import deal_units, pending_units, submit_shards

    assert ray.cluster_resources().get("GPU", 0) == 0
    # 1. ray up's bootstrap file on this "head".
    _home_with_bootstrap(tmp_path, monkeypatch, launcher_config)
    job = _job(tmp_path)
    shares = deal_units(pending_units(job), 2)
    refs = submit_shards(job, shares, evaluation_uses_gpu(None, cpu_ray))
    try:
        assert _pending_bundles(cpu_ray, len(shares)) == [({"CPU": 1.0, "GPU": 1.0},
                                                            len(shares))]
    finally:
        for ref in refs:
            ray.cancel(ref, force=True)
    # The evaluation command's own choice, the one its attacks, sweeps and corruptions use.
    request = evaluation_request(model_ref=_model_file(tmp_path), data="digits",
                                 address=cpu_ray, state_root=str(tmp_path / "eval-state"),
                                 corruptions=True, eps_sweep=[2 / 255])
    assert Evaluation(request).use_gpu is True
    # 2. The GCS's cluster config (what an autoscaler reports; Ray Train V2 reads it too).
    monkeypatch.setenv("HOME", str(tmp_path / "nowhere"))
    config = autoscaler_pb2.ClusterConfig()
    group = config.node_group_configs.add(name="gpu.h100", max_count=2)
    group.resources.update({"CPU": 192, "GPU": 8})
    namespace = ray._raylet.GCS_AUTOSCALER_STATE_NAMESPACE
    key = ray._raylet.GCS_AUTOSCALER_CLUSTER_CONFIG_KEY
    _internal_kv_put(key, config.SerializeToString(), namespace=namespace)
    try:
        assert evaluation_uses_gpu(None, cpu_ray) is True
    finally:
        _internal_kv_del(key, namespace=namespace)
    # 3. Neither: the CLI's one line, exit 2, no result and no state written.
    out, state = tmp_path / "out.json", tmp_path / "cli-state"
    with pytest.raises(SystemExit) as stopped:
        main(["evaluate", "unused.safetensors", "--data", "digits", "--address", cpu_ray,
              "--state-dir", str(state), "--out", str(out)])
    assert stopped.value.code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and "--gpu" in lines[0] and "--no-gpu" in lines[0], lines
    assert not out.exists() and not state.exists()
