"""Conversations with function tools, as chat templates read them.

A conversation is a list of turns {"role", "content"}. An assistant turn may call tools, instead of its text or
after it: "tool_calls", [{"type": "function", "function": {"name", "arguments"}}], the arguments a JSON object
(OpenAI's JSON text is read into one, as transformers' templates expect a dict); a "tool" turn holds a call's result
(its "tool_call_id" and "name", and any other key of a turn, are kept for templates that show them). Function tools
are [{"type": "function", "function": {"name", "description", "parameters"}}] (a bare {"name", ...} is wrapped), what
apply_chat_template(tools=...) passes to a template.

How a template writes them:
- a model's own Jinja template that writes calls (its source mentions tool_calls, as Qwen2.5's, Llama 3.1's and
  Mistral's do) gets the turns and the tools as transformers gives them, and writes them in its own format;
- any other template (lmforge's own chat format, or a Jinja one that knows no calls) reads an assistant turn's calls
  as its text, one JSON object {"name": ..., "arguments": {...}} per line after any text (the form lmforge's server
  decodes calls in), and lmforge's own format lists the tools in a first turn of role "tools", one function's JSON
  per line (for a model fine-tuned with lmforge, whose records may have listed them; not for a model never
  fine-tuned on conversations, which knows no such turn).
"""

from __future__ import annotations

import json
from typing import Any, Optional

from lmforge.errors import ConfigError

CALL_SHAPE = ('a tool call is {"id": ..., "type": "function", "function": {"name": ..., "arguments": '
              '<a JSON object or its JSON text>}}')


def chat_tools(tools: Any, where: str = "tools") -> Optional[list[dict]]:
    """Function tools in the form templates read (see the module docstring); None for none (None or []). A JSON
    text of the list is read. ConfigError, in one line, for another shape."""
    if isinstance(tools, str):
        try:
            tools = json.loads(tools)
        except ValueError:
            raise ConfigError(f"{where} is not a JSON list of function tools") from None
    if not tools:
        return None
    if not isinstance(tools, list):
        raise ConfigError(f"{where} must be a list of function tools, not a {type(tools).__name__}")
    out = []
    for i, tool in enumerate(tools):
        function = tool.get("function", tool) if isinstance(tool, dict) else None
        if not isinstance(function, dict) or not isinstance(function.get("name"), str) or \
                (isinstance(tool, dict) and tool.get("type", "function") != "function"):
            raise ConfigError(f'{where}[{i}] is not a function tool {{"type": "function", "function": {{"name": ..., '
                              '"description": ..., "parameters": {...}}}')
        out.append({"type": "function", "function": function})
    return out


def _call(call: Any) -> dict:
    function = call.get("function") if isinstance(call, dict) else None
    name = function.get("name") if isinstance(function, dict) else None
    arguments = function.get("arguments", {}) if isinstance(function, dict) else None
    if isinstance(arguments, str):
        try:
            arguments = json.loads(arguments)
        except ValueError:
            arguments = None
    if not isinstance(name, str) or not isinstance(arguments, dict):
        raise ConfigError(CALL_SHAPE)
    kept = {"id": call["id"]} if isinstance(call.get("id"), str) else {}  # (Mistral's templates write it)
    return {**kept, "type": "function", "function": {"name": name, "arguments": arguments}}


def chat_turns(turns: Any, where: str = "messages") -> list[dict]:
    """The turns of a conversation in the form templates read (see the module docstring). ConfigError, in one
    line naming the turn, for another shape: every turn needs a string role and string content, except an
    assistant turn that calls tools (content null or absent)."""
    if not isinstance(turns, list):
        raise ConfigError(f'{where} must be a list of {{"role", "content"}} turns')
    out = []
    for i, turn in enumerate(turns):
        if not isinstance(turn, dict) or not isinstance(turn.get("role"), str):
            raise ConfigError(f'{where}[{i}] is not a {{"role": string, "content": string}} turn')
        calls = turn.get("tool_calls")
        if calls is not None and (turn["role"] != "assistant" or not isinstance(calls, list)):
            raise ConfigError(f"{where}[{i}]: only an assistant turn calls tools, with a list of calls")
        content = turn.get("content")
        if not (isinstance(content, str) or (content is None and calls)):
            raise ConfigError(f'{where}[{i}] is not a {{"role": string, "content": string}} turn'
                              + (" (content may be null only in an assistant turn that calls tools)"
                                 if content is None else ""))
        kept = {**turn, "content": content}  # other keys (a tool turn's tool_call_id, name, ...) as given
        if calls:
            kept["tool_calls"] = [_call(c) for c in calls]
        out.append(kept)
    return out


def calls_as_text(turn: dict) -> dict:
    """A turn as a template that writes no calls reads it: its calls, one JSON object {"name", "arguments"} per
    line, after its text."""
    if not turn.get("tool_calls"):
        return turn
    lines = [json.dumps({"name": c["function"]["name"], "arguments": c["function"]["arguments"]})
             for c in turn["tool_calls"]]
    return {"role": turn["role"], "content": "\n".join(([turn["content"]] if turn["content"] else []) + lines)}


def tools_turn(tools: list[dict]) -> dict:
    """The first turn that lists the tools in lmforge's own chat format: one function's JSON per line."""
    return {"role": "tools", "content": "\n".join(json.dumps(t["function"]) for t in tools)}


def writes_calls(source: str) -> bool:
    """Whether a Jinja chat template writes tool calls itself (it reads the turns' tool_calls)."""
    return "tool_calls" in source
