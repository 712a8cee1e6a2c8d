"""Stops an in-process ``peft-jax`` run right after it prints a given line."""

from __future__ import annotations

import pytest

from peft_jax import cli


class StopAfter(Exception):
    pass


def stop_after(monkeypatch, argv, line_start):
    """Runs ``peft-jax`` until it prints a line starting with ``line_start``, then dies there."""
    real_print = print

    def stopping_print(*args, **kwargs):
        real_print(*args, **kwargs)
        if args and str(args[0]).startswith(line_start):
            raise StopAfter

    monkeypatch.setattr("builtins.print", stopping_print)
    with pytest.raises(StopAfter):
        cli.main(argv)
    monkeypatch.undo()
