"""`lmforge serve` as real clients meet it: the official openai package, a browser on the playground page,
and the `lmforge serve` command itself in a process of its own."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from lmforge.cli import main
from lmforge.generate import load
from lmforge.serve import ServeConfig, load_app
from test_serve import make_run, running

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync"]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    return make_run(tmp_path_factory.mktemp("serve-clients"))


@pytest.fixture(scope="module")
def server(run_dir):
    with running(load_app(str(run_dir), ServeConfig(), device="cpu")) as url:
        yield url


def test_the_openai_package_completes_and_streams(server, run_dir):
    openai = pytest.importorskip("openai")  # a dev dependency (pyproject [dev])
    client = openai.OpenAI(base_url=server + "/v1", api_key="unused", max_retries=0)
    assert [m.id for m in client.models.list()] == ["run"]

    out = client.completions.create(model="run", prompt="ROMEO:", max_tokens=20, seed=4, temperature=0.8, n=2)
    assert len(out.choices) == 2 and out.usage.completion_tokens == 40 and out.usage.prompt_tokens == 7
    assert out.choices[0].text == load(str(run_dir), device="cpu").generate(
        "ROMEO:", max_new_tokens=20, seed=4, temperature=0.8, num_return_sequences=2)[0]

    pieces, finish = [], None
    for chunk in client.completions.create(model="run", prompt="ROMEO:", max_tokens=20, seed=4, temperature=0.8,
                                           stream=True):
        pieces.append(chunk.choices[0].text)
        finish = chunk.choices[0].finish_reason or finish
    assert len(pieces) > 1 and "".join(pieces) == out.choices[0].text and finish == "length"

    messages = [{"role": "user", "content": "Who is there?"}]
    chat = client.chat.completions.create(model="run", messages=messages, max_tokens=12, seed=2)
    gen = load(str(run_dir), device="cpu")
    assert chat.choices[0].message.content == gen.generate(gen.render_chat(messages), max_new_tokens=12, seed=2,
                                                           stop_strings=[gen.chat_stop()])
    streamed = "".join(c.choices[0].delta.content or "" for c in client.chat.completions.create(
        model="run", messages=messages, max_tokens=12, seed=2, stream=True) if c.choices)
    assert streamed == chat.choices[0].message.content

    # structured outputs and tools, as the openai package sends them and reads them back
    schema = {"type": "object", "properties": {"who": {"enum": ["Romeo", "Juliet"]}, "sure": {"type": "boolean"}},
              "required": ["who", "sure"], "additionalProperties": False}
    structured = client.chat.completions.create(model="run", messages=messages, max_tokens=40, seed=3,
                                                response_format={"type": "json_schema", "json_schema": {
                                                    "name": "answer", "schema": schema, "strict": True}})
    assert set(json.loads(structured.choices[0].message.content)) == {"who", "sure"}
    from typing import Literal, Optional

    from pydantic import BaseModel, Field

    class Line(BaseModel):
        who: Literal["Romeo", "Juliet"]
        act: int = Field(ge=1, le=5)

    class Scene(BaseModel):  # nested: the package's strict schema refers to Line through $defs
        lines: list[Line] = Field(max_length=2)
        place: Optional[Literal["Verona", "Mantua"]]

    parsed = client.chat.completions.parse(model="run", messages=messages, max_tokens=150, seed=3,
                                           response_format=Scene).choices[0].message
    assert isinstance(parsed.parsed, Scene) and parsed.parsed == Scene.model_validate_json(parsed.content)
    scene_call = client.chat.completions.parse(model="run", messages=messages, max_tokens=150, seed=4,
                                               tools=[openai.pydantic_function_tool(Scene)], tool_choice="required",
                                               parallel_tool_calls=False)  # random weights: one call
    call = scene_call.choices[0].message.tool_calls[0].function  # the parameters' $defs resolve inside them
    assert call.name == "Scene" and isinstance(call.parsed_arguments, Scene)
    tool = {"type": "function", "function": {"name": "who_is_there", "parameters": schema}}
    called = client.chat.completions.create(model="run", messages=messages, max_tokens=100, seed=3, tools=[tool],
                                            tool_choice={"type": "function", "function": {"name": "who_is_there"}},
                                            parallel_tool_calls=False)
    call = called.choices[0].message.tool_calls[0]
    assert called.choices[0].finish_reason == "tool_calls" and call.function.name == "who_is_there"
    assert json.loads(call.function.arguments)["who"] in ("Romeo", "Juliet")
    name, arguments, finish = "", "", None  # streamed: the package joins nothing itself, the deltas are OpenAI's
    for chunk in client.chat.completions.create(model="run", messages=messages, max_tokens=100, seed=3, tools=[tool],
                                                tool_choice="required", stream=True, parallel_tool_calls=False):
        for delta in chunk.choices[0].delta.tool_calls or []:
            name += delta.function.name or ""
            arguments += delta.function.arguments or ""
        finish = chunk.choices[0].finish_reason or finish
    assert finish == "tool_calls" and name == "who_is_there" and json.loads(arguments)["who"] in ("Romeo", "Juliet")
    chosen = client.chat.completions.create(model="run", messages=messages, max_tokens=100, seed=3, tools=[tool],
                                            parallel_tool_calls=False)
    reply = chosen.choices[0]  # tool_choice left out: "auto", the model decides
    assert (reply.finish_reason == "tool_calls" and json.loads(reply.message.tool_calls[0].function.arguments)) or \
        (reply.message.tool_calls is None and not reply.message.content.startswith("{"))
    with_logprobs = client.chat.completions.create(model="run", messages=messages, max_tokens=5, logprobs=True,
                                                   top_logprobs=2)
    assert len(with_logprobs.choices[0].logprobs.content) == with_logprobs.usage.completion_tokens

    with pytest.raises(openai.UnprocessableEntityError, match="max_tokens=5000 is above"):
        client.completions.create(model="run", prompt="x", max_tokens=5000)
    with pytest.raises(openai.NotFoundError, match="not served"):
        client.completions.create(model="gpt-3.5-turbo-instruct", prompt="x")


def test_the_playground_streams_into_the_page_in_chromium(server):
    """Type a prompt, click Generate, see the streamed text: the same text as the API gives for the seed."""
    if not os.path.exists(CHROMIUM):
        pytest.fail(f"{CHROMIUM} is missing: `make test` installs it (apt-get install chromium)")
    from playwright.sync_api import sync_playwright

    expected = httpx.post(server + "/v1/completions", json={"prompt": "To be", "max_tokens": 40, "seed": 9,
                                                            "temperature": 0.8}).json()["choices"][0]["text"]
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_FLAGS)
        try:
            page = browser.new_page()
            page.goto(server + "/")
            assert page.text_content("#model") == "run"
            page.fill("#prompt", "To be")
            page.fill("#max_tokens", "40")
            page.fill("#temperature", "0.8")
            page.fill("#seed", "9")
            page.click("#generate")
            page.wait_for_function("document.getElementById('status').textContent.startsWith('done')",
                                   timeout=20_000)
            assert page.text_content("#status") == "done (length)"
            assert page.text_content("#completion") == expected
            assert page.text_content("#output") == "To be" + expected
        finally:
            browser.close()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_the_serve_command_runs_a_server_with_an_api_key_from_the_environment(run_dir, tmp_path):
    port = _free_port()
    env = {**os.environ, "LMFORGE_API_KEY": "k3y", "OMP_NUM_THREADS": "1"}
    log = open(tmp_path / "serve.log", "wb")
    proc = subprocess.Popen([sys.executable, "-m", "lmforge.cli", "serve", str(run_dir), "--port", str(port),
                             "--device", "cpu", "--threads", "1", "--max-tokens", "50"],
                            stdout=log, stderr=subprocess.STDOUT, env=env)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:  # poll until it listens
            assert proc.poll() is None, (tmp_path / "serve.log").read_text()
            assert time.monotonic() < deadline, "lmforge serve did not start in 60 s"
            try:
                if httpx.get(url + "/health").status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.1)
        assert httpx.get(url + "/v1/models").status_code == 401
        r = httpx.post(url + "/v1/completions", json={"prompt": "x", "max_tokens": 51},
                       headers={"Authorization": "Bearer k3y"})
        assert r.status_code == 422 and "cap of 50" in r.json()["error"]["message"]
        r = httpx.post(url + "/v1/completions", json={"prompt": "x", "max_tokens": 5},
                       headers={"Authorization": "Bearer k3y"})
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 5
    finally:
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=30) == 0
        log.close()


@pytest.mark.parametrize("args,words", [
    (["serve", "{ghost}"], "ghost"),
    (["serve", "{run}", "--max-n", "0"], "serve.max_n"),
    (["serve", "{run}", "--port", "70000"], "--port"),
    (["serve", "{run}", "--timeout", "soon"], "serve.timeout"),
    (["serve", "{run}", "--max-prompt-tokens", "100000", "--device", "cpu"], "block_size"),
], ids=["missing-checkpoint", "bad-limit", "bad-port", "not-a-number", "prompt-cap-over-block"])
def test_bad_serve_command_lines_are_one_line_errors(run_dir, tmp_path, capsys, args, words):
    argv = [a.format(ghost=tmp_path / "ghost", run=run_dir) for a in args]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert words in err and err.count("\n") == 1 and "Traceback" not in err
