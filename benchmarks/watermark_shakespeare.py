"""How strong a watermark must be on a small model: how soon it is detected, how rarely unmarked text is accused,
and what it costs the text.

lmforge's Shakespeare char recipe (configs/shakespeare-char.yaml) trains for --steps steps (or --run reuses a
run). From --prompts held-out prompts (line starts of the test split, which the model never trains on), --samples
continuations each of --new tokens are sampled with the demo's settings (temperature 0.8, top-k 40), without the
watermark and with it at each --biases value (one key). For each sample and each length T in --lengths, the
z-score of its first T tokens under the key (generate.watermark.detect, Hugging Face's detector), counting every
token or (_unique) each distinct pair of tokens once (ignore_repeated_ngrams: a character model repeats pairs such as
"e " so often that one pair's colour can sway the count):

    detected    the share of marked samples with z > 4 (true positives; Hugging Face's default threshold is 3)
    accused     the share of unmarked samples with z > 4 (false positives; about 3 in 100000 by chance)
    cost        the model's own mean negative log-likelihood per token of the samples (raw logits, nats), marked
                minus unmarked: how much less likely the mark makes the text to the model that wrote it

    python benchmarks/watermark_shakespeare.py --json-out benchmarks/results/watermark_shakespeare-cpu-X.json
    python benchmarks/watermark_shakespeare.py --quick     # 20 steps, few samples: a check that it runs
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))  # run from a checkout without installing

from lmforge.config import load_run_config  # noqa: E402
from lmforge.data.shards import load_split, read_manifest  # noqa: E402
from lmforge.eval.perplexity import evaluate_tokens  # noqa: E402
from lmforge.generate import GenerateConfig, load  # noqa: E402
from lmforge.generate.rows import prompt_ids  # noqa: E402
from lmforge.generate.watermark import detect  # noqa: E402
from lmforge.tokenizer import Tokenizer  # noqa: E402
from lmforge.train import Trainer  # noqa: E402
from lmforge.train.trainer import with_vocab_size  # noqa: E402
from machine import machine, report  # noqa: E402  (benchmarks/machine.py)
from quality_shakespeare import ensure_data  # noqa: E402  (the char Shakespeare shards, made once)

KEY, THRESHOLD = 20251202, 4.0
STRIDE = 16  # the cost's windows: every token read after at least 48 others (the context is 64)


def parse_args(argv: Optional[list[str]]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", default=str(ROOT / "data" / "shakespeare-char"))
    p.add_argument("--run", help="a trained run to use instead of training one")
    p.add_argument("--steps", type=int, default=2000)
    p.add_argument("--prompts", type=int, default=8)
    p.add_argument("--samples", type=int, default=8, help="continuations per prompt and setting")
    p.add_argument("--new", type=int, default=200, help="tokens per continuation")
    p.add_argument("--lengths", default="25,50,100,200", help="prefix lengths scored (comma-separated)")
    p.add_argument("--biases", default="0.5,1,2,4", help="watermark biases (comma-separated)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--quick", action="store_true", help="20 steps, 2 prompts x 2 samples of 60 tokens, bias 2")
    p.add_argument("--json-out", help="also write the summary here")
    args = p.parse_args(argv)
    if args.quick:
        args.steps, args.prompts, args.samples, args.new, args.lengths, args.biases = 20, 2, 2, 60, "30,60", "2"
    args.lengths = [int(x) for x in args.lengths.split(",")]
    args.biases = [float(x) for x in args.biases.split(",")]
    if max(args.lengths) > args.new or min(args.lengths) < 2:
        raise SystemExit("--lengths must lie between 2 and --new")
    return args


def prompts_from(text: str, n: int) -> list[str]:
    """n line starts of at least 30 characters, spread evenly over `text`."""
    lines = [line for line in text.splitlines() if len(line) >= 30]
    return [lines[i * len(lines) // n][:30] for i in range(n)]


def nll_per_token(model: Any, start: list[int], new: list[int]) -> float:
    """The model's mean negative log-likelihood (nats) of the tokens `new` after `start`, from its raw logits, each
    token read after at least block_size - STRIDE tokens before it (eval.perplexity's sliding windows: the samples
    are longer than the model's context): the loss of the whole text minus that of `start` alone (which one window
    predicts the same way in both)."""
    block = model.config.block_size
    whole = evaluate_tokens(model, np.array(start + new), block, stride=STRIDE)["loss_sum"]
    return (whole - evaluate_tokens(model, np.array(start), block, stride=STRIDE)["loss_sum"]) / len(new)


def main(argv: Optional[list[str]] = None) -> dict[str, Any]:
    args = parse_args(argv)
    data = Path(args.data)
    ensure_data(data)
    torch.set_num_threads(args.threads)
    here = machine()
    tokenizer = Tokenizer.load(data / "tokenizer.json")
    prompts = prompts_from(tokenizer.decode(load_split(data, "test").tolist()), args.prompts)
    with tempfile.TemporaryDirectory(prefix="watermark_shakespeare-") as work:
        run, seconds = args.run, None
        if run is None:
            run = str(Path(work) / "run")
            config = load_run_config("shakespeare-char", {
                "data.path": str(data), "train.run_dir": run, "train.max_steps": str(args.steps),
                "train.eval_interval": str(args.steps), "train.save_interval": "0", "train.resume": "none",
                "train.num_threads": str(args.threads), "train.plot": "false", "train.device": "cpu"})
            started = time.perf_counter()
            Trainer(with_vocab_size(config, int(read_manifest(data)["vocab_size"])), progress=False,
                    tensorboard=False).fit()
            seconds = round(time.perf_counter() - started, 1)
        gen = load(run, device="cpu")
    vocab = gen.model.config.vocab_size
    base = dict(max_new_tokens=args.new, temperature=0.8, top_k=40, num_return_sequences=args.samples,
                suppress_tokens=[gen.tokenizer.end_id])  # (every sample as long as asked)
    settings: dict[str, dict] = {"none": {}}
    settings.update({f"bias {b:g}": dict(watermark=True, watermark_bias=b, watermark_key=KEY) for b in args.biases})
    mark = GenerateConfig(watermark=True, watermark_key=KEY).watermark_settings  # what the detector is told
    results: dict[str, dict] = {}
    started = time.perf_counter()
    for name, options in settings.items():
        zs: dict[int, list[float]] = {t: [] for t in args.lengths}
        unique: dict[int, list[float]] = {t: [] for t in args.lengths}  # each repeated pair of tokens once
        nll = []
        for p, prompt in enumerate(prompts):
            for c in gen.complete([prompt], seed=p, **base, **options)[0]:
                for t in args.lengths:
                    zs[t].append(detect(c.token_ids[:t], vocab, mark)["z_score"])
                    unique[t].append(detect(c.token_ids[:t], vocab, mark, ignore_repeated_ngrams=True)["z_score"])
                nll.append(nll_per_token(gen.model, prompt_ids(gen.tokenizer, prompt), c.token_ids))
        results[name] = {
            "over_threshold": {str(t): round(sum(z > THRESHOLD for z in zs[t]) / len(zs[t]), 4) for t in zs},
            "median_z": {str(t): round(statistics.median(zs[t]), 2) for t in zs},
            "over_threshold_unique": {str(t): round(sum(z > THRESHOLD for z in unique[t]) / len(unique[t]), 4)
                                      for t in unique},
            "median_z_unique": {str(t): round(statistics.median(unique[t]), 2) for t in unique},
            "nll_per_token": round(statistics.fmean(nll), 4)}
    for name in settings:
        results[name]["nll_cost"] = round(results[name]["nll_per_token"] - results["none"]["nll_per_token"], 4)
    summary = {
        "benchmark": "watermark_shakespeare", "machine": here, "recipe": "shakespeare-char",
        "train_steps": None if args.run else args.steps, "train_seconds": seconds, "run": args.run,
        "prompts": len(prompts), "samples_per_setting": len(prompts) * args.samples, "new_tokens": args.new,
        "sampling": {"temperature": 0.8, "top_k": 40}, "greenlist_ratio": mark.greenlist_ratio,
        "z_threshold": THRESHOLD, "example_prompt": prompts[0], "results": results,
        "generate_and_score_seconds": round(time.perf_counter() - started, 1),
    }
    return report(summary, args.json_out)


if __name__ == "__main__":
    main()
