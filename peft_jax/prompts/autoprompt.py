"""AutoPrompt (Shin et al., 2020, "AutoPrompt: Eliciting Knowledge from Language Models with
Automatically Generated Prompts", arXiv:2010.15980): a gradient-guided search for ``N`` real
tokens that, put before the inputs, lower a frozen model's loss.

The search runs at the model's input tap, the site prompt tuning uses: the current tokens are a
`PromptTuning` prompt initialized from their word-embedding rows (``prompt_init="text"``), so any
model that takes prompt tuning takes AutoPrompt. Each step (HotFlip, first order):

1. ``g = d loss / d P`` on a batch, for the prompt rows ``P`` only (the model's weights are
   frozen state: never differentiated);
2. at one position ``i`` (drawn by the seed) the ``k`` candidate tokens with the largest
   ``-(g_i . E_v)`` over the allowed vocabulary (``E``: the word-embedding table);
3. each candidate replaces token ``i`` and the batch loss is computed exactly, by one jitted
   forward that takes the prompt as an argument (one compile for the whole search);
4. the best candidate is kept if it lowers the loss.

Unlike the paper's templates, the tokens always go first (the input tap prepends); put any fixed
text (``"... Overall it was"``) in the inputs. The found ids start prompt tuning from
`AutoPromptResult.prompt_tuning`, and prepending them as real token ids computes the same thing
(on models that do not scale their embeddings; Gemma multiplies real tokens' rows by
``sqrt(d)`` but not virtual tokens').

Example: a bag-of-embeddings scorer, whose best two tokens are known.
    >>> import jax.numpy as jnp, numpy as np
    >>> from flax import nnx
    >>> import peft_jax
    >>> from peft_jax.hooks import WithInputTap
    >>> class Bag(nnx.Module):
    ...     def __init__(self, rngs):
    ...         self.embed, self.out = nnx.Embed(12, 4, rngs=rngs), nnx.Linear(4, 1, rngs=rngs)
    ...     def __call__(self, *, inputs_embeds, attention_mask):
    ...         return self.out(inputs_embeds.mean(axis=1))[:, 0]
    >>> model = WithInputTap(Bag(nnx.Rngs(0)), embed_path="embed", features=4, vocab_size=12)
    >>> data = {"input_ids": np.array([[1, 2], [3, 4], [5, 6]])}
    >>> loss = lambda m, batch: m(batch["input_ids"]).mean()  # tokens that lower the score
    >>> config = AutoPromptConfig(num_tokens=2, candidates_per_step=3, steps=6, batch_size=3)
    >>> found = search(model, loss, data, config)
    >>> best = int(jnp.argmin(model.model.out(model.model.embed.embedding[...])))
    >>> found.token_ids == (best, best), len(found.history)
    (True, 6)
    >>> _ = peft_jax.nnx.attach(model, found.prompt_tuning(), rngs=nnx.Rngs(1))
    >>> bool(jnp.allclose(model(data["input_ids"]).mean(), found.history[-1]))
    True
"""

from __future__ import annotations

import dataclasses
import functools
import numbers
from typing import Any, Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from peft_jax import errors
from peft_jax import nnx as peft_nnx
from peft_jax.methods.config import Placement
from peft_jax.methods.recipes import prompt_tuning

__all__ = ["AutoPromptConfig", "AutoPromptResult", "search"]

_NAME = "autoprompt"


def _positive(value: Any, name: str, hint: str) -> None:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value <= 0:
        raise errors.InvalidConfigError(f"AutoPromptConfig.{name} must be a positive integer, got {value!r}; {hint}")


def _ids(value: Any, name: str) -> tuple[int, ...]:
    if isinstance(value, (str, bytes)) or not isinstance(value, (tuple, list, range, np.ndarray)):
        raise errors.InvalidConfigError(f"{name} must be a sequence of token ids, got {value!r}")
    bad = [i for i in value if isinstance(i, bool) or not isinstance(i, numbers.Integral) or i < 0]
    if bad:
        raise errors.InvalidConfigError(f"{name} must be non-negative integer token ids, got {bad[:5]!r}")
    return tuple(int(i) for i in value)


@dataclasses.dataclass(frozen=True, kw_only=True)
class AutoPromptConfig:
    """What to search for and how long.

    Args:
        num_tokens: ``N``, the trigger tokens put before the inputs.
        candidates_per_step: ``k``, the HotFlip candidates evaluated each step (at most the size of
            the allowed vocabulary).
        steps: flips tried; each costs one gradient and ``k`` forwards on a batch.
        batch_size: examples per step, drawn (without replacement) from the data by ``seed``.
        candidate_ids: the allowed vocabulary; ``None``: every id of the model's vocabulary.
        exclude_ids: ids never proposed (special tokens, label words).
        seed: draws the batches, the flipped positions and, without ``init_ids``, the start.

    Example:
        >>> AutoPromptConfig(num_tokens=0)
        Traceback (most recent call last):
        ...
        peft_jax.errors.InvalidConfigError: AutoPromptConfig.num_tokens must be a positive integer, got 0; pass the trigger length, e.g. num_tokens=5
    """  # noqa: E501

    num_tokens: int
    candidates_per_step: int = 10
    steps: int = 50
    batch_size: int = 8
    candidate_ids: tuple[int, ...] | None = None
    exclude_ids: tuple[int, ...] = ()
    seed: int = 0

    def __post_init__(self) -> None:
        _positive(self.num_tokens, "num_tokens", "pass the trigger length, e.g. num_tokens=5")
        _positive(self.candidates_per_step, "candidates_per_step", "e.g. candidates_per_step=10")
        _positive(self.steps, "steps", "e.g. steps=50")
        _positive(self.batch_size, "batch_size", "e.g. batch_size=8")
        if isinstance(self.seed, bool) or not isinstance(self.seed, numbers.Integral):
            raise errors.InvalidConfigError(f"AutoPromptConfig.seed must be an integer, got {self.seed!r}")
        object.__setattr__(self, "exclude_ids", _ids(self.exclude_ids, "exclude_ids"))
        if self.candidate_ids is not None:
            ids = _ids(self.candidate_ids, "candidate_ids")
            if not set(ids) - set(self.exclude_ids):
                raise errors.InvalidConfigError(
                    "the candidate vocabulary is empty (candidate_ids minus exclude_ids); allow at least "
                    "one token id, or pass candidate_ids=None for the whole vocabulary")
            object.__setattr__(self, "candidate_ids", ids)

    def vocabulary(self, vocab_size: int) -> np.ndarray:
        """The allowed ids, sorted, for a model of ``vocab_size`` rows.

        Example:
            >>> AutoPromptConfig(num_tokens=1, exclude_ids=(0, 2)).vocabulary(5).tolist()
            [1, 3, 4]
        """
        if self.candidate_ids is None:
            ids = set(range(vocab_size))
        else:
            ids = set(self.candidate_ids)
            outside = sorted(i for i in ids if i >= vocab_size)
            if outside:
                raise errors.InvalidConfigError(
                    f"candidate_ids {outside[:5]} are outside the model's vocabulary of {vocab_size} rows; "
                    "take the candidates from this model's tokenizer")
        ids -= set(self.exclude_ids)
        if not ids:
            raise errors.InvalidConfigError(
                f"the candidate vocabulary is empty: exclude_ids removes all {vocab_size} ids of the model; "
                "exclude fewer ids")
        return np.array(sorted(ids), np.int32)


@dataclasses.dataclass(frozen=True)
class AutoPromptResult:
    """What `search` found.

    Attributes:
        token_ids: the ``N`` trigger ids.
        tokens: each id as text (``tokenizer.decode([id])``), when a tokenizer was given.
        text: all ids decoded together, when a tokenizer was given.
        history: per step, the batch loss of the tokens kept after that step.
        accepted: how many of the steps changed a token.
    """

    token_ids: tuple[int, ...]
    history: tuple[float, ...]
    accepted: int
    tokens: tuple[str, ...] | None = None
    text: str | None = None

    def prompt_tuning(self, **fields: Any) -> Placement:
        """Prompt tuning that starts from these tokens' embedding rows (``prompt_init="text"``)."""
        return prompt_tuning(len(self.token_ids), prompt_init="text", token_ids=self.token_ids, **fields)


def _decode(tokenizer: Any, ids: Sequence[int]) -> str:
    return tokenizer.decode([int(i) for i in ids])


def _sample(data: Mapping[str, Any], batch_size: int) -> tuple[dict[str, np.ndarray], int]:
    if not isinstance(data, Mapping) or not data:
        raise errors.BatchError(
            f"search() takes the data as a dict of arrays with one row per example, got {type(data).__name__}")
    arrays = {k: np.asarray(v) for k, v in data.items()}
    sizes = {k: v.shape[0] if v.ndim else None for k, v in arrays.items()}
    if None in sizes.values() or len(set(sizes.values())) != 1:
        raise errors.BatchError(f"every data array needs the same number of rows (examples), got {sizes}")
    n = next(iter(sizes.values()))
    if batch_size > n:
        raise errors.BatchError(
            f"AutoPromptConfig.batch_size is {batch_size} but the data has {n} examples; use batch_size <= {n}")
    return arrays, n


def _input_site(model: nnx.Module, n: int) -> Any:
    sites = peft_nnx.plan(model, prompt_tuning(n), _NAME).sites  # MissingHookError without a tap
    if len(sites) != 1:
        raise errors.InvalidConfigError(
            f"AutoPrompt searches one prompt, but the model has {len(sites)} input taps "
            f"({[s.path for s in sites]}); search on a model with a single input tap")
    return sites[0]


def _init_ids(init_ids: Any, config: AutoPromptConfig, vocab: np.ndarray, vocab_size: int,
              rng: np.random.Generator) -> np.ndarray:
    if init_ids is None:
        return rng.choice(vocab, config.num_tokens)
    ids = _ids(init_ids, "init_ids")
    if len(ids) != config.num_tokens:
        raise errors.InvalidConfigError(
            f"init_ids has {len(ids)} ids but num_tokens is {config.num_tokens}; pass exactly num_tokens ids")
    outside = sorted({i for i in ids if i >= vocab_size})
    if outside:
        raise errors.InvalidConfigError(
            f"init_ids {outside[:5]} are outside the model's vocabulary of {vocab_size} rows")
    return np.array(ids, np.int32)


def search(model: nnx.Module, loss_fn: Callable[[nnx.Module, dict], jax.Array], data: Mapping[str, Any],
           config: AutoPromptConfig, *, init_ids: Sequence[int] | None = None,
           tokenizer: Any = None) -> AutoPromptResult:
    """Searches ``config.num_tokens`` tokens that lower ``loss_fn`` when put before the inputs.

    Args:
        model: an NNX model with one input tap (`peft_jax.hooks.InputTap`, `WithInputTap`, the
            reference models). It is not changed: the search works on a copy of its module tree that
            shares its (frozen) arrays, in the mode the model is in (call ``model.eval()`` first to
            search without dropout).
        loss_fn: ``loss_fn(model, batch) -> scalar``, as for `peft_jax.nnx.make_loss`; the model it
            gets has the trigger attached.
        data: equal-length arrays, one row per example (``{"input_ids": ..., "labels": ...}``).
        config: the `AutoPromptConfig`.
        init_ids: the ``N`` starting ids; by default drawn from the allowed vocabulary by the seed.
        tokenizer: anything with ``decode(ids) -> str``, to report the tokens as text.

    Returns:
        An `AutoPromptResult`.

    Raises:
        MissingHookError: the model has no input tap.
        InvalidConfigError: an empty vocabulary, ids outside the model's vocabulary, a bad ``init_ids``,
            several input taps, or a ``loss_fn`` that does not return a scalar.
        BatchError: data arrays of different lengths, or fewer examples than ``batch_size``.
    """
    if not isinstance(config, AutoPromptConfig):
        raise errors.InvalidConfigError(f"search() needs an AutoPromptConfig, got {type(config).__name__}")
    if tokenizer is not None and not callable(getattr(tokenizer, "decode", None)):
        raise errors.InvalidConfigError(
            f"the tokenizer ({type(tokenizer).__name__}) has no decode(ids) -> str; pass one that has, or none")
    arrays, n = _sample(data, config.batch_size)
    work = nnx.merge(*nnx.split(model))  # new modules over the same arrays: `model` stays as it is
    site = _input_site(work, config.num_tokens).site
    vocab = config.vocabulary(site.vocab_size)
    rng = np.random.default_rng(config.seed)
    ids = _init_ids(init_ids, config, vocab, site.vocab_size, rng)
    name = _NAME
    while name in peft_nnx.adapter_names(work):
        name += "_"
    start = prompt_tuning(config.num_tokens, prompt_init="text", token_ids=tuple(int(i) for i in ids))
    peft_nnx.attach(work, start, rngs=nnx.Rngs(config.seed), name=name)
    table = peft_nnx._init_base(work, dict(peft_nnx.adapted_layers(work))[site.path])["embedding"]
    graphdef, prompt_state, rest = nnx.split(work, nnx.All(peft_nnx.AdapterParam, nnx.PathContains(name)), ...)
    (prompt,), treedef = jax.tree.flatten(prompt_state)
    loss_of = peft_nnx.make_loss(graphdef, loss_fn)

    def loss_at(p, rest, batch):
        return loss_of(jax.tree.unflatten(treedef, [p]), rest, batch)

    def batch_at(step_rng: np.random.Generator) -> dict[str, np.ndarray]:
        take = np.sort(step_rng.choice(n, config.batch_size, replace=False))
        return {k: v[take] for k, v in arrays.items()}

    first = batch_at(np.random.default_rng([config.seed, 0]))
    out = jax.eval_shape(loss_at, prompt, rest, first)  # traces only: a bad loss fails before compiling
    if not (isinstance(out, jax.ShapeDtypeStruct) and out.shape == () and jnp.issubdtype(out.dtype, jnp.floating)):
        raise errors.InvalidConfigError(
            f"loss_fn must return a float scalar, got {out}; reduce the per-example losses (e.g. .mean())")

    allowed = jnp.zeros(site.vocab_size, bool).at[vocab].set(True)
    k = min(config.candidates_per_step, len(vocab))
    value_and_grad = jax.jit(jax.value_and_grad(loss_at))
    candidates = jax.jit(lambda p, i, rows, rest, batch: jax.lax.map(
        lambda row: loss_at(_set_row(p, i, row), rest, batch), rows))

    history, accepted = [], 0
    for step in range(config.steps):
        batch = first if step == 0 else batch_at(np.random.default_rng([config.seed, step]))
        i = int(rng.integers(config.num_tokens))
        loss, grad = value_and_grad(prompt, rest, batch)
        cand, rows = (np.asarray(a) for a in _flip(grad, i, table, allowed, ids[i], dtype=prompt.dtype, k=k))
        losses = np.asarray(candidates(prompt, i, rows, rest, batch))
        best = int(np.argmin(losses))
        if losses[best] < float(loss):
            ids = ids.copy()
            ids[i] = int(cand[best])
            prompt = _set_row(prompt, i, rows[best])
            accepted += 1
            loss = losses[best]
        history.append(float(loss))
    found = tuple(int(i) for i in ids)
    return AutoPromptResult(
        token_ids=found, history=tuple(history), accepted=accepted,
        tokens=None if tokenizer is None else tuple(_decode(tokenizer, [i]) for i in found),
        text=None if tokenizer is None else _decode(tokenizer, found))


@jax.jit
def _set_row(prompt: jax.Array, i: jax.Array, row: jax.Array) -> jax.Array:
    return prompt.at[i].set(row)


@functools.partial(jax.jit, static_argnames=("dtype", "k"))
def _flip(grad: jax.Array, i: jax.Array, table: jax.Array, allowed: jax.Array, current: jax.Array, *,
          dtype: Any, k: int) -> tuple[jax.Array, jax.Array]:
    """HotFlip at position ``i``: the ``k`` allowed ids with the largest ``-(g_i . E_v)`` (never the
    current id) and their embedding rows."""
    scores = -(table.astype(jnp.float32) @ grad[i].astype(jnp.float32))
    scores = jnp.where(allowed.at[current].set(False), scores, -jnp.inf)
    top, ids = jax.lax.top_k(scores, k)
    ids = jnp.where(jnp.isfinite(top), ids, current)  # too few allowed ids: retry the current one
    return ids, jnp.take(table, ids, axis=0).astype(dtype)
