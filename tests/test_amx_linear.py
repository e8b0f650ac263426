"""train/amx_linear.py: a bf16 training step's Linear layers on a CPU with AMX. The forward is F.linear's, value for
value; the weight gradient is the same product summed over slices of at most SLICE_TOKENS tokens (none longer, the
shape oneDNN's AMX kernels run slowly), within bfloat16's precision of the exact one; only trained weights on
enough tokens go this way, and a Trainer step with it gives the loss of one without it. These run on any CPU:
the AMX check is switched on by hand (the numerics do not depend on it)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.profiler import ProfilerActivity, profile

import lmforge.train.amx_linear as amx
from lmforge.train.amx_linear import SLICE_TOKENS, amx_linear, has_amx
from tiny_training import tiny_config, tiny_trainer

TOKENS = 2 * SLICE_TOKENS + 52  # three slices, the last one short


@pytest.fixture
def on_amx(monkeypatch):
    """The AMX check on, and weights of any size sliced (these tests' layers are small; MIN_WEIGHT has its own)."""
    monkeypatch.setattr(amx, "has_amx", lambda: True)
    monkeypatch.setattr(amx, "MIN_WEIGHT", 0)


def layer_inputs(dtype=torch.bfloat16, bias: bool = True):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, TOKENS // 2, 48, generator=gen).to(dtype).requires_grad_()
    w = (torch.randn(40, 48, generator=gen) / 7).to(dtype).requires_grad_()
    b = torch.randn(40, generator=gen).to(dtype).requires_grad_() if bias else None
    grad = torch.randn(2, TOKENS // 2, 40, generator=gen).to(torch.bfloat16)
    return x, w, b, grad


def relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


@pytest.mark.parametrize("bias", [True, False])
def test_the_forward_is_f_linear_bit_for_bit_and_the_gradients_are_its_products(on_amx, bias):
    x, w, b, grad = layer_inputs(bias=bias)
    ref = F.linear(x, w, b)
    ref_grads = torch.autograd.grad(ref, [t for t in (x, w, b) if t is not None], grad)
    with amx_linear():
        out = F.linear(x, w, b)
    assert type(out.grad_fn).__name__ == "_SlicedLinearBackward"
    assert out.dtype == torch.bfloat16 and torch.equal(out, ref)
    grads = torch.autograd.grad(out, [t for t in (x, w, b) if t is not None], grad)
    assert torch.equal(grads[0], ref_grads[0])  # the input's gradient: the same single product g W
    if bias:
        torch.testing.assert_close(grads[2], ref_grads[2], rtol=1e-2, atol=1e-2)
    exact = grad.double().flatten(0, 1).t() @ x.detach().double().flatten(0, 1)  # g^T x, float64
    assert relative(grads[1], exact) < 4e-3  # bfloat16's own step is 2^-8 = 3.9e-3
    assert relative(ref_grads[1], exact) < 4e-3
    assert not torch.equal(grads[1], ref_grads[1])  # summed slice by slice, so rounded otherwise


def test_a_strided_input_is_f_linears_too(on_amx):
    x, w, b, _ = layer_inputs()
    strided = x.detach().transpose(0, 1).requires_grad_()  # (T, 2, in): not contiguous
    with amx_linear():
        out = F.linear(strided, w, b)
    assert type(out.grad_fn).__name__ == "_SlicedLinearBackward" and torch.equal(out, F.linear(strided, w, b))


def test_bf16_mixed_inputs_in_float32_come_back_with_float32_gradients(on_amx):
    x, w, b, grad = layer_inputs(dtype=torch.float32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ref = F.linear(x, w, b)
        with amx_linear():
            out = F.linear(x, w, b)
    assert out.dtype == torch.bfloat16 and torch.equal(out, ref)
    grads = torch.autograd.grad(out, (x, w, b), grad)
    assert all(g.dtype == torch.float32 for g in grads)
    exact = grad.double().flatten(0, 1).t() @ x.detach().to(torch.bfloat16).double().flatten(0, 1)
    assert relative(grads[1], exact) < 4e-3


def test_no_product_of_the_backward_runs_over_more_than_slice_tokens(on_amx):
    x, w, b, grad = layer_inputs()
    with amx_linear():
        out = F.linear(x, w, b)
    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        out.backward(grad)
    products = [e.input_shapes for e in prof.events() if e.name in ("aten::mm", "aten::addmm_", "aten::addmm")]
    inner = [shapes[-1][0] if len(shapes) == 2 else shapes[1][1] for shapes in products]  # (a, b) or (c, a, b)
    assert len(products) == 4 and max(inner) == SLICE_TOKENS, products  # g W, and 3 slices of g^T x


def test_only_trained_weights_on_more_than_slice_tokens_are_routed(on_amx, monkeypatch):
    x, w, b, _ = layer_inputs()

    def routed(x, w, b, enabled=True) -> bool:
        with amx_linear(enabled):
            return type(F.linear(x, w, b).grad_fn).__name__ == "_SlicedLinearBackward"

    assert routed(x, w, b)
    assert not routed(x, w.detach(), b)  # a frozen weight (a LoRA base): torch's own product
    assert not routed(x[:, :SLICE_TOKENS // 2], w, b)  # SLICE_TOKENS tokens or fewer: nothing to slice
    assert not routed(x, w, b, enabled=False)
    with torch.no_grad():  # evaluation and sampling
        with amx_linear():
            assert F.linear(x, w, b).grad_fn is None
    threads = torch.get_num_threads()
    try:  # two threads: oneDNN shares the inner dimension between them itself
        torch.set_num_threads(2)
        assert not routed(x, w, b)
    finally:
        torch.set_num_threads(threads)
    monkeypatch.setattr(amx, "has_amx", lambda: False)  # a CPU without AMX
    assert not routed(x, w, b)


def test_narrow_layers_keep_torchs_product(monkeypatch):
    """Below MIN_WEIGHT entries (a layer narrower than 384 x 384) slicing costs more than it saves: not routed."""
    monkeypatch.setattr(amx, "has_amx", lambda: True)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(TOKENS, 384, generator=gen).to(torch.bfloat16)
    for out, routed in ((383, False), (384, True)):
        w = torch.randn(out, 384, generator=gen).to(torch.bfloat16).requires_grad_()
        with amx_linear():
            name = type(F.linear(x, w).grad_fn).__name__
        assert (name == "_SlicedLinearBackward") == routed, (out, name)


def test_has_amx_reads_the_cpus_flags():
    try:
        flags = open("/proc/cpuinfo").read().split()
    except OSError:
        flags = []
    assert has_amx() == ("amx_bf16" in flags)


def amx_trainer(tmp_path, name: str, precision: str, **overrides):
    config = tiny_config(tmp_path / name, **{"train.precision": precision, "model.block_size": 64,
                                            "train.batch_size": 24, **overrides})  # 1536 tokens a step
    return tiny_trainer(config)


@pytest.mark.parametrize("precision", ["bf16-mixed", "bf16-compute"])
def test_a_trainer_step_with_it_has_the_same_loss_and_gradients_within_bf16(on_amx, tmp_path, precision):
    plain = amx_trainer(tmp_path, "plain", precision)
    plain.amx = False
    sliced = amx_trainer(tmp_path, "sliced", precision)
    assert sliced.amx
    loss_plain, _ = plain.accumulate_gradients()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        loss_sliced, _ = sliced.accumulate_gradients()
    assert sum(e.name == "_SlicedLinear" for e in prof.events()) == 4 * 2  # qkv, proj, fc, proj in 2 blocks
    assert float(loss_sliced) == float(loss_plain)  # the forward is the same, value for value
    for (name, a), b in zip(sliced.raw_model.named_parameters(), plain.raw_model.parameters()):
        assert a.grad.dtype == torch.float32
        assert relative(a.grad, b.grad) < 2e-2, name


def test_the_trainer_leaves_it_off_without_a_trained_layer_wide_enough(tmp_path, monkeypatch):
    monkeypatch.setattr(amx, "has_amx", lambda: True)
    assert not amx_trainer(tmp_path, "narrow", "bf16-compute").amx  # 32 wide: no per-op detour for nothing


def test_the_trainer_leaves_it_off_where_torch_must_see_its_own_ops(tmp_path, monkeypatch):
    monkeypatch.setattr(amx, "MIN_WEIGHT", 0)
    assert amx_trainer(tmp_path, "eager", "bf16-mixed").amx
    assert not amx_trainer(tmp_path, "compiled", "bf16-mixed", **{"train.compile": True}).amx
    assert not amx_trainer(tmp_path, "checkpointed", "bf16-mixed", **{"train.activation_checkpointing": True}).amx


def modes_inside_the_model(trainer) -> list[int]:
    """The torch function modes active in the first block during one step of `trainer`."""
    seen: list[int] = []
    handle = trainer.raw_model.blocks[0].register_forward_pre_hook(
        lambda *_: seen.append(torch._C._len_torch_function_stack()))
    trainer.accumulate_gradients()
    handle.remove()
    return seen


def test_a_step_on_no_more_than_slice_tokens_runs_without_the_mode(on_amx, tmp_path):
    small = tiny_trainer(tiny_config(tmp_path / "small", **{"train.precision": "bf16-compute"}))  # 64 tokens
    assert small.amx and modes_inside_the_model(small) == [0]  # no per-op detour where nothing is sliced
    assert modes_inside_the_model(amx_trainer(tmp_path, "large", "bf16-compute")) == [1]
