"""`lmforge import MODEL.gguf`: a GGUF file (llama.cpp's format) -> an lmforge checkpoint, to evaluate, generate from
or fine-tune (--train.init_from) a model that was shared as GGUF.

The inverse of gguf_export, for the architectures it writes: gpt2, llama (a Llama-style model: RoPE over the whole
head, RMSNorm, SwiGLU, grouped-query heads, biases everywhere or nowhere), qwen2 (the same with biases on q, k and
v only: Qwen2, Qwen2.5) and qwen3 (no biases, each head's queries and keys RMS-normalised: Qwen3); heads of their own
width (attention.key_length) too. The file is read by gguf_header (its header by struct, tensors memory-mapped) and
quantized tensors (q8_0, q4_k, ...) dequantized to float32 by the `gguf` package's quantizers (llama.cpp's own
Python code): the model computes what the file holds, in lmforge's fp32. Each q and k head's rows go back from llama.cpp's order (neighbours rotate together) to
lmforge's (dimension i with i + hd/2). A GPT-2 file computes GELU by its tanh approximation in llama.cpp, so the
model gets activation gelu_tanh. A Llama 3.1 / 3.2 file's rope_freqs.weight (what llama.cpp divides each RoPE
frequency by) becomes model.rope_scaling llama3 with the settings that make those factors (_llama3_scaling); a tensor
the model has no place for is refused rather than dropped.

Tokenizers: GGUF's byte-level BPE ("gpt2") with a pre-tokenizer rule lmforge knows (gguf_pretokenizers: GPT-2's,
Llama 3's, SmolLM's) becomes an lmforge tokenizer of kind hf (start token: the file's bos when it adds one to every
text); a char or byte tokenizer that lmforge exported (GGUF's "llama" model with lmforge's layout: three special
tokens, 256 byte tokens, then characters) becomes that tokenizer again; any other "llama" vocabulary (SentencePiece:
Llama 2, TinyLlama, Mistral) becomes a SentencePiece-style BPE of kind hf that cuts text as llama.cpp does (a space
before the first word when tokenizer.ggml.add_space_prefix says so, spaces as U+2581, <0xNN> bytes for characters
outside the vocabulary), with the file's merges or, where it has none, the merges its scores imply (llama.cpp merges
the pair that makes the best-scoring token first). Other pre-tokenizer rules and architectures are refused in one
line naming what is supported. The
file's tokenizer.chat_template (an instruct model's) comes along: `lmforge chat` and serve render conversations with
it (data.chat_template).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import torch

from lmforge.checkpoint import save_checkpoint
from lmforge.config import ModelConfig, RunConfig, TrainConfig
from lmforge.errors import LmforgeError
from lmforge.interop.gguf_export import RENAMED, RENAMED_GPT2, SPACE
from lmforge.interop.gguf_header import GGUFHeaderError, read_header, tensor_bytes
from lmforge.interop.gguf_pretokenizers import ADDS_BOS, RULES, known_rules, rule_for
from lmforge.interop.hf_import import check_new_run
from lmforge.model import GPT, llama3_frequencies
from lmforge.tokenizer import BYTE_OFFSET, HF_KIND, Tokenizer

SUPPORTED = ("gpt2, llama (RoPE, RMSNorm, SwiGLU, grouped-query attention), qwen2 (llama with q/k/v biases) and qwen3 "
             "(llama with each head's queries and keys RMS-normalised)")


class GGUFImportError(LmforgeError):
    """A GGUF file that cannot be imported."""


def import_gguf(path: str | Path, run_dir: str | Path) -> Path:
    """Write the model in the GGUF file `path` as RUN_DIR/checkpoints/step-00000000; return that path. Refuses a run
    directory that already holds checkpoints (nothing on disk is changed then)."""
    run_dir = Path(run_dir)
    check_new_run(run_dir)
    meta, tensors = read_gguf(path)
    arch = meta.get("general.architecture")
    if arch not in ("gpt2", "llama", "qwen2", "qwen3"):
        raise GGUFImportError(f"{path} holds a {arch!r} model; lmforge imports {SUPPORTED}")
    config = _model_config(meta, tensors, arch, path)
    tokenizer = _tokenizer(meta, path)
    chat_template = meta.get("tokenizer.chat_template")
    tokenizer.chat_template = chat_template if isinstance(chat_template, str) and chat_template else None
    model = GPT.empty(config)  # every weight comes from the file
    read = _ReadTensors(tensors)
    state = _state_dict(read, config, arch)
    if "rope_freqs.weight" in tensors and arch == "llama":  # read into model.rope_scaling by _model_config
        read["rope_freqs.weight"]
    unused = sorted(set(tensors) - read.read)
    if unused:  # a tensor the model has no place for would be dropped, and the model compute something else
        raise GGUFImportError(f"{path} holds tensors lmforge's {arch} model has no place for: "
                              f"{', '.join(unused[:5])}{' ...' if len(unused) > 5 else ''}")
    model.load_state_dict(state)
    run_dir.mkdir(parents=True, exist_ok=True)
    tok_file = run_dir / ".imported-tokenizer.json"
    tokenizer.save(tok_file)
    try:
        source = {"path": str(Path(path).resolve()), "gguf_architecture": arch}
        run_config = RunConfig(model=config, train=TrainConfig(run_dir=str(run_dir)))
        return save_checkpoint(run_dir, 0, model, None, run_config, {"tokens_seen": 0, "imported_from": source},
                               tok_file)
    finally:
        tok_file.unlink(missing_ok=True)


def read_gguf(path: str | Path) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """(metadata as Python values, {tensor name: float32 tensor in llama.cpp's (out, in) layout}) of a GGUF file."""
    import gguf

    try:
        header = read_header(path, values=True)
        stored = {t.name: (t, tensor_bytes(path, header, t)) for t in header.tensors}
    except FileNotFoundError:
        raise GGUFImportError(f"{path} does not exist: give the path of a .gguf file") from None
    except (GGUFHeaderError, OSError) as e:
        raise GGUFImportError(f"{path} is not a GGUF file, or a damaged one (it {e}); give a file llama.cpp "
                              "reads") from None
    tensors = {}
    for name, (t, raw) in stored.items():
        try:
            data = np.asarray(gguf.quants.dequantize(raw, gguf.GGMLQuantizationType(t.type)), dtype=np.float32)
        except NotImplementedError:
            raise GGUFImportError(f"{path} stores {name} as {gguf.GGMLQuantizationType(t.type).name}, which "
                                  "lmforge cannot read back yet; convert the file to Q8_0 or F16 with "
                                  "llama-quantize first") from None
        tensors[name] = torch.from_numpy(data.reshape(tuple(reversed(t.shape))).copy())
    return header.metadata, tensors


def _model_config(meta: dict[str, Any], tensors: dict[str, torch.Tensor], arch: str, path: Any) -> ModelConfig:
    def key(name: str, default: Any = None) -> Any:
        value = meta.get(f"{arch}.{name}", default)
        if value is None:
            raise GGUFImportError(f"{path} lacks {arch}.{name}, which a {arch} model needs; the file is incomplete")
        return float(f"{value:.7g}") if isinstance(value, float) else value  # GGUF keeps float32: 1e-5, not 9.99e-6

    n_embd, n_head = key("embedding_length"), key("attention.head_count")
    common = dict(vocab_size=tensors["token_embd.weight"].shape[0], block_size=key("context_length"),
                  n_layer=key("block_count"), n_head=n_head, n_embd=n_embd,
                  tie_embeddings="output.weight" not in tensors)
    if arch == "gpt2":
        config = ModelConfig(**common, activation="gelu_tanh", norm_eps=key("attention.layer_norm_epsilon", 1e-5))
    else:
        head_dim = key("attention.key_length", n_embd // n_head)  # heads may have their own width
        unsupported = [f"{arch}.{name}={meta[f'{arch}.{name}']}" for name in ("expert_count", "rope.scaling.type")
                       if meta.get(f"{arch}.{name}") not in (None, 0, "none")]
        if key("rope.dimension_count", head_dim) != head_dim:
            rotated = meta[f"{arch}.rope.dimension_count"]
            unsupported.append(f"{arch}.rope.dimension_count={rotated} (a partial rotation)")
        if key("attention.value_length", head_dim) != head_dim:
            unsupported.append(f"{arch}.attention.value_length={meta[f'{arch}.attention.value_length']} (values "
                               "and keys of different widths)")
        biases = {name.split(".")[-2] for name in tensors if name.startswith("blk.0.") and name.endswith(".bias")}
        allowed = ({"attn_q", "attn_k", "attn_v"},) if arch == "qwen2" else (set(),) if arch == "qwen3" else (
            set(), {"attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down"})
        if biases not in allowed:
            unsupported.append(f"biases on {', '.join(sorted(biases)) or 'nothing'} only")
        if unsupported:
            raise GGUFImportError(f"{path} has {'; '.join(unsupported)}, which lmforge's Llama-style model lacks; "
                                  f"lmforge imports {SUPPORTED}")
        theta = float(key("rope.freq_base", 10000.0))
        scaling = (_llama3_scaling(tensors["rope_freqs.weight"], head_dim, theta, path)
                   if "rope_freqs.weight" in tensors and arch == "llama" else {})
        config = ModelConfig(**common, n_kv_head=key("attention.head_count_kv", n_head), norm="rmsnorm",
                             norm_eps=key("attention.layer_norm_rms_epsilon", 1e-5), mlp="swiglu", pos_encoding="rope",
                             rope_theta=theta, bias=arch == "llama" and bool(biases),
                             qkv_bias=arch == "qwen2", qk_norm=arch == "qwen3",
                             head_size=None if head_dim * n_head == n_embd else head_dim, **scaling)
    if config.hidden_dim != key("feed_forward_length"):  # null when it is lmforge's own default width
        config.mlp_hidden = key("feed_forward_length")
    return config


def _llama3_scaling(factors: torch.Tensor, head_dim: int, theta: float, path: Any) -> dict[str, Any]:
    """model.rope_scaling llama3 and its settings from llama.cpp's rope_freqs.weight (what each frequency is divided
    by: 1 where kept, rope_factor where divided, a ramp between), or {} when it divides nothing.

    On the ramp, s = (1/f - 1/factor) / (1 - 1/factor) = (original_context / wavelength - low) / (high - low) is a
    line in 1 / wavelength, fitted through the ramp's points; scaling original_context, low and high alike computes
    the same frequencies, so low is set to 1 (Llama 3's own value) and the others follow. Factors that no such
    setting reproduces, or a ramp of fewer than two points, are refused in one line."""
    f = factors.double()
    inv_freq = (theta ** (-torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)).double()
    refuse = GGUFImportError(f"{path} scales its RoPE frequencies by a rope_freqs.weight that is not Llama 3.1's "
                             "scaling (model.rope_scaling llama3); lmforge imports only that one")
    if f.shape != inv_freq.shape or not torch.isfinite(f).all() or (f < 1 - 1e-6).any():
        raise refuse
    factor = float(f.max())
    if factor <= 1 + 1e-6:
        return {}
    s = (1 / f - 1 / factor) / (1 - 1 / factor)
    ramp = (s > 1e-4) & (s < 1 - 1e-4)
    if int(ramp.sum()) < 2:
        raise GGUFImportError(f"{path} scales its RoPE frequencies with {int(ramp.sum())} on the ramp between kept "
                              "and divided ones; lmforge needs two to recover Llama 3.1's settings")
    x = inv_freq[ramp] / (2 * math.pi)  # 1 / wavelength
    slope, intercept = np.polyfit(x.numpy(), s[ramp].numpy(), 1)
    if intercept >= 0 or slope <= 0:
        raise refuse
    high, context = 1 - 1 / intercept, -slope / intercept  # with low = 1
    rounded = round(context)
    scale = rounded / context if rounded > 0 else 1.0  # an integer context: low and high scale with it
    low, high = float(f"{scale:.6g}"), float(f"{high * scale:.6g}")  # float32's digits: 1 and 4, not 0.9999999
    settings = dict(rope_scaling="llama3", rope_factor=float(f"{factor:.6g}"), rope_low_freq_factor=low,
                    rope_high_freq_factor=high, rope_original_context=rounded)
    again = inv_freq / llama3_frequencies(inv_freq, settings["rope_factor"], low, high, rounded)
    if not torch.allclose(again, f, rtol=1e-4, atol=0):
        raise refuse
    return settings


class _ReadTensors(dict):
    """The file's tensors, remembering which were read (`read`)."""

    def __init__(self, tensors: dict[str, torch.Tensor]) -> None:
        super().__init__(tensors)
        self.read: set[str] = set()

    def __getitem__(self, name: str) -> torch.Tensor:
        self.read.add(name)
        return super().__getitem__(name)

    def get(self, name: str, default: Any = None) -> Any:
        if name in self:
            self.read.add(name)
        return super().get(name, default)


def _halves_from_interleaved(w: torch.Tensor, heads: int) -> torch.Tensor:
    """gguf_export.interleave_halves undone: each head's rows [x_0, x_hd/2, x_1, ...] -> [first half; second half]."""
    hd = w.size(0) // heads
    return w.reshape(heads, hd // 2, 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def _state_dict(tensors: dict[str, torch.Tensor], config: ModelConfig, arch: str) -> dict[str, torch.Tensor]:
    """lmforge's GPT state dict from the file's tensors (gguf_export._tensors inverted)."""
    state = {"tok_emb.weight": tensors["token_embd.weight"]}
    if arch == "gpt2":
        state["pos_emb.weight"] = tensors["position_embd.weight"]
    for i in range(config.n_layer):
        for kind in ("weight", "bias"):
            for ours, theirs in (RENAMED_GPT2 if arch == "gpt2" else RENAMED).items():
                if f"blk.{i}.{theirs}.{kind}" in tensors:
                    state[f"blocks.{i}.{ours}.{kind}"] = tensors[f"blk.{i}.{theirs}.{kind}"]
            if arch != "gpt2" and f"blk.{i}.attn_q.{kind}" in tensors:
                q, k = tensors[f"blk.{i}.attn_q.{kind}"], tensors[f"blk.{i}.attn_k.{kind}"]
                if arch == "llama":  # qwen2's and qwen3's graphs rotate halves, as lmforge does
                    q, k = _halves_from_interleaved(q, config.n_head), _halves_from_interleaved(k, config.n_kv_head)
                state[f"blocks.{i}.attn.qkv.{kind}"] = torch.cat([q, k, tensors[f"blk.{i}.attn_v.{kind}"]])
            if arch != "gpt2" and f"blk.{i}.ffn_gate.{kind}" in tensors:
                state[f"blocks.{i}.mlp.fc.{kind}"] = torch.cat([tensors[f"blk.{i}.ffn_gate.{kind}"],
                                                               tensors[f"blk.{i}.ffn_up.{kind}"]])
    for kind in ("weight", "bias"):
        if f"output_norm.{kind}" in tensors:
            state[f"norm_f.{kind}"] = tensors[f"output_norm.{kind}"]
    state["lm_head.weight"] = tensors.get("output.weight", state["tok_emb.weight"])
    return state


def _tokenizer(meta: dict[str, Any], path: Any) -> Tokenizer:
    model, pre = meta.get("tokenizer.ggml.model"), meta.get("tokenizer.ggml.pre", "default")
    tokens = meta.get("tokenizer.ggml.tokens") or []
    if model == "llama" and _lmforge_character_layout(tokens, meta.get("tokenizer.ggml.token_type")):
        return _character_tokenizer(tokens)
    if model == "llama" and tokens:
        return _sentencepiece(meta, tokens)
    if model != "gpt2" or rule_for(pre) is None:  # e.g. llama.cpp's "default" BPE rule, which no HF tokenizer has
        raise GGUFImportError(f"{path} has a {model!r} tokenizer with pre-tokenizer {pre!r}; lmforge imports "
                              f"byte-level BPE (tokenizer.ggml.model gpt2) with pre {known_rules()}, SentencePiece "
                              "vocabularies (llama), and the char and byte tokenizers it exports itself")
    return _byte_level_bpe(meta, tokens, rule_for(pre))


def _lmforge_character_layout(tokens: list[str], types: Any) -> bool:
    """Whether `tokens` are a char/byte vocabulary as gguf_export writes it (the byte 0x20 may be spelled U+2581):
    past the bytes, every ordinary token is one character."""
    first = BYTE_OFFSET + 256
    types = types or [1] * len(tokens)
    return len(tokens) >= first and all(tokens[BYTE_OFFSET + b] in (f"<0x{b:02X}>", SPACE) for b in range(256)) \
        and all(len(token) == 1 for token, kind in zip(tokens[first:], types[first:]) if kind == 1)


def _character_tokenizer(tokens: list[str]) -> Tokenizer:
    specials = tuple(tokens[:BYTE_OFFSET])
    chars = [" " if t == SPACE else t for t in tokens[BYTE_OFFSET + 256:] if not t.startswith("[PAD")]
    return Tokenizer("char", specials, chars=chars) if chars else Tokenizer("byte", specials)


def _special_ids(meta: dict[str, Any], tokens: list[str], adds_bos: bool) -> dict[str, Any]:
    """{start, end, pad: id or None} from the file: start is its bos when it adds one to every text."""
    ids = {role: meta.get(f"tokenizer.ggml.{key}_token_id") for role, key in
           (("bos", "bos"), ("eos", "eos"), ("pad", "padding"))}
    ids = {role: i if isinstance(i, int) and 0 <= i < len(tokens) else None for role, i in ids.items()}
    return {"start": ids["bos"] if meta.get("tokenizer.ggml.add_bos_token", adds_bos) else None, "end": ids["eos"],
            "pad": ids["pad"]}


def _added_tokens(tokens: list[str], types: list[int]) -> list[dict]:
    """Control tokens (special) and user-defined ones (matched whole in text, not special), as tokenizer.json's."""
    return [{"id": i, "content": t, "single_word": False, "lstrip": False, "rstrip": False, "normalized": False,
             "special": kind == 3} for i, (t, kind) in enumerate(zip(tokens, types)) if kind in (3, 4)]


def _bos_template(tokens: list[str], bos: Any) -> Any:
    """tokenizer.json's post-processor that begins every text with the token `bos` (None: nothing)."""
    if bos is None:
        return None
    first = {"SpecialToken": {"id": tokens[bos], "type_id": 0}}
    return {"type": "TemplateProcessing", "single": [first, {"Sequence": {"id": "A", "type_id": 0}}],
            "pair": [first, {"Sequence": {"id": "A", "type_id": 0}}, {"Sequence": {"id": "B", "type_id": 1}}],
            "special_tokens": {tokens[bos]: {"id": tokens[bos], "ids": [bos], "tokens": [tokens[bos]]}}}


def _sentencepiece(meta: dict[str, Any], tokens: list[str]) -> Tokenizer:
    """A SentencePiece vocabulary (GGUF's llama model) as a BPE of kind hf that cuts text as llama.cpp does; llama.cpp
    adds bos to such a vocabulary's texts unless the file says otherwise."""
    types = list(meta.get("tokenizer.ggml.token_type") or [1] * len(tokens))
    scores = list(meta.get("tokenizer.ggml.scores") or [0.0] * len(tokens))
    prefix = bool(meta.get("tokenizer.ggml.add_space_prefix", True))
    vocab = {t: i for i, t in enumerate(tokens) if types[i] != 5 or not t.startswith("[PAD")}
    merges = list(meta.get("tokenizer.ggml.merges") or []) or _merges_from_scores(tokens, types, scores, vocab)
    unknown = meta.get("tokenizer.ggml.unknown_token_id")
    unknown = unknown if isinstance(unknown, int) and 0 <= unknown < len(tokens) else next(
        (i for i, kind in enumerate(types) if kind == 2), None)
    space = [{"type": "Replace", "pattern": {"String": " "}, "content": SPACE}]
    hf = {"version": "1.0", "truncation": None, "padding": None, "added_tokens": _added_tokens(tokens, types),
          "normalizer": {"type": "Sequence", "normalizers": [{"type": "Prepend", "prepend": SPACE}] * prefix + space},
          "pre_tokenizer": None, "post_processor": None,
          "decoder": {"type": "Sequence", "decoders": [
              {"type": "Replace", "pattern": {"String": SPACE}, "content": " "}, {"type": "ByteFallback"},
              {"type": "Fuse"}, *[{"type": "Strip", "content": " ", "start": 1, "stop": 0}] * prefix]},
          "model": {"type": "BPE", "dropout": None, "unk_token": None if unknown is None else tokens[unknown],
                    "continuing_subword_prefix": None, "end_of_word_suffix": None, "fuse_unk": True,
                    "byte_fallback": True, "ignore_merges": False, "vocab": vocab, "merges": merges}}
    ids = _special_ids(meta, tokens, adds_bos=True)
    hf["post_processor"] = _bos_template(tokens, ids["start"])
    return Tokenizer(HF_KIND, hf_json=json.dumps(hf), special_ids=ids)


def _merges_from_scores(tokens: list[str], types: list[int], scores: list[float], vocab: dict[str, int]) -> list[str]:
    """BPE merges equivalent to llama.cpp's SentencePiece rule (merge first the adjacent pair whose joined text is the
    best-scoring token): every split of each ordinary token into two tokens, the best token's first; a token's own
    splits in the order of their parts' ids."""
    merges = []
    for i, token in enumerate(tokens):
        if types[i] != 1:
            continue
        splits = sorted(((vocab[token[:k]], vocab[token[k:]]) for k in range(1, len(token))
                         if token[:k] in vocab and token[k:] in vocab))
        merges += [(-scores[i], n, f"{tokens[a]} {tokens[b]}") for n, (a, b) in enumerate(splits)]
    merges.sort(key=lambda m: (m[0], m[1]))
    return [m[2] for m in merges]


def _byte_level_bpe(meta: dict[str, Any], tokens: list[str], rule: str) -> Tokenizer:
    """The file's BPE, cutting words by `rule` (a name in RULES), as an lmforge tokenizer of kind hf: start token the
    file's bos when it adds one to every text (llama.cpp's default for the rule when the file does not say)."""
    pre, ignore_merges, normalizer = RULES[rule]
    types = meta.get("tokenizer.ggml.token_type") or [1] * len(tokens)
    ids = _special_ids(meta, tokens, adds_bos=rule in ADDS_BOS)
    hf = {"version": "1.0", "truncation": None, "padding": None, "added_tokens": _added_tokens(tokens, types),
          "normalizer": normalizer, "pre_tokenizer": pre, "post_processor": _bos_template(tokens, ids["start"]),
          "decoder": {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True},
          "model": {"type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": None,
                    "end_of_word_suffix": None, "fuse_unk": False, "byte_fallback": False,
                    "ignore_merges": ignore_merges,
                    "vocab": {t: i for i, t in enumerate(tokens) if not (types[i] == 5 and t.startswith("[PAD"))},
                    "merges": list(meta.get("tokenizer.ggml.merges") or [])}}
    return Tokenizer(HF_KIND, hf_json=json.dumps(hf), special_ids=ids)
