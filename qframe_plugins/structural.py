"""The structural fallback: an adapter for any causal LM no registered adapter serves, found
from the model's structure instead of its ``model_type``.

It is an ordinary plugin serving ``model_types = ("*",)``, which :func:`qframe.model.find_architecture`
tries only after every adapter naming the model's type. :meth:`Structural.for_model` finds

* the decoder layers: the longest ``nn.ModuleList`` of blocks of one class that contain linears
  (lists nested in such blocks, e.g. MoE experts, do not count);
* the pre-layer modules: every submodule beside the path down to that list (embeddings, position
  tables, rotary modules; the final norm too, which is harmless), except the output head;
* the smoothing groups, by tracing one forward of a few tokens through the first layer: linears
  that read the very same tensor form a group, and the norm or linear that returned that tensor
  is its producer. A candidate is kept only if folding a random scale into it leaves the layer's
  output unchanged; groups with no such producer (inputs made by a reshape, an activation or a
  product, e.g. v → o and Llama's up → down) are left out, so algorithms see them as plain linears.

It names no key/value projections (``kv_cache`` refuses the model with its own error) and turns
``Conv1D`` projections into ``nn.Linear`` in :meth:`Structural.prepare`, like GPT-2's adapter.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import nn

from qframe import ArchitecturePlugin, hookimpl
from qframe.errors import ModelError
from qframe.model import Architecture, SmoothingGroup
from qframe.qlinear import QuantLinear
from qframe_plugins.gpt2 import conv1d_to_linear

TRACE_TOKENS = 8


def _is_linear(module: nn.Module) -> bool:
    from transformers.pytorch_utils import Conv1D  # a linear with its weight stored [in, out]

    return isinstance(module, (nn.Linear, QuantLinear, Conv1D))


def find_layers(model: nn.Module) -> str:
    """The path of the model's decoder layers: the longest outermost ``nn.ModuleList`` of blocks
    of one class holding linears; :class:`ModelError` where there is none.

    Example::

        >>> from qframe.testing import tiny_llama_model
        >>> find_layers(tiny_llama_model())
        'model.layers'
    """
    candidates = []
    for name, module in model.named_modules():
        if not isinstance(module, nn.ModuleList) or len(module) == 0:
            continue
        if len({type(block) for block in module}) == 1 and any(_is_linear(m) for m in module[0].modules()):
            candidates.append((name, len(module)))
    outer = [(n, k) for n, k in candidates if not any(n.startswith(f"{o}.") for o, _ in candidates)]
    if not outer:
        raise ModelError(
            f"{type(model).__name__} has no decoder layers that qframe can find: the structural fallback looks "
            f"for an nn.ModuleList of blocks of one class containing linear layers (like model.layers or "
            f"transformer.h), and this model has none. Write an architecture adapter for it (see "
            f"qframe_plugins/llama.py and 'Writing a plugin' in the README)."
        )
    return max(outer, key=lambda item: item[1])[0]


def pre_layer_paths(model: nn.Module, layers_path: str) -> tuple[str, ...]:
    """Every submodule hanging off the path from ``model`` down to its layer list, except the
    list and the output head: what may run before the first layer.

    Example::

        >>> from qframe.testing import tiny_llama_model
        >>> pre_layer_paths(tiny_llama_model(), "model.layers")
        ('model.embed_tokens', 'model.norm', 'model.rotary_emb')
    """
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    parts = layers_path.split(".")
    found = []
    for depth in range(len(parts)):
        prefix = ".".join(parts[:depth])
        parent = model.get_submodule(prefix)
        for child, module in parent.named_children():
            if child != parts[depth] and module is not head:
                found.append(f"{prefix}.{child}" if prefix else child)
    return tuple(found)


class _Stop(Exception):
    pass


def _stop(*_: Any) -> None:
    raise _Stop  # the first layer has run: nothing after it is needed


def _float(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.float() if value.is_floating_point() else value
    if isinstance(value, (tuple, list)):
        return type(value)(_float(v) for v in value)
    if isinstance(value, dict):
        return {k: _float(v) for k, v in value.items()}
    return value


def _output(value: Any) -> torch.Tensor:
    return value[0] if isinstance(value, (tuple, list)) else value


class Structural(Architecture):
    """An adapter worked out from the model itself; build it with :meth:`for_model`."""

    layers_path = ""
    pre_layer_paths = ()

    def for_model(self, model: nn.Module) -> "Structural":
        """Find ``model``'s layers, pre-layer modules and (traced, verified) smoothing groups.

        Example::

            >>> from qframe.testing import tiny_llama_model
            >>> arch = Structural().for_model(tiny_llama_model())
            >>> arch.layers_path, [g.producer for g in arch.smoothing_groups]
            ('model.layers', ['input_layernorm', 'post_attention_layernorm'])
        """
        adapter = Structural()
        adapter.layers_path = find_layers(model)
        adapter.pre_layer_paths = pre_layer_paths(model, adapter.layers_path)
        adapter.smoothing_groups = adapter.trace_groups(model)
        return adapter

    def prepare(self, model: nn.Module) -> None:
        """Turn ``Conv1D`` projections in the decoder layers into ``nn.Linear`` (exactly)."""
        conv1d_to_linear(self.decoder_layers(model))

    def trace_groups(self, model: nn.Module) -> tuple[SmoothingGroup, ...]:
        """The first layer's exact smoothing groups, in call order (see the module docstring)."""
        layer = self.decoder_layers(model)[0]
        names = {id(m): n for n, m in layer.named_modules() if n}
        reads: list[tuple[str, torch.Tensor]] = []  # each linear's input, in call order
        outputs: list[tuple[str, Any]] = []  # each submodule's output, innermost first
        inputs: dict[str, Any] = {}
        hooks = [layer.register_forward_pre_hook(lambda _m, a, kw: inputs.update(args=a, kwargs=kw), with_kwargs=True),
                 layer.register_forward_hook(_stop)]
        for module in layer.modules():
            if module is layer:
                continue
            name = names[id(module)]
            hooks.append(module.register_forward_hook(lambda _m, _a, out, n=name: outputs.append((n, _output(out)))))
            if _is_linear(module):
                hooks.append(module.register_forward_pre_hook(lambda _m, a, n=name: reads.append((n, a[0]))))
        try:
            with torch.no_grad():
                model(input_ids=self._trace_ids(model), use_cache=False)
        except _Stop:
            pass
        except Exception as exc:
            raise ModelError(f"the structural fallback could not run {type(model).__name__} on {TRACE_TOKENS} tokens "
                             f"to trace its first decoder layer: {type(exc).__name__}: {exc}") from None
        finally:
            for hook in hooks:
                hook.remove()
        if not inputs:
            raise ModelError(f"{type(model).__name__}.{self.layers_path}[0] did not run in a forward pass; "
                             f"are these the decoder layers?")
        groups: list[tuple[torch.Tensor, list[str]]] = []
        for name, x in reads:
            same = next((g for g in groups if g[0] is x), None)
            if same is None:
                groups.append((x, [name]))
            elif name not in same[1]:
                same[1].append(name)
        candidates = []
        for x, consumers in groups:
            producers = [n for n, out in outputs if out is x and getattr(layer.get_submodule(n), "weight", None) is not None]
            if producers:
                candidates.append(SmoothingGroup(producers[0], tuple(consumers)))
        base = copy.deepcopy(layer).float().eval()
        conv1d_to_linear(base)
        args, kwargs = _float(inputs["args"]), _float(inputs["kwargs"])
        with torch.no_grad():
            expected = _output(base(*args, **kwargs))
        return tuple(g for g in candidates if self._exact(base, g, args, kwargs, expected))

    def _trace_ids(self, model: nn.Module) -> torch.Tensor:
        vocab = getattr(getattr(model, "config", None), "vocab_size", None)
        if not vocab and hasattr(model, "get_input_embeddings"):
            vocab = model.get_input_embeddings().num_embeddings
        device = next(model.parameters()).device
        return (torch.arange(TRACE_TOKENS, device=device) * 7 % int(vocab or 2)).unsqueeze(0)

    def _exact(self, base: nn.Module, group: SmoothingGroup, args: Any, kwargs: Any, expected: torch.Tensor) -> bool:
        """Whether folding a random positive scale into ``group`` leaves the layer's output as it was."""
        trial = copy.deepcopy(base)
        consumers = [trial.get_submodule(c) for c in group.consumers]
        if not all(isinstance(c, nn.Linear) for c in consumers):
            return False
        scale = torch.empty(consumers[0].in_features).uniform_(0.5, 2.0, generator=torch.Generator().manual_seed(0))
        try:
            self.fold_scale(trial.get_submodule(group.producer), scale)
        except ModelError:
            return False
        with torch.no_grad():
            for linear in consumers:
                linear.weight.div_(scale.to(linear.weight.device))
            got = _output(trial(*args, **kwargs))
        return float((got - expected).pow(2).sum()) <= 1e-8 * float(expected.pow(2).sum())


@hookimpl
def qframe_architectures():
    yield ArchitecturePlugin(name="structural", summary="any other model: layers and groups found by tracing",
                             factory=Structural, model_types=("*",))
