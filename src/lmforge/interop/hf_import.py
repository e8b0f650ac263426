"""`lmforge import`: a local Hugging Face model directory -> an lmforge checkpoint.

    HF_DIR/config.json                         model_type gpt2, llama, qwen2 or qwen3
    HF_DIR/model.safetensors                   or model.safetensors.index.json + its shards
    HF_DIR/tokenizer.json                      or vocab.json + merges.txt (+ tokenizer_config.json)
  ->
    RUN_DIR/checkpoints/step-00000000/         model.safetensors, config.json, state.json, tokenizer.json,
                                               manifest.json (no optimizer: training starts from it with
                                               --train.init_from, generate/eval/serve read it directly)

Weights are read with safetensors only. Pickle files (pytorch_model.bin, *.pt, *.ckpt) are refused
without being opened, with the command that converts them.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from lmforge.checkpoint import complete_checkpoints, save_checkpoint
from lmforge.config import ModelConfig, RunConfig, TrainConfig
from lmforge.errors import CheckpointError, ConfigError, LmforgeError, TokenizerError
from lmforge.interop import hf_gpt2, hf_llama
from lmforge.interop.hf_tokenizer import read_hf_tokenizer
from lmforge.model import GPT

CONVERTERS = {"gpt2": hf_gpt2, "llama": hf_llama, "qwen2": hf_llama, "qwen3": hf_llama}
SUPPORTED = ("gpt2 (GPT2LMHeadModel), llama (LlamaForCausalLM: RoPE, RMSNorm, SwiGLU, grouped-query attention), "
             "qwen2 (Qwen2ForCausalLM: Llama with q/k/v biases, without sliding windows) and qwen3 (Qwen3ForCausalLM: "
             "Llama with each head's queries and keys RMS-normalised, without sliding windows)")
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")
CONVERT_HINT = ("convert it to safetensors with transformers, where you trust the file: "
                "AutoModelForCausalLM.from_pretrained(dir).save_pretrained(dir, safe_serialization=True)")


class HFImportError(LmforgeError):
    """A Hugging Face directory that cannot be imported."""


def read_hf_config(hf_dir: Path) -> dict[str, Any]:
    path = hf_dir / "config.json"
    if not path.is_file():
        raise HFImportError(f"{hf_dir} has no config.json: give the directory a Hugging Face model was saved to "
                           "with save_pretrained")
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise HFImportError(f"{path} is not valid JSON ({e})") from None
    if not isinstance(config, dict):
        raise HFImportError(f"{path} does not hold a JSON object")
    return config


def converter_for(hf_config: dict[str, Any]):
    """The conversion module (hf_gpt2 or hf_llama) for a config.json, or HFImportError listing what is supported."""
    model_type = hf_config.get("model_type")
    if model_type not in CONVERTERS:
        arch = ", ".join(hf_config.get("architectures") or []) or "unknown"
        raise HFImportError(f"model_type={model_type!r} (architectures: {arch}) cannot be imported; "
                            f"supported: {SUPPORTED}")
    return CONVERTERS[model_type]


def weight_files(hf_dir: Path) -> list[Path]:
    """The safetensors files holding the weights (one file, or the shards an index names).

    Raises HFImportError for pickle-only directories (never opening the pickle) and broken indexes.
    """
    single, index = hf_dir / "model.safetensors", hf_dir / "model.safetensors.index.json"
    if single.is_file():
        return [single]
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
            names = sorted(set(weight_map.values()))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError, AttributeError) as e:
            raise HFImportError(f"{index} is not a safetensors index (weight_map missing: {e})") from None
        shards = []
        for name in names:
            shard = hf_dir / name
            if not isinstance(name, str) or Path(name).name != name or not name.endswith(".safetensors"):
                raise HFImportError(f"{index} names shard {name!r}; shards must be .safetensors files in {hf_dir}")
            if not shard.is_file():
                raise HFImportError(f"{index} names shard {name}, which is missing from {hf_dir}; download it too")
            shards.append(shard)
        return shards
    pickles = sorted(p.name for p in hf_dir.iterdir()
                     if p.suffix in PICKLE_SUFFIXES or p.name.endswith(".bin.index.json"))
    if pickles:
        raise HFImportError(f"{hf_dir} holds weights only as pickle files ({', '.join(pickles)}), which lmforge never "
                           f"loads (unpickling can run code); {CONVERT_HINT}")
    raise HFImportError(f"{hf_dir} has no model.safetensors or model.safetensors.index.json; save the model with "
                       "save_pretrained(dir) (safetensors is the default)")


def read_hf_weights(files: list[Path]) -> dict[str, torch.Tensor]:
    """All tensors of the safetensors files, on the CPU."""
    tensors: dict[str, torch.Tensor] = {}
    for path in files:
        try:
            tensors.update(load_file(str(path), device="cpu"))
        except (SafetensorError, OSError) as e:
            raise HFImportError(f"{path} cannot be read as safetensors ({e}); download it again") from None
    return tensors


def hf_to_lmforge(hf_dir: str | Path) -> tuple[GPT, Any, dict[str, Any]]:
    """(lmforge GPT in fp32, its Tokenizer, config.json) from a Hugging Face model directory."""
    hf_dir = Path(hf_dir)
    if not hf_dir.is_dir():
        raise HFImportError(f"{hf_dir} is not a directory; give the directory of a Hugging Face model (config.json, "
                           "model.safetensors, tokenizer.json)")
    hf_config = read_hf_config(hf_dir)
    convert = converter_for(hf_config)
    try:
        model_config: ModelConfig = convert.from_hf_config(hf_config)
    except ConfigError as e:
        raise HFImportError(f"{hf_dir}/config.json: {e}") from None
    files = weight_files(hf_dir)
    try:
        tokenizer = read_hf_tokenizer(hf_dir, hf_config)
    except TokenizerError as e:
        raise HFImportError(f"{hf_dir}: {e}") from None
    if tokenizer.vocab_size > model_config.vocab_size:
        raise HFImportError(f"{hf_dir}: the tokenizer has {tokenizer.vocab_size} tokens but the model only "
                           f"vocab_size={model_config.vocab_size}; the tokenizer belongs to another model")
    state = convert.from_hf_state_dict(read_hf_weights(files), model_config)
    model = GPT.empty(model_config)
    try:
        model.load_state_dict({k: v.float() for k, v in state.items()}, strict=True)
    except RuntimeError as e:
        detail = " ".join(str(e).split())[:300]
        raise HFImportError(f"{hf_dir}: the weights do not fit config.json ({detail})") from None
    return model.eval(), tokenizer, hf_config


def check_new_run(run_dir: Path) -> None:
    """CheckpointError unless `run_dir` is free for an imported checkpoint (no file there, no checkpoints in it):
    every `lmforge import` (a model, a GGUF file, an adapter) checks it before reading anything."""
    if run_dir.exists() and not run_dir.is_dir():
        raise CheckpointError(f"--out {run_dir} is a file, not a directory: choose another --out")
    if complete_checkpoints(run_dir):
        raise CheckpointError(f"{run_dir} already holds checkpoints; import into a new --out directory")


def import_hf(hf_dir: str | Path, run_dir: str | Path) -> Path:
    """Write the Hugging Face model in `hf_dir` as RUN_DIR/checkpoints/step-00000000; return that path.

    Refuses a run directory that already holds checkpoints (nothing on disk is changed then).
    """
    run_dir = Path(run_dir)
    check_new_run(run_dir)
    model, tokenizer, hf_config = hf_to_lmforge(hf_dir)
    config = RunConfig(model=model.config, train=TrainConfig(run_dir=str(run_dir)))
    run_dir.mkdir(parents=True, exist_ok=True)
    tok_file = run_dir / ".imported-tokenizer.json"
    tokenizer.save(tok_file)
    try:
        source = {"path": str(Path(hf_dir).resolve()), "model_type": hf_config.get("model_type"),
                  "architectures": hf_config.get("architectures")}
        return save_checkpoint(run_dir, 0, model, None, config, {"tokens_seen": 0, "imported_from": source},
                               tok_file)
    finally:
        tok_file.unlink(missing_ok=True)
