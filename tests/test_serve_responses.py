"""POST /v1/responses (OpenAI's Responses API) through the official openai package: the same reply as the chat it
means, its stream events, stored turns for previous_response_id, function tools and structured output; bad
requests are one clear line."""

from __future__ import annotations

import json
from pathlib import Path

import httpx
import pytest

from lmforge.serve import ServeConfig, load_app
from test_serve import make_run, running

openai = pytest.importorskip("openai")  # a dev dependency (pyproject [dev])

WEATHER = {"type": "function", "name": "weather", "description": "the weather in a city",
           "parameters": {"type": "object", "properties": {"city": {"enum": ["Verona", "Mantua"]}},
                          "required": ["city"], "additionalProperties": False}}


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    return make_run(tmp_path_factory.mktemp("serve-responses"), block_size=256)  # room for a conversation


@pytest.fixture(scope="module")
def server(run_dir):
    with running(load_app(str(run_dir), ServeConfig(), device="cpu")) as url:
        yield url


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server + "/v1", api_key="unused", max_retries=0)


def test_a_response_is_the_chat_reply_it_means(client):
    chat = client.chat.completions.create(model="run", max_tokens=12, seed=2, messages=[
        {"role": "system", "content": "Be brief."}, {"role": "user", "content": "Who is there?"}])
    out = client.responses.create(model="run", input="Who is there?", instructions="Be brief.", max_output_tokens=12,
                                  extra_body={"seed": 2})
    assert out.object == "response" and out.id.startswith("resp_") and out.model == "run"
    assert out.output_text == chat.choices[0].message.content and out.output_text
    assert [o.type for o in out.output] == ["message"] and out.output[0].role == "assistant"
    assert out.usage.input_tokens == chat.usage.prompt_tokens and out.usage.output_tokens == 12
    assert out.usage.total_tokens == out.usage.input_tokens + 12
    assert out.status == "incomplete" and out.incomplete_details.reason == "max_output_tokens"  # cut at 12 tokens
    items = client.responses.create(model="run", max_output_tokens=12, extra_body={"seed": 2}, input=[
        {"role": "developer", "content": "Be brief."},
        {"type": "message", "role": "user", "content": [{"type": "input_text", "text": "Who is "},
                                                        {"type": "input_text", "text": "there?"}]}])
    assert items.output_text == out.output_text  # the same conversation, as items


def test_the_stream_is_openais_events_and_adds_up_to_the_response(client):
    whole = client.responses.create(model="run", input="Who is there?", max_output_tokens=10,
                                    extra_body={"seed": 5})
    events = list(client.responses.create(model="run", input="Who is there?", max_output_tokens=10, stream=True,
                                          extra_body={"seed": 5}))
    kinds = [e.type for e in events]
    assert kinds[:4] == ["response.created", "response.in_progress", "response.output_item.added",
                         "response.content_part.added"]
    assert kinds[-4:] == ["response.output_text.done", "response.content_part.done", "response.output_item.done",
                          "response.incomplete"]
    assert set(kinds[4:-4]) == {"response.output_text.delta"} and len(kinds) > 9
    assert [e.sequence_number for e in events] == list(range(len(events)))
    text = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    assert text == whole.output_text == events[-4].text == events[-1].response.output_text
    assert events[-1].response.usage.output_tokens == 10 and events[-1].response.id == events[0].response.id


def test_logprobs_are_the_chats_whole_and_streamed(client):
    chat = client.chat.completions.create(model="run", messages=[{"role": "user", "content": "Who?"}], max_tokens=6,
                                          seed=4, logprobs=True, top_logprobs=3)
    want = [c.model_dump() for c in chat.choices[0].logprobs.content]
    asked = dict(model="run", input="Who?", max_output_tokens=6, include=["message.output_text.logprobs"],
                 top_logprobs=3, extra_body={"seed": 4})
    out = client.responses.create(**asked)
    assert [lp.model_dump() for lp in out.output[0].content[0].logprobs] == want and len(want) == 6
    assert all(len(lp["top_logprobs"]) == 3 for lp in want)
    events = list(client.responses.create(**asked, stream=True))
    streamed = [lp.model_dump() for e in events if e.type == "response.output_text.delta" for lp in e.logprobs]
    assert streamed == want == [lp.model_dump() for lp in events[-1].response.output[0].content[0].logprobs]


def test_previous_response_id_continues_the_stored_conversation(client, server):
    first = client.responses.create(model="run", input="Who is there?", instructions="Be brief.",
                                    max_output_tokens=8, extra_body={"seed": 1})
    second = client.responses.create(model="run", input="And then?", previous_response_id=first.id,
                                     max_output_tokens=8, extra_body={"seed": 1})
    chat = client.chat.completions.create(model="run", max_tokens=8, seed=1, messages=[  # instructions not carried
        {"role": "user", "content": "Who is there?"}, {"role": "assistant", "content": first.output_text},
        {"role": "user", "content": "And then?"}])
    assert second.output_text == chat.choices[0].message.content and second.previous_response_id == first.id
    assert client.responses.retrieve(first.id).output_text == first.output_text
    items = client.responses.input_items.list(second.id).data  # its own input, as items
    assert [(i.type, i.role, i.content[0].text) for i in items] == [("message", "user", "And then?")]
    assert client.responses.delete(first.id) is None
    with pytest.raises(openai.NotFoundError):
        client.responses.input_items.list(first.id)
    with pytest.raises(openai.NotFoundError, match="no stored response"):
        client.responses.create(model="run", input="x", previous_response_id=first.id)
    unstored = client.responses.create(model="run", input="x", max_output_tokens=2, store=False)
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve(unstored.id)


def test_function_tools_call_stream_and_take_the_output_back(client):
    # (a random model writes call after call: one call per reply)
    out = client.responses.create(model="run", input="Weather in Verona?", tools=[WEATHER], tool_choice="required",
                                  max_output_tokens=100, parallel_tool_calls=False, extra_body={"seed": 3})
    chat = client.chat.completions.create(
        model="run", messages=[{"role": "user", "content": "Weather in Verona?"}], max_tokens=100, seed=3,
        tools=[{"type": "function", "function": {k: v for k, v in WEATHER.items() if k != "type"}}],
        tool_choice="required", parallel_tool_calls=False)
    call, chat_call = out.output[0], chat.choices[0].message.tool_calls[0]
    assert call.type == "function_call" and call.name == "weather" and out.status == "completed"
    assert call.arguments == chat_call.function.arguments and json.loads(call.arguments)["city"] in ("Verona", "Mantua")
    assert call.call_id.startswith("call_") and call.id.startswith("fc_")

    events = list(client.responses.create(model="run", input="Weather in Verona?", tools=[WEATHER], stream=True,
                                          tool_choice={"type": "function", "name": "weather"},
                                          parallel_tool_calls=False, max_output_tokens=100, extra_body={"seed": 3}))
    deltas = "".join(e.delta for e in events if e.type == "response.function_call_arguments.delta")
    done = [e for e in events if e.type == "response.function_call_arguments.done"]
    assert deltas == done[0].arguments == call.arguments and events[-1].type == "response.completed"
    assert events[-1].response.output[0].name == "weather"

    answer = client.responses.create(model="run", max_output_tokens=6, tools=[WEATHER], tool_choice="none",
                                     previous_response_id=out.id, extra_body={"seed": 3}, input=[
                                         {"type": "function_call_output", "call_id": call.call_id, "output": "sunny"}])
    again = client.chat.completions.create(model="run", max_tokens=6, seed=3, messages=[
        {"role": "user", "content": "Weather in Verona?"},
        {"role": "assistant", "content": None, "tool_calls": [chat_call.model_dump()]},
        {"role": "tool", "tool_call_id": chat_call.id, "content": "sunny"}])
    assert answer.output_text == again.choices[0].message.content
    (given,) = client.responses.input_items.list(answer.id).data
    assert (given.type, given.call_id, given.output) == ("function_call_output", call.call_id, "sunny")


def test_text_format_json_schema_is_structured_output(client):
    schema = {"type": "object", "properties": {"who": {"enum": ["Romeo", "Juliet"]}, "sure": {"type": "boolean"}},
              "required": ["who", "sure"], "additionalProperties": False}
    out = client.responses.create(model="run", input="Who?", max_output_tokens=40, extra_body={"seed": 3}, text={
        "format": {"type": "json_schema", "name": "answer", "schema": schema, "strict": True}})
    assert set(json.loads(out.output_text)) == {"who", "sure"} and out.text.format.type == "json_schema"


@pytest.mark.parametrize("body, status, words", [
    ({"input": [{"role": "user", "content": [{"type": "input_image", "image_url": "x"}]}]}, 422,
     "input[0].content[0] is 'input_image': this server reads text parts"),
    ({"input": "x", "tools": [{"type": "web_search"}]}, 422, "tools[0] is a 'web_search' tool"),
    ({"input": "x", "frobnicate": 1}, 422, "unknown field 'frobnicate': /v1/responses takes"),
    ({"input": "x", "previous_response_id": "resp_nope"}, 404, "no stored response 'resp_nope'"),
    ({"input": "x", "truncation": "auto"}, 422, "truncation"),
    ({"input": "x", "reasoning": {"effort": "high"}}, 422, "reasoning"),
    ({"input": [{"type": "item_reference", "id": "x"}]}, 422, "is a 'item_reference' item"),
    ({"input": [{"role": "tool", "content": "x"}]}, 422, "input[0].role is 'tool'"),
    ({}, 422, "input is empty"),
    ({"input": "x", "text": {"format": {"type": "yaml"}}}, 422, "text.format is"),
    ({"input": "x", "tool_choice": {"type": "function"}}, 422, "tool_choice is"),
    ({"input": "x", "max_output_tokens": 0}, 422, "max_output_tokens"),
    ({"input": "x", "top_logprobs": 2}, 422, "top_logprobs needs include"),
    ({"input": "x", "include": ["reasoning.encrypted_content"]}, 422, "include"),
    ({"input": "x" * 300}, 422, "the prompt is"),
])
def test_a_bad_request_is_one_clear_line(server, body, status, words):
    r = httpx.post(server + "/v1/responses", json=body, timeout=30)
    assert r.status_code == status and words in r.json()["error"]["message"], r.text
    if words == "the prompt is":  # the field by its name here
        assert r.json()["error"]["param"] == "input"
    assert "\n" not in r.json()["error"]["message"]


def test_a_classifier_server_names_the_endpoint_to_use(tmp_path):
    from test_serve_classify import make_classifier_run

    app = load_app(str(make_classifier_run(tmp_path)), ServeConfig(), device="cpu")
    with running(app) as url:
        r = httpx.post(url + "/v1/responses", json={"input": "x"}, timeout=30)
    assert r.status_code == 400 and "/v1/classify" in r.json()["error"]["message"]


def test_the_store_keeps_the_newest_within_its_count_and_bytes():
    from lmforge.serve.responses import ResponseStore

    store = ResponseStore(size=3, budget=10_000)
    for i in range(5):
        store.put({"id": f"r{i}", "text": "x" * 100}, [{"role": "user", "content": "y"}])
    assert [k for k in ("r0", "r1", "r2", "r3", "r4") if store.get(k)] == ["r2", "r3", "r4"]  # the count
    store.put({"id": "big", "text": "x" * 6_000}, [])
    store.put({"id": "big2", "text": "x" * 6_000}, [])  # over the bytes: the oldest go until it fits
    assert list(store.items) == ["big2"] and 6_000 < store.used <= 10_000
    store.put({"id": "huge", "text": "x" * 20_000}, [])  # alone over the budget: not kept, the others stay
    assert store.get("huge") is None and list(store.items) == ["big2"]
    assert store.delete("big2") and store.used == 0 and store.delete("nope") is False


@pytest.mark.parametrize("stream", [True, False], ids=["stream", "no-stream"])
def test_a_client_that_leaves_stops_its_response(run_dir, stream):
    """The stream's events come from the chat's chunks: closing them cancels the generation, as leaving a plain
    request does."""
    import time

    from test_serve import wait_until

    app = load_app(str(run_dir), ServeConfig(max_tokens=100_000), device="cpu")
    engine = app.state.engine
    body = {"input": "x", "max_output_tokens": 100_000, "stream": stream}
    with running(app) as url:
        if stream:
            with httpx.Client(base_url=url, timeout=30) as c, c.stream("POST", "/v1/responses", json=body) as r:
                lines = r.iter_lines()
                while "response.output_text.delta" not in next(lines):  # it is generating
                    pass
        else:
            with httpx.Client(base_url=url, timeout=0.5) as c, pytest.raises(httpx.ReadTimeout):
                c.post("/v1/responses", json=body)
        wait_until(lambda: engine.stats()["running"] == 0)
        stopped_at = engine.stats()["generated_tokens"]
        time.sleep(0.3)  # (a pause to see that nothing more is generated)
        assert engine.stats()["generated_tokens"] == stopped_at < 100_000


def test_a_stream_past_its_time_ends_failed_and_is_not_stored(run_dir):
    app = load_app(str(run_dir), ServeConfig(timeout=0.5, max_tokens=1_000_000), device="cpu")
    with running(app) as url:
        events = list(openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0).responses.create(
            model="run", input="x", max_output_tokens=1_000_000, stream=True))
        assert events[-2].type == "error" and events[-2].code == "504"
        assert events[-1].type == "response.failed" and events[-1].response.status == "failed"
        assert events[-1].response.error.code == "504"
        assert httpx.get(f"{url}/v1/responses/{events[0].response.id}", timeout=30).status_code == 404
