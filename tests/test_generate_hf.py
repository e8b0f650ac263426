"""Beam search, repetition penalty and no-repeat n-grams give Hugging Face's tokens on the same weights."""

import itertools
import warnings
from dataclasses import replace

import pytest
import torch

transformers = pytest.importorskip("transformers")

from lmforge.config import ModelConfig  # noqa: E402
from lmforge.errors import ConfigError  # noqa: E402
from lmforge.generate import GenerateConfig, beam_search, filter_logits, generate_batch_ids  # noqa: E402
from lmforge.interop.hf_gpt2 import to_hf_config, to_hf_state_dict  # noqa: E402
from lmforge.model import GPT  # noqa: E402
from sharp_attention import MAX_ENTROPY, attention_entropy, sharpen  # noqa: E402

PROMPTS = [[1, 2, 3], [4, 9, 9], [7, 7, 0]]  # equal lengths: HF's repetition/n-gram processors count pads


def build_pair(sharpness: float):
    """(lmforge GPT, GPT2LMHeadModel) with the same weights: a small vocabulary, logits scaled by sharpness, and
    sharp attention (checked), so that the tokens depend on which earlier tokens each position attends to."""
    config = ModelConfig(vocab_size=23, block_size=64, n_layer=2, n_head=2, n_embd=32, activation="gelu_tanh")
    torch.manual_seed(0)
    ours = sharpen(GPT(config)).eval()
    with torch.no_grad():
        ours.lm_head.weight.mul_(sharpness)  # tied: the embedding scales too, which is fine
    theirs = transformers.GPT2LMHeadModel(transformers.GPT2Config(**to_hf_config(config))).eval()
    theirs.load_state_dict(to_hf_state_dict(ours.state_dict(), config), strict=True)
    assert attention_entropy(theirs, torch.randint(0, config.vocab_size, (2, 32))) < MAX_ENTROPY
    return ours, theirs


@pytest.fixture(scope="module")
def pair():
    """Sharp logits: beams often end on the end token."""
    return build_pair(30.0)


@pytest.fixture(scope="module")
def soft_pair():
    """Softer logits: a repetition penalty changes the argmax often."""
    return build_pair(3.0)


def hf_generate(theirs, prompts, eos, new, **kwargs) -> list[list[list[int]]]:
    """HF's new tokens per prompt and returned sequence, cut before the first eos (an id or a list of ids), as
    lmforge returns them."""
    ends = eos if isinstance(eos, list) else [] if eos is None else [eos]
    ids = torch.tensor(prompts)
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        out = theirs.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new, do_sample=False,
                              eos_token_id=eos, pad_token_id=ends[0] if ends else 0, **kwargs)
    rows = [r[:min([r.index(e) for e in ends if e in r], default=len(r))] for r in out[:, ids.size(1):].tolist()]
    per_prompt = len(rows) // len(prompts)
    return [rows[i * per_prompt:(i + 1) * per_prompt] for i in range(len(prompts))]


@pytest.mark.parametrize("eos,length_penalty,early_stopping",
                         [(None, 1.0, False), (3, 1.0, False), (3, 2.0, False), (3, -1.0, False), (3, 0.0, True),
                          (3, 1.0, "never"), (3, 2.0, "never"), (3, 1.0, True)])
def test_beam_search_equals_hf(pair, eos, length_penalty, early_stopping):
    ours, theirs = pair
    options = dict(num_beams=4, length_penalty=length_penalty, early_stopping=early_stopping)
    expected = hf_generate(theirs, PROMPTS, eos, 12, num_return_sequences=4, **options)
    got = generate_batch_ids(ours, PROMPTS, end_id=eos, max_new_tokens=12, num_return_sequences=4, **options)
    assert got == expected
    if eos is not None:  # the end token did end some beams, so that path was compared too
        assert any(len(row) < 12 for rows in got for row in rows)


def test_beam_search_best_sequence_equals_hf_over_settings(pair):
    ours, theirs = pair
    for eos, lp, stop in itertools.product([None, 3], [0.5, 1.5], [False, True]):
        options = dict(num_beams=3, length_penalty=lp, early_stopping=stop)
        expected = hf_generate(theirs, PROMPTS[:2], eos, 9, **options)
        assert generate_batch_ids(ours, PROMPTS[:2], end_id=eos, max_new_tokens=9, **options) == expected, (eos, lp, stop)


@pytest.mark.parametrize("options", [dict(repetition_penalty=1.5), dict(repetition_penalty=0.7),
                                     dict(no_repeat_ngram_size=2), dict(repetition_penalty=1.3, no_repeat_ngram_size=3)],
                         ids=["penalty-1.5", "penalty-0.7", "ngram-2", "both"])
def test_repetition_processors_equal_hf(soft_pair, options):
    ours, theirs = soft_pair
    greedy = generate_batch_ids(ours, PROMPTS, temperature=0.0, max_new_tokens=30, **options)
    assert greedy == hf_generate(theirs, PROMPTS, None, 30, **options)
    if options.get("repetition_penalty", 2.0) > 1.0:  # the option mattered (below 1, repeats were there already)
        assert greedy != generate_batch_ids(ours, PROMPTS, temperature=0.0, max_new_tokens=30)
    beams = generate_batch_ids(ours, PROMPTS, end_id=3, num_beams=3, max_new_tokens=15, **options)
    assert beams == hf_generate(theirs, PROMPTS, 3, 15, num_beams=3, **options)


def test_beam_search_with_one_beam_is_greedy(pair):
    ours, _ = pair
    for prompt in PROMPTS:
        greedy = generate_batch_ids(ours, [prompt], temperature=0.0, max_new_tokens=20)[0]
        assert beam_search(ours, [prompt], GenerateConfig(num_beams=1, max_new_tokens=20)) == [greedy]
        greedy = generate_batch_ids(ours, [prompt], end_id=3, temperature=0.0, max_new_tokens=20)[0]
        assert beam_search(ours, [prompt], GenerateConfig(num_beams=1, max_new_tokens=20, early_stopping=True),
                           end_ids=[3]) == [greedy]


def test_speculative_greedy_equals_hf_assisted_generation(soft_pair):
    """Hugging Face's assisted generation (a draft model) and prompt lookup decoding, and lmforge's speculation,
    give the same tokens (plain greedy's) on the same weights."""
    ours, theirs = soft_pair
    torch.manual_seed(5)
    small = GPT(ModelConfig(vocab_size=23, block_size=64, n_layer=1, n_head=2, n_embd=16, activation="gelu_tanh")).eval()
    small_hf = transformers.GPT2LMHeadModel(transformers.GPT2Config(**to_hf_config(small.config))).eval()
    small_hf.load_state_dict(to_hf_state_dict(small.state_dict(), small.config), strict=True)
    for prompt in PROMPTS:
        want = hf_generate(theirs, [prompt], None, 30)[0]
        assert hf_generate(theirs, [prompt], None, 30, assistant_model=small_hf)[0] == want
        assert hf_generate(theirs, [prompt], None, 30, prompt_lookup_num_tokens=4)[0] == want
        assert generate_batch_ids(ours, [prompt], greedy=True, max_new_tokens=30, assistant_model=small)[0] == want
        assert generate_batch_ids(ours, [prompt], greedy=True, max_new_tokens=30, prompt_lookup_num_tokens=4)[0] == want


# ------------------------------------------------------------------ constraints: Hugging Face's logits processors
@pytest.mark.parametrize("minimum", [2, 6])
def test_min_new_tokens_equals_hf_and_holds_back_every_end_id(soft_pair, minimum):
    """Two end ids (the end token and a stop token id): neither ends a sequence before min_new_tokens, greedy and
    with beams, as Hugging Face's MinNewTokensLengthLogitsProcessor."""
    ours, theirs = soft_pair
    options = dict(end_id=20, stop_token_ids=[16], max_new_tokens=12)
    plain = generate_batch_ids(ours, PROMPTS, temperature=0.0, **options)
    assert any(len(rows[0]) < minimum for rows in plain)  # without it, an end id came earlier
    got = generate_batch_ids(ours, PROMPTS, temperature=0.0, min_new_tokens=minimum, **options)
    assert got == hf_generate(theirs, PROMPTS, [20, 16], 12, min_new_tokens=minimum)
    assert all(len(rows[0]) >= minimum for rows in got)
    beam = dict(num_beams=3, num_return_sequences=3, length_penalty=0.0, early_stopping=True)  # short ones win
    assert any(len(row) < minimum for rows in generate_batch_ids(ours, PROMPTS, **beam, **options) for row in rows)
    beams = generate_batch_ids(ours, PROMPTS, min_new_tokens=minimum, **beam, **options)
    assert beams == hf_generate(theirs, PROMPTS, [20, 16], 12, min_new_tokens=minimum, **beam)
    assert all(len(row) >= minimum for rows in beams for row in rows)


def test_bad_words_ids_equal_hf_and_never_appear(soft_pair):
    """Banned sequences of one, two and three tokens, each taken from the unconstrained greedy output."""
    ours, theirs = soft_pair
    plain = generate_batch_ids(ours, PROMPTS, temperature=0.0, max_new_tokens=20)
    bad = [[plain[0][0][0]], plain[1][0][4:7], plain[2][0][:2]]
    got = generate_batch_ids(ours, PROMPTS, temperature=0.0, max_new_tokens=20, bad_words_ids=bad)
    assert got == hf_generate(theirs, PROMPTS, None, 20, bad_words_ids=bad)
    assert all(g != p for g, p in zip(got, plain))  # every prompt's output met a ban
    for prompt, rows in zip(PROMPTS, got):
        text = prompt + rows[0]
        assert not any(text[i:i + len(b)] == b for b in bad for i in range(len(text)))
    beams = generate_batch_ids(ours, PROMPTS, end_id=3, num_beams=3, max_new_tokens=15, bad_words_ids=bad)
    assert beams == hf_generate(theirs, PROMPTS, 3, 15, num_beams=3, bad_words_ids=bad)


def test_logit_bias_equals_hf_sequence_bias_of_single_tokens(soft_pair):
    ours, theirs = soft_pair
    plain = generate_batch_ids(ours, PROMPTS, temperature=0.0, max_new_tokens=20)
    bias = {plain[0][0][0]: -100.0, plain[1][0][0]: -2.5, 7: 4.0}
    got = generate_batch_ids(ours, PROMPTS, temperature=0.0, max_new_tokens=20, logit_bias=bias)
    sequence_bias = [[[t], b] for t, b in bias.items()]
    assert got == hf_generate(theirs, PROMPTS, None, 20, sequence_bias=sequence_bias)
    assert got != plain and plain[0][0][0] not in got[0][0]
    both = generate_batch_ids(ours, PROMPTS, temperature=0.0, max_new_tokens=20, logit_bias=bias,
                              repetition_penalty=1.4)  # the bias comes first: the penalty reads the biased sign
    assert both == hf_generate(theirs, PROMPTS, None, 20, sequence_bias=sequence_bias, repetition_penalty=1.4)
    beams = generate_batch_ids(ours, PROMPTS, end_id=3, num_beams=3, max_new_tokens=15, logit_bias=bias,
                               repetition_penalty=1.4)
    assert beams == hf_generate(theirs, PROMPTS, 3, 15, num_beams=3, sequence_bias=sequence_bias,
                                repetition_penalty=1.4)


def test_sequence_bias_equals_hf_and_biases_only_where_a_sequence_completes(soft_pair):
    """Sequences of one, two and three tokens taken from the unconstrained greedy output: -100 on a longer one
    bans it where its prefix was written (and only there), a positive bias pulls its last token in after its prefix;
    greedy and beams as Hugging Face's SequenceBiasLogitsProcessor; the dict and Hugging Face's list are one
    setting."""
    ours, theirs = soft_pair
    plain = generate_batch_ids(ours, PROMPTS, temperature=0.0, max_new_tokens=20)
    bias = {tuple(plain[1][0][4:7]): -100.0, tuple(plain[2][0][:2]): -100.0, (plain[2][0][1],): -2.0,
            (plain[0][0][0], 5): 8.0}
    as_hf = [[list(ids), b] for ids, b in bias.items()]
    got = generate_batch_ids(ours, PROMPTS, temperature=0.0, max_new_tokens=20, sequence_bias=bias)
    assert got == hf_generate(theirs, PROMPTS, None, 20, sequence_bias=as_hf)
    assert got == generate_batch_ids(ours, PROMPTS, temperature=0.0, max_new_tokens=20, sequence_bias=as_hf)
    assert all(g != p for g, p in zip(got, plain))  # every prompt's output met a bias
    for prompt, rows in zip(PROMPTS, got):
        text = prompt + rows[0]
        banned = [list(ids) for ids, b in bias.items() if b == -100.0]
        assert not any(text[i:i + len(b)] == b for b in banned for i in range(len(text)))
    assert got[0][0][:2] == [plain[0][0][0], 5] and plain[0][0][1] != 5  # pulled in after its prefix
    beams = generate_batch_ids(ours, PROMPTS, end_id=3, num_beams=3, max_new_tokens=15, sequence_bias=bias)
    assert beams == hf_generate(theirs, PROMPTS, 3, 15, num_beams=3, sequence_bias=as_hf)


def test_suppressed_tokens_equal_hf_and_begin_suppress_bans_only_the_first(soft_pair):
    ours, theirs = soft_pair
    plain = generate_batch_ids(ours, PROMPTS, temperature=0.0, max_new_tokens=20)
    firsts = sorted({rows[0][0] for rows in plain})
    begin = generate_batch_ids(ours, PROMPTS, temperature=0.0, max_new_tokens=20, begin_suppress_tokens=firsts)
    assert begin == hf_generate(theirs, PROMPTS, None, 20, begin_suppress_tokens=firsts)
    assert all(rows[0][0] not in firsts for rows in begin)
    for prompt, rows in zip(PROMPTS, begin):  # after the first token, plain greedy decoding
        assert rows[0][1:] == generate_batch_ids(ours, [prompt + rows[0][:1]], temperature=0.0, max_new_tokens=19)[0][0]
    never = generate_batch_ids(ours, PROMPTS, temperature=0.0, max_new_tokens=20, suppress_tokens=firsts)
    assert never == hf_generate(theirs, PROMPTS, None, 20, suppress_tokens=firsts)
    assert not any(t in firsts for rows in never for t in rows[0])
    beams = generate_batch_ids(ours, PROMPTS, end_id=3, num_beams=3, max_new_tokens=15, suppress_tokens=firsts[:1],
                               begin_suppress_tokens=firsts[1:])
    assert beams == hf_generate(theirs, PROMPTS, 3, 15, num_beams=3, suppress_tokens=firsts[:1],
                                begin_suppress_tokens=firsts[1:])


@pytest.mark.parametrize("decay", [(2, 1.5), (0, 3.0), (5, 1.2)])
def test_exponential_decay_length_penalty_equals_hf_and_ends_sooner(soft_pair, decay):
    """Two end ids (the end token and a stop token id): their scores grow after `start` new tokens, greedy and
    with beams, as Hugging Face's ExponentialDecayLengthPenalty."""
    ours, theirs = soft_pair
    options = dict(end_id=20, stop_token_ids=[16], max_new_tokens=25)
    plain = generate_batch_ids(ours, PROMPTS, temperature=0.0, **options)
    got = generate_batch_ids(ours, PROMPTS, temperature=0.0, exponential_decay_length_penalty=decay, **options)
    assert got == hf_generate(theirs, PROMPTS, [20, 16], 25, exponential_decay_length_penalty=decay)
    assert sum(len(rows[0]) for rows in got) < sum(len(rows[0]) for rows in plain)
    assert all(rows[0] == p[0][:len(rows[0])] for rows, p in zip(got, plain) if len(rows[0]) <= decay[0])
    beams = generate_batch_ids(ours, PROMPTS, num_beams=3, exponential_decay_length_penalty=decay, **options)
    assert beams == hf_generate(theirs, PROMPTS, [20, 16], 25, num_beams=3, exponential_decay_length_penalty=decay)


def test_max_time_spent_takes_one_step_as_hf_does(soft_pair):
    ours, theirs = soft_pair
    assert generate_batch_ids(ours, PROMPTS, greedy=True, max_new_tokens=20, max_time=1e-9) == \
        hf_generate(theirs, PROMPTS, None, 20, max_time=1e-9)
    assert [len(rows[0]) for rows in hf_generate(theirs, PROMPTS, None, 20, max_time=1e-9)] == [1, 1, 1]


def test_complete_logprobs_equal_hfs_transition_scores_of_the_raw_logits():
    """complete(logprobs=k): each new token's log probability is Hugging Face's compute_transition_scores over
    output_logits (normalize_logits), with a repetition penalty choosing the tokens (the scores are the model's, not
    the penalized ones); the k alternatives are the k likeliest under the same log-softmax."""
    from lmforge.generate import complete
    from lmforge.tokenizer import byte_tokenizer

    tokenizer = byte_tokenizer()
    config = ModelConfig(vocab_size=tokenizer.vocab_size, block_size=64, n_layer=2, n_head=2, n_embd=32,
                         activation="gelu_tanh")
    torch.manual_seed(0)
    ours = GPT(config).eval()
    theirs = transformers.GPT2LMHeadModel(transformers.GPT2Config(**to_hf_config(config))).eval()
    theirs.load_state_dict(to_hf_state_dict(ours.state_dict(), config), strict=True)
    got = complete(ours, tokenizer, ["To be", "or not"], logprobs=3, greedy=True, max_new_tokens=12,
                   repetition_penalty=1.3, suppress_tokens=[tokenizer.end_id])
    for prompt, (c,) in zip(["To be", "or not"], got):
        ids = torch.tensor([[tokenizer.start_id] + tokenizer.encode(prompt)])
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")
            out = theirs.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=12, do_sample=False,
                                  repetition_penalty=1.3, suppress_tokens=[tokenizer.end_id], output_logits=True,
                                  return_dict_in_generate=True, eos_token_id=None, pad_token_id=0)
        assert out.sequences[0, ids.size(1):].tolist() == c.token_ids and len(c.logprobs) == 12
        want = theirs.compute_transition_scores(out.sequences, out.logits, normalize_logits=True)[0]
        assert [lp.token for lp in c.logprobs] == c.token_ids
        assert [lp.logprob for lp in c.logprobs] == pytest.approx(want.tolist(), abs=1e-4)
        for lp, logits in zip(c.logprobs, out.logits):
            top = logits[0].float().log_softmax(-1).topk(3)
            assert [t for t, _ in lp.top] == top.indices.tolist()
            assert [v for _, v in lp.top] == pytest.approx(top.values.tolist(), abs=1e-4)
    assert complete(ours, tokenizer, ["x"], max_new_tokens=3)[0][0].logprobs is None
    with pytest.raises(ConfigError, match="logprobs with beam search"):
        complete(ours, tokenizer, ["x"], logprobs=1, num_beams=2, max_new_tokens=3)


def test_top_h_equals_hf_and_ignores_tokens_that_are_already_out():
    """top_h keeps the tokens Hugging Face's TopHLogitsWarper keeps (the 100 most likely weighed), also where earlier
    filters cut tokens (-inf); on such a row it keeps what it keeps without them (probability 0 adds no entropy)."""
    from transformers.generation import logits_process as lp

    torch.manual_seed(0)
    logits = torch.randn(8, 160) * torch.linspace(0.5, 4.0, 8)[:, None]  # flat to peaked rows, 160 > 100 tokens
    for h in (0.1, 0.4, 0.8, 0.95, 1.0):
        kept = torch.isfinite(filter_logits(logits, top_h=h))
        assert torch.equal(kept, torch.isfinite(lp.TopHLogitsWarper(h)(None, logits.clone()))), h
        assert kept.sum(-1).min() >= 1 and (kept.sum(-1) > 1).any()
    assert (torch.isfinite(filter_logits(logits, top_h=0.8)).sum(-1) < 100).all()
    narrow = logits[:, :60].clone()
    cut = narrow.clone()
    cut[:, :20] = -torch.inf
    for h in (0.4, 0.8):
        assert torch.equal(torch.isfinite(filter_logits(cut, top_h=h))[:, 20:],
                           torch.isfinite(filter_logits(narrow[:, 20:], top_h=h)))
        assert torch.equal(torch.isfinite(filter_logits(cut, top_h=h)),
                           torch.isfinite(lp.TopHLogitsWarper(h)(None, cut.clone())))


def test_sampling_filters_equal_hf_warpers_alone_and_in_hfs_order():
    """typical_p, epsilon_cutoff and eta_cutoff remove exactly the tokens Hugging Face's warpers remove, on logits
    some earlier filter already cut (-inf) and on raw ones; all filters together, in its order."""
    from transformers.generation import logits_process as lp

    from lmforge.generate.processors import sampling_logits

    torch.manual_seed(0)
    logits = torch.randn(8, 60) * torch.linspace(0.5, 4.0, 8)[:, None]  # flat to peaked rows
    logits[:2, :20] = -torch.inf
    cases = [(dict(typical_p=p), lp.TypicalLogitsWarper(p)) for p in (0.2, 0.5, 0.9, 0.99)]
    cases += [(dict(epsilon=e), lp.EpsilonLogitsWarper(e)) for e in (3e-4, 0.01, 0.05, 0.3)]  # 0.3: all
    cases += [(dict(eta=e), lp.EtaLogitsWarper(e)) for e in (3e-4, 0.01, 0.05)]
    for kwargs, warper in cases:
        kept = torch.isfinite(filter_logits(logits, **kwargs))
        assert torch.equal(kept, torch.isfinite(warper(None, logits.clone()))), kwargs
        assert kept.sum(-1).min() >= 1 and (kept.sum(-1) < torch.isfinite(logits).sum(-1)).any(), kwargs  # it cut
    config = GenerateConfig(temperature=0.8, top_h=0.95, top_k=40, top_p=0.95, min_p=0.02, typical_p=0.9,
                            epsilon_cutoff=0.003, eta_cutoff=0.002)
    chain = [lp.TemperatureLogitsWarper(0.8), lp.TopHLogitsWarper(0.95), lp.TopKLogitsWarper(40),
             lp.TopPLogitsWarper(0.95),
             lp.MinPLogitsWarper(0.02), lp.TypicalLogitsWarper(0.9), lp.EpsilonLogitsWarper(0.003),
             lp.EtaLogitsWarper(0.002)]
    theirs = logits.clone()
    for warper in chain:
        theirs = warper(None, theirs)
    ours = sampling_logits(logits, config)
    assert torch.equal(torch.isfinite(ours), torch.isfinite(theirs))
    assert torch.allclose(ours[torch.isfinite(ours)], theirs[torch.isfinite(theirs)])


@pytest.mark.parametrize("new", [0, 1, 2, 5])
def test_process_scores_equals_hfs_processors_in_their_order(new):
    """Every constraint at once on random scores and histories: the values HF's processor list gives, in its order
    (bias, sequence bias, repetition penalty, n-gram ban, bad words, min_new_tokens, exponential decay length
    penalty, suppressed tokens, begin-suppressed tokens)."""
    from transformers.generation import logits_process as lp

    from lmforge.generate import process_scores

    torch.manual_seed(1)
    B, V, L = 6, 30, 9
    tokens = torch.randint(0, 12, (B, L))  # small ids: repeats, n-grams and bad-word prefixes happen
    scores = torch.randn(B, V) * 3
    bias = {1: 2.5, 2: -4.0, 5: 6.0, 11: -1.0}
    bad = [[3], [4, 6], [tokens[0, -2].item(), tokens[0, -1].item(), 8]]
    sequences = [[[9], 1.5], [[tokens[1, -1].item(), 2], -3.0], [[tokens[2, -2].item(), tokens[2, -1].item(), 10], 5.0]]
    config = GenerateConfig(logit_bias=bias, sequence_bias=sequences, repetition_penalty=1.3, no_repeat_ngram_size=2,
                            bad_words_ids=bad, min_new_tokens=1, exponential_decay_length_penalty=[1, 1.6],
                            suppress_tokens=[13, 14], begin_suppress_tokens=[15, 16], temperature=0.0)
    generated = [tokens[b, L - new:].tolist() for b in range(B)]
    ours = process_scores(scores, tokens, None, config, generated, [0, 7])
    chain = [lp.SequenceBiasLogitsProcessor([[[t], b] for t, b in bias.items()] + sequences),
             lp.RepetitionPenaltyLogitsProcessor(1.3), lp.NoRepeatNGramLogitsProcessor(2),
             lp.NoBadWordsLogitsProcessor(bad, eos_token_id=None),
             lp.MinNewTokensLengthLogitsProcessor(L - new, 1, [0, 7]),
             lp.ExponentialDecayLengthPenalty((1, 1.6), [0, 7], L - new),
             lp.SuppressTokensLogitsProcessor([13, 14]), lp.SuppressTokensAtBeginLogitsProcessor([15, 16], L - new)]
    theirs = scores.clone()
    for processor in chain:
        theirs = processor(tokens, theirs)
    assert torch.equal(torch.isinf(ours), torch.isinf(theirs))
    assert torch.allclose(ours[torch.isfinite(ours)], theirs[torch.isfinite(theirs)])
    assert torch.isinf(ours[:, [0, 7]]).all() == (new < 1)  # the end ids are banned only before min_new_tokens
    assert torch.isinf(ours[:, [15, 16]]).all() == (new == 0) and torch.isinf(ours[:, [13, 14]]).all()
    if new > 1:  # past start: the end ids' scores grew (those not banned)
        before = process_scores(scores, tokens, None, replace(config, exponential_decay_length_penalty=None),
                                generated, [0, 7])[:, [0, 7]]
        finite = before.isfinite()
        assert finite.sum() > 6 and (ours[:, [0, 7]][finite] > before[finite]).all()


@pytest.mark.parametrize("prompt, negative, scale, options", [
    ([4, 9, 9, 1], [2], 3.0, {}),
    ([7, 7, 0, 1, 2, 3], [5, 5, 5], 0.5, {}),  # below 1: toward the negative prompt
    ([1, 2, 3], [6], 2.0, {"repetition_penalty": 1.3}),  # guidance first: the penalty acts on log probabilities
    ([1, 2, 3], None, 2.0, {}),  # HF's default unconditional side: the prompt's last token
    ([3, 1, 4, 1, 5], [9, 2, 6, 5, 3, 5], 1.5, {"no_repeat_ngram_size": 2}),
])
def test_classifier_free_guidance_equals_hf(soft_pair, prompt, negative, scale, options):
    ours, theirs = soft_pair
    given = {} if negative is None else {"negative_prompt_ids": torch.tensor([negative])}
    expected = hf_generate(theirs, [prompt], None, 20, guidance_scale=scale, **given, **options)
    got = generate_batch_ids(ours, [prompt], max_new_tokens=20, greedy=True, guidance_scale=scale,
                             negative_prompt_ids=negative or prompt[-1:], **options)
    assert got == expected
    assert got != generate_batch_ids(ours, [prompt], max_new_tokens=20, greedy=True, **options)  # it mattered


@pytest.mark.parametrize("penalty", [3.0, 0.5])
def test_encoder_repetition_penalty_equals_hf(soft_pair, penalty):
    """The prompt's tokens, favoured (above 1) or avoided (below 1), as Hugging Face's
    EncoderRepetitionPenaltyLogitsProcessor does it with the prompt as a decoder's encoder input; greedy, with
    beams, and padded rows of different lengths each as alone."""
    ours, theirs = soft_pair
    plain = generate_batch_ids(ours, PROMPTS, greedy=True, max_new_tokens=20)
    got = generate_batch_ids(ours, PROMPTS, greedy=True, max_new_tokens=20, encoder_repetition_penalty=penalty)
    assert got == hf_generate(theirs, PROMPTS, None, 20, encoder_repetition_penalty=penalty)
    assert got != plain  # the penalty changed tokens
    in_prompt = [sum(t in p for t in rows[0]) for p, rows in zip(PROMPTS, got)]
    before = [sum(t in p for t in rows[0]) for p, rows in zip(PROMPTS, plain)]
    assert (sum(in_prompt) > sum(before)) == (penalty > 1)
    beams = generate_batch_ids(ours, PROMPTS, end_id=3, num_beams=3, max_new_tokens=15,
                               encoder_repetition_penalty=penalty)
    assert beams == hf_generate(theirs, PROMPTS, 3, 15, num_beams=3, encoder_repetition_penalty=penalty)
    ragged = [[5], [1, 2, 3, 4, 8]]  # left-padded together: only each row's own prompt counts
    alone = [generate_batch_ids(ours, [p], greedy=True, max_new_tokens=12, encoder_repetition_penalty=penalty)[0]
             for p in ragged]
    assert generate_batch_ids(ours, ragged, greedy=True, max_new_tokens=12, encoder_repetition_penalty=penalty) == alone


def test_min_length_counts_the_prompt_and_equals_hf(soft_pair):
    """min_length bans the end ids while prompt + new tokens are shorter (Hugging Face's MinLengthLogitsProcessor:
    the prompt counts), greedy and with beams."""
    ours, theirs = soft_pair
    options = dict(end_id=20, stop_token_ids=[16], max_new_tokens=25)
    plain = generate_batch_ids(ours, PROMPTS, greedy=True, **options)
    assert min(len(rows[0]) for rows in plain) < 6  # some rows end early without it
    got = generate_batch_ids(ours, PROMPTS, greedy=True, min_length=9, **options)
    assert got == hf_generate(theirs, PROMPTS, [20, 16], 25, min_length=9)
    assert all(len(rows[0]) >= 9 - len(p) for p, rows in zip(PROMPTS, got))
    assert got != plain
    assert generate_batch_ids(ours, PROMPTS, greedy=True, min_new_tokens=6, **options) == got  # 3 + 6 = 9
    beams = generate_batch_ids(ours, PROMPTS, num_beams=3, min_length=9, **options)
    assert beams == hf_generate(theirs, PROMPTS, [20, 16], 25, num_beams=3, min_length=9)


def test_forced_tokens_equal_hf(soft_pair):
    """forced_bos_token_id is the first new token (Hugging Face forces it when the sequence is one token long, so
    one-token prompts compare), forced_eos_token_id the last the budget allows; greedy and with beams."""
    ours, theirs = soft_pair
    prompts = [[1], [4], [7]]
    plain = generate_batch_ids(ours, prompts, greedy=True, max_new_tokens=12)
    forced = next(t for t in range(23) if all(rows[0][0] != t for rows in plain))
    got = generate_batch_ids(ours, prompts, greedy=True, max_new_tokens=12, forced_bos_token_id=forced)
    assert got == hf_generate(theirs, prompts, None, 12, forced_bos_token_id=forced)
    assert all(rows[0][0] == forced for rows in got)
    for prompt, rows in zip(prompts, got):  # then plain greedy decoding after it
        assert rows[0][1:] == generate_batch_ids(ours, [prompt + [forced]], greedy=True, max_new_tokens=11)[0][0]
    ends = generate_batch_ids(ours, PROMPTS, greedy=True, max_new_tokens=12, end_id=20, forced_eos_token_id=20)
    want = hf_generate(theirs, PROMPTS, 20, 12, forced_eos_token_id=20)
    assert ends == want
    assert all(len(rows[0]) <= 11 for rows in ends)  # every row stopped on the end token, the last budget place
    as_listed = generate_batch_ids(ours, PROMPTS, greedy=True, max_new_tokens=12, forced_eos_token_id=[5, 6])
    assert as_listed == hf_generate(theirs, PROMPTS, None, 12, forced_eos_token_id=[5, 6])
    assert all(rows[0][-1] in (5, 6) and len(rows[0]) == 12 for rows in as_listed)
    beams = generate_batch_ids(ours, prompts, end_id=3, num_beams=3, max_new_tokens=10, forced_bos_token_id=forced,
                               forced_eos_token_id=3, num_return_sequences=3)
    assert beams == hf_generate(theirs, prompts, 3, 10, num_beams=3, forced_bos_token_id=forced, forced_eos_token_id=3,
                                num_return_sequences=3)
    assert all(row[0] == forced for rows in beams for row in rows)


def test_forced_tokens_hold_in_speculative_and_sampled_decoding(soft_pair):
    """Speculation keeps plain decoding's tokens with forced first and last tokens; sampled rows take them too."""
    ours, _ = soft_pair
    options = dict(max_new_tokens=14, end_id=20, forced_bos_token_id=11, forced_eos_token_id=20, min_length=9)
    want = generate_batch_ids(ours, PROMPTS, greedy=True, **options)
    assert all(rows[0][0] == 11 and len(rows[0]) <= 13 for rows in want)
    assert generate_batch_ids(ours, PROMPTS, greedy=True, prompt_lookup_num_tokens=3, **options) == want
    sampled = generate_batch_ids(ours, PROMPTS, temperature=1.5, seed=3, num_return_sequences=4, **options)
    assert all(row[0] == 11 and 6 <= len(row) <= 13 for rows in sampled for row in rows)


@pytest.mark.parametrize("new,budget", [(0, 1), (2, 3), (2, 5), (4, 5)])
def test_prompt_penalty_min_length_and_forced_end_equal_hfs_processors(new, budget):
    """On random scores and histories, in Hugging Face's order: the encoder repetition penalty over the prompt (the
    tokens before the last `new`), the repetition penalty, min_length over prompt + new tokens, and the forced end
    when one token of the budget is left (HF's ForcedEOSTokenLogitsProcessor at max_length - 1)."""
    from transformers.generation import logits_process as lp

    from lmforge.generate import process_scores

    torch.manual_seed(2)
    B, V, L = 5, 30, 8
    tokens = torch.randint(0, 12, (B, L))
    scores = torch.randn(B, V) * 3
    config = GenerateConfig(encoder_repetition_penalty=2.0, repetition_penalty=1.3, min_length=L + 1,
                            forced_eos_token_id=[7, 9], temperature=0.0)
    generated = [tokens[b, L - new:].tolist() for b in range(B)]
    ours = process_scores(scores, tokens, None, config, generated, [0, 7], budgets=[budget] * B)
    chain = [lp.EncoderRepetitionPenaltyLogitsProcessor(2.0, tokens[:, :L - new]),
             lp.RepetitionPenaltyLogitsProcessor(1.3),
             lp.MinLengthLogitsProcessor(L + 1, [0, 7]), lp.ForcedEOSTokenLogitsProcessor(L - new + budget, [7, 9])]
    theirs = scores.clone()
    for processor in chain:
        theirs = processor(tokens, theirs)
    assert torch.equal(torch.isinf(ours), torch.isinf(theirs))
    assert torch.allclose(ours[torch.isfinite(ours)], theirs[torch.isfinite(theirs)])
    forced = new == budget - 1
    assert torch.isfinite(ours).sum(dim=1).tolist() == ([2] * B if forced else [V - 2] * B)
    if not forced:  # the prompt's tokens rose, the others are the repetition penalty's alone
        alone = process_scores(scores, tokens, None, replace(config, encoder_repetition_penalty=1.0), generated,
                               [0, 7], budgets=[budget] * B)
        prompt = torch.zeros(B, V, dtype=torch.bool).scatter_(1, tokens[:, :L - new], True) & alone.isfinite()
        assert (ours[prompt] > alone[prompt]).all() and torch.equal(ours[~prompt], alone[~prompt])


def test_rows_with_their_own_budgets_and_options_are_forced_as_alone(soft_pair):
    """One batch, two groups of scoring options, and rows of one group with different budgets (as the server batches
    jobs): each row's forced last token falls at its own budget, as when it is decoded alone."""
    from lmforge.generate import decode_rows, make_rows

    ours, _ = soft_pair
    jobs = [(PROMPTS[0], dict(max_new_tokens=6, forced_eos_token_id=[5])),
            (PROMPTS[1], dict(max_new_tokens=11, forced_eos_token_id=[5])),
            (PROMPTS[2] + [1, 2], dict(max_length=12, forced_eos_token_id=[5], repetition_penalty=1.4)),
            (PROMPTS[0], dict(max_new_tokens=9, forced_bos_token_id=4, repetition_penalty=1.4))]
    rows = [make_rows(ours, [prompt], GenerateConfig(greedy=True, **options))[0] for prompt, options in jobs]
    for _ in decode_rows(ours, rows):
        pass
    alone = [generate_batch_ids(ours, [prompt], greedy=True, **options)[0][0] for prompt, options in jobs]
    assert [row.tokens for row in rows] == alone
    assert [len(t) for t in alone] == [6, 11, 7, 9] and [t[-1] for t in alone[:3]] == [5, 5, 5] and alone[3][0] == 4


def test_forced_tokens_and_prompt_penalty_refuse_what_cannot_hold(soft_pair):
    ours, _ = soft_pair
    for options, message in [(dict(forced_bos_token_id=3, guided_choice_ids=[[1, 2]]), "forces a token into it"),
                             (dict(forced_eos_token_id=[4], suppress_tokens=[4]), "both forced and banned"),
                             (dict(forced_bos_token_id=4, begin_suppress_tokens=[4]), "is also in begin_suppress"),
                             (dict(forced_eos_token_id=[]), "forces no token"),
                             (dict(encoder_repetition_penalty=0.0), "encoder_repetition_penalty=0.0 is invalid"),
                             (dict(min_length=-1), "min_length=-1 is invalid")]:
        with pytest.raises(ConfigError, match=message):
            GenerateConfig(**options)
    assert GenerateConfig(forced_eos_token_id=[4, 5], suppress_tokens=[4]).forced_eos_token_id == [4, 5]  # 5 is left
    assert GenerateConfig(forced_eos_token_id=7).forced_eos_token_id == [7]  # Hugging Face's single id
    with pytest.raises(ConfigError, match="forced_eos_token_id names the token id 23, outside"):
        generate_batch_ids(ours, PROMPTS, max_new_tokens=3, forced_eos_token_id=[5, 23])
