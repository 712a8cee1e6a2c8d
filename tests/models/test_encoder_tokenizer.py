"""Tokenizer glue: fixed/longest padding, truncation, padding side, typed errors."""

import numpy as np
import pytest
from tokenizers import Tokenizer, models, pre_tokenizers

from peft_jax import errors
from peft_jax.models.tokenizer import TextTokenizer, load_tokenizer

VOCAB = {"[PAD]": 0, "[UNK]": 1, "a": 2, "b": 3, "c": 4}


def _raw(vocab=VOCAB):
    raw = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    raw.pre_tokenizer = pre_tokenizers.Whitespace()
    return raw


def test_fixed_and_longest_padding_and_truncation():
    tok = TextTokenizer(_raw())
    fixed = tok.encode(["a b c a b", "c"], max_length=4)
    assert fixed["input_ids"].tolist() == [[2, 3, 4, 2], [4, 0, 0, 0]]
    assert fixed["attention_mask"].tolist() == [[1, 1, 1, 1], [1, 0, 0, 0]]
    assert {a.dtype for a in fixed.values()} == {np.dtype(np.int32)}
    longest = tok.encode(["a b", "c"], max_length=16, padding="longest")
    assert longest["input_ids"].shape == (2, 2)
    left = tok.encode(["a b", "c"], max_length=3, padding_side="left")
    assert left["input_ids"].tolist() == [[0, 2, 3], [0, 0, 4]]
    assert tok.decode([2, 3]) == "a b"


def test_pad_id_detection_and_errors(tmp_path):
    with pytest.raises(errors.InvalidConfigError, match="pad_id"):
        TextTokenizer(_raw({"[UNK]": 0, "a": 1}))
    assert TextTokenizer(_raw({"[UNK]": 0, "a": 1}), pad_id=0).pad_id == 0
    with pytest.raises(errors.InvalidConfigError, match="max_length"):
        TextTokenizer(_raw()).encode(["a"], max_length=0)
    with pytest.raises(errors.CheckpointError, match="no tokenizer file"):
        load_tokenizer(tmp_path)
    (tmp_path / "tokenizer.json").write_text("{broken")
    with pytest.raises(errors.CheckpointError, match="not a valid tokenizers file"):
        load_tokenizer(tmp_path)


def test_roundtrip_file(tmp_path):
    _raw().save(str(tmp_path / "tokenizer.json"))
    assert load_tokenizer(tmp_path).encode(["b"], max_length=2)["input_ids"].tolist() == [[3, 0]]
