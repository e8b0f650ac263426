"""`lmforge merge`: a LoRA run's checkpoint -> a plain full checkpoint with the adapters folded into the weights.

    OUT/checkpoints/step-<N>/   model.safetensors (every weight: W + (alpha / r) B A), state.json, config.json
                                (lora: null), tokenizer.json, manifest.json; no optimizer state, as `lmforge import`

The merged model is the one load_for_inference gives for the LoRA checkpoint (its base, refused if the base's
fingerprint changed, with the adapters merged and the task heads loaded), so its logits equal the adapted model's
up to fp32 rounding. generate, eval, serve, export and `--train.init_from` of a next run read OUT like any run.
state.json's "merged_from" names the LoRA checkpoint and its base; `--force` replaces only such a merge output.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from lmforge.checkpoint import (CHECKPOINTS, checkpoint_name, complete_checkpoints, load_for_inference, lora_base,
                                read_run_config, read_task, save_checkpoint, verified_checkpoint)
from lmforge.config import to_dict
from lmforge.errors import CheckpointError
from lmforge.files import atomic_dir, check_output

WHAT = "a merged lmforge checkpoint"


def is_merge_output(path: Path) -> bool:
    """Whether `path` is a run directory `lmforge merge` wrote (its newest checkpoint says "merged_from")."""
    found = complete_checkpoints(path)
    if not found:
        return False
    try:
        return "merged_from" in json.loads((found[-1] / "state.json").read_text(encoding="utf-8"))
    except (OSError, ValueError, TypeError):
        return False


def merge_checkpoint(path: str | Path, out: str | Path, *, force: bool = False) -> Path:
    """Write the LoRA checkpoint `path` (a run or checkpoint directory) merged as OUT/checkpoints/step-<N>/; return
    that checkpoint directory. CheckpointError when `path` holds no adapters, its base is gone or changed, or OUT
    exists and is not a merge output replaced with `force` (nothing on disk changes then)."""
    ckpt, manifest = verified_checkpoint(path)
    config = read_run_config(ckpt)
    if config.lora is None:
        raise CheckpointError(f"{ckpt} holds no LoRA adapters (its config has lora: null): it is a full checkpoint "
                              f"already; use it as it is")
    out = Path(out)
    check_output(out, force=force, ours=is_merge_output, what=WHAT, error=CheckpointError, inputs=[path])
    model, _, _ = load_for_inference(ckpt, "cpu", manifest)
    merged = dataclasses.replace(config, lora=None, train=dataclasses.replace(config.train, run_dir=str(out),
                                                                              resume="none"))
    state = {"tokens_seen": 0, "merged_from": {"checkpoint": str(ckpt.resolve()), "base": lora_base(ckpt),
                                               "lora": to_dict(config.lora)}}
    task = read_task(ckpt)
    if task is not None:
        state["task"] = task
    tokenizer = ckpt / "tokenizer.json" if "tokenizer.json" in manifest["files"] else None
    step = int(manifest["step"])
    with atomic_dir(out) as tmp:
        save_checkpoint(tmp, step, model, None, merged, state, tokenizer)
    return out / CHECKPOINTS / checkpoint_name(step)
