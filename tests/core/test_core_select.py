"""Selectors, first-match-wins rules, NoMatchError suggestions and the explain table."""

import numpy as np
import pytest

from peft_jax.core import Rules, compile_selector, explain, nearest_paths, select
from peft_jax.errors import InvalidConfigError, NoMatchError

MODULES = [f"layers/{i}/attn/{p}" for i in range(3) for p in ("q_proj", "k_proj", "v_proj")]
MODULES += [f"layers/{i}/mlp/{p}" for i in range(3) for p in ("up", "down")] + ["lm_head"]


def matches(selector, path, leaf=None):
    return compile_selector(selector)(path, leaf)


def test_name_rule_is_exact_or_slash_suffix():
    assert matches(["q_proj"], "q_proj")
    assert matches(["q_proj"], "layers/0/attn/q_proj")
    assert not matches(["q_proj"], "layers/0/attn/xq_proj")
    assert not matches(["q_proj"], "layers/0/attn/q_proj/kernel")  # a leaf path: name the leaf
    assert matches(["q_proj/kernel"], "layers/0/attn/q_proj/kernel")
    assert matches(("a", "b"), "x/b") and matches({"a"}, "x/a")


def test_string_is_a_whole_path_regex():
    assert matches(r".*q_proj", "layers/0/attn/q_proj")
    assert not matches("q_proj", "layers/0/attn/q_proj")
    assert not matches(r"layers/\d+/attn", "layers/0/attn/q_proj")  # fullmatch, not search
    assert matches(r"layers/[02]/attn/(q|v)_proj", "layers/2/attn/v_proj")


def test_none_callable_and_rules_selectors():
    assert not matches(None, "anything")
    assert matches(lambda p, x: x.ndim == 2, "w", np.zeros((2, 2)))
    assert not matches(lambda p, x: x.ndim == 2, "b", np.zeros(2))
    as_selector = Rules([(["norm"], False), (r".*", True)])
    assert not matches(as_selector, "layer/norm") and matches(as_selector, "layer/kernel")


def test_bad_selectors_raise_invalid_config():
    with pytest.raises(InvalidConfigError, match=r"\(unclosed"):
        compile_selector("(unclosed")
    with pytest.raises(InvalidConfigError, match="unsupported selector 3"):
        compile_selector(3)
    with pytest.raises(InvalidConfigError, match="pair"):
        Rules([("a", 1, 2)])


def test_rules_first_match_wins_with_default():
    rules = Rules([(["q_proj"], 16), (r".*attn.*", 8), (r".*mlp.*", 4)], default=2)
    assert rules.match("layers/0/attn/q_proj") == (0, 16)
    assert rules.match("layers/0/attn/k_proj") == (1, 8)
    assert rules.lookup("layers/0/mlp/up") == 4
    assert rules.match("lm_head") == (None, 2)
    assert len(rules) == 3 and "default=2" in repr(rules)


def test_rules_from_mapping_keep_order():
    rules = Rules({r".*_proj": 1, r".*q_proj": 2})
    assert rules.lookup("attn/q_proj") == 1
    assert rules.lookup("mlp/up") is None


def test_select_returns_matches_in_order():
    assert select(MODULES, ["q_proj", "lm_head"]) == [
        "layers/0/attn/q_proj", "layers/1/attn/q_proj", "layers/2/attn/q_proj", "lm_head"]


def test_select_on_pytree_and_items_passes_leaves():
    tree = {"dense": {"kernel": np.zeros((2, 3)), "bias": np.zeros(3)}}
    assert select(tree, lambda p, x: x.ndim == 2) == ["dense/kernel"]
    assert select([("a", np.zeros(1)), ("b", np.zeros((1, 1)))], lambda p, x: x.ndim == 2) == ["b"]


def test_no_match_error_names_selector_and_lists_nearest_paths():
    with pytest.raises(NoMatchError) as info:
        select(MODULES, ["q_prj"], what="LoRA target")
    message = str(info.value)
    assert "LoRA target" in message and "q_prj" in message
    listed = [line.strip() for line in message.splitlines() if line.startswith("  ")]
    assert 1 <= len(listed) <= 10 and set(listed) <= set(MODULES)
    assert listed[:3] == [f"layers/{i}/attn/q_proj" for i in range(3)]
    assert "explain(" in message
    assert isinstance(info.value, ValueError)


def test_no_match_error_hints_name_list_for_plain_string():
    with pytest.raises(NoMatchError, match=r"Did you mean the name list \['q_proj'\]"):
        select(MODULES, "q_proj")


def test_no_match_error_on_regex_and_empty_tree():
    with pytest.raises(NoMatchError, match="regex") as info:
        select(MODULES, r".*\.self_attn\.q_proj")
    assert "layers/0/attn/q_proj" in str(info.value)
    with pytest.raises(NoMatchError, match="empty"):
        select({}, r".*")


def test_nearest_paths_without_queries_lists_first_paths():
    assert nearest_paths(lambda p, x: False, MODULES, k=2) == MODULES[:2]
    assert nearest_paths(["dwn"], MODULES, k=1) == ["layers/0/mlp/down"]


def test_explain_rows_and_table():
    rules = Rules([(["q_proj"], 16), (r".*mlp.*", 4)], default=8)
    exp = explain(MODULES, rules)
    assert exp.rows[0] == ("layers/0/attn/q_proj", 0, 16)
    assert exp.rows[1] == ("layers/0/attn/k_proj", None, 8)
    assert ("layers/2/mlp/down", 1, 4) in exp.rows
    assert exp.matched == [p for p in MODULES if "q_proj" in p or "mlp" in p]
    text = str(exp)
    assert "[0] names ['q_proj'] -> 16" in text and "[-] default -> 8" in text
    lines = text.splitlines()
    header = lines.index("path".ljust(len("layers/0/attn/q_proj")) + "  rule  value")
    rows = lines[header + 1:]
    assert len(rows) == len(MODULES)
    assert rows[0] == "layers/0/attn/q_proj     0  16"
    assert rows[-1] == "lm_head                  -  8"


def test_explain_plain_selector_on_pytree():
    tree = {"attn": {"q_proj": {"kernel": np.zeros((2, 2))}}, "norm": {"scale": np.ones(2)}}
    exp = explain(tree, r".*scale")
    assert exp.rows == [("attn/q_proj/kernel", None, False), ("norm/scale", 0, True)]
    assert "regex '.*scale' -> True" in str(exp)
