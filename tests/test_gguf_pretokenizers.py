"""GGUF's named pre-tokenizer rules (gguf_pretokenizers): a byte-level BPE with Llama 3's or SmolLM's rule exports to
a GGUF file naming that rule, and imports back to a tokenizer that cuts text as the original Hugging Face tokenizer
does; llama.cpp's other names for the same rules are read; rules lmforge lacks are refused, naming the ones it has."""

from __future__ import annotations

import json
import shutil
import sys
import unicodedata
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
from test_gguf_export import fields, load_theirs  # noqa: E402
from test_gguf_import import rewrite  # noqa: E402
from test_interop import LLAMA_STYLE, lmforge_run  # noqa: E402

gguf = pytest.importorskip("gguf")
transformers = pytest.importorskip("transformers")
tokenizers = pytest.importorskip("tokenizers")

from lmforge.checkpoint import load_for_inference  # noqa: E402
from lmforge.cli import main  # noqa: E402
from lmforge.generate import prompt_ids  # noqa: E402
from lmforge.interop.gguf_export import GGUFExportError, export_gguf  # noqa: E402
from lmforge.interop.gguf_import import import_gguf  # noqa: E402
from lmforge.interop.gguf_pretokenizers import (CJK, DEEPSEEK_LETTERS, DEEPSEEK_PUNCTUATION,  # noqa: E402
                                                LLAMA3_REGEX, RULES, known_rules, rule_name)
from lmforge.tokenizer import HF_KIND, Tokenizer  # noqa: E402

# Texts where the rules cut differently: digit runs (3-digit groups, single digits, GPT-2's whole runs),
# contractions in capitals (Llama 3's are case-insensitive), newlines and runs of spaces, letters after punctuation,
# symbols among punctuation (DeepSeek-Coder's \p{P} is not DeepSeek-LLM's ASCII class), combining accents (marks
# join tekken's words, not Llama 3's).
CORPUS = ["It's 2024 and we'RE counting: 1234567 apples, 89 pears.\nDon'T stop!\n\n  Indented line",
          "Numbers 3.14159 and 271828; IDs abc123def, x86_64.\r\nWindows line\tand tab",
          "Naïve café owners said: \"we'll see\" -- 1,000,000 times... 床前明月光 2048",
          "print(f'{x}')\n    return x**2  # squared\n",
          "a[i] += b[j]*(c+d); x[i]+=(y+z); // x^2 ~ |y| <tag> Cafe\u0301 na\u0308ive",
          "\u0643\u0627 \u0628\u0627 \u0643\u0627 \u0628\u0627"] * 20  # Arabic: letters of no case
TEXTS = ["It'S 12345 o'clock:\n\n  spaced   out", "abc123def 3.14159 x86_64", "DON'T we'LL 1,000 床前 2048\r\n\tok",
         "  (hello)world...!!  7", "print(f'{x}')\n    return x**2",
         "Cafe\u0301 na\u0308ive", "parseJSONValue camelCase a+b=c $5 ^_^ ~/x|y", "line\tand tab", "x[i]+=(y+z);",
         "Na\u00efve ~ |y| <tag>",
         "x \u3072\u3089\u304c\u306a\u30ab\u30bf\u30ab\u30ca!ok",  # hiragana, katakana: DeepSeek-V3's runs
         "\u0643\u0627 \u0628\u0627",  # DeepSeek-LLM's letters are cased scripts' only: one word for it
         "a xyzzy here"]  # decomposed accents: NFC changes them; xyzzy: a whole-word token (last)
BOS, EOS = "<|begin_of_text|>", "<|end_of_text|>"
UNMERGED = "\u0120xyzzy"  # " xyzzy" in the byte-level alphabet


def hf_tokenizer(rule: str, bos: bool = True):
    """A byte-level BPE trained with the rule's pre-tokenizer as the model's own tokenizer.json has it (written out
    here, not taken from gguf_pretokenizers, but for DeepSeek's character classes), bos added to every text (when
    `bos`)."""
    from tokenizers import AddedToken, Regex, Tokenizer as HFTokenizer, decoders, models, normalizers, pre_tokenizers
    from tokenizers import processors, trainers

    digits = r"\p{N}{1,3}" if rule == "llama-bpe" else r"\p{N}"
    llama3 = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|" + digits + r"| ?[^\s\p{L}\p{N}]+[\r\n]*|"
              r"\s*[\r\n]+|\s+(?!\S)|\s+")
    tekken = (r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+|[^\r\n\p{L}\p{N}]?"
              r"[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|"
              r"\s+(?!\S)|\s+")
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)

    def isolated(regex):
        return pre_tokenizers.Split(Regex(regex), behavior="isolated")

    o200k = (r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+"
             r"(?i:'s|'t|'re|'ve|'m|'ll|'d)?|"
             r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*"
             r"(?i:'s|'t|'re|'ve|'m|'ll|'d)?|"
             r"\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+")
    # DeepSeek-V3's steps, as JSON in its tokenizer.json
    deepseek3 = json.loads(r"""["\\p{N}{1,3}", "[\u4e00-\u9fa5\u3040-\u309f\u30a0-\u30ff]+",
        "[!\"#$%&'()*+,\\-./:;<=>?@\\[\\\\\\]^_`{|}~][A-Za-z]+|[^\r\n\\p{L}\\p{P}\\p{S}]?[\\p{L}\\p{M}]+|"""
                           r""" ?[\\p{P}\\p{S}]+[\r\n]*|\\s*[\r\n]+|\\s+(?!\\S)|\\s+"]""")
    if rule in ("gpt-4o", "deepseek-v3"):  # GPT-4o's (o200k) and DeepSeek-V3's tokenizer.json: merges always
        tok = HFTokenizer(models.BPE())
        steps = [o200k] if rule == "gpt-4o" else deepseek3
        tok.pre_tokenizer = pre_tokenizers.Sequence([*map(isolated, steps), byte_level])
    elif rule in ("llama-bpe", "qwen2", "tekken"):  # Meta's Llama 3 tokenizer.json (Qwen2's: single digits, NFC,
        tok = HFTokenizer(models.BPE(ignore_merges=rule != "qwen2"))  # merges always; Mistral's tekken)
        tok.pre_tokenizer = pre_tokenizers.Sequence([isolated(tekken if rule == "tekken" else llama3), byte_level])
        if rule == "qwen2":
            tok.normalizer = normalizers.NFC()
    elif rule in ("deepseek-coder", "deepseek-llm"):  # DeepSeek's: line breaks, letters, punctuation, CJK, digits
        tok = HFTokenizer(models.BPE())
        steps = (["[\r\n]", r"\s?\p{L}+", r"\s?\p{P}+", CJK] if rule == "deepseek-coder" else
                 ["[\r\n]", DEEPSEEK_LETTERS, DEEPSEEK_PUNCTUATION, r"\s+$", CJK])
        tok.pre_tokenizer = pre_tokenizers.Sequence([*map(isolated, steps), pre_tokenizers.Digits(True), byte_level])
    else:  # SmolLM's: each digit apart, then GPT-2's ByteLevel
        tok = HFTokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                                     pre_tokenizers.ByteLevel(add_prefix_space=False)])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=360, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator(CORPUS, trainer)
    if rule in ("llama-bpe", "tekken"):  # a word in the vocabulary that no merge makes: one token only under ignore_merges
        spec = json.loads(tok.to_str())
        spec["model"]["vocab"][UNMERGED] = len(spec["model"]["vocab"])
        tok = HFTokenizer.from_str(json.dumps(spec))
    tok.add_special_tokens([AddedToken(s, special=True, normalized=False) for s in (BOS, EOS)])
    if bos:
        tok.post_processor = processors.TemplateProcessing(single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B",
                                                           special_tokens=[(BOS, tok.token_to_id(BOS))])
    return tok


def as_lmforge(hf, bos: bool = True) -> Tokenizer:
    return Tokenizer(HF_KIND, hf_json=hf.to_str(), special_ids={"start": hf.token_to_id(BOS) if bos else None,
                                                               "end": hf.token_to_id(EOS), "pad": None})


@pytest.mark.parametrize("rule", ["llama-bpe", "smollm", "qwen2", "deepseek-coder", "deepseek-llm", "tekken", "gpt-4o",
                                  "deepseek-v3"])
def test_a_bpe_with_a_named_rule_goes_through_gguf_and_back_cutting_text_as_the_original(tmp_path, rule):
    hf = hf_tokenizer(rule)
    # the texts tell the rules apart: the same vocabulary and merges under any other rule give other ids somewhere
    for other in RULES:
        if other != rule:
            spec = json.loads(hf.to_str())
            spec["pre_tokenizer"], spec["model"]["ignore_merges"], spec["normalizer"] = RULES[other]
            cut_otherwise = tokenizers.Tokenizer.from_str(json.dumps(spec))
            assert any(cut_otherwise.encode(t).ids != hf.encode(t).ids for t in TEXTS), other
    tok = as_lmforge(hf)
    assert rule_name(json.loads(hf.to_str())) == rule
    if rule in ("llama-bpe", "tekken"):
        assert hf.encode(" xyzzy", add_special_tokens=False).tokens == [UNMERGED]
    run = lmforge_run(tmp_path, tok, **LLAMA_STYLE)
    path = export_gguf(run, tmp_path / "gguf" / "m.gguf")  # alone in its directory, for transformers' reader
    meta = fields(path)
    assert (meta["tokenizer.ggml.model"], meta["tokenizer.ggml.pre"]) == ("gpt2", rule)
    back, back_tok, _ = load_for_inference(import_gguf(path, tmp_path / "back"), "cpu")
    ours, _, _ = load_for_inference(run, "cpu")
    for text in TEXTS:
        assert prompt_ids(back_tok, text) == hf.encode(text).ids == prompt_ids(tok, text), text
        assert back_tok.decode(prompt_ids(back_tok, text)) == (unicodedata.normalize("NFC", text) if rule == "qwen2"
                                                               else text)
    ids = torch.randint(0, tok.vocab_size, (2, 40))
    with torch.no_grad():
        assert torch.equal(back(ids), ours(ids))
    if rule == "llama-bpe":  # transformers' GGUF reader knows Llama 3's rule (not SmolLM's): it cuts text alike
        _, theirs = load_theirs(path, ours.config)  # (but merges every word, as llama.cpp does not: no xyzzy here)
        for text in TEXTS[:-1]:
            assert theirs(text).input_ids == hf.encode(text).ids, text


def test_llama_cpps_other_names_of_a_rule_and_its_default_bos_are_read(tmp_path):
    hf = hf_tokenizer("llama-bpe")
    run = lmforge_run(tmp_path, as_lmforge(hf), **LLAMA_STYLE)
    path = export_gguf(run, tmp_path / "m.gguf")
    # llama3, falcon3 and pixtral are llama.cpp's other names for the rule; without add_bos_token, it adds bos
    for name in ("llama3", "falcon3", "pixtral"):
        renamed = rewrite(path, tmp_path / f"{name}.gguf", {"tokenizer.ggml.pre": name},
                          drop=("tokenizer.ggml.add_bos_token",))
        _, back_tok, _ = load_for_inference(import_gguf(renamed, tmp_path / f"back-{name}"), "cpu")
        for text in TEXTS:
            assert prompt_ids(back_tok, text) == hf.encode(text).ids, (name, text)
        assert back_tok.start_id == hf.token_to_id(BOS)
    # the file's own add_bos_token false wins
    no_bos = rewrite(path, tmp_path / "no-bos.gguf", {"tokenizer.ggml.add_bos_token": False})
    _, plain, _ = load_for_inference(import_gguf(no_bos, tmp_path / "back2"), "cpu")
    assert plain.start_id is None and prompt_ids(plain, TEXTS[0]) == hf.encode(TEXTS[0]).ids[1:]


def test_a_rule_lmforge_lacks_is_refused_on_import_and_export_naming_the_ones_it_has(tmp_path, capsys):
    hf = hf_tokenizer("llama-bpe")
    run = lmforge_run(tmp_path, as_lmforge(hf), **LLAMA_STYLE)
    path = rewrite(export_gguf(run, tmp_path / "m.gguf"), tmp_path / "k2.gguf", {"tokenizer.ggml.pre": "kimi-k2"})
    assert main(["import", str(path), "--out", str(tmp_path / "back")]) == 2
    err = capsys.readouterr().err.strip()
    assert "pre-tokenizer 'kimi-k2'" in err and known_rules() in err and "llama-bpe (also llama3" in err, err
    assert not (tmp_path / "back").exists()
    # digits in runs of any length are neither Llama 3's groups of three nor Qwen2's single digits: not exported
    # under a wrong name; nor is Qwen2's rule without its NFC normalizer
    for regex, normalizer in ((LLAMA3_REGEX.replace(r"\p{N}{1,3}", r"\p{N}+"), None),
                              (LLAMA3_REGEX.replace(r"\p{N}{1,3}", r"\p{N}"), None)):
        spec = json.loads(hf.to_str())
        spec["pre_tokenizer"]["pretokenizers"][0]["pattern"]["Regex"] = regex
        spec["model"]["ignore_merges"], spec["normalizer"] = False, normalizer
        assert rule_name(spec) is None
        other = tmp_path / "other"
        other_run = lmforge_run(other, Tokenizer(HF_KIND, hf_json=json.dumps(spec), special_ids={"start": 0}),
                                **LLAMA_STYLE)
        with pytest.raises(GGUFExportError, match=f"pre-tokenizer rule GGUF names \\({', '.join(RULES)}\\)"):
            export_gguf(other_run, tmp_path / "o.gguf")
        assert not (tmp_path / "o.gguf").exists()
        shutil.rmtree(other)
    # Llama 3's rule without ignore_merges is not what llama.cpp runs for llama-bpe
    spec = json.loads(hf.to_str())
    spec["model"]["ignore_merges"] = False
    assert rule_name(spec) is None
    spec["model"]["ignore_merges"] = True
    spec["pre_tokenizer"]["pretokenizers"][1]["trim_offsets"] = False  # offsets only: the same rule
    assert rule_name(spec) == "llama-bpe"
    spec["normalizer"] = {"type": "NFC"}  # GGUF has no place for a normalizer
    assert rule_name(spec) is None
    # an older tokenizer.json's ByteLevel without use_regex (it defaults to true): GPT-2's rule
    assert rule_name({"pre_tokenizer": {"type": "ByteLevel", "add_prefix_space": False}, "model": {}}) == "gpt-2"
