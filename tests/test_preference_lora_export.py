"""A reference-free preference loss (SimPO, ORPO) trained with LoRA, exported merged to Hugging Face: the export
scores every val pair as the run does, so what was learned survives the merge and the export."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from lmforge.checkpoint import load_for_inference
from lmforge.cli import main
from lmforge.data.batches import pad_examples, pair_rows
from lmforge.data.tasks import load_examples
from lmforge.eval.preference import evaluate_preference
from lmforge.preference_loss import IGNORED, PreferenceLoss
from lmforge.train import Trainer
from test_preference import base, dpo, pairs  # noqa: F401  (base, pairs: the module's fixtures)


@pytest.mark.parametrize("kind", ["simpo", "orpo"])
def test_a_lora_reference_free_run_exported_merged_scores_pairs_as_the_run(base, pairs, tmp_path, kind):
    """12 LoRA steps of SimPO / ORPO; `lmforge export --format hf --merge`; transformers' forward of the export gives
    each val completion's summed log-probability, and the loss and rewards from those equal lmforge's evaluation
    of the run (and differ from the base's: the adapters were merged, not dropped)."""
    import transformers

    trainer = Trainer(dpo(tmp_path / "run", pairs, base, **{"train.preference_loss": kind, "train.max_steps": 12,
                                                            "lora.r": 4, "lora.targets": "q,v,mlp", "optim.lr": 1e-2}),
                      progress=False, tensorboard=False)
    trainer.fit()
    assert trainer.reference is None
    examples = load_examples(pairs, "val")
    loss = PreferenceLoss(kind, trainer.config.train.dpo_beta)
    model, tokenizer, _ = load_for_inference(trainer.last_checkpoint)
    expected, _ = evaluate_preference(model, None, tokenizer, examples, loss, batch_size=5)
    base_model, _, _ = load_for_inference(base)
    before, _ = evaluate_preference(base_model, None, tokenizer, examples, loss, batch_size=5)
    assert abs(expected["loss"] - before["loss"]) > 1e-3

    assert main(["export", str(trainer.run_dir), "--format", "hf", "--merge", "--out", str(tmp_path / "hf")]) == 0
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    x, y = pad_examples(examples, pair_rows(np.arange(len(examples) // 2)))
    with torch.no_grad():
        logp = hf(x).logits.double().log_softmax(-1)
    mask = y != IGNORED
    per_row = (logp.gather(-1, y.clamp(min=0).unsqueeze(-1)).squeeze(-1) * mask).sum(dim=1)
    tokens = mask.sum(dim=1)
    got, chosen, rejected = loss(per_row[0::2], per_row[1::2], tokens[0::2], tokens[1::2])
    assert float(got.mean()) == pytest.approx(expected["loss"], abs=1e-5)
    assert float(chosen.mean()) == pytest.approx(expected["chosen_reward"], abs=1e-5)
    assert float(rejected.mean()) == pytest.approx(expected["rejected_reward"], abs=1e-5)
    assert float((chosen > rejected).double().mean()) == expected["reward_accuracy"]
