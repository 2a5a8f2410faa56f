"""Refuse, before calibration, a recipe whose result TensorRT-LLM's checkpoint could not hold:
the model's family, each stage's formats, fused linears quantized apart, and shapes that
the group size or the tensor/pipeline split do not divide. The same rules run again on the
quantized model before anything is written (:func:`.convert.make_plan`).

Example::

    >>> from qframe.testing import tiny_llama_model
    >>> from qframe.recipe import load_recipe
    >>> from qframe_plugins.tensorrt_llm import TensorRTLLMOptions
    >>> check_recipe(tiny_llama_model(), load_recipe("recipes/fp8.toml"), TensorRTLLMOptions(tp_size=3))
    Traceback (most recent call last):
    ...
    qframe.errors.ExportError: tp_size = 3 does not divide the model's 4 attention heads; choose a tp_size that divides 4
"""

from __future__ import annotations

from typing import Any

from torch import nn

from qframe.errors import ExportError

from .convert import Plan, algorithm, check_parallel, kv_algorithm
from .layout import layout_for


def _as_quantized(module: nn.Module) -> nn.Module:
    # Before calibration GPT-2's projections are still transformers' Conv1D; the pipeline makes
    # them nn.Linear first (Architecture.prepare), so a recipe's "Linear" targets reach them.
    if type(module).__name__ == "Conv1D":
        return nn.Linear(1, 1, device="meta")
    return module


def _quantizes_weights(stage) -> bool:
    return stage.scheme.weights is not None and stage.options.get("quantize", True) is not False


def check_recipe(model: nn.Module, recipe: Any, options: Any) -> None:
    """Raise :class:`qframe.ExportError` for what a checkpoint of ``model`` quantized by
    ``recipe`` could not express with these ``options``."""
    layout = layout_for(model)
    chosen: dict[str, tuple[str | None, int | None, str]] = {}  # TensorRT-LLM linear -> (algo, group, stage)
    for index, stage in enumerate(recipe.stages):
        where = f"stage[{index}] ({stage.quantizer})"
        if stage.quantizer == "kv_cache" and stage.scheme.activations is not None:
            kv_algorithm(stage.scheme.activations, where)
            continue
        if not _quantizes_weights(stage):
            continue
        weights, acts = stage.scheme.weights, stage.scheme.activations
        algo = algorithm(weights, acts, where)
        for i in range(layout.num_layers):
            for spec in layout.linears(i):
                hit = [stage.scheme.matches(p.module, _as_quantized(model.get_submodule(p.module))) for p in spec.parts]
                if any(hit) and not all(hit):
                    names = ", ".join(p.module for p, h in zip(spec.parts, hit) if not h)
                    raise ExportError(
                        f"{where} leaves {names} out but quantizes the rest of {spec.name}, which TensorRT-LLM runs "
                        f"as one linear; target all of its parts or none (check targets and ignore)")
                if all(hit):
                    chosen[spec.name] = (algo, weights.group_size, where)
    found = {(algo, group) for algo, group, _ in chosen.values()}
    if len(found) > 1:
        described = sorted({f"{where}: {algo}" for algo, _, where in chosen.values()})
        raise ExportError(f"the recipe quantizes decoder linears with different algorithms ({'; '.join(described)}), but "
                          "a TensorRT-LLM checkpoint holds one; quantize every decoder linear alike")
    algo, group = found.pop() if found else (None, None)
    excluded = [spec.name for i in range(layout.num_layers) for spec in layout.linears(i)
                if algo is not None and spec.name not in chosen]
    # dtype does not matter to the shape checks
    check_parallel(layout, Plan(algo, group, False, None, None, excluded), options.tp_size, options.pp_size)
