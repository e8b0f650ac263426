"""PiSSA's start on the CPU: the exact SVD against torch.svd_lowrank (lora.pissa_niter, peft's pissa_niter_K), for
lmforge's apply_lora and peft's get_peft_model on the same Llama-style model, in one process.

The model has --layers blocks of width --width (random weights, untied head); the adapters are rank --rank on q, k, v
and o (peft: q_proj, k_proj, v_proj, o_proj). Each variant builds the adapted model from a copy of the base, timed
over --rounds rounds (the order reversed every other round; the copy of the base is part of each), median reported
with its ratio to lmforge's exact start, and how close each start is to the best: the mean over the adapted matrices of
||W - s B0 A0||^2 / (the sum of W's squared singular values past r) - 1 (0 for the exact SVD, Eckart-Young).

    python benchmarks/pissa_init.py --json-out benchmarks/results/pissa_init-cpu.json
    python benchmarks/pissa_init.py --layers 1 --width 128 --rounds 1   # quick
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))  # run from a checkout without installing

from lmforge.checkpoint import save_checkpoint  # noqa: E402
from lmforge.config import LoRAConfig, ModelConfig, RunConfig  # noqa: E402
from lmforge.interop.hf_export import export_hf  # noqa: E402
from lmforge.lora import Adapter, LoRALinear, apply_lora  # noqa: E402
from lmforge.model import GPT  # noqa: E402
from machine import libraries, machine, report  # noqa: E402  (benchmarks/machine.py)

HF = ["q_proj", "k_proj", "v_proj", "o_proj"]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--width", type=int, default=1024, help="n_embd (heads of 64)")
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--niter", type=int, default=4, help="subspace iterations of the fast start")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--json-out", default=None, help="also write the JSON summary to this file")
    return p.parse_args(argv)


def excess(weight: torch.Tensor, delta: torch.Tensor, r: int) -> float:
    """||W - delta||^2 over the best rank-r residual, minus 1."""
    best = (torch.linalg.svdvals(weight.float())[r:] ** 2).sum()
    return float(torch.linalg.matrix_norm(weight.float() - delta) ** 2 / best - 1)


def ours(base: GPT, args: argparse.Namespace, niter: int | None) -> tuple[Callable, Callable]:
    """(build the adapted model: what is timed, the mean excess of a built model's starts)."""
    lora = LoRAConfig(r=args.rank, alpha=2.0 * args.rank, targets=["q", "k", "v", "o"], init="pissa",
                      pissa_niter=niter)

    def gap(model: GPT) -> float:
        return statistics.mean(excess(m.weight[a.start:a.start + a.size], m.scale * a.B0 @ a.A0, args.rank)
                               for m in model.modules() if isinstance(m, LoRALinear) for a in m.lora.values()
                               if isinstance(a, Adapter))

    return (lambda: apply_lora(copy.deepcopy(base), lora)), gap


def theirs(hf_dir: Path, args: argparse.Namespace, niter: int | None) -> tuple[Callable, Callable]:
    import peft
    import transformers

    hf = transformers.AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32)
    init = "pissa" if niter is None else f"pissa_niter_{niter}"
    config = peft.LoraConfig(r=args.rank, lora_alpha=2.0 * args.rank, target_modules=HF, init_lora_weights=init)

    original = {name: m.weight.detach().clone() for name, m in hf.named_modules() if name.endswith(tuple(HF))}

    def gap(model: torch.nn.Module) -> float:
        gaps = []
        for name, m in model.named_modules():  # peft's base is W - s B0 A0: W is the original
            if hasattr(m, "lora_A") and "default" in m.lora_A:
                delta = m.scaling["default"] * m.lora_B["default"].weight @ m.lora_A["default"].weight
                gaps.append(excess(original[name.removeprefix("base_model.model.")], delta.detach(), args.rank))
        return statistics.mean(gaps)

    return (lambda: peft.get_peft_model(copy.deepcopy(hf), config)), gap


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    import peft
    import transformers

    here = machine()
    print(libraries(here, transformers=transformers.__version__, peft=peft.__version__), flush=True)
    config = ModelConfig(vocab_size=256, block_size=64, n_layer=args.layers, n_head=args.width // 64,
                         n_kv_head=args.width // 64, n_embd=args.width, norm="rmsnorm", mlp="swiglu",
                         pos_encoding="rope", bias=False, tie_embeddings=False)
    torch.manual_seed(0)
    base = GPT(config).eval()
    with tempfile.TemporaryDirectory(prefix="pissa-init-") as tmp:
        ckpt = save_checkpoint(Path(tmp) / "base", 0, base, None, RunConfig(model=config), {"tokens_seen": 0})
        hf_dir = export_hf(ckpt, Path(tmp) / "hf")
        runs = {"lmforge-exact": ours(base, args, None), f"lmforge-niter-{args.niter}": ours(base, args, args.niter),
                "peft-exact": theirs(hf_dir, args, None), f"peft-niter-{args.niter}": theirs(hf_dir, args, args.niter)}
        seconds: dict[str, list[float]] = {name: [] for name in runs}
        gaps: dict[str, float] = {}
        for r in range(args.rounds):
            for name in (list(runs) if r % 2 == 0 else list(runs)[::-1]):
                build, gap = runs[name]
                t0 = time.perf_counter()
                model = build()
                seconds[name].append(time.perf_counter() - t0)
                gaps[name] = gap(model)  # (not timed: an exact SVD of each weight)
    median = {name: statistics.median(s) for name, s in seconds.items()}
    summary = {"benchmark": "pissa_init", "machine": here, "transformers": transformers.__version__,
               "peft": peft.__version__, "layers": args.layers, "width": args.width, "rank": args.rank,
               "niter": args.niter, "rounds": args.rounds,
               "seconds": {n: round(v, 3) for n, v in median.items()},
               "time_vs_lmforge_exact": {n: round(v / median["lmforge-exact"], 3) for n, v in median.items()},
               "excess_over_best_residual": {n: round(v, 6) for n, v in gaps.items()}}
    print(json.dumps({k: summary[k] for k in ("seconds", "time_vs_lmforge_exact", "excess_over_best_residual")}))
    return report(summary, args.json_out, indent=2)


if __name__ == "__main__":
    main()
