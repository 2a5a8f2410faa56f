"""Quantization schemes as pure, validated data.

``QuantArgs`` says how one tensor is quantized (bits, number type and format, symmetry,
granularity, static or dynamic); ``QuantScheme`` says which modules get which ``QuantArgs``.

Example::

    >>> args = QuantArgs.from_table({"bits": 4, "group_size": 128}, role="weights")
    >>> args.granularity, args.symmetric
    ('group', True)
    >>> fp4 = QuantArgs.from_table({"type": "float", "bits": 4}, role="weights")
    >>> fp4.format, fp4.granularity, fp4.group_size
    ('nvfp4', 'group', 16)
"""

from __future__ import annotations

import fnmatch
import math
import re
from dataclasses import asdict, dataclass, fields
from typing import Any, Iterable, Literal, Mapping

from . import formats
from .errors import RecipeError

Granularity = Literal["tensor", "channel", "group", "token"]
GRANULARITIES = ("tensor", "channel", "group", "token")
NUMBER_TYPES = ("int", "float")
INT_BITS = formats.INT_BITS
# Float formats, their widths, limits and blocks are the registered ones (qframe.formats):
# read at validation time, so a format a plugin registers later is accepted too.
# The widest group: a weight narrower than its group is zero-padded to it (memory and time
# grow with the group, and 2**20 already takes seconds on a 64-wide toy model), while a
# group as wide as a layer's input is just one scale per output channel.
MAX_GROUP_SIZE = 1 << 14
# Bounds on any number a recipe passes to a plugin: what torch takes as an int64, and a
# nesting depth no option needs (deeper values are mistakes, and walking them recurses).
INT64 = (-(1 << 63), (1 << 63) - 1)
MAX_DEPTH = 8


def _float_bits() -> tuple[int, ...]:
    return tuple(sorted({f.bits for f in formats.floats()}))


def _float_format(name: object) -> "formats.FloatFormat | None":
    """The registered float format called ``name``, or ``None`` (an int name or no format)."""
    return next((f for f in formats.floats() if f.name == name), None)


def check_plain(key: str, value: Any, depth: int = 0) -> None:
    """Refuse, in any recipe value (nested lists and tables too), what no plugin option
    can mean: NaN or infinite floats, integers beyond 64 bits, and nesting deeper than
    ``MAX_DEPTH``. Raises :class:`RecipeError` naming ``key``.

    Example::

        >>> check_plain("options.alpha_grid", [0.5, float("nan")])
        Traceback (most recent call last):
        ...
        qframe.errors.RecipeError: options.alpha_grid: nan is not valid; expected a finite number
    """
    if isinstance(value, float) and not math.isfinite(value):
        raise RecipeError(key, value, "expected a finite number")
    if isinstance(value, int) and not isinstance(value, bool) and not INT64[0] <= value <= INT64[1]:
        raise RecipeError(key, value, "expected an integer that fits in 64 bits")
    if isinstance(value, (list, tuple, Mapping)):
        if depth >= MAX_DEPTH:
            raise RecipeError(key, value, f"nested deeper than {MAX_DEPTH} levels; expected a number, a string, "
                              "or a flat list or table of them")
        items = value.items() if isinstance(value, Mapping) else ((None, v) for v in value)
        for name, item in items:
            check_plain(key if name is None else f"{key}.{name}", item, depth + 1)


def _expect(key: str, value: Any, kind: type | tuple[type, ...], what: str) -> Any:
    # bool is an int in Python; a recipe that says `bits = true` is still wrong.
    if isinstance(value, bool) and kind is not bool:
        raise RecipeError(key, value, f"expected {what}")
    if not isinstance(value, kind):
        raise RecipeError(key, value, f"expected {what}")
    return value


@dataclass(frozen=True)
class QuantArgs:
    """How one tensor (weights or activations) is quantized.

    ``type`` and ``bits`` choose the number type: ``int`` 2-8 bits (symmetric, or
    asymmetric with a zero point), or ``float`` 8 or 4 bits. ``format`` names the float
    format (``int`` takes none):

    - 8 bits: ``e4m3`` (the default; max 448) or ``e5m2`` (max 57344), saturating, with a
      scale per tensor, channel or group (or per token, dynamic activations);
    - 4 bits: ``nvfp4`` (the default; E2M1 in blocks of 16 with E4M3 block scales and an
      FP32 global scale per tensor) or ``mxfp4`` (E2M1 in blocks of 32 with E8M0
      power-of-two scales, as the OCP MX specification defines them). Both take
      ``granularity = "group"`` with their block size as ``group_size``.

    Float formats are symmetric. ``granularity``: one scale per ``tensor``, per output
    ``channel``, per ``group`` of ``group_size`` input channels, or per ``token`` (dynamic
    activations only; dynamic activations may also take ``group``, blocks along the last
    dimension). ``dynamic``: scales are computed at run time from each input instead of
    calibrated. ``calibrator`` names the calibrator plugin that sets static ranges and
    ``calibrator_options`` its keyword options (``{ percentile = 99.9 }``), checked against
    the plugin when the recipe is resolved.

    ``qmin``/``qmax`` bound the grid in the scaled domain: integer codes for ``int``,
    ``-fmax``/``fmax`` for floats.
    """

    bits: int = 8
    type: Literal["int", "float"] = "int"
    symmetric: bool = True
    granularity: Granularity = "channel"
    group_size: int | None = None
    dynamic: bool = False
    calibrator: str = "minmax"
    format: str | None = None
    # Held as sorted (key, value) pairs so the args stay hashable; a table is accepted.
    calibrator_options: tuple[tuple[str, Any], ...] = ()

    def __post_init__(self) -> None:
        _expect("type", self.type, str, "a string")
        if self.type not in NUMBER_TYPES:
            raise RecipeError("type", self.type, "allowed: int, float")
        _expect("bits", self.bits, int, "an integer")
        allowed = INT_BITS if self.type == "int" else _float_bits()
        if self.bits not in allowed:
            raise RecipeError("bits", self.bits, f"allowed for {self.type}: {', '.join(map(str, allowed))}")
        _expect("symmetric", self.symmetric, bool, "true or false")
        _expect("dynamic", self.dynamic, bool, "true or false")
        _expect("calibrator", self.calibrator, str, "a calibrator name")
        options = self.calibrator_options
        if isinstance(options, Mapping):
            options = tuple(sorted(options.items()))
        if not isinstance(options, tuple) or not all(isinstance(p, tuple) and len(p) == 2 and isinstance(p[0], str)
                                                    for p in options):
            raise RecipeError("calibrator_options", self.calibrator_options,
                              "expected a table of the calibrator's options, e.g. { percentile = 99.9 }")
        for name, value in options:
            check_plain(f"calibrator_options.{name}", value)
        object.__setattr__(self, "calibrator_options", options)  # frozen: normalized once
        if self.granularity not in GRANULARITIES:
            raise RecipeError("granularity", self.granularity, f"allowed: {', '.join(GRANULARITIES)}")
        if self.granularity == "group":
            if self.group_size is None:
                raise RecipeError("group_size", None, "granularity 'group' needs a group_size")
            _expect("group_size", self.group_size, int, "a positive integer")
            if self.group_size < 1:
                raise RecipeError("group_size", self.group_size, "expected a positive integer")
            if self.group_size > MAX_GROUP_SIZE:
                raise RecipeError("group_size", self.group_size,
                                  f"expected at most {MAX_GROUP_SIZE} input channels per group (a weight narrower than "
                                  "its group is padded to it); for one scale per output channel over the whole input, "
                                  "set granularity = \"channel\" and no group_size")
        elif self.group_size is not None:
            raise RecipeError("group_size", self.group_size, f"only granularity 'group' takes a group_size, not {self.granularity!r}")
        if self.granularity == "token" and not self.dynamic:
            raise RecipeError("granularity", "token", "per-token scales are dynamic only; set dynamic = true")
        self._check_format()

    def _check_format(self) -> None:
        if self.format is not None:
            _expect("format", self.format, str, "a format name")
        if self.type == "int":
            if self.format is not None:
                every = ", ".join(f.name for f in formats.floats())
                raise RecipeError("format", self.format,
                                  f'only type = "float" takes a format ({every}); allowed for int: none')
            return
        allowed = [f.name for f in formats.floats(self.bits)]
        if self.format is None:
            object.__setattr__(self, "format", allowed[0])  # frozen: the default by width
        elif self.format not in allowed:
            other = _float_format(self.format)
            needs = f"{self.format} needs bits = {other.bits}, and " if other is not None else ""
            raise RecipeError("format", self.format, f"{needs}{self.bits}-bit floats are {' or '.join(allowed)}; "
                              f"allowed: {', '.join(allowed)}")
        if not self.symmetric:
            raise RecipeError("symmetric", self.symmetric, f"{self.format} is symmetric (no zero point); allowed: true")
        block = self.number_format.block
        if block is not None:
            if self.granularity != "group":
                raise RecipeError("granularity", self.granularity,
                                  f"{self.format} scales blocks of {block} input channels; allowed: group "
                                  f"(with group_size = {block})")
            if self.group_size != block:
                raise RecipeError("group_size", self.group_size, f"{self.format} uses blocks of {block}; allowed: {block}")

    def calibrated(self) -> "QuantArgs":
        """The args a calibrator sees: these, except for static NVFP4 activations, whose one
        calibrated number is the per-tensor range their FP32 global scale covers (the scale
        of the E4M3 block scales, so it is calibrated as an E4M3 tensor).

        Example::

            >>> QuantArgs(type="float", bits=4, granularity="group", group_size=16).calibrated().granularity
            'tensor'
        """
        if self.dynamic or self.type == "int" or not self.number_format.has_global_scale:
            return self
        # The global scale covers NVFP4's E4M3 block scales.
        e4m3 = formats.E4M3
        return QuantArgs(bits=e4m3.bits, type="float", format=e4m3.name, granularity="tensor",
                         calibrator=self.calibrator, calibrator_options=self.calibrator_options)

    @property
    def number_format(self) -> "formats.NumberFormat":
        """The :class:`~qframe.formats.NumberFormat` these args quantize to (``formats.of(self)``).

        Example::

            >>> QuantArgs(type="float", bits=4, granularity="group", group_size=16).number_format is formats.NVFP4
            True
        """
        return formats.of(self)

    @property
    def is_float(self) -> bool:
        return self.type == "float"

    @property
    def fmax(self) -> float:
        """Largest magnitude of a float format's elements (448 for e4m3, 57344 for e5m2, 6 for FP4)."""
        fmt = self.number_format
        if not isinstance(fmt, formats.FloatFormat):
            raise ValueError(f"int{self.bits} has no float maximum; use qmin/qmax")
        return fmt.max

    @property
    def qmin(self) -> int | float:
        return self.number_format.qmin

    @property
    def qmax(self) -> int | float:
        return self.number_format.qmax

    @property
    def name(self) -> str:
        """A short name of the number format: ``int4``, ``uint4`` (asymmetric), ``e4m3``, ``nvfp4``..."""
        return self.number_format.name

    def to_dict(self) -> dict[str, Any]:
        out = {k: v for k, v in asdict(self).items() if v is not None and k != "calibrator_options"}
        if self.calibrator_options:
            out["calibrator_options"] = dict(self.calibrator_options)
        return out

    @classmethod
    def from_table(cls, table: Mapping[str, Any], *, role: Literal["weights", "activations"]) -> "QuantArgs":
        """Build from a recipe table; defaults depend on whether it quantizes weights or activations.

        Weights default to per-channel (per-group when ``group_size`` is given);
        activations to static per-tensor, or per-token when ``dynamic = true``. A ``format``
        implies its ``type`` and ``bits`` when they are not given, and FP4 formats default to
        their own blocks (``group_size`` 16 for nvfp4, 32 for mxfp4).
        """
        if not isinstance(table, Mapping):
            raise RecipeError("", table, "expected a table such as { bits = 4, group_size = 128 }")
        allowed = [f.name for f in fields(cls)]
        for key in table:
            if key not in allowed:
                raise RecipeError(key, table[key], f"unknown key; allowed: {', '.join(allowed)}")
        values = dict(table)
        fmt = values.get("format")
        named = _float_format(fmt)
        if named is not None:
            values.setdefault("type", "float")
            values.setdefault("bits", named.bits)
        if values.get("type") == "float" and "granularity" not in values and values.get("group_size") is None:
            width = values.get("bits", 8)
            of_width = formats.floats(width) if isinstance(width, int) and not isinstance(width, bool) else ()
            chosen = named if fmt is not None else (of_width[0] if of_width else None)
            if chosen is not None and chosen.block is not None:
                values["group_size"] = chosen.block
        # The role's own limits first: their advice beats a generic one ("set dynamic = true").
        if role == "weights" and values.get("granularity") == "token":
            raise RecipeError("granularity", "token", "weights take tensor, channel or group")
        if "granularity" not in values:
            if values.get("group_size") is not None:
                values["granularity"] = "group"
            elif role == "activations":
                values["granularity"] = "token" if values.get("dynamic") else "tensor"
            else:
                values["granularity"] = "channel"
        args = cls(**values)
        if role == "weights" and args.dynamic:
            raise RecipeError("dynamic", True, "weights are quantized once; dynamic applies to activations")
        if role == "activations" and args.granularity == "channel":
            raise RecipeError("granularity", "channel", "activations take tensor or token (or group, when dynamic)")
        if (role == "activations" and args.granularity == "group" and not args.dynamic
                and not args.number_format.has_global_scale):
            raise RecipeError("dynamic", False, f"activations scaled per block of {args.group_size} are "
                              "quantized at run time; allowed: true")
        return args


# -- probing patterns without a model ---------------------------------------------------------------

# Decoder linears of the families qframe serves, in layers 0 and 1 ({i}), as their modules are
# named: what a recipe's targets and ignore are probed against before any model is loaded.
PROBE_FAMILIES: dict[str, tuple[str, ...]] = {
    "llama": tuple(f"model.layers.{{i}}.{n}" for n in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj",
                                                      "self_attn.o_proj", "mlp.gate_proj", "mlp.up_proj",
                                                      "mlp.down_proj")),
    "gemma3": tuple(f"model.language_model.layers.{{i}}.{n}" for n in ("self_attn.q_proj", "self_attn.k_proj",
                                                                     "self_attn.v_proj", "self_attn.o_proj",
                                                                     "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")),
    "phi3": tuple(f"model.layers.{{i}}.{n}" for n in ("self_attn.qkv_proj", "self_attn.o_proj", "mlp.gate_up_proj",
                                                     "mlp.down_proj")),
    "gpt2": tuple(f"transformer.h.{{i}}.{n}" for n in ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")),
    "neox": tuple(f"gpt_neox.layers.{{i}}.{n}" for n in ("attention.query_key_value", "attention.dense",
                                                        "mlp.dense_h_to_4h", "mlp.dense_4h_to_h")),
    "opt": tuple(f"model.decoder.layers.{{i}}.{n}" for n in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj",
                                                            "self_attn.out_proj", "fc1", "fc2")),
}
# Linears outside the decoder layers, and names of no family qframe knows.
PROBE_OTHERS = ("lm_head", "embed_out", "x", "blocks.0.ffn.w1", "h.0.attn.Wqkv")
# Stand-ins for a model's linears whose class names are torch's (a Linear is a Module), so that
# type-name patterns probe as they match on a model without building a torch module.
PROBE_LINEAR = type("Linear", (type("Module", (), {}),), {})()


def probe_names(family: str | None = None, patterns: Iterable[str] = ()) -> list[str]:
    """The module names patterns are probed against: one family's decoder linears (layers 0
    and 1), or every family's and ``PROBE_OTHERS``; and names the glob ``patterns`` match
    (their wildcards filled, alone and inside a layer).

    Example::

        >>> probe_names("gpt2")[:2]
        ['transformer.h.0.attn.c_attn', 'transformer.h.0.attn.c_proj']
        >>> probe_names("gpt2", ["*.w2"])[-2:]
        ['x.w2', 'model.layers.0.x.w2']
    """
    families = [family] if family else list(PROBE_FAMILIES)
    names = [n.format(i=i) for f in families for i in (0, 1) for n in PROBE_FAMILIES[f]]
    names += [] if family else list(PROBE_OTHERS)
    for pattern in patterns:
        if pattern.startswith("re:") or "[" in pattern:
            continue  # no instance is written down as easily; the fixed names serve
        filled = pattern.replace("*", "x").replace("?", "x")
        names += [n for n in (filled, f"model.layers.0.{filled}") if _pattern_matches(pattern, n, PROBE_LINEAR)]
    return list(dict.fromkeys(names))


# Target kinds a module is recognized as by what it is rather than by its class name: kind ->
# "module:function" taking the module, imported when a pattern first names the kind (so this
# module stays free of torch). A class may also declare the kinds it stands for (``stands_for``).
KINDS: dict[str, str] = {"Experts": "qframe.experts:is_fused_experts"}
_KIND_TESTS: dict[str, Any] = {}


def _is_kind(kind: str, module: object) -> bool:
    """Whether ``module`` is of the target kind ``kind`` (:data:`KINDS`).

    Example::

        >>> import torch
        >>> _is_kind("Experts", torch.nn.Linear(2, 2))
        False
    """
    test = _KIND_TESTS.get(kind)
    if test is None:
        import importlib

        where, _, function = KINDS[kind].partition(":")
        test = _KIND_TESTS[kind] = getattr(importlib.import_module(where), function)
    return bool(test(module))


def _pattern_matches(pattern: str, name: str, module: object) -> bool:
    if pattern.startswith("re:"):
        return re.search(pattern[3:], name) is not None
    # A module matches its class names and the names it stands in for (QuantLinear is a "Linear").
    if pattern in {cls.__name__ for cls in type(module).__mro__} | set(getattr(module, "stands_for", ())):
        return True
    if pattern in KINDS and _is_kind(pattern, module):
        return True
    return fnmatch.fnmatchcase(name, pattern) or fnmatch.fnmatchcase(name, "*." + pattern)


def describe(args: QuantArgs | None) -> str:
    """A short human description of ``args``, for error messages.

    Example::

        >>> describe(QuantArgs(bits=4, granularity="group", group_size=64, symmetric=False))
        'int4 asymmetric group 64'
        >>> describe(None)
        'none'
    """
    if args is None:
        return "none"
    kind = args.format if args.type == "float" else f"int{args.bits}{'' if args.symmetric else ' asymmetric'}"
    grain = f"group {args.group_size}" if args.granularity == "group" else f"per {args.granularity}"
    return f"{kind} {grain}{' dynamic' if args.dynamic else ''}"

@dataclass(frozen=True)
class QuantScheme:
    """Which modules a stage quantizes, and how.

    ``targets`` and ``ignore`` hold module type names (``Linear``), target kinds
    (``Experts``: fused mixture-of-experts modules, recognized by their 3-D weights), globs
    on module names (``*.mlp.*``; a glob also matches any dotted suffix, so ``lm_head``
    matches ``model.lm_head``) or regular expressions searched in the name (``re:q_proj$``).
    By default a stage targets linears and experts, and ignores ``lm_head``.

    Example::

        >>> import torch
        >>> QuantScheme(targets=("Linear",), ignore=("*.down_proj",)).matches(
        ...     "model.layers.0.mlp.down_proj", torch.nn.Linear(2, 2))
        False
    """

    targets: tuple[str, ...] = ("Linear", "Experts")  # Experts: fused MoE experts (qframe.experts)
    ignore: tuple[str, ...] = ("lm_head",)
    weights: QuantArgs | None = None
    activations: QuantArgs | None = None

    def __post_init__(self) -> None:
        if not self.targets:
            raise RecipeError("targets", [], "a stage that targets nothing quantizes nothing; expected at least one "
                              "pattern, e.g. targets = [\"Linear\"]")
        for key in ("targets", "ignore"):
            for pattern in getattr(self, key):
                if pattern.startswith("re:"):
                    try:
                        re.compile(pattern[3:])
                    except (re.error, OverflowError) as exc:  # OverflowError: a{99999999999}
                        raise RecipeError(key, pattern, f"not a regular expression: {exc}") from None
                    except RecursionError:
                        raise RecipeError(key, pattern, "not a regular expression Python can compile: its groups "
                                          "nest too deeply") from None

    def matches(self, name: str, module: object) -> bool:
        return any(_pattern_matches(p, name, module) for p in self.targets) and not any(
            _pattern_matches(p, name, module) for p in self.ignore
        )

    def select(self, named_modules: Iterable[tuple[str, object]]) -> list[tuple[str, object]]:
        """The (name, module) pairs this scheme quantizes, in order."""
        return [(n, m) for n, m in named_modules if n and self.matches(n, m)]

    def probe(self, names: Iterable[str] | None = None) -> list[str]:
        """Which of ``names`` (default: :func:`probe_names` and instances of the targets' globs)
        this scheme would quantize, were they linears: a model-free estimate.

        Example::

            >>> QuantScheme(targets=("*.mlp.*",)).probe(["model.layers.0.mlp.up_proj", "lm_head"])
            ['model.layers.0.mlp.up_proj']
        """
        names = probe_names(patterns=self.targets) if names is None else names
        return [n for n in names if self.matches(n, PROBE_LINEAR)]

    def ignores_everything(self) -> bool:
        """Whether ``ignore`` excludes every linear the targets would select: the probes the
        targets match (``Linear`` matches all of them) are all ignored. False when the
        targets match no probe, since then nothing is known.

        Example::

            >>> QuantScheme(ignore=("re:.*",)).ignores_everything(), QuantScheme().ignores_everything()
            (True, False)
        """
        targeted = QuantScheme(targets=self.targets, ignore=()).probe()
        return bool(targeted) and not self.probe(targeted)
