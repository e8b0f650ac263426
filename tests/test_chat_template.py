"""A model's own chat template (data.chat_template): an imported instruct model chats in its own format, rendered as
transformers' apply_chat_template renders it (same text, same ids, no second bos), its template carried through
Hugging Face and GGUF exports and imports; lmforge's own chat format exports as an equivalent Jinja template; a
template runs sandboxed and its refusals are one-line errors."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
from test_gguf_export import fields, load_theirs  # noqa: E402
from test_interop import CORPUS, perturb_norms  # noqa: E402

transformers = pytest.importorskip("transformers")
gguf = pytest.importorskip("gguf")

import lmforge  # noqa: E402
import lmforge.cli  # noqa: E402
from lmforge.checkpoint import load_for_inference, save_checkpoint  # noqa: E402
from lmforge.config import ModelConfig, RunConfig  # noqa: E402
from lmforge.data.chat_template import render, to_jinja, user_header  # noqa: E402
from lmforge.data.tasks import CHAT_TEMPLATE, resolve_template  # noqa: E402
from lmforge.errors import ConfigError  # noqa: E402
from lmforge.generate import prompt_ids  # noqa: E402
from lmforge.generate.chat import ChatSession  # noqa: E402
from lmforge.generate.config import GenerateConfig  # noqa: E402
from lmforge.interop.gguf_export import export_gguf  # noqa: E402
from lmforge.interop.gguf_import import import_gguf  # noqa: E402
from lmforge.interop.hf_export import export_hf  # noqa: E402
from lmforge.interop.hf_import import import_hf  # noqa: E402
from lmforge.model import GPT  # noqa: E402
from lmforge.tokenizer import byte_tokenizer  # noqa: E402

CHATML = ("{%- if messages[0]['role'] != 'system' %}{{ '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}"
          "{%- endif %}\n{%- for message in messages %}\n"
          "{%- if message['role'] not in ['system', 'user', 'assistant'] %}"
          "{{ raise_exception('Unknown role: ' + message['role']) }}{%- endif %}\n"
          "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}\n"
          "{%- endfor %}\n{%- if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{%- endif %}\n")
LLAMA3 = ("{{- bos_token }}{%- for message in messages %}{{- '<|start_header_id|>' + message['role'] + "
          "'<|end_header_id|>\\n\\n' + message['content'] | trim + '<|eot_id|>' }}{%- endfor %}"
          "{%- if add_generation_prompt %}{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{%- endif %}")
STYLES = {  # special tokens, eos, bos (added to every text), template
    "chatml": (["<|im_start|>", "<|im_end|>", "<|endoftext|>"], "<|im_end|>", None, CHATML),
    "llama3": (["<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"], "<|eot_id|>",
               "<|begin_of_text|>", LLAMA3),
}
MESSAGES = [{"role": "user", "content": "Hello, who are you?"},
            {"role": "assistant", "content": "A small model.  "},
            {"role": "user", "content": "Say 42 in French.\n"}]


def instruct_dir(root: Path, style: str) -> Path:
    """A small Llama-style instruct model saved by transformers with its tokenizer and chat template."""
    from tokenizers import AddedToken, Tokenizer as HFTokenizer, decoders, models, pre_tokenizers, processors, trainers

    specials, eos, bos, template = STYLES[style]
    tok = HFTokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(CORPUS, trainers.BpeTrainer(vocab_size=300, show_progress=False,
                                                        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok.add_special_tokens([AddedToken(s, special=True, normalized=False) for s in specials])
    if bos is not None:
        tok.post_processor = processors.TemplateProcessing(single=f"{bos} $A", pair=f"{bos} $A {bos} $B",
                                                           special_tokens=[(bos, tok.token_to_id(bos))])
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=tok.get_vocab_size(), hidden_size=32, intermediate_size=48, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128, tie_word_embeddings=False,
        eos_token_id=tok.token_to_id(eos))).eval()
    perturb_norms(model)
    model.save_pretrained(root)
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=eos, bos_token=bos)
    fast.chat_template = template
    fast.save_pretrained(root)
    return root


def their_ids(hf_dir: Path, messages: list[dict]) -> list[int]:
    hf_tok = transformers.AutoTokenizer.from_pretrained(hf_dir)
    return list(hf_tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True,
                                           return_dict=True)["input_ids"])


@pytest.mark.parametrize("style", ["chatml", "llama3"])
def test_an_imported_instruct_model_chats_in_its_own_template_as_transformers_renders_it(tmp_path, style):
    hf_dir = instruct_dir(tmp_path / "hf", style)
    generator = lmforge.load(str(import_hf(hf_dir, tmp_path / "run").parent.parent))
    assert generator.tokenizer.chat_template == STYLES[style][3]
    for n in (1, 3):
        text = generator.render_chat(MESSAGES[:n])
        hf_text = transformers.AutoTokenizer.from_pretrained(hf_dir).apply_chat_template(
            MESSAGES[:n], add_generation_prompt=True, tokenize=False)
        assert hf_text.endswith(text) and len(hf_text) - len(text) in (0, len("<|begin_of_text|>"))
        assert prompt_ids(generator.tokenizer, text) == their_ids(hf_dir, MESSAGES[:n])  # one bos, where one is due
    assert generator.chat_stop() == {"chatml": "<|im_start|>user\n",
                                     "llama3": "<|start_header_id|>user<|end_header_id|>\n\n"}[style]
    session = ChatSession(generator, GenerateConfig(max_new_tokens=6, greedy=True))
    reply = "".join(session.say("Hello, who are you?"))  # streamed from the model through its template
    assert session.messages[-1] == {"role": "assistant", "content": reply}
    assert session.config.stop_strings[-1] == generator.chat_stop()


def test_the_template_travels_through_hf_and_gguf_exports_and_imports(tmp_path):
    hf_dir = instruct_dir(tmp_path / "hf", "chatml")
    run = import_hf(hf_dir, tmp_path / "run").parent.parent
    export_hf(run, tmp_path / "out")
    again = transformers.AutoTokenizer.from_pretrained(tmp_path / "out")
    assert again.chat_template == CHATML
    assert list(again.apply_chat_template(MESSAGES, add_generation_prompt=True, tokenize=True,
                                          return_dict=True)["input_ids"]) == their_ids(hf_dir, MESSAGES)
    path = export_gguf(run, tmp_path / "gguf" / "m.gguf")
    assert fields(path)["tokenizer.chat_template"] == CHATML
    model, _, _ = load_for_inference(run, "cpu")
    _, their_tok = load_theirs(path, model.config)  # transformers' GGUF reader takes the template from the file
    assert their_tok.chat_template == CHATML
    back = lmforge.load(str(import_gguf(path, tmp_path / "back").parent.parent))
    assert back.tokenizer.chat_template == CHATML
    assert prompt_ids(back.tokenizer, back.render_chat(MESSAGES)) == their_ids(hf_dir, MESSAGES)


def test_named_templates_in_tokenizer_config_give_the_default_one(tmp_path):
    hf_dir = instruct_dir(tmp_path / "hf", "chatml")
    (hf_dir / "chat_template.jinja").unlink(missing_ok=True)
    config = json.loads((hf_dir / "tokenizer_config.json").read_text(encoding="utf-8"))
    config["chat_template"] = [{"name": "tool_use", "template": LLAMA3}, {"name": "default", "template": CHATML}]
    (hf_dir / "tokenizer_config.json").write_text(json.dumps(config), encoding="utf-8")
    generator = lmforge.load(str(import_hf(hf_dir, tmp_path / "run").parent.parent))
    assert generator.tokenizer.chat_template == CHATML
    # a template that writes the end token itself gets the tokenizer's, as in transformers
    ends = "{% for m in messages %}{{ m['role'] + ': ' + m['content'] + eos_token }}{% endfor %}"
    generator.tokenizer.chat_template = ends
    assert generator.render_chat(MESSAGES) == transformers.AutoTokenizer.from_pretrained(hf_dir).apply_chat_template(
        MESSAGES, chat_template=ends, add_generation_prompt=True, tokenize=False) == \
        "".join(f"{m['role']}: {m['content']}<|im_end|>" for m in MESSAGES)


def test_lmforges_own_chat_format_exports_as_an_equivalent_jinja_template(tmp_path):
    tok = byte_tokenizer()
    tok.save(tmp_path / "tokenizer.json")
    config = ModelConfig(vocab_size=tok.vocab_size, block_size=64, n_layer=1, n_head=2, n_embd=16)
    task = {"task": "sft", "template": resolve_template("plain")}
    save_checkpoint(tmp_path / "run", 1, GPT(config), None, RunConfig(model=config), {"tokens_seen": 0, "task": task},
                    tmp_path / "tokenizer.json")
    export_hf(tmp_path / "run", tmp_path / "out")
    theirs = transformers.AutoTokenizer.from_pretrained(tmp_path / "out")
    ours = lmforge.load(str(tmp_path / "run"))
    messages = [{"role": "system", "content": "Be {brief}."}, *MESSAGES]
    assert theirs.apply_chat_template(messages, add_generation_prompt=True, tokenize=False) == \
        ours.render_chat(messages)
    assert render(to_jinja(**CHAT_TEMPLATE), messages) == ours.render_chat(messages)
    # block tags on lines of their own, indented: Jinja's trim_blocks and lstrip_blocks as transformers sets them
    lines = "{% for m in messages %}\n  {% if m['role'] != 'system' %}\n{{ m['role'] }}: {{ m['content'] }}\n" \
            "  {% endif %}\n{% endfor %}\n"
    assert render(lines, messages) == theirs.apply_chat_template(messages, chat_template=lines, tokenize=False)
    assert user_header(to_jinja(**CHAT_TEMPLATE)) == ours.chat_stop() == "<|user|>\n"
    # a base model without a chat template exports none
    save_checkpoint(tmp_path / "base", 1, GPT(config), None, RunConfig(model=config), {"tokens_seen": 0},
                    tmp_path / "tokenizer.json")
    export_hf(tmp_path / "base", tmp_path / "base-out")
    assert "chat_template" not in json.loads((tmp_path / "base-out" / "tokenizer_config.json").read_text())


@pytest.mark.parametrize("template,needle", [
    (CHATML, "refuses this conversation: Unknown role: tool"),
    ("{{ ''.__class__.__mro__[1].__subclasses__() }}", "sandbox forbids"),
    ("{% set _ = messages.append(messages[0]) %}{{ messages }}", "sandbox forbids"),
    ("{% for m in messages %}{{ m['content'] }", "not valid Jinja"),
])
def test_a_template_runs_sandboxed_and_its_refusals_are_one_line_errors(template, needle):
    with pytest.raises(ConfigError, match=needle) as e:
        render(template, [{"role": "tool", "content": "x"}])
    assert "\n" not in str(e.value)


def test_a_corrupt_chat_template_entry_in_a_tokenizer_file_is_refused(tmp_path):
    data = byte_tokenizer().to_dict()
    data["chat_template"] = 42
    (tmp_path / "tokenizer.json").write_text(json.dumps(data), encoding="utf-8")
    from lmforge.errors import TokenizerError
    from lmforge.tokenizer import Tokenizer

    with pytest.raises(TokenizerError, match="chat_template"):
        Tokenizer.load(tmp_path / "tokenizer.json")
    shutil.rmtree(tmp_path)


@pytest.mark.parametrize("style", ["chatml", "llama3"])
def test_sft_on_conversations_uses_the_base_models_own_template_and_the_fine_tuned_model_keeps_it(tmp_path, style):
    from lmforge.data.tasks import load_examples, read_task_manifest

    hf_dir = instruct_dir(tmp_path / "hf", style)
    run = import_hf(hf_dir, tmp_path / "run").parent.parent
    records = [{"messages": [{"role": "user", "content": f"What is {i} plus {i}?"},
                             {"role": "assistant", "content": f"{2 * i}."}]} for i in range(10)]
    bad = [{"messages": [{"role": "tool", "content": "x"}, {"role": "assistant", "content": "y"}]}] * (style == "chatml")
    (tmp_path / "chat.jsonl").write_text("".join(json.dumps(r) + "\n" for r in [*records, *bad]), encoding="utf-8")
    assert lmforge.cli.main(["prepare", str(tmp_path / "chat.jsonl"), "--task", "sft", "--tokenizer", str(run),
                             "--out", str(tmp_path / "data"), "--skip-bad", "--split", "0.8,0.1,0.1"]) == 0
    manifest = read_task_manifest(tmp_path / "data")
    assert manifest["template"]["chat"]["jinja"] == STYLES[style][3]
    tok = load_for_inference(run, "cpu")[1]
    examples = [load_examples(tmp_path / "data", s) for s in ("train", "val", "test")]
    seen = 0
    for ex in examples:
        for i in range(len(ex)):
            ids = ex.tokens[ex.offsets[i]:ex.offsets[i + 1]].tolist()
            p = int(ex.prompt_lengths[i])
            answer = tok.decode(ids[p:-1])
            n = int(answer[:-1]) // 2
            # the prompt: what transformers renders for the conversation so far (one start token at most)
            assert ids[:p] == their_ids(hf_dir, records[n]["messages"][:1]), answer
            assert ids[p:] == [*tok.encode(f"{2 * n}."), tok.end_id]  # the reply, then the end-of-turn token
            seen += 1
    assert seen == 10  # a conversation the template refuses (ChatML's: role tool) is a bad record, skipped
    report = (tmp_path / "data" / "report.json").read_text(encoding="utf-8")
    assert ("Unknown role: tool" in report) == (style == "chatml")
    # fine-tuned on it, the model chats (and exports) in that same format
    assert lmforge.cli.main(["train", "--data", str(tmp_path / "data"), "--run-dir", str(tmp_path / "ft"),
                             "--max-steps", "2", "--train.init_from", str(run), "--train.batch_size", "2"]) == 0
    tuned = lmforge.load(str(tmp_path / "ft"))
    assert tuned.template["chat"]["jinja"] == STYLES[style][3]
    assert prompt_ids(tuned.tokenizer, tuned.render_chat(MESSAGES)) == their_ids(hf_dir, MESSAGES)
    export_hf(tmp_path / "ft", tmp_path / "out")
    assert transformers.AutoTokenizer.from_pretrained(tmp_path / "out").chat_template == STYLES[style][3]
