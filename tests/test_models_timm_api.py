"""The zoo speaks timm's model API, on small variants of every registered model (the full-size
models go through timm's own model tests in tests/test_timm_model_tests.py, a slow test):
creation on the meta device, ``features_only`` feature extractors, ``forward_intermediates``,
other input sides (ViTs with ``dynamic_img_size``), TorchScript and torch.fx, with outputs
equal to the eager model's. timm's own tests select some of these by timm's module names, so
they never reach models registered from another package; these tests cover that part."""

from __future__ import annotations

import pytest
import timm
import torch
from timm.models import get_notrace_functions, get_notrace_modules
from torchvision.models.feature_extraction import create_feature_extractor, get_graph_node_names

import raytrain_at.models  # noqa: F401 - registers the models
from raytrain_at.models import CONVSTEM_MODELS

SMALL = {
    "convnext": dict(depths=(1, 1, 2, 1), dims=(16, 32, 64, 128)),
    "vit": dict(embed_dim=64, depth=3, num_heads=2),
    "convnext_iso": dict(depth=3, dim=32),
}
ZOO = (*CONVSTEM_MODELS, "convnext_iso_small")


def _small(name: str) -> dict:
    return SMALL["vit" if name.startswith("vit") else
                 "convnext_iso" if "iso" in name else "convnext"]


def test_every_zoo_model_is_covered() -> None:
    ours = set(timm.list_models(module="zoo"))
    assert ours == set(ZOO)


@pytest.mark.parametrize("name", ZOO)
def test_meta_device_creation(name: str) -> None:
    model = timm.create_model(name, device="meta", **_small(name))
    tensors = [*model.parameters(), *model.buffers()]
    assert tensors and all(t.device.type == "meta" for t in tensors)
    with torch.device("meta"):
        out = model(torch.empty(1, 3, 224, 224))
    assert out.shape == (1, 1000)


@pytest.mark.parametrize("name", ZOO)
def test_features_only_gives_the_feature_info_it_promises(name: str) -> None:
    features = timm.create_model(name, features_only=True, **_small(name)).eval()
    side = 224 if name.startswith("vit") else 96
    outputs = features(torch.rand(1, 3, side, side))
    info = features.feature_info
    assert len(outputs) == len(info.channels()) >= 3
    for out, channels, reduction in zip(outputs, info.channels(), info.reduction()):
        assert out.shape[1:] == (channels, side // reduction, side // reduction)


@pytest.mark.parametrize("name", ZOO)
def test_forward_intermediates_ends_in_forward_features(name: str) -> None:
    model = timm.create_model(name, **_small(name)).eval()
    x = torch.rand(1, 3, 224, 224)
    with torch.no_grad():
        final, intermediates = model.forward_intermediates(x)
        torch.testing.assert_close(final, model.forward_features(x))
    widths = [f["num_chs"] for f in model.feature_info]
    assert [t.shape[1] for t in intermediates] == widths


@pytest.mark.parametrize("name", [n for n in ZOO if n.startswith("vit")])
def test_vits_take_other_sides_with_dynamic_img_size(name: str) -> None:
    model = timm.create_model(name, dynamic_img_size=True, **_small(name)).eval()
    with torch.no_grad():
        assert model(torch.rand(2, 3, 96, 160)).shape == (2, 1000)
        maps = model.forward_intermediates(torch.rand(1, 3, 96, 160), intermediates_only=True)
    assert all(m.shape[-2:] == (6, 10) for m in maps)


# One of each family here (scripting takes seconds); every model in the slow timm run.
@pytest.mark.parametrize("name", ["convnext_atto_cvst", "vit_medium_cvst", "convnext_iso_small",
                                  "convnext_iso_small_cvst"])
def test_torchscript_and_fx_give_the_eager_outputs(name: str) -> None:
    model = timm.create_model(name, **_small(name)).eval()
    x = torch.rand(1, 3, 224, 224)
    with torch.no_grad():
        eager = model(x)
        torch.testing.assert_close(torch.jit.script(model)(x), eager)
        torch.testing.assert_close(_fx(model)(x)["out"], eager)


def _fx(model: torch.nn.Module) -> torch.nn.Module:
    """The model traced by torch.fx to its output node, with timm's untraceable leaves (as
    timm's own FX tests trace it)."""
    tracer_kwargs = dict(leaf_modules=get_notrace_modules(),
                         autowrap_functions=get_notrace_functions(), param_shapes_constant=True)
    _, eval_nodes = get_graph_node_names(model, tracer_kwargs=tracer_kwargs)
    return create_feature_extractor(model, return_nodes={eval_nodes[-1]: "out"},
                                    tracer_kwargs=tracer_kwargs)
