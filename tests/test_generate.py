"""Decoding: greedy equals argmax of a full forward, budgets hold, seeds reproduce, filters filter."""

import warnings

import pytest
import torch

from lmforge.config import ModelConfig
from lmforge.errors import ConfigError
from lmforge.generate import (GenerateConfig, TextGenerator, filter_logits, generate_ids, next_token,
                              text_pieces)
from lmforge.model import GPT
from lmforge.tokenizer import byte_tokenizer

TOKENIZER = byte_tokenizer()  # ids: 3 special tokens, then the 256 bytes
START, END = TOKENIZER.start_id, TOKENIZER.end_id


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models run fastest on one thread; on a busy machine, threads of small ops wait on each other."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def model(**overrides) -> GPT:
    torch.manual_seed(0)
    base = dict(vocab_size=259, block_size=16, n_layer=2, n_head=2, n_embd=32)
    return GPT(ModelConfig(**{**base, **overrides})).eval()


def full_forward_greedy(m: GPT, prompt: list, steps: int) -> list:
    """Reference: recompute the whole sequence each step, with generate's window rule past block_size."""
    block, seq, ctx_start, out = m.config.block_size, list(prompt), 0, []
    for _ in range(steps):
        if len(seq) - ctx_start > block:  # the window is full: keep the newest block // 2 tokens
            ctx_start = len(seq) - block // 2
        with torch.no_grad():
            logits = m(torch.tensor([seq[ctx_start:]]))
        token = int(logits[0, -1].argmax())
        out.append(token)
        seq.append(token)
    return out


@pytest.mark.parametrize("pos_encoding", ["learned", "rope"])
def test_greedy_equals_argmax_of_full_forward(pos_encoding):
    m = model(pos_encoding=pos_encoding)
    prompt = [START, 40, 41, 42]
    assert generate_ids(m, prompt, temperature=0.0, max_new_tokens=10)[0] == full_forward_greedy(m, prompt, 10)


def test_greedy_past_the_context_slides_the_window():
    m = model()
    prompt = [START] + list(range(50, 60))
    got = generate_ids(m, prompt, temperature=0.0, max_new_tokens=40)[0]
    assert got == full_forward_greedy(m, prompt, 40)


def test_output_never_exceeds_the_budget():
    m = model()
    for n in (1, 5, 23):
        rows = generate_ids(m, [START], max_new_tokens=n, seed=n, num_return_sequences=3)
        assert len(rows) == 3 and all(len(r) <= n for r in rows)
    assert len(generate_ids(m, [START, 5, 6], temperature=0.0, max_length=9)[0]) <= 6


def test_same_seed_same_tokens():
    m = model()
    a = generate_ids(m, [START, 10], max_new_tokens=30, seed=7, num_return_sequences=2)
    b = generate_ids(m, [START, 10], max_new_tokens=30, seed=7, num_return_sequences=2)
    c = generate_ids(m, [START, 10], max_new_tokens=30, seed=8, num_return_sequences=2)
    assert a == b and a != c
    assert a[0] != a[1]  # the batch rows are sampled independently


def test_generation_stops_at_the_end_token():
    m = model()
    with torch.no_grad():  # make <END> overwhelmingly likely after any token (its embedding row is unused)
        m.lm_head.weight[END] = 0
        m.norm_f.bias.zero_()
        m.lm_head.weight[END, 0] = 1.0
        m.norm_f.bias[0] = 1000.0
    assert generate_ids(m, [START, 9], end_id=END, max_new_tokens=10, seed=0) == [[]]
    assert len(generate_ids(m, [START, 9], max_new_tokens=10, seed=0)[0]) == 10  # without end_id


def test_long_prompt_is_cropped_with_a_warning():
    m = model()
    prompt = [START] + [7] * 30
    with pytest.warns(UserWarning, match="longer than block_size=16"):
        got = generate_ids(m, prompt, temperature=0.0, max_new_tokens=3)[0]
    assert got == full_forward_greedy(m, prompt[-16:], 3)


def test_top_k_and_top_p_never_emit_a_filtered_token():
    torch.manual_seed(0)
    logits = torch.randn(4, 50) * 3
    top5 = logits.topk(5, dim=-1).indices
    probs = logits.softmax(-1)
    sorted_probs, order = probs.sort(dim=-1, descending=True)
    nucleus = [set(order[b, :int((sorted_probs[b].cumsum(0) < 0.6).sum()) + 1].tolist()) for b in range(4)]
    gen = torch.Generator().manual_seed(0)
    k_config, p_config = GenerateConfig(top_k=5), GenerateConfig(top_p=0.6)
    for _ in range(300):
        k_pick, p_pick = next_token(logits, k_config, gen), next_token(logits, p_config, gen)
        for b in range(4):
            assert k_pick[b] in top5[b]
            assert int(p_pick[b]) in nucleus[b]


def test_filter_logits_keeps_the_top_token_however_small_top_p():
    logits = torch.tensor([[0.0, 5.0, 1.0]])
    assert torch.isfinite(filter_logits(logits, top_p=1e-6)).tolist() == [[False, True, False]]
    assert torch.isfinite(filter_logits(logits, top_k=2)).tolist() == [[False, True, True]]


def test_bad_settings_are_refused():
    for kwargs, field in [(dict(top_p=0.0), "top_p"), (dict(temperature=-1.0), "temperature"),
                          (dict(top_k=0), "top_k"), (dict(num_return_sequences=0), "num_return_sequences")]:
        with pytest.raises(ConfigError, match=f"generate.{field}="):
            GenerateConfig(**kwargs)
    with pytest.raises(ConfigError, match="max_length=3"):
        generate_ids(model(), [START, 4, 5], max_length=3)


def test_stream_joins_to_generate_and_holds_partial_characters():
    gen = TextGenerator(model(), TOKENIZER)
    text = gen.generate("héllo", max_new_tokens=20, seed=3)
    assert isinstance(text, str)
    assert "".join(gen.stream("héllo", max_new_tokens=20, seed=3)) == text
    pieces = list(text_pieces(TOKENIZER, iter(TOKENIZER.encode("a€b😀") + [END, 50])))
    assert pieces == ["a", "€", "b", "😀"]  # never half a character, nothing after <END>


def test_generate_returns_one_text_per_sequence():
    gen = TextGenerator(model(), TOKENIZER)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        out = gen.generate("ab", max_new_tokens=5, seed=0, num_return_sequences=3)
    assert len(out) == 3 and all(isinstance(t, str) for t in out)
    with pytest.raises(ConfigError, match="num_return_sequences=1"):
        gen.stream("ab", num_return_sequences=2)


def test_greedy_flag_and_max_length():
    m = model()
    assert generate_ids(m, [START, 4], greedy=True, temperature=0.7, max_new_tokens=6) == \
        generate_ids(m, [START, 4], temperature=0.0, max_new_tokens=6)
    assert len(generate_ids(m, [START, 4], greedy=True, max_new_tokens=200, max_length=7)[0]) == 5  # max_length wins


def test_load_generates_like_the_saved_model(tmp_path):
    from lmforge.checkpoint import save_checkpoint
    from lmforge.config import RunConfig
    from lmforge.generate import load

    m = model()
    TOKENIZER.save(tmp_path / "tokenizer.json")
    save_checkpoint(tmp_path / "run", 10, m, None, RunConfig(model=m.config), {}, tokenizer_file=tmp_path / "tokenizer.json")
    loaded = load(str(tmp_path / "run"))
    expected = TextGenerator(m, TOKENIZER).generate("hi", greedy=True, max_new_tokens=8)
    assert loaded.generate("hi", greedy=True, max_new_tokens=8) == expected
