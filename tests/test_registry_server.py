"""Registry through a real ``mlflow server``: register over HTTP, read the version, the champion
alias and the logged model's metrics back with plain REST calls, and load the model by alias
through the server (artifacts proxied by the server).

The server is started once for the module (``tests/support/screenshot_registry.py``'s
``MlflowServer``: 127.0.0.1, a free port, SQLite and artifacts under a temporary folder, one
worker) and stopped by its own process group in the fixture's finalizer. It boots (about 15 s on 2 cores) while the
robust model is trained and evaluated.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from tests.support.screenshot_registry import MlflowServer

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "tests" / "support" / "screenshot_registry.py"
NAME = "served-digits-net"


def _get(base: str, path: str, **query) -> dict:
    """GET ``base + path`` with ``query``; the JSON answer (a failing status raises, with the
    server's error body)."""
    url = f"{base}{path}" + (f"?{urllib.parse.urlencode(query)}" if query else "")
    try:
        with urllib.request.urlopen(url, timeout=30) as response:
            return json.load(response)
    except urllib.error.HTTPError as exc:
        raise AssertionError(f"GET {url}: {exc.code} {exc.read().decode(errors='replace')}")


@pytest.fixture(scope="module")
def served(request, tmp_path_factory):
    """A running server with ``NAME`` v1 registered through it from an evaluated robust model."""
    from raytrain_at.evaluation.evaluate import EvaluationRequest, evaluate
    from raytrain_at.evaluation.result import read_result
    from raytrain_at.registry.register import register_model

    tmp = tmp_path_factory.mktemp("registry-server")
    server = MlflowServer(tmp / "mlflow")
    request.addfinalizer(server.stop)
    server.start()  # boots while the session fixtures train the model
    request.getfixturevalue("eval_home")  # RAYTRAIN_AT_HOME with the bundled digits
    model_file = request.getfixturevalue("robust_model_file")
    _, eval_path = evaluate(EvaluationRequest(
        model_ref=model_file, data="digits", norms=["linf", "l2"], version="apgdt", n=16,
        batch_size=16, out=tmp / "evaluation.json", state_root=tmp / "eval-state"))
    server.wait_ready(timeout=60)
    registration = register_model(model_file, NAME, eval_path=eval_path,
                                  tracking_uri=server.url)
    return SimpleNamespace(server=server, url=server.url, registration=registration,
                           result=read_result(eval_path), model_file=model_file)


def test_version_and_champion_alias_read_back_over_rest(served):
    reg = served.registration
    assert reg.version == "1"
    assert reg.aliases_taken == ["champion-linf", "champion-l2"]
    version = _get(served.url, "/api/2.0/mlflow/model-versions/get",
                   name=NAME, version="1")["model_version"]
    assert version["name"] == NAME and version["version"] == "1"
    assert version["status"] == "READY"
    assert version["source"] == f"models:/{reg.model_id}"
    assert version["run_id"] == reg.run_id
    tags = {t["key"]: t["value"] for t in version["tags"]}
    assert tags["weights_sha256"] == served.result.model.weights_sha256
    assert tags["trustworthy"] == "true" and tags["raytrain_at.eligible"] == "true"

    by_alias = _get(served.url, "/api/2.0/mlflow/registered-models/alias",
                    name=NAME, alias="champion-linf")["model_version"]
    assert by_alias["version"] == "1" and by_alias["source"] == f"models:/{reg.model_id}"
    model = _get(served.url, "/api/2.0/mlflow/registered-models/get",
                 name=NAME)["registered_model"]
    assert {a["alias"]: a["version"] for a in model["aliases"]} == {
        "champion-linf": "1", "champion-l2": "1"}
    # The pages' Markdown, as the server hands it to the UI.
    linf = served.result.threats["linf"]
    assert version["description"].startswith(f"clean {100 * served.result.clean_accuracy:.1f} %")
    assert f"| l_inf | {100 * linf.robust_accuracy:.1f} % (" in version["description"]
    assert "| l_inf | [v1](#/models/served-digits-net/versions/1) |" in model["description"]
    assert not [t for t in model.get("tags", []) if t["key"].startswith("alias_log")]


def test_logged_model_metrics_equal_the_evaluation(served):
    reg, result = served.registration, served.result
    logged = _get(served.url, f"/api/2.0/mlflow/logged-models/{reg.model_id}")["model"]
    assert logged["info"]["model_id"] == reg.model_id
    assert logged["info"]["status"] == "LOGGED_MODEL_READY"
    metrics = {m["key"]: m["value"] for m in logged["data"]["metrics"]}
    expected = {"clean_acc": result.clean_accuracy,
                "robust_acc_linf": result.threats["linf"].robust_accuracy,
                "robust_acc_l2": result.threats["l2"].robust_accuracy}
    assert metrics == expected == result.metrics()
    assert metrics["robust_acc_linf"] > 0  # the adversarially trained model keeps some
    params = {p["key"]: p["value"] for p in logged["data"]["params"]}
    assert params["architecture"] == "test_resnet" and params["attack_version"] == "apgdt"
    assert params["eval_n"] == "16"
    # The artifacts went through the server into its --artifacts-destination.
    stored = list(served.server.artifacts.rglob(f"{reg.model_id}/artifacts/model.safetensors"))
    assert len(stored) == 1 and stored[0].stat().st_size == Path(served.model_file).stat().st_size
    assert list(served.server.artifacts.rglob(f"{reg.model_id}/artifacts/evaluation.json"))


def _assert_loads_like_the_original(served, tracking_uri: str | None) -> None:
    from raytrain_at.model_refs import resolve_model
    from raytrain_at.models.model_files import load_model_file

    loaded = resolve_model(f"models:/{NAME}@champion-linf", tracking_uri=tracking_uri)
    original = load_model_file(served.model_file)
    assert loaded.weights_sha256 == original.weights_sha256
    x = torch.rand(8, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(loaded.module(x), original.module(x))


def test_model_loads_back_by_alias_through_the_server(served, monkeypatch, tmp_path):
    """Alias -> version -> logged model -> model.safetensors, downloaded through the server's
    artifact proxy: the same outputs as the original file. Only the explicit tracking URI names
    the server (no environment), and nothing is created in the working folder."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("MLFLOW_REGISTRY_URI", raising=False)
    _assert_loads_like_the_original(served, served.url)
    assert not (tmp_path / "mlflow.db").exists()


def _require_chromium() -> None:
    """A missing browser fails the check rather than skipping it: `make browser-check`
    installs Debian's chromium (scripts/setup_browser.sh) before running these."""
    if shutil.which("chromium") is None:
        pytest.fail("chromium not installed: run scripts/setup_browser.sh (make browser-check)")


def _run_script(tmp_path: Path, out: Path, *args: str) -> tuple[dict, str]:
    """The screenshot script's JSON report and the rendered DOM of its page."""
    done = subprocess.run([sys.executable, str(SCRIPT), "--out", str(out), *args],
                          capture_output=True, text=True, timeout=900, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(done.stdout.strip().splitlines()[-1])
    return report, out.with_suffix(".html").read_text()


@pytest.mark.slow
def test_screenshot_script_renders_the_version_page(tmp_path):
    """The version page of a real server in headless Chromium shows its report card without a
    click: clean and l_inf / l_2 / l_1 accuracy with counts and 95 % intervals, n, the paper's
    row and number beside ours, and the lineage."""
    _require_chromium()
    out = tmp_path / "registry.png"
    report, dom = _run_script(tmp_path, out)
    assert report["ok"] and report["png"] == str(out)
    assert report["url"].endswith("/#/models/robust-digits-demo/versions/1")
    assert all(report["dom_contains"].values()) and "champion-linf" in report["dom_contains"]
    metrics, n = report["metrics"], 16
    for key in ("clean_acc", "robust_acc_linf", "robust_acc_l2", "robust_acc_l1"):
        shown = f"{100 * metrics[key]:.1f} % ({round(metrics[key] * n)}/{n})"
        assert report["dom_contains"][shown], (key, shown)  # in the card's table, as rendered
        assert f"<td>{shown}</td>" in dom, shown
    for text in ("n = 16", "Lineage", "Paper row", "Table 2 (small)", "50.16"):
        assert report["dom_contains"][text], text
    assert report["dom_shows_removed"] == []
    from PIL import Image

    with Image.open(out) as image:
        assert image.size == (1400, 1000)
        assert len(image.convert("RGB").getcolors(maxcolors=1 << 24)) > 64
    assert out.stat().st_size > 20_000
    assert "robust-digits-demo" in dom


@pytest.mark.slow
def test_models_page_lists_champions_and_robust_accuracies(tmp_path):
    """The registered model's page of a real server, in headless Chromium: its description's
    champions table (each norm's holder, accuracy and interval), the champion-linf / -l2 / -l1
    aliases and robust-accuracy tags; no per-move alias tag; and the screenshot visibly differs
    from the same page before the registration."""
    _require_chromium()
    out = tmp_path / "models.png"
    report, dom = _run_script(tmp_path, out, "--page", "model")
    assert report["ok"] and report["url"].endswith("/#/models/robust-digits-demo")
    assert "Champions" in dom and report["dom_shows_removed"] == []
    for norm in ("linf", "l2", "l1"):
        assert report["dom_contains"][f"champion-{norm}"], report["dom_contains"]
        assert report["dom_contains"][f"robust_acc_{norm}"], report["dom_contains"]
        shown = f"{100 * report['metrics'][f'robust_acc_{norm}']:.1f}%"
        assert shown in dom, (norm, shown)  # the tag the Models list shows
    assert report["png_check"]["changed_vs_empty"] > 0.005
