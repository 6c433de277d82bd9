"""Seconds per attack of AutoAttack on one chunk of bundled test images (JSON).

Times each attack of the version (standard: APGD-CE, APGD-T, FAB-T, Square) one after the other on
the survivors of the previous ones, as an evaluation worker attacks one chunk
(``raytrain_at.evaluation.autoattack.run_one_attack`` with the ``build_autoattack`` set-up), in one
process. The model is a model file or an MLflow ``runs:/`` / ``models:/`` reference, at its own
resolution, on the first ``--n`` images of a bundled dataset's test split (written on first use).

``--weights-grad`` leaves the weights trainable, as a plain pyautoattack call on a fresh model
does; by default they are frozen, as the evaluation freezes them (FAB's ``backward()`` otherwise
computes every weight's gradient too). Run both to see what freezing saves.

Usage: python scripts/bench_attacks.py MODEL_REF [--n 8] [--norm linf] [--eps 8/255]
           [--version standard] [--data digits] [--tracking-uri URI] [--weights-grad]
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import time
from pathlib import Path

import torch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model_ref", help="model file, runs:/ID/model or models:/NAME/VERSION")
    parser.add_argument("--n", type=int, default=8, help="images in the chunk (one batch)")
    parser.add_argument("--norm", choices=("linf", "l2", "l1"), default="linf")
    parser.add_argument("--eps", default="8/255", help="radius in [0, 1] pixel scale")
    parser.add_argument("--version", choices=("standard", "fast", "apgdt"), default="standard")
    parser.add_argument("--data", default="digits", help="a bundled dataset")
    parser.add_argument("--tracking-uri", default=None, help="for runs:/ and models:/ refs")
    parser.add_argument("--weights-grad", action="store_true",
                        help="leave the weights trainable (as a plain pyautoattack call)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    from raytrain_at.data.write import bundled_beton
    from raytrain_at.evaluation.autoattack import build_autoattack, check_version, run_one_attack
    from raytrain_at.evaluation.runner import load_images
    from raytrain_at.evaluation.threats import ThreatModel, parse_eps
    from raytrain_at.model_refs import resolve_model
    from raytrain_at.storage import default_home

    device = torch.device("cpu")
    loaded = resolve_model(args.model_ref, device=device, tracking_uri=args.tracking_uri)
    model = loaded.module.eval()
    model.requires_grad_(args.weights_grad)
    spec = loaded.spec
    data = bundled_beton(args.data, "test", Path(default_home()))
    x, y = load_images(str(data), list(range(args.n)), resolution=spec.resolution,
                       crop_pct=spec.crop_pct, batch_size=args.n, device=device)
    threat = ThreatModel(args.norm, parse_eps(args.eps, "--eps"))
    aa = build_autoattack(model, threat, args.version, args.seed, device, spec.num_classes)
    attacks: dict[str, dict[str, float]] = {}
    alive = torch.ones(len(y), dtype=torch.bool)
    for attack in check_version(args.version):
        rows = alive.nonzero().flatten()
        start = time.perf_counter()
        if len(rows):
            _, y_adv = run_one_attack(aa, attack, x[rows], y[rows], args.n)
            alive[rows] = y_adv.eq(y[rows])
        attacks[attack] = {"seconds": round(time.perf_counter() - start, 2),
                           "attacked": len(rows), "robust_after": int(alive.sum())}
    total = round(sum(a["seconds"] for a in attacks.values()), 2)
    print(json.dumps({
        "benchmark": "AutoAttack seconds per attack on one chunk",
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "device": "cpu", "cpu": platform.processor() or platform.machine(),
        "torch_threads": torch.get_num_threads(),
        "versions": {"torch": torch.__version__, "python": platform.python_version()},
        "settings": {"model": spec.name, "resolution": spec.resolution, "n": args.n,
                     "threat": threat.label(), "version": args.version, "data": args.data,
                     "weights": "trainable" if args.weights_grad else "frozen"},
        "attacks": attacks, "total_seconds": total}, indent=2))


if __name__ == "__main__":
    main()
