"""The LM head fused with its cross-entropy, a chunk of tokens at a time (lmforge.head_loss, train.loss_chunk): the
same loss and gradients as the head's logits fed to F.cross_entropy, without the (tokens x vocabulary) logits."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from lmforge.head_loss import linear_cross_entropy_sum
from lmforge.lora import apply_lora
from lmforge.config import LoRAConfig
from tiny_training import VOCAB, synthetic_tokens, tiny_config, tiny_trainer


def reference(h, weight, targets, cap):
    z = h @ weight.t()
    z = cap * torch.tanh(z / cap) if cap else z
    return F.cross_entropy(z.flatten(0, -2), targets.flatten(), reduction="sum")


@pytest.mark.parametrize("cap", [0.0, 3.0])
@pytest.mark.parametrize("chunk", [1, 4, 1024])
def test_loss_and_gradients_equal_the_unfused_ones(cap, chunk):
    """Chunks that do not divide the tokens, ignored targets (-100), a soft cap, and an incoming gradient other
    than 1 (the trainer's loss scale): loss, dloss/dh and dloss/dweight as autograd gives them through the logits."""
    g = torch.Generator().manual_seed(0)
    h = (torch.randn(3, 7, 16, generator=g) * 2).requires_grad_()
    weight = (torch.randn(50, 16, generator=g) * 0.5).requires_grad_()
    targets = torch.randint(0, 50, (3, 7), generator=g)
    targets[0, :3] = -100
    targets[2, 6] = -100
    h64, w64 = h.detach().double().requires_grad_(), weight.detach().double().requires_grad_()
    want = reference(h64, w64, targets, cap)  # in float64: the fused loss's fp32 rounding is all that may differ
    (want * 2.5).backward()
    got = linear_cross_entropy_sum(h, weight, targets, cap, chunk)
    (got * 2.5).backward()
    assert got.item() == pytest.approx(want.item(), rel=1e-6)
    torch.testing.assert_close(h.grad, h64.grad.float(), rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(weight.grad, w64.grad.float(), rtol=1e-4, atol=1e-6)
    assert h.grad[0, :3].abs().max() == 0  # an ignored position gets no gradient


def test_without_gradients_it_is_the_loss_alone():
    g = torch.Generator().manual_seed(1)
    h, weight = torch.randn(2, 5, 8, generator=g), torch.randn(11, 8, generator=g)
    targets = torch.randint(0, 11, (2, 5), generator=g)
    with torch.no_grad():
        got = linear_cross_entropy_sum(h, weight, targets, 0.0, 3)
    assert not got.requires_grad
    torch.testing.assert_close(got, reference(h, weight, targets, 0.0), rtol=1e-5, atol=1e-5)


def test_bf16_autocast_runs_the_products_in_bf16_and_stays_close():
    """Under autocast (bf16-mixed) the matrix products run in bf16, the softmax in fp32: the loss and gradients are
    those of the unfused head under the same autocast, to bf16's precision; the gradients keep the inputs' dtype."""
    g = torch.Generator().manual_seed(2)
    h = torch.randn(4, 9, 32, generator=g).requires_grad_()
    weight = (torch.randn(40, 32, generator=g) * 0.2).requires_grad_()
    targets = torch.randint(0, 40, (4, 9), generator=g)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        want = F.cross_entropy((h @ weight.t()).float().flatten(0, 1), targets.flatten(), reduction="sum")
    want.backward()
    want_h, want_w = h.grad.clone(), weight.grad.clone()
    h.grad = weight.grad = None
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = linear_cross_entropy_sum(h, weight, targets, 0.0, 8)
    got.backward()
    assert got.dtype == torch.float32 and h.grad.dtype == weight.grad.dtype == torch.float32
    torch.testing.assert_close(got, want.detach(), rtol=2e-3, atol=1e-2)
    torch.testing.assert_close(h.grad, want_h, rtol=3e-2, atol=3e-3)
    torch.testing.assert_close(weight.grad, want_w, rtol=3e-2, atol=3e-3)


def model_and_batch(tmp_path, **overrides):
    model = tiny_trainer(tiny_config(tmp_path, **{"model.n_layer": 3, **overrides})).raw_model
    g = torch.Generator().manual_seed(3)
    x = torch.randint(0, VOCAB, (3, 16), generator=g)
    y = torch.randint(0, VOCAB, (3, 16), generator=g)
    y[1, :5] = -100
    return model, x, y


@pytest.mark.parametrize("overrides", [{}, {"model.logit_softcap": 4.0}, {"model.tie_embeddings": False}])
def test_the_models_fused_loss_has_the_gradients_of_its_logits(tmp_path, overrides):
    """GPT.forward(x, targets=y): the summed loss of forward(x)'s logits, and the same gradient for every weight
    (the tied embedding, which is also the head, included), with and without the early exit's second loss."""
    model, x, y = model_and_batch(tmp_path, **overrides)
    twin = copy.deepcopy(model)
    loss = model(x, targets=y, loss_chunk=5)
    want = F.cross_entropy(twin(x).flatten(0, 1), y.flatten(), reduction="sum")
    want.backward()
    loss.backward()
    torch.testing.assert_close(loss, want.detach(), rtol=1e-5, atol=1e-5)
    for (name, ours), (_, theirs) in zip(model.named_parameters(), twin.named_parameters()):
        torch.testing.assert_close(ours.grad, theirs.grad, rtol=1e-4, atol=1e-6, msg=name)
    with torch.no_grad():
        final, early = model(x, exit_layer=1, targets=y, loss_chunk=7)
        logits, early_logits = model(x, exit_layer=1)
    torch.testing.assert_close(final, F.cross_entropy(logits.flatten(0, 1), y.flatten(), reduction="sum"))
    torch.testing.assert_close(early, F.cross_entropy(early_logits.flatten(0, 1), y.flatten(), reduction="sum"))


def test_a_lora_adapted_head_gets_its_gradients_too(tmp_path):
    """A head LoRA adapts is not a plain Linear: its loss comes from its whole logits, and its adapters learn."""
    model, x, y = model_and_batch(tmp_path, **{"model.tie_embeddings": False})
    apply_lora(model, LoRAConfig(r=2, alpha=4, targets=["q", "head"]))
    twin = copy.deepcopy(model)
    loss = model(x, targets=y, loss_chunk=5)
    loss.backward()
    F.cross_entropy(twin(x).flatten(0, 1), y.flatten(), reduction="sum").backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    assert any("lm_head" in n for n in grads)
    for (name, ours), (_, theirs) in zip(model.named_parameters(), twin.named_parameters()):
        if ours.requires_grad:
            torch.testing.assert_close(ours.grad, theirs.grad, rtol=1e-4, atol=1e-6, msg=name)


class LargestTensor(TorchDispatchMode):
    """The largest number of elements of any tensor an operation returns while it is on."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else [out]:
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel())
        return out


@pytest.mark.parametrize("chunk", [0, 16])
def test_a_training_step_never_holds_the_whole_logits(tmp_path, chunk):
    """A Trainer step with train.loss_chunk 16 (a 128-token batch, a 512-token vocabulary, 32 wide) creates no
    tensor larger than the head's weight (512 x 32) or one chunk's logits (16 x 512); with 0 (unfused) it makes the
    batch's 128 x 512 logits."""
    config = tiny_config(tmp_path, **{"model.vocab_size": 512, "train.loss_chunk": chunk, "train.batch_size": 8})
    trainer = tiny_trainer(config)
    tokens, vocab, width = 8 * 16, 512, 32
    with LargestTensor() as seen:
        trainer.accumulate_gradients()
    if chunk:
        assert seen.largest <= max(vocab * width, chunk * vocab) < tokens * vocab
    else:
        assert seen.largest >= tokens * vocab


def curve(tmp_path, name, **overrides):
    trainer = tiny_trainer(tiny_config(tmp_path / name, **{"train.max_steps": 8, "train.grad_accum": 2,
                                                           "model.logit_softcap": 5.0, **overrides}),
                           tokens=synthetic_tokens(3000, seed=4))
    losses = []
    for _ in range(8):
        loss_sum, count, _, _ = trainer.train_step()
        trainer.step += 1
        losses.append(float(loss_sum / count))
    return losses, trainer.evaluate(), trainer.raw_model.state_dict()


def test_training_fused_or_not_gives_the_same_run(tmp_path):
    """Eight steps (two micro-batches each, soft-capped logits) with loss_chunk 0 and 7: the same losses, val loss
    and weights."""
    plain, plain_val, plain_weights = curve(tmp_path, "plain", **{"train.loss_chunk": 0})
    fused, fused_val, fused_weights = curve(tmp_path, "fused", **{"train.loss_chunk": 7})
    assert fused == pytest.approx(plain, rel=1e-5)
    assert fused_val == pytest.approx(plain_val, rel=1e-5)
    for name, tensor in plain_weights.items():
        # AdamW divides by sqrt(v): where a gradient is near 0, rounding moves a weight by up to ~1% of one step
        torch.testing.assert_close(fused_weights[name], tensor, rtol=1e-4, atol=5e-5, msg=name)


def test_a_frozen_head_gets_no_gradient_and_costs_none():
    """With the head's weight frozen (LoRA on other layers), only the hidden states get their gradient: the weight's
    is neither returned nor computed (no V x C product per chunk)."""
    g = torch.Generator().manual_seed(5)
    h = torch.randn(2, 6, 8, generator=g).requires_grad_()
    weight = torch.randn(30, 8, generator=g)
    targets = torch.randint(0, 30, (2, 6), generator=g)
    products = []

    class Products(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func in (torch.ops.aten.mm.default, torch.ops.aten.addmm_.default, torch.ops.aten.addmm.default):
                products.append(func)
            return func(*args, **(kwargs or {}))

    with Products():
        loss = linear_cross_entropy_sum(h, weight, targets, 0.0, 4)
    assert len(products) == 2 * 3  # 3 chunks: the logits and dloss/dh, no dloss/dweight
    loss.backward()
    h64 = h.detach().double().requires_grad_()
    reference(h64, weight.double(), targets, 0.0).backward()
    torch.testing.assert_close(h.grad, h64.grad.float(), rtol=1e-4, atol=1e-6)
    assert weight.grad is None


@pytest.mark.parametrize("frozen_head", [False, True])
def test_compiled_it_gives_the_eager_gradients(frozen_head):
    """torch.compile traces the fused loss into the step's graph: the same loss and gradients as eager, none zero,
    and a frozen head still gets none. (Under torch 2.11 every gradient came out 0 while the loss summed in place:
    see the next test, which holds that on any torch.)"""
    from lmforge.config import preset
    from lmforge.model import GPT

    torch.manual_seed(0)
    model = GPT(preset("char-small", block_size=16, dropout=0.0, n_layer=2))
    model.lm_head.weight.requires_grad_(not frozen_head)  # tied: the embedding frozen with it
    g = torch.Generator().manual_seed(1)
    x, y = (torch.randint(0, model.config.vocab_size, (2, 16), generator=g) for _ in range(2))

    def step(loss_of):
        model.zero_grad(set_to_none=True)
        loss = loss_of(x, y)
        loss.backward()
        return loss.detach(), {n: p.grad for n, p in model.named_parameters() if p.requires_grad}

    def loss_of(x, y):
        return model(x, targets=y, loss_chunk=8) / y.numel()

    eager_loss, eager = step(loss_of)
    compiled_loss, compiled = step(torch.compile(loss_of))
    torch.testing.assert_close(compiled_loss, eager_loss)
    assert compiled.keys() == eager.keys() and ("tok_emb.weight" in eager) != frozen_head  # tied to the head
    for name, grad in eager.items():
        assert grad.abs().sum() > 0, name
        torch.testing.assert_close(compiled[name], grad, rtol=1e-3, atol=1e-6, msg=name)


def test_no_loss_is_a_tensor_added_to_in_place():
    """The fused losses' outputs are never tensors made and then added to in place (their version counter stays 0):
    torch 2.11's torch.compile traced such an output of an autograd Function as one that needs no gradient, and a
    compiled training step got every gradient 0 (seen on an H200, and on a CPU with torch 2.11)."""
    from lmforge.head_loss import Teacher, linear_distillation

    g = torch.Generator().manual_seed(3)
    h = torch.randn(2, 5, 8, generator=g).requires_grad_()
    weight = torch.randn(30, 8, generator=g).requires_grad_()
    targets = torch.randint(0, 30, (2, 5), generator=g)
    teacher = Teacher(torch.randn(2, 5, 8, generator=g), torch.randn(30, 8, generator=g), alpha=0.5)
    outputs = [linear_cross_entropy_sum(h, weight, targets, 0.0, 3), *linear_distillation(h, weight, targets,
                                                                                           teacher, 0.0, 3)]
    with torch.no_grad():
        outputs.append(linear_cross_entropy_sum(h, weight, targets, 0.0, 3))
    assert [t._version for t in outputs] == [0] * 5
