"""Run by ``tests/test_distributed.py`` under ``torchrun`` (or alone, for the single-process
reference): quantize tiny models with each case's recipe through ``qframe.quantize`` and save
every rank's quantized tensors and per-layer report in ``OUT/<case>/rank<r>``.

    python -m torch.distributed.run --standalone --nproc-per-node 2 tests/ranks_worker.py OUT CASE...
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file

import qframe
from qframe.recipe import parse_recipe
from qframe.testing import moe_from_dense, random_tokens, tiny_llama_model

W4G16 = {"bits": 4, "group_size": 16}
FP8 = {"type": "float", "bits": 8}
NVFP4 = {"type": "float", "bits": 4, "format": "nvfp4", "group_size": 16}
CASES = {
    "rtn": ([{"quantizer": "rtn", "weights": W4G16}], "dense"),
    "fp8": ([{"quantizer": "fp8", "weights": FP8, "activations": FP8}], "dense"),
    "gptq": ([{"quantizer": "gptq", "weights": W4G16, "options": {"act_order": True, "range_search": True}}], "dense"),
    "gptq-dynamic": ([{"quantizer": "gptq", "weights": W4G16, "options": {"true_sequential": False}}], "dense"),
    "nvfp4-gptq": ([{"quantizer": "gptq", "weights": NVFP4, "activations": {**NVFP4, "calibrator": "minmax"},
                     "options": {"act_order": True, "range_search": True}}], "dense"),
    "smoothquant": ([{"quantizer": "smoothquant", "weights": {"bits": 8}, "activations": {"bits": 8},
                      "options": {"alpha_grid": [0.3, 0.5, 0.8]}}], "dense"),
    "awq": ([{"quantizer": "awq", "weights": W4G16}], "dense"),
    "percentile": ([{"quantizer": "rtn", "weights": {"bits": 8}, "activations": {"bits": 8, "calibrator": "percentile"}},
                    {"quantizer": "kv_cache", "activations": {**FP8, "calibrator": "mse"}}], "dense"),
    "moe-gptq": ([{"quantizer": "gptq", "weights": W4G16, "options": {"experts": "routed", "expert_min_tokens": 1}}],
                 "moe"),
    "moe-awq": ([{"quantizer": "awq", "weights": W4G16, "options": {"expert_tokens": 24}}], "moe"),
}


def model_for(kind: str):
    dense = tiny_llama_model(seed=0)
    return dense if kind == "dense" else moe_from_dense(dense, "qwen2_moe", num_experts=4, top_k=2)


def windows(model) -> torch.Tensor:
    """Ten windows in five batches of two: rank 0 takes three batches, rank 1 two."""
    return random_tokens(10, 16, model.config.vocab_size, seed=1)


def run(case: str, out: Path, rank: int) -> None:
    stages, kind = CASES[case]
    model = model_for(kind)
    recipe = parse_recipe({"stage": stages, "calibration": {"batch_size": 2}})
    quantized = qframe.quantize(model, recipe, calibration=windows(model), device="cpu")
    where = out / case / f"rank{rank}"
    where.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().clone().contiguous() for k, v in quantized.model.state_dict().items()}
    save_file(state, str(where / "model.safetensors"))
    (where / "layers.json").write_text(json.dumps(quantized.manifest["layers"], default=str))


def main() -> None:
    out, cases = Path(sys.argv[1]), sys.argv[2:]
    rank = 0
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        torch.distributed.init_process_group("gloo")
        rank = torch.distributed.get_rank()
    try:
        for case in cases:
            run(case, out, rank)
    finally:
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
