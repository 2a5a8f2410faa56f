"""``qframe``: the native checkpoint (see :mod:`qframe.checkpoint`)."""

from __future__ import annotations

from pathlib import Path

from qframe import BackendPlugin, hookimpl
from qframe.checkpoint import save_native


class NativeBackend:
    """Writes the native checkpoint; ``qframe apply`` always writes one at the output's top."""

    subdirectory = ""

    def export(self, qmodel, directory: str | Path) -> Path:
        return save_native(qmodel, directory)


@hookimpl
def qframe_backends():
    yield BackendPlugin(name="qframe", summary="native checkpoint: packed codes, scales, manifest",
                        factory=NativeBackend)
