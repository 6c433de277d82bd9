"""Training: adversarial objectives (pure functions); engine, loop and launch come with Ray Train."""

from raytrain_at.training.objectives import training_step_loss

__all__ = ["training_step_loss"]
