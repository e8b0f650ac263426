"""A GRPO training step, sampling included: lmforge's Trainer against TRL's GRPOTrainer on the same model and prompts
(CPU).

The model is gpt2-124m-shaped with random weights and GPT-2's 50,257-token vocabulary, saved once as an lmforge
checkpoint with the byte tokenizer and exported to Hugging Face (`lmforge export --format hf`), as in
benchmarks/dpo_step.py, whose inputs it reuses: random byte prompts of --prompt tokens. A step samples --group
completions of each of --prompts prompts (temperature 1, exactly --completion new tokens in both: min_new_tokens =
max_new_tokens, so the work is the same whatever the draws; only the tokenizer's 259 byte ids: lmforge never samples
ids past its tokenizer's, and TRL is given them as suppress_tokens), scores them with the same cheap reward
function (the length of each completion's text mod 7, so the groups' rewards differ), computes group-relative
advantages (scaled by the group's standard deviation), and trains one update on the samples: DAPO's loss (the
batch's completion tokens), no KL term (beta 0, no reference: both trainers' default), clipping to 1.0, AdamW.

- lmforge: `lmforge train --train.preference_loss grpo --train.online_reward_function FILE.py:NAME` on the prepared
  preference data (the pairs' prompts, taken in order: data.sampling sequential), timed through Trainer.train_step:
  sampling (KV cache, the policy in eval mode), the reward, the advantages, the per-token log-probabilities (the head
  fused with the loss), backward, clipping, AdamW.
- TRL: GRPOTrainer (num_generations --group, loss_type dapo, beta 0, fp32 and no activation checkpointing as
  lmforge's default, use_vllm False: transformers' generate) on the Hugging Face export, the same prompts as text
  (lmforge's prompt tokens decoded), each step trainer.training_step on --prompts x --group rows (what TRL's
  RepeatSampler hands it; its _prepare_inputs samples and scores them), clipping to 1.0 and the optimizer TRL's
  trainer creates.

Each variant runs in fresh subprocesses, alternating over --rounds; the first step of each process is a warm-up and is
not timed. Reported: the median step time of each, their ratio, peak resident memory, and the work each step did
(prompt tokens, mean completion length) so the two are seen to do the same; for lmforge also the time its sampling
and scoring took (Trainer.sample_groups), against what `lmforge plan` predicts for the same run (the plan of the
config with block_size = --prompt + --completion, the rows' length, at the same thread count).

    python benchmarks/grpo_step.py --json-out benchmarks/results/grpo_step-cpu.json
    python benchmarks/grpo_step.py --plan-only --json-out benchmarks/results/grpo_step-cpu.json   # the plan again
    python benchmarks/grpo_step.py --layers 2 --width 64 --heads 2 --vocab 512 --prompt 16 --completion 8   # quick
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))  # run from a checkout without installing

from dpo_step import mib, write_inputs  # noqa: E402  (benchmarks/dpo_step.py: the base, its export, the pairs)
from lmforge.config import load_run_config  # noqa: E402
from lmforge.data.batches import IGNORE_INDEX  # noqa: E402
from lmforge.data.tasks import load_examples  # noqa: E402
from lmforge.files import atomic_write_text  # noqa: E402
from lmforge.plan import plan, reset_peak_rss, status_kib  # noqa: E402
from lmforge.tokenizer import Tokenizer  # noqa: E402
from lmforge.train import Trainer  # noqa: E402
from machine import load_average, machine  # noqa: E402  (benchmarks/machine.py)

VARIANTS = ("lmforge", "trl")
LR = 1e-5
REWARDS = '''
def lmforge_reward(prompts, completions, references):
    return [len(text) % 7 / 7 for text in completions]


def trl_reward(prompts, completions, **kwargs):
    return [len(text) % 7 / 7 for text in completions]
'''


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--layers", type=int, default=12)
    p.add_argument("--width", type=int, default=768, help="n_embd")
    p.add_argument("--heads", type=int, default=12)
    p.add_argument("--vocab", type=int, default=50257)
    p.add_argument("--block", type=int, default=1024, help="model.block_size (the position table)")
    p.add_argument("--prompt", type=int, default=64, help="prompt tokens")
    p.add_argument("--completion", type=int, default=32, help="the most new tokens of a sample (both stop there)")
    p.add_argument("--prompts", type=int, default=4, help="prompts per step")
    p.add_argument("--group", type=int, default=4, help="samples of each prompt (G)")
    p.add_argument("--steps", type=int, default=2, help="timed steps after one warm-up step, per process")
    p.add_argument("--rounds", type=int, default=2, help="fresh processes per variant, taking turns")
    p.add_argument("--threads", type=int, default=1, help="torch threads per variant")
    p.add_argument("--json-out", default=None, help="also write the JSON summary to this file")
    p.add_argument("--plan-only", action="store_true", help="recompute only the \"plan\" key of the --json-out "
                   "file (its measurements stay): after a change to `lmforge plan`")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)  # internal: VARIANT,WORK_DIR
    return p.parse_args(argv)


def inputs_args(args: argparse.Namespace) -> argparse.Namespace:
    """dpo_step.write_inputs' arguments: enough pairs for every step's prompts; short completions (not trained)."""
    return argparse.Namespace(vocab=args.vocab, block=args.block, layers=args.layers, heads=args.heads,
                              width=args.width, loss="dpo", pairs=args.prompts, steps=args.steps, prompt=args.prompt,
                              completion=4)


def prompt_ids(root: Path) -> list[list[int]]:
    """Each pair's prompt as lmforge's GRPO reads it: the chosen row's tokens before its completion."""
    ex = load_examples(root / "data", "train")
    return [ex.prompt_and_completion(i)[0] for i in range(0, len(ex), 2)]


def lmforge_step(root: Path, args: argparse.Namespace):
    overrides = {"data.path": str(root / "data"), "train.init_from": str(root / "base"),
                 "train.run_dir": str(root / f"run-lmforge-{os.getpid()}"), "train.device": "cpu",
                 "train.num_threads": args.threads, "train.batch_size": args.prompts,
                 "train.max_steps": args.steps + 1, "train.seed": 0, "optim.lr": LR, "optim.min_lr": LR,
                 "optim.warmup_steps": 0, "train.eval_interval": 0, "train.plot": False,
                 "data.sampling": "sequential", "train.preference_loss": "grpo",
                 "train.grpo_group_size": args.group, "train.online_max_new_tokens": args.completion,
                 "train.online_reward_function": f"{root / 'rewards.py'}:lmforge_reward"}
    trainer = Trainer(load_run_config(None, {k: str(v) for k, v in overrides.items()}), progress=False,
                      tensorboard=False)
    import lmforge.train.online as online

    exact = online.GenerateConfig  # every sample exactly --completion tokens, as TRL's below

    def generate_config(**fields):
        return exact(**fields, min_new_tokens=fields["max_new_tokens"])
    online.GenerateConfig = generate_config
    work: dict[str, list[float]] = {"completion_tokens_mean": [], "prompt_tokens_mean": [], "sampling_seconds": []}
    groups = trainer.sample_groups

    def counted(batch, step, micro):  # the samples' sizes, read off the step's own batch; sampling's time
        started = time.perf_counter()
        out = groups(batch, step, micro)
        work["sampling_seconds"].append(round(time.perf_counter() - started, 3))
        (x, y, _), _ = out
        labelled = y != IGNORE_INDEX  # a sample's tokens, and its end token where it ended
        end = trainer.online.end_id
        work["completion_tokens_mean"].append(float((labelled & (y != end)).sum(dim=1).float().mean()))
        work["prompt_tokens_mean"].append(float(labelled.float().argmax(dim=1).float().mean()) + 1)
        return out
    trainer.sample_groups = counted

    def step() -> float:
        loss_sum, count, _, _ = trainer.train_step()
        trainer.step += 1
        return float(loss_sum / count)
    return step, work


def trl_step(root: Path, args: argparse.Namespace):
    """TRL's GRPOTrainer on the HF export; each step's rows are its prompts, each repeated G times, as text."""
    import importlib.util

    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import GRPOConfig, GRPOTrainer

    spec = importlib.util.spec_from_file_location("rewards", root / "rewards.py")
    rewards = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(rewards)
    policy = AutoModelForCausalLM.from_pretrained(root / "hf")
    tokenizer = AutoTokenizer.from_pretrained(root / "hf")
    lm_tokenizer = Tokenizer.load(root / "tokenizer.json")
    texts = [lm_tokenizer.decode(ids) for ids in prompt_ids(root)]
    rows = args.prompts * args.group
    config = GRPOConfig(output_dir=str(root / f"trl-{os.getpid()}"), report_to=[], use_cpu=True, learning_rate=LR,
                        max_grad_norm=1.0, bf16=False, gradient_checkpointing=False,
                        per_device_train_batch_size=rows, num_generations=args.group,
                        max_completion_length=args.completion, temperature=1.0, beta=0.0, loss_type="dapo",
                        scale_rewards="group", dataloader_num_workers=0, use_vllm=False, logging_steps=1,
                        generation_kwargs={"suppress_tokens": list(range(lm_tokenizer.vocab_size, args.vocab)),
                                           "min_new_tokens": args.completion})
    trainer = GRPOTrainer(model=policy, reward_funcs=rewards.trl_reward, args=config, processing_class=tokenizer,
                          train_dataset=Dataset.from_list([{"prompt": t} for t in texts]))
    optimizer = trainer.create_optimizer()
    trainer.current_gradient_accumulation_steps = 1
    trainer.model.train()
    work: dict[str, list[float]] = {"completion_tokens_mean": [], "prompt_tokens_mean": []}
    count = [0]

    def step() -> float:
        k = count[0]
        count[0] += 1
        batch = [{"prompt": t} for t in texts[k * args.prompts:(k + 1) * args.prompts] for _ in range(args.group)]
        loss = trainer.training_step(trainer.model, batch, None)
        torch.nn.utils.clip_grad_norm_(trainer.model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        metrics = trainer._metrics["train"]
        work["completion_tokens_mean"].append(float(metrics["completions/mean_length"][-1]))
        work["prompt_tokens_mean"].append(float(statistics.mean(
            len(ids) for ids in tokenizer([t for t in texts[k * args.prompts:(k + 1) * args.prompts]])["input_ids"])))
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


def plan_against(args: argparse.Namespace, step_seconds: float, sampling_seconds: float) -> dict:
    """What `lmforge plan` predicts for lmforge's run (rows of --prompt + --completion tokens: the block), against
    the measured step and sampling times."""
    predicted = plan(load_run_config(None, {k: str(v) for k, v in {
        "model.n_layer": args.layers, "model.n_head": args.heads, "model.n_embd": args.width,
        "model.vocab_size": args.vocab, "model.block_size": args.prompt + args.completion,
        "train.batch_size": args.prompts, "train.preference_loss": "grpo", "train.grpo_group_size": args.group,
        "train.online_max_new_tokens": args.completion,
        "train.online_reward_function": "rewards.py:lmforge_reward"}.items()}), task="preference")
    return {"step_seconds": round(predicted.step_time, 3), "sampling_seconds": round(predicted.sampling_time, 3),
            "peak_flops": predicted.peak_flops, "mfu": predicted.mfu, "bandwidth": predicted.bandwidth,
            "step_over_measured": round(predicted.step_time / step_seconds, 3),
            "sampling_over_measured": round(predicted.sampling_time / sampling_seconds, 3),
            "machine": {**machine(), "load_average_at_end": load_average()}}


def main(argv: list[str] | None = None) -> dict:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(argv)
    if args.plan_only:
        if not args.json_out or not Path(args.json_out).is_file():
            raise SystemExit("--plan-only recomputes the plan key of an existing --json-out file: give it")
        torch.set_num_threads(args.threads)
        summary = json.loads(Path(args.json_out).read_text(encoding="utf-8"))
        summary["plan"] = plan_against(args, summary["variants"]["lmforge"]["step_seconds_median"],
                                       summary["lmforge_sampling_seconds_median"])
        print(json.dumps(summary["plan"], indent=2))
        atomic_write_text(Path(args.json_out), json.dumps(summary, indent=2) + "\n")
        return summary
    if args.child:
        variant, root = args.child.split(",")
        print(json.dumps(measure(variant, Path(root), args)))
        return {}
    if args.prompt + args.completion + 1 > args.block:
        raise SystemExit(f"--prompt + --completion + 1 is above --block {args.block}: lower them")
    torch.set_num_threads(args.threads)
    started_on = machine()
    runs: dict[str, list[dict]] = {v: [] for v in VARIANTS}
    with tempfile.TemporaryDirectory(prefix="grpo-step-") as tmp:
        write_inputs(Path(tmp), inputs_args(args))
        (Path(tmp) / "rewards.py").write_text(REWARDS, encoding="utf-8")
        for r in range(args.rounds):
            for variant in VARIANTS:
                runs[variant].append(run_variant(variant, Path(tmp), argv))
                done = runs[variant][-1]
                print(f"round {r + 1}: {variant}: peak {done['peak_training_rss_mib']} MiB, steps "
                      f"{done['step_seconds']} s, completions {done['completion_tokens_mean']}, prompts "
                      f"{done['prompt_tokens_mean']}", file=sys.stderr)
    results = {}
    for variant, done in runs.items():
        results[variant] = {"peak_training_rss_mib": max(d["peak_training_rss_mib"] for d in done),
                            "step_seconds_median": round(statistics.median(t for d in done
                                                                           for t in d["step_seconds"][1:]), 3),
                            "build_seconds_median": round(statistics.median(d["build_seconds"] for d in done), 3),
                            "completion_tokens_mean": round(statistics.mean(
                                c for d in done for c in d["completion_tokens_mean"]), 2),
                            "prompt_tokens_mean": round(statistics.mean(
                                c for d in done for c in d["prompt_tokens_mean"]), 2),
                            "runs": done}
    ours, trl = results["lmforge"], results["trl"]
    sampling = statistics.median(t for d in runs["lmforge"] for t in d["sampling_seconds"][1:])
    summary = {
        "benchmark": "grpo_step", "machine": {**started_on, "load_average_at_end": load_average()},
        "model": {"n_layer": args.layers, "n_embd": args.width, "n_head": args.heads, "vocab_size": args.vocab,
                  "block_size": args.block, "weights": "random"},
        "prompts_per_step": args.prompts, "group_size": args.group, "max_new_tokens": args.completion,
        "prompt_tokens": args.prompt, "timed_steps_per_process": args.steps, "rounds": args.rounds,
        "threads": args.threads, "loss_type": "dapo", "beta": 0.0, "variants": results,
        "step_time_lmforge_over_trl": round(ours["step_seconds_median"] / trl["step_seconds_median"], 3),
        "trl_over_lmforge_speedup": round(trl["step_seconds_median"] / ours["step_seconds_median"], 3),
        "peak_rss_lmforge_over_trl": round(ours["peak_training_rss_mib"] / trl["peak_training_rss_mib"], 3),
        "lmforge_sampling_seconds_median": round(sampling, 3),
    }
    summary["plan"] = plan_against(args, ours["step_seconds_median"], sampling)
    print(json.dumps(summary, indent=2))
    if args.json_out:
        atomic_write_text(Path(args.json_out), json.dumps(summary, indent=2) + "\n")
    return summary


if __name__ == "__main__":
    main()
