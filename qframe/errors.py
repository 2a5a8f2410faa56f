"""The errors qframe raises for bad input.

Every ``QFrameError`` is the user's to fix: the CLI prints its message as one paragraph
and exits with status 2. Any other exception is a bug in qframe or a plugin and keeps
its traceback (exit status 1).

A message quotes user values through :func:`shorten`, so a two-million-element array or a
value holding newlines still gives one short line; and a ``QFrameError`` never renders a
line break, whoever built its message.
"""

from __future__ import annotations

import reprlib

# How much of a user value a message quotes (paths and specs: PATH_LIMIT), and the most any
# message says.
VALUE_LIMIT = 120
PATH_LIMIT = 1000
MESSAGE_LIMIT = 4000

# Control characters (newlines above all) and the Unicode line and paragraph separators,
# escaped as repr() would: a message stays one paragraph whatever it quotes.
_BREAKS = {c: repr(chr(c))[1:-1] for c in (*range(0x20), 0x7F, 0x85, 0x2028, 0x2029)}


def one_line(text: str) -> str:
    """``text`` with its control characters escaped (a newline becomes ``\\n``).

    Example::

        >>> one_line("two\\nlines")
        'two\\\\nlines'
    """
    return text.translate(_BREAKS)


def _clip(text: str, limit: int, total: str) -> str:
    return text if len(text) <= limit else f"{text[:limit]}… ({total})"


class _Short(reprlib.Repr):
    """``repr`` with bounded depth and breadth: it never walks all of a huge or deeply
    nested value (where ``repr`` would take seconds, or raise RecursionError)."""

    def __init__(self) -> None:
        super().__init__()
        self.maxlevel, self.maxstring, self.maxother = 4, VALUE_LIMIT, VALUE_LIMIT
        self.maxlist = self.maxtuple = self.maxdict = self.maxset = self.maxfrozenset = 12

    def repr_int(self, x: int, level: int) -> str:
        # str() of an int beyond sys.get_int_max_str_digits() digits raises ValueError.
        if x.bit_length() > 256:
            return f"{'-' if x < 0 else ''}2**{abs(x).bit_length() - 1}+…"
        return repr(x)

    def repr_str(self, x: str, level: int) -> str:
        return repr(x[: self.maxstring])  # shorten() says how long it was


_SHORT = _Short()


def shorten(value: object, limit: int = VALUE_LIMIT) -> str:
    """``repr(value)`` in at most about ``limit`` characters, on one line: a long string or
    collection is cut, saying how long it was.

    Example::

        >>> shorten(list(range(2_000_000)))
        '[0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, ...] (2000000 items)'
        >>> shorten("a\\nb" * 100, limit=6)
        "'a\\\\nba\\\\nb… (300 characters)"
        >>> shorten(10**5000)
        '2**16609+…'
    """
    if isinstance(value, str):
        text = one_line(repr(value[:limit]))
        return text if len(value) <= limit else f"{text[:-1]}… ({len(value)} characters)"
    try:
        text = one_line(_SHORT.repr(value))
    except Exception:  # a value whose own __repr__ fails still gets a message
        text = f"<{type(value).__name__}>"
    if isinstance(value, (list, tuple, dict, set, frozenset)) and len(value) > _SHORT.maxlist:
        return f"{text if len(text) <= limit else text[:limit] + '…'} ({len(value)} items)"
    return _clip(text, limit, f"{len(text)} characters")


class QFrameError(Exception):
    """Bad input: a recipe, an argument, a model, a dataset or a plugin.

    Its message is one line of at most ``MESSAGE_LIMIT`` characters, whatever it was built from.

    Example::

        >>> str(QFrameError("no such file: 'a\\nb'"))
        "no such file: 'a\\\\nb'"
    """

    def __str__(self) -> str:
        text = one_line(super().__str__())
        return _clip(text, MESSAGE_LIMIT, f"{len(text)} characters")


class RecipeError(QFrameError):
    """A recipe key holds a value qframe cannot use.

    The value is quoted through :func:`shorten`.

    Example::

        >>> str(RecipeError("stage[0].weights.bits", 9, "allowed: 2 to 8", source="r.toml"))
        'r.toml: stage[0].weights.bits: 9 is not valid; allowed: 2 to 8'
    """

    def __init__(self, key: str, value: object, why: str, *, source: str | None = None):
        self.key, self.value, self.why, self.source = key, value, why, source
        super().__init__(self._render())

    def _render(self) -> str:
        where = f"{self.source}: " if self.source else ""
        # A key can be the user's too (an unknown --set key, a quoted TOML key).
        key = _clip(one_line(str(self.key)), VALUE_LIMIT, f"{len(str(self.key))} characters")
        return f"{where}{key}: {shorten(self.value)} is not valid; {self.why}"

    def within(self, prefix: str | None = None, source: str | None = None) -> "RecipeError":
        """The same error with its key nested under ``prefix`` and its file named."""
        key = ".".join(k for k in (prefix, self.key) if k)
        return RecipeError(key, self.value, self.why, source=source or self.source)


class PluginError(QFrameError):
    """A plugin is malformed, collides with another, or cannot be found."""


class ModelError(QFrameError):
    """A model cannot be found, loaded or understood."""


class DataError(QFrameError):
    """A dataset spec is malformed, or its data is missing or too short."""


class ExportError(QFrameError):
    """A quantized model cannot be written in a backend's format (it names the layer and
    what to change), or a written checkpoint fails its backend's validator."""
