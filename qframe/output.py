"""Output directories: never half-written, never someone else's, one writer at a time.

qframe rewrites checkpoints, so what it writes follows five rules:

- **Nothing partial looks finished.** A run writes into a hidden sibling,
  ``.NAME.partial-PID``, and puts it in place only when everything succeeded.
- **Only qframe's own output is replaced.** Every finished directory carries a record,
  ``.qframe-files.json``, of each file qframe wrote with its size, time and SHA-256 (a file
  whose time changed must still hash the same). An existing
  directory is replaced only when that record proves qframe wrote all of it, unchanged
  (a sub-directory with a record of its own, such as ``DIR/hf`` written later by
  ``qframe export``, proves itself); anything else in it is named and nothing is touched.
- **One writer per path.** An exclusive lock on ``.NAME.qframe-lock`` beside the output.
- **The path is never empty.** The new directory and the old one trade places in one atomic
  exchange (Linux ``renameat2(RENAME_EXCHANGE)``); where the system has none, two renames,
  and a run killed between them is repaired by the next run into the same path.
- **Leftovers are cleaned.** A partial directory carries a marker file, and an old output moved
  aside carries its record; the next run into the same path (holding its lock, so no live run
  owns them) removes those a dead run left.

Example::

    >>> import tempfile
    >>> root = Path(tempfile.mkdtemp())
    >>> with writing(root / "out") as tmp:
    ...     _ = (tmp / "model.txt").write_text("codes")
    >>> sorted(p.name for p in (root / "out").iterdir())
    ['.qframe-files.json', 'model.txt']
    >>> unproven(root / "out")
    []
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import hashlib
import json
import math
import os
import shutil
import signal
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterable, Iterator

from .errors import QFrameError

RECORD = ".qframe-files.json"
RECORD_FORMAT = "qframe.files"
MARKER = ".qframe-partial"  # inside every partial directory: it is qframe's and may be removed
LOCK_SUFFIX = ".qframe-lock"
SIGNATURE = "written by qframe"  # the first line of markers and lock files


class Terminated(BaseException):
    """SIGTERM, raised in the main thread so that every ``with`` block cleans up as for Ctrl-C."""


def raise_on_sigterm() -> None:
    """Turn SIGTERM into :class:`Terminated` (the CLI calls this first).

    Example::

        >>> raise_on_sigterm()  # doctest: +SKIP
    """

    def handler(_signum, _frame):
        raise Terminated()

    signal.signal(signal.SIGTERM, handler)


# -- proving a directory is qframe's ----------------------------------------------------------

def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while chunk := handle.read(1 << 22):
            digest.update(chunk)
    return digest.hexdigest()


def _is_own_transient(path: Path) -> bool:
    """A marker or lock file qframe leaves while it works (recognized by name and content)."""
    if path.name != MARKER and not path.name.endswith(LOCK_SUFFIX):
        return False
    try:
        with path.open("r", encoding="utf-8", errors="replace") as handle:
            return handle.read(len(SIGNATURE)) == SIGNATURE
    except OSError:
        return False


def is_partial(path: Path) -> bool:
    """Whether ``path`` is a directory qframe marked as unfinished work (:func:`make_partial`)."""
    return path.is_dir() and not path.is_symlink() and _is_own_transient(path / MARKER)


def seal(directory: str | os.PathLike) -> Path:
    """Write ``directory``'s record: every file in it (sub-directories that hold a record of
    their own excepted) with its size, time and SHA-256. Run it when a directory is complete.

    Example::

        >>> import tempfile
        >>> d = Path(tempfile.mkdtemp()); _ = (d / "a.txt").write_text("x")
        >>> sorted(json.loads(seal(d).read_text())["files"])
        ['a.txt']
    """
    directory = Path(directory)
    files = {}
    for path in _walk(directory):
        if path.name == MARKER and path.parent == directory:
            continue
        stat = path.stat()
        files[path.relative_to(directory).as_posix()] = {"size": stat.st_size, "mtime_ns": stat.st_mtime_ns,
                                                         "sha256": _sha256(path)}
    record = directory / RECORD
    record.write_text(json.dumps({"format": RECORD_FORMAT, "files": files}, indent=1, sort_keys=True) + "\n")
    return record


def _walk(directory: Path) -> Iterator[Path]:
    """Every file below ``directory``, not descending into sub-directories that hold a record
    (they are sealed on their own) or qframe's partial directories; the record is left out."""
    for entry in sorted(directory.iterdir()):
        if entry.is_dir() and not entry.is_symlink():
            if not ((entry / RECORD).is_file() or is_partial(entry)):
                yield from _walk(entry)
        elif entry.name != RECORD:
            yield entry


def unproven(directory: str | os.PathLike, limit: int | None = None) -> list[str]:
    """What in ``directory`` qframe cannot prove it wrote: files missing from its record or
    changed since, files it does not list, links, and the same inside sealed sub-directories.
    Empty when qframe may replace the directory; qframe's own leftovers (markers, locks,
    partial directories of dead runs) do not count.

    Example::

        >>> import tempfile
        >>> d = Path(tempfile.mkdtemp()); _ = (d / "thesis.tex").write_text("x")
        >>> unproven(d)
        ['thesis.tex (not written by qframe)']
    """
    directory = Path(directory)
    found: list[str] = []
    _unproven(directory, directory, found, limit)
    return found


def _unproven(directory: Path, root: Path, found: list[str], limit: int | None) -> None:
    """Check ``directory`` against its own record (what is missing from it, what it does not list)."""
    try:
        record = json.loads((directory / RECORD).read_text(encoding="utf-8"))
        listed = record["files"] if record.get("format") == RECORD_FORMAT else None
        if not isinstance(listed, dict):
            listed = None
    except (OSError, ValueError, TypeError, KeyError, AttributeError, RecursionError):
        listed = None
    if listed is None:
        listed = {}
        if (directory / RECORD).exists():
            found.append(f"{(directory / RECORD).relative_to(root).as_posix()} (not a qframe record)")
    seen: set[str] = set()
    _scan(directory, directory, listed, seen, root, found, limit)
    for missing in sorted(set(listed) - seen):
        if limit is None or len(found) < limit:
            found.append(f"{(directory / missing).relative_to(root).as_posix()} (listed by qframe but missing)")


def _scan(folder: Path, top: Path, listed: dict, seen: set, root: Path, found: list, limit: int | None) -> None:
    """Check every entry of ``folder`` (inside ``top``, whose record is ``listed``)."""
    for entry in sorted(folder.iterdir()):
        if limit is not None and len(found) >= limit:
            return
        if (entry.name == RECORD and folder == top) or _is_own_transient(entry) or is_partial(entry):
            continue
        if entry.is_symlink():
            found.append(f"{entry.relative_to(root).as_posix()} (a link qframe did not make)")
        elif entry.is_dir():
            if (entry / RECORD).is_file():
                _unproven(entry, root, found, limit)  # sealed on its own, e.g. DIR/hf
            else:
                _scan(entry, top, listed, seen, root, found, limit)
        else:
            _check_file(entry, top, listed, seen, root, found)


def _check_file(path: Path, top: Path, listed: dict, seen: set, root: Path, found: list) -> None:
    key = path.relative_to(top).as_posix()
    entry = listed.get(key)
    shown = path.relative_to(root).as_posix()
    if not isinstance(entry, dict):
        found.append(f"{shown} (not written by qframe)")
        return
    seen.add(key)
    try:
        stat = path.stat()
        # Same size and time: untouched since (a copy that keeps times is too). Else the hash decides.
        same = stat.st_size == entry.get("size") and (stat.st_mtime_ns == entry.get("mtime_ns")
                                                      or _sha256(path) == entry.get("sha256"))
    except OSError:
        same = False
    if not same:
        found.append(f"{shown} (changed since qframe wrote it)")


# -- the lock --------------------------------------------------------------------------------

@contextmanager
def _locked(target: Path) -> Iterator[None]:
    """Hold an exclusive lock on ``target``'s lock file, or fail at once naming the holder."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - not POSIX: no lock, the rest still holds
        yield
        return
    path = target.parent / f".{target.name}{LOCK_SUFFIX}"
    while True:
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as exc:
            raise QFrameError(f"cannot create the lock file {str(path)!r} for output {str(target)!r}: "
                              f"{exc.strerror or exc}; choose another --output") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            holder = os.read(fd, 200).decode("utf-8", "replace").split("\n")[1:2]
            os.close(fd)
            pid = f" (process {holder[0]})" if holder and holder[0] else ""
            raise QFrameError(f"another qframe run{pid} is writing {str(target)!r}; wait for it to finish or "
                              "choose another --output") from None
        # The holder before us may have removed the file after we opened it: then lock anew.
        try:
            same = os.fstat(fd).st_ino == os.stat(path).st_ino
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)
    try:
        os.ftruncate(fd, 0)
        os.write(fd, f"{SIGNATURE}\n{os.getpid()}\n".encode())
        yield
    finally:
        try:
            os.unlink(path)
        finally:
            os.close(fd)


# -- the exchange ----------------------------------------------------------------------------

_RENAME_EXCHANGE = 2
_AT_FDCWD = -100


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths atomically (Linux ``renameat2``); False where the system cannot."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    renameat2.argtypes = (ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint)
    if renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.EINVAL, errno.ENOSYS, errno.ENOTSUP, errno.EOPNOTSUPP):
        return False  # the file system cannot exchange: fall back to two renames
    raise OSError(code, os.strerror(code), str(b))


@contextmanager
def _signals_held() -> Iterator[None]:
    """Hold SIGINT and SIGTERM back while directories trade places (a few system calls)."""
    held = {signal.SIGINT, signal.SIGTERM}
    try:
        previous = signal.pthread_sigmask(signal.SIG_BLOCK, held)
    except (AttributeError, ValueError, OSError):  # not POSIX, or not the main thread
        yield
        return
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


def _replace(tmp: Path, target: Path) -> None:
    """Put the complete ``tmp`` at ``target``; what was there goes, and ``target`` is never empty.
    The old output ends up under a partial name; sealed, it proves itself removable wherever a
    kill leaves it (:func:`_clean_leftovers`)."""
    from . import faults

    faults.reach("rename")
    with _signals_held():
        if not target.exists():
            os.rename(tmp, target)
            old = None
        elif _exchange(tmp, target):
            old = tmp
        else:
            old = target.parent / f".{target.name}.old-{os.getpid()}"
            os.rename(target, old)
            faults.reach("between-renames")
            os.rename(tmp, target)
        _discard_marker(target)
    faults.reach("after-rename")
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def make_partial(directory: Path) -> Path:
    """Create ``directory`` for unfinished work, marked so that whatever a kill leaves of it is
    known as qframe's and removed by the next run (:func:`finish_partial` takes the mark off).

    Example::

        >>> import tempfile
        >>> work = make_partial(Path(tempfile.mkdtemp()) / ".engine.partial-1")
        >>> is_partial(work), is_partial(finish_partial(work))
        (True, False)
    """
    directory.mkdir()
    (directory / MARKER).write_text(f"{SIGNATURE}\n{os.getpid()}\n")
    return directory


def finish_partial(directory: Path) -> Path:
    """Take the unfinished-work mark off ``directory`` (see :func:`make_partial`)."""
    _discard_marker(directory)
    return directory


def _discard_marker(directory: Path) -> None:
    try:
        (directory / MARKER).unlink()
    except FileNotFoundError:
        pass


def _clean_leftovers(target: Path, keep: Path | None = None) -> list[Path]:
    """Remove qframe's partial directories of ``target`` left by dead runs (the caller holds the
    lock, so no live run owns them), but ``keep``; restore an old output a run died without replacing."""
    parent = target.parent
    leftovers = sorted(p for p in parent.glob(f".{glob_escape(target.name)}.*") if _is_leftover(p) and p != keep)
    if not target.exists():
        olds = [p for p in leftovers if p.name.startswith(f".{target.name}.old-")]
        if olds:  # killed between two renames: the old output was already out of place
            newest = max(olds, key=lambda p: p.stat().st_mtime)
            os.rename(newest, target)
            leftovers.remove(newest)
    for path in leftovers:
        shutil.rmtree(path, ignore_errors=True)
    return leftovers


def _is_leftover(path: Path) -> bool:
    """A partial directory of a run into this target (marked), or an old output a run moved aside
    (sealed, and unchanged since)."""
    if path.is_symlink() or not path.is_dir():
        return False
    return is_partial(path) or ((path / RECORD).is_file() and not unproven(path, limit=1))


def glob_escape(name: str) -> str:
    """``name`` with glob metacharacters escaped. Example: ``glob_escape("a[1]")`` is ``'a[[]1]'``."""
    return "".join(f"[{c}]" if c in "*?[" else c for c in name)


# -- the public context manager ------------------------------------------------------------------

def _checked_target(target: Path, protect: Iterable[str | os.PathLike]) -> Path:
    target = Path(os.path.abspath(os.path.expanduser(target)))
    if target.parent == target:
        raise QFrameError(f"output {str(target)!r} is a file system root; choose a directory below it")
    for ancestor in reversed(target.parents):
        if ancestor.exists() and not ancestor.is_dir():
            raise QFrameError(f"output {str(target)!r} goes through {str(ancestor)!r}, which is a file, not a "
                              "directory; choose another --output")
    if target.is_symlink():
        raise QFrameError(f"output {str(target)!r} is a symbolic link; qframe replaces only directories it wrote "
                          "itself: choose another --output")
    if target.exists() and not target.is_dir():
        raise QFrameError(f"output {str(target)!r} is a file, not a directory; choose another --output")
    for path in protect:
        inside = Path(os.path.abspath(os.path.expanduser(path)))
        if inside == target or target in inside.parents:
            raise QFrameError(f"output {str(target)!r} would replace {str(inside)!r}, which this run reads; "
                              "choose an --output outside it")
    return target


def resumable(target: Path, record: str) -> Path | None:
    """The newest partial directory of ``target`` a dead run left with a ``record`` file in it
    (what ``qframe apply --resume`` continues), or None."""
    found = [p for p in target.parent.glob(f".{glob_escape(target.name)}.partial-*")
             if is_partial(p) and (p / record).is_file()]
    return max(found, key=lambda p: (p / record).stat().st_mtime_ns) if found else None


@contextmanager
def writing(target: str | os.PathLike, *, protect: Iterable[str | os.PathLike] = (),
            record: str | None = None, resume: bool = False) -> Iterator[Path]:
    """Yield a fresh hidden sibling of ``target`` to write into. When the block succeeds it is
    sealed (:func:`seal`) and put at ``target``; when it fails (an error, Ctrl-C, SIGTERM) it
    disappears and ``target`` is as it was. Raises :class:`QFrameError` (before anything is
    written) when ``target`` holds anything qframe cannot prove it wrote (:func:`unproven`),
    when another run is writing it, or when it is or holds a path in ``protect`` (what the
    run reads, such as its model).

    ``record`` names a file that makes a partial directory resumable: this run's, when it fails
    with that file in it, is kept for the next run; with ``resume``, the newest such directory
    a dead run left is yielded again (renamed as this run's) instead of a fresh one.

    Example::

        >>> with writing("out/w4a16", protect=["models/llama"]) as tmp:  # doctest: +SKIP
        ...     save_native(qmodel, tmp)
    """
    target = _checked_target(Path(target), protect)
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise QFrameError(f"cannot create the output's parent directory {str(target.parent)!r}: "
                          f"{exc.strerror or exc}; choose another --output") from None
    with _locked(target):
        adopted = resumable(target, record) if resume and record else None
        removed = _clean_leftovers(target, keep=adopted)
        if removed:
            print(f"qframe: removed {len(removed)} partial output(s) of interrupted runs beside {target}",
                  file=sys.stderr)
        if target.exists():
            foreign = unproven(target, limit=6)
            if foreign:
                shown = ", ".join(foreign[:5]) + (", ..." if len(foreign) > 5 else "")
                raise QFrameError(f"output {str(target)!r} exists and holds what qframe did not write or what "
                                  f"changed since it did: {shown}. qframe replaces only its own, unchanged "
                                  "output; choose another --output, or move those files away first")
        tmp = target.parent / f".{target.name}.partial-{os.getpid()}"
        try:
            if adopted is not None:
                os.rename(adopted, tmp)
                (tmp / MARKER).write_text(f"{SIGNATURE}\n{os.getpid()}\n")
            else:
                make_partial(tmp)
        except OSError as exc:
            raise QFrameError(f"cannot write beside {str(target)!r}: {exc.strerror or exc}; "
                              "choose another --output") from None
        try:
            yield tmp
            if record:
                (tmp / record).unlink(missing_ok=True)
            seal(tmp)
            _replace(tmp, target)
        except BaseException as exc:
            # Kept for --resume: what a crash or a signal interrupted, and a dead run's work that
            # this run refused to continue; bad input (a QFrameError) would fail again: removed.
            keep = adopted is not None or not isinstance(exc, QFrameError) or getattr(exc, "resumable", False)
            if record and keep and is_partial(tmp) and (tmp / record).is_file():
                print(f"qframe: the finished layers stay in {tmp}; the same command with --resume continues "
                      "from there", file=sys.stderr)
            elif _is_leftover(tmp):  # the new output, or the old one once the exchange was made
                shutil.rmtree(tmp, ignore_errors=True)
            raise


# -- strict JSON -----------------------------------------------------------------------------------

def non_finite(value: Any, path: str = "") -> str | None:
    """The key path of the first NaN or infinity in ``value`` (a JSON-like tree), or None.

    Example::

        >>> non_finite({"layers": [{"error": float("nan")}]})
        'layers[0].error'
    """
    if isinstance(value, float):
        return None if math.isfinite(value) else (path or "(value)")
    if isinstance(value, dict):
        for key, item in value.items():
            found = non_finite(item, f"{path}.{key}" if path else str(key))
            if found:
                return found
    if isinstance(value, (list, tuple)):
        for i, item in enumerate(value):
            found = non_finite(item, f"{path}[{i}]")
            if found:
                return found
    return None


def strict_dumps(value: Any, what: str, **kwargs: Any) -> str:
    """``json.dumps`` that refuses NaN and infinity (not JSON) with a :class:`QFrameError` naming
    the key, instead of writing a file other tools cannot read.

    Example::

        >>> strict_dumps({"perplexity": 12.5}, "the report")
        '{"perplexity": 12.5}'
    """
    bad = non_finite(value)
    if bad:
        raise QFrameError(f"{what} holds a value that is not finite at {bad}; a non-finite result is a failed "
                          "run, not a number to report (check the model and data for overflow)")
    return json.dumps(value, allow_nan=False, **kwargs)
