"""Token healing never puts a special token in the prompt: the special tokens' names (<END>, <PAD>, <START>) begin
with "<", but they are not text, so a prompt ending in "<" heals only to ordinary tokens (here: stays as it is).
A prompt of one token has nothing before it to heal with, and comes back as it was."""

import torch

from lmforge.config import ModelConfig
from lmforge.generate import prompt_ids
from lmforge.generate.healing import heal, tokens_beginning_with
from lmforge.model import GPT
from lmforge.tokenizer import byte_tokenizer, train_bpe


def test_special_tokens_are_never_candidates_though_their_names_begin_with_a_less_than_sign():
    for tok in (byte_tokenizer(), train_bpe(["a < b <= c, x<y, <tag> and <END> in text " * 40], vocab_size=300)):
        specials = tok.special_token_ids
        assert all(tok.id_to_bytes(s).startswith(b"<") for s in specials)  # what makes the case
        found = tokens_beginning_with(tok, b"<")
        want = sorted(u for u in range(tok.vocab_size) if u not in specials and tok.id_to_bytes(u).startswith(b"<"))
        assert found and sorted(found) == want
        assert not set(tokens_beginning_with(tok, b"")) & specials


def test_a_prompt_ending_in_a_less_than_sign_is_not_healed_into_the_end_token():
    tok = byte_tokenizer()
    torch.manual_seed(0)
    model = GPT(ModelConfig(vocab_size=tok.vocab_size, block_size=32, n_layer=1, n_head=2, n_embd=16)).eval()
    with torch.no_grad():  # the end token is by far the likeliest next token everywhere
        model.lm_head.weight[tok.end_id] = 10.0 * model.tok_emb.weight.detach().sum(0).sign()
    prompt = prompt_ids(tok, "if a <")
    with torch.no_grad():
        assert int(model(torch.tensor([prompt[:-1]]))[0, -1].argmax()) == tok.end_id
    assert heal(model, tok, prompt) == (prompt, b"")  # "<" is the only ordinary token beginning with "<"


def test_a_prompt_of_one_ordinary_token_is_not_healed():
    """Nothing comes before it to choose its replacement with (a tokenizer without a start token gives such
    prompts): it comes back as it was."""
    tok = train_bpe(["visit https://example.com or http://old.example.org, then the theme " * 40], vocab_size=300)
    torch.manual_seed(0)
    model = GPT(ModelConfig(vocab_size=tok.vocab_size, block_size=32, n_layer=1, n_head=2, n_embd=16)).eval()
    extended = [t for t in range(tok.vocab_size) if t not in tok.special_token_ids
                and len(tokens_beginning_with(tok, tok.id_to_bytes(t))) > 1]  # ("http": "https" begins with it)
    assert extended
    for t in extended[:5]:
        assert heal(model, tok, [t]) == ([t], b"")
