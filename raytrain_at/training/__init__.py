"""Training: adversarial objectives (pure functions); engine, loop and launch use Ray Train."""

from raytrain_at.training.objectives import StepLoss, training_step_loss

__all__ = ["StepLoss", "training_step_loss"]
