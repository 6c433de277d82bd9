"""The config check of a resume (training.resume_check): the changed keys named old -> new, the
ones ``--allow-change`` names accepted and recorded as tags, and the refusal before anything is
written."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from raytrain_at.config import load_config
from raytrain_at.errors import UserError
from raytrain_at.training import loop
from raytrain_at.training.launch import prepare_run
from raytrain_at.training.resume_check import (STATE_FILE, changed_tags, check_resume_config,
                                               config_changes, latest_saved_config,
                                               parse_allowed)


def _json(overrides: list[str]) -> dict:
    return load_config("quickstart", overrides).model_dump(mode="json")


def test_the_state_file_is_the_loops() -> None:
    assert STATE_FILE == loop.STATE_FILE


def test_changes_name_each_key_old_and_new_and_skip_operational_keys() -> None:
    saved = _json(["optim.lr=0.001", "tracking.tracking_uri=sqlite:///a.db"])
    current = _json(["optim.lr=0.002", "schedule.epochs=9", "scaling.max_failures_per_hour=7",
                     "tracking.tracking_uri=sqlite:///b.db"])
    epochs = saved["schedule"]["epochs"]
    assert config_changes(saved, current) == {"optim.lr": (0.001, 0.002),
                                              "schedule.epochs": (epochs, 9)}
    assert config_changes(saved, saved) == {}


def test_a_changed_key_is_refused_in_one_line_unless_allowed() -> None:
    saved, current = _json(["optim.lr=0.001"]), _json(["optim.lr=0.002", "schedule.epochs=9"])
    epochs = saved["schedule"]["epochs"]
    with pytest.raises(UserError) as caught:
        check_resume_config(saved, current, parse_allowed(["schedule.epochs"]), "ckpt_1")
    assert str(caught.value) == (
        "the resumed run's config differs from its checkpoint's (ckpt_1): optim.lr: 0.001 -> "
        "0.002 (start a new run name, or allow it with --allow-change optim.lr)")
    accepted = check_resume_config(saved, current,
                                   parse_allowed(["schedule.epochs,optim.lr"]), "ckpt_1")
    assert accepted == {"optim.lr": (0.001, 0.002), "schedule.epochs": (epochs, 9)}
    assert changed_tags(accepted) == {"raytrain_at.changed.optim.lr": "0.001 -> 0.002",
                                      "raytrain_at.changed.schedule.epochs": f"{epochs} -> 9"}


def test_a_resume_on_another_number_of_workers_needs_no_allow_change() -> None:
    # Same global batch at every size; the optimiser state re-partitions (portable_state).
    saved, current = _json(["scaling.num_workers=2"]), _json(["scaling.num_workers=4"])
    assert check_resume_config(saved, current, frozenset(), "ckpt_1") == {}
    # The global batch is what the mathematics depends on: changing it is still refused.
    with pytest.raises(UserError, match=r"schedule\.global_batch_size: 64 -> 128"):
        check_resume_config(saved, _json(["scaling.num_workers=4",
                                          "schedule.global_batch_size=128"]),
                            frozenset(), "ckpt_1")


def test_allow_change_of_an_unknown_key_and_a_fresh_run() -> None:
    current = _json([])
    with pytest.raises(UserError, match="^--allow-change names optim.lrr: no such config key$"):
        check_resume_config(None, current, frozenset({"optim.lrr"}), "")
    assert check_resume_config(None, current, parse_allowed(["schedule.epochs"]), "") == {}


def _checkpoint(run: Path, name: str, config: dict | None) -> Path:
    folder = run / name
    folder.mkdir(parents=True)
    if config is not None:
        (folder / STATE_FILE).write_text(json.dumps({"epoch": 1, "config": config}))
    return folder


def test_the_saved_config_is_the_newest_checkpoints_that_has_one(tmp_path) -> None:
    run = tmp_path / "runs" / "r"
    _checkpoint(run, "checkpoint_2026-12-07_01-00-00.000000", _json(["optim.lr=0.1"]))
    second = _checkpoint(run, "checkpoint_2026-12-07_02-00-00.000000", _json(["optim.lr=0.2"]))
    _checkpoint(run, "checkpoint_2026-12-07_03-00-00.000000", None)  # cut short
    saved = latest_saved_config(str(tmp_path / "runs"), "r")
    assert saved is not None and saved[0]["optim"]["lr"] == 0.2 and saved[1] == str(second)
    assert latest_saved_config(str(tmp_path / "runs"), "other") is None


def test_prepare_run_refuses_a_changed_resume_before_writing(tmp_path) -> None:
    home = tmp_path / "home"
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    first = load_config("quickstart", [f"tracking.tracking_uri={uri}"])
    run = home / "runs" / "same"
    _checkpoint(run, "checkpoint_2026-12-07_01-00-00.000000", first.model_dump(mode="json"))
    before = sorted(p.relative_to(home) for p in home.rglob("*"))
    changed = load_config("quickstart", [f"tracking.tracking_uri={uri}", "optim.lr=0.5"])
    with pytest.raises(UserError, match=r"optim\.lr: .* -> 0\.5 \(start a new run name"):
        prepare_run(changed, run_name="same", storage_path=str(home))
    assert sorted(p.relative_to(home) for p in home.rglob("*")) == before  # nothing written
    # (The accepted change, with its tag on the MLflow run: tests/fault_battery.)
