"""Parity of `peft_jax.arithmetic.add_weighted_adapter` with the real HF PEFT's, on a tiny random Llama.

Three LoRA adapters with random non-zero factors (``t1``: q/v/embed_tokens r4; ``t2``: rsLoRA
q/v/down_proj r4; ``t3``: q/down_proj r2, so sites differ and ranks too) are built in HF PEFT and
copied into our model loaded from the same checkpoint. For every combination type HF's
``add_weighted_adapter`` and ours must give the same new factors (1e-5): ``A`` and ``B``
directly for ``cat`` and the factor rules; for the SVD types the product ``A @ B`` and the
factors up to the sign of each singular component (HF's LAPACK and ours may pick either).
DARE's Bernoulli masks are recorded from HF (peft's ``random_pruning`` wrapped) and fed to ours.
The combined adapters then run: our logits equal HF's with the new adapter active (1e-4), and
differ clearly from the first source adapter's (a negative control).
"""

import copy

import numpy as np
import pytest
from flax import nnx

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

import jax.numpy as jnp  # noqa: E402
from peft.tuners.lora import LoraLayer  # noqa: E402
from peft.utils import merge_utils  # noqa: E402

import peft_jax  # noqa: E402
from peft_jax import arithmetic, errors  # noqa: E402
from peft_jax.models.decoder_load import load_decoder  # noqa: E402

pytestmark = [
    pytest.mark.interop,
    # peft 0.21 reads transformers 5's deprecated alias; not ours to fix.
    pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing` is deprecated:FutureWarning"),
]

TOL, LOGIT_TOL = 1e-5, 1e-4
# SVD factors up to sign: B carries the singular values (up to ~3.5 here), and two LAPACKs' float32
# singular vectors differ by ~1e-5 of that; the products B@A are held to TOL.
SVD_FACTOR_TOL = 3e-5
CLAMP = 0.9
VOCAB = 97
LLAMA = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
             num_attention_heads=4, num_key_value_heads=2, head_dim=8, max_position_embeddings=64,
             pad_token_id=0, bos_token_id=1, eos_token_id=2)
# name: (targets, rank, alpha, use_rslora)
ADAPTERS = {"t1": (["q_proj", "v_proj", "embed_tokens"], 4, 8, False),
            "t2": (["q_proj", "v_proj", "down_proj"], 4, 16, True),
            "t3": (["q_proj", "down_proj"], 2, 4, False)}
AB, ABC = (["t1", "t2"], [0.7, -0.4]), (["t1", "t2", "t3"], [0.6, -0.3, 0.9])
DENSITY = 0.6
FACTOR_TYPES = ("linear", "ties", "dare_linear", "dare_ties", "magnitude_prune")

# id: (adapters, weights, combination_type, options)
CASES = {
    "cat": (*AB, "cat", {}),
    "cat-ranks": (*ABC, "cat", {}),
    "linear": (*AB, "linear", {}),
    "ties-total": (*AB, "ties", {"density": DENSITY}),
    "ties-frequency": (*AB, "ties", {"density": DENSITY, "majority_sign_method": "frequency"}),
    "dare_linear": (*AB, "dare_linear", {"density": DENSITY}),
    "dare_ties-total": (*AB, "dare_ties", {"density": DENSITY}),
    "dare_ties-frequency": (*AB, "dare_ties", {"density": DENSITY, "majority_sign_method": "frequency"}),
    "magnitude_prune": (*AB, "magnitude_prune", {"density": DENSITY}),
    "svd": (*AB, "svd", {}),
    "svd-ranks": (*ABC, "svd", {}),
    "svd-rank3": (*ABC, "svd", {"svd_rank": 3}),
    "ties_svd-total": (*AB, "ties_svd", {"density": DENSITY}),
    "ties_svd-frequency": (*ABC, "ties_svd", {"density": DENSITY, "majority_sign_method": "frequency"}),
    "dare_linear_svd": (*AB, "dare_linear_svd", {"density": DENSITY}),
    "dare_ties_svd-total": (*ABC, "dare_ties_svd", {"density": DENSITY}),
    "dare_ties_svd-frequency": (*AB, "dare_ties_svd", {"density": DENSITY, "majority_sign_method": "frequency"}),
    "magnitude_prune_svd": (*ABC, "magnitude_prune_svd", {"density": DENSITY}),
    "single-adapter": (["t1"], [0.5], "svd", {}),  # one adapter: both force "linear"
}
RUN_LOGITS = ("cat-ranks", "linear", "svd-ranks", "dare_ties_svd-total")


# --- HF side ---------------------------------------------------------------------------------------
def _ours_path(hf_name: str) -> str:
    """HF PEFT module name -> our decoder path (LlamaForCausalLM.model.layers... -> layers/...)."""
    return hf_name.removeprefix("base_model.model.").removeprefix("model.").replace(".", "/")


def _hf_layers(hf) -> dict[str, LoraLayer]:
    return {_ours_path(n): m for n, m in hf.named_modules() if isinstance(m, LoraLayer)}


def _is_embedding(layer) -> bool:
    return len(layer.lora_embedding_A) > 0


def _hf_factor_params(layer, adapter):
    """HF's torch params of one adapter on one layer: ``(A (r, in), B (out, r))``, or None."""
    if adapter in layer.lora_A:
        return layer.lora_A[adapter].weight, layer.lora_B[adapter].weight
    if adapter in layer.lora_embedding_A:
        return layer.lora_embedding_A[adapter], layer.lora_embedding_B[adapter]
    return None


def hf_state(hf, adapter: str) -> dict[str, np.ndarray]:
    """HF adapter in our canonical layout: A (r, in) -> lora_a (in, r), B (out, r) -> lora_b (r, out)."""
    out = {}
    for path, layer in _hf_layers(hf).items():
        params = _hf_factor_params(layer, adapter)
        if params is not None:
            a, b = (p.detach().numpy().T for p in params)
            out[f"{path}/{adapter}/lora_a"], out[f"{path}/{adapter}/lora_b"] = a, b
    return out


class MaskRecorder:
    """Wraps peft's ``random_pruning`` (DARE) to keep every tensor and Bernoulli mask it draws."""

    def __init__(self):
        self.draws = []

    def __call__(self, tensor, density, rescale):
        mask = torch.bernoulli(torch.full_like(input=tensor, fill_value=density))
        self.draws.append((tensor.detach().clone(), mask))
        pruned = tensor * mask
        return pruned / density if rescale else pruned

    def our_masks(self, hf, adapters, new, combination_type) -> dict[str, np.ndarray]:
        """The draws keyed as ours takes them, in HF's order: layers in module order, then (factor
        rules) each adapter's A, then each adapter's B, or (SVD rules) each adapter's delta."""
        expected = []
        for path, layer in _hf_layers(hf).items():
            if _hf_factor_params(layer, new) is None:
                continue
            present = [n for n in adapters if _hf_factor_params(layer, n) is not None]
            if combination_type in FACTOR_TYPES:
                for side in (0, 1):
                    expected += [(f"{path}/{n}/{('lora_a', 'lora_b')[side]}",
                                  _hf_factor_params(layer, n)[side].detach()) for n in present]
            else:
                expected += [(f"{path}/{n}/delta", layer.get_delta_weight(n).detach()) for n in present]
        assert len(expected) == len(self.draws), (len(expected), len(self.draws))
        out = {}
        for (key, source), (tensor, mask) in zip(expected, self.draws):
            assert torch.allclose(tensor, source, atol=1e-7), key  # the draw belongs to this tensor
            # torch (out, in) layouts -> ours (in, out); an embedding's delta already is (vocab, dim)
            plain = key.endswith("/delta") and _is_embedding(_hf_layers(hf)[key.rsplit("/", 2)[0]])
            out[key] = mask.numpy() if plain else mask.numpy().T
        return out


# --- fixtures --------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """``(HF PeftModel with adapters t1, t2, t3, our decoder with the same adapters)``."""
    torch.manual_seed(0)
    base = transformers.LlamaForCausalLM(transformers.LlamaConfig(**LLAMA))
    base.eval()
    with torch.no_grad():
        for p in base.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    d = tmp_path_factory.mktemp("llama")
    base.save_pretrained(d, safe_serialization=True)

    hf = None
    for name, (targets, r, alpha, rslora) in ADAPTERS.items():
        cfg = peft.LoraConfig(r=r, lora_alpha=alpha, use_rslora=rslora, target_modules=targets, lora_dropout=0.0)
        if hf is None:
            hf = peft.get_peft_model(copy.deepcopy(base), cfg, adapter_name=name)
        else:
            hf.add_adapter(name, cfg)
    hf.eval()
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for layer in _hf_layers(hf).values():
            for name in ADAPTERS:
                for p in _hf_factor_params(layer, name) or ():
                    p.copy_(torch.randn(p.shape, generator=gen) * 0.3)

    ours = load_decoder(d)[0]
    for name, (targets, r, alpha, rslora) in ADAPTERS.items():
        peft_jax.nnx.attach(ours, peft_jax.LoraConfig(targets=targets, rank=r, alpha=alpha, use_rslora=rslora),
                            rngs=nnx.Rngs(0), name=name)
        peft_jax.nnx.load_adapter_state(ours, hf_state(hf, name))
    ours.eval()
    return hf, ours


def _batch():
    rng = np.random.default_rng(0)
    ids = rng.integers(3, VOCAB, size=(2, 9))
    return ids, np.ones(ids.shape, np.int64)


def _hf_logits(hf, adapter):
    ids, mask = _batch()
    hf.set_adapter(adapter)
    with torch.no_grad():
        return hf(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask)).logits.numpy()


def _our_logits(ours, adapter):
    ids, mask = (jnp.asarray(a, jnp.int32) for a in _batch())
    peft_jax.nnx.set_active(ours, adapter)
    return np.asarray(ours(ids, attention_mask=mask))


def _sign_aligned(ours_a, ours_b, hf_a, hf_b):
    """Our SVD factors with each component's sign flipped to agree with HF's."""
    sign = np.sign(np.sum(ours_a * hf_a, axis=0))
    sign[sign == 0] = 1.0
    return ours_a * sign, ours_b * sign[:, None]


# --- tests -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("case", list(CASES))
def test_matches_hf_add_weighted_adapter(models, monkeypatch, case):
    hf, ours = models
    adapters, weights, combination_type, options = CASES[case]
    new = f"w_{case.replace('-', '_')}"
    recorder = MaskRecorder()
    monkeypatch.setattr(merge_utils, "random_pruning", recorder)
    torch.manual_seed(11)
    hf.add_weighted_adapter(adapters, weights, new, combination_type=combination_type, **options)
    ref = hf_state(hf, new)
    assert ref, "HF built no adapter"

    if "dare" in combination_type:
        options = {**options, "masks": recorder.our_masks(hf, adapters, new, combination_type)}
        assert recorder.draws
    arithmetic.add_weighted_adapter(ours, adapters, weights, new, combination_type=combination_type, **options)
    got = {k: np.asarray(v) for k, v in peft_jax.nnx.adapter_state(ours, new).items()}
    assert sorted(got) == sorted(ref)

    layers = _hf_layers(hf)
    svd = combination_type.endswith("svd") and len(adapters) > 1
    for key in [k for k in ref if k.endswith("/lora_a")]:
        path = key.rsplit("/", 2)[0]
        a, b = got[key], got[key[:-1] + "b"]
        ra, rb = ref[key], ref[key[:-1] + "b"]
        assert a.shape == ra.shape and b.shape == rb.shape, (key, a.shape, ra.shape)
        assert layers[path].scaling[new] == 1.0  # r == alpha (adapters[0] is not rsLoRA)
        np.testing.assert_allclose(a @ b, ra @ rb, atol=TOL, rtol=0, err_msg=f"{case} A@B at {path}")
        if svd:
            a, b = _sign_aligned(a, b, ra, rb)
        tol = SVD_FACTOR_TOL if svd else TOL
        np.testing.assert_allclose(a, ra, atol=tol, rtol=0, err_msg=f"{case} A at {path}")
        np.testing.assert_allclose(b, rb, atol=tol, rtol=0, err_msg=f"{case} B at {path}")
        assert np.abs(ra @ rb).max() > 1e-2  # the combination is not trivially zero

    if case in RUN_LOGITS:
        want, have = _hf_logits(hf, new), _our_logits(ours, new)
        diff = float(np.abs(have - want).max())
        assert diff < LOGIT_TOL, diff
        assert np.abs(_hf_logits(hf, adapters[0]) - want).max() > 100 * LOGIT_TOL  # the new adapter matters
        peft_jax.nnx.set_active(ours, None)


def test_svd_clamp(models):
    """``svd_clamp``: clipping at a quantile of the factors' entries depends on each singular
    component's sign, which LAPACK leaves open (HF's MKL and our LAPACK differ on some layers).
    So: our clamp applied to our factors sign-aligned to HF's unclamped ones must give HF's
    clamped factors on every layer, and our end-to-end result must equal HF's wherever the two
    LAPACKs chose the same signs."""
    hf, ours = models
    adapters, weights = AB
    hf.add_weighted_adapter(adapters, weights, "clamp_off", combination_type="svd")
    hf.add_weighted_adapter(adapters, weights, "clamp_on", combination_type="svd", svd_clamp=CLAMP)
    off, on = hf_state(hf, "clamp_off"), hf_state(hf, "clamp_on")
    triples = [(s.sites, s.state, s.name) for s in (arithmetic.read_adapter(ours, n) for n in adapters)]
    _, ours_off = arithmetic.weighted_lora(triples, weights, "svd", name="clamp_off")
    _, ours_on = arithmetic.weighted_lora(triples, weights, "svd", name="clamp_on", svd_clamp=CLAMP)
    same_signs = 0
    for key in [k for k in on if k.endswith("/lora_a")]:
        path, ka, kb = key.rsplit("/", 2)[0], key, key[:-1] + "b"
        ha, hb = on[ka], on[kb]
        fa, fb = ka.replace("clamp_on", "clamp_off"), kb.replace("clamp_on", "clamp_off")
        assert np.abs(hb - off[fb]).max() > 1e-3  # the clamp clips
        oa, ob = np.asarray(ours_off[fa]), np.asarray(ours_off[fb])
        sign = np.sign(np.sum(oa * off[fa], axis=0))
        ca, cb = (np.asarray(x) for x in arithmetic.svd.clamp_factors(oa * sign, ob * sign[:, None], CLAMP))
        np.testing.assert_allclose(ca, ha, atol=SVD_FACTOR_TOL, rtol=0, err_msg=f"clamped A at {path}")
        np.testing.assert_allclose(cb, hb, atol=SVD_FACTOR_TOL, rtol=0, err_msg=f"clamped B at {path}")
        # float32 products of SVD factors: relative 1e-5 too (seen 6.8e-6 at |x|=1.55 on one CPU)
        np.testing.assert_allclose(ca @ cb, ha @ hb, atol=TOL, rtol=TOL, err_msg=f"clamped B@A at {path}")
        if np.all(sign > 0):
            same_signs += 1
            np.testing.assert_allclose(np.asarray(ours_on[ka]) @ np.asarray(ours_on[kb]), ha @ hb, atol=TOL,
                                       rtol=TOL, err_msg=f"end-to-end clamped B@A at {path}")
    assert same_signs >= 1


def test_dare_masks_matter(models, monkeypatch):
    """Negative control: our DARE with masks of another draw than HF's differs from HF's result."""
    hf, ours = models
    recorder = MaskRecorder()
    monkeypatch.setattr(merge_utils, "random_pruning", recorder)
    torch.manual_seed(5)
    hf.add_weighted_adapter(*AB, "dare_control", combination_type="dare_linear", density=DENSITY)
    masks = recorder.our_masks(hf, AB[0], "dare_control", "dare_linear")
    shuffled = {k: np.roll(m, 1, axis=0) for k, m in masks.items()}
    ref = hf_state(hf, "dare_control")
    src = [arithmetic.read_adapter(ours, n) for n in AB[0]]
    _, good = arithmetic.weighted_lora([(s.sites, s.state, s.name) for s in src], AB[1], "dare_linear",
                                    name="dare_control", density=DENSITY, masks=masks)
    _, bad = arithmetic.weighted_lora([(s.sites, s.state, s.name) for s in src], AB[1], "dare_linear",
                                   name="dare_control", density=DENSITY, masks=shuffled)
    assert max(np.abs(np.asarray(good[k]) - ref[k]).max() for k in ref) < TOL
    assert max(np.abs(np.asarray(bad[k]) - ref[k]).max() for k in ref) > 1e-2


def test_unequal_ranks_refused_like_hf(models):
    hf, ours = models
    with pytest.raises(ValueError, match="same r value"):
        hf.add_weighted_adapter(*ABC, "refused", combination_type="linear")
    with pytest.raises(errors.InvalidConfigError, match="one rank"):
        arithmetic.add_weighted_adapter(ours, *ABC, "refused", combination_type="linear")
    assert "refused" not in peft_jax.nnx.adapter_names(ours)


def test_rslora_first_adapter_scale(models):
    """HF copies adapters[0]'s use_rslora into the new config, so with an rsLoRA adapter first its
    new adapter's scale is r / sqrt(r) (not 1); the factors are the same, ours keeps scale 1."""
    hf, ours = models
    hf.add_weighted_adapter(["t2", "t1"], [0.5, 0.5], "rs_first", combination_type="cat")
    ref = hf_state(hf, "rs_first")
    arithmetic.add_weighted_adapter(ours, ["t2", "t1"], [0.5, 0.5], "rs_first", combination_type="cat")
    got = peft_jax.nnx.adapter_state(ours, "rs_first")
    assert max(np.abs(np.asarray(got[k]) - ref[k]).max() for k in ref) < TOL
    assert _hf_layers(hf)["layers/0/self_attn/q_proj"].scaling["rs_first"] == pytest.approx(8 / np.sqrt(8))
    layer = dict(peft_jax.nnx.adapted_layers(ours))["layers/0/self_attn/q_proj"]
    assert dict(layer.slots())["rs_first"].methods[0].scale == 1.0
