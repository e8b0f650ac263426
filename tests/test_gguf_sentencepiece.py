"""SentencePiece vocabularies in GGUF (tokenizer model "llama": Llama 2, TinyLlama, Mistral): an imported
SentencePiece-style model exports with scores that make llama.cpp merge in the BPE's order, the merges themselves,
byte/control/unknown token types and add_space_prefix; a "llama" vocabulary imports as a BPE that cuts text as
llama.cpp does, with the file's merges or, without them, the merges its scores imply."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
from test_gguf_export import fields  # noqa: E402
from test_gguf_import import rewrite  # noqa: E402
from test_interop import CORPUS, max_diff  # noqa: E402
from test_sentencepiece import STYLES, TEXTS, hf_dirs, runs, single_start  # noqa: E402,F401  (module fixtures)

gguf = pytest.importorskip("gguf")
transformers = pytest.importorskip("transformers")

from lmforge.checkpoint import load_for_inference  # noqa: E402
from lmforge.generate import prompt_ids  # noqa: E402
from lmforge.interop.gguf_export import export_gguf  # noqa: E402
from lmforge.interop.gguf_import import import_gguf  # noqa: E402
from lmforge.tokenizer import Tokenizer  # noqa: E402

LINES = [line for text in CORPUS[:3] for line in text.split("。")] + ["The lazy dog jumps over the quick brown fox"]
PREFIX = {"llama": True, "llama2-legacy": True, "gemma": False}


@pytest.fixture(scope="module")
def exports(runs, tmp_path_factory) -> dict[str, Path]:  # noqa: F811
    root = tmp_path_factory.mktemp("gguf")
    return {style: export_gguf(runs[style], root / f"{style}.gguf") for style in STYLES}


def imported(path: Path, out: Path) -> Tokenizer:
    return Tokenizer.load(import_gguf(path, out) / "tokenizer.json")


def leading_space(text: str) -> bool:
    """A text transformers' Metaspace ("first") and llama.cpp's SentencePiece rule cut differently: its first
    word's own space becomes the prefix in one, a second U+2581 in the other."""
    return text.startswith((" ", "\u2581", "<s>"))


@pytest.mark.parametrize("style", STYLES)
def test_the_vocabulary_is_written_as_sentencepiece_with_scores_in_merge_order(hf_dirs, exports, style):  # noqa: F811
    meta = fields(exports[style])
    spec = transformers.AutoTokenizer.from_pretrained(hf_dirs[style]).backend_tokenizer
    vocab = spec.get_vocab()
    tokens, types, scores = meta["tokenizer.ggml.tokens"], meta["tokenizer.ggml.token_type"], \
        meta["tokenizer.ggml.scores"]
    assert (meta["tokenizer.ggml.model"], meta["tokenizer.ggml.add_space_prefix"]) == ("llama", PREFIX[style])
    assert tokens == sorted(vocab, key=vocab.get) and meta["tokenizer.ggml.add_bos_token"] is True
    kinds = {i: t for i, t in enumerate(types) if t != gguf.TokenType.NORMAL}
    assert kinds == {0: gguf.TokenType.UNKNOWN, 1: gguf.TokenType.CONTROL, 2: gguf.TokenType.CONTROL,
                     **{3 + b: gguf.TokenType.BYTE for b in range(256)}}
    import json

    merges = json.loads(spec.to_str())["model"]["merges"]
    assert meta["tokenizer.ggml.merges"] == [" ".join(m) for m in merges]
    ranks = [scores[vocab["".join(m)]] for m in merges]  # the token each merge makes: minus its first merge's rank
    firsts = {}
    for rank, m in enumerate(merges):
        firsts.setdefault("".join(m), rank)
    assert ranks == [-float(firsts["".join(m)]) for m in merges] and len(merges) > 50


@pytest.mark.parametrize("style", ["llama", "llama2-legacy"])
def test_transformers_gguf_reader_gets_the_same_ids_and_logits(hf_dirs, runs, exports, style):  # noqa: F811
    theirs = transformers.AutoTokenizer.from_pretrained(exports[style].parent, gguf_file=exports[style].name)
    original = transformers.AutoTokenizer.from_pretrained(hf_dirs[style])
    for text in [*TEXTS, *LINES]:
        if not leading_space(text):  # transformers reads every "llama" vocabulary with Metaspace ("first")
            assert theirs(text).input_ids == original(text).input_ids, text
    model = transformers.AutoModelForCausalLM.from_pretrained(exports[style].parent,
                                                              gguf_file=exports[style].name).eval()
    ours, _, _ = load_for_inference(runs[style], "cpu")
    import torch

    assert max_diff(ours, model, torch.randint(0, model.config.vocab_size, (2, 30))) <= 1e-4


@pytest.mark.parametrize("style", STYLES)
def test_import_cuts_text_as_llama_cpp_does_and_decodes_as_the_original(hf_dirs, exports, style,  # noqa: F811
                                                                         tmp_path):
    back = imported(exports[style], tmp_path / "back")
    original = transformers.AutoTokenizer.from_pretrained(hf_dirs[style])
    assert back.kind == "hf" and back.start_id == 1 and back.strips_leading_space == int(PREFIX[style])
    for text in [*TEXTS, *LINES]:
        ids = original(text).input_ids
        if style != "llama" or not leading_space(text):  # llama.cpp's rule is Llama 2's own (prepend, then spaces)
            assert prompt_ids(back, text) == single_start(ids), text
        assert back.decode(ids) == original.decode(ids, skip_special_tokens=True), text
    # a text beginning with a space: llama.cpp (and so the import) writes its prefix and then the space
    legacy = transformers.AutoTokenizer.from_pretrained(hf_dirs["llama2-legacy"])
    assert prompt_ids(back, " a leading space") == legacy(" a leading space").input_ids or style == "gemma"


@pytest.mark.parametrize("style", ["llama2-legacy", "gemma"])
def test_a_file_with_scores_only_imports_the_merges_its_scores_imply(exports, style, tmp_path):
    """Files converted from SentencePiece models carry scores, not merges: the merges are rebuilt from them."""
    bare = rewrite(exports[style], tmp_path / "bare.gguf", {}, drop=("tokenizer.ggml.merges",))
    assert "tokenizer.ggml.merges" not in fields(bare)
    with_merges, scores_only = imported(exports[style], tmp_path / "a"), imported(bare, tmp_path / "b")
    texts = [*TEXTS, *LINES, " ".join(LINES)]
    assert [scores_only.encode(t) for t in texts] == [with_merges.encode(t) for t in texts]
    assert len({len(scores_only.encode(t)) for t in LINES}) > 1  # merged: words, not characters
    assert sum(map(len, (scores_only.encode(t) for t in LINES))) < sum(len(t) for t in LINES) / 2


def test_the_char_tokenizer_lmforge_exports_still_comes_back_as_itself(tmp_path):
    from test_interop import LLAMA_STYLE, lmforge_run
    from lmforge.tokenizer import train_char

    tok = train_char(CORPUS, 300)
    path = export_gguf(lmforge_run(tmp_path, tok, **LLAMA_STYLE), tmp_path / "m.gguf")
    back = imported(path, tmp_path / "back")
    assert back.kind == "char" and [back.encode(t) for t in TEXTS] == [tok.encode(t) for t in TEXTS]
