"""`lmforge serve` over a classifier: POST /v1/classify equals TextClassifier.classify, its limits and errors, the
one worker thread (no two threads in the model, no deadlock, 429 and 504), and each model refusing the other's
endpoints with 400.

The classifier is a tiny random GPT with a classify head (3 labels) and the byte tokenizer, its class weights
scaled up so that different texts get clearly different probabilities. Servers run on loopback (test_serve.running).
"""

from __future__ import annotations

import threading
from pathlib import Path

import httpx
import pytest
import torch

from lmforge.checkpoint import save_checkpoint
from lmforge.config import ModelConfig, RunConfig
from lmforge.generate import TextClassifier, load
from lmforge.model import GPT
from lmforge.serve import ServeConfig, load_app
from lmforge.serve.app import create_app
from lmforge.tokenizer import byte_tokenizer
from test_serve import make_run, running, wait_until

LABELS = ["negative", "neutral", "positive"]
TEXTS = ["a good day", "so awful", "it was", "fine fine fine"]


def make_classifier_run(root: Path) -> Path:
    """A run directory holding one checkpoint of a tiny random 3-label classifier, with the task entry in state.json
    that the trainer writes (checkpoint.read_task)."""
    tok = byte_tokenizer()
    tok.save(root / "tokenizer.json")
    torch.manual_seed(0)
    model = GPT(ModelConfig(vocab_size=tok.vocab_size, block_size=64, n_layer=2, n_head=2, n_embd=32,
                            head="classify", num_labels=len(LABELS))).eval()
    with torch.no_grad():  # std-0.02 weights give near-uniform probabilities: make texts differ clearly
        model.classifier.weight.mul_(100.0)
    save_checkpoint(root / "clf", 1, model, None, RunConfig(model=model.config),
                    {"task": {"task": "classify", "labels": LABELS}}, tokenizer_file=root / "tokenizer.json")
    return root / "clf"


@pytest.fixture(scope="module")
def clf_run(tmp_path_factory) -> Path:
    return make_classifier_run(tmp_path_factory.mktemp("serve_classify"))


@pytest.fixture(scope="module")
def reference(clf_run) -> TextClassifier:
    """The classifier as Python loads it: what the server must answer."""
    classifier = load(str(clf_run), device="cpu")
    assert isinstance(classifier, TextClassifier)
    return classifier


@pytest.fixture(scope="module")
def server(clf_run):
    app = load_app(str(clf_run), ServeConfig(max_prompts=5, max_prompt_tokens=40), device="cpu")
    with running(app) as url:
        yield url, app


def classify(client: httpx.Client, **body) -> dict:
    r = client.post("/v1/classify", json=body)
    assert r.status_code == 200, r.text
    return r.json()


def ranked(item: dict) -> list[tuple[str, float]]:
    return [(p["label"], p["probability"]) for p in item["predictions"]]


def assert_same(got: list[tuple[str, float]], want: list[tuple[str, float]]) -> None:
    assert [label for label, _ in got] == [label for label, _ in want]
    assert [p for _, p in got] == pytest.approx([p for _, p in want], abs=1e-6)


class GatedClassifier(TextClassifier):
    """A TextClassifier whose classify waits for `gate`, and that counts the threads inside it at once."""

    def __init__(self, classifier: TextClassifier) -> None:
        super().__init__(classifier.model, classifier.tokenizer, classifier.labels)
        self.gate, self.inside, self.most_inside, self.calls = threading.Event(), 0, 0, 0
        self._count = threading.Lock()

    def classify(self, texts, top_k=None, batch_size=32):
        with self._count:
            self.inside += 1
            self.calls += 1
            self.most_inside = max(self.most_inside, self.inside)
        try:
            assert self.gate.wait(30), "the test never opened the gate"
            return super().classify(texts, top_k, batch_size)
        finally:
            with self._count:
                self.inside -= 1


def post_in_thread(url: str, path: str, body: dict, results: dict, key: str) -> threading.Thread:
    def send() -> None:
        with httpx.Client(base_url=url, timeout=30) as c:
            results[key] = c.post(path, json=body)

    thread = threading.Thread(target=send, daemon=True)
    thread.start()
    return thread


# ---------------------------------------------------------------------------------------------- the API
def test_models_lists_the_task_and_labels_and_the_page_points_to_classify(client):
    models = client.get("/v1/models").json()["data"]
    assert len(models) == 1 and models[0]["id"] == "clf" and models[0]["max_model_len"] == 64
    assert models[0]["task"] == "classify" and models[0]["labels"] == LABELS
    assert client.get("/health").json()["status"] == "ok"
    page = client.get("/")
    assert page.status_code == 200 and "/v1/classify" in page.text and "clf" in page.text


def test_a_classification_equals_text_classifier_and_sums_to_one(client, reference):
    want = reference.classify(TEXTS)
    assert len({r[0][0] for r in want}) > 1  # the texts get different labels: a mix-up would show
    out = classify(client, model="clf", input=TEXTS)
    assert out["object"] == "list" and out["model"] == "clf"
    assert [item["index"] for item in out["data"]] == list(range(len(TEXTS)))
    for item, expected in zip(out["data"], want):
        assert_same(ranked(item), expected)
        assert item["label"] == expected[0][0]
        assert sum(p for _, p in ranked(item)) == pytest.approx(1.0, abs=1e-6)
    tokens = sum(len(t.encode()) + 2 for t in TEXTS)  # byte tokens, <START> and <END>
    assert out["usage"] == {"prompt_tokens": tokens, "total_tokens": tokens}
    single = classify(client, input=TEXTS[1])  # a string: one item
    assert len(single["data"]) == 1 and single["data"][0]["index"] == 0
    assert_same(ranked(single["data"][0]), want[1])


def test_a_list_of_texts_keeps_its_order(client, reference):
    texts = TEXTS[::-1]
    out = classify(client, input=texts)
    for item, text in zip(out["data"], texts):
        assert_same(ranked(item), reference.classify([text])[0])
    forward = classify(client, input=TEXTS)["data"]
    for item, other in zip(out["data"], forward[::-1]):  # equal up to the rounding of another padding
        assert_same(ranked(item), ranked(other))
    assert ranked(forward[0]) != ranked(forward[-1])  # reversing changes the answer


def test_top_k_truncates_the_ranking(client, reference):
    full = reference.classify(TEXTS[:2])
    out = classify(client, input=TEXTS[:2], top_k=2)
    for item, expected in zip(out["data"], full):
        assert_same(ranked(item), expected[:2])
        assert item["label"] == expected[0][0]
    assert [len(i["predictions"]) for i in classify(client, input=TEXTS[:2], top_k=1)["data"]] == [1, 1]
    assert [len(i["predictions"]) for i in classify(client, input=TEXTS[:2], top_k=99)["data"]] == [3, 3]


@pytest.mark.parametrize("body, param, words", [
    ({"input": []}, "input", "empty list"),
    ({"input": ["x"] * 6}, "input", "at most 5 (serve.max_prompts)"),
    ({"input": ["a", "b" * 39]}, "input", "input[1] is 41 tokens"),
    ({"input": "x", "temperature": 0}, "temperature",
     "unknown field 'temperature': /v1/classify takes model, input, top_k"),
    ({"input": "x", "top_k": 0}, "top_k", "top_k"),
    ({"input": "x", "top_k": "2"}, "top_k", "top_k"),
    ({"input": 3}, "input", "input"),
    ({}, "input", "input"),
])
def test_bad_requests_get_422_naming_the_field(client, body, param, words):
    r = client.post("/v1/classify", json=body)
    assert r.status_code == 422, r.text
    error = r.json()["error"]
    assert error["param"] == param and words in error["message"] and error["type"] == "invalid_request_error"


def test_another_model_name_is_404(client):
    r = client.post("/v1/classify", json={"model": "other", "input": "x"})
    assert r.status_code == 404 and "'clf'" in r.json()["error"]["message"]


def test_the_generation_endpoints_of_a_classifier_answer_400_naming_classify(client):
    for path, body in [("/v1/completions", {"prompt": "hi"}), ("/v1/chat/completions", {"messages": []}),
                       ("/v1/completions", {"nonsense": 1})]:  # whatever the body: it is the wrong model
        r = client.post(path, json=body)
        assert r.status_code == 400, r.text
        message = r.json()["error"]["message"]
        assert "classifier" in message and "/v1/classify" in message and path in message


def test_a_language_model_answers_400_at_classify_and_says_generate(tmp_path):
    app = load_app(str(make_run(tmp_path)), ServeConfig(), device="cpu")
    with running(app) as url, httpx.Client(base_url=url, timeout=30) as c:
        r = c.post("/v1/classify", json={"input": "hi"})
        assert r.status_code == 400, r.text
        message = r.json()["error"]["message"]
        assert "language model" in message and "/v1/completions" in message
        model = c.get("/v1/models").json()["data"][0]
        assert model["task"] == "generate" and model["template"] is False and "labels" not in model
        assert {"id", "object", "created", "owned_by", "max_model_len"} <= set(model)
        assert c.post("/v1/completions", json={"prompt": "hi", "max_tokens": 2}).status_code == 200


def test_the_api_key_guards_classify(reference):
    app = create_app(reference, ServeConfig(api_key="s3cret"), model_name="clf")
    with running(app) as url, httpx.Client(base_url=url, timeout=30) as c:
        assert c.post("/v1/classify", json={"input": "x"}).status_code == 401
        wrong = c.post("/v1/classify", json={"input": "x"}, headers={"Authorization": "Bearer nope"})
        assert wrong.status_code == 401
        right = c.post("/v1/classify", json={"input": "x"}, headers={"Authorization": "Bearer s3cret"})
        assert right.status_code == 200 and len(right.json()["data"]) == 1


def test_a_request_is_batched_in_forward_passes_of_max_batch_size(reference):
    app = create_app(reference, ServeConfig(max_batch_size=2), model_name="clf")
    rows: list[int] = []
    hook = reference.model.register_forward_hook(lambda module, args, out: rows.append(out.shape[0]))
    try:
        with running(app) as url, httpx.Client(base_url=url, timeout=30) as c:
            out = c.post("/v1/classify", json={"input": TEXTS + ["x"]}).json()
    finally:
        hook.remove()
    assert rows == [2, 2, 1] and len(out["data"]) == 5


# ------------------------------------------------------------------------------------- the worker thread
def test_requests_made_while_the_worker_is_busy_get_their_answers_one_thread_at_a_time(reference):
    gated = GatedClassifier(reference)
    app = create_app(gated, ServeConfig(), model_name="clf")
    engine, results, threads = app.state.engine, {}, []
    with running(app) as url:
        try:
            threads.append(post_in_thread(url, "/v1/classify", {"input": TEXTS[:2]}, results, "first"))
            wait_until(lambda: engine.stats()["running"] == 2)  # the worker is inside the model
            for i, text in enumerate(TEXTS[2:]):
                threads.append(post_in_thread(url, "/v1/classify", {"input": text}, results, f"later{i}"))
            wait_until(lambda: engine.stats()["waiting"] == 2)
            with httpx.Client(base_url=url, timeout=5) as c:  # the event loop is free meanwhile
                assert c.get("/health").json()["running"] == 2
        finally:
            gated.gate.set()
        for thread in threads:
            thread.join(timeout=30)
    assert results["first"].status_code == 200, results["first"].text
    for item, expected in zip(results["first"].json()["data"], reference.classify(TEXTS[:2])):
        assert_same(ranked(item), expected)
    for i, text in enumerate(TEXTS[2:]):
        assert results[f"later{i}"].status_code == 200, results[f"later{i}"].text
        assert_same(ranked(results[f"later{i}"].json()["data"][0]), reference.classify([text])[0])
    assert gated.calls == 3 and gated.most_inside == 1  # one request at a time in the model
    assert engine.stats()["classified"] == 4 and engine.stats()["completed"] == 3


def test_a_full_server_answers_429_with_retry_after(reference):
    gated = GatedClassifier(reference)
    app = create_app(gated, ServeConfig(max_concurrency=1, max_queue=1, max_prompts=2, max_slots_per_client=2),
                     model_name="clf")
    results, threads = {}, []
    with running(app) as url:
        try:
            threads.append(post_in_thread(url, "/v1/classify", {"input": "a"}, results, "first"))
            wait_until(lambda: app.state.engine.stats()["running"] == 1)
            with httpx.Client(base_url=url, timeout=5) as c:
                r = c.post("/v1/classify", json={"input": ["b", "c"]})  # 1 running + 2 > 1 + 1
                assert r.status_code == 429 and r.headers["Retry-After"] == "1"
                assert r.json()["error"]["type"] == "rate_limit_error"
                threads.append(post_in_thread(url, "/v1/classify", {"input": "b"}, results, "fits"))
                wait_until(lambda: app.state.engine.stats()["waiting"] == 1)
        finally:
            gated.gate.set()
        for thread in threads:
            thread.join(timeout=30)
    assert results["first"].status_code == 200 and results["fits"].status_code == 200


def test_a_request_past_the_timeout_gets_504(reference):
    gated = GatedClassifier(reference)
    app = create_app(gated, ServeConfig(timeout=0.3), model_name="clf")
    results, threads = {}, []
    with running(app) as url:
        try:
            threads.append(post_in_thread(url, "/v1/classify", {"input": "a"}, results, "running"))
            wait_until(lambda: app.state.engine.stats()["running"] == 1)
            threads.append(post_in_thread(url, "/v1/classify", {"input": "b"}, results, "waiting"))
            wait_until(lambda: app.state.engine.stats()["waiting"] == 1)
            gated.gate.wait(0.5)  # nobody sets it: both requests pass their 0.3 s
        finally:
            gated.gate.set()
        for thread in threads:
            thread.join(timeout=30)
    assert results["running"].status_code == 504 and "during classification" in results["running"].text
    assert results["waiting"].status_code == 504 and "while waiting" in results["waiting"].text
    assert gated.calls == 1  # the request that timed out while waiting never reached the model
