"""An on-policy distillation step, sampling included: lmforge's Trainer against TRL's DistillationTrainer on the same
student, teacher and prompts (CPU).

The student (default 6 layers, 512 wide) and the teacher (12 layers, 768 wide: gpt2-124m's shape) have random
weights and GPT-2's 50,257-token vocabulary, saved once as lmforge checkpoints with the byte tokenizer and exported
to Hugging Face (`lmforge export --format hf`). The data: random byte prompts of --prompt tokens as sft records
(their completions are not used). A step samples one completion of each of --prompts prompts with the student
(temperature 1, exactly --completion new tokens in both: min_new_tokens = max_new_tokens, so the work is the same
whatever the draws; only the tokenizer's 259 byte ids: lmforge never samples ids past its tokenizer's, and TRL is
given them as suppress_tokens), runs the teacher over the rows, and trains the student on the reverse KL of its
next-token distribution from the teacher's at every sampled token (beta 1: TRL's default), clipping to 1.0, AdamW.

- lmforge: `lmforge train --train.distill_from TEACHER --train.distill_on_policy 1 --train.distill_beta 1` on the
  prepared sft data (data.sampling sequential), timed through Trainer.train_step: sampling (KV cache, the student in
  eval mode), the teacher's forward, the divergence fused with both heads, backward, clipping, AdamW.
- TRL: DistillationTrainer (beta 1, temperature 1, fp32 and no activation checkpointing as lmforge's default,
  use_vllm False: transformers' generate) on the Hugging Face exports, the same prompts as text, each step
  trainer.training_step on --prompts rows (its _prepare_inputs samples them), clipping to 1.0 and the optimizer TRL's
  trainer creates.

Each variant runs in fresh subprocesses, alternating over --rounds; the first step of each process is a warm-up and is
not timed. Reported: the median step time of each, their ratio, peak resident memory, and the work each step did
(completion tokens) so the two are seen to do the same; for lmforge also the time its sampling took
(OnlinePairs.groups), against what `lmforge plan` predicts for the same run.

    python benchmarks/distill_step.py --json-out benchmarks/results/distill_step-cpu.json
    python benchmarks/distill_step.py --layers 2 --width 64 --heads 2 --teacher-layers 2 --teacher-width 96 \\
        --teacher-heads 2 --vocab 512 --prompt 16 --completion 8   # quick
"""

from __future__ import annotations

import argparse
import json
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

from dpo_step import mib  # noqa: E402  (benchmarks/dpo_step.py)
from lmforge.checkpoint import save_checkpoint  # noqa: E402
from lmforge.config import ModelConfig, RunConfig, load_run_config  # noqa: E402
from lmforge.data.batches import IGNORE_INDEX  # noqa: E402
from lmforge.data.tasks import prepare_task  # noqa: E402
from lmforge.files import atomic_write_text  # noqa: E402
from lmforge.model import GPT  # noqa: E402
from lmforge.plan import plan, reset_peak_rss, status_kib  # noqa: E402
from lmforge.tokenizer import Tokenizer, byte_tokenizer  # noqa: E402
from lmforge.train import Trainer  # noqa: E402
from machine import load_average, machine  # noqa: E402  (benchmarks/machine.py)

VARIANTS = ("lmforge", "trl")
LR = 1e-5
BETA = 1.0  # reverse KL(student || teacher): TRL's default


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--layers", type=int, default=6, help="the student's")
    p.add_argument("--width", type=int, default=512, help="the student's n_embd")
    p.add_argument("--heads", type=int, default=8, help="the student's")
    p.add_argument("--teacher-layers", type=int, default=12)
    p.add_argument("--teacher-width", type=int, default=768)
    p.add_argument("--teacher-heads", type=int, default=12)
    p.add_argument("--vocab", type=int, default=50257)
    p.add_argument("--block", type=int, default=1024, help="model.block_size of both (the position tables)")
    p.add_argument("--prompt", type=int, default=64, help="prompt tokens")
    p.add_argument("--completion", type=int, default=32, help="the new tokens of each sample (both stop there)")
    p.add_argument("--prompts", type=int, default=8, help="prompts (rows) per step")
    p.add_argument("--steps", type=int, default=2, help="timed steps after one warm-up step, per process")
    p.add_argument("--rounds", type=int, default=2, help="fresh processes per variant, taking turns")
    p.add_argument("--threads", type=int, default=1, help="torch threads per variant")
    p.add_argument("--json-out", default=None, help="also write the JSON summary to this file")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)  # internal: VARIANT,WORK_DIR
    return p.parse_args(argv)


def write_inputs(root: Path, args: argparse.Namespace) -> None:
    """root/student and root/teacher (random-weight checkpoints with the byte tokenizer), their HF exports
    root/student-hf and root/teacher-hf, root/data (sft records of random byte prompts)."""
    from lmforge.cli import main as lmforge_main

    byte_tokenizer().save(root / "tokenizer.json")
    for name, layers, width, heads, seed in (("student", args.layers, args.width, args.heads, 0),
                                             ("teacher", args.teacher_layers, args.teacher_width,
                                              args.teacher_heads, 1)):
        config = ModelConfig(vocab_size=args.vocab, block_size=args.block, n_layer=layers, n_head=heads,
                             n_embd=width, activation="gelu_tanh")
        torch.manual_seed(seed)
        save_checkpoint(root / name, 0, GPT(config), None, RunConfig(model=config), {"tokens_seen": 0},
                        root / "tokenizer.json")
        assert lmforge_main(["export", str(root / name), "--format", "hf", "--out", str(root / f"{name}-hf")]) == 0
    rng = random.Random(0)
    letters = "abcdefghijklmnopqrstuvwxyz "
    records = [{"prompt": "".join(rng.choice(letters) for _ in range(args.prompt - 2)), "completion": "ab"}
               for _ in range(args.prompts * (args.steps + 1) * 2 + 10)]  # the template adds "\n", start 1
    (root / "sft.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    ckpt = next((root / "student" / "checkpoints").iterdir())
    prepare_task([str(root / "sft.jsonl")], str(root / "data"), tokenizer_file=ckpt / "tokenizer.json",
                 base=str(root / "student"), max_length=args.prompt + args.completion + 1, task="sft",
                 split=(0.9, 0.05, 0.05), warn=lambda m: None)


def prompt_ids(root: Path) -> list[list[int]]:
    """Each example's prompt as lmforge's sampler reads it (the tokens before its completion)."""
    from lmforge.data.tasks import load_examples

    ex = load_examples(root / "data", "train")
    return [ex.prompt_and_completion(i)[0] for i in range(len(ex))]


def overrides(root: Path, args: argparse.Namespace) -> dict:
    return {"data.path": str(root / "data"), "train.init_from": str(root / "student"),
            "train.distill_from": str(root / "teacher"), "train.distill_on_policy": 1, "train.distill_beta": BETA,
            "train.run_dir": str(root / f"run-lmforge-{os.getpid()}"), "train.device": "cpu",
            "train.num_threads": args.threads, "train.batch_size": args.prompts, "train.max_steps": args.steps + 1,
            "train.seed": 0, "optim.lr": LR, "optim.min_lr": LR, "optim.warmup_steps": 0, "train.eval_interval": 0,
            "train.plot": False, "data.sampling": "sequential", "train.online_max_new_tokens": args.completion}


def lmforge_step(root: Path, args: argparse.Namespace):
    trainer = Trainer(load_run_config(None, {k: str(v) for k, v in overrides(root, args).items()}), progress=False,
                      tensorboard=False)
    import lmforge.train.online as online

    exact = online.GenerateConfig  # every sample exactly --completion tokens, as TRL's below

    def generate_config(**fields):
        return exact(**fields, min_new_tokens=fields["max_new_tokens"])
    online.GenerateConfig = generate_config
    work: dict[str, list[float]] = {"completion_tokens_mean": [], "sampling_seconds": []}
    groups = trainer.sampler.groups

    def counted(*a, **k):  # the samples' sizes, read off the step's own batch; sampling's time
        started = time.perf_counter()
        out = groups(*a, **k)
        work["sampling_seconds"].append(round(time.perf_counter() - started, 3))
        (_, y, _), _ = out
        labelled = (y != IGNORE_INDEX) & (y != trainer.sampler.end_id)
        work["completion_tokens_mean"].append(float(labelled.sum(dim=1).float().mean()))
        return out
    trainer.sampler.groups = counted

    def step() -> float:
        loss_sum, count, _, _ = trainer.train_step()
        trainer.step += 1
        return float(loss_sum / count)
    return step, work


def trl_step(root: Path, args: argparse.Namespace):
    """TRL's DistillationTrainer on the HF exports; each step's rows are its prompts, as text."""
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import DistillationConfig, DistillationTrainer

    student = AutoModelForCausalLM.from_pretrained(root / "student-hf")
    teacher = AutoModelForCausalLM.from_pretrained(root / "teacher-hf")
    tokenizer = AutoTokenizer.from_pretrained(root / "student-hf")
    lm_tokenizer = Tokenizer.load(root / "tokenizer.json")
    texts = [lm_tokenizer.decode(ids) for ids in prompt_ids(root)]
    config = DistillationConfig(output_dir=str(root / f"trl-{os.getpid()}"), report_to=[], use_cpu=True,
                                learning_rate=LR, max_grad_norm=1.0, bf16=False, gradient_checkpointing=False,
                                per_device_train_batch_size=args.prompts, max_completion_length=args.completion,
                                temperature=1.0, beta=BETA, dataloader_num_workers=0, use_vllm=False,
                                logging_steps=1,
                                generation_kwargs={"suppress_tokens": list(range(lm_tokenizer.vocab_size, args.vocab)),
                                                   "min_new_tokens": args.completion})
    trainer = DistillationTrainer(model=student, teacher_model=teacher, args=config, processing_class=tokenizer,
                                  train_dataset=Dataset.from_list([{"prompt": t} for t in texts]))
    optimizer = trainer.create_optimizer()
    trainer.current_gradient_accumulation_steps = 1
    trainer.model.train()
    work: dict[str, list[float]] = {"completion_tokens_mean": []}
    count = [0]

    def step() -> float:
        k = count[0]
        count[0] += 1
        batch = [{"prompt": t} for t in texts[k * args.prompts:(k + 1) * args.prompts]]
        loss = trainer.training_step(trainer.model, batch, None)
        torch.nn.utils.clip_grad_norm_(trainer.model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        lengths = trainer._metrics["train"].get("completions/mean_length")
        work["completion_tokens_mean"].append(float(lengths[-1]) if lengths else float("nan"))
        return float(loss)
    return step, work


def measure(variant: str, root: Path, args: argparse.Namespace) -> dict:
    """Build `variant`, run 1 + args.steps steps; peak training RSS, step times, losses, the work done."""
    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    step, work = (trl_step if variant == "trl" else lmforge_step)(root, args)
    build_seconds = time.perf_counter() - t0
    reset_peak_rss()
    times, losses = [], []
    for _ in range(args.steps + 1):
        t0 = time.perf_counter()
        losses.append(step())
        times.append(time.perf_counter() - t0)
    return {"peak_training_rss_mib": mib(status_kib("VmHWM")), "step_seconds": [round(t, 3) for t in times],
            "losses": losses, "build_seconds": round(build_seconds, 3), **work}


def run_variant(variant: str, root: Path, argv: list[str]) -> dict:
    cmd = [sys.executable, __file__, *argv, "--child", f"{variant},{root}"]
    done = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    if done.returncode != 0:
        raise SystemExit(f"{variant} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def plan_against(root: Path, args: argparse.Namespace, step_seconds: float, sampling_seconds: float) -> dict:
    """What `lmforge plan` predicts for lmforge's run (rows of --prompt + --completion tokens: the block), against
    the measured step and sampling times."""
    values = {**overrides(root, args), "train.init_from": "none", "model.n_layer": args.layers,  # the student's
              "model.n_head": args.heads, "model.n_embd": args.width, "model.vocab_size": args.vocab,
              "model.activation": "gelu_tanh", "model.block_size": args.prompt + args.completion}
    predicted = plan(load_run_config(None, {k: str(v) for k, v in values.items()}), task="sft")
    return {"step_seconds": round(predicted.step_time, 3), "sampling_seconds": round(predicted.sampling_time, 3),
            "peak_flops": predicted.peak_flops, "mfu": predicted.mfu, "bandwidth": predicted.bandwidth,
            "step_over_measured": round(predicted.step_time / step_seconds, 3),
            "sampling_over_measured": round(predicted.sampling_time / sampling_seconds, 3)}


def main(argv: list[str] | None = None) -> dict:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(argv)
    if args.child:
        variant, root = args.child.split(",")
        print(json.dumps(measure(variant, Path(root), args)))
        return {}
    if args.prompt + args.completion + 1 > args.block:
        raise SystemExit(f"--prompt + --completion + 1 is above --block {args.block}: lower them")
    torch.set_num_threads(args.threads)
    started_on = machine()
    runs: dict[str, list[dict]] = {v: [] for v in VARIANTS}
    with tempfile.TemporaryDirectory(prefix="distill-step-") as tmp:
        write_inputs(Path(tmp), args)
        for r in range(args.rounds):
            for variant in VARIANTS:
                runs[variant].append(run_variant(variant, Path(tmp), argv))
                done = runs[variant][-1]
                print(f"round {r + 1}: {variant}: peak {done['peak_training_rss_mib']} MiB, steps "
                      f"{done['step_seconds']} s, completions {done['completion_tokens_mean']}", file=sys.stderr)
        results = {}
        for variant, done in runs.items():
            results[variant] = {"peak_training_rss_mib": max(d["peak_training_rss_mib"] for d in done),
                                "step_seconds_median": round(statistics.median(t for d in done
                                                                               for t in d["step_seconds"][1:]), 3),
                                "build_seconds_median": round(statistics.median(d["build_seconds"] for d in done), 3),
                                "completion_tokens_mean": round(statistics.mean(
                                    c for d in done for c in d["completion_tokens_mean"]), 2),
                                "runs": done}
        ours, trl = results["lmforge"], results["trl"]
        sampling = statistics.median(t for d in runs["lmforge"] for t in d["sampling_seconds"][1:])
        predicted = plan_against(Path(tmp), args, ours["step_seconds_median"], sampling)
    summary = {
        "benchmark": "distill_step", "machine": {**started_on, "load_average_at_end": load_average()},
        "student": {"n_layer": args.layers, "n_embd": args.width, "n_head": args.heads},
        "teacher": {"n_layer": args.teacher_layers, "n_embd": args.teacher_width, "n_head": args.teacher_heads},
        "vocab_size": args.vocab, "block_size": args.block, "weights": "random", "prompts_per_step": args.prompts,
        "max_new_tokens": args.completion, "prompt_tokens": args.prompt, "beta": BETA,
        "timed_steps_per_process": args.steps, "rounds": args.rounds, "threads": args.threads, "variants": results,
        "step_time_lmforge_over_trl": round(ours["step_seconds_median"] / trl["step_seconds_median"], 3),
        "trl_over_lmforge_speedup": round(trl["step_seconds_median"] / ours["step_seconds_median"], 3),
        "peak_rss_lmforge_over_trl": round(ours["peak_training_rss_mib"] / trl["peak_training_rss_mib"], 3),
        "lmforge_sampling_seconds_median": round(sampling, 3), "plan": predicted,
    }
    print(json.dumps(summary, indent=2))
    if args.json_out:
        atomic_write_text(Path(args.json_out), json.dumps(summary, indent=2) + "\n")
    return summary


if __name__ == "__main__":
    main()
