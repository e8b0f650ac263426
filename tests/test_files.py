"""lmforge.files: a file or directory is the old one or the new one, whole, at every instant; and every
writer of lmforge goes through it."""

from __future__ import annotations

import ast
import hashlib
import os
import subprocess
import sys
from pathlib import Path

import pytest

from lmforge import files
from lmforge.errors import DataError
from lmforge.files import (atomic_dir, atomic_file, atomic_path, atomic_write_bytes, atomic_write_text, check_output,
                           recover_output, replace_dir, sha256_file)

SRC = Path(__file__).resolve().parents[1] / "src" / "lmforge"


class Boom(Exception):
    pass


def hidden(parent: Path) -> list[str]:
    """Leftover temporary or trash siblings in `parent`."""
    return sorted(p.name for p in parent.iterdir() if p.name.startswith("."))


def tree(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture
def fsynced(monkeypatch):
    """The paths os.fsync is called on, in order (fds mapped back to paths through /proc)."""
    seen: list[str] = []
    real = os.fsync

    def spy(fd):
        seen.append(Path(os.readlink(f"/proc/self/fd/{fd}")))
        real(fd)

    monkeypatch.setattr(os, "fsync", spy)
    return seen


# ----------------------------------------------------------------------------------------------- sha256
def test_sha256_file_hashes_every_chunk(tmp_path):
    data = os.urandom(10_000)
    (tmp_path / "f").write_bytes(data)
    assert sha256_file(tmp_path / "f", chunk=4096) == hashlib.sha256(data).hexdigest()


# ------------------------------------------------------------------------------------------------ files
def test_a_file_is_replaced_whole_and_only_when_complete(tmp_path):
    path = tmp_path / "out.json"
    path.write_text("old")
    with atomic_file(path) as f:
        f.write("ne")
        f.flush()
        assert path.read_text() == "old"  # a reader during the write sees the old file, never a part
        f.write("w")
    assert path.read_text() == "new" and hidden(tmp_path) == []
    atomic_write_bytes(tmp_path / "fresh.bin", b"\x00\x01")
    with atomic_path(tmp_path / "by-path") as tmp:
        assert not (tmp_path / "by-path").exists()
        tmp.write_bytes(b"written by a library")
    assert (tmp_path / "fresh.bin").read_bytes() == b"\x00\x01"
    assert (tmp_path / "by-path").read_bytes() == b"written by a library" and hidden(tmp_path) == []


@pytest.mark.parametrize("how", ["bytes", "path", "text"])
def test_an_error_mid_write_leaves_the_old_file_and_no_temporary(tmp_path, how):
    path = tmp_path / "out.txt"
    path.write_text("old")
    with pytest.raises(Boom):
        if how == "bytes":
            with atomic_file(path, "wb") as f:
                f.write(b"half")
                raise Boom
        elif how == "path":
            with atomic_path(path) as tmp:
                tmp.write_text("half")
                raise Boom
        else:
            with atomic_file(path, "w") as f:
                f.write("half")
                f.flush()
                raise Boom
    assert path.read_text() == "old" and hidden(tmp_path) == []
    with pytest.raises(TypeError):
        atomic_write_text(path, 123)  # the write itself fails
    assert path.read_text() == "old" and hidden(tmp_path) == []


def test_the_file_and_then_its_directory_are_fsynced(tmp_path, fsynced):
    atomic_write_text(tmp_path / "out.txt", "data")
    assert len(fsynced) == 2
    assert fsynced[0].parent == tmp_path.resolve() and fsynced[0].name.startswith(".out.txt.tmp-")  # before rename
    assert fsynced[1] == tmp_path.resolve()  # after the rename: the new directory entry is durable


def test_atomic_file_refuses_partial_modes(tmp_path):
    with pytest.raises(ValueError, match="mode"):
        with atomic_file(tmp_path / "x", "a"):
            pass


# ------------------------------------------------------------------------------------------ directories
def make_output(path: Path, text: str) -> Path:
    (path / "sub").mkdir(parents=True)
    (path / "a.txt").write_text(text)
    (path / "sub" / "b.txt").write_text(text * 2)
    return path


def test_replace_dir_syncs_everything_and_deletes_the_old_output_only_after(tmp_path, monkeypatch, fsynced):
    final = make_output(tmp_path / "out", "old")
    new = make_output(tmp_path / "new", "new")
    removed_while = []
    real_remove = files._remove

    def remove(path):
        removed_while.append(tree(final))  # what a reader finds under the final name when the old one goes
        real_remove(path)

    monkeypatch.setattr(files, "_remove", remove)
    replace_dir(new, final)
    assert tree(final) == {"a.txt": b"new", "sub/b.txt": b"newnew"}
    assert removed_while == [tree(final)] and hidden(tmp_path) == []
    new, parent = new.resolve(), tmp_path.resolve()
    assert {new / "a.txt", new / "sub" / "b.txt", new / "sub", new} <= set(fsynced)  # before the renames
    assert fsynced[-1] == parent  # the parent last, after the renames


def failing_renames(monkeypatch, first_failing: int, last_failing: int):
    """os.rename raises OSError on calls first_failing..last_failing (1-based), as a crash or a full disk would."""
    real, calls = os.rename, []

    def rename(src, dst):
        calls.append((src, dst))
        if first_failing <= len(calls) <= last_failing:
            raise OSError(5, f"injected failure of rename {len(calls)}")
        real(src, dst)

    monkeypatch.setattr(os, "rename", rename)
    return calls


def test_a_failed_second_rename_puts_the_old_output_back_at_once(tmp_path, monkeypatch):
    final = make_output(tmp_path / "out", "old")
    before = tree(final)
    failing_renames(monkeypatch, 2, 2)  # old -> trash works, new -> final fails, trash -> final works
    with pytest.raises(OSError, match="rename 2"):
        with atomic_dir(final) as tmp:
            make_output(tmp, "new")
    assert tree(final) == before and hidden(tmp_path) == []


def test_a_crash_between_the_two_renames_leaves_the_old_output_whole_and_recoverable(tmp_path, monkeypatch):
    final = make_output(tmp_path / "out", "old")
    before = tree(final)
    failing_renames(monkeypatch, 2, 99)  # the process "dies" after moving the old one aside: nothing after runs
    with pytest.raises(OSError):
        with atomic_dir(final) as tmp:
            make_output(tmp, "new")
    monkeypatch.undo()
    assert not final.exists()
    (aside,) = [p for p in tmp_path.iterdir() if p.name.startswith(".out.old-")]
    assert tree(aside) == before  # complete, under a known name
    assert recover_output(final) == final
    assert tree(final) == before and hidden(tmp_path) == []


def test_an_error_while_writing_a_directory_leaves_the_old_one(tmp_path):
    final = make_output(tmp_path / "out", "old")
    before = tree(final)
    with pytest.raises(Boom):
        with atomic_dir(final) as tmp:
            make_output(tmp, "half")
            raise Boom
    assert tree(final) == before and hidden(tmp_path) == []
    with atomic_dir(tmp_path / "fresh") as tmp:
        (tmp / "x").write_text("x")
    assert tree(tmp_path / "fresh") == {"x": b"x"} and hidden(tmp_path) == []


def test_recover_leaves_the_temporaries_of_a_running_writer_alone(tmp_path):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead_pid = int(dead.stdout)
    make_output(tmp_path / "out", "current")
    live = tmp_path / f".out.tmp-{os.getppid()}-0000abcd"
    stale_tmp = tmp_path / f".out.tmp-{dead_pid}-0000abcd"
    stale_old = tmp_path / f".out.old-{dead_pid}-0000beef"
    for p in (live, stale_tmp, stale_old):
        make_output(p, "x")
    assert recover_output(tmp_path / "out") is None  # `out` exists: the .old- one is garbage
    assert hidden(tmp_path) == [live.name] and tree(tmp_path / "out")["a.txt"] == b"current"


# ------------------------------------------------------------------------------------- the --force rule
def test_check_output_replaces_only_what_lmforge_wrote(tmp_path):
    def ours(p):
        return (p / "manifest.json").is_file()

    def check(path, force=False, directory=True):
        check_output(path, force=force, ours=ours, what="a dataset", error=DataError, directory=directory)

    check(tmp_path / "new")
    (tmp_path / "empty").mkdir()
    check(tmp_path / "empty")
    mine = make_output(tmp_path / "mine", "thesis")
    with pytest.raises(DataError, match=r"is a non-empty folder that is not a dataset: choose a new or empty --out"):
        check(mine, force=True)
    theirs = tmp_path / "theirs"
    theirs.mkdir()
    (theirs / "manifest.json").write_text("{}")
    with pytest.raises(DataError, match=r"already holds a dataset: pass --force to replace it"):
        check(theirs)
    check(theirs, force=True)
    (tmp_path / "file").write_text("x")
    with pytest.raises(DataError, match="exists and is not a directory"):
        check(tmp_path / "file", force=True)
    with pytest.raises(DataError, match="exists and is a directory"):
        check(theirs, force=True, directory=False)


# ---------------------------------------------------------------------------- every writer goes through it
PATH_WRITERS = {"write_text", "write_bytes", "savefig", "save_file", "save_model"}  # whoever owns the method
MODULE_WRITERS = {("os", "replace"), ("os", "rename"), ("shutil", "move"), ("shutil", "copy"), ("shutil", "copyfile"),
                  ("np", "save"), ("torch", "save")}
# Files written inside a temporary directory that lmforge.files puts in place whole, and appended logs.
ALLOWED = {
    ("checkpoint/save.py", "save_checkpoint"),     # into the .tmp- directory that replace_dir puts in place
    ("checkpoint/save.py", "_write_json"),         # the same
    ("checkpoint/save.py", "_complete_save"),      # tokenizer.json copied in, the same
    ("checkpoint/weights.py", "save_weights"),     # model.safetensors, the same
    ("checkpoint/sharded.py", "save_sharded_checkpoint"),  # each rank's shards, the same
    ("checkpoint/layout.py", "clean_interrupted_saves"),  # renames a complete .trash- checkpoint back
    ("interop/hf_export.py", "_write"),            # into export_hf's atomic_dir temporary directory
    ("data/prepare.py", "_Spool.__init__"),        # the spool, inside atomic_dir's temporary directory
    ("data/prepare.py", "_Spool.reopen_for_append"),
    ("data/shards.py", "ShardWriter.__init__"),    # shards, inside atomic_dir's temporary directory
    ("train/metrics.py", "MetricsLogger.__init__"),  # metrics.jsonl is an appended log (a torn last line is skipped)
    ("plan.py", "reset_peak_rss"),                 # /proc/self/clear_refs: a kernel control file, not an output
}


def _writes(call: ast.Call, atomic: set[str]) -> bool:
    """Whether `call` writes a file itself (not into a file object or path that `atomic` names)."""
    if any(isinstance(a, ast.Name) and a.id in atomic for a in call.args):
        return False
    f = call.func
    if isinstance(f, ast.Name):
        name, owner = f.id, None
    elif isinstance(f, ast.Attribute):
        name, owner = f.attr, getattr(f.value, "id", "?")
    else:
        return False
    if name == "open" and owner != "os":  # open(p, mode), io.open(p, mode), path.open(mode); os.open takes flags
        at = 1 if owner in (None, "io") else 0
        mode = call.args[at] if len(call.args) > at else next((k.value for k in call.keywords if k.arg == "mode"), None)
        return isinstance(mode, ast.Constant) and any(c in str(mode.value) for c in "wax+")
    return name in PATH_WRITERS or (owner, name) in MODULE_WRITERS


def _direct_writes(module: ast.AST) -> list[tuple[str, int]]:
    """(enclosing Class.function, line) of every call that writes or renames a file itself."""
    atomic = {item.optional_vars.id for node in ast.walk(module) if isinstance(node, ast.With) for item in node.items
              if isinstance(item.optional_vars, ast.Name) and isinstance(item.context_expr, ast.Call)
              and getattr(item.context_expr.func, "id", "") in ("atomic_file", "atomic_path")}
    found = []

    def visit(node: ast.AST, scope: str) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.Call) and _writes(child, atomic):
                found.append((scope, child.lineno))
            named = isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef))
            visit(child, f"{scope}.{child.name}".lstrip(".") if named else scope)

    visit(module, "")
    return found


def test_the_scanner_finds_direct_writes():
    code = ("def a(p):\n    p.write_text('x')\nclass B:\n    def b(self, p):\n        open(p, 'w')\n"
            "def c(p):\n    os.replace(p, q)\ndef d(p):\n    np.save(p, x)\ndef e(p):\n    fig.savefig(p)\n"
            "def f(p):\n    p.open('ab')\n"
            "def g(p):\n    open(p)\n    p.open()\n    s.replace('a', 'b')\n    atomic_write_text(p, 'x')\n"
            "    tok.save(p)\n    os.open(p, os.O_RDONLY)\n"
            "    with atomic_file(p, 'wb') as f:\n        np.save(f, x)\n")
    assert [scope for scope, _ in _direct_writes(ast.parse(code))] == ["a", "B.b", "c", "d", "e", "f"]


@pytest.mark.parametrize("path", sorted(p for p in SRC.rglob("*.py") if p.name != "files.py"),
                         ids=lambda p: str(p.relative_to(SRC)))
def test_every_writer_uses_lmforge_files(path):
    rel = str(path.relative_to(SRC))
    direct = [(scope, line) for scope, line in _direct_writes(ast.parse(path.read_text(encoding="utf-8")))
              if (rel, scope) not in ALLOWED]
    assert direct == [], f"{rel} writes files itself at {direct}: use lmforge.files (atomic_file, atomic_dir, ...)"
