"""Checkpoint checksums: what fails verification, and the resume's choice among checkpoints.

Small folders of plain files stand in for the ranks' parts of a checkpoint here; the real
DeepSpeed checkpoint (truncated newest -> the one before, bit for bit; pickle canaries) is in
``test_checkpoint_restore``.
"""

from __future__ import annotations

import json
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import pytest

from raytrain_at.errors import UserError
from raytrain_at.training.checkpoint_manifest import (checkpoint_problem, restore_first_good,
                                                      write_manifest)


def _checkpoint(folder: Path, world_size: int = 2) -> Path:
    """Each rank writes its part into its own folder and records it; Ray merges the folders."""
    for rank in range(world_size):
        part = folder.parent / f"{folder.name}-rank{rank}"
        (part / "state").mkdir(parents=True)
        (part / "state" / f"shard{rank}.pt").write_bytes(bytes(range(256)) * (rank + 3))
        if rank == 0:
            (part / "loop_state.json").write_text(json.dumps({"epoch": 1}))
        write_manifest(part, rank, world_size)
        for path in part.rglob("*"):
            if path.is_file():
                target = folder / path.relative_to(part)
                target.parent.mkdir(parents=True, exist_ok=True)
                path.rename(target)
    return folder


def test_a_complete_checkpoint_verifies(tmp_path) -> None:
    folder = _checkpoint(tmp_path / "ckpt")
    manifest = json.loads((folder / "checksums-rank0.json").read_text())
    assert manifest["world_size"] == 2 and set(manifest["files"]) == {"loop_state.json",
                                                                      "state/shard0.pt"}
    assert checkpoint_problem(folder) is None
    (folder / ".metadata.json").write_text("{}")  # Ray's own bookkeeping is not ours to list
    assert checkpoint_problem(folder) is None


@pytest.mark.parametrize("damage, problem", [
    (lambda f: (f / "state/shard1.pt").write_bytes(b"short"),
     "state/shard1.pt is 5 bytes, 1024 when written"),
    (lambda f: (f / "state/shard0.pt").write_bytes(bytes(255 - b for b in range(256)) * 3),
     "state/shard0.pt does not match its recorded SHA-256"),
    (lambda f: (f / "state/shard0.pt").unlink(), "state/shard0.pt is missing"),
    (lambda f: (f / "checksums-rank1.json").unlink(),
     "checksums-rank1.json is missing (rank 1's part never arrived)"),
    (lambda f: (f / "checksums-rank0.json").unlink(),
     "no checksums-rank0.json (not written completely, or before checksums)"),
    (lambda f: (f / "checksums-rank0.json").write_text('{"rank": 0'),
     "checksums-rank0.json is unreadable"),
    (lambda f: (f / "state/extra.pt").write_bytes(b"planted"), "state/extra.pt is in no manifest"),
])
def test_damage_fails_verification_naming_the_file(tmp_path, damage, problem) -> None:
    folder = _checkpoint(tmp_path / "ckpt")
    damage(folder)
    found = checkpoint_problem(folder)
    assert found is not None and found.startswith(problem), found


@dataclass
class _Folder:
    path: str

    def as_directory(self):
        return nullcontext(self.path)


def test_resume_takes_the_newest_good_checkpoint_saying_what_it_skipped(tmp_path) -> None:
    old, middle, new = (_checkpoint(tmp_path / name) for name in ("e1", "e2", "e3"))
    (new / "state/shard0.pt").write_bytes(b"")
    (middle / "checksums-rank1.json").unlink()
    loaded, lines = [], []
    chosen = restore_first_good(_Folder(str(new)),
                                lambda: [_Folder(str(middle)), _Folder(str(old))],
                                loaded.append, say=lines.append)
    assert chosen.path == str(old) and loaded == [old]
    [line] = lines
    assert line == (f"resuming from the earlier checkpoint {old}: skipped {new} (state/shard0.pt "
                    f"is 0 bytes, 768 when written); {middle} (checksums-rank1.json is missing "
                    "(rank 1's part never arrived))")


def test_a_good_latest_checkpoint_is_taken_without_listing_others(tmp_path) -> None:
    latest = _checkpoint(tmp_path / "e1")
    loaded, lines = [], []

    def earlier():
        raise AssertionError("listed the older checkpoints although the latest verifies")

    restore_first_good(_Folder(str(latest)), earlier, loaded.append, say=lines.append)
    assert loaded == [latest] and lines == []


def test_no_good_checkpoint_stops_with_one_line(tmp_path) -> None:
    only = _checkpoint(tmp_path / "e1")
    (only / "loop_state.json").write_text("{}")
    loaded = []
    with pytest.raises(UserError) as info:
        restore_first_good(_Folder(str(only)), lambda: [], loaded.append)
    assert str(info.value) == (f"no checkpoint of this run passes its checksums: {only} "
                               "(loop_state.json is 2 bytes, 12 when written)")
    assert loaded == []


def test_earlier_checkpoints_are_the_older_siblings_newest_first(tmp_path) -> None:
    from ray.train import Checkpoint

    from raytrain_at.training.launch import earlier_checkpoints

    run = tmp_path / "run"
    names = ["checkpoint_2026-12-01_10-00-00.000001", "checkpoint_2026-12-01_11-00-00.000001",
             "checkpoint_2026-12-01_12-00-00.000001", "checkpoint_2026-12-01_13-00-00.000001"]
    for name in names:
        (run / name).mkdir(parents=True)
    (run / "checkpoint_manager_snapshot.json").write_text("{}")
    (run / "checkpoint_tmp_file").write_text("")  # a file, not a checkpoint folder
    latest = Checkpoint.from_directory(str(run / names[2]))
    assert [Path(c.path).name for c in earlier_checkpoints(latest)] == [names[1], names[0]]
