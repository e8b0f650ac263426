"""Classification for people and programs: texts in, labels with probabilities out.

    TextClassifier(model, tokenizer, labels).classify(texts, top_k) -> [text][(label, probability), ...]

A text is encoded as the classifier's training examples were (data.tasks.encode_text_example: [start] + text
+ [end], a text longer than block_size cut from the right), a batch right-padded with an attention mask
(data.batches.text_batches), and the model's class logits (B, K) from each row's last real token go
through a softmax in fp32. The label names come from the checkpoint (state.json's task entry), ids = their index.
"""

from __future__ import annotations

from typing import Any, Optional, Sequence

import numpy as np
import torch

from lmforge.data.batches import text_batches
from lmforge.data.tasks import encode_text_example
from lmforge.errors import ConfigError
from lmforge.model import GPT


class TextClassifier:
    """A classifier (model.head: classify), its tokenizer and label names: .classify(texts, top_k)."""

    def __init__(self, model: GPT, tokenizer: Any, labels: Sequence[str]) -> None:
        if model.config.head != "classify":
            raise ConfigError(f"this is a language model (model.head={model.config.head!r}): it generates text and "
                              "does not classify; use generate, or fine-tune it with `lmforge prepare --task classify`")
        if len(labels) != model.config.num_labels:
            raise ConfigError(f"{len(labels)} label names for a classifier of {model.config.num_labels} classes: "
                              "pass the label set the model was trained with")
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.labels = [str(label) for label in labels]

    @torch.no_grad()
    def probabilities(self, texts: Sequence[str], batch_size: int = 32) -> torch.Tensor:
        """(len(texts), K) fp32 class probabilities on the CPU, rows summing to 1."""
        tok, block = self.tokenizer, self.model.config.block_size
        ids = [encode_text_example(tok, np.asarray(tok.encode(t), dtype=np.int64), block)[0] for t in texts]
        device = next(self.model.parameters()).device
        out = []
        for x, mask in text_batches(tok, ids, batch_size):
            logits = self.model(x.to(device), attention_mask=mask.to(device))  # (B, K)
            out.append(torch.softmax(logits.float(), dim=-1).cpu())
        return torch.cat(out)

    def classify(self, texts: Sequence[str], top_k: Optional[int] = None,
                 batch_size: int = 32) -> list[list[tuple[str, float]]]:
        """For each text, (label, probability) pairs from the most probable down: every label, or the top_k."""
        if isinstance(texts, str):
            raise ConfigError("classify() takes a list of texts: wrap a single text as [text]")
        if top_k is not None and top_k < 1:
            raise ConfigError(f"top_k={top_k} is invalid: use 1 or more, or None for every label")
        if not texts:
            return []
        probs = self.probabilities(texts, batch_size)
        k = len(self.labels) if top_k is None else min(top_k, len(self.labels))
        values, index = probs.topk(k, dim=-1)
        return [[(self.labels[i], float(p)) for p, i in zip(v.tolist(), ix.tolist())] for v, ix in zip(values, index)]
