"""Gradients only for what trains, proven on XLA's FLOP count of the compiled step."""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "experiments"))

from peft_jax.models.decoder_config import DecoderConfig  # noqa: E402
from reference_steps import compare, compare_methods  # noqa: E402


def test_lora_step_skips_frozen_weight_gradients():
    config = DecoderConfig(vocab_size=1024, hidden_size=256, intermediate_size=704, num_layers=2,
                           num_heads=4, num_kv_heads=4, head_dim=64, tie_embeddings=False)
    result = compare(config, batch=2, seq=32, rank=8)
    # Full fine-tuning does 3 matmuls per weight (forward, input grad, weight grad); LoRA drops the
    # weight-gradient matmul of every frozen weight, so its step is about 2/3 of the full one.
    assert result["lora_over_full_flops"] <= 0.72, result
    assert result["lora_trainable_params"] == 2 * (4 * 8 * (256 + 256) + 3 * 8 * (256 + 704))


def test_weight_methods_skip_frozen_weight_gradients_too():
    """IA3 and VeRA (rank 16) have no weight-gradient matmul for the frozen weights either (<= 0.72,
    as LoRA); LoHa has no thin path (it forms dW), which the ratio shows rather than hides."""
    config = DecoderConfig(vocab_size=1024, hidden_size=256, intermediate_size=704, num_layers=2,
                           num_heads=4, num_kv_heads=4, head_dim=64, tie_embeddings=False)
    result = compare_methods(config, batch=2, seq=32, names=["ia3", "vera", "loha"])["methods"]
    assert result["ia3"]["over_full_flops"] <= 0.72, result
    assert result["vera"]["over_full_flops"] <= 0.72, result
    assert result["loha"]["over_full_flops"] > result["vera"]["over_full_flops"], result
    assert result["ia3"]["trainable_params"] == 2 * (256 + 256 + 704)
