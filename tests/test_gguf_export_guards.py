"""`lmforge export --format gguf`, what test_gguf_export leaves unchecked: the metadata llama.cpp reads and
transformers' GGUF reader ignores (norm eps, vocab size, file type, pre-tokenizer, space prefix, token types, the
BPE merges in order, special and unused tokens), a Llama-style model's biases (q and k reordered like their
weights), a tied head stored once, and the refusals, each before anything is written (a classifier, no tokenizer,
a tokenizer wider than the model, U+2581 in a char vocabulary, an unknown --gguf-type, an imported tokenizer that is
not GPT-2's byte-level BPE, an --out inside the checkpoint, --force over a GGUF file lmforge did not write)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
from test_interop import CORPUS, GPT2_STYLE, LLAMA_STYLE, hidden, lmforge_run  # noqa: E402

gguf = pytest.importorskip("gguf")

from lmforge import __version__  # noqa: E402
from lmforge.checkpoint import load_for_inference, save_checkpoint  # noqa: E402
from lmforge.config import ModelConfig, RunConfig  # noqa: E402
from lmforge.interop.gguf_export import SPACE, GGUFExportError, export_gguf  # noqa: E402
from lmforge.model import GPT  # noqa: E402
from lmforge.tokenizer import HF_KIND, Tokenizer, byte_tokenizer, train_bpe, train_char  # noqa: E402

T = gguf.TokenType


def fields(path: Path) -> dict:
    """The file's metadata as Python values."""
    return {name: field.contents() for name, field in gguf.GGUFReader(str(path)).fields.items()}


def tensors(path: Path) -> dict[str, torch.Tensor]:
    return {t.name: torch.from_numpy(t.data.copy()) for t in gguf.GGUFReader(str(path)).tensors}


def checkpoint(root: Path, tok: Tokenizer | None, vocab_size: int, **model) -> Path:
    """A run whose model has `vocab_size` ids (not necessarily the tokenizer's), with `tok` or no tokenizer."""
    config = ModelConfig(vocab_size=vocab_size, **model)
    root.mkdir(parents=True, exist_ok=True)
    if tok is not None:
        tok.save(root / "tokenizer.json")
    return save_checkpoint(root / "run", 1, GPT(config), None, RunConfig(model=config), {"tokens_seen": 0},
                           None if tok is None else root / "tokenizer.json").parent.parent


def test_llama_metadata_that_llama_cpp_reads(tmp_path):
    tok = train_char([text.replace(" ", "") for text in CORPUS], 300).with_mask_token()  # no space: id 259 is "!"
    run = lmforge_run(tmp_path, tok, **{**LLAMA_STYLE, "norm_eps": 1e-6})
    meta = fields(export_gguf(run, tmp_path / "out" / "tiny-llama.gguf", dtype="f16"))
    assert meta["llama.attention.layer_norm_rms_epsilon"] == pytest.approx(1e-6, rel=1e-6)
    assert meta["llama.vocab_size"] == tok.vocab_size == len(meta["tokenizer.ggml.tokens"])
    assert meta["general.file_type"] == int(gguf.LlamaFileType.MOSTLY_F16)
    assert meta["general.name"] == "tiny-llama" and meta["lmforge.version"] == __version__
    assert meta["tokenizer.ggml.pre"] == "default" and meta["tokenizer.ggml.add_space_prefix"] is False
    assert meta["tokenizer.ggml.add_eos_token"] is False
    types, tokens = meta["tokenizer.ggml.token_type"], meta["tokenizer.ggml.tokens"]
    assert types[:3] == [int(T.CONTROL)] * 3
    assert types[3:259] == [int(T.NORMAL if b == 0x20 else T.BYTE) for b in range(256)]  # 0x20: spelled U+2581
    assert set(types[259:tok.mask_id]) == {int(T.NORMAL)} and tokens[259:tok.mask_id] == tok._chars  # from the 1st
    assert (tokens[tok.mask_id], types[tok.mask_id]) == ("<MASK>", int(T.CONTROL))
    assert tokens[3 + 0x20] == SPACE  # no space character: its byte is the space token


def test_the_byte_kinds_space_is_a_normal_token_not_a_byte(tmp_path):
    """llama.cpp decodes a BYTE token from its <0xNN> spelling, which the space (spelled U+2581) does not have."""
    meta = fields(export_gguf(lmforge_run(tmp_path, byte_tokenizer(), **LLAMA_STYLE), tmp_path / "m.gguf"))
    types, space = meta["tokenizer.ggml.token_type"], 3 + 0x20
    assert meta["tokenizer.ggml.tokens"][space] == SPACE and types[space] == int(T.NORMAL)
    assert types[3:space] + types[space + 1:259] == [int(T.BYTE)] * 255


def test_gpt2_metadata_merges_in_order_and_distinct_unused_tokens(tmp_path):
    tok = train_bpe(CORPUS, 400)
    run = checkpoint(tmp_path, tok, tok.vocab_size + 3, **{**GPT2_STYLE, "norm_eps": 1e-3})
    meta = fields(export_gguf(run, tmp_path / "out" / "m.gguf", dtype="f16"))
    assert meta["gpt2.attention.layer_norm_epsilon"] == pytest.approx(1e-3, rel=1e-6)
    assert meta["general.file_type"] == int(gguf.LlamaFileType.MOSTLY_F16)
    assert meta["tokenizer.ggml.model"] == "gpt2" and meta["tokenizer.ggml.pre"] == "gpt-2"
    merges = tok.to_dict()["hf_tokenizer"]["model"]["merges"]
    assert len(merges) > 50 and meta["tokenizer.ggml.merges"] == [m if isinstance(m, str) else " ".join(m)
                                                                  for m in merges]
    tokens = meta["tokenizer.ggml.tokens"]
    assert len(set(tokens)) == len(tokens) == tok.vocab_size + 3  # unused ids: names of their own
    types = meta["tokenizer.ggml.token_type"]  # no BYTE type in a BPE vocabulary: llama.cpp would print nothing
    assert types == [int(T.CONTROL)] * 3 + [int(T.NORMAL)] * (tok.vocab_size - 3) + [int(T.UNUSED)] * 3


def test_llama_biases_are_split_and_q_k_reordered_like_their_weights(tmp_path):
    run = lmforge_run(tmp_path, byte_tokenizer(), **{**LLAMA_STYLE, "bias": True})
    got = tensors(export_gguf(run, tmp_path / "m.gguf"))
    model, _, _ = load_for_inference(run, "cpu")
    hd, nh, nkv = model.config.head_dim, model.config.n_head, model.config.n_kv_head
    block = model.blocks[1]
    q, k, v = block.attn.qkv.bias.split((nh * hd, nkv * hd, nkv * hd))
    for name, ours, heads in (("attn_q", q, nh), ("attn_k", k, nkv)):
        theirs = got[f"blk.1.{name}.bias"].reshape(heads, hd)
        ours = ours.reshape(heads, 2, hd // 2)
        assert torch.equal(theirs[:, 0::2], ours[:, 0]) and torch.equal(theirs[:, 1::2], ours[:, 1]), name
    assert torch.equal(got["blk.1.attn_v.bias"], v) and torch.equal(got["blk.1.attn_output.bias"], block.attn.proj.bias)
    gate, up = block.mlp.fc.bias.chunk(2)
    assert torch.equal(got["blk.1.ffn_gate.bias"], gate) and torch.equal(got["blk.1.ffn_up.bias"], up)
    assert torch.equal(got["blk.1.ffn_down.bias"], block.mlp.proj.bias)
    assert not any(name.endswith("norm.bias") for name in got)  # RMSNorm has none


def test_a_tied_head_is_not_stored_again(tmp_path):
    run = lmforge_run(tmp_path, byte_tokenizer(), **{**LLAMA_STYLE, "tie_embeddings": True})
    names = set(tensors(export_gguf(run, tmp_path / "m.gguf")))
    assert "token_embd.weight" in names and "output.weight" not in names


def hf_tokenizer(variant: str, special: bool = True) -> Tokenizer:
    """An imported (kind hf) byte-level BPE: GPT-2's rule, or one thing about it changed."""
    from tokenizers import AddedToken, Tokenizer as HFTokenizer, decoders, models, normalizers, pre_tokenizers, trainers

    hf = HFTokenizer(models.WordLevel(unk_token="</s>") if variant == "word-level"
                     else models.BPE(byte_fallback=variant == "byte-fallback"))
    hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=variant != "no-regex")
    hf.decoder = decoders.ByteLevel()
    if variant == "normalizer":
        hf.normalizer = normalizers.NFKC()
    trainer = (trainers.WordLevelTrainer(special_tokens=["</s>"], show_progress=False) if variant == "word-level"
               else trainers.BpeTrainer(vocab_size=300, special_tokens=["</s>"], show_progress=False))
    hf.train_from_iterator(CORPUS, trainer)
    if special:  # added after training: in added_tokens only, not in the BPE vocabulary
        hf.add_special_tokens([AddedToken("<|eot|>", special=True, normalized=False)])
    eot = hf.token_to_id("<|eot|>") if special else 0
    return Tokenizer(HF_KIND, hf_json=hf.to_str(), special_ids={"start": None, "end": eot, "pad": None})


def test_an_imported_tokenizers_added_tokens_and_absent_roles(tmp_path):
    tok = hf_tokenizer("gpt2")
    meta = fields(export_gguf(checkpoint(tmp_path, tok, tok.vocab_size, **GPT2_STYLE), tmp_path / "m.gguf"))
    assert meta["tokenizer.ggml.tokens"][tok.end_id] == "<|eot|>" and tok.end_id == tok.vocab_size - 1
    assert meta["tokenizer.ggml.token_type"][tok.end_id] == int(T.CONTROL)
    assert meta["tokenizer.ggml.eos_token_id"] == tok.end_id and meta["tokenizer.ggml.add_bos_token"] is False
    assert "tokenizer.ggml.bos_token_id" not in meta and "tokenizer.ggml.padding_token_id" not in meta


@pytest.mark.parametrize("variant", ["byte-fallback", "normalizer", "word-level", "no-regex"])
def test_imported_tokenizers_unlike_gpt2s_byte_level_bpe_are_refused(tmp_path, variant):
    tok = hf_tokenizer(variant, special=False)
    run = checkpoint(tmp_path, tok, tok.vocab_size, **GPT2_STYLE)
    with pytest.raises(GGUFExportError, match="not byte-level BPE with a pre-tokenizer rule GGUF names"):
        export_gguf(run, tmp_path / "m.gguf")
    assert not (tmp_path / "m.gguf").exists() and hidden(tmp_path) == []


def refused_setup(case: str, root: Path) -> tuple[Path, dict, str]:
    """(run, export_gguf keywords, the message expected) for one refusal."""
    tok = byte_tokenizer()
    if case == "classifier":
        return checkpoint(root, tok, tok.vocab_size, head="classify", num_labels=2, **GPT2_STYLE), {}, \
            "holds a classify model; GGUF export writes language models"
    if case == "relu2":
        return checkpoint(root, tok, tok.vocab_size, **{**LLAMA_STYLE, "mlp": "relu2"}), {}, \
            "has no GGUF equivalent \\(gpt2, llama, qwen2 or qwen3\\): .*model.mlp='relu2'"
    if case == "no-tokenizer":
        return checkpoint(root, None, tok.vocab_size, **GPT2_STYLE), {}, "has no tokenizer"
    if case == "narrow-model":
        return checkpoint(root, tok, tok.vocab_size - 1, **GPT2_STYLE), {}, \
            f"the tokenizer has {tok.vocab_size} tokens but the model only {tok.vocab_size - 1}"
    if case == "u2581":
        tok = train_char(CORPUS + [f"a{SPACE}b"], 1000)
        assert SPACE in tok._chars
        return checkpoint(root, tok, tok.vocab_size, **LLAMA_STYLE), {}, "holds '\u2581' \\(U\\+2581\\)"
    return checkpoint(root, tok, tok.vocab_size, **GPT2_STYLE), {"dtype": "q4_k"}, \
        "--gguf-type 'q4_k' is not one of f32, f16, bf16, q8_0, q5_1, q5_0, q4_1, q4_0"


@pytest.mark.parametrize("case", ["classifier", "relu2", "no-tokenizer", "narrow-model", "u2581", "bad-type"])
def test_refusals_name_the_reason_and_write_nothing(tmp_path, case):
    run, kwargs, message = refused_setup(case, tmp_path / "in")
    out = tmp_path / "out" / "m.gguf"
    with pytest.raises(GGUFExportError, match=message):
        export_gguf(run, out, **kwargs)
    assert not out.exists() and (not out.parent.exists() or hidden(out.parent) == [])


def test_an_out_inside_the_checkpoint_is_refused(tmp_path):
    run = lmforge_run(tmp_path, byte_tokenizer(), **GPT2_STYLE)
    with pytest.raises(GGUFExportError, match="lies inside the input .*: choose an --out apart from the inputs"):
        export_gguf(run, run / "m.gguf")
    assert not (run / "m.gguf").exists()


def test_force_never_replaces_a_gguf_file_lmforge_did_not_write(tmp_path):
    run = lmforge_run(tmp_path, byte_tokenizer(), **GPT2_STYLE)
    theirs = tmp_path / "theirs.gguf"
    writer = gguf.GGUFWriter(str(theirs), "llama")
    writer.add_name("someone else's model")
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    before = theirs.read_bytes()
    assert "general.name" in fields(theirs)
    with pytest.raises(GGUFExportError, match="not a GGUF export written by lmforge: choose a new --out"):
        export_gguf(run, theirs, force=True)
    assert theirs.read_bytes() == before and hidden(tmp_path) == []


def test_a_bpe_tokenizers_mask_token_keeps_its_name_and_is_a_control_token(tmp_path):
    tok = train_bpe(CORPUS, 400).with_mask_token()
    config = ModelConfig(vocab_size=tok.vocab_size, **GPT2_STYLE)
    tok.save(tmp_path / "tokenizer.json")
    save_checkpoint(tmp_path / "run", 1, GPT(config), None, RunConfig(model=config), {"tokens_seen": 0},
                    tmp_path / "tokenizer.json")
    reader = gguf.GGUFReader(str(export_gguf(tmp_path / "run", tmp_path / "m.gguf")))
    tokens, types = (reader.fields[f"tokenizer.ggml.{k}"].contents() for k in ("tokens", "token_type"))
    assert len(tokens) == tok.vocab_size
    assert (tokens[tok.mask_id], types[tok.mask_id]) == (tok.mask_token, int(T.CONTROL))
