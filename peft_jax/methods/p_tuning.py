"""P-tuning: virtual tokens produced by a small trained encoder (Liu et al., 2021, "GPT Understands,
Too", arXiv:2103.10385), as HF PEFT's ``PromptEncoder``.

A trained table ``E: (N, d)`` goes through an encoder to give the prompt ``P = f(E): (N, d)``,
which is prepended at the input site exactly as prompt tuning's (`peft_jax.methods.prompt`)::

    call(Inputs([f(E); e], [1; m]))

Encoders (``h = encoder_hidden_size``, default ``d``):

* ``"mlp"`` (HF's default): ``Linear(d, h) - ReLU - Linear(h, h) - ReLU - Linear(h, d)``; always
  three linears (``encoder_num_layers`` is ignored, with a warning, as in HF).
* ``"lstm"``: a bidirectional ``encoder_num_layers``-layer LSTM ``(d -> h)`` with dropout
  ``encoder_dropout`` between layers, then ``Linear(2h, 2h) - ReLU - Linear(2h, d)``.

The LSTM is written in JAX with torch's gate order (input, forget, cell, output) and weight layout,
one `jax.lax.scan` over the ``N`` virtual tokens per direction and layer. Inits are torch's
defaults: ``E ~ N(0, 1)`` (``nn.Embedding``), linears ``U(-1/sqrt(fan_in), 1/sqrt(fan_in))`` for
weight and bias (``nn.Linear``'s Kaiming-uniform with ``a = sqrt(5)``), LSTM ``U(-1/sqrt(h),
1/sqrt(h))``. Params are kept in at least float32. `hf_names` maps the params to HF PEFT's
state-dict names; `fold_prompt` gives the encoder's output, which is what HF saves as
``prompt_embeddings`` (and serves through `PromptTuning`). In training the dropout mask is shared
by the batch (the encoder runs once, not once per example as in HF). Not mergeable.

Example:
    >>> import jax, jax.numpy as jnp
    >>> from peft_jax.methods.base import Context
    >>> from peft_jax.methods.sites import Inputs, InputSite
    >>> site = InputSite(path="input_tap", layer="InputTap", features=4, vocab_size=10)
    >>> pt = PTuning(num_virtual_tokens=3, encoder_hidden_size=8)
    >>> params, _ = pt.init(jax.random.key(0), site, {}, {})
    >>> sorted(params)
    ['embedding', 'mlp_head_0_bias', 'mlp_head_0_kernel', 'mlp_head_2_bias', 'mlp_head_2_kernel', 'mlp_head_4_bias', 'mlp_head_4_kernel']
    >>> x = Inputs(jnp.zeros((2, 5, 4)), jnp.ones((2, 5), bool))
    >>> out = pt.apply(params, {}, site, lambda i: i, x, {}, Context())
    >>> out.embeds.shape, bool(jnp.allclose(out.embeds[0, :3], fold_prompt(pt, params)))
    ((2, 8, 4), True)
"""  # noqa: E501

from __future__ import annotations

import dataclasses
import math
import warnings
from typing import Any, ClassVar, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from peft_jax import errors
from peft_jax.methods.base import Inputs, InputSite, Method, Params
from peft_jax.methods.lora import check_positive_int, check_rate, input_dropout
from peft_jax.methods.prompt import check_prompt_length, param_dtype, prepend_prompt

__all__ = ["PTuning", "bidirectional_lstm", "fold_prompt", "hf_names", "lstm_direction",
           "params_from_hf"]

ENCODERS = ("mlp", "lstm")


def lstm_direction(x: jax.Array, weight_ih: jax.Array, weight_hh: jax.Array, bias_ih: jax.Array,
                   bias_hh: jax.Array, reverse: bool = False) -> jax.Array:
    """One direction of one torch ``nn.LSTM`` layer over a ``(T, in)`` sequence -> ``(T, h)``.

    Weights in torch's layout: ``weight_ih (4h, in)``, ``weight_hh (4h, h)``, biases ``(4h,)``,
    gates stacked as input, forget, cell, output; zero initial state. ``reverse`` runs from the
    last step to the first and returns the outputs in the original order (as torch does).

    Example:
        >>> import jax.numpy as jnp
        >>> x, w, b = jnp.ones((3, 2)), jnp.zeros((8, 2)), jnp.zeros(8)
        >>> lstm_direction(x, w, jnp.zeros((8, 2)), b, b).shape
        (3, 2)
    """
    hidden = weight_hh.shape[1]
    driven = x @ weight_ih.T + (bias_ih + bias_hh)  # the input part of every step at once

    def step(carry, z_in):
        h, c = carry
        z = z_in + h @ weight_hh.T
        i, f, g, o = jnp.split(z, 4, axis=-1)
        c = jax.nn.sigmoid(f) * c + jax.nn.sigmoid(i) * jnp.tanh(g)
        h = jax.nn.sigmoid(o) * jnp.tanh(c)
        return (h, c), h

    zero = jnp.zeros((hidden,), driven.dtype)
    _, out = jax.lax.scan(step, (zero, zero), driven, reverse=reverse)
    return out


def bidirectional_lstm(weights: Mapping[str, jax.Array], x: jax.Array, num_layers: int,
                       dropout: float = 0.0, key: jax.Array | None = None) -> jax.Array:
    """torch's ``nn.LSTM(bidirectional=True, num_layers=...)`` output on ``(T, in)`` -> ``(T, 2h)``.

    ``weights`` uses torch's names (``weight_ih_l0``, ``weight_hh_l0``, ``bias_ih_l0``,
    ``bias_hh_l0`` and the ``_reverse`` twins, per layer); ``dropout`` (with a ``key``) applies
    to each layer's output but the last, as torch does in training.

    Example:
        >>> import jax.numpy as jnp
        >>> w = {f"{n}_l0{s}": jnp.zeros(shape) for s in ("", "_reverse")
        ...      for n, shape in (("weight_ih", (4, 3)), ("weight_hh", (4, 1)),
        ...                       ("bias_ih", (4,)), ("bias_hh", (4,)))}
        >>> bidirectional_lstm(w, jnp.ones((5, 3)), num_layers=1).shape
        (5, 2)
    """
    for layer in range(num_layers):
        both = []
        for suffix, reverse in (("", False), ("_reverse", True)):
            name = f"l{layer}{suffix}"
            both.append(lstm_direction(x, weights[f"weight_ih_{name}"], weights[f"weight_hh_{name}"],
                                       weights[f"bias_ih_{name}"], weights[f"bias_hh_{name}"], reverse))
        x = jnp.concatenate(both, axis=-1)
        if layer < num_layers - 1 and key is not None and dropout > 0:
            x = input_dropout(x, dropout, jax.random.fold_in(key, layer))
    return x


@dataclasses.dataclass(frozen=True, kw_only=True)
class PTuning(Method):
    """P-tuning on an input site: ``N`` virtual tokens from an MLP or LSTM encoder.

    Args:
        num_virtual_tokens: ``N``.
        encoder: ``"mlp"`` (HF's default, recommended) or ``"lstm"`` (HF's
            ``encoder_reparameterization_type``; ``"MLP"`` / ``"LSTM"`` are accepted).
        encoder_hidden_size: ``h``; ``None`` takes the site's width ``d`` (as HF).
        encoder_num_layers: LSTM layers (the MLP always has three linears).
        encoder_dropout: dropout between LSTM layers in training (unused by the MLP, as in HF).

    Example:
        >>> from peft_jax.methods.sites import InputSite
        >>> site = InputSite(path="t", layer="InputTap", features=4, vocab_size=10)
        >>> shapes = PTuning(num_virtual_tokens=2, encoder="lstm", encoder_hidden_size=3).param_shapes(site)
        >>> shapes["lstm_head_weight_ih_l1_reverse"], shapes["mlp_head_2_kernel"]
        ((12, 6), (6, 4))
    """

    name: ClassVar[str] = "p_tuning"
    sites: ClassVar[tuple[str, ...]] = ("inputs",)
    num_virtual_tokens: int = 20
    encoder: str = "mlp"
    encoder_hidden_size: int | None = None
    encoder_num_layers: int = 2
    encoder_dropout: float = 0.0

    def __post_init__(self) -> None:
        check_positive_int(self.num_virtual_tokens, "num_virtual_tokens")
        encoder = self.encoder.lower() if isinstance(self.encoder, str) else self.encoder
        if encoder not in ENCODERS:
            raise errors.InvalidConfigError(
                f"PTuning encoder must be 'mlp' (recommended) or 'lstm', got {self.encoder!r}")
        object.__setattr__(self, "encoder", encoder)
        if self.encoder_hidden_size is not None:
            check_positive_int(self.encoder_hidden_size, "encoder_hidden_size")
        check_positive_int(self.encoder_num_layers, "encoder_num_layers")
        check_rate(self.encoder_dropout, "encoder_dropout")
        if encoder == "mlp" and self.encoder_num_layers != 2:
            warnings.warn(f"PTuning(encoder='mlp') ignores encoder_num_layers={self.encoder_num_layers}: "
                          "the MLP always has 3 linears (as in HF PEFT)", UserWarning, stacklevel=3)
        if encoder == "mlp" and self.encoder_dropout > 0:
            warnings.warn(f"PTuning(encoder='mlp') ignores encoder_dropout={self.encoder_dropout}: the "
                          "MLP has no dropout (as in HF PEFT)", UserWarning, stacklevel=3)
        if encoder == "lstm" and self.encoder_dropout > 0 and self.encoder_num_layers == 1:
            warnings.warn("PTuning's LSTM applies encoder_dropout between layers only, so with "
                          "encoder_num_layers=1 it has no effect (as torch's nn.LSTM warns)",
                          UserWarning, stacklevel=3)

    @property
    def needs_rng(self) -> bool:
        """Whether training draws a dropout key (an LSTM of several layers with dropout)."""
        return self.encoder == "lstm" and self.encoder_dropout > 0 and self.encoder_num_layers > 1

    def hidden_size(self, site: InputSite) -> int:
        """``h``: ``encoder_hidden_size``, or the site's width when unset.

        Example:
            >>> from peft_jax.methods.sites import InputSite
            >>> PTuning().hidden_size(InputSite(path="t", layer="T", features=16, vocab_size=9))
            16
        """
        return self.encoder_hidden_size or site.features

    def _linears(self, d: int, h: int) -> list[tuple[int, int, int]]:
        """``(torch Sequential index, fan_in, fan_out)`` of each linear in ``mlp_head``."""
        if self.encoder == "lstm":
            return [(0, 2 * h, 2 * h), (2, 2 * h, d)]
        return [(0, d, h), (2, h, h), (4, h, d)]

    def check(self, site) -> None:
        """Typed errors before compile: the site kind and the position limit."""
        super().check(site)
        check_prompt_length(self, self.num_virtual_tokens, site)

    def init(self, key, site: InputSite, base: Params, shared: Params):
        """The embedding ``(N, d)`` and the encoder's weights, with torch's default inits."""
        n, d, h = self.num_virtual_tokens, site.features, self.hidden_size(site)
        table = base.get("embedding") if base else None
        dtype = param_dtype(table.dtype if table is not None else jnp.float32)
        keys = iter(jax.random.split(key, 64))

        def uniform(shape, bound):
            return jax.random.uniform(next(keys), shape, dtype, -bound, bound)

        params = {"embedding": jax.random.normal(next(keys), (n, d), dtype)}
        if self.encoder == "lstm":
            bound = 1.0 / math.sqrt(h)
            for layer in range(self.encoder_num_layers):
                fan_in = d if layer == 0 else 2 * h
                for suffix in ("", "_reverse"):
                    name = f"l{layer}{suffix}"
                    params[f"lstm_head_weight_ih_{name}"] = uniform((4 * h, fan_in), bound)
                    params[f"lstm_head_weight_hh_{name}"] = uniform((4 * h, h), bound)
                    params[f"lstm_head_bias_ih_{name}"] = uniform((4 * h,), bound)
                    params[f"lstm_head_bias_hh_{name}"] = uniform((4 * h,), bound)
        for index, fan_in, fan_out in self._linears(d, h):
            bound = 1.0 / math.sqrt(fan_in)
            params[f"mlp_head_{index}_kernel"] = uniform((fan_in, fan_out), bound)
            params[f"mlp_head_{index}_bias"] = uniform((fan_out,), bound)
        return params, {}

    def prompt(self, params: Params, key: jax.Array | None = None) -> jax.Array:
        """The ``(N, d)`` encoder output ``f(E)``; ``key`` turns on the LSTM's dropout.

        Example:
            >>> import jax
            >>> from peft_jax.methods.sites import InputSite
            >>> site = InputSite(path="t", layer="T", features=4, vocab_size=9)
            >>> pt = PTuning(num_virtual_tokens=2, encoder="lstm")
            >>> pt.prompt(pt.init(jax.random.key(0), site, {}, {})[0]).shape
            (2, 4)
        """
        return _prompt(self, params, key)

    def _encode(self, params: Params, key: jax.Array | None) -> jax.Array:
        x = params["embedding"]
        if self.encoder == "lstm":
            weights = {k[len("lstm_head_"):]: v for k, v in params.items() if k.startswith("lstm_head_")}
            x = bidirectional_lstm(weights, x, self.encoder_num_layers, self.encoder_dropout, key)
        indices = [index for index, _, _ in self._linears(1, 1)]
        for pos, index in enumerate(indices):
            x = x @ params[f"mlp_head_{index}_kernel"] + params[f"mlp_head_{index}_bias"]
            if pos < len(indices) - 1:
                x = jax.nn.relu(x)
        return x

    def apply(self, params, shared, site: InputSite, call, x: Inputs, base, ctx):
        """``call(Inputs([f(E); e], [1; m]))``, or ``call(x)`` on a decoding step (``x.fresh`` false)."""
        if not x.fresh:
            return call(x)
        return prepend_prompt(self, self.prompt(params, ctx.key), site, call, x)


# One compiled program per config (eager callers such as `fold_prompt` would otherwise dispatch the
# scans op by op); inside a traced train step it simply inlines.
_prompt = jax.jit(lambda method, params, key: method._encode(params, key), static_argnums=0)


def fold_prompt(method: PTuning, params: Params) -> jax.Array:
    """The ``(N, d)`` prompt the encoder outputs (eval mode): HF PEFT's saved ``prompt_embeddings``.

    A folded prompt serves without the encoder through ``PromptTuning(num_virtual_tokens=N)`` with
    params ``{"prompt_embeddings": fold_prompt(method, params)}``.

    Example:
        >>> import jax
        >>> from peft_jax.methods.sites import InputSite
        >>> site = InputSite(path="t", layer="T", features=4, vocab_size=9)
        >>> pt = PTuning(num_virtual_tokens=3)
        >>> fold_prompt(pt, pt.init(jax.random.key(0), site, {}, {})[0]).shape
        (3, 4)
    """
    return method.prompt(params)


def hf_names(method: PTuning, adapter: str = "default") -> dict[str, tuple[str, bool]]:
    """``{our param name: (HF PEFT state-dict key, transposed?)}`` for a P-tuning adapter.

    HF keys live under ``prompt_encoder.<adapter>.`` (``embedding.weight``, ``mlp_head.<i>.weight``
    / ``.bias``, ``lstm_head.weight_ih_l<k>[_reverse]`` ...). Our linear kernels are ``(in, out)``,
    HF's weights ``(out, in)``, so those are transposed; the embedding and the LSTM's weights keep
    torch's layout. (HF's *saved* adapter file holds only the folded ``prompt_embeddings``, see
    `fold_prompt`; these names are the live model's, e.g. for a full training checkpoint.)

    Example:
        >>> names = hf_names(PTuning(encoder="lstm", encoder_num_layers=1))
        >>> names["embedding"], names["mlp_head_0_kernel"]
        (('prompt_encoder.default.embedding.weight', False), ('prompt_encoder.default.mlp_head.0.weight', True))
        >>> names["lstm_head_weight_hh_l0_reverse"]
        ('prompt_encoder.default.lstm_head.weight_hh_l0_reverse', False)
    """
    root = f"prompt_encoder.{adapter}."
    names = {"embedding": (root + "embedding.weight", False)}
    if method.encoder == "lstm":
        for layer in range(method.encoder_num_layers):
            for suffix in ("", "_reverse"):
                for part in ("weight_ih", "weight_hh", "bias_ih", "bias_hh"):
                    name = f"{part}_l{layer}{suffix}"
                    names[f"lstm_head_{name}"] = (f"{root}lstm_head.{name}", False)
    for index, _, _ in method._linears(1, 1):
        names[f"mlp_head_{index}_kernel"] = (f"{root}mlp_head.{index}.weight", True)
        names[f"mlp_head_{index}_bias"] = (f"{root}mlp_head.{index}.bias", False)
    return names


def params_from_hf(method: PTuning, state_dict: Mapping[str, Any], adapter: str = "default",
                   dtype: Any = jnp.float32) -> Params:
    """Our params from an HF PEFT P-tuning state dict (numpy or torch arrays), by `hf_names`.

    Keys may carry any prefix before ``prompt_encoder.`` (``base_model.`` ...), or be relative to
    the ``PromptEncoder`` module itself (``embedding.weight``, ``mlp_head.0.weight`` ...).

    Raises:
        CheckpointError: a param's key is missing, or its shape does not fit ``method``.

    Example:
        >>> import numpy as np
        >>> from peft_jax.methods.sites import InputSite
        >>> pt = PTuning(num_virtual_tokens=2, encoder_hidden_size=3)
        >>> shapes = pt.param_shapes(InputSite(path="t", layer="T", features=4, vocab_size=9))
        >>> sd = {key: np.zeros(shapes[ours][::-1] if t else shapes[ours])
        ...       for ours, (key, t) in hf_names(pt).items()}
        >>> params_from_hf(pt, sd)["mlp_head_0_kernel"].shape
        (4, 3)
    """
    root = f"prompt_encoder.{adapter}."
    by_key = {}
    for key, value in state_dict.items():
        at = key.find("prompt_encoder.")
        by_key[key[at:] if at >= 0 else root + key] = value
    params = {}
    for ours, (key, transpose) in hf_names(method, adapter).items():
        if key not in by_key:
            raise errors.CheckpointError(
                f"the P-tuning state dict has no {key!r} (for {ours!r}); check the adapter name "
                f"({adapter!r}) and the encoder settings ({method.encoder}, {method.encoder_num_layers} layers)")
        value = by_key[key]
        value = np.asarray(value.detach().cpu().float().numpy() if hasattr(value, "detach") else value)
        params[ours] = jnp.asarray(value.T if transpose else value, dtype)
    table = params["embedding"]
    if table.ndim != 2:
        raise errors.CheckpointError(f"P-tuning embedding must be (N, d), got shape {table.shape}")
    site = InputSite(path="p_tuning", layer="PromptEncoder", features=table.shape[1], vocab_size=1)
    want = method.param_shapes(site)
    bad = [f"{ours} {tuple(params[ours].shape)} (expected {want[ours]})"
           for ours in want if tuple(params[ours].shape) != tuple(want[ours])]
    if bad:
        raise errors.CheckpointError(
            f"the P-tuning state dict does not fit {method}: {'; '.join(bad[:4])}")
    return params
