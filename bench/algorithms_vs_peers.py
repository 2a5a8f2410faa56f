#!/usr/bin/env python
"""SmoothQuant, AWQ, GPTQ and the FP8 KV cache: qframe against modelopt and llm-compressor, side by side.

One script, the same model file, the same calibration windows and the same evaluation
windows for every method (identified by their sha256). qframe's methods run in this
process; each peer method runs in the peer's own virtual environment (their pins clash with
qframe's and with each other's) through ``bench/peer_worker.py``, which reads the very same
token windows from a safetensors file this script writes and scores with qframe's own
perplexity code.

Methods (``--methods``, comma-separated; default all):

=============================  ==============================================================
``qframe-rtn-g{64,128}``       ``recipes/rtn_w4a16.toml`` at that group size (the baseline)
``qframe-awq-g{64,128}``       ``recipes/awq_w4a16.toml``
``qframe-gptq-g{64,128}``      ``recipes/gptq_w4a16.toml``
``qframe-awq-gptq-g{64,128}``  ``recipes/awq_gptq_w4a16.toml``
``qframe-smoothquant``         ``recipes/smoothquant_w8a8.toml`` (int8 per channel, static per tensor)
``qframe-smoothquant-a{A}``    the same with ``options.alpha = A`` (0.5, 0.8, 0.9, 0.95)
``qframe-gptq-actorder-g64``   ``recipes/gptq_w4a16.toml`` with ``act_order = true`` (static groups)
``qframe-fp8-kv``              ``recipes/fp8_kv_cache.toml``: only the KV cache, FP8, a scale for K and one for V
``qframe-fp8-kv-shared``       the same with ``options.shared = true`` (one scale per layer, TensorRT-LLM's)
``qframe-int8-kv``             the same in INT8 (no peer has one)
``modelopt-awq-g{64,128}``     ``INT4_AWQ_CFG`` with that block size (``--modelopt-python``)
``modelopt-smoothquant``       ``INT8_SMOOTHQUANT_CFG`` (``--modelopt-python``)
``modelopt-fp8-kv``            ``FP8_KV_CFG`` alone, every other quantizer off (``--modelopt-python``)
``llmcompressor-gptq-g{64,128}``  ``GPTQModifier``, int4 symmetric groups (``--llmcompressor-python``)
``llmcompressor-awq-g{64,128}``   ``AWQModifier``, int4 symmetric groups (``--llmcompressor-python``)
=============================  ==============================================================

    python bench/algorithms_vs_peers.py --model M --calib-data text:plays/ --eval-data text:essay.txt \\
        --modelopt-python .peer/bin/python --llmcompressor-python /work/lcvenv/bin/python

The KV cache methods leave the weights unquantized; with ``qframe-fp8-kv`` and ``modelopt-fp8-kv``
in one run the report also holds ``kv_scale_agreement``: the largest relative difference of a
layer's k or v scale (qframe's ``k_scale * 448`` against modelopt's ``k_bmm_quantizer`` amax).
"""

from __future__ import annotations

import argparse
import copy
import json
import subprocess
import sys
import sysconfig
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(REPO))

from safetensors.torch import save_file  # noqa: E402

import qframe  # noqa: E402
from qframe.api import pick_device  # noqa: E402
from qframe.data import DataContext, calibration_windows, evaluation_windows  # noqa: E402
from qframe.evaluate import perplexity  # noqa: E402
from qframe.kvcache import cache_quantizers  # noqa: E402
from qframe.model import load_model, resolve_source  # noqa: E402
from qframe.plugins import default_registry  # noqa: E402

GROUPS = (64, 128)
QFRAME = {
    **{f"qframe-rtn-g{g}": ("rtn_w4a16.toml", g) for g in GROUPS},
    **{f"qframe-awq-g{g}": ("awq_w4a16.toml", g) for g in GROUPS},
    **{f"qframe-gptq-g{g}": ("gptq_w4a16.toml", g) for g in GROUPS},
    **{f"qframe-awq-gptq-g{g}": ("awq_gptq_w4a16.toml", g) for g in GROUPS},
    "qframe-smoothquant": ("smoothquant_w8a8.toml", None),
    **{f"qframe-smoothquant-a{a}": ("smoothquant_w8a8.toml", None, {"stage.0.options.alpha": a}) for a in (0.5, 0.8, 0.9, 0.95)},
    "qframe-gptq-actorder-g64": ("gptq_w4a16.toml", 64, {"stage.0.options.act_order": True}),
    "qframe-fp8-kv": ("fp8_kv_cache.toml", None),
    "qframe-fp8-kv-shared": ("fp8_kv_cache.toml", None, {"stage.0.options.shared": True}),
    "qframe-int8-kv": ("fp8_kv_cache.toml", None, {"stage.0.activations.type": "int"}),
}
PEERS = {
    **{f"modelopt-awq-g{g}": "modelopt" for g in GROUPS},
    "modelopt-smoothquant": "modelopt",
    "modelopt-fp8-kv": "modelopt",
    **{f"llmcompressor-{a}-g{g}": "llmcompressor" for a in ("gptq", "awq") for g in GROUPS},
}


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


def qframe_overrides(recipe: Path, group: int | None) -> dict:
    """Set every stage's weight group size (AWQ and GPTQ stages alike) to ``group``."""
    if group is None:
        return {}
    stages = qframe.load_recipe(recipe).stages
    return {f"stage.{i}.weights.group_size": group for i, s in enumerate(stages) if s.scheme.weights is not None}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True)
    p.add_argument("--calib-data", required=True)
    p.add_argument("--eval-data", required=True)
    p.add_argument("--methods", default="all")
    p.add_argument("--calib-samples", type=int, default=32)
    p.add_argument("--samples", type=int, default=24)
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--batch-size", type=int, default=8, help="calibration windows per forward (every tool)")
    p.add_argument("--device")
    p.add_argument("--modelopt-python", help="python of a virtual environment with nvidia-modelopt")
    p.add_argument("--llmcompressor-python", help="python of a virtual environment with llmcompressor")
    p.add_argument("--json-out")
    args = p.parse_args()
    known = ["baseline", *QFRAME, *PEERS]
    methods = known if args.methods == "all" else [m.strip() for m in args.methods.split(",")]
    unknown = [m for m in methods if m not in known]
    if unknown:
        p.error(f"unknown methods {unknown}; known: {', '.join(known)}")

    device, registry = pick_device(args.device), default_registry()
    source = resolve_source(args.model)
    loaded = load_model(source, "float32")
    context = DataContext(loaded.tokenizer, loaded.model, samples=args.calib_samples, seq_len=args.seq_len)
    calib = calibration_windows(args.calib_data, context, registry)
    held_out = evaluation_windows(args.eval_data, context, registry, args.samples)
    report = {"model": args.model, "device": str(device), "calibration_sha256": calib.sha256,
              "evaluation_sha256": held_out.sha256, "results": {}}
    log(f"calibration {tuple(calib.ids.shape)} sha256 {calib.sha256[:12]}, evaluation {tuple(held_out.ids.shape)} "
        f"sha256 {held_out.sha256[:12]}")
    base_ppl = perplexity(loaded.model, held_out, device).perplexity
    report["results"]["baseline"] = {"perplexity": base_ppl}
    log(f"{'baseline':28s} {base_ppl:.4f}")

    def save() -> None:  # after every method: a run cut short keeps what it measured
        if args.json_out:
            Path(args.json_out).write_text(json.dumps(report, indent=2, default=str) + "\n")

    def record(name: str, entry: dict) -> None:
        entry["delta_pct"] = 100 * (entry["perplexity"] / base_ppl - 1)
        report["results"][name] = entry
        save()
        log(f"{name:28s} {entry['perplexity']:.4f} ({entry['delta_pct']:+.2f} %)  quantize {entry.get('quantize_s', 0):.1f} s")

    for name in (m for m in methods if m in QFRAME):
        file, group, *extra = QFRAME[name]
        path = REPO / "recipes" / file
        try:
            recipe = qframe.load_recipe(path, {**qframe_overrides(path, group), **(extra[0] if extra else {})})
            recipe = type(recipe)(recipe.model, type(recipe.calibration)(**{**recipe.calibration.__dict__,
                                  "batch_size": args.batch_size}), recipe.stages, recipe.export, recipe.source)
            model = copy.deepcopy(loaded.model)
            started = time.perf_counter()
            qframe.quantize(model, recipe, calibration=calib, device=device)
            seconds = time.perf_counter() - started
            caches = {n: [float(c.k_scale), float(c.v_scale)] for n, c in cache_quantizers(model).items()}
            record(name, {"perplexity": perplexity(model, held_out, device).perplexity, "quantize_s": round(seconds, 2),
                          "recipe": recipe.to_dict(), **({"kv_scales": caches} if caches else {})})
        except Exception as exc:  # noqa: BLE001 - one method's failure never stops the others
            report["results"][name] = {"error": f"{type(exc).__name__}: {exc}"}
            log(f"{name:28s} failed: {type(exc).__name__}: {exc}")

    peers = [m for m in methods if m in PEERS]
    if peers:
        with tempfile.TemporaryDirectory() as tmp:
            windows = Path(tmp) / "windows.safetensors"
            save_file({"calibration": calib.ids.contiguous(), "evaluation": held_out.ids.contiguous()}, str(windows))
            for name in peers:
                python = getattr(args, f"{PEERS[name]}_python")
                if not python:
                    report["results"][name] = {"skipped": f"no --{PEERS[name]}-python given"}
                    log(f"{name:28s} skipped: no --{PEERS[name]}-python")
                    continue
                command = [python, str(HERE / "peer_worker.py"), "--method", name, "--model", str(source.location),
                           "--windows", str(windows), "--device", str(device), "--batch-size", str(args.batch_size),
                           "--fallback-path", sysconfig.get_paths()["purelib"]]
                done = subprocess.run(command, capture_output=True, text=True)
                lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
                if done.returncode != 0 or not lines:
                    tail = (done.stderr or done.stdout).strip().splitlines()[-3:]
                    report["results"][name] = {"error": " | ".join(tail)}
                    log(f"{name:28s} failed: {' | '.join(tail)}")
                    continue
                entry = json.loads(lines[-1])
                if entry["eval_sha256"] != held_out.sha256:
                    raise RuntimeError(f"{name} scored other windows")
                record(name, entry)
    agreement = kv_scale_agreement(report["results"])
    if agreement is not None:
        report["kv_scale_agreement"] = agreement
        log(f"KV scales, qframe-fp8-kv against modelopt-fp8-kv: largest relative difference {agreement['max_rel_diff']:.3g} "
            f"({agreement['where']}) over {agreement['layers']} layers")
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(report, indent=2, default=str) + "\n")
        log(f"wrote {args.json_out}")


def kv_scale_agreement(results: dict) -> dict | None:
    """The largest relative difference between qframe's FP8 KV amax (``scale * 448``) and
    modelopt's ``k/v_bmm_quantizer`` amax, over layers and K/V, when both methods ran."""
    ours, theirs = (results.get(m, {}).get(key) for m, key in (("qframe-fp8-kv", "kv_scales"),
                                                               ("modelopt-fp8-kv", "kv_amax")))
    if not ours or not theirs:
        return None
    worst, where = 0.0, ""
    for attention, scales in ours.items():
        for role, scale, amax in zip("kv", scales, theirs[attention]):
            diff = abs(scale * 448 / amax - 1)
            if diff >= worst:
                worst, where = diff, f"{attention} {role}"
    return {"max_rel_diff": worst, "where": where, "layers": len(ours)}


if __name__ == "__main__":
    main()
