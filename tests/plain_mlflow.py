"""Load a model with plain MLflow in a Python process where ``raytrain_at`` cannot be imported,
and check where experiments keep their artifacts (shared by the registry and quickstart tests)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
from mlflow.tracking import MlflowClient

# Runs in a fresh interpreter: any import of raytrain_at fails, as on a machine without it.
_SCRIPT = r"""
import importlib.abc, json, sys

class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name == "raytrain_at" or name.startswith("raytrain_at."):
            raise ImportError(f"{name} is blocked in this process")
        return None

sys.meta_path.insert(0, Block())
import mlflow, numpy as np, torch

uri, x_path, out_dir = sys.argv[1:4]
x = np.load(x_path)
module = mlflow.pytorch.load_model(uri)
with torch.no_grad():
    np.save(f"{out_dir}/pytorch.npy", module(torch.from_numpy(x)).numpy())
pyfunc = mlflow.pyfunc.load_model(uri)
np.save(f"{out_dir}/pyfunc.npy", np.asarray(pyfunc.predict(x)))
inputs = pyfunc.metadata.get_input_schema().inputs[0]
json.dump({"input_shape": list(inputs.shape),
           "has_example": pyfunc.metadata.saved_input_example_info is not None,
           "raytrain_at_loaded": any(m.startswith("raytrain_at") for m in sys.modules)},
          open(f"{out_dir}/info.json", "w"))
"""


def plain_mlflow_predict(uri: str, x: np.ndarray, tracking_uri: str, work: Path
                         ) -> tuple[np.ndarray, np.ndarray, dict]:
    """(mlflow.pytorch output, mlflow.pyfunc output, facts) for ``uri`` on ``x``, computed in a
    subprocess that cannot import raytrain_at."""
    work.mkdir(parents=True, exist_ok=True)
    np.save(work / "x.npy", x.astype(np.float32))
    env = dict(os.environ, MLFLOW_TRACKING_URI=tracking_uri, MLFLOW_LOGGING_LEVEL="ERROR")
    env.pop("PYTHONPATH", None)
    done = subprocess.run([sys.executable, "-c", _SCRIPT, uri, str(work / "x.npy"), str(work)],
                          capture_output=True, text=True, timeout=600, env=env, cwd=work)
    assert done.returncode == 0, done.stderr[-3000:]
    info = json.loads((work / "info.json").read_text())
    return np.load(work / "pytorch.npy"), np.load(work / "pyfunc.npy"), info


def artifact_folders(tracking_uri: str) -> dict[str, Path]:
    """Every experiment of the store with the local folder of its artifact location."""
    from raytrain_at.tracking.experiments import location_path

    client = MlflowClient(tracking_uri=tracking_uri)
    folders = {}
    for experiment in client.search_experiments():
        path = location_path(experiment.artifact_location)
        assert path is not None, experiment.artifact_location
        folders[experiment.name] = path
    return folders
