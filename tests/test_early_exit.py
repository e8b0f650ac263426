"""LayerSkip's early exit, trained and used: the first N layers read by the final norm and head are the draft of
self-speculative decoding (generate.assistant_early_exit), and train.early_exit_layer trains exactly that draft."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from lmforge.data.batches import TokenBatches
from lmforge.errors import ConfigError
from lmforge.generate import GenerateConfig, make_rows
from lmforge.generate.api import decode_events
from lmforge.generate.speculative import early_exit
from tiny_training import VOCAB, synthetic_tokens, tiny_config, tiny_trainer


def test_the_early_exit_logits_are_the_drafts(tmp_path):
    """forward(exit_layer=N) gives the whole model's logits and, second, the logits of early_exit(model, N): what
    training adds to the loss is what decoding drafts with."""
    model = tiny_trainer(tiny_config(tmp_path, **{"model.n_layer": 3})).raw_model.eval()
    x = torch.randint(0, VOCAB, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        for layer in (1, 2):
            logits, early = model(x, exit_layer=layer)
            torch.testing.assert_close(logits, model(x), rtol=0, atol=0)
            torch.testing.assert_close(early, early_exit(model, layer)(x), rtol=0, atol=0)
            assert (early - logits).abs().max() > 1e-3  # a different prediction: the layers after it count


def test_the_trained_loss_adds_the_weighted_early_exit_loss(tmp_path):
    """The first step's gradients are those of CE(model) + w * CE(first layer, final norm, head) on its batch,
    computed by hand on a copy; the loss it reports is the model's own."""
    config = tiny_config(tmp_path, **{"model.n_layer": 3, "train.early_exit_layer": 1, "train.early_exit_weight": 0.5})
    trainer = tiny_trainer(config)
    reference = copy.deepcopy(trainer.raw_model)
    x, y = TokenBatches(synthetic_tokens(), 16, 4, seed=config.train.seed, sampling=config.data.sampling).next_batch()
    loss_sum, count = trainer.accumulate_gradients()
    final = F.cross_entropy(reference(x).flatten(0, 1), y.flatten())
    early = F.cross_entropy(early_exit(reference, 1)(x).flatten(0, 1), y.flatten())  # the cut model (decoding's)
    (final + 0.5 * early).backward()
    assert float(loss_sum / count) == pytest.approx(final.item(), rel=1e-5)
    assert float(trainer.early_exit_loss) == pytest.approx(early.item(), rel=1e-5)
    for (name, ours), (_, theirs) in zip(trainer.raw_model.named_parameters(), reference.named_parameters()):
        torch.testing.assert_close(ours.grad, theirs.grad, rtol=1e-4, atol=1e-6, msg=name)


def acceptance(model, prompts, layer: int) -> float:
    """Share of the early exit's greedy guesses the model keeps, over the prompts."""
    config = GenerateConfig(greedy=True, max_new_tokens=12, assistant_early_exit=layer, num_assistant_tokens=3)
    rows = make_rows(model, prompts, config)
    for _ in decode_events(model, rows, config):
        pass
    return sum(r.accepted for r in rows) / sum(r.drafted for r in rows)


def test_training_the_early_exit_makes_a_better_draft(tmp_path):
    """The same run with and without the early-exit loss: with it, the first layer predicts the val tokens better
    (val_early_exit_loss against the same measure of the other model) and more of its drafts are kept; the whole
    model's val loss stays close, and the metric reaches the logs."""
    runs = {}
    for name, extra in [("plain", {}), ("exit", {"train.early_exit_layer": 1, "train.early_exit_weight": 1.0})]:
        trainer = tiny_trainer(tiny_config(tmp_path / name, **{"model.n_layer": 3, "train.max_steps": 120,
                                                                "train.eval_interval": 120, **extra}))
        trainer.fit()
        runs[name] = trainer
    exit_trained, plain = runs["exit"], runs["plain"]

    @torch.no_grad()
    def first_layer_loss(trainer) -> float:  # by hand, on the val batches (the same in both runs)
        total = count = 0.0
        for x, y in trainer.val_batches:
            early = early_exit(trainer.raw_model.eval(), 1)(x)
            total += float(F.cross_entropy(early.flatten(0, 1), y.flatten(), reduction="sum"))
            count += y.numel()
        return total / count

    assert exit_trained.val_metrics["val_early_exit_loss"] == pytest.approx(first_layer_loss(exit_trained), rel=1e-5)
    assert first_layer_loss(exit_trained) < first_layer_loss(plain) - 0.2
    assert abs(exit_trained.val_loss - plain.val_loss) < 0.15
    prompts = [[int(t) for t in x[0, :8]] for x, _ in exit_trained.val_batches]
    assert acceptance(exit_trained.raw_model.eval(), prompts, 1) > acceptance(plain.raw_model.eval(), prompts, 1)
    logged = (tmp_path / "exit" / "metrics.jsonl").read_text()
    assert '"early_exit_loss"' in logged and '"val_early_exit_loss"' in logged


def test_bad_early_exit_settings_are_refused(tmp_path):
    for overrides, message in [({"train.early_exit_layer": 2}, "is not below model.n_layer=2"),
                               ({"train.early_exit_weight": 0.5}, "set train.early_exit_layer N too"),
                               ({"train.early_exit_layer": 0}, "train.early_exit_layer=0 is invalid"),
                               ({"train.early_exit_layer": 1, "model.causal": False, "train.objective": "mlm"},
                                "an encoder")]:
        with pytest.raises(ConfigError, match=message):
            tiny_config(tmp_path, **overrides)
