"""A tiny random BERT in HF layout (config.json, model.safetensors, tokenizer.json) and a small
synthetic sentiment dataset (train.jsonl / test.jsonl), written to disk for CLI and recipe tests."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
from flax import nnx
from safetensors.numpy import save_file
from tokenizers import Tokenizer, models, pre_tokenizers, processors

from peft_jax.models.encoder import Encoder, EncoderConfig

GOOD = ["great", "tasty", "love", "perfect", "yummy", "fresh"]
BAD = ["awful", "stale", "hate", "broken", "bland", "gross"]
FILLER = ["the", "snack", "was", "very", "and", "box", "coffee", "tea", "it", "this"]
SPECIAL = ["[PAD]", "[UNK]", "[CLS]", "[SEP]"]
VOCAB = SPECIAL + GOOD + BAD + FILLER
CONFIG = EncoderConfig(vocab_size=len(VOCAB), hidden_size=16, num_hidden_layers=2,
                       num_attention_heads=2, intermediate_size=32, max_position_embeddings=64)


def write_model(directory: Path, seed: int = 0) -> Path:
    """A random 2-layer BERT with a word-level tokenizer over `VOCAB`."""
    directory.mkdir(parents=True, exist_ok=True)
    model = Encoder(CONFIG, rngs=nnx.Rngs(seed))
    tensors = {}
    for path, var in nnx.iter_graph(model):
        if isinstance(var, nnx.Variable):
            parts = [str(p) for p in path]
            leaf = {"kernel": "weight", "embedding": "weight", "scale": "weight"}.get(parts[-1],
                                                                                       parts[-1])
            value = np.asarray(var.get_value())
            tensors[".".join(parts[:-1] + [leaf])] = np.ascontiguousarray(
                value.T if parts[-1] == "kernel" else value)
    save_file(tensors, str(directory / "model.safetensors"))
    (directory / "config.json").write_text(json.dumps(dataclasses.asdict(CONFIG)))
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(VOCAB)}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", special_tokens=[("[CLS]", 2), ("[SEP]", 3)])
    tok.save(str(directory / "tokenizer.json"))
    return directory


def sentences(n: int, seed: int) -> list[dict]:
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(n):
        label = int(i % 2)
        words = list(rng.choice(FILLER, size=rng.integers(2, 9)))
        words.insert(int(rng.integers(0, len(words))), str(rng.choice(GOOD if label else BAD)))
        rows.append({"text": " ".join(words), "label": "pos" if label else "neg"})
    return rows


def write_data(directory: Path, n_train: int = 48, n_test: int = 24) -> Path:
    """Reviews with one sentiment word each: ``pos`` when it is a good word."""
    directory.mkdir(parents=True, exist_ok=True)
    for split, n, seed in (("train", n_train, 0), ("test", n_test, 1)):
        lines = [json.dumps(r) for r in sentences(n, seed)]
        (directory / f"{split}.jsonl").write_text("\n".join(lines) + "\n")
    return directory
