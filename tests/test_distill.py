"""Knowledge distillation (train.distill_from): the student learns a frozen teacher's next-token distribution.

The fused loss (head_loss.linear_distillation) is checked against TRL's DistillationTrainer loss
(_chunked_divergence_loss: forward KL, reverse KL and the generalized JSD, a temperature, a soft-capped student, a
teacher of another width) and against the formula on whole logits with autograd, the data's cross-entropy mixed in;
in the trainer: a step's loss is the formula on the teacher's and the student's logits of its batch (sft data: the
completion's positions only), validation reports the student's own cross-entropy and its divergence, a distilled
student ends nearer the teacher than one trained on the data alone, a resumed run is bit-identical, and what cannot
work is refused in one line.
"""

from __future__ import annotations

import copy
import json
import math
import shutil
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from lmforge.config import load_run_config
from lmforge.data.batches import IGNORE_INDEX
from lmforge.errors import CheckpointError, ConfigError
from lmforge.head_loss import Teacher, linear_distillation
from lmforge.train import Trainer
from lmforge.train.metrics import read_metrics
from tiny_training import prepared_corpus


# ------------------------------------------------------------------------------------------- the loss
def divergence(log_ps: torch.Tensor, log_pt: torch.Tensor, beta: float) -> torch.Tensor:
    """Each row's beta KL(p_t || m) + (1 - beta) KL(p_s || m), m = beta p_t + (1 - beta) p_s, written out (the ends:
    forward and reverse KL)."""
    ps, pt = log_ps.exp(), log_pt.exp()
    if beta == 0.0:
        return (pt * (log_pt - log_ps)).sum(-1)
    if beta == 1.0:
        return (ps * (log_ps - log_pt)).sum(-1)
    log_m = (beta * pt + (1 - beta) * ps).log()
    return beta * (pt * (log_pt - log_m)).sum(-1) + (1 - beta) * (ps * (log_ps - log_m)).sum(-1)


def whole_logits(h, w, y, h_t, w_t, alpha, beta, temperature, cap=0.0, teacher_cap=0.0):
    """(alpha D + (1 - alpha) CE, CE, D) summed over the counted targets, from whole logits with autograd."""
    z, z_t = h @ w.t(), h_t @ w_t.t()
    z = cap * torch.tanh(z / cap) if cap else z
    z_t = teacher_cap * torch.tanh(z_t / teacher_cap) if teacher_cap else z_t
    counted = y != IGNORE_INDEX
    ce = F.cross_entropy(z[counted], y[counted], reduction="sum")
    d = divergence(F.log_softmax(z[counted] / temperature, -1), F.log_softmax(z_t[counted] / temperature, -1),
                   beta).sum()
    return alpha * d + (1 - alpha) * ce, ce, d


def random_case(seed: int = 0, width: int = 12, teacher_width: int = 20, vocab: int = 29):
    torch.manual_seed(seed)
    h = torch.randn(3, 7, width, requires_grad=True)
    w = (torch.randn(vocab, width) * 0.7).requires_grad_()
    h_t, w_t = torch.randn(3, 7, teacher_width), torch.randn(vocab, teacher_width) * 0.7
    y = torch.randint(0, vocab, (3, 7))
    y[0, :4] = IGNORE_INDEX  # a prompt's positions
    return h, w, y, h_t, w_t


@pytest.mark.parametrize("beta", [0.0, 0.4, 1.0])
@pytest.mark.parametrize("temperature", [1.0, 1.7])
@pytest.mark.parametrize("cap", [0.0, 3.0])
def test_the_divergence_and_its_gradient_are_trls(beta, temperature, cap):
    """D of linear_distillation (alpha 1) over the counted positions, divided by their count, equals TRL's
    DistillationTrainer loss, and so do the gradients in the student's hidden states and head; the teacher is wider
    than the student; the chunks (5 tokens) do not divide the counted positions."""
    from trl.trainer.distillation_trainer import _chunked_divergence_loss

    h, w, y, h_t, w_t = random_case()
    ours_h, ours_w = h.detach().clone().requires_grad_(), w.detach().clone().requires_grad_()
    loss, _, d = linear_distillation(ours_h, ours_w, y, Teacher(h_t, w_t, 0.0, 1.0, beta, temperature), cap, chunk=5)
    counted = int((y != IGNORE_INDEX).sum())
    (loss / counted).backward()
    want, _, n = _chunked_divergence_loss(h, h_t, w, w_t, (y != IGNORE_INDEX).long(), beta,
                                          student_final_logit_softcapping=cap or None, temperature=temperature)
    want.backward()
    assert int(n) == counted
    torch.testing.assert_close(d / counted, want.detach(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(ours_h.grad, h.grad, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(ours_w.grad, w.grad, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("alpha", [1.0, 0.25, 0.0])
@pytest.mark.parametrize("beta", [0.0, 0.5, 1.0])
def test_the_mixed_loss_is_the_formula_on_whole_logits(alpha, beta):
    """alpha D + (1 - alpha) CE, CE and D equal the formula on whole logits (both models soft-capped, temperature 2),
    and the gradients of the first equal autograd's; CE and D carry no gradient; without gradients the same values."""
    h, w, y, h_t, w_t = random_case(seed=1)
    got = linear_distillation(h, w, y, Teacher(h_t, w_t, 2.5, alpha, beta, 2.0), 4.0, chunk=4)
    want = whole_logits(h.reshape(-1, 12), w, y.flatten(), h_t.reshape(-1, 20), w_t, alpha, beta, 2.0, 4.0, 2.5)
    for mine, theirs in zip(got, want):
        torch.testing.assert_close(mine, theirs.detach(), rtol=1e-5, atol=1e-4)
    assert not got[1].requires_grad and not got[2].requires_grad
    for mine, theirs in zip(torch.autograd.grad(got[0], (h, w)), torch.autograd.grad(want[0], (h, w))):
        torch.testing.assert_close(mine, theirs, rtol=1e-4, atol=1e-5)
    with torch.no_grad():
        again = linear_distillation(h, w, y, Teacher(h_t, w_t, 2.5, alpha, beta, 2.0), 4.0, chunk=0)
    for mine, theirs in zip(again, got):
        torch.testing.assert_close(mine, theirs.detach(), rtol=1e-5, atol=1e-4)


def test_a_student_equal_to_its_teacher_has_no_divergence():
    """The same hidden states and head: D is 0 for every beta and temperature, and so is its gradient."""
    h, w, y, _, _ = random_case(seed=2, teacher_width=12)
    for beta in (0.0, 0.3, 1.0):
        loss, _, d = linear_distillation(h, w, y, Teacher(h.detach(), w.detach(), 0.0, 1.0, beta, 1.5))
        assert abs(float(d)) < 1e-5
        grads = torch.autograd.grad(loss, (h, w))
        assert max(float(g.abs().max()) for g in grads) < 1e-5


# ------------------------------------------------------------------------------------------- the trainer
SETTINGS = {"train.device": "cpu", "train.num_threads": "1", "train.batch_size": "4", "model.block_size": "16",
            "train.log_interval": "1", "train.eval_interval": "0", "train.eval_batches": "3", "train.plot": "false",
            "optim.warmup_steps": "2", "train.save_interval": "0"}


def config(run_dir: Path, data: Path, **overrides: object):
    values = {**SETTINGS, "preset": "tiny", "data.path": str(data), "train.run_dir": str(run_dir),
              "train.max_steps": "4", **{k: str(v) for k, v in overrides.items()}}
    return load_run_config(None, values)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    return prepared_corpus(tmp_path_factory.mktemp("distill"))


@pytest.fixture(scope="module")
def teacher(corpus, tmp_path_factory) -> Path:
    """A wider model (48, 3 heads) trained 120 steps on the corpus: its run directory."""
    run = tmp_path_factory.mktemp("teacher") / "run"
    Trainer(config(run, corpus, **{"model.n_embd": 48, "model.n_head": 3, "train.max_steps": 120,
                                   "optim.lr": 3e-3}), progress=False, tensorboard=False).fit()
    return run


def logits(model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(x).float()


def test_a_step_trains_the_formula_on_the_teachers_and_students_logits(corpus, teacher, tmp_path):
    """The first step's loss is alpha D + (1 - alpha) CE over its batch from the teacher's and the student's whole
    logits (generalized JSD, temperature 2), divided by the batch's tokens; the log carries CE and D beside it, and
    the weights moved."""
    trainer = Trainer(config(tmp_path / "run", corpus, **{
        "train.distill_from": teacher, "train.distill_alpha": 0.6, "train.distill_beta": 0.3,
        "train.distill_temperature": 2.0, "train.max_steps": 1}), progress=False, tensorboard=False)
    student = copy.deepcopy(trainer.raw_model)
    batch = copy.deepcopy(trainer.train_data).next_batch()
    trainer.fit()
    x, y = batch
    z, z_t = logits(student, x).flatten(0, 1), logits(trainer.teacher, x).flatten(0, 1)
    ce = F.cross_entropy(z, y.flatten(), reduction="sum")
    d = divergence(F.log_softmax(z / 2, -1), F.log_softmax(z_t / 2, -1), 0.3).sum()
    n = y.numel()
    assert trainer.history[0][1] == pytest.approx(float(0.6 * d + 0.4 * ce) / n, rel=1e-5)
    record = [r for r in read_metrics(tmp_path / "run") if r["kind"] == "train"][0]
    assert record["lm_loss"] == pytest.approx(float(ce) / n, rel=1e-5)
    assert record["distill_divergence"] == pytest.approx(float(d) / n, rel=1e-5)
    assert any(not torch.equal(a, b) for a, b in zip(student.state_dict().values(),
                                                     trainer.raw_model.state_dict().values()))


def test_validation_reports_the_students_cross_entropy_and_its_divergence(corpus, teacher, tmp_path):
    """val_loss is the student's own cross-entropy over the val batches (what any language model's val_loss is),
    val_distill_divergence its mean forward KL from the teacher there."""
    trainer = Trainer(config(tmp_path / "run", corpus, **{"train.distill_from": teacher, "train.distill_alpha": 0.5}),
                      progress=False, tensorboard=False)
    val_loss = trainer.evaluate()
    ce = d = n = 0.0
    for x, y in trainer.val_batches:
        z, z_t = logits(trainer.raw_model, x).flatten(0, 1), logits(trainer.teacher, x).flatten(0, 1)
        ce += float(F.cross_entropy(z, y.flatten(), reduction="sum"))
        d += float(divergence(F.log_softmax(z, -1), F.log_softmax(z_t, -1), 0.0).sum())
        n += y.numel()
    assert val_loss == pytest.approx(ce / n, rel=1e-5)
    assert trainer.val_metrics["val_distill_divergence"] == pytest.approx(d / n, rel=1e-5)


def sft_teacher_and_data(root: Path) -> tuple[Path, Path]:
    """(a byte-tokenizer teacher trained 40 steps with a 48-token context, sft data of short records prepared with
    its tokenizer)."""
    from test_online_preference import a_records
    from test_preference import write_jsonl
    from test_tasks import make_base

    from lmforge.cli import main

    base = make_base(root / "base", **{"train.max_steps": 40, "optim.lr": 1e-2,  # a teacher with opinions
                                       "model.block_size": 48})  # rows that hold several packed examples
    records = [{"prompt": r["prompt"], "completion": r["chosen"]} for r in a_records()]
    assert main(["prepare", str(write_jsonl(root / "sft.jsonl", records)), "--task", "sft", "--tokenizer",
                 str(base), "--out", str(root / "data")]) == 0
    return base, root / "data"


@pytest.fixture(scope="module")
def sft(tmp_path_factory) -> tuple[Path, Path]:
    return sft_teacher_and_data(tmp_path_factory.mktemp("sft"))


@pytest.mark.parametrize("packing", [False, True])
def test_sft_data_distills_the_completions_positions_only(sft, tmp_path, packing):
    """On sft data the divergence and the cross-entropy count the completion's positions (labels not -100) only:
    the step's loss is the formula over those, not over every position; packed rows (data.packing) are read by the
    teacher as by the student, each example attending to itself only."""
    base, data = sft
    trainer = Trainer(config(tmp_path / "run", data, **{"train.distill_from": base,
                                                         "train.max_steps": 1, "data.packing": packing,
                                                         "model.block_size": 48}),
                      progress=False, tensorboard=False)
    student = copy.deepcopy(trainer.raw_model)
    x, y, *mask = copy.deepcopy(trainer.train_data).next_batch()
    trainer.fit()
    assert bool(mask) == packing
    kwargs = {"attention_mask": mask[0]} if mask else {}
    with torch.no_grad():
        z, z_t = student(x, **kwargs).flatten(0, 1), trainer.teacher(x, **kwargs).float().flatten(0, 1)
    counted = y.flatten() != IGNORE_INDEX
    assert 0 < int(counted.sum()) < counted.numel()
    d = divergence(F.log_softmax(z[counted], -1), F.log_softmax(z_t[counted], -1), 0.0)
    assert trainer.history[0][1] == pytest.approx(float(d.sum()) / int(counted.sum()), rel=1e-5)
    everywhere = divergence(F.log_softmax(z, -1), F.log_softmax(z_t, -1), 0.0).mean()
    assert abs(float(everywhere) - trainer.history[0][1]) > 1e-3


def test_a_distilled_student_ends_nearer_its_teacher(corpus, teacher, tmp_path):
    """40 steps distilled from the teacher leave the student's val divergence from it below a student's
    trained the same steps on the data alone (measured the same way), and below its own at the start."""
    def trained(name: str, **extra: object) -> Trainer:
        run = Trainer(config(tmp_path / name, corpus, **{"train.max_steps": 40, "optim.lr": 1e-2, **extra}),
                      progress=False, tensorboard=False)
        run.fit()
        return run

    distilled = trained("kd", **{"train.distill_from": teacher})
    plain = trained("plain")
    start = Trainer(config(tmp_path / "start", corpus, **{"train.distill_from": teacher}), progress=False,
                    tensorboard=False)
    start.evaluate()
    plain_copy = Trainer(config(tmp_path / "measure", corpus, **{"train.distill_from": teacher}), progress=False,
                         tensorboard=False)
    plain_copy.raw_model.load_state_dict(plain.raw_model.state_dict())
    plain_copy.evaluate()
    ours = distilled.val_metrics["val_distill_divergence"]
    assert ours < 0.95 * plain_copy.val_metrics["val_distill_divergence"]
    assert ours < 0.5 * start.val_metrics["val_distill_divergence"]


def test_a_resumed_distillation_is_bit_identical(corpus, teacher, tmp_path):
    """A 6-step distillation saving at step 3, and another resumed from that checkpoint alone: the same losses and
    evaluation."""
    extra = {"train.distill_from": teacher, "train.distill_alpha": 0.7, "train.max_steps": 6,
             "train.save_interval": 3, "train.eval_interval": 3}
    full = Trainer(config(tmp_path / "full", corpus, **extra), progress=False, tensorboard=False)
    full.fit()
    (tmp_path / "resumed" / "checkpoints").mkdir(parents=True)
    shutil.copytree(tmp_path / "full" / "checkpoints" / "step-00000003",
                    tmp_path / "resumed" / "checkpoints" / "step-00000003")
    resumed = Trainer(config(tmp_path / "resumed", corpus, **{**extra, "train.resume": "auto"}), progress=False,
                      tensorboard=False)
    resumed.fit()
    assert [loss for _, loss in resumed.history] == [loss for step, loss in full.history if step > 3]
    assert resumed.val_loss == full.val_loss and resumed.val_metrics == full.val_metrics
    vocab = full.config.model.vocab_size  # each record's lm_loss is that step's mean, not a sum over steps
    records = [r for r in read_metrics(tmp_path / "full") if r["kind"] == "train"]
    assert len(records) == 6 and all(0 < r["lm_loss"] < math.log(vocab) + 0.5 for r in records)


def test_what_cannot_work_is_refused_in_one_line(corpus, teacher, tmp_path):
    """A missing teacher, a teacher of another tokenizer, vocabulary or a shorter context, a classifier teacher, the
    settings without a teacher, and distillation with objectives and options it cannot serve: each one line naming
    the setting."""
    with pytest.raises(CheckpointError, match="nowhere"):
        Trainer(config(tmp_path / "a", corpus, **{"train.distill_from": tmp_path / "nowhere"}), progress=False,
                tensorboard=False)
    other = tmp_path / "other-teacher"
    shutil.copytree(teacher, other)
    ckpt = next((other / "checkpoints").iterdir())
    tokenizer = json.loads((ckpt / "tokenizer.json").read_text())
    manifest = json.loads((ckpt / "manifest.json").read_text())
    tokenizer["note"] = "another tokenizer"  # a different file: another tokenizer as far as lmforge can tell
    (ckpt / "tokenizer.json").write_text(json.dumps(tokenizer))
    from lmforge.files import sha256_file

    manifest["files"]["tokenizer.json"].update(sha256=sha256_file(ckpt / "tokenizer.json"),
                                               bytes=(ckpt / "tokenizer.json").stat().st_size)
    (ckpt / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ConfigError, match="reads another tokenizer"):
        Trainer(config(tmp_path / "b", corpus, **{"train.distill_from": other}), progress=False, tensorboard=False)
    with pytest.raises(ConfigError, match="reads 16 tokens at most"):
        Trainer(config(tmp_path / "c", corpus, **{"train.distill_from": teacher, "model.block_size": 32}),
                progress=False, tensorboard=False)
    with pytest.raises(ConfigError, match="set train.distill_from"):
        config(tmp_path / "d", corpus, **{"train.distill_beta": 0.5})
    for extra, message in (({"train.objective": "mlm"}, "train.objective is mlm"),
                           ({"train.early_exit_layer": 1}, "no train.early_exit_layer"),
                           ({"model.head": "classify", "model.num_labels": 2}, "model.head lm")):
        with pytest.raises(ConfigError, match=message):
            config(tmp_path / "e", corpus, **{"train.distill_from": teacher, **extra})
    for key, value in (("distill_alpha", 1.5), ("distill_beta", -0.1), ("distill_temperature", 0)):
        with pytest.raises(ConfigError, match=key):
            config(tmp_path / "f", corpus, **{"train.distill_from": teacher, f"train.{key}": value})


def test_the_teacher_is_frozen_and_gets_no_gradient(corpus, teacher, tmp_path):
    """After steps of distillation the teacher's weights are the ones in its checkpoint, none needs a gradient, and
    the loss is finite."""
    trainer = Trainer(config(tmp_path / "run", corpus, **{"train.distill_from": teacher, "train.max_steps": 3}),
                      progress=False, tensorboard=False)
    before = {k: v.clone() for k, v in trainer.teacher.state_dict().items()}
    trainer.fit()
    assert all(not p.requires_grad and p.grad is None for p in trainer.teacher.parameters())
    assert all(torch.equal(before[k], v) for k, v in trainer.teacher.state_dict().items())
    assert all(math.isfinite(loss) for _, loss in trainer.history)


def test_the_plan_counts_the_teachers_forward_and_weights(corpus, teacher, tmp_path):
    """`lmforge plan` of a distillation adds the teacher's forward pass on the student's rows to each step's FLOPs
    and its weights (and hidden states) to the memory; an unreadable teacher is named in a note and not counted;
    --measure refuses it in one line."""
    from lmforge.checkpoint import read_run_config, resolve_checkpoint
    from lmforge.model import count_parameters, flops_per_token
    from lmforge.plan import measure, plan

    student = config(tmp_path / "run", corpus)
    distilled = config(tmp_path / "run", corpus, **{"train.distill_from": teacher})
    theirs = read_run_config(resolve_checkpoint(teacher)).model
    alone, with_teacher = plan(student), plan(distilled)
    forward = flops_per_token(theirs, 16) // 3
    assert with_teacher.teacher_flops_per_token == forward > 0
    assert with_teacher.step_flops_per_token == alone.step_flops_per_token + forward
    assert with_teacher.teacher >= 4.0 * count_parameters(theirs).total
    assert with_teacher.total_memory > alone.total_memory + 4.0 * count_parameters(theirs).total
    assert with_teacher.total_flops > alone.total_flops
    ddp, fsdp = (plan(distilled, device="h100", gpus=4, parallel=p) for p in ("ddp", "fsdp"))
    head = 4.0 * theirs.vocab_size * theirs.n_embd  # FSDP shards the teacher, but keeps its head whole on every GPU
    assert fsdp.teacher - ddp.teacher == pytest.approx(4.0 * count_parameters(theirs).total * (1 / 4 - 1) + head)
    missing = plan(config(tmp_path / "run", corpus, **{"train.distill_from": tmp_path / "none"}))
    assert missing.teacher == 0 and any("cannot be read" in n for n in missing.notes)
    with pytest.raises(ConfigError, match="--measure trains on random tokens"):
        measure(distilled)


def divergence_of_batch(student: torch.nn.Module, teacher: torch.nn.Module, x: torch.Tensor, y: torch.Tensor
                        ) -> tuple[float, int]:
    """(summed forward KL over the labelled positions, their count) from whole logits."""
    with torch.no_grad():
        z, z_t = student(x).flatten(0, 1), teacher(x).float().flatten(0, 1)
    counted = y.flatten() != IGNORE_INDEX
    d = divergence(F.log_softmax(z[counted], -1), F.log_softmax(z_t[counted], -1), 0.0)
    return float(d.sum()), int(counted.sum())


def test_on_policy_distillation_trains_on_the_students_own_samples(sft, tmp_path):
    """distill_on_policy 1: each micro-batch is one sample of each of its prompts by the student as it was at the
    step (temperature, at most online_max_new_tokens), labelled on the sample, and the step's loss is the divergence
    over the sampled tokens of both micro-batches, divided by their count; the data's completions are not trained."""
    base, data = sft
    trainer = Trainer(config(tmp_path / "run", data, **{
        "train.distill_from": base, "train.distill_on_policy": 1.0, "train.online_max_new_tokens": 6,
        "train.online_temperature": 0.7, "train.grad_accum": 2, "train.max_steps": 1, "model.block_size": 48}),
        progress=False, tensorboard=False)
    student = copy.deepcopy(trainer.raw_model)
    data_batches = copy.deepcopy(trainer.train_data)
    batches = [data_batches.next_batch() for _ in range(2)]
    sampled = [trainer.sampler.groups(copy.deepcopy(student), b, 1, 0, i, scale=False)[0][:2]
               for i, b in enumerate(batches)]
    trainer.fit()
    total = count = 0
    for (x, y), (_, data_y) in zip(sampled, batches):
        labelled = (y != IGNORE_INDEX).sum(dim=1)
        assert int(labelled.max()) <= 7 and int(labelled.min()) >= 1  # a sample (and its end token) of <= 6 tokens
        assert not torch.equal(y[y != IGNORE_INDEX], data_y[data_y != IGNORE_INDEX])
        d, n = divergence_of_batch(student, trainer.teacher, x, y)
        total, count = total + d, count + n
    assert trainer.history[0][1] == pytest.approx(total / count, rel=1e-5)
    on_data = sum(divergence_of_batch(student, trainer.teacher, *b)[0] for b in batches)
    assert abs(on_data / sum(int((b[1] != IGNORE_INDEX).sum()) for b in batches) - total / count) > 1e-4


def test_a_share_of_micro_batches_is_sampled_and_a_resume_draws_the_same(sft, tmp_path):
    """distill_on_policy 0.5: which micro-batches are the student's samples depends on the seed, the step and the
    micro-batch only (some are, some are not over 6 steps x 2); a run resumed from step 3 trains bit-identically."""
    from lmforge.train.distill import samples_this_time

    base, data = sft
    extra = {"train.distill_from": base, "train.distill_on_policy": 0.5, "train.online_max_new_tokens": 5,
             "train.grad_accum": 2, "train.max_steps": 6, "train.save_interval": 3, "train.eval_interval": 3,
             "model.block_size": 48}
    full = Trainer(config(tmp_path / "full", data, **extra), progress=False, tensorboard=False)
    draws = [samples_this_time(full.config, step, micro) for step in range(6) for micro in range(2)]
    assert any(draws) and not all(draws)
    assert any(draws[2 * k] != draws[2 * k + 1] for k in range(6))  # each micro-batch draws its own
    assert draws == [samples_this_time(full.config, step, micro) for step in range(6) for micro in range(2)]
    full.fit()
    (tmp_path / "resumed" / "checkpoints").mkdir(parents=True)
    shutil.copytree(tmp_path / "full" / "checkpoints" / "step-00000003",
                    tmp_path / "resumed" / "checkpoints" / "step-00000003")
    resumed = Trainer(config(tmp_path / "resumed", data, **{**extra, "train.resume": "auto"}), progress=False,
                      tensorboard=False)
    resumed.fit()
    assert [loss for _, loss in resumed.history] == [loss for step, loss in full.history if step > 3]


def test_on_policy_distillation_is_refused_where_it_cannot_sample(corpus, teacher, sft, tmp_path):
    """Token data has no prompts, packed rows hold several, a teacher is needed, and the sampling keys need
    sampling: each refused in one line naming the fix."""
    with pytest.raises(ConfigError, match="token data has none"):
        Trainer(config(tmp_path / "a", corpus, **{"train.distill_from": teacher, "train.distill_on_policy": 1}),
                progress=False, tensorboard=False)
    base, data = sft
    with pytest.raises(ConfigError, match="drop data.packing"):
        config(tmp_path / "b", data, **{"train.distill_from": base, "train.distill_on_policy": 1,
                                        "data.packing": True})
    with pytest.raises(ConfigError, match="set train.distill_from"):
        config(tmp_path / "c", data, **{"train.distill_on_policy": 0.5})
    with pytest.raises(ConfigError, match="on-policy distillation"):
        config(tmp_path / "d", data, **{"train.distill_from": base, "train.online_temperature": 0.5})
    with pytest.raises(ConfigError, match="the student's own samples"):
        config(tmp_path / "e", data, **{"train.distill_from": base, "train.distill_on_policy": 0.5,
                                        "train.distill_alpha": 0.5})


def test_the_plan_counts_on_policy_sampling_in_its_share_of_micro_batches(sft, tmp_path):
    """On sft data with distill_on_policy the plan counts one sample of each prompt (online_max_new_tokens) in that
    share of the micro-batches: half the sampled tokens at 0.5 of 1's, none at 0."""
    from lmforge.plan import plan

    base, data = sft
    plans = {share: plan(config(tmp_path / "run", data, **{
        "train.distill_from": base, "model.block_size": 48, "train.grad_accum": 2,
        **({"train.distill_on_policy": share, "train.online_max_new_tokens": 8} if share else {})}), task="sft")
        for share in (0.0, 0.5, 1.0)}
    assert plans[0.0].sampling_time == 0 and plans[0.0].sampled_tokens_per_step == 0
    assert plans[1.0].sampled_tokens_per_step == 2 * 4 * 8  # grad_accum x batch x new tokens, one sample a prompt
    assert plans[0.5].sampled_tokens_per_step == 32
    assert plans[0.5].sampling_time > 0 and plans[1.0].sampling_time > 0
    assert any("0.5 of the micro-batches" in note for note in plans[0.5].notes)


@pytest.mark.distributed
@pytest.mark.parametrize("on_policy,parallel", [(False, "ddp"), (True, "ddp"), (False, "fsdp")])
def test_two_processes_distill_like_one(sft, tmp_path, on_policy, parallel):
    """2 processes x 4 examples distill as 1 process x 8: the same losses and val loss (each process runs the teacher
    on its own rows; on-policy, each samples its own prompts with the seed rule of online training). FSDP shards the
    teacher like the student: each process holds about half of it."""
    from distributed_jobs import one_and_two

    base, data = sft
    settings = {"data.path": str(data), "train.distill_from": str(base), "model.block_size": 48,
                "optim.lr": 1e-2, **({"train.distill_on_policy": 1.0, "train.online_max_new_tokens": 5} if on_policy
                                     else {"train.distill_alpha": 0.5})}
    one, two = one_and_two(tmp_path, settings, {"train.parallel": parallel})
    assert [loss for _, loss in two["history"]] == pytest.approx([loss for _, loss in one["history"]], abs=1e-5)
    assert two["val_loss"] == pytest.approx(one["val_loss"], abs=1e-5)
    assert len({round(loss, 4) for _, loss in one["history"]}) > 3
    assert one["teacher_held"] == 1.0 and two["teacher_held"] == (pytest.approx(0.5, abs=0.01) if parallel == "fsdp"
                                                                   else 1.0)


def test_a_resume_refuses_a_teacher_that_changed(corpus, teacher, tmp_path):
    """A checkpoint names its teacher's checkpoint and fingerprint; resuming when train.distill_from gives another
    one (here: a newer checkpoint of the teacher's run) is refused in one line naming the original; the original
    resumes."""
    run = tmp_path / "teacher-run"
    shutil.copytree(teacher, run)
    extra = {"train.distill_from": run, "train.max_steps": 2, "train.save_interval": 2}
    Trainer(config(tmp_path / "student", corpus, **extra), progress=False, tensorboard=False).fit()
    state = json.loads(next((tmp_path / "student" / "checkpoints").iterdir()).joinpath("state.json").read_text())
    original = state["teacher"]["path"]
    assert Path(original).parent.parent == run and len(state["teacher"]["fingerprint"]) == 64
    Trainer(config(run, corpus, **{"model.n_embd": 48, "model.n_head": 3, "train.max_steps": 121,
                                   "train.resume": "auto", "train.save_interval": 1}), progress=False,
            tensorboard=False).fit()  # the teacher's run moves on: its newest checkpoint is another one
    more = {**extra, "train.max_steps": 3, "train.resume": "auto"}
    with pytest.raises(CheckpointError, match=f"pass --train.distill_from {original}"):
        Trainer(config(tmp_path / "student", corpus, **more), progress=False, tensorboard=False).fit()
    resumed = Trainer(config(tmp_path / "student", corpus, **{**more, "train.distill_from": original}),
                      progress=False, tensorboard=False)
    resumed.fit()
    assert [step for step, _ in resumed.history] == [3]
