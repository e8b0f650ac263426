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
    qwen2      Llama 3's regex with each digit apart (Qwen2, Qwen2.5), after Unicode NFC normalization: Qwen2's
               tokenizer.json normalizes, llama.cpp does not (text already in NFC, as nearly all text is, is cut
               alike; GGUF has no place for a normalizer, so no other tokenizer that normalizes is written)

llama.cpp knows many more rules (DeepSeek's, GPT-4o's, ...); files with those are refused on import, naming these.
"""

from __future__ import annotations

from typing import Any, NamedTuple, Optional

LLAMA3_REGEX = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|"
                r"\s*[\r\n]+|\s+(?!\S)|\s+")
QWEN2_REGEX = LLAMA3_REGEX.replace(r"\p{N}{1,3}", r"\p{N}")


class Rule(NamedTuple):
    pre_tokenizer: dict[str, Any]  # Hugging Face tokenizer.json's "pre_tokenizer"
    ignore_merges: bool  # a word that is itself a token is that token
    normalizer: Optional[dict[str, Any]] = None  # tokenizer.json's "normalizer"


def _byte_level(use_regex: bool) -> dict[str, Any]:
    return {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": use_regex}


def _split(regex: str) -> dict[str, Any]:
    """The regex's matches and the text between them as words, then bytes as characters (no regex of its own)."""
    return {"type": "Sequence", "pretokenizers": [
        {"type": "Split", "pattern": {"Regex": regex}, "behavior": "Isolated", "invert": False}, _byte_level(False)]}


RULES: dict[str, Rule] = {
    "gpt-2": Rule(_byte_level(True), False),
    "llama-bpe": Rule(_split(LLAMA3_REGEX), True),
    "smollm": Rule({"type": "Sequence", "pretokenizers": [
        {"type": "Digits", "individual_digits": True}, _byte_level(True)]}, False),
    "qwen2": Rule(_split(QWEN2_REGEX), False, {"type": "NFC"}),
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
    """The llama.cpp name of a tokenizer.json's rule (its pre_tokenizer, the model's ignore_merges, its normalizer),
    or None when it is none of RULES."""
    ignore_merges = bool((hf_json.get("model") or {}).get("ignore_merges"))
    for name, rule in RULES.items():
        if (_parts(hf_json.get("pre_tokenizer")) == _parts(rule.pre_tokenizer) and ignore_merges == rule.ignore_merges
                and (hf_json.get("normalizer") or None) == rule.normalizer):
            return name
    return None
