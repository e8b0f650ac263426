"""`lmforge export --format hf`: an lmforge checkpoint -> a directory transformers loads offline.

    OUT/config.json               GPT2LMHeadModel or LlamaForCausalLM (Qwen2ForCausalLM: a Llama-style model with
                                  model.qkv_bias; Qwen3ForCausalLM: with model.qk_norm), whichever the model matches
                                  (a classifier: ...ForSequenceClassification)
    OUT/model.safetensors         fp32 weights in Hugging Face names (a tied LM head stored once)
    OUT/generation_config.json    bos/eos/pad token ids (generation stops at the end token, as in lmforge)
    OUT/tokenizer.json, tokenizer_config.json, special_tokens_map.json   (see interop.hf_tokenizer)

A model with an option neither architecture has (sinusoidal positions, GPT-2 style with RoPE, ...)
is refused with the reason for each. The directory is written next to OUT and put in place by
lmforge.files.atomic_dir: with --force, an earlier export (only one lmforge wrote: its config.json names
lmforge_version) is deleted only after the new one is complete.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any, Optional

import torch
from safetensors.torch import save_file

from lmforge import __version__
from lmforge.checkpoint import load_for_inference
from lmforge.config import ModelConfig
from lmforge.errors import ConfigError, LmforgeError
from lmforge.files import atomic_dir, check_output
from lmforge.interop import hf_gpt2, hf_llama
from lmforge.interop.hf_tokenizer import hf_tokenizer_files


class HFExportError(LmforgeError):
    """A checkpoint that cannot be written in Hugging Face format, or an output that must not be replaced."""


def converter_for_model(config: ModelConfig):
    """hf_gpt2 or hf_llama, whichever can express `config`; HFExportError with both reasons otherwise.

    An encoder is refused first, with its own reason: GPT-2 and Llama are decoders, and lmforge's encoder is
    pre-norm without BERT's embedding LayerNorm, token type embeddings and MLM transform, so neither a causal
    model nor a BertForMaskedLM would compute its logits."""
    if not config.causal:
        raise HFExportError("this is an encoder (model.causal false): lmforge's encoder is pre-norm, without BERT's "
                            "embedding LayerNorm, token types and MLM transform, so it is not a BertForMaskedLM (and "
                            "GPT-2/Llama are decoders); export it with --format onnx")
    reasons = []
    for convert in (hf_gpt2, hf_llama):
        try:
            check = convert.check_gpt2_compatible if convert is hf_gpt2 else convert.check_llama_compatible
            check(config)
            return convert
        except ConfigError as e:
            reasons.append(str(e))
    raise HFExportError("this model has no Hugging Face equivalent: " + "; ".join(reasons)
                        + "; export it with --format onnx, which takes any lmforge model")


def model_chat_template(ckpt: str | Path, tokenizer: Any) -> Optional[str]:
    """The Jinja chat template an export writes: the one a model fine-tuned on task data learned (lmforge's own
    format written as Jinja, or the base model's own), else the model's own (an imported instruct model's), else
    none: what `lmforge chat` renders for it."""
    from lmforge.checkpoint import read_task
    from lmforge.data.chat_template import to_jinja
    from lmforge.data.tasks import TEXT_TASKS

    task = read_task(ckpt)
    if task is not None and task["task"] in TEXT_TASKS and (task.get("template") or {}).get("chat"):
        chat = task["template"]["chat"]  # fine-tuned in the base model's own Jinja format, or in lmforge's
        return chat["jinja"] if "jinja" in chat else to_jinja(chat["turn"], chat["reply"])
    return getattr(tokenizer, "chat_template", None)


def hf_files(model: torch.nn.Module, tokenizer: Any, chat_template: Optional[str] = None) -> dict[str, Any]:
    """{file name: content} of the Hugging Face directory: dicts (JSON) and the weights (a tensor dict);
    chat_template (Jinja) goes into tokenizer_config.json."""
    config: ModelConfig = model.config
    convert = converter_for_model(config)
    ids = {}
    if tokenizer is not None:
        ids = {"bos_token_id": tokenizer.start_id, "eos_token_id": tokenizer.end_id, "pad_token_id": tokenizer.pad_id}
    hf_config = convert.to_hf_config(config, **ids, dtype="float32", transformers_version=None,
                                     lmforge_version=__version__)
    hf_config = {k: v for k, v in hf_config.items() if v is not None or k.endswith("token_id")}
    state = convert.to_hf_state_dict(model.state_dict(), config)
    if config.tie_embeddings and "lm_head.weight" in state:  # transformers ties lm_head to the embedding on load
        state.pop("lm_head.weight")
    # Own memory for each tensor: safetensors refuses views that share storage (split q/k/v, ...).
    weights = {name: t.detach().to("cpu", torch.float32).contiguous().clone() for name, t in state.items()}
    files: dict[str, Any] = {"config.json": hf_config, "model.safetensors": weights,
                             "generation_config.json": {"_from_model_config": False, **ids}}
    if tokenizer is not None:
        files.update(hf_tokenizer_files(tokenizer, config.block_size, chat_template))
    return files


# What an export directory holds (hf_files, hf_tokenizer_files, a LoRA run's adapter/): --force replaces nothing more
EXPORT_FILES = frozenset({"config.json", "model.safetensors", "generation_config.json", "tokenizer.json",
                          "tokenizer_config.json", "special_tokens_map.json", "adapter"})


def export_hf(checkpoint: str | Path, out_dir: str | Path, *, force: bool = False, merge: bool = False) -> Path:
    """Write the checkpoint (a run directory: its newest complete checkpoint) as a Hugging Face directory.

    A LoRA run gives its base model in OUT and its adapters in PEFT's format in OUT/adapter (peft loads them onto
    OUT: PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(OUT), OUT/adapter); a classifier's
    trained head is in the adapter too, see peft_export); with merge, the adapters merged into the weights, one
    plain model. Returns out_dir. An existing non-empty out_dir is replaced (whole, once the new export is
    complete) only with force and only if it is an earlier lmforge export; anything else raises HFExportError.
    """
    from lmforge.checkpoint import load_adapted_lora, read_run_config, verified_checkpoint
    from lmforge.lora import dequantize_lora

    out_dir = Path(out_dir)
    check_output(out_dir, force=force, ours=_is_hf_export, what="a Hugging Face export written by lmforge",
                 error=HFExportError, members=lambda _: EXPORT_FILES, inputs=[checkpoint])
    ckpt, manifest = verified_checkpoint(checkpoint)
    config = read_run_config(ckpt)
    if merge and config.lora is None:
        raise HFExportError(f"--merge applies to a LoRA run; {ckpt} holds a whole model: export it without --merge")
    model, tokenizer, _ = load_for_inference(ckpt, "cpu", manifest)  # a LoRA run: its adapters merged
    files = hf_files(model, tokenizer, model_chat_template(ckpt, tokenizer))
    adapter: dict[str, Any] = {}
    if config.lora is not None and not merge:
        from lmforge.interop.peft_export import base_files, peft_adapter_files

        adapted = load_adapted_lora(ckpt, config)
        base = adapted
        if config.lora.init == "loftq":  # the 4-bit values it computed with (quantized again as they load: the same
            base = dequantize_lora(load_adapted_lora(ckpt, config))  # 4 bits), as peft saves a LoftQ base
        elif config.lora.quantize is not None:  # QLoRA: the base in full (peft's users quantize it as they load it)
            base = load_adapted_lora(ckpt, dataclasses.replace(config, lora=dataclasses.replace(config.lora,
                                                                                                quantize=None)))
        if config.lora.quantize is not None:
            dequantize_lora(adapted)  # DoRA's magnitudes of rows left unadapted: the 4-bit rows' norms, as peft's
        files = base_files(base, tokenizer)  # the frozen weights: hf names leave the adapters (and a head) out
        adapter = peft_adapter_files(adapted, config.lora, base_name_or_path=str(out_dir.resolve()))
    with atomic_dir(out_dir) as tmp:  # files inside are fsynced before the directory is renamed into place
        _write(tmp, files)
        if adapter:
            (tmp / "adapter").mkdir()
            _write(tmp / "adapter", adapter)
    return out_dir


def _write(directory: Path, files: dict[str, Any]) -> None:
    """Each file of `files` into `directory` (inside atomic_dir's temporary): safetensors or JSON."""
    for name, content in files.items():
        if name.endswith(".safetensors"):
            save_file(content, str(directory / name), metadata={"format": "pt"})
        else:
            (directory / name).write_text(json.dumps(content, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def _is_hf_export(path: Path) -> bool:
    """Whether `path` holds an export of export_hf: its config.json records the lmforge version."""
    try:
        config = json.loads((path / "config.json").read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError, RecursionError):
        return False
    return isinstance(config, dict) and "lmforge_version" in config
