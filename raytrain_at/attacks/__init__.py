"""Attacks on [0, 1] images: ``Attack(model, ...).perturb(x, y) -> x_adv``."""

from raytrain_at.attacks.apgd import APGD
from raytrain_at.attacks.base import Attack, attack_mode
from raytrain_at.attacks.pgd import FGSM, PGD
from raytrain_at.attacks.lp_geometry import NORMS, lp_norm, project

__all__ = ["APGD", "FGSM", "NORMS", "PGD", "Attack", "attack_mode", "lp_norm", "project"]
