"""Prompt tuning and P-tuning on an input site: against HF PEFT, and on their own.

The HF tests build HF PEFT's own ``PromptEmbedding`` (TEXT / SAMPLE_VOCAB init) and
``PromptEncoder`` (MLP and LSTM, one and two LSTM layers), copy its weights into ours by
`hf_names` and compare the prompts (1e-5, fp32). The pure-JAX tests check what the input tap
receives (prompt first, mask extended, decoding steps untouched), every init, jit, gradients
and every typed error.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from peft_jax import errors
from peft_jax.methods.base import Context, Inputs, InputSite, LinearSite
from peft_jax.methods.p_tuning import PTuning, bidirectional_lstm, fold_prompt, hf_names, params_from_hf
from peft_jax.methods.prompt import PromptTuning, repeat_to_length, token_ids_of
from peft_jax.ops import dense_op

TOL = 1e-5
D, VOCAB = 6, 11
SITE = InputSite(path="input_tap", layer="InputTap", features=D, vocab_size=VOCAB)
LIMITED = InputSite(path="input_tap", layer="InputTap", features=D, vocab_size=VOCAB, max_positions=10)
TABLE = jnp.asarray(np.random.default_rng(0).normal(size=(VOCAB, D)), jnp.float32)
BASE = {"embedding": TABLE}


def interop(test):
    """Marks an HF PEFT comparison (peft 0.21 reads transformers 5's deprecated alias; not ours)."""
    ignore = "ignore:`is_gradient_checkpointing` is deprecated:FutureWarning"
    return pytest.mark.interop(pytest.mark.filterwarnings(ignore)(test))


def _inputs(batch=2, seq=4, dtype=jnp.float32, fresh=True, offset=0):
    embeds = jnp.asarray(np.random.default_rng(1).normal(size=(batch, seq, D)), dtype)
    mask = jnp.asarray(np.arange(seq)[None, :] < np.array([[seq], [seq - 1]])[:batch])
    return Inputs(embeds, mask, fresh, offset)


def _identity(x):
    return x


def _init(method, site=SITE, base=BASE, seed=0):
    return method.init(jax.random.key(seed), site, base, {})[0]


# --- what the model receives -------------------------------------------------------------------------
@pytest.mark.parametrize("method", [PromptTuning(num_virtual_tokens=3), PTuning(num_virtual_tokens=3),
                                    PTuning(num_virtual_tokens=3, encoder="lstm", encoder_hidden_size=4)],
                         ids=["prompt_tuning", "p_tuning_mlp", "p_tuning_lstm"])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_prepends_prompt_and_extends_mask(method, dtype):
    params = _init(method)
    x = _inputs(dtype=dtype)
    out = method.apply(params, {}, SITE, _identity, x, BASE, Context())
    prompt = (params["prompt_embeddings"] if isinstance(method, PromptTuning) else fold_prompt(method, params))
    assert out.embeds.shape == (2, 7, D) and out.embeds.dtype == dtype
    for b in range(2):
        np.testing.assert_array_equal(np.asarray(out.embeds[b, :3]), np.asarray(prompt.astype(dtype)))
    np.testing.assert_array_equal(np.asarray(out.embeds[:, 3:]), np.asarray(x.embeds))
    assert out.mask.dtype == jnp.bool_
    np.testing.assert_array_equal(np.asarray(out.mask[:, :3]), True)
    np.testing.assert_array_equal(np.asarray(out.mask[:, 3:]), np.asarray(x.mask))
    assert out.fresh and out.offset == 0


@pytest.mark.parametrize("method", [PromptTuning(num_virtual_tokens=3), PTuning(num_virtual_tokens=3)])
def test_decoding_step_is_untouched(method):
    params = _init(method)
    x = _inputs(seq=1, fresh=False)
    seen = []
    out = method.apply(params, {}, LIMITED, lambda i: seen.append(i) or i, x, BASE, Context())
    assert seen == [x] and out is x


def test_calls_on_with_the_new_inputs():
    method = PromptTuning(num_virtual_tokens=2)
    params = _init(method)
    out = method.apply(params, {}, SITE, lambda i: i.embeds.sum(-1), _inputs(), BASE, Context())
    assert out.shape == (2, 6)  # whatever the call returns comes back


def test_jit_and_gradients():
    for method in (PromptTuning(num_virtual_tokens=2), PTuning(num_virtual_tokens=2, encoder="lstm")):
        params = _init(method)
        x = _inputs()

        def loss(p, x=x, method=method):
            out = method.apply(p, {}, SITE, _identity, x, BASE, Context())
            return jnp.sum(out.embeds ** 2)

        eager = loss(params)
        value, grads = jax.jit(jax.value_and_grad(loss))(params)
        np.testing.assert_allclose(value, eager, rtol=1e-5)
        for name, g in grads.items():
            assert np.all(np.isfinite(g)) and np.any(g != 0), name


# --- inits -------------------------------------------------------------------------------------------
def test_random_inits():
    big = InputSite(path="t", layer="T", features=64, vocab_size=VOCAB)
    base = {"embedding": jnp.zeros((VOCAB, 64))}
    normal = _init(PromptTuning(num_virtual_tokens=64), big, base)["prompt_embeddings"]
    assert normal.shape == (64, 64) and normal.dtype == jnp.float32
    assert abs(float(normal.mean())) < 0.05 and abs(float(normal.std()) - 1.0) < 0.05
    uniform = _init(PromptTuning(num_virtual_tokens=64, prompt_init="random_uniform"), big, base)
    u = np.asarray(uniform["prompt_embeddings"])
    assert u.min() >= -0.5 and u.max() <= 0.5 and u.min() < -0.49 and u.max() > 0.49
    assert abs(u.std() - 1 / np.sqrt(12)) < 0.01


def test_vocab_init_takes_table_rows():
    method = PromptTuning(num_virtual_tokens=8, prompt_init="vocab")
    prompt = np.asarray(_init(method)["prompt_embeddings"])
    table = np.asarray(TABLE)
    for row in prompt:
        assert any(np.array_equal(row, r) for r in table)
    assert len({tuple(r) for r in prompt}) > 1  # random ids, not one row repeated
    np.testing.assert_array_equal(prompt, np.asarray(_init(method)["prompt_embeddings"]))  # same key
    other = np.asarray(_init(method, seed=1)["prompt_embeddings"])
    assert not np.array_equal(prompt, other)


def test_half_precision_table_gives_float32_params():
    half = {"embedding": TABLE.astype(jnp.bfloat16)}
    for init in ("vocab", "random", "random_uniform"):
        params = _init(PromptTuning(num_virtual_tokens=2, prompt_init=init), base=half)
        assert params["prompt_embeddings"].dtype == jnp.float32
    params = _init(PTuning(num_virtual_tokens=2, encoder="lstm"), base=half)
    assert {v.dtype for v in params.values()} == {jnp.dtype(jnp.float32)}
    out = PTuning(num_virtual_tokens=2, encoder="lstm").apply(
        params, {}, SITE, _identity, _inputs(dtype=jnp.bfloat16), half, Context())
    assert out.embeds.dtype == jnp.bfloat16


@pytest.mark.parametrize("ids, n, want", [((4, 7, 1), 7, (4, 7, 1, 4, 7, 1, 4)),
                                          ((4, 7, 1, 9, 2), 3, (4, 7, 1)),
                                          ((5,), 3, (5, 5, 5)), ((4, 7), 2, (4, 7))])
def test_text_init_repeats_or_truncates(ids, n, want):
    method = PromptTuning(num_virtual_tokens=n, prompt_init="text", token_ids=ids)
    assert method.init_ids == want == repeat_to_length(ids, n)
    np.testing.assert_array_equal(np.asarray(_init(method)["prompt_embeddings"]), np.asarray(TABLE)[list(want)])


@interop
@pytest.mark.parametrize("text_ids, n", [([3, 1, 4, 1, 5, 9, 2], 4), ([2, 7], 5)], ids=["truncate", "repeat"])
def test_text_init_matches_hf(monkeypatch, text_ids, n):
    torch = pytest.importorskip("torch")
    pytest.importorskip("peft")
    import transformers
    from peft import PromptTuningConfig
    from peft.tuners.prompt_tuning.model import PromptEmbedding

    class FakeTokenizer:
        def __call__(self, text):
            return {"input_ids": list(text_ids)}

    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", lambda *a, **k: FakeTokenizer())
    config = PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=n, token_dim=D,
                                num_transformer_submodules=1, num_attention_heads=1, num_layers=1,
                                prompt_tuning_init="TEXT", prompt_tuning_init_text="some text",
                                tokenizer_name_or_path="fake")
    words = torch.nn.Embedding(VOCAB, D)
    with torch.no_grad():
        words.weight.copy_(torch.from_numpy(np.array(TABLE)))
    hf = PromptEmbedding(config, words).embedding.weight.detach().numpy()
    ours = PromptTuning.from_text("some text", FakeTokenizer(), num_virtual_tokens=n)
    np.testing.assert_allclose(np.asarray(_init(ours)["prompt_embeddings"]), hf, atol=TOL, rtol=TOL)


@interop
def test_vocab_init_is_hf_style():
    torch = pytest.importorskip("torch")
    pytest.importorskip("peft")
    from peft import PromptTuningConfig
    from peft.tuners.prompt_tuning.model import PromptEmbedding

    config = PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=5, token_dim=D,
                                num_transformer_submodules=1, num_attention_heads=1, num_layers=1,
                                prompt_tuning_init="SAMPLE_VOCAB")
    words = torch.nn.Embedding(VOCAB, D)
    hf = PromptEmbedding(config, words).embedding.weight.detach().numpy()
    table = words.weight.detach().numpy()
    ours = np.asarray(_init(PromptTuning(num_virtual_tokens=5, prompt_init="vocab"),
                            base={"embedding": jnp.asarray(table)})["prompt_embeddings"])
    for prompt in (hf, ours):  # both: rows of the word embedding, (N, d), fp32
        assert prompt.shape == (5, D) and prompt.dtype == np.float32
        assert all(any(np.array_equal(row, r) for r in table) for row in prompt)


# --- tokenizers ----------------------------------------------------------------------------------------
def test_from_text_with_the_library_tokenizers():
    tokenizers = pytest.importorskip("tokenizers")
    from peft_jax.models.lm_tokenizer import LMTokenizer
    from peft_jax.models.tokenizer import TextTokenizer

    def raw():
        tok = tokenizers.Tokenizer(tokenizers.models.WordLevel(
            {"[PAD]": 0, "[UNK]": 1, "hi": 2, "there": 3, "you": 4}, unk_token="[UNK]"))
        tok.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
        return tok

    text_tok = TextTokenizer(raw())
    text_tok.encode(["hi"], max_length=8)  # leaves max_length padding configured on the raw tokenizer
    assert token_ids_of("hi there you", text_tok) == (2, 3, 4)
    assert token_ids_of("hi there you", LMTokenizer(raw())) == (2, 3, 4)
    assert token_ids_of("you hi", raw()) == (4, 2)  # a bare tokenizers.Tokenizer (an Encoding)
    method = PromptTuning.from_text("there you", LMTokenizer(raw()), num_virtual_tokens=3)
    assert method.prompt_init == "text" and method.token_ids == (3, 4) and method.init_ids == (3, 4, 3)


def test_from_text_with_hf_style_and_plain_tokenizers():
    class HFStyle:
        def __call__(self, text):
            return {"input_ids": [[1, 5, 2]], "attention_mask": [[1, 1, 1]]}

    class Plain:
        def encode(self, text):
            return np.array([7, 8], np.int64)

    assert token_ids_of("x", HFStyle()) == (1, 5, 2)
    assert token_ids_of("x", Plain()) == (7, 8)
    with pytest.raises(errors.InvalidConfigError, match="no tokens"):
        token_ids_of("", type("Empty", (), {"encode": lambda self, t: []})())
    with pytest.raises(errors.InvalidConfigError, match="cannot tokenize"):
        token_ids_of("x", object())
    with pytest.raises(errors.InvalidConfigError, match="must be a string"):
        PromptTuning.from_text(["x"], Plain())


# --- P-tuning against HF PEFT's PromptEncoder ---------------------------------------------------------------
def _hf_encoder(encoder, n, hidden, layers, dropout=0.0):
    pytest.importorskip("torch")
    pytest.importorskip("peft")
    from peft import PromptEncoderConfig
    from peft.tuners.p_tuning.model import PromptEncoder

    config = PromptEncoderConfig(task_type="CAUSAL_LM", num_virtual_tokens=n, token_dim=D,
                                 num_transformer_submodules=1, num_attention_heads=1, num_layers=1,
                                 encoder_reparameterization_type=encoder.upper(), encoder_hidden_size=hidden,
                                 encoder_num_layers=layers, encoder_dropout=dropout)
    return PromptEncoder(config).eval()


@interop
@pytest.mark.parametrize("encoder, layers, hidden", [("mlp", 2, 5), ("mlp", 2, D), ("lstm", 1, 3),
                                                     ("lstm", 2, 4), ("lstm", 3, 2)])
def test_p_tuning_matches_hf_prompt_encoder(encoder, layers, hidden):
    torch = pytest.importorskip("torch")
    n = 5
    dropout = 0.1 if encoder == "lstm" and layers > 1 else 0.0  # eval mode: no dropout in either
    hf = _hf_encoder(encoder, n, hidden, layers, dropout)
    with torch.no_grad():
        want = hf(torch.arange(n)[None])[0].numpy()
    ours = PTuning(num_virtual_tokens=n, encoder=encoder, encoder_hidden_size=hidden,
                   encoder_num_layers=layers, encoder_dropout=dropout)
    state = hf.state_dict()
    assert set(state) == {key[len("prompt_encoder.default."):] for key, _ in hf_names(ours).values()}
    params = params_from_hf(ours, state)
    assert {k: tuple(v.shape) for k, v in params.items()} == ours.param_shapes(SITE)
    np.testing.assert_allclose(np.asarray(fold_prompt(ours, params)), want, atol=TOL, rtol=TOL)
    # the same through the input site, and with a full PeftModel-style key prefix
    prefixed = {f"base_model.prompt_encoder.default.{k}": v for k, v in state.items()}
    params = params_from_hf(ours, prefixed)
    out = ours.apply(params, {}, SITE, _identity, _inputs(), BASE, Context())
    np.testing.assert_allclose(np.asarray(out.embeds[1, :n]), want, atol=TOL, rtol=TOL)


@interop
@pytest.mark.parametrize("encoder, layers", [("mlp", 2), ("lstm", 2)])
def test_p_tuning_inits_are_torch_defaults(encoder, layers):
    hidden = 4
    hf = _hf_encoder(encoder, 3, hidden, layers)
    ours = PTuning(num_virtual_tokens=3, encoder=encoder, encoder_hidden_size=hidden, encoder_num_layers=layers)
    params = _init(ours)
    state = {k: v.detach().numpy() for k, v in hf.state_dict().items()}
    for name, (key, transpose) in hf_names(ours).items():
        theirs = state[key[len("prompt_encoder.default."):]]
        mine = np.asarray(params[name])
        assert mine.shape == (theirs.T.shape if transpose else theirs.shape), name
        if name == "embedding":
            assert abs(mine.std() - 1.0) < 0.6 and abs(theirs.std() - 1.0) < 0.6
            continue
        fan_in = hidden if name.startswith("lstm") else (mine.shape[0] if transpose else None)
        if fan_in is None:  # a bias: fan_in of its kernel
            fan_in = params[name.replace("_bias", "_kernel")].shape[0]
        bound = 1 / np.sqrt(fan_in)
        for values in (mine, theirs):
            assert np.abs(values).max() <= bound + 1e-7, name


def test_lstm_dropout_only_in_training():
    method = PTuning(num_virtual_tokens=4, encoder="lstm", encoder_num_layers=2, encoder_dropout=0.5)
    assert method.needs_rng and not PTuning(num_virtual_tokens=4, encoder="lstm").needs_rng
    assert not PTuning().needs_rng
    params = _init(method)
    evaluated = method.prompt(params)
    key = jax.random.key(3)
    trained = method.prompt(params, key)
    assert not np.allclose(np.asarray(evaluated), np.asarray(trained))
    np.testing.assert_array_equal(np.asarray(trained), np.asarray(method.prompt(params, key)))
    out = method.apply(params, {}, SITE, _identity, _inputs(), BASE, Context(key))
    np.testing.assert_array_equal(np.asarray(out.embeds[0, :4]), np.asarray(out.embeds[1, :4]))


def test_bidirectional_lstm_reverse_direction_sees_the_future():
    method = PTuning(num_virtual_tokens=4, encoder="lstm", encoder_num_layers=1, encoder_hidden_size=3)
    params = _init(method)
    weights = {k[len("lstm_head_"):]: v for k, v in params.items() if k.startswith("lstm_head_")}
    x = params["embedding"]
    out = bidirectional_lstm(weights, x, 1)
    changed = bidirectional_lstm(weights, x.at[-1].add(1.0), 1)
    np.testing.assert_array_equal(np.asarray(out[:-1, :3]), np.asarray(changed[:-1, :3]))  # forward: causal
    assert not np.allclose(np.asarray(out[0, 3:]), np.asarray(changed[0, 3:]))  # backward: sees the end


def test_hf_names_and_params_from_hf_errors():
    method = PTuning(num_virtual_tokens=2, encoder="lstm", encoder_num_layers=2)
    names = hf_names(method, adapter="task")
    assert len(names) == 1 + 2 * 2 * 4 + 4
    assert names["lstm_head_bias_ih_l1_reverse"] == ("prompt_encoder.task.lstm_head.bias_ih_l1_reverse", False)
    assert names["mlp_head_2_kernel"] == ("prompt_encoder.task.mlp_head.2.weight", True)
    shapes = method.param_shapes(SITE)
    state = {key: np.zeros(shapes[ours][::-1] if t else shapes[ours]) for ours, (key, t) in names.items()}
    assert set(params_from_hf(method, state, adapter="task")) == set(names)
    with pytest.raises(errors.CheckpointError, match="no 'prompt_encoder.default.embedding.weight'"):
        params_from_hf(method, state)
    bad = dict(state, **{names["mlp_head_0_bias"][0]: np.zeros(3)})
    with pytest.raises(errors.CheckpointError, match="mlp_head_0_bias"):
        params_from_hf(method, bad, adapter="task")


# --- typed errors --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("method", [PromptTuning, PTuning])
def test_sequence_too_long_at_check(method):
    method(num_virtual_tokens=9).check(LIMITED)
    with pytest.raises(errors.SequenceTooLongError, match="10 virtual tokens leave no room"):
        method(num_virtual_tokens=10).check(LIMITED)
    method(num_virtual_tokens=10).check(SITE)  # no limit


@pytest.mark.parametrize("method", [PromptTuning(num_virtual_tokens=4), PTuning(num_virtual_tokens=4)])
def test_sequence_too_long_at_apply_before_compile(method):
    params = _init(method, LIMITED)
    method.apply(params, {}, LIMITED, _identity, _inputs(seq=6), BASE, Context())  # 4 + 6 = 10 fits
    with pytest.raises(errors.SequenceTooLongError, match=r"4 virtual tokens \+ 7 input tokens = 11.*at most 10"):
        method.apply(params, {}, LIMITED, _identity, _inputs(seq=7), BASE, Context())
    with pytest.raises(errors.SequenceTooLongError, match=r"\+ 2 earlier virtual tokens = 11.*at most 4 tokens"):
        jax.jit(lambda p: method.apply(p, {}, LIMITED, _identity, _inputs(seq=5, offset=2), BASE, Context()))(
            params)
    method.apply(params, {}, LIMITED, _identity, _inputs(seq=20, fresh=False), BASE, Context())


@pytest.mark.parametrize("kwargs, match", [
    ({"num_virtual_tokens": 0}, "num_virtual_tokens"),
    ({"num_virtual_tokens": 2.0}, "num_virtual_tokens"),
    ({"num_virtual_tokens": True}, "num_virtual_tokens"),
    ({"prompt_init": "TEXT"}, "prompt_init must be one of"),
    ({"prompt_init": "text"}, "needs token_ids"),
    ({"prompt_init": "text", "token_ids": ()}, "at least one token id"),
    ({"prompt_init": "text", "token_ids": (1, -2)}, "non-negative"),
    ({"prompt_init": "text", "token_ids": "abc"}, "tuple of token ids"),
    ({"prompt_init": "vocab", "token_ids": (1,)}, "only used by prompt_init='text'"),
])
def test_prompt_tuning_bad_config(kwargs, match):
    with pytest.raises(errors.InvalidConfigError, match=match):
        PromptTuning(**kwargs)


def test_prompt_tuning_site_errors():
    with pytest.raises(errors.InvalidConfigError, match=r"token ids \[11, 20\] are out of range"):
        PromptTuning(prompt_init="text", token_ids=(3, 11, 20)).check(SITE)
    linear = LinearSite(path="q", op=dense_op(4, 3), layer="Linear", has_bias=False)
    for method in (PromptTuning(), PTuning()):
        with pytest.raises(errors.UnsupportedLayerError, match="needs a inputs site"):
            method.check(linear)
    with pytest.raises(errors.InvalidConfigError, match="needs the word-embedding table"):
        PromptTuning(prompt_init="vocab").init(jax.random.key(0), SITE, {}, {})
    assert _init(PromptTuning(num_virtual_tokens=2), base={})["prompt_embeddings"].shape == (2, D)
    wide = {"prompt_embeddings": jnp.zeros((2, D + 1))}
    with pytest.raises(errors.InvalidConfigError, match="7 wide but the input embeddings are 6"):
        PromptTuning(num_virtual_tokens=2).apply(wide, {}, SITE, _identity, _inputs(), BASE, Context())


@pytest.mark.parametrize("kwargs, match", [
    ({"num_virtual_tokens": -1}, "num_virtual_tokens"),
    ({"encoder": "gru"}, "'mlp' .* or 'lstm'"),
    ({"encoder": None}, "'mlp' .* or 'lstm'"),
    ({"encoder_hidden_size": 0}, "encoder_hidden_size"),
    ({"encoder": "lstm", "encoder_num_layers": 0}, "encoder_num_layers"),
    ({"encoder": "lstm", "encoder_dropout": 1.0}, "encoder_dropout"),
])
def test_p_tuning_bad_config(kwargs, match):
    with pytest.raises(errors.InvalidConfigError, match=match):
        PTuning(**kwargs)


def test_p_tuning_warnings_and_hf_spellings():
    with pytest.warns(UserWarning, match="ignores encoder_num_layers=3"):
        PTuning(encoder_num_layers=3)
    with pytest.warns(UserWarning, match="ignores encoder_dropout"):
        PTuning(encoder_dropout=0.1)
    with pytest.warns(UserWarning, match="no effect"):
        PTuning(encoder="lstm", encoder_num_layers=1, encoder_dropout=0.1)
    assert PTuning(encoder="LSTM").encoder == "lstm" and PTuning(encoder="MLP").encoder == "mlp"
    assert PTuning().hidden_size(SITE) == D and PTuning(encoder_hidden_size=3).hidden_size(SITE) == 3
