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

    python benchmarks/generate_speed.py            # both configs, a few minutes on 2 busy cores
    python benchmarks/generate_speed.py --quick    # one round, 100 tokens: a check that it runs
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Callable

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))  # run from a checkout without installing

from lmforge.config import ModelConfig  # noqa: E402
from lmforge.generate import GenerateConfig, generate_ids  # noqa: E402
from lmforge.interop.hf_gpt2 import to_hf_config, to_hf_state_dict  # noqa: E402
from lmforge.model import GPT  # noqa: E402

CONFIGS = {
    "char-small": dict(vocab_size=96, block_size=512, n_layer=4, n_head=4, n_embd=128),
    "6l-384": dict(vocab_size=96, block_size=512, n_layer=6, n_head=6, n_embd=384),
}
MODES = {"greedy": dict(temperature=0.0), "sample": dict(temperature=1.0, top_k=50)}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--configs", default=",".join(CONFIGS), help=f"comma-separated, from {', '.join(CONFIGS)}")
    p.add_argument("--new-tokens", type=int, default=500, help="tokens generated per sequence")
    p.add_argument("--batch-sizes", default="1,16", help="comma-separated batch sizes")
    p.add_argument("--rounds", type=int, default=3, help="alternating rounds per comparison")
    p.add_argument("--threads", type=int, default=1, help="torch.set_num_threads for both; 0 = torch's default")
    p.add_argument("--quick", action="store_true", help="1 round of 100 tokens: a check that it runs")
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


def alternate(runners: dict[str, Callable], rounds: int) -> dict[str, list[float]]:
    """Seconds per call of each runner, per round; rounds alternate the order."""
    names = list(runners)
    for name in names:  # warm-up: allocator, oneDNN primitives
        runners[name]()
    seconds: dict[str, list[float]] = {name: [] for name in names}
    for r in range(rounds):
        for name in (names if r % 2 == 0 else names[::-1]):
            t0 = time.perf_counter()
            runners[name]()
            seconds[name].append(time.perf_counter() - t0)
    return seconds


def compare(name: str, args: argparse.Namespace) -> dict:
    config = ModelConfig(**CONFIGS[name], dropout=0.0, activation="gelu_tanh")
    ours, hf = build_pair(config)
    prompt = list(range(1, 9))
    new = args.new_tokens
    greedy_ours = lmforge_runner(ours, prompt, 1, new, MODES["greedy"])()[0]
    greedy_hf = hf_runner(hf, prompt, 1, new, MODES["greedy"])()[0]
    agree = next((i for i, (a, b) in enumerate(zip(greedy_ours, greedy_hf)) if a != b), len(greedy_ours))
    out = {"config": CONFIGS[name], "params": sum(p.numel() for p in ours.parameters()),
           "greedy_tokens_identical_prefix": agree, "new_tokens": new, "results": {}}
    print(f"[{name}] greedy outputs agree on the first {agree} of {new} tokens", flush=True)
    for batch in (int(b) for b in args.batch_sizes.split(",")):
        for mode_name, mode in MODES.items():
            secs = alternate({"lmforge": lmforge_runner(ours, prompt, batch, new, mode),
                              "hf": hf_runner(hf, prompt, batch, new, mode)}, args.rounds)
            ratios = [h / o for o, h in zip(secs["lmforge"], secs["hf"])]
            ours_tps = batch * new / statistics.median(secs["lmforge"])
            hf_tps = batch * new / statistics.median(secs["hf"])
            key = f"batch{batch}-{mode_name}"
            out["results"][key] = {"lmforge_tokens_per_s": round(ours_tps, 1), "hf_tokens_per_s": round(hf_tps, 1),
                                   "ratio": round(statistics.median(ratios), 2),
                                   "ratio_min": round(min(ratios), 2), "ratio_max": round(max(ratios), 2)}
            print(f"[{name}] {key:>15}: lmforge {ours_tps:8,.0f} tok/s   HF {hf_tps:8,.0f} tok/s   "
                  f"ratio {statistics.median(ratios):.2f}x ({min(ratios):.2f}..{max(ratios):.2f})", flush=True)
    return out


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    if args.quick:
        args.rounds, args.new_tokens = 1, 100
    if args.threads:
        torch.set_num_threads(args.threads)
    import transformers

    load = os.getloadavg()[0]
    print(f"torch {torch.__version__}, transformers {transformers.__version__}, threads {torch.get_num_threads()}, "
          f"load average {load:.2f}; block_size 512, prompt 8 tokens, {args.new_tokens} new tokens", flush=True)
    summary = {"benchmark": "generate_speed", "torch": torch.__version__, "transformers": transformers.__version__,
               "threads": torch.get_num_threads(), "load_average_before": round(load, 2), "rounds": args.rounds,
               "configs": {name: compare(name, args) for name in args.configs.split(",")}}
    print(json.dumps(summary))
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    return summary


if __name__ == "__main__":
    main()
