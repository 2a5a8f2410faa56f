#!/usr/bin/env python
"""Quantize with a peer tool and score perplexity on windows given by the caller.

Run by ``bench/algorithms_vs_peers.py`` inside the peer's own virtual environment (its pins
clash with qframe's): it loads the same model file with ``qframe.model.load_model``, reads
the calibration and evaluation token windows from a safetensors file (no pickles), applies
one peer method, scores it with ``qframe.evaluate.perplexity`` on the very same windows, and
prints one JSON line. qframe is imported from the checkout (only its loading and scoring code,
and :func:`qframe.testing.moe_from_dense`).

With ``--moe FAMILY`` (``mixtral`` or ``qwen2_moe``; ``--experts``, ``--top-k``, ``--moe-seed``)
the loaded dense model is first turned into that mixture of experts by
:func:`qframe.testing.moe_from_dense` (every expert a copy of the dense MLP, a seeded random
router: ``bench/moe_quality.py``'s models), and the peer quantizes the MoE. The JSON line then
says how many experts the peer really quantized (``experts_quantized``, ``k/n`` over every
layer's experts) and what became of the routers; ``model_sha256`` identifies the model the peer
was given (every tensor of its state, before quantization), so a caller can check it built the
same model.

Methods:

* ``modelopt-awq-g{G}``: ``INT4_AWQ_CFG`` with ``block_sizes[-1] = G`` (modelopt's own disabled
  list: ``lm_head``, routers, ``shared_expert_gate``, ...). Fused experts get one weight
  quantizer per expert; the count checks each is enabled and calibrated (has an amax).
  modelopt's AWQ-lite searches scales for linears only: fused experts keep max-calibrated
  weights (``expert_modules_awq_scaled`` counts expert modules given AWQ's input scale).
* ``modelopt-smoothquant``, ``modelopt-fp8-kv``: ``INT8_SMOOTHQUANT_CFG``; ``FP8_KV_CFG`` alone.
* ``llmcompressor-gptq-g{G}``, ``llmcompressor-awq-g{G}``: ``GPTQModifier`` or
  ``AWQModifier`` + ``QuantizationModifier``, int4 symmetric groups of ``G``, every
  ``Linear`` but ``lm_head``. Fused experts are linearized first
  (``llmcompressor.modeling.moe.linearize.linearize_moe``, the documented path for a model
  already loaded: one ``nn.Linear`` per expert projection) and ``oneshot`` runs with
  ``moe_calibrate_all_experts=True`` (every token through every expert during calibration,
  only the routed ones counting in the output). The routers (``TopKRouter``, not ``Linear``)
  are not targeted and stay float.

    .peer/bin/python bench/peer_worker.py --method modelopt-awq-g128 --model M --windows W.safetensors
    /tmp/llmc-venv/bin/python bench/peer_worker.py --method llmcompressor-gptq-g64 --moe mixtral \\
        --model M --windows W.safetensors --fallback-path .venv/lib/python3.11/site-packages
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import hashlib
import io
import json
import sys
import time
import warnings
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
# Packages qframe needs that the peer's environment lacks (pluggy, ...) come from qframe's own
# environment, after the peer's: the peer keeps its pinned versions.
if "--fallback-path" in sys.argv[:-1]:
    sys.path.append(sys.argv[sys.argv.index("--fallback-path") + 1])

import torch  # noqa: E402
from safetensors.torch import load_file  # noqa: E402

from qframe.evaluate import perplexity  # noqa: E402
from qframe.model import load_model, resolve_source  # noqa: E402
from qframe.testing import MOE_FROM_DENSE, moe_from_dense  # noqa: E402


def batches(ids: torch.Tensor, size: int):
    return [ids[i:i + size] for i in range(0, len(ids), size)]


def ids_sha256(ids: torch.Tensor) -> str:
    """The digest qframe gives token windows (``qframe.data``): little-endian int64 bytes."""
    return hashlib.sha256(ids.numpy().astype("<i8").tobytes()).hexdigest()


def model_sha256(model: torch.nn.Module) -> str:
    """A digest of every tensor in ``model``'s state dict (names and raw bytes, sorted by name)."""
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def expected_experts(model) -> int:
    """Experts in all of ``model``'s MoE layers, read before the peer rewrites them (0: dense)."""
    return sum(int(getattr(layer.mlp.experts, "num_experts", 0)) for layer in model.model.layers
               if hasattr(layer.mlp, "experts"))


def indivisible_linears(model, method: str) -> list[str]:
    """Linears (but ``lm_head``) whose input width the method's group size (``-g{G}``) does not
    divide; none for a method without groups."""
    group = method.rsplit("-g", 1)[1] if "-g" in method else ""
    if not group.isdigit():
        return []
    return [n for n, m in model.named_modules()
            if isinstance(m, torch.nn.Linear) and m.in_features % int(group) and n != "lm_head"]


def modelopt(method: str, model, calib: torch.Tensor, device: torch.device, batch: int, tokenizer=None,
             float_linears: list[str] = ()):
    import modelopt.torch.quantization as mtq

    if method.startswith("modelopt-awq-g"):
        cfg = copy.deepcopy(mtq.INT4_AWQ_CFG)
        group = int(method.rsplit("g", 1)[1])
        for entry in cfg["quant_cfg"]:  # a list of {quantizer_name, cfg} in modelopt 0.47
            if isinstance(entry, dict) and entry.get("quantizer_name") == "*weight_quantizer":
                entry["cfg"]["block_sizes"][-1] = group
        described = f"INT4_AWQ_CFG, block_sizes[-1] = {group}"
    elif method == "modelopt-smoothquant":
        cfg, described = copy.deepcopy(mtq.INT8_SMOOTHQUANT_CFG), "INT8_SMOOTHQUANT_CFG"
    elif method == "modelopt-fp8-kv":  # the cache alone: every other quantizer off, as qframe's kv_cache stage
        cfg = {"quant_cfg": [{"quantizer_name": "*", "enable": False}, *copy.deepcopy(mtq.FP8_KV_CFG["quant_cfg"])],
               "algorithm": "max"}
        described = "FP8_KV_CFG alone (every other quantizer disabled), max calibration"
    else:
        raise SystemExit(f"unknown modelopt method {method}")
    if float_linears:
        off = [{"quantizer_name": f"{name}.*", "enable": False} for name in float_linears]
        cfg["quant_cfg"] = [*cfg["quant_cfg"], *off]
        described += f"; quantizers of {len(float_linears)} more linear(s) disabled (--ignore-indivisible)"

    def loop(m):
        with torch.no_grad():
            for b in batches(calib, batch):
                m(input_ids=b.to(device), use_cache=False)

    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        model = mtq.quantize(model, cfg, loop)
    found = {"config": described, "quant_cfg": cfg}
    amax = {n: [float(m.k_bmm_quantizer.amax), float(m.v_bmm_quantizer.amax)] for n, m in model.named_modules()
            if getattr(getattr(m, "k_bmm_quantizer", None), "is_enabled", False)}
    return model, {**found, **({"kv_amax": amax} if amax else {})}


def modelopt_coverage(model, experts: int) -> dict:
    """What modelopt quantized: per-expert weight quantizers of fused experts (``_QuantFusedExperts``
    keeps an ``nn.ModuleList`` of them per projection) that are enabled and calibrated, for every
    expert and projection; linears with an enabled weight quantizer; whether AWQ scaled inputs
    (a ``pre_quant_scale``) on linears and on experts; routers carrying an enabled quantizer."""
    from modelopt.torch.quantization.nn import TensorQuantizer

    def live(q) -> bool:
        return q.is_enabled and getattr(q, "amax", None) is not None

    def scaled(q) -> bool:
        return q is not None and getattr(q, "pre_quant_scale", None) is not None

    done = awq_experts = fused = 0
    linears, linears_done, linears_awq, routers, routers_quantized = 0, 0, 0, 0, []
    for name, module in model.named_modules():
        lists = [v for k, v in module.named_children() if k.endswith("_weight_quantizers")]
        if lists:
            fused += 1
            done += sum(all(live(q[i]) for q in lists) for i in range(len(lists[0])))
            inputs = [v for k, v in module.named_children() if k.endswith("_input_quantizer")]
            awq_experts += any(scaled(q) for q in inputs)
        elif isinstance(module, torch.nn.Linear) and isinstance(getattr(module, "weight_quantizer", None),
                                                                TensorQuantizer):
            linears += 1
            linears_done += live(module.weight_quantizer)
            linears_awq += scaled(getattr(module, "input_quantizer", None))
        if name.endswith(".mlp.gate"):
            routers += 1
            if any(isinstance(m, TensorQuantizer) and m.is_enabled for m in module.modules()):
                routers_quantized.append(name)
    out = {"linears_quantized": f"{linears_done}/{linears}", "linears_awq_scaled": f"{linears_awq}/{linears}"}
    if experts:
        out.update({"experts_quantized": f"{done}/{experts}", "expert_modules_awq_scaled": f"{awq_experts}/{fused}",
                    "routers": f"{len(routers_quantized)}/{routers} quantized" if routers_quantized else
                    f"float ({routers} TopKRouter modules, no quantizer)"})
    return out


def llmcompressor(method: str, model, calib: torch.Tensor, device: torch.device, batch: int, tokenizer=None,
                  float_linears: list[str] = ()):
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme
    from datasets import Dataset
    from llmcompressor import oneshot
    from llmcompressor.modeling.moe.linearize import linearize_moe
    from llmcompressor.modifiers.quantization import GPTQModifier, QuantizationModifier
    from llmcompressor.modifiers.transform.awq import AWQModifier

    kind, group = method.split("-")[1], int(method.rsplit("g", 1)[1])
    scheme = QuantizationScheme(targets=["Linear"], weights=QuantizationArgs(
        num_bits=4, type="int", symmetric=True, strategy="group", group_size=group))
    ignore = ["lm_head", *float_linears]
    if kind == "gptq":
        recipe, described = [GPTQModifier(config_groups={"group_0": scheme}, ignore=ignore)], "GPTQModifier"
    elif kind == "awq":  # the 0.14 API: AWQ smooths, QuantizationModifier quantizes
        recipe = [AWQModifier(), QuantizationModifier(config_groups={"group_0": scheme}, ignore=ignore)]
        described = "AWQModifier + QuantizationModifier"
        if not torch.cuda.is_available():
            # 0.14's AWQ pins its cached activations, which needs an accelerator: leave them
            # unpinned on a CPU-only machine.
            from llmcompressor.pipelines.cache import IntermediatesCache

            IntermediatesCache.pin_memory = lambda self, *a, **k: None
    else:
        raise SystemExit(f"unknown llmcompressor method {method}")
    data = Dataset.from_dict({"input_ids": calib.tolist(), "attention_mask": torch.ones_like(calib).tolist()})
    # oneshot reads the config (and a processor) from the model's name_or_path: give it a folder
    # with both, since a GGUF-loaded model's path is the file's folder.
    import tempfile

    folder = tempfile.mkdtemp()
    model.config.save_pretrained(folder)
    if tokenizer is not None:
        tokenizer.save_pretrained(folder)
    model.config._name_or_path = model.name_or_path = folder
    model.to(device)
    linearize_moe(model)  # fused 3-D experts -> one nn.Linear per expert projection (no-op when dense)
    oneshot(model=model, dataset=data, recipe=recipe, num_calibration_samples=len(calib), processor=tokenizer,
            max_seq_length=calib.shape[1], batch_size=batch, moe_calibrate_all_experts=True)
    more = f" and {len(float_linears)} more linear(s) (--ignore-indivisible)" if float_linears else ""
    return model, {"config": f"{described}, int4 symmetric, group {group}, targets Linear, ignore lm_head{more}; "
                             "linearize_moe + oneshot(moe_calibrate_all_experts=True)"}


def llmcompressor_coverage(model, experts: int) -> dict:
    """What llm-compressor quantized: experts (of its ``LinearExperts2D``) whose every projection
    carries a 4-bit ``quantization_scheme`` and a ``weight_scale``; other linears likewise; and
    the routers (not ``Linear``: float unless they carry a scheme)."""
    from llmcompressor.modeling.moe.linear_experts import LinearExperts2D

    def quantized(module) -> bool:
        weights = getattr(getattr(module, "quantization_scheme", None), "weights", None)
        return weights is not None and weights.num_bits == 4 and getattr(module, "weight_scale", None) is not None

    done, in_experts, routers, routers_quantized = 0, set(), 0, []
    for name, module in model.named_modules():
        if isinstance(module, LinearExperts2D):
            for index in range(module.num_experts):
                projections = [m for m in module[index].children() if isinstance(m, torch.nn.Linear)]
                in_experts.update(projections)
                done += bool(projections) and all(quantized(m) for m in projections)
        if name.endswith(".mlp.gate"):
            routers += 1
            if any(quantized(m) for m in module.modules()):
                routers_quantized.append(name)
    linears = [(n, m) for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and m not in in_experts]
    out = {"linears_quantized": f"{sum(quantized(m) for _, m in linears)}/{len(linears)}",
           "lm_head_quantized": any(quantized(m) for n, m in linears if n == "lm_head")}
    if experts:
        out.update({"experts_quantized": f"{done}/{experts}",
                    "routers": f"{len(routers_quantized)}/{routers} quantized" if routers_quantized else
                    f"float ({routers} TopKRouter modules, not Linear, not targeted)"})
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--method", required=True)
    p.add_argument("--model", required=True)
    p.add_argument("--windows", required=True, help="safetensors with 'calibration' and 'evaluation' int64 ids")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--fallback-path", help="site-packages searched after the peer's own (qframe's dependencies)")
    p.add_argument("--moe", choices=MOE_FROM_DENSE,
                   help="turn the loaded dense model into this MoE (qframe.testing.moe_from_dense) before quantizing")
    p.add_argument("--experts", type=int, default=4, help="with --moe: experts per layer (as moe_quality.py)")
    p.add_argument("--top-k", type=int, default=2, help="with --moe: experts routed per token (as moe_quality.py)")
    p.add_argument("--moe-seed", type=int, default=0, help="with --moe: seed of the random router (as moe_from_dense)")
    p.add_argument("--ignore-indivisible", action="store_true",
                   help="leave float each Linear whose input width the method's group size does not divide (both "
                        "tools fail on Qwen2-MoE's zeroed width-1 shared expert; llm-compressor's warning advises this)")
    args = p.parse_args()
    device = torch.device(args.device)
    windows = load_file(args.windows)
    from qframe.data import TokenWindows

    held = windows["evaluation"]
    evaluation = TokenWindows(held, ids_sha256(held), "given")
    loaded = load_model(resolve_source(args.model), "float32")
    model = loaded.model.eval()
    if args.moe:
        model = moe_from_dense(model, args.moe, num_experts=args.experts, top_k=args.top_k, seed=args.moe_seed)
    identity = {"model": args.moe or "dense", "model_sha256": model_sha256(model),
                "calib_sha256": ids_sha256(windows["calibration"])}
    if args.moe:
        identity.update({"experts": args.experts, "top_k": args.top_k, "moe_seed": args.moe_seed})
    experts = expected_experts(model)
    started = time.perf_counter()
    modelopt_method = args.method.startswith("modelopt-")
    tool = modelopt if modelopt_method else llmcompressor
    peak = torch.cuda.reset_peak_memory_stats(device) if device.type == "cuda" else None
    indivisible = indivisible_linears(model, args.method)
    left_float = indivisible if args.ignore_indivisible else []
    model, config = tool(args.method, model.to(device), windows["calibration"], device, args.batch_size,
                         loaded.tokenizer, float_linears=left_float)
    seconds = time.perf_counter() - started
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated(device) / 2**30
    coverage = (modelopt_coverage if modelopt_method else llmcompressor_coverage)(model, experts)
    result = perplexity(model, evaluation, device, 4)
    print(json.dumps({"method": args.method, **identity, "perplexity": result.perplexity, "eval_sha256": result.sha256,
                      "quantize_s": round(seconds, 2), "peak_gib": peak, **coverage, **config,
                      "indivisible_linears": len(indivisible), "left_float": left_float}, default=str))


if __name__ == "__main__":
    main()
