"""Time qframe's layer-wise pipeline on a random-weight Llama of any shape.

Timing and memory do not depend on weight values, so no checkpoint is needed:

    python bench/pipeline_speed.py --hidden 4096 --intermediate 14336 --layers 4 \
        --heads 32 --kv-heads 8 --recipe recipes/rtn_w8a8.toml --samples 128 --seq-len 2048

Prints one JSON line: seconds per decoder layer, total seconds, peak accelerator memory.
"""

from __future__ import annotations

import argparse
import json
import time

import torch
from transformers import AutoModelForCausalLM, LlamaConfig

import qframe
from qframe.api import pick_device


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--recipe", default="recipes/rtn_w8a8.toml")
    p.add_argument("--set", dest="overrides", action="append", default=[])
    p.add_argument("--hidden", type=int, default=2048)
    p.add_argument("--intermediate", type=int, default=8192)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--heads", type=int, default=16)
    p.add_argument("--kv-heads", type=int, default=8)
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--samples", type=int, default=32)
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--device")
    args = p.parse_args()

    device = pick_device(args.device)
    config = LlamaConfig(hidden_size=args.hidden, intermediate_size=args.intermediate, num_hidden_layers=args.layers,
                         num_attention_heads=args.heads, num_key_value_heads=args.kv_heads, vocab_size=args.vocab,
                         max_position_embeddings=max(args.seq_len, 2048))
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=getattr(torch, args.dtype)).eval()
    recipe = qframe.load_recipe(args.recipe, args.overrides + [f"calibration.samples={args.samples}",
                                                               f"calibration.seq_len={args.seq_len}"])
    ids = torch.randint(0, args.vocab, (args.samples, args.seq_len))
    layer_bytes = sum(p.numel() * p.element_size() for p in model.model.layers[0].parameters())
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    started = time.perf_counter()
    qmodel = qframe.quantize(model, recipe, calibration=ids, device=device)
    total = time.perf_counter() - started
    peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None
    print(json.dumps({
        "recipe": args.recipe, "overrides": args.overrides, "device": str(device),
        "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
        "shape": {"hidden": args.hidden, "intermediate": args.intermediate, "layers": args.layers},
        "calibration_tokens": args.samples * args.seq_len,
        "seconds_total": round(total, 3),
        "seconds_per_layer": [round(layer["seconds"], 3) for layer in qmodel.layers],
        "layer_weight_gib": round(layer_bytes / 2**30, 3),
        "peak_gpu_gib": round(peak / 2**30, 3) if peak is not None else None,
    }))


if __name__ == "__main__":
    main()
