"""Precision modes of the Trainer: bf16-mixed is autocast, bf16-compute is a bf16 model's step with fp32 master
weights, both resume exactly; the CPU bf16 attention path equals the formula and avoids the slow fused backward."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from lmforge.config import load_run_config
from lmforge.data.batches import TokenBatches
from lmforge.errors import ConfigError
from lmforge.model import fused_attention, matmul_attention, padded_mask, reference_attention
from sharp_attention import sharpen
from tiny_training import synthetic_tokens, tiny_config, tiny_trainer


def first_batch(config) -> tuple[torch.Tensor, torch.Tensor]:
    """The batch the Trainer's first step draws (tiny_trainer's stream, rebuilt)."""
    T, B, seed = config.model.block_size, config.train.batch_size, config.train.seed
    return TokenBatches(synthetic_tokens(), T, B, seed=seed, sampling=config.data.sampling).next_batch()


def trainer_gradients(precision: str, tmp_path, **overrides):
    """(trainer, a copy of its initial model, loss of its first micro-batch, {name: fp32 gradient})."""
    trainer = tiny_trainer(tiny_config(tmp_path / precision, **{"train.precision": precision, **overrides}))
    sharpen(trainer.raw_model)  # attention that is not uniform, so its numerics show
    initial = copy.deepcopy(trainer.raw_model)
    loss_sum, count = trainer.accumulate_gradients()
    grads = {n: p.grad.clone() for n, p in trainer.raw_model.named_parameters()}
    return trainer, initial, float(loss_sum / count), grads


def reference_gradients(model, x, y, autocast: bool, dtype: torch.dtype = torch.float32):
    """Mean loss (fp32 cross-entropy) and fp32 gradients of one hand-written step of a copy of `model` in `dtype`."""
    model = copy.deepcopy(model).to(dtype)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        logits = model(x)
    loss = F.cross_entropy(logits.float().flatten(0, 1), y.flatten())
    loss.backward()
    return loss.item(), {n: p.grad.float() for n, p in model.named_parameters()}


def max_relative_difference(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    return max(float((a[n] - b[n]).norm() / b[n].norm().clamp(min=1e-12)) for n in b)


def test_a_bf16_mixed_step_equals_an_autocast_step(tmp_path):
    trainer, initial, loss, grads = trainer_gradients("bf16-mixed", tmp_path)
    x, y = first_batch(trainer.config)
    ref_loss, ref_grads = reference_gradients(initial, x, y, autocast=True)
    assert loss == pytest.approx(ref_loss, rel=1e-6)
    assert max_relative_difference(grads, ref_grads) < 1e-5
    _, fp32_grads = reference_gradients(initial, x, y, autocast=False)
    assert max_relative_difference(grads, fp32_grads) > 1e-3  # the tolerance above tells bf16 from fp32


def test_a_bf16_compute_step_equals_a_bf16_models_step_and_keeps_fp32_master_weights(tmp_path):
    trainer, initial, loss, grads = trainer_gradients("bf16-compute", tmp_path)
    x, y = first_batch(trainer.config)
    ref_loss, ref_grads = reference_gradients(initial, x, y, autocast=False, dtype=torch.bfloat16)
    assert loss == pytest.approx(ref_loss, rel=1e-6)
    assert max_relative_difference(grads, ref_grads) < 1e-5
    assert all(p.dtype == torch.float32 and p.grad.dtype == torch.float32 for p in trainer.raw_model.parameters())
    mixed_loss, mixed_grads = reference_gradients(initial, x, y, autocast=True)
    assert max_relative_difference(grads, mixed_grads) > 1e-3  # not autocast: the residual stream is bf16 too
    assert loss == pytest.approx(mixed_loss, abs=2e-2)  # and still the same function within bf16's precision

    trainer.optimizer_step()  # the fp32 master weights moved, and the tied head is still the embedding
    model = trainer.raw_model
    assert not torch.equal(model.tok_emb.weight, initial.tok_emb.weight)
    assert model.lm_head.weight is model.tok_emb.weight and model.tok_emb.weight.dtype == torch.float32


def test_a_bf16_compute_run_resumes_bit_identically(tmp_path):
    settings = {"train.precision": "bf16-compute", "train.max_steps": 8, "train.save_interval": 4,
                "train.keep_last": 5, "train.eval_interval": 4, "model.dropout": 0.1}
    uninterrupted = tiny_trainer(tiny_config(tmp_path / "full", **settings))
    uninterrupted.fit()
    ckpt = tmp_path / "full" / "checkpoints" / "step-00000004"
    resumed = tiny_trainer(tiny_config(tmp_path / "resumed", **{**settings, "train.resume": str(ckpt)}))
    resumed.fit()
    assert [s for s, _ in resumed.history] == [5, 6, 7, 8]
    assert resumed.history == [(s, loss) for s, loss in uninterrupted.history if s > 4]  # bit-identical
    assert resumed.val_loss == uninterrupted.val_loss
    for a, b in zip(uninterrupted.raw_model.parameters(), resumed.raw_model.parameters()):
        assert a.dtype == torch.float32 and torch.equal(a, b)


def test_bf16_compute_with_fsdp_is_refused_in_one_line(tmp_path):
    with pytest.raises(ConfigError, match="bf16-compute.*fsdp.*--train.precision bf16-mixed") as info:
        load_run_config(None, {"train.precision": "bf16-compute", "train.parallel": "fsdp"})
    assert "\n" not in str(info.value)


def qkv(B: int, nh: int, nkv: int, T: int, hd: int, dtype: torch.dtype, sharp: float = 4.0):
    gen = torch.Generator().manual_seed(0)
    q = (torch.randn(B, nh, T, hd, generator=gen) * sharp).to(dtype).requires_grad_()
    k = (torch.randn(B, nkv, T, hd, generator=gen) * sharp).to(dtype).requires_grad_()
    v = torch.randn(B, nkv, T, hd, generator=gen).to(dtype).requires_grad_()
    return q, k, v


@pytest.mark.parametrize("nkv", [4, 2])
@pytest.mark.parametrize("kind", ["causal", "encoder", "padded"])
def test_matmul_attention_equals_the_formula_with_its_gradients(kind, nkv):
    q, k, v = qkv(2, 4, nkv, 12, 8, torch.float32)
    ids = torch.tensor([[0, 0, 1, 1, 1, 1, 2, 2, 2, 2, 2, 2], [1] * 12])
    mask = padded_mask(ids, 12) if kind == "padded" else None
    causal = kind != "encoder"
    out = matmul_attention(q, k, v, 0.0, mask, causal)
    grads = torch.autograd.grad(out.square().sum(), (q, k, v))
    ref = reference_attention(q, k, v, 0.0, mask, causal)
    ref_grads = torch.autograd.grad(ref.square().sum(), (q, k, v))
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g, r, rtol=1e-4, atol=1e-4)


def test_cpu_bf16_training_attention_avoids_the_fused_cpu_backward_and_stays_within_bf16_of_fp32():
    from torch.profiler import ProfilerActivity, profile

    q, k, v = qkv(2, 4, 4, 64, 16, torch.bfloat16)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        out = fused_attention(q, k, v)
        out.float().square().sum().backward()
    names = {e.name for e in prof.events()}
    assert not any("flash_attention" in n for n in names), sorted(n for n in names if "attention" in n)
    q32, k32, v32 = (t.detach().float().requires_grad_() for t in (q, k, v))
    ref = reference_attention(q32, k32, v32)
    ref.square().sum().backward()
    assert float((out.float() - ref).norm() / ref.norm()) < 2e-2
    assert float((q.grad.float() - q32.grad).norm() / q32.grad.norm()) < 5e-2
    with torch.no_grad():  # without gradients the fused kernel is the faster one and is kept
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            fused_attention(q, k, v)
    assert any("flash_attention" in e.name for e in prof.events())
