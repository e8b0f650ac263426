"""Decoding: greedy equals argmax of a full forward, budgets hold, seeds reproduce, filters filter,
batches equal their prompts one by one, stop strings and stop ids stop."""

import json
import re
import warnings

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lmforge.config import ModelConfig
from lmforge.errors import ConfigError
from lmforge.generate import (GenerateConfig, StopText, TextGenerator, apply_inference_dtype, banned_ngram_tokens,
                              decode_events, decode_rows, filter_logits, generate_batch_ids, generate_ids, make_rows,
                              next_token, process_scores, prompt_ids, repetition_penalty)
from lmforge.model import GPT
from lmforge.tokenizer import byte_tokenizer

TOKENIZER = byte_tokenizer()  # ids: 3 special tokens, then the 256 bytes
START, END = TOKENIZER.start_id, TOKENIZER.end_id


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


def test_draw_follows_the_probabilities_and_never_picks_a_zero():
    from lmforge.generate.processors import draw

    probs = torch.tensor([[0.5, 0.0, 0.2, 0.3, 0.0]]).repeat(4000, 1)
    picks = draw(probs, torch.Generator().manual_seed(0))
    counts = torch.bincount(picks, minlength=5) / len(picks)
    assert counts[1] == 0 and counts[4] == 0
    assert torch.allclose(counts, probs[0], atol=0.025)  # ~5 standard errors of 4000 draws
    rows = [torch.Generator().manual_seed(s) for s in (1, 2, 3)]
    together = draw(probs[:3], [torch.Generator().manual_seed(s) for s in (1, 2, 3)])
    assert together.tolist() == [int(draw(probs[:1], [g])) for g in rows]  # each row draws from its own stream


def test_filter_logits_keeps_the_top_token_however_small_top_p():
    logits = torch.tensor([[0.0, 5.0, 1.0]])
    assert torch.isfinite(filter_logits(logits, top_p=1e-6)).tolist() == [[False, True, False]]
    assert torch.isfinite(filter_logits(logits, top_k=2)).tolist() == [[False, True, True]]


def test_bad_settings_are_refused():
    for kwargs, field in [(dict(top_p=0.0), "top_p"), (dict(temperature=-1.0), "temperature"),
                          (dict(top_k=0), "top_k"), (dict(num_return_sequences=0), "num_return_sequences"),
                          (dict(min_p=1.5), "min_p"), (dict(repetition_penalty=0.0), "repetition_penalty"),
                          (dict(no_repeat_ngram_size=-1), "no_repeat_ngram_size"), (dict(num_beams=0), "num_beams"),
                          (dict(early_stopping="sometimes"), "early_stopping"),
                          (dict(num_beams=2, num_return_sequences=3), "num_return_sequences"),
                          (dict(stop_strings=[""]), "stop_strings"), (dict(stop_strings=["x"], num_beams=2), "stop_strings"),
                          (dict(stop_token_ids=[-1]), "stop_token_ids"), (dict(temperature=1e-300), "temperature"),
                          (dict(top_p=1e-300), "top_p"), (dict(repetition_penalty=1e-300), "repetition_penalty"),
                          (dict(repetition_penalty=1e300), "repetition_penalty")]:
        with pytest.raises(ConfigError, match=rf"generate\.{field}(\[\d+\])?="):
            GenerateConfig(**kwargs)
    with pytest.raises(ConfigError, match="max_length=3"):
        generate_ids(model(), [START, 4, 5], max_length=3)


def test_the_extreme_sampling_values_allowed_keep_the_distribution_finite():
    """At the bounds GenerateConfig allows (tiny temperature, top_p, penalty), large logits in float32 or fp16 still
    give a probability distribution: a bound lowered to where the division overflows fails here."""
    from lmforge.generate.config import MAX_PENALTY, MIN_TEMPERATURE, MIN_TOP_P

    logits = torch.tensor([[30.0, -30.0, 5.0, 29.0]])  # as large as a trained model's
    tokens = torch.tensor([[0, 1, 2, 3]])  # every token seen: the penalty applies to all
    for config in [GenerateConfig(temperature=MIN_TEMPERATURE), GenerateConfig(top_p=MIN_TOP_P),
                   GenerateConfig(repetition_penalty=1 / MAX_PENALTY), GenerateConfig(repetition_penalty=MAX_PENALTY)]:
        for dtype in (torch.float32, torch.float16):
            scores = process_scores(logits.to(dtype), tokens, None, config)
            probs = filter_logits(scores.float() / config.temperature, top_p=config.top_p).softmax(dim=-1)
            assert torch.isfinite(probs).all() and abs(probs.sum().item() - 1) < 1e-5, (config, dtype)


def test_stream_joins_to_generate_and_holds_partial_characters():
    gen = TextGenerator(model(), TOKENIZER)
    text = gen.generate("héllo", max_new_tokens=20, seed=3)
    assert isinstance(text, str)
    assert "".join(gen.stream("héllo", max_new_tokens=20, seed=3)) == text
    text = StopText(TOKENIZER)
    pieces = [text.push(t) for t in TOKENIZER.encode("a€b😀")]
    assert [p for p in pieces if p] == ["a", "€", "b", "😀"]  # never half a character
    assert text.close() == "" and text.text == "a€b😀"


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


# ------------------------------------------------------------------------------ filters and processors
@settings(max_examples=40, deadline=None)
@given(logits=st.lists(st.floats(-8.0, 8.0), min_size=2, max_size=40), top_k=st.one_of(st.none(), st.integers(1, 40)),
       top_p=st.one_of(st.none(), st.floats(0.05, 1.0)), min_p=st.one_of(st.none(), st.floats(0.0, 1.0)),
       seed=st.integers(0, 2**31))
def test_top_k_top_p_min_p_never_emit_a_filtered_token(logits, top_k, top_p, min_p, seed):
    """The allowed set is computed here independently, token by token, in float64 (ties kept alike)."""
    x = torch.tensor([logits], dtype=torch.float32)
    values = x[0].double()
    allowed = set(range(len(logits)))
    if top_k is not None:  # at least as large as the k-th largest
        allowed = {i for i in allowed if values[i] >= values.sort(descending=True).values[min(top_k, len(logits)) - 1]}
    if top_p is not None and top_p < 1.0:  # the mass of strictly more likely survivors is below top_p
        probs = torch.tensor([values[i] if i in allowed else -float("inf") for i in range(len(logits))]).softmax(0)
        allowed = {i for i in allowed if probs[probs > probs[i]].sum() < top_p + 1e-5}
    if min_p is not None:
        probs = torch.tensor([values[i] if i in allowed else -float("inf") for i in range(len(logits))]).softmax(0)
        allowed = {i for i in allowed if probs[i] >= min_p * probs.max() - 1e-6}
    config = GenerateConfig(top_k=top_k, top_p=top_p, min_p=min_p)
    generator = torch.Generator().manual_seed(seed)
    picks = {int(next_token(x, config, generator)) for _ in range(30)}
    assert picks <= allowed
    assert int(x.argmax()) in allowed  # the most likely token always survives


def test_repetition_penalty_divides_positive_and_multiplies_negative_scores():
    scores = torch.tensor([[2.0, -2.0, 3.0, -1.0]])
    seen = torch.tensor([[True, True, False, False]])
    assert repetition_penalty(scores, seen, 2.0).tolist() == [[1.0, -4.0, 3.0, -1.0]]


def test_banned_ngram_tokens():
    tokens = torch.tensor([[5, 6, 7, 5, 6], [1, 2, 3, 4, 5]])
    banned = banned_ngram_tokens(tokens, None, 3, 10)  # row 0 ends in "5 6", seen before "7"
    assert banned[0].nonzero().flatten().tolist() == [7] and not banned[1].any()
    assert banned_ngram_tokens(tokens, None, 1, 10)[1].nonzero().flatten().tolist() == [1, 2, 3, 4, 5]
    tokens = torch.tensor([[6, 7, 8, 6, 7], [2, 6, 7, 8, 6, 7][1:]])
    pads = torch.tensor([[False, True, True, True, True], [True] * 5])  # an n-gram touching a pad does not count
    assert banned_ngram_tokens(tokens, pads, 3, 10).nonzero().tolist() == [[1, 8]]


def test_no_repeat_ngram_generation_never_repeats_one():
    m = model(block_size=64)
    for n in (2, 3):
        for seed in range(3):
            row = [START, 5] + generate_ids(m, [START, 5], max_new_tokens=40, seed=seed, temperature=0.0 if seed == 0
                                            else 1.5, no_repeat_ngram_size=n)[0]
            grams = [tuple(row[i:i + n]) for i in range(len(row) - n + 1)]
            assert len(grams) == len(set(grams))


# ------------------------------------------------------------------------------------------- batches
PROMPTS = ["a", "héllo wor", "xyz", "The quick brown"]


@pytest.mark.parametrize("pos_encoding", ["learned", "rope"])
def test_a_batch_of_prompts_equals_the_prompts_one_by_one(pos_encoding):
    """Different lengths, left-padded: greedy and seeded sampling give each prompt its unbatched text, as long
    as the longest prompt plus the new tokens fit in block_size (64 here)."""
    gen = TextGenerator(model(block_size=64, pos_encoding=pos_encoding), TOKENIZER)
    for options in (dict(greedy=True), dict(seed=5, top_k=40), dict(seed=2, num_return_sequences=2, top_p=0.9),
                    dict(greedy=True, repetition_penalty=1.3, no_repeat_ngram_size=2)):
        batch = gen.generate(PROMPTS, max_new_tokens=30, **options)
        assert batch == [gen.generate(p, max_new_tokens=30, **options) for p in PROMPTS], options
    beams = gen.generate(PROMPTS, max_new_tokens=12, num_beams=3, num_return_sequences=2)
    assert beams == [gen.generate(p, max_new_tokens=12, num_beams=3, num_return_sequences=2) for p in PROMPTS]
    assert gen.generate([], max_new_tokens=3) == []


def test_model_with_left_padding_equals_each_row_alone():
    for pos_encoding in ("learned", "sinusoidal", "rope"):
        m = model(pos_encoding=pos_encoding, attention="reference")
        rows = [[START, 9, 8, 7, 6], [START, 4]]
        batch = torch.tensor([rows[0], [0, 0, 0] + rows[1]])
        mask = torch.tensor([[1] * 5, [0, 0, 0, 1, 1]])
        with torch.no_grad():
            out = m(batch, attention_mask=mask)
            assert torch.isfinite(out).all()
            torch.testing.assert_close(out[0], m(torch.tensor(rows[:1]))[0], atol=1e-5, rtol=0)
            torch.testing.assert_close(out[1, 3:], m(torch.tensor(rows[1:]))[0], atol=1e-5, rtol=0)


def test_budgets_hold_for_every_row_and_strategy():
    m = model(block_size=32)
    prompts = [[START, 4], [START, 4, 5, 6, 7, 8]]
    for options in (dict(seed=0), dict(greedy=True), dict(num_beams=2, num_return_sequences=2)):
        for n in (1, 7):
            rows = generate_batch_ids(m, prompts, max_new_tokens=n, **options)
            assert all(0 < len(r) <= n for prompt_rows in rows for r in prompt_rows)
        by_length = generate_batch_ids(m, prompts, max_length=9, **options)  # 9 - prompt length each
        assert [max(len(r) for r in rows) for rows in by_length] == [7, 3]


# ------------------------------------------------------------------------------------------ stopping
def test_stop_strings_end_the_text_before_them_and_stream_agrees():
    gen = TextGenerator(model(block_size=64), TOKENIZER)
    full = gen.generate("ab", max_new_tokens=40, seed=11, top_k=5)
    stop = full[10:12]
    expected = full[:full.find(stop)]
    assert gen.generate("ab", max_new_tokens=40, seed=11, top_k=5, stop_strings=[stop, "never there"]) == expected
    assert "".join(gen.stream("ab", max_new_tokens=40, seed=11, top_k=5, stop_strings=[stop])) == expected
    ids = generate_batch_ids(gen.model, [[START, 100, 101]], end_id=END, tokenizer=TOKENIZER, max_new_tokens=40,
                             seed=11, top_k=5)[0][0]
    text = TOKENIZER.decode(ids)  # generation itself stops at the stop string (the rest is not generated)
    ids_stopped = generate_batch_ids(gen.model, [[START, 100, 101]], end_id=END, tokenizer=TOKENIZER, max_new_tokens=40,
                                     seed=11, top_k=5, stop_strings=[text[5:7]])[0][0]
    assert len(ids_stopped) < len(ids) and text[5:7] in TOKENIZER.decode(ids_stopped)


def test_stop_text_holds_back_a_possible_start():
    text = StopText(TOKENIZER, ["</s>"])
    pieces = []
    for chunk in ["ab", "c<", "/s", "x", "<", "/", "s>", "tail"]:
        pieces += [text.push(t) for t in TOKENIZER.encode(chunk)]
        if text.stopped:
            break
    assert [p for p in pieces if p] == ["a", "b", "c", "</sx"]  # "<", "</s" held back until settled
    assert text.stopped and text.text == "abc</sx" and text.close() == ""  # nothing from "</s>" on
    free = StopText(TOKENIZER, ["</s>"])
    assert "".join(free.push(t) for t in TOKENIZER.encode("no stop <")) + free.close() == "no stop <"


def test_min_new_tokens_holds_back_end_ids_and_stop_strings_until_then():
    """vLLM's min_tokens: no end id is chosen, and no stop string counts, before min_new_tokens; a stop string that
    ends after it does."""
    gen = TextGenerator(model(block_size=64), TOKENIZER)
    free = gen.complete(["ab"], max_new_tokens=40, temperature=0.0)[0][0]
    ends = [t for t in dict.fromkeys(free.token_ids) if free.token_ids.index(t) < 4]
    early = gen.complete(["ab"], max_new_tokens=40, temperature=0.0, stop_token_ids=ends)[0][0]
    held = gen.complete(["ab"], max_new_tokens=40, temperature=0.0, stop_token_ids=ends, min_new_tokens=12)[0][0]
    assert len(early.token_ids) < 4 and len(held.token_ids) >= 12 and not set(held.token_ids[:12]) & set(ends)
    text = free.text  # one token per character: ASCII bytes
    stop = next(text[i:i + 2] for i in range(4) if text.find(text[i:i + 2], 14) >= 0)  # early, and again past 14
    cut = gen.complete(["ab"], max_new_tokens=40, temperature=0.0, stop_strings=[stop], min_new_tokens=14)[0][0]
    assert text.find(stop) < 4 and cut.finish_reason == "stop" and len(cut.token_ids) >= 14
    assert cut.text == text[:text.find(stop, 14 - len(stop))]  # the first match that ends with token 14 or later


def test_bad_words_never_appear_in_the_text():
    gen = TextGenerator(model(block_size=64), TOKENIZER)
    free = gen.generate("ab", max_new_tokens=40, temperature=0.0)
    words = [free[3:5], free[10:13]]
    banned = gen.generate("ab", max_new_tokens=40, temperature=0.0, bad_words=words)
    assert banned != free and not any(w in "ab" + banned for w in words)
    sampled = gen.complete(["ab"] * 4, max_new_tokens=40, seed=2, bad_words=words)
    assert not any(w in "ab" + c[0].text for c in sampled for w in words)
    with pytest.raises(ConfigError, match="bad_words, guided_choice and negative_prompt need the tokenizer"):
        generate_batch_ids(gen.model, [[START, 100]], bad_words=["x"])
    with pytest.raises(ConfigError, match="logit_bias names the token id 259, outside the vocabulary"):
        gen.generate("ab", logit_bias={259: 1.0})
    with pytest.raises(ConfigError, match="bad_words_ids names the token id 300"):
        generate_batch_ids(gen.model, [[START, 100]], bad_words_ids=[[5, 300]], num_beams=2)


def test_stop_token_ids_end_sequences_like_the_end_token():
    m = model(block_size=64)
    free = generate_ids(m, [START, 20], max_new_tokens=30, seed=4)[0]
    stop = free[6]
    got = generate_ids(m, [START, 20], max_new_tokens=30, seed=4, stop_token_ids=[stop])[0]
    assert got == free[:free.index(stop)]


# ------------------------------------------------------------------------------- CLI and lower precision
def test_same_seed_same_text_in_cli_and_api(tmp_path, capsys):
    from lmforge.checkpoint import save_checkpoint
    from lmforge.cli import main
    from lmforge.config import RunConfig
    from lmforge.generate import load

    m = model(block_size=64)
    TOKENIZER.save(tmp_path / "tokenizer.json")
    save_checkpoint(tmp_path / "run", 10, m, None, RunConfig(model=m.config), {}, tokenizer_file=tmp_path / "tokenizer.json")
    api = load(str(tmp_path / "run"))
    options = ["--prompt", "Hi", "--max-new-tokens", "25", "--seed", "9", "--top-k", "30", "--device", "cpu"]
    for extra in ([], ["--no-stream"]):
        capsys.readouterr()
        assert main(["generate", str(tmp_path / "run"), *options, *extra]) == 0
        assert capsys.readouterr().out == "Hi" + api.generate("Hi", max_new_tokens=25, seed=9, top_k=30) + "\n"
    capsys.readouterr()
    assert main(["generate", str(tmp_path / "run"), "--prompt", "Hi", "--max-new-tokens", "10", "--num-beams", "3",
                 "--repetition-penalty", "1.2", "--no-repeat-ngram-size", "2", "--device", "cpu"]) == 0
    expected = api.generate("Hi", max_new_tokens=10, num_beams=3, repetition_penalty=1.2, no_repeat_ngram_size=2)
    assert capsys.readouterr().out == "Hi" + expected + "\n"


def test_int8_and_bf16_decoding_stay_close_to_fp32():
    import copy

    m = model(block_size=64, n_embd=64)
    idx = torch.tensor([[START, 30, 31, 32, 33]])
    with torch.no_grad():
        exact = m(idx)
        for dtype, quantize in (("bf16", None), ("fp32", "int8")):
            fast = apply_inference_dtype(copy.deepcopy(m), dtype, quantize)
            assert (fast(idx).float() - exact).abs().max() < 0.05 * exact.abs().max()
            assert len(generate_ids(fast, [START, 5], max_new_tokens=8, seed=0)[0]) == 8
    with pytest.raises(ConfigError, match="quantize='int4'"):
        apply_inference_dtype(m, quantize="int4")


@pytest.mark.slow
def test_compiled_decoding_gives_the_eager_tokens():
    """apply_compile: the decoding step compiled once (batch 1, and batch >= 2) serves every length, padded
    rows, the window slide and other architectures; tokens equal the eager model's, greedy and seeded."""
    from lmforge.generate import CompiledGPT, apply_compile

    m = model(block_size=16)
    fast = TextGenerator(m, TOKENIZER, compile=True).model
    assert isinstance(fast, CompiledGPT) and apply_compile(fast) is fast
    eager = generate_ids(m, [START, 7, 8], temperature=0.0, max_new_tokens=40)  # slides the window twice
    assert generate_ids(fast, [START, 7, 8], temperature=0.0, max_new_tokens=40) == eager
    prompts = [[START, 9], [START, 5, 6, 7, 8, 9], [START, 30, 31]]  # a left-padded batch, sampled
    options = dict(max_new_tokens=10, seed=3, top_k=20, num_return_sequences=2)
    assert generate_batch_ids(fast, prompts, **options) == generate_batch_ids(m, prompts, **options)
    assert set(fast.libraries) == {True, False}  # one library for batch 1, one for every larger batch
    # speculative decoding: the compiled model drafts for the eager one through its compiled step, past the window
    steps = []
    step = fast.decode_step
    fast.decode_step = lambda *a: steps.append(1) or step(*a)
    config = GenerateConfig(greedy=True, max_new_tokens=40, num_assistant_tokens=4)
    rows = make_rows(m, [[START, 7, 8]], config)
    for _ in decode_events(m, rows, config, fast):
        pass
    assert [rows[0].tokens] == eager and rows[0].drafted == rows[0].accepted > 0 and len(steps) > 0
    del fast.decode_step
    llama = model(block_size=32, pos_encoding="rope", norm="rmsnorm", mlp="swiglu", n_kv_head=1, bias=False)
    assert generate_ids(apply_compile(llama), [START, 4], temperature=0.0, max_new_tokens=20) == \
        generate_ids(llama, [START, 4], temperature=0.0, max_new_tokens=20)


def test_max_time_ends_every_way_of_decoding_with_the_tokens_it_has():
    """A long sampled run stops after max_time with the tokens the same call gives without the limit (cut where the
    time ran out); a limit already spent lets each row, beam search and speculation take one step."""
    import time

    m = model(block_size=64)
    gen = TextGenerator(m, TOKENIZER)
    start = time.monotonic()
    sampled = dict(seed=0, top_k=50, suppress_tokens=[END])  # (the end token never comes)
    cut = gen.complete(["ab"], max_new_tokens=100_000, max_time=0.3, **sampled)[0][0]
    assert cut.finish_reason == "length" and 0 < len(cut.token_ids) < 100_000 and time.monotonic() - start < 30
    whole = gen.complete(["ab"], max_new_tokens=len(cut.token_ids), **sampled)[0][0]
    assert cut.token_ids == whole.token_ids and cut.text == whole.text
    spent = gen.complete(["ab", "c"], max_new_tokens=50, max_time=1e-9, greedy=True, num_return_sequences=2)
    assert all(len(c.token_ids) == 1 and c.finish_reason == "length" for rows in spent for c in rows)
    assert [len(b) for b in generate_batch_ids(m, [[START, 5]], num_beams=3, num_return_sequences=3,
                                               max_new_tokens=50, max_time=1e-9)[0]] == [1, 1, 1]
    assert len(generate_ids(m, [START, 5, 6, 5, 6], max_new_tokens=50, greedy=True, max_time=1e-9,
                            prompt_lookup_num_tokens=4)[0]) == 1
    assert len(generate_ids(m, [START, 5], max_new_tokens=50, greedy=True, max_time=1e-9, assistant_model=m)[0]) == 1


def test_complete_reports_tokens_and_why_each_sequence_ended():
    gen = TextGenerator(model(block_size=64), TOKENIZER)
    free = gen.complete(["ab"], max_new_tokens=30, seed=11, top_k=5)[0][0]
    assert free.finish_reason == "length" and len(free.token_ids) == 30 and free.prompt_tokens == 3
    assert free.text == TOKENIZER.decode(free.token_ids) == gen.generate("ab", max_new_tokens=30, seed=11, top_k=5)
    stopped = gen.complete(["ab"], max_new_tokens=30, seed=11, top_k=5, stop_strings=[free.text[8:10]])[0][0]
    assert stopped.finish_reason == "stop" and stopped.text == free.text[:free.text.find(free.text[8:10])]
    ended = gen.complete(["ab"], max_new_tokens=30, seed=11, top_k=5, stop_token_ids=[free.token_ids[4]])[0][0]
    assert ended.finish_reason == "stop" and ended.token_ids == free.token_ids[:free.token_ids.index(free.token_ids[4])]
    assert gen.complete([]) == []


# ------------------------------------------------------------------------------ one loop, rows of any kind
def test_rows_with_their_own_budgets_stops_and_sampling_in_one_batch_equal_each_row_alone():
    """The decoding core takes rows with different settings in one batch (the server merges requests this way):
    each row's tokens, text and finish reason are those it gets alone."""
    m = model(block_size=64)
    free = TextGenerator(m, TOKENIZER).complete(["ab"], max_new_tokens=30, seed=11, top_k=5)[0][0]
    stop_id = free.token_ids[4]
    settings = [
        ("ab", GenerateConfig(max_new_tokens=30, seed=11, top_k=5)),
        ("ab", GenerateConfig(max_new_tokens=30, seed=11, top_k=5, stop_strings=[free.text[8:10]])),
        ("a longer prompt", GenerateConfig(max_new_tokens=5, temperature=0.0)),
        ("x", GenerateConfig(max_new_tokens=12, seed=2, temperature=0.7, top_p=0.9, repetition_penalty=1.3)),
        ("yz", GenerateConfig(max_new_tokens=20, seed=5, min_p=0.1, no_repeat_ngram_size=2, num_return_sequences=2)),
        ("ab", GenerateConfig(max_new_tokens=30, seed=11, top_k=5, stop_token_ids=[stop_id])),
        ("ab", GenerateConfig(max_new_tokens=15, seed=3, typical_p=0.8, eta_cutoff=0.01, min_new_tokens=10,
                              bad_words_ids=[[free.token_ids[1]]], stop_token_ids=[stop_id])),
        ("q", GenerateConfig(max_new_tokens=10, temperature=0.0, logit_bias={free.token_ids[0]: 5.0},
                             bad_words=[free.text[2:4]])),
        ("q", GenerateConfig(max_new_tokens=10, seed=8, epsilon_cutoff=0.01, logit_bias={free.token_ids[0]: -5.0})),
        ("q", GenerateConfig(max_new_tokens=10, seed=9, temperature=2.0, guided_choice=["yes", "no", "maybe"])),
    ]

    def rows_of(prompt, config):
        return make_rows(m, [prompt_ids(TOKENIZER, prompt)], config, END, TOKENIZER)

    alone = []
    for prompt, config in settings:
        rows = rows_of(prompt, config)
        list(decode_rows(m, rows))
        alone += [(row.tokens, row.text.text, row.finish) for row in rows]
    together = [row for prompt, config in settings for row in rows_of(prompt, config)]
    events = [e for step in decode_rows(m, together) for e in step]
    assert [(row.tokens, row.text.text, row.finish) for row in together] == alone
    assert [alone[i][2] for i in (0, 1, 2, 6)] == ["length", "stop", "length", "stop"]  # budget, string, budget, id
    for i, row in enumerate(together):  # the events tell a reader everything: text pieces, tokens, one finish
        mine = [e for e in events if e.row == i]
        assert "".join(e.text for e in mine) == row.text.text
        assert [e.token for e in mine if e.token is not None] == row.tokens
        assert [e.finish for e in mine] == [None] * (len(mine) - 1) + [row.finish]


def test_a_classifier_is_refused_with_the_reason(tmp_path, capsys):
    from lmforge.checkpoint import save_checkpoint
    from lmforge.cli import main
    from lmforge.config import RunConfig

    m = model(head="classify", num_labels=2)
    TOKENIZER.save(tmp_path / "tokenizer.json")
    save_checkpoint(tmp_path / "run", 1, m, None, RunConfig(model=m.config), {}, tokenizer_file=tmp_path / "tokenizer.json")
    with pytest.raises(ConfigError, match="does not generate text"):
        TextGenerator(m, TOKENIZER)
    assert main(["generate", str(tmp_path / "run"), "--device", "cpu"]) == 2
    assert "does not generate text" in capsys.readouterr().err


def test_presence_and_frequency_penalties_follow_openais_formula_over_the_generated_tokens_only():
    """Greedy decoding with the penalties equals a plain loop applying OpenAI's formula by hand, logit[t] -=
    frequency * c[t] + presence * (c[t] > 0) with c counting the generated tokens (not the prompt's), for rows with
    different penalties in one batch; beam search refuses them."""
    m = model(block_size=64)

    def by_hand(prompt: list, new: int, presence: float, frequency: float) -> list:
        ids, out = list(prompt), []
        for _ in range(new):
            with torch.no_grad():
                logits = m(torch.tensor([ids]))[0, -1].clone()
            for t in set(out):
                logits[t] -= frequency * out.count(t) + presence
            out.append(int(logits.argmax()))
            ids.append(out[-1])
        return out

    plain = generate_ids(m, [START, 9], greedy=True, max_new_tokens=30)[0]
    repeated = [START] + [plain[0]] * 20  # counted, the prompt would push its token down at once
    cases = [([START, 9], 1.5, 0.0), ([START, 9], 0.0, 0.7), (repeated, 2.0, 0.5), ([START, 30, 31], -1.0, 0.3)]
    rows = [make_rows(m, [prompt], GenerateConfig(greedy=True, max_new_tokens=30, presence_penalty=presence,
                                                  frequency_penalty=frequency))[0]
            for prompt, presence, frequency in cases]
    for _ in decode_rows(m, rows):  # one batch, four groups of scoring options
        pass
    assert [row.tokens for row in rows] == [by_hand(p, 30, pp, fp) for p, pp, fp in cases]
    assert rows[0].tokens != plain and rows[1].tokens != plain  # the penalties changed the text
    assert rows[2].tokens[0] == by_hand([START] + [plain[0]] * 20, 1, 0.0, 0.0)[0]  # the prompt was not counted
    with pytest.raises(ConfigError, match="presence_penalty=0.5 counts one sequence's tokens"):
        GenerateConfig(num_beams=2, presence_penalty=0.5)
    with pytest.raises(ConfigError, match="frequency_penalty=3.0 is invalid"):
        GenerateConfig(frequency_penalty=3.0)


def test_a_bad_word_is_banned_at_the_start_of_the_text_and_after_a_space():
    """With BPE, "the" inside a text is another token (" the") than at its start: both are banned, as vLLM does."""
    from lmforge.generate import with_token_ids
    from lmforge.tokenizer import train_bpe

    bpe = train_bpe(["the cat and the dog, then the end. " * 50], vocab_size=300)
    assert bpe.encode("the") != bpe.encode(" the")[1:]  # one word, two token sequences
    config = with_token_ids(GenerateConfig(bad_words=["the", " cat"], bad_words_ids=[[7]]), bpe)
    assert config.bad_words is None
    assert config.bad_words_ids == [[7], bpe.encode("the"), bpe.encode(" the"), bpe.encode("cat"), bpe.encode(" cat")]
    m = model(vocab_size=bpe.vocab_size, block_size=64)
    pushed = {seq[-1]: 8.0 for seq in config.bad_words_ids[1:]}  # the model would pick them: the bans must win
    gen = TextGenerator(m, bpe)
    for text in ("the", "and", "dog,"):
        prompt = prompt_ids(bpe, text)
        free = gen.complete([text], max_new_tokens=30, seed=1, logit_bias=pushed)[0][0].token_ids
        new = gen.complete([text], max_new_tokens=30, seed=1, logit_bias=pushed, bad_words=["the", "cat"])[0][0]
        ids = prompt + new.token_ids

        def found(seq, ids):  # an occurrence that ends in the generated tokens
            return any(ids[i:i + len(seq)] == seq for i in range(len(ids)) if i + len(seq) > len(prompt))

        assert any(found(seq, prompt + free) for seq in config.bad_words_ids[1:])
        assert not any(found(seq, ids) for seq in config.bad_words_ids[1:])


# ---------------------------------------------------------------------------------------------- guided choice
def guided_by_hand(m: GPT, prompt: list, choices: list, end_ids: list) -> list:
    """Reference: full forward passes, each step the argmax among the tokens that continue a choice (and the end
    ids once the tokens are a choice); stops at an end id or at a choice no other one extends."""
    out = []
    while True:
        logits = m(torch.tensor([prompt + out]))[0, -1]
        allowed = {c[len(out)] for c in choices if len(c) > len(out) and c[:len(out)] == out}
        allowed |= set(end_ids) if out in choices else set()
        token = max(allowed, key=lambda t: logits[t].item())
        if token in end_ids:
            return out
        out.append(token)
        if out in choices and not any(len(c) > len(out) and c[:len(out)] == out for c in choices):
            return out


@pytest.mark.parametrize("choices", [["yes", "no"], ["positive", "negative", "neutral"], ["a", "ab", "abc"],
                                     ["pos", "post", "positive"]])
def test_guided_choice_answers_with_one_choice_picking_the_best_allowed_token_each_step(choices):
    m = model(block_size=64)
    gen = TextGenerator(m, TOKENIZER)
    encoded = [TOKENIZER.encode(c) for c in choices]
    for text in ("Review: great", "x", "The quick brown"):
        got = gen.complete([text], greedy=True, guided_choice=choices, max_new_tokens=20)[0][0]
        assert got.text in choices and got.finish_reason == "stop"
        assert got.token_ids == guided_by_hand(m, prompt_ids(TOKENIZER, text), encoded, [END])
        # without any end id, a choice that no other one extends still ends the sequence
        ids = generate_batch_ids(m, [prompt_ids(TOKENIZER, text)], greedy=True, guided_choice_ids=encoded,
                                 max_new_tokens=20)[0][0]
        assert ids in encoded and ids == guided_by_hand(m, prompt_ids(TOKENIZER, text), encoded, [])
    answers = {c.text for c in gen.complete(["Review: great"], temperature=3.0, seed=0, guided_choice=choices,
                                            max_new_tokens=20, num_return_sequences=40)[0]}
    assert answers <= set(choices) and len(answers) >= 2  # sampling stays on the choices and reaches several


def test_guided_choice_is_refused_where_it_cannot_work():
    gen = TextGenerator(model(block_size=64), TOKENIZER)
    for options, words in [(dict(guided_choice=["a"], num_beams=2), "guided_choice picks the answer token by token"),
                           (dict(guided_choice=[]), "at least one"), (dict(guided_choice=["a", ""]), "non-empty"),
                           (dict(guided_choice=["a"], guided_choice_ids=[[100]]), "give one"),
                           (dict(guided_choice_ids=[[100, 400]]), "guided_choice_ids names the token id 400")]:
        with pytest.raises(ConfigError, match=words):
            gen.generate("ab", **options)


# ---------------------------------------------------------------------------------------------- guided regex
PATTERNS = {  # pattern: (what a prefix of a match looks like, Python's re)
    r"[0-9]{3}-[0-9]{4}": r"[0-9]{0,3}|[0-9]{3}-[0-9]{0,4}",
    r"(ab)+c?": r"(ab)*a?|(ab)+c",
    r"yes|no|maybe": r"|y|ye|yes|n|no|m|ma|may|mayb|maybe",
}


def regex_by_hand(m: GPT, prompt: list, pattern: str, end_ids: list) -> list:
    """Reference: full forward passes, each step the argmax among the tokens whose text keeps the text a prefix of a
    match (Python's re on a hand-written prefix pattern) and the end ids once the text matches; stops at an end id
    or at a match no token extends."""
    out, text = [], ""
    texts = {t: bytes([t - 3]).decode() for t in range(3, 3 + 128)}  # the byte tokenizer's ASCII tokens

    def extensions(text):
        return [t for t, s in texts.items() if re.fullmatch(PATTERNS[pattern], text + s)]

    while True:
        logits = m(torch.tensor([prompt + out]))[0, -1]
        allowed = extensions(text) + (end_ids if re.fullmatch(pattern, text) else [])
        token = max(allowed, key=lambda t: logits[t].item())
        if token in end_ids:
            return out
        out.append(token)
        text += texts[token]
        if re.fullmatch(pattern, text) and not extensions(text):
            return out


@pytest.mark.parametrize("pattern", list(PATTERNS))
def test_guided_regex_keeps_the_text_on_the_pattern_and_picks_the_best_allowed_token(pattern):
    m = model(block_size=64)
    gen = TextGenerator(m, TOKENIZER)
    for text in ("Call me at ", "x", "The quick brown"):
        got = gen.complete([text], greedy=True, guided_regex=pattern, max_new_tokens=20)[0][0]
        assert re.fullmatch(pattern, got.text) and got.finish_reason == "stop"
        assert got.token_ids == regex_by_hand(m, prompt_ids(TOKENIZER, text), pattern, [END])
        ids = generate_batch_ids(m, [prompt_ids(TOKENIZER, text)], greedy=True, guided_regex=pattern,
                                 tokenizer=TOKENIZER, max_new_tokens=20)[0][0]  # no end id: a full match ends it
        assert ids == regex_by_hand(m, prompt_ids(TOKENIZER, text), pattern, [])
    samples = gen.complete(["Call me at "], temperature=2.0, seed=0, guided_regex=pattern, max_new_tokens=20,
                           num_return_sequences=30)[0]
    assert all(re.fullmatch(pattern, c.text) and c.finish_reason == "stop" for c in samples)
    assert len({c.text for c in samples}) >= 2


def test_guided_regex_never_enters_a_state_from_which_no_match_is_reachable():
    """A lookahead gives the automaton dead states ("ac" here can never become a match): the token that leads into
    one is never allowed, however much the model wants it."""
    gen = TextGenerator(model(block_size=64), TOKENIZER)
    pushed = {ord("c") + 3: 30.0, ord("b") + 3: 5.0}
    for text in ("x", "abc"):
        out = gen.complete([text], greedy=True, guided_regex="ab*(?!c)", logit_bias=pushed, max_new_tokens=12)[0][0]
        assert re.fullmatch("ab*", out.text) and "c" not in out.text


def test_a_finite_regex_chooses_like_guided_choice_on_a_tokenizer_of_one_character_per_token():
    gen = TextGenerator(model(block_size=64), TOKENIZER)
    for text in ("Review: great", "x", "ab"):
        as_regex = gen.complete([text], greedy=True, guided_regex="yes|no|maybe|not sure")[0][0]
        as_choice = gen.complete([text], greedy=True, guided_choice=["yes", "no", "maybe", "not sure"])[0][0]
        assert as_regex == as_choice


def test_guided_regex_with_bpe_allows_any_tokenization_and_refuses_what_cannot_work():
    from lmforge.tokenizer import train_bpe, train_char

    bpe = train_bpe(["the cat and the dog, then the end. " * 50], vocab_size=300)
    gen = TextGenerator(model(vocab_size=bpe.vocab_size, block_size=64), bpe)
    pattern = r"(the|a) (cat|dog|end)\."
    samples = gen.complete(["the"], temperature=1.5, seed=1, guided_regex=pattern, num_return_sequences=12,
                           max_new_tokens=20)[0]
    assert all(re.fullmatch(pattern, c.text) and c.finish_reason == "stop" for c in samples)
    char = train_char(["abc abc"], vocab_size=270)
    with pytest.raises(ConfigError, match="no token of this vocabulary can begin a match"):
        TextGenerator(model(vocab_size=char.vocab_size, block_size=64), char).generate("a", guided_regex="é+")
    for options, words in [(dict(guided_regex="(?<=a)b"), "guided_regex='(?<=a)b' cannot be used"),
                           (dict(guided_regex="a", num_beams=2), "picks the answer token by token"),
                           (dict(guided_regex="a", guided_choice=["a"]), "both say what the answer may be"),
                           (dict(guided_regex="[a"), "cannot be used")]:
        with pytest.raises(ConfigError, match=re.escape(words)):
            gen.generate("the", **options)
    with pytest.raises(ConfigError, match="guided_regex and guided_json need the tokenizer"):
        generate_batch_ids(gen.model, [[5, 6]], guided_regex="a")


# ----------------------------------------------------------------------------------------- guided JSON schema
SCHEMA = {"type": "object", "properties": {
    "name": {"type": "string", "maxLength": 5}, "age": {"type": "integer"}, "ok": {"type": "boolean"},
    "mood": {"enum": ["happy", "sad", 3]}, "score": {"type": ["number", "null"]},
    "tags": {"type": "array", "items": {"type": "string", "maxLength": 2}, "minItems": 1, "maxItems": 3},
    "home": {"type": "object", "properties": {"city": {"const": "Rome"}, "zip": {"anyOf": [{"type": "integer"},
                                                                                          {"type": "null"}]}},
             "required": ["city", "zip"]}},
    "required": ["name", "age", "ok", "mood", "score", "tags", "home"]}


def follows(obj, schema) -> bool:
    """Whether a parsed JSON value has the shape of SCHEMA's kind of schema (every property, in order)."""
    if "const" in schema:
        return obj == schema["const"]
    if "enum" in schema:
        return obj in schema["enum"]
    if "anyOf" in schema:
        return any(follows(obj, s) for s in schema["anyOf"])
    kinds = schema["type"] if isinstance(schema["type"], list) else [schema["type"]]
    checks = {"string": lambda: isinstance(obj, str) and len(obj) <= schema.get("maxLength", len(obj)),
              "integer": lambda: isinstance(obj, int) and not isinstance(obj, bool),
              "number": lambda: isinstance(obj, (int, float)) and not isinstance(obj, bool),
              "boolean": lambda: isinstance(obj, bool), "null": lambda: obj is None,
              "array": lambda: isinstance(obj, list) and schema.get("minItems", 0) <= len(obj) <= schema.get(
                  "maxItems", len(obj)) and all(follows(x, schema["items"]) for x in obj),
              "object": lambda: isinstance(obj, dict) and list(obj) == list(schema["properties"]) and all(
                  follows(obj[k], s) for k, s in schema["properties"].items())}
    return any(checks[k]() for k in kinds)


def test_a_json_schema_becomes_a_regex_that_matches_exactly_its_documents_written_one_way():
    from lmforge.generate.json_schema import json_schema_regex

    pattern = json_schema_regex(SCHEMA)
    good = {"name": "Bo\u00e9", "age": -12, "ok": True, "mood": 3, "score": 1.5e-3, "tags": ["a", "\n"],
            "home": {"city": "Rome", "zip": None}}
    assert re.fullmatch(pattern, json.dumps(good)) and re.fullmatch(pattern, json.dumps(good, ensure_ascii=False))
    for bad in [{**good, "age": 1.5}, {**good, "name": "toolong"}, {**good, "tags": []}, {**good, "mood": "meh"},
                {k: good[k] for k in reversed(good)}, {**good, "home": {"city": "Paris", "zip": 1}}]:
        assert not re.fullmatch(pattern, json.dumps(bad)), bad
    assert not re.fullmatch(pattern, json.dumps(good, indent=1))  # one way of writing it: ", " and ": "


def test_guided_json_generates_documents_of_the_schema():
    gen = TextGenerator(model(block_size=256), TOKENIZER)
    samples = gen.complete(["Person: "], temperature=1.3, seed=0, guided_json=SCHEMA, max_new_tokens=250,
                           num_return_sequences=12)[0]
    done = [c for c in samples if c.finish_reason == "stop"]
    assert len(done) >= 8  # (unbounded integers may run out of budget)
    assert all(follows(json.loads(c.text), SCHEMA) for c in done)
    as_text = gen.complete(["Person: "], temperature=1.3, seed=0, guided_json=json.dumps(SCHEMA),
                           max_new_tokens=250, num_return_sequences=12)[0]
    assert as_text == samples  # a dict or its JSON text: the same schema
    for schema, words in [({"$ref": "#/defs/x"}, "refers to #/defs/x, which the schema does not hold"),
                          ({"type": "date"}, "has type 'date'"),
                          ({"type": "array", "minItems": 3, "maxItems": 1}, "maxItems 1 < minItems 3"),
                          ("{not json", "guided_json is not valid JSON"), ([1], "is [1]; a schema is a JSON object")]:
        with pytest.raises(ConfigError, match=re.escape(words)):
            gen.generate("x", guided_json=schema if not isinstance(schema, list) else json.dumps(schema))


def test_classifier_free_guidance_rows_batch_with_others_as_they_decode_alone():
    """A guided row decodes its unconditional side in the same batch: with unguided rows and rows of other scales
    and negative prompts, sampled or greedy, every row gets what it gets alone."""
    m = model(block_size=64)
    cases = [([START, 5, 6, 7], dict(guidance_scale=2.0, negative_prompt_ids=[START, 9])),
             ([START, 30, 31], {}),
             ([START, 40, 41, 42, 43, 44], dict(guidance_scale=0.5, negative_prompt_ids=[START, 1, 2, 3, 4, 5, 6])),
             ([START, 8], dict(guidance_scale=3.0))]
    for sampling in (dict(greedy=True), dict(seed=4, temperature=0.9, top_k=30)):
        rows = []
        for prompt, options in cases:
            config = GenerateConfig(max_new_tokens=25, num_return_sequences=2, **sampling, **options)
            rows += make_rows(m, [prompt], config, END, TOKENIZER)
        for _ in decode_rows(m, rows):
            pass
        alone = [generate_batch_ids(m, [prompt], end_id=END, tokenizer=TOKENIZER, max_new_tokens=25,
                                    num_return_sequences=2, **sampling, **options)[0] for prompt, options in cases]
        assert [[r.tokens for r in rows[i:i + 2]] for i in range(0, len(rows), 2)] == alone
        unguided = generate_batch_ids(m, [cases[0][0]], end_id=END, max_new_tokens=25, num_return_sequences=2,
                                      **sampling)[0]
        assert alone[0] != unguided  # guidance changed the text
    gen = TextGenerator(m, TOKENIZER)  # the negative prompt as text: <START> + its tokens; none given: <START>
    text = gen.generate("ab", max_new_tokens=20, seed=1, guidance_scale=2.0, negative_prompt="zz")
    assert text == gen.generate("ab", max_new_tokens=20, seed=1, guidance_scale=2.0,
                                negative_prompt_ids=[START] + TOKENIZER.encode("zz"))
    assert gen.generate("ab", max_new_tokens=20, seed=1, guidance_scale=2.0) == gen.generate(
        "ab", max_new_tokens=20, seed=1, guidance_scale=2.0, negative_prompt_ids=[START])
    for options, words in [(dict(negative_prompt="x"), "negative_prompt is only read by classifier-free guidance"),
                           (dict(guidance_scale=2.0, negative_prompt="x", negative_prompt_ids=[1]), "give one"),
                           (dict(guidance_scale=2.0, num_beams=2), "with beam search (num_beams=2)"),
                           (dict(guidance_scale=2.0, prompt_lookup_num_tokens=3), "with speculative decoding"),
                           (dict(guidance_scale=-1.0), "guidance_scale=-1.0 is invalid"),
                           (dict(guidance_scale=2.0, negative_prompt_ids=[]), "negative_prompt_ids=[] is invalid"),
                           (dict(guidance_scale=2.0, negative_prompt_ids=[999]), "names the token id 999")]:
        with pytest.raises(ConfigError, match=re.escape(words)):
            gen.generate("ab", max_new_tokens=5, **options)
    with pytest.raises(ConfigError, match="with speculative decoding \\(an assistant model\\)"):
        TextGenerator(m, TOKENIZER, assistant_model=model(block_size=64)).generate("ab", guidance_scale=2.0)


def test_int8_linear_has_one_scale_per_output_channel():
    """Rows of very different magnitudes (1e-3 to 10): each output channel is quantized with its own scale,
    max |w_row| / 127, so even the smallest row keeps its precision (a single scale for the whole tensor would
    round it to zero)."""
    from lmforge.generate import Int8Linear

    torch.manual_seed(0)
    linear = torch.nn.Linear(64, 8, bias=False)
    with torch.no_grad():
        linear.weight.mul_(torch.logspace(-3, 1, 8)[:, None])
    q = Int8Linear(linear)
    w = linear.weight.detach()
    assert q.qweight.dtype == torch.int8 and (q.qweight.abs().amax(dim=1) == 127).all()
    torch.testing.assert_close(q.scale.float(), (w.abs().amax(dim=1) / 127).to(torch.bfloat16).float())
    dequantized = q.qweight.float() * q.scale.float()[:, None]
    assert ((dequantized - w).abs() <= 0.51 * q.scale.float()[:, None] + 0.01 * w.abs()).all()
    x = torch.randn(5, 64)
    with torch.no_grad():
        got, exact = q(x), linear(x)
    per_channel = (got - exact).abs().amax(dim=0) / exact.abs().amax(dim=0)
    assert (per_channel < 0.03).all(), per_channel


def test_int8_linear_keeps_the_bias_in_fp32():
    from lmforge.generate import Int8Linear

    torch.manual_seed(0)
    linear = torch.nn.Linear(32, 6)
    with torch.no_grad():
        linear.bias.copy_(torch.tensor([3.0, -2.0, 0.5, 10.0, -7.0, 1.0]))
    q = Int8Linear(linear)
    assert q.bias.dtype == torch.float32 and torch.equal(q.bias, linear.bias.detach())
    x = torch.randn(4, 32)
    with torch.no_grad():
        assert (q(x) - linear(x)).abs().max() < 0.05  # the bias is added exactly; only the product is approximate


@pytest.mark.parametrize("beams", [1, 3])
def test_a_padded_vocabulary_never_generates_ids_the_tokenizer_lacks(beams):
    """A model with more rows than its tokenizer has tokens (a padded embedding, as many imported models have),
    its extra rows scored highest: sampling, greedy and beam search given the tokenizer draw only the tokenizer's
    ids, so the text always decodes; without the tokenizer (ids alone) the extra ids come up."""
    m = model(vocab_size=TOKENIZER.vocab_size + 13)
    with torch.no_grad():
        m.lm_head.weight[TOKENIZER.vocab_size:] = m.lm_head.weight[40] * 4  # far likelier than any real token
    generator = TextGenerator(m, TOKENIZER)
    for temperature in (0.0, 1.0):
        rows = generator.complete(["ab", "cd"], max_new_tokens=6, temperature=temperature, num_beams=beams, seed=3)
        ids = [t for completions in rows for c in completions for t in c.token_ids]
        assert ids and max(ids) < TOKENIZER.vocab_size
    assert max(generate_ids(m, [START, 40], max_new_tokens=6, temperature=0.0, num_beams=beams)[0]) \
        >= TOKENIZER.vocab_size


def test_the_kv_cache_holds_only_the_columns_the_rows_can_fill():
    """A cache of block_size columns for prompts of 3 tokens and 5 new ones would zero-fill memory nobody reads
    (1.2 GB for 16 rows of GPT-2 124M): it holds width + budget columns, block_size once they would pass it."""
    from lmforge.generate.rows import Sequences

    m = model(block_size=16)
    assert Sequences(m, [[START, 40, 41], [START, 42]], 5).cache.k[0].size(2) == 3 + 5
    assert Sequences(m, [[START, 40, 41]], 40).cache.k[0].size(2) == 16
    prompt = [START, 40, 41]
    assert generate_ids(m, prompt, temperature=0.0, max_new_tokens=5)[0] == full_forward_greedy(m, prompt, 5)


def test_decoding_runs_the_head_on_the_last_position_only():
    """The prompt's pass feeds the cache with every prompt position but scores only the last: the head sees one row
    per sequence at every step (not B x prompt length rows, all but one thrown away), and the tokens are greedy's."""
    m = model()
    rows = []
    handle = m.lm_head.register_forward_hook(lambda module, args, out: rows.append(args[0].shape))
    try:
        got = generate_batch_ids(m, [[START, 40, 41, 42, 43], [START, 44, 45]], temperature=0.0, max_new_tokens=4)
    finally:
        handle.remove()
    assert rows and all(shape == (2, 32) for shape in rows) and len(rows) == 4
    assert got[0][0] == full_forward_greedy(m, [START, 40, 41, 42, 43], 4)
