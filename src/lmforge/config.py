"""One typed config tree for lmforge.

Each section is a dataclass whose fields carry a type, a default and a one-line doc (the
``metadata["doc"]``); the CLI builds its ``--section.key`` flags and ``--help`` from them. Values are
checked on construction: an unknown key names the closest valid key, a wrong type or an out-of-range
value names the field and what is allowed. Configs load from YAML or JSON and never run code.
"""

from __future__ import annotations

import dataclasses
import difflib
import importlib.resources
import json
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import yaml

from lmforge.errors import ConfigError


def doc(text: str, default: Any = dataclasses.MISSING, **kwargs: Any) -> Any:
    """A dataclass field with a one-line description shown by ``--help``."""
    return field(default=default, metadata={"doc": text}, **kwargs)


def _check(ok: bool, name: str, value: Any, allowed: str) -> None:
    if not ok:
        raise ConfigError(f"{name}={value!r} is invalid: {allowed}")


def _one_of(name: str, value: Any, choices: tuple) -> None:
    _check(value in choices, name, value, f"choose one of {', '.join(map(str, choices))}")


# --------------------------------------------------------------------------------------------- model
@dataclass
class ModelConfig:
    """The shape of the Transformer decoder."""

    vocab_size: int = doc("Vocabulary size; taken from the prepared data when training.", 256)
    block_size: int = doc("Context length in tokens (the longest sequence the model sees).", 64)
    n_layer: int = doc("Number of Transformer blocks.", 4)
    n_head: int = doc("Number of attention heads (query heads).", 4)
    n_kv_head: Optional[int] = doc("Key/value heads for grouped-query attention; null = n_head.", None)
    n_embd: int = doc("Width of the residual stream (embedding size).", 128)
    mlp_hidden: Optional[int] = doc("Hidden width of the MLP; null = 4*n_embd (gelu) or 8/3*n_embd (swiglu).", None)
    dropout: float = doc("Dropout probability on attention weights and residual branches.", 0.0)
    bias: bool = doc("Bias terms in Linear layers and norms (GPT-2 style).", True)
    norm: str = doc("Normalisation: layernorm | rmsnorm.", "layernorm")
    norm_eps: float = doc("Epsilon of the normalisation layers.", 1e-5)
    mlp: str = doc("Feed-forward block: gelu | swiglu.", "gelu")
    activation: str = doc("GELU form in the gelu MLP: gelu (exact, erf) | gelu_tanh (tanh approximation, "
                          "GPT-2's gelu_new).", "gelu")
    pos_encoding: str = doc("Positional encoding: learned | sinusoidal | rope.", "learned")
    rope_theta: float = doc("RoPE base frequency.", 10000.0)
    tie_embeddings: bool = doc("Share the token embedding with the LM head.", True)
    attention: str = doc("Attention path: sdpa (fused, default) | reference (the formula written out).", "sdpa")
    init_std: float = doc("Std of the normal weight init (GPT-2: 0.02).", 0.02)

    def __post_init__(self) -> None:
        for name in ("vocab_size", "block_size", "n_layer", "n_head", "n_embd"):
            v = getattr(self, name)
            _check(isinstance(v, int) and 0 < v <= 10_000_000, f"model.{name}", v, "a positive integer")
        if self.n_kv_head is None:
            self.n_kv_head = self.n_head
        _check(0 < self.n_kv_head <= self.n_head and self.n_head % self.n_kv_head == 0,
               "model.n_kv_head", self.n_kv_head, f"a divisor of n_head={self.n_head}")
        _check(self.n_embd % self.n_head == 0, "model.n_embd", self.n_embd,
               f"a multiple of n_head={self.n_head}")
        if self.pos_encoding == "rope":
            _check(self.head_dim % 2 == 0, "model.n_embd", self.n_embd, "n_embd/n_head must be even for rope")
        if self.mlp_hidden is not None:
            _check(self.mlp_hidden > 0, "model.mlp_hidden", self.mlp_hidden, "a positive integer or null")
        _check(0.0 <= self.dropout < 1.0, "model.dropout", self.dropout, "a probability in [0, 1)")
        _check(0.0 < self.norm_eps < 1.0, "model.norm_eps", self.norm_eps, "a small positive number")
        _check(self.rope_theta > 0, "model.rope_theta", self.rope_theta, "a positive number")
        _check(0.0 < self.init_std < 1.0, "model.init_std", self.init_std, "a small positive number")
        _one_of("model.norm", self.norm, ("layernorm", "rmsnorm"))
        _one_of("model.mlp", self.mlp, ("gelu", "swiglu"))
        _one_of("model.activation", self.activation, ("gelu", "gelu_tanh"))
        _one_of("model.pos_encoding", self.pos_encoding, ("learned", "sinusoidal", "rope"))
        _one_of("model.attention", self.attention, ("sdpa", "reference"))

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    @property
    def hidden_dim(self) -> int:
        """MLP hidden width: explicit, else 4*C for GELU, else 8/3*C rounded up to a multiple of 64."""
        if self.mlp_hidden is not None:
            return self.mlp_hidden
        if self.mlp == "gelu":
            return 4 * self.n_embd
        return 64 * math.ceil(8 * self.n_embd / 3 / 64)


PRESETS: dict[str, dict[str, Any]] = {
    "tiny": dict(block_size=32, n_layer=2, n_head=2, n_embd=32),
    "char-small": dict(block_size=64, n_layer=4, n_head=4, n_embd=128),
    "gpt2-124m": dict(vocab_size=50257, block_size=1024, n_layer=12, n_head=12, n_embd=768, activation="gelu_tanh"),
    "llama-small": dict(block_size=256, n_layer=6, n_head=6, n_kv_head=2, n_embd=384, norm="rmsnorm",
                        mlp="swiglu", pos_encoding="rope", bias=False, tie_embeddings=True, norm_eps=1e-6),
}


def preset(name: str, **overrides: Any) -> ModelConfig:
    """The named model preset, with overrides applied."""
    if name not in PRESETS:
        raise ConfigError(f"unknown preset {name!r}{_closest(name, PRESETS)}; presets: {', '.join(PRESETS)}")
    return ModelConfig(**{**PRESETS[name], **overrides})


# ---------------------------------------------------------------------------------------------- data
@dataclass
class DataConfig:
    """Where the prepared token shards are and how batches are drawn from them."""

    path: str = doc("Directory written by `lmforge prepare` (shards, manifest.json, tokenizer.json).", "data/shakespeare-char")
    sampling: str = doc("Batches: random (random windows) | sequential (consecutive windows, wraps around).", "random")
    embedding_init: str = doc("Token embedding init: none | word2vec | glove:PATH.", "none")

    def __post_init__(self) -> None:
        _one_of("data.sampling", self.sampling, ("random", "sequential"))
        ok = self.embedding_init in ("none", "word2vec") or (
            self.embedding_init.startswith("glove:") and len(self.embedding_init) > 6)
        _check(ok, "data.embedding_init", self.embedding_init, "none, word2vec or glove:PATH")


# --------------------------------------------------------------------------------------------- optim
@dataclass
class OptimConfig:
    """AdamW and the learning-rate schedule."""

    lr: float = doc("Peak learning rate.", 1e-3)
    min_lr: float = doc("Learning rate at the end of the schedule (cosine, wsd).", 1e-4)
    weight_decay: float = doc("AdamW weight decay (not applied to norms, biases and embeddings).", 0.1)
    beta1: float = doc("AdamW beta1.", 0.9)
    beta2: float = doc("AdamW beta2.", 0.99)
    eps: float = doc("AdamW epsilon.", 1e-8)
    grad_clip: float = doc("Clip the global gradient norm to this value; 0 disables clipping.", 1.0)
    schedule: str = doc("LR schedule: cosine (warm-up then cosine) | wsd (warm-up, stable, decay) | constant.", "cosine")
    warmup_steps: int = doc("Linear warm-up steps.", 100)
    decay_fraction: float = doc("wsd: fraction of the steps spent in the final decay.", 0.2)

    def __post_init__(self) -> None:
        _check(0.0 < self.lr < 10.0, "optim.lr", self.lr, "a positive number below 10")
        _check(0.0 <= self.min_lr <= self.lr, "optim.min_lr", self.min_lr, f"between 0 and lr={self.lr}")
        _check(0.0 <= self.weight_decay < 10.0, "optim.weight_decay", self.weight_decay, "a number in [0, 10)")
        _check(0.0 <= self.beta1 < 1.0, "optim.beta1", self.beta1, "a number in [0, 1)")
        _check(0.0 <= self.beta2 < 1.0, "optim.beta2", self.beta2, "a number in [0, 1)")
        _check(0.0 < self.eps < 1.0, "optim.eps", self.eps, "a small positive number")
        _check(self.grad_clip >= 0.0, "optim.grad_clip", self.grad_clip, "0 (off) or a positive number")
        _one_of("optim.schedule", self.schedule, ("cosine", "wsd", "constant"))
        _check(self.warmup_steps >= 0, "optim.warmup_steps", self.warmup_steps, "0 or more")
        _check(0.0 <= self.decay_fraction <= 1.0, "optim.decay_fraction", self.decay_fraction, "a number in [0, 1]")


# --------------------------------------------------------------------------------------------- train
@dataclass
class TrainConfig:
    """The training loop: steps, batches, evaluation, checkpoints, device."""

    run_dir: str = doc("Directory for checkpoints, logs and plots.", "runs/default")
    max_steps: int = doc("Optimizer steps to train for.", 2000)
    batch_size: int = doc("Sequences per micro-batch on each process.", 12)
    grad_accum: int = doc("Micro-batches accumulated per optimizer step (global batch = batch_size*grad_accum*world).", 1)
    eval_interval: int = doc("Evaluate on the validation batches every N steps (0: only at the end).", 250)
    eval_batches: int = doc("Number of fixed validation batches per evaluation.", 20)
    log_interval: int = doc("Log train metrics every N steps.", 10)
    save_interval: int = doc("Save a checkpoint every N steps (0: only at the end).", 500)
    keep_last: int = doc("Keep the newest K checkpoints (the best by val loss is kept too).", 2)
    seed: int = doc("Seed for initialisation, data order and dropout.", 1337)
    device: str = doc("auto (cuda, then mps, then cpu) | cpu | cuda | cuda:N | mps.", "auto")
    precision: str = doc("fp32 | bf16-mixed (autocast to bfloat16 for matrix products).", "fp32")
    compile: bool = doc("torch.compile the model.", False)
    resume: str = doc("none | auto (newest complete checkpoint in run_dir) | PATH to a checkpoint.", "none")
    init_from: str = doc("none | PATH of a checkpoint or run (e.g. from `lmforge import`) whose model and weights "
                         "a new run starts from; optimizer, step and data start fresh, model.* comes from it.", "none")
    num_threads: int = doc("CPU threads for torch; 0 = torch's default.", 0)
    nonfinite: str = doc("A NaN/Inf loss or gradient (the weights are never updated by it): stop (write "
                         "RUN_DIR/nonfinite-step-N.json, exit code 3) | skip (skip the step, count it in the logs).",
                         "stop")
    spike_zscore: float = doc("Skip a step whose loss lies more than this many standard deviations above the mean "
                              "of the last spike_window steps; 0 = off.", 0.0)
    spike_window: int = doc("Steps of loss history that spike_zscore compares against.", 100)
    dist_timeout: float = doc("Seconds a process waits for the others (gloo/nccl timeout) before it gives up; "
                              "raise it if saving a checkpoint takes longer.", 60.0)
    allow_data_change: bool = doc("Resume even if the prepared data's manifest differs from the one the "
                                  "checkpoint was trained on.", False)

    def __post_init__(self) -> None:
        _check(self.max_steps > 0, "train.max_steps", self.max_steps, "a positive integer")
        _check(0 < self.batch_size <= 65536, "train.batch_size", self.batch_size, "a positive integer")
        _check(0 < self.grad_accum <= 65536, "train.grad_accum", self.grad_accum, "a positive integer")
        for name in ("eval_interval", "log_interval", "save_interval", "num_threads"):
            _check(getattr(self, name) >= 0, f"train.{name}", getattr(self, name), "0 or more")
        _check(self.eval_batches > 0, "train.eval_batches", self.eval_batches, "a positive integer")
        _check(self.keep_last > 0, "train.keep_last", self.keep_last, "a positive integer")
        _one_of("train.precision", self.precision, ("fp32", "bf16-mixed"))
        ok = self.device in ("auto", "cpu", "cuda", "mps") or self.device.startswith("cuda:")
        _check(ok, "train.device", self.device, "auto, cpu, cuda, cuda:N or mps")
        _one_of("train.nonfinite", self.nonfinite, ("stop", "skip"))
        _check(math.isfinite(self.spike_zscore) and self.spike_zscore >= 0, "train.spike_zscore", self.spike_zscore,
               "0 (off) or a positive number of standard deviations, e.g. 6")
        _check(2 <= self.spike_window <= 100_000, "train.spike_window", self.spike_window, "an integer from 2 to 100000")
        _check(math.isfinite(self.dist_timeout) and self.dist_timeout > 0, "train.dist_timeout", self.dist_timeout,
               "a positive number of seconds")


@dataclass
class RunConfig:
    """Everything `lmforge train` needs. `preset` picks model defaults; model.* keys override them."""

    preset: Optional[str] = doc("Model preset: tiny | char-small | gpt2-124m | llama-small; null = model.* only.", None)
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)


SECTIONS = {"model": ModelConfig, "data": DataConfig, "optim": OptimConfig, "train": TrainConfig}


# ----------------------------------------------------------------------------- loading and validation
def _closest(key: str, valid: Any) -> str:
    match = difflib.get_close_matches(key, list(valid), n=1, cutoff=0.5)
    return f" (did you mean {match[0]!r}?)" if match else ""


def _coerce(name: str, value: Any, annotation: Any) -> Any:
    """Check (and, for strings from the command line, convert) one value against its field type."""
    hint = annotation
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        if value is None or (isinstance(value, str) and value.lower() in ("null", "none")):
            return None
        hint = args[0]
    if hint is bool:
        if isinstance(value, str) and value.lower() in ("true", "false", "1", "0", "yes", "no"):
            return value.lower() in ("true", "1", "yes")
        if isinstance(value, bool):
            return value
    elif hint is int:
        if isinstance(value, str):
            try:
                return int(value)
            except ValueError:
                pass
        elif isinstance(value, int) and not isinstance(value, bool):
            return value
    elif hint is float:
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    elif hint is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
    raise ConfigError(f"{name}={value!r} has the wrong type: expected {getattr(hint, '__name__', hint)}")


def _field_types(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def build_section(cls: type, values: dict[str, Any], prefix: str) -> Any:
    """Construct dataclass `cls` from a dict, refusing unknown keys and wrong types."""
    if not isinstance(values, dict):
        raise ConfigError(f"{prefix} must be a mapping of keys to values, got {type(values).__name__}")
    hints = _field_types(cls)
    kwargs = {}
    for key, value in values.items():
        if key not in hints:
            raise ConfigError(f"unknown config key {prefix}.{key}{_closest(key, hints)}")
        kwargs[key] = _coerce(f"{prefix}.{key}", value, hints[key])
    return cls(**kwargs)


def run_config_from_dict(raw: dict[str, Any]) -> RunConfig:
    """Build a validated RunConfig from nested dicts ({"model": {...}, "train": {...}, "preset": ...})."""
    if not isinstance(raw, dict):
        raise ConfigError("a config must be a mapping with sections model, data, optim, train")
    valid = ["preset", *SECTIONS]
    for key in raw:
        if key not in valid:
            raise ConfigError(f"unknown config section {key!r}{_closest(key, valid)}; sections: {', '.join(valid)}")
    for section in SECTIONS:
        if raw.get(section) is not None and not isinstance(raw[section], dict):
            raise ConfigError(f"{section} must be a mapping of keys to values, got {type(raw[section]).__name__}")
    preset_name = raw.get("preset")
    model_values = dict(raw.get("model") or {})
    if preset_name is not None:
        if not isinstance(preset_name, str) or preset_name not in PRESETS:
            raise ConfigError(f"unknown preset {preset_name!r}{_closest(str(preset_name), PRESETS)}; "
                              f"presets: {', '.join(PRESETS)}")
        model_values = {**PRESETS[preset_name], **model_values}
    return RunConfig(
        preset=preset_name,
        model=build_section(ModelConfig, model_values, "model"),
        data=build_section(DataConfig, dict(raw.get("data") or {}), "data"),
        optim=build_section(OptimConfig, dict(raw.get("optim") or {}), "optim"),
        train=build_section(TrainConfig, dict(raw.get("train") or {}), "train"),
    )


def builtin_recipes() -> dict[str, Any]:
    """The recipes shipped inside the package (lmforge/configs/NAME.yaml): {NAME: importlib.resources file}."""
    folder = importlib.resources.files("lmforge") / "configs"
    if not folder.is_dir():
        return {}
    files = sorted((f for f in folder.iterdir() if f.name.endswith(".yaml")), key=lambda f: f.name)
    return {f.name[:-len(".yaml")]: f for f in files}


def builtin_recipe(name: str) -> Any:
    """The built-in recipe called `name` (NAME or NAME.yaml); ConfigError listing the recipes if there is none."""
    recipes = builtin_recipes()
    stem = name[:-len(".yaml")] if name.endswith(".yaml") else name
    if stem not in recipes:
        raise ConfigError(f"config file {name} does not exist and is not a built-in recipe"
                          f"{_closest(Path(stem).name, recipes)}; built-in recipes: {', '.join(recipes) or 'none'}; "
                          f"or pass the path of a YAML/JSON file")
    return recipes[stem]


def read_config_file(path: str | Path) -> dict[str, Any]:
    """Read a YAML or JSON config file, or a built-in recipe by name, into nested dicts (safe loaders only).

    An existing file wins over a recipe of the same name.
    """
    p = Path(path)
    source = p if p.is_file() else builtin_recipe(str(path))
    try:
        text = source.read_text(encoding="utf-8")
        data = json.loads(text) if p.suffix == ".json" else yaml.safe_load(text)
    except (UnicodeDecodeError, yaml.YAMLError, json.JSONDecodeError) as e:
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise ConfigError(f"config file {p} is not valid YAML/JSON: {first}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file {p} must hold a mapping of sections, not {type(data).__name__}")
    return data


def apply_overrides(raw: dict[str, Any], overrides: dict[str, str]) -> dict[str, Any]:
    """Merge dotted overrides {"model.n_layer": "6", "preset": "tiny"} into nested dicts (new copy)."""
    merged = {k: (dict(v) if isinstance(v, dict) else v) for k, v in raw.items()}
    for dotted, value in overrides.items():
        if "." not in dotted:
            merged[dotted] = value
            continue
        section, key = dotted.split(".", 1)
        merged.setdefault(section, {})
        if not isinstance(merged[section], dict):
            raise ConfigError(f"config section {section!r} must be a mapping")
        merged[section][key] = value
    return merged


def load_run_config(path: str | Path | None = None, overrides: dict[str, str] | None = None) -> RunConfig:
    """A RunConfig from an optional YAML/JSON file plus dotted overrides."""
    raw = read_config_file(path) if path else {}
    return run_config_from_dict(apply_overrides(raw, overrides or {}))


def to_dict(config: Any) -> dict[str, Any]:
    """Plain nested dicts, ready for JSON/YAML."""
    return dataclasses.asdict(config)


def field_docs(cls: type) -> list[tuple[str, Any, str]]:
    """(name, default, doc) for each field of a config section, for --help."""
    out = []
    for f in dataclasses.fields(cls):
        default = f.default if f.default is not dataclasses.MISSING else None
        out.append((f.name, default, f.metadata.get("doc", "")))
    return out
