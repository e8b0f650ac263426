"""The model worker: one thread owns the model and decodes every request, so the event loop never waits on torch.

The engine only schedules; what to generate and when a continuation ends is the decoding core's
(lmforge.generate.decode and Row.advance), the same for the CLI, Python and the server. Each turn of the
worker loop
  1. admits waiting jobs (one per prompt, each with n continuations) while fewer than max_concurrency are
     in generation (and, once max_decodes decodes run, only jobs that have waited batch_wait seconds, so
     that jobs arriving one by one gather into batches instead of each starting a decode of its own);
     waiting jobs are merged into one batched decode, a micro-batch, of at most max_batch_size rows, whatever
     their sampling options, prompt lengths, budgets, stop strings and LoRA adapter sets (at most max_loras
     of them): each row carries its own (Engine.fits says which may join);
  2. advances every active decode by one token, in turn, so streams interleave and none waits for another;
  3. hands each job's events (text pieces, finish reasons) to its mailbox on the event loop.
With speculative decoding on (an assistant model, the model's early exit, or prompt lookup: ServeConfig), a job
decodes on its own (generate.speculative: its n rows in turn), since each row keeps a different number of tokens
per step; with serve.speculative_max_running, only a job that starts while fewer prompts are in generation does,
the others join plain batches (a single stream's latency when the server is quiet, batched throughput when it is
busy).
A job whose client left (Job.cancel) or whose deadline passed is dropped before the next step (its rows are
marked cancelled, so the decode stops reporting them); a decode with no job left is closed.

A classifier is served by ClassifyEngine instead: one worker thread as well (the model is never used by two
threads), one request at a time, its texts in forward passes of at most max_batch_size. Both share Worker:
the thread, its lock, start/close, and the admission of a request (all its prompts or none; Busy when the
places or the client's share of them are taken). Embeddings (POST /v1/embeddings, serve.app) are the one
exception: a thread of their own beside the worker, one request at a time; a forward pass only reads the weights,
so the two never conflict, they only share the cores.
"""

from __future__ import annotations

import asyncio
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass, field, replace
from typing import Any, Iterator, Optional

from lmforge.generate import (Event, GenerateConfig, Logprobs, Row, TextClassifier, TextGenerator, decode_rows,
                              make_rows, score_prompt)
from lmforge.generate.api import by_adapter, decode_events
from lmforge.generate.speculative import early_exit
from lmforge.lora import adapter_sets, use_adapter


MAX_BACKLOG = 256  # unread events per job after which a decode pauses (when all its jobs are that far behind)


class Busy(Exception):
    """Raised by Engine.submit when generation and the waiting queue are full (the caller answers 429)."""


@dataclass
class Choice:
    """One continuation as its events arrive: its text so far (cut before a stop string) and why it ended."""

    text: str = ""
    tokens: int = 0                 # tokens generated (an end token is not counted)
    finish: Optional[str] = None    # "stop" (end token or stop string) | "length"
    logprobs: list[Logprobs] = field(default_factory=list)  # per token, when the job asks (Job.logprobs)
    offsets: list[int] = field(default_factory=list)         # where each of those tokens' text starts in `text`
    streamed: int = 0               # of `logprobs`, how many went out in stream events already


class Mailbox:
    """The events of one request: put by the worker thread, read on the event loop."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop, self.queue = loop, asyncio.Queue()
        self.sent = 0   # counted by the worker thread
        self.read = 0   # counted on the event loop
        self.read_at = time.monotonic()  # when the reader last took an event

    @property
    def backlog(self) -> int:
        """Events sent but not read yet: a client that reads slower than the model writes piles them up."""
        return self.sent - self.read

    def put(self, event: tuple) -> None:
        """Called on the worker thread: hand `event` to the event loop."""
        self.sent += 1
        try:
            self.loop.call_soon_threadsafe(self.queue.put_nowait, event)
        except RuntimeError:  # the event loop is closed: the server is shutting down
            pass

    async def get(self, wait: float) -> Optional[tuple]:
        """The next event, or None after `wait` seconds."""
        try:
            event = await asyncio.wait_for(self.queue.get(), wait)
        except asyncio.TimeoutError:
            return None
        self.read += 1
        self.read_at = time.monotonic()
        return event


@dataclass(eq=False)
class Job:
    """One prompt of a request with its n continuations; its events go to its request's mailbox.

    Events: ("piece", index, text, logprobs) while streaming, ("finish", index, reason, logprobs) per
    continuation when streaming, then ("done", job) or ("error", status, message). `index` is first_index + row;
    `logprobs` (None unless the job asks for them) lists (Logprobs, offset in the choice's text) of the tokens
    taken since the last event of that continuation. A streamed job with echo and logprobs first gets
    ("prompt", job) once its prompt_logprobs are scored.
    """

    prompt_ids: list[int]
    config: GenerateConfig           # num_return_sequences = n (best_of), max_new_tokens = max_tokens, stop_strings
    stream: bool
    deadline: float                  # time.monotonic() after which the job fails with 504
    mailbox: "Mailbox"               # shared by the jobs of one request
    first_index: int = 0
    choices: list[Choice] = field(default_factory=list)
    rows: list[Row] = field(default_factory=list)  # its rows in the decode, once started
    cancelled: bool = False
    queued_at: float = 0.0           # time.monotonic() when submitted
    client: str = ""                 # the client's address (Worker.submit counts its places)
    logprobs: Optional[int] = None   # report each token's log probability and this many alternatives
    echo: bool = False               # with logprobs: also score the prompt (prompt_logprobs)
    prompt_logprobs: list[Optional[Logprobs]] = field(default_factory=list)
    adapter: Optional[str] = None    # the LoRA run's adapter set it decodes with (serve.lora_modules); None: the base

    def cancel(self) -> None:
        """Ask the worker to drop this job before its next step (thread-safe: a flag the worker reads)."""
        self.cancelled = True

    @property
    def size(self) -> int:
        """Places it takes in generation: one per prompt."""
        return 1

    @property
    def n(self) -> int:
        return self.config.num_return_sequences

    @property
    def rows_decoded(self) -> int:
        """Rows it adds to a batched decode: one per sequence, two with classifier-free guidance."""
        return self.n * (2 if self.config.guidance_scale != 1.0 else 1)

    @property
    def reproducible(self) -> bool:
        """Greedy or seeded: its text must not depend on the jobs it is batched with."""
        return self.config.is_greedy or self.config.seed is not None

    def emit(self, *event: Any) -> None:
        self.mailbox.put(event)


@dataclass(eq=False)
class Batch:
    """One decode over the rows of one or more jobs; owner[i] = (job, choice index) of row i."""

    jobs: list[Job]
    owner: list[tuple[Job, int]] = field(default_factory=list)
    steps: Optional[Iterator[list[Event]]] = None
    speculative: bool = False  # one job, decoded by speculation


class Worker:
    """One thread that owns the model, and the admission of requests from the event loop: a request's jobs
    join `_waiting` all or none, while places (`capacity`) are free and their client holds at most
    `per_client` (its first request is always considered). Subclasses run `_loop` and call `_forget(job)`
    for every job that leaves, so its client's count goes down."""

    thread_name = "lmforge-serve-worker"

    def __init__(self, capacity: int, per_client: Optional[int] = None) -> None:
        self.capacity, self.per_client = capacity, per_client
        self._lock = threading.Condition()
        self._waiting: list = []
        self._running = 0                 # places in use by the jobs being worked on
        self._held: dict[str, int] = {}   # client address -> places its jobs hold (waiting or running)
        self._closed = False
        self._thread: Optional[threading.Thread] = None
        self.jobs_done = 0

    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name=self.thread_name, daemon=True)
        self._thread.start()

    def close(self) -> None:
        with self._lock:
            self._closed = True
            self._lock.notify()
        if self._thread is not None:
            self._thread.join(timeout=30)

    def submit(self, jobs: list) -> None:
        """Queue the jobs of one request, all or none; raises Busy when they do not fit."""
        size, client = sum(job.size for job in jobs), jobs[0].client
        with self._lock:
            if self._closed:
                raise Busy("the server is shutting down")
            waiting = sum(job.size for job in self._waiting)
            if size > self.capacity - self._running - waiting:
                raise Busy(f"{self._running} places in use and {waiting} waiting")
            held = self._held.get(client, 0)
            if self.per_client is not None and held and held + size > self.per_client:
                raise Busy(f"this client already holds {held} places; at most {self.per_client} per client "
                           "(serve.max_slots_per_client)")
            self._held[client] = held + size
            now = time.monotonic()
            for job in jobs:
                job.queued_at = now
            self._waiting.extend(jobs)
            self._lock.notify()

    def _forget(self, job: Any) -> None:
        """A job left (done, failed, cancelled or expired): its client holds its places no more (lock held)."""
        left = self._held.get(job.client, 0) - job.size
        if left > 0:
            self._held[job.client] = left
        else:
            self._held.pop(job.client, None)
        self.jobs_done += 1

    def _loop(self) -> None:
        raise NotImplementedError


class Engine(Worker):
    """Runs all generation on one worker thread; `submit` is called from the event loop."""

    def __init__(self, generator: TextGenerator, max_concurrency: int = 32, max_queue: int = 64,
                 max_batch_size: int = 32, max_decodes: int = 4, batch_wait: float = 0.05,
                 max_slots_per_client: Optional[int] = None, stall_timeout: float = 10.0,
                 speculation: Optional[dict] = None, speculative_max_running: Optional[int] = None,
                 max_loras: int = 4) -> None:
        """speculation: GenerateConfig fields of speculative decoding every job decodes with (ServeConfig.speculation);
        with them, or with the generator's assistant model, a job decodes on its own by speculation when it starts
        while fewer than speculative_max_running (None: any number of) prompts are in generation, and joins a
        plain batch otherwise. max_loras: LoRA adapter sets one decode mixes at most (ServeConfig.max_loras)."""
        super().__init__(max_concurrency + max_queue, max_slots_per_client)
        self.model, self.tokenizer, self.assistant = generator.model, generator.tokenizer, generator.assistant_model
        self.speculation = dict(speculation or {})
        if self.speculation or self.assistant is not None:
            GenerateConfig(**self.speculation)  # its values, checked where the library checks them
        if "assistant_early_exit" in self.speculation:  # layers the model has: checked now, not at a request
            early_exit(self.model, self.speculation["assistant_early_exit"])
        self.speculative = bool(self.speculation) or self.assistant is not None
        self.speculative_max_running = speculative_max_running
        self.drafted = self.accepted = 0  # speculation: tokens guessed, and those the model kept
        self.stall_timeout = stall_timeout
        self.max_concurrency, self.max_queue, self.max_batch_size = max_concurrency, max_queue, max_batch_size
        self.max_decodes, self.batch_wait, self.max_loras = max_decodes, batch_wait, max_loras
        self._active: list[Batch] = []    # touched by the worker thread only
        self._calls: list[tuple[Any, Future]] = []  # call(): work on the model between steps, with its result
        self.adapters = adapter_sets(self.model)  # the sets a job may name (serve.lora_modules, runtime loading)
        self.generated_tokens = 0         # sequences x steps decoded so far (a measure of work done)
        self.decodes = 0                  # batched decodes started

    def stats(self) -> dict:
        with self._lock:
            stats = {"running": self._running, "waiting": len(self._waiting), "generated_tokens": self.generated_tokens,
                     "decodes": self.decodes, "completed": self.jobs_done}
            if self.speculative:
                stats.update(drafted_tokens=self.drafted, accepted_tokens=self.accepted)
            return stats

    # ---------------------------------------------------------------------------------- worker side
    def _loop(self) -> None:
        while True:
            with self._lock:
                while not self._closed and not self._waiting and not self._active and not self._calls:
                    self._lock.wait()
                if self._closed:
                    for job in self._waiting + [j for b in self._active for j in b.jobs]:
                        job.emit("error", 503, "the server is shutting down")
                    for _, done in self._calls:
                        done.set_exception(Busy("the server is shutting down"))
                    return
                calls, self._calls = self._calls, []
            for call, done in calls:  # between steps, on this thread: the model is not in use
                try:
                    done.set_result(call())
                except Exception as e:  # the caller's to report
                    done.set_exception(e)
            with self._lock:
                started = self._admit()
            self._active.extend(started)
            stepped, now = 0, time.monotonic()
            for job in [j for b in self._active for j in b.jobs]:
                if job.mailbox.backlog > MAX_BACKLOG and now - job.mailbox.read_at > self.stall_timeout:
                    job.emit("error", 408, f"the client read nothing for {self.stall_timeout} s (serve.stall_timeout)")
                    job.cancel()  # a stalled reader: its decode waited for it; now its place goes to others
            for batch in list(self._active):
                if all(job.mailbox.backlog > MAX_BACKLOG and not job.cancelled and now <= job.deadline
                       for job in batch.jobs):
                    continue  # its clients read slower than we generate: wait for them (memory stays bounded)
                self._step(batch)
                stepped += 1
            if not stepped and not started:
                with self._lock:
                    self._lock.wait(0.005)  # every decode waits for a slow reader: let them read

    def call(self, work: Any) -> Future:
        """Run `work()` on the worker thread between two steps (the model not in use), e.g. adding an adapter set;
        its result or exception comes in the returned Future."""
        done: Future = Future()
        with self._lock:
            self._calls.append((work, done))
            self._lock.notify()
        return done

    def in_use(self, adapter: str) -> bool:
        """Whether a waiting or running job decodes with the adapter set `adapter` (worker thread: a call's)."""
        with self._lock:
            return any(job.adapter == adapter for job in self._waiting + [j for b in self._active for j in b.jobs])

    def _admit(self) -> list[Batch]:
        """Move waiting jobs into new decodes, oldest first, merging compatible ones (lock held)."""
        now, batches = time.monotonic(), []
        for job in [j for j in self._waiting if j.cancelled or now > j.deadline
                    or (j.adapter is not None and j.adapter not in self.adapters)]:
            self._waiting.remove(job)
            self._forget(job)
            if job.adapter is not None and job.adapter not in self.adapters:  # unloaded since its request came
                job.emit("error", 404, f"the model {job.adapter!r} was unloaded")
            elif not job.cancelled:
                job.emit("error", 504, "the request timed out while waiting for the model")
        while self._waiting and self._running < self.max_concurrency:
            if (len(self._active) + len(batches) >= self.max_decodes
                    and now - self._waiting[0].queued_at < self.batch_wait):
                break  # enough decodes run: let waiting jobs gather into a bigger batch for a while
            group = [self._waiting.pop(0)]
            alone = self.speculative and group[0].config.guidance_scale == 1.0 and (  # guidance: no speculation
                self.speculative_max_running is None or self._running < self.speculative_max_running)
            for job in [] if alone else list(self._waiting):
                if self._running + len(group) >= self.max_concurrency:
                    break
                if self.fits(group, job):
                    self._waiting.remove(job)
                    group.append(job)
            self._running += len(group)
            batches.append(Batch(by_adapter(group), speculative=alone))  # a LoRA set's rows side by side
        return batches

    def fits(self, group: list[Job], job: Job) -> bool:
        """Whether `job` can join the decode of `group`: room in the batch and, for a greedy or seeded job, a
        batch whose longest prompt plus new tokens fit in block_size (within the window a padded row gets the
        tokens it gets alone; see lmforge.generate). Sampling options, budgets and stops may differ. (A job that
        speculates decodes alone: _admit.) Each row decodes with its job's LoRA adapter set (or the base), a batch with
        at most max_loras sets."""
        if len({j.adapter for j in group + [job]} - {None}) > self.max_loras:
            return False
        if sum(j.rows_decoded for j in group) + job.rows_decoded > self.max_batch_size:
            return False
        if not any(j.reproducible for j in group + [job]):
            return True
        longest = max(len(j.prompt_ids) for j in group + [job])  # (and a guided job's negative prompt: a row too)
        longest = max(longest, *(len(j.config.negative_prompt_ids or ()) for j in group + [job]))
        budget = max(j.config.new_tokens(len(j.prompt_ids)) for j in group + [job])
        return longest + budget <= self.model.config.block_size

    def _release(self, batch: Batch, job: Job) -> None:
        batch.jobs.remove(job)
        for row in job.rows:  # the decode stops reporting them; their tokens are ignored from now on
            row.finish = row.finish or "cancelled"
        with self._lock:
            self.drafted += sum(row.drafted for row in job.rows)
            self.accepted += sum(row.accepted for row in job.rows)
            self._running -= 1
            self._forget(job)

    def _step(self, batch: Batch) -> None:
        """Advance one decode by one token and hand the events to their jobs; end it when no job is left."""
        now = time.monotonic()
        for job in list(batch.jobs):
            if job.cancelled:
                self._release(batch, job)
            elif now > job.deadline:
                job.emit("error", 504, "the request timed out during generation")
                self._release(batch, job)
        try:
            if batch.jobs:
                if batch.steps is None:
                    batch.steps = self._start(batch)
                with use_adapter(batch.jobs[0].adapter if batch.speculative else None):  # (decode_rows: per row)
                    events = next(batch.steps, None)
                if events is None:  # every row has ended, so every job has finished: nothing left to do
                    for job in list(batch.jobs):
                        self._finish(batch, job)
                    events = []
                else:
                    self.generated_tokens += len(events)  # one per token taken (speculation takes several a step)
                touched = {}
                for event in events:
                    job, index = batch.owner[event.row]
                    self._take(job, index, event)
                    touched[id(job)] = job
                for job in touched.values():
                    if job in batch.jobs and all(choice.finish is not None for choice in job.choices):
                        self._finish(batch, job)
        except Exception as e:  # a bug, not a user error: fail the jobs, keep the server up
            for job in list(batch.jobs):
                job.emit("error", 500, f"generation failed: {type(e).__name__}: {e}")
                self._release(batch, job)
        if not batch.jobs:
            if batch.steps is not None:
                batch.steps.close()
            self._active.remove(batch)

    def _start(self, batch: Batch) -> Iterator[list[Event]]:
        """The decode of a batch's jobs: each job's rows as it would make them alone (its own budget, stop
        strings, sampling options and seeded generators)."""
        rows: list[Row] = []
        for job in batch.jobs:
            with use_adapter(job.adapter):  # its LoRA run's adapter set (token healing, echo's logprobs use the model)
                job.rows = make_rows(self.model, [job.prompt_ids], job.config, self.tokenizer.end_id, self.tokenizer)
                if job.echo and job.logprobs is not None:
                    job.prompt_logprobs = score_prompt(self.model, job.rows[0].prompt, job.logprobs)
            job.choices = [Choice() for _ in job.rows]
            for row in job.rows:
                row.top_logprobs, row.adapter = job.logprobs, job.adapter  # decode_rows decodes each with its set
            if job.echo and job.logprobs is not None and job.stream:
                job.emit("prompt", job)
            batch.owner += [(job, i) for i in range(len(job.rows))]
            rows += job.rows
        self.decodes += 1
        if batch.speculative:  # one job (_admit): its rows speculate in turn
            return decode_events(self.model, rows, replace(batch.jobs[0].config, **self.speculation), self.assistant)
        return decode_rows(self.model, rows)

    def _take(self, job: Job, index: int, event: Event) -> None:
        """One continuation's event: its text, its token count, its finish; streamed out as they come."""
        choice = job.choices[index]
        if event.logprobs is not None:
            choice.logprobs.append(event.logprobs)
            choice.offsets.append(len(choice.text))
        choice.text += event.text
        choice.tokens += event.token is not None
        choice.finish = event.finish
        if job.stream:
            if event.text:
                job.emit("piece", job.first_index + index, event.text, self._unsent_logprobs(job, choice))
            if event.finish is not None:
                job.emit("finish", job.first_index + index, event.finish, self._unsent_logprobs(job, choice))

    @staticmethod
    def _unsent_logprobs(job: Job, choice: Choice) -> Optional[list[tuple[Logprobs, int]]]:
        """The (Logprobs, offset) of the choice's tokens not streamed yet, now marked sent; None if not asked."""
        if job.logprobs is None:
            return None
        fresh = list(zip(choice.logprobs[choice.streamed:], choice.offsets[choice.streamed:]))
        choice.streamed = len(choice.logprobs)
        return fresh

    def _finish(self, batch: Batch, job: Job) -> None:
        job.emit("done", job)
        self._release(batch, job)


# ------------------------------------------------------------------------------------------ classification
@dataclass(eq=False)
class ClassifyJob:
    """The texts of one /v1/classify request; its one event goes to its mailbox: ("done", job) with
    `predictions` set, or ("error", status, message)."""

    texts: list[Any]                 # texts (a reward model's: (prompt, completion) pairs)
    top_k: Optional[int]
    deadline: float                  # time.monotonic() after which the job fails with 504
    mailbox: "Mailbox"
    predictions: list[Any] = field(default_factory=list)  # ranked (label, probability) pairs, or rewards
    cancelled: bool = False
    client: str = ""                 # the client's address (Worker.submit counts its places)
    queued_at: float = 0.0

    def cancel(self) -> None:
        """Ask the worker to drop this job if it has not started (thread-safe: a flag the worker reads)."""
        self.cancelled = True

    @property
    def size(self) -> int:
        """Places it takes: one per text."""
        return len(self.texts)


class ClassifyEngine(Worker):
    """Runs every classification of a classifier on one worker thread, a request at a time, oldest first; its
    texts in forward passes of at most max_batch_size (TextClassifier.classify). `submit` is called from the
    event loop. Texts waiting and in classification count together against max_concurrency + max_queue."""

    thread_name = "lmforge-serve-classify"

    def __init__(self, classifier: TextClassifier, max_concurrency: int = 32, max_queue: int = 64,
                 max_batch_size: int = 32, max_slots_per_client: Optional[int] = None) -> None:
        super().__init__(max_concurrency + max_queue, max_slots_per_client)
        self.classifier, self.max_batch_size = classifier, max_batch_size
        self.classified = 0               # texts classified so far

    def stats(self) -> dict:
        with self._lock:
            return {"running": self._running, "waiting": sum(len(j.texts) for j in self._waiting),
                    "classified": self.classified, "completed": self.jobs_done}

    def predict(self, job: ClassifyJob) -> list[Any]:
        """What a job's texts get: each one's ranked (label, probability) pairs."""
        return self.classifier.classify(job.texts, job.top_k, self.max_batch_size)

    def _loop(self) -> None:
        while True:
            with self._lock:
                while not self._closed and not self._waiting:
                    self._lock.wait()
                if self._closed:
                    for job in self._waiting:
                        job.mailbox.put(("error", 503, "the server is shutting down"))
                    return
                job = self._waiting.pop(0)
                self._running = len(job.texts)
            try:
                if job.cancelled:
                    pass
                elif time.monotonic() > job.deadline:
                    job.mailbox.put(("error", 504, "the request timed out while waiting for the model"))
                else:
                    job.predictions = self.predict(job)
                    if time.monotonic() > job.deadline:
                        job.mailbox.put(("error", 504, "the request timed out during classification"))
                    else:
                        job.mailbox.put(("done", job))
            except Exception as e:  # a bug, not a user error: fail the job, keep the server up
                job.mailbox.put(("error", 500, f"classification failed: {type(e).__name__}: {e}"))
            with self._lock:
                self._running = 0
                self.classified += len(job.predictions)
                self._forget(job)


class RewardEngine(ClassifyEngine):
    """A reward model's scoring on one worker thread, as ClassifyEngine's: a job's texts are (prompt, completion)
    pairs, its predictions their rewards (RewardModel.score)."""

    thread_name = "lmforge-serve-reward"

    def predict(self, job: ClassifyJob) -> list[Any]:
        return self.classifier.score([p for p, _ in job.texts], [c for _, c in job.texts], self.max_batch_size)
