"""OpenAI's Responses API (POST /v1/responses) as a translation of chat completions: a request becomes the chat
request it means, and the chat's answer, whole or as its stream of chunks, becomes a Response object or the
Responses stream events. The route itself (serve/app.py) runs the chat machinery between the two, so tools,
structured output, limits and cancellation are the chat endpoint's.

    request field                           chat request
    input (text, or message / function_call / function_call_output items), instructions (a system message
    first), previous_response_id (the stored turns before)      messages
    max_output_tokens, temperature, top_p, stream               max_completion_tokens, temperature, top_p, stream
    tools (function tools), tool_choice, parallel_tool_calls    the same, in the chat's shape
    text.format (text, json_object, json_schema)                response_format
    include ["message.output_text.logprobs"], top_logprobs      logprobs, top_logprobs
    seed, top_k, min_p, repetition_penalty, stop                the same (lmforge's extras, as vLLM takes them)

    chat answer                             Response output
    a text reply                            a message item with one output_text part
    tool calls                              one function_call item per call (call_id: the chat's call id)
    finish reason length                    status "incomplete", incomplete_details.reason "max_output_tokens"

A stored response (store, true by default, as OpenAI's) keeps its turns in this server's memory, the newest
MAX_STORED (and MAX_STORED_BYTES of JSON), for previous_response_id, GET/DELETE /v1/responses/{id} and GET
/v1/responses/{id}/input_items; a restart forgets them.
"""

from __future__ import annotations

import json
import time
import uuid
from collections import OrderedDict
from typing import Any, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictInt

MAX_STORED = 1024  # responses kept for previous_response_id, the newest first,
MAX_STORED_BYTES = 64 << 20  # and at most this much of their JSON


class ResponsesError(ValueError):
    """A request the chat machinery cannot take: a 422 naming `param`."""

    def __init__(self, message: str, param: Optional[str] = None) -> None:
        super().__init__(message)
        self.message, self.param = message, param


class ResponsesRequest(BaseModel):
    """The body of POST /v1/responses: OpenAI's fields (those lmforge cannot honour only at their neutral value)."""

    model_config = ConfigDict(extra="forbid")
    model: Optional[str] = None
    input: Optional[Union[str, list[dict[str, Any]]]] = None
    instructions: Optional[str] = None
    max_output_tokens: Optional[StrictInt] = Field(None, ge=1)
    temperature: Optional[float] = None
    top_p: Optional[float] = None
    stream: Optional[StrictBool] = False
    tools: Optional[list[dict[str, Any]]] = None
    tool_choice: Optional[Union[Literal["none", "auto", "required"], dict[str, Any]]] = None
    parallel_tool_calls: Optional[StrictBool] = None
    text: Optional[dict[str, Any]] = None
    previous_response_id: Optional[str] = None
    store: Optional[StrictBool] = True
    metadata: Optional[dict[str, str]] = None
    user: Optional[str] = None  # accepted for compatibility, unused
    safety_identifier: Optional[str] = None  # accepted, unused
    prompt_cache_key: Optional[str] = None  # accepted, unused
    service_tier: Optional[str] = None  # accepted, unused
    truncation: Optional[Literal["disabled"]] = None  # "auto" would drop turns: refused
    include: Optional[list[Literal["message.output_text.logprobs"]]] = None  # the text's token log probabilities
    reasoning: Optional[dict[str, Any]] = Field(None, max_length=0)  # not a reasoning model
    background: Optional[Literal[False]] = None
    top_logprobs: Optional[StrictInt] = Field(None, ge=0, le=20)
    seed: Optional[StrictInt] = None
    top_k: Optional[StrictInt] = None
    min_p: Optional[float] = None
    repetition_penalty: Optional[float] = None
    stop: Optional[Union[str, list[str]]] = None


def _text_of(content: Any, where: str) -> str:
    """A message's content: text, or a list of text parts (input_text / output_text) joined."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        texts = []
        for i, part in enumerate(content):
            if not isinstance(part, dict) or part.get("type") not in ("input_text", "output_text", "text") \
                    or not isinstance(part.get("text"), str):
                kind = part.get("type") if isinstance(part, dict) else type(part).__name__
                raise ResponsesError(f"{where}.content[{i}] is {kind!r}: this server reads text parts "
                                     '({"type": "input_text", "text": ...})', "input")
            texts.append(part["text"])
        return "".join(texts)
    raise ResponsesError(f"{where}.content must be text or a list of input_text parts", "input")


def input_messages(items: Union[str, list[dict[str, Any]], None]) -> list[dict]:
    """The chat messages of a request's input: text is one user message; message items keep their role
    (developer becomes system), function_call items become an assistant turn's tool_calls (consecutive ones one
    turn) and function_call_output items tool turns."""
    if items is None:
        return []
    if isinstance(items, str):
        return [{"role": "user", "content": items}]
    messages: list[dict] = []
    for i, item in enumerate(items):
        where, kind = f"input[{i}]", item.get("type", "message")
        if kind == "message":
            role = {"developer": "system"}.get(item.get("role"), item.get("role"))
            if role not in ("system", "user", "assistant"):
                raise ResponsesError(f"{where}.role is {item.get('role')!r}: user, assistant, system or developer",
                                     "input")
            messages.append({"role": role, "content": _text_of(item.get("content"), where)})
        elif kind == "function_call":
            if not all(isinstance(item.get(k), str) for k in ("call_id", "name", "arguments")):
                raise ResponsesError(f"{where}: a function_call item has call_id, name and arguments (JSON text)",
                                     "input")
            call = {"id": item["call_id"], "type": "function",
                    "function": {"name": item["name"], "arguments": item["arguments"]}}
            if messages and messages[-1]["role"] == "assistant" and messages[-1].get("tool_calls"):
                messages[-1]["tool_calls"].append(call)
            else:
                messages.append({"role": "assistant", "content": None, "tool_calls": [call]})
        elif kind == "function_call_output":
            output = item.get("output")
            if not isinstance(item.get("call_id"), str) or not isinstance(output, (str, list)):
                raise ResponsesError(f"{where}: a function_call_output item has call_id and output (text)", "input")
            messages.append({"role": "tool", "tool_call_id": item["call_id"], "content": _text_of(output, where)})
        else:
            raise ResponsesError(f"{where} is a {kind!r} item: this server reads message, function_call and "
                                 "function_call_output items", "input")
    return messages


def _tools(tools: Optional[list[dict]]) -> Optional[list[dict]]:
    if tools is None:
        return None
    out = []
    for i, tool in enumerate(tools):
        if tool.get("type") != "function" or not isinstance(tool.get("name"), str):
            raise ResponsesError(f"tools[{i}] is a {tool.get('type')!r} tool: this server runs function tools "
                                 '({"type": "function", "name": ..., "parameters": {...}})', "tools")
        unknown = set(tool) - {"type", "name", "description", "parameters", "strict"}
        if unknown:
            raise ResponsesError(f"tools[{i}] has {sorted(unknown)[0]!r}: a function tool takes name, description, "
                                 "parameters and strict", "tools")
        out.append({"type": "function", "function": {k: v for k, v in tool.items() if k != "type"}})
    return out


def _tool_choice(choice: Any) -> Any:
    if isinstance(choice, dict):
        if choice.get("type") != "function" or not isinstance(choice.get("name"), str):
            raise ResponsesError('tool_choice is "none", "auto", "required" or {"type": "function", "name": ...}',
                                 "tool_choice")
        return {"type": "function", "function": {"name": choice["name"]}}
    return choice


def _response_format(text: Optional[dict]) -> Optional[dict]:
    fmt = (text or {}).get("format")
    if set(text or {}) - {"format", "verbosity"}:
        raise ResponsesError("text takes format (and verbosity)", "text")
    if fmt is None or fmt == {"type": "text"}:
        return None
    if fmt == {"type": "json_object"}:
        return fmt
    if isinstance(fmt, dict) and fmt.get("type") == "json_schema":
        return {"type": "json_schema", "json_schema": {k: v for k, v in fmt.items() if k != "type"}}
    raise ResponsesError('text.format is {"type": "text"}, {"type": "json_object"} or {"type": "json_schema", '
                         '"name": ..., "schema": {...}}', "text")


def chat_body(body: ResponsesRequest, history: list[dict]) -> dict:
    """The chat completions request `body` means, after the stored turns `history` (previous_response_id)."""
    messages = ([{"role": "system", "content": body.instructions}] if body.instructions else []) + history
    messages += input_messages(body.input)
    if not messages:
        raise ResponsesError("input is empty: give text or message items", "input")
    chat = {"model": body.model, "messages": messages, "max_completion_tokens": body.max_output_tokens,
            "temperature": body.temperature, "top_p": body.top_p, "stream": body.stream,
            "stream_options": {"include_usage": True} if body.stream else None, "tools": _tools(body.tools),
            "tool_choice": _tool_choice(body.tool_choice), "parallel_tool_calls": body.parallel_tool_calls,
            "response_format": _response_format(body.text), "seed": body.seed, "top_k": body.top_k,
            "min_p": body.min_p, "repetition_penalty": body.repetition_penalty, "stop": body.stop}
    if "message.output_text.logprobs" in (body.include or []):
        chat.update(logprobs=True, top_logprobs=body.top_logprobs or 0)
    elif body.top_logprobs:
        raise ResponsesError('top_logprobs needs include: ["message.output_text.logprobs"]', "top_logprobs")
    return {k: v for k, v in chat.items() if v is not None}


def _id(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex[:24]}"


def message_item(text: str, status: str, logprobs: Optional[list] = None) -> dict:
    return {"id": _id("msg"), "type": "message", "status": status, "role": "assistant",
            "content": [{"type": "output_text", "text": text, "annotations": [], "logprobs": logprobs or []}]}


def call_item(call: dict, status: str = "completed") -> dict:
    """A chat tool call ({"id", "function": {"name", "arguments"}}) as a function_call output item."""
    return {"id": _id("fc"), "type": "function_call", "status": status, "call_id": call["id"],
            "name": call["function"]["name"], "arguments": call["function"]["arguments"]}


def output_items(message: dict, finish: str, logprobs: Optional[dict] = None) -> list[dict]:
    """A chat choice's message, finish reason and logprobs ({"content": [...]}) as Response output items."""
    status = "incomplete" if finish == "length" else "completed"
    if message.get("tool_calls"):
        return [call_item(c, status) for c in message["tool_calls"]]
    return [message_item(message.get("content") or "", status, (logprobs or {}).get("content"))]


def input_items(messages: list[dict]) -> list[dict]:
    """Chat messages (input_messages') as Responses input items, each with an id: messages with input_text (an
    assistant's: output_text), an assistant turn's calls as function_call items, tool turns as function_call_output."""
    items = []
    for m in messages:
        if m.get("tool_calls"):
            items += [{"id": _id("fc"), "type": "function_call", "status": "completed", "call_id": c["id"],
                       "name": c["function"]["name"], "arguments": c["function"]["arguments"]} for c in m["tool_calls"]]
        elif m["role"] == "tool":
            items.append({"id": _id("fco"), "type": "function_call_output", "status": "completed",
                          "call_id": m["tool_call_id"], "output": m["content"]})
        else:
            kind = "output_text" if m["role"] == "assistant" else "input_text"
            items.append({"id": _id("msg"), "type": "message", "status": "completed", "role": m["role"],
                          "content": [{"type": kind, "text": m["content"]}]})
    return items


def history_of(messages: list[dict], output: list[dict]) -> list[dict]:
    """The turns a stored response hands on to previous_response_id: its conversation without the instructions (a
    first system message from them), then its output as the assistant's turn."""
    calls = [{"id": o["call_id"], "type": "function", "function": {"name": o["name"], "arguments": o["arguments"]}}
             for o in output if o["type"] == "function_call"]
    reply = {"role": "assistant", "content": None, "tool_calls": calls} if calls else \
        {"role": "assistant", "content": "".join(p["text"] for o in output for p in o["content"])}
    return [*messages, reply]


def response_object(body: ResponsesRequest, response_id: str, created: float, model_id: str, output: list[dict],
                    usage: Optional[dict], status: str) -> dict:
    """OpenAI's Response: the output, the usage and the request's settings."""
    incomplete = any(o["status"] == "incomplete" for o in output) and status != "in_progress"
    return {
        "id": response_id, "object": "response", "created_at": int(created),
        "status": "incomplete" if incomplete else status, "error": None,
        "incomplete_details": {"reason": "max_output_tokens"} if incomplete else None,
        "instructions": body.instructions, "max_output_tokens": body.max_output_tokens, "model": model_id,
        "output": output, "parallel_tool_calls": body.parallel_tool_calls is not False,
        "previous_response_id": body.previous_response_id, "reasoning": None, "store": body.store is not False,
        "temperature": 1.0 if body.temperature is None else body.temperature,
        "text": {"format": (body.text or {}).get("format") or {"type": "text"}},
        "tool_choice": body.tool_choice or "auto", "tools": body.tools or [],
        "top_p": 1.0 if body.top_p is None else body.top_p, "truncation": "disabled", "metadata": body.metadata or {},
        "user": body.user, "usage": None if usage is None else {
            "input_tokens": usage["prompt_tokens"], "input_tokens_details": {"cached_tokens": 0},
            "output_tokens": usage["completion_tokens"], "output_tokens_details": {"reasoning_tokens": 0},
            "total_tokens": usage["total_tokens"]}}


class ResponseStore:
    """The newest stored responses, at most `size` of them and `budget` bytes of their JSON: {id: (Response, the
    turns it hands on, its own input items)}; the oldest go first."""

    def __init__(self, size: int = MAX_STORED, budget: int = MAX_STORED_BYTES) -> None:
        self.size, self.budget, self.used = size, budget, 0
        self.items: OrderedDict[str, tuple[dict, list[dict], list[dict], int]] = OrderedDict()

    def put(self, response: dict, turns: list[dict], inputs: Optional[list[dict]] = None) -> None:
        inputs = inputs or []
        cost = len(json.dumps(response)) + len(json.dumps(turns)) + len(json.dumps(inputs))
        if cost > self.budget:  # alone over the budget: not kept (nor does it push the others out)
            return
        self.delete(response["id"])
        self.items[response["id"]] = (response, turns, inputs, cost)
        self.used += cost
        while self.items and (len(self.items) > self.size or self.used > self.budget):
            self.used -= self.items.popitem(last=False)[1][3]

    def get(self, response_id: str) -> Optional[tuple[dict, list[dict], list[dict]]]:
        """(the Response, the turns it hands on, its input items), or None."""
        found = self.items.get(response_id)
        return None if found is None else found[:3]

    def delete(self, response_id: str) -> bool:
        found = self.items.pop(response_id, None)
        if found is not None:
            self.used -= found[3]
        return found is not None


class StreamEvents:
    """The Responses stream of one chat stream: feed each chat chunk (parsed), take the events it makes; `end()`
    gives the last one (response.completed, or response.incomplete when the reply was cut)."""

    def __init__(self, body: ResponsesRequest, response_id: str, model_id: str) -> None:
        self.body, self.id, self.model_id, self.created = body, response_id, model_id, time.time()
        self.output: list[dict] = []
        self.open: Optional[dict] = None  # the output item being written
        self.calls: dict[int, dict] = {}  # a chat tool call's index -> its output item
        self.usage: Optional[dict] = None
        self.logprobs: list[dict] = []  # of tokens whose text is not out yet (held back for stop strings)
        self.error: Optional[dict] = None  # what stopped the generation (a timeout), if something did
        self.number = 0

    def _event(self, kind: str, **fields: Any) -> str:
        payload = {"type": kind, "sequence_number": self.number, **fields}
        self.number += 1
        return f"event: {kind}\ndata: {json.dumps(payload)}\n\n"

    def response(self, status: str) -> dict:
        return response_object(self.body, self.id, self.created, self.model_id, self.output, self.usage, status)

    def start(self) -> list[str]:
        return [self._event("response.created", response=self.response("in_progress")),
                self._event("response.in_progress", response=self.response("in_progress"))]

    def _add(self, item: dict) -> str:
        self.output.append(item)
        self.open = item
        return self._event("response.output_item.added", output_index=len(self.output) - 1,
                           item={**item, "status": "in_progress"})

    def _close(self, status: str) -> list[str]:
        item, self.open = self.open, None
        if item is None:
            return []
        item["status"] = status
        index = len(self.output) - 1
        if item["type"] == "message":
            part = item["content"][0]
            part["logprobs"] += self.logprobs
            events = [self._event("response.output_text.done", item_id=item["id"], output_index=index,
                                  content_index=0, text=part["text"], logprobs=part["logprobs"]),
                      self._event("response.content_part.done", item_id=item["id"], output_index=index,
                                  content_index=0, part=part)]
        else:
            events = [self._event("response.function_call_arguments.done", item_id=item["id"], output_index=index,
                                  arguments=item["arguments"])]
        return events + [self._event("response.output_item.done", output_index=index, item=item)]

    def feed(self, chunk: dict) -> list[str]:
        if "error" in chunk:
            self.error = {"code": str(chunk["error"].get("code")), "message": chunk["error"]["message"]}
            return [self._event("error", **self.error, param=chunk["error"].get("param"))]
        if chunk.get("usage"):
            self.usage = chunk["usage"]
        events = []
        for choice in chunk.get("choices", []):
            delta = choice.get("delta") or {}
            self.logprobs += (choice.get("logprobs") or {}).get("content") or []
            if delta.get("content"):
                if self.open is None:
                    item = message_item("", "in_progress")
                    events += [self._add(item), self._event(
                        "response.content_part.added", item_id=item["id"], output_index=len(self.output) - 1,
                        content_index=0, part={"type": "output_text", "text": "", "annotations": []})]
                logprobs, self.logprobs = self.logprobs, []
                self.open["content"][0]["text"] += delta["content"]
                self.open["content"][0]["logprobs"] += logprobs
                events.append(self._event("response.output_text.delta", item_id=self.open["id"],
                                          output_index=len(self.output) - 1, content_index=0,
                                          delta=delta["content"], logprobs=logprobs))
            for call in delta.get("tool_calls") or []:
                if "id" in call:  # a new call: the one before is complete
                    events += self._close("completed")
                    self.calls[call["index"]] = call_item({"id": call["id"], "function": {
                        "name": call["function"]["name"], "arguments": ""}}, "in_progress")
                    events.append(self._add(self.calls[call["index"]]))
                piece = call.get("function", {}).get("arguments", "")
                if piece:
                    item = self.calls[call["index"]]
                    item["arguments"] += piece
                    events.append(self._event("response.function_call_arguments.delta", item_id=item["id"],
                                              output_index=self.output.index(item), delta=piece))
            if choice.get("finish_reason") is not None:
                status = "incomplete" if choice["finish_reason"] == "length" else "completed"
                if self.open is None and not self.output:  # nothing was written: an empty message
                    item = message_item("", "in_progress")
                    events += [self._add(item), self._event(
                        "response.content_part.added", item_id=item["id"], output_index=0, content_index=0,
                        part={"type": "output_text", "text": "", "annotations": []})]
                events += self._close(status)
                for item in self.output:
                    item["status"] = status
        return events

    def end(self) -> str:
        """response.completed, response.incomplete (cut by max_output_tokens) or response.failed (an error)."""
        if self.error is not None:
            return self._event("response.failed", response={**self.response("failed"), "error": self.error})
        response = self.response("completed")
        kind = "response.incomplete" if response["status"] == "incomplete" else "response.completed"
        return self._event(kind, response=response)
