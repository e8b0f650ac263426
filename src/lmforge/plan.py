"""`lmforge plan`: the compute, memory and time a training run needs, from its config, before running it.

    estimate = plan(config, tokens=None, device="cpu", gpus=1)   # a Plan: parameters, FLOPs, bytes, seconds
    print(format_plan(estimate))
    measured = measure(config, steps=3)                           # a few real Trainer steps here: RSS, step time

The counts, and where each comes from:
  parameters          model.count_parameters (a tied embedding once); non-embedding as Kaplan et al. 2020
  FLOPs per token     model.flops_per_token: 6N + 12 * n_layer * n_head * head_dim * T (PaLM, appendix B)
  compute-optimal     about 20 training tokens per parameter (Hoffmann et al. 2022, "Chinchilla", table 3)
  weights, gradients  fp32: 4 + 4 bytes per parameter (bf16-mixed keeps fp32 weights and gradients, and autocast
                      caches a bf16 copy of the weights in the matrix products: 2 more)
  optimizer state     AdamW's two moments in fp32: 8 bytes per trained parameter
  activations         what autograd keeps for the backward pass, counted per token from lmforge's own blocks
                      (activation_elements); sdpa keeps no T x T matrix; with activation checkpointing only each
                      block's input is kept, plus one block's activations while it is recomputed
  LoRA (lora.*)       the frozen base's weights, the adapters' weights, gradients and AdamW state, and each
                      adapter's r-wide output per token on top of the full model's activations (an upper bound:
                      a frozen matrix keeps no input for a weight gradient); the steps compute no weight gradients
                      of the frozen matrices: 4N + 6 x adapters + attention FLOPs per token
  preference data     (data.path's manifest, or --task preference) a batch of B pairs is 2B sequences; DPO and
                      the other reference losses keep a frozen fp32 copy of the model (none with new LoRA
                      adapters: they turn off; one when they come from a LoRA run) and run its forward on every
                      sequence: 2N + attention/3 more FLOPs per token; simpo and orpo keep and run no reference,
                      nor does train.precompute_reference; a reward model (train.objective reward) neither: its
                      one-output head reads each example whole
  unpaired data       (--task unpaired, KTO) a batch of B completions trains B sequences; the reference's forward
                      runs on them and, for kto, the policy's and the reference's on the B mismatched rows
                      too (no gradients): 3 x (2N + attention/3) more FLOPs per token (apo_zero_unpaired: 1 x)
  online sampling     (train.online_reward_model / online_reward_function: online DPO, GRPO) each generation
                      samples n completions of every prompt (2, or grpo_group_size) to online_max_new_tokens, the
                      longest case: the prompt cut to block_size - max_new_tokens, every sample to the limit. Its
                      forward passes (prefill and one per new token, a KV cache) are fpt/3 FLOPs per token of the
                      rows; each new token reads the cache so far, and the weights: on a GPU at the bandwidth, on a
                      CPU within the products of a few rows, timed here for the model's shapes (F.linear of rows x
                      n_embd by 4 n_embd, and by the vocabulary: far below the peak); a reward model's forward over
                      the rows (when its run can be read), and with grpo_iterations > 1 the policy's
                      log-probabilities of them, add up; all of it divided by
                      grpo_iterations (one generation trains that many steps). Its KV cache lives only while
                      sampling, when the training activations do not: the peak counts the larger of the two.
                      A reward function's own time is not counted. On-policy distillation (train.distill_on_policy
                      lambda) samples one completion of each prompt in a share lambda of the micro-batches.
  distillation        (train.distill_from) the teacher's forward on every row, fpt_teacher/3 FLOPs per token at the
                      student's row length, its weights (bf16 under a bf16 precision) and hidden states; the fused
                      divergence holds about six (chunk x vocabulary) fp32 arrays where the cross-entropy holds one
  train.init_from     the plan (and --measure) counts that checkpoint's model, as `lmforge train` trains it (the
                      config's model section when the checkpoint cannot be read yet, with a note)
  DDP / FSDP          DDP: every GPU holds everything, and its gradient buckets hold another fp32 copy of the
                      gradients; FSDP (full shard): weights, gradients and optimizer state are split over the GPUs,
                      plus the largest block gathered whole (two while the next one is prefetched)
  time                FLOPs / (peak FLOP/s x MFU), plus the memory-bound work at the device's memory bandwidth:
                      AdamW's pass over its state (16 bytes read and written per parameter) and about four passes
                      of the element-wise ops over the activations

On a CPU the peak is measured here (a 2048^3 matrix product in the precision's dtype, torch's threads; --peak-tflops
replaces it) and so is the memory bandwidth (a large copy); the MFU assumed is MFU["cpu"]. GPU figures are the
vendors' dense peaks.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import statistics
import time
from pathlib import Path
from typing import Any, Iterator, NamedTuple, Optional

import torch
from torch import nn

from lmforge.config import ModelConfig, RunConfig, TrainConfig, with_init_sections
from lmforge.distributed import slow_half_warning
from lmforge.errors import ConfigError
from lmforge.model import GPT, count_parameters, flops_per_token
from lmforge.nf4 import BYTES_PER_WEIGHT as NF4_BYTES, DOUBLE_BYTES_PER_WEIGHT as NF4_DOUBLE_BYTES
from lmforge.preference_loss import PreferenceLoss

TASKS = ("tokens", "sft", "classify", "preference", "unpaired")  # the kinds of training data (`lmforge prepare --task`)

CHINCHILLA_TOKENS_PER_PARAMETER = 20  # Hoffmann et al. 2022: compute-optimal tokens grow with the parameters, ~20x


class Device(NamedTuple):
    name: str
    peak_fp32: float  # dense FLOP/s of fp32 matrix products (GPUs: TF32 tensor cores)
    peak_bf16: float  # dense FLOP/s of bf16 matrix products
    memory: float  # bytes
    bandwidth: float  # bytes/s of memory traffic


# Dense (no sparsity) peaks of the SXM parts, from NVIDIA's data sheets.
GPUS = {
    "h100": Device("NVIDIA H100 SXM 80GB", 494.7e12, 989.4e12, 80e9, 3.35e12),
    "h200": Device("NVIDIA H200 SXM 141GB", 494.7e12, 989.4e12, 141e9, 4.8e12),
    "a100": Device("NVIDIA A100 SXM 80GB", 156e12, 312e12, 80e9, 2.04e12),
}
DEVICES = ("cpu", *GPUS)
# Model FLOPs utilisation assumed for the matrix products: a well-tuned GPT training run on GPUs reaches 35-50% of
# the peak (PaLM: 46%); on a CPU lmforge's matrix products run at about 85% of the measured 2048^3 product (the
# memory-bound rest of the step is timed apart, by bandwidth; benchmarks/plan_accuracy.py checks the sum).
MFU = {"cpu": 0.85, "gpu": 0.4}


# ------------------------------------------------------------------------------------------- activations
def activation_elements(model: ModelConfig, seq_len: int, fused: bool = False) -> tuple[float, float]:
    """(per block, for the output head) elements autograd keeps per token of training, counted from model.py.

    A block keeps: its input (norm_1's), norm_1's output (qkv's input), the qkv output (q, k, v), rotated q and
    k (RoPE makes new tensors), normalised q and k (qk_norm), the attention output and its heads-concatenated copy
    (proj's input), the residual after attention (norm_2's input), norm_2's output (fc's input), and the MLP's
    hidden activations: fc's output and gelu's (2H), relu's and its square (relu2, 2H), or SwiGLU's fc output,
    silu(gate) and the product (4H). The reference attention path also keeps the softmax weights (n_head x T per
    query; sdpa recomputes them). The head keeps norm_f's input and output and, fused with its loss (fused: the
    trainer's default, train.loss_chunk > 0), the loss's gradient for the hidden states (C): one chunk's logits
    exist at a time, counted apart (head_chunk_elements). Unfused, it keeps the logits (the trainer holds them
    through the backward pass), their log-softmax and, during the backward pass, the gradients of both (4V), and
    with logit_softcap the tanh before the cap (V). A classify head (a classifier, a reward model) keeps norm_f's
    input and output only: its logits are one row of a few labels per example, not per token.
    """
    C, nh, nkv, hd, H = model.n_embd, model.n_head, model.n_kv_head, model.head_dim, model.hidden_dim
    qkv = (nh + 2 * nkv) * hd
    attention = qkv + (nh + nkv) * hd * ((model.pos_encoding == "rope") + model.qk_norm) + 2 * C
    if model.attention == "reference":
        attention += nh * seq_len
    mlp = 4 * H if model.mlp == "swiglu" else 2 * H
    block = 4 * C + attention + mlp  # input, norm_1 out, residual mid, norm_2 out
    if model.head == "classify":
        return block, 2 * C
    head = 3 * C if fused else 2 * C + (4 + (model.logit_softcap > 0)) * model.vocab_size
    return block, head


def head_chunk_elements(model: ModelConfig, chunk: int) -> float:
    """Elements of the head fused with its loss that do not grow with the batch (lmforge.head_loss): one chunk's
    logits (their softmax and gradient are computed in place) and, with logit_softcap, its tanh."""
    return chunk * model.vocab_size * (1 + (model.logit_softcap > 0))


# ------------------------------------------------------------------------------------------ the estimate
@dataclasses.dataclass
class Plan:
    """What a training run needs; every size in bytes, every time in seconds (per GPU where it says so)."""

    parameters: int
    non_embedding_parameters: int
    trained_parameters: int  # all of them, or LoRA's adapters
    flops_per_token: int
    step_flops_per_token: int  # what a step computes per token: flops_per_token less LoRA's frozen weight
    # gradients, plus a preference reference's forward
    task: str
    tokens_per_step: int
    steps: int
    tokens: int
    total_flops: float
    compute_optimal_tokens: int
    precision: str
    parallel: str
    gpus: int
    weights: float
    gradients: float
    optimizer: float
    activations: float
    activations_checkpointed: float
    reference: float  # preference data: the frozen reference model's weights, per GPU
    reference_forward: bool  # preference data: a reference's forward runs on every sequence
    mismatched_forward: bool  # unpaired data with kto: the policy's and the reference's forwards on mismatched rows
    device: str
    device_name: str
    device_memory: float
    peak_flops: float
    mfu: float
    bandwidth: float
    step_time: float
    total_time: float
    notes: list[str]
    group_size: int = 0  # GRPO: the samples of each prompt trained on (0: not GRPO)
    sampling_time: float = 0.0  # online training: sampling and scoring per step (in step_time), per GPU
    sampling_memory: float = 0.0  # online training: the KV cache while sampling a micro-batch, per GPU
    sampled_tokens_per_step: int = 0  # online training: new tokens sampled per step and GPU (the longest case)
    teacher: float = 0.0  # knowledge distillation: the frozen teacher's weights (and its hidden states), per GPU
    teacher_flops_per_token: int = 0  # knowledge distillation: the teacher's forward pass, in step_flops_per_token

    @property
    def state(self) -> float:
        """Weights, gradients and optimizer state (and a preference reference's or a teacher's weights), per GPU."""
        return self.weights + self.gradients + self.optimizer + self.reference + self.teacher

    @property
    def total_memory(self) -> float:  # sampling's KV cache and the training activations are never alive together
        return self.state + max(self.activations, self.sampling_memory)

    @property
    def total_memory_checkpointed(self) -> float:
        return self.state + max(self.activations_checkpointed, self.sampling_memory)

    def to_dict(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "state": self.state, "total_memory": self.total_memory,
                "total_memory_checkpointed": self.total_memory_checkpointed}


def matmul_flops(m: int = 2048, k: int = 2048, n: int = 2048, dtype: torch.dtype = torch.float32,
                 seconds: float = 0.3, linear: bool = False) -> float:
    """FLOP/s of an (m, k) @ (k, n) torch.mm in `dtype` here (linear: F.linear of an (m, k) input and an (n, k)
    weight, as a model's layers run it): the median over about `seconds` of repeats after a warm-up (on a shared
    machine the other processes slow it as they slow the training steps)."""
    a, b = torch.randn(m, k, dtype=dtype), torch.randn(n, k, dtype=dtype) if linear else torch.randn(k, n, dtype=dtype)
    product = (lambda: torch.nn.functional.linear(a, b)) if linear else (lambda: torch.mm(a, b))
    product()
    times: list[float] = []
    while sum(times) < seconds or len(times) < 5:
        start = time.perf_counter()
        product()
        times.append(time.perf_counter() - start)
    return 2 * m * k * n / statistics.median(times)


@contextlib.contextmanager
def torch_threads(n: Optional[int]) -> Iterator[None]:
    """torch's intra-op threads set to n (train.num_threads) inside, as before after; None or 0: left as they are."""
    before = torch.get_num_threads()
    if n:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def copy_bandwidth(n: int = 32 * 1024 * 1024, repeats: int = 5) -> float:
    """Bytes/s of memory traffic of a large fp32 copy here (read + write; the median of `repeats`)."""
    a, b = torch.empty(n), torch.empty(n)
    b.copy_(a)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        b.copy_(a)
        times.append(time.perf_counter() - start)
    return 2 * 4 * n / statistics.median(times)


def machine_memory() -> float:
    """Bytes of RAM this machine has (what a CPU run can use)."""
    return float(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))


def quantized_weights(model: ModelConfig) -> int:
    """How many weights QLoRA stores in 4 bits: those of the blocks' Linear layers (nf4.quantize_blocks)."""
    return sum(layer.in_features * layer.out_features for layer in GPT.shapes(model).blocks.modules()
               if isinstance(layer, nn.Linear))


def lora_counts(config: RunConfig, added_from: Optional[int] = None) -> tuple[int, int]:
    """(trained parameters, adapter activations per token) of config.lora on config.model: the model built on the
    meta device and adapted as training adapts it (with rows of added tokens from added_from on: the embedding and
    an untied head train whole, their gradients and moments full-size); (0, 0) without lora."""
    from lmforge.lora import ADAPTED, apply_lora, train_added_rows

    if config.lora is None:
        return 0, 0
    model = apply_lora(GPT.shapes(config.model), config.lora)
    model.added_rows_from = added_from
    train_added_rows(model)
    adapters = [m for m in model.modules() if isinstance(m, ADAPTED)]  # (the embedding's too)
    return (sum(p.numel() for p in model.parameters() if p.requires_grad),
            sum(len(m.lora) for m in adapters) * config.lora.r)  # each adapter keeps its r-wide A output


def plan(config: RunConfig, tokens: Optional[int] = None, device: str = "cpu", gpus: int = 1,
         peak_tflops: Optional[float] = None, parallel: str = "ddp", mfu: Optional[float] = None,
         task: str = "tokens") -> Plan:
    """The estimate for training `config` on `gpus` devices of kind `device` (cpu | h100 | h200 | a100) for
    `tokens` tokens (default: train.max_steps steps of batch_size x grad_accum x block_size per device; twice
    that for preference data, whose batches count pairs) of `task` data (TASKS). `peak_tflops` replaces the
    device's peak (e.g. a GPU not in the table); `mfu` the assumed utilisation."""
    if task not in TASKS:
        raise ConfigError(f"--task {task!r} is unknown: choose one of {', '.join(TASKS)}")
    if device not in DEVICES:
        raise ConfigError(f"--device {device!r} is unknown: choose one of {', '.join(DEVICES)}, or give "
                          "--peak-tflops F for another accelerator")
    if gpus < 1 or (device == "cpu" and gpus != 1):
        raise ConfigError(f"--gpus {gpus} is invalid: use 1 or more GPUs (a CPU plan is for this machine: 1)")
    if parallel not in ("ddp", "fsdp"):
        raise ConfigError(f"--parallel {parallel!r} is unknown: choose ddp or fsdp")
    if tokens is not None and tokens < 1:
        raise ConfigError(f"--tokens {tokens} is invalid: give a positive number of training tokens")
    if peak_tflops is not None and not 0 < peak_tflops < 1e6:
        raise ConfigError(f"--peak-tflops {peak_tflops} is invalid: give the accelerator's dense TFLOP/s, e.g. 989")
    if mfu is not None and not 0 < mfu <= 1:
        raise ConfigError(f"--mfu {mfu} is invalid: give a fraction in (0, 1], e.g. 0.4")
    if config.lora is not None and gpus > 1 and parallel == "fsdp":
        raise ConfigError("--parallel fsdp is not supported with lora.*: a LoRA run trains small adapters on a "
                          "frozen base; plan it with --parallel ddp")
    config, base_note, continued, added_from = with_base_model(config)
    notes = [base_note] if base_note else []
    m, t = config.model, config.train
    preference, unpaired, reward = task == "preference", task == "unpaired", t.objective == "reward"
    if reward:  # a reward model: a one-output classify head, no reference
        if not preference:
            raise ConfigError("train.objective reward trains a reward model on preference pairs: plan it with --task "
                              "preference")
        m = dataclasses.replace(m, head="classify", num_labels=1)
    counts = count_parameters(m)
    fpt = flops_per_token(m, m.block_size)
    adapters, adapter_activations = lora_counts(config, added_from)
    mismatched = unpaired and PreferenceLoss.of(t).needs_kl
    grpo = task in ("preference", "sft") and PreferenceLoss.of(t).group  # B prompts: B x grpo_group_size samples
    rows = t.grpo_group_size if grpo else 2 if preference else 1  # a preference batch of B pairs is 2B sequences
    attention = 12 * m.n_layer * m.n_head * m.head_dim * m.block_size  # flops_per_token's attention term
    matrices = (fpt - attention) // 6  # N: the weights in matrix products
    step_fpt = fpt if config.lora is None else 4 * matrices + 6 * adapters + attention
    # the reference's forward on every step, unless train.precompute_reference scored the data before the first one
    runs_reference = ((preference or unpaired) and not reward and PreferenceLoss.of(t).needs_reference
                      and not t.precompute_reference)
    if runs_reference:  # the reference's forward on every sequence (LoRA: the model with its adapters off); KTO's
        forwards = 3 if mismatched else 1  # KTO's mismatched rows: the policy's forward and the reference's
        step_fpt += forwards * (2 * matrices + attention // 3)
    teacher_fpt, teacher_bytes = distillation(config, bf16=t.precision != "fp32", notes=notes) \
        if t.distill_from is not None else (0, 0.0)
    step_fpt += teacher_fpt
    tokens_per_step = t.batch_size * t.grad_accum * m.block_size * gpus * rows
    steps = t.max_steps if tokens is None else math.ceil(tokens / tokens_per_step)
    tokens = steps * tokens_per_step if tokens is None else tokens
    bf16 = t.precision in ("bf16-mixed", "bf16-compute")
    if reward:
        notes.append("train.objective reward: a reward model reads each pair's two examples whole through a one-output "
                     "head; no reference, no LM head")
    online = (t.online and (preference or grpo)) or (t.distill_on_policy > 0 and task == "sft")
    if (preference or unpaired) and t.precompute_reference:
        notes.append("train.precompute_reference: no frozen copy and no reference forward in the steps; the reference "
                     "scores the data once before the first step (one forward pass over it, not counted here)")

    # state: fp32 weights and gradients, AdamW's two fp32 moments; bf16 adds the bf16 weight copies (autocast's, or
    # bf16-compute's)
    P = counts.total
    trained = adapters if config.lora is not None else P
    # QLoRA (lora.quantize nf4): the blocks' matrices in 4 bits and a fp32 maximum per 64, dequantized as they compute
    quantized = quantized_weights(m) if config.lora is not None and config.lora.quantize == "nf4" else 0
    per_weight = NF4_DOUBLE_BYTES if quantized and config.lora.double_quant else NF4_BYTES
    if quantized:
        notes.append(f"lora.quantize nf4: the blocks' {quantized:,} matrix weights in 4 bits ({per_weight:.4g} bytes "
                     f"each with their blocks' maxima, fp32: 4)")
    weights = (P - quantized) * (4 + 2 * bf16) + per_weight * quantized + 4.0 * adapters
    gradients, optimizer = 4.0 * trained, 8.0 * trained
    # a frozen fp32 copy, no autocast cache (new LoRA adapters: the base with them off; continued ones: merged copy)
    reference = 4.0 * P if runs_reference and (config.lora is None or continued or added_from) else 0.0
    largest_block = (counts.non_embedding - m.n_embd * (2 if m.bias and m.norm == "layernorm" else 1)) / m.n_layer
    if gpus > 1 and parallel == "ddp":
        gradients += 4.0 * trained  # DDP's buckets: a second fp32 copy of the gradients, all-reduced in place
    elif gpus > 1:  # FSDP full shard: 1/K of everything, plus the gathered block (and the prefetched next one)
        gathered = 2 * largest_block * (4 + 2 * bf16)
        weights, gradients, optimizer = weights / gpus + gathered, gradients / gpus + gathered, optimizer / gpus
        reference /= gpus  # sharded like the policy; its gathered blocks come and go with the policy's
        teacher = teacher_model(config) if teacher_bytes else None
        if teacher is not None:  # sharded too, its head kept whole on every GPU (the loss reads it)
            head = teacher.vocab_size * teacher.n_embd * (2.0 if t.precision != "fp32" else 4.0)
            teacher_bytes = teacher_bytes / gpus + head

    # activations of one micro-batch: bf16-mixed keeps the matrix products' inputs and outputs in bf16
    fused = t.loss_chunk > 0 and m.head != "classify"
    block, head = activation_elements(m, m.block_size, fused)
    micro_tokens = t.batch_size * m.block_size * rows
    block += adapter_activations / m.n_layer  # LoRA: each adapter's A output (a head adapter's counted with them)
    act_block = micro_tokens * block * (3.0 if bf16 else 4.0)  # bf16: about half the tensors are bf16
    act_head = micro_tokens * head * 4.0  # the loss is computed in fp32
    if fused:  # distillation holds about six (chunk, V) arrays of both models' logits and their softmaxes
        act_head += head_chunk_elements(m, min(t.loss_chunk, micro_tokens)) * 4.0 * (6 if teacher_fpt else 1)
    teacher_hidden = micro_tokens * teacher_width(config) * (2 if bf16 else 4) if teacher_fpt else 0.0
    activations = (m.n_layer + 1) * act_block + act_head  # + the gradients inside the block being back-propagated
    checkpointed = m.n_layer * micro_tokens * m.n_embd * 4.0 + 2 * act_block + act_head

    if device == "cpu":
        with torch_threads(t.num_threads):  # measured with the run's threads (train.num_threads), as it will train
            threads = torch.get_num_threads()
            peak = peak_tflops * 1e12 if peak_tflops else matmul_flops(dtype=torch.bfloat16 if bf16 else torch.float32)
            bandwidth = copy_bandwidth()
        name = f"this CPU ({threads} torch thread{'s' if threads > 1 else ''})"
        memory, assumed = machine_memory(), MFU["cpu"]
        slow = bf16 and slow_half_warning(torch.device("cpu"), f"train.precision={t.precision}", "--precision fp32")
        if slow:  # the measured bf16 peak already makes the estimate slow; say why and what to do
            notes.append(f"WARNING: {slow}")
        if peak_tflops:  # nothing was measured: say whose number it is
            source = f"peak given: {peak_tflops:g} TFLOP/s (--peak-tflops)"
        else:
            source = (f"peak measured here: a 2048^3 {'bf16' if bf16 else 'fp32'} matrix product, {peak / 1e9:.1f} "
                      f"GFLOP/s with {threads} torch thread{'s' if threads > 1 else ''}")
        notes.append(f"{source}; memory bandwidth measured here (a copy) {bandwidth / 1e9:.1f} GB/s")
    else:
        d = GPUS[device]
        name = d.name
        peak = peak_tflops * 1e12 if peak_tflops else (d.peak_bf16 if bf16 else d.peak_fp32)
        memory, bandwidth, assumed = d.memory, d.bandwidth, MFU["gpu"]
        if not bf16:
            notes.append("fp32 at the TF32 tensor-core rate; bf16-mixed (--precision bf16-mixed) doubles the peak")
    mfu = mfu or assumed
    compute_time = step_fpt * tokens_per_step / gpus / (peak * mfu)
    # memory-bound work: AdamW reads and writes 16 B per parameter; the element-wise ops (norms, activations,
    # softmax, residual adds) write each kept activation in the forward pass, read it and write and read its
    # gradient in the backward pass: about 4 passes over the activations. On a CPU, bf16's element-wise kernels go
    # at fp32's pace per element, converting each value (GELU, softmax and LayerNorm in bf16 no faster than in fp32
    # on an Intel Xeon with AMX, timed by hand), so their passes are timed at fp32's 4 bytes an element there (the
    # activations count 3 on average in bf16)
    optimizer_bytes = 2 * 16.0 * trained / (gpus if parallel == "fsdp" else 1)
    per_element = 4.0 / 3.0 if device == "cpu" and bf16 else 1.0
    memory_time = (optimizer_bytes + 4 * activations * t.grad_accum * per_element) / bandwidth
    sampling = online_sampling(config, fpt, P, peak * mfu, bandwidth, device == "cpu", notes) if online else \
        (0.0, 0.0, 0)
    step_time = compute_time + memory_time + sampling[0]
    estimate = Plan(
        parameters=P, non_embedding_parameters=counts.non_embedding, trained_parameters=trained, flops_per_token=fpt,
        step_flops_per_token=step_fpt, task=task, tokens_per_step=tokens_per_step, steps=steps, tokens=tokens,
        total_flops=float(step_fpt) * tokens,
        compute_optimal_tokens=CHINCHILLA_TOKENS_PER_PARAMETER * P, precision=t.precision, parallel=parallel,
        gpus=gpus, weights=weights, gradients=gradients, optimizer=optimizer, activations=activations,
        activations_checkpointed=checkpointed, reference=reference, reference_forward=runs_reference,
        mismatched_forward=mismatched, device=device, device_name=name, device_memory=memory, peak_flops=peak,
        mfu=mfu, bandwidth=bandwidth, step_time=step_time, total_time=step_time * tokens / tokens_per_step, notes=notes,
        group_size=t.grpo_group_size if grpo else 0, sampling_time=sampling[0], sampling_memory=sampling[1],
        sampled_tokens_per_step=sampling[2], teacher=teacher_bytes + teacher_hidden,
        teacher_flops_per_token=teacher_fpt)
    where = "this machine's RAM" if device == "cpu" else f"the {gpus if gpus > 1 else ''} {name}'s memory".replace("  ", " ")
    if estimate.total_memory_checkpointed > memory:
        notes.append(f"WARNING: does not fit: {gib(estimate.total_memory_checkpointed)} per device even with "
                     f"activation checkpointing, over the {gib(memory)} of {where}; use more GPUs with FSDP "
                     f"(--gpus K --parallel fsdp), a smaller train.batch_size, or a smaller model")
    elif estimate.total_memory > memory:
        notes.append(f"WARNING: does not fit without activation checkpointing: {gib(estimate.total_memory)} over "
                     f"the {gib(memory)} of {where}; with it, {gib(estimate.total_memory_checkpointed)} fits")
    return estimate


def distillation(config: RunConfig, bf16: bool, notes: list[str]) -> tuple[int, float]:
    """(the teacher's forward FLOPs per trained token, its weights' bytes: bf16 when the run trains in bf16) of
    train.distill_from; (0, 0) with a note when its run cannot be read."""
    teacher = teacher_model(config)
    if teacher is None:
        notes.append(f"train.distill_from {config.train.distill_from} cannot be read: its forward pass and weights "
                     "are not counted")
        return 0, 0.0
    notes.append(f"knowledge distillation: the teacher ({count_parameters(teacher).total:,} parameters) reads every "
                 "sequence (its forward pass only, counted in these steps' FLOPs)")
    forward = flops_per_token(teacher, config.model.block_size) // 3  # on the student's rows
    return forward, count_parameters(teacher).total * (2.0 if bf16 else 4.0)


def teacher_model(config: RunConfig) -> Optional[ModelConfig]:
    """The model section of train.distill_from's checkpoint, or None when it cannot be read."""
    try:
        from lmforge.checkpoint import read_run_config, resolve_checkpoint

        return read_run_config(resolve_checkpoint(config.train.distill_from)).model
    except Exception:  # a teacher not trained yet: plan anyway, say so
        return None


def teacher_width(config: RunConfig) -> int:
    teacher = teacher_model(config)
    return teacher.n_embd if teacher is not None else 0


def with_base_model(config: RunConfig) -> tuple[RunConfig, str, bool, Optional[int]]:
    """(config with train.init_from's model section, as `lmforge train` trains it; a note; whether its adapters
    continue: init_from is a LoRA run, whose lora section comes too; the base's vocab_size when the data's tokenizer
    adds tokens, whose rows the model grows), or the config as it is when there is no init_from, or with a note when
    it cannot be read yet (planned before the base exists)."""
    if config.train.init_from == "none":
        return config, "", False, None
    try:
        from lmforge.checkpoint import read_run_config, resolve_checkpoint

        ckpt = resolve_checkpoint(config.train.init_from)
        init = read_run_config(ckpt)
    except Exception:  # not trained yet, or not a checkpoint: plan the config's model, and say so
        return config, (f"train.init_from {config.train.init_from} could not be read: planned with the config's "
                        "model section"), False, None
    continued = init.lora is not None
    config = with_init_sections(config, init, ckpt)
    note = f"the model of train.init_from {config.train.init_from}" + (
        " and its LoRA adapters, which train on" if continued else "")
    size = _vocab_with_added_tokens(config, ckpt)
    if size is None:
        return config, note, continued, None
    base = config.model.vocab_size
    note += f", and rows for the {size - base} token(s) its data's tokenizer adds" + (
        " (trained whole beside the adapters)" if config.lora is not None else "")
    return dataclasses.replace(config, model=dataclasses.replace(config.model, vocab_size=size)), note, continued, base


def _vocab_with_added_tokens(config: RunConfig, ckpt: Any) -> Optional[int]:
    """The vocab_size of config.data.path when its tokenizer adds tokens to the checkpoint's past the model's rows
    (train.with_added_tokens grows the model to it); None otherwise, or when the data cannot be read yet."""
    from lmforge.checkpoint import check_data_tokenizer

    try:
        data = Path(config.data.path)
        manifest = json.loads((data / "manifest.json").read_text(encoding="utf-8"))
        tokenizer = data / manifest["tokenizer"]["file"]
        size = int(manifest["vocab_size"])
        added = check_data_tokenizer(ckpt, tokenizer, added_ok=True)
    except Exception:  # not prepared yet, another tokenizer (train says so): plan the model as it is
        return None
    return size if added and size > config.model.vocab_size else None


def online_sampling(config: RunConfig, fpt: int, parameters: int, flops: float, bandwidth: float, cpu: bool,
                    notes: list[str]) -> tuple[float, float, int]:
    """(seconds per step, KV cache bytes, new tokens per step) of online training's sampling and scoring, per
    device: the module docstring's "online sampling"; `flops` the FLOP/s assumed (peak x MFU), `notes` gets what is
    and is not counted. On a CPU the new tokens' products (a few rows each: far below the peak) run at the rate
    measured here for the model's shapes, weight reads included; on a GPU at the peak, plus the weights' reads."""
    m, t = config.model, config.train
    grpo, distill = PreferenceLoss.of(t).group, t.distill_from is not None  # on-policy distillation: one sample
    n = t.grpo_group_size if grpo else 1 if distill else 2  # of each prompt, in a share of the micro-batches
    rows, mu, share = t.batch_size * n, t.grpo_iterations if grpo else 1, t.distill_on_policy if distill else 1.0
    new = min(t.online_max_new_tokens, m.block_size - 1)  # (training refuses more: the prompt needs a token)
    forward = fpt / 3  # FLOPs of one token's forward pass (prefill or a new token)
    head = 2 * m.vocab_size * m.n_embd  # of which the LM head's
    prompt = m.block_size - new
    weights = parameters * (2 if t.precision == "bf16-compute" else 4)
    if cpu:  # each new token: rows x (the blocks' products, the head's) at their measured small-batch rates
        dtype = torch.bfloat16 if t.precision == "bf16-compute" else torch.float32
        body_rate = matmul_flops(rows, m.n_embd, 4 * m.n_embd, dtype, seconds=0.1, linear=True)
        head_rate = matmul_flops(rows, m.n_embd, m.vocab_size, dtype, seconds=0.1, linear=True)
        decode = rows * new * ((forward - head) / body_rate + head / head_rate)
        flop = rows * prompt * forward  # the prompts' pass, at the large products' rate
    else:  # the products at the peak, and each new token reads the weights once
        decode = new * weights / bandwidth
        flop = rows * m.block_size * forward
    flop += rows * m.block_size * forward * (mu > 1)  # pi_old's pass over the rows
    scorer = "the reward function's own time is not counted" if t.online_reward_function is not None else ""
    if t.online_reward_model is not None:
        try:
            from lmforge.checkpoint import read_run_config, resolve_checkpoint

            judge = read_run_config(resolve_checkpoint(t.online_reward_model)).model
            flop += rows * m.block_size * flops_per_token(judge, judge.block_size) / 3
            scorer = ", ".join(filter(None, ["the reward model's forward counted", scorer]))
        except Exception:  # a run not made yet: plan anyway, say so
            scorer = ", ".join(filter(None, [f"the reward model {t.online_reward_model} could not be read: its "
                                             "forward is not counted", scorer]))
    kv_per_token = 2 * m.n_layer * m.n_kv_head * m.head_dim * (2 if t.precision == "bf16-compute" else 4)
    reads = rows * kv_per_token * new * (prompt + new / 2)  # each new token reads the cache so far
    seconds = share * t.grad_accum * (flop / flops + decode + reads / bandwidth) / mu
    kv_cache = rows * m.block_size * kv_per_token
    every = f"every {mu} steps" if mu > 1 else f"{share:g} of the micro-batches" if share < 1 else "every step"
    notes.append(f"online sampling counted ({every}): {n} samples of each prompt, {new} new tokens each at most, "
                 f"{duration(seconds)} per step{'; ' + scorer if scorer else ''}")
    return seconds, float(kv_cache), round(share * t.grad_accum * rows * new / mu)


# ------------------------------------------------------------------------------------------- printing
def gib(n: float) -> str:
    return f"{n / 2 ** 30:,.2f} GiB" if n >= 2 ** 30 else f"{n / 2 ** 20:,.1f} MiB"


def duration(seconds: float) -> str:
    for unit, size in (("days", 86400), ("hours", 3600), ("minutes", 60)):
        if seconds >= size:
            return f"{seconds / size:,.1f} {unit}"
    return f"{seconds:.2f} s"


def format_plan(p: Plan) -> str:
    """The plan as the lines `lmforge plan` prints."""
    per = "per GPU, " if p.gpus > 1 else ""
    trained = f", {p.trained_parameters:,} trained (LoRA)" if p.trained_parameters != p.parameters else ""
    reasons = ((["no weight gradients of the frozen matrices"] if trained else [])
               + (["the reference's forward on every sequence"] if p.reference_forward else [])
               + ([f"the teacher's forward, {p.teacher_flops_per_token:,}"] if p.teacher_flops_per_token else []))
    step = f"; these steps {p.step_flops_per_token:,} ({', '.join(reasons)})" if reasons else ""
    pairs = {"preference": f" (GRPO: {p.group_size} samples of each prompt)" if p.group_size
             else " (preference pairs: 2 sequences each)",
             "unpaired": " (unpaired completions, with their mismatched rows' forward)" if p.mismatched_forward
             else " (unpaired completions)"}.get(p.task, "")
    lines = [
        f"parameters          {p.parameters:,} total, {p.non_embedding_parameters:,} non-embedding{trained}",
        f"FLOPs per token     {p.flops_per_token:,} (6N + attention, forward and backward){step}",
        f"training tokens     {p.tokens:,} = {p.steps:,} steps x {p.tokens_per_step:,} tokens "
        f"(compute-optimal: ~{p.compute_optimal_tokens:,}, 20 per parameter){pairs}",
        f"training FLOPs      {p.total_flops:.3e}",
        f"memory ({per}{p.precision}, {p.parallel if p.gpus > 1 else 'one device'})",
        f"  weights           {gib(p.weights)}",
        f"  gradients         {gib(p.gradients)}",
        f"  optimizer (AdamW) {gib(p.optimizer)}",
        *([f"  frozen reference  {gib(p.reference)}"] if p.reference else []),
        *([f"  frozen teacher    {gib(p.teacher)}"] if p.teacher else []),
        f"  activations       {gib(p.activations)} ({gib(p.activations_checkpointed)} with activation checkpointing)",
        *([f"  sampling KV cache {gib(p.sampling_memory)} (while sampling, without the activations)"]
          if p.sampling_memory else []),
        f"  total             {gib(p.total_memory)} ({gib(p.total_memory_checkpointed)} with checkpointing), "
        f"of {gib(p.device_memory)}",
        f"time on {p.gpus} x {p.device_name}" if p.gpus > 1 else f"time on {p.device_name}",
        f"  peak              {p.peak_flops / 1e12:,.3f} TFLOP/s, MFU assumed {p.mfu:.0%}",
        f"  per step          {duration(p.step_time)}"
        + (f" (sampling {duration(p.sampling_time)} of it)" if p.sampling_time else ""),
        f"  whole run         {duration(p.total_time)}",
    ]
    return "\n".join(lines + [f"note: {n}" for n in p.notes])


# ------------------------------------------------------------------------------------------ measuring
def status_kib(field: str) -> int:
    """A VmXXX line of /proc/self/status (VmRSS, VmHWM: the peak), in KiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


def reset_peak_rss() -> None:
    """Set VmHWM back to the current RSS (Linux >= 4.0: 5 written to clear_refs), so the next peak is of what
    follows. A kernel control file, not an output."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def measure(config: RunConfig, steps: int = 3, task: str = "tokens") -> dict[str, float]:
    """Run 1 + `steps` real training steps of `config` here through lmforge's Trainer on random tokens, in this
    process (CPU, Linux): {"runtime_rss": the resident bytes of everything but the model (and a preference
    reference) once the Trainer is built (Python, torch, lmforge's training code, the allocator's arenas: what a
    plan does not count), "peak_rss": the peak resident bytes of the steps, "step_time": median seconds of the
    timed steps (the first one warms up)}. The plan's prediction of the peak is runtime_rss + Plan.total_memory.

    task "preference" trains on random pairs (batches of train.batch_size pairs, half of each sequence prompt),
    "unpaired" on random completions (half of them desirable) with train.preference_loss (kto or apo_zero_unpaired);
    LoRA and a preference loss with a reference start from a random model saved in a temporary directory as
    train.init_from. Other tasks train as token data (the plan counts them alike)."""
    import tempfile

    import numpy as np

    from lmforge.checkpoint import save_checkpoint
    from lmforge.data.batches import ExampleBatches, Examples, TokenBatches
    from lmforge.lora import apply_lora, base_fingerprint
    from lmforge.train import Trainer

    if steps < 1:
        raise ConfigError(f"--measure-steps {steps} is invalid: use 1 or more")
    if task not in TASKS:
        raise ConfigError(f"--task {task!r} is unknown: choose one of {', '.join(TASKS)}")
    config, _, continued, _ = with_base_model(config)  # the model the plan counts (train.init_from's), random weights
    m, t = config.model, config.train
    if t.online:
        raise ConfigError("--measure trains on random tokens, which have no prompts to sample online (train."
                          "online_reward_model / online_reward_function, GRPO): drop --measure; the estimate counts "
                          "the update, not the sampling")
    if t.distill_from is not None:
        raise ConfigError("--measure trains on random tokens, which no teacher's tokenizer reads (train.distill_from): "
                          "drop --measure; the estimate counts the teacher")
    preference = task in ("preference", "unpaired")
    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory(prefix="lmforge-measure-") as tmp:
        train = dataclasses.replace(t, device="cpu", max_steps=steps + 1, run_dir=str(Path(tmp) / "run"),
                                    save_interval=0, plot=False)
        reward = t.objective == "reward"  # a reward model: pairs read whole, no reference
        if config.lora is not None or (preference and not reward and PreferenceLoss.of(t).needs_reference):
            torch.manual_seed(t.seed)
            model = GPT(m)
            init = save_checkpoint(Path(tmp) / "base", 0, model, None, RunConfig(model=m), {"tokens_seen": 0})
            if continued:  # init_from a LoRA run: random adapters of its shape on that base, as a LoRA checkpoint
                base = {"path": str(init.resolve()), "fingerprint": base_fingerprint(model)}
                apply_lora(model, config.lora)
                init = save_checkpoint(Path(tmp) / "lora", 0, model, None, RunConfig(
                    model=m, lora=config.lora, train=TrainConfig(init_from=str(init))), {"tokens_seen": 0,
                                                                                         "base": base})
            train = dataclasses.replace(train, init_from=str(init))
        config = dataclasses.replace(config, train=train)
        if preference:  # 2 rows a pair (1 an unpaired completion), each block_size + 1 tokens, the first half prompt
            rows, length = (2 - (task == "unpaired")) * t.batch_size * t.grad_accum * (steps + 1), m.block_size + 1
            examples = Examples(rng.integers(0, m.vocab_size, size=rows * length).astype(np.uint32),
                                np.arange(rows + 1, dtype=np.int64) * length, np.full(rows, length // 2),
                                desirable=np.arange(rows) % 2 == 0)
            data: Any = ExampleBatches(examples, m.block_size, t.batch_size, seed=0, pairs=task == "preference",
                                       unpaired=task == "unpaired", whole=1 if reward else None)
        else:
            length = (t.batch_size * t.grad_accum * (steps + 1) + 1) * (m.block_size + 1)
            data = TokenBatches(rng.integers(0, m.vocab_size, size=length, dtype=np.int64).astype(np.uint32),
                                m.block_size, t.batch_size, seed=0)
        trainer = Trainer(config, train_data=data, val_batches=[], progress=False, tensorboard=False,
                          task={"task": task, "template": None} if preference else None)
        models = [trainer.raw_model] + ([trainer.reference] if trainer.reference is not None else [])
        weights = sum(p.numel() * p.element_size() for model in models for p in model.parameters())
        runtime = status_kib("VmRSS") * 1024 - weights  # Python, torch, the trainer's code and allocator arenas
        reset_peak_rss()
        times = []
        for _ in range(steps + 1):
            start = time.perf_counter()
            trainer.train_step()
            trainer.step += 1
            times.append(time.perf_counter() - start)
    return {"runtime_rss": float(runtime), "peak_rss": float(status_kib("VmHWM") * 1024),
            "step_time": statistics.median(times[1:])}
