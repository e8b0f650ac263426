"""The Transformer: the fast paths equal the formulas, the cache equals recomputation, the future is masked."""

import math

import pytest
import torch
from safetensors.torch import load_model, save_model

from lmforge.config import PRESETS, ModelConfig, preset
from lmforge.errors import ConfigError
from lmforge.model import (GPT, KVCache, apply_rope, count_parameters, flops_per_token, fused_attention,
                           reference_attention, rope_tables, sinusoidal_table)

VARIANTS = {
    "gpt2": dict(),
    "llama": dict(norm="rmsnorm", mlp="swiglu", pos_encoding="rope", bias=False, n_kv_head=2),
    "sinusoidal-untied": dict(pos_encoding="sinusoidal", tie_embeddings=False, activation="gelu_tanh"),
    "rope-mha": dict(pos_encoding="rope", n_kv_head=4),
    "speedrun": dict(norm="rmsnorm", pos_encoding="rope", mlp="relu2", qk_norm=True, logit_softcap=5.0, bias=False,
                     n_kv_head=2),
}


def small(**overrides) -> ModelConfig:
    return ModelConfig(**{**dict(vocab_size=53, block_size=24, n_layer=2, n_head=4, n_embd=32), **overrides})


def build(seed=0, **overrides) -> GPT:
    torch.manual_seed(seed)
    return GPT(small(**overrides)).eval()


@pytest.mark.parametrize("variant", VARIANTS)
def test_reference_attention_equals_sdpa(variant):
    fast = build(**VARIANTS[variant])
    slow = GPT(small(**VARIANTS[variant], attention="reference")).eval()
    slow.load_state_dict(fast.state_dict())
    idx = torch.randint(0, 53, (3, 24))
    assert torch.allclose(fast(idx), slow(idx), atol=1e-5, rtol=0)


@pytest.mark.parametrize("n_kv_head", [4, 2, 1])
def test_attention_functions_agree_with_a_cached_past(n_kv_head):
    torch.manual_seed(0)
    q = torch.randn(2, 4, 9, 8)
    k, v = torch.randn(2, n_kv_head, 9, 8), torch.randn(2, n_kv_head, 9, 8)
    for T in (1, 5, 9):  # the last T of 9 positions
        assert torch.allclose(fused_attention(q[:, :, -T:], k, v), reference_attention(q[:, :, -T:], k, v), atol=1e-6)


@pytest.mark.parametrize("variant", VARIANTS)
def test_kv_cache_decoding_equals_full_forward(variant):
    model = build(**VARIANTS[variant])
    idx = torch.randint(0, 53, (2, 24))
    full = model(idx)
    cache = KVCache.for_model(model, batch_size=2)
    pieces = [model(idx[:, :10], cache), model(idx[:, 10:13], cache)]  # prefill, then a chunk
    pieces += [model(idx[:, t:t + 1], cache) for t in range(13, 24)]  # then one token at a time
    assert cache.pos == 24
    assert torch.allclose(torch.cat(pieces, dim=1), full, atol=1e-5, rtol=0)


@pytest.mark.parametrize("variant", VARIANTS)
def test_static_cache_steps_equal_full_forward_of_each_row(variant):
    """The fixed-shape decoding step (a static view of the cache: write column pos, attend to the columns the
    mask marks) gives each row of a left-padded batch the logits of a full forward of that row alone."""
    model = build(**VARIANTS[variant])
    rows = [torch.randint(0, 53, (20,)), torch.randint(0, 53, (14,))]  # row 1: 6 pads on the left
    cache = KVCache(model.config, 2, max_len=model.config.block_size + 1)
    real = torch.ones(2, 20, dtype=torch.bool)
    real[1, :6] = False
    idx = torch.stack([rows[0], torch.cat([torch.zeros(6, dtype=torch.long), rows[1]])])
    got = [model(idx[:, :8], cache, real[:, :8])[:, -1]]  # an ordinary prefill of 8 columns
    for t in range(8, 20):  # then one column at a time through the static view
        view = KVCache.static_view(cache.k, cache.v, torch.tensor([t]), t + 1)
        got.append(model(idx[:, t:t + 1], view, real[:, :t + 1])[:, -1])
        assert int(view.pos) == t + 1
    for r, row in enumerate(rows):
        full = model(row[None])[0]  # (len, V)
        assert torch.allclose(torch.stack([g[r] for g in got]), full[len(row) - 13:], atol=1e-5, rtol=0)


@pytest.mark.parametrize("variant", VARIANTS)
def test_causality_future_tokens_do_not_change_past_logits(variant):
    model = build(**VARIANTS[variant])
    idx = torch.randint(0, 53, (1, 24))
    t = 11
    changed = idx.clone()
    changed[0, t + 1:] = (changed[0, t + 1:] + 7) % 53
    a, b = model(idx), model(changed)
    assert torch.allclose(a[:, :t + 1], b[:, :t + 1], atol=1e-6, rtol=0)
    assert not torch.allclose(a[:, t + 1:], b[:, t + 1:], atol=1e-3)


def test_sinusoidal_table_matches_the_formula():
    table = sinusoidal_table(10, 6)
    for p in range(10):
        for i in range(3):
            angle = p / 10000 ** (2 * i / 6)
            assert table[p, 2 * i].item() == pytest.approx(math.sin(angle), abs=1e-6)
            assert table[p, 2 * i + 1].item() == pytest.approx(math.cos(angle), abs=1e-6)


def test_rope_rotates_each_pair_by_its_angle():
    hd, theta = 8, 10000.0
    cos, sin = rope_tables(6, hd, theta)
    x = torch.randn(1, 1, 6, hd)
    out = apply_rope(x, cos, sin)
    for p in range(6):
        for i in range(hd // 2):  # dimension i pairs with i + hd/2
            angle = p * theta ** (-2 * i / hd)
            a, b = x[0, 0, p, i].item(), x[0, 0, p, i + hd // 2].item()
            assert out[0, 0, p, i].item() == pytest.approx(a * math.cos(angle) - b * math.sin(angle), abs=1e-5)
            assert out[0, 0, p, i + hd // 2].item() == pytest.approx(a * math.sin(angle) + b * math.cos(angle), abs=1e-5)


def test_rope_scores_depend_only_on_relative_position():
    cos, sin = rope_tables(20, 8, 10000.0)
    q, k = torch.randn(8), torch.randn(8)

    def score(m, n):
        qm = apply_rope(q.view(1, 1, 1, 8), cos[m:m + 1], sin[m:m + 1])
        kn = apply_rope(k.view(1, 1, 1, 8), cos[n:n + 1], sin[n:n + 1])
        return (qm * kn).sum().item()

    assert score(7, 3) == pytest.approx(score(15, 11), abs=1e-5)
    assert score(7, 3) != pytest.approx(score(7, 4), abs=1e-5)


def test_gqa_equals_mha_with_each_kv_head_repeated():
    gqa = build(n_head=4, n_kv_head=2)
    mha = GPT(small(n_head=4, n_kv_head=4)).eval()
    state = gqa.state_dict()
    hd, C = 8, 32
    for i in range(2):
        for kind in ("weight", "bias"):
            qkv = state[f"blocks.{i}.attn.qkv.{kind}"]
            q, k, v = qkv.split((4 * hd, 2 * hd, 2 * hd))
            k = k.view(2, hd, *k.shape[1:]).repeat_interleave(2, dim=0).reshape(4 * hd, *k.shape[1:])
            v = v.view(2, hd, *v.shape[1:]).repeat_interleave(2, dim=0).reshape(4 * hd, *v.shape[1:])
            state[f"blocks.{i}.attn.qkv.{kind}"] = torch.cat((q, k, v))
    mha.load_state_dict(state)
    idx = torch.randint(0, 53, (2, 24))
    assert torch.allclose(gqa(idx), mha(idx), atol=1e-5, rtol=0)


def test_state_dict_holds_parameters_only_and_embeddings_are_tied():
    model = build(pos_encoding="rope")
    assert model.lm_head.weight is model.tok_emb.weight
    names = set(model.state_dict())
    assert "rope_cos" not in names and "pos_emb.weight" not in names
    assert {"tok_emb.weight", "lm_head.weight", "norm_f.weight", "blocks.1.attn.qkv.weight"} <= names
    assert "lm_head.weight" in set(build(tie_embeddings=False).state_dict())


def test_gpt2_init_scales_residual_projections():
    torch.manual_seed(0)
    model = GPT(small(n_layer=8, n_embd=128, n_head=4))
    assert model.blocks[0].mlp.fc.weight.std().item() == pytest.approx(0.02, rel=0.05)
    assert model.blocks[0].mlp.proj.weight.std().item() == pytest.approx(0.02 / 4, rel=0.05)  # 1/sqrt(2*8)
    assert model.blocks[0].attn.qkv.bias.abs().sum().item() == 0


def test_safetensors_round_trip_keeps_tied_weights(tmp_path):
    model = build(**VARIANTS["llama"])
    save_model(model, tmp_path / "model.safetensors")
    other = GPT(small(**VARIANTS["llama"])).eval()
    load_model(other, tmp_path / "model.safetensors")
    idx = torch.randint(0, 53, (1, 24))
    assert other.lm_head.weight is other.tok_emb.weight
    assert torch.equal(other(idx), model(idx))


def test_too_long_input_is_refused():
    with pytest.raises(ValueError, match="block_size=24"):
        build()(torch.zeros(1, 25, dtype=torch.long))


@pytest.mark.parametrize("name", PRESETS)
def test_every_preset_builds_on_meta_with_counts(name):
    config = preset(name)
    with torch.device("meta"):
        model = GPT(config)
    x = torch.zeros(2, config.block_size, dtype=torch.long, device="meta")
    assert model(x).shape == (2, config.block_size, config.vocab_size)
    counts, flops = count_parameters(config), flops_per_token(config)
    print(f"{name}: {counts.total:,} parameters ({counts.non_embedding:,} non-embedding), {flops:,} FLOPs/token")
    assert counts.total == sum(p.numel() for p in model.parameters())
    assert 0 < counts.non_embedding < counts.total
    assert flops > 6 * counts.non_embedding


def test_gpt2_124m_counts():
    counts = count_parameters(preset("gpt2-124m"))
    assert counts.total == 124_439_808  # the published GPT-2 small
    assert counts.non_embedding == 124_439_808 - 50257 * 768 - 1024 * 768
    matmul_weights = counts.non_embedding + 50257 * 768  # the tied LM head is a product too
    assert flops_per_token(preset("gpt2-124m")) == 6 * matmul_weights + 12 * 12 * 12 * 64 * 1024


def test_dropout_acts_in_training_only():
    model = build(dropout=0.2)
    idx = torch.randint(0, 53, (2, 24))
    assert torch.equal(model(idx), model(idx))
    model.train()
    assert not torch.allclose(model(idx), model(idx))


# --------------------------------------------------------------------------------------- classify head
def sharpen(model: GPT, std: float = 0.3) -> GPT:
    """Weights large enough that attention is far from uniform (a misplaced scale or mask then shows)."""
    torch.manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 2:
                p.normal_(0.0, std)
    return model


def test_classifier_reads_the_last_real_token_with_left_or_right_padding():
    model = sharpen(build(head="classify", num_labels=3))
    rows = [torch.randint(3, 53, (n,)) for n in (9, 5, 7)]
    alone = torch.cat([model(r[None]) for r in rows])  # (3, num_labels)
    assert alone.shape == (3, 3)
    width = 9
    right = torch.zeros(3, width, dtype=torch.long)
    left = torch.zeros(3, width, dtype=torch.long)
    right_mask = torch.zeros(3, width, dtype=torch.bool)
    left_mask = torch.zeros(3, width, dtype=torch.bool)
    for i, r in enumerate(rows):
        right[i, :len(r)], right_mask[i, :len(r)] = r, True
        left[i, width - len(r):], left_mask[i, width - len(r):] = r, True
    assert torch.allclose(model(right, attention_mask=right_mask), alone, atol=1e-5, rtol=0)
    assert torch.allclose(model(left, attention_mask=left_mask), alone, atol=1e-5, rtol=0)
    assert not torch.allclose(model(right), alone, atol=1e-3)  # without the mask the pads would be read


def test_classifier_config_needs_num_labels_and_lm_none():
    with pytest.raises(ConfigError, match="model.num_labels"):
        small(head="classify")
    with pytest.raises(ConfigError, match="model.num_labels"):
        small(num_labels=3)
    assert not hasattr(build(head="classify", num_labels=2), "lm_head")


# ------------------------------------------------- speedrun options: QK-norm, ReLU^2, zero-init proj, soft cap
def test_qk_norm_rms_normalises_each_heads_queries_and_keys_before_rope():
    model = sharpen(build(qk_norm=True, pos_encoding="rope", n_kv_head=2))
    attn, (B, T, nh, nkv, hd) = model.blocks[0].attn, (2, 24, 4, 2, 8)
    with torch.no_grad():
        attn.q_norm.weight.uniform_(0.5, 2.0)
        attn.k_norm.weight.uniform_(0.5, 2.0)
    x = torch.randn(B, T, 32)
    rope = (model.rope_cos[:T, None], model.rope_sin[:T, None])  # (T, 1, hd): over (B, T, n, hd)

    def by_hand(norm: bool) -> torch.Tensor:  # softmax(Q K^T / sqrt(hd)) V with Q, K = RMSNorm(q, k) rotated
        q, k, v = attn.qkv(x).split((nh * hd, nkv * hd, nkv * hd), dim=-1)
        q, k, v = q.view(B, T, nh, hd), k.view(B, T, nkv, hd), v.view(B, T, nkv, hd)
        if norm:
            q = q / torch.sqrt(q.pow(2).mean(-1, keepdim=True) + 1e-5) * attn.q_norm.weight
            k = k / torch.sqrt(k.pow(2).mean(-1, keepdim=True) + 1e-5) * attn.k_norm.weight
        q, k = apply_rope(q, *rope).transpose(1, 2), apply_rope(k, *rope).transpose(1, 2)  # (B, n, T, hd)
        k, v = k.repeat_interleave(nh // nkv, 1), v.transpose(1, 2).repeat_interleave(nh // nkv, 1)
        scores = (q @ k.transpose(-2, -1) / math.sqrt(hd)).masked_fill(~torch.ones(T, T).tril().bool(), -math.inf)
        return attn.proj((torch.softmax(scores, -1) @ v).transpose(1, 2).reshape(B, T, nh * hd))

    with torch.no_grad():
        ours, expected = attn(x, rope), by_hand(norm=True)
        assert torch.allclose(ours, expected, atol=1e-5, rtol=0)
        assert (ours - by_hand(norm=False)).abs().max() > 100 * 1e-5  # the norm is not a no-op here
    assert count_parameters(small(qk_norm=True)).total - count_parameters(small()).total == 2 * 2 * hd  # 2 layers


def test_relu2_mlp_is_proj_of_relu_squared():
    mlp = build(mlp="relu2").blocks[0].mlp
    assert mlp.fc.out_features == 4 * 32  # the GELU MLP's width
    x = torch.randn(2, 5, 32)
    with torch.no_grad():
        assert torch.allclose(mlp(x), mlp.proj(torch.relu(mlp.fc(x)) ** 2), atol=1e-6, rtol=0)
        assert not torch.allclose(mlp(x), mlp.proj(torch.relu(mlp.fc(x))), atol=1e-4)
    assert count_parameters(small(mlp="relu2")) == count_parameters(small())
    assert flops_per_token(small(mlp="relu2")) == flops_per_token(small())


def test_zero_init_proj_makes_every_block_start_as_the_identity():
    model = build(zero_init_proj=True)
    for block in model.blocks:
        assert not block.attn.proj.weight.any() and not block.mlp.proj.weight.any()
        assert block.attn.qkv.weight.std() > 0.01 and block.mlp.fc.weight.std() > 0.01  # the rest: GPT-2's init
    idx = torch.randint(0, 53, (2, 24))
    with torch.no_grad():
        assert torch.allclose(model(idx), model.lm_head(model.norm_f(model.tok_emb(idx) + model.pos_emb.weight[:24])),
                              atol=1e-6, rtol=0)


def test_logit_softcap_is_cap_times_tanh_of_logits_over_cap():
    plain = sharpen(build(tie_embeddings=False))
    capped = GPT(small(tie_embeddings=False, logit_softcap=2.0)).eval()
    capped.load_state_dict(plain.state_dict())
    idx = torch.randint(0, 53, (2, 24))
    with torch.no_grad():
        logits = plain(idx)
        assert logits.abs().max() > 4.0  # the cap bites
        assert torch.allclose(capped(idx), 2.0 * torch.tanh(logits / 2.0), atol=1e-6, rtol=0)
        assert capped(idx).abs().max() < 2.0
        classify = sharpen(build(head="classify", num_labels=3))
        capped = GPT(small(head="classify", num_labels=3, logit_softcap=0.5)).eval()
        capped.load_state_dict(classify.state_dict())
        assert torch.allclose(capped(idx), 0.5 * torch.tanh(classify(idx) / 0.5), atol=1e-6, rtol=0)


def test_activation_checkpointing_gives_the_same_gradients_and_keeps_far_fewer_activations():
    """Blocks recomputed in the backward pass (dropout included: its random state is replayed) give bit-identical
    gradients, while the tensors kept for the backward pass shrink to about each block's input."""
    config = ModelConfig(vocab_size=64, block_size=32, n_layer=4, n_head=4, n_embd=64, dropout=0.1)
    torch.manual_seed(0)
    model = GPT(config)
    x = torch.randint(0, 64, (4, 32))

    def run(checkpointing: bool) -> tuple[list[torch.Tensor], int]:
        model.zero_grad()
        model.checkpoint_blocks = checkpointing
        saved = []
        torch.manual_seed(1)  # the same dropout masks both times
        with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.numel() * t.element_size()) or t,
                                                      lambda t: t):
            loss = torch.nn.functional.cross_entropy(model(x).flatten(0, 1), x.flatten())
        loss.backward()
        return [p.grad.clone() for p in model.parameters()], sum(saved)

    plain, plain_bytes = run(False)
    checkpointed, checkpointed_bytes = run(True)
    assert all(torch.equal(a, b) for a, b in zip(plain, checkpointed))
    assert checkpointed_bytes < 0.5 * plain_bytes, (checkpointed_bytes, plain_bytes)
