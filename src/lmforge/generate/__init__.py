"""Text generation: one decoding core over a GPT and its KV cache, for the CLI, Python and the server.

    config      GenerateConfig: every option, checked once
    rows        the state of a decode: the batch's tokens and cache (Sequences), each row's settings and
                progress (Row: budget, end ids, stop strings, generator), the rule that ends a row
    processors  penalties, n-gram ban, temperature, top-k / top-p / min-p, the pick of a token
    decode      the one loop: rows with their own settings in one batch, per-row Events out
    beam        beam search (num_beams > 1), as Hugging Face's
    quantize    bf16 / fp16 weights, int8 weight-only Linear layers
    api         complete / generate / stream / generate_ids / TextGenerator / load: readers of the loop

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

from lmforge.generate.api import (Completion, TextGenerator, complete, generate, generate_batch_ids, generate_ids,
                                  load, options, prompt_ids, stream)
from lmforge.generate.beam import beam_search
from lmforge.generate.config import GenerateConfig
from lmforge.generate.decode import apply_compile, decode
from lmforge.generate.processors import (banned_ngram_tokens, filter_logits, next_token, process_scores,
                                         repetition_penalty)
from lmforge.generate.quantize import DTYPES, Int8Linear, apply_inference_dtype
from lmforge.generate.rows import Event, Row, Sequences, StopText, make_rows, row_generators

__all__ = ["Completion", "DTYPES", "Event", "GenerateConfig", "Int8Linear", "Row", "Sequences", "StopText",
           "TextGenerator", "apply_compile", "apply_inference_dtype", "banned_ngram_tokens", "beam_search",
           "complete", "decode", "filter_logits", "generate", "generate_batch_ids", "generate_ids", "load",
           "make_rows", "next_token", "options", "process_scores", "prompt_ids", "repetition_penalty",
           "row_generators", "stream"]
