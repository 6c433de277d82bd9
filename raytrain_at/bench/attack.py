"""``raytrain-at bench attack``: seconds per attack of AutoAttack on one chunk of bundled images.

Times each attack of the version (standard: APGD-CE, APGD-T, FAB-T, Square) one after the other on
the survivors of the previous ones, as an evaluation worker attacks one chunk
(``raytrain_at.evaluation.autoattack.run_one_attack`` with the ``build_autoattack`` set-up), in one
process on the CPU. The model is a model file or an MLflow ``runs:/`` / ``models:/`` reference, at
its own resolution, on the first ``n`` images of a bundled dataset's test split (written on first
use under ``RAYTRAIN_AT_HOME``).

``weights_grad`` leaves the weights trainable, as a plain pyautoattack call on a fresh model does;
by default they are frozen, as the evaluation freezes them (FAB's ``backward()`` otherwise computes
every weight's gradient too). Run both to see what freezing saves.
"""

from __future__ import annotations

import platform
import time
from pathlib import Path
from typing import Any

import torch

from raytrain_at.bench.common import cpu_threads, utc_now
from raytrain_at.bench.settings import AttackBenchSettings
from raytrain_at.data.write import bundled_beton
from raytrain_at.evaluation.autoattack import build_autoattack, check_version, run_one_attack
from raytrain_at.evaluation.runner import load_images
from raytrain_at.evaluation.threats import ThreatModel, parse_eps
from raytrain_at.model_refs import resolve_model
from raytrain_at.runtime.storage import default_home


def run_attack_bench(settings: AttackBenchSettings) -> dict[str, Any]:
    """The JSON document of ``bench attack``.

    Raises:
        UserError: a model reference that does not resolve (one line naming it).
    """
    threat = ThreatModel(settings.norm, parse_eps(settings.eps, "--eps"))
    attacks_of_version = check_version(settings.version)
    device = torch.device("cpu")
    loaded = resolve_model(settings.model_ref, device=device, tracking_uri=settings.tracking_uri)
    model = loaded.module.eval()
    model.requires_grad_(settings.weights_grad)
    spec = loaded.spec
    data = bundled_beton(settings.data, "test", Path(default_home()))
    x, y = load_images(str(data), list(range(settings.n)), resolution=spec.resolution,
                       crop_pct=spec.crop_pct, batch_size=settings.n, device=device)
    # FFCV sets torch's threads process-wide (to 1 on import, to a loader's workers).
    torch.set_num_threads(cpu_threads())
    aa = build_autoattack(model, threat, settings.version, settings.seed, device,
                          spec.num_classes)
    attacks: dict[str, dict[str, float]] = {}
    alive = torch.ones(len(y), dtype=torch.bool)
    for attack in attacks_of_version:
        rows = alive.nonzero().flatten()
        start = time.perf_counter()
        if len(rows):
            _, y_adv = run_one_attack(aa, attack, x[rows], y[rows], settings.n)
            alive[rows] = y_adv.eq(y[rows])
        attacks[attack] = {"seconds": round(time.perf_counter() - start, 2),
                           "attacked": len(rows), "robust_after": int(alive.sum())}
    return {
        "benchmark": "AutoAttack seconds per attack on one chunk",
        "date": utc_now(), "device": "cpu", "cpu": platform.processor() or platform.machine(),
        "torch_threads": torch.get_num_threads(),
        "versions": {"torch": torch.__version__, "python": platform.python_version()},
        "settings": {"model": spec.name, "resolution": spec.resolution, "n": settings.n,
                     "threat": threat.label(), "version": settings.version,
                     "data": settings.data,
                     "weights": "trainable" if settings.weights_grad else "frozen"},
        "attacks": attacks,
        "total_seconds": round(sum(a["seconds"] for a in attacks.values()), 2)}
