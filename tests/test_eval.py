"""Evaluation: loss / perplexity / bits per byte are deterministic, batch-size independent and right."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from lmforge.eval import bits_per_byte, evaluate_checkpoint, evaluate_tokens
from lmforge.model import GPT
from lmforge.train import Trainer
from tiny_training import synthetic_tokens, tiny_config, write_prepared_data

TEXTS = {
    "train": [f"the cat sat on mat number {i}, and the dog ran." for i in range(60)],
    "val": [f"a dog sat on mat {i}; the cat ran — naïve café." for i in range(8)],
}


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
    """A tiny model trained from a prepared data directory (byte tokenizer, vocabulary from the manifest)."""
    root = tmp_path_factory.mktemp("eval")
    data = write_prepared_data(root / "data", TEXTS)
    config = tiny_config(root / "run", **{"data.path": str(data), "model.vocab_size": 7, "train.max_steps": 8,
                                          "train.eval_interval": 4})
    summary = Trainer(config, progress=False, tensorboard=False).fit()
    return root, data, summary


def test_train_reads_vocab_and_tokenizer_from_prepared_data(trained_run):
    root, _, summary = trained_run
    import json

    state = json.loads((root / "run" / "checkpoints" / "step-00000008" / "state.json").read_text())
    assert state["config"]["model"]["vocab_size"] == 259  # the byte tokenizer's, not the 7 asked for
    assert state["tokenizer_sha256"] is not None
    assert summary["val_loss"] is not None and math.isfinite(summary["val_loss"])


def test_evaluate_tokens_is_exact_and_batch_independent():
    torch.manual_seed(0)
    model = GPT(tiny_config(".").model)
    tokens = synthetic_tokens(16 * 5 + 7)  # five full windows and a shorter last one
    a = evaluate_tokens(model, tokens, 16, batch_size=2)
    assert evaluate_tokens(model, tokens, 16, batch_size=2) == a  # deterministic
    b = evaluate_tokens(model, tokens, 16, batch_size=7)
    assert a["tokens"] == b["tokens"] == len(tokens) - 1
    assert b["loss"] == pytest.approx(a["loss"], rel=1e-6)
    # by hand: every token after the first predicted once from its window
    ids = torch.from_numpy(tokens.astype(np.int64))
    total = 0.0
    with torch.no_grad():
        for s in range(0, len(ids) - 1, 16):
            w = ids[s:s + 17]
            total += F.cross_entropy(model(w[None, :-1])[0], w[1:], reduction="sum").item()
    assert a["loss"] == pytest.approx(total / (len(ids) - 1), rel=1e-6)
    assert a["perplexity"] == pytest.approx(math.exp(a["loss"]))


def test_bits_per_byte_formula():
    assert bits_per_byte(100 * math.log(2), 50) == pytest.approx(2.0)


def test_evaluate_checkpoint_whole_split_and_max_tokens(trained_run):
    root, data, _ = trained_run
    whole = evaluate_checkpoint(root / "run", split="val", batch_size=4, device="cpu")
    again = evaluate_checkpoint(root / "run", data_dir=data, split="val", batch_size=3, device="cpu")
    assert whole["loss"] == pytest.approx(again["loss"], rel=1e-6)
    val_bytes = sum(len(t.encode("utf-8")) for t in TEXTS["val"])
    assert whole["bytes"] == val_bytes
    # byte tokenizer: predicted tokens = bytes + START/END markers, so bpb relates to loss by that ratio
    assert whole["bits_per_byte"] == pytest.approx(whole["loss"] * whole["tokens"] / (math.log(2) * val_bytes))
    part = evaluate_checkpoint(root / "run", split="val", max_tokens=100, device="cpu")
    assert part["tokens"] == 99
    assert 0 < part["bytes"] <= 99  # decoded from the evaluated tokens


def test_evaluate_checkpoint_errors_are_one_line(trained_run, tmp_path):
    from lmforge.errors import LmforgeError

    root, _, _ = trained_run
    with pytest.raises(LmforgeError) as info:
        evaluate_checkpoint(root / "run", data_dir=tmp_path, device="cpu")
    assert "manifest.json" in str(info.value) and "\n" not in str(info.value)


def test_byte_count_adds_up_over_chunks():
    from lmforge.eval.perplexity import predicted_bytes
    from lmforge.tokenizer import byte_tokenizer

    tok = byte_tokenizer()
    text = "naïve café — 東京 " * 50
    tokens = np.asarray([tok.start_id, *tok.encode(text), tok.end_id], dtype=np.uint16)
    expected = len(text.encode("utf-8"))
    assert predicted_bytes(tok, tokens) == predicted_bytes(tok, tokens, chunk=7) == expected
