"""LoftQ (lora.init loftq, with lora.quantize nf4): each adapted layer's adapters start at the top singular vectors of
what its 4 bits lose, as peft's loftq_init computes them (its SVD, bitsandbytes' quantizer); the run starts nearer
the base in full than QLoRA, trains, resumes exactly, loads as it trained, and peft on transformers' 4-bit load of
its export computes its logits."""

from __future__ import annotations

import bitsandbytes as bnb
import bitsandbytes.functional as bnb_functional
import pytest
import torch
from peft.utils.loftq_utils import _low_rank_decomposition

import lmforge
from lmforge import nf4
from lmforge.config import LoRAConfig
from lmforge.errors import ConfigError
from lmforge.lora import loftq_start
from lmforge.train import Trainer
from test_qlora import WIDE, qlora_values, transformers_4_bit
from test_tasks import make_base
from tiny_training import resumed_copy, tiny_config


def structured(shape: tuple[int, int], seed: int = 0) -> torch.Tensor:
    """A weight with a few strong directions and noise, as trained weights have (a random one has none)."""
    gen = torch.Generator().manual_seed(seed)
    low = torch.randn(shape[0], 6, generator=gen) @ torch.randn(6, shape[1], generator=gen)
    return (low + 0.5 * torch.randn(shape, generator=gen)) / 20


def peft_loftq(weight: torch.Tensor, r: int, iterations: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """peft's loftq_init loop (peft.utils.loftq_utils, which runs only on CUDA or XPU) on the CPU, with its own
    building blocks: bitsandbytes' NF4 quantizer and peft's _low_rank_decomposition. (quantized input, A, B)."""
    res = weight.clone()
    for i in range(iterations):
        packed, state = bnb_functional.quantize_4bit(res, blocksize=64, quant_type="nf4")
        dequantized = bnb_functional.dequantize_4bit(packed, state)
        quantized_input = res
        res = weight - dequantized
        out = _low_rank_decomposition(res, reduced_rank=r)
        L, R = out["L"], out["R"]
        if i + 1 == iterations:
            break
        res = weight - L @ R
    return quantized_input, R, L


@pytest.mark.parametrize("iterations", [1, 3])
def test_the_start_is_peft_loftq_on_bitsandbytes_quantizer(iterations):
    w = structured((96, 128))
    stored, starts = loftq_start(w, {"all": (0, 96)}, r=8, scale=1.0, iterations=iterations)
    quantized_input, A, B = peft_loftq(w, 8, iterations)
    torch.testing.assert_close(stored, quantized_input, rtol=0, atol=1e-6)  # the same weight goes into 4 bits
    assert torch.equal(nf4.quantize(stored)[0], bnb_functional.quantize_4bit(quantized_input, blocksize=64,
                                                                             quant_type="nf4")[0].view(-1))
    torch.testing.assert_close(starts["all"][0], A, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(starts["all"][1], B, rtol=1e-4, atol=1e-5)
    scaled = loftq_start(w, {"all": (0, 96)}, r=8, scale=4.0, iterations=iterations)[1]["all"]
    torch.testing.assert_close(4.0 * scaled[1] @ scaled[0], B @ A, rtol=1e-4, atol=1e-5)  # s B A: whatever s is


def test_the_adapters_bring_the_4_bit_weight_nearer_the_full_one_and_leave_other_rows_alone():
    w = structured((96, 128))
    slices = {"q": (0, 32), "v": (64, 32)}
    qlora_error = (w - nf4.round_trip(w)).norm()
    errors = []
    for iterations in (1, 2, 5):
        stored, starts = loftq_start(w, slices, r=4, scale=2.0, iterations=iterations)
        approx = nf4.round_trip(stored)
        for name, (start, size) in slices.items():
            A, B = starts[name]
            approx[start:start + size] += 2.0 * B @ A
        assert torch.equal(stored[32:64], w[32:64])  # rows no adapter covers: stored as they are
        errors.append(float((w - approx)[list(range(32)) + list(range(64, 96))].norm()))
    assert errors[0] < 0.8 * float(qlora_error) and errors[2] <= errors[0]
    lost = (w - nf4.round_trip(w, double=True))[:32]  # with 8-bit maxima (double): what those 4 bits lose
    double = loftq_start(w, slices, r=4, scale=2.0, iterations=1, double=True)[1]["q"]
    single = loftq_start(w, slices, r=4, scale=2.0, iterations=1)[1]["q"]
    torch.testing.assert_close(2.0 * double[1] @ double[0], best_rank(lost, 4), rtol=1e-4, atol=1e-6)
    assert float((2.0 * single[1] @ single[0] - best_rank(lost, 4)).norm()) > 1e-3  # fitted to another loss


def best_rank(m: torch.Tensor, r: int) -> torch.Tensor:
    U, S, Vh = torch.linalg.svd(m, full_matrices=False)
    return U[:, :r] @ torch.diag(S[:r]) @ Vh[:r]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """(root, base, LoftQ values, its Trainer after 6 steps) on a Llama-style base; loftq_iter 2, so its 4-bit base
    is not QLoRA's."""
    root = tmp_path_factory.mktemp("loftq")
    base = make_base(root, **WIDE)
    values = qlora_values(root, base, **{"lora.init": "loftq", "lora.loftq_iter": 2})
    trainer = Trainer(tiny_config(root / "run", **values), progress=False, tensorboard=False)
    trainer.fit()
    return root, base, values, trainer


def start_logits(root, base, name: str, **overrides) -> torch.Tensor:
    trainer = Trainer(tiny_config(root / name, **qlora_values(root, base, **overrides)), progress=False,
                      tensorboard=False)
    with torch.no_grad():
        return trainer.raw_model.eval()(torch.tensor([[0] + list(range(100, 115))]))


def ours_packed(trainer, hf_name: str) -> torch.Tensor:
    """The run's 4-bit bytes of the layer transformers names hf_name (model.layers.I.self_attn.q_proj ...): a slice of
    lmforge's fused qkv for q, k, v (its rows, so whole blocks of 64 as long as n_embd is a multiple of 64)."""
    i = int(hf_name.split(".")[2])
    block = trainer.raw_model.blocks[i]
    kind = hf_name.rsplit(".", 1)[1]
    layer = {"o_proj": block.attn.proj, "down_proj": block.mlp.proj}.get(kind)
    if layer is None and kind in ("q_proj", "k_proj", "v_proj"):
        qkv = block.attn.qkv.nf4 if hasattr(block.attn.qkv, "nf4") else block.attn.qkv
        q, kv = block.attn.n_head * block.attn.head_dim, block.attn.n_kv_head * block.attn.head_dim
        start, size = {"q_proj": (0, q), "k_proj": (q, kv), "v_proj": (q + kv, kv)}[kind]
        per_row = qkv.in_features // 2
        return qkv.packed[start * per_row:(start + size) * per_row]
    if layer is None:  # gate_proj / up_proj: the two halves of lmforge's fc
        fc = block.mlp.fc.nf4
        half = fc.out_features // 2 * fc.in_features // 2
        return fc.packed[:half] if kind == "gate_proj" else fc.packed[half:]
    return (layer.nf4 if hasattr(layer, "nf4") and layer.nf4 is not None else layer).packed


def test_a_loftq_run_starts_nearer_the_base_in_full_than_qlora_and_learns(runs):
    root, base, values, trainer = runs
    plain, _, _ = lmforge.checkpoint.load_for_inference(base, "cpu")
    w = plain.blocks[0].attn.qkv.weight  # q and v adapted, k not
    config = tiny_config(root / "x", **values).lora
    q, kv = plain.config.n_head * plain.config.head_dim, plain.config.n_kv_head * plain.config.head_dim
    stored, _ = loftq_start(w, {"q": (0, q), "v": (q + kv, kv)}, config.r, config.scale, 2)
    assert torch.equal(trainer.raw_model.blocks[0].attn.qkv.nf4.packed, nf4.quantize(stored)[0])  # LoftQ's, not W's
    assert not torch.equal(nf4.quantize(stored)[0], nf4.quantize(w)[0])
    full = start_logits(root, base, "full", **{"lora.quantize": None})
    qlora = start_logits(root, base, "qlora")
    loftq = start_logits(root, base, "loftq", **{"lora.init": "loftq", "lora.loftq_iter": 2})
    assert (loftq - full).norm() < 0.9 * (qlora - full).norm()
    losses = [loss for _, loss in trainer.history]
    assert losses[-1] < losses[0] - 0.1


def test_a_loftq_run_resumes_bit_identically_and_loads_as_it_trained(runs, tmp_path):
    root, _, values, trainer = runs
    resumed = resumed_copy(root / "run", 3, tiny_config(tmp_path / "resumed", **values, **{"train.resume": "auto"}))
    assert [loss for _, loss in resumed.history] == [loss for step, loss in trainer.history if step > 3]
    ids = torch.tensor([[0] + list(range(100, 115))])
    merged, _, _ = lmforge.checkpoint.load_for_inference(root / "run", "cpu")
    with torch.no_grad():
        assert (merged(ids) - trainer.raw_model.eval()(ids)).abs().max() <= 1e-5


def test_peft_on_transformers_4_bit_load_of_the_export_computes_the_runs_logits(runs):
    """The export's base is the 4-bit values the run computed with (as peft saves a LoftQ base): quantized again as
    transformers loads it, they give the run's 4 bits, and peft on them the run's logits."""
    import peft

    from lmforge.interop.hf_export import export_hf

    root, _, _, trainer = runs
    out = export_hf(root / "run", root / "hf")
    quantized, rounded = transformers_4_bit(out)
    layers = [(name, m) for name, m in quantized.named_modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert len(layers) == 7 * 2 and all(torch.equal(m.weight.data.view(-1), ours_packed(trainer, name))
                                        for name, m in layers)  # q, k, v, o, gate, up, down of 2 layers
    ours, tok, _ = lmforge.checkpoint.load_for_inference(root / "run", "cpu")
    ids = torch.tensor([[tok.start_id] + tok.encode("hello world!")])
    with torch.no_grad():
        expected = ours(ids)
        got = peft.PeftModel.from_pretrained(rounded, out / "adapter").eval()(ids).logits
    assert (got - expected).abs().max() <= 1e-5


def test_loftq_refusals_are_one_line():
    cases = [({"init": "loftq"}, "lora.init=loftq fits the adapters .* set lora.quantize nf4 too"),
             ({"init": "loftq", "quantize": "nf4", "targets": ["q", "head"]}, "lora.targets has head"),
             ({"loftq_iter": 3}, "lora.loftq_iter=3 .* give lora.init loftq too"),
             ({"init": "pissa", "quantize": "nf4"}, "use lora.init default or loftq with lora.quantize")]
    for settings, message in cases:
        with pytest.raises(ConfigError, match=message) as info:
            LoRAConfig(**settings)
        assert "\n" not in str(info.value)
    with pytest.raises(ConfigError, match="lora.init=loftq takes r=80 directions of a \\(64, 64\\) weight"):
        loftq_start(torch.zeros(64, 64), {"all": (0, 64)}, 80, 1.0, 1)
