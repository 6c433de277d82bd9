"""Models that plain MLflow loads (pt2 program, signature, input example), in a process where
raytrain_at cannot be imported, predicting what raytrain_at.load_model predicts; durable
experiment artifact locations; ``mlflow models serve`` answering on loopback."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import torch
from mlflow.tracking import MlflowClient
from plain_mlflow import artifact_folders, plain_mlflow_predict

import raytrain_at
from raytrain_at.model_refs import log_model_artifacts
from raytrain_at.models.model_files import ModelSpec, save_model_file
from raytrain_at.registry.register import register_model
from raytrain_at.runtime.ports import free_local_port
from raytrain_at.tracking.experiments import artifact_root, ensure_experiment


@pytest.fixture(scope="module")
def small_model_file(tmp_path_factory) -> Path:
    torch.manual_seed(3)
    spec = ModelSpec(name="test_resnet", num_classes=10, resolution=16, crop_pct=1.0)
    path = tmp_path_factory.mktemp("model") / "model.safetensors"
    save_model_file(path, spec.build().eval(), spec)
    return path


def _inputs(resolution: int, n: int = 5) -> np.ndarray:
    return torch.rand(n, 3, resolution, resolution, generator=torch.Generator().manual_seed(0)
                      ).numpy()


def test_experiments_keep_artifacts_next_to_the_store(store, tmp_path) -> None:
    client = MlflowClient(tracking_uri=store)
    ensure_experiment(client, "some experiment/with odd:name")
    ensure_experiment(client, "some experiment/with odd:name")  # found, not created twice
    folders = artifact_folders(store)
    root = artifact_root(store)
    assert root == tmp_path / "store" / "mlartifacts"
    assert folders["some experiment/with odd:name"].parent == root
    assert not folders["some experiment/with odd:name"].is_relative_to(tmp_path / "elsewhere")


def test_registered_version_loads_with_plain_mlflow(store, small_model_file, tmp_path) -> None:
    done = register_model(str(small_model_file), "plain", unevaluated=True)
    uri = f"models:/plain/{done.version}"
    x = _inputs(16)
    by_pytorch, by_pyfunc, info = plain_mlflow_predict(uri, x, store, tmp_path / "plain")
    with torch.no_grad():
        ours = raytrain_at.load_model(uri)(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(by_pytorch, ours, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(by_pyfunc, ours, rtol=1e-5, atol=1e-6)
    assert info == {"input_shape": [-1, 3, 16, 16], "has_example": True,
                    "raytrain_at_loaded": False}
    for folder in artifact_folders(store).values():
        assert folder.is_relative_to(tmp_path / "store") or folder.is_relative_to(
            tmp_path / "elsewhere" / "mlruns"), folder  # MLflow's own Default experiment


def test_run_artifact_holds_both_formats(store, small_model_file, tmp_path) -> None:
    client = MlflowClient(tracking_uri=store)
    run = client.create_run(ensure_experiment(client, "runs"))
    log_model_artifacts(client, run.info.run_id, small_model_file)
    names = {Path(a.path).name for a in client.list_artifacts(run.info.run_id, "model")}
    assert {"MLmodel", "model.safetensors", "input_example.json", "data"} <= names
    uri = f"runs:/{run.info.run_id}/model"
    x = _inputs(16, n=3)
    by_pytorch, _, _ = plain_mlflow_predict(uri, x, store, tmp_path / "run")
    with torch.no_grad():
        ours = raytrain_at.load_model(uri)(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(by_pytorch, ours, rtol=1e-5, atol=1e-6)
    # Registered from the run's reference, the version points back at that run.
    done = register_model(uri, "from-run", unevaluated=True)
    assert client.get_model_version("from-run", done.version).run_id == run.info.run_id


@pytest.mark.slow
def test_mlflow_models_serve_answers_on_loopback(store, small_model_file, tmp_path) -> None:
    done = register_model(str(small_model_file), "served", unevaluated=True)
    port = free_local_port()
    mlflow_cli = str(Path(sys.executable).with_name("mlflow"))
    # The scoring server starts uvicorn by name: the environment's bin folder must be on PATH.
    env = dict(os.environ, MLFLOW_TRACKING_URI=store,
               PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}")
    server = subprocess.Popen(
        [mlflow_cli, "models", "serve", "-m", f"models:/served/{done.version}",
         "--env-manager", "local", "-h", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env, cwd=tmp_path)
    try:
        deadline = time.monotonic() + 180
        while True:
            assert server.poll() is None, server.stderr.read().decode()[-2000:]
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/ping", timeout=2):
                    break
            except OSError:
                assert time.monotonic() < deadline, "server did not start"
                time.sleep(1)
        x = _inputs(16, n=2)
        request = urllib.request.Request(
            f"http://127.0.0.1:{port}/invocations", data=json.dumps(
                {"inputs": x.tolist()}).encode(), headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=60) as response:
            answer = np.asarray(json.loads(response.read())["predictions"], dtype=np.float32)
    finally:
        server.terminate()
        server.wait(timeout=30)
    with torch.no_grad():
        ours = raytrain_at.load_model(str(small_model_file))(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(answer, ours, rtol=1e-4, atol=1e-5)
