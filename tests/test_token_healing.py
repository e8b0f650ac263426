"""Token healing (generate.healing, GenerateConfig.token_healing): the prompt's last token is replaced by the model's
likeliest token among those whose bytes begin with it, and the new text begins with the bytes that token adds, so
the prompt's text plus the new text is the text of the tokens the model saw and wrote."""

import numpy as np
import pytest
import torch

from lmforge.config import ModelConfig
from lmforge.data.batches import Examples
from lmforge.errors import ConfigError
from lmforge.eval.tasks import evaluate_sft
from lmforge.generate import GenerateConfig, complete, generate_batch_ids, make_rows, prompt_ids, stream
from lmforge.generate.healing import heal, tokens_beginning_with
from lmforge.model import GPT
from lmforge.tokenizer import byte_tokenizer, train_bpe

CORPUS = "visit https://example.com or http://old.example.org, then the other thing, theme and thesis. " * 40


@pytest.fixture(scope="module")
def bpe():
    return train_bpe([CORPUS], vocab_size=330)


@pytest.fixture(scope="module")
def lm(bpe):
    torch.manual_seed(0)
    return GPT(ModelConfig(vocab_size=bpe.vocab_size, block_size=64, n_layer=2, n_head=2, n_embd=32)).eval()


def extended(bpe) -> list[int]:
    """The ordinary tokens that begin at least one other token."""
    table = {t: bpe.id_to_bytes(t) for t in range(bpe.vocab_size) if t not in bpe.special_token_ids}
    return [t for t, raw in table.items() if sum(other.startswith(raw) for other in table.values()) > 1]


def healed_prompt(bpe, lm, changed: bool) -> list[int]:
    """A prompt (<START>, a few tokens, then a token others begin with) that healing changes (or keeps)."""
    head = prompt_ids(bpe, "visit ")
    for t in extended(bpe):
        if (heal(lm, bpe, head + [t])[0][-1] != t) == changed:
            return head + [t]
    raise AssertionError("no such prompt in this vocabulary")


def test_the_tokens_beginning_with_some_bytes_are_those_a_scan_of_the_vocabulary_finds(bpe):
    for t in list(range(bpe.vocab_size))[3::7] + extended(bpe)[:10]:
        prefix = bpe.id_to_bytes(t)
        for cut in {len(prefix), max(1, len(prefix) - 1)}:
            want = sorted(u for u in range(bpe.vocab_size)
                          if u not in bpe.special_token_ids and bpe.id_to_bytes(u).startswith(prefix[:cut]))
            assert sorted(tokens_beginning_with(bpe, prefix[:cut])) == want
    assert tokens_beginning_with(bpe, b"\xff\xfe-no-such-bytes") == []


def test_heal_puts_in_the_likeliest_token_that_begins_with_the_last(bpe, lm):
    assert len(extended(bpe)) > 20
    healed_any = 0
    for t in extended(bpe)[:40]:
        prompt = prompt_ids(bpe, "visit ") + [t]
        new, lead = heal(lm, bpe, prompt)
        tail = bpe.id_to_bytes(t)
        candidates = [u for u in range(bpe.vocab_size)
                      if u not in bpe.special_token_ids and bpe.id_to_bytes(u).startswith(tail)]
        with torch.no_grad():
            logits = lm(torch.tensor([prompt[:-1]]))[0, -1]
        assert new[:-1] == prompt[:-1]
        assert new[-1] == max(candidates, key=lambda u: float(logits[u]))
        assert bpe.id_to_bytes(new[-1]) == tail + lead
        healed_any += new[-1] != t
    assert healed_any  # some prompts are changed by healing, so the text it adds is tested below


def test_prompts_healing_cannot_change_come_back_as_they_were(bpe, lm):
    start = prompt_ids(bpe, "")
    assert heal(lm, bpe, start) == (start, b"")  # nothing but <START>
    assert heal(lm, bpe, start + [bpe.end_id]) == (start + [bpe.end_id], b"")  # a special token last
    lone = next(t for t in range(bpe.vocab_size) if t not in bpe.special_token_ids and t not in extended(bpe))
    assert heal(lm, bpe, start + [lone]) == (start + [lone], b"")  # no token begins with it but itself
    kept = healed_prompt(bpe, lm, changed=False)
    assert heal(lm, bpe, kept) == (kept, b"")


def test_the_prompt_text_and_the_new_text_are_the_text_of_the_healed_prompt_and_the_new_tokens(bpe, lm):
    prompt = healed_prompt(bpe, lm, changed=True)
    text = bpe.decode(prompt)
    healed, lead = heal(lm, bpe, prompt)
    assert lead
    settings = dict(max_new_tokens=12, temperature=0.0)
    [[done]] = complete(lm, bpe, [text], token_healing=True, **settings)
    assert done.prompt_tokens == len(healed)
    assert done.token_ids == generate_batch_ids(lm, [healed], **settings)[0][0]  # the healed prompt continued
    assert text + done.text == bpe.decode(healed + done.token_ids)
    assert done.text.startswith(lead.decode())
    [[plain]] = complete(lm, bpe, [text], **settings)
    assert plain.token_ids == generate_batch_ids(lm, [prompt], **settings)[0][0]  # off: the prompt as it was
    assert "".join(stream(lm, bpe, text, token_healing=True, **settings)) == done.text
    sampled = complete(lm, bpe, [text], token_healing=True, max_new_tokens=12, seed=3, num_return_sequences=2)[0]
    for c in sampled:  # each sampled sequence begins with the same healed token's text
        assert text + c.text == bpe.decode(healed + c.token_ids)


def test_beam_search_continues_the_healed_prompt(bpe, lm):
    prompt = healed_prompt(bpe, lm, changed=True)
    text = bpe.decode(prompt)
    healed, lead = heal(lm, bpe, prompt)
    beams = complete(lm, bpe, [text], token_healing=True, num_beams=3, num_return_sequences=2, max_new_tokens=8)[0]
    unhealed = complete(lm, bpe, [bpe.decode(healed)], num_beams=3, num_return_sequences=2, max_new_tokens=8)[0]
    assert [c.token_ids for c in beams] == [c.token_ids for c in unhealed]
    assert [c.text for c in beams] == [lead.decode() + c.text for c in unhealed]


def test_a_stop_string_in_the_healed_tokens_text_stops_at_once(bpe, lm):
    prompt = healed_prompt(bpe, lm, changed=True)
    lead = heal(lm, bpe, prompt)[1].decode()
    [[done]] = complete(lm, bpe, [bpe.decode(prompt)], token_healing=True, temperature=0.0, max_new_tokens=12,
                        stop_strings=[lead[-1]])
    assert done.finish_reason == "stop" and done.text == lead[:lead.index(lead[-1])] and len(done.token_ids) == 1


def test_token_healing_is_refused_where_it_cannot_work(bpe, lm):
    with pytest.raises(ConfigError, match="guided_regex .* token_healing"):
        GenerateConfig(token_healing=True, guided_regex="[a-z]+")
    with pytest.raises(ConfigError, match="new ids alone cannot show"):
        generate_batch_ids(lm, [prompt_ids(bpe, "visit http")], token_healing=True)
    with pytest.raises(ConfigError, match="needs the tokenizer"):
        make_rows(lm, [prompt_ids(bpe, "visit http")], GenerateConfig(token_healing=True))
    ids = np.array(prompt_ids(bpe, "visit http") + bpe.encode("s://x") + [bpe.end_id])
    one = Examples(ids, np.array([0, len(ids)]), np.array([len(prompt_ids(bpe, "visit http"))]))
    with pytest.raises(ConfigError, match="leave token_healing off"):  # its prompts end as in training
        evaluate_sft(lm, bpe, one, generate=GenerateConfig(token_healing=True, temperature=0.0))


def test_a_byte_tokenizer_heals_nothing():
    """Every byte token is one byte and begins no other: healing leaves the prompt and the output as they were."""
    tok = byte_tokenizer()
    torch.manual_seed(0)
    m = GPT(ModelConfig(vocab_size=tok.vocab_size, block_size=32, n_layer=1, n_head=2, n_embd=16)).eval()
    settings = dict(max_new_tokens=8, temperature=0.0)
    assert complete(m, tok, ["http"], token_healing=True, **settings) == complete(m, tok, ["http"], **settings)


def test_the_server_heals_a_completion_prompt_as_the_library_does(bpe, lm, tmp_path):
    """POST /v1/completions with token_healing (lmforge's field) on a real server: the library's text; a chat, whose
    prompt ends on its template, does not take the field."""
    import httpx

    from lmforge.checkpoint import save_checkpoint
    from lmforge.config import RunConfig
    from lmforge.serve import ServeConfig, load_app
    from test_serve import running

    bpe.save(tmp_path / "tokenizer.json")
    save_checkpoint(tmp_path / "run", 1, lm, None, RunConfig(model=lm.config), {},
                    tokenizer_file=tmp_path / "tokenizer.json")
    text = bpe.decode(healed_prompt(bpe, lm, changed=True))
    want = complete(lm, bpe, [text], token_healing=True, max_new_tokens=10, temperature=0.0)[0][0].text
    body = {"prompt": text, "max_tokens": 10, "temperature": 0}
    with running(load_app(str(tmp_path / "run"), ServeConfig(), device="cpu")) as url, \
            httpx.Client(base_url=url, timeout=30) as c:
        healed = c.post("/v1/completions", json={**body, "token_healing": True})
        plain = c.post("/v1/completions", json=body)
        chat = c.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}],
                                                    "token_healing": True})
    assert healed.status_code == 200, healed.text
    assert healed.json()["choices"][0]["text"] == want != plain.json()["choices"][0]["text"]
    assert chat.status_code == 422 and "token_healing" in chat.text
