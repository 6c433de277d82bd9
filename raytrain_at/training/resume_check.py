"""A resume runs the config it was started with, unless the user names the keys that change.

Re-running a run name resumes it from its latest checkpoint, and every checkpoint carries the
config it was written under (``loop_state.json``, rank 0's). Before any worker starts, the driver
compares that config with the new one: a difference stops the run with one line naming each
changed key (old -> new), unless ``--allow-change KEY[,KEY]`` names it (e.g. ``schedule.epochs``
to train longer). The accepted changes are recorded on the MLflow run as tags
``raytrain_at.changed.KEY = "OLD -> NEW"`` (MLflow refuses to change a param's value, so the
run's params keep the values it started with and these tags say what holds since).
"""

from __future__ import annotations

import json
import logging
import posixpath
from typing import Any

from raytrain_at.config_loader import flat_keys
from raytrain_at.errors import UserError

log = logging.getLogger(__name__)

# The worker loop's state file (training.loop.STATE_FILE; this module stays free of torch).
STATE_FILE = "loop_state.json"
CHANGED_TAG_PREFIX = "raytrain_at.changed."

# Where the run lives or how it is launched, not what it computes: these may differ freely.
# The worker count too: the global batch is the config's at every size, and a checkpoint of
# another size restores its optimiser state re-partitioned (training.portable_state).
OPERATIONAL_KEYS = frozenset({
    "tracking.run_name", "tracking.storage_path", "tracking.tracking_uri",
    "scaling.max_failures_per_hour", "scaling.placement", "scaling.num_workers",
    "schedule.log_every_steps",
})


def config_changes(saved: dict[str, Any], current: dict[str, Any]) -> dict[str, tuple[Any, Any]]:
    """The keys whose values differ between two nested configs (JSON form), as (old, new);
    a key only one side has reads as None on the other. Operational keys are left out."""
    old, new = flat_keys(saved), flat_keys(current)
    return {key: (old.get(key), new.get(key)) for key in sorted(old.keys() | new.keys())
            if key not in OPERATIONAL_KEYS and old.get(key) != new.get(key)}


def parse_allowed(values: list[str] | None) -> frozenset[str]:
    """``--allow-change`` values (repeatable, each ``KEY[,KEY]``) as a set of keys."""
    return frozenset(key.strip() for value in values or [] for key in value.split(",")
                     if key.strip())


def check_resume_config(saved: dict[str, Any] | None, current: dict[str, Any],
                        allowed: frozenset[str], where: str) -> dict[str, tuple[Any, Any]]:
    """The accepted changes of a resume; raises on any other.

    Args:
        saved: the config of the run's latest checkpoint (None: a fresh run).
        current: this launch's config.
        allowed: the keys ``--allow-change`` names.
        where: the checkpoint, for the message.

    Raises:
        UserError: a key changed that ``allowed`` does not name (one line: every such key,
            old -> new), or ``allowed`` names a key the config does not have.
    """
    known = set(flat_keys(current))
    unknown = sorted(key for key in allowed if key not in known)
    if unknown:
        raise UserError(f"--allow-change names {', '.join(unknown)}: no such config key")
    if saved is None:
        return {}
    changes = config_changes(saved, current)
    refused = {k: v for k, v in changes.items() if k not in allowed}
    if refused:
        listed = "; ".join(f"{k}: {old!r} -> {new!r}" for k, (old, new) in refused.items())
        raise UserError(f"the resumed run's config differs from its checkpoint's ({where}): "
                        f"{listed} (start a new run name, or allow it with --allow-change "
                        f"{','.join(refused)})")
    return changes


def changed_tags(changes: dict[str, tuple[Any, Any]]) -> dict[str, str]:
    """MLflow tags recording accepted changes: ``raytrain_at.changed.KEY = "OLD -> NEW"``."""
    return {f"{CHANGED_TAG_PREFIX}{key}": f"{old!r} -> {new!r}"
            for key, (old, new) in changes.items()}


def latest_saved_config(storage_path: str, run_name: str) -> tuple[dict[str, Any], str] | None:
    """The config in the newest checkpoint of ``storage_path/run_name`` that has one, with that
    checkpoint's path; None when the run has no checkpoint (a fresh run).

    Read through pyarrow's filesystems, as Ray Train writes them (a local folder or s3://...).
    Only a JSON file is read: nothing is unpickled on the driver.
    """
    from pyarrow import fs

    filesystem, root = fs.FileSystem.from_uri(storage_path)
    folder = posixpath.join(root, run_name)
    try:
        entries = filesystem.get_file_info(fs.FileSelector(folder, allow_not_found=True))
    except OSError as exc:
        raise UserError(f"cannot list the run folder {storage_path}/{run_name}: {exc}") from None
    names = sorted((e.base_name for e in entries if e.type == fs.FileType.Directory
                    and e.base_name.startswith("checkpoint_")), reverse=True)
    for name in names:
        path = posixpath.join(folder, name, STATE_FILE)
        if filesystem.get_file_info(path).type != fs.FileType.File:
            continue  # a checkpoint cut short: the resume will skip it too
        try:
            with filesystem.open_input_stream(path) as stream:
                state = json.loads(stream.read())
        except (OSError, ValueError) as exc:
            log.warning("cannot read %s (%s): trying the checkpoint before", path, exc)
            continue
        if isinstance(state, dict) and isinstance(state.get("config"), dict):
            return state["config"], posixpath.join(folder, name)
    return None
