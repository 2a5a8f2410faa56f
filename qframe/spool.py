"""Safetensors files written a part at a time, so that no checkpoint is ever whole in memory.

A safetensors file is a JSON header (every tensor's name, dtype, shape and byte range) followed
by the tensors' bytes, so it cannot be appended to. qframe therefore writes each finished part
of a checkpoint — the tensors before the decoder layers, one decoder layer, the tensors after
them — as a small safetensors file of its own in a :class:`Spool`, and assembles the final
files at the end by copying byte ranges (:meth:`Spool.assemble`): memory holds one part, then
a copy buffer. The part files are what a resumed run finds already done.

The assembled file is byte for byte what ``safetensors.torch.save_file`` writes for the same
tensors (same order, same header, same padding), which the tests check; so an output streamed
part by part and one saved from a model in memory are the same bytes.

Example::

    >>> import tempfile, torch
    >>> from safetensors.torch import load_file
    >>> spool = Spool(Path(tempfile.mkdtemp()))
    >>> spool.put("model", "layer-00000", {"a": torch.ones(2)})
    >>> spool.put("model", "layer-00001", {"b": torch.zeros(3, dtype=torch.int8)})
    >>> out = spool.assemble("model", Path(tempfile.mkdtemp()) / "model.safetensors", {"format": "pt"})
    >>> sorted(load_file(str(out)))
    ['a', 'b']
"""

from __future__ import annotations

import functools
import json
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

import torch

__all__ = ["Spool", "TensorEntry", "read_header", "save_tensors", "write_safetensors"]

_COPY_CHUNK = 64 << 20  # bytes read and written at a time while assembling


@dataclass(frozen=True)
class TensorEntry:
    """One tensor of a safetensors file: where its bytes are, and what they hold."""

    name: str
    dtype: str  # the safetensors dtype name, e.g. "BF16"
    shape: tuple[int, ...]
    file: Path
    start: int  # absolute byte offset of the data in ``file``
    nbytes: int


def read_header(path: Path) -> tuple[dict, int]:
    """A safetensors file's header (as a dict) and the absolute offset where its data begins.

    Example::

        >>> import tempfile, torch
        >>> from safetensors.torch import save_file
        >>> f = Path(tempfile.mkdtemp()) / "t.safetensors"; save_file({"x": torch.ones(2)}, str(f))
        >>> read_header(f)[0]["x"]["shape"]
        [2]
    """
    with open(path, "rb") as handle:
        (length,) = struct.unpack("<Q", handle.read(8))
        header = json.loads(handle.read(length))
    return header, 8 + length


def entries_of(path: Path) -> list[TensorEntry]:
    """The tensors of the safetensors file ``path``, in the file's order."""
    header, base = read_header(path)
    header.pop("__metadata__", None)
    found = [TensorEntry(name, info["dtype"], tuple(info["shape"]), path, base + info["data_offsets"][0],
                         info["data_offsets"][1] - info["data_offsets"][0]) for name, info in header.items()]
    return sorted(found, key=lambda e: e.start)


@functools.lru_cache(maxsize=1)
def _dtypes() -> tuple[dict[str, int], dict[torch.dtype, str]]:
    """How safetensors names each torch dtype, and where each dtype goes in a file it writes: it
    orders tensors by dtype (in the order of its own dtype list, reversed) and then by name.
    Both are read off safetensors itself, so the installed version's are the ones followed."""
    from safetensors.torch import save

    candidates = [torch.float64, torch.float32, torch.float16, torch.bfloat16, torch.int64, torch.int32,
                  torch.int16, torch.int8, torch.uint8, torch.bool, torch.float8_e4m3fn, torch.float8_e5m2,
                  getattr(torch, "uint16", None), getattr(torch, "uint32", None), getattr(torch, "uint64", None),
                  getattr(torch, "float8_e8m0fnu", None), torch.complex64]
    probes = {}
    for dtype in candidates:
        if dtype is None:
            continue
        try:
            save({"x": torch.zeros(1, dtype=dtype)})
        except Exception:  # a dtype this safetensors cannot write
            continue
        probes[str(dtype)] = dtype
    data = save({name: torch.zeros(1, dtype=dtype) for name, dtype in probes.items()})
    (length,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8:8 + length])
    header.pop("__metadata__", None)
    names = {probes[key]: info["dtype"] for key, info in header.items()}
    ordered = sorted(header.values(), key=lambda info: info["data_offsets"][0])
    return {info["dtype"]: rank for rank, info in enumerate(ordered)}, names


def _dtype_rank() -> dict[str, int]:
    return _dtypes()[0]


def _in_file_order(entries: Iterable[TensorEntry]) -> list[TensorEntry]:
    rank = _dtype_rank()
    ordered = sorted(entries, key=lambda e: (rank[e.dtype], e.name))
    names = [e.name for e in ordered]
    if len(set(names)) != len(names):
        twice = sorted({n for n in names if names.count(n) > 1})
        raise ValueError(f"tensors written twice into one file: {', '.join(twice[:5])}")
    return ordered


def save_tensors(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> Path:
    """``safetensors.torch.save_file``, byte for byte, without building the whole file in memory
    first (which doubles the memory a part takes): the header, then each tensor's bytes written
    straight from its storage.

    Example::

        >>> import tempfile
        >>> from safetensors.torch import save_file
        >>> d = Path(tempfile.mkdtemp()); t = {"w": torch.ones(2, 3, dtype=torch.bfloat16), "s": torch.ones(())}
        >>> save_file(t, str(d / "a")); _ = save_tensors(d / "b", t)
        >>> (d / "a").read_bytes() == (d / "b").read_bytes()
        True
    """
    names = _dtypes()[1]
    entries = _in_file_order(TensorEntry(n, names[t.dtype], tuple(t.shape), Path(), 0, t.numel() * t.element_size())
                             for n, t in tensors.items())
    with open(path, "wb") as out:
        out.write(_header_bytes(entries, metadata))
        for entry in entries:
            _write_bytes(out, tensors[entry.name])
    return Path(path)


_CHUNK_BYTES = 64 << 20


def _write_bytes(out, tensor: torch.Tensor) -> None:
    """Write ``tensor``'s bytes; one on an accelerator comes over in chunks, so that a layer's
    calibration activations (gigabytes on the GPU) never stand whole in CPU memory."""
    flat = tensor.detach().contiguous().reshape(-1).view(torch.uint8)
    for start in range(0, flat.numel(), _CHUNK_BYTES):  # a CPU tensor's chunks are views: no copy
        out.write(flat[start:start + _CHUNK_BYTES].cpu().numpy().data)


def _header_bytes(entries: list[TensorEntry], metadata: dict[str, str] | None) -> bytes:
    """The header safetensors writes for ``entries`` (already in file order): compact JSON,
    metadata first, padded with spaces to a multiple of 8 bytes."""
    header: dict = {}
    if metadata:
        header["__metadata__"] = dict(metadata)
    offset = 0
    for entry in entries:
        header[entry.name] = {"dtype": entry.dtype, "shape": list(entry.shape),
                              "data_offsets": [offset, offset + entry.nbytes]}
        offset += entry.nbytes
    text = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    text += b" " * (-(len(text) + 8) % 8)
    return struct.pack("<Q", len(text)) + text


def write_safetensors(path: Path, entries: Iterable[TensorEntry], metadata: dict[str, str] | None = None) -> Path:
    """Write a safetensors file at ``path`` whose tensors' bytes are copied from where
    ``entries`` say they are; the file is what ``save_file`` would write for those tensors.
    Two entries of one name are an error.

    Example::

        >>> import tempfile, torch
        >>> from safetensors.torch import save_file
        >>> d = Path(tempfile.mkdtemp()); save_file({"x": torch.ones(3)}, str(d / "a.safetensors"))
        >>> _ = write_safetensors(d / "b.safetensors", entries_of(d / "a.safetensors"))
        >>> (d / "a.safetensors").read_bytes() == (d / "b.safetensors").read_bytes()
        True
    """
    ordered = _in_file_order(entries)
    path = Path(path)
    handles: dict[Path, object] = {}
    try:
        with open(path, "wb") as out:
            out.write(_header_bytes(ordered, metadata))
            for entry in ordered:
                source = handles.get(entry.file)
                if source is None:
                    source = handles[entry.file] = open(entry.file, "rb")
                source.seek(entry.start)
                left = entry.nbytes
                while left:
                    chunk = source.read(min(left, _COPY_CHUNK))
                    if not chunk:
                        raise OSError(f"{entry.file} ends before the bytes of {entry.name}")
                    out.write(chunk)
                    left -= len(chunk)
    finally:
        for handle in handles.values():
            handle.close()
    return path


class Spool:
    """Parts of safetensors files on disk, by stream (one stream per output file, or per set of
    files a writer splits itself) and part name, to be assembled into the final files.

    ``put`` writes a part atomically (a temporary name, then a rename), so a part that exists is
    complete; a part written again replaces the old one. Parts are assembled in name order.
    """

    def __init__(self, directory: Path) -> None:
        self.directory = Path(directory)

    def _folder(self, stream: str) -> Path:
        return self.directory / stream

    def put(self, stream: str, part: str, tensors: dict[str, torch.Tensor]) -> None:
        """Write ``tensors`` as part ``part`` of ``stream``."""
        folder = self._folder(stream)
        folder.mkdir(parents=True, exist_ok=True)
        final = folder / f"{part}.safetensors"
        scratch = folder / f".{part}.tmp"
        save_tensors(scratch, tensors)
        os.replace(scratch, final)

    def parts(self, stream: str) -> list[str]:
        """The parts of ``stream`` written so far, in name order."""
        folder = self._folder(stream)
        return sorted(p.name[:-len(".safetensors")] for p in folder.glob("*.safetensors")) if folder.is_dir() else []

    def streams(self) -> list[str]:
        """Every stream that has parts."""
        return sorted(p.name for p in self.directory.iterdir() if p.is_dir()) if self.directory.is_dir() else []

    def entries(self, stream: str, parts: Iterable[str] | None = None) -> list[TensorEntry]:
        """The tensors of ``stream``'s parts (all of them by default), part by part in name order,
        each part's in its file's order."""
        chosen = self.parts(stream) if parts is None else list(parts)
        return [e for part in chosen for e in entries_of(self._folder(stream) / f"{part}.safetensors")]

    def assemble(self, stream: str, path: Path, metadata: dict[str, str] | None = None,
                 entries: Iterable[TensorEntry] | None = None) -> Path:
        """Write ``stream``'s tensors (or the given ``entries`` of it) into the safetensors file ``path``."""
        return write_safetensors(Path(path), self.entries(stream) if entries is None else entries, metadata)

    def discard(self, stream: str | None = None) -> None:
        """Remove one stream's parts, or all of them."""
        import shutil

        for name in [stream] if stream else self.streams():
            shutil.rmtree(self._folder(name), ignore_errors=True)
