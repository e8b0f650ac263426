"""Speculative decoding on the CPU: lmforge against Hugging Face's assisted generation, in one process.

Two GPT-2-style char models are trained here on the Shakespeare char shards, --steps steps of 8 x 256 tokens each
(a 6-layer, 384-wide model and a 2-layer, 128-wide draft, both with a 256-token context; learned positions,
LayerNorm, tanh GELU, so that transformers' GPT2LMHeadModel holds the same weights). Then, on one thread, each of
--prompts val passages of 64 characters is continued by --new greedy tokens (no end token) in eight ways, rounds
alternating their order:

    lmforge             plain greedy decoding (KV cache)
    lmforge-lookup      prompt lookup, 10 tokens guessed per step from the text's last 2-gram
    lmforge-draft       the draft model guessing 5 tokens per step
    lmforge-draft-confident   the same, each step's guessing cut short after a guess the draft gives a
                        probability below 0.4 (assistant_confidence_threshold, Hugging Face's default value)
    lmforge-draft-compiled    the same, the draft guessing through its compiled step (generate.apply_compile;
                        compiled in the untimed warm-up call, whose seconds are reported)
    lmforge-early-exit  self-speculation: the target's own first half of its layers (then its final norm and head)
                        guessing 3 tokens per step (assistant_early_exit; no second model). Hugging Face's
                        assistant_early_exit cannot cut GPT2LMHeadModel (its loop over the blocks ignores
                        num_hidden_layers), so this way is compared with HF's plain greedy decoding
    hf                  GPT2LMHeadModel.generate, greedy
    hf-lookup           generate(prompt_lookup_num_tokens=10, max_matching_ngram_size=2)
    hf-draft            generate(assistant_model=..., num_assistant_tokens=5, constant schedule, no confidence
                        cut-off): the same work as lmforge-draft
    hf-draft-confident  the same with assistant_confidence_threshold=0.4: the same work as lmforge-draft-confident
    hf-draft-default    generate(assistant_model=...) with its defaults (its own schedule and cut-off)

Every greedy output is compared token by token with lmforge's plain greedy output (all should be identical up
to float rounding in near ties). Reported: tokens/s (median of rounds), lmforge's speed-up from speculation,
lmforge against HF for the same method, and lmforge's acceptance (guesses kept / guesses made). Sampling
(temperature 0.8) is timed plain and with the draft model for lmforge and HF too, and with early exit for lmforge,
without a token comparison (the draws differ).

    python benchmarks/speculative_decoding.py --json-out benchmarks/results/speculative_decoding-cpu-X.json
    python benchmarks/speculative_decoding.py --quick     # small models, 2 prompts, 1 round: a check that it runs
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import time
import warnings
from pathlib import Path
from typing import Any, Callable, Optional

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))  # run from a checkout without installing

from lmforge.checkpoint import load_for_inference  # noqa: E402
from lmforge.config import apply_overrides, run_config_from_dict  # noqa: E402
from lmforge.data.shards import load_split  # noqa: E402
from lmforge.generate import GenerateConfig, apply_compile, make_rows  # noqa: E402
from lmforge.generate.api import decode_events  # noqa: E402
from lmforge.interop.hf_gpt2 import to_hf_config, to_hf_state_dict  # noqa: E402
from lmforge.model import GPT  # noqa: E402
from lmforge.train.trainer import Trainer, with_vocab_size  # noqa: E402
from machine import machine, report  # noqa: E402  (benchmarks/machine.py)
from quality_shakespeare import ensure_data  # noqa: E402  (the char Shakespeare shards, made once)

GPT2_STYLE = {"pos_encoding": "learned", "norm": "layernorm", "mlp": "gelu", "activation": "gelu_tanh", "bias": True,
              "tie_embeddings": True, "dropout": 0.0, "block_size": 256}
MODELS = {"target": {"n_layer": 6, "n_head": 6, "n_embd": 384}, "draft": {"n_layer": 2, "n_head": 4, "n_embd": 128}}
QUICK_MODELS = {"target": {"n_layer": 2, "n_head": 2, "n_embd": 64}, "draft": {"n_layer": 1, "n_head": 2, "n_embd": 32}}
LOOKUP, DRAFT_TOKENS = 10, 5  # HF's prompt lookup default; tokens the draft model guesses per step
CONFIDENCE = 0.4  # Hugging Face's default assistant_confidence_threshold
EARLY_EXIT_TOKENS = 3  # tokens the target's first layers guess per step (its half-depth draft is slower than the
# small draft model, so fewer guesses pay)


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", default="data/shakespeare-char", help="prepared char dataset (made if missing)")
    p.add_argument("--runs", default="runs/speculative", help="parent of the two run directories (replaced)")
    p.add_argument("--reuse", action="store_true", help="use the runs already trained under --runs")
    p.add_argument("--steps", type=int, default=900, help="training steps of each model")
    p.add_argument("--train-threads", type=int, default=0, help="torch threads for training; 0 = torch's default")
    p.add_argument("--threads", type=int, default=1, help="torch threads for decoding")
    p.add_argument("--prompts", type=int, default=6, help="val passages continued")
    p.add_argument("--new", type=int, default=176, help="new tokens per prompt (64 + new + guesses < 256: HF's "
                   "checks would run past its 256 positions; no window slide)")
    p.add_argument("--rounds", type=int, default=5, help="timed rounds (medians are reported)")
    p.add_argument("--quick", action="store_true",
                   help="a smoke run: small models (2 layers / 64 wide, 1 / 32), 30 steps, 2 prompts, 32 tokens, 1 round")
    p.add_argument("--json-out", default=None, help="also write the JSON summary to this file")
    args = p.parse_args(argv)
    if args.quick:
        args.steps, args.prompts, args.new, args.rounds = 30, 2, 32, 1
    if min(args.steps, args.prompts, args.new, args.rounds, args.threads) < 1 or args.new > 176:
        p.error("--steps, --prompts, --new, --rounds and --threads must be positive, --new at most 176")
    return args


# ------------------------------------------------------------------------------------------ the models
def models(args: argparse.Namespace) -> dict[str, dict[str, int]]:
    return QUICK_MODELS if args.quick else MODELS


def train(name: str, args: argparse.Namespace, vocab_size: int, shape: Optional[dict[str, int]] = None,
          extra: Optional[dict[str, str]] = None) -> Path:
    """The run directory of model `name` (trained unless --reuse finds it): `shape` its layers, heads and width
    (default: this script's models), `extra` more config overrides (benchmarks/early_exit.py's early-exit loss)."""
    run_dir = Path(args.runs) / name
    if args.reuse and (run_dir / "checkpoints").is_dir():
        return run_dir
    if run_dir.exists():
        shutil.rmtree(run_dir)  # this script's own run (--runs)
    raw = {"model": {**GPT2_STYLE, **(shape or models(args)[name])},
           "optim": {"name": "adamw", "lr": 3e-3 if name == "draft" else 2e-3, "min_lr": 1e-4, "schedule": "cosine",
                     "warmup_steps": min(100, args.steps // 10), "weight_decay": 0.1, "grad_clip": 1.0}}
    overrides = {"data.path": args.data, "train.run_dir": str(run_dir), "train.resume": "none",
                 "train.max_steps": str(args.steps), "train.batch_size": "8", "train.eval_interval": str(args.steps),
                 "train.eval_batches": "4", "train.save_interval": "0", "train.keep_last": "1",
                 **({"train.num_threads": str(args.train_threads)} if args.train_threads else {}),
                 **(extra or {})}
    config = with_vocab_size(run_config_from_dict(apply_overrides(raw, overrides)), vocab_size)
    Trainer(config, progress=False, tensorboard=False).fit()
    return run_dir


def last_val_loss(run_dir: Path) -> Optional[float]:
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    losses = [r["val_loss"] for r in records if "val_loss" in r]
    return round(losses[-1], 4) if losses else None


def hf_copy(model: GPT) -> torch.nn.Module:
    from transformers import GPT2Config, GPT2LMHeadModel

    hf = GPT2LMHeadModel(GPT2Config(**to_hf_config(model.config), attn_implementation="sdpa")).eval()
    hf.load_state_dict(to_hf_state_dict(model.state_dict(), model.config), strict=True)
    return hf


# ------------------------------------------------------------------------------------------ the runs
def lmforge_runner(model: GPT, prompts: list[list[int]], config: GenerateConfig, draft: Optional[GPT],
                   counts: dict[str, int]) -> Callable[[], list[list[int]]]:
    def run() -> list[list[int]]:
        out = []
        for prompt in prompts:
            rows = make_rows(model, [prompt], config)
            for _ in decode_events(model, rows, config, draft):
                pass
            counts["drafted"] += rows[0].drafted
            counts["accepted"] += rows[0].accepted
            out.append(rows[0].tokens)
        return out
    return run


def hf_runner(model: torch.nn.Module, prompts: list[list[int]], new: int, **kwargs: Any) -> Callable[[], list]:
    def run() -> list[list[int]]:
        out = []
        for prompt in prompts:
            ids = torch.tensor([prompt])
            with torch.inference_mode(), warnings.catch_warnings():
                warnings.simplefilter("ignore")
                got = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new, min_new_tokens=new,
                                     eos_token_id=None, pad_token_id=0, use_cache=True, **kwargs)
            out.append(got[0, len(prompt):].tolist())
        return out
    return run


def alternate(runners: dict[str, Callable], rounds: int) -> tuple[dict[str, list[float]], dict[str, list],
                                                                  dict[str, float]]:
    """Seconds per round of each runner, order rotating between rounds, after one warm-up call each (its outputs
    and seconds returned too: a compiled draft compiles there)."""
    outputs, warmup = {}, {}
    for name, run in runners.items():
        start = time.perf_counter()
        outputs[name] = run()
        warmup[name] = round(time.perf_counter() - start, 2)
    seconds: dict[str, list[float]] = {name: [] for name in runners}
    names = list(runners)
    for r in range(rounds):
        for name in names[r % len(names):] + names[:r % len(names)]:
            start = time.perf_counter()
            runners[name]()
            seconds[name].append(time.perf_counter() - start)
    return seconds, outputs, warmup


def plain(name: str, library: str) -> str:
    """The plain decoding a speculative way is compared with: greedy, or sampling for a -sample way."""
    return f"{library}-sample" if name.endswith("-sample") else library


def agreement(got: list[list[int]], want: list[list[int]]) -> dict[str, Any]:
    firsts = [next((i for i, (a, b) in enumerate(zip(g, w)) if a != b), min(len(g), len(w))) for g, w in zip(got, want)]
    return {"identical": sum(g == w for g, w in zip(got, want)), "of": len(want), "first_difference": firsts}


def main(argv: Optional[list[str]] = None) -> dict[str, Any]:
    args = parse_args(argv)
    data = Path(args.data)
    ensure_data(data)
    from lmforge.data.shards import read_manifest

    vocab_size = read_manifest(data)["vocab_size"]
    started = time.perf_counter()
    reused = args.reuse and all((Path(args.runs) / name / "checkpoints").is_dir() for name in MODELS)
    runs = {name: train(name, args, vocab_size) for name in MODELS}
    train_s = None if reused else round(time.perf_counter() - started, 1)
    torch.set_num_threads(args.threads)
    here = machine()
    target, tokenizer, _ = load_for_inference(runs["target"], "cpu")
    draft, _, _ = load_for_inference(runs["draft"], "cpu")
    hf_target, hf_draft = hf_copy(target), hf_copy(draft)

    val = load_split(data, "val")
    step = (len(val) - 64) // args.prompts
    prompts = [[tokenizer.start_id] + [int(t) for t in val[i * step:i * step + 63]] for i in range(args.prompts)]
    new = args.new
    greedy = GenerateConfig(greedy=True, max_new_tokens=new)
    counts = {name: {"drafted": 0, "accepted": 0}
              for name in ("lmforge-lookup", "lmforge-draft", "lmforge-draft-confident", "lmforge-draft-compiled",
                           "lmforge-early-exit", "lmforge-draft-sample", "lmforge-early-exit-sample")}
    exit_layers = target.config.n_layer // 2
    early = dict(max_new_tokens=new, assistant_early_exit=exit_layers, num_assistant_tokens=EARLY_EXIT_TOKENS)
    lookup = GenerateConfig(greedy=True, max_new_tokens=new, prompt_lookup_num_tokens=LOOKUP, max_matching_ngram_size=2)
    drafted = GenerateConfig(greedy=True, max_new_tokens=new, num_assistant_tokens=DRAFT_TOKENS)
    confident = GenerateConfig(greedy=True, max_new_tokens=new, num_assistant_tokens=DRAFT_TOKENS,
                               assistant_confidence_threshold=CONFIDENCE)
    runners = {
        "lmforge": lmforge_runner(target, prompts, greedy, None, {"drafted": 0, "accepted": 0}),
        "lmforge-lookup": lmforge_runner(target, prompts, lookup, None, counts["lmforge-lookup"]),
        "lmforge-draft": lmforge_runner(target, prompts, drafted, draft, counts["lmforge-draft"]),
        "lmforge-draft-confident": lmforge_runner(target, prompts, confident, draft, counts["lmforge-draft-confident"]),
        "lmforge-draft-compiled": lmforge_runner(target, prompts, drafted, apply_compile(draft),
                                                 counts["lmforge-draft-compiled"]),
        "lmforge-early-exit": lmforge_runner(target, prompts, GenerateConfig(greedy=True, **early), None,
                                             counts["lmforge-early-exit"]),
        "hf": hf_runner(hf_target, prompts, new, do_sample=False),
        "hf-lookup": hf_runner(hf_target, prompts, new, do_sample=False, prompt_lookup_num_tokens=LOOKUP,
                               max_matching_ngram_size=2),
        "hf-draft": hf_runner(hf_target, prompts, new, do_sample=False, assistant_model=hf_draft,
                              num_assistant_tokens=DRAFT_TOKENS, num_assistant_tokens_schedule="constant",
                              assistant_confidence_threshold=0.0),
        "hf-draft-confident": hf_runner(hf_target, prompts, new, do_sample=False, assistant_model=hf_draft,
                                        num_assistant_tokens=DRAFT_TOKENS, num_assistant_tokens_schedule="constant",
                                        assistant_confidence_threshold=CONFIDENCE),
        "hf-draft-default": hf_runner(hf_target, prompts, new, do_sample=False, assistant_model=hf_draft),
        "lmforge-sample": lmforge_runner(target, prompts, GenerateConfig(temperature=0.8, max_new_tokens=new, seed=0),
                                         None, {"drafted": 0, "accepted": 0}),
        "lmforge-draft-sample": lmforge_runner(target, prompts, GenerateConfig(
            temperature=0.8, max_new_tokens=new, num_assistant_tokens=DRAFT_TOKENS, seed=0), draft,
            counts["lmforge-draft-sample"]),
        "lmforge-early-exit-sample": lmforge_runner(target, prompts, GenerateConfig(temperature=0.8, seed=0, **early),
                                                    None, counts["lmforge-early-exit-sample"]),
        "hf-sample": hf_runner(hf_target, prompts, new, do_sample=True, temperature=0.8, top_k=0, top_p=1.0),
        "hf-draft-sample": hf_runner(hf_target, prompts, new, do_sample=True, temperature=0.8, top_k=0, top_p=1.0,
                                     assistant_model=hf_draft, num_assistant_tokens=DRAFT_TOKENS,
                                     num_assistant_tokens_schedule="constant", assistant_confidence_threshold=0.0),
    }
    for c in counts.values():
        c["drafted"] = c["accepted"] = 0
    seconds, outputs, warmup = alternate(runners, args.rounds)
    tokens = args.prompts * new
    tps = {name: round(tokens / statistics.median(s), 1) for name, s in seconds.items()}
    calls = args.rounds + 1  # the warm-up call counted guesses too
    summary = {
        "benchmark": "speculative_decoding", "machine": here, "data": str(data), "train_steps": args.steps,
        "train_seconds": train_s, "models": {name: {**GPT2_STYLE, **cfg} for name, cfg in models(args).items()},
        "params": {"target": sum(p.numel() for p in target.parameters()),
                   "draft": sum(p.numel() for p in draft.parameters())},
        "val_loss": {name: last_val_loss(runs[name]) for name in MODELS},
        "prompts": args.prompts, "prompt_tokens": 64, "new_tokens": new, "rounds": args.rounds,
        "decode_threads": args.threads, "lookup_tokens": LOOKUP, "draft_tokens": DRAFT_TOKENS,
        "early_exit_layers": exit_layers, "early_exit_tokens": EARLY_EXIT_TOKENS,
        "tokens_per_s": tps,
        "seconds_per_round": {name: [round(x, 3) for x in s] for name, s in seconds.items()},
        "warmup_seconds": warmup,
        "speedup_vs_plain": {name: round(tps[name] / tps[plain(name, "lmforge")], 3)
                             for name in tps if name.startswith("lmforge-") and name != "lmforge-sample"},
        "hf_speedup_vs_plain": {name: round(tps[name] / tps[plain(name, "hf")], 3)
                                for name in tps if name.startswith("hf-") and name != "hf-sample"},
        "lmforge_vs_hf": {"plain": round(tps["lmforge"] / tps["hf"], 3),
                          "plain_sampling": round(tps["lmforge-sample"] / tps["hf-sample"], 3),
                          "lookup": round(tps["lmforge-lookup"] / tps["hf-lookup"], 3),
                          "draft": round(tps["lmforge-draft"] / tps["hf-draft"], 3),
                          "draft_confident": round(tps["lmforge-draft-confident"] / tps["hf-draft-confident"], 3),
                          "draft_compiled": round(tps["lmforge-draft-compiled"] / tps["hf-draft"], 3),
                          "draft_vs_hf_default": round(tps["lmforge-draft"] / tps["hf-draft-default"], 3),
                          "draft_sampling": round(tps["lmforge-draft-sample"] / tps["hf-draft-sample"], 3),
                          "early_exit_vs_hf_plain": round(tps["lmforge-early-exit"] / tps["hf"], 3),
                          "early_exit_sampling_vs_hf_plain": round(tps["lmforge-early-exit-sample"] / tps["hf-sample"],
                                                                   3)},
        "acceptance": {name: round(c["accepted"] / c["drafted"], 3) if c["drafted"] else None
                       for name, c in counts.items()},
        "guesses_per_call": {name: {k: v // calls for k, v in c.items()} for name, c in counts.items()},
        "greedy_vs_lmforge_plain": {name: agreement(outputs[name], outputs["lmforge"]) for name in
                                    ("lmforge-lookup", "lmforge-draft", "lmforge-draft-confident",
                                     "lmforge-draft-compiled", "lmforge-early-exit", "hf", "hf-lookup", "hf-draft", "hf-draft-confident",
                                     "hf-draft-default")},
        "sample_text": tokenizer.decode(prompts[0][1:] + outputs["lmforge"][0]),
    }
    return report(summary, args.json_out)


if __name__ == "__main__":
    main()
