"""lmforge's Muon step (train/muon.py) against torch.optim.Muon and against the Newton-Schulz formula."""

import pytest
import torch

from lmforge.config import OptimConfig, preset
from lmforge.distributed import has_fast_bf16
from lmforge.model import GPT
from lmforge.train import optim as optim_module
from lmforge.train.muon import BatchedMuon, newton_schulz
from lmforge.train.optim import build_optimizer, muon_ns_dtype

# tall, wide, square, and repeated shapes (batched together), as a model's blocks have them
SHAPES = [(48, 16), (16, 16), (16, 64), (48, 16), (16, 64), (24, 40)]
COEFFICIENTS = (3.4445, -4.7750, 2.0315)


def _train(optimizer_class, steps=3, **kwargs):
    gen = torch.Generator().manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(s, generator=gen) * 0.1) for s in SHAPES]
    optimizer = optimizer_class(params, **kwargs)
    for _ in range(steps):
        for p in params:
            p.grad = torch.randn(p.shape, generator=gen)
        optimizer.step()
    return params, optimizer


@pytest.mark.parametrize("nesterov", [True, False])
@pytest.mark.parametrize("adjust_lr_fn", ["original", "match_rms_adamw"])
def test_batched_bf16_step_equals_torch_muon(nesterov, adjust_lr_fn):
    kwargs = dict(lr=0.02, momentum=0.9, weight_decay=0.1, nesterov=nesterov, adjust_lr_fn=adjust_lr_fn)
    ours, opt = _train(BatchedMuon, ns_dtype=torch.bfloat16, **kwargs)
    ref, ref_opt = _train(torch.optim.Muon, **kwargs)
    start, _ = _train(torch.optim.Muon, steps=0, **kwargs)
    for p, q, p0 in zip(ours, ref, start):
        assert (q - p0).abs().max() > 1e-3  # the step moved the weights
        torch.testing.assert_close(p, q, rtol=0, atol=1e-6)
    for p, q in zip(ours, ref):  # the same state, so checkpoints and resume are shared
        torch.testing.assert_close(opt.state[p]["momentum_buffer"], ref_opt.state[q]["momentum_buffer"])


def _newton_schulz_reference(G, steps=5):
    """One matrix, float64, as Jordan et al. write it."""
    a, b, c = COEFFICIENTS
    X = G.double()
    tall = X.shape[0] > X.shape[1]
    X = X.T if tall else X
    X = X / X.norm()
    for _ in range(steps):
        A = X @ X.T
        X = a * X + (b * A + c * A @ A) @ X
    return X.T if tall else X


def test_fp32_iteration_is_the_formula_per_matrix():
    gen = torch.Generator().manual_seed(1)
    for shape in [(48, 16), (16, 64), (16, 16)]:
        G = torch.randn(3, *shape, generator=gen) * torch.tensor([1e-3, 1.0, 50.0])[:, None, None]
        X = newton_schulz(G, COEFFICIENTS, 5, 1e-7, torch.float32)
        assert X.dtype == torch.float32 and X.shape == G.shape
        for g, x in zip(G, X):
            torch.testing.assert_close(x.double(), _newton_schulz_reference(g), rtol=0, atol=2e-5)
            singular = torch.linalg.svdvals(x.double())  # near-orthogonal: singular values near 1, whatever the scale
            assert singular.min() > 0.3 and singular.max() < 1.5


def test_fp32_step_follows_the_bf16_step_closely():
    kwargs = dict(lr=0.02, momentum=0.9, weight_decay=0.0)
    fp32, _ = _train(BatchedMuon, ns_dtype=torch.float32, **kwargs)
    ref, _ = _train(torch.optim.Muon, **kwargs)
    start, _ = _train(torch.optim.Muon, steps=0, **kwargs)
    for p, q, p0 in zip(fp32, ref, start):
        assert (p - q).norm() < 0.03 * (q - p0).norm()  # bf16 rounding, not a different update


def test_auto_picks_bf16_only_with_bf16_hardware(monkeypatch):
    cpu = torch.device("cpu")
    assert muon_ns_dtype("auto", cpu) == (torch.bfloat16 if has_fast_bf16(cpu) else torch.float32)
    assert muon_ns_dtype("bf16", cpu) == torch.bfloat16 and muon_ns_dtype("fp32", cpu) == torch.float32
    model = GPT(preset("tiny", vocab_size=32))
    for fast, dtype in [(False, torch.float32), (True, torch.bfloat16)]:
        monkeypatch.setattr(optim_module, "has_fast_bf16", lambda device, fast=fast: fast)
        optimizer = build_optimizer(model, OptimConfig(name="muon"), cpu)
        assert optimizer.optimizers[1].ns_dtype == dtype
    optimizer = build_optimizer(model, OptimConfig(name="muon", muon_ns_dtype="fp32"), cpu)
    assert optimizer.optimizers[1].ns_dtype == torch.float32  # an explicit choice wins


def test_ns_steps_reach_the_iteration_and_are_checked():
    from lmforge.errors import ConfigError

    model = GPT(preset("tiny", vocab_size=32))
    optimizer = build_optimizer(model, OptimConfig(name="muon", muon_ns_steps=3), torch.device("cpu"))
    assert [g["ns_steps"] for g in optimizer.optimizers[1].param_groups] == [3]
    three, _ = _train(BatchedMuon, ns_dtype=torch.float32, lr=0.02, ns_steps=3)
    five, _ = _train(BatchedMuon, ns_dtype=torch.float32, lr=0.02, ns_steps=5)
    assert all((p - q).abs().max() > 1e-4 for p, q in zip(three, five))
    with pytest.raises(ConfigError, match="muon_ns_steps"):
        OptimConfig(name="muon", muon_ns_steps=0)


def test_a_wide_matrix_goes_through_its_gram_matrix_and_gets_the_same_iteration():
    """float64: the Gram path (cols > 1.5 rows) is the direct iteration rearranged, equal to rounding; float32:
    it is the path taken, within 2e-3 of the formula (relative) even with singular values spanning 1e-6..1."""
    from lmforge.train import muon

    gen = torch.Generator().manual_seed(2)
    for shape in [(16, 64), (64, 16), (24, 40)]:
        G = torch.randn(2, *shape, generator=gen, dtype=torch.float64)
        X = newton_schulz(G, COEFFICIENTS, 5, 1e-7, torch.float64)
        for g, x in zip(G, X):
            torch.testing.assert_close(x, _newton_schulz_reference(g), rtol=0, atol=1e-12)
    wide = torch.randn(2, 16, 64, generator=gen, dtype=torch.float64)
    direct = _newton_schulz_reference(wide[0], steps=3)
    for steps in (1, 3):
        gram = muon.gram_newton_schulz(wide / wide.norm(dim=(-2, -1), keepdim=True), COEFFICIENTS, steps)[0]
        torch.testing.assert_close(gram, _newton_schulz_reference(wide[0], steps=steps), rtol=0, atol=1e-12)
    assert (direct - _newton_schulz_reference(wide[0], steps=5)).abs().max() > 1e-3  # the step count shows
    U, _ = torch.linalg.qr(torch.randn(64, 16, dtype=torch.float64, generator=gen))
    V, _ = torch.linalg.qr(torch.randn(16, 16, dtype=torch.float64, generator=gen))
    ill = (U @ torch.diag(torch.logspace(0, -6, 16, dtype=torch.float64)) @ V.T).T  # (16, 64)
    calls = []
    real = muon.gram_newton_schulz
    try:
        muon.gram_newton_schulz = lambda *args: calls.append(args[0].shape) or real(*args)
        x = newton_schulz(ill[None].float(), COEFFICIENTS, 5, 1e-7, torch.float32)[0]
        newton_schulz(ill[None].float(), COEFFICIENTS, 5, 1e-7, torch.bfloat16)  # bf16: torch's own way
        newton_schulz(torch.randn(1, 24, 32), COEFFICIENTS, 5, 1e-7, torch.float32)  # nearly square: direct
    finally:
        muon.gram_newton_schulz = real
    assert calls == [torch.Size([1, 16, 64])]
    reference = _newton_schulz_reference(ill)
    assert (x.double() - reference).norm() < 2e-3 * reference.norm()  # bf16, torch's way: 0.3
