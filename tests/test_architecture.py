"""The shape of the code: dependencies point one way, and nothing loads code from user files."""

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src" / "lmforge"

# Lower layers never import higher ones: errors <- files <- config <- model <- {data, train, generate, ...} <- cli.
# files (atomic writes, sha256) sits between errors and config: it imports only errors, and everything may import it;
# so does allocator (malloc's settings for CPU compute, set by the trainer and by every CLI command).
# head_loss (the LM head's matrix product fused with its cross-entropy) imports only torch; the model uses it.
# preference_loss (DPO's loss) imports only torch; train trains on it and eval measures it.
# nf4 (QLoRA's 4-bit frozen weights) imports only torch, beside the model; lora, plan and train build on it.
LAYER = {
    "errors": 0, "files": 0.5, "allocator": 0.5, "config": 1, "head_loss": 1.5, "preference_loss": 1.5, "model": 2, "nf4": 2, "tokenizer": 2, "data": 3, "distributed": 3, "lora": 3,
    "checkpoint": 4, "generate": 4.5, "eval": 5, "interop": 5, "explain": 5, "train": 6, "sweep": 6.5, "plan": 6.5, "serve": 7, "cli": 9,
}


def _modules():
    for path in sorted(SRC.rglob("*.py")):
        rel = path.relative_to(SRC).with_suffix("")
        yield path, rel.parts


def _lmforge_imports(tree: ast.AST, parts: tuple) -> set:
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative import: resolve against the package
                base = list(parts[:-1])[: len(parts) - node.level]
                names = [".".join(["lmforge", *base, node.module or ""]).rstrip(".")]
            else:
                names = [node.module or ""]
        else:
            continue
        for name in names:
            bits = name.split(".")
            if bits[0] == "lmforge" and len(bits) > 1:
                found.add(bits[1])
    return found


def test_every_module_has_a_layer():
    tops = {parts[0] for _, parts in _modules() if parts[0] != "__init__"}
    assert tops <= set(LAYER), f"add {sorted(tops - set(LAYER))} to LAYER"


@pytest.mark.parametrize("path,parts", list(_modules()), ids=lambda x: str(x) if isinstance(x, tuple) else "")
def test_imports_point_down(path, parts):
    if parts == ("__init__",):
        return  # the package root re-exports (lazily) from above
    own = parts[0]
    tree = ast.parse(path.read_text(encoding="utf-8"))
    for target in _lmforge_imports(tree, parts):
        if target == own:
            continue
        assert LAYER[target] < LAYER[own], f"lmforge.{own} (layer {LAYER[own]}) imports lmforge.{target} (layer {LAYER[target]})"


# What loads code from a file. A module here is refused on import (every use of it starts there); a name is
# refused wherever it appears, called or not, under any alias (`from torch import load as L`, `import torch as t`).
UNSAFE_MODULES = {"pickle", "cPickle", "_pickle", "marshal", "shelve", "joblib", "dill", "cloudpickle"}
UNSAFE_NAMES = {"torch.load", "torch.serialization.load", "torch.serialization._load", "pandas.read_pickle",
                "yaml.load", "yaml.load_all", "yaml.unsafe_load", "yaml.unsafe_load_all", "yaml.full_load",
                "yaml.full_load_all", "builtins.eval", "builtins.exec", "numpy.load"}
# numpy.load unpickles object arrays when allow_pickle is true. Its default has been False since numpy 1.16.3,
# but a default is not visible in the source and could change: numpy.load is allowed only as a call that says
# allow_pickle=False itself; a bare reference (np.load passed on, unseen arguments) counts as unsafe.
SAFE_ONLY_CALLED_WITH = {"numpy.load": ("allow_pickle", False)}


def _unsafe_uses(tree: ast.AST) -> list:
    """Every import of an UNSAFE_MODULES module and every reference to an UNSAFE_NAMES name in `tree`, with its line.

    Names are resolved through the file's imports, so aliases do not hide them; a bare eval/exec is the builtin
    (model.eval() is not); __import__ / importlib.import_module / getattr with a constant name count as the
    import or attribute they spell.
    """
    aliases: dict = {"eval": "builtins.eval", "exec": "builtins.exec"}
    bad = []

    def flag(what: str, node: ast.AST) -> None:
        bad.append(f"{what} at line {node.lineno}")

    def check_module(module: str, node: ast.AST) -> None:
        if module.split(".")[0] in UNSAFE_MODULES:
            flag(f"import {module}", node)

    def dotted(node: ast.AST):
        if isinstance(node, ast.Name):
            return aliases.get(node.id, node.id)
        if isinstance(node, ast.Attribute):
            base = dotted(node.value)
            return f"{base}.{node.attr}" if base else None
        if isinstance(node, ast.Call) and _spelled_name(node):  # getattr(torch, "load")
            base = dotted(node.args[0])
            return f"{base}.{node.args[1].value}" if base else None
        return None

    for node in ast.walk(tree):  # the imports first: they define the aliases
        if isinstance(node, ast.Import):
            for a in node.names:
                check_module(a.name, node)
                aliases[a.asname or a.name.split(".")[0]] = a.name if a.asname else a.name.split(".")[0]
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            check_module(node.module, node)
            for a in node.names:
                aliases[a.asname or a.name] = f"{node.module}.{a.name}"
    safe_calls = set()
    for node in ast.walk(tree):
        if not isinstance(node, ast.Call):
            continue
        name = dotted(node.func)
        if name in ("__import__", "importlib.import_module") and node.args and isinstance(node.args[0], ast.Constant) \
                and isinstance(node.args[0].value, str):
            check_module(node.args[0].value, node)
        if name in SAFE_ONLY_CALLED_WITH:
            key, value = SAFE_ONLY_CALLED_WITH[name]
            kw = {k.arg: k.value for k in node.keywords}
            if isinstance(kw.get(key), ast.Constant) and kw[key].value is value:
                safe_calls.add(id(node.func))
    for node in ast.walk(tree):
        if isinstance(node, (ast.Name, ast.Attribute)) or (isinstance(node, ast.Call) and _spelled_name(node)):
            name = dotted(node)
            if name in UNSAFE_NAMES and id(node) not in safe_calls:
                flag(name, node)
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            for a in node.names:
                if f"{node.module}.{a.name}" in UNSAFE_NAMES:
                    flag(f"from {node.module} import {a.name}", node)
    return bad


def _spelled_name(node: ast.Call) -> bool:
    """getattr(obj, "constant"): an attribute spelled as a string."""
    return isinstance(node.func, ast.Name) and node.func.id == "getattr" and len(node.args) >= 2 \
        and isinstance(node.args[1], ast.Constant) and isinstance(node.args[1].value, str)


# Each spelling that loads code, as a snippet the scanner must catch (so it cannot go blind unnoticed).
UNSAFE_SNIPPETS = {
    "import pickle": "import pickle",
    "import pickle as p": "import pickle as p\np.loads(b)",
    "from pickle import loads as x": "from pickle import loads as x\nx(b)",
    "pickle.Unpickler": "import pickle\npickle.Unpickler(f).load()",
    "import _pickle": "import _pickle",
    "import cPickle": "import cPickle",
    "import marshal": "import marshal",
    "from marshal import loads": "from marshal import loads",
    "import shelve": "import shelve\nshelve.open(p)",
    "import joblib": "import joblib\njoblib.load(p)",
    "from joblib import load": "from joblib import load",
    "import dill": "import dill",
    "import cloudpickle": "import cloudpickle",
    "__import__('pickle')": "m = __import__('pickle')",
    "importlib.import_module('dill')": "import importlib\nimportlib.import_module('dill')",
    "torch.load": "import torch\ntorch.load(p)",
    "torch.load weights_only": "import torch\ntorch.load(p, weights_only=True)",
    "import torch as t": "import torch as t\nt.load(p)",
    "from torch import load as L": "from torch import load as L\nL(p)",
    "torch.serialization.load": "import torch\ntorch.serialization.load(p)",
    "from torch.serialization import load": "from torch.serialization import load\nload(p)",
    "from torch import serialization": "from torch import serialization\nserialization.load(p)",
    "getattr(torch, 'load')": "import torch\ngetattr(torch, 'load')(p)",
    "torch.load passed on": "import torch\nreader = torch.load",
    "numpy.load allow_pickle=True": "import numpy as np\nnp.load(p, allow_pickle=True)",
    "numpy.load default": "import numpy\nnumpy.load(p)",
    "numpy.load allow_pickle variable": "import numpy as np\nnp.load(p, allow_pickle=flag)",
    "from numpy import load": "from numpy import load\nload(p, allow_pickle=True)",
    "numpy.load passed on": "import numpy as np\nread = np.load",
    "pandas.read_pickle": "import pandas as pd\npd.read_pickle(p)",
    "from pandas import read_pickle": "from pandas import read_pickle",
    "yaml.load": "import yaml\nyaml.load(s)",
    "yaml.unsafe_load": "import yaml\nyaml.unsafe_load(s)",
    "yaml.full_load": "import yaml\nyaml.full_load(s)",
    "eval": "eval('1')",
    "exec": "exec(code)",
}
SAFE_SNIPPETS = ["import numpy as np\nnp.load(p, allow_pickle=False)", "model.eval()\nself.m.eval()",
                 "import yaml\nyaml.safe_load(s)", "import json\njson.load(f)", "import torch\ntorch.save",
                 "from safetensors.torch import load_file\nload_file(p)", "x.load(p)\nload(p)",
                 "import importlib\nimportlib.import_module('lmforge.tokenizer')"]


@pytest.mark.parametrize("spelling", list(UNSAFE_SNIPPETS))
def test_the_scanner_catches_each_spelling_that_loads_code(spelling):
    assert _unsafe_uses(ast.parse(UNSAFE_SNIPPETS[spelling])), spelling


def test_the_scanner_passes_safe_code():
    for snippet in SAFE_SNIPPETS:
        assert _unsafe_uses(ast.parse(snippet)) == [], snippet


ROOT = SRC.parents[1]
SCANNED = sorted([*SRC.rglob("*.py"), *(ROOT / "benchmarks").rglob("*.py"), *(ROOT / "scripts").rglob("*.py")])


@pytest.mark.parametrize("path", SCANNED, ids=lambda p: str(p.relative_to(ROOT)))
def test_no_code_is_loaded_from_files(path):
    assert _unsafe_uses(ast.parse(path.read_text(encoding="utf-8"))) == []
