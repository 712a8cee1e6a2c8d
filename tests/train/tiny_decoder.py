"""A tiny random LLaMA-layout decoder in HF layout (config.json, model.safetensors, a byte-level
BPE tokenizer.json with a ChatML template in tokenizer_config.json), for CLI and recipe tests."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from safetensors.numpy import save_file
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from peft_jax.models.decoder_config import DecoderConfig
from peft_jax.models.decoder_load import hf_tensor_shapes

SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
TEMPLATE = ("{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + "
            "'<|im_end|>\\n' }}{% endfor %}{% if add_generation_prompt %}"
            "{{ '<|im_start|>assistant\\n' }}{% endif %}")
LINES = ["hello world, the capital of France is Paris", "once upon a time there was a cat",
         "What is the capital of France?", "héllo wörld 日本 🙂"]


def tokenizer(lines: Sequence[str] = LINES, vocab_size: int = 320) -> Tokenizer:
    """A byte-level BPE trained on ``lines`` (with the ChatML special tokens)."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(list(lines) * 8, trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=SPECIALS, show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    return tok


def write_decoder(directory: Path, lines: Sequence[str] = LINES, *, vocab_size: int = 320,
                  hidden_size: int = 32, num_layers: int = 2, scale: float = 0.5, seed: int = 0,
                  template: str | None = TEMPLATE) -> Path:
    """Writes the model to ``directory`` (created) and returns it."""
    directory.mkdir(parents=True, exist_ok=True)
    tok = tokenizer(lines, vocab_size)
    tok.save(str(directory / "tokenizer.json"))
    config = {"eos_token": "<|im_end|>", "pad_token": "<|endoftext|>", "bos_token": None}
    (directory / "tokenizer_config.json").write_text(json.dumps(
        config | ({"chat_template": template} if template else {})))
    hf = {"model_type": "llama", "vocab_size": tok.get_vocab_size(), "hidden_size": hidden_size,
          "intermediate_size": 2 * hidden_size, "num_hidden_layers": num_layers,
          "num_attention_heads": 4, "num_key_value_heads": 2, "tie_word_embeddings": True,
          "eos_token_id": tok.token_to_id("<|im_end|>")}
    (directory / "config.json").write_text(json.dumps(hf))
    rng = np.random.default_rng(seed)
    shapes = hf_tensor_shapes(DecoderConfig.from_hf(hf))
    save_file({k: (rng.standard_normal(s) * scale).astype(np.float32) for k, s in shapes.items()},
              str(directory / "model.safetensors"))
    return directory
