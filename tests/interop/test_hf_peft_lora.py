"""Parity of our LoRA family with the real HF PEFT (torch CPU) on tiny random Llama and BERT.

Each case wraps an HF model with ``peft.get_peft_model`` and attaches the same adapter to our NNX
model loaded from the same base checkpoint. With the default (zero ``B``) init, HF's ``lora_B``
is first set to random values and every HF adapter tensor is copied into ours, so the logits
(1e-4, fp32, padded batch) test the forward math: LoRA, rsLoRA's scale, DoRA's magnitude and
norm, per-layer rank/alpha patterns. PiSSA and OLoRA are checked on our own init: the products
``scale * B @ A`` and the residual base kernels must match HF's (factors are only defined up to
SVD/QR signs), then the logits, then again after a random ``B`` copied from HF. Trainable
parameter counts must equal HF's ``get_nb_trainable_parameters``.
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
]

TOL = 1e-4
RANK, ALPHA = 4, 8
VOCAB = 97
LLAMA = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
             num_attention_heads=4, num_key_value_heads=2, head_dim=8, max_position_embeddings=64,
             pad_token_id=0, bos_token_id=1, eos_token_id=2)
BERT = dict(vocab_size=99, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
            intermediate_size=37, max_position_embeddings=64, type_vocab_size=2, num_labels=3)
TARGETS = {"llama": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
           "bert": ["query", "key", "value", "dense"]}
# HF keys match "(.*\.)?(key)$" on dotted names; ours are regexes fullmatched on "/" paths.
PATTERNS = dict(hf=dict(rank_pattern={"v_proj": 2, "mlp.down_proj": 6},
                        alpha_pattern={"o_proj": 3.0, "v_proj": 5.0}),
                ours=dict(rank_pattern={r".*/v_proj": 2, r".*/mlp/down_proj": 6},
                          alpha_pattern={r".*/o_proj": 3.0, r".*/v_proj": 5.0}))
# name: (HF LoraConfig kwargs, our LoraConfig kwargs)
CASES = {
    "lora": ({}, {}),
    "rslora": ({"use_rslora": True}, {"use_rslora": True}),
    "dora": ({"use_dora": True}, {"use_dora": True}),
    "pissa": ({"init_lora_weights": "pissa"}, {"init": peft_jax.PiSSA()}),
    "olora": ({"init_lora_weights": "olora"}, {"init": peft_jax.OLoRA()}),
    "patterns": (PATTERNS["hf"], PATTERNS["ours"]),
}
SVD_INITS = ("pissa", "olora")


# --- the only code that knows where our adapter params live -------------------------------------
# The canonical layout: <module path>/<adapter name>/<param>.
def _adapter_prefix(module_path: str, name: str) -> tuple[str, ...]:
    return (*module_path.split("/"), name)


def _our_adapter_vars(model, module_path: str, name: str):
    prefix = _adapter_prefix(module_path, name)
    state = nnx.state(model, nnx.LoRAParam)
    found = {}
    for path, var in nnx.to_flat_state(state):
        path = tuple(str(p) for p in path)
        if path[:-1] == prefix:
            found[path[-1]] = var
    assert found, f"no adapter {name!r} at {module_path!r}"
    return state, found


def our_adapter_params(model, module_path: str, name: str = "default") -> dict[str, np.ndarray]:
    """``{"lora_a": (in, r), "lora_b": (r, out)[, "magnitude": (out,)]}`` of one adapted layer."""
    _, found = _our_adapter_vars(model, module_path, name)
    return {k: np.asarray(v[...]) for k, v in found.items()}


def set_our_adapter_params(model, module_path: str, values: dict, name: str = "default") -> None:
    """Overwrites the named adapter params of one layer (shapes must already agree)."""
    state, found = _our_adapter_vars(model, module_path, name)
    assert set(values) == set(found), (module_path, sorted(values), sorted(found))
    for key, value in values.items():
        assert tuple(found[key].shape) == tuple(value.shape), (module_path, key, found[key].shape,
                                                               value.shape)
        found[key][...] = jnp.asarray(value, found[key][...].dtype)
    nnx.update(model, state)


def our_base_kernel(model, module_path: str) -> np.ndarray:
    """The (possibly residual) frozen base kernel ``(in, out)`` of an adapted layer."""
    module = model
    for part in module_path.split("/"):
        module = module[int(part)] if part.isdigit() else getattr(module, part)
    return np.asarray(module.kernel[...])


# --- HF side ---------------------------------------------------------------------------------------
def _ours_path(arch: str, hf_name: str) -> str:
    """HF PEFT module name -> our module path (see decoder.py / encoder.py)."""
    name = hf_name.removeprefix("base_model.model.")
    if arch == "llama":  # LlamaForCausalLM.model.layers... -> Decoder.layers...
        name = name.removeprefix("model.")
    return name.replace(".", "/")  # BertForSequenceClassification.bert... -> .bert/...


def _hf_lora_layers(peft_model) -> dict[str, "torch.nn.Module"]:
    from peft.tuners.lora import LoraLayer

    return {n: m for n, m in peft_model.named_modules() if isinstance(m, LoraLayer)}


def _hf_adapter(layer) -> dict[str, np.ndarray]:
    """HF tensors in our layout: A (r, in) -> (in, r), B (out, r) -> (r, out), magnitude (out,)."""
    out = {"lora_a": layer.lora_A["default"].weight.detach().numpy().T,
           "lora_b": layer.lora_B["default"].weight.detach().numpy().T}
    if "default" in getattr(layer, "lora_magnitude_vector", {}):
        out["magnitude"] = layer.lora_magnitude_vector["default"].weight.detach().numpy()
    return out


def _batch(arch: str):
    rng = np.random.default_rng(0)
    t = 10
    ids = rng.integers(3, VOCAB, size=(3, t))
    mask = np.ones((3, t), np.int64)
    if arch == "llama":  # left padding, as generation uses
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
    if arch == "llama":
        kw["position_ids"] = torch.tensor(np.clip(mask.cumsum(1) - 1, 0, None))
    else:
        kw["token_type_ids"] = torch.tensor(types)
    with torch.no_grad():
        return model(**kw).logits.numpy()


def _our_logits(arch, model, batch) -> np.ndarray:
    ids, mask, types = (jnp.asarray(a, jnp.int32) for a in batch)
    if arch == "llama":
        return np.asarray(nnx.jit(lambda m, i, a: m(i, attention_mask=a))(model, ids, mask))
    return np.asarray(nnx.jit(lambda m, i, a, t: m(i, a, t))(model, ids, mask, types))


def _assert_logits_match(arch, hf_model, ours, batch):
    ref, got = _hf_logits(arch, hf_model, batch), _our_logits(arch, ours, batch)
    assert got.shape == ref.shape
    if arch == "llama":  # padded positions carry no meaning
        real = batch[1] == 1
        ref, got = ref[real], got[real]
    diff = float(np.abs(got - ref).max())
    assert diff < TOL, diff
    return ref


@pytest.fixture(scope="module")
def bases(tmp_path_factory):
    """``arch -> (HF base model, checkpoint dir)``, built once per module."""
    out = {}
    torch.manual_seed(0)
    llama = transformers.LlamaForCausalLM(transformers.LlamaConfig(**LLAMA))
    bert = transformers.BertForSequenceClassification(transformers.BertConfig(**BERT))
    for arch, hf in (("llama", llama), ("bert", bert)):
        hf.eval()
        with torch.no_grad():  # norms away from their neutral init, weights at a larger scale
            for p in hf.parameters():
                p.add_(torch.randn_like(p) * 0.05)
        d = tmp_path_factory.mktemp(arch)
        hf.save_pretrained(d, safe_serialization=True)
        out[arch] = (hf, d)
    return out


def _load_ours(arch, d):
    if arch == "llama":
        return load_decoder(d)[0]
    return load_encoder(d, "float32", num_labels=BERT["num_labels"], pooling="pooler")


def _randomise_b(layers, seed):
    """HF's lora_B (zero at the default init) set to random non-zero values."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in layers.values():
            w = layer.lora_B["default"].weight
            w.copy_(torch.randn(w.shape, generator=gen) * 0.2)


def _case_params():
    for arch in ("llama", "bert"):
        for case in CASES:
            if case == "patterns" and arch == "bert":
                continue  # rank/alpha patterns once is enough
            yield pytest.param(arch, case, id=f"{arch}-{case}")


@pytest.mark.parametrize("arch,case", list(_case_params()))
def test_matches_hf_peft(bases, arch, case):
    hf_kw, our_kw = CASES[case]
    hf_base, d = bases[arch]
    hf_base_state = {k: v.clone() for k, v in hf_base.state_dict().items()}

    torch.manual_seed(1)
    hf = peft.get_peft_model(copy.deepcopy(hf_base), peft.LoraConfig(
        r=RANK, lora_alpha=ALPHA, target_modules=TARGETS[arch], lora_dropout=0.0, **hf_kw))
    hf.eval()
    layers = _hf_lora_layers(hf)
    assert len(layers) == (14 if arch == "llama" else 13)

    ours = _load_ours(arch, d)
    peft_jax.nnx.attach(ours, peft_jax.LoraConfig(
        targets=TARGETS[arch], rank=RANK, alpha=ALPHA, **our_kw), rngs=nnx.Rngs(0))
    ours.eval()

    assert peft_jax.nnx.summary(ours).trainable == hf.get_nb_trainable_parameters()[0]

    batch = _batch(arch)
    if case in SVD_INITS:
        # (a) our own init from the same base weights vs HF's: products and residual kernels.
        for hf_name, layer in layers.items():
            path = _ours_path(arch, hf_name)
            h, o = _hf_adapter(layer), our_adapter_params(ours, path)
            scale = layer.scaling["default"]
            assert scale == ALPHA / RANK
            np.testing.assert_allclose(o["lora_a"] @ o["lora_b"] * scale,
                                       h["lora_a"] @ h["lora_b"] * scale, atol=2e-5, rtol=0,
                                       err_msg=f"{case} scale*A@B at {path}")
            residual = layer.get_base_layer().weight.detach().numpy().T
            np.testing.assert_allclose(our_base_kernel(ours, path), residual, atol=2e-5, rtol=0,
                                       err_msg=f"{case} residual kernel at {path}")
            original = hf_base_state[hf_name.removeprefix("base_model.model.") + ".weight"]
            assert np.abs(residual - original.numpy().T).max() > 1e-3  # the init moved weight
        # (b) logits with both sides' own init.
        _assert_logits_match(arch, hf, ours, batch)
        # then with a random B (HF's factors copied into ours) so the adapter path shows.
        _randomise_b(layers, seed=2)
    elif "init_lora_weights" not in hf_kw:
        _randomise_b(layers, seed=2)

    for hf_name, layer in layers.items():
        path = _ours_path(arch, hf_name)
        values = _hf_adapter(layer)
        set_our_adapter_params(ours, path, values)
        assert np.array_equal(our_adapter_params(ours, path)["lora_b"], values["lora_b"])
    ref = _assert_logits_match(arch, hf, ours, batch)

    # The adapter must matter: HF's adapter-disabled model gives clearly different logits (for
    # PiSSA/OLoRA that is the residual model).
    with hf.disable_adapter():
        base = _hf_logits(arch, hf, batch)
    if arch == "llama":
        base = base[batch[1] == 1]
    assert np.abs(base - ref).max() > 100 * TOL
