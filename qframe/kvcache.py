"""The quantized KV cache: keys and values exactly as the attention caches them.

A serving engine (TensorRT-LLM, vLLM) caches the keys *after* rotary embeddings (and after
``k_norm`` on Qwen3 and Gemma 3), and the values as the value projection made them, each
``[batch, kv_heads, seq, head_dim]`` before grouped-query heads are repeated. Those are the
tensors every attention module of transformers (4.56 and later; 5.x) hands its attention
function — ``eager_attention_forward`` or the ``ALL_ATTENTION_FUNCTIONS`` entry that
``config._attn_implementation`` names (sdpa, flash, flex, a registered one) — as
``(module, query, key, value, attention_mask, ...)``. qframe quantizes them there.

How: the first time a cache is attached to an attention class, the two names its ``forward``
reads them through (in the globals of the module that defines it) are wrapped, once per
process: ``eager_attention_forward`` by a function that calls it, ``ALL_ATTENTION_FUNCTIONS``
by a view of the same mapping whose functions are wrapped alike. A wrapped function looks at
the attention module it is called for: without a ``kv_cache_quant`` submodule (any other
model, or layers a recipe left alone) it calls the original unchanged; with one, it
fake-quantizes the keys and values with :class:`KVCacheQuant` and calls the original with them.
Whatever implementation the model was loaded with keeps running; nothing is replaced.

State (what export and the native checkpoint read): each quantized attention holds the
submodule ``kv_cache_quant`` (:class:`KVCacheQuant`), with ``args`` (the cache format: FP8
E4M3/E5M2 or symmetric INT8, one static scale per tensor), ``shared`` (K and V share one
scale from their joint range, as TensorRT-LLM's one ``kv_cache_scaling_factor`` per layer) and
two float32 scalar buffers ``k_scale`` and ``v_scale``, the effective scales
(``amax / 448`` for E4M3; :func:`qframe.numerics.qparams`).

Example::

    >>> import torch, qframe
    >>> from qframe.testing import tiny_llama_model
    >>> model = tiny_llama_model()
    >>> attention = model.model.layers[0].self_attn
    >>> keys, values = (qframe.calibrators.get("minmax")(FP8) for _ in "kv")
    >>> with observing(attention, keys, values) as seen:
    ...     _ = model(input_ids=torch.tensor([[1, 2, 3]]))
    >>> cache = attach(attention, KVCacheQuant(FP8))
    >>> cache.set_ranges(keys.compute(), values.compute())
    >>> seen.calls, list(cache_quantizers(model)), cache.k_scale.dtype
    (1, ['model.layers.0.self_attn'], torch.float32)
"""

from __future__ import annotations

import contextlib
import inspect
import weakref
from collections.abc import MutableMapping
from typing import Any, Callable, Iterator

import torch
from torch import nn

from . import formats, numerics
from .errors import ModelError, QFrameError, RecipeError
from .scheme import QuantArgs

ATTRIBUTE = "kv_cache_quant"  # the submodule's name on the attention module
FP8 = QuantArgs(type="float", bits=8, format="e4m3", granularity="tensor")
INT8 = QuantArgs(bits=8, granularity="tensor")

_MARK = "__qframe_kv_cache__"  # on wrapped functions, and in a patched module's globals
_SCALES = ("k_scale", "v_scale")


def check_args(args: QuantArgs) -> None:
    """Refuse (:class:`RecipeError`, keyed by the field) a cache format no serving engine stores:
    the cache is FP8 (``e4m3``, ``e5m2``) or symmetric INT8, one static scale per tensor.

    Example::

        >>> check_args(QuantArgs(bits=8, granularity="tensor", symmetric=False))
        Traceback (most recent call last):
        ...
        qframe.errors.RecipeError: symmetric: False is not valid; a KV cache scale has no zero point (TensorRT-LLM and vLLM store none); allowed: true
    """
    fmt = formats.of(args)
    if isinstance(fmt, formats.FloatFormat) and fmt not in (formats.E4M3, formats.E5M2):
        raise RecipeError("format", args.name, "a KV cache is stored in int8 or fp8; allowed: e4m3, e5m2")
    if isinstance(fmt, formats.IntFormat) and fmt.bits != 8:
        raise RecipeError("bits", args.bits, "a KV cache is stored in int8 or fp8; allowed for int: 8")
    if not args.symmetric:
        raise RecipeError("symmetric", args.symmetric, "a KV cache scale has no zero point (TensorRT-LLM and vLLM "
                          "store none); allowed: true")
    if args.dynamic or args.granularity != "tensor":
        raise RecipeError("granularity", args.granularity,
                          "a KV cache takes one static scale per tensor; allowed: tensor, with dynamic = false")


class KVCacheQuant(nn.Module):
    """The quantized KV cache of one attention module: its format ``args``, whether K and V
    share one scale (``shared``), and the effective scales ``k_scale`` and ``v_scale`` (float32
    scalars; equal when shared). Called with ``(key, value)`` it returns both fake-quantized
    (quantized and dequantized in their own dtype). Casting the model (``.half()``) leaves the
    scales in float32.

    Example::

        >>> cache = KVCacheQuant(FP8)
        >>> cache.set_ranges((torch.tensor(-2.0), torch.tensor(4.48)), (torch.tensor(-1.0), torch.tensor(0.5)))
        >>> round(cache.k_scale.item(), 6), round(cache.v_scale.item() * 448, 6)
        (0.01, 1.0)
        >>> k, v = cache(torch.tensor([0.0105]), torch.tensor([0.3]))
        >>> round(k.item(), 6)
        0.01
    """

    def __init__(self, args: QuantArgs, shared: bool = False):
        super().__init__()
        try:
            check_args(args)
        except RecipeError as exc:
            raise ValueError(f"not a KV cache format: {exc}") from None
        if not isinstance(shared, bool):
            raise ValueError(f"shared must be true or false, not {shared!r}")
        self.args, self.shared = args, shared
        self.register_buffer("k_scale", torch.ones((), dtype=torch.float32))
        self.register_buffer("v_scale", torch.ones((), dtype=torch.float32))

    def set_ranges(self, keys: tuple[torch.Tensor, torch.Tensor], values: tuple[torch.Tensor, torch.Tensor]) -> None:
        """Set the scales from calibrated ``(lo, hi)`` ranges of the keys and of the values (when
        ``shared``, both from their joint range). NaN and inf count as 0; a range of zeros gets
        the smallest scale, never 0."""
        if self.shared:
            lo = torch.minimum(keys[0].float(), values[0].to(keys[0].device).float())
            hi = torch.maximum(keys[1].float(), values[1].to(keys[1].device).float())
            keys = values = (lo, hi)
        for name, (lo, hi) in zip(_SCALES, (keys, values)):
            scale, _zero = numerics.qparams(lo.float().reshape(()), hi.float().reshape(()), self.args)
            getattr(self, name).copy_(scale.reshape(()))

    def forward(self, key: torch.Tensor, value: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return (numerics.fake_quantize(key, self.k_scale, None, self.args),
                numerics.fake_quantize(value, self.v_scale, None, self.args))

    def _apply(self, fn, recurse=True):
        kept = {name: self._buffers[name] for name in _SCALES}
        super()._apply(fn, recurse)
        for name, old in kept.items():
            new = self._buffers[name]
            if new.dtype != torch.float32:  # moved, but never rounded: the scales are exact as they are
                self._buffers[name] = old.to(new.device)
        return self

    def extra_repr(self) -> str:
        return f"format={self.args.name}, shared={self.shared}"


def cache_quantizers(model: nn.Module) -> dict[str, KVCacheQuant]:
    """Every quantized KV cache of ``model``, keyed by the attention module's full name, in
    layer (module) order.

    Example::

        >>> from qframe.testing import tiny_llama_model
        >>> model = tiny_llama_model()
        >>> _ = attach(model.model.layers[1].self_attn, KVCacheQuant(INT8))
        >>> list(cache_quantizers(model))
        ['model.layers.1.self_attn']
    """
    found = {}
    for name, module in model.named_modules():
        child = module._modules.get(ATTRIBUTE)
        if isinstance(child, KVCacheQuant):
            found[name] = child
    return found


def attach(attention: nn.Module, cache: KVCacheQuant) -> KVCacheQuant:
    """Make ``attention`` compute with ``cache`` (as its ``kv_cache_quant`` submodule, on its
    device), replacing any it had; return it. :class:`ModelError` for an attention module whose
    keys and values qframe cannot reach (:func:`unreachable`).

    Example::

        >>> from qframe.testing import tiny_llama_model
        >>> attention = tiny_llama_model().model.layers[0].self_attn
        >>> attach(attention, KVCacheQuant(FP8)) is attention.kv_cache_quant
        True
    """
    _install(attention)
    anchor = next(attention.parameters(), None)
    if anchor is not None:
        cache = cache.to(anchor.device)
    setattr(attention, ATTRIBUTE, cache)
    return cache


def unreachable(attention: nn.Module) -> str | None:
    """Why qframe cannot reach the keys and values ``attention`` caches, or None when it can:
    its ``forward`` must call transformers' attention interface (``ALL_ATTENTION_FUNCTIONS`` or
    ``eager_attention_forward``), as every attention of transformers 4.56+ that qframe's
    adapters know does.

    Example::

        >>> from qframe.testing import tiny_llama_model
        >>> unreachable(tiny_llama_model().model.layers[0].self_attn) is None, unreachable(nn.Linear(2, 2))[:29]
        (True, 'Linear.forward calls no trans')
    """
    forward = inspect.unwrap(type(attention).forward)
    names = getattr(getattr(forward, "__code__", None), "co_names", ())
    kind = type(attention).__name__
    if "ALL_ATTENTION_FUNCTIONS" not in names and "eager_attention_forward" not in names:
        return (f"{kind}.forward calls no transformers attention function (ALL_ATTENTION_FUNCTIONS, "
                "eager_attention_forward), so qframe cannot reach the keys and values it caches: is it the "
                "attention module (the architecture adapter's attention_path)?")
    config = getattr(attention, "config", None)
    if getattr(attention, "reorder_and_upcast_attn", False) and getattr(config, "_attn_implementation", None) == "eager":
        return (f"{kind} with reorder_and_upcast_attn computes eager attention itself, past the attention "
                "function; load the model with attn_implementation=\"sdpa\" or reorder_and_upcast_attn=False")
    return None


def _install(attention: nn.Module) -> None:
    """Wrap, once per process, the attention functions ``attention``'s class reads (see the
    module docstring); :class:`ModelError` when it reads none."""
    why = unreachable(attention)
    if why is not None:
        raise ModelError(why)
    scope = inspect.unwrap(type(attention).forward).__globals__
    if scope.get(_MARK):
        return
    functions = scope.get("ALL_ATTENTION_FUNCTIONS")
    if functions is not None and not isinstance(functions, _CachedFunctions):
        scope["ALL_ATTENTION_FUNCTIONS"] = _CachedFunctions(functions)
    eager = scope.get("eager_attention_forward")
    if callable(eager):
        scope["eager_attention_forward"] = _cached(eager)
    scope[_MARK] = True


class _Observer:
    """Feeds the keys and values of one attention module to two calibrators (the same one for
    a joint range) and counts the calls."""

    def __init__(self, keys: Any, values: Any):
        self.keys, self.values, self.calls = keys, values, 0

    def __call__(self, key: torch.Tensor, value: torch.Tensor) -> None:
        self.keys.observe(key)
        self.values.observe(value)
        self.calls += 1


_OBSERVERS: "weakref.WeakKeyDictionary[nn.Module, _Observer]" = weakref.WeakKeyDictionary()


@contextlib.contextmanager
def observing(attention: nn.Module, keys: Any, values: Any) -> Iterator[_Observer]:
    """While inside, every call of ``attention`` feeds the keys and values it caches (post-RoPE,
    ``[batch, kv_heads, seq, head_dim]``) to the calibrators ``keys`` and ``values`` (anything
    with ``observe(tensor)``; pass one calibrator twice for a joint range), before any cache
    quantization. The calibrators keep their own (device-side, bounded) state: nothing is
    copied per batch. Yields the observer, whose ``calls`` counts the attention calls seen.

    Example::

        >>> from qframe.testing import tiny_llama_model
        >>> model = tiny_llama_model()
        >>> import qframe
        >>> keys, values = (qframe.calibrators.get("minmax")(FP8) for _ in "kv")
        >>> with observing(model.model.layers[0].self_attn, keys, values) as seen:
        ...     _ = model(input_ids=torch.tensor([[5, 6]]))
        >>> seen.calls, keys.compute()[1].item() > 0
        (1, True)
    """
    _install(attention)
    observer = _Observer(keys, values)
    _OBSERVERS[attention] = observer
    try:
        yield observer
    finally:
        _OBSERVERS.pop(attention, None)


# -- the wrapped attention functions ----------------------------------------------------------

def _cached(function: Callable) -> Callable:
    """``function`` (an attention function) made to observe and fake-quantize the keys and
    values of attention modules that hold a ``kv_cache_quant``; unchanged for all others."""
    if function is None or getattr(function, _MARK, False):
        return function

    def attention(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                  *args: Any, **kwargs: Any) -> Any:
        if _OBSERVERS:
            observer = _OBSERVERS.get(module)
            if observer is not None:
                observer(key, value)
        cache = module._modules.get(ATTRIBUTE) if isinstance(module, nn.Module) else None
        if cache is not None:
            key, value = cache(key, value)
        return function(module, query, key, value, *args, **kwargs)

    setattr(attention, _MARK, True)
    attention.__wrapped__ = function
    attention.__name__ = getattr(function, "__name__", "attention")
    attention.__doc__ = getattr(function, "__doc__", None)
    return attention


class _CachedFunctions(MutableMapping):
    """A modeling module's ``ALL_ATTENTION_FUNCTIONS`` whose every function comes out wrapped
    (:func:`_cached`); everything else (registering, listing) goes to the original."""

    def __init__(self, functions: Any):
        self._functions = functions

    def get_interface(self, attn_implementation: str, default: Callable) -> Callable:
        return _cached(self._functions.get_interface(attn_implementation, default))

    def __getitem__(self, key: str) -> Callable:
        return _cached(self._functions[key])

    def __setitem__(self, key: str, value: Callable) -> None:
        self._functions[key] = value

    def __delitem__(self, key: str) -> None:
        del self._functions[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._functions)

    def __len__(self) -> int:
        return len(self._functions)

    def __contains__(self, key: object) -> bool:
        return key in self._functions

    def __getattr__(self, name: str) -> Any:
        return getattr(self.__dict__["_functions"], name)


def require_observed(name: str, observer: _Observer) -> None:
    """:class:`QFrameError` when the attention ``name`` ran no attention function while observed."""
    if observer.calls == 0:
        raise QFrameError(f"{name} computed no attention through transformers' attention functions on the "
                          "calibration data, so its KV cache cannot be calibrated")
