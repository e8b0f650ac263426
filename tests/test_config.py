"""The config tree: strict keys, typed values, ranges, presets, YAML round trip."""

import pytest
import yaml

from lmforge.config import (PRESETS, ModelConfig, RunConfig, load_run_config, preset, run_config_from_dict,
                            to_dict)
from lmforge.errors import ConfigError


@pytest.mark.parametrize("overrides,message", [
    ({"model.n_layr": "3"}, "unknown config key model.n_layr (did you mean 'n_layer'?)"),
    ({"optim.learning_rate": "1e-3"}, "unknown config key optim.learning_rate"),
    ({"trian.max_steps": "3"}, "unknown config section 'trian' (did you mean 'train'?)"),
    ({"model.n_layer": "four"}, "model.n_layer='four' has the wrong type: expected int"),
    ({"model.n_layer": "0"}, "model.n_layer=0 is invalid: a positive integer"),
    ({"optim.lr": "-1"}, "optim.lr=-1.0 is invalid"),
    ({"model.dropout": "1.5"}, "model.dropout=1.5 is invalid: a probability in [0, 1)"),
    ({"model.norm": "batchnorm"}, "choose one of layernorm, rmsnorm"),
    ({"model.n_head": "3"}, "model.n_embd=128 is invalid: a multiple of n_head=3"),
    ({"model.n_kv_head": "3"}, "model.n_kv_head=3 is invalid: a divisor of n_head=4"),
    ({"train.precision": "fp8"}, "train.precision='fp8' is invalid"),
    ({"train.compile": "maybe"}, "train.compile='maybe' has the wrong type: expected bool"),
    ({"preset": "gpt5"}, "unknown preset 'gpt5'"),
    ({"data.embedding_init": "glove:"}, "data.embedding_init='glove:' is invalid"),
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
