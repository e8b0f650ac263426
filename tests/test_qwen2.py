"""Qwen2 (Qwen2, Qwen2.5): a Llama-style model with biases on the q, k and v projections only (model.qkv_bias),
imported from Hugging Face, exported to Hugging Face and to GGUF (llama.cpp's qwen2), computing and tokenizing as
transformers does at every step."""

from __future__ import annotations

import json
import sys
import unicodedata
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
from test_gguf_export import fields, load_theirs  # noqa: E402
from test_gguf_import import rewrite  # noqa: E402
from test_gguf_pretokenizers import EOS, TEXTS, hf_tokenizer  # noqa: E402
from test_interop import max_diff, perturb_norms  # noqa: E402

gguf = pytest.importorskip("gguf")
transformers = pytest.importorskip("transformers")

from lmforge.checkpoint import load_for_inference  # noqa: E402
from lmforge.cli import main  # noqa: E402
from lmforge.generate import prompt_ids  # noqa: E402
from lmforge.interop.gguf_export import export_gguf  # noqa: E402
from lmforge.interop.gguf_import import import_gguf  # noqa: E402
from lmforge.interop.hf_export import export_hf  # noqa: E402
from lmforge.interop.hf_import import HFImportError, import_hf  # noqa: E402

TOLERANCE = 1e-5


@pytest.fixture(scope="module")
def qwen_dir(tmp_path_factory) -> Path:
    """A small Qwen2ForCausalLM (grouped-query heads, tied embeddings, rope_theta 1e6) with non-zero q/k/v biases and
    a Qwen2-style tokenizer (NFC, single digits, no bos), saved as transformers saves it."""
    root = tmp_path_factory.mktemp("qwen2") / "hf"
    tok = hf_tokenizer("qwen2", bos=False)
    torch.manual_seed(0)
    model = transformers.Qwen2ForCausalLM(transformers.Qwen2Config(
        vocab_size=tok.get_vocab_size() + 3, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64, rms_norm_eps=1e-6,
        rope_theta=1e6, tie_word_embeddings=True, use_sliding_window=False, eos_token_id=tok.token_to_id(EOS))).eval()
    perturb_norms(model)  # Qwen2 starts its biases at zero: a dropped or misplaced one would not show
    model.save_pretrained(root)
    transformers.PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOS).save_pretrained(root)
    return root


def test_a_qwen2_model_imports_with_its_biases_and_computes_and_tokenizes_as_transformers(qwen_dir, tmp_path):
    run = import_hf(qwen_dir, tmp_path / "run")
    ours, tok, _ = load_for_inference(run, "cpu")
    assert (ours.config.qkv_bias, ours.config.bias, ours.config.n_kv_head) == (True, False, 2)
    assert ours.blocks[0].attn.qkv.bias is not None and ours.blocks[0].attn.proj.bias is None
    assert ours.blocks[0].mlp.fc.bias is None
    theirs = transformers.AutoModelForCausalLM.from_pretrained(qwen_dir).eval()
    ids = torch.randint(0, ours.config.vocab_size, (2, 40))
    assert max_diff(ours, theirs, ids) <= TOLERANCE
    their_tok = transformers.AutoTokenizer.from_pretrained(qwen_dir)
    for text in TEXTS:
        assert prompt_ids(tok, text) == their_tok(text).input_ids, text
    assert tok.start_id is None and tok.end_id == their_tok.eos_token_id


def test_a_qwen2_model_exports_to_hugging_face_as_qwen2(qwen_dir, tmp_path):
    run = import_hf(qwen_dir, tmp_path / "run")
    assert main(["export", str(run), "--format", "hf", "--out", str(tmp_path / "out")]) == 0
    config = json.loads((tmp_path / "out" / "config.json").read_text(encoding="utf-8"))
    assert (config["model_type"], config["architectures"]) == ("qwen2", ["Qwen2ForCausalLM"])
    again = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    original = transformers.AutoModelForCausalLM.from_pretrained(qwen_dir).eval()
    assert type(again).__name__ == "Qwen2ForCausalLM"
    ids = torch.randint(0, config["vocab_size"], (2, 40))
    with torch.no_grad():
        assert (again(ids).logits - original(ids).logits).abs().max() <= TOLERANCE
    ours, _, _ = load_for_inference(run, "cpu")
    exported = export_hf(run, tmp_path / "again", force=False)
    assert exported.is_dir() and max_diff(ours, again, ids) <= TOLERANCE


def test_a_qwen2_model_goes_to_gguf_as_llama_cpps_qwen2_and_back(qwen_dir, tmp_path):
    run = import_hf(qwen_dir, tmp_path / "run")
    path = export_gguf(run, tmp_path / "gguf" / "m.gguf")
    meta = fields(path)
    assert (meta["general.architecture"], meta["tokenizer.ggml.pre"]) == ("qwen2", "qwen2")
    reader = gguf.GGUFReader(str(path))
    biases = {t.name.split(".")[-2] for t in reader.tensors if t.name.startswith("blk.0.") and t.name.endswith("bias")}
    assert biases == {"attn_q", "attn_k", "attn_v"}
    ours, tok, _ = load_for_inference(run, "cpu")
    original = transformers.AutoModelForCausalLM.from_pretrained(qwen_dir).eval()
    # transformers' GGUF reader (llama.cpp's layout: qwen2 rotates halves, so q/k rows stay in order)
    theirs, their_tok = load_theirs(path, ours.config)
    ids = torch.randint(0, ours.config.vocab_size, (2, 40))
    assert max_diff(ours, theirs, ids) <= TOLERANCE
    for text in TEXTS[:-1]:  # in NFC already (the reader leaves the normalizer out, as llama.cpp does)
        text = unicodedata.normalize("NFC", text)
        assert their_tok(text).input_ids == prompt_ids(tok, text), text
    back, back_tok, _ = load_for_inference(import_gguf(path, tmp_path / "back"), "cpu")
    assert back.config == ours.config
    with torch.no_grad():
        assert torch.equal(back(ids), ours(ids))
        assert (back(ids) - original(ids).logits).abs().max() <= TOLERANCE
    for text in TEXTS:  # NFC included: the qwen2 rule brings Qwen2's normalizer back
        assert prompt_ids(back_tok, text) == prompt_ids(tok, text), text


def test_qwen2_files_lmforge_cannot_compute_are_refused(qwen_dir, tmp_path, capsys):
    sliding = tmp_path / "sliding"
    sliding.mkdir()
    for f in qwen_dir.iterdir():
        (sliding / f.name).write_bytes(f.read_bytes())
    config = json.loads((sliding / "config.json").read_text(encoding="utf-8"))
    (sliding / "config.json").write_text(json.dumps({**config, "use_sliding_window": True, "sliding_window": 16}))
    with pytest.raises(HFImportError, match="use_sliding_window=true .* no lmforge equivalent"):
        import_hf(sliding, tmp_path / "run1")
    path = export_gguf(import_hf(qwen_dir, tmp_path / "run"), tmp_path / "m.gguf")
    as_llama = rewrite(path, tmp_path / "llama.gguf", {"general.architecture": "llama",
                                                       **{k.replace("qwen2.", "llama."): v
                                                          for k, v in fields(path).items() if k.startswith("qwen2.")}})
    assert main(["import", str(as_llama), "--out", str(tmp_path / "back")]) == 2  # llama: all biases or none
    err = capsys.readouterr().err.strip()
    assert "biases on attn_k, attn_q, attn_v only" in err and "qwen2 (llama with q/k/v biases)" in err, err
    assert not (tmp_path / "back").exists() and not (tmp_path / "run1").exists()
