"""The `lmforge` command: one entry point, each subcommand declared once.

    lmforge prepare  raw text -> tokenizer + shuffled train/val/test token shards; task records -> examples
    lmforge train    a Transformer on prepared shards or task examples (YAML config + --section.key overrides)
    lmforge sweep    hyperparameter search with Optuna: trials are train runs, pruned, resumable, in parallel
    lmforge eval     loss, perplexity and bits per byte of a checkpoint on a split; task metrics when fine-tuned
    lmforge generate text from a run or checkpoint directory
    lmforge classify labels with probabilities from a classifier
    lmforge reward   a reward model's score of prompt/completion pairs
    lmforge best-of-n  samples of each prompt ranked by a reward model: preference pairs and sft examples
    lmforge fill-mask an encoder's top tokens for each <MASK> of a text
    lmforge embed    a vector per text: the model's hidden states pooled
    lmforge plot     the loss curves of a run as a PNG
    lmforge import   a Hugging Face model directory -> a checkpoint
    lmforge export   a checkpoint -> a Hugging Face directory, an ONNX file or a GGUF file
    lmforge merge    a LoRA run -> a full checkpoint with the adapters folded into the weights
    lmforge serve    an OpenAI-compatible HTTP API over a run or checkpoint directory

Problems a user can cause are reported as one line on stderr with exit code 2 (a traceback only with
--debug). `train` exits 3 when it stops on a non-finite loss or gradient (train.nonfinite: stop), and 0
when SIGTERM or Ctrl-C stopped it after saving a checkpoint (130 on a second Ctrl-C). Heavy modules
(torch, tokenizers) are imported inside the subcommands so `--help` is instant.
"""

from __future__ import annotations

import argparse
import dataclasses
import errno
import sys
import textwrap
import types
import typing
from typing import Any, Callable, Sequence

from lmforge import __version__
from lmforge.allocator import keep_freed_memory
from lmforge.errors import ConfigError, LmforgeError

EXIT_USAGE = 2


class UsageError(LmforgeError):
    """A command line argparse cannot parse; `prog` is the (sub)command it belongs to."""

    def __init__(self, prog: str, message: str) -> None:
        super().__init__(f"{message} (see {prog} --help)")
        self.prog = prog


class _Parser(argparse.ArgumentParser):
    """argparse that reports a usage error as one line and exit code 2 (see main)."""

    def error(self, message: str) -> None:  # type: ignore[override]
        raise UsageError(self.prog, message)


def _help_formatter(prog: str) -> argparse.HelpFormatter:
    return argparse.RawDescriptionHelpFormatter(prog, max_help_position=34, width=100)


def _escape(help_text: str) -> str:
    return help_text.replace("%", "%%")  # argparse %-formats help texts


def add_config_arguments(parser: argparse.ArgumentParser, cls: type, section: str,
                         metavars: dict[str, str] | None = None, aliases: dict[str, list[str]] | None = None) -> None:
    """One --field-name flag per field of config dataclass `cls`, its help the field's doc, choices and default.

    The flags only collect what was typed, None when absent: text (a value flag), a list of texts (a list
    field: repeat the flag), True/False (a bool field: --name / --no-name). `config_values` gathers them for
    config.build_section, which converts and checks them as the library does for a config file, so the
    command line never checks a value of its own. `metavars` names a field's value ({"api_key": "KEY"}),
    `aliases` gives a field more flags ({"stop_strings": ["--stop"]}).
    """
    from lmforge.config import field_docs

    for f in field_docs(cls):
        flag, dest, help_text = "--" + f.name.replace("_", "-"), f"{section}.{f.name}", _escape(f.help)
        flags = [flag, *(aliases or {}).get(f.name, [])]
        parts = [a for a in typing.get_args(f.type) if a is not type(None)] \
            if typing.get_origin(f.type) in (typing.Union, types.UnionType) else [f.type]
        base = parts[0] if len(parts) == 1 else f.type
        metavar = (metavars or {}).get(f.name) or ("|".join(f.choices) if f.choices else
                                                   {int: "N", float: "X"}.get(base, "TEXT"))
        if base is bool:
            parser.add_argument(*flags, dest=dest, action=argparse.BooleanOptionalAction, default=None, help=help_text)
        elif typing.get_origin(base) in (list, dict):
            parser.add_argument(*flags, dest=dest, action="append", metavar=metavar, help=help_text + " (repeatable)")
        else:
            parser.add_argument(*flags, dest=dest, metavar=metavar, help=help_text)


def config_values(args: argparse.Namespace, cls: type, section: str) -> dict[str, Any]:
    """{field: value} of the flags `add_config_arguments(parser, cls, section)` added that were given."""
    values = {f.name: getattr(args, f"{section}.{f.name}") for f in dataclasses.fields(cls)}
    return {name: value for name, value in values.items() if value is not None}


# --------------------------------------------------------------------------------------------- prepare
def _add_prepare(sub: Any) -> None:
    p = sub.add_parser(
        "prepare", help="raw text -> tokenizer + shuffled train/val/test token shards",
        formatter_class=_help_formatter,
        description=textwrap.dedent("""\
            Read raw text, validate and clean it, train a tokenizer on the train split and write
            shuffled train/val/test token shards with a manifest and a data report.

            Inputs: .txt files (one document each), .jsonl (one JSON object per line), .parquet,
            folders (read recursively) and globs, in any mix; or --dataset shakespeare.
            Invalid UTF-8 is replaced and counted, binary files are skipped with a warning, empty and
            duplicate documents are counted. Nothing is written when the input cannot be used."""),
        epilog=textwrap.dedent("""\
            examples:
              lmforge prepare --dataset shakespeare --tokenizer char --out data/shakespeare-char
              lmforge prepare corpus/ notes/*.txt --tokenizer bpe --vocab-size 8192 --out data/mine
              lmforge prepare dump.jsonl --jsonl-field body --split 0.98,0.01,0.01 --out data/web
              lmforge prepare qa.jsonl --task sft --tokenizer runs/base --template instruct --out data/qa
              lmforge prepare chats.jsonl --task sft --tokenizer runs/base --add-tokens chat --out data/chat"""))
    p.add_argument("inputs", nargs="*", metavar="PATH", help="files, folders or globs (quote globs)")
    p.add_argument("--dataset", choices=["shakespeare"], help="a built-in corpus instead of PATHs")
    p.add_argument("--out", required=True, metavar="DIR", help="output directory for shards, manifest, report")
    p.add_argument("--tokenizer", default="char", metavar="KIND",
                   help="char | byte | bpe, or the path of an lmforge tokenizer.json to reuse (default: char)")
    p.add_argument("--vocab-size", type=int, default=8192, metavar="N", help="BPE vocabulary size (default: 8192)")
    p.add_argument("--split", default="0.9,0.05,0.05", metavar="T,V,T",
                   help="train,val,test fractions of the documents (default: 0.9,0.05,0.05)")
    p.add_argument("--seed", type=int, default=1337, help="shuffle seed (default: 1337)")
    p.add_argument("--doc-split", choices=["file", "paragraph"], default="file",
                   help=".txt files: one document per file, or per blank-line-separated paragraph")
    p.add_argument("--jsonl-field", default="text", metavar="NAME", help="text field of .jsonl records")
    p.add_argument("--parquet-column", default="text", metavar="NAME", help="text column of .parquet files")
    p.add_argument("--keep-duplicates", action="store_true", help="keep exact duplicate documents")
    p.add_argument("--force", action="store_true", help="replace an existing prepared dataset in --out")
    p.add_argument("--special-tokens", default="<START>,<END>,<PAD>", metavar="S,E,P",
                   help="names of the start, end and padding tokens (default: <START>,<END>,<PAD>)")
    p.add_argument("--mask-token", nargs="?", const="<MASK>", metavar="NAME",
                   help="add a mask token (default name <MASK>) for training an encoder with train.objective mlm; "
                        "text never produces it")
    p.add_argument("--add-tokens", metavar="A,B,...", type=_token_names,
                   help="add tokens to the tokenizer at the next ids (e.g. chat markers <|user|>,<|assistant|>; "
                        "`chat`: the heads of lmforge's chat turns, <|system|> <|user|> <|assistant|> <|tool|> "
                        "<|tools|>): a text that spells one encodes it as its one id; with --tokenizer of a trained "
                        "model, `lmforge train` from that model grows its embedding by their rows (each starting at "
                        "the mean row)")
    p.add_argument("--workers", type=int, default=2, metavar="N", help="encoding processes (default: 2)")
    p.add_argument("--no-progress", action="store_true", help="hide progress bars")
    t = p.add_argument_group("task data (--task): records -> examples for fine-tuning a base model")
    t.add_argument("--task", choices=["sft", "classify", "preference", "unpaired"],
                   help="sft: text to text, prompt -> completion; classify: text -> label; preference: a prompt with a "
                   "chosen and a rejected completion, for DPO or a reward model; unpaired: a prompt, one completion "
                   "and a label (true: desirable, false: not), for KTO (.jsonl, .csv, .tsv, .parquet records); --tokenizer is "
                   "then the base model RUN_OR_CHECKPOINT")
    t.add_argument("--template", default="plain", metavar="NAME_OR_STRING",
                   help="prompt template: plain ('{prompt}\\n'), instruct, or your own string with {field}s of the "
                        "record, {prompt} being the prompt field (default: plain)")
    t.add_argument("--prompt-field", default="prompt", metavar="NAME", help="record field of the prompt")
    t.add_argument("--completion-field", default="completion", metavar="NAME", help="record field of the completion")
    t.add_argument("--chosen-field", default="chosen", metavar="NAME",
                   help="preference: record field of the preferred completion")
    t.add_argument("--rejected-field", default="rejected", metavar="NAME",
                   help="preference: record field of the other completion")
    t.add_argument("--text-field", default="text", metavar="NAME", help="classify: record field of the text")
    t.add_argument("--label-field", default="label", metavar="NAME",
                   help="classify and unpaired: record field of the label")
    t.add_argument("--messages-field", default="messages", metavar="NAME",
                   help="record field of a conversation (a list of {role, content} turns, the last the reply; an "
                   "assistant turn may have tool_calls, a tool turn their result)")
    t.add_argument("--tools-field", default="tools", metavar="NAME",
                   help="with --messages-field: record field of the function tools the conversation may call "
                   "([{type: function, function: {name, description, parameters}}], as apply_chat_template's tools)")
    t.add_argument("--max-length", type=int, metavar="N",
                   help="most tokens per example (default: the base model's block_size + 1 for sft and preference, "
                        "block_size for classify); longer sft examples lose prompt tokens from the left, then "
                        "completion tokens from the right (a preference pair keeps one prompt for both); a longer "
                        "classify text loses tokens from the right")
    t.add_argument("--drop-long", action="store_true", help="drop examples longer than --max-length (counted)")
    t.add_argument("--skip-bad", action="store_true",
                   help="skip bad records (counted and listed in the report) instead of stopping at the first")
    p.set_defaults(run=_run_prepare)


def _token_names(text: str) -> list[str]:
    """--add-tokens A,B,...: the names, which Tokenizer.with_added_tokens checks; `chat` stands for the heads of
    lmforge's chat turns (data.tasks.CHAT_MARKERS)."""
    from lmforge.data.tasks import CHAT_MARKERS

    names = [name.strip() for name in text.split(",")]
    return [m for name in names for m in (CHAT_MARKERS if name == "chat" else (name,))]


def _parse_split(text: str) -> tuple[float, float, float]:
    try:
        parts = tuple(float(x) for x in text.split(","))
    except ValueError:
        parts = ()
    if len(parts) != 3 or any(x <= 0 for x in parts) or abs(sum(parts) - 1.0) > 1e-6:
        raise ConfigError(f"--split {text!r} is invalid: give three positive fractions (every split gets "
                          "documents) that sum to 1, e.g. 0.9,0.05,0.05")
    return parts  # type: ignore[return-value]


def _run_prepare(args: argparse.Namespace) -> int:
    from lmforge.data.prepare import MIN_VOCAB, format_report, prepare

    if args.task:
        return _run_prepare_task(args)

    specials = tuple(s.strip() for s in args.special_tokens.split(","))
    if len(specials) != 3 or not all(specials) or len(set(specials)) != 3:
        raise ConfigError(f"--special-tokens {args.special_tokens!r} is invalid: give three distinct names, "
                          "e.g. <START>,<END>,<PAD>")
    if args.tokenizer in ("char", "bpe") and not MIN_VOCAB < args.vocab_size <= 4_000_000:
        raise ConfigError(f"--vocab-size {args.vocab_size} is invalid: use more than {MIN_VOCAB} (3 special tokens "
                          "+ 256 bytes) and at most 4000000")
    if not 1 <= args.workers <= 256:
        raise ConfigError(f"--workers {args.workers} is invalid: use 1 or more")
    if not args.inputs and not args.dataset:
        raise ConfigError("no input: give files, folders or globs, or --dataset shakespeare")
    report = prepare(
        args.inputs, args.out, dataset=args.dataset, tokenizer=args.tokenizer, vocab_size=args.vocab_size,
        split=_parse_split(args.split), seed=args.seed, doc_split=args.doc_split, jsonl_field=args.jsonl_field,
        parquet_column=args.parquet_column, keep_duplicates=args.keep_duplicates, force=args.force,
        special_tokens=specials, workers=args.workers, progress=not args.no_progress, mask_token=args.mask_token,
        add_tokens=args.add_tokens or ())
    print(format_report(report))
    return 0


def _run_prepare_task(args: argparse.Namespace) -> int:
    """`prepare --task`: the tokenizer and default max length come from the base model's checkpoint."""
    from pathlib import Path

    from lmforge.checkpoint import read_run_config, verified_checkpoint
    from lmforge.data.tasks import Fields, format_task_report, prepare_task
    from lmforge.tokenizer import KINDS

    if args.dataset:
        raise ConfigError("--dataset is pretraining text: a --task set is made from your record files (PATHs)")
    if args.tokenizer in KINDS:
        raise ConfigError(f"--task {args.task} uses the base model's tokenizer; a new {args.tokenizer} tokenizer is "
                          "refused for a fine-tuning set: pass --tokenizer RUN_OR_CHECKPOINT of the model to fine-tune")
    base = Path(args.tokenizer)
    if base.is_file() and base.name == "tokenizer.json":  # a checkpoint's own tokenizer file names its checkpoint
        base = base.parent
    ckpt, manifest = verified_checkpoint(base)
    if "tokenizer.json" not in manifest["files"]:
        raise ConfigError(f"checkpoint {ckpt} holds no tokenizer.json: give a base model trained on prepared data "
                          "or imported with `lmforge import`")
    block_size = read_run_config(ckpt).model.block_size  # an sft example of L tokens trains on L-1 inputs
    max_length = args.max_length if args.max_length is not None else block_size + (args.task != "classify")
    report = prepare_task(
        args.inputs, args.out, task=args.task, tokenizer_file=ckpt / "tokenizer.json", base=str(ckpt),
        max_length=max_length, template=args.template, drop_long=args.drop_long, skip_bad=args.skip_bad,
        fields=Fields(args.prompt_field, args.completion_field, args.messages_field, args.text_field, args.label_field,
                      args.chosen_field, args.rejected_field, args.tools_field),
        keep_duplicates=args.keep_duplicates, split=_parse_split(args.split), seed=args.seed, force=args.force,
        add_tokens=args.add_tokens or ())
    print(format_task_report(report))
    return 0


# ----------------------------------------------------------------------------------------------- train
_TRAIN_ALIASES = {  # short flags for the settings people change most: flag -> (config key, metavar)
    "--data": ("data.path", "DIR"), "--run-dir": ("train.run_dir", "DIR"), "--max-steps": ("train.max_steps", "N"),
    "--device": ("train.device", "DEV"), "--precision": ("train.precision", "P"), "--compile": ("train.compile", ""),
    "--resume": ("train.resume", "WHAT"), "--allow-data-change": ("train.allow_data_change", ""),
    "--on-nonfinite": ("train.nonfinite", "POLICY"),
}


def _add_train(sub: Any) -> None:
    from lmforge.config import PRESETS, SECTIONS, builtin_recipes, field_docs

    recipes = ", ".join(builtin_recipes())
    lines, fields = [], {}
    for section, cls in SECTIONS.items():
        lines.append(f"{section}:")
        for f in field_docs(cls):
            lines.append(f"  --{section}.{f.name:<17} {f.help}")
            fields[f"{section}.{f.name}"] = f
    p = sub.add_parser(
        "train", help="train a Transformer on prepared shards",
        formatter_class=_help_formatter,
        description=textwrap.dedent("""\
            Train a GPT-style Transformer decoder on the shards written by `lmforge prepare`.
            Settings come from a YAML file or a built-in recipe (--config) and --section.key VALUE
            overrides, checked strictly before anything is built: an unknown key is an error naming the
            closest valid key.
            The run directory gets the resolved config.yaml, metrics.jsonl, TensorBoard events (tb/),
            checkpoints (checkpoints/step-N/) and loss.png."""),
        epilog="config keys:\n" + "\n".join(lines) + textwrap.dedent(f"""

            presets: {', '.join(PRESETS)}
            built-in recipes (--config NAME): {recipes}

            examples:
              lmforge train --config shakespeare-char
              lmforge train --config my-recipe.yaml --optim.lr 3e-3
              lmforge train --preset char-small --data data/shakespeare-char --train.max_steps 500
              lmforge train --config shakespeare-char --resume auto
              lmforge train --config shakespeare-char --resume auto --allow-data-change
              torchrun --nproc-per-node 2 -m lmforge.cli train --config shakespeare-char"""))
    p.add_argument("--config", metavar="FILE|NAME", help=f"YAML or JSON config file, or a built-in recipe: {recipes}")
    p.add_argument("--preset", metavar="NAME", help=f"model preset: {', '.join(PRESETS)}")
    for flag, (key, metavar) in _TRAIN_ALIASES.items():  # help from the field; the value is checked by the config
        f = fields[key]
        if f.type is bool:
            p.add_argument(flag, action="store_true", help=_escape(f"= --{key} true: {f.doc}"))
        else:
            p.add_argument(flag, metavar=metavar, help=_escape(f"= --{key}: {f.help}"))
    p.add_argument("--no-progress", action="store_true",
                   help="no progress: by default a bar on a terminal, and elsewhere (a log file, a pipe) one plain "
                        "line per train.log_interval and per evaluation")
    p.set_defaults(run=_run_train, takes_overrides=True)


def parse_overrides(extra: Sequence[str]) -> dict[str, str]:
    """`--section.key value` or `--section.key=value` pairs -> {"section.key": "value"}."""
    out: dict[str, str] = {}
    i = 0
    while i < len(extra):
        token = extra[i]
        if not token.startswith("--") or len(token) <= 2:
            raise ConfigError(f"unexpected argument {token!r}: settings are given as --section.key VALUE")
        key, eq, value = token[2:].partition("=")
        if not eq:
            if i + 1 >= len(extra) or extra[i + 1].startswith("--"):
                raise ConfigError(f"--{key} needs a value, e.g. --{key} VALUE")
            value = extra[i + 1]
            i += 1
        if "." not in key:
            raise ConfigError(f"unknown option --{key}: config keys look like --model.n_layer 4 (see --help)")
        out[key] = value
        i += 1
    return out


def train_overrides(args: argparse.Namespace) -> dict[str, str]:
    """{"section.key": text} from `lmforge train`'s --section.key settings, its short flags and --preset."""
    overrides = parse_overrides(args.overrides)
    for flag, (key, _) in _TRAIN_ALIASES.items():
        value = getattr(args, flag[2:].replace("-", "_"))
        if value not in (None, False) and key in overrides:
            raise ConfigError(f"{flag} and --{key} set the same thing: give one of them")
        if value is True:  # the flag of a bool setting
            overrides[key] = "true"
        elif value not in (None, False):
            overrides[key] = value
    if args.preset:
        overrides["preset"] = args.preset
    return overrides


def _run_train(args: argparse.Namespace) -> int:
    from lmforge.config import load_run_config

    config = load_run_config(args.config, train_overrides(args))

    from lmforge.train import train

    train(config, progress=not args.no_progress)
    return 0


# ----------------------------------------------------------------------------------------------- sweep
def _add_sweep(sub: Any) -> None:
    p = sub.add_parser(
        "sweep", help="hyperparameter search: an Optuna study whose trials are train runs",
        formatter_class=_help_formatter,
        description=textwrap.dedent("""\
            Search hyperparameters with Optuna (TPE sampler): every trial is an ordinary run directory
            (OUT/trials/trial-NNNN) trained from --config with values drawn from --space; the objective is
            train.best_metric (val_loss, or a task metric) of the trial. A pruner stops hopeless trials at an
            evaluation. The study lives in OUT/study.db (SQLite): after Ctrl-C or kill -9, --resume OUT
            continues it (an interrupted trial trains on from its checkpoint, finished trials are kept), and
            `optuna-dashboard sqlite:///OUT/study.db` shows it. At the end: a summary table, OUT/best.yaml
            (`lmforge train --config OUT/best.yaml` reproduces the best trial), OUT/trials.csv and PNG plots.

            The space file maps config keys to ranges or choices:
              optim.lr:           {low: 1.0e-3, high: 1.0e-2, log: true}
              model.n_layer:      {low: 2, high: 6}
              model.mlp:          {choices: [gelu, swiglu]}
              optim.warmup_steps: {fraction_of: train.max_steps, low: 0.0, high: 0.1}
              model.rope_theta:   {low: 1.0e+3, high: 1.0e+5, log: true, when: {model.pos_encoding: rope}}"""),
        epilog=textwrap.dedent("""\
            examples:
              lmforge sweep --config shakespeare-char --space configs/sweeps/char-small.yaml --trials 40 \\
                            --workers 2 --out sweeps/char-small
              lmforge sweep --resume sweeps/char-small
              lmforge sweep --config my.yaml --space space.yaml --out sweeps/s --train.max_steps 500"""))
    p.add_argument("--config", metavar="FILE|NAME", help="the run config every trial starts from (as for train)")
    p.add_argument("--space", metavar="FILE", help="YAML search space over config keys")
    p.add_argument("--out", metavar="DIR", help="new sweep directory")
    p.add_argument("--resume", metavar="DIR", help="continue the sweep in DIR (its settings are kept)")
    p.add_argument("--trials", type=int, metavar="N", help="finished trials to reach (default 20; with --resume: "
                   "the sweep's)")
    p.add_argument("--workers", type=int, default=1, metavar="N", help="worker processes on this machine, each "
                   "with cores/N torch threads (default 1)")
    p.add_argument("--pruner", default="median", metavar="NAME", help="median | hyperband | none (default median)")
    p.add_argument("--startup-trials", type=int, default=5, metavar="N",
                   help="median pruner: trials finished before any is pruned (default 5)")
    p.add_argument("--prune-after", type=int, metavar="STEPS",
                   help="no trial is pruned before this step (Hyperband: its smallest budget); default max_steps/10")
    p.add_argument("--seed", type=int, metavar="N", help="sampler seed (default train.seed)")
    p.add_argument("--timeout", type=float, metavar="SECONDS", help="start no new trial after this long")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    p.set_defaults(run=_run_sweep, takes_overrides=True)


def _run_sweep(args: argparse.Namespace) -> int:
    from lmforge.sweep import create_sweep, load_sweep, report, run_sweep, summary_table

    overrides = parse_overrides(args.overrides)
    if args.resume:
        if args.config or args.space or args.out or overrides:
            raise ConfigError("--resume DIR continues a sweep with its own config and space: drop --config, --space, "
                              "--out and --section.key settings")
        sweep = load_sweep(args.resume, trials=args.trials)
    else:
        if not (args.config or overrides) or not args.space or not args.out:
            raise ConfigError("a new sweep needs --config FILE (or --section.key settings), --space FILE and --out "
                              "DIR; or continue one with --resume DIR")
        sweep = create_sweep(args.config, overrides, args.space, args.out, trials=args.trials or 20,
                             pruner=args.pruner, startup_trials=args.startup_trials, prune_after=args.prune_after,
                             seed=args.seed)
    completed = run_sweep(sweep, workers=args.workers, timeout=args.timeout, progress=not args.no_progress)
    summary = report(sweep)
    print(summary_table(summary, sweep.load_study().get_trials(deepcopy=False)))
    print(f"trials.csv, best.yaml, plots: {sweep.dir}; live view: optuna-dashboard {sweep.storage_url}")
    if not completed:
        print(f"stopped: continue with `lmforge sweep --resume {sweep.dir}`")
        return 130
    return 0


DECODING_METAVARS = {"stop_token_ids": "ID", "negative_prompt_ids": "ID", "logit_bias": "ID:BIAS",
                     "sequence_bias": "IDS:BIAS", "bad_words_ids": "IDS", "bad_words": "TEXT", "suppress_tokens": "ID",
                     "begin_suppress_tokens": "ID", "exponential_decay_length_penalty": "START,FACTOR",
                     "guided_choice_ids": "IDS", "guided_regex": "REGEX", "guided_json": "SCHEMA_OR_FILE",
                     "max_time": "SECONDS", "forced_bos_token_id": "ID", "forced_eos_token_id": "ID"}


def _check_assistant_flags(args: argparse.Namespace, values: dict) -> None:
    """The decoding flags that need another flag, and --guided-json FILE read (generate, chat)."""
    from pathlib import Path

    drafter = args.assistant_model or "assistant_early_exit" in values  # a model guesses: another, or its layers
    if "num_assistant_tokens" in values and not drafter:
        raise ConfigError("--num-assistant-tokens sets how many tokens an assistant model guesses: give "
                          "--assistant-model RUN_DIR or --assistant-early-exit N too (or --prompt-lookup-num-tokens "
                          "to guess without a model)")
    if "assistant_confidence_threshold" in values and not drafter:
        raise ConfigError("--assistant-confidence-threshold stops an assistant model's guesses early: give "
                          "--assistant-model RUN_DIR or --assistant-early-exit N too")
    if values.get("num_assistant_tokens_schedule") == "heuristic" and not drafter \
            and "prompt_lookup_num_tokens" not in values:
        raise ConfigError("--num-assistant-tokens-schedule heuristic adapts speculative decoding's guesses: give "
                          "--assistant-model RUN_DIR, --assistant-early-exit N or --prompt-lookup-num-tokens N too")
    schema = values.get("guided_json")
    if schema is not None and not schema.lstrip().startswith("{"):  # not JSON text: a schema file
        try:
            values["guided_json"] = Path(schema).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise ConfigError(f"--guided-json {schema!r} is neither a JSON schema (text starting with '{{') nor a "
                              f"readable UTF-8 file ({type(e).__name__}): give the schema or a .json file holding "
                              "it") from None


# ------------------------------------------------------------------------------------------------ eval
def _add_eval(sub: Any) -> None:
    from lmforge.generate.config import GenerateConfig

    p = sub.add_parser(
        "eval", help="loss, perplexity and bits per byte of a checkpoint; task metrics of a fine-tuned one",
        formatter_class=_help_formatter,
        description=textwrap.dedent("""\
            Evaluate a run or checkpoint directory on the whole val or test split (deterministic), or on text files
            (--text). A language model: loss, perplexity and bits per byte, in windows of block_size tokens that
            overlap with --stride (Hugging Face's sliding-window perplexity). An encoder (model.causal false): the
            MLM loss and masked-token accuracy, the split's windows masked with a fixed seed. A model fine-tuned
            on text-to-text task data (`prepare --task sft`): the loss on the completions, and each example's prompt
            decoded (greedy unless --temperature is given; by default up to the split's longest reference) and scored
            against its reference: BLEU, chrF, ROUGE-1/2/L, exact match and token F1, written with every example to
            OUT/predictions.jsonl and OUT/metrics.json (OUT: RUN_DIR/eval/SPLIT unless --out). A model fine-tuned on
            preference pairs: its preference loss against its reference (train.init_from), reward accuracy and margin;
            on unpaired completions (`prepare --task unpaired`, KTO): the loss, KTO's KL reference point and the mean
            reward of each kind; one row per pair or completion in OUT/predictions.jsonl.
            With --choices FILE, a language model answers multiple-choice questions zero- or few-shot, the way
            lm-evaluation-harness scores HellaSwag or ARC: each choice's log-likelihood as a continuation of the
            context; acc takes the highest, acc_norm the highest per character (OUT: RUN_DIR/eval/choices-NAME)."""),
        epilog=textwrap.dedent("""\
            examples:
              lmforge eval runs/shakespeare-char --split test
              lmforge eval runs/shakespeare-char --split test --stride 64     # overlapping windows
              lmforge eval runs/gpt2 --text held_out.txt --stride 512         # any text, its perplexity
              lmforge eval runs/translate --split test --num-beams 4 --out reports/translate-test
              lmforge eval runs/gpt2 --choices quiz.jsonl --num-fewshot 5
              lmforge eval runs/gpt2 --choices hellaswag_val.jsonl --context-field ctx --choices-field endings \\
                  --answer-field label

            a --choices record (.jsonl or .parquet):
              {"context": "The capital of France is", "choices": ["Paris", "Rome"], "answer": 0}"""))
    p.add_argument("checkpoint", metavar="RUN_OR_CHECKPOINT_DIR")
    p.add_argument("--data", metavar="DIR", help="prepared data (default: the one the run was trained on)")
    p.add_argument("--split", choices=["val", "test", "train"], help="the split of --data (default: val)")
    p.add_argument("--max-tokens", type=int, metavar="N", help="evaluate only the first N tokens")
    p.add_argument("--stride", type=int, metavar="N",
                   help="overlapping windows: one every N tokens, each predicting only tokens no earlier window did, "
                        "with at least block_size - N tokens before them (default: block_size, no overlap)")
    p.add_argument("--text", action="append", metavar="PATH",
                   help="evaluate these text files, folders or globs (.txt, .jsonl, .parquet) instead of a split, "
                        "encoded with the checkpoint's tokenizer (repeat the flag for more)")
    p.add_argument("--max-examples", type=int, metavar="N",
                   help="task data or --choices: evaluate only the first N examples")
    p.add_argument("--out", metavar="DIR", help="task data or --choices: where predictions.jsonl and metrics.json go")
    p.add_argument("--batch-size", type=int, default=16, metavar="N", help="sequences per batch (default: 16)")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | mps")
    p.add_argument("--no-progress", action="store_true",
                   help="hide the progress bar (drawn on stderr, and only when it is a terminal)")
    add_config_arguments(p, GenerateConfig, "generate", metavars=DECODING_METAVARS,
                         aliases={"stop_strings": ["--stop"], "stop_token_ids": ["--stop-token-id"]})
    p.add_argument("--assistant-model", metavar="RUN_OR_CHECKPOINT_DIR",
                   help="text-to-text task data: a smaller model with the same tokenizer drafts the predictions' "
                        "tokens (speculative decoding; greedy predictions unchanged)")
    c = p.add_argument_group("multiple choice (--choices)")
    c.add_argument("--choices", metavar="FILE", help="score the multiple-choice questions of this .jsonl or .parquet "
                   "file instead of a split: {context, choices: [...], answer: index} records")
    c.add_argument("--context-field", default="context", metavar="NAME", help="record field of the context")
    c.add_argument("--context-template", metavar="TEXT",
                   help="write the context from record fields instead, e.g. 'Question: {question}\\nAnswer:' (in "
                        "bash $'...' for a newline)")
    c.add_argument("--choices-field", default="choices", metavar="NAME",
                   help="record field of the choices: a list of strings, or ARC's {text: [...], label: [...]}")
    c.add_argument("--answer-field", default="answer", metavar="NAME",
                   help="record field of the right choice: its index, its label or its text")
    c.add_argument("--choice-delimiter", default=" ", metavar="TEXT",
                   help="written between a context and a choice (default: a space, as lm-evaluation-harness)")
    c.add_argument("--num-fewshot", type=int, default=0, metavar="K",
                   help="solved examples before each context: context + delimiter + right choice (default: 0)")
    c.add_argument("--fewshot-file", metavar="FILE",
                   help="draw the shots from this file (e.g. a train split; default: the --choices file, each example "
                        "leaving itself out)")
    c.add_argument("--fewshot-seed", type=int, default=1234, metavar="N",
                   help="seed of the shots drawn for each example (default: 1234)")
    c.add_argument("--fewshot-delimiter", default="\n\n", metavar="TEXT",
                   help="written after each shot (default: a blank line; in bash $'\\n' is a newline)")
    p.set_defaults(run=_run_eval)


def _run_eval(args: argparse.Namespace) -> int:
    import json

    from lmforge.eval import evaluate_checkpoint

    if args.max_tokens is not None and args.max_tokens < 2:
        raise ConfigError(f"--max-tokens {args.max_tokens} is invalid: use at least 2")
    if args.batch_size < 1:
        raise ConfigError(f"--batch-size {args.batch_size} is invalid: use 1 or more")
    if args.max_examples is not None and args.max_examples < 1:
        raise ConfigError(f"--max-examples {args.max_examples} is invalid: use 1 or more")
    if args.stride is not None and args.stride < 1:
        raise ConfigError(f"--stride {args.stride} is invalid: use 1 to the model's block_size")
    if args.text and (args.data is not None or args.split is not None):
        raise ConfigError(f"--text evaluates text files instead of a split: drop "
                          f"{'--data' if args.data is not None else '--split'}")
    from lmforge.config import build_section
    from lmforge.generate.config import GenerateConfig

    values = config_values(args, GenerateConfig, "generate")
    if args.choices is not None:
        return _run_eval_choices(args, values)
    _check_assistant_flags(args, values)
    generate = None
    if values:  # task evaluation decodes greedily unless told otherwise
        generate = build_section(GenerateConfig, {"temperature": 0.0, **values}, "generate")
    result = evaluate_checkpoint(args.checkpoint, data_dir=args.data, split=args.split or "val",
                                 max_tokens=args.max_tokens, batch_size=args.batch_size, device=args.device,
                                 task_options={"max_examples": args.max_examples, "out": args.out,
                                               "generate": generate,
                                               **({"assistant": args.assistant_model} if args.assistant_model else {})},
                                 progress=not args.no_progress, stride=args.stride, texts=args.text)
    print(json.dumps(result, indent=2))
    return 0


def _run_eval_choices(args: argparse.Namespace, decoding: dict) -> int:
    import json

    from lmforge.eval.choices import ChoiceTask, evaluate_choices_checkpoint

    given = [flag for flag, value in (("--data", args.data), ("--split", args.split), ("--max-tokens", args.max_tokens),
                                      ("--stride", args.stride), ("--text", args.text),
                                      ("--assistant-model", args.assistant_model)) if value is not None]
    given += ["--" + name.replace("_", "-") for name in decoding]
    if given:
        raise ConfigError(f"{', '.join(given)} cannot go with --choices: multiple choice scores the choices of its "
                          f"file and generates nothing; drop {'them' if len(given) > 1 else 'it'}")
    if args.num_fewshot < 0:
        raise ConfigError(f"--num-fewshot {args.num_fewshot} is invalid: use 0 or more")
    if args.context_template is not None:
        from lmforge.data.tasks import template_fields

        if not template_fields(args.context_template):
            raise ConfigError(f"--context-template {args.context_template!r} names no field: write record fields "
                              f"as {{name}}, e.g. 'Question: {{question}} Answer:'")
    task = ChoiceTask(args.choices, args.context_field, args.choices_field, args.answer_field, args.choice_delimiter,
                      args.num_fewshot, args.fewshot_seed, args.fewshot_file, args.fewshot_delimiter,
                      args.context_template)
    result = evaluate_choices_checkpoint(args.checkpoint, task, max_examples=args.max_examples,
                                         batch_size=args.batch_size, device=args.device, out=args.out,
                                         progress=not args.no_progress)
    print(json.dumps(result, indent=2))
    return 0


# -------------------------------------------------------------------------------------------- generate
def _add_generate(sub: Any) -> None:
    p = sub.add_parser(
        "generate", help="text from a run or checkpoint directory", formatter_class=_help_formatter,
        description=textwrap.dedent("""\
            Generate text with a trained model; the run or checkpoint directory alone is enough.
            Sampling by default (temperature 1.0); --greedy or --temperature 0 for the most likely token at
            each step; --num-beams N for beam search. Generation stops at the end token, a --stop-token-ids,
            a --stop-strings text (not printed), or after --max-new-tokens. The options below are the fields
            of lmforge.generate.GenerateConfig, checked as the Python API and the server check them."""),
        epilog=textwrap.dedent("""\
            examples:
              lmforge generate runs/shakespeare-char --prompt "ROMEO:" --max-new-tokens 300
              lmforge generate runs/shakespeare-char --prompt "To be" --top-k 20 --temperature 0.8 --seed 1
              lmforge generate runs/shakespeare-char --temperature 0 --max-new-tokens 50
              lmforge generate runs/shakespeare-char --prompt "ROMEO:" --min-p 0.05 --repetition-penalty 1.2 --stop "JULIET:"
              lmforge generate runs/shakespeare-char --prompt "To be" --num-beams 4 --num-return-sequences 2
              lmforge generate runs/shakespeare-char --prompt "ROMEO:" --quantize int8   # faster on a CPU
              lmforge generate runs/summarizer --prompt "$(cat article.txt)" --greedy --prompt-lookup-num-tokens 10
              lmforge generate runs/big --prompt "ROMEO:" --greedy --assistant-model runs/small   # speculative
              lmforge generate runs/qa --prompt "Who wrote Hamlet?" --num-return-sequences 8 --reward-model runs/rm"""))
    p.add_argument("checkpoint", metavar="RUN_OR_CHECKPOINT_DIR")
    p.add_argument("--prompt", default="", help="text to continue (default: empty, start of a document)")
    _add_decoding_arguments(p)
    p.add_argument("--no-stream", action="store_true",
                   help="print the text when it is complete (several samples are never streamed)")
    p.add_argument("--no-template", action="store_true",
                   help="a fine-tuned model: continue the prompt as given, not through its prompt template")
    p.add_argument("--reward-model", metavar="RUN_OR_CHECKPOINT_DIR",
                   help="best-of-n: score each sample (--num-return-sequences N) with this reward model (`lmforge "
                        "train --train.objective reward`) and print them best first, each with its reward")
    p.set_defaults(run=_run_generate)


def _add_weight_arguments(p: argparse.ArgumentParser) -> None:
    """How the weights decode (generate, chat, serve): their dtype, int8, the decoding step compiled."""
    from lmforge.generate.config import Dtype, Quantize

    p.add_argument("--dtype", choices=typing.get_args(Dtype), default="fp32",
                   help="weights for decoding (default: fp32, exact)")
    p.add_argument("--quantize", choices=typing.get_args(Quantize), help="int8 weights for the Linear layers (CPU): "
                   "faster, slightly different numbers; nf4: the blocks' layers in 4 bits as QLoRA stores them (a "
                   "seventh of the memory, slower; serve's --lora-modules then takes QLoRA runs of this base)")
    p.add_argument("--compile", action="store_true", help="compile the decoding step ahead of time first "
                   "(AOTInductor, about 10 s on a CPU; pays off over a few hundred tokens)")


def _add_decoding_arguments(p: argparse.ArgumentParser) -> None:
    """The options of decoding a model (generate, chat): GenerateConfig's fields, the weights' dtype, int8, compile,
    the device and an assistant (draft) model."""
    from lmforge.generate.config import GenerateConfig

    add_config_arguments(p, GenerateConfig, "generate", metavars=DECODING_METAVARS,
                         aliases={"stop_strings": ["--stop"], "stop_token_ids": ["--stop-token-id"]})
    _add_weight_arguments(p)
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | mps")
    p.add_argument("--assistant-model", metavar="RUN_OR_CHECKPOINT_DIR",
                   help="speculative decoding: a smaller model trained with the same tokenizer guesses "
                        "--num-assistant-tokens tokens per step and the model checks them in one pass (same greedy "
                        "text, same sampling distribution; faster when most guesses hold)")


def _run_generate(args: argparse.Namespace) -> int:
    from lmforge.config import build_section
    from lmforge.generate.config import GenerateConfig

    values = config_values(args, GenerateConfig, "generate")
    _check_assistant_flags(args, values)
    config = build_section(GenerateConfig, values, "generate")  # checked
    if config.max_length is not None and config.max_new_tokens is not None:  # the library lets max_length win
        raise ConfigError("--max-length and --max-new-tokens both bound the length: give one (--max-length counts "
                          "the prompt, --max-new-tokens does not)")
    try:
        args.prompt.encode("utf-8")
    except UnicodeEncodeError:  # bytes the shell passed that are not UTF-8 arrive as lone surrogates
        raise ConfigError(f"--prompt {args.prompt!r} is not UTF-8 text: give the prompt as UTF-8") from None
    from lmforge.generate import load  # before loading anything

    generator = load(args.checkpoint, device=args.device, dtype=args.dtype, quantize=args.quantize, compile=args.compile,
                     template=not args.no_template, assistant=args.assistant_model)
    if hasattr(generator, "fill_mask"):  # load gave a MaskFiller
        raise ConfigError(f"{args.checkpoint} is an encoder (model.causal: false): every position sees the whole text, "
                          "so it fills masks and does not generate text; use `lmforge fill-mask`")
    if not hasattr(generator, "generate"):  # load gave a TextClassifier or a RewardModel
        raise ConfigError(f"{args.checkpoint} is a {'reward model' if hasattr(generator, 'score') else 'classifier'} "
                          f"(model.head: classify): it scores and does not generate text; use `lmforge "
                          f"{'reward' if hasattr(generator, 'score') else 'classify'}`")
    judge = _load_reward_model(args.reward_model, args.device) if args.reward_model else None
    if judge is not None or args.no_stream or config.num_return_sequences > 1 or config.num_beams > 1:  # one batch
        samples = generator.generate(args.prompt, config)
        samples = [samples] if isinstance(samples, str) else samples
        rewards = judge.score([args.prompt] * len(samples), samples) if judge is not None else None
        order = sorted(range(len(samples)), key=lambda i: -rewards[i]) if rewards is not None else range(len(samples))
        for rank, i in enumerate(order):
            if rewards is not None:
                print(f"--- sample {i + 1}: reward {rewards[i]:.4f}{' (best)' if rank == 0 else ''} ---")
            elif len(samples) > 1:
                print(f"--- sample {i + 1} ---")
            print(args.prompt + samples[i])
    else:
        sys.stdout.write(args.prompt)
        for piece in generator.stream(args.prompt, config):
            sys.stdout.write(piece)
            sys.stdout.flush()
        sys.stdout.write("\n")
    return 0


# ------------------------------------------------------------------------------------------------ chat
def _add_chat(sub: Any) -> None:
    p = sub.add_parser(
        "chat", help="talk with a model in the terminal, turn by turn", formatter_class=_help_formatter,
        description=textwrap.dedent("""\
            A conversation with a run or checkpoint directory: each line you type is a user turn; the model's reply
            is streamed, written through the chat template it was fine-tuned with (`prepare --task sft` on
            messages data; lmforge's default <|role|> turns for any other model), and kept in the conversation.
            A reply ends at the end token, a --stop text, --max-new-tokens, or where the model starts the next
            user turn. When the conversation outgrows the context, the oldest turns (after --system) are left out.
            Commands: /reset starts a new conversation, /exit (or Ctrl-D) ends; Ctrl-C cuts a reply short.
            Sampling options are those of `lmforge generate`; speculative decoding works here too."""),
        epilog=textwrap.dedent("""\
            examples:
              lmforge chat runs/assistant --temperature 0.7 --top-p 0.9
              lmforge chat runs/assistant --system "Answer in one sentence." --greedy --max-new-tokens 80
              echo "What is a sonnet?" | lmforge chat runs/assistant --greedy      # one turn from a pipe"""))
    p.add_argument("checkpoint", metavar="RUN_OR_CHECKPOINT_DIR")
    p.add_argument("--system", metavar="TEXT", help="a system prompt, first in every conversation")
    _add_decoding_arguments(p)
    p.set_defaults(run=_run_chat)


def _run_chat(args: argparse.Namespace) -> int:
    from lmforge.config import build_section
    from lmforge.generate.config import GenerateConfig

    values = config_values(args, GenerateConfig, "generate")
    _check_assistant_flags(args, values)
    config = build_section(GenerateConfig, values, "generate")  # checked
    from lmforge.generate import load
    from lmforge.generate.chat import ChatSession

    generator = load(args.checkpoint, device=args.device, dtype=args.dtype, quantize=args.quantize,
                     compile=args.compile, assistant=args.assistant_model)
    if not hasattr(generator, "render_chat"):  # a classifier or an encoder
        raise ConfigError(f"{args.checkpoint} does not generate text (a classifier or an encoder): nothing to chat "
                          "with; use `lmforge classify` or `lmforge fill-mask`")
    session = ChatSession(generator, config, args.system)
    interactive = sys.stdin.isatty()
    if interactive:
        print(f"lmforge chat with {args.checkpoint}: /reset starts over, /exit or Ctrl-D ends, Ctrl-C cuts a reply",
              file=sys.stderr)
    while True:
        try:
            line = input("you> " if interactive else "")
        except EOFError:
            return 0
        text = line.strip()
        if text in ("/exit", "/quit"):
            return 0
        if text == "/reset":
            session.reset()
            print("(a new conversation)", file=sys.stderr)
            continue
        if not text:
            continue
        if interactive:
            sys.stdout.write("model> ")
        try:
            for piece in session.say(text):
                sys.stdout.write(piece)
                sys.stdout.flush()
        except KeyboardInterrupt:  # the reply is cut here; what was said stays in the conversation
            sys.stdout.write(" [cut]")
        sys.stdout.write("\n")
        sys.stdout.flush()


# -------------------------------------------------------------------------------------------- classify
def _add_classify(sub: Any) -> None:
    p = sub.add_parser(
        "classify", help="labels with probabilities from a classifier run or checkpoint",
        formatter_class=_help_formatter,
        description=textwrap.dedent("""\
            Classify texts with a model trained on `lmforge prepare --task classify` data. Prints one JSON
            line per text: {"text", "label" (the most probable), "predictions": [{"label", "probability"},
            ...]} from the most probable down (every label, or --top-k). Texts come from --text (repeatable)
            and --file (.txt: one text per non-empty line; .jsonl: the --text-field of each object)."""),
        epilog=textwrap.dedent("""\
            examples:
              lmforge classify runs/sentiment --text "a great film" --text "dull and slow"
              lmforge classify runs/sentiment --file reviews.jsonl --top-k 1"""))
    p.add_argument("checkpoint", metavar="RUN_OR_CHECKPOINT_DIR")
    p.add_argument("--text", action="append", default=[], help="a text to classify (repeatable)")
    p.add_argument("--file", metavar="F", help=".txt (one text per line) or .jsonl (objects with --text-field)")
    p.add_argument("--text-field", default="text", metavar="NAME", help="text field of --file .jsonl objects")
    p.add_argument("--top-k", type=int, metavar="K", help="print the K most probable labels (default: all)")
    p.add_argument("--batch-size", type=int, default=32, metavar="N", help="texts per batch (default: 32)")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | mps")
    p.set_defaults(run=_run_classify)


def _classify_texts(path: str, field: str, flag: str = "--text-field", file_flag: str = "--file") -> list[str]:
    """The texts of a --file (`file_flag`): .txt lines (empty ones skipped) or the `field` (named by `flag`) of each
    .jsonl object."""
    import json

    from lmforge.data.corpus import JSON_ERRORS, json_problem
    from pathlib import Path

    file = Path(path)
    try:
        lines = file.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"{file_flag} {path} cannot be read ({type(e).__name__}): give a UTF-8 .txt or .jsonl "
                          "file") from None
    if file.suffix.lower() != ".jsonl":
        return [line for line in lines if line.strip()]
    texts = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except JSON_ERRORS as e:
            raise ConfigError(f"{path}:{number}: not valid JSON ({json_problem(e)}): fix the line") from None
        if not isinstance(record, dict) or not isinstance(record.get(field), str):
            raise ConfigError(f"{path}:{number}: no string field {field!r}: fix the line or choose {flag}")
        texts.append(record[field])
    return texts


def _run_classify(args: argparse.Namespace) -> int:
    import json

    texts = list(args.text) + (_classify_texts(args.file, args.text_field) if args.file else [])
    if not texts:
        raise ConfigError("no text to classify: give --text TEXT (repeatable) or --file F")
    if args.top_k is not None and args.top_k < 1:
        raise ConfigError(f"--top-k {args.top_k} is invalid: use 1 or more")
    if args.batch_size < 1:
        raise ConfigError(f"--batch-size {args.batch_size} is invalid: use 1 or more")
    from lmforge.generate import TextClassifier, load

    classifier = load(args.checkpoint, device=args.device)
    if hasattr(classifier, "score"):  # a RewardModel
        raise ConfigError(f"{args.checkpoint} is a reward model: it scores a prompt's completions and has no labels; "
                          "use `lmforge reward`")
    if not isinstance(classifier, TextClassifier):
        raise ConfigError(f"{args.checkpoint} is a language model (model.head: lm): it generates text; use "
                          "`lmforge generate`, or fine-tune a classifier on `lmforge prepare --task classify` data")
    for text, ranked in zip(texts, classifier.classify(texts, args.top_k, args.batch_size)):
        print(json.dumps({"text": text, "label": ranked[0][0],
                          "predictions": [{"label": label, "probability": p} for label, p in ranked]},
                         ensure_ascii=False))
    return 0


# ---------------------------------------------------------------------------------------------- reward
def _add_reward(sub: Any) -> None:
    p = sub.add_parser(
        "reward", help="a reward model's score of prompt/completion pairs", formatter_class=_help_formatter,
        description=textwrap.dedent("""\
            Score completions with a reward model (`lmforge train --train.objective reward` on `lmforge prepare
            --task preference` data): the higher the reward, the more the completion is preferred. The prompt
            goes through the template the model was trained with. Prints one JSON line per completion,
            {"prompt", "completion", "reward"}, in the order given (--rank: best first). Pairs come from --prompt
            with --completion (repeatable) and from --file (.jsonl objects with prompt and completion fields)."""),
        epilog=textwrap.dedent("""\
            examples:
              lmforge reward runs/rm --prompt "Who wrote Hamlet?" --completion "Shakespeare." --completion "Dickens."
              lmforge reward runs/rm --file answers.jsonl --rank
              lmforge generate runs/qa --prompt "Who wrote Hamlet?" --num-return-sequences 8 --reward-model runs/rm"""))
    p.add_argument("checkpoint", metavar="RUN_OR_CHECKPOINT_DIR")
    p.add_argument("--prompt", help="the prompt of every --completion")
    p.add_argument("--completion", action="append", default=[], help="a completion of --prompt to score (repeatable)")
    p.add_argument("--file", metavar="F", help=".jsonl: objects with --prompt-field and --completion-field")
    p.add_argument("--prompt-field", default="prompt", metavar="NAME", help="prompt field of --file objects")
    p.add_argument("--completion-field", default="completion", metavar="NAME",
                   help="completion field of --file objects")
    p.add_argument("--rank", action="store_true", help="print the completions best first")
    p.add_argument("--batch-size", type=int, default=32, metavar="N", help="pairs per batch (default: 32)")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | mps")
    p.set_defaults(run=_run_reward)


def _load_reward_model(path: str, device: str) -> Any:
    """The RewardModel of a run or checkpoint directory; a one-line error for any other model."""
    from lmforge.generate import RewardModel, load

    judge = load(path, device=device)
    if not isinstance(judge, RewardModel):
        raise ConfigError(f"{path} is not a reward model: train one with `lmforge train --train.objective reward` on "
                          "`lmforge prepare --task preference` data")
    return judge


def _run_reward(args: argparse.Namespace) -> int:
    import json

    if args.completion and args.prompt is None:
        raise ConfigError("--completion needs the --prompt it answers: give --prompt TEXT")
    pairs = [(args.prompt, c) for c in args.completion]
    if args.file:
        if not args.file.lower().endswith(".jsonl"):
            raise ConfigError(f"--file {args.file}: give a .jsonl file of objects with {args.prompt_field!r} and "
                              f"{args.completion_field!r} fields")
        pairs += list(zip(_classify_texts(args.file, args.prompt_field, "--prompt-field"),
                          _classify_texts(args.file, args.completion_field, "--completion-field")))
    if not pairs:
        raise ConfigError("nothing to score: give --prompt TEXT with --completion TEXT (repeatable), or --file F")
    if args.batch_size < 1:
        raise ConfigError(f"--batch-size {args.batch_size} is invalid: use 1 or more")
    judge = _load_reward_model(args.checkpoint, args.device)
    rewards = judge.score([p for p, _ in pairs], [c for _, c in pairs], args.batch_size)
    order = sorted(range(len(pairs)), key=lambda i: -rewards[i]) if args.rank else range(len(pairs))
    for i in order:
        print(json.dumps({"prompt": pairs[i][0], "completion": pairs[i][1], "reward": rewards[i]}, ensure_ascii=False))
    return 0


# ------------------------------------------------------------------------------------------- best-of-n
def _add_best_of_n(sub: Any) -> None:
    p = sub.add_parser(
        "best-of-n", help="samples of each prompt ranked by a reward model: preference pairs and sft examples",
        formatter_class=_help_formatter,
        description=textwrap.dedent("""\
            Sample --num-return-sequences N completions of every prompt of --prompts with a language model, score
            them with --reward-model, and write one JSON line per prompt to --out: {"prompt", "chosen" (the best
            sample), "rejected" (the worst), "completion" (the best again), "chosen_reward", "rejected_reward",
            "samples": [{"text", "reward"}, ...] best first}. The file is ready for `lmforge prepare --task
            preference` (on-policy pairs: the data of iterative DPO) and `--task sft` (the best samples:
            rejection-sampling fine-tuning). chosen and rejected are the best and worst non-empty samples (an empty
            completion is no training example); a prompt without two different ones is left out (counted). Each
            model renders the prompt through its own template."""),
        epilog=textwrap.dedent("""\
            examples:
              lmforge best-of-n runs/qa --reward-model runs/rm --prompts questions.jsonl --num-return-sequences 8 \\
                  --temperature 0.8 --out ranked.jsonl
              lmforge prepare ranked.jsonl --task preference --tokenizer runs/qa --out data/round2"""))
    p.add_argument("checkpoint", metavar="RUN_OR_CHECKPOINT_DIR", help="the language model that samples")
    p.add_argument("--reward-model", required=True, metavar="RUN_OR_CHECKPOINT_DIR",
                   help="the reward model that ranks the samples (`lmforge train --train.objective reward`)")
    p.add_argument("--prompts", required=True, metavar="F",
                   help=".txt (one prompt per non-empty line) or .jsonl (objects with --prompt-field)")
    p.add_argument("--prompt-field", default="prompt", metavar="NAME", help="prompt field of --prompts objects")
    p.add_argument("--out", required=True, metavar="FILE.jsonl", help="where the ranked samples go")
    p.add_argument("--force", action="store_true", help="replace an --out file `lmforge best-of-n` wrote before")
    p.add_argument("--batch-size", type=int, default=8, metavar="N", help="prompts sampled together (default: 8)")
    p.add_argument("--no-template", action="store_true",
                   help="give the prompts to the language model as they are, not through its prompt template")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    _add_decoding_arguments(p)
    p.set_defaults(run=_run_best_of_n)


RANKED_KEYS = {"prompt", "chosen", "rejected", "completion", "chosen_reward", "rejected_reward", "samples"}


def _is_ranked(path: Any) -> bool:
    """Whether `path` is a file `lmforge best-of-n` wrote: its first line a record with exactly its keys, or empty
    (every prompt left out; replacing an empty file loses nothing)."""
    import json

    try:
        with open(path, encoding="utf-8") as f:
            line = f.readline()
            first = json.loads(line) if line else {key: None for key in RANKED_KEYS}
    except (OSError, UnicodeDecodeError, ValueError, RecursionError):
        return False
    return isinstance(first, dict) and set(first) == RANKED_KEYS


def _run_best_of_n(args: argparse.Namespace) -> int:
    import json
    from pathlib import Path

    from lmforge.config import build_section
    from lmforge.files import atomic_file, check_output
    from lmforge.generate.config import GenerateConfig

    values = config_values(args, GenerateConfig, "generate")
    _check_assistant_flags(args, values)
    config = build_section(GenerateConfig, values, "generate")
    if config.num_return_sequences < 2:
        raise ConfigError("best-of-n ranks several samples of each prompt: give --num-return-sequences N (2 or more)")
    if args.batch_size < 1:
        raise ConfigError(f"--batch-size {args.batch_size} is invalid: use 1 or more")
    out = Path(args.out)
    if out.suffix != ".jsonl":
        raise ConfigError(f"--out {out}: best-of-n writes JSON lines; give a name ending in .jsonl")
    check_output(out, force=args.force, ours=_is_ranked, what="a file `lmforge best-of-n` wrote", directory=False,
                 inputs=[args.prompts])
    prompts = _classify_texts(args.prompts, args.prompt_field, "--prompt-field", "--prompts")
    if not prompts:
        raise ConfigError(f"--prompts {args.prompts} holds no prompt: give one per line (.txt) or JSON objects with "
                          f"{args.prompt_field!r} (.jsonl)")
    from lmforge.eval.progress import progress_bar
    from lmforge.generate import load
    from lmforge.generate.reward import rank_samples

    judge = _load_reward_model(args.reward_model, args.device)
    generator = load(args.checkpoint, device=args.device, dtype=args.dtype, quantize=args.quantize,
                     compile=args.compile, template=not args.no_template, assistant=args.assistant_model)
    if not hasattr(generator, "generate") or hasattr(generator, "fill_mask"):
        raise ConfigError(f"{args.checkpoint} does not generate text: give the language model that samples")
    written = same = 0
    with atomic_file(out) as f, progress_bar(len(prompts), "best-of-n", "prompt", not args.no_progress) as bar:
        for prompt, ranked in zip(prompts, rank_samples(generator, judge, prompts, config, args.batch_size)):
            bar.update(1)
            usable = [(text, reward) for text, reward in ranked if text.strip()]  # prepare refuses empty ones
            if len({text for text, _ in usable}) < 2:  # every sample the same text, or empty: no pair
                same += 1
                continue
            (best, high), (worst, low) = usable[0], usable[-1]
            f.write(json.dumps({"prompt": prompt, "chosen": best, "rejected": worst, "completion": best,
                                "chosen_reward": high, "rejected_reward": low,
                                "samples": [{"text": t, "reward": r} for t, r in ranked]}, ensure_ascii=False) + "\n")
            written += 1
    left = f"; {same} prompt(s) left out: fewer than two different non-empty samples" if same else ""
    print(f"{written} prompt(s) ranked -> {out}{left}", file=sys.stderr)
    return 0


# ------------------------------------------------------------------------------------------- fill-mask
def _add_fill_mask(sub: Any) -> None:
    p = sub.add_parser(
        "fill-mask", help="an encoder's most probable tokens for each <MASK> in a text",
        formatter_class=_help_formatter,
        description=textwrap.dedent("""\
            Fill the masks of a text with an encoder (model.causal false) trained with train.objective mlm on
            data prepared with --mask-token. Write the mask token (<MASK>) where a token is missing: the encoder
            reads the whole text at once, left and right of each mask, and prints the top-k tokens for each mask
            with their probabilities, one JSON line per mask."""),
        epilog=textwrap.dedent("""\
            examples:
              lmforge prepare --dataset shakespeare --mask-token --out data/shakespeare-mlm
              lmforge train --data data/shakespeare-mlm --model.causal false --train.objective mlm --run-dir runs/enc
              lmforge fill-mask runs/enc --text "to be or not to <MASK>e, that is the question"
            """))
    p.add_argument("checkpoint", metavar="RUN_OR_CHECKPOINT_DIR")
    p.add_argument("--text", required=True, help="the text, with <MASK> (the tokenizer's mask token) where a token is missing")
    p.add_argument("--top-k", type=int, default=5, metavar="K", help="tokens per mask (default: 5)")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | mps")
    p.set_defaults(run=_run_fill_mask)


def _run_fill_mask(args: argparse.Namespace) -> int:
    import json

    if args.top_k < 1:
        raise ConfigError(f"--top-k {args.top_k} is invalid: use 1 or more")
    from lmforge.generate import MaskFiller, load

    filler = load(args.checkpoint, device=args.device)
    if not isinstance(filler, MaskFiller):
        raise ConfigError(f"{args.checkpoint} is not an encoder (model.causal: true, or a classifier): fill-mask needs "
                          "one trained with --model.causal false --train.objective mlm; a decoder generates instead")
    for i, ranked in enumerate(filler.fill_mask(args.text, args.top_k)):
        print(json.dumps({"mask": i, "token": ranked[0][0],
                          "predictions": [{"token": t, "probability": p} for t, p in ranked]}, ensure_ascii=False))
    return 0


# ------------------------------------------------------------------------------------------------ embed
def _add_detect(sub: Any) -> None:
    p = sub.add_parser(
        "detect", help="is a text watermarked? (the watermark `generate --watermark` adds, with its settings)",
        formatter_class=_help_formatter,
        description=textwrap.dedent("""\
            Count a text's green tokens under the watermark `lmforge generate --watermark` adds (Kirchenbauer et
            al. 2023, Hugging Face's WatermarkDetector): the text is encoded with the checkpoint's tokenizer, each
            token after the first is green or not under the greenlist its predecessors seed, and z = (green -
            ratio * T) / sqrt(T * ratio * (1 - ratio)) over the T tokens scored. Unmarked text has z near 0;
            the text is called watermarked above --z-threshold. Give the generated text only (a prompt someone
            else wrote dilutes the count), and the watermark settings it was generated with. Prints one JSON line
            per text: num_tokens_scored, num_green_tokens, green_fraction, z_score, p_value, prediction."""),
        epilog=textwrap.dedent("""\
            examples:
              lmforge generate runs/shakespeare --prompt "ROMEO:" --watermark --max-new-tokens 200 > out.txt
              lmforge detect runs/shakespeare --file out.txt --whole-file
              lmforge detect runs/shakespeare --text "..." --watermark-key 42 --watermark-scheme selfhash
            """))
    p.add_argument("checkpoint", metavar="RUN_OR_CHECKPOINT_DIR")
    p.add_argument("--text", action="append", default=[], help="a text to test (repeatable)")
    p.add_argument("--file", help="a UTF-8 .txt file (one text per non-empty line) or .jsonl (its \"text\" fields)")
    p.add_argument("--whole-file", action="store_true", help="--file is one text (a .txt file, lines and all)")
    p.add_argument("--watermark-greenlist-ratio", metavar="X", help="the share of green tokens it was made with "
                   "(default: 0.25)")
    p.add_argument("--watermark-key", metavar="N", help="its hashing key (default: 15485863)")
    p.add_argument("--watermark-scheme", choices=["lefthash", "selfhash"],
                   help="its seeding scheme (default: lefthash)")
    p.add_argument("--watermark-context-width", metavar="N", help="its context width (default: 1)")
    p.add_argument("--ignore-repeated-ngrams", action="store_true",
                   help="count each distinct n-gram (a token and those that seed it) once: repeated text weighs less")
    p.add_argument("--z-threshold", type=float, default=3.0, metavar="Z",
                   help="call a text watermarked above this z (default: 3.0, a false alarm once in 740 unmarked texts)")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | mps")
    p.set_defaults(run=_run_detect)


def _run_detect(args: argparse.Namespace) -> int:
    import json
    import math
    from pathlib import Path

    from lmforge.config import build_section
    from lmforge.generate.config import GenerateConfig
    from lmforge.generate.watermark import detect

    settings = {k: v for k, v in (("watermark_greenlist_ratio", args.watermark_greenlist_ratio),
                                  ("watermark_key", args.watermark_key), ("watermark_scheme", args.watermark_scheme),
                                  ("watermark_context_width", args.watermark_context_width)) if v is not None}
    mark = build_section(GenerateConfig, {"watermark": True, **settings}, "generate").watermark_settings
    if not math.isfinite(args.z_threshold):
        raise ConfigError(f"--z-threshold {args.z_threshold} is invalid: a finite number such as 3.0")
    texts = list(args.text)
    if args.file and args.whole_file:
        try:
            texts.append(Path(args.file).read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError) as e:
            raise ConfigError(f"--file {args.file} cannot be read as UTF-8 text ({type(e).__name__}): give a .txt "
                              "file") from None
    elif args.file:
        texts += _classify_texts(args.file, "text")
    if not texts:
        raise ConfigError("nothing to test: give --text TEXT (repeatable) or --file FILE")
    from lmforge.generate import load

    loaded = load(args.checkpoint, device=args.device)
    for i, text in enumerate(texts):
        ids = loaded.tokenizer.encode(text)
        try:
            result = detect(ids, loaded.model.config.vocab_size, mark, args.ignore_repeated_ngrams, args.z_threshold)
        except ValueError as e:
            raise ConfigError(f"text {i}: {e}") from None
        print(json.dumps({"index": i, **result}))
    return 0


def _add_embed(sub: Any) -> None:
    p = sub.add_parser(
        "embed", help="a vector per text: the model's hidden states pooled (what POST /v1/embeddings serves)",
        formatter_class=_help_formatter,
        description=textwrap.dedent("""\
            Embed texts with any model: each text is read as [start] text [end], the last block's hidden
            states (after the final norm) are pooled over its tokens, and the vector is scaled to length 1. Prints
            one JSON line per text, {"index", "text", "embedding"}; with --out, writes the vectors as a float32
            .npy array (texts x n_embd) instead."""),
        epilog=textwrap.dedent("""\
            examples:
              lmforge embed runs/shakespeare-char --text "to be or not to be" --text "a rose by any other name"
              lmforge embed runs/enc --file sentences.txt --pooling mean --out vectors.npy
            """))
    p.add_argument("checkpoint", metavar="RUN_OR_CHECKPOINT_DIR")
    p.add_argument("--text", action="append", default=[], help="a text to embed (repeatable)")
    p.add_argument("--file", help="a UTF-8 .txt file (one text per non-empty line) or .jsonl (its \"text\" fields)")
    p.add_argument("--pooling", choices=["mean", "last", "first"],
                   help="mean over the tokens, the last (end) token, or the first (start) token (default: last for a "
                        "decoder, mean for an encoder)")
    p.add_argument("--no-normalize", action="store_true", help="keep the pooled vectors as they are (not length 1)")
    p.add_argument("--out", metavar="FILE.npy", help="write the vectors here (a .npy file) instead of JSON lines")
    p.add_argument("--force", action="store_true", help="replace an --out file lmforge wrote before")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | mps")
    p.set_defaults(run=_run_embed)


def _run_embed(args: argparse.Namespace) -> int:
    import json
    from pathlib import Path

    texts = list(args.text)
    if args.file:
        texts += _classify_texts(args.file, "text")
    if not texts:
        raise ConfigError("nothing to embed: give --text TEXT (repeatable) or --file FILE (one text per line)")
    out = Path(args.out) if args.out else None
    if out is not None:
        from lmforge.files import check_output

        if out.suffix != ".npy":
            raise ConfigError(f"--out {out}: embed writes a .npy array; give a name ending in .npy")
        check_output(out, force=args.force, ours=_is_npy, what="a .npy array", directory=False)
    from lmforge.generate import TextEmbedder, load

    loaded = load(args.checkpoint, device=args.device)
    vectors = TextEmbedder(loaded.model, loaded.tokenizer, args.pooling, not args.no_normalize).embed(texts)
    if out is None:
        for i, (text, vector) in enumerate(zip(texts, vectors.tolist())):
            print(json.dumps({"index": i, "text": text, "embedding": vector}, ensure_ascii=False))
        return 0
    import numpy as np

    from lmforge.files import atomic_file

    with atomic_file(out, "wb") as f:
        np.save(f, vectors.numpy().astype(np.float32), allow_pickle=False)
    print(f"{len(texts)} vectors of {vectors.shape[1]} -> {out}", file=sys.stderr)
    return 0


def _is_npy(path: Any) -> bool:
    with open(path, "rb") as f:
        return f.read(6) == b"\x93NUMPY"


# ------------------------------------------------------------------------------------------- attention
def _add_attention(sub: Any) -> None:
    p = sub.add_parser(
        "attention", help="heatmaps of a model's attention weights on a text, per layer and head",
        formatter_class=_help_formatter,
        description=textwrap.dedent("""\
            Draw softmax(Q K^T / sqrt(d_k)) of every layer and head (a grid), or of one (--layer, --head),
            for TEXT as the model reads it, the tokens as axis labels: row t is where token t looks. The
            weights come from the model's own Q and K (RoPE applied, key heads shared as it shares them)
            through the reference formula, whichever attention path the model runs. A decoder attends only
            to earlier tokens (its upper triangle is empty); an encoder to the whole text. Layers and heads
            are numbered from 0. Texts over 64 tokens are drawn clipped to their first 64, with a note.
            Python: lmforge.attention_maps(path_or_model, text) -> (weights (layers, heads, T, T), labels)."""),
        epilog=textwrap.dedent("""\
            examples:
              lmforge attention runs/shakespeare-char --text "ROMEO: wherefore art thou" --out attn.png
              lmforge attention runs/gpt2 --text "The cat sat on the mat" --layer 5 --head 1 --out l5h1.png"""))
    p.add_argument("checkpoint", metavar="RUN_OR_CHECKPOINT_DIR")
    p.add_argument("--text", required=True, help="the text whose attention to draw (at most the model's context)")
    p.add_argument("--layer", type=int, metavar="L", help="draw only layer L (default: every layer)")
    p.add_argument("--head", type=int, metavar="H", help="draw only head H (default: every head)")
    p.add_argument("--out", required=True, metavar="PNG", help="where to write the picture")
    p.add_argument("--device", default="cpu", help="auto | cpu | cuda | mps (default: cpu)")
    p.set_defaults(run=_run_attention)


def _run_attention(args: argparse.Namespace) -> int:
    from pathlib import Path

    from lmforge.explain import attention_maps, check_choice, draw_attention

    weights, labels = attention_maps(args.checkpoint, args.text, device=args.device)
    layers = check_choice("layer", args.layer, weights.size(0))
    heads = check_choice("head", args.head, weights.size(1))
    note = draw_attention(weights, labels, args.out, layers, heads, title=f"{Path(args.checkpoint).name}: "
                          f"{len(labels)} tokens")
    if note:
        print(f"note: {note} (shorten --text to see every token)", file=sys.stderr)
    print(args.out)
    return 0


# ------------------------------------------------------------------------------------------------ plan
def _add_plan(sub: Any) -> None:
    from lmforge.config import PRESETS

    p = sub.add_parser(
        "plan", help="the compute, memory and time a training config needs, before training it",
        formatter_class=_help_formatter,
        description=textwrap.dedent("""\
            Estimate a training run from its config (the settings of `lmforge train`: --config, --preset,
            --section.key VALUE): parameters (total, non-embedding), FLOPs per token (6N plus attention),
            total training FLOPs, memory for weights, gradients, AdamW state and activations (with and
            without activation checkpointing, per GPU under DDP or FSDP), the time at a stated MFU, and the
            compute-optimal token count (about 20 per parameter, Hoffmann et al. 2022). Warns when it will not
            fit in the device's memory (on cpu: this machine's RAM). On cpu the peak is a matrix product
            measured here. --measure runs a few real training steps here and prints measured against predicted.
            The vocabulary is model.vocab_size (train takes it from the prepared data)."""),
        epilog=textwrap.dedent(f"""\
            presets: {', '.join(PRESETS)}

            examples:
              lmforge plan --preset gpt2-124m --device h100 --precision bf16-mixed --tokens 2.5e9
              lmforge plan --config shakespeare-char --measure
              lmforge plan --preset llama-small --model.n_layer 32 --model.n_embd 4096 --device a100 --gpus 8 --parallel fsdp"""))
    p.add_argument("--config", metavar="FILE|NAME", help="YAML or JSON config file, or a built-in recipe")
    p.add_argument("--preset", metavar="NAME", help=f"model preset: {', '.join(PRESETS)}")
    p.add_argument("--tokens", type=float, metavar="N", help="training tokens (default: train.max_steps steps)")
    p.add_argument("--max-steps", metavar="N", help="= --train.max_steps N")
    p.add_argument("--precision", metavar="P", help="= --train.precision: fp32 | bf16-mixed | bf16-compute")
    p.add_argument("--device", default="cpu", metavar="DEV", help="cpu (this machine) | h100 | h200 | a100 (default: cpu)")
    p.add_argument("--peak-tflops", type=float, metavar="F", help="the device's dense peak TFLOP/s instead of the table's")
    p.add_argument("--mfu", type=float, metavar="X", help="model FLOPs utilisation to assume (default: 0.85 of the "
                   "measured peak on cpu, 0.4 on a GPU)")
    p.add_argument("--gpus", type=int, default=1, metavar="K", help="GPUs training together (default: 1)")
    p.add_argument("--parallel", default="ddp", metavar="HOW", help="ddp | fsdp, with --gpus above 1 (default: ddp)")
    p.add_argument("--measure", action="store_true", help="also run a few real training steps here (cpu) and print "
                   "measured peak memory and step time against the prediction")
    p.add_argument("--measure-steps", type=int, default=3, metavar="N", help="timed steps of --measure (default: 3)")
    p.add_argument("--task", metavar="KIND", help="the training data: tokens | sft | classify | preference (pairs of "
                   "completions: twice the sequences, and a reference model for DPO) | unpaired (completions "
                   "labelled desirable or not: a reference model and, for KTO, the mismatched rows' forward) "
                   "(default: what data.path's manifest.json says, else tokens)")
    p.add_argument("--json", action="store_true", help="print the plan as JSON")
    p.set_defaults(run=_run_plan, takes_overrides=True)


def _run_plan(args: argparse.Namespace) -> int:
    import json
    from pathlib import Path

    from lmforge.config import load_run_config
    from lmforge.errors import DataError

    overrides = parse_overrides(args.overrides)
    for flag, key in (("max_steps", "train.max_steps"), ("precision", "train.precision"), ("preset", "preset")):
        if getattr(args, flag) is not None:
            overrides[key] = getattr(args, flag)
    if args.measure and args.device != "cpu":
        raise ConfigError(f"--measure runs steps on this machine's CPU: drop --device {args.device} to measure")
    if args.tokens is not None and not 1 <= args.tokens < 1e18:
        raise ConfigError(f"--tokens {args.tokens:g} is invalid: give a positive number of training tokens, e.g. 2.5e9")
    config = load_run_config(args.config, overrides)
    from lmforge.plan import format_plan, gib, measure, plan

    task = args.task
    manifest = Path(config.data.path) / "manifest.json"
    if task is None and manifest.is_file():  # what `lmforge train` would train on
        try:
            task = json.loads(manifest.read_text(encoding="utf-8")).get("task") or "tokens"
        except (OSError, ValueError, AttributeError):
            raise DataError(f"{manifest} is not a readable manifest: prepare the data again with `lmforge "
                            f"prepare`, or give --task") from None
    estimate = plan(config, tokens=None if args.tokens is None else int(args.tokens), device=args.device,
                    gpus=args.gpus, peak_tflops=args.peak_tflops, parallel=args.parallel, mfu=args.mfu,
                    task=task or "tokens")
    print(json.dumps(estimate.to_dict(), indent=2) if args.json else format_plan(estimate))
    if args.measure:
        measured = measure(config, args.measure_steps, task=task or "tokens")
        predicted = measured["runtime_rss"] + estimate.total_memory
        print(f"measured here ({args.measure_steps} steps after a warm-up, through lmforge's Trainer):\n"
              f"  peak memory       {gib(measured['peak_rss'])} resident, predicted {gib(predicted)} "
              f"({gib(measured['runtime_rss'])} of Python, torch and the trainer + the plan's total)\n"
              f"  step time         {measured['step_time']:.3f} s, predicted {estimate.step_time:.3f} s")
    return 0


# ------------------------------------------------------------------------------------------------ plot
def _add_plot(sub: Any) -> None:
    p = sub.add_parser("plot", help="PNG of a run's train and val loss curves", formatter_class=_help_formatter,
                       description="Draw train and validation loss of a run into RUN_DIR/loss.png (or --out).")
    p.add_argument("run_dir", metavar="RUN_DIR")
    p.add_argument("--out", metavar="PNG", help="where to write the plot, .png, .pdf or .svg (default: RUN_DIR/loss.png)")
    p.add_argument("--force", action="store_true", help="replace an existing image at --out")
    p.set_defaults(run=_run_plot)


def _run_plot(args: argparse.Namespace) -> int:
    from lmforge.train.plot import plot_run

    path = plot_run(args.run_dir, out=args.out, force=args.force)
    print(path)
    return 0


# ----------------------------------------------------------------------------------------------- serve
def _add_serve(sub: Any) -> None:
    from lmforge.serve.config import ServeConfig

    p = sub.add_parser(
        "serve", help="an OpenAI-compatible HTTP API (completions, chat, or classification) over a checkpoint",
        formatter_class=_help_formatter,
        description=textwrap.dedent("""\
            Serve a run or checkpoint directory over HTTP: GET /health, GET /v1/models, POST /v1/completions,
            /v1/chat/completions and /v1/responses (OpenAI's APIs, streaming with server-sent events), POST
            /tokenize and /detokenize (vLLM's), and a playground page at /; a classifier: POST /v1/classify.
            Binds 127.0.0.1 unless --host says otherwise. Requests over a limit are refused with 413 or 422
            and a message, a full server answers 429 with Retry-After, a request past --timeout gets 504.
            The API key can also come from the LMFORGE_API_KEY environment variable (kept out of `ps`).
            Against hostile clients: a stream its client stops reading is cut after --stall-timeout; one address
            holds at most --max-slots-per-client places; connections get --header-timeout, --body-timeout (408),
            --keep-alive-timeout and --max-connections, all before the key is checked. Only Host names in
            --allowed-host are answered (default: localhost, 127.0.0.1, ::1 and --host; with --host 0.0.0.0 name
            the machine's address), so a page that rebinds its DNS name cannot reach you; browser pages on other
            origins need --cors-origin. GET /metrics gives Prometheus counters.
            Speculative decoding (--assistant-model, or --prompt-lookup-num-tokens) guesses tokens and checks them in
            one pass: greedy text unchanged, sampling keeps its distribution, each request decoded on its own.
            --lora-modules NAME=RUN_DIR (repeatable) serves LoRA runs of this checkpoint beside it from one copy
            of the base: a request's "model" picks one, and requests of up to --max-loras runs share a batch;
            --allow-runtime-lora adds POST /v1/load_lora_adapter and /v1/unload_lora_adapter (vLLM's) to change them
            while serving."""),
        epilog=textwrap.dedent("""\
            examples:
              lmforge serve runs/shakespeare-char
              lmforge serve runs/shakespeare-char --port 8080 --api-key s3cret --max-tokens 512
              lmforge serve runs/shakespeare-char --quantize int8 --compile    # the fastest decoding on a CPU
              lmforge serve runs/summarizer --prompt-lookup-num-tokens 10      # speculative: lower latency
              lmforge serve runs/big --assistant-model runs/small              # speculative, with a draft model
              lmforge serve runs/base --lora-modules sql=runs/sql-lora --lora-modules chat=runs/chat-lora
              lmforge serve runs/base --quantize int8 --lora-modules sql=runs/sql-lora   # adapters on int8 layers
              lmforge serve runs/base --quantize nf4 --lora-modules a=runs/qlora-a b=runs/qlora-b   # QLoRA runs
              curl -s localhost:8000/v1/completions -H 'Content-Type: application/json' \\
                   -d '{"prompt": "ROMEO:", "max_tokens": 50, "seed": 1}'"""))
    p.add_argument("checkpoint", metavar="RUN_OR_CHECKPOINT_DIR")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default: 127.0.0.1, this machine only)")
    p.add_argument("--port", type=int, default=8000, help="port to bind (default: 8000; 0 = any free port)")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | mps")
    _add_weight_arguments(p)
    p.add_argument("--threads", type=int, metavar="N", help="torch CPU threads (default: torch's choice)")
    p.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])
    add_config_arguments(p, ServeConfig, "serve", metavars={"api_key": "KEY", "assistant_model": "RUN_DIR",
                                                            "lora_modules": "NAME=RUN_DIR"})
    p.set_defaults(run=_run_serve)


class PortInUse(LmforgeError):
    exit_code = 3  # what uvicorn exits with when it cannot bind


def _check_port_free(host: str, port: int) -> None:
    """PortInUse (one line, exit 3) when `port` on `host` cannot be bound, before the model loads: uvicorn
    would load it first and then log six lines."""
    import os
    import socket

    if port == 0:
        return
    try:
        with socket.create_server((host, port)):  # SO_REUSEADDR on POSIX, as uvicorn binds
            pass
    except OSError as e:
        raise PortInUse(f"cannot listen on {host}:{port} ({os.strerror(e.errno or 0)}): stop what uses it or choose another "
                        "--port") from None


def _run_serve(args: argparse.Namespace) -> int:
    import os

    from lmforge.config import build_section
    from lmforge.serve import ServeConfig, serve

    values = config_values(args, ServeConfig, "serve")
    if "api_key" not in values and os.environ.get("LMFORGE_API_KEY"):
        values["api_key"] = os.environ["LMFORGE_API_KEY"]
    config = build_section(ServeConfig, values, "serve")
    if not 0 <= args.port <= 65535:
        raise ConfigError(f"--port {args.port} is invalid: use 0 to 65535")
    if args.threads is not None:
        if args.threads < 1:
            raise ConfigError(f"--threads {args.threads} is invalid: use 1 or more")
        import torch

        torch.set_num_threads(args.threads)
    _check_port_free(args.host, args.port)
    serve(args.checkpoint, config, host=args.host, port=args.port, device=args.device, log_level=args.log_level,
          dtype=args.dtype, quantize=args.quantize, compile=args.compile)
    return 0


# ---------------------------------------------------------------------------------------- import/export
def _add_import(sub: Any) -> None:
    p = sub.add_parser(
        "import", help="a Hugging Face model directory, a GGUF file or a PEFT LoRA adapter -> an lmforge checkpoint",
        formatter_class=_help_formatter,
        description=textwrap.dedent("""\
            Read a local Hugging Face causal LM directory (config.json of a gpt2 or llama model,
            model.safetensors or a sharded model.safetensors.index.json, and tokenizer.json or
            vocab.json + merges.txt) and write it as RUN_DIR/checkpoints/step-00000000/. generate, eval
            and serve use it directly; training starts from it with --train.init_from RUN_DIR.
            Weights are read with safetensors only: pickle files (pytorch_model.bin) are refused unopened.
            The tokenizer keeps its own special tokens (GPT-2: <|endoftext|> ends a text).
            A .gguf file (llama.cpp's format: a gpt2 or llama model, any quantization, dequantized to fp32;
            a byte-level BPE tokenizer, or a char/byte tokenizer lmforge exported) is imported the same way.
            A PEFT LoRA adapter directory (adapter_config.json, adapter_model.safetensors) or a llama.cpp LoRA
            adapter (.gguf) becomes a LoRA checkpoint on --base, the lmforge run of the model it was trained on
            (imported first): generate, eval, serve, merge and export use it as any LoRA run; it computes what
            peft (or llama.cpp) computes. --train.init_from it trains its adapters on."""),
        epilog=textwrap.dedent("""\
            examples:
              lmforge import ~/models/gpt2 --out runs/gpt2
              lmforge generate runs/gpt2 --prompt "Hello, world!" --max-new-tokens 100 --greedy
              lmforge prepare corpus/ --tokenizer runs/gpt2/checkpoints/step-00000000/tokenizer.json --out data/mine
              lmforge train --data data/mine --run-dir runs/gpt2-mine --train.init_from runs/gpt2
              lmforge import exports/char-small.gguf --out runs/from-gguf
              lmforge import ~/adapters/my-lora --base runs/llama --out runs/llama-my-lora   # a PEFT adapter
              lmforge import ~/adapters/my-qlora --base runs/llama --out runs/llama-qlora --quantize nf4   # QLoRA's
              lmforge train --data data/mine --run-dir runs/llama-my-lora-2 --train.init_from runs/llama-my-lora"""))
    p.add_argument("hf_dir", metavar="HF_DIR_OR_GGUF",
                   help="directory a Hugging Face model or PEFT adapter was saved to, or a .gguf file")
    p.add_argument("--out", required=True, metavar="RUN_DIR", help="run directory to create the checkpoint in")
    p.add_argument("--base", metavar="RUN", default=None,
                   help="for an adapter (PEFT or llama.cpp LoRA): the lmforge run (or checkpoint) of the model it "
                   "adapts")
    p.add_argument("--quantize", choices=["nf4"], default=None,
                   help="for a PEFT adapter trained with QLoRA (on the base loaded in 4 bits, BitsAndBytesConfig "
                   "nf4): the run keeps its base so (lora.quantize nf4) and computes what peft computed")
    p.add_argument("--double-quant", action="store_true",
                   help="with --quantize: the base was loaded with bnb_4bit_use_double_quant (lora.double_quant)")
    p.set_defaults(run=_run_import)


def _run_import(args: argparse.Namespace) -> int:
    from pathlib import Path

    from lmforge.interop.peft_import import PEFTImportError, import_peft, is_peft_adapter

    from lmforge.interop.gguf_lora import import_gguf_adapter, is_gguf_adapter

    adapter = ("a PEFT adapter" if is_peft_adapter(args.hf_dir) else
               "a llama.cpp LoRA adapter" if Path(args.hf_dir).is_file() and is_gguf_adapter(args.hf_dir) else None)
    if adapter is not None:
        if args.base is None:
            raise PEFTImportError(f"{args.hf_dir} is {adapter}: give --base RUN, the lmforge run of the model it "
                                  f"adapts (`lmforge import MODEL --out RUN` imports that model)")
        if adapter == "a PEFT adapter":
            print(import_peft(args.hf_dir, args.base, args.out, args.quantize, args.double_quant))
            return 0
        if args.quantize or args.double_quant:
            raise PEFTImportError(f"--quantize applies to a PEFT adapter trained with QLoRA; {args.hf_dir} is a "
                                  "llama.cpp LoRA adapter, whose base is llama.cpp's own file: drop --quantize")
        print(import_gguf_adapter(args.hf_dir, args.base, args.out))
        return 0
    if args.quantize or args.double_quant:
        raise PEFTImportError(f"--quantize and --double-quant apply to a PEFT adapter (with --base); {args.hf_dir} is "
                              "none: drop them")
    if args.base is not None:
        raise PEFTImportError(f"--base applies to an adapter (a PEFT adapter directory, a llama.cpp LoRA adapter "
                              f"file); {args.hf_dir} is none: drop --base")
    if Path(args.hf_dir).suffix == ".gguf" or Path(args.hf_dir).is_file():
        from lmforge.interop.gguf_import import import_gguf

        print(import_gguf(args.hf_dir, args.out))
        return 0
    from lmforge.interop.hf_import import import_hf

    print(import_hf(args.hf_dir, args.out))
    return 0


def _add_export(sub: Any) -> None:
    p = sub.add_parser(
        "export", help="a checkpoint -> a Hugging Face directory, an ONNX file or a GGUF file",
        formatter_class=_help_formatter,
        description=textwrap.dedent("""\
            --format hf: config.json (GPT2LMHeadModel or LlamaForCausalLM, whichever the model matches),
            model.safetensors, generation_config.json and tokenizer files; transformers' AutoModelForCausalLM
            and AutoTokenizer load the directory offline. Models with options neither architecture has
            (e.g. sinusoidal positions, or an encoder: it is not a BertForMaskedLM) are refused with the reason.
            --format onnx: one graph input_ids (batch, sequence) -> logits (batch, sequence, vocab), both
            axes dynamic, for onnxruntime and other ONNX runtimes (TensorFlow through onnx-tf).
            --format gguf: one file for llama.cpp, Ollama, LM Studio and other ggml programs (a GPT-2 or
            Llama-style language model, as for hf), the tokenizer inside; --gguf-type f32 (exact), f16, bf16, q8_0,
            5- and 4-bit q5_1, q5_0, q4_1, q4_0, or llama.cpp's K-quant mixes q6_k, q5_k_m, q5_k_s, q4_k_m (the
            usual choice to share a model), q4_k_s, q3_k_l, q3_k_m, q3_k_s, q2_k, and iq4_xs, iq4_nl. A LoRA run
            is written merged, or with --adapter as a llama.cpp LoRA adapter that applies onto the GGUF of its
            base."""),
        epilog=textwrap.dedent("""\
            examples:
              lmforge export runs/char-small --format hf --out exports/char-small-hf
              lmforge export runs/shakespeare-char --format onnx --out exports/shakespeare.onnx   (any model)
              lmforge export runs/char-small --format gguf --gguf-type f16 --out exports/char-small.gguf
              lmforge export runs/lora --format gguf --adapter --out exports/lora.gguf   (with the base's GGUF)
              lmforge export runs/llama --format gguf --gguf-type q4_k_m --imatrix-text calibration.txt \\
                  --out exports/llama-q4_k_m.gguf
              lmforge export runs/llama --format gguf --gguf-type q3_k_m --imatrix exports/llama.imatrix.gguf \\
                  --out exports/llama-q3_k_m.gguf   (an imatrix from `lmforge imatrix` or llama-imatrix)"""))
    p.add_argument("checkpoint", metavar="RUN_OR_CHECKPOINT_DIR")
    p.add_argument("--format", required=True, choices=["hf", "onnx", "gguf"],
                   help="hf (Hugging Face directory) | onnx (file) | gguf (file)")
    p.add_argument("--out", required=True, metavar="PATH", help="output directory (hf), .onnx or .gguf file")
    p.add_argument("--gguf-type", default=None, metavar="TYPE",
                   choices=["f32", "f16", "bf16", "q8_0", "q5_1", "q5_0", "q4_1", "q4_0",
                            "q6_k", "q5_k_m", "q5_k_s", "q4_k_m", "q4_k_s", "q3_k_l", "q3_k_m", "q3_k_s", "q2_k",
                            "iq4_xs", "iq4_nl"],
                   # gguf_export.GGUF_TYPES
                   help="gguf: the matrices' type, f32 (exact, the default), f16 or bf16 (half the size), q8_0 (8-bit, "
                   "about a quarter), q5_1, q5_0, q4_1 or q4_0 (5 and 4 bits per weight, the head q6_k or q8_0), or a "
                   "K-quant mix chosen per tensor as llama-quantize does: q6_k, q5_k_m, q5_k_s, q4_k_m, q4_k_s, "
                   "q3_k_l, q3_k_m, q3_k_s, q2_k (2.6 to 6.6 bits per weight; the head q6_k), or iq4_xs, iq4_nl "
                   "(4.25 and 4.5 bits on a non-linear grid)")
    p.add_argument("--imatrix-text", default=None, metavar="TEXT_FILE",
                   help="gguf with a --gguf-type of 2 to 6 bits (q6_k ... q2_k, iq4_*, q5_1 ... q4_0): calibration "
                   "text (UTF-8) the model reads first to measure an importance matrix, the mean square of the "
                   "activations each weight multiplies, which those tensors are then quantized under (llama-imatrix + "
                   "llama-quantize --imatrix): less error where the text needs it, most at 2 and 3 bits")
    p.add_argument("--imatrix", default=None, metavar="IMATRIX_FILE",
                   help="gguf with a --gguf-type of 2 to 6 bits: quantize under an importance matrix read from a file, "
                   "llama.cpp's GGUF or older .dat format (what `lmforge imatrix` or llama-imatrix wrote for this "
                   "model), instead of measuring one with --imatrix-text")
    p.add_argument("--force", action="store_true", help="replace an existing output")
    p.add_argument("--merge", action="store_true", help="hf, a LoRA run: one model with the adapters merged in "
                   "(default: the base in OUT and the adapters in PEFT's format in OUT/adapter)")
    p.add_argument("--adapter", action="store_true", help="gguf, a LoRA run: only its adapters, as a llama.cpp LoRA "
                   "adapter for the GGUF of its base (llama-cli -m base.gguf --lora OUT; Ollama's ADAPTER); "
                   "without it a LoRA run is written merged")
    p.set_defaults(run=_run_export)


def _run_export(args: argparse.Namespace) -> int:
    if args.gguf_type is not None and args.format != "gguf":
        raise ConfigError(f"--gguf-type applies to --format gguf, not --format {args.format}: drop it")
    if args.adapter and args.format != "gguf":
        raise ConfigError(f"--adapter applies to --format gguf, not --format {args.format} (hf writes a LoRA run's "
                          "adapters in PEFT's format by default): drop it")
    for option, value in (("--imatrix-text", args.imatrix_text), ("--imatrix", args.imatrix)):
        if value is not None and (args.format != "gguf" or args.adapter):
            raise ConfigError(f"{option} weighs the quantization of a --format gguf model (not an --adapter): "
                              "drop it")
    if args.adapter and args.gguf_type not in (None, "f32"):
        raise ConfigError(f"--adapter writes the adapters in f32 (they are small): drop --gguf-type {args.gguf_type}")
    if args.format == "gguf" and args.adapter:
        from lmforge.interop.gguf_lora import export_gguf_adapter

        print(export_gguf_adapter(args.checkpoint, args.out, force=args.force))
    elif args.format == "gguf":
        from lmforge.interop.gguf_export import export_gguf, gguf_summary

        path = export_gguf(args.checkpoint, args.out, force=args.force, dtype=args.gguf_type or "f32", progress=True,
                           imatrix_text=args.imatrix_text, imatrix=args.imatrix)
        print(gguf_summary(path), file=sys.stderr)
        print(path)
    elif args.format == "hf":
        from lmforge.interop.hf_export import export_hf

        print(export_hf(args.checkpoint, args.out, force=args.force, merge=args.merge))
    else:
        from lmforge.interop.onnx_export import export_onnx

        print(export_onnx(args.checkpoint, args.out, force=args.force))
    return 0


# ----------------------------------------------------------------------------------------------- merge
def _add_merge(sub: Any) -> None:
    p = sub.add_parser(
        "merge", help="a LoRA run -> a full checkpoint with the adapters merged into the weights",
        formatter_class=_help_formatter,
        description=textwrap.dedent("""\
            Fold the adapters of a LoRA run (`lmforge train --lora.r 8 --train.init_from BASE`) into its base's
            weights, W + (alpha / r) B A, and write OUT/checkpoints/step-N/ as a plain checkpoint (weights only):
            generate, eval, serve, export and --train.init_from read it like any run, with the adapted model's
            logits. The base the run names must still be there, unchanged (its fingerprint is checked)."""),
        epilog=textwrap.dedent("""\
            examples:
              lmforge merge runs/gpt2-lora --out runs/gpt2-lora-merged
              lmforge generate runs/gpt2-lora-merged --prompt "Hello" --greedy"""))
    p.add_argument("checkpoint", metavar="RUN_OR_CHECKPOINT_DIR", help="a LoRA run or one of its checkpoints")
    p.add_argument("--out", required=True, metavar="DIR", help="run directory to write the merged checkpoint in")
    p.add_argument("--force", action="store_true", help="replace an existing merge output")
    p.set_defaults(run=_run_merge)


def _run_merge(args: argparse.Namespace) -> int:
    from lmforge.interop.lora_merge import merge_checkpoint

    print(merge_checkpoint(args.checkpoint, args.out, force=args.force))
    return 0


def _add_imatrix(sub: Any) -> None:
    p = sub.add_parser(
        "imatrix", help="measure a model's importance matrix on calibration text, as llama.cpp's llama-imatrix",
        formatter_class=_help_formatter,
        description=textwrap.dedent("""\
            The model reads the text in windows of its context, and for each matrix of its blocks (with
            --process-output the head's too) lmforge adds up the squares of the activations each input column
            multiplies: a rounding error in a weight moves the output in proportion to them. The sums are written
            as llama.cpp's GGUF imatrix file (imatrix.datasets, in_sum2, counts), under the tensor names of
            `lmforge export --format gguf`: `lmforge export --imatrix FILE` quantizes the 2- to 6-bit types under
            it, and llama.cpp's llama-quantize --imatrix FILE reads it too, also for the 1- to 3-bit IQ types that
            need one and lmforge does not write. Text like what the model will be used on, some thousands of
            tokens, is the usual choice."""),
        epilog=textwrap.dedent("""\
            examples:
              lmforge imatrix runs/llama --text calibration.txt --out exports/llama.imatrix.gguf
              lmforge imatrix runs/llama --text code.txt --in-file exports/llama.imatrix.gguf --out both.imatrix.gguf
              lmforge export runs/llama --format gguf --gguf-type q3_k_m --imatrix exports/llama.imatrix.gguf \\
                  --out exports/llama-q3_k_m.gguf
              lmforge export runs/llama --format gguf --gguf-type f16 --out exports/llama-f16.gguf
              llama-quantize --imatrix exports/llama.imatrix.gguf exports/llama-f16.gguf iq2_xs.gguf IQ2_XS"""))
    p.add_argument("checkpoint", metavar="RUN_OR_CHECKPOINT_DIR")
    p.add_argument("--text", default=None, metavar="TEXT_FILE", help="calibration text (UTF-8) the model reads")
    p.add_argument("--in-file", action="append", default=[], metavar="IMATRIX_FILE",
                   help="an imatrix .gguf file of this model (lmforge's or llama-imatrix's) whose sums the text's are "
                   "added to, as llama-imatrix --in-file; repeatable, and without --text the files are only added up")
    p.add_argument("--out", required=True, metavar="IMATRIX_FILE", help="the .gguf imatrix file to write")
    p.add_argument("--process-output", action="store_true",
                   help="measure the head's input too (output.weight; llama-imatrix's option of the same name); "
                   "without it the head is quantized unweighted, as llama.cpp's default")
    p.add_argument("--start-each-window", action="store_true",
                   help="read the text as llama-imatrix does: the start token in front, whole windows of the context "
                   "only, each begun with the start token (the importance then equals llama-imatrix's to float "
                   "rounding); by default the text is read in plain windows, as the model saw text in training")
    p.add_argument("--force", action="store_true", help="replace an imatrix file lmforge wrote")
    p.set_defaults(run=_run_imatrix)


def _run_imatrix(args: argparse.Namespace) -> int:
    from lmforge.interop.gguf_export import export_imatrix
    from lmforge.interop.gguf_imatrix_file import imatrix_summary

    path = export_imatrix(args.checkpoint, args.text, args.out, force=args.force, head=args.process_output,
                          progress=True, in_files=args.in_file, start_windows=args.start_each_window)
    print(imatrix_summary(path), file=sys.stderr)
    print(path)
    return 0


# ------------------------------------------------------------------------------------------------ main
COMMANDS: list[Callable[[Any], None]] = [_add_prepare, _add_train, _add_sweep, _add_eval, _add_generate, _add_chat,
                                         _add_classify, _add_reward, _add_best_of_n,
                                         _add_fill_mask, _add_embed, _add_detect, _add_plot, _add_attention, _add_plan,
                                         _add_serve, _add_import, _add_export, _add_imatrix, _add_merge]


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="lmforge", formatter_class=_help_formatter,
        description="lmforge: train your own language model end to end.",
        epilog=textwrap.dedent("""\
            the training process:
              lmforge prepare --dataset shakespeare --tokenizer char --out data/shakespeare-char
              lmforge train --config shakespeare-char
              lmforge eval runs/shakespeare-char
              lmforge generate runs/shakespeare-char --prompt "ROMEO:"

            Run `lmforge COMMAND --help` for the options of each command."""))
    parser.add_argument("--version", action="version", version=f"lmforge {__version__}")
    debug = argparse.ArgumentParser(add_help=False)
    debug.add_argument("--debug", action="store_true", help="show the full traceback of an error")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    original = sub.add_parser

    def add_parser(name: str, **kwargs: Any) -> argparse.ArgumentParser:
        return original(name, parents=[debug], **kwargs)

    sub.add_parser = add_parser  # type: ignore[method-assign]
    for add in COMMANDS:
        add(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    keep_freed_memory()  # every command's CPU tensors reuse freed memory without page faults (allocator.py)
    parser = build_parser()
    try:
        args, extra = parser.parse_known_args(argv)
    except (UsageError, argparse.ArgumentError) as e:
        prog = getattr(e, "prog", "lmforge")
        print(f"{prog}: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    debug = getattr(args, "debug", False) or "--debug" in extra
    extra = [x for x in extra if x != "--debug"]
    if args.command is None:
        parser.print_help()
        return EXIT_USAGE
    try:
        if getattr(args, "takes_overrides", False):
            args.overrides = extra
        elif extra:
            raise ConfigError(f"unrecognized arguments: {' '.join(extra)} (see lmforge {args.command} --help)")
        return args.run(args)
    except LmforgeError as e:
        if debug:
            raise
        print(f"lmforge {args.command}: error: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print(f"lmforge {args.command}: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # whoever read stdout stopped (`lmforge generate ... | head`): stop quietly, as cat does
        _stdout_to_devnull()
        return 128 + 13  # what a shell reports for a process ended by SIGPIPE
    except Exception as e:  # an lmforge bug, not a user error: still one line unless --debug
        if debug:
            raise
        if isinstance(e, OSError) and e.errno in (errno.EACCES, errno.EPERM, errno.EROFS) and e.filename:
            from pathlib import Path

            from lmforge.files import TMP
            where = Path(e.filename).parent if f".{TMP}-" in str(e.filename) else e.filename  # not our temp name
            print(f"lmforge {args.command}: error: {where}: {e.strerror}: check the permissions or choose "
                  "another path", file=sys.stderr)  # a read-only or foreign folder: the user's to fix
            return EXIT_USAGE
        print(f"lmforge {args.command}: internal error: {type(e).__name__}: {e} "
              "(rerun with --debug for the traceback, and please report it)", file=sys.stderr)
        return 1


def _stdout_to_devnull() -> None:
    """Point stdout at /dev/null, so that the interpreter's last flush of what is left does not fail again."""
    import os

    try:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    except (OSError, ValueError):  # stdout is no file descriptor (captured, in tests): nothing is flushed to a pipe
        pass


if __name__ == "__main__":
    sys.exit(main())
