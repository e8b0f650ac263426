"""Convert between lmforge's GPT and Hugging Face's GPT2LMHeadModel (configs and state dicts).

A GPT-2-style lmforge config is: learned positions, layernorm, the GELU MLP, biases, n_kv_head ==
n_head. HF's "gelu_new" (GPT-2's own activation) is the tanh approximation of GELU, which lmforge
calls `activation: gelu_tanh`; HF's "gelu" is the exact erf form, lmforge's `activation: gelu`. Each maps
to the other exactly, so converted models compute the same logits (to float rounding).

Weight layout: HF's Conv1D stores weights as (in, out), the transpose of nn.Linear's (out, in).
HF's c_attn packs [Q; K; V] along its output like lmforge's attn.qkv, so it is transposed, not split.
Nothing here imports transformers: configs travel as the dicts GPT2Config(**d) / GPT2Config.to_dict() use.
"""

from __future__ import annotations

from typing import Any, Mapping

import torch

from lmforge.config import ModelConfig
from lmforge.errors import ConfigError

_ACTIVATION_TO_HF = {"gelu": "gelu", "gelu_tanh": "gelu_new"}
_ACTIVATION_FROM_HF = {"gelu": "gelu", "gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh"}

# lmforge name inside block N -> HF name inside transformer.h.N, and whether the weight is transposed
_BLOCK_NAMES = {
    "norm_1.weight": ("ln_1.weight", False),
    "norm_1.bias": ("ln_1.bias", False),
    "attn.qkv.weight": ("attn.c_attn.weight", True),
    "attn.qkv.bias": ("attn.c_attn.bias", False),
    "attn.proj.weight": ("attn.c_proj.weight", True),
    "attn.proj.bias": ("attn.c_proj.bias", False),
    "norm_2.weight": ("ln_2.weight", False),
    "norm_2.bias": ("ln_2.bias", False),
    "mlp.fc.weight": ("mlp.c_fc.weight", True),
    "mlp.fc.bias": ("mlp.c_fc.bias", False),
    "mlp.proj.weight": ("mlp.c_proj.weight", True),
    "mlp.proj.bias": ("mlp.c_proj.bias", False),
}
_TOP_NAMES = {"tok_emb.weight": "wte.weight", "pos_emb.weight": "wpe.weight",
              "norm_f.weight": "ln_f.weight", "norm_f.bias": "ln_f.bias"}


def check_gpt2_compatible(config: ModelConfig) -> None:
    """Raise ConfigError naming the first model option that GPT-2's architecture cannot express."""
    required = {"causal": True, "pos_encoding": "learned", "norm": "layernorm", "mlp": "gelu", "bias": True,
                "n_kv_head": config.n_head, "qk_norm": False, "logit_softcap": 0.0}
    for key, value in required.items():
        if getattr(config, key) != value:
            raise ConfigError(f"model.{key}={getattr(config, key)!r} cannot be converted to GPT-2; "
                              f"GPT-2 needs model.{key}={value!r}")


def to_hf_config(config: ModelConfig, **extra: Any) -> dict[str, Any]:
    """GPT2Config keyword arguments for a GPT-2-style ModelConfig; `extra` (e.g. eos_token_id) is added."""
    check_gpt2_compatible(config)
    return {
        "model_type": "gpt2",
        "architectures": ["GPT2ForSequenceClassification" if config.head == "classify" else "GPT2LMHeadModel"],
        **({"num_labels": config.num_labels} if config.head == "classify" else {}),
        "vocab_size": config.vocab_size,
        "n_positions": config.block_size,
        "n_embd": config.n_embd,
        "n_layer": config.n_layer,
        "n_head": config.n_head,
        "n_inner": config.mlp_hidden,
        "activation_function": _ACTIVATION_TO_HF[config.activation],
        "resid_pdrop": config.dropout,
        "embd_pdrop": config.dropout,
        "attn_pdrop": config.dropout,
        "layer_norm_epsilon": config.norm_eps,
        "initializer_range": config.init_std,
        "tie_word_embeddings": config.tie_embeddings,
        "scale_attn_weights": True,
        "scale_attn_by_inverse_layer_idx": False,
        "reorder_and_upcast_attn": False,
        "bos_token_id": None,
        "eos_token_id": None,
        **extra,
    }


def from_hf_config(hf_config: Mapping[str, Any] | Any) -> ModelConfig:
    """A ModelConfig from a GPT2Config or its dict (config.json). Raises ConfigError for what lmforge lacks.

    lmforge has one dropout probability: it takes the largest of HF's resid_pdrop, embd_pdrop, attn_pdrop.
    """
    d = dict(hf_config) if isinstance(hf_config, Mapping) else hf_config.to_dict()
    if d.get("model_type", "gpt2") != "gpt2":
        raise ConfigError(f"model_type={d.get('model_type')!r} is not gpt2; only GPT-2 configs convert")
    activation = d.get("activation_function", "gelu_new")
    if activation not in _ACTIVATION_FROM_HF:
        raise ConfigError(f"activation_function={activation!r} has no lmforge equivalent; "
                          f"supported: {', '.join(_ACTIVATION_FROM_HF)}")
    if not d.get("scale_attn_weights", True) or d.get("scale_attn_by_inverse_layer_idx", False):
        raise ConfigError("scale_attn_weights=False or scale_attn_by_inverse_layer_idx=True has no lmforge equivalent")
    dropouts = {d.get(k, 0.1) for k in ("resid_pdrop", "embd_pdrop", "attn_pdrop")}
    return ModelConfig(
        vocab_size=d["vocab_size"], block_size=d["n_positions"], n_layer=d["n_layer"], n_head=d["n_head"],
        n_embd=d["n_embd"], mlp_hidden=d.get("n_inner"), dropout=max(dropouts),
        bias=True, norm="layernorm", norm_eps=d.get("layer_norm_epsilon", 1e-5), mlp="gelu",
        activation=_ACTIVATION_FROM_HF[activation], pos_encoding="learned",
        tie_embeddings=d.get("tie_word_embeddings", True), init_std=d.get("initializer_range", 0.02),
    )


def to_hf_state_dict(state_dict: Mapping[str, torch.Tensor], config: ModelConfig) -> dict[str, torch.Tensor]:
    """GPT2LMHeadModel state dict (transformer.*, lm_head.weight) from an lmforge GPT state dict; for a
    classifier, GPT2ForSequenceClassification's (transformer.*, score.weight)."""
    check_gpt2_compatible(config)
    out = {f"transformer.{hf}": state_dict[ours] for ours, hf in _TOP_NAMES.items()}
    for i in range(config.n_layer):
        for ours, (hf, transpose) in _BLOCK_NAMES.items():
            tensor = state_dict[f"blocks.{i}.{ours}"]
            out[f"transformer.h.{i}.{hf}"] = tensor.t().contiguous() if transpose else tensor
    if config.head == "classify":
        out["score.weight"] = state_dict["classifier.weight"]
    else:
        out["lm_head.weight"] = state_dict.get("lm_head.weight", state_dict["tok_emb.weight"])
    return out


def from_hf_state_dict(hf_state_dict: Mapping[str, torch.Tensor], config: ModelConfig) -> dict[str, torch.Tensor]:
    """lmforge GPT state dict from a GPT2LMHeadModel (or GPT2Model: no "transformer." prefix) state dict.

    A missing lm_head.weight (tied and saved once) is taken from the token embedding.
    """
    check_gpt2_compatible(config)
    prefix = "transformer." if "transformer.wte.weight" in hf_state_dict else ""
    try:
        out = {ours: hf_state_dict[prefix + hf] for ours, hf in _TOP_NAMES.items()}
        for i in range(config.n_layer):
            for ours, (hf, transpose) in _BLOCK_NAMES.items():
                tensor = hf_state_dict[f"{prefix}h.{i}.{hf}"]
                out[f"blocks.{i}.{ours}"] = tensor.t().contiguous() if transpose else tensor
    except KeyError as e:
        raise ConfigError(f"GPT-2 state dict has no tensor {e.args[0]!r}; is it a GPT-2 checkpoint "
                          f"with n_layer={config.n_layer}?") from None
    if config.tie_embeddings or "lm_head.weight" not in hf_state_dict:
        out["lm_head.weight"] = out["tok_emb.weight"]
    else:
        out["lm_head.weight"] = hf_state_dict["lm_head.weight"]
    return out
