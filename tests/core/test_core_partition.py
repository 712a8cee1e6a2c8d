"""partition / combine: exact round trips (property-tested), masks, NNX State, gradients."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from peft_jax.core import combine, is_trainable_mask, partition, tree_items, tree_paths
from peft_jax.errors import InvalidConfigError

# --- random pytrees and selectors ---------------------------------------------------------------
arrays = hnp.arrays(
    dtype=st.sampled_from([np.float32, np.float16, np.int32, np.bool_]),
    shape=hnp.array_shapes(min_dims=0, max_dims=3, min_side=0, max_side=3),
)
leaves = st.one_of(arrays, arrays.map(jnp.asarray), st.floats(allow_nan=False), st.integers(),
                   st.none())
keys = st.text(alphabet="ab_01", min_size=1, max_size=3)
pytrees = st.recursive(
    leaves,
    lambda children: st.one_of(
        st.dictionaries(keys, children, max_size=4),
        st.lists(children, max_size=4),
        st.lists(children, max_size=3).map(tuple),
    ),
    max_leaves=16,
)


@st.composite
def tree_and_selector(draw):
    tree = draw(pytrees)
    paths = tree_paths(tree)
    kind = draw(st.sampled_from(["regex", "names", "callable", "mask", "none", "all"]))
    if kind == "regex" and paths:
        prefix = draw(st.sampled_from(paths))[: draw(st.integers(0, 4))]
        selector = re.escape(prefix) + ".*"
    elif kind == "names" and paths:
        selector = draw(st.lists(st.sampled_from([p.rsplit("/", 1)[-1] for p in paths])))
    elif kind == "callable":
        salt = draw(st.integers(0, 3))
        selector = lambda path, leaf: (len(path) + salt) % 2 == 0  # noqa: E731
    elif kind == "mask":
        bools = draw(st.lists(st.booleans(), min_size=len(paths), max_size=len(paths)))
        selector = jax.tree.unflatten(jax.tree.structure(tree), bools)
    elif kind == "all":
        selector = r".*"
    else:
        selector = None
    return tree, selector


def same_leaves(a, b):
    la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
    return len(la) == len(lb) and all(x is y for x, y in zip(la, lb))


@settings(max_examples=300, deadline=None)
@given(tree_and_selector())
def test_combine_inverts_partition_exactly(case):
    tree, selector = case
    trainable, frozen = partition(tree, selector)
    for merged in (combine(trainable, frozen), combine(frozen, trainable)):
        assert jax.tree.structure(merged) == jax.tree.structure(tree)
        assert same_leaves(merged, tree)
    # every leaf sits in exactly one half, each half keeps the tree's structure
    is_none = lambda x: x is None  # noqa: E731
    mask = jax.tree.leaves(is_trainable_mask(tree, selector))
    t_leaves = jax.tree.leaves(trainable, is_leaf=is_none)
    f_leaves = jax.tree.leaves(frozen, is_leaf=is_none)
    originals = jax.tree.leaves(tree)
    assert len(mask) == len(originals)
    if len(t_leaves) == len(originals):  # no None subtrees in the original: positions line up
        for m, t, f, x in zip(mask, t_leaves, f_leaves, originals):
            assert (t is x and f is None) if m else (f is x and t is None)
    assert [p for p, _ in tree_items(trainable)] == [
        p for p, m in zip(tree_paths(tree), mask) if m]


def test_partition_basic_and_mask_selector():
    tree = {"dense": {"kernel": np.ones((2, 2)), "bias": np.zeros(2)}, "lora_a": np.ones(2)}
    trainable, frozen = partition(tree, ["lora_a", "bias"])
    assert tree_paths(trainable) == ["dense/bias", "lora_a"]
    assert tree_paths(frozen) == ["dense/kernel"]
    mask = is_trainable_mask(tree, r".*kernel")
    assert mask == {"dense": {"kernel": True, "bias": False}, "lora_a": False}
    assert tree_paths(partition(tree, mask)[0]) == ["dense/kernel"]


def test_partition_rejects_masks_of_another_structure():
    with pytest.raises(InvalidConfigError, match="structure"):
        partition({"a": 1, "b": 2}, {"a": True})


def test_combine_many_trees_first_non_none_wins_and_mismatch_errors():
    assert combine({"a": None, "b": 2}, {"a": 1, "b": 3}, {"a": 4, "b": None}) == {"a": 1, "b": 2}
    assert combine(None, None) is None
    with pytest.raises(InvalidConfigError, match="different structure"):
        combine({"a": 1}, {"b": 2})


def test_grad_sees_only_the_trainable_half():
    params = {"w": jnp.ones((3, 2)), "lora": jnp.full((3,), 0.5)}
    trainable, frozen = partition(params, ["lora"])

    def loss(trainable, frozen, x):
        p = combine(trainable, frozen)
        return jnp.sum((x + p["lora"]) @ p["w"])

    grads = jax.jit(jax.grad(loss))(trainable, frozen, jnp.ones(3))
    assert grads["w"] is None and grads["lora"].shape == (3,)
    assert jax.tree.structure(grads) == jax.tree.structure(trainable)


class Model(nnx.Module):
    def __init__(self, rngs):
        self.layers = nnx.List([nnx.Linear(4, 4, rngs=rngs) for _ in range(2)])
        self.norm = nnx.LayerNorm(4, rngs=rngs)


@pytest.mark.parametrize("keep_variables", [False, True])
def test_nnx_state_round_trip(keep_variables):
    model = Model(nnx.Rngs(0))
    state = nnx.state(model)
    is_leaf = (lambda x: isinstance(x, nnx.Variable)) if keep_variables else None
    trainable, frozen = partition(state, r".*/bias|norm/.*", is_leaf=is_leaf)
    assert isinstance(trainable, nnx.State) and isinstance(frozen, nnx.State)
    assert tree_paths(trainable) == ["layers/0/bias", "layers/1/bias", "norm/bias", "norm/scale"]
    assert tree_paths(frozen) == ["layers/0/kernel", "layers/1/kernel"]
    merged = combine(trainable, frozen)
    assert jax.tree.structure(merged) == jax.tree.structure(state)
    assert same_leaves(merged, state)
    nnx.update(model, merged)  # the merged State is accepted back by NNX
    mask = is_trainable_mask(state, ["kernel"], is_leaf=is_leaf)
    assert tree_paths(partition(state, mask, is_leaf=is_leaf)[0]) == tree_paths(frozen)
