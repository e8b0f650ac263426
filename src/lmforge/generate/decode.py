"""The one decoding loop: a batch of rows, each with its own settings, one token per row per step.

    prefill the prompts once -> per step: last logits -> each group of rows with equal scoring options
    (bias, penalties, bans, temperature and the filters, greedy or a draw from the row's own generator) and
    end ids picks its tokens -> every running row takes its token (Row.advance: end id, stop string,
    budget) and reports an Event -> feed the new column through the cache -> ... until every row ended.

Classifier-free guidance (guidance_scale) adds one row per guided row after the others: its negative prompt,
fed the guided row's tokens; the guided row picks from both sides' log probabilities (processors.guided_scores).

complete, stream, the CLI and the server's engine all read these events; none of them applies a stop
rule of its own. A row that has ended (or that its reader cancelled) is still fed, its tokens ignored,
so the others compute exactly what they would alone.
"""

from __future__ import annotations

import contextlib
from typing import Iterator, Optional, Sequence

import torch

from lmforge.generate.processors import (guided_scores, last_tokens, next_token, penalizes, process_scores,
                                         token_logprobs)
from lmforge.generate.rows import Event, Logprobs, Row, Sequences
from lmforge.lora import row_sets, use_adapter
from lmforge.model import GPT


class Scoring:
    """The rows of a batch grouped by their scoring options, and the pick of each group's next tokens."""

    def __init__(self, rows: Sequence[Row], device: torch.device) -> None:
        groups: dict[tuple, list[int]] = {}
        for i, row in enumerate(rows):
            groups.setdefault((row.config.scoring, row.end_ids), []).append(i)
        self.groups = [(rows[index[0]].config, torch.tensor(index, device=device),
                        [rows[i].generator for i in index]) for index in groups.values()]
        self.generated = [[rows[i].tokens for i in index] for index in groups.values()]  # live lists, per group
        self.end_ids = [sorted(end_ids) for _, end_ids in groups]
        self.guides = [rows[index[0]].guide for index in groups.values()]  # equal configs: one pattern, one guide
        self.budgets = [[rows[i].budget for i in index] for index in groups.values()]
        self.whole = len(self.groups) == 1  # one group: no gather / scatter
        self.processed = any(penalizes(c) for c, _, _ in self.groups)
        self.widths = [c.watermark_context_width if c.watermark else 0 for c, _, _ in self.groups]  # tokens a
        # watermark reads before each row's next one

    def pick(self, logits: torch.Tensor, seqs: Sequences) -> torch.Tensor:
        """The next token (B,) of every row from the last logits (B, V) (seqs may hold more rows after them: the
        unconditional sides of classifier-free guidance)."""
        tokens, real = seqs.so_far() if self.processed or any(self.widths) else (None, None)
        if tokens is not None and tokens.size(0) > logits.size(0):
            tokens, real = tokens[:logits.size(0)], None if real is None else real[:logits.size(0)]
        if self.whole:
            config, _, generators = self.groups[0]
            scores = process_scores(logits, tokens, real, config, self.generated[0], self.end_ids[0],
                                    self.guides[0], self.budgets[0]) if self.processed else logits
            return next_token(scores, config, None if config.is_greedy else generators,
                              last_tokens(tokens, real, self.widths[0]))
        out = torch.empty(logits.size(0), dtype=torch.long, device=logits.device)
        for (config, index, generators), generated, end_ids, guide, budgets, width in zip(
                self.groups, self.generated, self.end_ids, self.guides, self.budgets, self.widths):
            scores = logits.index_select(0, index)
            if self.processed:
                scores = process_scores(scores, tokens.index_select(0, index),
                                        None if real is None else real.index_select(0, index), config, generated,
                                        end_ids, guide, budgets)
            contexts = last_tokens(tokens.index_select(0, index),
                                   None if real is None else real.index_select(0, index), width) if width else None
            out.index_copy_(0, index, next_token(scores, config, None if config.is_greedy else generators, contexts))
        return out



@torch.inference_mode()
def decode_rows(model: GPT, rows: Sequence[Row]) -> Iterator[list[Event]]:
    """Decode `rows` as one batch; yield, per step, the Events of the rows still running at that step.
    Ends once every row has finished (see Row.advance) or been cancelled (row.finish set by its reader).
    The model should be in eval mode."""
    if not rows:
        return
    guided = [i for i, row in enumerate(rows) if row.negative is not None]  # classifier-free guidance: each has
    seqs = Sequences(model, [row.prompt for row in rows] + [rows[i].negative for i in guided],  # a second row,
                     max(row.budget for row in rows))  # after the others, that takes the same tokens
    scoring = Scoring(rows, seqs.tokens.device)
    top = max((row.top_logprobs for row in rows if row.top_logprobs is not None), default=None)
    B, device = len(rows), seqs.tokens.device
    shadows = torch.tensor(guided, dtype=torch.long, device=device)
    scales = torch.tensor([[rows[i].config.guidance_scale] for i in guided], device=device)
    names = [row.adapter for row in rows] + [rows[i].adapter for i in guided]  # rows naming LoRA adapter sets: each
    chosen = row_sets(names) if any(names) else None  # computes with its own (the caller's choice holds otherwise)
    while any(row.finish is None for row in rows):
        with use_adapter(chosen) if chosen is not None else contextlib.nullcontext():
            every = seqs.next_logits(model)  # (B + guided rows, V)
        logits = scores = every[:B]
        if guided:  # the guided rows' scores from both sides (a new tensor: logits stay the raw ones)
            scores = scores.float().index_put((shadows,), guided_scores(every[shadows], every[B:], scales))
        token = scoring.pick(scores, seqs)  # (B,)
        seqs.append(torch.cat([token, token[shadows]]) if guided else token)
        logprobs = token_logprobs(logits, token, top) if top is not None else None
        events = []
        for i, (row, t) in enumerate(zip(rows, token.tolist())):
            if row.finish is None:
                event = row.advance(i, t)
                if row.top_logprobs is not None and event.token is not None:
                    lp = logprobs[i]
                    event = event._replace(logprobs=lp._replace(top=lp.top[:row.top_logprobs]))
                events.append(event)
        yield events


@torch.inference_mode()
def score_prompt(model: GPT, ids: Sequence[int], k: int) -> list[Optional[Logprobs]]:
    """The Logprobs of each token of a prompt given those before it (None for the first, which has no context),
    with k alternatives: one forward pass over at most block_size tokens (what `echo` with logprobs reports)."""
    x = torch.tensor([list(ids)], dtype=torch.long, device=model.tok_emb.weight.device)  # (1, T)
    logits = model(x)[0]  # (T, V)
    return [None] + token_logprobs(logits[:-1], x[0, 1:], k)
