"""Guards on the edges of model chat templates (data.chat_template and where it is used) that
test_chat_template.py leaves open: every error a template raises is a one-line ConfigError, the sandbox's globals
(bos/eos as "" when absent, strftime_now, loop controls), user_header on templates that drop the closing reply,
leave out content or separate turns by whitespace only, to_jinja on literal text Jinja would otherwise trim, which
chat template an HF directory's files give (as transformers picks it), the template's round trip through every
tokenizer kind, and which template wins when a fine-tuned model also has its own (chat, chat_stop and exports)."""

from __future__ import annotations

import json
import sys
from datetime import datetime
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
from test_chat_template import CHATML, LLAMA3, MESSAGES, instruct_dir  # noqa: E402
from test_gguf_export import fields  # noqa: E402
from test_interop import CORPUS  # noqa: E402

transformers = pytest.importorskip("transformers")

import lmforge  # noqa: E402
from lmforge.checkpoint import save_checkpoint  # noqa: E402
from lmforge.config import ModelConfig, RunConfig  # noqa: E402
from lmforge.data.chat_template import render, to_jinja, user_header  # noqa: E402
from lmforge.data.tasks import CHAT_TEMPLATE, render_chat, resolve_template  # noqa: E402
from lmforge.errors import ConfigError, TokenizerError  # noqa: E402
from lmforge.generate import prompt_ids  # noqa: E402
from lmforge.generate.api import TextGenerator  # noqa: E402
from lmforge.interop.gguf_export import export_gguf  # noqa: E402
from lmforge.interop.hf_export import export_hf  # noqa: E402
from lmforge.interop.hf_import import HFImportError, import_hf  # noqa: E402
from lmforge.model import GPT  # noqa: E402
from lmforge.tokenizer import Tokenizer, byte_tokenizer, train_bpe, train_char  # noqa: E402

ONE = [{"role": "user", "content": "hi"}]


# ------------------------------------------------------------------------------------------ render
@pytest.mark.parametrize("template,kind", [
    ("{{ 'a' + 1 }}", "TypeError"),
    ("{{ '{a}'.format() }}", "KeyError"),
    ("{{ '{0}'.format() }}", "IndexError"),
    ("{{ '{:d}'.format('a') }}", "ValueError"),
    ("{{ 'x' | dictsort }}", "AttributeError"),
    ("{{ messages.x.y }}", "UndefinedError"),
])
def test_any_error_a_template_raises_is_a_one_line_config_error(template, kind):
    with pytest.raises(ConfigError, match=rf"failed on this conversation \({kind}: ") as e:
        render(template, ONE)
    assert "\n" not in str(e.value)


def test_absent_special_tokens_render_as_nothing_and_given_ones_in_their_places():
    source = "[{{ bos_token }}|{{ eos_token }}]"
    assert render(source, ONE) == "[|]"  # not "None"
    assert render(source, ONE, bos_token="<s>", eos_token="</s>") == "[<s>|</s>]"
    assert render(source, ONE, bos_token="<s>") == "[<s>|]"
    assert render(source, ONE, eos_token="</s>") == "[|</s>]"


def test_templates_can_use_strftime_now_and_loop_controls_as_in_transformers():
    year = datetime.now().strftime("%Y")
    assert render("{{ strftime_now('%Y') }}", ONE) in (year, str(int(year) + 1))
    loop = "{% for m in MESSAGES %}{% if loop.index > 2 %}{% break %}{% endif %}" \
           "{% if m['role'] == 'assistant' %}{% continue %}{% endif %}{{ m['content'] }};{% endfor %}"
    source = loop.replace("MESSAGES", "messages")
    assert render(source, MESSAGES) == "Hello, who are you?;"


def test_add_generation_prompt_false_ends_with_the_last_turn():
    assert render(CHATML, ONE, add_generation_prompt=False).endswith("<|im_start|>user\nhi<|im_end|>\n")
    assert render(CHATML, ONE).endswith("<|im_end|>\n<|im_start|>assistant\n")


# ------------------------------------------------------------------------------------------ user_header
@pytest.mark.parametrize("template", [
    "{% for m in messages %}{% if m['role'] == 'user' %}{{ m['content'] }}{% endif %}|{% endfor %}",
    "{% for m in messages %}{% if m['role'] == 'assistant' %}{{ m['content'] }}{% endif %}|{% endfor %}",
])
def test_a_template_that_leaves_out_content_cannot_chat(template):
    with pytest.raises(ConfigError, match="leaves out the messages' content"):
        user_header(template)


def test_the_user_header_of_a_template_that_drops_a_closing_reply():
    # as some templates do with the assistant's last turn (it is rendered only before another user turn)
    source = ("{% for m in messages %}{% if not (loop.last and m['role'] == 'assistant') %}"
              "<{{ m['role'] }}>{{ m['content'] }}</s>{% endif %}{% endfor %}")
    assert user_header(source) == "</s><user>"


def test_a_user_header_of_whitespace_only_is_the_whole_text_between_turns():
    lines = "{% for m in messages %}{{ m['content'] }}\n{% endfor %}"
    assert user_header(lines) == "\n"  # never "": a stop string that matches everywhere
    paragraphs = ("{% for m in messages %}{% if m['role'] == 'user' %}{{ '\\n' }}{% endif %}{{ m['content'] }}\n"
                  "{% endfor %}")
    assert user_header(paragraphs) == "\n\n"


def test_the_user_header_of_a_template_that_closes_a_conversation_its_own_way():
    # the last turn ends in <end>, any other in "|": nothing of <end> is cut from the header
    source = "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}{{ '<end>' if loop.last else '|' }}{% endfor %}"
    assert user_header(source) == "|<user>"


def test_the_user_header_takes_the_models_start_and_end_tokens():
    source = ("{% for m in messages %}{% if m['role'] == 'user' %}{{ bos_token }}[INST] {{ m['content'] }} [/INST]"
              "{% else %}{{ m['content'] }}{{ eos_token }}{% endif %}{% endfor %}")
    assert user_header(source, "<s>", "</s>") == "<s>[INST] "
    assert user_header(source) == "[INST] "


# ------------------------------------------------------------------------------------------ to_jinja
@pytest.mark.parametrize("turn,reply", [
    ("\n  {role}: {content}\n  ", "  A:\n"),  # text Jinja's trim_blocks / lstrip_blocks would eat if left bare
    ("{content} ({role}) \"quoted\" \\ é #\n", ""),
    ("{role}{content}{role}", "<|assistant|>"),
    ("{{{role}}}: {content} {{}}\n", "{reply}"),  # a format string's escaped braces; the reply is plain text
])
def test_to_jinja_renders_what_the_format_string_template_renders(turn, reply):
    chat = {"turn": turn, "reply": reply}
    messages = [{"role": "system", "content": "{role} {{ x }} {% y %}"}, *MESSAGES]
    source = to_jinja(chat["turn"], chat["reply"])
    assert render(source, messages) == render_chat({"chat": chat}, messages)
    no_reply = render(source, messages, add_generation_prompt=False)
    assert no_reply == render_chat({"chat": {**chat, "reply": ""}}, messages)


# ------------------------------------------------------------------------------------------ the tokenizer
@pytest.mark.parametrize("kind", ["byte", "char", "bpe"])
def test_every_tokenizer_kind_keeps_its_chat_template_through_its_file(tmp_path, kind):
    makers = {"byte": byte_tokenizer, "char": lambda: train_char(CORPUS, 300), "bpe": lambda: train_bpe(CORPUS, 300)}
    tok = makers[kind]()
    assert "chat_template" not in tok.to_dict()  # a tokenizer without one writes the same file as before templates
    tok.chat_template = CHATML
    tok.save(tmp_path / "tokenizer.json")
    assert Tokenizer.load(tmp_path / "tokenizer.json").chat_template == CHATML
    assert Tokenizer.from_dict(tok.to_dict()).with_mask_token().chat_template == CHATML


def test_an_empty_chat_template_entry_in_a_tokenizer_file_is_refused():
    data = {**byte_tokenizer().to_dict(), "chat_template": ""}
    with pytest.raises(TokenizerError, match="chat_template"):
        Tokenizer.from_dict(data)
    assert Tokenizer.from_dict({**data, "chat_template": None}).chat_template is None


# ------------------------------------------------------------------------------------------ HF import
@pytest.fixture(scope="module")
def chatml_dir(tmp_path_factory) -> Path:
    return instruct_dir(tmp_path_factory.mktemp("chatml") / "hf", "chatml")


def _copy(src: Path, dst: Path) -> Path:
    import shutil

    return Path(shutil.copytree(src, dst))


def _imported(hf_dir: Path, run: Path):
    return lmforge.load(str(import_hf(hf_dir, run).parent.parent))


def _set_config_template(hf_dir: Path, template) -> None:
    path = hf_dir / "tokenizer_config.json"
    config = json.loads(path.read_text(encoding="utf-8"))
    config["chat_template"] = template
    path.write_text(json.dumps(config), encoding="utf-8")


def test_chat_template_jinja_wins_over_tokenizer_config_as_in_transformers(tmp_path, chatml_dir):
    hf_dir = _copy(chatml_dir, tmp_path / "hf")
    _set_config_template(hf_dir, LLAMA3)
    (hf_dir / "chat_template.jinja").write_text(CHATML, encoding="utf-8")
    assert transformers.AutoTokenizer.from_pretrained(hf_dir).chat_template == CHATML
    assert _imported(hf_dir, tmp_path / "run").tokenizer.chat_template == CHATML


def test_an_empty_chat_template_file_gives_no_template(tmp_path, chatml_dir):
    hf_dir = _copy(chatml_dir, tmp_path / "hf")
    (hf_dir / "chat_template.jinja").write_text("", encoding="utf-8")
    generator = _imported(hf_dir, tmp_path / "run")  # its tokenizer file written and read back
    assert generator.tokenizer.chat_template is None
    assert generator.render_chat(ONE) == render_chat({"chat": CHAT_TEMPLATE}, ONE)


def test_an_unreadable_chat_template_file_is_a_tokenizer_error_naming_it(tmp_path, chatml_dir):
    hf_dir = _copy(chatml_dir, tmp_path / "hf")
    (hf_dir / "chat_template.jinja").write_bytes(b"{{ '\xff\xfe' }}")
    with pytest.raises(HFImportError, match=r"chat_template\.jinja cannot be read as UTF-8 text \(") as e:
        import_hf(hf_dir, tmp_path / "run")
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("entry", ["", 42, {"default": CHATML}, ["junk", {"name": "default", "template": ""}]])
def test_a_chat_template_entry_that_is_no_template_gives_lmforges_default_chat(tmp_path, chatml_dir, entry):
    hf_dir = _copy(chatml_dir, tmp_path / "hf")
    (hf_dir / "chat_template.jinja").unlink()
    _set_config_template(hf_dir, entry)
    generator = _imported(hf_dir, tmp_path / "run")
    assert generator.tokenizer.chat_template is None
    assert generator.render_chat(ONE) == render_chat({"chat": CHAT_TEMPLATE}, ONE)


def test_named_templates_skip_entries_that_are_not_templates(tmp_path, chatml_dir):
    hf_dir = _copy(chatml_dir, tmp_path / "hf")
    (hf_dir / "chat_template.jinja").unlink()
    _set_config_template(hf_dir, ["junk", {"name": "tool_use", "template": LLAMA3},
                                  {"name": "default", "template": CHATML}])
    assert _imported(hf_dir, tmp_path / "run").tokenizer.chat_template == CHATML


# ------------------------------------------------------------------------------------------ chatting
SPECIALS = ("[{{ bos_token }}]{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}{{ eos_token }}\n"
            "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


@pytest.mark.parametrize("style", ["chatml", "llama3"])
def test_a_template_gets_the_start_and_end_tokens_transformers_gives_it(tmp_path, chatml_dir, style):
    hf_dir = _copy(chatml_dir, tmp_path / "hf") if style == "chatml" else instruct_dir(tmp_path / "hf", style)
    source = "{{ bos_token }}" + SPECIALS
    (hf_dir / "chat_template.jinja").write_text(source, encoding="utf-8")
    generator = _imported(hf_dir, tmp_path / "run")
    theirs = transformers.AutoTokenizer.from_pretrained(hf_dir).apply_chat_template(
        MESSAGES, add_generation_prompt=True, tokenize=False)
    bos = {"chatml": "", "llama3": "<|begin_of_text|>"}[style]
    eos = {"chatml": "<|im_end|>", "llama3": "<|eot_id|>"}[style]
    assert theirs.startswith(f"{bos}[{bos}]<|im_start|>user\nHello, who are you?{eos}\n")
    assert generator.render_chat(MESSAGES) == theirs  # its start token too: prompt_ids puts no second one
    their_ids = transformers.AutoTokenizer.from_pretrained(hf_dir).apply_chat_template(
        MESSAGES, add_generation_prompt=True, tokenize=True, return_dict=False)
    assert prompt_ids(generator.tokenizer, theirs) == their_ids
    assert generator.chat_stop() == "<|im_start|>user\n"  # what follows every reply (eos) is no part of it


def test_the_stop_string_of_a_template_that_opens_user_turns_with_the_start_token(tmp_path):
    hf_dir = instruct_dir(tmp_path / "hf", "llama3")
    (hf_dir / "chat_template.jinja").write_text(
        "{% for m in messages %}{% if m['role'] == 'user' %}{{ bos_token }}[INST] {{ m['content'] }} [/INST]"
        "{% else %}{{ m['content'] }}{{ eos_token }}{% endif %}{% endfor %}", encoding="utf-8")
    generator = _imported(hf_dir, tmp_path / "run")
    assert generator.chat_stop() == "<|begin_of_text|>[INST] "
    assert generator.render_chat(MESSAGES) == "<|begin_of_text|>[INST] Hello, who are you? [/INST]A small model.  " \
        "<|eot_id|>" \
        "<|begin_of_text|>[INST] Say 42 in French.\n [/INST]"


def _generator(template=None) -> TextGenerator:
    tok = byte_tokenizer()
    tok.chat_template = CHATML
    return TextGenerator(GPT(ModelConfig(vocab_size=tok.vocab_size, block_size=32, n_layer=1, n_head=2, n_embd=16)),
                         tok, template=template)


def test_a_fine_tuned_models_template_wins_over_the_tokenizers_own_in_chat_and_stop():
    own = _generator()
    assert own.render_chat(ONE) == render(CHATML, ONE) and own.chat_stop() == "<|im_start|>user\n"
    custom = {**resolve_template("plain"), "chat": {"turn": "### {role}\n{content}\n", "reply": "### assistant\n"}}
    tuned = _generator(custom)
    assert tuned.render_chat(ONE) == "### user\nhi\n### assistant\n"
    assert tuned.chat_stop() == "### user\n"


# ------------------------------------------------------------------------------------------ exports
def _run(root: Path, tok: Tokenizer, task=None) -> Path:
    from test_interop import GPT2_STYLE

    config = ModelConfig(vocab_size=tok.vocab_size, **GPT2_STYLE)
    root.mkdir(parents=True, exist_ok=True)
    tok.save(root / "tokenizer.json")
    state = {"tokens_seen": 0, **({"task": task} if task else {})}
    save_checkpoint(root / "run", 1, GPT(config), None, RunConfig(model=config), state, root / "tokenizer.json")
    return root / "run"


def test_exports_write_the_template_the_model_chats_in(tmp_path):
    tok = byte_tokenizer()
    tok.chat_template = CHATML
    own = _run(tmp_path / "own", tok)
    tuned = _run(tmp_path / "tuned", tok, {"task": "sft", "template": resolve_template("plain")})
    base = _run(tmp_path / "base", byte_tokenizer())
    lmforge_format = to_jinja(**CHAT_TEMPLATE)
    for run, expected in ((own, CHATML), (tuned, lmforge_format), (base, None)):
        generator = lmforge.load(str(run))
        if expected is not None:  # the exported template renders what `lmforge chat` renders
            assert render(expected, MESSAGES) == generator.render_chat(MESSAGES)
        export_hf(run, tmp_path / "hf" / run.parent.name)
        config = json.loads((tmp_path / "hf" / run.parent.name / "tokenizer_config.json").read_text(encoding="utf-8"))
        assert config.get("chat_template") == expected and ("chat_template" in config) == (expected is not None)
        path = export_gguf(run, tmp_path / "gguf" / f"{run.parent.name}.gguf")
        assert fields(path).get("tokenizer.chat_template") == expected
