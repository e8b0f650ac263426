"""Checkpoint directories: the one place that writes and reads them (train writes; generate and eval read).

    RUN_DIR/checkpoints/step-00000100/
        model.safetensors      weights (a tied embedding/LM head is stored once)
        optimizer.safetensors  AdamW moments (Muon's momentum) as named tensors "state.<param index>.<key>";
                               param groups and non-tensor state as JSON in the file's metadata
        state.json             step, tokens seen, RNG states (python/numpy/torch/cuda, one entry per rank),
                               data stream position, val loss, resolved config, tokenizer sha256
        config.json            the resolved RunConfig (what load_for_inference builds the model from)
        tokenizer.json         copied from the prepared data, so the directory alone can generate
        manifest.json          sha256 and size of every file above, written LAST

A sharded checkpoint (train.checkpoint_format sharded, under fsdp) holds model-rank{r}-of-{N}.safetensors and
optim-rank{r}-of-{N}.safetensors, each process's own rows, and shards.json in place of the two whole files
(save_sharded_checkpoint, load_sharded); readers outside training assemble it on one host.

A save is written into a hidden sibling directory (every file fsynced, manifest.json last), which is
fsynced and renamed into place, and the parent directory is fsynced: a crash, a kill or a full disk leaves
either the old state or a complete new checkpoint, and a directory without manifest.json never counts.
Leftovers of interrupted saves are removed by `clean_interrupted_saves`. Nothing is pickled: tensors go
through safetensors (each file's header is checked against its size before anything is allocated),
everything else through JSON; a pickle file planted under a checkpoint name is refused, never opened.

Every reader (train --resume, eval, generate, serve, export) resolves a run directory the same way, through
`verified_checkpoint`: its newest checkpoint that passes verification, a corrupt newer one skipped with one line
on stderr saying which and why. A checkpoint directory given explicitly that fails verification is an error.

Fault injection for tests (inert unless the environment variable LMFORGE_FAULT is set): see `fault_point`.

The modules, each importing only those above it:

    manifest     file names, manifest.json and its verification, expected_files per kind, safetensors headers,
                 pickles refused
    faults       fault_point (LMFORGE_FAULT)
    rng          RNG states as JSON
    layout       step-N names, listing, the newest intact checkpoint every reader uses, cleanup of interrupted
                 saves, best and pruning, free space
    shard_index  a sharded checkpoint's shards.json and the rows of its per-rank files
    weights      what model.safetensors holds for a model: write, check it fits, read it whole
    optimizer    optimizer state as named tensors
    save         writing a whole checkpoint crash-consistently
    sharded      writing and loading per-rank sharded checkpoints
    load         loading for resume, for inference, as a classifier's body, a LoRA run on its base
"""

from lmforge.checkpoint.faults import fault_point
from lmforge.checkpoint.layout import (CHECKPOINTS, best_checkpoint, check_free_space, checkpoint_name,
                                       clean_interrupted_saves, complete_checkpoints, latest_checkpoint,
                                       newest_intact_checkpoint, prune_checkpoints, resolve_checkpoint,
                                       verified_checkpoint)
from lmforge.checkpoint.load import (check_base, check_data_tokenizer, load_adapted_lora, load_body_weights,
                                     load_for_inference, load_lora_base, load_start_weights,
                                     load_training_state, load_weights, lora_base,
                                     read_run_config, read_task)
from lmforge.checkpoint.manifest import check_safetensors, expected_files, has_optimizer_state, verify_checkpoint
from lmforge.checkpoint.rng import capture_rng, restore_rng
from lmforge.checkpoint.save import save_checkpoint
from lmforge.checkpoint.shard_index import read_shard_index
from lmforge.checkpoint.sharded import save_sharded_checkpoint
from lmforge.checkpoint.weights import checkpoint_bytes, read_weights

__all__ = [
    "CHECKPOINTS", "best_checkpoint", "capture_rng", "check_base", "check_data_tokenizer", "check_free_space",
    "check_safetensors", "checkpoint_bytes", "checkpoint_name", "clean_interrupted_saves", "complete_checkpoints",
    "expected_files", "fault_point", "has_optimizer_state", "latest_checkpoint", "load_adapted_lora", "load_lora_base", "load_start_weights",
    "load_body_weights", "load_for_inference", "load_training_state", "load_weights", "lora_base",
    "newest_intact_checkpoint", "prune_checkpoints", "read_run_config", "read_shard_index", "read_task",
    "read_weights", "resolve_checkpoint", "restore_rng", "save_checkpoint", "save_sharded_checkpoint",
    "verified_checkpoint", "verify_checkpoint",
]
