"""DDP: two CPU processes under torchrun train exactly like one process with the same global batch.

Run as a script (`torchrun ... tests/test_distributed.py RUN_DIR BATCH ACCUM COMPILE`), this file is the worker.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tiny_training import tiny_config, tiny_trainer

STEPS = {"train.max_steps": 6, "train.eval_interval": 3, "train.save_interval": 3, "model.dropout": 0.0}


def worker(run_dir: Path, batch_size: int, grad_accum: int = 1, compile: bool = False) -> None:
    """Train the tiny model; rank 0 writes the logged losses next to the run directory."""
    from lmforge.distributed import teardown_distributed

    trainer = tiny_trainer(tiny_config(run_dir, **{**STEPS, "train.batch_size": batch_size,
                                                   "train.grad_accum": grad_accum, "train.compile": compile}))
    summary = trainer.fit()
    if trainer.dist.is_main:
        (run_dir / "history.json").write_text(json.dumps({"history": trainer.history, "val_loss": summary["val_loss"],
                                                          "world_size": trainer.dist.world_size}))
    teardown_distributed()


def _torchrun(run_dir: Path, *args: object) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "GLOO_SOCKET_IFNAME": "lo"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           __file__, str(run_dir), *map(str, args)]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[:3000]


@pytest.mark.distributed
def test_two_processes_match_one(tmp_path):
    from safetensors.torch import load_file

    worker(tmp_path / "one", batch_size=8)
    _torchrun(tmp_path / "two", 4, 1, False)
    one = json.loads((tmp_path / "one" / "history.json").read_text())
    two = json.loads((tmp_path / "two" / "history.json").read_text())
    assert two["world_size"] == 2
    assert [s for s, _ in two["history"]] == [s for s, _ in one["history"]] == list(range(1, 7))
    assert [l for _, l in two["history"]] == pytest.approx([l for _, l in one["history"]], abs=1e-5)
    assert two["val_loss"] == pytest.approx(one["val_loss"], abs=1e-5)
    a = load_file(str(tmp_path / "one" / "checkpoints" / "step-00000006" / "model.safetensors"))
    b = load_file(str(tmp_path / "two" / "checkpoints" / "step-00000006" / "model.safetensors"))
    for name in a:
        assert (a[name] - b[name]).abs().max().item() < 1e-5, name
    # rank 0 alone wrote: one metrics file whose train records are not duplicated
    records = [json.loads(x) for x in (tmp_path / "two" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if r["kind"] == "train"] == list(range(1, 7))
    state = json.loads((tmp_path / "two" / "checkpoints" / "step-00000006" / "state.json").read_text())
    assert state["world_size"] == 2 and len(state["ranks"]) == 2


@pytest.mark.distributed
@pytest.mark.slow
def test_two_compiled_processes_with_accumulation_match_one(tmp_path):
    """torch.compile over DDP, and no_sync on all but the last micro-batch: still the 1-process losses."""
    worker(tmp_path / "one", batch_size=8)
    _torchrun(tmp_path / "two", 2, 2, True)
    one = json.loads((tmp_path / "one" / "history.json").read_text())
    two = json.loads((tmp_path / "two" / "history.json").read_text())
    assert [l for _, l in two["history"]] == pytest.approx([l for _, l in one["history"]], abs=1e-5)


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).parent))
    worker(Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4] == "True")
