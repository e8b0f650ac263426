"""The built-in recipes (src/lmforge/configs/*.yaml): each loads by name as a valid RunConfig, ships in the
package, and an unknown name is one line listing them."""

from __future__ import annotations

import fnmatch
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from lmforge.cli import main
from lmforge.config import builtin_recipes, load_run_config
from lmforge.errors import ConfigError

ROOT = Path(__file__).resolve().parents[1]
RECIPES = sorted(p.stem for p in (ROOT / "src" / "lmforge" / "configs").glob("*.yaml"))


def test_every_recipe_file_is_a_built_in_recipe():
    assert RECIPES and "shakespeare-char" in RECIPES
    assert list(builtin_recipes()) == RECIPES


def test_the_package_data_glob_ships_every_recipe():
    """What pyproject declares as package data is what a wheel holds: every recipe must match it."""
    tomllib = pytest.importorskip("tomllib")  # Python >= 3.11
    globs = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]["lmforge"]
    package = ROOT / "src" / "lmforge"
    for path in (package / "configs").glob("*.yaml"):
        name = path.relative_to(package).as_posix()
        assert any(fnmatch.fnmatch(name, g) for g in globs), f"{name} is not package data ({globs})"


def test_the_wheel_holds_every_recipe(tmp_path):
    """An installed lmforge (a wheel, no checkout) finds its recipes: build one offline and look inside."""
    pytest.importorskip("setuptools")  # the build backend, in .venv; --no-build-isolation keeps this offline
    source = tmp_path / "source"  # a copy, so the build leaves nothing in the checkout
    shutil.copytree(ROOT / "src", source / "src", ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, source / name)
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
                    "-w", str(tmp_path / "wheel"), str(source)], check=True, timeout=300)
    (wheel,) = (tmp_path / "wheel").glob("lmforge-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    assert {f"lmforge/configs/{name}.yaml" for name in RECIPES} <= names


@pytest.mark.parametrize("name", RECIPES)
def test_recipe_loads_by_name_and_by_path(name):
    config = load_run_config(name)
    assert config.train.max_steps > 0 and config.model.n_layer > 0
    assert load_run_config(ROOT / "src" / "lmforge" / "configs" / f"{name}.yaml") == config
    assert load_run_config(f"{name}.yaml") == config


def test_a_file_wins_over_a_recipe_of_the_same_name(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "shakespeare-char").write_text("preset: tiny\n", encoding="utf-8")
    assert load_run_config("shakespeare-char").preset == "tiny"


def test_shakespeare_recipe_keeps_the_benchmark_budget():
    config = load_run_config("shakespeare-char")
    # benchmarks/sweep_char_small.py and time_to_quality.py found it at this budget and shape: change them together.
    assert (config.train.max_steps, config.train.batch_size, config.train.grad_accum) == (2000, 12, 1)
    assert (config.model.n_layer, config.model.n_head, config.model.n_embd, config.model.block_size) == (4, 4, 128, 64)
    assert (config.model.pos_encoding, config.model.norm, config.model.mlp) == ("rope", "rmsnorm", "relu2")
    assert (config.optim.name, config.model.qk_norm) == ("muon", True)


def test_an_unknown_recipe_is_one_line_naming_the_closest_and_listing_all(capsys):
    with pytest.raises(ConfigError, match=r"shakespear .*did you mean 'shakespeare-char'") as info:
        load_run_config("shakespear")
    assert "built-in recipes: " + ", ".join(RECIPES) in str(info.value)
    assert main(["train", "--config", "configs/shakespeare-char.yaml"]) == 2  # the path of old checkouts
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("lmforge train: error: config file configs/shakespeare-char.yaml")
    assert "did you mean 'shakespeare-char'" in err and "built-in recipes: shakespeare-char" in err


def test_train_help_lists_the_built_in_recipes(capsys):
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    out = capsys.readouterr().out
    assert "built-in recipes (--config NAME): " + ", ".join(RECIPES) in out
