"""The config tree: strict keys, typed values, ranges, presets, YAML round trip."""

from __future__ import annotations

import dataclasses
import json
import math
import typing
from dataclasses import dataclass
from typing import Literal, Optional, Union

import pytest
import yaml

from lmforge.cli import main
from lmforge.config import (PRESETS, SECTIONS, ModelConfig, RunConfig, build_section, doc, field_docs,
                            load_run_config, preset, run_config_from_dict, to_dict, validate)
from lmforge.errors import ConfigError
from lmforge.serve.config import ServeConfig


@pytest.mark.parametrize("overrides,message", [
    ({"model.n_layr": "3"}, "unknown config key model.n_layr (did you mean 'n_layer'?)"),
    ({"optim.learning_rate": "1e-3"}, "unknown config key optim.learning_rate"),
    ({"trian.max_steps": "3"}, "unknown config key --trian.max_steps (did you mean 'train'?)"),
    ({"model.n_layer": "four"}, "model.n_layer='four' has the wrong type: expected int"),
    ({"model.n_layer": "0"}, "model.n_layer=0 is invalid: an integer from 1 to 10000000"),
    ({"train.max_steps": "0"}, "train.max_steps=0 is invalid: a positive integer"),
    ({"optim.lr": "-1"}, "optim.lr=-1.0 is invalid"),
    ({"model.dropout": "1.5"}, "model.dropout=1.5 is invalid: a probability in [0, 1)"),
    ({"model.norm": "batchnorm"}, "choose one of layernorm, rmsnorm"),
    ({"model.n_head": "3"}, "model.n_embd=128 is invalid: a multiple of n_head=3"),
    ({"model.n_kv_head": "3"}, "model.n_kv_head=3 is invalid: a divisor of n_head=4"),
    ({"train.precision": "fp8"}, "train.precision='fp8' is invalid"),
    ({"train.compile": "maybe"}, "train.compile='maybe' has the wrong type: expected bool"),
    ({"preset": "gpt5"}, "unknown preset 'gpt5'"),
    ({"data.embedding_init": "glove:"}, "data.embedding_init='glove:' is invalid"),
    ({"optim.name": "sgd"}, "optim.name='sgd' is invalid: choose one of adamw, muon"),
    ({"optim.name": "muon", "lora.r": "4", "train.init_from": "runs/base"}, "optim.name=muon is invalid with lora.*"),
])
def test_bad_values_are_refused_with_a_clear_message(overrides, message):
    with pytest.raises(ConfigError) as info:
        load_run_config(None, overrides)
    assert message in str(info.value)
    assert "\n" not in str(info.value)


def test_overrides_are_typed_and_applied_over_the_preset():
    config = load_run_config(None, {"preset": "char-small", "model.n_layer": "6", "train.compile": "true",
                                    "optim.lr": "3e-4", "model.n_kv_head": "null"})
    assert config.model.n_layer == 6 and config.model.n_embd == 128 and config.model.block_size == 64
    assert config.train.compile is True and config.optim.lr == pytest.approx(3e-4)
    assert config.model.n_kv_head == config.model.n_head


def test_yaml_file_round_trip(tmp_path):
    config = load_run_config(None, {"preset": "llama-small", "train.max_steps": "7"})
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(to_dict(config)))
    again = load_run_config(path)
    assert again == config and isinstance(again, RunConfig)


def test_config_file_errors(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_run_config(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: [1, 2\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_run_config(bad)
    bad_json = tmp_path / "bad.json"
    bad_json.write_text('{"model": {"n_layer": 2,}}\n')
    with pytest.raises(ConfigError, match=r"bad.json:1:25 is not valid JSON"):
        load_run_config(bad_json)
    listy = tmp_path / "list.yaml"
    listy.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="must hold a mapping"):
        load_run_config(listy)
    unsafe = tmp_path / "unsafe.yaml"
    unsafe.write_text("model: !!python/object/apply:os.system ['touch pwned']\n")
    with pytest.raises(ConfigError):
        load_run_config(unsafe)
    assert not (tmp_path / "pwned").exists()


def test_presets_and_derived_sizes():
    assert set(PRESETS) >= {"tiny", "char-small", "gpt2-124m", "llama-small"}
    small = preset("char-small")
    assert (small.n_layer, small.n_head, small.n_embd, small.block_size) == (4, 4, 128, 64)
    assert small.head_dim == 32 and small.hidden_dim == 512
    llama = preset("llama-small")
    assert llama.mlp == "swiglu" and llama.hidden_dim % 64 == 0 and llama.n_kv_head < llama.n_head
    assert ModelConfig(n_embd=96, n_head=4, mlp_hidden=100).hidden_dim == 100


def test_a_section_must_be_a_mapping():
    with pytest.raises(ConfigError, match="model must be a mapping"):
        run_config_from_dict({"model": 3})
    with pytest.raises(ConfigError, match="unknown preset"):
        run_config_from_dict({"preset": []})


# ------------------------------------------------------------------ one declaration per rule, one check
CLASSES = {**SECTIONS, "serve": ServeConfig}


def _parts(hint):
    """The alternatives of a type: Optional[int] -> [int, NoneType]; list[int] -> [list[int]]."""
    return list(typing.get_args(hint)) if typing.get_origin(hint) in (Union, type(int | None)) else [hint]


def _literal_fields():
    """(section, class, field, its choices as text) for every field whose type holds a Literal, read from the
    type itself: adding a choice to a type adds it here."""
    out = []
    for section, cls in CLASSES.items():
        for name, hint in typing.get_type_hints(cls).items():
            literal = [p for p in _parts(hint) if typing.get_origin(p) is Literal]
            if literal:
                choices = [str(c) for p in literal for c in typing.get_args(p)]
                out.append((section, cls, name, (["true", "false"] if bool in _parts(hint) else []) + choices))
    return out


LITERAL_FIELDS = _literal_fields()


def test_the_choice_fields_are_literal_types():
    assert {f"{s}.{n}" for s, _, n, _ in LITERAL_FIELDS} >= {
        "model.norm", "model.mlp", "model.activation", "model.pos_encoding", "model.attention", "data.sampling",
        "optim.schedule", "train.precision", "train.nonfinite"}


@pytest.mark.parametrize("section,cls,name,choices", LITERAL_FIELDS, ids=[f"{s}.{n}" for s, _, n, _ in LITERAL_FIELDS])
def test_a_bad_choice_is_one_line_listing_exactly_the_choices_of_the_type(section, cls, name, choices):
    expected = f"{section}.{name}='nope' is invalid: choose one of {', '.join(choices)}"
    with pytest.raises(ConfigError) as direct:
        cls(**{name: "nope"})
    assert str(direct.value) == expected
    with pytest.raises(ConfigError) as from_text:  # as a config file or a command line gives it
        build_section(cls, {name: "nope"}, section)
    assert str(from_text.value) == expected
    for choice in choices:  # and every choice of the type is taken, from text too
        value = {"true": True, "false": False}.get(choice, choice)
        companions = CHOICE_COMPANIONS.get(f"{section}.{name}={choice}", {})
        assert getattr(build_section(cls, {name: choice, **companions}, section), name) == value


# other fields a choice needs so that the checks between fields pass
CHOICE_COMPANIONS = {"model.head=classify": {"num_labels": 2}, "lora.init=loftq": {"quantize": "nf4"},
                     "train.preference_loss=exo": {"dpo_label_smoothing": 0.1},
                     "train.preference_loss=grpo": {"online_reward_model": "runs/rm"},
                     "train.grpo_loss_type=grpo": {"preference_loss": "grpo", "online_reward_model": "runs/rm"},
                     "train.grpo_loss_type=dr_grpo": {"preference_loss": "grpo", "online_reward_model": "runs/rm"},
                     "train.grpo_scale_rewards=none": {"preference_loss": "grpo", "online_reward_model": "runs/rm"},
                     "train.grpo_scale_rewards=batch": {"preference_loss": "grpo", "online_reward_model": "runs/rm"},
                     "train.grpo_mask_truncated=true": {"preference_loss": "grpo", "online_reward_model": "runs/rm"},
                     "train.grpo_importance_sampling=sequence": {"preference_loss": "grpo", "grpo_iterations": 2,
                                                                 "online_reward_model": "runs/rm"},
                     **{f"train.grpo_objective={o}": {"preference_loss": "grpo", "grpo_iterations": 2,
                                                      "online_reward_model": "runs/rm"} for o in ("cispo", "sapo")}}


# other fields an edge value needs so that the checks between fields pass
COMPANIONS = {"model.n_head": lambda v: {"n_embd": v}, "model.n_embd": lambda v: {"n_head": 1},
              "optim.lr": lambda v: {"min_lr": 0.0}, "model.num_labels": lambda v: {"head": "classify"},
              "serve.num_assistant_tokens": lambda v: {"assistant_model": "runs/small"},
              "serve.speculative_max_running": lambda v: {"prompt_lookup_num_tokens": 4},
              "train.online_max_new_tokens": lambda v: {"online_reward_model": "runs/rm"},
              "train.online_temperature": lambda v: {"online_reward_model": "runs/rm"},
              "train.grpo_group_size": lambda v: {"preference_loss": "grpo", "online_reward_model": "runs/rm"},
              "train.grpo_beta": lambda v: {"preference_loss": "grpo", "online_reward_model": "runs/rm"},
              "train.grpo_iterations": lambda v: {"preference_loss": "grpo", "online_reward_model": "runs/rm"},
              **{f"train.grpo_{key}": lambda v: {"preference_loss": "grpo", "grpo_iterations": 2,
                                                 "online_reward_model": "runs/rm"}
                 for key in ("epsilon", "epsilon_high", "delta")},
              **{f"train.grpo_sapo_tau_{key}": lambda v: {"preference_loss": "grpo", "grpo_iterations": 2,
                                                          "grpo_objective": "sapo", "online_reward_model": "runs/rm"}
                 for key in ("pos", "neg")},
              "train.grpo_top_entropy": lambda v: {"preference_loss": "grpo", "online_reward_model": "runs/rm"},
              **{f"train.distill_{key}": lambda v: {"distill_from": "runs/teacher"}
                 for key in ("alpha", "beta", "temperature", "on_policy")},
              "lora.pissa_niter": lambda v: {"init": "pissa"},
              "lora.loftq_iter": lambda v: {"init": "loftq", "quantize": "nf4"},
              "lora.lr_embedding": lambda v: {"targets": ["q", "emb"]}}


def _bounded_fields():
    """(section, class, field, bound kind, bound, is_int) for every finite bound declared with doc()."""
    out = []
    for section, cls in CLASSES.items():
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            rules = f.metadata["rules"]
            for kind in ("ge", "gt", "le", "lt"):
                bound = getattr(rules, kind)
                if bound is not None and math.isfinite(bound):
                    is_int = int in _parts(hints[f.name]) and float not in _parts(hints[f.name])
                    out.append((section, cls, f.name, kind, bound, is_int))
    return out


BOUNDED_FIELDS = _bounded_fields()


def test_the_ranges_are_declared():
    assert {f"{s}.{n}:{k}" for s, _, n, k, _, _ in BOUNDED_FIELDS} >= {
        "model.n_layer:ge", "model.n_layer:le", "model.dropout:ge", "model.dropout:lt", "model.mlp_hidden:gt",
        "optim.lr:gt", "optim.lr:lt", "optim.decay_fraction:le", "optim.warmup_steps:ge", "train.max_steps:ge",
        "train.batch_size:le", "train.spike_window:ge", "train.spike_window:le", "train.dist_timeout:gt",
        "serve.max_n:ge", "serve.max_queue:ge", "serve.max_prompt_tokens:ge", "serve.batch_wait:ge",
        "serve.timeout:gt"}


def _edge(kind, bound, is_int):
    """(a value at the edge that is taken, the value just past it that is refused)."""
    inside = -math.inf if kind in ("le", "lt") else math.inf
    if is_int:
        step = 1 if inside > 0 else -1
        at, past = (int(bound), int(bound) - step) if kind in ("ge", "le") else (int(bound) + step, int(bound))
    else:
        at, past = (bound, math.nextafter(bound, -inside)) if kind in ("ge", "le") else \
            (math.nextafter(bound, inside), bound)
    return at, past


@pytest.mark.parametrize("section,cls,name,kind,bound,is_int", BOUNDED_FIELDS,
                         ids=[f"{s}.{n}:{k}" for s, _, n, k, _, _ in BOUNDED_FIELDS])
def test_each_range_holds_at_its_edge(section, cls, name, kind, bound, is_int):
    at, past = _edge(kind, bound, is_int)
    extra = COMPANIONS.get(f"{section}.{name}", lambda v: {})
    assert getattr(cls(**{name: at, **extra(at)}), name) == at
    assert getattr(build_section(cls, {name: repr(at), **extra(at)}, section), name) == at  # from text
    with pytest.raises(ConfigError) as info:
        cls(**{name: past, **extra(past)})
    assert str(info.value).startswith(f"{section}.{name}={past!r} is invalid: ")
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("setting,message", [
    ({"train.max_steps": "0"}, "train.max_steps=0 is invalid: a positive integer"),
    ({"train.eval_interval": "-1"}, "train.eval_interval=-1 is invalid: 0 or a positive integer"),
    ({"train.spike_window": "100001"}, "train.spike_window=100001 is invalid: an integer from 2 to 100000"),
    ({"train.dist_timeout": "inf"}, "train.dist_timeout=inf is invalid: a positive number of seconds"),
    ({"train.spike_zscore": "nan"}, "train.spike_zscore=nan is invalid: 0 (off) or a positive number"),
    ({"model.mlp_hidden": "0"}, "model.mlp_hidden=0 is invalid: a positive integer or null"),
    ({"optim.beta2": "1"}, "optim.beta2=1.0 is invalid: a number in [0, 1)"),
    ({"optim.decay_fraction": "1.5"}, "optim.decay_fraction=1.5 is invalid: a number in [0, 1]"),
    ({"train.device": "gpu"}, "train.device='gpu' is invalid: choose one of auto, cpu, cuda, cuda:N, mps"),
    ({"train.device": "cpu0"}, "train.device='cpu0' is invalid: choose one of auto, cpu, cuda, cuda:N, mps"),
    ({"data.embedding_init": "fasttext"}, "data.embedding_init='fasttext' is invalid: choose one of none, "
                                          "word2vec, glove:PATH"),
    ({"optim.min_lr": "0.5"}, "optim.min_lr=0.5 is invalid: between 0 and lr=0.001"),
])
def test_derived_messages_say_what_is_allowed(setting, message):
    with pytest.raises(ConfigError) as info:
        load_run_config(None, setting)
    assert str(info.value).startswith(message)


def test_pattern_fields_take_their_forms():
    config = load_run_config(None, {"train.device": "cuda:1", "data.embedding_init": "glove:vectors.txt"})
    assert config.train.device == "cuda:1" and config.data.embedding_init == "glove:vectors.txt"


NUMBER_FIELDS = [(s, cls, name, hint) for s, cls in CLASSES.items() for name, hint in typing.get_type_hints(cls).items()
                 if {int, float} & set(_parts(hint))]


@pytest.mark.parametrize("section,cls,name,hint", NUMBER_FIELDS, ids=[f"{s}.{n}" for s, _, n, _ in NUMBER_FIELDS])
def test_a_bool_is_refused_where_a_number_is_expected(section, cls, name, hint):
    kind = "int" if int in _parts(hint) else "float"
    expected = f"{kind} or null" if type(None) in _parts(hint) else kind
    for value in (True, False):
        with pytest.raises(ConfigError) as info:
            cls(**{name: value})
        assert str(info.value) == f"{section}.{name}={value!r} has the wrong type: expected {expected}"
    with pytest.raises(ConfigError, match="has the wrong type"):
        build_section(cls, {name: "true"}, section)


def test_none_only_where_the_type_is_optional():
    assert len(NUMBER_FIELDS) >= 30
    for section, cls in CLASSES.items():
        for name, hint in typing.get_type_hints(cls).items():
            if type(None) in _parts(hint):  # taken, from text too
                built = build_section(cls, {name: "null"}, section)
                assert getattr(built, name) == (built.n_head if name == "n_kv_head" else None)
            else:
                with pytest.raises(ConfigError, match=rf"^{section}\.{name}=None "):
                    cls(**{name: None})


@dataclass
class Sampling:
    """The kinds of field GenerateConfig has, declared the same way."""

    top_k: Optional[int] = doc("Top k.", None, ge=1)
    top_p: Optional[float] = doc("Top p.", None, gt=0, le=1, noun="probability")
    temperature: float = doc("Temperature.", 1.0, ge=0)
    greedy: bool = doc("Greedy.", False)
    early_stopping: Union[bool, Literal["never"]] = doc("Early stopping.", False)
    stop_strings: Optional[list[str]] = doc("Stop texts.", None)
    stop_token_ids: Optional[list[int]] = doc("Stop ids.", None, ge=0)

    def __post_init__(self) -> None:
        validate(self, "generate")


def test_text_converts_to_optional_numbers_bool_or_literal_and_lists():
    config = build_section(Sampling, {"top_k": "null", "top_p": "1", "temperature": "0", "greedy": "yes",
                                      "early_stopping": "never", "stop_strings": "a,b", "stop_token_ids": "1, 2"},
                           "generate")
    assert config == Sampling(None, 1.0, 0.0, True, "never", ["a,b"], [1, 2])
    assert isinstance(config.top_p, float) and isinstance(config.temperature, float)
    assert type(build_section(Sampling, {"temperature": 2}, "generate").temperature) is float  # YAML's 2
    assert build_section(Sampling, {"early_stopping": "true"}, "generate").early_stopping is True
    assert build_section(Sampling, {"early_stopping": "false"}, "generate").early_stopping is False
    repeated = build_section(Sampling, {"stop_strings": ["x", "y,z"], "stop_token_ids": ["3", "4"]}, "generate")
    assert repeated.stop_strings == ["x", "y,z"] and repeated.stop_token_ids == [3, 4]
    assert Sampling(early_stopping=True).early_stopping is True and Sampling(stop_token_ids=(0,)).stop_token_ids == (0,)


@dataclass
class Constraints:
    """A mapping and a list of lists, declared as GenerateConfig's logit_bias and bad_words_ids are."""

    bias: Optional[dict[int, float]] = doc("Bias.", None, ge=-100, le=100)
    banned: Optional[list[list[int]]] = doc("Banned.", None, ge=0)

    def __post_init__(self) -> None:
        validate(self, "generate")


def test_mappings_and_lists_of_lists_read_from_text_files_and_json():
    from_text = build_section(Constraints, {"bias": ["5:-100,7:2.5", "9:1"], "banned": ["1,2", "3 4 5", "6"]}, "g")
    assert from_text == Constraints({5: -100.0, 7: 2.5, 9: 1.0}, [[1, 2], [3, 4, 5], [6]])
    assert type(from_text.bias[9]) is float
    from_json = build_section(Constraints, json.loads('{"bias": {"5": -100, "7": 2.5}, "banned": [[1, 2], [6]]}'), "g")
    assert from_json == Constraints({5: -100.0, 7: 2.5}, [[1, 2], [6]])
    assert build_section(Constraints, {"bias": "null", "banned": "none"}, "g") == Constraints()


def test_a_mapping_keyed_by_token_sequences_reads_text_json_and_hugging_faces_list():
    """GenerateConfig.sequence_bias: keys are tuples of token ids; text writes their items apart with spaces."""
    from lmforge.generate import GenerateConfig

    want = {(10, 45): -5.0, (7,): 2.5}
    assert build_section(GenerateConfig, {"sequence_bias": ["10 45:-5", "7:2.5"]}, "generate").sequence_bias == want
    assert build_section(GenerateConfig, {"sequence_bias": "10 45:-5,7:2.5"}, "generate").sequence_bias == want
    assert build_section(GenerateConfig, json.loads('{"sequence_bias": {"10 45": -5, "7": 2.5}}'),
                         "generate").sequence_bias == want
    assert build_section(GenerateConfig, json.loads('{"sequence_bias": [[[10, 45], -5.0], [[7], 2.5]]}'),
                         "generate").sequence_bias == want
    assert GenerateConfig(sequence_bias=[[[10, 45], -5.0], [[7], 2.5]]).sequence_bias == want
    for values, message in [
            ({"sequence_bias": "10 x:1"}, "generate.sequence_bias has the key (10, 'x'): expected non-empty "
                                          "tuple[int, ...] keys"),
            ({"sequence_bias": {"10 -4": 1}},
             "generate.sequence_bias has the token id -4: token ids are 0 or positive"),
            ({"sequence_bias": "10:101"}, "generate.sequence_bias[(10,)]=101.0 is invalid: a number in [-100, 100]"),
            ({"sequence_bias": [[10, 45]]}, "generate.sequence_bias[0]=[10, 45] is invalid: a pair [token ids, bias] "
                                            "as Hugging Face writes it ([[10, 45], -5.0]), or give a dict {(10, 45): "
                                            "-5.0}")]:
        with pytest.raises(ConfigError) as info:
            build_section(GenerateConfig, values, "generate")
        assert str(info.value) == message


@pytest.mark.parametrize("values,message", [
    ({"bias": "5"}, "generate.bias=['5'] has the wrong type: expected dict[int, float] or null (as text: KEY:VALUE "
                    "pairs, comma-separated)"),
    ({"bias": "5:x"}, "generate.bias[5]='x' has the wrong type: expected float"),
    ({"bias": "a:1"}, "generate.bias has the key 'a': expected int keys"),
    ({"bias": {"5": 101}}, "generate.bias[5]=101.0 is invalid: a number in [-100, 100]"),
    ({"bias": [1, 2]}, "generate.bias=[1, 2] has the wrong type: expected dict[int, float] or null (as text: "
                       "KEY:VALUE pairs, comma-separated)"),
    ({"banned": [[1, -2]]}, "generate.banned[0][1]=-2 is invalid: 0 or a positive integer"),
    ({"banned": [1, 2]}, "generate.banned[0]=1 has the wrong type: expected a non-empty list[int]"),
    ({"banned": [[]]}, "generate.banned[0]=[] has the wrong type: expected a non-empty list[int]"),
    ({"banned": "1,x"}, "generate.banned[0][1]='x' has the wrong type: expected int"),
    ({"banned": 3}, "generate.banned=3 has the wrong type: expected list[list[int]] or null"),
])
def test_mappings_and_lists_of_lists_refuse_with_one_line(values, message):
    with pytest.raises(ConfigError) as info:
        build_section(Constraints, values, "generate")
    assert str(info.value) == message


@pytest.mark.parametrize("values,message", [
    ({"early_stopping": "maybe"}, "generate.early_stopping='maybe' is invalid: choose one of true, false, never"),
    ({"early_stopping": 1}, "generate.early_stopping=1 is invalid: choose one of true, false, never"),
    ({"stop_token_ids": [1, -1]}, "generate.stop_token_ids[1]=-1 is invalid: 0 or a positive integer"),
    ({"stop_token_ids": "1,x"}, "generate.stop_token_ids[1]='x' has the wrong type: expected int"),
    ({"stop_token_ids": [True]}, "generate.stop_token_ids[0]=True has the wrong type: expected int"),
    ({"stop_strings": 3}, "generate.stop_strings=3 has the wrong type: expected list[str] or null"),
    ({"top_p": "0"}, "generate.top_p=0.0 is invalid: a probability in (0, 1] or null"),
    ({"top_k": "0"}, "generate.top_k=0 is invalid: a positive integer or null"),
    ({"temperature": "-0.5"}, "generate.temperature=-0.5 is invalid: 0 or a positive number"),
    ({"greedy": "sometimes"}, "generate.greedy='sometimes' has the wrong type: expected bool"),
    ({"top_k": "1.5"}, "generate.top_k='1.5' has the wrong type: expected int or null"),
    ({"top_kk": "1"}, "unknown config key generate.top_kk (did you mean 'top_k'?)"),
])
def test_generate_like_fields_refuse_with_one_line(values, message):
    with pytest.raises(ConfigError) as info:
        build_section(Sampling, values, "generate")
    assert str(info.value) == message


def test_field_docs_take_choices_from_the_types():
    docs = {f.name: f for f in field_docs(Sampling)}
    assert docs["early_stopping"].choices == ("true", "false", "never")
    assert docs["early_stopping"].help == "Early stopping. (true | false | never; default: false)"
    assert docs["top_k"].help == "Top k. (default: null)" and docs["top_k"].choices == ()
    norm = {f.name: f for f in field_docs(ModelConfig)}["norm"]
    assert norm.choices == typing.get_args(norm.type) == ("layernorm", "rmsnorm")
    assert norm.help == "Normalisation. (layernorm | rmsnorm; default: layernorm)"


def _help(capsys, command):
    with pytest.raises(SystemExit) as info:
        main([command, "--help"])
    assert info.value.code == 0
    return capsys.readouterr().out


def _flat(text):
    """Help text as one line: argparse wraps at spaces and after hyphens."""
    return " ".join(text.split()).replace("- ", "-")


def test_train_help_shows_each_choice_list(capsys):
    out = _help(capsys, "train")
    lines = {line.split()[0]: line for line in out.splitlines() if line.startswith("  --") and "." in line.split()[0]}
    for section, _, name, choices in LITERAL_FIELDS:
        if section in SECTIONS:
            assert f"({' | '.join(choices)}; default: " in lines[f"--{section}.{name}"]
    assert "(auto | cpu | cuda | cuda:N | mps; default: auto)" in lines["--train.device"]
    flat = _flat(out)  # the short flags show the same lists, taken from the same fields
    assert "--precision P = --train.precision: " in flat and "--on-nonfinite POLICY = --train.nonfinite: " in flat
    assert flat.count("(fp32 | bf16-mixed | bf16-compute; default: fp32)") == 2 and flat.count("(stop | skip; default: stop)") == 2


def test_serve_help_has_a_flag_per_field_with_its_doc_choices_and_default(capsys):
    flat = _flat(_help(capsys, "serve"))
    hints = typing.get_type_hints(ServeConfig)
    for f in dataclasses.fields(ServeConfig):
        assert f"--{f.name.replace('_', '-')} " in flat
        shown = "null" if f.default is None else str(f.default).lower() if isinstance(f.default, bool) else f.default
        assert _flat(f"{f.metadata['doc']} (") in flat and f"default: {shown})" in flat
        literal = [p for p in _parts(hints[f.name]) if typing.get_origin(p) is Literal]
        for p in literal:
            assert " | ".join(map(str, typing.get_args(p))) in flat
