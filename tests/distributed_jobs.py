"""Jobs of two CPU processes under torchrun for the distributed tests (test_distributed.py, test_fsdp.py): the
worker each process runs, and how a test starts it.

Run as a script (`torchrun ... tests/distributed_jobs.py RUN_DIR BATCH ACCUM COMPILE [LORA_BASE [OVERRIDES_JSON]]`),
this file is the worker.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Optional

from tiny_training import tiny_config, tiny_trainer

STEPS = {"train.max_steps": 6, "train.eval_interval": 3, "train.save_interval": 3, "model.dropout": 0.0}
LORA = {"lora.r": 4, "lora.targets": "q,k,v,o", "optim.lr": 1e-2}  # no adapter dropout: each process draws its own


def worker(run_dir: Path, batch_size: int, grad_accum: int = 1, compile: bool = False, base: str = "",
           overrides: str = "{}") -> None:
    """Train the tiny model (LoRA adapters on `base`, when given; config `overrides` as JSON); rank 0 writes the
    logged losses, the trainable parameters and the fingerprint of the frozen weights next to the run directory."""
    from torch import nn

    from lmforge.distributed import is_sharded, teardown_distributed, unwrap
    from lmforge.lora import base_fingerprint
    from lmforge.train import muon

    orthogonalised = []  # the matrices this process put through Newton-Schulz, per call
    real = muon.newton_schulz
    muon.newton_schulz = lambda G, *args, **kwargs: orthogonalised.append(G.size(0)) or real(G, *args, **kwargs)

    lora = {"train.init_from": base, **LORA} if base else {}
    settings = json.loads(overrides)
    tokenizer = settings.pop("tokenizer_file", None)  # not a config key: the Trainer's (train.choices_file needs one)
    config = tiny_config(run_dir, **{**STEPS, "train.batch_size": batch_size, "train.grad_accum": grad_accum,
                                     "train.compile": compile, **lora, **settings})
    if "data.path" in settings:  # a prepared data directory (task data: preference pairs) instead of synthetic tokens
        from lmforge.train import Trainer

        trainer = Trainer(config, progress=False, tensorboard=False)
    else:
        trainer = tiny_trainer(config, tokenizer_file=tokenizer)
    dtypes = set()  # of the weight a block's first matrix product is given (FSDP: the gathered one)
    first = next((m for m in unwrap(trainer.raw_model).blocks[0].modules() if isinstance(m, nn.Linear)), None)
    if first is not None:  # (QLoRA: the blocks hold no nn.Linear)
        first.register_forward_pre_hook(lambda module, args: dtypes.add(str(module.weight.dtype)))
    summary = trainer.fit()
    local = sum(getattr(p, "to_local", lambda: p)().numel() for p in trainer.raw_model.parameters())
    reference = trainer.reference  # preference data: the frozen reference model, when the loss keeps one
    reference_local = sum(getattr(p, "to_local", lambda: p)().numel() for p in reference.parameters()) if reference \
        is not None else None
    teacher = trainer.teacher  # distillation: the frozen teacher (FSDP: sharded, its head kept whole apart)
    teacher_held = None if teacher is None else (
        sum(getattr(p, "to_local", lambda: p)().numel() for p in teacher.parameters())
        / sum(getattr(p, "full_tensor", lambda: p)().numel() for p in teacher.parameters()))
    if trainer.dist.is_main:
        trainable = [name for name, p in trainer.raw_model.named_parameters() if p.requires_grad]
        (run_dir / "history.json").write_text(json.dumps({"history": trainer.history, "val_loss": summary["val_loss"],
                                                          "world_size": trainer.dist.world_size, "trainable": trainable,
                                                          "sharded": is_sharded(trainer.raw_model),
                                                          "held": local / summary["parameters"],
                                                          "reference_held": None if reference is None
                                                          else reference_local / summary["parameters"],
                                                          "teacher_held": teacher_held,
                                                          "weight_dtypes": sorted(dtypes),
                                                          "orthogonalised": sum(orthogonalised),
                                                          "choices": {k: v for k, v in trainer.measured.items()
                                                                      if k.startswith("val_choices")},
                                                          "base_fingerprint": base_fingerprint(trainer.raw_model) if base else None}))
    del trainer, reference, teacher, first  # the run's models (and the group its DDP wrapper holds) go before the group
    teardown_distributed(synchronize=True)


def torchrun_worker(run_dir: Path, *args: object) -> None:
    """`worker` in 2 processes under torchrun; args: BATCH ACCUM COMPILE [LORA_BASE [OVERRIDES_JSON]]."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "GLOO_SOCKET_IFNAME": "lo"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           __file__, str(run_dir), *map(str, args)]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    # the start and the end of stderr: a rank that aborts in native code (faulthandler's stack of every thread) is
    # often not the first to print, and torchrun's summary of which rank failed and how comes last
    err = done.stderr if len(done.stderr) <= 8000 else done.stderr[:2000] + "\n[...]\n" + done.stderr[-6000:]
    assert done.returncode == 0, err


def two_processes(tmp_path_factory, name: str, overrides: dict) -> Path:
    """The run directory of a job of 2 processes x 2 sequences x 2 micro-batches with `overrides`."""
    run = tmp_path_factory.mktemp(name) / "two"
    torchrun_worker(run, 2, 2, False, "", json.dumps(overrides))
    return run


def read_history(run: Path) -> dict:
    return json.loads((run / "history.json").read_text())


def one_and_two(tmp_path: Path, settings: dict, two_extra: Optional[dict] = None) -> tuple[dict, dict]:
    """The summaries of 6 steps of `settings` trained by 1 process x 8 rows (tmp_path/one) and by 2 processes x 4
    (tmp_path/two, with `two_extra` too, e.g. FSDP), the second checked to have run in 2 processes, steps 1 to 6."""
    worker(tmp_path / "one", 8, 1, False, "", json.dumps(settings))
    torchrun_worker(tmp_path / "two", 4, 1, False, "", json.dumps({**settings, **(two_extra or {})}))
    one, two = read_history(tmp_path / "one"), read_history(tmp_path / "two")
    assert two["world_size"] == 2 and [s for s, _ in two["history"]] == list(range(1, 7))
    return one, two


if __name__ == "__main__":
    import faulthandler

    faulthandler.enable()  # a crash in native code (SIGSEGV, SIGABRT) prints the Python stack where it happened
    sys.path.insert(0, str(Path(__file__).parent))
    worker(Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4] == "True", *sys.argv[5:])
