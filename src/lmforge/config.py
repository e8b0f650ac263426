"""One typed config tree for lmforge.

Each section is a dataclass whose fields carry a type, a default, a one-line doc and their rules,
declared once with `doc`: a choice list is a ``Literal[...]`` type, a range is ``ge=``/``gt=``/``le=``/
``lt=`` beside the default. One helper, `validate`, called first in each ``__post_init__``, checks every
field against that declaration (checks between fields follow it); --help (`field_docs`) shows the choices
from the same types. An unknown key names the closest valid key, a wrong type or an out-of-range value
names the field and what is allowed. Configs load from YAML or JSON and never run code.

    norm: Literal["layernorm", "rmsnorm"] = doc("Normalisation.", "layernorm")
    max_steps: int = doc("Optimizer steps to train for.", 2000, ge=1)
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import importlib.resources
import json
import math
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional

import yaml

from lmforge.errors import ConfigError


# ------------------------------------------------------------------------------ declaring and checking
@dataclass(frozen=True)
class _Rules:
    """What `validate` checks of a field beyond its type (see `doc`)."""

    ge: Optional[float] = None
    gt: Optional[float] = None
    le: Optional[float] = None
    lt: Optional[float] = None
    noun: Optional[str] = None
    invalid: Optional[str] = None
    pattern: Optional[str] = None
    forms: tuple[str, ...] = ()


def doc(text: str, default: Any = dataclasses.MISSING, *, ge: Optional[float] = None, gt: Optional[float] = None,
        le: Optional[float] = None, lt: Optional[float] = None, noun: Optional[str] = None,
        invalid: Optional[str] = None, pattern: Optional[str] = None, forms: tuple[str, ...] = (),
        **kwargs: Any) -> Any:
    """A dataclass field with a one-line description shown by ``--help`` and the rules `validate` checks.

    A choice list is the field's type, ``Literal["a", "b"]``, never part of `text`: --help and the error
    message take it from the type. ge/gt/le/lt bound a number (each item of a list of numbers); the message is
    derived from them ("a positive integer", "a number in [0, 1)"), with `noun` naming the number
    ("probability": "a probability in [0, 1)"), or replaced as a whole by `invalid`. `pattern` is a regular
    expression a string must match in full, `forms` the forms it allows as a reader writes them
    (("auto", "cuda:N")), shown by --help and in the message. Other keyword arguments go to dataclasses.field.

        top_p: Optional[float] = doc("Nucleus sampling mass; null = 1.", None, gt=0, le=1, noun="probability")
    """
    rules = _Rules(ge=ge, gt=gt, le=le, lt=lt, noun=noun, invalid=invalid, pattern=pattern, forms=tuple(forms))
    return field(default=default, metadata={"doc": text, "rules": rules}, **kwargs)


class _Shape(typing.NamedTuple):
    """A field's type taken apart: Optional[list[Union[bool, Literal["never"]]]] -> kinds (bool,),
    choices ("never",), optional, is_list. list[list[int]] is a list (is_list) of lists (nested) of ints;
    dict[int, float] maps keys of kind `keys` to floats; dict[tuple[int, ...], float] keys of token sequences."""

    kinds: tuple[Any, ...]  # bool, int, float, str or another class (a nested section)
    choices: tuple[Any, ...]  # the values of its Literal[...] part
    optional: bool  # None is allowed
    is_list: bool  # a list (or tuple) of such items
    nested: bool = False  # a list of non-empty lists of such items
    keys: Any = None  # a dict: the kind of its keys (its values are the items)


def _shape(hint: Any) -> _Shape:
    def parts(h: Any) -> list[Any]:
        return list(typing.get_args(h)) if typing.get_origin(h) in (typing.Union, types.UnionType) else [h]

    items = parts(hint)
    optional = type(None) in items
    items = [h for h in items if h is not type(None)]
    origin = typing.get_origin(items[0]) if len(items) == 1 else None
    is_list, nested, keys = origin is list, False, None
    if is_list:
        inner = typing.get_args(items[0])[0]
        nested = typing.get_origin(inner) is list
        items = parts(typing.get_args(inner)[0] if nested else inner)
    elif origin is dict:
        keys, inner = typing.get_args(items[0])
        items = parts(inner)
    literal = [h for h in items if typing.get_origin(h) is typing.Literal]
    choices = tuple(c for h in literal for c in typing.get_args(h))
    return _Shape(tuple(h for h in items if h not in literal), choices, optional, is_list, nested, keys)


class _Declared(typing.NamedTuple):
    field: dataclasses.Field
    hint: Any
    shape: _Shape
    rules: _Rules


@functools.cache
def _declarations(cls: type) -> dict[str, _Declared]:
    """{field name: its declaration} for a config dataclass (read-only; types resolved once per class)."""
    hints = typing.get_type_hints(cls)
    return {f.name: _Declared(f, hints[f.name], _shape(hints[f.name]), f.metadata.get("rules", _Rules()))
            for f in dataclasses.fields(cls)}


def _show(value: Any) -> str:
    """A value as a config file writes it: null, true, false, 3, text."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def _choices(shape: _Shape, rules: _Rules) -> tuple[str, ...]:
    """The values a field allows as text, from its Literal type (true/false first when it also takes a bool),
    or the forms of its pattern; () when it is not a choice."""
    if shape.choices:
        return (("true", "false") if bool in shape.kinds else ()) + tuple(_show(c) for c in shape.choices)
    return rules.forms


def _is(value: Any, kind: Any) -> bool:
    if kind is bool:
        return isinstance(value, bool)
    if kind is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if kind is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if typing.get_origin(kind) is tuple:  # tuple[int, ...]: a non-empty tuple of such items
        item = typing.get_args(kind)[0]
        return isinstance(value, tuple) and bool(value) and all(_is(x, item) for x in value)
    return isinstance(value, typing.get_origin(kind) or kind)


def _kind_name(kind: Any) -> str:
    return f"non-empty {kind!r}" if typing.get_origin(kind) is tuple else kind.__name__


def _is_choice(value: Any, choices: tuple[Any, ...]) -> bool:
    return any(type(value) is type(c) and value == c for c in choices)  # True is not the choice 1


def _type_name(shape: _Shape) -> str:
    names = " | ".join([getattr(k, "__name__", str(k)) for k in shape.kinds] + [repr(c) for c in shape.choices])
    if shape.keys is not None:
        names = f"dict[{_kind_name(shape.keys)}, {names}]"
    elif shape.is_list:
        names = f"list[list[{names}]]" if shape.nested else f"list[{names}]"
    return names + (" or null" if shape.optional else "")


def _within(x: float, r: _Rules) -> bool:
    """x inside the bounds (NaN is inside none)."""
    return ((r.ge is None or x >= r.ge) and (r.gt is None or x > r.gt)
            and (r.le is None or x <= r.le) and (r.lt is None or x < r.lt))


def _number(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else f"{x:g}"


def _allowed(shape: _Shape, r: _Rules) -> str:
    """What a bounded number may be, in words: 'a positive integer', '0 or a positive number', 'an integer
    from 2 to 100000', 'a probability in [0, 1)'. An infinite upper bound only refuses infinity: it is not shown."""
    if r.invalid:
        return r.invalid
    integer = int in shape.kinds and float not in shape.kinds
    noun = r.noun or ("integer" if integer else "number")
    a = "an" if noun[0] in "aeiou" else "a"
    lo = (r.ge, True) if r.ge is not None else (r.gt, False) if r.gt is not None else None
    hi = (r.le, True) if r.le is not None else (r.lt, False) if r.lt is not None else None
    if hi is not None and math.isinf(hi[0]):
        hi = None
    if integer:  # integer bounds are always inclusive
        lo = (math.floor(lo[0]) + (0 if lo[1] else 1), True) if lo else None
        hi = (math.ceil(hi[0]) - (0 if hi[1] else 1), True) if hi else None
    if lo and hi and integer:
        text = f"{a} {noun} from {_number(lo[0])} to {_number(hi[0])}"
    elif lo and hi:
        left, right = "[" if lo[1] else "(", "]" if hi[1] else ")"
        text = f"{a} {noun} in {left}{_number(lo[0])}, {_number(hi[0])}{right}"
    elif lo and lo[0] == 0:
        text = f"a positive {noun}" if not lo[1] else f"0 or a positive {noun}"
    elif lo and integer and lo[0] == 1:
        text = f"a positive {noun}"
    elif lo:
        text = f"{a} {noun} {'>=' if lo[1] else '>'} {_number(lo[0])}"
    else:
        text = f"{a} {noun} {'<=' if hi[1] else '<'} {_number(hi[0])}"  # type: ignore[index]
    return text + (" or null" if shape.optional and not shape.is_list and shape.keys is None else "")


def _invalid(name: str, value: Any, allowed: str) -> ConfigError:
    return ConfigError(f"{name}={value!r} is invalid: {allowed}")


def _check_item(name: str, value: Any, shape: _Shape, rules: _Rules) -> None:
    if _is_choice(value, shape.choices):
        return
    if not any(_is(value, kind) for kind in shape.kinds):
        if shape.choices:
            raise _invalid(name, value, f"choose one of {', '.join(_choices(shape, rules))}")
        item = shape._replace(optional=False, is_list=False) if shape.is_list else shape
        raise ConfigError(f"{name}={value!r} has the wrong type: expected {_type_name(item)}")
    if _is(value, float) and not _within(value, rules):
        raise _invalid(name, value, _allowed(shape, rules))
    if isinstance(value, str) and rules.pattern is not None and not re.fullmatch(rules.pattern, value):
        raise _invalid(name, value, f"choose one of {', '.join(rules.forms)}")


def validate(config: Any, section: str) -> None:
    """Check every field of the dataclass instance `config` against its declaration (type and `doc` rules).

    Types: bool is not an int, an int is a float, None only where the type is Optional, a list (or tuple)
    where it is list[...], checked item by item; a Literal field takes one of its values. Numbers lie within
    their bounds, strings match their pattern. Raises ConfigError, one line naming `section.field` (and
    `[i]` for an item), the value and what is allowed. Checks between fields stay in each __post_init__,
    after its call to validate.
    """
    for name, declared in _declarations(type(config)).items():
        value, shape, rules = getattr(config, name), declared.shape, declared.rules
        if value is None and shape.optional:
            continue
        item = shape._replace(optional=False, is_list=False, nested=False, keys=None)
        if shape.keys is not None and isinstance(value, dict):
            for key, v in value.items():
                if not _is(key, shape.keys):
                    raise ConfigError(f"{section}.{name} has the key {key!r}: expected {_kind_name(shape.keys)} keys")
                _check_item(f"{section}.{name}[{key!r}]", v, item, rules)
        elif shape.is_list and isinstance(value, (list, tuple)):
            for i, entry in enumerate(value):
                if not shape.nested:
                    _check_item(f"{section}.{name}[{i}]", entry, shape, rules)
                elif not isinstance(entry, (list, tuple)) or not entry:
                    raise ConfigError(f"{section}.{name}[{i}]={entry!r} has the wrong type: expected a non-empty "
                                      f"{_type_name(item._replace(is_list=True))}")
                else:
                    for j, x in enumerate(entry):
                        _check_item(f"{section}.{name}[{i}][{j}]", x, item, rules)
        elif shape.is_list or shape.keys is not None:
            text = " (as text: KEY:VALUE pairs, comma-separated)" if shape.keys is not None else ""
            raise ConfigError(f"{section}.{name}={value!r} has the wrong type: expected {_type_name(shape)}{text}")
        else:
            _check_item(f"{section}.{name}", value, shape, rules)


def _check(ok: bool, name: str, value: Any, allowed: str) -> None:
    """A check between fields, after validate: `name=value is invalid: allowed` unless ok."""
    if not ok:
        raise _invalid(name, value, allowed)


# --------------------------------------------------------------------------------------------- model
MAX_SIZE = 10_000_000  # a sanity bound on every model dimension: larger is a typo, not a model


@dataclass
class ModelConfig:
    """The shape of the Transformer decoder."""

    vocab_size: int = doc("Vocabulary size; taken from the prepared data when training.", 256, ge=1, le=MAX_SIZE)
    block_size: int = doc("Context length in tokens (the longest sequence the model sees).", 64, ge=1, le=MAX_SIZE)
    n_layer: int = doc("Number of Transformer blocks.", 4, ge=1, le=MAX_SIZE)
    n_head: int = doc("Number of attention heads (query heads).", 4, ge=1, le=MAX_SIZE)
    n_kv_head: Optional[int] = doc("Key/value heads for grouped-query attention; null = n_head.", None)
    n_embd: int = doc("Width of the residual stream (embedding size).", 128, ge=1, le=MAX_SIZE)
    head_size: Optional[int] = doc("Width of each attention head; null = n_embd / n_head (Qwen3 and Gemma set their "
                                   "own: heads that together are wider or narrower than the stream).", None, ge=1,
                                   le=MAX_SIZE)
    mlp_hidden: Optional[int] = doc("Hidden width of the MLP; null = 4*n_embd (gelu, relu2) or 8/3*n_embd (swiglu).",
                                    None, gt=0)
    dropout: float = doc("Dropout probability on attention weights and residual branches.", 0.0,
                         ge=0, lt=1, noun="probability")
    bias: bool = doc("Bias terms in Linear layers and norms (GPT-2 style).", True)
    qkv_bias: bool = doc("Bias terms on the attention's query, key and value projections even with bias false (Qwen2's "
                         "layout: HF and GGUF export write such a Llama-style model as qwen2).", False)
    norm: Literal["layernorm", "rmsnorm"] = doc("Normalisation.", "layernorm")
    norm_eps: float = doc("Epsilon of the normalisation layers.", 1e-5, gt=0, lt=1)
    mlp: Literal["gelu", "swiglu", "relu2"] = doc("Feed-forward block: proj(act(fc(x))) with act gelu, or relu2 "
                                                  "(relu(h)^2; So et al. 2021, Primer); or swiglu (Shazeer 2020). "
                                                  "relu2 has no GPT-2/Llama equivalent (HF export refuses it).", "gelu")
    activation: Literal["gelu", "gelu_tanh"] = doc("GELU form in the gelu MLP: gelu is exact (erf), gelu_tanh the "
                                                   "tanh approximation (GPT-2's gelu_new).", "gelu")
    pos_encoding: Literal["learned", "sinusoidal", "rope"] = doc("Positional encoding.", "learned")
    rope_theta: float = doc("RoPE base frequency.", 10000.0, gt=0)
    rope_scaling: Literal["none", "llama3"] = doc("RoPE frequency scaling: none, or llama3 (Llama 3.1's and 3.2's: "
                                                  "frequencies whose wavelength exceeds rope_original_context / "
                                                  "rope_low_freq_factor are divided by rope_factor, those shorter "
                                                  "than rope_original_context / rope_high_freq_factor kept, a smooth "
                                                  "ramp between).", "none")
    rope_factor: float = doc("llama3 scaling: what the lowest frequencies are divided by.", 8.0, gt=0, lt=1e6)
    rope_low_freq_factor: float = doc("llama3 scaling: sets the longest wavelength that is kept whole.", 1.0, gt=0,
                                      lt=1e6)
    rope_high_freq_factor: float = doc("llama3 scaling: sets the shortest wavelength that is fully divided.", 4.0,
                                       gt=0, lt=1e6)
    rope_original_context: int = doc("llama3 scaling: the context length the unscaled frequencies were trained for.",
                                     8192, ge=1, le=MAX_SIZE)
    tie_embeddings: bool = doc("Share the token embedding with the LM head.", True)
    attention: Literal["sdpa", "reference"] = doc("Attention path: sdpa is fused (the default), reference writes "
                                                  "the formula out.", "sdpa")
    init_std: float = doc("Std of the normal weight init (GPT-2: 0.02).", 0.02, gt=0, lt=1)
    qk_norm: bool = doc("RMSNorm (a learned gain per head dimension) of each head's queries and keys before RoPE and "
                        "attention (Dehghani et al. 2023), which keeps attention logits bounded at high learning "
                        "rates; Qwen3's (a Llama-style model with it and no biases exports as Qwen3; no GPT-2 "
                        "equivalent).", False)
    zero_init_proj: bool = doc("Initialise attn.proj and mlp.proj, the projections into the residual stream, to zero "
                               "so each block starts as the identity (the nanoGPT speedrun); false: GPT-2's "
                               "N(0, init_std/sqrt(2*n_layer)). Only the init: HF export is unaffected.", False)
    logit_softcap: float = doc("Soft cap of the output logits: cap * tanh(logits / cap) (Gemma 2; the nanoGPT "
                               "speedrun); 0 = off. No GPT-2/Llama equivalent (HF export refuses it).", 0.0, ge=0,
                               lt=math.inf)
    causal: bool = doc("true: a GPT-style decoder, each position sees only earlier ones (generates text); false: a "
                       "BERT-style encoder, every position sees the whole text (train.objective: mlm; fill-mask, "
                       "classification; no generation).", True)
    head: Literal["lm", "classify"] = doc("Output: lm gives token logits at every position (the next token; an "
                                          "encoder's: the masked one); classify gives num_labels class logits from "
                                          "the last real token's hidden state (an encoder's: the first, its start "
                                          "token).", "lm")
    num_labels: Optional[int] = doc("Classes of the classify head, taken from the prepared task data; 1: a reward "
                                    "model's one score (train.objective reward).", None, ge=1, le=MAX_SIZE)

    def __post_init__(self) -> None:
        validate(self, "model")
        _check((self.head == "classify") == (self.num_labels is not None), "model.num_labels", self.num_labels,
               "a number of classes (1 or more) with head: classify, and null with head: lm")
        if self.n_kv_head is None:
            self.n_kv_head = self.n_head
        _check(0 < self.n_kv_head <= self.n_head and self.n_head % self.n_kv_head == 0,
               "model.n_kv_head", self.n_kv_head, f"a divisor of n_head={self.n_head}")
        if self.head_size is None:
            _check(self.n_embd % self.n_head == 0, "model.n_embd", self.n_embd,
                   f"a multiple of n_head={self.n_head} (or set model.head_size)")
        if self.rope_scaling == "llama3":
            _check(self.rope_high_freq_factor > self.rope_low_freq_factor, "model.rope_high_freq_factor",
                   self.rope_high_freq_factor, f"above rope_low_freq_factor={self.rope_low_freq_factor}")
        if self.pos_encoding == "rope":
            _check(self.head_dim % 2 == 0, "model.head_size" if self.head_size else "model.n_embd",
                   self.head_size or self.n_embd, "an even head width (n_embd/n_head, or head_size) for rope")

    @property
    def head_dim(self) -> int:
        """Each attention head's width: head_size, else n_embd / n_head."""
        return self.head_size if self.head_size is not None else self.n_embd // self.n_head

    @property
    def hidden_dim(self) -> int:
        """MLP hidden width: explicit, else 4*C for GELU and ReLU^2, else (SwiGLU) 8/3*C rounded up to a multiple
        of 64."""
        if self.mlp_hidden is not None:
            return self.mlp_hidden
        if self.mlp != "swiglu":
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
    sampling: Literal["random", "sequential"] = doc("Batches: random windows, or consecutive windows (sequential, "
                                                    "wraps around).", "random")
    embedding_init: str = doc("Token embedding init: none, word2vec, or GloVe vectors from the file PATH.", "none",
                              pattern=r"none|word2vec|glove:.+", forms=("none", "word2vec", "glove:PATH"))
    packing: bool = doc("sft task data: pack several whole examples into each row of block_size tokens (each one "
                        "attends only to itself) instead of one padded example per row: less padding, more examples "
                        "per step.", False)

    def __post_init__(self) -> None:
        validate(self, "data")


# --------------------------------------------------------------------------------------------- optim
@dataclass
class OptimConfig:
    """The optimizer (AdamW, or Muon with AdamW) and the learning-rate schedule."""

    name: Literal["adamw", "muon"] = doc("Optimizer: adamw trains every weight with AdamW; muon trains the blocks' "
                                         "hidden matrices (attn.qkv, attn.proj, mlp.fc, mlp.proj) with Muon "
                                         "(orthogonalised momentum; Jordan et al. 2024) and the rest (embeddings, "
                                         "norms, biases, the head) with AdamW (lr, betas, weight_decay). Not with "
                                         "LoRA.", "adamw")
    lr: float = doc("Peak learning rate.", 1e-3, gt=0, lt=10)
    min_lr: float = doc("Learning rate at the end of the schedule (cosine, wsd); at most lr.", 1e-4, ge=0)
    weight_decay: float = doc("AdamW weight decay (not applied to norms, biases and embeddings).", 0.1, ge=0, lt=10)
    beta1: float = doc("AdamW beta1.", 0.9, ge=0, lt=1)
    beta2: float = doc("AdamW beta2.", 0.99, ge=0, lt=1)
    eps: float = doc("AdamW epsilon.", 1e-8, gt=0, lt=1)
    grad_clip: float = doc("Clip the global gradient norm to this value; 0 disables clipping.", 1.0, ge=0)
    schedule: Literal["cosine", "wsd", "constant"] = doc("LR schedule after the warm-up: cosine decay, wsd (stable, "
                                                         "then a final decay), or constant.", "cosine")
    warmup_steps: int = doc("Linear warm-up steps.", 100, ge=0)
    decay_fraction: float = doc("wsd: fraction of the steps spent in the final decay.", 0.2, ge=0, le=1)
    muon_lr: float = doc("name muon: Muon's peak learning rate; it follows lr's warm-up and schedule (scaled by "
                         "muon_lr/lr).", 0.02, gt=0, lt=10)
    muon_momentum: float = doc("name muon: Muon's momentum (Nesterov).", 0.95, ge=0, lt=1)
    muon_weight_decay: float = doc("name muon: Muon's decoupled weight decay (each step multiplies the hidden "
                                   "matrices by 1 - lr * muon_weight_decay).", 0.0, ge=0, lt=10)
    muon_adjust_lr: Literal["original", "match_rms_adamw"] = doc(
        "name muon: per-matrix scale of Muon's lr: original multiplies by sqrt(max(1, rows/cols)) (Jordan); "
        "match_rms_adamw by 0.2 * sqrt(max(rows, cols)), so AdamW's lr and weight decay carry over (Liu et al. "
        "2025, Moonlight).", "original")
    muon_ns_steps: int = doc("name muon: Newton-Schulz iterations per step (5 in Jordan's Muon and torch's; each one "
                             "costs 3 products per hidden matrix).", 5, ge=1, le=20)
    muon_ns_dtype: Literal["auto", "bf16", "fp32"] = doc(
        "name muon: precision of Muon's Newton-Schulz iteration: bf16 (as torch.optim.Muon), fp32, or auto: bf16 "
        "where the device has bf16 matrix hardware (a CUDA GPU, a CPU with AMX or AVX512-BF16), fp32 elsewhere "
        "(an AVX2-only CPU runs bf16 products 28-93x slower than fp32).", "auto")

    def __post_init__(self) -> None:
        validate(self, "optim")
        _check(self.min_lr <= self.lr, "optim.min_lr", self.min_lr, f"between 0 and lr={self.lr}")


# --------------------------------------------------------------------------------------------- train
BestMetric = Literal["val_loss", "val_accuracy", "val_macro_f1", "val_bleu", "val_chrf", "val_rouge1", "val_rouge2",
                     "val_rougeL", "val_exact_match", "val_f1", "val_choices_acc", "val_choices_acc_norm",
                     "val_reward_accuracy", "val_reward_margin", "val_online_reward"]


@dataclass
class TrainConfig:
    """The training loop: steps, batches, evaluation, checkpoints, device."""

    run_dir: str = doc("Directory for checkpoints, logs and plots.", "runs/default")
    max_steps: int = doc("Optimizer steps to train for.", 2000, ge=1)
    batch_size: int = doc("Sequences per micro-batch on each process.", 12, ge=1, le=65536)
    grad_accum: int = doc("Micro-batches accumulated per optimizer step (global batch = batch_size*grad_accum*world).",
                          1, ge=1, le=65536)
    eval_interval: int = doc("Evaluate on the validation batches every N steps (0: only at the end).", 250, ge=0)
    eval_batches: int = doc("Number of fixed validation batches per evaluation.", 20, ge=1)
    log_interval: int = doc("Log train metrics every N steps.", 10, ge=0)
    save_interval: int = doc("Save a checkpoint every N steps (0: only at the end).", 500, ge=0)
    keep_last: int = doc("Keep the newest K checkpoints (the best by train.best_metric is kept too).", 2, ge=1)
    plot: bool = doc("Draw RUN_DIR/loss.png when the run ends (matplotlib, a second or two; `lmforge plot RUN_DIR` "
                     "draws it any time): false for many short runs.", True)
    seed: int = doc("Seed for initialisation, data order and dropout.", 1337)
    device: str = doc("Device to train on; auto = cuda, then mps, then cpu.", "auto",
                      pattern=r"auto|cpu|cuda|mps|cuda:.*", forms=("auto", "cpu", "cuda", "cuda:N", "mps"))
    precision: Literal["fp32", "bf16-mixed", "bf16-compute"] = doc(
        "fp32; bf16-mixed: autocast, matrix products in bfloat16, the rest in fp32; bf16-compute: the whole forward "
        "and backward in bfloat16 on a bf16 copy of the weights made each step (weights, gradients, optimizer state "
        "and checkpoints stay fp32); faster than bf16-mixed where the CPU has bf16 matrix units (AMX).", "fp32")
    compile: bool = doc("torch.compile the model.", False)
    activation_checkpointing: bool = doc("Keep only each block's input during the forward pass and recompute the "
                                         "rest in the backward pass: the same gradients, far less activation memory, "
                                         "about a third more compute. Not with precision bf16-compute.", False)
    loss_chunk: int = doc("Tokens per chunk of the LM head fused with its cross-entropy: training computes the loss "
                          "and its gradients a chunk at a time, so the batch's logits (tokens x vocabulary) never "
                          "exist whole; the same loss and gradients. Smaller: less memory, more (smaller) matrix "
                          "products. 0: the head makes every logit, then the loss.",
                          1024, ge=0, le=1048576)
    parallel: Literal["ddp", "fsdp"] = doc("Under torchrun: ddp (every process holds the whole model and optimizer) "
                                           "or fsdp (FSDP2: each holds 1/N of every weight, gradient and optimizer "
                                           "moment, for a model that does not fit one device). One process: no "
                                           "difference.", "ddp")
    fsdp_cpu_offload: bool = doc("parallel fsdp: keep the weight shards and the optimizer step in host memory "
                                 "(CPUOffloadPolicy), for a model too big for the GPUs even sharded.", False)
    checkpoint_format: Literal["full", "sharded"] = doc(
        "full: each checkpoint is gathered whole to rank 0 and written as model.safetensors and "
        "optimizer.safetensors (the host of rank 0 must hold the whole state); sharded (parallel fsdp only): each "
        "process writes its own rows of every weight and optimizer moment (model-rankR-of-N.safetensors, "
        "optim-rankR-of-N.safetensors) and shards.json says which rows each holds, so no process ever holds the "
        "whole model. Either resumes into any number of processes; eval, generate, export and serve read both.",
        "full")
    resume: str = doc("none | auto (newest complete checkpoint in run_dir) | PATH to a checkpoint.", "none")
    init_from: str = doc("none | PATH of a checkpoint or run (e.g. from `lmforge import`) whose model and weights "
                         "a new run starts from; optimizer, step and data start fresh, model.* comes from it (and "
                         "lora.* from a LoRA run, whose adapters train on).", "none")
    num_threads: int = doc("CPU threads for torch; 0 = torch's default.", 0, ge=0)
    nonfinite: Literal["stop", "skip"] = doc("On a NaN/Inf loss or gradient (the weights are never updated by it): "
                                             "stop writes RUN_DIR/nonfinite-step-N.json and exits with code 3, skip "
                                             "skips the step and counts it in the logs.", "stop")
    spike_zscore: float = doc("Skip a step whose loss lies more than this many standard deviations above the mean "
                              "of the last spike_window steps; 0 = off.", 0.0, ge=0, lt=math.inf,
                              invalid="0 (off) or a positive number of standard deviations, e.g. 6")
    spike_window: int = doc("Steps of loss history that spike_zscore compares against.", 100, ge=2, le=100_000)
    dist_timeout: float = doc("Seconds a process waits for the others (gloo/nccl timeout) before it gives up; "
                              "raise it if saving a checkpoint takes longer.", 60.0, gt=0, lt=math.inf,
                              noun="number of seconds")
    allow_data_change: bool = doc("Resume even if the prepared data's manifest differs from the one the "
                                  "checkpoint was trained on.", False)
    class_weights: Literal["none", "balanced"] = doc("Classify data: weigh each example's loss by its class, none "
                                                     "(1) or balanced (n / (K * n_k) from the train split's counts).",
                                                     "none")
    objective: Literal["clm", "mlm", "reward"] = doc(
        "Training objective: clm predicts each next token (a decoder, model.causal true); mlm predicts masked tokens "
        "from both sides, as BERT (an encoder, model.causal false; token data prepared with --mask-token); reward "
        "trains a reward model on preference pairs (`lmforge prepare --task preference`): a scalar head on each "
        "example's last token, the chosen completion's reward pushed above the rejected one's (Bradley-Terry: "
        "-log sigmoid(r_chosen - r_rejected), as InstructGPT and TRL's RewardTrainer).", "clm")
    mlm_probability: float = doc("mlm: the fraction of positions chosen for prediction (of those 80% become the "
                                 "mask token, 10% a random token, 10% stay).", 0.15, gt=0, lt=1, noun="probability")
    early_exit_layer: Optional[int] = doc(
        "LayerSkip's early-exit loss (Elhoushi et al. 2024): also train the model's first N layers, read by its final "
        "norm and head, to predict the next token, adding early_exit_weight times their loss, as the draft of "
        "self-speculative decoding (generate --assistant-early-exit N); on a small char model it cost quality and "
        "bought no speed (README). The logged loss stays the whole model's; evaluations add val_early_exit_loss. "
        "null = off.", None, ge=1)
    early_exit_weight: float = doc("With early_exit_layer: the weight of the early exit's loss in the loss trained "
                                   "on.", 0.2, gt=0, le=10)
    task_eval_every: int = doc("sft task data: every N evaluations (and at the end), generate greedily for the first "
                               "task_eval_examples val examples and log BLEU, chrF, ROUGE, exact match and token F1 as "
                               "val_bleu, val_chrf, ...; 0 = never.", 0, ge=0)
    task_eval_examples: int = doc("Val examples the task metrics of task_eval_every are computed on (the same ones "
                                  "each time).", 64, ge=1, le=100_000)
    choices_file: Optional[str] = doc("Multiple-choice questions ({context, choices, answer} records in .jsonl or "
                                      ".parquet, as `lmforge eval --choices` reads them) scored zero-shot at every "
                                      "choices_every-th evaluation and at the end, logged as val_choices_acc and "
                                      "val_choices_acc_norm (HellaSwag during pretraining, as nanoGPT-style runs do); "
                                      "null = none.", None)
    choices_every: int = doc("With choices_file: score the questions at every N-th evaluation (and at the end).", 1,
                             ge=1)
    choices_examples: int = doc("With choices_file: score its first N questions (the same ones each time).", 1000,
                                ge=1, le=1_000_000)
    preference_loss: Literal["dpo", "robust", "hinge", "ipo", "dpo_norm", "exo", "nca", "bco", "sppo_hard",
                             "apo_zero", "apo_down", "simpo", "orpo", "kto", "apo_zero_unpaired", "bco_unpaired",
                             "grpo"] = doc(
        "Preference data (`lmforge prepare --task preference`): the loss. dpo (Direct Preference Optimization), "
        "robust (DPO unbiased under dpo_label_smoothing's label noise), hinge (SLiC) and ipo (IPO: per-token "
        "log-ratios held at a margin of 1/(2 beta)), and TRL's dpo_norm (DPO on per-token log-ratios), exo (EXO, "
        "needs dpo_label_smoothing > 0), nca, bco (paired), sppo_hard, apo_zero and apo_down train against the "
        "frozen train.init_from model; simpo (SimPO: "
        "per-token log-probabilities with a target margin simpo_gamma) and orpo (ORPO: next-token loss on the "
        "chosen completion plus beta times an odds-ratio term) need no reference model: less memory, a quarter less "
        "compute per step. Unpaired preference data (`lmforge prepare --task unpaired`: completions labelled "
        "desirable or not) trains with kto (KTO, against a KL reference point), apo_zero_unpaired or bco_unpaired "
        "(BCO: a classifier of the two kinds on the reward, around its running mean). grpo (GRPO, "
        "DeepSeekMath's) is online reinforcement learning with online_reward_model and/or online_reward_function: "
        "grpo_group_size samples of each prompt, each trained on its reward against its group's (the grpo_* keys; "
        "preference or sft data: only their prompts are used).", "dpo")
    dpo_beta: float = doc("Preference data: beta, how strongly the loss holds the model near its reference (the "
                          "implicit reward is beta times the log-probability ratio; TRL's default 0.1); IPO's "
                          "regularisation tau, SimPO's reward scale, ORPO's weight lambda of its odds-ratio term.",
                          0.1, gt=0, le=100)
    dpo_label_smoothing: float = doc("Preference data (dpo, robust, exo, simpo): the probability that a pair's "
                                     "preference is wrong (conservative DPO; 0 = plain DPO; exo needs it above 0).",
                                     0.0, ge=0, lt=0.5,
                                     noun="probability")
    simpo_gamma: float = doc("Preference data with preference_loss simpo: gamma, the reward margin SimPO aims for "
                             "(TRL's default 0.5).", 0.5, ge=0, le=100)
    preference_nll_weight: float = doc("Preference data: alpha, the weight of a next-token term on each pair's chosen "
                                       "completion added to the loss (its mean negative log-probability per token: "
                                       "RPO, DPO + NLL as in Llama 3's post-training; TRL's sft loss type beside "
                                       "another); 0 = none. Not with orpo, which has its own.", 0.0, ge=0, le=100)
    kto_desirable_weight: float = doc("Unpaired preference data: lambda_D, the weight of a desirable completion's "
                                      "loss (KTO's paper: keep lambda_D x desirable count / (lambda_U x undesirable "
                                      "count) between 1 and 4/3).", 1.0, gt=0, le=100)
    kto_undesirable_weight: float = doc("Unpaired preference data: lambda_U, the weight of an undesirable completion's "
                                        "loss.", 1.0, gt=0, le=100)
    reward_center_coefficient: float = doc("Reward model (objective reward): adds this times the mean of (r_chosen + "
                                           "r_rejected)^2 over the pairs to the loss, which keeps the rewards centred "
                                           "on 0 (Eisenstein et al. 2023; TRL's center_rewards_coefficient, suggested "
                                           "0.01); 0 = off.", 0.0, ge=0, le=100)
    distill_from: Optional[str] = doc(
        "Knowledge distillation: a teacher's run or checkpoint directory (a language model with this data's "
        "tokenizer, any size). The teacher reads every batch too, and the model (the student) learns the teacher's "
        "next-token distribution at each trained position: the loss is distill_alpha times its divergence "
        "(distill_beta) plus 1 - distill_alpha times the cross-entropy of the data's tokens; the log carries both "
        "(distill_divergence, lm_loss), validation the divergence (val_distill_divergence) beside val_loss, the "
        "model's own cross-entropy. Token data or sft data (the completion's positions). null = off.", None)
    distill_alpha: float = doc("Knowledge distillation: the divergence's weight; the data's cross-entropy gets "
                               "1 - alpha (Hinton et al. 2015's mixture; 1 = the teacher alone, TRL's).", 1.0, ge=0,
                               le=1)
    distill_beta: float = doc("Knowledge distillation: 0 = forward KL(teacher || student) (mode-covering; Hinton's), "
                              "1 = reverse KL(student || teacher) (mode-seeking; MiniLLM), between = the generalized "
                              "Jensen-Shannon divergence of GKD (Agarwal et al. 2024) with the mixture beta teacher + "
                              "(1 - beta) student (TRL's beta).", 0.0, ge=0, le=1)
    distill_on_policy: float = doc("Knowledge distillation on sft data: the share of micro-batches whose completions "
                                   "are the student's own samples of the data's prompts (online_max_new_tokens, "
                                   "online_temperature), drawn anew each step and scored by the teacher token by "
                                   "token (GKD's lambda; 1 = on-policy distillation, TRL's DistillationTrainer); 0 = "
                                   "the data's completions.", 0.0, ge=0, le=1)
    distill_temperature: float = doc("Knowledge distillation: both models' logits are divided by T before their "
                                     "divergence (T > 1 shows the student more of the teacher's unlikely tokens); "
                                     "not multiplied by T^2 (TRL's), so a high T also shrinks the gradient.", 1.0,
                                     gt=0, le=100)
    online_reward_model: Optional[str] = doc(
        "Online preference training (online DPO, Guo et al. 2024): a reward model's run or checkpoint directory "
        "(train.objective reward, the same tokenizer). At every step the model samples two completions of each "
        "prompt of the batch's pairs, the reward model ranks them, and the preference loss trains on those pairs "
        "instead of the data's (validation stays on the data's pairs, and adds val_online_reward: the mean reward "
        "of two samples of each val prompt, drawn with one fixed seed); the log carries the samples' mean reward. "
        "With preference_loss grpo: grpo_group_size samples of each prompt, scored (GRPO). "
        "null = off (the data's pairs).", None)
    online_reward_function: Optional[str] = doc(
        "Online preference training and GRPO: a Python function that scores the samples, FILE.py:NAME or "
        "package.module:NAME, called as NAME(prompts, completions, references) with three lists of str (the prompt "
        "as the model reads it, template included; the sample; the data's own completion of that prompt: an sft "
        "example's answer, or a pair's chosen one) and returning one float per sample (rule-based rewards: a right "
        "answer, a format; TRL's reward_funcs). Several, comma-separated, add up; with online_reward_model too, "
        "its reward is added. null = none.",
        None)
    online_reward_weights: Optional[str] = doc(
        "Online preference training and GRPO: comma-separated weights of the judges' rewards, one per reward function "
        "in online_reward_function's order, then one for online_reward_model when set (TRL's reward_weights); the "
        "reward is their weighted sum (the log's online_reward/NAME stay each judge's own). null = each weighs 1.",
        None)
    online_max_new_tokens: int = doc("Online training (online DPO, GRPO, on-policy distillation): the longest "
                                     "sampled completion, in tokens.", 64,
                                     ge=1, le=MAX_SIZE)
    online_temperature: float = doc("Online training (online DPO, GRPO, on-policy distillation): the sampling "
                                    "temperature (GRPO's log-probabilities are of the same tempered distribution).",
                                    1.0, gt=0, le=100)
    grpo_group_size: int = doc("preference_loss grpo: G, the completions sampled of each prompt at every step (TRL's "
                               "num_generations); each is trained on its reward against the other G - 1's.", 4, ge=2,
                               le=256)
    grpo_beta: float = doc("preference_loss grpo: the weight of the KL divergence from the train.init_from model "
                           "(a frozen reference); 0 = none, and no reference is kept (TRL's default; DeepSeekMath "
                           "used 0.04).", 0.0, ge=0, le=100)
    grpo_loss_type: Literal["dapo", "grpo", "dr_grpo"] = doc(
        "preference_loss grpo: what the tokens' summed losses are divided by: dapo (the batch's completion tokens; "
        "TRL's default), grpo (each completion's length, then the completions: favours short right answers and "
        "long wrong ones) or dr_grpo (max_new_tokens times the completions).", "dapo")
    grpo_scale_rewards: Literal["group", "batch", "none"] = doc(
        "preference_loss grpo: group divides each advantage (reward minus its group's mean) by its group's standard "
        "deviation (GRPO); batch by the standard deviation of all the step's rewards, every micro-batch and process "
        "(PPO-Lite; TRL's batch); none does not divide (Dr. GRPO: no bias towards groups the model finds easy or "
        "hard).", "group")
    grpo_mask_truncated: bool = doc("preference_loss grpo: a sample that ran out of tokens (online_max_new_tokens, no "
                                    "end token) trains nothing (DAPO's overlong filtering; TRL's "
                                    "mask_truncated_completions); its reward still counts in its group's advantages.",
                                    False)
    grpo_iterations: int = doc("preference_loss grpo: the optimizer steps each generation of samples trains (mu, "
                               "DeepSeekMath's; TRL's num_iterations): the samples, their advantages and their "
                               "log-probabilities at sampling time are kept, and every step after the first weighs "
                               "each token by pi / pi_old, clipped to [1 - grpo_epsilon, 1 + grpo_epsilon_high] (PPO's "
                               "clip). New prompts are read only when new samples are drawn.", 1, ge=1, le=64)
    grpo_epsilon: float = doc("preference_loss grpo with grpo_iterations > 1: eps_low, the clip range's lower side.",
                              0.2, gt=0, lt=1)
    grpo_epsilon_high: Optional[float] = doc("preference_loss grpo with grpo_iterations > 1: eps_high, the upper "
                                             "side; null = grpo_epsilon (DAPO's clip-higher used 0.28).", None, gt=0,
                                             le=10)
    grpo_delta: Optional[float] = doc("preference_loss grpo with grpo_iterations > 1: two-sided clipping (TRL's "
                                      "delta): the ratio is also capped at delta where the advantage is negative; "
                                      "null = no cap.", None, gt=1, le=100)
    grpo_importance_sampling: Literal["token", "sequence"] = doc(
        "preference_loss grpo with grpo_iterations > 1: token weighs each token by its own ratio (GRPO), sequence each "
        "completion by exp of its tokens' mean log-ratio (GSPO, Zheng et al. 2025; it used much smaller epsilons, "
        "e.g. 3e-4 and 4e-4).", "token")
    grpo_objective: Literal["clip", "cispo", "sapo"] = doc(
        "preference_loss grpo with grpo_iterations > 1: how a token's ratio w = pi / pi_old weighs it: clip (PPO's "
        "clip, the grpo_epsilon* and grpo_delta keys), cispo (CISPO, MiniMax-M1: the gradient of log pi times A and "
        "min(w, 1 + grpo_epsilon_high) held constant, so a clipped token still learns; ScaleRL used a cap of 5, "
        "grpo_epsilon_high 4) or sapo (SAPO: a soft gate 4 / tau sigmoid(tau (w - 1)), the grpo_sapo_tau_* keys).",
        "clip")
    grpo_sapo_tau_pos: float = doc("grpo_objective sapo: the gate's temperature tau for tokens of a completion with a "
                                   "positive advantage (the paper's and TRL's 1.0).", 1.0, gt=0, le=100)
    grpo_sapo_tau_neg: float = doc("grpo_objective sapo: tau for the others (1.05: negative advantages' gate "
                                   "closes faster).", 1.05, gt=0, le=100)
    grpo_top_entropy: float = doc("preference_loss grpo: rho, the share of completion tokens that train: only the "
                                  "tokens whose entropy (of the policy's next-token distribution) is in the top rho "
                                  "of their micro-batch's, on all processes (\"Beyond the 80/20 rule\", Wang et al. "
                                  "2025, trained the top 0.2; TRL's top_entropy_quantile); 1 = all.", 1.0, ge=0, le=1)
    precompute_reference: bool = doc("Preference data with a reference loss (all but simpo and orpo): score every "
                                     "train and val completion with the frozen reference once, before the first "
                                     "step, instead of at every step (TRL's precompute_ref_log_probs). Full "
                                     "fine-tuning then keeps no frozen copy of the model (a model's weights less "
                                     "memory) and each step skips the reference's forward pass (about a quarter of "
                                     "its compute); the scoring costs one forward pass over the data, once: the "
                                     "scores are kept in RUN_DIR/reference_logps.safetensors and a resume reads "
                                     "them back (when base, data and settings are unchanged; else it scores again). "
                                     "Unpaired data (KTO): each example's mismatched row is fixed, as a sequential "
                                     "stream's batches pair them (TRL's KTO fixes them too), and scored with it.",
                                     False)
    best_metric: BestMetric = doc("The measurement that picks the best checkpoint (kept by pruning, named at the end) "
                                  "and that patience follows: val_loss (lower is better), or a task metric (higher is "
                                  "better): val_accuracy, val_macro_f1 (classify data), val_bleu, val_chrf, val_rouge1, "
                                  "val_rouge2, val_rougeL, val_exact_match, val_f1 (sft data with task_eval_every), "
                                  "val_choices_acc, val_choices_acc_norm (with choices_file), val_reward_accuracy, "
                                  "val_reward_margin (preference data, and a reward model's), val_online_reward (with "
                                  "online_reward_model).", "val_loss")
    patience: int = doc("Stop early, with a checkpoint, after this many measurements of best_metric in a row without "
                        "an improvement; 0 = never.", 0, ge=0)

    def __post_init__(self) -> None:
        validate(self, "train")
        if self.distill_from is None and (self.distill_alpha != 1.0 or self.distill_beta != 0.0
                                          or self.distill_temperature != 1.0 or self.distill_on_policy):
            raise ConfigError("train.distill_alpha / distill_beta / distill_temperature / distill_on_policy set "
                              "knowledge distillation, "
                              "which needs a teacher: set train.distill_from to its run directory, or drop them")
        if self.distill_on_policy and self.distill_alpha < 1.0:
            raise ConfigError("train.distill_alpha below 1 trains the cross-entropy of the batch's tokens, which "
                              "train.distill_on_policy makes the student's own samples: drop one of them")
        if self.distill_from is not None and (self.objective != "clm" or self.online):
            raise ConfigError("train.distill_from teaches a language model the teacher's next-token distribution, and "
                              + (f"train.objective is {self.objective}" if self.objective != "clm" else
                                 "online training learns from its own samples' rewards")
                              + ": drop train.distill_from, or train with objective clm on token or sft data")
        if self.preference_loss == "exo" and self.dpo_label_smoothing == 0:
            raise ConfigError("train.preference_loss exo is the KL divergence from a smoothed label: set "
                              "train.dpo_label_smoothing above 0 (the paper's 0.001)")
        if not self.online and not self.distill_on_policy and (self.online_max_new_tokens != 64
                                                               or self.online_temperature != 1.0):
            raise ConfigError("train.online_max_new_tokens / online_temperature set the sampling of online preference "
                              "training, which needs train.online_reward_model (or online_reward_function), or of "
                              "on-policy distillation (train.distill_on_policy): set one, or drop them")
        sapo_set = self.grpo_sapo_tau_pos != 1.0 or self.grpo_sapo_tau_neg != 1.05
        clip_set = (self.grpo_epsilon != 0.2 or self.grpo_epsilon_high is not None or self.grpo_delta is not None
                    or self.grpo_importance_sampling != "token" or self.grpo_objective != "clip" or sapo_set)
        grpo_set = (self.grpo_group_size != 4 or self.grpo_beta != 0.0 or self.grpo_loss_type != "dapo"
                    or self.grpo_scale_rewards != "group" or self.grpo_mask_truncated or self.grpo_iterations != 1
                    or self.grpo_top_entropy != 1.0 or clip_set)
        if grpo_set and self.preference_loss != "grpo":
            raise ConfigError("train.grpo_group_size / grpo_beta / grpo_loss_type / grpo_scale_rewards / "
                              "grpo_mask_truncated / grpo_iterations / grpo_epsilon* / grpo_delta / "
                              "grpo_importance_sampling / grpo_objective / grpo_sapo_tau_* / grpo_top_entropy set "
                              f"GRPO, and train.preference_loss is {self.preference_loss}: drop them, or set "
                              "train.preference_loss grpo")
        if clip_set and self.grpo_iterations == 1:
            raise ConfigError("train.grpo_epsilon / grpo_epsilon_high / grpo_delta / grpo_importance_sampling / "
                              "grpo_objective / grpo_sapo_tau_* shape the ratio pi / pi_old, which is 1 when each "
                              "generation trains one step: set train.grpo_iterations above 1, or drop them")
        unused = {"clip": ["grpo_sapo_tau_*"] if sapo_set else [],
                  "cispo": [name for name, is_set in (("grpo_epsilon", self.grpo_epsilon != 0.2),
                                                      ("grpo_delta", self.grpo_delta is not None),
                                                      ("grpo_sapo_tau_*", sapo_set)) if is_set],
                  "sapo": [name for name, is_set in (("grpo_epsilon", self.grpo_epsilon != 0.2),
                                                     ("grpo_epsilon_high", self.grpo_epsilon_high is not None),
                                                     ("grpo_delta", self.grpo_delta is not None)) if is_set]
                  }[self.grpo_objective]
        if unused:
            raise ConfigError(f"train.{' / '.join(unused)} {'is' if len(unused) == 1 else 'are'} not read by "
                              f"train.grpo_objective {self.grpo_objective}: drop {'it' if len(unused) == 1 else 'them'}"
                              ", or choose the objective that reads them (grpo_sapo_tau_*: sapo; grpo_epsilon and "
                              "grpo_delta: clip)")
        if self.preference_loss == "grpo" and not self.online:
            raise ConfigError("train.preference_loss grpo learns from the rewards of the model's own samples: set "
                              "train.online_reward_model to a reward model's run (`lmforge train --train.objective "
                              "reward`) or train.online_reward_function to a Python function FILE.py:NAME")
        if self.online_reward_weights is not None:
            judges = (len(self.online_reward_function.split(",")) if self.online_reward_function is not None else 0) \
                + (self.online_reward_model is not None)
            if not self.online:
                raise ConfigError("train.online_reward_weights weighs the rewards of online training's judges, and "
                                  "there are none: set train.online_reward_function or online_reward_model, or drop it")
            if len(self.reward_weights) != judges:
                raise ConfigError(f"train.online_reward_weights has {len(self.reward_weights)} weight(s) for {judges} "
                                  "judge(s): give one per reward function, in train.online_reward_function's order, "
                                  "then one for train.online_reward_model when it is set")
        pair_settings = (self.dpo_beta != 0.1 or self.preference_nll_weight or self.kto_desirable_weight != 1.0
                         or self.kto_undesirable_weight != 1.0)
        if self.preference_loss == "grpo" and pair_settings:
            raise ConfigError("train.dpo_beta / preference_nll_weight / kto_*_weight belong to the pair and unpaired "
                              "losses, and GRPO's KL weight is train.grpo_beta: drop them")
        if self.preference_loss == "orpo" and self.preference_nll_weight:
            raise ConfigError("train.preference_nll_weight adds a next-token term on the chosen completion, and "
                              "train.preference_loss orpo has its own: drop it")

    @property
    def reward_weights(self) -> list[float]:
        """online_reward_weights as numbers (ConfigError if any is not a finite number); [] when unset."""
        if self.online_reward_weights is None:
            return []
        try:
            weights = [float(w) for w in self.online_reward_weights.split(",")]
        except ValueError:
            weights = [math.nan]
        if not all(math.isfinite(w) for w in weights):
            raise ConfigError(f"train.online_reward_weights {self.online_reward_weights!r} must be comma-separated "
                              "finite numbers, e.g. 1,0.5")
        return weights

    @property
    def online(self) -> bool:
        """Online preference training (or GRPO): the model's own samples, scored by a reward model or function."""
        return self.online_reward_model is not None or self.online_reward_function is not None


# ---------------------------------------------------------------------------------------------- lora
LoRATarget = Literal["q", "k", "v", "o", "mlp", "head", "emb"]
LoRAInit = Literal["default", "pissa", "olora", "loftq"]
LoRAQuantize = Literal["nf4"]


@dataclass
class LoRAConfig:
    """Low-rank adapters on a frozen model: which Linear layers, their rank and scale (lmforge.lora).

    In a RunConfig the section is off (null) by default: a `lora:` section, or any --lora.KEY on the command
    line, trains adapters on the train.init_from model instead of every weight."""

    r: int = doc("Rank of each adapter (A is r x in, B is out x r).", 8, ge=1)
    alpha: float = doc("Scale numerator: an adapter's output is multiplied by alpha / r (alpha / sqrt(r) "
                       "with rslora).", 16.0, gt=0, lt=math.inf)
    dropout: float = doc("Dropout on an adapter's input (the frozen path sees x unchanged).", 0.0, ge=0, lt=1,
                         noun="probability")
    targets: list[LoRATarget] = doc("What to adapt: q, k, v (slices of attn.qkv), o (attn.proj), mlp (mlp.fc and "
                                    "mlp.proj), head (lm_head, when untied), emb (the token embedding's table, "
                                    "peft's lora_embedding_A/B; a tied lm_head reads it adapted too).",
                                    default_factory=lambda: ["q", "v"])
    weight_decay: float = doc("AdamW weight decay of the adapters (optim.weight_decay applies to full training and "
                              "to a classification head).", 0.0, ge=0, lt=10)
    rslora: bool = doc("rsLoRA (Kalajdzievski 2023, peft's use_rslora): scale adapters by alpha / sqrt(r) instead "
                       "of alpha / r, so a high rank still learns.", False)
    lr_ratio: float = doc("LoRA+ (Hayou et al. 2024): the B matrices (and DoRA magnitudes) learn at optim.lr times "
                          "this, A at optim.lr; the paper suggests 16 (peft's loraplus_lr_ratio); 1 = plain LoRA.",
                          1.0, gt=0, le=1000)
    lr_embedding: Optional[float] = doc("LoRA+ for the token embedding's adapter (lora.targets emb): its A and B "
                                        "learn at this learning rate, on the schedule's shape (peft's "
                                        "loraplus_lr_embedding, 1e-6 by default there); null = like the other "
                                        "adapters (A at optim.lr, B at lr_ratio times it).", None, gt=0, le=10)
    init: LoRAInit = doc("How adapters start: default (A random, B = 0; Hu et al. "
                         "2021), pissa (Meng et al. 2024: A and B from each weight's top-r singular vectors, so "
                         "training moves its principal directions; the paper: converges faster than default), "
                         "olora (Buyukakyuz 2024: from its QR decomposition), as peft's init_lora_weights, the "
                         "model starting as its base with each; or loftq "
                         "(Li et al. 2023, with lora.quantize: A and B from the top-r singular vectors of what 4 "
                         "bits lose, W - Q(W), so the 4-bit base plus the adapters starts nearer the base in full "
                         "than the 4-bit base alone).", "default")
    loftq_iter: int = doc("LoftQ's alternating steps (peft's loftq_iter): each quantizes W less the adapters' "
                          "product and fits the adapters to what that loses again; 1 = quantize W once. With "
                          "lora.init loftq only.", 1, ge=1, le=32)
    pissa_niter: Optional[int] = doc("PiSSA's fast SVD (peft's init_lora_weights pissa_niter_K): each weight's top r "
                                     "directions by torch.svd_lowrank with this many subspace iterations (Halko et "
                                     "al. 2011) instead of the exact SVD, much faster on large weights; null = exact. "
                                     "With lora.init pissa only.", None, ge=0, le=64)
    quantize: Optional[LoRAQuantize] = doc(
        "QLoRA (Dettmers et al. 2023): the frozen base's block layers stored in 4-bit NormalFloat (nf4: "
        "bitsandbytes' NF4, blocks of 64) and dequantized as they compute, about a seventh of fp32's memory for "
        "them; the adapters train in full precision and the run computes with the quantized base (eval, generate, "
        "merge too). null = the base as it is.", None)
    double_quant: bool = doc("QLoRA's double quantization (bitsandbytes' bnb_4bit_use_double_quant): the 4-bit "
                             "layers' block maxima stored in 8 bits too, 0.516 bytes a weight instead of 0.5625. "
                             "With lora.quantize only.", False)
    dora: bool = doc("DoRA (Liu et al. 2024, peft's use_dora): each adapted row of a weight is split into a "
                     "magnitude, trained, and the direction of W + (alpha / r) B A (the paper: closer to full "
                     "fine-tuning at low ranks); each step a little slower.", False)

    def __post_init__(self) -> None:
        validate(self, "lora")
        if not self.targets:
            raise ConfigError(f"lora.targets is empty: name at least one of {', '.join(typing.get_args(LoRATarget))}")
        if self.dora and self.init != "default":
            raise ConfigError(f"lora.init={self.init} with lora.dora is not supported: DoRA's magnitudes start at the "
                              f"rows' norms; use lora.init default with DoRA, or drop lora.dora")
        if self.pissa_niter is not None and self.init != "pissa":
            raise ConfigError(f"lora.pissa_niter={self.pissa_niter} sets how PiSSA's SVD is computed, and lora.init is "
                              f"{self.init}: give lora.init pissa too, or drop lora.pissa_niter")
        if self.quantize is not None and self.init in ("pissa", "olora"):
            raise ConfigError(f"lora.init={self.init} with lora.quantize {self.quantize} is not supported: its start "
                              f"comes from the full-precision weight, which a 4-bit base no longer has; use lora.init "
                              f"default or loftq with lora.quantize, or drop lora.quantize")
        if self.init == "loftq" and self.quantize is None:
            raise ConfigError("lora.init=loftq fits the adapters to what the 4-bit base loses, and lora.quantize is "
                              "null (the base in full, nothing lost): set lora.quantize nf4 too, or use lora.init "
                              "default")
        if self.init == "loftq" and "head" in self.targets:
            raise ConfigError("lora.init=loftq fits adapters to 4-bit weights, and lora.targets has head, which "
                              "stays in full precision: drop head from lora.targets, or use lora.init default")
        if self.loftq_iter != 1 and self.init != "loftq":
            raise ConfigError(f"lora.loftq_iter={self.loftq_iter} sets LoftQ's alternating steps, and lora.init is "
                              f"{self.init}: give lora.init loftq too, or drop lora.loftq_iter")
        if self.double_quant and self.quantize is None:
            raise ConfigError("lora.double_quant stores the 4-bit base's block maxima in 8 bits, and lora.quantize is "
                              "null (the base in full): set lora.quantize nf4 too, or drop lora.double_quant")
        if self.lr_embedding is not None and "emb" not in self.targets:
            raise ConfigError(f"lora.lr_embedding={self.lr_embedding} sets the learning rate of the embedding's "
                              f"adapter, and lora.targets {','.join(self.targets)} has none: add emb to lora.targets, "
                              f"or drop lora.lr_embedding")
        if "emb" in self.targets and (self.dora or self.init != "default"):
            raise ConfigError(f"lora.targets has emb with {'lora.dora' if self.dora else f'lora.init={self.init}'}, "
                              f"which lmforge applies to Linear layers only: drop emb from lora.targets, or use plain "
                              f"LoRA (lora.init default, no dora)")
        repeated = sorted({t for t in self.targets if self.targets.count(t) > 1})
        if repeated:
            raise ConfigError(f"lora.targets={self.targets!r} names {', '.join(repeated)} more than once: "
                              f"list each once")

    @property
    def scale(self) -> float:
        """What an adapter's B A is multiplied by: alpha / r (rsLoRA: alpha / sqrt(r))."""
        return self.plain_alpha / self.r

    @property
    def plain_alpha(self) -> float:
        """The alpha plain LoRA gives the same scale with at rank r: alpha (rsLoRA: alpha sqrt(r))."""
        return self.alpha * math.sqrt(self.r) if self.rslora else self.alpha


@dataclass
class RunConfig:
    """Everything `lmforge train` needs. `preset` picks model defaults; model.* keys override them.
    `lora` is null for full training, a LoRAConfig to train adapters on the train.init_from model."""

    preset: Optional[str] = doc("Model preset, a name in PRESETS; null = model.* only.", None)
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    lora: Optional[LoRAConfig] = None

    def __post_init__(self) -> None:
        if self.lora is not None and self.optim.name == "muon":
            raise ConfigError("optim.name=muon is invalid with lora.*: Muon orthogonalises whole hidden matrices, a "
                              "LoRA run trains rank-r adapters; use optim.name adamw for LoRA, or drop the lora "
                              "settings to train every weight with Muon")
        if self.lora is not None and self.train.parallel == "fsdp":
            raise ConfigError("train.parallel=fsdp is not supported with lora.*: a LoRA run trains small adapters on a "
                              "frozen base; use train.parallel ddp (the default) for LoRA")
        if self.train.checkpoint_format == "sharded" and self.train.parallel != "fsdp":
            raise ConfigError("train.checkpoint_format=sharded writes each FSDP process's shard, but train.parallel is "
                              f"{self.train.parallel}: add --train.parallel fsdp, or use train.checkpoint_format full")
        if self.train.precision == "bf16-compute" and self.train.parallel == "fsdp":
            raise ConfigError("train.precision=bf16-compute is not supported with train.parallel=fsdp: FSDP's bf16-mixed "
                              "already computes on bf16 copies of the weights; use --train.precision bf16-mixed")
        if self.train.precision == "bf16-compute" and self.train.activation_checkpointing:
            raise ConfigError("train.precision=bf16-compute is not supported with train.activation_checkpointing: a "
                              "block recomputed in the backward pass would meet the float32 weights again; use "
                              "--train.precision bf16-mixed")
        exit_layer = self.train.early_exit_layer
        if exit_layer is not None and exit_layer >= self.model.n_layer:
            raise ConfigError(f"train.early_exit_layer={exit_layer} is not below model.n_layer={self.model.n_layer}: "
                              f"the early exit reads one of the first {self.model.n_layer - 1} layers")
        if exit_layer is not None and (self.model.head != "lm" or not self.model.causal):
            raise ConfigError("train.early_exit_layer trains a decoder's first layers to predict the next token, and "
                              "this model is " + ("a classifier (model.head classify)" if self.model.head != "lm" else
                                                  "an encoder (model.causal false)") + ": leave it out")
        if exit_layer is None and self.train.early_exit_weight != 0.2:
            raise ConfigError("train.early_exit_weight weighs the early exit's loss: set train.early_exit_layer N "
                              "too, or leave it out")
        if self.train.choices_file and self.train.parallel == "fsdp":
            raise ConfigError("train.choices_file scores questions on whole weights, and train.parallel=fsdp shards "
                              "them: use train.parallel ddp, or score a checkpoint with `lmforge eval --choices`")
        if self.train.distill_on_policy and self.data.packing:
            raise ConfigError("train.distill_on_policy samples a completion of each example's prompt, and data.packing "
                              "puts several examples in a row: drop data.packing")
        if self.train.distill_from is not None and (self.model.head != "lm" or exit_layer is not None):
            raise ConfigError("train.distill_from needs a language model's head (model.head lm) and no "
                              "train.early_exit_layer: drop one or the other")
        if self.train.distill_on_policy and self.train.parallel == "fsdp":
            raise ConfigError("train.distill_on_policy samples from the whole student, which FSDP shards over the "
                              "processes: use train.parallel ddp, or drop it")
        if self.train.fsdp_cpu_offload and self.train.parallel != "fsdp":
            raise ConfigError("train.fsdp_cpu_offload offloads FSDP's shards, but train.parallel is "
                              f"{self.train.parallel}: add --train.parallel fsdp, or drop it")
        if self.lora is not None and self.train.init_from == "none":
            raise ConfigError("lora.* is set but train.init_from is none: LoRA adapts a trained model; pass "
                              "--train.init_from RUN_OR_CHECKPOINT (e.g. one `lmforge import` wrote), or drop the "
                              "lora settings to train every weight")


def with_init_sections(config: RunConfig, init: RunConfig, source: str | Path) -> RunConfig:
    """`config` as a run started from the checkpoint `source` (train.init_from, whose config is `init`) trains it:
    with that checkpoint's model section, and when it is a LoRA run's, its lora section too: the new run trains
    those adapters on, on their base. lora.* of `config` may repeat the checkpoint's r, alpha and targets (and change
    dropout and weight_decay); other adapters on top of adapters are refused (merge the LoRA run first)."""
    if init.lora is None:
        return dataclasses.replace(config, model=init.model)
    ours, theirs = config.lora, init.lora
    if ours is None:
        return dataclasses.replace(config, model=init.model, lora=init.lora)
    shape = [(x.r, x.scale, sorted(x.targets), x.dora, x.init) for x in (ours, theirs)]
    if shape[0] != shape[1]:
        dora = [", dora" if x.dora else "" for x in (theirs, ours)]
        raise ConfigError(f"train.init_from {source} is a LoRA run with r={theirs.r}, alpha={theirs.alpha:g}, "
                          f"targets={','.join(theirs.targets)}{dora[0]}, and lora.* asks r={ours.r}, "
                          f"alpha={ours.alpha:g}, targets={','.join(ours.targets)}{dora[1]}: a run started from it "
                          f"trains its adapters on, so drop lora.r/alpha/targets/dora/init (dropout and weight_decay "
                          f"may change), or `lmforge merge` it and start new adapters from the merged checkpoint")
    return dataclasses.replace(config, model=init.model, lora=dataclasses.replace(theirs, dropout=ours.dropout,
                                                                                   weight_decay=ours.weight_decay))


SECTIONS = {"model": ModelConfig, "data": DataConfig, "optim": OptimConfig, "train": TrainConfig, "lora": LoRAConfig}
OPTIONAL_SECTIONS = ("lora",)  # null (absent) unless the config gives the section or one of its keys


# ----------------------------------------------------------------------------- loading and validation
def _closest(key: str, valid: Any) -> str:
    match = difflib.get_close_matches(key, list(valid), n=1, cutoff=0.5)
    return f" (did you mean {match[0]!r}?)" if match else ""


_BOOLS = {"true": True, "yes": True, "1": True, "false": False, "no": False, "0": False}


def _coerce_item(value: Any, shape: _Shape) -> Any:
    if isinstance(value, str):
        for choice in shape.choices:
            if value == _show(choice):
                return choice
        if bool in shape.kinds and value.lower() in _BOOLS:
            return _BOOLS[value.lower()]
        for kind in (int, float):
            if kind in shape.kinds:
                try:
                    return kind(value)
                except ValueError:
                    pass
    elif isinstance(value, (int, float)) and not isinstance(value, bool) and not shape.choices:
        if float in shape.kinds and int not in shape.kinds:
            return float(value) if abs(value) < 2 ** 1023 else math.inf if value > 0 else -math.inf  # as "1e999"
        if shape.kinds == (str,):
            return str(value)
    return value


def _coerce(value: Any, shape: _Shape) -> Any:
    """A value from the command line or a config file in the field's type, where the conversion is plain.

    Text becomes null (null, none: where Optional), a Literal choice, a bool (true/false, yes/no, 1/0), an
    int or a float; a number becomes a float or a str; a list item by item. A list takes text or a list of
    texts (a repeated flag); each text is split at commas ("1,2"), except in a list of strings, where it is
    one item (stop texts hold commas). Anything else comes back as given, for `validate` to refuse with the
    field's message.
    """
    if shape.optional and (value is None or (isinstance(value, str) and value.lower() in ("null", "none"))):
        return None
    if shape.keys is not None:
        return _coerce_mapping(value, shape)
    if not shape.is_list:
        return _coerce_item(value, shape)
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, (list, tuple)):
        return value
    if shape.nested:  # each text is one list: "5,6" or "5 6"
        return [[_coerce_item(x, shape) for x in (re.split(r"[\s,]+", v.strip()) if isinstance(v, str) else v)]
                if isinstance(v, (str, list, tuple)) else v for v in value]
    if str not in shape.kinds:  # "1,2" or a repeated flag, either way
        value = [part for v in value for part in (v.split(",") if isinstance(v, str) else [v])]
    return [_coerce_item(v, shape) for v in value]


def _coerce_mapping(value: Any, shape: _Shape) -> Any:
    """A dict field from a mapping (a JSON file's keys are text: "50256" becomes 50256), or from texts KEY:VALUE,
    separated by commas or given by repeated flags ("50256:-100,13:5"). A tuple key is written with its items
    separated by spaces ("10 45:-2.5" is {(10, 45): -2.5}). Text that is not KEY:VALUE comes back as given, for
    validate to refuse."""
    key_shape = shape._replace(kinds=(shape.keys,), choices=())
    if typing.get_origin(shape.keys) is tuple:
        item_shape = shape._replace(kinds=typing.get_args(shape.keys)[:1], choices=())

        def key(k: Any) -> Any:
            if isinstance(k, str) and k.split():
                return tuple(_coerce_item(x, item_shape) for x in k.split())
            return tuple(_coerce_item(x, item_shape) for x in k) if isinstance(k, list) else k
    else:
        def key(k: Any) -> Any:
            return _coerce_item(k, key_shape)
    if isinstance(value, str):
        value = [value]
    if isinstance(value, (list, tuple)) and all(isinstance(v, str) for v in value):
        pairs = [part.rpartition(":") for v in value for part in v.split(",") if part.strip()]
        if not pairs or any(not sep or not k.strip() for k, sep, _ in pairs):
            return value
        value = {k.strip(): v.strip() for k, _, v in pairs}
    if not isinstance(value, dict):
        return value
    return {key(k): _coerce_item(v, shape) for k, v in value.items()}


def build_section(cls: type, values: dict[str, Any], prefix: str) -> Any:
    """Construct config dataclass `cls` from a dict of values as a file or command line gives them (text
    converted by `_coerce`), refusing unknown keys; the class's own validate call checks the values."""
    if not isinstance(values, dict):
        raise ConfigError(f"{prefix} must be a mapping of keys to values, got {type(values).__name__}")
    declared = _declarations(cls)
    kwargs = {}
    for key, value in values.items():
        if key not in declared:
            raise ConfigError(f"unknown config key {prefix}.{key}{_closest(key, declared)}")
        kwargs[key] = _coerce(value, declared[key].shape)
    return cls(**kwargs)


def check_value(dotted: str, value: Any) -> tuple[Any, bool]:
    """(`value` converted as a config file's would be, whether the field is an integer) for the key `section.key`,
    checked against that field's declaration alone (type, choices, bounds; checks between fields are RunConfig's).
    ConfigError names an unknown key (and the closest one) or what the field allows; a sweep checks each value of
    its search space with it before anything runs."""
    section, _, name = dotted.partition(".")
    if section not in SECTIONS:
        raise ConfigError(f"unknown config key {dotted}: keys look like section.key, sections "
                          f"{', '.join(SECTIONS)}{_closest(section, SECTIONS)}")
    declared = _declarations(SECTIONS[section])
    if name not in declared:
        raise ConfigError(f"unknown config key {dotted}{_closest(name, declared)}")
    shape, rules = declared[name].shape, declared[name].rules
    value = _coerce(value, shape)
    if shape.is_list or shape.keys is not None:
        raise ConfigError(f"{dotted} holds a {'list' if shape.is_list else 'mapping'}; give single values (a sweep "
                          "chooses numbers and names)")
    if not (value is None and shape.optional):
        _check_item(dotted, value, shape, rules)
    return value, int in shape.kinds and float not in shape.kinds


def run_config_from_dict(raw: dict[str, Any]) -> RunConfig:
    """Build a validated RunConfig from nested dicts ({"model": {...}, "train": {...}, "preset": ...})."""
    if not isinstance(raw, dict):
        raise ConfigError("a config must be a mapping with sections model, data, optim, train, lora")
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
        lora=build_section(LoRAConfig, dict(raw["lora"]), "lora") if raw.get("lora") is not None else None,
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


def parse_yaml(text: str, what: str, path: str | Path) -> Any:
    """`text` (the content of the file `path`) through yaml.safe_load; a syntax error is one ConfigError line
    `WHAT PATH:LINE:COLUMN: problem`, the place an editor jumps to. A tab gets its own message: YAML forbids
    tabs in indentation, and PyYAML's "found character '\\t' that cannot start any token" does not say so."""
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark is not None else str(path)
        if mark is not None and text[mark.index:mark.index + 1] == "\t":
            raise ConfigError(f"{what} {where} has a tab: YAML forbids tabs for indentation (and before a value); "
                              f"indent with spaces") from None
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        context, started = getattr(e, "context", None), getattr(e, "context_mark", None)
        if context and started is not None:  # "while parsing a flow sequence" opened on an earlier line
            problem += f" ({context} from line {started.line + 1})"
        raise ConfigError(f"{what} {where} is not valid YAML: {problem}; fix the syntax there") from None


def read_config_file(path: str | Path) -> dict[str, Any]:
    """Read a YAML or JSON config file, or a built-in recipe by name, into nested dicts (safe loaders only).

    An existing file wins over a recipe of the same name.
    """
    p = Path(path)
    source = p if p.is_file() else builtin_recipe(str(path))
    try:
        text = source.read_text(encoding="utf-8")
        data = json.loads(text) if p.suffix == ".json" else parse_yaml(text, "config file", p)
    except UnicodeDecodeError:
        raise ConfigError(f"config file {p} is not UTF-8 text; save it as UTF-8") from None
    except json.JSONDecodeError as e:
        raise ConfigError(f"config file {p}:{e.lineno}:{e.colno} is not valid JSON: {e.msg}") from None
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
        if section not in SECTIONS:  # --preset.x: a preset is a name, not a section of keys
            raise ConfigError(f"unknown config key --{dotted}{_closest(section, list(SECTIONS))}: keys are "
                              f"--SECTION.KEY with SECTION one of {', '.join(SECTIONS)}")
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


class FieldDoc(typing.NamedTuple):
    """One field of a config section, as --help and a generated command line need it."""

    name: str
    type: Any  # the resolved annotation, e.g. Optional[int] or Literal["fp32", "bf16-mixed"]
    default: Any  # a factory's product where the field has one
    doc: str
    choices: tuple[str, ...]  # the values it allows as text, from its Literal type (or its pattern's forms); ()

    @property
    def help(self) -> str:
        """'Normalisation. (layernorm | rmsnorm; default: layernorm)'"""
        shown = ([" | ".join(self.choices)] if self.choices else []) + [f"default: {_show(self.default)}"]
        return f"{self.doc} ({'; '.join(shown)})"


def field_docs(cls: type) -> list[FieldDoc]:
    """Each field of config dataclass `cls` with its type, default, doc and choices, in declaration order."""
    out = []
    for name, d in _declarations(cls).items():
        f = d.field
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING else (
            None if f.default is dataclasses.MISSING else f.default)
        out.append(FieldDoc(name, d.hint, default, f.metadata.get("doc", ""), _choices(d.shape, d.rules)))
    return out
