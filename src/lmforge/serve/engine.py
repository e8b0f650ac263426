"""The model worker: one thread owns the model and decodes every request, so the event loop never waits on torch.

A request becomes one Job per prompt (each with n continuations). Each turn of the worker loop
  1. admits waiting jobs while fewer than max_concurrency are in generation (and, once max_decodes
     decodes run, only jobs that have waited batch_wait seconds, so that jobs arriving one by one
     gather into batches instead of each starting a decode of its own); jobs with the same
     sampling options (prompts of any length, left-padded as in generate.decode_batch; any n; streaming
     or not) are merged into one batched decode, a micro-batch, of at most max_batch_size sequences:
     one forward pass per step serves them all (Engine.fits says which may join), while each job
     draws from its own random streams;
  2. advances every active decode by one token, in turn, so streams interleave and none waits for
     another to end;
  3. hands text to each job's event queue on the event loop (loop.call_soon_threadsafe).
A job whose client left (Job.cancel) or whose deadline passed is dropped before the next step; a decode
with no job left is closed. Stop strings are applied here, on the decoded text of each continuation.
"""

from __future__ import annotations

import asyncio
import threading
import time
from dataclasses import dataclass, field, replace
from typing import Any, Iterator, Optional

import torch

from lmforge.generate import GenerateConfig, TextGenerator, decode_batch, row_generators


MAX_BACKLOG = 256  # unread events per job after which a decode pauses (when all its jobs are that far behind)


class Busy(Exception):
    """Raised by Engine.submit when generation and the waiting queue are full (the caller answers 429)."""


@dataclass
class Choice:
    """One continuation as it is produced: its text (cut before a stop string) and why it ended."""

    decoder: Any
    text: str = ""
    sent: int = 0        # characters of text already handed out as stream pieces
    tokens: int = 0      # tokens generated (the end token is not counted)
    finish: Optional[str] = None  # "stop" (end token or stop string) | "length"
    reported: bool = False        # the finish event was sent (streaming)

    def add(self, piece: str, stop: tuple[str, ...]) -> None:
        """Append decoded text; finish with "stop" and cut the text before the first stop string found."""
        start = max(0, len(self.text) - max((len(s) for s in stop), default=0))
        self.text += piece
        cuts = [i for s in stop if (i := self.text.find(s, start)) >= 0]
        if cuts:
            self.text = self.text[:min(cuts)]
            self.finish = "stop"

    def ready(self, stop: tuple[str, ...]) -> str:
        """Text not yet handed out that can no longer become part of a stop string; marks it handed out."""
        end = len(self.text)
        if self.finish is None:  # hold back a tail that is the beginning of a stop string
            for k in range(min(len(self.text), max((len(s) for s in stop), default=1) - 1), 0, -1):
                if any(s.startswith(self.text[-k:]) for s in stop):
                    end -= k
                    break
        piece, self.sent = self.text[self.sent:end], max(self.sent, end)
        return piece


class Mailbox:
    """The events of one request: put by the worker thread, read on the event loop."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop, self.queue = loop, asyncio.Queue()
        self.sent = 0   # counted by the worker thread
        self.read = 0   # counted on the event loop

    @property
    def backlog(self) -> int:
        """Events sent but not read yet: a client that reads slower than the model writes piles them up."""
        return self.sent - self.read

    def put(self, event: tuple) -> None:
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
        return event


@dataclass(eq=False)
class Job:
    """One prompt of a request with its n continuations; its events go to its request's mailbox.

    Events: ("piece", index, text) while streaming, ("finish", index, reason) per continuation when
    streaming, then ("done", job) or ("error", status, message). `index` is first_index + row.
    """

    prompt_ids: list[int]
    config: GenerateConfig           # num_return_sequences = n, max_new_tokens = max_tokens
    stop: tuple[str, ...]
    stream: bool
    deadline: float                  # time.monotonic() after which the job fails with 504
    mailbox: "Mailbox"               # shared by the jobs of one request
    first_index: int = 0
    choices: list[Choice] = field(default_factory=list)
    cancelled: bool = False
    queued_at: float = 0.0           # time.monotonic() when submitted

    def cancel(self) -> None:
        """Ask the worker to drop this job before its next step (thread-safe: a flag the worker reads)."""
        self.cancelled = True

    @property
    def n(self) -> int:
        return self.config.num_return_sequences

    @property
    def batch_key(self) -> tuple:
        """Jobs with equal keys can share a decode (see Engine.fits): the same way of picking tokens."""
        c = self.config
        return (c.is_greedy, c.temperature, c.top_k, c.top_p, c.min_p, c.repetition_penalty)

    @property
    def reproducible(self) -> bool:
        """Greedy or seeded: its text must not depend on the jobs it is batched with."""
        return self.config.is_greedy or self.config.seed is not None

    def emit(self, *event: Any) -> None:
        self.mailbox.put(event)


@dataclass(eq=False)
class Batch:
    """One decode over the rows of one or more jobs: rows of jobs[i] are spans[i]."""

    jobs: list[Job]
    spans: list[range]
    steps: Optional[Iterator[torch.Tensor]] = None


class Engine:
    """Runs all generation on one worker thread; `submit` is called from the event loop."""

    def __init__(self, generator: TextGenerator, max_concurrency: int = 32, max_queue: int = 64,
                 max_batch_size: int = 32, max_decodes: int = 4, batch_wait: float = 0.05) -> None:
        self.model, self.tokenizer = generator.model, generator.tokenizer
        self.max_concurrency, self.max_queue, self.max_batch_size = max_concurrency, max_queue, max_batch_size
        self.max_decodes, self.batch_wait = max_decodes, batch_wait
        self._lock = threading.Condition()
        self._waiting: list[Job] = []
        self._running = 0                 # jobs in active decodes
        self._active: list[Batch] = []    # touched by the worker thread only
        self._closed = False
        self._thread: Optional[threading.Thread] = None
        self.generated_tokens = 0         # sequences x steps decoded so far (a measure of work done)
        self.decodes = 0                  # batched decodes started
        self.jobs_done = 0

    # ------------------------------------------------------------------------------ event-loop side
    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="lmforge-serve-worker", daemon=True)
        self._thread.start()

    def close(self) -> None:
        with self._lock:
            self._closed = True
            self._lock.notify()
        if self._thread is not None:
            self._thread.join(timeout=30)

    def submit(self, jobs: list[Job]) -> None:
        """Queue the jobs of one request, all or none; raises Busy when they do not fit."""
        with self._lock:
            if self._closed:
                raise Busy("the server is shutting down")
            free = self.max_concurrency + self.max_queue - self._running - len(self._waiting)
            if len(jobs) > free:
                raise Busy(f"{self._running} requests in generation and {len(self._waiting)} waiting")
            now = time.monotonic()
            for job in jobs:
                job.queued_at = now
            self._waiting.extend(jobs)
            self._lock.notify()

    def stats(self) -> dict:
        with self._lock:
            return {"running": self._running, "waiting": len(self._waiting), "generated_tokens": self.generated_tokens,
                    "decodes": self.decodes, "completed": self.jobs_done}

    # ---------------------------------------------------------------------------------- worker side
    def _loop(self) -> None:
        while True:
            with self._lock:
                while not self._closed and not self._waiting and not self._active:
                    self._lock.wait()
                if self._closed:
                    for job in self._waiting + [j for b in self._active for j in b.jobs]:
                        job.emit("error", 503, "the server is shutting down")
                    return
                started = self._admit()
            self._active.extend(started)
            stepped, now = 0, time.monotonic()
            for batch in list(self._active):
                if all(job.mailbox.backlog > MAX_BACKLOG and not job.cancelled and now <= job.deadline
                       for job in batch.jobs):
                    continue  # its clients read slower than we generate: wait for them (memory stays bounded)
                self._step(batch)
                stepped += 1
            if not stepped and not started:
                with self._lock:
                    self._lock.wait(0.005)  # every decode waits for a slow reader: let them read

    def _admit(self) -> list[Batch]:
        """Move waiting jobs into new decodes, oldest first, merging compatible ones (lock held)."""
        now, batches = time.monotonic(), []
        for job in [j for j in self._waiting if j.cancelled or now > j.deadline]:
            self._waiting.remove(job)
            if not job.cancelled:
                job.emit("error", 504, "the request timed out while waiting for the model")
        while self._waiting and self._running < self.max_concurrency:
            if (len(self._active) + len(batches) >= self.max_decodes
                    and now - self._waiting[0].queued_at < self.batch_wait):
                break  # enough decodes run: let waiting jobs gather into a bigger batch for a while
            group = [self._waiting.pop(0)]
            for job in list(self._waiting):
                if self._running + len(group) >= self.max_concurrency:
                    break
                if self.fits(group, job):
                    self._waiting.remove(job)
                    group.append(job)
            spans, row = [], 0
            for job in group:  # the n rows of each job, one after the other
                spans.append(range(row, row + job.n))
                row += job.n
            self._running += len(group)
            batches.append(Batch(group, spans))
        return batches

    def fits(self, group: list[Job], job: Job) -> bool:
        """Whether `job` can join the decode of `group`: the same sampling options, room in the batch, and,
        for a greedy or seeded job, a batch whose longest prompt plus new tokens fit in block_size (within
        the window a padded row gets the tokens it gets alone; see generate's module docstring)."""
        if job.batch_key != group[0].batch_key or sum(j.n for j in group) + job.n > self.max_batch_size:
            return False
        if not any(j.reproducible for j in group + [job]):
            return True
        longest = max(len(j.prompt_ids) for j in group + [job])
        budget = max(j.config.max_new_tokens for j in group + [job])
        return longest + budget <= self.model.config.block_size

    def _release(self, batch: Batch, job: Job) -> None:
        i = batch.jobs.index(job)
        del batch.jobs[i], batch.spans[i]
        with self._lock:
            self._running -= 1
            self.jobs_done += 1

    def _step(self, batch: Batch) -> None:
        """Advance one decode by one token and hand the text to its jobs; end it when no job is left."""
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
                tokens = next(batch.steps).tolist()  # (B,)
                self.generated_tokens += len(tokens)
                for job, span in zip(list(batch.jobs), list(batch.spans)):
                    self._take(batch, job, tokens[span.start:span.stop])
        except StopIteration:  # the decode's budget is spent: what is still open ran out of length
            for job in list(batch.jobs):
                for choice in job.choices:
                    if choice.finish is None:
                        choice.add(choice.decoder.flush(), job.stop)
                        choice.finish = choice.finish or "length"
                self._finish(batch, job)
        except Exception as e:  # a bug, not a user error: fail the jobs, keep the server up
            for job in list(batch.jobs):
                job.emit("error", 500, f"generation failed: {type(e).__name__}: {e}")
                self._release(batch, job)
        if not batch.jobs:
            if batch.steps is not None:
                batch.steps.close()
            self._active.remove(batch)

    def _start(self, batch: Batch) -> Iterator[torch.Tensor]:
        for job in batch.jobs:
            job.choices = [Choice(self.tokenizer.stream_decoder()) for _ in range(job.n)]
        budget = max(job.config.max_new_tokens for job in batch.jobs)
        config = replace(batch.jobs[0].config, max_new_tokens=budget, num_return_sequences=1)
        generators = None
        if not config.is_greedy:  # each job its own random streams: seeded as it would be alone, else fresh
            device = self.model.tok_emb.weight.device
            generators = [g for job in batch.jobs for g in row_generators(job.config, job.n, 1, device)]
        self.decodes += 1
        rows = [job.prompt_ids for job in batch.jobs for _ in range(job.n)]  # a prompt per row: n may differ
        return decode_batch(self.model, rows, config, end_ids=config.end_ids(self.tokenizer.end_id),
                            generators=generators)

    def _take(self, batch: Batch, job: Job, tokens: list[int]) -> None:
        """One new token per continuation of `job`: decode, apply stop strings and the length cap."""
        for index, (choice, token) in enumerate(zip(job.choices, tokens)):
            if choice.finish is not None:
                continue
            if token == self.tokenizer.end_id:
                choice.text += choice.decoder.flush()
                choice.finish = "stop"
            else:
                choice.tokens += 1
                choice.add(choice.decoder.push(token), job.stop)
                if choice.finish is None and choice.tokens >= job.config.max_new_tokens:
                    choice.add(choice.decoder.flush(), job.stop)
                    choice.finish = choice.finish or "length"
            if job.stream:
                self._report(job, index, choice)
        if all(choice.finish is not None for choice in job.choices):
            self._finish(batch, job)

    def _report(self, job: Job, index: int, choice: Choice) -> None:
        """Stream out the text of a continuation that is settled, and its end once it has one."""
        piece = choice.ready(job.stop)
        if piece:
            job.emit("piece", job.first_index + index, piece)
        if choice.finish is not None and not choice.reported:
            choice.reported = True
            job.emit("finish", job.first_index + index, choice.finish)

    def _finish(self, batch: Batch, job: Job) -> None:
        if job.stream:
            for index, choice in enumerate(job.choices):
                self._report(job, index, choice)
        job.emit("done", job)
        self._release(batch, job)
