"""LoRA adapters of an lmforge model -> a Hugging Face PEFT adapter that `peft` loads onto the exported base.

    OUT/adapter_config.json          LoraConfig: peft_type LORA, task_type CAUSAL_LM (SEQ_CLS for a classifier), r,
                                     lora_alpha, target_modules, rank_pattern / alpha_pattern where modules differ in
                                     rank, fan_in_fan_out (GPT-2), modules_to_save (a classifier: ["score"])
    OUT/adapter_model.safetensors    base_model.model.<HF module>.lora_A.weight (r, in), .lora_B.weight (out, r), fp32;
                                     with DoRA (use_dora) .lora_magnitude_vector (out,): rows no lmforge adapter
                                     covers get their weight's own norm, which DoRA leaves as they are;
                                     an embedding adapter (lora.targets emb): <embedding>.lora_embedding_A (r, V),
                                     .lora_embedding_B (C, r), and a tied head's own adapter, lm_head.lora_A = B^T,
                                     lora_B = A^T (ensure_weight_tying);
                                     a classifier's head, trained whole: base_model.model.score.weight (num_labels, C);
                                     with tokens added to the base's tokenizer, the embedding and lm_head whole
                                     (modules_to_save: wte / embed_tokens and lm_head; the base holds their new
                                     rows as they started, at the mean row: transformers' resize_token_embeddings)

The base is the model hf_export writes for the adapted model (base_files: its state_dict holds the frozen weights
under their plain names). A classifier's head is not frozen: a LoRA run trains it whole, so it travels in the
adapter as PEFT saves a head it trains (modules_to_save, HF's `score` = lmforge's `classifier`), and the base holds
zeros in its place. PEFT computes, per HF module,
y = base(x) + (lora_alpha / r) * x A^T B^T, with A (r, in) and B (out, r) also for GPT-2's Conv1D, whose
fan_in_fan_out=True only transposes the delta when merging (peft tuners/lora/layer.py).

One rule maps every case exactly. An HF module computes rows [lo, lo + n) of an lmforge Linear's output
(HF_MODULES below). Each lmforge adapter (A_s, B_s) on rows [start, start + size) of that Linear that overlaps
them contributes A_s to A' (stacked) and its overlapping rows of B_s to B' (block-structured, zero elsewhere):

    B' A' = sum_s  B_s[overlap] A_s                  rank of the HF module = r * (adapters overlapping it)

    GPT-2 c_attn, lmforge q and v:   A' = [A_q; A_v] (2r, C), B' = [[B_q, 0], [0, 0], [0, B_v]] (3C, 2r)
    Llama q_proj, lmforge q:         A' = A_q, B' = B_q                   (k_proj, v_proj alike)
    Llama gate_proj / up_proj, lmforge mlp (one adapter over [gate; up]): both A' = A, B' = top / bottom half of B

A module of rank m r gets lora_alpha = m alpha, so its scale lora_alpha / rank stays lmforge's alpha / r (rsLoRA's
alpha / sqrt(r) is written as plain LoRA's: lora_alpha = m alpha sqrt(r), use_rslora false). An adapter started by
PiSSA or OLoRA (lora.init) updates by B A - B0 A0 on the unchanged weight: two terms, (A, B) and (A0, -B0), each
stacked like an adapter of its own, so it reaches peft as a plain LoRA of rank 2r on the plain base (peft's own
conversion of a PiSSA adapter for sharing).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Optional

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from lmforge import __version__
from lmforge.config import ModelConfig
from lmforge.files import atomic_dir, atomic_path, atomic_write_text, check_output
from lmforge.interop import hf_gpt2
from lmforge.interop.hf_export import HFExportError, converter_for_model, hf_files
from lmforge.lora import LoRAConfig, LoRAEmbedding, LoRALinear, TiedLoRAHead, added_row_weights

CONFIG, WEIGHTS = "adapter_config.json", "adapter_model.safetensors"
PREFIX = "base_model.model."  # what PeftModel puts before the HF model's module names

# lmforge Linear inside block N -> the HF modules inside the HF block N that compute its output rows, in order;
# sizes from _row_sizes. lm_head is lm_head in both (untied only: lora refuses head on a tied one).
HF_MODULES = {
    "gpt2": {"attn.qkv": ("attn.c_attn",), "attn.proj": ("attn.c_proj",),
             "mlp.fc": ("mlp.c_fc",), "mlp.proj": ("mlp.c_proj",)},
    "llama": {"attn.qkv": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
              "attn.proj": ("self_attn.o_proj",),
              "mlp.fc": ("mlp.gate_proj", "mlp.up_proj"), "mlp.proj": ("mlp.down_proj",)},
}
HF_BLOCK = {"gpt2": "transformer.h.{}.", "llama": "model.layers.{}."}
EMBEDDING = {"gpt2": "transformer.wte", "llama": "model.embed_tokens"}  # lmforge's tok_emb
# model.head -> PEFT's task_type, and the HF modules the run trained whole (lora.HEADS), saved as modules_to_save
TASKS = {"lm": ("CAUSAL_LM", ()), "classify": ("SEQ_CLS", ("score",))}


def _row_sizes(arch: str, linear: str, config: ModelConfig, out_features: int) -> tuple[int, ...]:
    """Output rows of lmforge's `linear` that each HF module of HF_MODULES[arch][linear] computes, in order."""
    if arch == "llama" and linear == "attn.qkv":
        kv = config.n_kv_head * config.head_dim
        return config.n_head * config.head_dim, kv, kv  # [q; k; v]
    if arch == "llama" and linear == "mlp.fc":
        return out_features // 2, out_features // 2  # [gate; up], MLP.forward chunks gate first
    return (out_features,)


def _hf_rows(arch: str, name: str, module: LoRALinear, config: ModelConfig) -> list[tuple[str, int, int]]:
    """[(HF module name, lo, n)]: the HF modules computing rows lo..lo+n-1 of the lmforge Linear `name`."""
    if name == "lm_head":
        return [("lm_head", 0, module.out_features)]
    _, block, linear = name.split(".", 2)  # blocks.N.attn.qkv
    rows, lo = [], 0
    for hf, n in zip(HF_MODULES[arch][linear], _row_sizes(arch, linear, config, module.out_features)):
        rows.append((HF_BLOCK[arch].format(block) + hf, lo, n))
        lo += n
    return rows


def _number(x: float) -> float | int:
    """x as an int when it is whole (lora_alpha: 16, not 16.0, as peft writes it)."""
    return int(x) if float(x).is_integer() else x


@torch.no_grad()
def peft_adapter_files(model: torch.nn.Module, lora_config: LoRAConfig,
                       base_name_or_path: Optional[str] = None) -> dict[str, Any]:
    """{"adapter_config.json": dict, "adapter_model.safetensors": {name: fp32 tensor}} of a model adapted by
    apply_lora (GPT-2 style or Llama style, as hf_export.converter_for_model decides); a classifier's adapter also
    holds its trained head (modules_to_save), for the base of base_files.

    `base_name_or_path` is recorded as the config's base_model_name_or_path (where AutoPeftModel finds the base:
    a hub id or the directory export_hf wrote). Raises HFExportError for a model with no HF equivalent, no
    adapters, or merged adapters; ValueError when `lora_config` is not the one the model was adapted with (another
    r or scale).
    """
    config: ModelConfig = model.config
    arch = "gpt2" if converter_for_model(config) is hf_gpt2 else "llama"
    task_type, modules_to_save = TASKS[config.head]
    adapted = {name: m for name, m in model.named_modules() if isinstance(m, LoRALinear)}
    embedding = model.tok_emb if isinstance(model.tok_emb, LoRAEmbedding) else None
    if not adapted and embedding is None:
        raise HFExportError("the model has no LoRA adapters to export as PEFT: export it as a plain HF model")
    if any(m.merged for m in adapted.values()) or (embedding is not None and embedding.merged):
        raise HFExportError("the model's LoRA adapters are merged into its weights, so it has no separate base: "
                            "unmerge them first, or export the merged model as a plain HF model")
    weights: dict[str, torch.Tensor] = {}
    ranks: dict[str, int] = {}  # HF module name within a block (target_modules' entry) -> its rank
    for name, module in adapted.items():
        for adapter in module.lora.values():
            if adapter.A.shape[0] != lora_config.r or module.scale != lora_config.scale:
                raise ValueError(f"{name} has adapters of rank {adapter.A.shape[0]} and scale {module.scale:g}, "
                                 f"lora_config r={lora_config.r}, alpha/r={lora_config.scale:g}: pass the LoRAConfig "
                                 f"the model was adapted with")
        for hf, lo, n in _hf_rows(arch, name, module, config):
            overlapping = [a for a in module.lora.values() if a.start < lo + n and lo < a.start + a.size]
            if not overlapping:  # e.g. Llama k_proj when only q and v are adapted
                continue
            r = lora_config.r
            terms = [(a, A_, B_) for a in overlapping for A_, B_ in a.terms()]  # PiSSA / OLoRA: B A and -B0 A0
            A = torch.cat([A_.float() for _, A_, _ in terms]).cpu()  # (m r, in) for m terms; own memory
            B = torch.zeros(n, r * len(terms))  # (n, m r): term j's block in columns j r .. j r + r - 1
            for j, (a, _, B_) in enumerate(terms):
                first, last = max(a.start, lo), min(a.start + a.size, lo + n)  # overlapping rows of the Linear
                B[first - lo:last - lo, j * r:(j + 1) * r] = B_[first - a.start:last - a.start].float().cpu()
            weights[f"{PREFIX}{hf}.lora_A.weight"], weights[f"{PREFIX}{hf}.lora_B.weight"] = A, B
            if lora_config.dora:  # the module's row magnitudes: the adapters', else the rows' own norms (m / n = 1)
                magnitude = torch.linalg.vector_norm(module.frozen_weight()[lo:lo + n].float(), dim=1).cpu()
                for a in overlapping:
                    first, last = max(a.start, lo), min(a.start + a.size, lo + n)
                    magnitude[first - lo:last - lo] = a.magnitude[first - a.start:last - a.start].float().cpu()
                weights[f"{PREFIX}{hf}.lora_magnitude_vector"] = magnitude
            ranks[hf.split(".", 3)[-1]] = A.shape[0]  # "attn.c_attn", "self_attn.q_proj", "lm_head"
    if embedding is not None:  # peft's Embedding layer: lora_embedding_A (r, V), lora_embedding_B (C, r)
        weights.update(_embedding_adapter(embedding, arch, isinstance(model.lm_head, TiedLoRAHead), lora_config))
        ranks[EMBEDDING[arch].rsplit(".", 1)[-1]] = lora_config.r
        if isinstance(model.lm_head, TiedLoRAHead):
            ranks["lm_head"] = lora_config.r
    rows = _row_modules(model, arch)
    if modules_to_save or rows:  # the trained head under its HF name (the converter's mapping), e.g. score.weight
        hf_weights = hf_files(model, tokenizer=None)["model.safetensors"]
        heads = _trained_heads(hf_weights, modules_to_save)
        weights.update({PREFIX + name: tensor for name, tensor in heads.items()})
        for module in rows:  # a tied lm_head (not in the HF weights) is the embedding; PEFT saves each module whole
            weights[f"{PREFIX}{module}.weight"] = hf_weights.get(f"{module}.weight",
                                                                 hf_weights[f"{EMBEDDING[arch]}.weight"]).clone()
        modules_to_save = (*modules_to_save, *(module.rsplit(".", 1)[-1] for module in rows))
    # Default r: the smallest rank (lmforge's r wherever a module holds one adapter); the others as patterns.
    default_r = min(ranks.values())
    rank_pattern = {m: k for m, k in ranks.items() if k != default_r}
    adapter_config = {
        "peft_type": "LORA",
        "task_type": task_type,
        "base_model_name_or_path": base_name_or_path,
        "r": default_r,
        "lora_alpha": _number(lora_config.plain_alpha * default_r / lora_config.r),
        "rank_pattern": rank_pattern,
        "alpha_pattern": {m: _number(lora_config.plain_alpha * k / lora_config.r) for m, k in rank_pattern.items()},
        "target_modules": sorted(ranks),
        "fan_in_fan_out": arch == "gpt2",  # GPT-2's Conv1D stores (in, out) weights
        "lora_dropout": lora_config.dropout,
        "bias": "none",
        "use_rslora": False,
        "use_dora": lora_config.dora,
        "modules_to_save": list(modules_to_save) or None,
        "inference_mode": True,
    }
    if (rows or embedding is not None) and config.tie_embeddings:  # one trained copy (of rows, or of the table's
        adapter_config["ensure_weight_tying"] = True  # adapter) serves the embedding and the tied head, as in lmforge
    return {CONFIG: adapter_config, WEIGHTS: weights}


def _embedding_adapter(embedding: LoRAEmbedding, arch: str, tied: bool,
                       lora_config: LoRAConfig) -> dict[str, torch.Tensor]:
    """The embedding's adapter as peft names it; with a tied head, also the head's, which reads the same table:
    x E'^T = x E^T + s (x B) A, a Linear adapter with lora_A = B^T (r, C) and lora_B = A^T (V, r) (what peft's
    ensure_weight_tying ties to the embedding's)."""
    adapter = embedding.lora["emb"]
    if adapter.A.shape[0] != lora_config.r or embedding.scale != lora_config.scale:
        raise ValueError(f"tok_emb has an adapter of rank {adapter.A.shape[0]} and scale {embedding.scale:g}, "
                         f"lora_config r={lora_config.r}, alpha/r={lora_config.scale:g}: pass the LoRAConfig the "
                         f"model was adapted with")
    A, B = adapter.A.detach().float().cpu(), adapter.B.detach().float().cpu()
    out = {f"{PREFIX}{EMBEDDING[arch]}.lora_embedding_A": A.clone(), f"{PREFIX}{EMBEDDING[arch]}.lora_embedding_B":
           B.clone()}
    if tied:
        out.update({f"{PREFIX}lm_head.lora_A.weight": B.t().contiguous(), f"{PREFIX}lm_head.lora_B.weight":
                    A.t().contiguous()})
    return out


def _row_modules(model: torch.nn.Module, arch: str) -> tuple[str, ...]:
    """The HF modules with rows of tokens added to the base's tokenizer, which the run trained whole
    (lora.train_added_rows): the embedding, and lm_head for a language model; () when it added none."""
    if not added_row_weights(model):
        return ()
    return (EMBEDDING[arch], "lm_head") if model.config.head == "lm" else (EMBEDDING[arch],)


def _trained_heads(hf_weights: dict[str, torch.Tensor], modules: tuple[str, ...]) -> dict[str, torch.Tensor]:
    """The tensors of HF weights that belong to `modules` (TASKS' modules_to_save): {"score.weight": ...}."""
    return {name: tensor for name, tensor in hf_weights.items() if name.split(".", 1)[0] in modules}


def base_files(model: torch.nn.Module, tokenizer: Any) -> dict[str, Any]:
    """hf_files of the base that the adapter of peft_adapter_files applies to: the adapted model's frozen weights.
    A head trained whole (a classifier's score) is zeros here, its trained values being in the adapter: the base
    alone scores every label 0, and only base + adapter is the model the run trained."""
    files = hf_files(model, tokenizer)
    for tensor in _trained_heads(files["model.safetensors"], TASKS[model.config.head][1]).values():
        tensor.zero_()
    first = model.added_rows_from
    arch = "gpt2" if converter_for_model(model.config) is hf_gpt2 else "llama"
    for module in _row_modules(model, arch):  # added tokens' rows as they started (the mean of the base's rows)
        tensor = files["model.safetensors"].get(f"{module}.weight")
        if tensor is not None:
            tensor[first:] = tensor[:first].mean(dim=0)
    return files


def export_peft(model: torch.nn.Module, lora_config: LoRAConfig, out_dir: str | Path,
                base_name_or_path: Optional[str] = None, *, force: bool = False) -> Path:
    """Write the model's adapters as a PEFT adapter directory (see peft_adapter_files); returns out_dir.

    The directory is written next to out_dir and put in place whole by lmforge.files.atomic_dir. An existing
    non-empty out_dir is replaced only with force and only if it is an earlier export_peft (its safetensors
    metadata names lmforge_version); anything else raises HFExportError.
    """
    out_dir = Path(out_dir)
    check_output(out_dir, force=force, ours=_is_peft_export, what="a PEFT adapter written by lmforge",
                 error=HFExportError)
    files = peft_adapter_files(model, lora_config, base_name_or_path)
    with atomic_dir(out_dir) as tmp:
        atomic_write_text(tmp / CONFIG, json.dumps(files[CONFIG], indent=2, ensure_ascii=False) + "\n")
        with atomic_path(tmp / WEIGHTS) as path:
            save_file(files[WEIGHTS], path, metadata={"format": "pt", "lmforge_version": __version__})
    return out_dir


def _is_peft_export(path: Path) -> bool:
    """Whether `path` holds an export of export_peft: its weights' metadata records the lmforge version."""
    try:
        with safe_open(path / WEIGHTS, "pt") as f:
            return "lmforge_version" in (f.metadata() or {})
    except Exception:  # missing, unreadable or not safetensors: not ours
        return False
