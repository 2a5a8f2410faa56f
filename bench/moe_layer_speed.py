#!/usr/bin/env python
"""Seconds and peak GPU memory to quantize one Qwen3-30B-A3B-shaped MoE decoder layer: qframe against llm-compressor.

One decoder layer of Qwen3-30B-A3B's shape (hidden 2048, 32 heads of 128, 4 KV heads, 128
routed experts of width 768, top-8; transformers' ``Qwen3MoeConfig`` with one layer and a
32000-token vocabulary), random weights (normal, std 0.02, seeded), bfloat16, built directly
on the GPU. Calibration: 128 × 2048 random token ids (seeded), the same for every tool.
Scheme: int4 weights, symmetric, groups of 128 (W4A16 g128) on the attention projections and
every routed expert; ``lm_head`` and the router (``mlp.gate``) stay float on both sides.

For each tool × algorithm (``gptq``, ``awq``; qframe also ``rtn``, a harness check) a fresh
process builds the model, runs the float layer once on a held-out batch, resets
``torch.cuda``'s peak counter, quantizes (timed: the whole ``qframe.quantize`` call, or
llm-compressor's linearization of the fused experts plus its ``oneshot`` call), then checks
what got quantized and measures the layer's relative output error on the held-out batch.

* qframe: ``qframe.quantize`` with a recipe built from a dict (stage ``gptq`` with
  ``block_size = 128, dampening = 0.01, act_order = false``, or ``awq`` with its defaults;
  ``weights = {bits = 4, group_size = 128}``, ``targets = ["Linear", "Experts"]``,
  ``ignore = ["lm_head", "re:.*mlp.gate$"]``). What got quantized is read from the manifest's
  coverage and :func:`qframe.experts.quantized_experts`; a row whose experts stayed float is
  labelled ``experts NOT quantized`` (a quantizer that does not handle fused experts yet).
* llm-compressor 0.14: the fused ``Qwen3MoeExperts`` are linearized first
  (``llmcompressor.modeling.moe.linearize.linearize_moe``: one ``gate_proj``/``up_proj``/
  ``down_proj`` ``nn.Linear`` per expert; what ``oneshot`` itself does, with a warning, when
  handed fused experts; ``load_quantizable_moe`` does it at load time), then ``oneshot`` with
  ``moe_calibrate_all_experts=True`` (every token through every expert during calibration, only
  the routed ones counting in the output). GPTQ: ``GPTQModifier(block_size=128,
  dampening_frac=0.01, actorder=None)``; AWQ: ``[AWQModifier(), QuantizationModifier(...)]``
  (the 0.14 API); both with ``targets=["Linear"]``, ``ignore=["lm_head", "re:.*mlp.gate$"]``.
  What got quantized: the ``nn.Linear`` modules carrying a 4-bit ``quantization_scheme`` and a
  ``weight_scale``.

Each tool runs in its own process (llm-compressor pins versions that clash with qframe's
environment): ``--tools`` runs the workers and prints one JSON line per measurement and a
markdown table. On the GPU machine, with llm-compressor's wheels installed to /tmp/site:

    python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/llmc/*.whl
    python3 bench/moe_layer_speed.py --jobs qframe:rtn,llmcompressor:gptq,qframe:gptq,llmcompressor:awq,qframe:awq \\
        --qframe-python python3 --llmc-python "env PYTHONPATH=/tmp/site python3" --worker-timeout 200 --out-dir $OUT

(``--jobs`` fixes the order; ``--tools qframe,llmcompressor --algorithms gptq,awq`` runs the
same four measurements tool by tool. ``--table FILE.jsonl`` prints the table of saved results.)

On the CPU with a tiny shape (hidden 64, 8 experts, top 2, 2 × 64 tokens, groups of 32):

    python bench/moe_layer_speed.py --tiny --device cpu --tools qframe,llmcompressor \\
        --llmc-python /tmp/llmc-venv/bin/python
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import shlex
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import torch  # noqa: E402

# Qwen3-30B-A3B's decoder layer (its config.json), one layer; a small vocabulary (lm_head and the
# embeddings are no part of what is measured).
FULL = dict(hidden=2048, intermediate=6144, moe_intermediate=768, experts=128, top_k=8, heads=32, kv_heads=4,
            head_dim=128, vocab=32000, samples=128, seq_len=2048, eval_samples=4, group=128, batch_size=8)
TINY = dict(hidden=64, intermediate=128, moe_intermediate=32, experts=8, top_k=2, heads=4, kv_heads=2,
            head_dim=16, vocab=512, samples=2, seq_len=64, eval_samples=1, group=32, batch_size=1)
IGNORE = ["lm_head", "re:.*mlp.gate$"]
ALGORITHMS = {"qframe": ("gptq", "awq", "rtn"), "llmcompressor": ("gptq", "awq")}
NOT_QUANTIZED = "experts NOT quantized"


# ----------------------------------------------------------------------------- the model

def build_model(shape: dict, device: torch.device, seed: int):
    """The Qwen3-MoE model of ``shape``: one decoder layer, bf16, every matrix normal(0, 0.02)
    from a seeded generator on ``device`` (the same weights in every process on one machine)."""
    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

    config = Qwen3MoeConfig(
        vocab_size=shape["vocab"], hidden_size=shape["hidden"], intermediate_size=shape["intermediate"],
        moe_intermediate_size=shape["moe_intermediate"], num_hidden_layers=1, num_attention_heads=shape["heads"],
        num_key_value_heads=shape["kv_heads"], head_dim=shape["head_dim"], num_experts=shape["experts"],
        num_experts_per_tok=shape["top_k"], norm_topk_prob=True, decoder_sparse_step=1, mlp_only_layers=[],
        max_position_embeddings=max(4096, shape["seq_len"]), tie_word_embeddings=False, initializer_range=0.02,
        use_cache=False, dtype="bfloat16")  # llm-compressor builds its per-expert linears in config.dtype
    before = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        with torch.device(device):
            model = Qwen3MoeForCausalLM(config)
    finally:
        torch.set_default_dtype(before)
    generator = torch.Generator(device=device).manual_seed(seed)
    with torch.no_grad():
        for _, p in sorted(model.named_parameters()):
            if p.dim() >= 2:
                p.normal_(0.0, 0.02, generator=generator)
    return model.eval()


def token_ids(shape: dict, samples: int, seed: int) -> torch.Tensor:
    return torch.randint(0, shape["vocab"], (samples, shape["seq_len"]), generator=torch.Generator().manual_seed(seed))


class LayerProbe:
    """The first decoder layer's input and output on each forward, kept in float32 on the CPU."""

    def __init__(self, layer: torch.nn.Module):
        self.inputs: list[torch.Tensor] = []
        self.outputs: list[torch.Tensor] = []
        self.handles = [layer.register_forward_pre_hook(self._pre, with_kwargs=True),
                        layer.register_forward_hook(self._post)]

    def _pre(self, _module, args, kwargs):
        hidden = args[0] if args else kwargs["hidden_states"]
        self.inputs.append(hidden.detach().float().cpu())

    def _post(self, _module, _args, output):
        out = output[0] if isinstance(output, (tuple, list)) else output
        self.outputs.append(out.detach().float().cpu())

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


@torch.no_grad()
def layer_outputs(model, ids: torch.Tensor, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """The decoder layer's (input, output) on ``ids``, one sequence per forward."""
    probe = LayerProbe(model.model.layers[0])
    try:
        for row in ids:
            model.model(input_ids=row[None].to(device), use_cache=False)
    finally:
        probe.remove()
    return torch.cat(probe.inputs), torch.cat(probe.outputs)


def relative_errors(reference: tuple[torch.Tensor, torch.Tensor], got: tuple[torch.Tensor, torch.Tensor]) -> dict:
    """``layer``: ||Δq − Δf|| / ||Δf|| with Δ = output − input (what the layer adds to the
    residual stream; the residual itself would hide the error); ``output``: of the outputs."""
    (x_f, y_f), (x_q, y_q) = reference, got
    delta_f, delta_q = y_f - x_f, y_q - x_q
    return {"rel_err_layer": float((delta_q - delta_f).norm() / delta_f.norm()),
            "rel_err_output": float((y_q - y_f).norm() / y_f.norm()),
            "inputs_identical": bool(torch.equal(x_f, x_q))}


# ----------------------------------------------------------------------------- qframe

def qframe_recipe(algorithm: str, shape: dict, group: int, batch_size: int):
    from qframe.recipe import parse_recipe

    stage: dict[str, Any] = {"quantizer": algorithm, "targets": ["Linear", "Experts"], "ignore": IGNORE,
                             "weights": {"bits": 4, "group_size": group, "symmetric": True}}
    if algorithm == "gptq":
        stage["options"] = {"block_size": 128, "dampening": 0.01, "act_order": False}
    return parse_recipe({"calibration": {"samples": shape["samples"], "seq_len": shape["seq_len"],
                                         "batch_size": batch_size},
                         "stage": [stage]}, source="bench/moe_layer_speed.py")


def run_qframe(algorithm: str, model, ids: torch.Tensor, device: torch.device, shape: dict, group: int,
               batch_size: int) -> dict:
    import qframe

    recipe = qframe_recipe(algorithm, shape, group, batch_size)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        qmodel = qframe.quantize(model, recipe, calibration=ids, device=device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return {"qmodel": qmodel, "warnings": [str(w.message) for w in caught]}


def qframe_coverage(result: dict, model, shape: dict) -> dict:
    from qframe.experts import fused_experts, num_experts, quantized_experts
    from qframe.qlinear import QuantLinear

    qmodel = result["qmodel"]
    coverage = qmodel.manifest.get("coverage", {})
    fused = fused_experts(model)
    quantized = quantized_experts(model)
    experts_done = sum(num_experts(m) for m in quantized.values())
    linears = {n for n, m in model.named_modules() if isinstance(m, QuantLinear)}
    attention = [n for n in linears if ".self_attn." in n]
    float_modules = [n for n in ("lm_head", "model.layers.0.mlp.gate")
                     if n in dict(model.named_modules()) and n in linears]
    seconds = [layer.get("seconds") for layer in qmodel.layers if isinstance(layer, dict)]
    coverage_warning = next((w for w in result["warnings"] if "stay in float" in w), None)
    return {
        "experts_quantized": f"{experts_done}/{shape['experts'] * len(fused)}",
        "all_experts_quantized": bool(fused) and len(quantized) == len(fused) and experts_done == shape["experts"] * len(fused),
        "attention_quantized": f"{len(attention)}/4",
        "wrongly_quantized": float_modules,
        "coverage": {k: coverage.get(k) for k in ("quantized_share", "not_quantized", "ignored", "routers")},
        "coverage_warning": coverage_warning,
        "qframe_layer_seconds": seconds,
    }


# ----------------------------------------------------------------------------- llm-compressor

def llmc_recipe(algorithm: str, group: int):
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme
    from llmcompressor.modifiers.quantization import GPTQModifier, QuantizationModifier

    scheme = QuantizationScheme(targets=["Linear"], weights=QuantizationArgs(
        num_bits=4, type="int", symmetric=True, strategy="group", group_size=group))
    if algorithm == "gptq":
        return [GPTQModifier(config_groups={"group_0": scheme}, ignore=IGNORE, block_size=128, dampening_frac=0.01,
                             actorder=None)], "GPTQModifier(block_size=128, dampening_frac=0.01, actorder=None)"
    from llmcompressor.modifiers.transform.awq import AWQModifier

    return ([AWQModifier(), QuantizationModifier(config_groups={"group_0": scheme}, ignore=IGNORE)],
            "AWQModifier() defaults + QuantizationModifier")


def run_llmcompressor(algorithm: str, model, ids: torch.Tensor, device: torch.device, shape: dict, group: int,
                      batch_size: int) -> dict:
    from llmcompressor import oneshot
    from llmcompressor.modeling.moe.linearize import linearize_moe
    from torch.utils.data import DataLoader

    recipe, described = llmc_recipe(algorithm, group)
    if not torch.cuda.is_available():
        # llm-compressor 0.14's AWQ pins its cached activations, which needs an accelerator: on a
        # CPU-only machine (the --tiny smoke test) leave them unpinned. Never done on the GPU.
        from llmcompressor.pipelines.cache import IntermediatesCache

        IntermediatesCache.pin_memory = lambda self, *a, **k: None
    rows = [{"input_ids": row, "attention_mask": torch.ones_like(row)} for row in ids]
    # A DataLoader of token ids is taken as it is (no tokenizer, no datasets.Dataset).
    loader = DataLoader(rows, batch_size=batch_size, shuffle=False)
    # oneshot reads the model's config (and looks for a processor) at model.name_or_path, which a
    # model built from a config lacks: give it a folder with the config.
    folder = tempfile.mkdtemp()
    model.config.save_pretrained(folder)
    model.config._name_or_path = model.name_or_path = folder
    started = time.perf_counter()
    linearize_moe(model)  # fused 3-D experts -> one nn.Linear per expert projection
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    linearized = time.perf_counter() - started
    oneshot(model=model, dataset=loader, recipe=recipe, num_calibration_samples=len(ids),
            max_seq_length=ids.shape[1], batch_size=batch_size, moe_calibrate_all_experts=True)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return {"linearize_s": round(linearized, 3), "oneshot_s": round(time.perf_counter() - started - linearized, 3),
            "config": described + "; linearize_moe + oneshot(moe_calibrate_all_experts=True)"}


def llmc_coverage(result: dict, model, shape: dict) -> dict:
    def quantized(module) -> bool:
        scheme = getattr(module, "quantization_scheme", None)
        weights = getattr(scheme, "weights", None)
        return (weights is not None and weights.num_bits == 4 and getattr(module, "weight_scale", None) is not None)

    modules = dict(model.named_modules())
    done = {n for n, m in modules.items() if isinstance(m, torch.nn.Linear) and quantized(m)}
    prefix = "model.layers.0.mlp.experts"
    experts = sum(all(f"{prefix}.{e}.{p}" in done for p in ("gate_proj", "up_proj", "down_proj"))
                  for e in range(shape["experts"]))
    attention = [n for n in done if ".self_attn." in n]
    wrong = [n for n in ("lm_head", "model.layers.0.mlp.gate") if n in modules and quantized(modules[n])]
    scales_ok = all(tuple(modules[n].weight_scale.shape) == (modules[n].out_features,
                                                            modules[n].in_features // result["group"])
                    for n in done)
    return {"experts_quantized": f"{experts}/{shape['experts']}", "all_experts_quantized": experts == shape["experts"],
            "attention_quantized": f"{len(attention)}/4", "wrongly_quantized": wrong,
            "quantized_linears": len(done), "group_scales_shape_ok": scales_ok}


# ----------------------------------------------------------------------------- one measurement

def worker(args, shape: dict) -> dict:
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    group = args.group or shape["group"]
    batch = args.batch_size or shape["batch_size"]
    began = time.perf_counter()
    model = build_model(shape, device, args.seed)
    calib = token_ids(shape, shape["samples"], args.seed + 1)
    held_out = token_ids(shape, shape["eval_samples"], args.seed + 2)
    reference = layer_outputs(model, held_out, device) if len(held_out) else None
    build_s = time.perf_counter() - began
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    baseline = torch.cuda.memory_allocated(device) if device.type == "cuda" else 0
    run = run_qframe if args.worker == "qframe" else run_llmcompressor
    started = time.perf_counter()
    result = run(args.algorithm, model, calib, device, shape, group, batch)
    seconds = time.perf_counter() - started
    peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None
    result["group"] = group
    covered = (qframe_coverage if args.worker == "qframe" else llmc_coverage)(result, model, shape)
    errors = relative_errors(reference, layer_outputs(model, held_out, device)) if reference is not None else {}
    import transformers

    versions = {"torch": torch.__version__, "transformers": transformers.__version__}
    if args.worker == "llmcompressor":
        from importlib import metadata

        versions.update({k: metadata.version(k) for k in ("llmcompressor", "compressed-tensors")})
    row = {
        "bench": "moe_layer_speed", "tool": args.worker, "algorithm": args.algorithm,
        "label": "" if covered["all_experts_quantized"] else NOT_QUANTIZED,
        "seconds": round(seconds, 2), "peak_gib": round(peak / 2**30, 3) if peak is not None else None,
        "baseline_gib": round(baseline / 2**30, 3) if device.type == "cuda" else None,
        "peak_over_baseline_gib": round((peak - baseline) / 2**30, 3) if peak is not None else None,
        **{k: v for k, v in result.items() if k in ("linearize_s", "oneshot_s", "config")},
        **covered, **errors,
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "shape": {k: shape[k] for k in ("hidden", "experts", "top_k", "moe_intermediate", "heads", "kv_heads",
                                        "head_dim", "vocab")},
        "calibration": [int(calib.shape[0]), int(calib.shape[1])], "eval": [int(held_out.shape[0]), int(held_out.shape[1])],
        "group": group, "batch_size": batch, "seed": args.seed, "build_s": round(build_s, 2),
        "experts_implementation": getattr(model.config, "_experts_implementation", None), "versions": versions,
    }
    if args.worker == "qframe":
        import hashlib

        sources = sorted([*(REPO / "qframe").glob("*.py"), *(REPO / "qframe_plugins").glob("*.py")])
        row["qframe_sources_sha256"] = hashlib.sha256(b"".join(f.read_bytes() for f in sources)).hexdigest()[:16]
        row["qframe_stage"] = result["qmodel"].manifest["recipe"]["stage"][0]
    if args.worker == "qframe" and result.get("warnings"):
        row["warnings"] = [w[:400] for w in result["warnings"]][:5]
    return row


# ----------------------------------------------------------------------------- driver

def table(rows: list[dict]) -> str:
    lines = ["| tool | algorithm | s / layer | peak GPU (GiB) | over baseline (GiB) | experts quantized | attention | "
             "rel. error of the layer (held out) | note |",
             "|---|---|---:|---:|---:|---:|---:|---:|---|"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['tool']} | {r['algorithm']} | — | — | — | — | — | — | failed: {r['error'][:120]} |")
            continue
        note = [r["label"]] if r.get("label") else []
        if "linearize_s" in r:
            note.append(f"linearize {r['linearize_s']} s + oneshot {r['oneshot_s']} s")
        err = f"{r['rel_err_layer']:.4f}" if "rel_err_layer" in r else "—"
        peak = f"{r['peak_gib']:.2f}" if r.get("peak_gib") is not None else "—"
        over = f"{r['peak_over_baseline_gib']:.2f}" if r.get("peak_over_baseline_gib") is not None else "—"
        lines.append(f"| {r['tool']} | {r['algorithm']} | {r['seconds']:.1f} | {peak} | {over} | "
                     f"{r['experts_quantized']} | {r['attention_quantized']} | {err} | {'; '.join(note)} |")
    return "\n".join(lines)


def drive(args, argv: list[str]) -> None:
    tools = [t.strip() for t in (args.tools or "").split(",") if t.strip()]
    algorithms = [a.strip() for a in args.algorithms.split(",") if a.strip()]
    pythons = {"qframe": shlex.split(args.qframe_python), "llmcompressor": shlex.split(args.llmc_python)}
    out_dir = Path(args.out_dir) if args.out_dir else None
    if out_dir:
        out_dir.mkdir(parents=True, exist_ok=True)
    log = (out_dir / "moe_layer_speed.log").open("a") if out_dir else None
    rows: list[dict] = []
    # Every flag but the driver's own travels to each worker (they shape the measurement).
    own = ("--tools", "--algorithms", "--qframe-python", "--llmc-python", "--out-dir", "--worker-timeout", "--jobs")
    cleaned, skip = [], False
    for a in argv:
        if skip:
            skip = False
        elif a in own:
            skip = True
        elif a.split("=")[0] not in own:
            cleaned.append(a)
    jobs = [(t, a) for t in tools for a in algorithms if a in ALGORITHMS.get(t, ())]
    if args.jobs:
        jobs = [tuple(j.strip().split(":", 1)) for j in args.jobs.split(",") if j.strip()]
    for tool, algorithm in jobs:
        command = [*pythons[tool], str(Path(__file__).resolve()), "--worker", tool, "--algorithm", algorithm, *cleaned]
        env = {**os.environ, "PYTHONUNBUFFERED": "1", "TOKENIZERS_PARALLELISM": "false"}
        print(f"[{time.strftime('%H:%M:%S')}] {tool} {algorithm}: {' '.join(command)}", file=sys.stderr, flush=True)
        began = time.perf_counter()
        try:
            done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=args.worker_timeout)
            stdout, stderr, rc = done.stdout, done.stderr, done.returncode
        except subprocess.TimeoutExpired as exc:
            stdout = exc.stdout.decode() if isinstance(exc.stdout, bytes) else (exc.stdout or "")
            stderr = (exc.stderr.decode() if isinstance(exc.stderr, bytes) else (exc.stderr or "")) + \
                f"\ntimed out after {args.worker_timeout} s"
            rc = 124
        wall = time.perf_counter() - began
        if log:
            log.write(f"==== {tool} {algorithm} rc={rc} {wall:.1f} s\n{' '.join(command)}\n--- stdout\n{stdout}\n"
                      f"--- stderr\n{stderr}\n")
            log.flush()
        found = [json.loads(line) for line in stdout.splitlines() if line.startswith('{"bench": "moe_layer_speed"')]
        if rc == 0 and found:
            row = found[-1]
        else:
            tail = " | ".join(line.strip() for line in stderr.strip().splitlines()[-3:])
            row = {"bench": "moe_layer_speed", "tool": tool, "algorithm": algorithm, "error": f"rc {rc}: {tail}"}
            print(stderr[-3000:], file=sys.stderr, flush=True)
        row["process_wall_s"] = round(wall, 1)
        rows.append(row)
        print(json.dumps(row, default=str), flush=True)
        if out_dir:
            with (out_dir / "moe_layer_speed.jsonl").open("a") as f:
                f.write(json.dumps(row, default=str) + "\n")
    text = table(rows)
    print(text, flush=True)
    if out_dir:
        (out_dir / "moe_layer_speed.md").write_text(text + "\n")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tools", help="comma-separated: qframe, llmcompressor (each in its own processes)")
    p.add_argument("--algorithms", default="gptq,awq")
    p.add_argument("--jobs", help="tool:algorithm pairs in this order instead of --tools × --algorithms, "
                   "e.g. qframe:rtn,llmcompressor:gptq")
    p.add_argument("--worker", choices=list(ALGORITHMS), help=argparse.SUPPRESS)
    p.add_argument("--algorithm", help=argparse.SUPPRESS)
    p.add_argument("--qframe-python", default=sys.executable, help="command running qframe's Python")
    p.add_argument("--llmc-python", default=sys.executable,
                   help='command running a Python with llmcompressor, e.g. "env PYTHONPATH=/tmp/site python3"')
    p.add_argument("--tiny", action="store_true", help="hidden 64, 8 experts, top 2, 2 × 64 tokens, groups of 32")
    p.add_argument("--device")
    p.add_argument("--samples", type=int)
    p.add_argument("--seq-len", type=int)
    p.add_argument("--eval-samples", type=int, help="held-out sequences for the output error (0: none)")
    p.add_argument("--group", type=int)
    p.add_argument("--batch-size", type=int, help="calibration batch, the same for both tools (default 8)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--worker-timeout", type=float, default=None, help="seconds for each worker process")
    p.add_argument("--out-dir", help="also write moe_layer_speed.{jsonl,md,log} here")
    p.add_argument("--table", nargs="+", metavar="JSONL", help="only print the table of these result files")
    args = p.parse_args()
    if args.table:
        rows = [json.loads(line) for f in args.table for line in Path(f).read_text().splitlines() if line.strip()]
        print(table(rows))
        return
    shape = dict(TINY if args.tiny else FULL)
    for key in ("samples", "seq_len", "eval_samples"):
        if getattr(args, key) is not None:
            shape[key] = getattr(args, key)
    if args.worker:
        if args.algorithm not in ALGORITHMS[args.worker]:
            p.error(f"--algorithm for {args.worker}: one of {', '.join(ALGORITHMS[args.worker])}")
        print(json.dumps(worker(args, shape), default=str), flush=True)
        return
    if not args.tools and not args.jobs:
        p.error("give --tools or --jobs (or --table)")
    for job in (args.jobs or "").split(","):
        tool, _, algorithm = job.strip().partition(":")
        if job.strip() and algorithm not in ALGORITHMS.get(tool, ()):
            p.error(f"--jobs: {job!r} is not tool:algorithm with {ALGORITHMS}")
    drive(args, sys.argv[1:])


if __name__ == "__main__":
    main()
