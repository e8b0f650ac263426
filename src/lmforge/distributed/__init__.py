"""Processes and devices: read torchrun's environment, pick a device, wrap a built model from outside.

Launched plainly, a run is one process (rank 0 of 1). Launched with
``torchrun --nproc-per-node K``, each process joins a process group (nccl on CUDA, gloo otherwise),
trains a DDP-wrapped copy of the model on its own slice of every batch, and only rank 0 writes files.
"""

from __future__ import annotations

import contextlib
import datetime
import gc
import inspect
import os
import sys
from dataclasses import dataclass
from typing import Any, Optional

import torch
import torch.distributed as dist
from torch import nn

from lmforge.errors import ConfigError, LmforgeError


class PeerFailure(LmforgeError):
    """Another process of a distributed job died or stopped answering within train.dist_timeout. Exit code 4."""

    exit_code = 4


@dataclass(frozen=True)
class DistInfo:
    """This process's place in the job."""

    rank: int = 0
    local_rank: int = 0
    world_size: int = 1

    @property
    def is_main(self) -> bool:
        """Rank 0: the one process that writes checkpoints, logs and prints."""
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def resolve_device(name: str = "auto", local_rank: int = 0) -> torch.device:
    """auto -> cuda (this process's GPU), then mps, then cpu; 'cuda' under torchrun -> cuda:local_rank."""
    if name == "auto":
        if torch.cuda.is_available():
            name = "cuda"
        elif getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            name = "mps"
        else:
            name = "cpu"
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise ConfigError(f"device {name!r} was asked for but CUDA is not available; use --device cpu or auto")
        if name == "cuda":
            name = f"cuda:{local_rank}"
    if name == "mps" and not (getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available()):
        raise ConfigError("device 'mps' was asked for but MPS is not available; use --device cpu or auto")
    return torch.device(name)


def _onednn_supports(dtype: torch.dtype) -> bool:
    """torch's own check that oneDNN runs `dtype` (bf16 or fp16) matrix products in CPU instructions made for it."""
    check = "_is_mkldnn_bf16_supported" if dtype == torch.bfloat16 else "_is_mkldnn_fp16_supported"
    try:
        return bool(getattr(torch.ops.mkldnn, check)())
    except (AttributeError, RuntimeError):  # a build without oneDNN
        return False


def has_fast_bf16(device: torch.device) -> bool:
    """Whether bfloat16 matrix products run in hardware on `device`: a CUDA GPU that supports bf16, or a CPU where
    torch sends them to oneDNN (its bf16 check: AVX-512 BW/VL/DQ, native with AVX512-BF16 or AMX; or AVX-NE-CONVERT;
    an ARM CPU with bf16). Without them (an AVX2-only CPU) torch falls back to a scalar bf16 kernel: torch.mm 28-93x
    slower than fp32 from 128^3 to 1024^3 (benchmarks/results/bf16_speed-cpu-amd-avx2.json), so bf16 must not be
    used there."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device.type == "cpu":
        return _onednn_supports(torch.bfloat16)
    return True  # mps and others: their own kernels


def has_fast_half(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether matrix products in `dtype` (torch.bfloat16 or torch.float16) run in hardware on `device`. bf16:
    has_fast_bf16. fp16: on a CPU, torch's oneDNN fp16 check (AVX512-FP16 or AVX-NE-CONVERT); without them torch
    falls back to a scalar kernel as for bf16 (torch.mm fp16 at 384^3, one thread, on an AVX2-only AMD EPYC: ~45 ms
    against fp32's ~1.6 ms, timed by hand); CUDA GPUs, mps and others have fp16 kernels of their own."""
    if dtype == torch.bfloat16:
        return has_fast_bf16(device)
    return _onednn_supports(dtype) if device.type == "cpu" else True


# dtype -> (its name, the CPU instructions that run its matrix products fast)
_HALF_INSTRUCTIONS = {torch.bfloat16: ("bf16", "AVX512-BF16 or AMX"),
                      torch.float16: ("fp16", "AVX512-FP16 or AVX-NE-CONVERT")}


def slow_half_warning(device: torch.device, setting: str, fix: str,
                      dtype: torch.dtype = torch.bfloat16) -> Optional[str]:
    """The one-line warning for `setting` (what asked for `dtype`, bf16 or fp16, e.g. "train.precision=bf16-mixed")
    on a CPU `device` where has_fast_half is False, naming `fix` (e.g. "--train.precision fp32"); None where `dtype`
    is fine. A warning, not an error: the results are right, only slow."""
    if device.type != "cpu" or has_fast_half(device, dtype):
        return None
    name, instructions = _HALF_INSTRUCTIONS[dtype]
    return (f"{setting} on a CPU without {name} matrix instructions (no {instructions}): {name} matrix products "
            f"run far slower than fp32 here; use {fix}")


def setup_distributed(device: torch.device, timeout_s: float = 60.0) -> DistInfo:
    """Join the process group that torchrun describes in RANK/WORLD_SIZE/LOCAL_RANK; a no-op without it.

    timeout_s: how long a collective waits for the other processes before it fails, so a process whose
    peer died ends instead of hanging (torchrun also tears the job down when one worker exits).
    Safe to call twice (the second call finds the group already set up).
    """
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1:
        return DistInfo()
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group(backend=backend, device_id=device if device.type == "cuda" else None,
                                timeout=datetime.timedelta(seconds=timeout_s))
    return DistInfo(rank=rank, local_rank=local_rank, world_size=world_size)


def as_peer_failure(error: BaseException) -> Optional[PeerFailure]:
    """A one-line PeerFailure for an error a collective raised because another process died or hung, else None."""
    if not (dist.is_available() and dist.is_initialized()) or not isinstance(error, RuntimeError):
        return None
    text = str(error)
    signs = ("Connection closed by peer", "Connection reset by peer", "Timed out", "timed out", "Broken pipe",
             "NCCL communicator was aborted", "Socket Timeout")
    if not (isinstance(error, dist.DistError) or any(s in text for s in signs)):
        return None
    detail = " ".join(text.split())[:200]
    return PeerFailure(f"another process of this job (rank {dist.get_rank()} of {dist.get_world_size()}) died or stopped "
                       f"answering ({detail}); restart the whole job with --resume auto")


def teardown_distributed(synchronize: bool = False) -> None:
    """Leave the process group, if one was joined.

    synchronize: wait for every process first (when all are known to be alive and finishing), so that no
    process dismantles its connections while another still uses them: gloo can abort the slower process
    otherwise. Leave it False on a failure path, where a barrier would wait for a dead peer.
    """
    if dist.is_available() and dist.is_initialized():
        if synchronize:
            dist.barrier()
        # what a finished run left in reference cycles (a DDP wrapper holds the group) goes now, with the group:
        # a gloo group destroyed during interpreter shutdown instead can abort the process (SIGABRT) as it exits
        gc.collect()
        dist.destroy_process_group()


def apply_compile(model: nn.Module) -> nn.Module:
    """torch.compile the model (the returned wrapper shares its parameters with `model`)."""
    return torch.compile(model)


def apply_ddp(model: nn.Module, info: DistInfo, device: torch.device) -> nn.Module:
    """Wrap `model` in DistributedDataParallel when there is more than one process; else return it as is.

    DDP averages gradients over the processes during backward, so every replica takes the same step. Buffers are
    not broadcast at each step: every one lmforge's models hold is the same on all processes by construction (RoPE
    tables from the config, QLoRA's 4-bit weights from the one base), and the 4-bit ones are most of a QLoRA model.
    """
    if not info.enabled:
        return model
    from torch.nn.parallel import DistributedDataParallel as DDP

    ids = [device.index] if device.type == "cuda" else None
    # (torch 2.13 renamed broadcast_buffers forward_sync_buffers and warns about the old name)
    named = "forward_sync_buffers" if "forward_sync_buffers" in inspect.signature(DDP).parameters else \
        "broadcast_buffers"
    return DDP(model, device_ids=ids, **{named: False})


def apply_fsdp(model: nn.Module, info: DistInfo, device: torch.device, precision: str = "fp32",
               cpu_offload: bool = False) -> nn.Module:
    """Shard `model` in place with FSDP2 (fully_shard) on each block and at the root; returns it (one process: as is).

    Each process keeps 1/world_size of every weight, gradient and optimizer moment; a block's weights are
    all-gathered just before its forward and backward and freed after, and gradients are reduce-scattered
    (averaged over processes, like DDP). Call it before building the optimizer: the parameters become DTensors.
    precision bf16-mixed computes in bfloat16 and reduces gradients in fp32 (MixedPrecisionPolicy); cpu_offload
    keeps the shards and the optimizer step on the host (CPUOffloadPolicy), for a model too big for the GPUs.
    """
    if cpu_offload and device.type != "cuda":
        raise ConfigError(f"train.fsdp_cpu_offload moves the weight shards from the GPUs to host memory; on device "
                          f"{device.type} they are there already: drop it")
    if not info.enabled:
        return model
    return shard_model(model, precision, cpu_offload)


def shard_model(model: nn.Module, precision: str = "fp32", cpu_offload: bool = False) -> nn.Module:
    """apply_fsdp's sharding, done in the current process group whatever its size (apply_fsdp leaves one process
    unwrapped; benchmarks/gpu_check.py shards a one-process group to time FSDP2's own cost): fully_shard on each
    block and at the root, with apply_fsdp's precision and cpu_offload policies. Modifies and returns `model`."""
    from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, fully_shard

    options: dict[str, Any] = {}
    if precision == "bf16-mixed":
        options["mp_policy"] = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    if cpu_offload:
        options["offload_policy"] = CPUOffloadPolicy()
    for block in getattr(unwrap(model), "blocks", []):
        fully_shard(block, **options)
    fully_shard(model, **options)  # the rest: embeddings, final norm, head (a tied head shares the embedding's shard)
    return model


def is_sharded(model: nn.Module) -> bool:
    """Whether `model` was sharded by apply_fsdp (its parameters are DTensor shards). Not importing FSDP to find out
    (a quarter of a second): a model can be an FSDPModule only once torch.distributed.fsdp was imported."""
    fsdp = sys.modules.get("torch.distributed.fsdp")
    return fsdp is not None and isinstance(unwrap(model), fsdp.FSDPModule)


def full_state(model: nn.Module, optimizer: Optional[torch.optim.Optimizer]) -> tuple[dict, Optional[dict]]:
    """(model state dict, optimizer state dict) of a sharded model, whole, on the CPU of rank 0 ({} elsewhere).

    A collective: every process calls it. The optimizer's state comes in the plain form optimizer.state_dict()
    gives one process (state and param_groups keyed by parameter index, not name), so a checkpoint is written
    by the same code whatever the number of processes.
    """
    from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                         get_optimizer_state_dict)

    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    weights = get_model_state_dict(model, options=options)
    if optimizer is None:
        return weights, None
    named = get_optimizer_state_dict(model, _torch_optimizers(optimizer), options=options)
    if not named:  # not rank 0
        return weights, {}
    return weights, _by_index(named)


def _torch_optimizers(optimizer: Any) -> Any:
    """What torch's state_dict helpers take: the optimizer, or the torch optimizers of one that steps several
    (train.optim.MuonWithAdamW: AdamW's groups, then Muon's, the order of its param_groups and state indices)."""
    return tuple(getattr(optimizer, "optimizers", None) or (optimizer,))


def _by_index(named: dict) -> dict:
    """An optimizer state dict keyed by parameter name (the state_dict helpers' form) -> keyed by index, the form
    optimizer.state_dict() gives one process (indices in the order of the param groups)."""
    index = {name: i for i, name in enumerate(n for group in named["param_groups"] for n in group["params"])}
    groups = [{**group, "params": [index[n] for n in group["params"]]} for group in named["param_groups"]]
    return {"state": {index[n]: entry for n, entry in named["state"].items()}, "param_groups": groups}


def _by_name(model: nn.Module, optimizer: torch.optim.Optimizer, state: dict) -> dict:
    """The inverse of _by_index for `optimizer` stepping `model`'s parameters."""
    names = optimizer_param_names(model, optimizer)
    return {"state": {names[i]: entry for i, entry in state["state"].items()},
            "param_groups": [{**group, "params": [names[i] for i in group["params"]]} for group in state["param_groups"]]}


def optimizer_param_names(model: nn.Module, optimizer: torch.optim.Optimizer) -> list[str]:
    """The name of each parameter `optimizer` steps, in its index order (param groups in order)."""
    by_id = {id(p): name for name, p in unwrap(model).named_parameters()}
    return [by_id[id(p)] for group in optimizer.param_groups for p in group["params"]]


def local_state(model: nn.Module, optimizer: Optional[torch.optim.Optimizer]) -> tuple[dict, Optional[dict]]:
    """(model state dict, optimizer state dict keyed by index) as this process holds them, on the CPU: a sharded
    weight or AdamW moment is a DTensor whose to_local() is this process's rows (FSDP2 shards dim 0, Shard(0));
    anything else (the step counts; every tensor of an unsharded model) is whole. Nothing is gathered."""
    from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                         get_optimizer_state_dict)

    options = StateDictOptions(full_state_dict=False, cpu_offload=True)
    weights = get_model_state_dict(model, options=options)
    if optimizer is None:
        return weights, None
    return weights, _by_index(get_optimizer_state_dict(model, _torch_optimizers(optimizer), options=options))


def held_rows(tensors: dict[str, torch.Tensor]) -> dict[str, Optional[tuple[int, int]]]:
    """{name: (start, stop)}: the rows along dim 0 of each sharded tensor (a DTensor, FSDP2's Shard(0)) this process
    holds; None for a whole tensor. With sharded tensors a collective (every process calls it with the same names):
    the shards lie in rank order, so a process's rows start where the lower ranks' end."""
    from torch.distributed.tensor import DTensor, Shard

    counts = {}
    for name, tensor in tensors.items():
        if isinstance(tensor, DTensor):
            if tuple(tensor.placements) != (Shard(0),):
                raise ValueError(f"{name} is placed {tensor.placements}; sharded checkpoints hold Shard(0) tensors")
            counts[name] = tensor.to_local().shape[0]
    rows: dict[str, Optional[tuple[int, int]]] = {name: None for name in tensors}
    if not counts:
        return rows
    every: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(every, counts)
    for name in counts:
        start = sum(c[name] for c in every[: dist.get_rank()])
        rows[name] = (start, start + counts[name])
        if sum(c[name] for c in every) != tensors[name].shape[0]:
            raise ValueError(f"the shards of {name} do not add up to its {tensors[name].shape[0]} rows")
    return rows


def load_local_state(model: nn.Module, weights: dict[str, torch.Tensor], optimizer: Optional[torch.optim.Optimizer] = None,
                     optimizer_state: Optional[dict] = None) -> None:
    """Load this process's part of the state (`weights` by name, `optimizer_state` keyed by index as local_state
    gives it): a tensor of a sharded weight or moment holds this process's rows (held_rows), anything else is
    whole. Each process reads only its rows, so no process ever holds the whole model."""
    from torch.distributed.checkpoint.state_dict import (StateDictOptions, set_model_state_dict,
                                                         set_optimizer_state_dict)
    from torch.distributed.tensor import DTensor

    def like(target: torch.Tensor, local: torch.Tensor) -> torch.Tensor:
        if not isinstance(target, DTensor):
            return local
        return DTensor.from_local(local.to(target.device), target.device_mesh, target.placements, run_check=False,
                                  shape=target.shape, stride=target.stride())

    params = dict(unwrap(model).state_dict(keep_vars=True))
    options = StateDictOptions(full_state_dict=False)
    set_model_state_dict(model, {name: like(params[name], t) for name, t in weights.items()}, options=options)
    if optimizer is not None and optimizer_state is not None:
        names = optimizer_param_names(model, optimizer)
        state = {"state": {i: {key: like(params[names[i]], v) if torch.is_tensor(v) and v.ndim > 0 else v
                               for key, v in entry.items()} for i, entry in optimizer_state["state"].items()},
                 "param_groups": optimizer_state["param_groups"]}
        set_optimizer_state_dict(model, _torch_optimizers(optimizer), _by_name(model, optimizer, state),
                                 options=options)


def load_full_state(model: nn.Module, weights: Optional[dict], optimizer: Optional[torch.optim.Optimizer] = None,
                    optimizer_state: Optional[dict] = None) -> None:
    """Load whole state dicts (as full_state returns them, read from a checkpoint by every process) into a sharded
    model and its optimizer: each process keeps its own shard, so any number of processes can resume any checkpoint."""
    from torch.distributed.checkpoint.state_dict import (StateDictOptions, set_model_state_dict,
                                                         set_optimizer_state_dict)

    options = StateDictOptions(full_state_dict=True)
    if weights is not None:
        set_model_state_dict(model, weights, options=options)
    if optimizer is not None and optimizer_state is not None:
        set_optimizer_state_dict(model, _torch_optimizers(optimizer), _by_name(model, optimizer, optimizer_state),
                                 options=options)


@contextlib.contextmanager
def no_sync(model: nn.Module, info: DistInfo):
    """Within it, backward accumulates gradients locally (all micro-batches of a step but the last): DDP's no_sync,
    FSDP2's set_requires_gradient_sync(False). No-op for one process."""
    if not info.enabled:
        yield
    elif is_sharded(model):
        unwrap(model).set_requires_gradient_sync(False)
        try:
            yield
        finally:
            unwrap(model).set_requires_gradient_sync(True)
    else:
        with model.no_sync():
            yield


def unwrap(model: nn.Module) -> nn.Module:
    """The plain model inside DDP and torch.compile wrappers (what checkpoints save and load)."""
    while True:
        if hasattr(model, "module") and isinstance(model.module, nn.Module):  # DDP
            model = model.module
        elif hasattr(model, "_orig_mod"):  # torch.compile
            model = model._orig_mod
        else:
            return model


def all_reduce_sum(values: torch.Tensor, info: DistInfo) -> torch.Tensor:
    """Sum `values` over all processes (in place; returned for chaining). No-op for one process."""
    if info.enabled:
        dist.all_reduce(values, op=dist.ReduceOp.SUM)
    return values


def gather_objects(obj: Any, info: DistInfo) -> list[Any]:
    """[obj of rank 0, obj of rank 1, ...] on every rank (small JSON-like objects only)."""
    if not info.enabled:
        return [obj]
    out: list[Any] = [None] * info.world_size
    dist.all_gather_object(out, obj)
    return out


def barrier(info: DistInfo) -> None:
    """Wait until every process reaches this point."""
    if info.enabled:
        dist.barrier()
