"""The training loop.

    Trainer(config).fit():  begin (restore, metrics) -> loop { advance: train_step; maybe_log; maybe_eval; maybe_save }
                            -> finish (plot)

Everything the loop uses is made by a small build_* function (device and processes, data, model,
optimizer, schedule), each usable and testable alone. The loop is the same for pretraining and
fine-tuning: pass `train_data` (any object with next_batch/state_dict/load_state_dict yielding
(input ids, labels) with IGNORE_INDEX where a label must not count) and `val_batches`.

One optimizer step = grad_accum micro-batches on each of world_size processes. The loss of the step
is the sum over every counted label divided by their number in the whole global batch, so the
gradient does not depend on how the global batch is split into micro-batches or processes.

Nothing is lost to a fault (docs/GUARANTEES.md): a step whose loss or gradient is not finite never
reaches the weights (train.nonfinite: stop | skip, see guard.py); SIGTERM or Ctrl-C saves a checkpoint
at the end of the step and exits cleanly (a second Ctrl-C aborts at once); `resume: auto` continues
from the newest intact checkpoint, bit for bit, falling back past corrupt ones; resuming on other data
is refused unless train.allow_data_change.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import math
import os
import random
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np
import torch
import yaml
from torch import nn

from lmforge.allocator import keep_freed_memory
from lmforge.checkpoint import (CHECKPOINTS, capture_rng, check_free_space, checkpoint_bytes, checkpoint_name,
                                clean_interrupted_saves, fault_point, latest_checkpoint,
                                load_training_state, newest_intact_checkpoint, prune_checkpoints, read_run_config,
                                resolve_checkpoint,
                                restore_rng, save_checkpoint, verified_checkpoint)
from lmforge.checkpoint import (best_checkpoint, check_base, check_data_tokenizer, load_lora_base,
                                load_start_weights, lora_base)
from lmforge.checkpoint import has_optimizer_state, save_sharded_checkpoint
from lmforge.config import LoRAConfig, ModelConfig, RunConfig, to_dict, with_init_sections
from lmforge.data.batches import (IGNORE_INDEX, Batches, TokenBatches, fixed_batches, fixed_example_batches,
                                  kl_partners)
from lmforge.data.tasks import TEXT_TASKS
from lmforge.distributed import (DistInfo, all_reduce_sum, apply_compile, apply_ddp, apply_fsdp, as_peer_failure,
                                 barrier, full_state, gather_objects, is_sharded, no_sync, resolve_device,
                                 setup_distributed, slow_half_warning, teardown_distributed, unwrap)
from lmforge.errors import CheckpointError, ConfigError, DataError, LmforgeError
from lmforge.files import atomic_write_text, sha256_file
from lmforge.head_loss import logits_cross_entropy_tokens
from lmforge.lora import added_row_weights, apply_lora, base_fingerprint, train_added_rows, train_heads
from lmforge.model import GPT, count_parameters, flops_per_token
from lmforge.nf4 import NF4Linear
from lmforge.preference_loss import (SMOOTHED, UNPAIRED_LOSSES, PreferenceLoss, RunningMean, grpo_clipped,
                                     grpo_log_ratio, grpo_sequence_loss, grpo_token_loss, high_entropy_mask,
                                     kto_weight_advice, reward_model_loss, sequence_logprobs)
from lmforge.train import amx_linear
from lmforge.train.guard import NonFiniteStop, StepGuard
from lmforge.train.loss import balanced_class_weights, count_labels, cross_entropy_sum
from lmforge.train.memory import check_memory
from lmforge.train.metrics import MetricsLogger, Throughput
from lmforge.train.optim import build_optimizer, set_lr
from lmforge.train.plot import plot_run
from lmforge.train.precision import autocast, run_forward
from lmforge.train.preference import (SCORES_FILE, SCORES_FORMAT, frozen_reference, kl_reference_point, pair_terms,
                                     read_scores, reference_model, score_completions, write_scores)
from lmforge.train.schedule import build_schedule
from lmforge.train.selection import BestTracker

ValBatches = list[tuple[torch.Tensor, torch.Tensor]]
EvalHook = Callable[[int, dict[str, float]], None]


class StopTraining(Exception):
    """Raised by an `on_eval` hook to end the run cleanly after this evaluation, as patience does: a checkpoint,
    then the summary, whose stopped_by is `reason` (a sweep's pruner raises it for a hopeless trial)."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


# ------------------------------------------------------------------------------------------- builders
VAL_SAMPLING_STEP = 2**40  # the step online sampling's seed takes at every evaluation (no training step): one draw


def seed_everything(seed: int) -> None:
    """Seed python, numpy's global RNG and torch (CPU and every CUDA device)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def init_token_embeddings(model: GPT, config: RunConfig, tokenizer_file: Optional[Path]) -> dict[str, Any]:
    """Copy word vectors (data.embedding_init: word2vec | glove:PATH) into model.tok_emb in place; the report
    says which source and what fraction of the vocabulary rows it covered."""
    from lmforge.data.embeddings import init_embeddings
    from lmforge.tokenizer import Tokenizer

    if tokenizer_file is None:
        raise DataError(f"data.embedding_init={config.data.embedding_init!r} needs the dataset's tokenizer.json "
                        f"in {config.data.path}; re-run `lmforge prepare`")
    return init_embeddings(model.tok_emb.weight, config.data.embedding_init, config.data.path,
                           Tokenizer.load(tokenizer_file), config.train.seed)


def build_model(config: ModelConfig, device: torch.device, seed: int) -> GPT:
    """GPT(config) initialised from `seed` on the CPU (the same weights on every device), then moved."""
    torch.manual_seed(seed)
    return GPT(config).to(device)


@dataclasses.dataclass
class PreparedData:
    """What build_data found in a prepared data directory."""

    train: Batches
    val: ValBatches
    vocab_size: int
    tokenizer_file: Optional[Path]
    manifest_sha256: Optional[str] = None  # of DIR/manifest.json: a resumed run checks it is the same data
    task: Optional[dict[str, Any]] = None  # task data: {"task", "template"} or {"task", "labels"}, into checkpoints
    label_counts: Optional[list[int]] = None  # classify data: train examples per label id (class weights)
    val_examples: Optional[Any] = None  # sft data: the val split's Examples (task metrics by generation)
    val_pairs: Optional[Any] = None  # (un)paired preference data: the val split's Examples (precompute_reference)


def build_data(config: RunConfig, info: DistInfo) -> PreparedData:
    """Train stream and fixed validation batches from the prepared directory config.data.path.

    Each process reads its own rows of every global batch. The vocabulary size comes from the manifest.
    Task data (manifest format lmforge-task-v1) gives batches of whole examples: build_task_data.
    """
    from lmforge.data.shards import load_split, read_manifest
    from lmforge.data.tasks import is_task_data

    data_dir = Path(config.data.path)
    if is_task_data(data_dir):
        return build_task_data(config, info)
    if config.data.packing:
        raise ConfigError(f"data.packing packs sft task examples, but {data_dir} holds a token stream, whose windows "
                          f"are already full rows: drop data.packing")
    manifest = read_manifest(data_dir)
    T, B, seed = config.model.block_size, config.train.batch_size, config.train.seed
    train_tokens = load_split(data_dir, "train")
    val_tokens = load_split(data_dir, "val")
    if len(val_tokens) < T + 1:
        raise DataError(f"{data_dir}: the val split has {len(val_tokens)} tokens, fewer than block_size+1={T + 1}; "
                        f"prepare with a larger val fraction or lower model.block_size")
    train = TokenBatches(train_tokens, T, B, seed=seed, sampling=config.data.sampling,
                         rank=info.rank, world_size=info.world_size)
    tok = data_dir / (manifest.get("tokenizer") or {}).get("file", "tokenizer.json")
    if config.train.objective == "mlm":  # an encoder learns to fill masked tokens
        from lmforge.data.batches import MaskedBatches, fixed_masked_batches
        from lmforge.tokenizer import Tokenizer

        mask_id, V, p = Tokenizer.load(tok).mask_id, int(manifest["vocab_size"]), config.train.mlm_probability
        if mask_id is None:
            raise DataError(f"{data_dir}'s tokenizer has no mask token, which train.objective=mlm needs: prepare the "
                            f"data again with --mask-token")
        val = fixed_masked_batches(val_tokens, T, B, config.train.eval_batches, mask_id, V, p, seed=seed + 1,
                                   rank=info.rank, world_size=info.world_size)
        return PreparedData(MaskedBatches(train, mask_id, V, p, seed), val, V, tok,
                            _sha256_or_none(data_dir / "manifest.json"))
    val = fixed_batches(val_tokens, T, B, config.train.eval_batches, seed=seed + 1,
                        rank=info.rank, world_size=info.world_size)
    return PreparedData(train, val, int(manifest["vocab_size"]), tok if tok.is_file() else None,
                        _sha256_or_none(data_dir / "manifest.json"))


def build_task_data(config: RunConfig, info: DistInfo) -> PreparedData:
    """Batches of whole examples from task data (`lmforge prepare --task sft`): the train stream right-padded
    to each batch's longest example (or packed, data.packing), labels IGNORE_INDEX on prompt tokens and padding;
    fixed val batches."""
    from lmforge.data.batches import ExampleBatches
    from lmforge.data.tasks import load_examples, read_task_manifest

    data_dir = Path(config.data.path)
    manifest = read_task_manifest(data_dir)
    T, B, seed = config.model.block_size, config.train.batch_size, config.train.seed
    specials = manifest["special_tokens"]
    pad = specials["pad"] if specials.get("pad") is not None else specials["end"]
    pairs = manifest["task"] == "preference"  # batches of B pairs: 2B rows, chosen and rejected in turn
    unpaired = manifest["task"] == "unpaired"  # B completions and their mismatched rows (KTO)
    # a reward model reads pairs whole (a too-long one loses prompt tokens after its start token)
    whole = int(specials.get("start") is not None) if pairs and config.train.objective == "reward" else None
    train = ExampleBatches(load_examples(data_dir, "train"), T, B, seed=seed, shuffle=config.data.sampling == "random",
                           rank=info.rank, world_size=info.world_size, pad_id=pad, packing=config.data.packing,
                           pairs=pairs, unpaired=unpaired, whole=whole)
    val_examples = load_examples(data_dir, "val")
    val = fixed_example_batches(val_examples, T, B, config.train.eval_batches, rank=info.rank,
                                world_size=info.world_size, pad_id=pad, pairs=pairs, unpaired=unpaired, whole=whole)
    if manifest["task"] == "classify":  # batches (x, labels (B,), attention_mask): a classify head reads them
        labels = manifest["labels"]
        return PreparedData(train, val, int(manifest["vocab_size"]), data_dir / "tokenizer.json",
                            _sha256_or_none(data_dir / "manifest.json"), task={"task": "classify", "labels": labels},
                            label_counts=[int(manifest["label_counts"]["train"][name]) for name in labels])
    return PreparedData(train, val, int(manifest["vocab_size"]), data_dir / "tokenizer.json",
                        _sha256_or_none(data_dir / "manifest.json"),
                        task={"task": manifest["task"], "template": manifest["template"]},
                        val_examples=None if pairs or unpaired else val_examples,
                        val_pairs=val_examples if pairs or unpaired else None)


def check_objective(config: RunConfig, task: Optional[dict[str, Any]]) -> None:
    """Refuse a training objective the model cannot learn honestly: mlm needs an encoder (model.causal false),
    and an encoder trained on next tokens would see them and learn to copy."""
    causal, objective, kind = config.model.causal, config.train.objective, task["task"] if task else None
    if objective == "mlm" and causal:
        raise ConfigError("train.objective=mlm predicts masked tokens from both sides: it trains an encoder, set "
                          "model.causal false")
    if objective == "mlm" and kind is not None:
        raise ConfigError(f"train.objective=mlm pretrains on token data, but {config.data.path} is {kind} task data: "
                          f"drop train.objective")
    if objective == "reward" and kind != "preference":
        raise ConfigError(f"train.objective=reward trains a reward model on preference pairs, and {config.data.path} "
                          f"is {f'{kind} task data' if kind else 'a token stream'}: prepare pairs with `lmforge "
                          "prepare --task preference`")
    if not causal and kind in TEXT_TASKS and objective != "reward":
        raise ConfigError(f"an encoder (model.causal false) does not generate, so it cannot learn text to text "
                          f"({kind}) data: fine-tune a decoder, or use classify data")
    tc = config.train
    if tc.reward_center_coefficient and objective != "reward":
        raise ConfigError("train.reward_center_coefficient centres a reward model's rewards: drop it, or set "
                          "train.objective reward")
    policy_loss_set = (tc.dpo_beta != 0.1 or tc.dpo_label_smoothing != 0.0 or tc.preference_loss != "dpo"
                       or tc.simpo_gamma != 0.5 or tc.precompute_reference or tc.preference_nll_weight
                       or tc.kto_desirable_weight != 1.0 or tc.kto_undesirable_weight != 1.0)
    if objective == "reward" and policy_loss_set:
        raise ConfigError("train.preference_loss / dpo_beta / dpo_label_smoothing / simpo_gamma / kto_*_weight / "
                          "preference_nll_weight / precompute_reference set a language model's preference loss, and "
                          "train.objective reward trains a reward model (its loss has only "
                          "train.reward_center_coefficient): drop them")
    if objective == "reward" and tc.early_exit_layer is not None:
        raise ConfigError("train.early_exit_layer adds a next-token loss, and a reward model predicts no tokens: drop "
                          "train.early_exit_layer")
    grpo_on_sft = kind == "sft" and tc.preference_loss == "grpo"  # GRPO needs prompts only: sft data has them
    if (kind in ("preference", "unpaired") or grpo_on_sft) and objective != "reward":
        check_preference_loss(tc, kind)
    if tc.online and (kind not in ("preference", "sft") or objective == "reward"):
        raise ConfigError("online training (train.online_reward_model / online_reward_function) samples completions "
                          "for a language model's preference loss: train on preference data (`lmforge prepare --task "
                          "preference`; with GRPO also sft data) without train.objective reward, or drop it")
    if tc.online and kind == "sft" and not grpo_on_sft:
        raise ConfigError("online training on sft data trains with GRPO, which needs only the prompts: set "
                          "train.preference_loss grpo, or prepare preference pairs (`--task preference`) for online "
                          "DPO, whose evaluations score the data's pairs")
    if tc.online and tc.precompute_reference:
        raise ConfigError("online training samples new completions at every step, which "
                          "train.precompute_reference cannot score ahead: drop one")
    if tc.online and tc.parallel == "fsdp":
        raise ConfigError("online training samples from the whole model, which FSDP shards over the "
                          "processes: use train.parallel ddp")
    if kind not in ("preference", "unpaired") and policy_loss_set and not grpo_on_sft:
        raise ConfigError(f"train.preference_loss / dpo_beta / dpo_label_smoothing / simpo_gamma / kto_*_weight / "
                          f"preference_nll_weight / precompute_reference set a preference loss, but "
                          f"{config.data.path} is not preference data (`lmforge prepare --task preference` or "
                          "`--task unpaired`): drop them")
    if not causal and objective == "clm" and kind is None:
        raise ConfigError("model.causal=false lets every position see the next token, so next-token training "
                          "(train.objective clm) would only learn to copy it: set train.objective mlm")


def check_preference_loss(tc: Any, kind: str = "preference") -> None:
    """Refuse preference-loss settings that cannot work or would be ignored on `kind` data (preference: pairs;
    unpaired: single completions labelled desirable or not)."""
    name = tc.preference_loss
    if kind == "unpaired" and name not in UNPAIRED_LOSSES:
        raise ConfigError(f"unpaired preference data (single completions labelled desirable or not) trains with a loss "
                          f"of single completions, and train.preference_loss is {name}, a loss of pairs: set "
                          f"--train.preference_loss kto (or apo_zero_unpaired, bco_unpaired)")
    if kind == "preference" and name in UNPAIRED_LOSSES:
        raise ConfigError(f"train.preference_loss {name} trains on single completions labelled desirable or not "
                          "(`lmforge prepare --task unpaired`), and this is pair data: use dpo or another pair loss")
    if kind == "preference" and (tc.kto_desirable_weight != 1.0 or tc.kto_undesirable_weight != 1.0):
        raise ConfigError("train.kto_desirable_weight / kto_undesirable_weight weigh unpaired completions, and this "
                          "is pair data: drop them")
    if kind == "unpaired" and tc.preference_nll_weight:
        raise ConfigError("train.preference_nll_weight adds a next-token term on a pair's chosen completion, and "
                          "unpaired data has no pairs: drop it")
    if PreferenceLoss.of(tc).needs_reference and tc.init_from == "none":
        raise ConfigError(f"preference data trains a model with {name} against a frozen reference, the model it starts "
                          "from: set train.init_from to that checkpoint or run (most often the sft model), or use "
                          "train.preference_loss simpo or orpo, which need no reference")
    if tc.early_exit_layer is not None:
        raise ConfigError("train.early_exit_layer adds a next-token loss; preference data is trained with a "
                          "preference loss: drop train.early_exit_layer")
    if tc.dpo_label_smoothing and name not in SMOOTHED:
        raise ConfigError(f"train.dpo_label_smoothing is used by the {', '.join(sorted(SMOOTHED))} losses, not by "
                          f"{name}: drop it")
    if tc.simpo_gamma != 0.5 and name != "simpo":
        raise ConfigError(f"train.simpo_gamma is SimPO's margin, and train.preference_loss is {name}: drop it, or set "
                          "train.preference_loss simpo")
    if tc.precompute_reference and not PreferenceLoss.of(tc).needs_reference:
        raise ConfigError(f"train.precompute_reference scores the completions with the frozen reference, and "
                          f"train.preference_loss {name} has none: drop it")


def check_selection(tc: Any, task: Optional[dict[str, Any]]) -> None:
    """Refuse train.best_metric / task_eval_every settings the data cannot measure."""
    kind = task["task"] if task is not None else None
    if tc.task_eval_every and kind != "sft":
        raise ConfigError(f"train.task_eval_every={tc.task_eval_every} generates for sft task data, but the data is "
                          f"{kind or 'a token stream'}: set it to 0")
    if tc.best_metric in ("val_accuracy", "val_macro_f1") and kind != "classify":
        raise ConfigError(f"train.best_metric={tc.best_metric} is measured on classify data (`lmforge prepare --task "
                          f"classify`): use val_loss")
    if tc.best_metric in ("val_reward_accuracy", "val_reward_margin") and kind not in ("preference", "reward") and not (
            tc.best_metric == "val_reward_margin" and kind == "unpaired"):
        raise ConfigError(f"train.best_metric={tc.best_metric} is measured on preference data (`lmforge prepare --task "
                          f"preference`{'' if tc.best_metric == 'val_reward_accuracy' else ' or --task unpaired'}): "
                          "use val_loss")
    if tc.best_metric.startswith("val_choices") and not tc.choices_file:
        raise ConfigError(f"train.best_metric={tc.best_metric} is measured on train.choices_file's questions: set "
                          f"train.choices_file, or use val_loss")
    if tc.preference_loss == "grpo" and tc.best_metric in ("val_reward_accuracy", "val_reward_margin"):
        raise ConfigError(f"train.best_metric={tc.best_metric} compares the rewards of a pair's completions, and GRPO "
                          "trains on groups of its own samples: use val_online_reward (their mean reward) or val_loss")
    if tc.best_metric == "val_online_reward" and not tc.online:
        raise ConfigError("train.best_metric=val_online_reward is measured with train.online_reward_model: set it, or "
                          "use val_loss")
    if tc.best_metric not in ("val_loss", "val_accuracy", "val_macro_f1", "val_choices_acc", "val_choices_acc_norm",
                              "val_reward_accuracy", "val_reward_margin", "val_online_reward") \
            and not (kind == "sft" and tc.task_eval_every):
        raise ConfigError(f"train.best_metric={tc.best_metric} is measured by generating on sft task data: prepare it "
                          f"with `lmforge prepare --task sft` and set train.task_eval_every (e.g. 1), or use val_loss")


def with_init_model(config: RunConfig) -> tuple[RunConfig, Optional[Path]]:
    """For train.init_from: (`config` with the checkpoint's model section, the checkpoint); else (config, None).

    A run started from a checkpoint (e.g. one `lmforge import` wrote) trains that model: architecture and
    vocabulary come from the checkpoint, the Trainer loads its weights; optimizer, step and data start fresh.
    A LoRA run's checkpoint gives its lora section too: its adapters train on (config.with_init_sections).
    """
    if config.train.init_from == "none":
        return config, None
    ckpt = resolve_checkpoint(config.train.init_from)
    return with_init_sections(config, read_run_config(ckpt), ckpt), ckpt


def with_added_tokens(config: RunConfig, ckpt: Path, data: PreparedData) -> RunConfig:
    """For a run from `ckpt` on `data`: `config` when the data's ids fit the model; with the data's vocab_size when
    the data's tokenizer is the checkpoint's with tokens added (`lmforge prepare --add-tokens`): the model loads
    the checkpoint's rows and starts the new ones at their mean (checkpoint.load_start_weights); a LoRA run trains
    those rows beside its adapters (lora.train_added_rows). DataError for other data past the model's vocabulary."""
    added = check_data_tokenizer(ckpt, data.tokenizer_file, added_ok=True)
    size = config.model.vocab_size
    if data.vocab_size <= size:  # an imported model may have rows past its tokenizer's ids: the new tokens take them
        return config
    if not added:
        raise DataError(f"{config.data.path} has vocab_size={data.vocab_size}, more than the model of "
                        f"{ckpt} ({size}); prepare it with that model's tokenizer")
    return with_vocab_size(config, data.vocab_size)


def load_init_weights(model: nn.Module, ckpt: Path, lora: Optional[LoRAConfig], device: torch.device,
                      tokenizer_file: Optional[Path]) -> tuple[Optional[dict[str, str]], bool]:
    """Load the weights of the train.init_from checkpoint, refusing data made with another tokenizer. A classifier
    started from a language model takes its body only (load_body_weights: the classifier starts fresh).

    With `lora` the model is then frozen and adapted (apply_lora_for_training); when `ckpt` is a LoRA run's, its
    base loads first (checked against the fingerprint the run recorded) and then its adapters and heads, which train
    on. Returns (the base's {"path", "fingerprint"} for a LoRA run, else None; whether adapters were loaded)."""
    check_data_tokenizer(ckpt, tokenizer_file, added_ok=True)  # with_added_tokens made room for added tokens
    if lora is not None and read_run_config(ckpt).lora is not None:  # with_init_sections matched the two
        base = load_lora_base(model, ckpt, device)
        apply_lora(model, lora)
        train_heads(model)
        train_added_rows(model)
        load_training_state(ckpt, model, None, device)  # verified; the adapters and heads
        return base, True
    load_start_weights(model, ckpt, device)
    return (apply_lora_for_training(model, lora, ckpt) if lora is not None else None), False


def with_classify_head(config: RunConfig, num_labels: int) -> RunConfig:
    """`config` with model.head: classify and model.num_labels (classify data decides the label set)."""
    return dataclasses.replace(config, model=dataclasses.replace(config.model, head="classify", num_labels=num_labels))


def apply_lora_for_training(model: nn.Module, lora: LoRAConfig, base_ckpt: Path) -> dict[str, str]:
    """Freeze `model` (its base weights loaded from base_ckpt), put adapters on it (lmforge.lora.apply_lora, A drawn
    from torch's global generator) and keep its task heads and added tokens' rows trainable (lora.train_heads,
    train_added_rows). Returns {"path", "fingerprint"} of the base:
    every checkpoint records it, and resume and load_for_inference refuse another base."""
    fingerprint = base_fingerprint(model)
    apply_lora(model, lora)
    train_heads(model)
    train_added_rows(model)
    return {"path": str(Path(base_ckpt).resolve()), "fingerprint": fingerprint}


def with_vocab_size(config: RunConfig, vocab_size: int) -> RunConfig:
    """`config` with model.vocab_size set (the data decides the vocabulary, not the preset)."""
    return dataclasses.replace(config, model=dataclasses.replace(config.model, vocab_size=vocab_size))


# -------------------------------------------------------------------------------------------- trainer
class Trainer:
    """Trains `config` end to end; `fit()` returns a summary dict.

    config: the resolved RunConfig. train_data / val_batches: a batch stream and fixed validation batches
    (default: built from config.data.path, which also sets model.vocab_size; when given, config.model.vocab_size
    must fit them and `tokenizer_file` names the tokenizer to copy into checkpoints).
    model: an already built model (fine-tuning, LoRA); default GPT(config.model).
    progress / tensorboard: switch the progress bar and TensorBoard events off (tests).
    on_eval: called after each evaluation with (step, the measurements: val_loss, task metrics), on every process;
    it may raise StopTraining to stop the run there (a sweep reports each evaluation to its trial this way).
    task: with train_data, what a prepared directory's manifest would say of it ({"task": "preference",
    "template": None}: train_data's batches are pairs; lmforge.plan.measure trains on random pairs this way).
    """

    def __init__(self, config: RunConfig, *, train_data: Optional[Batches] = None,
                 val_batches: Optional[ValBatches] = None, tokenizer_file: Optional[str | Path] = None,
                 model: Optional[nn.Module] = None, progress: bool = True, tensorboard: bool = True,
                 on_eval: Optional[EvalHook] = None, task: Optional[dict[str, Any]] = None) -> None:
        tc = config.train
        if tc.num_threads:
            torch.set_num_threads(tc.num_threads)
        self.device = resolve_device(tc.device, _local_rank())
        if self.device.type == "cpu":  # each step reuses the memory the last one freed, without page faults
            keep_freed_memory()
        self.dist = setup_distributed(self.device, tc.dist_timeout)
        slow = tc.precision != "fp32" and slow_half_warning(self.device, f"train.precision={tc.precision}",
                                                           "--train.precision fp32")
        if slow and self.dist.is_main:  # bf16 asked of a CPU without bf16 instructions: right, but far slower
            print(f"warning: {slow}", file=sys.stderr, flush=True)
        self.data_manifest_sha256: Optional[str] = None
        self.val_examples: Optional[Any] = None  # sft data: val Examples for task_eval_every
        self.task: Optional[dict[str, Any]] = task  # task data's {"task", "template"}: generate/serve apply the same
        config, init_ckpt = with_init_model(config)
        if train_data is None:
            data = build_data(config, self.dist)
            if init_ckpt is None:
                config = with_vocab_size(config, data.vocab_size)
            else:
                config = with_added_tokens(config, init_ckpt, data)
            train_data, val_batches, tokenizer_file = data.train, data.val, data.tokenizer_file
            self.data_manifest_sha256, self.task, self.val_examples = data.manifest_sha256, data.task, data.val_examples
            val_pairs = data.val_pairs
        else:
            val_pairs = None  # given batches: val_batches, if any, as they are
        self.labels: Optional[list[str]] = None  # classify data: the label names, ids = their index
        self.val_metrics: dict[str, float] = {}  # classify: val_accuracy, val_macro_f1 of the last evaluation
        self.class_weights: Optional[torch.Tensor] = None  # (K,) train.class_weights: balanced
        if self.task is not None and self.task["task"] == "classify":
            self.labels = list(self.task["labels"])
            config = with_classify_head(config, len(self.labels))
            if tc.class_weights == "balanced":
                self.class_weights = balanced_class_weights(data.label_counts).to(self.device)
        elif tc.class_weights != "none":
            raise ConfigError(f"train.class_weights={tc.class_weights!r} weighs classes, but {config.data.path} is not "
                              "classify data (`lmforge prepare --task classify`); drop the setting")
        kind = self.task["task"] if self.task is not None else None
        self.reward = tc.objective == "reward"  # a reward model: a scalar head trained on preference pairs
        self.preference = ((kind in ("preference", "unpaired") or (kind == "sft" and tc.preference_loss == "grpo"))
                           and not self.reward)  # DPO, KTO, GRPO (also on sft data's prompts) ... (train/preference.py)
        self.unpaired = kind == "unpaired"  # single completions labelled desirable or not (KTO)
        if self.preference or self.reward:  # dropout off: log-probabilities comparable with the reference's, and a
            # chosen and rejected reward from the same function (as TRL's trainers)
            config = dataclasses.replace(config, model=dataclasses.replace(config.model, dropout=0.0))
        check_objective(config, self.task)
        if config.model.head == "classify" and self.labels is None and not self.reward:  # init_from's model
            raise ConfigError(f"train.init_from {tc.init_from} is a classifier or reward model (model.head: classify): "
                              f"it has no language-model head to train on {kind or 'token'} data; start from a "
                              "language model (the one it was fine-tuned from)")
        if self.reward:  # the checkpoint says what it is: generate, eval and serve score with it
            config = with_classify_head(config, 1)
            self.task = {**self.task, "task": "reward"}
        self.preference_loss = PreferenceLoss.of(tc)
        self.grpo = self.preference and self.preference_loss.group  # GRPO: groups of samples (train/online.py)
        desirable = getattr(getattr(train_data, "examples", None), "desirable", None)
        if self.unpaired and desirable is not None and self.dist.is_main:  # every unpaired loss weighs the kinds
            advice = kto_weight_advice(int(desirable.sum()), int((~desirable).sum()), tc.kto_desirable_weight,
                                       tc.kto_undesirable_weight)
            if advice:  # the run goes on: a user may mean it (the paper's own one-kind-heavy runs)
                print(f"warning: {advice}", file=sys.stderr, flush=True)
        check_selection(config.train, self.task)
        self.selection = BestTracker(tc.best_metric, tc.patience)  # the best checkpoint, and early stopping
        self.measured: dict[str, float] = {}  # the last evaluation's measurements (val_loss, task metrics)
        self.early_stopped = False
        self.config = config
        self.train_data = train_data
        self.val_batches = val_batches or []
        self.tokenizer_file = Path(tokenizer_file) if tokenizer_file else None
        self.questions = self.read_questions(config)  # train.choices_file: read and checked before any training
        self.run_dir = Path(tc.run_dir)
        if self.run_dir.exists() and not self.run_dir.is_dir():
            raise ConfigError(f"train.run_dir {self.run_dir} is a file, not a directory: choose another --run-dir")
        if model is None:
            check_memory(config, str(self.device))  # before the first allocation, with the number

        seed_everything(tc.seed)
        self.raw_model = model.to(self.device) if model is not None else build_model(config.model, self.device, tc.seed)
        self.embedding_report: Optional[dict[str, Any]] = None
        self.base: Optional[dict[str, str]] = None  # LoRA: {"path", "fingerprint"} of the frozen base (state.json)
        self.adapters_loaded = False  # train.init_from is a LoRA run: its adapters were loaded and train on
        if init_ckpt is not None:  # RunConfig refuses lora without init_from
            self.base, self.adapters_loaded = load_init_weights(self.raw_model, init_ckpt, config.lora, self.device,
                                                                self.tokenizer_file)
        elif model is None and config.data.embedding_init != "none":
            self.embedding_report = init_token_embeddings(self.raw_model, config, self.tokenizer_file)
        # bf16 on a CPU with AMX: trained Linear layers wide enough in oneDNN's fast shapes (train/amx_linear.py), in
        # eager passes only
        self.amx = not (tc.compile or tc.activation_checkpointing or tc.parallel == "fsdp") and any(
            isinstance(m, nn.Linear) and m.weight.requires_grad and m.weight.numel() >= amx_linear.MIN_WEIGHT
            for m in self.raw_model.modules())
        # preference data: the frozen reference, the model as it starts (a new LoRA run's adapters add nothing yet:
        # the policy with its adapters off; adapters loaded from a LoRA run, or added tokens' rows, which train, are
        # part of it: a merged copy); none for a reference-free loss, or when its log-probabilities are computed now
        if self.preference and tc.precompute_reference:
            self.precompute_reference(val_pairs, progress)
        own_copy = config.lora is None or self.adapters_loaded or bool(added_row_weights(self.raw_model))
        self.reference = (frozen_reference(self.raw_model) if self.preference and self.preference_loss.needs_reference
                          and own_copy and not tc.precompute_reference else None)
        unwrap(self.raw_model).checkpoint_blocks = tc.activation_checkpointing
        self.online: Optional[Any] = None  # train.online_reward_model: on-policy pairs at every step (train/online.py)
        self.online_reward: Optional[float] = None  # samples' mean reward (online DPO: last micro-batch; GRPO: step)
        self.online_parts: dict[str, float] = {}  # the same, per judge (reward model, each reward function)
        self.rollouts: Optional[Any] = None  # GRPO: the generation of samples the steps train on (online.Rollouts)
        self.clipped = [0.0, 0.0]  # GRPO with grpo_iterations > 1: the step's clipped and all completion tokens
        self.entropy = [0.0, 0.0]  # GRPO: the step's summed entropy at its completion tokens, and their count
        if tc.online:
            from lmforge.train.online import load_online_pairs

            self.online = load_online_pairs(config, self.tokenizer_file, self.train_data.pad_id, self.device,
                                            rows_per_prompt=2 if kind == "preference" else 1)
        self.teacher: Optional[GPT] = None  # train.distill_from: the frozen teacher (train/distill.py)
        self.teacher_source: Optional[dict[str, str]] = None  # its checkpoint and fingerprint (state.json)
        self.teacher_head: Optional[torch.Tensor] = None  # train.parallel fsdp: the sharded teacher's head, whole
        self.distilled = torch.zeros(2, dtype=torch.float64, device=self.device)  # this process's summed (CE, D)
        self.distill_count = 0.0  # and the labels they sum over (this step's: the log's means)
        self.sampler: Optional[Any] = None  # train.distill_on_policy: the student's samples (train/distill.py)
        if tc.distill_from is not None:
            self.teacher, self.teacher_source = self.load_teacher(kind)
        if tc.distill_on_policy:
            from lmforge.train.distill import student_sampler

            self.sampler = student_sampler(config, self.tokenizer_file, self.train_data.pad_id)
        self.micro = 0  # the micro-batch of the step being trained (online sampling's seed)
        self.trained_rows = 0  # tokens of the micro-batch trained on last (tokens_seen counts them)
        if tc.parallel == "fsdp":  # sharding replaces the parameters (DTensors): before the optimizer takes them
            apply_fsdp(self.raw_model, self.dist, self.device, tc.precision, tc.fsdp_cpu_offload)
            if self.reference is not None:  # the frozen reference is sharded too: no process holds it whole
                apply_fsdp(self.reference, self.dist, self.device, tc.precision, tc.fsdp_cpu_offload)
            if self.teacher is not None:  # and so is a teacher's body (its head kept whole: the loss reads it)
                from lmforge.train.distill import shard_teacher

                self.teacher, self.teacher_head = shard_teacher(self.teacher, self.dist, self.device)
        lora = config.lora if config.lora is not None else LoRAConfig()  # (no adapters: its settings do nothing)
        self.optimizer = build_optimizer(self.raw_model, config.optim, self.device, lora.weight_decay, lora.lr_ratio,
                                         lora.lr_embedding)
        self.lr_at = build_schedule(config.optim, tc.max_steps)
        # DDP first, then compile: the compiler splits the graph at DDP's gradient buckets so that the
        # all-reduce of one bucket overlaps the backward of the next (PyTorch's DDPOptimizer).
        self.ddp_model = self.raw_model if tc.parallel == "fsdp" else apply_ddp(self.raw_model, self.dist, self.device)
        self.model = apply_compile(self.ddp_model) if tc.compile else self.ddp_model
        # Different dropout masks on different processes, the same on every run.
        torch.manual_seed(tc.seed + self.dist.rank)

        self.step = 0
        self.tokens_seen = 0
        self.val_loss: Optional[float] = None
        self.val_step: Optional[int] = None  # the step val_loss was measured at
        self.best_val_loss: Optional[float] = None
        self.last_checkpoint: Optional[Path] = None
        self.history: list[tuple[int, float]] = []  # (step, train loss) at every log step
        self.guard = StepGuard(tc.nonfinite, tc.spike_zscore, tc.spike_window)
        self.step_loss = math.nan  # global mean loss of the last step
        self.early_exit_loss: Optional[torch.Tensor] = None  # train.early_exit_layer: the last step's early exit loss
        self.kl: Optional[torch.Tensor] = None  # kto: the reference point z of the last micro-batch trained on
        # (this process's labels)
        self.bco = RunningMean() if self.preference and self.preference_loss.needs_delta else None  # BCO's delta
        self.stop_signal: Optional[str] = None  # set by SIGTERM / SIGINT: save at the end of the step, then stop
        self.stop_requested = False  # some process got a stop signal (agreed by all processes each step)
        self.logger: Optional[MetricsLogger] = None
        self.started = time.perf_counter()
        self.throughput = Throughput(self.tokens_seen, self.device)
        self._progress, self._tensorboard = progress, tensorboard
        self._tokenizer: Optional[Any] = None  # loaded for task metrics and choices
        self.on_eval = on_eval
        self.stopped_by_hook: Optional[str] = None  # the reason of the hook's StopTraining

    # ---------------------------------------------------------------------------------------- the loop
    def fit(self) -> dict[str, Any]:
        """Train to train.max_steps (continuing a checkpoint if train.resume says so); return a summary."""
        tc = self.config.train
        self.begin()
        aborted = False
        try:
            with self.stop_on_signals():
                while self.step < tc.max_steps and not self.advance():
                    pass
        except KeyboardInterrupt:  # the second Ctrl-C, raised wherever it landed: maybe inside a writer's lock
            aborted = True
            raise
        finally:
            self.logger.close(aborted)
        return self.finish()

    def begin(self) -> None:
        """Before the first step: restore (train.resume), check the disk space, open the metrics, write config.yaml,
        describe the run, start the clocks."""
        tc = self.config.train
        self.restore()
        if self.dist.is_main:  # before anything is written: room for keep_last + 1 (+ the best) checkpoints
            keeps_best = bool(self.val_batches) and tc.eval_interval > 0  # a best measured before the last step
            check_free_space(self.run_dir, checkpoint_bytes(self.raw_model, self.optimizer), tc.keep_last, keeps_best)
        self.logger = MetricsLogger(self.run_dir, enabled=self.dist.is_main, total_steps=tc.max_steps,
                                    start_step=self.step, tensorboard=self._tensorboard, progress=self._progress)
        self.write_config()
        self.describe()
        self.started = time.perf_counter()
        self.throughput = Throughput(self.tokens_seen, self.device)

    def advance(self) -> bool:
        """One turn of the loop: train_step, then log, evaluate and save when due. True when the run must stop
        here (a stop signal, patience, or an on_eval hook), after a checkpoint of this step.
        (benchmarks/train_throughput.py times the loop round by round: begin(), then advance() per step.)"""
        loss_sum, count, grad_norm, lr = self.train_step()
        self.step += 1
        self.maybe_log(loss_sum, count, grad_norm, lr)
        self.maybe_eval()
        saved = self.maybe_save()
        if not (self.stop_requested or self.early_stopped or self.stopped_by_hook):
            return False
        if not saved:
            with self.throughput.paused():
                self.save()
        if self.early_stopped:
            sel = self.selection
            self.logger.info(f"stopped early at step {self.step}: {sel.metric} has not improved on "
                             f"{sel.value:.4f} (step {sel.step}) for {sel.since} evaluations "
                             f"(train.patience={sel.patience})")
        elif self.stopped_by_hook:
            self.logger.info(f"stopped at step {self.step}: {self.stopped_by_hook}")
        else:
            by = self.stop_signal or "a signal to another process"
            self.logger.info(f"stopped at step {self.step} by {by}: checkpoint {self.last_checkpoint}; "
                             f"continue with --resume auto")
        return True

    @contextlib.contextmanager
    def stop_on_signals(self):
        """While training: SIGTERM / SIGINT ask for a checkpoint at the end of the step and a clean stop;
        a second SIGINT (Ctrl-C) raises KeyboardInterrupt at once (saves are atomic: nothing is damaged)."""
        if threading.current_thread() is not threading.main_thread():  # signal handlers live in the main thread
            yield
            return

        def request(signum: int, frame: Any) -> None:
            first = self.stop_signal is None
            self.stop_signal = self.stop_signal or signal.Signals(signum).name
            if signum == signal.SIGINT:
                signal.signal(signal.SIGINT, signal.default_int_handler)
            if first and self.dist.is_main:  # os.write: safe inside a signal handler
                os.write(2, f"\n{signal.Signals(signum).name}: saving a checkpoint at the end of this step, then "
                            f"stopping (Ctrl-C again aborts at once)\n".encode())

        previous = {s: signal.signal(s, request) for s in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield
        finally:
            for s, handler in previous.items():
                signal.signal(s, handler)

    def finish(self) -> dict[str, Any]:
        """Plot the loss curves (train.plot), say where everything is, and return the run's summary."""
        plot = plot_run(self.run_dir) if self.dist.is_main and self.config.train.plot else None
        val = f"val loss {self.val_loss:.4f}, " if self.val_loss is not None else ""
        self.logger.info(f"done: {self.step} steps, {self.tokens_seen:,} tokens, {val}"
                         f"checkpoint {self.last_checkpoint}, plot {plot}")
        best = best_checkpoint(self.run_dir) if self.dist.is_main else None
        if best is not None and self.selection.value is not None:
            self.logger.info(f"best: {best} ({self.selection.metric} {self.selection.value:.4f} at step "
                             f"{self.selection.step})")
        barrier(self.dist)  # no process leaves (and tears down the group) while rank 0 still writes
        return {
            "run_dir": str(self.run_dir), "steps": self.step, "tokens_seen": self.tokens_seen,
            "train_loss": self.history[-1][1] if self.history else None, "val_loss": self.val_loss,
            "best_val_loss": self.best_val_loss, "checkpoint": str(self.last_checkpoint) if self.last_checkpoint else None,
            "stopped_by": self.stop_signal if self.stop_requested else ("patience" if self.early_stopped
                                                                         else self.stopped_by_hook),
            "best": self.selection.state_dict(), "best_checkpoint": str(best) if best else None,
            "skipped_nonfinite": self.guard.skipped_nonfinite, "skipped_spike": self.guard.skipped_spike,
            "plot": str(plot) if plot else None, "elapsed_s": time.perf_counter() - self.started,
            "parameters": sum(p.numel() for p in self.raw_model.parameters()),  # a tied matrix counted once
        }

    def train_step(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, float]:
        """One optimizer step; returns (loss sum, counted labels, pre-clip gradient norm, learning rate).

        The optimizer runs only if the guard accepts the step: a NaN/Inf loss or gradient never reaches
        the weights (policy stop raises NonFiniteStop; skip drops the gradients, as does a loss spike).
        """
        fault_point("step", self.step + 1, self.dist.rank)
        loss_sum, count = self.accumulate_gradients()
        grad_norm = self.gradient_norm()
        verdict = self.judge_step(loss_sum, count, grad_norm)
        if verdict == "ok":
            grad_norm, lr = self.optimizer_step(grad_norm)
        else:
            lr = self.lr_at(self.step)
            self.optimizer.zero_grad(set_to_none=True)
            why = "non-finite loss or gradient" if verdict == "nonfinite" else "loss spike"
            self.logger_info(f"step {self.step + 1}: skipped ({why}, loss {self.step_loss:.4g}); "
                             f"the weights were not updated")
        return loss_sum, count, grad_norm, lr

    def judge_step(self, loss_sum: torch.Tensor, count: torch.Tensor, grad_norm: torch.Tensor) -> str:
        """'ok' | 'nonfinite' | 'spike' for the step about to be taken, the same on every process.

        One small all-reduce carries the loss sum, the stop-signal flags and each process's finiteness
        (1: its loss is not finite, 2: a gradient is not), so all processes stop or skip together.
        """
        W = self.dist.world_size
        flags = torch.zeros(2 + W, dtype=torch.float64, device=self.device)
        flags[0] = loss_sum.detach().double()
        flags[1] = 1.0 if self.stop_signal else 0.0
        flags[2 + self.dist.rank] = torch.where(~torch.isfinite(loss_sum), 1.0,
                                                torch.where(~torch.isfinite(grad_norm), 2.0, 0.0))
        values = all_reduce_sum(flags, self.dist).tolist()  # the one host sync of the step
        self.stop_requested = self.stop_requested or values[1] > 0
        self.step_loss = values[0] / max(float(count), 1.0)
        bad = [(rank, int(code)) for rank, code in enumerate(values[2:]) if code]
        verdict = self.guard.judge(self.step_loss, finite=not bad)
        if verdict == "nonfinite" and self.guard.policy == "stop":
            self.stop_nonfinite(bad)
        return verdict

    def stop_nonfinite(self, bad: list[tuple[int, int]]) -> None:
        """Write RUN_DIR/nonfinite-step-N.json (rank 0) and raise NonFiniteStop on every process."""
        step = self.step + 1
        rank, code = min(bad, key=lambda rc: (rc[1], rc[0]))  # a process whose loss went bad first, if any
        tensor = "loss" if code == 1 else next(
            (f"{name}.grad" for name, p in self.raw_model.named_parameters()
             if p.grad is not None and not bool(torch.isfinite(p.grad).all())), "gradient")
        path = self.run_dir / f"nonfinite-step-{step:08d}.json"
        if self.dist.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            last = str(self.last_checkpoint) if self.last_checkpoint else None
            atomic_write_text(path, json.dumps({"step": step, "rank": rank, "tensor": tensor, "loss": str(self.step_loss),
                                                "ranks": [r for r, _ in bad], "policy": "stop",
                                                "last_checkpoint": last}, indent=1))
        self.optimizer.zero_grad(set_to_none=True)
        kept = (f"the last good checkpoint is {self.last_checkpoint}" if self.last_checkpoint
                else "no checkpoint was saved yet")
        raise NonFiniteStop(f"step {step}: non-finite {tensor} on rank {rank}; the weights were not updated and {kept}; "
                            f"details in {path}; lower optim.lr, or pass --train.nonfinite skip to skip such steps")

    def logger_info(self, line: str) -> None:
        if self.logger is not None:
            self.logger.info(line)

    def accumulate_gradients(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Forward and backward over grad_accum micro-batches; returns (loss sum, labels in the global batch).

        Each micro-batch's summed loss is scaled by world_size / (labels in the global batch): DDP then
        averages the gradients over processes, which leaves the gradient of the global mean loss.
        """
        tc = self.config.train
        micro = self.grpo_batches() if self.grpo else [self.train_data.next_batch() for _ in range(tc.grad_accum)]
        if self.sampler is not None:  # on-policy distillation: drawn before any count (they decide the labels)
            micro = [self.distill_batch(batch, i) for i, batch in enumerate(micro)]
        self.distilled.zero_()
        count = torch.tensor(float(sum(self.batch_count(batch) for batch in micro)))
        local_count = float(count)
        if self.dist.enabled:  # labels in the global batch: one small all-reduce, no host sync
            count = all_reduce_sum(count.to(self.device), self.dist)
        scale = self.dist.world_size / count.clamp(min=1.0)
        loss_sum = torch.zeros((), device=self.device)
        exit_sum = torch.zeros((), device=self.device)
        for i, batch in enumerate(micro):
            self.micro = i
            last = i == len(micro) - 1
            sync = contextlib.nullcontext() if last else no_sync(self.ddp_model, self.dist)
            self.trained_rows = batch[0].numel()  # tokens (padding included) of the rows trained on
            with sync:  # DDP all-reduces (FSDP reduce-scatters) gradients once, after the last micro-batch
                loss, exit_loss, _ = self.batch_loss(self.model, batch, tc.early_exit_layer)
                if exit_loss is not None:  # LayerSkip: the first layers' prediction is trained too
                    exit_sum += exit_loss.detach()
                if i == 0 and fault_point("loss", self.step + 1, self.dist.rank) == "nan":  # tests only
                    loss = loss * math.nan
                trained = loss if tc.early_exit_layer is None else loss + tc.early_exit_weight * exit_loss
                (trained * scale).backward()  # scale: 0-dim, a scalar argument on any device
            loss_sum += loss.detach()
            self.tokens_seen += self.trained_rows * self.dist.world_size
        if fault_point("grad", self.step + 1, self.dist.rank) == "nan":  # tests only: one poisoned gradient
            next(p for p in self.raw_model.parameters() if p.grad is not None).grad.view(-1)[0] = math.nan
        if tc.early_exit_layer is not None:  # this process's mean (a float at logging time: no sync here)
            self.early_exit_loss = exit_sum / max(local_count, 1.0)
        self.distill_count = local_count
        return loss_sum, count

    def load_teacher(self, kind: Optional[str]) -> tuple[GPT, dict[str, str]]:
        """The teacher of train.distill_from and where it came from (train/distill.py), for token or sft data and a
        head the loss can fuse with (a LoRA adapting the head makes whole logits instead: refused)."""
        from lmforge.train.distill import load_teacher

        if kind not in (None, "sft"):
            raise ConfigError(f"train.distill_from teaches next tokens from token or sft data, and this is {kind} "
                              "data: drop train.distill_from")
        if self.config.train.distill_on_policy and kind != "sft":
            raise ConfigError("train.distill_on_policy samples completions of the data's prompts, and token data has "
                              "none: prepare sft data (`lmforge prepare --task sft`), or drop it")
        head = unwrap(self.raw_model).lm_head
        if not isinstance(head, nn.Linear) or head.bias is not None:
            raise ConfigError("train.distill_from computes the divergence fused with the plain LM head, and "
                              "lora.targets adapts the head (head, or emb of a tied embedding): leave them out of "
                              "lora.targets")
        return load_teacher(self.config, self.tokenizer_file, self.device)

    def distill_batch(self, batch: tuple[torch.Tensor, ...], micro: int) -> tuple[torch.Tensor, ...]:
        """On-policy distillation: micro-batch `micro` of this step as it is, or (as often as train.distill_on_policy
        says) one sample of each of its prompts by the student as it is now, labelled on the sample."""
        from lmforge.train.distill import samples_this_time

        if not samples_this_time(self.config, self.step, micro):
            return batch
        (x, y, _), _ = self.sampler.groups(unwrap(self.raw_model), batch, 1, self.step, micro, scale=False)
        return x, y

    def distill_terms(self, model: nn.Module, batch: tuple[torch.Tensor, ...]) -> torch.Tensor:
        """Knowledge distillation's summed loss of one batch, alpha D + (1 - alpha) CE (head_loss.linear_distillation
        against the teacher's hidden states of the same tokens); adds (CE, D) to self.distilled."""
        from lmforge.train.distill import teacher_reading

        x, _, *mask = (self.to_device(t) for t in batch)
        teacher = teacher_reading(self.teacher, x, mask[0] if mask else None, self.config, self.teacher_head)
        (loss, ce, divergence), _ = self.forward(model, batch, fused=True, teacher=teacher)
        self.distilled += torch.stack([ce.detach(), divergence.detach()]).double()
        return loss

    def batch_count(self, batch: tuple[torch.Tensor, ...]) -> int:
        """What a batch's summed loss is divided by: its counted labels, its pairs (preference data) or its
        completions (unpaired preference data)."""
        if self.grpo:  # GRPO: its completion tokens (dapo), or its completions
            return count_labels(batch[1]) if self.config.train.grpo_loss_type == "dapo" else batch[0].size(0)
        if self.unpaired:
            return batch[0].size(0)
        return batch[0].size(0) // 2 if self.preference or self.reward else count_labels(batch[1])

    def batch_loss(self, model: nn.Module, batch: tuple[torch.Tensor, ...], exit_layer: Optional[int] = None,
                   need_logits: bool = False) -> tuple[torch.Tensor, Optional[torch.Tensor], Any]:
        """(summed loss, early exit's summed loss or None, (logits, labels) or None) of one CPU batch.

        An LM head's loss comes fused with the head (train.loss_chunk > 0, model.token_loss: no logits are kept);
        a classifier's, or any when need_logits, from the logits, which then come back with the labels. Preference
        pairs: DPO's loss summed over the pairs (preference_terms)."""
        if self.grpo:
            return self.grpo_terms(model, batch).sum(), None, None
        if self.unpaired:
            return self.unpaired_terms(model, batch)[0].sum(), None, None
        if self.preference:
            return self.preference_terms(model, batch, online=True)[0].sum(), None, None
        if self.reward:
            return self.reward_terms(model, batch)[0].sum(), None, None
        if self.teacher is not None:
            return self.distill_terms(model, batch), None, None
        if self.config.train.loss_chunk > 0 and self.config.model.head != "classify" and not need_logits:
            out, _ = self.forward(model, batch, exit_layer, fused=True)
            loss, exit_loss = out if exit_layer is not None else (out, None)
            return loss, exit_loss, None
        logits, y = self.forward(model, batch, exit_layer)
        logits, early = logits if exit_layer is not None else (logits, None)
        exit_loss = cross_entropy_sum(early, y) if early is not None else None
        return cross_entropy_sum(logits, y, self.class_weights), exit_loss, (logits, y)

    def preference_terms(self, model: nn.Module, batch: tuple[torch.Tensor, ...], online: bool = False
                         ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The preference loss's (loss, chosen reward, rejected reward) per pair of one batch of pairs
        (train/preference.py): the completions' log-probabilities under `model` and, without gradients, under the
        frozen reference (unless the loss needs none), or the reference's precomputed ones, the batch's third
        tensor (train.precompute_reference). online (training with train.online_reward_model): the pairs are the
        policy's own samples of the batch's prompts, ranked by the reward model (train/online.py)."""
        if online and self.online is not None:
            batch, self.online_reward = self.online(unwrap(self.raw_model), batch, self.step, self.micro)
            self.online_parts = dict(self.online.last_parts)
            self.trained_rows = batch[0].numel()  # the samples' rows, not the data's
        policy = self.completion_logprobs(model, batch[:2])
        ref = None
        if len(batch) == 3:
            ref = self.to_device(batch[2])
        elif self.preference_loss.needs_reference:
            with torch.no_grad(), reference_model(self.reference, self.raw_model) as reference:
                ref = self.completion_logprobs(reference, batch)
        tokens = (batch[1] != IGNORE_INDEX).sum(dim=1).to(policy.device)  # each row's completion tokens
        return pair_terms(self.preference_loss, policy, ref, tokens)

    def grpo_batches(self) -> list[tuple[torch.Tensor, ...]]:
        """GRPO's micro-batches of this step: at the first step of a generation (every grpo_iterations steps) new
        samples of grad_accum batches of prompts, all drawn first (DAPO divides by the global batch's sampled tokens),
        with their advantages and, when the generation trains more than one step, the policy's log-probabilities of
        them now (pi_old; no gradients); at the other steps of the generation, the same ones again."""
        tc = self.config.train
        from lmforge.train.online import Rollouts

        if self.rollouts is None or self.step % tc.grpo_iterations == 0:
            sampled, parts, lengths, ended = [], [], [], []
            for i in range(tc.grad_accum):
                sampled.append(self.sample_groups(self.train_data.next_batch(), self.step, i))
                parts.append(self.online.last_parts)
                lengths += self.online.last_lengths
                ended += self.online.last_ended
            batches = self.scaled_by_batch(sampled)
            if tc.grpo_iterations > 1:
                with torch.no_grad():
                    batches = [(*batch, self.token_logprobs(self.raw_model, batch[:2]).float().cpu())
                               for batch in batches]
            self.rollouts = Rollouts(batches, float(torch.cat([rewards.flatten() for _, rewards in sampled]).mean()),
                                     {name: float(np.mean([p[name] for p in parts])) for name in parts[0]},
                                     {"completion_length": float(np.mean(lengths)),  # TRL's completions/mean_length
                                      "truncated_fraction": 1.0 - float(np.mean(ended))})  # its clipped_ratio
        self.online_reward, self.online_parts = self.rollouts.reward, dict(self.rollouts.parts)  # the log's
        self.clipped, self.entropy = [0.0, 0.0], [0.0, 0.0]
        return self.rollouts.batches

    def sample_groups(self, batch: tuple[torch.Tensor, ...], step: int, micro: int
                      ) -> tuple[tuple[torch.Tensor, ...], torch.Tensor]:
        """GRPO's (x, y, advantages) in place of a batch of pairs, and their rewards (P, G): grpo_group_size samples
        of each of its prompts by the policy as it is, each with its advantage (OnlinePairs.groups with the run's
        settings)."""
        tc = self.config.train
        return self.online.groups(unwrap(self.raw_model), batch, tc.grpo_group_size, step, micro,
                                  tc.grpo_scale_rewards == "group", tc.grpo_mask_truncated)

    def scaled_by_batch(self, sampled: list[tuple[tuple[torch.Tensor, ...], torch.Tensor]]
                        ) -> list[tuple[torch.Tensor, ...]]:
        """The batches of `sampled` ((x, y, advantages), rewards), with grpo_scale_rewards batch their advantages
        divided by the standard deviation (Bessel-corrected) of every reward in `sampled` on every process, + 1e-4
        (TRL's scale_rewards "batch"); as they are otherwise."""
        if self.config.train.grpo_scale_rewards != "batch":
            return [batch for batch, _ in sampled]
        rewards = torch.cat([r.flatten() for _, r in sampled] or [torch.zeros(0)]).double()  # none: no val batch here
        totals = all_reduce_sum(torch.stack([rewards.sum(), torch.tensor(float(rewards.numel()), dtype=torch.float64)]
                                            ).to(self.device), self.dist)
        mean, n = totals[0] / totals[1], totals[1]
        squares = all_reduce_sum(((rewards.to(self.device) - mean) ** 2).sum(), self.dist)
        std = float((squares / (n - 1).clamp(min=1)).sqrt())
        return [(x, y, (advantages.double() / (std + 1e-4)).float()) for (x, y, advantages), _ in sampled]

    def grpo_terms(self, model: nn.Module, batch: tuple[torch.Tensor, ...]) -> torch.Tensor:
        """(N,) each sampled completion's share of the GRPO loss (preference_loss.grpo_token_loss and
        grpo_sequence_loss) from its tokens' log-probabilities under `model`, the sampling policy's (the batch's
        fourth tensor when a generation trains several steps; else the policy is its own) and, when grpo_beta > 0,
        the frozen reference's; with grpo_top_entropy < 1 only its high-entropy tokens' policy terms (their entropy
        quantile over all processes' tokens of this micro-batch in training, this process's in evaluation)."""
        tc = self.config.train
        x, y, advantages, *old = batch
        logps, entropies = self.token_logprobs(model, (x, y), entropies=True)
        reference = None
        if self.preference_loss.needs_reference:
            with torch.no_grad(), reference_model(self.reference, self.raw_model) as frozen:
                reference = self.token_logprobs(frozen, (x, y))
        mask, advantages = self.to_device(y) != IGNORE_INDEX, self.to_device(advantages)
        old = self.to_device(old[0]) if old else None
        epsilon = (tc.grpo_epsilon, tc.grpo_epsilon if tc.grpo_epsilon_high is None else tc.grpo_epsilon_high)
        sequence = mask if tc.grpo_importance_sampling == "sequence" else None
        keep = None
        if tc.grpo_top_entropy < 1.0:
            everyone = None
            if model.training and self.dist.enabled:  # every process's completion tokens of this micro-batch
                everyone = torch.tensor([e for part in gather_objects(entropies[mask].tolist(), self.dist)
                                         for e in part])
            keep = high_entropy_mask(entropies, mask, tc.grpo_top_entropy, everyone)
        losses = grpo_token_loss(logps, advantages, reference, tc.grpo_beta, old, epsilon, tc.grpo_delta, sequence,
                                 tc.grpo_objective, (tc.grpo_sapo_tau_pos, tc.grpo_sapo_tau_neg), keep)
        if model.training:  # the log's mean entropy (TRL's entropy)
            self.entropy[0] += float((entropies * mask).sum())
            self.entropy[1] += float(mask.sum())
        if old is not None and tc.grpo_objective != "sapo":  # the log's share of clipped tokens
            with torch.no_grad():
                ratio = torch.exp(grpo_log_ratio(logps.float(), old, sequence))
                clipped = grpo_clipped(ratio, advantages, epsilon, tc.grpo_objective).expand_as(mask) & mask
                self.clipped[0] += float(clipped.sum())
                self.clipped[1] += float(mask.sum())
        return grpo_sequence_loss(losses, mask, tc.grpo_loss_type, tc.online_max_new_tokens)

    def token_logprobs(self, model: nn.Module, batch: tuple[torch.Tensor, ...], entropies: bool = False) -> Any:
        """(B, T) each label's log-probability under the distribution the samples were drawn from (the logits
        divided by train.online_temperature, as TRL's GRPOTrainer), 0 where there is none; entropies: the pair
        (that, each label position's entropy of that distribution, no gradient). The head fused with the loss token
        by token (train.loss_chunk > 0), else from the whole logits."""
        temperature = self.config.train.online_temperature
        if self.config.train.loss_chunk > 0:
            out = self.forward(model, batch, fused=True, per_token=True, temperature=temperature,
                               entropies=entropies)[0]
        else:
            logits, y = self.forward(model, batch)
            out = logits_cross_entropy_tokens(logits, y, temperature, entropies)
        return (-out[0], out[1]) if entropies else -out

    def reward_terms(self, model: nn.Module, batch: tuple[torch.Tensor, ...]
                     ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """A reward model's (loss, chosen reward, rejected reward) per pair of one batch of whole pairs
        (data.batches.reward_pair_batch: x, attention_mask, and each pair's margin when the data has them): the head's
        scalar at each row's last real token."""
        x, mask, *margin = (self.to_device(t) for t in batch)
        rewards = run_forward(model, self.config.train.precision, self.device, x, amx=self.amx,
                              attention_mask=mask)  # (2P, 1)
        chosen, rejected = rewards[0::2, 0].float(), rewards[1::2, 0].float()
        loss = reward_model_loss(chosen, rejected, self.config.train.reward_center_coefficient, *margin)
        return loss, chosen.detach(), rejected.detach()

    def unpaired_logprobs(self, model: nn.Module, batch: tuple[torch.Tensor, ...]
                          ) -> tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor]]:
        """(policy, reference, mismatched) of a batch of unpaired completions (data.batches.unpaired_batch): each
        completion's log-probability under `model` and, without gradients, under the frozen reference, and for KTO
        each mismatched row's log-ratio log pi - log pi_ref, all without gradients but the policy's (None when the
        loss needs no reference point)."""
        x, y, kl_x, kl_y, _, *precomputed = batch  # precomputed: the reference's values of both rows
        policy = self.completion_logprobs(model, (x, y))
        mismatched = None
        with torch.no_grad():
            if self.preference_loss.needs_kl:
                mismatched = self.completion_logprobs(model, (kl_x, kl_y))
            if precomputed:
                ref, ref_kl = (self.to_device(t) for t in precomputed)
                return policy, ref, (mismatched - ref_kl if mismatched is not None else None)
            with reference_model(self.reference, self.raw_model) as reference:
                ref = self.completion_logprobs(reference, (x, y))
                if mismatched is not None:
                    mismatched = mismatched - self.completion_logprobs(reference, (kl_x, kl_y))
        return policy, ref, mismatched

    def unpaired_terms(self, model: nn.Module, batch: tuple[torch.Tensor, ...]
                       ) -> tuple[torch.Tensor, torch.Tensor]:
        """(loss, reward) per completion of one batch of unpaired preference data: KTO's reference point z is the
        mean log-ratio of the mismatched rows of the whole global micro-batch (summed over processes), >= 0."""
        policy, ref, mismatched = self.unpaired_logprobs(model, batch)
        z = kl_reference_point(mismatched, self.dist) if mismatched is not None else None
        self.kl = z
        delta = None
        if self.bco is not None:  # BCO: this micro-batch's rewards on every process join the running mean first
            delta = torch.tensor(self.bco.update(*self.reward_total([(policy, ref)])), device=self.device)
        return self.preference_loss.unpaired_loss(policy, ref, self.to_device(batch[4]), z, delta)

    def reward_total(self, parts: list[tuple[torch.Tensor, torch.Tensor]]) -> tuple[float, float]:
        """(sum, count) over every process of the rewards beta (log pi - log pi_ref) of (policy, reference) parts."""
        totals = torch.zeros(2, dtype=torch.float64, device=self.device)
        for policy, ref in parts:
            reward = self.preference_loss.beta * (policy.detach().double() - ref.double())
            totals += torch.stack([reward.sum(), torch.tensor(float(reward.numel()), device=self.device).double()])
        totals = all_reduce_sum(totals, self.dist)
        return float(totals[0]), float(totals[1])

    def precompute_reference(self, val_pairs: Optional[Any], progress: bool) -> None:
        """train.precompute_reference: every train (and val) completion's log-probability under the model as it
        starts, the reference, with the train and val batches carrying their rows' values from now on. Called with
        LoRA's adapters on (a new run's add nothing yet), before FSDP or DDP touch the model; each process scores
        its share of the pairs (unpaired data: of the examples and their mismatched rows, each example's partner
        fixed by data.batches.kl_partners). The scores are kept in RUN_DIR/reference_logps.safetensors and read back
        by a later start whose weights, data and settings are the same (a resume); prepared data only (given batches
        are scored every time)."""
        model, tc = self.raw_model, self.config.train
        splits = {"train": self.train_data.examples, **({"val": val_pairs} if val_pairs is not None else {})}
        partners: dict[str, np.ndarray] = {}  # unpaired data: each example's fixed mismatched partner (KTO)
        if self.unpaired:  # train: as a sequential stream pairs them; val: as the evaluation does (the one before)
            group = tc.batch_size * self.dist.world_size
            partners["train"] = kl_partners(len(splits["train"]), group)
            if val_pairs is not None:
                evaluated = min(len(val_pairs), tc.eval_batches * group)
                partners["val"] = (np.arange(len(val_pairs)) - 1) % max(evaluated, 1)
        path, key = self.run_dir / SCORES_FILE, None
        if self.data_manifest_sha256 is not None:
            key = {"format": SCORES_FORMAT, "base": base_fingerprint(model, adapters=self.adapters_loaded),
                   "data": self.data_manifest_sha256,
                   "precision": tc.precision, "loss_chunk": tc.loss_chunk, "batch_size": tc.batch_size,
                   "sizes": {f"{name}{kind}": len(examples) for name, examples in splits.items()
                             for kind in ("", "_kl")[:1 + self.unpaired]}}
            if self.unpaired:  # the mismatched rows scored
                key["partners"] = {name: hashlib.sha256(p.astype("<i8").tobytes()).hexdigest()
                                   for name, p in partners.items()}
        scores = read_scores(path, key) if key is not None else None
        if scores is None:
            was_training = model.training
            model.eval()
            try:
                scores = {}
                for name, examples in splits.items():
                    both = score_completions(lambda batch: self.completion_logprobs(model, batch), examples,
                                             tc.batch_size, self.train_data.pad_id, self.dist, self.device, progress,
                                             partners.get(name), self.config.model.block_size + 1)
                    scores.update({f"{name}{kind}": row for kind, row in zip(("", "_kl"), both)})
            finally:
                model.train(was_training)
            if key is not None and self.dist.is_main:
                self.run_dir.mkdir(parents=True, exist_ok=True)
                write_scores(path, key, scores)
        for name, examples in splits.items():
            examples.reference_logps = scores[name]
            if self.unpaired:
                examples.kl_partners, examples.reference_kl_logps = partners[name], scores[f"{name}_kl"]
        if val_pairs is not None:
            self.val_batches = fixed_example_batches(val_pairs, self.config.model.block_size, tc.batch_size,
                                                     tc.eval_batches, rank=self.dist.rank,
                                                     world_size=self.dist.world_size, pad_id=self.train_data.pad_id,
                                                     pairs=not self.unpaired, unpaired=self.unpaired)

    def completion_logprobs(self, model: nn.Module, batch: tuple[torch.Tensor, ...]) -> torch.Tensor:
        """(rows,) each row's summed log-probability of its labels: the head fused with the loss row by row
        (train.loss_chunk > 0), else from the whole logits."""
        if self.config.train.loss_chunk > 0:
            losses, _ = self.forward(model, batch, fused=True, per_row=True)
            return -losses
        logits, y = self.forward(model, batch)
        return sequence_logprobs(logits, y)

    def forward(self, model: nn.Module, batch: tuple[torch.Tensor, ...], exit_layer: Optional[int] = None,
                fused: bool = False, per_row: bool = False, per_token: bool = False, temperature: float = 1.0,
                entropies: bool = False, teacher: Optional[Any] = None) -> tuple[Any, torch.Tensor]:
        """(logits, labels) of one CPU batch, on the device: a batch is (x, y), or (x, y, attention_mask) for a
        classifier (its logits (B, K) come from each row's last real token) and for packed examples; else logits
        are (B, T, V). With exit_layer (train.early_exit_layer), logits is the pair (logits, early exit's logits).
        fused: the summed loss (or the pair of losses) in place of the logits (GPT.forward's targets); per_row: each
        row's sum (B,); per_token: each label's (B, T), of the logits divided by temperature, with entropies the pair
        (that, each label position's entropy); teacher (head_loss.Teacher, knowledge distillation): the triple
        (loss, CE, D) of GPT.forward's teacher."""
        x, y, *mask = (self.to_device(t) for t in batch)
        kwargs: dict[str, Any] = {"attention_mask": mask[0]} if mask else {}
        if exit_layer is not None:
            kwargs["exit_layer"] = exit_layer
        if fused:
            kwargs.update(targets=y, loss_chunk=self.config.train.loss_chunk, **({"per_row": True} if per_row else {}),
                          **({"per_token": True, "temperature": temperature, "entropies": entropies} if per_token
                             else {}), **({"teacher": teacher} if teacher is not None else {}))
        return run_forward(model, self.config.train.precision, self.device, x, amx=self.amx, **kwargs), y

    def to_device(self, t: torch.Tensor) -> torch.Tensor:
        """Copy a CPU batch tensor to the device; on CUDA from pinned memory, without blocking the host."""
        if self.device.type == "cuda":
            return t.pin_memory().to(self.device, non_blocking=True)
        return t.to(self.device)

    def gradient_norm(self) -> torch.Tensor:
        """The global L2 norm of all gradients (NaN/Inf if any gradient is not finite)."""
        grads = [p.grad for p in self.raw_model.parameters() if p.grad is not None]
        norm = torch.nn.utils.get_total_norm(grads, 2.0, error_if_nonfinite=False)
        return norm.full_tensor() if hasattr(norm, "full_tensor") else norm  # FSDP: from each process's shards

    def optimizer_step(self, grad_norm: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, float]:
        """Clip the gradient norm, set the scheduled learning rate, step the optimizer (AdamW, or Muon with AdamW);
        returns (pre-clip norm, lr)."""
        grad_norm = self.gradient_norm() if grad_norm is None else grad_norm
        clip = self.config.optim.grad_clip
        # clip_grads_with_norm_ multiplies every gradient by min(clip / (norm + 1e-6), 1): skipped where that is 1,
        # which changes no bit and saves a pass over the gradients (judge_step already waited for the norm)
        if clip > 0 and float(clip / (grad_norm + 1e-6)) < 1.0:
            torch.nn.utils.clip_grads_with_norm_(self.raw_model.parameters(), clip, grad_norm)
        lr = self.lr_at(self.step)
        set_lr(self.optimizer, lr)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return grad_norm, lr

    @torch.no_grad()
    def evaluate(self) -> Optional[float]:
        """Mean loss over the fixed validation batches (all processes together), or None without them.

        A classifier's val loss is its training objective (class weights included); its accuracy and macro-F1
        over the same examples go to self.val_metrics (from one confusion matrix summed over processes). An encoder
        trained with mlm: the loss over the masked positions, and their accuracy (val_masked_accuracy).
        """
        if not self.val_batches:
            return None
        if self.grpo:
            return self.evaluate_grpo()
        if self.teacher is not None:
            return self.evaluate_distillation()
        if self.unpaired:
            return self.evaluate_unpaired()
        if self.preference or self.reward:
            return self.evaluate_preference()
        model = self.model
        model.eval()  # dropout off
        K = len(self.labels) if self.labels is not None else 0
        exit_layer = self.config.train.early_exit_layer
        hits = K > 0 or self.config.train.objective == "mlm"  # accuracy needs the logits
        totals = torch.zeros(4 + K * K, dtype=torch.float64, device=self.device)  # (loss, labels, hits, early exit's
        for batch in self.val_batches:  # loss, confusion)
            loss, exit_loss, out = self.batch_loss(model, batch, exit_layer, need_logits=hits)
            totals[0] += loss.double()
            totals[1] += count_labels(batch[1])
            if exit_loss is not None:
                totals[3] += exit_loss.double()
            if out is not None:
                logits, y = out
                totals[2] += (logits.argmax(-1) == y).sum().double()  # IGNORE_INDEX never equals a prediction
            if K:  # entry [gold, predicted] of the (K, K) confusion matrix
                totals[4:] += torch.bincount(y * K + logits.argmax(-1), minlength=K * K).double()
        model.train()
        totals = all_reduce_sum(totals, self.dist)
        if K:
            from lmforge.eval.metrics import confusion_metrics

            scores = confusion_metrics(totals[4:].long().view(K, K).cpu().numpy(), self.labels)
            self.val_metrics = {"val_accuracy": scores["accuracy"], "val_macro_f1": scores["macro_f1"]}
        elif self.config.train.objective == "mlm":
            self.val_metrics = {"val_masked_accuracy": float(totals[2] / totals[1].clamp(min=1))}
        elif exit_layer is not None:
            self.val_metrics = {"val_early_exit_loss": float(totals[3] / totals[1].clamp(min=1))}
        return float(totals[0] / totals[1].clamp(min=1))

    def evaluate_distillation(self) -> float:
        """Knowledge distillation: the model's own cross-entropy over the val batches (val_loss, comparable with any
        language model's), and in self.val_metrics the mean divergence from the teacher (val_distill_divergence)."""
        self.model.eval()
        before = self.distilled.clone()
        self.distilled.zero_()
        count = 0
        for batch in self.val_batches:
            self.distill_terms(self.model, batch)
            count += count_labels(batch[1])
        self.model.train()
        totals = all_reduce_sum(torch.cat([self.distilled, torch.tensor([float(count)], dtype=torch.float64,
                                                                         device=self.device)]), self.dist)
        self.distilled = before
        self.val_metrics = {"val_distill_divergence": float(totals[1] / totals[2].clamp(min=1))}
        return float(totals[0] / totals[2].clamp(min=1))

    def evaluate_preference(self) -> float:
        """Preference data: the preference loss's (or a reward model's) mean over the val pairs, and in
        self.val_metrics the fraction of pairs whose chosen completion gets the higher reward (val_reward_accuracy),
        the mean reward margin (val_reward_margin) and the mean rewards of the chosen and the rejected completions
        (val_chosen_reward, val_rejected_reward)."""
        self.model.eval()
        terms = self.reward_terms if self.reward else self.preference_terms
        totals = torch.zeros(6, dtype=torch.float64, device=self.device)  # (loss, pairs, wins, chosen, rejected,
        for k, batch in enumerate(self.val_batches):  # online: the samples' rewards summed)
            loss, chosen, rejected = terms(self.model, batch)
            sampled = 0.0
            if self.online is not None:  # two samples of each val prompt, drawn with one seed at every evaluation
                _, mean = self.online(unwrap(self.raw_model), batch, VAL_SAMPLING_STEP, k)
                sampled = 2 * len(loss) * mean
            totals += torch.tensor([float(loss.sum()), float(len(loss)), float((chosen > rejected).sum()),
                                    float(chosen.sum()), float(rejected.sum()), sampled],
                                   dtype=torch.float64, device=self.device)
        self.model.train()
        totals = all_reduce_sum(totals, self.dist)
        loss, wins, chosen, rejected = (float(t / totals[1].clamp(min=1)) for t in totals[[0, 2, 3, 4]])
        self.val_metrics = {"val_reward_accuracy": wins, "val_reward_margin": chosen - rejected,
                            "val_chosen_reward": chosen, "val_rejected_reward": rejected}
        if self.online is not None:
            self.val_metrics["val_online_reward"] = float(totals[5] / (2 * totals[1]).clamp(min=1))
        return loss

    def evaluate_grpo(self) -> float:
        """GRPO: its loss over grpo_group_size samples of each val prompt, drawn with one seed at every evaluation,
        and in self.val_metrics the samples' mean reward (val_online_reward: what GRPO raises)."""
        self.model.eval()
        totals = torch.zeros(4, dtype=torch.float64, device=self.device)  # (loss, count, rewards, samples)
        drawn = [self.sample_groups(batch, VAL_SAMPLING_STEP, k) for k, batch in enumerate(self.val_batches)]
        for sampled, (_, rewards) in zip(self.scaled_by_batch(drawn), drawn):
            totals += torch.tensor([float(self.grpo_terms(self.model, sampled).sum()), self.batch_count(sampled),
                                    float(rewards.sum()), rewards.numel()], dtype=torch.float64, device=self.device)
        self.model.train()
        totals = all_reduce_sum(totals, self.dist)
        self.val_metrics = {"val_online_reward": float(totals[2] / totals[3].clamp(min=1))}
        return float(totals[0] / totals[1].clamp(min=1))

    def evaluate_unpaired(self) -> float:
        """Unpaired preference data: the mean loss over the val completions, KTO's reference point z estimated from
        every val batch's mismatched rows (one estimate for the evaluated examples, as `lmforge eval` makes it), and in
        self.val_metrics the mean reward of the desirable and of the undesirable completions, their difference
        (val_reward_margin) and z (val_kl)."""
        self.model.eval()
        terms, log_ratios = [], [torch.zeros(0, device=self.device)]  # a process may have no val batch
        with torch.no_grad():
            for batch in self.val_batches:
                policy, ref, mismatched = self.unpaired_logprobs(self.model, batch)
                terms.append((policy, ref, self.to_device(batch[4])))
                log_ratios += [mismatched] if mismatched is not None else []
        self.model.train()
        z = kl_reference_point(torch.cat(log_ratios), self.dist) if self.preference_loss.needs_kl else None
        delta = None
        if self.preference_loss.needs_delta:  # BCO: the mean reward of the evaluated completions (as `lmforge eval`)
            total, n = self.reward_total([(policy, ref) for policy, ref, _ in terms])
            delta = torch.tensor(total / max(n, 1.0), device=self.device)
        totals = torch.zeros(5, dtype=torch.float64, device=self.device)  # (loss, n, desirable n, their rewards, other)
        for policy, ref, desirable in terms:
            loss, reward = self.preference_loss.unpaired_loss(policy, ref, desirable, z, delta)
            totals += torch.stack([loss.sum(), torch.tensor(float(len(loss)), device=self.device), desirable.sum(),
                                   reward[desirable].sum(), reward[~desirable].sum()]).double()
        totals = all_reduce_sum(totals, self.dist)
        good = float(totals[3] / totals[2].clamp(min=1))
        bad = float(totals[4] / (totals[1] - totals[2]).clamp(min=1))
        self.val_metrics = {"val_reward_margin": good - bad, "val_desirable_reward": good,
                            "val_undesirable_reward": bad, **({"val_kl": float(z)} if z is not None else {}),
                            **({"val_delta": float(delta)} if delta is not None else {})}
        return float(totals[0] / totals[1].clamp(min=1))

    def maybe_log(self, loss_sum: torch.Tensor, count: torch.Tensor, grad_norm: torch.Tensor, lr: float) -> None:
        """Every log_interval steps (and the last): loss, lr, pre-clip gradient norm, tokens/s."""
        tc = self.config.train
        if self.step % max(1, tc.log_interval) != 0 and self.step != tc.max_steps:
            return
        loss = self.step_loss  # judge_step waited for the device, so the rate below is true
        tokens_per_s = self.throughput.rate(self.tokens_seen)
        self.history.append((self.step, loss))
        early = {"early_exit_loss": float(self.early_exit_loss)} if self.early_exit_loss is not None else {}
        if self.kl is not None:  # KTO's reference point, as TRL's KTOTrainer logs it
            early["kl"] = float(self.kl)
        if self.bco is not None:  # BCO's delta, as TRL's BCOTrainer logs it
            early["delta"] = self.bco.mean
        if self.online_reward is not None:  # online preference training: the samples' mean reward
            early["online_reward"] = self.online_reward
            if len(self.online_parts) > 1:  # and each judge's part of it (TRL logs rewards/NAME/mean)
                early.update({f"online_reward/{name}": value for name, value in self.online_parts.items()})
        if self.grpo:  # this process's samples: their mean length and the share that ran out of tokens
            early.update(self.rollouts.lengths if self.rollouts is not None else {})
        if self.teacher is not None:  # this process's means: the model's own cross-entropy, its divergence
            lm_loss, divergence = (self.distilled / max(self.distill_count, 1.0)).tolist()
            early.update(lm_loss=lm_loss, distill_divergence=divergence)
        if self.grpo:  # this process's mean entropy at the step's completion tokens (TRL's entropy)
            early["entropy"] = self.entropy[0] / max(self.entropy[1], 1.0)
        if self.grpo and self.config.train.grpo_iterations > 1 and self.config.train.grpo_objective != "sapo":
            early["clip_fraction"] = self.clipped[0] / max(self.clipped[1], 1.0)  # TRL's clip_ratio/region_mean
        self.logger.log("train", self.step, {"loss": loss, **early, "lr": lr, "grad_norm": float(grad_norm),
                                             "tokens_seen": self.tokens_seen, "tokens_per_s": tokens_per_s,
                                             "elapsed_s": time.perf_counter() - self.started,
                                             "skipped_nonfinite": self.guard.skipped_nonfinite,
                                             "skipped_spike": self.guard.skipped_spike})
        self.logger.progress(self.step, loss, tokens_per_s)

    def maybe_eval(self) -> None:
        """Every eval_interval steps (and the last): loss and perplexity on the fixed validation batches."""
        interval = self.config.train.eval_interval
        if not (interval and self.step % interval == 0) and self.step != self.config.train.max_steps:
            return
        with self.throughput.paused():
            self.val_loss, self.val_step = self.evaluate(), self.step
        if self.val_loss is None:
            return
        if self.best_val_loss is None or self.val_loss < self.best_val_loss:
            self.best_val_loss = self.val_loss
        self.measured = {"val_loss": self.val_loss, **self.val_metrics}
        if self.labels is not None or self.preference or self.reward:  # no perplexity of a loss over labels, pairs
            self.logger.log("eval", self.step, self.measured)
        else:
            self.logger.log("eval", self.step, {"val_loss": self.val_loss, **self.val_metrics,
                                                "val_perplexity": math.exp(min(self.val_loss, 700.0))})
        if self.task_eval_due():
            with self.throughput.paused():
                task = self.task_metrics()
            self.logger.log("eval", self.step, task)
            self.measured.update(task)
        if self.questions and self.evaluation_due(self.config.train.choices_every):
            with self.throughput.paused():
                scores = self.choices_metrics()
            self.logger.log("eval", self.step, scores)
            self.measured.update(scores)
        self.selection.update(self.step, self.measured)
        self.early_stopped = self.selection.exhausted
        if self.on_eval is not None:
            try:
                self.on_eval(self.step, dict(self.measured))
            except StopTraining as stop:
                self.stopped_by_hook = stop.reason

    def task_eval_due(self) -> bool:
        """sft data with train.task_eval_every = N: at every N-th evaluation and at the last step."""
        return self.val_examples is not None and self.evaluation_due(self.config.train.task_eval_every)

    def evaluation_due(self, every: int) -> bool:
        """At every `every`-th evaluation (never for 0) and at the last step."""
        tc = self.config.train
        if not every:
            return False
        if self.step == tc.max_steps:
            return True
        return bool(tc.eval_interval) and (self.step // tc.eval_interval) % every == 0

    def read_questions(self, config: RunConfig) -> Optional[list[Any]]:
        """train.choices_file's first choices_examples questions (None without one), each choice checked to fit."""
        tc = config.train
        if not tc.choices_file:
            return None
        from lmforge.eval.choices import ChoiceTask, encode_pair, read_choice_examples
        from lmforge.tokenizer import Tokenizer

        if self.tokenizer_file is None:
            raise ConfigError("train.choices_file needs a tokenizer to encode its questions, and this run's data has "
                              "none: train on data made by `lmforge prepare`")
        if not config.model.causal or config.model.head != "lm":
            raise ConfigError("train.choices_file scores choices as continuations with the LM head, and this model is "
                              f"{'an encoder' if not config.model.causal else 'a classifier'}: drop train.choices_file")
        task = ChoiceTask(tc.choices_file)
        questions = read_choice_examples(tc.choices_file, task)[:tc.choices_examples]
        tokenizer, block = Tokenizer.load(self.tokenizer_file), config.model.block_size
        for question in questions:  # a choice that cannot be scored fails now, not at the first evaluation
            for choice in question.choices:
                n = len(encode_pair(tokenizer, question.context, task.delimiter + choice)[1])
                if not 0 < n <= block:
                    raise DataError(f"{question.where}: the choice {choice[:40]!r} is {n} tokens, and a choice is "
                                    f"scored in 1 to block_size ({block}) tokens: shorten it or remove the question")
        return questions

    def choices_metrics(self) -> dict[str, float]:
        """val_choices_acc and val_choices_acc_norm of train.choices_file's questions (eval.choices, zero-shot);
        each process scores every world_size-th question and the counts are summed."""
        from lmforge.eval.choices import ChoiceTask, evaluate_choices
        from lmforge.tokenizer import Tokenizer

        if self._tokenizer is None:
            self._tokenizer = Tokenizer.load(self.tokenizer_file)
        model = unwrap(self.raw_model)
        model.eval()
        share = self.questions[self.dist.rank::self.dist.world_size]
        totals = torch.zeros(3, dtype=torch.float64, device=self.device)  # (acc hits, acc_norm hits, questions)
        if share:
            with autocast(self.config.train.precision, self.device):
                metrics, _ = evaluate_choices(model, self._tokenizer, share, ChoiceTask(self.config.train.choices_file),
                                              batch_size=max(self.config.train.batch_size, 8))
            totals += torch.tensor([metrics["acc"] * len(share), metrics["acc_norm"] * len(share), len(share)],
                                   dtype=torch.float64, device=self.device)
        model.train()
        totals = all_reduce_sum(totals, self.dist)
        return {"val_choices_acc": float(totals[0] / totals[2]), "val_choices_acc_norm": float(totals[1] / totals[2])}

    def task_metrics(self) -> dict[str, float]:
        """BLEU, chrF, ROUGE, exact match, token F1 of greedy predictions for the fixed val sample. Every process
        computes them on the same weights, so all agree on the best step and on stopping."""
        from lmforge.eval.tasks import first_examples, sampled_text_metrics
        from lmforge.tokenizer import Tokenizer

        if self._tokenizer is None:
            self._tokenizer = Tokenizer.load(self.tokenizer_file)
        sample = first_examples(self.val_examples, self.config.train.task_eval_examples)
        with autocast(self.config.train.precision, self.device):
            return sampled_text_metrics(unwrap(self.raw_model), self._tokenizer, sample, self.config.train.batch_size)

    def maybe_save(self) -> bool:
        """Every save_interval steps (and the last): a checkpoint, then prune to keep_last + best. True if saved."""
        interval = self.config.train.save_interval
        if (interval and self.step % interval == 0) or self.step == self.config.train.max_steps:
            with self.throughput.paused():
                self.save()
            return True
        return False

    # ------------------------------------------------------------------------------ checkpoints
    def save(self) -> None:
        """Checkpoint the current step (every process contributes its RNG and data state; rank 0 writes, or with
        train.checkpoint_format sharded every process writes its own rows of the weights and optimizer state)."""
        sharded = self.config.train.checkpoint_format == "sharded"
        mine: dict[str, Any] = {"rng": capture_rng(), "data": self.train_data.state_dict()}
        if self.rollouts is not None and self.step % self.config.train.grpo_iterations != 0:  # inside a generation
            mine["rollouts"] = self.rollouts.state_dict()
        per_rank = gather_objects(mine, self.dist)
        whole = full_state(self.raw_model, self.optimizer) if is_sharded(self.raw_model) and not sharded else None
        state: dict[str, Any] = {}
        if self.dist.is_main:
            measured_now = self.val_step == self.step  # a stale val loss must not make this the "best" one
            state = {"tokens_seen": self.tokens_seen, "val_loss": self.val_loss if measured_now else None,
                     "last_val_loss": self.val_loss, "best_val_loss": self.best_val_loss,
                     "world_size": self.dist.world_size, "ranks": per_rank, "guard": self.guard.state_dict(),
                     "data_manifest_sha256": self.data_manifest_sha256, "data_path": self.config.data.path}
            state["score"] = self.selection.score(self.measured if measured_now else {})
            state["selection"] = self.selection.state_dict()
            if self.task is not None:
                state["task"] = self.task
            if self.base is not None:  # a LoRA run: model.safetensors holds adapters (and heads), the base is named
                state["lora"], state["base"] = to_dict(self.config.lora), self.base
            if self.teacher_source is not None:  # distillation: which teacher (a resume checks it is the same)
                state["teacher"] = self.teacher_source
            if self.bco is not None:  # BCO's running mean reward, delta: resumed where it was
                state["bco"] = self.bco.state_dict()
        if sharded:  # a collective
            self.last_checkpoint = save_sharded_checkpoint(self.run_dir, self.step, self.raw_model, self.optimizer,
                                                           self.config, state, self.tokenizer_file, self.dist)
        elif self.dist.is_main:
            self.last_checkpoint = save_checkpoint(self.run_dir, self.step, self.raw_model, self.optimizer,
                                                   self.config, state, self.tokenizer_file, whole)
        else:  # where rank 0 writes it
            self.last_checkpoint = self.run_dir / CHECKPOINTS / checkpoint_name(self.step)
        if self.dist.is_main:
            prune_checkpoints(self.run_dir, self.config.train.keep_last)

    def restore(self) -> None:
        """Continue from a checkpoint per train.resume: none | auto (newest intact one, if any) | PATH.

        `auto` skips checkpoints that fail verification (corrupt, truncated, missing files), saying so in one
        line on stderr. Leftovers of interrupted saves are removed first.
        """
        tc = self.config.train
        if self.dist.is_main:
            clean_interrupted_saves(self.run_dir)
        barrier(self.dist)
        if tc.resume == "none":
            if latest_checkpoint(self.run_dir) is not None:  # never mix two runs' checkpoints and metrics
                raise ConfigError(f"run_dir {self.run_dir} already holds checkpoints; continue it with --resume auto, "
                                  f"or choose another --run-dir")
            return
        if tc.resume == "auto":
            ckpt, manifest = newest_intact_checkpoint(self.run_dir, warn=self.dist.is_main)
            if ckpt is None or manifest is None:
                return  # auto with nothing to resume: a fresh run
        else:
            ckpt, manifest = verified_checkpoint(tc.resume, warn=self.dist.is_main)
        if not has_optimizer_state(manifest):  # weights only, e.g. written by `lmforge import`
            raise CheckpointError(f"{ckpt} holds weights but no training state, so there is nothing to resume; "
                                  f"start a new run from it: --train.init_from {ckpt} --run-dir NEW_DIR")
        saved_model = to_dict(read_run_config(ckpt).model)
        differ = [f"model.{k}={saved_model.get(k)!r} (config: {v!r})" for k, v in to_dict(self.config.model).items()
                  if saved_model.get(k) != v]
        if differ:
            raise CheckpointError(f"{ckpt} was trained with another model: {', '.join(differ)}; "
                                  f"{self.as_trained(ckpt)}, or start a new run_dir")
        self.check_lora_resume(ckpt)
        try:
            check_data_tokenizer(ckpt, self.tokenizer_file)
        except CheckpointError as e:
            raise CheckpointError(f"{e}; {self.as_trained(ckpt)}") from None
        state = load_training_state(ckpt, self.raw_model, self.optimizer, self.device, manifest=manifest)
        saved_data = state.get("data_manifest_sha256")
        if saved_data and self.data_manifest_sha256 and saved_data != self.data_manifest_sha256 \
                and not tc.allow_data_change:
            raise CheckpointError(f"{ckpt} was trained on other data (its manifest differs from "
                                  f"{Path(self.config.data.path) / 'manifest.json'}); resume on the data it was trained on "
                                  f"({state.get('data_path')}): {self.as_trained(ckpt)}; or pass --allow-data-change "
                                  f"to continue on this data")
        saved_teacher = state.get("teacher")
        if saved_teacher and self.teacher_source and saved_teacher.get("fingerprint") != \
                self.teacher_source["fingerprint"]:
            raise CheckpointError(f"{ckpt} was distilled from the teacher {saved_teacher.get('path')}, and "
                                  f"train.distill_from now gives {self.teacher_source['path']}, whose files differ (a "
                                  f"newer checkpoint or another model); pass --train.distill_from "
                                  f"{saved_teacher.get('path')} to resume exactly, or start a new run_dir")
        try:
            self.step, self.tokens_seen = int(state["step"]), int(state["tokens_seen"])
            self.val_loss, self.best_val_loss = state.get("last_val_loss"), state.get("best_val_loss")
            self.val_step = self.step if state.get("val_loss") is not None else None
            ranks = state["ranks"]
            mine = ranks[self.dist.rank] if len(ranks) == self.dist.world_size else ranks[0]
            self.train_data.load_state_dict(mine["data"])
            if len(ranks) == self.dist.world_size:  # another process count cannot continue the same RNG streams
                restore_rng(mine["rng"])
                if mine.get("rollouts") is not None:  # GRPO, inside a generation: train on its samples (else new ones)
                    from lmforge.train.online import Rollouts

                    self.rollouts = Rollouts.from_state(mine["rollouts"])
            self.guard.load_state_dict(state.get("guard") or {})
            self.selection.load_state_dict(state.get("selection") or {})
            if self.bco is not None and state.get("bco") is not None:
                self.bco.load_state_dict(state["bco"])
        except LmforgeError:
            raise
        except (KeyError, IndexError, TypeError, ValueError, AttributeError, RuntimeError, OverflowError):
            raise CheckpointError(f"{ckpt / 'state.json'} is malformed (step, data position or RNG state); "
                                  f"the checkpoint is corrupt, use another one") from None
        self.last_checkpoint = ckpt

    def as_trained(self, ckpt: Path) -> str:
        """How to continue `ckpt` with every setting it was trained with, for a resume whose flags differ: its run's
        config.yaml (RUN/checkpoints/step-N -> RUN/config.yaml) with --resume auto; a checkpoint given by path
        (maybe from elsewhere) by its own config.json, into this run_dir."""
        if self.config.train.resume == "auto" and (ckpt.parent.parent / "config.yaml").is_file():
            return f"continue it as it was trained with --config {ckpt.parent.parent / 'config.yaml'} --resume auto"
        return (f"continue it as it was trained with --config {ckpt / 'config.json'} --run-dir {self.run_dir} "
                f"--resume {ckpt}")

    def check_lora_resume(self, ckpt: Path) -> None:
        """Refuse to resume `ckpt` with other lora settings than it was trained with, or on another base."""
        saved = read_run_config(ckpt).lora
        ours = self.config.lora
        if _lora_text(saved) != _lora_text(ours):
            raise CheckpointError(f"{ckpt} was trained with lora: {_lora_text(saved)}, the config has lora: "
                                  f"{_lora_text(ours)}; {self.as_trained(ckpt)}, or start a new run_dir")
        if self.base is not None:
            check_base(ckpt, lora_base(ckpt), self.base["fingerprint"], self.base["path"])

    # ------------------------------------------------------------------------------ files and printing
    def write_config(self) -> None:
        """RUN_DIR/config.yaml: the resolved config (vocab size from the data included)."""
        if self.dist.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            atomic_write_text(self.run_dir / "config.yaml", yaml.safe_dump(to_dict(self.config), sort_keys=False))

    def describe(self) -> None:
        """Print the model size, FLOPs per token and the batch geometry once."""
        tc, mc = self.config.train, self.config.model
        model = unwrap(self.raw_model)
        if isinstance(model, GPT):
            params = count_parameters(model.config)
            flops = flops_per_token(model.config)
            size = f"{params.total:,} parameters ({params.non_embedding:,} non-embedding), {flops:,} FLOPs/token"
        else:
            size = f"{sum(p.numel() for p in model.parameters()):,} parameters"
        global_batch = tc.batch_size * tc.grad_accum * self.dist.world_size
        pairs = self.preference or self.reward
        rows = global_batch * (2 if pairs else 1)  # a preference pair is two sequences
        what = f"{global_batch} pairs ({rows} sequences)" if pairs else f"{rows} sequences"
        if self.grpo:  # G samples of each prompt
            rows = global_batch * tc.grpo_group_size
            what = f"{global_batch} prompts x {tc.grpo_group_size} samples ({rows} sequences)"
        if self.unpaired:  # a completion, and the mismatched row of KTO's reference point
            rows = global_batch * (2 if self.preference_loss.needs_kl else 1)
            what = (f"{global_batch} completions" + (f" + {global_batch} mismatched rows"
                                                     if self.preference_loss.needs_kl else ""))
        self.logger.info(f"model: {size}")
        self.logger.info(f"batch: {what} x {mc.block_size} tokens = {rows * mc.block_size:,} "
                         f"tokens/step ({tc.batch_size} x {tc.grad_accum} accum x {self.dist.world_size} processes); "
                         f"device {self.device}, {tc.precision}{', compiled' if tc.compile else ''}")
        if self.embedding_report:
            r = self.embedding_report
            self.logger.info(f"embeddings: {r['rows_initialised']:,} of {r['vocab_size']:,} rows "
                             f"({r['coverage']:.1%}) from {r['source']}")
        if self.base is not None:
            trained = sum(p.numel() for p in model.parameters() if p.requires_grad)
            quantized = [m for m in model.modules() if isinstance(m, NF4Linear)]  # QLoRA: weights in buffers
            total = sum(p.numel() for p in model.parameters()) + sum(m.in_features * m.out_features for m in quantized)
            stored = sum(t.numel() * t.element_size() for m in quantized for t in m.buffers())
            self.logger.info(f"lora: r={self.config.lora.r} on {','.join(self.config.lora.targets)}, {trained:,} of "
                             f"{total:,} parameters trained ({trained / total:.2%}); base {self.base['path']}"
                             + (f", {len(quantized)} layers in nf4 ({stored / 2**20:.1f} MiB)" if quantized else "")
                             + (f"; adapters from {self.config.train.init_from}" if self.adapters_loaded else ""))
        if self.step:
            self.logger.info(f"resumed from {self.last_checkpoint} at step {self.step}")


def _local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0"))


def _lora_text(lora: Optional[LoRAConfig]) -> str:
    return "null" if lora is None else ", ".join(f"{k}={v}" for k, v in to_dict(lora).items())


def _sha256_or_none(path: Optional[Path]) -> Optional[str]:
    if path is None:
        return None
    return sha256_file(path)


def train(config: RunConfig, *, progress: bool = True) -> dict[str, Any]:
    """Train `config` (one process, or every process under torchrun) and return Trainer.fit()'s summary.
    progress: False shows no progress (no bar, no per-step lines)."""
    together = False  # whether every process ends here alive, so they can leave the group in step
    try:
        summary = Trainer(config, progress=progress).fit()
        together = True
        return summary
    except NonFiniteStop:
        together = True  # the verdict was all-reduced: every process stops at the same step
        raise
    except RuntimeError as e:
        failure = as_peer_failure(e)  # a collective that failed because another process died or hung
        if failure is None:
            raise
        raise failure from None
    finally:
        teardown_distributed(synchronize=together)
