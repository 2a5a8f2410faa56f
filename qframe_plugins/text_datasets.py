"""Text from files: ``text:`` (a .txt file or a folder of them), ``jsonl:`` (one field of
each line) and ``hf:`` (a Hugging Face dataset, where the hub or a local copy is reachable).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Iterator

from qframe import DatasetPlugin, hookimpl
from qframe.errors import DataError


def _existing(location: str, spec: str) -> Path:
    path = Path(location).expanduser()
    if not location or not path.exists():
        raise DataError(f"dataset {spec}:{location}: no such file or folder")
    return path


def read_text(location: str, params: dict, context) -> Iterator[str]:
    """Each .txt file (a folder is read recursively, in name order) is one document."""
    path = _existing(location, "text")
    files = sorted(path.rglob("*.txt")) if path.is_dir() else [path]
    if not files:
        raise DataError(f"dataset text:{location}: the folder holds no .txt files")
    for file in files:
        try:
            yield file.read_text(encoding="utf-8", errors="replace")
        except OSError as exc:
            raise DataError(f"dataset text:{location}: cannot read {file}: {exc}") from None


def read_jsonl(location: str, params: dict, context) -> Iterator[str]:
    """The ``field`` (default ``text``) of each JSON line is one document."""
    path = _existing(location, "jsonl")
    name = params.get("field", "text")
    with path.open(encoding="utf-8") as lines:
        for number, line in enumerate(lines, 1):
            if not line.strip():
                continue
            try:
                value = json.loads(line)[name]
            except json.JSONDecodeError as exc:
                raise DataError(f"dataset jsonl:{location}: line {number} is not JSON ({exc.msg})") from None
            except (KeyError, TypeError):
                raise DataError(f"dataset jsonl:{location}: line {number} has no field {name!r} (set ?field=NAME)") from None
            if not isinstance(value, str):
                raise DataError(f"dataset jsonl:{location}: line {number}: field {name!r} is not a string")
            yield value


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
            f"dataset hf:{location}: cannot load it ({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}); "
            "offline, point hf: at a local copy, or use text: or jsonl:"
        ) from None
    name = params.get("field", "text")
    if name not in table.column_names:
        raise DataError(f"dataset hf:{location}: no column {name!r}; columns: {', '.join(table.column_names)}")
    yield from table[name]


@hookimpl
def qframe_datasets():
    yield DatasetPlugin(name="text", summary="a .txt file, or a folder of them", factory=read_text)
    yield DatasetPlugin(name="jsonl", summary="one string field of each JSON line", factory=read_jsonl, params=("field",))
    yield DatasetPlugin(name="hf", summary="a Hugging Face dataset (hub id or local folder)", factory=read_hf,
                        params=("config", "split", "field"))
