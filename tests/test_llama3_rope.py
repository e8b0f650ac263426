"""Llama 3.1's and 3.2's RoPE frequency scaling (rope_type llama3: model.rope_scaling): an imported Llama with it
computes transformers' logits (and, without it, would not), exports back with the same rope_scaling, and goes to
GGUF as llama.cpp's rope_freqs.weight and back."""

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


def test_gguf_export_writes_llama_cpps_rope_freqs_and_imports_back_to_the_same_scaling(llama3, tmp_path):
    """llama.cpp reads Llama 3.1's scaling as rope_freqs.weight, what each frequency is divided by: the export writes
    transformers' own scaled frequencies' ratio to the plain ones, and the import recovers the settings from it."""
    import gguf
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    from lmforge.interop.gguf_import import import_gguf

    _, run, theirs = llama3
    path = export_gguf(run, tmp_path / "m.gguf")
    stored = {t.name: t for t in gguf.GGUFReader(str(path)).tensors}["rope_freqs.weight"]
    assert stored.tensor_type == gguf.GGMLQuantizationType.F32
    scaled, _ = ROPE_INIT_FUNCTIONS["llama3"](theirs.config, "cpu")
    plain = 500000.0 ** (-torch.arange(0, 16, 2, dtype=torch.float32) / 16)
    factors = torch.from_numpy(stored.data.copy())
    assert torch.allclose(factors, plain / scaled, rtol=1e-6)
    assert factors.min() == 1.0 and factors.max() == 8.0 and ((factors > 1) & (factors < 8)).sum() == 2
    ours, _, _ = load_for_inference(run, "cpu")
    back, _, _ = load_for_inference(import_gguf(path, tmp_path / "back"), "cpu")
    c = back.config
    assert (c.rope_scaling, c.rope_factor, c.rope_low_freq_factor, c.rope_high_freq_factor,
            c.rope_original_context) == ("llama3", 8.0, 1.0, 8.0, 256)
    ids = torch.randint(0, c.vocab_size, (2, 120))
    with torch.no_grad():
        assert (back(ids) - ours(ids)).abs().max() <= 1e-5


def test_llama3_settings_scaled_alike_import_as_the_same_frequencies_and_bad_factors_are_refused(tmp_path,
                                                                                                 monkeypatch):
    """Original context, low and high factors scaled alike make the same frequencies, so the file determines them
    only up to that: the import sets low to 1 and computes the same model. Factors no llama3 setting makes, or a
    ramp too short to fit, are refused in one line and nothing is written."""
    import lmforge.interop.gguf_export as gguf_export
    from lmforge.interop.gguf_import import GGUFImportError, import_gguf
    from test_gguf_export import MAKERS
    from test_interop import LLAMA_STYLE, lmforge_run

    # 32-wide heads: wavelengths 73.6 and 167 on the ramp between 550 / 12 and 550 / 3; with low 1 the context would
    # be 183.33, so it is 183 and low and high scale with it
    shape = {**LLAMA_STYLE, "n_embd": 128, "rope_theta": 500000.0, "rope_scaling": "llama3", "rope_factor": 8.0,
             "rope_low_freq_factor": 3.0, "rope_high_freq_factor": 12.0, "rope_original_context": 550}
    run = lmforge_run(tmp_path / "scaled", MAKERS["char"](), **shape)
    back, _, _ = load_for_inference(import_gguf(export_gguf(run, tmp_path / "s.gguf"), tmp_path / "s"), "cpu")
    c = back.config
    assert c.rope_original_context == 183
    assert c.rope_low_freq_factor == pytest.approx(183 / (550 / 3), rel=1e-6)
    assert c.rope_high_freq_factor == pytest.approx(4 * 183 / (550 / 3), rel=1e-6)
    ours, _, _ = load_for_inference(run, "cpu")
    ids = torch.randint(0, c.vocab_size, (1, 48))
    with torch.no_grad():
        assert (back(ids) - ours(ids)).abs().max() <= 1e-5
    plain_tensors = gguf_export._tensors
    for name, factors, message in (
            ("random", lambda n: torch.linspace(0.5, 3.0, n), "not Llama 3.1's scaling"),
            ("one-step", lambda n: torch.tensor([1.0] * (n - 2) + [2.0, 8.0]), "with 1 on the ramp")):
        def with_factors(state, config, arch, factors=factors):
            for tensor_name, tensor in plain_tensors(state, config, arch):
                yield tensor_name, factors(config.head_dim // 2) if tensor_name == "rope_freqs.weight" else tensor

        monkeypatch.setattr(gguf_export, "_tensors", with_factors)
        path = export_gguf(run, tmp_path / f"{name}.gguf")
        with pytest.raises(GGUFImportError, match=message):
            import_gguf(path, tmp_path / name)
        assert not (tmp_path / name).exists()


def test_a_scaled_rope_exports_to_gguf_only_as_llama_and_bad_factors_are_config_errors(tmp_path):
    from test_gguf_export import MAKERS
    from test_interop import LLAMA_STYLE, lmforge_run

    run = lmforge_run(tmp_path, MAKERS["char"](), **{**LLAMA_STYLE, "bias": False, "qk_norm": True,
                                                     "rope_scaling": "llama3"})
    with pytest.raises(GGUFExportError, match="model.rope_scaling='llama3'.*llama architecture, not qwen3"):
        export_gguf(run, tmp_path / "m.gguf")
    assert not (tmp_path / "m.gguf").exists()
    with pytest.raises(ConfigError, match="model.rope_high_freq_factor=1.0 is invalid: above rope_low_freq_factor"):
        ModelConfig(pos_encoding="rope", rope_scaling="llama3", rope_low_freq_factor=1.0, rope_high_freq_factor=1.0)
    from lmforge.interop.hf_llama import from_hf_config

    with pytest.raises(ConfigError, match="rope_type='llama3' needs factor"):
        from_hf_config({"model_type": "llama", "hidden_size": 32, "num_attention_heads": 4, "num_hidden_layers": 1,
                        "vocab_size": 10, "intermediate_size": 64, "rope_scaling": {"rope_type": "llama3"}})
