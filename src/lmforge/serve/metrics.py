"""GET /metrics: the server's counters in Prometheus' text format (version 0.0.4), for a scraper or a curl.

    lmforge_requests_total{status="200"}   answers by HTTP status (refusals by the guard included)
    lmforge_running / lmforge_waiting      places in generation (classification) and in the queue
    lmforge_generated_tokens_total         tokens generated (a classifier: lmforge_classified_texts_total)
    lmforge_completed_total                jobs (prompts, or classify requests) done, failed or cancelled
    lmforge_tokens_per_second              tokens generated per second since the previous scrape (or the start)
    lmforge_speculative_{drafted,accepted}_tokens_total   with speculative decoding: tokens guessed, and kept

Prometheus' own rate() over lmforge_generated_tokens_total is the better throughput over a chosen window; the
gauge is for a reader without Prometheus.
"""

from __future__ import annotations

import threading
import time
from typing import Any

HELP = {  # stats() key -> (metric, type, help)
    "running": ("lmforge_running", "gauge", "Places in use by requests being worked on."),
    "waiting": ("lmforge_waiting", "gauge", "Places taken by requests waiting in the queue (queue depth)."),
    "generated_tokens": ("lmforge_generated_tokens_total", "counter", "Tokens generated (an end token included)."),
    "drafted_tokens": ("lmforge_speculative_drafted_tokens_total", "counter",
                       "Speculative decoding: tokens guessed (assistant model or prompt lookup), finished jobs."),
    "accepted_tokens": ("lmforge_speculative_accepted_tokens_total", "counter",
                        "Speculative decoding: guessed tokens the model kept, finished jobs."),
    "classified": ("lmforge_classified_texts_total", "counter", "Texts classified."),
    "decodes": ("lmforge_decodes_total", "counter", "Batched decodes started."),
    "completed": ("lmforge_completed_total", "counter", "Jobs done, failed or cancelled."),
}


class Metrics:
    """Answers counted by status (GuardMiddleware calls `answered`), and the engine's own counters."""

    def __init__(self, engine: Any) -> None:
        self.engine = engine
        self.statuses: dict[int, int] = {}
        self._lock = threading.Lock()
        self._last = (time.monotonic(), 0)  # (when, generated tokens) at the previous scrape

    def answered(self, status: int) -> None:
        with self._lock:
            self.statuses[status] = self.statuses.get(status, 0) + 1

    def render(self) -> str:
        stats = self.engine.stats() if self.engine is not None else {}  # (an encoder's server has no engine)
        with self._lock:
            statuses = sorted(self.statuses.items())
            now, tokens = time.monotonic(), stats.get("generated_tokens", 0)
            (then, before), self._last = self._last, (now, tokens)
        lines = ["# HELP lmforge_requests_total HTTP answers by status.", "# TYPE lmforge_requests_total counter"]
        lines += [f'lmforge_requests_total{{status="{status}"}} {count}' for status, count in statuses]
        for key, value in stats.items():
            name, kind, text = HELP[key]
            lines += [f"# HELP {name} {text}", f"# TYPE {name} {kind}", f"{name} {value}"]
        if "generated_tokens" in stats:
            rate = (tokens - before) / max(now - then, 1e-9)
            lines += ["# HELP lmforge_tokens_per_second Tokens generated per second since the previous scrape.",
                      "# TYPE lmforge_tokens_per_second gauge", f"lmforge_tokens_per_second {rate:.3f}"]
        return "\n".join(lines) + "\n"
