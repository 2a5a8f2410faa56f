#!/usr/bin/env python
"""Seconds per decoder layer of ``qframe apply`` on 1 and N GPUs: the streamed command users run.

``bench/algorithms_speed.py`` times ``qframe.quantize`` on a model held in CPU memory, which moves
every finished layer back there. ``qframe apply`` instead reads each layer from the model's
safetensors and writes it from the GPU. This script saves a Llama-3-8B-shaped model (random
weights, seeded, bf16, ``--layers`` layers) with a tokenizer, makes calibration text from this
repository's own sources, and runs the same command alone and under torchrun:

    python bench/ranks_apply.py --ranks 1,2 --layers 4 --tokenizer TOKENIZER_DIR \\
        --recipes recipes/gptq_w4a16.toml,recipes/awq_w4a16.toml

Per layer: the ``seconds`` of each layer in the output's manifest (rank 0's), median after the first.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def build_model(folder: Path, args: argparse.Namespace) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig

    config = LlamaConfig(hidden_size=args.hidden, intermediate_size=args.intermediate, num_hidden_layers=args.layers,
                         num_attention_heads=args.heads, num_key_value_heads=args.kv_heads, vocab_size=49152,
                         max_position_embeddings=4096)
    torch.manual_seed(0)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    with torch.device(device):  # random weights drawn on the GPU: seconds, not a minute
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    model.to("cpu").save_pretrained(folder)
    AutoTokenizer.from_pretrained(args.tokenizer).save_pretrained(folder)


def corpus(path: Path, characters: int = 1_500_000) -> None:
    """Calibration text: the start of this repository's Python and Markdown sources (about 600k
    tokens, more than 128 windows of 2048 need)."""
    text = "\n\n".join(p.read_text(encoding="utf-8", errors="ignore")
                       for pattern in ("**/*.py", "**/*.md") for p in sorted(ROOT.glob(pattern))
                       if not {".venv", ".peer", ".benchdata"} & set(p.parts))
    path.write_text(text[:characters], encoding="utf-8")


def run(recipe: str, ranks: int, model: Path, text: Path, out: Path, samples: int, seq_len: int, device: str) -> dict:
    launch = [sys.executable] if ranks == 1 else \
        [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={ranks}"]
    sets = [f'calibration.dataset="text:{text}"', f"calibration.samples={samples}", f"calibration.seq_len={seq_len}",
            "calibration.batch_size=8", 'export.backend="qframe"']
    command = [*launch, "-m", "qframe", "apply", recipe, "--model", str(model), "--output", str(out), "--device", device,
               *[x for s in sets for x in ("--set", s)]]
    started = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True)
    wall = time.perf_counter() - started
    if done.returncode:
        return {"recipe": recipe, "ranks": ranks, "error": done.stderr[-1500:]}
    manifest = json.loads((out / "qframe.json").read_text())
    per_layer = [layer["seconds"] for layer in manifest["layers"]]
    return {"recipe": Path(recipe).stem, "ranks": ranks, "seconds_per_layer": per_layer,
            "steady": statistics.median(per_layer[1:]) if len(per_layer) > 1 else per_layer[0],
            "wall_s": round(wall, 1)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--ranks", default="1,2")
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--recipes", default="recipes/gptq_w4a16.toml,recipes/awq_w4a16.toml")
    p.add_argument("--tokenizer", required=True)
    p.add_argument("--samples", type=int, default=128)
    p.add_argument("--seq-len", type=int, default=2048)
    p.add_argument("--hidden", type=int, default=4096)
    p.add_argument("--intermediate", type=int, default=14336)
    p.add_argument("--heads", type=int, default=32)
    p.add_argument("--kv-heads", type=int, default=8)
    p.add_argument("--device", default="cuda")
    args = p.parse_args()
    work = Path(tempfile.mkdtemp())
    build_model(work / "model", args)
    corpus(work / "corpus.txt")
    rows = []
    for recipe in args.recipes.split(","):
        for ranks in map(int, args.ranks.split(",")):
            row = run(recipe, ranks, work / "model", work / "corpus.txt", work / f"out-{Path(recipe).stem}-{ranks}",
                      args.samples, args.seq_len, args.device)
            print(json.dumps(row), flush=True)
            rows.append(row)
    print("\n| recipe | GPUs | s/layer (median after the first) | per layer | wall s |\n|---|---:|---:|---|---:|")
    for r in rows:
        if "error" not in r:
            print(f"| {r['recipe']} | {r['ranks']} | {r['steady']:.2f} | {r['seconds_per_layer']} | {r['wall_s']} |")


if __name__ == "__main__":
    main()
