"""`peft-jax generate --adapter`, `export`, `import` and `merge` on a tiny random decoder saved as
an HF directory: what the commands print and write equals what the library computes, and bad
input is a typed error with exit status 2 that writes nothing."""

import jax
import numpy as np
import pytest
from flax import nnx
from test_cli_generate import model_dir  # noqa: F401 (the tiny decoder fixture)

import peft_jax
from peft_jax.cli import main
from peft_jax.io import saving
from peft_jax.models.generate_text import complete, load_generator

PROMPT = "hello world"


def _run(capsys, *argv):
    code = main([*map(str, argv)])
    out = capsys.readouterr()
    return code, out.out, out.err


def _adapted(model_dir):  # noqa: F811
    """The tiny decoder with a LoRA on q/v whose B is non-zero, so the adapter changes outputs."""
    model, tok = load_generator(model_dir)
    peft_jax.nnx.attach(model, peft_jax.LoraConfig(targets=["q_proj", "v_proj"], rank=4, alpha=8),
                        rngs=nnx.Rngs(1))
    state = peft_jax.nnx.adapter_state(model, "default")
    keys = jax.random.split(jax.random.key(2), len(state))
    peft_jax.nnx.load_adapter_state(model, {
        k: (jax.random.normal(r, v.shape, v.dtype) if k.endswith("lora_b") else v)
        for r, (k, v) in zip(keys, state.items())})
    model.eval()
    return model, tok


@pytest.fixture(scope="module")
def native(tmp_path_factory, model_dir):  # noqa: F811
    model, tok = _adapted(model_dir)
    out = saving.save_adapter(model, tmp_path_factory.mktemp("native") / "adapter", base_model=str(model_dir))
    return out, complete(model, tok, [PROMPT], max_new_tokens=8)[0]


def test_generate_with_a_native_adapter(capsys, model_dir, native):  # noqa: F811
    adapter, expected = native
    base_model, tok = load_generator(model_dir)
    base_text = complete(base_model, tok, [PROMPT], max_new_tokens=8)[0]
    assert expected != base_text  # the adapter matters here
    code, out, err = _run(capsys, "generate", "--model", model_dir, "--adapter", adapter, "--greedy",
                          "--max-new-tokens", 8, "--prompt", PROMPT)
    assert code == 0, err
    assert out.rstrip("\n") == expected


def test_export_to_peft_jax_without_model_uses_the_recorded_base(capsys, tmp_path, native):
    adapter, _ = native
    code, out, err = _run(capsys, "export", "--adapter", adapter, "--format", "peft_jax", "--out", tmp_path / "e")
    assert code == 0, err
    (_, before), (_, after) = saving.read_native(adapter), saving.read_native(tmp_path / "e")
    assert sorted(before) == sorted(after)
    assert all(np.array_equal(before[k], after[k]) for k in before)


def test_export_into_a_non_empty_directory_is_refused(capsys, tmp_path, native):
    adapter, _ = native
    (tmp_path / "e").mkdir()
    (tmp_path / "e" / "keep.txt").write_text("mine")
    code, _, err = _run(capsys, "export", "--adapter", adapter, "--format", "peft_jax", "--out", tmp_path / "e")
    assert code == 2 and "CheckpointError" in err and "--overwrite" in err
    assert sorted(p.name for p in (tmp_path / "e").iterdir()) == ["keep.txt"]
    assert (tmp_path / "e" / "keep.txt").read_text() == "mine"


def test_export_of_an_adapter_without_a_recorded_base_asks_for_model(capsys, tmp_path, model_dir):  # noqa: F811
    model, _ = _adapted(model_dir)
    adapter = saving.save_adapter(model, tmp_path / "a")  # no base_model recorded
    code, _, err = _run(capsys, "export", "--adapter", adapter, "--format", "peft_jax", "--out", tmp_path / "e")
    assert code == 2 and "InvalidConfigError" in err and "--model" in err
    assert not (tmp_path / "e").exists()


def test_commands_refuse_a_directory_without_an_adapter(capsys, tmp_path, model_dir):  # noqa: F811
    for argv in (["export", "--adapter", tmp_path, "--format", "hf-peft", "--out", tmp_path / "o"],
                 ["import", "--from", tmp_path, "--out", tmp_path / "o"],
                 ["merge", "--model", model_dir, "--adapter", tmp_path, "--out", tmp_path / "o"]):
        code, _, err = _run(capsys, *argv)
        assert code == 2 and "CheckpointError" in err and "holds no adapter" in err, argv
        assert not (tmp_path / "o").exists()


def test_export_hf_peft_import_back_and_generate(capsys, tmp_path, model_dir, native):  # noqa: F811
    adapter, expected = native
    code, _, err = _run(capsys, "export", "--adapter", adapter, "--format", "hf-peft", "--out", tmp_path / "hf")
    assert code == 0, err
    assert sorted(p.name for p in (tmp_path / "hf").iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]
    code, out, err = _run(capsys, "generate", "--model", model_dir, "--adapter", tmp_path / "hf", "--greedy",
                          "--max-new-tokens", 8, "--prompt", PROMPT)
    assert code == 0 and out.rstrip("\n") == expected, err
    code, _, err = _run(capsys, "import", "--from", tmp_path / "hf", "--model", model_dir, "--out", tmp_path / "back")
    assert code == 0, err
    (_, before), (record, after) = saving.read_native(adapter), saving.read_native(tmp_path / "back")
    assert record["base_model"]["name_or_path"] == str(model_dir)
    assert sorted(before) == sorted(after) and all(np.array_equal(before[k], after[k]) for k in before)


def test_merge_writes_a_checkpoint_that_generates_the_same(capsys, tmp_path, model_dir, native):  # noqa: F811
    adapter, expected = native
    code, _, err = _run(capsys, "merge", "--model", model_dir, "--adapter", adapter, "--out", tmp_path / "m")
    assert code == 0, err
    merged, _ = load_generator(tmp_path / "m")  # the merged weights alone, no adapter
    _, tok = load_generator(model_dir)
    assert complete(merged, tok, [PROMPT], max_new_tokens=8)[0] == expected
