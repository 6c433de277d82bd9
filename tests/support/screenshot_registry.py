"""Screenshot a registered model in the MLflow UI, registered through a real tracking server.

    python tests/support/screenshot_registry.py --out registry.png [--page version|model|models|
        logged-model] [--model-file PATH] [--keep-server]
    python tests/support/screenshot_registry.py --store sqlite:///DIR/mlflow.db --name NAME
        [--version N] --page version|model --out page.png

What it does, all on 127.0.0.1 with throw-away storage (a temporary folder, removed at the end):

1. starts ``mlflow server`` on a free port (SQLite store, artifacts proxied by the server into the
   temporary folder, one worker), or with ``--store`` on an existing store (the quickstart's);
2. meanwhile takes the model: ``--model-file``, or a small ``test_resnet`` (10 classes, 16x16)
   trained for two clean epochs on the bundled digits; evaluates it with AutoAttack ``apgdt`` on
   16 bundled digits (l_inf, l_2 and l_1) unless ``--eval`` gives a result or ``--unevaluated``
   skips it, so that the version has metrics and champion aliases (steps 1-2 take about 30 s on 2
   CPU cores); with ``--store`` nothing is registered;
3. registers it through the server (``register_model(..., tracking_uri=http://127.0.0.1:PORT)``);
4. opens the page in headless Chromium (Debian's ``chromium``) - by default the registered
   version, ``#/models/NAME/versions/N`` - saves the screenshot and checks it (a PNG of the
   window's size with more than a handful of colours), and dumps the rendered DOM to check that
   the page shows what a person reads there (:func:`page_evidence`): on the version page its
   report card (clean and each robust accuracy as ``25.0 % (4/16)`` with its 95 % interval,
   ``n = 16``, the paper's row and number, the lineage), on the model page the champions table
   with each champion's accuracy and interval; and that no page shows a per-move
   ``alias_log.*`` tag;
5. prints one JSON line (url, png, checks, version) and stops the server by its process
   group (``--keep-server`` keeps it serving until Ctrl-C / SIGTERM, to look around). With
   ``RAYTRAIN_AT_CI_ARTIFACTS`` set (``make browser-check`` sets ``ci-artifacts/registry``), the
   PNG and the DOM dump are also copied there, for CI to keep.

Exit status: 0 when every check passed, 1 when one failed (the PNG and DOM are kept for a look;
the error names the missing text), 2 for usage errors, a missing Chromium (``error: chromium
not found: apt-get install chromium``) or a model that cannot be registered.

The server helper (:class:`MlflowServer`) is also what ``tests/test_registry_server.py`` uses.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

from raytrain_at.runtime.ports import free_local_port

HOST = "127.0.0.1"
PAGES = {
    "models": "#/models",
    "version": "#/models/{name}/versions/{version}",
    "model": "#/models/{name}",
    "logged-model": "#/experiments/{experiment_id}/models/{model_id}",
}


def mlflow_command() -> list[str]:
    """The ``mlflow`` CLI of this interpreter's environment."""
    exe = Path(sys.executable).with_name("mlflow")
    return [str(exe)] if exe.exists() else [sys.executable, "-m", "mlflow"]


class ServerError(RuntimeError):
    """The server did not come up (the message ends with its log)."""


class MlflowServer:
    """``mlflow server`` on 127.0.0.1 with a private store under ``root``.

    The backend store is ``sqlite:///ROOT/mlflow.db``; artifacts go through the server
    (``--serve-artifacts``, the default since MLflow 2, with ``--default-artifact-root
    mlflow-artifacts:/``) into ``ROOT/artifacts`` (``--artifacts-destination``), so a client
    uploads and downloads over HTTP and never touches the folder itself. One uvicorn worker; the
    job-execution runner (MLflow 3's Huey consumer, on by default) and telemetry are switched off.

    The server runs in its own session (``start_new_session=True``): :meth:`stop` signals the whole
    process group it created (the ``mlflow`` CLI and its uvicorn child), never anything else.
    """

    def __init__(self, root: str | Path, port: int | None = None, workers: int = 1,
                 backend_store_uri: str | None = None) -> None:
        self.root = Path(root)
        self.backend_store_uri = backend_store_uri
        self.port = port or free_local_port(HOST)
        self.workers = workers
        self.artifacts = self.root / "artifacts"
        self.store = self.root / "mlflow.db"
        self.proc: subprocess.Popen | None = None
        self._logs: list[Any] = []
        self._restarts = 0

    @property
    def url(self) -> str:
        return f"http://{HOST}:{self.port}"

    def command(self) -> list[str]:
        return [*mlflow_command(), "server", "--host", HOST, "--port", str(self.port),
                "--backend-store-uri", self.backend_store_uri or f"sqlite:///{self.store}",
                "--serve-artifacts", "--default-artifact-root", "mlflow-artifacts:/",
                "--artifacts-destination", str(self.artifacts),
                "--workers", str(self.workers)]

    def start(self) -> "MlflowServer":
        """Launch the server (returns at once; :meth:`wait_ready` waits for ``/health``)."""
        self.root.mkdir(parents=True, exist_ok=True)
        self.artifacts.mkdir(exist_ok=True)
        env = dict(os.environ)
        env.setdefault("MLFLOW_SERVER_ENABLE_JOB_EXECUTION", "false")
        env.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
        env.setdefault("PYTHONUNBUFFERED", "1")
        stdout = open(self.root / "server.out", "ab")
        stderr = open(self.root / "server.err", "ab")
        self._logs += [stdout, stderr]
        self.proc = subprocess.Popen(self.command(), stdin=subprocess.DEVNULL, stdout=stdout,
                                     stderr=stderr, cwd=self.root, env=env,
                                     start_new_session=True)
        return self

    def log_tail(self, chars: int = 4000) -> str:
        text = ""
        for name in ("server.out", "server.err"):
            path = self.root / name
            if path.exists():
                text += f"--- {name}\n" + path.read_text(errors="replace")[-chars:]
        return text

    def healthy(self) -> bool:
        try:
            with urllib.request.urlopen(f"{self.url}/health", timeout=2) as response:
                return response.status == 200
        except (urllib.error.URLError, ConnectionError, OSError):
            return False

    def wait_ready(self, timeout: float = 60.0) -> "MlflowServer":
        """Wait until ``GET /health`` answers; a server that dies because its port was taken
        meanwhile is restarted on another port (twice at most)."""
        if self.proc is None:
            self.start()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            code = self.proc.poll()
            if code is not None:
                log = self.log_tail()
                if "already in use" in log.lower() and self._restarts < 2:
                    self._restarts += 1
                    self.stop()
                    (self.root / "server.err").rename(self.root / f"server.err.{self._restarts}")
                    self.port = free_local_port(HOST)  # somebody took it meanwhile
                    self.start()
                    continue
                raise ServerError(f"mlflow server exited with status {code} before answering "
                                  f"/health\n{log}")
            if self.healthy():
                return self
            time.sleep(0.25)
        raise ServerError(f"mlflow server at {self.url} did not answer /health within "
                          f"{timeout:.0f} s\n{self.log_tail()}")

    def stop(self, grace: float = 15.0) -> None:
        """SIGTERM the server's process group, SIGKILL it after ``grace`` seconds if needed."""
        proc = self.proc
        if proc is not None:
            _stop_group(proc, grace)
        for handle in self._logs:
            handle.close()
        self._logs = []

    def __enter__(self) -> "MlflowServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
        return True
    except ProcessLookupError:
        return False
    except PermissionError:  # only a stranger could hold the id now
        return False


def _stop_group(proc: subprocess.Popen, grace: float) -> None:
    """Stop ``proc`` and every process of the group it leads (it was started with
    ``start_new_session=True``, so its pid is the group id and the group holds only its own
    children)."""
    pgid = proc.pid
    if proc.poll() is None or _group_alive(pgid):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pgid, signal.SIGTERM)
    try:
        proc.wait(timeout=grace)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pgid, signal.SIGKILL)
        proc.wait(timeout=30)
    # Children (uvicorn) outliving the CLI: give them a moment, then kill what is left.
    deadline = time.monotonic() + 5
    while _group_alive(pgid) and time.monotonic() < deadline:
        time.sleep(0.1)
    if _group_alive(pgid):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pgid, signal.SIGKILL)


# ---------------------------------------------------------------------------------- the model
def build_model(path: Path, epochs: int = 2) -> Path:
    """A small ``test_resnet`` for 10 classes at 16x16 (seed 0), trained for ``epochs`` clean
    epochs on the digits' training split (about 90 % clean accuracy after two; ``0`` keeps the
    random weights)."""
    import torch
    import torch.nn.functional as F

    from raytrain_at.data.sources import digits_split_indices, digits_tensors
    from raytrain_at.models.model_files import ModelSpec, save_model_file

    torch.manual_seed(0)
    spec = ModelSpec(name="test_resnet", num_classes=10, resolution=16, crop_pct=1.0)
    model = spec.build()
    if epochs > 0:
        x, y = digits_tensors(side=16)
        train = torch.as_tensor(digits_split_indices("train"))
        x, y = x[train], y[train]
        opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
        model.train()
        for _ in range(epochs):
            order = torch.randperm(len(x))
            for start in range(0, len(x), 100):
                batch = order[start:start + 100]
                loss = F.cross_entropy(model(x[batch]), y[batch])
                opt.zero_grad()
                loss.backward()
                opt.step()
    save_model_file(path, model.eval(), spec)
    return path


def evaluate_model(model_file: Path, work: Path, data: str) -> Path:
    """AutoAttack apgdt, l_inf, l_2 and l_1, on the first 16 images of ``data`` (a bundled
    dataset or a .beton), in this process."""
    from raytrain_at.evaluation.evaluate import EvaluationRequest, evaluate

    _, out = evaluate(EvaluationRequest(
        model_ref=str(model_file), data=data, norms=["linf", "l2", "l1"], version="apgdt", n=16,
        batch_size=16, out=work / "evaluation.json", state_root=work / "eval-state"))
    return out


# ---------------------------------------------------------------------------------- chromium
def chromium_binary() -> str | None:
    return shutil.which("chromium")


def run_chromium(binary: str, action: list[str], url: str, profile: Path, window: str,
                 budget_ms: int, timeout: float = 120.0) -> subprocess.CompletedProcess:
    """One headless Chromium run (screenshot or DOM dump) in its own process group and profile."""
    command = [binary, "--headless=new", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
               "--no-first-run", "--no-default-browser-check", "--disable-extensions",
               f"--user-data-dir={profile}", f"--window-size={window}",
               f"--virtual-time-budget={budget_ms}", *action, url]
    proc = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        _stop_group(proc, 5)
        out, err = proc.communicate()
        raise RuntimeError(f"chromium did not finish within {timeout:.0f} s: {err[-1500:]}")
    finally:
        if _group_alive(proc.pid):  # renderer/zygote helpers left behind
            _stop_group(proc, 5)
    return subprocess.CompletedProcess(command, proc.returncode, out, err)


def png_check(path: Path, window: str) -> dict[str, Any]:
    """Size, dimensions and number of distinct colours of the screenshot (a blank or single-colour
    page has a handful; the MLflow UI has thousands)."""
    from PIL import Image

    info: dict[str, Any] = {"exists": path.is_file()}
    if not info["exists"]:
        return info | {"ok": False}
    with Image.open(path) as image:
        rgb = image.convert("RGB")
        colours = rgb.getcolors(maxcolors=1 << 24)
        info |= {"bytes": path.stat().st_size, "size": list(rgb.size),
                 "distinct_colours": len(colours) if colours else 1 << 24}
    want = [int(v) for v in window.split(",")]
    info["ok"] = (info["size"] == want and info["distinct_colours"] > 64
                  and info["bytes"] > 20_000)
    return info


def changed_fraction(before: Path, after: Path) -> float:
    """Share of pixels that differ visibly between two screenshots of one page (a model row,
    aliases and tags that appear are thousands of pixels; a page that did not render them is
    the same picture)."""
    from PIL import Image, ImageChops

    with Image.open(before) as a, Image.open(after) as b:
        diff = ImageChops.difference(a.convert("RGB"), b.convert("RGB")).convert("L")
        changed = sum(diff.histogram()[24:])
        return changed / (diff.size[0] * diff.size[1])


def version_facts(client, name: str, version: str) -> dict[str, Any]:
    """What the server holds about a version: its aliases, its logged model's metrics and
    params (where a page's evidence comes from)."""
    held = client.get_registered_model(name).aliases
    logged_id = (client.get_model_version(name, version).source or "").removeprefix("models:/")
    logged = client.get_logged_model(logged_id)
    return {"name": name, "version": str(version), "model_id": logged_id,
            "experiment_id": logged.experiment_id,
            "aliases": sorted(a for a, v in held.items() if str(v) == str(version)),
            "all_aliases": sorted(held),
            "metrics": {m.key: m.value for m in logged.metrics or []},
            "params": dict(logged.params or {})}


def _accuracy_texts(facts: dict[str, Any], key: str) -> list[str]:
    """How a version's report card prints an accuracy: ``25.0 % (4/16)`` and its interval."""
    from raytrain_at.evaluation.intervals import accuracy_interval, interval_text

    value, n = facts["metrics"][key], int(facts["params"]["eval_n"])
    return [f"{100 * value:.1f} % ({round(value * n)}/{n})",
            interval_text(accuracy_interval(value, n))]


def page_evidence(page: str, facts: dict[str, Any]) -> list[str]:
    """Strings the rendered DOM must hold: what a person reads there, which only the server's
    answers (and, on the version and model pages, their descriptions) can put on the page."""
    from raytrain_at.evaluation.intervals import accuracy_interval, interval_text
    from raytrain_at.registry.paper_rows import reference_rows

    name, metrics = facts["name"], facts["metrics"]
    robust = [k for k in ("robust_acc_linf", "robust_acc_l2", "robust_acc_l1") if k in metrics]
    if page == "logged-model":
        return [name, "clean_acc" if metrics else "architecture"]
    if page == "models":  # the list: the model, its champion aliases and accuracy tags
        return [name, *facts["all_aliases"],
                *[f"robust_acc_{a.removeprefix('champion-')}" for a in facts["all_aliases"]]]
    if page == "model":  # the champions table of the description, the versions, the tags
        evidence = [name, "Champions", *facts["all_aliases"]]
        n = int(facts["params"].get("eval_n") or 0)
        for alias in facts["aliases"]:
            key = f"robust_acc_{alias.removeprefix('champion-')}"
            evidence += [key, f"{100 * metrics[key]:.1f} "
                         f"{interval_text(accuracy_interval(metrics[key], n))}"]
        return evidence
    # The version's report card: clean and robust accuracy with counts and intervals, n, the
    # paper's row beside ours, the lineage; plus a tag and the aliases the page always shows.
    evidence = [name, "code_version", *facts["aliases"]]
    if not metrics:
        return evidence + ["Not evaluated"]
    for key in ["clean_acc", *robust]:
        evidence += _accuracy_texts(facts, key)
    evidence += [f"n = {facts['params']['eval_n']}", "Lineage", "Paper row"]
    params_m = float(facts["params"].get("params_m") or "nan")
    rows, _ = reference_rows(facts["params"].get("recipe"),
                             params_m if params_m == params_m else None)
    for row in rows[:1]:
        evidence += [row.table, f"{row.linf:.2f}"]
    return evidence


# Text no page may show any more: the per-move alias tags of earlier versions.
ABSENT = ("alias_log.",)


def keep_for_ci(paths: list[Path]) -> list[str]:
    """Copy screenshots and DOM dumps into ``$RAYTRAIN_AT_CI_ARTIFACTS`` (what CI keeps as
    the run's artifacts: ``make browser-check`` sets it to ``ci-artifacts/registry``)."""
    folder = os.environ.get("RAYTRAIN_AT_CI_ARTIFACTS")
    if not folder:
        return []
    target = Path(folder)
    target.mkdir(parents=True, exist_ok=True)
    kept = []
    for path in paths:
        if path.is_file():
            shutil.copy2(path, target / path.name)
            kept.append(str(target / path.name))
    return kept


# ---------------------------------------------------------------------------------- main
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Register a model through a local MLflow server and screenshot its page.")
    parser.add_argument("--out", type=Path, default=Path("registry.png"),
                        help="PNG to write [registry.png]")
    parser.add_argument("--model-file", type=Path, default=None,
                        help="model.safetensors with its spec [a 16x16 test_resnet trained "
                             "briefly on digits]; a model for other data needs --eval, "
                             "--unevaluated or --data")
    parser.add_argument("--train-epochs", type=int, default=2,
                        help="clean epochs for the built-in model; 0: random weights [2]")
    parser.add_argument("--eval", dest="eval_path", type=Path, default=None,
                        help="evaluation JSON of --model-file (skips the built-in evaluation)")
    parser.add_argument("--unevaluated", action="store_true",
                        help="register without evaluation (no metrics, no aliases)")
    parser.add_argument("--data", default="digits",
                        help="data of the built-in evaluation: bundled name or .beton [digits]")
    parser.add_argument("--name", default="robust-digits-demo",
                        help="registered model name [robust-digits-demo]")
    parser.add_argument("--page", choices=sorted(PAGES), default="version",
                        help="models: the Models list (names, champion aliases, accuracy "
                             "tags); version: the registered version (aliases, tags); model: the "
                             "registered model (versions table); logged-model: the logged model "
                             "(metrics, params) [version]")
    parser.add_argument("--window-size", default="1400,1000", help="W,H [1400,1000]")
    parser.add_argument("--budget-ms", type=int, default=15000,
                        help="Chromium's --virtual-time-budget [15000]")
    parser.add_argument("--dom-out", type=Path, default=None,
                        help="also write the rendered DOM here [OUT with .html]")
    parser.add_argument("--keep-server", action="store_true",
                        help="after the screenshot keep serving until Ctrl-C / SIGTERM")
    parser.add_argument("--startup-timeout", type=float, default=90.0,
                        help="seconds to wait for the server's /health [90]")
    parser.add_argument("--store", default=None,
                        help="serve this existing backend store (e.g. sqlite:///DIR/mlflow.db "
                             "after the quickstart) and check --name's pages instead of "
                             "registering the built-in model")
    parser.add_argument("--version", default=None,
                        help="with --store: the version to check [the champion-linf holder, "
                             "else the newest]")
    args = parser.parse_args(argv)
    if args.store is not None and (args.model_file or args.eval_path or args.unevaluated):
        parser.error("--store checks a registry as it is: it takes no --model-file, --eval "
                     "or --unevaluated")
    if args.eval_path is not None and args.unevaluated:
        parser.error("--eval and --unevaluated contradict each other")
    if args.eval_path is not None and args.model_file is None:
        parser.error("--eval needs the --model-file it evaluated")
    try:
        width, height = (int(v) for v in args.window_size.split(","))
        assert width > 0 and height > 0
    except (ValueError, AssertionError):
        parser.error(f"--window-size {args.window_size!r}: expected W,H")
    return args


def _wait_for_interrupt(server: MlflowServer, url: str) -> None:
    print(f"serving {url} (Ctrl-C to stop)", file=sys.stderr, flush=True)
    stop = {"now": False}

    def _handler(signum, frame):
        stop["now"] = True

    signal.signal(signal.SIGTERM, _handler)
    try:
        while not stop["now"] and server.proc.poll() is None:
            time.sleep(0.5)
    except KeyboardInterrupt:
        pass


def _register_builtin(args, work: Path, server: MlflowServer, binary: str) -> tuple[str, str]:
    """Build, evaluate and register the model through the server; (name, version)."""
    from raytrain_at.registry.register import register_model

    model_file = args.model_file or build_model(work / "model.safetensors", args.train_epochs)
    eval_path = args.eval_path
    if eval_path is None and not args.unevaluated:
        eval_path = evaluate_model(model_file, work, args.data)
    server.wait_ready(args.startup_timeout)
    if args.page in ("models", "model"):  # before: to see what registering adds
        run_chromium(binary, [f"--screenshot={work / 'before.png'}"], f"{server.url}/" + PAGES[
            args.page].format(name=urllib.parse.quote(args.name, safe="")),
                     work / "chromium-before", args.window_size, args.budget_ms)
    registration = register_model(str(model_file), args.name, eval_path=eval_path,
                                  unevaluated=eval_path is None, tracking_uri=server.url)
    return registration.name, registration.version


def _version_of(client, name: str, wanted: str | None) -> str:
    """``wanted``, else the champion-linf holder, else the newest version."""
    from raytrain_at.errors import UserError

    if wanted:
        return wanted
    model = client.get_registered_model(name)
    if "champion-linf" in model.aliases:
        return str(model.aliases["champion-linf"])
    versions = client.search_model_versions(f"name = '{name}'")
    if not versions:
        raise UserError(f"--name {name!r}: no version registered in --store")
    return str(max(int(v.version) for v in versions))


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    binary = chromium_binary()
    if binary is None:
        print("error: chromium not found: apt-get install chromium", file=sys.stderr)
        return 2
    if args.model_file is not None and not args.model_file.is_file():
        print(f"error: --model-file {str(args.model_file)!r}: no such file", file=sys.stderr)
        return 2
    out = args.out.resolve()
    out.parent.mkdir(parents=True, exist_ok=True)
    dom_out = (args.dom_out or out.with_suffix(".html")).resolve()
    work = Path(tempfile.mkdtemp(prefix="raytrain-at-registry-shot-"))
    os.environ["RAYTRAIN_AT_HOME"] = str(work / "home")  # bundled data written here, not in ~
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    server = MlflowServer(work / "mlflow", backend_store_uri=args.store)
    try:
        server.start()  # boots (about 15 s on 2 cores) while the model is built and evaluated
        # MLflow and the evaluation print progress to stdout; stdout is for the JSON line only.
        with contextlib.redirect_stdout(sys.stderr):
            from mlflow.tracking import MlflowClient

            from raytrain_at.errors import UserError

            try:
                if args.store is None:
                    name, version = _register_builtin(args, work, server, binary)
                else:
                    server.wait_ready(args.startup_timeout)
                    client = MlflowClient(tracking_uri=server.url, registry_uri=server.url)
                    name = args.name
                    version = _version_of(client, name, args.version)
                facts = version_facts(MlflowClient(tracking_uri=server.url,
                                                   registry_uri=server.url), name, version)
            except UserError as exc:
                print(f"error: {exc}", file=sys.stderr)
                return 2
        url = f"{server.url}/" + PAGES[args.page].format(
            name=urllib.parse.quote(name, safe=""), version=version,
            experiment_id=facts["experiment_id"], model_id=facts["model_id"])
        profile = work / "chromium-profile"
        if out.exists():
            out.unlink()
        shot = run_chromium(binary, [f"--screenshot={out}"], url, profile, args.window_size,
                            args.budget_ms)
        dom = run_chromium(binary, ["--dump-dom"], url, profile, args.window_size,
                           args.budget_ms)
        dom_out.write_text(dom.stdout)
        png = png_check(out, args.window_size)
        found = {text: text in dom.stdout for text in page_evidence(args.page, facts)}
        shown_but_gone = [text for text in ABSENT if text in dom.stdout]
        baseline = work / "before.png"
        if baseline.exists():
            png["changed_vs_empty"] = changed_fraction(baseline, out)
            png["ok"] = png["ok"] and png["changed_vs_empty"] > 0.005
        ok = (shot.returncode == 0 and png["ok"] and all(found.values())
              and not shown_but_gone)
        report = {
            "ok": ok, "url": url, "png": str(out), "dom": str(dom_out), "page": args.page,
            "png_check": png, "dom_contains": found, "dom_shows_removed": shown_but_gone,
            "dom_chars": len(dom.stdout), "chromium": binary,
            "chromium_returncode": shot.returncode, "tracking_uri": server.url, "name": name,
            "version": version, "model_id": facts["model_id"], "aliases": facts["aliases"],
            "metrics": facts["metrics"], "evaluated": bool(facts["metrics"]),
            "kept": keep_for_ci([out, dom_out]), "server_kept": args.keep_server}
        print(json.dumps(report), flush=True)
        if not ok:
            missing = [text for text, seen in found.items() if not seen]
            print(f"error: the page check failed: the rendered page lacks {missing}"
                  + (f" and shows {shown_but_gone}" if shown_but_gone else "")
                  + f" (png {png}); chromium said: {shot.stderr[-1500:]}", file=sys.stderr)
        if args.keep_server:
            _wait_for_interrupt(server, url)
        return 0 if ok else 1
    except ServerError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    finally:
        server.stop()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
