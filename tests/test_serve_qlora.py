"""QLoRA runs served over one 4-bit copy of their base (`lmforge serve BASE --quantize nf4 --lora-modules ...`): the
base's blocks stored as QLoRA stored them, each run generating what it generates alone; what that base cannot serve
(a run of the base in full, 8-bit maxima, a LoftQ run that quantized its own base) is one clear line."""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest
import torch

from lmforge import nf4
from lmforge.errors import ConfigError
from lmforge.generate import load
from lmforge.serve import ServeConfig, load_app
from lmforge.train import Trainer
from test_serve import running
from test_tasks import make_base, prepare, reverse_records, write_jsonl
from tiny_training import tiny_config

PROMPTS = ["abc", "fed", "dcba"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Path]:
    """A base and LoRA runs of it: rev (QLoRA, the instruct template, q and v), dora (QLoRA with DoRA on every block
    matrix), plain (LoRA on the base in full), double (QLoRA with 8-bit maxima), loftq (LoftQ, 2 steps)."""
    root = tmp_path_factory.mktemp("serve-qlora")
    base = make_base(root, **{"model.block_size": 48})
    assert prepare(base, root / "rev-data", write_jsonl(root / "r.jsonl", reverse_records(200)),
                   extra=("--template", "instruct")) == 0
    assert prepare(base, root / "plain-data", write_jsonl(root / "p.jsonl", reverse_records(200, seed=1))) == 0
    common = {"train.init_from": str(base), "train.max_steps": 8, "train.batch_size": 8, "optim.lr": 3e-2,
              "lora.r": 4, "data.path": str(root / "plain-data"), "lora.quantize": "nf4"}
    for name, values in {"rev": {"data.path": str(root / "rev-data"), "lora.targets": "q,v"},
                         "dora": {"lora.dora": True, "lora.r": 2, "lora.targets": "q,k,v,o,mlp"},
                         "plain": {"lora.quantize": None},
                         "double": {"lora.double_quant": True},
                         "loftq": {"lora.init": "loftq", "lora.loftq_iter": 2}}.items():
        Trainer(tiny_config(root / name, **{**common, **values}), progress=False, tensorboard=False).fit()
    return {"base": base, **{name: root / name for name in ("rev", "dora", "plain", "double", "loftq")}}


def alone(run: Path, prompt: str, **options) -> str:
    return load(str(run), device="cpu", **options).generate(prompt, max_new_tokens=10, temperature=0.0)


def served_texts(app, names) -> dict[tuple[str, str], str]:
    out = {}
    with running(app) as url, httpx.Client(base_url=url, timeout=60) as client:
        for name in names:
            for prompt in PROMPTS:
                body = {"prompt": prompt, "max_tokens": 10, "temperature": 0.0,
                        **({} if name == "base" else {"model": name})}
                r = client.post("/v1/completions", json=body)
                assert r.status_code == 200, r.text
                out[(name, prompt)] = r.json()["choices"][0]["text"]
    return out


def test_qlora_runs_served_over_the_4_bit_base_generate_what_they_generate_alone(runs):
    expected = {name: [alone(runs[name], p) for p in PROMPTS] for name in ("rev", "dora")}
    expected["base"] = [alone(runs["base"], p, quantize="nf4") for p in PROMPTS]  # the base's rows: the 4-bit base
    assert expected["rev"] != expected["base"] != expected["dora"]  # the adapters change the text
    app = load_app(str(runs["base"]), ServeConfig(lora_modules=[f"rev={runs['rev']}", f"dora={runs['dora']}"]),
                   device="cpu", quantize="nf4")
    got = served_texts(app, ("rev", "base", "dora"))
    assert {name: [got[(name, p)] for p in PROMPTS] for name in expected} == expected
    runtime = load_app(str(runs["base"]), ServeConfig(allow_runtime_lora=True), device="cpu", quantize="nf4")
    with running(runtime) as url, httpx.Client(base_url=url, timeout=60) as client:
        r = client.post("/v1/load_lora_adapter", json={"lora_name": "rev", "lora_path": str(runs["rev"])})
        assert r.status_code == 200, r.text
        texts = [client.post("/v1/completions", json={"model": "rev", "prompt": p, "max_tokens": 10,
                                                       "temperature": 0.0}).json()["choices"][0]["text"]
                 for p in PROMPTS]
    assert texts == expected["rev"]


def test_the_4_bit_base_holds_qloras_bytes_and_computes_near_the_base_in_full(runs):
    full = load(str(runs["base"]), device="cpu")
    four = load(str(runs["base"]), device="cpu", quantize="nf4")
    layers = {n: m for n, m in four.model.named_modules() if isinstance(m, nf4.NF4Linear)}
    assert len(layers) == 4 * full.model.config.n_layer  # qkv, proj, fc, proj of each block; not the head
    for name, layer in layers.items():
        assert torch.equal(layer.packed, nf4.quantize(full.model.get_submodule(name).weight)[0])
    ids = torch.tensor([[0, 5, 9, 12, 7]])
    with torch.no_grad():
        gap = (four.model(ids) - full.model(ids)).abs().max()
    assert 0 < gap < 0.5


@pytest.mark.parametrize("run, message", [
    ("rev", "serve the base with --quantize nf4, or the run on its own"),  # a QLoRA run over the base in full
    ("double", "8-bit maxima .* serve it on its own"),
    ("loftq", "quantized its own base .* serve it on its own")], ids=["in-full", "double", "loftq"])
def test_what_the_4_bit_base_cannot_serve_is_one_line(runs, run, message):
    quantize = None if run == "rev" else "nf4"
    with pytest.raises(ConfigError, match=message) as info:
        load_app(str(runs["base"]), ServeConfig(lora_modules=[f"x={runs[run]}"]), device="cpu", quantize=quantize)
    assert "\n" not in str(info.value)


def test_a_plain_lora_run_serves_over_the_4_bit_base_as_over_int8_layers(runs):
    """Adapters trained on the base in full, served over 4-bit layers: allowed (the serving side's approximation, as
    with --quantize int8): what the run's adapters give on the 4-bit base (apply_lora over its NF4 layers)."""
    from lmforge.checkpoint import read_run_config, read_task, resolve_checkpoint
    from lmforge.checkpoint.weights import read_weights
    from lmforge.generate import TextGenerator
    from lmforge.lora import apply_lora, load_lora_state_dict

    app = load_app(str(runs["base"]), ServeConfig(lora_modules=[f"plain={runs['plain']}"]), device="cpu",
                   quantize="nf4")
    got = served_texts(app, ("plain",))
    four = load(str(runs["base"]), device="cpu", quantize="nf4")
    ckpt = resolve_checkpoint(runs["plain"])
    model = apply_lora(four.model, read_run_config(ckpt).lora)
    load_lora_state_dict(model, read_weights(ckpt))
    by_hand = TextGenerator(model.eval(), four.tokenizer, template=read_task(ckpt)["template"])  # as the run learned
    assert [got[("plain", p)] for p in PROMPTS] == [by_hand.generate(p, max_new_tokens=10, temperature=0.0)
                                                   for p in PROMPTS]
    assert [got[("plain", p)] for p in PROMPTS] != [alone(runs["base"], p, quantize="nf4") for p in PROMPTS]
