"""The limits of `lmforge serve`, as a typed config (the CLI's options are generated from it).

Kept apart from the app so that `lmforge --help` can list them without importing FastAPI or torch.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from lmforge.config import doc, validate
from lmforge.errors import ConfigError


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
    max_stop_chars: int = doc("Longest stop sequence (characters).", 64, ge=1)
    max_concurrency: int = doc("Prompts in generation at once (a micro-batch counts each of its prompts).", 32, ge=1)
    max_queue: int = doc("Prompts waiting for a place in generation; beyond that -> 429 with Retry-After.", 64, ge=0)
    max_batch_size: int = doc("Most sequences in one batched decode (1 = no micro-batching).", 32, ge=1)
    max_decodes: int = doc("Batched decodes run in turn; when all are busy a request waits up to batch_wait "
                           "to join the next batch.", 4, ge=1)
    batch_wait: float = doc("Seconds a request may wait for a batch to join when max_decodes run.", 0.05, ge=0,
                            noun="number of seconds")
    timeout: float = doc("Seconds a request may take, waiting included; past that -> 504.", 60.0, gt=0,
                         noun="number of seconds")

    def __post_init__(self) -> None:
        validate(self, "serve")
        if self.max_prompts > self.max_concurrency + self.max_queue:
            raise ConfigError(f"serve.max_prompts={self.max_prompts} is more than max_concurrency + max_queue = "
                              f"{self.max_concurrency + self.max_queue}: such a request could never be taken; lower it")
        if self.api_key is not None and not self.api_key.strip():
            raise ConfigError("serve.api_key is empty: give a key, or leave it out to serve without one")
