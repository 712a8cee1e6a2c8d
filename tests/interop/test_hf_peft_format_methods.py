"""HF PEFT files for IA3, VeRA, LoHa, LoKr, OFT, LN tuning, BEFT and trainable tokens against the real
``peft`` (torch CPU), tiny random Llama and BERT (the bases, configs and helpers of ``test_hf_peft_methods``).

(a) an adapter made by HF PEFT (params randomised, ``save_pretrained``) loads here with
`load_hf_peft` and gives HF's logits (1e-4 fp32); (b) that adapter saved again with
`save_hf_peft` loads in ``PeftModel.from_pretrained`` and gives the same logits; (c) loading our
export back returns the state bitwise. Negative control: the adapter moves HF's logits.
"""

import copy

import numpy as np
import pytest

torch = pytest.importorskip("torch")
peft = pytest.importorskip("peft")

import test_hf_peft_methods as ref  # noqa: E402  (bases fixture, configs, batch, logits helpers)

import peft_jax  # noqa: E402
from peft_jax.io import hf_peft  # noqa: E402

bases = ref.bases
pytestmark = ref.pytestmark
PARAMS = [("ia3", "llama"), ("ia3", "bert"), ("loha", "llama"), ("lokr", "llama"), ("lokr_lowrank", "llama"),
          ("oft", "llama"), ("oft", "bert"), ("ln_tuning", "llama"), ("ln_tuning", "bert"), ("beft", "llama"),
          ("beft", "bert"), ("trainable_tokens", "llama"), ("trainable_tokens", "bert"), ("vera", "llama"),
          ("vera", "bert")]


@pytest.mark.parametrize("case,arch", PARAMS)
def test_both_ways(bases, tmp_path, case, arch):
    hf_base, d = bases[arch]
    hf_config, _, _ = ref._cases()[case][arch]
    made = peft.get_peft_model(copy.deepcopy(hf_base), hf_config())
    ref._randomise(made, 11)
    made.eval().save_pretrained(tmp_path / "hf")
    batch = ref._batch(arch)
    want = ref._real(arch, ref._hf_logits(arch, made, batch), batch)
    assert np.abs(want - ref._real(arch, ref._hf_logits(arch, hf_base, batch), batch)).max() > 1e-2

    ours = hf_peft.load_hf_peft(ref._load_ours(arch, d), tmp_path / "hf")  # (a)
    got = ref._real(arch, ref._our_logits(arch, ours, batch), batch)
    assert float(np.abs(got - want).max()) < ref.TOL

    out = hf_peft.save_hf_peft(ours, tmp_path / "ours")  # (b)
    back = peft.PeftModel.from_pretrained(copy.deepcopy(hf_base), out).eval()
    assert float(np.abs(ref._real(arch, ref._hf_logits(arch, back, batch), batch) - got).max()) < ref.TOL

    again = hf_peft.load_hf_peft(ref._load_ours(arch, d), out)  # (c)
    before, after = peft_jax.nnx.adapter_state(ours, "default"), peft_jax.nnx.adapter_state(again, "default")
    assert sorted(before) == sorted(after)
    assert all(np.array_equal(np.asarray(before[k]), np.asarray(after[k])) for k in before)
