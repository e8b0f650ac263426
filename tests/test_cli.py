"""The `lmforge` command as a user meets it: the whole flow, and one clear line for each bad input.

Each bad input must give exit code 2, exactly one line on stderr naming the problem, no traceback,
and leave what was already on disk byte-for-byte as it was.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import signal
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Optional, Union

import pytest

from lmforge.cli import add_config_arguments, build_parser, config_values, main, parse_overrides, train_overrides
from lmforge.config import build_section, doc, validate
from lmforge.errors import ConfigError

TEXT = ("First Citizen:\nBefore we proceed any further, hear me speak.\n\nAll:\nSpeak, speak.\n" * 40)


def _tree_digest(root: Path) -> dict[str, str]:
    """Every entry under root (the cwd of the bad-input table, so runs/ and other default outputs are inside):
    a file by its sha256, a symlink by its target, a directory, a FIFO; a new, changed or removed entry shows."""
    def kind(p: Path) -> str:
        if p.is_symlink():
            return f"link -> {os.readlink(p)}"
        if p.is_dir():
            return "dir"
        return hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "special"
    entries = {}
    for top, dirs, files in os.walk(root):  # not into symlinked folders: their targets are listed on their own
        for name in dirs + files:
            p = Path(top) / name
            entries[str(p.relative_to(root))] = kind(p)
    return entries


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    """A corpus, a prepared char dataset and a tiny trained run, made with the CLI itself."""
    root = tmp_path_factory.mktemp("cli")
    corpus = root / "corpus"
    corpus.mkdir()
    for i in range(12):
        (corpus / f"doc{i}.txt").write_text(f"Document {i}.\n" + TEXT[i * 7:], encoding="utf-8")
    data = root / "data"
    assert main(["prepare", str(corpus), "--out", str(data), "--no-progress", "--split", "0.8,0.1,0.1"]) == 0
    run = root / "run"
    code = main(["train", "--preset", "tiny", "--data", str(data), "--run-dir", str(run), "--max-steps", "4",
                 "--device", "cpu", "--train.batch_size", "4", "--train.eval_interval", "2",
                 "--train.eval_batches", "1", "--train.save_interval", "2", "--optim.warmup_steps", "1"])
    assert code == 0
    return root


def test_the_whole_flow_writes_what_the_next_step_reads(workspace, capsys):
    data, run = workspace / "data", workspace / "run"
    manifest = json.loads((data / "manifest.json").read_text())
    assert manifest["splits"]["train"]["documents"] + manifest["splits"]["val"]["documents"] \
        + manifest["splits"]["test"]["documents"] == 12
    assert (run / "config.yaml").is_file() and (run / "metrics.jsonl").is_file() and (run / "loss.png").is_file()
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step-00000002", "step-00000004"]

    capsys.readouterr()
    assert main(["eval", str(run), "--split", "test", "--device", "cpu"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["split"] == "test" and result["tokens"] > 0
    assert result["perplexity"] == pytest.approx(2.718281828 ** result["loss"], rel=1e-6)

    assert main(["generate", str(run), "--prompt", "First", "--max-new-tokens", "20", "--seed", "3",
                 "--device", "cpu", "--no-stream"]) == 0
    first = capsys.readouterr().out
    assert main(["generate", str(run), "--prompt", "First", "--max-new-tokens", "20", "--seed", "3",
                 "--device", "cpu"]) == 0
    assert capsys.readouterr().out == first and first.startswith("First")
    # --temperature 0 means greedy, in the CLI as in the library (the flags are GenerateConfig's fields)
    assert main(["generate", str(run), "--prompt", "First", "--max-new-tokens", "20", "--temperature", "0",
                 "--device", "cpu"]) == 0
    zero = capsys.readouterr().out
    assert main(["generate", str(run), "--prompt", "First", "--max-new-tokens", "20", "--greedy",
                 "--device", "cpu"]) == 0
    assert capsys.readouterr().out == zero
    from lmforge.generate import load

    assert zero == "First" + load(str(run)).generate("First", max_new_tokens=20, temperature=0.0) + "\n"
    # mappings and lists of lists from flags: --logit-bias ID:BIAS, --bad-words-ids per sequence
    flags = ["--logit-bias", "50:-100,51:2", "--logit-bias", "52:1.5", "--bad-words-ids", "60,61",
             "--bad-words-ids", "62", "--bad-words", "the", "--min-new-tokens", "15"]
    assert main(["generate", str(run), "--prompt", "First", "--max-new-tokens", "20", "--greedy", "--device", "cpu",
                 *flags]) == 0
    constrained = capsys.readouterr().out
    assert constrained != zero and constrained == "First" + load(str(run)).generate(
        "First", max_new_tokens=20, greedy=True, logit_bias={50: -100, 51: 2, 52: 1.5}, bad_words_ids=[[60, 61], [62]],
        bad_words=["the"], min_new_tokens=15) + "\n"
    hf_flags = ["--sequence-bias", "50 51:-100", "--sequence-bias", "52:3,53 54:1.5", "--suppress-tokens", "55,56",
                "--begin-suppress-tokens", "57", "--exponential-decay-length-penalty", "4,1.5"]  # Hugging Face's
    assert main(["generate", str(run), "--prompt", "First", "--max-new-tokens", "20", "--greedy", "--device", "cpu",
                 *hf_flags]) == 0
    assert capsys.readouterr().out == "First" + load(str(run)).generate(
        "First", max_new_tokens=20, greedy=True, sequence_bias={(50, 51): -100, (52,): 3, (53, 54): 1.5},
        suppress_tokens=[55, 56], begin_suppress_tokens=[57], exponential_decay_length_penalty=(4, 1.5)) + "\n"
    assert main(["generate", str(run), "--prompt", "First", "--max-new-tokens", "20", "--greedy", "--device", "cpu",
                 "--guidance-scale", "3", "--negative-prompt", "Second"]) == 0  # classifier-free guidance
    guided = capsys.readouterr().out
    assert guided != zero and guided == "First" + load(str(run)).generate(
        "First", max_new_tokens=20, greedy=True, guidance_scale=3.0, negative_prompt="Second") + "\n"
    assert main(["generate", str(run), "--prompt", "Is it? ", "--greedy", "--device", "cpu", "--guided-choice", "Yes",
                 "--guided-choice", "No"]) == 0
    assert capsys.readouterr().out in ("Is it? Yes\n", "Is it? No\n")
    assert main(["generate", str(run), "--prompt", "Date: ", "--device", "cpu", "--seed", "1", "--guided-regex",
                 "[0-9]{4}-[0-9]{2}"]) == 0
    assert re.fullmatch(r"Date: [0-9]{4}-[0-9]{2}\n", capsys.readouterr().out)
    schema = workspace / "schema.json"  # --guided-json takes the schema or a file holding it
    schema.write_text(json.dumps({"type": "object", "properties": {"act": {"enum": ["I", "II"]},
                                                                   "done": {"type": "boolean"}},
                                  "required": ["act", "done"]}))
    for given in (str(schema), schema.read_text()):
        assert main(["generate", str(run), "--prompt", "{", "--device", "cpu", "--seed", "2", "--guided-json",
                     given]) == 0
        answer = json.loads(capsys.readouterr().out[1:])
        assert list(answer) == ["act", "done"] and answer["act"] in ("I", "II") and isinstance(answer["done"], bool)


def test_embed_prints_or_writes_the_librarys_vectors_and_replaces_only_its_own_file(workspace, capsys):
    import numpy as np

    from lmforge.generate import TextEmbedder, load

    run, out = workspace / "run", workspace / "vectors.npy"
    loaded = load(str(run))
    want = TextEmbedder(loaded.model, loaded.tokenizer).embed(["to be", "or not"]).numpy()
    capsys.readouterr()
    assert main(["embed", str(run), "--text", "to be", "--text", "or not", "--device", "cpu"]) == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [(r["index"], r["text"]) for r in lines] == [(0, "to be"), (1, "or not")]
    assert np.allclose([r["embedding"] for r in lines], want, atol=1e-7, rtol=0)
    texts = workspace / "texts.txt"
    texts.write_text("to be\n\nor not\n", encoding="utf-8")
    assert main(["embed", str(run), "--file", str(texts), "--pooling", "mean", "--no-normalize", "--out", str(out),
                 "--device", "cpu"]) == 0
    raw = TextEmbedder(loaded.model, loaded.tokenizer, "mean", normalize=False).embed(["to be", "or not"]).numpy()
    assert np.array_equal(np.load(out, allow_pickle=False), raw) and not (raw ** 2).sum(1).round(3).tolist() == [1, 1]
    assert main(["embed", str(run), "--text", "x", "--out", str(out), "--device", "cpu"]) == 2  # ours, no --force
    assert main(["embed", str(run), "--text", "x", "--out", str(out), "--force", "--device", "cpu"]) == 0
    assert np.load(out).shape == (1, loaded.model.config.n_embd)


def _bad_inputs(ws: Path) -> list[tuple[str, list[str], str]]:
    data, run, corpus = ws / "data", ws / "run", ws / "corpus"
    ckpt = run / "checkpoints" / "step-00000004"
    resume = ["train", "--preset", "tiny", "--run-dir", str(run), "--max-steps", "6", "--device", "cpu",
              "--train.batch_size", "4", "--train.eval_interval", "2", "--train.eval_batches", "1",
              "--train.save_interval", "2", "--optim.warmup_steps", "1", "--resume", "auto"]
    return [
        # prepare
        ("prepare-missing-path", ["prepare", str(ws / "nope.txt"), "--out", str(ws / "o1")], "nope.txt"),
        ("prepare-empty-folder", ["prepare", str(ws / "empty"), "--out", str(ws / "o2")], "empty"),
        ("prepare-binary-only", ["prepare", str(ws / "bin"), "--out", str(ws / "o3")], "no documents"),
        ("prepare-existing-out", ["prepare", str(corpus), "--out", str(data)], "--force"),
        ("prepare-bad-split", ["prepare", str(corpus), "--out", str(ws / "o4"), "--split", "0.5,0.1"], "--split"),
        ("prepare-bad-split-sum", ["prepare", str(corpus), "--out", str(ws / "o4"), "--split", "0.9,0.3,0.1"], "sum to 1"),
        ("prepare-bad-tokenizer", ["prepare", str(corpus), "--out", str(ws / "o5"), "--tokenizer", "wordpiece"], "wordpiece"),
        ("prepare-no-input", ["prepare", "--out", str(ws / "o6")], "no input"),
        ("prepare-dup-specials", ["prepare", str(corpus), "--out", str(ws / "o7"), "--special-tokens", "<S>,<S>,<P>"], "--special-tokens"),
        ("prepare-bad-jsonl", ["prepare", str(ws / "bad.jsonl"), "--out", str(ws / "o8")], "bad.jsonl"),
        ("prepare-unknown-flag", ["prepare", str(corpus), "--out", str(ws / "o9"), "--shuffle"], "--shuffle"),
        ("prepare-add-a-token-there-already", ["prepare", str(corpus), "--out", str(ws / "o9"), "--add-tokens",
                                               "<|user|>,e"], "'e' is one token of the vocabulary already"),
        ("prepare-add-an-empty-token", ["prepare", str(corpus), "--out", str(ws / "o9"), "--add-tokens", "<a>,,<b>"],
         "'' is empty or holds whitespace"),
        ("prepare-add-tokens-after-a-mask", ["prepare", str(corpus), "--out", str(ws / "o9"), "--mask-token",
                                             "--add-tokens", "<|user|>"], "has a mask token"),
        ("eval-data-with-added-tokens", ["eval", str(run), "--data", str(ws / "data-added"), "--device", "cpu"],
         "adds 1 token(s) to the tokenizer"),
        ("serve-lora-module-that-is-a-whole-model", ["serve", str(run), "--lora-modules", f"x={run}", "--device",
                                                     "cpu", "--port", "0"], "holds a whole model, not LoRA adapters"),
        ("serve-lora-module-without-a-name", ["serve", str(run), "--lora-modules", str(ws / "lora-run"), "--port",
                                              "0"], "is not NAME=RUN_DIR"),
        ("export-gguf-adapter-with-added-rows", ["export", str(ws / "lora-added"), "--format", "gguf", "--adapter",
                                                 "--out", str(ws / "added.gguf")], "cannot carry"),
        ("prepare-vocab-not-int", ["prepare", str(corpus), "--out", str(ws / "o9"), "--vocab-size", "lots"], "--vocab-size"),
        # train
        ("train-unknown-key", ["train", "--data", str(data), "--model.n_layr", "2"], "did you mean 'n_layer'"),
        ("train-wrong-type", ["train", "--data", str(data), "--model.n_layer", "two"], "model.n_layer"),
        ("train-bad-range", ["train", "--data", str(data), "--optim.lr", "-3"], "optim.lr"),
        ("train-bad-precision", ["train", "--data", str(data), "--precision", "fp4"], "train.precision"),
        ("train-early-exit-past-the-model", ["train", "--data", str(data), "--model.n_layer", "2",
                                             "--train.early_exit_layer", "2"], "is not below model.n_layer=2"),
        ("train-negative-loss-chunk", ["train", "--data", str(data), "--train.loss_chunk", "-1"], "train.loss_chunk"),
        ("train-dpo-beta-zero", ["train", "--data", str(data), "--train.dpo_beta", "0"], "train.dpo_beta"),
        ("train-dpo-on-token-data", ["train", "--preset", "tiny", "--data", str(data), "--run-dir", str(ws / "r-dpo"),
                                     "--device", "cpu", "--train.dpo_beta", "0.5"], "is not preference data"),
        ("train-unknown-preference-loss", ["train", "--data", str(data), "--train.preference_loss", "ppo"],
         "train.preference_loss"),
        ("train-simpo-gamma-negative", ["train", "--data", str(data), "--train.simpo_gamma", "-1"], "train.simpo_gamma"),
        ("train-orpo-on-token-data", ["train", "--preset", "tiny", "--data", str(data), "--run-dir", str(ws / "r-orpo"),
                                      "--device", "cpu", "--train.preference_loss", "orpo"], "is not preference data"),
        ("train-precompute-reference-on-token-data", ["train", "--preset", "tiny", "--data", str(data), "--run-dir",
                                                     str(ws / "r-pre"), "--device", "cpu",
                                                     "--train.precompute_reference", "true"], "is not preference data"),
        ("train-exo-without-label-smoothing", ["train", "--data", str(data), "--train.preference_loss", "exo"],
         "set train.dpo_label_smoothing above 0"),
        ("train-nll-weight-with-orpo", ["train", "--data", str(data), "--train.preference_loss", "orpo",
                                        "--train.preference_nll_weight", "0.5"], "orpo has its own: drop it"),
        ("train-precompute-reference-not-a-bool", ["train", "--data", str(data), "--train.precompute_reference",
                                                   "maybe"], "train.precompute_reference"),
        ("prepare-preference-same-completions", ["prepare", str(ws / "same-pair.jsonl"), "--task", "preference",
                                                 "--tokenizer", str(run), "--out", str(ws / "o-pref")],
         "same-pair.jsonl:2: 'chosen' and 'rejected' are the same text"),
        ("prepare-preference-bad-margin", ["prepare", str(ws / "bad-margin.jsonl"), "--task", "preference",
                                           "--tokenizer", str(run), "--out", str(ws / "o-margin")],
         "bad-margin.jsonl:2: field 'margin' is 'high': give a finite number"),
        ("prepare-unpaired-bad-label", ["prepare", str(ws / "bad-label.jsonl"), "--task", "unpaired",
                                        "--tokenizer", str(run), "--out", str(ws / "o-unpaired")],
         "bad-label.jsonl:2: field 'label' (label) is 'maybe': give true or false"),
        ("train-kto-on-token-data", ["train", "--preset", "tiny", "--data", str(data), "--run-dir", str(ws / "r-kto"),
                                     "--device", "cpu", "--train.preference_loss", "kto"], "is not preference data"),
        ("train-kto-weight-zero", ["train", "--data", str(data), "--train.kto_undesirable_weight", "0"],
         "train.kto_undesirable_weight"),
        ("train-reward-on-token-data", ["train", "--preset", "tiny", "--data", str(data), "--run-dir",
                                        str(ws / "r-rm"), "--device", "cpu", "--train.objective", "reward"],
         "trains a reward model on preference pairs"),
        ("train-reward-center-negative", ["train", "--data", str(data), "--train.reward_center_coefficient", "-1"],
         "train.reward_center_coefficient"),
        ("train-online-on-token-data", ["train", "--data", str(data), "--train.online_reward_model",
                                        str(ws / "no-judge")], "train on preference data"),
        ("train-online-temperature-zero", ["train", "--data", str(data), "--train.online_temperature", "0"],
         "train.online_temperature"),
        ("train-grpo-without-a-judge", ["train", "--data", str(data), "--train.preference_loss", "grpo"],
         "set train.online_reward_model"),
        ("train-grpo-group-of-one", ["train", "--data", str(data), "--train.grpo_group_size", "1"],
         "train.grpo_group_size"),
        ("train-grpo-key-without-grpo", ["train", "--data", str(data), "--train.grpo_beta", "0.1"], "set GRPO"),
        ("train-grpo-clip-with-one-step", ["train", "--data", str(data), "--train.preference_loss", "grpo",
                                           "--train.online_reward_function", str(ws / "none.py") + ":f",
                                           "--train.grpo_epsilon_high", "0.28"], "set train.grpo_iterations above 1"),
        ("train-grpo-iterations-zero", ["train", "--data", str(data), "--train.grpo_iterations", "0"],
         "train.grpo_iterations"),
        ("train-grpo-cispo-with-eps-low", ["train", "--data", str(data), "--train.preference_loss", "grpo",
                                           "--train.online_reward_function", str(ws / "none.py") + ":f",
                                           "--train.grpo_iterations", "2", "--train.grpo_objective", "cispo",
                                           "--train.grpo_epsilon", "0.3"], "train.grpo_epsilon is not read"),
        ("train-grpo-top-entropy-above-one", ["train", "--data", str(data), "--train.grpo_top_entropy", "2"],
         "train.grpo_top_entropy"),
        ("train-distill-teacher-missing", ["train", "--preset", "tiny", "--data", str(data), "--run-dir",
                                           str(ws / "r-kd"), "--device", "cpu", "--train.distill_from",
                                           str(ws / "no-teacher")], "no-teacher"),
        ("train-distill-setting-without-teacher", ["train", "--data", str(data), "--train.distill_beta", "0.5"],
         "set train.distill_from"),
        ("train-reward-weights-miscounted", ["train", "--data", str(data), "--train.online_reward_function",
                                             str(ws / "none.py") + ":f", "--train.online_reward_weights", "1,2"],
         "2 weight(s) for 1 judge(s)"),
        ("train-reward-function-missing", ["train", "--preset", "tiny", "--data", str(data), "--run-dir",
                                           str(ws / "r-fn"), "--device", "cpu", "--train.online_reward_function",
                                           str(ws / "none.py") + ":f"], "train on preference data"),
        ("plan-measure-online", ["plan", "--measure", "--task", "preference", "--train.preference_loss", "grpo",
                                 "--train.online_reward_function", str(ws / "none.py") + ":f"],
         "--measure trains on random tokens"),
        ("reward-with-a-language-model", ["reward", str(run), "--prompt", "Hi", "--completion", "Hello"],
         "is not a reward model"),
        ("reward-file-missing", ["reward", str(run), "--file", str(ws / "none.jsonl")], "none.jsonl"),
        ("generate-reward-model-missing", ["generate", str(run), "--prompt", "Hi", "--num-return-sequences", "2",
                                           "--reward-model", str(ws / "no-rm")], "no-rm"),
        ("train-bf16-compute-recomputed", ["train", "--data", str(data), "--precision", "bf16-compute",
                                           "--train.activation_checkpointing", "true"], "--train.precision bf16-mixed"),
        ("train-missing-data", ["train", "--data", str(ws / "nodata"), "--run-dir", str(ws / "r1")], "nodata"),
        ("train-missing-config", ["train", "--config", str(ws / "none.yaml")], "none.yaml"),
        ("train-bad-yaml", ["train", "--config", str(ws / "bad.yaml")], "bad.yaml:2:1 is not valid YAML"),
        ("train-yaml-tabs", ["train", "--config", str(ws / "tabs.yaml")], "tabs.yaml:3:1 has a tab: YAML forbids tabs"),
        ("train-unknown-preset", ["train", "--preset", "gpt-9", "--data", str(data)], "gpt-9"),
        ("train-run-dir-taken", ["train", "--preset", "tiny", "--data", str(data), "--run-dir", str(run),
                                 "--device", "cpu"], "--resume"),
        ("train-resume-missing", ["train", "--preset", "tiny", "--data", str(data), "--run-dir", str(ws / "r2"),
                                  "--resume", str(ws / "nockpt"), "--device", "cpu"], "nockpt"),
        ("train-block-too-big-dropout", ["train", "--data", str(data), "--model.dropout", "1.0"], "model.dropout"),
        ("train-positional-junk", ["train", "junk"], "junk"),
        ("train-bad-nonfinite", ["train", "--data", str(data), "--train.nonfinite", "ignore"], "train.nonfinite"),
        ("train-bad-on-nonfinite", ["train", "--data", str(data), "--on-nonfinite", "retry"], "train.nonfinite"),
        ("train-bad-spike-window", ["train", "--data", str(data), "--train.spike_window", "1"], "train.spike_window"),
        ("train-bad-dist-timeout", ["train", "--data", str(data), "--train.dist_timeout", "0"], "train.dist_timeout"),
        ("train-resume-data-changed", [*resume, "--data", str(ws / "data2")], "--allow-data-change"),
        ("train-resume-other-vocab", [*resume, "--data", str(ws / "data-bytes")], "model.vocab_size"),
        # a resume whose flags differ from the run's says how to continue it as it was trained
        ("train-resume-other-width", [*resume, "--data", str(data), "--model.n_embd", "64"],
         f"model.n_embd=32 (config: 64); continue it as it was trained with --config {run / 'config.yaml'} "
         f"--resume auto"),
        ("train-resume-other-data-how", [*resume, "--data", str(ws / "data2")],
         f"continue it as it was trained with --config {run / 'config.yaml'} --resume auto"),
        ("train-resume-path-other-width", ["train", "--preset", "tiny", "--data", str(data), "--run-dir", str(ws / "r5"),
                                           "--resume", str(ckpt), "--model.n_embd", "64", "--device", "cpu"],
         f"--config {ckpt / 'config.json'} --run-dir {ws / 'r5'} --resume {ckpt}"),
        ("train-resume-pickle-planted", [*resume, "--data", str(data), "--resume", str(ws / "pickled")], "ckpt.pt"),
        ("train-resume-corrupt-ckpt", [*resume, "--data", str(data), "--resume", str(ws / "corrupt")], "model.safetensors"),
        # eval
        ("eval-missing-ckpt", ["eval", str(ws / "ghost"), "--device", "cpu"], "ghost"),
        ("eval-max-tokens", ["eval", str(run), "--max-tokens", "1"], "--max-tokens"),
        ("eval-missing-data", ["eval", str(run), "--data", str(ws / "nodata"), "--device", "cpu"], "nodata"),
        ("eval-corrupt-ckpt", ["eval", str(ws / "corrupt"), "--device", "cpu"], "model.safetensors"),
        ("eval-pickle-planted", ["eval", str(ws / "pickled"), "--device", "cpu"], "ckpt.pt"),
        ("eval-text-binary", ["eval", str(run), "--text", str(ws / "bin")], "holds no text to evaluate"),
        ("eval-choices-binary", ["eval", str(run), "--choices", str(ws / "bin" / "blob.txt")], "blob.txt"),
        ("eval-choices-no-context", ["eval", str(run), "--choices", str(ws / "bad.jsonl")],
         "bad.jsonl:1: no field 'context'"),
        # generate
        ("generate-missing-ckpt", ["generate", str(ws / "ghost")], "ghost"),
        ("generate-empty-dir", ["generate", str(ws / "empty")], "empty"),
        ("generate-bad-temperature", ["generate", str(run), "--temperature", "-1"], "generate.temperature"),
        ("generate-bad-top-p", ["generate", str(run), "--top-p", "1.5"], "generate.top_p"),
        ("generate-bad-top-k", ["generate", str(run), "--top-k", "0"], "generate.top_k"),
        ("generate-zero-tokens", ["generate", str(run), "--max-new-tokens", "0"], "generate.max_new_tokens"),
        ("generate-corrupt-ckpt", ["generate", str(ws / "corrupt"), "--device", "cpu"], "model.safetensors"),
        ("generate-pickle-planted", ["generate", str(ws / "pickled"), "--device", "cpu"], "pickled"),
        # plot
        ("plot-missing-run", ["plot", str(ws / "ghost")], "ghost"),
        ("plot-out-exists", ["plot", str(run), "--out", str(run / "loss.png")], "--force"),
        ("plot-out-not-an-image", ["plot", str(run), "--out", "x.txt"], ".png"),
        ("plot-force-onto-a-text", ["plot", str(run), "--out", str(ws / "notes.png"), "--force"], "not a PNG image"),
        # --force replaces only an output lmforge wrote, holding nothing else, apart from the inputs
        ("export-force-other-folder", ["export", str(run), "--format", "hf", "--out", str(ws / "mine"), "--force"],
         "not a Hugging Face export"),
        ("export-force-onto-the-run", ["export", str(run), "--format", "hf", "--out", str(run), "--force"],
         "is the input"),
        ("export-into-the-run", ["export", str(run), "--format", "hf", "--out", str(run / "hf")], "lies inside"),
        ("export-onnx-force-folder", ["export", str(run), "--format", "onnx", "--out", str(ws / "mine"), "--force"],
         "is a directory"),
        ("import-gguf-not-gguf", ["import", str(ws / "notes.png"), "--out", str(ws / "imported")],
         "is not a GGUF file"),
        ("import-gguf-missing", ["import", str(ws / "ghost.gguf"), "--out", str(ws / "imported")], "does not exist"),
        ("import-peft-pickle", ["import", str(ws / "peft-pickled"), "--base", str(run), "--out", str(ws / "imported")],
         "a pickle, which lmforge never opens"),
        ("import-peft-without-base", ["import", str(ws / "peft-pickled"), "--out", str(ws / "imported")],
         "give --base RUN"),
        ("import-base-for-a-model", ["import", str(ws / "hf"), "--base", str(run), "--out", str(ws / "imported")],
         "--base applies to an adapter"),
        ("import-dora-without-magnitudes", ["import", str(ws / "dora-bare"), "--base", str(run), "--out",
                                            str(ws / "imported")], "without transformer.h.0.attn.c_attn's "
                                                                   "lora_magnitude_vector"),
        ("export-gguf-adapter-of-a-tied-table", ["export", str(ws / "lora-table"), "--format", "gguf", "--adapter",
                                                 "--out", str(ws / "table.gguf")], "whose head is tied to it"),
        ("train-table-adapter-with-dora", ["train", "--data", str(data), "--run-dir", str(ws / "lora-3"),
                                           "--train.init_from", str(run), "--lora.targets", "q,emb", "--lora.dora",
                                           "true"], "lora.targets has emb with lora.dora"),
        ("train-table-adapter-beside-added-tokens", ["train", "--data", str(ws / "data-added"), "--run-dir",
                                                     str(ws / "lora-4"), "--train.init_from", str(run),
                                                     "--lora.targets", "q,emb", "--device", "cpu"],
         "drop emb from lora.targets"),
        ("train-pissa-niter-without-pissa", ["train", "--data", str(data), "--run-dir", str(ws / "lora-5"),
                                             "--train.init_from", str(run), "--lora.pissa_niter", "4"],
         "give lora.init pissa too"),
        ("train-qlora-with-pissa", ["train", "--data", str(data), "--run-dir", str(ws / "lora-7"),
                                    "--train.init_from", str(run), "--lora.quantize", "nf4", "--lora.init", "pissa"],
         "lora.init=pissa with lora.quantize nf4 is not supported"),
        ("train-double-quant-without-quantize", ["train", "--data", str(data), "--run-dir", str(ws / "lora-8"),
                                                "--train.init_from", str(run), "--lora.double_quant", "true"],
         "set lora.quantize nf4 too"),
        ("train-loftq-without-quantize", ["train", "--data", str(data), "--run-dir", str(ws / "lora-9"),
                                          "--train.init_from", str(run), "--lora.init", "loftq"],
         "lora.init=loftq fits the adapters to what the 4-bit base loses"),
        ("train-loftq-iter-without-loftq", ["train", "--data", str(data), "--run-dir", str(ws / "lora-10"),
                                            "--train.init_from", str(run), "--lora.loftq_iter", "3"],
         "give lora.init loftq too"),
        ("train-lr-embedding-without-emb", ["train", "--data", str(data), "--run-dir", str(ws / "lora-6"),
                                            "--train.init_from", str(run), "--lora.lr_embedding", "1e-6"],
         "add emb to lora.targets"),
        ("train-from-a-lora-run-with-other-adapters", ["train", "--data", str(data), "--run-dir", str(ws / "lora-2"),
                                                       "--train.init_from", str(ws / "lora-run"), "--lora.r", "4"],
         "is a LoRA run with r=2"),
        ("export-gguf-force-onto-a-text", ["export", str(run), "--format", "gguf", "--out", str(ws / "notes.png"),
                                          "--force"], "not a GGUF export written by lmforge"),
        ("export-gguf-into-the-run", ["export", str(run), "--format", "gguf", "--out", str(run / "m.gguf")],
         "lies inside"),
        ("export-gguf-type-with-hf", ["export", str(run), "--format", "hf", "--gguf-type", "f16", "--out",
                                      str(ws / "hf-typed")], "--gguf-type applies to --format gguf"),
        ("export-gguf-encoder", ["export", str(ws / "encoder"), "--format", "gguf", "--out", str(ws / "enc.gguf")],
         "encoder"),
        ("export-force-keeps-notes", ["export", str(run), "--format", "hf", "--out", str(ws / "hf"), "--force"],
         "NOTES.md"),
        ("export-force-symlink", ["export", str(run), "--format", "hf", "--out", str(ws / "hf-link"), "--force"],
         "symbolic link"),
        ("prepare-force-input-folder", ["prepare", str(ws / "mine"), "--out", str(ws / "mine"), "--force"], "is the input"),
        ("prepare-force-holds-input", ["prepare", str(ws / "data-noted" / "extra.txt"), "--out", str(ws / "data-noted"),
                                       "--force"], "holds the input"),
        ("prepare-out-inside-input", ["prepare", str(corpus), "--out", str(corpus / "prepared")], "lies inside"),
        ("prepare-force-keeps-notes", ["prepare", str(corpus), "--out", str(ws / "data-noted"), "--force"], "extra.txt"),
        ("prepare-force-symlink", ["prepare", str(corpus), "--out", str(ws / "data-link"), "--force"], "symbolic link"),
        # what used to be internal errors (exit 1, "please report it")
        ("prepare-negative-seed", ["prepare", str(corpus), "--out", str(ws / "o10"), "--seed", "-1"], "seed=-1"),
        ("prepare-read-only-out", ["prepare", str(corpus), "--out", str(_read_only(ws) / "o11")], "permission"),
        ("prepare-jsonl-too-deep", ["prepare", str(ws / "deep.jsonl"), "--out", str(ws / "o12")], "deep.jsonl:2"),
        ("prepare-jsonl-long-int", ["prepare", str(ws / "bigint.jsonl"), "--out", str(ws / "o13")], "bigint.jsonl:2"),
        ("prepare-input-is-a-fifo", ["prepare", str(ws / "pipe.txt"), "--out", str(ws / "o16")],
         "pipe.txt is a FIFO (named pipe), not a regular file"),
        ("prepare-input-is-a-device", ["prepare", "/dev/null", "--out", str(ws / "o17")],
         "/dev/null is a character device, not a regular file"),
        ("train-run-dir-is-a-file", ["train", "--preset", "tiny", "--data", str(data), "--run-dir", str(ws / "afile"),
                                     "--device", "cpu"], "afile is a file"),
        ("import-out-is-a-file", ["import", str(ws / "hf"), "--out", str(ws / "afile")], "afile is a file"),
        ("train-batch-exhausts-memory", ["train", "--preset", "tiny", "--data", str(data), "--run-dir", str(ws / "r3"),
                                         "--device", "cpu", "--train.batch_size", "65536", "--model.n_embd", "1024",
                                         "--model.n_head", "8"], "GB of memory"),
        ("train-width-exhausts-memory", ["train", "--preset", "tiny", "--data", str(data), "--run-dir", str(ws / "r4"),
                                         "--device", "cpu", "--model.n_embd", "1000000"], "GB of memory"),
        ("generate-prompt-not-utf8", ["generate", str(run), "--prompt", "\udcff", "--device", "cpu"], "UTF-8"),
        # messages that contradicted the input, and flags that conflicted silently
        ("prepare-split-zero-train", ["prepare", str(corpus), "--out", str(ws / "o14"), "--split", "0,0.5,0.5"],
         "three positive fractions"),
        ("prepare-vocab-zero", ["prepare", str(corpus), "--out", str(ws / "o15"), "--vocab-size", "0"], "more than 259"),
        ("train-preset-as-section", ["train", "--preset", "tiny", "--data", str(data), "--preset.x", "3"], "--preset.x"),
        ("train-max-steps-twice", ["train", "--data", str(data), "--max-steps", "3", "--train.max_steps", "5"],
         "--max-steps and --train.max_steps"),
        ("generate-two-lengths", ["generate", str(run), "--max-length", "9", "--max-new-tokens", "5"], "give one"),
        ("generate-beams-sampling", ["generate", str(run), "--num-beams", "2", "--top-k", "5"], "generate.top_k=5"),
        ("generate-bad-lookup", ["generate", str(run), "--prompt-lookup-num-tokens", "0"],
         "generate.prompt_lookup_num_tokens"),
        ("generate-lookup-beams", ["generate", str(run), "--num-beams", "2", "--prompt-lookup-num-tokens", "3"],
         "beam search"),
        ("generate-missing-assistant", ["generate", str(run), "--assistant-model", str(ws / "ghost"), "--device", "cpu"],
         "ghost"),
        ("generate-assistant-and-lookup", ["generate", str(run), "--assistant-model", str(run),
                                           "--prompt-lookup-num-tokens", "3", "--device", "cpu"], "give one"),
        ("generate-assistant-tokens-alone", ["generate", str(run), "--num-assistant-tokens", "3"], "--assistant-model"),
        ("eval-assistant-on-shards", ["eval", str(run), "--assistant-model", str(run), "--device", "cpu"],
         "generates nothing"),
        ("serve-port-in-use", ["serve", str(run), "--port", str(_busy_port()), "--device", "cpu"], "cannot listen"),
        ("chat-beams", ["chat", str(run), "--num-beams", "2", "--device", "cpu"], "one reply per turn"),
        ("generate-logit-bias-no-value", ["generate", str(run), "--logit-bias", "5"], "KEY:VALUE"),
        ("generate-logit-bias-outside-vocab", ["generate", str(run), "--logit-bias", "99999:-100", "--device", "cpu"],
         "token id 99999, outside the vocabulary"),
        ("generate-bad-words-ids-not-ids", ["generate", str(run), "--bad-words-ids", "1,x"], "bad_words_ids[0][1]"),
        ("generate-sequence-bias-not-ids", ["generate", str(run), "--sequence-bias", "1,2:3"],
         "the ids of a sequence separated"),
        ("generate-sequence-bias-outside-vocab", ["generate", str(run), "--sequence-bias", "5 99999:-1", "--device",
                                                  "cpu"], "sequence_bias names the token id 99999"),
        ("generate-decay-one-number", ["generate", str(run), "--exponential-decay-length-penalty", "1.05"],
         "[start, factor]"),
        ("generate-forced-and-suppressed", ["generate", str(run), "--forced-eos-token-id", "4", "--suppress-tokens",
                                            "4"], "a token cannot be both forced and banned"),
        ("generate-forced-outside-vocab", ["generate", str(run), "--forced-bos-token-id", "99999", "--device", "cpu"],
         "forced_bos_token_id names the token id 99999"),
        ("generate-top-h-beams", ["generate", str(run), "--num-beams", "2", "--top-h", "0.5"],
         "generate.top_h=0.5 is a sampling option"),
        ("generate-watermark-key-alone", ["generate", str(run), "--watermark-key", "5"], "only read by the watermark"),
        ("generate-schedule-alone", ["generate", str(run), "--num-assistant-tokens-schedule", "heuristic"],
         "--assistant-model RUN_DIR, --assistant-early-exit N or --prompt-lookup-num-tokens"),
        ("generate-confidence-alone", ["generate", str(run), "--assistant-confidence-threshold", "0.4"],
         "--assistant-model RUN_DIR or --assistant-early-exit N too"),
        ("generate-early-exit-whole-model", ["generate", str(run), "--assistant-early-exit", "99", "--device", "cpu"],
         "assistant_early_exit=99 is not below the model's"),
        ("generate-healing-guided", ["generate", str(run), "--token-healing", "--guided-regex", "[a-z]+"],
         "token_healing begins it"),
        ("detect-nothing", ["detect", str(run)], "nothing to test"),
        ("detect-empty-text", ["detect", str(run), "--text", "", "--device", "cpu"], "give more text"),
        ("detect-bad-ratio", ["detect", str(run), "--watermark-greenlist-ratio", "1.5"],
         "generate.watermark_greenlist_ratio=1.5 is invalid"),
        ("generate-typical-beams", ["generate", str(run), "--num-beams", "2", "--typical-p", "0.5"],
         "generate.typical_p=0.5 is a sampling option"),
        ("generate-guided-choice-beams", ["generate", str(run), "--num-beams", "2", "--guided-choice", "yes"],
         "picks the answer token by token"),
        ("embed-nothing", ["embed", str(run)], "nothing to embed"),
        ("embed-out-not-npy", ["embed", str(run), "--text", "x", "--out", str(ws / "vectors.txt")],
         "embed writes a .npy array"),
        ("embed-out-users-file", ["embed", str(run), "--text", "x", "--out", str(ws / "notes.npy"), "--force"],
         "is not a .npy array"),
        ("generate-negative-prompt-alone", ["generate", str(run), "--negative-prompt", "x"],
         "negative_prompt is only read by classifier-free guidance"),
        ("generate-guided-regex-backreference", ["generate", str(run), "--guided-regex", r"(a)\1"], "cannot be used"),
        ("generate-guided-json-missing-file", ["generate", str(run), "--guided-json", str(ws / "ghost.json")],
         "neither a JSON schema"),
        ("serve-missing-assistant", ["serve", str(run), "--assistant-model", str(ws / "ghost"), "--port", "0",
                                     "--device", "cpu"], "ghost"),
        # what an encoder (model.causal false) cannot do: no BERT equivalent, no endpoint
        ("export-hf-encoder", ["export", str(ws / "encoder"), "--format", "hf", "--out", str(ws / "hf-enc")],
         "not a BertForMaskedLM"),
        ("serve-encoder-speculating", ["serve", str(ws / "encoder"), "--prompt-lookup-num-tokens", "3", "--port", "0",
                                       "--device", "cpu"], "this model is an encoder: leave them out"),
    ]


def _read_only(ws: Path) -> Path:
    """A folder this process cannot write into: mode 555, or, as root (who writes anyway), sysfs."""
    folder = ws / "read-only"
    folder.mkdir(exist_ok=True)
    folder.chmod(0o555)
    return Path("/sys") if os.geteuid() == 0 else folder


_BUSY = []


def _busy_port() -> int:
    """A loopback port held by a listening socket for the whole module."""
    if not _BUSY:
        import socket

        _BUSY.append(socket.create_server(("127.0.0.1", 0)))
    return _BUSY[0].getsockname()[1]


@pytest.fixture(scope="module")
def hostile_files(workspace):
    ws = workspace
    (ws / "empty").mkdir(exist_ok=True)
    (ws / "bin").mkdir(exist_ok=True)
    (ws / "bin" / "blob.txt").write_bytes(b"\x00\x01\x02binary\x00" * 50)
    (ws / "bad.jsonl").write_text('{"text": "fine"}\n{not json\n', encoding="utf-8")
    (ws / "bad.yaml").write_text("model: [1, 2\n", encoding="utf-8")
    (ws / "tabs.yaml").write_text("model:\n  n_layer: 2\n\tn_head: 2\n", encoding="utf-8")
    # a copy of the newest checkpoint with one byte of the weights flipped
    import shutil
    corrupt = ws / "corrupt"
    if not corrupt.exists():
        shutil.copytree(ws / "run" / "checkpoints" / "step-00000004", corrupt)
        weights = bytearray((corrupt / "model.safetensors").read_bytes())
        weights[-5] ^= 0xFF
        (corrupt / "model.safetensors").write_bytes(bytes(weights))
    # a directory holding only a pickle payload under a checkpoint-like name
    pickled = ws / "pickled"
    pickled.mkdir(exist_ok=True)
    marker = ws / "payload-ran"
    payload = (b"cos\nsystem\n(S'touch " + str(marker).encode() + b"'\ntR.")
    (pickled / "ckpt.pt").write_bytes(payload)
    (pickled / "optimizer.pt").write_bytes(payload)
    dora = ws / "dora-bare"  # a PEFT DoRA adapter saved without its magnitudes
    dora.mkdir(exist_ok=True)
    (dora / "adapter_config.json").write_text(json.dumps({
        "peft_type": "LORA", "r": 2, "lora_alpha": 4, "target_modules": ["c_attn"], "use_dora": True,
        "fan_in_fan_out": True}), encoding="utf-8")
    import torch
    from safetensors.torch import save_file

    name = "base_model.model.transformer.h.0.attn.c_attn.lora_"
    save_file({name + "A.weight": torch.ones(2, 32), name + "B.weight": torch.ones(96, 2)},
              str(dora / "adapter_model.safetensors"))
    if not (ws / "lora-run").exists():  # a LoRA run of rank 2 on the tiny run
        assert main(["train", "--data", str(ws / "data"), "--run-dir", str(ws / "lora-run"), "--train.init_from",
                     str(ws / "run"), "--lora.r", "2", "--max-steps", "1", "--device", "cpu", "--train.batch_size",
                     "4", "--train.eval_interval", "0", "--train.save_interval", "1", "--no-progress"]) == 0
    adapter = ws / "peft-pickled"  # a PEFT adapter whose weights are a pickle
    adapter.mkdir(exist_ok=True)
    (adapter / "adapter_config.json").write_text('{"peft_type": "LORA", "r": 2, "lora_alpha": 4}', encoding="utf-8")
    (adapter / "adapter_model.bin").write_bytes(payload)
    # data the run was not trained on: the same tokenizer on another corpus, and another vocabulary
    from lmforge.data.prepare import prepare

    other = ws / "corpus2"
    other.mkdir(exist_ok=True)
    for i in range(6):
        (other / f"other{i}.txt").write_text(f"Another document {i}.\n" + TEXT[i * 11:], encoding="utf-8")
    if not (ws / "data2").exists():
        prepare([str(other)], str(ws / "data2"), tokenizer=str(ws / "data" / "tokenizer.json"), split=(0.8, 0.1, 0.1),
                workers=1, progress=False)
    if not (ws / "data-added").exists():  # the run's tokenizer and one token more
        prepare([str(other)], str(ws / "data-added"), tokenizer=str(ws / "data" / "tokenizer.json"),
                split=(0.8, 0.1, 0.1), workers=1, progress=False, add_tokens=["<|user|>"])
    if not (ws / "lora-added").exists():  # a LoRA run that learned that token's rows
        assert main(["train", "--data", str(ws / "data-added"), "--run-dir", str(ws / "lora-added"),
                     "--train.init_from", str(ws / "run"), "--lora.r", "2", "--max-steps", "1", "--device", "cpu",
                     "--train.batch_size", "4", "--train.eval_interval", "0", "--train.save_interval", "1",
                     "--no-progress"]) == 0
    if not (ws / "lora-table").exists():  # a LoRA run that adapted the tied embedding of the tiny run
        assert main(["train", "--data", str(ws / "data"), "--run-dir", str(ws / "lora-table"), "--train.init_from",
                     str(ws / "run"), "--lora.r", "2", "--lora.targets", "q,emb", "--max-steps", "1", "--device",
                     "cpu", "--train.batch_size", "4", "--train.eval_interval", "0", "--train.save_interval", "1",
                     "--no-progress"]) == 0
    if not (ws / "data-bytes").exists():
        prepare([str(other)], str(ws / "data-bytes"), tokenizer="byte", split=(0.8, 0.1, 0.1), workers=1, progress=False)
    # outputs --force must not replace: a folder of the user's, an lmforge output with a note added, a link
    (ws / "mine").mkdir(exist_ok=True)
    (ws / "mine" / "notes.txt").write_text("my notes\n", encoding="utf-8")
    (ws / "notes.png").write_text("not an image\n", encoding="utf-8")
    (ws / "notes.npy").write_text("not an array\n", encoding="utf-8")
    if not (ws / "hf").exists():
        assert main(["export", str(ws / "run"), "--format", "hf", "--out", str(ws / "hf")]) == 0
        (ws / "hf" / "NOTES.md").write_text("where this came from\n", encoding="utf-8")
        (ws / "hf-link").symlink_to(ws / "hf")
    if not (ws / "data-noted").exists():
        shutil.copytree(ws / "data", ws / "data-noted")
        (ws / "data-noted" / "extra.txt").write_text(TEXT, encoding="utf-8")
        (ws / "data-link").symlink_to(ws / "data")
    (ws / "deep.jsonl").write_text('{"text": "fine"}\n' + "[" * 100_000 + "]" * 100_000 + "\n", encoding="utf-8")
    (ws / "bigint.jsonl").write_text('{"text": "fine"}\n{"text": "x", "n": ' + "7" * 5000 + "}\n", encoding="utf-8")
    (ws / "afile").write_text("a file, not a folder\n", encoding="utf-8")
    (ws / "bad-label.jsonl").write_text('{"prompt": "Hi", "completion": "Hello!", "label": true}\n'
                                        '{"prompt": "Hi", "completion": "Go away.", "label": "maybe"}\n')
    (ws / "bad-margin.jsonl").write_text('{"prompt": "Hi", "chosen": "Hello!", "rejected": "Go away.", "margin": 1}\n'
                                         '{"prompt": "Yo", "chosen": "Hey!", "rejected": "No.", "margin": "high"}\n')
    (ws / "same-pair.jsonl").write_text('{"prompt": "Hi", "chosen": "Hello!", "rejected": "Go away."}\n'
                                        '{"prompt": "Hi", "chosen": "Hello!", "rejected": "Hello!"}\n', encoding="utf-8")
    if not (ws / "pipe.txt").exists():
        os.mkfifo(ws / "pipe.txt")
    if not (ws / "encoder").exists():  # a tiny BERT-style encoder trained with mlm
        assert main(["prepare", str(ws / "corpus"), "--mask-token", "--out", str(ws / "data-mlm"), "--no-progress",
                     "--split", "0.8,0.1,0.1"]) == 0
        assert main(["train", "--preset", "tiny", "--data", str(ws / "data-mlm"), "--run-dir", str(ws / "encoder"),
                     "--model.causal", "false", "--train.objective", "mlm", "--max-steps", "2", "--device", "cpu",
                     "--train.batch_size", "4", "--train.eval_interval", "2", "--train.eval_batches", "1",
                     "--train.save_interval", "2", "--optim.warmup_steps", "1"]) == 0
    return marker


N_CASES = 183
EXIT_CODES = {"serve-port-in-use": 3}  # a server that cannot bind exits as uvicorn does
PROGRESS_BAR = re.compile(r"[\w ]+: .*\[\d+:\d\d(:\d\d)?(<[\d:?]+)?, [^\]]*\]$")  # tqdm: "reading: 0.00B [00:00, ?B/s]"


def test_bad_inputs_table_has_enough_rows(workspace):
    assert len(_bad_inputs(workspace)) == N_CASES >= 30  # keep N_CASES in step with the table


@pytest.mark.parametrize("row", range(N_CASES))
def test_each_bad_input_is_one_clear_line(workspace, hostile_files, capsys, monkeypatch, row):
    name, argv, needle = _bad_inputs(workspace)[row]
    monkeypatch.chdir(workspace)  # where a command writes by default (runs/, ./loss.png) is inside the compared tree
    before = _tree_digest(workspace)
    capsys.readouterr()

    def hung(signum: int, frame: object) -> None:  # a row that stopped failing (a server that now serves) must
        raise TimeoutError(f"{name}: still running after 120 s; this input no longer fails")  # not hang the suite

    previous = signal.signal(signal.SIGALRM, hung)
    signal.alarm(120)
    try:
        code = main(argv)
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)
    captured = capsys.readouterr()
    # what a terminal shows: progress bars redraw themselves with \r and are cleared
    err_lines = [line.split("\r")[-1] for line in captured.err.split("\n")]
    err_lines = [line for line in err_lines if line.strip()]
    assert code == EXIT_CODES.get(name, 2), f"{name}: exit {code}, stderr {captured.err!r}"
    # one error line; warnings that name a skipped file, and progress bars (a log keeps each one's last state
    # as a line), may come before it
    err_lines = [line for line in err_lines if not line.startswith("warning: ") and not PROGRESS_BAR.match(line)]
    assert len(err_lines) == 1, f"{name}: stderr has {len(err_lines)} lines: {captured.err!r}"
    assert "Traceback" not in captured.err and "internal error" not in captured.err, name
    assert needle in err_lines[0], f"{name}: {needle!r} not in {err_lines[0]!r}"
    after = _tree_digest(workspace)
    changed = {k for k in before.keys() | after.keys() if before.get(k) != after.get(k)}
    assert not changed, f"{name}: entries new, changed or removed: {sorted(changed)}"
    assert not hostile_files.exists(), "a pickle payload was executed"


def test_a_reader_that_stops_reading_ends_the_command_quietly():
    """`lmforge ... | head`: stdout's reader is gone before the command writes; no traceback, no internal error."""
    proc = subprocess.Popen([sys.executable, "-m", "lmforge.cli", "plan", "--preset", "tiny"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)
    proc.stdout.close()  # the reader went away
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=120) == 141, err
    assert "internal error" not in err and "Traceback" not in err and "Exception ignored" not in err, err


def test_the_installed_command_reports_and_exits_like_main(workspace, tmp_path):
    """A real process: the console script prints one line and exits 2; --debug shows the traceback."""
    exe = Path(sys.executable).parent / "lmforge"
    cmd = [str(exe)] if exe.exists() else [sys.executable, "-m", "lmforge.cli"]
    done = subprocess.run(cmd + ["prepare", str(tmp_path / "missing"), "--out", str(tmp_path / "o")],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and len(done.stderr.strip().splitlines()) == 1
    assert "missing" in done.stderr and not (tmp_path / "o").exists()
    debug = subprocess.run(cmd + ["prepare", str(tmp_path / "missing"), "--out", str(tmp_path / "o"), "--debug"],
                           capture_output=True, text=True, timeout=120)
    assert debug.returncode != 0 and "Traceback" in debug.stderr


def test_train_into_a_log_file_writes_plain_lines_not_bar_redraws(workspace, tmp_path):
    """`lmforge train > log 2>&1`: no carriage returns or escape codes, one plain line per log_interval and per
    evaluation; --no-progress leaves those lines out too."""
    exe = Path(sys.executable).parent / "lmforge"
    cmd = [str(exe)] if exe.exists() else [sys.executable, "-m", "lmforge.cli"]
    cmd += ["train", "--preset", "tiny", "--data", str(workspace / "data"), "--max-steps", "4", "--device", "cpu",
            "--train.batch_size", "4", "--train.log_interval", "2", "--train.eval_interval", "4",
            "--train.eval_batches", "1", "--train.save_interval", "4", "--optim.warmup_steps", "1"]
    logs = {}
    for flags in ([], ["--no-progress"]):
        log = tmp_path / f"train{len(flags)}.log"
        with open(log, "wb") as f:
            done = subprocess.run(cmd + ["--run-dir", str(tmp_path / f"run{len(flags)}"), *flags], stdout=f,
                                  stderr=f, timeout=600)
        logs[bool(flags)] = log.read_text(encoding="utf-8")
        assert done.returncode == 0, logs[bool(flags)]
        assert "\r" not in logs[bool(flags)] and "\x1b" not in logs[bool(flags)]
    steps = re.findall(r"^step (\d+)/4 loss \d+\.\d{4} tok/s [\d,]+ eta \d+:\d\d:\d\d$", logs[False], re.M)
    assert steps == ["2", "4"], logs[False]
    assert re.search(r"^step 4: val_loss \d", logs[False], re.M), logs[False]
    assert not re.search(r"^step \d", logs[True], re.M), logs[True]


def test_help_teaches_every_command():
    for command in ["prepare", "train", "eval", "generate", "plot"]:
        with pytest.raises(SystemExit) as info:
            main([command, "--help"])
        assert info.value.code == 0
    with pytest.raises(SystemExit):
        main(["train", "--help"])


def test_help_starts_without_loading_torch():
    """`lmforge COMMAND --help` builds every command's parser, and none of them needs torch (a second and a half)."""
    code = ("import sys; from lmforge.cli import main\ntry: main(['generate', '--help'])\nexcept SystemExit: pass\n"
            "print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert "--prompt" in out and out.strip().endswith("False")


def test_parse_overrides_forms():
    assert parse_overrides(["--model.n_layer", "3", "--optim.lr=0.1"]) == {"model.n_layer": "3", "optim.lr": "0.1"}
    with pytest.raises(ConfigError, match="needs a value"):
        parse_overrides(["--model.n_layer"])
    with pytest.raises(ConfigError, match="unknown option --layers"):
        parse_overrides(["--layers", "3"])


def test_train_short_flags_become_settings():
    args, extra = build_parser().parse_known_args(
        ["train", "--preset", "tiny", "--data", "d", "--run-dir", "r", "--max-steps", "5", "--device", "cpu",
         "--precision", "bf16-mixed", "--compile", "--resume", "auto", "--allow-data-change", "--on-nonfinite", "skip",
         "--model.n_layer", "3"])
    args.overrides = extra
    assert train_overrides(args) == {
        "model.n_layer": "3", "data.path": "d", "train.run_dir": "r", "train.max_steps": "5", "train.device": "cpu",
        "train.precision": "bf16-mixed", "train.compile": "true", "train.resume": "auto",
        "train.allow_data_change": "true", "train.nonfinite": "skip", "preset": "tiny"}
    args, extra = build_parser().parse_known_args(["train"])
    args.overrides = extra
    assert train_overrides(args) == {}


@dataclass
class Limits:
    max_items: int = doc("Most items.", 4, ge=1)
    name: Optional[str] = doc("A name.", None)
    mode: Literal["fast", "exact"] = doc("How.", "fast")
    verbose: bool = doc("Talk.", False)
    early: Union[bool, Literal["never"]] = doc("Early.", False)
    ids: Optional[list[int]] = doc("Ids.", None, ge=0)

    def __post_init__(self) -> None:
        validate(self, "limits")


def _limits(argv):
    parser = argparse.ArgumentParser()
    add_config_arguments(parser, Limits, "limits")
    return build_section(Limits, config_values(parser.parse_args(argv), Limits, "limits"), "limits")


def test_flags_generated_from_a_config_leave_converting_and_checking_to_it():
    assert _limits([]) == Limits()
    assert _limits(["--max-items", "7", "--name", "x", "--mode", "exact", "--verbose", "--early", "never",
                    "--ids", "1", "--ids", "2,3"]) == Limits(7, "x", "exact", True, "never", [1, 2, 3])
    assert _limits(["--no-verbose", "--early", "true"]) == Limits(verbose=False, early=True)
    for argv, message in [(["--max-items", "0"], "limits.max_items=0 is invalid: a positive integer"),
                          (["--mode", "slow"], "limits.mode='slow' is invalid: choose one of fast, exact"),
                          (["--ids", "1", "--ids", "-2"], "limits.ids[1]=-2 is invalid: 0 or a positive integer"),
                          (["--max-items", "many"], "limits.max_items='many' has the wrong type: expected int")]:
        with pytest.raises(ConfigError) as info:
            _limits(argv)
        assert str(info.value) == message
    parser = argparse.ArgumentParser()
    add_config_arguments(parser, Limits, "limits")
    text = " ".join(parser.format_help().split())
    assert "--mode fast|exact How. (fast | exact; default: fast)" in text
    assert "--early true|false|never" in text and "--verbose, --no-verbose" in text and "(repeatable)" in text


@pytest.mark.parametrize("flags,message", [
    (["--max-n", "0"], "serve.max_n=0 is invalid: a positive integer"),
    (["--timeout", "soon"], "serve.timeout='soon' has the wrong type: expected float"),
    (["--max-prompt-tokens", "0"], "serve.max_prompt_tokens=0 is invalid: a positive integer or null"),
    (["--max-prompts", "9", "--max-concurrency", "4", "--max-queue", "4"], "serve.max_prompts=9 is more than"),
    (["--prompt-lookup-num-tokens", "0"], "serve.prompt_lookup_num_tokens=0 is invalid"),
    (["--assistant-model", "small", "--prompt-lookup-num-tokens", "4"],
     "serve.assistant_model and serve.prompt_lookup"),
    (["--num-assistant-tokens", "4"], "serve.num_assistant_tokens sets how many"),
    (["--max-loras", "0"], "serve.max_loras=0 is invalid: an integer from 1 to 1024"),
])
def test_serve_flags_are_checked_by_the_config_before_anything_loads(tmp_path, capsys, flags, message):
    assert main(["serve", str(tmp_path / "ghost"), *flags]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"lmforge serve: error: {message}") and err.count("\n") == 1


def test_eval_draws_a_progress_bar_on_a_terminal_and_nothing_in_a_pipe(workspace):
    """`lmforge eval`: a bar on stderr when it is a terminal (counting the split's tokens), none when stderr is a
    pipe or with --no-progress; stdout holds the JSON either way."""
    import fcntl
    import pty
    import struct
    import termios

    exe = Path(sys.executable).parent / "lmforge"
    cmd = [str(exe)] if exe.exists() else [sys.executable, "-m", "lmforge.cli"]
    cmd += ["eval", str(workspace / "run"), "--device", "cpu", "--batch-size", "1"]

    def run(flags: list[str], terminal: bool) -> tuple[dict, str]:
        if not terminal:
            done = subprocess.run(cmd + flags, capture_output=True, text=True, timeout=300)
            assert done.returncode == 0, done.stderr
            return json.loads(done.stdout), done.stderr
        leader, follower = pty.openpty()
        fcntl.ioctl(follower, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 120, 0, 0))  # a terminal 120 wide
        with subprocess.Popen(cmd + flags, stdout=subprocess.PIPE, stderr=follower) as proc:
            os.close(follower)
            out = proc.stdout.read()
            seen = b""
            while True:  # the terminal's side until the process closes it
                try:
                    chunk = os.read(leader, 4096)
                except OSError:  # EIO: every writer is gone
                    break
                if not chunk:
                    break
                seen += chunk
            assert proc.wait(timeout=300) == 0, seen
        os.close(leader)
        return json.loads(out), seen.decode("utf-8", "replace")

    result, drawn = run([], terminal=True)
    from tqdm import tqdm

    total = re.escape(tqdm.format_sizeof(result["tokens"]))  # the split's predicted tokens, e.g. 3.25k
    assert re.search(rf"eval: +\d+%\|.*/{total} \[.*tok/s\]", drawn), drawn
    for flags, terminal in (([], False), (["--no-progress"], True)):
        quiet, stderr = run(flags, terminal)
        # the same evaluation; the last bits may differ between processes (the CPU kernels' summation order)
        assert quiet["loss"] == pytest.approx(result["loss"], rel=1e-6), (quiet, result)
        assert "eval:" not in stderr and "%" not in stderr, stderr
