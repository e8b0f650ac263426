"""Loading a checkpoint: for resuming training (weights, optimizer state, state.json), for inference (a model,
its tokenizer and config), as the body of a classifier, or as a LoRA run's base with its adapters; and the
checks that pair a checkpoint with data (tokenizer) or with a base (fingerprint).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_model
from torch import nn

from lmforge.checkpoint.layout import resolve_checkpoint, verified_checkpoint
from lmforge.checkpoint.manifest import _one_line, _read_json, verify_checkpoint
from lmforge.checkpoint.optimizer import load_optimizer_tensors
from lmforge.checkpoint.shard_index import checkpoint_shards
from lmforge.checkpoint.sharded import load_sharded
from lmforge.checkpoint.weights import check_weights_fit, read_weights, saved_tensors, tied_names
from lmforge.config import RunConfig, run_config_from_dict
from lmforge.distributed import is_sharded, load_full_state, resolve_device, unwrap
from lmforge.errors import CheckpointError, ConfigError
from lmforge.files import sha256_file
from lmforge.lora import apply_lora, base_fingerprint, is_adapted, merge_lora
from lmforge.tokenizer import Tokenizer


def read_run_config(ckpt: str | Path) -> RunConfig:
    """The resolved RunConfig stored in a checkpoint directory's config.json."""
    ckpt = Path(ckpt)
    raw = _read_json(ckpt / "config.json", "checkpoint config")
    try:
        return run_config_from_dict(raw)
    except ConfigError as e:
        raise CheckpointError(f"{ckpt / 'config.json'} does not hold a valid config: {e}") from None
    except (TypeError, ValueError, AttributeError, OverflowError) as e:  # values of a type no config has
        raise CheckpointError(f"{ckpt / 'config.json'} does not hold a valid config ({type(e).__name__}); the "
                              f"checkpoint is corrupt, use another one") from None


def read_task(ckpt: str | Path) -> Optional[dict]:
    """The task a checkpoint was fine-tuned for, from its state.json: {"task": "sft", "template": {...}} (as
    data.tasks writes them), or None for a language model trained on text."""
    task = _read_json(Path(ckpt) / "state.json", "checkpoint state").get("task")
    if task is not None and not (isinstance(task, dict) and isinstance(task.get("task"), str)):
        raise CheckpointError(f"{Path(ckpt) / 'state.json'} holds a malformed 'task' entry; the checkpoint is "
                              "corrupt, use another one")
    return task


def load_weights(model: nn.Module, ckpt: str | Path, device: torch.device | str = "cpu") -> None:
    """Load model.safetensors of `ckpt` into `model` (names and shapes must match exactly; a model with LoRA
    adapters loads only its adapters and heads, the base weights it holds stay)."""
    if checkpoint_shards(ckpt) is not None:
        load_sharded(ckpt, model)
        return
    path = Path(ckpt) / "model.safetensors"
    check_weights_fit(model, Path(ckpt))
    if is_adapted(unwrap(model)):
        with torch.no_grad(), safe_open(str(path), framework="pt", device="cpu") as f:
            stored, own = set(f.keys()), saved_tensors(model)
            for names in tied_names(model):  # a tied weight (an embedding with added rows) is stored once
                own[names[0]].copy_(f.get_tensor(next(n for n in names if n in stored)))
        return
    try:
        if is_sharded(model):  # every process reads the whole file and keeps its shard
            with safe_open(str(path), framework="pt", device="cpu") as f:
                stored = {name: f.get_tensor(name) for name in f.keys()}
            load_full_state(model, {name: stored[next(n for n in names if n in stored)]
                                    for names in tied_names(model) for name in names})
            return
        load_model(unwrap(model), str(path), strict=True, device=str(device))
    except (RuntimeError, OSError, SafetensorError, ValueError) as e:  # safetensors reports mismatches as RuntimeError
        raise CheckpointError(f"{path} does not fit the model: {_one_line(e)}") from None


def load_training_state(ckpt: str | Path, model: nn.Module, optimizer: Optional[torch.optim.Optimizer],
                        device: torch.device | str = "cpu", manifest: Optional[dict] = None) -> dict:
    """Load weights and optimizer state of `ckpt` in place and return its state.json (for resume).

    Verifies every file against the manifest first, unless the caller passes the manifest that
    verify_checkpoint already returned.
    """
    ckpt = Path(ckpt)
    manifest = manifest if manifest is not None else verify_checkpoint(ckpt)
    if checkpoint_shards(ckpt) is not None:
        load_sharded(ckpt, model, optimizer)
        return _read_json(ckpt / "state.json", "checkpoint state")
    load_weights(model, ckpt, device)
    if optimizer is not None and "optimizer.safetensors" in manifest["files"]:
        load_optimizer_tensors(optimizer, ckpt / "optimizer.safetensors", model)
    return _read_json(ckpt / "state.json", "checkpoint state")


def load_body_weights(model: nn.Module, ckpt: str | Path, device: torch.device | str = "cpu") -> None:
    """Start a classifier (model.head: classify) from a language model checkpoint of the same body.

    Every stored tensor loads except the LM head: lm_head.weight is dropped (when tied to the embedding it is
    stored once, under that name, and then becomes tok_emb.weight); classifier.weight keeps its fresh
    initialisation. Verifies the checkpoint first; any other missing, extra or differently shaped tensor is a
    CheckpointError naming it.
    """
    ckpt = Path(ckpt)
    verify_checkpoint(ckpt)
    path = ckpt / "model.safetensors"
    tensors = read_weights(ckpt)
    if "tok_emb.weight" not in tensors and "lm_head.weight" in tensors:  # tied: stored under the head's name
        tensors["tok_emb.weight"] = tensors["lm_head.weight"]
    tensors.pop("lm_head.weight", None)
    own = unwrap(model).state_dict()
    missing = sorted(set(own) - set(tensors) - {"classifier.weight"})
    unexpected = sorted(set(tensors) - set(own))
    differ = sorted(k for k in tensors if k in own and tuple(tensors[k].shape) != tuple(own[k].shape))
    if missing or unexpected or differ:
        parts = [f"missing {', '.join(missing[:4])}" if missing else "",
                 f"unexpected {', '.join(unexpected[:4])}" if unexpected else "",
                 f"shapes differ: {', '.join(differ[:4])}" if differ else ""]
        raise CheckpointError(f"{path} does not fit the classifier's body: {'; '.join(p for p in parts if p)}; start "
                              "from a language model with the same architecture")
    unwrap(model).load_state_dict({k: v.to(device) for k, v in tensors.items()}, strict=False)


def load_start_weights(model: nn.Module, ckpt: str | Path, device: torch.device | str = "cpu",
                       verify: bool = True) -> None:
    """The weights a run starting from `ckpt` takes: a classifier started from a language model its body only
    (load_body_weights: the classifier starts fresh), any other model all of them (load_training_state, or
    load_weights unverified with verify=False). A model with a larger vocabulary than the checkpoint's (tokens added
    to its tokenizer: train.with_added_tokens) takes the checkpoint's rows and starts the others at their mean
    (GPT.resize_vocabulary)."""
    own, theirs = unwrap(model), read_run_config(ckpt).model
    size = getattr(getattr(own, "config", None), "vocab_size", theirs.vocab_size)
    if size > theirs.vocab_size:
        own.resize_vocabulary(theirs.vocab_size)
    head = getattr(getattr(own, "config", None), "head", "lm")
    if head == "classify" and theirs.head == "lm":
        load_body_weights(model, ckpt, device)
    elif verify:
        load_training_state(ckpt, model, None, device)
    else:
        load_weights(model, ckpt, device)
    if size > theirs.vocab_size:
        own.resize_vocabulary(size)


def check_data_tokenizer(ckpt: str | Path, data_tokenizer: Optional[str | Path], added_ok: bool = False) -> int:
    """Refuse data (token shards or task examples) tokenized by another tokenizer than the checkpoint's: the same
    ids would stand for other text, and with an equal vocabulary size nothing else notices (a wrong loss, wrong
    bits per byte). The one check of every reader that pairs a checkpoint with data: train (init_from, resume)
    and eval. Compares the sha256 of the checkpoint's tokenizer.json with the data's tokenizer file; nothing to
    compare when either has none. added_ok (a run starting from the checkpoint): the data's tokenizer may be the
    checkpoint's with tokens added (`lmforge prepare --add-tokens`); returns how many, else 0."""
    ckpt, theirs = Path(ckpt), Path(ckpt) / "tokenizer.json"
    if data_tokenizer is None or not Path(data_tokenizer).is_file() or not theirs.is_file():
        return 0
    if sha256_file(theirs) == sha256_file(Path(data_tokenizer)):
        return 0
    added = Tokenizer.load(data_tokenizer).extends(Tokenizer.load(theirs))
    if added and added_ok:
        return added
    if added:
        raise CheckpointError(f"{data_tokenizer} adds {added} token(s) to the tokenizer {ckpt} was trained with, "
                              f"which has no embedding rows for them: train from {ckpt} on this data first "
                              f"(--train.init_from), then use the run it makes")
    raise CheckpointError(f"{ckpt} was trained with another tokenizer than {data_tokenizer}: the same ids mean "
                          f"other text; use data prepared with `lmforge prepare --tokenizer {theirs}` (or the "
                          f"data the model was trained on)")


def lora_base(ckpt: str | Path) -> dict:
    """The base a LoRA checkpoint was trained on, from its state.json: {"path": its checkpoint directory,
    "fingerprint": lora.base_fingerprint of its weights}."""
    base = _read_json(Path(ckpt) / "state.json", "checkpoint state").get("base")
    if not (isinstance(base, dict) and isinstance(base.get("path"), str) and isinstance(base.get("fingerprint"), str)):
        raise CheckpointError(f"{Path(ckpt) / 'state.json'} has no valid 'base' entry (path and fingerprint of the "
                              f"model the LoRA adapters were trained on); the checkpoint is corrupt, use another one")
    return base


def check_base(ckpt: str | Path, saved: dict, fingerprint: str, loaded_from: str | Path) -> None:
    """Refuse adapters of `ckpt` on a base other than the one they were trained on: CheckpointError naming both
    fingerprints unless `fingerprint` (of the base loaded from `loaded_from`) equals saved["fingerprint"]."""
    if fingerprint != saved["fingerprint"]:
        raise CheckpointError(f"{ckpt} holds LoRA adapters trained on the base {saved['path']} with fingerprint "
                              f"{saved['fingerprint'][:16]}, but the base loaded from {loaded_from} has fingerprint "
                              f"{fingerprint[:16]} (its weights changed); restore the original base at "
                              f"{saved['path']} (and train.init_from), or start a new run from this base")


def load_merged_lora(ckpt: str | Path, config: RunConfig) -> nn.Module:
    """The plain GPT a LoRA checkpoint stands for, on the CPU: its base (lora_base, refused if its fingerprint
    changed) with the checkpoint's adapters merged in and its heads loaded (lora.merge_lora)."""
    return merge_lora(load_adapted_lora(ckpt, config))


def load_adapted_lora(ckpt: str | Path, config: RunConfig) -> nn.Module:
    """A LoRA checkpoint's base (checked as load_merged_lora does) with its adapters applied, not merged, and
    its heads loaded, on the CPU: what the run trained, e.g. to export the adapters on their own."""
    from lmforge.model import GPT

    model = GPT(config.model)
    load_lora_base(model, ckpt, "cpu")
    apply_lora(model, config.lora)
    load_weights(model, ckpt, "cpu")
    return model.eval()


def load_lora_base(model: nn.Module, ckpt: str | Path, device: torch.device | str = "cpu") -> dict[str, str]:
    """Load into the plain `model` the base whose adapters the LoRA checkpoint `ckpt` holds (a classifier's body
    from a language model, as the trainer loaded it), refusing a base whose weights changed since (check_base).
    Returns the base's record {"path": its checkpoint, "fingerprint"} as the LoRA run's state.json has it."""
    saved = lora_base(ckpt)
    if not Path(saved["path"]).exists():
        raise CheckpointError(f"{ckpt} holds LoRA adapters of the base {saved['path']}, which no longer exists; "
                              f"restore that base checkpoint to use them")
    base_ckpt = resolve_checkpoint(saved["path"])
    load_start_weights(model, base_ckpt, device, verify=False)  # the fingerprint below compares every weight's bytes
    fingerprint = base_fingerprint(model)
    check_base(ckpt, saved, fingerprint, base_ckpt)
    return {"path": str(Path(base_ckpt).resolve()), "fingerprint": fingerprint}


def _lora_base_vocab(ckpt: Path, config: RunConfig) -> Optional[int]:
    """The vocab_size of a LoRA checkpoint's base when smaller than the run's (tokens added: rows the run trained);
    None when equal, or when the base is gone (load_lora_base says so)."""
    base = Path(lora_base(ckpt)["path"])
    if not base.exists():
        return None
    size = read_run_config(resolve_checkpoint(base)).model.vocab_size
    return size if size < config.model.vocab_size else None


def load_for_inference(path: str | Path, device: str | torch.device = "cpu",
                       manifest: Optional[dict] = None) -> tuple[nn.Module, Any, RunConfig]:
    """(model in eval mode on `device`, Tokenizer or None, RunConfig) from a run or checkpoint directory.

    Verifies every file's sha256 first; a run directory gives its newest intact checkpoint (verified_checkpoint).
    A caller that already verified the checkpoint directory `path` passes the manifest verification returned.
    The tokenizer is None only for checkpoints trained without prepared data (tests). A LoRA checkpoint gives
    its base with the adapters merged in (load_merged_lora): an ordinary GPT.
    """
    from lmforge.model import GPT

    ckpt, manifest = (Path(path), manifest) if manifest is not None else verified_checkpoint(path)
    config = read_run_config(ckpt)
    shape = GPT.shapes(config.model)  # the shapes config.json describes, checked against the file before allocating
    if config.lora is not None:  # what a LoRA checkpoint holds: its adapters and heads (and rows of added tokens)
        shape.added_rows_from = _lora_base_vocab(ckpt, config)
        with torch.device("meta"):
            apply_lora(shape, config.lora)
    check_weights_fit(shape, ckpt)
    device = resolve_device(device) if isinstance(device, str) else device
    if config.lora is None:
        model = GPT.empty(config.model)  # every weight comes from the file: no random initialisation first
        load_weights(model, ckpt, "cpu")
    else:
        model = load_merged_lora(ckpt, config)
    model.to(device)
    model.eval()
    tokenizer = None
    if "tokenizer.json" in manifest["files"]:
        tokenizer = Tokenizer.load(ckpt / "tokenizer.json")
    return model, tokenizer, config
