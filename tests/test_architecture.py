"""The shape of the code: dependencies point one way, and nothing loads code from user files."""

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src" / "lmforge"

# Lower layers never import higher ones: errors <- files <- config <- model <- {data, train, generate, ...} <- cli.
# files (atomic writes, sha256) sits between errors and config: it imports only errors, and everything may import it.
LAYER = {
    "errors": 0, "files": 0.5, "config": 1, "model": 2, "tokenizer": 2, "data": 3, "distributed": 3, "lora": 3,
    "checkpoint": 4, "generate": 4.5, "eval": 5, "interop": 5, "train": 6, "serve": 7, "cli": 9,
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


def _unsafe_calls(tree: ast.AST) -> list:
    bad = []
    for node in ast.walk(tree):
        if not isinstance(node, ast.Call):
            continue
        f = node.func
        name = f.attr if isinstance(f, ast.Attribute) else getattr(f, "id", "")
        owner = getattr(f.value, "id", "") if isinstance(f, ast.Attribute) else ""
        if name in ("eval", "exec") and isinstance(f, ast.Name):  # the builtins, not model.eval()
            bad.append(f"{name}() at line {node.lineno}")
        if owner in ("pickle", "cPickle", "dill", "marshal") and name in ("load", "loads"):
            bad.append(f"{owner}.{name} at line {node.lineno}")
        if owner == "torch" and name == "load":
            bad.append(f"torch.load at line {node.lineno}")
        if owner == "yaml" and name in ("load", "unsafe_load", "full_load", "load_all"):
            bad.append(f"yaml.{name} at line {node.lineno}")
        if owner == "np" and name == "load":
            kw = {k.arg: k.value for k in node.keywords}
            if not (isinstance(kw.get("allow_pickle"), ast.Constant) and kw["allow_pickle"].value is False):
                bad.append(f"np.load without allow_pickle=False at line {node.lineno}")
    return bad


def test_unsafe_call_scanner_finds_what_it_should():
    tree = ast.parse("import pickle, torch, yaml\npickle.load(f)\ntorch.load(p)\nyaml.load(s)\neval('1')\nnp.load(p)\n"
                     "model.to(d).eval()\nself.m.eval()\nnp.load(p, allow_pickle=False)\nyaml.safe_load(s)")
    assert len(_unsafe_calls(tree)) == 5


@pytest.mark.parametrize("path,parts", list(_modules()), ids=lambda x: str(x) if isinstance(x, tuple) else "")
def test_no_code_is_loaded_from_files(path, parts):
    assert _unsafe_calls(ast.parse(path.read_text(encoding="utf-8"))) == []
