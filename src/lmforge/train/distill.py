"""Knowledge distillation's teacher (train.distill_from): a frozen language model read from its run, checked to
speak the student's vocabulary, whose last hidden states at every batch the student's loss compares with
(head_loss.linear_distillation; GPT.forward's teacher); and on-policy distillation's batches (train.distill_on_policy,
GKD's lambda): a share of the micro-batches replaced by the student's own samples of their prompts, drawn as online
training draws them (train/online.py: seeded by the run's seed, the step and the micro-batch, so a resume and any
number of processes draw the same)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Optional

import torch

import numpy as np

from lmforge.checkpoint import load_for_inference, verified_checkpoint
from lmforge.config import RunConfig
from lmforge.distributed import DistInfo, apply_fsdp
from lmforge.errors import ConfigError
from lmforge.files import sha256_file
from lmforge.head_loss import Teacher
from lmforge.model import GPT


def load_teacher(config: RunConfig, tokenizer_file: Optional[str | Path], device: torch.device
                 ) -> tuple[GPT, dict[str, str]]:
    """(the teacher of train.distill_from on `device`, frozen, in eval mode, in bf16 when the run trains in bf16 (its
    forward pass is all it does); {"path": its checkpoint, "fingerprint": a sha256 of its files' sha256s}, which a
    checkpoint keeps so that a resume can tell the same teacher from a newer one). Refused in one line: a classifier
    or encoder, another tokenizer than the data's, another vocabulary size than the student's, or a context shorter
    than the student's."""
    tc, student = config.train, config.model
    ckpt, manifest = verified_checkpoint(tc.distill_from)
    teacher, _, theirs = load_for_inference(ckpt, device, manifest)
    where = f"train.distill_from {tc.distill_from}"
    if theirs.model.head != "lm" or not theirs.model.causal:
        raise ConfigError(f"{where} is not a decoder language model (a classifier, reward model or encoder): the "
                          "teacher must predict next tokens")
    tokenizer = ckpt / "tokenizer.json"
    if tokenizer_file is None or not tokenizer.is_file() or sha256_file(tokenizer) != sha256_file(tokenizer_file):
        raise ConfigError(f"{where} reads another tokenizer than this data's: the same ids would mean other text; "
                          f"prepare the data with `lmforge prepare --tokenizer {tokenizer}`")
    if theirs.model.vocab_size != student.vocab_size:
        raise ConfigError(f"{where} predicts {theirs.model.vocab_size} tokens and this model {student.vocab_size}: "
                          "set model.vocab_size to the teacher's")
    if theirs.model.block_size < student.block_size:
        raise ConfigError(f"{where} reads {theirs.model.block_size} tokens at most and this model's rows are "
                          f"{student.block_size}: lower model.block_size to the teacher's")
    teacher.requires_grad_(False)
    files = {name: entry["sha256"] for name, entry in manifest["files"].items() if name != "state.json"}
    source = {"path": str(ckpt), "fingerprint": hashlib.sha256(json.dumps(files, sort_keys=True).encode()).hexdigest()}
    return (teacher.to(torch.bfloat16) if tc.precision != "fp32" else teacher), source


def shard_teacher(teacher: GPT, dist: DistInfo, device: torch.device) -> tuple[GPT, torch.Tensor]:
    """The teacher sharded with FSDP2 like the student (train.parallel fsdp: no process holds its body whole), and a
    whole copy of its head's weight (V, C_t), which the student's loss reads outside the teacher's forward (one
    matrix kept whole on every process). hidden_states gathers the blocks as forward does
    (register_fsdp_forward_method); teacher_reading reshards the rest after each use."""
    from torch.distributed.fsdp import register_fsdp_forward_method

    head = teacher.lm_head.weight.detach().clone()
    apply_fsdp(teacher, dist, device)  # in its own dtype (bf16 when the run is): it only reads
    if dist.enabled:
        register_fsdp_forward_method(teacher, "hidden_states")
    return teacher, head


def teacher_reading(teacher: GPT, x: torch.Tensor, attention_mask: Optional[torch.Tensor], config: RunConfig,
                    head: Optional[torch.Tensor] = None) -> Teacher:
    """What the student's loss needs of the teacher for a batch of ids x (B, T): its hidden states (no gradient),
    its head (`head`: shard_teacher's whole copy) and the run's distillation settings."""
    tc = config.train
    with torch.no_grad():
        hidden = teacher.hidden_states(x, attention_mask=attention_mask)
    if hasattr(teacher, "reshard"):  # an FSDPModule: the root keeps its gathered weights after a forward
        teacher.reshard()
    return Teacher(hidden, teacher.lm_head.weight if head is None else head, teacher.config.logit_softcap,
                   tc.distill_alpha, tc.distill_beta, tc.distill_temperature)


def student_sampler(config: RunConfig, tokenizer_file: Optional[str | Path], pad_id: int) -> Any:
    """The sampler of on-policy distillation: online.OnlinePairs with no judge, one sample of each sft example's
    prompt (online_max_new_tokens, online_temperature)."""
    from lmforge.tokenizer import Tokenizer
    from lmforge.train.online import OnlinePairs

    tc, block = config.train, config.model.block_size
    if tc.online_max_new_tokens >= block:
        raise ConfigError(f"train.online_max_new_tokens={tc.online_max_new_tokens} leaves no room for a prompt in the "
                          f"model's context (block_size {block}): lower it")
    tok = Tokenizer.load(tokenizer_file)
    return OnlinePairs(None, block, tc.online_max_new_tokens, tc.online_temperature, tc.seed, tok.start_id,
                       tok.end_id, pad_id, rows_per_prompt=1, tokenizer=tok)


def samples_this_time(config: RunConfig, step: int, micro: int) -> bool:
    """Whether micro-batch `micro` of `step` is the student's samples (probability train.distill_on_policy; the draw
    depends on the seed, the step and the micro-batch only)."""
    share = config.train.distill_on_policy
    return share > 0 and np.random.default_rng([config.train.seed, step, micro, 1]).random() < share
