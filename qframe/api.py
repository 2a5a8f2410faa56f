"""The Python API: what the CLI does, callable on a model already in memory.

Example::

    import qframe
    result = qframe.apply("recipes/rtn_w4a16.toml", model="path/or/id", output="out")
    qmodel = qframe.quantize(model, "recipes/rtn_w4a16.toml", tokenizer=tokenizer)
    print(qframe.evaluate(qmodel, dataset="text:held_out.txt").perplexity)
    qframe.export(qmodel, backend="qframe", output="out2")
"""

from __future__ import annotations

import os
import platform
import time
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
from .model import load_model, resolve_source
from .output import seal, writing
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
    if plan.needs_calibration_data:
        manifest["dataset"] = {
            "spec": getattr(windows, "spec", "in-memory tensor"),
            "sha256": getattr(windows, "sha256", None),
            "samples": int(ids.shape[0]),
            "seq_len": int(ids.shape[1]),
        }
    return QuantizedModel(model, tokenizer, manifest)


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
    registry = registry or default_registry()
    try:
        exporter = make_exporter(registry.get("backend", backend), options)
    except RecipeError as exc:
        raise exc.within("export") from None
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
    if dry_run:
        return ApplyResult(None, None, plan)
    started = time.perf_counter()
    exporter = make_exporter(plan.backend, parsed.export.options) if plan.backend.name != "qframe" else None
    reads = [source.location] if source.kind != "hub" else []
    with writing(target, protect=reads) as tmp:
        loaded = load_model(source, parsed.model.dtype, nonfinite=parsed.model.nonfinite)
        load_s = time.perf_counter() - started
        faults.reach("load")
        if hasattr(exporter, "check"):  # refuse what the format cannot express before calibrating
            exporter.check(loaded.model, parsed)
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


def load_quantized(directory: str | os.PathLike) -> QuantizedModel:
    """Load a native checkpoint written by ``apply`` or ``export(backend="qframe")``."""
    return load_native(directory)
