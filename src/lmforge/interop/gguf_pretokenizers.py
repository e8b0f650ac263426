"""The pre-tokenizer rules of byte-level BPE tokenizers by llama.cpp's names (GGUF's tokenizer.ggml.pre), each as
the Hugging Face `tokenizers` pre_tokenizer that cuts text the same way.

A BPE vocabulary's merges were learned inside words cut by one rule; the same text cut by another rule gets other
ids. GGUF names the rule instead of spelling it out, so export must recognise a tokenizer's rule and import must
rebuild it:

    gpt-2      GPT-2's regex (contractions, letters, digits, other characters, each run with the space before it)
    llama-bpe  Llama 3's regex (also tiktoken's cl100k): contractions in any case, letters with one non-letter before
               them, digits in groups of at most three, newlines apart. llama.cpp reads a word that is itself a
               token as that token before merging (Hugging Face's ignore_merges), and adds the bos token to every
               text unless the file says otherwise.
    smollm     each digit a word of its own, then GPT-2's regex (SmolLM; llama.cpp's StarCoder and Refact rules)

llama.cpp knows many more rules (Qwen2's, DeepSeek's, ...); files with those are refused on import, naming these.
"""

from __future__ import annotations

from typing import Any, Optional

LLAMA3_REGEX = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|"
                r"\s*[\r\n]+|\s+(?!\S)|\s+")


def _byte_level(use_regex: bool) -> dict[str, Any]:
    return {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": use_regex}


# name: (pre_tokenizer JSON, ignore_merges)
RULES: dict[str, tuple[dict[str, Any], bool]] = {
    "gpt-2": (_byte_level(True), False),
    "llama-bpe": ({"type": "Sequence", "pretokenizers": [
        {"type": "Split", "pattern": {"Regex": LLAMA3_REGEX}, "behavior": "Isolated", "invert": False},
        _byte_level(False)]}, True),
    "smollm": ({"type": "Sequence", "pretokenizers": [
        {"type": "Digits", "individual_digits": True}, _byte_level(True)]}, False),
}
ALIASES = {"llama3": "llama-bpe", "llama-v3": "llama-bpe", "starcoder": "smollm", "refact": "smollm"}
ADDS_BOS = ("llama-bpe",)  # llama.cpp's default add_bos_token for the rule, where the file does not say


def known_rules() -> str:
    """The rules import reads, for messages: 'gpt-2, llama-bpe (also llama3, llama-v3), smollm (...)'."""
    return ", ".join(name + (f" (also {', '.join(a for a, n in ALIASES.items() if n == name)})"
                             if name in ALIASES.values() else "") for name in RULES)


def rule_for(name: Optional[str]) -> Optional[str]:
    """The rule's name in RULES for a file's tokenizer.ggml.pre (an alias resolved), or None if lmforge lacks it."""
    name = ALIASES.get(name, name)
    return name if name in RULES else None


def _parts(pre: Any) -> list[dict[str, Any]]:
    """A pre_tokenizer as its list of steps (a Sequence flattened), ByteLevel's trim_offsets dropped: it changes
    the offsets of tokens in the text, never the ids."""
    if not isinstance(pre, dict):
        return []
    if pre.get("type") == "Sequence":
        return [part for step in pre.get("pretokenizers") or [] for part in _parts(step)]
    part = {k: v for k, v in pre.items() if not (pre.get("type") == "ByteLevel" and k == "trim_offsets")}
    if part.get("type") == "ByteLevel":
        part.setdefault("use_regex", True)  # tokenizer.json files older than the key: GPT-2's regex
    return [part]


def rule_name(hf_json: dict[str, Any]) -> Optional[str]:
    """The llama.cpp name of a tokenizer.json's rule (its pre_tokenizer and the model's ignore_merges), or None when
    it is none of RULES or the tokenizer normalizes text first (GGUF has no place for a normalizer)."""
    if hf_json.get("normalizer"):
        return None
    ignore_merges = bool((hf_json.get("model") or {}).get("ignore_merges"))
    for name, (pre, ignores) in RULES.items():
        if _parts(hf_json.get("pre_tokenizer")) == _parts(pre) and ignore_merges == ignores:
            return name
    return None
