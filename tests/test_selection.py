"""Checkpoint selection: the best held-out epoch is what a run logs, registers and hands on.

The end-to-end check trains a real single-rank WorkerLoop (DeepSpeed, EMA, digits) for three
epochs whose held-out scores are 0.5, 0.9, 0.7 (the held-out evaluation is replaced by those
numbers so that the middle epoch is the best one for certain; everything else is real), logs the
run to MLflow as training does, registers ``runs:/ID/model``, and hands it to a next run as
``model.init``: each of them must hold epoch 2's EMA weights, and ``final_model`` epoch 3's.
No checkpoint holds a second copy of weights: epoch 3's points to epoch 2's, and a resume from it
(new format, and as checkpoints were written before with a copy inside) restores epoch 2's.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

from raytrain_at.config import load_config
from raytrain_at.training.selection import (Selection, checkpoint_score, selection_description,
                                            selection_metric)
from tests.worker_loop_helpers import (FixedBatches, digit_batches, run_in_spawned_process,
                                       single_rank_environment)

SCORES = [0.5, 0.9, 0.7]
BATCH = 8


def test_selection_metric_follows_the_objective_and_the_setting() -> None:
    adversarial = load_config("quickstart")
    clean = load_config("quickstart", ["objective.kind=clean", "attack.kind=none"])
    assert selection_metric(adversarial) == "heldout_robust_accuracy"
    assert selection_metric(clean) == "heldout_clean_accuracy"
    assert selection_metric(load_config("quickstart", ["schedule.select_by=clean"])) == \
        "heldout_clean_accuracy"
    # The paper's selection attack per model size is recorded with the choice.
    assert "APGD-CE 1 step," in selection_description(load_config("table2_convnext_tiny_300ep_2step"), True)
    assert "APGD-CE 10 steps" in selection_description(
        load_config("table2_convnext_base_cvst_250ep_2step"), True)
    assert selection_description(clean, True) == "max heldout_clean_accuracy"
    assert selection_description(adversarial, False).startswith("final epoch")


def test_selection_keeps_the_best_and_the_earlier_of_ties() -> None:
    module = torch.nn.Linear(2, 2)
    selection = Selection("heldout_robust_accuracy")
    taken = []
    for epoch, score in enumerate([0.4, 0.6, 0.6, 0.5], start=1):
        with torch.no_grad():
            module.weight.fill_(epoch)
        taken.append(selection.consider(epoch, {"heldout_robust_accuracy": score}, module))
    assert taken == [True, True, False, False]
    assert selection.epoch == 2 and selection.score == 0.6
    assert torch.all(selection.weights["weight"] == 2)
    assert selection.report() == {"selected_epoch": 2.0, "selected_heldout_robust_accuracy": 0.6}


def test_selected_weights_are_written_once_and_their_holder_ranks_first() -> None:
    """Which file of each checkpoint holds the selection: the selected epoch's model file, a
    copy only in the first checkpoint after a selection whose epoch was not checkpointed, and
    nothing while an earlier checkpoint holds it; holders outrank every other checkpoint."""
    selection = Selection("heldout_robust_accuracy")
    files = {}
    # Checkpoints at epochs 1, 2, 4, 5, 6 (none at 3); the best epochs are 1, 3 (0.8), 5.
    for epoch, score in enumerate([0.5, 0.4, 0.8, 0.7, 0.9, 0.6], start=1):
        selection.consider(epoch, {"heldout_robust_accuracy": score}, None)
        if epoch != 3:
            files[epoch] = selection.file_for(epoch, "model", "selected")
            if files[epoch] is not None:  # as WorkerLoop.save records it
                selection.stored_in = (epoch, files[epoch])
    assert files == {1: "model", 2: None, 4: "selected", 5: "model", 6: None}
    assert selection.state()["stored_in"] == [5, "model"]
    restored = Selection("heldout_robust_accuracy")
    restored.restore(selection.state(), None)
    assert restored.stored_in == (5, "model") and restored.file_for(7, "model", "s") is None
    # A checkpoint of epoch 2 holding the selection outranks one of epoch 999 that does not.
    assert checkpoint_score(2, True) > checkpoint_score(999, False) > checkpoint_score(3, False)
    assert checkpoint_score(3, True) > checkpoint_score(2, True)


def test_a_checkpoint_is_uploaded_in_the_background(monkeypatch) -> None:
    """Ray Train gets each checkpoint to upload asynchronously, deleting it afterwards (the
    worker's report returns before the upload; a real run: tests/test_training_ray.py)."""
    import ray.train

    from raytrain_at.training.launch import report_to_ray

    calls = []
    monkeypatch.setattr(ray.train, "report", lambda metrics, **kw: calls.append((metrics, kw)))
    report_to_ray({"epoch": 1}, Path("/nonexistent/epoch-0001-rank0"))
    report_to_ray({"epoch": 2}, None)
    [(metrics, first), (_, second)] = calls
    assert metrics == {"epoch": 1} and first["checkpoint"].path == "/nonexistent/epoch-0001-rank0"
    assert first["checkpoint_upload_mode"] == ray.train.CheckpointUploadMode.ASYNC
    assert first["delete_local_checkpoint_after_upload"] is True
    assert second["checkpoint"] is None


def test_without_held_out_data_the_final_epoch_is_selected() -> None:
    selection = Selection("heldout_robust_accuracy")
    for epoch in (1, 2, 3):
        assert selection.consider(epoch, {"train_loss": 1.0 / epoch}, None)
    assert selection.epoch == 3 and selection.score is None


def _keyed(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A state dict under the backbone's own names (wrappers prefix ``backbone.``)."""
    return {k.removeprefix("backbone."): v for k, v in state.items()}


def _train_three_epochs(storage: str, out: str) -> None:
    single_rank_environment()
    try:
        import deepspeed
        from safetensors.torch import load_file

        from raytrain_at.model_refs import resolve_model
        from raytrain_at.registry.register import register_model
        from raytrain_at.registry.mlflow_registry import ModelRegistry
        from raytrain_at.tracking.runs import TrainingRun
        from raytrain_at.training.launch import _log_final_artifacts, prepare_data
        from ray.train import Checkpoint

        from raytrain_at.training.checkpoint_manifest import write_manifest
        from raytrain_at.training.loop import (SELECTED_FILE, STATE_FILE, WorkerLoop,
                                               WorkerPlace, build_model)
        from raytrain_at.training.selected_weights import selected_from_earlier

        deepspeed.init_distributed(dist_backend="gloo")
        config = load_config("quickstart", [
            f"schedule.global_batch_size={BATCH}", "scaling.num_workers=1", "schedule.epochs=3",
            "optim.ema_decay=0.5", "optim.lr=0.01", "optim.warmup_epochs=0",
            "objective.label_smoothing=0.2", "scaling.precision=bf16"])
        train_path, heldout_path = prepare_data(config, Path(storage))
        torch.manual_seed(config.seed)  # as WorkerLoop seeds it: the same initial weights
        initial = _keyed(build_model(config).state_dict())
        loop = WorkerLoop(config, WorkerPlace(0, 1, torch.device("cpu")), train_path,
                          heldout_path)
        # bf16 forced on CPU: DeepSpeed casts the live module, the EMA stays the fp32 weights.
        assert next(loop.engine.module.parameters()).dtype == torch.bfloat16
        ema_start = _keyed(loop.ema.module.state_dict())
        assert all(torch.equal(ema_start[k], v) for k, v in initial.items()
                   if v.is_floating_point()), "the EMA did not start from the fp32 weights"
        loop.train_data = FixedBatches(digit_batches(BATCH, 3))
        scores = iter(SCORES)
        loop.evaluate_heldout = lambda: {"heldout_clean_accuracy": 1.0,
                                         "heldout_robust_accuracy": next(scores)}
        uri = f"sqlite:///{storage}/mlflow.db"
        os.environ["MLFLOW_TRACKING_URI"] = uri  # the registry resolves sources through it
        tracker = TrainingRun(uri, "selection", "three-epochs")
        # The configured EMA decay and label smoothing reach the step.
        assert loop.ema.decay == 0.5 and loop.objective.label_smoothing == 0.2
        assert loop.augment.label_smoothing == 0.2
        ema_after: dict[int, dict[str, torch.Tensor]] = {}
        reported: list[dict] = []
        folders: dict[int, Path] = {}
        files: dict[int, list[str]] = {}

        def report(metrics, directory):  # as Ray Train's worker entry reports
            tracker.log_metrics(metrics, step=int(metrics["epoch"]))
            epoch = int(metrics["epoch"])
            reported.append(dict(metrics))
            ema_after[epoch] = _keyed({k: v.clone()
                                       for k, v in loop.ema.module.state_dict().items()})
            folders[epoch] = directory
            files[epoch] = sorted(p.name for p in directory.glob("*.safetensors")
                                   if p.name != "portable_state.safetensors")  # optimiser state

        loop.run(report, Path(storage) / "ckpt")
        ema_dtypes = sorted({str(v.dtype) for v in loop.ema.module.state_dict().values()
                             if v.is_floating_point()})
        _log_final_artifacts(tracker, loop, config)
        tracker.finish()

        def same_as(state: dict[str, torch.Tensor], epoch: int) -> bool:
            state = _keyed(state)
            reference = ema_after[epoch]
            return state.keys() == reference.keys() and all(
                torch.equal(state[k], v) for k, v in reference.items())

        # Resume from epoch 3's checkpoint, which holds no selected weights: they come from
        # epoch 2's model file, found among the older checkpoints as a resume finds them.
        def earlier(epoch, name):
            return selected_from_earlier([Checkpoint.from_directory(str(folders[e]))
                                          for e in (2, 1)], epoch, name, STATE_FILE)

        loop.selection.weights = None
        loop.load(folders[3], earlier)
        resumed = [loop.selection.epoch, list(loop.selection.stored_in),
                   same_as(loop.selection.weights, 2)]
        # A checkpoint written before this record: its own copy, no pointer; the next
        # checkpoint then writes the selection again (the old one ranks last at Ray).
        state = json.loads((folders[3] / STATE_FILE).read_text())
        del state["selection"]["stored_in"]
        (folders[3] / STATE_FILE).write_text(json.dumps(state))
        loop.save_selected(folders[3] / SELECTED_FILE)
        write_manifest(folders[3], 0, 1)
        loop.selection.weights = None
        loop.load(folders[3])
        legacy = [loop.selection.epoch, loop.selection.stored_in,
                  same_as(loop.selection.weights, 2),
                  loop.selection.file_for(4, "model.safetensors", SELECTED_FILE)]

        def weights(reference: str) -> dict[str, torch.Tensor]:
            return resolve_model(reference, tracking_uri=uri).module.state_dict()

        version = register_model(f"runs:/{tracker.run_id}/model", "selected-net",
                                 unevaluated=True, tracking_uri=uri)
        registry = ModelRegistry(uri)
        version_params = registry.version_params(registry.resolve("models:/selected-net/1"))
        # The hand-off: the next stage's model.init is the run's model, by reference.
        import mlflow

        handed = build_model(load_config("quickstart", [
            f"model.init=runs:/{tracker.run_id}/model"])).state_dict()
        run = mlflow.tracking.MlflowClient(uri).get_run(tracker.run_id)
        (Path(out) / "result.json").write_text(json.dumps({
            "selected": [r.get("selected_epoch") for r in reported],
            "files": files,
            "model_file_of_2_is_2": same_as(load_file(str(folders[2] / "model.safetensors")), 2),
            "scores": [r.get("checkpoint_score") for r in reported],
            "resumed": resumed, "legacy": legacy,
            "logged_is_2": same_as(weights(f"runs:/{tracker.run_id}/model"), 2),
            "logged_is_3": same_as(weights(f"runs:/{tracker.run_id}/model"), 3),
            "final_is_3": same_as(weights(f"runs:/{tracker.run_id}/final_model"), 3),
            "registered_is_2": same_as(weights(f"models:/selected-net/{version.version}"), 2),
            "handed_is_2": same_as(handed, 2),
            "tags": {k: v for k, v in run.data.tags.items() if k.startswith("raytrain_at.sel")},
            "metric": run.data.metrics.get("selected_heldout_robust_accuracy"),
            "version_epoch": version_params.get("selected_epoch"),
            "ema_dtypes": ema_dtypes,
        }))
    except BaseException:  # noqa: BLE001 - reported to the test
        import traceback

        (Path(out) / "error.txt").write_text(traceback.format_exc())


@pytest.mark.slow  # 76 s on 2 cores: in CI's end-to-end stage
def test_the_middle_best_epoch_is_logged_registered_and_handed_on(tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    result = run_in_spawned_process(_train_three_epochs, tmp_path, out, timeout=300)
    assert result["selected"] == [1.0, 2.0, 2.0]
    # The selection's weights are written once: epoch 2's model file; no copy anywhere.
    assert result["files"] == {e: ["model.safetensors"] for e in ("1", "2", "3")}
    assert result["model_file_of_2_is_2"]
    assert result["scores"] == [checkpoint_score(1, True), checkpoint_score(2, True), 3.0]
    assert result["resumed"] == [2, [2, "model.safetensors"], True]
    assert result["legacy"] == [2, None, True, "selected.safetensors"]
    # Epochs 2 and 3 differ, so "is epoch 2" says something.
    assert result["logged_is_2"] and not result["logged_is_3"]
    assert result["final_is_3"]
    assert result["registered_is_2"]
    assert result["handed_is_2"]
    assert result["tags"]["raytrain_at.selected_epoch"] == "2"
    assert result["tags"]["raytrain_at.selected_by"].startswith("max heldout_robust_accuracy")
    assert result["metric"] == pytest.approx(0.9)
    assert result["version_epoch"] == "2"
    assert result["ema_dtypes"] == ["torch.float32"]  # after bf16 DeepSpeed steps
