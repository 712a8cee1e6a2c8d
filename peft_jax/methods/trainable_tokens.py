"""Trainable tokens: train only some rows of an embedding table (HF PEFT's ``TRAINABLE_TOKENS``).

For new or special tokens (a chat template's markers, a resized vocabulary) only a few rows of the
table need training. ``trainable_tokens_delta: (n, features)`` holds *replacement* rows, not an
additive delta (despite HF's name): it starts as a copy of ``W[indices]``, so the model starts as
the base, and the layer returns ``W'[ids]`` where ``W'`` is ``W`` with rows ``indices`` replaced::

    y = call(ids);  y[ids == indices[k]] = delta[k]

(HF replaces rather than adds so that a table resized with random new rows stays well defined.)
A tied output head sees the same table: `TrainableTokens.attend` returns ``query @ W'.T``, i.e.
``out`` with columns ``indices`` replaced by ``query @ delta.T``.

Cost: ``n * features`` parameters; the lookup is one gather from a constant ``(vocab,)`` slot map
plus a select, with no ``(vocab, features)`` copy. The rows replace whatever the layer returned
(base plus earlier methods) at those ids. Merging writes the rows into the table and records the
originals, which `unmerge` writes back exactly.

Example:
    >>> import jax, jax.numpy as jnp
    >>> from peft_jax.ops import EmbedOp
    >>> from peft_jax.methods.base import Context, LinearSite
    >>> site = LinearSite(path="embed", op=EmbedOp(in_shape=(5,), out_shape=(2,)), layer="Embed",
    ...                   has_bias=False)
    >>> table = jnp.arange(10.0).reshape(5, 2)
    >>> tokens = TrainableTokens(indices=(3,))
    >>> params, _ = tokens.init(jax.random.key(0), site, {"kernel": table}, {})
    >>> params["trainable_tokens_delta"].tolist()  # a copy of row 3
    [[6.0, 7.0]]
    >>> params = {"trainable_tokens_delta": jnp.zeros((1, 2))}
    >>> ids = jnp.array([[1, 3]])
    >>> tokens.apply(params, {}, site, lambda i: table[i], ids, {"kernel": table}, Context()).tolist()
    [[[2.0, 3.0], [0.0, 0.0]]]
"""

from __future__ import annotations

import dataclasses
import numbers
from typing import ClassVar

import jax.numpy as jnp
import numpy as np

from peft_jax import errors
from peft_jax.methods.base import LinearSite, Mergeable, Method, Params
from peft_jax.ops import EmbedOp


@dataclasses.dataclass(frozen=True, kw_only=True)
class TrainableTokens(Method, Mergeable):
    """Trainable rows ``indices`` of an embedding table.

    Args:
        indices: the token ids whose rows train (distinct, each in ``[0, vocab)``).
    """

    name: ClassVar[str] = "trainable_tokens"
    indices: tuple[int, ...]

    def __post_init__(self) -> None:
        indices = self.indices
        if isinstance(indices, (str, bytes)) or not isinstance(indices, (tuple, list, range)):
            raise errors.InvalidConfigError(
                f"indices must be a tuple of token ids, got {indices!r}")
        if not indices:
            raise errors.InvalidConfigError("indices is empty; name at least one token id to train")
        bad = [i for i in indices if isinstance(i, bool) or not isinstance(i, numbers.Integral) or i < 0]
        if bad:
            raise errors.InvalidConfigError(
                f"indices must be non-negative integer token ids, got {bad[:5]!r}")
        indices = tuple(int(i) for i in indices)
        seen: set[int] = set()
        dup = sorted({i for i in indices if i in seen or seen.add(i)})
        if dup:
            raise errors.InvalidConfigError(
                f"indices lists token ids {dup[:5]} more than once; each row can be trained only once")
        object.__setattr__(self, "indices", indices)

    def check(self, site) -> None:
        super().check(site)
        if not isinstance(site.op, EmbedOp):
            raise errors.UnsupportedLayerError(
                f"TrainableTokens cannot be attached to {site.path!r} ({site.layer}): it trains rows "
                "of an embedding table and needs an Embed layer; narrow its targets to the embedding")
        vocab = site.op.in_shape[0]
        out_of_range = [i for i in self.indices if i >= vocab]
        if out_of_range:
            raise errors.InvalidConfigError(
                f"TrainableTokens on {site.path!r}: token ids {out_of_range[:5]} are out of range for "
                f"its vocabulary of {vocab} rows (valid ids are 0..{vocab - 1})")

    # -- state ------------------------------------------------------------------------------------
    def param_shapes(self, site: LinearSite) -> Params:
        return {"trainable_tokens_delta": (len(self.indices), site.op.fan_out)}

    def _rows(self) -> np.ndarray:
        return np.asarray(self.indices, np.int32)

    def init(self, key, site: LinearSite, base: Params, shared: Params):
        table = site.op.kernel_to_matrix(base["kernel"])
        return {"trainable_tokens_delta": jnp.take(table, self._rows(), axis=0)}, {}

    # -- running ----------------------------------------------------------------------------------
    def apply(self, params, shared, site: LinearSite, call, x, base, ctx):
        out = call(x)
        n = len(self.indices)
        slot = np.full(site.op.in_shape[0], n, np.int32)
        slot[self._rows()] = np.arange(n, dtype=np.int32)
        s = jnp.take(jnp.asarray(slot), x, mode="fill", fill_value=n)  # n: not a trainable id
        hit = (s < n).reshape(*s.shape, *(1,) * (out.ndim - s.ndim))
        delta = params["trainable_tokens_delta"].astype(out.dtype)
        rows = jnp.take(delta, jnp.minimum(s, n - 1), axis=0).reshape(out.shape)
        return jnp.where(hit, rows, out)

    def attend(self, params, shared, site: LinearSite, query, out, base):
        delta = params["trainable_tokens_delta"].astype(query.dtype)
        return out.at[..., self._rows()].set((query @ delta.T).astype(out.dtype))

    # -- merging ----------------------------------------------------------------------------------
    def merge(self, params, shared, site: LinearSite, base):
        kernel = base["kernel"]
        rows = self._rows()
        record = jnp.take(kernel, rows, axis=0)
        delta = params["trainable_tokens_delta"].astype(kernel.dtype).reshape(record.shape)
        return {"kernel": kernel.at[rows].set(delta)}, record

    def unmerge(self, params, shared, site: LinearSite, base, record):
        if record is None:
            raise errors.StateError(
                "TrainableTokens.unmerge needs the original rows that merge recorded; got None")
        kernel = base["kernel"]
        return {"kernel": kernel.at[self._rows()].set(record.astype(kernel.dtype))}
