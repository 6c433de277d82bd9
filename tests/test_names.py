"""Run, study and registered-model names: one rule (raytrain_at.names), checked before anything
is written (the study's own check is in test_tune_study's bad-input cases)."""

from __future__ import annotations

import pytest

from raytrain_at.config import load_config
from raytrain_at.errors import UserError
from raytrain_at.names import check_name
from raytrain_at.registry.register import register_model
from raytrain_at.training.launch import prepare_run

BAD = ["..", ".", "../escape", "a/b", "a\\b", "x..y", ".hidden", "", "name\n", "tab\tname",
       "a" * 129]
GOOD = ["run-1", "digits.v2", "A_b-c.d", "9lives", "a" * 128]


@pytest.mark.parametrize("name", BAD)
def test_unsafe_names_are_refused_in_one_line(name) -> None:
    with pytest.raises(UserError) as info:
        check_name(name, "run name")
    message = str(info.value)
    assert message.startswith(f"run name {name!r}: ") and "\n" not in message


@pytest.mark.parametrize("name", GOOD)
def test_safe_names_pass(name) -> None:
    assert check_name(name, "study name") == name


@pytest.mark.parametrize("name", ["..", "a/b"])
def test_run_names_are_checked_before_anything_is_written(tmp_path, name) -> None:
    home = tmp_path / "home"
    with pytest.raises(UserError, match=rf"^run name {name!r}: "):
        prepare_run(load_config("quickstart"), run_name=name, storage_path=str(home))
    # Also when the name comes from the config (tracking.run_name).
    config = load_config("quickstart", [f"tracking.run_name={name}"])
    with pytest.raises(UserError, match=rf"^run name {name!r}: "):
        prepare_run(config, storage_path=str(home))
    assert not home.exists()


@pytest.mark.parametrize("name", ["..", "net/../other", "net\n"])
def test_registered_model_names_are_checked_first(tmp_path, name) -> None:
    with pytest.raises(UserError, match=r"^model name "):
        register_model(str(tmp_path / "no-such-model"), name, unevaluated=True,
                       tracking_uri=f"sqlite:///{tmp_path}/mlflow.db")
    assert list(tmp_path.iterdir()) == []
