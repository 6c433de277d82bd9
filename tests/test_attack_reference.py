"""Agreement with the reference AutoAttack APGD (pyautoattack 0.2.0, the fra31 code repackaged).

With 100 iterations and the same settings, our robust accuracy on a small model trained on real
digits must be within 1 point of the reference for l_inf, l_2 and l_1. Radii are chosen so that
robust accuracy sits well between 0 and clean accuracy, where a weaker attack would show.
"""

from __future__ import annotations

import pytest
import torch
from pyautoattack.autopgd_base import APGDAttack, APGDAttack_targeted

from raytrain_at.attacks import APGD

REFERENCE_NORM = {"linf": "Linf", "l2": "L2", "l1": "L1"}
CASES = [("linf", 0.05, "ce"), ("l2", 1.0, "ce"), ("l1", 8.0, "ce"), ("linf", 0.05, "dlr-targeted")]


def _accuracy(model, x, y) -> float:
    with torch.no_grad():
        return (model(x).argmax(1) == y).float().mean().item()


@pytest.mark.parametrize("norm,eps,loss", CASES)
def test_robust_accuracy_within_one_point_of_reference(trained_digits_net, digits, norm, eps,
                                                       loss) -> None:
    model = trained_digits_net
    x, y = digits[0][1500:], digits[1][1500:]
    ours = APGD(model, norm=norm, eps=eps, n_iter=100, loss=loss, n_target_classes=3, seed=0)
    if loss == "ce":
        reference = APGDAttack(model, n_iter=100, norm=REFERENCE_NORM[norm], eps=eps, loss="ce",
                               seed=0, device="cpu")
    else:
        reference = APGDAttack_targeted(model, n_iter=100, norm=REFERENCE_NORM[norm], eps=eps,
                                        seed=0, device="cpu", n_target_classes=3)
    clean = _accuracy(model, x, y)
    ours_acc = _accuracy(model, ours.perturb(x, y), y)
    reference_acc = _accuracy(model, reference.perturb(x, y), y)
    assert 0.1 < reference_acc < clean - 0.1, "radius gives an uninformative comparison"
    assert abs(ours_acc - reference_acc) <= 0.01, (norm, loss, ours_acc, reference_acc)
