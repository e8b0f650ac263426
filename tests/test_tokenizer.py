"""Tokenizer: lossless round trip in any script, special-token isolation, save/load, streaming decode."""

import json

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lmforge.errors import TokenizerError
from lmforge.tokenizer import Tokenizer, byte_tokenizer, train_bpe, train_char

TRAIN_TEXTS = [
    "To be, or not to be, that is the question:\nWhether 'tis nobler in the mind to suffer\n",
    "The slings and arrows of outrageous fortune,\r\nOr to take arms against a sea of troubles\n",
    "Les sanglots longs des violons de l'automne. 床前明月光，疑是地上霜。 Привет, мир! 😀🎉",
    "<START> a document that mentions <END> and <PAD> literally <END>",
] * 5

# Any valid str: every code point except lone surrogates (they cannot be written as UTF-8).
ANY_TEXT = st.text(alphabet=st.characters(blacklist_categories=("Cs",)), max_size=200)
SPECIAL_HEAVY = st.lists(st.sampled_from(["<START>", "<END>", "<PAD>", "<", ">", "END", " ", "a", "\n", "é"]),
                         max_size=30).map("".join)


@pytest.fixture(scope="module", params=["char", "byte", "bpe"])
def tok(request):
    if request.param == "char":
        return train_char(TRAIN_TEXTS, vocab_size=300)
    if request.param == "byte":
        return byte_tokenizer()
    return train_bpe(TRAIN_TEXTS, vocab_size=400)


FAST = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


@FAST
@given(text=ANY_TEXT)
def test_round_trip_any_text(tok, text):
    ids = tok.encode(text)
    assert tok.decode(ids) == text
    assert all(3 <= i < tok.vocab_size for i in ids)  # never a special id


@FAST
@given(text=SPECIAL_HEAVY)
def test_special_names_in_text_are_plain_text(tok, text):
    ids = tok.encode(text)
    assert tok.start_id not in ids and tok.end_id not in ids and tok.pad_id not in ids
    assert tok.decode(ids) == text


@FAST
@given(text=ANY_TEXT, cut=st.integers(0, 400))
def test_stream_decoder_equals_decode_on_every_prefix(tok, text, cut):
    ids = [tok.start_id] + tok.encode(text) + [tok.end_id]
    prefix = ids[: cut % (len(ids) + 1)]
    dec = tok.stream_decoder()
    pieces = [dec.push(i) for i in prefix]
    assert "".join(pieces) + dec.flush() == tok.decode(prefix)


def test_special_ids_are_fixed_and_decodable(tok):
    assert (tok.start_id, tok.end_id, tok.pad_id) == (0, 1, 2)
    ids = [0] + tok.encode("hi") + [1, 2]
    assert tok.decode(ids) == "hi"
    assert tok.decode(ids, skip_special=False) == "<START>hi<END><PAD>"


def test_encode_batch_matches_encode(tok):
    texts = ["", "abc", "日本語 text", "<END>"]
    assert tok.encode_batch(texts) == [tok.encode(t) for t in texts]


def test_save_load_round_trip(tok, tmp_path):
    path = tmp_path / "tokenizer.json"
    sha = tok.save(path)
    again = Tokenizer.load(path)
    assert (again.kind, again.vocab_size, again.sha256) == (tok.kind, tok.vocab_size, sha)
    text = "Whether 'tis nobler 月光 <END> 🦄"
    assert again.encode(text) == tok.encode(text)
    assert json.loads(path.read_text())["format"] == "lmforge-tokenizer-v1"


def test_char_vocabulary_and_byte_fallback():
    tok = train_char(["abca"], vocab_size=1000)
    assert tok.vocab_size == 3 + 256 + 3  # specials, bytes, {a, b, c}
    assert tok.encode("cab") == [261, 259, 260]
    assert tok.encode("é") == [3 + 0xC3, 3 + 0xA9]  # unseen character -> its UTF-8 bytes


def test_char_vocab_size_keeps_most_frequent():
    tok = train_char(["aaabbc"], vocab_size=261)
    assert tok.encode("ab") == [259, 260] and len(tok.encode("c")) == 1 and tok.encode("c") == [3 + ord("c")]


def test_custom_special_names():
    tok = byte_tokenizer(("<s>", "</s>", "<pad>"))
    assert tok.decode([0, 1, 2], skip_special=False) == "<s></s><pad>"


def test_bpe_learns_merges_and_respects_vocab_size():
    tok = train_bpe(TRAIN_TEXTS, vocab_size=300)
    assert tok.vocab_size == 300
    assert len(tok.encode("the question")) < len("the question")


def test_load_errors_name_the_file(tmp_path):
    missing = tmp_path / "nope.json"
    with pytest.raises(TokenizerError, match="nope.json does not exist"):
        Tokenizer.load(missing)
    hf_like = tmp_path / "hf.json"
    hf_like.write_text(json.dumps({"model": {}}))
    with pytest.raises(TokenizerError, match="hf.json is not an lmforge tokenizer"):
        Tokenizer.load(hf_like)
    broken = tmp_path / "broken.json"
    broken.write_text("{not json")
    with pytest.raises(TokenizerError, match="broken.json cannot be read as JSON"):
        Tokenizer.load(broken)


def test_decode_rejects_out_of_range_id():
    with pytest.raises(TokenizerError, match="outside the vocabulary"):
        byte_tokenizer().decode([5, 999])


def test_too_small_vocab_is_refused():
    with pytest.raises(TokenizerError, match="vocab_size=100 is too small"):
        train_char(["a"], vocab_size=100)


def test_bpe_refuses_special_names_it_could_learn():
    with pytest.raises(TokenizerError, match=r"special token name 'endoftext' could also be learned"):
        train_bpe(["endoftext and endoftext"] * 20, vocab_size=300, special_tokens=("endoftext", "<eos>", "<pad>"))
    tok = train_bpe(["<s> and </s> <s>"] * 20, vocab_size=300, special_tokens=("<s>", "</s>", "<pad>"))
    assert 0 not in tok.encode("<s>") and tok.decode(tok.encode("<s> x</s>")) == "<s> x</s>"


def test_char_vocabulary_keeps_the_most_frequent_characters_and_breaks_ties_by_lowest_code_point():
    """vocab_size 262 leaves room for 3 characters: 'z' (3 times), then two of the four tied ones (once each):
    the lowest code points, 'a' and 'b'."""
    tok = train_char(["dcba", "zzz"], vocab_size=259 + 3)
    assert tok.to_dict()["chars"] == ["a", "b", "z"]
    assert tok.encode("abz") == [259, 260, 261]
    assert tok.encode("c") == [3 + ord("c")]  # out of the vocabulary: its UTF-8 byte


def test_a_mask_token_is_special_and_dropped_from_decoded_text(tmp_path):
    tok = byte_tokenizer().with_mask_token("<MASK>")
    assert tok.mask_id == 259 and tok.vocab_size == 260 and tok.mask_id in tok.special_token_ids
    ids = [tok.start_id, tok.mask_id, *tok.encode("hi"), tok.mask_id, tok.end_id]
    assert tok.decode(ids) == "hi"
    assert tok.decode(ids, skip_special=False) == "<START><MASK>hi<MASK><END>"
    tok.save(tmp_path / "tokenizer.json")
    loaded = Tokenizer.load(tmp_path / "tokenizer.json")
    stream = loaded.stream_decoder()
    assert "".join(stream.push(i) for i in ids) + stream.flush() == "hi"
