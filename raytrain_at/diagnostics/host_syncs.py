"""Count the operations that make the host wait for the device (on any device, CPU included).

A GPU step runs fast when the Python host only queues kernels and never waits for their results.
The host waits when an operation needs a device value on the host: ``.item()``, ``float(t)``,
``bool(t)`` / ``if t:`` (all ``aten._local_scalar_dense``), ``nonzero``, boolean-mask indexing
(the output size depends on the mask), ``masked_select``, ``unique``, ``repeat_interleave``
without an output size, ``equal``. These are the same operators on CPU, so counting them with a
dispatch mode on CPU tells how often a CUDA run of the same code would synchronise -- which is how
the tests check "no host synchronisation inside the attack loop" without a GPU.

Device-to-host copies (``tensor.cpu()``) are not counted: on a CPU-only run there is no copy to see.
"""

from __future__ import annotations

import os
import traceback
from collections import Counter
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode

# Operators whose result size or value the host must read back before it can go on.
_ALWAYS_SYNC = {
    "aten::_local_scalar_dense",  # .item(), float(), int(), bool() of a tensor
    "aten::nonzero",
    "aten::masked_select",
    "aten::unique",
    "aten::_unique",
    "aten::_unique2",
    "aten::unique_dim",
    "aten::unique_consecutive",
    "aten::equal",
    "aten::is_nonzero",
}
# Indexing syncs only with a boolean mask among the indices (the kernel calls nonzero).
_SYNC_WITH_BOOL_INDEX = {"aten::index", "aten::index_put", "aten::index_put_",
                         "aten::_index_put_impl_"}


def _caller() -> str:
    """The innermost stack frame outside torch's own files (where the sync was asked for)."""
    for frame in reversed(traceback.extract_stack()[:-2]):
        if f"{os.sep}torch{os.sep}" not in frame.filename:
            return f"{frame.filename}:{frame.lineno}"
    return "?"


def _has_bool_index(args: tuple[Any, ...]) -> bool:
    indices = args[1] if len(args) > 1 else None
    if not isinstance(indices, (list, tuple)):
        return False
    return any(isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in indices)


def _syncs(op_name: str, func: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> bool:
    if op_name in _ALWAYS_SYNC:
        return True
    if op_name in _SYNC_WITH_BOOL_INDEX:
        return _has_bool_index(args)
    if op_name == "aten::repeat_interleave":
        return kwargs.get("output_size") is None
    return False


class HostSyncCounter(TorchDispatchMode):
    """Dispatch mode that counts host-synchronising operators by name.

    Usage::

        with HostSyncCounter() as syncs:
            attack.perturb(x, y)
        syncs.total, syncs.by_op
    """

    def __init__(self, record_callers: bool = False) -> None:
        super().__init__()
        self.by_op: Counter[str] = Counter()
        self.record_callers = record_callers
        # "file:line op" of the innermost frame outside torch, per sync (with record_callers).
        self.callers: Counter[str] = Counter()

    @property
    def total(self) -> int:
        """Host synchronisations seen so far."""
        return sum(self.by_op.values())

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        op_name = func._schema.name
        if _syncs(op_name, func, args, kwargs):
            self.by_op[op_name] += 1
            if self.record_callers:
                self.callers[f"{_caller()} {op_name}"] += 1
        return func(*args, **kwargs)
