"""A DPO (SimPO, KTO, reward model) training step: lmforge's Trainer against TRL's trainer on the same model and data
(CPU).

The model is gpt2-124m-shaped with random weights and GPT-2's 50,257-token vocabulary, saved once as an lmforge
checkpoint (the base, with the byte tokenizer: every id is below 259, the head still scores all 50,257) and
exported to Hugging Face (`lmforge export --format hf`). The pairs are random byte texts: a prompt of --prompt
tokens and two completions of --completion tokens, so each row scores --completion + 1 tokens (its end token).

- lmforge: `lmforge prepare --task preference` data and the Trainer that `lmforge train --train.init_from BASE`
  builds (full fine-tuning, the frozen reference a copy of the base), timed through Trainer.train_step: the policy's
  and the reference's forward passes, DPO's loss, backward, clipping, AdamW. With the head fused with its loss row
  by row (the default) and with the whole logits (--train.loss_chunk 0).
- TRL: DPOTrainer (sigmoid loss, beta 0.1, the same learning rate; fp32 and no activation checkpointing, as
  lmforge's default, where TRL's own defaults are bf16 autocast and checkpointing) on the Hugging Face export of the
  base as policy
  and as reference; the same pairs, as token ids, through TRL's own DataCollatorForPreference; each step is
  trainer.training_step (TRL's loss with its fused LM head, accelerate's backward), clipping to 1.0 and the optimizer
  TRL's trainer creates, the loop transformers' Trainer runs.

--precompute (DPO, KTO): the reference scores every pair (KTO: every completion and its mismatched row, the partners
as both fix them: the previous completion of its batch in stored order) before the first step in both, and neither
keeps it (one more variant, lmforge-live-reference, runs lmforge's frozen copy at every step on the same ordered pairs):
lmforge's train.precompute_reference, TRL's precompute_ref_log_probs with no ref_model (its compute_ref_log_probs on
each batch of the rows, what its precompute pass runs); both take the pairs in order, so every step's loss must
agree. The scoring pass is timed apart (build_seconds), not in the steps.

--loss simpo (SimPO, no reference: lmforge's train.preference_loss simpo against TRL's CPOTrainer with loss_type
simpo and cpo_alpha 0, its pure SimPO; beta 2, gamma 0.5 for both): the same steps without the reference, the pairs
taken in order by both (lmforge's data.sampling sequential), batches of the same token ids built as TRL's own
tokenize_row builds them (labels -100 on the prompt), so the first step's losses must agree.

--loss kto (KTO on unpaired data: lmforge's `prepare --task unpaired` and train.preference_loss kto against TRL's
KTOTrainer, loss_type kto, beta 0.1, desirable and undesirable weights 1): a step trains 2 x --pairs completions
(the sequences a DPO step trains), half of them desirable, with the reference's forward on them and the policy's and
the reference's on as many mismatched rows (each prompt with the previous completion of the batch). Both take the
completions in order (lmforge's data.sampling sequential; TRL's rows with KL_completion_ids rotated by one within
each batch, as its own dataset map builds them), so every step's batch, and so its loss, must agree.

--loss reward (a reward model: lmforge's train.objective reward against TRL's RewardTrainer, no centring term): the
base is the same body with a one-output classify head (random weights), saved as an lmforge checkpoint and exported as
a GPT2ForSequenceClassification; each step reads every pair's two examples whole (no reference, no LM head). Both
take the pairs in order (lmforge's data.sampling sequential; TRL's rows the same token ids through its
DataCollatorForPreference), so every step's loss must agree. No whole-logits variant: a reward model has no logits.

Each variant runs in a fresh subprocess, so its peak resident memory is its own (VmHWM reset once everything is
built); variants alternate over --rounds, so a change in the machine's load falls on all of them. The first step of
each process is a warm-up and is not timed. Also checked: the first step's loss is log 2 for all three (policy =
reference; TRL's within rounding, its policy and reference passes taking different paths).

    python benchmarks/dpo_step.py --json-out benchmarks/results/dpo_step-cpu.json
    python benchmarks/dpo_step.py --loss simpo --json-out benchmarks/results/simpo_step-cpu.json
    python benchmarks/dpo_step.py --precompute --json-out benchmarks/results/dpo_step-precomputed-cpu.json
    python benchmarks/dpo_step.py --loss kto --json-out benchmarks/results/kto_step-cpu.json
    python benchmarks/dpo_step.py --loss reward --json-out benchmarks/results/reward_step-cpu.json
    python benchmarks/dpo_step.py --layers 2 --width 64 --heads 2 --vocab 512 --prompt 16 --completion 8   # quick
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))  # run from a checkout without installing

from lmforge.checkpoint import save_checkpoint  # noqa: E402
from lmforge.config import ModelConfig, RunConfig, load_run_config  # noqa: E402
from lmforge.data.tasks import load_examples, prepare_task  # noqa: E402
from lmforge.files import atomic_write_text  # noqa: E402
from lmforge.model import GPT  # noqa: E402
from lmforge.plan import reset_peak_rss, status_kib  # noqa: E402  (the peak RSS of what follows)
from lmforge.tokenizer import byte_tokenizer  # noqa: E402
from lmforge.train import Trainer  # noqa: E402
from machine import load_average, machine  # noqa: E402  (benchmarks/machine.py)

VARIANTS = ("lmforge", "lmforge-whole-logits", "trl")
LIVE = "lmforge-live-reference"  # --precompute: lmforge with the frozen copy run at every step, for comparison
LR, BETA, SIMPO_BETA, SIMPO_GAMMA = 1e-5, 0.1, 2.0, 0.5


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--layers", type=int, default=12)
    p.add_argument("--width", type=int, default=768, help="n_embd")
    p.add_argument("--heads", type=int, default=12)
    p.add_argument("--vocab", type=int, default=50257)
    p.add_argument("--block", type=int, default=1024, help="model.block_size (the position table)")
    p.add_argument("--prompt", type=int, default=192, help="prompt tokens of every pair")
    p.add_argument("--completion", type=int, default=63, help="tokens of each completion (its end token aside)")
    p.add_argument("--pairs", type=int, default=4, help="pairs per step (2x as many rows)")
    p.add_argument("--steps", type=int, default=2, help="timed steps after one warm-up step, per process")
    p.add_argument("--rounds", type=int, default=2, help="fresh processes per variant, taking turns")
    p.add_argument("--threads", type=int, default=1, help="torch threads per variant")
    p.add_argument("--loss", choices=("dpo", "simpo", "kto", "reward"), default="dpo",
                   help="dpo: against TRL's DPOTrainer; simpo: against TRL's CPOTrainer (loss_type simpo); kto: "
                        "unpaired completions (2 x --pairs a step) against TRL's KTOTrainer")
    p.add_argument("--precompute", action="store_true",
                   help="dpo, kto: the reference scores the pairs (completions and their mismatched rows) before the "
                        "first step, in both (lmforge's train.precompute_reference, TRL's precompute_ref_log_probs): "
                        "no frozen copy is kept")
    p.add_argument("--json-out", default=None, help="also write the JSON summary to this file")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)  # internal: VARIANT,WORK_DIR
    return p.parse_args(argv)


def mib(kib: int) -> float:
    return round(kib / 1024, 1)


def write_inputs(root: Path, args: argparse.Namespace) -> None:
    """root/base (a random-weight checkpoint with the byte tokenizer), root/hf (its HF export), root/data (pairs)."""
    from lmforge.cli import main as lmforge_main

    config = ModelConfig(vocab_size=args.vocab, block_size=args.block, n_layer=args.layers, n_head=args.heads,
                         n_embd=args.width, activation="gelu_tanh")
    byte_tokenizer().save(root / "tokenizer.json")
    torch.manual_seed(0)
    if args.loss == "reward":  # the same body with a fresh one-output head: both trainers start from its weights
        config = dataclasses.replace(config, head="classify", num_labels=1)
    ckpt = save_checkpoint(root / "base", 0, GPT(config), None, RunConfig(model=config), {"tokens_seen": 0},
                           root / "tokenizer.json")
    assert lmforge_main(["export", str(root / "base"), "--format", "hf", "--out", str(root / "hf")]) == 0
    rng = random.Random(0)
    letters = "abcdefghijklmnopqrstuvwxyz "

    def text(n: int) -> str:
        return "".join(rng.choice(letters) for _ in range(n))
    n_pairs = args.pairs * (args.steps + 1) * 2 + 10
    if args.loss == "kto":  # 2 completions per pair's worth, alternately desirable and not
        records = [{"prompt": text(args.prompt - 2), "completion": text(args.completion), "label": i % 2 == 0}
                   for i in range(2 * n_pairs)]
    else:
        records = [{"prompt": text(args.prompt - 2), "chosen": text(args.completion),
                    "rejected": text(args.completion)} for _ in range(n_pairs)]  # the template adds "\n", start 1
    (root / "pairs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    prepare_task([str(root / "pairs.jsonl")], str(root / "data"), tokenizer_file=ckpt / "tokenizer.json",
                 base=str(root / "base"), max_length=args.prompt + args.completion + 1,
                 task="unpaired" if args.loss == "kto" else "preference", split=(0.9, 0.05, 0.05),
                 warn=lambda m: None)


def lmforge_step(variant: str, root: Path, args: argparse.Namespace):
    overrides = {"data.path": str(root / "data"), "train.init_from": str(root / "base"),
                 "train.run_dir": str(root / f"run-{variant}-{os.getpid()}"), "train.device": "cpu",
                 "train.num_threads": args.threads, "train.batch_size": args.pairs, "train.max_steps": args.steps + 1,
                 "train.seed": 0, "train.dpo_beta": BETA, "optim.lr": LR, "optim.min_lr": LR, "optim.warmup_steps": 0,
                 "train.eval_interval": 0, "train.plot": False}
    if args.loss == "simpo":  # no reference; the pairs in order, as TRL's rows below
        overrides.update({"train.preference_loss": "simpo", "train.dpo_beta": SIMPO_BETA,
                          "train.simpo_gamma": SIMPO_GAMMA, "data.sampling": "sequential"})
    if args.loss == "kto":  # 2 x pairs completions a step, in order, as TRL's rows below
        overrides.update({"train.preference_loss": "kto", "train.batch_size": 2 * args.pairs,
                          "data.sampling": "sequential"})
    if args.loss == "reward":  # the pairs in order, as TRL's rows below
        overrides.update({"train.objective": "reward", "data.sampling": "sequential"})
    if variant == "lmforge-whole-logits":
        overrides["train.loss_chunk"] = 0
    if args.precompute:  # and the pairs in order, as TRL's rows: the same batches, so the same losses every step
        overrides.update({"train.precompute_reference": variant != LIVE, "data.sampling": "sequential"})
    trainer = Trainer(load_run_config(None, {k: str(v) for k, v in overrides.items()}), progress=False,
                      tensorboard=False)

    def step() -> float:
        loss_sum, count, _, _ = trainer.train_step()
        trainer.step += 1
        return float(loss_sum / count)
    return step


def trl_step(root: Path, args: argparse.Namespace):
    """TRL's DPOTrainer on the HF export; batches of the same pairs (token ids) through TRL's collator."""
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import DPOConfig, DPOTrainer
    from trl.trainer.dpo_trainer import DataCollatorForPreference

    policy = AutoModelForCausalLM.from_pretrained(root / "hf")
    # --precompute: no reference model; TRL scores with the policy as it starts (what its precompute does)
    reference = None if args.precompute else AutoModelForCausalLM.from_pretrained(root / "hf")
    tokenizer = AutoTokenizer.from_pretrained(root / "hf")
    # the same work as lmforge's default: fp32 (TRL's default is bf16 autocast) and no activation checkpointing
    # (TRL's default recomputes each layer in the backward pass)
    config = DPOConfig(output_dir=str(root / f"trl-{os.getpid()}"), beta=BETA, loss_type=["sigmoid"], report_to=[],
                       use_cpu=True, learning_rate=LR, max_grad_norm=1.0, max_length=None, bf16=False,
                       gradient_checkpointing=False, per_device_train_batch_size=args.pairs,
                       dataloader_num_workers=0, precompute_ref_log_probs=args.precompute)
    trainer = DPOTrainer(model=policy, ref_model=reference, args=config, processing_class=tokenizer,
                         train_dataset=Dataset.from_list([{"prompt": "ab\n", "chosen": "AB", "rejected": "ab"}]))
    optimizer = trainer.create_optimizer()
    trainer.current_gradient_accumulation_steps = 1  # what Trainer.train sets before its loop calls training_step
    ex = load_examples(root / "data", "train")
    rows = []
    for i in range(0, len(ex), 2):  # a pair: chosen then rejected, one prompt
        prompt, chosen = ex.prompt_and_completion(i)
        rows.append({"prompt_ids": prompt, "chosen_ids": chosen, "rejected_ids": ex.prompt_and_completion(i + 1)[1]})
    collate = DataCollatorForPreference(pad_token_id=tokenizer.pad_token_id)
    if args.precompute:  # TRL's own scoring of each batch (compute_ref_log_probs, as its precompute pass calls it)
        for first in range(0, len(rows), args.pairs):
            chosen, rejected = trainer.compute_ref_log_probs(trainer.model, collate(rows[first:first + args.pairs]))
            for row, c, r in zip(rows[first:first + args.pairs], chosen.tolist(), rejected.tolist()):
                row["ref_chosen_logps"], row["ref_rejected_logps"] = c, r
    return trl_training_step(trainer, optimizer, lambda k: collate(rows[k * args.pairs:(k + 1) * args.pairs]))


def trl_simpo_step(root: Path, args: argparse.Namespace):
    """TRL's CPOTrainer (loss_type simpo, cpo_alpha 0) on the HF export; the pairs in order, each batch the keys
    its concatenated_forward reads, as its tokenize_row and collator make them: prompt + completion ids, attention
    masks, labels -100 on the prompt, right padding (labels -100, ids the pad token)."""
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl.experimental.cpo import CPOConfig, CPOTrainer

    policy = AutoModelForCausalLM.from_pretrained(root / "hf")
    tokenizer = AutoTokenizer.from_pretrained(root / "hf")
    config = CPOConfig(output_dir=str(root / f"trl-{os.getpid()}"), beta=SIMPO_BETA, simpo_gamma=SIMPO_GAMMA,
                       loss_type="simpo", cpo_alpha=0.0, report_to=[], use_cpu=True, learning_rate=LR,
                       max_grad_norm=1.0, bf16=False, gradient_checkpointing=False,
                       per_device_train_batch_size=args.pairs, dataloader_num_workers=0)
    trainer = CPOTrainer(model=policy, args=config, processing_class=tokenizer,
                         train_dataset=Dataset.from_list([{"prompt": "ab\n", "chosen": "AB", "rejected": "ab"}]))
    optimizer = trainer.create_optimizer()
    trainer.current_gradient_accumulation_steps = 1
    ex = load_examples(root / "data", "train")
    pad = tokenizer.pad_token_id

    def padded(rows: list[list[int]], value: int, width: int) -> torch.Tensor:
        return torch.tensor([row + [value] * (width - len(row)) for row in rows])

    def batch(first: int) -> dict:
        out: dict = {}
        seqs = {}
        for side, offset in (("chosen", 0), ("rejected", 1)):
            rows, labels = [], []
            for i in range(first, first + args.pairs):
                e = 2 * i + offset
                prompt, completion = ex.prompt_and_completion(e)
                rows.append(prompt + completion)
                labels.append([-100] * len(prompt) + completion)
            seqs[side] = (rows, labels)
        width = max(len(r) for rows, _ in seqs.values() for r in rows)
        for side, (rows, labels) in seqs.items():
            out[f"{side}_input_ids"] = padded(rows, pad, width)
            out[f"{side}_attention_mask"] = padded([[1] * len(r) for r in rows], 0, width)
            out[f"{side}_labels"] = padded(labels, -100, width)
        return out
    return trl_training_step(trainer, optimizer, lambda k: batch(k * args.pairs))


def trl_kto_step(root: Path, args: argparse.Namespace):
    """TRL's KTOTrainer (loss_type kto) on the HF export as policy and as reference; the completions in order, 2 x
    --pairs a batch, each row's KL_completion_ids the previous completion of its batch (the first the last's: what
    TRL's own dataset map builds per batch), through TRL's DataCollatorForUnpairedPreference."""
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import KTOConfig, KTOTrainer
    from trl.trainer.kto_trainer import DataCollatorForUnpairedPreference

    policy = AutoModelForCausalLM.from_pretrained(root / "hf")
    # --precompute: no reference model; TRL scores with the policy as it starts (what its precompute does)
    reference = None if args.precompute else AutoModelForCausalLM.from_pretrained(root / "hf")
    tokenizer = AutoTokenizer.from_pretrained(root / "hf")
    B = 2 * args.pairs
    config = KTOConfig(output_dir=str(root / f"trl-{os.getpid()}"), beta=BETA, loss_type="kto", report_to=[],
                       use_cpu=True, learning_rate=LR, max_grad_norm=1.0, max_length=None, bf16=False,
                       gradient_checkpointing=False, per_device_train_batch_size=B, dataloader_num_workers=0,
                       precompute_ref_log_probs=args.precompute)
    trainer = KTOTrainer(model=policy, ref_model=reference, args=config, processing_class=tokenizer,
                         train_dataset=Dataset.from_list([{"prompt": "ab\n", "completion": "AB", "label": True}]))
    optimizer = trainer.create_optimizer()
    trainer.current_gradient_accumulation_steps = 1
    ex = load_examples(root / "data", "train")
    parts = [ex.prompt_and_completion(e) for e in range(len(ex))]
    collate = DataCollatorForUnpairedPreference(pad_token_id=tokenizer.pad_token_id)

    rows = [{"prompt_ids": parts[e][0], "completion_ids": parts[e][1],
             "KL_completion_ids": parts[e - e % B + (e % B - 1) % B][1], "label": bool(ex.desirable[e])}
            for e in range(len(ex) - len(ex) % B)]  # each with the previous completion of its batch (the first: last)
    if args.precompute:  # TRL's own scoring of each batch (compute_ref_log_probs, as its precompute pass calls it)
        for first in range(0, len(rows), B):
            ref, ref_kl = trainer.compute_ref_log_probs(trainer.model, collate(rows[first:first + B]))
            for row, a, b in zip(rows[first:first + B], ref.tolist(), ref_kl.tolist()):
                row["ref_logps"], row["ref_KL_logps"] = a, b
    return trl_training_step(trainer, optimizer, lambda k: collate(rows[k * B:(k + 1) * B]))


def trl_reward_step(root: Path, args: argparse.Namespace):
    """TRL's RewardTrainer on the HF export (GPT2ForSequenceClassification, one label); the pairs in order, each
    example whole as token ids (what lmforge's reward model reads), through TRL's DataCollatorForPreference."""
    from datasets import Dataset
    from transformers import AutoModelForSequenceClassification, AutoTokenizer
    from trl import RewardConfig, RewardTrainer
    from trl.trainer.reward_trainer import DataCollatorForPreference

    model = AutoModelForSequenceClassification.from_pretrained(root / "hf")
    tokenizer = AutoTokenizer.from_pretrained(root / "hf")
    config = RewardConfig(output_dir=str(root / f"trl-{os.getpid()}"), report_to=[], use_cpu=True, learning_rate=LR,
                          max_grad_norm=1.0, max_length=None, bf16=False, gradient_checkpointing=False,
                          per_device_train_batch_size=args.pairs, dataloader_num_workers=0)
    trainer = RewardTrainer(model=model, args=config, processing_class=tokenizer,
                            train_dataset=Dataset.from_list([{"chosen": "AB", "rejected": "ab"}]))
    optimizer = trainer.create_optimizer()
    trainer.current_gradient_accumulation_steps = 1
    ex = load_examples(root / "data", "train")
    whole = [sum(ex.prompt_and_completion(e), []) for e in range(len(ex))]
    rows = [{"chosen_ids": whole[i], "rejected_ids": whole[i + 1]} for i in range(0, len(ex), 2)]
    collate = DataCollatorForPreference(pad_token_id=tokenizer.pad_token_id)
    return trl_training_step(trainer, optimizer, lambda k: collate(rows[k * args.pairs:(k + 1) * args.pairs]))


def trl_training_step(trainer, optimizer, batch):
    """One step of a TRL trainer as transformers' Trainer loop runs it: training_step on batch(k) for the k-th call
    (its loss and accelerate's backward), clipping to 1.0, the optimizer's step; returns the loss."""
    count = [0]

    def step() -> float:
        inputs = batch(count[0])
        count[0] += 1
        loss = trainer.training_step(trainer.model, inputs)
        torch.nn.utils.clip_grad_norm_(trainer.model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return float(loss)
    return step


def measure(variant: str, root: Path, args: argparse.Namespace) -> dict:
    """Build `variant`, run 1 + args.steps steps; peak training RSS, step times, losses."""
    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    if variant == "trl":
        step = {"simpo": trl_simpo_step, "kto": trl_kto_step, "dpo": trl_step, "reward": trl_reward_step}[args.loss](
            root, args)
    else:
        step = lmforge_step(variant, root, args)
    build_seconds = time.perf_counter() - t0  # with --precompute: the reference's scoring pass included
    rss_built = status_kib("VmRSS")
    reset_peak_rss()
    times, losses = [], []
    for _ in range(args.steps + 1):
        t0 = time.perf_counter()
        losses.append(step())
        times.append(time.perf_counter() - t0)
    return {"peak_training_rss_mib": mib(status_kib("VmHWM")), "rss_after_build_mib": mib(rss_built),
            "step_seconds": [round(t, 3) for t in times], "losses": losses, "build_seconds": round(build_seconds, 3)}


def run_variant(variant: str, root: Path, argv: list[str]) -> dict:
    cmd = [sys.executable, __file__, *argv, "--child", f"{variant},{root}"]
    done = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    if done.returncode != 0:
        raise SystemExit(f"{variant} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> dict:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(argv)
    if args.child:
        variant, root = args.child.split(",")
        print(json.dumps(measure(variant, Path(root), args)))
        return {}
    if args.precompute and args.loss not in ("dpo", "kto"):
        raise SystemExit(f"--precompute scores with DPO's or KTO's reference (--loss {args.loss}: drop one)")
    if args.prompt + args.completion + 1 > args.block - (args.loss == "reward"):  # a reward model reads it whole
        raise SystemExit(f"--prompt + --completion + 1 is above --block {args.block}: lower them")
    torch.set_num_threads(args.threads)
    started_on = machine()
    variants = (("lmforge", "trl") if args.loss == "reward" else VARIANTS) + ((LIVE,) if args.precompute else ())
    runs: dict[str, list[dict]] = {v: [] for v in variants}
    with tempfile.TemporaryDirectory(prefix="dpo-step-") as tmp:
        write_inputs(Path(tmp), args)
        for r in range(args.rounds):
            for variant in variants:
                runs[variant].append(run_variant(variant, Path(tmp), argv))
                print(f"round {r + 1}: {variant}: peak {runs[variant][-1]['peak_training_rss_mib']} MiB, steps "
                      f"{runs[variant][-1]['step_seconds']} s, losses {runs[variant][-1]['losses']}", file=sys.stderr)
    results = {}
    for variant, done in runs.items():
        results[variant] = {"peak_training_rss_mib": max(d["peak_training_rss_mib"] for d in done),
                            "rss_after_build_mib": max(d["rss_after_build_mib"] for d in done),
                            "step_seconds_median": round(statistics.median(t for d in done
                                                                           for t in d["step_seconds"][1:]), 3),
                            "build_seconds_median": round(statistics.median(d["build_seconds"] for d in done), 3),
                            "first_step_loss": [d["losses"][0] for d in done], "runs": done}
    ours, trl = results["lmforge"], results["trl"]
    whole = results.get("lmforge-whole-logits")
    rows_logits_mib = 2 * args.pairs * (args.prompt + args.completion) * args.vocab * 4 / 2**20
    summary = {
        "benchmark": "dpo_step", "machine": {**started_on, "load_average_at_end": load_average()},
        "model": {"n_layer": args.layers, "n_embd": args.width, "n_head": args.heads, "vocab_size": args.vocab,
                  "block_size": args.block, "weights": "random"},
        "pairs_per_step": args.pairs, **({"completions_per_step": 2 * args.pairs} if args.loss == "kto" else {}),
        "prompt_tokens": args.prompt, "completion_tokens": args.completion + 1,
        "timed_steps_per_process": args.steps, "rounds": args.rounds, "threads": args.threads, "loss": args.loss,
        "reference_precomputed": args.precompute,
        "beta": SIMPO_BETA if args.loss == "simpo" else BETA,
        **({"simpo_gamma": SIMPO_GAMMA} if args.loss == "simpo" else {}),
        "fp32_logits_of_the_rows_mib": round(rows_logits_mib, 1), "variants": results,
        "step_time_lmforge_over_trl": round(ours["step_seconds_median"] / trl["step_seconds_median"], 3),
        "peak_rss_lmforge_over_trl": round(ours["peak_training_rss_mib"] / trl["peak_training_rss_mib"], 3),
    }
    if whole is not None:
        summary["step_time_whole_logits_over_trl"] = round(whole["step_seconds_median"] / trl["step_seconds_median"], 3)
        summary["peak_rss_lmforge_over_whole_logits"] = round(
            ours["peak_training_rss_mib"] / whole["peak_training_rss_mib"], 3)
    first = [loss for v in results.values() for loss in v["first_step_loss"]]
    if args.loss == "dpo":  # policy = reference at the first step: log 2, up to the rounding of two ways of summing
        summary["first_step_losses_within_1e-4_of_log_2"] = all(abs(loss - math.log(2)) < 1e-4 for loss in first)
    if args.loss == "kto":  # policy = reference, every log-ratio and the KL estimate 0: 1 - sigmoid(0) each
        summary["first_step_losses_within_1e-4_of_one_half"] = all(abs(loss - 0.5) < 1e-4 for loss in first)
    if args.precompute or args.loss in ("kto", "reward"):  # the same batches in order: the same loss at every step
        every = [loss for v in results.values() for d in v["runs"] for loss in d["losses"]]
        steps = [[d["losses"][k] for v in results.values() for d in v["runs"]] for k in range(args.steps + 1)]
        summary["losses_within_1e-4_at_every_step"] = bool(every) and all(max(s) - min(s) < 1e-4 for s in steps)
        summary["loss_spread_per_step"] = [max(s) - min(s) for s in steps]
    if args.precompute:  # the same pairs in order and the same precomputed values: the same loss at every step
        live = results[LIVE]
        summary["step_time_precomputed_over_live"] = round(ours["step_seconds_median"] / live["step_seconds_median"],
                                                           3)
        summary["peak_rss_precomputed_over_live"] = round(ours["peak_training_rss_mib"] / live["peak_training_rss_mib"],
                                                          3)
    elif args.loss == "simpo":  # the same model on the same first pairs: the same SimPO loss
        summary["first_step_losses_within_1e-4"] = max(first) - min(first) < 1e-4
    print(json.dumps(summary, indent=2))
    if args.json_out:
        atomic_write_text(Path(args.json_out), json.dumps(summary, indent=2) + "\n")
    return summary


if __name__ == "__main__":
    main()
