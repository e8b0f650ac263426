"""`lmforge serve` with speculative decoding (serve.assistant_model, serve.assistant_early_exit,
serve.prompt_lookup_num_tokens), on a real uvicorn server on loopback: every greedy answer (plain, n > 1, several
prompts, stop strings, logprobs, streamed, chat) equals the plain server's; /metrics counts the guesses; each job
decodes on its own; bad settings are refused."""

from __future__ import annotations

import asyncio
import re
import threading
import time
from pathlib import Path

import httpx
import pytest
import torch

from lmforge.checkpoint import save_checkpoint
from lmforge.config import ModelConfig, RunConfig
from lmforge.errors import ConfigError
from lmforge.generate import GenerateConfig, load
from lmforge.model import GPT
from lmforge.serve import ServeConfig, load_app
from lmforge.serve.app import create_app
from lmforge.serve.engine import Engine, Job, Mailbox
from lmforge.tokenizer import byte_tokenizer
from test_serve import BLOCK, make_run, running, sse_events, until_done


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> tuple[Path, Path]:
    """The served run (test_serve's tiny model that never ends) and a smaller random draft with its tokenizer."""
    root = tmp_path_factory.mktemp("serve-speculative")
    run = make_run(root)
    tok = byte_tokenizer()
    torch.manual_seed(1)
    draft = GPT(ModelConfig(vocab_size=tok.vocab_size, block_size=BLOCK, n_layer=1, n_head=2, n_embd=16)).eval()
    save_checkpoint(root / "draft", 1, draft, None, RunConfig(model=draft.config), {},
                    tokenizer_file=root / "tokenizer.json")
    return run, root / "draft"


def ask(url: str, plain: dict) -> list:
    """Each request's answer, made comparable: texts, finish reasons, usage and logprob tokens (values rounded)."""
    answers = []
    with httpx.Client(base_url=url, timeout=60) as client:
        for path, body in requests(plain):
            if body.get("stream"):
                with client.stream("POST", path, json=body) as r:
                    assert r.status_code == 200
                    texts: dict[int, str] = {}
                    for event in sse_events(r)[:-1]:
                        for choice in event["choices"]:
                            piece = choice.get("text") or choice.get("delta", {}).get("content") or ""
                            texts[choice["index"]] = texts.get(choice["index"], "") + piece
                    answers.append(sorted(texts.items()))
                continue
            r = client.post(path, json=body)
            assert r.status_code == 200, r.text
            out = r.json()
            answers.append([(c.get("text") or c["message"]["content"], c["finish_reason"],
                             [round(x, 3) for x in (c["logprobs"] or {}).get("token_logprobs", [])],
                             (c["logprobs"] or {}).get("tokens")) for c in out["choices"]] + [out["usage"]])
        metrics = client.get("/metrics").text
    return answers, metrics


def requests(plain: dict) -> list[tuple[str, dict]]:
    """The greedy requests every server answers; a stop string cut from the plain server's first text."""
    stop = plain.get("stop", "zz")
    return [("/v1/completions", {"prompt": "Hello there", "max_tokens": 40, "temperature": 0}),
            ("/v1/completions", {"prompt": ["ab", "a longer prompt"], "max_tokens": 30, "temperature": 0, "n": 2}),
            ("/v1/completions", {"prompt": "Hello there", "max_tokens": 40, "temperature": 0, "stop": [stop]}),
            ("/v1/completions", {"prompt": "scored", "max_tokens": 20, "temperature": 0, "logprobs": 2}),
            ("/v1/completions", {"prompt": "streamed", "max_tokens": 40, "temperature": 0, "stream": True, "n": 2}),
            ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 30,
                                      "temperature": 0}),
            ("/v1/completions", {"prompt": "Hello there", "max_tokens": 30, "temperature": 0, "guidance_scale": 2.5,
                                 "negative_prompt": "Goodbye"})]  # guidance: decoded without speculation


def counter(metrics: str, name: str) -> int:
    return int(re.search(rf"^{name} (\d+)$", metrics, re.M).group(1))


def test_speculative_servers_answer_as_the_plain_server_and_count_their_guesses(runs):
    run, draft = runs
    with running(load_app(str(run), ServeConfig(), device="cpu")) as url:
        with httpx.Client(base_url=url) as client:
            first = client.post("/v1/completions", json=requests({})[0][1]).json()["choices"][0]["text"]
        plain = {"stop": first[10:13]}
        want, metrics = ask(url, plain)
    assert "speculative" not in metrics
    assert want[2][0][:2] == (first[:first.find(plain["stop"])], "stop")  # cut where the stop string began
    for name, config in [("lookup", ServeConfig(prompt_lookup_num_tokens=6)),
                         ("itself", ServeConfig(assistant_model=str(run), num_assistant_tokens=4)),
                         ("early-exit", ServeConfig(assistant_early_exit=1)),
                         ("draft", ServeConfig(assistant_model=str(draft)))]:
        app = load_app(str(run), config, device="cpu")
        with running(app) as url:
            got, metrics = ask(url, plain)
        assert got == want, name
        drafted = counter(metrics, "lmforge_speculative_drafted_tokens_total")
        accepted = counter(metrics, "lmforge_speculative_accepted_tokens_total")
        generated = counter(metrics, "lmforge_generated_tokens_total")
        assert 0 < drafted and accepted <= drafted and accepted < generated, name
        if name == "itself":  # the model as its own draft: every guess kept
            assert accepted == drafted
        else:  # a random draft, or the lookup on a random model's text: guesses refused, and (lookup) kept
            assert accepted < drafted and (accepted > 0 or name == "draft"), name
        # one decode per prompt: never merged into a batch
        prompts = sum(len(b["prompt"]) if isinstance(b.get("prompt"), list) else 1 for _, b in requests(plain))
        assert counter(metrics, "lmforge_decodes_total") == prompts, name


def test_a_seeded_sample_repeats_and_speculating_jobs_never_share_a_decode(runs):
    run, _ = runs
    with running(load_app(str(run), ServeConfig(prompt_lookup_num_tokens=5), device="cpu")) as url:
        with httpx.Client(base_url=url, timeout=60) as client:
            body = {"prompt": "seeded", "max_tokens": 40, "seed": 7, "top_k": 20, "n": 2}
            texts = [[c["text"] for c in client.post("/v1/completions", json=body).json()["choices"]]
                     for _ in range(2)]
            answers: list = []
            threads = [threading.Thread(target=lambda p=p: answers.append(client.post(
                "/v1/completions", json={"prompt": p, "max_tokens": 60, "temperature": 0}).status_code))
                for p in ("one", "two", "three")]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            metrics = client.get("/metrics").text
    assert texts[0] == texts[1] and texts[0][0] != texts[0][1]
    assert answers == [200, 200, 200] and counter(metrics, "lmforge_decodes_total") == 5


def test_past_speculative_max_running_jobs_join_plain_batches(runs):
    """With speculative_max_running=2, the jobs that start while 2 prompts are in generation decode as one plain
    batch (no guesses); the first two speculate alone; every text is plain greedy's."""
    run, draft = runs
    generator = load(str(run), device="cpu", assistant=str(draft))
    engine = Engine(generator, speculation={"num_assistant_tokens": 4}, speculative_max_running=2)

    async def scenario() -> list[Job]:
        loop = asyncio.get_running_loop()
        jobs = [Job([generator.tokenizer.start_id] + generator.tokenizer.encode(p),
                    GenerateConfig(greedy=True, max_new_tokens=20), False, time.monotonic() + 60, Mailbox(loop))
                for p in ("one", "two", "three", "four", "five")]
        for job in jobs:  # all waiting before the worker starts: admitted in one turn
            engine.submit([job])
        engine.start()
        await until_done(jobs, 60)
        return jobs

    try:
        jobs = asyncio.run(scenario())
    finally:
        engine.close()
    assert engine.decodes == 3  # two speculating alone, then one batch of the other three
    assert [job.rows[0].drafted > 0 for job in jobs] == [True, True, False, False, False]
    plain = load(str(run), device="cpu")
    assert [job.choices[0].text for job in jobs] == [plain.generate(p, greedy=True, max_new_tokens=20)
                                                     for p in ("one", "two", "three", "four", "five")]


def test_bad_speculative_settings_are_refused(runs):
    run, draft = runs
    with pytest.raises(ConfigError, match="give one"):
        ServeConfig(assistant_model=str(draft), prompt_lookup_num_tokens=3)
    with pytest.raises(ConfigError, match="serve.assistant_model RUN_DIR"):
        ServeConfig(num_assistant_tokens=3)
    with pytest.raises(ConfigError, match="serve.assistant_early_exit and serve.prompt_lookup_num_tokens both guess"):
        ServeConfig(assistant_early_exit=1, prompt_lookup_num_tokens=3)
    with pytest.raises(ConfigError, match="is not below the model's 2 layers"):  # at start, not at a request
        load_app(str(run), ServeConfig(assistant_early_exit=2), device="cpu")
    with pytest.raises(ConfigError, match="prompt_lookup_num_tokens"):
        ServeConfig(prompt_lookup_num_tokens=0)
    with pytest.raises(ConfigError, match="serve.speculative_max_running limits"):
        ServeConfig(speculative_max_running=2)
    with pytest.raises(ConfigError, match="has no assistant"):
        create_app(load(str(run), device="cpu"), ServeConfig(assistant_model=str(draft)))
