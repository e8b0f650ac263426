"""GPU check: train gpt2-124m (or --preset) in bf16 with torch.compile and fused (flash) attention on synthetic tokens.

Prints tokens/s, MFU against the chip's dense bf16 peak (and against a measured matrix-product rate),
whether the flash-attention backend is available and whether its kernels ran, then one JSON line.
Capped by --steps and by --max-seconds (compilation included), so it ends in a few minutes.

    python benchmarks/gpu_check.py                       # CUDA, ~300 steps, <= 4 minutes
    python benchmarks/gpu_check.py --device cpu --steps 3 --preset char-small  # smoke test on a CPU (no compile)
    python benchmarks/gpu_check.py --parallel fsdp         # the same step through FSDP2 (or ddp) in a 1-process group

--parallel ddp | fsdp wraps the model as a torchrun job of one process would be, if lmforge wrapped it there (it does
not: one process trains the bare model): DistributedDataParallel, or FSDP2's fully_shard on each block and at the
root with bf16 compute and fp32 gradient reduction, so the wrappers' own cost on one GPU shows against --parallel none.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))  # run from a checkout without installing

from lmforge.config import PRESETS, OptimConfig, preset  # noqa: E402
from lmforge.distributed import shard_model  # noqa: E402
from lmforge.files import atomic_write_text  # noqa: E402
from lmforge.model import GPT, flops_per_token  # noqa: E402
from machine import load_average, machine  # noqa: E402  (benchmarks/machine.py)

# Dense bf16 tensor-core peaks from the vendors' datasheets (no sparsity), FLOP/s.
BF16_PEAKS = {"H200": 989e12, "H100": 989e12, "GH200": 989e12, "A100": 312e12, "L40S": 362e12,
              "A10G": 70e12, "L4": 121e12, "4090": 165e12, "B200": 2250e12}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda", help="cuda | cuda:N | cpu")
    p.add_argument("--preset", default="gpt2-124m", choices=sorted(PRESETS),
                   help="the model (a preset of lmforge.config.PRESETS); a smaller one for a smoke test on a CPU whose "
                        "bf16 products have no hardware (gpt2-124m in bf16 takes minutes there)")
    p.add_argument("--steps", type=int, default=300, help="optimizer steps at most")
    p.add_argument("--max-seconds", type=float, default=240.0, help="stop after this long, compile included")
    p.add_argument("--batch-size", type=int, default=None, help="sequences per step (default 32 on cuda, 1 on cpu)")
    p.add_argument("--block-size", type=int, default=None, help="context (default 1024 on cuda, 64 on cpu)")
    p.add_argument("--compile", choices=("auto", "on", "off"), default="auto", help="auto: on for cuda only")
    p.add_argument("--compile-scope", choices=("model", "loss"), default="model",
                   help="model: compile the model alone (as the trainer does; run on an H200); loss: compile model + "
                        "cross-entropy together, so the fp32 upcast of the (B, T, V) logits fuses into the loss")
    p.add_argument("--compile-mode", default="default",
                   choices=("default", "reduce-overhead", "max-autotune-no-cudagraphs", "max-autotune"),
                   help="torch.compile's mode: reduce-overhead replays the step's kernels as CUDA graphs (no launch "
                        "gaps); max-autotune also times Triton matmul templates (minutes of compiling)")
    p.add_argument("--vocab-size", type=int, default=None,
                   help="override gpt2-124m's 50257, e.g. 50304 (a multiple of 128: faster LM-head products)")
    p.add_argument("--peak-tflops", type=float, default=None, help="the chip's dense bf16 peak, if not detected")
    p.add_argument("--parallel", choices=("none", "ddp", "fsdp"), default="none",
                   help="wrap the model in DDP or FSDP2 within a one-process group (nccl on cuda, gloo on cpu)")
    p.add_argument("--loss-chunk", type=int, default=1024,
                   help="tokens per chunk of the head fused with its loss (train.loss_chunk); 0: the whole logits, "
                        "then F.cross_entropy")
    p.add_argument("--seed", type=int, default=1337)
    p.add_argument("--json-out", default=None, help="also write the JSON summary to this file")
    return p.parse_args(argv)


def detect_peak(device: torch.device, override: float | None) -> tuple[float | None, str]:
    """(bf16 peak FLOP/s or None, the name it was found by)."""
    if override:
        return override * 1e12, "--peak-tflops"
    if device.type != "cuda":
        return None, "cpu (use --peak-tflops)"
    name = torch.cuda.get_device_name(device)
    for key, peak in BF16_PEAKS.items():
        if key in name:
            return peak, name
    return None, f"{name} (unknown; use --peak-tflops)"


def measured_bf16_rate(device: torch.device, n: int) -> float:
    """FLOP/s of an n x n x n bf16 matrix product (median of 10 after 3 warm-ups)."""
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    times = []
    for i in range(13):
        sync(device)
        t0 = time.perf_counter()
        a @ b
        sync(device)
        if i >= 3:
            times.append(time.perf_counter() - t0)
    return 2 * n**3 / statistics.median(times)


def flash_available(device: torch.device) -> tuple[bool, str]:
    """Whether SDPA runs (forward and backward) when restricted to the flash-attention backend."""
    if device.type != "cuda":
        return False, "flash attention is a CUDA backend"
    from torch.nn.attention import SDPBackend, sdpa_kernel

    q, k, v = (torch.randn(2, 12, 1024, 64, device=device, dtype=torch.bfloat16, requires_grad=True)
               for _ in range(3))
    try:
        with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
            torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True).sum().backward()
        sync(device)
        return True, "ok"
    except RuntimeError as e:
        return False, str(e).splitlines()[0][:200]


def wrap(model: torch.nn.Module, parallel: str, device: torch.device) -> torch.nn.Module:
    """`model` as the step should call it: itself, DDP(model), or the model sharded in place by FSDP2, each in a
    process group of this one process (lmforge.distributed's apply_ddp and apply_fsdp leave a single process
    unwrapped; FSDP2 through distributed.shard_model, apply_fsdp's own sharding)."""
    if parallel == "none":
        return model
    import socket

    import torch.distributed as dist

    with socket.socket() as s:  # a free loopback port for the group's rendezvous
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo", init_method=f"tcp://127.0.0.1:{port}",
                            rank=0, world_size=1, **({"device_id": device} if device.type == "cuda" else {}))
    if parallel == "ddp":
        from torch.nn.parallel import DistributedDataParallel as DDP

        return DDP(model, device_ids=[device.index or 0] if device.type == "cuda" else None)
    return shard_model(model, "bf16-mixed")  # what apply_fsdp does to a job of several processes


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def build_optimizer(model: torch.nn.Module, device: torch.device) -> tuple[torch.optim.Optimizer, str]:
    """The trainer's AdamW builder when present (fused on CUDA), else plain fused AdamW."""
    optim = OptimConfig(lr=6e-4, min_lr=6e-5, weight_decay=0.1, beta1=0.9, beta2=0.95)
    try:
        from lmforge.train.optim import build_optimizer as lmforge_build_optimizer
    except ImportError as e:
        fused = {"fused": True} if device.type == "cuda" else {}
        return torch.optim.AdamW(model.parameters(), lr=optim.lr, betas=(optim.beta1, optim.beta2),
                                 weight_decay=optim.weight_decay, **fused), f"torch.optim.AdamW(fused) ({e})"
    return lmforge_build_optimizer(model, optim, device), "lmforge.train.optim.build_optimizer"


def kernel_kind(name: str) -> str:
    """The kind of work a CUDA kernel does, by its name: attention, matmul, fused (inductor's Triton) or other."""
    low = name.lower()
    if "flash" in low or "fmha" in low or "sdpa" in low:
        return "attention"
    if any(k in low for k in ("gemm", "nvjet", "xmma", "cutlass", "cublas")):
        return "matmul"
    return "fused" if low.startswith("triton") else "other"


def kernel_table(kernels: list[tuple[str, float]], top: int = 15) -> dict:
    """(name, device ms) of a step's kernels -> total ms, ms and share by kind, and the `top` longest kernels."""
    total = sum(ms for _, ms in kernels) or 1.0
    by_kind: dict[str, float] = {}
    for name, ms in kernels:
        by_kind[kernel_kind(name)] = by_kind.get(kernel_kind(name), 0.0) + ms
    longest = sorted(kernels, key=lambda k: -k[1])[:top]
    return {"device_ms": round(total, 3), "ms_by_kind": {k: round(v, 3) for k, v in sorted(by_kind.items())},
            "share_by_kind": {k: round(v / total, 4) for k, v in sorted(by_kind.items())},
            "top": [{"kernel": n[:120], "kind": kernel_kind(n), "ms": round(ms, 3)} for n, ms in longest]}


def profile_step(step, device: torch.device) -> list[tuple[str, float]]:
    """(kernel name, device ms summed over its calls) of one training step's CUDA kernels; [] off CUDA."""
    if device.type != "cuda":
        return []
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        step()
        sync(device)
    kernels = []
    for e in prof.key_averages():
        us = getattr(e, "self_device_time_total", None)
        kernels.append((e.key, (us if us is not None else e.self_cuda_time_total) / 1000))
    return kernels


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    start = time.perf_counter()
    here = machine()
    device = torch.device(args.device)
    on_cuda = device.type == "cuda"
    if on_cuda and not torch.cuda.is_available():
        raise SystemExit("no CUDA device is visible; run with --device cpu for the smoke test")
    if on_cuda and device.index is None:  # a process group's device_id needs the index
        device = torch.device("cuda", torch.cuda.current_device())
    B = args.batch_size or (32 if on_cuda else 1)
    T = args.block_size or (1024 if on_cuda else 64)
    use_compile = args.compile == "on" or (args.compile == "auto" and on_cuda)
    torch.manual_seed(args.seed)
    if on_cuda:
        torch.backends.cuda.matmul.allow_tf32 = True  # only matters for the fp32 pieces outside autocast
        torch.backends.cudnn.allow_tf32 = True

    config = preset(args.preset, block_size=T, dropout=0.0, **({"vocab_size": args.vocab_size} if args.vocab_size else {}))
    with torch.device(device):
        model = GPT(config)
    wrapped = wrap(model, args.parallel, device)  # before the optimizer: FSDP2 turns the parameters into DTensors
    optimizer, optimizer_name = build_optimizer(model, device)

    def forward_loss(x: torch.Tensor, y: torch.Tensor, net: torch.nn.Module) -> torch.Tensor:
        with torch.autocast(device_type=device.type, dtype=torch.bfloat16):
            if args.loss_chunk:  # what the Trainer does: the summed loss of the head fused with it, chunk by chunk
                return net(x, targets=y, loss_chunk=args.loss_chunk) / y.numel()
            logits = net(x)  # (B, T, V)
        return torch.nn.functional.cross_entropy(logits.float().flatten(0, 1), y.flatten())

    mode = None if args.compile_mode == "default" else args.compile_mode
    if use_compile and args.compile_scope == "loss":
        compiled = torch.compile(forward_loss, mode=mode)
        loss_of = lambda x, y: compiled(x, y, wrapped)  # noqa: E731
    else:
        net = torch.compile(wrapped, mode=mode) if use_compile else wrapped
        loss_of = lambda x, y: forward_loss(x, y, net)  # noqa: E731
    flash_ok, flash_note = flash_available(device)

    gen = torch.Generator(device=device).manual_seed(args.seed)
    batches = [torch.randint(0, config.vocab_size, (B, T + 1), device=device, generator=gen) for _ in range(8)]
    losses: list[float] = []

    def step(i: int = 0) -> torch.Tensor:
        tokens = batches[i % len(batches)]
        x, y = tokens[:, :-1], tokens[:, 1:]
        loss = loss_of(x, y)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.detach()

    # Warm-up: compilation happens in the first steps; they are not timed.
    warmup = min(3, max(1, args.steps // 3))
    for i in range(warmup):
        losses.append(float(step(i)))
    sync(device)
    compile_s = time.perf_counter() - start

    timed_steps, t0 = 0, time.perf_counter()
    deadline = start + args.max_seconds * 0.85  # leave room for the profile step and the summary
    step_loss = None
    for i in range(warmup, args.steps):
        step_loss = step(i)
        timed_steps += 1
        if timed_steps % 10 == 0:
            losses.append(float(step_loss))  # a sync every 10 steps keeps the queue short and the clock honest
            if time.perf_counter() > deadline:
                break
    sync(device)
    elapsed = time.perf_counter() - t0
    if step_loss is not None:
        losses.append(float(step_loss))

    tokens_per_s = timed_steps * B * T / elapsed if timed_steps else 0.0
    fpt = flops_per_token(config)
    peak, peak_source = detect_peak(device, args.peak_tflops)
    measured = measured_bf16_rate(device, 8192 if on_cuda else 256)  # a CPU without bf16 hardware: 1024^3 takes 2 s
    peak_memory = torch.cuda.max_memory_allocated(device) if on_cuda else None
    kernels = profile_step(lambda: step(0), device)
    flash_kernels = sorted(n[:120] for n, _ in kernels if "flash" in n.lower() or "fmha" in n.lower())

    summary = {
        "benchmark": "gpu_check", "device": torch.cuda.get_device_name(device) if on_cuda else "cpu",
        "machine": here, "model": args.preset, "params": sum(p.numel() for p in model.parameters()),
        "batch_size": B, "block_size": T, "precision": "bf16-mixed", "compile": use_compile, "parallel": args.parallel,
        "model_class": type(wrapped).__name__,  # GPT, DistributedDataParallel, or FSDPGPT (fully_shard's subclass)
        "compile_scope": args.compile_scope if use_compile else None,
        "compile_mode": args.compile_mode if use_compile else None, "vocab_size": config.vocab_size,
        "optimizer": optimizer_name, "loss_chunk": args.loss_chunk,
        "peak_memory_allocated_gib": round(peak_memory / 2**30, 2) if peak_memory else None,
        "warmup_steps": warmup, "timed_steps": timed_steps,
        "compile_and_warmup_s": round(compile_s, 1), "timed_s": round(elapsed, 2),
        "tokens_per_s": round(tokens_per_s), "flops_per_token": fpt,
        "achieved_tflops": round(fpt * tokens_per_s / 1e12, 3),
        "peak_bf16_tflops": peak / 1e12 if peak else None, "peak_source": peak_source,
        "mfu": round(fpt * tokens_per_s / peak, 4) if peak else None,
        "measured_bf16_matmul_tflops": round(measured / 1e12, 3),
        "mfu_vs_measured_matmul": round(fpt * tokens_per_s / measured, 4),
        "flash_backend_available": flash_ok, "flash_backend_note": flash_note,
        "flash_kernels_in_step": flash_kernels, "flash_used": bool(flash_kernels),
        # which implementation of flash attention ran: cuDNN's (SDPBackend.CUDNN_ATTENTION) or PyTorch's FA2 kernels
        "flash_implementation": ("cudnn" if any("cudnn" in k for k in flash_kernels)
                                 else "pytorch-flash" if flash_kernels else None),
        "kernels": kernel_table(kernels) if kernels else None,  # where one step's device time goes
        "loss_first": round(losses[0], 4), "loss_last": round(losses[-1], 4),
        "total_s": round(time.perf_counter() - start, 1),
    }
    here["load_average_at_end"] = load_average()
    print(f"device {summary['device']}  compile={use_compile} ({summary['compile_scope']})  B={B} T={T} "
          f"V={config.vocab_size}  loss_chunk {args.loss_chunk}  steps timed {timed_steps}  optimizer {optimizer_name}"
          f"  peak memory {summary['peak_memory_allocated_gib']} GiB")
    print(f"tokens/s {tokens_per_s:,.0f}  achieved {summary['achieved_tflops']} TFLOP/s  "
          f"MFU {summary['mfu']} (peak {summary['peak_bf16_tflops']} TFLOP/s from {peak_source})  "
          f"vs measured matmul {summary['measured_bf16_matmul_tflops']} TFLOP/s: {summary['mfu_vs_measured_matmul']}")
    print(f"flash attention backend available: {flash_ok} ({flash_note}); flash kernels in a step: "
          f"{flash_kernels[:3] or 'none'}")
    if kernels:
        print(f"one step's kernels: {summary['kernels']['device_ms']} ms on the device, by kind "
              f"{summary['kernels']['ms_by_kind']}")
    print(f"loss {summary['loss_first']} -> {summary['loss_last']}  total {summary['total_s']} s")
    print(json.dumps(summary))
    if args.json_out:
        atomic_write_text(args.json_out, json.dumps(summary, indent=2) + "\n")
    if args.parallel != "none":
        torch.distributed.destroy_process_group()
    return summary


if __name__ == "__main__":
    main()
