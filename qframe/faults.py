"""Named moments where a test can stop a real qframe process, to prove what survives a kill.

Setting ``QFRAME_PAUSE_AT=NAME`` makes a qframe process that reaches the moment ``NAME`` print
``qframe: paused at NAME`` on stderr and wait there until it gets SIGUSR1 (or ten minutes
pass), so that a test can send it SIGKILL or SIGTERM at exactly that point, or let it go on. Unset, :func:`reach` costs one
dictionary look-up. The moments: ``load`` (the model is loaded), ``layer`` (a decoder layer is
quantized, not yet written; every layer), ``calibrate`` (the first decoder layer is quantized
and written), ``write`` (the native checkpoint is half written), ``export`` (an export backend
has written its first part), ``rename`` (the output
is complete, just before it is put in place), ``between-renames`` (only where the file system
cannot exchange two directories atomically), ``after-rename`` (in place, the old output not
yet removed).

Example::

    >>> reach("write")  # nothing happens unless QFRAME_PAUSE_AT=write
"""

from __future__ import annotations

import os
import signal
import sys
import time

VARIABLE = "QFRAME_PAUSE_AT"


def reach(moment: str) -> None:
    """Pause here when ``QFRAME_PAUSE_AT`` names ``moment`` (see the module's docstring)."""
    if os.environ.get(VARIABLE) != moment:
        return
    resumed: list[int] = []
    previous = signal.signal(signal.SIGUSR1, lambda signum, _frame: resumed.append(signum))
    try:
        print(f"qframe: paused at {moment}", file=sys.stderr, flush=True)
        deadline = time.monotonic() + 600
        while not resumed and time.monotonic() < deadline:
            time.sleep(0.02)
    finally:
        signal.signal(signal.SIGUSR1, previous)
