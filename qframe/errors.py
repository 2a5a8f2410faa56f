"""The errors qframe raises for bad input.

Every ``QFrameError`` is the user's to fix: the CLI prints its message as one paragraph
and exits with status 2. Any other exception is a bug in qframe or a plugin and keeps
its traceback (exit status 1).
"""

from __future__ import annotations


class QFrameError(Exception):
    """Bad input: a recipe, an argument, a model, a dataset or a plugin."""


class RecipeError(QFrameError):
    """A recipe key holds a value qframe cannot use.

    Example::

        >>> str(RecipeError("stage[0].weights.bits", 9, "allowed: 2 to 8", source="r.toml"))
        'r.toml: stage[0].weights.bits: 9 is not valid; allowed: 2 to 8'
    """

    def __init__(self, key: str, value: object, why: str, *, source: str | None = None):
        self.key, self.value, self.why, self.source = key, value, why, source
        super().__init__(self._render())

    def _render(self) -> str:
        where = f"{self.source}: " if self.source else ""
        return f"{where}{self.key}: {self.value!r} is not valid; {self.why}"

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
