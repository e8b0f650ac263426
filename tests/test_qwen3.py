"""Qwen3 (Qwen3ForCausalLM: a Llama-style model without biases whose heads' queries and keys are RMS-normalised before
RoPE, heads wider than hidden_size / num_attention_heads): imported from Hugging Face it computes transformers'
logits, exports back to a Qwen3 directory transformers loads, and travels through GGUF (llama.cpp's qwen3) and back;
model.head_size gives any lmforge model heads of their own width."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
from test_chat_template import instruct_dir  # noqa: E402
from test_interop import perturb_norms  # noqa: E402

transformers = pytest.importorskip("transformers")
gguf = pytest.importorskip("gguf")

import lmforge  # noqa: E402
from lmforge.checkpoint import load_for_inference  # noqa: E402
from lmforge.config import ModelConfig  # noqa: E402
from lmforge.errors import ConfigError  # noqa: E402
from lmforge.generate import GenerateConfig, generate_ids  # noqa: E402
from lmforge.interop.gguf_export import export_gguf  # noqa: E402
from lmforge.interop.gguf_import import import_gguf  # noqa: E402
from lmforge.interop.hf_export import export_hf  # noqa: E402
from lmforge.interop.hf_import import import_hf  # noqa: E402
from lmforge.model import GPT  # noqa: E402


def imported_instruct(root: Path, style: str, make_model) -> tuple[Path, Path, torch.nn.Module]:
    """(an instruct directory of `style` (test_chat_template.instruct_dir) holding make_model(vocab_size) instead,
    its norms perturbed so a misplaced gain shows; its lmforge import; the transformers model)."""
    hf_dir = instruct_dir(root / "hf", style)
    torch.manual_seed(0)
    model = make_model(len(transformers.AutoTokenizer.from_pretrained(hf_dir))).eval()
    perturb_norms(model)
    for f in ("model.safetensors", "config.json"):
        (hf_dir / f).unlink()
    model.save_pretrained(hf_dir)
    return hf_dir, import_hf(hf_dir, root / "run").parent.parent, model


@pytest.fixture(scope="module")
def qwen3(tmp_path_factory) -> tuple[Path, Path, "transformers.Qwen3ForCausalLM"]:
    """A tiny random Qwen3 (imported_instruct): heads of 16 over a 32-wide stream (4 query heads, 2 key/value)."""
    return imported_instruct(tmp_path_factory.mktemp("qwen3"), "chatml", lambda vocab: transformers.Qwen3ForCausalLM(
        transformers.Qwen3Config(vocab_size=vocab, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                 num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=128,
                                 tie_word_embeddings=True, rope_theta=1e6, rms_norm_eps=1e-6)))


def test_an_imported_qwen3_computes_transformers_logits_and_greedy_tokens(qwen3):
    hf_dir, run, theirs = qwen3
    ours, _, _ = load_for_inference(run, "cpu")
    c = ours.config
    assert (c.qk_norm, c.head_size, c.head_dim, c.bias, c.qkv_bias, c.n_kv_head) == (True, 16, 16, False, False, 2)
    ids = torch.randint(0, c.vocab_size, (2, 40))
    with torch.no_grad():
        assert (ours(ids) - theirs(ids).logits).abs().max() <= 1e-5
    prompt = ids[0, :6].tolist()
    with torch.no_grad():
        hf = theirs.generate(torch.tensor([prompt]), max_new_tokens=12, do_sample=False, pad_token_id=0,
                             eos_token_id=None)[0, 6:].tolist()
    assert generate_ids(ours, prompt, GenerateConfig(max_new_tokens=12, temperature=0.0))[0] == hf
    chat = lmforge.load(str(run))  # its chat template came along
    assert chat.render_chat([{"role": "user", "content": "Hi"}]).endswith("<|im_start|>assistant\n")


def test_qwen3_exports_to_a_directory_transformers_loads_as_qwen3(qwen3, tmp_path):
    _, run, theirs = qwen3
    export_hf(run, tmp_path / "out")
    config = json.loads((tmp_path / "out" / "config.json").read_text(encoding="utf-8"))
    assert config["model_type"] == "qwen3" and config["architectures"] == ["Qwen3ForCausalLM"]
    assert config["head_dim"] == 16 and config["attention_bias"] is False
    again = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    assert type(again).__name__ == "Qwen3ForCausalLM"
    ids = torch.randint(0, theirs.config.vocab_size, (2, 30))
    with torch.no_grad():
        assert torch.allclose(again(ids).logits, theirs(ids).logits, atol=1e-5)


def test_qwen3_travels_through_gguf_and_back(qwen3, tmp_path):
    _, run, theirs = qwen3
    path = export_gguf(run, tmp_path / "q3.gguf")
    reader = gguf.GGUFReader(str(path))
    meta = {name: field.contents() for name, field in reader.fields.items()}
    assert meta["general.architecture"] == "qwen3"
    assert meta["qwen3.attention.key_length"] == meta["qwen3.attention.value_length"] == 16
    names = {t.name for t in reader.tensors}
    assert {"blk.1.attn_q_norm.weight", "blk.1.attn_k_norm.weight"} <= names
    ours, _, _ = load_for_inference(run, "cpu")
    q = {t.name: torch.from_numpy(t.data.copy()) for t in reader.tensors}["blk.1.attn_q.weight"]
    assert torch.equal(q, ours.blocks[1].attn.qkv.weight[:64])  # halves rotated as in lmforge: rows in order
    back, _, _ = load_for_inference(import_gguf(path, tmp_path / "back"), "cpu")
    assert back.config == ours.config
    ids = torch.randint(0, theirs.config.vocab_size, (2, 30))
    with torch.no_grad():
        assert torch.equal(back(ids), ours(ids))


def test_head_size_gives_heads_their_own_width_and_an_odd_rope_width_is_refused():
    config = ModelConfig(n_embd=30, n_head=4, head_size=8, n_kv_head=2, pos_encoding="rope", norm="rmsnorm",
                         mlp="swiglu", bias=False)
    model = GPT(config)
    assert model.blocks[0].attn.qkv.weight.shape == (8 * (4 + 2 * 2), 30)
    assert model.blocks[0].attn.proj.weight.shape == (30, 32)
    assert model(torch.randint(0, 256, (1, 9))).shape == (1, 9, 256)
    with pytest.raises(ConfigError, match="model.head_size=7 is invalid: an even head width"):
        ModelConfig(n_embd=32, n_head=4, head_size=7, pos_encoding="rope")
    with pytest.raises(ConfigError, match="model.n_embd=30 is invalid: a multiple of n_head=4"):
        ModelConfig(n_embd=30, n_head=4)


def test_qk_norm_with_biases_is_refused_by_the_hf_export(tmp_path):
    from lmforge.interop.hf_llama import to_hf_config

    with pytest.raises(ConfigError, match=r"model.qkv_bias=True cannot be converted to Llama \(Qwen3"):
        to_hf_config(ModelConfig(n_embd=32, n_head=4, pos_encoding="rope", norm="rmsnorm", mlp="swiglu", bias=False,
                                 qkv_bias=True, qk_norm=True))
