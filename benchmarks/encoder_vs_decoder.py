"""A BERT-style encoder next to a GPT-style decoder of the same size: the same data, the same tokens, the same task.

Why is an encoder better at understanding and a decoder at generating? Measure it, on this CPU:

  pretraining  the built-in Shakespeare corpus, prepared once (`lmforge prepare --dataset shakespeare
               --tokenizer char --mask-token`): both models read the same shards. The decoder (model.causal true)
               learns the next token; the encoder (model.causal false, train.objective mlm) BERT's masked tokens.
               Same size (layers, width, heads, context), RoPE positions for both (an encoder learns relative
               positions far sooner with RoPE than with learned absolute ones), the same steps x batch x context
               tokens, the same learning rate and seed. Each is evaluated on the val split as `lmforge eval`
               does: the decoder by loss and perplexity, the encoder by MLM loss and masked-token accuracy.
  fine-tuning  gensim's 200 labelled movie-review sentences (Pang & Lee), positive vs negative, prepared once
               with the shared tokenizer and split 0.7/0.1/0.2: each base fine-tuned into a classifier (the
               decoder's head reads the last token, the encoder's the start token) with the same steps and
               learning rate, then accuracy and macro-F1 on the test split, beside the majority-class and TF-IDF +
               logistic regression baselines. The data, baselines and fine-tuning are finetune_tasks.py's.
  abilities    what each does that the other cannot: the decoder continues a prompt (a sample); the encoder
               fills a <MASK> from both sides (its top candidates); each refusal, as lmforge words it.

    python benchmarks/encoder_vs_decoder.py --json-out benchmarks/results/encoder_vs_decoder-cpu.json
    python benchmarks/encoder_vs_decoder.py --quick     # a smoke run in seconds: tiny budgets, numbers meaningless
"""

from __future__ import annotations

import argparse
import shutil
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # finetune_tasks and machine, also when loaded by path

from finetune_tasks import fine_tune_classifier, prepare_sentiment, run  # noqa: E402  (it puts src/ on sys.path)
from machine import machine, report  # noqa: E402

from lmforge.errors import ConfigError  # noqa: E402

QUICK = {"n_layer": 1, "n_embd": 32, "n_head": 2, "block_size": 64, "batch_size": 4, "steps": 10, "tune_steps": 5,
         "eval_tokens": 2048}
MODELS = {"decoder": ["--model.causal", "true"], "encoder": ["--model.causal", "false", "--train.objective", "mlm"]}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--work", default="runs/encoder-vs-decoder", help="working directory (data, runs); replaced")
    p.add_argument("--n-layer", type=int, default=4, help="layers of both models (char-small: 4)")
    p.add_argument("--n-embd", type=int, default=128, help="width of both models (char-small: 128)")
    p.add_argument("--n-head", type=int, default=4, help="attention heads of both models (char-small: 4)")
    p.add_argument("--block-size", type=int, default=128, help="context of both models, in characters")
    p.add_argument("--batch-size", type=int, default=32, help="sequences per pretraining step")
    p.add_argument("--steps", type=int, default=2000, help="pretraining steps of each model")
    p.add_argument("--lr", type=float, default=3e-3, help="pretraining learning rate of each model")
    p.add_argument("--tune-steps", type=int, default=400, help="classification fine-tuning steps of each model")
    p.add_argument("--eval-tokens", type=int, default=None, help="evaluate on the first N val tokens (default: all)")
    p.add_argument("--prompt", default="ROMEO:", help="what the decoder continues")
    p.add_argument("--fill-text", default="To be, or not to b<MASK>, that is the question:",
                   help="what the encoder fills (one character per <MASK>: the tokenizer is char)")
    p.add_argument("--quick", action="store_true", help="tiny models and budgets: a check that the script runs")
    p.add_argument("--json-out", default=None, help="also write the JSON summary to this file")
    return p.parse_args(argv)


def pretrain(work: Path, data: Path, name: str, args: argparse.Namespace) -> dict:
    """Train one base model on the shared shards; its val evaluation, as `lmforge eval` reports it."""
    from lmforge.eval import evaluate_checkpoint

    t0 = time.perf_counter()
    run("train", "--preset", "char-small", "--data", data, "--run-dir", work / name, "--max-steps", args.steps,
        "--model.n_layer", args.n_layer, "--model.n_embd", args.n_embd, "--model.n_head", args.n_head,
        "--model.block_size", args.block_size, "--model.pos_encoding", "rope", "--train.batch_size",
        args.batch_size, "--optim.lr", args.lr, "--train.eval_interval", max(args.steps // 4, 1), "--device", "cpu",
        *MODELS[name])
    seconds = time.perf_counter() - t0
    result = evaluate_checkpoint(work / name, split="val", max_tokens=args.eval_tokens, device="cpu")
    keep = ("loss", "perplexity", "bits_per_byte") if name == "decoder" else ("loss", "masked_accuracy")
    return {**{k: round(result[k], 4) for k in keep}, "train_seconds": round(seconds, 1)}


def abilities(decoder: Path, encoder: Path, prompt: str, fill_text: str) -> dict:
    """What each base model does (a sample, a filled mask) and what it refuses, in lmforge's words."""
    from lmforge.generate import MaskFiller, TextGenerator, load

    writer, filler = load(str(decoder)), load(str(encoder))
    refusals = {}
    for name, attempt in [("decoder_fill_mask", lambda: MaskFiller(writer.model, writer.tokenizer)),
                          ("encoder_generate", lambda: TextGenerator(filler.model, filler.tokenizer))]:
        try:
            attempt()
        except ConfigError as e:
            refusals[name] = str(e)
    sample = writer.generate(prompt, max_new_tokens=120, temperature=0.8, top_k=40, seed=1)
    fills = filler.fill_mask(fill_text, top_k=5)
    return {"decoder_sample": {"prompt": prompt, "continuation": sample},
            "encoder_fill_mask": {"text": fill_text, "candidates": [[{"token": t, "probability": round(p, 4)}
                                                                      for t, p in ranked] for ranked in fills]},
            "refusals": refusals}


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    if args.quick:
        for key, value in QUICK.items():
            setattr(args, key, value)
    work = Path(args.work)
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    t0 = time.perf_counter()
    summary = {"benchmark": "encoder_vs_decoder", "machine": machine(),
               "model": {"n_layer": args.n_layer, "n_embd": args.n_embd, "n_head": args.n_head,
                         "block_size": args.block_size, "pos_encoding": "rope"},
               "pretraining": {"data": "shakespeare (char, --mask-token)", "steps": args.steps,
                               "batch_size": args.batch_size, "lr": args.lr,
                               "tokens_each": args.steps * args.batch_size * args.block_size,
                               "eval_tokens": args.eval_tokens or "the whole val split"}}
    data = work / "data"
    run("prepare", "--dataset", "shakespeare", "--tokenizer", "char", "--mask-token", "--out", data, "--no-progress")
    for name in MODELS:
        summary["pretraining"][name] = pretrain(work, data, name, args)
    task_data, sentiment = prepare_sentiment(work, work / "decoder")  # the tokenizer both models share
    sentiment["tune_steps"] = args.tune_steps
    sentiment["models"] = {name: fine_tune_classifier(task_data, work / name, work / f"sentiment-{name}",
                                                      args.tune_steps, []) for name in MODELS}
    summary["sentiment"] = sentiment
    summary["abilities"] = abilities(work / "decoder", work / "encoder", args.prompt, args.fill_text)
    summary["seconds"] = round(time.perf_counter() - t0, 1)
    return report(summary, args.json_out, indent=2, ascii_only=False)


if __name__ == "__main__":
    main()
