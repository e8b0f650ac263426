"""Attention maps (lmforge.explain, `lmforge attention`): the formula on the model's own Q and K, for every kind of model.

The weights are sharpened (sharp_attention.py) so each query picks a few keys: with the std 0.02 init attention is
near uniform and a wrong scale or mask would hide inside any tolerance. Each comparison first checks that a 1%
change of the scale moves the maps by far more than the tolerance.
"""

from __future__ import annotations

import dataclasses
import math
import os
import struct

import pytest
import torch

from lmforge.checkpoint import save_checkpoint
from lmforge.cli import main
from lmforge.config import ModelConfig, RunConfig
from lmforge.errors import ConfigError
from lmforge.explain import attention_maps, attention_weights
from lmforge.model import GPT, apply_rope, fused_attention, reference_attention
from lmforge.tokenizer import byte_tokenizer
from sharp_attention import sharpen, sharpen_hf_gpt2

TOLERANCE = 1e-5
CAUSAL_FIELD = "causal" in {f.name for f in dataclasses.fields(ModelConfig)}
SHAPES = {
    "gpt2-style": dict(),
    "llama-style": dict(pos_encoding="rope", n_kv_head=2, norm="rmsnorm", mlp="swiglu", bias=False),
    "encoder": dict(causal=False),
}


def sharp_model(attention: str = "sdpa", **overrides) -> GPT:
    torch.manual_seed(0)
    config = ModelConfig(vocab_size=64, block_size=24, n_layer=2, n_head=4, n_embd=32, attention=attention,
                         **overrides)
    return sharpen(GPT(config)).eval()


@torch.no_grad()
def by_hand(model: GPT, idx: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
    """(n_layer, nh, T, T): softmax(Q K^T / sqrt(d_k)) written out from each layer's qkv weights, the residual
    stream carried from layer to layer by the blocks themselves; `scale` multiplies 1/sqrt(d_k)."""
    c = model.config
    nh, nkv, hd, T = c.n_head, c.n_kv_head, c.head_dim, idx.numel()
    x = model.tok_emb(idx.view(1, T))  # (1, T, C)
    if c.pos_encoding == "learned":
        x = x + model.pos_emb.weight[:T]
    rope = (model.rope_cos[:T], model.rope_sin[:T]) if c.pos_encoding == "rope" else None
    maps = []
    for block in model.blocks:
        h = block.norm_1(x)[0]  # (T, C)
        W, b = block.attn.qkv.weight, block.attn.qkv.bias
        qkv = h @ W.T + (b if b is not None else 0)  # (T, (nh + 2 nkv) hd)
        q = qkv[:, :nh * hd].view(T, nh, hd).transpose(0, 1)  # (nh, T, hd)
        k = qkv[:, nh * hd:(nh + nkv) * hd].view(T, nkv, hd).transpose(0, 1)  # (nkv, T, hd)
        if rope is not None:
            q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        k = k[torch.arange(nh) // (nh // nkv)]  # query head i reads key head i // (nh / nkv)
        scores = q @ k.transpose(1, 2) * scale / math.sqrt(hd)  # (nh, T, T)
        if getattr(c, "causal", True):
            scores = scores.masked_fill(torch.ones(T, T, dtype=torch.bool).triu(1), -math.inf)
        maps.append(torch.softmax(scores, dim=-1))
        x = block(x, None if rope is None else (rope[0][:, None], rope[1][:, None]))  # (T, 1, hd): the block's layout
    return torch.stack(maps)


def shapes() -> list:
    skip = [] if CAUSAL_FIELD else [pytest.mark.skip(reason="model.causal not built yet")]
    return [pytest.param(overrides, id=name, marks=skip if name == "encoder" else []) for name, overrides in SHAPES.items()]


@pytest.mark.parametrize("attention", ["sdpa", "reference"])
@pytest.mark.parametrize("overrides", shapes())
def test_maps_are_the_formula_on_the_models_own_q_and_k(overrides, attention):
    model = sharp_model(attention, **overrides)
    default_path = model.blocks[0].attn.attend
    assert default_path is (fused_attention if attention == "sdpa" else reference_attention)
    idx = torch.randint(0, 64, (20,), generator=torch.Generator().manual_seed(1))
    maps = attention_weights(model, idx)
    expected = by_hand(model, idx)
    assert maps.shape == (2, 4, 20, 20)
    assert (maps - by_hand(model, idx, scale=1.01)).abs().max() > 100 * TOLERANCE  # sharp: 1% of scale shows
    assert (maps - expected).abs().max() <= TOLERANCE
    assert torch.allclose(maps.sum(-1), torch.ones(2, 4, 20), atol=1e-6)  # each query's weights sum to 1
    upper = maps.triu(diagonal=1)
    if overrides.get("causal", True):
        assert upper.abs().max() == 0  # a decoder never looks ahead
    else:
        assert upper.sum(-1)[..., :-1].min() > 0  # an encoder looks at later tokens too
    assert model.blocks[0].attn.attend is default_path  # the model's own path is back


def test_a_model_in_training_mode_gives_the_same_maps_and_stays_in_training_mode():
    model = sharp_model().train()
    idx = torch.randint(0, 64, (12,), generator=torch.Generator().manual_seed(2))
    expected = by_hand(model.eval(), idx)
    model.train()
    assert (attention_weights(model, idx) - expected).abs().max() <= TOLERANCE
    assert model.training  # given back as it came


def test_a_text_longer_than_the_context_is_refused():
    model = sharp_model()
    with pytest.raises(ConfigError, match="25 tokens, longer than the model's context of 24"):
        attention_weights(model, torch.zeros(25, dtype=torch.long))


# ------------------------------------------------------------------------------- imported HF models
@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_imported_model_maps_equal_transformers_attentions(tmp_path, arch):
    """A transformers model with sharp random weights, saved and brought in by `lmforge import`: the maps of the
    imported checkpoint equal what transformers returns with output_attentions=True (eager attention)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    transformers = pytest.importorskip("transformers")
    from test_interop import byte_level_bpe

    torch.manual_seed(0)
    if arch == "gpt2":
        tok = byte_level_bpe(["<|endoftext|>"])
        hf = transformers.GPT2LMHeadModel(transformers.GPT2Config(
            vocab_size=tok.get_vocab_size(), n_positions=64, n_layer=2, n_head=2, n_embd=32))
        sharpen_hf_gpt2(hf)
        hf_tok = transformers.GPT2TokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>")
    else:
        tok = byte_level_bpe(["<|begin_of_text|>", "<|end_of_text|>"], bos="<|begin_of_text|>")
        hf = transformers.LlamaForCausalLM(transformers.LlamaConfig(
            vocab_size=tok.get_vocab_size(), hidden_size=32, intermediate_size=48, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64, rope_theta=500000.0,
            tie_word_embeddings=False))
        with torch.no_grad():
            for layer in hf.model.layers:
                layer.self_attn.q_proj.weight.mul_(16)
                layer.self_attn.k_proj.weight.mul_(16)
        hf_tok = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|begin_of_text|>",
                                                      eos_token="<|end_of_text|>")
    hf.eval().save_pretrained(tmp_path / "hf")
    hf_tok.save_pretrained(tmp_path / "hf")
    assert main(["import", str(tmp_path / "hf"), "--out", str(tmp_path / "run")]) == 0

    text = "Hello, world! The quick brown fox jumps"
    maps, labels = attention_maps(tmp_path / "run", text)
    ids = hf_tok(text).input_ids
    hf.set_attn_implementation("eager")
    with torch.no_grad():
        theirs = torch.cat(hf(torch.tensor([ids]), output_attentions=True).attentions)  # (n_layer, nh, T, T)
    assert len(labels) == len(ids) and maps.shape == theirs.shape
    assert maps.max() > 0.99  # sharp: some query puts nearly all its weight on one key
    assert (maps - theirs).abs().max() <= TOLERANCE


# -------------------------------------------------------------------------------------------- the CLI
@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """A checkpoint of a sharp decoder over the byte vocabulary, with its tokenizer."""
    root = tmp_path_factory.mktemp("attention")
    tok = byte_tokenizer()
    tok.save(root / "tokenizer.json")
    torch.manual_seed(0)
    config = ModelConfig(vocab_size=tok.vocab_size, block_size=80, n_layer=2, n_head=2, n_embd=32)
    save_checkpoint(root / "run", 0, sharpen(GPT(config)), None, RunConfig(model=config), {"tokens_seen": 0},
                    root / "tokenizer.json")
    return root / "run"


def png_size(path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    return struct.unpack(">II", data[16:24])


def test_cli_draws_the_grid_and_one_panel(run_dir, tmp_path, capsys):
    assert main(["attention", str(run_dir), "--text", "to be or not", "--out", str(tmp_path / "grid.png")]) == 0
    assert capsys.readouterr().out.strip() == str(tmp_path / "grid.png")
    assert main(["attention", str(run_dir), "--text", "to be or not", "--layer", "1", "--head", "0",
                 "--out", str(tmp_path / "one.png")]) == 0
    grid, one = png_size(tmp_path / "grid.png"), png_size(tmp_path / "one.png")
    assert grid[0] > 1.5 * one[0] and grid[1] > 1.5 * one[1]  # 2 x 2 maps against one


def test_cli_clips_a_long_text_with_a_note(run_dir, tmp_path, capsys):
    assert main(["attention", str(run_dir), "--text", "x" * 70, "--layer", "0", "--head", "1",
                 "--out", str(tmp_path / "long.png")]) == 0
    assert "showing the first 64 of 71 tokens" in capsys.readouterr().err  # <START> + 70 bytes
    png_size(tmp_path / "long.png")


@pytest.mark.parametrize("extra, message", [
    (["--text", "y" * 80], "the text is 81 tokens, longer than the model's context of 80: shorten it"),
    (["--text", "hi", "--layer", "2"], "--layer 2 is out of range: this model has 2 layers, numbered 0 to 1"),
    (["--text", "hi", "--head", "-1"], "--head -1 is out of range: this model has 2 heads, numbered 0 to 1"),
])
def test_cli_bad_input_is_one_line_and_writes_nothing(run_dir, tmp_path, capsys, extra, message):
    out = tmp_path / "attn.png"
    assert main(["attention", str(run_dir), *extra, "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err == f"lmforge attention: error: {message}\n"
    assert not out.exists() and list(tmp_path.iterdir()) == []
