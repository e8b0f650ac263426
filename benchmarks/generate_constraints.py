"""What constraining decoding costs: lmforge against Hugging Face generate with the same logits processors.

Both models hold the same weights (random, copied with lmforge.interop.hf_gpt2) and continue the same 8-token
prompt by --new-tokens tokens, at batch 1 and batch 8 (the prompt 8 times; sampling: 8 samples of it),
under five settings:

    plain        greedy, nothing else
    penalties    greedy, repetition_penalty 1.2 and no_repeat_ngram_size 3
    bans         greedy, 20 bad word sequences (10 of one token, 10 of two), a logit bias on 10 tokens and
                 min_new_tokens = the whole budget (two end ids held back every step)
    filters      sampling: temperature 0.9, top_k 50, top_p 0.9, typical_p 0.95 (seeded; the two libraries draw
                 differently, so only the time compares)
    guidance     greedy, classifier-free guidance at scale 1.5 against each row's last prompt token (Hugging
                 Face's default unconditional side): lmforge decodes it as a second row of the batch, Hugging Face
                 with a second forward pass of its own each step

The vocabulary is 8192 tokens (a BPE tokenizer's size: the processors work on (batch, vocab) scores each step).
Rounds alternate between the libraries; medians are reported. For the greedy settings the tokens are compared
(same weights and processors: the same tokens, up to float rounding in near ties). Each library's cost of a
setting is its plain tokens/s over its tokens/s with the setting.

    python benchmarks/generate_constraints.py --json-out benchmarks/results/generate_constraints-cpu-amd-avx2.json
    python benchmarks/generate_constraints.py --quick    # one round, a small model: a check that it runs
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path
from typing import Callable

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))  # run from a checkout without installing

from lmforge.config import ModelConfig  # noqa: E402
from lmforge.generate import GenerateConfig, generate_batch_ids  # noqa: E402
from generate_speed import build_pair, first_difference  # noqa: E402  (benchmarks/generate_speed.py)
from machine import machine, report  # noqa: E402  (benchmarks/machine.py)

CONFIG = dict(vocab_size=8192, block_size=512, n_layer=6, n_head=6, n_embd=384)
QUICK = dict(vocab_size=2048, block_size=128, n_layer=2, n_head=2, n_embd=64)
END_IDS = [0, 1]  # bans: the end token and a stop token id, held back for the whole budget by min_new_tokens


def settings(new: int) -> dict[str, tuple[dict, dict]]:
    """{setting: (GenerateConfig fields, Hugging Face generate kwargs)} meaning the same thing."""
    bad = [[t] for t in range(100, 110)] + [[t, t + 1] for t in range(200, 220, 2)]
    bias = {t: (-2.0 if t % 2 else 1.5) for t in range(300, 310)}
    return {
        "plain": (dict(temperature=0.0), dict(do_sample=False)),
        "penalties": (dict(temperature=0.0, repetition_penalty=1.2, no_repeat_ngram_size=3),
                      dict(do_sample=False, repetition_penalty=1.2, no_repeat_ngram_size=3)),
        "bans": (dict(temperature=0.0, bad_words_ids=bad, logit_bias=bias, min_new_tokens=new,
                      stop_token_ids=END_IDS[1:]),
                 dict(do_sample=False, bad_words_ids=bad, sequence_bias=[[[t], b] for t, b in bias.items()],
                      min_new_tokens=new, eos_token_id=END_IDS)),
        "filters": (dict(temperature=0.9, top_k=50, top_p=0.9, typical_p=0.95, seed=0),
                    dict(do_sample=True, temperature=0.9, top_k=50, top_p=0.9, typical_p=0.95)),
        "guidance": (dict(temperature=0.0, guidance_scale=1.5), dict(do_sample=False, guidance_scale=1.5)),
    }


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--new-tokens", type=int, default=300, help="tokens generated per sequence")
    p.add_argument("--batch-sizes", default="1,8", help="comma-separated batch sizes")
    p.add_argument("--rounds", type=int, default=3, help="alternating rounds per comparison")
    p.add_argument("--threads", type=int, default=1, help="torch.set_num_threads for both; 0 = torch's default")
    p.add_argument("--quick", action="store_true", help="1 round, 40 tokens, a 2-layer model: a check that it runs")
    p.add_argument("--json-out", default=None, help="also write the JSON summary to this file")
    return p.parse_args(argv)


def runners(ours: torch.nn.Module, hf: torch.nn.Module, prompt: list[int], batch: int, new: int, options: dict,
            hf_options: dict) -> dict[str, Callable[[], list]]:
    """lmforge's and HF's decode of `batch` rows: the prompt repeated (greedy), or num_return_sequences samples."""
    sampling = hf_options["do_sample"]
    config = GenerateConfig(max_new_tokens=new, num_return_sequences=batch if sampling else 1, **options)
    ids = torch.tensor([prompt] * (1 if sampling else batch))
    end_id = END_IDS[0] if "eos_token_id" in hf_options else None
    prompts = [prompt] * (1 if sampling else batch)

    def theirs() -> list:
        with torch.inference_mode():
            out = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new, pad_token_id=0,
                              num_return_sequences=batch if sampling else 1, use_cache=True,
                              **{"eos_token_id": None, **hf_options})
        return out[:, len(prompt):].tolist()

    return {"lmforge": lambda: [r for rows in generate_batch_ids(ours, prompts, config, end_id=end_id) for r in rows],
            "hf": theirs}


def alternate(run: dict[str, Callable], rounds: int) -> tuple[dict[str, list[float]], dict[str, list]]:
    """(seconds per call of each runner per round, each runner's output); one untimed call first, then rounds that
    alternate the order."""
    outputs = {name: fn() for name, fn in run.items()}
    seconds: dict[str, list[float]] = {name: [] for name in run}
    for r in range(rounds):
        for name in (list(run) if r % 2 == 0 else list(run)[::-1]):
            t0 = time.perf_counter()
            run[name]()
            seconds[name].append(time.perf_counter() - t0)
    return seconds, outputs


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    if args.quick:
        args.rounds, args.new_tokens, args.batch_sizes = 1, 40, "1,2"
    if args.threads:
        torch.set_num_threads(args.threads)
    import transformers

    shape = QUICK if args.quick else CONFIG
    ours, hf = build_pair(ModelConfig(**shape, dropout=0.0, activation="gelu_tanh"))
    prompt, new = list(range(10, 18)), args.new_tokens
    here = machine()
    print(f"{here['cpu']}; torch {here['torch']}, transformers {transformers.__version__}, threads "
          f"{here['torch_threads']}, load average {here['load_average_at_start']}; {shape}, {new} new tokens",
          flush=True)
    results: dict[str, dict] = {}
    for batch in (int(b) for b in args.batch_sizes.split(",")):
        for name, (options, hf_options) in settings(new).items():
            secs, outputs = alternate(runners(ours, hf, prompt, batch, new, options, hf_options), args.rounds)
            tps = {lib: batch * new / statistics.median(s) for lib, s in secs.items()}
            ratios = [h / o for o, h in zip(secs["lmforge"], secs["hf"])]
            row = results[f"batch{batch}-{name}"] = {
                "lmforge_tokens_per_s": round(tps["lmforge"], 1), "hf_tokens_per_s": round(tps["hf"], 1),
                "ratio": round(statistics.median(ratios), 2), "ratio_min": round(min(ratios), 2),
                "ratio_max": round(max(ratios), 2),
                "lengths": sorted({len(r) for r in outputs["lmforge"]})}
            if options.get("seed") is None:  # greedy: the same tokens as Hugging Face's
                row["greedy_identical_prefix"] = [first_difference(a, b) for a, b in
                                                  zip(outputs["lmforge"], outputs["hf"])]
            plain = results[f"batch{batch}-plain"]
            for lib in ("lmforge", "hf"):
                row[f"{lib}_cost_vs_plain"] = round(plain[f"{lib}_tokens_per_s"] / row[f"{lib}_tokens_per_s"], 3)
            print(f"batch {batch:2d} {name:>9}: lmforge {tps['lmforge']:7,.0f} tok/s (x{row['lmforge_cost_vs_plain']:.2f}"
                  f" of plain)   HF {tps['hf']:7,.0f} tok/s (x{row['hf_cost_vs_plain']:.2f})   ratio "
                  f"{row['ratio']:.2f}x ({row['ratio_min']:.2f}..{row['ratio_max']:.2f})"
                  + (f"   same tokens as HF: {row['greedy_identical_prefix']}" if "greedy_identical_prefix" in row
                     else ""), flush=True)
    summary = {"benchmark": "generate_constraints", "machine": here, "transformers": transformers.__version__,
               "config": shape, "new_tokens": new, "rounds": args.rounds, "prompt_tokens": len(prompt),
               "results": results}
    return report(summary, args.json_out)


if __name__ == "__main__":
    main()
