"""SentencePiece-style tokenizers (Llama 2, TinyLlama, Mistral, Gemma): U+2581 for a space, <0xNN> byte tokens for
characters outside the vocabulary, a space written before a text's first word. Imported with their models, they
give transformers' ids and text: decode drops the space the encoding wrote before the first word, a continuation
of a prompt keeps its own (generated text is what transformers' pipeline returns), and exports write them back."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
from test_interop import CORPUS, hf_greedy, max_diff, perturb_norms  # noqa: E402

transformers = pytest.importorskip("transformers")
tokenizers = pytest.importorskip("tokenizers")

import lmforge  # noqa: E402
from lmforge.checkpoint import load_for_inference  # noqa: E402
from lmforge.generate import generate_ids, prompt_ids  # noqa: E402
from lmforge.interop.hf_export import export_hf  # noqa: E402
from lmforge.interop.hf_import import import_hf  # noqa: E402
from lmforge.tokenizer import Tokenizer  # noqa: E402

SPACE = "\u2581"
TEXTS = ["Hello, world!", " a leading space", "two  spaces and a tab\there", "naïve 🙂 Привет\nnext line\n\n",
         "ends with a space ", "", "床前明月光", "<s> written in the text </s>", "\u2581 literally"]
# transformers' styles of a SentencePiece-style tokenizer.json: as its LlamaTokenizer writes it today (Metaspace,
# a space before the first word only), as Llama 2's own file has it (normalizer: prepend U+2581, spaces to U+2581),
# and Gemma's (spaces to U+2581, nothing prepended, nothing stripped)
STYLES = ("llama", "llama2-legacy", "gemma")


def single_start(ids: list[int]) -> list[int]:
    """transformers' ids of a text that writes the start token itself, as lmforge's prompt_ids gives them: one start
    token, not a second before it (transformers adds one regardless)."""
    return ids[1:] if ids[:2] == [1, 1] else ids


def vocab_and_merges() -> tuple[dict[str, int], list[tuple[str, str]]]:
    """A BPE vocabulary learned on CORPUS in Llama 2's layout: <unk> <s> </s>, the 256 <0xNN> bytes, the rest."""
    from tokenizers import models, pre_tokenizers, trainers

    learned = tokenizers.Tokenizer(models.BPE(byte_fallback=True, unk_token="<unk>", fuse_unk=True))
    learned.pre_tokenizer = pre_tokenizers.Metaspace(replacement=SPACE, prepend_scheme="first", split=True)
    learned.train_from_iterator(CORPUS, trainers.BpeTrainer(vocab_size=400, show_progress=False))
    model = json.loads(learned.to_str())["model"]
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{f"<0x{b:02X}>": 3 + b for b in range(256)}}
    for token in sorted(model["vocab"], key=model["vocab"].get):
        vocab.setdefault(token, len(vocab))
    return vocab, [tuple(m) if isinstance(m, list) else tuple(m.split(" ")) for m in model["merges"]]


def save_tokenizer(out: Path, style: str) -> None:
    vocab, merges = vocab_and_merges()
    if style == "llama":
        transformers.LlamaTokenizer(vocab=vocab, merges=merges, add_bos_token=True).save_pretrained(out)
        return
    from tokenizers import decoders, models, normalizers, processors

    tok = tokenizers.Tokenizer(models.BPE(vocab=vocab, merges=merges, byte_fallback=True, unk_token="<unk>",
                                          fuse_unk=True))
    tok.add_special_tokens(["<unk>", "<s>", "</s>"])
    to_space = [decoders.Replace(SPACE, " "), decoders.ByteFallback(), decoders.Fuse()]
    if style == "llama2-legacy":
        tok.normalizer = normalizers.Sequence([normalizers.Prepend(SPACE), normalizers.Replace(" ", SPACE)])
        tok.decoder = decoders.Sequence([*to_space, decoders.Strip(" ", 1, 0)])
    else:
        tok.normalizer = normalizers.Replace(" ", SPACE)
        tok.decoder = decoders.Sequence(to_space)
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B",
                                                       special_tokens=[("<s>", 1)])
    transformers.PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>",
                                         unk_token="<unk>").save_pretrained(out)


@pytest.fixture(scope="module")
def hf_dirs(tmp_path_factory) -> dict[str, Path]:
    """{style: a Llama-style model directory with that style of SentencePiece-style tokenizer}."""
    root = tmp_path_factory.mktemp("spm")
    torch.manual_seed(0)
    vocab_size = len(vocab_and_merges()[0])
    llama = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=vocab_size, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=128, rms_norm_eps=1e-5, tie_word_embeddings=False,
        bos_token_id=1, eos_token_id=2)).eval()
    perturb_norms(llama)
    with torch.no_grad():  # a random model never writes a byte token (a stray one would make invalid UTF-8, which
        llama.lm_head.weight[3:259] = 0.0  # transformers writes one U+FFFD per byte, lmforge per broken character)
    dirs = {}
    for style in STYLES:
        dirs[style] = root / style
        llama.save_pretrained(dirs[style])
        save_tokenizer(dirs[style], style)
    return dirs


@pytest.fixture(scope="module")
def runs(hf_dirs, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("runs")
    return {style: import_hf(hf_dirs[style], root / style).parent.parent for style in STYLES}


def test_the_styles_differ_where_they_should(hf_dirs):
    """The fixture's three styles are three behaviours, so passing for all is not passing for one."""
    theirs = {s: transformers.AutoTokenizer.from_pretrained(hf_dirs[s]) for s in STYLES}
    ids = {s: (tuple(theirs[s]("x").input_ids), tuple(theirs[s](" x").input_ids)) for s in STYLES}
    assert len(set(ids.values())) == 3, ids
    assert theirs["gemma"].decode(theirs["gemma"]("x").input_ids, skip_special_tokens=True) == "x"
    assert theirs["llama"].decode(theirs["llama"](" x").input_ids, skip_special_tokens=True) == "x"


@pytest.mark.parametrize("style", STYLES)
def test_ids_and_text_are_transformers(hf_dirs, runs, style):
    theirs = transformers.AutoTokenizer.from_pretrained(hf_dirs[style])
    _, tok, _ = load_for_inference(runs[style], "cpu")  # through lmforge's tokenizer file
    assert tok.kind == "hf" and (tok.start_id, tok.end_id) == (1, 2)
    assert tok.strips_leading_space == (0 if style == "gemma" else 1)
    for text in TEXTS:
        ids = theirs(text).input_ids
        assert prompt_ids(tok, text) == single_start(ids), text
        assert tok.decode(ids) == theirs.decode(ids, skip_special_tokens=True), text
        assert tok.decode(ids, skip_special=False) == theirs.decode(ids), text
    batch = [prompt_ids(tok, "")[:1] + ids.tolist() for ids in tok.encode_batch_arrays(TEXTS)]
    assert batch == [theirs(t).input_ids for t in TEXTS]
    byte_ids = theirs("🙂").input_ids[1:]  # a character outside the vocabulary: its UTF-8 bytes as <0xNN> tokens
    assert len(byte_ids) >= 4 and tok.decode(byte_ids) == "🙂" == theirs.decode(byte_ids)


@pytest.mark.parametrize("style", ["llama", "llama2-legacy"])
def test_an_imported_model_generates_the_text_transformers_pipeline_gives(hf_dirs, runs, style):
    theirs = transformers.AutoModelForCausalLM.from_pretrained(hf_dirs[style]).eval()
    their_tok = transformers.AutoTokenizer.from_pretrained(hf_dirs[style])
    model, tok, _ = load_for_inference(runs[style], "cpu")
    assert max_diff(model, theirs, torch.randint(0, theirs.config.vocab_size, (2, 30))) <= 1e-5
    prompt = "The quick brown"
    ids = their_tok(prompt).input_ids
    new = hf_greedy(theirs, ids, 20)
    assert generate_ids(model, prompt_ids(tok, prompt), greedy=True, max_new_tokens=20, end_id=tok.end_id)[0] == new
    # the pipeline's text: the whole sequence decoded, less the prompt's text; its first word keeps its space
    expected = their_tok.decode(ids + new, skip_special_tokens=True)[len(their_tok.decode(ids,
                                                                                           skip_special_tokens=True)):]
    assert len(new) >= 10 and SPACE in "".join(their_tok.convert_ids_to_tokens(new)), new
    generator = lmforge.load(str(runs[style]))
    assert generator.generate(prompt, max_new_tokens=20, greedy=True) == expected
    assert "".join(generator.stream(prompt, max_new_tokens=20, greedy=True)) == expected


def test_a_continuation_keeps_the_space_a_whole_text_drops(runs):
    _, tok, _ = load_for_inference(runs["llama"], "cpu")
    word = tok.encode("world")
    assert tok.token_text(word[0]).startswith(" ") and tok.decode(word) == "world"
    stream = tok.stream_decoder()
    assert stream.push(word) + stream.flush() == " world"
    assert tok.decode(prompt_ids(tok, "Hello") + word) == "Hello world"


@pytest.mark.parametrize("style", STYLES)
def test_export_writes_the_tokenizer_transformers_reads_back_the_same(hf_dirs, runs, style, tmp_path):
    export_hf(runs[style], tmp_path / "hf")
    theirs = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
    original = transformers.AutoTokenizer.from_pretrained(hf_dirs[style])
    for text in TEXTS:
        ids = original(text).input_ids
        assert theirs(text).input_ids == ids, text
        assert theirs.decode(ids, skip_special_tokens=True) == original.decode(ids, skip_special_tokens=True)
    model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    ours, _, _ = load_for_inference(runs[style], "cpu")
    assert max_diff(ours, model, torch.randint(0, model.config.vocab_size, (2, 30))) <= 1e-5
    again = import_hf(tmp_path / "hf", tmp_path / "again")
    back = Tokenizer.load(again / "tokenizer.json")
    assert [back.encode(t) for t in TEXTS] == [ours_tok.encode(t) for ours_tok in [load_for_inference(
        runs[style], "cpu")[1]] for t in TEXTS]
    assert back.strips_leading_space == (0 if style == "gemma" else 1)


def test_lmforges_own_char_tokenizer_exported_to_hugging_face_imports_back(tmp_path):
    """Its HF file is byte fallback without U+2581 (each character a token): read back with the same ids."""
    from test_interop import GPT2_STYLE, lmforge_run
    from lmforge.tokenizer import train_char

    tok = train_char(CORPUS, 300)
    run = lmforge_run(tmp_path, tok, **GPT2_STYLE)
    export_hf(run, tmp_path / "hf")
    back = Tokenizer.load(import_hf(tmp_path / "hf", tmp_path / "back") / "tokenizer.json")
    assert back.kind == "hf" and back.strips_leading_space == 0
    for text in [*TEXTS, CORPUS[1]]:
        assert back.encode(text) == tok.encode(text) and back.decode(tok.encode(text)) == text


@pytest.mark.parametrize("decoder", [
    {"type": "Sequence", "decoders": [{"type": "Replace", "pattern": {"String": SPACE}, "content": " "},
                                      {"type": "Fuse"}, {"type": "Strip", "content": " ", "start": 1, "stop": 0}]},
    {"type": "Metaspace", "replacement": SPACE, "prepend_scheme": "first", "split": False},
    {"type": "Metaspace", "replacement": SPACE, "prepend_scheme": "never", "split": False},
    {"type": "Sequence", "decoders": [{"type": "ByteFallback"},
                                      {"type": "Metaspace", "replacement": SPACE, "prepend_scheme": "always",
                                       "split": True}]},
], ids=["no-byte-fallback", "metaspace", "metaspace-never", "byte-fallback-metaspace"])
def test_other_sentencepiece_decoders_decode_as_the_tokenizers_library_does(hf_dirs, tmp_path, decoder):
    """Older files' decoders (Metaspace alone; no ByteFallback, where <0xNN> are text) decode as tokenizers does."""
    spec = json.loads((hf_dirs["llama2-legacy"] / "tokenizer.json").read_text(encoding="utf-8"))
    spec["decoder"] = decoder
    shutil.copytree(hf_dirs["llama2-legacy"], tmp_path / "hf")
    (tmp_path / "hf" / "tokenizer.json").write_text(json.dumps(spec), encoding="utf-8")
    reference = tokenizers.Tokenizer.from_file(str(tmp_path / "hf" / "tokenizer.json"))
    tok = Tokenizer.load(import_hf(tmp_path / "hf", tmp_path / "run") / "tokenizer.json")
    for text in TEXTS:
        ids = reference.encode(text).ids
        assert tok.decode(ids) == reference.decode(ids), (text, ids)


def test_serve_echoes_the_prompt_with_each_tokens_text_at_its_offset(runs):
    """OpenAI completions with echo and logprobs: the text is the prompt as decoded whole (no space before its first
    word), then the continuation with its own; each token's text_offset points at that token's text in it."""
    import httpx

    from lmforge.serve import ServeConfig, load_app
    from test_serve import running

    prompt = "The quick brown fox"
    app = load_app(str(runs["llama"]), ServeConfig(max_tokens=100), device="cpu")
    with running(app) as url:
        body = {"prompt": prompt, "max_tokens": 8, "logprobs": 1, "echo": True, "temperature": 0}
        choice = httpx.post(url + "/v1/completions", json=body, timeout=60).json()["choices"][0]
    generator = lmforge.load(str(runs["llama"]))
    assert choice["text"] == prompt + generator.generate(prompt, max_new_tokens=8, greedy=True)
    tokens, offsets = choice["logprobs"]["tokens"], choice["logprobs"]["text_offset"]
    assert tokens[0] == "<s>" and offsets[:2] == [0, 0] and len(tokens) == len(prompt_ids(generator.tokenizer,
                                                                                          prompt)) + 8
    for k in range(1, len(tokens)):  # every token's text sits at its offset (the first word's without its space)
        text = tokens[k] if k > 1 else tokens[k].lstrip(" ")
        if text.startswith("<0x"):  # a byte of a character cut between tokens
            continue
        assert choice["text"][offsets[k]:offsets[k] + len(text)] == text, (k, tokens[k], offsets[k])
