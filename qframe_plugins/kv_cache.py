"""``kv_cache``: quantize what the attention caches — keys after RoPE (and after ``k_norm``
where the model has one), values as cached — to FP8 (E4M3, E5M2) or INT8, with one static
scale per tensor, calibrated by any calibrator plugin (:mod:`qframe.kvcache` says how the
tensors are reached: at transformers' attention interface, for every implementation).

K and V get a scale each by default, as modelopt and vLLM keep them; ``options = { shared =
true }`` gives both one scale from their joint range, as TensorRT-LLM stores one
``kv_cache_scaling_factor`` per layer (then its checkpoint serves exactly the cache qframe
evaluated). Evaluation runs with the keys and values quantize-dequantized, so perplexity shows
the cache's cost. It composes with any weight quantizer, in a stage before or after it: it
leaves every linear as it is.

Targets: the stage quantizes the cache of each decoder layer whose attention module (the
adapter's ``attention_path``: ``self_attn``, GPT-NeoX's ``attention``, GPT-2's ``attn``) holds a
linear its targets select. The default (every linear) takes every layer; ``ignore =
["model.layers.0.*"]`` leaves layer 0's cache in float; targets that reach no attention
(``["*.mlp.*"]``) are refused before calibration.

Recipe::

    [[stage]]
    quantizer = "kv_cache"
    activations = { type = "float", bits = 8, calibrator = "minmax" }   # or { bits = 8 } for INT8
    options = { shared = false }
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from qframe import QuantizerPlugin, hookimpl
from qframe.errors import QFrameError, RecipeError
from qframe.kvcache import KVCacheQuant, attach, check_args
from qframe.pipeline import LayerWork, Quantizer
from qframe.qlinear import QuantLinear


@dataclass(frozen=True)
class KVCacheOptions:
    """``shared``: one scale for keys and values, from their joint range (TensorRT-LLM's one
    ``kv_cache_scaling_factor`` per layer); by default a scale each (modelopt, vLLM)."""

    shared: bool = False


def check(stage) -> None:
    """Refuse, before any model loads, what a KV cache stage cannot make."""
    acts = stage.scheme.activations
    if stage.scheme.weights is not None:
        raise RecipeError("weights", stage.scheme.weights.to_dict(),
                          "kv_cache quantizes the cache, not weights; quantize weights in another stage")
    if acts is None:
        raise RecipeError("activations", None,
                          'kv_cache needs the cache format, e.g. activations = { type = "float", bits = 8 }')
    try:
        check_args(acts)
    except RecipeError as exc:
        raise exc.within("activations") from None


class KVCache(Quantizer):
    """Calibrates each taken attention's keys and values and attaches a
    :class:`~qframe.kvcache.KVCacheQuant` to it."""

    @classmethod
    def needs_calibration(cls, stage) -> bool:
        return True

    def accepts(self, module: nn.Module) -> bool:
        """Any linear, float or quantized: the stage only reads which attention it belongs to."""
        return isinstance(module, (nn.Linear, QuantLinear))

    def replaces_targets(self) -> bool:
        return False  # the linears stay as they are, for any stage before or after

    def takes(self, work: LayerWork, targets):
        """The targets inside the layer's attention module: the stage quantizes that
        attention's cache when there is any."""
        name, _attention = work.attention()
        return [(n, m) for n, m in targets if n.startswith(name + ".")]

    def produces(self, work: LayerWork, taken):
        """The layer's KV cache, in the stage's format (nothing when the stage takes no linear
        of the attention)."""
        from qframe.description import CacheState

        if not taken:
            return []
        name, _attention = work.attention()
        return [CacheState(layer=work.index, attention=name, args=self.scheme.activations, shared=self.options.shared)]

    def quantize_layer(self, work: LayerWork, targets) -> None:
        if not self.takes(work, targets):
            return
        name, attention = work.attention()
        if isinstance(attention._modules.get("kv_cache_quant"), KVCacheQuant):
            raise QFrameError(f"{name}: an earlier kv_cache stage quantizes this KV cache already; keep one kv_cache "
                              "stage, or give the stages targets in different layers")
        args = self.scheme.activations
        keys = self.calibrator(args)
        values = keys if self.options.shared else self.calibrator(args)
        work.observe_cache(keys, values)
        cache = KVCacheQuant(args, shared=self.options.shared)
        k_range = keys.compute()
        cache.set_ranges(k_range, k_range if values is keys else values.compute())
        attach(attention, cache)
        k_scale, v_scale = (float(s) for s in (cache.k_scale, cache.v_scale))
        work.record(name, k_scale=k_scale, v_scale=v_scale)


@hookimpl
def qframe_quantizers():
    yield QuantizerPlugin(name="kv_cache", summary="INT8 or FP8 KV cache: static per-tensor scales on post-RoPE keys "
                          "and values", factory=KVCache, options=KVCacheOptions, check=check)
