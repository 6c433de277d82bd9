"""Evaluation: AutoAttack through the CLI equals pyautoattack; sharded equals single-process;
killed runs resume to the same result; sweeps, corruptions, guards; one-line input errors."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.nn as nn
from typer.testing import CliRunner

from raytrain_at.cli import app, main
from raytrain_at.errors import UserError
from raytrain_at.evaluation.autoattack import attack_chunk, build_autoattack
from raytrain_at.evaluation.guards import autoattack_guards, capture_autoattack_warnings
from raytrain_at.evaluation.result import read_result
from raytrain_at.evaluation.runner import load_images
from raytrain_at.evaluation.sweeps import expected_robustness
from raytrain_at.evaluation.threats import ThreatModel, parse_eps, parse_norms, scaled_eps
from raytrain_at.models.model_files import load_model_file

LINF = 8 / 255


def _cli(args: list[str]):
    result = CliRunner().invoke(app, args, catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return result


def _digits(home: str, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    path = Path(home) / "datasets" / "digits_test.beton"
    return load_images(str(path), list(range(n)), resolution=16, crop_pct=1.0, batch_size=64,
                       device=torch.device("cpu"))


@pytest.mark.slow  # 64 s on 2 cores: in CI's end-to-end stage
def test_cli_standard_linf_equals_direct_pyautoattack(robust_model_file, eval_home, tmp_path):
    from pyautoattack import AutoAttack

    n = 12
    out = tmp_path / "standard.json"
    _cli(["evaluate", robust_model_file, "--data", "digits", "--norms", "linf", "--eps-linf",
          "8/255", "--n", str(n), "--batch-size", str(n), "--seed", "3", "--out", str(out),
          "--state-dir", str(tmp_path / "state")])
    ours = read_result(out).threats["linf"]
    # The preprocessing the attack saw, spelled out in the result (the model's own crop: none).
    data = read_result(out).data
    assert (data.resolution, data.crop_pct, data.resize_side) == (16, 1.0, 16)
    assert data.preprocessing is not None and data.preprocessing.startswith("no crop")

    model = load_model_file(robust_model_file).module
    x, y = _digits(eval_home, n)
    reference = AutoAttack(model, norm="Linf", eps=LINF, version="standard", seed=3,
                           device="cpu")
    x_adv, y_adv = reference.run_standard_evaluation(x, y, batch_size=n)
    robust = y_adv.eq(y).tolist()
    assert [s == "robust" for s in ours.status] == robust
    assert ours.robust_accuracy == pytest.approx(sum(robust) / n)
    assert 0 < ours.robust_accuracy < ours.clean_accuracy  # the attacks did something
    assert list(ours.after_attack) == ["apgd-ce", "apgd-t", "fab-t", "square"]
    assert ours.max_perturbation <= LINF * (1 + 1e-4)
    # The summary names the weights by hash, also one that rich could take for a style tag.
    from rich.console import Console

    from raytrain_at.evaluation.result import summary_table

    result = read_result(out)
    lettered = result.model_copy(update={"model": result.model.model_copy(
        update={"weights_sha256": "ab" * 32})})
    console = Console(width=200, record=True, file=open(os.devnull, "w"))
    console.print(summary_table(lettered))
    assert "[abababababab]" in console.export_text()


@pytest.fixture(scope="module")
def single_process_fast(robust_model_file, eval_home, tmp_path_factory):
    """A fast (APGD-CE + APGD-T) l_inf + l_2 evaluation of 20 images in 4 chunks, 1 process."""
    tmp = tmp_path_factory.mktemp("single")
    out = tmp / "single.json"
    _cli(["evaluate", robust_model_file, "--data", "digits", "--norms", "linf,l2", "--version",
          "fast", "--n", "20", "--batch-size", "5", "--out", str(out), "--state-dir",
          str(tmp / "state")])
    return read_result(out)


@pytest.mark.slow  # about 80 s with its reference run; .ci/run runs it after the fast suite
def test_two_ray_workers_equal_one_process(single_process_fast, robust_model_file, tmp_path):
    """Also runs the workers with ``--kernels fast``: on a CPU that is the same arithmetic plus
    the exact checks of every break, so the statuses must still be identical."""
    out = tmp_path / "sharded.json"
    _cli(["evaluate", robust_model_file, "--data", "digits", "--norms", "linf,l2", "--version",
          "fast", "--n", "20", "--batch-size", "5", "--workers", "2", "--kernels", "fast",
          "--out", str(out), "--state-dir", str(tmp_path / "state")])
    sharded = read_result(out)
    for norm in ("linf", "l2"):
        assert sharded.threats[norm].status == single_process_fast.threats[norm].status
        assert sharded.threats[norm].after_attack == single_process_fast.threats[norm].after_attack
        assert sharded.threats[norm].unconfirmed == 0
    assert sharded.workers == 2
    assert (sharded.kernels, single_process_fast.kernels) == ("fast", "exact")
    # The l_2 radius defaults to the paper's 2.0 scaled from 224 to 16 pixels.
    assert sharded.threats["l2"].eps == pytest.approx(2.0 * 16 / 224)


@pytest.mark.slow  # about 50 s; in CI the cluster rehearsal checks the same across nodes
def test_killed_evaluation_resumes_to_the_same_result(single_process_fast, robust_model_file,
                                                     tmp_path):
    state = tmp_path / "state"
    out = tmp_path / "resumed.json"
    args = [sys.executable, "-m", "raytrain_at.cli", "evaluate", robust_model_file, "--data",
            "digits", "--norms", "linf,l2", "--version", "fast", "--n", "20", "--batch-size",
            "5", "--out", str(out), "--state-dir", str(state)]
    process = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                               env=dict(os.environ))
    deadline = time.time() + 120
    finished: list[Path] = []
    while time.time() < deadline and len(finished) < 2:
        finished = [p for p in state.rglob("chunk-*.json") if json.loads(p.read_text())["complete"]]
        time.sleep(0.2)
    assert process.poll() is None, "the evaluation ended before it could be interrupted"
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert not out.exists()
    records = len(list(state.rglob("chunk-*.json")))
    assert 2 <= records < 8  # some chunks done, not all: the kill came midway

    _cli(args[3:])  # the same command again resumes
    resumed = read_result(out)
    for norm in ("linf", "l2"):
        assert resumed.threats[norm].status == single_process_fast.threats[norm].status


def test_eps_sweep_is_monotone_with_expected_robustness(robust_model_file, tmp_path):
    out = tmp_path / "sweep.json"
    _cli(["evaluate", robust_model_file, "--data", "digits", "--norms", "linf", "--version",
          "apgdt", "--n", "24", "--batch-size", "24", "--eps-sweep", "2/255,4/255,8/255,16/255",
          "--out", str(out), "--state-dir", str(tmp_path / "state")])
    result = read_result(out)
    sweep = result.eps_sweep
    accs = [p.robust_accuracy for p in sweep.points]
    assert accs == sorted(accs, reverse=True) and accs[0] > accs[-1]
    assert accs[-1] <= sweep.expected_robustness <= sweep.clean_accuracy
    guard = next(g for g in result.guards if g.name.startswith("non_increasing_in_eps"))
    assert guard.passed
    assert Path(sweep.plot).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_resolution_sweep_and_corruptions(robust_model_file, tmp_path):
    out = tmp_path / "res.json"
    _cli(["evaluate", robust_model_file, "--data", "digits", "--norms", "linf,l2", "--version",
          "apgdt", "--n", "16", "--batch-size", "16", "--resolution", "32",
          "--resolution-sweep", "16,24,32", "--corruptions", "--out", str(out),
          "--state-dir", str(tmp_path / "state")])
    result = read_result(out)
    points = result.resolution_sweep.points
    assert [p.resolution for p in points] == [16, 24, 32]
    # l_inf keeps its radius, l_2 grows with the side.
    assert [p.eps["linf"] for p in points] == pytest.approx([4 / 255] * 3)
    assert [p.eps["l2"] for p in points] == pytest.approx([2 * s / 224 for s in (16, 24, 32)])
    assert Path(result.resolution_sweep.plot).is_file()
    corr = result.corruptions
    assert corr.severity == 3 and sum(corr.counts.values()) == 16 and len(corr.counts) > 3
    assert 0.0 < corr.accuracy <= 1.0


class _Randomised(nn.Module):
    """Adds fresh noise to every input: a randomised defence."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.inner(x + 0.05 * torch.randn_like(x))


class _Softmax(nn.Module):
    """Returns probabilities instead of logits (saturates gradients)."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.inner(x).softmax(1)


@pytest.mark.parametrize("wrapper, guard", [(_Randomised, "randomized"),
                                             (_Softmax, "logits_range")])
def test_guards_fire_on_randomised_and_softmax_models(robust_model_file, eval_home, wrapper,
                                                      guard):
    base = load_model_file(robust_model_file).module
    x, y = _digits(eval_home, 8)
    for model, should_fire in ((base, False), (wrapper(base).eval(), True)):
        aa = build_autoattack(model, ThreatModel("linf", LINF), "apgdt", 0, "cpu", 10)
        with capture_autoattack_warnings() as seen:
            attack_chunk(model, aa, x, y, list(range(8)), "linf", batch_size=8, warnings=seen)
        outcome = {g.name: g.passed for g in autoattack_guards(seen)}
        assert outcome[guard] is (not should_fire)


class _WrongWhenFast(nn.Module):
    """The 'fast' model of the kernels test: the exact model's logits rolled by one class, so it
    misclassifies every image the exact model gets right (a worst case of faster arithmetic)."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.inner(x).roll(1, dims=1)


def test_fast_kernels_cannot_lower_robust_accuracy(robust_model_file, eval_home):
    """With ``kernels='fast'`` every break is checked by the exact model and the images whose
    break does not hold are attacked again with exact kernels: even a fast model that is wrong
    everywhere gives exactly the exact evaluation, and the re-attacks are counted."""
    exact = load_model_file(robust_model_file).module
    n = 10
    x, y = _digits(eval_home, n)
    threat = ThreatModel("linf", LINF)
    ids = list(range(n))
    exact_aa = build_autoattack(exact, threat, "fast", 0, "cpu", 10)
    reference = attack_chunk(exact, exact_aa, x, y, ids, "linf", batch_size=n)
    wrong = _WrongWhenFast(exact).eval()
    fast_aa = build_autoattack(wrong, threat, "fast", 0, "cpu", 10)
    checked = attack_chunk(wrong, fast_aa, x, y, ids, "linf", batch_size=n, kernels="fast",
                           exact_model=exact, exact_aa=exact_aa)
    assert checked.status == reference.status
    assert 0 < reference.status.count("robust") < reference.status.count("robust") + \
        reference.status.count("apgd-ce")  # the attacks broke some images and not others
    # Every image alive before an attack was 'broken' by the wrong model and re-attacked.
    wrong, by_ce = reference.status.count("misclassified"), reference.status.count("apgd-ce")
    alive_before = [n - wrong, n - wrong - by_ce]
    assert checked.unconfirmed == sum(alive_before)
    assert reference.unconfirmed == 0


def test_attacked_weights_are_frozen(robust_model_file, eval_home, tmp_path, monkeypatch):
    """The attacks differentiate with respect to the images only: evaluation freezes the weights,
    so FAB's backward() computes no weight gradients (half its time on a CPU)."""
    import raytrain_at.model_refs as model_refs
    from raytrain_at.evaluation.runner import EvalJob, evaluate_chunks
    from raytrain_at.models.model_files import file_sha256

    loaded = load_model_file(robust_model_file)
    monkeypatch.setattr(model_refs, "resolve_model", lambda *args, **kwargs: loaded)
    data = str(Path(eval_home) / "datasets" / "digits_test.beton")
    job = EvalJob(model_ref=robust_model_file, weights_sha256=file_sha256(Path(robust_model_file)),
                  data_path=data, ids=(0, 1), resolution=16, crop_pct=1.0,
                  threats=(ThreatModel("linf", LINF),), version="apgdt", seed=0, batch_size=2,
                  num_classes=10, state_root=str(tmp_path / "state"))
    assert all(p.requires_grad for p in loaded.module.parameters())
    evaluate_chunks(job, [0])
    assert not any(p.requires_grad for p in loaded.module.parameters())
    assert all(p.grad is None for p in loaded.module.parameters())


def test_a_worker_attacks_only_its_units(robust_model_file, eval_home, tmp_path):
    """One chunk in two norms: a worker given the l_2 unit writes that record and no other,
    and the l_2 result equals the one of a run over the whole chunk."""
    from raytrain_at.evaluation.runner import (EvalJob, evaluate_chunks, evaluate_units,
                                               read_record)
    from raytrain_at.models.model_files import file_sha256

    def job(root: str) -> EvalJob:
        return EvalJob(model_ref=robust_model_file,
                       weights_sha256=file_sha256(Path(robust_model_file)),
                       data_path=str(Path(eval_home) / "datasets" / "digits_test.beton"),
                       ids=(0, 1, 2), resolution=16, crop_pct=1.0,
                       threats=(ThreatModel("linf", LINF), ThreatModel("l2", 0.5)),
                       version="apgdt", seed=0, batch_size=3, num_classes=10, state_root=root)

    shared, whole = job(str(tmp_path / "units")), job(str(tmp_path / "whole"))
    linf, l2 = shared.threats
    evaluate_units(shared, [(0, l2.key)])
    assert read_record(shared.record_path(linf, 0)) is None
    evaluate_chunks(whole, [0])
    assert read_record(shared.record_path(l2, 0)) == read_record(whole.record_path(l2, 0))


def test_channels_last_model_gives_nchw_gradients(robust_model_file):
    """The fast kernels' model layout: same outputs and the same input gradient, returned
    NCHW-contiguous (pyautoattack flattens it with .view)."""
    from raytrain_at.evaluation.kernels import ChannelsLastModel

    exact = load_model_file(robust_model_file).module
    twin = ChannelsLastModel(load_model_file(robust_model_file).module).eval()
    x = torch.rand(4, 3, 16, 16, requires_grad=True)
    (g_exact,) = torch.autograd.grad(exact(x).logsumexp(1).sum(), [x])
    (g_twin,) = torch.autograd.grad(twin(x).logsumexp(1).sum(), [x])
    assert g_twin.is_contiguous() and g_twin.view(4, -1).shape == (4, 768)
    assert torch.allclose(g_twin, g_exact, atol=1e-5)


def test_expected_robustness_is_the_trapezoid_area():
    # Accuracy 1.0 at 0, 0.5 at 1, 0 at 2: area 0.75 + 0.25 = 1.0 over radius 2.
    assert expected_robustness(1.0, [1.0, 2.0], [0.5, 0.0]) == pytest.approx(0.5)
    assert expected_robustness(0.8, [0.5, 1.0], [0.8, 0.8]) == pytest.approx(0.8)


def test_radius_parsing_and_scaling():
    assert parse_eps("4/255", "--eps-linf") == pytest.approx(4 / 255)
    for bad in ("4/0", "-1", "0", "abc", "nan"):
        with pytest.raises(UserError, match="--eps-linf"):
            parse_eps(bad, "--eps-linf")
    with pytest.raises(UserError, match="'l3'"):
        parse_norms("linf,l3")
    assert scaled_eps(ThreatModel("l1", 75.0), 448, 224).eps == pytest.approx(300.0)
    assert scaled_eps(ThreatModel("linf", 0.1), 448, 224).eps == pytest.approx(0.1)


@pytest.mark.parametrize("args, culprit", [
    (["/nonexistent/model.safetensors", "--data", "digits"], "/nonexistent/model.safetensors"),
    (["runs:/abc"], "runs:/abc"),
    (["MODEL", "--data", "GARBAGE"], "GARBAGE"),
    (["MODEL", "--data", "digits", "--eps-linf", "4/0"], "--eps-linf"),
    (["MODEL", "--data", "digits", "--eps-l2", "-2"], "--eps-l2"),
    (["MODEL", "--data", "digits", "--norms", "linf,l5"], "l5"),
    (["MODEL", "--data", "digits", "--version", "strong"], "strong"),
    (["MODEL", "--data", "digits", "--kernels", "turbo"], "turbo"),
    (["MODEL", "--data", "digits", "--n", "100000"], "--n"),
])
def test_bad_input_gives_one_line_errors(args, culprit, robust_model_file, eval_home, tmp_path,
                                         monkeypatch, capsys):
    garbage = tmp_path / "garbage.beton"
    garbage.write_bytes(b"not an ffcv file" * 100)
    args = [robust_model_file if a == "MODEL" else str(garbage) if a == "GARBAGE" else a
            for a in args]
    if "--data" not in args:
        args += ["--data", "digits"]
    out = tmp_path / "never.json"
    monkeypatch.setattr(sys, "argv", ["raytrain-at", "evaluate", *args, "--out", str(out)])
    with pytest.raises(SystemExit) as exit_info:
        main()
    assert exit_info.value.code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), lines
    expected = str(garbage) if culprit == "GARBAGE" else culprit
    assert expected in lines[0]
    assert not out.exists()


def test_vit_model_file_loads_at_another_resolution(tmp_path):
    from raytrain_at.models import unwrap
    from raytrain_at.models.model_files import ModelSpec, save_model_file

    spec = ModelSpec(name="test_vit", num_classes=10, resolution=32, crop_pct=0.875)
    torch.manual_seed(0)
    path = save_model_file(tmp_path / "model.safetensors", spec.build(), spec)
    at_trained = load_model_file(path).module
    at_48 = load_model_file(path, resolution=48).module
    grid = unwrap(at_48).patch_embed.grid_size
    assert tuple(grid) == (48 // unwrap(at_48).patch_embed.patch_size[0],) * 2
    with torch.no_grad():
        assert at_48(torch.rand(2, 3, 48, 48)).shape == (2, 10)
    # Same weights apart from the resampled positional embedding.
    a, b = unwrap(at_trained).state_dict(), unwrap(at_48).state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a if "pos_embed" not in k)
    assert a["pos_embed"].shape != b["pos_embed"].shape


def test_model_file_without_spec_is_refused(tmp_path):
    from safetensors.torch import save_file

    path = tmp_path / "plain.safetensors"
    save_file({"w": torch.zeros(1)}, str(path))
    with pytest.raises(UserError, match="no model metadata"):
        load_model_file(path)


def test_monotonicity_guard_fires_on_a_rise():
    from raytrain_at.evaluation.guards import non_increasing

    assert non_increasing("linf", [0, 1, 2], [0.9, 0.5, 0.4]).passed
    broken = non_increasing("linf", [0, 1, 2], [0.9, 0.4, 0.5])
    assert not broken.passed and "0.4000 at 1 < 0.5000 at 2" in broken.detail


def test_one_evaluation_section_for_the_command_the_study_and_the_benchmark():
    """The CLI request, a Tune study's section and the benchmark's default are all
    EvaluationSettings; norms and the paper's radii come from one place."""
    from raytrain_at.attacks import lp_geometry
    from raytrain_at.evaluation.evaluate import EvaluationRequest, evaluation_request
    from raytrain_at.evaluation.settings import (BENCHMARK_EVALUATION, PAPER_PROTOCOL,
                                                 EvaluationSettings)
    from raytrain_at.evaluation.threats import NORMS, PAPER_EPS
    from raytrain_at.finetune_benchmark.spec import BenchmarkSpec
    from raytrain_at.registry import leaderboard_formats, mlflow_registry
    from raytrain_at.tuning.spaces import StudyEvaluation

    assert issubclass(EvaluationRequest, EvaluationSettings)
    assert issubclass(StudyEvaluation, EvaluationSettings)
    assert NORMS == ("linf", "l2", "l1")
    assert lp_geometry.NORMS is NORMS and mlflow_registry.NORMS is NORMS
    assert leaderboard_formats.NORMS is NORMS
    assert PAPER_PROTOCOL.eps == PAPER_EPS and PAPER_PROTOCOL.norms == list(NORMS)
    assert PAPER_PROTOCOL.version == "standard" and not PAPER_PROTOCOL.corruptions
    assert BENCHMARK_EVALUATION.settings() == {**PAPER_PROTOCOL.settings(), "corruptions": True}
    benchmark = BenchmarkSpec.model_fields["evaluation"].default
    assert benchmark.settings(only_set=True) == BENCHMARK_EVALUATION.settings(only_set=True)
    assert (benchmark.top, benchmark.register_best, benchmark.workers) == (1, False, 2)
    # A study's section becomes a request as it is (no field-by-field copy).
    study = StudyEvaluation(version="apgdt", norms=["l2", "linf"], eps={"linf": "8/255"}, n=9)
    request = EvaluationRequest(**study.settings(), model_ref="m", data="digits")
    assert request.settings() == study.settings()
    assert request.eps["linf"] == pytest.approx(8 / 255)
    for values, culprit in (({"version": "strong"}, "version"), ({"norms": ["l3"]}, "norms"),
                            ({"norms": ["l2", "l2"]}, "repeat"),
                            ({"eps": {"l2": -1.0}}, "eps.l2"), ({"severity": 7}, "severity"),
                            ({"eps_sweep": ["4/255", "2/255"]}, "strictly increasing"),
                            ({"n": 0}, "'n'")):
        with pytest.raises(UserError, match=culprit):
            evaluation_request(model_ref="m", data="digits", **values)


@pytest.mark.slow  # 40 s on 2 cores: in CI's end-to-end stage
def test_retried_units_give_one_process_records(robust_model_file, eval_home, tmp_path):
    """What a retried evaluation task does: a worker process that ran one share runs the lost
    worker's share next, one unit resumed from the partial record a killed attempt leaves
    (its clean pass only). Its records equal one process's over every chunk, and the images and
    labels one loader reads for all chunks equal each chunk's own (FFCV recycles its buffers
    after a few batches: labels kept as views were overwritten by later batches' labels)."""
    from dataclasses import replace

    from raytrain_at.evaluation.autoattack import ROBUST
    from raytrain_at.evaluation.runner import (EvalJob, evaluate_chunks, evaluate_units,
                                               read_record, write_record)
    from raytrain_at.models.model_files import file_sha256

    data = str(Path(eval_home) / "datasets" / "digits_test.beton")
    ids = tuple(range(16))  # 8 chunks of 2: more batches than FFCV keeps buffers for

    def job(root: str) -> EvalJob:
        return EvalJob(model_ref=robust_model_file,
                       weights_sha256=file_sha256(Path(robust_model_file)), data_path=data,
                       ids=ids, resolution=16, crop_pct=1.0, threats=(ThreatModel("linf", LINF),),
                       version="apgdt", seed=0, batch_size=2, num_classes=10, state_root=root)

    x_all, y_all = load_images(data, list(ids), resolution=16, crop_pct=1.0, batch_size=2,
                               device=torch.device("cpu"))
    for start in range(0, len(ids), 2):
        x, y = load_images(data, list(ids[start:start + 2]), resolution=16, crop_pct=1.0,
                           batch_size=2, device=torch.device("cpu"))
        assert torch.equal(y_all[start:start + 2], y) and torch.equal(x_all[start:start + 2], x)

    single, retried = job(str(tmp_path / "single")), job(str(tmp_path / "retried"))
    (threat,) = single.threats
    chunks = list(range(len(single.chunks())))
    evaluate_chunks(single, chunks)
    done = [read_record(single.record_path(threat, c)) for c in chunks]
    assert all(r is not None and r.complete for r in done)
    first = done[0]
    assert first is not None
    # The killed attempt's record of chunk 0: the clean pass saved, no attack finished.
    write_record(retried.record_path(threat, 0),
                 replace(first, status=[s if s == "misclassified" else ROBUST
                                        for s in first.status],
                         attacks_done=[], complete=False, max_perturbation=0.0, warnings={}))
    evaluate_units(retried, [(c, threat.key) for c in chunks[1::2]])  # its own share
    evaluate_units(retried, [(c, threat.key) for c in chunks[0::2]])  # the lost one, retried
    again = [read_record(retried.record_path(threat, c)) for c in chunks]
    assert [r.status for r in again if r] == [r.status for r in done if r]
    assert [r.max_perturbation for r in again if r] == [r.max_perturbation for r in done if r]
    # Labels come from the file, not from a recycled buffer: the clean accuracy is the model's.
    assert sum(s != "misclassified" for r in done if r for s in r.status) >= len(ids) // 2
