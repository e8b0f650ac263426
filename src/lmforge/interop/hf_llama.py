"""Convert between lmforge's GPT and Hugging Face's LlamaForCausalLM, Qwen2ForCausalLM and Qwen3ForCausalLM (configs
and state dicts).

A Llama-style lmforge config is: RoPE positions, RMSNorm, the SwiGLU MLP, any number of key/value heads
(grouped-query attention), biases either everywhere (HF attention_bias=mlp_bias=True) or nowhere, heads of any width
(head_dim: lmforge's model.head_size). Qwen2 is the same model with biases on the q, k and v projections only
(lmforge's model.qkv_bias with bias false), and no sliding window (use_sliding_window false, as Qwen2 and Qwen2.5
ship); Qwen3 has no biases and RMS-normalises each head's queries and keys before RoPE (q_norm, k_norm: lmforge's
model.qk_norm).
Both libraries rotate dimension i with i + head_dim/2 (HF's rotate_half, the GPT-NeoX layout), so
q_proj/k_proj weights are copied as they are, no permutation.

Weight layout (both store nn.Linear (out, in) weights): lmforge fuses [q; k; v] into attn.qkv and
[gate; up] into mlp.fc (MLP.forward chunks gate first), HF keeps them as separate projections.
Nothing here imports transformers: configs travel as the dicts LlamaConfig(**d) / config.json use.
"""

from __future__ import annotations

from typing import Any, Mapping

import torch

from lmforge.config import ModelConfig
from lmforge.errors import ConfigError


def check_llama_compatible(config: ModelConfig) -> None:
    """Raise ConfigError naming every model option that Llama's architecture cannot express (all at once: a user
    retrains once, not once per option)."""
    required = {"causal": True, "pos_encoding": "rope", "norm": "rmsnorm", "mlp": "swiglu", "logit_softcap": 0.0}
    if config.qk_norm:  # Qwen3's layout has no biases
        required.update(bias=False, qkv_bias=False)
    wrong = [key for key, value in required.items() if getattr(config, key) != value]
    if wrong:
        raise ConfigError(f"{', '.join(f'model.{key}={getattr(config, key)!r}' for key in wrong)} cannot be "
                          f"converted to Llama{' (Qwen3, with model.qk_norm)' if config.qk_norm else ''}; it needs "
                          f"{', '.join(f'model.{k}={required[k]!r}' for k in wrong)}")


def is_qwen2(config: ModelConfig) -> bool:
    """Whether a Llama-style config is Qwen2's layout: biases on q, k and v and nowhere else."""
    return config.qkv_bias and not config.bias


def is_qwen3(config: ModelConfig) -> bool:
    """Whether a Llama-style config is Qwen3's layout: queries and keys RMS-normalised per head (no biases)."""
    return config.qk_norm


def to_hf_config(config: ModelConfig, **extra: Any) -> dict[str, Any]:
    """LlamaConfig (or, for is_qwen2, Qwen2Config) keyword arguments (config.json) for a Llama-style ModelConfig;
    `extra` is added.

    HF Llama has one dropout, on attention weights (lmforge also drops residual branches): it gets
    model.dropout, which changes nothing at inference.
    """
    check_llama_compatible(config)
    family = "Qwen3" if is_qwen3(config) else "Qwen2" if is_qwen2(config) else "Llama"
    scaling = ({"factor": config.rope_factor, "low_freq_factor": config.rope_low_freq_factor,
                "high_freq_factor": config.rope_high_freq_factor,
                "original_max_position_embeddings": config.rope_original_context}
               if config.rope_scaling == "llama3" else {})
    own = ({"use_sliding_window": False, "head_dim": config.head_dim} if family == "Qwen2" else
           {"use_sliding_window": False, "head_dim": config.head_dim, "attention_bias": False} if family == "Qwen3" else
           {"head_dim": config.head_dim, "attention_bias": config.bias, "mlp_bias": config.bias, "pretraining_tp": 1})
    return {
        "model_type": family.lower(),
        "architectures": [f"{family}ForSequenceClassification" if config.head == "classify"
                          else f"{family}ForCausalLM"],
        **({"num_labels": config.num_labels} if config.head == "classify" else {}),
        "vocab_size": config.vocab_size,
        "hidden_size": config.n_embd,
        "intermediate_size": config.hidden_dim,
        "num_hidden_layers": config.n_layer,
        "num_attention_heads": config.n_head,
        "num_key_value_heads": config.n_kv_head,
        "hidden_act": "silu",
        "max_position_embeddings": config.block_size,
        "initializer_range": config.init_std,
        "rms_norm_eps": config.norm_eps,
        "tie_word_embeddings": config.tie_embeddings,
        "rope_theta": config.rope_theta,  # transformers < 5 reads this key, 5.x reads rope_parameters
        "rope_parameters": {"rope_type": "llama3" if scaling else "default", "rope_theta": config.rope_theta,
                            **scaling},
        "rope_scaling": {"rope_type": "llama3", **scaling} if scaling else None,
        **own,
        "attention_dropout": config.dropout,
        "bos_token_id": None,
        "eos_token_id": None,
        **extra,
    }


def _rope(d: Mapping[str, Any]) -> dict[str, Any]:
    """ModelConfig's RoPE settings from a Llama config.json (transformers 5: rope_parameters; earlier: rope_theta,
    rope_scaling): the base, and Llama 3.1's frequency scaling (rope_type llama3) where it is set."""
    params = d.get("rope_parameters") or {}
    scaling = d.get("rope_scaling") or {}
    rope_type = params.get("rope_type", scaling.get("rope_type", scaling.get("type", "default")))
    out: dict[str, Any] = {"rope_theta": float(params.get("rope_theta", d.get("rope_theta", 10000.0)))}
    if rope_type == "llama3":
        given = {**scaling, **params}
        try:
            out.update(rope_scaling="llama3", rope_factor=float(given["factor"]),
                       rope_low_freq_factor=float(given["low_freq_factor"]),
                       rope_high_freq_factor=float(given["high_freq_factor"]),
                       rope_original_context=int(given["original_max_position_embeddings"]))
        except (KeyError, TypeError, ValueError) as e:
            raise ConfigError(f"rope_type='llama3' needs factor, low_freq_factor, high_freq_factor and "
                              f"original_max_position_embeddings; this config lacks or garbles {e}") from None
    elif rope_type != "default":
        raise ConfigError(f"rope_type={rope_type!r} (RoPE scaling) has no lmforge equivalent; "
                          "supported: default RoPE (rope_scaling null) and llama3 (Llama 3.1, 3.2)")
    return out


def from_hf_config(hf_config: Mapping[str, Any] | Any) -> ModelConfig:
    """A ModelConfig from a LlamaConfig, Qwen2Config or Qwen3Config or its dict (config.json). Raises ConfigError for
    what lmforge lacks."""
    d = dict(hf_config) if isinstance(hf_config, Mapping) else hf_config.to_dict()
    model_type = d.get("model_type", "llama")
    if model_type not in ("llama", "qwen2", "qwen3"):
        raise ConfigError(f"model_type={d.get('model_type')!r} is not llama, qwen2 or qwen3; only their configs "
                          "convert here")
    sliding = [t for t in d.get("layer_types") or [] if t != "full_attention"]
    if d.get("use_sliding_window") or sliding:
        raise ConfigError("use_sliding_window=true (attention within a window on some layers) has no lmforge "
                          "equivalent; supported: full attention on every layer (use_sliding_window false)")
    if d.get("hidden_act", "silu") != "silu":
        raise ConfigError(f"hidden_act={d.get('hidden_act')!r} has no lmforge equivalent; supported: silu (SwiGLU)")
    attention_bias, mlp_bias = bool(d.get("attention_bias", False)), bool(d.get("mlp_bias", False))
    if attention_bias != mlp_bias:
        raise ConfigError(f"attention_bias={attention_bias} with mlp_bias={mlp_bias} has no lmforge equivalent; "
                          "supported: both true or both false")
    n_embd, n_head = d["hidden_size"], d["num_attention_heads"]
    head_dim = d.get("head_dim") or n_embd // n_head
    if d.get("pretraining_tp", 1) != 1:
        raise ConfigError(f"pretraining_tp={d['pretraining_tp']} has no lmforge equivalent; supported: 1")
    config = ModelConfig(
        vocab_size=d["vocab_size"], block_size=d.get("max_position_embeddings", 2048), n_layer=d["num_hidden_layers"],
        n_head=n_head, n_kv_head=d.get("num_key_value_heads") or n_head, n_embd=n_embd,
        head_size=None if head_dim * n_head == n_embd else head_dim, qk_norm=model_type == "qwen3",
        mlp_hidden=None, dropout=float(d.get("attention_dropout", 0.0)), bias=attention_bias,
        qkv_bias=model_type == "qwen2",
        norm="rmsnorm", norm_eps=d.get("rms_norm_eps", 1e-6), mlp="swiglu", pos_encoding="rope",
        **_rope(d), tie_embeddings=d.get("tie_word_embeddings", False),
        init_std=d.get("initializer_range", 0.02),
    )
    if config.hidden_dim != d["intermediate_size"]:  # null when it is lmforge's own default width
        config.mlp_hidden = d["intermediate_size"]
    return config


def _kinds(config: ModelConfig, qkv: bool) -> tuple[str, ...]:
    """The tensors each projection has: q/k/v (qkv) get a bias with bias or qkv_bias, the others with bias."""
    return ("weight", "bias") if config.bias or (qkv and config.qkv_bias) else ("weight",)


def _split_sizes(config: ModelConfig) -> tuple[int, int, int]:
    hd = config.head_dim
    return config.n_head * hd, config.n_kv_head * hd, config.n_kv_head * hd


def to_hf_state_dict(state_dict: Mapping[str, torch.Tensor], config: ModelConfig) -> dict[str, torch.Tensor]:
    """LlamaForCausalLM state dict (model.*, lm_head.weight) from an lmforge GPT state dict; for a classifier,
    LlamaForSequenceClassification's (model.*, score.weight)."""
    check_llama_compatible(config)
    out = {"model.embed_tokens.weight": state_dict["tok_emb.weight"], "model.norm.weight": state_dict["norm_f.weight"]}
    for i in range(config.n_layer):
        ours, hf = f"blocks.{i}.", f"model.layers.{i}."
        out[hf + "input_layernorm.weight"] = state_dict[ours + "norm_1.weight"]
        out[hf + "post_attention_layernorm.weight"] = state_dict[ours + "norm_2.weight"]
        if config.qk_norm:
            out[hf + "self_attn.q_norm.weight"] = state_dict[ours + "attn.q_norm.weight"]
            out[hf + "self_attn.k_norm.weight"] = state_dict[ours + "attn.k_norm.weight"]
        for kind in _kinds(config, qkv=True):
            q, k, v = state_dict[f"{ours}attn.qkv.{kind}"].split(_split_sizes(config), dim=0)
            out.update({f"{hf}self_attn.q_proj.{kind}": q.contiguous(), f"{hf}self_attn.k_proj.{kind}": k.contiguous(),
                        f"{hf}self_attn.v_proj.{kind}": v.contiguous()})
        for kind in _kinds(config, qkv=False):
            gate, up = state_dict[f"{ours}mlp.fc.{kind}"].chunk(2, dim=0)
            out.update({f"{hf}self_attn.o_proj.{kind}": state_dict[f"{ours}attn.proj.{kind}"],
                        f"{hf}mlp.gate_proj.{kind}": gate.contiguous(), f"{hf}mlp.up_proj.{kind}": up.contiguous(),
                        f"{hf}mlp.down_proj.{kind}": state_dict[f"{ours}mlp.proj.{kind}"]})
    if config.head == "classify":
        out["score.weight"] = state_dict["classifier.weight"]
    else:
        out["lm_head.weight"] = state_dict.get("lm_head.weight", state_dict["tok_emb.weight"])
    return out


def from_hf_state_dict(hf_state_dict: Mapping[str, torch.Tensor], config: ModelConfig) -> dict[str, torch.Tensor]:
    """lmforge GPT state dict from a LlamaForCausalLM state dict. A missing lm_head.weight (tied) is the embedding."""
    check_llama_compatible(config)
    sd = hf_state_dict
    try:
        out = {"tok_emb.weight": sd["model.embed_tokens.weight"], "norm_f.weight": sd["model.norm.weight"]}
        for i in range(config.n_layer):
            ours, hf = f"blocks.{i}.", f"model.layers.{i}."
            out[ours + "norm_1.weight"] = sd[hf + "input_layernorm.weight"]
            out[ours + "norm_2.weight"] = sd[hf + "post_attention_layernorm.weight"]
            if config.qk_norm:
                out[ours + "attn.q_norm.weight"] = sd[hf + "self_attn.q_norm.weight"]
                out[ours + "attn.k_norm.weight"] = sd[hf + "self_attn.k_norm.weight"]
            for kind in _kinds(config, qkv=True):
                out[f"{ours}attn.qkv.{kind}"] = torch.cat([sd[f"{hf}self_attn.{p}_proj.{kind}"] for p in "qkv"], dim=0)
            for kind in _kinds(config, qkv=False):
                out[f"{ours}attn.proj.{kind}"] = sd[f"{hf}self_attn.o_proj.{kind}"]
                gate, up = sd[f"{hf}mlp.gate_proj.{kind}"], sd[f"{hf}mlp.up_proj.{kind}"]
                out[f"{ours}mlp.fc.{kind}"] = torch.cat([gate, up], dim=0)
                out[f"{ours}mlp.proj.{kind}"] = sd[f"{hf}mlp.down_proj.{kind}"]
    except KeyError as e:
        raise ConfigError(f"Llama state dict has no tensor {e.args[0]!r}; is it a Llama checkpoint "
                          f"with num_hidden_layers={config.n_layer}?") from None
    if config.tie_embeddings or "lm_head.weight" not in sd:
        out["lm_head.weight"] = out["tok_emb.weight"]
    else:
        out["lm_head.weight"] = sd["lm_head.weight"]
    return out
