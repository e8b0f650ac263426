"""Embeddings: texts in, one vector per text out (OpenAI's /v1/embeddings, Hugging Face's feature extraction).

    TextEmbedder(model, tokenizer, pooling).embed(texts) -> (N, C) float32, unit length by default

A text is encoded as the classifier's examples are ([start] + text + [end], cut from the right past block_size), a
batch right-padded with an attention mask, so a text's vector does not depend on the others in its batch. The
model's hidden states after the final norm (GPT.hidden_states) are pooled over each text's real tokens:

    mean   the average of the text's positions (the default for an encoder, which sees the whole text everywhere)
    last   its last position, the end token (the default for a decoder: the only one that has read the whole text)
    first  its first position, the start token (BERT's [CLS])
"""

from __future__ import annotations

from typing import Any, Literal, Optional, Sequence, Union

import numpy as np
import torch

from lmforge.data.batches import text_batches
from lmforge.data.tasks import encode_text_example
from lmforge.errors import ConfigError
from lmforge.model import GPT

Pooling = Literal["mean", "last", "first"]
POOLINGS = ("mean", "last", "first")


class TextEmbedder:
    """A model and its tokenizer as an embedder: .embed(texts) -> (N, C)."""

    def __init__(self, model: GPT, tokenizer: Any, pooling: Optional[Pooling] = None, normalize: bool = True) -> None:
        if pooling is not None and pooling not in POOLINGS:
            raise ConfigError(f"pooling={pooling!r} is invalid: one of {', '.join(POOLINGS)} (or None: mean for an "
                              "encoder, last for a decoder)")
        self.model = getattr(model, "model", model).eval()  # a CompiledGPT's eager model (generate.compiled)
        self.tokenizer = tokenizer
        self.pooling = pooling or ("last" if model.config.causal else "mean")
        self.normalize = normalize

    @property
    def dimensions(self) -> int:
        return self.model.config.n_embd

    def length(self, text: Union[str, Sequence[int]]) -> int:
        """The tokens a text is read as before any cut at block_size: its own, the start and the end token."""
        tok = self.tokenizer
        return len(tok.encode(text) if isinstance(text, str) else text) + 1 + (tok.start_id is not None)

    def encode(self, text: Union[str, Sequence[int]]) -> np.ndarray:
        """The token ids a text (or a list of token ids: taken as the text's tokens) is embedded from, cut from the
        right past block_size."""
        tok = self.tokenizer
        ids = tok.encode(text) if isinstance(text, str) else list(text)
        return encode_text_example(tok, np.asarray(ids, dtype=np.int64), self.model.config.block_size)[0]

    @torch.no_grad()
    def embed(self, texts: Sequence[Union[str, Sequence[int]]], batch_size: int = 32) -> torch.Tensor:
        """(len(texts), n_embd) float32 vectors on the CPU, of unit length when normalize."""
        if isinstance(texts, str):
            raise ConfigError("embed() takes a list of texts: wrap a single text as [text]")
        if not texts:
            return torch.zeros(0, self.dimensions)
        device = next(self.model.parameters()).device
        out = []
        for x, mask in text_batches(self.tokenizer, [self.encode(t) for t in texts], batch_size):
            x, mask = x.to(device), mask.to(device)
            out.append(pool(self.model.hidden_states(x, attention_mask=mask).float(), mask, self.pooling).cpu())
        vectors = torch.cat(out)
        return torch.nn.functional.normalize(vectors, dim=-1) if self.normalize else vectors


def pool(hidden: torch.Tensor, mask: torch.Tensor, pooling: str) -> torch.Tensor:
    """Hidden states (B, T, C) of right-padded rows (mask (B, T), True on real tokens) -> (B, C)."""
    real = mask.bool()
    if pooling == "mean":
        weights = real.to(hidden.dtype)[..., None]  # (B, T, 1)
        return (hidden * weights).sum(1) / weights.sum(1)
    rows = torch.arange(hidden.size(0), device=hidden.device)
    if pooling == "first":
        return hidden[rows, real.long().argmax(-1)]
    last = (real.long() * torch.arange(real.size(1), device=real.device)).argmax(-1)  # the last real column
    return hidden[rows, last]
