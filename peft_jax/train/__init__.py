"""Training: the trainable-only step factory (and, later, mesh / pmap steps and the fit loop)."""

from peft_jax.train.step import make_train_step

__all__ = ["make_train_step"]
