"""Training: the trainable-only step factory (and, later, mesh / pmap steps and the fit loop)."""

from peft_jax.train.cost import compiled_flops
from peft_jax.train.losses import causal_lm_loss
from peft_jax.train.step import make_train_step

__all__ = ["causal_lm_loss", "compiled_flops", "make_train_step"]
