"""Beam search, repetition penalty and no-repeat n-grams give Hugging Face's tokens on the same weights."""

import itertools
import warnings

import pytest
import torch

transformers = pytest.importorskip("transformers")

from lmforge.config import ModelConfig  # noqa: E402
from lmforge.generate import GenerateConfig, beam_search, generate_batch_ids  # noqa: E402
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
    """HF's new tokens per prompt and returned sequence, cut before eos (as lmforge returns them)."""
    ids = torch.tensor(prompts)
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        out = theirs.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new, do_sample=False,
                              eos_token_id=eos, pad_token_id=0 if eos is None else eos, **kwargs)
    rows = [r[:r.index(eos)] if eos in r else r for r in out[:, ids.size(1):].tolist()]
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
