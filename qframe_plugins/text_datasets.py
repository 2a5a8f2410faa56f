"""Text from files: ``text:`` (a .txt file or a folder of them), ``jsonl:`` (one field of
each line) and ``hf:`` (a Hugging Face dataset, where the hub or a local copy is reachable).

``text:`` and ``jsonl:`` read regular files only: a device (``/dev/zero``), a FIFO or a socket
could be read without end, so they are refused, naming the path.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Iterator

from qframe import DatasetPlugin, hookimpl
from qframe.errors import PATH_LIMIT, DataError, shorten


def _existing(location: str, source: str) -> Path:
    path = Path(location).expanduser()
    if not location or not path.exists():
        raise DataError(f"dataset {_named(source, location)}: no such file or folder")
    return path


def _named(source: str, location: str) -> str:
    """``source:location`` quoted for a message: bounded, and on one line."""
    return shorten(f"{source}:{location}", PATH_LIMIT)


def _regular(file: Path, source: str, location: str) -> Path:
    """``file`` when it is a regular file; a device, FIFO or socket is refused (reading one
    may never end, as /dev/zero's does not)."""
    if not file.is_file():
        what = "a folder" if file.is_dir() else "not a regular file (a device, FIFO or socket)"
        raise DataError(f"dataset {_named(source, location)}: {shorten(str(file), PATH_LIMIT)} is {what}; "
                        f"give a regular {'.txt file or a folder of them' if source == 'text' else '.jsonl file'}")
    return file


def _encodable(text: str, where: str) -> str:
    """``text``, unless it holds a lone surrogate (JSON's ``"\\ud800"``), which is no
    character and which a tokenizer refuses."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise DataError(f"{where} holds {shorten(exc.object[exc.start:exc.end])} at character {exc.start}, a lone "
                        "UTF-16 surrogate that is not text") from None
    return text


def read_text(location: str, params: dict, context) -> Iterator[str]:
    """Each .txt file (a folder is read recursively, in name order) is one document.

    Example::

        >>> next(read_text("/dev/zero", {}, None))
        Traceback (most recent call last):
        ...
        qframe.errors.DataError: dataset 'text:/dev/zero': '/dev/zero' is not a regular file (a device, FIFO or socket); give a regular .txt file or a folder of them
    """
    path = _existing(location, "text")
    if path.is_dir():  # folders named *.txt are walked, not read
        files = [_regular(f, "text", location) for f in sorted(path.rglob("*.txt")) if not f.is_dir()]
    else:
        files = [_regular(path, "text", location)]
    if not files:
        raise DataError(f"dataset {_named('text', location)}: the folder holds no .txt files")
    for file in files:
        try:
            yield file.read_text(encoding="utf-8", errors="replace")
        except OSError as exc:
            raise DataError(f"dataset {_named('text', location)}: cannot read {shorten(str(file), PATH_LIMIT)}: "
                            f"{exc.strerror or exc}") from None


def read_jsonl(location: str, params: dict, context) -> Iterator[str]:
    """The ``field`` (default ``text``) of each JSON line is one document.

    Lines are read as bytes and decoded one by one, so that a line that is not UTF-8 is
    named by its number.
    """
    path = _regular(_existing(location, "jsonl"), "jsonl", location)
    name = params.get("field", "text")
    where = f"dataset {_named('jsonl', location)}"
    try:
        with path.open("rb") as lines:
            for number, raw in enumerate(lines, 1):
                try:
                    line = raw.decode("utf-8")
                except UnicodeDecodeError as exc:
                    raise DataError(f"{where}: line {number} is not UTF-8 text ({exc.reason} at byte "
                                    f"{exc.start})") from None
                if not line.strip():
                    continue
                try:
                    value = json.loads(line)[name]
                except json.JSONDecodeError as exc:
                    raise DataError(f"{where}: line {number} is not JSON ({exc.msg})") from None
                except RecursionError:
                    raise DataError(f"{where}: line {number} nests arrays or objects too deeply to parse") from None
                except ValueError as exc:  # e.g. an integer of more digits than Python converts
                    raise DataError(f"{where}: line {number} is not usable JSON ({shorten(str(exc))})") from None
                except (KeyError, TypeError):
                    raise DataError(f"{where}: line {number} has no field {shorten(name)} (set ?field=NAME)") from None
                if not isinstance(value, str):
                    raise DataError(f"{where}: line {number}: field {shorten(name)} is not a string")
                yield _encodable(value, f"{where}: line {number}: field {shorten(name)}")
    except OSError as exc:
        raise DataError(f"{where}: cannot read it: {exc.strerror or exc}") from None


def read_hf(location: str, params: dict, context) -> Iterator[str]:
    """``hf:NAME?config=..&split=train&field=text`` through the ``datasets`` package;
    NAME may be a hub id or a local folder."""
    try:
        import datasets
    except ImportError:
        raise DataError("dataset hf:... needs the 'datasets' package: pip install 'qframe[hf]'") from None
    try:
        table = datasets.load_dataset(location, params.get("config") or None, split=params.get("split", "train"))
    except Exception as exc:
        raise DataError(
            f"dataset {_named('hf', location)}: cannot load it ({type(exc).__name__}: {shorten(str(exc), 300)}); "
            "offline, point hf: at a local copy, or use text: or jsonl:"
        ) from None
    name = params.get("field", "text")
    if name not in table.column_names:
        raise DataError(f"dataset {_named('hf', location)}: no column {shorten(name)}; "
                        f"columns: {shorten(', '.join(table.column_names), 300)}")
    for row, value in enumerate(table[name]):  # what is not a string, qframe.data refuses by number
        yield _encodable(value, f"dataset {_named('hf', location)}: row {row}") if isinstance(value, str) else value


@hookimpl
def qframe_datasets():
    yield DatasetPlugin(name="text", summary="a .txt file, or a folder of them", factory=read_text)
    yield DatasetPlugin(name="jsonl", summary="one string field of each JSON line", factory=read_jsonl, params=("field",))
    yield DatasetPlugin(name="hf", summary="a Hugging Face dataset (hub id or local folder)", factory=read_hf,
                        params=("config", "split", "field"))
