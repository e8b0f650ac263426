"""`lmforge export --format gguf`: the file transformers' GGUF reader (llama.cpp's layout, re-implemented) loads gives
the same logits and the same token ids; its metadata says what llama.cpp reads; refusals and --force."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
from test_interop import (CORPUS, GPT2_STYLE, LLAMA_STYLE, hf_dirs, hidden, lmforge_run,  # noqa: E402,F401
                          perturb_norms)

gguf = pytest.importorskip("gguf")
transformers = pytest.importorskip("transformers")

from lmforge.checkpoint import load_for_inference, save_checkpoint  # noqa: E402
from lmforge.cli import main  # noqa: E402
from lmforge.config import ModelConfig, RunConfig  # noqa: E402
from lmforge.generate import prompt_ids  # noqa: E402
from lmforge.interop.gguf_export import SPACE, GGUFExportError, export_gguf  # noqa: E402
from lmforge.interop.hf_import import import_hf  # noqa: E402
from lmforge.model import GPT  # noqa: E402
from lmforge.tokenizer import byte_tokenizer, train_bpe, train_char  # noqa: E402

TEXTS = ["Hello, wörld!", "床前明月光 q", " two  spaces\nand a tab\t."]
MAKERS = {"bpe": lambda: train_bpe(CORPUS, 400), "char": lambda: train_char(CORPUS, 300), "byte": byte_tokenizer}


def load_theirs(path: Path, config: ModelConfig):
    """transformers' model and tokenizer from the GGUF file. Its GPT-2 reader maps gpt2.context_length to n_ctx,
    which GPT2Config no longer reads (it would build 1,024 positions): n_positions is given the file's value."""
    extra = {"n_positions": config.block_size} if config.pos_encoding == "learned" else {}
    model = transformers.AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, **extra).eval()
    tokenizer = transformers.AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    return model, tokenizer


def fields(path: Path) -> dict:
    """The file's metadata as Python values (strings, numbers, lists)."""
    reader = gguf.GGUFReader(str(path))
    return {name: field.contents() for name, field in reader.fields.items()}


@pytest.mark.parametrize("arch,kind", [("gpt2", "bpe"), ("llama", "char"), ("gpt2", "byte"), ("llama", "bpe")])
def test_gguf_loads_in_transformers_with_the_same_logits_and_token_ids(tmp_path, arch, kind):
    tok = MAKERS[kind]()
    run = lmforge_run(tmp_path, tok, **(GPT2_STYLE if arch == "gpt2" else LLAMA_STYLE))
    out = tmp_path / "gguf" / "model.gguf"
    assert main(["export", str(run), "--format", "gguf", "--out", str(out)]) == 0
    model, _, _ = load_for_inference(run, "cpu")
    theirs, hf_tok = load_theirs(out, model.config)
    assert type(theirs).__name__ == ("GPT2LMHeadModel" if arch == "gpt2" else "LlamaForCausalLM")
    ids = torch.randint(0, tok.vocab_size, (2, 48))  # every position: RoPE's reordered q/k rows show here
    with torch.no_grad():
        assert (model(ids) - theirs(ids).logits).abs().max() <= 1e-5
    if kind != "bpe":  # the file says add_space_prefix false, which llama.cpp follows; transformers' SentencePiece
        from tokenizers import pre_tokenizers  # reader always puts a space in front, so it is told the same here

        hf_tok.backend_tokenizer.pre_tokenizer = pre_tokenizers.Metaspace(replacement=SPACE, prepend_scheme="never")
    for text in TEXTS:
        assert hf_tok(text).input_ids == prompt_ids(tok, text), text
    meta = fields(out)
    assert meta["general.architecture"] == arch and meta[f"{arch}.context_length"] == model.config.block_size
    assert meta["tokenizer.ggml.model"] == ("gpt2" if kind == "bpe" else "llama")
    assert (meta["tokenizer.ggml.bos_token_id"], meta["tokenizer.ggml.eos_token_id"],
            meta["tokenizer.ggml.padding_token_id"]) == (tok.start_id, tok.end_id, tok.pad_id)
    assert meta["tokenizer.ggml.add_bos_token"] is True and len(meta["tokenizer.ggml.tokens"]) == tok.vocab_size


@pytest.mark.parametrize("name", ["gpt2", "llama"])
def test_an_imported_hf_model_exports_to_a_gguf_that_computes_and_tokenizes_like_the_original(hf_dirs, tmp_path, name):
    run = import_hf(hf_dirs[name], tmp_path / "run")
    model, tok, _ = load_for_inference(run, "cpu")
    path = export_gguf(run, tmp_path / "out" / "m.gguf")
    theirs, hf_tok = load_theirs(path, model.config)
    original = transformers.AutoModelForCausalLM.from_pretrained(hf_dirs[name]).eval()
    original_tok = transformers.AutoTokenizer.from_pretrained(hf_dirs[name])
    ids = torch.randint(0, tok.vocab_size, (2, 40))
    with torch.no_grad():
        assert (original(ids).logits - theirs(ids).logits).abs().max() <= 1e-5
    for text in TEXTS:  # Llama 3 style: the start token first, from the file's add_bos_token
        assert hf_tok(text).input_ids == original_tok(text).input_ids == prompt_ids(tok, text), text
    assert fields(path)["tokenizer.ggml.add_bos_token"] is (name == "llama")


@pytest.mark.parametrize("pre", ["own-split", "prefix-space"])
def test_an_imported_tokenizer_without_gpt2s_byte_level_rule_is_refused_before_anything_is_written(tmp_path, pre):
    from tokenizers import Regex, Tokenizer as HFTokenizer, decoders, models, pre_tokenizers, trainers

    from lmforge.tokenizer import HF_KIND, Tokenizer

    hf = HFTokenizer(models.BPE())
    hf.decoder = decoders.ByteLevel()
    own_split = pre_tokenizers.Split(Regex(r"\p{N}{1,3}| ?\p{L}+|\s+"), "isolated")  # Llama 3's kind of rule
    hf.pre_tokenizer = (pre_tokenizers.Sequence([own_split, pre_tokenizers.ByteLevel(use_regex=False)])
                        if pre == "own-split" else pre_tokenizers.ByteLevel(add_prefix_space=True))
    hf.train_from_iterator(CORPUS, trainers.BpeTrainer(vocab_size=300, special_tokens=["</s>"], show_progress=False))
    tok = Tokenizer(HF_KIND, hf_json=hf.to_str(), special_ids={"start": None, "end": 0, "pad": None})
    config = ModelConfig(vocab_size=tok.vocab_size, **GPT2_STYLE)
    tok.save(tmp_path / "tokenizer.json")
    save_checkpoint(tmp_path / "run", 1, GPT(config), None, RunConfig(model=config), {"tokens_seen": 0},
                    tmp_path / "tokenizer.json")
    with pytest.raises(GGUFExportError, match="not byte-level BPE with a pre-tokenizer rule GGUF names"):
        export_gguf(tmp_path / "run", tmp_path / "m.gguf")
    assert not (tmp_path / "m.gguf").exists() and hidden(tmp_path) == []


def test_gguf_keeps_the_position_table_f32_as_llama_cpp_does(tmp_path):
    run = lmforge_run(tmp_path, byte_tokenizer(), **GPT2_STYLE)
    for dtype in ("f16", "q8_0"):
        types = {t.name: t.tensor_type.name for t in gguf.GGUFReader(str(export_gguf(run, tmp_path / f"{dtype}.gguf",
                                                                                     dtype=dtype))).tensors}
        assert types["position_embd.weight"] == "F32" and types["token_embd.weight"] == dtype.upper()


def test_f16_halves_the_matrices_and_keeps_vectors_f32(tmp_path):
    run = lmforge_run(tmp_path, MAKERS["char"](), **LLAMA_STYLE)
    exact = export_gguf(run, tmp_path / "out" / "f32.gguf")  # beside no tokenizer.json, which transformers would read
    half = export_gguf(run, tmp_path / "out" / "f16.gguf", dtype="f16")
    types = {t.name: t.tensor_type for t in gguf.GGUFReader(str(half)).tensors}
    assert types["blk.0.attn_q.weight"] == gguf.GGMLQuantizationType.F16
    assert types["blk.0.attn_norm.weight"] == gguf.GGMLQuantizationType.F32
    assert {t.tensor_type for t in gguf.GGUFReader(str(exact)).tensors} == {gguf.GGMLQuantizationType.F32}
    assert half.stat().st_size < 0.6 * exact.stat().st_size
    model, _, _ = load_for_inference(run, "cpu")
    theirs, _ = load_theirs(half, model.config)
    ids = torch.randint(0, 300, (1, 40))
    with torch.no_grad():
        ours, other = model(ids), theirs(ids).logits
    assert 0 < (ours - other).abs().max() <= 2e-3 * ours.abs().max()


@pytest.mark.parametrize("n_embd,matrix_type", [(32, "Q8_0"), (48, "F16")])  # 48: rows of 1.5 blocks of 32
def test_q8_0_quantizes_whole_blocks_and_stays_close(tmp_path, n_embd, matrix_type):
    run = lmforge_run(tmp_path, MAKERS["char"](), **{**LLAMA_STYLE, "n_embd": n_embd})
    path = export_gguf(run, tmp_path / "out" / "q8.gguf", dtype="q8_0")
    types = {t.name: t.tensor_type.name for t in gguf.GGUFReader(str(path)).tensors}
    assert types["blk.0.ffn_up.weight"] == matrix_type and types["output_norm.weight"] == "F32"
    assert fields(path)["general.file_type"] == int(gguf.LlamaFileType.MOSTLY_Q8_0)
    model, _, _ = load_for_inference(run, "cpu")
    theirs, _ = load_theirs(path, model.config)  # transformers dequantizes Q8_0 as llama.cpp stores it
    ids = torch.randint(0, 300, (1, 40))
    with torch.no_grad():
        ours, other = model(ids), theirs(ids).logits
    assert 0 < (ours - other).abs().max() <= 3e-2 * ours.abs().max()


def test_each_q_and_k_head_has_its_halves_interleaved_and_the_mlp_is_split_gate_first(tmp_path):
    run = lmforge_run(tmp_path, byte_tokenizer(), **LLAMA_STYLE)
    path = export_gguf(run, tmp_path / "m.gguf")
    tensors = {t.name: torch.from_numpy(t.data.copy()) for t in gguf.GGUFReader(str(path)).tensors}
    model, _, _ = load_for_inference(run, "cpu")
    hd, nh, nkv = model.config.head_dim, model.config.n_head, model.config.n_kv_head
    q, k, v = model.blocks[1].attn.qkv.weight.split((nh * hd, nkv * hd, nkv * hd))
    head = slice(hd, 2 * hd)  # the second head: row 2i is the model's row i, row 2i + 1 its row i + hd/2
    assert torch.equal(tensors["blk.1.attn_q.weight"][head][0::2], q[head][: hd // 2])
    assert torch.equal(tensors["blk.1.attn_q.weight"][head][1::2], q[head][hd // 2:])
    assert torch.equal(tensors["blk.1.attn_k.weight"][head][1::2], k[head][hd // 2:])
    assert torch.equal(tensors["blk.1.attn_v.weight"], v)
    gate, up = model.blocks[1].mlp.fc.weight.chunk(2)
    assert torch.equal(tensors["blk.1.ffn_gate.weight"], gate) and torch.equal(tensors["blk.1.ffn_up.weight"], up)
    assert torch.equal(tensors["output.weight"], model.lm_head.weight)  # untied: the head is its own tensor


def test_a_model_vocabulary_wider_than_the_tokenizer_gets_unused_tokens(tmp_path):
    tok = byte_tokenizer()
    config = ModelConfig(vocab_size=tok.vocab_size + 5, **GPT2_STYLE)
    torch.manual_seed(0)
    gpt = GPT(config)
    perturb_norms(gpt)
    tok.save(tmp_path / "tokenizer.json")
    save_checkpoint(tmp_path / "run", 1, gpt, None, RunConfig(model=config), {"tokens_seen": 0},
                    tmp_path / "tokenizer.json")
    meta = fields(export_gguf(tmp_path / "run", tmp_path / "m.gguf"))
    assert len(meta["tokenizer.ggml.tokens"]) == config.vocab_size
    assert meta["tokenizer.ggml.token_type"][-5:] == [int(gguf.TokenType.UNUSED)] * 5
    assert meta["tokenizer.ggml.token_type"][:4] == [int(gguf.TokenType.CONTROL)] * 3 + [int(gguf.TokenType.BYTE)]
    assert meta["tokenizer.ggml.tokens"][3 + 0x20] == SPACE  # the byte kind's space: its byte token, spelled so


@pytest.mark.parametrize("model,reason", [
    (dict(mlp="relu2", pos_encoding="rope", norm="rmsnorm"), "model.mlp='relu2'"),
    (dict(qk_norm=True), "model.qk_norm=True"),
    (dict(causal=False), "encoder"),
])
def test_models_without_a_gguf_architecture_are_refused_naming_the_options(tmp_path, capsys, model, reason):
    run = lmforge_run(tmp_path, byte_tokenizer(), block_size=16, n_layer=1, n_head=2, n_embd=16, **model)
    assert main(["export", str(run), "--format", "gguf", "--out", str(tmp_path / "m.gguf")]) == 2
    err = capsys.readouterr().err.strip()
    assert reason in err and "--format onnx" in err and "\n" not in err
    assert not (tmp_path / "m.gguf").exists() and hidden(tmp_path) == []


def test_force_replaces_only_a_gguf_lmforge_wrote_and_a_failed_write_keeps_the_old_file(tmp_path, monkeypatch):
    run = lmforge_run(tmp_path, byte_tokenizer(), **GPT2_STYLE)
    out = export_gguf(run, tmp_path / "m.gguf")
    before = out.read_bytes()
    with pytest.raises(GGUFExportError, match="already holds a GGUF export .*: pass --force"):
        export_gguf(run, out)

    def torn(self):
        raise OSError(5, "Input/output error (injected)")

    monkeypatch.setattr(gguf.GGUFWriter, "write_tensors_to_file", torn)
    with pytest.raises(OSError, match="injected"):
        export_gguf(run, out, force=True)
    monkeypatch.undo()
    assert out.read_bytes() == before and hidden(tmp_path) == []
    assert export_gguf(run, out, force=True, dtype="f16").stat().st_size < len(before)
    (tmp_path / "mine.gguf").write_text("my notes")
    with pytest.raises(GGUFExportError, match="not a GGUF export written by lmforge: choose a new --out"):
        export_gguf(run, tmp_path / "mine.gguf", force=True)
    assert (tmp_path / "mine.gguf").read_text() == "my notes"
