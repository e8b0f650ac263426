"""Hugging Face interop: import HF directories, export to HF and ONNX, and the GPT-2 example end to end.

Every HF model and tokenizer here is built locally (random weights, a byte-level BPE trained on a few
sentences) and saved with save_pretrained into a temp directory; nothing touches the network.
"""

import json
import os
import pickle
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
transformers = pytest.importorskip("transformers")
tokenizers = pytest.importorskip("tokenizers")

from lmforge.checkpoint import load_for_inference, read_run_config, save_checkpoint  # noqa: E402
from lmforge.cli import main  # noqa: E402
from lmforge.config import ModelConfig, RunConfig  # noqa: E402
from lmforge.errors import LmforgeError  # noqa: E402
from lmforge.generate import generate_ids, prompt_ids  # noqa: E402
from lmforge.interop.hf_export import HFExportError, converter_for_model, export_hf  # noqa: E402
from lmforge.interop.hf_import import HFImportError, hf_to_lmforge, import_hf  # noqa: E402
from lmforge.model import GPT  # noqa: E402
from lmforge.tokenizer import Tokenizer, byte_tokenizer, train_bpe, train_char  # noqa: E402

TOLERANCE = 1e-5  # fp32, max abs difference of logits
CORPUS = ["Hello, world! This is a small corpus for a tiny tokenizer.",
          "床前明月光，疑是地上霜。举头望明月，低头思故乡。",
          "The quick brown fox jumps over the lazy dog; Привет, мир!"] * 10
SAMPLE = "Hello, world!<|endoftext|> 床前明月光 <|begin_of_text|>and é\n  spaces"


# ------------------------------------------------------------------------------------ local HF models
def byte_level_bpe(specials: list[str], bos: str | None = None):
    """A GPT-2-style byte-level BPE (tokenizers library) with `specials` added after the learned vocabulary."""
    from tokenizers import AddedToken, Tokenizer as HFTokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = HFTokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(vocab_size=330, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator(CORPUS, trainer)
    tok.add_special_tokens([AddedToken(s, special=True, normalized=False) for s in specials])
    if bos is not None:  # Llama 3 style: every text starts with the BOS token
        tok.post_processor = processors.TemplateProcessing(single=f"{bos} $A", pair=f"{bos} $A {bos} $B",
                                                           special_tokens=[(bos, tok.token_to_id(bos))])
    return tok


def perturb_norms(model: torch.nn.Module) -> None:
    """Non-trivial norm weights and biases, so a misplaced one shows in the logits."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name or "ln_" in name or name.endswith("bias"):
                p.add_(0.1 * torch.randn_like(p))


@pytest.fixture(scope="module")
def hf_dirs(tmp_path_factory):
    """{"gpt2": dir, "gpt2-legacy": dir (vocab.json + merges.txt), "llama": dir (sharded, GQA)}."""
    root = tmp_path_factory.mktemp("hf")
    torch.manual_seed(0)
    tok = byte_level_bpe(["<|endoftext|>"])
    eot = tok.token_to_id("<|endoftext|>")
    gpt2 = transformers.GPT2LMHeadModel(transformers.GPT2Config(
        vocab_size=tok.get_vocab_size(), n_positions=128, n_layer=2, n_head=2, n_embd=32,
        bos_token_id=eot, eos_token_id=eot)).eval()
    perturb_norms(gpt2)
    gpt2.save_pretrained(root / "gpt2")
    transformers.GPT2TokenizerFast(tokenizer_object=tok, bos_token="<|endoftext|>", eos_token="<|endoftext|>",
                                   unk_token="<|endoftext|>").save_pretrained(root / "gpt2")
    legacy = root / "gpt2-legacy"
    legacy.mkdir()
    for name in ("config.json", "model.safetensors"):
        shutil.copy(root / "gpt2" / name, legacy / name)
    tok.model.save(str(legacy))  # vocab.json + merges.txt, as the original GPT-2 release (which lists
    vocab = json.loads((legacy / "vocab.json").read_text(encoding="utf-8"))  # <|endoftext|> in vocab.json)
    (legacy / "vocab.json").write_text(json.dumps({**vocab, "<|endoftext|>": eot}), encoding="utf-8")

    ltok = byte_level_bpe(["<|begin_of_text|>", "<|end_of_text|>"], bos="<|begin_of_text|>")
    llama = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=ltok.get_vocab_size() + 6, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128, rms_norm_eps=1e-5,
        rope_theta=500000.0, tie_word_embeddings=False, bos_token_id=ltok.token_to_id("<|begin_of_text|>"),
        eos_token_id=ltok.token_to_id("<|end_of_text|>"))).eval()
    perturb_norms(llama)
    llama.save_pretrained(root / "llama", max_shard_size="40KB")
    transformers.PreTrainedTokenizerFast(tokenizer_object=ltok, bos_token="<|begin_of_text|>",
                                         eos_token="<|end_of_text|>").save_pretrained(root / "llama")
    return {"gpt2": root / "gpt2", "gpt2-legacy": legacy, "llama": root / "llama"}


def hf_greedy(model, input_ids: list[int], n: int) -> list[int]:
    """New ids of transformers' greedy search (stops at the model's eos token, like lmforge)."""
    x = torch.tensor([input_ids])
    out = model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=n, do_sample=False,
                         pad_token_id=model.generation_config.eos_token_id)
    new = out[0, len(input_ids):].tolist()
    eos = model.generation_config.eos_token_id
    return new[:new.index(eos)] if eos in new else new


def max_diff(ours: GPT, theirs, ids: torch.Tensor) -> float:
    with torch.no_grad():
        return (ours(ids) - theirs(ids).logits).abs().max().item()


# ------------------------------------------------------------------------------------------- import
@pytest.mark.parametrize("name", ["gpt2", "llama"])
def test_imported_model_gives_the_same_logits_and_greedy_text(hf_dirs, tmp_path, name):
    ckpt = import_hf(hf_dirs[name], tmp_path / "run")
    assert ckpt == tmp_path / "run" / "checkpoints" / "step-00000000"
    assert {"model.safetensors", "config.json", "state.json", "tokenizer.json", "manifest.json"} <= \
        {p.name for p in ckpt.iterdir()}
    model, tok, _ = load_for_inference(tmp_path / "run", "cpu")
    theirs = transformers.AutoModelForCausalLM.from_pretrained(hf_dirs[name]).eval()
    hf_tok = transformers.AutoTokenizer.from_pretrained(hf_dirs[name])
    ids = torch.randint(0, theirs.config.vocab_size, (2, 40))
    assert max_diff(model, theirs, ids) <= TOLERANCE
    prompt = "Hello, world!"
    assert prompt_ids(tok, prompt) == hf_tok(prompt).input_ids
    ours = generate_ids(model, prompt_ids(tok, prompt), greedy=True, max_new_tokens=30, end_id=tok.end_id)[0]
    assert ours == hf_greedy(theirs, hf_tok(prompt).input_ids, 30) and len(ours) >= 10
    assert tok.decode(ours) == hf_tok.decode(ours, skip_special_tokens=True)


def test_llama_import_reads_every_shard_and_keeps_gqa(hf_dirs):
    shards = sorted(p.name for p in hf_dirs["llama"].glob("model-*.safetensors"))
    assert len(shards) >= 2 and (hf_dirs["llama"] / "model.safetensors.index.json").is_file()
    model, tok, _ = hf_to_lmforge(hf_dirs["llama"])
    c = model.config
    assert (c.n_head, c.n_kv_head, c.pos_encoding, c.norm, c.mlp, c.bias, c.tie_embeddings, c.rope_theta) == \
        (4, 2, "rope", "rmsnorm", "swiglu", False, False, 500000.0)
    assert c.vocab_size == tok.vocab_size + 6  # a padded embedding matrix is kept whole
    assert tok.special_tokens == ("<|begin_of_text|>", "<|end_of_text|>", None)


@pytest.mark.parametrize("name", ["gpt2", "gpt2-legacy", "llama"])
def test_tokenizers_agree_with_special_tokens_and_chinese(hf_dirs, tmp_path, name):
    import_hf(hf_dirs[name], tmp_path / "run")
    tok = Tokenizer.load(tmp_path / "run" / "checkpoints" / "step-00000000" / "tokenizer.json")
    hf_tok = transformers.AutoTokenizer.from_pretrained(hf_dirs["gpt2" if name == "gpt2-legacy" else name])
    ids = prompt_ids(tok, SAMPLE)
    assert ids == hf_tok(SAMPLE).input_ids
    assert tok.decode(ids, skip_special=False) == hf_tok.decode(ids, skip_special_tokens=False)
    assert tok.decode(ids) == hf_tok.decode(ids, skip_special_tokens=True)
    if name.startswith("gpt2"):  # GPT-2: no start token, <|endoftext|> ends a text
        assert tok.start_id is None and tok.special_tokens[1] == "<|endoftext|>" and tok.end_id == 330
    stream = tok.stream_decoder()
    assert "".join(stream.push(i) for i in ids) + stream.flush() == tok.decode(ids)


def test_pickle_weights_are_refused_and_never_unpickled(hf_dirs, tmp_path, capsys):
    marker = tmp_path / "payload-ran"

    class Payload:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    bad = tmp_path / "pickled"
    bad.mkdir()
    shutil.copy(hf_dirs["gpt2"] / "config.json", bad / "config.json")
    shutil.copy(hf_dirs["gpt2"] / "tokenizer.json", bad / "tokenizer.json")
    (bad / "pytorch_model.bin").write_bytes(pickle.dumps(Payload()))
    with pytest.raises(HFImportError, match=r"pytorch_model\.bin.*safe_serialization=True"):
        import_hf(bad, tmp_path / "run")
    assert main(["import", str(bad), "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "pickle" in err[0] and "save_pretrained" in err[0]
    assert not marker.exists() and not (tmp_path / "run").exists()


def test_unsupported_architecture_lists_what_is_supported(hf_dirs, tmp_path, capsys):
    bert = tmp_path / "bert"
    bert.mkdir()
    (bert / "config.json").write_text(json.dumps({"model_type": "bert", "architectures": ["BertForMaskedLM"]}))
    assert main(["import", str(bert), "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "model_type='bert'" in err[0] and "supported: gpt2" in err[0] and "llama" in err[0]
    scaled = tmp_path / "scaled"
    shutil.copytree(hf_dirs["llama"], scaled)
    config = json.loads((scaled / "config.json").read_text())
    config["rope_parameters"] = {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0}
    (scaled / "config.json").write_text(json.dumps(config))
    with pytest.raises(HFImportError, match="rope_type='yarn'.*supported: default RoPE"):
        import_hf(scaled, tmp_path / "run2")
    assert not (tmp_path / "run").exists() and not (tmp_path / "run2").exists()


def test_a_tokenizer_neither_byte_level_nor_sentencepiece_style_is_refused_with_what_is_supported(hf_dirs, tmp_path):
    from tokenizers import Tokenizer as HFTokenizer, decoders, models, pre_tokenizers

    bert = HFTokenizer(models.WordPiece(vocab={"[UNK]": 0, "a": 1, "##b": 2}, unk_token="[UNK]"))
    bert.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    bert.decoder = decoders.WordPiece()
    wordpiece = tmp_path / "wordpiece"
    shutil.copytree(hf_dirs["llama"], wordpiece)
    bert.save(str(wordpiece / "tokenizer.json"))
    with pytest.raises(HFImportError, match="decoder \\('WordPiece'\\) is neither byte-level nor SentencePiece-style.*"
                                            "GPT-2, Llama 3.*Llama 2, TinyLlama") as e:
        import_hf(wordpiece, tmp_path / "run")
    assert "\n" not in str(e.value)
    assert not (tmp_path / "run").exists()


def test_import_refuses_a_run_directory_with_checkpoints(hf_dirs, tmp_path):
    import_hf(hf_dirs["gpt2"], tmp_path / "run")
    with pytest.raises(LmforgeError, match="already holds checkpoints"):
        import_hf(hf_dirs["gpt2"], tmp_path / "run")


# ------------------------------------------------------------------------------------------- export
GPT2_STYLE = dict(block_size=48, n_layer=2, n_head=2, n_embd=32, activation="gelu_tanh")
LLAMA_STYLE = dict(block_size=48, n_layer=2, n_head=4, n_kv_head=2, n_embd=32, norm="rmsnorm", mlp="swiglu",
                   pos_encoding="rope", bias=False, tie_embeddings=False, rope_theta=20000.0)


def lmforge_run(root: Path, tok: Tokenizer, **model) -> Path:
    """A run directory with one checkpoint of a random model (norms perturbed) and `tok`."""
    config = ModelConfig(vocab_size=tok.vocab_size, **model)
    torch.manual_seed(3)
    gpt = GPT(config)
    perturb_norms(gpt)
    root.mkdir(parents=True, exist_ok=True)
    tok.save(root / "tokenizer.json")
    save_checkpoint(root / "run", 7, gpt, None, RunConfig(model=config), {"tokens_seen": 0}, root / "tokenizer.json")
    return root / "run"


@pytest.mark.parametrize("arch,kind", [("gpt2", "bpe"), ("llama", "bpe"), ("gpt2", "char"), ("llama", "byte")])
def test_exported_model_loads_in_transformers_with_the_same_logits_and_greedy_text(tmp_path, arch, kind):
    makers = {"bpe": lambda: train_bpe(CORPUS, 400), "char": lambda: train_char(CORPUS, 300), "byte": byte_tokenizer}
    tok = makers[kind]()
    run = lmforge_run(tmp_path, tok, **(GPT2_STYLE if arch == "gpt2" else LLAMA_STYLE))
    assert main(["export", str(run), "--format", "hf", "--out", str(tmp_path / "hf")]) == 0
    assert {p.name for p in (tmp_path / "hf").iterdir()} == {
        "config.json", "model.safetensors", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
        "special_tokens_map.json"}
    theirs = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    hf_tok = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
    assert type(theirs).__name__ == ("GPT2LMHeadModel" if arch == "gpt2" else "LlamaForCausalLM")
    model, _, _ = load_for_inference(run, "cpu")
    ids = torch.randint(0, tok.vocab_size, (2, 48))
    assert max_diff(model, theirs, ids) <= TOLERANCE
    for text in ["Hello, wörld!", "床前明月光 q"]:
        assert hf_tok(text).input_ids == prompt_ids(tok, text)
        assert hf_tok.decode(prompt_ids(tok, text), skip_special_tokens=True) == text
    ours = generate_ids(model, prompt_ids(tok, "Hello"), greedy=True, max_new_tokens=25, end_id=tok.end_id)[0]
    assert ours == hf_greedy(theirs, hf_tok("Hello").input_ids, 25) and len(ours) >= 5


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_exported_classifier_loads_as_a_sequence_classifier_with_the_same_logits(tmp_path, arch):
    tok = byte_tokenizer()
    run = lmforge_run(tmp_path, tok, head="classify", num_labels=3, **(GPT2_STYLE if arch == "gpt2" else LLAMA_STYLE))
    model, _, _ = load_for_inference(run, "cpu")
    with torch.no_grad():
        model.classifier.weight.normal_(0.0, 1.0)  # class scores of a real size
    save_checkpoint(run, 8, model, None, RunConfig(model=model.config), {"tokens_seen": 0}, tmp_path / "tokenizer.json")
    assert main(["export", str(run), "--format", "hf", "--out", str(tmp_path / "hf")]) == 0
    theirs = transformers.AutoModelForSequenceClassification.from_pretrained(tmp_path / "hf").eval()
    assert type(theirs).__name__ == ("GPT2ForSequenceClassification" if arch == "gpt2"
                                     else "LlamaForSequenceClassification")
    assert theirs.config.pad_token_id == tok.pad_id and theirs.config.num_labels == 3
    ids = torch.randint(3, tok.vocab_size, (3, 20))
    ids[1, 12:] = tok.pad_id  # right-padded rows: both read each row's last real token
    ids[2, 5:] = tok.pad_id
    mask = ids != tok.pad_id
    model, _, _ = load_for_inference(run, "cpu")
    with torch.no_grad():
        ours, expected = model(ids, attention_mask=mask), theirs(ids, attention_mask=mask.long()).logits
    assert (ours - expected).abs().max().item() <= TOLERANCE and expected.abs().max() > 0.5


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_round_trip_lmforge_hf_lmforge_gives_identical_tensors(tmp_path, arch):
    run = lmforge_run(tmp_path, train_bpe(CORPUS, 400), **(GPT2_STYLE if arch == "gpt2" else LLAMA_STYLE))
    export_hf(run, tmp_path / "hf")
    import_hf(tmp_path / "hf", tmp_path / "back")
    before, _, config_before = load_for_inference(run, "cpu")
    after, _, config_after = load_for_inference(tmp_path / "back", "cpu")
    assert config_after.model == config_before.model
    a, b = before.state_dict(), after.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("name", ["gpt2", "llama"])
def test_imported_model_exports_back_to_what_transformers_had(hf_dirs, tmp_path, name):
    import_hf(hf_dirs[name], tmp_path / "run")
    export_hf(tmp_path / "run", tmp_path / "hf")
    original = transformers.AutoModelForCausalLM.from_pretrained(hf_dirs[name]).state_dict()
    exported = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf").state_dict()
    assert original.keys() == exported.keys() and all(torch.equal(original[k], exported[k]) for k in original)
    before = transformers.AutoTokenizer.from_pretrained(hf_dirs[name])
    after = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
    assert after(SAMPLE).input_ids == before(SAMPLE).input_ids
    assert after.eos_token == before.eos_token
    generation = json.loads((tmp_path / "hf" / "generation_config.json").read_text())
    assert generation["eos_token_id"] == before.eos_token_id


@pytest.mark.parametrize("model,reason", [
    (dict(GPT2_STYLE, pos_encoding="sinusoidal"), "model.pos_encoding='sinusoidal' cannot be converted to GPT-2"),
    (dict(GPT2_STYLE, pos_encoding="rope"), "model.norm='layernorm', model.mlp='gelu' cannot be converted to Llama"),
    (dict(GPT2_STYLE, qk_norm=True), "model.qk_norm=True cannot be converted to GPT-2"),
    (dict(LLAMA_STYLE, qk_norm=True, bias=True), "model.bias=True cannot be converted to Llama (Qwen3, with "
                                                 "model.qk_norm); it needs model.bias=False"),
    (dict(GPT2_STYLE, logit_softcap=15.0), "model.logit_softcap=15.0 cannot be converted to GPT-2"),
    (dict(LLAMA_STYLE, logit_softcap=15.0), "model.logit_softcap=15.0 cannot be converted to Llama"),
    (dict(GPT2_STYLE, mlp="relu2"), "model.mlp='relu2' cannot be converted to GPT-2"),
    (dict(LLAMA_STYLE, mlp="relu2", qk_norm=True, logit_softcap=10.0),  # the shakespeare-char recipe: all named at once
     "model.mlp='relu2', model.logit_softcap=10.0 cannot be converted to Llama (Qwen3, with model.qk_norm)"),
], ids=["sinusoidal", "gpt2-with-rope", "gpt2-qk-norm", "llama-qk-norm", "gpt2-softcap", "llama-softcap",
        "relu2", "recipe"])
def test_export_refuses_models_without_hf_equivalent(tmp_path, capsys, model, reason):
    run = lmforge_run(tmp_path, byte_tokenizer(), **model)
    with pytest.raises(HFExportError, match="no Hugging Face equivalent"):
        export_hf(run, tmp_path / "hf")
    assert main(["export", str(run), "--format", "hf", "--out", str(tmp_path / "hf")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and reason in err[0] and "--format onnx" in err[0]
    assert not (tmp_path / "hf").exists()


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_zero_init_proj_is_only_an_init_and_exports(arch):
    """zero_init_proj changes the starting weights, not the function: a trained model is an ordinary GPT-2/Llama."""
    config = ModelConfig(vocab_size=64, zero_init_proj=True, **(GPT2_STYLE if arch == "gpt2" else LLAMA_STYLE))
    assert converter_for_model(config).__name__ == f"lmforge.interop.hf_{arch}"


def test_export_replaces_only_an_earlier_export_and_only_with_force(tmp_path):
    run = lmforge_run(tmp_path, byte_tokenizer(), **GPT2_STYLE)
    (tmp_path / "hf").mkdir()
    (tmp_path / "hf" / "keep.txt").write_text("mine")
    for force in (False, True):
        with pytest.raises(HFExportError, match="is not a Hugging Face export written by lmforge: choose a new"):
            export_hf(run, tmp_path / "hf", force=force)
    assert [p.name for p in (tmp_path / "hf").iterdir()] == ["keep.txt"]
    assert (tmp_path / "hf" / "keep.txt").read_text() == "mine"
    export_hf(run, tmp_path / "hf2")
    with pytest.raises(HFExportError, match="already holds a Hugging Face export .*: pass --force"):
        export_hf(run, tmp_path / "hf2")
    assert export_hf(run, tmp_path / "hf2", force=True) == tmp_path / "hf2"


def hidden(parent: Path) -> list[str]:
    """Temporary or set-aside siblings an export left in `parent`."""
    return sorted(p.name for p in parent.iterdir() if p.name.startswith("."))


def test_a_failed_forced_export_leaves_the_previous_export_intact(tmp_path, monkeypatch):
    import lmforge.interop.hf_export as hf_export

    run = lmforge_run(tmp_path, byte_tokenizer(), **GPT2_STYLE)
    out = export_hf(run, tmp_path / "hf")
    before = {p.name: p.read_bytes() for p in out.iterdir()}

    def torn_save(tensors, path, metadata=None):  # half the weights written, then the disk is full
        Path(path).write_bytes(before["model.safetensors"][:1000])
        raise OSError(5, "Input/output error (injected)")  # a full disk: tests/test_disk_full.py

    monkeypatch.setattr(hf_export, "save_file", torn_save)
    with pytest.raises(OSError, match="injected"):
        export_hf(run, out, force=True)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before and hidden(tmp_path) == []
    assert type(transformers.AutoModelForCausalLM.from_pretrained(out)).__name__ == "GPT2LMHeadModel"


KILLED_EXPORT = """
import os, signal, sys
from pathlib import Path
import lmforge.interop.hf_export as hf_export

run, out, where = sys.argv[1:]
if where == "writing":  # killed with half the weights on disk
    def torn_save(tensors, path, metadata=None):
        Path(path).write_bytes(b"\\0" * 1000)
        os.kill(os.getpid(), signal.SIGKILL)
    hf_export.save_file = torn_save
else:  # killed just before the new export is renamed into place
    real = os.rename
    def rename(src, dst):
        if Path(dst) == Path(out):
            os.kill(os.getpid(), signal.SIGKILL)
        real(src, dst)
    os.rename = rename
hf_export.export_hf(run, out, force=True)
"""


@pytest.mark.parametrize("where", ["writing", "renaming"])
def test_a_kill_during_a_forced_export_leaves_the_previous_export_intact(tmp_path, where):
    run = lmforge_run(tmp_path, byte_tokenizer(), **GPT2_STYLE)
    out = export_hf(run, tmp_path / "hf")
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    child = subprocess.run([sys.executable, "-c", KILLED_EXPORT, str(run), str(out), where], capture_output=True,
                           text=True, timeout=300)
    assert child.returncode == -signal.SIGKILL, child.stderr
    assert hidden(tmp_path) and out.exists() == (where == "writing")  # what the killed process left behind
    with pytest.raises(HFExportError, match="pass --force"):
        export_hf(run, out)  # the next export puts the previous one back first: it still needs --force
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before and hidden(tmp_path) == []
    assert type(transformers.AutoModelForCausalLM.from_pretrained(out)).__name__ == "GPT2LMHeadModel"


def test_a_failed_forced_onnx_export_leaves_the_previous_file_and_force_replaces_only_lmforge_files(
        tmp_path, monkeypatch):
    ort = pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    from lmforge.interop.onnx_export import OnnxExportError, export_onnx

    run = lmforge_run(tmp_path, byte_tokenizer(), **GPT2_STYLE)
    out = export_onnx(run, tmp_path / "model.onnx")
    before = out.read_bytes()

    def torn_save(self, destination, **kw):
        Path(destination).write_bytes(before[:1000])
        raise OSError(5, "Input/output error (injected)")  # a full disk: tests/test_disk_full.py

    monkeypatch.setattr(torch.onnx.ONNXProgram, "save", torn_save)
    with pytest.raises(OSError, match="injected"):
        export_onnx(run, out, force=True)
    monkeypatch.undo()
    assert out.read_bytes() == before and hidden(tmp_path) == []
    ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])  # still loads
    with pytest.raises(OnnxExportError, match="already holds an ONNX export .*: pass --force"):
        export_onnx(run, out)
    (tmp_path / "notes.onnx").write_text("mine")
    with pytest.raises(OnnxExportError, match="is not an ONNX export written by lmforge: choose a new --out"):
        export_onnx(run, tmp_path / "notes.onnx", force=True)
    assert (tmp_path / "notes.onnx").read_text() == "mine"


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_onnx_export_runs_in_onnxruntime_with_the_same_logits(tmp_path, arch):
    ort = pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    run = lmforge_run(tmp_path, byte_tokenizer(), **(GPT2_STYLE if arch == "gpt2" else LLAMA_STYLE))
    assert main(["export", str(run), "--format", "onnx", "--out", str(tmp_path / "model.onnx")]) == 0
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    session = ort.InferenceSession(str(tmp_path / "model.onnx"), options, providers=["CPUExecutionProvider"])
    assert [i.name for i in session.get_inputs()] == ["input_ids"]
    model, _, _ = load_for_inference(run, "cpu")
    for shape in [(1, 5), (3, 48)]:  # batch and sequence axes are dynamic
        ids = torch.randint(0, 259, shape)
        logits = session.run(["logits"], {"input_ids": ids.numpy()})[0]
        with torch.no_grad():
            assert abs(logits - model(ids).numpy()).max() <= 1e-4


# ---------------------------------------------------------------------- the GPT-2 example, end to end
def test_gpt2_example_generate_then_continue_training(hf_dirs, tmp_path, capsys):
    """Load GPT-2 with its tokenizer, encode "Hello, world!", generate up to 100 tokens, decode; then train on."""
    import lmforge

    run = tmp_path / "gpt2"
    assert main(["import", str(hf_dirs["gpt2"]), "--out", str(run)]) == 0
    hf_model = transformers.AutoModelForCausalLM.from_pretrained(hf_dirs["gpt2"]).eval()
    hf_tok = transformers.AutoTokenizer.from_pretrained(hf_dirs["gpt2"])
    expected = hf_tok.decode(hf_greedy(hf_model, hf_tok("Hello, world!").input_ids, 100), skip_special_tokens=True)

    assert len(expected) >= 50  # the random model does not stop at once: the comparison means something
    generator = lmforge.load(str(run), device="cpu")
    assert generator.generate("Hello, world!", max_new_tokens=100, greedy=True) == expected
    capsys.readouterr()
    assert main(["generate", str(run), "--prompt", "Hello, world!", "--max-new-tokens", "100", "--greedy"]) == 0
    assert capsys.readouterr().out == "Hello, world!" + expected + "\n"

    # continued pretraining: data tokenized by the imported tokenizer, a new run from the imported weights
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for i in range(8):
        (corpus / f"{i}.txt").write_text(f"Document {i}: hello, world! 床前明月光。" * 3, encoding="utf-8")
    tok_file = run / "checkpoints" / "step-00000000" / "tokenizer.json"
    assert main(["prepare", str(corpus), "--tokenizer", str(tok_file), "--out", str(tmp_path / "data"),
                 "--split", "0.5,0.25,0.25", "--no-progress"]) == 0
    manifest = json.loads((tmp_path / "data" / "manifest.json").read_text())
    assert manifest["special_tokens"]["start"] is None and manifest["special_tokens"]["end"]["id"] == 330
    assert main(["train", "--data", str(tmp_path / "data"), "--run-dir", str(tmp_path / "ft"), "--device", "cpu",
                 "--train.init_from", str(run), "--max-steps", "2", "--train.batch_size", "2",
                 "--train.eval_batches", "1", "--train.num_threads", "1", "--optim.lr", "1e-2"]) == 0
    ft_config = read_run_config(tmp_path / "ft" / "checkpoints" / "step-00000002")
    assert ft_config.model == read_run_config(run / "checkpoints" / "step-00000000").model
    tuned, tok, _ = load_for_inference(tmp_path / "ft", "cpu")
    start, _, _ = load_for_inference(run, "cpu")
    assert not torch.equal(tuned.tok_emb.weight, start.tok_emb.weight)  # trained on
    assert torch.allclose(tuned.tok_emb.weight, start.tok_emb.weight, atol=0.1)  # from the imported weights
    assert isinstance(lmforge.load(str(tmp_path / "ft"), device="cpu").generate("Hello", max_new_tokens=5), str)


def test_gpt2_samples_from_an_empty_prompt_like_transformers(hf_dirs, tmp_path):
    """GPT-2 has no start token: an empty prompt starts from <|endoftext|>, as HF's generate does."""
    import_hf(hf_dirs["gpt2"], tmp_path / "run")
    model, tok, _ = load_for_inference(tmp_path / "run", "cpu")
    assert tok.start_id is None and prompt_ids(tok, "") == [tok.end_id]
    hf_model = transformers.AutoModelForCausalLM.from_pretrained(hf_dirs["gpt2"]).eval()
    ours = generate_ids(model, prompt_ids(tok, ""), greedy=True, max_new_tokens=20, end_id=tok.end_id)[0]
    assert ours == hf_greedy(hf_model, [tok.end_id], 20)


def test_resuming_an_imported_checkpoint_points_to_init_from(hf_dirs, tmp_path, capsys):
    """An import holds weights but no optimizer state: --resume names the way that works, --train.init_from."""
    import_hf(hf_dirs["gpt2"], tmp_path / "gpt2")
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for i in range(6):
        (corpus / f"{i}.txt").write_text(f"Document {i}: hello, world! " * 4, encoding="utf-8")
    tok_file = tmp_path / "gpt2" / "checkpoints" / "step-00000000" / "tokenizer.json"
    assert main(["prepare", str(corpus), "--tokenizer", str(tok_file), "--out", str(tmp_path / "data"),
                 "--split", "0.5,0.25,0.25", "--no-progress"]) == 0
    capsys.readouterr()
    code = main(["train", "--data", str(tmp_path / "data"), "--run-dir", str(tmp_path / "gpt2"), "--device", "cpu",
                 "--resume", "auto", "--max-steps", "2", "--train.num_threads", "1"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "--train.init_from" in err[0], err


@pytest.mark.parametrize("tied", [True, False])
def test_export_stores_a_tied_lm_head_once_and_an_untied_one_as_its_own_tensor(tmp_path, tied):
    """model.safetensors holds lm_head.weight only for an untied head (transformers ties a missing one to wte on
    load); the untied head is stored as it is, and either way transformers' lm_head equals lmforge's."""
    from safetensors.torch import load_file

    run = lmforge_run(tmp_path, byte_tokenizer(), **{**GPT2_STYLE, "tie_embeddings": tied})
    model, _, _ = load_for_inference(run, "cpu")
    if not tied:
        assert not torch.equal(model.lm_head.weight, model.tok_emb.weight)
    export_hf(run, tmp_path / "hf")
    stored = load_file(str(tmp_path / "hf" / "model.safetensors"))
    assert ("lm_head.weight" in stored) == (not tied)
    assert torch.equal(stored["transformer.wte.weight"], model.tok_emb.weight)
    if not tied:
        assert torch.equal(stored["lm_head.weight"], model.lm_head.weight)
    theirs = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf")
    assert torch.equal(theirs.lm_head.weight, model.lm_head.weight)
    assert (theirs.lm_head.weight.data_ptr() == theirs.transformer.wte.weight.data_ptr()) == tied


def test_export_writes_the_tokenizers_start_end_and_pad_ids_into_both_configs(tmp_path):
    tok = byte_tokenizer(("<s>", "</s>", "<pad>"))
    run = lmforge_run(tmp_path, tok, **GPT2_STYLE)
    export_hf(run, tmp_path / "hf")
    want = {"bos_token_id": tok.start_id, "eos_token_id": tok.end_id, "pad_token_id": tok.pad_id}
    assert want == {"bos_token_id": 0, "eos_token_id": 1, "pad_token_id": 2}
    for name in ("config.json", "generation_config.json"):
        written = json.loads((tmp_path / "hf" / name).read_text(encoding="utf-8"))
        assert {k: written[k] for k in want} == want, name
    generation = transformers.GenerationConfig.from_pretrained(tmp_path / "hf")
    assert (generation.bos_token_id, generation.eos_token_id, generation.pad_token_id) == (0, 1, 2)


@pytest.mark.parametrize("kind", ["bpe", "char", "byte"])
def test_export_keeps_a_mask_token_at_its_id_as_a_special_token(tmp_path, kind):
    makers = {"bpe": lambda: train_bpe(CORPUS, 400), "char": lambda: train_char(CORPUS, 300), "byte": byte_tokenizer}
    tok = makers[kind]().with_mask_token("<MASK>")
    run = lmforge_run(tmp_path, tok, **GPT2_STYLE)
    export_hf(run, tmp_path / "hf")
    hf_tok = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
    assert len(hf_tok) == tok.vocab_size == tok.mask_id + 1
    assert (hf_tok.mask_token, hf_tok.mask_token_id) == ("<MASK>", tok.mask_id)
    # written in a text, the mask is its one id (never split into characters), the rest encodes as lmforge does
    assert hf_tok("ab <MASK> cd").input_ids == [*prompt_ids(tok, "ab "), tok.mask_id, *tok.encode(" cd")]
    assert hf_tok.decode([tok.mask_id]) == "<MASK>"


def test_import_refuses_a_tokenizer_with_ids_beyond_the_models_vocabulary(tmp_path):
    """A tokenizer that can emit ids the embedding has no row for (it belongs to another model) is refused at
    import, even when the weights fit config.json."""
    tok = byte_level_bpe(["<|endoftext|>"])
    small = tok.get_vocab_size() - 5
    torch.manual_seed(0)
    transformers.GPT2LMHeadModel(transformers.GPT2Config(vocab_size=small, n_positions=32, n_layer=1, n_head=2,
                                                         n_embd=16)).save_pretrained(tmp_path / "hf")
    transformers.GPT2TokenizerFast(tokenizer_object=tok, bos_token="<|endoftext|>", eos_token="<|endoftext|>",
                                   unk_token="<|endoftext|>").save_pretrained(tmp_path / "hf")
    with pytest.raises(HFImportError, match=rf"the tokenizer has {tok.get_vocab_size()} tokens but the model only "
                                            rf"vocab_size={small}"):
        hf_to_lmforge(tmp_path / "hf")
    assert not (tmp_path / "run").exists()
    with pytest.raises(HFImportError):
        import_hf(tmp_path / "hf", tmp_path / "run")
    assert not (tmp_path / "run" / "checkpoints").exists()
