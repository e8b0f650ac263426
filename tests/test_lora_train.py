"""LoRA through `lmforge train`: only adapters train and are saved, the base is named by its fingerprint,
resume is bit-identical, and `lmforge merge` gives a plain checkpoint with the adapted model's logits."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from lmforge.checkpoint import check_safetensors, load_for_inference
from lmforge.cli import main
from lmforge.errors import CheckpointError, ConfigError
from lmforge.lora import base_fingerprint, lora_parameters, lora_state_dict
from lmforge.model import GPT
from tiny_training import tiny_config, tiny_trainer, write_base, write_prepared_data

LORA = {"lora.r": 4, "lora.targets": "q,v,o,emb", "lora.dropout": 0.1, "train.max_steps": 8, "train.save_interval": 4,
        "train.keep_last": 5, "train.grad_accum": 2, "optim.lr": 1e-2}


def lora_config(run_dir: Path, base: Path, **overrides):
    return tiny_config(run_dir, **{**LORA, "train.init_from": base, **overrides})


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory):
    """8 uninterrupted LoRA steps (dropout, 2 micro-batches), checkpoints at steps 4 and 8."""
    root = tmp_path_factory.mktemp("lora")
    base = write_base(root)
    trainer = tiny_trainer(lora_config(root / "run", base), tokenizer_file=root / "tokenizer.json")
    trainer.fit()
    return root, base, trainer


def test_a_step_changes_only_the_adapters(tmp_path):
    base = write_base(tmp_path)
    trainer = tiny_trainer(lora_config(tmp_path / "run", base))
    model = trainer.raw_model
    adapters = set(lora_state_dict(model))
    trained = {id(p) for group in trainer.optimizer.param_groups for p in group["params"]}
    assert trained == {id(p) for p in lora_parameters(model)}  # the optimizer holds the adapters only
    before = {k: v.clone() for k, v in model.state_dict().items()}
    for _ in range(2):  # B moves in the first step; A in the second (its gradient is B^T (...), and B starts at 0)
        trainer.train_step()
        trainer.step += 1
    changed = {k for k, v in model.state_dict().items() if not torch.equal(v, before[k])}
    assert changed == adapters  # every adapter moved, every base tensor is bit-identical
    assert trainer.optimizer.param_groups[-1]["weight_decay"] == 0.0  # lora.weight_decay


def test_the_checkpoint_holds_only_adapters_and_names_its_base(lora_run):
    root, base, trainer = lora_run
    ckpt = root / "run" / "checkpoints" / "step-00000008"
    stored = {k for k in check_safetensors(ckpt / "model.safetensors") if k != "__metadata__"}
    assert stored == set(lora_state_dict(trainer.raw_model)) and all(".lora." in k for k in stored)
    assert (ckpt / "model.safetensors").stat().st_size * 4 < (base / "checkpoints" / "step-00000000" /
                                                              "model.safetensors").stat().st_size
    state = json.loads((ckpt / "state.json").read_text())
    plain = GPT(trainer.config.model)
    plain.load_state_dict({k: v for k, v in trainer.raw_model.state_dict().items() if ".lora." not in k})
    assert state["base"] == {"path": str((base / "checkpoints" / "step-00000000").resolve()),
                             "fingerprint": base_fingerprint(plain)}
    assert state["lora"]["r"] == 4 and state["lora"]["targets"] == ["q", "v", "o", "emb"]


def test_resume_is_bit_identical(lora_run, tmp_path):
    root, base, uninterrupted = lora_run
    (tmp_path / "run" / "checkpoints").mkdir(parents=True)
    shutil.copytree(root / "run" / "checkpoints" / "step-00000004", tmp_path / "run" / "checkpoints" / "step-00000004")
    resumed = tiny_trainer(lora_config(tmp_path / "run", base, **{"train.resume": "auto"}))
    resumed.fit()
    assert [step for step, _ in resumed.history] == [5, 6, 7, 8]
    assert resumed.history == uninterrupted.history[4:]  # losses bit-identical, dropout included
    ours, theirs = lora_state_dict(resumed.raw_model), lora_state_dict(uninterrupted.raw_model)
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)


def test_a_changed_base_is_refused_on_resume_and_on_load(lora_run, tmp_path):
    root, _, _ = lora_run
    shutil.copytree(root / "run", tmp_path / "run")
    changed = write_base(tmp_path, nudge=True)
    trainer = tiny_trainer(lora_config(tmp_path / "run", changed, **{"train.resume": "auto", "train.max_steps": 9}))
    refused = (r"trained on the base .* with fingerprint [0-9a-f]{16}, but the base loaded from .* has fingerprint "
               r"[0-9a-f]{16} .*restore the original base")
    with pytest.raises(CheckpointError, match=refused):
        trainer.fit()
    shutil.move(root / "base", tmp_path / "original-base")
    try:  # the base itself replaced by another one (manifest and all): loading the adapters is refused
        write_base(root, seed=1)
        with pytest.raises(CheckpointError, match="has fingerprint"):
            load_for_inference(root / "run")
    finally:
        shutil.rmtree(root / "base")
        shutil.move(tmp_path / "original-base", root / "base")


def test_merge_writes_a_plain_checkpoint_with_the_adapted_logits_that_generate_runs(lora_run, tmp_path, capsys):
    root, _, trainer = lora_run
    adapted = trainer.raw_model.eval()
    x = torch.randint(0, 32, (3, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = adapted(x)
    assert main(["merge", str(root / "run"), "--out", str(tmp_path / "merged")]) == 0
    merged, _, config = load_for_inference(tmp_path / "merged")
    assert config.lora is None and type(merged) is GPT
    stored = {k for k in check_safetensors(tmp_path / "merged" / "checkpoints" / "step-00000008" / "model.safetensors")}
    assert not any(".lora." in k for k in stored) and "blocks.0.attn.qkv.weight" in stored
    with torch.no_grad():
        assert (merged(x) - expected).abs().max() <= 1e-5
        assert (load_for_inference(root / "run")[0](x) - expected).abs().max() <= 1e-5  # readers merge, too
        assert (expected - GPT(trainer.config.model).eval()(x)).abs().max() > 1e-3  # (the adapters matter)
    capsys.readouterr()
    assert main(["generate", str(tmp_path / "merged"), "--prompt", "ab", "--max-new-tokens", "4", "--temperature",
                 "0", "--no-stream"]) == 0
    assert capsys.readouterr().out.startswith("ab")
    assert main(["merge", str(root / "run"), "--out", str(tmp_path / "merged")]) == 2  # exists: --force replaces
    assert "pass --force" in capsys.readouterr().err
    assert main(["merge", str(root / "run"), "--out", str(tmp_path / "merged"), "--force"]) == 0


def test_lora_without_init_from_is_one_line(tmp_path, capsys):
    with pytest.raises(ConfigError, match="lora.* is set but train.init_from is none"):
        tiny_config(tmp_path / "run", **{"lora.r": 8})
    data = write_prepared_data(tmp_path / "data", {"train": ["hello world " * 20], "val": ["hello there " * 10]})
    code = main(["train", "--preset", "tiny", "--data", str(data), "--run-dir", str(tmp_path / "run"),
                 "--lora.r", "8", "--lora.targets", "q,v"])
    err = capsys.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) == 1 and "--train.init_from RUN_OR_CHECKPOINT" in err
    assert not (tmp_path / "run").exists()


def test_export_of_a_lora_run_gives_the_base_and_a_peft_adapter_or_one_merged_model(lora_run, tmp_path):
    transformers = pytest.importorskip("transformers")
    peft = pytest.importorskip("peft")
    root, _, _ = lora_run
    run = root / "run"
    adapted, _, _ = load_for_inference(run, "cpu")  # the adapters merged: what the run stands for
    ids = torch.randint(0, adapted.config.vocab_size, (2, 12))
    with torch.no_grad():
        expected = adapted(ids)
    assert main(["export", str(run), "--format", "hf", "--out", str(tmp_path / "hf")]) == 0
    assert {p.name for p in (tmp_path / "hf" / "adapter").iterdir()} == {"adapter_config.json",
                                                                          "adapter_model.safetensors"}
    base = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    with torch.no_grad():
        assert (base(ids).logits - expected).abs().max() > 1e-3  # OUT is the base: the adapters do change it
        tuned = peft.PeftModel.from_pretrained(base, tmp_path / "hf" / "adapter").eval()
        assert (tuned(ids).logits - expected).abs().max() <= 1e-5
    assert main(["export", str(run), "--format", "hf", "--merge", "--out", str(tmp_path / "merged")]) == 0
    merged = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    assert not (tmp_path / "merged" / "adapter").exists()
    with torch.no_grad():
        assert (merged(ids).logits - expected).abs().max() <= 1e-5


def test_lora_plus_moves_B_at_lr_ratio_times_the_learning_rate_and_A_at_it(tmp_path):
    """lora.lr_ratio 16 (LoRA+): B (and nothing else) in a group at 16 x the schedule's lr. AdamW's first update is
    lr x g / (|g| + eps), about lr per element, so B's first move is 16 x what a plain LoRA run's would be."""
    base = write_base(tmp_path)
    moves = {}
    for ratio in (1, 16):
        trainer = tiny_trainer(lora_config(tmp_path / f"run{ratio}", base, **{
            "lora.lr_ratio": ratio, "lora.dropout": 0.0, "train.grad_accum": 1, "optim.warmup_steps": 0}))
        groups = trainer.optimizer.param_groups
        B = [p for name, p in trainer.raw_model.named_parameters() if name.endswith(".B")]
        before = [p.detach().clone() for p in B]
        trainer.train_step()
        moves[ratio] = max(float((p - q).abs().max()) for p, q in zip(B, before))
        if ratio == 16:
            (fast,) = [g for g in groups if g.get("lr_scale")]
            assert {id(p) for p in fast["params"]} == {id(p) for p in B} and fast["lr"] == 16 * groups[-2]["lr"]
        else:
            assert not any("lr_scale" in g for g in groups)
    assert moves[16] == pytest.approx(16 * moves[1], rel=0.02)


def test_lora_plus_lr_embedding_moves_the_tables_adapter_at_its_own_rate_on_the_schedules_shape(tmp_path):
    """lora.lr_embedding (peft's loraplus_lr_embedding): the embedding's A and B in a group of their own at that rate
    (its first AdamW move about that much per element), the other adapters as LoRA+ puts them; resume keeps it."""
    base = write_base(tmp_path)
    settings = {"lora.lr_ratio": 16, "lora.lr_embedding": 2e-5, "optim.lr": 1e-3, "lora.dropout": 0.0,
                "train.grad_accum": 1, "optim.warmup_steps": 2, "train.max_steps": 4, "train.save_interval": 2}
    trainer = tiny_trainer(lora_config(tmp_path / "run", base, **settings))
    params = dict(trainer.raw_model.named_parameters())
    table = {params["tok_emb.lora.emb.A"], params["tok_emb.lora.emb.B"]}
    groups = {round(g.get("lr_scale", 1), 6): g for g in trainer.optimizer.param_groups}
    assert set(groups[0.02]["params"]) == table and set(groups[16]["params"]) == {
        p for name, p in params.items() if name.endswith(".B") and p not in table}
    before = {name: p.detach().clone() for name, p in params.items() if p.requires_grad}
    trainer.train_step()
    moved = {name: float((params[name] - p).abs().max()) for name, p in before.items()}
    lr = trainer.optimizer.param_groups[0]["lr"]  # the schedule's, in warmup
    assert groups[0.02]["lr"] == pytest.approx(0.02 * lr) and lr < 1e-3
    assert moved["tok_emb.lora.emb.A"] == pytest.approx(0.02 * lr, rel=0.02)  # B A = 0 at the start: B stays
    assert moved["blocks.0.attn.qkv.lora.q.B"] == pytest.approx(16 * lr, rel=0.02)
    assert moved["blocks.0.attn.qkv.lora.q.A"] <= 1.02 * lr
    trainer.fit()
    (tmp_path / "resumed" / "checkpoints").mkdir(parents=True)
    shutil.copytree(tmp_path / "run" / "checkpoints" / "step-00000002",
                    tmp_path / "resumed" / "checkpoints" / "step-00000002")
    resumed = tiny_trainer(lora_config(tmp_path / "resumed", base, **settings, **{"train.resume": "auto"}))
    resumed.fit()
    assert resumed.history == trainer.history[2:] and len(resumed.history) == 2


def test_a_lora_plus_dora_run_resumes_bit_identically(tmp_path):
    base = write_base(tmp_path)
    settings = {"lora.lr_ratio": 16, "lora.dora": True, "lora.targets": "q,v,o", "train.max_steps": 4,
                "train.save_interval": 2}
    full = tiny_trainer(lora_config(tmp_path / "full", base, **settings))
    full.fit()
    (tmp_path / "resumed" / "checkpoints").mkdir(parents=True)
    shutil.copytree(tmp_path / "full" / "checkpoints" / "step-00000002",
                    tmp_path / "resumed" / "checkpoints" / "step-00000002")
    resumed = tiny_trainer(lora_config(tmp_path / "resumed", base, **settings, **{"train.resume": "auto"}))
    assert [g.get("lr_scale") for g in resumed.optimizer.param_groups] == [None, 16]
    resumed.fit()
    assert resumed.history == full.history[2:] and len(resumed.history) == 2
