"""A reward model for people and programs: (prompt, completion) pairs in, one score each out.

    RewardModel(model, tokenizer, template).score(prompts, completions) -> [reward]
    RewardModel.best_of(prompt, completions)                              -> the completions, best first
    rank_samples(generator, judge, prompts, config)                       -> per prompt, n samples best first

A reward model is a decoder or encoder with a one-output classify head trained on preference pairs
(train.objective reward): the higher its score, the more people would prefer the completion. A pair is encoded
as its training examples were: the prompt rendered by the template the model was trained with (a string through
its prompt template, a list of {"role", "content"} turns through its chat template), then
[start] + prompt + completion + [end] (data.tasks.encode_example), fitted to the context as training fitted it
(data.batches.fit_context: the earliest prompt tokens go first), right-padded with an attention mask; the head
reads the last real token (the end token).

Best-of-n (rank_samples, `lmforge best-of-n`): a policy samples n completions of each prompt and the reward model
ranks them. The best and the worst make an on-policy preference pair (the data of iterative DPO), the best alone an
sft example (rejection-sampling fine-tuning, as Llama 2's).
"""

from __future__ import annotations

from typing import Any, Iterator, Optional, Sequence, Union

import numpy as np
import torch

from lmforge.data.batches import fit_context, pad_rows
from lmforge.errors import ConfigError
from lmforge.model import GPT

Prompt = Union[str, Sequence[dict]]


class RewardModel:
    """A reward model (model.head classify with one output, trained with train.objective reward), its tokenizer
    and the prompt template of its data: .score(prompts, completions), .best_of(prompt, completions)."""

    def __init__(self, model: GPT, tokenizer: Any, template: Optional[dict] = None) -> None:
        if model.config.head != "classify" or model.config.num_labels != 1:
            raise ConfigError("this is not a reward model (one score from a classify head): train one with "
                              "`lmforge train --train.objective reward` on `lmforge prepare --task preference` data")
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.template = template

    def render(self, prompt: Prompt) -> str:
        """The prompt text as the training data held it: through the template (a string) or its chat template (a
        list of turns, ending with the reply's header); a string as it is without a template."""
        from lmforge.data.tasks import CHAT_TEMPLATE, render_chat, render_prompt

        if not isinstance(prompt, str):
            return render_chat(self.template if self.template is not None else {"chat": CHAT_TEMPLATE}, list(prompt))
        if self.template is None:
            return prompt
        missing = [f for f in self.template["fields"] if f != "prompt"]
        if missing:
            raise ConfigError(f"this model's prompt template {self.template['prompt']!r} needs the field(s) "
                              f"{', '.join(missing)} besides the prompt: render the prompt yourself and load the model "
                              "with template=False")
        return render_prompt(self.template, {"prompt": prompt})

    def encode(self, prompt: Prompt, completion: str) -> np.ndarray:
        """One (prompt, completion) pair's token ids, as the model read its training examples (module docstring)."""
        from lmforge.data.tasks import encode_example

        tok, block = self.tokenizer, self.model.config.block_size
        ids, _, _ = encode_example(tok, np.asarray(tok.encode(self.render(prompt)), dtype=np.int64),
                                   np.asarray(tok.encode(completion), dtype=np.int64), block + 1, False)
        return fit_context(ids, block, int(tok.start_id is not None))

    @torch.no_grad()
    def score(self, prompts: Sequence[Prompt], completions: Sequence[str], batch_size: int = 32) -> list[float]:
        """The reward of each (prompt, completion) pair, in fp32."""
        if isinstance(prompts, str) or isinstance(completions, str):
            raise ConfigError("score() takes a list of prompts and a list of completions: wrap single ones as [text]")
        if len(prompts) != len(completions):
            raise ConfigError(f"{len(prompts)} prompts and {len(completions)} completions: give one prompt per "
                              "completion")
        return self.score_ids([self.encode(p, c) for p, c in zip(prompts, completions)], batch_size)

    @torch.no_grad()
    def score_ids(self, rows: Sequence[np.ndarray], batch_size: int = 32) -> list[float]:
        """The reward of each example given as token ids ([start] prompt completion [end] in this model's tokenizer,
        at most block_size tokens), in fp32."""
        tok = self.tokenizer
        pad = tok.pad_id if tok.pad_id is not None else tok.end_id  # as training padded
        device = next(self.model.parameters()).device
        out: list[float] = []
        for start in range(0, len(rows), batch_size):
            x, mask = pad_rows(rows[start:start + batch_size], pad)
            out += self.model(x.to(device), attention_mask=mask.to(device))[:, 0].float().tolist()
        return out

    def best_of(self, prompt: Prompt, completions: Sequence[str], batch_size: int = 32) -> list[tuple[str, float]]:
        """(completion, reward) of each completion of one prompt, the highest reward first (best-of-n sampling:
        generate n completions, keep the first)."""
        rewards = self.score([prompt] * len(completions), list(completions), batch_size)
        return sorted(zip(completions, rewards), key=lambda item: -item[1])


def rank_samples(generator: Any, judge: RewardModel, prompts: Sequence[Prompt], config: Any,
                 batch_size: int = 8) -> Iterator[list[tuple[str, float]]]:
    """For each prompt, in order: the config.num_return_sequences samples of `generator` (a TextGenerator, which
    renders the prompt through its own template), each with its reward under `judge` (which renders it through its
    own), the highest first. Prompts are sampled batch_size at a time, each batch's samples scored together."""
    n = config.num_return_sequences
    for start in range(0, len(prompts), batch_size):
        chunk = list(prompts[start:start + batch_size])
        texts = generator.generate(chunk, config)
        texts = [[t] if isinstance(t, str) else list(t) for t in texts]  # [prompt][sample]
        rewards = judge.score([p for p, samples in zip(chunk, texts) for _ in samples],
                              [t for samples in texts for t in samples])
        for i, samples in enumerate(texts):
            yield sorted(zip(samples, rewards[i * n:(i + 1) * n]), key=lambda item: -item[1])
