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
    """Trainer tokens/s versus a bare compiled forward/backward/AdamW loop on the same model and batches."""
    overrides = {**CUDA, "model.vocab_size": 8192, "model.block_size": 512, "model.n_layer": 8, "model.n_head": 8,
                 "model.n_embd": 512, "train.batch_size": 32, "train.precision": "bf16-mixed", "train.compile": True,
                 "train.max_steps": 60, "train.log_interval": 20, "train.eval_interval": 0, "optim.warmup_steps": 5}
    trainer = tiny_trainer(tiny_config(tmp_path, **overrides), tokens=synthetic_tokens(400_000, vocab=8192))
    trainer.fit()
    import json

    records = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    loop_tps = records[-1]["tokens_per_s"] if records[-1]["kind"] == "train" else \
        [r for r in records if r["kind"] == "train"][-1]["tokens_per_s"]

    model, opt = trainer.model, trainer.optimizer
    x, y = trainer.train_data.next_batch()
    x, y = x.cuda(), y.cuda()
    from lmforge.train.loss import cross_entropy

    def step():
        with torch.autocast("cuda", dtype=torch.bfloat16):
            logits = model(x)
        cross_entropy(logits, y).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    for _ in range(5):
        step()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(20):
        step()
    torch.cuda.synchronize()
    bare_tps = 20 * x.numel() / (time.perf_counter() - t0)
    print(f"\ntokens/s: trainer {loop_tps:,.0f}, bare loop {bare_tps:,.0f}, ratio {loop_tps / bare_tps:.3f}")
    assert loop_tps > 0.85 * bare_tps
