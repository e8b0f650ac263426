"""Guards for `lmforge plan`'s fine-tuning lines and `--measure` of preference data, beyond test_plan.

test_plan checks the numbers of a preference plan; here the printed lines are checked against the same hand
arithmetic (the pairs note, the frozen reference's size and the reference's FLOPs only where they apply), and
measure()'s random pairs: half of each sequence is prompt, and a reference-free loss saves no base to start from.
"""

from __future__ import annotations

import pytest

from lmforge.plan import format_plan, plan
from test_plan import B, C, L, T, built, config, hand_parameters  # noqa: F401  (built: a fixture)


def test_the_printed_plan_names_pairs_and_a_reference_only_where_they_are():
    P, _ = hand_parameters()
    tokens = format_plan(plan(config(), device="h100"))
    assert "preference pairs" not in tokens and "frozen reference" not in tokens and "these steps" not in tokens

    dpo = plan(config(), device="h100", task="preference")
    text = format_plan(dpo)
    attention = 12 * L * C * T
    N = (dpo.flops_per_token - attention) // 6
    assert f"x {2 * B * T:,} tokens" in text and "(preference pairs: 2 sequences each)" in text
    assert f"  frozen reference  {4 * P / 2 ** 20:,.1f} MiB" in text.splitlines()  # a fp32 copy: 4 B a parameter
    assert (f"; these steps {dpo.flops_per_token + 2 * N + attention // 3:,} (the reference's forward on every "
            "sequence)") in text

    orpo = format_plan(plan(config(**{"train.preference_loss": "orpo"}), device="h100", task="preference"))
    assert "(preference pairs: 2 sequences each)" in orpo
    assert "frozen reference" not in orpo and "these steps" not in orpo


@pytest.mark.parametrize("loss", ["dpo", "orpo"])
def test_measure_trains_half_prompt_pairs_and_saves_a_base_only_for_a_reference(loss, built):
    """--measure's random pairs: each sequence's first half is prompt (no loss), the rest completion; a base model
    is saved as train.init_from only when the loss runs a reference."""
    from lmforge.plan import measure

    measure(config(**{"train.num_threads": 1, "train.preference_loss": loss}), steps=1, task="preference")
    trainer = built[-1]
    examples = trainer.train_data.examples
    lengths = examples.offsets[1:] - examples.offsets[:-1]
    assert len(examples) == 2 * B * 2 and (lengths == T + 1).all()  # 2 steps of B pairs, each block_size + 1 long
    assert (examples.prompt_lengths == (T + 1) // 2).all()
    assert (trainer.config.train.init_from != "none") == (loss == "dpo")
    assert (trainer.reference is not None) == (loss == "dpo")
