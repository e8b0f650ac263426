"""`lmforge import ADAPTER_DIR --base RUN --out OUT`: a Hugging Face PEFT LoRA adapter -> an lmforge LoRA checkpoint
on the lmforge model of its base (imported with `lmforge import HF_DIR`), which generate, eval, serve, export and
merge use as any LoRA run's. The inverse of peft_export:

    adapter_config.json             peft_type LORA, task_type CAUSAL_LM or SEQ_CLS (its head, score, saved whole as
                                    modules_to_save), r, lora_alpha, rank_pattern, alpha_pattern, use_rslora (scale
                                    alpha / sqrt(r)), lora_dropout, target_modules, use_dora
    adapter_model.safetensors       base_model.model.<HF module>.lora_A.weight (r, in) and .lora_B.weight (out, r),
                                    with DoRA .lora_magnitude_vector (out,) (adapter_model.bin, a pickle, is refused
                                    unopened)

PEFT adds, per HF module, s * x A^T B^T with s = lora_alpha / r (or / sqrt(r)). An HF module computes rows
[lo, lo + n) of an lmforge Linear (peft_export.HF_MODULES: Llama's q_proj, k_proj and v_proj are slices of attn.qkv,
gate_proj and up_proj the halves of mlp.fc; GPT-2's c_attn is all of attn.qkv). Each lmforge adapter (a target's
slice of a Linear: q, k, v, o, mlp, head) gets, from every HF module whose rows it covers, its A stacked and its B
rows in a block of their own, scaled by s / s' (s' = lmforge's alpha / r):

    s' B' A' = sum_m  s_m B_m[rows] A_m                 GPT-2 c_attn -> q, k, v: each A' = A, B' = its rows of B
                                                        Llama gate_proj, up_proj -> mlp.fc: A' = [A_g; A_u],
                                                        B' = [[B_g, 0], [0, B_u]]

lmforge has one rank for every adapter: the largest this needs; an adapter needing less, and the Linears the target
adapts that PEFT left alone (a layer outside layers_to_transform, down_proj when only gate and up were adapted), get
B's columns zero and A's rows random: they add nothing, and further training can use them as a fresh adapter's.
lmforge's alpha keeps the adapter's own scale (s' = s of the config's r and lora_alpha), so training goes on as it
was going. DoRA's magnitudes go to the same rows (DoRA normalises each row alone, so slices and fused Linears do not
change it); rows PEFT left alone keep their own norm, which leaves them as they are. A CAUSAL_LM adapter trained
with tokens added to its tokenizer (resize_token_embeddings, and embed_tokens / wte and lm_head in modules_to_save)
comes with the tokenizer saved beside it: its tokens past the base's become added tokens of the base's tokenizer
(checked to encode alike) and the run's rows the embedding and head PEFT trained (lora.train_added_rows trains them
on). An adapter of the embedding (lora_embedding_A (r, V), lora_embedding_B (C, r)) becomes lmforge's emb target (A's
rows past its rank 0, B's random: nothing added); on a tied base only with the head's tied adapter beside it
(ensure_weight_tying), since lmforge's tied head reads the adapted table. Adapters PEFT computes otherwise (biases,
DoRA on the embedding, other modules, a whole embedding trained without new tokens) are refused.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
import tempfile
from pathlib import Path
from typing import Any, Optional

import torch
from safetensors import SafetensorError, safe_open

from lmforge.checkpoint import (load_body_weights, load_for_inference, read_run_config, save_checkpoint,
                                verified_checkpoint)
from lmforge.config import LoRAConfig, RunConfig, TrainConfig, to_dict
from lmforge.errors import ConfigError, LmforgeError
from lmforge.interop import hf_gpt2
from lmforge.interop.hf_export import HFExportError, converter_for_model
from lmforge.interop.hf_import import check_new_run
from lmforge.interop.peft_export import CONFIG, EMBEDDING, HF_BLOCK, HF_MODULES, PREFIX, WEIGHTS, _row_sizes
from lmforge.lora import LoRALinear, apply_lora, base_fingerprint, lora_plan
from lmforge.model import GPT
from lmforge.tokenizer import Tokenizer

PICKLE = "adapter_model.bin"
ROW_MODULES = ("wte", "embed_tokens", "lm_head")  # a CAUSAL_LM adapter's modules_to_save: rows of added tokens
HEADS = ("score", "classifier")  # the names PEFT saves a SEQ_CLS head under (GPT-2 and Llama: score)
# lmforge Linear (within a block) -> the target whose adapters it holds (attn.qkv: by slice, q / k / v)
TARGET_OF = {"attn.proj": "o", "mlp.fc": "mlp", "mlp.proj": "mlp", "lm_head": "head"}


class PEFTImportError(LmforgeError):
    """A PEFT adapter lmforge cannot read, or one that does not fit the base it was given."""


def is_peft_adapter(path: str | Path) -> bool:
    """Whether `path` is a directory holding a PEFT adapter's config."""
    return (Path(path) / CONFIG).is_file()


def import_peft(adapter_dir: str | Path, base: str | Path, run_dir: str | Path, quantize: Optional[str] = None,
                double_quant: bool = False) -> Path:
    """Write the PEFT LoRA adapter in `adapter_dir`, applied to the lmforge checkpoint `base` (a run or checkpoint
    directory of a plain model: its HF model imported), as RUN_DIR/checkpoints/step-00000000; return that path.
    `quantize` nf4 (and `double_quant`): an adapter trained with QLoRA, on the base as bitsandbytes loads it in 4 bits
    (BitsAndBytesConfig nf4; bnb_4bit_use_double_quant): the run's base is quantized so (lora.quantize).
    PEFTImportError (one line naming the cause) for an adapter lmforge cannot express or that does not fit the base;
    CheckpointError for a run directory holding checkpoints already (hf_import.check_new_run). Nothing is written then."""
    adapter_dir, run_dir = Path(adapter_dir), Path(run_dir)
    check_new_run(run_dir)
    settings = _adapter_config(adapter_dir)
    tensors = _adapter_tensors(adapter_dir)
    return import_lora(settings, tensors, base, run_dir, adapter_dir / WEIGHTS,
                       {"path": str(adapter_dir.resolve()), "format": "peft",
                        "base_model_name_or_path": settings.get("base_model_name_or_path")},
                       quantize=quantize, double_quant=double_quant)


def import_lora(settings: dict[str, Any], tensors: dict[str, torch.Tensor], base: str | Path, run_dir: Path,
                source: Path, imported_from: dict[str, Any], quantize: Optional[str] = None,
                double_quant: bool = False) -> Path:
    """The LoRA checkpoint RUN_DIR/checkpoints/step-00000000 of an adapter in PEFT's terms (`settings`: r,
    lora_alpha, alpha_pattern, use_rslora, lora_dropout; `tensors`: PEFT's names, float32) on the lmforge checkpoint
    `base`, its base in 4 bits with `quantize` (lora.quantize, lora.double_quant); `source` names the tensors' file in
    messages, `imported_from` is recorded in the checkpoint's state."""
    check_new_run(run_dir)
    base_ckpt, manifest = verified_checkpoint(base)
    base_config = read_run_config(base_ckpt)
    if base_config.lora is not None:
        raise PEFTImportError(f"--base {base} is a LoRA run itself; merge it first (lmforge merge) and give the merged "
                              "model as --base")
    head = _classifier_head(settings, tensors, source)
    rows = _row_weights(settings, tensors, source)
    tokenizer = base_ckpt / "tokenizer.json" if "tokenizer.json" in manifest["files"] else None
    if head is None:
        model, _, _ = load_for_inference(base_ckpt, "cpu", manifest)
    else:  # a SEQ_CLS adapter: the base's body under a classifier of the adapter's labels, its trained head
        if base_config.model.head != "lm":
            raise PEFTImportError(f"--base {base} is a {base_config.model.head} model; a SEQ_CLS adapter's base is the "
                                  "language model whose body its classifier reads: give that one")
        model = GPT.empty(dataclasses.replace(base_config.model, head="classify", num_labels=head.shape[0]))
        load_body_weights(model, base_ckpt)  # every weight but the classifier, set below
        if head.shape[1] != model.config.n_embd:
            raise PEFTImportError(f"{source} holds a score head over {head.shape[1]} features, the base's hidden state "
                                  f"has {model.config.n_embd}: the adapter was trained on another model than --base")
        with torch.no_grad():
            model.classifier.weight.copy_(head)
        model.eval()
    try:
        arch = "gpt2" if converter_for_model(model.config) is hf_gpt2 else "llama"
    except HFExportError as e:
        raise PEFTImportError(f"--base {base} has no Hugging Face equivalent for a PEFT adapter to apply to: {e}") \
            from None
    if rows:  # tokens added to the base's tokenizer: the model grows their rows, the tokenizer its own
        tokenizer = _grown(model, rows, tokenizer, source, base)
    embedding = _embedding_adapter(settings, tensors, model, arch, source)
    contributions, magnitudes = _contributions(settings, tensors, model, arch, source, embedding is not None)
    if embedding is not None:
        contributions[("tok_emb", "emb")] = [embedding]
    lora, adapters = _lmforge_adapters(settings, contributions, model)
    try:
        lora = dataclasses.replace(lora, quantize=quantize, double_quant=double_quant)
    except ConfigError as e:
        raise PEFTImportError(str(e)) from None
    fingerprint = base_fingerprint(model)
    adapted = apply_lora(model, lora)  # DoRA: every magnitude starts at its row's norm (rows PEFT left alone keep it)
    with torch.no_grad():
        for (linear, target), (A, B) in adapters.items():
            module: LoRALinear = adapted.get_submodule(linear)
            module.lora[target].A.copy_(A)
            module.lora[target].B.copy_(B)
            for offset, magnitude in magnitudes.get((linear, target), []):
                module.lora[target].magnitude[offset:offset + magnitude.shape[0]] = magnitude
        for name, weight in rows.items():  # the embedding and head PEFT trained whole, added rows and all
            adapted.get_parameter(name).copy_(weight)
    config = RunConfig(model=model.config, lora=lora,
                       train=TrainConfig(run_dir=str(run_dir), init_from=str(base_ckpt.resolve())))
    state = {"tokens_seen": 0, "lora": to_dict(lora), "base": {"path": str(base_ckpt.resolve()),
                                                               "fingerprint": fingerprint},
             "imported_from": imported_from}
    if not isinstance(tokenizer, Tokenizer):
        return save_checkpoint(run_dir, 0, adapted, None, config, state, tokenizer)
    with tempfile.TemporaryDirectory(prefix="lmforge-tokenizer-") as tmp:  # the grown tokenizer, copied in
        tokenizer.save(Path(tmp) / "tokenizer.json")
        return save_checkpoint(run_dir, 0, adapted, None, config, state, Path(tmp) / "tokenizer.json")


def _adapter_config(adapter_dir: Path) -> dict[str, Any]:
    """adapter_config.json, checked for what lmforge computes as PEFT does."""
    path = adapter_dir / CONFIG
    if not adapter_dir.is_dir():
        raise PEFTImportError(f"{adapter_dir} is not a directory: give the directory a PEFT adapter was saved to "
                              f"(with {CONFIG} and {WEIGHTS})")
    try:
        settings = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise PEFTImportError(f"{adapter_dir} has no {CONFIG}: give the directory a PEFT adapter was saved to") \
            from None
    except (OSError, UnicodeDecodeError, ValueError, RecursionError) as e:
        raise PEFTImportError(f"{path} is not readable JSON ({type(e).__name__}): save the adapter again") from None
    if not isinstance(settings, dict):
        raise PEFTImportError(f"{path} is not a JSON object: save the adapter again")
    unsupported = []
    if settings.get("peft_type") != "LORA":
        unsupported.append(f"peft_type {settings.get('peft_type')!r} (lmforge reads LORA)")
    if settings.get("task_type") not in (None, "CAUSAL_LM", "SEQ_CLS"):
        unsupported.append(f"task_type {settings.get('task_type')!r} (lmforge reads CAUSAL_LM and SEQ_CLS adapters)")
    if settings.get("bias", "none") != "none" or settings.get("lora_bias"):
        unsupported.append(f"bias {settings.get('bias')!r} (trained biases beside the adapters)")
    heads = set(HEADS) if settings.get("task_type") == "SEQ_CLS" else set(ROW_MODULES)  # trained whole
    if {str(m).rpartition(".")[2] for m in settings.get("modules_to_save") or ()} - heads:  # by module name
        unsupported.append(f"modules_to_save {settings['modules_to_save']} (whole modules trained beside the "
                           "adapters)")
    if settings.get("layer_replication"):
        unsupported.append("layer_replication")
    if unsupported:
        raise PEFTImportError(f"{path} has {'; '.join(unsupported)}, which lmforge's LoRA does not compute")
    for key in ("r", "lora_alpha"):
        value = settings.get(key)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < math.inf:
            raise PEFTImportError(f"{path} has {key}={value!r}: a positive number is needed")
    dropout = settings.get("lora_dropout") or 0.0
    if isinstance(dropout, bool) or not isinstance(dropout, (int, float)) or not 0 <= dropout < 1:
        raise PEFTImportError(f"{path} has lora_dropout={dropout!r}: a probability in [0, 1) is needed")
    patterns = settings.get("alpha_pattern") or {}
    if not isinstance(patterns, dict):
        raise PEFTImportError(f"{path} has alpha_pattern {patterns!r}: an object of module patterns and alphas is "
                              "needed")
    for key, value in patterns.items():
        try:
            re.compile(key)
        except (re.error, TypeError):
            raise PEFTImportError(f"{path} has alpha_pattern key {key!r}, which is not a regular expression of "
                                  "module names") from None
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < math.inf:
            raise PEFTImportError(f"{path} has alpha_pattern {key!r}: {value!r}: a positive number is needed")
    return settings


def _adapter_tensors(adapter_dir: Path) -> dict[str, torch.Tensor]:
    path = adapter_dir / WEIGHTS
    if not path.is_file():
        found = " (it has adapter_model.bin, a pickle, which lmforge never opens: save the adapter with " \
                "safe_serialization=True, PEFT's default)" if (adapter_dir / PICKLE).exists() else ""
        raise PEFTImportError(f"{adapter_dir} has no {WEIGHTS}{found}")
    try:
        with safe_open(path, "pt") as f:
            return {name: f.get_tensor(name).float() for name in f.keys()}
    except (SafetensorError, OSError) as e:
        raise PEFTImportError(f"{path} is not a readable safetensors file ({e}); save the adapter again") from None


def _classifier_head(settings: dict[str, Any], tensors: dict[str, torch.Tensor], source: Path
                     ) -> torch.Tensor | None:
    """A SEQ_CLS adapter's trained head, (num_labels, C), taken out of `tensors`; None for a CAUSAL_LM adapter."""
    if settings.get("task_type") != "SEQ_CLS":
        return None
    found = [key for key in tensors if key.removeprefix(PREFIX).split(".", 1)[0] in HEADS
             and key.endswith(".weight") and ".lora_" not in key]
    if len(found) != 1 or tensors[found[0]].dim() != 2:
        raise PEFTImportError(f"{source} is a SEQ_CLS adapter without its trained head ({' or '.join(HEADS)} weight, "
                              "saved as modules_to_save); save the adapter with the head")
    return tensors.pop(found[0])


def _row_weights(settings: dict[str, Any], tensors: dict[str, torch.Tensor], source: Path
                 ) -> dict[str, torch.Tensor]:
    """{"tok_emb.weight": (V', C), "lm_head.weight": (V', C)} of a CAUSAL_LM adapter whose modules_to_save trained
    the embedding and head whole (peft's way to learn tokens added to the tokenizer), taken out of `tensors`; {}
    for one without. PEFTImportError when one is named and missing, or the two differ in rows."""
    named = {str(m).rpartition(".")[2] for m in settings.get("modules_to_save") or ()} & set(ROW_MODULES)
    if not named or settings.get("task_type") == "SEQ_CLS":
        return {}
    found: dict[str, torch.Tensor] = {}
    for key in sorted(k for k in tensors if ".lora_" not in k and k.endswith(".weight")):
        # peft writes the trained copy as M.weight (and M.modules_to_save.weight), the module it replaced (M resized)
        # as M.original_module.weight when the vocabulary grew
        path, _, kind = key.removeprefix(PREFIX)[:-len(".weight")].rpartition(".")
        module, copy = (path.rpartition(".")[2], kind) if kind in ("modules_to_save", "original_module") else (kind, "")
        if module in ROW_MODULES:
            weight = tensors.pop(key)
            if copy != "original_module":
                found["lm_head.weight" if module == "lm_head" else "tok_emb.weight"] = weight
    if "tok_emb.weight" not in found or len({t.shape for t in found.values()}) != 1:
        raise PEFTImportError(f"{source} names {sorted(named)} in modules_to_save but holds "
                              f"{ {k: tuple(v.shape) for k, v in found.items()} }: the embedding, and the head when "
                              "named, of one vocabulary are needed; save the adapter again")
    return found


def _grown(model: GPT, rows: dict[str, torch.Tensor], tokenizer: Any, source: Path, base: str | Path) -> Tokenizer:
    """The base's Tokenizer with the tokens the adapter's tokenizer (tokenizer.json beside `source`) added, and
    `model` resized to the adapter's rows (GPT.resize_vocabulary); PEFTImportError when there are no new rows (the
    whole embedding trained: merge it in peft and import the model), no tokenizer, or one that is not the base's
    with tokens added after its own."""
    from tokenizers import Tokenizer as HFTokenizer

    size, weight = model.config.vocab_size, rows["tok_emb.weight"]
    if weight.shape[0] <= size or weight.shape[1] != model.config.n_embd:
        raise PEFTImportError(f"{source} trains the embedding whole ({tuple(weight.shape)}, the base's is "
                              f"({size}, {model.config.n_embd})) without adding tokens, which lmforge's LoRA does not: "
                              "merge the adapter in peft (merge_and_unload) and import the merged model")
    if "lm_head.weight" in rows and model.config.tie_embeddings and not torch.equal(rows["lm_head.weight"], weight):
        raise PEFTImportError(f"{source} holds an embedding and a head that differ, and --base {base} ties them")
    theirs_path = source.parent / "tokenizer.json"
    if tokenizer is None or not theirs_path.is_file():
        raise PEFTImportError(f"{source} adds {weight.shape[0] - size} rows to the embedding, and the tokens they "
                              f"stand for are in the tokenizer saved with the adapter: save it there too "
                              f"(tokenizer.save_pretrained(ADAPTER_DIR))")
    base_tok = Tokenizer.load(tokenizer)
    try:
        theirs = HFTokenizer.from_file(str(theirs_path))
    except Exception as e:  # the Rust library raises plain Exceptions
        raise PEFTImportError(f"{theirs_path} cannot be loaded ({e})") from None
    names = [theirs.id_to_token(i) for i in range(base_tok.vocab_size, theirs.get_vocab_size(with_added_tokens=True))]
    flags = theirs.get_added_tokens_decoder()  # add_special_tokens' ones (chat markers): decode drops them
    special = [n for i, n in enumerate(names, base_tok.vocab_size) if i in flags and flags[i].special]
    try:
        grown = base_tok.with_added_tokens(names, special)
    except LmforgeError as e:
        raise PEFTImportError(f"{theirs_path}'s tokens past the base's do not make added tokens: {e}") from None
    probes = [*names, " ".join(names), "".join(names) + " Hello, world! \u00bfQu\u00e9 tal? 1234"]
    if grown.vocab_size > weight.shape[0] or any(
            grown.encode(t) != theirs.encode(t, add_special_tokens=False).ids for t in probes):
        raise PEFTImportError(f"{theirs_path} is not --base {base}'s tokenizer with tokens added after its own: the "
                              "adapter was trained on another tokenizer")
    model.resize_vocabulary(weight.shape[0])
    return grown


def _scale(settings: dict[str, Any], module: str, rank: int) -> float:
    r"""PEFT's scale of `module` (its full name): its lora_alpha over its rank, or over sqrt(rank) with use_rslora;
    alpha_pattern's first key that matches the name's end (PEFT's rule: the regex (.*\.)?KEY$) gives its alpha."""
    alpha = settings["lora_alpha"]
    for key, value in (settings.get("alpha_pattern") or {}).items():
        if re.match(rf"(.*\.)?{key}$", module):
            alpha = value
            break
    return alpha / (math.sqrt(rank) if settings.get("use_rslora") else rank)


def _embedding_adapter(settings: dict[str, Any], tensors: dict[str, torch.Tensor], model: Any, arch: str,
                       source: Path) -> tuple[torch.Tensor, torch.Tensor, int] | None:
    """(A (r_m, V), s_m B (C, r_m), 0) of the embedding's adapter (peft's lora_embedding_A / _B), taken out of
    `tensors` with a saved copy of the embedding's own weight (checked to be the base's); None without one. On a
    tied base the head must carry the same adapter (peft's ensure_weight_tying: lora_A = B^T, lora_B = A^T), which
    is taken out too: lmforge adapts a tied table on both sides."""
    module = EMBEDDING[arch]
    keys = {part: f"{PREFIX}{module}.lora_embedding_{part}" for part in "AB"}
    if not any(key in tensors for key in keys.values()):
        return None
    if not all(key in tensors for key in keys.values()):
        raise PEFTImportError(f"{source} has one of {module}'s lora_embedding_A / lora_embedding_B without the "
                              "other; save the adapter again")
    if settings.get("use_dora"):
        raise PEFTImportError(f"{source} is a DoRA adapter of {module}, which lmforge's embedding adapters (plain "
                              "LoRA) do not compute")
    A, B = tensors.pop(keys["A"]), tensors.pop(keys["B"])
    V, C = model.config.vocab_size, model.config.n_embd
    if A.dim() != 2 or B.dim() != 2 or A.shape[1] != V or B.shape != (C, A.shape[0]):
        raise PEFTImportError(f"{module}'s adapter has lora_embedding_A {tuple(A.shape)} and lora_embedding_B "
                              f"{tuple(B.shape)}, but the base's embedding is ({V}, {C}): the adapter was trained on "
                              f"another model than --base")
    tied = model.config.tie_embeddings and model.config.head == "lm"
    for holder in (module, "lm_head") if tied else (module,):  # peft saves a targeted embedding's own weight too
        own = tensors.pop(f"{PREFIX}{holder}.base_layer.weight", None)
        if own is not None and (own.shape != (V, C) or not torch.equal(own, model.tok_emb.weight.detach().float())):
            raise PEFTImportError(f"{source} holds {holder}'s own weight, which differs from the base's embedding: "
                                  "the adapter was trained on another model than --base")
    s = _scale(settings, module, A.shape[0])
    if tied:
        head = {part: tensors.pop(f"{PREFIX}lm_head.lora_{part}.weight", None) for part in "AB"}
        if head["A"] is None or head["B"] is None or not torch.allclose(
                _scale(settings, "lm_head", head["A"].shape[0]) * head["B"] @ head["A"], s * (B @ A).t(),
                rtol=1e-5, atol=1e-6):
            raise PEFTImportError(f"{source} adapts {module} of a model whose head is tied to it, without the same "
                                  "adapter on lm_head (peft's ensure_weight_tying), so peft's head reads the table "
                                  "unadapted; lmforge adapts a tied table on both sides: train the adapter with "
                                  "ensure_weight_tying=True, or leave the embedding out")
    return A, s * B, 0


def _contributions(settings: dict[str, Any], tensors: dict[str, torch.Tensor], model: Any, arch: str,
                   source: Path, embedding: bool = False
                   ) -> tuple[dict[tuple[str, str], list[tuple[torch.Tensor, torch.Tensor, int]]],
                              dict[tuple[str, str], list[tuple[int, torch.Tensor]]]]:
    """{(lmforge Linear, target): [(A (r_m, in), s_m B_m (n, r_m), first row of B_m within the target's slice)]} of
    every adapted HF module, checked against the model's shapes; and with DoRA (use_dora) the modules' magnitudes,
    {(lmforge Linear, target): [(first row within the target's slice, m (n,))]}."""
    dora = bool(settings.get("use_dora"))
    config = model.config
    where: dict[str, tuple[str, str, int]] = {}  # HF module -> (lmforge Linear, target, row offset in the slice)
    for i in range(config.n_layer):
        for linear, modules in HF_MODULES[arch].items():
            out = model.get_submodule(f"blocks.{i}.{linear}").out_features
            lo = 0
            for hf, n in zip(modules, _row_sizes(arch, linear, config, out)):
                if linear == "attn.qkv" and arch == "llama":
                    target = hf.rsplit(".", 1)[-1][0]  # self_attn.q_proj -> q
                    where[HF_BLOCK[arch].format(i) + hf] = (f"blocks.{i}.{linear}", target, 0)
                elif linear == "attn.qkv":  # GPT-2's c_attn covers q, k and v: split by row
                    where[HF_BLOCK[arch].format(i) + hf] = (f"blocks.{i}.{linear}", "qkv", 0)
                else:
                    where[HF_BLOCK[arch].format(i) + hf] = (f"blocks.{i}.{linear}", TARGET_OF[linear], lo)
                lo += n
    if not config.tie_embeddings and config.head != "classify":
        where["lm_head"] = ("lm_head", "head", 0)
    names = {}
    for key in list(tensors):
        module, _, part = key.removeprefix(PREFIX).rpartition(".base_layer.")
        if key.startswith(PREFIX) and module in where and part in ("weight", "bias"):  # PEFT saves a targeted head's
            own = model.get_submodule(where[module][0]).get_parameter(part)  # own weights too: they must be the base's
            if own.shape != tensors[key].shape or not torch.equal(own.detach().float(), tensors[key]):
                raise PEFTImportError(f"{source} holds {module}'s own {part}, which differs from the "
                                      "base's: the adapter was trained on another model than --base")
            del tensors[key]
    for key in tensors:
        module, _, part = key.removeprefix(PREFIX).rpartition(".lora_")
        parts = ("A.weight", "B.weight") + (("magnitude_vector",) if dora else ())
        if not key.startswith(PREFIX) or part not in parts or module not in where:
            raise PEFTImportError(f"{source} holds {key}, which lmforge's {arch} model has no adapter "
                                  f"for (it adapts {', '.join(sorted({m.split('.', 3)[-1] for m in where}))})")
        names.setdefault(module, {})[part[0].upper()] = tensors[key]
    contributions: dict[tuple[str, str], list] = {}
    magnitudes: dict[tuple[str, str], list] = {}
    q, kv = config.n_head * config.head_dim, config.n_kv_head * config.head_dim
    for module, pair in sorted(names.items()):
        if not {"A", "B"} <= set(pair):
            raise PEFTImportError(f"{source} has lora_{'A' if 'B' in pair else 'B'} of {module} "
                                  "without its other half; save the adapter again")
        if dora and "M" not in pair:
            raise PEFTImportError(f"{source} is a DoRA adapter (use_dora) without {module}'s lora_magnitude_vector; "
                                  "save the adapter again")
        A, B = pair["A"], pair["B"]
        linear, target, offset = where[module]
        layer = model.get_submodule(linear)
        rows = B.shape[0]
        expected = {"qkv": layer.out_features, "q": q, "k": kv, "v": kv}.get(target)
        if target == "mlp" and linear.endswith("mlp.fc") and arch == "llama":
            expected = layer.out_features // 2
        expected = layer.out_features if expected is None else expected
        if A.dim() == 2 and B.dim() == 2 and A.shape[1] == expected and B.shape[0] == layer.in_features \
                and A.shape[1] != layer.in_features:
            raise PEFTImportError(f"{module}'s adapter is transposed, A {tuple(A.shape)} and B {tuple(B.shape)}, where "
                                  f"PEFT and llama.cpp read A (r, {layer.in_features}) and B ({expected}, r), as "
                                  "llama.cpp's converter writes GPT-2's Conv1D adapters; import the PEFT adapter "
                                  "directory itself")
        if A.dim() != 2 or B.dim() != 2 or A.shape[1] != layer.in_features or B.shape[1] != A.shape[0] \
                or rows != expected:
            raise PEFTImportError(f"{module}'s adapter has A {tuple(A.shape)} and B {tuple(B.shape)}, but the base's "
                                  f"{linear} takes {layer.in_features} inputs to {expected} outputs there: the "
                                  "adapter was trained on another model than --base")
        M = pair.get("M")
        if M is not None and tuple(M.shape) != (rows,):
            raise PEFTImportError(f"{module}'s lora_magnitude_vector has shape {tuple(M.shape)}, its adapter {rows} "
                                  "rows: the adapter was trained on another model than --base")
        s = _scale(settings, module, A.shape[0])
        if target == "qkv":  # one PEFT adapter over q, k and v: each slice its rows of B
            for name, lo, n in (("q", 0, q), ("k", q, kv), ("v", q + kv, kv)):
                contributions.setdefault((linear, name), []).append((A, s * B[lo:lo + n], 0))
                if M is not None:
                    magnitudes.setdefault((linear, name), []).append((0, M[lo:lo + n]))
        else:
            contributions.setdefault((linear, target), []).append((A, s * B, offset))
            if M is not None:
                magnitudes.setdefault((linear, target), []).append((offset, M))
    if not contributions and not embedding:
        raise PEFTImportError(f"{source} holds no adapters (no lora_A / lora_B tensors)")
    return contributions, magnitudes


def _lmforge_adapters(settings: dict[str, Any], contributions: dict, model: Any
                      ) -> tuple[LoRAConfig, dict[tuple[str, str], tuple[torch.Tensor, torch.Tensor]]]:
    """lmforge's LoRAConfig (the targets touched, one rank for all: the largest needed) and each adapter's (A, B),
    B divided by lmforge's scale; every other adapter the targets make: zero B, random A."""
    r = max(sum(A.shape[0] for A, _, _ in parts) for parts in contributions.values())
    default_r = settings["r"]
    own_scale = settings["lora_alpha"] / (math.sqrt(default_r) if settings.get("use_rslora") else default_r)
    targets = sorted({target for _, target in contributions})
    lora = LoRAConfig(r=r, alpha=own_scale * r, dropout=float(settings.get("lora_dropout") or 0.0),
                      targets=targets, dora=bool(settings.get("use_dora")))
    generator = torch.Generator().manual_seed(0)
    adapters = {}
    if "emb" in targets:  # peft's embedding adapter: A (r, V), B (C, r); past its rank, A's rows 0, B's random
        (A_m, sB_m, _), = contributions[("tok_emb", "emb")]
        k = A_m.shape[0]
        A, B = torch.zeros(r, A_m.shape[1]), torch.randn(sB_m.shape[0], r, generator=generator)
        A[:k], B[:, :k] = A_m, sB_m / lora.scale
        adapters[("tok_emb", "emb")] = (A, B)
    for linear, slices in lora_plan(model, lora).items():
        layer = model.get_submodule(linear)
        for target, (_, size) in slices.items():
            A = torch.empty(r, layer.in_features)
            torch.nn.init.kaiming_uniform_(A, a=math.sqrt(5), generator=generator)  # as a new adapter's A
            B = torch.zeros(size, r)
            column = 0
            for A_m, sB_m, offset in contributions.get((linear, target), []):
                k = A_m.shape[0]
                A[column:column + k] = A_m
                B[offset:offset + sB_m.shape[0], column:column + k] = sB_m / lora.scale
                column += k
            adapters[(linear, target)] = (A, B)
    return lora, adapters
