"""Text generation: one decoding core over a GPT and its KV cache, for the CLI, Python and the server.

    config      GenerateConfig: every option, checked once
    rows        the state of a decode: the batch's tokens and cache (Sequences), each row's settings and
                progress (Row: budget, end ids, stop strings, generator), the rule that ends a row
    processors  logit bias, penalties, bans (n-grams, bad words, an early end), temperature, the filters (top-k,
                top-p, min-p, typical, epsilon, eta), the pick of a token
    decode      the one loop: rows with their own settings in one batch, per-row Events out
    compiled    the decoding step compiled ahead of time (AOTInductor), once for every length
    guided      guided_regex / guided_json: a regular expression (or a JSON schema made one) as an automaton, and
                the tokens each of its states allows
    json_schema a JSON schema ($ref, optional properties, formats, integer bounds...) as a regular expression
    beam        beam search (num_beams > 1), as Hugging Face's
    speculative speculative decoding: a drafter (prompt lookup, or a small assistant model) guesses k tokens, the
                model checks them in one pass; greedy output unchanged, sampling's distribution kept
    quantize    bf16 / fp16 weights, int8 weight-only Linear layers
    api         complete / generate / stream / generate_ids / TextGenerator / load: readers of the loop
    chat        ChatSession: a conversation turn by turn through the model's chat template (lmforge chat)
    classify    TextClassifier: a classifier's labels with probabilities (load returns one for a classifier)
    embed       TextEmbedder: a vector per text, the hidden states pooled (any model: load(...).model)
    fill_mask   MaskFiller: an encoder's candidates for each <MASK> (load returns one for an encoder)
    reward      RewardModel: a reward model's score of (prompt, completion) pairs, best-of-n ranking (load returns
                one for a model trained with train.objective reward)

Prompts are encoded as <START> + prompt tokens, the way documents were stored for training
(<START> text <END>). A prompt longer than block_size is cropped from the left, with a warning.

Batches: several prompts (and num_return_sequences copies of each, and in the server several requests)
decode as one batch, left-padded to the longest prompt. The model gets an attention mask, so a row's
positions count only its own tokens and no query sees a pad: each row computes what it would alone
(equal up to float rounding in the order of sums). Each row has its own random generator (sample j of
every prompt is seeded from (seed, j): see rows.row_generators), so a prompt draws the same tokens alone
or in a batch, whatever the other rows' options.

Past the context: a learned/sinusoidal/RoPE position cannot go beyond block_size, so when the sequence
fills the window it slides: the cache is rebuilt by one forward pass over the newest block_size // 2
tokens and decoding continues from there. The model therefore always sees between block_size/2 and
block_size tokens of context, and pays one prefill per block_size/2 new tokens (nanoGPT instead runs
the newest block_size tokens through the whole model for every new token: a full window, many times slower).
A padded batch slides all rows at once, when its longest row fills the window: a batched row equals its
unbatched result as long as the longest prompt plus the new tokens fit in block_size.
"""

import importlib
from typing import Any

_WHERE = {  # name -> submodule; loaded on first use, so `lmforge --help` can read GenerateConfig without torch
    "GenerateConfig": "config", "Dtype": "config", "Quantize": "config",
    "TextClassifier": "classify", "MaskFiller": "fill_mask", "TextEmbedder": "embed", "RewardModel": "reward",
    "Completion": "api", "TextGenerator": "api", "complete": "api", "generate": "api", "generate_batch_ids": "api",
    "generate_ids": "api", "decode_events": "api", "load": "api", "load_assistant": "api", "options": "api",
    "stream": "api",
    "beam_search": "beam", "decode_rows": "decode", "score_prompt": "decode", "CompiledGPT": "compiled",
    "apply_compile": "compiled",
    "banned_ngram_tokens": "processors", "filter_logits": "processors", "next_token": "processors",
    "process_scores": "processors", "repetition_penalty": "processors", "token_logprobs": "processors",
    "occurrence_penalties": "processors", "choice_tokens": "processors", "bad_word_tokens": "processors",
    "bias_logits": "processors", "guided_scores": "processors",
    "sampling_logits": "processors",
    "DTYPES": "quantize", "Int8Linear": "quantize", "apply_inference_dtype": "quantize",
    "Event": "rows", "Logprobs": "rows", "Row": "rows", "Sequences": "rows", "StopText": "rows", "make_rows": "rows",
    "row_generators": "rows", "with_token_ids": "rows", "prompt_ids": "rows",
    "DraftModel": "speculative", "PromptLookup": "speculative", "speculative_rows": "speculative",
    "ChatSession": "chat", "RegexGuide": "guided", "regex_guide": "guided",
}
__all__ = sorted(_WHERE)


def __getattr__(name: str) -> Any:
    if name not in _WHERE:
        raise AttributeError(f"module 'lmforge.generate' has no attribute {name!r}")
    return getattr(importlib.import_module(f"lmforge.generate.{_WHERE[name]}"), name)
