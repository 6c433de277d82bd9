"""How a run's Ray Train workers are placed: ``scaling.placement`` -> Ray's placement strategy.

Ray Train's default, PACK, is soft: when the autoscaler has not yet started a node that holds
the whole group, Ray may place some workers on one node and the rest on another, and an 8-GPU
job that could run on one node's NVLink then runs its collectives over the network for its
whole life. STRICT_PACK waits for one node that holds every worker instead. ``auto`` (the
default) asks for STRICT_PACK when a GPU job fits one node of the cluster (a node up now or a
node type the autoscaler can start, read as :mod:`raytrain_at.evaluation.device_choice` reads
them), and keeps PACK otherwise: CPU runs, jobs larger than any node, and clusters whose node
types are unknown (where STRICT_PACK could wait for a node that never comes).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Literal

from raytrain_at.errors import UserError
from raytrain_at.evaluation.device_choice import (NodeType, read_bootstrap_node_types,
                                                  read_gcs_node_types)

log = logging.getLogger(__name__)

Placement = Literal["auto", "pack", "strict_pack", "spread"]
RAY_STRATEGY = {"pack": "PACK", "strict_pack": "STRICT_PACK", "spread": "SPREAD"}


def fits_one_node(node: NodeType, num_workers: int, use_gpu: bool,
                  cpus_per_worker: float) -> bool:
    """Whether one node of ``node``'s type holds every worker (one GPU each on GPU runs)."""
    if node.max_nodes is not None and node.max_nodes <= 0:
        return False
    if use_gpu and node.gpus < num_workers:
        return False
    return node.cpus is None or node.cpus >= num_workers * cpus_per_worker


def placement_strategy(placement: Placement, *, num_workers: int, use_gpu: bool,
                       cpus_per_worker: float, nodes: Sequence[NodeType] | None) -> str:
    """Ray's ``placement_strategy`` for ``scaling.placement``.

    Args:
        placement: the config value (``auto``, ``pack``, ``strict_pack`` or ``spread``).
        num_workers, use_gpu, cpus_per_worker: the run's ``scaling`` section.
        nodes: the nodes up now and the node types the cluster can start; None when unknown.

    Raises:
        UserError: ``strict_pack`` for a job that no known node can hold (it would wait forever).
    """
    if placement == "auto":
        if use_gpu and nodes and any(fits_one_node(n, num_workers, use_gpu, cpus_per_worker)
                                     for n in nodes):
            return "STRICT_PACK"
        return "PACK"
    if placement == "strict_pack" and nodes and not any(
            fits_one_node(n, num_workers, use_gpu, cpus_per_worker) for n in nodes):
        largest = max(nodes, key=lambda n: (n.gpus, n.cpus or 0))
        raise UserError(f"scaling.placement strict_pack: {num_workers} workers "
                        f"({'1 GPU, ' if use_gpu else ''}{cpus_per_worker:g} CPU each) fit no "
                        f"node of this cluster (largest: {largest.name}, {largest.gpus:g} GPUs, "
                        f"{largest.cpus if largest.cpus is not None else '?'} CPUs): use pack")
    return RAY_STRATEGY[placement]


def nodes_from_ray(nodes: Sequence[dict]) -> list[NodeType]:
    """The alive nodes of ``ray.nodes()`` as one-node types."""
    return [NodeType(str(node.get("NodeID", "node")), float(node["Resources"].get("GPU", 0)),
                     1, cpus=float(node["Resources"].get("CPU", 0)))
            for node in nodes if node.get("Alive") and node.get("Resources")]


def cluster_nodes() -> list[NodeType] | None:
    """What this process can know of the cluster's nodes: the nodes up now (when Ray is
    initialised) and the node types the autoscaler can start; None when neither is known."""
    import ray

    found: list[NodeType] = []
    types = None
    if ray.is_initialized():
        found += nodes_from_ray(ray.nodes())
        types = read_gcs_node_types()
    if types is None:
        types = read_bootstrap_node_types()
    found += types or []
    return found or None
