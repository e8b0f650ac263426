"""`lmforge serve` over a real uvicorn server on loopback: the API's answers, each limit, cancellation, batching.

The model is a tiny random GPT with the byte tokenizer (its text is noise, but deterministic given a seed).
Servers run in a thread of this process on a free port of 127.0.0.1; torch uses one thread.
"""

from __future__ import annotations

import asyncio
import json
import re
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import httpx
import pytest
import torch

from lmforge.checkpoint import save_checkpoint
from lmforge.config import ModelConfig, RunConfig
from lmforge.errors import ConfigError
from lmforge.generate import GenerateConfig, TextGenerator, load
from lmforge.model import GPT
from lmforge.serve import ServeConfig, load_app
from lmforge.serve.app import create_app
from lmforge.serve.engine import Busy, Engine, Job, Mailbox
from lmforge.tokenizer import byte_tokenizer

BLOCK = 64


def make_run(root: Path, block_size: int = BLOCK) -> Path:
    """A run directory holding one checkpoint of a tiny random model with the byte tokenizer, that never ends."""
    tok = byte_tokenizer()
    tok.save(root / "tokenizer.json")
    torch.manual_seed(0)
    model = GPT(ModelConfig(vocab_size=tok.vocab_size, block_size=block_size, n_layer=2, n_head=2, n_embd=32,
                            tie_embeddings=False)).eval()
    with torch.no_grad():  # never the end token, so generations run as long as asked: feature 0 after the
        model.norm_f.weight[0], model.norm_f.bias[0] = 0.0, 1.0  # final norm is always 1, and it pushes
        model.lm_head.weight[tok.end_id] = 0.0                   # the end token's logit to -100
        model.lm_head.weight[tok.end_id, 0] = -100.0
    save_checkpoint(root / "run", 1, model, None, RunConfig(model=model.config), {},
                    tokenizer_file=root / "tokenizer.json")
    return root / "run"


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    return make_run(tmp_path_factory.mktemp("serve"))


@contextmanager
def running(app) -> Iterator[str]:
    """Serve `app` with uvicorn, as `lmforge serve` configures it, on a free loopback port in a thread; yields the
    base URL."""
    import uvicorn

    from lmforge.serve.connections import uvicorn_config

    server = uvicorn.Server(uvicorn_config(app, app.state.config, "127.0.0.1", 0, "warning",
                                           timeout_graceful_shutdown=2))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:  # uvicorn offers no start callback: poll its flag
        assert thread.is_alive() and time.monotonic() < deadline, "the server did not start"
        time.sleep(0.01)
    port = server.servers[0].sockets[0].getsockname()[1]
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=15)
        assert not thread.is_alive(), "the server did not stop"


@pytest.fixture(scope="module")
def server(run_dir):
    """The default server (default limits but a small body cap and a large max_tokens cap) and its app."""
    app = load_app(str(run_dir), ServeConfig(max_body_bytes=4096, max_tokens=100_000), device="cpu")
    with running(app) as url:
        yield url, app


async def until_done(jobs: list, wait: float = 30.0) -> None:
    """Read each engine job's events until its "done" (a job that says nothing for `wait` seconds fails the test)."""
    for job in jobs:
        while (await job.mailbox.get(wait))[0] != "done":
            pass


def complete(client: httpx.Client, **body) -> dict:
    r = client.post("/v1/completions", json=body)
    assert r.status_code == 200, r.text
    return r.json()


def sse_events(response: httpx.Response) -> list:
    """The JSON payloads of a server-sent event stream, and "[DONE]" for its end marker."""
    events = []
    for line in response.iter_lines():
        if line.startswith("data: "):
            data = line[len("data: "):]
            events.append(data if data == "[DONE]" else json.loads(data))
        else:
            assert line == "", f"unexpected line in the event stream: {line!r}"
    return events


def streamed_choices(client: httpx.Client, body: dict) -> dict[int, dict]:
    """A streamed chat completion put back together per choice: its content, its tool calls (id, name and
    arguments joined from their deltas, by tool call index) and its finish reason."""
    with client.stream("POST", "/v1/chat/completions", json={**body, "stream": True}) as r:
        assert r.status_code == 200, r.read()
        events = sse_events(r)
    assert events[-1] == "[DONE]"
    out: dict[int, dict] = {}
    for event in events[:-1]:
        for choice in event["choices"]:
            got = out.setdefault(choice["index"], {"content": "", "tool_calls": {}, "finish_reason": None})
            got["content"] += choice["delta"].get("content") or ""
            for call in choice["delta"].get("tool_calls") or []:
                mine = got["tool_calls"].setdefault(call["index"], {"id": None, "name": "", "arguments": ""})
                mine["id"] = call.get("id") or mine["id"]
                mine["name"] += call.get("function", {}).get("name") or ""
                mine["arguments"] += call.get("function", {}).get("arguments") or ""
            got["finish_reason"] = choice["finish_reason"] or got["finish_reason"]
    return out


def wait_until(condition, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.02)


# ---------------------------------------------------------------------------------------------- the API
def test_health_models_and_a_completion(client):
    health = client.get("/health").json()
    assert health["status"] == "ok" and health["model"] == "run"
    models = client.get("/v1/models").json()
    assert models["object"] == "list" and [m["id"] for m in models["data"]] == ["run"]

    out = complete(client, model="run", prompt="Hello", max_tokens=12, seed=1, n=2)
    assert out["object"] == "text_completion" and out["model"] == "run" and out["id"].startswith("cmpl-")
    assert [c["index"] for c in out["choices"]] == [0, 1]
    for choice in out["choices"]:
        assert choice["finish_reason"] == "length" and choice["logprobs"] is None
    usage = out["usage"]
    assert usage["prompt_tokens"] == len("Hello") + 1  # byte tokens and <START>
    assert usage["completion_tokens"] == 24 and usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]
    assert out["choices"][0]["text"] != out["choices"][1]["text"]  # two samples, not one twice


def test_openai_fields_at_their_neutral_values_and_vllm_extras_are_accepted(client, run_dir):
    neutral = dict(frequency_penalty=0, presence_penalty=0.0, best_of=1, logprobs=None, echo=False, logit_bias={},
                   suffix=None, user="me")
    plain = complete(client, prompt="ab", max_tokens=6, seed=2)["choices"][0]["text"]
    assert complete(client, prompt="ab", max_tokens=6, seed=2, **neutral)["choices"][0]["text"] == plain
    penalized = complete(client, prompt="ab", max_tokens=30, temperature=0, repetition_penalty=50.0, top_k=5,
                         min_p=0.01)["choices"][0]["text"]
    chars = penalized.replace("\ufffd", "")  # (a byte that is no UTF-8 character on its own)
    assert len(set(chars)) == len(chars)  # such a penalty never repeats a (byte) token
    # OpenAI's presence and frequency penalties: the text the Python API gives with them, not the plain one
    options = dict(prompt="ab", max_tokens=30, temperature=0, presence_penalty=1.5, frequency_penalty=0.5)
    openai = complete(client, **options)["choices"][0]["text"]
    assert openai != complete(client, prompt="ab", max_tokens=30, temperature=0)["choices"][0]["text"]
    chat = client.post("/v1/chat/completions", json={
        "messages": [{"role": "user", "content": "ab"}], "max_tokens": 30, "temperature": 0, "presence_penalty": 1.5,
        "frequency_penalty": 0.5})
    assert chat.status_code == 200, chat.text
    assert openai == load(str(run_dir), device="cpu").generate("ab", max_new_tokens=30, greedy=True,
                                                               presence_penalty=1.5, frequency_penalty=0.5)


def test_openai_logit_bias_and_vllm_min_tokens_bad_words_typical_p_give_the_python_apis_text(client, run_dir):
    generator = load(str(run_dir), device="cpu")
    free = generator.complete(["ab"], max_new_tokens=30, greedy=True)[0][0]
    first, word = free.token_ids[0], free.text[4:6]
    options = dict(logit_bias={first: -100.0}, min_new_tokens=25, bad_words=[word])
    want = generator.generate("ab", max_new_tokens=30, greedy=True, **options)
    body = dict(prompt="ab", max_tokens=30, temperature=0, logit_bias={str(first): -100}, min_tokens=25,
                bad_words=[word])
    got = complete(client, **body)["choices"][0]
    assert got["text"] == want != free.text and word not in got["text"] and not got["text"].startswith(free.text[0])
    chat = client.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "ab"}],
                                                     **{k: v for k, v in body.items() if k != "prompt"}})
    assert chat.status_code == 200, chat.text
    stop = next(c for c in free.text if c != "\ufffd")  # an early stop string counts only past min_tokens
    early = complete(client, prompt="ab", max_tokens=30, temperature=0, stop=[stop])["choices"][0]["text"]
    held = complete(client, prompt="ab", max_tokens=30, temperature=0, stop=[stop], min_tokens=20)["choices"][0]
    assert len(held["text"]) > len(early) and held["text"] == generator.generate(
        "ab", max_new_tokens=30, greedy=True, stop_strings=[stop], min_new_tokens=20)
    choices = ["yes", "no", "not sure"]
    answers = complete(client, prompt="ab", max_tokens=30, n=4, seed=2, temperature=2.0, guided_choice=choices)
    assert [c["text"] for c in answers["choices"]] == [c.text for c in generator.complete(
        ["ab"], max_new_tokens=30, num_return_sequences=4, seed=2, temperature=2.0, guided_choice=choices)[0]]
    assert all(c["text"] in choices and c["finish_reason"] == "stop" for c in answers["choices"])
    pattern = r"[0-9]{3}-[0-9]{4}"
    phones = complete(client, prompt="ab", max_tokens=30, n=3, seed=5, guided_regex=pattern)["choices"]
    assert [c["text"] for c in phones] == [c.text for c in generator.complete(
        ["ab"], max_new_tokens=30, num_return_sequences=3, seed=5, guided_regex=pattern)[0]]
    assert all(re.fullmatch(pattern, c["text"]) and c["finish_reason"] == "stop" for c in phones)
    schema = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 6}, "ok": {"type": "boolean"},
                                               "mood": {"enum": ["happy", "sad"]}},
              "required": ["name", "ok", "mood"]}  # bounded: it always ends
    as_vllm = complete(client, prompt="ab", max_tokens=120, seed=3, guided_json=schema)["choices"][0]["text"]
    as_openai = client.post("/v1/chat/completions", json={
        "messages": [{"role": "user", "content": "ab"}], "max_tokens": 120, "seed": 3,
        "response_format": {"type": "json_schema", "json_schema": {"name": "person", "schema": schema}}})
    reply = json.loads(as_openai.json()["choices"][0]["message"]["content"])
    assert as_vllm == generator.generate("ab", max_new_tokens=120, seed=3, guided_json=schema)
    for obj in (json.loads(as_vllm), reply):
        assert list(obj) == ["name", "ok", "mood"] and isinstance(obj["name"], str) and len(obj["name"]) <= 6
        assert isinstance(obj["ok"], bool) and obj["mood"] in ("happy", "sad")
    any_object = client.post("/v1/chat/completions", json={  # OpenAI's JSON mode: any object
        "messages": [{"role": "user", "content": "ab"}], "max_tokens": 300, "seed": 3,
        "response_format": {"type": "json_object"}}).json()["choices"][0]
    assert any_object["finish_reason"] == "stop" and isinstance(json.loads(any_object["message"]["content"]), dict)
    assert any_object["message"]["content"] == generator.generate(generator.render_chat(
        [{"role": "user", "content": "ab"}]), max_new_tokens=300, seed=3, guided_json={"type": "object"},
        stop_strings=[generator.chat_stop()])
    guided = complete(client, prompt="ab", max_tokens=30, seed=6, n=2, guidance_scale=2.0, negative_prompt="zz")
    assert [c["text"] for c in guided["choices"]] == generator.generate(
        "ab", max_new_tokens=30, seed=6, num_return_sequences=2, guidance_scale=2.0, negative_prompt="zz")
    sampled = complete(client, prompt="ab", max_tokens=30, seed=4, typical_p=0.7, logit_bias={str(first): 3})
    assert sampled["choices"][0]["text"] == generator.generate("ab", max_new_tokens=30, seed=4, typical_p=0.7,
                                                               logit_bias={first: 3.0})


def test_prompt_list_and_n_give_one_choice_per_prompt_and_sample(client):
    out = complete(client, prompt=["ab", "xyz"], max_tokens=5, n=2, temperature=0)
    assert [c["index"] for c in out["choices"]] == [0, 1, 2, 3]
    texts = [c["text"] for c in out["choices"]]
    assert texts[0] == texts[1] and texts[2] == texts[3]  # greedy: n copies agree
    assert out["usage"]["prompt_tokens"] == 3 + 4  # each prompt counted once, not n times
    assert all(c["finish_reason"] == "length" for c in out["choices"])  # the test model never ends


def test_same_seed_gives_the_same_text_as_the_python_api_and_the_cli(client, run_dir, capsys):
    from lmforge.cli import main

    options = dict(prompt="To be", max_tokens=30, seed=7, temperature=0.9, top_p=0.95)
    api = complete(client, **options)["choices"][0]["text"]
    assert api == complete(client, **options)["choices"][0]["text"]
    python = load(str(run_dir), device="cpu").generate("To be", max_new_tokens=30, seed=7, temperature=0.9,
                                                      top_p=0.95)
    assert api == python
    with client.stream("POST", "/v1/completions", json={**options, "stream": True}) as r:
        events = sse_events(r)
    assert events[-1] == "[DONE]"
    assert "".join(e["choices"][0]["text"] for e in events[:-1]) == api
    capsys.readouterr()
    assert main(["generate", str(run_dir), "--prompt", "To be", "--max-new-tokens", "30", "--seed", "7",
                 "--temperature", "0.9", "--top-p", "0.95", "--device", "cpu", "--no-stream"]) == 0
    assert capsys.readouterr().out == "To be" + api + "\n"


def test_stop_sequences_cut_the_text_streamed_or_not(client):
    full = complete(client, prompt="abc", max_tokens=40, temperature=0)["choices"][0]["text"]
    stop = full[10:12]
    expected = full[:full.index(stop)]
    out = complete(client, prompt="abc", max_tokens=40, temperature=0, stop=[stop, "\x00never"])
    assert out["choices"][0]["text"] == expected and out["choices"][0]["finish_reason"] == "stop"
    assert out["usage"]["completion_tokens"] < 40
    with client.stream("POST", "/v1/completions", json={"prompt": "abc", "max_tokens": 40, "temperature": 0,
                                                         "stop": stop, "stream": True}) as r:
        events = sse_events(r)
    pieces = [e["choices"][0] for e in events[:-1]]
    assert "".join(p["text"] for p in pieces) == expected  # nothing of the stop string leaked out
    assert [p["finish_reason"] for p in pieces if p["finish_reason"]] == ["stop"]


def test_streaming_with_usage_and_several_choices(client):
    body = {"prompt": ["p", "q"], "max_tokens": 6, "n": 2, "seed": 3, "stream": True,
            "stream_options": {"include_usage": True}}
    with client.stream("POST", "/v1/completions", json=body) as r:
        assert r.headers["content-type"].startswith("text/event-stream")
        events = sse_events(r)
    assert events[-1] == "[DONE]"
    usage = events[-2]["usage"]
    texts = {i: "" for i in range(4)}
    finishes = {}
    for e in events[:-2]:
        (choice,) = e["choices"]
        texts[choice["index"]] += choice["text"]
        if choice["finish_reason"]:
            finishes[choice["index"]] = choice["finish_reason"]
    assert finishes == {i: "length" for i in range(4)}
    assert usage["completion_tokens"] == 4 * 6 and usage["prompt_tokens"] == 2 + 2
    plain = complete(client, **{k: v for k, v in body.items() if k not in ("stream", "stream_options")})
    assert [c["text"] for c in plain["choices"]] == [texts[i] for i in range(4)]


def test_best_of_returns_the_n_candidates_of_highest_log_probability_per_token(client):
    """best_of=5, n=2: the five candidates are what n=5 with the same seed samples, and the two returned are the two
    of highest mean token log probability, best first; usage counts all five; logprobs only when asked."""
    body = {"prompt": ["ROMEO:", "To be"], "max_tokens": 8, "seed": 11, "temperature": 1.0, "stop": ["e", "o"]}
    every = complete(client, **body, n=5, logprobs=0)
    ranked, by_sum = [], []
    for p in range(2):
        candidates = [c for c in every["choices"] if c["index"] // 5 == p]
        sums = [sum(c["logprobs"]["token_logprobs"]) for c in candidates]
        mean = [total / len(c["logprobs"]["token_logprobs"]) for total, c in zip(sums, candidates)]
        assert len(set(mean)) == 5  # no ties: the order is the rule's
        ranked += [c["text"] for _, c in sorted(zip(mean, candidates), key=lambda x: -x[0])[:2]]
        by_sum += [c["text"] for _, c in sorted(zip(sums, candidates), key=lambda x: -x[0])[:2]]
    assert ranked != by_sum  # candidates of different lengths (the stops): per token is not the same as in all
    best = complete(client, **body, n=2, best_of=5)
    assert [c["text"] for c in best["choices"]] == ranked and [c["index"] for c in best["choices"]] == [0, 1, 2, 3]
    assert all(c["logprobs"] is None for c in best["choices"])
    assert best["usage"]["completion_tokens"] == every["usage"]["completion_tokens"]  # all five candidates
    with_logprobs = complete(client, **body, n=2, best_of=5, logprobs=1)["choices"]
    assert [c["text"] for c in with_logprobs] == ranked and all(c["logprobs"] for c in with_logprobs)


# ------------------------------------------------------------------------------------------ the limits
BAD_REQUESTS = [  # (name, body as JSON or raw bytes, status, words in the message)
    ("unknown-field", {"prompt": "x", "best_off": 2}, 422, "unknown field 'best_off'"),
    ("unsupported-field", {"prompt": "x", "suffix": "y"}, 422, "suffix='y' is not supported"),
    ("best-of-below-n", {"prompt": "x", "n": 3, "best_of": 2}, 422, "best_of=2 is below n=3"),
    ("best-of-streamed", {"prompt": "x", "best_of": 2, "stream": True}, 422, "best_of above n cannot be streamed"),
    ("best-of-greedy", {"prompt": "x", "best_of": 2, "temperature": 0}, 422, "same greedy text 2 times"),
    ("best-of-over-cap", {"prompt": "x", "best_of": 99}, 422, "best_of=99 is above this server's cap"),
    ("logprobs-over-cap", {"prompt": "x", "logprobs": 6}, 422, "logprobs"),
    ("lone-surrogate-prompt", b'{"prompt": "a\\ud800b"}', 422, "lone surrogate (U+D800 at 1)"),
    ("lone-surrogate-in-a-list", b'{"prompt": ["ok", "\\udfff"]}', 422, "lone surrogate"),
    ("lone-surrogate-stop", b'{"prompt": "x", "stop": ["\\ud83d"]}', 422, "lone surrogate"),
    ("temperature-underflows", {"prompt": "x", "temperature": 1e-300}, 422, "temperature=1e-300 is invalid"),
    ("top-p-underflows", {"prompt": "x", "top_p": 1e-300}, 422, "top_p=1e-300 is invalid"),
    ("penalty-underflows", {"prompt": "x", "repetition_penalty": 1e-300}, 422, "repetition_penalty=1e-300"),
    ("presence-penalty-over-2", {"prompt": "x", "presence_penalty": 2.5}, 422, "presence_penalty=2.5 is invalid"),
    ("frequency-penalty-under-2", {"prompt": "x", "frequency_penalty": -3}, 422, "frequency_penalty=-3"),
    ("logit-bias-key-not-an-id", {"prompt": "x", "logit_bias": {"abc": 1}}, 422, "logit_bias has the key 'abc'"),
    ("logit-bias-over-100", {"prompt": "x", "logit_bias": {"5": 101}}, 422, "logit_bias[5]=101"),
    ("logit-bias-outside-vocab", {"prompt": "x", "logit_bias": {"100000": 1}}, 422, "token id 100000, outside"),
    ("min-tokens-negative", {"prompt": "x", "min_tokens": -1}, 422, "min_tokens"),
    ("too-many-bad-words", {"prompt": "x", "bad_words": ["a"] * 17}, 422, "17 bad words"),
    ("bad-word-too-long", {"prompt": "x", "bad_words": ["w" * 65]}, 422, "more than 64 characters"),
    ("empty-bad-word", {"prompt": "x", "bad_words": [""]}, 422, "bad_words=['']"),
    ("typical-p-zero", {"prompt": "x", "typical_p": 0}, 422, "typical_p=0"),
    ("too-many-choices", {"prompt": "x", "guided_choice": ["c"] * 65}, 422, "65 guided choices"),
    ("choice-too-long", {"prompt": "x", "guided_choice": ["c" * 65]}, 422, "guided choice of more than 64"),
    ("no-choices", {"prompt": "x", "guided_choice": []}, 422, "guided_choice=[] is invalid"),
    ("regex-lookbehind", {"prompt": "x", "guided_regex": "(?<=a)b"}, 422, "guided_regex='(?<=a)b' cannot be used"),
    ("regex-too-long", {"prompt": "x", "guided_regex": "a" * 1025}, 422, "at most 1024 (serve.max_regex_chars)"),
    ("negative-prompt-alone", {"prompt": "x", "negative_prompt": "y"}, 422, "negative_prompt is only read by"),
    ("negative-prompt-too-long", {"prompt": "x", "guidance_scale": 2, "negative_prompt": "y" * 64}, 422,
     "the negative_prompt is 65 tokens (with <START>); at most 64 (serve.max_prompt_tokens)"),
    ("guidance-scale-negative", {"prompt": "x", "guidance_scale": -2}, 422, "guidance_scale=-2.0 is invalid"),
    ("schema-recursive", {"prompt": "x", "guided_json": {"$defs": {"N": {"type": "object", "properties": {
        "next": {"anyOf": [{"$ref": "#/$defs/N"}, {"type": "null"}]}}}}, "$ref": "#/$defs/N"}}, 422,
     "a recursive schema is not a regular language"),
    ("format-without-schema", {"prompt": "x", "response_format": {"type": "json_schema"}}, 422,
     'response_format must be {"type": "text"}'),
    ("schema-not-json", {"prompt": "x", "guided_json": "{type"}, 422, "guided_json is not valid JSON"),
    ("schema-with-ref", {"prompt": "x", "guided_json": {"$ref": "#/x"}}, 422, "refers to #/x, which the schema"),
    ("schema-twice", {"prompt": "x", "guided_json": {"type": "integer"},
                      "response_format": {"type": "json_schema", "json_schema": {"schema": {"type": "integer"}}}},
     422, "guided_json and response_format both give a schema"),
    ("regex-and-choice", {"prompt": "x", "guided_regex": "a", "guided_choice": ["a"]}, 422, "give one"),
    ("token-id-outside-vocab", {"prompt": [3, 100_000]}, 422, "token id 100000 is outside"),
    ("token-ids-empty", {"prompt": [[1], []]}, 422, "token ids is empty"),
    ("token-id-negative", {"prompt": [[-1]]}, 422, "token id -1"),
    ("malformed-json", b'{"prompt": "x",', 422, "not valid JSON"),
    ("not-an-object", b'[1, 2]', 422, "body"),
    ("prompt-wrong-type", {"prompt": 3}, 422, "prompt"),
    ("max-tokens-over-cap", {"prompt": "x", "max_tokens": 100_001}, 422, "max_tokens=100001 is above"),
    ("max-tokens-zero", {"prompt": "x", "max_tokens": 0}, 422, "max_tokens"),
    ("prompt-too-long", {"prompt": "y" * BLOCK}, 422, f"at most {BLOCK}"),
    ("n-over-cap", {"prompt": "x", "n": 9}, 422, "n=9 is above"),
    ("too-many-prompts", {"prompt": ["x"] * 17}, 422, "17 prompts"),
    ("too-many-stops", {"prompt": "x", "stop": ["a", "b", "c", "d", "e"]}, 422, "5 stop sequences"),
    ("stop-too-long", {"prompt": "x", "stop": "s" * 65}, 422, "65 characters"),
    ("empty-stop", {"prompt": "x", "stop": [""]}, 422, "empty stop"),
    ("negative-temperature", {"prompt": "x", "temperature": -1}, 422, "temperature"),
    ("top-p-zero", {"prompt": "x", "top_p": 0}, 422, "top_p"),
    ("seed-not-int", {"prompt": "x", "seed": "1"}, 422, "seed"),
    ("stream-not-bool", {"prompt": "x", "stream": "yes"}, 422, "stream"),
    ("wrong-model", {"prompt": "x", "model": "gpt-4"}, 404, "'gpt-4' is not served"),
    ("body-too-large", {"prompt": "x" * 5000}, 413, "larger than 4096 bytes"),
]


@pytest.mark.parametrize("name,body,status,words", BAD_REQUESTS, ids=[b[0] for b in BAD_REQUESTS])
def test_each_bad_request_gets_its_status_and_a_message(client, name, body, status, words):
    before = client.get("/health").json()["generated_tokens"]
    if isinstance(body, bytes):
        r = client.post("/v1/completions", content=body, headers={"Content-Type": "application/json"})
    else:
        r = client.post("/v1/completions", json=body)
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert words in error["message"] and "\n" not in error["message"]
    assert client.get("/health").json()["generated_tokens"] == before  # refused before any model work


def test_a_schema_is_held_to_max_schema_chars_and_a_regex_to_max_regex_chars(run_dir):
    """A Pydantic schema's titles and descriptions make it long: schemas have their own cap, larger than a regex's."""
    with running(load_app(str(run_dir), ServeConfig(max_schema_chars=200, max_regex_chars=20), device="cpu")) as url, \
            httpx.Client(base_url=url, timeout=30) as c:
        def post(**fields) -> httpx.Response:
            return c.post("/v1/completions", json={"prompt": "x", "max_tokens": 2, **fields})

        def schema(chars: int) -> dict:
            return {"enum": ["a", "b"], "description": "d" * (chars - len(json.dumps({"enum": ["a", "b"],
                                                                                        "description": ""})))}

        assert len(json.dumps(schema(200))) == 200 and post(guided_json=schema(200)).status_code == 200
        too_long = post(guided_json=schema(201))
        assert too_long.status_code == 422 and "a guided_json of 201 characters; at most 200 (serve.max_schema_chars)" \
            in too_long.json()["error"]["message"]
        fmt = post(response_format={"type": "json_schema", "json_schema": {"name": "x", "schema": schema(201)}})
        assert fmt.status_code == 422 and "serve.max_schema_chars" in fmt.json()["error"]["message"]
        assert post(guided_regex="a" * 20).status_code == 200 and post(guided_regex="a" * 21).status_code == 422


def test_a_large_body_without_content_length_is_refused_too(client):
    def chunks():
        for _ in range(10):
            yield b" " * 1000

    r = client.post("/v1/completions", content=chunks(), headers={"Content-Type": "application/json"})
    assert r.status_code == 413 and "4096" in r.json()["error"]["message"]


def test_api_key_guards_every_endpoint_but_health(run_dir):
    """Every route the app has (new ones too) answers 401 without the key, but /health and the playground page,
    which is static and asks for the key itself."""
    app = load_app(str(run_dir), ServeConfig(api_key="s3cret"), device="cpu")
    routes = [(method, route.path) for route in app.routes for method in getattr(route, "methods", ())
              if method in ("GET", "POST", "DELETE") and route.path not in ("/health", "/")]
    assert {("POST", "/v1/completions"), ("POST", "/v1/embeddings"), ("GET", "/v1/models")} <= set(routes)
    with running(app) as url, httpx.Client(base_url=url) as c:
        assert c.get("/health").status_code == 200 and c.get("/").status_code == 200
        for method, path in routes:
            for headers in [{}, {"Authorization": "Bearer wrong"}, {"Authorization": "s3cret"}]:
                r = c.request(method, path, json={"prompt": "x", "max_tokens": 2}, headers=headers)
                assert r.status_code == 401 and r.headers["WWW-Authenticate"] == "Bearer"
                assert "API key" in r.json()["error"]["message"]
        auth = {"Authorization": "Bearer s3cret"}
        assert c.get("/v1/models", headers=auth).status_code == 200
        assert c.post("/v1/completions", json={"prompt": "x", "max_tokens": 2}, headers=auth).status_code == 200


def test_a_full_server_answers_429_with_retry_after_and_recovers(run_dir):
    app = load_app(str(run_dir), ServeConfig(max_concurrency=1, max_queue=1, max_prompts=2, max_tokens=100_000,
                                             max_slots_per_client=2), device="cpu")
    long = {"prompt": "x", "max_tokens": 100_000, "stream": True}
    with running(app) as url, httpx.Client(base_url=url, timeout=30) as c:
        with c.stream("POST", "/v1/completions", json=long) as running_one:
            lines = running_one.iter_lines()  # (kept: a dropped line iterator closes the connection)
            next(lines)  # it is generating
            with c.stream("POST", "/v1/completions", json=long) as waiting_one:
                assert waiting_one.status_code == 200
                wait_until(lambda: c.get("/health").json()["waiting"] == 1)
                r = c.post("/v1/completions", json={"prompt": "x", "max_tokens": 2})
                assert r.status_code == 429 and int(r.headers["Retry-After"]) >= 1
                assert "capacity" in r.json()["error"]["message"]
        wait_until(lambda: c.get("/health").json()["running"] == 0)
        assert c.post("/v1/completions", json={"prompt": "x", "max_tokens": 2}).status_code == 200


def test_a_request_past_its_timeout_gets_504(run_dir):
    app = load_app(str(run_dir), ServeConfig(timeout=0.5, max_tokens=1_000_000), device="cpu")
    with running(app) as url, httpx.Client(base_url=url, timeout=30) as c:
        start = time.monotonic()
        r = c.post("/v1/completions", json={"prompt": "x", "max_tokens": 1_000_000})
        assert r.status_code == 504 and "timed out" in r.json()["error"]["message"]
        assert time.monotonic() - start < 5
        with c.stream("POST", "/v1/completions", json={"prompt": "x", "max_tokens": 1_000_000, "stream": True}) as s:
            events = sse_events(s)
        assert events[-1] == "[DONE]" and events[-2]["error"]["code"] == 504
        wait_until(lambda: c.get("/health").json()["running"] == 0)


@pytest.mark.parametrize("stream", [True, False], ids=["stream", "no-stream"])
def test_a_client_that_disconnects_stops_its_generation(server, stream):
    url, app = server
    engine = app.state.engine
    body = {"prompt": "x", "max_tokens": 100_000, "stream": stream}
    before = engine.stats()["generated_tokens"]
    if stream:
        with httpx.Client(base_url=url, timeout=30) as c, c.stream("POST", "/v1/completions", json=body) as r:
            lines = r.iter_lines()
            for _ in range(6):  # three pieces arrived: it is generating
                next(lines)
    else:
        with httpx.Client(base_url=url, timeout=0.5) as c, pytest.raises(httpx.ReadTimeout):
            c.post("/v1/completions", json=body)
    wait_until(lambda: engine.stats()["running"] == 0)
    stopped_at = engine.stats()["generated_tokens"]
    time.sleep(0.3)  # (a pause to see that nothing more is generated)
    assert engine.stats()["generated_tokens"] == stopped_at
    assert 0 < stopped_at - before < 100_000


def test_the_event_loop_answers_while_the_model_works(client):
    with client.stream("POST", "/v1/completions", json={"prompt": "x", "max_tokens": 100_000, "stream": True}) as r:
        lines = r.iter_lines()
        next(lines)
        for _ in range(5):
            start = time.monotonic()
            assert client.get("/health").json()["running"] == 1
            assert time.monotonic() - start < 2  # (blocked, it would wait for 100000 tokens)


def test_playground_page_is_served(client):
    r = client.get("/")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
    assert "/v1/completions" in r.text and 'id="prompt"' in r.text and "<code id=\"model\">run</code>" in r.text


# ------------------------------------------------------------------------------------- the engine alone
def test_requests_with_any_options_share_one_decode(run_dir):
    """Requests waiting together decode as one batch whatever their options (greedy or sampled, top-k,
    budgets, stop strings, n), and each gets the text it would get alone: greedy and seeded ones exactly,
    unseeded samples all different."""
    generator = load(str(run_dir), device="cpu")
    engine = Engine(generator, max_concurrency=16, max_queue=16, max_batch_size=32)

    async def scenario():
        loop = asyncio.get_running_loop()

        def job(prompt, stream=False, **options):
            ids = [generator.tokenizer.start_id] + generator.tokenizer.encode(prompt)
            return Job(ids, GenerateConfig(**{"max_new_tokens": 8, **options}), stream, time.monotonic() + 30,
                       Mailbox(loop))

        jobs = {"greedy": [job(p, temperature=0.0) for p in ("same", "other prompt", "x")],
                "sampled": [job(p, num_return_sequences=2) for p in ("a", "bb", "ccc")],
                "duplicates": [job("dup"), job("dup")],
                "seeded": [job(p, seed=5 + i) for i, p in enumerate(("s1", "s22"))],
                "stream": [job("st", stream=True, temperature=0.0)],
                "mixed": [job("m1", seed=3, top_k=5, max_new_tokens=12), job("m2", seed=4, temperature=0.7, max_new_tokens=3),
                          job("m1", seed=3, top_k=5, max_new_tokens=12, stop_strings=[stop]),
                          job("m1", stream=True, seed=3, top_k=5, max_new_tokens=12, stop_strings=[stop])]}
        for group in jobs.values():
            engine.submit(group)
        with pytest.raises(Busy):
            engine.submit([job("z") for _ in range(32 - 15 + 1)])
        engine.start()
        await until_done([j for group in jobs.values() for j in group])
        return jobs

    alone = generator.generate("m1", max_new_tokens=12, seed=3, top_k=5)
    stop = alone[4:6]
    try:
        jobs = asyncio.run(scenario())
    finally:
        engine.close()
    assert engine.decodes == 1  # all of them: greedy and sampled, seeded or not, any n, budget or stop
    text = {name: [c.text for j in group for c in j.choices] for name, group in jobs.items()}
    assert text["greedy"] == [generator.generate(p, max_new_tokens=8, temperature=0.0)
                              for p in ("same", "other prompt", "x")]
    assert text["seeded"] == [generator.generate(p, max_new_tokens=8, seed=5 + i) for i, p in enumerate(("s1", "s22"))]
    assert len(set(text["sampled"])) == 6 and len(set(text["duplicates"])) == 2
    assert text["stream"] == [generator.generate("st", max_new_tokens=8, temperature=0.0)]
    assert text["mixed"] == [alone, generator.generate("m2", max_new_tokens=3, seed=4, temperature=0.7),
                             alone[:alone.find(stop)], alone[:alone.find(stop)]]
    assert [c.finish for j in jobs["mixed"] for c in j.choices] == ["length", "length", "stop", "stop"]


def test_requests_arriving_while_the_decodes_are_busy_gather_into_one_batch(run_dir):
    generator = load(str(run_dir), device="cpu")
    engine = Engine(generator, max_decodes=1, batch_wait=30.0)

    async def scenario():
        loop = asyncio.get_running_loop()

        def job(prompt, tokens):
            ids = [generator.tokenizer.start_id] + generator.tokenizer.encode(prompt)
            return Job(ids, GenerateConfig(max_new_tokens=tokens), False, time.monotonic() + 60, Mailbox(loop))

        first = job("first", 1000)
        engine.submit([first])
        engine.start()
        while engine.stats()["generated_tokens"] == 0:
            await asyncio.sleep(0.01)
        later = [job(p, 5) for p in ("a", "bb", "ccc")]
        for j in later:  # one by one, as separate requests
            engine.submit([j])
            await asyncio.sleep(0.01)
        assert engine.stats()["waiting"] == 3  # the one decode is busy: they wait for it
        await until_done([first] + later, 60)
        return first, later

    try:
        first, later = asyncio.run(scenario())
    finally:
        engine.close()
    assert engine.decodes == 2 and first.choices[0].tokens == 1000 and all(j.choices[0].tokens == 5 for j in later)


def test_bad_serve_configs_are_one_line_errors(run_dir):
    for kwargs, words in [({"max_n": 0}, "serve.max_n"), ({"timeout": 0}, "serve.timeout"),
                          ({"max_prompts": 100}, "serve.max_prompts"), ({"batch_wait": -1}, "serve.batch_wait"),
                          ({"max_queue": -1}, "serve.max_queue"), ({"api_key": " "}, "api_key")]:
        with pytest.raises(ConfigError, match=words):
            ServeConfig(**kwargs)
    generator = TextGenerator(*load_parts(run_dir))
    with pytest.raises(ConfigError, match="block_size"):
        create_app(generator, ServeConfig(max_prompt_tokens=BLOCK + 1))


def load_parts(run_dir: Path):
    g = load(str(run_dir), device="cpu")
    return g.model, g.tokenizer


def test_a_stream_nobody_reads_pauses_its_decode(run_dir):
    """Memory stays bounded when a client reads slower than the model writes: its decode waits for it."""
    from lmforge.serve.engine import MAX_BACKLOG

    generator = load(str(run_dir), device="cpu")
    engine = Engine(generator)

    async def scenario():
        ids = [generator.tokenizer.start_id]
        job = Job(ids, GenerateConfig(max_new_tokens=100_000), True, time.monotonic() + 30,
                  Mailbox(asyncio.get_running_loop()))
        engine.submit([job])
        engine.start()
        give_up = time.monotonic() + 30
        while job.mailbox.backlog <= MAX_BACKLOG:  # nobody reads: the events pile up to the limit
            assert time.monotonic() < give_up
            await asyncio.sleep(0.02)
        await asyncio.sleep(0.1)
        paused_at = engine.stats()["generated_tokens"]
        assert job.mailbox.backlog <= MAX_BACKLOG + 2
        assert paused_at <= 4 * (MAX_BACKLOG + 2)  # a piece per 1 to 4 byte tokens (UTF-8)
        await asyncio.sleep(0.2)
        assert engine.stats()["generated_tokens"] == paused_at
        for _ in range(MAX_BACKLOG):
            await job.mailbox.get(5)
        await asyncio.sleep(0.2)
        assert engine.stats()["generated_tokens"] > paused_at  # reading lets it go on
        job.cancel()

    try:
        asyncio.run(scenario())
    finally:
        engine.close()


def test_a_mixed_load_gets_only_200_413_422_429_and_the_server_stays_up(run_dir):
    """A small version of benchmarks/serve_load.py: 120 requests from 12 clients against 2 + 2 places."""
    app = load_app(str(run_dir), ServeConfig(max_concurrency=2, max_queue=2, max_prompts=4, max_body_bytes=2048,
                                             max_tokens=64), device="cpu")
    bodies = [lambda i: {"json": {"prompt": "a" * (i % 40), "max_tokens": 8 + i % 24, "n": 1 + i % 2, "seed": i}},
              lambda i: {"json": {"prompt": ["x", "yy"], "max_tokens": 16, "stream": True}},
              lambda i: {"json": {"prompt": "z" * 3000}},
              lambda i: {"json": {"prompt": "x", "max_tokens": 65}},
              lambda i: {"content": b"{not json", "headers": {"Content-Type": "application/json"}}]

    async def load(url):
        limit = asyncio.Semaphore(12)
        async with httpx.AsyncClient(base_url=url, timeout=60) as c:
            async def one(i):
                async with limit:
                    r = await c.post("/v1/completions", **bodies[i % len(bodies)](i))
                    return r.status_code, r.headers.get("Retry-After")
            return await asyncio.gather(*(one(i) for i in range(120)))

    with running(app) as url:
        answers = asyncio.run(load(url))
        statuses = {s for s, _ in answers}
        assert statuses <= {200, 413, 422, 429} and {200, 413, 422, 429} <= statuses, statuses
        assert all(retry == "1" for s, retry in answers if s == 429)
        with httpx.Client(base_url=url) as c:
            wait_until(lambda: c.get("/health").json()["running"] == 0)
            assert c.post("/v1/completions", json={"prompt": "x", "max_tokens": 4}).status_code == 200


# --------------------------------------------------------------------------------------------- chat
CHAT = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello"}]


def test_chat_completion_is_the_rendered_conversation_continued_by_the_one_decoder(client, run_dir):
    out = client.post("/v1/chat/completions", json={"messages": CHAT, "max_tokens": 15, "seed": 3, "n": 2})
    assert out.status_code == 200, out.text
    body = out.json()
    assert body["object"] == "chat.completion" and body["id"].startswith("chatcmpl-")
    gen = load(str(run_dir), device="cpu")
    text = gen.render_chat(CHAT)
    assert text == "<|system|>\nBe brief.\n<|user|>\nHello\n<|assistant|>\n"  # lmforge's default chat template
    expected = gen.generate(text, max_new_tokens=15, seed=3, num_return_sequences=2, stop_strings=[gen.chat_stop()])
    assert [c["message"] for c in body["choices"]] == [{"role": "assistant", "content": t} for t in expected]
    assert body["usage"]["prompt_tokens"] == len(text.encode()) + 1

    events = sse_events(client.post("/v1/chat/completions", json={"messages": CHAT, "max_tokens": 15, "seed": 3,
                                                                  "stream": True}))
    assert events[-1] == "[DONE]" and all(e["object"] == "chat.completion.chunk" for e in events[:-1])
    assert events[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert "".join(e["choices"][0]["delta"].get("content", "") for e in events[:-1]) == expected[0]
    assert events[-2]["choices"][0]["finish_reason"] in ("stop", "length")


def test_chat_logprobs_are_the_models_log_probabilities_of_the_reply_streamed_or_not(client, run_dir):
    from lmforge.generate import prompt_ids, score_prompt

    body = {"messages": CHAT, "max_tokens": 12, "temperature": 0, "logprobs": True, "top_logprobs": 3}
    out = client.post("/v1/chat/completions", json=body)
    assert out.status_code == 200, out.text
    choice = out.json()["choices"][0]
    entries = choice["logprobs"]["content"]
    gen = load(str(run_dir), device="cpu")
    prompt = prompt_ids(gen.tokenizer, gen.render_chat(CHAT))
    reply = gen.complete([gen.render_chat(CHAT)], max_new_tokens=12, greedy=True, stop_strings=[gen.chat_stop()])[0][0]
    want = score_prompt(gen.model, prompt + reply.token_ids, 3)[len(prompt):]  # the reply given what came before
    assert len(entries) == len(reply.token_ids) > 0
    for entry, lp in zip(entries, want):
        assert entry["token"] == gen.tokenizer.token_text(lp.token) and entry["bytes"] == list(
            gen.tokenizer.id_to_bytes(lp.token))
        assert entry["logprob"] == pytest.approx(lp.logprob, abs=1e-4)
        assert [t["token"] for t in entry["top_logprobs"]] == [gen.tokenizer.token_text(t) for t, _ in lp.top]
        assert [t["logprob"] for t in entry["top_logprobs"]] == pytest.approx([v for _, v in lp.top], abs=1e-4)
    assert bytes(b for e in entries for b in e["bytes"]).decode("utf-8", "replace") == choice["message"]["content"]
    with client.stream("POST", "/v1/chat/completions", json={**body, "stream": True}) as r:
        events = sse_events(r)
    streamed = [e for ev in events[:-1] for e in ((ev["choices"][0]["logprobs"] or {}).get("content") or [])]
    assert streamed == entries
    no_top = client.post("/v1/chat/completions", json={**body, "top_logprobs": None}).json()["choices"][0]
    assert [e["logprob"] for e in no_top["logprobs"]["content"]] == [e["logprob"] for e in entries]
    assert all(e["top_logprobs"] == [] for e in no_top["logprobs"]["content"])
    assert client.post("/v1/chat/completions", json={"messages": CHAT, "max_tokens": 4}).json()["choices"][0][
        "logprobs"] is None


@pytest.mark.parametrize("body,words", [
    ({"messages": []}, "messages"),
    ({"messages": [{"role": "robot", "content": "x"}]}, "role"),
    ({"messages": [{"role": "user", "content": "x", "mood": 1}]}, "a message takes role, content and name"),
    ({"messages": CHAT, "functions": []}, "/v1/chat/completions takes"),
    ({"messages": CHAT, "top_logprobs": 2}, "top_logprobs needs logprobs: true"),
    ({"messages": CHAT, "logprobs": True, "top_logprobs": 21}, "top_logprobs"),
    ({"messages": CHAT, "max_tokens": 5, "max_completion_tokens": 6}, "differ"),
])
def test_each_bad_chat_request_gets_422_and_a_message(client, body, words):
    r = client.post("/v1/chat/completions", json=body)
    assert r.status_code == 422 and words in r.json()["error"]["message"], r.text


@pytest.mark.slow
def test_an_int8_compiled_server_decodes_through_its_compiled_step_and_answers_as_the_eager_int8_model(run_dir):
    """lmforge serve --quantize int8 --compile: the engine decodes through the compiled step (compiled on the first
    request; tests/test_generate.py checks batched libraries), and its greedy answer is the int8 model's eager one."""
    from lmforge.generate import CompiledGPT, Int8Linear

    app = load_app(str(run_dir), ServeConfig(), device="cpu", quantize="int8", compile=True)
    engine = app.state.engine
    assert isinstance(engine.model, CompiledGPT) and not engine.model.libraries
    assert any(isinstance(layer, Int8Linear) for layer in engine.model.model.modules())
    with running(app) as url, httpx.Client(base_url=url, timeout=120) as client:
        text = complete(client, prompt="Hello", max_tokens=20, temperature=0)["choices"][0]["text"]
    assert set(engine.model.libraries) == {True}  # the batch-1 step ran compiled
    assert text == load(str(run_dir), device="cpu", quantize="int8").generate("Hello", max_new_tokens=20, greedy=True)


def test_tokenize_gives_the_ids_the_model_reads_and_detokenize_the_text(client, run_dir):
    gen = load(str(run_dir), device="cpu")
    out = client.post("/tokenize", json={"prompt": "héllo"}).json()
    assert out["tokens"] == [gen.tokenizer.start_id] + gen.tokenizer.encode("héllo") and out["count"] == 7
    assert out["max_model_len"] == gen.model.config.block_size and out["token_strs"][0] == "<START>"
    completion = complete(client, prompt="héllo", max_tokens=2)
    assert completion["usage"]["prompt_tokens"] == out["count"]  # what /v1/completions counts
    bare = client.post("/tokenize", json={"prompt": "héllo", "add_special_tokens": False}).json()
    assert bare["tokens"] == out["tokens"][1:]
    chat = client.post("/tokenize", json={"messages": CHAT}).json()
    answer = client.post("/v1/chat/completions", json={"messages": CHAT, "max_tokens": 2}).json()
    assert chat["count"] == answer["usage"]["prompt_tokens"]
    assert client.post("/detokenize", json={"tokens": out["tokens"]}).json() == {"prompt": "héllo"}
    for path, body, words in [("/tokenize", {}, "give a prompt or messages"),
                              ("/tokenize", {"prompt": "x", "messages": CHAT}, "give a prompt or messages"),
                              ("/tokenize", {"prompt": "x", "model": "gpt-4"}, "'gpt-4' is not served"),
                              ("/detokenize", {"tokens": [5, 100_000]}, "token id 100000 is outside"),
                              ("/detokenize", {"tokens": "5"}, "tokens")]:
        r = client.post(path, json=body)
        assert r.status_code in (404, 422) and words in r.json()["error"]["message"], (path, body, r.text)


def test_a_regex_whose_automaton_explodes_gets_422_in_time_and_the_server_keeps_answering(run_dir):
    """"(a|b)*a(a|b){16}" needs 131,073 automaton states and minutes to build: the child process building it is
    stopped at serve.regex_timeout, the request gets one line, and other requests are served meanwhile."""
    app = load_app(str(run_dir), ServeConfig(regex_timeout=2.0), device="cpu")
    with running(app) as url, httpx.Client(base_url=url, timeout=30) as c:
        started = time.monotonic()
        r = c.post("/v1/completions", json={"prompt": "x", "guided_regex": "(a|b)*a(a|b){16}"})
        assert r.status_code == 422 and "took over 2 s to build" in r.json()["error"]["message"], r.text
        assert time.monotonic() - started < 10
        ok = c.post("/v1/completions", json={"prompt": "x", "max_tokens": 12, "guided_regex": "(a|b){2}a(a|b){3}"})
        assert ok.status_code == 200 and re.fullmatch("(a|b){2}a(a|b){3}", ok.json()["choices"][0]["text"]), ok.text
        schema = {"type": "array", "items": {"enum": ["x", "y"]}, "maxItems": 2}
        as_json = c.post("/v1/completions", json={"prompt": "x", "max_tokens": 20, "guided_json": schema})
        assert as_json.status_code == 200 and json.loads(as_json.json()["choices"][0]["text"]) in (
            [], ["x"], ["y"], ["x", "x"], ["x", "y"], ["y", "x"], ["y", "y"])


WEATHER = {"type": "function", "function": {"name": "get_weather", "description": "The weather in a city.",
                                            "parameters": {"type": "object", "properties": {
                                                "city": {"type": "string", "maxLength": 8},
                                                "unit": {"enum": ["C", "F"]}}, "required": ["city", "unit"]}}}
TIME = {"type": "function", "function": {"name": "get_time", "parameters": {
    "type": "object", "properties": {"zone": {"enum": ["UTC", "CET"]}}}}}


def test_tool_choice_auto_replies_with_a_call_or_with_text_as_the_first_character_decides(client, run_dir):
    """tool_choice "auto" (the default with tools): a reply that begins with "{" is one call of a tool, following its
    parameters; any other reply is text. Pushing "{" up or down with logit_bias gives every reply one way. (One call:
    with parallel calls a random model pushed to "{" writes call after call.)"""
    gen = load(str(run_dir), device="cpu")
    brace = str(gen.tokenizer.encode("{")[0])
    body = {"messages": CHAT, "max_tokens": 120, "seed": 5, "n": 4, "temperature": 1.0, "tools": [WEATHER, TIME],
            "parallel_tool_calls": False}
    calls = client.post("/v1/chat/completions", json={**body, "logit_bias": {brace: 100}}).json()["choices"]
    for choice in calls:
        assert choice["finish_reason"] == "tool_calls" and choice["message"]["content"] is None
        (call,) = choice["message"]["tool_calls"]
        args = json.loads(call["function"]["arguments"])
        if call["function"]["name"] == "get_weather":
            assert set(args) == {"city", "unit"} and len(args["city"]) <= 8 and args["unit"] in ("C", "F")
        else:
            assert call["function"]["name"] == "get_time" and args in ({}, {"zone": "UTC"}, {"zone": "CET"})
    texts = client.post("/v1/chat/completions", json={**body, "tool_choice": "auto",
                                                      "logit_bias": {brace: -100}}).json()["choices"]
    assert all(c["message"].get("tool_calls") is None and c["finish_reason"] in ("stop", "length") for c in texts)
    assert all(not c["message"]["content"].startswith("{") for c in texts)
    assert any(len(c["message"]["content"]) >= 20 for c in texts)  # free text, not held to a call
    free = client.post("/v1/chat/completions", json={**body, "tool_choice": "none", "logit_bias": {brace: 100}})
    assert all(c["message"]["content"].startswith("{") for c in free.json()["choices"])  # "none": text, even "{"


def scripted_run(root: Path, script: str, start: int, block_size: int = 128) -> Path:
    """A run whose model writes `script` from position `start` on (the token after position start + i is
    script's i-th), whatever it reads: every block adds nothing, position p is a one-hot, lm_head reads it."""
    tok = byte_tokenizer()
    tok.save(root / "tokenizer.json")
    model = GPT(ModelConfig(vocab_size=tok.vocab_size, block_size=block_size, n_layer=1, n_head=2,
                            n_embd=block_size, tie_embeddings=False)).eval()
    with torch.no_grad():
        for weight in model.parameters():
            weight.zero_()
        model.norm_f.weight.fill_(1.0)
        model.pos_emb.weight.copy_(10 * torch.eye(block_size))
        for i, token in enumerate(tok.encode(script)):
            model.lm_head.weight[token, start + i] = 20.0  # its logit ~160, every other ~0
    save_checkpoint(root / "run", 1, model, None, RunConfig(model=model.config), {},
                    tokenizer_file=root / "tokenizer.json")
    return root / "run"


@pytest.mark.parametrize("script, reply", [
    ("Hi there.\n<|user|>\nAnd then", {"content": "Hi there.\n", "finish_reason": "stop"}),  # text, to the turn
    ('{"name": "get_time", "arguments": {"zone": "CET"}} and more', {"call": ("get_time", {"zone": "CET"})}),
])
def test_tool_choice_auto_takes_what_the_model_writes_a_call_or_text_ending_at_the_next_turn(tmp_path, script,
                                                                                               reply):
    """A model that writes a given text (scripted_run) with tool_choice "auto": a reply beginning with "{" is a
    call, read back whole; other text ends where the model starts the user's next turn."""
    run = scripted_run(tmp_path, script, start=50)  # the rendered CHAT is 50 characters, <START> first
    with running(load_app(str(run), ServeConfig(), device="cpu")) as url, httpx.Client(base_url=url, timeout=30) as c:
        assert c.post("/tokenize", json={"messages": CHAT}).json()["count"] == 51
        out = c.post("/v1/chat/completions", json={"messages": CHAT, "max_tokens": 70, "temperature": 0,
                                                     "tools": [WEATHER, TIME]})
        assert out.status_code == 200, out.text
        choice = out.json()["choices"][0]
        streamed = streamed_choices(c, {"messages": CHAT, "max_tokens": 70, "temperature": 0,
                                        "tools": [WEATHER, TIME]})[0]  # the same reply, in deltas
        if "call" in reply:
            (call,) = choice["message"]["tool_calls"]
            assert choice["finish_reason"] == "tool_calls" and choice["message"]["content"] is None
            assert (call["function"]["name"], json.loads(call["function"]["arguments"])) == reply["call"]
            (piece,) = streamed["tool_calls"].values()
            assert streamed["content"] == "" and streamed["finish_reason"] == "tool_calls"
            assert piece["id"].startswith("call_") and piece["name"] == call["function"]["name"]
            assert piece["arguments"] == call["function"]["arguments"]
        else:
            assert choice["message"] == {"role": "assistant", "content": reply["content"]}
            assert choice["finish_reason"] == reply["finish_reason"]
            assert streamed == {"content": reply["content"], "tool_calls": {}, "finish_reason": "stop"}


TWO_CALLS = ('{"name": "get_time", "arguments": {"zone": "CET"}}\n'
             '{"name": "get_weather", "arguments": {"city": "Rome", "unit": "C"}}')


@pytest.mark.parametrize("choice", ["required", "auto"])
def test_parallel_tool_calls_are_one_per_line_whole_and_streamed_and_render_back_as_written(tmp_path, choice):
    """parallel_tool_calls (true by default, as OpenAI has it): a model that writes two calls, one per line, gets
    two tool calls (index 0 and 1, each with its id), whole and in deltas; with parallel_tool_calls false the reply
    stops after the first; cut by max_tokens inside the second, the first stays whole. The conversation with both
    calls renders them as the model wrote them."""
    run = scripted_run(tmp_path, TWO_CALLS, start=50, block_size=192)
    calls = [("get_time", {"zone": "CET"}), ("get_weather", {"city": "Rome", "unit": "C"})]
    both = []
    with running(load_app(str(run), ServeConfig(), device="cpu")) as url, httpx.Client(base_url=url, timeout=30) as c:
        body = {"messages": CHAT, "max_tokens": 150, "temperature": 0, "tools": [WEATHER, TIME], "tool_choice": choice}
        for extra, want, finish in [({}, calls, "tool_calls"),
                                    ({"parallel_tool_calls": False}, calls[:1], "tool_calls"),
                                    ({"max_tokens": len(TWO_CALLS) - 5}, None, "length")]:
            whole = c.post("/v1/chat/completions", json={**body, **extra}).json()["choices"][0]
            streamed = streamed_choices(c, {**body, **extra})[0]
            assert whole["finish_reason"] == streamed["finish_reason"] == finish and whole["message"]["content"] is None
            got = whole["message"]["tool_calls"]
            assert [p["name"] for p in streamed["tool_calls"].values()] == [g["function"]["name"] for g in got]
            arguments = [g["function"]["arguments"] for g in got]
            assert [p["arguments"] for p in streamed["tool_calls"].values()] == arguments
            assert sorted(streamed["tool_calls"]) == list(range(len(got))) and streamed["content"] == ""
            assert len({g["id"] for g in got}) == len(got) and all(g["id"].startswith("call_") for g in got)
            if want is not None:
                assert [(g["function"]["name"], json.loads(g["function"]["arguments"])) for g in got] == want
                both = both or got
            else:  # cut inside the second call's arguments: the first whole, the second's arguments so far
                assert json.loads(got[0]["function"]["arguments"]) == calls[0][1] and len(got) == 2
                assert got[1]["function"]["arguments"] == TWO_CALLS[TWO_CALLS.index("{", TWO_CALLS.index("\n") + 2):-5]
        history = CHAT + [{"role": "assistant", "content": None, "tool_calls": both}]
        rendered = c.post("/tokenize", json={"messages": history}).json()
        text = c.post("/detokenize", json={"tokens": rendered["tokens"]}).json()["prompt"]
        assert text.endswith(f"<|user|>\nHello\n<|assistant|>\n{TWO_CALLS}\n<|assistant|>\n")  # the next reply's header


def test_a_tool_call_cut_by_max_tokens_is_the_same_whole_and_streamed(tmp_path):
    """A call cut by max_tokens ends "length": past its name, a tool call with the arguments so far; before, the
    text as content. Streamed deltas add up to the whole reply."""
    script = '{"name": "get_time", "arguments": {"zone": "CET"}}'
    run = scripted_run(tmp_path, script, start=50)
    with running(load_app(str(run), ServeConfig(), device="cpu")) as url, httpx.Client(base_url=url, timeout=30) as c:
        head = script.index("{", 1)  # where the arguments begin
        for max_tokens, want in [(40, {"tool_calls": ("get_time", script[head:40])}), (10, {"content": script[:10]})]:
            body = {"messages": CHAT, "max_tokens": max_tokens, "temperature": 0, "tools": [WEATHER, TIME],
                    "tool_choice": "required"}
            whole = c.post("/v1/chat/completions", json=body).json()["choices"][0]
            streamed = streamed_choices(c, body)[0]
            assert whole["finish_reason"] == streamed["finish_reason"] == "length"
            if "content" in want:
                assert whole["message"]["content"] == streamed["content"] == want["content"]
                assert not whole["message"].get("tool_calls") and not streamed["tool_calls"]
            else:
                (call,) = whole["message"]["tool_calls"]
                (piece,) = streamed["tool_calls"].values()
                assert (call["function"]["name"], call["function"]["arguments"]) == want["tool_calls"]
                assert (piece["name"], piece["arguments"]) == want["tool_calls"] and streamed["content"] == ""


def test_tool_calls_follow_the_functions_schema_and_the_conversation_goes_on_with_their_results(client, run_dir):
    """OpenAI's tools with a named tool_choice or "required": the reply is one call whose arguments follow the
    function's parameters (decoding guided by them, as with guided_json); a conversation holding the call and the
    tool's result renders through the chat template."""
    body = {"messages": CHAT, "max_tokens": 120, "seed": 1, "tools": [WEATHER, TIME], "parallel_tool_calls": False,
            "tool_choice": {"type": "function", "function": {"name": "get_weather"}}}  # (random weights: one call)
    out = client.post("/v1/chat/completions", json=body)
    assert out.status_code == 200, out.text
    choice = out.json()["choices"][0]
    assert choice["finish_reason"] == "tool_calls" and choice["message"]["content"] is None
    call = choice["message"]["tool_calls"][0]
    args = json.loads(call["function"]["arguments"])
    assert call["type"] == "function" and call["function"]["name"] == "get_weather" and call["id"].startswith("call_")
    assert list(args) == ["city", "unit"] and len(args["city"]) <= 8 and args["unit"] in ("C", "F")
    gen = load(str(run_dir), device="cpu")  # the same text as the Python API guided by that call's schema
    schema = {"type": "object", "properties": {"name": {"const": "get_weather"},
                                               "arguments": WEATHER["function"]["parameters"]},
              "required": ["name", "arguments"]}
    assert json.loads(gen.generate(gen.render_chat(CHAT), max_new_tokens=120, seed=1, guided_json=schema)) == {
        "name": "get_weather", "arguments": args}
    streamed = streamed_choices(client, body)[0]  # the same call in deltas: its name, then its arguments piece by piece
    assert streamed["finish_reason"] == "tool_calls" and streamed["content"] == ""
    assert [(c["name"], json.loads(c["arguments"])) for c in streamed["tool_calls"].values()] == [("get_weather", args)]
    required = client.post("/v1/chat/completions", json={**body, "tool_choice": "required", "n": 3}).json()
    names = {c["message"]["tool_calls"][0]["function"]["name"] for c in required["choices"]}
    assert names <= {"get_weather", "get_time"}
    history = CHAT + [{"role": "assistant", "content": None, "tool_calls": [call]},
                      {"role": "tool", "tool_call_id": call["id"], "content": "22 degrees"}]
    rendered = client.post("/tokenize", json={"messages": history}).json()
    text = client.post("/detokenize", json={"tokens": rendered["tokens"]}).json()["prompt"]
    assert text.endswith(f'<|assistant|>\n{{"name": "get_weather", "arguments": {json.dumps(args)}}}\n'
                         "<|tool|>\n22 degrees\n<|assistant|>\n")
    longer = client.post("/v1/chat/completions", json={"messages": history, "max_tokens": 8})  # (block_size 64)
    assert longer.status_code == 422 and f"the prompt is {rendered['count']} tokens" in longer.json()["error"][
        "message"]
    for extra, words in [({"tool_choice": {"type": "function", "function": {"name": "nope"}}}, "'nope'"),
                         ({"tool_choice": {"type": "function"}}, 'tool_choice is "none", "auto", "required" or'),
                         ({"tool_choice": "auto", "guided_regex": "a+"}, "tools and guided_json / guided_regex"),
                         ({"response_format": {"type": "json_schema", "json_schema": {"schema": {"type": "integer"}}}},
                          "tools and guided_json / guided_regex / response_format"),
                         ({"tools": None}, "tool_choice needs tools"),
                         ({"tools": [{"type": "function", "function": {"name": "x", "parameters": {"$ref": "#"}}}],
                           "tool_choice": "required"}, "refers to # inside itself")]:
        r = client.post("/v1/chat/completions", json={**body, **extra})
        assert r.status_code == 422 and words in r.json()["error"]["message"], (extra, r.text)
    bad_call = CHAT + [{"role": "assistant", "tool_calls": [{"function": {"name": "x", "arguments": "{oops"}}]}]
    r = client.post("/v1/chat/completions", json={"messages": bad_call})
    assert r.status_code == 422 and "a tool call is" in r.json()["error"]["message"]
