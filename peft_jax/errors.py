"""Every user-facing exception of peft_jax.

All errors derive from :class:`PeftError`, so ``except peft_jax.errors.PeftError`` catches any
mistake the library reports. Each also derives from the builtin a Python user would expect
(``ValueError``, ``TypeError``, ``KeyError``, ``FileNotFoundError``), so existing handlers keep
working. Messages say what was wrong and what to do about it.

Example:
    >>> from peft_jax import errors
    >>> try:
    ...     raise errors.InvalidConfigError("rank must be > 0, got 0; pass rank=8")
    ... except errors.PeftError as e:
    ...     print(type(e).__name__)
    InvalidConfigError
"""

from __future__ import annotations


class PeftError(Exception):
    """Base class of every error peft_jax raises on bad input."""


# --- configuration and targeting -------------------------------------------------------------
class InvalidConfigError(PeftError, ValueError):
    """A configuration value is out of range or inconsistent (rank <= 0, alpha <= 0, ...)."""


class NoMatchError(PeftError, ValueError):
    """A selector or target pattern matched no path; the message lists the nearest real paths."""


class UnsupportedLayerError(PeftError, TypeError):
    """A selected layer has a type (or a setting) the method cannot adapt."""


class AdapterNameError(PeftError, KeyError):
    """An adapter name is already in use, or no adapter of that name exists."""

    def __str__(self) -> str:  # KeyError would otherwise print the message in quotes
        return str(self.args[0]) if self.args else ""


class StateError(PeftError, RuntimeError):
    """An operation does not fit the current state (e.g. unmerge of an adapter never merged)."""


class NotMergeableError(PeftError, TypeError):
    """A method whose effect cannot be folded into the base weights was asked to merge."""


class IncompatibleMethodsError(PeftError, ValueError):
    """Two methods were put on one site where they cannot compose; the message names both."""


# --- models, checkpoints, files --------------------------------------------------------------
class UnknownNameError(PeftError, KeyError):
    """An unknown model, dataset or method name; the message lists the known ones."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""


class MissingPackageError(PeftError, ImportError):
    """An optional package (a model's weights, a reader) is not installed; the message says how."""


class CheckpointError(PeftError, ValueError):
    """A checkpoint or model directory is missing, truncated, or disagrees with its config."""


class UnsupportedArchitectureError(PeftError, ValueError):
    """A model config names an architecture no reference model implements."""


class DataError(PeftError, ValueError):
    """A dataset file or table cannot be used: a missing column, no rows, blank labels, bytes
    that are not UTF-8, a single class; the message names the file and row."""


# --- training --------------------------------------------------------------------------------
class BatchError(PeftError, ValueError):
    """A batch lacks a field the loss needs or has a shape that does not fit the step."""


class MeshError(PeftError, ValueError):
    """A device mesh or sharding request does not fit the available devices or the arrays."""


class ResumeError(PeftError, ValueError):
    """A resume directory belongs to a different model or method configuration."""


class NonFiniteLossError(PeftError, FloatingPointError):
    """Training produced a NaN or infinite loss; the last good checkpoint is left as it was."""


class MissingHookError(PeftError, TypeError):
    """A method needs a tap the model does not place (an input, attention or residual tap)."""


class SequenceTooLongError(PeftError, ValueError):
    """Inputs plus virtual tokens exceed the positions the model can take."""
