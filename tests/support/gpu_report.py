"""The GPU check's document: what ``scripts/gpu_check.sh`` ran, read back from its work folder.

Per part (``NAME.part``: its budget and seconds) and per command of it (``NAME.I.out``, ``.log``,
``.rc``): the JSON documents the benchmarks printed, or the JUnit records of the gpu tests, and
the part's status: ``ok``; ``timeout`` (stopped at its budget: the documents of the commands that
finished are kept); ``error`` with one line (the last error line of the command's output);
``skipped`` with the reason (a package that did not travel, or no time left). No figure is ever
filled in for a part that did not measure it; ``goals`` compares the figures with the issues'
targets (``met: null`` where nothing was measured).

Usage: python -m tests.support.gpu_report --work DIR --sizes gpu|cpu-smoke --budget-s S
           --parts a,b,c [--out FILE]
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import re
import sys
import xml.etree.ElementTree as ElementTree
from pathlib import Path
from typing import Any

# "RuntimeError: boom", "error: --batch 0 must be >= 1", "torch.OutOfMemoryError: ...".
_ERROR_LINE = re.compile(r"^(error|[\w.]*(Error|Exception|Interrupt)): ")
_MISSING = re.compile(r"No module named '([\w.]+)'")
MFU_TARGETS = {"convnext_tiny_cvst": 0.30, "vit_base_cvst": 0.40}


def _error_line(log: str) -> str:
    """The last line of ``log`` that states an error (the first line of its message)."""
    lines = [line.strip() for line in log.splitlines() if _ERROR_LINE.match(line.strip())]
    if lines:
        return lines[-1]
    tail = [line.strip() for line in log.splitlines() if line.strip()]
    return tail[-1] if tail else "no output"


def _junit(path: Path) -> list[dict[str, Any]]:
    """One record per test case of a JUnit file: outcome, seconds, properties, message."""
    records = []
    for case in ElementTree.parse(path).getroot().iter("testcase"):
        outcome, message = "passed", None
        for kind in ("failure", "error", "skipped"):
            found = case.find(kind)
            if found is not None:
                outcome = {"failure": "failed"}.get(kind, kind)
                message = (found.get("message") or "").strip().splitlines()[:1]
                message = message[0] if message else kind
        properties = {p.get("name"): _value(p.get("value") or "")
                      for p in case.iter("property")}
        records.append({"test": case.get("name"), "outcome": outcome,
                        "seconds": round(float(case.get("time") or 0), 2),
                        "properties": properties, **({"message": message} if message else {})})
    return records


def _value(text: str) -> Any:
    """A recorded property back as the value it was (tests/test_gpu.py records JSON)."""
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def _text(path: Path) -> str:
    return path.read_text() if path.exists() else ""


def read_part(work: Path, name: str) -> dict[str, Any]:
    """The outcome of part ``name`` from its files in ``work``."""
    budget, seconds = (float(v) for v in (work / f"{name}.part").read_text().split())
    records: list[Any] = []
    status: dict[str, Any] = {"status": "ok"}
    index = 0
    while (work / f"{name}.{index}.rc").exists():
        status_line, log, out = (_text(work / f"{name}.{index}.{kind}")
                                 for kind in ("rc", "log", "out"))
        rc, _, limit = status_line.strip().partition(" ")
        index += 1
        if rc == "skipped":
            status = status if status["status"] != "ok" else {
                "status": "skipped", "reason": "no time left in the overall budget"}
            continue
        if name == "tests" and (work / "tests.xml").exists():
            records = _junit(work / "tests.xml")
        # A version mismatch shows its versions, a preflight blocker its checks (exit 1 both).
        elif rc == "0" or (name in ("versions", "preflight") and out.strip()):
            records.append(json.loads(out))
        if rc in ("124", "137"):
            whole = " (what was left of the overall budget)" if float(limit) < budget else ""
            status = {"status": "timeout",
                      "error": f"stopped at its limit of {limit} s{whole}; finished documents "
                               "kept"}
            break
        if rc != "0" and status["status"] == "ok":
            log += out  # pytest reports on stdout
            missing = _MISSING.search(log)
            failed = [r["test"] for r in records if isinstance(r, dict)
                      and r.get("outcome") in ("failed", "error")]
            if missing and "ModuleNotFoundError" in log:
                status = {"status": "skipped",
                          "reason": f"a package did not travel: No module named "
                                    f"'{missing.group(1)}'"}
            elif failed:
                status = {"status": "error",
                          "error": f"{len(failed)} of {len(records)} tests failed: "
                                   f"{', '.join(failed)}"}
            else:
                status = {"status": "error", "error": _error_line(log)}
    return {**status, "seconds": round(seconds, 1), "budget_s": budget, "records": records}


# ------------------------------------------------------------------------------------ goals
def goal(value: float | bool | None, target: float | bool) -> dict[str, Any]:
    """A figure against its target (``met`` None when it was not measured)."""
    if value is None:
        return {"value": None, "target": target, "met": None}
    met = value is True if isinstance(target, bool) else value >= target
    return {"value": value, "target": target, "met": met}


def _rows(part: dict[str, Any]) -> list[dict[str, Any]]:
    """The model rows of every ``bench step`` document of a part."""
    return [row for doc in part.get("records", []) for row in doc.get("models", [])]


def summarise(parts: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """The issues' goals against what was measured (None where a part did not measure it)."""
    goals: dict[str, Any] = {}
    compiled: dict[str, dict[str, Any]] = {}
    for row in _rows(parts.get("compiled", {})):
        compiled.setdefault(row["model"], row)
    measured: set[str] = set()
    for row in _rows(parts.get("step", {})):
        name = row["model"]
        if name in measured:  # the first batch of a model is its per-GPU batch; more fit t_step
            continue
        measured.add(name)
        goals[f"{name}: ours / paper-style images/s (eager)"] = goal(
            row.get("ratio_ours_over_reference"), 2.0)
        ours_compiled = compiled.get(name, {}).get("ours")
        if ours_compiled is not None:
            goals[f"{name}: ours compiled / paper-style images/s"] = goal(
                round(ours_compiled["images_per_s"] / row["reference"]["images_per_s"], 3), 2.0)
        mfus = [m for m in (row["ours"].get("mfu"), (ours_compiled or {}).get("mfu"))
                if m is not None]
        if name in MFU_TARGETS:
            goals[f"{name}: MFU of ours (best of eager and compiled)"] = goal(
                max(mfus) if mfus else None, MFU_TARGETS[name])
    for doc in parts.get("eval", {}).get("records", []):
        if doc["settings"]["kernels"] == "fast":
            goals["AutoAttack ours (fast kernels) / plain images/s"] = goal(
                doc["ratio_ours_over_plain"], 1.5)
            goals["AutoAttack identical per image (fast kernels)"] = goal(
                doc["identical_per_image"], True)
    for doc in parts.get("preflight", {}).get("records", []):
        goals["preflight: no blocker at the recipe's micro-batch"] = goal(
            doc["blocker"] is None, True)
    outcomes = {r["test"]: r["outcome"] for r in parts.get("tests", {}).get("records", [])}
    for title, test in (("DeepSpeed run: loss falls",
                         "test_worker_loop_loss_falls_under_deepspeed"),
                        ("DeepSpeed run: EMA stays fp32",
                         "test_ema_stays_fp32_while_the_engine_runs_its_precision"),
                        ("DeepSpeed run: no host sync in project code",
                         "test_project_code_never_waits_for_the_device"),
                        ("evaluation path identical to pyautoattack (fast kernels)",
                         "test_evaluation_path_equals_plain_pyautoattack[fast]")):
        if test in outcomes:
            goals[title] = goal(outcomes[test] == "passed", True)
    return goals


def report(work: Path, sizes: str, budget_s: float, parts: list[str]) -> dict[str, Any]:
    """The whole document (see the module docstring)."""
    read = {name: read_part(work, name) for name in parts if (work / f"{name}.part").exists()}
    versions = next(iter(read.get("versions", {}).get("records", [])), {})
    return {
        "check": "raytrain_at GPU check (scripts/gpu_check.sh)", "sizes": sizes,
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "host": platform.node(), "cpu_count": os.cpu_count(),
        "versions": versions.get("versions", {}), "budget_s": budget_s, "parts": read,
        "goals": summarise(read)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", required=True, help="gpu_check.sh's work folder")
    parser.add_argument("--sizes", required=True, help="gpu or cpu-smoke")
    parser.add_argument("--budget-s", type=float, required=True)
    parser.add_argument("--parts", required=True, help="comma-separated, in order")
    parser.add_argument("--out", default=None, help="also write the document here")
    args = parser.parse_args(argv)
    document = report(Path(args.work), args.sizes, args.budget_s,
                      [p for p in args.parts.split(",") if p])
    text = json.dumps(document, indent=2)
    if args.out:
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_suffix(".json.tmp")
        tmp.write_text(text + "\n")
        tmp.replace(out)  # never a half-written document
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
