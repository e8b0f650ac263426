"""/v1/responses details the main tests do not reach: parallel function calls given back as input are one
assistant turn (the conversation the chat endpoint renders for them), a stream cut by a stop string still carries
the log probabilities of the tokens whose text the stop string held back, parallel calls stream one closed item
after another, and a response echoes OpenAI's defaults and stores an assistant's input as output_text."""

from __future__ import annotations

from pathlib import Path

import pytest

from lmforge.serve import ServeConfig, load_app
from test_serve import CHAT, TIME, TWO_CALLS, WEATHER, make_run, running, scripted_run

openai = pytest.importorskip("openai")  # a dev dependency (pyproject [dev])


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    return make_run(tmp_path_factory.mktemp("serve-responses-guards"), block_size=256)


@pytest.fixture(scope="module")
def client(run_dir):
    with running(load_app(str(run_dir), ServeConfig(), device="cpu")) as url:
        yield openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0)


def test_consecutive_function_calls_given_as_input_are_one_assistant_turn(client):
    calls = [("call_a", "weather", '{"city": "Verona"}'), ("call_b", "weather", '{"city": "Mantua"}')]
    out = client.responses.create(model="run", max_output_tokens=8, extra_body={"seed": 6}, input=[
        {"role": "user", "content": "Weather in Verona and Mantua?"},
        *[{"type": "function_call", "call_id": i, "name": n, "arguments": a} for i, n, a in calls],
        {"type": "function_call_output", "call_id": "call_a", "output": "sunny"},
        {"type": "function_call_output", "call_id": "call_b", "output": "rain"}])
    chat = client.chat.completions.create(model="run", max_tokens=8, seed=6, messages=[
        {"role": "user", "content": "Weather in Verona and Mantua?"},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": i, "type": "function", "function": {"name": n, "arguments": a}} for i, n, a in calls]},
        {"role": "tool", "tool_call_id": "call_a", "content": "sunny"},
        {"role": "tool", "tool_call_id": "call_b", "content": "rain"}])
    assert out.usage.input_tokens == chat.usage.prompt_tokens
    assert out.output_text == chat.choices[0].message.content


def test_a_stream_stopped_by_a_stop_string_has_the_logprobs_of_the_unstreamed_response(client):
    asked = dict(model="run", input="Who is there?", max_output_tokens=24, include=["message.output_text.logprobs"],
                 top_logprobs=2, extra_body={"seed": 8})
    free = client.responses.create(**asked)
    text = free.output_text
    assert len(text) > 12
    stop = text[8:10]  # met after some tokens: the tokens of the stop string have no text, only log probabilities
    asked["extra_body"] = {"seed": 8, "stop": [stop]}
    whole = client.responses.create(**asked)
    assert whole.output_text == text[:text.index(stop)]
    want = [lp.model_dump() for lp in whole.output[0].content[0].logprobs]
    assert len(want) == whole.usage.output_tokens  # every token taken, the stop string's too
    events = list(client.responses.create(**asked, stream=True))
    final = events[-1].response
    assert final.output_text == whole.output_text
    assert [lp.model_dump() for lp in final.output[0].content[0].logprobs] == want
    done = [e for e in events if e.type == "response.output_text.done"]
    assert [lp.model_dump() for lp in done[0].logprobs] == want


def test_parallel_calls_stream_as_one_whole_item_each_closed_before_the_next_opens(tmp_path):
    """A model that writes two calls, one per line (test_serve.TWO_CALLS): the stream adds, fills and closes the
    first function_call item (arguments.done, output_item.done) before it adds the second."""
    run = scripted_run(tmp_path, TWO_CALLS, start=50, block_size=192)
    tools = [{"type": "function", **tool["function"]} for tool in (WEATHER, TIME)]
    with running(load_app(str(run), ServeConfig(), device="cpu")) as url:
        client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0)
        asked = dict(model="run", instructions=CHAT[0]["content"], input=CHAT[1]["content"], tools=tools,
                     tool_choice="required", max_output_tokens=150, temperature=0)
        whole = client.responses.create(**asked)
        events = list(client.responses.create(**asked, stream=True))
    calls = [(o.name, o.arguments) for o in whole.output]
    assert [name for name, _ in calls] == ["get_time", "get_weather"] and whole.status == "completed"
    kinds = [(e.type, getattr(e, "output_index", None)) for e in events if e.type.startswith("response.output_item")
             or e.type == "response.function_call_arguments.done"]
    assert kinds == [("response.output_item.added", 0), ("response.function_call_arguments.done", 0),
                     ("response.output_item.done", 0), ("response.output_item.added", 1),
                     ("response.function_call_arguments.done", 1), ("response.output_item.done", 1)]
    done = [e.item for e in events if e.type == "response.output_item.done"]
    assert [(item.name, item.arguments, item.status) for item in done] == [(n, a, "completed") for n, a in calls]
    assert [(o.name, o.arguments) for o in events[-1].response.output] == calls


def test_a_response_echoes_openais_defaults_and_stores_assistant_input_as_output_text(client):
    out = client.responses.create(model="run", max_output_tokens=2, input=[
        {"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."},
        {"role": "user", "content": "Who?"}])
    assert out.parallel_tool_calls is True and out.store is True and out.tool_choice == "auto"  # OpenAI's defaults
    assert client.responses.create(model="run", input="x", max_output_tokens=1,
                                   parallel_tool_calls=False).parallel_tool_calls is False
    items = client.responses.input_items.list(out.id).data
    assert [(i.role, i.content[0].type, i.content[0].text) for i in items] == [
        ("user", "input_text", "Hi"), ("assistant", "output_text", "Hello."), ("user", "input_text", "Who?")]
