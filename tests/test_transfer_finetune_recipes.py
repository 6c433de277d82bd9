"""Fine-tuning recipes: the App. A.5 fine-tune to 8/255 from a registered model, and the Table 6
transfer recipes (App. D.6: Flowers-102 at 224, CIFAR-10/100 at 32 with stride-1 stem and first
downsampling), loaded and validated, their models built with the right head, and the CIFAR
stride option giving 32x32-appropriate feature maps."""

from __future__ import annotations

import pytest
import torch

from raytrain_at.config import load_config
from raytrain_at.models import create_robust_model

EPS_8 = 8 / 255
TRANSFER = {  # dataset -> (classes, side, attack steps, lr, weight decay, batch), App. D.6
    "flowers102": (102, 224, 2, 4e-3, 5e-3, 30),
    "cifar10": (10, 32, 10, 2e-4, 0.0, 1024),
    "cifar100": (100, 32, 10, 2e-4, 5e-3, 256),
}
MODELS = ("convnext_tiny_cvst", "convnext_base_cvst")  # the CN-T / CN-B + CvSt rows of Table 6


@pytest.fixture(autouse=True)
def _env(monkeypatch, tmp_path):
    monkeypatch.setenv("RAYTRAIN_AT_DATA", str(tmp_path / "data"))
    monkeypatch.setenv("RAYTRAIN_AT_CKPT", str(tmp_path / "ckpt"))


@pytest.mark.parametrize("model", MODELS)
@pytest.mark.parametrize("dataset", list(TRANSFER))
def test_transfer_recipe_has_the_papers_setting(dataset, model) -> None:
    classes, side, steps, lr, wd, batch = TRANSFER[dataset]
    config = load_config(f"transfer_{dataset}_{model}")
    assert config.model.name == model and config.model.num_classes == classes
    assert config.model.new_head and config.model.init.endswith(f"{model}_8px.safetensors")
    assert config.model.small_input == (side == 32)
    assert config.data.resolution == side and config.data.train.endswith(f"{dataset}_train.beton")
    assert config.attack.eps == pytest.approx(EPS_8) and config.attack.steps == steps
    assert config.attack.kind == "apgd" and config.attack.norm == "linf"
    assert (config.optim.lr, config.optim.weight_decay) == (pytest.approx(lr), pytest.approx(wd))
    assert config.schedule.global_batch_size == batch and config.schedule.epochs == 20
    assert config.optim.warmup_epochs == 2
    # RandAugment only: the heavy preset with MixUp, CutMix and erasing switched off.
    assert config.aug.preset == "heavy"
    assert (config.aug.mixup_alpha, config.aug.cutmix_alpha, config.aug.erase_prob) == (0, 0, 0)


@pytest.mark.parametrize("model", MODELS)
@pytest.mark.parametrize("dataset", list(TRANSFER))
def test_transfer_model_builds_with_a_new_head(dataset, model) -> None:
    config = load_config(f"transfer_{dataset}_{model}")
    side = config.data.resolution
    with torch.device("meta"):
        net = create_robust_model(model, num_classes=config.model.num_classes,
                                  small_input=config.model.small_input)
        out = net(torch.empty(2, 3, side, side))
    assert tuple(out.shape) == (2, config.model.num_classes)


@pytest.mark.parametrize("model", ("convnext_tiny_cvst", "convnext_base_cvst", "vit_small_cvst"))
def test_registered_8px_finetune(model) -> None:
    config = load_config(f"finetune_8px_{model}_registered")
    file_based = load_config(f"finetune_8px_{model}")
    assert config.model.init == f"models:/{model}@champion-linf"
    assert config.attack.eps == pytest.approx(EPS_8)
    assert (config.schedule.epochs, config.optim.lr, config.optim.warmup_epochs) == (25, 1e-4, 5)
    # Everything but the source of the weights is the file-based recipe's.
    assert config.model_copy(update={"model": file_based.model, "recipe": None}) == \
        file_based.model_copy(update={"recipe": None})


def _stage_sides(small_input: bool) -> list[int]:
    with torch.device("meta"):
        net = create_robust_model("convnext_tiny_cvst", num_classes=10, small_input=small_input)
        body = net.backbone
        x = body.stem(torch.empty(2, 3, 32, 32))
        sides = []
        for stage in body.stages:
            x = stage(x)
            sides.append(x.shape[-1])
    return sides


def test_cifar_strides_keep_32px_feature_maps() -> None:
    # Stride-1 stem and first downsampling (App. D.6): stages see 32, 31, 15, 7 (224 px gives
    # 56, 28, 14, 7 without the change), not the 8, 4, 2, 1 of the ImageNet strides.
    assert _stage_sides(small_input=True) == [32, 31, 15, 7]
    assert _stage_sides(small_input=False) == [8, 4, 2, 1]


# ----------------------------------------------------------------- evaluation preprocessing
@pytest.mark.parametrize("model", MODELS)
@pytest.mark.parametrize("dataset", list(TRANSFER))
def test_transfer_models_record_their_datasets_evaluation_crop(dataset, model) -> None:
    """App. D.6: CIFAR is evaluated "in the resolution of the dataset", 32x32 as stored, no
    crop; Flowers-102 at 224 with ImageNet's resize to 256 and centre crop (App. A.4). The model
    file (what evaluate reads) and the held-out checks carry it."""
    from raytrain_at.training.loop import run_model_spec

    config = load_config(f"transfer_{dataset}_{model}")
    expected = 1.0 if TRANSFER[dataset][1] == 32 else 0.875
    assert config.data.evaluation_crop_pct == expected
    # As the worker calls it: with the normalisation its loaded model applies (without one,
    # the spec would fetch the run's MLflow init to read it).
    stats = ((0.0,) * 3, (1.0,) * 3)
    assert run_model_spec(config, stats).crop_pct == expected
    imagenet = load_config("table2_convnext_tiny_cvst_300ep_2step")
    assert run_model_spec(imagenet, stats).crop_pct == 0.875
    assert load_config(f"transfer_{dataset}_{model}",
                       ["data.eval_crop_pct=0.9"]).data.evaluation_crop_pct == 0.9


def test_cifar_test_images_reach_the_attack_as_stored(tmp_path) -> None:
    """At the CIFAR recipes' crop the evaluation loader hands AutoAttack the stored 32x32 pixels
    bit for bit (the ImageNet crop would resize them to 36 and cut the border off)."""
    from dataclasses import replace

    import numpy as np

    from data_fixtures import make_cifar10
    from raytrain_at.data.sources import cifar_samples
    from raytrain_at.data.write import default_options, write_dataset
    from raytrain_at.evaluation.runner import load_images
    from raytrain_at.training.loop import run_model_spec

    crop = run_model_spec(load_config("transfer_cifar10_convnext_tiny_cvst"),
                          ((0.0,) * 3, (1.0,) * 3)).crop_pct
    root = make_cifar10(tmp_path / "cifar", per_batch=6)
    beton = write_dataset(str(root), tmp_path / "cifar10_test.beton", split="test",
                          options=replace(default_options(None), write_mode="raw"))
    stored = np.stack([s.pixels for s in cifar_samples(root, "test")])
    expected = torch.from_numpy(stored).permute(0, 3, 1, 2).float() / 255
    ids = list(range(len(stored)))
    seen, _ = load_images(str(beton), ids, resolution=32, crop_pct=crop, batch_size=6,
                          device=torch.device("cpu"))
    assert torch.equal(seen, expected)
    cropped, _ = load_images(str(beton), ids, resolution=32, crop_pct=0.875, batch_size=6,
                             device=torch.device("cpu"))
    assert not torch.allclose(cropped, expected, atol=0.05)
