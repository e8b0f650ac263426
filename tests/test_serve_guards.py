"""Limits and accounting of `lmforge serve` that the main tests reach only on one side, each against a real server
on loopback: a client's first request is taken whatever its size, and the other boundaries named below."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import httpx
import pytest
import torch

from lmforge.checkpoint import save_checkpoint
from lmforge.config import RunConfig
from lmforge.generate import GenerateConfig, load
from lmforge.serve import ServeConfig, load_app
from lmforge.serve.app import CHAT_DEFAULT_MAX_TOKENS
from lmforge.serve.engine import Busy, ClassifyEngine, ClassifyJob, Engine, Job, Mailbox
from test_serve import make_run, running, wait_until
from test_serve_classify import make_classifier_run
from test_serve_hostile import scrape


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    return make_run(tmp_path_factory.mktemp("serve-guards"))


def test_a_clients_first_request_is_taken_even_with_more_prompts_than_its_share(run_dir):
    app = load_app(str(run_dir), ServeConfig(max_slots_per_client=1), device="cpu")
    with running(app) as url, httpx.Client(base_url=url, timeout=30) as c:
        r = c.post("/v1/completions", json={"prompt": ["ab", "cd", "ef"], "max_tokens": 2, "temperature": 0})
        assert r.status_code == 200 and [ch["index"] for ch in r.json()["choices"]] == [0, 1, 2]
        wait_until(lambda: app.state.engine.stats()["running"] == 0)
        again = c.post("/v1/completions", json={"prompt": "ab", "max_tokens": 2, "temperature": 0})
        assert again.status_code == 200  # its places were all given back


def run_jobs(engine: Engine, generator, specs: list[tuple[str, dict]], watch=None) -> list[Job]:
    """Submit one job per (prompt, GenerateConfig options), each its own request, before the worker starts; run
    them to the end, calling watch() between events. Returns the jobs."""

    async def scenario():
        loop = asyncio.get_running_loop()
        jobs = [Job([generator.tokenizer.start_id] + generator.tokenizer.encode(prompt), GenerateConfig(**options),
                    False, time.monotonic() + 60, Mailbox(loop)) for prompt, options in specs]
        for job in jobs:
            engine.submit([job])
        engine.start()
        for job in jobs:
            while True:
                if watch is not None:
                    watch()
                event = await job.mailbox.get(0.01)
                if event is not None and event[0] == "done":
                    break
        return jobs

    try:
        return asyncio.run(scenario())
    finally:
        engine.close()


def test_a_seeded_job_is_not_batched_where_a_longer_prompt_would_push_it_past_the_block(run_dir):
    """A seeded sample must be the text it is alone (as a greedy one): a batch whose longest prompt plus new tokens
    exceed block_size would slide its window differently, so the engine decodes it apart."""
    generator = load(str(run_dir), device="cpu")
    engine = Engine(generator, max_concurrency=8, max_queue=8, max_batch_size=8)
    long_prompt = "a long prompt of many many bytes, fifty or so of them"
    assert len(long_prompt) + 1 + 40 > generator.model.config.block_size
    seeded, _ = run_jobs(engine, generator, [("s", {"max_new_tokens": 40, "seed": 5}),
                                             (long_prompt, {"max_new_tokens": 4})])
    assert engine.decodes == 2
    assert seeded.choices[0].text == generator.generate("s", max_new_tokens=40, seed=5)


def ending_run(root: Path) -> Path:
    """make_run's model, but its end token is always the likeliest: greedy decoding ends at once."""
    generator = load(str(make_run(root)), device="cpu")
    model, end = generator.model, generator.tokenizer.end_id
    with torch.no_grad():
        model.lm_head.weight[end, 0] = 100.0  # feature 0 after the final norm is always 1
    save_checkpoint(root / "ending", 1, model, None, RunConfig(model=model.config), {},
                    tokenizer_file=root / "tokenizer.json")
    return root / "ending"


def test_an_end_token_is_not_counted_as_a_completion_token(tmp_path):
    with running(load_app(str(ending_run(tmp_path)), ServeConfig(), device="cpu")) as url, \
            httpx.Client(base_url=url, timeout=30) as c:
        r = c.post("/v1/completions", json={"prompt": "ab", "max_tokens": 5, "temperature": 0}).json()
        assert r["choices"][0]["text"] == "" and r["choices"][0]["finish_reason"] == "stop"
        assert r["usage"]["completion_tokens"] == 0 and r["usage"]["total_tokens"] == r["usage"]["prompt_tokens"]
        chat = c.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}],
                                                    "max_tokens": 5, "temperature": 0}).json()
        assert chat["choices"][0]["finish_reason"] == "stop" and chat["usage"]["completion_tokens"] == 0


def test_a_body_of_exactly_max_body_bytes_is_taken_and_one_byte_more_is_refused(run_dir):
    limit = 200
    with running(load_app(str(run_dir), ServeConfig(max_body_bytes=limit), device="cpu")) as url, \
            httpx.Client(base_url=url, timeout=30) as c:
        def body(size: int) -> bytes:
            head = b'{"prompt": "ab", "max_tokens": 1, "temperature": 0, "user": "'
            return head + b"u" * (size - len(head) - 2) + b'"}'

        assert len(body(limit)) == limit
        fits = c.post("/v1/completions", content=body(limit), headers={"Content-Type": "application/json"})
        assert fits.status_code == 200, fits.text
        over = c.post("/v1/completions", content=body(limit + 1), headers={"Content-Type": "application/json"})
        assert over.status_code == 413 and "serve.max_body_bytes" in over.json()["error"]["message"]


def test_a_chat_without_max_tokens_gets_the_servers_cap_when_it_is_below_the_chat_default(run_dir):
    cap = min(8, CHAT_DEFAULT_MAX_TOKENS - 1)
    with running(load_app(str(run_dir), ServeConfig(max_tokens=cap), device="cpu")) as url, \
            httpx.Client(base_url=url, timeout=30) as c:
        r = c.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}], "temperature": 0})
        assert r.status_code == 200, r.text
        assert r.json()["usage"]["completion_tokens"] == cap and r.json()["choices"][0]["finish_reason"] == "length"


def test_tokens_per_second_counts_only_the_tokens_since_the_previous_scrape(run_dir):
    with running(load_app(str(run_dir), ServeConfig(), device="cpu")) as url:
        assert httpx.post(url + "/v1/completions", json={"prompt": "x", "max_tokens": 7}).status_code == 200
        busy = scrape(url)
        assert busy["lmforge_generated_tokens_total"] == 7 and busy["lmforge_tokens_per_second"] > 0
        time.sleep(0.05)
        idle = scrape(url)  # nothing generated since
        assert idle["lmforge_generated_tokens_total"] == 7 and idle["lmforge_tokens_per_second"] == 0


def test_token_ids_are_checked_against_the_vocabulary_at_both_ends(run_dir):
    with running(load_app(str(run_dir), ServeConfig(), device="cpu")) as url, \
            httpx.Client(base_url=url, timeout=30) as c:
        vocab = load(str(run_dir), device="cpu").tokenizer.vocab_size
        assert c.post("/detokenize", json={"tokens": [0, vocab - 1]}).status_code == 200
        for bad in (vocab, -1):
            r = c.post("/detokenize", json={"tokens": [65, bad]})
            assert r.status_code == 422 and f"token id {bad} is outside the vocabulary" in r.json()["error"]["message"]
            r = c.post("/v1/completions", json={"prompt": [65, bad], "max_tokens": 1})
            assert r.status_code == 422 and f"token id {bad} is outside the vocabulary" in r.json()["error"]["message"]
        assert c.post("/v1/completions", json={"prompt": [65, vocab - 1], "max_tokens": 1}).status_code == 200


def test_a_batch_holds_at_most_max_batch_size_rows(run_dir):
    generator = load(str(run_dir), device="cpu")
    engine = Engine(generator, max_concurrency=8, max_queue=8, max_batch_size=2)
    specs = [(p, {"max_new_tokens": 6, "temperature": 0.0}) for p in ("a", "bb", "ccc")]
    jobs = run_jobs(engine, generator, specs)
    assert engine.decodes == 2  # (a, bb) then ccc
    assert [j.choices[0].text for j in jobs] == [generator.generate(p, **o) for p, o in specs]


def test_no_more_than_max_concurrency_prompts_are_in_generation_at_once(run_dir):
    generator = load(str(run_dir), device="cpu")
    engine = Engine(generator, max_concurrency=1, max_queue=8, max_batch_size=8)
    seen = []
    run_jobs(engine, generator, [(p, {"max_new_tokens": 20}) for p in ("a", "bb", "ccc")],
             watch=lambda: seen.append(engine.stats()["running"]))
    assert max(seen) == 1 and engine.decodes == 3


def test_a_job_with_classifier_free_guidance_counts_two_rows_of_a_batch(run_dir):
    """Guidance decodes a conditional and an unconditional row per sequence: two such jobs do not share a batch of
    max_batch_size 2, and each gets the text it gets alone."""
    generator = load(str(run_dir), device="cpu")
    engine = Engine(generator, max_concurrency=8, max_queue=8, max_batch_size=2)
    specs = [(p, {"max_new_tokens": 5, "temperature": 0.0, "guidance_scale": 1.5}) for p in ("ab", "cd")]
    jobs = run_jobs(engine, generator, specs)
    assert engine.decodes == 2
    assert [j.choices[0].text for j in jobs] == [generator.generate(p, **o) for p, o in specs]


def test_a_classifiers_queue_counts_texts_not_requests(tmp_path):
    engine = ClassifyEngine(load(str(make_classifier_run(tmp_path)), device="cpu"), max_concurrency=4, max_queue=8)

    async def submit():
        loop = asyncio.get_running_loop()
        for texts in (["a", "b", "c"], ["d", "e"]):
            engine.submit([ClassifyJob(texts, None, time.monotonic() + 60, Mailbox(loop))])

    asyncio.run(submit())  # not started: everything waits
    assert engine.stats()["waiting"] == 5 and engine.stats()["running"] == 0


def test_a_completion_without_temperature_samples_at_temperature_one_as_openais(run_dir):
    with running(load_app(str(run_dir), ServeConfig(), device="cpu")) as url, \
            httpx.Client(base_url=url, timeout=30) as c:
        def text(**extra) -> str:
            r = c.post("/v1/completions", json={"prompt": "ab", "max_tokens": 12, "seed": 3, **extra})
            assert r.status_code == 200, r.text
            return r.json()["choices"][0]["text"]

        assert text() == text(temperature=None) == text(temperature=1.0) != text(temperature=0)  # null: the default


def test_by_default_one_client_holds_at_most_half_the_places_in_generation(run_dir):
    assert ServeConfig(max_concurrency=4).slots_per_client == 2 and ServeConfig(max_concurrency=1).slots_per_client == 1
    assert ServeConfig(max_concurrency=4, max_slots_per_client=3).slots_per_client == 3
    engine = load_app(str(run_dir), ServeConfig(max_concurrency=4), device="cpu").state.engine  # not started

    async def submit(client: str) -> None:
        job = Job([0, 65], GenerateConfig(max_new_tokens=2), False, time.monotonic() + 60,
                  Mailbox(asyncio.get_running_loop()), client=client)
        engine.submit([job])

    asyncio.run(submit("10.0.0.1"))
    asyncio.run(submit("10.0.0.1"))  # 2 of the 4 places
    with pytest.raises(Busy, match="at most 2 per client"):
        asyncio.run(submit("10.0.0.1"))
    asyncio.run(submit("10.0.0.2"))  # another address still gets in
