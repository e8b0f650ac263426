"""Knowledge distillation's teacher (train.distill_from): a frozen language model read from its run, checked to
speak the student's vocabulary, whose last hidden states at every batch the student's loss compares with
(head_loss.linear_distillation; GPT.forward's teacher)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import torch

from lmforge.checkpoint import load_for_inference, verified_checkpoint
from lmforge.config import RunConfig
from lmforge.errors import ConfigError
from lmforge.files import sha256_file
from lmforge.head_loss import Teacher
from lmforge.model import GPT


def load_teacher(config: RunConfig, tokenizer_file: Optional[str | Path], device: torch.device) -> GPT:
    """The teacher of train.distill_from on `device`, frozen, in eval mode, in bf16 when the run trains in bf16
    (its forward pass is all it does). Refused in one line: a classifier or encoder, another tokenizer than the
    data's, another vocabulary size than the student's, or a context shorter than the student's."""
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
    return teacher.to(torch.bfloat16) if tc.precision != "fp32" else teacher


def teacher_reading(teacher: GPT, x: torch.Tensor, attention_mask: Optional[torch.Tensor], config: RunConfig
                    ) -> Teacher:
    """What the student's loss needs of the teacher for a batch of ids x (B, T): its hidden states (no gradient),
    its head and the run's distillation settings."""
    tc = config.train
    with torch.no_grad():
        hidden = teacher.hidden_states(x, attention_mask=attention_mask)
    return Teacher(hidden, teacher.lm_head.weight, teacher.config.logit_softcap, tc.distill_alpha, tc.distill_beta,
                   tc.distill_temperature)
