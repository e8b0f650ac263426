"""The same weights in lmforge's GPT and Hugging Face's GPT2LMHeadModel (and LlamaForCausalLM) give the same logits.

The weights make attention sharp (sharp_attention.py), checked in each test, so a 1% error in the attention
scale, the RoPE base, the norm epsilon or the MLP activation moves the logits far past the tolerance."""

import dataclasses

import pytest
import torch

transformers = pytest.importorskip("transformers")

from lmforge.config import ModelConfig  # noqa: E402
from lmforge.errors import ConfigError  # noqa: E402
from lmforge.interop.hf_gpt2 import (from_hf_config, from_hf_state_dict, to_hf_config,  # noqa: E402
                                     to_hf_state_dict)
from lmforge.model import GPT  # noqa: E402
from sharp_attention import MAX_ENTROPY, attention_entropy, sharpen, sharpen_hf_gpt2  # noqa: E402

TOLERANCE = 1e-5  # fp32, max abs difference of logits


def gpt2_style(**overrides) -> ModelConfig:
    base = dict(vocab_size=71, block_size=32, n_layer=2, n_head=4, n_embd=48, activation="gelu_tanh", dropout=0.0)
    return ModelConfig(**{**base, **overrides})


def hf_model(config: ModelConfig):
    return transformers.GPT2LMHeadModel(transformers.GPT2Config(**to_hf_config(config))).eval()


def max_diff(ours: GPT, theirs, idx: torch.Tensor) -> float:
    """Max |logit difference|, after checking that attention is sharp on idx and the logits are not tiny."""
    assert attention_entropy(theirs, idx) < MAX_ENTROPY
    with torch.no_grad():
        expected = theirs(idx).logits
        assert expected.abs().max() > 0.1  # logits 10,000 times the tolerance, not a near-zero comparison
        return (ours(idx) - expected).abs().max().item()


@pytest.mark.parametrize("overrides", [dict(), dict(activation="gelu"), dict(tie_embeddings=False),
                                       dict(mlp_hidden=80, norm_eps=4e-4)], ids=["gelu_new", "gelu", "untied", "n_inner"])
def test_lmforge_to_hf_same_logits(overrides):
    config = gpt2_style(**overrides)  # norm_eps=4e-4: of the order of the embeddings' variance, so an error in it shows
    torch.manual_seed(0)
    ours = sharpen(GPT(config)).eval()
    with torch.no_grad():  # non-trivial norms and biases, so a misplaced one shows
        for name, p in ours.named_parameters():
            if "norm" in name or name.endswith("bias"):
                p.add_(0.1 * torch.randn_like(p))
    theirs = hf_model(config)
    theirs.load_state_dict(to_hf_state_dict(ours.state_dict(), config), strict=True)
    idx = torch.randint(0, config.vocab_size, (3, config.block_size))
    assert max_diff(ours, theirs, idx) <= TOLERANCE


@pytest.mark.parametrize("prefix", ["lm-head-model", "base-model"])
def test_hf_to_lmforge_same_logits(prefix):
    torch.manual_seed(1)
    hf_config = transformers.GPT2Config(vocab_size=71, n_positions=32, n_layer=2, n_head=4, n_embd=48,
                                        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                                        bos_token_id=None, eos_token_id=None)
    theirs = sharpen_hf_gpt2(transformers.GPT2LMHeadModel(hf_config)).eval()
    state = theirs.state_dict()
    if prefix == "base-model":  # the hub's gpt2 checkpoint: GPT2Model names, lm_head tied and not stored
        state = {k.removeprefix("transformer."): v for k, v in state.items() if k != "lm_head.weight"}
    config = from_hf_config(hf_config)
    assert config.activation == "gelu_tanh" and config.dropout == 0.0
    ours = GPT(config).eval()
    ours.load_state_dict(from_hf_state_dict(state, config), strict=True)
    idx = torch.randint(0, 71, (2, 32))
    assert max_diff(ours, theirs, idx) <= TOLERANCE


def test_llama_style_same_logits():
    """RoPE, RMSNorm, SwiGLU and grouped-query heads against LlamaForCausalLM, with the positions long enough
    (48) for a wrong RoPE base to turn the sharp attention to other keys."""
    from lmforge.interop import hf_llama

    config = ModelConfig(vocab_size=71, block_size=48, n_layer=2, n_head=4, n_kv_head=2, n_embd=48, norm="rmsnorm",
                         mlp="swiglu", pos_encoding="rope", bias=False, tie_embeddings=False, rope_theta=20000.0,
                         dropout=0.0)
    torch.manual_seed(2)
    ours = sharpen(GPT(config)).eval()
    with torch.no_grad():
        for name, p in ours.named_parameters():
            if "norm" in name:
                p.add_(0.1 * torch.randn_like(p))
    theirs = transformers.LlamaForCausalLM(transformers.LlamaConfig(**hf_llama.to_hf_config(config))).eval()
    theirs.load_state_dict(hf_llama.to_hf_state_dict(ours.state_dict(), config), strict=True)
    idx = torch.randint(0, config.vocab_size, (2, config.block_size))
    assert max_diff(ours, theirs, idx) <= TOLERANCE


def test_config_round_trip():
    config = gpt2_style(dropout=0.1, init_std=0.01, tie_embeddings=False)
    assert from_hf_config(to_hf_config(config)) == config
    assert from_hf_config(transformers.GPT2Config(**to_hf_config(config))) == config


@pytest.mark.parametrize("key,value", [("pos_encoding", "rope"), ("norm", "rmsnorm"), ("mlp", "swiglu"),
                                       ("bias", False), ("n_kv_head", 2)])
def test_non_gpt2_configs_are_refused(key, value):
    with pytest.raises(ConfigError, match=f"model.{key}="):
        to_hf_config(gpt2_style(**{key: value}))


def test_unknown_hf_activation_is_refused():
    with pytest.raises(ConfigError, match="activation_function='relu'"):
        from_hf_config({**to_hf_config(gpt2_style()), "activation_function": "relu"})


def test_missing_tensor_is_named():
    config = gpt2_style()
    state = to_hf_state_dict(GPT(config).state_dict(), config)
    del state["transformer.h.1.mlp.c_fc.weight"]
    with pytest.raises(ConfigError, match="h.1.mlp.c_fc.weight"):
        from_hf_state_dict(state, config)


def test_classifier_equals_gpt2_for_sequence_classification():
    """head: classify on the same weights as transformers' GPT2ForSequenceClassification (its `score` is our
    `classifier`), on right-padded rows: the same class logits. Sharp weights, so attention is not uniform."""
    config = gpt2_style(head="classify", num_labels=4)
    torch.manual_seed(0)
    ours = GPT(config).eval()
    with torch.no_grad():
        for p in ours.parameters():
            p.normal_(0.0, 0.3) if p.dim() == 2 else p.add_(0.1 * torch.randn_like(p))
    lm = dataclasses.replace(config, head="lm", num_labels=None)
    pad = 0
    theirs = transformers.GPT2ForSequenceClassification(
        transformers.GPT2Config(**to_hf_config(lm), num_labels=4, pad_token_id=pad)).eval()
    state = to_hf_state_dict({k: v for k, v in ours.state_dict().items() if k != "classifier.weight"}, lm)
    state = {k: v for k, v in state.items() if k != "lm_head.weight"}
    theirs.load_state_dict({**state, "score.weight": ours.state_dict()["classifier.weight"]}, strict=True)
    idx = torch.randint(1, config.vocab_size, (3, 12))
    idx[1, 7:] = pad
    idx[2, 4:] = pad
    mask = idx != pad
    with torch.no_grad():
        got, expected = ours(idx, attention_mask=mask), theirs(idx, attention_mask=mask.long()).logits
    assert (got - expected).abs().max().item() <= TOLERANCE
    assert expected.abs().max() > 1.0  # logits of a real size, not a near-zero comparison
