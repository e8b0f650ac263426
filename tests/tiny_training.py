"""Shared pieces of the training tests: a tiny config, learnable synthetic tokens, a prepared data directory."""

from __future__ import annotations

import hashlib
import json
import os
import sys
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from lmforge.checkpoint import save_checkpoint
from lmforge.config import RunConfig, load_run_config, preset
from lmforge.data.batches import TokenBatches, fixed_batches
from lmforge.model import GPT
from lmforge.tokenizer import byte_tokenizer
from lmforge.train import Trainer

VOCAB = 32


def tiny_config(run_dir: Path, **overrides: object) -> RunConfig:
    """A 2-layer, 32-wide model with 16-token context, 4 sequences per batch, one CPU thread, no loss plot."""
    values = {"preset": "tiny", "model.vocab_size": VOCAB, "model.block_size": 16, "train.run_dir": str(run_dir),
              "train.max_steps": 10, "train.batch_size": 4, "train.log_interval": 1, "train.eval_interval": 5,
              "train.eval_batches": 2, "train.save_interval": 0, "train.num_threads": 1, "train.device": "cpu",
              "train.seed": 7, "optim.warmup_steps": 2, "optim.lr": 3e-3, "optim.min_lr": 3e-4,
              "train.plot": False}  # (the tests of the plot turn it on)
    values.update(overrides)
    return load_run_config(None, {k: str(v) for k, v in values.items()})


def synthetic_tokens(n: int = 4000, vocab: int = VOCAB, seed: int = 0) -> np.ndarray:
    """A learnable stream: a random first-order Markov chain where each token has 3 likely successors."""
    rng = np.random.default_rng(seed)
    successors = rng.integers(0, vocab, size=(vocab, 3))
    out = np.empty(n, dtype=np.uint16)
    out[0] = 0
    choices = rng.integers(0, 3, size=n)
    for i in range(1, n):
        out[i] = successors[out[i - 1], choices[i]]
    return out


def tiny_trainer(config: RunConfig, tokens: Optional[np.ndarray] = None, **kwargs: object) -> Trainer:
    """A Trainer on synthetic tokens (no data directory), with no progress bar and no TensorBoard."""
    tokens = synthetic_tokens() if tokens is None else tokens
    T, B, seed = config.model.block_size, config.train.batch_size, config.train.seed
    rank, world = int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))  # set by torchrun
    train = TokenBatches(tokens, T, B, seed=seed, sampling=config.data.sampling, rank=rank, world_size=world)
    val = fixed_batches(tokens, T, B, config.train.eval_batches, seed=seed + 1, rank=rank, world_size=world)
    kwargs.setdefault("progress", False)
    kwargs.setdefault("tensorboard", False)
    return Trainer(config, train_data=train, val_batches=val, **kwargs)


def write_prepared_data(data_dir: Path, texts: dict[str, list[str]]) -> Path:
    """A prepared data directory as docs/CONTRACTS.md describes it, byte tokenizer, one split per key of `texts`."""
    data_dir.mkdir(parents=True, exist_ok=True)
    tok = byte_tokenizer()
    tok_sha = tok.save(data_dir / "tokenizer.json")
    splits = {}
    for split, docs in texts.items():
        ids = []
        for doc in docs:
            ids += [tok.start_id, *tok.encode(doc), tok.end_id]
        arr = np.asarray(ids, dtype=np.uint16)
        arr.tofile(data_dir / f"{split}.bin")
        splits[split] = {"file": f"{split}.bin", "tokens": len(arr), "documents": len(docs),
                         "sha256": hashlib.sha256(arr.tobytes()).hexdigest(),
                         "bytes": sum(len(d.encode("utf-8")) for d in docs)}
    manifest = {"format": "lmforge-shards-v1", "lmforge_version": "0.1.0", "dtype": "uint16",
                "vocab_size": tok.vocab_size,
                "tokenizer": {"file": "tokenizer.json", "sha256": tok_sha, "kind": "byte"},
                "special_tokens": {"start": {"token": "<START>", "id": tok.start_id},
                                   "end": {"token": "<END>", "id": tok.end_id},
                                   "pad": {"token": "<PAD>", "id": tok.pad_id}},
                "seed": 0, "split": [0.9, 0.05, 0.05], "sources": [], "splits": splits}
    (data_dir / "manifest.json").write_text(json.dumps(manifest, indent=1), encoding="utf-8")
    return data_dir


def write_base(root: Path, seed: int = 0, nudge: bool = False) -> Path:
    """ROOT/base, a run directory: a tiny GPT (byte vocabulary, so the CLI can generate) saved as a weights-only
    checkpoint, with ROOT/tokenizer.json: the base of a LoRA run."""
    tok = byte_tokenizer()
    tok.save(root / "tokenizer.json")
    config = preset("tiny", vocab_size=tok.vocab_size, block_size=16)
    torch.manual_seed(seed)
    model = GPT(config)
    if nudge:  # the same base with one weight changed
        with torch.no_grad():
            model.blocks[0].mlp.fc.weight[0, 0] += 1e-3
    save_checkpoint(root / "base", 0, model, None, RunConfig(model=config), {"tokens_seen": 0}, root / "tokenizer.json")
    return root / "base"


# ------------------------------------------------------------------- the real command, in a real process
def prepared_corpus(root: Path, documents: int = 24, seed: int = 0) -> Path:
    """root/data: a char-tokenized dataset prepared by lmforge itself from generated .txt files."""
    from lmforge.data.prepare import prepare

    rng = np.random.default_rng(seed)
    words = ["the", "cat", "sat", "on", "a", "mat", "and", "dog", "ran", "to", "it", "was", "red", "big"]
    corpus = root / "corpus"
    corpus.mkdir(parents=True, exist_ok=True)
    for i in range(documents):
        lines = [" ".join(rng.choice(words, size=12)) + "." for _ in range(20)]
        (corpus / f"doc{i:03d}.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
    prepare([str(corpus)], str(root / "data"), tokenizer="char", split=(0.8, 0.1, 0.1), workers=1, progress=False)
    return root / "data"


def cli_command(data: Path, run_dir: Path, *extra: object) -> list[str]:
    """`python -m lmforge.cli train` of a tiny model on `data`, one CPU thread, no progress bar noise, no plot."""
    return [sys.executable, "-m", "lmforge.cli", "train", "--preset", "tiny", "--data", str(data),
            "--run-dir", str(run_dir), "--device", "cpu", "--train.num_threads", "1", "--train.batch_size", "4",
            "--train.log_interval", "1", "--train.eval_interval", "0", "--train.eval_batches", "1",
            "--optim.warmup_steps", "2", "--train.plot", "false", *map(str, extra)]


def process_env(fault: Optional[str] = None) -> dict[str, str]:
    """The environment of a training subprocess: one thread, quiet, with LMFORGE_FAULT when given."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TQDM_DISABLE": "1", "GLOO_SOCKET_IFNAME": "lo"}
    env.pop("LMFORGE_FAULT", None)
    if fault:
        env["LMFORGE_FAULT"] = fault
    return env


def resumed_copy(full_run: Path, step: int, config: RunConfig) -> Trainer:
    """A Trainer of `config` (train.resume auto) that resumes from `full_run`'s checkpoint of `step`, copied into
    config.train.run_dir, and trains to its end: what a run killed after that checkpoint does when started again."""
    import shutil

    name = f"step-{step:08d}"
    (Path(config.train.run_dir) / "checkpoints").mkdir(parents=True)
    shutil.copytree(Path(full_run) / "checkpoints" / name, Path(config.train.run_dir) / "checkpoints" / name)
    trainer = Trainer(config, progress=False, tensorboard=False)
    trainer.fit()
    return trainer


def step_losses(run_dir: Path) -> dict[int, float]:
    """{step: train loss} from RUN_DIR/metrics.jsonl; a step logged twice (re-run after a resume) keeps its last value."""
    from lmforge.train.metrics import read_metrics

    return {r["step"]: r["loss"] for r in read_metrics(run_dir) if r["kind"] == "train"}
