"""Embeddings (generate/embed.py, POST /v1/embeddings): a text's vector is Hugging Face GPT-2's last hidden state,
pooled over the text alone, whatever else is in its batch; the server answers the openai package."""

from __future__ import annotations

import base64

import httpx
import numpy as np
import pytest
import torch

from lmforge.config import ModelConfig
from lmforge.errors import ConfigError
from lmforge.generate import TextEmbedder, load
from lmforge.interop.hf_gpt2 import to_hf_config, to_hf_state_dict
from lmforge.model import GPT
from lmforge.serve import ServeConfig, load_app
from lmforge.tokenizer import byte_tokenizer
from sharp_attention import MAX_ENTROPY, attention_entropy, sharpen
from test_serve import make_run, running
from test_serve_classify import make_classifier_run

TOKENIZER = byte_tokenizer()
TEXTS = ["a", "Hello there, general", "zz top", "the same text, a little longer than the others here"]


def gpt2_pair() -> tuple[GPT, "torch.nn.Module"]:
    """(lmforge GPT, HF GPT2Model) with the same sharp weights, byte vocabulary."""
    transformers = pytest.importorskip("transformers")
    config = ModelConfig(vocab_size=TOKENIZER.vocab_size, block_size=64, n_layer=2, n_head=2, n_embd=32,
                         activation="gelu_tanh")
    torch.manual_seed(0)
    ours = sharpen(GPT(config)).eval()
    theirs = transformers.GPT2LMHeadModel(transformers.GPT2Config(**to_hf_config(config))).eval()
    theirs.load_state_dict(to_hf_state_dict(ours.state_dict(), config), strict=True)
    assert attention_entropy(theirs, torch.randint(0, config.vocab_size, (2, 32))) < MAX_ENTROPY
    return ours, theirs.transformer


@pytest.mark.parametrize("pooling", ["mean", "last", "first"])
def test_embeddings_are_hfs_hidden_states_pooled_over_each_text_alone(pooling):
    ours, theirs = gpt2_pair()
    embedder = TextEmbedder(ours, TOKENIZER, pooling=pooling, normalize=False)
    got = embedder.embed(TEXTS, batch_size=3)  # batches of texts of different lengths, right-padded
    for text, vector in zip(TEXTS, got):
        ids = [TOKENIZER.start_id, *TOKENIZER.encode(text), TOKENIZER.end_id]
        with torch.no_grad():
            hidden = theirs(torch.tensor([ids])).last_hidden_state[0]  # (T, C), the text alone, after ln_f
        want = {"mean": hidden.mean(0), "last": hidden[-1], "first": hidden[0]}[pooling]
        torch.testing.assert_close(vector, want, atol=2e-5, rtol=1e-5)
    normalized = TextEmbedder(ours, TOKENIZER, pooling=pooling).embed(TEXTS)
    torch.testing.assert_close(normalized, torch.nn.functional.normalize(got, dim=-1))
    assert torch.allclose(normalized.norm(dim=-1), torch.ones(len(TEXTS)))
    ids = [TOKENIZER.encode(t) for t in TEXTS]  # token ids are the text's tokens
    torch.testing.assert_close(embedder.embed(ids, batch_size=3), got, atol=0, rtol=0)


def test_the_default_pooling_is_last_for_a_decoder_and_mean_for_an_encoder_and_bad_input_is_one_line():
    decoder = GPT(ModelConfig(vocab_size=TOKENIZER.vocab_size, block_size=32, n_layer=1, n_head=2, n_embd=16))
    encoder = GPT(ModelConfig(vocab_size=TOKENIZER.vocab_size, block_size=32, n_layer=1, n_head=2, n_embd=16,
                              causal=False))
    assert TextEmbedder(decoder, TOKENIZER).pooling == "last" and TextEmbedder(encoder, TOKENIZER).pooling == "mean"
    vectors = TextEmbedder(encoder, TOKENIZER).embed(TEXTS[:3])
    alone = torch.cat([TextEmbedder(encoder, TOKENIZER).embed([t]) for t in TEXTS[:3]])
    torch.testing.assert_close(vectors, alone, atol=1e-6, rtol=1e-5)  # an encoder's batch: pads unseen too
    assert TextEmbedder(decoder, TOKENIZER).embed([]).shape == (0, 16)
    for call, words in [(lambda: TextEmbedder(decoder, TOKENIZER, pooling="max"), "pooling='max' is invalid"),
                        (lambda: TextEmbedder(decoder, TOKENIZER).embed("one text"), "wrap a single text")]:
        with pytest.raises(ConfigError, match=words):
            call()


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    return make_run(tmp_path_factory.mktemp("embed"))


def test_the_server_embeds_for_the_openai_package_as_the_library_does(run_dir, tmp_path):
    openai = pytest.importorskip("openai")
    gen = load(str(run_dir), device="cpu")
    want = TextEmbedder(gen.model, gen.tokenizer).embed(TEXTS)
    with running(load_app(str(run_dir), ServeConfig(max_prompts=4), device="cpu")) as url:
        client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0)
        out = client.embeddings.create(model="run", input=TEXTS)  # the package asks for base64 and decodes it
        assert [d.index for d in out.data] == [0, 1, 2, 3]
        assert np.array_equal(np.array([d.embedding for d in out.data], dtype=np.float32), want.numpy())
        assert out.usage.prompt_tokens == sum(len(TOKENIZER.encode(t)) + 2 for t in TEXTS)
        with httpx.Client(base_url=url, timeout=30) as c:
            floats = c.post("/v1/embeddings", json={"input": TEXTS[1], "encoding_format": "float"}).json()
            alone = TextEmbedder(gen.model, gen.tokenizer).embed([TEXTS[1]])[0].numpy()  # (a batch of its own)
            assert np.array_equal(np.array(floats["data"][0]["embedding"], dtype=np.float32), alone)
            ids = c.post("/v1/embeddings", json={"input": TOKENIZER.encode(TEXTS[1]),
                                                 "encoding_format": "base64"}).json()["data"][0]["embedding"]
            assert np.array_equal(np.frombuffer(base64.b64decode(ids), dtype="<f4"), alone)
            for body, words in [({"input": []}, "input is empty"), ({"input": ["x"] * 5}, "at most 4"),
                                ({"input": "x", "dimensions": 8}, "this model's embeddings have 32"),
                                ({"input": "x" * 64}, "input[0] is 66 tokens"), ({"input": [[5, 999]]}, "token id 999"),
                                ({"input": "x", "model": "other"}, "is not served here"),
                                ({"input": "x", "encoding_format": "int8"}, "encoding_format")]:
                r = c.post("/v1/embeddings", json=body)
                assert r.status_code in (404, 422) and words in r.json()["error"]["message"], (body, r.text)
    classifier = make_classifier_run(tmp_path)  # a classifier's server embeds too
    with running(load_app(str(classifier), ServeConfig(), device="cpu")) as url, httpx.Client(base_url=url) as c:
        r = c.post("/v1/embeddings", json={"input": ["good", "bad"]})
        assert r.status_code == 200 and len(r.json()["data"]) == 2, r.text
        vectors = np.array([d["embedding"] for d in r.json()["data"]])
        assert np.allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)


def test_embedding_requests_past_the_queue_get_429_and_the_server_goes_on(tmp_path):
    """serve.max_queue bounds the embedding requests waiting for the model: 8 at once, each about 0.1 s of work,
    with room for one: the others get 429 with Retry-After, and the server answers the next one."""
    from concurrent.futures import ThreadPoolExecutor

    run = make_run(tmp_path, block_size=256)
    body = {"input": ["x" * 254] * 16, "encoding_format": "float"}
    with running(load_app(str(run), ServeConfig(max_queue=1, max_concurrency=16), device="cpu")) as url:
        def post(_: int) -> httpx.Response:
            with httpx.Client(base_url=url, timeout=60) as c:
                return c.post("/v1/embeddings", json=body)

        with ThreadPoolExecutor(8) as pool:
            answers = list(pool.map(post, range(8)))
        codes = [r.status_code for r in answers]
        assert 200 in codes and 429 in codes and set(codes) <= {200, 429}, codes
        assert all(r.headers["Retry-After"] == "1" for r in answers if r.status_code == 429)
        assert post(0).status_code == 200
