"""`lmforge serve` over a reward model: POST /v1/reward equals RewardModel.score (string and chat prompts, through
the template the model learned), its limits and errors, and each kind of model refusing the others' endpoints with
400 naming its own.

The reward model is a tiny random GPT with a one-output classify head and the byte tokenizer, its head scaled up so
that different pairs get clearly different rewards, saved with the task entry the trainer writes. Servers run on
loopback (test_serve.running).
"""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest
import torch

from lmforge.checkpoint import save_checkpoint
from lmforge.config import ModelConfig, RunConfig
from lmforge.data.tasks import resolve_template
from lmforge.generate import RewardModel, load
from lmforge.model import GPT
from lmforge.serve import ServeConfig, load_app
from lmforge.tokenizer import byte_tokenizer
from test_serve import make_run, running
from test_serve_classify import make_classifier_run

PAIRS = [{"prompt": "Who wrote Hamlet?", "completion": "Shakespeare."},
         {"prompt": "Who wrote Hamlet?", "completion": "Dickens."},
         {"prompt": "2 + 2", "completion": "4"}]


def make_reward_run(root: Path) -> Path:
    tok = byte_tokenizer()
    tok.save(root / "tokenizer.json")
    torch.manual_seed(0)
    model = GPT(ModelConfig(vocab_size=tok.vocab_size, block_size=64, n_layer=2, n_head=2, n_embd=32,
                            head="classify", num_labels=1)).eval()
    with torch.no_grad():
        model.classifier.weight.mul_(100.0)
    save_checkpoint(root / "rm", 1, model, None, RunConfig(model=model.config),
                    {"task": {"task": "reward", "template": resolve_template("instruct")}},
                    tokenizer_file=root / "tokenizer.json")
    return root / "rm"


@pytest.fixture(scope="module")
def rm_run(tmp_path_factory) -> Path:
    return make_reward_run(tmp_path_factory.mktemp("serve_reward"))


@pytest.fixture(scope="module")
def judge(rm_run) -> RewardModel:
    judge = load(str(rm_run), device="cpu")
    assert isinstance(judge, RewardModel) and judge.template["name"] == "instruct"
    return judge


@pytest.fixture(scope="module")
def client(rm_run):
    app = load_app(str(rm_run), ServeConfig(max_prompts=3, max_prompt_tokens=64), device="cpu")
    with running(app) as url, httpx.Client(base_url=url, timeout=30) as c:
        yield c


def test_models_says_reward_and_the_page_points_to_the_endpoint(client):
    model = client.get("/v1/models").json()["data"][0]
    assert model["task"] == "reward" and "labels" not in model
    page = client.get("/")
    assert page.status_code == 200 and "/v1/reward" in page.text


def test_rewards_equal_the_python_reward_model_in_order(client, judge):
    r = client.post("/v1/reward", json={"input": PAIRS})
    assert r.status_code == 200, r.text
    body = r.json()
    want = judge.score([p["prompt"] for p in PAIRS], [p["completion"] for p in PAIRS])
    assert [d["index"] for d in body["data"]] == [0, 1, 2]
    assert [d["reward"] for d in body["data"]] == pytest.approx(want, abs=1e-5)
    assert len(set(round(w, 3) for w in want)) == 3  # the pairs are told apart
    tok = judge.tokenizer
    tokens = sum(len(tok.encode(judge.render(p["prompt"]))) + len(tok.encode(p["completion"])) + 2 for p in PAIRS)
    assert body["usage"] == {"prompt_tokens": tokens, "total_tokens": tokens}
    one = client.post("/v1/reward", json={"input": PAIRS[1]}).json()
    assert one["data"][0]["reward"] == pytest.approx(want[1], abs=1e-5)


def test_a_chat_prompt_goes_through_the_chat_template(client, judge):
    turns = [{"role": "user", "content": "Who wrote Hamlet?"}]
    r = client.post("/v1/reward", json={"input": {"prompt": turns, "completion": "Shakespeare."}})
    assert r.status_code == 200, r.text
    got = r.json()["data"][0]["reward"]
    assert got == pytest.approx(judge.score([turns], ["Shakespeare."])[0], abs=1e-5)
    assert got != pytest.approx(judge.score(["Who wrote Hamlet?"], ["Shakespeare."])[0], abs=1e-3)


@pytest.mark.parametrize("body, words", [
    ({"input": []}, "empty list"),
    ({"input": PAIRS + PAIRS[:1]}, "at most 3"),
    ({"input": {"prompt": "x" * 60, "completion": "y"}}, "serve.max_prompt_tokens"),
    ({"input": {"prompt": "x"}}, "completion"),
    ({"input": {"prompt": "x", "completion": "y", "label": 1}}, "unknown field"),
    ({"input": {"prompt": [{"role": "user"}], "completion": "y"}}, "prompt"),
    ({"pairs": PAIRS}, "input: Field required"),
    ({"input": PAIRS, "pairs": 1}, "unknown field 'pairs': /v1/reward takes model, input"),
])
def test_bad_requests_get_422_naming_the_problem(client, body, words):
    r = client.post("/v1/reward", json=body)
    assert r.status_code == 422, r.text
    assert words in r.json()["error"]["message"]


def test_another_model_name_is_404(client):
    r = client.post("/v1/reward", json={"model": "other", "input": PAIRS[0]})
    assert r.status_code == 404 and "other" in r.json()["error"]["message"]


def test_each_model_answers_400_at_the_others_endpoints_naming_its_own(client, tmp_path):
    for path, body in [("/v1/completions", {"prompt": "hi"}), ("/v1/chat/completions", {"messages": []}),
                       ("/v1/classify", {"input": "hi"})]:
        r = client.post(path, json=body)
        assert r.status_code == 400, r.text
        assert "reward model" in r.json()["error"]["message"] and "/v1/reward" in r.json()["error"]["message"]
    (tmp_path / "lm").mkdir()
    for run, words in [(make_run(tmp_path / "lm"), "/v1/completions"),
                       (make_classifier_run(tmp_path), "/v1/classify")]:
        app = load_app(str(run), ServeConfig(), device="cpu")
        with running(app) as url, httpx.Client(base_url=url, timeout=30) as c:
            r = c.post("/v1/reward", json={"input": PAIRS[0]})
            assert r.status_code == 400, r.text
            assert words in r.json()["error"]["message"] and "/v1/reward" in r.json()["error"]["message"]


def test_speculation_is_refused_for_a_reward_model(rm_run):
    from lmforge.errors import ConfigError

    with pytest.raises(ConfigError, match="a reward model"):
        load_app(str(rm_run), ServeConfig(prompt_lookup_num_tokens=3), device="cpu")
