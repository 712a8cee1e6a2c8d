"""Our module paths <-> HF module names.

A key map is any object with ``to_hf(path) -> str`` and ``to_ours(name) -> str``; `KeyMap` is the
ready-made kind: "/" becomes ".", and ``prefix`` is added to every path whose first segment is not in
``bare`` (the decoder: ``layers/0/self_attn/q_proj`` <-> ``model.layers.0.self_attn.q_proj``, but
``lm_head`` stays ``lm_head``).

Example:
    >>> DECODER.to_hf("layers/0/self_attn/q_proj"), DECODER.to_ours("lm_head")
    ('model.layers.0.self_attn.q_proj', 'lm_head')
    >>> ENCODER.to_ours("bert.encoder.layer.0.attention.self.query")
    'bert/encoder/layer/0/attention/self/query'
"""

from __future__ import annotations

import dataclasses

from peft_jax import errors

__all__ = ["DECODER", "ENCODER", "ROOT", "KeyMap", "for_architecture"]

#: the key prefix of a PeftModel's tuner (PeftModel -> LoraModel -> the HF model) in its files.
ROOT = "base_model.model."


@dataclasses.dataclass(frozen=True)
class KeyMap:
    """See the module docstring."""

    prefix: str = ""
    bare: tuple[str, ...] = ()

    def to_hf(self, path: str) -> str:
        """HF's dotted module name of our ``path``."""
        first = path.split("/")[0]
        return ("" if first in self.bare else self.prefix) + path.replace("/", ".")

    def to_ours(self, name: str) -> str:
        """Our module path of HF's ``name``."""
        if self.prefix and name.startswith(self.prefix):
            name = name[len(self.prefix):]
        return name.replace(".", "/")


DECODER = KeyMap(prefix="model.", bare=("lm_head",))
ENCODER = KeyMap()
_BY_ARCH = {"Decoder": DECODER, "Encoder": ENCODER, "EncoderForSequenceClassification": ENCODER}


def for_architecture(architecture: str) -> KeyMap:
    """The map of a reference model by its class name; a typed error for others.

    Example:
        >>> for_architecture("Decoder") is DECODER
        True
    """
    architecture = architecture.rsplit(".", 1)[-1]  # "peft_jax.models.decoder.Decoder" -> "Decoder"
    if architecture not in _BY_ARCH:
        raise errors.InvalidConfigError(
            f"no HF key map is known for {architecture!r}; pass key_map= (an object with to_hf(path) and "
            "to_ours(name), e.g. peft_jax.io.hf_peft.KeyMap(prefix=...))")
    return _BY_ARCH[architecture]
