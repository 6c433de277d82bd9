"""Evaluation: AutoAttack, sweeps, corruptions, guards."""
