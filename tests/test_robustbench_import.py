"""RobustBench in: the paper's published checkpoints import with exactly RobustBench's logits.

RobustBench's own model definitions (from its wheel, see robustbench_reference.py) get random
weights standing in for the downloads; the checkpoint is saved in one of the layouts RobustBench
reads (plain, inside ``state_dict``, with a ``module.`` prefix), imported, and the imported
model must give RobustBench's logits on the same [0, 1] input.
"""

from __future__ import annotations

import sys

import pytest
import timm
import torch
from robustbench_reference import ZOO_ARGUMENT, convstem_module, zoo_source

from raytrain_at.cli import main
from raytrain_at.models.model_files import load_model_file, read_model_spec
from raytrain_at.models.robustbench import ENTRIES, import_robustbench

LAYOUTS = {
    "plain": lambda state: state,
    "state_dict": lambda state: {"state_dict": state},
    "module": lambda state: {f"module.{k}": v for k, v in state.items()},
}


@pytest.fixture(scope="module")
def robustbench():
    return convstem_module()


def _theirs(robustbench, name: str, seed: int) -> torch.nn.Module:
    """RobustBench's model of ``name`` with every parameter randomised (not just initialised:
    LayerNorm weights of one and zero biases would hide a mixed-up norm)."""
    torch.manual_seed(seed)
    model = robustbench.get_convstem_models(ZOO_ARGUMENT[name])
    with torch.no_grad():
        for param in model.parameters():
            param.add_(torch.randn_like(param) * 0.02)
    return model.eval()


def _check_parity(robustbench, name: str, layout: str, tmp_path) -> None:
    theirs = _theirs(robustbench, name, seed=len(name))
    checkpoint = tmp_path / f"{layout}.pt"
    torch.save(LAYOUTS[layout](theirs.state_dict()), checkpoint)
    out = import_robustbench(f"robustbench:{name}", checkpoint, tmp_path / "model.safetensors")
    ours = load_model_file(out).module
    x = torch.rand(2, 3, 224, 224, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected, got = theirs(x), ours(x)
    scale = expected.abs().max().item()
    assert scale > 1e-3  # the logits say something
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5 * scale)
    # A transform from timm's data config fits the imported model (it normalises inside).
    config = timm.data.resolve_data_config(model=ours)
    assert config["input_size"] == (3, 224, 224) and config["crop_pct"] == 0.875
    assert config["mean"] == (0.0, 0.0, 0.0) and config["std"] == (1.0, 1.0, 1.0)
    spec, meta = read_model_spec(out)
    assert spec.name == ENTRIES[name].model and meta["raytrain_at.imported_from"].endswith(name)


def test_every_entry_is_in_robustbench_zoo() -> None:
    zoo = zoo_source()
    assert set(ENTRIES) == set(ZOO_ARGUMENT)
    for name, argument in ZOO_ARGUMENT.items():
        start = zoo.index(f"'{name}'")
        assert f"get_convstem_models('{argument}')" in zoo[start:start + 200], name


@pytest.mark.parametrize("name,layout", [
    ("Singh2023Revisiting_ConvNeXt-T-ConvStem", "plain"),
    ("Singh2023Revisiting_ViT-S-ConvStem", "module"),  # normaliser and model. prefix
])
def test_import_gives_robustbench_logits(robustbench, name, layout, tmp_path) -> None:
    _check_parity(robustbench, name, layout, tmp_path)


@pytest.mark.slow
@pytest.mark.parametrize("name,layout", [
    ("Singh2023Revisiting_ConvNeXt-S-ConvStem", "state_dict"),
    ("Singh2023Revisiting_ConvNeXt-B-ConvStem", "module"),
    ("Singh2023Revisiting_ConvNeXt-L-ConvStem", "plain"),
    ("Singh2023Revisiting_ViT-B-ConvStem", "state_dict"),
])
def test_import_gives_robustbench_logits_large(robustbench, name, layout, tmp_path) -> None:
    _check_parity(robustbench, name, layout, tmp_path)


def _cli(monkeypatch, capsys, *args: str) -> tuple[int, list[str]]:
    monkeypatch.setattr(sys, "argv", ["raytrain-at", *args])
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        main()
    return exit_info.value.code, capsys.readouterr().err.strip().splitlines()


def test_bad_imports_give_one_line_and_write_nothing(robustbench, tmp_path, monkeypatch,
                                                      capsys) -> None:
    convnext = tmp_path / "convnext_t.pt"
    torch.save(_theirs(robustbench, "Singh2023Revisiting_ConvNeXt-T-ConvStem", 0).state_dict(),
               convnext)
    out = tmp_path / "model.safetensors"
    cases = [
        (("robustbench:Singh2023Revisiting_ViT-S-ConvStem", str(convnext)),
         "does not fit Singh2023Revisiting_ViT-S-ConvStem"),
        (("robustbench:Singh2023Revisiting_ConvNeXt-S-ConvStem", str(convnext)),
         "does not fit Singh2023Revisiting_ConvNeXt-S-ConvStem"),
        (("robustbench:Nosuch2024_X", str(convnext)), "unknown RobustBench model 'Nosuch2024_X'"),
        (("hub:convnext_tiny", str(convnext)), "expected robustbench:NAME"),
        (("robustbench:Singh2023Revisiting_ConvNeXt-T-ConvStem", str(tmp_path / "none.pt")),
         "does not exist"),
    ]
    for args, fragment in cases:
        code, lines = _cli(monkeypatch, capsys, "import", *args, "--out", str(out))
        assert code == 2, args
        assert len(lines) == 1 and lines[0].startswith("error: ") and fragment in lines[0], lines
        assert not out.exists() and not list(tmp_path.glob(".model.safetensors*"))


def test_fine_tuning_an_imported_model_keeps_its_normalisation(tmp_path) -> None:
    """A run that starts from a raw-pixel model file (as imported RobustBench models are)
    trains and saves it with that normalisation, not its backbone's ImageNet statistics."""
    from raytrain_at.config import load_config
    from raytrain_at.models.model_files import ModelSpec, save_model_file
    from raytrain_at.training.loop import build_model, run_model_spec

    spec = ModelSpec(name="convnext_atto_cvst", num_classes=10, resolution=32,
                     mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0))
    torch.manual_seed(0)
    imported = spec.build().eval()
    path = save_model_file(tmp_path / "imported.safetensors", imported, spec)
    config = load_config("quickstart", [f"model.init={path}"])
    started = build_model(config).eval()
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(started(x), imported(x))
    assert run_model_spec(config).mean == (0.0, 0.0, 0.0)



@pytest.mark.parametrize("name,layout,stats", [
    ("Singh2023Revisiting_ConvNeXt-T-ConvStem", "state_dict", ((0.0,) * 3, (1.0,) * 3)),
    ("Singh2023Revisiting_ViT-S-ConvStem", "module", ((0.485, 0.456, 0.406),
                                                      (0.229, 0.224, 0.225))),
])
def test_a_run_can_start_from_a_robustbench_checkpoint_itself(robustbench, name, layout, stats,
                                                              tmp_path) -> None:
    """model.init = the downloaded RobustBench checkpoint, without importing it first: every
    tensor loads (its ConvStem included), the model applies the entry's normalisation and gives
    RobustBench's logits."""
    from raytrain_at.config import load_config
    from raytrain_at.models.pixel_space import normalisation_of
    from raytrain_at.training.loop import build_model_and_report

    theirs = _theirs(robustbench, name, seed=7)
    checkpoint = tmp_path / "checkpoint.pt"
    torch.save(LAYOUTS[layout](theirs.state_dict()), checkpoint)
    config = load_config("quickstart", [f"model.name={ENTRIES[name].model}",
                                        "model.num_classes=1000", f"model.init={checkpoint}"])
    model, report = build_model_and_report(config)
    assert report is not None and report.layout == "robustbench"
    assert report.loaded == report.total and report.fresh == []
    found = normalisation_of(model)
    assert found is not None and all(a == pytest.approx(b) for a, b in zip(found, stats))
    x = torch.rand(2, 3, 224, 224, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        expected, got = theirs(x), model.eval()(x)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5 * expected.abs().max().item())
