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
"""

from __future__ import annotations

from pathlib import Path

import torch

from lmforge import __version__
from lmforge.checkpoint import load_adapted_lora, read_run_config, verified_checkpoint
from lmforge.files import atomic_path, check_output
from lmforge.interop.gguf_export import GGUFExportError, interleave_halves, is_gguf_export, gguf_architecture
from lmforge.interop.hf_export import HFExportError
from lmforge.interop.peft_export import HF_BLOCK, PREFIX, WEIGHTS, peft_adapter_files
from lmforge.lora import LoRAConfig

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
    try:
        adapter = peft_adapter_files(model, lora)[WEIGHTS]
    except HFExportError as e:
        raise GGUFExportError(str(e).replace("PEFT", "a GGUF adapter")
                              .replace("plain HF model", "plain GGUF file")) from None
    naming = "gpt2" if arch == "gpt2" else "llama"
    out: dict[str, torch.Tensor] = {}
    for key, tensor in adapter.items():
        module, part = key[len(PREFIX):].rsplit(".lora_", 1)  # "model.layers.0.self_attn.q_proj", "A.weight"
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
    arch = gguf_architecture(run_config.model, checkpoint)
    model = load_adapted_lora(ckpt, run_config)
    return write_gguf_adapter(adapter_tensors(model, run_config.lora, arch), arch, run_config.lora.alpha, out_path)


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
