"""DeepSpeed checkpoints read back without unpickling arbitrary objects.

DeepSpeed 0.19.8 saves with ``torch.save`` and loads every file of a checkpoint through its
engine's ``checkpoint_engine.load``, whose torch engine calls ``torch.load(weights_only=False)``:
a file planted under the storage root (which every node may write) would run code in every
worker at resume. :func:`use_weights_only_loading` swaps that one method for a
``torch.load(weights_only=True)`` that allows, besides tensors and plain containers, exactly the
three plain DeepSpeed types its ZeRO optimiser state holds (read from the files that ZeRO 0/1/2
write in fp32 and bf16): the static loss scaler (a scale and a flag), the ZeRO stage enum and the
``fragment_address`` named tuple (numel, start). Saving is left to DeepSpeed as it is.

DeepSpeed has no option for this (its other engines call ``torch.load`` with the default), so
the engine object is wrapped rather than configured.
"""

from __future__ import annotations

import pickle
import re
from typing import Any

import torch

from raytrain_at.errors import UserError

_UNSUPPORTED = re.compile(r"Unsupported global: GLOBAL [\w.]+")


def deepspeed_state_types() -> list[Any]:
    """The non-tensor classes a DeepSpeed ZeRO 0/1/2 checkpoint of this project holds."""
    # deepspeed is slow to import and only present in workers, so imported here.
    from deepspeed.runtime.fp16.loss_scaler import LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [LossScaler, ZeroStageEnum, fragment_address]


def load_weights_only(path: str, map_location: Any = None) -> Any:
    """``torch.load(path, weights_only=True)`` with DeepSpeed's plain state types allowed.

    Raises:
        UserError: the file holds any other pickled object (one line naming the file and the
            object; nothing of it runs).
    """
    try:
        with torch.serialization.safe_globals(deepspeed_state_types()):
            return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as exc:
        found = _UNSUPPORTED.search(str(exc))
        what = found.group(0) if found else str(exc).splitlines()[0]
        raise UserError(f"checkpoint file {path} holds a pickled object that is not training "
                        f"state ({what}): refused to load it") from None


class WeightsOnlyLoading:
    """A DeepSpeed checkpoint engine whose ``load`` is :func:`load_weights_only`; everything
    else (saving, commit, writer checks) is the wrapped engine's."""

    def __init__(self, inner: Any) -> None:
        self._inner = inner

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)

    def load(self, path: str, map_location: Any = None) -> Any:
        return load_weights_only(path, map_location)


def use_weights_only_loading(engine: Any) -> None:
    """Make every checkpoint load of a DeepSpeed ``engine`` weights-only (see module doc)."""
    if not isinstance(engine.checkpoint_engine, WeightsOnlyLoading):
        engine.checkpoint_engine = WeightsOnlyLoading(engine.checkpoint_engine)
