"""The LM head fused with its cross-entropy row by row (head_loss.linear_cross_entropy_rows, GPT.forward's per_row):
what preference training (DPO) scores each completion with, without the whole logits."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from lmforge.config import LoRAConfig
from lmforge.head_loss import linear_cross_entropy_rows
from lmforge.lora import apply_lora
from test_chunked_loss import LargestTensor, model_and_batch
from tiny_training import tiny_config


class LargestOver(LargestTensor):
    """The largest number of elements of a tensor whose last dimension is the vocabulary (logit-shaped)."""

    def __init__(self, vocab: int):
        super().__init__()
        self.vocab = vocab

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else [out]:
            if isinstance(t, torch.Tensor) and t.dim() >= 2 and t.size(-1) == self.vocab:
                self.largest = max(self.largest, t.numel())
        return out


def per_row(h, weight, targets, cap):
    z = h @ weight.t()
    z = cap * torch.tanh(z / cap) if cap else z
    return F.cross_entropy(z.transpose(1, 2), targets, reduction="none").sum(1)  # (B,); -100 adds 0


def batch(seed=0, B=4, T=7, C=16, V=50):
    g = torch.Generator().manual_seed(seed)
    h = (torch.randn(B, T, C, generator=g) * 2).requires_grad_()
    weight = (torch.randn(V, C, generator=g) * 0.5).requires_grad_()
    targets = torch.randint(0, V, (B, T), generator=g)
    targets[0, :3] = -100  # a prompt
    targets[2] = -100  # a row with nothing counted
    targets[3, 5:] = -100  # padding
    return h, weight, targets, torch.randn(B, generator=g)


@pytest.mark.parametrize("cap", [0.0, 3.0])
@pytest.mark.parametrize("chunk", [1, 4, 1024])
def test_rows_and_gradients_equal_the_unfused_ones(cap, chunk):
    """Each row's sum and, for a different incoming gradient per row (DPO's), dloss/dh and dloss/dweight as
    autograd gives them through the logits in float64; chunks that do not divide the counted tokens."""
    h, weight, targets, g = batch()
    h64, w64 = h.detach().double().requires_grad_(), weight.detach().double().requires_grad_()
    want = per_row(h64, w64, targets, cap)
    (want * g.double()).sum().backward()
    got = linear_cross_entropy_rows(h, weight, targets, cap, chunk)
    (got * g).sum().backward()
    assert got.shape == (4,) and got.dtype == torch.float32 and float(got.detach()[2]) == 0.0
    torch.testing.assert_close(got.double(), want.detach(), rtol=1e-6, atol=1e-5)
    torch.testing.assert_close(h.grad, h64.grad.float(), rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(weight.grad, w64.grad.float(), rtol=1e-4, atol=1e-6)
    assert h.grad[0, :3].abs().max() == 0 and h.grad[2].abs().max() == 0  # uncounted positions: no gradient


def test_only_counted_positions_reach_the_head():
    """The head's products see the counted tokens alone: 9 of 28 positions, in chunks of 4, 3 products forward."""
    h, weight, targets, _ = batch()
    products = []

    class Products(torch.utils._python_dispatch.TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            if func is torch.ops.aten.mm.default:
                products.append(args[0].shape[0])
            return out

    counted = int((targets != -100).sum())
    with Products():
        linear_cross_entropy_rows(h, weight, targets, 0.0, 4)
    assert sum(products) == counted and len(products) == -(-counted // 4)


def test_bf16_autocast_stays_close_and_a_frozen_head_gets_no_gradient():
    h, weight, targets, g = batch(seed=1, C=32, V=40)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        want = F.cross_entropy((h @ weight.t()).float().transpose(1, 2), targets, reduction="none").sum(1)
    (want * g).sum().backward()
    want_h, want_w = h.grad.clone(), weight.grad.clone()
    h.grad = weight.grad = None
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = linear_cross_entropy_rows(h, weight, targets, 0.0, 8)
    (got * g).sum().backward()
    torch.testing.assert_close(got, want.detach(), rtol=2e-3, atol=2e-2)
    torch.testing.assert_close(h.grad, want_h, rtol=3e-2, atol=3e-3)
    torch.testing.assert_close(weight.grad, want_w, rtol=3e-2, atol=3e-2)  # bf16 products summed in other orders
    frozen = weight.detach()
    h.grad = None
    linear_cross_entropy_rows(h, frozen, targets, 0.0, 8).sum().backward()
    assert h.grad is not None and frozen.grad is None


@pytest.mark.parametrize("overrides", [{}, {"model.logit_softcap": 4.0}, {"model.tie_embeddings": False}])
def test_the_models_rows_have_the_gradients_of_its_logits(tmp_path, overrides):
    model, x, y = model_and_batch(tmp_path, **overrides)
    twin = copy.deepcopy(model)
    g = torch.tensor([1.0, -2.0, 0.5])
    rows = model(x, targets=y, loss_chunk=5, per_row=True)
    (rows * g).sum().backward()
    want = F.cross_entropy(twin(x).transpose(1, 2), y, reduction="none").sum(1)
    (want * g).sum().backward()
    torch.testing.assert_close(rows, want.detach(), rtol=1e-5, atol=1e-5)
    for (name, ours), (_, theirs) in zip(model.named_parameters(), twin.named_parameters()):
        torch.testing.assert_close(ours.grad, theirs.grad, rtol=1e-4, atol=1e-6, msg=name)


def test_a_lora_adapted_head_scores_rows_from_its_logits(tmp_path):
    model, x, y = model_and_batch(tmp_path, **{"model.tie_embeddings": False})
    apply_lora(model, LoRAConfig(r=2, alpha=4, targets=["q", "head"]))
    with torch.no_grad():
        rows = model(x, targets=y, loss_chunk=5, per_row=True)
        want = F.cross_entropy(model(x).transpose(1, 2), y, reduction="none").sum(1)
    torch.testing.assert_close(rows, want)


def test_a_dpo_step_never_holds_the_whole_logits(tmp_path):
    """A DPO step (8 pairs: 16 rows of 6 or more positions, the byte vocabulary) with loss_chunk 16 creates no
    tensor over the vocabulary (logits, their softmax or gradient) larger than one chunk's logits or the head's
    weight; with loss_chunk 0
    it makes its rows' logits; the two give the same loss."""
    from test_preference import dpo, prepare_pairs, preference_records
    from test_tasks import make_base, write_jsonl
    from lmforge.train import Trainer

    base = make_base(tmp_path / "b")
    assert prepare_pairs(base, tmp_path / "d", write_jsonl(tmp_path / "p.jsonl", preference_records(60))) == 0
    losses = {}
    for chunk in (16, 0):
        trainer = Trainer(dpo(tmp_path / f"r{chunk}", tmp_path / "d", base, **{"train.loss_chunk": chunk}),
                          progress=False, tensorboard=False)
        V = trainer.config.model.vocab_size
        with LargestOver(V) as seen:
            loss_sum, count = trainer.accumulate_gradients()
        losses[chunk] = float(loss_sum / count)
        if chunk:  # one chunk's logits, or the head's weight seen as (C, V)
            assert 0 < seen.largest <= max(chunk, trainer.config.model.n_embd) * V < 16 * 6 * V
        else:
            assert seen.largest >= 16 * 6 * V
    assert losses[16] == pytest.approx(losses[0], abs=1e-6)
    assert tiny_config(tmp_path).train.loss_chunk == 1024  # the default: fused
