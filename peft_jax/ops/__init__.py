"""Layers as linear functions of their kernels: the one interface every weight method targets."""

from peft_jax.ops.base import LinearOp
from peft_jax.ops.contraction import ContractionOp, dense_op
from peft_jax.ops.conv import ConvOp
from peft_jax.ops.einsum import EinsumOp
from peft_jax.ops.embed import EmbedOp

__all__ = ["LinearOp", "ContractionOp", "dense_op", "ConvOp", "EinsumOp", "EmbedOp"]
