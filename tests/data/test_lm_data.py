"""Language-model data: packing, held-out tails, the chat loss mask on known examples, bad files."""

import json

import numpy as np
import pytest
from train import tiny_decoder

from peft_jax import errors
from peft_jax.data.lm_data import chat_example, load_lm_dataset, pack_blocks, tail_split
from peft_jax.models.lm_tokenizer import LMTokenizer


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    return LMTokenizer.from_hf_dir(tiny_decoder.write_decoder(tmp_path_factory.mktemp("tiny")))


@pytest.fixture(scope="module")
def plain_tok(tmp_path_factory):
    d = tiny_decoder.write_decoder(tmp_path_factory.mktemp("plain"), template=None)
    return LMTokenizer.from_hf_dir(d)


def test_pack_blocks_joins_documents_with_eos_and_drops_the_tail():
    blocks = pack_blocks([[1, 2, 3, 4], [5, 6, 7]], block_length=3, eos_token_id=9)
    assert blocks["input_ids"].tolist() == [[1, 2, 3], [4, 9, 5]]  # [6, 7] is not a full block
    assert blocks["attention_mask"].all() and blocks["loss_mask"].all()
    assert blocks["input_ids"].dtype == np.int32


def test_tail_split_keeps_order_and_covers_every_line():
    lines = [f"l{i}" for i in range(20)]
    train, val, test = tail_split(lines, 0.1, 0.25)
    assert train + val + test == lines and len(val) == 2 and len(test) == 5


def test_chat_mask_covers_exactly_the_completion_and_its_end_of_turn(tok):
    messages = [{"role": "user", "content": "What is the capital of France?"},
                {"role": "assistant", "content": "Paris"}]
    ids, mask, cut = chat_example(tok, messages, block_length=64)
    assert not cut and len(ids) == len(mask)
    trained = [i for i, m in zip(ids, mask) if m]
    assert tok.decode(trained, skip_special_tokens=False) == "Paris<|im_end|>\n"
    prompt = [i for i, m in zip(ids, mask) if not m]
    assert tok.decode(prompt, skip_special_tokens=False) == (
        "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n")
    assert mask == sorted(mask)  # prompt first, then only completion tokens


def test_multi_turn_masks_every_assistant_turn_and_no_user_turn(tok):
    messages = [{"role": "user", "content": "hello"}, {"role": "assistant", "content": "world"},
                {"role": "user", "content": "cat"}, {"role": "assistant", "content": "Paris"}]
    ids, mask, _ = chat_example(tok, messages, block_length=128)
    runs, current = [], []
    for i, m in zip(ids, mask):
        if m:
            current.append(i)
        elif current:
            runs, current = runs + [current], []
    runs += [current] if current else []
    assert [tok.decode(r, skip_special_tokens=False) for r in runs] == [
        "world<|im_end|>\n", "Paris<|im_end|>\n"]


def test_without_a_template_the_completion_and_eos_are_trained(plain_tok):
    ids, mask, _ = chat_example(plain_tok, [{"role": "user", "content": "hello "},
                                            {"role": "assistant", "content": "world"}], 32)
    assert plain_tok.decode([i for i, m in zip(ids, mask) if m], skip_special_tokens=False) == (
        "world<|im_end|>")


def test_truncation_is_counted(tmp_path, tok):
    rows = [{"prompt": "hello " * 30, "completion": "world"}] * 4 + [
        {"prompt": "hi", "completion": "Paris"}] * 4
    path = tmp_path / "chat.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    ds = load_lm_dataset(path, tok, block_length=40, val_fraction=0.0, test_fraction=0.0)
    assert ds.kind == "chat" and ds.truncated == 4 and ds.train["input_ids"].shape == (8, 40)
    # rows cut inside the prompt keep no target; the others train on their completion only
    assert ds.train["loss_mask"].sum(1).tolist().count(0) == 4


def test_text_jsonl_and_txt_are_packed_and_split(tmp_path, tok):
    docs = [{"text": f"once upon a time there was a cat number {i}"} for i in range(40)]
    path = tmp_path / "docs.jsonl"
    path.write_text("".join(json.dumps(d) + "\n" for d in docs))
    ds = load_lm_dataset(path, tok, block_length=8, val_fraction=0.1, test_fraction=0.1, seed=1)
    assert ds.kind == "text" and ds.rows("train") > ds.rows("val") > 0 and ds.rows("test") > 0
    txt = tmp_path / "book.txt"
    txt.write_text("\n".join(f"line {i} hello world, the capital of France is Paris" for i in range(50)))
    ds = load_lm_dataset(txt, tok, block_length=16, val_fraction=0.1, test_fraction=0.1)
    assert ds.train["input_ids"].shape[1] == 16 and ds.target_tokens("test") > 0
    test_text = tok.decode(ds.test["input_ids"].ravel().tolist())
    assert "line 49" in test_text or "line 48" in test_text  # the test split is the file's tail


BAD = {
    "empty.jsonl": ("", errors.DataError, "holds no rows"),
    "mixed.jsonl": ('{"text": "a"}\n{"body": "b"}\n', errors.DataError, "line 2 has no 'text'"),
    "noassistant.jsonl": ('{"messages": [{"role": "user", "content": "hi"}]}\n', errors.DataError,
                          "no assistant turn"),
    "short.txt": ("hi", errors.DataError, "shorter than one block"),
    "table.csv": ("text\nhi\n", errors.DataError, "a .txt or .jsonl file"),
    "latin1.txt": (b"caf\xe9\n", errors.DataError, "not UTF-8"),
}


@pytest.mark.parametrize("name", sorted(BAD))
def test_bad_files_raise_typed_errors(tmp_path, tok, name):
    content, error, match = BAD[name]
    path = tmp_path / name
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    with pytest.raises(error, match=match):
        load_lm_dataset(path, tok, block_length=64)


def test_unknown_name_and_bad_fractions(tok):
    with pytest.raises(errors.UnknownNameError, match="austen"):
        load_lm_dataset("no-such-corpus", tok, block_length=8)
    with pytest.raises(errors.InvalidConfigError, match="sum to less than 1"):
        load_lm_dataset("austen", tok, block_length=8, val_fraction=0.5, test_fraction=0.5)
