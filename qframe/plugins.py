"""The plugin manager: built-ins from a module list, third parties from entry points.

Example::

    >>> from qframe.plugins import build_registry
    >>> registry = build_registry(entry_points=False)
    >>> registry.get("quantizer", "rtn").summary
    'round-to-nearest weights (int2-8, FP8, NVFP4, MXFP4), optional activations'
"""

from __future__ import annotations

import functools
import importlib
import os
from dataclasses import dataclass
from importlib import metadata
from typing import Iterable, Iterator

import pluggy

from . import hookspecs
from .errors import PluginError
from .types import RECORD_TYPES, ArchitecturePlugin, LayoutPlugin, PluginRecord

ENTRY_POINT_GROUP = "qframe"
DISABLE_ENV = "QFRAME_DISABLE_PLUGINS"

# The built-in plugins. Removing a module here removes a feature, never breaks the core.
BUILTIN_MODULES: tuple[str, ...] = (
    "qframe_plugins.minmax",
    "qframe_plugins.histogram",
    "qframe_plugins.mse",
    "qframe_plugins.rtn",
    "qframe_plugins.fp",
    "qframe_plugins.kv_cache",
    "qframe_plugins.smoothquant",
    "qframe_plugins.awq",
    "qframe_plugins.gptq",
    "qframe_plugins.tensorrt_llm",
    "qframe_plugins.tensorrt_llm.layout",
    "qframe_plugins.hf",
    "qframe_plugins.compressed_tensors",
    "qframe_plugins.llama",
    "qframe_plugins.gpt2",
    "qframe_plugins.neox",
    "qframe_plugins.opt",
    "qframe_plugins.phi3",
    "qframe_plugins.gemma",
    "qframe_plugins.moe",
    "qframe_plugins.structural",
    "qframe_plugins.text_datasets",
    "qframe_plugins.generated",
    "qframe_plugins.native",
)


@dataclass(frozen=True)
class Entry:
    """A record together with who provided it."""

    record: PluginRecord
    provider: str  # the registered plugin name: a built-in module or an entry-point name
    distribution: str  # "name version" of the installed distribution

    @property
    def kind(self) -> str:
        return self.record.kind


@dataclass(frozen=True)
class LoadFailure:
    """A plugin that could not be imported or whose hook raised; the rest still work."""

    plugin: str
    distribution: str
    error: str

    def __str__(self) -> str:
        return f'Error importing plugin "{self.plugin}" (from {self.distribution}): {self.error}'


class Registry:
    """Every plugin record by kind and name, built once from a plugin manager.

    Besides names, records claim keys that must have one owner: an architecture adapter its
    ``model_types`` (``"*"``, the fallback, may be claimed by several), a layout its
    ``model_types`` and ``architectures`` within its backend. Two owners of one key is a
    :class:`~qframe.PluginError` naming both providers, as two owners of one name are.

    Example::

        >>> from qframe.plugins import build_registry
        >>> registry = build_registry(entry_points=False)
        >>> registry.adapter("qwen2").record.name, registry.layout("tensorrt-llm", model_type="qwen2").record.name
        ('llama', 'qwen2')
    """

    def __init__(self, entries: Iterable[Entry], failures: Iterable[LoadFailure] = ()):
        self.failures = tuple(failures)
        self._by_kind: dict[str, dict[str, Entry]] = {kind: {} for kind in RECORD_TYPES}
        # (kind, backend or "", what is claimed, value) -> the entry that claims it
        self._claims: dict[tuple[str, str, str, str], Entry] = {}
        for entry in entries:
            slot = self._by_kind[entry.kind]
            if entry.record.name in slot:
                other = slot[entry.record.name]
                raise PluginError(
                    f"{entry.kind} {entry.record.name!r} is provided twice: by plugin "
                    f"{other.provider!r} ({other.distribution}) and by plugin {entry.provider!r} "
                    f"({entry.distribution}). Uninstall one, or block one with "
                    f"{DISABLE_ENV}={entry.provider} (or ={other.provider})."
                )
            slot[entry.record.name] = entry
            for key in _claimed_keys(entry.record):
                self._claim(key, entry)

    def _claim(self, key: tuple[str, str, str, str], entry: Entry) -> None:
        other = self._claims.setdefault(key, entry)
        if other is entry or other.record.name == entry.record.name:
            return  # one record listing a value twice
        kind, backend, what, value = key
        kinds = f"{backend} {kind}s" if backend else f"{kind} adapters" if kind == "architecture" else f"{kind}s"
        raise PluginError(
            f"{kinds} {other.record.name!r} (plugin {other.provider!r}, {other.distribution}) and "
            f"{entry.record.name!r} (plugin {entry.provider!r}, {entry.distribution}) both claim {what} {value!r}, "
            f"and only one can serve it. Uninstall one, or block one with {DISABLE_ENV}={entry.provider} "
            f"(or ={other.provider})."
        )

    def entries(self, kind: str | None = None) -> list[Entry]:
        kinds = [kind] if kind else list(self._by_kind)
        return [e for k in kinds for _, e in sorted(self._by_kind[k].items())]

    def names(self, kind: str) -> list[str]:
        return sorted(self._by_kind[kind])

    def entry(self, kind: str, name: str) -> Entry:
        try:
            return self._by_kind[kind][name]
        except KeyError:
            known = ", ".join(self.names(kind)) or "none"
            hint = "".join(f" ({f})" for f in self.failures if name in f.plugin)
            raise PluginError(f"unknown {kind} {name!r}; installed: {known}{hint}") from None

    def get(self, kind: str, name: str) -> PluginRecord:
        return self.entry(kind, name).record

    def adapter(self, model_type: str | None) -> Entry | None:
        """The architecture adapter that claims ``model_type`` (not the ``"*"`` fallbacks), or None.

        Example::

            >>> build_registry(entry_points=False).adapter("gpt2").record.name
            'gpt2'
        """
        return self._claims.get(("architecture", "", "model_type", model_type)) if model_type else None

    def layout(self, backend: str, *, model_type: str | None = None, architecture: str | None = None) -> Entry | None:
        """The ``backend``'s layout that claims ``model_type`` (writing) or ``architecture``
        (reading a checkpoint back), or None.

        Example::

            >>> build_registry(entry_points=False).layout("tensorrt-llm", architecture="GPT2LMHeadModel").record.name
            'gpt2'
        """
        if (model_type is None) == (architecture is None):
            raise TypeError("name exactly one of model_type and architecture")
        what, value = ("model_type", model_type) if model_type is not None else ("architecture", architecture)
        return self._claims.get(("layout", backend, what, value))


def _claimed_keys(record: PluginRecord) -> Iterator[tuple[str, str, str, str]]:
    """The keys a record must own alone (see :class:`Registry`)."""
    if isinstance(record, ArchitecturePlugin):
        yield from (("architecture", "", "model_type", t) for t in record.model_types if t != "*")
    elif isinstance(record, LayoutPlugin):
        yield from (("layout", record.backend, "model_type", t) for t in record.model_types)
        yield from (("layout", record.backend, "architecture", a) for a in record.architectures)


def _iter_entry_points() -> Iterator[metadata.EntryPoint]:
    yield from metadata.entry_points(group=ENTRY_POINT_GROUP)


def _disabled_from_env() -> set[str]:
    return {name.strip() for name in os.environ.get(DISABLE_ENV, "").split(",") if name.strip()}


def make_plugin_manager() -> pluggy.PluginManager:
    """A fresh pluggy manager that knows qframe's hook specs and nothing else."""
    pm = pluggy.PluginManager(hookspecs.PROJECT)
    pm.add_hookspecs(hookspecs)
    return pm


def build_registry(
    *,
    builtins: bool = True,
    entry_points: bool = True,
    plugins: Iterable[object] = (),
    disabled: Iterable[str] | None = None,
) -> Registry:
    """Collect records from built-ins, entry points and ``plugins`` (objects or modules).

    ``disabled`` names providers to skip (default: ``$QFRAME_DISABLE_PLUGINS``): a built-in
    by its module (``qframe_plugins.rtn``), a third-party plugin by its entry-point name.
    """
    blocked = _disabled_from_env() if disabled is None else set(disabled)
    pm = make_plugin_manager()
    distributions: dict[str, str] = {}
    failures: list[LoadFailure] = []

    def register(plugin: object, name: str, dist: str) -> None:
        if name in blocked:
            return
        try:
            pm.register(plugin, name=name)
        except ValueError:
            taken = "that name is taken" if pm.has_plugin(name) else f"it is registered already as {pm.get_name(plugin)!r}"
            raise PluginError(f"plugin {name!r} ({dist}) cannot be registered: {taken}") from None
        except pluggy.PluginValidationError as exc:  # e.g. a hook that takes arguments
            raise PluginError(f"plugin {name!r} ({dist}) cannot be registered: {' '.join(str(exc).split())}") from None
        distributions[name] = dist

    if builtins:
        from . import __version__

        for module_name in BUILTIN_MODULES:
            if module_name not in blocked:
                register(importlib.import_module(module_name), module_name, f"qframe {__version__}")
    if entry_points:
        for ep in _iter_entry_points():
            dist = f"{ep.dist.name} {ep.dist.version}" if ep.dist else "unknown distribution"
            if ep.name in blocked:
                continue
            try:
                plugin = ep.load()
            except Exception as exc:  # a broken plugin must not take the others down
                failures.append(LoadFailure(ep.name, dist, f"{type(exc).__name__}: {exc}"))
                continue
            try:
                register(plugin, ep.name, dist)
            except PluginError as exc:
                failures.append(LoadFailure(ep.name, dist, str(exc)))
    for index, plugin in enumerate(plugins):
        register(plugin, getattr(plugin, "__name__", f"inline-{index}"), "inline")

    entries: list[Entry] = []
    for kind, hook_name in hookspecs.HOOKS.items():
        record_type = RECORD_TYPES[kind]
        for impl in getattr(pm.hook, hook_name).get_hookimpls():
            provider = pm.get_name(impl.plugin)
            dist = distributions[provider]
            try:
                records = list(impl.function() or ())
            except Exception as exc:
                failures.append(LoadFailure(provider, dist, f"{hook_name}: {type(exc).__name__}: {exc}"))
                continue
            wrong = [r for r in records if not isinstance(r, record_type)]
            if wrong:  # reported like a hook that raised: one bad plugin must not take the rest down
                failures.append(LoadFailure(provider, dist, f"{hook_name} yielded {wrong[0]!r}, expected {record_type.__name__}"))
                continue
            entries.extend(Entry(record, provider, dist) for record in records)
    return Registry(entries, failures)


@functools.cache
def default_registry() -> Registry:
    """The process-wide registry: built-ins plus installed entry points."""
    return build_registry()


class KindView:
    """``qframe.quantizers.get("rtn")`` and friends: one kind of the default registry.

    Example::

        >>> import qframe
        >>> "minmax" in qframe.calibrators.names()
        True
    """

    def __init__(self, kind: str):
        self.kind = kind

    def names(self) -> list[str]:
        return default_registry().names(self.kind)

    def record(self, name: str) -> PluginRecord:
        return default_registry().get(self.kind, name)

    def get(self, name: str):
        """The plugin's factory: call it to build the calibrator, quantizer, ..."""
        return self.record(name).factory

    def __repr__(self) -> str:
        return f"<qframe {self.kind}s: {', '.join(self.names())}>"
