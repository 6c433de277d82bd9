"""``raytrain-at register`` and ``leaderboard``: what goes into a registered version and how the
registry reads back as the paper's Table 2.

Everything is checked before MLflow is touched: the model file and its spec, the evaluation JSON
(format, and that it evaluated these very weights), the guards (an untrustworthy evaluation is
refused unless forced, and then tagged), and the explicit choice to register without evaluation.
The version's report card (its description in ``mlflow ui``) is drafted here from the model
file's training record and the evaluation; the registry fills in the runs and writes it.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from raytrain_at.config import RunConfig, available_recipes, flatten, load_config
from raytrain_at.errors import UserError
from raytrain_at.evaluation.result import EvaluationResult, read_result
from raytrain_at.evaluation.threats import THREAT_TITLES
from raytrain_at.model_refs import local_model_file
from raytrain_at.models.model_files import file_sha256, read_model_spec
from raytrain_at.names import check_name
from raytrain_at.registry.leaderboard_formats import records, rich_table
from raytrain_at.registry.report_card import Lineage, VersionCard
from raytrain_at.tracking.redact import without_userinfo

GUARDS_FILE = "guards.json"


def _training_facts(metadata: dict[str, str]) -> dict[str, Any]:
    """Epochs, attack steps, recipe and dataset from the model file's training record; a clean
    training (no attack) has 0 attack steps and no training radius."""
    text = metadata.get("raytrain_at.run_config")
    if not text:
        return {"epochs": None, "attack_steps": None, "recipe": None, "dataset": None,
                "train_eps": None, "train_objective": None, "train_norm": None}
    config = json.loads(text)
    attack, objective = config["attack"], config["objective"]["kind"]
    attacked = attack["kind"] != "none" and objective != "clean"
    return {"epochs": config["schedule"]["epochs"],
            "attack_steps": attack["steps"] if attacked else 0,
            "recipe": config.get("recipe"), "dataset": config["data"]["train"],
            "train_eps": attack["eps"] if attacked else None, "train_objective": objective,
            "train_norm": attack["norm"] if attacked else None}


def _model_size(spec) -> tuple[float, float]:
    """Parameters (M) and FLOPs (G) at the training resolution."""
    from raytrain_at.models import count_flops, count_params

    model = spec.build()
    return (count_params(model) / 1e6,
            count_flops(model, spec.resolution) / 1e9)


def registration_payload(model_file: Path, result: EvaluationResult | None,
                         reference: str) -> tuple[dict, dict, dict, dict]:
    """(params, metrics, tags, comparable) of a version."""
    from raytrain_at.registry.mlflow_registry import code_version

    spec, metadata = read_model_spec(model_file)
    params_m, flops_g = _model_size(spec)
    params: dict[str, Any] = {
        "architecture": spec.name, "stem": spec.stem or "default", "params_m": f"{params_m:.2f}",
        "flops_g": f"{flops_g:.3f}", "num_classes": spec.num_classes,
        "trained_resolution": spec.resolution, "crop_pct": spec.crop_pct,
        "source_run": metadata.get("raytrain_at.source_run"), "source": reference,
        # The epoch whose weights these are: a training run's model is its selected epoch.
        "selected_epoch": metadata.get("raytrain_at.epoch"),
        "selected_by": metadata.get("raytrain_at.selected_by"),
        **_training_facts(metadata)}
    tags = {"weights_sha256": file_sha256(model_file), "code_version": code_version(),
            "model_spec": spec.to_json()}
    metrics: dict[str, float] = {}
    comparable: dict[str, str] = {}
    if result is None:
        tags["evaluated"] = "false"
        return params, metrics, tags, comparable
    tags["evaluated"] = "true"
    # One tag says whether to trust the numbers; the guards themselves are in guards.json.
    tags["trustworthy"] = str(result.trustworthy).lower()
    metrics.update(result.metrics())
    params.update({"attack_version": result.version, "eval_kernels": result.kernels,
                   "eval_n": result.data.n,
                   "eval_resolution": result.data.resolution, "eval_data": result.data.path,
                   "eval_seed": result.seed})
    for norm, threat in result.threats.items():
        params[f"eps_{norm}"] = f"{threat.eps:.6g}"
        comparable[norm] = (f"eps={threat.eps:.6g};data={Path(result.data.path).name};"
                            f"n={result.data.n};res={result.data.resolution}")
    return params, metrics, tags, comparable


def register_model(model_ref: str, name: str, *, eval_path: str | Path | None = None,
                   unevaluated: bool = False, force: bool = False,
                   tracking_uri: str | None = None):
    """Register ``model_ref`` as a new version of ``name`` (see module docstring)."""
    from raytrain_at.registry.mlflow_registry import ModelRegistry, stage_model_dir

    check_name(name, "model name")
    if eval_path is None and not unevaluated:
        raise UserError("no --eval result given: evaluate first (raytrain-at evaluate), or pass "
                        "--unevaluated to register without robust accuracy")
    if eval_path is not None and unevaluated:
        raise UserError("--eval and --unevaluated contradict each other")
    model_file = local_model_file(model_ref, tracking_uri)
    read_model_spec(model_file)  # a checkpoint without its spec fails here
    result = read_result(eval_path) if eval_path is not None else None
    weights = file_sha256(model_file)
    if result is not None and result.model.weights_sha256 != weights:
        raise UserError(f"{eval_path}: it evaluated weights {result.model.weights_sha256[:12]}, "
                        f"but {model_ref!r} has {weights[:12]}")
    if result is not None and not result.trustworthy and not force:
        failed = ", ".join(g.name for g in result.guards if not g.passed)
        raise UserError(f"{eval_path}: the evaluation failed guards ({failed}); not registered "
                        "(--force registers it tagged untrustworthy)")
    params, metrics, tags, comparable = registration_payload(model_file, result, model_ref)
    if result is not None and not result.trustworthy:
        tags["forced"] = "true"
    files: dict[str, str] = {}  # what each staged file is, for the report card's links
    with tempfile.TemporaryDirectory(prefix="raytrain-at-guards-") as tmp:
        extras = []
        if eval_path is not None and result is not None:
            extras.append(Path(eval_path))
            files["result"] = Path(eval_path).name
            guards = Path(tmp) / GUARDS_FILE
            guards.write_text(json.dumps([g.model_dump() for g in result.guards], indent=1))
            extras.append(guards)
            files["guards"] = GUARDS_FILE
            for label, sweep in (("eps sweep", result.eps_sweep),
                                 ("resolution sweep", result.resolution_sweep)):
                if sweep is not None and sweep.plot and Path(sweep.plot).is_file():
                    extras.append(Path(sweep.plot))
                    files[label] = Path(sweep.plot).name
        folder = stage_model_dir(model_file, extras)
    spec, metadata = read_model_spec(model_file)
    card = draft_card(params, metadata, result, files, forced=bool(tags.get("forced")))
    if spec.mean is not None:
        card.params["normalisation"] = f"mean {spec.mean}, std {spec.std}"
    try:
        return ModelRegistry(tracking_uri).register(
            name=name, model_dir=folder, params=params, metrics=metrics, tags=tags,
            comparable=comparable, eligible=result is not None and result.trustworthy,
            source_run_id=metadata.get("raytrain_at.source_run") or _run_of_reference(model_ref),
            evaluation_file=Path(eval_path) if eval_path is not None else None,
            dataset=evaluation_dataset(result) if result is not None else None, card=card)
    finally:
        shutil.rmtree(folder.parent, ignore_errors=True)


def draft_card(params: dict[str, Any], metadata: dict[str, str],
               result: EvaluationResult | None, files: dict[str, str],
               forced: bool = False) -> VersionCard:
    """The report card of a version before registering (name, version and runs come later)."""
    config = _run_config(metadata)
    model = (config or {}).get("model", {})
    init, pretrained = model.get("init"), model.get("pretrained")
    lineage = Lineage(init=init, pretrained=pretrained,
                      init_source_run=_source_run_of_file(init),
                      selected_epoch=params.get("selected_epoch"),
                      epochs=None if params.get("epochs") is None else str(params["epochs"]),
                      selected_by=params.get("selected_by"), recorded=config is not None)
    return VersionCard(name="", version="", model_id="", experiment_id="", params=dict(params),
                       result=result, lineage=lineage, files=files,
                       recipe_changes=recipe_changes(config), forced=forced)


def _run_config(metadata: dict[str, str]) -> dict[str, Any] | None:
    text = metadata.get("raytrain_at.run_config")
    return json.loads(text) if text else None


def _source_run_of_file(init: str | None) -> str | None:
    """The training run a local ``model.init`` file records, if it is a model file here."""
    if not init or init.startswith(("hub:", "run:", "runs:/", "models:/")):
        return None
    path = Path(init)
    if not path.is_file():
        return None
    try:
        return read_model_spec(path)[1].get("raytrain_at.source_run")
    except UserError:
        return None


# Keys whose difference from the recipe says nothing about what was trained: where it ran and
# was tracked, and how many workers shared the global batch.
_NOT_RECIPE = ("tracking.", "scaling.", "data.loader_workers", "schedule.log_every_steps",
               "schedule.checkpoint_every")


def recipe_changes(config: dict[str, Any] | None) -> list[str] | None:
    """``key=value`` for each trained setting that differs from the bundled recipe the run
    names (None when there is no record or no such recipe). Paths are compared after
    expanding ``$VARS`` and ``~``, and by file name."""
    if not config or config.get("recipe") not in available_recipes():
        return None
    recipe = flatten(load_config(config["recipe"]))
    ours = flatten(RunConfig.model_validate(config))
    changed = []
    for key, value in ours.items():
        if key.startswith(_NOT_RECIPE) or _same_setting(recipe.get(key), value):
            continue
        changed.append(f"{key}={value}")
    return changed


def _same_setting(recipe: Any, ours: Any) -> bool:
    if recipe == ours:
        return True
    if isinstance(recipe, str) and isinstance(ours, str):
        expanded = os.path.expanduser(os.path.expandvars(recipe))
        return expanded == ours or ("/" in expanded and Path(expanded).name == Path(ours).name)
    if isinstance(recipe, int | float) and isinstance(ours, int | float):
        return abs(recipe - ours) <= 1e-9 * max(abs(recipe), abs(ours))
    return False


def _run_of_reference(model_ref: str) -> str | None:
    """The run a ``runs:/RUN_ID/...`` reference names (a model file without its own record)."""
    parts = model_ref.split("/")
    return parts[1] if model_ref.startswith("runs:/") and len(parts) > 2 else None


def evaluation_dataset(result: EvaluationResult):
    """The evaluation data as an MLflow dataset. The digest covers what identifies the images
    the attack saw (file size, its first and last MiB, n, side, crop) rather than whole files
    of gigabytes; a file that no longer exists is named by its recorded facts only."""
    from raytrain_at.registry.mlflow_registry import EvaluationDataset

    data = result.data
    digest = hashlib.sha256(f"{data.n}|{data.resolution}|{data.crop_pct}".encode())
    path = Path(data.path)
    if path.is_file():
        size = path.stat().st_size
        digest.update(str(size).encode())
        with open(path, "rb") as handle:
            digest.update(handle.read(1 << 20))
            handle.seek(max(0, size - (1 << 20)))
            digest.update(handle.read(1 << 20))
    name = f"{path.stem or data.path}-n{data.n}-{data.resolution}px"
    profile = json.dumps({"n": data.n, "resolution": data.resolution,
                          "crop_pct": data.crop_pct})
    return EvaluationDataset(name=name, digest=digest.hexdigest()[:16],
                             source=str(path.resolve()) if path.is_file() else data.path,
                             profile=profile)


def leaderboard(norm: str = "linf", size: str | None = None, name: str | None = None,
                tracking_uri: str | None = None) -> list[dict[str, Any]]:
    """Registered versions as Table 2 rows, best first for ``norm``'s robust accuracy.

    Raises:
        UserError: ``name`` is not a registered model (an empty table would hide the typo).
    """
    from raytrain_at.registry.mlflow_registry import ModelRegistry, leaderboard_rows

    registry = ModelRegistry(tracking_uri)
    rows = registry.rows(name)
    if name is not None and not rows and not registry.has_model(name):
        raise UserError(f"--name {name!r}: no registered model of that name in "
                        f"{without_userinfo(registry.tracking_uri)}")
    return leaderboard_rows(rows, norm, size)


def leaderboard_table(rows: list[dict[str, Any]], norm: str):
    """A rich table in the layout of the paper's Table 2, with radius, data and n."""
    return rich_table(records(rows), f"Registered robust models, sorted by {THREAT_TITLES[norm]}")
