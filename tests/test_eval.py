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


@pytest.mark.parametrize("stride", [32, 16, 5, 1])
def test_strided_perplexity_is_hugging_faces_sliding_window_loop(stride):
    """Hugging Face's "perplexity of fixed-length models" loop, on GPT2LMHeadModel with the same (sharp) weights:
    windows of max_length = block_size + 1 tokens every `stride`, labels -100 but for the last end - prev_end; the
    summed NLL over the counted labels equals lmforge's, every token after the first counted once."""
    transformers = pytest.importorskip("transformers")
    from lmforge.config import ModelConfig
    from lmforge.interop.hf_gpt2 import to_hf_config, to_hf_state_dict
    from sharp_attention import sharpen

    block = 32
    config = ModelConfig(vocab_size=50, block_size=block, n_layer=2, n_head=2, n_embd=32, activation="gelu_tanh")
    torch.manual_seed(0)
    ours = sharpen(GPT(config)).eval()
    state = to_hf_state_dict(ours.state_dict(), config)  # one more position: HF's window holds the last label too,
    state["transformer.wpe.weight"] = torch.cat([state["transformer.wpe.weight"], torch.zeros(1, 32)])  # unread
    theirs = transformers.GPT2LMHeadModel(transformers.GPT2Config(**{**to_hf_config(config), "n_positions": block + 1}))
    theirs.load_state_dict(state, strict=True)
    theirs.eval()
    tokens = np.random.default_rng(0).integers(0, 50, 200)
    ids = torch.from_numpy(tokens)[None]
    nll, counted, prev_end = 0.0, 0, 0
    with torch.no_grad():
        for begin in range(0, ids.size(1), stride):
            end = min(begin + block + 1, ids.size(1))
            target = ids[:, begin:end].clone()
            target[:, :-(end - prev_end)] = -100
            n = int((target[:, 1:] != -100).sum())
            nll += theirs(ids[:, begin:end], labels=target).loss.item() * n
            counted += n
            prev_end = end
            if end == ids.size(1):
                break
    got = evaluate_tokens(ours, tokens, block, batch_size=3, stride=stride)
    assert got["tokens"] == counted == len(tokens) - 1
    assert got["loss_sum"] == pytest.approx(nll, rel=1e-5)
    assert evaluate_tokens(ours, tokens, block, batch_size=1, stride=stride)["loss_sum"] == pytest.approx(nll, rel=1e-5)
    if stride == block:
        assert evaluate_tokens(ours, tokens, block, batch_size=3) == got  # the default: no overlap


def test_eval_of_text_files_encodes_them_as_training_documents_and_bad_input_is_one_line(trained_run, tmp_path,
                                                                                          capsys):
    import json

    from lmforge.cli import main
    from lmforge.tokenizer import byte_tokenizer

    root, _, _ = trained_run
    text = "the cat sat on mat 3; a dog ran.\nnaïve café\n"
    (tmp_path / "held_out.txt").write_text(text, encoding="utf-8")
    assert main(["eval", str(root / "run"), "--text", str(tmp_path / "held_out.txt"), "--stride", "8",
                 "--no-progress"]) == 0
    got = json.loads(capsys.readouterr().out)
    tok = byte_tokenizer()
    tokens = np.asarray([tok.start_id, *tok.encode(text), tok.end_id])
    from lmforge.checkpoint import load_for_inference

    model, _, config = load_for_inference(root / "run", "cpu")
    want = evaluate_tokens(model, tokens, config.model.block_size, stride=8)
    assert got["loss"] == pytest.approx(want["loss"], rel=1e-6) and got["tokens"] == len(tokens) - 1
    assert got["bytes"] == len(text.encode("utf-8")) and got["stride"] == 8 and got["text"] == [
        str(tmp_path / "held_out.txt")]
    (tmp_path / "blob.bin.txt").write_bytes(b"\x00\x01binary\x00" * 20)
    for flags, words in [
        (["--text", str(tmp_path / "missing.txt")], "missing.txt"),
        (["--text", str(tmp_path / "blob.bin.txt")], "holds no text to evaluate"),
        (["--text", str(tmp_path / "held_out.txt"), "--split", "test"], "--text evaluates text files"),
        (["--stride", "0"], "--stride 0 is invalid"),
        (["--stride", "999"], "stride 999 is invalid: use 1 to block_size"),
    ]:
        assert main(["eval", str(root / "run"), *flags, "--no-progress"]) == 2, flags
        err = capsys.readouterr().err.strip()
        assert words in err and "\n" not in err, (flags, err)


def test_byte_count_leaves_out_the_first_token_which_nothing_predicts():
    """Without a start token (an imported GPT-2 tokenizer has none) the first token is text, and it is not
    predicted: bits per byte divides by the bytes of tokens[1:] only."""
    from lmforge.eval.perplexity import predicted_bytes
    from lmforge.tokenizer import byte_tokenizer

    tok = byte_tokenizer()
    text = "héllo wörld"
    tokens = np.asarray(tok.encode(text), dtype=np.uint16)
    expected = len(text.encode("utf-8")) - 1  # 'h' is the first token
    assert predicted_bytes(tok, tokens) == predicted_bytes(tok, tokens, chunk=3) == expected
