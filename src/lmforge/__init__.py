"""lmforge: train your own language model end to end.

    import lmforge
    model = lmforge.load("runs/demo")          # a run or checkpoint directory
    print(model.generate("ROMEO:", max_new_tokens=100, seed=1))
"""

from __future__ import annotations

__version__ = "0.1.0"


def load(path: str, device: str = "auto", dtype: str = "fp32", quantize: str | None = None,
         compile: bool = False):
    """A trained model ready to generate text, from a run or checkpoint directory alone.

    Returns a `lmforge.generate.TextGenerator`: `.generate(prompt_or_prompts, **options)`,
    `.stream(prompt, **options)` (an iterator of text pieces) and `.complete(prompts, **options)`;
    the options are the fields of `lmforge.generate.GenerateConfig`. A classifier (trained on
    `lmforge prepare --task classify` data) gives a `lmforge.generate.TextClassifier` instead:
    `.classify(["text", ...], top_k=None)` -> [[(label, probability), ...] per text]. `dtype` (fp32 | bf16 | fp16),
    `quantize` ("int8") and `compile` trade exactness for speed; the default fp32 is exact.
    """
    from lmforge.generate import load as _load

    return _load(path, device=device, dtype=dtype, quantize=quantize, compile=compile)
