"""The training loop on a CUDA device: bf16-mixed + torch.compile + fused AdamW train, checkpoints load
back on the GPU, resume is bit-identical, and the loop adds little over a bare forward/backward/step.

    python -m pytest -m gpu tests/test_train_gpu.py -s     (prints the measured tokens/s)
"""

from __future__ import annotations

import time

import pytest
import torch

from lmforge.checkpoint import load_for_inference
from tiny_training import synthetic_tokens, tiny_config, tiny_trainer

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]

CUDA = {"train.device": "cuda", "train.num_threads": 0}


def test_bf16_compile_fused_trains_and_reloads(tmp_path):
    config = tiny_config(tmp_path, **{**CUDA, "train.precision": "bf16-mixed", "train.compile": True,
                                      "train.max_steps": 30, "train.eval_interval": 15, "train.log_interval": 5,
                                      "optim.lr": 1e-2})
    trainer = tiny_trainer(config)
    summary = trainer.fit()
    assert trainer.optimizer.param_groups[0]["fused"] is True
    losses = [loss for _, loss in trainer.history]
    assert losses[-1] < losses[0] - 0.5
    model, _, _ = load_for_inference(tmp_path, device="cuda")
    idx = torch.randint(0, 32, (2, 16), device="cuda")
    trainer.raw_model.eval()
    with torch.no_grad():
        torch.testing.assert_close(model(idx), trainer.raw_model(idx), rtol=0, atol=0)
    assert summary["steps"] == 30


def test_compiled_fused_loss_gives_eager_gradients_on_cuda():
    """The head fused with its loss, traced by torch.compile in bf16 autocast on the GPU: the eager loss and
    gradients, none of them zero (torch 2.11 compiled it into a step whose gradients were all zero: nothing
    trained)."""
    from lmforge.config import preset
    from lmforge.model import GPT

    torch.manual_seed(0)
    model = GPT(preset("char-small", block_size=64, dropout=0.0)).cuda()
    x, y = (torch.randint(0, model.config.vocab_size, (4, 64), device="cuda") for _ in range(2))

    def loss_of(x, y):
        with torch.autocast("cuda", dtype=torch.bfloat16):
            return model(x, targets=y, loss_chunk=64) / y.numel()

    results = []
    for fn in (loss_of, torch.compile(loss_of)):
        model.zero_grad(set_to_none=True)
        loss = fn(x, y)
        loss.backward()
        results.append((loss.detach(), {n: p.grad.float() for n, p in model.named_parameters()}))
    (eager_loss, eager), (compiled_loss, compiled) = results
    torch.testing.assert_close(compiled_loss, eager_loss, rtol=1e-2, atol=1e-2)
    for name, grad in eager.items():
        assert compiled[name].abs().sum() > 0, name
        assert (compiled[name] - grad).norm() <= 0.05 * grad.norm(), name  # bf16 products, two orders of sums


@pytest.mark.parametrize("precision", ["fp32", "bf16-mixed"])
def test_resume_is_bit_identical_on_cuda(tmp_path, precision):
    base = {**CUDA, "train.precision": precision, "train.max_steps": 20, "train.save_interval": 10,
            "train.keep_last": 5, "model.dropout": 0.1}
    full = tiny_trainer(tiny_config(tmp_path / "full", **base))
    full.fit()
    resumed = tiny_trainer(tiny_config(tmp_path / "resumed", **{
        **base, "train.resume": str(tmp_path / "full" / "checkpoints" / "step-00000010")}))
    resumed.fit()
    assert [l for s, l in resumed.history] == [l for s, l in full.history if s > 10]


def test_loop_overhead_is_small(tmp_path):
    """Trainer.train_step versus a bare compiled forward/backward/clip/AdamW loop on the same model and batches;
    and the tokens/s that fit() logs is close to what the steps take."""
    overrides = {**CUDA, "model.vocab_size": 8192, "model.block_size": 512, "model.n_layer": 8, "model.n_head": 8,
                 "model.n_embd": 512, "train.batch_size": 64, "train.precision": "bf16-mixed", "train.compile": True,
                 "train.max_steps": 40, "train.log_interval": 20, "train.eval_interval": 0, "optim.warmup_steps": 5}
    trainer = tiny_trainer(tiny_config(tmp_path, **overrides), tokens=synthetic_tokens(400_000, vocab=8192))
    trainer.fit()
    import json

    logged = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    logged_tps = [r for r in logged if r["kind"] == "train"][-1]["tokens_per_s"]
    def trainer_step():
        trainer.train_step()
        trainer.step += 1

    def bare_step():  # the same compiled forward (the head fused with its loss) as the trainer's, nothing around it
        x, y = trainer.train_data.next_batch()
        x, y = x.cuda(), y.cuda()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = trainer.model(x, targets=y, loss_chunk=trainer.config.train.loss_chunk) / y.numel()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trainer.raw_model.parameters(), 1.0)
        trainer.optimizer.step()
        trainer.optimizer.zero_grad(set_to_none=True)

    def tokens_per_s(step, n=20):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(n):
            step()
        torch.cuda.synchronize()
        return n * 64 * 512 / (time.perf_counter() - t0)

    tokens_per_s(bare_step, n=3)  # warm: no compilation inside the timed steps
    loop_tps, bare_tps = tokens_per_s(trainer_step), tokens_per_s(bare_step)
    print(f"\ntokens/s: train_step {loop_tps:,.0f}, bare loop {bare_tps:,.0f} (ratio {loop_tps / bare_tps:.3f}), "
          f"logged by fit {logged_tps:,.0f}")
    assert loop_tps > 0.9 * bare_tps
    assert 0.7 * loop_tps < logged_tps < 1.3 * loop_tps
