"""A model's parts, in the order checkpoints are written: what comes before the decoder layers
(``"first"``: embeddings), each decoder layer (its index), and the rest (``"last"``: final norm,
head). Writers take a model a part at a time, so a model that is never whole in memory — one
loaded lazily (:class:`qframe.lazy.LazyModel`), or quantized and freed layer by layer — is
written exactly as one held in memory.

A writer that streams (the native checkpoint, and export backends with ``begin``/``part``/
``finish``, see :func:`write_in_parts`) returns each part's tensors by *stream*: the name of a
set of tensors that ends up in one file or set of files (``"native"``, ``"rank0"``); the parts
are spooled to disk (:class:`qframe.spool.Spool`) and the files assembled at the end.

Example::

    >>> from qframe.testing import make_registry, tiny_llama_model
    >>> from qframe.model import find_architecture
    >>> model = tiny_llama_model()
    >>> arch = find_architecture(model, make_registry())
    >>> model_parts(2), part_of("model.layers.1.mlp.up_proj.weight", arch), part_of("lm_head.weight", arch)
    (['first', 0, 1, 'last'], 1, 'last')
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any, Iterator, Protocol, Union

import torch
from torch import nn

Part = Union[str, int]  # "first", a decoder layer's index, or "last"
SPOOL = ".qframe-spool"  # inside an output being written: the parts written so far


def model_parts(num_layers: int) -> list[Part]:
    """Every part of a model of ``num_layers`` decoder layers, in writing order."""
    return ["first", *range(num_layers), "last"]


def part_label(part: Part) -> str:
    """A file name for ``part`` whose name order is the model's order.

    Example::

        >>> [part_label(p) for p in model_parts(2)]
        ['0-first', '1-layer-00000', '1-layer-00001', '2-last']
    """
    return f"1-layer-{part:05d}" if isinstance(part, int) else {"first": "0-first", "last": "2-last"}[part]


def part_of(name: str, arch: Any) -> Part:
    """The part a module or tensor name (``model.layers.3.mlp.up_proj``) belongs to."""
    inside = arch.layers_path + "."
    if name.startswith(inside):
        return int(name[len(inside):].split(".", 1)[0])
    if any(name == p or name.startswith(p + ".") for p in arch.pre_layer_paths):
        return "first"
    return "last"


def in_part(names: Any, part: Part, arch: Any) -> list:
    """The items of ``names`` (names, or ``(name, value)`` pairs) that belong to ``part``."""
    return [item for item in names if part_of(item if isinstance(item, str) else item[0], arch) == part]


def tied_names(model: nn.Module) -> dict[str, str]:
    """State-dict names that hold the very tensor an earlier name holds (``lm_head.weight`` tied
    to ``model.embed_tokens.weight``): alias -> the first name. Read off the module structure,
    so it works on the meta device as well.

    Example::

        >>> from qframe.testing import tiny_llama_model
        >>> tied_names(tiny_llama_model())
        {}
    """
    seen: dict[int, str] = {}
    tied = {}
    for name, tensor in model.state_dict(keep_vars=True).items():
        key = id(tensor)
        if key in seen and tensor.numel():
            tied[name] = seen[key]
        else:
            seen.setdefault(key, name)
    return tied


class PartLoader(Protocol):
    """What makes a model's parts real one at a time (a lazily loaded model)."""

    def load_part(self, part: Part) -> None: ...

    def free_part(self, part: Part) -> None: ...


@contextlib.contextmanager
def loaded(loader: PartLoader | None, part: Part) -> Iterator[None]:
    """``part`` loaded for the block (nothing to do without a loader: the model is in memory)."""
    if loader is None:
        yield
        return
    loader.load_part(part)
    try:
        yield
    finally:
        loader.free_part(part)


def write_in_parts(exporter: Any, description: Any, directory: Path, loader: PartLoader | None = None,
                   tokenizer: Any = None) -> Path:
    """Write ``description``'s model with a streaming exporter into ``directory``: its ``begin``
    (every check, from the modules' structure only: parts may still be on meta), then for each
    part, loaded by ``loader`` while it is written, its ``part`` (``{stream: tensors}`` of that
    part alone), spooled; then its ``finish``, which assembles the files from the spool and
    writes the rest (configs, tokenizer). The spool is removed afterwards.

    Example::

        >>> write_in_parts(HFExporter(), qmodel.describe(), Path("out/hf"))  # doctest: +SKIP
    """
    from . import faults
    from .spool import Spool

    session = exporter.begin(description)  # a refusal leaves nothing behind, not even the folder
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    spool = Spool(directory / SPOOL)
    try:
        for part in model_parts(description.num_layers):
            with loaded(loader, part):
                _spool_part(spool, part, exporter.part(session, part))
            if part == "first":
                faults.reach("export")
        exporter.finish(session, directory, spool, tokenizer)
    finally:
        spool.discard()
        with contextlib.suppress(OSError):
            (directory / SPOOL).rmdir()
    return directory


def _spool_part(spool: Any, part: Part, streams: dict[str, dict[str, torch.Tensor]]) -> None:
    # A function of its own: a loop variable left holding the last stream's tensors would keep
    # the part (an 8B model's 1 GB embeddings) alive while the next part is made.
    for stream, tensors in streams.items():
        spool.put(stream, part_label(part), tensors)


def to_meta(module: nn.Module, skip: str | None = None) -> None:
    """Send ``module``'s tensors to the meta device, releasing their memory, and keep tied
    tensors tied (``Module.to("meta")`` would give each module a parameter of its own).
    ``skip`` names a submodule (relative, e.g. ``"model.layers"``) left as it is.

    Example::

        >>> from qframe.testing import tiny_llama_model
        >>> model = tiny_llama_model(); to_meta(model, skip="model.layers")
        >>> model.lm_head.weight.is_meta, model.model.layers[0].mlp.up_proj.weight.is_meta
        (True, False)
    """
    memo: dict[int, torch.Tensor] = {}
    for name, sub in module.named_modules(remove_duplicate=False):
        if skip and (name == skip or name.startswith(skip + ".")):
            continue
        for key, param in list(sub._parameters.items()):
            if param is not None:
                if id(param) not in memo:
                    memo[id(param)] = param if param.is_meta else nn.Parameter(param.to("meta"),
                                                                              requires_grad=param.requires_grad)
                sub._parameters[key] = memo[id(param)]
        for key, buffer in list(sub._buffers.items()):
            if buffer is not None:
                if id(buffer) not in memo:
                    memo[id(buffer)] = buffer.to("meta")
                sub._buffers[key] = memo[id(buffer)]
