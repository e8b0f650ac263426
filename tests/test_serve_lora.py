"""Several LoRA runs of one base served from one copy of it (`lmforge serve BASE --lora-modules NAME=RUN`, vLLM's
--lora-modules): a request's model picks the adapters; each generates what its run generates alone (its merged model,
its template), also when one batched decode mixes them, and what cannot be served so is one clear line."""

from __future__ import annotations

import asyncio
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
import torch

from lmforge.errors import ConfigError
from lmforge.generate import GenerateConfig, load
from lmforge.serve import ServeConfig, load_app
from lmforge.serve.engine import Engine, Job, Mailbox
from lmforge.train import Trainer
from test_serve import running, until_done, wait_until
from test_tasks import make_base, prepare, reverse_records, write_jsonl
from tiny_training import tiny_config

PROMPTS = ["abc", "fed", "dcba", "bad"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Path]:
    """A base and four LoRA runs on it: rev (sft with the instruct template, q and v), dora (DoRA on everything,
    the plain template), table (q and the token embedding, whose tied head reads it adapted), and other (a LoRA run
    of another base)."""
    root = tmp_path_factory.mktemp("serve-lora")
    base = make_base(root, **{"model.block_size": 48})
    assert prepare(base, root / "rev-data", write_jsonl(root / "r.jsonl", reverse_records(200)),
                   extra=("--template", "instruct")) == 0
    assert prepare(base, root / "plain-data", write_jsonl(root / "p.jsonl", reverse_records(200, seed=1))) == 0
    common = {"train.init_from": str(base), "train.max_steps": 8, "train.batch_size": 8, "optim.lr": 3e-2}
    for name, values in {"rev": {"data.path": str(root / "rev-data"), "lora.r": 4, "lora.targets": "q,v"},
                         "dora": {"data.path": str(root / "plain-data"), "lora.r": 2, "lora.dora": True,
                                  "lora.targets": "q,k,v,o,mlp"},
                         "table": {"data.path": str(root / "plain-data"), "lora.r": 4,
                                   "lora.targets": "q,emb"}}.items():
        Trainer(tiny_config(root / name, **common, **values), progress=False, tensorboard=False).fit()
    other = make_base(root / "other", **{"train.seed": 8, "model.block_size": 48})
    Trainer(tiny_config(root / "other-lora", **{**common, "train.init_from": str(other), "lora.r": 4,
                                                  "data.path": str(root / "plain-data")}),
            progress=False, tensorboard=False).fit()
    return {"base": base, "rev": root / "rev", "dora": root / "dora", "table": root / "table",
            "other": root / "other-lora"}


def alone(run: Path, prompt: str, **options) -> str:
    return load(str(run), device="cpu").generate(prompt, max_new_tokens=10, temperature=0.0, **options)


def test_each_named_run_generates_what_it_generates_alone_also_when_requests_mix(runs):
    names = ("base", "rev", "dora", "table")
    expected = {name: [alone(runs[name], p) for p in PROMPTS] for name in names}
    assert expected["dora"] != expected["base"] != expected["table"]  # the adapters change the text
    modules = [f"{name}={runs[name]}" for name in names[1:]]
    app = load_app(str(runs["base"]), ServeConfig(lora_modules=modules), device="cpu")
    with running(app) as url, httpx.Client(base_url=url, timeout=60) as client:
        listed = client.get("/v1/models").json()["data"]
        assert [(m["id"], m.get("parent")) for m in listed] == [("base", None), ("rev", "base"), ("dora", "base"),
                                                                ("table", "base")]

        def ask(name: str, prompt: str) -> str:
            body = {"prompt": prompt, "max_tokens": 10, "temperature": 0.0, **({} if name == "base" else
                                                                                {"model": name})}
            r = client.post("/v1/completions", json=body)
            assert r.status_code == 200 and r.json()["model"] == name, r.text
            return r.json()["choices"][0]["text"]

        asks = [(name, p) for p in PROMPTS for name in ("dora", "base", "table", "rev")]  # interleaved, at once
        with ThreadPoolExecutor(len(asks)) as pool:
            got = dict(zip(asks, pool.map(lambda a: ask(*a), asks)))
        assert {name: [got[(name, p)] for p in PROMPTS] for name in expected} == expected
        r = client.post("/v1/completions", json={"model": "nope", "prompt": "a", "max_tokens": 1})
        assert r.status_code == 404 and "'base', 'rev', 'dora', 'table'" in r.json()["error"]["message"]
        tokens = client.post("/tokenize", json={"model": "rev", "prompt": "abc"}).json()["tokens"]
        rev = load(str(runs["rev"]), device="cpu")
        assert tokens == [rev.tokenizer.start_id] + rev.tokenizer.encode(rev.render("abc"))  # its template
        body = {"model": "rev", "prompt": "abc", "max_tokens": 3, "logprobs": 1, "echo": True, "temperature": 0.0}
        scored = client.post("/v1/completions", json=body).json()["choices"][0]["logprobs"]["token_logprobs"]
    with torch.no_grad():  # echo's prompt logprobs too are the named run's (its merged model alone)
        logp = torch.log_softmax(rev.model(torch.tensor([tokens]))[0].double(), dim=-1)
    assert scored[1:len(tokens)] == pytest.approx([logp[j - 1, tokens[j]].item() for j in range(1, len(tokens))],
                                                  abs=1e-4)


@pytest.mark.parametrize("max_loras,decodes", [(2, 1), (1, 2)], ids=["mixed", "one-set-per-decode"])
def test_jobs_of_several_adapters_share_a_decode_each_row_with_its_own(runs, max_loras, decodes):
    from lmforge.generate.api import load_adapters

    generator = load(str(runs["base"]), device="cpu")
    served = {None: generator, **load_adapters(generator, {"dora": str(runs["dora"]), "rev": str(runs["rev"])},
                                               str(runs["base"]))}
    engine = Engine(generator, max_concurrency=16, max_queue=16, max_batch_size=32, max_loras=max_loras)
    names = [None, "dora", "rev"] * 3 + ["rev"]  # interleaved: base, dora, rev, base, ..., and the last with
    prompts = (PROMPTS * 3)[:len(names)]  # classifier-free guidance: its second row takes rev's set too
    options = [{}] * (len(names) - 1) + [{"guidance_scale": 1.5}]

    async def scenario() -> list[Job]:
        loop = asyncio.get_running_loop()
        jobs = []
        for name, prompt, extra in zip(names, prompts, options):
            ids = [generator.tokenizer.start_id] + generator.tokenizer.encode(served[name].render(prompt))
            jobs.append(Job(ids, GenerateConfig(max_new_tokens=10, temperature=0.0, **extra), False,
                            time.monotonic() + 30, Mailbox(loop), adapter=name))
        engine.submit(jobs)
        engine.start()
        await until_done(jobs)
        return jobs

    try:
        jobs = asyncio.run(scenario())
    finally:
        engine.close()
    # max_loras=2: one decode of all ten jobs; 1: the base's and dora's jobs in one, rev's in another
    assert engine.decodes == decodes
    texts = [job.choices[0].text for job in jobs]
    assert texts == [alone(runs[name or "base"], p, **extra) for name, p, extra in zip(names, prompts, options)]
    assert texts[-1] != alone(runs["rev"], prompts[-1])  # guidance changes the text
    for prompt in PROMPTS:  # in Python: each generator decodes with its own set, its template applied
        assert served["dora"].generate(prompt, max_new_tokens=10, temperature=0.0) == alone(runs["dora"], prompt)
        assert "".join(served["dora"].stream(prompt, max_new_tokens=10, temperature=0.0)) == alone(runs["dora"],
                                                                                                   prompt)
        assert generator.generate(prompt, max_new_tokens=10, temperature=0.0) == alone(runs["base"], prompt)


def test_python_decodes_prompts_of_several_adapters_in_one_batch(runs):
    from lmforge.generate import generate_batch_ids
    from lmforge.generate.api import load_adapters
    from lmforge.lora import use_adapter

    generator = load(str(runs["base"]), device="cpu")
    load_adapters(generator, {"dora": str(runs["dora"]), "rev": str(runs["rev"])}, str(runs["base"]))
    tok, model = generator.tokenizer, generator.model
    prompts = [[tok.start_id] + tok.encode(p) for p in PROMPTS]
    names = ["rev", None, "dora", "rev"]
    config = GenerateConfig(max_new_tokens=8, temperature=0.0, num_return_sequences=2)
    mixed = generate_batch_ids(model, prompts, config, adapters=names)
    for prompt, name, got in zip(prompts, names, mixed):  # peft's adapter_names: each prompt as with its set alone
        with use_adapter(name):
            assert got == generate_batch_ids(model, [prompt], config)[0], name
    assert mixed[0] != mixed[1]  # rev's adapters change the tokens of the same kind of prompt
    for adapters, needle in ((["rev"], "a list of 4 names"), ("rev", "not 'rev'"),
                             (["rev", None, "nope", "x"], "'nope', 'x', which the model has no adapter set for")):
        with pytest.raises(ConfigError, match=needle):
            generate_batch_ids(model, prompts, config, adapters=adapters)
    with pytest.raises(ConfigError, match="not with beam search"):
        generate_batch_ids(model, prompts, GenerateConfig(max_new_tokens=4, num_beams=2), adapters=names)


@pytest.mark.parametrize("which,extra,needle", [
    ("base", {}, "holds a whole model, not LoRA adapters"),
    ("other", {}, "was trained on other weights"),
    ("rev", {"lora_modules": ["re.v={rev}"]}, "is not NAME=RUN_DIR"),
    ("rev", {"lora_modules": ["a={rev}", "a={dora}"]}, "names 'a' twice"),
    ("rev", {"prompt_lookup_num_tokens": 3}, "together are not supported"),
], ids=["a-whole-model", "another-base", "a-dotted-name", "a-name-twice", "with-speculation"])
def test_what_cannot_be_served_beside_the_base_is_one_clear_line(runs, which, extra, needle):
    modules = [m.format(**runs) for m in extra.pop("lora_modules", [f"x={runs[which]}"])]
    with pytest.raises(ConfigError, match=needle):
        load_app(str(runs["base"]), ServeConfig(lora_modules=modules, **extra), device="cpu")


def test_lora_modules_refuse_a_compiled_step(runs):
    with pytest.raises(ConfigError, match="with --compile is not supported"):
        load_app(str(runs["base"]), ServeConfig(lora_modules=[f"rev={runs['rev']}"]), device="cpu", compile=True)


def test_lora_modules_serve_on_int8_weights_also_when_loaded_at_runtime(runs):
    def texts(app, load_first: bool = False) -> dict:
        with running(app) as url, httpx.Client(base_url=url, timeout=60) as client:
            for name in ("rev", "dora") if load_first else ():
                r = client.post("/v1/load_lora_adapter", json={"lora_name": name, "lora_path": str(runs[name])})
                assert r.status_code == 200, r.text
            asks = [(name, p) for p in PROMPTS for name in ("base", "rev", "dora")]
            with ThreadPoolExecutor(len(asks)) as pool:  # all at once: mixed decodes
                answers = pool.map(lambda a: client.post("/v1/completions", json={
                    "prompt": a[1], "max_tokens": 10, "temperature": 0.0,
                    **({} if a[0] == "base" else {"model": a[0]})}).json()["choices"][0]["text"], asks)
                return dict(zip(asks, answers))

    modules = ServeConfig(lora_modules=[f"rev={runs['rev']}", f"dora={runs['dora']}"])
    at_start = texts(load_app(str(runs["base"]), modules, device="cpu", quantize="int8"))
    int8 = load(str(runs["base"]), device="cpu", quantize="int8")  # the base's rows: the int8 base alone
    assert [at_start[("base", p)] for p in PROMPTS] == [int8.generate(p, max_new_tokens=10, temperature=0.0)
                                                        for p in PROMPTS]
    assert [at_start[("rev", p)] for p in PROMPTS] != [at_start[("base", p)] for p in PROMPTS]
    # loaded while serving: folded onto the same int8 layers, the same texts
    assert texts(load_app(str(runs["base"]), ServeConfig(allow_runtime_lora=True), device="cpu", quantize="int8"),
                 load_first=True) == at_start


@pytest.mark.parametrize("dora,init,tied", [(False, "default", True), (True, "default", True), (False, "pissa", True),
                                           (False, "default", False)], ids=["lora", "dora", "pissa", "lora-untied"])
def test_an_adapter_set_computes_what_its_adapted_model_computes_and_no_set_the_base(dora, init, tied):
    import copy

    from lmforge.config import LoRAConfig, ModelConfig
    from lmforge.generate.quantize import Int8Linear, apply_inference_dtype
    from lmforge.lora import Adapter, add_adapter_set, apply_lora, lora_state_dict, use_adapter
    from lmforge.model import GPT

    torch.manual_seed(0)  # with biases: DoRA's gains scale the output without them
    base = GPT(ModelConfig(vocab_size=50, block_size=16, n_layer=2, n_head=4, n_kv_head=2, n_embd=32, bias=True,
                           tie_embeddings=tied)).eval()
    with torch.no_grad():
        for name, p in base.named_parameters():
            if name.endswith("bias"):
                p.normal_(0.0, 0.5)  # (zeros at init)
    served = copy.deepcopy(base)
    int8 = apply_inference_dtype(copy.deepcopy(base), quantize="int8")  # the sets on int8 layers: folded on their
    adapted = {}  # dequantized weights (DoRA's row norms are those of what the layers compute with)
    sets = {"x": ["q", "v", "o", "mlp"], "y": ["k", "v"]}
    if not dora and init == "default":  # and the token embedding's table (on a tied model, the head's too)
        sets["w"] = ["emb", "o"]
    for name, targets in sets.items():
        lora = LoRAConfig(r=3, alpha=5.0, targets=targets, dora=dora, init=init)
        adapted[name] = apply_lora(copy.deepcopy(base), lora).eval()
        with torch.no_grad():
            for adapter in (m for m in adapted[name].modules() if isinstance(m, Adapter)):
                adapter.A.normal_(0.0, 0.5) if not adapter.A.any() else None  # (the table's A starts at 0)
                adapter.B.normal_(0.0, 0.2)
                if dora:  # magnitudes away from the rows' norms
                    adapter.magnitude.mul_(1.0 + torch.rand_like(adapter.magnitude))
        for model in (served, int8):
            add_adapter_set(model, name, lora, {k: v.detach().clone()
                                                for k, v in lora_state_dict(adapted[name]).items()})
    idx = torch.randint(0, 50, (2, 16))
    with torch.no_grad():
        for name in sets:
            with use_adapter(name):
                assert (served(idx) - adapted[name](idx)).abs().max() <= 1e-5, name
            assert (adapted[name](idx) - base(idx)).abs().max() > 1e-3  # the sets change the output (100x 1e-5)
        assert torch.equal(served(idx), base(idx))  # no set chosen: the base, exactly
        with use_adapter("z"):
            assert torch.equal(served(idx), base(idx))
        names = ["y", None, "w", "x", "y", "z", "w"]  # a set per row: each row computes as its model alone
        batch = torch.randint(0, 50, (len(names), 16))
        with use_adapter(names):
            mixed = served(batch)
        for i, name in enumerate(names):
            alone = (adapted[name] if name in adapted else base)(batch[i:i + 1])
            assert (mixed[i:i + 1] - alone).abs().max() <= 1e-5, (i, name)
        with use_adapter(names[:2]), pytest.raises(ValueError, match="for 2 rows, and the batch has 7"):
            served(batch)
        rounding = (apply_inference_dtype(copy.deepcopy(base), quantize="int8")(idx) - base(idx)).abs().max()
        assert isinstance(int8.blocks[0].attn.qkv.base, Int8Linear) and 0 < rounding < 0.05
        with use_adapter("x"):  # (x adapts the most: its effect stands well above int8's rounding)
            error = (int8(idx) - adapted["x"](idx)).abs().max()
        assert error <= 3 * rounding and error < (int8(idx) - adapted["x"](idx)).abs().max() / 4


def test_runs_load_and_unload_while_serving_when_allowed(runs):
    app = load_app(str(runs["base"]), ServeConfig(allow_runtime_lora=True), device="cpu")
    body = {"model": "dora", "prompt": "abc", "max_tokens": 10, "temperature": 0.0}
    with running(app) as url, httpx.Client(base_url=url, timeout=60) as client:
        def models() -> list[str]:
            return [m["id"] for m in client.get("/v1/models").json()["data"]]

        assert client.post("/v1/completions", json=body).status_code == 404
        r = client.post("/v1/load_lora_adapter", json={"lora_name": "dora", "lora_path": str(runs["dora"])})
        assert r.status_code == 200 and models() == ["base", "dora"], r.text
        assert client.post("/v1/completions", json=body).json()["choices"][0]["text"] == alone(runs["dora"], "abc")
        for name, path, status, words in [("dora", runs["rev"], 400, "served already"),
                                          ("x", runs["other"], 400, "trained on other weights"),
                                          ("x.y", runs["rev"], 400, "is not letters"),
                                          ("x", runs["base"] / "nope", 400, "nope")]:
            r = client.post("/v1/load_lora_adapter", json={"lora_name": name, "lora_path": str(path)})
            assert r.status_code == status and words in r.json()["error"]["message"], r.text
        assert models() == ["base", "dora"]
        engine, gate = app.state.engine, threading.Event()
        engine.call(lambda: gate.wait(30))  # the worker busy: a request that comes now waits
        with ThreadPoolExecutor(2) as pool, httpx.Client(base_url=url, timeout=60) as other, \
                httpx.Client(base_url=url, timeout=60) as third:
            pending = pool.submit(other.post, "/v1/completions", json={**body, "min_tokens": 10})  # 10 steps
            wait_until(lambda: engine.stats()["waiting"] == 1)
            unloading = pool.submit(third.post, "/v1/unload_lora_adapter", json={"lora_name": "dora"})
            wait_until(lambda: len(engine._calls) == 1)  # queued behind the gate, after the request
            gate.set()
            r = unloading.result()
            assert r.status_code == 409 and "generating for requests" in r.json()["error"]["message"]
            assert pending.result().status_code == 200
        assert client.post("/v1/unload_lora_adapter", json={"lora_name": "dora"}).status_code == 200
        assert models() == ["base"] and client.post("/v1/completions", json=body).status_code == 404
        assert client.post("/v1/unload_lora_adapter", json={"lora_name": "dora"}).status_code == 404
        plain = client.post("/v1/completions", json={**body, "model": None}).json()["choices"][0]["text"]
        assert plain == alone(runs["base"], "abc")
    app = load_app(str(runs["base"]), ServeConfig(), device="cpu")  # not allowed: no such endpoints
    with running(app) as url, httpx.Client(base_url=url, timeout=60) as client:
        r = client.post("/v1/load_lora_adapter", json={"lora_name": "dora", "lora_path": str(runs["dora"])})
        assert r.status_code == 404


def test_an_adapter_is_unloaded_only_once_no_request_decodes_with_it(runs):
    from lmforge.generate.api import load_adapters
    from lmforge.lora import adapter_sets, remove_adapter_set

    generator = load(str(runs["base"]), device="cpu")
    load_adapters(generator, {"dora": str(runs["dora"])}, str(runs["base"]))
    engine = Engine(generator, max_concurrency=4, max_queue=4, max_batch_size=8)
    assert engine.adapters == {"dora"}

    async def scenario() -> tuple[bool, list]:
        loop = asyncio.get_running_loop()
        ids = [generator.tokenizer.start_id] + generator.tokenizer.encode("abc")
        job = Job(ids, GenerateConfig(max_new_tokens=200, temperature=0.0), False, time.monotonic() + 30,
                  Mailbox(loop), adapter="dora")
        engine.submit([job])
        asked = engine.call(lambda: engine.in_use("dora"))  # runs before the job is taken: it waits
        engine.start()
        busy = await asyncio.wrap_future(asked)
        await until_done([job])
        engine.adapters.discard("dora")
        late = Job(ids, GenerateConfig(max_new_tokens=5), False, time.monotonic() + 30, Mailbox(loop), adapter="dora")
        engine.submit([late])
        return busy, [await late.mailbox.get(30)]

    try:
        busy, events = asyncio.run(scenario())
    finally:
        engine.close()
    assert busy and not engine.in_use("dora")
    assert events[0][:2] == ("error", 404) and "was unloaded" in events[0][2]  # never decoded with the bare base
    remove_adapter_set(generator.model, "dora")
    assert adapter_sets(generator.model) == set()


def test_a_lora_run_named_as_the_base_is_refused(runs):
    with pytest.raises(ConfigError, match="the served model's own name"):
        load_app(str(runs["base"]), ServeConfig(lora_modules=[f"base={runs['rev']}"]), device="cpu")
