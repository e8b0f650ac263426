"""A LoRA (and DoRA) training step: lmforge's Trainer against Hugging Face transformers + peft on the same model (CPU).

The model is Llama-shaped (12 layers, 768 wide, 12 heads, 4 key/value heads, SwiGLU, RoPE, RMSNorm, a 32,000-token
untied head: about 135M weights) with random weights, built once by lmforge and exported to a transformers
LlamaForCausalLM by `lmforge export --format hf`'s exporter, so both sides hold the same weights (checked:
the logits of one sequence agree within 1e-4). Llama's q_proj, k_proj, v_proj and o_proj are separate modules,
so lmforge's targets q,k,v,o and peft's target_modules are the same adapters: r=8, alpha=16, the same number of
trained weights (checked).

- lmforge: the Trainer `lmforge train --train.init_from BASE --lora.r 8 --lora.targets q,k,v,o` builds (with
  --lora.dora true for DoRA), timed through Trainer.train_step: forward, the loss (the head fused with it, chunk by
  chunk: lmforge's default), backward, clipping to 1.0, AdamW.
- peft: get_peft_model(LlamaForCausalLM, LoraConfig(r=8, lora_alpha=16, target_modules=q/k/v/o_proj, use_dora))
  in train mode; a step is model(input_ids, labels) (transformers' loss over the whole logits), backward,
  clip_grad_norm_ to 1.0 and torch's AdamW over the trained weights: what transformers' Trainer runs per step.

Both train on the same random token sequences (--seq tokens predicted per sequence, --batch sequences), with
dropout 0. The variants alternate over --rounds in one process, so a change in the machine's load falls on all;
each round's first step is a warm-up and is not timed. Reported: the median step time of each, and lmforge's
speed-up over peft for LoRA and for DoRA (peft's time / lmforge's).

    python benchmarks/lora_step.py --json-out benchmarks/results/lora_step-cpu.json
    python benchmarks/lora_step.py --layers 2 --width 64 --heads 4 --kv-heads 2 --vocab 512 --seq 32   # quick
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))  # run from a checkout without installing

from lmforge.checkpoint import save_checkpoint  # noqa: E402
from lmforge.config import ModelConfig, RunConfig, load_run_config  # noqa: E402
from lmforge.data.batches import TokenBatches  # noqa: E402
from lmforge.interop.hf_export import export_hf  # noqa: E402
from lmforge.model import GPT  # noqa: E402
from lmforge.train import Trainer  # noqa: E402
from machine import machine, report  # noqa: E402  (benchmarks/machine.py)

VARIANTS = ("lmforge-lora", "peft-lora", "lmforge-dora", "peft-dora")
R, ALPHA = 8, 16
HF_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj"]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--layers", type=int, default=12)
    p.add_argument("--width", type=int, default=768, help="n_embd")
    p.add_argument("--heads", type=int, default=12)
    p.add_argument("--kv-heads", type=int, default=4)
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--seq", type=int, default=256, help="tokens predicted per sequence")
    p.add_argument("--batch", type=int, default=2, help="sequences per step")
    p.add_argument("--steps", type=int, default=4, help="timed steps per variant and round")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--json-out", default=None, help="also write the JSON summary to this file")
    return p.parse_args(argv)


def model_config(args: argparse.Namespace) -> ModelConfig:
    return ModelConfig(vocab_size=args.vocab, block_size=max(args.seq + 1, 64), n_layer=args.layers,
                       n_head=args.heads, n_kv_head=args.kv_heads, n_embd=args.width, norm="rmsnorm", mlp="swiglu",
                       pos_encoding="rope", bias=False, tie_embeddings=False, dropout=0.0)


def write_base(root: Path, config: ModelConfig) -> tuple[Path, Path]:
    """The base as an lmforge checkpoint and as the transformers directory `lmforge export --format hf` writes."""
    torch.manual_seed(0)
    ckpt = save_checkpoint(root / "base", 0, GPT(config), None, RunConfig(model=config), {"tokens_seen": 0})
    return ckpt, export_hf(ckpt, root / "hf")


def lmforge_variant(ckpt: Path, root: Path, tokens: np.ndarray, args: argparse.Namespace, dora: bool):
    """(step function, the trained model, trained weights) of lmforge's Trainer with LoRA (or DoRA) on the base."""
    values = {"train.init_from": str(ckpt), "train.run_dir": str(root / f"run-{dora}"), "train.device": "cpu",
              "train.batch_size": args.batch, "train.max_steps": 10 ** 6, "train.save_interval": 0,
              "train.eval_interval": 0, "train.log_interval": 10 ** 6, "train.plot": False,
              "train.num_threads": args.threads, "optim.lr": 1e-4, "optim.warmup_steps": 0, "optim.weight_decay": 0.0,
              "lora.r": R, "lora.alpha": ALPHA, "lora.targets": "q,k,v,o", "lora.dora": dora}
    config = load_run_config(None, {k: str(v) for k, v in values.items()})
    data = TokenBatches(tokens, args.seq, args.batch, seed=0)
    trainer = Trainer(config, train_data=data, val_batches=[], progress=False, tensorboard=False)

    def step() -> None:
        trainer.train_step()
        trainer.step += 1

    trained = sum(p.numel() for p in trainer.raw_model.parameters() if p.requires_grad)
    return step, trainer.raw_model, trained


def peft_variant(hf: Path, tokens: np.ndarray, args: argparse.Namespace, dora: bool):
    """(step function, the PeftModel, trained weights): transformers' forward with labels, backward, clipping, AdamW."""
    import peft
    import transformers

    base = transformers.AutoModelForCausalLM.from_pretrained(hf, dtype=torch.float32, attn_implementation="sdpa")
    model = peft.get_peft_model(base, peft.LoraConfig(r=R, lora_alpha=ALPHA, lora_dropout=0.0, use_dora=dora,
                                                      target_modules=HF_TARGETS, task_type="CAUSAL_LM"))
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4, weight_decay=0.0)
    rng = np.random.default_rng(1)
    n = args.seq + 1

    def step() -> None:
        starts = rng.integers(0, len(tokens) - n, size=args.batch)
        ids = torch.from_numpy(np.stack([tokens[s:s + n] for s in starts]).astype(np.int64))
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step, model, sum(p.numel() for p in params)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    config = model_config(args)
    tokens = np.random.default_rng(0).integers(0, args.vocab, size=200_000).astype(np.uint32)
    with tempfile.TemporaryDirectory(prefix="lora-step-") as tmp:
        root = Path(tmp)
        ckpt, hf = write_base(root, config)
        built = {}
        for variant in VARIANTS:
            dora = variant.endswith("dora")
            built[variant] = (lmforge_variant(ckpt, root, tokens, args, dora) if variant.startswith("lmforge")
                              else peft_variant(hf, tokens, args, dora))
        ids = torch.from_numpy(tokens[:64].astype(np.int64))[None]
        with torch.no_grad():  # the same model on both sides (adapters start at zero: the base)
            ours = built["lmforge-lora"][1].eval()(ids)
            theirs = built["peft-lora"][1].eval()(input_ids=ids).logits
        same_logits = float((ours - theirs).abs().max())
        for _, model, _ in built.values():
            model.train()
        assert same_logits <= 1e-4, same_logits
        trained = {variant: built[variant][2] for variant in VARIANTS}
        assert trained["lmforge-lora"] == trained["peft-lora"] and trained["lmforge-dora"] == trained["peft-dora"], \
            trained
        times: dict[str, list[float]] = {variant: [] for variant in VARIANTS}
        for _ in range(args.rounds):
            for variant in VARIANTS:
                step = built[variant][0]
                step()  # warm-up
                for _ in range(args.steps):
                    start = time.perf_counter()
                    step()
                    times[variant].append(time.perf_counter() - start)
    median = {variant: statistics.median(t) for variant, t in times.items()}
    summary = {
        "benchmark": "lora_step", "machine": machine(),
        "settings": {k: v for k, v in vars(args).items() if k != "json_out"},
        "model": {"parameters": sum(p.numel() for p in GPT.shapes(config).parameters()), "layers": args.layers,
                  "width": args.width, "vocab": args.vocab},
        "trained_parameters": trained, "max_abs_logit_difference_at_start": same_logits,
        "median_step_seconds": median, "step_seconds": times,
        "speedup_over_peft": {"lora": median["peft-lora"] / median["lmforge-lora"],
                              "dora": median["peft-dora"] / median["lmforge-dora"]},
        "dora_cost_over_lora": {"lmforge": median["lmforge-dora"] / median["lmforge-lora"],
                                "peft": median["peft-dora"] / median["peft-lora"]},
    }
    return report(summary, args.json_out)


if __name__ == "__main__":
    main()
