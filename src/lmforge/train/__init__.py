"""Training: the loop (trainer.py), AdamW groups (optim.py), LR schedules, loss, precision, metrics, plots."""

from lmforge.train.trainer import Trainer, train

__all__ = ["Trainer", "train"]
