"""Training: the trainable-only step factory, mesh / pmap steps, the fit loop and checkpoints.

The `peft-jax train` recipe itself lives in `peft_jax.train.recipe` (``run(TrainSettings(...))``).
"""

from peft_jax.train.checkpoint import Checkpointer, TrainingState, restore_training_state, save_training_state
from peft_jax.train.cost import compiled_flops
from peft_jax.train.fit import FitResult, fit
from peft_jax.train.losses import causal_lm_loss
from peft_jax.train.metrics import MetricsLog, plot_metrics, read_metrics
from peft_jax.train.pmap import make_pmap_train_step, replicate, shard_batch, unreplicate
from peft_jax.train.precision import Precision, cast_floating
from peft_jax.train.rank_allocation import allocate_ranks, current_budget, rank_pattern
from peft_jax.train.settings import TrainSettings
from peft_jax.train.sharding import DECODER_RULES, ENCODER_RULES, ShardedStep, make_mesh, make_sharded_train_step
from peft_jax.train.step import StepOptions, StepState, make_train_step

__all__ = ["allocate_ranks", "causal_lm_loss", "compiled_flops", "current_budget", "make_train_step",
           "rank_pattern"]
__all__ += ["DECODER_RULES", "ENCODER_RULES", "Precision", "ShardedStep", "StepOptions", "StepState",
            "cast_floating", "make_mesh", "make_pmap_train_step", "make_sharded_train_step",
            "replicate", "shard_batch", "unreplicate"]
__all__ += ["Checkpointer", "FitResult", "MetricsLog", "TrainSettings", "TrainingState", "fit",
            "plot_metrics", "read_metrics", "restore_training_state", "save_training_state"]
