"""The quickstart on the embedded default (CPU, no cluster, bundled data).

What exists so far: build every registered model and print its size next to the paper's
Table 14, then run one adversarial training step (2-step APGD, l_inf 4/255, AdamW) of a small
ConvStem model on real images (scikit-learn digits) and print the loss.
"""

from __future__ import annotations

import time

import timm
import torch
from rich.console import Console
from rich.table import Table

from raytrain_at.attacks import APGD
from raytrain_at.data.sources import DIGITS_CLASSES, digits_tensors
from raytrain_at.models import complexity, create_robust_model, stem_spec_of, unwrap
from raytrain_at.models.paper_tables import TABLE14
from raytrain_at.models.stems import design_name
from raytrain_at.training.objectives import ObjectiveConfig, training_step_loss


def make_console() -> Console:
    """A console that does not squeeze tables to 80 columns when output is not a terminal."""
    console = Console()
    return console if console.is_terminal else Console(width=120)


def model_size_table(console: Console, resolution: int = 224) -> None:
    """Print params and FLOPs of every Table 14 model beside the paper's figures."""
    table = Table(title=f"Registered models at {resolution}x{resolution} (fvcore FLOPs)")
    for col in ("model", "stem", "params (M)", "paper", "FLOPs (G)", "paper"):
        table.add_column(col, justify="left" if col in ("model", "stem") else "right")
    with console.status("building models and counting FLOPs ..."):
        for name, row in TABLE14.items():
            backbone = timm.create_model(name, pretrained=False)
            size = complexity(backbone, resolution)
            table.add_row(name, design_name(stem_spec_of(backbone)) or "PatchStem", f"{size.params_m:.2f}",
                          f"{row.params_m:.2f}", f"{size.flops_g:.2f}", f"{row.flops_g:.2f}")
    console.print(table)


def adversarial_training_step(console: Console, side: int = 64, batch_size: int = 32,
                              seed: int = 0) -> dict[str, float]:
    """One 2-step-APGD adversarial training step of ConvNeXt-T + ConvStem on digits; returns the
    adversarial loss before and after the step on the same batch."""
    torch.manual_seed(seed)
    x, y = digits_tensors(side)
    images, labels = x[:batch_size], y[:batch_size]
    model = create_robust_model("convnext_tiny_cvst", num_classes=DIGITS_CLASSES)
    model.train()
    attack = APGD.for_training(model, norm="linf", eps=4 / 255, n_iter=2, seed=seed)
    objective = ObjectiveConfig(kind="adversarial", label_smoothing=0.1)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, betas=(0.9, 0.95),
                                  weight_decay=0.05)
    start = time.perf_counter()
    out = training_step_loss(model, attack, images, labels, objective)
    optimizer.zero_grad(set_to_none=True)
    out["loss"].backward()
    optimizer.step()
    elapsed = time.perf_counter() - start
    after = training_step_loss(model, attack, images, labels, objective)["loss"].item()
    before = out["loss"].item()
    console.print(f"adversarial training step: model=convnext_tiny_cvst "
                  f"stem={design_name(stem_spec_of(unwrap(model)))} batch={batch_size} "
                  f"image={side}x{side} attack=APGD-CE(2 steps, l_inf 4/255) "
                  f"loss={before:.4f} loss_after_step={after:.4f} seconds={elapsed:.1f}",
                  soft_wrap=True)
    return {"loss": before, "loss_after_step": after}


def run_quickstart() -> None:
    """Entry point of ``raytrain-at quickstart``."""
    console = make_console()
    model_size_table(console)
    adversarial_training_step(console)
