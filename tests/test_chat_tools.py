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
