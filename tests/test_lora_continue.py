"""A run started from a LoRA run (train.init_from LORA_RUN, e.g. an adapter `lmforge import` brought in): it trains
that run's adapters on, on the same frozen base. It starts at the LoRA run's model exactly, saves adapters that name
the original base, refuses a changed base and other adapter shapes, resumes exactly, and a preference run started
from it has the LoRA run's model, not the bare base, as its reference."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch

from lmforge.checkpoint import load_for_inference
from lmforge.cli import main
from lmforge.errors import CheckpointError
from lmforge.lora import is_adapted, lora_parameters, lora_state_dict
from lmforge.model import GPT
from lmforge.train import Trainer
from test_lora_train import lora_config
from test_preference import LOG2, base, dpo, pairs  # noqa: F401  (base, pairs: fixtures)
from test_plan import built  # noqa: F401,F811  (a fixture: the Trainers built)
from test_preference_precompute import by_hand
from tiny_training import tiny_config, tiny_trainer, write_base, write_prepared_data

LORA = {"lora.r": 4, "lora.targets": "q,v,o", "lora.alpha": 8}


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory):
    """ROOT/run: 6 LoRA steps on ROOT/base at a high learning rate (the adapters move far from zero)."""
    root = tmp_path_factory.mktemp("continue")
    base_dir = write_base(root)
    tiny_trainer(lora_config(root / "run", base_dir, **LORA, **{"train.max_steps": 6, "train.save_interval": 6,
                                                                 "optim.lr": 3e-2})).fit()
    return root


def continued_config(run_dir, init, **overrides):
    return tiny_config(run_dir, **{"train.init_from": init, "train.max_steps": 4, "optim.lr": 1e-2, **overrides})


def test_a_run_from_a_lora_run_starts_at_its_model_and_trains_its_adapters_on(lora_run, tmp_path, capsys):
    trainer = tiny_trainer(continued_config(tmp_path / "next", lora_run / "run", **{"train.save_interval": 4}))
    lora = trainer.config.lora
    assert (lora.r, lora.alpha, lora.targets) == (4, 8.0, ["q", "v", "o"])  # the LoRA run's section, not asked for
    model = trainer.raw_model
    x = torch.randint(0, 32, (3, 16), generator=torch.Generator().manual_seed(0))
    adapted, _, _ = load_for_inference(lora_run / "run")  # the LoRA run's model (its adapters merged)
    bare, _, _ = load_for_inference(lora_run / "base")
    with torch.no_grad():
        assert (model.eval()(x) - adapted(x)).abs().max() <= 1e-5  # it starts where the LoRA run ended
        assert (adapted(x) - bare(x)).abs().max() > 1e-2  # (which is not the base)
    model.train()
    trained = {id(p) for group in trainer.optimizer.param_groups for p in group["params"]}
    assert trained == {id(p) for p in lora_parameters(model)}  # the adapters train, the base stays frozen
    before = {k: v.clone() for k, v in model.state_dict().items()}
    trainer.fit()
    assert f"adapters from {lora_run / 'run'}" in capsys.readouterr().out  # the log says which adapters go on
    changed = {k for k, v in model.state_dict().items() if not torch.equal(v, before[k])}
    assert changed == set(lora_state_dict(model))
    ckpt = tmp_path / "next" / "checkpoints" / "step-00000004"
    first = json.loads((lora_run / "run" / "checkpoints" / "step-00000006" / "state.json").read_text())
    state = json.loads((ckpt / "state.json").read_text())
    assert state["base"] == first["base"]  # the original base, by path and fingerprint
    with torch.no_grad():
        moved, _, config = load_for_inference(tmp_path / "next")
        assert config.lora is not None and type(moved) is GPT
        assert (moved(x) - model.eval()(x)).abs().max() <= 1e-5
        assert (moved(x) - adapted(x)).abs().max() > 1e-4  # the continued adapters moved on
    assert main(["merge", str(tmp_path / "next"), "--out", str(tmp_path / "merged")]) == 0


def test_a_continued_run_resumes_bit_identically(lora_run, tmp_path):
    full = tiny_trainer(continued_config(tmp_path / "full", lora_run / "run", **{"train.save_interval": 2}))
    full.fit()
    (tmp_path / "resumed" / "checkpoints").mkdir(parents=True)
    shutil.copytree(tmp_path / "full" / "checkpoints" / "step-00000002",
                    tmp_path / "resumed" / "checkpoints" / "step-00000002")
    resumed = tiny_trainer(continued_config(tmp_path / "resumed", lora_run / "run", **{"train.resume": "auto"}))
    resumed.fit()
    assert [step for step, _ in resumed.history] == [3, 4]
    assert resumed.history == full.history[2:]
    ours, theirs = lora_state_dict(resumed.raw_model), lora_state_dict(full.raw_model)
    assert all(torch.equal(ours[k], theirs[k]) for k in theirs)


def test_lora_settings_may_repeat_the_runs_shape_and_change_dropout(lora_run, tmp_path):
    same = {**LORA, "lora.dropout": 0.2, "lora.targets": "o,q,v"}  # the same targets in another order
    trainer = tiny_trainer(continued_config(tmp_path / "same", lora_run / "run", **same))
    assert trainer.config.lora.dropout == 0.2 and is_adapted(trainer.raw_model)


def test_other_adapter_shapes_and_a_changed_base_are_one_line(lora_run, tmp_path, capsys):
    data = write_prepared_data(tmp_path / "data", {"train": ["hello world " * 40], "val": ["hello there " * 20]})
    for extra in (["--lora.r", "8"], ["--lora.targets", "q,v"], ["--lora.alpha", "16", "--lora.r", "4"]):
        code = main(["train", "--data", str(data), "--run-dir", str(tmp_path / "run"), "--train.init_from",
                     str(lora_run / "run"), "--train.max_steps", "1", *extra])
        err = capsys.readouterr().err
        assert code == 2 and len(err.strip().splitlines()) == 1, err
        assert "is a LoRA run with r=4, alpha=8, targets=q,v,o" in err and "lmforge merge" in err
        assert not (tmp_path / "run").exists()
    base_dir = write_base(tmp_path)  # a LoRA run of its own whose base is then replaced by a nudged one
    tiny_trainer(lora_config(tmp_path / "first", base_dir, **{"train.max_steps": 2, "train.save_interval": 2})).fit()
    shutil.rmtree(base_dir)
    write_base(tmp_path, nudge=True)
    with pytest.raises(CheckpointError, match="has fingerprint .* restore the original base"):
        tiny_trainer(continued_config(tmp_path / "other", tmp_path / "first"))
    assert not (tmp_path / "other").exists()


@pytest.fixture(scope="module")
def lora_dpo(base, pairs, tmp_path_factory):  # noqa: F811
    """A LoRA DPO run of 6 steps on the base (its adapters prefer the capitals): the start of the runs below."""
    run = tmp_path_factory.mktemp("lora-dpo") / "run"
    trainer = Trainer(dpo(run, pairs, base, **{"lora.r": 4, "lora.targets": "q,v,mlp", "optim.lr": 1e-2,
                                               "train.save_interval": 3}), progress=False, tensorboard=False)
    trainer.fit()
    assert trainer.history[-1][1] < LOG2 - 0.05
    return run


@pytest.mark.parametrize("precompute", [False, True])
def test_preference_from_a_lora_run_takes_its_model_as_the_reference(base, pairs, lora_dpo, tmp_path,  # noqa: F811
                                                                      precompute):
    trainer = Trainer(dpo(tmp_path / "run", pairs, lora_dpo, **{"train.precompute_reference": precompute}),
                      progress=False, tensorboard=False)
    assert trainer.config.lora is not None and is_adapted(trainer.raw_model)
    trainer.fit()
    assert trainer.history[0][1] == pytest.approx(LOG2, abs=1e-6)  # the policy is its reference at step 1
    assert trainer.history[-1][1] != pytest.approx(LOG2, abs=1e-4)
    if not precompute:  # a frozen plain copy of the starting model, its adapters folded in
        assert type(trainer.reference) is GPT and not is_adapted(trainer.reference)
        assert not any(p.requires_grad for p in trainer.reference.parameters())
    else:
        stored = trainer.train_data.examples.reference_logps
        np.testing.assert_allclose(stored, by_hand(lora_dpo, pairs, "train"), atol=2e-5)
        assert np.abs(stored - by_hand(base, pairs, "train")).max() > 1e-2  # (the bare base scores otherwise)


def test_precomputed_scores_of_other_adapters_are_not_reused(pairs, lora_dpo, tmp_path):  # noqa: F811
    """Two starts from the same base with other adapters (the LoRA run at steps 3 and 6) in one run directory: the
    second scores again instead of reading the first one's reference_logps.safetensors."""
    for step in (3, 6):
        init = lora_dpo / "checkpoints" / f"step-{step:08d}"
        trainer = Trainer(dpo(tmp_path / "run", pairs, init, **{"train.precompute_reference": True,
                                                                "train.max_steps": 1}),
                          progress=False, tensorboard=False)
        np.testing.assert_allclose(trainer.train_data.examples.reference_logps, by_hand(init, pairs, "train"),
                                   atol=2e-5)
    assert (tmp_path / "run" / "reference_logps.safetensors").is_file()


def test_the_plan_counts_the_adapters_that_train_on_and_their_merged_reference(lora_run, built):  # noqa: F811
    """`lmforge plan` from a LoRA run: its adapters are what trains, and a DPO reference is a frozen copy (4 bytes a
    weight), where new adapters' reference is the base with them off (none kept); --measure builds the same."""
    from lmforge.plan import measure, plan

    settings = {"train.init_from": lora_run / "run", "train.batch_size": 2}
    fresh = plan(tiny_config(lora_run / "p", **{**settings, "train.init_from": lora_run / "base", **LORA}),
                 device="h100", task="preference")
    continued = plan(tiny_config(lora_run / "p", **settings), device="h100", task="preference")
    assert continued.trained_parameters == fresh.trained_parameters > 0
    assert fresh.reference == 0 and continued.reference == 4 * continued.parameters
    assert any("its LoRA adapters, which train on" in note for note in continued.notes)
    measure(tiny_config(lora_run / "p", **{**settings, "train.num_threads": 1}), steps=1, task="preference")
    trainer = built[-1]
    assert trainer.adapters_loaded and trainer.reference is not None and not is_adapted(trainer.reference)
