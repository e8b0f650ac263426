"""DDP: two CPU processes under torchrun train exactly like one process with the same global batch (LoRA too, and
compiled). FSDP2: test_fsdp.py; a killed, hung or NaN process: test_distributed_faults.py; the worker:
distributed_jobs.py."""

from __future__ import annotations

import json

import pytest

from distributed_jobs import torchrun_worker, worker
from tiny_training import write_base


@pytest.mark.distributed
def test_two_processes_match_one(tmp_path):
    from safetensors.torch import load_file

    worker(tmp_path / "one", batch_size=8)
    torchrun_worker(tmp_path / "two", 4, 1, False)
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
def test_two_lora_processes_match_one_and_train_only_the_adapters(tmp_path):
    """LoRA under DDP: 2 processes x 4 sequences give the losses and adapters of 1 process x 8 (2 micro-batches each);
    only adapters train and are saved, under the plain model's names, and the base weights end as they began."""
    from safetensors.torch import load_file

    base = write_base(tmp_path)
    worker(tmp_path / "one", batch_size=8, grad_accum=2, base=str(base))
    torchrun_worker(tmp_path / "two", 4, 2, False, base)
    one = json.loads((tmp_path / "one" / "history.json").read_text())
    two = json.loads((tmp_path / "two" / "history.json").read_text())
    assert two["world_size"] == 2 and [s for s, _ in two["history"]] == list(range(1, 7))
    assert [l for _, l in two["history"]] == pytest.approx([l for _, l in one["history"]], abs=1e-5)
    assert two["val_loss"] == pytest.approx(one["val_loss"], abs=1e-5)
    assert one["trainable"] == two["trainable"] and all(".lora." in name for name in two["trainable"])
    ckpt = tmp_path / "two" / "checkpoints" / "step-00000006"
    state = json.loads((ckpt / "state.json").read_text())
    assert one["base_fingerprint"] == two["base_fingerprint"] == state["base"]["fingerprint"]  # frozen: unchanged
    a = load_file(str(tmp_path / "one" / "checkpoints" / "step-00000006" / "model.safetensors"))
    b = load_file(str(ckpt / "model.safetensors"))
    assert sorted(b) == sorted(a) == sorted(two["trainable"])  # the adapters alone, under the plain model's names
    for name in a:
        assert (a[name] - b[name]).abs().max().item() < 1e-5, name
    assert max(b[k].abs().max().item() for k in b if k.endswith(".B")) > 1e-3  # (the adapters did train)


@pytest.mark.distributed
@pytest.mark.slow
def test_two_compiled_processes_with_accumulation_match_one(tmp_path):
    """torch.compile over DDP, and no_sync on all but the last micro-batch: still the 1-process losses."""
    worker(tmp_path / "one", batch_size=8)
    torchrun_worker(tmp_path / "two", 2, 2, True)
    one = json.loads((tmp_path / "one" / "history.json").read_text())
    two = json.loads((tmp_path / "two" / "history.json").read_text())
    assert [l for _, l in two["history"]] == pytest.approx([l for _, l in one["history"]], abs=1e-5)


@pytest.mark.distributed
def test_two_qlora_processes_match_one(tmp_path):
    """QLoRA under DDP: each process quantizes the one base alike (its 4-bit buffers never cross), and 2 processes x 4
    sequences give 1 process x 8's losses."""
    base = write_base(tmp_path)
    quantized = json.dumps({"lora.quantize": "nf4"})
    worker(tmp_path / "one", batch_size=8, grad_accum=2, base=str(base), overrides=quantized)
    torchrun_worker(tmp_path / "two", 4, 2, False, base, quantized)
    one = json.loads((tmp_path / "one" / "history.json").read_text())
    two = json.loads((tmp_path / "two" / "history.json").read_text())
    assert two["world_size"] == 2 and [s for s, _ in two["history"]] == list(range(1, 7))
    assert [l for _, l in two["history"]] == pytest.approx([l for _, l in one["history"]], abs=1e-5)
    state = json.loads((tmp_path / "two" / "checkpoints" / "step-00000006" / "state.json").read_text())
    assert one["base_fingerprint"] == two["base_fingerprint"] != state["base"]["fingerprint"]  # 4-bit, alike


@pytest.mark.distributed
def test_two_bf16_processes_match_one_within_bf16(tmp_path):
    """bf16-compute under DDP, 1536 tokens a process, 384 wide (on a CPU with AMX and one thread a process, the Linear
    layers run as train/amx_linear.py's there): 2 processes x 24 sequences give 1 process x 48's losses within bf16's
    rounding."""
    settings = json.dumps({"train.precision": "bf16-compute", "model.block_size": 64, "model.n_embd": 384,
                           "model.n_head": 6})
    worker(tmp_path / "one", 48, 1, False, "", settings)
    torchrun_worker(tmp_path / "two", 24, 1, False, "", settings)
    one = json.loads((tmp_path / "one" / "history.json").read_text())
    two = json.loads((tmp_path / "two" / "history.json").read_text())
    losses = [l for _, l in one["history"]]
    assert two["world_size"] == 2 and losses[-1] < losses[0] - 0.02  # it learns
    assert [l for _, l in two["history"]] == pytest.approx(losses, rel=3e-3)  # (bf16 sums in another order)
