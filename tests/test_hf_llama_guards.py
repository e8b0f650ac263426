"""A Llama config.json that lmforge's model cannot compute exactly is refused in one line naming the setting,
instead of being imported as a model that gives other logits than transformers; an exported config names the class
its weights belong to."""

import dataclasses

import pytest

from lmforge.errors import ConfigError
from lmforge.interop.hf_llama import from_hf_config, to_hf_config

LLAMA = {"model_type": "llama", "vocab_size": 61, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
         "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 32, "rms_norm_eps": 1e-5,
         "hidden_act": "silu", "rope_theta": 20000.0, "tie_word_embeddings": False}


def test_a_plain_llama_config_converts():
    config = from_hf_config(LLAMA)
    assert (config.n_head, config.n_kv_head, config.n_embd, config.hidden_dim) == (4, 2, 32, 64)
    assert config.rope_theta == 20000.0 and not config.bias
    assert from_hf_config({**LLAMA, "attention_bias": True, "mlp_bias": True}).bias
    assert from_hf_config({**LLAMA, "head_dim": 16}).head_dim == 16  # wider than hidden_size / num_attention_heads


@pytest.mark.parametrize("changes, words", [
    ({"attention_bias": True, "mlp_bias": False}, "attention_bias=True with mlp_bias=False"),
    ({"attention_bias": False, "mlp_bias": True}, "attention_bias=False with mlp_bias=True"),
    ({"head_dim": 7}, "model.head_size=7 is invalid: an even head width"),  # (16: heads of their own width)
    ({"pretraining_tp": 2}, "pretraining_tp=2"),
    ({"hidden_act": "gelu"}, "hidden_act='gelu'"),
    ({"rope_scaling": {"rope_type": "linear", "factor": 2.0}}, "rope_type='linear'"),
    ({"rope_parameters": {"rope_type": "yarn", "rope_theta": 20000.0, "factor": 4.0}}, "rope_type='yarn'"),
    ({"model_type": "mistral"}, "model_type='mistral'"),
], ids=["attention-bias-only", "mlp-bias-only", "head-dim", "pretraining-tp", "gelu", "linear-rope", "yarn-rope",
        "not-llama"])
def test_a_llama_setting_without_an_lmforge_equivalent_is_refused_naming_it(changes, words):
    with pytest.raises(ConfigError) as info:
        from_hf_config({**LLAMA, **changes})
    assert words in str(info.value) and "\n" not in str(info.value)


def test_the_exported_config_names_the_class_that_holds_the_weights():
    """config.json's architectures is how serving stacks (vLLM, TGI, pipelines) pick the model class: a classifier's
    names LlamaForSequenceClassification (score.weight), a language model's LlamaForCausalLM (lm_head.weight)."""
    lm = from_hf_config(LLAMA)
    assert to_hf_config(lm)["architectures"] == ["LlamaForCausalLM"] and "num_labels" not in to_hf_config(lm)
    classifier = dataclasses.replace(lm, head="classify", num_labels=3)
    exported = to_hf_config(classifier)
    assert exported["architectures"] == ["LlamaForSequenceClassification"] and exported["num_labels"] == 3
