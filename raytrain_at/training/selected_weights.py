"""Read a run's selected weights back from the earlier checkpoint that holds them.

A checkpoint keeps the selected weights only when they changed (:mod:`.selection`); a later one
records the epoch of the checkpoint that holds them and its file. On a resume, rank 0 finds that
checkpoint among the run's older ones (local or in the cloud, through the checkpoint's own
pyarrow filesystem) and fetches two files of it: the state, to match the epoch, and the weights,
checked against that checkpoint's rank-0 manifest. The rest of it (optimizer shards, a
model-sized multiple) is never downloaded.
"""

from __future__ import annotations

import json
import posixpath
import tempfile
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file

from raytrain_at.errors import UserError
from raytrain_at.training.checkpoint_manifest import file_sha256, manifest_name


def _read_bytes(checkpoint: Any, name: str) -> bytes | None:
    """A file of a ``ray.train.Checkpoint`` (None when it has no such file)."""
    try:
        with checkpoint.filesystem.open_input_stream(
                posixpath.join(checkpoint.path, name)) as stream:
            return stream.read()
    except (FileNotFoundError, OSError):
        return None


def selected_from_earlier(earlier: Iterable[Any], epoch: int, name: str,
                          state_file: str) -> dict[str, torch.Tensor]:
    """The weights in file ``name`` of the newest checkpoint in ``earlier`` (newest first)
    whose state (``state_file``) is of ``epoch``.

    Raises:
        UserError: no such checkpoint, or its file does not match its recorded checksum.
    """
    for checkpoint in earlier:
        state = _read_bytes(checkpoint, state_file)
        if state is None or json.loads(state).get("epoch") != epoch:
            continue
        data = _read_bytes(checkpoint, name)
        manifest = _read_bytes(checkpoint, manifest_name(0))
        entry = json.loads(manifest).get("files", {}).get(name) if manifest else None
        if data is None or entry is None:
            raise UserError(f"the selected weights {name} are missing from {checkpoint.path}")
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / name
            path.write_bytes(data)
            # The same check as the resumed checkpoint's: a damaged copy is never selected.
            if file_sha256(path) != entry.get("sha256"):
                raise UserError(f"the selected weights {checkpoint.path}/{name} do not match "
                                "their recorded SHA-256")
            return load_file(str(path))
    raise UserError(f"the selected weights (epoch {epoch}, {name}) are in none of this run's "
                    "earlier checkpoints: the checkpoint holding them was removed")
