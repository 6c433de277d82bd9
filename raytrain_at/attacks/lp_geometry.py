"""l_p balls intersected with the image box [0, 1]: norms, steepest-ascent directions, projections.

Units: every radius is in [0, 1] pixel scale over the whole image tensor (C x H x W), e.g. l_inf
4/255, l_2 2.0 and l_1 75 at 224x224 as in the paper.

The l_1 projection onto {||delta||_1 <= eps} intersected with the box is hand-written (no library
has it): the exact solution is a soft threshold clipped to the box, with the threshold found by
bisection on the (monotone) l_1 norm of the result; a final rescale guarantees feasibility
against rounding.
"""

from __future__ import annotations

import torch

from raytrain_at.evaluation.threats import NORMS, Norm

__all__ = ["NORMS", "Norm", "lp_norm", "normalize", "project", "random_start"]
_BISECTION_STEPS = 40


def _flat(x: torch.Tensor) -> torch.Tensor:
    return x.reshape(x.shape[0], -1)


def _per_sample(v: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return v.view(-1, *([1] * (like.dim() - 1)))


def lp_norm(delta: torch.Tensor, norm: Norm) -> torch.Tensor:
    """Per-sample norm of ``delta`` (shape (B,))."""
    flat = _flat(delta)
    if norm == "linf":
        return flat.abs().amax(dim=1)
    if norm == "l2":
        return flat.norm(p=2, dim=1)
    if norm == "l1":
        return flat.abs().sum(dim=1)
    raise ValueError(f"unknown norm {norm!r}")


def normalize(v: torch.Tensor, norm: Norm) -> torch.Tensor:
    """``v`` scaled to unit per-sample norm (zero stays zero)."""
    return v / (_per_sample(lp_norm(v, norm), v) + 1e-12)


def project(x: torch.Tensor, x_adv: torch.Tensor, norm: Norm, eps: torch.Tensor | float
            ) -> torch.Tensor:
    """Map ``x_adv`` into the ``eps``-ball around ``x`` intersected with [0, 1].

    l_inf and l_1 are exact Euclidean projections; l_2 rescales onto the ball, then clips to the box
    (clipping only shrinks each coordinate of the perturbation, so the result stays in the ball).
    ``eps`` may be a float or a per-sample tensor of shape (B,).
    """
    eps_t = torch.as_tensor(eps, dtype=x.dtype, device=x.device)
    if eps_t.dim() == 0:
        eps_t = eps_t.expand(x.shape[0])
    delta = x_adv - x
    if norm == "linf":
        e = _per_sample(eps_t, x)
        return torch.clamp(torch.minimum(torch.maximum(x_adv, x - e), x + e), 0.0, 1.0)
    if norm == "l2":
        scale = torch.clamp(eps_t / (lp_norm(delta, "l2") + 1e-12), max=1.0)
        return torch.clamp(x + delta * _per_sample(scale, x), 0.0, 1.0)
    if norm == "l1":
        return x + _project_l1_box(x, delta, eps_t)
    raise ValueError(f"unknown norm {norm!r}")


def _project_l1_box(x: torch.Tensor, delta: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
    """argmin_d ||d - delta||_2 s.t. ||d||_1 <= eps and 0 <= x + d <= 1 (per sample)."""
    lower, upper = -x, 1.0 - x

    def shrink(lam: torch.Tensor) -> torch.Tensor:
        soft = torch.sign(delta) * torch.clamp(delta.abs() - _per_sample(lam, delta), min=0.0)
        return torch.minimum(torch.maximum(soft, lower), upper)

    zero = torch.zeros_like(eps)
    boxed = shrink(zero)
    inside = lp_norm(boxed, "l1") <= eps
    # The one host read of the l_1 step (a queue stall on a GPU): when every point is already
    # inside, it skips 40 bisection passes over the images, which cost more than the stall.
    if bool(inside.all()):
        return boxed
    lo, hi = zero.clone(), _flat(delta).abs().amax(dim=1)
    for _ in range(_BISECTION_STEPS):
        mid = (lo + hi) / 2
        too_big = lp_norm(shrink(mid), "l1") > eps
        lo = torch.where(too_big, mid, lo)
        hi = torch.where(too_big, hi, mid)
    d = shrink(hi)
    # Rounding can leave ||d||_1 a hair above eps; scaling towards 0 keeps d inside the box.
    excess = torch.clamp(eps / (lp_norm(d, "l1") + 1e-12), max=1.0)
    d = d * _per_sample(excess, d)
    return torch.where(_per_sample(inside, d), boxed, d)


def random_start(x: torch.Tensor, norm: Norm, eps: float, generator: torch.Generator | None
                 ) -> torch.Tensor:
    """A random point of the ball around ``x`` (inside the box).

    l_inf: uniform noise scaled so its largest entry is ``eps``; l_2: a Gaussian direction of norm
    ``eps``; l_1: a Gaussian sample projected onto the ball (as in the reference APGD).
    """
    if norm == "linf":
        t = torch.rand(x.shape, generator=generator, device=x.device, dtype=x.dtype) * 2 - 1
        return torch.clamp(x + eps * normalize(t, "linf"), 0.0, 1.0)
    t = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
    if norm == "l2":
        return torch.clamp(x + eps * normalize(t, "l2"), 0.0, 1.0)
    return project(x, x + t, "l1", eps)
