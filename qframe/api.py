"""The Python API: what the CLI does, callable on a model already in memory.

Example::

    import qframe
    result = qframe.apply("recipes/rtn_w4a16.toml", model="path/or/id", output="out")
    qmodel = qframe.quantize(model, "recipes/rtn_w4a16.toml", tokenizer=tokenizer)
    print(qframe.evaluate(qmodel, dataset="text:held_out.txt").perplexity)
    qframe.export(qmodel, backend="qframe", output="out2")
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import functools
import os
import platform
import shutil
import time
import warnings
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping

import torch
from torch import nn

from . import faults
from .checkpoint import NativeParts, finish_native, load_native, save_native, write_native_part
from .data import DataContext, TokenWindows, calibration_windows, evaluation_windows, parse_spec
from .errors import ExportError, QFrameError, RecipeError
from .evaluate import EvalResult, perplexity
from .model import ModelSource, load_model, open_model, resolve_source
from .parts import SPOOL, loaded, write_in_parts
from .output import seal, writing
from .description import ModelDescription, describe_model
from .distributed import Ranks
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

    Inside an initialized ``torch.distributed`` process group (:mod:`qframe.distributed`), call
    it on every rank with the same model and windows: each rank runs its share of the batches,
    and every rank returns the same quantized model.
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
    ranks = Ranks.current()
    with ranks.stopping_together() if ranks is not None else contextlib.nullcontext():
        layers = run_pipeline(model, plan, registry, ids if plan.needs_calibration_data else None, device, progress,
                              checked=checked)
    manifest = _manifest(recipe, plan, device, windows if plan.needs_calibration_data else None, layers,
                         time.perf_counter() - started)
    manifest["coverage"] = _coverage(model, checked.arch, plan)
    return QuantizedModel(model, tokenizer, manifest, registry=registry)


def _manifest(recipe: Recipe, plan: Plan, device: torch.device, windows: TokenWindows | torch.Tensor | None,
              layers: list[dict[str, Any]], seconds: float) -> dict[str, Any]:
    """The manifest of a quantization run, before the checkpoint adds what it holds."""
    manifest: dict[str, Any] = {
        "recipe": recipe.to_dict(),
        "versions": _versions(),
        "seed": recipe.calibration.seed,
        "dataset": None,
        "device": str(device),
        "timings": {"quantize_s": round(seconds, 3)},
        "layers": layers,
    }
    if windows is not None:
        ids = windows.ids if isinstance(windows, TokenWindows) else windows
        manifest["dataset"] = {
            "spec": getattr(windows, "spec", "in-memory tensor"),
            "sha256": getattr(windows, "sha256", None),
            "samples": int(ids.shape[0]),
            "seq_len": int(ids.shape[1]),
        }
    return manifest


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
    model: QuantizedModel | nn.Module | LazyModel,  # qframe.lazy.LazyModel: annotations are never evaluated here
    dataset: str | TokenWindows,
    *,
    tokenizer: Any = None,
    samples: int | None = None,
    seq_len: int = 512,
    device: str | torch.device | None = None,
    batch_size: int = 4,
    registry: Registry | None = None,
    layerwise: bool | None = None,
) -> EvalResult:
    """Perplexity of a (quantized) model on consecutive windows of held-out text.

    ``layerwise=True`` evaluates one decoder layer at a time on the device
    (:func:`qframe.evaluate.perplexity_layerwise`: the same numbers, for models larger than the
    device); ``None`` chooses it on CUDA when the model's weights would take more than half
    the device's free memory, never on the CPU. A :class:`qframe.lazy.LazyModel` is always
    evaluated layer-wise, each layer read from its checkpoint in turn, and then needs a dataset
    other than ``generated`` (text the whole model writes) or ready :class:`TokenWindows`.

    Example::

        >>> qframe.evaluate(qmodel, "text:held_out.txt", seq_len=512, layerwise=True).perplexity  # doctest: +SKIP
        17.03
    """
    from .evaluate import perplexity_layerwise, should_evaluate_layerwise
    from .lazy import LazyModel
    from .model import find_architecture

    registry = registry or default_registry()
    layers: list = []
    # A model read a layer at a time: a LazyModel, or a native checkpoint's NativeParts.
    lazy = model if isinstance(model, LazyModel) or hasattr(model, "load_part") else None
    if lazy is not None and hasattr(lazy, "qmodel"):
        tokenizer = tokenizer or lazy.qmodel.tokenizer
        layers = lazy.qmodel.layers
    if isinstance(model, QuantizedModel):
        tokenizer = tokenizer or model.tokenizer
        layers = model.layers
        model = model.fake_quantized()
    if lazy is not None:
        if layerwise is False:
            raise QFrameError("a LazyModel is on the meta device until its layers are read: it is evaluated "
                              "layer-wise only (layerwise=True or None)")
        if not isinstance(dataset, TokenWindows) and dataset.partition("?")[0].partition(":")[0] == "generated":
            raise QFrameError("dataset 'generated' is text the whole model writes, which a LazyModel cannot; "
                              "evaluate it on a text dataset (text:FILE) or on TokenWindows")
        model = lazy.model
        if isinstance(lazy, LazyModel):
            inside = lazy.layers_path + "."
            if any(t.is_meta for name, t in [*model.named_parameters(), *model.named_buffers()]
                   if not name.startswith(inside)):
                lazy.load_rest()  # what lies outside the decoder layers stays loaded; the layers come one at a time
        else:
            lazy.load_part("first")
            lazy.load_part("last")
    chosen = pick_device(device)
    if isinstance(dataset, TokenWindows):
        windows = dataset
    else:
        if tokenizer is None:
            raise QFrameError("evaluate needs a tokenizer to read a dataset spec")
        context = DataContext(tokenizer, model, samples=samples or 16, seq_len=seq_len, device=str(chosen))
        windows = evaluation_windows(dataset, context, registry, samples)
    if layerwise is None:
        layerwise = lazy is not None or should_evaluate_layerwise(model, chosen)
    if layerwise:
        loaders = dict(load_layer=lazy.load_layer, free_layer=lazy.free_layer) if lazy is not None else {}
        result = perplexity_layerwise(model, find_architecture(model, registry), windows, chosen, batch_size, **loaders)
    else:
        result = perplexity(model, windows, chosen, batch_size)
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


def export_directory(
    directory: str | os.PathLike,
    backend: str,
    output: str | os.PathLike,
    *,
    options: Mapping[str, Any] | None = None,
    registry: Registry | None = None,
) -> Path:
    """Re-export the native checkpoint in ``directory`` with a backend plugin into ``output``
    (what ``qframe export DIR`` does): read a part at a time where the backend streams
    (:class:`~qframe.checkpoint.NativeParts`), so the model is never whole in memory.

    Example::

        >>> qframe.api.export_directory("out/w4a16", "hf", "out/w4a16/hf")  # doctest: +SKIP
    """
    from .checkpoint import read_manifest

    registry = registry or default_registry()
    read_manifest(directory)  # a damaged or foreign directory is refused before anything is written
    try:
        exporter = make_exporter(registry.get("backend", backend), options, registry=registry)
    except RecipeError as exc:
        raise exc.within("export") from None
    if not hasattr(exporter, "begin"):
        return export(load_native(directory, registry), backend, output, options=options, registry=registry)
    with writing(Path(output), protect=[directory]) as tmp:
        _export_checked(exporter, None, tmp, native=Path(directory), registry=registry)
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


def _export_checked(exporter: Any, qmodel: QuantizedModel | None, directory: Path, *, native: Path | None = None,
                    registry: Registry | None = None) -> None:
    """Export ``qmodel`` (or the native checkpoint in ``native``, read a part at a time where the
    backend streams) into ``directory``, validate what was written, and seal it as qframe's."""
    if native is not None:
        if hasattr(exporter, "begin"):
            from .checkpoint import NativeParts

            parts = NativeParts(native, registry or default_registry(), dequantize=False)
            write_in_parts(exporter, parts.qmodel.describe(), directory, loader=parts, tokenizer=parts.qmodel.tokenizer)
        else:  # a backend that writes from a model in memory
            exporter.export(load_native(native, registry or default_registry()), directory)
    else:
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
    resume: bool = False,
) -> ApplyResult:
    """Run a recipe end to end: load, calibrate, quantize, write ``output`` (what ``qframe apply`` does).

    A local model is streamed (:mod:`qframe.run`): read a decoder layer at a time, each layer
    written as it is finished, so memory holds one layer whatever the depth. A run that dies
    leaves its finished layers in the hidden partial directory; ``resume=True`` continues
    from there (refused, naming it, when the recipe, model, data or device differ).

    Example::

        >>> qframe.apply("recipes/rtn_w4a16.toml", model="models/llama", output="out/llama")  # doctest: +SKIP
    """
    from .run import RECORD, Fingerprint, LayerWriter, model_hash, read_record, recipe_hash

    registry = registry or default_registry()
    parsed = load_recipe(recipe, overrides)
    plan = resolve(parsed, registry)
    source = resolve_source(model or parsed.model.id or "")
    target = Path(output) if output else Path("out") / Path(recipe).stem
    chosen = pick_device(device)
    ranks = Ranks.current()
    if ranks is not None and chosen.type == "cuda":  # each rank on its own device (torchrun's LOCAL_RANK)
        chosen = torch.device("cuda", torch.cuda.current_device())
    writes = ranks is None or ranks.writer
    # What the backend could not write is refused from the model's config, before any weight is read.
    check_export(plan, source, registry=registry)
    if dry_run:
        return ApplyResult(None, None, plan)
    started = time.perf_counter()
    exporter = make_exporter(plan.backend, parsed.export.options, registry=registry) \
        if plan.backend.name != "qframe" else None
    reads = [source.location] if source.kind != "hub" else []
    with _writing_across(ranks, target, protect=reads, record=RECORD, resume=resume) as tmp:
        opened = open_model(source, parsed.model.dtype, nonfinite=parsed.model.nonfinite, registry=registry)
        model_in, loader = opened.model, opened.loader
        load_s = time.perf_counter() - started
        faults.reach("load")
        checked = check_plan(model_in, plan, registry)
        windows = _calibration_windows(parsed, plan, opened, chosen, registry)
        qmodel = QuantizedModel(model_in, opened.tokenizer, {}, registry=registry)
        where = str(chosen) if ranks is None else f"{chosen.type} x {ranks.size} ranks"
        fingerprint = Fingerprint(recipe_hash(parsed.to_dict()), model_hash(source),
                                  windows.sha256 if windows is not None else None, where)
        writer = LayerWriter(tmp, qmodel, checked.arch, fingerprint, ranks)
        record = read_record(tmp)
        resumed = writer.resume(record, next(model_in.parameters()).dtype) if record else None
        if record is None or not record["native"]:
            quantize_started = time.perf_counter()
            layers = run_pipeline(model_in, plan, registry, windows.ids if windows is not None else None, chosen,
                                  _reporting(progress), checked=checked, loader=loader, sink=writer, resumed=resumed)
            qmodel.manifest = _manifest(parsed, plan, chosen, windows, layers, time.perf_counter() - quantize_started)
            qmodel.manifest["coverage"] = _coverage(model_in, checked.arch, plan)
            qmodel.manifest["model"] = {"spec": source.spec, "kind": source.kind, "location": source.location}
            qmodel.manifest["timings"].update(load_s=round(load_s, 3), total_s=round(time.perf_counter() - started, 3))
            if ranks is not None:
                qmodel.manifest["ranks"] = ranks.size
            writer.discard_inputs()
            if ranks is not None:
                ranks.barrier()  # every rank's inputs are gone before rank 0 assembles and seals the output
            if writes:
                for part in ("first", "last"):  # after the layers: a tied head needs nothing from them
                    with loaded(loader, part):
                        write_native_part(qmodel, writer.spool, part, checked.arch)
                finish_native(qmodel, tmp, writer.spool)
                writer.state["native"] = True
                writer.save()
        if exporter is not None and writes:
            sub = tmp / export_subdirectory(plan.backend.name, registry)
            shutil.rmtree(sub, ignore_errors=True)  # what a killed run began to export: written by qframe, here
            _export_checked(exporter, None, sub, native=tmp, registry=registry)
        if writes:
            qmodel = load_native(tmp, registry) if loader is None else NativeParts(tmp, registry).qmodel
            shutil.rmtree(tmp / SPOOL, ignore_errors=True)
    if exporter is not None and writes:
        _build(exporter, target / export_subdirectory(plan.backend.name, registry))
    if not writes:  # the output is in place (rank 0 said so): every rank ends with the same model
        qmodel = load_native(target, registry) if loader is None else NativeParts(target, registry).qmodel
    if ranks is not None:
        ranks.barrier()  # rank 0 is done, engines built included
    qmodel.directory = target
    return ApplyResult(target, qmodel, plan)


@contextlib.contextmanager
def _writing_across(ranks: Ranks | None, target: Path, **options: Any) -> Iterator[Path]:
    """:func:`qframe.output.writing` on rank 0, its partial directory shared with every rank (each
    spools its own calibration inputs there); on leaving, every rank waits until rank 0 has put
    the output in place. An error on any rank stops every rank (:meth:`Ranks.stopping_together`);
    one that rank 0 meets before the directory exists (a bad ``--output``) is raised on all."""
    if ranks is None:
        with writing(target, **options) as tmp:
            yield tmp
        return
    with ranks.stopping_together():
        if not ranks.writer:
            where, message = ranks.broadcast_object(None)
            if message is not None:
                raise QFrameError(message)
            yield Path(where)
            ranks.broadcast_object(None)  # rank 0's word that the output is in place
            return
        announced = False
        try:
            with writing(target, **options) as tmp:
                ranks.broadcast_object((str(tmp), None))
                announced = True
                yield tmp
        except QFrameError as exc:
            if not announced:
                ranks.broadcast_object((None, str(exc)))
            raise
        ranks.broadcast_object("done")


def _calibration_windows(recipe: Recipe, plan: Plan, opened: Any, device: torch.device,
                         registry: Registry) -> TokenWindows | None:
    """The recipe's calibration windows (None when it needs none). A dataset that runs the model
    (``generated``) gets it whole for that while: a streamed model is loaded, then freed."""
    if not plan.needs_calibration_data:
        return None
    c = recipe.calibration
    needs_model = getattr(registry.get("dataset", parse_spec(c.dataset, registry).source), "needs_model", False)
    whole = needs_model and opened.loader is not None
    if whole:
        opened.loader.load_all()
    try:
        context = DataContext(opened.tokenizer, opened.model, c.seed, c.samples, c.seq_len, str(device))
        return calibration_windows(c.dataset, context, registry)
    finally:
        if whole:
            opened.loader.free_all()


def load_quantized(directory: str | os.PathLike, *, registry: Registry | None = None) -> QuantizedModel:
    """Load a native checkpoint written by ``apply`` or ``export(backend="qframe")``, with the
    architecture adapters of ``registry`` (default: the installed plugins)."""
    return load_native(directory, registry or default_registry())
