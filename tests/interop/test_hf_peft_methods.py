"""Parity of our non-LoRA methods with the real HF PEFT (torch CPU) on tiny random Llama and BERT.

Methods: IA3, VeRA, LoHa, LoKr, OFT, LayerNorm tuning, trainable tokens and BEFT. Each case wraps
an HF model with ``peft.get_peft_model`` and attaches the same method to our NNX model loaded from
the same base checkpoint. Every HF adapter tensor is first moved off its init by random noise
(``p += 0.2 * randn``; unit noise for VeRA's lambdas), so zero factors such as VeRA's
``lambda_b``, LoHa's ``w2_b``, LoKr's ``w1``, OFT's skew vector and BEFT's bias become non-zero,
and IA3's ones and the norms' copies move away from the base; then every tensor is copied into
ours in our layout (VeRA's shared ``vera_A`` / ``vera_B`` too).
Then the logits of a padded batch must agree to 1e-4 (fp32) and differ clearly from the HF model
with its adapter disabled (a no-op adapter cannot pass). Trainable parameter counts must equal
HF's ``get_nb_trainable_parameters()[0]``: like with like, HF with ``task_type=None`` (no head in
``modules_to_save``), except the ``ia3_seqcls`` case, where HF's ``SEQ_CLS`` head copy is matched
by our `ModulesToSave` on ``classifier``. ``trainable_tokens_tied`` runs a Llama with
``tie_word_embeddings=True``: HF ties a second TrainableTokensLayer on ``lm_head`` to the
embedding's, ours reads the replaced rows through the embedding's ``attend``.
"""

import copy

import numpy as np
import pytest
from flax import nnx

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

import jax.numpy as jnp  # noqa: E402

import peft_jax  # noqa: E402
from peft_jax.models.decoder_load import load_decoder  # noqa: E402
from peft_jax.models.encoder import load_encoder  # noqa: E402

pytestmark = [
    pytest.mark.interop,
    # peft 0.21 reads transformers 5's deprecated alias; not ours to fix.
    pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing` is deprecated:FutureWarning"),
    # HF BEFT warns on bias-free layers (Llama's v_proj), which are exactly BEFT's use case.
    pytest.mark.filterwarnings("ignore:Detected that the base layer has no bias term:UserWarning"),
    # HF LN tuning looks for in/out features on the norms it wraps, finds none and warns.
    pytest.mark.filterwarnings("ignore:Unsupported layer type '<class '[^']*Norm'>':UserWarning"),
]

TOL = 1e-4
VOCAB = 97
LLAMA = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
             num_attention_heads=4, num_key_value_heads=2, head_dim=8, max_position_embeddings=64,
             pad_token_id=0, bos_token_id=1, eos_token_id=2, tie_word_embeddings=False)
BERT = dict(vocab_size=99, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
            intermediate_size=37, max_position_embeddings=64, type_vocab_size=2, num_labels=3)
NOISE = 0.2


def _is_llama(arch: str) -> bool:
    return arch.startswith("llama")  # "llama", or "llama_tied" (its lm_head is embed_tokens)


def _tokens_in_batch(arch):
    """Three distinct ids that occur at real (unpadded) positions of the test batch."""
    ids, mask, _ = _batch(arch)
    return tuple(int(i) for i in np.unique(ids[mask == 1])[[0, 5, 11]])


# name -> arch -> (HF config kwargs builder, our config builder, number of HF tuner layers)
def _cases():
    llama_tok, bert_tok = _tokens_in_batch("llama"), _tokens_in_batch("bert")
    return {
        "ia3": {
            "llama": (lambda: peft.IA3Config(target_modules=["k_proj", "v_proj", "down_proj"],
                                             feedforward_modules=["down_proj"]),
                      lambda: peft_jax.IA3Config(targets=["k_proj", "v_proj", "down_proj"],
                                                 feedforward_modules=["down_proj"]), 6),
            "bert": (lambda: peft.IA3Config(target_modules=["key", "value", "output.dense"],
                                            feedforward_modules=["output.dense"]),
                     lambda: peft_jax.IA3Config(targets=["key", "value", "output/dense"],
                                                feedforward_modules=["output/dense"]), 8),
        },
        "ia3_seqcls": {
            "bert": (lambda: peft.IA3Config(target_modules=["key", "value"], feedforward_modules=[],
                                            task_type="SEQ_CLS"),
                     lambda: peft_jax.compose(
                         peft_jax.IA3Config(targets=["key", "value"]),
                         peft_jax.place(["classifier"], peft_jax.ModulesToSave())), 4),
        },
        "vera": {
            "llama": (lambda: peft.VeraConfig(r=8, target_modules=["q_proj", "v_proj"]),
                      lambda: peft_jax.place(["q_proj", "v_proj"], peft_jax.Vera(rank=8)), 4),
            "bert": (lambda: peft.VeraConfig(r=8, target_modules=["query", "value"]),
                     lambda: peft_jax.place(["query", "value"], peft_jax.Vera(rank=8)), 4),
        },
        "loha": {
            "llama": (lambda: peft.LoHaConfig(r=4, alpha=8, target_modules=["q_proj", "v_proj", "up_proj"]),
                      lambda: peft_jax.place(["q_proj", "v_proj", "up_proj"],
                                             peft_jax.LoHa(rank=4, alpha=8.0)), 6),
            "bert": (lambda: peft.LoHaConfig(r=4, alpha=8, target_modules=["query", "value"]),
                     lambda: peft_jax.place(["query", "value"], peft_jax.LoHa(rank=4, alpha=8.0)), 4),
        },
        "lokr": {
            "llama": (lambda: peft.LoKrConfig(r=4, alpha=8, target_modules=["q_proj", "v_proj", "up_proj"]),
                      lambda: peft_jax.place(["q_proj", "v_proj", "up_proj"],
                                             peft_jax.LoKr(rank=4, alpha=8.0)), 6),
            "bert": (lambda: peft.LoKrConfig(r=4, alpha=8, target_modules=["query", "value"]),
                     lambda: peft_jax.place(["query", "value"], peft_jax.LoKr(rank=4, alpha=8.0)), 4),
        },
        # r=2 with decompose_both: w2 as w2_b @ w2_a everywhere, w1 as w1_b @ w1_a on up_proj.
        "lokr_lowrank": {
            "llama": (lambda: peft.LoKrConfig(r=2, alpha=3, decompose_both=True,
                                              target_modules=["q_proj", "v_proj", "up_proj"]),
                      lambda: peft_jax.place(["q_proj", "v_proj", "up_proj"],
                                             peft_jax.LoKr(rank=2, alpha=3.0, decompose_both=True)), 6),
        },
        "oft": {
            "llama": (lambda: peft.OFTConfig(r=0, oft_block_size=8, target_modules=["q_proj", "v_proj"]),
                      lambda: peft_jax.place(["q_proj", "v_proj"],
                                             peft_jax.OFT(r=0, oft_block_size=8)), 4),
            "bert": (lambda: peft.OFTConfig(r=0, oft_block_size=8, target_modules=["query", "value"]),
                     lambda: peft_jax.place(["query", "value"], peft_jax.OFT(r=0, oft_block_size=8)), 4),
        },
        "oft_cayley": {  # the exact Cayley map instead of the Neumann series
            "llama": (lambda: peft.OFTConfig(r=0, oft_block_size=8, use_cayley_neumann=False,
                                             target_modules=["q_proj", "v_proj"]),
                      lambda: peft_jax.place(["q_proj", "v_proj"], peft_jax.OFT(
                          r=0, oft_block_size=8, use_cayley_neumann=False)), 4),
        },
        "ln_tuning": {
            "llama": (lambda: peft.LNTuningConfig(target_modules=["input_layernorm",
                                                                  "post_attention_layernorm"]),
                      lambda: peft_jax.place(["input_layernorm", "post_attention_layernorm"],
                                             peft_jax.LnTuning()), 4),
            "bert": (lambda: peft.LNTuningConfig(target_modules=["LayerNorm"]),
                     lambda: peft_jax.place(["LayerNorm"], peft_jax.LnTuning()), 5),
        },
        "trainable_tokens": {
            "llama": (lambda: peft.TrainableTokensConfig(target_modules=["embed_tokens"],
                                                         token_indices=list(llama_tok)),
                      lambda: peft_jax.place(["embed_tokens"],
                                             peft_jax.TrainableTokens(indices=llama_tok)), 1),
            "bert": (lambda: peft.TrainableTokensConfig(target_modules=["word_embeddings"],
                                                        token_indices=list(bert_tok)),
                     lambda: peft_jax.place(["word_embeddings"],
                                            peft_jax.TrainableTokens(indices=bert_tok)), 1),
        },
        # Tied head: HF ties a TrainableTokensLayer on lm_head to the embedding's; ours reads the
        # replaced rows through the embedding's attend.
        "trainable_tokens_tied": {
            "llama_tied": (lambda: peft.TrainableTokensConfig(target_modules=["embed_tokens"],
                                                              token_indices=list(llama_tok)),
                           lambda: peft_jax.place(["embed_tokens"],
                                                  peft_jax.TrainableTokens(indices=llama_tok)), 2),
        },
        "beft": {
            "llama": (lambda: peft.BeftConfig(target_modules=["v_proj"]),
                      lambda: peft_jax.place(["v_proj"], peft_jax.Beft()), 2),
            "bert": (lambda: peft.BeftConfig(target_modules=["value"]),
                     lambda: peft_jax.place(["value"], peft_jax.Beft()), 2),
        },
    }


# --- HF side ---------------------------------------------------------------------------------------
def _ours_path(arch: str, hf_name: str) -> str:
    """HF PEFT module name -> our module path (see decoder.py / encoder.py)."""
    name = hf_name.removeprefix("base_model.model.")
    if _is_llama(arch):  # LlamaForCausalLM.model.layers... -> Decoder.layers...
        name = name.removeprefix("model.")
    return name.replace(".", "/")  # BertForSequenceClassification.bert... -> .bert/...


def _hf_tuner_layers(peft_model) -> dict[str, "torch.nn.Module"]:
    from peft.tuners.tuners_utils import BaseTunerLayer

    return {n: m for n, m in peft_model.named_modules() if isinstance(m, BaseTunerLayer)}


def _hf_adapter_tensors(layer) -> dict[str, "torch.Tensor"]:
    """``{our param name: HF tensor}`` of one HF tuner layer's ``default`` adapter (HF layout)."""
    out = {}
    for attr in layer.adapter_layer_names:
        holder = getattr(layer, attr, None)
        if holder is None or "default" not in holder:
            continue
        value = holder["default"]
        if attr == "oft_R":  # an OFTRotationModule: its (n, b(b-1)/2) weight
            out["oft_r"] = value.weight
        elif attr == "ln_tuning_layers":  # a copy of the norm: weight (and bias)
            for pname, p in value.named_parameters():
                out[{"weight": "scale"}.get(pname, pname)] = p
        elif isinstance(value, torch.nn.Module):
            raise AssertionError(f"unexpected HF adapter module {attr} in {type(layer)}")
        else:
            out[attr] = value
    assert out, f"no default adapter tensors in {type(layer).__name__}"
    return out


def _to_ours(name: str, t: "torch.Tensor") -> np.ndarray:
    """One HF adapter tensor in our layout (our kernels are (in, out), torch's (out, in))."""
    a = t.detach().numpy()
    if name in ("ia3_l", "beft_bias"):  # HF (out, 1) / (1, in) / (1, out) -> flat
        return a.reshape(-1)
    if name.startswith(("hada_", "lokr_")):  # 2-D factors, each transposed
        assert a.ndim == 2, (name, a.shape)
        return a.T
    # vera lambdas (flat), oft_r (n, b(b-1)/2), trainable_tokens_delta (n, features), norm copies.
    return a


def _randomise(peft_model, seed):
    """Every trainable HF param moved off its init: ``p += NOISE * randn``. VeRA's per-feature
    scales get unit noise (their effect through the fixed random projections is small otherwise)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in sorted(peft_model.named_parameters()):
            if p.requires_grad:
                scale = 1.0 if "vera_lambda" in name else NOISE
                p.add_(torch.randn(p.shape, generator=gen) * scale)


def _batch(arch: str):
    rng = np.random.default_rng(0)
    t = 10
    ids = rng.integers(3, VOCAB, size=(3, t))
    mask = np.ones((3, t), np.int64)
    if _is_llama(arch):  # left padding, as generation uses
        mask[1, :3] = 0
        mask[2, :6] = 0
    else:  # right padding
        mask[1, 7:] = 0
        mask[2, 4:] = 0
    ids = np.where(mask == 1, ids, 0)
    types = rng.integers(0, 2, size=ids.shape) * mask
    return ids, mask, types


def _hf_logits(arch, model, batch) -> np.ndarray:
    ids, mask, types = batch
    kw = dict(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask))
    if _is_llama(arch):
        kw["position_ids"] = torch.tensor(np.clip(mask.cumsum(1) - 1, 0, None))
    else:
        kw["token_type_ids"] = torch.tensor(types)
    with torch.no_grad():
        return model(**kw).logits.numpy()


def _our_logits(arch, model, batch) -> np.ndarray:
    ids, mask, types = (jnp.asarray(a, jnp.int32) for a in batch)
    if _is_llama(arch):
        return np.asarray(nnx.jit(lambda m, i, a: m(i, attention_mask=a))(model, ids, mask))
    return np.asarray(nnx.jit(lambda m, i, a, t: m(i, a, t))(model, ids, mask, types))


def _real(arch, logits, batch):
    return logits[batch[1] == 1] if _is_llama(arch) else logits  # padded positions carry no meaning


@pytest.fixture(scope="module")
def bases(tmp_path_factory):
    """``arch -> (HF base model, checkpoint dir)``, built once per module."""
    out = {}
    torch.manual_seed(0)
    llama = transformers.LlamaForCausalLM(transformers.LlamaConfig(**LLAMA))
    bert = transformers.BertForSequenceClassification(transformers.BertConfig(**BERT))
    tied = transformers.LlamaForCausalLM(transformers.LlamaConfig(**{**LLAMA, "tie_word_embeddings": True}))
    for arch, hf in (("llama", llama), ("bert", bert), ("llama_tied", tied)):
        hf.eval()
        with torch.no_grad():  # norms away from their neutral init, weights at a larger scale
            for p in hf.parameters():
                p.add_(torch.randn_like(p) * 0.05)
            if arch == "bert":  # logits of order one, so that small adapter effects show
                hf.classifier.weight.mul_(10.0)
        d = tmp_path_factory.mktemp(arch)
        hf.save_pretrained(d, safe_serialization=True)
        out[arch] = (hf, d)
    return out


def _load_ours(arch, d):
    if _is_llama(arch):
        return load_decoder(d)[0]
    return load_encoder(d, "float32", num_labels=BERT["num_labels"], pooling="pooler")


def _hf_values(arch, hf) -> dict[str, np.ndarray]:
    """All of HF's adapter values as a canonical flat dict of ours."""
    values = {}
    for hf_name, layer in _hf_tuner_layers(hf).items():
        if getattr(layer, "tied_adapter", None) is not None:
            continue  # HF's lm_head layer tied to the embedding's: no params of its own
        path = _ours_path(arch, hf_name)
        for key, t in _hf_adapter_tensors(layer).items():
            values[f"{path}/default/{key}"] = _to_ours(key, t)
    for attr in ("vera_A", "vera_B"):  # VeRA's shared frozen projections, same layout as ours
        bank = getattr(hf.base_model, attr, None)
        if bank is not None:
            values[f"default/shared/{attr}"] = bank["default"].detach().numpy()
    from peft.utils import ModulesToSaveWrapper

    for hf_name, module in hf.named_modules():
        if isinstance(module, ModulesToSaveWrapper):  # the SEQ_CLS head copy (torch Linear)
            path = _ours_path(arch, hf_name)
            copy_ = module.modules_to_save["default"]
            values[f"{path}/default/kernel"] = copy_.weight.detach().numpy().T
            values[f"{path}/default/bias"] = copy_.bias.detach().numpy()
    return values


def _case_params():
    for case, per_arch in _cases().items():
        for arch in per_arch:
            marks = ()
            if case == "trainable_tokens_tied":  # HF warns on a tied layer, though it ties this one
                marks = pytest.mark.filterwarnings("ignore:Model has `tie_word_embeddings=True`:UserWarning")
            yield pytest.param(arch, case, id=f"{arch}-{case}", marks=marks)


@pytest.mark.parametrize("arch,case", list(_case_params()))
def test_matches_hf_peft(bases, arch, case):
    hf_cfg, our_cfg, n_layers = _cases()[case][arch]
    hf_base, d = bases[arch]

    torch.manual_seed(1)
    hf = peft.get_peft_model(copy.deepcopy(hf_base), hf_cfg())
    hf.eval()
    assert len(_hf_tuner_layers(hf)) == n_layers

    ours = _load_ours(arch, d)
    peft_jax.nnx.attach(ours, our_cfg(), rngs=nnx.Rngs(0))
    ours.eval()

    assert peft_jax.nnx.summary(ours).trainable == hf.get_nb_trainable_parameters()[0]

    _randomise(hf, seed=2)
    values = _hf_values(arch, hf)
    current = peft_jax.nnx.adapter_state(ours)
    assert set(values) == set(current), (sorted(set(values) ^ set(current)))
    for key, value in values.items():  # load_adapter_state reshapes, so check the layout here
        assert tuple(current[key].shape) == value.shape, (key, current[key].shape, value.shape)
    peft_jax.nnx.load_adapter_state(ours, values)
    loaded = peft_jax.nnx.adapter_state(ours)
    for key, value in values.items():
        np.testing.assert_array_equal(np.asarray(loaded[key]), value, err_msg=key)

    batch = _batch(arch)
    ref = _real(arch, _hf_logits(arch, hf, batch), batch)
    got = _real(arch, _our_logits(arch, ours, batch), batch)
    assert got.shape == ref.shape
    diff = float(np.abs(got - ref).max())
    assert diff < TOL, diff

    # The adapter must matter: HF's adapter-disabled model gives clearly different logits, and
    # so does ours with its adapter disabled.
    with hf.disable_adapter():
        base = _real(arch, _hf_logits(arch, hf, batch), batch)
    assert np.abs(base - ref).max() > 100 * TOL
    with peft_jax.nnx.disabled(ours):
        our_base = _real(arch, _our_logits(arch, ours, batch), batch)
    assert float(np.abs(our_base - base).max()) < TOL
