"""A golden 20-step loss curve: any change to the model, init, data stream, loss, optimizer or schedule
that alters training numerics shows up here.

If the change is intended, regenerate the curve and commit it with the change that explains it:

    .venv/bin/python tests/test_train_golden.py --regenerate
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

from tiny_training import synthetic_tokens, tiny_config, tiny_trainer

GOLDEN = Path(__file__).parent / "golden" / "tiny_loss_curve.json"
OVERRIDES = {"train.max_steps": 20, "train.eval_interval": 0, "train.grad_accum": 2, "model.dropout": 0.1,
             "optim.warmup_steps": 5, "optim.schedule": "cosine", "optim.lr": 1e-2, "optim.min_lr": 1e-3}


def golden_curve(run_dir: Path) -> list[float]:
    """Train losses of steps 1..20 of a tiny seeded model on synthetic Markov-chain tokens."""
    trainer = tiny_trainer(tiny_config(run_dir, **OVERRIDES), tokens=synthetic_tokens(4000, seed=0))
    for _ in range(20):
        loss_sum, count, _, _ = trainer.train_step()
        trainer.step += 1
        trainer.history.append((trainer.step, float(loss_sum / count)))
    return [loss for _, loss in trainer.history]


def test_golden_loss_curve(tmp_path):
    golden = json.loads(GOLDEN.read_text())
    losses = golden_curve(tmp_path)
    assert len(losses) == len(golden["losses"]) == 20
    assert losses == pytest.approx(golden["losses"], abs=1e-4), "training numerics changed; see this file's docstring"
    assert losses[-1] < losses[0] - 0.3  # and it learns


if __name__ == "__main__" and "--regenerate" in sys.argv:
    import tempfile

    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        losses = golden_curve(Path(tmp))
    GOLDEN.parent.mkdir(exist_ok=True)
    GOLDEN.write_text(json.dumps({"about": "tests/test_train_golden.py; regenerate with --regenerate",
                                  "torch": torch.__version__, "overrides": OVERRIDES, "losses": losses}, indent=1) + "\n")
    print(f"wrote {GOLDEN}: {losses[0]:.4f} -> {losses[-1]:.4f}")
