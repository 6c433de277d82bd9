"""Which samples each of ``world_size`` workers reads in an epoch.

Training: one seeded permutation of the whole file per epoch (seed + epoch), dealt round-robin to
the ranks, so shards are disjoint, together cover the epoch, and change every epoch. Every rank
gets ``n // world_size`` samples (the ``n mod world_size`` left over are a different few each
epoch) so all ranks run the same number of steps: collective ops would hang otherwise.

Evaluation: contiguous, order-preserving blocks (sizes differ by at most one) that together cover
every sample exactly once; results merge back by sample index.

FFCV's own ``distributed=True`` needs an initialised process group and takes rank and size from
it; these orders take them explicitly, so the same code shards under Ray Train, in a plain
process, and in tests. FFCV only accepts a custom order as an *instance* that it calls with the
loader, hence the ``__call__``.
"""

from __future__ import annotations

import numpy as np
from ffcv.traversal_order.base import TraversalOrder


def train_shard(indices: np.ndarray, rank: int, world_size: int, seed: int, epoch: int
                ) -> np.ndarray:
    """The indices rank ``rank`` reads in ``epoch`` (shuffled, equal-sized, disjoint)."""
    _check_rank(rank, world_size)
    permuted = np.random.default_rng(seed + epoch).permutation(np.asarray(indices))
    per_rank = len(permuted) // world_size
    return permuted[rank:per_rank * world_size:world_size]


def eval_shard(indices: np.ndarray, rank: int, world_size: int) -> np.ndarray:
    """A contiguous block of ``indices`` for rank ``rank`` (all blocks cover ``indices`` once)."""
    _check_rank(rank, world_size)
    return np.array_split(np.asarray(indices), world_size)[rank]


def _check_rank(rank: int, world_size: int) -> None:
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is not in [0, world_size={world_size})")


class ShardedOrder(TraversalOrder):
    """FFCV traversal order for one rank: :func:`train_shard` (shuffle) or :func:`eval_shard`."""

    def __init__(self, rank: int, world_size: int, shuffle: bool) -> None:  # noqa: D107
        _check_rank(rank, world_size)
        self.rank, self.world_size, self.shuffle = rank, world_size, shuffle

    def __call__(self, loader) -> ShardedOrder:
        TraversalOrder.__init__(self, loader)
        if self.seed is None:
            self.seed = 0
        return self

    def sample_order(self, epoch: int):
        if self.shuffle:
            return train_shard(self.indices, self.rank, self.world_size, self.seed, epoch)
        return eval_shard(self.indices, self.rank, self.world_size)
