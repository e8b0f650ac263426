"""Llama 3.1's and 3.2's RoPE frequency scaling (rope_type llama3: model.rope_scaling): an imported Llama with it
computes transformers' logits (and, without it, would not), exports back with the same rope_scaling, and a GGUF
export, which does not write it yet, is refused in one line."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
from test_qwen3 import imported_instruct  # noqa: E402

transformers = pytest.importorskip("transformers")

from lmforge.checkpoint import load_for_inference  # noqa: E402
from lmforge.config import ModelConfig  # noqa: E402
from lmforge.errors import ConfigError  # noqa: E402
from lmforge.interop.gguf_export import GGUFExportError, export_gguf  # noqa: E402
from lmforge.interop.hf_export import export_hf  # noqa: E402
from lmforge.model import GPT  # noqa: E402

# numbers that reach every kind of frequency of 16-wide heads (theta 500000): wavelengths below 32 kept, above 256
# divided by the factor, two (32.5 and 168) on the ramp between
SCALING = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 8.0,
           "original_max_position_embeddings": 256}


@pytest.fixture(scope="module")
def llama3(tmp_path_factory):
    return imported_instruct(tmp_path_factory.mktemp("llama3"), "llama3", lambda vocab: transformers.LlamaForCausalLM(
        transformers.LlamaConfig(vocab_size=vocab, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                 num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                                 tie_word_embeddings=True, rope_parameters={"rope_theta": 500000.0, **SCALING})))


def test_an_imported_llama3_scaled_model_computes_transformers_logits(llama3):
    _, run, theirs = llama3
    ours, _, _ = load_for_inference(run, "cpu")
    c = ours.config
    assert (c.rope_scaling, c.rope_factor, c.rope_low_freq_factor, c.rope_high_freq_factor,
            c.rope_original_context) == ("llama3", 8.0, 1.0, 8.0, 256)
    ids = torch.randint(0, c.vocab_size, (2, 120))
    with torch.no_grad():
        assert (ours(ids) - theirs(ids).logits).abs().max() <= 1e-5
        plain = GPT(ModelConfig(**{**vars(c), "rope_scaling": "none"})).eval()
        plain.load_state_dict(ours.state_dict())
        assert (plain(ids) - theirs(ids).logits).abs().max() > 1e-3  # the scaling is what makes them equal


def test_the_scaling_exports_back_to_transformers(llama3, tmp_path):
    _, run, theirs = llama3
    export_hf(run, tmp_path / "out")
    config = json.loads((tmp_path / "out" / "config.json").read_text(encoding="utf-8"))
    assert {k: config["rope_scaling"][k] for k in SCALING} == SCALING
    again = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    ids = torch.randint(0, theirs.config.vocab_size, (2, 100))
    with torch.no_grad():
        assert torch.allclose(again(ids).logits, theirs(ids).logits, atol=1e-5)


def test_gguf_export_of_scaled_rope_is_refused_and_bad_factors_are_config_errors(llama3, tmp_path):
    _, run, _ = llama3
    with pytest.raises(GGUFExportError, match="model.rope_scaling='llama3'.*--format hf"):
        export_gguf(run, tmp_path / "m.gguf")
    assert not (tmp_path / "m.gguf").exists()
    with pytest.raises(ConfigError, match="model.rope_high_freq_factor=1.0 is invalid: above rope_low_freq_factor"):
        ModelConfig(pos_encoding="rope", rope_scaling="llama3", rope_low_freq_factor=1.0, rope_high_freq_factor=1.0)
    from lmforge.interop.hf_llama import from_hf_config

    with pytest.raises(ConfigError, match="rope_type='llama3' needs factor"):
        from_hf_config({"model_type": "llama", "hidden_size": 32, "num_attention_heads": 4, "num_hidden_layers": 1,
                        "vocab_size": 10, "intermediate_size": 64, "rope_scaling": {"rope_type": "llama3"}})


def test_a_gguf_with_rope_freqs_is_refused_not_imported_without_them(tmp_path, monkeypatch):
    """A GGUF Llama 3.1/3.2 carries its RoPE scaling as a rope_freqs.weight tensor: an import that dropped it would
    compute another model, so a tensor the model has no place for is refused, naming it."""
    import lmforge.interop.gguf_export as gguf_export
    from lmforge.interop.gguf_import import GGUFImportError, import_gguf
    from test_gguf_export import MAKERS
    from test_interop import LLAMA_STYLE, lmforge_run

    run = lmforge_run(tmp_path, MAKERS["char"](), **LLAMA_STYLE)
    plain = gguf_export._tensors

    def with_rope_freqs(state, config, arch):
        yield from plain(state, config, arch)
        yield "rope_freqs.weight", torch.ones(config.head_dim // 2)

    monkeypatch.setattr(gguf_export, "_tensors", with_rope_freqs)
    path = export_gguf(run, tmp_path / "m.gguf")
    with pytest.raises(GGUFImportError, match="no place for: rope_freqs.weight \\(rope_freqs.weight: Llama 3.1's"):
        import_gguf(path, tmp_path / "back")
    assert not (tmp_path / "back").exists()
