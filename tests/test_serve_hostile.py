"""`lmforge serve` under hostile or careless clients, each against a real uvicorn server on loopback (raw sockets
where an HTTP client library would behave too well): stalled readers, slow or silent connections, hostile input,
other hosts and origins; and the OpenAI extras evaluation tools use (token-id prompts, logprobs, echo, /metrics).
"""

from __future__ import annotations

import json
import re
import socket
import threading
import time
from pathlib import Path

import httpx
import pytest
import torch

from lmforge.generate import load
from lmforge.serve import ServeConfig, load_app
from test_serve import make_run, running, wait_until


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    return make_run(tmp_path_factory.mktemp("serve-hostile"))


def address(url: str) -> tuple[str, int]:
    host, port = url.removeprefix("http://").split(":")
    return host, int(port)


def raw_request(body: dict, path: str = "/v1/completions", host: str = "127.0.0.1") -> bytes:
    data = json.dumps(body).encode()
    return (f"POST {path} HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(data)}\r\n\r\n").encode() + data


def stalled_socket(url: str, body: dict) -> socket.socket:
    """A connection that sends `body` and then never reads (a tiny receive buffer, so the server's sends block)."""
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1024)
    s.connect(address(url))
    s.sendall(raw_request(body))
    return s


def closed_within(s: socket.socket, seconds: float) -> tuple[bool, bytes]:
    """(whether the server closed the connection within `seconds`, what it sent before)."""
    s.settimeout(seconds)
    received, deadline = b"", time.monotonic() + seconds
    try:
        while time.monotonic() < deadline:
            chunk = s.recv(65536)
            if not chunk:
                return True, received
            received += chunk
    except ConnectionResetError:
        return True, received
    except socket.timeout:
        pass
    return False, received


# ----------------------------------------------------------------------------------------- stalled readers
def test_stalled_readers_are_cut_and_do_not_hold_generation_from_others(run_dir):
    """Two streams with the largest n that never read take both places in generation; within stall_timeout
    (plus the time to fill their buffers) their generations are cancelled and another client is served."""
    config = ServeConfig(max_concurrency=2, max_queue=4, max_prompts=2, max_tokens=100_000, max_slots_per_client=4,
                         stall_timeout=1.0, timeout=60)
    app = load_app(str(run_dir), config, device="cpu")
    engine = app.state.engine
    with running(app) as url:
        stalled = [stalled_socket(url, {"prompt": "x", "max_tokens": 100_000, "n": 8, "stream": True})
                   for _ in range(2)]
        try:
            wait_until(lambda: engine.stats()["running"] == 2)
            start = time.monotonic()
            r = httpx.post(url + "/v1/completions", json={"prompt": "hi", "max_tokens": 4}, timeout=30)
            waited = time.monotonic() - start
            assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 4
            assert waited < 15, f"another client waited {waited:.1f} s behind two stalled readers"
            wait_until(lambda: engine.stats()["running"] == 0)  # both stalled generations were cancelled
        finally:
            for s in stalled:
                s.close()


TCP_ESTABLISHED = 1  # tcpi_state, the first byte of Linux's struct tcp_info


def tcp_state(s: socket.socket) -> int:
    """The kernel's TCP state of the client's end, read without reading from the socket."""
    return s.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 8)[0]


def test_a_stalled_readers_connection_is_reset_not_left_open(run_dir):
    """Once the stall is detected the server drops the connection at once: the client, still not reading, sees
    its end leave ESTABLISHED and then a reset (a plain close would wait for it to take the unsent bytes)."""
    app = load_app(str(run_dir), ServeConfig(max_tokens=100_000, stall_timeout=1.0, timeout=60), device="cpu")
    with running(app) as url:
        s = stalled_socket(url, {"prompt": "x", "max_tokens": 100_000, "stream": True})
        try:
            wait_until(lambda: app.state.engine.stats()["running"] == 1)
            start = time.monotonic()
            wait_until(lambda: tcp_state(s) != TCP_ESTABLISHED, timeout=1.0 + 14)  # stall_timeout + filling buffers
            assert time.monotonic() - start < 15
            s.settimeout(5)
            with pytest.raises(ConnectionResetError):
                while s.recv(65536):  # what arrived before the reset, if the kernel kept it
                    pass
            wait_until(lambda: app.state.engine.stats()["running"] == 0)
        finally:
            s.close()


def test_one_client_address_holds_at_most_its_share_of_places(run_dir):
    app = load_app(str(run_dir), ServeConfig(max_tokens=100_000, max_slots_per_client=1), device="cpu")
    long = {"prompt": "x", "max_tokens": 100_000, "stream": True}
    with running(app) as url, httpx.Client(base_url=url, timeout=30) as c:
        with c.stream("POST", "/v1/completions", json=long) as first:
            lines = first.iter_lines()
            next(lines)  # it is generating
            r = c.post("/v1/completions", json={"prompt": "x", "max_tokens": 2})
            assert r.status_code == 429 and "per client" in r.json()["error"]["message"]
            other = httpx.HTTPTransport(local_address="127.0.0.2")  # another address on loopback
            with httpx.Client(base_url=url, transport=other, timeout=30) as c2:
                assert c2.post("/v1/completions", json={"prompt": "x", "max_tokens": 2}).status_code == 200
        wait_until(lambda: app.state.engine.stats()["running"] == 0)
        assert c.post("/v1/completions", json={"prompt": "x", "max_tokens": 2}).status_code == 200  # freed


# --------------------------------------------------------------------------------- slow or silent connections
@pytest.fixture(scope="module")
def strict_server(run_dir):
    """Short header/body timeouts, four connections at most, and an API key (the timeouts act before it)."""
    config = ServeConfig(api_key="s3cret", header_timeout=0.5, body_timeout=0.5, keep_alive_timeout=0.5,
                         max_connections=4)
    with running(load_app(str(run_dir), config, device="cpu")) as url:
        yield url


def test_a_connection_that_sends_nothing_is_closed(strict_server):
    s = socket.create_connection(address(strict_server))
    closed, got = closed_within(s, 5)
    assert closed and got == b""


def test_partial_headers_are_closed_without_an_answer(strict_server):
    s = socket.create_connection(address(strict_server))
    s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthoriz")
    start = time.monotonic()
    closed, got = closed_within(s, 5)
    assert closed and got == b"" and time.monotonic() - start < 3


def test_a_partial_body_gets_408_and_the_connection_closes(strict_server):
    s = socket.create_connection(address(strict_server))
    s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer s3cret\r\n"
              b"Content-Type: application/json\r\nContent-Length: 100\r\n\r\n{\"prompt\": ")
    closed, got = closed_within(s, 5)
    assert closed and got.startswith(b"HTTP/1.1 408")
    assert json.loads(got.split(b"\r\n\r\n", 1)[1])["error"]["type"] == "timeout_error"


def test_connections_beyond_the_cap_are_closed_at_once(strict_server):
    held = [socket.create_connection(address(strict_server)) for _ in range(4)]
    try:
        extra = socket.create_connection(address(strict_server))
        closed, _ = closed_within(extra, 0.3)  # well before the header deadline
        assert closed
    finally:
        for s in held:
            s.close()
    wait_until(lambda: httpx.get(strict_server + "/health").status_code == 200)


# ----------------------------------------------------------------------------------------- hostile input
@pytest.fixture(scope="module")
def server(run_dir):
    app = load_app(str(run_dir), ServeConfig(max_tokens=1000), device="cpu")
    with running(app) as url:
        yield url, app


@pytest.mark.parametrize("method,path,status", [("GET", "/nope", 404), ("GET", "/v1/completions", 405),
                                                ("DELETE", "/v1/models", 405)])
def test_fastapis_own_errors_have_openais_shape(server, method, path, status):
    r = httpx.request(method, server[0] + path)
    assert r.status_code == status
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["code"] == status
    assert error["type"] in ("not_found_error", "invalid_request_error")


def test_a_deeply_nested_body_is_a_client_error(server):
    r = httpx.post(server[0] + "/v1/completions", content=b"[" * 50_000, headers={"Content-Type": "application/json"})
    assert 400 <= r.status_code < 500 and "error" in r.json()


# ------------------------------------------------------------------------------------ keys, hosts, origins
def test_the_key_scheme_is_case_insensitive_and_non_ascii_keys_work(run_dir):
    key = "clé-🔑"
    app = load_app(str(run_dir), ServeConfig(api_key=key), device="cpu")
    with running(app) as url:
        for scheme in (b"Bearer", b"bearer", b"BEARER"):
            r = httpx.get(url + "/v1/models", headers={"Authorization": scheme + b" " + key.encode()})
            assert r.status_code == 200, (scheme, r.text)
        for given in ("Bearer cle-".encode(), "Bearer clé".encode("latin-1"), b"Basic " + key.encode(), b"bearer"):
            r = httpx.get(url + "/v1/models", headers={"Authorization": given})
            assert r.status_code == 401 and r.json()["error"]["type"] == "authentication_error"


def test_other_hosts_and_origins_are_refused_unless_allowed(run_dir):
    """DNS rebinding: a page at evil.example whose name now points to 127.0.0.1 sends Host: evil.example."""
    app = load_app(str(run_dir), ServeConfig(cors_origin=["http://app.example"]), device="cpu")
    with running(app) as url:
        port = address(url)[1]
        for host in (f"localhost:{port}", f"127.0.0.1:{port}", f"[::1]:{port}"):
            assert httpx.get(url + "/v1/models", headers={"Host": host}).status_code == 200, host
        r = httpx.post(url + "/v1/completions", json={"prompt": "x", "max_tokens": 2},
                       headers={"Host": f"evil.example:{port}"})
        assert r.status_code == 403 and "--allowed-host" in r.json()["error"]["message"]
        r = httpx.post(url + "/v1/completions", json={"prompt": "x", "max_tokens": 2},
                       headers={"Origin": "http://evil.example"})
        assert r.status_code == 403 and "--cors-origin" in r.json()["error"]["message"]
        assert httpx.get(url + "/v1/models", headers={"Origin": url}).status_code == 200  # its own page
        preflight = httpx.options(url + "/v1/completions", headers={
            "Origin": "http://app.example", "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": "content-type"})
        assert preflight.status_code == 200
        assert preflight.headers["access-control-allow-origin"] == "http://app.example"
        r = httpx.post(url + "/v1/completions", json={"prompt": "x", "max_tokens": 2},
                       headers={"Origin": "http://app.example"})
        assert r.status_code == 200 and r.headers["access-control-allow-origin"] == "http://app.example"
    app = load_app(str(run_dir), ServeConfig(allowed_host=["lab.example"]), device="cpu")
    with running(app) as url:
        assert httpx.get(url + "/health", headers={"Host": "lab.example"}).status_code == 200
        assert httpx.get(url + "/health").status_code == 403  # the list replaces the default


# ----------------------------------------------------------------------------- token ids, logprobs, echo
def test_prompts_as_token_ids_equal_the_same_prompts_as_text(server, run_dir):
    url, _ = server
    tok = load(str(run_dir), device="cpu").tokenizer
    ids = [tok.start_id] + tok.encode("Hello")
    options = {"max_tokens": 8, "seed": 3, "temperature": 0.8}
    as_text = httpx.post(url + "/v1/completions", json={"prompt": "Hello", **options}).json()
    as_ids = httpx.post(url + "/v1/completions", json={"prompt": ids, **options}).json()
    assert as_ids["choices"][0]["text"] == as_text["choices"][0]["text"]
    assert as_ids["usage"]["prompt_tokens"] == len(ids)
    several = httpx.post(url + "/v1/completions", json={"prompt": [ids, ids[:3]], **options}).json()
    assert [c["index"] for c in several["choices"]] == [0, 1]
    assert several["choices"][0]["text"] == as_text["choices"][0]["text"]


def test_logprobs_and_echo_equal_a_log_softmax_of_the_models_logits(server, run_dir):
    url, _ = server
    body = {"prompt": "Hello", "max_tokens": 10, "logprobs": 3, "echo": True, "seed": 1, "temperature": 0.7,
            "repetition_penalty": 1.3}  # sampling options change the draw, never the reported logprobs
    choice = httpx.post(url + "/v1/completions", json=body).json()["choices"][0]
    gen = load(str(run_dir), device="cpu")
    tok = gen.tokenizer
    by_text = {tok.token_text(i): i for i in range(tok.vocab_size)}
    lp = choice["logprobs"]
    ids = [by_text[t] for t in lp["tokens"]]
    prompt = [tok.start_id] + tok.encode("Hello")
    assert ids[:len(prompt)] == prompt and len(ids) == len(prompt) + 10
    assert choice["text"] == "Hello" + tok.decode(ids[len(prompt):])
    assert lp["token_logprobs"][0] is None and lp["top_logprobs"][0] is None
    with torch.no_grad():
        logp = torch.log_softmax(gen.model(torch.tensor([ids]))[0].double(), dim=-1)  # (T, V)
    for j in range(1, len(ids)):
        assert lp["token_logprobs"][j] == pytest.approx(logp[j - 1, ids[j]].item(), abs=1e-4), j
        top = logp[j - 1].topk(3)
        assert list(lp["top_logprobs"][j]) == [tok.token_text(i) for i in top.indices.tolist()], j
        assert list(lp["top_logprobs"][j].values()) == pytest.approx(top.values.tolist(), abs=1e-4), j
    assert lp["text_offset"][:len(prompt)] == [0, 0, 1, 2, 3, 4]  # <START> takes no text


def test_echo_streams_the_prompt_first(server):
    url, _ = server
    with httpx.stream("POST", url + "/v1/completions", json={"prompt": "Hey", "max_tokens": 5, "seed": 2,
                                                             "echo": True, "stream": True}) as r:
        texts = [json.loads(line[6:])["choices"][0]["text"] for line in r.iter_lines()
                 if line.startswith("data: {")]
    plain = httpx.post(url + "/v1/completions", json={"prompt": "Hey", "max_tokens": 5, "seed": 2}).json()
    assert texts[0] == "Hey" and "".join(texts) == "Hey" + plain["choices"][0]["text"]


def streamed_choices(url: str, body: dict) -> dict[int, list[dict]]:
    """Each choice's stream chunks (index -> its `choices[0]` objects, in order) of a streamed completion."""
    chunks: dict[int, list[dict]] = {}
    with httpx.stream("POST", url + "/v1/completions", json={**body, "stream": True}, timeout=30) as r:
        assert r.status_code == 200
        for line in r.iter_lines():
            if line.startswith("data: {"):
                (choice,) = json.loads(line[6:])["choices"]
                chunks.setdefault(choice["index"], []).append(choice)
    return chunks


def joined_logprobs(chunks: list[dict]) -> dict[str, list]:
    """The chunks' logprobs concatenated key by key (tokens, token_logprobs, top_logprobs, text_offset)."""
    keys = ("tokens", "token_logprobs", "top_logprobs", "text_offset")
    return {k: [v for c in chunks if c["logprobs"] is not None for v in c["logprobs"][k]] for k in keys}


@pytest.mark.parametrize("echo", [False, True])
def test_streamed_logprobs_are_the_unstreamed_ones_chunk_by_chunk(server, echo):
    """Each streamed chunk carries the logprobs of its own tokens; joined they equal the non-streamed answer's
    (greedy and seeded sampling, n=2 and two prompts, a stop string); with echo the prompt's come first."""
    url, _ = server
    for options in ({"temperature": 0.0}, {"seed": 5, "temperature": 0.9, "n": 2}):
        body = {"prompt": ["Hello", "To be"], "max_tokens": 12, "logprobs": 2, "echo": echo, "stop": ["e t"],
                **options}
        plain = httpx.post(url + "/v1/completions", json=body, timeout=30).json()["choices"]
        streamed = streamed_choices(url, body)
        assert sorted(streamed) == [c["index"] for c in plain] == list(range(len(plain)))
        for whole in plain:
            chunks = streamed[whole["index"]]
            assert "".join(c["text"] for c in chunks) == whole["text"]
            assert joined_logprobs(chunks) == whole["logprobs"], (options, whole["index"])
            with_tokens = [c for c in chunks if c["logprobs"] and c["logprobs"]["tokens"]]
            assert len(with_tokens) > 2  # spread over the stream, not all in one chunk
            if echo:  # the prompt's chunk first: its text and its scored tokens (the first has no logprob)
                assert chunks[0]["text"] == whole["text"][:len(chunks[0]["text"])] != ""
                assert chunks[0]["logprobs"]["token_logprobs"][0] is None
                assert chunks[0]["logprobs"]["text_offset"][0] == 0


# ------------------------------------------------------------------------------------------------ metrics
METRIC_LINE = re.compile(r'^([a-z_]+)(\{status="(\d+)"\})? (-?[0-9.]+)$')


def scrape(url: str) -> dict[str, float]:
    r = httpx.get(url + "/metrics")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    values = {}
    for line in r.text.splitlines():
        if line.startswith("#"):
            assert re.match(r"^# (HELP|TYPE) [a-z_]+ ", line), line
            continue
        m = METRIC_LINE.match(line)
        assert m, f"not Prometheus text format: {line!r}"
        values[m.group(1) + (f"[{m.group(3)}]" if m.group(3) else "")] = float(m.group(4))
    return values


def test_metrics_count_answers_by_status_tokens_and_the_queue(server):
    url, app = server
    before = scrape(url)
    assert httpx.post(url + "/v1/completions", json={"prompt": "x", "max_tokens": 7}).status_code == 200
    assert httpx.post(url + "/v1/completions", json={"prompt": "x", "max_tokens": 0}).status_code == 422
    after = scrape(url)
    assert after["lmforge_requests_total[200]"] - before.get("lmforge_requests_total[200]", 0) == 2  # + a scrape
    assert after["lmforge_requests_total[422]"] - before.get("lmforge_requests_total[422]", 0) == 1
    assert after["lmforge_generated_tokens_total"] - before["lmforge_generated_tokens_total"] == 7
    assert after["lmforge_generated_tokens_total"] == app.state.engine.stats()["generated_tokens"]
    assert after["lmforge_waiting"] == 0 and after["lmforge_running"] == 0 and after["lmforge_tokens_per_second"] > 0
