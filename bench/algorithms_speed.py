#!/usr/bin/env python
"""Seconds per decoder layer and peak GPU memory of AWQ and GPTQ: qframe, modelopt, llm-compressor.

The same random-weight Llama (seeded; timing and memory do not depend on weight values) and
the same random calibration tokens for every tool; one tool per process, so that one tool's
cached memory never counts against another's:

    python bench/algorithms_speed.py --tools qframe-gptq,qframe-awq,llmcompressor-gptq,llmcompressor-awq,modelopt-awq \\
        --layers 4 --tokenizer TOKENIZER_DIR

qframe keeps the model in CPU memory and moves one decoder layer at a time to the GPU; the peers
get the model as their documented flows take it (modelopt: on the GPU; llm-compressor's
``oneshot``: on the GPU, its sequential pipeline). ``--tools`` runs each tool in a process of
its own, one after the other, and prints a table (seconds per layer: the median over layers
after the first, which pays for warm-up); ``--tool`` runs one and prints one JSON line.

A tool named ``TOOL@N`` runs on N GPUs at once under ``torchrun`` (qframe: ``qframe.distributed``,
the calibration batches split across ranks; llm-compressor: its distributed ``oneshot``, each rank
given the same dataset, which it partitions); rank 0 reports:

    python bench/algorithms_speed.py --tools qframe-gptq,qframe-gptq@2,llmcompressor-gptq,llmcompressor-gptq@2 \
        --layers 4 --tokenizer TOKENIZER_DIR
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import io
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402
from transformers import AutoModelForCausalLM, LlamaConfig  # noqa: E402

RECIPES = {"qframe-awq": "recipes/awq_w4a16.toml", "qframe-gptq": "recipes/gptq_w4a16.toml",
           "qframe-smoothquant": "recipes/smoothquant_w8a8.toml", "qframe-rtn": "recipes/rtn_w4a16.toml",
           "qframe-gptq-search": "recipes/gptq_w4a16.toml", "qframe-nvfp4-gptq": "recipes/nvfp4_gptq.toml",
           "qframe-gptq-onepass": "recipes/gptq_w4a16.toml"}
# Options a tool sets on its recipe: GPTQ with its group scales searched (options.range_search);
# GPTQ observing every linear's input in one pass (true_sequential = false, as llm-compressor's
# GPTQ does), which lets ranks round different inputs at once.
EXTRA = {"qframe-gptq-search": ["stage.0.options.range_search=true"],
         "qframe-gptq-onepass": ["stage.0.options.true_sequential=false"]}
PEERS = ("modelopt-awq", "llmcompressor-gptq", "llmcompressor-awq")


def run_qframe(tool: str, model, ids, device, group: int, batch: int, offload: str) -> dict:
    import qframe

    overrides = [f"calibration.batch_size={batch}", f"calibration.offload={offload}", *EXTRA.get(tool, [])]
    if tool not in ("qframe-smoothquant", "qframe-nvfp4-gptq"):
        overrides.append(f"stage.0.weights.group_size={group}")
    recipe = qframe.load_recipe(RECIPES[tool], overrides)
    qmodel = qframe.quantize(model, recipe, calibration=ids, device=device)
    return {"seconds_per_layer": [round(layer["seconds"], 3) for layer in qmodel.layers]}


def run_modelopt(model, ids, device, group: int, batch: int) -> dict:
    import modelopt.torch.quantization as mtq

    cfg = copy.deepcopy(mtq.INT4_AWQ_CFG)
    for entry in cfg["quant_cfg"]:
        if isinstance(entry, dict) and entry.get("quantizer_name") == "*weight_quantizer":
            entry["cfg"]["block_sizes"][-1] = group
    model.to(device)

    def loop(m):
        with torch.no_grad():
            for b in ids.split(batch):
                m(input_ids=b.to(device), use_cache=False)

    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        mtq.quantize(model, cfg, loop)
    return {}


def run_llmcompressor(tool: str, model, ids, device, group: int, batch: int, tokenizer: str | None) -> dict:
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme
    from datasets import Dataset
    from llmcompressor import oneshot
    from llmcompressor.modifiers.awq import AWQModifier
    from llmcompressor.modifiers.quantization import GPTQModifier

    scheme = QuantizationScheme(targets=["Linear"], weights=QuantizationArgs(
        num_bits=4, type="int", symmetric=True, strategy="group", group_size=group))
    modifier = (GPTQModifier if tool.endswith("gptq") else AWQModifier)(config_groups={"g": scheme}, ignore=["lm_head"])
    data = Dataset.from_dict({"input_ids": ids.tolist(), "attention_mask": torch.ones_like(ids).tolist()})
    # oneshot re-reads the model's config from model.config.name_or_path, which a model built
    # from a config does not have: give it a folder holding that config.
    folder = tempfile.mkdtemp()
    model.config.save_pretrained(folder)
    model.config.name_or_path = folder
    model.to(device)
    from transformers import AutoTokenizer

    # oneshot insists on a processor beside a dataset, though these windows are token ids already
    processor = AutoTokenizer.from_pretrained(tokenizer) if tokenizer else None
    oneshot(model=model, dataset=data, recipe=[modifier], num_calibration_samples=len(ids), processor=processor,
            max_seq_length=ids.shape[1], batch_size=batch)
    return {}


def compare(tools: list[str], argv: list[str]) -> None:
    """Run each tool in a fresh process (same arguments; ``TOOL@N``: N processes under torchrun)
    and print their results side by side."""
    i = argv.index("--tools")
    rest = argv[:i] + argv[i + 2:]
    rows = []
    for tool in tools:
        name, _, ranks = tool.partition("@")
        launch = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={ranks}"] \
            if ranks else [sys.executable]
        done = subprocess.run([*launch, __file__, "--tool", name, *rest], capture_output=True, text=True)
        lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
        if done.returncode or not lines:
            print(f"{tool}: failed ({done.returncode})\n{done.stderr[-2000:]}", flush=True)
            continue
        result = json.loads(lines[-1])
        print(lines[-1], flush=True)
        rows.append(result)
    print("\n| tool | GPUs | s/layer (median after the first) | mean | peak GPU GiB (rank 0) | bound GiB | offload |")
    print("|---|---:|---:|---:|---:|---:|---|")
    for r in rows:
        per = r.get("seconds_per_layer")
        steady = statistics.median(per[1:]) if per and len(per) > 1 else None
        print(f"| {r['tool']} | {r.get('ranks', 1)} | {steady if steady is not None else '-'} | "
              f"{r['seconds_per_layer_mean']} | {r['peak_gpu_gib']} | {r['bound_gib']} | {r['offload'] or '-'} |")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    which = p.add_mutually_exclusive_group(required=True)
    which.add_argument("--tool", choices=[*RECIPES, *PEERS])
    which.add_argument("--tools", help="comma-separated tools, each run in its own process; prints a table")
    p.add_argument("--hidden", type=int, default=4096)
    p.add_argument("--intermediate", type=int, default=14336)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--heads", type=int, default=32)
    p.add_argument("--kv-heads", type=int, default=8)
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--samples", type=int, default=128)
    p.add_argument("--seq-len", type=int, default=2048)
    p.add_argument("--group", type=int, default=128)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--offload", default="auto", choices=["auto", "device", "cpu"],
                   help="qframe's calibration.offload: where calibration activations live")
    p.add_argument("--tokenizer", help="a tokenizer folder, for llm-compressor (which wants one)")
    p.add_argument("--profile", type=int, default=0, metavar="ROWS",
                   help="run qframe under torch.profiler and print its ROWS costliest operations (self CUDA time)")
    args = p.parse_args()
    if args.tools:
        compare(args.tools.split(","), sys.argv[1:])
        return

    device = torch.device("cuda")
    ranks, rank = int(os.environ.get("WORLD_SIZE", "1")), int(os.environ.get("RANK", "0"))
    if ranks > 1 and args.tool in RECIPES:
        from qframe.distributed import init_from_environment

        init_from_environment()  # NCCL, one GPU per rank
        device = torch.device("cuda", torch.cuda.current_device())
    elif ranks > 1:
        from compressed_tensors.distributed import init_dist

        init_dist()  # llm-compressor's own: NCCL, one GPU per rank
        device = torch.device("cuda", torch.cuda.current_device())
    config = LlamaConfig(hidden_size=args.hidden, intermediate_size=args.intermediate, num_hidden_layers=args.layers,
                         num_attention_heads=args.heads, num_key_value_heads=args.kv_heads, vocab_size=args.vocab,
                         max_position_embeddings=max(args.seq_len, 2048))
    torch.manual_seed(0)
    with torch.device(device):  # random weights drawn on the GPU: seconds, not a minute, on the CPU
        model = AutoModelForCausalLM.from_config(config, dtype=getattr(torch, args.dtype))
    model = model.to("cpu").eval()
    ids = torch.randint(0, args.vocab, (args.samples, args.seq_len), generator=torch.Generator().manual_seed(1))
    layer_bytes = sum(t.numel() * t.element_size() for t in model.model.layers[0].parameters())
    acts_bytes = args.samples * args.seq_len * args.hidden * torch.empty((), dtype=model.dtype).element_size()
    torch.cuda.reset_peak_memory_stats(device)
    started = time.perf_counter()
    if args.tool in RECIPES and args.profile:
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CUDA]) as prof:  # CPU activity is too slow for GPTQ's loop
            extra = run_qframe(args.tool, model, ids, device, args.group, args.batch_size, args.offload)
        print(prof.key_averages().table(sort_by="self_cuda_time_total", row_limit=args.profile), flush=True)
    elif args.tool in RECIPES:
        extra = run_qframe(args.tool, model, ids, device, args.group, args.batch_size, args.offload)
    elif args.tool == "modelopt-awq":
        extra = run_modelopt(model, ids, device, args.group, args.batch_size)
    else:
        extra = run_llmcompressor(args.tool, model, ids, device, args.group, args.batch_size, args.tokenizer)
    torch.cuda.synchronize(device)
    total = time.perf_counter() - started
    peak = torch.cuda.max_memory_allocated(device) / 2**30
    if ranks > 1:
        torch.distributed.barrier()
        total = time.perf_counter() - started  # the slowest rank's
        torch.distributed.destroy_process_group()
        if rank:
            return
    print(json.dumps({
        "tool": args.tool, "ranks": ranks, "gpu": torch.cuda.get_device_name(device), "dtype": args.dtype,
        "group": args.group,
        "shape": {"hidden": args.hidden, "intermediate": args.intermediate, "layers": args.layers},
        "calibration_tokens": args.samples * args.seq_len, "batch_size": args.batch_size,
        "offload": args.offload if args.tool in RECIPES else None, "seconds_total": round(total, 2),
        "seconds_per_layer_mean": round(total / args.layers, 2), **extra,
        "peak_gpu_gib": round(peak, 2), "layer_weights_gib": round(layer_bytes / 2**30, 2),
        "calibration_activations_gib": round(acts_bytes / 2**30, 2),
        "bound_gib": round((layer_bytes + acts_bytes) / 2**30 + 2, 2),
    }), flush=True)


if __name__ == "__main__":
    main()
