"""The attack contract: inside the eps-ball and [0, 1], works under bf16 autocast, and never changes
the model's parameters, their .grad, or any module's train/eval flag."""

from __future__ import annotations

import pytest
import torch

from raytrain_at.attacks import APGD, FGSM, PGD, lp_norm
from raytrain_at.attacks.losses import cross_entropy
from raytrain_at.attacks.lp_geometry import project
from raytrain_at.diagnostics.host_syncs import HostSyncCounter

RADII = {"linf": 0.05, "l2": 0.5, "l1": 4.0}


def _attacks(model):
    for norm, eps in RADII.items():
        for loss in ("ce", "dlr", "dlr-targeted"):
            yield f"apgd-{norm}-{loss}", APGD(model, norm=norm, eps=eps, n_iter=10, loss=loss,
                                              n_target_classes=2)
        yield f"apgd-train-{norm}", APGD.for_training(model, norm=norm, eps=eps, n_iter=2)
    yield "apgd-l1-large-radii", APGD(model, norm="l1", eps=4.0, n_iter=10,
                                      large_radius_schedule=True)
    for norm in ("linf", "l2"):
        yield f"pgd-{norm}", PGD(model, norm=norm, eps=RADII[norm], n_iter=3)
        yield f"fgsm-{norm}", FGSM(model, norm=norm, eps=RADII[norm])


def _check_feasible(x, x_adv, norm, eps):
    assert x_adv.shape == x.shape and x_adv.dtype == x.dtype
    assert torch.isfinite(x_adv).all()
    assert x_adv.min() >= 0 and x_adv.max() <= 1
    assert (lp_norm(x_adv - x, norm) <= eps * (1 + 1e-5) + 1e-6).all()


def test_every_attack_stays_in_ball_and_box(trained_digits_net, digits) -> None:
    x, y = digits[0][:64], digits[1][:64]
    for name, attack in _attacks(trained_digits_net):
        x_adv = attack.perturb(x, y)
        _check_feasible(x, x_adv, attack.norm, attack.eps)
        assert not torch.equal(x_adv, x), f"{name} did not move any point"


def test_attacks_leave_model_state_alone(trained_digits_net, digits) -> None:
    model = trained_digits_net
    x, y = digits[0][:32], digits[1][:32]
    # Caller's state: train mode with one submodule in eval (e.g. frozen BN), some grads set.
    model.train()
    model.bn.eval()
    model.fc.weight.grad = torch.full_like(model.fc.weight, 0.25)
    model.conv1.weight.grad = None
    params = {k: v.detach().clone() for k, v in model.named_parameters()}
    buffers = {k: v.detach().clone() for k, v in model.named_buffers()}
    try:
        for name, attack in _attacks(model):
            attack.perturb(x, y)
            assert model.training and model.conv1.training and not model.bn.training, name
            assert torch.equal(model.fc.weight.grad, torch.full_like(model.fc.weight, 0.25)), name
            assert model.conv1.weight.grad is None, name
            for k, v in model.named_parameters():
                assert torch.equal(v, params[k]), f"{name} changed {k}"
            for k, v in model.named_buffers():
                assert torch.equal(v, buffers[k]), f"{name} changed buffer {k}"
    finally:
        model.fc.weight.grad = None
        model.eval()


def test_attacks_work_under_bf16_autocast(trained_digits_net, digits) -> None:
    x, y = digits[0][:32], digits[1][:32]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        for name, attack in _attacks(trained_digits_net):
            x_adv = attack.perturb(x, y)
            _check_feasible(x, x_adv, attack.norm, attack.eps)


@pytest.mark.parametrize("norm", ["linf", "l2", "l1"])
def test_training_mode_never_returns_less_loss_than_clean(trained_digits_net, digits, norm) -> None:
    """APGD-AT keeps the clean input among the candidates: per-sample loss >= clean loss."""
    model = trained_digits_net
    x, y = digits[0][:128], digits[1][:128]
    x_adv = APGD.for_training(model, norm=norm, eps=RADII[norm], n_iter=2).perturb(x, y)
    with torch.no_grad():
        clean, adv = cross_entropy(model(x), y), cross_entropy(model(x_adv), y)
    assert (adv >= clean - 1e-6).all()
    assert (adv > clean).float().mean() > 0.8  # and it does find a higher loss for most points


def test_soft_targets_are_accepted(trained_digits_net, digits) -> None:
    x, y = digits[0][:16], digits[1][:16]
    soft = 0.8 * torch.nn.functional.one_hot(y, 10).float() + 0.2 * torch.nn.functional.one_hot(
        y.roll(1), 10).float()
    x_adv = APGD.for_training(trained_digits_net, eps=0.05, n_iter=2).perturb(x, soft)
    _check_feasible(x, x_adv, "linf", 0.05)


def test_evaluation_mode_finds_adversarial_examples(trained_digits_net, digits) -> None:
    model = trained_digits_net
    x, y = digits[0][1500:1700], digits[1][1500:1700]
    with torch.no_grad():
        clean_correct = model(x).argmax(1) == y
    x_adv = APGD(model, norm="linf", eps=0.05, n_iter=20).perturb(x, y)
    with torch.no_grad():
        adv_correct = model(x_adv).argmax(1) == y
    assert adv_correct.float().mean() < clean_correct.float().mean() - 0.1
    assert not (adv_correct & ~clean_correct).any()  # robust <= clean, point by point
    # Points the model already got wrong are returned unchanged.
    assert torch.equal(x_adv[~clean_correct], x[~clean_correct])


def test_same_seed_same_result(trained_digits_net, digits) -> None:
    x, y = digits[0][:32], digits[1][:32]
    a = APGD(trained_digits_net, norm="l2", eps=0.5, n_iter=5, seed=3).perturb(x, y)
    b = APGD(trained_digits_net, norm="l2", eps=0.5, n_iter=5, seed=3).perturb(x, y)
    assert torch.equal(a, b)


@pytest.mark.parametrize("kwargs,fragment", [
    (dict(norm="l3"), "norm must be one of"),
    (dict(eps=0.0), "eps must be > 0"),
    (dict(loss="hinge"), "loss must be one of"),
    (dict(n_iter=0), "must be >= 1"),
    (dict(norm="linf", large_radius_schedule=True), "l1 only"),
])
def test_bad_attack_settings_are_refused(trained_digits_net, kwargs, fragment) -> None:
    with pytest.raises(ValueError, match=fragment):
        APGD(trained_digits_net, **kwargs)


def test_inputs_outside_unit_box_are_refused(trained_digits_net) -> None:
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        APGD(trained_digits_net).perturb(torch.full((2, 3, 16, 16), 2.0), torch.tensor([0, 1]))


def test_l1_projection_matches_reference_projection() -> None:
    from pyautoattack.autopgd_base import L1_projection

    torch.manual_seed(0)
    x = torch.rand(16, 3, 8, 8)
    delta = torch.randn(16, 3, 8, 8) * torch.rand(16, 1, 1, 1) * 2
    for eps in (0.5, 3.0, 12.0):
        ours = project(x, x + delta, "l1", eps) - x
        reference = delta + L1_projection(x, delta, eps)
        assert torch.allclose(ours, reference, atol=1e-4), eps
        assert (lp_norm(ours, "l1") <= eps * (1 + 1e-6)).all()
        assert ((x + ours) >= 0).all() and ((x + ours) <= 1).all()


def test_l1_projection_is_the_nearest_feasible_point() -> None:
    """Variational inequality of a projection: <u - p, c - p> <= 0 for feasible c."""
    torch.manual_seed(1)
    x = torch.rand(4, 300)
    u = x + torch.randn(4, 300)
    p = project(x, u, "l1", 5.0)
    for _ in range(50):
        c = project(x, x + torch.randn(4, 300) * torch.rand(1), "l1", 5.0)
        assert (((u - p) * (c - p)).sum(dim=1) <= 1e-4).all()


class _PassCounter(torch.nn.Module):
    """Counts the wrapped model's forwards with and without autograd recording."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model
        self.with_grad = 0
        self.without_grad = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.is_grad_enabled():
            self.with_grad += 1
        else:
            self.without_grad += 1
        return self.model(x)


@pytest.mark.parametrize("norm", ["linf", "l2", "l1"])
@pytest.mark.parametrize("n_iter", [1, 2, 3])
@pytest.mark.parametrize("random_start", [False, True])
def test_training_attack_pass_count(trained_digits_net, digits, norm, n_iter,
                                    random_start) -> None:
    """APGD-AT with n iterations: n input-gradient passes (the start and the first n - 1
    iterates) and a forward only for the last iterate, whose gradient is never used; from a
    random start also a clean forward (the clean input is a candidate). The speed benchmark's
    FLOP count rests on this (2 iterations: 8 forward-equivalents with the training pass from
    the clean start, as the paper's code; 9 from a random one)."""
    counter = _PassCounter(trained_digits_net)
    x, y = digits[0][:8], digits[1][:8]
    APGD.for_training(counter, norm=norm, eps=RADII[norm], n_iter=n_iter,
                      random_start=random_start).perturb(x, y)
    assert (counter.with_grad, counter.without_grad) == (n_iter, 2 if random_start else 1)


def test_training_attack_starts_clean_by_default(trained_digits_net, digits) -> None:
    """The recipes' default (attack.random_start false) and APGD-AT's: the clean start, whose
    result is the same as with the separate clean forward the random start needs."""
    from raytrain_at.config import load_config
    from raytrain_at.training.loop import build_attack

    assert load_config("quickstart").attack.random_start is False
    assert build_attack(trained_digits_net, load_config("quickstart"), 8 / 255, 0).random_start \
        is False
    assert build_attack(trained_digits_net, load_config("quickstart", ["attack.random_start=true"]),
                        8 / 255, 0).random_start is True
    x, y = digits[0][:32], digits[1][:32]
    fast = APGD.for_training(trained_digits_net, eps=RADII["linf"], n_iter=2)
    assert fast.random_start is False
    with_clean_forward = APGD.for_training(trained_digits_net, eps=RADII["linf"], n_iter=2)
    with_clean_forward.return_max_loss = True
    reference = with_clean_forward._max_loss_point(
        x, y, trained_digits_net(x).float().detach(),
        torch.Generator().manual_seed(with_clean_forward.seed))
    assert torch.equal(fast.perturb(x, y), reference)


def test_training_attack_returns_the_highest_loss_iterate(trained_digits_net, digits) -> None:
    """The last iterate (evaluated without a gradient) is still a candidate: with one iteration
    from the clean input, the result is whichever of clean and that iterate has the higher loss."""
    model = trained_digits_net
    x, y = digits[0][:64], digits[1][:64]
    x_adv = APGD.for_training(model, eps=RADII["linf"], n_iter=1,
                              random_start=False).perturb(x, y)
    x_req = x.clone().requires_grad_(True)
    grad, = torch.autograd.grad(cross_entropy(model(x_req), y).sum(), [x_req])
    step = project(x, x + 2 * RADII["linf"] * grad.sign(), "linf", RADII["linf"])
    with torch.no_grad():
        clean, stepped = cross_entropy(model(x), y), cross_entropy(model(step), y)
    expected = torch.where((stepped > clean).view(-1, 1, 1, 1), step, x)
    assert torch.allclose(x_adv, expected, atol=1e-6)
    assert (stepped > clean).any()


def _paper_two_step(model, x, y, eps):
    """The paper's 2-step training APGD (``apgd_train`` of nmndeep/revisiting-at, l_inf, clean
    start), written out: a full step 2 * eps along the gradient's sign, then a second full step
    with momentum 0.75; the step size never halves in between. Returns the highest-loss point
    of clean input, first and second iterate (a tie keeps the earlier one)."""
    def loss_and_grad(point):
        point = point.clone().requires_grad_(True)
        loss = cross_entropy(model(point), y)
        grad, = torch.autograd.grad(loss.sum(), [point])
        return loss.detach(), grad

    def inside(point):
        return project(x, point, "linf", eps)

    loss0, grad0 = loss_and_grad(x)
    x1 = inside(x + 2 * eps * grad0.sign())
    loss1, grad1 = loss_and_grad(x1)
    x2 = inside(x1 + 0.75 * (inside(x1 + 2 * eps * grad1.sign()) - x1) + 0.25 * (x1 - x))
    with torch.no_grad():
        loss2 = cross_entropy(model(x2), y)
    best, best_loss = x, loss0
    for point, loss in ((x1, loss1), (x2, loss2)):
        better = (loss > best_loss).view(-1, 1, 1, 1)
        best, best_loss = torch.where(better, point, best), torch.maximum(loss, best_loss)
    return best, loss0, loss1


class _Wavy(torch.nn.Module):
    """Logits periodic in the input: a full sign step overshoots the crest for about half the
    images, so their first step lowers the loss (a smooth trained net hardly ever does)."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("weight", torch.randn(3 * 16 * 16, 10,
                                                   generator=torch.Generator().manual_seed(0)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return 3 * torch.sin(x.flatten(1) @ self.weight / 4)


def test_two_step_training_attack_never_halves_its_step_as_the_paper(digits) -> None:
    """Where the first step lowers the loss, our APGD-AT still takes its second step at the full
    size from the first iterate, as the paper's ``apgd_train`` (its first step-size check
    compares with an unwritten row of zeros). Evaluation APGD keeps AutoAttack's check from the
    starting loss, which halves the step and restarts from the best point there."""
    model = _Wavy().eval()
    x, y = digits[0][:128], digits[1][:128]
    eps = 4 / 255
    expected, loss0, loss1 = _paper_two_step(model, x, y, eps)
    assert (loss1 <= loss0).sum() >= 3, "no image where the first step lowers the loss"
    ours = APGD.for_training(model, eps=eps, n_iter=2).perturb(x, y)
    assert torch.allclose(ours, expected, atol=1e-6)
    halving = APGD(model, eps=eps, n_iter=2, loss="ce", random_start=False,
                   return_max_loss=True).perturb(x, y)
    differs = (halving - expected).abs().flatten(1).amax(1) > 1e-4
    assert differs.any() and not differs[loss1 > loss0].any()


def _host_syncs(attack, x, y) -> dict[str, int]:
    with HostSyncCounter() as syncs:
        attack.perturb(x, y)
    return dict(syncs.by_op)


@pytest.mark.parametrize("norm", ["linf", "l2", "l1"])
def test_training_attack_waits_for_the_device_only_for_its_input_check(
        trained_digits_net, digits, norm) -> None:
    """APGD-AT reads nothing back from the device in its iterations: the only host reads are the
    two bounds of the [0, 1] input check, however many iterations run (on a GPU each read is a
    stall of the whole queue). l_1 adds the projection's one read per call (each iteration, and
    a random start; see the evaluation test below for why it stays)."""
    x, y = digits[0][:16], digits[1][:16]
    for n_iter, random_start in ((1, False), (2, False), (5, False), (2, True)):
        attack = APGD.for_training(trained_digits_net, norm=norm, eps=RADII[norm], n_iter=n_iter,
                                   random_start=random_start)
        projections = n_iter + random_start if norm == "l1" else 0
        assert _host_syncs(attack, x, y) == {"aten::_local_scalar_dense": 2 + projections}


@pytest.mark.parametrize("norm", ["linf", "l2", "l1"])
@pytest.mark.parametrize("loss", ["ce", "dlr-targeted"])
def test_evaluation_attack_syncs_do_not_grow_with_iterations(trained_digits_net, digits, norm,
                                                            loss) -> None:
    """In evaluation the host reads the device only between runs (which points are still robust,
    to attack only those), never inside the iteration loop: 5 and 20 iterations sync alike."""
    x, y = digits[0][:16], digits[1][:16]
    counts = []
    for n_iter in (5, 20):
        # A tiny radius leaves most points robust, so every target class gets its run.
        attack = APGD(trained_digits_net, norm=norm, eps=RADII[norm] / 20, n_iter=n_iter,
                      loss=loss, n_target_classes=3)
        counts.append(_host_syncs(attack, x, y))
    runs = 3 if loss == "dlr-targeted" else 1
    assert counts[0]["aten::nonzero"] == runs  # one selection of the robust points per run
    if norm == "l1":
        # The documented exception: the l_1 projection asks once per call whether every point is
        # already inside the ball, which skips 40 bisection passes over the images (costlier on a
        # GPU than the stall); one projection per iteration.
        extra = counts[1].pop("aten::_local_scalar_dense") - counts[0].pop(
            "aten::_local_scalar_dense")
        assert extra == (20 - 5) * runs
    assert counts[0] == counts[1]


def test_host_sync_counter_sees_the_usual_culprits() -> None:
    """The counter itself: .item(), bool(), nonzero and boolean-mask indexing count; plain
    arithmetic and integer indexing do not."""
    t = torch.tensor([1.0, 0.0, 2.0])
    with HostSyncCounter() as syncs:
        _ = t * 2 + 1
        _ = t[torch.tensor([0, 2])]
        _ = torch.where(t > 0, t, -t)
    assert syncs.total == 0
    with HostSyncCounter() as syncs:
        t.item() if t.numel() == 1 else float(t[0])
        bool(t[1] > 0)
        t.nonzero()
        _ = t[t > 0]
    assert syncs.by_op == {"aten::_local_scalar_dense": 2, "aten::nonzero": 1, "aten::index": 1}


@pytest.mark.parametrize("norm", ["linf", "l2"])
def test_compiled_step_gives_the_eager_result(trained_digits_net, digits, norm) -> None:
    """``compile_step`` fuses the step into torch.compile kernels without changing the attack:
    the same points in training (up to float rounding of the fused arithmetic) and the same
    robust points in evaluation."""
    x, y = digits[0][1500:1564], digits[1][1500:1564]
    eps = RADII[norm]
    fused = APGD.for_training(trained_digits_net, norm=norm, eps=eps, compile_step=True)
    eager = APGD.for_training(trained_digits_net, norm=norm, eps=eps)
    assert (fused.perturb(x, y) - eager.perturb(x, y)).abs().max() <= 1e-6
    evaluations = []
    for compile_step in (True, False):
        attack = APGD(trained_digits_net, norm=norm, eps=eps, n_iter=10,
                      compile_step=compile_step)
        x_adv = attack.perturb(x, y)
        _check_feasible(x, x_adv, norm, eps)
        with torch.no_grad():
            evaluations.append(trained_digits_net(x_adv).argmax(1) == y)
    assert torch.equal(*evaluations)
    assert 0 < int(evaluations[0].sum()) < len(y)  # some points broken, some not: a real check
