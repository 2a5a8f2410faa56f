"""TOML recipes: parse, override, validate, and resolve against the plugin registry.

A recipe is data; it can never execute code. Every error names the file, the key path,
the bad value and what is allowed.

Example::

    >>> recipe = load_recipe("recipes/rtn_w4a16.toml", overrides={"stage.0.weights.group_size": 64})  # doctest: +SKIP
    >>> recipe.stages[0].scheme.weights.group_size                                                   # doctest: +SKIP
    64
"""

from __future__ import annotations

import dataclasses
import inspect
import re
import sys
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Iterable, Mapping

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

from .data import MAX_SAMPLES, check_window_sizes
from .errors import PATH_LIMIT, QFrameError, RecipeError, shorten
from .model import DTYPES, NONFINITE
from .scheme import QuantArgs, QuantScheme, check_plain, probe_names


@dataclass(frozen=True)
class ModelSpec:
    """The ``[model]`` table.

    ``id``: a hub id, a local directory, a ``.gguf`` file or ``pkg:MODULE/FILE`` (``--model``
    overrides it). ``dtype``: ``auto`` or one of :data:`qframe.model.DTYPES`. ``nonfinite``:
    what loading does with NaN or infinite weights: ``"error"`` (the default) refuses the
    model naming them; ``"zero"`` sets them to 0 and says how many it changed.

    Example::

        >>> ModelSpec(nonfinite="zero").nonfinite
        'zero'
        >>> ModelSpec(nonfinite="skip")
        Traceback (most recent call last):
        ...
        qframe.errors.RecipeError: nonfinite: 'skip' is not valid; allowed: error, zero
    """

    id: str | None = None
    dtype: str = "auto"
    nonfinite: str = "error"

    def __post_init__(self) -> None:
        if self.nonfinite not in NONFINITE:
            raise RecipeError("nonfinite", self.nonfinite, f"allowed: {', '.join(NONFINITE)}")


PROPAGATE = ("quantized", "float")
OFFLOAD = ("auto", "device", "cpu")
SEEDS = 1 << 63  # torch.Generator.manual_seed takes less than 2**64; the manifest, a JSON int64
MAX_STAGES = 256
# read_toml's guards: tomllib's memory grows with the square of a dotted key's length (a
# 200 KB run of "a.a.a..." takes tens of GB), and no recipe key is more than a few deep.
MAX_RECIPE_BYTES = 1 << 20
MAX_KEY_PARTS = 32
# Possessive quantifiers and a start only where a key can start keep the search linear in the
# text's length (a 40 KB string otherwise costs seconds of backtracking).
_KEY_RUN = re.compile(r"""(?<![A-Za-z0-9_"'-])(?:(?:[A-Za-z0-9_-]++|"[^"\n]*+"|'[^'\n]*+')[ \t]*+\.[ \t]*+){%d}"""
                      % MAX_KEY_PARTS)


@dataclass(frozen=True)
class CalibrationSpec:
    """Where calibration text comes from and how it flows through the layers.

    ``propagate`` chooses what each decoder layer is calibrated on: ``"quantized"`` (the
    default) feeds it the outputs of the layers before it as quantized, so it sees, and
    can compensate for, their error; ``"float"`` feeds it the unquantized model's
    activations, as modelopt calibrates (the whole float model at once). Static
    activation ranges come out tighter on the float stream, since upstream rounding noise
    widens the extremes. Either way no second copy of the activations is kept.

    Bounds: ``samples`` and ``seq_len`` at most 2**20 each and 2**28 tokens together
    (:func:`qframe.data.check_window_sizes`), ``batch_size`` at most ``MAX_SAMPLES``, and
    ``0 <= seed < 2**63``.
    """

    dataset: str = "generated"
    samples: int = 128
    seq_len: int = 512
    seed: int = 0
    batch_size: int = 8
    propagate: str = "quantized"
    offload: str = "auto"


@dataclass(frozen=True)
class StageSpec:
    quantizer: str
    scheme: QuantScheme
    options: Mapping[str, Any] = field(default_factory=dict)

    @property
    def static_activations(self) -> bool:
        """Whether input ranges must be calibrated on data (static activation quantization)."""
        acts = self.scheme.activations
        return acts is not None and not acts.dynamic

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"quantizer": self.quantizer, "targets": list(self.scheme.targets),
                               "ignore": list(self.scheme.ignore)}
        for role in ("weights", "activations"):
            args = getattr(self.scheme, role)
            if args is not None:
                out[role] = args.to_dict()
        out["options"] = dict(self.options)
        return out


@dataclass(frozen=True)
class ExportSpec:
    """The ``[export]`` table: a backend, and every other key is that backend's option
    (checked against its ``options`` dataclass when the recipe is resolved)."""

    backend: str = "qframe"
    options: Mapping[str, Any] = field(default_factory=dict)

    @classmethod
    def from_table(cls, table: Any) -> "ExportSpec":
        """Example::

            >>> ExportSpec.from_table({"backend": "tensorrt-llm", "tp_size": 2})
            ExportSpec(backend='tensorrt-llm', options={'tp_size': 2})
        """
        if not isinstance(table, Mapping):
            raise RecipeError("export", table, "expected a table")
        table = dict(table)
        backend = table.pop("backend", "qframe")
        if not isinstance(backend, str) or not backend:
            raise RecipeError("export.backend", backend, "expected a backend name, e.g. \"tensorrt-llm\"")
        return cls(backend, table)


@dataclass(frozen=True)
class Recipe:
    model: ModelSpec
    calibration: CalibrationSpec
    stages: tuple[StageSpec, ...]
    export: ExportSpec
    source: str | None = None

    def to_dict(self) -> dict[str, Any]:
        """The resolved recipe, as the manifest records it."""
        return {
            "model": dataclasses.asdict(self.model),
            "calibration": dataclasses.asdict(self.calibration),
            "stage": [s.to_dict() for s in self.stages],
            "export": {"backend": self.export.backend, **self.export.options},
        }


# -- parsing ---------------------------------------------------------------------------------

def build_dataclass(cls: type, table: Any, key: str) -> Any:
    """Build a flat dataclass from a TOML table: unknown keys and wrong types are errors.

    Example::

        >>> build_dataclass(ModelSpec, {"dtype": "bfloat16"}, "model").dtype
        'bfloat16'
    """
    if not isinstance(table, Mapping):
        raise RecipeError(key, table, "expected a table")
    known = {f.name: f for f in fields(cls) if f.init}
    for name, value in table.items():
        if name not in known:
            raise RecipeError(_join(key, name), value, f"unknown key; allowed: {', '.join(known)}")
        check_plain(_join(key, name), value)
        default = known[name].default
        if default is dataclasses.MISSING and known[name].default_factory is not dataclasses.MISSING:
            default = known[name].default_factory()  # a list or table: check the value's kind too
        if default is not dataclasses.MISSING and default is not None and value is not None:
            expected = type(default)
            ok = isinstance(value, expected) and not (isinstance(value, bool) and expected is not bool)
            if expected is float and isinstance(value, int) and not isinstance(value, bool):
                ok = True
            if not ok:
                raise RecipeError(_join(key, name), value, f"expected {expected.__name__}")
    try:
        return cls(**table)
    except RecipeError as exc:  # raised by the dataclass's own __post_init__
        raise exc.within(key) from None
    except TypeError as exc:  # a required key is missing
        raise RecipeError(key, dict(table), str(exc)) from None


def _join(key: str, name: str) -> str:
    return f"{key}.{name}" if key else name


def _positive(key: str, value: int) -> None:
    if value < 1:
        raise RecipeError(key, value, "expected a positive integer")


def _strings(key: str, value: Any) -> tuple[str, ...]:
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise RecipeError(key, value, "expected a list of strings")
    return tuple(value)


def _parse_stage(table: Any, key: str) -> StageSpec:
    if not isinstance(table, Mapping):
        raise RecipeError(key, table, "expected a [[stage]] table")
    allowed = ("quantizer", "targets", "ignore", "weights", "activations", "options")
    for name, value in table.items():
        if name not in allowed:
            raise RecipeError(f"{key}.{name}", value, f"unknown key; allowed: {', '.join(allowed)}")
    quantizer = table.get("quantizer")
    if not isinstance(quantizer, str) or not quantizer:
        raise RecipeError(f"{key}.quantizer", quantizer, "every stage names a quantizer, e.g. quantizer = \"rtn\"")
    args: dict[str, QuantArgs | None] = {}
    for role in ("weights", "activations"):
        if role in table:
            try:
                args[role] = QuantArgs.from_table(table[role], role=role)
            except RecipeError as exc:
                raise exc.within(f"{key}.{role}") from None
    if not args:
        raise RecipeError(key, dict(table), "a stage quantizes weights, activations or both; add weights = { bits = ... }")
    targets = _strings(f"{key}.targets", table.get("targets", list(QuantScheme.targets)))
    ignore = _strings(f"{key}.ignore", table.get("ignore", ["lm_head"]))
    try:
        scheme = QuantScheme(targets=targets, ignore=ignore, **args)
    except RecipeError as exc:
        raise exc.within(key) from None
    options = table.get("options", {})
    if not isinstance(options, Mapping):
        raise RecipeError(f"{key}.options", options, "expected a table")
    check_plain(f"{key}.options", options)
    return StageSpec(quantizer, scheme, dict(options))


def parse_recipe(data: Mapping[str, Any], source: str | None = None) -> Recipe:
    """Turn a TOML document (already parsed) into a validated :class:`Recipe`."""
    try:
        allowed = ("model", "calibration", "stage", "export")
        for name, value in data.items():
            if name not in allowed:
                raise RecipeError(name, value, f"unknown table; allowed: {', '.join(allowed)}")
        model = build_dataclass(ModelSpec, data.get("model", {}), "model")  # nonfinite: its __post_init__
        if model.id is not None and not isinstance(model.id, str):
            raise RecipeError("model.id", model.id, "expected a string: a hub id, a local directory or a .gguf file")
        if model.dtype != "auto" and model.dtype not in DTYPES:
            raise RecipeError("model.dtype", model.dtype, f"allowed: auto, {', '.join(DTYPES)}")
        calibration = build_dataclass(CalibrationSpec, data.get("calibration", {}), "calibration")
        for name in ("samples", "seq_len", "batch_size"):
            _positive(f"calibration.{name}", getattr(calibration, name))
        check_window_sizes(calibration.samples, calibration.seq_len, "calibration.samples", "calibration.seq_len")
        if calibration.batch_size > MAX_SAMPLES:  # more windows a batch than any calibration takes
            raise RecipeError("calibration.batch_size", calibration.batch_size, f"expected at most {MAX_SAMPLES}")
        if not 0 <= calibration.seed < SEEDS:
            raise RecipeError("calibration.seed", calibration.seed, "expected an integer from 0 to 2**63 - 1")
        if calibration.propagate not in PROPAGATE:
            raise RecipeError("calibration.propagate", calibration.propagate, f"allowed: {', '.join(PROPAGATE)}")
        if calibration.offload not in OFFLOAD:
            raise RecipeError("calibration.offload", calibration.offload, f"allowed: {', '.join(OFFLOAD)}")
        stages = data.get("stage")
        if not isinstance(stages, list) or not stages:
            raise RecipeError("stage", stages, "a recipe needs at least one [[stage]] table")
        if len(stages) > MAX_STAGES:
            raise RecipeError("stage", stages, f"a recipe has at most {MAX_STAGES} [[stage]] tables")
        parsed = tuple(_parse_stage(t, f"stage[{i}]") for i, t in enumerate(stages))
        export = ExportSpec.from_table(data.get("export", {}))
    except RecipeError as exc:
        raise exc.within(source=source) from None
    return Recipe(model, calibration, parsed, export, source)


def _parse_value(text: str, key: str = "") -> Any:
    """A --set value: any TOML value (64, true, "x", [1, 2]), else the bare string.

    Example::

        >>> _parse_value("[1, 2]"), _parse_value("text:book.txt")
        ([1, 2], 'text:book.txt')
    """
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except RecursionError:  # arrays or tables nested thousands deep
        raise RecipeError(key, text, "nested too deeply to parse; expected a TOML value such as 64, "
                          "\"text\" or [1, 2]", source="--set") from None
    except ValueError:  # TOMLDecodeError, and integers of more digits than Python converts
        return text


def apply_override(data: dict[str, Any], key: str, value: Any) -> None:
    """Set ``stage.0.weights.group_size``-style keys inside a parsed TOML document.

    Example::

        >>> doc = {"stage": [{"quantizer": "rtn"}]}
        >>> apply_override(doc, "stage.0.weights.bits", 8); doc["stage"][0]["weights"]
        {'bits': 8}
    """
    parts = key.split(".")
    if not key or not all(parts):
        raise RecipeError(key, value, "expected a dotted key such as stage.0.weights.bits")
    node: Any = data
    for depth, part in enumerate(parts[:-1]):
        where = ".".join(parts[: depth + 1])
        if isinstance(node, list):
            # isdigit() alone also takes "²", which int() refuses, and 5000 digits, which it cannot convert
            if not (part.isascii() and part.isdigit() and len(part) < 10) or int(part) >= len(node):
                raise RecipeError(where, part, f"no such stage; the recipe has {len(node)}")
            node = node[int(part)]
        else:
            node = node.setdefault(part, {})
        if not isinstance(node, (dict, list)):
            raise RecipeError(where, node, "is a value, not a table")
    if isinstance(node, list):
        raise RecipeError(key, value, "cannot replace a whole stage; set one of its keys")
    node[parts[-1]] = value


def read_toml(path: str | Path) -> dict[str, Any]:
    """Parse a recipe file, refusing (with a :class:`QFrameError` naming it) what is not a
    TOML recipe: a missing, unreadable, non-UTF-8 or non-regular file (a FIFO, a device),
    one over ``MAX_RECIPE_BYTES``, malformed TOML, values nested thousands deep, and dotted
    keys of more than ``MAX_KEY_PARTS`` parts.

    Example::

        >>> read_toml("/dev/null")
        Traceback (most recent call last):
        ...
        qframe.errors.QFrameError: cannot read recipe '/dev/null': it is not a regular file (a device, FIFO or socket)
    """
    path = Path(path)
    try:
        if path.exists() and not path.is_file():  # reading /dev/zero or a FIFO never ends
            what = "a folder" if path.is_dir() else "not a regular file (a device, FIFO or socket)"
            raise QFrameError(f"cannot read recipe {shorten(str(path), PATH_LIMIT)}: it is {what}")
        with path.open("rb") as handle:
            data = handle.read(MAX_RECIPE_BYTES + 1)
        text = data.decode("utf-8")
    except FileNotFoundError:
        raise QFrameError(f"recipe {shorten(str(path), PATH_LIMIT)} does not exist") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise QFrameError(f"cannot read recipe {shorten(str(path), PATH_LIMIT)}: {exc}") from None
    if len(data) > MAX_RECIPE_BYTES:
        raise QFrameError(f"recipe {shorten(str(path), PATH_LIMIT)} is larger than {MAX_RECIPE_BYTES >> 20} MiB; "
                          "a recipe is a few dozen lines")
    run = _KEY_RUN.search(text)
    if run is not None:
        line = text.count("\n", 0, run.start()) + 1
        raise QFrameError(f"{path}: line {line}: a dotted key of more than {MAX_KEY_PARTS} parts "
                          f"({shorten(run.group(0), 40)}); recipe keys are a few parts deep, e.g. stage.weights.bits")
    try:
        return tomllib.loads(text)
    except RecursionError:
        raise QFrameError(f"{path}: malformed TOML: arrays or tables nested too deeply to parse") from None
    except ValueError as exc:  # TOMLDecodeError, or an integer of more digits than Python converts
        raise QFrameError(f"{path}: malformed TOML: {exc}") from None


def parse_overrides(overrides: Mapping[str, Any] | Iterable[str] | None) -> dict[str, Any]:
    """``KEY=VALUE`` strings, as ``--set`` takes them (values parsed as TOML), as a mapping.

    Example::

        >>> parse_overrides(["tp_size=2", "build.max_batch_size=8", "dtype=float16"])
        {'tp_size': 2, 'build.max_batch_size': 8, 'dtype': 'float16'}
    """
    if isinstance(overrides, Mapping):
        return dict(overrides)
    items: dict[str, Any] = {}
    for text in overrides or ():
        key, sep, value = text.partition("=")
        if not sep:
            raise QFrameError(f"--set {shorten(text)}: expected KEY=VALUE, e.g. stage.0.weights.group_size=64")
        items[key.strip()] = _parse_value(value.strip(), key.strip())
    return items


def load_recipe(
    path: str | Path,
    overrides: Mapping[str, Any] | Iterable[str] | None = None,
) -> Recipe:
    """Read, override and validate a recipe.

    ``overrides`` is a mapping of dotted keys to values, or ``KEY=VALUE`` strings as
    ``--set`` takes them (values parsed as TOML).
    """
    data = read_toml(path)
    try:
        overrides = parse_overrides(overrides)
    except RecipeError as exc:
        raise exc.within(source=f"{path} (--set)") from None
    for key, value in overrides.items():
        try:
            apply_override(data, key, value)
        except RecipeError as exc:
            raise exc.within(source=f"{path} (--set)") from None
    return parse_recipe(data, source=str(path))


# -- resolving against plugins ----------------------------------------------------------------

@dataclass(frozen=True)
class PlannedStage:
    spec: StageSpec
    record: Any  # QuantizerPlugin
    options: Any  # the record's options dataclass, or a dict when it declares none


@dataclass(frozen=True)
class Plan:
    recipe: Recipe
    stages: tuple[PlannedStage, ...]
    backend: Any  # BackendPlugin

    @property
    def needs_calibration_data(self) -> bool:
        def needs(stage: PlannedStage) -> bool:
            probe = getattr(stage.record.factory, "needs_calibration", None)
            return probe(stage.spec) if probe else stage.spec.static_activations

        return any(needs(s) for s in self.stages)


def resolve(recipe: Recipe, registry) -> Plan:
    """Check every plugin a recipe names exists and accepts what the recipe asks of it, and
    everything else decidable without a model: stages that would quantize nothing (an
    ``ignore`` that excludes all the targets select, a second stage quantizing the same KV
    caches) and the export backend's options. (What the backend could not write is refused
    from the planned model, before calibration: :func:`qframe.api.check_export`.)

    Example::

        >>> from qframe.plugins import default_registry
        >>> resolve(parse_recipe({"stage": [{"quantizer": "rtn", "weights": {"bits": 4}, "ignore": ["*"]}]}),
        ...         default_registry())
        Traceback (most recent call last):
        ...
        qframe.errors.RecipeError: stage[0].ignore: ['*'] is not valid; it excludes every module the targets ['Linear', 'Experts'] select, so the stage would quantize nothing; ignore only what the stage must leave alone (e.g. ["lm_head"])
    """
    from .calibrate import build_calibrator
    from .data import parse_spec

    def fail(exc: RecipeError, prefix: str | None = None):
        return exc.within(prefix, source=recipe.source)

    stages = []
    for i, spec in enumerate(recipe.stages):
        key = f"stage[{i}]"
        names = registry.names("quantizer")
        if spec.quantizer not in names:
            raise fail(RecipeError(f"{key}.quantizer", spec.quantizer, f"unknown quantizer; installed: {', '.join(names)}"))
        record = registry.get("quantizer", spec.quantizer)
        for role in ("weights", "activations"):
            args = getattr(spec.scheme, role)
            if args is None:
                continue
            if args.calibrator not in registry.names("calibrator"):
                raise fail(RecipeError(f"{key}.{role}.calibrator", args.calibrator,
                                       f"unknown calibrator; installed: {', '.join(registry.names('calibrator'))}"))
            if args.calibrator_options or (role == "activations" and not args.dynamic):
                try:  # build one now so a bad option fails before any model loads
                    build_calibrator(registry.get("calibrator", args.calibrator), args)
                except RecipeError as exc:
                    raise fail(exc, f"{key}.{role}") from None
        try:
            if record.check is not None:
                record.check(spec)
            if record.options is None and spec.options:
                name, value = next(iter(spec.options.items()))
                raise RecipeError(f"options.{name}", value, f"{spec.quantizer} takes no options")
            options = build_dataclass(record.options, spec.options, "options") if record.options else dict(spec.options)
        except RecipeError as exc:
            raise fail(exc, key) from None
        stages.append(PlannedStage(spec, record, options))
    try:
        _check_stages_do_something(recipe.stages)
    except RecipeError as exc:
        raise fail(exc) from None
    backends = registry.names("backend")
    if recipe.export.backend not in backends:
        raise fail(RecipeError("export.backend", recipe.export.backend, f"unknown backend; installed: {', '.join(backends)}"))
    try:
        parse_spec(recipe.calibration.dataset, registry)
    except RecipeError as exc:
        raise fail(exc, "calibration") from None
    backend = registry.get("backend", recipe.export.backend)
    try:
        make_exporter(backend, recipe.export.options)  # its options are checked now
    except RecipeError as exc:
        raise fail(exc, "export") from None
    return Plan(recipe, tuple(stages), backend)


def _check_stages_do_something(stages: tuple[StageSpec, ...]) -> None:
    """Refuse stages that, on any model, would quantize nothing: an ``ignore`` excluding all
    that the targets select, and a KV-cache stage after another one for the same caches
    (the later one would silently replace the earlier's scales). Probed on module names of
    every family (:meth:`QuantScheme.probe`); the pipeline checks against the real model."""
    kv_stages: list[tuple[int, StageSpec]] = []
    for i, spec in enumerate(stages):
        scheme = spec.scheme
        if scheme.ignores_everything():
            raise RecipeError(f"stage[{i}].ignore", list(scheme.ignore),
                              f"it excludes every module the targets {list(scheme.targets)} select, so the stage "
                              "would quantize nothing; ignore only what the stage must leave alone (e.g. [\"lm_head\"])")
        if spec.quantizer != "kv_cache":
            continue
        for j, earlier in kv_stages:
            # the key/value projections (of the families that cache them apart) both would quantize
            names = [n for n in probe_names(patterns=earlier.scheme.targets + scheme.targets)
                     if n.endswith(("k_proj", "v_proj"))]
            both = [n for n in earlier.scheme.probe(names) if n in scheme.probe(names)]
            if both:
                raise RecipeError(f"stage[{i}].quantizer", spec.quantizer,
                                  f"stage[{j}] quantizes the KV cache already (e.g. {both[0]}), and a second "
                                  f"kv_cache stage would replace its scales; keep one kv_cache stage (or give the two "
                                  "disjoint targets)")
        kv_stages.append((i, spec))


def export_options(record, options: Mapping[str, Any]) -> Any:
    """The backend's options dataclass built from ``options`` (None when it takes none)."""
    if record.options is None:
        if options:
            name, value = next(iter(options.items()))
            raise RecipeError(name, value, f"backend {record.name} takes no options")
        return None
    return build_dataclass(record.options, options, "")


def make_exporter(record, options: Mapping[str, Any] | None = None, *, registry: Any = None) -> Any:
    """Build a backend's exporter from its record and ``[export]`` options; a factory that takes
    a ``registry`` keyword gets the plugins in use (e.g. checkpoint layouts).

    Example::

        >>> from qframe.plugins import build_registry
        >>> registry = build_registry(entry_points=False)
        >>> make_exporter(registry.get("backend", "hf"), {"dtype": "bfloat16"}).options.dtype
        'bfloat16'
    """
    built = export_options(record, options or {})
    args = () if record.options is None else (built,)
    try:
        takes_registry = "registry" in inspect.signature(record.factory).parameters
    except (TypeError, ValueError):  # a builtin or C callable: no signature to read
        takes_registry = False
    return record.factory(*args, registry=registry) if takes_registry and registry is not None else record.factory(*args)
