"""MODEL_REF resolution, the one module above models/ and tracking/ (raytrain_at/model_refs.py):
a run's ``model.init`` by reference loads the logged model's weights and normalisation, and an
error about the downloaded copy names the reference the user gave, not a temporary path."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from mlflow.tracking import MlflowClient

from raytrain_at.config import load_config
from raytrain_at.errors import UserError
from raytrain_at.model_refs import local_weights
from raytrain_at.models.model_files import ModelSpec, save_model_file
from raytrain_at.tracking.experiments import ensure_experiment
from raytrain_at.training.loop import build_model, run_model_spec


def _logged(store: str, tmp_path: Path, spec: ModelSpec) -> tuple[str, torch.nn.Module]:
    """``runs:/ID/model`` of a run holding a model file of ``spec`` (the project's file only)."""
    torch.manual_seed(1)
    model = spec.build().eval()
    path = save_model_file(tmp_path / spec.name / "model.safetensors", model, spec)
    client = MlflowClient(tracking_uri=store)
    run = client.create_run(ensure_experiment(client, "refs"))
    client.log_artifact(run.info.run_id, str(path), "model")
    return f"runs:/{run.info.run_id}/model", model


def test_init_by_reference_loads_the_logged_weights_and_normalisation(store, tmp_path) -> None:
    # Raw pixels, as an imported RobustBench model takes them: the run must keep that.
    spec = ModelSpec(name="convnext_atto_cvst", num_classes=10, resolution=32,
                     mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0))
    reference, logged = _logged(store, tmp_path, spec)
    config = load_config("quickstart", [f"model.init={reference}"])
    started = build_model(config)
    own = started.state_dict()
    assert {k: torch.equal(own[k], v) for k, v in logged.state_dict().items()} == {
        k: True for k in logged.state_dict()}
    # Its normalisation too (none: raw pixels), not the backbone's ImageNet statistics.
    assert (started.mean.flatten().tolist(), started.std.flatten().tolist()) == (
        list(spec.mean or ()), list(spec.std or ()))
    assert (run_model_spec(config).mean, run_model_spec(config).std) == (spec.mean, spec.std)


def test_a_misfit_reference_is_named_as_given(store, tmp_path) -> None:
    reference, _ = _logged(store, tmp_path, ModelSpec(name="test_resnet", num_classes=10,
                                                      resolution=16))
    local = local_weights(reference)
    assert local != reference and Path(str(local)).is_file()
    config = load_config("quickstart", [f"model.init={reference}"])  # a ConvNeXt-atto
    with pytest.raises(UserError) as failed:
        build_model(config)
    message = str(failed.value)
    assert reference in message and "raytrain-at-model-" not in message, message


def test_weights_that_are_no_reference_pass_through() -> None:
    assert local_weights(None) is None
    assert local_weights("hub:convnext_tiny.fb_in1k") == "hub:convnext_tiny.fb_in1k"
    assert local_weights("/data/ckpt.safetensors") == "/data/ckpt.safetensors"
