"""The native checkpoint: safetensors with packed codes and their scales, the model's config
and tokenizer, and ``qframe.json``. Loaded back bit-exactly; any backend can re-export it
without recalibration.

Every format's codes are saved as ``<module>.weight_packed`` (uint8): int2/int4 and FP4 (E2M1)
two or four codes a byte, low bits first; int3/5-8 one a byte (offset to unsigned when
symmetric); FP8 the float8 bytes. Scales keep their own dtypes: float32, or for NVFP4
``weight_scale`` in float8_e4m3fn beside a float32 ``weight_global_scale``, for MXFP4 uint8 E8M0
exponents. The manifest records each module's ``QuantArgs`` (``weights``, ``activations``) and
each quantized KV cache (``kv_cache``: the attention module's name -> ``args``, ``shared``), whose
scales are the tensors ``<attention>.kv_cache_quant.k_scale`` and ``.v_scale`` (float32).

Quantized fused experts (:class:`~qframe.experts.QuantExperts`) save each 3-D weight's codes
``[E, out, in]`` packed along ``in`` as ``<module>.<weight>_packed`` (e.g.
``model.layers.0.mlp.experts.gate_up_proj_packed``) beside ``<weight>_scale [E, out, groups]``
(``_zero``, NVFP4's ``_global_scale [E]``); the manifest's ``experts`` table records, per
module, ``num_experts``, ``weights`` (QuantArgs) and each weight's ``out``, ``in`` and
``layout`` (``out_in`` or ``in_out``), which :func:`load_native` checks against the model's
own experts before it rebuilds them.

Files::

    DIR/qframe.json          manifest (recipe, versions, dataset hash, per-layer errors, modules)
    DIR/model.safetensors    quantized state: <module>.weight_packed (uint8), .weight_scale, ...
    DIR/config.json          the Hugging Face config
    DIR/tokenizer*.json      the tokenizer

Example::

    >>> save_native(qmodel, "out")            # doctest: +SKIP
    >>> qmodel = load_native("out", registry)  # doctest: +SKIP
"""

from __future__ import annotations

import contextlib
import json
import math
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from . import faults
from .errors import ModelError, QFrameError
from .experts import LAYOUTS, QuantExperts, expert_layouts, is_fused_experts, quantized_experts
from .model import find_architecture, listed, nonfinite_names
from .kvcache import KVCacheQuant, attach, cache_quantizers
from .kvcache import check_args as check_cache_args
from .qlinear import QuantLinear
from .output import strict_dumps
from .parts import SPOOL, Part, model_parts, part_label, part_of, tied_names, to_meta
from .spool import Spool, read_header
from .quantized import QuantizedModel
from .scheme import QuantArgs

FORMAT = "qframe.native"
FORMAT_VERSION = 1
MANIFEST = "qframe.json"
WEIGHTS = "model.safetensors"
STREAM = "native"  # the spool stream model.safetensors is assembled from


def _module_entry(module: QuantLinear) -> dict[str, Any]:
    return {
        "in_features": module.in_features,
        "out_features": module.out_features,
        "bias": module.bias is not None,
        "weights": module.weight_args.to_dict() if module.weight_args else None,
        "activations": module.input_args.to_dict() if module.input_args else None,
        "input_prescale": module.has_prescale,
    }


def _experts_entry(module: QuantExperts) -> dict[str, Any]:
    return {
        "num_experts": next(iter(module.expert_weights_of().values()))[0],
        "weights": module.weight_args.to_dict(),
        "activations": module.input_args.to_dict() if module.input_args else None,
        "matrices": {n: {"out": out, "in": inp, "layout": module.expert_layouts[n]}
                     for n, (_, out, inp) in module.expert_weights_of().items()},
    }


def native_tensors(model: torch.nn.Module, arch: Any, part: Part) -> dict[str, torch.Tensor]:
    """The tensors of ``part`` of a (quantized) model to save, codes packed; tied aliases left
    out (:func:`qframe.parts.tied_names`). Only ``part`` needs to be loaded.

    Example::

        >>> from qframe.testing import make_registry, tiny_llama_model
        >>> model = tiny_llama_model()
        >>> sorted(native_tensors(model, find_architecture(model, make_registry()), "last"))
        ['lm_head.weight', 'model.norm.weight']
    """
    tied = tied_names(model)
    if isinstance(part, int):
        prefix = f"{arch.layers_path}.{part}"
        root = model.get_submodule(prefix)
        modules = {f"{prefix}.{n}" if n else prefix: m for n, m in root.named_modules()}
        state = root.state_dict(prefix=prefix + ".", keep_vars=True)
    else:
        modules = dict(model.named_modules())
        state = {n: t for n, t in model.state_dict(keep_vars=True).items() if part_of(n, arch) == part}
    tensors: dict[str, torch.Tensor] = {}
    for name, tensor in state.items():
        if name in tied:
            continue
        owner, _, leaf = name.rpartition(".")
        module = modules.get(owner)
        if leaf == "weight_codes" and isinstance(module, QuantLinear):
            tensors[f"{owner}.weight_packed"] = module.weight_args.number_format.pack(tensor.detach())
            continue
        if (leaf.endswith("_codes") and isinstance(module, QuantExperts)
                and leaf[:-len("_codes")] in module.expert_layouts):
            tensors[f"{owner}.{leaf[:-len('_codes')]}_packed"] = module.weight_args.number_format.pack(tensor.detach())
            continue
        tensors[name] = tensor.detach()  # moved to the CPU one at a time as the spool writes it
    return tensors


def _arch(qmodel: QuantizedModel) -> Any:
    from .plugins import default_registry

    return find_architecture(qmodel.model, qmodel.registry or default_registry())


def write_native_part(qmodel: QuantizedModel, spool: Spool, part: Part, arch: Any = None) -> None:
    """Spool ``part`` of the native checkpoint (see :func:`finish_native`)."""
    spool.put(STREAM, part_label(part), native_tensors(qmodel.model, arch or _arch(qmodel), part))


def save_native(qmodel: QuantizedModel, directory: str | Path) -> Path:
    """Write the checkpoint and manifest into ``directory`` (created if missing), a part at a
    time (:mod:`qframe.parts`): what a model streamed layer by layer writes, byte for byte."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    spool = Spool(directory / SPOOL)
    arch = _arch(qmodel)
    for part in model_parts(len(arch.decoder_layers(qmodel.model))):
        write_native_part(qmodel, spool, part, arch)
    return finish_native(qmodel, directory, spool)


def manifest_entries(model: torch.nn.Module, prefix: str = "") -> dict[str, dict[str, Any]]:
    """The manifest's ``modules``, ``experts`` and ``kv_cache`` tables for the quantized modules
    of ``model`` whose names start with ``prefix``, read off their structure (meta is fine)."""
    def mine(items: dict) -> dict:
        return {n: m for n, m in items.items() if n.startswith(prefix)}

    return {
        "modules": {n: _module_entry(m) for n, m in mine({n: m for n, m in model.named_modules()
                                                          if isinstance(m, QuantLinear)}).items()},
        "experts": {n: _experts_entry(m) for n, m in mine(quantized_experts(model)).items()},
        "kv_cache": {n: {"args": c.args.to_dict(), "shared": c.shared} for n, c in mine(cache_quantizers(model)).items()},
    }


def finish_native(qmodel: QuantizedModel, directory: Path, spool: Spool) -> Path:
    """Assemble ``model.safetensors`` from the spooled parts, write the config, tokenizer and
    manifest, and remove the spool."""
    directory = Path(directory)
    spool.assemble(STREAM, directory / WEIGHTS, {"format": FORMAT})
    spool.discard(STREAM)
    with contextlib.suppress(OSError):
        spool.directory.rmdir()
    faults.reach("write")
    qmodel.model.config.save_pretrained(directory)
    generation = getattr(qmodel.model, "generation_config", None)
    if generation is not None:  # what the model was loaded with, for exports that carry it
        generation.save_pretrained(directory)
    if qmodel.tokenizer is not None:
        qmodel.tokenizer.save_pretrained(directory)
    manifest = dict(qmodel.manifest)
    manifest.update(
        format=FORMAT,
        format_version=FORMAT_VERSION,
        dtype=str(next(qmodel.model.parameters()).dtype).removeprefix("torch."),
        tied=tied_names(qmodel.model),
        **manifest_entries(qmodel.model),
    )
    (directory / MANIFEST).write_text(strict_dumps(manifest, f"the manifest of {directory}", indent=2, default=str) + "\n")
    qmodel.manifest = manifest
    return directory


def read_manifest(directory: str | Path) -> dict[str, Any]:
    """The manifest of a native checkpoint, checked for shape: strict JSON (no NaN), the
    native format, and every key :func:`load_native` reads with the type it needs."""
    path = Path(directory) / MANIFEST
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"), parse_constant=_not_json)
    except FileNotFoundError:
        raise ModelError(f"{directory} is not a qframe output directory (no {MANIFEST})") from None
    except (OSError, UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise ModelError(f"{path}: unreadable manifest ({_short(exc)})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT \
            or manifest.get("format_version") != FORMAT_VERSION:
        raise ModelError(f"{path}: not a {FORMAT} v{FORMAT_VERSION} manifest")
    _module_args(manifest, path)
    _cache_args(manifest, path)
    _experts_args(manifest, path)
    return manifest


def _not_json(constant: str) -> Any:
    raise ValueError(f"{constant} is not JSON")


def _short(exc: BaseException, limit: int = 200) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text if len(text) <= limit else text[:limit] + "..."


def _module_args(manifest: dict[str, Any], path: Path) -> dict[str, dict[str, QuantArgs | None]]:
    """Check the manifest's keys and types; each quantized module's QuantArgs by role."""
    def bad(key: str, why: str) -> ModelError:
        return ModelError(f"{path}: {key}: {why}; the manifest is damaged (write the output again with qframe apply)")

    if manifest.get("dtype") not in ("float32", "float16", "bfloat16"):
        raise bad("dtype", "expected float32, float16 or bfloat16")
    tied = manifest.setdefault("tied", {})
    if not isinstance(tied, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in tied.items()):
        raise bad("tied", "expected a table of tensor names")
    source = manifest.get("model", {})
    if not isinstance(source, dict) or not all(isinstance(v, str) for v in source.values()):
        raise bad("model", "expected a table of strings (spec, kind, location)")
    modules = manifest.get("modules")
    if not isinstance(modules, dict):
        raise bad("modules", "expected a table of quantized modules")
    parsed: dict[str, dict[str, QuantArgs | None]] = {}
    for name, entry in modules.items():
        key = f"modules[{name!r}]"
        if not isinstance(entry, dict):
            raise bad(key, "expected a table")
        for field in ("in_features", "out_features"):
            value = entry.get(field)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise bad(f"{key}.{field}", "expected a positive integer")
        if not isinstance(entry.get("bias"), bool) or not isinstance(entry.get("input_prescale", False), bool):
            raise bad(f"{key}.bias", "expected bias and input_prescale to be true or false")
        if entry.get("outputs") is not None:
            raise ModelError(f"{path}: {key}.outputs: this checkpoint was written by an earlier qframe, whose KV "
                             "cache quantized the key and value projections' outputs (keys before RoPE), not the "
                             "keys and values the attention caches; quantize the model again (qframe apply) to get "
                             "a KV cache on the cached tensors")
        parsed[name] = {}
        for role in ("weights", "activations"):
            args = entry.get(role)
            if args is not None and not isinstance(args, dict):
                raise bad(f"{key}.{role}", "expected a table of QuantArgs")
            try:
                parsed[name][role] = QuantArgs(**args) if args else None
            except (QFrameError, TypeError, ValueError) as exc:
                raise bad(f"{key}.{role}", _short(exc)) from None
    return parsed


def _cache_args(manifest: dict[str, Any], path: Path) -> dict[str, tuple[QuantArgs, bool]]:
    """Check the manifest's ``kv_cache`` table (absent: no quantized cache); each attention's
    cache format and whether K and V share one scale."""
    def bad(key: str, why: str) -> ModelError:
        return ModelError(f"{path}: {key}: {why}; the manifest is damaged (write the output again with qframe apply)")

    caches = manifest.setdefault("kv_cache", {})
    if not isinstance(caches, dict):
        raise bad("kv_cache", "expected a table of attention modules")
    parsed = {}
    for name, entry in caches.items():
        key = f"kv_cache[{name!r}]"
        if not isinstance(entry, dict) or not isinstance(entry.get("args"), dict):
            raise bad(key, "expected a table with the cache's args (a table of QuantArgs) and shared")
        if not isinstance(entry.get("shared"), bool):
            raise bad(f"{key}.shared", "expected true or false")
        try:
            args = QuantArgs(**entry["args"])
            check_cache_args(args)
        except (QFrameError, TypeError, ValueError) as exc:
            raise bad(f"{key}.args", _short(exc)) from None
        parsed[name] = (args, entry["shared"])
    return parsed


def _experts_args(manifest: dict[str, Any], path: Path) -> dict[str, tuple[QuantArgs, QuantArgs | None]]:
    """Check the manifest's ``experts`` table (absent: no quantized experts); each module's
    weight and input QuantArgs."""
    def bad(key: str, why: str) -> ModelError:
        return ModelError(f"{path}: {key}: {why}; the manifest is damaged (write the output again with qframe apply)")

    def positive(value: Any) -> bool:
        return isinstance(value, int) and not isinstance(value, bool) and value >= 1

    table = manifest.setdefault("experts", {})
    if not isinstance(table, dict):
        raise bad("experts", "expected a table of fused-experts modules")
    parsed = {}
    for name, entry in table.items():
        key = f"experts[{name!r}]"
        if not isinstance(entry, dict) or not isinstance(entry.get("weights"), dict) \
                or not isinstance(entry.get("matrices"), dict) or not entry["matrices"]:
            raise bad(key, "expected a table with num_experts, weights (a table of QuantArgs) and matrices")
        if not positive(entry.get("num_experts")):
            raise bad(f"{key}.num_experts", "expected a positive integer")
        for weight, matrix in entry["matrices"].items():
            if not isinstance(matrix, dict) or not positive(matrix.get("out")) or not positive(matrix.get("in")) \
                    or matrix.get("layout") not in LAYOUTS:
                raise bad(f"{key}.matrices[{weight!r}]", f"expected out and in (positive integers) and a layout "
                          f"({' or '.join(LAYOUTS)})")
        activations = entry.get("activations")
        if activations is not None and not isinstance(activations, dict):
            raise bad(f"{key}.activations", "expected a table of QuantArgs, or none")
        parsed[name] = []
        for role, table in (("weights", entry["weights"]), ("activations", activations)):
            try:
                parsed[name].append(None if table is None else QuantArgs(**table))
            except (QFrameError, TypeError, ValueError) as exc:
                raise bad(f"{key}.{role}", _short(exc)) from None
        parsed[name] = tuple(parsed[name])
    return parsed


def is_native(directory: str | Path) -> bool:
    """Whether ``directory`` claims to be a native checkpoint (:func:`read_manifest` checks it)."""
    return (Path(directory) / MANIFEST).is_file()


def load_native(directory: str | Path, registry: Any) -> QuantizedModel:
    """Rebuild the quantized model exactly as it was saved. Anything damaged — the manifest,
    the config, the tensors, a size that disagrees with another — is a :class:`ModelError`
    naming it; nothing is allocated for sizes the checkpoint does not hold. ``registry`` holds
    the architecture adapter that prepares the model (as the pipeline did) and travels with it."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    directory = Path(directory)
    manifest = read_manifest(directory)
    module_args = _module_args(manifest, directory / MANIFEST)
    weights_file = directory / WEIGHTS
    try:
        tensors = load_file(str(weights_file))
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise ModelError(f"{weights_file}: not a readable safetensors file ({_short(exc)})") from None
    dtype = getattr(torch, manifest["dtype"])
    try:
        config = AutoConfig.from_pretrained(directory)
        with torch.device("meta"):  # sizes first, so a damaged config cannot allocate a huge model
            skeleton = AutoModelForCausalLM.from_config(config, dtype=dtype)
    except Exception as exc:  # transformers raises many types for a bad config
        raise ModelError(f"{directory / 'config.json'}: not a usable model config ({_short(exc)})") from None
    wanted = sum(p.numel() for p in skeleton.parameters())
    # Packed codes hold at most four weights a byte; anything larger is not this checkpoint's model.
    held = sum(t.numel() * (4 if n.endswith("_packed") else 1) for n, t in tensors.items())
    if wanted > held + sum(skeleton.get_parameter(k).numel() for k in manifest["tied"] if _has_parameter(skeleton, k)):
        raise ModelError(f"{directory / 'config.json'} describes a model of {wanted} parameters, but {weights_file} "
                         f"holds at most {held}; the output is damaged (write it again with qframe apply)")
    del skeleton
    try:
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
        # The saved state is that of the prepared model (e.g. GPT-2's Conv1D turned into nn.Linear).
        find_architecture(model, registry).prepare(model)
    except ModelError:
        raise
    except Exception as exc:
        raise ModelError(f"{directory / 'config.json'}: cannot build the model ({_short(exc)})") from None
    for name, entry in manifest["modules"].items():
        _install(model, name, entry, module_args[name], tensors, dtype, weights_file)
    for name, args in _experts_args(manifest, directory / MANIFEST).items():
        _install_experts(model, name, manifest["experts"][name], args, tensors, weights_file)
    for name, (args, shared) in _cache_args(manifest, directory / MANIFEST).items():
        _install_cache(model, name, args, shared, weights_file)
    _check_dtypes(model, tensors, weights_file)
    try:
        result = model.load_state_dict(tensors, strict=False)
    except RuntimeError as exc:  # a tensor whose shape disagrees with the config
        raise ModelError(f"{weights_file} does not match {directory / 'config.json'}: {_short(exc, 300)}") from None
    missing = set(result.missing_keys) - set(manifest["tied"])
    if missing or result.unexpected_keys:
        raise ModelError(
            f"{weights_file} does not match its manifest: "
            f"missing {sorted(missing)[:5]}, unexpected {sorted(result.unexpected_keys)[:5]}"
        )
    model.tie_weights()
    untied = [alias for alias, kept in manifest["tied"].items()
              if _has_parameter(model, alias) and _has_parameter(model, kept)
              and model.get_parameter(alias).data_ptr() != model.get_parameter(kept).data_ptr()]
    if untied:  # saved once as one tensor, but the config no longer ties them: the alias would be random
        raise ModelError(f"{directory / 'config.json'} does not tie {', '.join(untied[:3])} to what the checkpoint "
                         "saved it as (is tie_word_embeddings missing?); the output is damaged")
    for module in model.modules():
        if isinstance(module, (QuantLinear, QuantExperts)):
            module.refresh()
    # The dequantized weights (buffers, never saved) cover FP8 codes and scales, which are read through them.
    bad = nonfinite_names([*model.named_parameters(), *model.named_buffers()])
    if bad:
        raise ModelError(f"{weights_file}: {len(bad)} tensor(s) hold NaN or infinity ({listed(bad)}); "
                         "the output is damaged (write it again with qframe apply)")
    unscaled = [f"{name}.kv_cache_quant" for name, cache in cache_quantizers(model).items()
                 if not bool((torch.stack([cache.k_scale, cache.v_scale]) > 0).all())]
    if unscaled:
        raise ModelError(f"{weights_file}: the KV cache scales of {listed(unscaled)} are not positive; "
                         "the output is damaged (write it again with qframe apply)")
    model.eval()
    model.config.use_cache = False
    _load_generation_config(model, directory)
    has_tokenizer = (directory / "tokenizer_config.json").is_file()
    try:
        tokenizer = AutoTokenizer.from_pretrained(directory) if has_tokenizer else None
    except Exception as exc:
        raise ModelError(f"{directory}: cannot load its tokenizer ({_short(exc)})") from None
    return QuantizedModel(model, tokenizer, manifest, directory=directory, registry=registry)


def _check_dtypes(model: torch.nn.Module, tensors: dict[str, torch.Tensor], weights_file: Path) -> None:
    """Each tensor has the dtype it was saved with, that of its place in the model
    (``load_state_dict`` would cast an int32 scale into a float one silently)."""
    expected = model.state_dict()
    wrong = [f"{name} ({str(t.dtype).removeprefix('torch.')}, expected {str(expected[name].dtype).removeprefix('torch.')})"
             for name, t in tensors.items()
             if name in expected and t.dtype != expected[name].dtype]
    if wrong:
        raise ModelError(f"{weights_file}: {len(wrong)} tensor(s) of another dtype than saved: {', '.join(wrong[:3])}; "
                         "the output is damaged")


def _has_parameter(model: torch.nn.Module, name: str) -> bool:
    try:
        model.get_parameter(name)
        return True
    except AttributeError:
        return False


def _install(model: torch.nn.Module, name: str, entry: dict[str, Any], args: dict[str, QuantArgs | None],
             tensors: dict[str, torch.Tensor], dtype: torch.dtype, weights_file: Path) -> None:
    """Put the QuantLinear a manifest entry describes where the model has a linear of that shape,
    its codes unpacked into ``tensors``."""
    try:
        linear = model.get_submodule(name)
    except AttributeError:
        linear = None
    shape = (entry["in_features"], entry["out_features"])
    if not isinstance(linear, torch.nn.Linear) or (linear.in_features, linear.out_features) != shape:
        raise ModelError(f"{weights_file.parent / MANIFEST}: modules[{name!r}] is a {shape[0]}x{shape[1]} linear, "
                         "but the model's config has no such linear there; the output is damaged")
    weights, acts = args["weights"], args["activations"]
    try:
        module = QuantLinear(shape[0], shape[1], entry["bias"], weights, acts, dtype,
                             prescale=entry.get("input_prescale", False))
    except ValueError as exc:  # QuantArgs that are valid alone but not in that role
        raise ModelError(f"{weights_file.parent / MANIFEST}: modules[{name!r}]: {_short(exc)}") from None
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent), child, module)
    if tensors is None:  # the structure only (a model on meta, loaded a part at a time)
        return
    packed = tensors.pop(f"{name}.weight_packed", None)
    if weights is None:
        return
    if packed is None:
        raise ModelError(f"{weights_file}: missing {name}.weight_packed")
    if packed.dtype != torch.uint8:
        raise ModelError(f"{weights_file}: {name}.weight_packed is {str(packed.dtype).removeprefix('torch.')}, "
                         "expected uint8 packed codes; the output is damaged")
    try:
        codes = weights.number_format.unpack(packed, shape[0])
    except (ValueError, RuntimeError, IndexError) as exc:
        raise ModelError(f"{weights_file}: {name}.weight_packed cannot be unpacked as {weights.name} "
                         f"[{shape[1]}, {shape[0]}] ({_short(exc)})") from None
    if tuple(codes.shape) != (shape[1], shape[0]):
        raise ModelError(f"{weights_file}: {name}.weight_packed holds {list(codes.shape)} codes, expected "
                         f"[{shape[1]}, {shape[0]}]")
    tensors[f"{name}.weight_codes"] = codes


def _install_experts(model: torch.nn.Module, name: str, entry: dict[str, Any],
                     args: tuple[QuantArgs, QuantArgs | None], tensors: dict[str, torch.Tensor],
                     weights_file: Path) -> None:
    """Convert the model's fused-experts module ``name`` into the :class:`QuantExperts` a manifest
    entry describes (same weights, shapes and layouts as the model's own), its codes unpacked
    into ``tensors``."""
    where = f"{weights_file.parent / MANIFEST}: experts[{name!r}]"
    try:
        module = model.get_submodule(name)
    except AttributeError:
        module = None
    if module is None or not name or not is_fused_experts(module) or isinstance(module, QuantExperts):
        raise ModelError(f"{where} names fused experts the model's config has not; the output is damaged")
    try:
        layouts = expert_layouts(module)
    except ModelError as exc:
        raise ModelError(f"{where}: {exc}") from None
    experts = module._parameters[next(iter(layouts))].shape[0]
    mine = {}
    for weight, layout in layouts.items():
        _, a, b = module._parameters[weight].shape
        mine[weight] = {"out": a, "in": b, "layout": layout} if layout == "out_in" else {"out": b, "in": a, "layout": layout}
    if entry["matrices"] != mine or entry["num_experts"] != experts:
        raise ModelError(f"{where}: {entry['num_experts']} experts of {entry['matrices']}, but the model's config "
                         f"makes {experts} experts of {mine}; the output is damaged")
    args, activations = args
    try:
        QuantExperts.convert(module, args, activations, layouts)
    except (ValueError, QFrameError) as exc:
        raise ModelError(f"{where}: {_short(exc)}") from None
    if tensors is not None:
        unpack_experts(name, module, tensors, weights_file)


def unpack_experts(name: str, module: QuantExperts, tensors: dict[str, torch.Tensor], weights_file: Path) -> None:
    """Replace ``name``'s packed expert codes in ``tensors`` by the unpacked ones ``module`` holds."""
    args = module.weight_args
    for weight, (experts, out, inp) in module.expert_weights_of().items():
        matrix = {"out": out, "in": inp}
        packed = tensors.pop(f"{name}.{weight}_packed", None)
        if packed is None or packed.dtype != torch.uint8:
            raise ModelError(f"{weights_file}: {name}.{weight}_packed is missing or not uint8 packed codes; "
                             "the output is damaged")
        try:
            codes = args.number_format.unpack(packed, matrix["in"])
        except (ValueError, RuntimeError, IndexError) as exc:
            raise ModelError(f"{weights_file}: {name}.{weight}_packed cannot be unpacked as {args.name} "
                             f"({_short(exc)})") from None
        if tuple(codes.shape) != (experts, matrix["out"], matrix["in"]):
            raise ModelError(f"{weights_file}: {name}.{weight}_packed holds {list(codes.shape)} codes, expected "
                             f"{[experts, matrix['out'], matrix['in']]}")
        tensors[f"{name}.{weight}_codes"] = codes


def _install_cache(model: torch.nn.Module, name: str, args: QuantArgs, shared: bool, weights_file: Path) -> None:
    """Attach the quantized KV cache a manifest entry describes to the attention module ``name``
    (its scales are loaded with the other tensors)."""
    try:
        attention = model.get_submodule(name)
    except AttributeError:
        attention = None
    if attention is None or name == "":
        raise ModelError(f"{weights_file.parent / MANIFEST}: kv_cache[{name!r}] names an attention module the model's "
                         "config has not; the output is damaged")
    try:
        attach(attention, KVCacheQuant(args, shared))
    except ModelError as exc:
        raise ModelError(f"{weights_file.parent / MANIFEST}: kv_cache[{name!r}]: {exc}") from None


# -- a native checkpoint a part at a time ------------------------------------------------------------

def install_structure(model: torch.nn.Module, manifest: dict[str, Any], where: Path, prefix: str = "") -> None:
    """Turn the modules the manifest's tables describe (those whose names start with ``prefix``)
    into the quantized modules they were saved as, on the meta device: the structure, without
    values (parts are loaded later). ``where`` is the manifest file, for messages."""
    dtype = getattr(torch, manifest["dtype"])
    module_args = _module_args(manifest, where)
    with torch.device("meta"):
        for name, entry in manifest["modules"].items():
            if name.startswith(prefix):
                _install(model, name, entry, module_args[name], None, dtype, where.parent / WEIGHTS)
        for name, args in _experts_args(manifest, where).items():
            if name.startswith(prefix):
                _install_experts(model, name, manifest["experts"][name], args, None, where.parent / WEIGHTS)
        for name, (args, shared) in _cache_args(manifest, where).items():
            if name.startswith(prefix):
                _install_cache(model, name, args, shared, where.parent / WEIGHTS)


class NativeParts:
    """A native checkpoint opened lazily: :attr:`qmodel` is the quantized model with every tensor
    on the meta device; :meth:`load_part` reads one part (``"first"``, a decoder layer's index,
    ``"last"``; :mod:`qframe.parts`) from ``model.safetensors`` (memory-mapped), codes unpacked,
    and :meth:`free_part` releases it. What ``qframe export DIR`` and ``qframe eval DIR`` stream.

    Example::

        >>> parts = NativeParts("out/w4a16", registry)     # doctest: +SKIP
        >>> parts.load_part(0); parts.layer(0)             # doctest: +SKIP
    """

    def __init__(self, directory: str | Path, registry: Any, *, dequantize: bool = True) -> None:
        from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

        # Exporters read codes and scales, never the dequantized weights a forward computes with
        # (``dequantize=False``): a layer's float copy and its float32 temporaries are not made.
        self.dequantize = dequantize
        self.directory = Path(directory)
        manifest = read_manifest(self.directory)
        self.weights_file = self.directory / WEIGHTS
        try:
            from safetensors import safe_open

            with safe_open(str(self.weights_file), "pt") as handle:
                self._keys = list(handle.keys())
        except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
            raise ModelError(f"{self.weights_file}: not a readable safetensors file ({_short(exc)})") from None
        dtype = getattr(torch, manifest["dtype"])
        try:
            config = AutoConfig.from_pretrained(self.directory)
            with torch.device("meta"):
                model = AutoModelForCausalLM.from_config(config, dtype=dtype)
        except Exception as exc:  # transformers raises many types for a bad config
            raise ModelError(f"{self.directory / 'config.json'}: not a usable model config ({_short(exc)})") from None
        header = read_header(self.weights_file)[0]
        header.pop("__metadata__", None)
        # As load_native: packed codes hold at most four weights a byte; more is not this checkpoint's model.
        held = sum(math.prod(v["shape"]) * (4 if n.endswith("_packed") else 1) for n, v in header.items())
        wanted = sum(p.numel() for p in model.parameters())
        if wanted > held + sum(model.get_parameter(k).numel() for k in manifest["tied"] if _has_parameter(model, k)):
            raise ModelError(f"{self.directory / 'config.json'} describes a model of {wanted} parameters, but "
                             f"{self.weights_file} holds at most {held}; the output is damaged (write it again with "
                             "qframe apply)")
        self.arch = find_architecture(model, registry)
        self.arch.prepare(model)
        install_structure(model, manifest, self.directory / MANIFEST)
        model.eval()
        model.config.use_cache = False
        _load_generation_config(model, self.directory)
        self.tied: dict[str, str] = dict(manifest["tied"])
        untied = [alias for alias, kept in self.tied.items() if _has_parameter(model, alias) and _has_parameter(model, kept)
                  and model.get_parameter(alias) is not model.get_parameter(kept)]
        if untied:  # as load_native: saved once, but the config no longer ties them
            raise ModelError(f"{self.directory / 'config.json'} does not tie {', '.join(untied[:3])} to what the "
                             "checkpoint saved it as (is tie_word_embeddings missing?); the output is damaged")
        try:
            tokenizer = AutoTokenizer.from_pretrained(self.directory) \
                if (self.directory / "tokenizer_config.json").is_file() else None
        except Exception as exc:
            raise ModelError(f"{self.directory}: cannot load its tokenizer ({_short(exc)})") from None
        self.qmodel = QuantizedModel(model, tokenizer, manifest, directory=self.directory, registry=registry)
        self.num_layers = len(self.arch.decoder_layers(model))

    @property
    def model(self) -> torch.nn.Module:
        return self.qmodel.model

    def layer(self, index: int) -> torch.nn.Module:
        return self.arch.decoder_layers(self.model)[index]

    def _modules(self, part: Part) -> list[tuple[str, torch.nn.Module]]:
        return [(n, m) for n, m in self.model.named_modules() if n and part_of(n, self.arch) == part]

    def load_part(self, part: Part) -> None:
        """Read ``part``'s tensors into the model (for ``"last"``, with what its tied tensors are
        saved as), unpack codes, recompute dequantized weights and computed buffers."""
        from safetensors import safe_open

        wanted = {k for k in self._keys if part_of(k, self.arch) == part}
        wanted |= {kept for alias, kept in self.tied.items() if part_of(alias, self.arch) == part}
        try:
            with safe_open(str(self.weights_file), "pt") as handle:
                tensors = {k: handle.get_tensor(k) for k in sorted(wanted)}
        except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
            raise ModelError(f"{self.weights_file}: not a readable safetensors file ({_short(exc)})") from None
        modules = dict(self._modules(part))
        for name, module in modules.items():
            if isinstance(module, QuantLinear) and module.weight_args is not None:
                packed = tensors.pop(f"{name}.weight_packed", None)
                if packed is None:
                    raise ModelError(f"{self.weights_file}: missing {name}.weight_packed")
                if packed.dtype != torch.uint8:
                    raise ModelError(f"{self.weights_file}: {name}.weight_packed is "
                                     f"{str(packed.dtype).removeprefix('torch.')}, expected uint8 packed codes; the "
                                     "output is damaged")
                try:
                    codes = module.weight_args.number_format.unpack(packed, module.in_features)
                except (ValueError, RuntimeError, IndexError) as exc:
                    raise ModelError(f"{self.weights_file}: {name}.weight_packed cannot be unpacked as "
                                     f"{module.weight_args.name} ({_short(exc)}); the output is damaged") from None
                want = (module.out_features, module.in_features)
                if tuple(codes.shape) != want:
                    raise ModelError(f"{self.weights_file}: {name}.weight_packed holds {list(codes.shape)} codes, "
                                     f"expected {list(want)}")
                tensors[f"{name}.weight_codes"] = codes
            elif isinstance(module, QuantExperts):
                unpack_experts(name, module, tensors, self.weights_file)
        self._check_part(part, tensors)
        self.model.load_state_dict(tensors, strict=False, assign=True)
        for alias, kept in self.tied.items():  # assign gave the kept name a tensor of its own
            owner, _, leaf = alias.rpartition(".")
            setattr(self.model.get_submodule(owner), leaf, self.model.get_parameter(kept))
        for name, module in modules.items():
            if isinstance(module, (QuantLinear, QuantExperts)) and self.dequantize:
                module.refresh()
            if any(b is not None and b.is_meta for b in module._buffers.values()):
                _compute_buffers(self.model, module)

    def _check_part(self, part: Part, tensors: dict[str, torch.Tensor]) -> None:
        """What :func:`load_native` checks, for one part: every tensor the model has there, of
        its shape and dtype, nothing else, nothing non-finite (codes are unpacked already)."""
        expected = {n: t for n, t in self.model.state_dict(keep_vars=True).items()
                    if part_of(n, self.arch) == part and n not in self.tied}
        kept = {k for a, k in self.tied.items() if part_of(a, self.arch) == part}
        missing, unexpected = sorted(set(expected) - set(tensors)), sorted(set(tensors) - set(expected) - kept)
        if missing or unexpected:  # as load_native says it
            raise ModelError(f"{self.weights_file} does not match its manifest: missing {missing[:5]}, "
                             f"unexpected {unexpected[:5]}")
        problems = []
        for name, want in expected.items():
            got = tensors.get(name)
            if got is not None and (tuple(got.shape) != tuple(want.shape) or got.dtype != want.dtype
                                    and not name.endswith("_codes")):
                problems.append(f"{name} is {str(got.dtype).removeprefix('torch.')} {list(got.shape)}, expected "
                                f"{str(want.dtype).removeprefix('torch.')} {list(want.shape)}")
        bad = nonfinite_names(tensors.items())
        if bad:
            raise ModelError(f"{self.weights_file}: {len(bad)} tensor(s) hold NaN or infinity ({listed(bad)}); "
                             "the output is damaged (write it again with qframe apply)")
        if problems:
            raise ModelError(f"{self.weights_file} does not match {self.directory / MANIFEST} and config.json: "
                             f"{listed(problems, 3)}; the output is damaged (write it again with qframe apply)")

    def free_part(self, part: Part) -> None:
        """Send ``part`` back to the meta device, and its memory back to the system."""
        from .run import return_freed_memory

        if isinstance(part, int):
            to_meta(self.layer(part))
        else:
            to_meta(self.model, skip=self.arch.layers_path)
        return_freed_memory()

    def load_layer(self, index: int) -> torch.nn.Module:
        self.load_part(index)
        return self.layer(index)

    def free_layer(self, index: int) -> None:
        self.free_part(index)


def _compute_buffers(model: torch.nn.Module, module: torch.nn.Module) -> None:
    """Give ``module``'s meta buffers (rotary ``inv_freq``: computed, never saved) storage and
    compute them as transformers does when it loads a model (its ``_init_weights``)."""
    for name, buffer in list(module._buffers.items()):
        if buffer is not None and buffer.is_meta:
            module._buffers[name] = torch.empty_like(buffer, device="cpu")
    init = getattr(model, "_init_weights", None)
    if init is not None:
        init(module)


def _load_generation_config(model: torch.nn.Module, directory: Path) -> None:
    """The generation config saved beside the checkpoint, as ``from_pretrained`` reads one."""
    if (directory / "generation_config.json").is_file():
        from transformers import GenerationConfig

        with contextlib.suppress(Exception):  # from_pretrained ignores an unreadable one too
            model.generation_config = GenerationConfig.from_pretrained(str(directory))
