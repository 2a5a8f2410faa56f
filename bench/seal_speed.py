"""What proving an output is qframe's costs: sealing a directory (SHA-256 of every file) and
checking it before a replace (free while file times are unchanged, a re-hash otherwise).

    python bench/seal_speed.py --gib 4
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time
from pathlib import Path

from qframe import output


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gib", type=float, default=1.0, help="size of the checkpoint file to seal")
    args = parser.parse_args()
    folder = Path(tempfile.mkdtemp(prefix="qframe-seal-"))
    try:
        size = int(args.gib * (1 << 30))
        with (folder / "model.safetensors").open("wb") as handle:
            for _ in range(0, size, 1 << 26):
                handle.write(os.urandom(min(1 << 26, size - handle.tell())))
        timings = {}
        started = time.perf_counter()
        output.seal(folder)
        timings["seal"] = time.perf_counter() - started
        started = time.perf_counter()
        assert output.unproven(folder) == []
        timings["check, times unchanged"] = time.perf_counter() - started
        (folder / "model.safetensors").touch()
        started = time.perf_counter()
        assert output.unproven(folder) == []
        timings["check, time changed (re-hash)"] = time.perf_counter() - started
        for name, seconds in timings.items():
            print(f"{name:32s} {seconds:8.3f} s  ({args.gib / max(seconds, 1e-9):8.2f} GiB/s)")
    finally:
        shutil.rmtree(folder)


if __name__ == "__main__":
    main()
