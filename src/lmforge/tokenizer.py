"""One Tokenizer over three kinds: char, byte and byte-level BPE (and ``hf``: an imported tokenizer).

Every kind maps text to ids and back through UTF-8 bytes, so ``decode(encode(s)) == s`` for every
string, in any script:

- ``byte``: one token per UTF-8 byte.
- ``char``: one token per character of a vocabulary learned from the training split, plus 256 byte
  tokens as a fallback: a character outside the vocabulary is written as its UTF-8 bytes.
- ``bpe``: byte-level BPE trained with Hugging Face ``tokenizers`` (GPT-2 style byte alphabet, no
  normaliser, no added prefix space), so every byte sequence is representable.

Id layout, the same for every kind: the special tokens take ids 0, 1, 2 (start, end, pad; names
configurable, default ``<START>``, ``<END>``, ``<PAD>``). Then ``byte`` has bytes 0..255 at ids
3..258; ``char`` has those 259 ids followed by its characters; ``bpe`` has its learned vocabulary.
Special ids are never produced by ``encode``: a text containing the literal ``"<END>"`` encodes it
as ordinary characters. A mask token for masked-language-model training (``lmforge prepare --mask-token``,
default name ``<MASK>``) takes the last id, after everything else, so adding it moves no other id.

Added tokens (``lmforge prepare --add-tokens``: chat markers such as ``<|user|>`` for a model that never had them)
take the next ids after a tokenizer's own, in order, so adding them moves no other id either; unlike special tokens
they are text: a text that spells one encodes it as its one id (matched before any other rule, leftmost and
longest first, as Hugging Face's added tokens), and it decodes to its spelling. An added token may be special, as
Hugging Face's ``add_special_tokens`` makes one (a chat marker such as ``<|im_end|>``): matched in text the same way,
but dropped by ``decode`` (unless ``skip_special=False``), like the start, end and pad tokens. A tokenizer with added
tokens ``extends`` the one they were added to: a model trained with that one can learn the new ids (its embedding
grows).

Decoding joins each id's bytes and decodes them as UTF-8, replacing invalid sequences (a model can
emit any id sequence). ``StreamDecoder`` does the same incrementally for generation: it holds back
the bytes of a character that is not complete yet, so printing its pieces gives exactly
``decode(all_ids)``.

A tokenizer is saved as ONE JSON file (``format: lmforge-tokenizer-v1``); for ``bpe`` the Hugging
Face tokenizer JSON is embedded under ``"hf_tokenizer"``.

The fourth kind, ``hf``, wraps the tokenizer.json of a model imported from Hugging Face: byte-level BPE (GPT-2,
Llama 3, Qwen, ...) or SentencePiece-style (Llama 2, TinyLlama, Mistral, Gemma: U+2581 spells a space, characters
outside the vocabulary are <0xNN> byte tokens, and most write a space before a text's first word, which ``decode``
drops as their own decoder does: ``decode(encode(s)) == s`` save for a space ``s`` itself begins with, where the
source tokenizer loses it too; a ``StreamDecoder``, continuing a prompt, keeps a first word's space). Bytes that
are not UTF-8 (a model can emit any ids) become one U+FFFD per broken character, where transformers writes one per
byte token. The ``hf`` kind keeps ITS special tokens and ids: GPT-2's ``<|endoftext|>`` is id 50256 and
is its end token; its start token is None because GPT-2's tokenizer adds nothing before a text (a
tokenizer whose post-processor adds BOS, like Llama's, has that BOS as start token). It encodes as the
source tokenizer does without its post-processor, special tokens written in the text included (so
``encode`` may emit special ids: the ids the model was trained with), and ``start + encode(text)`` is
what ``transformers`` gives for ``tokenizer(text).input_ids``.
"""

from __future__ import annotations

import codecs
import json
import re
import unicodedata
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np

from lmforge.errors import TokenizerError
from lmforge.files import atomic_write_text, sha256_file

FORMAT = "lmforge-tokenizer-v1"
KINDS = ("char", "byte", "bpe")  # the kinds `lmforge prepare` trains
HF_KIND = "hf"  # a tokenizer imported from Hugging Face (see the module docstring)
SPECIAL_ROLES = ("start", "end", "pad")
DEFAULT_SPECIAL_TOKENS = ("<START>", "<END>", "<PAD>")
N_SPECIAL = 3
BYTE_OFFSET = N_SPECIAL  # id of byte 0 in the byte and char kinds
UNICODE_SIZE = 0x110000
MAX_ADDED_TOKENS = 10_000  # with_added_tokens: more is a mistake (a vocabulary is trained, not listed)


def check_special_tokens(names) -> None:
    """Raise TokenizerError unless ``names`` are three distinct non-empty strings (start, end, pad)."""
    if (not isinstance(names, (tuple, list)) or len(names) != N_SPECIAL or len(set(names)) != N_SPECIAL
            or not all(isinstance(n, str) and n for n in names)):
        raise TokenizerError(f"special tokens {names!r} must be three distinct non-empty names (start, end, pad)")


def _gpt2_byte_to_unicode() -> dict[int, str]:
    """The printable-character alphabet byte-level BPE uses for the 256 bytes (GPT-2, Radford et al. 2019)."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    chars = keep[:]
    n = 0
    for b in range(256):
        if b not in keep:
            keep.append(b)
            chars.append(256 + n)
            n += 1
    return {b: chr(c) for b, c in zip(keep, chars)}


class Tokenizer:
    """Text <-> token ids for one of the kinds ``char``, ``byte``, ``bpe``; build with the ``train_*``/``load`` functions.

    Attributes: ``kind``, ``vocab_size``, ``special_tokens`` (start, end, pad names), ``start_id`` (0),
    ``end_id`` (1), ``pad_id`` (2). For kind ``hf`` the names and ids are the imported tokenizer's
    (``special_ids`` maps start/end/pad to an id or None), and ``start_id``/``pad_id`` may be None.
    """

    start_id: int | None = 0
    end_id: int | None = 1
    pad_id: int | None = 2
    mask_id: int | None = None  # the last id, when the tokenizer has a mask token
    mask_token: str | None = None
    chat_template: str | None = None  # an imported model's own (Jinja) chat template: data.chat_template
    strips_leading_space: int = 0  # SentencePiece-style (kind hf): spaces decode drops from a text's start
    _first_token_bytes: dict[int, bytes] = {}  # SentencePiece's Metaspace decoder: {id: bytes as a text's first}
    _hf_continuing = None  # SentencePiece-style: the tokenizer without the space before a text's first word
    added_tokens: tuple[str, ...] = ()  # with_added_tokens: text tokens at the last ids, in id order
    special_added: frozenset[str] = frozenset()  # those of the added tokens that decode drops (special ones)
    _added_split = None  # char and byte kinds with added tokens: a regex cutting a text at them (see encode_array)
    _added_ids: dict[str, int] = {}

    def __init__(self, kind: str, special_tokens: tuple[str, str, str] = DEFAULT_SPECIAL_TOKENS, *,
                 chars: list[str] | None = None, hf_json: str | None = None,
                 special_ids: dict[str, int | None] | None = None, mask_token: str | None = None,
                 added_tokens: Sequence[str] = (), special_added: Iterable[str] = ()) -> None:
        if kind == HF_KIND:
            self._init_hf(hf_json, special_ids or {})
            self._check_added(added_tokens, special_added)
            return
        if kind not in KINDS:
            raise TokenizerError(f"unknown tokenizer kind {kind!r}: choose one of char, byte, bpe or a tokenizer.json path")
        check_special_tokens(special_tokens)
        self.kind = kind
        self.special_tokens = tuple(special_tokens)
        self._special_ids = frozenset(range(N_SPECIAL))
        self._hf = None
        self._chars: list[str] = list(chars or [])
        # id -> the bytes it stands for; special tokens decode to their names when not skipped.
        id_bytes = [name.encode("utf-8") for name in self.special_tokens]
        if kind in ("char", "byte"):
            id_bytes += [bytes([b]) for b in range(256)]
            id_bytes += [c.encode("utf-8") for c in self._chars]
            self._char_table = self._build_char_table()
        else:
            self._hf = _load_hf(hf_json, self.special_tokens)
            id_bytes += _hf_id_bytes(self._hf)
        if mask_token is not None:
            if not isinstance(mask_token, str) or not mask_token or mask_token in self.special_tokens:
                raise TokenizerError(f"mask token {mask_token!r} must be a non-empty name unlike the start, end and "
                                     f"pad tokens")
            self.mask_token, self.mask_id = mask_token, len(id_bytes)
            id_bytes.append(mask_token.encode("utf-8"))
            self._special_ids = self._special_ids | {self.mask_id}
        if added_tokens and kind in ("char", "byte"):  # bpe: the Hugging Face tokenizer holds them (and matches them)
            id_bytes += [name.encode("utf-8") for name in added_tokens]
            longest_first = sorted(added_tokens, key=len, reverse=True)  # at one position the longest matches
            self._added_split = re.compile("(" + "|".join(map(re.escape, longest_first)) + ")")
        self._id_bytes = id_bytes
        self.vocab_size = len(id_bytes)
        self.sha256: str | None = None  # of the file this tokenizer was last saved to or loaded from
        self._check_added(added_tokens, special_added)

    def _check_added(self, names: Sequence[str], special: Iterable[str]) -> None:
        """Set added_tokens and special_added (those of them that are special), checking they are the last ids, in
        order (and, in a Hugging Face tokenizer, its added tokens of those ids, special where they are)."""
        first = self.vocab_size - len(names)
        self._added_ids = {name: first + i for i, name in enumerate(names)}
        special = frozenset(special)
        if len(self._added_ids) != len(names) or first < 0 or (self.mask_id is not None and names):
            raise ValueError("added tokens must be distinct, the last ids, and not beside a mask token")
        if not special <= set(names):
            raise ValueError(f"special added tokens {sorted(special - set(names))} are not added tokens")
        if self._hf is not None and any(self._hf.token_to_id(n) != i for n, i in self._added_ids.items()):
            raise ValueError("the added tokens are not the Hugging Face tokenizer's tokens of their ids")
        if self.kind == HF_KIND:  # its tokenizer.json says which are special (and _init_hf counted them)
            flags = self._hf.get_added_tokens_decoder()
            if {n for n, i in self._added_ids.items() if flags[i].special} != special:
                raise ValueError("the special added tokens are not the Hugging Face tokenizer's special ones")
        else:
            self._special_ids = self._special_ids | {self._added_ids[n] for n in special}
        self.added_tokens, self.special_added = tuple(names), special

    def _init_hf(self, hf_json: str | None, special_ids: dict[str, int | None]) -> None:
        """Kind ``hf``: an imported byte-level BPE tokenizer.json with its own special tokens."""
        from tokenizers import Tokenizer as HFTokenizer

        try:
            self._hf = HFTokenizer.from_str(hf_json or "")
        except Exception as e:  # the Rust library raises plain Exceptions
            raise TokenizerError(f"the Hugging Face tokenizer JSON cannot be loaded ({e})") from None
        self.kind = HF_KIND
        self._chars = []
        self._char_table = None
        self._id_bytes, self.strips_leading_space, self._first_token_bytes = _hf_all_id_bytes(self._hf)
        self._hf_continuing = _without_prefix_space(self._hf)
        self.vocab_size = len(self._id_bytes)
        for role in SPECIAL_ROLES:
            token_id = special_ids.get(role)
            if token_id is not None and not (isinstance(token_id, int) and 0 <= token_id < self.vocab_size):
                raise TokenizerError(f"{role} token id {token_id!r} is outside the vocabulary (size {self.vocab_size})")
            setattr(self, f"{role}_id", token_id)
        self.special_tokens = tuple(None if i is None else self._hf.id_to_token(i)
                                    for i in (self.start_id, self.end_id, self.pad_id))
        added = self._hf.get_added_tokens_decoder()
        self._special_ids = frozenset({i for i, t in added.items() if t.special}
                                      | {i for i in (self.start_id, self.end_id, self.pad_id) if i is not None})
        self.sha256 = None

    # ------------------------------------------------------------------------------------ encoding
    def _build_char_table(self) -> np.ndarray | None:
        """Dense code point -> id table (-1 = not in the vocabulary) for the vectorised char path."""
        if self.kind != "char":
            return None
        table = np.full(UNICODE_SIZE, -1, dtype=np.int32)
        first = BYTE_OFFSET + 256
        for i, c in enumerate(self._chars):
            table[ord(c)] = first + i
        return table

    def encode_array(self, text: str) -> np.ndarray:
        """Encode one text into a 1-D int64 array of ids (never a special id; an added token's id where the text
        spells it)."""
        if self._added_split is not None:  # split() with a group: text, added token, text, ..., text
            pieces = self._added_split.split(text)
            return np.concatenate([np.array([self._added_ids[p]], dtype=np.int64) if i % 2 else self._encode_plain(p)
                                   for i, p in enumerate(pieces)])
        return self._encode_plain(text)

    def _encode_plain(self, text: str) -> np.ndarray:
        if self.kind == "byte":
            return np.frombuffer(text.encode("utf-8"), dtype=np.uint8).astype(np.int64) + BYTE_OFFSET
        if self.kind == "char":
            return self._encode_char(text)
        return np.asarray(self._hf.encode(text, add_special_tokens=False).ids, dtype=np.int64)

    def _encode_char(self, text: str) -> np.ndarray:
        code_points = np.frombuffer(text.encode("utf-32-le", "surrogatepass"), dtype=np.uint32)
        ids = self._char_table[code_points].astype(np.int64)
        unknown = np.flatnonzero(ids < 0)
        if unknown.size == 0:
            return ids
        # Characters outside the vocabulary become their UTF-8 byte tokens (the byte fallback).
        pieces, start = [], 0
        for i in unknown:
            pieces.append(ids[start:i])
            pieces.append(np.frombuffer(text[i].encode("utf-8"), dtype=np.uint8).astype(np.int64) + BYTE_OFFSET)
            start = i + 1
        pieces.append(ids[start:])
        return np.concatenate(pieces)

    def encode(self, text: str) -> list[int]:
        """Encode one text into ids; special ids are never produced."""
        return self.encode_array(text).tolist()

    def encode_batch_arrays(self, texts: list[str]) -> list[np.ndarray]:
        """Encode many texts into int64 arrays; for bpe the Rust library encodes them in parallel."""
        if self.kind != "bpe":
            return [self.encode_array(t) for t in texts]
        encode = getattr(self._hf, "encode_batch_fast", self._hf.encode_batch)
        return [np.asarray(e.ids, dtype=np.int64) for e in encode(texts, add_special_tokens=False)]

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        """Encode many texts; ``encode_batch(ts)[i] == encode(ts[i])``."""
        return [a.tolist() for a in self.encode_batch_arrays(texts)]

    def encode_continuation(self, text: str) -> list[int]:
        """The ids of ``text`` written right after other text (a completion after its prompt, a choice after the
        prompt it answers): ``encode`` but for a SentencePiece-style tokenizer, which writes a space before a text's
        first word, without that space (as the text would be cut inside a longer one)."""
        return self.encode_continuations([text])[0].tolist()

    def encode_continuations(self, texts: list[str]) -> list[np.ndarray]:
        """encode_continuation of many texts, as int64 arrays."""
        hf = getattr(self, "_hf_continuing", None)
        if hf is None:
            return self.encode_batch_arrays(texts)
        return [np.asarray(e.ids, dtype=np.int64) for e in hf.encode_batch(texts, add_special_tokens=False)]

    @property
    def writes_first_space(self) -> bool:
        """Whether the encoding writes a space before a text's first word that decode drops (SentencePiece-style)."""
        return bool(self.strips_leading_space or self._first_token_bytes)

    def text_start_bytes(self, token_id: int) -> bytes:
        """The bytes ``token_id`` adds as a text's first token (decode drops a SentencePiece-style first space)."""
        raw = self.id_to_bytes(token_id)
        if token_id in self._first_token_bytes:
            return self._first_token_bytes[token_id]
        cut = min(len(raw) - len(raw.lstrip(b" ")), self.strips_leading_space)
        return raw[cut:]

    # ------------------------------------------------------------------------------------ decoding
    def id_to_bytes(self, token_id: int) -> bytes:
        """The UTF-8 bytes (possibly part of a character) token ``token_id`` stands for."""
        if not 0 <= token_id < self.vocab_size:
            raise TokenizerError(f"token id {token_id} is outside the vocabulary (size {self.vocab_size})")
        return self._id_bytes[token_id]

    def decode_bytes(self, ids: Iterable[int], skip_special: bool = True) -> bytes:
        """The bytes of ``ids`` joined; special tokens are dropped (or written as their names)."""
        table, special = self._id_bytes, self._special_ids
        if skip_special:
            return b"".join(table[int(i)] for i in ids if int(i) not in special)
        return b"".join(table[int(i)] for i in ids)

    def decode(self, ids: Iterable[int], skip_special: bool = True) -> str:
        """Ids -> text. Invalid UTF-8 (possible in model output) becomes U+FFFD. A SentencePiece-style tokenizer
        writes a space before a text's first word: decode drops it, as its own decoder does (a StreamDecoder, which
        continues a prompt, keeps it)."""
        try:
            if self._first_token_bytes:  # SentencePiece's Metaspace decoder: a text's first token loses its spaces
                ids = [int(i) for i in ids if not (skip_special and int(i) in self._special_ids)]
                if ids and ids[0] in self._first_token_bytes:
                    return (self._first_token_bytes[ids[0]] + self.decode_bytes(ids[1:], False)).decode(
                        "utf-8", errors="replace")
            raw = self.decode_bytes(ids, skip_special)
            if self.strips_leading_space:
                cut = len(raw) - len(raw.lstrip(b" "))
                raw = raw[min(cut, self.strips_leading_space):]
            return raw.decode("utf-8", errors="replace")
        except IndexError:
            bad = next(int(i) for i in ids if not 0 <= int(i) < self.vocab_size)
            raise TokenizerError(f"token id {bad} is outside the vocabulary (size {self.vocab_size})") from None

    def stream_decoder(self, skip_special: bool = True) -> "StreamDecoder":
        """An incremental decoder for generation; see ``StreamDecoder``."""
        return StreamDecoder(self, skip_special)

    @property
    def special_token_ids(self) -> frozenset[int]:
        """The ids of the special tokens (start, end, pad, and mask where there is one): never text."""
        return self._special_ids

    @property
    def added_token_ids(self) -> dict[str, int]:
        """{added token: its id} (with_added_tokens), in id order."""
        return dict(self._added_ids)

    def token_text(self, token_id: int) -> str:
        """A printable form of one token, for reports (special names, bytes as ``<0xNN>``)."""
        if token_id in self._special_ids:
            return self._id_bytes[token_id].decode("utf-8", errors="replace")
        raw = self._id_bytes[token_id]
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError:
            return "".join(f"<0x{b:02X}>" for b in raw)

    # ---------------------------------------------------------------------------------- save/load
    def to_dict(self) -> dict:
        """The JSON-serialisable form written by ``save``."""
        ids = (self.start_id, self.end_id, self.pad_id)
        data = {
            "format": FORMAT,
            "kind": self.kind,
            "vocab_size": self.vocab_size,
            "special_tokens": {role: None if i is None else {"token": name, "id": i}
                               for role, name, i in zip(SPECIAL_ROLES, self.special_tokens, ids)},
        }
        if self.kind == "char":
            data["chars"] = self._chars
        if self.kind in ("bpe", HF_KIND):
            data["hf_tokenizer"] = json.loads(self._hf.to_str())
        if self.mask_id is not None:
            data["mask_token"] = {"token": self.mask_token, "id": self.mask_id}
        if self.chat_template is not None:
            data["chat_template"] = self.chat_template
        if self.added_tokens:
            data["added_tokens"] = [{"token": name, "id": i, **({"special": True} if name in self.special_added
                                                                 else {})} for name, i in self.added_token_ids.items()]
        return data

    def with_added_tokens(self, names: Sequence[str], special: Iterable[str] = ()) -> "Tokenizer":
        """This tokenizer with `names` added as text tokens at the next ids, in order (see the module docstring);
        those also in `special` are special (decode drops them). TokenizerError, naming the token, for an empty name,
        one with whitespace or control characters, a repeat, a special token's name, a name that is one token
        already, or a tokenizer with a mask token."""
        names, special = list(names), set(special)
        if not special <= set(names):
            raise TokenizerError(f"special tokens to add {sorted(special - set(names))} are not among the names to "
                                 "add: name each once in the names")
        if not names or len(names) > MAX_ADDED_TOKENS:
            raise TokenizerError(f"{len(names)} tokens to add: give 1 to {MAX_ADDED_TOKENS:,} names")
        taken = set(self.special_tokens) | set(self.added_tokens) | {self.mask_token}
        for name in names:
            if not isinstance(name, str) or not name or any(c.isspace() or unicodedata.category(c)[0] == "C"
                                                            for c in name):
                raise TokenizerError(f"token to add {name!r} is empty or holds whitespace or control characters: "
                                     f"give names such as <|user|>")
            if name in taken or names.count(name) > 1:
                raise TokenizerError(f"token to add {name!r} is a special token, added already or named twice: "
                                     f"give each new name once")
            ids = self.encode(name)
            if len(ids) == 1:
                raise TokenizerError(f"token to add {name!r} is one token of the vocabulary already (id {ids[0]}): "
                                     f"drop it from the list")
        if self.mask_id is not None:
            raise TokenizerError("this tokenizer has a mask token (an encoder's, at its last id): tokens cannot be "
                                 "added after it")
        data = self.to_dict()
        if self._hf is not None:
            from tokenizers import AddedToken, Tokenizer as HFTokenizer

            hf = HFTokenizer.from_str(self._hf.to_str())
            # bpe's own BPE never matches special tokens in text (encode_special_tokens), so its added ones stay
            # plain there; an imported tokenizer's hold their flag, as the source's do
            hf.add_tokens([AddedToken(n, single_word=False, lstrip=False, rstrip=False, normalized=False,
                                      special=self.kind == HF_KIND and n in special) for n in names])
            data["hf_tokenizer"] = json.loads(hf.to_str())
        data["added_tokens"] = [*data.get("added_tokens", []),
                                *({"token": n, "id": self.vocab_size + i, **({"special": True} if n in special else {})}
                                  for i, n in enumerate(names))]
        data["vocab_size"] = self.vocab_size + len(names)
        try:
            return Tokenizer.from_dict(data)
        except TokenizerError:  # an imported vocabulary with holes in its ids gives the new tokens other ids
            raise TokenizerError(f"this tokenizer's ids do not end at its vocabulary size {self.vocab_size}: "
                                 f"tokens cannot be added to it") from None

    def without_added(self, count: int) -> dict:
        """The to_dict form of this tokenizer before its last `count` added tokens were added."""
        data = self.to_dict()
        keep = len(self.added_tokens) - count
        size = self.vocab_size - count
        data["vocab_size"] = size
        if keep > 0:
            data["added_tokens"] = data["added_tokens"][:keep]
        else:
            data.pop("added_tokens", None)
        if "hf_tokenizer" in data:
            hf = data["hf_tokenizer"]
            hf["added_tokens"] = [t for t in hf.get("added_tokens") or [] if t["id"] < size]
        return data

    def extends(self, base: "Tokenizer") -> int:
        """How many tokens this tokenizer added to `base` (with_added_tokens, once or more); 0 when it is not
        `base` with tokens added."""
        count = len(self.added_tokens) - len(base.added_tokens)
        if count <= 0 or self.added_tokens[:len(base.added_tokens)] != base.added_tokens:
            return 0
        return count if self.without_added(count) == base.to_dict() else 0

    def with_mask_token(self, name: str = "<MASK>") -> "Tokenizer":
        """This tokenizer with a mask token added at the next id (itself if it has one already)."""
        if self.mask_id is not None:
            return self
        if self.kind == HF_KIND:
            raise TokenizerError("an imported Hugging Face tokenizer keeps its own vocabulary: a mask token cannot be "
                                 "added to it")
        return Tokenizer.from_dict({**self.to_dict(), "mask_token": {"token": name, "id": self.vocab_size},
                                    "vocab_size": self.vocab_size + 1})

    def save(self, path: str | Path) -> str:
        """Write the tokenizer as one JSON file (atomically); returns its sha256."""
        text = json.dumps(self.to_dict(), ensure_ascii=False, indent=1) + "\n"
        atomic_write_text(path, text)
        self.sha256 = sha256_file(path)
        return self.sha256

    @classmethod
    def load(cls, path: str | Path) -> "Tokenizer":
        """Read a tokenizer written by ``save``; raises TokenizerError naming the file and the problem."""
        p = Path(path)
        try:
            data = json.loads(p.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise TokenizerError(f"tokenizer file {p} does not exist: give the tokenizer.json of a prepared dataset") from None
        except (OSError, UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
            raise TokenizerError(f"tokenizer file {p} cannot be read as JSON ({type(e).__name__}): "
                                 "give an lmforge tokenizer.json") from None
        tok = cls.from_dict(data, source=str(p))
        tok.sha256 = sha256_file(p)
        return tok

    @classmethod
    def from_dict(cls, data: dict, source: str = "<dict>") -> "Tokenizer":
        """Build from the ``to_dict`` form; ``source`` names the file in errors."""
        if not isinstance(data, dict) or data.get("format") != FORMAT:
            raise TokenizerError(f"{source} is not an lmforge tokenizer file (format {FORMAT!r} missing): "
                                 "use a tokenizer.json written by `lmforge prepare`")
        try:
            if data["kind"] == HF_KIND:
                roles = data["special_tokens"]
                special_ids = {r: roles[r]["id"] if roles.get(r) else None for r in SPECIAL_ROLES}
                tok = cls(HF_KIND, hf_json=json.dumps(data["hf_tokenizer"]), special_ids=special_ids,
                          added_tokens=_added_names(data), special_added=_special_added(data))
                for r in SPECIAL_ROLES:
                    if roles.get(r) and tok._hf.id_to_token(roles[r]["id"]) != roles[r]["token"]:
                        raise ValueError(f"{r} token {roles[r]['token']!r} is not id {roles[r]['id']}")
                if tok.vocab_size != data.get("vocab_size"):
                    raise ValueError(f"vocab_size={data.get('vocab_size')} but the tokenizer holds {tok.vocab_size}")
                tok.chat_template = _chat_template(data)
                return tok
            specials = tuple(data["special_tokens"][r]["token"] for r in ("start", "end", "pad"))
            chars = data.get("chars")
            if chars is not None and not (isinstance(chars, list) and len(set(chars)) == len(chars)
                                          and all(isinstance(c, str) and len(c) == 1 for c in chars)):
                raise ValueError("'chars' must be a list of distinct single characters")
            mask = data.get("mask_token")
            tok = cls(data["kind"], specials, chars=chars,
                      hf_json=json.dumps(data["hf_tokenizer"]) if data["kind"] == "bpe" else None,
                      mask_token=None if mask is None else mask["token"], added_tokens=_added_names(data),
                      special_added=_special_added(data))
            if mask is not None and mask["id"] != tok.mask_id:
                raise ValueError(f"mask token id {mask['id']} is not the last id {tok.mask_id}")
            tok.chat_template = _chat_template(data)
        except (KeyError, TypeError, ValueError, AttributeError, IndexError, RecursionError) as e:
            raise TokenizerError(f"tokenizer file {source} is incomplete or corrupt ({type(e).__name__}: {e}): "
                                 "re-run `lmforge prepare`") from None
        if tok.vocab_size != data.get("vocab_size"):
            raise TokenizerError(f"tokenizer file {source} says vocab_size={data.get('vocab_size')} but holds "
                                 f"{tok.vocab_size} tokens: the file is corrupt, re-run `lmforge prepare`")
        return tok


def _added_names(data: dict) -> list[str]:
    """The added tokens of a to_dict form, checked to be [{"token": name, "id": the id it must have}, ...]."""
    entries = data.get("added_tokens") or []
    names = [entry["token"] for entry in entries]
    first = data["vocab_size"] - len(names)
    if not all(isinstance(n, str) and n for n in names) or [e["id"] for e in entries] != list(
            range(first, first + len(names))):
        raise ValueError("'added_tokens' must name tokens at the last ids, in order")
    return names


def _special_added(data: dict) -> list[str]:
    """The added tokens of a to_dict form marked special ({"token": ..., "special": true})."""
    entries = data.get("added_tokens") or []
    if any(entry.get("special", False) not in (True, False) for entry in entries):
        raise ValueError("an added token's 'special' must be true or false")
    return [entry["token"] for entry in entries if entry.get("special")]


def _chat_template(data: dict) -> str | None:
    template = data.get("chat_template")
    if template is not None and not (isinstance(template, str) and template):
        raise ValueError("'chat_template' must be a non-empty string (a Jinja chat template)")
    return template


class StreamDecoder:
    """Decode ids one at a time, for streaming generation.

    ``push(ids)`` returns the text that is complete so far; the bytes of a character cut in the middle
    (byte tokens, BPE pieces) are held back until the character is complete. ``flush()`` returns what is
    left (an unfinished character as U+FFFD). The concatenation of all returned pieces equals
    ``tokenizer.decode(all_ids, skip_special)``, save for the space a SentencePiece-style tokenizer writes before a
    text's first word: decode drops it, a stream (the continuation of a prompt) keeps it.
    """

    def __init__(self, tokenizer: Tokenizer, skip_special: bool = True) -> None:
        self._tok = tokenizer
        self._skip = skip_special
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def push(self, ids: int | Iterable[int]) -> str:
        """Feed one id or several; returns the newly completed text (maybe empty)."""
        if isinstance(ids, (int, np.integer)):
            ids = [int(ids)]
        return self._utf8.decode(self._tok.decode_bytes(ids, self._skip))

    def push_bytes(self, data: bytes) -> str:
        """Feed raw bytes (e.g. the part of a healed token past the prompt); returns the newly completed text."""
        return self._utf8.decode(data)

    def flush(self) -> str:
        """Return the held-back tail and reset."""
        return self._utf8.decode(b"", final=True)


# ------------------------------------------------------------------------------------------ building
def byte_tokenizer(special_tokens: tuple[str, str, str] = DEFAULT_SPECIAL_TOKENS) -> Tokenizer:
    """The byte tokenizer (vocabulary 259: three special tokens and 256 bytes)."""
    return Tokenizer("byte", special_tokens)


class CharCounter:
    """Counts characters over many texts with bounded memory (one counter per Unicode code point)."""

    def __init__(self) -> None:
        self.counts = np.zeros(UNICODE_SIZE, dtype=np.int64)

    def update(self, text: str) -> None:
        code_points = np.frombuffer(text.encode("utf-32-le", "surrogatepass"), dtype=np.uint32)
        counts = np.bincount(code_points)
        self.counts[: counts.size] += counts

    def vocabulary(self, max_chars: int) -> list[str]:
        """The ``max_chars`` most frequent characters (ties by code point), in code point order."""
        seen = np.flatnonzero(self.counts)
        if seen.size > max_chars:
            order = np.lexsort((seen, -self.counts[seen]))  # by count descending, then code point
            seen = np.sort(seen[order[:max_chars]])
        return [chr(c) for c in seen]


def train_char(texts: Iterable[str], vocab_size: int = 8192,
               special_tokens: tuple[str, str, str] = DEFAULT_SPECIAL_TOKENS) -> Tokenizer:
    """A char tokenizer whose vocabulary is the most frequent characters of ``texts``.

    ``vocab_size`` caps the total (3 special + 256 byte-fallback + characters), so it must be > 259.
    """
    first_char = BYTE_OFFSET + 256
    if vocab_size <= first_char:
        raise TokenizerError(f"vocab_size={vocab_size} is too small for a char tokenizer: use more than {first_char}")
    counter = CharCounter()
    for text in texts:
        counter.update(text)
    return Tokenizer("char", special_tokens, chars=counter.vocabulary(vocab_size - first_char))


def train_bpe(texts: Iterable[str], vocab_size: int = 8192,
              special_tokens: tuple[str, str, str] = DEFAULT_SPECIAL_TOKENS, *,
              length: int | None = None, progress: bool = False) -> Tokenizer:
    """Train byte-level BPE on ``texts`` (an iterator is fine; it is consumed once).

    The result has at most ``vocab_size`` tokens (fewer when the text has fewer merges to learn);
    ``vocab_size`` must exceed 259 (3 special tokens + 256 bytes).
    """
    from tokenizers import Tokenizer as HFTokenizer, models, pre_tokenizers, trainers

    if vocab_size <= N_SPECIAL + 256:
        raise TokenizerError(f"vocab_size={vocab_size} is too small for bpe: use more than {N_SPECIAL + 256}")
    _check_bpe_special_names(special_tokens)
    hf = HFTokenizer(models.BPE())
    _configure_byte_level(hf)
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(special_tokens),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=progress)
    hf.train_from_iterator(texts, trainer, length=length)
    return Tokenizer("bpe", special_tokens, hf_json=hf.to_str())


def _configure_byte_level(hf) -> None:
    """Byte-level pre-tokeniser and decoder, no normaliser and no prefix space: lossless on any text."""
    from tokenizers import decoders, pre_tokenizers

    hf.normalizer = None
    hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    hf.decoder = decoders.ByteLevel()
    hf.post_processor = None


def _check_bpe_special_names(special_tokens) -> None:
    """Refuse special names that BPE could also learn from ordinary text.

    Merges never cross pre-token boundaries, so a name the byte-level pre-tokeniser splits into two or
    more pieces (``<END>`` -> ``<``, ``END``, ``>``) can never be a learned token; a name that stays one
    piece (``endoftext``) could be, and encoding ordinary text would then emit the special id.
    """
    from tokenizers import pre_tokenizers

    split = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True).pre_tokenize_str
    for name in special_tokens:
        pieces = split(name)
        if len(pieces) == 1 and pieces[0][0] == name:
            raise TokenizerError(f"special token name {name!r} could also be learned from ordinary text by bpe: "
                                 "mix letters and punctuation, like <END>")


def _load_hf(hf_json: str | None, special_tokens: tuple[str, str, str]):
    """The HF tokenizer from its JSON, checked to put the special tokens at ids 0, 1, 2."""
    from tokenizers import Tokenizer as HFTokenizer

    if hf_json is None:
        raise TokenizerError("a bpe tokenizer needs its Hugging Face tokenizer JSON ('hf_tokenizer')")
    try:
        hf = HFTokenizer.from_str(hf_json)
    except Exception as e:  # the Rust library raises plain Exceptions
        raise TokenizerError(f"the embedded Hugging Face tokenizer cannot be loaded ({e}): re-run `lmforge prepare`") from None
    _check_bpe_special_names(special_tokens)
    for i, name in enumerate(special_tokens):
        if hf.token_to_id(name) != i:
            raise TokenizerError(f"special token {name!r} should have id {i} in the bpe vocabulary: re-run `lmforge prepare`")
    # Special names in ordinary text are encoded as text, never as the special ids.
    hf.encode_special_tokens = True
    return hf


def _hf_id_bytes(hf) -> list[bytes]:
    """The bytes of each non-special BPE token (ids 3..), undoing the byte-level alphabet."""
    to_byte = {c: b for b, c in _gpt2_byte_to_unicode().items()}
    vocab = hf.get_vocab(with_added_tokens=True)
    if sorted(vocab.values()) != list(range(len(vocab))):
        raise TokenizerError("the embedded BPE vocabulary's ids are not 0..N-1: re-run `lmforge prepare`")
    by_id = [""] * len(vocab)
    for token, i in vocab.items():
        by_id[i] = token
    added = {i: t.content for i, t in hf.get_added_tokens_decoder().items() if not t.special}  # their text as is
    return [added[i].encode("utf-8") if i in added else bytes(to_byte[c] for c in by_id[i])
            for i in range(N_SPECIAL, len(by_id))]


def _hf_all_id_bytes(hf) -> tuple[list[bytes], int, dict[int, bytes]]:
    """The decoding of an imported tokenizer: (the bytes of every id, the spaces decoding drops from a text's start,
    {id: its bytes when it is a text's first token} where they differ). Byte-level BPE (GPT-2, Llama 3, Qwen, ...),
    or SentencePiece-style (Llama 2, TinyLlama, Mistral, Gemma: U+2581 for a space, <0xNN> byte tokens, usually a
    space written before the first word). Added tokens: their text as UTF-8.

    Raises TokenizerError for other decoders (WordPiece, ...) and corrupt vocabularies.
    """
    decoder = json.loads(hf.to_str()).get("decoder") or {}
    steps = decoder.get("decoders") or [] if decoder.get("type") == "Sequence" else [decoder]
    if "ByteLevel" in {d.get("type") for d in steps}:
        token_bytes, strip, space = _byte_level_bytes, 0, None
    else:
        token_bytes, strip, space = _sentencepiece_rule(steps, decoder)
    added = {i: t.content for i, t in hf.get_added_tokens_decoder().items()}
    vocab = hf.get_vocab(with_added_tokens=True)
    if not vocab or max(vocab.values()) >= 2 * len(vocab) + 1024:  # ids far beyond the vocabulary: not a real file
        raise TokenizerError(f"the tokenizer's ids go up to {max(vocab.values(), default=None)} for {len(vocab)} tokens: "
                             "the file is corrupt")
    out = [b""] * (max(vocab.values()) + 1)
    first = {}
    for token, i in vocab.items():
        out[i] = added[i].encode("utf-8") if i in added else token_bytes(token)
        if space and i not in added and space in token:  # Metaspace: a text's first token loses its spaces
            first[i] = token_bytes(token.replace(space, ""))
    return out, strip, first


def _without_prefix_space(hf):
    """A copy of an imported tokenizer that writes no space before a text's first word (its Prepend normalizer left
    out, its Metaspace pre-tokenizer set to prepend never), or None when it writes none anyway."""
    from tokenizers import Tokenizer as HFTokenizer

    spec = json.loads(hf.to_str())
    normalizer, pre = spec.get("normalizer") or {}, spec.get("pre_tokenizer") or {}
    changed = False
    if normalizer.get("type") == "Prepend":
        spec["normalizer"], changed = None, True
    elif normalizer.get("type") == "Sequence" and any(n.get("type") == "Prepend" for n in normalizer["normalizers"]):
        normalizer["normalizers"] = [n for n in normalizer["normalizers"] if n.get("type") != "Prepend"]
        changed = True
    steps = pre.get("pretokenizers") or [] if pre.get("type") == "Sequence" else [pre]
    for step in steps:
        if step.get("type") == "Metaspace" and (step.get("prepend_scheme") or "always") != "never" \
                and step.get("add_prefix_space", True):
            step["prepend_scheme"], changed = "never", True
            step.pop("add_prefix_space", None)
    return HFTokenizer.from_str(json.dumps(spec)) if changed else None


_TO_BYTE = {c: b for b, c in _gpt2_byte_to_unicode().items()}


def _byte_level_bytes(token: str) -> bytes:
    if all(c in _TO_BYTE for c in token):
        return bytes(_TO_BYTE[c] for c in token)
    return token.encode("utf-8")  # not in the byte alphabet: a model vocabulary entry no text encodes to


def _sentencepiece_rule(steps: list[dict], decoder: dict):
    """(token -> bytes, spaces Strip drops from a text's start, the space character when Metaspace drops a first
    token's spaces) of a SentencePiece-style decoder: Replace(U+2581, " ") or Metaspace, ByteFallback (<0xNN> tokens
    are bytes), Fuse, Strip(" ", n). Byte fallback alone (lmforge's own char and byte kinds as exported to Hugging
    Face) is taken too."""
    space, byte_fallback, strip, first_drops = None, False, 0, False
    for step in steps:
        kind, pattern = step.get("type"), (step.get("pattern") or {}).get("String")
        if kind == "Replace" and step.get("content") == " " and isinstance(pattern, str) and pattern:
            space = pattern
        elif kind == "Metaspace" and step.get("replacement", "\u2581"):
            space = step.get("replacement", "\u2581")
            first_drops = step.get("prepend_scheme", "always" if step.get("add_prefix_space", True) else "never") \
                != "never"
        elif kind == "ByteFallback":
            byte_fallback = True
        elif kind == "Strip" and step.get("content") == " " and not step.get("stop"):
            strip = int(step.get("start") or 0)
        elif kind != "Fuse":
            space = byte_fallback = None
            break
    if not space and not byte_fallback:
        raise TokenizerError(f"the tokenizer's decoder ({_decoder_name(decoder)}) is neither byte-level nor "
                             "SentencePiece-style: lmforge imports byte-level BPE tokenizers (GPT-2, Llama 3, Qwen, "
                             "...) and SentencePiece-style ones (Llama 2, TinyLlama, Mistral, Gemma)")

    def token_bytes(token: str) -> bytes:
        if byte_fallback and len(token) == 6 and token.startswith("<0x") and token.endswith(">"):
            try:
                return bytes([int(token[3:5], 16)])
            except ValueError:
                pass
        return (token.replace(space, " ") if space else token).encode("utf-8")

    return token_bytes, strip, space if first_drops else None


def _decoder_name(decoder: dict) -> str:
    steps = decoder.get("decoders") if decoder.get("type") == "Sequence" else None
    return "+".join(str(d.get("type")) for d in steps) if steps else repr(decoder.get("type"))


