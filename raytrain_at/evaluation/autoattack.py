"""AutoAttack on one chunk of images, attack by attack, with its state saved after each attack.

The attacks are pyautoattack's (the reference implementation, configured by its own
``version='standard'`` set-up); this module only drives them. A chunk is attacked exactly as the
reference ``run_standard_evaluation`` attacks a batch: the clean prediction first, then each attack
on the points still robust, with the same seed. Running one attack per call lets the chunk state be
saved between attacks (resume) and records which attack broke each image (the per-attack table).

Versions:
    standard: APGD-CE, APGD-T, FAB-T, Square (the reference AutoAttack).
    fast: APGD-CE, APGD-T (the first two of the standard four; not a protocol of the paper).
    apgdt: APGD-T with 40 iterations and 3 target classes: the paper's cheaper protocol, "roughly
        off by 1-2%" from AutoAttack, used for its sweeps and large ablations (Sec. 3.1).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from collections.abc import Callable

import torch
import torch.nn as nn

from raytrain_at.errors import UserError
from raytrain_at.evaluation.kernels import kernel_settings
from raytrain_at.evaluation.threats import AUTOATTACK_NORMS, ThreatModel

VERSIONS: dict[str, tuple[str, ...]] = {
    "standard": ("apgd-ce", "apgd-t", "fab-t", "square"),
    "fast": ("apgd-ce", "apgd-t"),
    "apgdt": ("apgd-t",),
}
MISCLASSIFIED = "misclassified"
ROBUST = "robust"


def check_version(version: str) -> tuple[str, ...]:
    if version not in VERSIONS:
        raise UserError(f"unknown attack version {version!r} (known: {', '.join(VERSIONS)})")
    return VERSIONS[version]


def build_autoattack(model: nn.Module, threat: ThreatModel, version: str, seed: int,
                     device: torch.device | str, num_classes: int):
    """A pyautoattack ``AutoAttack`` with the reference standard set-up, restricted to the
    version's attacks (and the APGD-T sweep variant's 40 iterations / 3 targets)."""
    from pyautoattack import AutoAttack

    attacks = check_version(version)
    aa = AutoAttack(model, norm=AUTOATTACK_NORMS[threat.norm], eps=threat.eps,
                    version="standard", seed=seed, device=device)
    aa.verbose = False
    aa.attacks_to_run = list(attacks)
    if version == "apgdt":
        aa.apgd_targeted.n_iter = 40
        aa.apgd_targeted.n_target_classes = 3
    # Fewer classes than targets (e.g. 10-class data): target every other class once.
    aa.apgd_targeted.n_target_classes = min(aa.apgd_targeted.n_target_classes, num_classes - 1)
    aa.fab.n_target_classes = min(aa.fab.n_target_classes, num_classes - 1)
    return aa


@dataclass
class ChunkRecord:
    """The state of one chunk under one threat model (saved as JSON between attacks).

    ``status[i]`` is ``misclassified`` (wrong on the clean image), the name of the attack that
    broke image ``ids[i]``, or ``robust`` (not broken by the attacks run so far).
    """

    ids: list[int]
    status: list[str]
    attacks_done: list[str] = field(default_factory=list)
    max_perturbation: float = 0.0
    warnings: dict[str, str] = field(default_factory=dict)
    complete: bool = False
    # Fast kernels: breaks the exact model did not confirm (those images stay robust).
    unconfirmed: int = 0
    # The threat model it was attacked under (checked against the unit's when read back).
    norm: str = ""
    eps: float = 0.0

    def as_dict(self) -> dict:
        return asdict(self)


def perturbation_norms(delta: torch.Tensor, norm: str) -> torch.Tensor:
    flat = delta.flatten(1)
    if norm == "linf":
        return flat.abs().amax(1)
    if norm == "l2":
        return flat.norm(p=2, dim=1)
    return flat.abs().sum(1)


@torch.no_grad()
def predict(model: nn.Module, x: torch.Tensor, batch_size: int) -> torch.Tensor:
    """Predicted classes, batch by batch (the same batches as the reference's clean pass)."""
    if len(x) == 0:
        return torch.zeros(0, dtype=torch.long, device=x.device)
    return torch.cat([model(x[i:i + batch_size]).argmax(1) for i in range(0, len(x), batch_size)])


def run_one_attack(aa, attack: str, x: torch.Tensor, y: torch.Tensor, batch_size: int,
                   kernels: str = "exact") -> tuple[torch.Tensor, torch.Tensor]:
    """``aa``'s ``run_standard_evaluation`` with only ``attack`` enabled, under ``kernels``'
    settings: the adversarial images and their predicted labels."""
    only = list(aa.attacks_to_run)
    aa.attacks_to_run = [attack]
    try:
        with kernel_settings(kernels):
            return aa.run_standard_evaluation(x, y, batch_size=batch_size)
    finally:
        aa.attacks_to_run = only


def attack_chunk(model: nn.Module, aa, x: torch.Tensor, y: torch.Tensor, ids: list[int],
                 norm: str, *, batch_size: int, record: ChunkRecord | None = None,
                 save: Callable[[ChunkRecord], None] = lambda record: None,
                 warnings: dict[str, str] | None = None, kernels: str = "exact",
                 exact_model: nn.Module | None = None, exact_aa=None) -> ChunkRecord:
    """Run the remaining attacks of ``aa`` on a chunk, saving the record after each attack.

    Args:
        model: the model in eval mode (the one ``aa`` attacks).
        aa: from :func:`build_autoattack`.
        x, y: the chunk's images in [0, 1] and labels, on ``aa``'s device.
        ids: the images' global ids (recorded, used to merge shards).
        norm: the threat's norm (to measure perturbations).
        batch_size: images per attack batch.
        record: a saved record to resume from (its finished attacks are skipped).
        save: called with the record after the clean pass and after every attack.
        warnings: live dict of AutoAttack warnings (from the guards' capture) to store.
        kernels: ``exact`` or ``fast`` (:mod:`raytrain_at.evaluation.kernels`). With ``fast`` the
            attacks run with TF32 on ``model``; ``exact_model`` decides the clean predictions
            and checks every reported break with exact kernels, and an image whose break does
            not hold is attacked again by ``exact_aa`` (the same attack on ``exact_model``), so
            no image escapes an attack through the faster arithmetic.
        exact_model, exact_aa: the exact model and its AutoAttack (default ``model``, ``aa``).
    """
    exact_model = exact_model if exact_model is not None else model
    exact_aa = exact_aa if exact_aa is not None else aa
    if record is None:
        with kernel_settings("exact"):
            correct = predict(exact_model, x, batch_size).eq(y).cpu().tolist()
        record = ChunkRecord(ids=list(ids), status=[ROBUST if c else MISCLASSIFIED
                                                     for c in correct])
        save(record)
    for attack in aa.attacks_to_run:
        if attack in record.attacks_done:
            continue
        alive = [i for i, s in enumerate(record.status) if s == ROBUST]
        if alive:
            index = torch.tensor(alive, device=x.device)
            x_sub, y_sub = x[index], y[index]
            x_adv, y_adv = run_one_attack(aa, attack, x_sub, y_sub, batch_size, kernels)
            broken = y_adv.ne(y_sub)
            if kernels == "fast" and broken.any():
                x_adv, broken = _confirm_breaks(exact_model, exact_aa, attack, x_sub, y_sub,
                                                x_adv, broken, batch_size, record)
            if broken.any():
                size = perturbation_norms((x_adv - x_sub)[broken], norm).max().item()
                record.max_perturbation = max(record.max_perturbation, size)
            for position, was_broken in zip(alive, broken.cpu().tolist()):
                if was_broken:
                    record.status[position] = attack
        record.attacks_done.append(attack)
        if warnings:
            record.warnings.update(warnings)
        record.complete = all(a in record.attacks_done for a in aa.attacks_to_run)
        save(record)
    return record


def _confirm_breaks(exact_model: nn.Module, exact_aa, attack: str, x: torch.Tensor,
                    y: torch.Tensor, x_adv: torch.Tensor, broken: torch.Tensor, batch_size: int,
                    record: ChunkRecord) -> tuple[torch.Tensor, torch.Tensor]:
    """Keep the fast attack's breaks that the exact model confirms; attack the others again
    with exact kernels (counted in ``record.unconfirmed``)."""
    candidates = broken.nonzero().squeeze(1)
    with kernel_settings("exact"):
        holds = predict(exact_model, x_adv[candidates], batch_size).ne(y[candidates])
    retry = candidates[~holds]
    if len(retry) == 0:
        return x_adv, broken
    record.unconfirmed += len(retry)
    x_adv, broken = x_adv.clone(), broken.clone()
    x_again, y_again = run_one_attack(exact_aa, attack, x[retry], y[retry], batch_size, "exact")
    x_adv[retry] = x_again
    broken[retry] = y_again.ne(y[retry])
    return x_adv, broken
