"""A regular expression as a deterministic automaton over characters (interegular), as plain data, built in this
process or, for a pattern someone else sent, in a child process with a time and memory limit.

Turning a regular expression into a deterministic automaton can take exponential time and memory:
"(a|b)*a(a|b){12}" has 8,193 states and took 9 s here, with {16} it runs for minutes. A server must not let one
request hold it like that, so `build(pattern, timeout=...)` runs `python -m lmforge.generate.automaton` (this file:
interegular only, no torch), which reads the pattern on stdin and writes the automaton as JSON, under a memory
limit, and kills it at the timeout. Nothing is unpickled: the child's answer is JSON.
"""

from __future__ import annotations

import json
import subprocess
import sys
import threading
from collections import OrderedDict
from typing import NamedTuple, Optional

from lmforge.errors import ConfigError

CHILD_MEMORY = 1 << 30  # bytes of address space a child may use (an automaton that needs more is too complex)
TOO_COMPLEX = "too complex: a simpler pattern, or a server started with a larger --regex-timeout"


class Automaton(NamedTuple):
    """A deterministic automaton: read a character `ch` in state s by map[s][symbols.get(ch, other)] (a missing
    entry: the text is refused); `live` are the states from which a final state is reachable."""

    symbols: dict[str, int]
    other: Optional[int]  # the symbol of every character not in `symbols` (None: such characters are refused)
    map: dict[int, dict[int, int]]
    initial: int
    finals: frozenset[int]
    live: frozenset[int]


def _from_interegular(pattern: str) -> Automaton:
    import interegular
    from interegular.fsm import anything_else

    fsm = interegular.parse_pattern(pattern).to_fsm()
    mapping = dict(fsm.alphabet.items())
    other = mapping.pop(anything_else, None)
    return Automaton({str(k): int(v) for k, v in mapping.items()}, other,
                     {int(s): {int(a): int(b) for a, b in moves.items()} for s, moves in fsm.map.items()},
                     int(fsm.initial), frozenset(int(s) for s in fsm.finals),
                     frozenset(int(s) for s in fsm.states if fsm.islive(s)))


def _to_json(a: Automaton) -> str:
    return json.dumps({"symbols": a.symbols, "other": a.other, "map": {str(s): {str(k): v for k, v in m.items()}
                                                                       for s, m in a.map.items()},
                       "initial": a.initial, "finals": sorted(a.finals), "live": sorted(a.live)})


def _from_json(text: str) -> Automaton:
    d = json.loads(text)
    return Automaton(d["symbols"], d["other"], {int(s): {int(k): v for k, v in m.items()} for s, m in d["map"].items()},
                     d["initial"], frozenset(d["finals"]), frozenset(d["live"]))


def _refused(pattern: str, why: str, hint: str = "a regular expression interegular can read: no backreferences, no "
             "anchors") -> ConfigError:
    shown = pattern if len(pattern) <= 80 else pattern[:77] + "..."
    return ConfigError(f"generate.guided_regex={shown!r} cannot be used: {why} ({hint})")


def check_syntax(pattern: str) -> None:
    """Parse `pattern` (quick, whatever it is); a one-line ConfigError where interegular cannot read it."""
    import interegular

    try:
        interegular.parse_pattern(pattern)
    except Exception as e:  # interegular's own errors for syntax it cannot read
        raise _refused(pattern, f"{type(e).__name__}: {_first_line(e)}") from None


def _first_line(e: BaseException) -> str:
    return str(e).splitlines()[0] if str(e) else "not a regular expression it can read"


_CACHE: "OrderedDict[str, Automaton]" = OrderedDict()
_LOCK = threading.Lock()
CACHE_SIZE = 64


def build(pattern: str, timeout: Optional[float] = None) -> Automaton:
    """The automaton of `pattern` (the newest CACHE_SIZE are kept). timeout=None: built here; a number: built in a
    child process given that many seconds and CHILD_MEMORY bytes (a ConfigError past either). A ConfigError also
    where the pattern cannot be read or matches nothing."""
    with _LOCK:
        if pattern in _CACHE:
            _CACHE.move_to_end(pattern)
            return _CACHE[pattern]
    if timeout is None:
        check_syntax(pattern)
        try:
            automaton = _from_interegular(pattern)
        except Exception as e:
            raise _refused(pattern, f"{type(e).__name__}: {_first_line(e)}") from None
    else:
        automaton = _build_in_child(pattern, timeout)
    if automaton.initial not in automaton.live:
        raise ConfigError(f"generate.guided_regex={pattern!r} matches no text at all")
    with _LOCK:
        _CACHE[pattern] = automaton
        while len(_CACHE) > CACHE_SIZE:
            _CACHE.popitem(last=False)
    return automaton


def _build_in_child(pattern: str, timeout: float) -> Automaton:
    try:
        done = subprocess.run([sys.executable, "-m", "lmforge.generate.automaton"], input=pattern, text=True,
                              capture_output=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        raise _refused(pattern, f"its automaton took over {timeout:g} s to build", TOO_COMPLEX) from None
    if done.returncode != 0:
        last = (done.stderr.strip().splitlines() or ["the child process failed"])[-1]
        if "MemoryError" in last:
            raise _refused(pattern, "its automaton needs more than 1 GiB", TOO_COMPLEX)
        raise _refused(pattern, last)
    return _from_json(done.stdout)


def _child() -> int:
    """python -m lmforge.generate.automaton: the pattern on stdin -> its automaton as JSON on stdout."""
    try:
        import resource

        resource.setrlimit(resource.RLIMIT_AS, (CHILD_MEMORY, CHILD_MEMORY))
    except (ImportError, ValueError, OSError):  # (not on every platform)
        pass
    pattern = sys.stdin.read()
    try:
        check_syntax(pattern)
        sys.stdout.write(_to_json(_from_interegular(pattern)))
    except ConfigError as e:
        print(str(e).split(" cannot be used: ", 1)[-1].rsplit(" (a regular", 1)[0], file=sys.stderr)
        return 1
    except MemoryError:
        print("MemoryError", file=sys.stderr)
        return 1
    except Exception as e:
        print(f"{type(e).__name__}: {_first_line(e)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(_child())
