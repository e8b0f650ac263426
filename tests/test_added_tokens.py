"""Tokens added to a trained model's tokenizer (`lmforge prepare --add-tokens`, chat markers): they encode as
transformers' added tokens do in every tokenizer kind, a run from the model grows its embedding by their rows (each
starting at the mean row), learns them, resumes exactly, and exports to transformers and GGUF with them."""

from __future__ import annotations

import copy
import math
import json
import random
from pathlib import Path

import gguf
import pytest
import torch
import transformers

import lmforge
from lmforge.cli import main
from lmforge.config import ModelConfig
from lmforge.errors import ConfigError, TokenizerError
from lmforge.interop.hf_tokenizer import hf_tokenizer_files
from lmforge.model import GPT
from lmforge.tokenizer import HF_KIND, Tokenizer, byte_tokenizer, train_bpe, train_char
from lmforge.train import Trainer
from test_tasks import make_base, write_jsonl
from tiny_training import resumed_copy, step_losses, tiny_config

CORPUS = ["hello world, the quick brown fox jumps over the lazy dog " * 20, "\u00bfqu\u00e9 tal? a\u00f1adir tokens"]
NAMES = ["<|user|>", "<|assistant|>", "<|\u7528\u6237|>", "<|u"]  # a non-ASCII name; one the prefix of another
TEXTS = ["<|user|>\nhello<|assistant|>x <|\u7528\u6237|><|u<|user|", "plain \u00bfqu\u00e9? no markers",
         "<|assistant|><|assistant|>", "", "<|user|"]


def imported() -> Tokenizer:
    """An imported (kind hf) byte-level BPE with a special token of its own, as GPT-2's."""
    from tokenizers import AddedToken, Tokenizer as HFTokenizer, decoders, models, pre_tokenizers, trainers

    hf = HFTokenizer(models.BPE())
    hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    hf.decoder = decoders.ByteLevel()
    hf.train_from_iterator(CORPUS, trainers.BpeTrainer(vocab_size=300, show_progress=False,
                                                       initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    hf.add_special_tokens([AddedToken("<|endoftext|>", special=True, normalized=False)])
    return Tokenizer(HF_KIND, hf_json=hf.to_str(), special_ids={"start": None, "end": hf.get_vocab_size() - 1,
                                                                 "pad": None})


MAKERS = {"char": lambda: train_char(CORPUS, 400), "byte": byte_tokenizer, "bpe": lambda: train_bpe(CORPUS, 400),
          "hf": imported}


def transformers_tokenizer(tok: Tokenizer, where: Path):
    where.mkdir(parents=True)
    for name, content in hf_tokenizer_files(tok, 128).items():
        (where / name).write_text(json.dumps(content), encoding="utf-8")
    return transformers.AutoTokenizer.from_pretrained(where)


@pytest.mark.parametrize("kind", list(MAKERS))
def test_added_tokens_encode_as_transformers_added_tokens_and_move_no_other_id(kind, tmp_path):
    base = MAKERS[kind]()
    ours = base.with_added_tokens(NAMES)
    assert ours.added_token_ids == {name: base.vocab_size + i for i, name in enumerate(NAMES)}
    assert ours.vocab_size == base.vocab_size + len(NAMES)
    theirs = transformers_tokenizer(base, tmp_path / "base")  # transformers adds the same tokens its own way
    assert theirs.add_tokens([transformers.AddedToken(n, normalized=False) for n in NAMES]) == len(NAMES)
    exported = transformers_tokenizer(ours, tmp_path / "ours")  # and reads ours from an export
    for text in TEXTS:
        ids = ours.encode(text)
        assert ids == theirs(text, add_special_tokens=False).input_ids, text
        assert ids == exported(text, add_special_tokens=False).input_ids, text
        assert ours.decode(ids) == text
        if not any(name in text for name in NAMES):
            assert ids == base.encode(text)
    assert ours.encode("<|user|>") == [ours.added_token_ids["<|user|>"]]
    assert ours.encode_batch(TEXTS) == [ours.encode(t) for t in TEXTS]
    ours.save(tmp_path / "tokenizer.json")  # the file keeps them
    loaded = Tokenizer.load(tmp_path / "tokenizer.json")
    assert loaded.added_tokens == tuple(NAMES) and [loaded.encode(t) for t in TEXTS] == [ours.encode(t) for t in TEXTS]


SPECIAL = ["<|assistant|>", "<|u"]  # added as special tokens (transformers' add_special_tokens: chat markers)


@pytest.mark.parametrize("kind", list(MAKERS))
def test_special_added_tokens_match_in_text_and_decode_drops_them_as_transformers_does(kind, tmp_path):
    from lmforge.interop.gguf_export import _vocabulary

    base = MAKERS[kind]()
    ours = base.with_added_tokens(NAMES, special=SPECIAL)
    assert ours.special_added == set(SPECIAL) and ours.added_tokens == tuple(NAMES)
    theirs = transformers_tokenizer(base, tmp_path / "base")
    theirs.add_tokens([transformers.AddedToken(n, normalized=False, special=n in SPECIAL) for n in NAMES])
    exported = transformers_tokenizer(ours, tmp_path / "ours")
    ours.save(tmp_path / "tokenizer.json")
    loaded = Tokenizer.load(tmp_path / "tokenizer.json")
    assert loaded.special_added == set(SPECIAL) and loaded.special_token_ids == ours.special_token_ids
    for text in TEXTS:
        ids = ours.encode(text)
        assert ids == theirs(text, add_special_tokens=False).input_ids == exported(
            text, add_special_tokens=False).input_ids, text
        for tok in (ours, loaded):
            assert tok.decode(ids, skip_special=False) == text
            kept = tok.decode(ids)
            assert kept == theirs.decode(ids, skip_special_tokens=True) == exported.decode(ids,
                                                                                           skip_special_tokens=True)
            stream = tok.stream_decoder()
            assert "".join(stream.push(i) for i in ids) + stream.flush() == kept
    assert ours.decode([ours.added_token_ids["<|user|>"], ours.added_token_ids["<|assistant|>"]]) == "<|user|>"
    types = _vocabulary(ours, ours.vocab_size).types  # llama.cpp's kinds: special ones are control tokens
    assert [types[ours.added_token_ids[n]] for n in NAMES] == [
        gguf.TokenType.CONTROL if n in SPECIAL else gguf.TokenType.USER_DEFINED for n in NAMES]
    once = base.with_added_tokens(NAMES[:2], special=SPECIAL[:1])  # added in two steps: the same tokenizer
    assert once.with_added_tokens(NAMES[2:], special=SPECIAL[1:]).to_dict() == ours.to_dict()
    with pytest.raises(TokenizerError, match=r"special tokens to add \['<\|x\|>'\] are not among the names"):
        base.with_added_tokens(NAMES, special=["<|x|>"])


def test_a_corrupt_special_flag_of_an_added_token_is_refused():
    data = imported().with_added_tokens(NAMES, special=SPECIAL).to_dict()
    flipped = copy.deepcopy(data)  # lmforge's entry and its tokenizer.json disagree
    flipped["added_tokens"][0]["special"] = True
    data["added_tokens"][1]["special"] = "yes"
    for bad in (data, flipped):
        with pytest.raises(TokenizerError, match="corrupt"):
            Tokenizer.from_dict(bad)


@pytest.mark.parametrize("kind", ["char", "bpe", "hf"])
def test_extends_counts_the_tokens_added_to_exactly_that_tokenizer(kind):
    base = MAKERS[kind]()
    once = base.with_added_tokens(NAMES[:2])
    twice = once.with_added_tokens(NAMES[2:])
    assert once.extends(base) == 2 and twice.extends(base) == 4 and twice.extends(once) == 2
    assert base.extends(once) == 0 and once.extends(once) == 0 and once.extends(twice) == 0
    other = (train_char(CORPUS[:1], 400) if kind == "char" else train_bpe(CORPUS[:1], 300)).with_added_tokens(
        NAMES[:2])
    assert other.extends(base) == 0  # the same names on another vocabulary
    reordered = base.with_added_tokens(NAMES[1::-1])
    assert reordered.extends(base) == 2 and reordered.extends(once) == 0


@pytest.mark.parametrize("names,needle", [
    (["<a>", ""], "'' is empty or holds whitespace"), (["<a b>"], "holds whitespace"),
    (["<a>\x00"], "control characters"), (["<a>", "<a>"], "named twice"), (["<START>"], "a special token"),
    (["h"], "one token of the vocabulary already"), ([], "give 1 to"),
])
def test_bad_names_to_add_are_one_line_naming_them(names, needle):
    with pytest.raises(TokenizerError, match=needle):
        train_char(CORPUS, 400).with_added_tokens(names)


def test_tokens_cannot_follow_a_mask_token():
    with pytest.raises(TokenizerError, match="has a mask token"):
        byte_tokenizer().with_mask_token().with_added_tokens(["<|user|>"])


def test_a_corrupt_added_token_entry_is_refused():
    data = byte_tokenizer().with_added_tokens(NAMES).to_dict()
    data["added_tokens"][0]["id"] += 1
    with pytest.raises(TokenizerError, match="corrupt"):
        Tokenizer.from_dict(data)


# ------------------------------------------------------------------------------------------ the model grows
@pytest.mark.parametrize("tie", [True, False])
def test_resizing_the_vocabulary_keeps_every_logit_and_starts_new_rows_at_the_mean(tie):
    torch.manual_seed(0)
    model = GPT(ModelConfig(vocab_size=40, n_layer=1, n_head=2, n_embd=16, block_size=8, tie_embeddings=tie)).eval()
    before = copy.deepcopy(model)
    model.resize_vocabulary(43)
    assert model.config.vocab_size == 43 and model.tok_emb.weight.shape == (43, 16) and model.added_rows_from == 40
    assert (model.lm_head.weight is model.tok_emb.weight) == tie
    assert torch.equal(model.tok_emb.weight[:40], before.tok_emb.weight)
    assert torch.allclose(model.tok_emb.weight[40:], before.tok_emb.weight.mean(0).expand(3, -1), atol=1e-7)
    idx = torch.randint(0, 40, (2, 8))
    with torch.no_grad():
        old, new = before(idx), model(idx)
    assert torch.allclose(new[..., :40], old, atol=1e-6)
    assert torch.allclose(new[..., 40:], old.mean(-1, keepdim=True).expand(-1, -1, 3), atol=1e-5)  # the mean logit
    model.resize_vocabulary(40)  # back: the first rows, as they were
    assert torch.equal(model.tok_emb.weight, before.tok_emb.weight) and model.added_rows_from is None
    assert torch.equal(model.lm_head.weight, before.lm_head.weight) and model.lm_head.out_features == 40


def chat_records(n: int, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    records = []
    for _ in range(n):
        word = "".join(rng.choice("abcd") for _ in range(rng.randint(1, 3)))
        records.append({"messages": [{"role": "user", "content": word}, {"role": "assistant", "content": word[::-1]}]})
    return records


@pytest.fixture(scope="module")
def chat(tmp_path_factory) -> tuple[Path, Path]:
    """(a tiny byte-tokenizer base model, chat data prepared with its tokenizer and two markers added)."""
    root = tmp_path_factory.mktemp("added")
    base = make_base(root)
    assert main(["prepare", str(write_jsonl(root / "chat.jsonl", chat_records(120))), "--task", "sft", "--tokenizer",
                 str(base), "--out", str(root / "chat"), "--add-tokens", "<|user|>,<|assistant|>"]) == 0
    return base, root / "chat"


def test_prepared_examples_hold_the_markers_as_their_ids(chat):
    from lmforge.data.tasks import load_examples

    base, data = chat
    tok = Tokenizer.load(data / "tokenizer.json")
    assert tok.added_token_ids == {"<|user|>": 259, "<|assistant|>": 260}
    assert json.loads((data / "manifest.json").read_text())["vocab_size"] == 261
    assert tok.extends(Tokenizer.load(base / "checkpoints" / "step-00000001" / "tokenizer.json")) == 2
    examples = load_examples(data, "train")
    tokens = examples.tokens
    assert int((tokens == 259).sum()) == int((tokens == 260).sum()) == len(examples.lengths)  # one of each


def test_add_tokens_chat_adds_the_heads_of_lmforges_chat_turns(tmp_path):
    from lmforge.data.tasks import CHAT_MARKERS, load_examples

    base = make_base(tmp_path)
    records = [{"messages": [{"role": "system", "content": "x"}, {"role": "user", "content": w},  # 15 tokens: whole
                             {"role": "assistant", "content": w[::-1]}]} for w in ("ab", "cd", "ef", "gh", "ij")]
    assert main(["prepare", str(write_jsonl(tmp_path / "c.jsonl", records)), "--task", "sft", "--tokenizer", str(base),
                 "--out", str(tmp_path / "data"), "--add-tokens", "chat"]) == 0
    tok = Tokenizer.load(tmp_path / "data" / "tokenizer.json")
    assert tok.added_tokens == CHAT_MARKERS == ("<|system|>", "<|user|>", "<|assistant|>", "<|tool|>", "<|tools|>")
    examples = load_examples(tmp_path / "data", "train")
    for marker in ("<|system|>", "<|user|>", "<|assistant|>"):  # each turn's head one id, once per example
        assert int((examples.tokens == tok.added_token_ids[marker]).sum()) == len(examples.lengths), marker


def test_a_run_from_the_base_grows_its_embedding_learns_the_new_rows_and_resumes_exactly(chat, tmp_path):
    base, data = chat
    values = {"data.path": str(data), "train.init_from": str(base), "train.max_steps": 8, "train.batch_size": 8,
              "train.save_interval": 4, "train.eval_interval": 4}
    start = Trainer(tiny_config(tmp_path / "start", **values), progress=False, tensorboard=False)
    base_model, _, _ = lmforge.checkpoint.load_for_inference(base, "cpu")
    old = base_model.tok_emb.weight.detach()
    grown = start.raw_model.tok_emb.weight.detach().clone()
    assert start.config.model.vocab_size == 261 and grown.shape == (261, old.shape[1])
    assert torch.equal(grown[:259], old) and torch.allclose(grown[259:], old.mean(0).expand(2, -1), atol=1e-7)

    full = Trainer(tiny_config(tmp_path / "full", **values), progress=False, tensorboard=False)
    full.fit()
    model, tok, config = lmforge.checkpoint.load_for_inference(tmp_path / "full", "cpu")
    assert config.model.vocab_size == 261 and tok.added_tokens == ("<|user|>", "<|assistant|>")
    learned = model.tok_emb.weight.detach()[259:]
    assert not torch.allclose(learned[0], grown[259], atol=1e-4) and not torch.allclose(learned[0], learned[1])

    resumed = resumed_copy(tmp_path / "full", 4,
                           tiny_config(tmp_path / "resumed", **values, **{"train.resume": "auto"}))
    assert [step for step, _ in resumed.history] == [5, 6, 7, 8]
    assert [loss for _, loss in resumed.history] == [loss for step, loss in full.history if step > 4]
    assert step_losses(tmp_path / "resumed")[8] == step_losses(tmp_path / "full")[8]

    generator = lmforge.load(str(tmp_path / "full"))  # its chat prompt spells the markers as their ids
    prompt = generator.tokenizer.encode(generator.render_chat([{"role": "user", "content": "ab"}]))
    assert 259 in prompt and prompt[-2:] == [260, generator.tokenizer.encode("\n")[0]]


def test_the_grown_model_exports_to_transformers_and_gguf_with_its_added_tokens(chat, tmp_path):
    from lmforge.interop.gguf_export import export_gguf
    from lmforge.interop.hf_export import export_hf

    base, data = chat
    run = tmp_path / "run"
    Trainer(tiny_config(run, **{"data.path": str(data), "train.init_from": str(base), "train.max_steps": 2}),
            progress=False, tensorboard=False).fit()
    model, tok, _ = lmforge.checkpoint.load_for_inference(run, "cpu")
    hf_dir = export_hf(run, tmp_path / "hf")
    theirs = transformers.AutoModelForCausalLM.from_pretrained(hf_dir).eval()
    hf_tok = transformers.AutoTokenizer.from_pretrained(hf_dir)
    text = "<|user|>\nab\n<|assistant|>\n"
    ids = hf_tok(text).input_ids
    assert ids == [tok.start_id] + tok.encode(text) and 259 in ids and 260 in ids
    with torch.no_grad():
        assert (model(torch.tensor([ids])) - theirs(torch.tensor([ids])).logits).abs().max() <= 1e-5
    reader = gguf.GGUFReader(str(export_gguf(run, tmp_path / "m.gguf")))
    tokens = reader.fields["tokenizer.ggml.tokens"].contents()
    types = reader.fields["tokenizer.ggml.token_type"].contents()
    assert tokens[259:261] == ["<|user|>", "<|assistant|>"]
    assert types[259:261] == [gguf.TokenType.USER_DEFINED] * 2 and types[1] == gguf.TokenType.CONTROL


# ------------------------------------------------------------------------------------- LoRA on added tokens
LLAMA = {"model.norm": "rmsnorm", "model.mlp": "swiglu", "model.pos_encoding": "rope", "model.bias": False,
         "model.tie_embeddings": False, "model.n_head": 4, "model.n_kv_head": 2}


@pytest.fixture(scope="module", params=["gpt2-tied", "llama-untied"])
def lora_chat(request, tmp_path_factory) -> tuple[Path, Path, Path]:
    """(base, chat data with two markers added, a LoRA run on it from the base), GPT-2 style with a tied head and
    Llama style with an untied one."""
    root = tmp_path_factory.mktemp("lora-added")
    base = make_base(root, **(LLAMA if request.param == "llama-untied" else {}))
    assert main(["prepare", str(write_jsonl(root / "chat.jsonl", chat_records(120))), "--task", "sft", "--tokenizer",
                 str(base), "--out", str(root / "chat"), "--add-tokens", "<|user|>,<|assistant|>"]) == 0
    values = {"data.path": str(root / "chat"), "train.init_from": str(base), "train.max_steps": 6,
              "train.batch_size": 8, "train.save_interval": 3, "lora.r": 4, "lora.targets": "q,v,o",
              "optim.weight_decay": 0.5}
    Trainer(tiny_config(root / "lora", **values), progress=False, tensorboard=False).fit()
    return base, root / "chat", root / "lora"


def test_a_lora_run_trains_only_the_added_rows_of_the_embedding_and_head(lora_chat):
    from safetensors.torch import load_file

    base, _, run = lora_chat
    base_model, _, _ = lmforge.checkpoint.load_for_inference(base, "cpu")
    stored = load_file(str(run / "checkpoints" / "step-00000006" / "model.safetensors"))
    assert {k for k in stored if ".lora." not in k} == ({"lm_head.weight"} if base_model.config.tie_embeddings else
                                                          {"tok_emb.weight", "lm_head.weight"})
    for name in ("tok_emb.weight", "lm_head.weight"):
        if name not in stored:
            continue
        old = base_model.get_parameter(name).detach()
        assert torch.equal(stored[name][:259], old), name  # the base's rows, bit for bit (decay 0.5 left them)
        assert not torch.allclose(stored[name][259:], old.mean(0).expand(2, -1), atol=1e-4), name  # learned
    model, tok, config = lmforge.checkpoint.load_for_inference(run, "cpu")  # merged onto the grown base
    assert config.model.vocab_size == 261 and model.tok_emb.weight.shape[0] == 261
    merged_rows = model.lm_head.weight.detach()
    assert torch.equal(merged_rows, stored["lm_head.weight"])


def test_an_embedding_adapter_beside_added_rows_is_one_line(lora_chat, tmp_path):
    base, chat, _ = lora_chat
    values = {"data.path": str(chat), "train.init_from": str(base), "train.max_steps": 1, "lora.targets": "q,emb"}
    with pytest.raises(ConfigError, match="lora.targets has emb, and the data adds 2 token.*drop emb"):
        Trainer(tiny_config(tmp_path / "run", **values), progress=False, tensorboard=False)


def test_a_lora_run_on_added_tokens_resumes_exactly(lora_chat, tmp_path):
    base, data, run = lora_chat
    values = {"data.path": str(data), "train.init_from": str(base), "train.max_steps": 6, "train.batch_size": 8,
              "train.save_interval": 3, "lora.r": 4, "lora.targets": "q,v,o", "optim.weight_decay": 0.5,
              "train.resume": "auto"}
    resumed = resumed_copy(run, 3, tiny_config(tmp_path / "resumed", **values))
    assert [step for step, _ in resumed.history] == [4, 5, 6]
    full = step_losses(run)
    assert [loss for _, loss in resumed.history] == [full[s] for s in (4, 5, 6)]


def test_peft_loads_the_exported_adapter_with_the_added_rows_and_computes_the_runs_logits(lora_chat, tmp_path):
    import peft

    from lmforge.interop.hf_export import export_hf

    _, _, run = lora_chat
    out = export_hf(run, tmp_path / "hf")
    adapter = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert adapter["modules_to_save"] in (["wte", "lm_head"], ["embed_tokens", "lm_head"])
    theirs = peft.PeftModel.from_pretrained(transformers.AutoModelForCausalLM.from_pretrained(out), out / "adapter")
    model, tok, _ = lmforge.checkpoint.load_for_inference(run, "cpu")
    ids = torch.tensor([[tok.start_id] + tok.encode("<|user|>\nab\n<|assistant|>\nba")])
    with torch.no_grad():
        assert (theirs.eval()(ids).logits - model(ids)).abs().max() <= 1e-5
        plain = transformers.AutoModelForCausalLM.from_pretrained(out).eval()  # the base alone: new rows at the mean
        rows = plain.get_input_embeddings().weight
        assert torch.allclose(rows[259:], rows[:259].mean(0).expand(2, -1), atol=1e-6)


def test_dpo_with_lora_on_added_tokens_keeps_their_starting_rows_in_the_reference(tmp_path):
    root = tmp_path
    base = make_base(root)
    rng = random.Random(0)
    words = sorted({"".join(rng.choice("abcdef") for _ in range(rng.randint(2, 4))) for _ in range(200)})
    records = [{"prompt": f"<|user|>{w}<|assistant|>", "chosen": w.upper(), "rejected": w} for w in words]
    assert main(["prepare", str(write_jsonl(root / "pairs.jsonl", records)), "--task", "preference", "--tokenizer",
                 str(base), "--out", str(root / "pairs"), "--add-tokens", "<|user|>,<|assistant|>"]) == 0
    values = {"data.path": str(root / "pairs"), "train.init_from": str(base), "train.max_steps": 6,
              "train.batch_size": 8, "lora.r": 4, "lora.targets": "q,v", "optim.lr": 1e-2}
    trainer = Trainer(tiny_config(root / "dpo", **values), progress=False, tensorboard=False)
    start = trainer.raw_model.tok_emb.weight.detach().clone()
    trainer.fit()
    losses = [loss for _, loss in trainer.history]
    assert losses[0] == pytest.approx(math.log(2), abs=1e-6) and losses[-1] != pytest.approx(math.log(2), abs=1e-4)
    trained = trainer.raw_model.tok_emb.weight.detach()
    assert torch.equal(trained[:259], start[:259]) and not torch.allclose(trained[259:], start[259:], atol=1e-4)
    assert torch.equal(trainer.reference.tok_emb.weight, start)  # the reference: the model as it started


def test_plan_counts_the_grown_vocabulary_and_the_rows_a_lora_run_trains(lora_chat, tmp_path):
    from lmforge.plan import plan

    base, data, _ = lora_chat
    config = tiny_config(tmp_path / "run", **{"data.path": str(data), "train.init_from": str(base), "lora.r": 4,
                                              "lora.targets": "q,v,o"})
    estimate = plan(config, task="sft")
    trainer = Trainer(config, progress=False, tensorboard=False)  # what the run trains
    assert trainer.config.model.vocab_size == 261 and estimate.parameters == sum(
        p.numel() for name, p in trainer.raw_model.named_parameters() if ".lora." not in name)  # the model's own
    assert estimate.trained_parameters == sum(p.numel() for p in trainer.raw_model.parameters() if p.requires_grad)


def peft_adapter_with_tokens(root: Path, llama: bool, names: tuple[str, ...] = ("<|user|>", "<|assistant|>"),
                             special: tuple[str, ...] = ()):
    """(base run, adapter dir, transformers' tokenizer, the PeftModel): an lmforge base exported to transformers,
    which adds `names` and resizes (those in `special` as special tokens, after the others); peft trains the
    embedding and head whole (modules_to_save) beside LoRA adapters, as peft's guide does it (random values standing
    for training), saved with the tokenizer."""
    import peft

    from lmforge.interop.hf_export import export_hf

    base = make_base(root, **(LLAMA if llama else {}))
    hf_dir = export_hf(base, root / "hf")
    tokenizer = transformers.AutoTokenizer.from_pretrained(hf_dir)
    tokenizer.add_tokens([transformers.AddedToken(n, normalized=False) for n in names if n not in special])
    if special:
        tokenizer.add_special_tokens({"additional_special_tokens": list(special)})
    model = transformers.AutoModelForCausalLM.from_pretrained(hf_dir)
    model.resize_token_embeddings(len(tokenizer))
    config = peft.LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0,
                             modules_to_save=["embed_tokens" if llama else "wte", "lm_head"],
                             target_modules=["q_proj", "v_proj"] if llama else ["c_attn"], fan_in_fan_out=not llama,
                             ensure_weight_tying=not llama)
    theirs = peft.get_peft_model(model, config)
    torch.manual_seed(0)
    with torch.no_grad():  # trained: adapters and the copies of embedding and head (tied: one copy)
        for name, p in theirs.named_parameters():
            if "lora_B" in name or "modules_to_save" in name:
                p.add_(0.1 * torch.randn_like(p))
    theirs.save_pretrained(root / "adapter")
    tokenizer.save_pretrained(root / "adapter")
    return base, root / "adapter", tokenizer, theirs


@pytest.mark.parametrize("style", ["llama-untied", "gpt2-tied"])
def test_a_peft_adapter_trained_with_added_tokens_imports_with_peft_logits_and_tokens(style, tmp_path):
    """`lmforge import` grows the base's tokenizer by the tokens the adapter's tokenizer added, and its rows, and
    computes peft's logits."""
    from lmforge.interop.peft_import import import_peft

    base, adapter, tokenizer, theirs = peft_adapter_with_tokens(tmp_path, style == "llama-untied")
    import_peft(adapter, base, tmp_path / "run")
    ours, tok, config = lmforge.checkpoint.load_for_inference(tmp_path / "run", "cpu")
    assert tok.added_token_ids == {"<|user|>": 259, "<|assistant|>": 260} and config.model.vocab_size == 261
    text = "<|user|>\nab\n<|assistant|>\nba"
    ids = tokenizer(text).input_ids
    assert ids == [tok.start_id] + tok.encode(text) and 259 in ids
    with torch.no_grad():
        assert (theirs.eval()(torch.tensor([ids])).logits - ours(torch.tensor([ids]))).abs().max() <= 1e-4


def test_a_peft_adapter_whose_tokenizer_added_special_tokens_imports_them_special(tmp_path):
    """Chat markers added with add_special_tokens stay special: matched in text, dropped from decoded replies as
    transformers drops them."""
    from lmforge.interop.peft_import import import_peft

    names = ("<|user|>", "<|im_start|>", "<|im_end|>")
    base, adapter, tokenizer, theirs = peft_adapter_with_tokens(tmp_path, True, names, special=names[1:])
    import_peft(adapter, base, tmp_path / "run")
    ours, tok, _ = lmforge.checkpoint.load_for_inference(tmp_path / "run", "cpu")
    assert tok.added_tokens == names and tok.special_added == set(names[1:])
    text = "<|im_start|>user\nab<|im_end|><|user|>ba<|im_end|>"
    ids = tokenizer(text).input_ids
    assert ids == [tok.start_id] + tok.encode(text) and {259, 260, 261} <= set(ids)
    assert tok.decode(ids) == tokenizer.decode(ids, skip_special_tokens=True) == "user\nab<|user|>ba"
    assert tok.decode(ids, skip_special=False) == tokenizer.decode(ids)
    with torch.no_grad():
        assert (theirs.eval()(torch.tensor([ids])).logits - ours(torch.tensor([ids]))).abs().max() <= 1e-4


def test_a_peft_adapter_with_new_rows_but_no_tokenizer_or_another_is_one_line(tmp_path):
    from lmforge.interop.peft_import import PEFTImportError, import_peft

    base, adapter, tokenizer, _ = peft_adapter_with_tokens(tmp_path, True)
    saved = (adapter / "tokenizer.json").read_bytes()
    (adapter / "tokenizer.json").unlink()
    with pytest.raises(PEFTImportError, match="save it there too"):
        import_peft(adapter, base, tmp_path / "run")
    data = json.loads(saved)  # the same ids, the new tokens swapped: not what the rows were trained for
    for entry in data["added_tokens"]:
        entry["content"] = {"<|user|>": "<|assistant|>", "<|assistant|>": "<|user|>"}.get(entry["content"],
                                                                                          entry["content"])
    (adapter / "tokenizer.json").write_text(json.dumps(data))
    import_peft(adapter, base, tmp_path / "swapped")  # a tokenizer of other names is still the base's plus tokens
    assert lmforge.checkpoint.load_for_inference(tmp_path / "swapped", "cpu")[1].added_tokens == (
        "<|assistant|>", "<|user|>")
    data["model"]["vocab"] = {k: (v + 1) % 259 if v < 259 else v for k, v in data["model"]["vocab"].items()}
    (adapter / "tokenizer.json").write_text(json.dumps(data))  # its own ids moved: another tokenizer
    with pytest.raises(PEFTImportError, match="is not --base .*'s tokenizer with tokens added"):
        import_peft(adapter, base, tmp_path / "other")
    assert not (tmp_path / "run").exists() and not (tmp_path / "other").exists()
