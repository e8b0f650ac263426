"""Embedding init from word vectors: GloVe mapping and coverage, bad files, word2vec cache and determinism."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from lmforge.data.embeddings import init_embeddings
from lmforge.errors import DataError


class WordTokenizer:
    """A stand-in with the Tokenizer interface the embedding init uses: ids 0-2 special, then pieces."""

    kind = "bpe"

    def __init__(self, pieces: list[str]):
        self.pieces = ["<START>", "<END>", "<PAD>", *pieces]
        self.start_id, self.end_id, self.pad_id = 0, 1, 2
        self.vocab_size = len(self.pieces)

    def decode(self, ids, skip_special=True):
        return "".join(self.pieces[i] for i in ids if not (skip_special and i < 3))


PIECES = ["the", " cat", "Dog", "zebra", "!", " "]  # ids 3..8
GLOVE = {"the": [1.0, 2.0, 3.0, 4.0], "cat": [0.5, -1.0, 2.0, 0.0], "dog": [-3.0, 1.0, 0.0, 2.0],
         "!": [0.0, 0.0, 1.0, -1.0], "unused": [9.0, 9.0, 9.0, 9.0]}


def write_glove(path: Path, table: dict[str, list[float]], header: str | None = None) -> Path:
    lines = [header] if header else []
    lines += [w + " " + " ".join(f"{x:.6f}" for x in v) for w, v in table.items()]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def fresh_weight(vocab: int, dim: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(vocab, dim, generator=g) * 0.02


def test_glove_maps_words_to_the_right_rows_and_reports_coverage(tmp_path):
    tok = WordTokenizer(PIECES)
    path = write_glove(tmp_path / "g.txt", GLOVE)
    weight = fresh_weight(tok.vocab_size, 4)
    before = weight.clone()
    report = init_embeddings(weight, f"glove:{path}", str(tmp_path), tok, seed=0)

    # "the" exact, " cat" stripped, "Dog" lower-cased, "!" exact; "zebra", " " and the specials untouched.
    rows = {3: "the", 4: "cat", 5: "dog", 7: "!"}
    assert report["rows_initialised"] == 4
    assert report["coverage"] == pytest.approx(4 / 9)
    assert report["source"] == f"glove:{path}"
    for untouched in (0, 1, 2, 6, 8):
        assert torch.equal(weight[untouched], before[untouched])
    # Rows hold the file's vectors, centred and scaled by one common factor to the init's std.
    v = np.array([GLOVE[w] for w in rows.values()], dtype=np.float64)
    v -= v.mean(axis=0)
    got = weight[list(rows)].double().numpy()
    scale = got[0, 0] / v[0, 0]
    np.testing.assert_allclose(got, v * scale, rtol=1e-5, atol=1e-7)
    assert float(np.std(got)) == pytest.approx(float(before.std()), rel=1e-4)


def test_glove_words_with_spaces_are_read(tmp_path):
    tok = WordTokenizer(["new york", "the"])
    path = tmp_path / "g.txt"
    path.write_text("the 1 2 3 4\nnew york 4 3 2 1\n", encoding="utf-8")
    report = init_embeddings(fresh_weight(tok.vocab_size, 4), f"glove:{path}", str(tmp_path), tok, seed=0)
    assert report["rows_initialised"] == 2


def test_glove_accepts_a_word2vec_header_line(tmp_path):
    tok = WordTokenizer(PIECES)
    path = write_glove(tmp_path / "g.txt", GLOVE, header="5 4")
    report = init_embeddings(fresh_weight(tok.vocab_size, 4), f"glove:{path}", str(tmp_path), tok, seed=0)
    assert report["rows_initialised"] == 4


def test_none_leaves_the_weight_alone(tmp_path):
    tok = WordTokenizer(PIECES)
    weight = fresh_weight(tok.vocab_size, 4)
    before = weight.clone()
    report = init_embeddings(weight, "none", str(tmp_path), tok, seed=0)
    assert report["coverage"] == 0.0 and torch.equal(weight, before)


@pytest.mark.parametrize("content, message", [
    (None, "does not exist"),
    ("", "is empty"),
    ("the 1 2 3 4\ncat 1 2 3\n", "line 2 has 3 numbers but the first vector has 4"),
    ("the 1 2 3 4\ncat 1 2 3 4 5\n", "line 2 has 5 numbers but the first vector has 4"),
    ("the 1 2 x 4\n", "line 1 has 'x' where a number belongs"),
    ("the 1 2 3 4 5 6\n", "has 6-dimensional vectors but model.n_embd=4; set model.n_embd=6"),
    ("8 6\nthe 1 2 3 4 5 6\n", "has 6-dimensional vectors but model.n_embd=4"),
    ("apple 1 2 3 4\n", "matches a word"),
])
def test_bad_glove_files_raise_one_clear_line_and_leave_the_weight(tmp_path, content, message):
    tok = WordTokenizer(PIECES)
    path = tmp_path / "g.txt"
    if content is not None:
        path.write_text(content, encoding="utf-8")
    weight = fresh_weight(tok.vocab_size, 4)
    before = weight.clone()
    with pytest.raises(DataError) as info:
        init_embeddings(weight, f"glove:{path}", str(tmp_path), tok, seed=0)
    text = str(info.value)
    assert message in text and str(path) in text and "\n" not in text
    assert torch.equal(weight, before)


def test_glove_file_that_is_not_utf8(tmp_path):
    tok = WordTokenizer(PIECES)
    path = tmp_path / "g.bin"
    path.write_bytes(b"\xff\xfe\x00the 1 2 3 4\n")
    with pytest.raises(DataError, match="not UTF-8"):
        init_embeddings(fresh_weight(tok.vocab_size, 4), f"glove:{path}", str(tmp_path), tok, seed=0)


# ------------------------------------------------------------------------------------------- word2vec
@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """Forty small documents (one per file) of a few dozen distinct characters."""
    root = tmp_path_factory.mktemp("corpus")
    rng = np.random.default_rng(0)
    words = ["the", "cat", "sat", "on", "mat", "dog", "ran", "far", "away", "quick", "brown", "fox"]
    for i in range(40):
        text = " ".join(rng.choice(words, size=int(rng.integers(30, 80)))) + ".\n"
        (root / f"doc{i:02d}.txt").write_text(text, encoding="utf-8")
    return root


@pytest.fixture
def prepared(corpus, tmp_path):
    """A char-tokenized prepared dataset (the real `lmforge prepare`) and its Tokenizer."""
    pytest.importorskip("gensim")
    from lmforge.data.prepare import prepare
    from lmforge.tokenizer import Tokenizer

    data_dir = tmp_path / "data"
    prepare([str(corpus)], str(data_dir), tokenizer="char", progress=False)
    return data_dir, Tokenizer.load(data_dir / "tokenizer.json")


def train_token_ids(data_dir: Path, tok) -> list[int]:
    from lmforge.data.shards import load_split

    seen = set(np.unique(np.asarray(load_split(data_dir, "train"))).tolist())
    return sorted(seen - {tok.start_id, tok.end_id, tok.pad_id})


def test_word2vec_is_cached_beside_the_shards_without_pickle(prepared):
    data_dir, tok = prepared
    rows = train_token_ids(data_dir, tok)
    assert len(rows) >= 10
    weight = fresh_weight(tok.vocab_size, 8)
    before = weight.clone()
    report = init_embeddings(weight, "word2vec", str(data_dir), tok, seed=3)
    assert report["rows_initialised"] == len(rows)
    assert report["coverage"] == pytest.approx(len(rows) / tok.vocab_size)
    assert report["cached"] is False
    npy = Path(report["cache"])
    assert npy.parent == data_dir and npy.name.startswith("word2vec-8-") and npy.suffix == ".npy"
    meta = json.loads(npy.with_suffix(".json").read_text())
    assert meta["rows"] == rows
    table = np.load(npy, allow_pickle=False)
    assert table.shape == (tok.vocab_size, 8) and table.dtype == np.float32
    untouched = sorted(set(range(tok.vocab_size)) - set(rows))  # specials and ids absent from train
    assert {tok.start_id, tok.end_id, tok.pad_id} <= set(untouched)
    assert torch.equal(weight[untouched], before[untouched])
    assert not torch.equal(weight[rows], before[rows])

    again = fresh_weight(tok.vocab_size, 8)
    report2 = init_embeddings(again, "word2vec", str(data_dir), tok, seed=3)
    assert report2["cached"] is True and report2["cache"] == report["cache"]
    assert torch.equal(again, weight)


def test_word2vec_is_deterministic_and_depends_on_the_seed(prepared):
    data_dir, tok = prepared
    first = fresh_weight(tok.vocab_size, 8)
    report = init_embeddings(first, "word2vec", str(data_dir), tok, seed=3)
    for p in data_dir.glob("word2vec-*"):
        p.unlink()  # train again from scratch
    second = fresh_weight(tok.vocab_size, 8)
    init_embeddings(second, "word2vec", str(data_dir), tok, seed=3)
    assert torch.equal(first, second)
    other = fresh_weight(tok.vocab_size, 8)
    report3 = init_embeddings(other, "word2vec", str(data_dir), tok, seed=4)
    assert report3["cache"] != report["cache"] and not torch.equal(other, first)


def test_a_damaged_word2vec_cache_is_rebuilt(prepared):
    data_dir, tok = prepared
    first = fresh_weight(tok.vocab_size, 8)
    report = init_embeddings(first, "word2vec", str(data_dir), tok, seed=3)
    Path(report["cache"]).write_bytes(b"not an array")
    second = fresh_weight(tok.vocab_size, 8)
    report2 = init_embeddings(second, "word2vec", str(data_dir), tok, seed=3)
    assert report2["cached"] is False and torch.equal(first, second)


def test_glove_on_a_real_char_tokenizer(prepared, tmp_path):
    data_dir, tok = prepared
    letters = "abcdefghijklmnopqrstuvwxyz"
    rng = np.random.default_rng(1)
    path = write_glove(tmp_path / "chars.txt", {c: list(rng.normal(size=8)) for c in letters})
    weight = fresh_weight(tok.vocab_size, 8)
    report = init_embeddings(weight, f"glove:{path}", str(data_dir), tok, seed=0)
    # exact or lower-cased match; byte-fallback ids decode to the same letters and match too
    in_vocab = [i for i in range(tok.vocab_size) if tok.decode([i]).strip().lower() in set(letters)]
    assert report["rows_initialised"] == len(in_vocab) > 0


def test_train_starts_from_the_word_vectors(prepared, tmp_path):
    """`data.embedding_init` reaches the model the trainer builds: covered rows hold the vectors (up to the
    centring and scaling), other rows keep their random init, and the report is kept on the trainer."""
    from lmforge.config import load_run_config
    from lmforge.train import Trainer

    data_dir, tok = prepared
    letters = "abcdefghijklmnopqrstuvwxyz"
    rng = np.random.default_rng(2)
    path = write_glove(tmp_path / "chars.txt", {c: list(rng.normal(size=32)) for c in letters})

    def trainer(spec: str) -> Trainer:
        config = load_run_config(None, {"preset": "tiny", "data.path": str(data_dir), "data.embedding_init": spec,
                                        "train.run_dir": str(tmp_path / spec.replace(":", "_").replace("/", "_")),
                                        "train.device": "cpu", "train.max_steps": "1"})
        return Trainer(config, progress=False, tensorboard=False)

    plain, glove = trainer("none"), trainer(f"glove:{path}")
    assert plain.embedding_report is None
    report = glove.embedding_report
    assert report is not None and report["rows_initialised"] > 0 and report["coverage"] == pytest.approx(
        report["rows_initialised"] / tok.vocab_size)
    a, b = plain.raw_model.tok_emb.weight.detach(), glove.raw_model.tok_emb.weight.detach()
    changed = (a != b).any(dim=1)
    assert int(changed.sum()) == report["rows_initialised"]  # the same seed: only covered rows differ
    row = tok.encode("e")[0]
    assert changed[row]


def test_glove_prefers_the_exact_word_then_stripped_then_lower_cased_and_the_first_of_a_repeated_word(tmp_path):
    """'Dog' takes the vector of 'Dog' although 'dog' is there too; 'Cat ' takes 'Cat' (stripped) before 'cat'
    (lower-cased); 'the' listed twice takes its first line (as gensim reads a word2vec file)."""
    tok = WordTokenizer(["Dog", "Cat ", "the"])  # ids 3, 4, 5
    lines = [("dog", [9.0, 0.0, 0.0, 1.0]), ("Dog", [1.0, 2.0, 0.0, 0.0]), ("cat", [0.0, 0.0, 9.0, 2.0]),
             ("Cat", [0.0, 3.0, 1.0, 0.0]), ("the", [2.0, 0.0, 0.0, 5.0]), ("the", [-4.0, 7.0, 7.0, -4.0])]
    path = tmp_path / "g.txt"
    path.write_text("".join(w + " " + " ".join(f"{x:.1f}" for x in v) + "\n" for w, v in lines), encoding="utf-8")
    weight = fresh_weight(tok.vocab_size, 4)
    report = init_embeddings(weight, f"glove:{path}", str(tmp_path), tok, seed=0)
    assert report["rows_initialised"] == 3
    v = np.array([[1.0, 2.0, 0.0, 0.0], [0.0, 3.0, 1.0, 0.0], [2.0, 0.0, 0.0, 5.0]])  # Dog, Cat, the (first)
    v -= v.mean(axis=0)
    got = weight[[3, 4, 5]].double().numpy()
    np.testing.assert_allclose(got, v * ((got * v).sum() / (v * v).sum()), rtol=1e-5, atol=1e-7)  # one factor


def test_word2vec_sentences_are_the_documents_between_start_and_end_without_special_tokens():
    """Each document of the train split is one word2vec sentence (words never pair across a document boundary);
    the prefix of max_tokens tokens is what is read."""
    from lmforge.data.embeddings import _documents

    tok = WordTokenizer(PIECES)  # 0 start, 1 end, 2 pad
    tokens = np.array([0, 5, 6, 1, 0, 7, 2, 1, 0, 8, 3, 1], dtype=np.uint16)
    assert _documents(tokens, tok, max_tokens=100) == [["5", "6"], ["7"], ["8", "3"]]
    assert _documents(tokens, tok, max_tokens=6) == [["5", "6"], ["7"]]
