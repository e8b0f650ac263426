"""Conversations with function tools (data.conversation): a model's own chat template lists the tools and writes
assistant turns' calls and the tools' results as transformers' apply_chat_template(tools=...) does (same text, same
ids), in the chat API, the server's /tokenize and chat prompts, and fine-tuning records, whose completion is then
the call as the template writes it; lmforge's own chat format lists tools in a first turn for a fine-tuned model
and writes calls as the JSON lines the server decodes; malformed turns and tools are one-line errors."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
from test_chat_template import instruct_dir  # noqa: E402

transformers = pytest.importorskip("transformers")

import lmforge  # noqa: E402
import lmforge.cli  # noqa: E402
from lmforge.checkpoint import load_for_inference  # noqa: E402
from lmforge.data.tasks import CHAT_TEMPLATE, load_examples, read_task_manifest, render_chat, reply_text  # noqa: E402
from lmforge.errors import ConfigError  # noqa: E402
from lmforge.generate import prompt_ids  # noqa: E402
from lmforge.interop.hf_import import import_hf  # noqa: E402

# A ChatML template that lists tools and writes calls and results in the style of Qwen2.5's (written for this test)
TOOLS_TEMPLATE = """{%- if tools %}
{{- '<|im_start|>system\\n' }}
{%- if messages[0].role == 'system' %}{{- messages[0].content + '\\n\\n' }}{%- endif %}
{{- '# Tools\\n<tools>' }}
{%- for tool in tools %}{{- '\\n' + tool | tojson }}{%- endfor %}
{{- '\\n</tools><|im_end|>\\n' }}
{%- elif messages[0].role == 'system' %}
{{- '<|im_start|>system\\n' + messages[0].content + '<|im_end|>\\n' }}
{%- endif %}
{%- for message in messages %}
{%- if message.role == 'user' or (message.role == 'assistant' and not message.tool_calls) %}
{{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>\\n' }}
{%- elif message.role == 'assistant' %}
{{- '<|im_start|>' + message.role }}
{%- if message.content %}{{- '\\n' + message.content }}{%- endif %}
{%- for tool_call in message.tool_calls %}
{%- if tool_call.function is defined %}{%- set tool_call = tool_call.function %}{%- endif %}
{{- '\\n<tool_call>\\n{"name": "' + tool_call.name + '", "arguments": ' }}
{{- tool_call.arguments | tojson + '}\\n</tool_call>' }}
{%- endfor %}
{{- '<|im_end|>\\n' }}
{%- elif message.role == 'tool' %}
{%- if loop.first or messages[loop.index0 - 1].role != 'tool' %}{{- '<|im_start|>user' }}{%- endif %}
{{- '\\n<tool_response>\\n' + message.content + '\\n</tool_response>' }}
{%- if loop.last or messages[loop.index0 + 1].role != 'tool' %}{{- '<|im_end|>\\n' }}{%- endif %}
{%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}
"""
# keys not in sorted order, and "<": Jinja's own tojson would sort and escape them
WEATHER = {"type": "function", "function": {"name": "get_weather", "description": "Weather <now> in a city.",
                                            "parameters": {"type": "object", "properties": {
                                                "city": {"type": "string"}, "unit": {"enum": ["C", "F"]}},
                                                "required": ["city"]}}}
TIME = {"type": "function", "function": {"name": "get_time", "parameters": {"type": "object", "properties": {}}}}
CALL = {"type": "function", "function": {"name": "get_weather", "arguments": {"unit": "C", "city": "Rome"}}}
CONVERSATION = [{"role": "system", "content": "Be brief."},
                {"role": "user", "content": "Weather in Rome, and the time?"},
                {"role": "assistant", "content": None, "tool_calls": [CALL, {"type": "function", "function": {
                    "name": "get_time", "arguments": {}}}]},
                {"role": "tool", "content": "22 C"},
                {"role": "tool", "content": "10:00"},
                {"role": "assistant", "content": "22 C at 10:00."},
                {"role": "user", "content": "And in Oslo?"}]


def openai_style(turns: list[dict]) -> list[dict]:
    """The turns as OpenAI's API sends them: each call with an id and its arguments as JSON text."""
    out = []
    for i, turn in enumerate(turns):
        turn = dict(turn)
        if turn.get("tool_calls"):
            turn["tool_calls"] = [{"id": f"call_{i}_{j}", "type": "function", "function": {
                "name": c["function"]["name"], "arguments": json.dumps(c["function"]["arguments"])}}
                for j, c in enumerate(turn["tool_calls"])]
        out.append(turn)
    return out


@pytest.fixture(scope="module")
def tools_model(tmp_path_factory) -> tuple[Path, Path]:
    """(an HF instruct model directory whose chat template knows tools, its lmforge import)."""
    root = tmp_path_factory.mktemp("tools")
    hf_dir = instruct_dir(root / "hf", "chatml")
    config = json.loads((hf_dir / "config.json").read_text(encoding="utf-8"))
    config["max_position_embeddings"] = 1024  # room for the tool list (RoPE: the weights do not depend on it)
    (hf_dir / "config.json").write_text(json.dumps(config), encoding="utf-8")
    hf_tok = transformers.AutoTokenizer.from_pretrained(hf_dir)
    hf_tok.chat_template = TOOLS_TEMPLATE
    hf_tok.save_pretrained(hf_dir)
    return hf_dir, import_hf(hf_dir, root / "run").parent.parent


def theirs(hf_dir: Path, turns: list[dict], tools, add_generation_prompt: bool = True) -> tuple[str, list[int]]:
    hf_tok = transformers.AutoTokenizer.from_pretrained(hf_dir)
    text = hf_tok.apply_chat_template(turns, tools=tools, add_generation_prompt=add_generation_prompt, tokenize=False)
    ids = hf_tok.apply_chat_template(turns, tools=tools, add_generation_prompt=add_generation_prompt, tokenize=True,
                                     return_dict=True)["input_ids"]
    return text, list(ids)


@pytest.mark.parametrize("n_turns", [2, 5, 7])
def test_the_models_template_lists_tools_and_writes_calls_and_results_as_transformers_does(tools_model, n_turns):
    hf_dir, run = tools_model
    generator = lmforge.load(str(run))
    turns = CONVERSATION[:n_turns]
    text, ids = theirs(hf_dir, turns, [WEATHER, TIME])
    assert "<tools>" in text and (n_turns < 5 or '{"unit": "C", "city": "Rome"}' in text)
    for given in (turns, openai_style(turns)):  # arguments as a dict (transformers) or as JSON text (OpenAI)
        ours = generator.render_chat(given, tools=[WEATHER, TIME])
        assert ours == text
        assert prompt_ids(generator.tokenizer, ours) == ids
    assert generator.render_chat(turns[:2]) == theirs(hf_dir, turns[:2], None)[0]  # no tools: none listed
    bare = generator.render_chat(turns, tools=[WEATHER["function"], TIME["function"]])  # bare functions are wrapped
    assert bare == text


def test_the_server_renders_tools_and_calls_through_the_models_template(tools_model):
    from fastapi.testclient import TestClient

    from lmforge.serve import ServeConfig, load_app

    hf_dir, run = tools_model
    with TestClient(load_app(str(run), ServeConfig(), device="cpu"), base_url="http://127.0.0.1") as client:
        messages = openai_style(CONVERSATION)
        out = client.post("/tokenize", json={"messages": messages, "tools": [WEATHER, TIME]})
        assert out.status_code == 200, out.text
        assert out.json()["tokens"] == theirs(hf_dir, CONVERSATION, [WEATHER, TIME])[1]
        asked = client.post("/tokenize", json={"messages": messages[:2], "tools": [WEATHER]}).json()
        assert asked["tokens"] == theirs(hf_dir, CONVERSATION[:2], [WEATHER])[1]
        reply = client.post("/v1/chat/completions", json={"messages": messages[:2], "tools": [WEATHER],
                                                           "tool_choice": "required", "max_tokens": 40, "seed": 0})
        assert reply.status_code == 200, reply.text
        assert reply.json()["usage"]["prompt_tokens"] == asked["count"]  # the prompt the model read
        bad = client.post("/tokenize", json={"messages": [{"role": "user", "content": "x"}, {
            "role": "assistant", "tool_calls": [{"type": "function", "function": {"name": "f", "arguments": "[1]"}}]}]})
        assert bad.status_code == 422 and "a tool call is" in bad.json()["error"]["message"]


def test_fine_tuning_records_with_tools_learn_the_call_as_the_template_writes_it(tools_model, tmp_path):
    hf_dir, run = tools_model
    records = [{"messages": [{"role": "user", "content": f"Weather in city {i}?"},
                             {"role": "assistant", "tool_calls": [{"type": "function", "function": {
                                 "name": "get_weather", "arguments": json.dumps({"city": f"c{i}"})}}]}],
                "tools": [WEATHER, TIME]} for i in range(6)]
    records += [{"messages": CONVERSATION[:6], "tools": json.dumps([WEATHER, TIME])}]  # tools as JSON text too
    (tmp_path / "tools.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    assert lmforge.cli.main(["prepare", str(tmp_path / "tools.jsonl"), "--task", "sft", "--tokenizer", str(run),
                             "--out", str(tmp_path / "data"), "--split", "0.6,0.2,0.2"]) == 0
    assert read_task_manifest(tmp_path / "data")["fields"]["tools"] == "tools"
    tok = load_for_inference(run, "cpu")[1]
    seen = set()
    for split in ("train", "val", "test"):
        ex = load_examples(tmp_path / "data", split)
        for i in range(len(ex)):
            ids = ex.tokens[ex.offsets[i]:ex.offsets[i + 1]].tolist()
            p = int(ex.prompt_lengths[i])
            reply = tok.decode(ids[p:-1])
            record = next(r for r in records if (r["messages"][-1].get("content") or "") in reply
                          and (r["messages"][-1].get("content") or json.loads(
                              r["messages"][-1]["tool_calls"][0]["function"]["arguments"])["city"] in reply))
            turns = [{**t, "tool_calls": [{"type": "function", "function": {
                "name": c["function"]["name"], "arguments": json.loads(c["function"]["arguments"])
                if isinstance(c["function"]["arguments"], str) else c["function"]["arguments"]}}
                for c in t["tool_calls"]]} if t.get("tool_calls") else t for t in record["messages"]]
            # the example: transformers' ids of the whole conversation up to the end of the reply's turn
            whole = theirs(hf_dir, turns, [WEATHER, TIME], add_generation_prompt=False)[1]
            assert ids == whole[:len(ids)] and whole[len(ids):] == tok.encode("\n")
            assert ids[:p] == theirs(hf_dir, turns[:-1], [WEATHER, TIME])[1]
            assert ids[-1] == tok.end_id and "<tools>" in tok.decode(ids[:p])
            if turns[-1].get("tool_calls"):
                args = json.dumps(turns[-1]["tool_calls"][0]["function"]["arguments"])
                assert reply == f'<tool_call>\n{{"name": "get_weather", "arguments": {args}}}\n</tool_call>'
            seen.add(reply)
    assert len(seen) == 7


def test_lmforges_own_format_lists_tools_for_a_fine_tuned_model_and_writes_calls_as_json_lines():
    template = {"chat": dict(CHAT_TEMPLATE)}
    calls = CONVERSATION[2]
    text = render_chat(template, CONVERSATION[:2] + [calls, CONVERSATION[3]], [WEATHER])
    assert text.startswith("<|tools|>\n" + json.dumps(WEATHER["function"]) + "\n<|system|>\nBe brief.\n")
    lines = '{"name": "get_weather", "arguments": {"unit": "C", "city": "Rome"}}\n{"name": "get_time", "arguments": {}}'
    assert text.endswith(f"<|assistant|>\n{lines}\n<|tool|>\n22 C\n<|assistant|>\n")
    assert reply_text(template, CONVERSATION[:3], [WEATHER]) == lines  # the completion: the calls as JSON lines
    assert reply_text(template, CONVERSATION[:6]) == "22 C at 10:00."
    unlisted = {"chat": {**CHAT_TEMPLATE, "tools_turn": False}}  # a model never fine-tuned on conversations
    assert render_chat(unlisted, CONVERSATION[:2], [WEATHER]) == render_chat(template, CONVERSATION[:2])
    # a Jinja template that knows no calls reads them as the turn's text, as lmforge's own format does
    plain = {"chat": {"jinja": "{% for m in messages %}{{ m.role }}: {{ m.content }}\n{% endfor %}",
                      "bos_token": None, "eos_token": None}}
    assert render_chat(plain, CONVERSATION[:3]).endswith(f"assistant: {lines}\n")
    assert reply_text(plain, CONVERSATION[:3]) == lines


@pytest.mark.parametrize("turns, tools, words", [
    ([{"role": "user", "content": "x", "tool_calls": [CALL]}], None, "only an assistant turn calls tools"),
    ([{"role": "assistant", "content": None}], None, "content may be null only in an assistant turn that calls"),
    ([{"role": "assistant", "tool_calls": [{"function": {"name": "f", "arguments": "{oops"}}]}], None,
     "a tool call is"),
    ([{"role": "assistant", "tool_calls": [{"function": {"arguments": {}}}]}], None, "a tool call is"),
    ([{"role": "user", "content": "x"}], {"type": "function"}, "must be a list of function tools"),
    ([{"role": "user", "content": "x"}], [{"type": "retrieval"}], "tools[0] is not a function tool"),
    ([{"role": "user", "content": "x"}], "[oops", "is not a JSON list of function tools"),
    ([{"role": "user", "content": 3}], None, 'messages[0] is not a {"role": string, "content": string} turn'),
])
def test_malformed_turns_and_tools_are_one_line_errors(turns, tools, words):
    with pytest.raises(ConfigError) as e:
        render_chat({"chat": dict(CHAT_TEMPLATE)}, turns, tools)
    assert words in str(e.value) and "\n" not in str(e.value)


def test_a_bad_tool_record_names_its_line_and_is_skipped_with_skip_bad(tools_model, tmp_path):
    _, run = tools_model
    good = [{"messages": [{"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": f"a{i}"}]}
            for i in range(5)]
    bad = {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "tool_calls": [
        {"type": "function", "function": {"name": "f", "arguments": "{oops"}}]}]}
    (tmp_path / "r.jsonl").write_text("".join(json.dumps(r) + "\n" for r in [*good, bad]), encoding="utf-8")
    args = ["prepare", str(tmp_path / "r.jsonl"), "--task", "sft", "--tokenizer", str(run), "--out",
            str(tmp_path / "data")]
    assert lmforge.cli.main(args) == 2
    assert not (tmp_path / "data").exists()
    assert lmforge.cli.main(args + ["--skip-bad"]) == 0
    report = json.loads((tmp_path / "data" / "report.json").read_text(encoding="utf-8"))
    assert report["bad_records"] == 1 and "a tool call is" in report["bad"][0]["reason"]
    assert report["bad"][0]["where"].endswith("r.jsonl:6")


# ------------------------------------------------------------------------------ the form calls are written in
LLAMA_TOOLS = """{{- bos_token }}
{%- if tools %}{{- 'system: tools\\n' }}{%- for t in tools %}{{- t | tojson + '\\n' }}{%- endfor %}{%- endif %}
{%- for message in messages %}
{%- if message.tool_calls %}
{%- if message.tool_calls | length != 1 %}{{- raise_exception('one tool call at a time') }}{%- endif %}
{%- set call = message.tool_calls[0].function %}
{{- 'assistant: {"name": "' + call.name + '", "parameters": ' + call.arguments | tojson + '}<|eot_id|>' }}
{%- else %}{{- message.role + ': ' + message.content + '<|eot_id|>' }}{%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}{{- 'assistant: ' }}{%- endif %}"""
MISTRAL_TOOLS = """{%- if tools %}{{- '[AVAILABLE_TOOLS]' + tools | tojson + '[/AVAILABLE_TOOLS]' }}{%- endif %}
{%- for message in messages %}
{%- if message.role == 'user' %}{{- '[INST] ' + message.content + '[/INST]' }}
{%- elif message.tool_calls %}{{- '[TOOL_CALLS][' }}
{%- for c in message.tool_calls %}
{{- '{"name": "' + c.function.name + '", "arguments": ' + c.function.arguments | tojson + '}' }}
{%- if not loop.last %}{{- ', ' }}{%- endif %}
{%- endfor %}{{- ']' + eos_token }}
{%- elif message.role == 'tool' %}{{- '[TOOL_RESULTS]' + message.content + '[/TOOL_RESULTS]' }}
{%- else %}{{- message.content + eos_token }}{%- endif %}
{%- endfor %}"""
MISTRAL_IDS = """{%- if tools %}{{- '[AVAILABLE_TOOLS] ' + tools | tojson + '[/AVAILABLE_TOOLS]' }}{%- endif %}
{%- for message in messages %}
{%- if message.role == 'user' %}{{- '[INST] ' + message.content + '[/INST]' }}
{%- elif message.tool_calls %}{{- '[TOOL_CALLS] [' }}
{%- for c in message.tool_calls %}
{%- if c.id is not defined or c.id | length != 9 %}
{{- raise_exception('Tool call IDs should be alphanumeric strings with length 9!') }}{%- endif %}
{%- set out = c.function | tojson %}{{- out[:-1] + ', "id": "' + c.id + '"}' }}
{%- if not loop.last %}{{- ', ' }}{%- endif %}
{%- endfor %}{{- ']' + eos_token }}
{%- elif message.role == 'tool' %}{{- '[TOOL_RESULTS] {"content": ' + message.content | tojson + ', "call_id": "'
  + message.tool_call_id + '"}[/TOOL_RESULTS]' }}
{%- else %}{{- message.content + eos_token }}{%- endif %}
{%- endfor %}"""  # Mistral v0.3's: each call's id (9 letters and digits) after its arguments
XML_TOOLS = """{%- for message in messages %}{%- if message.tool_calls %}
{%- for c in message.tool_calls %}{{- '<call name="' + c.function.name + '"/>' }}{%- endfor %}
{%- else %}{{- message.role + ': ' + message.content + '\\n' }}{%- endif %}{%- endfor %}
{%- if add_generation_prompt %}{{- 'assistant: ' }}{%- endif %}"""


def jinja(source: str) -> dict:
    return {"chat": {"jinja": source, "bos_token": "<s>", "eos_token": "</s>"}}


def test_the_form_of_a_templates_calls_is_found_from_the_template():
    from lmforge.data.tasks import CALL_LINES, CallFormat, call_format

    assert call_format(jinja(TOOLS_TEMPLATE)) == CallFormat("<tool_call>\n", "\n</tool_call>\n<tool_call>\n",
                                                            "\n</tool_call>")
    assert call_format(jinja(LLAMA_TOOLS)) == CallFormat("", None, "", "name", "parameters")  # one call per turn
    assert call_format(jinja(MISTRAL_TOOLS)) == CallFormat("[TOOL_CALLS][", ", ", "]")  # one list for all
    assert call_format(jinja(MISTRAL_IDS)) == CallFormat("[TOOL_CALLS] [", ", ", "]", id_key="id")  # with ids
    assert call_format(jinja(XML_TOOLS)) == CALL_LINES  # calls not written as JSON: lmforge's own lines
    assert call_format({"chat": dict(CHAT_TEMPLATE)}) == CALL_LINES == CallFormat("", "\n", "")
    assert call_format(jinja("{% for m in messages %}{{ m.content }}{% endfor %}")) == CALL_LINES  # no calls


def scripted_chat_run(root: Path, template: str, script: str, messages: list[dict], tools: list[dict]) -> Path:
    """A run with the byte tokenizer and `template` as its chat template, whose model writes `script` right after
    the prompt of `messages` with `tools`, whatever it reads (one-hot positions read by lm_head)."""
    import torch

    from lmforge.checkpoint import save_checkpoint
    from lmforge.config import ModelConfig, RunConfig
    from lmforge.data.tasks import own_chat
    from lmforge.model import GPT
    from lmforge.tokenizer import byte_tokenizer

    tok = byte_tokenizer()
    tok.chat_template = template
    tok.save(root / "tokenizer.json")
    start = len(prompt_ids(tok, render_chat({"chat": own_chat(tok)}, messages, tools))) - 1  # the prompt's last
    block = 64 * ((start + len(script) + 8) // 64 + 1)
    model = GPT(ModelConfig(vocab_size=tok.vocab_size, block_size=block, n_layer=1, n_head=2, n_embd=block,
                            tie_embeddings=False)).eval()
    with torch.no_grad():
        for weight in model.parameters():
            weight.zero_()
        model.norm_f.weight.fill_(1.0)
        model.pos_emb.weight.copy_(10 * torch.eye(block))
        for i, token in enumerate(tok.encode(script) + [tok.end_id]):
            model.lm_head.weight[token, start + i] = 20.0
    save_checkpoint(root / "run", 1, model, None, RunConfig(model=model.config), {},
                    tokenizer_file=root / "tokenizer.json")
    return root / "run"


ASK = [{"role": "user", "content": "Time in Rome and Oslo?"}]
ZONES = [("get_time", {"zone": "CET"}), ("get_time", {"zone": "UTC"})]
ZONE_TOOL = {"type": "function", "function": {"name": "get_time", "parameters": {
    "type": "object", "properties": {"zone": {"enum": ["UTC", "CET"]}}, "required": ["zone"]}}}


def in_form(template: str, calls: list[tuple[str, dict]], ids: tuple[str, ...] = ("x1Y2z3W4v", "Q9r8S7t6U")) -> str:
    """The calls as `template` writes them (with `ids` where it writes ids)."""
    from lmforge.data.tasks import call_format

    fmt = call_format(jinja(template))
    keys = (fmt.name_key, fmt.args_key)
    texts = [json.dumps({**dict(zip(keys, c)), **({fmt.id_key: i} if fmt.id_key else {})}) for c, i in zip(calls, ids)]
    return fmt.lead + fmt.mid.join(texts) + fmt.tail


@pytest.mark.parametrize("template", [TOOLS_TEMPLATE, MISTRAL_TOOLS, MISTRAL_IDS], ids=["qwen", "mistral", "ids"])
def test_the_server_reads_calls_written_in_the_templates_form_whole_and_streamed(tmp_path, template):
    """A model that writes two calls as its template writes them (Qwen-style <tool_call> per call, Mistral-style
    one list, Mistral v0.3's with each call's id after its arguments) gets two tool calls, whole and in deltas,
    with tool_choice "required" and "auto"; the reply is held to that form (an "auto" reply in it is a call, not
    text), and the conversation with those calls renders them in the same form (the server's ids: 9 letters and
    digits where the template asks for such, which the model's ids never reach the arguments of)."""
    import httpx

    from lmforge.serve import ServeConfig, load_app
    from test_serve import running, streamed_choices

    script = in_form(template, ZONES)
    run = scripted_chat_run(tmp_path, template, script, ASK, [ZONE_TOOL])
    with running(load_app(str(run), ServeConfig(), device="cpu")) as url, httpx.Client(base_url=url, timeout=30) as c:
        for choice in ("required", "auto"):
            body = {"messages": ASK, "max_tokens": len(script) + 4, "temperature": 0, "tools": [ZONE_TOOL],
                    "tool_choice": choice}
            whole = c.post("/v1/chat/completions", json=body)
            assert whole.status_code == 200, whole.text
            reply = whole.json()["choices"][0]
            assert reply["finish_reason"] == "tool_calls" and reply["message"]["content"] is None
            got = reply["message"]["tool_calls"]
            assert [(g["function"]["name"], json.loads(g["function"]["arguments"])) for g in got] == ZONES
            streamed = streamed_choices(c, body)[0]
            assert streamed["finish_reason"] == "tool_calls" and streamed["content"] == ""
            assert [(p["name"], p["arguments"]) for p in streamed["tool_calls"].values()] == [
                (g["function"]["name"], g["function"]["arguments"]) for g in got]
        one = c.post("/v1/chat/completions", json={**body, "parallel_tool_calls": False}).json()["choices"][0]
        assert [json.loads(g["function"]["arguments"]) for g in one["message"]["tool_calls"]] == [ZONES[0][1]]
        history = ASK + [{"role": "assistant", "content": None, "tool_calls": got}]
        tokens = c.post("/tokenize", json={"messages": history, "tools": [ZONE_TOOL]}).json()["tokens"]
        ids = tuple(g["id"] for g in got)
        assert all(len(i) == 9 and i.isalnum() for i in ids) if template is MISTRAL_IDS else ids[0].startswith("call_")
        assert in_form(template, ZONES, ids) in c.post("/detokenize", json={"tokens": tokens}).json()["prompt"]


def test_a_call_in_another_form_is_held_to_the_templates_form(tmp_path):
    """A model that writes lmforge's bare JSON line under a template whose calls are wrapped in <tool_call>: with
    tool_choice "required" its reply is still a call in the template's form; with "auto" the same bare JSON is
    text (it does not begin as the template's calls do)."""
    import httpx

    from lmforge.serve import ServeConfig, load_app
    from test_serve import running

    script = json.dumps({"name": "get_time", "arguments": {"zone": "CET"}})
    run = scripted_chat_run(tmp_path, TOOLS_TEMPLATE, script, ASK, [ZONE_TOOL])
    with running(load_app(str(run), ServeConfig(), device="cpu")) as url, httpx.Client(base_url=url, timeout=30) as c:
        body = {"messages": ASK, "max_tokens": 80, "temperature": 0, "tools": [ZONE_TOOL]}
        held = c.post("/v1/chat/completions", json={**body, "tool_choice": "required"}).json()["choices"][0]
        (call,) = held["message"]["tool_calls"]
        assert call["function"]["name"] == "get_time" and json.loads(call["function"]["arguments"])["zone"] in (
            "UTC", "CET")
        text = c.post("/v1/chat/completions", json={**body, "tool_choice": "auto"}).json()["choices"][0]
        assert text["message"]["content"] == script and "tool_calls" not in text["message"]


def test_preference_records_with_tools_prefer_a_call_as_the_template_writes_it(tools_model):
    """A DPO pair over a conversation with tools (TRL's conversational preference records): the prompt is what
    transformers writes for its turns and tools, the chosen call what the template writes for that turn."""
    from lmforge.data.preference import record_preference
    from lmforge.data.tasks import Fields, own_chat
    from lmforge.data.unpaired import record_unpaired

    hf_dir, run = tools_model
    template = {"chat": own_chat(load_for_inference(run, "cpu")[1])}
    call = {"role": "assistant", "tool_calls": [{"type": "function", "function": {
        "name": "get_weather", "arguments": '{"city": "Oslo"}'}}]}
    record = {"prompt": CONVERSATION[:2], "tools": [WEATHER], "chosen": [call],
              "rejected": [{"role": "assistant", "content": "No idea."}]}
    prompt, chosen, rejected, chat, _ = record_preference(record, template, Fields())
    assert chat and prompt == theirs(hf_dir, CONVERSATION[:2], [WEATHER])[0]
    assert chosen == '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Oslo"}}\n</tool_call>'
    assert rejected == "No idea."
    (kto,) = record_unpaired({"prompt": CONVERSATION[:2], "tools": [WEATHER], "completion": [call], "label": True},
                             template, Fields())
    assert kto[:3] == (prompt, chosen, 1)


def test_a_turns_other_keys_reach_the_template_as_transformers_passes_them():
    """A template may show keys of a turn other than role and content (a reasoning trace, a tool result's name):
    they are passed on, as apply_chat_template passes the messages."""
    source = ("{% for m in messages %}{{ m.role }}{% if m.name %}[{{ m.name }}]{% endif %}: "
              "{% if m.reasoning_content %}<think>{{ m.reasoning_content }}</think>{% endif %}{{ m.content }}\n"
              "{% endfor %}")
    turns = [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4", "reasoning_content": "sum"},
             {"role": "tool", "name": "calc", "content": "4"}]
    assert render_chat(jinja(source), turns) == "user: 2+2?\nassistant: <think>sum</think>4\ntool[calc]: 4\n"


THINKING = ("{% for m in messages %}{{ '<|im_start|>' + m.role + '\\n' + m.content + '<|im_end|>\\n' }}{% endfor %}"
            "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}"
            "{% if enable_thinking is defined and enable_thinking is false %}{{ '<think>\\n\\n</think>\\n\\n' }}{% endif %}"
            "{% endif %}")


def test_chat_template_variables_reach_the_template_as_apply_chat_templates_keyword_arguments(tools_model, tmp_path):
    """Qwen3's enable_thinking and the like: the Python API's keyword arguments and the server's
    chat_template_kwargs (vLLM's field) reach the template as apply_chat_template's extra keyword arguments do; the
    names lmforge sets itself are refused in one line."""
    from fastapi.testclient import TestClient

    from lmforge.serve.app import create_app

    hf_dir, run = tools_model
    hf_tok = transformers.AutoTokenizer.from_pretrained(hf_dir)
    hf_tok.chat_template = THINKING
    hf_tok.save_pretrained(tmp_path / "hf")
    generator = lmforge.load(str(run))
    generator.tokenizer.chat_template = THINKING
    asked = CONVERSATION[:2]
    for kwargs in ({}, {"enable_thinking": False}, {"enable_thinking": True}):
        theirs_text = hf_tok.apply_chat_template(asked, add_generation_prompt=True, tokenize=False, **kwargs)
        assert generator.render_chat(asked, **kwargs) == theirs_text
        assert generator.render_chat(asked, variables=kwargs) == theirs_text
    assert generator.render_chat(asked, enable_thinking=False).endswith("<think>\n\n</think>\n\n")
    with pytest.raises(ConfigError, match="may not set add_generation_prompt, messages"):
        generator.render_chat(asked, variables={"messages": [], "add_generation_prompt": False})
    with TestClient(create_app(generator), base_url="http://127.0.0.1") as client:
        ids = client.post("/tokenize", json={"messages": asked, "chat_template_kwargs": {"enable_thinking": False}})
        assert ids.json()["tokens"] == list(hf_tok.apply_chat_template(
            asked, add_generation_prompt=True, tokenize=True, return_dict=True, enable_thinking=False)["input_ids"])
        bad = client.post("/v1/chat/completions", json={"messages": asked, "max_tokens": 2,
                                                         "chat_template_kwargs": {"tools": []}})
        assert bad.status_code == 422 and "may not set tools" in bad.json()["error"]["message"]
