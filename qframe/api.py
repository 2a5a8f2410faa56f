"""The Python API: what the CLI does, callable on a model already in memory.

Example::

    import qframe
    result = qframe.apply("recipes/rtn_w4a16.toml", model="path/or/id", output="out")
    qmodel = qframe.quantize(model, "recipes/rtn_w4a16.toml", tokenizer=tokenizer)
    print(qframe.evaluate(qmodel, dataset="text:held_out.txt").perplexity)
    qframe.export(qmodel, backend="qframe", output="out2")
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import os
import platform
import time
import warnings
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any, Callable, Mapping

import torch
from torch import nn

from . import faults
from .checkpoint import load_native, save_native
from .data import DataContext, TokenWindows, calibration_windows, evaluation_windows
from .errors import ExportError, QFrameError, RecipeError
from .evaluate import EvalResult, perplexity
from .model import ModelSource, load_model, resolve_source
from .output import seal, writing
from .description import ModelDescription, describe_model
from .pipeline import check_plan, run_pipeline
from .plugins import Registry, default_registry
from .quantized import QuantizedModel
from .recipe import Plan, Recipe, load_recipe, make_exporter, resolve


def pick_device(device: str | torch.device | None = None) -> torch.device:
    """``None``/``"auto"``: CUDA when present, else the CPU."""
    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        chosen = torch.device(device)
    except (RuntimeError, TypeError):
        raise QFrameError(f"--device {device!r} is not a device; use cpu, cuda or cuda:N") from None
    if chosen.type not in ("cpu", "cuda"):
        raise QFrameError(f"--device {device!r}: qframe computes on cpu, cuda or cuda:N")
    if chosen.type == "cuda" and not torch.cuda.is_available():
        raise QFrameError(f"--device {device}: CUDA is not available on this machine")
    if chosen.type == "cuda" and chosen.index is not None and chosen.index >= torch.cuda.device_count():
        raise QFrameError(f"--device {device}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    return chosen


def _as_recipe(recipe: Recipe | str | os.PathLike) -> Recipe:
    return recipe if isinstance(recipe, Recipe) else load_recipe(recipe)


def _versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for name in ("qframe", "torch", "transformers", "safetensors", "pluggy"):
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    return out


def quantize(
    model: nn.Module,
    recipe: Recipe | str | os.PathLike,
    *,
    calibration: TokenWindows | torch.Tensor | None = None,
    tokenizer: Any = None,
    device: str | torch.device | None = None,
    registry: Registry | None = None,
    progress: Callable[[int, int, str], None] | None = None,
) -> QuantizedModel:
    """Quantize ``model`` in place, layer by layer, and return it as a QuantizedModel.

    ``calibration`` is token windows ``[samples, seq_len]``; when the recipe needs data and
    none is given, the recipe's ``[calibration]`` dataset is read with ``tokenizer``.
    """
    registry = registry or default_registry()
    recipe = _as_recipe(recipe)
    plan = resolve(recipe, registry)
    device = pick_device(device)
    checked = check_plan(model, plan, registry)  # a stage that would take nothing fails now, before data is made
    windows = calibration
    if plan.needs_calibration_data and windows is None:
        if tokenizer is None:
            raise QFrameError("this recipe calibrates on data: pass calibration= token windows or a tokenizer")
        c = recipe.calibration
        context = DataContext(tokenizer, model, c.seed, c.samples, c.seq_len, str(device))
        windows = calibration_windows(c.dataset, context, registry)
    ids = windows.ids if isinstance(windows, TokenWindows) else windows
    started = time.perf_counter()
    layers = run_pipeline(model, plan, registry, ids if plan.needs_calibration_data else None, device, progress,
                          checked=checked)
    manifest = {
        "recipe": recipe.to_dict(),
        "versions": _versions(),
        "seed": recipe.calibration.seed,
        "dataset": None,
        "device": str(device),
        "timings": {"quantize_s": round(time.perf_counter() - started, 3)},
        "layers": layers,
    }
    manifest["coverage"] = _coverage(model, checked.arch, plan)
    if plan.needs_calibration_data:
        manifest["dataset"] = {
            "spec": getattr(windows, "spec", "in-memory tensor"),
            "sha256": getattr(windows, "sha256", None),
            "samples": int(ids.shape[0]),
            "seq_len": int(ids.shape[1]),
        }
    return QuantizedModel(model, tokenizer, manifest, registry=registry)


def _coverage(model: nn.Module, arch: Any, plan: Plan) -> dict[str, Any]:
    """The manifest's ``coverage`` (see :mod:`qframe.coverage`); one ``UserWarning`` naming the
    decoder weights no stage took and no ignore named, when the recipe quantizes weights at all
    (a KV-cache-only recipe leaves them in float on purpose)."""
    from .coverage import measure

    found = measure(model, arch, [p for s in plan.stages for p in s.spec.scheme.ignore])
    message = found.warning()
    if message and any(s.spec.scheme.weights is not None for s in plan.stages):
        warnings.warn(message, stacklevel=3)
    return found.to_dict()


def describe(
    model: QuantizedModel | nn.Module,
    recipe: Recipe | str | os.PathLike | None = None,
    *,
    registry: Registry | None = None,
) -> ModelDescription:
    """What each linear and KV cache of ``model`` holds (a quantized model), or will hold once
    ``recipe`` quantized it (said by each stage's quantizer, before any calibration; the model
    is only prepared, as the pipeline would). Exporters read this; see :mod:`qframe.description`.

    Example::

        >>> from qframe.testing import tiny_llama_model
        >>> d = describe(tiny_llama_model(), "recipes/fp8_kv.toml")
        >>> d.linears["model.layers.0.self_attn.q_proj"].weights.name, d.caches[0].args.name
        ('e4m3', 'e4m3')
    """
    if isinstance(model, QuantizedModel):
        registry = registry or model.registry
        model = model.model
    registry = registry or default_registry()
    if recipe is None:
        return describe_model(model, registry)
    return check_plan(model, resolve(_as_recipe(recipe), registry), registry).description


def stand_in(source: ModelSource | None) -> tuple[nn.Module, bool]:
    """A weightless (meta-device) model to check a recipe against before loading anything: the
    named model's own, built from its config, or — with no model named — a Llama-shaped stand-in
    (then ``False``: its widths say nothing about the model the recipe will meet)."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    from .errors import ModelError
    from .model import from_pretrained_args, in_hub_cache, quiet_transformers, require_sane_depth

    if source is not None and source.kind == "hub" and not in_hub_cache(source.location):
        source = None  # offline, or not downloaded yet: the loader says so when it is needed
    if source is None:
        config = LlamaConfig(hidden_size=4096, intermediate_size=14336, num_hidden_layers=2, num_attention_heads=32,
                             num_key_value_heads=8, vocab_size=32000)
    else:
        if source.kind == "dir":
            require_sane_depth(Path(source.location) / "config.json")  # before anything builds its layers
        where, kwargs = from_pretrained_args(source)
        try:
            stamp = Path(source.location).stat().st_mtime_ns if source.kind != "hub" else None
            config = copy.deepcopy(_read_config(where, tuple(sorted(kwargs.items())), stamp, source.kind != "hub"))
        except Exception as exc:  # transformers raises many types for an unusable config
            raise ModelError(f"model {source.spec!r}: cannot read its config ({' '.join(str(exc).split())[:300]})") from None
    if getattr(config, "quantization_config", None) is not None:
        del config.quantization_config  # a GGUF's config says how its file is packed; the model is a float one
    try:
        with torch.device("meta"), quiet_transformers():
            model = AutoModelForCausalLM.from_config(config)
    except Exception as exc:
        raise ModelError(f"model {getattr(source, 'spec', 'stand-in')!r}: cannot build it from its config "
                         f"({' '.join(str(exc).split())[:300]})") from None
    return model, source is not None


@functools.lru_cache(maxsize=8)
def _read_config(where: str, kwargs: tuple, stamp: int | None, quiet: bool) -> Any:
    """A model's config, read once per process while its file is unchanged (a GGUF's takes
    seconds to parse: its metadata holds the whole tokenizer)."""
    from transformers import AutoConfig

    from .model import quiet_transformers

    with quiet_transformers(stderr=quiet):
        return AutoConfig.from_pretrained(where, **dict(kwargs))


def check_export(plan: Plan, model: str | ModelSource | None = None, *,
                 registry: Registry | None = None) -> ModelDescription | None:
    """Refuse, before any weights are read, what the recipe's export backend could not write:
    the recipe's stages planned on the named model's config (or on a stand-in when ``model``
    is ``None``: formats and mixes only, no shapes), checked by the exporter. What ``qframe
    validate RECIPE [--model M]`` and ``apply --dry-run`` do. Returns the planned description
    (``None`` when the backend checks nothing).

    Example::

        >>> from qframe.recipe import load_recipe
        >>> plan = resolve(load_recipe("recipes/awq_w4a16.toml"), default_registry())
        >>> check_export(plan).quantized()["model.layers.0.mlp.up_proj"].weights.group_size   # on a stand-in
        64
    """
    registry = registry or default_registry()
    exporter = make_exporter(plan.backend, plan.recipe.export.options, registry=registry)
    if not hasattr(exporter, "check"):
        return None
    source = resolve_source(model) if isinstance(model, str) and model else model or None
    skeleton, known = stand_in(source)
    description = check_plan(skeleton, plan, registry, stand_in=not known).description
    try:
        exporter.check(description)
    except ExportError as exc:
        where = f"{plan.recipe.source}: " if plan.recipe.source else ""
        raise ExportError(f"{where}export.backend {plan.backend.name!r} cannot write what this recipe makes: "
                          f"{exc}") from None
    return description


def evaluate(
    model: QuantizedModel | nn.Module,
    dataset: str | TokenWindows,
    *,
    tokenizer: Any = None,
    samples: int | None = None,
    seq_len: int = 512,
    device: str | torch.device | None = None,
    batch_size: int = 4,
    registry: Registry | None = None,
) -> EvalResult:
    """Perplexity of a (quantized) model on consecutive windows of held-out text."""
    registry = registry or default_registry()
    layers: list = []
    if isinstance(model, QuantizedModel):
        tokenizer = tokenizer or model.tokenizer
        layers = model.layers
        model = model.fake_quantized()
    if isinstance(dataset, TokenWindows):
        windows = dataset
    else:
        if tokenizer is None:
            raise QFrameError("evaluate needs a tokenizer to read a dataset spec")
        context = DataContext(tokenizer, model, samples=samples or 16, seq_len=seq_len, device=str(pick_device(device)))
        windows = evaluation_windows(dataset, context, registry, samples)
    result = perplexity(model, windows, pick_device(device), batch_size)
    return EvalResult(**{**result.__dict__, "layers": layers})


def export(
    qmodel: QuantizedModel,
    backend: str,
    output: str | os.PathLike,
    *,
    options: Mapping[str, Any] | None = None,
    registry: Registry | None = None,
) -> Path:
    """Write ``qmodel`` with a backend plugin into ``output`` (atomically), then run the
    backend's validator on what it wrote. ``options`` are the backend's ``[export]`` keys.

    Example::

        >>> qframe.export(qmodel, "tensorrt-llm", "out/trt", options={"tp_size": 2})  # doctest: +SKIP
    """
    registry = registry or qmodel.registry or default_registry()
    try:
        exporter = make_exporter(registry.get("backend", backend), options, registry=registry)
    except RecipeError as exc:
        raise exc.within("export") from None
    qmodel = dataclasses.replace(qmodel, registry=registry)  # the exporter describes it with these plugins
    protect = [qmodel.directory] if qmodel.directory is not None else []
    with writing(Path(output), protect=protect) as tmp:
        _export_checked(exporter, qmodel, tmp)
    _build(exporter, Path(output))
    return Path(output)


def _build(exporter: Any, directory: Path) -> None:
    # After the checkpoint is in place: a failed engine build never costs the checkpoint.
    build = getattr(exporter, "build", None)
    built = build(directory) if build is not None else None
    if built is not None and Path(built).is_dir():
        seal(built)  # the engine is qframe's output too: a later run may replace it


def export_subdirectory(backend: str, registry: Registry | None = None) -> str:
    """Where a backend's output goes inside a qframe output directory (``tensorrt_llm`` for
    ``tensorrt-llm``): its exporter's ``subdirectory``, else the backend's name."""
    record = (registry or default_registry()).get("backend", backend)
    return getattr(record.factory, "subdirectory", None) or record.name


def _export_checked(exporter: Any, qmodel: QuantizedModel, directory: Path) -> None:
    """Export into ``directory``, validate what was written, and seal it as qframe's."""
    exporter.export(qmodel, directory)
    validate = getattr(exporter, "validate", None)
    problems = validate(directory) if validate else []
    if problems:
        shown = "; ".join(problems[:5]) + (f"; and {len(problems) - 5} more" if len(problems) > 5 else "")
        raise ExportError(f"the checkpoint written to {directory} fails validation: {shown}")
    seal(directory)


def _reporting(progress: Callable[[int, int, str], None] | None) -> Callable[[int, int, str], None]:
    """``progress``, and the fault-test moment ``calibrate`` once the first layer is done."""

    def report(done: int, total: int, name: str) -> None:
        if progress is not None:
            progress(done, total, name)
        if done == 1:
            faults.reach("calibrate")

    return report


@dataclass
class ApplyResult:
    output: Path | None
    qmodel: QuantizedModel | None
    plan: Plan


def apply(
    recipe: str | os.PathLike,
    *,
    model: str | None = None,
    output: str | os.PathLike | None = None,
    overrides: Mapping[str, Any] | list[str] | None = None,
    device: str | None = None,
    dry_run: bool = False,
    registry: Registry | None = None,
    progress: Callable[[int, int, str], None] | None = None,
) -> ApplyResult:
    """Run a recipe end to end: load, calibrate, quantize, write ``output`` (what ``qframe apply`` does)."""
    registry = registry or default_registry()
    parsed = load_recipe(recipe, overrides)
    plan = resolve(parsed, registry)
    source = resolve_source(model or parsed.model.id or "")
    target = Path(output) if output else Path("out") / Path(recipe).stem
    chosen = pick_device(device)
    # What the backend could not write is refused from the model's config, before any weight is read.
    check_export(plan, source, registry=registry)
    if dry_run:
        return ApplyResult(None, None, plan)
    started = time.perf_counter()
    exporter = make_exporter(plan.backend, parsed.export.options, registry=registry) \
        if plan.backend.name != "qframe" else None
    reads = [source.location] if source.kind != "hub" else []
    with writing(target, protect=reads) as tmp:
        loaded = load_model(source, parsed.model.dtype, nonfinite=parsed.model.nonfinite)
        load_s = time.perf_counter() - started
        faults.reach("load")
        qmodel = quantize(loaded.model, parsed, tokenizer=loaded.tokenizer, device=chosen, registry=registry,
                          progress=_reporting(progress))
        qmodel.manifest["model"] = {"spec": source.spec, "kind": source.kind, "location": source.location}
        qmodel.manifest["timings"].update(load_s=round(load_s, 3), total_s=round(time.perf_counter() - started, 3))
        save_native(qmodel, tmp)
        if exporter is not None:
            _export_checked(exporter, qmodel, tmp / export_subdirectory(plan.backend.name, registry))
    if exporter is not None:
        _build(exporter, target / export_subdirectory(plan.backend.name, registry))
    return ApplyResult(target, qmodel, plan)


def load_quantized(directory: str | os.PathLike, *, registry: Registry | None = None) -> QuantizedModel:
    """Load a native checkpoint written by ``apply`` or ``export(backend="qframe")``, with the
    architecture adapters of ``registry`` (default: the installed plugins)."""
    return load_native(directory, registry or default_registry())
