"""Generation speed on the CPU: lmforge's decoding against Hugging Face GPT2LMHeadModel.generate, in one process.

Both models hold the same weights (random, copied with lmforge.interop.hf_gpt2), the same prompt
(8 tokens) and generate 500 new tokens with no end token: greedy, and sampling (temperature 1, top-k 50),
at batch 1 and at batch 16. HF runs its default generate (dynamic KV cache, sdpa attention).
block_size is 512 here, so 8 + 500 tokens fit in the context and no window slides: a like-for-like
comparison of decoding with a KV cache. Both run on one thread by default (--threads): a decoding step
is a chain of small products, and on a shared 2-core machine two threads spent most of their time waiting
on each other (ten times slower, for both libraries). Rounds alternate between the two (and swap which goes first),
so load from other processes hits both alike; medians are reported, and one JSON summary at the end.
Greedy outputs are compared token by token (same weights: the same tokens, up to float rounding in near ties).

The limit of the machine: decoding one token at batch 1 reads every weight once. The script measures, in the
same run and on the same thread, how long the model's own weight matrices (q/k/v, attention output, MLP, LM head)
take through `@` with a vector (fp32), or through the int8 kernel with a vector (int8), and prints each batch-1
variant's tokens/s as a fraction of that weight-read limit.

lmforge runs in variants (--variants): fp32 (the default, exact), int8 (weight-only int8 Linear layers,
generate.apply_inference_dtype), int8-compile and fp32-compile (generate.apply_compile: the decoding step
compiled ahead of time with AOTInductor, once for every length). A variant's first call (its warm-up:
compilation for the -compile ones) is not timed but reported as warmup_s. Each variant's greedy tokens are compared with fp32's (agreement = identical prefix),
and an uncompiled variant's logits over 256 random tokens with fp32's (largest difference relative to the
largest logit, and how often the top token is the same).

    python benchmarks/generate_speed.py \\
        --json-out benchmarks/results/generate_speed-cpu.json   # both configs, a few minutes on 2 busy cores
    python benchmarks/generate_speed.py --quick    # one round, 100 tokens: a check that it runs
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
from pathlib import Path
from typing import Callable

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))  # run from a checkout without installing

from lmforge.config import ModelConfig  # noqa: E402
from lmforge.generate import GenerateConfig, apply_compile, apply_inference_dtype, generate_ids  # noqa: E402
from lmforge.interop.hf_gpt2 import to_hf_config, to_hf_state_dict  # noqa: E402
from lmforge.model import GPT  # noqa: E402
from machine import machine, report  # noqa: E402  (benchmarks/machine.py)

CONFIGS = {
    "char-small": dict(vocab_size=96, block_size=512, n_layer=4, n_head=4, n_embd=128),
    "6l-384": dict(vocab_size=96, block_size=512, n_layer=6, n_head=6, n_embd=384),
}
MODES = {"greedy": dict(temperature=0.0), "sample": dict(temperature=1.0, top_k=50)}
VARIANTS = ("fp32", "int8", "int8-compile", "fp32-compile")


def make_variant(model: GPT, variant: str) -> GPT:
    """A copy of model prepared for decoding as `variant` says (fp32: the model itself)."""
    if variant == "fp32":
        return model
    fast = apply_inference_dtype(copy.deepcopy(model), "fp32", "int8" if variant.startswith("int8") else None)
    return apply_compile(fast) if variant.endswith("-compile") else fast


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--configs", default=",".join(CONFIGS), help=f"comma-separated, from {', '.join(CONFIGS)}")
    p.add_argument("--new-tokens", type=int, default=500, help="tokens generated per sequence")
    p.add_argument("--batch-sizes", default="1,16", help="comma-separated batch sizes")
    p.add_argument("--rounds", type=int, default=3, help="alternating rounds per comparison")
    p.add_argument("--threads", type=int, default=1, help="torch.set_num_threads for both; 0 = torch's default")
    p.add_argument("--quick", action="store_true", help="1 round of 100 tokens: a check that it runs")
    p.add_argument("--variants", default="fp32,fp32-compile,int8,int8-compile", help=f"comma-separated lmforge variants from "
                   f"{', '.join(VARIANTS)}")
    p.add_argument("--json-out", default=None, help="also write the JSON summary to this file")
    return p.parse_args(argv)


def build_pair(config: ModelConfig, seed: int = 0) -> tuple[GPT, torch.nn.Module]:
    """(lmforge GPT, HF GPT2LMHeadModel with the same weights), both in eval mode."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    ours = GPT(config).eval()
    hf = GPT2LMHeadModel(GPT2Config(**to_hf_config(config), attn_implementation="sdpa")).eval()
    hf.load_state_dict(to_hf_state_dict(ours.state_dict(), config), strict=True)
    return ours, hf


def lmforge_runner(model: GPT, prompt: list[int], batch: int, new: int, mode: dict) -> Callable[[], list]:
    config = GenerateConfig(max_new_tokens=new, num_return_sequences=batch, seed=0, **mode)
    return lambda: generate_ids(model, prompt, config)


def hf_runner(model: torch.nn.Module, prompt: list[int], batch: int, new: int, mode: dict) -> Callable[[], list]:
    ids = torch.tensor([prompt]).repeat(batch, 1)
    kwargs = dict(do_sample=False) if mode["temperature"] == 0.0 else \
        dict(do_sample=True, temperature=mode["temperature"], top_k=mode["top_k"], top_p=1.0)

    def run() -> list:
        with torch.inference_mode():
            out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new, min_new_tokens=new,
                                 eos_token_id=None, pad_token_id=0, use_cache=True, **kwargs)
        return out[:, len(prompt):].tolist()

    return run


def alternate(runners: dict[str, Callable], rounds: int) -> tuple[dict[str, list[float]], dict[str, float]]:
    """(seconds per call of each runner per round, seconds of each runner's untimed warm-up call);
    rounds alternate the order."""
    names = list(runners)
    warmup = {}
    for name in names:  # warm-up: allocator, oneDNN primitives, compilation
        t0 = time.perf_counter()
        runners[name]()
        warmup[name] = time.perf_counter() - t0
    seconds: dict[str, list[float]] = {name: [] for name in names}
    for r in range(rounds):
        for name in (names if r % 2 == 0 else names[::-1]):
            t0 = time.perf_counter()
            runners[name]()
            seconds[name].append(time.perf_counter() - t0)
    return seconds, warmup


def compare(name: str, args: argparse.Namespace) -> dict:
    config = ModelConfig(**CONFIGS[name], dropout=0.0, activation="gelu_tanh")
    ours, hf = build_pair(config)
    prompt = list(range(1, 9))
    new = args.new_tokens
    greedy_ours = lmforge_runner(ours, prompt, 1, new, MODES["greedy"])()[0]
    greedy_hf = hf_runner(hf, prompt, 1, new, MODES["greedy"])()[0]
    agree = first_difference(greedy_ours, greedy_hf)
    out = {"config": CONFIGS[name], "params": sum(p.numel() for p in ours.parameters()),
           "greedy_tokens_identical_prefix": agree, "new_tokens": new, "variants": {}, "results": {}}
    print(f"[{name}] greedy outputs agree on the first {agree} of {new} tokens", flush=True)
    variants = {v: make_variant(ours, v) for v in args.variants.split(",")}
    limits = {"fp32": weight_read_limit(ours)}
    if any(v.startswith("int8") for v in variants):
        limits["int8"] = weight_read_limit(apply_inference_dtype(copy.deepcopy(ours), "fp32", "int8"))
    out["weight_read_limit_tokens_per_s"] = {k: round(v, 1) for k, v in limits.items()}
    print(f"[{name}] weight-read limit at batch 1: " + ", ".join(f"{k} {v:,.0f} tok/s" for k, v in limits.items()),
          flush=True)
    for v, model in variants.items():
        t0 = time.perf_counter()
        tokens = lmforge_runner(model, prompt, 1, new, MODES["greedy"])()[0]
        out["variants"][v] = {"first_call_s": round(time.perf_counter() - t0, 1),
                              "greedy_identical_prefix_vs_fp32": first_difference(tokens, greedy_ours)}
        if not v.endswith("-compile"):
            out["variants"][v].update(logits_vs_fp32(model, ours))
        print(f"[{name}] {v}: {out['variants'][v]}", flush=True)
    for batch in (int(b) for b in args.batch_sizes.split(",")):
        for mode_name, mode in MODES.items():
            runners = {v: lmforge_runner(model, prompt, batch, new, mode) for v, model in variants.items()}
            secs, warmup = alternate({**runners, "hf": hf_runner(hf, prompt, batch, new, mode)}, args.rounds)
            hf_tps = batch * new / statistics.median(secs["hf"])
            key = f"batch{batch}-{mode_name}"
            result = out["results"][key] = {"hf_tokens_per_s": round(hf_tps, 1)}
            for v in variants:
                ratios = [h / o for o, h in zip(secs[v], secs["hf"])]
                tps = batch * new / statistics.median(secs[v])
                result[v] = {"tokens_per_s": round(tps, 1), "ratio": round(statistics.median(ratios), 2),
                             "ratio_min": round(min(ratios), 2), "ratio_max": round(max(ratios), 2),
                             "warmup_s": round(warmup[v], 2)}
                of_limit = ""
                if batch == 1:
                    limit = limits["int8" if v.startswith("int8") else "fp32"]
                    result[v]["fraction_of_weight_read_limit"] = round(tps / limit, 3)
                    of_limit = f"   {tps / limit:4.0%} of the weight-read limit"
                print(f"[{name}] {key:>15} {v:>13}: lmforge {tps:8,.0f} tok/s   HF {hf_tps:8,.0f} tok/s   "
                      f"ratio {statistics.median(ratios):.2f}x ({min(ratios):.2f}..{max(ratios):.2f}){of_limit}",
                      flush=True)
    return out


@torch.inference_mode()
def logits_vs_fp32(model: GPT, exact: GPT, length: int = 256) -> dict:
    """How far model's logits are from exact's over `length` random tokens (one sequence)."""
    idx = torch.randint(0, exact.config.vocab_size, (1, length), generator=torch.Generator().manual_seed(0))
    ours, reference = model(idx).float(), exact(idx)
    return {"logits_max_rel_diff_vs_fp32": round(float((ours - reference).abs().max() / reference.abs().max()), 5),
            "top1_agreement_vs_fp32": round(float((ours.argmax(-1) == reference.argmax(-1)).float().mean()), 4)}


@torch.inference_mode()
def weight_read_limit(model: GPT, rounds: int = 200) -> float:
    """Tokens/s if a decoding step cost only its weight reads: every matrix of `model` that a step multiplies
    by (nn.Linear weights, the LM head; int8 ones through their own kernel) applied to one vector, in turn,
    timed over `rounds` passes (median of 5 repeats). Embedding rows are gathered, not read whole: left out."""
    from lmforge.generate import Int8Linear

    products = []
    for module in model.modules():
        if isinstance(module, torch.nn.Linear):
            w, x = module.weight.detach(), torch.randn(module.in_features, dtype=module.weight.dtype)
            products.append(lambda w=w, x=x: w @ x)
        elif isinstance(module, Int8Linear):
            q, scale = module.qweight, module.scale
            x = torch.randn(1, module.in_features, dtype=torch.bfloat16)
            products.append(lambda q=q, s=scale, x=x: torch._weight_int8pack_mm(x, q, s))

    def one_pass() -> None:
        for product in products:
            product()

    for _ in range(20):
        one_pass()
    times = []
    for _ in range(5):
        t0 = time.perf_counter()
        for _ in range(rounds):
            one_pass()
        times.append((time.perf_counter() - t0) / rounds)
    return 1.0 / statistics.median(times)


def first_difference(a: list[int], b: list[int]) -> int:
    """Length of the common prefix of two token lists."""
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    if args.quick:
        args.rounds, args.new_tokens = 1, 100
    if args.threads:
        torch.set_num_threads(args.threads)
    import transformers

    here = machine()
    print(f"{here['cpu']}; torch {here['torch']}, transformers {transformers.__version__}, threads {here['torch_threads']}, "
          f"load average {here['load_average_at_start']}; block_size 512, prompt 8 tokens, {args.new_tokens} new tokens",
          flush=True)
    summary = {"benchmark": "generate_speed", "machine": here, "transformers": transformers.__version__,
               "rounds": args.rounds, "configs": {name: compare(name, args) for name in args.configs.split(",")}}
    return report(summary, args.json_out, indent=2)


if __name__ == "__main__":
    main()
