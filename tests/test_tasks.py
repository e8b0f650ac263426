"""Task data (`lmforge prepare --task sft`) and fine-tuning on it: records in every format, templates, the loss mask,
padding, truncation, bad records, the base model's tokenizer, and a base model fine-tuned end to end (and resumed)."""

from __future__ import annotations

import csv
import json
import random
import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from lmforge.cli import main
from lmforge.data.batches import IGNORE_INDEX, ExampleBatches, Examples, pack_examples, pad_examples
from lmforge.data.tasks import encode_example, load_examples, read_task_manifest
from lmforge.errors import CheckpointError, ConfigError, DataError
from lmforge.model import GPT
from lmforge.tokenizer import Tokenizer, byte_tokenizer
from lmforge.train import Trainer
from lmforge.train.loss import count_labels, cross_entropy_sum
from tiny_training import step_losses, tiny_config, write_prepared_data

BLOCK = 16  # the base model's block_size: examples hold at most 17 tokens by default


def make_base(root: Path, tokenizer: Tokenizer | None = None, **overrides: object) -> Path:
    """A tiny base model (byte tokenizer unless given, block_size 16; config overrides) trained for one step: its
    run directory."""
    data = write_prepared_data(root / "pre", {"train": ["hello world " * 20], "val": ["hello there " * 5],
                                              "test": ["goodbye " * 5]})
    if tokenizer is not None:  # the same ids, another tokenizer file
        sha = tokenizer.save(data / "tokenizer.json")
        manifest = json.loads((data / "manifest.json").read_text())
        manifest["tokenizer"]["sha256"] = sha
        (data / "manifest.json").write_text(json.dumps(manifest))
    config = tiny_config(root / "base", **{"data.path": str(data), "train.max_steps": 1, "model.block_size": BLOCK,
                                           **overrides})
    Trainer(config, progress=False, tensorboard=False).fit()
    return root / "base"


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    return make_base(tmp_path_factory.mktemp("base"))


def reverse_records(n: int, seed: int = 0) -> list[dict]:
    """'abc' -> 'cba': a task a tiny model learns in a few steps."""
    rng = random.Random(seed)
    records = []
    for _ in range(n):
        word = "".join(rng.choice("abcdef") for _ in range(rng.randint(2, 5)))
        records.append({"prompt": word, "completion": word[::-1], "lang": rng.choice(["en", "fr"])})
    return records


def write_jsonl(path: Path, records: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records), encoding="utf-8")
    return path


def write_csv(path: Path, records: list[dict], delimiter: str = ",") -> Path:
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=list(records[0]), delimiter=delimiter)
        writer.writeheader()
        writer.writerows(records)
    return path


def prepare(base: Path, out: Path, *inputs: Path, extra: tuple = ()) -> int:
    return main(["prepare", *map(str, inputs), "--task", "sft", "--tokenizer", str(base), "--out", str(out),
                 *map(str, extra)])


def decoded(out: Path) -> dict[str, list[tuple[str, str, bool]]]:
    """Every split's examples as (prompt text, completion text, ends with the end token)."""
    tok = Tokenizer.load(out / "tokenizer.json")
    result = {}
    for split in ("train", "val", "test"):
        ex = load_examples(out, split)
        rows = []
        for i in range(len(ex)):
            ids = ex.tokens[ex.offsets[i]:ex.offsets[i + 1]].tolist()
            p = int(ex.prompt_lengths[i])
            assert ids[0] == tok.start_id
            rows.append((tok.decode(ids[1:p]), tok.decode(ids[p:]), ids[-1] == tok.end_id))
        result[split] = rows
    return result


def arrays(out: Path) -> dict[str, tuple[np.ndarray, ...]]:
    return {s: (lambda e: (e.tokens, e.offsets, e.prompt_lengths))(load_examples(out, s)) for s in ("train", "val", "test")}


# ------------------------------------------------------------------------------------------------ records
def test_jsonl_csv_tsv_parquet_and_a_folder_give_the_same_examples(base, tmp_path):
    records = reverse_records(30)
    sources = {"jsonl": write_jsonl(tmp_path / "r.jsonl", records), "csv": write_csv(tmp_path / "r.csv", records),
               "tsv": write_csv(tmp_path / "r.tsv", records, "\t")}
    pq.write_table(pa.Table.from_pylist(records), tmp_path / "r.parquet")
    sources["parquet"] = tmp_path / "r.parquet"
    folder = tmp_path / "folder" / "deeper"
    folder.mkdir(parents=True)
    write_jsonl(folder / "a.jsonl", records[:12])  # a folder's files are read in sorted order
    write_csv(folder / "b.csv", records[12:])
    sources["folder"] = tmp_path / "folder"
    for name, src in sources.items():
        assert prepare(base, tmp_path / f"out-{name}", src) == 0, name
    expected = arrays(tmp_path / "out-jsonl")
    for name in sources:
        got = arrays(tmp_path / f"out-{name}")
        for split in expected:
            assert all(np.array_equal(a, b) for a, b in zip(got[split], expected[split])), (name, split)
    examples = decoded(tmp_path / "out-jsonl")
    pairs = {(r["prompt"] + "\n", r["completion"], True) for r in records}  # the default template: "{prompt}\n"
    assert set(sum(examples.values(), [])) == pairs


def test_messages_records_render_with_the_chat_template(base, tmp_path):
    records = [{"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": f"Q{i}?"},
                             {"role": "assistant", "content": f"A{i}."}]} for i in range(6)]
    assert prepare(base, tmp_path / "out", write_jsonl(tmp_path / "chat.jsonl", records),
                   extra=("--max-length", 64)) == 0  # longer than the base's context: prepared, not trained on
    examples = sum(decoded(tmp_path / "out").values(), [])
    assert sorted(examples) == sorted((f"<|system|>\nBe brief.\n<|user|>\nQ{i}?\n<|assistant|>\n", f"A{i}.", True)
                                      for i in range(6))
    manifest = read_task_manifest(tmp_path / "out")
    assert manifest["template"]["chat"] == {"turn": "<|{role}|>\n{content}\n", "reply": "<|assistant|>\n"}


def test_a_template_of_your_own_with_the_prompt_and_another_field(base, tmp_path):
    records = [{"src": r["prompt"], "tgt": r["completion"], "lang": r["lang"]} for r in reverse_records(8)]
    template = "to {lang}: {prompt}="
    assert prepare(base, tmp_path / "out", write_jsonl(tmp_path / "r.jsonl", records),
                   extra=("--template", template, "--prompt-field", "src", "--completion-field", "tgt",
                          "--max-length", 64)) == 0
    examples = sum(decoded(tmp_path / "out").values(), [])
    assert sorted(examples) == sorted((f"to {r['lang']}: {r['src']}=", r["tgt"], True) for r in records)
    manifest = read_task_manifest(tmp_path / "out")
    assert manifest["template"] == {"name": "custom", "prompt": template, "fields": ["lang", "prompt"],
                                    "chat": manifest["template"]["chat"]}


@pytest.mark.parametrize("template,message", [
    ("{prompt} in {colour}", "uses {colour}, but the record at"),
    ("{prompt", "is malformed"),
    ("{prompt:>10}", "use plain record field names"),
    ("chatty", "unknown template 'chatty': choose plain, instruct"),
])
def test_a_bad_template_is_one_clear_error_even_with_skip_bad(base, tmp_path, capsys, template, message):
    src = write_jsonl(tmp_path / "r.jsonl", reverse_records(5))
    assert prepare(base, tmp_path / "out", src, extra=("--template", template, "--skip-bad")) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0], err
    assert not (tmp_path / "out").exists()


def test_duplicates_are_removed_and_counted_and_leaked_prompts_counted(base, tmp_path):
    records = reverse_records(30)
    records += records[:4]  # 4 exact copies
    records += [{"prompt": "same", "completion": f"answer {i}"} for i in range(12)]  # one prompt, many answers
    distinct = {(r["prompt"], r["completion"]) for r in records}
    assert prepare(base, tmp_path / "out", write_jsonl(tmp_path / "r.jsonl", records),
                   extra=("--split", "0.5,0.25,0.25")) == 0
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert report["duplicates"] == len(records) - len(distinct) >= 4
    examples = decoded(tmp_path / "out")
    assert sum(len(v) for v in examples.values()) == len(distinct)
    train_prompts = {p for p, _, _ in examples["train"]}
    for split in ("val", "test"):
        leaked = sum(p in train_prompts for p, _, _ in examples[split])
        assert report["leakage"][split] == {"examples": len(examples[split]), "leaked": leaked}
    assert report["leakage"]["val"]["leaked"] + report["leakage"]["test"]["leaked"] > 0


# ------------------------------------------------------------------------------------ the loss mask, padding
def hand_examples() -> Examples:
    """Two examples: <S> p p p | c c <E> (prompt_length 4) and <S> p | c <E> (prompt_length 2)."""
    tokens = np.array([0, 10, 11, 12, 20, 21, 1, 0, 13, 22, 1], dtype=np.int32)
    return Examples(tokens, np.array([0, 7, 11], dtype=np.int64), np.array([4, 2], dtype=np.int32))


def test_labels_are_ignored_exactly_on_prompt_targets_and_padding():
    x, y = pad_examples(hand_examples(), np.array([0, 1]), pad_id=2)
    I = IGNORE_INDEX
    assert x.tolist() == [[0, 10, 11, 12, 20, 21], [0, 13, 22, 2, 2, 2]]
    # Position j predicts token j+1: the last prompt token predicts the first completion token, which counts.
    assert y.tolist() == [[I, I, I, 20, 21, 1], [I, 22, 1, I, I, I]]


def test_prompt_targets_carry_no_loss():
    """Changing the prompt's targets changes nothing: whatever the logits at positions that predict a prompt
    token (or padding) are, the loss does not depend on them (zero gradient there), and it equals the
    cross-entropy summed over the completion tokens and the end token alone."""
    torch.manual_seed(0)
    model = GPT(tiny_config(Path("unused"), **{"model.block_size": BLOCK}).model).eval()
    examples = hand_examples()
    x, y = pad_examples(examples, np.array([0, 1]))
    logits = model(x).detach().requires_grad_(True)  # (B, T, V)
    loss = cross_entropy_sum(logits, y)
    loss.backward()
    counted = torch.zeros_like(y, dtype=torch.bool)
    counted[0, 3:6] = True  # completion 20, 21 and <E> of example 0
    counted[1, 1:3] = True  # completion 22 and <E> of example 1
    grad_per_position = logits.grad.abs().sum(-1)  # (B, T)
    assert torch.all(grad_per_position[~counted] == 0) and torch.all(grad_per_position[counted] > 0)
    log_probs = torch.log_softmax(logits.detach().float(), -1)
    targets = {(0, 3): 20, (0, 4): 21, (0, 5): 1, (1, 1): 22, (1, 2): 1}
    reference = -sum(log_probs[r, j, t] for (r, j), t in targets.items())
    torch.testing.assert_close(loss.detach(), reference, rtol=1e-6, atol=1e-5)
    assert count_labels(y) == len(targets)


def test_a_padded_batch_gives_the_loss_of_its_examples_run_one_by_one(base, tmp_path):
    assert prepare(base, tmp_path / "out", write_jsonl(tmp_path / "r.jsonl", reverse_records(40))) == 0
    examples = load_examples(tmp_path / "out", "train")
    index = np.arange(8)
    assert len(set(examples.lengths[index].tolist())) > 1  # the batch really pads
    torch.manual_seed(0)
    model = GPT(tiny_config(Path("unused"), **{"model.block_size": BLOCK, "model.vocab_size": 259}).model).eval()
    with torch.no_grad():
        batch = cross_entropy_sum(model(pad_examples(examples, index)[0]), pad_examples(examples, index)[1])
        alone = sum(cross_entropy_sum(model(x), y) for x, y in (pad_examples(examples, index[i:i + 1]) for i in range(8)))
    torch.testing.assert_close(batch, alone, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("pos_encoding", ["learned", "rope"])
def test_a_packed_row_gives_the_loss_of_its_examples_run_one_by_one(base, tmp_path, pos_encoding):
    """Several examples in one row attend only to themselves and start at position 0: the per-token losses of
    a packed batch equal those of each example alone (a mask that let them see each other, or positions that
    did not restart, would change them)."""
    assert prepare(base, tmp_path / "out", write_jsonl(tmp_path / "r.jsonl", reverse_records(40))) == 0
    examples = load_examples(tmp_path / "out", "train")
    rows = [[0, 1, 2], [3, 4], [5]]
    torch.manual_seed(0)
    config = tiny_config(Path("unused"), **{"model.block_size": 64, "model.vocab_size": 259,
                                            "model.pos_encoding": pos_encoding})
    model = GPT(config.model).eval()
    x, y, ids = pack_examples(examples, rows)
    assert ids.max() == 3 and (ids == 0).any()  # three examples in a row, and padding after the shortest row
    with torch.no_grad():
        packed = torch.nn.functional.cross_entropy(model(x, attention_mask=ids).transpose(1, 2), y, reduction="none")
        for r, row in enumerate(rows):
            alone = torch.cat([torch.nn.functional.cross_entropy(model(xe).transpose(1, 2), ye, reduction="none")[0]
                               for xe, ye in (pad_examples(examples, np.array([e])) for e in row)])
            torch.testing.assert_close(packed[r, :len(alone)], alone, rtol=1e-5, atol=1e-5)
            assert torch.all(packed[r, len(alone):] == 0)  # padding carries no loss


def test_packed_batches_draw_each_example_once_fill_rows_and_resume():
    lengths = [4, 6, 3, 5, 4, 7, 3, 4, 5, 6]  # tokens per example; an example fills length - 1 columns
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    tokens = np.concatenate([[0] + [3 + i] * (n - 2) + [1] for i, n in enumerate(lengths)]).astype(np.int32)
    examples = Examples(tokens, offsets, np.full(10, 2, dtype=np.int32))
    stream = ExampleBatches(examples, 8, 2, seed=3, packing=True)
    seen = []
    while stream.position < 10:
        x, y, ids = stream.next_batch()
        assert x.shape[1] <= 8 and x.shape == y.shape == ids.shape
        for r in range(x.shape[0]):
            starts = [int(c) for c in range(x.shape[1]) if ids[r, c] > 0 and (c == 0 or ids[r, c] != ids[r, c - 1])]
            seen += [int(x[r, c + 1]) - 3 for c in starts]  # the token after <START> names the example
    assert sorted(seen[:10]) == list(range(10))  # the first epoch: each example once, whole
    state = json.loads(json.dumps(stream.state_dict()))
    after = [stream.next_batch() for _ in range(3)]
    again = ExampleBatches(examples, 8, 2, seed=3, packing=True)
    again.load_state_dict(state)
    assert all(torch.equal(a, b) for p, q in zip(after, [again.next_batch() for _ in range(3)]) for a, b in zip(p, q))
    one = ExampleBatches(examples, 8, 4, seed=3, packing=True).next_batch()
    ranks = [ExampleBatches(examples, 8, 2, seed=3, rank=r, world_size=2, packing=True).next_batch() for r in range(2)]
    assert torch.equal(one[2][:2, :ranks[0][2].shape[1]], ranks[0][2])  # rank 0 holds the first rows
    assert torch.equal(one[0][2:, :ranks[1][0].shape[1]], ranks[1][0])  # rank 1 the next ones


def test_example_batches_are_deterministic_resumable_and_split_across_ranks():
    tokens = np.concatenate([[0, 3 + i, 4, 1] for i in range(10)]).astype(np.int32)
    examples = Examples(tokens, np.arange(0, 41, 4, dtype=np.int64), np.full(10, 2, dtype=np.int32))
    a = ExampleBatches(examples, 8, 3, seed=5)
    first = [a.next_batch()[0] for _ in range(4)]  # 12 draws: crosses into a second epoch
    state = json.loads(json.dumps(a.state_dict()))
    after = [a.next_batch()[0] for _ in range(3)]
    b = ExampleBatches(examples, 8, 3, seed=5)
    b.load_state_dict(state)
    assert all(torch.equal(p, q) for p, q in zip(after, [b.next_batch()[0] for _ in range(3)]))
    epoch = torch.cat(first)[:10, 1].tolist()
    assert sorted(epoch) == list(range(3, 13)) and epoch != list(range(3, 13))  # each example once, shuffled
    one = ExampleBatches(examples, 8, 4, seed=5).next_batch()[0]
    ranks = [ExampleBatches(examples, 8, 2, seed=5, rank=r, world_size=2).next_batch()[0] for r in range(2)]
    assert torch.equal(one, torch.cat(ranks))
    with pytest.raises(DataError, match="does not match this run"):
        ExampleBatches(examples, 8, 3, seed=6).load_state_dict(state)
    with pytest.raises(DataError, match="--max-length 3"):
        ExampleBatches(examples, 2, 3)


# ------------------------------------------------------------------------------- truncation, bad records
def test_long_examples_are_truncated_or_dropped_and_counted(base, tmp_path):
    records = reverse_records(24)
    records[3] = {"prompt": "p" * 30 + "END", "completion": "xy"}  # 1 + 34 + 2 + 1 tokens: the prompt loses 21
    records[7] = {"prompt": "q", "completion": "z" * 20}  # even without its prompt the completion does not fit
    src = write_jsonl(tmp_path / "r.jsonl", records)
    assert prepare(base, tmp_path / "cut", src, extra=("--split", "0.5,0.25,0.25")) == 0
    report = json.loads((tmp_path / "cut" / "report.json").read_text())
    assert sum(s["truncated"] for s in report["splits"].values()) == 2
    assert sum(s["dropped"] for s in report["splits"].values()) == 0
    examples = sum(decoded(tmp_path / "cut").values(), [])
    assert ("p" * 9 + "END\n", "xy", True) in examples  # cut from the left: the end of the prompt stays
    assert ("", "z" * 16, False) in examples  # the completion cut from the right: no end token is learned
    assert max(max(load_examples(tmp_path / "cut", s).lengths) for s in ("train", "val", "test")) == BLOCK + 1

    assert prepare(base, tmp_path / "drop", src, extra=("--split", "0.5,0.25,0.25", "--drop-long")) == 0
    report = json.loads((tmp_path / "drop" / "report.json").read_text())
    assert sum(s["dropped"] for s in report["splits"].values()) == 2
    assert sum(s["examples"] for s in report["splits"].values()) == 24 - 2 - report["duplicates"]
    assert not any(c in ("xy", "z" * 20) for _, c, _ in sum(decoded(tmp_path / "drop").values(), []))


def test_an_example_is_start_prompt_completion_end_and_fits_max_length_exactly():
    tok = byte_tokenizer()
    prompt, completion = np.array([10, 11, 12]), np.array([20, 21])
    ids, prompt_length, status = encode_example(tok, prompt, completion, 7, drop_long=True)
    assert ids.tolist() == [0, 10, 11, 12, 20, 21, 1] and prompt_length == 4 and status == "ok"  # 7 tokens fit 7
    ids, prompt_length, status = encode_example(tok, prompt, completion, 6, drop_long=False)
    assert ids.tolist() == [0, 11, 12, 20, 21, 1] and prompt_length == 3 and status == "truncated"
    tok.start_id = None  # as an imported GPT-2 tokenizer: no start token
    ids, prompt_length, status = encode_example(tok, prompt, completion, 7, drop_long=False)
    assert ids.tolist() == [10, 11, 12, 20, 21, 1] and prompt_length == 3 and status == "ok"
    x, y = pad_examples(Examples(ids.astype(np.int32), np.array([0, 6]), np.array([prompt_length])), np.array([0]))
    assert y.tolist() == [[IGNORE_INDEX, IGNORE_INDEX, 20, 21, 1]]


BAD_LINES = [
    json.dumps({"prompt": "ab", "completion": "ba"}),
    json.dumps({"prompt": "cd", "completion": "dc"}),
    '{"prompt": "ef", "completion": ',                     # line 3: broken JSON
    json.dumps({"prompt": "gh", "completion": "hg"}),
    json.dumps({"prompt": "ij"}),                          # line 5: no completion
    json.dumps({"prompt": "kl", "completion": "lk"}),
    json.dumps({"prompt": "mn", "completion": "  "}),      # line 7: empty completion
    json.dumps({"prompt": "op", "completion": 7}),         # line 8: wrong type
    json.dumps({"prompt": "qr", "completion": "rq"}),
]


def test_a_bad_record_is_an_error_naming_file_and_line_and_nothing_is_written(base, tmp_path, capsys):
    src = write_jsonl(tmp_path / "bad.jsonl", BAD_LINES)
    assert prepare(base, tmp_path / "out", src) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"{src}:3: not valid JSON" in err[0] and "--skip-bad" in err[0], err
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out*"))
    rows = [{"prompt": "ab", "completion": "ba"}, {"prompt": "cd", "completion": "dc"}]
    table = write_csv(tmp_path / "bad.csv", rows)
    table.write_text(table.read_text() + "ef,fe,extra\n")
    assert prepare(base, tmp_path / "out", table) == 2
    assert f"{table}:4: 3 fields, the header has 2" in capsys.readouterr().err


def test_skip_bad_counts_and_lists_every_bad_record_by_file_and_line(base, tmp_path):
    src = write_jsonl(tmp_path / "bad.jsonl", BAD_LINES)
    assert prepare(base, tmp_path / "out", src, extra=("--skip-bad",)) == 0
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert report["bad_records"] == 4 and report["records"] == 9
    assert [(b["where"], b["reason"].split(" (")[0]) for b in report["bad"]] == [
        (f"{src}:3", "not valid JSON"), (f"{src}:5", "no field 'completion'"),
        (f"{src}:7", "empty completion"), (f"{src}:8", "field 'completion'")]
    assert sum(s["examples"] for s in report["splits"].values()) == 5


# ------------------------------------------------------------------------------ the base model's tokenizer
@pytest.mark.parametrize("tokenizer", ["bpe", None])
def test_a_fine_tuning_set_refuses_a_new_tokenizer(tmp_path, capsys, tokenizer):
    src = write_jsonl(tmp_path / "r.jsonl", reverse_records(5))
    argv = ["prepare", str(src), "--task", "sft", "--out", str(tmp_path / "out")]
    assert main(argv + (["--tokenizer", tokenizer] if tokenizer else [])) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "refused for a fine-tuning set" in err[0] and "RUN_OR_CHECKPOINT" in err[0], err
    assert not (tmp_path / "out").exists()


def test_training_from_a_base_with_another_tokenizer_is_an_error(base, tmp_path):
    assert prepare(base, tmp_path / "sft", write_jsonl(tmp_path / "r.jsonl", reverse_records(20))) == 0
    other = make_base(tmp_path / "other", byte_tokenizer(("<s>", "</s>", "<pad>")))
    config = tiny_config(tmp_path / "run", **{"data.path": str(tmp_path / "sft"), "train.init_from": str(other)})
    with pytest.raises(CheckpointError, match="was trained with another tokenizer than"):
        Trainer(config, progress=False, tensorboard=False)


# ------------------------------------------------------------------------------------------ end to end
FINE_TUNE = {"train.max_steps": 30, "train.batch_size": 8, "train.save_interval": 15, "train.keep_last": 5,
             "train.eval_interval": 15, "model.dropout": 0.1}


def test_a_base_model_fine_tuned_on_sft_data_learns_and_resumes_exactly(base, tmp_path):
    assert prepare(base, tmp_path / "sft", write_jsonl(tmp_path / "r.jsonl", reverse_records(200)),
                   extra=("--template", "instruct")) == 0
    values = {**FINE_TUNE, "data.path": str(tmp_path / "sft"), "train.init_from": str(base)}
    full = Trainer(tiny_config(tmp_path / "full", **values), progress=False, tensorboard=False)
    full.fit()
    losses = [loss for _, loss in full.history]
    assert losses[-1] < losses[0] - 2.0, losses  # completion tokens only: from ~ln(259) to a few nats less
    state = json.loads((tmp_path / "full" / "checkpoints" / "step-00000030" / "state.json").read_text())
    assert state["task"] == {"task": "sft", "template": read_task_manifest(tmp_path / "sft")["template"]}
    assert state["task"]["template"]["name"] == "instruct"

    (tmp_path / "resumed" / "checkpoints").mkdir(parents=True)
    shutil.copytree(tmp_path / "full" / "checkpoints" / "step-00000015",
                    tmp_path / "resumed" / "checkpoints" / "step-00000015")
    resumed = Trainer(tiny_config(tmp_path / "resumed", **{**values, "train.resume": "auto"}),
                      progress=False, tensorboard=False)
    resumed.fit()
    assert [step for step, _ in resumed.history] == list(range(16, 31))
    assert [loss for _, loss in resumed.history] == [loss for step, loss in full.history if step > 15]  # bit-identical
    assert resumed.val_loss == full.val_loss
    assert step_losses(tmp_path / "resumed")[30] == step_losses(tmp_path / "full")[30]


# ------------------------------------------------------- task metrics during training, best checkpoint, patience
def eval_records(run_dir: Path) -> list[dict]:
    from lmforge.train.metrics import read_metrics

    return [r for r in read_metrics(run_dir) if r["kind"] == "eval"]


def test_task_metrics_by_generation_pick_the_best_checkpoint_and_resume_exactly(base, tmp_path):
    """Every second evaluation generates for a fixed val sample and logs BLEU, chrF, ...; best_metric=val_chrf
    names the checkpoint with the best chrF, whose weights score that chrF; a run resumed mid-way measures the
    same metrics and ends with the same best."""
    from lmforge.checkpoint import best_checkpoint, load_for_inference
    from lmforge.eval.tasks import first_examples, sampled_text_metrics

    assert prepare(base, tmp_path / "sft", write_jsonl(tmp_path / "r.jsonl", reverse_records(200))) == 0
    values = {**FINE_TUNE, "data.path": str(tmp_path / "sft"), "train.init_from": str(base), "train.max_steps": 24,
              "train.eval_interval": 4, "train.save_interval": 4, "train.keep_last": 2, "train.task_eval_every": 2,
              "train.task_eval_examples": 12, "train.best_metric": "val_chrf", "model.dropout": 0.0, "optim.lr": 1e-2}
    summary = Trainer(tiny_config(tmp_path / "run", **values), progress=False, tensorboard=False).fit()
    chrf = {r["step"]: r["val_chrf"] for r in eval_records(tmp_path / "run") if "val_chrf" in r}
    assert sorted(chrf) == [8, 16, 24]  # every second evaluation (8, 16) and the last step
    assert len(set(chrf.values())) == 3  # the metric moves: the checks below can tell steps apart
    assert {"val_bleu", "val_rougeL", "val_exact_match", "val_f1"} <= set(eval_records(tmp_path / "run")[-1])
    best_step = max(chrf, key=lambda s: (chrf[s], -s))  # the first of equals: only a strict improvement counts
    assert summary["best"]["step"] == best_step and summary["best"]["value"] == chrf[best_step]
    best = best_checkpoint(tmp_path / "run")
    assert best is not None and best.name == f"step-{best_step:08d}" and Path(summary["best_checkpoint"]) == best
    model, tokenizer, _ = load_for_inference(best)  # the logged metric is what the saved weights score
    sample = first_examples(load_examples(tmp_path / "sft", "val"), 12)
    assert sampled_text_metrics(model, tokenizer, sample)["val_chrf"] == pytest.approx(chrf[best_step], abs=1e-9)

    (tmp_path / "resumed" / "checkpoints").mkdir(parents=True)
    shutil.copytree(tmp_path / "run" / "checkpoints" / "step-00000020", tmp_path / "resumed" / "checkpoints" / "step-00000020")
    again = Trainer(tiny_config(tmp_path / "resumed", **{**values, "train.resume": "auto"}), progress=False,
                    tensorboard=False).fit()
    assert again["best"] == summary["best"]
    assert [r for r in eval_records(tmp_path / "resumed") if "val_chrf" in r][-1]["val_chrf"] == chrf[24]


def test_pruning_keeps_the_best_checkpoint_by_its_recorded_score(tmp_path):
    """Checkpoints record {'metric', 'value', 'higher_is_better'}: a higher-is-better metric keeps the highest,
    val_loss the lowest; unmeasured ones never count as best; checkpoints without a score fall back to val_loss."""
    from lmforge.checkpoint import best_checkpoint, prune_checkpoints
    from lmforge.files import atomic_write_text

    def make(run: Path, step: int, state: dict) -> None:
        ckpt = run / "checkpoints" / f"step-{step:08d}"
        ckpt.mkdir(parents=True)
        atomic_write_text(ckpt / "state.json", json.dumps(state))
        atomic_write_text(ckpt / "manifest.json", json.dumps({"files": {}}))

    chrf = {1: 10.0, 2: 40.0, 3: None, 4: 30.0, 5: 20.0}
    for step, value in chrf.items():
        make(tmp_path / "up", step, {"score": {"metric": "val_chrf", "value": value, "higher_is_better": True},
                                     "val_loss": float(step)})
    assert best_checkpoint(tmp_path / "up").name == "step-00000002"
    prune_checkpoints(tmp_path / "up", keep_last=1)
    assert sorted(p.name for p in (tmp_path / "up" / "checkpoints").iterdir()) == ["step-00000002", "step-00000005"]
    for step, loss in {1: 3.0, 2: 1.5, 3: 2.0}.items():
        make(tmp_path / "old", step, {"val_loss": loss})
    assert best_checkpoint(tmp_path / "old").name == "step-00000002"


def test_patience_stops_when_the_metric_stops_improving_and_a_resumed_run_stops_at_the_same_step(base, tmp_path):
    """A learning rate far too high makes val loss worse after the first evaluations: with patience 2 the run
    stops 2 evaluations after its best, saves a checkpoint there, and says so; resumed from an earlier checkpoint
    it stops at the same step with the same best."""
    assert prepare(base, tmp_path / "sft", write_jsonl(tmp_path / "r.jsonl", reverse_records(200))) == 0
    values = {**FINE_TUNE, "data.path": str(tmp_path / "sft"), "train.init_from": str(base), "train.max_steps": 60,
              "train.eval_interval": 2, "train.save_interval": 2, "train.keep_last": 60, "train.patience": 2,
              "optim.lr": 0.3, "optim.warmup_steps": 0, "optim.grad_clip": 0.0, "model.dropout": 0.0}
    summary = Trainer(tiny_config(tmp_path / "run", **values), progress=False, tensorboard=False).fit()
    losses = {r["step"]: r["val_loss"] for r in eval_records(tmp_path / "run")}
    assert summary["stopped_by"] == "patience" and summary["steps"] < 60
    best_step = min(losses, key=lambda s: (losses[s], -s))
    assert summary["best"]["step"] == best_step and summary["steps"] == best_step + 2 * 2  # 2 evaluations later
    assert all(losses[s] >= losses[best_step] for s in losses if s > best_step)
    assert (tmp_path / "run" / "checkpoints" / f"step-{summary['steps']:08d}").is_dir()

    (tmp_path / "resumed" / "checkpoints").mkdir(parents=True)
    shutil.copytree(tmp_path / "run" / "checkpoints" / f"step-{best_step:08d}",
                    tmp_path / "resumed" / "checkpoints" / f"step-{best_step:08d}")
    again = Trainer(tiny_config(tmp_path / "resumed", **{**values, "train.resume": "auto"}), progress=False,
                    tensorboard=False).fit()
    assert (again["steps"], again["best"], again["stopped_by"]) == (summary["steps"], summary["best"], "patience")


@pytest.mark.parametrize("values, message", [
    ({"train.best_metric": "val_bleu"}, "set train.task_eval_every"),
    ({"train.best_metric": "val_accuracy"}, "measured on classify data"),
])
def test_a_best_metric_the_data_cannot_measure_is_refused(base, tmp_path, values, message):
    assert prepare(base, tmp_path / "sft", write_jsonl(tmp_path / "r.jsonl", reverse_records(40))) == 0
    config = tiny_config(tmp_path / "run", **{"data.path": str(tmp_path / "sft"), "train.init_from": str(base),
                                              **values})
    with pytest.raises(ConfigError, match=message):
        Trainer(config, progress=False, tensorboard=False)
    assert not (tmp_path / "run").exists()


def test_packed_fine_tuning_learns(base, tmp_path):
    assert prepare(base, tmp_path / "sft", write_jsonl(tmp_path / "r.jsonl", reverse_records(200))) == 0
    values = {**FINE_TUNE, "data.path": str(tmp_path / "sft"), "train.init_from": str(base), "data.packing": "true",
              "model.block_size": BLOCK}
    run = Trainer(tiny_config(tmp_path / "packed", **values), progress=False, tensorboard=False)
    run.fit()
    losses = [loss for _, loss in run.history]
    assert losses[-1] < losses[0] - 2.0, losses


def test_a_tiny_text_to_text_model_beats_the_copy_baseline_in_bleu(base, tmp_path):
    """A class letter at the end of the prompt names one of four 4-word answers: after fine-tuning, `lmforge eval`
    scores the model's greedy answers on val above copying the input (which shares no word with any answer)."""
    from lmforge.eval.metrics import text_metrics

    answers = {"a": "p q r s", "b": "s r q p", "c": "q p s r", "d": "r s p q"}
    rng = random.Random(0)
    records = [{"prompt": f"{rng.randint(0, 99)}{k}", "completion": answers[k]}
               for k in (rng.choice("abcd") for _ in range(300))]
    assert prepare(base, tmp_path / "sft", write_jsonl(tmp_path / "r.jsonl", records)) == 0
    values = {**FINE_TUNE, "data.path": str(tmp_path / "sft"), "train.init_from": str(base), "train.max_steps": 120,
              "train.eval_interval": 0, "train.save_interval": 0, "model.dropout": 0.0}
    Trainer(tiny_config(tmp_path / "run", **values), progress=False, tensorboard=False).fit()
    assert main(["eval", str(tmp_path / "run"), "--split", "val", "--device", "cpu"]) == 0
    rows = [json.loads(line) for line in (tmp_path / "run" / "eval" / "val" / "predictions.jsonl").open()]
    model = json.loads((tmp_path / "run" / "eval" / "val" / "metrics.json").read_text())
    copy = text_metrics([r["input"] for r in rows], [r["reference"] for r in rows])
    assert model["bleu"] > copy["bleu"] + 3.0, (model["bleu"], copy["bleu"])
