"""Beam search (num_beams > 1): the num_beams most likely continuations of each prompt, as Hugging Face's."""

from __future__ import annotations

import time
from typing import Any, Sequence

import torch
import torch.nn.functional as F

from lmforge.generate.config import GenerateConfig
from lmforge.generate.processors import last_tokens, marked, process_scores
from lmforge.generate.rows import Sequences, crop_prompt, with_token_ids, within_tokenizer
from lmforge.model import GPT


@torch.inference_mode()
def beam_search(model: GPT, prompts: Sequence[Sequence[int]], config: GenerateConfig,
                end_ids: Sequence[int] = (), tokenizer: Any = None) -> list[list[list[int]]]:
    """The num_return_sequences best of num_beams beams for each prompt: [prompt][rank] -> new token ids
    (an end id ends a beam and is left out; bad_words need the tokenizer). Hugging Face's beam search, step for
    step:

    all num_beams * V continuations of the running beams are scored by their summed log-probabilities
    (after the logit bias, repetition penalty, n-gram and bad-word bans, min_new_tokens); of the best
    K = max(2, 1 + len(end_ids)) * num_beams, those ending in an end id (or reaching the budget, or max_time) and
    ranked within the first num_beams become finished hypotheses, scored sum(log p) / new_tokens ** length_penalty
    (the best num_beams are kept), and the best num_beams others run on. A prompt is done when num_beams
    hypotheses are finished and either early_stopping is true or no running beam can still beat the worst of
    them: its score divided by the current length ** length_penalty (the budget's length with 'never' and
    length_penalty > 0) is no higher.
    """
    config = within_tokenizer(with_token_ids(config, tokenizer), model.config.vocab_size, tokenizer)
    config.check_vocabulary(model.config.vocab_size)
    prompts = [crop_prompt(p, model.config.block_size) for p in prompts]
    budgets = [config.new_tokens(len(p)) for p in prompts]
    nb, P = config.num_beams, len(prompts)
    device = model.tok_emb.weight.device
    seqs = Sequences(model, [p for p in prompts for _ in range(nb)], max(budgets))
    beam_scores = torch.zeros(P, nb, device=device)  # summed log-probabilities of the running beams
    beam_scores[:, 1:] = -1e9  # all beams start equal: let only the first one propose continuations
    K = max(2, 1 + len(end_ids)) * nb
    finished: list[list[tuple[float, list[int]]]] = [[] for _ in range(P)]  # (score, tokens), best first
    done = [False] * P
    deadline = time.monotonic() + config.max_time if config.max_time is not None else None
    for step in range(max(budgets)):
        out_of_time = deadline is not None and time.monotonic() >= deadline  # max_time: this step is the last
        history = seqs.new_tokens().tolist()  # (P*nb, new tokens so far)
        tokens, real = seqs.so_far()
        log_probs = process_scores(F.log_softmax(seqs.next_logits(model).float(), dim=-1), tokens, real, config,
                                   history, list(end_ids), budgets=[b for b in budgets for _ in range(nb)])
        if config.watermark:  # (after the processors, as Hugging Face adds it: the beams' scores hold it)
            log_probs = marked(log_probs, config, last_tokens(tokens, real, config.watermark_context_width))
        V = log_probs.size(-1)
        totals = (log_probs + beam_scores.view(-1, 1)).view(P, nb * V)  # every continuation of every beam
        top_scores, top_index = totals.topk(K, dim=-1)  # (P, K), best first
        top_scores, top_index = top_scores.tolist(), top_index.tolist()
        parents, tokens, scores = [], [], []
        for p in range(P):
            if done[p]:  # keep its beams as they are; their tokens are never read
                parents += [p * nb + b for b in range(nb)]
                tokens += [0] * nb
                scores += beam_scores[p].tolist()
                continue
            last = step + 1 == budgets[p] or out_of_time
            running: list[tuple[int, int, float]] = []
            for rank, (score, index) in enumerate(zip(top_scores[p], top_index[p])):
                beam, token = divmod(index, V)
                if token in end_ids or last:
                    if rank < nb:
                        add_hypothesis(finished[p], score / (step + 1) ** config.length_penalty,
                                       history[p * nb + beam] + [token], nb)
                elif len(running) < nb:
                    running.append((p * nb + beam, token, score))
            running += [(p * nb, 0, -1e9)] * (nb - len(running))  # (only at the end of the budget)
            parents += [r[0] for r in running]
            tokens += [r[1] for r in running]
            scores += [r[2] for r in running]
            length = budgets[p] if config.early_stopping == "never" and config.length_penalty > 0 else step + 1
            done[p] = last or (len(finished[p]) == nb and (
                config.early_stopping is True or running[0][2] / length ** config.length_penalty <= finished[p][-1][0]))
        if all(done):
            break
        seqs.reorder(torch.tensor(parents, device=device))
        seqs.append(torch.tensor(tokens, device=device))
        beam_scores = torch.tensor(scores, device=device).view(P, nb)
    return [[[t for t in hyp if t not in end_ids] for _, hyp in finished[p][:config.num_return_sequences]]
            for p in range(P)]


def add_hypothesis(finished: list[tuple[float, list[int]]], score: float, tokens: list[int], keep: int) -> None:
    """Insert a finished beam into `finished` (best first), keeping the best `keep`."""
    finished.append((score, tokens))
    finished.sort(key=lambda hyp: -hyp[0])  # stable: an earlier hypothesis wins a tie
    del finished[keep:]

