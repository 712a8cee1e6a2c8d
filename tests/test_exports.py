"""Every name a package lists in ``__all__`` exists (a missing import only fails at use)."""

import importlib

import pytest

PACKAGES = ["peft_jax", "peft_jax.methods", "peft_jax.hooks", "peft_jax.modules", "peft_jax.nnx",
            "peft_jax.linen", "peft_jax.sites", "peft_jax.train", "peft_jax.io", "peft_jax.models",
            "peft_jax.data"]


@pytest.mark.parametrize("package", PACKAGES)
def test_all_names_resolve(package):
    module = importlib.import_module(package)
    names = getattr(module, "__all__", None)
    if names is None:
        pytest.skip(f"{package} has no __all__")
    missing = [n for n in names if not hasattr(module, n)]
    assert not missing, f"{package}.__all__ lists names it does not define: {missing}"
    assert len(names) == len(set(names)), f"{package}.__all__ repeats names"
