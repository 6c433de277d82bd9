"""APGD for l_inf, l_2 and l_1 (Croce & Hein, 2020 and 2021), for evaluation and training.

Units: ``eps`` is the radius in [0, 1] pixel scale over the whole image, e.g. l_inf 4/255,
l_2 2.0, l_1 75 at 224x224 (the paper's evaluation radii). An independent implementation that
matches the reference AutoAttack's robust accuracy (tests/test_attack_reference.py), written here
so training can use it (few steps, highest-loss point, soft targets); docs/attacks.md describes
the algorithm and its two uses.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Literal, cast

import torch
import torch.nn as nn

from raytrain_at.attacks.base import (attack_mode, check_inputs, input_gradient, input_loss,
                                      predictions_correct)
from raytrain_at.attacks.losses import cross_entropy, dlr, dlr_targeted
from raytrain_at.attacks.lp_geometry import NORMS, Norm, normalize, project, random_start

Loss = Literal["ce", "dlr", "dlr-targeted"]

if TYPE_CHECKING:
    # (highest-loss point, its loss, fooled mask, fooling point); the last two when tracked.
    _RunResult = tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor | None]

LOSSES: tuple[str, ...] = ("ce", "dlr", "dlr-targeted")


class APGD:
    """Auto-PGD.

    Args:
        model: classifier taking [0, 1] images.
        norm: "linf", "l2" or "l1".
        eps: radius in [0, 1] pixel scale (e.g. 4/255 for l_inf).
        n_iter: iterations per restart (100 in evaluation, 1-3 in training).
        loss: "ce", "dlr" (>= 3 classes) or "dlr-targeted" (>= 4 classes).
        n_restarts: random restarts (each only on points not yet broken).
        seed: seed of the random starts.
        rho: oscillation threshold of the step-size checkpoints.
        n_target_classes: target classes tried by "dlr-targeted".
        random_start: start from a random point of the ball, else from the clean input.
        return_max_loss: training mode: return the highest-loss point, clean input included.
        large_radius_schedule: l_1 only: run 30% / 30% / 40% of the iterations at 3, 2 and 1 times
            ``eps``, each stage started from the previous best point (AutoAttack's l_1 setting).
        eval_mode: attack with the model in eval mode (the paper's choice), restored afterwards.
        check_range: check that ``x`` is in [0, 1] (a read from the device per call; the
            training loop turns it off for its loader's images, which are in [0, 1] by
            construction).
        compile_step: l_inf / l_2: run each iteration's step (ascent direction, momentum and the
            two projections: a dozen elementwise passes over the images) as one
            ``torch.compile``-d kernel. The model is compiled separately (``scaling.compile``).
        first_check_against_zero: l_inf / l_2: the first step-size checkpoint counts the first
            iterate's loss as a rise when it is above 0, as the paper's training attack
            (``apgd_train``) does: its loss history is read one row back from the first
            iterate, wrapping around to a row not yet written (zeros). With the default
            (False) the rise is measured from the starting point's loss, so with 2 steps the
            step size halves (and the iterate restarts from the best point) whenever the first
            step did not raise the loss; the paper's 2-step attack never halves it.
    """

    def __init__(self, model: nn.Module, *, norm: Norm = "linf", eps: float = 4 / 255,
                 n_iter: int = 100, loss: Loss = "ce", n_restarts: int = 1, seed: int = 0,
                 rho: float = 0.75, n_target_classes: int = 9, random_start: bool = True,
                 return_max_loss: bool = False, large_radius_schedule: bool = False,
                 eval_mode: bool = True, check_range: bool = True,
                 compile_step: bool = False, first_check_against_zero: bool = False) -> None:
        if norm not in NORMS:
            raise ValueError(f"norm must be one of {NORMS}, got {norm!r}")
        if loss not in LOSSES:
            raise ValueError(f"loss must be one of {LOSSES}, got {loss!r}")
        if not eps > 0:
            raise ValueError(f"eps must be > 0 (pixel scale, e.g. 4/255), got {eps!r}")
        if n_iter < 1 or n_restarts < 1 or n_target_classes < 1:
            raise ValueError("n_iter, n_restarts and n_target_classes must be >= 1")
        if large_radius_schedule and norm != "l1":
            raise ValueError("large_radius_schedule is defined for l1 only")
        self.model = model
        self.norm: Norm = norm
        self.eps = float(eps)
        self.n_iter = int(n_iter)
        self.loss: Loss = loss
        self.n_restarts = int(n_restarts)
        self.seed = int(seed)
        self.rho = float(rho)
        self.n_target_classes = int(n_target_classes)
        self.random_start = random_start
        self.return_max_loss = return_max_loss
        self.large_radius_schedule = large_radius_schedule
        self.eval_mode = eval_mode
        self.check_range = check_range
        self.compile_step = compile_step
        self.first_check_against_zero = first_check_against_zero

    @classmethod
    def for_training(cls, model: nn.Module, *, norm: Norm = "linf", eps: float = 4 / 255,
                     n_iter: int = 2, seed: int = 0, random_start: bool = False,
                     check_range: bool = True, compile_step: bool = False) -> APGD:
        """APGD-AT: few CE iterations returning the highest-loss point (clean input included),
        by default started from the clean input, with the paper's code's first step-size
        checkpoint (``first_check_against_zero``: its 2-step attack keeps the full step)."""
        return cls(model, norm=norm, eps=eps, n_iter=n_iter, loss="ce", seed=seed,
                   random_start=random_start, return_max_loss=True, check_range=check_range,
                   compile_step=compile_step, first_check_against_zero=True)

    # ------------------------------------------------------------------ public API
    def perturb(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Adversarial examples for ``x`` (in [0, 1]) with labels or soft targets ``y``."""
        check_inputs(x, y, self.check_range)
        x = x.detach()
        y = y.detach()
        generator = torch.Generator(device=x.device).manual_seed(self.seed)
        with attack_mode(self.model, self.eval_mode):
            if self.return_max_loss and not self.random_start and not self.large_radius_schedule:
                # Started from the clean input, the first gradient pass gives the clean loss:
                # no separate clean forward (8 forward-equivalents per 2-step AT step, not 9).
                return self._max_loss_point(x, y, None, generator)
            with torch.no_grad():
                clean_logits = self.model(x).float()
            self._check_classes(clean_logits.shape[1])
            if self.return_max_loss:
                return self._max_loss_point(x, y, clean_logits, generator)
            return self._adversarial_examples(x, y, clean_logits, generator)

    # ------------------------------------------------------------------ drivers
    def _check_classes(self, n_classes: int) -> None:
        needed = {"ce": 2, "dlr": 3, "dlr-targeted": 4}[self.loss]
        if n_classes < needed:
            raise ValueError(f"loss {self.loss!r} needs at least {needed} classes, model has "
                             f"{n_classes}")
        if self.loss == "dlr-targeted" and self.n_target_classes > n_classes - 1:
            raise ValueError(f"n_target_classes={self.n_target_classes} exceeds the "
                             f"{n_classes - 1} "
                             "wrong classes")

    def _max_loss_point(self, x: torch.Tensor, y: torch.Tensor,
                        clean_logits: torch.Tensor | None,
                        generator: torch.Generator) -> torch.Tensor:
        """The highest-loss point of the runs, the clean input included (``clean_logits`` None:
        the runs start from it, so it is among their candidates already)."""
        best_x = x
        best_loss = (self._loss(clean_logits, y, None) if clean_logits is not None
                     else torch.full((x.shape[0],), -torch.inf, device=x.device))
        for _ in range(self.n_restarts):
            x_run, loss_run, _, _ = self._run_schedule(x, y, None, generator)
            better = loss_run > best_loss
            best_x = torch.where(_col(better, x), x_run, best_x)
            best_loss = torch.where(better, loss_run, best_loss)
        return best_x

    def _adversarial_examples(self, x: torch.Tensor, y: torch.Tensor, clean_logits: torch.Tensor,
                              generator: torch.Generator) -> torch.Tensor:
        adv = x.clone()
        robust = predictions_correct(clean_logits, y)
        ranks = range(2, self.n_target_classes + 2) if self.loss == "dlr-targeted" else [None]
        for rank in ranks:
            for _ in range(self.n_restarts):
                idx = robust.nonzero().squeeze(1)
                if idx.numel() == 0:
                    return adv
                target = None
                if rank is not None:
                    target = clean_logits[idx].argsort(dim=1)[:, -rank]
                _, _, fooled, x_fooled = self._run_schedule(x[idx], y[idx], target, generator)
                # Set: evaluation tracks the fooling points (return_max_loss is False here).
                fooled, x_fooled = cast(torch.Tensor, fooled), cast(torch.Tensor, x_fooled)
                adv[idx[fooled]] = x_fooled[fooled]
                robust[idx[fooled]] = False
        return adv

    def _run_schedule(self, x: torch.Tensor, y: torch.Tensor, target: torch.Tensor | None,
                      generator: torch.Generator) -> _RunResult:
        if not self.large_radius_schedule:
            return self._run(x, y, target, generator, self.eps, self.n_iter, x_init=None)
        # l_1 large-radius schedule: 3, 2, 1 x eps, each stage from the previous best point.
        radii = [3 * self.eps, 2 * self.eps, self.eps]
        iters = [math.ceil(0.3 * self.n_iter), math.ceil(0.3 * self.n_iter)]
        iters.append(max(self.n_iter - sum(iters), 1))
        noise = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
        x_init = x + noise
        result = None
        for radius, n in zip(radii, iters):
            x_init = project(x, x_init, "l1", radius)
            result = self._run(x, y, target, generator, radius, n, x_init=x_init)
            x_init = result[0]
        return cast("_RunResult", result)  # three stages: never None

    # ------------------------------------------------------------------ one run
    def _loss(self, logits: torch.Tensor, y: torch.Tensor, target: torch.Tensor | None
              ) -> torch.Tensor:
        if self.loss == "ce":
            return cross_entropy(logits, y)
        if self.loss == "dlr":
            return dlr(logits, y)
        return dlr_targeted(logits, y, cast(torch.Tensor, target))  # set for dlr-targeted

    def _run(self, x: torch.Tensor, y: torch.Tensor, target: torch.Tensor | None,
             generator: torch.Generator, eps: float, n_iter: int, x_init: torch.Tensor | None
             ) -> _RunResult:
        """One APGD run. Returns (highest-loss point, its loss, fooled mask, fooling point)."""
        batch = x.shape[0]
        n_features = x[0].numel()
        norm = self.norm

        def loss_fn(logits: torch.Tensor) -> torch.Tensor:
            return self._loss(logits, y, target)

        if x_init is not None:
            x_cur = x_init.clone()
        elif self.random_start:
            x_cur = random_start(x, norm, eps, generator)
        else:
            x_cur = x.clone()
        loss_cur, logits, grad = input_gradient(self.model, x_cur, loss_fn)
        # Training returns the highest-loss point only: which iterate fooled the model is not
        # needed there, and tracking it costs a copy and a select over the images per iteration.
        track_fooled = not self.return_max_loss
        fooled = x_fooled = None
        if track_fooled:
            fooled = ~predictions_correct(logits, y)
            x_fooled = x_cur.clone()
        best_loss, x_best, grad_best = loss_cur.clone(), x_cur.clone(), grad.clone()
        # A tensor radius: the compiled step is not recompiled for every radius of a schedule.
        eps_t = torch.tensor(eps, dtype=x.dtype, device=x.device)
        step_fn = _compiled_momentum_step() if self.compile_step else _momentum_step

        alpha = 1.0 if norm == "l1" else 2.0
        full_step = alpha * eps
        step = torch.full((batch,), full_step, device=x.device, dtype=x.dtype)
        x_prev = x_cur.clone()

        # Checkpoint bookkeeping.
        if norm == "l1":
            window = max(int(0.04 * n_iter), 1)
            support = _l0(x_cur - x) if x_init is not None else torch.full(
                (batch,), float(n_features), device=x.device)
            topk = support / n_features / 1.5 if x_init is not None else torch.full(
                (batch,), 0.2, device=x.device)
        else:
            window = max(int(0.22 * n_iter), 1)
            shrink_by, min_window = max(int(0.03 * n_iter), 1), max(int(0.06 * n_iter), 1)
            increases = torch.zeros(batch, device=x.device)
            # What the first iterate's loss is compared with (see first_check_against_zero).
            last_loss = (torch.zeros_like(loss_cur) if self.first_check_against_zero
                         else loss_cur.clone())
            best_at_check = best_loss.clone()
            reduced_at_check = torch.ones(batch, dtype=torch.bool, device=x.device)
        since_check = 0

        for i in range(n_iter):
            with torch.no_grad():
                if norm == "l1":
                    direction = _sparse_sign_direction(grad, topk)
                    x_new = project(x, x_cur + _col(step, x) * direction, "l1", eps)
                else:
                    momentum = 1.0 if i == 0 else 0.75
                    x_new = step_fn(x, x_cur, x_prev, grad, step, momentum, norm, eps_t)
                x_prev, x_cur = x_cur, x_new

            # The last iterate's gradient could only feed a step that never comes (nothing
            # returned depends on it), so the last pass is a forward only: 2-step APGD-AT then
            # costs 3 backwards to the input, not 4.
            last = i == n_iter - 1
            if last:
                loss_cur, logits = input_loss(self.model, x_cur, loss_fn)
            else:
                loss_cur, logits, grad = input_gradient(self.model, x_cur, loss_fn)
            with torch.no_grad():
                # Masks select with torch.where, not boolean indexing, which would wait for the
                # device to count the selected rows (a host synchronisation per iteration).
                if track_fooled:
                    now_fooled = ~predictions_correct(logits, y)
                    # Both set when track_fooled.
                    x_fooled = torch.where(_col(now_fooled, x), x_cur, cast(torch.Tensor, x_fooled))
                    fooled |= now_fooled  # pyright: ignore[reportOperatorIssue]
                improved = loss_cur > best_loss
                x_best = torch.where(_col(improved, x), x_cur, x_best)
                best_loss = torch.where(improved, loss_cur, best_loss)
                if last:
                    break
                grad_best = torch.where(_col(improved, x), grad, grad_best)
                if norm != "l1":
                    increases += (loss_cur > last_loss).float()
                    last_loss = loss_cur
                since_check += 1
                if since_check < window:
                    continue
                since_check = 0
                if norm == "l1":
                    new_support = _l0(x_best - x)
                    shrank = new_support / support < 0.95
                    topk = new_support / n_features / 1.5
                    step = torch.where(shrank, torch.full_like(step, full_step), step / 1.5)
                    step = step.clamp(full_step / 10, full_step)
                    support = new_support
                    restart = shrank
                else:
                    oscillating = increases <= window * self.rho
                    # Bound above for every norm but l1.
                    stalled = ~reduced_at_check & (best_at_check >= best_loss)  # pyright: ignore[reportOperatorIssue]
                    restart = oscillating | stalled
                    reduced_at_check = restart
                    best_at_check = best_loss.clone()
                    step = torch.where(restart, step / 2, step)
                    increases.zero_()
                    window = max(window - shrink_by, min_window)
                x_cur = torch.where(_col(restart, x), x_best, x_cur)
                grad = torch.where(_col(restart, x), grad_best, grad)
        return x_best, best_loss, fooled, x_fooled


def _col(v: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return v.view(-1, *([1] * (like.dim() - 1)))


def _momentum_step(x: torch.Tensor, x_cur: torch.Tensor, x_prev: torch.Tensor,
                   grad: torch.Tensor, step: torch.Tensor, momentum: float, norm: Norm,
                   eps: torch.Tensor) -> torch.Tensor:
    """One l_inf / l_2 APGD step: ascent step, projection, heavy-ball momentum, projection."""
    z = project(x, x_cur + _col(step, x) * _ascent_direction(grad, norm), norm, eps)
    return project(x, x_cur + momentum * (z - x_cur) + (1 - momentum) * (x_cur - x_prev), norm,
                   eps)


_COMPILED_STEP = None


def _compiled_momentum_step():
    """:func:`_momentum_step` through ``torch.compile`` (built once per process: every attack
    shares the compiled kernels; shapes that change between runs make it dynamic once)."""
    global _COMPILED_STEP
    if _COMPILED_STEP is None:
        _COMPILED_STEP = torch.compile(_momentum_step)
    return _COMPILED_STEP


def _l0(delta: torch.Tensor) -> torch.Tensor:
    return (delta != 0).reshape(delta.shape[0], -1).sum(dim=1).float()


def _ascent_direction(grad: torch.Tensor, norm: Norm) -> torch.Tensor:
    """Steepest-ascent direction of unit norm: sign for l_inf, normalised gradient for l_2."""
    return grad.sign() if norm == "linf" else normalize(grad, "l2")


def _sparse_sign_direction(grad: torch.Tensor, topk: torch.Tensor) -> torch.Tensor:
    """Signs of the largest ``topk`` fraction of |grad| per sample, scaled to unit l_1 norm."""
    flat = grad.reshape(grad.shape[0], -1).abs()
    n = flat.shape[1]
    position = torch.clamp((1.0 - topk) * n, 0, n - 1).long()
    threshold = flat.sort(dim=1).values.gather(1, position[:, None])
    mask = (flat >= threshold).float()
    signs = grad.reshape(grad.shape[0], -1).sign() * mask
    signs = signs / (signs.abs().sum(dim=1, keepdim=True) + 1e-10)
    return signs.view_as(grad)
