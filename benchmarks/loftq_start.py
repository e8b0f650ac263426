"""LoftQ's start against QLoRA's on a trained model: how far each one's start is from the base in full.

The base is a trained run (--base; `benchmarks/bf16_speed.py quality` leaves a 2000-step Shakespeare char model), its
val split (--data) scored over its first --tokens tokens (lmforge.eval.perplexity.evaluate_tokens) for: the base in
full; QLoRA's start (lora.quantize nf4: the 4-bit base, B = 0, so the base as 4 bits hold it); LoftQ's start
(lora.init loftq) for each rank in --ranks and each step count in --iters. Adapters on every block matrix (q, k, v, o,
mlp), alpha = r. Reported per variant: the loss; the mean KL divergence of its next-token distribution from the base's
in full, KL(full || variant) per token (what "nearer the base" means: the loss alone can even drop a little when 4
bits perturb a small model); the relative error of the adapted block weights, ||W - (Q + s B A)|| / ||W|| over all of
them; the seconds apply_lora took (LoftQ's SVDs). `kl_vs_qlora` is each LoftQ start's KL over QLoRA's.

    python benchmarks/loftq_start.py --base runs/bf16-speed/quality-bf16-compute \\
        --json-out benchmarks/results/loftq_start-cpu.json
"""

from __future__ import annotations

import argparse
import copy
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))  # run from a checkout without installing

from lmforge.checkpoint import load_for_inference  # noqa: E402
from lmforge.config import LoRAConfig  # noqa: E402
from lmforge.data.shards import load_split  # noqa: E402
from lmforge.eval.perplexity import evaluate_tokens  # noqa: E402
from lmforge.lora import LoRALinear, apply_lora  # noqa: E402
from machine import libraries, machine, report  # noqa: E402  (benchmarks/machine.py)

TARGETS = ["q", "k", "v", "o", "mlp"]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--base", required=True, help="a trained run directory (or checkpoint)")
    p.add_argument("--data", default=str(ROOT / "data" / "shakespeare-char"), help="its prepared dataset")
    p.add_argument("--tokens", type=int, default=65536, help="val tokens to score (from the start of the split)")
    p.add_argument("--ranks", default="8,32", help="comma-separated adapter ranks")
    p.add_argument("--iters", default="1,2,5", help="comma-separated LoftQ step counts (lora.loftq_iter)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--json-out", default=None, help="also write the JSON summary to this file")
    return p.parse_args(argv)


def weight_error(model: torch.nn.Module, full: torch.nn.Module) -> float:
    """||W - W'|| / ||W|| over every adapted block matrix, W' = the 4-bit weight plus s B A."""
    lost = total = 0.0
    for name, layer in model.named_modules():
        if isinstance(layer, LoRALinear):
            w = full.get_submodule(name).weight.detach().float()
            approx = layer.frozen_weight().clone()
            for adapter in layer.lora.values():
                approx[adapter.start:adapter.start + adapter.size] += layer.scale * adapter.delta()
            lost += float((w - approx).square().sum())
            total += float(w.square().sum())
    return (lost / total) ** 0.5


def windows(tokens, block: int, batch: int = 16):
    """Batches (B, block) of consecutive, non-overlapping windows of `tokens` (a last partial window dropped)."""
    rows = torch.as_tensor(tokens[:len(tokens) // block * block].astype("int64")).view(-1, block)
    return rows.split(batch)


def kl_from(full_logprobs: list[torch.Tensor], model: torch.nn.Module, batches) -> float:
    """Mean over positions of KL(full || model): sum_v p_full (log p_full - log p_model)."""
    total = count = 0.0
    with torch.no_grad():
        for reference, x in zip(full_logprobs, batches):
            logprobs = F.log_softmax(model(x).float(), dim=-1)
            total += float((reference.exp() * (reference - logprobs)).sum())
            count += reference.shape[0] * reference.shape[1]
    return total / count


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    here = machine()
    print(libraries(here), flush=True)
    full, _, config = load_for_inference(args.base, "cpu")
    tokens = load_split(Path(args.data), "val")[:args.tokens]
    block = config.model.block_size

    def score(model: torch.nn.Module) -> float:
        with torch.no_grad():
            return round(evaluate_tokens(model.eval(), tokens, block)["loss"], 5)

    batches = windows(tokens, block)
    with torch.no_grad():
        reference = [F.log_softmax(full.eval()(x).float(), dim=-1) for x in batches]
    summary: dict = {"benchmark": "loftq_start", "machine": here, "base": str(args.base), "tokens": len(tokens),
                     "targets": TARGETS, "loss": {"full": score(full)}, "kl_from_full": {}, "weight_error": {},
                     "start_seconds": {}}
    variants = [("qlora", None, 1)] + [(f"loftq-r{r}-iter{n}", r, n) for r in map(int, args.ranks.split(","))
                                        for n in map(int, args.iters.split(","))]
    for name, r, iters in variants:
        lora = LoRAConfig(r=r or 8, alpha=float(r or 8), targets=TARGETS, quantize="nf4",
                          init="default" if r is None else "loftq", loftq_iter=iters)
        start = time.perf_counter()
        model = apply_lora(copy.deepcopy(full), lora)
        summary["start_seconds"][name] = round(time.perf_counter() - start, 3)
        summary["loss"][name] = score(model)
        summary["kl_from_full"][name] = round(kl_from(reference, model, batches), 7)
        summary["weight_error"][name] = round(weight_error(model, full), 6)
        print(name, summary["loss"][name], summary["kl_from_full"][name], summary["weight_error"][name], flush=True)
    kl = summary["kl_from_full"]
    summary["kl_vs_qlora"] = {name: round(value / kl["qlora"], 4) for name, value in kl.items() if name != "qlora"}
    return report(summary, args.json_out)


if __name__ == "__main__":
    main()
