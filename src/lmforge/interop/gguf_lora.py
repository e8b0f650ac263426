"""`lmforge export RUN --format gguf --adapter --out adapter.gguf`: a LoRA run's adapters as a llama.cpp LoRA adapter
file, applied at load time onto the GGUF of the run's base (`lmforge export BASE --format gguf`):

    llama-cli -m base.gguf --lora adapter.gguf           # llama.cpp; Ollama's Modelfile: FROM base.gguf, ADAPTER ...

The file is GGUF with general.type "adapter", adapter.type "lora" and adapter.lora.alpha, and per adapted matrix of
the base two float32 tensors under the base tensor's name: NAME.lora_a (rank, in) and NAME.lora_b (out, rank).
llama.cpp adds (alpha / rank) * B (A x) to that matrix's product, rank being lora_b's width.

The matrices are those of PEFT's adapter (peft_export.peft_adapter_files, whose one rule maps lmforge's adapters on
slices of the fused q/k/v and gate/up Linears onto Hugging Face's modules) under llama.cpp's tensor names
(gguf_export's): Llama's q_proj -> blk.N.attn_q, ..., GPT-2's c_attn -> blk.N.attn_qkv, lm_head -> output. As the
base's rows of each q and k head are reordered for llama.cpp's rotation in a `llama` file, so are the rows of their
B. A module where several of lmforge's adapters meet (GPT-2's c_attn with q and v adapted: rank 2r) gets its B
multiplied by rank / r, so that llama.cpp's alpha / rank is lmforge's alpha / r there too, with one alpha for the
file.

`lmforge import adapter.gguf --base RUN --out OUT` reads such a file back (import_gguf_adapter), lmforge's or one
llama.cpp's convert_lora_to_gguf.py wrote (f32, f16, bf16 or q8_0 tensors): each matrix's rows back in lmforge's
order, under its Hugging Face module's name, with alpha / rank as its scale (alpha 0: scale 1, as llama.cpp reads
it), and on through peft_import's mapping onto lmforge's adapters.
"""

from __future__ import annotations

import math
import re
from pathlib import Path

import torch

from lmforge import __version__
from lmforge.checkpoint import load_adapted_lora, read_run_config, verified_checkpoint
from lmforge.files import atomic_path, check_output
from lmforge.interop.gguf_export import GGUFExportError, interleave_halves, is_gguf_export, gguf_architecture
from lmforge.interop.gguf_header import GGUFHeaderError, read_header, tensor_bytes
from lmforge.interop.gguf_import import _halves_from_interleaved
from lmforge.interop.hf_export import HFExportError
from lmforge.interop.hf_import import check_new_run
from lmforge.interop.peft_export import EMBEDDING, HF_BLOCK, PREFIX, WEIGHTS, peft_adapter_files
from lmforge.interop.peft_import import PEFTImportError, import_lora
from lmforge.lora import LoRAConfig, dequantize_lora

# Hugging Face module inside a block -> llama.cpp's tensor inside blk.N (PEFT's naming: gpt2, or llama for every
# Llama-style layout)
GGUF_NAMES = {
    "gpt2": {"attn.c_attn": "attn_qkv", "attn.c_proj": "attn_output", "mlp.c_fc": "ffn_up", "mlp.c_proj": "ffn_down"},
    "llama": {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
              "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
              "mlp.down_proj": "ffn_down"},
}


@torch.no_grad()
def adapter_tensors(model: torch.nn.Module, lora: LoRAConfig, arch: str) -> dict[str, torch.Tensor]:
    """{llama.cpp tensor name + .lora_a / .lora_b: float32 tensor} of a model adapted by apply_lora (unmerged), for
    a GGUF file of architecture `arch` (gguf_export.gguf_architecture)."""
    config = model.config
    if "emb" in lora.targets and config.tie_embeddings and config.head == "lm":
        raise GGUFExportError("the run adapts the token embedding of a model whose head is tied to it, and llama.cpp "
                              "computes the output from that tensor without its embedding adapter: export the run "
                              "merged (without --adapter)")
    try:
        adapter = peft_adapter_files(model, lora)[WEIGHTS]
    except HFExportError as e:
        raise GGUFExportError(str(e).replace("PEFT", "a GGUF adapter")
                              .replace("plain HF model", "plain GGUF file")) from None
    naming = "gpt2" if arch == "gpt2" else "llama"
    out: dict[str, torch.Tensor] = {}
    for key, tensor in adapter.items():
        module, part = key[len(PREFIX):].rsplit(".lora_", 1)  # "model.layers.0.self_attn.q_proj", "A.weight"
        if part.startswith("embedding_"):  # llama.cpp adds s B a[token] to the row: its lora_a is A^T (V, r)
            out[f"token_embd.weight.lora_{part[-1].lower()}"] = (tensor.t() if part.endswith("A") else tensor).float(
                ).contiguous()
            continue
        if module == "lm_head":
            name = "output.weight"
        else:
            block = next(i for i in range(config.n_layer) if module.startswith(HF_BLOCK[naming].format(i)))
            inner = module[len(HF_BLOCK[naming].format(block)):]
            name = f"blk.{block}.{GGUF_NAMES[naming][inner]}.weight"
        if part == "A.weight":
            out[f"{name}.lora_a"] = tensor.float().contiguous()
            continue
        rank = tensor.shape[1]
        b = tensor.float() * (rank / lora.r)  # llama.cpp scales by alpha / rank, lmforge by alpha / r
        if arch == "llama" and name.endswith(("attn_q.weight", "attn_k.weight")):  # rows as the base's are
            b = interleave_halves(b, config.n_head if name.endswith("attn_q.weight") else config.n_kv_head)
        out[f"{name}.lora_b"] = b.contiguous()
    return out


def export_gguf_adapter(checkpoint: str | Path, out_path: str | Path, *, force: bool = False) -> Path:
    """Write a LoRA run's (its newest complete checkpoint's) adapters as a llama.cpp LoRA adapter; return its path.
    An existing out_path is replaced only with force and only if lmforge wrote it."""
    try:
        import gguf  # noqa: F401  (write_gguf_adapter's)
    except ModuleNotFoundError:
        raise GGUFExportError("GGUF export needs the gguf package: pip install gguf") from None
    out_path = Path(out_path)
    check_output(out_path, force=force, ours=is_gguf_export, what="a GGUF export written by lmforge",
                 error=GGUFExportError, directory=False, inputs=[checkpoint])
    ckpt, _ = verified_checkpoint(checkpoint)
    run_config = read_run_config(ckpt)
    if run_config.lora is None:
        raise GGUFExportError(f"{checkpoint} is not a LoRA run, so it has no adapters: export the model whole "
                              "without --adapter")
    if run_config.model.head != "lm":
        raise GGUFExportError(f"{checkpoint} holds a {run_config.model.head} model; GGUF export writes language "
                              "models")
    if run_config.lora.dora:
        raise GGUFExportError(f"{checkpoint} trained DoRA adapters (lora.dora), and a llama.cpp LoRA adapter holds "
                              "only A and B, no magnitudes: export the run merged (without --adapter)")
    arch = gguf_architecture(run_config.model, checkpoint)
    model = dequantize_lora(load_adapted_lora(ckpt, run_config))  # QLoRA: the same adapters (the base is llama.cpp's)
    if model.added_rows_from is not None:
        raise GGUFExportError(f"{checkpoint} learned rows for {run_config.model.vocab_size - model.added_rows_from} "
                              f"token(s) added to its base's tokenizer, which a llama.cpp LoRA adapter cannot carry "
                              f"(the base's GGUF has no such tokens): export the run merged (without --adapter)")
    return write_gguf_adapter(adapter_tensors(model, run_config.lora, arch), arch, run_config.lora.plain_alpha,
                              out_path)


def write_gguf_adapter(tensors: dict[str, torch.Tensor], arch: str, alpha: float, out_path: str | Path) -> Path:
    """adapter_tensors' tensors as a llama.cpp LoRA adapter file (atomically: a reader never sees half of it)."""
    import gguf

    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(out_path) as tmp:
        writer = gguf.GGUFWriter(str(tmp), arch)
        writer.add_type(gguf.GGUFType.ADAPTER)
        writer.add_name(out_path.stem)
        writer.add_string("lmforge.version", __version__)
        writer.add_string(gguf.Keys.Adapter.TYPE, "lora")
        writer.add_float32(gguf.Keys.Adapter.LORA_ALPHA, float(alpha))
        for name, tensor in tensors.items():
            writer.add_tensor(name, tensor.numpy())
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
    return out_path


def is_gguf_adapter(path: str | Path) -> bool:
    """Whether `path` is a GGUF file of general.type adapter (a llama.cpp LoRA adapter, not a model)."""
    try:
        return read_header(path).metadata.get("general.type") == "adapter"
    except (GGUFHeaderError, OSError):
        return False


def import_gguf_adapter(path: str | Path, base: str | Path, run_dir: str | Path) -> Path:
    """Write the llama.cpp LoRA adapter file `path`, applied to the lmforge checkpoint `base` (the model of the GGUF
    it adapts), as RUN_DIR/checkpoints/step-00000000; return that path. PEFTImportError in one line for a file
    that is not a LoRA adapter, of another architecture, or of another model."""
    import gguf

    path = Path(path)
    check_new_run(Path(run_dir))
    try:
        header = read_header(path, values=True)
        stored = {t.name: (t, tensor_bytes(path, header, t)) for t in header.tensors}
    except (GGUFHeaderError, OSError) as e:
        raise PEFTImportError(f"{path} is not a GGUF file, or a damaged one (it {e})") from None
    meta = header.metadata
    if meta.get("general.type") != "adapter" or meta.get("adapter.type") != "lora":
        raise PEFTImportError(f"{path} is not a llama.cpp LoRA adapter (general.type {meta.get('general.type')!r}, "
                              f"adapter.type {meta.get('adapter.type')!r}); import a model without --base")
    base_ckpt, _ = verified_checkpoint(base)
    config = read_run_config(base_ckpt)
    arch = meta.get("general.architecture")
    try:
        theirs = gguf_architecture(config.model, base)
    except GGUFExportError as e:
        raise PEFTImportError(f"--base {base} has no GGUF architecture for the adapter to apply to: {e}") from None
    if arch != theirs:
        raise PEFTImportError(f"{path} adapts a {arch!r} model and --base {base} is a {theirs!r} one: give the base "
                              "the adapter was made for")
    family = "gpt2" if arch == "gpt2" else "llama"
    hf_name = {gguf_name: hf for hf, gguf_name in GGUF_NAMES[family].items()}
    tensors, ranks = {}, {}
    for name, (info, raw) in stored.items():
        found = re.fullmatch(r"(?:blk\.(\d+)\.(\w+)|output|(token_embd))\.weight\.lora_([ab])", name)
        inner = found and found.group(2)
        if not found or (inner is not None and inner not in hf_name):
            raise PEFTImportError(f"{path} holds {name}, which is no adapter of a matrix lmforge's {arch} model has")
        part = found.group(4)
        module = EMBEDDING[family] if found.group(3) else "lm_head" if inner is None else \
            HF_BLOCK[family].format(int(found.group(1))) + hf_name[inner]
        try:
            data = gguf.quants.dequantize(raw, gguf.GGMLQuantizationType(info.type))
        except NotImplementedError:
            raise PEFTImportError(f"{path} stores {name} as {gguf.GGMLQuantizationType(info.type).name}, which lmforge "
                                  "cannot read back; write the adapter in f32, f16 or q8_0") from None
        tensor = torch.from_numpy(data.reshape(tuple(reversed(info.shape))).astype("float32"))
        if part == "b" and arch == "llama" and inner in ("attn_q", "attn_k"):  # llama.cpp's rotation order, undone
            heads = config.model.n_head if inner == "attn_q" else config.model.n_kv_head
            if tensor.shape[0] == heads * config.model.head_dim:  # (another model's: refused below, naming shapes)
                tensor = _halves_from_interleaved(tensor, heads)
        if found.group(3):  # the embedding's: peft's lora_embedding_A (r, V) is llama.cpp's lora_a transposed
            tensors[f"{PREFIX}{module}.lora_embedding_{part.upper()}"] = tensor.t() if part == "a" else tensor
        else:
            tensors[f"{PREFIX}{module}.lora_{part.upper()}.weight"] = tensor
        if part == "b":
            ranks[module] = tensor.shape[1]
    # llama.cpp's scale is alpha / rank, each matrix's own rank, as PEFT's lora_alpha / r; alpha 0 means scale 1
    alpha, r = meta.get("adapter.lora.alpha") or 0.0, max(ranks.values(), default=1)
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not 0 <= alpha < math.inf:
        raise PEFTImportError(f"{path} has adapter.lora.alpha {alpha!r}: a number >= 0 is needed")
    settings = {"r": r, "lora_alpha": alpha or r, "lora_dropout": 0.0,
                "alpha_pattern": {} if alpha else {re.escape(module): rank for module, rank in ranks.items()}}
    return import_lora(settings, tensors, base, Path(run_dir), path, {"path": str(path.resolve()), "format": "gguf"})
