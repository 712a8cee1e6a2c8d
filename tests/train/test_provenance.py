"""The environment recorded with every result: real versions, the checkout's commit, the CPU."""

import re
import subprocess

import jax

from peft_jax.train import provenance


def test_versions_and_machine_are_the_running_ones():
    env = provenance.run_environment()
    assert env["versions"]["jax"] == jax.__version__ and env["versions"]["flax"]
    assert env["device_kind"] == jax.devices()[0].device_kind and env["device_count"] == jax.device_count()
    assert env["cpu_model"] and env["peak_rss_bytes"] > 10 * 2**20  # jax alone takes more than 10 MiB


def test_git_revision_of_a_checkout_and_outside_one(tmp_path):
    assert provenance.git_revision(tmp_path) is None
    subprocess.run(["git", "init", "-q", str(tmp_path)], check=True)
    (tmp_path / "f").write_text("a")
    git = ["git", "-C", str(tmp_path), "-c", "user.name=t", "-c", "user.email=t@t"]
    subprocess.run([*git, "add", "f"], check=True)
    subprocess.run([*git, "commit", "-q", "-m", "m"], check=True)
    rev = provenance.git_revision(tmp_path)
    assert re.fullmatch(r"[0-9a-f]{40}", rev)
    (tmp_path / "f").write_text("b")
    assert provenance.git_revision(tmp_path) == rev + "+dirty"
