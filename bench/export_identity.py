"""Fingerprint every checkpoint qframe's backends write for a matrix of cases, and compare
two fingerprints: a refactoring of the export side must leave every tensor and config bit
for bit where it was, except where a difference is a fix it names.

The cases: the export tests' tiny Llama, Qwen2 and GPT-2 models (fixed seeds), in float32, bfloat16 and
float16, quantized by every algorithm the backends write (FP8 with an FP8 cache, AWQ g64 and
g128, W4A8, GPTQ g128, SmoothQuant with an INT8 cache, NVFP4, W8A16, an ignore list), written
by ``tensorrt-llm`` (tp/pp 1, tp 2, pp 2), ``hf`` and ``qframe``. A fingerprint is each
file's tensors (name, dtype, shape, SHA-256 of the bytes) and its JSON (without versions).

Run it at two commits and compare::

    python bench/export_identity.py --write before.json          # at the old commit
    python bench/export_identity.py --write after.json
    python bench/export_identity.py --compare before.json after.json
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import tempfile
import warnings
from pathlib import Path

import torch

GPTQ = '[[stage]]\nquantizer = "gptq"\nweights = { bits = 4, group_size = 128 }\n'
IGNORED = '[[stage]]\nquantizer = "rtn"\nweights = { bits = 4, group_size = 64 }\nignore = ["lm_head", "*.mlp.down_proj"]\n'

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from test_trtllm_export import AWQ, FP8, NVFP4, SMOOTHQUANT, W4A8, W8A16  # noqa: E402  the export tests' recipes

RECIPES = {"fp8": FP8, "awq64": AWQ.replace("GROUP", "64"), "awq128": AWQ.replace("GROUP", "128"), "w4a8": W4A8,
           "gptq128": GPTQ, "smoothquant": SMOOTHQUANT, "nvfp4": NVFP4, "w8a16": W8A16, "ignored": IGNORED}
# What each backend writes (hf: no int8; gpt2 only to tensorrt-llm and qframe).
HF_RECIPES = ("fp8", "awq64", "awq128", "w4a8", "gptq128", "nvfp4", "ignored")
TRT_OPTIONS = {"tp1": {}, "tp2": {"tp_size": 2}, "pp2": {"pp_size": 2}}


def tiny(family: str, dtype: torch.dtype) -> torch.nn.Module:
    """The export tests' tiny models (two layers, hidden size 128, grouped-query attention)."""
    from test_trtllm_export import tiny as tests_tiny

    return tests_tiny(family, dtype)


def fingerprint(directory: Path) -> dict:
    from safetensors.torch import load_file

    out = {}
    for path in sorted(p for p in directory.rglob("*") if p.is_file()):
        name = str(path.relative_to(directory))
        if path.suffix == ".safetensors":
            out[name] = {k: [str(v.dtype), list(v.shape), hashlib.sha256(v.contiguous().reshape(-1).view(torch.uint8).numpy()
                                                                         .tobytes()).hexdigest()[:16]]
                         for k, v in sorted(load_file(str(path)).items())}
        elif path.suffix == ".json" and not path.name.startswith(".qframe"):
            data = json.loads(path.read_text())
            if isinstance(data, dict):
                for key in ("producer", "versions", "timings", "transformers_version"):
                    data.pop(key, None)
                if name.endswith("qframe.json"):
                    data = {k: data[k] for k in ("modules", "tied", "dtype") if k in data}
                if "quantization_config" in data and isinstance(data["quantization_config"], dict):
                    data["quantization_config"].pop("producer", None)
            out[name] = data
    return out


def cases():
    for family in ("llama", "qwen2", "gpt2"):
        for dtype in (torch.float32, torch.bfloat16, torch.float16):
            for recipe in RECIPES:
                backends = [("qframe", {})]
                backends += [("tensorrt-llm", o) for o in TRT_OPTIONS.values()]
                if family != "gpt2" and recipe in HF_RECIPES:
                    backends.append(("hf", {}))
                yield family, dtype, recipe, backends


def run(write: Path, only: set[str] | None = None) -> None:
    import qframe
    from qframe.errors import QFrameError
    from qframe.recipe import load_recipe
    from qframe.testing import random_tokens

    warnings.simplefilter("ignore")
    result = {}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        for family, dtype, recipe, backends in cases():
            model = tiny(family, dtype)
            path = tmp / f"{recipe}.toml"
            path.write_text(RECIPES[recipe])
            ids = random_tokens(4, 16, vocab=model.config.vocab_size, seed=1)
            try:
                qmodel = qframe.quantize(model, load_recipe(path), calibration=ids, device="cpu")
            except QFrameError as exc:
                result[f"{family}/{str(dtype)[6:]}/{recipe}"] = f"refused: {exc}"
                continue
            for backend, options in backends:
                if only and backend not in only:
                    continue
                key = f"{family}/{str(dtype)[6:]}/{recipe}/{backend}/{json.dumps(options, sort_keys=True)}"
                out = tmp / "out" / key.replace("/", "_").replace(" ", "")
                try:
                    qframe.export(qmodel, backend, out, options=options)
                except QFrameError as exc:
                    result[key] = f"refused: {' '.join(str(exc).split())}"
                else:
                    result[key] = fingerprint(out)
                print(key, "refused" if isinstance(result[key], str) else "ok", file=sys.stderr)
    write.write_text(json.dumps(result, indent=1, sort_keys=True))


def _differences(x, y, path: str = "") -> list[str]:
    """Where two JSON values differ, as dotted paths."""
    if isinstance(x, dict) and isinstance(y, dict):
        out = []
        for key in sorted(set(x) | set(y)):
            if key not in x or key not in y:
                out.append(f"{path}.{key} {'added' if key not in x else 'removed'}")
            else:
                out += _differences(x[key], y[key], f"{path}.{key}")
        return out
    return [] if x == y else [f"{path}: {json.dumps(x)[:120]} -> {json.dumps(y)[:120]}"]


def compare(before: Path, after: Path) -> int:
    a, b = json.loads(before.read_text()), json.loads(after.read_text())
    same = differ = 0
    for key in sorted(set(a) & set(b)):
        x, y = a[key], b[key]
        if x == y:
            same += 1
            continue
        differ += 1
        if not isinstance(x, dict) or not isinstance(y, dict):
            print(f"{key}:\n  before: {str(x)[:300]}\n  after:  {str(y)[:300]}")
            continue
        for file in sorted(set(x) | set(y)):
            fx, fy = x.get(file), y.get(file)
            if fx == fy:
                continue
            if isinstance(fx, dict) and isinstance(fy, dict) and file.endswith(".safetensors"):
                names = sorted(n for n in set(fx) | set(fy) if fx.get(n) != fy.get(n))
                print(f"{key} {file}: {len(names)} tensors differ: {', '.join(names[:8])}")
            else:
                found = _differences(fx, fy)
                print(f"{key} {file}: {len(found)} differences: {'; '.join(found[:4])}")
    only = len(set(a) ^ set(b))
    print(f"{same} cases identical, {differ} differ" + (f", {only} in one file only" if only else ""))
    return 0 if differ == 0 else 1


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--write", type=Path)
    parser.add_argument("--compare", nargs=2, type=Path)
    parser.add_argument("--backends", help="comma-separated: only these (default: all)")
    args = parser.parse_args()
    if args.write:
        run(args.write, set(args.backends.split(",")) if args.backends else None)
    if args.compare:
        return compare(*args.compare)
    return 0


if __name__ == "__main__":
    sys.exit(main())
