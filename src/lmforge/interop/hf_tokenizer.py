"""Tokenizers to and from a Hugging Face model directory.

Import: a directory's tokenizer.json (or GPT-2's vocab.json + merges.txt) becomes an lmforge tokenizer
of kind ``hf`` that keeps the model's own special tokens (GPT-2: ``<|endoftext|>`` = 50256 as end token,
no start token; Llama 3: ``<|begin_of_text|>`` as start token because its post-processor adds it).
The roles come from tokenizer_config.json / special_tokens_map.json (bos/eos/pad_token), falling back
to config.json's token ids.

Export: tokenizer.json, tokenizer_config.json and special_tokens_map.json that transformers'
AutoTokenizer loads (as a PreTrainedTokenizerFast) and that encode like lmforge:
``tokenizer(text).input_ids == [start_id] + lmforge_tokenizer.encode(text)`` (the start token comes from
a post-processor template). lmforge's char and byte kinds are written as a BPE model without merges
and with byte fallback (``<0xNN>`` tokens at ids 3..258): exactly their "character, else its UTF-8
bytes" rule. One difference remains: HF tokenizers split a special token written in the text
(``"<END>"``) into its special id, lmforge's own kinds never do.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Mapping, Optional

from lmforge.errors import TokenizerError
from lmforge.tokenizer import BYTE_OFFSET, HF_KIND, Tokenizer

SPECIAL_KEYS = {"start": "bos_token", "end": "eos_token", "pad": "pad_token"}


# ---------------------------------------------------------------------------------------------- import
def _token_name(value: Any) -> Optional[str]:
    """A special token entry of tokenizer_config.json: a string, or a dict with "content"."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) and value else None


def _read_json(path: Path) -> dict:
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise TokenizerError(f"{path} cannot be read as JSON ({e}); fix or remove the file") from None
    return data if isinstance(data, dict) else {}


def _gpt2_style_json(hf_dir: Path, specials: list[str], add_prefix_space: bool) -> str:
    """tokenizer.json for GPT-2's original vocab.json + merges.txt: byte-level BPE, its special tokens added."""
    from tokenizers import AddedToken, Tokenizer as HFTokenizer, decoders, models, pre_tokenizers, processors

    try:
        hf = HFTokenizer(models.BPE.from_file(str(hf_dir / "vocab.json"), str(hf_dir / "merges.txt")))
    except Exception as e:  # the Rust library raises plain Exceptions
        raise TokenizerError(f"{hf_dir}/vocab.json + merges.txt cannot be read as a BPE tokenizer ({e})") from None
    hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=add_prefix_space)
    hf.decoder = decoders.ByteLevel()
    hf.post_processor = processors.ByteLevel(trim_offsets=False)
    hf.add_special_tokens([AddedToken(s, special=True, normalized=False) for s in specials
                           if hf.token_to_id(s) is not None])
    return hf.to_str()


def read_hf_tokenizer(hf_dir: str | Path, model_config: Mapping[str, Any]) -> Tokenizer:
    """The tokenizer of a Hugging Face model directory as an lmforge Tokenizer of kind ``hf``.

    model_config: the directory's config.json (its bos/eos/pad_token_id are the fallback roles).
    Raises TokenizerError when there is no tokenizer or it is not byte-level BPE.
    """
    from tokenizers import Tokenizer as HFTokenizer

    hf_dir = Path(hf_dir)
    settings = {**_read_json(hf_dir / "special_tokens_map.json"), **_read_json(hf_dir / "tokenizer_config.json")}
    names = {role: _token_name(settings.get(key)) for role, key in SPECIAL_KEYS.items()}
    if (hf_dir / "tokenizer.json").is_file():
        hf_json = (hf_dir / "tokenizer.json").read_text(encoding="utf-8")
    elif (hf_dir / "vocab.json").is_file() and (hf_dir / "merges.txt").is_file():
        added = [_token_name(t) for t in (settings.get("added_tokens_decoder") or {}).values()]
        specials = [n for n in [*names.values(), _token_name(settings.get("unk_token")), *added] if n]
        hf_json = _gpt2_style_json(hf_dir, specials or ["<|endoftext|>"], bool(settings.get("add_prefix_space", False)))
        if names["end"] is None and '"<|endoftext|>"' in hf_json:  # GPT-2's files name no roles
            names["end"] = "<|endoftext|>"
    else:
        raise TokenizerError(f"{hf_dir} has no tokenizer: lmforge import reads tokenizer.json, or vocab.json + "
                             "merges.txt; save the tokenizer there (tokenizer.save_pretrained(dir))")
    try:
        hf = HFTokenizer.from_str(hf_json)
    except Exception as e:  # the Rust library raises plain Exceptions
        raise TokenizerError(f"{hf_dir}/tokenizer.json cannot be loaded ({e})") from None

    def id_of(role: str) -> Optional[int]:
        if names[role] is not None and hf.token_to_id(names[role]) is not None:
            return hf.token_to_id(names[role])
        fallback = model_config.get(f"{'bos' if role == 'start' else 'eos' if role == 'end' else 'pad'}_token_id")
        if isinstance(fallback, list):
            fallback = fallback[0] if fallback else None
        return fallback if isinstance(fallback, int) and 0 <= fallback < hf.get_vocab_size(True) else None

    ids = {role: id_of(role) for role in SPECIAL_KEYS}
    # The start token is the one the tokenizer puts before every text (its post-processor), if any.
    added_first = hf.encode("", add_special_tokens=True).ids
    if added_first:
        ids["start"] = added_first[0]
    elif not settings.get("add_bos_token", False):
        ids["start"] = None
    tokenizer = Tokenizer(HF_KIND, hf_json=hf.to_str(), special_ids=ids)
    tokenizer.chat_template = _read_chat_template(hf_dir, settings)
    return tokenizer


def _read_chat_template(hf_dir: Path, settings: Mapping[str, Any]) -> Optional[str]:
    """The directory's chat template (an instruct model's Jinja program): chat_template.jinja, as transformers 5
    saves it, else tokenizer_config.json's chat_template (a string, or named templates: the "default" one)."""
    path = hf_dir / "chat_template.jinja"
    if path.is_file():
        try:
            return path.read_text(encoding="utf-8") or None
        except (OSError, UnicodeDecodeError) as e:
            raise TokenizerError(f"{path} cannot be read as UTF-8 text ({e}); fix or remove the file") from None
    template = settings.get("chat_template")
    if isinstance(template, list):  # [{"name": "default", "template": ...}, {"name": "tool_use", ...}]
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        template = named.get("default", next(iter(named.values()), None))
    return template if isinstance(template, str) and template else None


# ---------------------------------------------------------------------------------------------- export
def _byte_fallback_json(tokenizer: Tokenizer) -> dict:
    """lmforge's char/byte kinds as a BPE model without merges: each character in the vocabulary is one
    token, any other character its UTF-8 bytes as <0xNN> tokens (ids 3..258)."""
    vocab = {name: i for i, name in enumerate(tokenizer.special_tokens)}
    vocab.update({f"<0x{b:02X}>": BYTE_OFFSET + b for b in range(256)})
    first = BYTE_OFFSET + 256
    vocab.update({c: first + i for i, c in enumerate(tokenizer._chars)})
    return {
        "version": "1.0", "truncation": None, "padding": None,
        "added_tokens": [_added_token(n, i, special=n in tokenizer.special_added)
                         for n, i in tokenizer.added_token_ids.items()],
        "normalizer": None, "pre_tokenizer": None, "post_processor": None,
        "decoder": {"type": "Sequence", "decoders": [{"type": "ByteFallback"}, {"type": "Fuse"}]},
        "model": {"type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": None,
                  "end_of_word_suffix": None, "fuse_unk": False, "byte_fallback": True, "ignore_merges": False,
                  "vocab": vocab, "merges": []},
    }


def _added_token(content: str, token_id: int, special: bool = True) -> dict:
    return {"id": token_id, "content": content, "single_word": False, "lstrip": False, "rstrip": False,
            "normalized": False, "special": special}


def hf_tokenizer_files(tokenizer: Tokenizer, model_max_length: int,
                       chat_template: Optional[str] = None) -> dict[str, dict]:
    """{file name: JSON content} of tokenizer.json, tokenizer_config.json and special_tokens_map.json;
    chat_template (Jinja) goes into tokenizer_config.json."""
    data = tokenizer.to_dict()
    if tokenizer.kind in ("bpe", HF_KIND):
        hf = dict(data["hf_tokenizer"])
        # bpe keeps its added tokens plain inside (see with_added_tokens); transformers learns which are special
        hf["added_tokens"] = [{**t, "special": t["special"] or t["content"] in tokenizer.special_added}
                              for t in hf.get("added_tokens") or []]
    else:
        hf = _byte_fallback_json(tokenizer)
    if tokenizer.kind != HF_KIND:  # lmforge's special tokens (ids 0, 1, 2; the mask: the last id), never split
        present = {t["id"] for t in hf.get("added_tokens") or []}
        specials = dict(enumerate(tokenizer.special_tokens))
        if tokenizer.mask_token is not None:
            specials[tokenizer.mask_id] = tokenizer.mask_token
        hf["added_tokens"] = [*(hf.get("added_tokens") or []),
                              *(_added_token(n, i) for i, n in specials.items() if i not in present)]
        start = tokenizer.special_tokens[0]
        # Every text begins with the start token, as lmforge's documents and prompts do.
        hf["post_processor"] = {
            "type": "TemplateProcessing",
            "single": [{"SpecialToken": {"id": start, "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}],
            "pair": [{"SpecialToken": {"id": start, "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}},
                     {"Sequence": {"id": "B", "type_id": 1}}],
            "special_tokens": {start: {"id": start, "ids": [tokenizer.start_id], "tokens": [start]}},
        }
    roles = data["special_tokens"]
    special_map = {SPECIAL_KEYS[role]: roles[role]["token"] for role in SPECIAL_KEYS if roles.get(role)}
    if tokenizer.mask_token is not None:
        special_map["mask_token"] = tokenizer.mask_token
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "model_max_length": model_max_length,
        "clean_up_tokenization_spaces": False,
        **{key: special_map.get(key) for key in [*SPECIAL_KEYS.values(), "mask_token"]},
        "added_tokens_decoder": {str(t["id"]): {k: v for k, v in t.items() if k != "id"}
                                 for t in hf.get("added_tokens") or []},
    }
    if tokenizer.kind != HF_KIND:
        config["add_bos_token"] = True  # what the post-processor template does
    if chat_template is not None:
        config["chat_template"] = chat_template
    return {"tokenizer.json": hf, "tokenizer_config.json": config, "special_tokens_map.json": special_map}
