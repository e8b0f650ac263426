"""What the rest of lmforge does with an imported SentencePiece-style tokenizer (Llama 2, TinyLlama, Mistral, Gemma),
each part against transformers on the same files: prepared documents and fine-tuning examples are transformers' ids
(and a model trains on them from the imported weights), a Llama 2 chat template gives apply_chat_template's ids,
guided decoding keeps to its pattern or choices, token healing and stop strings give the text of the tokens
transformers decodes (its own stop strings end on the same token), bits per byte count the text's bytes, and GloVe
vectors land on the tokens whose text is the word.

Two things differ from a byte-level BPE: U+2581 spells a space, and the encoding writes one before a text's first
word, which decoding a whole text drops and a continuation of a prompt keeps. Any part that encodes or decodes a
piece of text alone (a completion, a chat without its bos, a choice, a token) meets that space."""

from __future__ import annotations

import json
import re
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
from test_interop import CORPUS  # noqa: E402
from test_sentencepiece import SPACE, STYLES, hf_dirs, runs  # noqa: E402,F401  (hf_dirs, runs: fixtures)

transformers = pytest.importorskip("transformers")

import lmforge  # noqa: E402
import lmforge.cli  # noqa: E402
from lmforge.checkpoint import load_for_inference  # noqa: E402
from lmforge.data.shards import load_split, read_manifest  # noqa: E402
from lmforge.data.tasks import load_examples  # noqa: E402
from lmforge.generate import prompt_ids  # noqa: E402
from lmforge.generate.healing import heal  # noqa: E402
from lmforge.interop.hf_import import import_hf  # noqa: E402

# Llama 2's own chat template (meta-llama/Llama-2-7b-chat-hf's tokenizer_config.json): a bos before every user turn
LLAMA2_CHAT = (
    "{% if messages[0]['role'] == 'system' %}{% set loop_messages = messages[1:] %}"
    "{% set system_message = messages[0]['content'] %}{% else %}{% set loop_messages = messages %}"
    "{% set system_message = false %}{% endif %}{% for message in loop_messages %}"
    "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if loop.index0 == 0 and system_message != false %}"
    "{% set content = '<<SYS>>\\n' + system_message + '\\n<</SYS>>\\n\\n' + message['content'] %}"
    "{% else %}{% set content = message['content'] %}{% endif %}"
    "{% if message['role'] == 'user' %}{{ bos_token + '[INST] ' + content.strip() + ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}{{ ' '  + content.strip() + ' ' + eos_token }}{% endif %}{% endfor %}")
MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello, who are you?"},
            {"role": "assistant", "content": "A small model."}, {"role": "user", "content": "Say the quick fox."}]
DOCUMENTS = [f"{line} ({n})" for n, line in enumerate(CORPUS[:3] * 8)] + [
    "naïve 🙂 Привет\nnext line", "two  spaces and a tab\there", "\u2581 literally", "床前明月光"]
RECORDS = [{"prompt": f"Question {n}: what follows {word}?", "completion": f"{word} fox jumps."}
           for n, word in enumerate(["The quick", "brown", "Hello,", "the lazy", "床前", "Привет,"] * 2)]
PLAIN = "{prompt}\n"  # lmforge's default sft template
# the Llama-style styles write a space before a text's first word; Gemma's writes none
SPACE_FIRST = [s for s in STYLES if s != "gemma"]


def their_tokenizer(hf_dirs, style: str):
    return transformers.AutoTokenizer.from_pretrained(hf_dirs[style])


def checkpoint(run: Path) -> Path:
    return next((run / "checkpoints").iterdir())


def write_jsonl(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def sft_sets(runs, tmp_path_factory) -> dict[str, Path]:
    """{style: prompt/completion records (RECORDS) prepared as sft data with that style's imported tokenizer}."""
    root = tmp_path_factory.mktemp("sft")
    records = write_jsonl(root / "qa.jsonl", RECORDS)
    for style in STYLES:
        assert lmforge.cli.main(["prepare", str(records), "--task", "sft", "--tokenizer", str(runs[style]),
                                 "--out", str(root / style), "--split", "0.5,0.25,0.25"]) == 0
    return {style: root / style for style in STYLES}


@pytest.fixture(scope="module")
def chat_runs(hf_dirs, tmp_path_factory) -> dict[str, tuple[Path, Path]]:
    """{style: (Hugging Face directory, run): the model with Llama 2's chat template, imported}."""
    root = tmp_path_factory.mktemp("chat")
    out = {}
    for style in STYLES:
        shutil.copytree(hf_dirs[style], root / "hf" / style)
        theirs = transformers.AutoTokenizer.from_pretrained(root / "hf" / style)
        theirs.chat_template = LLAMA2_CHAT
        theirs.save_pretrained(root / "hf" / style)
        out[style] = root / "hf" / style, import_hf(root / "hf" / style, root / "runs" / style).parent.parent
    return out


def all_examples(data: Path) -> list[tuple[list[int], int]]:
    """(ids, prompt length) of every example of every split of task data."""
    out = []
    for split in ("train", "val", "test"):
        examples = load_examples(data, split)
        for e in range(len(examples)):
            prompt, completion = examples.prompt_and_completion(e)
            out.append((prompt + completion, len(prompt)))
    return out


# ---------------------------------------------------------------------------------------- prepare and train
@pytest.mark.parametrize("style", STYLES)
def test_prepared_documents_are_transformers_ids_and_a_model_trains_on_them_from_the_imported_weights(
        hf_dirs, runs, style, tmp_path):
    theirs = their_tokenizer(hf_dirs, style)
    docs = write_jsonl(tmp_path / "docs.jsonl", [{"text": d} for d in DOCUMENTS])
    tokenizer_file = checkpoint(runs[style]) / "tokenizer.json"
    assert lmforge.cli.main(["prepare", str(docs), "--tokenizer", str(tokenizer_file), "--out", str(tmp_path / "data"),
                             "--split", "0.45,0.45,0.1", "--no-progress"]) == 0
    # every document as lmforge lays it out (start + ids + end) is transformers' ids with the end token after them
    laid_out = []
    for split in ("train", "val", "test"):
        tokens = load_split(tmp_path / "data", split).tolist()
        starts = [i for i, t in enumerate(tokens) if t == theirs.bos_token_id] + [len(tokens)]
        assert starts[0] == 0
        laid_out += [tokens[a:b] for a, b in zip(starts, starts[1:])]
    assert sorted(laid_out) == sorted(theirs(d).input_ids + [theirs.eos_token_id] for d in DOCUMENTS)
    manifest = read_manifest(tmp_path / "data")
    assert manifest["vocab_size"] == len(theirs)
    assert sum(e["bytes"] for e in manifest["splits"].values()) == sum(len(d.encode("utf-8")) for d in DOCUMENTS)
    # the imported weights score the prepared tokens as transformers scores them
    start, tok, _ = load_for_inference(runs[style], "cpu")
    model = transformers.AutoModelForCausalLM.from_pretrained(hf_dirs[style]).eval()
    val = torch.tensor(load_split(tmp_path / "data", "val")[:129].tolist())[None]  # (1, block_size + 1)
    with torch.no_grad():
        ours = torch.nn.functional.cross_entropy(start(val[:, :-1])[0], val[0, 1:])
        assert abs(float(ours) - float(model(val, labels=val).loss)) < 1e-5
    # two steps of training from them: the weights move, the tokenizer stays the imported one
    assert lmforge.cli.main(["train", "--data", str(tmp_path / "data"), "--run-dir", str(tmp_path / "ft"),
                             "--max-steps", "2", "--train.init_from", str(runs[style]), "--train.batch_size", "2",
                             "--train.device", "cpu", "--train.num_threads", "1"]) == 0
    tuned, tuned_tok, _ = load_for_inference(tmp_path / "ft", "cpu")
    assert tuned_tok.to_dict() == tok.to_dict()
    assert any(not torch.equal(a, b) for a, b in zip(tuned.parameters(), start.parameters()))


@pytest.mark.parametrize("style", STYLES)
def test_sft_examples_begin_with_transformers_prompt_ids_and_train_from_the_imported_weights(
        hf_dirs, runs, sft_sets, style, tmp_path):
    theirs = their_tokenizer(hf_dirs, style)
    prompts = {tuple(theirs(PLAIN.format(**r)).input_ids): r for r in RECORDS}
    examples = all_examples(sft_sets[style])
    assert len(examples) == len(RECORDS)
    for ids, p in examples:
        assert tuple(ids[:p]) in prompts and ids[-1] == theirs.eos_token_id  # bos + the prompt's ids ... eos
    assert lmforge.cli.main(["train", "--data", str(sft_sets[style]), "--run-dir", str(tmp_path / "ft"),
                             "--max-steps", "2", "--train.init_from", str(runs[style]), "--train.batch_size", "2",
                             "--train.device", "cpu", "--train.num_threads", "1"]) == 0
    tuned = lmforge.load(str(tmp_path / "ft"))
    assert tuned.template["prompt"] == PLAIN and tuned.tokenizer.to_dict() == load_for_inference(
        runs[style], "cpu")[1].to_dict()


@pytest.mark.parametrize("style", STYLES)
def test_an_sft_example_is_transformers_tokenization_of_the_prompt_followed_by_the_completion(
        hf_dirs, runs, sft_sets, style):
    """TRL's SFTTrainer tokenizes prompt + completion as one text (and takes the loss where the prompt's ids end)."""
    theirs = their_tokenizer(hf_dirs, style)
    tok = load_for_inference(runs[style], "cpu")[1]
    texts = {tuple(theirs(PLAIN.format(**r)).input_ids): PLAIN.format(**r) + r["completion"] for r in RECORDS}
    for ids, p in all_examples(sft_sets[style]):
        text = texts[tuple(ids[:p])]
        assert tok.decode(ids) == text  # the tokens read as the record's text, nothing added between its parts
        assert ids == theirs(text).input_ids + [theirs.eos_token_id]


# ---------------------------------------------------------------------------------------------------- chat
@pytest.mark.parametrize("style", STYLES)
def test_a_llama2_chat_template_gives_the_ids_transformers_apply_chat_template_gives(chat_runs, style, tmp_path):
    hf_dir, run = chat_runs[style]
    theirs = transformers.AutoTokenizer.from_pretrained(hf_dir)
    generator = lmforge.load(str(run))
    assert generator.tokenizer.chat_template == LLAMA2_CHAT
    for n in (2, 4):  # a system message and a question; then an answer (with </s>) and a second question (<s>)
        kw = dict(add_generation_prompt=True, chat_template=LLAMA2_CHAT)
        text = generator.render_chat(MESSAGES[:n])
        assert theirs.apply_chat_template(MESSAGES[:n], tokenize=False, **kw) == text  # its bos included
        their_ids = list(theirs.apply_chat_template(MESSAGES[:n], tokenize=True, return_dict=True, **kw)["input_ids"])
        assert prompt_ids(generator.tokenizer, text) == their_ids
    # fine-tuning data in this format: each example's prompt is those same ids
    records = [{"messages": [*MESSAGES[:n], {"role": "assistant", "content": f"Reply {k}."}]}
               for k in range(3) for n in (2, 4)]
    assert lmforge.cli.main(["prepare", str(write_jsonl(tmp_path / "chat.jsonl", records)), "--task", "sft",
                             "--tokenizer", str(run), "--out", str(tmp_path / "data"), "--split", "0.5,0.25,0.25"]) == 0
    expected = {tuple(theirs.apply_chat_template(r["messages"][:-1], tokenize=True, return_dict=True,
                                                 add_generation_prompt=True)["input_ids"]) for r in records}
    examples = all_examples(tmp_path / "data")
    assert len(examples) == len(records) and {tuple(ids[:p]) for ids, p in examples} == expected


# ---------------------------------------------------------------------------------------------- generation
def continuation(theirs, prompt: list[int], new: list[int]) -> str:
    """The text `new` adds to `prompt`, as transformers decodes them: the whole less the prompt (its first word's space
    kept, as vLLM and transformers 4's pipeline give it)."""
    whole = theirs.decode(prompt + new, skip_special_tokens=True)
    head = theirs.decode(prompt, skip_special_tokens=True)
    assert whole.startswith(head)
    return whole[len(head):]


@pytest.mark.parametrize("style", STYLES)
def test_guided_choice_answers_with_exactly_one_of_the_choices(hf_dirs, runs, style):
    theirs = their_tokenizer(hf_dirs, style)
    generator = lmforge.load(str(runs[style]))
    choices = ["yes", "no", "maybe so"]
    for prompt in ("Answer:", "The quick brown", "Hello,\n"):
        got = generator.complete([prompt], greedy=True, guided_choice=choices, max_new_tokens=12)[0][0]
        assert got.text in choices and got.finish_reason == "stop", (prompt, got.text)
        assert continuation(theirs, prompt_ids(generator.tokenizer, prompt), got.token_ids) == got.text


PATTERNS = {r" ?(quick|lazy) (fox|dog)\.": r" ?(quick|lazy) (fox|dog)\.",  # pattern: what a prefix of a match is
            r"[a-z]+ [0-9]+": r"[a-z]*|[a-z]+ [0-9]*"}


@pytest.mark.parametrize("style", STYLES)
def test_guided_regex_and_json_keep_to_the_pattern_and_the_text_is_what_the_tokens_continue_the_prompt_with(
        hf_dirs, runs, style):
    theirs = their_tokenizer(hf_dirs, style)
    generator = lmforge.load(str(runs[style]))
    schema = {"type": "object", "properties": {"animal": {"enum": ["fox", "dog"]},
                                               "n": {"type": "integer", "minimum": 0, "maximum": 99}},
              "required": ["animal", "n"]}
    spaces = 0
    for prompt in ("The quick brown", "Hello,", "床前明月光"):
        ids = prompt_ids(generator.tokenizer, prompt)
        for pattern, prefix in PATTERNS.items():
            got = generator.complete([prompt], greedy=True, guided_regex=pattern, max_new_tokens=12)[0][0]
            assert re.fullmatch(pattern if got.finish_reason == "stop" else prefix, got.text), (pattern, got.text)
            assert continuation(theirs, ids, got.token_ids) == got.text
            assert "".join(generator.stream(prompt, greedy=True, guided_regex=pattern, max_new_tokens=12)) == got.text
            spaces += theirs.convert_ids_to_tokens(got.token_ids[:1])[0].startswith(SPACE)
        got = generator.complete([prompt], greedy=True, guided_json=schema, max_new_tokens=40)[0][0]
        assert got.finish_reason == "stop" and json.loads(got.text)["animal"] in ("fox", "dog")
        assert continuation(theirs, ids, got.token_ids) == got.text
    assert spaces  # some answer starts with a word's space (U+2581): the pattern saw it as a space


@pytest.mark.parametrize("style", STYLES)
def test_token_healing_text_is_what_transformers_decodes_of_the_healed_prompt_and_its_continuation(
        hf_dirs, runs, style):
    theirs = their_tokenizer(hf_dirs, style)
    model = transformers.AutoModelForCausalLM.from_pretrained(hf_dirs[style]).eval()
    generator = lmforge.load(str(runs[style]))
    tok = generator.tokenizer
    changed, spaced = 0, 0
    for prompt in ("The quick bro", "Hello, wor", "Привет, ми", "Hello, ", "wor", "the"):
        ids = prompt_ids(tok, prompt)
        healed, lead = heal(generator.model, tok, ids)
        assert healed[:-1] == ids[:-1] and tok.id_to_bytes(healed[-1]) == tok.id_to_bytes(ids[-1]) + lead
        got = generator.complete([prompt], greedy=True, token_healing=True, max_new_tokens=8)[0][0]
        with torch.no_grad():
            their_new = model.generate(torch.tensor([healed]), max_new_tokens=8, do_sample=False)[0, len(healed):]
        assert got.token_ids == their_new.tolist()[:len(got.token_ids)]
        # the prompt as written, then the new text: transformers' text of the healed prompt and the new tokens
        assert tok.decode(ids) + got.text == theirs.decode(healed + got.token_ids, skip_special_tokens=True)
        assert got.text.encode("utf-8").startswith(lead)
        assert "".join(generator.stream(prompt, greedy=True, token_healing=True, max_new_tokens=8)) == got.text
        changed += healed[-1] != ids[-1]
        spaced += healed[-1] != ids[-1] and theirs.convert_ids_to_tokens(healed[-1]).startswith(SPACE)
    assert changed >= 2 and spaced  # a prompt ending in a space ("Hello, ") heals into a word with its space


@pytest.mark.parametrize("style", STYLES)
def test_stop_strings_end_on_the_token_transformers_stops_on_and_the_text_ends_before_them(hf_dirs, runs, style):
    """Stop strings that begin with a word's space (U+2581), end inside a token or span two, including the space before
    the first new word that a continuation keeps; generate and stream agree."""
    theirs = their_tokenizer(hf_dirs, style)
    model = transformers.AutoModelForCausalLM.from_pretrained(hf_dirs[style]).eval()
    generator = lmforge.load(str(runs[style]))
    first_word_space = 0
    for prompt in ("The quick brown", "Hello,"):
        ids = prompt_ids(generator.tokenizer, prompt)
        with torch.no_grad():
            new = model.generate(torch.tensor([ids]), max_new_tokens=20, do_sample=False)[0, len(ids):].tolist()
        text = continuation(theirs, ids, new)
        head = theirs.decode(ids, skip_special_tokens=True)
        cases = []  # (stop string, where in the text it begins)
        for k, piece in enumerate(theirs.convert_ids_to_tokens(new)):
            at = len(continuation(theirs, ids, new[:k]))
            if piece.startswith(SPACE) and len(piece) > 2 and (head + text).find(text[at:at + 2]) == len(head) + at:
                cases.append((text[at:at + 2], at))  # the word's space and its first character
                if at and new[k - 1] not in theirs.all_special_ids and \
                        (head + text).find(text[at - 1:at + 2]) == len(head) + at - 1:
                    cases.append((text[at - 1:at + 2], at - 1))  # across the boundary (a special token has no text)
                first_word_space += k == 0
        assert cases, (prompt, text)
        for stop, at in cases:
            with torch.no_grad():
                their_ids = model.generate(torch.tensor([ids]), max_new_tokens=20, do_sample=False,
                                           stop_strings=[stop], tokenizer=theirs)[0, len(ids):].tolist()
            got = generator.complete([prompt], greedy=True, max_new_tokens=20, stop_strings=[stop])[0][0]
            assert got.token_ids == their_ids and got.finish_reason == "stop", stop
            assert got.text == text[:at] == generator.generate(prompt, greedy=True, max_new_tokens=20,
                                                               stop_strings=[stop])
            assert "".join(generator.stream(prompt, greedy=True, max_new_tokens=20, stop_strings=[stop])) == got.text
    assert first_word_space or style not in SPACE_FIRST  # "Hello," goes on with a word (U+2581 Hello,)


@pytest.mark.parametrize("style", STYLES)
def test_a_bad_word_is_banned_at_the_start_of_the_text_and_after_a_space(hf_dirs, runs, style):
    theirs = their_tokenizer(hf_dirs, style)
    generator = lmforge.load(str(runs[style]))
    words = {theirs.convert_tokens_to_ids(t) for t in ("small", SPACE + "small")}  # the word alone and after a space
    pushed = {t: 12.0 for t in words}  # the model would write them: the ban must win
    for prompt in ("Hello,\n", "Hello, (", "The quick brown"):
        free = generator.complete([prompt], greedy=True, max_new_tokens=6, logit_bias=pushed)[0][0]
        assert set(free.token_ids) & words
        banned = generator.complete([prompt], greedy=True, max_new_tokens=6, logit_bias=pushed,
                                    bad_words=["small"])[0][0]
        assert not set(banned.token_ids) & words, (prompt, banned.text)


# ---------------------------------------------------------------------------------------- counts and words
@pytest.mark.parametrize("style", STYLES)
def test_bits_per_byte_of_text_files_count_the_texts_utf8_bytes(hf_dirs, runs, style, tmp_path):
    from lmforge.eval.perplexity import evaluate_checkpoint

    texts = [d for d in DOCUMENTS if SPACE not in d][-6:]  # (a U+2581 written in a text decodes as a space)
    docs = write_jsonl(tmp_path / "docs.jsonl", [{"text": d} for d in texts])
    result = evaluate_checkpoint(str(runs[style]), texts=[str(docs)], device="cpu")
    theirs = their_tokenizer(hf_dirs, style)
    # the tokens predicted: every document's ids and its end token, all but the first token
    assert result["tokens"] == sum(len(theirs(d).input_ids) + 1 for d in texts) - 1
    assert result["bytes"] == sum(len(d.encode("utf-8")) for d in texts)


@pytest.mark.parametrize("style", STYLES)
def test_glove_vectors_go_to_the_tokens_whose_text_is_the_word(hf_dirs, runs, style, tmp_path):
    """data.embedding_init=glove: a token takes the vector of its text, stripped of spaces, or lower-cased; a
    SentencePiece token's text (U+2581 Hello,) is transformers' decoding of it."""
    from lmforge.data.embeddings import init_embeddings

    theirs = their_tokenizer(hf_dirs, style)
    model, tok, _ = load_for_inference(runs[style], "cpu")
    words = ["hello,", "quick", "the", "привет,", "床前明月", "a", "fox", "is"]
    rng = np.random.default_rng(0)
    glove = tmp_path / "glove.txt"
    glove.write_text("".join(w + " " + " ".join(f"{x:.4f}" for x in rng.normal(size=model.config.n_embd)) + "\n"
                             for w in words), encoding="utf-8")
    weight = model.tok_emb.weight.detach().clone()
    report = init_embeddings(weight, f"glove:{glove}", tmp_path, tok, seed=0)
    changed = {i for i in range(tok.vocab_size) if not torch.equal(weight[i], model.tok_emb.weight[i])}
    expected = set()
    for i in range(len(theirs)):
        text = theirs.decode([i])
        if i not in theirs.all_special_ids and "\ufffd" not in text and {text, text.strip(),
                                                                          text.strip().lower()} & set(words):
            expected.add(i)
    assert changed == expected and report["rows_initialised"] == len(expected)
    assert {theirs.convert_ids_to_tokens(i) for i in expected} >= {SPACE + "the", SPACE + "quick", SPACE + "Hello,"}
