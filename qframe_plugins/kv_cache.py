"""``kv_cache``: quantize what the attention caches — the key and value projections' outputs —
to INT8 or FP8 with one static scale per tensor, calibrated by any calibrator plugin.

The keys and values of a layer share one scale (from their joint range), as TensorRT-LLM
stores one ``kv_cache_scaling_factor`` per layer. Evaluation runs with the cache values quantize-dequantized, so perplexity shows its cost. It
composes with any weight quantizer: put it in a stage after (or before) the weights' stage.

Recipe::

    [[stage]]
    quantizer = "kv_cache"
    activations = { type = "float", bits = 8, calibrator = "minmax" }   # or { bits = 8 } for INT8
"""

from __future__ import annotations

import torch
from torch import nn

from qframe import QuantizerPlugin, hookimpl
from qframe.errors import QFrameError, RecipeError
from qframe.pipeline import LayerWork, Quantizer
from qframe.qlinear import QuantLinear


def check(stage) -> None:
    acts = stage.scheme.activations
    if stage.scheme.weights is not None:
        raise RecipeError("weights", stage.scheme.weights.to_dict(),
                          "kv_cache quantizes the cache, not weights; quantize weights in another stage")
    if acts is None:
        raise RecipeError("activations", None, "kv_cache needs the cache format, e.g. activations = { type = \"float\", bits = 8 }")
    fmt = acts.format if acts.type == "float" else f"int{acts.bits}"
    if fmt not in ("int8", "e4m3", "e5m2"):
        raise RecipeError("activations", acts.to_dict(), "kv_cache stores int8 or fp8 (e4m3, e5m2)")
    if acts.dynamic or acts.granularity != "tensor":
        raise RecipeError("activations.granularity", acts.granularity,
                          "a KV cache takes one static scale per tensor; allowed: tensor, dynamic = false")


class KVCache(Quantizer):
    @classmethod
    def needs_calibration(cls, stage) -> bool:
        return True

    def accepts(self, module: nn.Module) -> bool:
        return isinstance(module, (nn.Linear, QuantLinear))

    def takes(self, work: LayerWork, targets):
        """Only the key and value projections of ``targets`` (the adapter's ``kv_projections``)."""
        wanted = {f"{work.prefix}.{name}" for name in work.arch.kv_projections}
        if not wanted:
            raise QFrameError(f"{work.prefix}: the architecture adapter names no key/value projections")
        return [(name, module) for name, module in targets if name in wanted]

    def quantize_layer(self, work: LayerWork, targets) -> None:
        chosen = self.takes(work, targets)
        args = self.scheme.activations
        observed = work.observe_outputs([name for name, _ in chosen], lambda _name: self.calibrator(args))
        # One range for the layer's keys and values: TensorRT-LLM keeps one cache scale per
        # layer, so the quantized model computes with the cache it will be served with.
        ranges = [observed[name].compute() for name, _ in chosen]
        joint = (torch.stack([lo for lo, _ in ranges]).amin(0), torch.stack([hi for _, hi in ranges]).amax(0))
        for name, module in chosen:
            if isinstance(module, nn.Linear):
                module = QuantLinear.from_linear(module, None)
                work.replace(name, module)
            module.quantize_output(args, joint)
            work.record(name, kv_scale=float(module.output_scale))


@hookimpl
def qframe_quantizers():
    yield QuantizerPlugin(name="kv_cache", summary="INT8 or FP8 KV cache, static per-tensor scales on k/v outputs",
                          factory=KVCache, check=check)
