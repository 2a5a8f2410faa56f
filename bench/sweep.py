"""Perplexity of several recipe variants on one model load and one set of windows.

    python bench/sweep.py --model M --calib-data text:plays/ --eval-data text:essay.txt \
        --variant recipes/fp8.toml --variant "recipes/fp8.toml stage.0.weights.granularity=\"channel\""

Each ``--variant`` is a recipe path followed by ``--set``-style overrides. Prints one JSON line
per variant (perplexity, delta against the unquantized model, seconds).
"""

from __future__ import annotations

import argparse
import copy
import json
import shlex
import time

import qframe
from qframe.api import pick_device
from qframe.data import DataContext, calibration_windows, evaluation_windows
from qframe.evaluate import perplexity
from qframe.model import load_model, resolve_source
from qframe.plugins import default_registry


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True)
    p.add_argument("--calib-data", required=True)
    p.add_argument("--eval-data", required=True)
    p.add_argument("--variant", action="append", required=True)
    p.add_argument("--calib-samples", type=int, default=32)
    p.add_argument("--samples", type=int, default=24)
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--device")
    args = p.parse_args()

    device, registry = pick_device(args.device), default_registry()
    loaded = load_model(resolve_source(args.model), "float32")
    context = DataContext(loaded.tokenizer, loaded.model, samples=args.calib_samples, seq_len=args.seq_len)
    calib = calibration_windows(args.calib_data, context, registry)
    held_out = evaluation_windows(args.eval_data, context, registry, args.samples)
    base = perplexity(loaded.model, held_out, device).perplexity
    print(json.dumps({"variant": "unquantized", "perplexity": base, "eval_sha256": held_out.sha256,
                      "calib_sha256": calib.sha256}), flush=True)
    for variant in args.variant:
        path, *overrides = shlex.split(variant)
        model = copy.deepcopy(loaded.model)
        started = time.perf_counter()
        qframe.quantize(model, qframe.load_recipe(path, overrides), calibration=calib, device=device)
        seconds = time.perf_counter() - started
        ppl = perplexity(model, held_out, device).perplexity
        print(json.dumps({"variant": variant, "perplexity": ppl, "delta_pct": 100 * (ppl / base - 1),
                          "quantize_s": round(seconds, 2)}), flush=True)


if __name__ == "__main__":
    main()
