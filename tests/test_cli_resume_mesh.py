"""`peft-jax train --mesh`: a device mesh trains the same adapter as one device, and resumes
bitwise."""

from __future__ import annotations

import json

import numpy as np
import pytest
from train import resume_runs as rr
from train.stopping import stop_after

from peft_jax import cli


@pytest.fixture(scope="module")
def paths(tmp_path_factory):
    return rr.write_paths(tmp_path_factory)


def test_mesh_trains_the_same_adapter(tmp_path, paths):
    one = tmp_path / "one"
    assert cli.main(rr.argv(paths, one, 4)) == 0
    mesh = tmp_path / "mesh"
    assert cli.main(rr.argv(paths, mesh, 4, "--mesh", "data=2,fsdp=2,tensor=2")) == 0
    results = json.loads((mesh / "results.json").read_text())
    assert results["mesh"] == {"data": 2, "fsdp": 2, "tensor": 2}
    a, b = rr.adapter(one), rr.adapter(mesh)
    assert sorted(a) == sorted(b)
    for key in a:
        np.testing.assert_allclose(a[key], b[key], atol=1e-5, err_msg=key)


def test_resume_on_a_mesh_is_bitwise_exact(tmp_path, paths, monkeypatch):
    mesh = ("--mesh", "data=2,fsdp=2,tensor=2", "--save-every", "2")
    straight = tmp_path / "straight"
    assert cli.main(rr.argv(paths, straight, 6, *mesh)) == 0
    stopped = tmp_path / "stopped"
    stop_after(monkeypatch, rr.argv(paths, stopped, 6, *mesh), "step 3/6")
    assert cli.main(rr.argv(paths, stopped, 6, *mesh, "--resume")) == 0
    rr.assert_bitwise_equal(rr.adapter(straight), rr.adapter(stopped))
