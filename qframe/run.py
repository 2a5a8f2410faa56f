"""``qframe apply`` as a stream: the model read a part at a time, each finished decoder layer
written at once, and a record to resume from.

The model is opened lazily (:class:`qframe.lazy.LazyModel`: on the meta device, each decoder
layer read from its safetensors shards when its turn comes and freed once written), so CPU
and accelerator memory hold one decoder layer and the calibration activations, whatever the
depth. As each layer finishes, :class:`LayerWriter` spools its part of the native checkpoint
(:mod:`qframe.spool`), the next layer's inputs, and the record ``.qframe-resume.json`` — the
hashes of the recipe, the model and the calibration data, the device, and every finished
layer's report — into the hidden partial directory. When every layer is done the native
checkpoint is assembled and the export backend writes from it a part at a time
(:func:`qframe.parts.write_in_parts`).

A run that dies (a crash, ``kill -9``, a time limit) leaves that partial directory behind;
``qframe apply … --resume`` takes it up at the first unfinished layer, after checking that
the recipe, model, data and device are those it was started with (a difference is refused,
naming it), and ends with the bytes an uninterrupted run writes.

Example::

    >>> from qframe.run import Fingerprint
    >>> Fingerprint("r1", "m1", "d1", "cpu").differences(Fingerprint("r2", "m1", "d1", "cpu"))
    ['the recipe']
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from . import faults
from .checkpoint import install_structure, manifest_entries, write_native_part
from .distributed import Ranks
from .errors import QFrameError
from .model import ModelSource, check_finite_weights
from .parts import SPOOL, Part, part_of, to_meta
from .pipeline import LayerInputs, LayerWork, Resumed
from .quantized import QuantizedModel
from .spool import Spool

RECORD = ".qframe-resume.json"
RECORD_FORMAT = "qframe.resume"
INPUTS = "inputs"  # the spool stream holding the next layer's calibration inputs


@dataclass(frozen=True)
class Fingerprint:
    """What a resumed run must share with the run it continues: hashes of the resolved recipe,
    the model's files and the calibration tokens, and the device (numerics differ across them)."""

    recipe: str
    model: str
    data: str | None
    device: str

    def differences(self, other: "Fingerprint") -> list[str]:
        """What differs from ``other``, in words."""
        names = {"recipe": "the recipe", "model": "the model", "data": "the calibration data", "device": "the device"}
        return [names[key] for key in names if getattr(self, key) != getattr(other, key)]


def return_freed_memory() -> None:
    """Give the memory freed so far back to the system (glibc's ``malloc_trim``).

    glibc keeps freed blocks under its mmap threshold, which grows to 32 MiB as large blocks
    are freed, in the process's heap: quantizing a Llama-3-8B-shaped model on the CPU grew by
    about 145 MiB a decoder layer (2.3 GiB after one layer, 4.2 GiB after 16). A streamed run
    calls this as each layer is freed and stays flat. A no-op off glibc.

    Example::

        >>> return_freed_memory()
    """
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


@functools.lru_cache(maxsize=1)
def _malloc_trim() -> Any:
    import ctypes
    import ctypes.util
    import sys

    if not sys.platform.startswith("linux"):
        return None
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim
    except (OSError, AttributeError):  # not glibc (musl has no malloc_trim)
        return None


def recipe_hash(recipe_dict: dict[str, Any]) -> str:
    """The SHA-256 of a resolved recipe (:meth:`qframe.recipe.Recipe.to_dict`).

    Example::

        >>> recipe_hash({"stage": []}) == recipe_hash({"stage": []})
        True
    """
    return hashlib.sha256(json.dumps(recipe_dict, sort_keys=True, default=str).encode()).hexdigest()


def model_hash(source: ModelSource) -> str:
    """A fingerprint of the model's files: names, sizes and modification times of every file
    (and the config's content), without reading gigabytes of weights."""
    digest = hashlib.sha256(source.spec.encode())
    path = Path(source.location)
    files = sorted(p for p in path.iterdir() if p.is_file()) if path.is_dir() else [path] if path.exists() else []
    for file in files:
        stat = file.stat()
        digest.update(f"{file.name}:{stat.st_size}:{stat.st_mtime_ns}".encode())
        if file.name == "config.json":
            digest.update(file.read_bytes())
    return digest.hexdigest()


class LazyParts:
    """A :class:`~qframe.lazy.LazyModel` as the pipeline and the writers take it
    (:class:`qframe.parts.PartLoader`, plus ``load_layer``/``free_layer``): each part's weights
    are checked for NaN and inf as they arrive (set to 0 with ``nonfinite="zero"``)."""

    def __init__(self, lazy: Any, arch: Any, nonfinite: str, what: str) -> None:
        self.lazy, self.arch, self.nonfinite, self.what = lazy, arch, nonfinite, what
        self.model: nn.Module = lazy.model
        self.rest_loaded = False

    def load_part(self, part: Part) -> None:
        if isinstance(part, int):
            self.load_layer(part)
            return
        if self.rest_loaded:
            return
        inside = self.lazy.layers_path + "."
        if getattr(self.model.config.get_text_config(), "tie_word_embeddings", False):
            self.lazy.load_rest()  # the head is the embeddings: both parts need them
            self.rest_loaded = True
        else:  # one of them: an 8B model's embeddings and head are 1 GB each
            self.lazy.load_rest(only=lambda name: part_of(name, self.arch) == part)
        check_finite_weights([(n, t) for n, t in [*self.model.named_parameters(), *self.model.named_buffers()]
                              if not n.startswith(inside) and not t.is_meta], self.nonfinite, self.what)

    def free_part(self, part: Part) -> None:
        if isinstance(part, int):
            self.free_layer(part)
        else:
            to_meta(self.model, skip=self.lazy.layers_path)
            self.rest_loaded = False
            return_freed_memory()

    def load_layer(self, index: int) -> nn.Module:
        layer = self.lazy.load_layer(index)
        prefix = f"{self.lazy.layers_path}.{index}"
        check_finite_weights([*layer.named_parameters(prefix), *layer.named_buffers(prefix)], self.nonfinite,
                             self.what)
        return layer

    def free_layer(self, index: int) -> None:
        to_meta(self.lazy.layer(index))
        return_freed_memory()

    def load_all(self) -> None:
        """Every part: the whole model in memory (what a dataset that runs the model needs)."""
        self.load_part("first")
        self.load_part("last")
        for index in range(self.lazy.num_layers):
            self.load_layer(index)

    def free_all(self) -> None:
        to_meta(self.model)
        self.rest_loaded = False


class LayerWriter:
    """The pipeline's :class:`~qframe.pipeline.LayerSink` for a streamed run: spools each finished
    layer's native tensors and the next layer's inputs, then updates the resume record.

    Across ranks (:mod:`qframe.distributed`) rank 0 writes the layers and the record, and each
    rank spools the inputs of its own share of the batches (a stream of its own); the record
    names a layer done only once every rank's inputs for the next one are on disk.
    """

    def __init__(self, directory: Path, qmodel: QuantizedModel, arch: Any, fingerprint: Fingerprint,
                 ranks: Ranks | None = None) -> None:
        self.directory, self.qmodel, self.arch, self.fingerprint = Path(directory), qmodel, arch, fingerprint
        self.ranks = ranks
        self.writes = ranks is None or ranks.writer
        self.inputs = INPUTS if ranks is None else f"{INPUTS}.rank{ranks.rank}of{ranks.size}"
        self.spool = Spool(self.directory / SPOOL)
        self.state: dict[str, Any] = {"format": RECORD_FORMAT, "fingerprint": asdict(fingerprint), "done": 0,
                                      "report": [], "entries": {"modules": {}, "experts": {}, "kv_cache": {}},
                                      "native": False}

    def layer_done(self, work: LayerWork, entry: dict[str, Any], inputs: LayerInputs | None) -> None:
        faults.reach("layer")
        if self.writes:
            write_native_part(self.qmodel, self.spool, work.index, self.arch)
        if inputs is not None:
            self.spool.put(self.inputs, f"{work.index + 1:05d}", {f"hidden.{i}": h for i, h in enumerate(inputs.hidden)})
        self._together()  # every rank's inputs are on disk before the record says the layer is done
        if self.writes:
            for table, items in manifest_entries(self.qmodel.model, work.prefix + ".").items():
                self.state["entries"][table].update(items)
            self.state["report"].append(entry)
            self.state["done"] = work.index + 1
            self.save()
        self._together()  # and the record names the new inputs before any rank removes its old ones
        for old in self.spool.parts(self.inputs):
            if old != f"{work.index + 1:05d}":
                (self.spool.directory / self.inputs / f"{old}.safetensors").unlink(missing_ok=True)

    def _together(self) -> None:
        if self.ranks is not None:
            self.ranks.barrier()

    def save(self) -> None:
        """Write the record atomically (a temporary name, then a rename)."""
        scratch = self.directory / f"{RECORD}.tmp"
        scratch.write_text(json.dumps(self.state, default=str) + "\n")
        os.replace(scratch, self.directory / RECORD)

    def resume(self, record: dict[str, Any], dtype: torch.dtype) -> Resumed:
        """Take up ``record`` (checked against this run's fingerprint): the finished layers get
        their quantized structure back (on meta), and their report; the inputs of the first
        unfinished layer are read back."""
        theirs = Fingerprint(**record["fingerprint"])
        differs = self.fingerprint.differences(theirs)
        if differs:
            raise QFrameError(f"cannot resume in {self.directory}: {', '.join(differs)} differ{'s' if len(differs) == 1 else ''} "
                              "from the interrupted run's; run without --resume to start afresh, or resume with "
                              "the same recipe, model, data and device")
        self.state = record
        entries = {"dtype": str(dtype).removeprefix("torch."), **record["entries"]}
        install_structure(self.qmodel.model, entries, self.directory / RECORD)
        hidden: list[torch.Tensor] = []
        done = record["done"]
        if done < len(self.arch.decoder_layers(self.qmodel.model)) and f"{done:05d}" in self.spool.parts(self.inputs):
            from safetensors.torch import load_file

            saved = load_file(str(self.spool.directory / self.inputs / f"{done:05d}.safetensors"))
            hidden = [saved[f"hidden.{i}"] for i in range(len(saved))]
        return Resumed(done, list(record["report"]), hidden)

    def discard_inputs(self) -> None:
        self.spool.discard(self.inputs)


def read_record(directory: Path) -> dict[str, Any] | None:
    """The resume record in ``directory``, or None where there is none or it is unreadable."""
    try:
        record = json.loads((Path(directory) / RECORD).read_text())
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) and record.get("format") == RECORD_FORMAT else None
