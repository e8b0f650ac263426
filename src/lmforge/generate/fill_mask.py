"""Fill-mask for an encoder (model.causal: false, trained with train.objective mlm): what goes in each <MASK>.

    MaskFiller(model, tokenizer).fill_mask(text, top_k) -> [one list per <MASK>][(token, probability), ...]

The text is encoded as the encoder's training documents were, <START> text <END>, with the tokenizer's mask id
where the text writes the mask token's name (the only place a special name in a text becomes its id: text
never produces it otherwise). One forward pass sees the whole text; each masked position's logits go through a
softmax in fp32, and the most probable tokens come back with their probabilities. Each <MASK> is filled on its
own (from the others still masked), as BERT's fill-mask does.
"""

from __future__ import annotations

from typing import Any

import torch

from lmforge.errors import ConfigError
from lmforge.model import GPT


class MaskFiller:
    """An encoder and its tokenizer: .fill_mask(text, top_k)."""

    def __init__(self, model: GPT, tokenizer: Any) -> None:
        if model.config.causal or model.config.head != "lm":
            raise ConfigError("fill-mask needs an encoder (model.causal false) trained with train.objective mlm; this "
                              "model is a " + ("decoder: use generate" if model.config.causal else "classifier: use "
                                                                                                  "classify"))
        if tokenizer.mask_id is None:
            raise ConfigError("this model's tokenizer has no mask token: train the encoder on data prepared with "
                              "--mask-token")
        self.model = model.eval()
        self.tokenizer = tokenizer

    def encode(self, text: str) -> list[int]:
        """<START> text <END> with the mask id wherever the text writes the mask token's name."""
        tok = self.tokenizer
        pieces = text.split(tok.mask_token)
        if len(pieces) == 1:
            raise ConfigError(f"the text holds no {tok.mask_token}: write {tok.mask_token} where a token should be "
                              f"predicted, e.g. \"to be or not to {tok.mask_token}\"")
        ids = [] if tok.start_id is None else [tok.start_id]
        for i, piece in enumerate(pieces):
            if i:
                ids.append(tok.mask_id)
            ids += tok.encode(piece)
        ids.append(tok.end_id)
        if len(ids) > self.model.config.block_size:
            raise ConfigError(f"the text is {len(ids)} tokens with <START> and <END>, more than the model's context "
                              f"of {self.model.config.block_size}: shorten it")
        return ids

    @torch.no_grad()
    def probabilities(self, text: str) -> tuple[list[int], torch.Tensor]:
        """(the masked positions, (masks, V) fp32 probabilities of each token there)."""
        ids = self.encode(text)
        device = next(self.model.parameters()).device
        logits = self.model(torch.tensor([ids], device=device))[0]  # (T, V)
        where = [t for t, i in enumerate(ids) if i == self.tokenizer.mask_id]
        return where, torch.softmax(logits[where].float(), dim=-1).cpu()

    def fill_mask(self, text: str, top_k: int = 5) -> list[list[tuple[str, float]]]:
        """For each mask in `text`, left to right: the top_k (token text, probability) pairs, most probable first.
        The mask token itself is never proposed."""
        return [[(self.tokenizer.token_text(i), p) for i, p in top] for top in self.top_tokens(text, top_k)]

    def top_tokens(self, text: str, top_k: int = 5) -> list[list[tuple[int, float]]]:
        """fill_mask's answer as (token id, probability) pairs."""
        if not isinstance(top_k, int) or isinstance(top_k, bool) or top_k < 1:
            raise ConfigError(f"top_k={top_k!r} is invalid: use 1 or more")
        _, probs = self.probabilities(text)
        probs[:, self.tokenizer.mask_id] = 0.0  # the model may put mass there; it is not an answer
        top = probs.topk(min(top_k, probs.size(-1)), dim=-1)
        return [[(int(i), float(p)) for p, i in zip(ps, ix)] for ps, ix in zip(top.values, top.indices)]
