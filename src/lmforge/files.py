"""Files that are whole or absent: the one atomic write of lmforge, the one sha256, and the one rule for
replacing an output.

A file is written to a hidden temporary sibling (same directory, so the rename stays on one file system),
fsynced, renamed onto its name (os.replace, atomic on POSIX), and the parent directory is fsynced so that
the rename itself survives a power cut. A reader, or the next run after a crash, sees the old complete
file or the new complete one, never a part:

    atomic_write_text(path, text)            # or atomic_write_bytes
    with atomic_file(path, "wb") as f:       # a file object on .NAME.tmp-<pid>-<hex>
        np.save(f, table)
    with atomic_path(path) as tmp:           # for libraries that write to a path (safetensors, savefig)
        save_file(tensors, str(tmp))

A directory is written the same way: `atomic_dir(final)` yields an empty temporary sibling, and
`replace_dir(new, final)` puts a finished one in place. The old output is never deleted first: it is
renamed aside to .NAME.old-<pid>-<hex>, the new one is renamed to NAME, the parent fsynced, and only then
is the old one deleted. At every instant one complete output exists under a known name; a process killed
between the two renames leaves the old one under its .old- name, and `recover_output` puts it back.
On an error the temporary is removed and the exception re-raised: what was there before is untouched.
A full disk (ENOSPC, EDQUOT) becomes DiskFullError, one line naming the output that was not written.

`check_output` is the `--force` rule: an existing output is replaced only when lmforge wrote it.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import secrets
import shutil
from pathlib import Path
from typing import IO, Callable, Collection, Iterable, Iterator, Optional

from lmforge.errors import LmforgeError

TMP, OLD = "tmp", "old"  # tags of the hidden siblings: .NAME.tmp-<pid>-<hex> (being written), .NAME.old-... (replaced)


class DiskFullError(LmforgeError):
    """No space left (or the quota reached) while writing an output; the previous output is unchanged."""


def disk_full(error: BaseException) -> bool:
    """Whether `error` is a full disk or quota: an OSError's errno, or the Rust I/O error text that
    safetensors raises ("... (os error 28)")."""
    return (isinstance(error, DiskFullError) or getattr(error, "errno", None) in (errno.ENOSPC, errno.EDQUOT)
            or f"(os error {errno.ENOSPC})" in str(error) or f"(os error {errno.EDQUOT})" in str(error))


def _failed(tmp: Path, final: Path, error: BaseException) -> None:
    """Remove the temporary `tmp` of a failed write of `final`; a full disk raises DiskFullError instead of
    `error`, which the caller re-raises otherwise."""
    _remove(tmp)
    if disk_full(error):
        raise DiskFullError(f"no space left on the device while writing {final}; nothing of it was kept and what "
                            f"was there before is unchanged: free space, then run the command again") from None


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    """Hex sha256 of a file's bytes, read `chunk` bytes at a time."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def fsync_path(path: str | Path) -> None:
    """Flush a file's data, or a directory's entries, to the disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(directory: str | Path) -> None:
    """fsync every file and directory under `directory`, itself last."""
    for root, _, names in os.walk(directory, topdown=False):
        for name in names:
            fsync_path(os.path.join(root, name))
        fsync_path(root)


def sibling(path: str | Path, tag: str = TMP) -> Path:
    """A fresh hidden name next to `path`: .NAME.<tag>-<pid>-<8 hex digits>."""
    path = Path(path)
    return path.with_name(f".{path.name}.{tag}-{os.getpid()}-{secrets.token_hex(4)}")


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


# ---------------------------------------------------------------------------------------------- files
@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary sibling path for the caller to write; on success it becomes `path`, atomically.

    Then the file is fsynced, renamed onto `path` and the parent directory fsynced. On any exception the
    temporary is removed, `path` is left as it was, and the exception propagates. A writer that infers
    the format from the file name (matplotlib's savefig) must be told the format. A full disk raises
    DiskFullError naming `path`.
    """
    path = Path(path)
    tmp = sibling(path)
    try:
        yield tmp
        fsync_path(tmp)
        os.replace(tmp, path)
    except BaseException as e:
        _failed(tmp, path, e)
        raise
    fsync_path(path.parent)


@contextlib.contextmanager
def atomic_file(path: str | Path, mode: str = "w", *, encoding: str = "utf-8") -> Iterator[IO]:
    """Yield a file object (mode "w" text or "wb" bytes) whose content replaces `path` atomically on success."""
    if mode not in ("w", "wb"):
        raise ValueError(f"atomic_file writes a whole file: mode 'w' or 'wb', not {mode!r}")
    with atomic_path(path) as tmp:
        with open(tmp, mode, encoding=None if mode == "wb" else encoding) as f:
            yield f


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Replace `path` with `data`, atomically (see atomic_path)."""
    with atomic_file(path, "wb") as f:
        f.write(data)


def atomic_write_text(path: str | Path, text: str, encoding: str = "utf-8") -> None:
    """Replace `path` with `text`, atomically (see atomic_path)."""
    with atomic_file(path, "w", encoding=encoding) as f:
        f.write(text)


# ---------------------------------------------------------------------------------------- directories
def replace_dir(new: str | Path, final: str | Path, *, trash: Optional[str | Path] = None) -> None:
    """Put the finished directory `new` in place as `final`; an existing `final` is deleted only afterwards.

    Every file under `new` and `new` itself are fsynced first. An existing `final` is renamed to `trash`
    (default: a fresh .NAME.old-<pid>-<hex> sibling), `new` renamed to `final`, the parent fsynced, and
    `trash` deleted. If the second rename fails, the old output is renamed back before the error
    propagates; if the process dies between the renames, `recover_output(final)` renames it back.
    """
    new, final = Path(new), Path(final)
    fsync_tree(new)
    if not os.path.lexists(final):
        os.rename(new, final)
        fsync_path(final.parent)
        return
    trash = Path(trash) if trash is not None else sibling(final, OLD)
    os.rename(final, trash)
    try:
        os.rename(new, final)
    except BaseException:
        with contextlib.suppress(OSError):  # if this fails too, recover_output renames it back later
            os.rename(trash, final)
        raise
    fsync_path(final.parent)
    _remove(trash)


def _owner_alive(leftover: Path) -> bool:
    """Whether the process named in a .NAME.<tag>-<pid>-<hex> sibling still runs (on this machine)."""
    try:
        pid = int(leftover.name.rsplit("-", 2)[-2])
    except (IndexError, ValueError):
        return True  # not a name we made: leave it alone
    if pid == os.getpid():  # one process writes one output at a time: ours are leftovers of a failed write
        return False
    try:
        os.kill(pid, 0)  # signal 0: only asks whether the process exists
    except ProcessLookupError:
        return False
    except PermissionError:  # it exists, under another user
        pass
    return True


def recover_output(final: str | Path) -> Optional[Path]:
    """Clean up after writers of `final` (a file or a directory) that died; return `final` if its old
    output was put back, else None.

    A writer killed between the two renames of replace_dir left the previous output complete under
    .NAME.old-<pid>-<hex> and no `final`: it is renamed back. Other siblings a dead writer left (a
    half-written .NAME.tmp-*, an .old- whose replacement is in place) are deleted. Siblings of a
    process that still runs are left alone.
    """
    final = Path(final)
    if not final.parent.is_dir():
        return None
    leftovers = [p for p in final.parent.iterdir()
                 if p.name.startswith((f".{final.name}.{TMP}-", f".{final.name}.{OLD}-")) and not _owner_alive(p)]
    restored = None
    old = [p for p in leftovers if p.name.startswith(f".{final.name}.{OLD}-")]
    if old and not os.path.lexists(final):
        restored = max(old, key=lambda p: p.lstat().st_ctime)  # the last one moved aside
        os.rename(restored, final)
        fsync_path(final.parent)
    for path in leftovers:
        if path != restored:
            _remove(path)
    return final if restored is not None else None


@contextlib.contextmanager
def atomic_dir(final: str | Path) -> Iterator[Path]:
    """Yield an empty temporary sibling directory; on success it replaces `final` (see replace_dir).

    On any exception the temporary directory is removed and `final` is left as it was (a full disk raises
    DiskFullError naming `final`). Leftovers of writers of `final` that died are cleaned first (recover_output).
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    recover_output(final)
    tmp = sibling(final)
    tmp.mkdir()
    try:
        yield tmp
        replace_dir(tmp, final)
    except BaseException as e:
        _failed(tmp, final, e)
        raise


# ------------------------------------------------------------------------------------- the --force rule
def check_output(path: str | Path, *, force: bool, ours: Callable[[Path], bool], what: str,
                 error: type[LmforgeError] = LmforgeError, directory: bool = True,
                 members: Optional[Callable[[Path], Collection[str]]] = None,
                 inputs: Iterable[str | Path] = ()) -> None:
    """Raise `error` (one line) unless `path` may be written by an output of kind `what`.

    Writable: a path that does not exist, an empty directory (when `directory`), or, with `force`, an
    output that `ours(path)` recognises as one lmforge wrote and that holds nothing else: every entry is
    one of `members(path)` (the names such an output consists of), so a note the user put inside is never
    deleted with it. Anything else is never replaced, --force or not; nor is a symbolic link (replacing
    the link would not replace what it points to), nor a path nested with one of `inputs` (see check_apart).
    First puts back an output a killed writer left aside (recover_output), so the check sees it.
    """
    path = Path(path)
    if path.is_symlink():
        raise error(f"output {path} is a symbolic link (to {os.readlink(path)}): give the real path as --out")
    check_apart(path, inputs, error)
    recover_output(path)
    if not os.path.lexists(path):
        return
    if directory != path.is_dir():
        kind = "not a directory" if directory else "a directory"
        raise error(f"output {path} exists and is {kind}: choose another --out")
    if directory and not any(path.iterdir()):
        return
    if not ours(path):
        raise error(f"output {path} {'is a non-empty folder that' if directory else 'exists and'} is not {what}: "
                    f"choose a new{' or empty' if directory else ''} --out")
    foreign = sorted(p.name for p in path.iterdir() if p.name not in members(path)) if members and directory else []
    if foreign:
        raise error(f"output {path} holds {what} and also {', '.join(foreign[:3])}{' ...' if len(foreign) > 3 else ''}"
                    f", which lmforge did not write: move {'it' if len(foreign) == 1 else 'them'} away or choose "
                    "another --out")
    if not force:
        raise error(f"output {path} already holds {what}: pass --force to replace it")


def check_apart(output: str | Path, inputs: Iterable[str | Path], error: type[LmforgeError] = LmforgeError) -> None:
    """Raise `error` when `output` is one of `inputs`, lies inside one, or holds one: replacing the output
    would delete an input, or writing it would change an input (a folder read again, a checkpoint's files)."""
    out = Path(output).resolve()
    for item in inputs:
        given = Path(item).resolve()
        if out == given or out.is_relative_to(given) or given.is_relative_to(out):
            relation = "is" if out == given else "lies inside" if out.is_relative_to(given) else "holds"
            raise error(f"output {output} {relation} the input {item}: choose an --out apart from the inputs")
