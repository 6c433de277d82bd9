"""The EMA of the weights stays fp32 when the live model is bf16 (DeepSpeed's bf16 engine)."""

from __future__ import annotations

import torch

from raytrain_at.models import create_robust_model
from raytrain_at.training.engine import build_ema


def test_ema_of_a_bf16_model_is_fp32_and_takes_small_updates() -> None:
    torch.manual_seed(0)
    model = create_robust_model("test_convnext", num_classes=10).to(torch.bfloat16)
    ema = build_ema(model, decay=0.999)
    dtypes = {v.dtype for v in ema.module.state_dict().values() if v.is_floating_point()}
    assert dtypes == {torch.float32}
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}  # the live model untouched

    before = {k: v.clone() for k, v in ema.module.state_dict().items()}
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.5)  # the update (1 - 0.999) * 0.5 is below bf16's resolution near 1
    ema.update(model, step=10_000)  # past timm's warm-up: the plain decay applies
    moved = [k for k, v in ema.module.state_dict().items()
             if v.is_floating_point() and not torch.equal(v, before[k])]
    weight = "backbone.stem.0.weight" if "backbone.stem.0.weight" in before else moved[0]
    assert len(moved) == len(list(model.parameters()))
    delta = (ema.module.state_dict()[weight] - before[weight]).abs()
    assert torch.allclose(delta, torch.full_like(delta, 0.0005), rtol=0.05)
