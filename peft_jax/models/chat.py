"""Chat prompts from a model's Jinja chat template (GGUF ``tokenizer.chat_template`` or HF's).

Templates are rendered the way transformers renders them, so prompts are identical: a sandboxed
Jinja environment with ``trim_blocks`` and ``lstrip_blocks``, the ``loopcontrols`` extension, a
``tojson`` filter that keeps non-ASCII text, and the globals ``raise_exception`` and
``strftime_now``; the variables are ``messages``, ``add_generation_prompt``, ``bos_token``,
``eos_token`` and any extra keyword. Needs PyPI ``jinja2`` (in ``peft-jax[models]``).

Example:
    >>> template = ("{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\\n{% endfor %}"
    ...             "{% if add_generation_prompt %}<|assistant|>{% endif %}")
    >>> print(render_chat(template, [{"role": "user", "content": "hi"}]))
    <|user|>hi
    <|assistant|>
"""

from __future__ import annotations

import datetime
import functools
import json
from collections.abc import Mapping, Sequence
from typing import Any

from peft_jax.errors import InvalidConfigError, MissingPackageError

__all__ = ["render_chat", "user_message"]


def user_message(prompt: str, system: str | None = None) -> list[dict[str, str]]:
    """A one-turn conversation: an optional system message, then the user's prompt.

    Example:
        >>> user_message("hi", system="be brief")
        [{'role': 'system', 'content': 'be brief'}, {'role': 'user', 'content': 'hi'}]
    """
    head = [] if system is None else [{"role": "system", "content": system}]
    return [*head, {"role": "user", "content": prompt}]


def render_chat(template: str, messages: Sequence[Mapping[str, Any]], *,
                add_generation_prompt: bool = True, bos_token: str = "", eos_token: str = "",
                **extra: Any) -> str:
    """Renders ``messages`` with a Jinja chat template.

    Args:
        template: The template source.
        messages: ``[{"role": "user", "content": "..."}, ...]``.
        add_generation_prompt: End with the header that starts the assistant's turn.
        bos_token: Text of the BOS token (templates often write it themselves).
        eos_token: Text of the EOS token.
        **extra: More template variables (``tools``, ``date_string``, ...).

    Returns:
        The prompt text; tokenize it without adding special tokens again.

    Raises:
        InvalidConfigError: Malformed messages, a template that does not parse, or one that
            rejects the conversation (its ``raise_exception`` message is included).
        MissingPackageError: ``jinja2`` is not installed.

    Example:
        >>> render_chat("{{ raise_exception('no system role') }}", [])
        Traceback (most recent call last):
        ...
        peft_jax.errors.InvalidConfigError: the chat template rejected the conversation: no system role
    """
    for i, m in enumerate(messages):
        if not isinstance(m, Mapping) or "role" not in m or "content" not in m:
            raise InvalidConfigError(
                f"message {i} must be a mapping with 'role' and 'content', got {m!r}")
    jinja2 = _jinja2()
    try:
        compiled = _compile(template)
    except jinja2.TemplateError as e:
        raise InvalidConfigError(f"the chat template does not parse: {e}") from e
    try:
        return compiled.render(messages=[dict(m) for m in messages],
                               add_generation_prompt=add_generation_prompt,
                               bos_token=bos_token, eos_token=eos_token, **extra)
    except _TemplateRejection as e:
        raise InvalidConfigError(f"the chat template rejected the conversation: {e}") from e
    except jinja2.TemplateError as e:
        raise InvalidConfigError(f"the chat template failed to render: {e}") from e


class _TemplateRejection(Exception):
    """Raised by a template's own ``raise_exception(...)``."""


def _raise(message: str) -> None:
    raise _TemplateRejection(message)


def _tojson(value: Any, ensure_ascii: bool = False, indent: int | None = None,
            separators: Any = None, sort_keys: bool = False) -> str:
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                      sort_keys=sort_keys)


def _strftime_now(fmt: str) -> str:
    return datetime.datetime.now().strftime(fmt)


def _jinja2():
    try:
        import jinja2  # noqa: PLC0415 (optional dependency)
    except ImportError as e:
        raise MissingPackageError("chat templates need PyPI jinja2: pip install jinja2 (or pip "
                                  "install 'peft-jax[models]')") from e
    return jinja2


@functools.lru_cache(maxsize=16)
def _compile(template: str):
    _jinja2()  # a clear error when it is missing
    from jinja2.sandbox import ImmutableSandboxedEnvironment  # noqa: PLC0415

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=["jinja2.ext.loopcontrols"])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise
    env.globals["strftime_now"] = _strftime_now
    return env.from_string(template)
