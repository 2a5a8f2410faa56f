#!/usr/bin/env python
"""Quantize with a peer tool and score perplexity on windows given by the caller.

Run by ``bench/algorithms_vs_peers.py`` inside the peer's own virtual environment (its pins
clash with qframe's): it loads the same model file with ``qframe.model.load_model``, reads
the calibration and evaluation token windows from a safetensors file (no pickles), applies
one peer method, scores it with ``qframe.evaluate.perplexity`` on the very same windows, and
prints one JSON line. qframe is imported from the checkout (only its loading and scoring code).

    .peer/bin/python bench/peer_worker.py --method modelopt-awq-g128 --model M --windows W.safetensors
"""

from __future__ import annotations

import argparse
import contextlib
import copy
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


def batches(ids: torch.Tensor, size: int):
    return [ids[i:i + size] for i in range(0, len(ids), size)]


def modelopt(method: str, model, calib: torch.Tensor, device: torch.device, batch: int, tokenizer=None):
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


def llmcompressor(method: str, model, calib: torch.Tensor, device: torch.device, batch: int, tokenizer=None):
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme
    from datasets import Dataset
    from llmcompressor import oneshot
    from llmcompressor.modifiers.awq import AWQModifier
    from llmcompressor.modifiers.quantization import GPTQModifier

    kind, group = method.split("-")[1], int(method.rsplit("g", 1)[1])
    scheme = QuantizationScheme(targets=["Linear"], weights=QuantizationArgs(
        num_bits=4, type="int", symmetric=True, strategy="group", group_size=group))
    modifier_cls = {"gptq": GPTQModifier, "awq": AWQModifier}[kind]
    modifier = modifier_cls(config_groups={"group_0": scheme}, ignore=["lm_head"])
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
    oneshot(model=model, dataset=data, recipe=[modifier], num_calibration_samples=len(calib), processor=tokenizer,
            max_seq_length=calib.shape[1], batch_size=batch)
    return model, {"config": f"{modifier_cls.__name__}, int4 symmetric, group {group}, ignore lm_head"}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--method", required=True)
    p.add_argument("--model", required=True)
    p.add_argument("--windows", required=True, help="safetensors with 'calibration' and 'evaluation' int64 ids")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--fallback-path", help="site-packages searched after the peer's own (qframe's dependencies)")
    args = p.parse_args()
    device = torch.device(args.device)
    windows = load_file(args.windows)
    from qframe.data import TokenWindows
    import hashlib

    held = windows["evaluation"]
    evaluation = TokenWindows(held, hashlib.sha256(held.numpy().astype("<i8").tobytes()).hexdigest(), "given")
    loaded = load_model(resolve_source(args.model), "float32")
    model = loaded.model.eval()
    started = time.perf_counter()
    tool = modelopt if args.method.startswith("modelopt-") else llmcompressor
    peak = torch.cuda.reset_peak_memory_stats(device) if device.type == "cuda" else None
    model, config = tool(args.method, model.to(device), windows["calibration"], device, args.batch_size, loaded.tokenizer)
    seconds = time.perf_counter() - started
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated(device) / 2**30
    result = perplexity(model, evaluation, device, 4)
    print(json.dumps({"method": args.method, "perplexity": result.perplexity, "eval_sha256": result.sha256,
                      "quantize_s": round(seconds, 2), "peak_gib": peak, **config}, default=str))


if __name__ == "__main__":
    main()
