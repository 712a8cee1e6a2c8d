"""Parity of AdaLoRA (`peft_jax.AdaLora` + `allocate_ranks`) with HF PEFT's AdaLoRA (torch CPU).

A tiny random Llama is wrapped with ``peft.get_peft_model(AdaLoraConfig(...))`` and our reference
decoder, loaded from the same checkpoint, gets `AdaLora` on the same layers; HF's factors (with
``lora_E`` moved off its zero init, so ``A`` and ``B`` get gradients and importance from the
first step) are copied into ours. Both then train through the whole budget schedule on the same
gradient sequence: each step HF computes its loss (with its orthogonality penalty) and gradients,
steps ``torch.optim.SGD`` and calls ``update_and_allocate(t)``; our allocator gets *those*
gradients (in our layout) through ``allocate_ranks(optax.sgd(lr), method)``. Our own JAX loss and
gradients at the same params are checked against torch's on the way, so the sequence is also the
one our model would produce.

Schedule: ``total_step=24, tinit=3, tfinal=5, deltaT=2`` over 4 layers (``init_r=6 -> target_r=3``,
budget 24 -> 12): warm-up at ``t <= 3``; cubic pruning with a mask at even ``t`` in 4..18 and none
at odd ``t`` (masked ``E`` entries move again); the forced final mask at ``t = 19`` (odd, so only
``force_mask`` masks) with the EMAs reset; the frozen phase at 20..23 (the rank pattern applied
every step). Per step: params, the zeros of ``E``, sensitivity / uncertainty (HF's
``rankallocator.exp_avg_ipt`` / ``exp_avg_unc``; after the reset HF's dicts are empty and ours
are zeros), the budget (HF's ``budget_schedule(t)[0]``), the rank pattern (``peft_config
.rank_pattern`` once set), the loss and the orthogonal regularizer. After the run
`peft_jax.nnx.fold` turns AdaLoRA into plain LoRA with HF's kept ranks and HF's delta weights,
with identical logits, also after `merge`.

HF quirk met on the way: the orthogonality penalty lives in ``AdaLoraModel.forward``, which only
runs with a ``task_type`` (here ``CAUSAL_LM``); a ``PeftModel`` built with ``task_type=None``
calls the base model directly and trains without it.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np
import pytest
from flax import nnx

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import optax  # noqa: E402
from peft.tuners.adalora import SVDLinear  # noqa: E402
from safetensors.numpy import load_file  # noqa: E402

import peft_jax  # noqa: E402
from peft_jax.models.decoder_load import load_decoder  # noqa: E402
from peft_jax.train.losses import causal_lm_loss  # noqa: E402
from peft_jax.train.rank_allocation import (  # noqa: E402
    allocate_ranks,
    budget_schedule,
    current_budget,
    factor_groups,
    rank_pattern,
)

pytestmark = [
    pytest.mark.interop,
    # peft 0.21 reads transformers 5's deprecated alias; not ours to fix.
    pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing` is deprecated:FutureWarning"),
]

VOCAB = 64
LLAMA = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
             num_attention_heads=4, num_key_value_heads=2, head_dim=8, max_position_embeddings=64,
             pad_token_id=0, bos_token_id=1, eos_token_id=2, tie_word_embeddings=False)
TARGETS = ["q_proj", "v_proj"]
INIT_R, TARGET_R, ALPHA = 6, 3, 8.0
TOTAL, TINIT, TFINAL, DELTA_T = 24, 3, 5, 2
LAST_FREE = TOTAL - TFINAL  # 19: the forced final mask and EMA reset
N_LAYERS = 4
LR = 0.5
TOL = 1e-5
LOGITS_TOL = 1e-4
HF_CONFIG = dict(init_r=INIT_R, target_r=TARGET_R, lora_alpha=ALPHA, lora_dropout=0.0,
                 target_modules=TARGETS, total_step=TOTAL, tinit=TINIT, tfinal=TFINAL,
                 deltaT=DELTA_T, beta1=0.85, beta2=0.85, orth_reg_weight=0.5,
                 task_type="CAUSAL_LM")  # AdaLoraModel.forward (the penalty) runs only with a task
METHOD = peft_jax.AdaLora(init_r=INIT_R, target_r=TARGET_R, alpha=ALPHA, total_step=TOTAL,
                          tinit=TINIT, tfinal=TFINAL, delta_t=DELTA_T, beta1=0.85, beta2=0.85,
                          orth_reg_weight=0.5)
# our param name -> (HF param name, HF tensor -> our layout)
FACTORS = {"lora_a": ("lora_A", lambda x: x.T), "lora_e": ("lora_E", lambda x: x.reshape(-1)),
           "lora_b": ("lora_B", lambda x: x.T)}


# --- where things live on each side ---------------------------------------------------------------
def _hf_name(path: str, factor: str) -> str:
    """Our module path -> the name HF's allocator and rank_pattern use (LlamaForCausalLM's)."""
    return f"model.{path.replace('/', '.')}.{factor}.default"


def _group_key(path: str) -> str:
    """Our module path -> the layer key of `factor_groups` (and of `rank_pattern`)."""
    parts = [int(p) if p.isdigit() else p for p in (*path.split("/"), "default")]
    return jax.tree_util.keystr(tuple(jax.tree_util.DictKey(p) for p in parts))


def _at(tree: dict, path: str) -> dict:
    for p in path.split("/"):
        tree = tree[int(p) if p.isdigit() else p]
    return tree["default"]


def _hf_factors(layer, grad: bool = False) -> dict[str, np.ndarray]:
    out = {}
    for ours, (theirs, layout) in FACTORS.items():
        p = getattr(layer, theirs)["default"]
        out[ours] = np.array(layout((p.grad if grad else p).detach().numpy()))
    return out


def _rel(got, want) -> float:
    """Max abs difference relative to the reference's scale (abs when the reference is 0)."""
    got, want = np.asarray(got), np.asarray(want)
    return float(np.abs(got - want).max() / max(np.abs(want).max(), 1e-30 if want.any() else 1.0))


def _hf_logits(model, ids) -> np.ndarray:
    with torch.no_grad():
        return model(input_ids=torch.tensor(ids)).logits.numpy()


_forward = nnx.jit(lambda m, i: m(i))


def _our_logits(model, ids) -> np.ndarray:
    return np.asarray(_forward(model, jnp.asarray(ids, jnp.int32)))


# --- one run of the whole schedule on both sides --------------------------------------------------
@dataclasses.dataclass
class Run:
    hf: Any  # PeftModelForCausalLM
    ours: nnx.Module
    layers: dict[str, Any]  # our module path -> HF SVDLinear
    steps: list[dict]
    start_logits: tuple[np.ndarray, np.ndarray]  # (HF, ours) before training
    eval_ids: np.ndarray


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a tiny model: thread start-up costs more than it saves
    try:
        yield _run(tmp_path_factory)
    finally:
        torch.set_num_threads(threads)


def _run(tmp_path_factory) -> Run:
    torch.manual_seed(0)
    base = transformers.LlamaForCausalLM(transformers.LlamaConfig(**LLAMA))
    with torch.no_grad():
        for p in base.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    d = tmp_path_factory.mktemp("llama")
    base.save_pretrained(d, safe_serialization=True)
    ours, _ = load_decoder(d)

    torch.manual_seed(1)
    hf = peft.get_peft_model(base, peft.AdaLoraConfig(**HF_CONFIG))
    layers = {n.removeprefix("base_model.model.model.").replace(".", "/"): m
              for n, m in hf.named_modules() if isinstance(m, SVDLinear)}
    assert len(layers) == N_LAYERS
    gen = torch.Generator().manual_seed(2)
    with torch.no_grad():  # E off its zero init: A and B matter (and get gradients) from step 0
        for m in layers.values():
            m.lora_E["default"].copy_(torch.randn((INIT_R, 1), generator=gen) * 0.5)

    peft_jax.nnx.attach(ours, peft_jax.place(TARGETS, METHOD), rngs=nnx.Rngs(0))
    graphdef, trainable, frozen = peft_jax.nnx.split(ours)
    params = nnx.to_pure_dict(trainable)
    for path, m in layers.items():
        for k, v in _hf_factors(m).items():
            assert _at(params, path)[k].shape == v.shape, (path, k)
            _at(params, path)[k] = jnp.asarray(v)
    groups = factor_groups(params)
    assert set(groups) == {_group_key(p) for p in layers}
    # AllocatorState's EMA lists follow factor_groups: layer by layer, factor by factor.
    slot = {(layer, name): i for i, (layer, name) in
            enumerate((layer, name) for layer, g in groups.items() for name in g)}

    nnx.replace_by_pure_dict(trainable, params)
    nnx.update(ours, trainable)
    rng = np.random.default_rng(0)
    eval_ids = rng.integers(3, VOCAB, size=(2, 8))
    start_logits = (_hf_logits(hf, eval_ids), _our_logits(ours, eval_ids))

    loss = peft_jax.nnx.make_loss(graphdef, lambda m, b: causal_lm_loss(m(b["ids"]), b["ids"]))
    value_and_grad = jax.jit(jax.value_and_grad(loss))
    penalty = jax.jit(lambda tr, fr: peft_jax.nnx.regularizer(nnx.merge(graphdef, tr, fr)))
    tx = allocate_ranks(optax.sgd(LR), METHOD)
    opt_state = tx.init(params)
    update = jax.jit(tx.update)
    opt = torch.optim.SGD([p for p in hf.parameters() if p.requires_grad], lr=LR)
    allocator = hf.base_model.rankallocator
    hf_config = hf.peft_config["default"]
    hf.train()

    steps = []
    for t in range(TOTAL):
        ids = rng.integers(3, VOCAB, size=(2, 8))
        tids = torch.tensor(ids)
        out = hf(input_ids=tids, labels=tids)
        with torch.no_grad():  # the LlamaForCausalLM loss alone: HF's penalty is the difference
            plain = hf.base_model.model(input_ids=tids, labels=tids).loss.item()
        out.loss.backward()

        nnx.replace_by_pure_dict(trainable, params)
        our_loss, our_grads = value_and_grad(trainable, frozen, {"ids": jnp.asarray(ids, jnp.int32)})
        our_grads = nnx.to_pure_dict(our_grads)
        record = dict(t=t, loss=(out.loss.item(), float(our_loss)),
                      reg=(out.loss.item() - plain, float(penalty(trainable, frozen))),
                      grad_rel=0.0, param=0.0, sens_rel=0.0, unc_rel=0.0, e_zeros_same=True)
        grads = jax.tree.map(jnp.zeros_like, params)
        hf_grads = {path: _hf_factors(m, grad=True) for path, m in layers.items()}
        scale = max(np.abs(g).max() for h in hf_grads.values() for g in h.values())
        for path, h in hf_grads.items():
            for k, v in h.items():
                _at(grads, path)[k] = jnp.asarray(v)
                record["grad_rel"] = max(record["grad_rel"],
                                         float(np.abs(np.asarray(_at(our_grads, path)[k]) - v).max()) / scale)

        opt.step()
        hf.base_model.update_and_allocate(t)
        opt.zero_grad()
        updates, opt_state = update(grads, opt_state, params)
        params = optax.apply_updates(params, updates)

        sens_hf = {n: v.numpy() for n, v in allocator.exp_avg_ipt.items()}
        unc_hf = {n: v.numpy() for n, v in allocator.exp_avg_unc.items()}
        record["hf_ema_empty"] = not sens_hf and not unc_hf
        s_scale = max((np.abs(v).max() for v in sens_hf.values()), default=1.0)
        u_scale = max((np.abs(v).max() for v in unc_hf.values()), default=1.0)
        record["hf_e"], record["our_e"] = {}, {}
        for path, m in layers.items():
            h = _hf_factors(m)
            for k, v in h.items():
                record["param"] = max(record["param"], float(np.abs(np.asarray(_at(params, path)[k]) - v).max()))
                i = slot[(_group_key(path), k)]
                name, layout = _hf_name(path, FACTORS[k][0]), FACTORS[k][1]
                s_ref = layout(sens_hf[name]) if sens_hf else np.zeros(v.shape, np.float32)
                u_ref = layout(unc_hf[name]) if unc_hf else np.zeros(v.shape, np.float32)
                record["sens_rel"] = max(record["sens_rel"],
                                         float(np.abs(np.asarray(opt_state.sensitivity[i]) - s_ref).max()) / s_scale)
                record["unc_rel"] = max(record["unc_rel"],
                                        float(np.abs(np.asarray(opt_state.uncertainty[i]) - u_ref).max()) / u_scale)
            ours_e = np.asarray(_at(params, path)["lora_e"])
            record["hf_e"][path], record["our_e"][path] = h["lora_e"], ours_e
            record["e_zeros_same"] &= bool(np.array_equal(ours_e == 0, h["lora_e"] == 0))
        record["budget"] = (allocator.budget_schedule(t)[0], int(current_budget(opt_state)))
        hf_pattern = hf_config.rank_pattern
        record["hf_pattern"] = None if hf_pattern is None else {
            path: list(hf_pattern[_hf_name(path, "lora_E")]) for path in layers}
        ours_pattern = rank_pattern(opt_state)
        record["our_pattern"] = {path: ours_pattern[_group_key(path)] for path in layers}
        steps.append(record)

    nnx.replace_by_pure_dict(trainable, params)
    nnx.update(ours, trainable)
    hf.eval()
    ours.eval()
    return Run(hf, ours, layers, steps, start_logits, eval_ids)


# --- the tests ------------------------------------------------------------------------------------
def test_start_logits_and_regularizer_match(run):
    hf_logits, our_logits = run.start_logits
    assert np.abs(our_logits - hf_logits).max() < LOGITS_TOL
    with peft_jax.nnx.disabled(run.ours):  # the adapter (random E) matters
        base = _our_logits(run.ours, run.eval_ids)
    assert np.abs(base - our_logits).max() > 100 * LOGITS_TOL
    for s in run.steps:
        hf_reg, our_reg = s["reg"]
        assert hf_reg > 0.1 and abs(hf_reg - our_reg) < TOL, (s["t"], hf_reg, our_reg)
        assert abs(s["loss"][0] - s["loss"][1]) < TOL, (s["t"], s["loss"])


def test_our_gradients_are_torchs(run):
    """The gradient sequence both sides get is also the one our own loss (penalty included)
    gives at the same params."""
    worst = max(s["grad_rel"] for s in run.steps)
    assert worst < 1e-4, [(s["t"], s["grad_rel"]) for s in run.steps]


def test_params_and_masks_match_every_step(run):
    for s in run.steps:
        assert s["param"] < TOL, (s["t"], s["param"])
        assert s["e_zeros_same"], (s["t"], s["hf_e"], s["our_e"])


def test_importance_scores_match_every_step(run):
    for s in run.steps:
        assert s["sens_rel"] < TOL and s["unc_rel"] < TOL, (s["t"], s["sens_rel"], s["unc_rel"])
    # after the forced mask HF drops its EMAs and ours are zeros (compared with zeros above)
    assert [s["hf_ema_empty"] for s in run.steps] == [s["t"] >= LAST_FREE for s in run.steps]


def test_budget_and_rank_pattern_match_every_step(run):
    for s in run.steps:
        hf_budget, our_budget = s["budget"]
        assert hf_budget == our_budget == budget_schedule(METHOD, N_LAYERS, s["t"])[0], (s["t"], s["budget"])
        if s["hf_pattern"] is None:
            assert s["t"] <= TINIT
            assert all(all(v) for v in s["our_pattern"].values())
        else:
            assert s["our_pattern"] == s["hf_pattern"], s["t"]


def test_the_whole_schedule_is_exercised(run):
    """What each phase does, seen on HF's side (ours equals it by the tests above)."""
    budgets = [s["budget"][0] for s in run.steps]
    assert budgets[:TINIT + 1] == [N_LAYERS * INIT_R] * (TINIT + 1)
    assert budgets[LAST_FREE:] == [N_LAYERS * TARGET_R] * (TOTAL - LAST_FREE)
    assert len(set(budgets[TINIT + 1:LAST_FREE])) > 3  # the cubic decay
    for s in run.steps:
        t = s["t"]
        zeros = sum(int((e == 0).sum()) for e in s["hf_e"].values())
        kept = {p: np.array(v) for p, v in (s["hf_pattern"] or {}).items()}
        if t <= TINIT:
            assert zeros == 0, t
        elif t < LAST_FREE and t % DELTA_T == 0 or t >= LAST_FREE:
            # a mask (prune step, the forced one at t = 19, every frozen step): exactly the budget
            assert zeros == N_LAYERS * INIT_R - s["budget"][0], t
            assert all(np.array_equal(s["hf_e"][p] != 0, kept[p]) for p in kept), t
        else:
            # no mask between prune steps: SGD moved the pruned E entries off zero again
            assert zeros == 0 and sum(int((~k).sum()) for k in kept.values()) > 0, t
    frozen = [s["hf_pattern"] for s in run.steps[LAST_FREE:]]
    assert all(p == frozen[0] for p in frozen)
    final = frozen[0]
    assert sum(sum(v) for v in final.values()) == N_LAYERS * TARGET_R
    assert len({sum(v) for v in final.values()}) > 1  # ranks moved between layers


# HF warns (about DeepSpeed / FSDP shards) when a layer kept no rank and saves as (0, n)
@pytest.mark.filterwarnings("ignore:Adapter 'default'.*invalid shape:UserWarning")
def test_fold_to_lora_then_merge_keeps_logits(run, tmp_path):
    ids = run.eval_ids
    hf_logits, before = _hf_logits(run.hf, ids), _our_logits(run.ours, ids)
    assert np.abs(before - hf_logits).max() < LOGITS_TOL
    pattern = run.steps[-1]["hf_pattern"]
    folded = peft_jax.nnx.fold(nnx.clone(run.ours))
    layers = dict(peft_jax.nnx.adapted_layers(folded))
    assert set(layers) == set(run.layers)
    for path, layer in layers.items():
        # a layer that kept no rank becomes a rank-1 LoRA of zeros (LoRA has no rank 0)
        rank = max(sum(pattern[path]), 1)
        slot = layer.default
        assert slot.methods == (peft_jax.Lora(rank=rank, alpha=float(rank)),), path
        a, b = np.asarray(slot.lora_a[...]), np.asarray(slot.lora_b[...])
        assert a.shape[-1] == b.shape[0] == rank
        if not any(pattern[path]):
            assert not a.any() and not b.any(), path
        delta = run.layers[path].get_delta_weight("default").detach().numpy().T
        np.testing.assert_allclose(a @ b, delta, atol=1e-6, rtol=0, err_msg=path)
    after = _our_logits(folded, ids)
    assert np.abs(after - before).max() < TOL
    peft_jax.nnx.merge(folded)
    assert np.abs(_our_logits(folded, ids) - before).max() < TOL

    # HF's saved adapter is sliced to the same ranks (save_pretrained rewrites the config's
    # rank_pattern keys, so this comes last).
    run.hf.save_pretrained(tmp_path)
    saved = load_file(str(tmp_path / "adapter_model.safetensors"))
    for path in run.layers:
        key = f"base_model.model.model.{path.replace('/', '.')}.lora_E"
        assert saved[key].shape == (sum(pattern[path]), 1), path
