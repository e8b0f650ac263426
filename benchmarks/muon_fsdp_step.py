"""Muon's step under FSDP2: the processes sharing out the Newton-Schulz work against each one doing all of it.

A torchrun job of --procs processes (started by this script; gloo on the CPU, one thread each) shards a model with
lmforge's own FSDP2 path (distributed.apply_fsdp: each process holds some rows of every matrix), builds lmforge's
optimizer for it (optim.name muon: BatchedMuon on the blocks' hidden matrices, AdamW on the rest) and fills the
gradients with one real forward and backward. It then times Muon's step alone, turns alternating between:
  shared         lmforge's step (train/muon.py): per matrix shape, an all-to-all turns each process's rows of every
                 matrix into whole matrices, a share each; each process orthogonalises its share; an all-to-all
                 hands the rows back. Each matrix is orthogonalised once in the job.
  every-process  the same step with each shape's matrices all-gathered whole on every process, every process
                 orthogonalising all of them and keeping its rows (lmforge's step before it shared the work)
Reported: the median over rounds of the slowest process's ms per step for each, their ratio, and how far apart the
two updates are (they compute the same numbers: from the same state, both steps leave the same weights).

    python benchmarks/muon_fsdp_step.py --json-out benchmarks/results/muon_fsdp_step-cpu-amd-avx2.json
    python benchmarks/muon_fsdp_step.py --quick       # 2 rounds of 1 step: a check that it runs
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable, Optional

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))  # run from a checkout without installing

from lmforge.config import apply_overrides, read_config_file, run_config_from_dict  # noqa: E402
from lmforge.files import atomic_write_text  # noqa: E402
from lmforge.train import muon  # noqa: E402
from machine import load_average, machine  # noqa: E402  (benchmarks/machine.py)

VARIANTS = ("shared", "every-process")


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default="shakespeare-char", help="a built-in recipe or a config file (the model)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config override (repeatable)")
    p.add_argument("--procs", type=int, default=2, help="processes of the torchrun job")
    p.add_argument("--rounds", type=int, default=7, help="alternating rounds")
    p.add_argument("--steps", type=int, default=5, help="Muon steps per variant per round")
    p.add_argument("--threads", type=int, default=1, help="torch threads per process")
    p.add_argument("--quick", action="store_true", help="2 rounds of 1 step: a check that it runs")
    p.add_argument("--json-out", default=None, help="also write the JSON summary to this file")
    args = p.parse_args(argv)
    if args.quick:
        args.rounds, args.steps = 2, 1
    if args.procs < 2 or args.rounds < 1 or args.steps < 1:
        p.error("--procs must be at least 2, --rounds and --steps positive")
    return args


def every_process(stacked: torch.Tensor, like: torch.Tensor, shape: torch.Size,
                  orthogonalise: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """The reference: all of a shape's matrices gathered whole on every process, all orthogonalised there, and this
    process's rows kept (the signature of muon._orthogonalise_shared)."""
    from torch.distributed.tensor import DTensor, Replicate, Shard

    mesh, whole = like.device_mesh, torch.Size((stacked.size(0), *shape))
    rows = DTensor.from_local(stacked, mesh, [Shard(1)], run_check=False, shape=whole,
                              stride=torch.empty(whole, device="meta").stride())
    done = DTensor.from_local(orthogonalise(rows.full_tensor()).to(stacked.dtype), mesh, [Replicate()],
                              run_check=False)
    return done.redistribute(mesh, [Shard(1)]).to_local()  # a slice: no communication


def worker(args: argparse.Namespace) -> None:
    """One process of the job: shard, fill the gradients, time the variants; rank 0 writes the summary."""
    import torch.distributed as dist

    from lmforge.distributed import apply_fsdp, setup_distributed, teardown_distributed
    from lmforge.model import GPT
    from lmforge.train.optim import build_optimizer

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    device = torch.device("cpu")
    info = setup_distributed(device)
    config = run_config_from_dict(apply_overrides(read_config_file(args.config), {
        "model.vocab_size": "65", **dict(item.split("=", 1) for item in args.set)}))
    model = apply_fsdp(GPT(config.model), info, device)
    optimizer = build_optimizer(model, config.optim, device)
    step_muon = next(opt for opt in optimizer.optimizers if isinstance(opt, muon.BatchedMuon))
    x = torch.randint(0, 65, (4, config.model.block_size))
    torch.nn.functional.cross_entropy(model(x).flatten(0, 1), x.flatten()).backward()
    params = [p for group in step_muon.param_groups for p in group["params"]]
    real = muon._orthogonalise_shared
    ways = {"shared": real, "every-process": every_process}

    def snapshot() -> list[torch.Tensor]:
        return [p.to_local().detach().clone() for p in params] + [step_muon.state[p]["momentum_buffer"].to_local().clone()
                                                         for p in params if p in step_muon.state]

    @torch.no_grad()
    def restore(saved: list[torch.Tensor]) -> None:
        for p, s in zip(params, saved):
            p.to_local().copy_(s)
        for p, s in zip([p for p in params if p in step_muon.state], saved[len(params):]):
            step_muon.state[p]["momentum_buffer"].to_local().copy_(s)

    step_muon.step()  # the momentum buffers exist from here on
    before, after = snapshot(), {}
    for name, way in ways.items():  # one step each from the same state: the same weights after
        muon._orthogonalise_shared = way
        restore(before)
        step_muon.step()
        after[name] = [p.to_local().detach().clone() for p in params]
    restore(before)
    diffs: list[Optional[float]] = [None] * info.world_size
    dist.all_gather_object(diffs, max(float((a - b).abs().max()) for a, b in zip(*after.values())))
    diff = max(d for d in diffs if d is not None)

    times: dict[str, list[float]] = {name: [] for name in ways}
    for r in range(args.rounds):
        for name in (VARIANTS if r % 2 == 0 else VARIANTS[::-1]):
            muon._orthogonalise_shared = ways[name]
            step_muon.step()  # warm
            dist.barrier()
            started = time.perf_counter()
            for _ in range(args.steps):
                step_muon.step()
            dist.barrier()  # the slowest process's time
            times[name].append((time.perf_counter() - started) / args.steps * 1e3)
    muon._orthogonalise_shared = real
    if info.rank == 0:
        shapes = sorted({tuple(p.shape) for p in params})
        summary = {
            "benchmark": "muon_fsdp_step", "config": args.config, "overrides": args.set, "processes": info.world_size,
            "threads_per_process": args.threads, "rounds": args.rounds, "steps_per_round": args.steps,
            "matrices": len(params), "shapes": {str(list(s)): sum(tuple(p.shape) == s for p in params) for s in shapes},
            "ns_dtype": str(step_muon.ns_dtype).removeprefix("torch."),
            "ms_per_step": {name: round(statistics.median(t), 2) for name, t in times.items()},
            "per_round_ms": {name: [round(v, 2) for v in t] for name, t in times.items()},
            "speedup_shared": round(statistics.median(times["every-process"]) / statistics.median(times["shared"]), 3),
            "max_abs_weight_diff_after_one_step": diff,
            "machine": {**machine(), "load_average_at_end": load_average()},
        }
        print(f"Muon step under FSDP, {info.world_size} processes: shared {summary['ms_per_step']['shared']} ms, "
              f"every process {summary['ms_per_step']['every-process']} ms ({summary['speedup_shared']}x); "
              f"weights after one step differ by {diff:.2e}", flush=True)
        if args.json_out:
            atomic_write_text(args.json_out, json.dumps(summary, indent=1) + "\n")
    teardown_distributed(synchronize=True)


def main(argv: Optional[list[str]] = None) -> Optional[dict]:
    """Under torchrun: one worker. Otherwise: start the torchrun job and return its summary (with --json-out)."""
    args = parse_args(argv)
    if "RANK" in os.environ:
        worker(args)
        return None
    argv = sys.argv[1:] if argv is None else argv
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "GLOO_SOCKET_IFNAME": "lo"}
    subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node",
                    str(args.procs), __file__, *argv], env=env, check=True)
    return json.loads(Path(args.json_out).read_text()) if args.json_out else None


if __name__ == "__main__":
    main()
