"""Where a model's residual taps sit in AdapterHub's state-dict names, and the ``adapter_config.json``
fields of a bottleneck adapter (AdapterHub ``adapters`` 1.3.0, ``BnConfig``).

An `AhKeyMap` translates both ways between one of our tap paths (``encoder/layer/0/output/residual``)
and the AdapterHub module that holds the adapter there (``bert.encoder.layer.0.output``), and says
which AdapterHub location (``mh_adapter`` after attention, ``output_adapter`` after the FFN) that is.
`BERT_KEYS` is the map of `peft_jax.models.encoder` (BERT, RoBERTa-style encoders saved by
``BertAdapterModel``: keys start with ``bert.``; keys without that prefix, as a bare ``BertModel``
writes them, are read too).

Example:
    >>> BERT_KEYS.module("encoder/layer/1/attention/output/residual")
    'bert.encoder.layer.1.attention.output'
    >>> BERT_KEYS.path("encoder.layer.1.output"), BERT_KEYS.location("bert.encoder.layer.1.output")
    ('encoder/layer/1/output/residual', ('output_adapter', 1))
"""

from __future__ import annotations

import dataclasses
import re

from peft_jax.methods.bottleneck import Bottleneck
from peft_jax.methods.phm import Phm

__all__ = ["AH_ONLY_FIELDS", "AhKeyMap", "BERT_KEYS", "BN_FIELDS", "LOCATION_KEYS", "PHM_FIELDS"]

#: `Bottleneck` options that are ``BnConfig`` fields of the same name and meaning.
BN_FIELDS = tuple(f.name for f in dataclasses.fields(Bottleneck) if f.name not in ("phm", "features",
                                                                                   "bottleneck_size"))
#: `Phm` options (``BnConfig``'s ``phm_*`` fields and friends).
PHM_FIELDS = tuple(f.name for f in dataclasses.fields(Phm))
#: ``BnConfig`` fields with no option of ours: where the adapters go and what we do not build.
AH_ONLY_FIELDS = ("mh_adapter", "output_adapter", "cross_adapter", "leave_out", "phm_layer", "inv_adapter",
                  "inv_adapter_reduction_factor")
#: Our residual roles -> AdapterHub's location flags.
LOCATION_KEYS = {"attention": "mh_adapter", "ffn": "output_adapter"}

_BERT_PATH = re.compile(r"(?:.*/)?encoder/layer/(\d+)/(attention/output|output)/residual")
_BERT_MODULE = re.compile(r"(?:bert\.)?encoder\.layer\.(\d+)\.(attention\.output|output)")


@dataclasses.dataclass(frozen=True)
class AhKeyMap:
    """Our tap paths <-> AdapterHub module names for one model family.

    Attributes:
        prefix: the AdapterHub model's base-model prefix with its dot (``"bert."``); shared
            parameters are written as ``<prefix>shared_parameters.<adapter>.<param>``.
        path_re: matches one of our residual tap paths; groups ``(layer index, sub-layer)``.
        module_re: matches an AdapterHub module name; groups ``(layer index, sub-layer)``.
        attention: the sub-layer group value of the block after attention (``mh_adapter``).
        ffn: the sub-layer group value of the block after the FFN (``output_adapter``).

    Example:
        >>> BERT_KEYS.module("classifier/dense") is None
        True
    """

    prefix: str
    path_re: re.Pattern
    module_re: re.Pattern
    attention: tuple[str, str]  # (our sub-layer segment, AdapterHub's)
    ffn: tuple[str, str]

    def module(self, path: str) -> str | None:
        """The AdapterHub module holding the adapter at our tap ``path``, or ``None``."""
        m = self.path_re.fullmatch(path)
        if m is None:
            return None
        ah = {self.attention[0]: self.attention[1], self.ffn[0]: self.ffn[1]}[m.group(2)]
        return f"{self.prefix}encoder.layer.{m.group(1)}.{ah}"

    def path(self, module: str) -> str | None:
        """Our tap path for an AdapterHub module name (with or without `prefix`), or ``None``."""
        m = self.module_re.fullmatch(module)
        if m is None:
            return None
        ours = {self.attention[1]: self.attention[0], self.ffn[1]: self.ffn[0]}[m.group(2)]
        return f"encoder/layer/{m.group(1)}/{ours}/residual"

    def module_at(self, flag: str, index: int) -> str:
        """The AdapterHub module of location ``flag`` (``"mh_adapter"`` / ``"output_adapter"``) in layer ``index``.

        Example:
            >>> BERT_KEYS.module_at("mh_adapter", 3)
            'bert.encoder.layer.3.attention.output'
        """
        sub = self.attention[1] if flag == LOCATION_KEYS["attention"] else self.ffn[1]
        return f"{self.prefix}encoder.layer.{index}.{sub}"

    def location(self, module: str) -> tuple[str, int] | None:
        """``(AdapterHub location flag, layer index)`` of an AdapterHub module name, or ``None``."""
        m = self.module_re.fullmatch(module)
        if m is None:
            return None
        role = "attention" if m.group(2) == self.attention[1] else "ffn"
        return LOCATION_KEYS[role], int(m.group(1))


#: `peft_jax.models.encoder`'s residual taps in a ``BertAdapterModel``.
BERT_KEYS = AhKeyMap(prefix="bert.", path_re=_BERT_PATH, module_re=_BERT_MODULE,
                     attention=("attention/output", "attention.output"), ffn=("output", "output"))
