"""Token healing: let the first new token finish the word the prompt ends in.

A tokenizer cuts "The site is https://" into other tokens than "The site is http" + "s://": a prompt ending in
"http" ends on a token that in training was almost always followed by something else than the rest of a URL, since
"https" is one token of its own. The model, shown that rare boundary, continues badly. Healing backs up over the
prompt's last token and puts in its place the likeliest token (the model's greedy choice, given the tokens before)
whose bytes begin with that token's bytes: "http" may become "https" or stay "http". The continuation then
starts from the healed prompt, and the text returned begins with the bytes the healed token added ("s"), so the
prompt's text followed by the new text is what was generated (Hugging Face's token_healing; guidance's).
"""

from __future__ import annotations

import bisect
import weakref
from typing import Any, Sequence

import torch

from lmforge.model import GPT

# a tokenizer -> its ordinary tokens as (bytes, id), sorted by bytes: the tokens that begin with some bytes are one
# run of this list (read once per tokenizer: a server heals every request)
_SORTED: "weakref.WeakKeyDictionary[Any, list[tuple[bytes, int]]]" = weakref.WeakKeyDictionary()


def tokens_beginning_with(tokenizer: Any, prefix: bytes) -> list[int]:
    """The ids of the tokens (special ones left out) whose bytes begin with `prefix`, in the order of their bytes."""
    table = _SORTED.get(tokenizer)
    if table is None:
        special = tokenizer.special_token_ids
        table = _SORTED[tokenizer] = sorted((tokenizer.id_to_bytes(t), t) for t in range(tokenizer.vocab_size)
                                            if t not in special)
    start = bisect.bisect_left(table, (prefix,))
    out = []
    for raw, token in table[start:]:
        if not raw.startswith(prefix):
            break
        out.append(token)
    return out


@torch.inference_mode()
def heal(model: GPT, tokenizer: Any, prompt: Sequence[int]) -> tuple[list[int], bytes]:
    """(`prompt` with its last token replaced by the likeliest token, given the tokens before it, whose bytes begin
    with that token's bytes; the bytes the new last token adds to the prompt's text). The prompt comes back as it
    was (and b"") when it has fewer than 2 tokens, ends on a special token, or no other token begins with its last."""
    prompt = list(prompt)
    if len(prompt) < 2 or prompt[-1] in tokenizer.special_token_ids:
        return prompt, b""
    tail = tokenizer.id_to_bytes(prompt[-1])
    candidates = tokens_beginning_with(tokenizer, tail)  # the last token itself among them
    if len(candidates) < 2:
        return prompt, b""
    x = torch.tensor([prompt[:-1]], dtype=torch.long, device=model.tok_emb.weight.device)  # (1, T - 1)
    logits = model(x)[0, -1]  # (V,) the next token's, after the tokens before the last
    best = candidates[int(logits[torch.tensor(candidates, device=logits.device)].argmax())]
    return prompt[:-1] + [best], tokenizer.id_to_bytes(best)[len(tail):]
