"""Adversarial objectives on a tiny ConvStem model: finite loss, a gradient for every trainable
parameter, and one optimiser step on a fixed batch lowers the objective on that batch."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from raytrain_at.attacks import APGD
from raytrain_at.config import ObjectiveSection
from raytrain_at.models import create_robust_model
from raytrain_at.training.objectives import training_step_loss

TINY_CONVNEXT = dict(depths=(1, 1, 1, 1), dims=(16, 32, 64, 128))


def _setup(digits, seed: int = 0):
    torch.manual_seed(seed)
    model = create_robust_model("convnext_tiny_cvst", num_classes=10, **TINY_CONVNEXT)
    model.train()
    attack = APGD.for_training(model, norm="linf", eps=4 / 255, n_iter=2, seed=seed)
    x = F.interpolate(digits[0][:32], size=32, mode="bilinear", align_corners=False).clamp(0, 1)
    return model, attack, x, digits[1][:32]


@pytest.mark.parametrize("kind", ["adversarial", "trades", "clean"])
def test_objective_trains(digits, kind: str) -> None:
    model, attack, x, y = _setup(digits)
    config = ObjectiveSection(kind=kind, label_smoothing=0.1, trades_beta=1.0)
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-3, betas=(0.9, 0.95))
    out = training_step_loss(model, attack, x, y, config)
    assert torch.isfinite(out.loss) and out.loss.dim() == 0
    assert out.logits.shape == (32, 10) and out.x_adv.shape == x.shape
    assert out.accuracy.dim() == 0 and not out.accuracy.requires_grad
    if kind == "clean":
        assert torch.equal(out.x_adv, x)
    else:
        assert not torch.equal(out.x_adv, x)
    optimizer.zero_grad()
    out.loss.backward()
    for name, param in model.named_parameters():
        assert param.grad is not None, f"{name} got no gradient"
        assert torch.isfinite(param.grad).all(), name
    optimizer.step()
    after = training_step_loss(model, attack, x, y, config).loss
    assert after.item() < out.loss.item()


def test_model_left_in_train_mode_after_attack(digits) -> None:
    model, attack, x, y = _setup(digits)
    training_step_loss(model, attack, x, y, ObjectiveSection())
    assert all(m.training for m in model.modules())


def test_soft_targets_from_mixup(digits) -> None:
    from timm.data import Mixup

    model, attack, x, y = _setup(digits)
    mixup = Mixup(mixup_alpha=0.8, cutmix_alpha=1.0, switch_prob=0.5, label_smoothing=0.1,
                  num_classes=10)
    x_mix, soft = mixup(x.clone(), y.clone())
    out = training_step_loss(model, attack, x_mix.clamp(0, 1), soft, ObjectiveSection())
    assert torch.isfinite(out.loss)
    # Soft-target CE: no second smoothing on top of the mixed targets.
    with torch.no_grad():
        expected = -(soft * F.log_softmax(out.logits.float(), 1)).sum(1).mean()
    assert torch.allclose(out.loss.detach(), expected, atol=1e-5)


def test_trades_is_ce_plus_beta_kl(digits) -> None:
    model, attack, x, y = _setup(digits)
    model.eval()  # deterministic forward so the parts can be recomputed
    out = training_step_loss(model, attack, x, y, ObjectiveSection(kind="trades", trades_beta=2.0,
                                                                  label_smoothing=0.0))
    with torch.no_grad():
        clean, adv = model(x), model(out.x_adv)
        kl = F.kl_div(F.log_softmax(adv, 1), F.softmax(clean, 1), reduction="batchmean")
        expected = F.cross_entropy(clean, y) + 2.0 * kl
    assert torch.allclose(out.loss.detach(), expected, atol=1e-4)


def test_objective_config_is_validated() -> None:
    with pytest.raises(ValueError, match="label_smoothing"):
        ObjectiveSection(label_smoothing=1.5)
    with pytest.raises(ValueError, match="kind"):
        ObjectiveSection(kind="mart")
    with pytest.raises(ValueError, match="needs an attack"):
        training_step_loss(torch.nn.Identity(), None, torch.zeros(1, 3, 4, 4), torch.zeros(1),
                           ObjectiveSection())
