"""`lmforge import MODEL.gguf`: a GGUF file back to an lmforge checkpoint, the same model and tokenizer; a Hugging Face
model through lmforge and GGUF and back computes what it did; files it cannot read are refused in one line."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
from test_gguf_export import MAKERS, TEXTS  # noqa: E402  (the same tokenizers and texts as the export's tests)
from test_interop import GPT2_STYLE, LLAMA_STYLE, hf_dirs, lmforge_run  # noqa: E402,F401

gguf = pytest.importorskip("gguf")
transformers = pytest.importorskip("transformers")

from lmforge.checkpoint import load_for_inference  # noqa: E402
from lmforge.cli import main  # noqa: E402
from lmforge.errors import CheckpointError  # noqa: E402
from lmforge.generate import prompt_ids  # noqa: E402
from lmforge.interop.gguf_export import export_gguf  # noqa: E402
from lmforge.interop.gguf_import import GGUFImportError, import_gguf, read_gguf  # noqa: E402
from lmforge.interop.hf_import import import_hf  # noqa: E402
from lmforge.tokenizer import byte_tokenizer  # noqa: E402


@pytest.mark.parametrize("arch,kind,dtype", [("gpt2", "bpe", "f32"), ("llama", "char", "f32"), ("gpt2", "byte", "f16"),
                                             ("llama", "bpe", "q8_0")])
def test_a_gguf_export_imports_back_to_the_same_model_and_tokenizer(tmp_path, arch, kind, dtype):
    tok = MAKERS[kind]()
    run = lmforge_run(tmp_path, tok, **(GPT2_STYLE if arch == "gpt2" else LLAMA_STYLE))
    path = export_gguf(run, tmp_path / "m.gguf", dtype=dtype)
    assert main(["import", str(path), "--out", str(tmp_path / "back")]) == 0
    ours, _, _ = load_for_inference(run, "cpu")
    back, back_tok, _ = load_for_inference(tmp_path / "back", "cpu")
    assert back.config == ours.config
    _, stored = read_gguf(path)  # what the file holds, dequantized: f32 exactly, f16 and q8_0 as rounded
    assert torch.equal(back.tok_emb.weight, stored["token_embd.weight"])
    tolerance = {"f32": 0.0, "f16": 1e-3, "q8_0": 2e-2}[dtype]
    for name, tensor in ours.state_dict().items():
        assert (back.state_dict()[name] - tensor).abs().max() <= tolerance * max(1.0, tensor.abs().max()), name
    for text in TEXTS:
        assert prompt_ids(back_tok, text) == prompt_ids(tok, text), text
        assert back_tok.decode(prompt_ids(back_tok, text)) == text
    ids = torch.randint(0, tok.vocab_size, (2, 48))
    with torch.no_grad():
        assert dtype != "f32" or torch.equal(back(ids), ours(ids))


@pytest.mark.parametrize("name", ["gpt2", "llama"])
def test_a_hf_model_through_gguf_and_back_computes_and_tokenizes_like_the_original(hf_dirs, tmp_path, name):
    path = export_gguf(import_hf(hf_dirs[name], tmp_path / "run"), tmp_path / "m.gguf")
    back, back_tok, _ = load_for_inference(import_gguf(path, tmp_path / "back"), "cpu")
    original = transformers.AutoModelForCausalLM.from_pretrained(hf_dirs[name]).eval()
    original_tok = transformers.AutoTokenizer.from_pretrained(hf_dirs[name])
    ids = torch.randint(0, original.config.vocab_size, (2, 40))
    with torch.no_grad():
        assert (back(ids) - original(ids).logits).abs().max() <= 1e-5
    for text in TEXTS:  # Llama 3 style: the start token first, from the file's bos and add_bos_token
        assert prompt_ids(back_tok, text) == original_tok(text).input_ids, text
    assert back_tok.end_id == original.config.eos_token_id


def test_rows_of_each_q_and_k_head_go_back_to_lmforges_order(tmp_path):
    run = lmforge_run(tmp_path, byte_tokenizer(), **LLAMA_STYLE)
    back, _, _ = load_for_inference(import_gguf(export_gguf(run, tmp_path / "m.gguf"), tmp_path / "back"), "cpu")
    ours, _, _ = load_for_inference(run, "cpu")
    assert torch.equal(back.blocks[1].attn.qkv.weight, ours.blocks[1].attn.qkv.weight)
    assert torch.equal(back.blocks[1].mlp.fc.weight, ours.blocks[1].mlp.fc.weight)
    assert torch.equal(back.lm_head.weight, ours.lm_head.weight) and not back.config.tie_embeddings


def rewrite(src: Path, dst: Path, change: dict, drop: tuple[str, ...] = ()) -> Path:
    """A copy of the GGUF file `src` with some metadata values changed (or added) and some dropped."""
    reader = gguf.GGUFReader(str(src))
    meta = {name: field.contents() for name, field in reader.fields.items() if not name.startswith("GGUF.")}
    writer = gguf.GGUFWriter(str(dst), change.get("general.architecture", meta["general.architecture"]))
    for name, value in {**meta, **change}.items():
        if name == "general.architecture" or name in drop:
            continue
        kind = reader.fields[name].types[0] if name in reader.fields else gguf.GGUFValueType.get_type(value)
        sub = reader.fields[name].types[-1] if name in reader.fields and kind == gguf.GGUFValueType.ARRAY else None
        writer.add_key_value(name, value, kind, sub_type=sub)
    for t in reader.tensors:
        writer.add_tensor(t.name, t.data, raw_shape=tuple(int(n) for n in reversed(t.shape)), raw_dtype=t.tensor_type)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return dst


@pytest.mark.parametrize("change,drop,needle", [
    ({"general.architecture": "phi3"}, (), "holds a 'phi3' model; lmforge imports gpt2, llama"),
    ({"llama.rope.dimension_count": 4}, (), "a partial rotation"),
    ({"llama.expert_count": 8}, (), "llama.expert_count=8"),
    ({"tokenizer.ggml.pre": "kimi-k2", "tokenizer.ggml.model": "gpt2"}, (), "pre-tokenizer 'kimi-k2'"),
    ({}, ("llama.context_length",), "lacks llama.context_length"),
])
def test_files_lmforge_cannot_read_are_refused_in_one_line_writing_nothing(tmp_path, capsys, change, drop, needle):
    run = lmforge_run(tmp_path, MAKERS["bpe"](), **LLAMA_STYLE)
    path = rewrite(export_gguf(run, tmp_path / "m.gguf"), tmp_path / "changed.gguf", change, drop)
    assert main(["import", str(path), "--out", str(tmp_path / "back")]) == 2
    err = capsys.readouterr().err.strip()
    assert needle in err and "\n" not in err, err
    assert not (tmp_path / "back").exists()


def test_a_file_that_is_not_gguf_and_a_run_with_checkpoints_are_refused(tmp_path):
    (tmp_path / "notes.gguf").write_text("not a model")
    with pytest.raises(GGUFImportError, match="is not a GGUF file"):
        import_gguf(tmp_path / "notes.gguf", tmp_path / "back")
    with pytest.raises(GGUFImportError, match="does not exist"):
        import_gguf(tmp_path / "ghost.gguf", tmp_path / "back")
    run = lmforge_run(tmp_path, byte_tokenizer(), **GPT2_STYLE)
    path = export_gguf(run, tmp_path / "m.gguf")
    with pytest.raises(CheckpointError, match="already holds checkpoints"):
        import_gguf(path, run)
    cut = tmp_path / "cut.gguf"  # whole header, the last tensor's data short by a byte
    cut.write_bytes(path.read_bytes()[:-1])
    with pytest.raises(GGUFImportError, match="a damaged one .*ends inside the data of tensor"):
        import_gguf(cut, tmp_path / "back")
    assert not (tmp_path / "back").exists()


@pytest.mark.parametrize("arch,extra", [("llama", "blk.0.attn_extra.weight"), ("gpt2", "rope_freqs.weight")])
def test_a_tensor_the_model_has_no_place_for_is_refused_not_dropped(tmp_path, monkeypatch, arch, extra):
    """An import that dropped a tensor would compute another model than the file's (a GPT-2 has no use for Llama 3.1's
    rope_freqs.weight): it is refused, naming the tensor, and nothing is written."""
    import lmforge.interop.gguf_export as gguf_export

    run = lmforge_run(tmp_path, MAKERS["char"](), **(GPT2_STYLE if arch == "gpt2" else LLAMA_STYLE))
    plain = gguf_export._tensors

    def with_extra(state, config, arch):
        yield from plain(state, config, arch)
        yield extra, torch.ones(config.head_dim // 2)

    monkeypatch.setattr(gguf_export, "_tensors", with_extra)
    path = export_gguf(run, tmp_path / "m.gguf")
    with pytest.raises(GGUFImportError, match=f"no place for: {extra}$"):
        import_gguf(path, tmp_path / "back")
    assert not (tmp_path / "back").exists()
