"""scaling.placement: a GPU job that fits one node of the cluster is placed STRICT_PACK (its
collectives stay on the node's NVLink), everything else keeps Ray's soft PACK; a bad value or a
strict_pack that no node can hold is one line; the quickstart's 2-worker CPU group still
schedules under STRICT_PACK on one local Ray node."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import yaml

from raytrain_at.config import load_config
from raytrain_at.errors import UserError
from raytrain_at.evaluation.device_choice import NodeType, node_types_from_bootstrap
from raytrain_at.training.placement import nodes_from_ray, placement_strategy

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def cluster_types() -> list[NodeType]:
    """cluster.yaml's node types as ``ray up``'s bootstrap file carries them."""
    from ray.autoscaler._private.util import prepare_config

    raw = yaml.safe_load((ROOT / "cluster.yaml").read_text())
    return node_types_from_bootstrap(prepare_config(copy.deepcopy(raw)))


def _strategy(nodes, placement="auto", workers=8, gpu=True, cpus=8.0) -> str:
    return placement_strategy(placement, num_workers=workers, use_gpu=gpu, cpus_per_worker=cpus,
                              nodes=nodes)


def test_auto_packs_a_one_node_gpu_job_strictly_on_the_cluster(cluster_types) -> None:
    assert {t.gpus for t in cluster_types} == {0.0, 8.0}
    assert _strategy(cluster_types, workers=8) == "STRICT_PACK"  # one p4d / p5 holds it
    assert _strategy(cluster_types, workers=1) == "STRICT_PACK"
    assert _strategy(cluster_types, workers=16) == "PACK"  # two nodes: soft packing
    # 8 x 16 CPUs fit a p5 (192) but not a p4d (96): still one node of some type.
    assert _strategy(cluster_types, workers=8, cpus=16) == "STRICT_PACK"
    assert _strategy(cluster_types, workers=8, cpus=25) == "PACK"  # 200 CPUs: no node


def test_auto_keeps_pack_for_cpu_runs_and_unknown_clusters(cluster_types) -> None:
    assert _strategy(cluster_types, gpu=False, workers=2, cpus=1) == "PACK"
    assert _strategy(None) == "PACK"  # node types unknown: never wait for a node that may not come
    assert _strategy([]) == "PACK"
    # A GPU type the autoscaler may not start (max_workers 0) holds nothing.
    assert _strategy([NodeType("gpu", 8, 0, cpus=96)]) == "PACK"
    # A node up now (ray.nodes()) counts as well as a node type.
    up = nodes_from_ray([{"NodeID": "n1", "Alive": True, "Resources": {"CPU": 96, "GPU": 8}},
                         {"NodeID": "gone", "Alive": False, "Resources": {"CPU": 9, "GPU": 99}}])
    assert [(n.name, n.gpus, n.cpus) for n in up] == [("n1", 8.0, 96.0)]
    assert _strategy(up, workers=8) == "STRICT_PACK" and _strategy(up, workers=9) == "PACK"


def test_explicit_placements(cluster_types) -> None:
    assert _strategy(cluster_types, "pack") == "PACK"
    assert _strategy(cluster_types, "spread") == "SPREAD"
    assert _strategy(cluster_types, "strict_pack") == "STRICT_PACK"
    assert _strategy(None, "strict_pack", workers=64) == "STRICT_PACK"  # unknown: as asked
    with pytest.raises(UserError, match=r"^scaling.placement strict_pack: 16 workers .*fit no "
                                        r"node of this cluster .*gpu.h100.*: use pack$"):
        _strategy(cluster_types, "strict_pack", workers=16)


def test_bad_placement_value_is_one_line() -> None:
    with pytest.raises(UserError) as err:
        load_config("quickstart", ["scaling.placement=tight"])
    assert "scaling.placement" in str(err.value) and "\n" not in str(err.value)
    assert load_config("quickstart").scaling.placement == "auto"


def test_scaling_config_reads_the_clusters_bootstrap_file(tmp_path, monkeypatch,
                                                          cluster_types) -> None:
    """On the head, ``ray up``'s bootstrap file says what nodes can come: an 8-GPU run there
    asks Ray for STRICT_PACK; the quickstart (CPU) keeps PACK."""
    from ray.autoscaler._private.util import prepare_config

    from raytrain_at.training.launch import scaling_config

    raw = yaml.safe_load((ROOT / "cluster.yaml").read_text())
    (tmp_path / "ray_bootstrap_config.yaml").write_text(json.dumps(prepare_config(raw)))
    monkeypatch.setenv("HOME", str(tmp_path))
    gpu = load_config("quickstart", ["scaling.use_gpu=true", "scaling.num_workers=8",
                                     "schedule.global_batch_size=64"])
    assert scaling_config(gpu).placement_strategy == "STRICT_PACK"
    cpu = load_config("quickstart")
    assert scaling_config(cpu).placement_strategy == "PACK"
    pack = load_config("quickstart", ["scaling.use_gpu=true", "scaling.num_workers=8",
                                      "schedule.global_batch_size=64", "scaling.placement=pack"])
    assert scaling_config(pack).placement_strategy == "PACK"
    with pytest.raises(UserError, match="fit no node"):
        scaling_config(load_config("quickstart", [
            "scaling.use_gpu=true", "scaling.num_workers=16", "schedule.global_batch_size=64",
            "scaling.placement=strict_pack"]))


# Slow: starting Ray takes 8-16 s here. auto keeps PACK for CPU runs, so the quickstart itself
# never asks for STRICT_PACK; this is the forced case.
@pytest.mark.slow
def test_quickstart_workers_schedule_strictly_packed_on_local_ray() -> None:
    """The quickstart's two 1-CPU workers, STRICT_PACK, on a 2-CPU local Ray: Ray places the
    group (what Ray Train's worker group waits for) within seconds."""
    import ray
    from ray.util.placement_group import placement_group, remove_placement_group

    from raytrain_at.training.launch import scaling_config

    scaling = scaling_config(load_config("quickstart", ["scaling.placement=strict_pack"]))
    assert scaling.placement_strategy == "STRICT_PACK"
    bundles = [dict(scaling._resources_per_worker_not_none)] * scaling.num_workers
    assert bundles == [{"CPU": 1.0}, {"CPU": 1.0}]
    started = not ray.is_initialized()
    if started:
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        group = placement_group(bundles, strategy=scaling.placement_strategy)
        ready, _ = ray.wait([group.ready()], timeout=60)
        assert ready, "the strictly packed group of the quickstart did not schedule"
        table = ray.util.placement_group_table(group)
        assert table["strategy"] == "STRICT_PACK"
        assert len(set(table["bundles_to_node_id"].values())) == 1
        remove_placement_group(group)
    finally:
        if started:
            ray.shutdown()
