"""Quantization schemes as pure, validated data.

``QuantArgs`` says how one tensor is quantized (bits, number type, symmetry, granularity,
static or dynamic); ``QuantScheme`` says which modules get which ``QuantArgs``.

Example::

    >>> args = QuantArgs.from_table({"bits": 4, "group_size": 128}, role="weights")
    >>> args.granularity, args.symmetric
    ('group', True)
"""

from __future__ import annotations

import fnmatch
import re
from dataclasses import asdict, dataclass, fields
from typing import Any, Iterable, Literal, Mapping

from .errors import RecipeError

Granularity = Literal["tensor", "channel", "group", "token"]
GRANULARITIES = ("tensor", "channel", "group", "token")
NUMBER_TYPES = ("int", "float")
INT_BITS = (2, 3, 4, 5, 6, 7, 8)
FLOAT_BITS = (4, 8)


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

    ``granularity``: one scale per ``tensor``, per output ``channel``, per ``group`` of
    ``group_size`` input channels, or per ``token`` (dynamic activations only).
    ``dynamic``: scales are computed at run time from each input instead of calibrated.
    ``calibrator`` names the calibrator plugin that sets static ranges.
    """

    bits: int = 8
    type: Literal["int", "float"] = "int"
    symmetric: bool = True
    granularity: Granularity = "channel"
    group_size: int | None = None
    dynamic: bool = False
    calibrator: str = "minmax"

    def __post_init__(self) -> None:
        _expect("type", self.type, str, "a string")
        if self.type not in NUMBER_TYPES:
            raise RecipeError("type", self.type, "allowed: int, float")
        _expect("bits", self.bits, int, "an integer")
        allowed = INT_BITS if self.type == "int" else FLOAT_BITS
        if self.bits not in allowed:
            raise RecipeError("bits", self.bits, f"allowed for {self.type}: {', '.join(map(str, allowed))}")
        _expect("symmetric", self.symmetric, bool, "true or false")
        _expect("dynamic", self.dynamic, bool, "true or false")
        _expect("calibrator", self.calibrator, str, "a calibrator name")
        if self.granularity not in GRANULARITIES:
            raise RecipeError("granularity", self.granularity, f"allowed: {', '.join(GRANULARITIES)}")
        if self.granularity == "group":
            if self.group_size is None:
                raise RecipeError("group_size", None, "granularity 'group' needs a group_size")
            _expect("group_size", self.group_size, int, "a positive integer")
            if self.group_size < 1:
                raise RecipeError("group_size", self.group_size, "expected a positive integer")
        elif self.group_size is not None:
            raise RecipeError("group_size", self.group_size, f"only granularity 'group' takes a group_size, not {self.granularity!r}")
        if self.granularity == "token" and not self.dynamic:
            raise RecipeError("granularity", "token", "per-token scales are dynamic only; set dynamic = true")

    @property
    def qmin(self) -> int:
        return -(1 << (self.bits - 1)) if self.symmetric else 0

    @property
    def qmax(self) -> int:
        return (1 << (self.bits - 1)) - 1 if self.symmetric else (1 << self.bits) - 1

    def to_dict(self) -> dict[str, Any]:
        return {k: v for k, v in asdict(self).items() if v is not None}

    @classmethod
    def from_table(cls, table: Mapping[str, Any], *, role: Literal["weights", "activations"]) -> "QuantArgs":
        """Build from a recipe table; defaults depend on whether it quantizes weights or activations.

        Weights default to per-channel (per-group when ``group_size`` is given);
        activations to static per-tensor, or per-token when ``dynamic = true``.
        """
        if not isinstance(table, Mapping):
            raise RecipeError("", table, "expected a table such as { bits = 4, group_size = 128 }")
        allowed = [f.name for f in fields(cls)]
        for key in table:
            if key not in allowed:
                raise RecipeError(key, table[key], f"unknown key; allowed: {', '.join(allowed)}")
        values = dict(table)
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
        if role == "activations" and args.granularity in ("channel", "group"):
            raise RecipeError("granularity", args.granularity, "activations take tensor or token")
        return args


def _pattern_matches(pattern: str, name: str, module: object) -> bool:
    if pattern.startswith("re:"):
        return re.search(pattern[3:], name) is not None
    if any(pattern == cls.__name__ for cls in type(module).__mro__):
        return True
    return fnmatch.fnmatchcase(name, pattern) or fnmatch.fnmatchcase(name, "*." + pattern)


@dataclass(frozen=True)
class QuantScheme:
    """Which modules a stage quantizes, and how.

    ``targets`` and ``ignore`` hold module type names (``Linear``), globs on module
    names (``*.mlp.*``; a glob also matches any dotted suffix, so ``lm_head`` matches
    ``model.lm_head``) or regular expressions searched in the name (``re:q_proj$``).

    Example::

        >>> import torch
        >>> QuantScheme(targets=("Linear",), ignore=("*.down_proj",)).matches(
        ...     "model.layers.0.mlp.down_proj", torch.nn.Linear(2, 2))
        False
    """

    targets: tuple[str, ...] = ("Linear",)
    ignore: tuple[str, ...] = ("lm_head",)
    weights: QuantArgs | None = None
    activations: QuantArgs | None = None

    def __post_init__(self) -> None:
        for key in ("targets", "ignore"):
            for pattern in getattr(self, key):
                if pattern.startswith("re:"):
                    try:
                        re.compile(pattern[3:])
                    except re.error as exc:
                        raise RecipeError(key, pattern, f"not a regular expression: {exc}") from None

    def matches(self, name: str, module: object) -> bool:
        return any(_pattern_matches(p, name, module) for p in self.targets) and not any(
            _pattern_matches(p, name, module) for p in self.ignore
        )

    def select(self, named_modules: Iterable[tuple[str, object]]) -> list[tuple[str, object]]:
        """The (name, module) pairs this scheme quantizes, in order."""
        return [(n, m) for n, m in named_modules if n and self.matches(n, m)]
