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
    deepseek-coder  line breaks apart, then letters with one space before them, punctuation likewise, runs of CJK
               ideographs and Hangul, each digit apart (DeepSeek-Coder 1.3B / 6.7B / 33B)
    deepseek-llm    the same with letters of Latin, Greek, Cyrillic and other cased scripts only, ASCII and CJK
               punctuation, trailing spaces apart (DeepSeek-LLM, DeepSeek-Coder 7B v1.5 and V2); llama.cpp keeps
               runs of digits together where the tokenizer.json parts them, which gives the same tokens wherever
               the vocabulary has no token of two digits, as these models' have not
    tekken     Mistral's (Mistral NeMo, Ministral, Pixtral): Llama 3's with words split where a capital follows
               lowercase, each digit apart, no contractions; llama.cpp approximates its letter classes with ASCII
               ones (the same cut for text in Latin scripts) and reads a word that is a token whole, as for Llama 3

Other names llama.cpp gives these rules (ALIASES) are read too: falcon3, falcon-h1, pixtral, lfm2 (Llama 3's),
deepseek-r1-qwen (the Qwen distils of DeepSeek-R1: Qwen2's), phi-2, mpt, olmo (GPT-2's), codeshell, exaone (SmolLM's),
llama4, kanana2, talkie, minimax-m2 (GPT-4o's), hunyuan-dense, hy_v4, joyai-llm (DeepSeek-V3's).
    gpt-4o     tiktoken's o200k (GPT-4o; Llama 4, MiniMax-M2): tekken's words with contractions kept on them (any
               case) and digits in groups of at most three; llama.cpp approximates the letter classes with ASCII ones,
               as for tekken; merges always
    deepseek-v3  digits in groups of at most three, runs of CJK ideographs and kana, then letters (marks joined) with
               one non-letter before them or ASCII punctuation before Latin letters, punctuation and symbols apart
               (DeepSeek-V3, R1; Hunyuan's dense models, JoyAI)

llama.cpp knows more rules (Kimi K2's, ChatGLM4's, ...); files with those are refused on import, naming these.
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


def _isolated(regex: str) -> dict[str, Any]:
    return {"type": "Split", "pattern": {"Regex": regex}, "behavior": "Isolated", "invert": False}


def _split(*regexes: str, digits: bool = False) -> dict[str, Any]:
    """Each regex's matches and the text between them as words (each regex cutting the words of the one before), each
    digit apart (`digits`), then bytes as characters (no regex of its own)."""
    steps = [_isolated(r) for r in regexes] + ([{"type": "Digits", "individual_digits": True}] if digits else [])
    return {"type": "Sequence", "pretokenizers": [*steps, _byte_level(False)]}


CJK = "[\u4e00-\u9fa5\u0800-\u4e00\uac00-\ud7ff]+"  # DeepSeek's: CJK ideographs, U+0800 on, Hangul
# DeepSeek-LLM's letters (of scripts with upper and lower case), as escapes: some (the ohm and kelvin signs, Greek
# with tonos) are characters that Unicode normalization of the source would turn into others, emptying their ranges.
DEEPSEEK_LETTERS = (
    "\\s?[A-Za-z\u00b5\u00c0-\u00d6\u00d8-\u00f6\u00f8-\u01ba\u01bc-\u01bf\u01c4-\u0293\u0295-\u02af\u0370-\u0373"
    "\u0376\u0377\u037b-\u037d\u037f\u0386\u0388-\u038a\u038c\u038e-\u03a1\u03a3-\u03f5\u03f7-\u0481\u048a-\u052f"
    "\u0531-\u0556\u10a0-\u10c5\u13a0-\u13f5\u13f8-\u13fd\u1c90-\u1cba\u1cbd-\u1cbf\u1d00-\u1d2b\u1d6b-\u1d77"
    "\u1d79-\u1d9a\u1e00-\u1f15\u1f18-\u1f1d\u1f20-\u1f45\u1f48-\u1f4d\u1f50-\u1f57\u1f59\u1f5b\u1f5d\u1f5f-\u1f7d"
    "\u1f80-\u1fb4\u1fb6-\u1fbc\u1fbe\u1fc2-\u1fc4\u1fc6-\u1fcc\u1fd0-\u1fd3\u1fd6-\u1fdb\u1fe0-\u1fec\u1ff2-\u1ff4"
    "\u1ff6-\u1ffc\u2102\u2107\u210a-\u2113\u2115\u2119-\u211d\u2124\u2126\u2128\u212a-\u212d\u212f-\u2134\u2139"
    "\u213c-\u213f\u2145-\u2149\u214e\u2183\u2184\u2c00-\u2c7b\u2c7e-\u2ce4\u2ceb-\u2cee\u2cf2\u2cf3\ua640-\ua66d"
    "\ua680-\ua69b\ua722-\ua76f\ua771-\ua787\ua78b-\ua78e\uab70-\uabbf\ufb00-\ufb06\ufb13-\ufb17\uff21-\uff3a"
    "\uff41-\uff5a\U00010400-\U0001044f\U000104b0-\U000104d3\U000104d8-\U000104fb\U00010c80-\U00010cb2"
    "\U00010cc0-\U00010cf2\U000118a0-\U000118df\U0001e900-\U0001e943]+")
DEEPSEEK_PUNCTUATION = "\\s?[!-/:-~\uff01-\uff0f\uff1a-\uff5e\u2018-\u201f\u3000-\u3002]+"  # ASCII, full-width
CONTRACTION = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
# GPT-4o's (tiktoken's o200k, also Llama 4's): tekken's words with contractions kept on them, digits in threes
GPT4O_REGEX = (r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+" + CONTRACTION + "|"
               r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*" + CONTRACTION + "|"
               r"\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+")
CJK_KANA = "[\u4e00-\u9fa5\u3040-\u309f\u30a0-\u30ff]+"  # DeepSeek-V3's: CJK ideographs, hiragana, katakana
# DeepSeek-V3's last step as its tokenizer.json has it (line breaks as the characters themselves, not escapes)
DEEPSEEK3_REGEX = ("[!\"#$%&'()*+,\\-./:;<=>?@\\[\\\\\\]^_`{|}~][A-Za-z]+|[^\r\n\\p{L}\\p{P}\\p{S}]?[\\p{L}\\p{M}]+|"
                   " ?[\\p{P}\\p{S}]+[\r\n]*|\\s*[\r\n]+|\\s+(?!\\S)|\\s+")
TEKKEN_REGEX = (r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+|"
                r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*|\p{N}|"
                r" ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+")


RULES: dict[str, Rule] = {
    "gpt-2": Rule(_byte_level(True), False),
    "llama-bpe": Rule(_split(LLAMA3_REGEX), True),
    "smollm": Rule({"type": "Sequence", "pretokenizers": [
        {"type": "Digits", "individual_digits": True}, _byte_level(True)]}, False),
    "qwen2": Rule(_split(QWEN2_REGEX), False, {"type": "NFC"}),
    "deepseek-coder": Rule(_split("[\r\n]", r"\s?\p{L}+", r"\s?\p{P}+", CJK, digits=True), False),
    "deepseek-llm": Rule(_split("[\r\n]", DEEPSEEK_LETTERS, DEEPSEEK_PUNCTUATION, r"\s+$", CJK, digits=True), False),
    "tekken": Rule(_split(TEKKEN_REGEX), True),
    "gpt-4o": Rule(_split(GPT4O_REGEX), False),
    "deepseek-v3": Rule(_split(r"\p{N}{1,3}", CJK_KANA, DEEPSEEK3_REGEX), False),
}
ALIASES = {"llama3": "llama-bpe", "llama-v3": "llama-bpe", "falcon3": "llama-bpe", "falcon-h1": "llama-bpe",
           "pixtral": "llama-bpe", "lfm2": "llama-bpe", "deepseek-r1-qwen": "qwen2", "phi-2": "gpt-2", "mpt": "gpt-2",
           "olmo": "gpt-2", "starcoder": "smollm", "refact": "smollm", "codeshell": "smollm", "exaone": "smollm",
           "llama4": "gpt-4o", "kanana2": "gpt-4o", "talkie": "gpt-4o", "minimax-m2": "gpt-4o",
           "hunyuan-dense": "deepseek-v3", "hy_v4": "deepseek-v3", "joyai-llm": "deepseek-v3"}
ADDS_BOS = ("llama-bpe", "tekken")  # llama.cpp's default add_bos_token for the rule, where the file does not say


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
