"""QLoRA's training step on the CPU: lmforge's lora.quantize nf4 against peft on transformers' 4-bit load
(bitsandbytes' Linear4bit), beside LoRA on the base in full for both, in one process on the same Llama-style model.

The model has --layers blocks of width --width (random weights, untied head, vocabulary --vocab); adapters of rank
--rank on every matrix of the blocks (q, k, v, o and the MLP's; peft: q_proj ... down_proj). A step is a forward of
--batch x --seq random tokens, the next-token cross-entropy, its backward and AdamW's update of the adapters. Each
variant's step is timed over --rounds rounds (the order reversed every other round; a warm-up step first), median
reported with its ratio to lmforge's QLoRA step. Also reported: the bytes the blocks' matrices are stored in
(4-bit: packed values and maxima) and each variant's first loss (B = 0: the base's), whose differences say whose
4-bit base computes what.

    python benchmarks/qlora.py --json-out benchmarks/results/qlora-cpu.json
    python benchmarks/qlora.py --layers 1 --width 128 --rounds 1   # quick
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import tempfile
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))  # run from a checkout without installing

from lmforge.checkpoint import save_checkpoint  # noqa: E402
from lmforge.config import LoRAConfig, ModelConfig, RunConfig  # noqa: E402
from lmforge.interop.hf_export import export_hf  # noqa: E402
from lmforge.lora import apply_lora, lora_parameters  # noqa: E402
from lmforge.model import GPT  # noqa: E402
from lmforge.nf4 import NF4Linear  # noqa: E402
from machine import alternating_medians, libraries, machine, report  # noqa: E402  (benchmarks/machine.py)

HF = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--width", type=int, default=1024, help="n_embd (heads of 64)")
    p.add_argument("--vocab", type=int, default=4096)
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--json-out", default=None, help="also write the JSON summary to this file")
    return p.parse_args(argv)


def stepper(model: torch.nn.Module, params: list[torch.nn.Parameter], ids: torch.Tensor,
            logits: Callable[[torch.Tensor], torch.Tensor]) -> tuple[Callable[[], float], float]:
    """(one training step, returning its loss; the loss before any step)."""
    optimizer = torch.optim.AdamW(params, lr=1e-4)
    model.train()

    def step() -> float:
        out = logits(ids[:, :-1])
        loss = F.cross_entropy(out.reshape(-1, out.size(-1)), ids[:, 1:].reshape(-1))
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return float(loss)

    with torch.no_grad():
        out = logits(ids[:, :-1])
        first = float(F.cross_entropy(out.reshape(-1, out.size(-1)), ids[:, 1:].reshape(-1)))
    return step, first


def ours(base: GPT, args: argparse.Namespace, ids: torch.Tensor, quantize: str | None) -> tuple:
    lora = LoRAConfig(r=args.rank, alpha=2.0 * args.rank, dropout=0.0, targets=["q", "k", "v", "o", "mlp"],
                      quantize=quantize)
    model = apply_lora(copy.deepcopy(base), lora)
    stored = sum(t.numel() * t.element_size() for m in model.blocks.modules() if isinstance(m, NF4Linear)
                 for t in m.buffers()) if quantize else sum(
        m.weight.numel() * m.weight.element_size() for m in model.blocks.modules() if hasattr(m, "lora"))
    return (*stepper(model, lora_parameters(model), ids, model), stored)


def theirs(hf_dir: Path, args: argparse.Namespace, ids: torch.Tensor, quantize: bool) -> tuple:
    import bitsandbytes as bnb
    import peft
    import transformers

    options = {"quantization_config": transformers.BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32), "device_map": "cpu"} \
        if quantize else {"dtype": torch.float32}
    hf = transformers.AutoModelForCausalLM.from_pretrained(hf_dir, **options)
    config = peft.LoraConfig(r=args.rank, lora_alpha=2.0 * args.rank, lora_dropout=0.0, target_modules=HF)
    model = peft.get_peft_model(hf, config)
    layers = [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)] if quantize else [
        m.base_layer for m in model.modules() if isinstance(m, peft.tuners.lora.Linear)]
    stored = sum(m.weight.numel() * m.weight.element_size() for m in layers)
    if quantize:
        stored += sum(m.weight.quant_state.absmax.numel() * 4 for m in layers)
    params = [p for p in model.parameters() if p.requires_grad]
    return (*stepper(model, params, ids, lambda x: model(x).logits), stored)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    import bitsandbytes
    import peft
    import transformers

    here = machine()
    print(libraries(here, transformers=transformers.__version__, peft=peft.__version__,
                    bitsandbytes=bitsandbytes.__version__), flush=True)
    config = ModelConfig(vocab_size=args.vocab, block_size=args.seq, n_layer=args.layers, n_head=args.width // 64,
                         n_kv_head=args.width // 64, n_embd=args.width, norm="rmsnorm", mlp="swiglu",
                         pos_encoding="rope", bias=False, tie_embeddings=False)
    torch.manual_seed(0)
    base = GPT(config).eval()
    ids = torch.randint(0, args.vocab, (args.batch, args.seq + 1), generator=torch.Generator().manual_seed(1))
    with tempfile.TemporaryDirectory(prefix="qlora-") as tmp:
        ckpt = save_checkpoint(Path(tmp) / "base", 0, base, None, RunConfig(model=config), {"tokens_seen": 0})
        hf_dir = export_hf(ckpt, Path(tmp) / "hf")
        built = {"lmforge-qlora": ours(base, args, ids, "nf4"), "peft-qlora": theirs(hf_dir, args, ids, True),
                 "lmforge-lora": ours(base, args, ids, None), "peft-lora": theirs(hf_dir, args, ids, False)}
    for step, _, _ in built.values():  # warm-up
        step()
    median = alternating_medians({name: step for name, (step, _, _) in built.items()}, args.rounds)
    first = {name: loss for name, (_, loss, _) in built.items()}
    summary = {"benchmark": "qlora", "machine": here, "transformers": transformers.__version__,
               "peft": peft.__version__, "bitsandbytes": bitsandbytes.__version__, "layers": args.layers,
               "width": args.width, "vocab": args.vocab, "rank": args.rank, "batch": args.batch, "seq": args.seq,
               "rounds": args.rounds,
               "step_seconds": {n: round(v, 3) for n, v in median.items()},
               "step_vs_lmforge_qlora": {n: round(v / median["lmforge-qlora"], 3) for n, v in median.items()},
               "block_matrix_bytes": {n: stored for n, (_, _, stored) in built.items()},
               "first_loss": {n: round(v, 6) for n, v in first.items()},
               "first_loss_gap_qlora": round(abs(first["lmforge-qlora"] - first["peft-qlora"]), 6),
               "first_loss_gap_4bit_vs_full": round(abs(first["lmforge-qlora"] - first["lmforge-lora"]), 6)}
    print(json.dumps({k: summary[k] for k in ("step_seconds", "step_vs_lmforge_qlora", "block_matrix_bytes")}))
    return report(summary, args.json_out, indent=2)


if __name__ == "__main__":
    main()
