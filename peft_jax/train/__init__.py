"""Training: the trainable-only step factory (and, later, mesh / pmap steps and the fit loop)."""

from peft_jax.train.cost import compiled_flops
from peft_jax.train.losses import causal_lm_loss
from peft_jax.train.pmap import make_pmap_train_step, replicate, shard_batch, unreplicate
from peft_jax.train.precision import Precision, cast_floating
from peft_jax.train.sharding import (DECODER_RULES, ENCODER_RULES, ShardedStep, make_mesh,
                                     make_sharded_train_step)
from peft_jax.train.step import StepOptions, StepState, make_train_step

__all__ = ["causal_lm_loss", "compiled_flops", "make_train_step"]
__all__ += ["DECODER_RULES", "ENCODER_RULES", "Precision", "ShardedStep", "StepOptions", "StepState",
            "cast_floating", "make_mesh", "make_pmap_train_step", "make_sharded_train_step",
            "replicate", "shard_batch", "unreplicate"]
