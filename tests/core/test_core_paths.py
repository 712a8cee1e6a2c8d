"""Path strings: key kinds, the dropped trailing ``.value``, NNX and Linen trees."""

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn
from flax import nnx
from jax.tree_util import DictKey, FlattenedIndexKey, GetAttrKey, SequenceKey

from peft_jax.core import map_with_path, path_to_str, tree_items, tree_paths


def test_path_to_str_all_key_kinds():
    kp = (DictKey("encoder"), SequenceKey(0), GetAttrKey("attn"), FlattenedIndexKey(2))
    assert path_to_str(kp) == "encoder/0/attn/2"
    assert path_to_str(()) == ""


def test_only_a_trailing_value_attribute_is_dropped():
    assert path_to_str((DictKey("kernel"), GetAttrKey("value"))) == "kernel"
    assert path_to_str((GetAttrKey("value"), DictKey("x"))) == "value/x"
    assert path_to_str((DictKey("kernel"), DictKey("value"))) == "kernel/value"


def test_tree_items_follow_flatten_order():
    tree = {"b": [np.zeros(2), (1, 2)], "a": {"z": 3, "y": None}}
    items = tree_items(tree)
    assert [p for p, _ in items] == ["a/z", "b/0", "b/1/0", "b/1/1"]
    assert [leaf for _, leaf in items] == jax.tree.leaves(tree)
    assert tree_paths(tree) == [p for p, _ in items]


class Pair(NamedTuple):
    left: int
    right: int


def test_namedtuple_and_custom_nodes():
    assert tree_paths({"p": Pair(1, 2)}) == ["p/left", "p/right"]

    @jax.tree_util.register_pytree_node_class
    class Box:
        def __init__(self, a, b):
            self.a, self.b = a, b

        def tree_flatten(self):
            return (self.a, self.b), None

        @classmethod
        def tree_unflatten(cls, aux, children):
            return cls(*children)

    assert tree_paths({"box": Box(1, 2)}) == ["box/0", "box/1"]


def test_is_leaf_stops_flattening():
    tree = {"a": (1, 2), "b": 3}
    assert tree_paths(tree, is_leaf=lambda x: isinstance(x, tuple)) == ["a", "b"]


def test_map_with_path_passes_path_and_rest():
    out = map_with_path(lambda p, x, y: (p, x + y), {"a": 1, "b": [2]}, {"a": 10, "b": [20]})
    assert out == {"a": ("a", 11), "b": [("b/0", 22)]}


class Block(nnx.Module):
    def __init__(self, rngs):
        self.attn = nnx.Linear(4, 4, rngs=rngs)
        self.norm = nnx.LayerNorm(4, rngs=rngs)


class Model(nnx.Module):
    def __init__(self, rngs):
        self.layers = nnx.List([Block(rngs) for _ in range(2)])
        self.head = nnx.Linear(4, 2, use_bias=False, rngs=rngs)


def test_nnx_state_paths_have_no_value_suffix():
    state = nnx.state(Model(nnx.Rngs(0)))
    paths = tree_paths(state)
    assert "layers/0/attn/kernel" in paths
    assert "layers/1/norm/scale" in paths
    assert "head/kernel" in paths
    assert not any(p.endswith("value") for p in paths)
    # keeping Variables whole gives the same paths
    assert tree_paths(state, is_leaf=lambda x: isinstance(x, nnx.Variable)) == paths


def test_linen_param_paths():
    params = nn.Dense(3).init(jax.random.key(0), jnp.ones((1, 2)))
    assert tree_paths(params) == ["params/bias", "params/kernel"]
