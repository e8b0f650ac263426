"""`lmforge export --format gguf`: an lmforge checkpoint -> one GGUF file for llama.cpp, Ollama, LM Studio and the
other programs built on ggml (transformers loads it too: from_pretrained(dir, gguf_file=...)).

A GGUF file holds the weights under llama.cpp's tensor names and everything else as typed key/value metadata: the
architecture's hyperparameters and the tokenizer (its tokens, their types, BPE merges, special token ids). Written
with the `gguf` package (llama.cpp's own Python writer), for a model of an architecture the Hugging Face export
takes (interop.hf_export.converter_for_model):

    gpt2   learned positions, LayerNorm, GELU, biases: the fused q/k/v and MLP weights as they are
    llama  RoPE, RMSNorm, SwiGLU, grouped-query heads: q, k and v apart, the MLP's gate and up apart, and the rows
           of each q and k head reordered. lmforge (like Hugging Face) rotates dimension i with i + hd/2; llama.cpp's
           llama graph rotates neighbours 2i and 2i + 1 (the original Meta layout), so row i of a head moves to 2i
           and row i + hd/2 to 2i + 1: the same attention scores, since q and k move alike.
    qwen2  the same with biases on q, k and v only (model.qkv_bias); llama.cpp's qwen2 graph rotates halves as
           lmforge does, so the rows stay in order.
    qwen3  the same without biases, each head's queries and keys RMS-normalised (model.qk_norm: attn_q_norm,
           attn_k_norm); halves rotated, rows in order.
Heads of their own width (model.head_size) are written as attention.key_length and value_length. Llama 3.1's RoPE
scaling (model.rope_scaling llama3; llama only) is written as llama.cpp's converter writes it: a rope_freqs.weight
vector that each frequency is divided by.

Tokenizers: lmforge's bpe kind (byte-level BPE) is GGUF's "gpt2" model (tokens in GPT-2's byte-to-unicode spelling,
the merges in order). The char and byte kinds are GGUF's "llama" model, SentencePiece's rule that is theirs too:
each character in the vocabulary is one token, any other character its UTF-8 bytes as <0xNN> tokens; a space is
spelled U+2581 there, and no space is added in front of a text. Every text begins with the start token
(tokenizer.ggml.add_bos_token). An imported Hugging Face tokenizer (kind hf) is written when it is byte-level BPE
with a pre-tokenizer rule that llama.cpp names (gguf_pretokenizers: GPT-2's, Llama 3's, SmolLM's, Qwen2's), or a
SentencePiece-style BPE with byte fallback (Llama 2, TinyLlama, Mistral, Gemma): GGUF's "llama" model, with scores
that make llama.cpp merge in the BPE's order (minus the rank of the merge that makes each token), the merges
themselves (transformers reads those), and add_space_prefix. The
chat template goes in as tokenizer.chat_template (hf_export.model_chat_template: lmforge's own format for a model
fine-tuned on task data, else an imported model's own).

Matrices are float32 (exact), float16 or bfloat16 (half the bytes), q8_0 (8-bit integers with a float16 scale per
block of 32, about a quarter of the bytes) or q5_1, q5_0, q4_1, q4_0 (5 or 4 bits per weight, with a scale and for
*_1 a minimum per block of 32; the head's matrix q6_k, or q8_0 where its rows are not whole blocks of 256, as
llama-quantize's), or one of llama.cpp's K-quant mixes q4_k_m (the usual
way GGUF models are shared), q4_k_s, q5_k_m, q5_k_s, q6_k, q3_k_l, q3_k_m, q3_k_s, q2_k, iq4_xs, iq4_nl
(gguf_kquants: blocks of 256 with scales per sub-block, or IQ4's non-linear grid; a type chosen per tensor as
llama-quantize chooses it); a matrix whose rows are not a whole number of blocks is
float16; vectors such as norms and biases stay float32, as llama.cpp's own converter does. The file records
lmforge.version; --force replaces only such a file, through lmforge.files.atomic_path (the old file stays whole
until the new one is complete).
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any, Iterator, NamedTuple, Optional, Sequence

import numpy as np
import torch
from tqdm import tqdm

from lmforge import __version__
from lmforge.checkpoint import load_for_inference, verified_checkpoint
from lmforge.config import ModelConfig
from lmforge.errors import LmforgeError
from lmforge.files import atomic_path, check_output
from lmforge.interop import gguf_kquants, hf_gpt2
from lmforge.interop.gguf_header import GGUFHeaderError, read_header
from lmforge.interop.gguf_imatrix import Activations, measure_activations, source_module, start_each_window
from lmforge.interop.gguf_imatrix_file import ImportanceMatrix, read_imatrix, read_sums, write_imatrix
from lmforge.interop.hf_llama import is_qwen2, is_qwen3
from lmforge.interop.gguf_pretokenizers import RULES, rule_name
from lmforge.interop.gguf_writer import gguf_writer
from lmforge.interop.hf_export import HFExportError, converter_for_model, model_chat_template
from lmforge.interop.hf_tokenizer import hf_tokenizer_files
from lmforge.model import llama3_frequencies
from lmforge.tokenizer import BYTE_OFFSET, Tokenizer

GGUF_TYPES = ("f32", "f16", "bf16", "q8_0", "q5_1", "q5_0", "q4_1", "q4_0", *gguf_kquants.MIXES)
LOW_BIT = ("q5_1", "q5_0", "q4_1", "q4_0")  # the head's matrix is q6_k (rows of whole 256 blocks) or q8_0 here
SPACE = "\u2581"  # SentencePiece's spelling of a space


class GGUFExportError(LmforgeError):
    """A checkpoint that cannot be written as GGUF, or an output that must not be replaced."""


IMATRIX_TYPES = ("q6_k", "q5_k_m", "q5_k_s", "q4_k_m", "q4_k_s", "q3_k_l", "q3_k_m", "q3_k_s", "q2_k", "iq4_xs",
                 "iq4_nl", *LOW_BIT)  # the types whose quantizers weigh an importance matrix, as llama-quantize's do


def export_gguf(checkpoint: str | Path, out_path: str | Path, *, force: bool = False, dtype: str = "f32",
                progress: bool = False, imatrix_text: str | Path | None = None,
                imatrix: str | Path | None = None) -> Path:
    """Write the checkpoint (a run directory: its newest complete checkpoint) as a GGUF file; return its path.

    dtype: f32 | f16 | bf16 | q8_0 | q5_1 | q5_0 | q4_1 | q4_0, the matrices' type, or a K-quant mix (q6_k,
    q5_k_m, q5_k_s, q4_k_m, q4_k_s, q3_k_l, q3_k_m, q3_k_s, q2_k, iq4_xs, iq4_nl). An existing out_path is
    replaced only with force and only if it is a GGUF file lmforge wrote. `progress`: a bar over the weights
    written, on stderr when it is a terminal. imatrix_text: a UTF-8 text file the model reads first to measure an
    importance matrix (gguf_imatrix) that the Q2_K to Q6_K and IQ4 tensors of dtype's mix are quantized under, as
    llama-quantize --imatrix does; imatrix: such a matrix from a file instead (gguf_imatrix_file: what
    export_imatrix or llama.cpp's llama-imatrix wrote)."""
    try:
        import gguf
    except ModuleNotFoundError:
        raise GGUFExportError("GGUF export needs the gguf package: pip install gguf") from None
    if dtype not in GGUF_TYPES:
        raise GGUFExportError(f"--gguf-type {dtype!r} is not one of {', '.join(GGUF_TYPES)}; f32 is exact, f16 and "
                              "bf16 half the size, q8_0 about a quarter, q6_k down to q2_k less, with more error")
    option = "--imatrix-text" if imatrix_text is not None else "--imatrix" if imatrix is not None else None
    if imatrix_text is not None and imatrix is not None:
        raise GGUFExportError("--imatrix-text measures an importance matrix and --imatrix reads one: give one of them")
    if option is not None and dtype not in IMATRIX_TYPES:
        raise GGUFExportError(f"{option} weighs the quantization of --gguf-type "
                              f"{', '.join(IMATRIX_TYPES)}, not {dtype}: pick one of those or drop it")
    calibration = None if imatrix_text is None else _calibration_text(imatrix_text)
    from_file = None if imatrix is None else read_imatrix(imatrix)
    out_path = Path(out_path)
    check_output(out_path, force=force, ours=is_gguf_export, what="a GGUF export written by lmforge",
                 error=GGUFExportError, directory=False,
                 inputs=[checkpoint, *(p for p in (imatrix_text, imatrix) if p is not None)])
    ckpt, model, tokenizer, arch, matrices = _language_model(checkpoint)
    config: ModelConfig = model.config
    vocabulary = _vocabulary(tokenizer, config.vocab_size)
    if calibration is not None:
        measured = _measured(model, tokenizer, calibration, imatrix_text, matrices, progress=progress)
        from_file = ImportanceMatrix({name: a.importance() for name, a in measured.items()},
                                     [Path(imatrix_text).name], _windows(measured, config.block_size))
    importance = {} if from_file is None else _matching(from_file, matrices, imatrix)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(out_path) as tmp:
        writer = gguf_writer(tmp, arch)  # (gguf's, its vocabulary arrays packed whole)
        writer.add_name(out_path.stem)
        writer.add_string("lmforge.version", __version__)
        _add_hyperparameters(writer, config, arch, dtype)
        if from_file is not None:  # as llama-quantize records the importance matrix it used
            writer.add_string("quantize.imatrix.file", Path(imatrix_text or imatrix).name)
            if from_file.datasets:
                writer.add_string("quantize.imatrix.dataset", from_file.datasets[0])
            writer.add_int32("quantize.imatrix.entries_count", len(from_file.values))
            writer.add_int32("quantize.imatrix.chunks_count", from_file.chunk_count)
        _add_tokenizer(writer, tokenizer, vocabulary)
        chat_template = model_chat_template(ckpt, tokenizer)
        if chat_template is not None:
            writer.add_chat_template(chat_template)
        total = sum(t.numel() for _, t in _tensors(model.state_dict(), config, arch))
        with tqdm(total=total, desc=f"gguf {dtype}", unit="weights", unit_scale=True, file=sys.stderr, leave=False,
                  dynamic_ncols=True, disable=None if progress else True) as bar:  # None: only on a terminal
            for name, tensor in _tensors(model.state_dict(), config, arch):
                _add_tensor(writer, name, tensor.detach().to("cpu", torch.float32).contiguous().numpy(), dtype,
                            head=name == "output.weight" or (name == "token_embd.weight" and config.tie_embeddings),
                            n_layer=config.n_layer, gqa=config.n_head // config.n_kv_head,
                            importance=importance.get(name))
                bar.update(tensor.numel())
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
    return out_path


def gguf_architecture(config: ModelConfig, checkpoint: str | Path) -> str:
    """llama.cpp's architecture for a model config: gpt2, llama, qwen2 or qwen3; GGUFExportError naming what has
    none (the Hugging Face export's reasons), or a scaled RoPE outside llama."""
    try:
        arch = ("gpt2" if converter_for_model(config) is hf_gpt2 else "qwen3" if is_qwen3(config)
                else "qwen2" if is_qwen2(config) else "llama")
    except HFExportError as e:
        raise GGUFExportError(str(e).replace("Hugging Face equivalent",
                                             "GGUF equivalent (gpt2, llama, qwen2 or qwen3)")) from None
    if config.rope_scaling != "none" and arch != "llama":
        raise GGUFExportError(f"{checkpoint} scales its RoPE frequencies (model.rope_scaling={config.rope_scaling!r}), "
                              f"which llama.cpp reads for its llama architecture, not {arch}; export it with "
                              "--format hf instead")
    return arch


def export_imatrix(checkpoint: str | Path, text: str | Path | None, out_path: str | Path, *, force: bool = False,
                   head: bool = False, progress: bool = False, in_files: Sequence[str | Path] = (),
                   start_windows: bool = False) -> Path:
    """Measure the checkpoint's importance matrix on the calibration `text` file (gguf_imatrix; with `head` the
    head's too, as llama-imatrix --process-output) and write it as llama-imatrix's GGUF file (gguf_imatrix_file),
    keyed by the names export_gguf gives the matrices: for `lmforge export --imatrix` or llama.cpp's
    llama-quantize --imatrix (which also takes it for the IQ types lmforge does not write). `in_files`: imatrix GGUF
    files of this model whose sums the new text's are added to (llama-imatrix --in-file; `text` None: only them).
    `start_windows`: the text read in whole windows each begun with the start token, as llama-imatrix reads it.
    An existing out_path is replaced only with force and only if lmforge wrote it; returns the path. `progress`: a
    bar over the tokens read, on stderr when it is a terminal."""
    if text is None and not in_files:
        raise GGUFExportError("give calibration text (--text) or imatrix files to add up (--in-file), or both")
    calibration = None if text is None else _calibration_text(text, "--text")
    out_path = Path(out_path)
    check_output(out_path, force=force, ours=is_gguf_export, what="an imatrix file written by lmforge",
                 error=GGUFExportError, directory=False, inputs=[checkpoint, *([text] if text else []), *in_files])
    _, model, tokenizer, arch, matrices = _language_model(checkpoint)
    config: ModelConfig = model.config
    if head and "output.weight" not in matrices:
        print("warning: --process-output: this model's head is its token embedding (tied), which llama.cpp reads no "
              "importance for; the file holds the blocks' matrices only", file=sys.stderr)
    measured: dict[str, Activations] = {}
    datasets, chunks = [], 0

    def add(entries: dict[str, Activations]) -> None:
        for name, a in entries.items():
            measured[name] = measured[name].merged(a) if name in measured else a

    for path in in_files:
        sums, their_datasets, their_chunks = read_sums(path, matrices)
        add(sums)
        datasets, chunks = datasets + their_datasets, chunks + their_chunks
    if calibration is not None:
        new = _measured(model, tokenizer, calibration, text, matrices, head=head, option="--text", progress=progress,
                        start_windows=start_windows)
        add(new)
        datasets, chunks = datasets + [Path(text).name], chunks + _windows(new, config.block_size)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(out_path) as tmp:
        write_imatrix(tmp, measured, arch=arch, datasets=datasets, chunk_count=chunks, chunk_size=config.block_size)
    return out_path


def _language_model(checkpoint: str | Path) -> tuple[Path, Any, Tokenizer, str, dict[str, int]]:
    """The checkpoint's newest complete checkpoint directory, its model and tokenizer (on the CPU), llama.cpp's
    architecture for it and its GGUF matrices {name: columns}; GGUFExportError when it is no language model with a
    tokenizer."""
    ckpt, manifest = verified_checkpoint(checkpoint)
    model, tokenizer, _ = load_for_inference(ckpt, "cpu", manifest)
    config: ModelConfig = model.config
    if config.head != "lm":
        raise GGUFExportError(f"{checkpoint} holds a {config.head} model; GGUF export writes language models")
    arch = gguf_architecture(config, checkpoint)
    if tokenizer is None:
        raise GGUFExportError(f"{checkpoint} has no tokenizer (trained without prepared data); a GGUF file needs one")
    matrices = {name: t.shape[-1] for name, t in _tensors(model.state_dict(), config, arch) if t.dim() == 2}
    return ckpt, model, tokenizer, arch, matrices


def _measured(model: Any, tokenizer: Tokenizer, calibration: str, path: str | Path, matrices: dict[str, int], *,
              head: bool = False, option: str = "--imatrix-text", progress: bool = False,
              start_windows: bool = False) -> dict[str, Activations]:
    """{GGUF matrix name: its input's Activations} over the calibration text (`start_windows`: in whole windows each
    begun with the start token, as llama-imatrix reads it); the split q/k/v and gate/up share their lmforge
    matrix's."""
    tokens = torch.from_numpy(tokenizer.encode_array(calibration).astype(np.int64))
    if len(tokens) < 2:
        raise GGUFExportError(f"{option} {path} holds {len(tokens)} token(s): give text the model reads, ideally "
                              "like what it will be used on (thousands of tokens)")
    if start_windows:
        context = model.config.block_size
        if tokenizer.start_id is None or len(tokens) + 1 < context:
            why = ("its tokenizer has no start token" if tokenizer.start_id is None
                   else f"{option} {path} holds {len(tokens)} tokens, less than one window of {context}")
            raise GGUFExportError(f"--start-each-window: {why}; drop the option")
        tokens = start_each_window(tokens, context, tokenizer.start_id)
    by_module = measure_activations(model, tokens, model.config.block_size, head=head, progress=progress)
    return {name: by_module[source_module(name)] for name in matrices if source_module(name) in by_module}


def _windows(measured: dict[str, Activations], context: int) -> int:
    """The windows of `context` tokens the text was read in (llama.cpp's chunks)."""
    count = next(iter(measured.values())).count
    return -(-count // context)


def _matching(imatrix: ImportanceMatrix, matrices: dict[str, int], path: str | Path | None) -> dict[str, np.ndarray]:
    """The importance matrix's entries for this model's matrices ({GGUF name: columns}), each as long as its rows;
    entries for other tensors are left out (as llama-quantize does), none at all or a wrong length is an error."""
    found = {name: v for name, v in imatrix.values.items() if name in matrices}
    if not found:
        raise GGUFExportError(f"--imatrix {path}: none of its {len(imatrix.values)} entries names a matrix of this "
                              f"model (e.g. {min(imatrix.values)}); it was measured on another model")
    for name, v in found.items():
        if len(v) != matrices[name]:
            raise GGUFExportError(f"--imatrix {path} holds {len(v)} values for {name}, whose rows have "
                                  f"{matrices[name]} columns: it was measured on another model")
    return found


def _calibration_text(path: str | Path, option: str = "--imatrix-text") -> str:
    """The text of --imatrix-text, or one line saying why it cannot be used."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise GGUFExportError(f"{option} {path} cannot be read ({type(e).__name__}): give a UTF-8 text file "
                              "of calibration text") from None
    if not text.strip():
        raise GGUFExportError(f"{option} {path} is empty: give text the model reads, ideally like what it will "
                              "be used on (thousands of tokens)")
    return text


# ---------------------------------------------------------------------------------------------- weights
def _add_tensor(writer: Any, name: str, data: np.ndarray, dtype: str, head: bool = False, n_layer: int = 1,
                gqa: int = 1, importance: np.ndarray | None = None) -> None:
    """One tensor in `dtype` (a matrix) or float32 (a vector, and the position table, as llama.cpp's converter
    keeps it: its graph adds the rows it reads to float32 activations). Block types (q8_0, q5_*, q4_*: gguf's own
    quantizers) need rows of whole blocks of 32, else the matrix is float16; under the 4- and 5-bit types the
    head's matrix (`head`: output, or token_embd when the head reads it) takes more bits, as llama.cpp's quantizer
    gives it: q6_k where its rows are whole blocks of 256, else q8_0. A K-quant mix (q4_k_m, ...) picks each
    matrix's type as llama-quantize does (gguf_kquants.tensor_type) and writes q2_k to q6_k, iq4_xs and iq4_nl with
    lmforge's own quantizer;
    `importance` (columns,), an importance matrix's entry, weighs those and q4_0, q4_1, q5_0, q5_1 (as a type of
    their own, or where a K-quant's rows fall back to them: gguf_kquants.quantize_legacy), as llama-quantize
    --imatrix does; q8_0 and the float types take none there either."""
    import gguf

    kind = dtype
    if head and dtype in LOW_BIT:
        kind = "q6_k" if data.shape[-1] % gguf_kquants.QK_K == 0 else "q8_0"
    if data.ndim == 1 or kind == "f32" or name == "position_embd.weight":
        writer.add_tensor(name, data)
        return
    if dtype in gguf_kquants.MIXES:
        kind = gguf_kquants.tensor_type(dtype, name, n_layer, head, data.shape[-1], gqa)
    if kind in gguf_kquants.BYTES:
        raw = gguf.GGMLQuantizationType[kind.upper()]
        weighted = importance if kind in gguf_kquants.WEIGHTED else None
        writer.add_tensor(name, gguf_kquants.quantize(data, kind, weighted), raw_dtype=raw)
    elif kind == "f16" or data.shape[-1] % gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType.Q8_0][0] != 0:
        writer.add_tensor(name, data.astype(np.float16))
    elif kind in gguf_kquants.LEGACY_WEIGHTED and importance is not None:
        raw = gguf.GGMLQuantizationType[kind.upper()]
        writer.add_tensor(name, gguf_kquants.quantize_legacy(data, kind, importance), raw_dtype=raw)
    elif kind == "q8_0":  # gguf's bytes, on every core
        writer.add_tensor(name, gguf_kquants.quantize_q8_0(data), raw_dtype=gguf.GGMLQuantizationType.Q8_0)
    else:  # bf16 and the other block types: bytes as gguf's quantizers write them
        raw = gguf.GGMLQuantizationType[kind.upper()]
        writer.add_tensor(name, gguf.quants.quantize(data, raw), raw_dtype=raw)


def interleave_halves(w: torch.Tensor, heads: int) -> torch.Tensor:
    """Rows (heads * hd, ...) of q or k, each head's rows [first half; second half] -> [x_0, x_hd/2, x_1, ...]."""
    hd = w.size(0) // heads
    return w.reshape(heads, 2, hd // 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


# A block's tensors that only change name (lmforge -> GGUF); GPT-2's fused q/k/v and MLP input too. The rest of a
# Llama block is split: attn.qkv -> attn_q, attn_k, attn_v; mlp.fc -> ffn_gate, ffn_up.
RENAMED = {"norm_1": "attn_norm", "attn.proj": "attn_output", "norm_2": "ffn_norm", "mlp.proj": "ffn_down",
           "attn.q_norm": "attn_q_norm", "attn.k_norm": "attn_k_norm"}  # (qk norms: qwen3 only)
RENAMED_GPT2 = {**RENAMED, "attn.qkv": "attn_qkv", "mlp.fc": "ffn_up"}


def _tensors(state: dict[str, torch.Tensor], config: ModelConfig, arch: str) -> Iterator[tuple[str, torch.Tensor]]:
    """(GGUF tensor name, tensor) for every weight the architecture reads, in llama.cpp's (out, in) layout."""
    yield "token_embd.weight", state["tok_emb.weight"]
    if arch == "gpt2":
        yield "position_embd.weight", state["pos_emb.weight"]
    q_rows, kv_rows = config.n_head * config.head_dim, config.n_kv_head * config.head_dim
    renamed = RENAMED_GPT2 if arch == "gpt2" else RENAMED
    for i in range(config.n_layer):
        block = {name[len(f"blocks.{i}."):]: t for name, t in state.items() if name.startswith(f"blocks.{i}.")}
        for kind in ("weight", "bias"):
            for ours, theirs in renamed.items():
                if f"{ours}.{kind}" in block:
                    yield f"blk.{i}.{theirs}.{kind}", block[f"{ours}.{kind}"]
            if arch != "gpt2" and f"attn.qkv.{kind}" in block:
                q, k, v = block[f"attn.qkv.{kind}"].split((q_rows, kv_rows, kv_rows))
                if arch == "llama":
                    q, k = interleave_halves(q, config.n_head), interleave_halves(k, config.n_kv_head)
                yield f"blk.{i}.attn_q.{kind}", q
                yield f"blk.{i}.attn_k.{kind}", k
                yield f"blk.{i}.attn_v.{kind}", v
            if arch != "gpt2" and f"mlp.fc.{kind}" in block:
                gate, up = block[f"mlp.fc.{kind}"].chunk(2)  # MLP.forward: silu(gate) * up
                yield f"blk.{i}.ffn_gate.{kind}", gate
                yield f"blk.{i}.ffn_up.{kind}", up
    for kind in ("weight", "bias"):
        if f"norm_f.{kind}" in state:
            yield f"output_norm.{kind}", state[f"norm_f.{kind}"]
    if not config.tie_embeddings:  # tied: llama.cpp reads token_embd for the head when output is absent
        yield "output.weight", state["lm_head.weight"]
    if config.rope_scaling == "llama3":
        yield "rope_freqs.weight", rope_factors(config)


def rope_factors(config: ModelConfig) -> torch.Tensor:
    """Llama 3.1's RoPE scaling as llama.cpp reads it: a float32 vector, one number per frequency, that llama.cpp
    divides each frequency by (rope_freqs.weight: 1 for the kept ones, model.rope_factor for the divided ones, the
    ramp between), computed in float64 from float32 frequencies as llama.cpp's converter computes it."""
    hd = config.head_dim
    inv_freq = (config.rope_theta ** (-torch.arange(0, hd, 2, dtype=torch.float32) / hd)).double()
    scaled = llama3_frequencies(inv_freq, config.rope_factor, config.rope_low_freq_factor,
                                config.rope_high_freq_factor, config.rope_original_context)
    return (inv_freq / scaled).float()


def _add_hyperparameters(writer: Any, config: ModelConfig, arch: str, dtype: str) -> None:
    import gguf

    writer.add_context_length(config.block_size)
    writer.add_embedding_length(config.n_embd)
    writer.add_feed_forward_length(config.hidden_dim)
    writer.add_block_count(config.n_layer)
    writer.add_head_count(config.n_head)
    writer.add_file_type(gguf.LlamaFileType.ALL_F32 if dtype == "f32"
                         else gguf.LlamaFileType["MOSTLY_" + dtype.upper()])
    if arch == "gpt2":
        writer.add_layer_norm_eps(config.norm_eps)
        return
    writer.add_head_count_kv(config.n_kv_head)
    writer.add_layer_norm_rms_eps(config.norm_eps)
    writer.add_rope_dimension_count(config.head_dim)
    if config.head_dim * config.n_head != config.n_embd:  # heads of their own width
        writer.add_key_length(config.head_dim)
        writer.add_value_length(config.head_dim)
    writer.add_rope_freq_base(config.rope_theta)
    writer.add_vocab_size(config.vocab_size)


# ---------------------------------------------------------------------------------------------- tokenizer
class Vocabulary(NamedTuple):
    """A tokenizer as GGUF metadata."""

    model: str  # GGUF's tokenizer model: gpt2 (byte-level BPE) or llama (SentencePiece's rule)
    pre: str  # llama.cpp's name of the pre-tokenizer rule
    tokens: list[str]
    types: list[int]  # gguf.TokenType per token
    merges: list[str]  # "a b", in order
    scores: list[float]  # llama: the higher, the earlier llama.cpp merges into that token
    space_prefix: bool  # llama: a space written before a text's first word


def _vocabulary(tokenizer: Tokenizer, vocab_size: int) -> Vocabulary:
    """The tokenizer for the model's vocab_size ids: gpt2 (byte-level BPE) or llama (characters with byte fallback,
    or an imported SentencePiece-style BPE); ids past the tokenizer's are unused tokens."""
    import gguf

    scores, prefix, unknown, plain = None, False, None, set()
    sentencepiece = _sentencepiece_json(tokenizer)
    if tokenizer.kind in ("char", "byte"):
        model, pre, tokens, merges = "llama", "default", _character_vocabulary(tokenizer), []
    elif sentencepiece is not None:
        model, pre = "llama", "default"
        tokens, merges, scores, prefix, unknown, plain = _sentencepiece(*sentencepiece)
    else:
        model, (pre, tokens, merges) = "gpt2", _byte_level_bpe(tokenizer)
    if len(tokens) > vocab_size:
        raise GGUFExportError(f"the tokenizer has {len(tokens)} tokens but the model only {vocab_size}; export a "
                              "checkpoint whose tokenizer it was trained with")
    special = tokenizer.special_token_ids
    plain = plain | set(tokenizer.added_token_ids.values())  # text llama.cpp matches as one token, as HF does
    byte_ids = range(BYTE_OFFSET, BYTE_OFFSET + 256) if tokenizer.kind in ("char", "byte") else ()

    def kind(i: int, token: str) -> int:
        if i == unknown:
            return gguf.TokenType.UNKNOWN
        if i in special:
            return gguf.TokenType.CONTROL
        if i in plain:
            return gguf.TokenType.USER_DEFINED
        if model == "llama" and (i in byte_ids and token != SPACE or not byte_ids and _is_byte_token(token)):
            return gguf.TokenType.BYTE
        return gguf.TokenType.NORMAL

    types = [kind(i, token) for i, token in enumerate(tokens)]
    scores = (scores or [0.0] * len(tokens)) + [0.0] * (vocab_size - len(tokens)) if model == "llama" else []
    tokens += [f"[PAD{i}]" for i in range(len(tokens), vocab_size)]
    types += [gguf.TokenType.UNUSED] * (vocab_size - len(types))
    return Vocabulary(model, pre, tokens, types, merges, scores, prefix)


def _add_tokenizer(writer: Any, tokenizer: Tokenizer, vocabulary: Vocabulary) -> None:
    """The tokenizer as GGUF metadata."""
    writer.add_tokenizer_model(vocabulary.model)
    writer.add_tokenizer_pre(vocabulary.pre)
    writer.add_token_list(vocabulary.tokens)
    writer.add_token_types(vocabulary.types)
    if vocabulary.model == "llama":
        writer.add_token_scores(vocabulary.scores)
        writer.add_add_space_prefix(vocabulary.space_prefix)
    if vocabulary.merges:
        writer.add_token_merges(vocabulary.merges)
    for role, add in (("start", writer.add_bos_token_id), ("end", writer.add_eos_token_id),
                      ("pad", writer.add_pad_token_id)):
        token_id = getattr(tokenizer, f"{role}_id")
        if token_id is not None:
            add(token_id)
    writer.add_add_bos_token(tokenizer.start_id is not None)  # as generate.prompt_ids begins a prompt
    writer.add_add_eos_token(False)


def _is_byte_token(token: str) -> bool:
    return len(token) == 6 and token.startswith("<0x") and token.endswith(">") and \
        all(c in "0123456789ABCDEFabcdef" for c in token[3:5])


def _sentencepiece_json(tokenizer: Tokenizer) -> Optional[tuple[dict, bool]]:
    """(tokenizer.json, whether a space is written before a text's first word) of an imported SentencePiece-style
    BPE that llama.cpp's rule (tokenizer model llama) reads the same: spaces spelled U+2581 by a normalizer or an
    unsplit Metaspace, byte fallback; None for another tokenizer."""
    if tokenizer.kind != "hf":
        return None
    hf = tokenizer.to_dict()["hf_tokenizer"]
    model, normalizer, pre = hf.get("model") or {}, hf.get("normalizer"), hf.get("pre_tokenizer")
    if model.get("type") != "BPE" or not model.get("byte_fallback"):
        return None
    steps = (normalizer or {}).get("normalizers") if (normalizer or {}).get("type") == "Sequence" else \
        [normalizer] if normalizer else []
    to_space = {"type": "Replace", "pattern": {"String": " "}, "content": SPACE}
    if pre is None and steps and steps[-1] == to_space:
        prepends = [s for s in steps[:-1] if s != {"type": "Prepend", "prepend": SPACE}]
        return (hf, len(steps) == 2) if not prepends else None
    if normalizer is None and (pre or {}).get("type") == "Metaspace" and pre.get("replacement") == SPACE \
            and not pre.get("split", True):
        return hf, pre.get("prepend_scheme", "always") != "never"
    return None


def _sentencepiece(hf: dict, prefix: bool) -> tuple[list[str], list[str], list[float], bool, Optional[int], set[int]]:
    """(tokens, merges, scores, space prefix, the unknown token's id, ids of added tokens that are not special) of an
    imported SentencePiece-style BPE (its tokenizer.json, _sentencepiece_json's). llama.cpp merges by score, the
    token a merge makes: its score is minus the merge's rank, so llama.cpp merges in the order the BPE does; the
    merges are written too (transformers reads them)."""
    model = hf["model"]
    vocab = {**model["vocab"], **{t["content"]: t["id"] for t in hf.get("added_tokens") or []}}
    tokens = [""] * (max(vocab.values()) + 1)
    for token, token_id in vocab.items():
        tokens[token_id] = token
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges") or []]
    scores = [0.0] * len(tokens)
    made: set[int] = set()
    for rank, merge in enumerate(merges):
        token_id = vocab.get(merge.replace(" ", "", 1))
        if token_id is not None and token_id not in made:
            scores[token_id] = -float(rank)
            made.add(token_id)
    plain = {t["id"] for t in hf.get("added_tokens") or [] if not t.get("special")}
    unknown = vocab.get(model.get("unk_token") or "<unk>")  # transformers' LlamaTokenizer names it in its config only
    return tokens, merges, scores, prefix, unknown, plain


def _character_vocabulary(tokenizer: Tokenizer) -> list[str]:
    """Token strings of a char/byte tokenizer in id order: specials, <0xNN> bytes, characters. SentencePiece spells
    a space U+2581 before it looks it up, so the space character is spelled so; without one (the byte kind), the byte
    0x20 is, which is the token lmforge gives a space then."""
    chars = list(tokenizer._chars)
    if SPACE in chars:
        raise GGUFExportError(f"the tokenizer's vocabulary holds {SPACE!r} (U+2581), which GGUF's SentencePiece rule "
                              "reads as a space; retrain the tokenizer without it to export as GGUF")
    tokens = list(tokenizer.special_tokens) + [f"<0x{b:02X}>" for b in range(256)]
    tokens += [SPACE if c == " " else c for c in chars]
    if " " not in chars:
        tokens[BYTE_OFFSET + 0x20] = SPACE
    if tokenizer.mask_token is not None:
        tokens.append(tokenizer.mask_token)
    return tokens + list(tokenizer.added_tokens)


def _byte_level_bpe(tokenizer: Tokenizer) -> tuple[str, list[str], list[str]]:
    """(llama.cpp's name of its pre-tokenizer rule, tokens in id order, merges "a b") of a byte-level BPE tokenizer
    whose rule GGUF names (gguf_pretokenizers.RULES)."""
    hf = hf_tokenizer_files(tokenizer, 0)["tokenizer.json"]
    model, pre = hf.get("model") or {}, rule_name(hf)
    if model.get("type") != "BPE" or model.get("byte_fallback") or pre is None:
        raise GGUFExportError(f"this tokenizer is not byte-level BPE with a pre-tokenizer rule GGUF names "
                              f"({', '.join(RULES)}) nor a SentencePiece-style BPE with byte fallback (Llama 2's), the "
                              "imported tokenizers GGUF export writes; lmforge's own char, byte and bpe tokenizers "
                              "all export")
    vocab = {**model["vocab"], **{t["content"]: t["id"] for t in hf.get("added_tokens") or []}}
    tokens = [""] * (max(vocab.values()) + 1)
    for token, token_id in vocab.items():
        tokens[token_id] = token
    if tokenizer.mask_token is not None and tokenizer.mask_id == len(tokens):  # kept outside the BPE's own vocabulary
        tokens.append(tokenizer.mask_token)
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges") or []]
    return pre, tokens, merges


def gguf_summary(path: str | Path) -> str:
    """One line on a GGUF file: its tensors by type, its size, and the bits per weight of its matrices."""
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

    tensors = read_header(path).tensors
    types: dict[str, int] = {}
    for t in tensors:
        name = GGMLQuantizationType(t.type).name.lower()
        types[name] = types.get(name, 0) + 1
    weights = bytes_ = 0
    for t in (t for t in tensors if len(t.shape) == 2):
        block, block_bytes = GGML_QUANT_SIZES[GGMLQuantizationType(t.type)]
        weights += t.shape[0] * t.shape[1]
        bytes_ += t.shape[0] * t.shape[1] // block * block_bytes
    kinds = ", ".join(f"{count} {name}" for name, count in sorted(types.items(), key=lambda kv: -kv[1]))
    return (f"{path}: {len(tensors)} tensors ({kinds}), {Path(path).stat().st_size / 2**20:.1f} MiB, "
            f"{8 * bytes_ / max(1, weights):.2f} bits per matrix weight")


def is_gguf_export(path: Path) -> bool:
    """Whether `path` is a GGUF file that export_gguf wrote (its metadata records lmforge.version)."""
    try:
        return "lmforge.version" in read_header(path).metadata
    except (GGUFHeaderError, OSError, ValueError):  # not a GGUF file, or not one to read
        return False
