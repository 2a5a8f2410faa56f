"""Refuse, before calibration, a recipe whose result TensorRT-LLM's checkpoint could not hold:
the model's family, each stage's formats, fused linears quantized apart, and shapes that
the group size or the tensor/pipeline split do not divide. The same rules run again on the
quantized model before anything is written (:func:`.convert.make_plan`).

:func:`check_stages` decides what the recipe alone can (``qframe validate``): each stage's
formats and different algorithms across stages, probed on module names of the families
TensorRT-LLM serves; :func:`check_recipe` runs it, then the model's own checks.

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

from typing import Any, Iterable

from torch import nn

from qframe.errors import ExportError
from qframe.scheme import PROBE_LINEAR, first_claims, probe_names

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


# Algorithm and group size of a stage, and the stage as messages name it.
Format = tuple[str | None, int | None, str]
# The families of PROBE_FAMILIES whose checkpoints TensorRT-LLM reads (Llama, Mistral, Qwen2; GPT-2).
FAMILIES = ("llama", "gpt2")


def stage_formats(recipe: Any) -> dict[int, Format]:
    """Each weight-quantizing stage's TensorRT-LLM algorithm, by stage index, refusing (with
    an :class:`~qframe.ExportError` naming the stage) formats TensorRT-LLM lacks, a kv_cache
    stage's included.

    Example::

        >>> from qframe.recipe import parse_recipe
        >>> stage_formats(parse_recipe({"stage": [{"quantizer": "rtn", "weights": {"bits": 4, "group_size": 128}}]}))
        {0: ('W4A16_AWQ', 128, 'stage[0] (rtn)')}
    """
    formats = {}
    for index, stage in enumerate(recipe.stages):
        where = f"stage[{index}] ({stage.quantizer})"
        if stage.quantizer == "kv_cache" and stage.scheme.activations is not None:
            kv_algorithm(stage.scheme.activations, where)
        elif _quantizes_weights(stage):
            weights = stage.scheme.weights
            formats[index] = (algorithm(weights, stage.scheme.activations, where), weights.group_size, where)
    return formats


def _refuse_mixed(chosen: Iterable[Format]) -> None:
    chosen = list(chosen)
    if len({(algo, group) for algo, group, _ in chosen}) > 1:
        described = sorted({f"{where}: {algo}{f' group {group}' if group else ''}" for algo, group, where in chosen})
        raise ExportError(f"the recipe quantizes decoder linears with different algorithms ({'; '.join(described)}), but "
                          "a TensorRT-LLM checkpoint holds one; quantize every decoder linear alike")


def check_stages(recipe: Any) -> None:
    """What the recipe alone decides: :func:`stage_formats`, and one algorithm for the decoder
    linears, each taken by the first weight stage whose targets select it (a later stage
    leaves quantized linears alone), on the module names of each family TensorRT-LLM serves.

    Example::

        >>> from qframe.recipe import parse_recipe
        >>> check_stages(parse_recipe({"stage": [{"quantizer": "rtn", "weights": {"bits": 4, "group_size": 48}}]}))
        Traceback (most recent call last):
        ...
        qframe.errors.ExportError: stage[0] (rtn): weights int4 group 48, activations none: TensorRT-LLM's W4A16_AWQ takes group size 64 or 128; set weights.group_size = 64 or 128
    """
    formats = stage_formats(recipe)
    for family in FAMILIES:
        probes = [(name, PROBE_LINEAR) for name in probe_names(family)]
        _refuse_mixed(formats[i] for i in first_claims(_schemes(recipe, formats), probes).values())


def _schemes(recipe: Any, formats: dict[int, Format]) -> dict[int, Any]:
    return {i: recipe.stages[i].scheme for i in formats}


def check_recipe(model: nn.Module, recipe: Any, options: Any) -> None:
    """Raise :class:`qframe.ExportError` for what a checkpoint of ``model`` quantized by
    ``recipe`` could not express with these ``options``."""
    layout = layout_for(model)
    formats = stage_formats(recipe)
    for index in formats:
        stage, where = recipe.stages[index], formats[index][2]
        for i in range(layout.num_layers):
            for spec in layout.linears(i):
                hit = [stage.scheme.matches(p.module, _as_quantized(model.get_submodule(p.module))) for p in spec.parts]
                if any(hit) and not all(hit):
                    names = ", ".join(p.module for p, h in zip(spec.parts, hit) if not h)
                    raise ExportError(
                        f"{where} leaves {names} out but quantizes the rest of {spec.name}, which TensorRT-LLM runs "
                        f"as one linear; target all of its parts or none (check targets and ignore)")
    # a TensorRT-LLM linear is taken by the first stage that selects its (first) part
    linears = {spec.name: spec.parts[0].module for i in range(layout.num_layers) for spec in layout.linears(i)}
    modules = [(part, _as_quantized(model.get_submodule(part))) for part in linears.values()]
    claims = first_claims(_schemes(recipe, formats), modules)
    chosen = {name: formats[claims[part]] for name, part in linears.items() if part in claims}
    _refuse_mixed(chosen.values())
    algo, group = next(((a, g) for a, g, _ in chosen.values()), (None, None))
    excluded = [name for name in linears if algo is not None and name not in chosen]
    # dtype does not matter to the shape checks
    check_parallel(layout, Plan(algo, group, False, None, None, excluded), options.tp_size, options.pp_size)
