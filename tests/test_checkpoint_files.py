"""Every checkpoint kind holds its full file set, and every reader refuses a manifest that leaves one out.

A manifest that does not list a file the reader then loads would let that file load unverified (a swapped
model.safetensors, optimizer state, tokenizer). checkpoint.expected_files decides the set from the checkpoint's
state.json; these tests strip each required file from the newest checkpoint's manifest of each kind (a training
run, a LoRA run, a classifier, a merged LoRA run, an imported model) and run the real readers: the one named
explicitly is refused with one line naming the file, the run directory falls back to the older intact one.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from lmforge.checkpoint import complete_checkpoints, expected_files, read_run_config, save_checkpoint
from lmforge.cli import main
from lmforge.config import ModelConfig, RunConfig, run_config_from_dict, to_dict
from lmforge.errors import CheckpointError
from lmforge.interop.lora_merge import merge_checkpoint
from lmforge.model import GPT
from lmforge.serve import load_app
from lmforge.tokenizer import byte_tokenizer
from lmforge.train import Trainer
from tiny_training import tiny_config, write_prepared_data

TRAINING = ["model.safetensors", "optimizer.safetensors", "state.json", "config.json", "tokenizer.json"]
WEIGHTS_ONLY = ["model.safetensors", "state.json", "config.json", "tokenizer.json"]
KINDS = {"training": TRAINING, "lora": TRAINING, "classifier": WEIGHTS_ONLY, "merged": WEIGHTS_ONLY,
         "imported": WEIGHTS_ONLY}
CASES = [(kind, name) for kind, files in KINDS.items() for name in files]


@pytest.fixture(scope="module")
def kinds(tmp_path_factory) -> dict:
    """{kind: run directory with two checkpoints}, plus "data": the prepared data they read."""
    root = tmp_path_factory.mktemp("kinds")
    texts = {split: [f"{split} line {i}: the cat sat on the mat." for i in range(n)]
             for split, n in (("train", 40), ("val", 6), ("test", 6))}
    data = write_prepared_data(root / "data", texts)
    steps = {"data.path": str(data), "train.max_steps": 4, "train.save_interval": 2, "train.eval_interval": 2}
    Trainer(tiny_config(root / "training", **steps), progress=False, tensorboard=False).fit()
    Trainer(tiny_config(root / "lora", **steps, **{"lora.r": 4, "train.init_from": str(root / "training")}),
            progress=False, tensorboard=False).fit()
    merge_checkpoint(root / "lora", root / "merged")
    write_hf_gpt2(root / "hf")
    assert main(["import", str(root / "hf"), "--out", str(root / "imported")]) == 0
    (root / "imported.txt").write_text("\n".join(texts["train"]), encoding="utf-8")
    imported_tokenizer = complete_checkpoints(root / "imported")[0] / "tokenizer.json"
    assert main(["prepare", str(root / "imported.txt"), "--tokenizer", str(imported_tokenizer), "--out",
                 str(root / "imported-data"), "--no-progress"]) == 0
    tok = byte_tokenizer()
    tok.save(root / "tokenizer.json")
    torch.manual_seed(0)
    clf = GPT(ModelConfig(vocab_size=tok.vocab_size, block_size=16, n_layer=1, n_head=2, n_embd=16, head="classify",
                          num_labels=2))
    save_checkpoint(root / "classifier", 1, clf, None, RunConfig(model=clf.config),
                    {"task": {"task": "classify", "labels": ["neg", "pos"]}}, root / "tokenizer.json")
    for kind in ("classifier", "merged", "imported"):  # one checkpoint each: an intact older one to fall back to
        (only,) = complete_checkpoints(root / kind)
        shutil.copytree(only, only.with_name(f"step-{int(only.name[5:]) + 1:08d}"))
    return {**{kind: root / kind for kind in KINDS}, "data": data, "imported-data": root / "imported-data"}


def write_hf_gpt2(out: Path) -> None:
    """A tiny GPT-2 with a byte-level BPE tokenizer, saved by transformers as `lmforge import` reads it."""
    transformers = pytest.importorskip("transformers")
    from test_interop import byte_level_bpe

    tok = byte_level_bpe(["<|endoftext|>"])
    eot = tok.token_to_id("<|endoftext|>")
    torch.manual_seed(0)
    transformers.GPT2LMHeadModel(transformers.GPT2Config(vocab_size=tok.get_vocab_size(), n_positions=32, n_layer=1,
                                                         n_head=2, n_embd=16, bos_token_id=eot, eos_token_id=eot)
                                 ).save_pretrained(out)
    transformers.GPT2TokenizerFast(tokenizer_object=tok, bos_token="<|endoftext|>", eos_token="<|endoftext|>",
                                   unk_token="<|endoftext|>").save_pretrained(out)


def unlist(ckpt: Path, name: str) -> None:
    """Remove `name` from ckpt's manifest, leaving the file itself in place (what a tamperer or a bug would do)."""
    manifest = json.loads((ckpt / "manifest.json").read_text())
    del manifest["files"][name]
    (ckpt / "manifest.json").write_text(json.dumps(manifest))


def readers(kind: str, path: Path, data: Path, out: Path) -> dict:
    """{reader: a call that reads the checkpoint at `path` as that reader does; it returns the CLI's exit code}."""
    def cli(*args: str):
        return lambda: main([*args, "--device", "cpu"])

    def serve():
        load_app(str(path), device="cpu")
        return 0

    found = {"serve": serve}
    if kind == "classifier":
        found["classify"] = cli("classify", str(path), "--text", "a cat")
    else:
        found["generate"] = cli("generate", str(path), "--prompt", "the", "--max-new-tokens", "3", "--no-stream")
        found["eval"] = cli("eval", str(path), "--data", str(data), "--split", "test")
        found["export"] = lambda: main(["export", str(path), "--format", "hf", "--out", str(out)])
    return found


def resume(run: Path, resume_from: str) -> Trainer:
    """A Trainer of the run's own config that continues from `resume_from` (auto | a checkpoint directory)."""
    raw = to_dict(read_run_config(complete_checkpoints(run)[0]))
    raw["train"].update(run_dir=str(run), resume=resume_from, max_steps=6)
    trainer = Trainer(run_config_from_dict(raw), progress=False, tensorboard=False)
    trainer.restore()
    return trainer


def test_the_expected_set_is_what_each_kind_holds(kinds):
    for kind, files in KINDS.items():
        for ckpt in complete_checkpoints(kinds[kind]):
            state = json.loads((ckpt / "state.json").read_text())
            listed = json.loads((ckpt / "manifest.json").read_text())["files"]
            assert sorted(expected_files(state)) == sorted(files) == sorted(listed), (kind, ckpt)


@pytest.mark.parametrize("kind,name", CASES, ids=[f"{k}-{n}" for k, n in CASES])
def test_a_manifest_missing_a_required_file_is_refused_by_every_reader(kinds, tmp_path, capsys, kind, name):
    run = tmp_path / kind
    shutil.copytree(kinds[kind], run)
    older, newest = complete_checkpoints(run)[-2:]
    unlist(newest, name)
    why = f"checkpoint {newest} is incomplete: manifest.json does not list {name}"
    out = tmp_path / "export"

    data = kinds["imported-data" if kind == "imported" else "data"]
    for reader, call in readers(kind, newest, data, out).items():  # named explicitly: refused, one line
        capsys.readouterr()
        try:
            code = call()
        except CheckpointError as e:
            assert why in str(e), (reader, str(e))
            continue
        err = capsys.readouterr().err
        assert code == 2 and err.count("\n") == 1 and why in err, (reader, err)
    assert not out.exists()

    for reader, call in readers(kind, run, data, out).items():  # the run: its older intact checkpoint
        capsys.readouterr()
        assert call() == 0, reader
        err = capsys.readouterr().err
        assert why in err and err.rstrip().endswith(f"skipping it, using {older}"), (reader, err)
        shutil.rmtree(out, ignore_errors=True)

    if kind in ("training", "lora"):
        with pytest.raises(CheckpointError, match=why):
            resume(run, str(newest))
        assert resume(run, "auto").step == int(older.name[5:])


def test_a_manifest_listing_a_file_its_kind_does_not_hold_is_refused(kinds, tmp_path):
    """An imported model (weights only) with optimizer state listed and sealed in: nothing of it may be read."""
    from lmforge.files import sha256_file
    from lmforge.generate import load

    run = tmp_path / "imported"
    shutil.copytree(kinds["imported"], run)
    newest = complete_checkpoints(run)[-1]
    planted = complete_checkpoints(kinds["training"])[-1] / "optimizer.safetensors"
    shutil.copy(planted, newest / "optimizer.safetensors")
    manifest = json.loads((newest / "manifest.json").read_text())
    manifest["files"]["optimizer.safetensors"] = {"sha256": sha256_file(planted), "bytes": planted.stat().st_size}
    (newest / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(CheckpointError, match=r"manifest.json lists optimizer.safetensors, which this kind of "
                                              r"checkpoint does not hold"):
        load(str(newest), device="cpu")
