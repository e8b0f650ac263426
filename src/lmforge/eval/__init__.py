"""Evaluation: loss / perplexity / bits per byte on a split (perplexity.py)."""

from lmforge.eval.perplexity import bits_per_byte, evaluate_checkpoint, evaluate_tokens

__all__ = ["bits_per_byte", "evaluate_checkpoint", "evaluate_tokens"]
