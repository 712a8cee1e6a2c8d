"""Test-only models the library did not write, and one harness per front-end with a shared shape.

The two small models use Dense, DenseGeneral, Einsum, Conv, Embed (also as a tied head through
``attend``), a LayerNorm (unsupported for LoRA) and a plain Dense head, with the same layer names
in NNX and Linen so a single contract matrix drives both front-ends.
"""

from __future__ import annotations

import contextlib

import jax
import jax.numpy as jnp
import optax
from flax import linen as nn
from flax import nnx

import peft_jax

VOCAB, WIDTH, SEQ, BATCH = 16, 8, 5, 2
ADAPTABLE = ["embed", "dense", "general", "einsum", "conv"]


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


def batch(seed: int = 0) -> dict:
    k1, k2 = jax.random.split(jax.random.key(seed))
    return {"ids": jax.random.randint(k1, (BATCH, SEQ), 0, VOCAB),
            "target": jax.random.normal(k2, (BATCH, SEQ, 3))}


def mse(out, target):
    return jnp.mean((out - target) ** 2)


class NnxHarness:
    """Drives the NNX front-end: the model object is the state."""

    name = "nnx"

    def __init__(self):
        self.model = NnxNet(nnx.Rngs(0))

    def attach(self, config, name="default"):
        peft_jax.nnx.attach(self.model, config, rngs=nnx.Rngs(1), name=name)

    def forward(self, ids, jit: bool):
        if jit:
            return nnx.jit(lambda m, x: m(x))(self.model, ids)
        return self.model(ids)

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

    def __init__(self):
        self.module = LinenNet()
        self.variables = self.module.init(jax.random.key(0), batch()["ids"])
        self.peft = None
        self.rngs = None
        self.enabled = True

    def attach(self, config, name="default"):
        peft = (peft_jax.linen.attach(self.module, config, name) if self.peft is None
                else self.peft.attach(config, name))
        self.peft = peft.plan(self.variables, batch()["ids"])
        self.variables = self.peft.init(jax.random.key(1), self.variables)
        if any(m.needs_rng for a in self.peft.plans for s in a.sites for m in s.methods):
            self.rngs = {"dropout": jax.random.key(2)}

    def forward(self, ids, jit: bool):
        if self.peft is None:
            fn = lambda v, x: self.module.apply(v, x)  # noqa: E731
        else:
            fn = lambda v, x: self.peft.apply(v, x, enabled=self.enabled)  # noqa: E731
        return (jax.jit(fn) if jit else fn)(self.variables, ids)

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
