"""The HTTP API: OpenAI-compatible completions over one model, with limits that keep it up under load.

    GET  /health          liveness and load (no API key needed)
    GET  /v1/models       the one model served, with its task: "generate" or "classify" (and its labels)
    POST /v1/completions  OpenAI completions: prompt (string or list), max_tokens, temperature, top_p, n,
                          stop, seed, stream (server-sent events ending in `data: [DONE]`), usage counts
    POST /v1/chat/completions  OpenAI chat: messages through the model's chat template, the same options
    POST /v1/classify     a classifier's labels with probabilities for a text or a list of texts (top_k)
    GET  /                the playground page (static; it asks for the API key itself); for a classifier
                          a note pointing to /v1/classify

A language model answers /v1/classify, and a classifier the two completion endpoints, with 400 naming the
endpoint to use.

What a request may ask is capped (ServeConfig); a request over a cap gets 413 (body size) or 422 (with
a message naming the field), a malformed or unknown field 422, a full server 429 with Retry-After, a
request past its time 504. Generation runs on the Engine's worker thread, classification on the
ClassifyEngine's, never on the event loop.
Errors have OpenAI's shape: {"error": {"message", "type", "param", "code"}}.
"""

from __future__ import annotations

import asyncio
import json
import secrets
import time
import uuid
from contextlib import asynccontextmanager
from typing import Any, AsyncIterator, Literal, Optional, Union

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictInt
from starlette.exceptions import HTTPException as StarletteHTTPException

from lmforge.errors import ConfigError
from lmforge.generate import GenerateConfig, TextClassifier, TextGenerator, prompt_ids
from lmforge.serve.config import ServeConfig
from lmforge.serve.engine import Busy, ClassifyEngine, ClassifyJob, Engine, Job, Mailbox
from lmforge.serve.playground import CLASSIFIER_NOTE_HTML, PLAYGROUND_HTML

PUBLIC_PATHS = ("/health", "/")  # no API key: liveness, and the static page that asks for the key
RETRY_AFTER_S = 1  # what a 429 tells the client to wait: a queue slot frees as soon as one request ends


# ------------------------------------------------------------------------------------------- requests
class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    include_usage: StrictBool = False


class CompletionRequest(BaseModel):
    """The body of POST /v1/completions: OpenAI's fields (those lmforge cannot honour only at their neutral
    value, see UNSUPPORTED), plus top_k, min_p and repetition_penalty as vLLM has them; nothing else."""

    model_config = ConfigDict(extra="forbid")
    model: Optional[str] = None
    prompt: Union[str, list[str]] = ""
    max_tokens: Optional[StrictInt] = Field(16, ge=1)
    temperature: Optional[float] = Field(1.0, ge=0.0, le=100.0)
    top_p: Optional[float] = Field(1.0, gt=0.0, le=1.0)
    top_k: Optional[StrictInt] = Field(None, ge=1)
    min_p: Optional[float] = Field(None, ge=0.0, le=1.0)
    repetition_penalty: Optional[float] = Field(None, gt=0.0, le=100.0)
    n: Optional[StrictInt] = Field(1, ge=1)
    stop: Optional[Union[str, list[str]]] = None
    seed: Optional[StrictInt] = Field(None, ge=0, lt=2**63)
    stream: Optional[StrictBool] = False
    stream_options: Optional[StreamOptions] = None
    user: Optional[str] = None  # accepted for compatibility, unused
    frequency_penalty: Optional[float] = None
    presence_penalty: Optional[float] = None
    best_of: Optional[StrictInt] = None
    logprobs: Optional[StrictInt] = None
    echo: Optional[StrictBool] = None
    logit_bias: Optional[dict[str, float]] = None
    suffix: Optional[str] = None


# OpenAI fields that clients (LangChain, ...) send at their neutral value: accepted only at that value
UNSUPPORTED = {"frequency_penalty": 0.0, "presence_penalty": 0.0, "best_of": 1, "logprobs": None, "echo": False,
               "logit_bias": {}, "suffix": None}


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="forbid")
    role: Literal["system", "user", "assistant"]
    content: str
    name: Optional[str] = None  # accepted for compatibility, unused


class ChatRequest(BaseModel):
    """The body of POST /v1/chat/completions: OpenAI's chat fields (sampling as for completions), the
    conversation rendered through the model's chat template (see TextGenerator.render_chat)."""

    model_config = ConfigDict(extra="forbid")
    model: Optional[str] = None
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: Optional[StrictInt] = Field(None, ge=1)
    max_completion_tokens: Optional[StrictInt] = Field(None, ge=1)
    temperature: Optional[float] = Field(1.0, ge=0.0, le=100.0)
    top_p: Optional[float] = Field(1.0, gt=0.0, le=1.0)
    top_k: Optional[StrictInt] = Field(None, ge=1)
    min_p: Optional[float] = Field(None, ge=0.0, le=1.0)
    repetition_penalty: Optional[float] = Field(None, gt=0.0, le=100.0)
    n: Optional[StrictInt] = Field(1, ge=1)
    stop: Optional[Union[str, list[str]]] = None
    seed: Optional[StrictInt] = Field(None, ge=0, lt=2**63)
    stream: Optional[StrictBool] = False
    stream_options: Optional[StreamOptions] = None
    user: Optional[str] = None
    frequency_penalty: Optional[float] = None
    presence_penalty: Optional[float] = None
    logprobs: Optional[StrictBool] = None
    logit_bias: Optional[dict[str, float]] = None


CHAT_UNSUPPORTED = {"frequency_penalty": 0.0, "presence_penalty": 0.0, "logprobs": False, "logit_bias": {}}
CHAT_DEFAULT_MAX_TOKENS = 256  # OpenAI's chat API has no default length; a reply this long unless asked


class ClassifyRequest(BaseModel):
    """The body of POST /v1/classify: a text or a list of texts, and how many labels to give for each."""

    model_config = ConfigDict(extra="forbid")
    model: Optional[str] = None
    input: Union[str, list[str]]
    top_k: Optional[StrictInt] = Field(None, ge=1)  # None: every label


GENERATION_PATHS = ("/v1/completions", "/v1/chat/completions")


class ApiError(Exception):
    """An answer other than 200, with OpenAI's error body."""

    def __init__(self, status: int, message: str, param: Optional[str] = None,
                 headers: Optional[dict[str, str]] = None) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.headers = status, message, param, headers


_ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error",
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
    first = errors[0]
    loc = [str(x) for x in first.get("loc", ()) if x != "body"]
    loc = [x for x in loc if "[" not in x and x not in ("str", "int", "float", "bool")]  # union member tags
    field = ".".join(loc) or None
    if first.get("type") == "extra_forbidden":
        if loc and loc[0] == "messages":
            return f"unknown field {field!r}: a message takes role, content and name", field
        request, unsupported = {"/v1/chat/completions": (ChatRequest, CHAT_UNSUPPORTED),
                                "/v1/classify": (ClassifyRequest, {})}.get(path, (CompletionRequest, UNSUPPORTED))
        known = [f for f in request.model_fields if f not in unsupported]
        return f"unknown field {field!r}: {path} takes {', '.join(known)}", field
    if first.get("type") == "json_invalid":
        return f"the body is not valid JSON ({first.get('ctx', {}).get('error', 'parse error')})", None
    if first.get("type") == "missing" and field is None:
        return "the body is empty: send a JSON object", None
    return f"{field or 'body'}: {first.get('msg', 'invalid value')}", field


# ------------------------------------------------------------------------------------ body size, key
class GuardMiddleware:
    """Pure ASGI middleware: the API key check, then the body size cap (read at most max_body_bytes + 1)."""

    def __init__(self, app: Any, config: ServeConfig) -> None:
        self.app, self.config = app, config

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
        key = self.config.api_key
        if key is not None and scope["path"] not in PUBLIC_PATHS:
            given = headers.get("authorization", "")
            if not (given.startswith("Bearer ") and secrets.compare_digest(given[7:].encode(), key.encode())):
                response = error_response(401, "missing or wrong API key: send 'Authorization: Bearer KEY'",
                                          headers={"WWW-Authenticate": "Bearer"})
                return await response(scope, receive, send)
        limit = self.config.max_body_bytes
        too_large = error_response(413, f"the request body is larger than {limit} bytes (serve.max_body_bytes)")
        length = headers.get("content-length")
        if length is not None and (not length.isdigit() or int(length) > limit):
            return await too_large(scope, receive, send)
        if scope["method"] not in ("POST", "PUT", "PATCH"):
            return await self.app(scope, receive, send)
        body, more = b"", True  # read the body here, bounded, then hand it on in one piece
        while more:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            body += message.get("body", b"")
            more = message.get("more_body", False)
            if len(body) > limit:
                return await too_large(scope, receive, send)
        delivered = False

        async def replay() -> dict:
            nonlocal delivered
            if not delivered:
                delivered = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        await self.app(scope, replay, send)


# ------------------------------------------------------------------------------------------------ app
def create_app(generator: Union[TextGenerator, TextClassifier], config: Optional[ServeConfig] = None,
               model_name: str = "lmforge") -> FastAPI:
    """The FastAPI app serving `generator` (a language model's TextGenerator, or a classifier's TextClassifier);
    its worker thread starts and stops with the app's lifespan."""
    config = config or ServeConfig()
    model_id = config.model_name or model_name
    block_size = generator.model.config.block_size
    max_prompt_tokens = config.max_prompt_tokens or block_size
    if max_prompt_tokens > block_size:
        raise ConfigError(f"serve.max_prompt_tokens={max_prompt_tokens} is larger than the model's block_size="
                          f"{block_size}; use at most {block_size}")
    classifies = isinstance(generator, TextClassifier)
    if classifies:
        engine = ClassifyEngine(generator, config.max_concurrency, config.max_queue, config.max_batch_size)
    else:
        engine = Engine(generator, config.max_concurrency, config.max_queue, config.max_batch_size,
                        config.max_decodes, config.batch_wait)
    created = int(time.time())

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        engine.start()
        yield
        engine.close()

    app = FastAPI(title="lmforge", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.engine = engine
    app.add_middleware(GuardMiddleware, config=config)

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

    @app.get("/health")
    async def health() -> dict:
        return {"status": "ok", "model": model_id, **engine.stats()}

    task = {"task": "classify", "labels": generator.labels} if classifies else \
        {"task": "generate", "template": generator.template is not None}

    @app.get("/v1/models")
    async def models() -> dict:
        return {"object": "list", "data": [{"id": model_id, "object": "model", "created": created,
                                            "owned_by": "lmforge", "max_model_len": block_size, **task}]}

    if classifies:
        _add_classify_routes(app, engine, config, model_id, max_prompt_tokens)
    else:
        _add_generation_routes(app, generator, engine, config, model_id, max_prompt_tokens)
    return app


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
    _wrong_task(app, GENERATION_PATHS, "this model is a classifier: it classifies text and does not generate it, "
                "so {path} is not served; use POST /v1/classify (GET /v1/models lists its labels)")

    @app.get("/", response_class=HTMLResponse)
    async def note() -> HTMLResponse:
        return HTMLResponse(CLASSIFIER_NOTE_HTML.replace("{{MODEL}}", model_id))

    @app.post("/v1/classify")
    async def classify(body: ClassifyRequest, request: Request) -> Response:
        if body.model is not None and body.model != model_id:
            raise ApiError(404, f"model {body.model!r} is not served here; this server serves {model_id!r}", "model")
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
        job = ClassifyJob(texts, body.top_k, time.monotonic() + config.timeout, Mailbox(asyncio.get_running_loop()))
        try:
            engine.submit(job)
        except Busy as e:
            raise ApiError(429, f"the server is at capacity ({e}); retry after {RETRY_AFTER_S} s",
                           headers={"Retry-After": str(RETRY_AFTER_S)})
        try:
            finished = await _wait_all([job], request, config.timeout)
        finally:
            job.cancel()
        if finished is None:  # the client left; nobody reads this
            return Response(status_code=499)
        data = [{"index": i, "label": ranked[0][0],
                 "predictions": [{"label": label, "probability": p} for label, p in ranked]}
                for i, ranked in enumerate(job.predictions)]
        return JSONResponse({"object": "list", "model": model_id, "data": data,
                             "usage": {"prompt_tokens": prompt_tokens, "total_tokens": prompt_tokens}})


def _add_generation_routes(app: FastAPI, generator: TextGenerator, engine: Engine, config: ServeConfig,
                           model_id: str, max_prompt_tokens: int) -> None:
    """A language model's endpoints: the playground, completions, chat completions, and 400 at /v1/classify."""
    _wrong_task(app, ("/v1/classify",), "this model is a language model: it generates text and does not classify, "
                "so /v1/classify is not served; use POST /v1/completions or /v1/chat/completions")

    @app.get("/", response_class=HTMLResponse)
    async def playground() -> HTMLResponse:
        return HTMLResponse(PLAYGROUND_HTML.replace("{{MODEL}}", model_id))

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatRequest, request: Request) -> Response:
        try:  # the conversation through the model's chat template, the reply's header last
            text = generator.render_chat([m.model_dump(exclude={"name"}) for m in body.messages])
        except ConfigError as e:
            raise ApiError(422, str(e), "messages") from None
        if body.max_tokens is not None and body.max_completion_tokens is not None \
                and body.max_tokens != body.max_completion_tokens:
            raise ApiError(422, "max_tokens and max_completion_tokens differ: give one of them", "max_tokens")
        max_tokens = body.max_completion_tokens or body.max_tokens or min(CHAT_DEFAULT_MAX_TOKENS, config.max_tokens)
        jobs, prompt_tokens = _jobs_for(body, [text], generator, config, model_id, max_prompt_tokens, max_tokens,
                                        CHAT_UNSUPPORTED, extra_stop=[generator.chat_stop()])
        try:
            engine.submit(jobs)
        except Busy as e:
            raise ApiError(429, f"the server is at capacity ({e}); retry after {RETRY_AFTER_S} s",
                           headers={"Retry-After": str(RETRY_AFTER_S)})
        head = {"id": f"chatcmpl-{uuid.uuid4().hex[:24]}", "object": "chat.completion", "created": int(time.time()),
                "model": model_id}
        if body.stream:
            include_usage = body.stream_options is not None and body.stream_options.include_usage
            return StreamingResponse(_sse(jobs, {**head, "object": "chat.completion.chunk"}, prompt_tokens,
                                          include_usage, config.timeout, chat=True),
                                     media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        try:
            finished = await _wait_all(jobs, request, config.timeout)
        finally:
            for job in jobs:
                job.cancel()
        if finished is None:
            return Response(status_code=499)
        choices = [{"index": i, "message": {"role": "assistant", "content": c.text}, "logprobs": None,
                    "finish_reason": c.finish} for job in finished for i, c in enumerate(job.choices)]
        completion_tokens = sum(c.tokens for job in finished for c in job.choices)
        return JSONResponse({**head, "choices": choices, "usage": {
            "prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}})

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request) -> Response:
        prompts = [body.prompt] if isinstance(body.prompt, str) else body.prompt
        if not prompts:
            raise ApiError(422, "prompt is an empty list: give a string or a list of strings", "prompt")
        if len(prompts) > config.max_prompts:
            raise ApiError(422, f"{len(prompts)} prompts in one request; at most {config.max_prompts} "
                           "(serve.max_prompts)", "prompt")
        try:
            texts = [generator.render(p) for p in prompts]  # a fine-tuned model's prompt template
        except ConfigError as e:
            raise ApiError(422, str(e), "prompt") from None
        max_tokens = 16 if body.max_tokens is None else body.max_tokens
        jobs, prompt_tokens = _jobs_for(body, texts, generator, config, model_id, max_prompt_tokens, max_tokens,
                                        UNSUPPORTED)
        try:
            engine.submit(jobs)
        except Busy as e:
            raise ApiError(429, f"the server is at capacity ({e}); retry after {RETRY_AFTER_S} s",
                           headers={"Retry-After": str(RETRY_AFTER_S)})
        head = {"id": f"cmpl-{uuid.uuid4().hex[:24]}", "object": "text_completion", "created": int(time.time()),
                "model": model_id}
        if body.stream:
            include_usage = body.stream_options is not None and body.stream_options.include_usage
            return StreamingResponse(_sse(jobs, head, prompt_tokens, include_usage, config.timeout),
                                     media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        try:
            finished = await _wait_all(jobs, request, config.timeout)
        finally:
            for job in jobs:
                job.cancel()
        if finished is None:  # the client left; nobody reads this
            return Response(status_code=499)
        choices = [{"text": c.text, "index": job.first_index + i, "logprobs": None, "finish_reason": c.finish}
                   for job in finished for i, c in enumerate(job.choices)]
        completion_tokens = sum(c.tokens for job in finished for c in job.choices)
        return JSONResponse({**head, "choices": choices, "usage": {
            "prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}})



def _jobs_for(body: Union[CompletionRequest, ChatRequest], texts: list[str], generator: TextGenerator,
              config: ServeConfig, model_id: str, max_prompt_tokens: int, max_tokens: int,
              unsupported: dict[str, Any], extra_stop: Optional[list[str]] = None) -> tuple[list[Job], int]:
    """Check a request against the caps and turn each of its prompt texts (templates applied) into a Job;
    (jobs, prompt tokens). `extra_stop` adds stop strings of the server's own (a chat's next user turn)."""
    if body.model is not None and body.model != model_id:
        raise ApiError(404, f"model {body.model!r} is not served here; this server serves {model_id!r}", "model")
    if max_tokens > config.max_tokens:
        raise ApiError(422, f"max_tokens={max_tokens} is above this server's cap of {config.max_tokens} "
                       "(serve.max_tokens)", "max_tokens")
    n = 1 if body.n is None else body.n
    if n > config.max_n:
        raise ApiError(422, f"n={n} is above this server's cap of {config.max_n} (serve.max_n)", "n")
    stop = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
    if len(stop) > config.max_stop:
        raise ApiError(422, f"{len(stop)} stop sequences; at most {config.max_stop} (serve.max_stop)", "stop")
    for s in stop:
        if not s:
            raise ApiError(422, "an empty stop sequence would stop at once; remove it", "stop")
        if len(s) > config.max_stop_chars:
            raise ApiError(422, f"a stop sequence of {len(s)} characters; at most {config.max_stop_chars} "
                           "(serve.max_stop_chars)", "stop")
    for name, neutral in unsupported.items():
        value = getattr(body, name)
        if value is not None and value != neutral:
            raise ApiError(422, f"{name}={value!r} is not supported by lmforge serve (leave it out, or "
                           f"{json.dumps(neutral)})", name)
    temperature = 1.0 if body.temperature is None else body.temperature
    stop += [s for s in extra_stop or [] if s not in stop]
    options = GenerateConfig(max_new_tokens=max_tokens, greedy=temperature == 0.0, temperature=temperature,
                             top_k=body.top_k, top_p=None if body.top_p in (None, 1.0) else body.top_p,
                             min_p=body.min_p, repetition_penalty=body.repetition_penalty or 1.0,
                             seed=body.seed, num_return_sequences=n, stop_strings=stop or None)
    mailbox = Mailbox(asyncio.get_running_loop())
    deadline = time.monotonic() + config.timeout
    jobs, total = [], 0
    for i, text in enumerate(texts):
        ids = prompt_ids(generator.tokenizer, text)
        if not ids:
            raise ApiError(422, "the prompt is empty and the model has no start token; give some text", "prompt")
        if len(ids) > max_prompt_tokens:
            raise ApiError(422, f"the prompt is {len(ids)} tokens (with <START>); at most {max_prompt_tokens} "
                           "(serve.max_prompt_tokens)", "prompt")
        total += len(ids)
        jobs.append(Job(ids, options, bool(body.stream), deadline, mailbox, first_index=i * n))
    return jobs, total


LATE = 5.0  # seconds past its deadline that a handler waits for the worker's own 504 (a long step in progress)


async def _wait_all(jobs: list[Union[Job, ClassifyJob]], request: Request,
                    timeout: float) -> Optional[list[Union[Job, ClassifyJob]]]:
    """The jobs (sharing one mailbox) once all are done, or None if the client disconnected first; raises ApiError
    on an error.

    Polls the connection between events, so a client that leaves stops its generation (the caller cancels).
    """
    give_up, pending = time.monotonic() + timeout + LATE, len(jobs)
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


async def _sse(jobs: list[Job], head: dict, prompt_tokens: int, include_usage: bool,
               timeout: float, chat: bool = False) -> AsyncIterator[str]:
    """Server-sent events: one chunk per text piece or finished choice, then usage (if asked), then [DONE].
    Chat chunks carry `delta`s (the assistant role first), completion chunks `text`.

    A client that disconnects cancels this generator (Starlette's disconnect listener); the finally
    clause then tells the worker to drop the jobs before their next token.
    """
    def chunk(index: int, text: str, finish: Optional[str], role: bool = False) -> str:
        if chat:
            delta = {"role": "assistant", "content": ""} if role else ({"content": text} if text else {})
            choice = {"index": index, "delta": delta, "logprobs": None, "finish_reason": finish}
        else:
            choice = {"text": text, "index": index, "logprobs": None, "finish_reason": finish}
        return f"data: {json.dumps({**head, 'choices': [choice]})}\n\n"

    pending = len(jobs)
    try:
        if chat:
            for job in jobs:
                for i in range(job.n):
                    yield chunk(job.first_index + i, "", None, role=True)
        while pending:
            event = await jobs[0].mailbox.get(timeout + LATE) or ("error", 504, "the request timed out")
            if event[0] == "piece":
                yield chunk(event[1], event[2], None)
            elif event[0] == "finish":
                yield chunk(event[1], "", event[2])
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
