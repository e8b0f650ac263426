"""Guards for knowledge distillation (a mutation hunt on train.distill_from's code): what tests/test_distill.py left
unchecked and a broken change would pass.

The fused loss: its gradient with alpha between 1/2 and 1 (the data's cross-entropy mixed in), and in the head alone
(hidden states frozen), against autograd on whole logits; GPT.forward's teacher and teacher_reading keep both
models' logit soft-caps. The teacher's loader: a classifier, an encoder, another vocabulary size (larger or smaller)
or another tokenizer of the same file size is refused; bf16 under both bf16 precisions (fp32 otherwise). On-policy
distillation: a sampler too long for the context is refused at the boundary, the sampler samples at the run's
temperature and seed, each (step, micro-batch) draws its own samples_this_time, and the trainer samples a
micro-batch exactly when (and as) that step says. Evaluation leaves the step's training sums alone and counts only
the val batches, in eval mode. A resume accepts the same teacher's files at another path. The settings' refusals:
alpha or temperature without a teacher, online training or FSDP with one. The plan: the teacher's weights and hidden
states exactly (fp32 and bf16), six head chunks, the forward at the student's row length, on-policy sampling time in
proportion to its share, none for token data.
"""

from __future__ import annotations

import copy
import shutil

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from lmforge.data.batches import IGNORE_INDEX
from lmforge.errors import ConfigError
from lmforge.head_loss import Teacher, linear_distillation
from lmforge.train import Trainer
from test_distill import config, corpus, divergence, random_case, sft, teacher, whole_logits  # noqa: F401 (fixtures)


def build(run_dir, data, **overrides) -> Trainer:
    return Trainer(config(run_dir, data, **overrides), progress=False, tensorboard=False)


# ------------------------------------------------------------------------------------------- the loss
@pytest.mark.parametrize("alpha", [0.6, 0.9])
@pytest.mark.parametrize("frozen_hidden", [False, True])
def test_the_gradient_mixes_the_cross_entropy_and_reaches_a_head_alone(alpha, frozen_hidden):
    """alpha above 1/2 still mixes 1 - alpha of the data's cross-entropy into the gradient; with the hidden states
    frozen (no gradient), the head's gradient is autograd's on whole logits all the same (generalized JSD,
    temperature 1.5, soft-capped student, chunks of 4)."""
    h, w, y, h_t, w_t = random_case(seed=3)
    if frozen_hidden:
        h = h.detach()
    got = linear_distillation(h, w, y, Teacher(h_t, w_t, 2.0, alpha, 0.4, 1.5), 3.0, chunk=4)
    want = whole_logits(h.reshape(-1, 12), w, y.flatten(), h_t.reshape(-1, 20), w_t, alpha, 0.4, 1.5, 3.0, 2.0)
    torch.testing.assert_close(got[0], want[0].detach(), rtol=1e-5, atol=1e-4)
    inputs = (w,) if frozen_hidden else (h, w)
    for mine, theirs in zip(torch.autograd.grad(got[0], inputs), torch.autograd.grad(want[0], inputs)):
        torch.testing.assert_close(mine, theirs, rtol=1e-4, atol=1e-5)


def test_the_models_forward_and_teacher_reading_keep_both_soft_caps(corpus, teacher, tmp_path):  # noqa: F811
    """GPT.forward(targets, teacher=teacher_reading(...)) of a soft-capped student and a soft-capped teacher of
    another width is the formula on both models' whole (capped) logits, and so is its gradient."""
    from lmforge.model import GPT
    from lmforge.train.distill import teacher_reading

    settings = {"train.distill_from": teacher, "train.distill_alpha": 0.5, "train.distill_beta": 0.5,
                "train.distill_temperature": 1.5}
    cfg = config(tmp_path / "s", corpus, **{**settings, "model.logit_softcap": 2.0})
    t_cfg = config(tmp_path / "t", corpus, **{"model.logit_softcap": 1.5, "model.n_embd": 48, "model.n_head": 3})
    torch.manual_seed(0)
    student, teach = GPT(cfg.model), GPT(t_cfg.model).requires_grad_(False)
    for model, scale in ((student, 3.0), (teach, 4.0)):  # logits large enough for the caps to matter
        with torch.no_grad():
            model.lm_head.weight.mul_(scale * 50)
    x = torch.randint(0, cfg.model.vocab_size, (2, 16))
    y = torch.randint(0, cfg.model.vocab_size, (2, 16))
    y[0, :5] = IGNORE_INDEX
    reading = teacher_reading(teach, x, None, cfg)
    loss, ce, d = student(x, targets=y, teacher=reading, loss_chunk=7)
    z, z_t = student(x).flatten(0, 1), teach(x).float().flatten(0, 1)
    assert float(z.detach().abs().max()) <= 2.0 and float(z_t.abs().max()) <= 1.5 and float(z_t.abs().max()) > 1.2
    counted = y.flatten() != IGNORE_INDEX
    want_ce = F.cross_entropy(z[counted], y.flatten()[counted], reduction="sum")
    want_d = divergence(F.log_softmax(z[counted] / 1.5, -1), F.log_softmax(z_t[counted] / 1.5, -1), 0.5).sum()
    want = 0.5 * want_d + 0.5 * want_ce
    for mine, theirs in ((loss, want), (ce, want_ce), (d, want_d)):
        torch.testing.assert_close(mine, theirs.detach(), rtol=1e-5, atol=1e-4)
    params = [student.lm_head.weight, next(student.blocks[0].parameters())]
    for mine, theirs in zip(torch.autograd.grad(loss, params), torch.autograd.grad(want, params)):
        torch.testing.assert_close(mine, theirs, rtol=1e-4, atol=1e-5)


# ------------------------------------------------------------------------------------------- the teacher
@pytest.mark.parametrize("change, message", [({"head": "classify", "num_labels": 2}, "not a decoder"),
                                             ({"causal": False}, "not a decoder"),
                                             ({"vocab_size": +7}, "predicts"), ({"vocab_size": -7}, "predicts")])
def test_a_teacher_that_cannot_teach_is_refused(corpus, teacher, tmp_path, change, message):  # noqa: F811
    """A teacher saved as a classifier, an encoder, or with a larger or a smaller vocabulary (the data's tokenizer
    beside it, random weights): refused in one line."""
    import dataclasses

    from lmforge.checkpoint import read_run_config, resolve_checkpoint, save_checkpoint
    from lmforge.config import RunConfig
    from lmforge.model import GPT

    ckpt = resolve_checkpoint(teacher)
    model = read_run_config(ckpt).model
    values = {k: (model.vocab_size + v if k == "vocab_size" else v) for k, v in change.items()}
    other = dataclasses.replace(model, **values)
    save_checkpoint(tmp_path / "other", 0, GPT(other), None, RunConfig(model=other), {"tokens_seen": 0},
                    ckpt / "tokenizer.json")
    with pytest.raises(ConfigError, match=message):
        build(tmp_path / "run", corpus, **{"train.distill_from": tmp_path / "other"})


def test_a_tokenizer_of_the_same_size_is_still_another(corpus, teacher, tmp_path):  # noqa: F811
    """A teacher whose tokenizer.json has the data's bytes in another order (two characters' ids swapped: the same
    file size, other text for the same ids) is refused."""
    import json

    from lmforge.files import sha256_file

    other = tmp_path / "other-teacher"
    shutil.copytree(teacher, other)
    ckpt = next((other / "checkpoints").iterdir())
    file = ckpt / "tokenizer.json"
    text = file.read_text()
    chars = json.loads(text)["chars"]
    a, b = json.dumps(chars[3]), json.dumps(chars[4])
    swapped = text.replace(f"{a},", "@@,", 1).replace(f"{b},", f"{a},", 1).replace("@@,", f"{b},", 1)
    assert swapped != text and len(swapped) == len(text) and json.loads(swapped)["chars"][3] == chars[4]
    file.write_text(swapped)
    manifest = json.loads((ckpt / "manifest.json").read_text())
    manifest["files"]["tokenizer.json"].update(sha256=sha256_file(file), bytes=file.stat().st_size)
    (ckpt / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ConfigError, match="reads another tokenizer"):
        build(tmp_path / "run", corpus, **{"train.distill_from": other})


@pytest.mark.parametrize("precision, dtype", [("fp32", torch.float32), ("bf16-mixed", torch.bfloat16),
                                              ("bf16-compute", torch.bfloat16)])
def test_the_teacher_is_bf16_under_either_bf16_precision(corpus, teacher, tmp_path, precision, dtype):  # noqa: F811
    trainer = build(tmp_path / "run", corpus, **{"train.distill_from": teacher, "train.precision": precision})
    assert {p.dtype for p in trainer.teacher.parameters()} == {dtype}


# ------------------------------------------------------------------------------------------- on-policy
def test_the_sampler_needs_room_for_a_prompt_and_samples_as_configured(sft, tmp_path):  # noqa: F811
    """online_max_new_tokens equal to block_size is refused (no room for a prompt's token), one less is not; the
    sampler samples at the run's online_temperature and with its seed."""
    base, data = sft
    extra = {"train.distill_from": base, "train.distill_on_policy": 1.0, "model.block_size": 48}
    with pytest.raises(ConfigError, match="leaves no room for a prompt"):
        build(tmp_path / "a", data, **{**extra, "train.online_max_new_tokens": 48})
    trainer = build(tmp_path / "b", data, **{**extra, "train.online_max_new_tokens": 47,
                                             "train.online_temperature": 0.7, "train.seed": 5})
    assert trainer.sampler.temperature == 0.7 and trainer.sampler.seed == 5
    assert trainer.sampler.max_new_tokens == 47 and trainer.sampler.rows_per_prompt == 1


def test_each_step_and_micro_batch_draws_its_own(corpus, teacher, tmp_path):  # noqa: F811
    """samples_this_time with share 0.3 over 200 steps x 4 micro-batches: about 0.3 of them, about 0.3 of each
    micro-batch's steps (the step matters), and another seed draws otherwise."""
    from lmforge.train.distill import samples_this_time

    def draws(seed: int) -> np.ndarray:
        cfg = config(tmp_path / "run", corpus, **{"train.distill_from": teacher, "train.distill_on_policy": 0.3,
                                                  "train.seed": seed})
        return np.array([[samples_this_time(cfg, step, micro) for micro in range(4)] for step in range(200)])

    first, second = draws(1), draws(2)
    assert 0.24 < first.mean() < 0.36
    assert all(0.18 < first[:, micro].mean() < 0.42 for micro in range(4))
    assert (first != second).mean() > 0.2


def test_the_trainer_samples_a_micro_batch_when_and_as_its_step_says(sft, tmp_path):  # noqa: F811
    """At steps 0..5 (micro-batches 0, 1), distill_batch returns the data's batch exactly where samples_this_time
    says no, and elsewhere the sampler's sample of its prompts for that step and micro-batch (the student as it is)."""
    from lmforge.train.distill import samples_this_time

    base, data = sft
    trainer = build(tmp_path / "run", data, **{"train.distill_from": base, "train.distill_on_policy": 0.5,
                                               "train.online_max_new_tokens": 5, "model.block_size": 48})
    batch = copy.deepcopy(trainer.train_data).next_batch()
    seen = set()
    for step in range(6):
        trainer.step = step
        for micro in range(2):
            sampled = samples_this_time(trainer.config, step, micro)
            seen.add((sampled, samples_this_time(trainer.config, 0, micro)))
            got = trainer.distill_batch(batch, micro)
            if not sampled:
                assert got is batch
                continue
            (x, y, _), _ = trainer.sampler.groups(copy.deepcopy(trainer.raw_model), batch, 1, step, micro,
                                                  scale=False)
            assert torch.equal(got[0], x) and torch.equal(got[1], y)
            assert not torch.equal(got[1], batch[1])
    assert (True, False) in seen  # a step that samples where step 0 does not
    samples = {}
    for step in (1, 2, 3):  # and the step seeds the sample itself
        trainer.step = step
        samples[step] = trainer.sampler.groups(copy.deepcopy(trainer.raw_model), batch, 1, step, 0, scale=False)[0][0]
    assert len({tuple(s.flatten().tolist()) for s in samples.values()}) > 1


# ------------------------------------------------------------------------------------------- evaluation
def test_evaluation_leaves_the_training_sums_and_counts_only_val(corpus, teacher, tmp_path):  # noqa: F811
    """After a trained step, evaluate() (a model with dropout) is the student's cross-entropy and divergence over
    the val batches in eval mode, whatever the step's sums were, and leaves those sums as they were."""
    trainer = build(tmp_path / "run", corpus, **{"train.distill_from": teacher, "train.distill_alpha": 0.5,
                                                 "train.distill_beta": 1.0, "model.dropout": 0.3,
                                                 "train.max_steps": 1})
    trainer.fit()
    sums = torch.tensor([123.0, 45.0], dtype=torch.float64)
    trainer.distilled = sums.clone()
    val_loss = trainer.evaluate()
    assert torch.equal(trainer.distilled, sums)
    assert trainer.raw_model.training
    trainer.raw_model.eval()
    ce = d = n = 0.0
    for x, y in trainer.val_batches:
        with torch.no_grad():
            z, z_t = trainer.raw_model(x).float().flatten(0, 1), trainer.teacher(x).float().flatten(0, 1)
        ce += float(F.cross_entropy(z, y.flatten(), reduction="sum"))
        d += float(divergence(F.log_softmax(z, -1), F.log_softmax(z_t, -1), 1.0).sum())
        n += y.numel()
    trainer.raw_model.train()
    assert val_loss == pytest.approx(ce / n, rel=1e-5)
    assert trainer.val_metrics["val_distill_divergence"] == pytest.approx(d / n, rel=1e-5)


# ------------------------------------------------------------------------------------------- resume
def test_a_resume_accepts_the_same_teacher_at_another_path(corpus, teacher, tmp_path):  # noqa: F811
    """The fingerprint is of the teacher's files, not of where they lie: a copy of the teacher's run resumes."""
    extra = {"train.distill_from": teacher, "train.max_steps": 2, "train.save_interval": 2}
    build(tmp_path / "student", corpus, **extra).fit()
    copied = tmp_path / "copied-teacher"
    shutil.copytree(teacher, copied)
    resumed = build(tmp_path / "student", corpus, **{**extra, "train.distill_from": copied, "train.max_steps": 3,
                                                     "train.resume": "auto"})
    resumed.fit()
    assert [step for step, _ in resumed.history] == [3]


# ------------------------------------------------------------------------------------------- settings
def test_settings_that_need_or_refuse_a_teacher(corpus, teacher, tmp_path):  # noqa: F811
    for key, value in (("distill_alpha", 0.5), ("distill_temperature", 2.0)):
        with pytest.raises(ConfigError, match="set train.distill_from"):
            config(tmp_path / "a", corpus, **{f"train.{key}": value})
    with pytest.raises(ConfigError, match="online training learns from its own samples"):
        config(tmp_path / "b", corpus, **{"train.distill_from": teacher, "train.online_reward_model": teacher})
    with pytest.raises(ConfigError, match="samples from the whole student"):
        config(tmp_path / "c", corpus, **{"train.distill_from": teacher, "train.parallel": "fsdp",
                                          "train.distill_on_policy": 0.5})


# ------------------------------------------------------------------------------------------- the plan
@pytest.mark.parametrize("precision, size", [("fp32", 4), ("bf16-mixed", 2)])
def test_the_plan_counts_the_teachers_weights_and_hidden_states_exactly(corpus, teacher, tmp_path, precision,
                                                                        size):  # noqa: F811
    """The teacher's memory is its parameters and its hidden states of a micro-batch (batch 4 x 16 tokens x its
    width 48), 4 bytes each in fp32 and 2 in bf16; the fused head holds six (chunk x vocabulary) fp32 arrays where
    the cross-entropy holds one."""
    from lmforge.checkpoint import read_run_config, resolve_checkpoint
    from lmforge.model import count_parameters
    from lmforge.plan import plan

    theirs = read_run_config(resolve_checkpoint(teacher)).model
    alone = plan(config(tmp_path / "run", corpus, **{"train.precision": precision}))
    distilled = plan(config(tmp_path / "run", corpus, **{"train.precision": precision,
                                                         "train.distill_from": teacher}))
    assert theirs.n_embd == 48 != config(tmp_path / "run", corpus).model.n_embd
    assert distilled.teacher == size * count_parameters(theirs).total + size * 4 * 16 * 48
    assert distilled.state - alone.state == pytest.approx(distilled.teacher)  # held beside the student's state
    chunk = min(config(tmp_path / "run", corpus).train.loss_chunk, 4 * 16)
    vocab = config(tmp_path / "run", corpus).model.vocab_size
    assert distilled.activations - alone.activations == pytest.approx(5 * chunk * vocab * 4.0)


def test_the_plan_counts_the_teachers_forward_at_the_students_row_length(corpus, teacher, tmp_path):  # noqa: F811
    from lmforge.checkpoint import read_run_config, resolve_checkpoint
    from lmforge.model import flops_per_token
    from lmforge.plan import plan

    theirs = read_run_config(resolve_checkpoint(teacher)).model
    assert theirs.block_size == 16
    distilled = plan(config(tmp_path / "run", corpus, **{"train.distill_from": teacher, "model.block_size": 8}))
    assert flops_per_token(theirs, 8) != flops_per_token(theirs, 16)
    assert distilled.teacher_flops_per_token == flops_per_token(theirs, 8) // 3


def test_the_plan_times_on_policy_sampling_by_its_share_and_not_on_token_data(sft, corpus, teacher,
                                                                               tmp_path):  # noqa: F811
    """On an H100 (no measured rates) sampling half the micro-batches takes half the time of sampling all; token data
    (no prompts: training refuses on-policy) counts no sampling."""
    from lmforge.plan import plan

    base, data = sft

    def planned(share: float):
        return plan(config(tmp_path / "run", data, **{
            "train.distill_from": base, "model.block_size": 48, "train.grad_accum": 2, "train.distill_on_policy": share,
            "train.online_max_new_tokens": 8}), device="h100", task="sft")

    half, whole = planned(0.5), planned(1.0)
    assert whole.sampling_time > 0
    assert half.sampling_time == pytest.approx(0.5 * whole.sampling_time, rel=1e-9)
    tokens = plan(config(tmp_path / "run", corpus, **{"train.distill_from": teacher, "train.distill_on_policy": 1.0}))
    assert tokens.sampling_time == 0 and tokens.sampled_tokens_per_step == 0


def test_preference_data_is_refused(sft, tmp_path):  # noqa: F811
    """Preference data (pairs, not next tokens) with a teacher is refused in one line naming the data's kind."""
    from test_online_preference import a_records
    from test_preference import write_jsonl

    from lmforge.cli import main

    base, _ = sft
    assert main(["prepare", str(write_jsonl(tmp_path / "pairs.jsonl", a_records())), "--task", "preference",
                 "--tokenizer", str(base), "--out", str(tmp_path / "pairs")]) == 0
    with pytest.raises(ConfigError, match="this is preference data"):
        build(tmp_path / "b", tmp_path / "pairs", **{"train.distill_from": base, "model.block_size": 48,
                                                     "train.preference_loss": "simpo"})
