"""Settings of a `peft-jax train` run: one validated dataclass, a config file, flag overrides.

Precedence: the defaults below < a JSON or YAML config file < command-line flags. Keys may be
written with ``-`` or ``_`` (``batch-size`` or ``batch_size``). Every check here is pure: nothing
is loaded, compiled or written.

Example:
    >>> s = TrainSettings.from_sources({"rank": 4}, {"lr": 1e-3, "layers": None})
    >>> s.rank, s.lr, s.model
    (4, 0.001, 'minilm-l6')
    >>> TrainSettings(targets="query,value").target_selector()
    ['query', 'value']
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from peft_jax import errors
from peft_jax.train.layers import check_layers, parse_layers, restrict_to_layers
from peft_jax.train.sharding import AXES

__all__ = ["DECODER_TARGET_PRESETS", "LM_DEFAULTS", "PRESETS", "TARGET_PRESETS", "TrainSettings",
           "load_config_file", "parse_mesh"]

# Named target sets for BERT-family encoders (peft_jax.models.encoder module names).
TARGET_PRESETS: dict[str, list[str]] = {
    "attention": ["query", "key", "value", "attention/output/dense"],
    "all-linear": ["query", "key", "value", "attention/output/dense", "intermediate/dense",
                   "output/dense"],
}
# The same presets for decoders (peft_jax.models.decoder module names, LLaMA / Gemma layout).
DECODER_TARGET_PRESETS: dict[str, list[str]] = {
    "attention": ["q_proj", "k_proj", "v_proj", "o_proj"],
    "all-linear": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
}
PRESETS = {"encoder": TARGET_PRESETS, "decoder": DECODER_TARGET_PRESETS}
# A decoder (causal language model) run starts from these where neither file nor flag sets them:
# adapters on every layer, no head trained, the Austen novels in blocks of 256 tokens, and
# perplexity read on at most 64 held-out blocks (a CPU can afford it at every evaluation).
LM_DEFAULTS: dict[str, Any] = {
    "data": "austen", "layers": None, "modules_to_save": "", "lr": 5e-4, "epochs": 1.0,
    "batch_size": 8, "eval_batch_size": 8, "max_length": 256, "bucket": 64,
    "val_fraction": 0.05, "test_fraction": 0.05, "eval_rows": 64, "steps": 200,
}
_REGEX_CHARS = set(".*+?()[]{}|^$\\")


@dataclasses.dataclass(frozen=True, kw_only=True)
class TrainSettings:
    """Everything a training run needs to know, validated when built.

    The defaults are the default run of ``peft-jax train``: LoRA rank 8 on every linear layer
    (query, key, value, attention output, FFN in and out) of the top three of MiniLM-L6's six
    layers, the classifier trained fully, its head started from the linear probe; 2 epochs at
    peak learning rate 3e-3. The three frozen lower layers run once per example (prefix cache),
    so the run fits in about ten minutes on two CPU cores. The choice came from a small sweep on
    the fine-food reviews: rank 8 on query/value of the top three layers reached 0.805 test
    accuracy after 3 epochs, all linear layers of the top three 0.838-0.844, of the top four
    (rank 6) 0.838 at a third more compute.

    Attributes:
        model: a registered model name (`peft_jax.models.known_names`) or an HF-layout directory.
        data: a registered dataset name (`peft_jax.data.known_datasets`), a CSV / TSV / JSONL
            table, or a directory of ``train`` and ``test`` tables (`peft_jax.data.tables`).
        text_column, label_column: the table's columns holding the text and the class.
        val_fraction: the seeded share of training examples held out as the validation split,
            which periodic evaluation reads (0: no validation split, no periodic evaluation).
            The test split is evaluated once, after the last step.
        test_fraction: for a single table file, the seeded share of rows held out for testing.
        method: the PEFT method, a `peft_jax.train.method_choice.METHOD_CHOICES` name (``lora``,
            ``dora``, ``ia3``, ``vera``, ``seq_bn``, ``compacter``, ``prefix``, ...).
        method_options: the method's own options (``{"rank": 4}`` for ``vera``; the fields of its
            config, as ``--<method>.<field>`` flags); LoRA variants use ``rank`` / ``alpha`` /
            ``lora_dropout`` instead.
        rank, alpha, lora_dropout: LoRA hyper-parameters (scale = alpha / rank).
        targets: comma-separated module names, a preset (`TARGET_PRESETS`), or a regex.
        layers: which encoder layers get adapters: ``"top:3"`` (the three highest), ``"3-5"``,
            ``"0,2"`` (HF PEFT's ``layers_to_transform``), or ``"all"``/``None``
            (`peft_jax.train.layers`).
        modules_to_save: modules trained fully (the classifier head).
        steps: number of optimizer steps; ``None`` derives it from ``epochs``.
        epochs: passes over the training set when ``steps`` is not given.
        batch_size, lr, weight_decay, warmup: optimizer settings (AdamW, linear warmup over the
            ``warmup`` fraction of steps, then linear decay to zero).
        eval_every: evaluate every this many steps (``None``: once per epoch; 0: only at the end).
        log_every: a progress line every this many steps.
        eval_batch_size: examples per evaluation forward pass.
        early_stopping: stop when the validation loss has not improved for this many periodic
            evaluations in a row (0: never; `peft_jax.train.early_stopping`).
        eval_rows: evaluate on at most this many rows of each held-out split, the first ones
            (``None``: all of them).
        max_length: tokens per text after truncation (a language model's block length).
        bucket: padded lengths are multiples of this (fewer shapes = fewer compiles).
        head_init: ``"probe"`` starts the classifier from the linear probe fit on frozen features
            (LP-FT, Kumar et al. 2022, arXiv:2202.10054); ``"random"`` from a fresh init.
        model_dropout: run the base model's own dropout while training.
        cache_prefix: when adapters sit only on upper layers, run the frozen lower layers once
            per example and train from their cached output (`peft_jax.train.prefix_cache`).
        seed: seeds LoRA init, the head, shuffling and dropout.
        mesh: train over a device mesh, e.g. ``"data=8"`` or ``"data=2,fsdp=4"`` (axes
            ``data``, ``fsdp``, ``tensor``; one size may be ``-1``); ``None``: one device.
        save_every: save a training checkpoint (adapter, optimizer state, step, RNG, data
            position) to ``out/checkpoints`` every this many steps and after the last one
            (0: only after the last one).
        keep: how many checkpoints to keep.
        resume: continue the run in ``out`` from its newest checkpoint; the run's settings must
            match those it was started with (`fingerprint`), except the operational ones.
        out: output directory (``None``: ``runs/<timestamp>``).
        overwrite: allow ``out`` to be a non-empty directory (its old checkpoints are deleted
            when training starts).
    """

    model: str = "minilm-l6"
    data: str = "fine-foods"
    text_column: str = "text"
    label_column: str = "label"
    val_fraction: float = 0.1
    test_fraction: float = 0.2
    method: str = "lora"
    method_options: dict[str, Any] = dataclasses.field(default_factory=dict)
    rank: int = 8
    alpha: float = 16.0
    lora_dropout: float = 0.0
    targets: str = "all-linear"
    layers: str | None = "top:3"
    modules_to_save: str = "classifier"
    steps: int | None = None
    epochs: float = 2.0
    batch_size: int = 32
    lr: float = 3e-3
    weight_decay: float = 0.01
    warmup: float = 0.06
    eval_every: int | None = None
    log_every: int = 10
    eval_batch_size: int = 64
    max_length: int = 128
    bucket: int = 32
    eval_rows: int | None = None
    early_stopping: int = 0
    head_init: str = "probe"
    model_dropout: bool = False
    cache_prefix: bool = True
    seed: int = 0
    mesh: str | None = None
    save_every: int = 100
    keep: int = 2
    resume: bool = False
    out: str | None = None
    overwrite: bool = False

    def __post_init__(self) -> None:
        from peft_jax.train.method_choice import METHOD_CHOICES  # noqa: PLC0415 (no import cycle)

        if self.method not in METHOD_CHOICES:
            raise errors.UnknownNameError(
                f"unknown method {self.method!r}; known methods: {sorted(METHOD_CHOICES)}")
        if not isinstance(self.method_options, Mapping) or not all(
                isinstance(k, str) for k in self.method_options):
            raise errors.InvalidConfigError("method_options must map option names to values")
        positive_ints = ("rank", "batch_size", "log_every", "eval_batch_size", "max_length",
                         "bucket")
        for name in positive_ints:
            _check_int(name, getattr(self, name), minimum=1)
        _check_int("seed", self.seed, minimum=0)
        _check_int("save_every", self.save_every, minimum=0)
        _check_int("keep", self.keep, minimum=1)
        if self.mesh is not None:
            parse_mesh(self.mesh)
        if self.resume and self.overwrite:
            raise errors.InvalidConfigError(
                "resume and overwrite exclude each other: resume continues the run in --out, "
                "overwrite starts it afresh")
        if self.steps is not None:
            _check_int("steps", self.steps, minimum=1)
        if self.eval_every is not None:
            _check_int("eval_every", self.eval_every, minimum=0)
        if self.eval_rows is not None:
            _check_int("eval_rows", self.eval_rows, minimum=1)
        _check_int("early_stopping", self.early_stopping, minimum=0)
        if self.early_stopping and (self.val_fraction == 0 or self.eval_every == 0):
            raise errors.InvalidConfigError(
                "early stopping watches the validation loss at each periodic evaluation: it needs "
                "val_fraction > 0 and eval_every != 0")
        for name, low, high in (("alpha", 0.0, None), ("lr", 0.0, None), ("epochs", 0.0, None)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > low:
                raise errors.InvalidConfigError(f"{name} must be a number > {low}, got {value!r}")
        for name in ("lora_dropout", "weight_decay", "warmup", "val_fraction", "test_fraction"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < 1:
                raise errors.InvalidConfigError(f"{name} must be in [0, 1), got {value!r}")
        if self.head_init not in ("probe", "random"):
            raise errors.InvalidConfigError(
                f"head_init must be 'probe' or 'random', got {self.head_init!r}")
        for name in ("model", "data", "targets", "text_column", "label_column"):
            if not isinstance(getattr(self, name), str) or not getattr(self, name):
                raise errors.InvalidConfigError(f"{name} must be a non-empty string")
        if not isinstance(self.modules_to_save, str):
            raise errors.InvalidConfigError("modules_to_save must be a string ('' for none)")
        if self.layers is not None and not isinstance(self.layers, str):
            raise errors.InvalidConfigError(f"layers must be a string such as '3-5', got "
                                            f"{self.layers!r}")
        check_layers(self.layers)
        for name in ("model_dropout", "cache_prefix", "overwrite", "resume"):
            if not isinstance(getattr(self, name), bool):
                raise errors.InvalidConfigError(f"{name} must be true or false")

    # --- derived values ---------------------------------------------------------------------
    def target_selector(self, num_layers: int | None = None, family: str = "encoder"
                        ) -> str | list[str]:
        """``targets`` as a `peft_jax.LoraConfig` selector (a preset of the model ``family``, a
        name list, or a regex), restricted to ``layers`` (resolved against ``num_layers``, the
        model's layer count).

        Example:
            >>> TrainSettings(targets="query", layers="top:1").target_selector(num_layers=6)
            '(?:.*/)?layers?/(?:5)/(?:.*/)?(?:query)'
            >>> TrainSettings(targets="attention", layers=None).target_selector(family="decoder")
            ['q_proj', 'k_proj', 'v_proj', 'o_proj']
        """
        return restrict_to_layers(_selector(self.targets, PRESETS[family]),
                                  parse_layers(self.layers, num_layers))

    def modules_to_save_selector(self) -> str | list[str]:
        """``modules_to_save`` as a selector (``[]`` for ``""``)."""
        return _selector(self.modules_to_save, {})

    def to_dict(self) -> dict[str, Any]:
        """The settings as a JSON-friendly dict."""
        return dataclasses.asdict(self)

    def fingerprint(self) -> dict[str, Any]:
        """The settings that shape the training trajectory; a resumed run must match them.

        Left out are the operational ones (output, logging, evaluation, checkpointing, mesh).

        Example:
            >>> TrainSettings(out="a", log_every=5).fingerprint() == TrainSettings().fingerprint()
            True
        """
        return {k: v for k, v in self.to_dict().items() if k not in _OPERATIONAL}

    def mesh_shape(self) -> dict[str, int] | None:
        """``mesh`` as axis sizes (``None``: no mesh)."""
        return None if self.mesh is None else parse_mesh(self.mesh)

    # --- construction -----------------------------------------------------------------------
    @classmethod
    def field_names(cls) -> list[str]:
        """The accepted setting names."""
        return [f.name for f in dataclasses.fields(cls)]

    @classmethod
    def from_sources(cls, file_values: Mapping[str, Any] | None = None,
                     overrides: Mapping[str, Any] | None = None, *, family: str = "encoder"
                     ) -> TrainSettings:
        """Defaults (with `LM_DEFAULTS` over them for a ``"decoder"`` family), then
        ``file_values`` (a config file), then ``overrides`` (flags).

        ``None`` values in ``overrides`` mean "not given" and are skipped.

        Example:
            >>> s = TrainSettings.from_sources({}, {"model": "smollm2-135m"}, family="decoder")
            >>> s.data, s.layers, s.max_length
            ('austen', None, 256)

        Raises:
            InvalidConfigError: an unknown key or a bad value (the key is named).
            UnknownNameError: an unknown method.
        """
        values: dict[str, Any] = dict(LM_DEFAULTS) if family == "decoder" else {}
        for source in (file_values or {}), (overrides or {}):
            for key, value in source.items():
                name = str(key).replace("-", "_")
                if name not in cls.field_names():
                    raise errors.InvalidConfigError(
                        f"unknown setting {key!r}; known settings: {cls.field_names()}")
                if value is None and source is overrides:
                    continue
                values[name] = _coerce(name, value)
        return cls(**values)


_OPERATIONAL = ("out", "overwrite", "resume", "save_every", "keep", "log_every", "eval_every",
                "eval_batch_size", "mesh")


def parse_mesh(text: str) -> dict[str, int]:
    """``"data=2,fsdp=4"`` -> ``{"data": 2, "fsdp": 4}`` (sizes are checked by `make_mesh`).

    Example:
        >>> parse_mesh("data=2, tensor=-1")
        {'data': 2, 'tensor': -1}
    """
    shape = {}
    for part in filter(None, (p.strip() for p in str(text).split(","))):
        name, _, size = part.partition("=")
        try:
            shape[name.strip()] = int(size)
        except ValueError:
            raise errors.MeshError(
                f"mesh {text!r}: {part!r} is not AXIS=SIZE; write e.g. 'data=2,fsdp=4' with axes "
                "data, fsdp, tensor") from None
    unknown = sorted(set(shape) - set(AXES))
    if not shape or unknown:
        raise errors.MeshError(f"mesh {text!r}: unknown or missing axes {unknown}; the axes are "
                               f"{', '.join(AXES)} (e.g. 'data=2,fsdp=4')")
    return shape


def _selector(text: str, presets: Mapping[str, list[str]]) -> str | list[str]:
    if text in presets:
        return list(presets[text])
    if set(text) & _REGEX_CHARS:
        return text
    return [t.strip() for t in text.split(",") if t.strip()]


def _coerce(name: str, value: Any) -> Any:
    """Accepts a YAML/JSON list for the selector fields and ints for float fields."""
    if name in ("targets", "modules_to_save") and isinstance(value, (list, tuple)):
        if not all(isinstance(v, str) for v in value):
            raise errors.InvalidConfigError(f"{name} must be a list of strings, got {value!r}")
        return ",".join(value)
    if name == "mesh" and isinstance(value, Mapping):
        return ",".join(f"{axis}={size}" for axis, size in value.items())
    if name == "layers" and isinstance(value, (int, list, tuple)) and not isinstance(value, bool):
        return ",".join(str(v) for v in (value if isinstance(value, (list, tuple)) else [value]))
    if name in ("alpha", "lr", "epochs", "lora_dropout", "weight_decay", "warmup",
                "val_fraction", "test_fraction") and (
            isinstance(value, int) and not isinstance(value, bool)):
        return float(value)
    return value


def _check_int(name: str, value: Any, *, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise errors.InvalidConfigError(f"{name} must be an integer >= {minimum}, got {value!r}")


def load_config_file(path: str | os.PathLike) -> dict[str, Any]:
    """Reads a JSON (``.json``) or YAML (``.yaml`` / ``.yml``) config file into a dict.

    Raises:
        InvalidConfigError: no such file, an unknown extension, a parse error, or not a mapping.
        MissingPackageError: a YAML file without PyYAML installed.

    Example:
        >>> import json, pathlib, tempfile
        >>> p = pathlib.Path(tempfile.mkdtemp()) / "run.json"
        >>> _ = p.write_text(json.dumps({"rank": 4, "targets": ["query", "value"]}))
        >>> load_config_file(p)
        {'rank': 4, 'targets': ['query', 'value']}
    """
    path = Path(path)
    if not path.is_file():
        raise errors.InvalidConfigError(f"config file {path} does not exist")
    suffix = path.suffix.lower()
    text = path.read_text(encoding="utf-8")
    if suffix == ".json":
        try:
            values = json.loads(text)
        except ValueError as e:
            raise errors.InvalidConfigError(f"config file {path} is not valid JSON: {e}") from e
    elif suffix in (".yaml", ".yml"):
        try:
            import yaml  # noqa: PLC0415 (optional dependency)
        except ImportError as e:
            raise errors.MissingPackageError(
                "reading a YAML config needs PyYAML: pip install pyyaml (or use a .json file)"
            ) from e
        try:
            values = yaml.safe_load(text)
        except yaml.YAMLError as e:
            raise errors.InvalidConfigError(f"config file {path} is not valid YAML: {e}") from e
    else:
        raise errors.InvalidConfigError(
            f"config file {path} must end in .json, .yaml or .yml, not {suffix!r}")
    if values is None:
        values = {}
    if not isinstance(values, dict):
        raise errors.InvalidConfigError(
            f"config file {path} must hold a mapping of setting names to values, got "
            f"{type(values).__name__}")
    return values
