"""The limits of `lmforge serve`, as a typed config (the CLI's options are generated from it).

Kept apart from the app so that `lmforge --help` can list them without importing FastAPI or torch.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Optional

from lmforge.config import doc, validate
from lmforge.errors import ConfigError


ADAPTER_NAME = re.compile(r"[A-Za-z0-9_-]+")  # a serve.lora_modules name (a module key: no dots)


@dataclass
class ServeConfig:
    """Limits of `lmforge serve`: what one request may ask, and how much the server takes on at once."""

    model_name: Optional[str] = doc("Model id in /v1/models and responses; null = the checkpoint's run name.", None)
    api_key: Optional[str] = doc("When set, every endpoint but /health and / needs 'Authorization: Bearer KEY'.", None)
    max_body_bytes: int = doc("Largest request body accepted (bytes); larger -> 413.", 65536, ge=1)
    max_prompt_tokens: Optional[int] = doc("Most tokens in one prompt (with <START>); null = the model's block_size.",
                                           None, ge=1)
    max_tokens: int = doc("Largest max_tokens a request may ask.", 1024, ge=1)
    max_n: int = doc("Largest n (continuations per prompt).", 8, ge=1)
    max_prompts: int = doc("Most prompts in one request (prompt given as a list); at most max_concurrency + "
                           "max_queue.", 16, ge=1)
    max_stop: int = doc("Most stop sequences in one request.", 4, ge=0)
    max_stop_chars: int = doc("Longest stop sequence, bad word or guided choice (characters).", 64, ge=1)
    max_bad_words: int = doc("Most bad_words in one request.", 16, ge=0)
    max_choices: int = doc("Most guided_choice texts in one request.", 64, ge=1)
    regex_timeout: float = doc("Seconds a request's guided_regex / guided_json may take to become an automaton (built "
                               "in a child process with 1 GiB of memory, one at a time; some patterns take "
                               "exponential time). Built automata are kept for the next requests.", 5.0, gt=0,
                               le=600)
    max_regex_chars: int = doc("Longest guided_regex (characters): each automaton state it reaches costs a pass "
                               "over the vocabulary.", 1024, ge=1)
    max_schema_chars: int = doc("Longest guided_json / response_format / tools schema as JSON text (characters; "
                                "titles and descriptions count, its automaton is bounded by regex_timeout).", 16384,
                                ge=1)
    max_concurrency: int = doc("Prompts in generation at once (a micro-batch counts each of its prompts).", 32, ge=1)
    max_queue: int = doc("Prompts waiting for a place in generation; beyond that -> 429 with Retry-After.", 64, ge=0)
    max_batch_size: int = doc("Most sequences in one batched decode (1 = no micro-batching).", 32, ge=1)
    max_decodes: int = doc("Batched decodes run in turn; when all are busy a request waits up to batch_wait "
                           "to join the next batch.", 4, ge=1)
    batch_wait: float = doc("Seconds a request may wait for a batch to join when max_decodes run.", 0.05, ge=0,
                            noun="number of seconds")
    timeout: float = doc("Seconds a request may take, waiting included; past that -> 504.", 60.0, gt=0,
                         noun="number of seconds")
    max_slots_per_client: Optional[int] = doc("Prompts one client address may have in generation or waiting (its "
                                              "first request is always taken); beyond -> 429. null = half of "
                                              "max_concurrency (at least 1).", None, ge=1)
    stall_timeout: float = doc("Seconds a stream may wait for its client to take more data (its send buffer full) "
                               "before its generation is cancelled and the connection closed.", 10.0, gt=0,
                               noun="number of seconds")
    header_timeout: float = doc("Seconds a connection has to send a request's headers (from its opening or the end "
                                "of the previous response); then it is closed.", 10.0, gt=0, noun="number of seconds")
    body_timeout: float = doc("Seconds a request has to send its whole body once its headers arrived; past that -> "
                              "408 and the connection closes.", 30.0, gt=0, noun="number of seconds")
    keep_alive_timeout: float = doc("Seconds an idle keep-alive connection stays open between requests.", 5.0, gt=0,
                                    noun="number of seconds")
    max_connections: int = doc("Open connections at most; a connection beyond is closed at once, a request beyond "
                               "(uvicorn's limit_concurrency) gets 503.", 256, ge=1)
    allowed_host: Optional[list[str]] = doc("Host header names accepted (DNS rebinding guard); null = localhost, "
                                            "127.0.0.1, ::1 and the bound host; '*' = any.", None)
    assistant_model: Optional[str] = doc("Speculative decoding: the run or checkpoint directory of a smaller model "
                                         "with the same tokenizer; it drafts tokens the model checks in one pass "
                                         "(greedy text unchanged, sampling keeps its distribution). Each request "
                                         "then decodes on its own, not batched: lower latency, less throughput "
                                         "under load.", None)
    assistant_early_exit: Optional[int] = doc("Self-speculative decoding: the model's own first N layers (then its "
                                              "final norm and head) draft tokens it checks in one pass (LayerSkip, "
                                              "Hugging Face's assistant_early_exit); no second model. Each request "
                                              "then decodes on its own, not batched.", None, ge=1)
    num_assistant_tokens: Optional[int] = doc("Tokens the assistant model (or the early exit) guesses per step; null = "
                                              "5.", None, ge=1, le=1024)
    prompt_lookup_num_tokens: Optional[int] = doc("Speculative decoding without a second model: guess up to this many "
                                                  "tokens per step from the text so far (what followed the latest "
                                                  "match of its last n-gram); pays when answers repeat their prompt. "
                                                  "Each request then decodes on its own, not batched.", None, ge=1,
                                                  le=1024)
    max_matching_ngram_size: int = doc("Prompt lookup: the longest n-gram matched (shorter ones next).", 2, ge=1,
                                       le=1024)
    speculative_max_running: Optional[int] = doc("Speculate only for requests that start while fewer than this many "
                                                 "prompts are in generation; later ones join batches without it "
                                                 "(latency when quiet, throughput when busy). null = always.", None,
                                                 ge=1)
    lora_modules: Optional[list[str]] = doc("LoRA runs of the served model to serve beside it, each NAME=RUN_DIR "
                                            "(vLLM's --lora-modules): a request's model NAME decodes with that run's "
                                            "adapters (and its prompt template) on the one copy of the base, which "
                                            "every run must have been trained on.", None)
    max_loras: int = doc("LoRA runs (adapter sets) one batched decode mixes at most (vLLM's --max-loras): each row "
                         "computes with its own run's adapters, so requests of several runs share a decode.", 4, ge=1,
                         le=1024)
    allow_runtime_lora: bool = doc("POST /v1/load_lora_adapter {lora_name, lora_path} and /v1/unload_lora_adapter "
                                   "{lora_name} (vLLM's runtime LoRA updating): add or drop a LoRA run of the served "
                                   "model while it serves. The path is read on the server: allow it for trusted "
                                   "clients only (with serve.api_key).", False)
    cors_origin: Optional[list[str]] = doc("Origins a browser page may call the API from (CORS), e.g. "
                                           "http://localhost:3000; '*' = any. null = the server's own pages only.",
                                           None)

    def __post_init__(self) -> None:
        validate(self, "serve")
        if self.max_prompts > self.max_concurrency + self.max_queue:
            raise ConfigError(f"serve.max_prompts={self.max_prompts} is more than max_concurrency + max_queue = "
                              f"{self.max_concurrency + self.max_queue}: such a request could never be taken; lower it")
        drafters = [name for name in ("assistant_model", "assistant_early_exit", "prompt_lookup_num_tokens")
                     if getattr(self, name) is not None]
        if len(drafters) > 1:
            raise ConfigError(f"serve.{drafters[0]} and serve.{drafters[1]} both guess tokens: give one")
        if self.num_assistant_tokens is not None and self.assistant_model is None and self.assistant_early_exit is None:
            raise ConfigError("serve.num_assistant_tokens sets how many tokens an assistant model guesses: give "
                              "serve.assistant_model RUN_DIR or serve.assistant_early_exit N too (or "
                              "serve.prompt_lookup_num_tokens to guess without a model)")
        if self.speculative_max_running is not None and not self.speculation:
            raise ConfigError("serve.speculative_max_running limits speculative decoding: give serve.assistant_model, "
                              "serve.assistant_early_exit or serve.prompt_lookup_num_tokens too")
        _ = self.adapters  # NAME=RUN_DIR entries, checked
        if (self.lora_modules or self.allow_runtime_lora) and self.speculation:
            raise ConfigError("serve.lora_modules (or allow_runtime_lora) and speculative decoding (serve."
                              "assistant_model, assistant_early_exit, prompt_lookup_num_tokens) together are not "
                              "supported: give one of them")
        if self.api_key is not None and not self.api_key.strip():
            raise ConfigError("serve.api_key is empty: give a key, or leave it out to serve without one")

    @property
    def speculation(self) -> dict:
        """The GenerateConfig fields every request decodes with when speculation is on ({} when it is off)."""
        if self.prompt_lookup_num_tokens is not None:
            return {"prompt_lookup_num_tokens": self.prompt_lookup_num_tokens,
                    "max_matching_ngram_size": self.max_matching_ngram_size}
        if self.assistant_model is not None:
            return {"num_assistant_tokens": self.num_assistant_tokens or 5}
        if self.assistant_early_exit is not None:
            return {"assistant_early_exit": self.assistant_early_exit,
                    "num_assistant_tokens": self.num_assistant_tokens or 5}
        return {}

    @property
    def adapters(self) -> dict[str, str]:
        """{name: run directory} of lora_modules, in their order."""
        out: dict[str, str] = {}
        for entry in self.lora_modules or []:
            name, sep, path = entry.partition("=")
            if not sep or not ADAPTER_NAME.fullmatch(name) or not path:
                raise ConfigError(f"serve.lora_modules entry {entry!r} is not NAME=RUN_DIR with a NAME of letters, "
                                  f"digits, '-' and '_' (e.g. sql=runs/sql-lora)")
            if name in out:
                raise ConfigError(f"serve.lora_modules names {name!r} twice: give each LoRA run its own name")
            out[name] = path
        return out

    @property
    def slots_per_client(self) -> int:
        """max_slots_per_client, or its default: half the places in generation, so one address never holds all."""
        return self.max_slots_per_client or max(1, self.max_concurrency // 2)
