"""The training loop: it learns, its arithmetic is right (accumulation, schedules, weight-decay groups),
it writes what it promises (metrics, TensorBoard, plot, config), and bf16-mixed runs on CPU."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from lmforge.config import OptimConfig, preset
from lmforge.data.batches import TokenBatches
from lmforge.model import GPT
from lmforge.train.loss import IGNORE_INDEX, cross_entropy
from lmforge.train.optim import build_optimizer, param_groups, set_lr
from lmforge.train.schedule import lr_at
from lmforge.train.trainer import Trainer
from tiny_training import VOCAB, synthetic_tokens, tiny_config, tiny_trainer


class FixedBatches:
    """A batch stream that yields the given batches in a cycle (what a fine-tuning dataset looks like)."""

    def __init__(self, batches):
        self.batches, self.position = batches, 0

    def next_batch(self):
        batch = self.batches[self.position % len(self.batches)]
        self.position += 1
        return batch

    def state_dict(self):
        return {"position": self.position}

    def load_state_dict(self, state):
        self.position = state["position"]


def _run_steps(trainer: Trainer, n: int) -> list[float]:
    losses = []
    for _ in range(n):
        loss_sum, count, _, _ = trainer.train_step()
        trainer.step += 1
        losses.append(float(loss_sum / count))
    return losses


def test_overfits_one_batch(tmp_path):
    x = torch.randint(0, VOCAB, (4, 17), generator=torch.Generator().manual_seed(0))
    x[:, 0] = torch.arange(4)  # distinct first tokens: every continuation is predictable
    config = tiny_config(tmp_path, **{"optim.lr": 1e-2, "optim.schedule": "constant", "optim.warmup_steps": 0,
                                      "optim.weight_decay": 0.0})
    trainer = Trainer(config, train_data=FixedBatches([(x[:, :-1], x[:, 1:])]), progress=False, tensorboard=False)
    losses = _run_steps(trainer, 150)
    assert losses[0] > 3.0  # ~ln(32) at init
    assert losses[-1] < 0.01


@pytest.mark.parametrize("masked", [False, True])
def test_micro_batches_equal_one_batch(tmp_path, masked):
    """k micro-batches of B/k take the same optimizer step as one batch of B (also with IGNORE_INDEX labels)."""
    gen = torch.Generator().manual_seed(1)
    x = torch.randint(0, VOCAB, (8, 16), generator=gen)
    y = torch.randint(0, VOCAB, (8, 16), generator=gen)
    if masked:  # unequal label counts per micro-batch: a per-micro-batch mean would weigh them wrongly
        y[:3, :10] = IGNORE_INDEX
        y[6, :] = IGNORE_INDEX
    whole = Trainer(tiny_config(tmp_path / "a", **{"train.batch_size": 8}), train_data=FixedBatches([(x, y)]),
                    progress=False, tensorboard=False)
    split = Trainer(tiny_config(tmp_path / "b", **{"train.batch_size": 2, "train.grad_accum": 4}),
                    train_data=FixedBatches([(x[i:i + 2], y[i:i + 2]) for i in range(0, 8, 2)]),
                    progress=False, tensorboard=False)
    loss_whole, count_whole = whole.accumulate_gradients()
    loss_split, count_split = split.accumulate_gradients()
    assert float(count_whole) == float(count_split) == float((y != IGNORE_INDEX).sum())
    torch.testing.assert_close(loss_whole, loss_split, rtol=1e-6, atol=1e-5)
    for (name, a), (_, b) in zip(whole.raw_model.named_parameters(), split.raw_model.named_parameters()):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-5, atol=1e-7, msg=name)
    whole.optimizer_step(), split.optimizer_step()
    np.testing.assert_allclose(_run_steps(whole, 3), _run_steps(split, 3), rtol=1e-5)


def test_loss_ignores_masked_labels():
    logits = torch.randn(2, 3, 5)
    labels = torch.tensor([[1, IGNORE_INDEX, 2], [IGNORE_INDEX, IGNORE_INDEX, 4]])
    keep = labels != IGNORE_INDEX
    expected = torch.nn.functional.cross_entropy(logits[keep], labels[keep])
    torch.testing.assert_close(cross_entropy(logits, labels), expected)


# ------------------------------------------------------------------------------------------ schedules
def test_cosine_schedule_matches_formula():
    o = OptimConfig(lr=1.0, min_lr=0.1, schedule="cosine", warmup_steps=10)
    assert lr_at(0, o, 110) == pytest.approx(0.1)  # (0+1)/10
    assert lr_at(9, o, 110) == pytest.approx(1.0)
    assert lr_at(10, o, 110) == pytest.approx(1.0)
    assert lr_at(60, o, 110) == pytest.approx(0.1 + 0.5 * (1 + math.cos(math.pi * 0.5)) * 0.9)
    assert lr_at(110, o, 110) == pytest.approx(0.1)
    assert lr_at(500, o, 110) == pytest.approx(0.1)  # past the end: stays at min_lr
    for step in range(10, 110):
        assert lr_at(step + 1, o, 110) <= lr_at(step, o, 110)


def test_wsd_schedule_matches_formula():
    o = OptimConfig(lr=1.0, min_lr=0.0, schedule="wsd", warmup_steps=10, decay_fraction=0.2)
    assert lr_at(4, o, 100) == pytest.approx(0.5)
    assert lr_at(10, o, 100) == lr_at(79, o, 100) == pytest.approx(1.0)  # stable
    assert lr_at(80, o, 100) == pytest.approx(1.0)  # decay starts at 100 - 20
    assert lr_at(90, o, 100) == pytest.approx(0.5)
    assert lr_at(100, o, 100) == pytest.approx(0.0)


def test_constant_schedule_matches_formula():
    o = OptimConfig(lr=0.5, min_lr=0.0, schedule="constant", warmup_steps=4)
    assert [lr_at(s, o, 100) for s in (0, 1, 3, 4, 99)] == pytest.approx([0.125, 0.25, 0.5, 0.5, 0.5])


# ------------------------------------------------------------------------------------- AdamW groups
def test_adamw_groups_decay_only_matrices():
    model = GPT(preset("tiny", vocab_size=VOCAB, bias=True, tie_embeddings=True))
    decay, no_decay = param_groups(model, 0.1)
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert "tok_emb.weight" in no_decay["names"] and "pos_emb.weight" in no_decay["names"]
    assert "lm_head.weight" not in decay["names"] + no_decay["names"]  # tied: counted once, as the embedding
    assert "norm_f.weight" in no_decay["names"] and "norm_f.bias" in no_decay["names"]
    assert all(n.endswith(".weight") for n in decay["names"])
    params = dict(model.named_parameters())
    assert all(params[n].ndim == 2 for n in decay["names"])
    assert all(n.endswith("bias") or "norm" in n or "ln" in n or "emb" in n for n in no_decay["names"]), no_decay["names"]
    assert len(decay["names"]) + len(no_decay["names"]) == len(params)

    untied = GPT(preset("tiny", vocab_size=VOCAB, tie_embeddings=False))
    decay, no_decay = param_groups(untied, 0.1)
    assert "lm_head.weight" in decay["names"] and "tok_emb.weight" in no_decay["names"]

    optimizer = build_optimizer(model, OptimConfig(weight_decay=0.1), torch.device("cpu"))
    assert [g["weight_decay"] for g in optimizer.param_groups] == [0.1, 0.0]


# -------------------------------------------------------------------------------------- Muon + AdamW
HIDDEN = ("attn.qkv.weight", "attn.proj.weight", "mlp.fc.weight", "mlp.proj.weight")


@pytest.mark.parametrize("tied", [True, False])
def test_muon_takes_the_hidden_matrices_and_adamw_everything_else(tied):
    model = GPT(preset("tiny", vocab_size=VOCAB, tie_embeddings=tied))
    groups = param_groups(model, 0.1, muon=True)
    names = [n for g in groups for n in g["names"]]
    assert sorted(names) == sorted(dict(model.named_parameters()))  # every parameter in exactly one group
    muon = [g for g in groups if g.get("muon")]
    assert len(muon) == 1 and muon[0]["names"] == [f"blocks.{i}.{m}" for i in range(2) for m in HIDDEN]
    if not tied:
        assert "lm_head.weight" in groups[0]["names"] and groups[0]["weight_decay"] == 0.1  # the head: AdamW

    optimizer = build_optimizer(model, OptimConfig(name="muon", lr=1e-3, muon_lr=0.02), torch.device("cpu"))
    adamw, muon_opt = optimizer.optimizers
    assert isinstance(adamw, torch.optim.AdamW) and isinstance(muon_opt, torch.optim.Muon)
    hidden = {id(p) for n, p in model.named_parameters() if n.endswith(HIDDEN)}
    assert {id(p) for g in muon_opt.param_groups for p in g["params"]} == hidden
    assert not hidden & {id(p) for g in adamw.param_groups for p in g["params"]}
    set_lr(optimizer, 5e-4)  # one schedule drives both: Muon at muon_lr/lr times AdamW's rate
    assert [g["lr"] for g in optimizer.param_groups] == pytest.approx([5e-4] * len(adamw.param_groups) + [1e-2])


def test_a_tiny_muon_run_learns(tmp_path):
    x = torch.randint(0, VOCAB, (4, 17), generator=torch.Generator().manual_seed(0))
    x[:, 0] = torch.arange(4)
    batches = FixedBatches([(x[:, :-1], x[:, 1:])])
    base = {"optim.name": "muon", "optim.schedule": "constant", "optim.warmup_steps": 0, "optim.min_lr": 0.0,
            "optim.weight_decay": 0.0, "optim.muon_lr": 0.05}
    # AdamW's rate ~0 freezes embeddings and norms: whatever is learnt, Muon learnt in the hidden matrices
    only_muon = Trainer(tiny_config(tmp_path / "a", **base, **{"optim.lr": 1e-9}), train_data=batches, progress=False,
                        tensorboard=False)
    losses = _run_steps(only_muon, 60)
    assert losses[-1] < losses[0] - 0.3
    both = Trainer(tiny_config(tmp_path / "b", **base, **{"optim.lr": 1e-2}), train_data=batches, progress=False,
                   tensorboard=False)
    assert min(_run_steps(both, 50)) < 0.05  # ~ln(32) at init; the batch is learnt


# --------------------------------------------------------------------------------------- data stream
def test_batches_are_deterministic_and_resumable():
    tokens = synthetic_tokens(1000)
    a = TokenBatches(tokens, 16, 4, seed=3)
    first = [a.next_batch() for _ in range(3)]
    state = json.loads(json.dumps(a.state_dict()))  # survives JSON
    after = [a.next_batch() for _ in range(2)]
    b = TokenBatches(tokens, 16, 4, seed=3)
    assert all(torch.equal(p[0], q[0]) for p, q in zip(first, [b.next_batch() for _ in range(3)]))
    c = TokenBatches(tokens, 16, 4, seed=3)
    c.load_state_dict(state)
    assert all(torch.equal(p[0], q[0]) and torch.equal(p[1], q[1]) for p, q in zip(after, [c.next_batch() for _ in range(2)]))
    x, y = after[0]
    assert x.shape == y.shape == (4, 16) and torch.equal(x[:, 1:], y[:, :-1])


def test_each_rank_reads_its_own_slice():
    tokens = synthetic_tokens(1000)
    one = TokenBatches(tokens, 16, 6, seed=5).next_batch()[0]
    ranks = [TokenBatches(tokens, 16, 2, seed=5, rank=r, world_size=3).next_batch()[0] for r in range(3)]
    assert torch.equal(one, torch.cat(ranks))


def test_sequential_sampling_walks_the_split_and_wraps():
    tokens = np.arange(41, dtype=np.uint16)  # 5 windows of 8 (+1 label)
    stream = TokenBatches(tokens, 8, 3, sampling="sequential")
    starts = [int(s) for _ in range(2) for s in stream.next_batch()[0][:, 0]]
    assert starts == [0, 8, 16, 24, 32, 0]


# ----------------------------------------------------------------------------------- the whole loop
def test_fit_writes_metrics_tensorboard_plot_and_config(tmp_path):
    config = tiny_config(tmp_path / "run", **{"train.max_steps": 6, "train.log_interval": 2, "train.eval_interval": 3,
                                              "train.plot": True})
    summary = tiny_trainer(config, tensorboard=True).fit()
    run = tmp_path / "run"
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in records if r["kind"] == "train"]
    evals = [r for r in records if r["kind"] == "eval"]
    assert [r["step"] for r in train] == [2, 4, 6] and [r["step"] for r in evals] == [3, 6]
    assert {"loss", "lr", "grad_norm", "tokens_per_s", "tokens_seen"} <= set(train[0])
    assert train[-1]["tokens_seen"] == 6 * 4 * 16
    assert evals[-1]["val_perplexity"] == pytest.approx(math.exp(evals[-1]["val_loss"]))
    assert summary["val_loss"] == pytest.approx(evals[-1]["val_loss"]) and summary["steps"] == 6
    assert any(p.name.startswith("events.out.tfevents") for p in (run / "tb").iterdir())
    assert (run / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and summary["plot"] == str(run / "loss.png")
    assert yaml.safe_load((run / "config.yaml").read_text())["model"]["vocab_size"] == VOCAB
    assert summary["checkpoint"].endswith("step-00000006")
    unplotted = tiny_trainer(tiny_config(tmp_path / "unplotted", **{"train.max_steps": 2})).fit()  # train.plot false
    assert unplotted["plot"] is None and not (tmp_path / "unplotted" / "loss.png").exists()


def test_grad_norm_is_logged_before_clipping(tmp_path):
    config = tiny_config(tmp_path, **{"optim.grad_clip": 1e-3, "optim.lr": 1e-2})
    trainer = tiny_trainer(config)
    _, _, grad_norm, _ = trainer.train_step()
    assert float(grad_norm) > 1e-3  # the norm before clipping, not the clipped 1e-3


def test_bf16_mixed_trains_on_cpu(tmp_path):
    config = tiny_config(tmp_path, **{"train.precision": "bf16-mixed"})
    trainer = tiny_trainer(config)
    losses = _run_steps(trainer, 8)
    assert all(math.isfinite(v) for v in losses) and losses[-1] < losses[0]
    assert trainer.raw_model.tok_emb.weight.dtype == torch.float32  # master weights stay fp32


@pytest.mark.slow
def test_compiled_training_matches_eager(tmp_path):
    eager = tiny_trainer(tiny_config(tmp_path / "eager"))
    compiled = tiny_trainer(tiny_config(tmp_path / "compiled", **{"train.compile": True}))
    np.testing.assert_allclose(_run_steps(compiled, 3), _run_steps(eager, 3), rtol=1e-4)


def test_plot_run_without_metrics_is_one_clear_line(tmp_path):
    from lmforge.errors import LmforgeError
    from lmforge.train.plot import plot_run

    with pytest.raises(LmforgeError, match="metrics.jsonl") as info:
        plot_run(tmp_path)
    assert "\n" not in str(info.value) and not (tmp_path / "loss.png").exists()


def test_plot_run_keeps_the_latest_value_of_a_repeated_step(tmp_path):
    from lmforge.train.plot import loss_curves, plot_run

    lines = [{"kind": "train", "step": 1, "loss": 3.0}, {"kind": "train", "step": 2, "loss": 2.0},
             {"kind": "eval", "step": 2, "val_loss": 2.5}, {"kind": "train", "step": 2, "loss": 1.9}]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines) + '{"torn')
    from lmforge.train.metrics import read_metrics

    curves = loss_curves(read_metrics(tmp_path))
    assert curves["train"] == ([1, 2], [3.0, 1.9]) and curves["val"] == ([2], [2.5])
    out = plot_run(tmp_path, out=tmp_path / "custom.png")
    assert out == tmp_path / "custom.png" and out.read_bytes()[:4] == b"\x89PNG"


def test_activation_checkpointing_trains_bit_identically(tmp_path):
    """train.activation_checkpointing reaches the model and changes no number of a run (dropout on)."""
    losses = {}
    for on in (False, True):
        trainer = tiny_trainer(tiny_config(tmp_path / str(on), **{"train.max_steps": 4, "model.dropout": 0.1,
                                                                 "train.activation_checkpointing": str(on).lower()}))
        trainer.fit()
        assert trainer.raw_model.checkpoint_blocks is on
        losses[on] = [loss for _, loss in trainer.history]
    assert losses[True] == losses[False]


def test_wsd_decay_that_would_overlap_the_warmup_starts_after_it_and_still_ends_at_min_lr():
    """decay_fraction 0.8 of 100 steps with 30 warm-up steps: the decay runs from step 30 (not 20, inside the
    warm-up) to step 100, linearly over those 70 steps, so it still reaches min_lr at max_steps."""
    o = OptimConfig(lr=1.0, min_lr=0.1, schedule="wsd", warmup_steps=30, decay_fraction=0.8)
    assert lr_at(29, o, 100) == pytest.approx(1.0)  # last warm-up step: (29 + 1) / 30
    assert lr_at(30, o, 100) == pytest.approx(1.0)  # no drop where the warm-up hands over
    for step in (31, 65, 99):
        assert lr_at(step, o, 100) == pytest.approx(1.0 + (step - 30) / 70 * (0.1 - 1.0))
    assert lr_at(100, o, 100) == pytest.approx(0.1)


def test_wsd_decay_length_is_the_nearest_whole_number_of_steps():
    """decay_fraction 0.19 of 10 steps is 1.9 steps: the decay takes the last 2 (nearest), starting at step 8."""
    o = OptimConfig(lr=1.0, min_lr=0.0, schedule="wsd", warmup_steps=0, decay_fraction=0.19)
    assert [lr_at(s, o, 10) for s in (7, 8, 9, 10)] == pytest.approx([1.0, 1.0, 0.5, 0.0])
