"""Requests of several LoRA runs in one batched decode on the CPU (what `lmforge serve --lora-modules` does up to
--max-loras sets a decode), against one decode per run, and against peft's mixed-batch inference (generate with
adapter_names) and its one-adapter-at-a-time decoding, in one process.

The base is Llama-shaped (--layers x --width, SwiGLU, RoPE, RMSNorm, an untied --vocab head) with random weights,
exported to a transformers LlamaForCausalLM by lmforge's HF exporter; --sets adapters (r=--rank on q, k, v and o,
random A and B) are written as PEFT adapters by lmforge's PEFT exporter, which peft loads by name. --batch rows,
row i decoding with set i mod --sets, each its own 8-token prompt (no padding). The variants:

- lmforge-mixed: all rows in one decode, each with its own set (generate_batch_ids(adapters=...): the server's
  decode of a batch that mixes runs).
- lmforge-per-set: the rows of each set in a decode of their own, one set after another (--max-loras 1).
- lmforge-mixed-int8: lmforge-mixed over the base's Linear layers in int8 (--quantize int8; the adapters fp32).
- peft-mixed: PeftModel.generate(adapter_names=...) over all rows (peft's mixed adapter batches).
- peft-per-set: set_adapter(name), then generate the rows of that set, one set after another.

Each generates --new-tokens greedy tokens with no end token on --threads threads; the variants alternate over
--rounds (the order reversed every other round) after one untimed warm-up each, and the medians are reported with
tokens/s and each one's ratio to lmforge-mixed. Every row's greedy tokens are compared with lmforge-per-set's (the
same weights: equal up to float rounding, so equal prefixes; int8's weights are rounded, its tokens may part).

    python benchmarks/lora_mixed.py --json-out benchmarks/results/lora_mixed-cpu.json
    python benchmarks/lora_mixed.py --layers 2 --width 64 --heads 4 --kv-heads 2 --vocab 512 --new-tokens 16  # quick
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

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))  # run from a checkout without installing

from safetensors.torch import save_file  # noqa: E402

from lmforge.checkpoint import save_checkpoint  # noqa: E402
from lmforge.config import LoRAConfig, ModelConfig, RunConfig  # noqa: E402
from lmforge.generate import GenerateConfig, generate_batch_ids  # noqa: E402
from lmforge.generate.quantize import apply_inference_dtype  # noqa: E402
from lmforge.interop.hf_export import export_hf  # noqa: E402
from lmforge.interop.peft_export import CONFIG, WEIGHTS, peft_adapter_files  # noqa: E402
from lmforge.lora import Adapter, add_adapter_set, apply_lora, lora_state_dict  # noqa: E402
from lmforge.model import GPT  # noqa: E402
from lora_decode import timed_decodes  # noqa: E402  (benchmarks/lora_decode.py)
from machine import libraries, machine, report  # noqa: E402  (benchmarks/machine.py)

VARIANTS = ("lmforge-mixed", "lmforge-per-set", "peft-mixed", "peft-per-set", "lmforge-mixed-int8")
PROMPT_TOKENS = 8


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--layers", type=int, default=6)
    p.add_argument("--width", type=int, default=512, help="n_embd")
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--kv-heads", type=int, default=4)
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--sets", type=int, default=4, help="LoRA runs the rows are spread over")
    p.add_argument("--batch", type=int, default=8, help="rows decoded")
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--json-out", default=None, help="also write the JSON summary to this file")
    return p.parse_args(argv)


def build(root: Path, args: argparse.Namespace) -> tuple[GPT, GPT, torch.nn.Module, list[str]]:
    """(lmforge's base with every set added, the same on int8 layers, peft's PeftModel with every adapter loaded,
    the set names)."""
    import peft
    import transformers

    config = ModelConfig(vocab_size=args.vocab, block_size=PROMPT_TOKENS + args.new_tokens, n_layer=args.layers,
                         n_head=args.heads, n_kv_head=args.kv_heads, n_embd=args.width, norm="rmsnorm", mlp="swiglu",
                         pos_encoding="rope", bias=False, tie_embeddings=False, dropout=0.0)
    torch.manual_seed(0)
    base = GPT(config).eval()
    ckpt = save_checkpoint(root / "base", 0, base, None, RunConfig(model=config), {"tokens_seen": 0})
    hf_dir = export_hf(ckpt, root / "hf")
    lora = LoRAConfig(r=args.rank, alpha=2.0 * args.rank, targets=["q", "k", "v", "o"])
    served, names, theirs = copy.deepcopy(base), [f"s{k}" for k in range(args.sets)], None
    int8 = apply_inference_dtype(copy.deepcopy(base), quantize="int8")  # quantized first, as lmforge serve does
    for name in names:
        adapted = apply_lora(copy.deepcopy(base), lora)
        with torch.no_grad():
            for adapter in (m for m in adapted.modules() if isinstance(m, Adapter)):
                adapter.B.normal_(0.0, 0.02)  # B = 0 would leave the base's text
        files = peft_adapter_files(adapted, lora)
        (root / name).mkdir()
        (root / name / CONFIG).write_text(json.dumps(files[CONFIG]))
        save_file(files[WEIGHTS], str(root / name / WEIGHTS))
        for model in (served, int8):
            add_adapter_set(model, name, lora, {k: v.detach().clone() for k, v in lora_state_dict(adapted).items()})
        if theirs is None:
            hf = transformers.AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32,
                                                                   attn_implementation="sdpa")
            theirs = peft.PeftModel.from_pretrained(hf, root / name, adapter_name=name)
        else:
            theirs.load_adapter(root / name, adapter_name=name)
    return served, int8, theirs.eval(), names


def runner(variant: str, served: GPT, int8: GPT, theirs: torch.nn.Module, prompts: list[list[int]],
           rows: list[str], new: int) -> Callable[[], list[list[int]]]:
    """A function decoding every row with its set, returning each row's new tokens in row order."""
    config = GenerateConfig(max_new_tokens=new, temperature=0.0)
    groups = {name: [i for i, n in enumerate(rows) if n == name] for name in dict.fromkeys(rows)}

    def ours_mixed(model: GPT = served) -> list[list[int]]:
        return [seqs[0] for seqs in generate_batch_ids(model, prompts, config, adapters=rows)]

    def ours_per_set() -> list[list[int]]:
        out: list[list[int]] = [[] for _ in rows]
        for name, index in groups.items():
            for i, seqs in zip(index, generate_batch_ids(served, [prompts[i] for i in index], config,
                                                         adapters=[name] * len(index))):
                out[i] = seqs[0]
        return out

    def hf(ids: list[list[int]], **extra) -> list[list[int]]:
        x = torch.tensor(ids)
        with torch.inference_mode():
            out = theirs.generate(input_ids=x, attention_mask=torch.ones_like(x), max_new_tokens=new,
                                  min_new_tokens=new, do_sample=False, eos_token_id=None, pad_token_id=0, **extra)
        return out[:, PROMPT_TOKENS:].tolist()

    def theirs_mixed() -> list[list[int]]:
        return hf(prompts, adapter_names=rows)

    def theirs_per_set() -> list[list[int]]:
        out: list[list[int]] = [[] for _ in rows]
        for name, index in groups.items():
            theirs.set_adapter(name)
            for i, tokens in zip(index, hf([prompts[i] for i in index])):
                out[i] = tokens
        return out

    return {"lmforge-mixed": ours_mixed, "lmforge-per-set": ours_per_set, "peft-mixed": theirs_mixed,
            "peft-per-set": theirs_per_set, "lmforge-mixed-int8": lambda: ours_mixed(int8)}[variant]


def measure(served: GPT, int8: GPT, theirs: torch.nn.Module, names: list[str], args: argparse.Namespace) -> dict:
    generator = torch.Generator().manual_seed(1)
    prompts = torch.randint(1, min(args.vocab, 1000), (args.batch, PROMPT_TOKENS), generator=generator).tolist()
    rows = [names[i % len(names)] for i in range(args.batch)]
    runners = {v: runner(v, served, int8, theirs, prompts, rows, args.new_tokens) for v in VARIANTS}
    out = {"batch": args.batch, "sets": len(names), **timed_decodes(runners, args.batch, args.new_tokens, args.rounds,
                                                                    "lmforge-mixed", "lmforge-per-set")}
    print(json.dumps(out), flush=True)
    return out


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    import peft
    import transformers

    here = machine()
    print(libraries(here, transformers=transformers.__version__, peft=peft.__version__), flush=True)
    with tempfile.TemporaryDirectory(prefix="lora-mixed-") as tmp:
        served, int8, theirs, names = build(Path(tmp), args)
        result = measure(served, int8, theirs, names, args)
    summary = {"benchmark": "lora_mixed", "machine": here, "transformers": transformers.__version__,
               "peft": peft.__version__, "model": {"layers": args.layers, "width": args.width, "heads": args.heads,
                                                   "kv_heads": args.kv_heads, "vocab": args.vocab},
               "rank": args.rank, "targets": "q,k,v,o", "new_tokens": args.new_tokens, "prompt_tokens": PROMPT_TOKENS,
               "rounds": args.rounds, "results": [result]}
    return report(summary, args.json_out, indent=2)


if __name__ == "__main__":
    main()
