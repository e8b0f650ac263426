"""Speculative decoding: greedy gives plain greedy's tokens (and Hugging Face's assisted generation's), sampling
keeps plain sampling's distribution (exact enumeration against a chi-square), stop rules and logprobs hold, bad
combinations are refused."""

import functools
import itertools
import random

import pytest
import torch
from scipy.stats import chisquare

from lmforge.config import ModelConfig
from lmforge.errors import ConfigError
from lmforge.generate import GenerateConfig, complete, generate_batch_ids, make_rows
from lmforge.generate.api import decode_events
from lmforge.generate.decode import decode_rows
from lmforge.generate.speculative import PromptLookup, distributions, early_exit
from lmforge.model import GPT
from lmforge.tokenizer import byte_tokenizer

TOKENIZER = byte_tokenizer()


def sentences(n: int, seed: int) -> str:
    """Text from a small grammar: repeats enough that a draft is often right, varies enough that it is often wrong."""
    rng = random.Random(seed)
    who, does, what = ["the cat", "a dog", "my friend", "the king"], ["sees", "eats", "likes", "finds"], \
        ["the mat.", "a bone.", "the sea.", "his crown.", "a fish."]
    return " ".join(f"{rng.choice(who)} {rng.choice(does)} {rng.choice(what)}" for _ in range(n))


@functools.lru_cache(maxsize=None)
def trained(n_layer: int, n_embd: int, steps: int, seed: int, pos_encoding: str = "learned") -> GPT:
    """A small byte-level model trained for a few steps on the grammar's text (a model with something to say)."""
    torch.manual_seed(seed)
    config = ModelConfig(vocab_size=TOKENIZER.vocab_size, block_size=32, n_layer=n_layer, n_head=2, n_embd=n_embd,
                         pos_encoding=pos_encoding)
    model = GPT(config)
    data = torch.tensor(TOKENIZER.encode(sentences(400, seed)))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        starts = torch.randint(0, len(data) - 33, (16,), generator=g)
        x = torch.stack([data[s:s + 33] for s in starts.tolist()])
        loss = torch.nn.functional.cross_entropy(model(x[:, :-1]).flatten(0, 1), x[:, 1:].flatten())
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()


@pytest.fixture(scope="module")
def target():
    return trained(2, 48, 150, seed=0)


@pytest.fixture(scope="module")
def draft():
    return trained(1, 16, 60, seed=1)


PROMPTS = ["the cat sees", "my friend likes a fish. the", "a"]


def ids(text: str) -> list[int]:
    return [TOKENIZER.start_id] + TOKENIZER.encode(text)


def speculated(model, prompt, config, assistant=None):
    """(new tokens, drafted, accepted) of one prompt decoded by speculation."""
    rows = make_rows(model, [prompt], config, TOKENIZER.end_id, TOKENIZER)
    for _ in decode_events(model, rows, config, assistant):
        pass
    return rows[0].tokens, rows[0].drafted, rows[0].accepted


B = 3  # byte ids start after the 3 special tokens
CONSTRAINTS = {"logit_bias": {ord("e") + B: -3.0, ord("s") + B: 2.0}, "bad_words_ids": [[ord("t") + B, ord("h") + B]],
               "min_new_tokens": 20, "stop_token_ids": [ord(" ") + B]}
HF_CONSTRAINTS = {"sequence_bias": {(ord("t") + B, ord("h") + B): -4.0, (ord("a") + B,): 1.5,
                                    (ord(" ") + B, ord("k") + B): 3.0},
                  "suppress_tokens": [ord("z") + B], "begin_suppress_tokens": [ord(" ") + B, ord("t") + B],
                  "exponential_decay_length_penalty": [40, 1.2]}  # (the end token's score grows)


@pytest.mark.parametrize("pos_encoding", ["learned", "rope"])
@pytest.mark.parametrize("options", [{}, {"repetition_penalty": 1.3}, {"no_repeat_ngram_size": 3},
                                     {"presence_penalty": 0.8, "frequency_penalty": 0.4}, CONSTRAINTS, HF_CONSTRAINTS],
                         ids=["plain", "repetition", "ngram", "occurrence", "constraints", "hf-constraints"])
def test_greedy_speculation_gives_plain_greedy_tokens_past_the_window(pos_encoding, options, draft):
    model = trained(2, 48, 150, seed=0, pos_encoding=pos_encoding)
    small = trained(1, 16, 60, seed=1, pos_encoding=pos_encoding)
    totals = {"lookup": [0, 0], "draft": [0, 0]}
    for text, k in itertools.product(PROMPTS, (1, 4, 9)):
        plain = GenerateConfig(greedy=True, max_new_tokens=70, **options)  # 70 > block_size 32: the window slides
        want = generate_batch_ids(model, [ids(text)], plain, end_id=TOKENIZER.end_id)[0][0]  # as speculated's rows
        for name, config, assistant in [
                ("lookup", GenerateConfig(greedy=True, max_new_tokens=70, prompt_lookup_num_tokens=k, **options),
                 None),
                ("draft", GenerateConfig(greedy=True, max_new_tokens=70, num_assistant_tokens=k, **options), small)]:
            got, drafted, accepted = speculated(model, ids(text), config, assistant)
            assert got == want, (name, text, k)
            totals[name][0] += drafted
            totals[name][1] += accepted
    for name, (drafted, accepted) in totals.items():  # both paths ran: guesses kept and guesses refused
        assert 0 < accepted < drafted, (name, drafted, accepted)


@pytest.mark.parametrize("options", [{}, {"presence_penalty": 1.2, "frequency_penalty": 0.6,
                                          "repetition_penalty": 1.3}, CONSTRAINTS, HF_CONSTRAINTS])
def test_the_model_as_its_own_draft_keeps_every_guess(target, options):
    """The draft scores its guesses with the row's penalties and bans (those over the generated tokens and the
    early end included), as the check does: the model drafting for itself has every guess kept."""
    config = GenerateConfig(greedy=True, max_new_tokens=60, num_assistant_tokens=5, **options)
    got, drafted, accepted = speculated(target, ids("the king"), config, target)
    assert got == generate_batch_ids(target, [ids("the king")], greedy=True, max_new_tokens=60,
                                     end_id=TOKENIZER.end_id, **options)[0][0]
    assert drafted == accepted > 0


def test_the_heuristic_schedule_grows_after_every_guess_kept_and_shrinks_after_a_miss(target, draft):
    """num_assistant_tokens_schedule heuristic (Hugging Face's): the model drafting for itself keeps every guess, so
    each step guesses 2 more and more guesses are made than at a constant 5 (fewer passes); a weaker draft misses,
    so its guesses shrink and fewer are made than at a constant 8; greedy tokens stay plain greedy's either way."""
    prompt, plain = ids("the king"), dict(greedy=True, max_new_tokens=60)
    want = generate_batch_ids(target, [prompt], end_id=TOKENIZER.end_id, **plain)[0][0]
    counts = {}
    for schedule in ("constant", "heuristic"):
        config = GenerateConfig(**plain, num_assistant_tokens=5, num_assistant_tokens_schedule=schedule)
        got, drafted, accepted = speculated(target, prompt, config, target)
        assert got == want and drafted == accepted
        counts[schedule] = drafted
    assert counts["heuristic"] > counts["constant"]
    for schedule in ("constant", "heuristic"):
        config = GenerateConfig(**plain, num_assistant_tokens=8, num_assistant_tokens_schedule=schedule)
        got, drafted, accepted = speculated(target, prompt, config, draft)
        assert got == want and accepted < drafted
        counts[schedule] = drafted
    assert counts["heuristic"] < counts["constant"]


def test_an_assistant_stops_guessing_after_its_first_unsure_guess(target, draft):
    """assistant_confidence_threshold (Hugging Face's): a draft ends after the first guess it gives a probability
    below the threshold (that guess kept); greedy tokens stay plain greedy's, and a higher threshold guesses less."""
    from lmforge.generate.speculative import DraftModel

    prompt, seq, sure = ids("the king"), ids("the king"), []
    for _ in range(8):  # the draft's own greedy guesses and the probability it gives each, by hand
        with torch.no_grad():
            p = draft(torch.tensor([seq]))[0, -1].softmax(-1)
        seq.append(int(p.argmax()))
        sure.append(float(p[seq[-1]]))
    cut_short = 0
    for threshold in (0.2, 0.4, 0.6, 0.8):
        config = GenerateConfig(greedy=True, num_assistant_tokens=8, assistant_confidence_threshold=threshold)
        with torch.no_grad():
            guesses, _ = DraftModel(draft).propose(prompt, 8, config, None)
        first_unsure = next((j for j, q in enumerate(sure[:-1]) if q < threshold), 7)
        assert guesses == seq[len(prompt):len(prompt) + first_unsure + 1], threshold
        cut_short += len(guesses) < 8
    assert cut_short >= 2
    want = generate_batch_ids(target, [prompt], greedy=True, max_new_tokens=60, end_id=TOKENIZER.end_id)[0][0]
    counts = []
    for threshold in (None, 0.3, 0.6):
        config = GenerateConfig(greedy=True, max_new_tokens=60, num_assistant_tokens=8,
                                assistant_confidence_threshold=threshold)
        got, drafted, _ = speculated(target, prompt, config, draft)
        assert got == want, threshold
        counts.append(drafted)
    assert counts[0] > counts[1] > counts[2], counts


@pytest.mark.parametrize("options", [{"stop_strings": ["."]}, {"stop_strings": ["king", "dog"]},
                                     {"stop_token_ids": [ord(" ") + 3]}, {"max_new_tokens": 3},
                                     {"max_new_tokens": 1}, {"max_length": 40},
                                     {"stop_strings": ["."], "min_new_tokens": 25},
                                     {"stop_token_ids": [ord(" ") + 3], "min_new_tokens": 9},
                                     {"guided_choice": [" a dog", " a fish", " the king", " the kingdom"]},
                                     {"guided_regex": r"( [a-z]+){2,5}\."}])
def test_stop_rules_and_budgets_end_sequences_as_plain_decoding_does(target, draft, options):
    base = {"greedy": True, "max_new_tokens": 50, **options}
    # each prompt alone: a padded batch slides its window when its longest row fills it, speculation row by row
    want = [complete(target, TOKENIZER, [p], GenerateConfig(**base))[0] for p in PROMPTS]
    assert complete(target, TOKENIZER, PROMPTS, GenerateConfig(**base, prompt_lookup_num_tokens=6)) == want
    assert complete(target, TOKENIZER, PROMPTS, GenerateConfig(**base, num_assistant_tokens=6),
                    assistant_model=draft) == want


def test_rows_speculate_in_turn_and_a_row_its_reader_ends_is_not_stepped_again(target, draft):
    """Each step holds the kept tokens of every unfinished row (n streams interleave, as the server needs them); a
    row its reader ends (a server's cancel) is not stepped again; every other row's tokens (seeded sampling) are
    those its prompt gets alone."""
    config = GenerateConfig(max_new_tokens=30, seed=5, top_k=8, num_return_sequences=3, num_assistant_tokens=4)
    rows = make_rows(target, [ids("the cat"), ids("a dog")], config, TOKENIZER.end_id, TOKENIZER)
    steps = decode_events(target, rows, config, draft)
    assert {e.row for e in next(steps)} == set(range(6))
    rows[1].finish, cut = "cancelled", len(rows[1].tokens)
    assert 1 not in {e.row for events in steps for e in events} and len(rows[1].tokens) == cut
    for p, prompt in enumerate(["the cat", "a dog"]):
        alone = make_rows(target, [ids(prompt)], config, TOKENIZER.end_id, TOKENIZER)
        for _ in decode_events(target, alone, config, draft):
            pass
        kept = [j for j in range(3) if 3 * p + j != 1]
        assert [alone[j].tokens for j in kept] == [rows[3 * p + j].tokens for j in kept]


def test_logprobs_of_each_kept_token_equal_plain_decodings(target, draft):
    config = GenerateConfig(greedy=True, max_new_tokens=40, num_assistant_tokens=4)
    plain, fast = (make_rows(target, [ids("the cat")], config, TOKENIZER.end_id, TOKENIZER) for _ in range(2))
    plain[0].top_logprobs = fast[0].top_logprobs = 3
    want = [e for events in decode_rows(target, plain) for e in events]
    got = [e for events in decode_events(target, fast, config, draft) for e in events]
    assert [e.token for e in got] == [e.token for e in want]
    for a, b in zip(got, want):
        assert a.logprobs.token == b.logprobs.token and a.logprobs.logprob == pytest.approx(b.logprobs.logprob, abs=1e-4)
        assert [t for t, _ in a.logprobs.top] == [t for t, _ in b.logprobs.top]


def test_prompt_lookup_proposes_what_followed_the_latest_match():
    lookup, config = PromptLookup(max_ngram=2), GenerateConfig()
    assert lookup.propose([5, 6, 7, 8, 5, 6, 9, 5, 6], 3, config, None) == ([9, 5, 6], None)  # latest "5 6"
    assert lookup.propose([1, 2, 3, 4, 3], 5, config, None) == ([4, 3], None)  # no "4 3" before: one token, "3"
    assert lookup.propose([1, 2, 3], 4, config, None) == ([], None)  # nothing repeats


# ------------------------------------------------------------------------------------ sampling
VOCAB, NEW = 6, 3


def sampling_pair():
    torch.manual_seed(3)
    config = ModelConfig(vocab_size=VOCAB, block_size=16, n_layer=1, n_head=2, n_embd=16)
    model, other = GPT(config).eval(), GPT(config).eval()
    with torch.no_grad():  # sharper logits, so the draft's q differs from the model's p
        model.lm_head.weight.mul_(4.0)
        other.lm_head.weight.mul_(6.0)
    return model, other


def exact_distribution(model: GPT, prompt: list[int], config: GenerateConfig) -> dict[tuple, float]:
    """P(continuation) for every NEW-token continuation: the product of plain decoding's per-step distributions."""
    out = {}
    with torch.no_grad():
        for seq in itertools.product(range(VOCAB), repeat=NEW):
            logits = model(torch.tensor([prompt + list(seq)]))[0, len(prompt) - 1:-1]  # (NEW, V)
            p = distributions(logits, prompt, seq, config)
            out[seq] = float(torch.prod(p[torch.arange(NEW), torch.tensor(seq)]))
    return out


def chi_square_p(samples: list[tuple], exact: dict[tuple, float]) -> float:
    """p-value of the samples under the exact distribution (cells expected under 5 pooled into one)."""
    n = len(samples)
    counts = {s: 0 for s in exact}
    for s in samples:
        counts[s] += 1
    big = [s for s in exact if exact[s] * n >= 5]
    observed = [counts[s] for s in big] + [n - sum(counts[s] for s in big)]
    expected = [exact[s] * n for s in big] + [n - sum(exact[s] * n for s in big)]
    return float(chisquare(observed, expected).pvalue)


@pytest.mark.parametrize("options", [{}, {"temperature": 0.7, "top_k": 4, "repetition_penalty": 1.5}])
def test_speculative_sampling_keeps_the_models_distribution(options):
    model, other = sampling_pair()
    prompt = [0, 1, 2, 0, 1, 2, 0, 1]  # a repeating prompt: prompt lookup guesses 2, 0, 1
    n = 2000
    base = dict(max_new_tokens=NEW, seed=11, num_return_sequences=n, **options)
    exact = exact_distribution(model, prompt, GenerateConfig(**base))
    guessed = {}
    for name, config, assistant in [("lookup", GenerateConfig(**base, prompt_lookup_num_tokens=3), None),
                                    ("draft", GenerateConfig(**base, num_assistant_tokens=3), other),
                                    ("unsure-draft", GenerateConfig(**base, num_assistant_tokens=3,
                                                                    assistant_confidence_threshold=0.5), other)]:
        rows = make_rows(model, [prompt], config)
        for _ in decode_events(model, rows, config, assistant):
            pass
        drafted, accepted = sum(r.drafted for r in rows), sum(r.accepted for r in rows)
        assert 0.05 * drafted < accepted < 0.95 * drafted, (name, drafted, accepted)  # both paths ran, often
        assert chi_square_p([tuple(r.tokens) for r in rows], exact) > 1e-4, name
        guessed[name] = drafted
    assert guessed["unsure-draft"] < guessed["draft"]  # drafts cut short at an unsure guess: the law holds still
    plain = make_rows(model, [prompt], GenerateConfig(**base))  # the test's own sensitivity: a wrong law fails it
    for _ in decode_rows(model, plain):
        pass
    assert chi_square_p([tuple(r.tokens) for r in plain], exact) > 1e-4
    wrong = exact_distribution(other, prompt, GenerateConfig(**base))
    assert chi_square_p([tuple(r.tokens) for r in plain], wrong) < 1e-4


def test_early_exit_speculative_sampling_keeps_the_models_distribution():
    """The model's own first layer as the draft (assistant_early_exit): plain sampling's law, by a chi-square
    against the exact enumeration, on a 2-layer model whose first layer alone predicts otherwise."""
    torch.manual_seed(4)
    model = GPT(ModelConfig(vocab_size=VOCAB, block_size=16, n_layer=2, n_head=2, n_embd=16)).eval()
    with torch.no_grad():  # a second layer with its say: the draft is often, not always, refused
        model.lm_head.weight.mul_(5.0)
        model.blocks[1].mlp.proj.weight.mul_(30.0)
    prompt, n = [0, 1, 2, 0, 1, 2, 0, 1], 2000
    base = dict(max_new_tokens=NEW, seed=12, num_return_sequences=n, temperature=0.9)
    exact = exact_distribution(model, prompt, GenerateConfig(**base))
    config = GenerateConfig(**base, assistant_early_exit=1, num_assistant_tokens=3)
    rows = make_rows(model, [prompt], config)
    for _ in decode_events(model, rows, config):
        pass
    drafted, accepted = sum(r.drafted for r in rows), sum(r.accepted for r in rows)
    assert 0.05 * drafted < accepted < 0.95 * drafted, (drafted, accepted)
    assert chi_square_p([tuple(r.tokens) for r in rows], exact) > 1e-4
    assert chi_square_p([tuple(r.tokens) for r in rows], exact_distribution(early_exit(model, 1), prompt,
                                                                            GenerateConfig(**base))) < 1e-4


@pytest.mark.parametrize("options", [{}, CONSTRAINTS, {"num_assistant_tokens_schedule": "heuristic",
                                                      "assistant_confidence_threshold": 0.5}])
def test_early_exit_greedy_gives_plain_greedys_tokens(options):
    """Self-speculation with the first 1 or 2 of 3 layers as the draft: plain greedy's tokens, guesses made and
    kept, and the model itself untouched (its layers, its config, its weights shared, not copied)."""
    model = trained(3, 48, 150, seed=2)
    for layers in (1, 2):
        for prompt in PROMPTS:
            config = GenerateConfig(greedy=True, max_new_tokens=40, **options)
            want = generate_batch_ids(model, [ids(prompt)], config, end_id=TOKENIZER.end_id)[0][0]
            tokens, drafted, accepted = speculated(model, ids(prompt),
                                                   GenerateConfig(greedy=True, max_new_tokens=40,
                                                                  assistant_early_exit=layers, **options))
            assert tokens == want and drafted > 0 and accepted > 0, (layers, prompt)
    assert len(model.blocks) == 3 and model.config.n_layer == 3
    cut = early_exit(model, 2)
    assert [b.attn.qkv.weight.data_ptr() for b in cut.blocks] == \
        [b.attn.qkv.weight.data_ptr() for b in model.blocks[:2]]
    assert cut.lm_head is model.lm_head and cut.norm_f is model.norm_f and cut.config.n_layer == 2


def test_early_exit_draft_reads_the_first_layers_as_hf_llama_does():
    """early_exit(model, n) gives the logits Hugging Face's LlamaForCausalLM gives with num_hidden_layers = n (what its
    EarlyExitCandidateGenerator sets), on the same weights; and not the whole model's."""
    transformers = pytest.importorskip("transformers")
    from lmforge.interop import hf_llama

    config = ModelConfig(vocab_size=41, block_size=24, n_layer=3, n_head=4, n_kv_head=2, n_embd=32, norm="rmsnorm",
                         mlp="swiglu", pos_encoding="rope", bias=False, tie_embeddings=False)
    torch.manual_seed(5)
    ours = GPT(config).eval()
    theirs = transformers.LlamaForCausalLM(transformers.LlamaConfig(**hf_llama.to_hf_config(config))).eval()
    theirs.load_state_dict(hf_llama.to_hf_state_dict(ours.state_dict(), config), strict=True)
    idx = torch.randint(0, config.vocab_size, (2, 24))
    with torch.no_grad():
        whole = ours(idx)
        for layers in (1, 2):
            theirs.model.config.num_hidden_layers = layers
            want = theirs(idx).logits
            got = early_exit(ours, layers)(idx)
            assert (got - want).abs().max() < 1e-4 and (whole - want).abs().max() > 1e-2, layers


# ------------------------------------------------------------------------------------ refusals
def test_bad_combinations_are_refused(target, draft):
    with pytest.raises(ConfigError, match="beam search"):
        GenerateConfig(num_beams=2, prompt_lookup_num_tokens=3)
    with pytest.raises(ConfigError, match="beam search"):
        generate_batch_ids(target, [ids("a")], num_beams=2, assistant_model=draft)
    with pytest.raises(ConfigError, match="give one"):
        generate_batch_ids(target, [ids("a")], prompt_lookup_num_tokens=3, assistant_model=draft)
    with pytest.raises(ConfigError, match="prompt_lookup_num_tokens=0 is invalid"):
        GenerateConfig(prompt_lookup_num_tokens=0)
    with pytest.raises(ConfigError, match="prompt lookup guesses without one"):
        GenerateConfig(prompt_lookup_num_tokens=3, assistant_confidence_threshold=0.4)
    with pytest.raises(ConfigError, match="assistant_confidence_threshold=1.5 is invalid"):
        GenerateConfig(assistant_confidence_threshold=1.5)
    with pytest.raises(ConfigError, match="assistant_early_exit=2 is not below the model's 2 layers"):
        generate_batch_ids(target, [ids("a")], assistant_early_exit=2)
    with pytest.raises(ConfigError, match="assistant_early_exit and prompt_lookup_num_tokens both guess"):
        GenerateConfig(assistant_early_exit=1, prompt_lookup_num_tokens=3)
    with pytest.raises(ConfigError, match="assistant_early_exit speculates on one sequence"):
        GenerateConfig(assistant_early_exit=1, num_beams=2)
    with pytest.raises(ConfigError, match="both guess tokens: give one"):
        generate_batch_ids(target, [ids("a")], assistant_early_exit=1, assistant_model=draft)
    other_vocab = GPT(ModelConfig(vocab_size=50, block_size=32, n_layer=1, n_head=2, n_embd=16)).eval()
    with pytest.raises(ConfigError, match="same tokenizer"):
        generate_batch_ids(target, [ids("a")], assistant_model=other_vocab)
    classifier = GPT(ModelConfig(vocab_size=TOKENIZER.vocab_size, block_size=32, n_layer=1, n_head=2, n_embd=16,
                                 head="classify", num_labels=2)).eval()
    with pytest.raises(ConfigError, match="causal language model"):
        generate_batch_ids(target, [ids("a")], assistant_model=classifier)


# ------------------------------------------------------------------------------------ the CLI
def test_cli_speculates_with_an_assistant_run_or_prompt_lookup_and_prints_plain_greedys_text(tmp_path, capsys,
                                                                                               target, draft):
    from lmforge.checkpoint import save_checkpoint
    from lmforge.cli import main
    from lmforge.config import RunConfig

    TOKENIZER.save(tmp_path / "tokenizer.json")
    for name, m in [("big", target), ("small", draft)]:
        save_checkpoint(tmp_path / name, 10, m, None, RunConfig(model=m.config), {},
                        tokenizer_file=tmp_path / "tokenizer.json")
    big, small = str(tmp_path / "big"), str(tmp_path / "small")
    plain = ["generate", big, "--prompt", "the cat", "--greedy", "--max-new-tokens", "40", "--device", "cpu"]
    assert main(plain) == 0
    want = capsys.readouterr().out
    assert want.startswith("the cat") and len(want) > len("the cat\n")
    for extra in (["--assistant-model", small, "--num-assistant-tokens", "3"], ["--prompt-lookup-num-tokens", "5"],
                  ["--assistant-early-exit", "1", "--num-assistant-tokens-schedule", "heuristic"]):
        assert main(plain + extra) == 0
        assert capsys.readouterr().out == want, extra
    # another tokenizer (same vocabulary size, other special tokens) is refused in one line, before generating
    other = byte_tokenizer(("<BOS>", "<EOS>", "<PAD>"))
    assert other.vocab_size == TOKENIZER.vocab_size
    other.save(tmp_path / "other.json")
    save_checkpoint(tmp_path / "other", 10, draft, None, RunConfig(model=draft.config), {},
                    tokenizer_file=tmp_path / "other.json")
    assert main(plain + ["--assistant-model", str(tmp_path / "other")]) == 2
    err = capsys.readouterr().err.strip()
    assert "another tokenizer" in err and len(err.splitlines()) == 1
    assert main(plain + ["--assistant-model", str(tmp_path / "missing")]) == 2
    assert len(capsys.readouterr().err.strip().splitlines()) == 1
