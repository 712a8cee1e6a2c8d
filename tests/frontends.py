"""Test-only models the library did not write, and one harness per front-end with a shared shape.

The two small models use Dense, DenseGeneral, Einsum, Conv, Embed (also as a tied head through
``attend``), a LayerNorm (unsupported for LoRA) and a plain Dense head, with the same layer names
in NNX and Linen so a single contract matrix drives both front-ends. Two more, a one-block
transformer in NNX and in Linen, opt in to the input, attention and residual methods by placing
`peft_jax.hooks` taps (and name their parts in `TAP_ROLES`).
"""

from __future__ import annotations

import contextlib

import jax
import jax.numpy as jnp
import optax
from flax import linen as nn
from flax import nnx
from jax._src import dispatch, monitoring

import peft_jax
from peft_jax import hooks
from peft_jax.hooks import linen as linen_hooks
from peft_jax.methods.sites import Attention, Inputs, Residual

VOCAB, WIDTH, SEQ, BATCH = 16, 8, 5, 2
HEADS, MAX_POSITIONS = 2, 32
ADAPTABLE = ["embed", "dense", "general", "einsum", "conv"]
TAP_ROLES = hooks.Roles(attention="attention_residual", ffn="ffn_residual", embed="embed",
                        norms=["norm1", "norm2"])


def _attend(a: Attention):
    scores = jnp.einsum("bqhd,bkhd->bhqk", a.query, a.key) / jnp.sqrt(a.query.shape[-1])
    scores = jnp.where(a.mask[:, None], scores, -1e9)
    return jnp.einsum("bhqk,bkhd->bqhd", jax.nn.softmax(scores, axis=-1), a.value)


def _heads(x):
    return x.reshape(*x.shape[:-1], HEADS, WIDTH // HEADS)


class NnxTapNet(nnx.Module):
    """One transformer block a user wrote, with the three taps placed."""

    def __init__(self, rngs: nnx.Rngs):
        self.embed = nnx.Embed(VOCAB, WIDTH, rngs=rngs)
        self.input_tap = hooks.InputTap(features=WIDTH, vocab_size=VOCAB, embed_path="embed",
                                        max_positions=MAX_POSITIONS)
        self.q, self.k, self.v, self.o = (nnx.Linear(WIDTH, WIDTH, rngs=rngs) for _ in range(4))
        self.attention_tap = hooks.AttentionTap(num_heads=HEADS, num_kv_heads=HEADS,
                                                head_dim=WIDTH // HEADS, features=WIDTH)
        self.norm1, self.norm2 = nnx.LayerNorm(WIDTH, rngs=rngs), nnx.LayerNorm(WIDTH, rngs=rngs)
        self.attention_residual = hooks.ResidualTap(WIDTH, role="attention")
        self.up, self.down = nnx.Linear(WIDTH, 2 * WIDTH, rngs=rngs), nnx.Linear(2 * WIDTH, WIDTH, rngs=rngs)
        self.ffn_residual = hooks.ResidualTap(WIDTH, role="ffn")
        self.head = nnx.Linear(WIDTH, 3, rngs=rngs)

    def __call__(self, ids):
        t = ids.shape[1]
        inputs = self.input_tap(Inputs(self.embed(ids), jnp.ones(ids.shape, bool)))
        x, virtual = inputs.embeds, inputs.embeds.shape[1] - t

        def project(h):
            return _heads(self.k(h)), _heads(self.v(h))

        a = self.attention_tap(Attention(_heads(self.q(x)), *project(x), inputs.mask[:, None],
                                         hidden=x, project=project), _attend)
        h = self.attention_residual(Residual(self.o(a.reshape(x.shape)), x, self.norm1))
        h = self.ffn_residual(Residual(self.down(nnx.relu(self.up(h))), h, self.norm2))
        return self.head(h)[:, virtual:]


class LinenTapNet(nn.Module):
    """The same block in Linen, with `peft_jax.hooks.linen` taps."""

    @nn.compact
    def __call__(self, ids):
        t = ids.shape[1]
        embed = nn.Embed(VOCAB, WIDTH, name="embed")
        tap = linen_hooks.InputTap(features=WIDTH, vocab_size=VOCAB, embed_path="embed",
                                   max_positions=MAX_POSITIONS, name="input_tap")
        inputs = tap(Inputs(embed(ids), jnp.ones(ids.shape, bool)))
        x, virtual = inputs.embeds, inputs.embeds.shape[1] - t
        q, k, v, o = (nn.Dense(WIDTH, name=n) for n in "qkvo")

        def project(h):
            return _heads(k(h)), _heads(v(h))

        attention_tap = linen_hooks.AttentionTap(num_heads=HEADS, num_kv_heads=HEADS,
                                                 head_dim=WIDTH // HEADS, features=WIDTH,
                                                 name="attention_tap")
        a = attention_tap(Attention(_heads(q(x)), *project(x), inputs.mask[:, None], hidden=x,
                                    project=project), _attend)
        norm1, norm2 = nn.LayerNorm(name="norm1"), nn.LayerNorm(name="norm2")
        h = linen_hooks.ResidualTap(WIDTH, "attention", name="attention_residual")(
            Residual(o(a.reshape(x.shape)), x, norm1))
        ffn = nn.Dense(WIDTH, name="down")(nn.relu(nn.Dense(2 * WIDTH, name="up")(h)))
        h = linen_hooks.ResidualTap(WIDTH, "ffn", name="ffn_residual")(Residual(ffn, h, norm2))
        return nn.Dense(3, name="head")(h)[:, virtual:]


class NnxNet(nnx.Module):
    def __init__(self, rngs: nnx.Rngs):
        self.embed = nnx.Embed(VOCAB, WIDTH, rngs=rngs)
        self.dense = nnx.Linear(WIDTH, WIDTH, rngs=rngs)
        self.general = nnx.LinearGeneral(WIDTH, (2, 4), rngs=rngs)
        self.einsum = nnx.Einsum("btnh,nhd->btd", (2, 4, WIDTH), (WIDTH,), rngs=rngs)
        self.conv = nnx.Conv(WIDTH, WIDTH, kernel_size=(3,), rngs=rngs)
        self.norm = nnx.LayerNorm(WIDTH, rngs=rngs)
        self.head = nnx.Linear(WIDTH, 3, rngs=rngs)

    def __call__(self, ids):
        h = self.embed(ids)
        h = nnx.relu(self.dense(h))
        h = self.einsum(self.general(h))
        h = self.norm(self.conv(h))
        return self.head(h) + self.embed.attend(h)[..., :3]


class LinenNet(nn.Module):
    @nn.compact
    def __call__(self, ids):
        embed = nn.Embed(VOCAB, WIDTH, name="embed")
        h = embed(ids)
        h = nn.relu(nn.Dense(WIDTH, name="dense")(h))
        h = nn.DenseGeneral((2, 4), name="general")(h)
        h = nn.Einsum((2, 4, WIDTH), "btnh,nhd->btd", name="einsum")(h)
        h = nn.LayerNorm(name="norm")(nn.Conv(WIDTH, (3,), name="conv")(h))
        return nn.Dense(3, name="head")(h) + embed.attend(h)[..., :3]


@contextlib.contextmanager
def compile_log():
    """Counts XLA backend compilations (JAX's own compile events) inside the block."""
    seen = []

    def listen(event, duration, **kwargs):
        if event == dispatch.BACKEND_COMPILE_EVENT:
            seen.append(event)

    monitoring.register_event_duration_secs_listener(listen)
    try:
        yield seen
    finally:
        monitoring.unregister_event_duration_listener(listen)


def _call(model, ids):
    return model(ids)


# One jitted forward for every NNX harness: nnx.jit retraces when the graph changes (an attach,
# a merge, a disabled adapter) and reuses the compiled program otherwise.
_nnx_call = nnx.jit(_call)


def batch(seed: int = 0) -> dict:
    k1, k2 = jax.random.split(jax.random.key(seed))
    return {"ids": jax.random.randint(k1, (BATCH, SEQ), 0, VOCAB),
            "target": jax.random.normal(k2, (BATCH, SEQ, 3))}


def mse(out, target):
    return jnp.mean((out - target) ** 2)


class NnxHarness:
    """Drives the NNX front-end: the model object is the state."""

    name = "nnx"

    def __init__(self, taps: bool = False):
        self.model = (NnxTapNet if taps else NnxNet)(nnx.Rngs(0))

    def attach(self, config, name="default"):
        peft_jax.nnx.attach(self.model, config, rngs=nnx.Rngs(1), name=name)

    def forward(self, ids, jit: bool):
        return (_nnx_call if jit else _call)(self.model, ids)

    def base_forward(self, ids):
        """The frozen base alone, as a plain model with the current base params."""
        plain = peft_jax.nnx.unload(nnx.clone(self.model), merge_adapters=False)
        return plain(ids)

    def eval(self):
        self.model.eval()

    def split(self):
        graphdef, trainable, frozen = peft_jax.nnx.split(self.model)
        loss = peft_jax.nnx.make_loss(graphdef, lambda m, b: mse(m(b["ids"]), b["target"]))
        return trainable, frozen, loss

    def update(self, trainable):
        nnx.update(self.model, trainable)

    def adapted_paths(self):
        return sorted(p for p, _ in peft_jax.nnx.adapted_layers(self.model))

    def merge(self, keep_original=True):
        peft_jax.nnx.merge(self.model, keep_original=keep_original)

    def fold(self):
        peft_jax.nnx.fold(self.model)

    def unmerge(self):
        peft_jax.nnx.unmerge(self.model)

    def base_arrays(self):
        """Every base param of every adapted site, as nested dicts."""
        return {p: nnx.to_pure_dict(nnx.state(m.base_layer, nnx.Param))
                for p, m in peft_jax.nnx.adapted_layers(self.model)}

    @contextlib.contextmanager
    def disabled(self):
        with peft_jax.nnx.disabled(self.model):
            yield


class LinenHarness:
    """Drives the Linen front-end: a `Peft` handle plus a variables dict."""

    name = "linen"

    def __init__(self, taps: bool = False):
        self.module = LinenTapNet() if taps else LinenNet()
        self.variables = self.module.init(jax.random.key(0), batch()["ids"])
        self.peft = None
        self.rngs = None
        self.enabled = True
        self._jitted = None

    def attach(self, config, name="default"):
        peft = (peft_jax.linen.attach(self.module, config, name) if self.peft is None
                else self.peft.attach(config, name))
        self.peft = peft.plan(self.variables, batch()["ids"])
        self._jitted = None
        self.variables = self.peft.init(jax.random.key(1), self.variables)
        if any(m.needs_rng for a in self.peft.plans for s in a.sites for m in s.methods):
            self.rngs = {"dropout": jax.random.key(2)}

    def forward(self, ids, jit: bool):
        if not jit:
            return self._apply(self.variables, ids, self.enabled)
        if self._jitted is None:  # one jitted function per attached handle: retraced only when
            self._jitted = jax.jit(self._apply, static_argnums=2)  # shapes or `enabled` change
        return self._jitted(self.variables, ids, self.enabled)

    def _apply(self, variables, ids, enabled):
        if self.peft is None:
            return self.module.apply(variables, ids)
        return self.peft.apply(variables, ids, enabled=enabled)

    def base_forward(self, ids):
        return self.module.apply({"params": self.variables["params"]}, ids)

    def eval(self):
        self.rngs = None

    def split(self):
        trainable, frozen = self.peft.partition(self.variables)
        dropout = self.rngs is not None

        def loss(trainable, frozen, b):
            variables = peft_jax.combine(trainable, frozen)
            rngs = {"dropout": b["dropout_rng"]} if dropout else None
            return mse(self.peft.apply(variables, b["ids"], rngs=rngs), b["target"])

        return trainable, frozen, loss

    def update(self, trainable):
        _, frozen = self.peft.partition(self.variables)
        self.variables = peft_jax.combine(trainable, frozen)

    def adapted_paths(self):
        return sorted({s.path for a in self.peft.plans for s in a.sites})

    def merge(self, keep_original=True):
        self.variables = self.peft.merge(self.variables, keep_original=keep_original)

    def fold(self):
        self.peft, self.variables = self.peft.fold(self.variables)

    def unmerge(self):
        self.variables = self.peft.unmerge(self.variables)

    def base_arrays(self):
        return {p: dict(self.variables["params"][p]) for p in self.adapted_paths()}

    @contextlib.contextmanager
    def disabled(self):
        self.enabled = False
        try:
            yield
        finally:
            self.enabled = True


HARNESSES = {"nnx": NnxHarness, "linen": LinenHarness}


def train(harness, steps: int, tx: optax.GradientTransformation | None = None, jit: bool = True):
    """Runs ``steps`` optimizer steps through `make_train_step`; returns the step function."""
    tx = tx or optax.adam(1e-2)
    trainable, frozen, loss = harness.split()
    step = peft_jax.make_train_step(loss, tx)
    opt_state = tx.init(trainable)
    ctx = contextlib.nullcontext() if jit else jax.disable_jit()
    with ctx:
        for i in range(steps):
            b = batch(i) | {"dropout_rng": jax.random.key(100 + i)}
            trainable, opt_state, metrics = step(trainable, opt_state, frozen, b)
    harness.update(trainable)
    return step, frozen, opt_state
