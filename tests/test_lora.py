"""LoRA: an adapted model starts as its base, trains only adapters, merges into a plain GPT, loads strictly."""

import pytest
import torch
import torch.nn.functional as F

from lmforge.config import ModelConfig, build_section, preset
from lmforge.errors import CheckpointError, ConfigError
from lmforge.lora import (LoRAConfig, LoRAEmbedding, LoRALinear, apply_lora, base_fingerprint, load_lora_state_dict,
                          lora_parameters, lora_state_dict, merge_lora)
from lmforge.model import GPT

VARIANTS = {
    "gpt2": dict(),
    "llama-gqa-swiglu": dict(norm="rmsnorm", mlp="swiglu", pos_encoding="rope", bias=False, n_kv_head=2),
    "untied": dict(tie_embeddings=False, n_kv_head=1),
}
EVERY_TARGET = ["q", "k", "v", "o", "mlp", "emb"]  # and "head" where lm_head is untied


def targets(variant: str, table: bool = True) -> list:
    """Every target the variant takes (`table`: with the embedding's, which DoRA and PiSSA do not adapt)."""
    return [t for t in EVERY_TARGET if table or t != "emb"] + (["head"] if variant == "untied" else [])


def small(**overrides) -> ModelConfig:
    return ModelConfig(**{**dict(vocab_size=53, block_size=16, n_layer=2, n_head=4, n_embd=32), **overrides})


def build(seed=0, **overrides) -> GPT:
    torch.manual_seed(seed)
    return GPT(small(**overrides)).eval()


def copy_of(model: GPT) -> GPT:
    twin = GPT(model.config).eval()
    twin.load_state_dict(model.state_dict())
    return twin


def randomize(model: torch.nn.Module, seed: int = 1) -> None:
    """Random A and B (B is 0 at init, which would hide every bug in how adapters are added)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in lora_parameters(model):
            p.copy_(torch.randn(p.shape, generator=g) * 0.2)


def tokens(seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 53, (2, 16), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("variant", VARIANTS)
def test_with_B_zero_the_adapted_model_equals_its_base_exactly(variant):
    base = build(**VARIANTS[variant])
    model = apply_lora(copy_of(base), LoRAConfig(targets=targets(variant)))
    idx = tokens()
    assert torch.equal(model(idx), base(idx))


@pytest.mark.parametrize("variant", VARIANTS)
def test_merge_gives_a_plain_gpt_with_the_adapted_logits(variant):
    base = build(**VARIANTS[variant])
    model = apply_lora(copy_of(base), LoRAConfig(r=4, alpha=8, targets=targets(variant)))
    randomize(model)
    idx = tokens()
    adapted = model(idx)
    assert not torch.allclose(adapted, base(idx), atol=1e-3)  # the adapters do change the function
    merged = merge_lora(model)
    assert not any(isinstance(m, (LoRALinear, LoRAEmbedding)) for m in merged.modules())
    assert list(merged.state_dict()) == list(GPT(base.config).state_dict())
    assert torch.allclose(merged(idx), adapted, atol=1e-5, rtol=0)
    plain = GPT(base.config).eval()  # and it loads into an ordinary GPT, which computes the same
    plain.load_state_dict(merged.state_dict())
    assert torch.allclose(plain(idx), adapted, atol=1e-5, rtol=0)


def test_merge_then_unmerge_restores_the_weights():
    base = build(**VARIANTS["llama-gqa-swiglu"])
    model = apply_lora(copy_of(base), LoRAConfig(targets=EVERY_TARGET))
    randomize(model)
    idx = tokens()
    adapted = model(idx)
    layers = [m for m in model.modules() if isinstance(m, (LoRALinear, LoRAEmbedding))]
    for layer in layers:
        layer.merge()
    assert torch.allclose(model(idx), adapted, atol=5e-5, rtol=0)
    assert not torch.equal(model.blocks[0].attn.qkv.weight, base.blocks[0].attn.qkv.weight)  # merged for real
    assert not torch.equal(model.tok_emb.weight, base.tok_emb.weight)
    for layer in layers:
        layer.unmerge()
    for name, p in base.named_parameters():
        assert torch.allclose(model.get_parameter(name), p, atol=1e-6, rtol=0), name
    assert torch.allclose(model(idx), adapted, atol=5e-5, rtol=0)


@pytest.mark.parametrize("variant", VARIANTS)
def test_an_optimizer_step_changes_only_the_adapters(variant):
    model = apply_lora(build(**VARIANTS[variant]), LoRAConfig(dropout=0.1, targets=targets(variant))).train()
    adapters = set(lora_state_dict(model))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    opt = torch.optim.AdamW(lora_parameters(model), lr=1e-2)
    idx = tokens()
    F.cross_entropy(model(idx).flatten(0, 1), idx.roll(-1, dims=1).flatten()).backward()
    opt.step()
    after = model.state_dict()
    for key in before:
        if key not in adapters:
            assert torch.equal(after[key], before[key]), key
    # B starts at 0 and moves first; the embedding's A does (peft's init: A = 0, B random)
    assert all(not torch.equal(after[k], before[k]) for k in adapters if k.endswith(".B") != k.startswith("tok_emb"))
    base = [(n, p) for n, p in model.named_parameters() if n not in adapters]
    assert base and all(not p.requires_grad and p.grad is None for _, p in base)
    assert {id(p) for p in lora_parameters(model)} == {id(p) for p in model.parameters() if p.requires_grad}


@pytest.mark.parametrize("target", ["q", "k", "v"])
def test_q_k_v_adapt_only_their_slice_of_qkv(target):
    model = apply_lora(build(n_kv_head=2), LoRAConfig(r=3, alpha=6, targets=[target]))
    randomize(model)
    layer = model.blocks[1].attn.qkv
    c = model.config
    sizes = {"q": c.n_head * c.head_dim, "k": c.n_kv_head * c.head_dim, "v": c.n_kv_head * c.head_dim}
    x = torch.randn(2, 5, c.n_embd)
    plain = F.linear(x, layer.weight, layer.bias).split(list(sizes.values()), dim=-1)
    adapted = layer(x).split(list(sizes.values()), dim=-1)
    A, B = layer.lora[target].A, layer.lora[target].B
    for name, got, want in zip(sizes, adapted, plain):
        if name == target:  # x W^T + b + (alpha / r) x A^T B^T
            assert torch.allclose(got, want + 2.0 * x @ A.T @ B.T, atol=1e-6, rtol=0)
        else:
            assert torch.equal(got, want), name


def test_adapters_save_and_load_into_a_fresh_model():
    base = build(**VARIANTS["llama-gqa-swiglu"])
    config = LoRAConfig(targets=EVERY_TARGET)
    trained = apply_lora(copy_of(base), config)
    randomize(trained)
    saved = {k: v.clone() for k, v in lora_state_dict(trained).items()}
    assert "blocks.0.attn.qkv.lora.q.A" in saved and "blocks.1.mlp.proj.lora.mlp.B" in saved
    assert set(saved) == {f"blocks.{i}.{m}.lora.{t}.{w}" for i in range(2) for w in "AB" for m, t in [
        ("attn.qkv", "q"), ("attn.qkv", "k"), ("attn.qkv", "v"), ("attn.proj", "o"), ("mlp.fc", "mlp"),
        ("mlp.proj", "mlp")]} | {"tok_emb.lora.emb.A", "tok_emb.lora.emb.B"}
    assert saved["tok_emb.lora.emb.A"].shape == (8, 53) and saved["tok_emb.lora.emb.B"].shape == (32, 8)  # peft's
    torch.manual_seed(7)  # another draw of A
    fresh = apply_lora(copy_of(base), config)
    load_lora_state_dict(fresh, saved)
    idx = tokens()
    assert torch.equal(fresh(idx), trained(idx))


def test_loading_adapters_is_strict_and_leaves_the_model_untouched_on_error():
    base = build()
    model = apply_lora(copy_of(base), LoRAConfig())
    before = {k: v.clone() for k, v in lora_state_dict(model).items()}
    good = {k: torch.ones_like(v) for k, v in before.items()}
    missing = {k: v for k, v in good.items() if k != "blocks.1.attn.qkv.lora.v.B"}
    with pytest.raises(CheckpointError, match=r"missing blocks\.1\.attn\.qkv\.lora\.v\.B; load them"):
        load_lora_state_dict(model, missing)
    extra = {**good, "blocks.0.attn.qkv.lora.k.A": torch.ones(8, 32)}
    with pytest.raises(CheckpointError, match=r"unexpected blocks\.0\.attn\.qkv\.lora\.k\.A; load them"):
        load_lora_state_dict(model, extra)
    wrong_shape = {**good, "blocks.0.attn.qkv.lora.q.A": torch.ones(4, 32)}
    shape = r"blocks\.0\.attn\.qkv\.lora\.q\.A has shape \(4, 32\), the model's \(8, 32\)"
    with pytest.raises(CheckpointError, match=shape):
        load_lora_state_dict(model, wrong_shape)
    assert all(torch.equal(v, before[k]) for k, v in lora_state_dict(model).items())


def test_base_fingerprint_names_the_frozen_weights_only():
    base = build()
    model = apply_lora(copy_of(base), LoRAConfig(targets=EVERY_TARGET))
    assert base_fingerprint(model) == base_fingerprint(base)  # same names and weights with or without adapters
    randomize(model)
    assert base_fingerprint(model) == base_fingerprint(base)  # adapters are not part of it
    with torch.no_grad():
        model.blocks[1].mlp.proj.weight[3, 5] += 1e-3
    assert base_fingerprint(model) != base_fingerprint(base)
    assert base_fingerprint(build(seed=1)) != base_fingerprint(base)


def test_a_tied_head_is_refused_and_an_untied_one_adapted():
    with pytest.raises(ConfigError, match="lm_head is tied to tok_emb.*drop head from lora.targets"):
        apply_lora(build(), LoRAConfig(targets=["q", "head"]))
    model = apply_lora(build(tie_embeddings=False), LoRAConfig(targets=["head"]))
    assert isinstance(model.lm_head, LoRALinear) and list(model.lm_head.lora) == ["head"]


def test_lora_is_applied_once():
    model = apply_lora(build(), LoRAConfig())
    with pytest.raises(ValueError, match="has LoRA adapters already"):
        apply_lora(model, LoRAConfig())


@pytest.mark.parametrize("values,message", [
    (dict(targets=["q", "x"]), r"lora\.targets\[1\]='x' is invalid: choose one of q, k, v, o, mlp, head, emb"),
    (dict(targets=[]), "lora.targets is empty: name at least one of q, k, v, o, mlp, head, emb"),
    (dict(targets=["q", "emb"], dora=True), "lora.targets has emb with lora.dora, which lmforge applies to Linear"),
    (dict(targets=["emb"], init="pissa"), "lora.targets has emb with lora.init=pissa"),
    (dict(targets=["q", "v", "q"]), "names q more than once"),
    (dict(r=0), r"lora\.r=0 is invalid: a positive integer"),
    (dict(alpha=0), r"lora\.alpha=0 is invalid"),
    (dict(dropout=1.0), r"lora\.dropout=1\.0 is invalid: a probability in \[0, 1\)"),
])
def test_config_errors_name_the_field(values, message):
    with pytest.raises(ConfigError, match=message):
        LoRAConfig(**values)


def test_config_reads_targets_as_text():
    assert build_section(LoRAConfig, {"targets": "q,k,o", "r": "4"}, "lora") == LoRAConfig(r=4, targets=["q", "k", "o"])
    assert LoRAConfig().targets == ["q", "v"] and LoRAConfig().scale == 2.0


def test_trainable_parameters_of_gpt2_124m_at_rank_8_on_q_and_v():
    config = preset("gpt2-124m")
    with torch.device("meta"):
        model = apply_lora(GPT(config), LoRAConfig(r=8, targets=["q", "v"]))
    C, q, v = config.n_embd, config.n_head * config.head_dim, config.n_kv_head * config.head_dim
    expected = config.n_layer * 8 * ((C + q) + (C + v))  # A (r, C) and B (out, r) for each of q and v
    assert expected == 294_912
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == expected
    assert sum(p.numel() for p in lora_parameters(model)) == expected


def test_dropout_reaches_only_the_adapters_input():
    layer = apply_lora(build(), LoRAConfig(dropout=0.5)).blocks[0].attn.qkv.train()
    x = torch.randn(2, 5, 32)
    assert torch.equal(layer(x), F.linear(x, layer.weight, layer.bias))  # B = 0: the frozen path sees x whole
    randomize(layer)
    assert not torch.equal(layer(x), layer(x))  # a new mask each call
    layer.eval()
    assert torch.equal(layer(x), layer(x))


def test_rslora_scales_by_alpha_over_the_square_root_of_r():
    lora = LoRAConfig(r=16, alpha=8.0, rslora=True, targets=["q", "o"])
    assert lora.scale == 2.0 and LoRAConfig(r=16, alpha=8.0).scale == 0.5
    adapted = apply_lora(build(), lora)
    randomize(adapted)
    layers = [m for m in adapted.modules() if isinstance(m, LoRALinear)]
    assert layers and all(m.scale == 2.0 for m in layers)
    x = torch.randn(3, 32)
    layer = layers[0]
    expected = F.linear(x, layer.weight, layer.bias)
    for a in layer.lora.values():
        expected[:, a.start:a.start + a.size] += 2.0 * x @ a.A.T @ a.B.T
    assert torch.allclose(layer(x), expected, atol=1e-5)
