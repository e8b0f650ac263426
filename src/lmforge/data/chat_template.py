"""A model's own chat template: how an imported instruct model (Qwen2.5-Instruct, Llama 3.x-Instruct,
SmolLM2-Instruct, ...) expects a conversation to be written. Hugging Face keeps it as a Jinja program in
tokenizer_config.json (or chat_template.jinja), GGUF as tokenizer.chat_template; lmforge keeps it with the tokenizer
(Tokenizer.chat_template), so it travels into fine-tuned runs and out again through every export.

It is rendered as transformers' apply_chat_template renders it: Jinja with `messages` ([{"role", "content"}, ...];
an assistant turn may hold `tool_calls`, a tool turn answers one: data.conversation), `tools` (function tools, or
None), `add_generation_prompt` (end with the header of the assistant's reply), `bos_token`, `eos_token`,
`raise_exception`, `strftime_now`, transformers' `tojson` (keys kept in order, no HTML escapes) and its
`{% generation %}` blocks. A template is data from a file, so it runs in Jinja's immutable sandbox: it reads what it is
given and calls those functions, never Python's internals.

A model trained by lmforge on chat records has lmforge's own format instead (data.tasks.CHAT_TEMPLATE); to_jinja
writes that format as a Jinja chat template, for exports.
"""

from __future__ import annotations

import functools
import json
import string
from datetime import datetime
from typing import Any, Optional, Sequence

from lmforge.errors import ConfigError

# Probe contents for user_header: plain words no template changes and no real conversation holds.
_ASKED, _ANSWERED, _ASKED_AGAIN = "lmforgeprobeasked", "lmforgeprobeanswered", "lmforgeprobeaskedagain"


class _TemplateRaised(Exception):
    """raise_exception() called by a template (its own message about the conversation)."""


def _raise_exception(message: str) -> None:
    raise _TemplateRaised(message)


def _tojson(value: Any, ensure_ascii: bool = False, indent: Optional[int] = None, separators: Any = None,
            sort_keys: bool = False) -> str:
    """transformers' tojson filter: json.dumps as it is (keys in their order, no HTML escapes), not Jinja's own."""
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _generation_tag() -> Any:
    """The {% generation %} ... {% endgeneration %} block transformers' templates may mark the assistant's text
    with (for its assistant masks): rendered as its body."""
    from jinja2 import nodes
    from jinja2.ext import Extension

    class Generation(Extension):
        tags = {"generation"}

        def parse(self, parser: Any) -> Any:
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            return nodes.Scope(body, lineno=lineno)

    return Generation


@functools.lru_cache(maxsize=8)
def _compiled(source: str) -> Any:
    from jinja2 import TemplateError
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=["jinja2.ext.loopcontrols", _generation_tag()])
    env.filters["tojson"] = _tojson
    env.globals.update(raise_exception=_raise_exception,
                       strftime_now=lambda fmt: datetime.now().strftime(fmt))
    try:
        return env.from_string(source)
    except TemplateError as e:
        raise ConfigError(f"the model's chat template is not valid Jinja ({type(e).__name__}: {e}); fix "
                          "chat_template in its tokenizer files") from None


RESERVED = ("messages", "tools", "add_generation_prompt", "bos_token", "eos_token")  # what render itself sets


def render(source: str, messages: Sequence[dict], *, add_generation_prompt: bool = True,
           bos_token: Optional[str] = None, eos_token: Optional[str] = None,
           tools: Optional[Sequence[dict]] = None, variables: Optional[dict[str, Any]] = None) -> str:
    """The conversation as the template writes it (ConfigError, in one line, when the template refuses the
    conversation or fails). tools: function tools the template may list (transformers' apply_chat_template(tools=...):
    [{"type": "function", "function": {...}}]; None when there are none, as there). variables: other values the
    template reads, as apply_chat_template's extra keyword arguments (Qwen3's enable_thinking)."""
    from jinja2 import TemplateError
    from jinja2.exceptions import SecurityError

    template = _compiled(source)
    taken = sorted(set(variables or {}) & set(RESERVED))
    if taken:
        raise ConfigError(f"chat template variables may not set {', '.join(taken)}: lmforge sets them from the "
                          "conversation")
    try:
        return template.render(**(variables or {}), messages=list(messages), tools=list(tools) if tools else None,
                               add_generation_prompt=add_generation_prompt, bos_token=bos_token or "",
                               eos_token=eos_token or "")
    except _TemplateRaised as e:
        raise ConfigError(f"the model's chat template refuses this conversation: {e}") from None
    except SecurityError as e:
        raise ConfigError(f"the model's chat template tried something its sandbox forbids ({e}); lmforge runs "
                          "chat templates only as data") from None
    except (TemplateError, TypeError, ValueError, KeyError, IndexError, AttributeError) as e:
        raise ConfigError(f"the model's chat template failed on this conversation ({type(e).__name__}: {e})") from None


def user_header(source: str, bos_token: Optional[str] = None, eos_token: Optional[str] = None) -> str:
    """The text that opens a user turn after an assistant's reply (a model that runs on past its reply writes it
    next: a stop string). Found by rendering probe conversations: what comes between an answer and the next
    question, less what the template writes after an answer that ends the conversation."""
    kw = dict(add_generation_prompt=False, bos_token=bos_token, eos_token=eos_token)
    asked = {"role": "user", "content": _ASKED}
    answered = {"role": "assistant", "content": _ANSWERED}
    longer = render(source, [asked, answered, {"role": "user", "content": _ASKED_AGAIN}], **kw)
    shorter = render(source, [asked, answered], **kw)
    if _ANSWERED not in longer or _ASKED_AGAIN not in longer:
        raise ConfigError("the model's chat template leaves out the messages' content; it cannot be used to chat")
    between = longer[longer.rindex(_ANSWERED) + len(_ANSWERED):longer.rindex(_ASKED_AGAIN)]
    after = shorter[shorter.rindex(_ANSWERED) + len(_ANSWERED):] if _ANSWERED in shorter else ""
    header = between[len(after):] if after and between.startswith(after) else between
    return header if header.strip() else between


def to_jinja(turn: str, reply: str) -> str:
    """lmforge's format-string chat template (data.tasks.CHAT_TEMPLATE: a turn with {role} and {content}, the reply's
    header) as a Jinja chat template that renders the same text. Literal text is written as Jinja string expressions,
    which trim_blocks and lstrip_blocks (on in transformers) leave alone."""
    def literal(text: str) -> str:
        return "{{ " + json.dumps(text, ensure_ascii=False) + " }}" if text else ""

    def fields(text: str) -> str:  # a format string's literal text (braces unescaped) and its {role}/{content}
        return "".join(literal(piece) + ("{{ message['" + name + "'] }}" if name is not None else "")
                       for piece, name, _, _ in string.Formatter().parse(text))

    return ("{% for message in messages %}" + fields(turn) + "{% endfor %}"
            "{% if add_generation_prompt %}" + literal(reply) + "{% endif %}")
