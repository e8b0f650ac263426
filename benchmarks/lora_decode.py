"""Decoding with LoRA adapters on the CPU: what `lmforge serve --lora-modules` decodes with, against peft's unmerged
LoRA in transformers' generate, and against each one's merged model, in one process.

The base is Llama-shaped (--layers x --width, SwiGLU, RoPE, RMSNorm, an untied --vocab head) with random weights,
built by lmforge and exported to a transformers LlamaForCausalLM by `lmforge export --format hf`'s exporter; the
adapters (r=--rank on q, k, v and o, random A and B, so they change the text) are written as a PEFT adapter by
lmforge's PEFT exporter, which peft loads. The variants:

- lmforge-adapter: the base with the adapters as an adapter set (lora.add_adapter_set, chosen with use_adapter):
  what the server decodes a request naming a LoRA run with, the base's weights shared with every other run.
- lmforge-merged: the adapters folded into a copy of the base (lora.merge_lora): one model per run.
- peft-adapter: PeftModel.from_pretrained(base, adapter) unmerged, transformers' generate (dynamic KV cache, sdpa).
- peft-merged: the same after merge_and_unload().

Each generates --new-tokens greedy tokens after an 8-token prompt, at each batch size, with no end token, on
--threads threads; the variants alternate over --rounds (the order reversed every other round) after one untimed
warm-up each, and the medians are reported, with tokens/s and each one's ratio to lmforge-adapter. The greedy tokens
of every variant are compared with lmforge-merged's (the same weights up to float rounding: equal prefixes).

    python benchmarks/lora_decode.py --json-out benchmarks/results/lora_decode-cpu.json
    python benchmarks/lora_decode.py --layers 2 --width 64 --heads 4 --kv-heads 2 --vocab 512 --new-tokens 16  # quick
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
from lmforge.generate import GenerateConfig, generate_ids  # noqa: E402
from lmforge.interop.hf_export import export_hf  # noqa: E402
from lmforge.interop.peft_export import CONFIG, WEIGHTS, peft_adapter_files  # noqa: E402
from lmforge.lora import Adapter, add_adapter_set, apply_lora, lora_state_dict, merge_lora, use_adapter  # noqa: E402
from lmforge.model import GPT  # noqa: E402
from machine import alternating_medians, libraries, machine, report  # noqa: E402  (benchmarks/machine.py)

VARIANTS = ("lmforge-adapter", "lmforge-merged", "peft-adapter", "peft-merged")
PROMPT = [5, 17, 90, 3, 42, 7, 60, 11]  # ids under any --vocab from 91


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--layers", type=int, default=6)
    p.add_argument("--width", type=int, default=512, help="n_embd")
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--kv-heads", type=int, default=4)
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--batch-sizes", default="1,8", help="comma-separated")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--json-out", default=None, help="also write the JSON summary to this file")
    return p.parse_args(argv)


def build(root: Path, args: argparse.Namespace) -> dict[str, torch.nn.Module]:
    """The four models of VARIANTS, over one random base and one set of random adapters."""
    import peft
    import transformers

    config = ModelConfig(vocab_size=args.vocab, block_size=len(PROMPT) + args.new_tokens, n_layer=args.layers,
                         n_head=args.heads, n_kv_head=args.kv_heads, n_embd=args.width, norm="rmsnorm", mlp="swiglu",
                         pos_encoding="rope", bias=False, tie_embeddings=False, dropout=0.0)
    torch.manual_seed(0)
    base = GPT(config).eval()
    ckpt = save_checkpoint(root / "base", 0, base, None, RunConfig(model=config), {"tokens_seen": 0})
    hf_dir = export_hf(ckpt, root / "hf")
    lora = LoRAConfig(r=args.rank, alpha=2.0 * args.rank, targets=["q", "k", "v", "o"])
    adapted = apply_lora(copy.deepcopy(base), lora)
    with torch.no_grad():
        for adapter in (m for m in adapted.modules() if isinstance(m, Adapter)):
            adapter.B.normal_(0.0, 0.02)  # B = 0 would leave the base's text
    files = peft_adapter_files(adapted, lora)
    (root / "adapter").mkdir()
    (root / "adapter" / CONFIG).write_text(json.dumps(files[CONFIG]))
    save_file(files[WEIGHTS], str(root / "adapter" / WEIGHTS))
    served = copy.deepcopy(base)
    add_adapter_set(served, "a", lora, {k: v.detach().clone() for k, v in lora_state_dict(adapted).items()})
    theirs = peft.PeftModel.from_pretrained(
        transformers.AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32, attn_implementation="sdpa"),
        root / "adapter").eval()
    their_merged = copy.deepcopy(theirs).merge_and_unload().eval()
    return {"lmforge-adapter": served, "lmforge-merged": merge_lora(adapted).eval(), "peft-adapter": theirs,
            "peft-merged": their_merged}


def runner(name: str, model: torch.nn.Module, batch: int, new: int) -> Callable[[], list]:
    if name.startswith("lmforge"):
        config = GenerateConfig(max_new_tokens=new, num_return_sequences=batch, temperature=0.0)

        def ours() -> list:
            with use_adapter("a" if name == "lmforge-adapter" else None):
                return generate_ids(model, PROMPT, config)

        return ours
    ids = torch.tensor([PROMPT]).repeat(batch, 1)

    def theirs() -> list:
        with torch.inference_mode():
            out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=new,
                                 min_new_tokens=new, do_sample=False, eos_token_id=None, pad_token_id=0)
        return out[:, len(PROMPT):].tolist()

    return theirs


def first_difference(a: list[int], b: list[int]) -> int:
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


def timed_decodes(runners: dict[str, Callable[[], list]], rows: int, new_tokens: int, rounds: int, ratio_to: str,
                  same_as: str) -> dict:
    """Each runner (decoding `rows` rows of `new_tokens` tokens) warmed up once, its tokens kept, then timed
    (machine.alternating_medians): median seconds, tokens/s, time over `ratio_to`'s, and each one's shortest common
    prefix of a row's tokens with `same_as`'s."""
    tokens = {name: run() for name, run in runners.items()}  # the untimed warm-up, and the tokens compared
    median = alternating_medians(runners, rounds)
    return {"seconds": {n: round(v, 4) for n, v in median.items()},
            "tokens_per_s": {n: round(rows * new_tokens / v, 1) for n, v in median.items()},
            f"time_vs_{ratio_to.replace('-', '_')}": {n: round(v / median[ratio_to], 3) for n, v in median.items()},
            f"same_tokens_as_{same_as.replace('-', '_')}": {
                n: min(first_difference(a, b) for a, b in zip(tokens[n], tokens[same_as])) for n in runners}}


def measure(models: dict[str, torch.nn.Module], batch: int, args: argparse.Namespace) -> dict:
    runners = {name: runner(name, model, batch, args.new_tokens) for name, model in models.items()}
    out = {"batch": batch, **timed_decodes(runners, batch, args.new_tokens, args.rounds, "lmforge-adapter",
                                           "lmforge-merged")}
    print(json.dumps(out), flush=True)
    return out


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    import peft
    import transformers

    here = machine()
    print(libraries(here, transformers=transformers.__version__, peft=peft.__version__), flush=True)
    with tempfile.TemporaryDirectory(prefix="lora-decode-") as tmp:
        models = build(Path(tmp), args)
        results = [measure(models, int(b), args) for b in args.batch_sizes.split(",")]
    summary = {"benchmark": "lora_decode", "machine": here, "transformers": transformers.__version__,
               "peft": peft.__version__, "model": {"layers": args.layers, "width": args.width, "heads": args.heads,
                                                   "kv_heads": args.kv_heads, "vocab": args.vocab},
               "rank": args.rank, "targets": "q,k,v,o", "new_tokens": args.new_tokens, "prompt_tokens": len(PROMPT),
               "rounds": args.rounds, "results": results}
    return report(summary, args.json_out, indent=2)


if __name__ == "__main__":
    main()
