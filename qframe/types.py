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
    ``options``). ``options`` is a dataclass built from the recipe's ``[export]`` table
    (every key but ``backend``; unknown keys are errors). The exporter has:

    - ``export(qmodel, directory) -> Path``: write into ``directory`` (a fresh temporary
      directory that is renamed into place only when everything succeeded);
    - optionally ``subdirectory``: where ``qframe apply`` puts it inside its output;
    - optionally ``check_recipe(recipe)``: raise :class:`qframe.ExportError` (or
      :class:`qframe.RecipeError`) for what the format cannot express that the recipe alone
      decides, naming the stage: each stage's formats, different algorithms across stages.
      :func:`qframe.recipe.resolve` calls it, so ``qframe validate RECIPE`` and
      ``apply --dry-run`` refuse such a recipe before any model loads;
    - optionally ``check(model, recipe)``: raise :class:`qframe.ExportError` for what the
      format cannot express, after the model is loaded and *before* it is calibrated
      (``check_recipe``'s rules and those that need the model's shapes: run the same helper
      for the former rather than writing the rules twice);
    - optionally ``validate(directory) -> list[str]``: the problems a written directory
      has (empty when valid); ``qframe.export`` runs it after every export, and
      ``qframe validate DIR`` from the command line, with ``recognizes(directory)``
      telling which backend wrote a directory;
    - optionally ``build(directory)``: turn the written checkpoint into an engine, after it
      is in place (so a failed build never costs the checkpoint).
    """

    kind: ClassVar[str] = "backend"
    options: type | None = None


@dataclass(frozen=True)
class ArchitecturePlugin(PluginRecord):
    """Knows where a model family keeps its decoder layers, norms and linears.

    ``model_types`` lists the Hugging Face ``config.model_type`` values it serves;
    ``factory()`` returns a :class:`qframe.model.Architecture`.
    """

    kind: ClassVar[str] = "architecture"
    model_types: tuple[str, ...] = field(default=())


@dataclass(frozen=True)
class DatasetPlugin(PluginRecord):
    """A source of text, named by the prefix of a dataset spec (``text:``, ``jsonl:``).

    ``factory(location: str, params: dict[str, str], context: DataContext)`` returns an
    iterable of documents (strings); :mod:`qframe.data` tokenizes and windows them.
    ``params`` lists the keys the source accepts after ``?`` in a spec.
    """

    kind: ClassVar[str] = "dataset"
    params: tuple[str, ...] = field(default=())


RECORD_TYPES: dict[str, type[PluginRecord]] = {
    cls.kind: cls
    for cls in (CalibratorPlugin, QuantizerPlugin, BackendPlugin, ArchitecturePlugin, DatasetPlugin)
}
