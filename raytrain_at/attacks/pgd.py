"""PGD and FGSM with random start: the baselines of the paper's Table 12 and of fast AT.

Units: ``eps`` and ``step_size`` are in [0, 1] pixel scale (e.g. 4/255 for l_inf).
"""

from __future__ import annotations

import torch
import torch.nn as nn

from raytrain_at.attacks.base import attack_mode, check_inputs, input_gradient
from raytrain_at.attacks.losses import cross_entropy
from raytrain_at.attacks.lp_geometry import Norm, normalize, project, random_start


class PGD:
    """Projected gradient ascent on the CE loss with a fixed step (Madry et al. 2018).

    Args:
        model: classifier taking [0, 1] images.
        norm: "linf" or "l2".
        eps: radius in pixel scale.
        n_iter: steps.
        step_size: step in pixel scale; default ``2.5 * eps / n_iter`` (Madry et al.).
        random_start: start from a random point of the ball.
        seed: seed of the random start.
        eval_mode: attack with the model in eval mode, restored afterwards.
        check_range: check that ``x`` is in [0, 1] (a read from the device per call).
    """

    def __init__(self, model: nn.Module, *, norm: Norm = "linf", eps: float = 4 / 255,
                 n_iter: int = 10, step_size: float | None = None, random_start: bool = True,
                 seed: int = 0, eval_mode: bool = True, check_range: bool = True) -> None:
        if norm not in ("linf", "l2"):
            raise ValueError(f"PGD supports norm 'linf' or 'l2', got {norm!r} (use APGD for l1)")
        if not eps > 0 or n_iter < 1:
            raise ValueError("PGD needs eps > 0 and n_iter >= 1")
        self.model = model
        self.norm: Norm = norm
        self.eps = float(eps)
        self.n_iter = int(n_iter)
        self.step_size = float(step_size) if step_size is not None else 2.5 * eps / n_iter
        self.random_start = random_start
        self.seed = seed
        self.eval_mode = eval_mode
        self.check_range = check_range

    def perturb(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """The last PGD iterate for ``x`` with labels or soft targets ``y``."""
        check_inputs(x, y, self.check_range)
        x = x.detach()
        generator = torch.Generator(device=x.device).manual_seed(self.seed)
        x_adv = random_start(x, self.norm, self.eps, generator) if self.random_start else x.clone()
        with attack_mode(self.model, self.eval_mode):
            for _ in range(self.n_iter):
                _, _, grad = input_gradient(self.model, x_adv,
                                            lambda logits: cross_entropy(logits, y))
                direction = grad.sign() if self.norm == "linf" else normalize(grad, "l2")
                x_adv = project(x, x_adv + self.step_size * direction, self.norm, self.eps)
        return x_adv


class FGSM(PGD):
    """FGSM, by default with random start ("fast is better than free"): one step of
    ``1.25 * eps``."""

    def __init__(self, model: nn.Module, *, norm: Norm = "linf", eps: float = 4 / 255,
                 step_size: float | None = None, seed: int = 0, random_start: bool = True,
                 eval_mode: bool = True, check_range: bool = True) -> None:
        super().__init__(model, norm=norm, eps=eps, n_iter=1,
                         step_size=1.25 * eps if step_size is None else step_size,
                         random_start=random_start, seed=seed, eval_mode=eval_mode,
                         check_range=check_range)
