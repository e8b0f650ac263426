"""QLoRA (lora.quantize nf4): the frozen base's block layers in bitsandbytes' 4-bit NormalFloat, byte for byte; a
run trains its adapters on them, resumes exactly, and computes with them wherever it is loaded (eval, generate,
merge, export); peft on transformers' own 4-bit load of the exported base computes the run's logits."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import bitsandbytes as bnb
import bitsandbytes.functional as bnb_functional
import pytest
import torch
import torch.nn.functional as F
import transformers

import lmforge
from lmforge import nf4
from lmforge.cli import main
from lmforge.config import LoRAConfig
from lmforge.errors import ConfigError
from lmforge.lora import LoRALinear, apply_lora, base_fingerprint, merge_lora
from lmforge.model import GPT
from lmforge.train import Trainer
from test_added_tokens import LLAMA
from test_tasks import make_base
from tiny_training import resumed_copy, tiny_config


def weight(shape: tuple[int, ...], seed: int = 0) -> torch.Tensor:
    """Normal weights with the cases a quantizer must get right: a zero block, a block of one value, an outlier."""
    g = torch.Generator().manual_seed(seed)
    w = 0.02 * torch.randn(*shape, generator=g)
    flat = w.view(-1)
    if flat.numel() >= 192:
        flat[:64] = 0.0  # a block of zeros (its maximum 0)
        flat[64:128] = -0.5  # a block of one value: every entry at -1 x its maximum
        flat[150] = 3.0  # an outlier, the maximum of its block
    if flat.numel() >= 256:  # values exactly between two levels (a block whose maximum is 1): the lower level
        flat[192:256] = torch.cat([nf4.MIDPOINTS, -nf4.MIDPOINTS, torch.ones(34)])
    return w


@pytest.mark.parametrize("shape", [(96, 64), (48, 100), (7, 9), (1, 64), (33,)])
def test_nf4_bytes_maxima_and_values_are_bitsandbytes_own(shape):
    w = weight(shape)
    theirs, state = bnb_functional.quantize_4bit(w, blocksize=64, quant_type="nf4")
    packed, absmax = nf4.quantize(w)
    assert torch.equal(packed, theirs.view(-1)) and torch.equal(absmax, state.absmax)
    ours = nf4.dequantize(packed, absmax, w.shape)
    assert torch.equal(ours.reshape(-1), bnb_functional.dequantize_4bit(theirs, state).reshape(-1))
    assert packed.numel() == (w.numel() + 1) // 2 and absmax.numel() == -(-w.numel() // 64)
    assert (ours - w).abs().max() <= 0.5 * absmax.max() * 0.3  # the widest gap between levels is 0.3 x the maximum


def test_the_levels_are_normal_quantiles_as_qlora_derives_them():
    """NF4's 16 levels: N(0, 1)'s quantiles at 8 probabilities from 0.9677 to 0.5 (and 7 for the negative side),
    each side scaled to [-1, 1]; the table (bitsandbytes') is that, to fp32's last bit."""
    high = torch.special.ndtri(torch.linspace(0.9677083, 0.5, 9, dtype=torch.float64)[:-1])
    low = -torch.special.ndtri(torch.linspace(0.9677083, 0.5, 8, dtype=torch.float64)[:-1])
    levels = torch.cat([low / high.max(), torch.zeros(1, dtype=torch.float64), high / high.max()]).sort().values
    assert torch.allclose(nf4.LEVELS.double(), levels, atol=2e-7, rtol=0)
    assert torch.equal(nf4.LEVELS, bnb_functional.get_4bit_type("nf4", device="cpu"))


def test_an_nf4_linear_computes_with_its_dequantized_weight_forward_and_backward():
    torch.manual_seed(0)
    linear = torch.nn.Linear(128, 96)
    layer = nf4.NF4Linear(linear)
    dense = layer.dense()
    assert 0 < (dense - linear.weight).abs().max() <= 0.2 * linear.weight.abs().max()
    x = torch.randn(3, 5, 128, requires_grad=True)
    y = layer(x)
    expected_x = x.detach().clone().requires_grad_(True)
    expected = F.linear(expected_x, dense, linear.bias)
    assert torch.allclose(y, expected, atol=1e-6)
    g = torch.randn_like(y)
    y.backward(g)
    expected.backward(g)
    assert torch.allclose(x.grad, expected_x.grad, atol=1e-6)
    assert [name for name, _ in layer.named_buffers()] == ["packed", "absmax"] and linear.bias.grad is None
    stored = sum(t.numel() * t.element_size() for t in layer.buffers())
    assert stored == 128 * 96 * nf4.BYTES_PER_WEIGHT  # 0.5625 bytes a weight, against fp32's 4
    with torch.autocast("cpu", dtype=torch.bfloat16):  # bf16-mixed: the product in bf16, as autocast's own
        z = layer(x)
        reference = F.linear(x, dense, linear.bias)
    assert z.dtype == torch.bfloat16 and torch.allclose(z.float(), reference.float(), atol=2e-2, rtol=2e-2)


# ------------------------------------------------------------------------------------------- a QLoRA run
WIDE = {**LLAMA, "model.n_embd": 64}  # bitsandbytes' CPU product wants in_features a multiple of its 64-value blocks


def qlora_values(root: Path, base: Path, **overrides) -> dict:
    return {"data.path": str(root / "pre"), "train.init_from": str(base), "train.max_steps": 6, "train.save_interval": 3,
            "train.batch_size": 8, "lora.r": 4, "lora.targets": "q,v,mlp", "lora.quantize": "nf4", "optim.lr": 1e-2,
            **overrides}


@pytest.fixture(scope="module")
def qlora(tmp_path_factory) -> tuple[Path, Path, dict, Trainer]:
    """(root, base run, the run's settings, its Trainer after 6 steps) of a QLoRA run on a Llama-style base."""
    root = tmp_path_factory.mktemp("qlora")
    base = make_base(root, **WIDE)
    values = qlora_values(root, base)
    trainer = Trainer(tiny_config(root / "run", **values), progress=False, tensorboard=False)
    trainer.fit()
    return root, base, values, trainer


def test_a_qlora_run_holds_its_base_in_4_bits_and_trains_only_the_adapters(qlora):
    root, base, _, trainer = qlora
    model = trainer.raw_model
    plain, _, _ = lmforge.checkpoint.load_for_inference(base, "cpu")
    layers = {name: m for name, m in model.blocks.named_modules() if isinstance(m, nf4.NF4Linear)}
    dense = {name: m for name, m in plain.blocks.named_modules() if isinstance(m, torch.nn.Linear)}
    assert {n.removesuffix(".nf4") for n in layers} == set(dense) and len(dense) == 2 * 4  # qkv, proj, fc, proj
    assert not isinstance(model.blocks[0].attn.proj, LoRALinear)  # o: not adapted, in 4 bits all the same
    for name, layer in layers.items():  # each one the base's weight as bitsandbytes quantizes it
        packed, absmax = bnb_functional.quantize_4bit(dense[name.removesuffix(".nf4")].weight, blocksize=64,
                                                      quant_type="nf4")
        assert torch.equal(layer.packed, packed.view(-1)) and torch.equal(layer.absmax, absmax.absmax)
    assert all(".lora." in name for name, p in model.named_parameters() if p.requires_grad)
    losses = [loss for _, loss in trainer.history]
    assert losses[-1] < losses[0] - 0.1  # it learns through the 4-bit layers


def test_a_qlora_run_resumes_bit_identically(qlora, tmp_path):
    root, base, values, trainer = qlora
    resumed = resumed_copy(root / "run", 3, tiny_config(tmp_path / "resumed", **values, **{"train.resume": "auto"}))
    assert [step for step, _ in resumed.history] == [4, 5, 6]
    assert [loss for _, loss in resumed.history] == [loss for step, loss in trainer.history if step > 3]


def test_every_reader_of_a_qlora_run_computes_with_its_4_bit_base(qlora, capsys):
    """load_for_inference (eval, generate, serve, merge) gives the run's model: its adapters on the 4-bit base, not on
    the base in full."""
    root, _, _, trainer = qlora
    ids = torch.tensor([[0] + list(range(100, 115))])
    trained = trainer.raw_model.eval()
    merged, _, config = lmforge.checkpoint.load_for_inference(root / "run", "cpu")
    in_full = dataclasses.replace(config, lora=dataclasses.replace(config.lora, quantize=None))
    full = merge_lora(lmforge.checkpoint.load_adapted_lora(lmforge.checkpoint.resolve_checkpoint(root / "run"), in_full))
    with torch.no_grad():
        assert (merged(ids) - trained(ids)).abs().max() <= 1e-5
        assert (full(ids) - trained(ids)).abs().max() > 1e-2  # the full-precision base computes something else
    assert not any(isinstance(m, nf4.NF4Linear) for m in merged.modules())  # merged: plain layers of those values
    assert main(["merge", str(root / "run"), "--out", str(root / "merged")]) == 0
    capsys.readouterr()
    saved, _, _ = lmforge.checkpoint.load_for_inference(root / "merged", "cpu")
    with torch.no_grad():
        assert (saved(ids) - trained(ids)).abs().max() <= 1e-5


def transformers_4_bit(export: Path):
    """(transformers' 4-bit load of an HF export: BitsAndBytesConfig nf4, fp32 compute; the same model in full with
    each of those 4-bit weights dequantized)."""
    quantized = transformers.AutoModelForCausalLM.from_pretrained(export, device_map="cpu", quantization_config=(
        transformers.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                        bnb_4bit_compute_dtype=torch.float32)))
    rounded = transformers.AutoModelForCausalLM.from_pretrained(export)
    for name, module in quantized.named_modules():
        if isinstance(module, bnb.nn.Linear4bit):
            rounded.get_submodule(name).weight.data = bnb_functional.dequantize_4bit(module.weight.data,
                                                                                     module.weight.quant_state)
    return quantized, rounded


@pytest.mark.parametrize("dora", [False, True])
def test_peft_on_transformers_4_bit_base_computes_the_qlora_runs_logits(tmp_path, dora):
    """The export: the base in full (transformers quantizes it as it loads, BitsAndBytesConfig nf4) and the adapter.
    Its 4-bit weights are the run's byte for byte, so peft on them computes the run's logits: exactly on the
    dequantized weights, and within bitsandbytes' CPU product's rounding on its Linear4bit layers."""
    import peft

    from lmforge.interop.hf_export import export_hf

    base = make_base(tmp_path, **WIDE)
    values = qlora_values(tmp_path, base, **{"lora.dora": dora, "train.save_interval": 0})
    Trainer(tiny_config(tmp_path / "run", **values), progress=False, tensorboard=False).fit()
    ours, tok, _ = lmforge.checkpoint.load_for_inference(tmp_path / "run", "cpu")
    out = export_hf(tmp_path / "run", tmp_path / "hf")
    quantized, rounded = transformers_4_bit(out)
    ids = torch.tensor([[tok.start_id] + tok.encode("hello world!")])
    with torch.no_grad():
        expected = ours(ids)
        exact = peft.PeftModel.from_pretrained(rounded, out / "adapter").eval()(ids).logits
        assert (exact - expected).abs().max() <= 1e-5
        full = peft.PeftModel.from_pretrained(transformers.AutoModelForCausalLM.from_pretrained(out),
                                              out / "adapter").eval()(ids).logits
        assert (full - expected).abs().max() > 1e-2  # (the adapter on the base in full: another model)
        if not dora:  # (peft's 4-bit DoRA layers on the CPU compute otherwise than its DoRA on the same dequantized
            # weights, by 0.08 here: DoRA is checked on those weights above)
            with_bnb = peft.PeftModel.from_pretrained(quantized, out / "adapter").eval()(ids).logits
            assert (with_bnb - expected).abs().max() <= 0.2 * (full - expected).abs().max()


def test_qlora_refusals_are_one_line(qlora, tmp_path):
    root, base, _, _ = qlora
    with pytest.raises(ConfigError, match="lora.init=pissa with lora.quantize nf4 is not supported"):
        LoRAConfig(init="pissa", quantize="nf4")
    from lmforge.generate import load
    from lmforge.generate.api import load_adapters

    with pytest.raises(ConfigError, match="trained on its base in 4 bits .*serve the base with --quantize nf4"):
        load_adapters(load(str(base)), {"q": str(root / "run")}, str(base))


def test_the_fingerprint_of_a_quantized_model_covers_its_4_bit_weights():
    """The reference scores' cache key (base_fingerprint with adapters) tells a QLoRA model from its base in full,
    and from another 4-bit base."""
    torch.manual_seed(0)
    model = GPT(lmforge.config.preset("tiny", vocab_size=61, block_size=16))
    before = base_fingerprint(model)
    quantized = apply_lora(model, LoRAConfig(r=2, targets=["q"], quantize="nf4"))
    after = base_fingerprint(quantized)
    assert after != before
    with torch.no_grad():
        quantized.blocks[0].mlp.fc.packed[0] ^= 1
    assert base_fingerprint(quantized) not in (before, after)


def test_plan_counts_the_4_bit_weights_at_their_size(qlora, tmp_path):
    from lmforge.plan import plan, quantized_weights

    root, base, values, trainer = qlora
    in_4_bits = plan(tiny_config(tmp_path / "a", **values), task="tokens")
    in_full = plan(tiny_config(tmp_path / "b", **{**values, "lora.quantize": None}), task="tokens")
    stored = sum(m.in_features * m.out_features for m in trainer.raw_model.modules() if isinstance(m, nf4.NF4Linear))
    assert quantized_weights(trainer.config.model) == stored > 0
    assert in_full.weights - in_4_bits.weights == pytest.approx((4 - nf4.BYTES_PER_WEIGHT) * stored)
    assert any("lora.quantize nf4" in note for note in in_4_bits.notes)


@pytest.mark.parametrize("shape", [(512, 256), (1024, 1024), (300, 192), (96, 100)])
def test_double_quantized_maxima_are_bitsandbytes_codes_save_for_its_tables_near_ties(shape):
    """QLoRA's double quantization: the maxima less their mean, in blocks of 256 over each block's maximum, coded in
    the dynamic map (bitsandbytes' create_dynamic_map, value for value). Every code is the nearest; bitsandbytes' CPU
    kernel agrees except where a value is within its table's resolution (1/65535) of a midpoint."""
    assert torch.equal(nf4.DYNAMIC, bnb_functional.create_dynamic_map(signed=True))
    torch.manual_seed(0)
    w = 0.02 * torch.randn(*shape)
    theirs, state = bnb_functional.quantize_4bit(w, blocksize=64, quant_type="nf4", compress_statistics=True)
    packed, absmax = nf4.quantize(w)
    codes, scale, offset = nf4.compress_maxima(absmax)
    assert torch.equal(packed, theirs.view(-1)) and torch.equal(offset, state.offset)
    assert torch.equal(scale, state.state2.absmax)
    m = absmax.numel()
    x = (F.pad(absmax - offset, (0, -m % 256)).view(-1, 256) / scale[:, None]).reshape(-1)[:m]  # what is coded
    distance = (x[:, None] - nf4.DYNAMIC[None, :]).abs()
    assert torch.equal(distance.gather(1, codes.long()[:, None]).view(-1), distance.min(dim=1).values)  # nearest
    differ = codes != state.absmax
    middles = (nf4.DYNAMIC[codes.long()] + nf4.DYNAMIC[state.absmax.long()]) / 2
    assert differ.float().mean() < 0.01 and ((x - middles).abs()[differ] < 1 / 65535).all()
    ours = nf4.dequantize(packed, nf4.expand_maxima(codes, scale, offset), w.shape)
    expected = bnb_functional.dequantize_4bit(theirs, state)
    close = ~differ.repeat_interleave(64)[:w.numel()].view(w.shape)  # weights of blocks whose maximum's code agrees
    assert torch.equal(ours[close], expected[close])
    assert (ours - expected).abs().max() <= 1e-2 * w.abs().max()  # one step of the 8-bit code in a few maxima


def test_a_double_quantized_qlora_run_stores_less_and_computes_with_what_it_stores(qlora, tmp_path):
    root, base, values, single = qlora
    trainer = Trainer(tiny_config(tmp_path / "run", **{**values, "lora.double_quant": True, "train.max_steps": 2}),
                      progress=False, tensorboard=False)
    layers = [m for m in trainer.raw_model.modules() if isinstance(m, nf4.NF4Linear)]
    assert layers and all(m.double and not hasattr(m, "absmax") for m in layers)
    stored = sum(t.numel() * t.element_size() for m in layers for t in m.buffers())
    weights = sum(m.in_features * m.out_features for m in layers)
    assert stored < weights * 0.5625 and stored == pytest.approx(weights * nf4.DOUBLE_BYTES_PER_WEIGHT, rel=0.02)
    trainer.fit()
    merged, _, config = lmforge.checkpoint.load_for_inference(tmp_path / "run", "cpu")
    ids = torch.tensor([[0] + list(range(100, 115))])
    with torch.no_grad():
        assert (merged(ids) - trainer.raw_model.eval()(ids)).abs().max() <= 1e-5
    with pytest.raises(ConfigError, match="lora.double_quant .* set lora.quantize nf4 too"):
        LoRAConfig(double_quant=True)


@pytest.mark.parametrize("double", [False, True])
def test_a_peft_adapter_trained_with_qlora_imports_onto_the_4_bit_base_with_peft_logits(tmp_path, double):
    """peft's QLoRA (get_peft_model on transformers' 4-bit load, BitsAndBytesConfig nf4): `lmforge import --quantize
    nf4` keeps the run's base in 4 bits as bitsandbytes stored it, so it computes peft's logits; without the flag the
    adapter lands on the base in full, another model."""
    import peft

    from lmforge.interop.hf_export import export_hf

    base = make_base(tmp_path, **WIDE)
    hf_dir = export_hf(base, tmp_path / "hf")
    quantized = transformers.AutoModelForCausalLM.from_pretrained(hf_dir, device_map="cpu", quantization_config=(
        transformers.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                        bnb_4bit_compute_dtype=torch.float32, bnb_4bit_use_double_quant=double)))
    theirs = peft.get_peft_model(quantized, peft.LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0,
                                                            target_modules=["q_proj", "v_proj", "down_proj"]))
    torch.manual_seed(0)
    with torch.no_grad():
        for name, p in theirs.named_parameters():
            if "lora_B" in name:
                p.add_(0.3 * torch.randn_like(p))
    theirs.save_pretrained(tmp_path / "adapter")
    rounded = transformers.AutoModelForCausalLM.from_pretrained(hf_dir)  # the 4-bit weights, dequantized
    for name, module in quantized.named_modules():
        if isinstance(module, bnb.nn.Linear4bit):
            rounded.get_submodule(name.removeprefix("base_model.model.").removesuffix(".base_layer")).weight.data = \
                bnb_functional.dequantize_4bit(module.weight.data, module.weight.quant_state)
    flags = ["--quantize", "nf4"] + (["--double-quant"] if double else [])
    assert main(["import", str(tmp_path / "adapter"), "--base", str(base), "--out", str(tmp_path / "run"),
                 *flags]) == 0
    assert main(["import", str(tmp_path / "adapter"), "--base", str(base), "--out", str(tmp_path / "full")]) == 0
    ours, tok, config = lmforge.checkpoint.load_for_inference(tmp_path / "run", "cpu")
    assert config.lora.quantize == "nf4" and config.lora.double_quant == double
    full, _, _ = lmforge.checkpoint.load_for_inference(tmp_path / "full", "cpu")
    ids = torch.tensor([[tok.start_id] + tok.encode("hello world!")])
    with torch.no_grad():
        expected = peft.PeftModel.from_pretrained(rounded, tmp_path / "adapter").eval()(ids).logits
        gap, other = (ours(ids) - expected).abs().max(), (full(ids) - expected).abs().max()
        # (double: bitsandbytes' CPU kernel codes a few maxima one step off, see the test above)
        assert gap <= 1e-5 if not double else gap <= 0.1 * other
        assert other > 1e-2


def test_import_quantize_outside_a_peft_adapter_is_one_line(qlora, tmp_path, capsys):
    root, base, _, _ = qlora
    assert main(["import", str(base), "--out", str(tmp_path / "x"), "--quantize", "nf4"]) == 2
    err = capsys.readouterr().err
    assert "--quantize and --double-quant apply to a PEFT adapter" in err and len(err.strip().splitlines()) == 1
    assert main(["import", str(root / "adapter-missing"), "--base", str(base), "--out", str(tmp_path / "y"),
                 "--double-quant"]) == 2
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()
