"""lmforge: train your own language model end to end.

    import lmforge
    model = lmforge.load("runs/demo")          # a run or checkpoint directory
    print(model.generate("ROMEO:", max_new_tokens=100, seed=1))
"""

from __future__ import annotations

__version__ = "0.1.0"


def load(path: str, device: str = "auto", dtype: str = "fp32", quantize: str | None = None,
         compile: bool = False, assistant: str | None = None):
    """A trained model ready to generate text, from a run or checkpoint directory alone.

    Returns a `lmforge.generate.TextGenerator`: `.generate(prompt_or_prompts, **options)`,
    `.stream(prompt, **options)` (an iterator of text pieces) and `.complete(prompts, **options)`;
    the options are the fields of `lmforge.generate.GenerateConfig`. A classifier (trained on
    `lmforge prepare --task classify` data) gives a `lmforge.generate.TextClassifier` instead:
    `.classify(["text", ...], top_k=None)` -> [[(label, probability), ...] per text]. `dtype` (fp32 | bf16 | fp16),
    `quantize` ("int8") and `compile` trade exactness for speed; the default fp32 is exact. `assistant`: the run
    or checkpoint directory of a smaller model trained with the same tokenizer, which drafts tokens for
    speculative decoding (same greedy text, same sampling distribution, fewer passes of the model).
    """
    from lmforge.generate import load as _load

    return _load(path, device=device, dtype=dtype, quantize=quantize, compile=compile, assistant=assistant)


def attention_maps(model_or_path, text: str, device: str = "cpu"):
    """What each attention head looks at: (weights, labels) for `text`, weights a float tensor
    (n_layer, n_head, T, T) of softmax(Q K^T / sqrt(d_k)) (row t: how query t spreads over the keys), labels
    the T tokens as text. `model_or_path` is a run or checkpoint directory or what `load` returned. See
    lmforge.explain (and `lmforge attention` for the picture)."""
    from lmforge.explain import attention_maps as _maps

    return _maps(model_or_path, text, device=device)
