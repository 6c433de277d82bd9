"""GPU or CPU for an evaluation: decided once, on the driver, before any shard is submitted.

On an autoscaling cluster (``cluster.yaml``: a head without GPUs, GPU worker types at
``min_workers: 0``) no GPU is up when an evaluation starts, so ``ray.cluster_resources()`` alone
would send AutoAttack to the CPUs while the autoscaler starts a GPU node anyway. What the cluster
*can* start is in its node types, which Ray 2.60 keeps in two places:

1. the GCS's cluster config (``ray._private.state.state.get_cluster_config()``, the
   ``ClusterConfig`` proto): what Ray Train V2 itself reads to tell whether a worker group can
   ever fit (``WorkerGroup._check_cluster_resources_and_raise_if_insufficient``). An autoscaler
   that calls the GCS's ``ReportClusterConfig`` fills it; nothing in the open-source wheel does
   (``ray up``'s autoscaler, v1 or v2, never calls it), so it is read first but is usually empty.
2. the bootstrap config that ``ray up`` writes on the head, ``~/ray_bootstrap_config.yaml``
   (JSON, with ``available_node_types.<name>.resources`` filled in by the provider; the
   autoscaler's monitor runs on it and Tune's ``_is_ray_cluster`` looks for it). Drivers of
   ``ray job submit`` run on the head, so they find it there.

Ray has no public API for node types; both readers are small and fail towards "unknown", which
with ``--address`` asks the user for ``--gpu`` or ``--no-gpu`` rather than guessing.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from raytrain_at.errors import UserError

log = logging.getLogger(__name__)

BOOTSTRAP_CONFIG = "~/ray_bootstrap_config.yaml"


@dataclass(frozen=True)
class NodeType:
    """One node type a cluster may run.

    Attributes:
        name: the type's name (``gpu.a100.spot``).
        gpus: GPUs one node of the type has.
        max_nodes: how many the autoscaler may start; None: no limit.
        cpus: CPUs one node of the type has; None when not given.
    """

    name: str
    gpus: float
    max_nodes: int | None
    cpus: float | None = None

    @property
    def can_start_gpus(self) -> bool:
        return self.gpus > 0 and (self.max_nodes is None or self.max_nodes > 0)


def node_types_from_cluster_config(config: Any) -> list[NodeType]:
    """The node types of a GCS ``ClusterConfig`` proto (``max_count`` -1 is no limit)."""
    return [NodeType(group.name, float(group.resources.get("GPU", 0)),
                     None if group.max_count < 0 else int(group.max_count),
                     cpus=float(group.resources["CPU"]) if "CPU" in group.resources else None)
            for group in config.node_group_configs]


def node_types_from_bootstrap(config: Mapping[str, Any]) -> list[NodeType]:
    """The node types of a cluster launcher config (``ray up``'s bootstrap file).

    A worker type without ``max_workers`` takes the cluster's (as Ray's launcher fills it in); a
    cluster ``max_workers`` of 0 starts no worker. The head type runs already: it counts as one
    node whatever its limits say.
    """
    types = config.get("available_node_types") or {}
    head = config.get("head_node_type")
    cluster_max = config.get("max_workers")
    found = []
    for name, spec in types.items():
        resources = (spec or {}).get("resources") or {}
        if name == head:
            limit: int | None = 1
        else:
            limit = (spec or {}).get("max_workers", cluster_max)
            if cluster_max is not None and limit is not None:
                limit = min(int(limit), int(cluster_max))
        found.append(NodeType(str(name), float(resources.get("GPU", 0)),
                              None if limit is None else int(limit),
                              cpus=float(resources["CPU"]) if "CPU" in resources else None))
    return found


def read_gcs_node_types() -> list[NodeType] | None:
    """The node types in the connected cluster's GCS config, or None when it holds none."""
    import ray._private.state
    import ray.exceptions

    try:
        config = ray._private.state.state.get_cluster_config()
    except ray.exceptions.RaySystemError as exc:
        # A Ray Client driver has no GCS accessor in this process: "unknown" (the bootstrap
        # file or the flag decides), never a guess.
        log.debug("no cluster config from the GCS: %s", exc)
        return None
    if config is None or not config.node_group_configs:
        return None
    return node_types_from_cluster_config(config)


def read_bootstrap_node_types(path: str | Path = BOOTSTRAP_CONFIG) -> list[NodeType] | None:
    """The node types of ``ray up``'s bootstrap file on this machine, or None without one."""
    file = Path(path).expanduser()
    if not file.is_file():
        return None
    try:
        text = file.read_text()
        # ``ray up`` writes it as JSON (its name notwithstanding). Read as JSON only: the
        # project's YAML goes through config_loader, and this file is not one of its kinds.
        config = json.loads(text)
    except (OSError, ValueError) as exc:
        log.warning("cannot read the cluster's node types from %s (%s)", file, exc)
        return None
    if not isinstance(config, dict) or not config.get("available_node_types"):
        return None
    return node_types_from_bootstrap(config)


def choose_gpu(requested: bool | None, *, address: str | None, gpus_up: float,
               node_types: Sequence[NodeType] | None) -> bool:
    """Whether the evaluation's shards each ask for a GPU.

    Args:
        requested: ``--gpu`` (True), ``--no-gpu`` (False) or neither (None).
        address: the cluster address given (None: this machine only).
        gpus_up: GPUs the cluster (or this machine) has now.
        node_types: the cluster's node types, None when unknown.

    Raises:
        UserError: ``address`` is given, neither flag, no GPU is up and the node types are
            unknown: whether GPUs can come is a guess either way, so the user says.
    """
    if requested is not None:
        return requested
    if gpus_up > 0:
        return True
    if address is None:
        return False
    if node_types is not None:
        return any(t.can_start_gpus for t in node_types)
    raise UserError(f"--address {address}: no GPU is up and the cluster's node types are "
                    f"unknown (no GCS cluster config, no {BOOTSTRAP_CONFIG}): pass --gpu to "
                    "wait for GPU nodes or --no-gpu to evaluate on CPUs")


def evaluation_uses_gpu(requested: bool | None, address: str | None) -> bool:
    """:func:`choose_gpu` for this process: with ``address``, from the connected cluster (Ray must
    be initialised) and its node types; without, from this machine's GPUs."""
    if requested is not None:
        return requested
    if address is None:
        import torch

        return torch.cuda.is_available()
    import ray

    gpus_up = float(ray.cluster_resources().get("GPU", 0))
    types = None
    if gpus_up == 0:
        types = read_gcs_node_types()
        if types is None:
            types = read_bootstrap_node_types()
    gpu = choose_gpu(None, address=address, gpus_up=gpus_up, node_types=types)
    if gpus_up == 0:
        log.info("no GPU is up; node types %s: evaluating on %s",
                 ", ".join(f"{t.name} ({t.gpus:g} GPUs)" for t in types or []),
                 "GPUs (the autoscaler starts them)" if gpu else "CPUs")
    return gpu
