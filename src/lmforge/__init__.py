"""lmforge: train your own language model end to end.

    import lmforge
    model = lmforge.load("runs/demo")          # a run or checkpoint directory
    print(model.generate("ROMEO:", max_new_tokens=100, seed=1))
"""

__version__ = "0.1.0"


def load(path: str, device: str = "auto"):
    """A trained model ready to generate text, from a run or checkpoint directory alone.

    Returns an object with `.generate(prompt, **options) -> str` and `.stream(prompt, **options)`
    (an iterator of text pieces); see `lmforge.generate` for the options.
    """
    from lmforge.generate import load as _load

    return _load(path, device=device)
