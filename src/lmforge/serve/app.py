"""The HTTP API: OpenAI-compatible completions over one model, with limits that keep it up under load.

    GET  /health          liveness and load (no API key needed)
    GET  /metrics         Prometheus text: requests by status, queue depth, tokens generated, tokens/s
    GET  /v1/models       the one model served, with its task: "generate", "classify" (and its labels), "reward"
                          or "embed"
    POST /v1/completions  OpenAI completions: prompt (a string, a list of them, token ids or a list of such
                          lists), max_tokens, temperature, top_p, n, stop, seed, logprobs, echo, stream
                          (server-sent events ending in `data: [DONE]`), usage counts
    POST /v1/chat/completions  OpenAI chat: messages through the model's chat template, the same options; tools
                          (a reply held to a call, or with "auto" a call or text; streamed as tool_call deltas)
    POST /v1/responses    OpenAI's Responses API, as the chat it means (serve.responses): input items,
                          instructions, previous_response_id, function tools, text.format, its stream events;
                          GET / DELETE /v1/responses/{id} for a stored one, GET .../input_items its input
    POST /v1/classify     a classifier's labels with probabilities for a text or a list of texts (top_k)
    POST /v1/reward       a reward model's reward for each (prompt, completion) pair
    POST /v1/embeddings   OpenAI embeddings: a vector per text or token id list (generate.embed), any model
    POST /v1/fill-mask    an encoder's: Hugging Face's fill-mask answer, the likeliest tokens in each mask
    POST /tokenize        vLLM's: the token ids a prompt (or a chat's messages) becomes, as the model reads it
    POST /detokenize      vLLM's: the text of token ids
    GET  /                the playground page (static; it asks for the API key itself); for a classifier
                          a note pointing to /v1/classify

A language model answers /v1/classify and /v1/reward, a classifier and a reward model the generation endpoints and
each other's, and an encoder (embeddings and fill-mask only) all of them, with 400 naming the endpoint to use.

What a request may ask is capped (ServeConfig); a request over a cap gets 413 (body size) or 422 (with
a message naming the field), a malformed or unknown field 422, a full server 429 with Retry-After, a
request past its time 504. Generation runs on the Engine's worker thread, classification on the
ClassifyEngine's (a reward model's scoring on the RewardEngine's), embeddings and fill-mask on a thread of their
own, never on the event loop.
Errors have OpenAI's shape: {"error": {"message", "type", "param", "code"}}, FastAPI's own 404/405/422 and
an unexpected 500 included.

Hostile clients (see also serve.connections for the connection-level timeouts and cap): GuardMiddleware
checks the Host header (and Origin) against an allow-list, so a page on another origin that rebinds its
DNS name to 127.0.0.1 cannot use a key-less server; then the API key; then reads the body, bounded in
size and time. A stream whose client stops reading is cut after serve.stall_timeout (GuardedStream), which
cancels its generation; one client address holds at most serve.max_slots_per_client places (Worker.submit).
"""

from __future__ import annotations

import asyncio
import base64
import math
import json
import logging
import re
import secrets
import time
import uuid
from contextlib import asynccontextmanager
from typing import Annotated, Any, AsyncIterator, Callable, Literal, Optional, Union

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, PlainTextResponse, Response, StreamingResponse
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, StrictBool, StrictInt, ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.middleware.cors import CORSMiddleware

from lmforge.data.tasks import CALL_LINES, CallFormat
from lmforge.errors import ConfigError, LmforgeError
from lmforge.generate import (GenerateConfig, Logprobs, MaskFiller, RewardModel, TextClassifier, TextGenerator,
                              prompt_ids, with_token_ids)
from lmforge.generate.automaton import build as build_automaton
from lmforge.generate.embed import TextEmbedder
from lmforge.serve.config import ServeConfig
from lmforge.serve.connections import RESET_EXTENSION
from lmforge.serve.engine import Busy, ClassifyEngine, ClassifyJob, Engine, Job, Mailbox, RewardEngine
from lmforge.serve.metrics import Metrics
from lmforge.serve.playground import CLASSIFIER_NOTE_HTML, ENCODER_NOTE_HTML, PLAYGROUND_HTML, REWARD_NOTE_HTML
from lmforge.serve.responses import (ResponsesError, ResponsesRequest, ResponseStore, StreamEvents, chat_body,
                                     history_of, input_items, input_messages, output_items, response_object)

PUBLIC_PATHS = ("/health", "/")  # no API key: liveness, and the static page that asks for the key
RETRY_AFTER_S = 1  # what a 429 tells the client to wait: a queue slot frees as soon as one request ends
LOOPBACK_NAMES = ("localhost", "127.0.0.1", "::1")  # the Host names a local server answers to by default
MAX_LOGPROBS = 5  # OpenAI's cap on completions' logprobs
MAX_TOP_LOGPROBS = 20  # and on chat's top_logprobs
MAX_FILL_TOP_K = 100  # candidates per mask of POST /v1/fill-mask
log = logging.getLogger("lmforge.serve")


# ------------------------------------------------------------------------------------------- requests
def _valid_unicode(text: str) -> str:
    """JSON may carry a lone surrogate ("\\ud800"), which is no character: UTF-8 (the tokenizer) cannot encode it."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise ValueError(f"holds a lone surrogate (U+{ord(text[e.start]):04X} at {e.start}), which is not a "
                         "character: send valid Unicode") from None
    return text


Text = Annotated[str, AfterValidator(_valid_unicode)]  # every text a request carries to the tokenizer


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    include_usage: StrictBool = False


class SamplingRequest(BaseModel):
    """The fields completions and chat share: OpenAI's sampling options (presence and frequency penalties and
    logit_bias included), plus top_k, min_p, typical_p, repetition_penalty, min_tokens, bad_words, guided_choice and
    guided_regex as vLLM (and TGI, for typical_p) have them. Their values are checked by GenerateConfig, as for the
    library and the CLI."""

    model_config = ConfigDict(extra="forbid")
    model: Optional[str] = None
    temperature: Optional[float] = 1.0
    top_p: Optional[float] = 1.0
    top_k: Optional[StrictInt] = None
    min_p: Optional[float] = None
    repetition_penalty: Optional[float] = None
    n: Optional[StrictInt] = Field(1, ge=1)
    stop: Optional[Union[Text, list[Text]]] = None
    seed: Optional[StrictInt] = None
    stream: Optional[StrictBool] = False
    stream_options: Optional[StreamOptions] = None
    user: Optional[str] = None  # accepted for compatibility, unused
    frequency_penalty: Optional[float] = None
    presence_penalty: Optional[float] = None
    logit_bias: Optional[dict[str, float]] = None  # token id (as text, as JSON keys are) -> bias
    typical_p: Optional[float] = None
    min_tokens: Optional[StrictInt] = Field(None, ge=0)
    bad_words: Optional[list[Text]] = None
    guided_choice: Optional[list[Text]] = None
    guided_regex: Optional[Text] = None
    guided_json: Optional[Union[dict[str, Any], Text]] = None
    response_format: Optional[dict[str, Any]] = None  # OpenAI's: {"type": "text" | "json_object" | "json_schema", ...}
    guidance_scale: Optional[float] = None  # classifier-free guidance, as Hugging Face's generate has it
    negative_prompt: Optional[Text] = None


class CompletionRequest(SamplingRequest):
    """The body of POST /v1/completions: OpenAI's fields (those lmforge cannot honour only at their neutral
    value, see UNSUPPORTED); nothing else. A prompt is text, a list of texts, token ids (a list of ints) or
    a list of such lists; token ids are taken as they are (no template, no <START>)."""

    prompt: Union[Text, list[Text], list[StrictInt], list[list[StrictInt]]] = ""
    max_tokens: Optional[StrictInt] = Field(16, ge=1)
    best_of: Optional[StrictInt] = None
    logprobs: Optional[StrictInt] = Field(None, ge=0, le=MAX_LOGPROBS)
    echo: Optional[StrictBool] = None
    suffix: Optional[str] = None
    token_healing: Optional[StrictBool] = None  # lmforge's: Hugging Face's token_healing (GenerateConfig's)


# OpenAI fields that clients (LangChain, ...) send at their neutral value: accepted only at that value
UNSUPPORTED = {"suffix": None}


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="forbid")
    role: Literal["system", "user", "assistant", "tool"]
    content: Optional[Text] = None  # null only in an assistant turn that called tools
    name: Optional[str] = None  # accepted for compatibility, unused
    tool_calls: Optional[list[dict[str, Any]]] = None  # an assistant turn's calls, as this server answered them
    tool_call_id: Optional[str] = None  # a tool turn: the call it answers (accepted, unused)


class ToolFunction(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str = Field(pattern=r"^[A-Za-z0-9_-]{1,64}$")
    description: Optional[str] = None
    parameters: Optional[dict[str, Any]] = None  # a JSON schema of the arguments
    strict: Optional[StrictBool] = None


class Tool(BaseModel):
    model_config = ConfigDict(extra="forbid")
    type: Literal["function"]
    function: ToolFunction


class ChatRequest(SamplingRequest):
    """The body of POST /v1/chat/completions: OpenAI's chat fields (sampling as for completions), the
    conversation rendered through the model's chat template (see TextGenerator.render_chat)."""

    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: Optional[StrictInt] = Field(None, ge=1)
    max_completion_tokens: Optional[StrictInt] = Field(None, ge=1)
    logprobs: Optional[StrictBool] = None
    top_logprobs: Optional[StrictInt] = Field(None, ge=0, le=MAX_TOP_LOGPROBS)
    tools: Optional[list[Tool]] = None
    tool_choice: Optional[Union[Literal["none", "auto", "required"], dict[str, Any]]] = None
    parallel_tool_calls: Optional[StrictBool] = None  # true (the default): a reply may call tools, one per line
    chat_template_kwargs: Optional[dict[str, Any]] = None  # vLLM's: other values the model's template reads


CHAT_UNSUPPORTED: dict[str, Any] = {}
CHAT_DEFAULT_MAX_TOKENS = 256  # OpenAI's chat API has no default length; a reply this long unless asked


class TokenizeRequest(BaseModel):
    """The body of POST /tokenize (vLLM's): a prompt, or a chat's messages, as the model would read them."""

    model_config = ConfigDict(extra="forbid")
    model: Optional[str] = None
    prompt: Optional[Text] = None
    messages: Optional[list[ChatMessage]] = None
    tools: Optional[list[Tool]] = None  # with messages: the function tools the chat template lists
    chat_template_kwargs: Optional[dict[str, Any]] = None  # with messages: other values the template reads
    add_special_tokens: StrictBool = True


class LoadLoRARequest(BaseModel):
    """The body of POST /v1/load_lora_adapter (vLLM's runtime LoRA updating)."""

    model_config = ConfigDict(extra="forbid")
    lora_name: str
    lora_path: str


class UnloadLoRARequest(BaseModel):
    """The body of POST /v1/unload_lora_adapter (vLLM's; its lora_int_id accepted and not needed)."""

    model_config = ConfigDict(extra="forbid")
    lora_name: str
    lora_int_id: Optional[int] = None


class DetokenizeRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    model: Optional[str] = None
    tokens: list[StrictInt]


class ClassifyRequest(BaseModel):
    """The body of POST /v1/classify: a text or a list of texts, and how many labels to give for each."""

    model_config = ConfigDict(extra="forbid")
    model: Optional[str] = None
    input: Union[Text, list[Text]]
    top_k: Optional[StrictInt] = Field(None, ge=1)  # None: every label


class RewardTurn(BaseModel):
    model_config = ConfigDict(extra="forbid")
    role: Text
    content: Text


class RewardPair(BaseModel):
    """A prompt (a string, or a conversation of {role, content} turns the completion answers) and a completion."""

    model_config = ConfigDict(extra="forbid")
    prompt: Union[Text, list[RewardTurn]]
    completion: Text


class RewardRequest(BaseModel):
    """The body of POST /v1/reward: one (prompt, completion) pair or a list of them."""

    model_config = ConfigDict(extra="forbid")
    model: Optional[str] = None
    input: Union[RewardPair, list[RewardPair]]


class EmbeddingRequest(BaseModel):
    """The body of POST /v1/embeddings: OpenAI's fields; an input is a text, token ids, or a list of either."""

    model_config = ConfigDict(extra="forbid")
    model: Optional[str] = None
    input: Union[Text, list[Text], list[StrictInt], list[list[StrictInt]]]
    encoding_format: Literal["float", "base64"] = "float"  # base64: little-endian float32 (the openai package's)
    dimensions: Optional[StrictInt] = None  # accepted only as the model's own
    user: Optional[str] = None  # accepted for compatibility, unused


class FillMaskParameters(BaseModel):
    model_config = ConfigDict(extra="forbid")
    top_k: StrictInt = Field(5, ge=1, le=MAX_FILL_TOP_K)


class FillMaskRequest(BaseModel):
    """The body of POST /v1/fill-mask (an encoder's), Hugging Face's fill-mask task: a text or a list of texts, each
    with the mask token where a token is to be predicted; parameters.top_k candidates per mask."""

    model_config = ConfigDict(extra="forbid")
    model: Optional[str] = None
    inputs: Union[Text, list[Text]]
    parameters: FillMaskParameters = FillMaskParameters()


GENERATION_PATHS = ("/v1/completions", "/v1/chat/completions", "/v1/responses")
SCORING_PATHS = ("/v1/classify", "/v1/reward")  # a classifier's and a reward model's


class ApiError(Exception):
    """An answer other than 200, with OpenAI's error body."""

    def __init__(self, status: int, message: str, param: Optional[str] = None,
                 headers: Optional[dict[str, str]] = None) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.headers = status, message, param, headers


_ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
                404: "not_found_error", 405: "invalid_request_error", 408: "timeout_error",
                413: "invalid_request_error", 422: "invalid_request_error", 429: "rate_limit_error",
                504: "timeout_error"}


def error_body(status: int, message: str, param: Optional[str] = None) -> dict:
    return {"error": {"message": message, "type": _ERROR_TYPES.get(status, "server_error"), "param": param,
                      "code": status}}


def error_response(status: int, message: str, param: Optional[str] = None,
                   headers: Optional[dict[str, str]] = None) -> JSONResponse:
    return JSONResponse(error_body(status, message, param), status_code=status, headers=headers)


def _validation_message(errors: list[dict], path: str = "/v1/completions") -> tuple[str, Optional[str]]:
    """One line from pydantic's errors on a request to `path`: the first problem, naming the field."""
    first = next((e for e in errors if e.get("type") == "value_error"), errors[0])  # ours: the most precise
    loc = [str(x) for x in first.get("loc", ()) if x != "body"]
    loc = [x for x in loc if "[" not in x and x not in ("str", "int", "float", "bool")]  # union member tags
    field = ".".join(loc) or None
    if first.get("type") == "extra_forbidden":
        if loc and loc[0] == "messages":
            return f"unknown field {field!r}: a message takes role, content and name", field
        request, unsupported = {"/v1/chat/completions": (ChatRequest, CHAT_UNSUPPORTED),
                                "/v1/responses": (ResponsesRequest, {}),
                                "/v1/classify": (ClassifyRequest, {}),
                                "/v1/reward": (RewardRequest, {})}.get(path, (CompletionRequest, UNSUPPORTED))
        known = [f for f in request.model_fields if f not in unsupported]
        return f"unknown field {field!r}: {path} takes {', '.join(known)}", field
    if first.get("type") == "json_invalid":
        return f"the body is not valid JSON ({first.get('ctx', {}).get('error', 'parse error')})", None
    if first.get("type") == "missing" and field is None:
        return "the body is empty: send a JSON object", None
    if first.get("type") == "value_error":  # our own validators' message, without pydantic's prefix
        return f"{field or 'body'}: {first.get('ctx', {}).get('error', 'invalid value')}", field
    return f"{field or 'body'}: {first.get('msg', 'invalid value')}", field


# ------------------------------------------------------------------------- host, key, body size and time
def _host_name(value: str) -> str:
    """The name of a Host header or an Origin's authority, without its port: "[::1]:8000" -> "::1"."""
    value = value.strip().lower()
    if value.startswith("["):
        return value[1:value.find("]")] if "]" in value else value
    return value.rsplit(":", 1)[0] if value.count(":") == 1 else value


class GuardMiddleware:
    """Pure ASGI middleware, in this order: the Host (and Origin) allow-list, the API key, then the body, read
    here bounded in size (at most max_body_bytes + 1) and time (body_timeout); it also counts every answer's
    status for /metrics."""

    def __init__(self, app: Any, config: ServeConfig, allowed_hosts: frozenset[str], metrics: Metrics) -> None:
        self.app, self.config, self.allowed_hosts, self.metrics = app, config, allowed_hosts, metrics
        self.origins = frozenset(config.cors_origin or ())

    def refusal(self, headers: dict[bytes, bytes], path: str) -> Optional[JSONResponse]:
        """The answer to a request that may not reach the app (wrong host, origin or key), or None."""
        host = headers.get(b"host", b"").decode("latin-1")
        if "*" not in self.allowed_hosts and host and _host_name(host) not in self.allowed_hosts:
            return error_response(403, f"Host {host!r} is not one this server answers to (a DNS rebinding guard); "
                                  "start it with --allowed-host NAME to accept it")
        origin = headers.get(b"origin")
        if origin is not None:
            origin_text = origin.decode("latin-1")
            same_site = _host_name(origin_text.partition("://")[2]) in self.allowed_hosts
            if not (same_site or "*" in self.origins or origin_text in self.origins or "*" in self.allowed_hosts):
                return error_response(403, f"Origin {origin_text!r} may not call this server; start it with "
                                      "--cors-origin ORIGIN to allow it")
        key = self.config.api_key
        if key is not None and path not in PUBLIC_PATHS:
            scheme, _, given = headers.get(b"authorization", b"").partition(b" ")
            # the scheme is case-insensitive (RFC 9110 11.1); the key is compared as UTF-8 bytes, any characters
            if scheme.lower() != b"bearer" or not secrets.compare_digest(given.strip(), key.encode("utf-8")):
                return error_response(401, "missing or wrong API key: send 'Authorization: Bearer KEY'",
                                      headers={"WWW-Authenticate": "Bearer"})
        return None

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)

        async def counted(message: dict) -> None:
            if message["type"] == "http.response.start":
                self.metrics.answered(message["status"])
            await send(message)

        headers = {k.lower(): v for k, v in scope.get("headers", [])}
        refusal = self.refusal(headers, scope["path"])
        if refusal is not None:
            return await refusal(scope, receive, counted)
        limit = self.config.max_body_bytes
        too_large = error_response(413, f"the request body is larger than {limit} bytes (serve.max_body_bytes)")
        length = headers.get(b"content-length", b"").decode("latin-1") or None
        if length is not None and (not length.isdigit() or int(length) > limit):
            return await too_large(scope, receive, counted)
        if scope["method"] not in ("POST", "PUT", "PATCH"):
            return await self.app(scope, receive, counted)
        body, more = b"", True  # read the body here, bounded, then hand it on in one piece
        deadline = time.monotonic() + self.config.body_timeout
        while more:
            try:
                message = await asyncio.wait_for(receive(), max(0.0, deadline - time.monotonic()))
            except asyncio.TimeoutError:
                late = error_response(408, f"the request body did not arrive within {self.config.body_timeout} s "
                                      "(serve.body_timeout)", headers={"Connection": "close"})
                return await late(scope, receive, counted)
            if message["type"] == "http.disconnect":
                return
            body += message.get("body", b"")
            more = message.get("more_body", False)
            if len(body) > limit:
                return await too_large(scope, receive, counted)
        delivered = False

        async def replay() -> dict:
            nonlocal delivered
            if not delivered:
                delivered = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        await self.app(scope, replay, counted)


# ------------------------------------------------------------------------------------------------ app
def create_app(generator: Union[TextGenerator, TextClassifier, RewardModel, MaskFiller],
               config: Optional[ServeConfig] = None, model_name: str = "lmforge", host: str = "127.0.0.1",
               adapters: Optional[dict[str, TextGenerator]] = None,
               load_adapter: Optional[Callable[[str, str], TextGenerator]] = None) -> FastAPI:
    """The FastAPI app serving `generator` (a language model's TextGenerator, a classifier's TextClassifier, a reward
    model's RewardModel, or an encoder's MaskFiller: embeddings only); its worker thread starts and stops with the
    app's lifespan. `host`
    is the address it will be bound to: a Host header naming it (or a loopback name) is accepted unless
    serve.allowed_host says otherwise. `adapters`: LoRA runs of the language model served beside it by name
    (generate.load_adapters: each a TextGenerator over the same model, its adapter set of that name), as vLLM's
    --lora-modules; a request's "model" picks one. load_adapter(name, path) loads one more while serving
    (serve.allow_runtime_lora; serve.load_app gives it)."""
    adapters = dict(adapters or {})
    if config is not None and config.allow_runtime_lora and load_adapter is None:
        raise ConfigError("serve.allow_runtime_lora needs a loader of LoRA runs: serve with serve.load_app")
    encodes = isinstance(generator, MaskFiller)  # an encoder: embeddings only
    if not isinstance(generator, (TextGenerator, TextClassifier, RewardModel, MaskFiller)):
        raise ConfigError(f"create_app serves a TextGenerator, TextClassifier, RewardModel or MaskFiller "
                          f"(generate.load gives one), not a {type(generator).__name__}")
    config = config or ServeConfig()
    model_id = config.model_name or model_name
    if model_id in adapters:
        raise ConfigError(f"serve.lora_modules names a LoRA run {model_id!r}, the served model's own name: give it "
                          f"another name")
    block_size = generator.model.config.block_size
    max_prompt_tokens = config.max_prompt_tokens or block_size
    if max_prompt_tokens > block_size:
        raise ConfigError(f"serve.max_prompt_tokens={max_prompt_tokens} is larger than the model's block_size="
                          f"{block_size}; use at most {block_size}")
    classifies, rewards = isinstance(generator, TextClassifier), isinstance(generator, RewardModel)
    if (classifies or rewards or encodes) and config.speculation:
        raise ConfigError("speculative decoding (serve.assistant_model, serve.assistant_early_exit, "
                          "serve.prompt_lookup_num_tokens) speeds up text generation, and this model is "
                          f"{'a classifier' if classifies else 'a reward model' if rewards else 'an encoder'}: leave "
                          "them out")
    if config.assistant_model is not None and getattr(generator, "assistant_model", None) is None:
        raise ConfigError("serve.assistant_model is set but the generator has no assistant: load it with "
                          "generate.load(path, assistant=...) or serve with serve.load_app")
    engine: Any = None  # an encoder's embeddings run beside no engine (_add_embedding_route)
    if classifies or rewards:
        engine = (RewardEngine if rewards else ClassifyEngine)(generator, config.max_concurrency, config.max_queue,
                                                               config.max_batch_size, config.slots_per_client)
    elif not encodes:
        engine = Engine(generator, config.max_concurrency, config.max_queue, config.max_batch_size,
                        config.max_decodes, config.batch_wait, config.slots_per_client, config.stall_timeout,
                        config.speculation, config.speculative_max_running, config.max_loras)
    created = int(time.time())
    metrics = Metrics(engine)
    allowed_hosts = frozenset(h.lower() for h in (config.allowed_host or (*LOOPBACK_NAMES, host)))

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        if engine is not None:
            engine.start()
        yield
        if engine is not None:
            engine.close()

    app = FastAPI(title="lmforge", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.engine, app.state.config = engine, config
    app.add_middleware(GuardMiddleware, config=config, allowed_hosts=allowed_hosts, metrics=metrics)
    if config.cors_origin:  # outside the guard: a preflight carries no API key
        app.add_middleware(CORSMiddleware, allow_origins=config.cors_origin, allow_methods=["GET", "POST"],
                           allow_headers=["Authorization", "Content-Type"])

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, e: ApiError) -> JSONResponse:
        return error_response(e.status, e.message, e.param, e.headers)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, e: RequestValidationError) -> JSONResponse:
        message, param = _validation_message(list(e.errors()), request.url.path)
        return error_response(422, message, param)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, e: StarletteHTTPException) -> JSONResponse:
        return error_response(e.status_code, str(e.detail))

    @app.exception_handler(Exception)
    async def _bug(request: Request, e: Exception) -> JSONResponse:  # a bug: still OpenAI's shape, and logged
        log.exception("internal error on %s", request.url.path)
        return error_response(500, f"internal error: {type(e).__name__} (please report it)")

    @app.get("/health")
    async def health() -> dict:
        return {"status": "ok", "model": model_id, **(engine.stats() if engine is not None else {})}

    @app.get("/metrics")
    async def prometheus() -> PlainTextResponse:
        return PlainTextResponse(metrics.render(), media_type="text/plain; version=0.0.4")

    task = {"task": "classify", "labels": generator.labels} if classifies else {"task": "reward"} if rewards else \
        {"task": "embed"} if encodes else {"task": "generate", "template": generator.template is not None}

    @app.get("/v1/models")
    async def models() -> dict:
        return {"object": "list", "data": [{"id": model_id, "object": "model", "created": created,
                                            "owned_by": "lmforge", "max_model_len": block_size, **task}] + [
            {"id": name, "object": "model", "created": created, "owned_by": "lmforge", "max_model_len": block_size,
             "parent": model_id, "task": "generate", "template": adapter.template is not None}
            for name, adapter in adapters.items()]}

    if classifies:
        _add_classify_routes(app, engine, config, model_id, max_prompt_tokens)
    elif rewards:
        _add_reward_routes(app, engine, config, model_id, max_prompt_tokens)
    elif encodes:
        _wrong_task(app, GENERATION_PATHS + SCORING_PATHS, "this model is an encoder: it embeds text and fills "
                    "its masks, and does not generate, classify or score it, so {path} is not served; use POST "
                    "/v1/embeddings or POST /v1/fill-mask")

        @app.get("/", response_class=HTMLResponse)
        async def note() -> HTMLResponse:
            return HTMLResponse(ENCODER_NOTE_HTML.replace("{{MODEL}}", model_id))
    else:
        _add_generation_routes(app, generator, engine, config, model_id, max_prompt_tokens, adapters, load_adapter)
    beside = _Beside(config.max_queue)
    _add_embedding_route(app, TextEmbedder(generator.model, generator.tokenizer), config, model_id, max_prompt_tokens,
                         beside)
    if encodes:
        _add_fill_mask_route(app, generator, config, model_id, beside)
    return app


class _Beside:
    """Work that runs beside the engine (embeddings, fill-mask): in a thread, one request at a time, the model's
    weights only read; past `max_queue` requests waiting, 429."""

    def __init__(self, max_queue: int) -> None:
        self.lock, self.waiting, self.max_queue = asyncio.Semaphore(1), 0, max(1, max_queue)

    async def run(self, work: Callable[..., Any], *args: Any) -> Any:
        if self.waiting >= self.max_queue:
            raise ApiError(429, f"the server is at capacity ({self.waiting} requests waiting); retry after "
                           f"{RETRY_AFTER_S} s", headers={"Retry-After": str(RETRY_AFTER_S)})
        self.waiting += 1
        try:
            async with self.lock:
                return await asyncio.to_thread(work, *args)
        finally:
            self.waiting -= 1


def _add_fill_mask_route(app: FastAPI, filler: MaskFiller, config: ServeConfig, model_id: str, beside: _Beside) -> None:
    """POST /v1/fill-mask (an encoder's), as Hugging Face's fill-mask pipeline answers: per mask, top_k candidates
    {score, token, token_str, sequence} (the text with that mask filled), most probable first; a text with one mask
    gets that list, with several a list per mask, and a list of texts a list per text."""

    @app.post("/v1/fill-mask")
    async def fill_mask(body: FillMaskRequest) -> Any:
        _check_model(body.model, model_id)
        texts = [body.inputs] if isinstance(body.inputs, str) else body.inputs
        if not texts or len(texts) > config.max_prompts:
            raise ApiError(422, f"{len(texts)} inputs; give 1 to {config.max_prompts} (serve.max_prompts)", "inputs")
        for i, text in enumerate(texts):
            try:
                filler.encode(text)  # a mask present, within the context
            except ConfigError as e:
                raise ApiError(422, f"inputs[{i}]: {e}", "inputs") from None
        top_k = body.parameters.top_k
        answers = await beside.run(lambda: [filler.top_tokens(text, top_k) for text in texts])
        tok, mask = filler.tokenizer, filler.tokenizer.mask_token
        out = []
        for text, per_mask in zip(texts, answers):
            pieces = text.split(mask)
            filled = []
            for m, candidates in enumerate(per_mask):
                filled.append([{"score": p, "token": i, "token_str": tok.token_text(i),
                                "sequence": mask.join(pieces[:m + 1]) + tok.token_text(i) + mask.join(pieces[m + 1:])}
                               for i, p in candidates])
            out.append(filled[0] if len(filled) == 1 else filled)
        return out[0] if isinstance(body.inputs, str) else out


def _add_embedding_route(app: FastAPI, embedder: TextEmbedder, config: ServeConfig, model_id: str,
                         max_prompt_tokens: int, beside: _Beside) -> None:
    """POST /v1/embeddings (OpenAI's): one vector per input, the model's hidden states pooled (generate.embed),
    computed beside the engine, one request at a time; past serve.max_queue requests waiting, 429."""

    @app.post("/v1/embeddings")
    async def embeddings(body: EmbeddingRequest) -> dict:
        _check_model(body.model, model_id)
        given = body.input
        inputs = [given] if isinstance(given, str) or (given and isinstance(given[0], int)) else list(given)
        if not inputs:
            raise ApiError(422, "input is empty: give a string, a list of strings or of token id lists", "input")
        if len(inputs) > config.max_prompts:
            raise ApiError(422, f"{len(inputs)} inputs in one request; at most {config.max_prompts} "
                           "(serve.max_prompts)", "input")
        if body.dimensions is not None and body.dimensions != embedder.dimensions:
            raise ApiError(422, f"dimensions={body.dimensions}: this model's embeddings have {embedder.dimensions}; "
                           "leave dimensions out", "dimensions")
        vocab, tokens = embedder.tokenizer.vocab_size, 0
        for i, text in enumerate(inputs):
            if not isinstance(text, str):
                bad = next((t for t in text if not 0 <= t < vocab), None) if text else -1
                if bad is not None:
                    raise ApiError(422, f"input[{i}] holds the token id {bad}: give ids 0 to {vocab - 1}, at least "
                                   "one", "input")
            n = embedder.length(text)
            if n > max_prompt_tokens:
                raise ApiError(422, f"input[{i}] is {n} tokens (with its start and end tokens); at most "
                               f"{max_prompt_tokens} (serve.max_prompt_tokens)", "input")
            tokens += n
        vectors = await beside.run(embedder.embed, inputs, config.max_batch_size)
        data = [{"object": "embedding", "index": i,
                 "embedding": v.tolist() if body.encoding_format == "float" else
                 base64.b64encode(v.numpy().astype("<f4").tobytes()).decode("ascii")} for i, v in enumerate(vectors)]
        return {"object": "list", "data": data, "model": model_id,
                "usage": {"prompt_tokens": tokens, "total_tokens": tokens}}


def _wrong_task(app: FastAPI, paths: tuple[str, ...], message: str) -> None:
    """POST routes at `paths` that answer 400 with `message`, whatever the body (it is meant for another model)."""
    async def refuse(request: Request) -> Response:
        raise ApiError(400, message.replace("{path}", request.url.path))

    for path in paths:
        app.add_api_route(path, refuse, methods=["POST"])


def _add_classify_routes(app: FastAPI, engine: ClassifyEngine, config: ServeConfig, model_id: str,
                         max_prompt_tokens: int) -> None:
    """A classifier's endpoints: POST /v1/classify, the note at /, and 400 at the generation endpoints."""
    classifier = engine.classifier
    _wrong_task(app, GENERATION_PATHS + ("/v1/reward",), "this model is a classifier: it classifies text and does "
                "not generate or score it, so {path} is not served; use POST /v1/classify (GET /v1/models lists its "
                "labels)")

    @app.get("/", response_class=HTMLResponse)
    async def note() -> HTMLResponse:
        return HTMLResponse(CLASSIFIER_NOTE_HTML.replace("{{MODEL}}", model_id))

    @app.post("/v1/classify")
    async def classify(body: ClassifyRequest, request: Request) -> Response:
        _check_model(body.model, model_id)
        texts = [body.input] if isinstance(body.input, str) else body.input
        if not texts:
            raise ApiError(422, "input is an empty list: give a string or a list of strings", "input")
        if len(texts) > config.max_prompts:
            raise ApiError(422, f"{len(texts)} texts in one request; at most {config.max_prompts} "
                           "(serve.max_prompts)", "input")
        tok, specials = classifier.tokenizer, 1 + (classifier.tokenizer.start_id is not None)
        prompt_tokens = 0
        for i, text in enumerate(texts):  # counted as TextClassifier encodes them: [start] text [end]
            n = len(tok.encode(text)) + specials
            if n > max_prompt_tokens:
                raise ApiError(422, f"input[{i}] is {n} tokens (with its start and end tokens); at most "
                               f"{max_prompt_tokens} (serve.max_prompt_tokens)", "input")
            prompt_tokens += n
        job = ClassifyJob(texts, body.top_k, time.monotonic() + config.timeout, Mailbox(asyncio.get_running_loop()),
                          client=_client(request))
        if await _scored(engine, job, request, config) is None:  # the client left; nobody reads this
            return Response(status_code=499)
        data = [{"index": i, "label": ranked[0][0],
                 "predictions": [{"label": label, "probability": p} for label, p in ranked]}
                for i, ranked in enumerate(job.predictions)]
        return JSONResponse({"object": "list", "model": model_id, "data": data,
                             "usage": {"prompt_tokens": prompt_tokens, "total_tokens": prompt_tokens}})


def _check_model(name: Optional[str], model_id: str) -> None:
    """404 for a request naming another model than the one served (none named: this one)."""
    if name is not None and name != model_id:
        raise ApiError(404, f"model {name!r} is not served here; this server serves {model_id!r}", "model")


async def _scored(engine: ClassifyEngine, job: ClassifyJob, request: Request, config: ServeConfig
                  ) -> Optional[ClassifyJob]:
    """`job` run on a classifier's or a reward model's worker: the job with its predictions, None when the client
    left; 429 when the server is full."""
    try:
        engine.submit([job])
    except Busy as e:
        raise ApiError(429, f"the server is at capacity ({e}); retry after {RETRY_AFTER_S} s",
                       headers={"Retry-After": str(RETRY_AFTER_S)})
    finished = await _wait_all([job], request, config.timeout)
    return None if finished is None else job


def _add_reward_routes(app: FastAPI, engine: RewardEngine, config: ServeConfig, model_id: str,
                       max_prompt_tokens: int) -> None:
    """A reward model's endpoints: POST /v1/reward, the note at /, and 400 at the generation endpoints and
    /v1/classify."""
    judge = engine.classifier
    _wrong_task(app, GENERATION_PATHS + ("/v1/classify",), "this model is a reward model: it scores a prompt's "
                "completions and does not generate or classify text, so {path} is not served; use POST /v1/reward")

    @app.get("/", response_class=HTMLResponse)
    async def note() -> HTMLResponse:
        return HTMLResponse(REWARD_NOTE_HTML.replace("{{MODEL}}", model_id))

    @app.post("/v1/reward")
    async def reward(body: RewardRequest, request: Request) -> Response:
        _check_model(body.model, model_id)
        items = [body.input] if isinstance(body.input, RewardPair) else body.input
        if not items:
            raise ApiError(422, "input is an empty list: give a {prompt, completion} object or a list of them",
                           "input")
        if len(items) > config.max_prompts:
            raise ApiError(422, f"{len(items)} pairs in one request; at most {config.max_prompts} (serve.max_prompts)",
                           "input")
        pairs = [(item.prompt if isinstance(item.prompt, str) else [t.model_dump() for t in item.prompt],
                  item.completion) for item in items]
        tok, specials = judge.tokenizer, 1 + (judge.tokenizer.start_id is not None)
        prompt_tokens = 0
        for i, (prompt, completion) in enumerate(pairs):  # counted as RewardModel encodes them, before any cut
            try:
                n = len(tok.encode(judge.render(prompt))) + len(tok.encode(completion)) + specials
            except ConfigError as e:
                raise ApiError(422, f"input[{i}].prompt: {e}", "input") from None
            if n > max_prompt_tokens:
                raise ApiError(422, f"input[{i}] is {n} tokens (prompt, completion, start and end tokens); at most "
                               f"{max_prompt_tokens} (serve.max_prompt_tokens)", "input")
            prompt_tokens += n
        job = ClassifyJob(pairs, None, time.monotonic() + config.timeout, Mailbox(asyncio.get_running_loop()),
                          client=_client(request))
        if await _scored(engine, job, request, config) is None:  # the client left; nobody reads this
            return Response(status_code=499)
        return JSONResponse({"object": "list", "model": model_id,
                             "data": [{"index": i, "reward": r} for i, r in enumerate(job.predictions)],
                             "usage": {"prompt_tokens": prompt_tokens, "total_tokens": prompt_tokens}})


def _add_generation_routes(app: FastAPI, generator: TextGenerator, engine: Engine, config: ServeConfig,
                           model_id: str, max_prompt_tokens: int, adapters: dict[str, TextGenerator],
                           load_adapter: Optional[Callable[[str, str], TextGenerator]] = None) -> None:
    """A language model's endpoints: the playground, completions, chat completions, and 400 at /v1/classify; a
    request naming one of `adapters` decodes with that LoRA run's adapters (and its template); with
    serve.allow_runtime_lora, POST /v1/load_lora_adapter and /v1/unload_lora_adapter change `adapters`."""
    _wrong_task(app, SCORING_PATHS, "this model is a language model: it generates text and does not classify or "
                "score it, so {path} is not served; use POST /v1/completions or /v1/chat/completions")
    automata = asyncio.Semaphore(1)  # guided_regex / guided_json automata are built one request at a time
    served = {model_id: (generator, None), **{name: (adapter, name) for name, adapter in adapters.items()}}
    # how each one's chat template writes tool calls: the form replies are held to
    calls = {name: served_generator.call_format() for name, (served_generator, _) in served.items()}

    def pick(name: Optional[str]) -> tuple[str, TextGenerator, Optional[str]]:
        """(the model a request names, none: the base; its TextGenerator; its adapter set); 404 for another."""
        name = model_id if name is None else name
        if name not in served:
            raise ApiError(404, f"model {name!r} is not served here; this server serves "
                           f"{', '.join(repr(n) for n in served)}", "model")
        return (name, *served[name])

    if config.allow_runtime_lora:
        _add_runtime_lora_routes(app, engine, model_id, adapters, served, calls, load_adapter)

    @app.get("/", response_class=HTMLResponse)
    async def playground() -> HTMLResponse:
        return HTMLResponse(PLAYGROUND_HTML.replace("{{MODEL}}", model_id))

    async def start_chat(body: ChatRequest, request: Request) -> tuple[list[Job], int, Optional[CallFormat], str]:
        """(the jobs of a chat request, submitted to the engine; its prompt tokens; with tools, the form the reply's
        calls are written in, else None; the model it names)."""
        name, generator, adapter = pick(body.model)
        calls_in = calls[name]
        try:  # the conversation through the model's chat template, the reply's header last
            text = generator.render_chat(_turns(body.messages), _tools(body), body.chat_template_kwargs)
        except ConfigError as e:
            raise ApiError(422, str(e), "messages") from None
        tools, text_too = _tool_schema(body)
        if body.max_tokens is not None and body.max_completion_tokens is not None \
                and body.max_tokens != body.max_completion_tokens:
            raise ApiError(422, "max_tokens and max_completion_tokens differ: give one of them", "max_tokens")
        max_tokens = body.max_completion_tokens or body.max_tokens or min(CHAT_DEFAULT_MAX_TOKENS, config.max_tokens)
        ids = _text_ids(generator, text, max_prompt_tokens)
        if body.top_logprobs is not None and not body.logprobs:
            raise ApiError(422, "top_logprobs needs logprobs: true", "top_logprobs")
        stop = [] if tools is not None and not text_too else [generator.chat_stop()]  # a call ends itself
        jobs, prompt_tokens = _jobs_for(body, [ids], request, config, name, max_tokens, CHAT_UNSUPPORTED,
                                        generator.tokenizer, extra_stop=stop, max_prompt_tokens=max_prompt_tokens,
                                        calls_in=calls_in)
        jobs[0].adapter = adapter
        if body.logprobs:
            jobs[0].logprobs = body.top_logprobs or 0
        await _build_automaton(jobs, config, automata, "tools" if tools is not None else None)
        try:
            engine.submit(jobs)
        except Busy as e:
            raise ApiError(429, f"the server is at capacity ({e}); retry after {RETRY_AFTER_S} s",
                           headers={"Retry-After": str(RETRY_AFTER_S)})
        return jobs, prompt_tokens, (calls_in if tools is not None else None), name

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatRequest, request: Request) -> Response:
        jobs, prompt_tokens, tools, name = await start_chat(body, request)
        head = {"id": f"chatcmpl-{uuid.uuid4().hex[:24]}", "object": "chat.completion", "created": int(time.time()),
                "model": name}
        if body.stream:
            include_usage = body.stream_options is not None and body.stream_options.include_usage
            return GuardedStream(_sse(jobs, {**head, "object": "chat.completion.chunk"}, prompt_tokens,
                                      include_usage, config.timeout, chat=True, tokenizer=generator.tokenizer,
                                      tools=tools), config.stall_timeout)
        finished = await _wait_all(jobs, request, config.timeout)
        if finished is None:
            return Response(status_code=499)
        choices = [{"index": i, **_reply(c.text, c.finish, tools),
                    "logprobs": None if job.logprobs is None else _chat_logprobs(generator.tokenizer, c.logprobs)}
                   for job in finished for i, c in enumerate(job.choices)]
        completion_tokens = sum(c.tokens for job in finished for c in job.choices)
        return JSONResponse({**head, "choices": choices, "usage": {
            "prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}})

    stored = ResponseStore()

    @app.post("/v1/responses")
    async def responses(body: ResponsesRequest, request: Request) -> Response:
        history: list[dict] = []
        if body.previous_response_id is not None:
            found = stored.get(body.previous_response_id)
            if found is None:
                raise ApiError(404, f"no stored response {body.previous_response_id!r} (this server keeps the newest "
                               "responses stored with store: true, until it restarts)", "previous_response_id")
            history = found[1]
        try:
            chat = ChatRequest(**chat_body(body, history))
        except ResponsesError as e:
            raise ApiError(422, e.message, e.param) from None
        except ValidationError as e:  # on what the translation passed through (a message, a tool)
            raise ApiError(422, "the request as a chat: "
                           f"{_validation_message(list(e.errors()), '/v1/chat/completions')[0]}", "input") from None
        messages = [m.model_dump(exclude_none=True) for m in chat.messages[1 if body.instructions else 0:]]
        try:
            jobs, prompt_tokens, tools, name = await start_chat(chat, request)
        except ApiError as e:  # the chat's fields, by their names here
            e.param = {"prompt": "input", "messages": "input", "max_completion_tokens": "max_output_tokens",
                       "response_format": "text"}.get(e.param, e.param)
            raise
        response_id = f"resp_{uuid.uuid4().hex[:24]}"
        if body.stream:  # the chat's stream of chunks, read as Responses events
            chunks = _sse(jobs, {"id": response_id, "object": "chat.completion.chunk", "created": int(time.time()),
                                 "model": name}, prompt_tokens, True, config.timeout, chat=True,
                          tokenizer=generator.tokenizer, tools=tools)
            return GuardedStream(_response_events(body, response_id, chunks, messages, name), config.stall_timeout)
        created = time.time()
        finished = await _wait_all(jobs, request, config.timeout)
        if finished is None:
            return Response(status_code=499)
        choice = finished[0].choices[0]
        reply = _reply(choice.text, choice.finish, tools)
        logprobs = None if finished[0].logprobs is None else _chat_logprobs(generator.tokenizer, choice.logprobs)
        usage = {"prompt_tokens": prompt_tokens, "completion_tokens": choice.tokens,
                 "total_tokens": prompt_tokens + choice.tokens}
        response = response_object(body, response_id, created, name,
                                   output_items(reply["message"], reply["finish_reason"], logprobs), usage,
                                   "completed")
        if body.store is not False:
            stored.put(response, history_of(messages, response["output"]), input_items(input_messages(body.input)))
        return JSONResponse(response)

    async def _response_events(body: ResponsesRequest, response_id: str, chunks: AsyncIterator[str],
                               messages: list[dict], name: str) -> AsyncIterator[str]:
        """The Responses stream events of a chat stream (serve.responses.StreamEvents), stored at the end."""
        events = StreamEvents(body, response_id, name)
        for event in events.start():
            yield event
        try:
            async for line in chunks:
                if line.startswith("data: {"):
                    for event in events.feed(json.loads(line[6:])):
                        yield event
            last = events.end()
            if body.store is not False and events.error is None:
                stored.put(events.response("completed"), history_of(messages, events.output),
                           input_items(input_messages(body.input)))
            yield last
        finally:
            await chunks.aclose()

    @app.get("/v1/responses/{response_id}")
    async def stored_response(response_id: str) -> dict:
        found = stored.get(response_id)
        if found is None:
            raise ApiError(404, f"no stored response {response_id!r}", "response_id")
        return found[0]

    @app.get("/v1/responses/{response_id}/input_items")
    async def stored_input_items(response_id: str) -> dict:
        found = stored.get(response_id)
        if found is None:
            raise ApiError(404, f"no stored response {response_id!r}", "response_id")
        items = found[2]
        return {"object": "list", "data": items, "first_id": items[0]["id"] if items else None,
                "last_id": items[-1]["id"] if items else None, "has_more": False}

    @app.delete("/v1/responses/{response_id}")
    async def delete_response(response_id: str) -> dict:
        if not stored.delete(response_id):
            raise ApiError(404, f"no stored response {response_id!r}", "response_id")
        return {"id": response_id, "object": "response", "deleted": True}

    @app.post("/tokenize")
    async def tokenize(body: TokenizeRequest) -> dict:
        _, generator, _ = pick(body.model)  # its template
        if (body.prompt is None) == (body.messages is None):
            raise ApiError(422, "give a prompt or messages (one of them)", "prompt")
        try:  # the text /v1/completions or /v1/chat/completions would feed the model
            text = generator.render(body.prompt) if body.messages is None else \
                generator.render_chat(_turns(body.messages), _tools(body), body.chat_template_kwargs)
        except ConfigError as e:
            raise ApiError(422, str(e), "prompt" if body.messages is None else "messages") from None
        tokenizer = generator.tokenizer
        ids = prompt_ids(tokenizer, text) if body.add_special_tokens else tokenizer.encode(text)
        return {"count": len(ids), "max_model_len": generator.model.config.block_size,
                "max_prompt_tokens": max_prompt_tokens, "tokens": ids,
                "token_strs": [tokenizer.token_text(t) for t in ids]}

    @app.post("/detokenize")
    async def detokenize(body: DetokenizeRequest) -> dict:
        pick(body.model)  # all share the base's tokenizer
        vocab = generator.tokenizer.vocab_size
        bad = next((t for t in body.tokens if not 0 <= t < vocab), None)
        if bad is not None:
            raise ApiError(422, f"token id {bad} is outside the vocabulary (0 to {vocab - 1})", "tokens")
        return {"prompt": generator.tokenizer.decode(body.tokens)}

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request) -> Response:
        name, generator, adapter = pick(body.model)
        prompts = body.prompt if isinstance(body.prompt, list) and not _is_ids(body.prompt) else [body.prompt]
        if not prompts:
            raise ApiError(422, "prompt is an empty list: give a string, a list of strings or token ids", "prompt")
        if len(prompts) > config.max_prompts:
            raise ApiError(422, f"{len(prompts)} prompts in one request; at most {config.max_prompts} "
                           "(serve.max_prompts)", "prompt")
        ids = [_token_ids(generator, p, max_prompt_tokens) if isinstance(p, list) else
               _text_ids(generator, p, max_prompt_tokens, template=True) for p in prompts]
        max_tokens = 16 if body.max_tokens is None else body.max_tokens
        jobs, prompt_tokens = _jobs_for(body, ids, request, config, name, max_tokens, UNSUPPORTED,
                                        generator.tokenizer, max_prompt_tokens=max_prompt_tokens)
        n, best_of = body.n or 1, jobs[0].config.num_return_sequences  # best_of: the candidates _jobs_for asked for
        for job in jobs:  # best_of ranks its candidates by their tokens' log probabilities
            job.logprobs, job.echo = body.logprobs if best_of == n else (body.logprobs or 0), bool(body.echo)
            job.adapter = adapter
        await _build_automaton(jobs, config, automata)
        try:
            engine.submit(jobs)
        except Busy as e:
            raise ApiError(429, f"the server is at capacity ({e}); retry after {RETRY_AFTER_S} s",
                           headers={"Retry-After": str(RETRY_AFTER_S)})
        head = {"id": f"cmpl-{uuid.uuid4().hex[:24]}", "object": "text_completion", "created": int(time.time()),
                "model": name}
        echoed = [generator.tokenizer.decode(job.prompt_ids) if body.echo else "" for job in jobs]
        if body.stream:
            include_usage = body.stream_options is not None and body.stream_options.include_usage
            return GuardedStream(_sse(jobs, head, prompt_tokens, include_usage, config.timeout, echoed=echoed,
                                      tokenizer=generator.tokenizer), config.stall_timeout)
        finished = await _wait_all(jobs, request, config.timeout)
        if finished is None:  # the client left; nobody reads this
            return Response(status_code=499)
        completion_tokens = sum(c.tokens for job in finished for c in job.choices)  # every candidate counts
        choices = [{"text": prefix + c.text, "index": p * n + i, "finish_reason": c.finish,
                    "logprobs": None if body.logprobs is None else _logprobs_body(generator.tokenizer, job, c, prefix)}
                   for p, (job, prefix) in enumerate(zip(finished, echoed))
                   for i, c in enumerate(_best(job.choices, n) if best_of > n else job.choices)]
        return JSONResponse({**head, "choices": choices, "usage": {
            "prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}})



def _add_runtime_lora_routes(app: FastAPI, engine: Engine, model_id: str, adapters: dict[str, TextGenerator],
                             served: dict[str, tuple[TextGenerator, Optional[str]]], calls: dict[str, Any],
                             load_adapter: Callable[[str, str], TextGenerator]) -> None:
    """POST /v1/load_lora_adapter and /v1/unload_lora_adapter (vLLM's): a LoRA run of the served model added or
    taken off while serving, on the worker thread between steps; `adapters` (what /v1/models lists), `served` and
    `calls` (what requests may name) follow."""
    from lmforge.lora import remove_adapter_set
    from lmforge.serve.config import ADAPTER_NAME

    @app.post("/v1/load_lora_adapter")
    async def load_lora(body: LoadLoRARequest) -> dict:
        name = body.lora_name
        if not ADAPTER_NAME.fullmatch(name):
            raise ApiError(400, f"lora_name {name!r} is not letters, digits, '-' and '_'", "lora_name")
        if name in served:
            raise ApiError(400, f"the model {name!r} is served already; unload it first to load another run under "
                           "its name", "lora_name")

        def load() -> TextGenerator:
            loaded = load_adapter(name, body.lora_path)
            engine.adapters.add(name)
            return loaded

        try:
            loaded = await asyncio.wrap_future(engine.call(load))
        except LmforgeError as e:
            raise ApiError(400, str(e), "lora_path") from None
        adapters[name], served[name], calls[name] = loaded, (loaded, name), loaded.call_format()
        return {"object": "model", "id": name, "parent": model_id, "loaded": True}

    @app.post("/v1/unload_lora_adapter")
    async def unload_lora(body: UnloadLoRARequest) -> dict:
        name = body.lora_name
        if name not in adapters:
            raise ApiError(404, f"no LoRA adapter {name!r} is loaded here ({', '.join(map(repr, adapters)) or 'none'})",
                           "lora_name")

        def unload() -> bool:
            if engine.in_use(name):
                return False
            engine.adapters.discard(name)
            remove_adapter_set(engine.model, name)
            return True

        if not await asyncio.wrap_future(engine.call(unload)):
            raise ApiError(409, f"the model {name!r} is generating for requests; unload it once they are done",
                           "lora_name")
        for table in (adapters, served, calls):
            table.pop(name, None)
        return {"object": "model", "id": name, "deleted": True}


def _best(choices: list[Any], n: int) -> list[Any]:
    """best_of: the n candidates of highest mean log probability per token (OpenAI's rule), best first; a candidate
    without tokens ranks last."""
    def per_token(choice: Any) -> float:
        return sum(lp.logprob for lp in choice.logprobs) / len(choice.logprobs) if choice.logprobs else -math.inf

    return sorted(choices, key=per_token, reverse=True)[:n]


def _client(request: Request) -> str:
    """The client's address, whose places Worker.submit counts (a proxy in front makes every client one)."""
    return request.client.host if request.client is not None else ""


def _is_ids(prompt: list) -> bool:
    """A prompt given as token ids (a non-empty list of ints) rather than a list of prompts."""
    return bool(prompt) and isinstance(prompt[0], int)


def _text_ids(generator: TextGenerator, text: str, max_prompt_tokens: int, template: bool = False) -> list[int]:
    """A prompt text's token ids as the model reads them (<START> first; a fine-tuned model's prompt template
    applied when `template`), checked against the prompt cap."""
    try:
        text = generator.render(text) if template else text
    except ConfigError as e:
        raise ApiError(422, str(e), "prompt") from None
    ids = prompt_ids(generator.tokenizer, text)
    if not ids:
        raise ApiError(422, "the prompt is empty and the model has no start token; give some text", "prompt")
    if len(ids) > max_prompt_tokens:
        raise ApiError(422, f"the prompt is {len(ids)} tokens (with <START>); at most {max_prompt_tokens} "
                       "(serve.max_prompt_tokens)", "prompt")
    return ids


def _token_ids(generator: TextGenerator, ids: list[int], max_prompt_tokens: int) -> list[int]:
    """A prompt given as token ids, taken as they are once checked against the vocabulary and the prompt cap."""
    vocab = generator.tokenizer.vocab_size
    if not ids:
        raise ApiError(422, "a prompt of token ids is empty: give at least one id", "prompt")
    bad = next((i for i in ids if not 0 <= i < vocab), None)
    if bad is not None:
        raise ApiError(422, f"token id {bad} is outside the vocabulary (0 to {vocab - 1})", "prompt")
    if len(ids) > max_prompt_tokens:
        raise ApiError(422, f"the prompt is {len(ids)} tokens; at most {max_prompt_tokens} "
                       "(serve.max_prompt_tokens)", "prompt")
    return ids


def _jobs_for(body: Union[CompletionRequest, ChatRequest], prompts: list[list[int]], request: Request,
              config: ServeConfig, model_id: str, max_tokens: int, unsupported: dict[str, Any], tokenizer: Any,
              extra_stop: Optional[list[str]] = None, max_prompt_tokens: Optional[int] = None,
              calls_in: CallFormat = CALL_LINES) -> tuple[list[Job], int]:
    """Check a request against the caps and turn each of its prompts (token ids) into a Job; (jobs, prompt
    tokens). `tokenizer` encodes the bad words; `extra_stop` adds stop strings of the server's own (a chat's next
    user turn); `calls_in`: the form a chat's tool calls are written in."""
    _check_model(body.model, model_id)
    if max_tokens > config.max_tokens:
        raise ApiError(422, f"max_tokens={max_tokens} is above this server's cap of {config.max_tokens} "
                       "(serve.max_tokens)", "max_tokens")
    n = 1 if body.n is None else body.n
    if n > config.max_n:
        raise ApiError(422, f"n={n} is above this server's cap of {config.max_n} (serve.max_n)", "n")
    best_of = getattr(body, "best_of", None) or n  # completions: candidates generated, the best n returned
    if best_of < n:
        raise ApiError(422, f"best_of={best_of} is below n={n}: best_of counts the candidates the n come from",
                       "best_of")
    if best_of > config.max_n:
        raise ApiError(422, f"best_of={best_of} is above this server's cap of {config.max_n} (serve.max_n)",
                       "best_of")
    if best_of > n and body.stream:
        raise ApiError(422, "best_of above n cannot be streamed: the best are known only once all are done",
                       "best_of")
    if best_of > n and body.temperature == 0:
        raise ApiError(422, f"best_of={best_of} with temperature 0 would decode the same greedy text {best_of} "
                       "times: sample (temperature > 0) or leave best_of out", "best_of")
    stop = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
    if len(stop) > config.max_stop:
        raise ApiError(422, f"{len(stop)} stop sequences; at most {config.max_stop} (serve.max_stop)", "stop")
    for s in stop:
        if not s:
            raise ApiError(422, "an empty stop sequence would stop at once; remove it", "stop")
        if len(s) > config.max_stop_chars:
            raise ApiError(422, f"a stop sequence of {len(s)} characters; at most {config.max_stop_chars} "
                           "(serve.max_stop_chars)", "stop")
    bad_words = list(body.bad_words or [])
    if len(bad_words) > config.max_bad_words:
        raise ApiError(422, f"{len(bad_words)} bad words; at most {config.max_bad_words} (serve.max_bad_words)",
                       "bad_words")
    if any(len(w) > config.max_stop_chars for w in bad_words):
        raise ApiError(422, f"a bad word of more than {config.max_stop_chars} characters (serve.max_stop_chars)",
                       "bad_words")
    choices = body.guided_choice
    if choices is not None and len(choices) > config.max_choices:
        raise ApiError(422, f"{len(choices)} guided choices; at most {config.max_choices} (serve.max_choices)",
                       "guided_choice")
    schema, schema_field = _requested_schema(body)
    for name, text, most, limit in (("guided_regex", body.guided_regex, config.max_regex_chars, "max_regex_chars"),
                                    (schema_field, schema, config.max_schema_chars, "max_schema_chars")):
        name = name.split()[0]  # "tools (auto)": tools
        if text is not None and len(text) > most:
            raise ApiError(422, f"a {name} of {len(text)} characters; at most {most} (serve.{limit})", name)
    if any(len(c) > config.max_stop_chars for c in choices or ()):
        raise ApiError(422, f"a guided choice of more than {config.max_stop_chars} characters "
                       "(serve.max_stop_chars)", "guided_choice")
    regex = body.guided_regex
    bias = {}
    for key, value in (body.logit_bias or {}).items():
        if not re.fullmatch(r"[0-9]+", key):
            raise ApiError(422, f"logit_bias has the key {key!r}: keys are token ids, such as \"50256\"", "logit_bias")
        bias[int(key)] = value
    for name, neutral in unsupported.items():
        value = getattr(body, name)
        if value is not None and value != neutral:
            raise ApiError(422, f"{name}={value!r} is not supported by lmforge serve (leave it out, or "
                           f"{json.dumps(neutral)})", name)
    temperature = 1.0 if body.temperature is None else body.temperature
    stop += [s for s in extra_stop or [] if s not in stop]
    try:  # the sampling values are checked where the library and the CLI check them
        if schema_field.startswith("tools"):  # calls (one per line, or one), or with "auto" text instead
            regex = _calls_regex(schema, getattr(body, "parallel_tool_calls", None) is not False,
                                 text_too=schema_field == "tools (auto)", fmt=calls_in)
            schema = None
        options = GenerateConfig(max_new_tokens=max_tokens, greedy=temperature == 0.0, temperature=temperature,
                                 top_k=body.top_k, top_p=None if body.top_p in (None, 1.0) else body.top_p,
                                 min_p=body.min_p, repetition_penalty=1.0 if body.repetition_penalty is None
                                 else body.repetition_penalty, seed=body.seed, num_return_sequences=best_of,
                                 stop_strings=stop or None, presence_penalty=body.presence_penalty or 0.0,
                                 frequency_penalty=body.frequency_penalty or 0.0, logit_bias=bias or None,
                                 typical_p=None if body.typical_p in (None, 1.0) else body.typical_p,
                                 min_new_tokens=body.min_tokens or 0, bad_words=bad_words or None,
                                 guided_choice=choices, guided_regex=regex, guided_json=schema,
                                 guidance_scale=1.0 if body.guidance_scale is None else body.guidance_scale,
                                 negative_prompt=body.negative_prompt,
                                 token_healing=bool(getattr(body, "token_healing", None)))
        options = with_token_ids(options, tokenizer)
        options.check_vocabulary(tokenizer.vocab_size)
        negative = len(options.negative_prompt_ids or ())
        if max_prompt_tokens is not None and negative > max_prompt_tokens:
            raise ApiError(422, f"the negative_prompt is {negative} tokens (with <START>); at most "
                           f"{max_prompt_tokens} (serve.max_prompt_tokens)", "negative_prompt")
    except ConfigError as e:
        field = re.match(r"generate\.(\w+)", str(e))
        field = "tools" if schema_field.startswith("tools") else field.group(1) if field else None
        raise ApiError(422, str(e).removeprefix("generate."), field) from None
    mailbox = Mailbox(asyncio.get_running_loop())
    deadline, client = time.monotonic() + config.timeout, _client(request)
    jobs = [Job(ids, options, bool(body.stream), deadline, mailbox, first_index=i * n, client=client)
            for i, ids in enumerate(prompts)]
    return jobs, sum(len(ids) for ids in prompts)


async def _build_automaton(jobs: list[Job], config: ServeConfig, one_at_a_time: asyncio.Semaphore,
                           field: Optional[str] = None) -> None:
    """A request's guided_regex / guided_json as an automaton, built in a child process within serve.regex_timeout
    (generate.automaton), one request at a time, before its jobs reach the engine; 422 when it cannot be, 429 while
    another request's takes the whole timeout."""
    pattern = jobs[0].config.guided_pattern
    if pattern is None:
        return
    try:
        await asyncio.wait_for(one_at_a_time.acquire(), config.regex_timeout)
    except asyncio.TimeoutError:
        raise ApiError(429, "the server is building another request's guided_regex automaton; retry after "
                       f"{RETRY_AFTER_S} s", headers={"Retry-After": str(RETRY_AFTER_S)}) from None
    try:
        await asyncio.to_thread(build_automaton, pattern, config.regex_timeout)
    except ConfigError as e:
        field = field or ("guided_regex" if jobs[0].config.guided_regex is not None else "guided_json")
        raise ApiError(422, str(e).removeprefix("generate."), field) from None
    finally:
        one_at_a_time.release()


def _turns(messages: list[ChatMessage]) -> list[dict]:
    """The conversation's turns as the chat template reads them (data.conversation: an assistant turn's tool_calls
    kept, their arguments read from JSON text; render_chat checks them)."""
    return [m.model_dump(include={"role", "content", "tool_calls", "tool_call_id", "name"}, exclude_none=True)
            | {"content": m.content} for m in messages]


def _tools(body: Any) -> Optional[list[dict]]:
    """The request's function tools as the chat template lists them (apply_chat_template's tools), or None."""
    tools = getattr(body, "tools", None)
    return [t.model_dump(exclude_none=True) for t in tools] if tools else None


def _tool_schema(body: SamplingRequest) -> tuple[Optional[dict], bool]:
    """(the JSON schema of a call a chat request's tools and tool_choice allow, or None; whether the reply may be
    text instead). A call is {"name": <a tool's name>, "arguments": <its parameters>}, of the named tool, or of any
    ("required", and "auto", the default with tools, where a reply that does not begin with "{" is text)."""
    tools, choice = getattr(body, "tools", None), getattr(body, "tool_choice", None)
    if not tools:
        if choice not in (None, "none"):
            raise ApiError(422, "tool_choice needs tools", "tool_choice")
        return None, True
    if choice == "none":
        return None, True
    if choice not in (None, "auto", "required"):
        name = choice.get("function", {}).get("name") if isinstance(choice.get("function"), dict) else None
        if choice.get("type") != "function" or name is None:
            raise ApiError(422, 'tool_choice is "none", "auto", "required" or {"type": "function", "function": '
                           '{"name": ...}}', "tool_choice")
        tools = [t for t in tools if t.function.name == name]
        if not tools:
            raise ApiError(422, f"tool_choice names the function {name!r}, which is not among the tools",
                           "tool_choice")
    calls = [{"type": "object", "required": ["name", "arguments"], "properties": {
        "name": {"const": t.function.name},  # the parameters' own $defs: '#' in them means the parameters ($id)
        "arguments": {"$id": f"tool:{t.function.name}",
                      **(t.function.parameters or {"type": "object", "additionalProperties": False})}}}
             for t in tools]
    return (calls[0] if len(calls) == 1 else {"anyOf": calls}), choice in (None, "auto")


def _calls_regex(schema: str, parallel: bool, text_too: bool, fmt: CallFormat = CALL_LINES) -> str:
    """The regular expression of a reply under tools: one call of `schema` (JSON text), or with `parallel` one or
    more, in the form the chat template writes them (`fmt`: data.tasks.call_format; lmforge's own, one per line, as a
    conversation shows an assistant turn's calls); with `text_too` ("auto") also text that does not begin as a call
    does (with "{", or the form's first character), or nothing."""
    from lmforge.generate.json_schema import json_schema_regex

    calls_schema = json.loads(schema)
    for call in calls_schema.get("anyOf", [calls_schema]):  # the form's own key names
        keys = {"name": fmt.name_key, "arguments": fmt.args_key}
        call["properties"] = {keys[k]: v for k, v in call["properties"].items()}
        call["required"] = [keys[k] for k in call["required"]]
        if fmt.id_key is not None:  # Mistral's: each call's id (9 letters and digits) after its arguments
            call["properties"][fmt.id_key] = {"type": "string", "pattern": "[A-Za-z0-9]{9}"}
            call["required"].append(fmt.id_key)
    call = json_schema_regex(calls_schema)
    more = f"(?:{re.escape(fmt.mid)}{call})*" if parallel and fmt.mid is not None else ""
    calls = f"{re.escape(fmt.lead)}{call}{more}{re.escape(fmt.tail)}"
    return f"(?:{calls}|(?:[^{re.escape((fmt.lead + '{')[0])}][\\s\\S]*)?)" if text_too else calls


class _CallDeltas:
    """The deltas of one streamed chat choice under tools: text, or, for a reply that begins as a call (with "{",
    or the first character of the form the chat template writes calls in: data.tasks.CallFormat), OpenAI's
    tool_call deltas of its calls, each numbered by its index: the call's id and name once `{"name": ...,
    "arguments": ` (in the form's key names) is complete, then its arguments as they come, up to where their JSON
    value ends (a call is complete once its text is a whole JSON object; the reply is written as json.dumps writes
    it). What the form writes around and between calls, and an id the model writes after the arguments (Mistral's),
    are not part of them: a call's id is the server's own (9 letters and digits where the template asks for such)."""

    def __init__(self, fmt: CallFormat = CALL_LINES) -> None:
        self.fmt = fmt
        self.head = re.compile(r"\{" + re.escape(json.dumps(fmt.name_key)) + r': ("(?:[^"\\]|\\.)*"), '
                               + re.escape(json.dumps(fmt.args_key)) + ": ")
        self.text, self.sent, self.call = "", 0, None
        self.index, self.start, self.named, self.complete = 0, len(fmt.lead), False, False  # the call being written
        self.arguments = 0  # where its arguments begin, once named
        self.end = 0  # where the last complete call ended

    def push(self, piece: str) -> list[dict]:
        self.text += piece
        if self.call is None and self.text:
            self.call = self.text.startswith((self.fmt.lead + "{")[0])
        if not self.call:  # text (or nothing yet)
            out, self.sent = self.text[self.sent:], len(self.text)
            return [{"content": out}] if out else []
        deltas = []
        while True:
            if self.complete:  # the next call starts after the form's text between two calls
                mid = self.fmt.mid
                if mid is None or not self.text.startswith(mid + "{", self.end):
                    return deltas
                self.index, self.named, self.complete = self.index + 1, False, False
                self.start = self.end + len(mid)
            if not self.named:
                head = self.head.match(self.text, self.start)
                if head is None:
                    return deltas
                self.named, self.sent = True, head.end()
                call_id = uuid.uuid4().hex[:9] if self.fmt.id_key else f"call_{uuid.uuid4().hex[:24]}"
                deltas.append({"tool_calls": [{"index": self.index, "id": call_id, "type": "function",
                                               "function": {"name": json.loads(head.group(1)), "arguments": ""}}]})
                self.arguments = head.end()
            end, upto = _json_end(self.text, self.start), _json_end(self.text, self.arguments)  # the call is a whole
            upto = len(self.text) if upto is None else upto  # object; its arguments end where their value does
            if upto > self.sent:
                deltas.append({"tool_calls": [{"index": self.index,
                                               "function": {"arguments": self.text[self.sent:upto]}}]})
                self.sent = upto
            if end is None:
                return deltas
            self.complete, self.end = True, end

    def finish(self, reason: str) -> tuple[list[dict], str]:
        """(the last deltas, the finish reason): complete calls end "tool_calls"; a cut one ends with its arguments
        so far (cut before the first call's name, the reply is its text, as content)."""
        if self.call and self.complete and reason == "stop":
            return [], "tool_calls"
        if self.call and not self.named and self.index == 0:  # cut before a name: the text, as a whole reply gives it
            return ([{"content": self.text}] if self.text else []), reason
        return [], reason


def _json_end(text: str, start: int) -> Optional[int]:
    """Where the JSON value that begins at text[start] ends, or None while it is not whole."""
    try:
        return json.JSONDecoder().raw_decode(text, start)[1]
    except ValueError:
        return None


def _reply(text: str, finish: str, calls_in: Optional[CallFormat]) -> dict:
    """A chat choice's message and finish_reason: the text, or (tools: the form calls are written in) the calls it
    holds, as its streamed deltas (_CallDeltas) add up: complete calls end "tool_calls", a cut one "length" with its
    arguments so far."""
    if calls_in is None:
        return {"message": {"role": "assistant", "content": text}, "finish_reason": finish}
    deltas = _CallDeltas(calls_in)
    pieces = deltas.push(text)
    last, finish = deltas.finish(finish)
    calls: dict[int, dict] = {}
    for c in (c for d in pieces + last for c in d.get("tool_calls", [])):
        if "id" in c:
            calls[c["index"]] = {"id": c["id"], "type": "function", "function": {**c["function"]}}
        else:
            calls[c["index"]]["function"]["arguments"] += c["function"]["arguments"]
    if not calls:
        return {"message": {"role": "assistant", "content": text}, "finish_reason": finish}
    return {"message": {"role": "assistant", "content": None, "tool_calls": list(calls.values())},
            "finish_reason": finish}


def _requested_schema(body: SamplingRequest) -> tuple[Optional[str], str]:
    """(the JSON schema a request asks its output to follow, as JSON text, or None; the field that asked): vLLM's
    guided_json, OpenAI's response_format (json_schema, or json_object: any object), or a chat's tools ("tools",
    or "tools (auto)" where the reply may be text instead of a call)."""
    tools, text_too = _tool_schema(body)
    if tools is not None:
        if body.guided_json is not None or body.response_format is not None or body.guided_regex is not None:
            raise ApiError(422, "tools and guided_json / guided_regex / response_format all say what the reply must "
                           "be: give one (or tool_choice \"none\")", "tools")
        return json.dumps(tools), "tools" if not text_too else "tools (auto)"
    fmt = body.response_format
    if fmt is None or fmt.get("type") == "text" and set(fmt) == {"type"}:
        schema = body.guided_json
        return (schema if isinstance(schema, str) or schema is None else json.dumps(schema)), "guided_json"
    if body.guided_json is not None:
        raise ApiError(422, "guided_json and response_format both give a schema: give one", "response_format")
    if fmt == {"type": "json_object"}:  # any JSON object (its values scalars, or arrays and objects of them)
        return json.dumps({"type": "object"}), "response_format"
    inner = fmt.get("json_schema")
    if fmt.get("type") != "json_schema" or set(fmt) != {"type", "json_schema"} or not isinstance(inner, dict) \
            or not isinstance(inner.get("schema"), dict) or set(inner) - {"name", "description", "schema", "strict"}:
        raise ApiError(422, 'response_format must be {"type": "text"}, {"type": "json_object"} or {"type": '
                       '"json_schema", "json_schema": {"name": ..., "schema": {...}}}', "response_format")
    return json.dumps(inner["schema"]), "response_format"


def _logprobs_body(tokenizer: Any, job: Job, choice: Any, echoed: str) -> dict:
    """OpenAI's completions `logprobs` of one choice: tokens, token_logprobs, top_logprobs, text_offset; the
    prompt's tokens first when echoed (its first token has no logprob: nothing comes before it)."""
    entries = _prompt_entries(tokenizer, job) if job.echo else []
    entries += [(lp.token, lp, len(echoed) + at) for lp, at in zip(choice.logprobs, choice.offsets)]
    return _logprobs_json(tokenizer, entries)


def _prompt_entries(tokenizer: Any, job: Job) -> list[tuple[int, Optional[Logprobs], int]]:
    """(token, its Logprobs or None, where its text starts) for each prompt token of an echoed job."""
    pieces, stream = [], tokenizer.stream_decoder()
    for token in job.prompt_ids:
        pieces.append(stream.push(token))
    pieces.append(stream.flush())
    # the echoed text is the prompt decoded whole: SentencePiece-style tokenizers drop the first word's space there
    dropped = sum(map(len, pieces)) - len(tokenizer.decode(job.prompt_ids))
    entries, offset = [], 0
    for token, lp, piece in zip(job.prompt_ids, job.prompt_logprobs, pieces):
        entries.append((token, lp, max(0, offset - dropped)))
        offset += len(piece)
    return entries


def _logprobs_json(tokenizer: Any, entries: list[tuple[int, Optional[Logprobs], int]]) -> dict:
    """The `logprobs` object of (token, Logprobs or None, text offset) entries, whole or one stream chunk's."""
    return {"tokens": [tokenizer.token_text(token) for token, _, _ in entries],
            "token_logprobs": [lp.logprob if lp else None for _, lp, _ in entries],
            "top_logprobs": [{tokenizer.token_text(t): v for t, v in lp.top} if lp else None for _, lp, _ in entries],
            "text_offset": [at for _, _, at in entries]}


def _chat_logprobs(tokenizer: Any, logprobs: list[Logprobs]) -> dict:
    """Chat's `logprobs` object for these tokens: {"content": [{token, logprob, bytes, top_logprobs}]}, as OpenAI
    gives it (bytes: the token's UTF-8 bytes, which may be part of a character)."""
    def entry(token: int, logprob: float) -> dict:
        return {"token": tokenizer.token_text(token), "logprob": logprob, "bytes": list(tokenizer.id_to_bytes(token))}

    return {"content": [{**entry(lp.token, lp.logprob), "top_logprobs": [entry(t, v) for t, v in lp.top]}
                        for lp in logprobs]}


LATE = 5.0  # seconds past its deadline that a handler waits for the worker's own 504 (a long step in progress)


async def _wait_all(jobs: list[Union[Job, ClassifyJob]], request: Request,
                    timeout: float) -> Optional[list[Union[Job, ClassifyJob]]]:
    """The jobs (sharing one mailbox) once all are done, or None if the client disconnected first; raises ApiError
    on an error.

    Polls the connection between events, so a client that leaves stops its generation: however this returns, the
    jobs are cancelled (a finished job has nothing left to stop).
    """
    give_up, pending = time.monotonic() + timeout + LATE, len(jobs)
    try:
        while pending:
            event = await jobs[0].mailbox.get(0.25)
            if event is None:
                if await request.is_disconnected():
                    return None
                if time.monotonic() > give_up:
                    raise ApiError(504, "the request timed out")
            elif event[0] == "done":
                pending -= 1
            elif event[0] == "error":
                raise ApiError(event[1], event[2])
        return jobs
    finally:
        for job in jobs:
            job.cancel()


class GuardedStream(StreamingResponse):
    """Server-sent events whose every send must complete within `stall_timeout`. A client that stops reading
    fills its socket buffer and the send waits; at the deadline the stream ends: its generator is closed, which
    cancels its jobs, and the connection is reset (connections.RESET_EXTENSION: a plain close would wait for the
    reader to take the unsent bytes). (When the buffers have room but the events pile up, the Engine pauses the
    decode and cancels it after stall_timeout.) Either way a stalled reader holds its places for about
    stall_timeout."""

    def __init__(self, content: AsyncIterator[str], stall_timeout: float) -> None:
        super().__init__(content, media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        self.stall_timeout = stall_timeout

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        stalled = False

        async def guarded(message: dict) -> None:
            nonlocal stalled
            try:
                await asyncio.wait_for(send(message), self.stall_timeout)
            except asyncio.TimeoutError:
                stalled = True
                raise

        try:
            await super().__call__(scope, receive, guarded)
        except BaseException:  # (anyio may wrap the timeout in an exception group)
            if not stalled:
                raise
            client = scope.get("client") or ("?", 0)
            log.warning("closing a stream to %s:%s: it read nothing for %s s (serve.stall_timeout)",
                        client[0], client[1], self.stall_timeout)
            reset = scope.get("extensions", {}).get(RESET_EXTENSION)
            if reset is not None:  # under lmforge's own protocol (connections.py)
                reset()
        finally:
            await self.body_iterator.aclose()  # its finally clause cancels the jobs


async def _sse(jobs: list[Job], head: dict, prompt_tokens: int, include_usage: bool, timeout: float,
               chat: bool = False, echoed: Optional[list[str]] = None, tokenizer: Any = None,
               tools: Optional[CallFormat] = None) -> AsyncIterator[str]:
    """Server-sent events: one chunk per text piece or finished choice, then usage (if asked), then [DONE].
    Chat chunks carry `delta`s (the assistant role first), completion chunks `text` (the prompt's text first
    when `echoed` has it). With `logprobs`, each chunk carries those of its own tokens (a completion's with text
    offsets in the whole choice's text, as without stream); an echoed prompt's chunk, with its scores, waits for
    them. With `tools`, a chat choice that is a call streams as tool_call deltas (_CallDeltas).

    A client that disconnects cancels this generator (Starlette's disconnect listener); the finally
    clause then tells the worker to drop the jobs before their next token.
    """
    echoed = echoed or [""] * len(jobs)
    shift = {job.first_index + i: len(echo) for job, echo in zip(jobs, echoed) for i in range(job.n)}

    calls = {job.first_index + i: _CallDeltas(tools) for job in jobs for i in range(job.n)} if tools else {}

    def chunk(index: int, text: str, finish: Optional[str], role: bool = False, logprobs: Optional[list] = None,
              entries: Optional[list] = None, delta: Optional[dict] = None) -> str:
        """`logprobs`: (Logprobs, offset in the choice's text) of the engine's event; `entries`: whole entries;
        `delta`: a chat chunk's delta, when not the text."""
        if chat:
            if delta is None:
                delta = {"role": "assistant", "content": ""} if role else ({"content": text} if text else {})
            choice = {"index": index, "delta": delta, "finish_reason": finish,
                      "logprobs": None if logprobs is None else _chat_logprobs(tokenizer, [lp for lp, _ in logprobs])}
        else:
            if logprobs is not None:
                entries = [(lp.token, lp, shift[index] + at) for lp, at in logprobs]
            choice = {"text": text, "index": index, "finish_reason": finish,
                      "logprobs": None if entries is None else _logprobs_json(tokenizer, entries)}
        return f"data: {json.dumps({**head, 'choices': [choice]})}\n\n"

    pending = len(jobs)
    try:
        for job, echo in zip(jobs, echoed):
            for i in range(job.n):
                if chat or (echo and job.logprobs is None):
                    yield chunk(job.first_index + i, echo, None, role=chat)
        while pending:
            event = await jobs[0].mailbox.get(timeout + LATE) or ("error", 504, "the request timed out")
            if event[0] == "piece" and event[1] in calls:
                deltas = calls[event[1]].push(event[2])
                for k, delta in enumerate(deltas):  # the logprobs ride on the first
                    yield chunk(event[1], "", None, logprobs=event[3] if k == 0 else None, delta=delta)
                if not deltas and event[3]:
                    yield chunk(event[1], "", None, logprobs=event[3], delta={})
            elif event[0] == "piece":
                yield chunk(event[1], event[2], None, logprobs=event[3])
            elif event[0] == "finish" and event[1] in calls:
                deltas, reason = calls[event[1]].finish(event[2])
                for delta in deltas:
                    yield chunk(event[1], "", None, delta=delta)
                yield chunk(event[1], "", reason, logprobs=event[3], delta={})
            elif event[0] == "finish":
                yield chunk(event[1], "", event[2], logprobs=event[3])
            elif event[0] == "prompt":  # an echoed prompt, now scored (before any of the job's pieces)
                job = event[1]
                echo = echoed[jobs.index(job)]
                for i in range(job.n):
                    yield chunk(job.first_index + i, echo, None, entries=_prompt_entries(tokenizer, job))
            elif event[0] == "done":
                pending -= 1
            else:
                yield f"data: {json.dumps(error_body(event[1], event[2]))}\n\n"
                break
        else:
            if include_usage:
                completion_tokens = sum(c.tokens for job in jobs for c in job.choices)
                usage = {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                         "total_tokens": prompt_tokens + completion_tokens}
                yield f"data: {json.dumps({**head, 'choices': [], 'usage': usage})}\n\n"
        yield "data: [DONE]\n\n"
    finally:
        for job in jobs:
            job.cancel()
