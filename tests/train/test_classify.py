"""Classification loss/eval on a tiny encoder, the model split, and frozen-prefix caching."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import peft_jax
from peft_jax import errors
from peft_jax.models.encoder import EncoderConfig, EncoderForSequenceClassification
from peft_jax.train.classify import (
    FullForward,
    classification_loss,
    frozen_features,
    make_classification_eval,
)
from peft_jax.train.parts import split_model
from peft_jax.train.prefix_cache import (
    PrefixForward,
    cache_prefix,
    encode_prefix,
    frozen_depth,
    suffix_logits,
)

CFG = EncoderConfig(vocab_size=40, hidden_size=16, num_hidden_layers=3, num_attention_heads=2,
                    intermediate_size=32, max_position_embeddings=32)


def _model(targets=("query", "value")):
    model = EncoderForSequenceClassification(CFG, num_labels=3, rngs=nnx.Rngs(0))
    cfg = peft_jax.LoraConfig(targets=list(targets) if isinstance(targets, tuple) else targets,
                              rank=2, modules_to_save=["classifier"])
    peft_jax.nnx.attach(model, cfg, rngs=nnx.Rngs(1))
    # Non-zero B so the adapters change the output.
    for path, var in nnx.iter_graph(model):
        if isinstance(var, peft_jax.nnx.AdapterParam) and path[-1] == "lora_b":
            var[...] = jax.random.normal(jax.random.key(len(path)), var.shape) * 0.3
    return model


def _arrays(n=11, full=12, seed=0):
    rng = np.random.default_rng(seed)
    lengths = rng.integers(2, full + 1, size=n)
    mask = (np.arange(full)[None] < lengths[:, None]).astype(np.int32)
    ids = (rng.integers(4, 40, size=(n, full)) * mask).astype(np.int32)
    return {"input_ids": ids, "attention_mask": mask,
            "labels": rng.integers(0, 3, size=n).astype(np.int32)}


def test_eval_matches_direct_forward():
    model = _model()
    arrays = _arrays()
    parts = split_model(model)
    evaluate = make_classification_eval(parts, parts.frozen, arrays, batch_size=4, bucket=12)
    got = evaluate(parts.trainable)

    @jax.jit
    def reference(trainable, frozen, batch):
        model = parts.merge(trainable, frozen)
        return model(batch["input_ids"], batch["attention_mask"]), classification_loss(model, batch)

    logits, (loss, aux) = reference(parts.trainable, parts.frozen, arrays)
    want_acc = float(np.mean(np.asarray(logits).argmax(-1) == arrays["labels"]))
    assert got["accuracy"] == pytest.approx(want_acc)
    assert got["loss"] == pytest.approx(float(loss), rel=1e-4)
    assert float(aux["accuracy"]) == pytest.approx(want_acc)


def test_missing_field_is_a_batch_error_before_compile():
    model = _model()
    parts = split_model(model)
    step = peft_jax.make_train_step(parts.loss(classification_loss),
                                    optax.sgd(0.1), has_aux=True)
    with pytest.raises(errors.BatchError, match="labels"):
        step(parts.trainable, (), parts.frozen, {"input_ids": np.ones((2, 3), np.int32),
                                                 "attention_mask": np.ones((2, 3), np.int32)})
    with pytest.raises(errors.BatchError, match="labels"):
        make_classification_eval(parts, parts.frozen, {"input_ids": np.ones((2, 3))})


def test_split_model_keeps_strings_out_of_jit():
    parts = split_model(_model())
    leaves = jax.tree.leaves((parts.trainable, parts.frozen))
    assert all(hasattr(leaf, "shape") for leaf in leaves)


def test_prefix_cache_matches_full_model():
    model = _model(targets=r"bert/encoder/layer/(1|2)/attention/self/(query|value)")
    parts = split_model(model)
    paths = [p for p, _ in peft_jax.core.tree_items(parts.trainable)]
    assert frozen_depth(model, paths) == 1
    arrays = _arrays()
    hidden = cache_prefix(model, arrays, depth=1, batch_size=16)

    @jax.jit
    def reference(trainable, frozen, ids, mask, hidden):
        model = parts.merge(trainable, frozen)
        return (model(ids, mask), suffix_logits(model, hidden, mask, 1),
                encode_prefix(model, ids, mask, 1))

    full, suffix, direct = reference(parts.trainable, parts.frozen, arrays["input_ids"],
                                     arrays["attention_mask"], hidden)
    np.testing.assert_allclose(np.asarray(suffix), np.asarray(full), atol=2e-5)
    np.testing.assert_allclose(hidden, np.asarray(direct) * arrays["attention_mask"][..., None],
                               atol=2e-5)
    mask = jnp.asarray(arrays["attention_mask"])
    # The prefix path gives the same evaluation and the same frozen features as the full path.
    cached = {"hidden": hidden, "attention_mask": arrays["attention_mask"],
              "labels": arrays["labels"]}
    kw = dict(batch_size=16, bucket=12)
    full_eval = make_classification_eval(parts, parts.frozen, arrays, **kw)(parts.trainable)
    prefix_eval = make_classification_eval(parts, parts.frozen, cached, forward=PrefixForward(1),
                                           **kw)(parts.trainable)
    assert prefix_eval["accuracy"] == full_eval["accuracy"]
    assert prefix_eval["loss"] == pytest.approx(full_eval["loss"], rel=1e-5)
    np.testing.assert_allclose(frozen_features(model, cached, forward=PrefixForward(1), **kw),
                               frozen_features(model, arrays, forward=FullForward(), **kw),
                               atol=2e-5)
    with pytest.raises(errors.InvalidConfigError):
        encode_prefix(model, jnp.asarray(arrays["input_ids"]), mask, 7)


def test_frozen_features_ignore_adapters():
    model = _model()
    arrays = _arrays()
    feats = frozen_features(model, arrays, batch_size=16, bucket=12)
    with peft_jax.nnx.disabled(model):
        parts = split_model(model)

    @jax.jit
    def base(frozen, trainable, ids, mask):
        m = parts.merge(trainable, frozen)
        return m.backbone(ids, mask).last_hidden_state

    h = np.asarray(base(parts.frozen, parts.trainable, arrays["input_ids"],
                        arrays["attention_mask"]))
    m = arrays["attention_mask"][..., None]
    np.testing.assert_allclose(feats, (h * m).sum(1) / m.sum(1), atol=2e-5)
    with pytest.raises(errors.BatchError, match="hidden"):
        frozen_features(model, arrays, forward=PrefixForward(1))


def test_frozen_depth_with_all_layers_and_embeddings():
    model = _model()
    assert frozen_depth(model, ["bert/encoder/layer/0/attention/self/query/x"]) == 0
    assert frozen_depth(model, ["classifier/trained/default/kernel"]) == 3
    assert frozen_depth(model, ["bert/embeddings/word_embeddings/default/lora_a"]) == 0
    # prompt tuning trains the input tap: every layer sees its tokens, nothing can be cached
    assert frozen_depth(model, ["bert/input_tap/default/prompt_embeddings",
                                "classifier/default/kernel"]) == 0
