"""Plugin records: what a plugin yields from its hooks.

A record is frozen data that names a plugin, says what it does in one line, and points at
the ``factory`` that builds it. Importing heavy code waits until the factory is called.

Example::

    >>> from qframe import QuantizerPlugin
    >>> QuantizerPlugin(name="my-rtn", summary="round to nearest", factory=dict).name
    'my-rtn'
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar

from .errors import PluginError

_NAME = re.compile(r"[a-z0-9][a-z0-9_.-]*\Z")


@dataclass(frozen=True)
class PluginRecord:
    """Fields every plugin record has."""

    kind: ClassVar[str] = "plugin"
    name: str
    summary: str
    factory: Callable[..., Any]

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not _NAME.match(self.name):
            raise PluginError(
                f"{self.kind} plugin name {self.name!r} is not valid: names are lower-case "
                "and match [a-z0-9][a-z0-9_.-]*"
            )
        if not isinstance(self.summary, str) or not self.summary.strip():
            raise PluginError(f"{self.kind} plugin {self.name!r} needs a one-line summary")
        if not callable(self.factory):
            raise PluginError(f"{self.kind} plugin {self.name!r}: factory {self.factory!r} is not callable")


def _claims(record: PluginRecord, field_name: str) -> None:
    """Check that ``record.<field_name>`` is a tuple of non-empty strings (a list becomes one)."""
    value = getattr(record, field_name)
    if isinstance(value, str):  # ("llama") is a string, not a one-element tuple
        raise PluginError(f"{record.kind} plugin {record.name!r}: {field_name} must be a tuple of strings, got the "
                          f"string {value!r} (write ({value!r},))")
    if not isinstance(value, (tuple, list)) or not all(isinstance(v, str) and v for v in value):
        raise PluginError(f"{record.kind} plugin {record.name!r}: {field_name} must be a tuple of non-empty strings, "
                          f"got {value!r}")
    object.__setattr__(record, field_name, tuple(value))


@dataclass(frozen=True)
class CalibratorPlugin(PluginRecord):
    """Observes a stream of tensors and returns the range to quantize them with.

    ``factory(args: QuantArgs)`` returns an object with ``observe(tensor)`` and
    ``compute() -> (lo, hi)``; see :class:`qframe.calibrate.Calibrator`.
    """

    kind: ClassVar[str] = "calibrator"


@dataclass(frozen=True)
class QuantizerPlugin(PluginRecord):
    """An algorithm that turns a decoder layer's linears into quantized ones.

    ``factory(stage: StageSpec, options)`` returns a :class:`qframe.pipeline.Quantizer`.
    ``options`` is a dataclass built from the stage's ``options`` table (unknown keys are
    errors); ``check(stage)`` raises :class:`qframe.RecipeError` for formats the algorithm
    cannot produce, before any model is loaded.
    """

    kind: ClassVar[str] = "quantizer"
    options: type | None = None
    check: Callable[[Any], None] | None = None


@dataclass(frozen=True)
class BackendPlugin(PluginRecord):
    """Writes a quantized model in a format some runtime serves.

    ``factory(options)`` returns an exporter (``factory()`` when the plugin declares no
    ``options``; a factory that takes a ``registry`` keyword gets the plugins in use).
    ``options`` is a dataclass built from the recipe's ``[export]`` table (every key but
    ``backend``; unknown keys are errors). The exporter has:

    - ``export(qmodel, directory) -> Path``: write into ``directory`` (a fresh temporary
      directory that is renamed into place only when everything succeeded); read what to
      write from ``qmodel.describe()`` (a :class:`~qframe.description.ModelDescription`:
      each linear's formats, each layer's KV cache), never from the recipe;
    - optionally ``subdirectory``: where ``qframe apply`` puts it inside its output;
    - optionally ``check(description)``: raise :class:`qframe.ExportError` for what the format
      cannot express, naming the module. ``description`` is what the recipe's stages will
      produce on the model, said before calibration (from the model's config, no weights
      read): ``qframe validate RECIPE [--model M]``, ``apply --dry-run`` and ``apply`` call it
      before any data is read. Run the same code on ``qmodel.describe()`` in ``export``;
    - optionally ``validate(directory) -> list[str]``: the problems of a written directory
      (empty when valid); ``qframe.export`` runs it after every export, and ``qframe
      validate DIR`` from the command line, with ``recognizes(directory)`` telling which
      backend wrote a directory;
    - optionally ``build(directory)``: turn the written checkpoint into an engine, after it
      is in place (so a failed build never costs the checkpoint);
    - optionally, to stream (a model never whole in memory, :func:`qframe.parts.write_in_parts`):
      ``begin(description) -> session`` (every check, from the modules' structure alone: parts
      may be on the meta device), ``part(session, part) -> {stream: tensors}`` (the tensors
      of ``"first"``, one decoder layer's index, or ``"last"``, read from that part only) and
      ``finish(session, directory, spool, tokenizer)`` (assemble the files from the spooled
      parts, write the rest). ``qframe apply`` and ``qframe export DIR`` then feed it a part at
      a time; an exporter without them gets the model whole.
    """

    kind: ClassVar[str] = "backend"
    options: type | None = None


@dataclass(frozen=True)
class ArchitecturePlugin(PluginRecord):
    """Knows where a model family keeps its decoder layers, norms and linears.

    ``model_types`` lists the Hugging Face ``config.model_type`` values it serves (``"*"``: a
    fallback for any other model); two adapters claiming one model_type are an error naming
    both providers. ``factory()`` returns a :class:`qframe.model.Architecture`.
    """

    kind: ClassVar[str] = "architecture"
    model_types: tuple[str, ...] = field(default=())

    def __post_init__(self) -> None:
        super().__post_init__()
        _claims(self, "model_types")


@dataclass(frozen=True)
class DatasetPlugin(PluginRecord):
    """A source of text, named by the prefix of a dataset spec (``text:``, ``jsonl:``).

    ``factory(location: str, params: dict[str, str], context: DataContext)`` returns an
    iterable of documents (strings); :mod:`qframe.data` tokenizes and windows them.
    ``params`` lists the keys the source accepts after ``?`` in a spec.
    """

    kind: ClassVar[str] = "dataset"
    params: tuple[str, ...] = field(default=())
    # The source runs the model (``generated``): a model streamed a layer at a time is then
    # loaded whole while the data is made.
    needs_model: bool = False


@dataclass(frozen=True)
class LayoutPlugin(PluginRecord):
    """Where a backend's checkpoint puts each tensor of a model family (names, shapes, how
    tensor parallelism splits them), for the writer and the validator alike.

    ``model_types`` are the Hugging Face ``config.model_type`` values the layout writes;
    ``architectures`` the values of the checkpoint's own architecture key that it reads back
    (TensorRT-LLM's ``config.json`` ``"architecture"``), which the validator looks it up by.
    Two layouts of one ``backend`` claiming one model_type or one architecture are an error
    naming both providers. What ``factory`` is depends on the backend: for ``tensorrt-llm`` a
    subclass of :class:`qframe_plugins.tensorrt_llm.layout.Layout`, built with
    ``factory.from_hf(hf_config)`` (writer) or ``factory.from_checkpoint(config)`` (validator).

    Example::

        >>> LayoutPlugin(name="my-llama", summary="my Llama in TensorRT-LLM", factory=dict,
        ...              model_types=["my_llama"], architectures=("LlamaForCausalLM",)).model_types
        ('my_llama',)
    """

    kind: ClassVar[str] = "layout"
    backend: str = "tensorrt-llm"
    model_types: tuple[str, ...] = field(default=())
    architectures: tuple[str, ...] = field(default=())

    def __post_init__(self) -> None:
        super().__post_init__()
        if not isinstance(self.backend, str) or not _NAME.match(self.backend):
            raise PluginError(f"layout plugin {self.name!r}: backend {self.backend!r} is not a backend name")
        _claims(self, "model_types")
        _claims(self, "architectures")
        if not self.model_types and not self.architectures:
            raise PluginError(f"layout plugin {self.name!r} claims no model_types and no architectures, so nothing "
                              "would ever use it")


RECORD_TYPES: dict[str, type[PluginRecord]] = {
    cls.kind: cls
    for cls in (CalibratorPlugin, QuantizerPlugin, BackendPlugin, ArchitecturePlugin, DatasetPlugin, LayoutPlugin)
}
