"""The native checkpoint: safetensors with packed codes and their scales, the model's config
and tokenizer, and ``qframe.json``. Loaded back bit-exactly; any backend can re-export it
without recalibration.

Every format's codes are saved as ``<module>.weight_packed`` (uint8): int2/int4 and FP4 (E2M1)
two or four codes a byte, low bits first; int3/5-8 one a byte (offset to unsigned when
symmetric); FP8 the float8 bytes. Scales keep their own dtypes: float32, or for NVFP4
``weight_scale`` in float8_e4m3fn beside a float32 ``weight_global_scale``, for MXFP4 uint8 E8M0
exponents. The manifest records each module's ``QuantArgs`` (``weights``, ``activations`` and,
for a quantized KV cache, ``outputs``).

Files::

    DIR/qframe.json          manifest (recipe, versions, dataset hash, per-layer errors, modules)
    DIR/model.safetensors    quantized state: <module>.weight_packed (uint8), .weight_scale, ...
    DIR/config.json          the Hugging Face config
    DIR/tokenizer*.json      the tokenizer

Example::

    >>> save_native(qmodel, "out")            # doctest: +SKIP
    >>> qmodel = load_native("out")           # doctest: +SKIP
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from . import numerics
from .errors import ModelError
from .model import find_architecture
from .plugins import default_registry
from .qlinear import QuantLinear
from .quantized import QuantizedModel
from .scheme import QuantArgs

FORMAT = "qframe.native"
FORMAT_VERSION = 1
MANIFEST = "qframe.json"
WEIGHTS = "model.safetensors"


def _module_entry(module: QuantLinear) -> dict[str, Any]:
    return {
        "in_features": module.in_features,
        "out_features": module.out_features,
        "bias": module.bias is not None,
        "weights": module.weight_args.to_dict() if module.weight_args else None,
        "activations": module.input_args.to_dict() if module.input_args else None,
        "outputs": module.output_args.to_dict() if module.output_args else None,
        "input_prescale": module.has_prescale,
    }


def native_state(qmodel: QuantizedModel) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The tensors to save (codes packed) and the tied names left out (alias -> kept name)."""
    modules = qmodel.quantized_modules()
    tensors: dict[str, torch.Tensor] = {}
    tied: dict[str, str] = {}
    seen: dict[tuple, str] = {}
    for name, tensor in qmodel.model.state_dict().items():
        owner, _, leaf = name.rpartition(".")
        if leaf == "weight_codes" and owner in modules:
            args = modules[owner].weight_args
            tensors[f"{owner}.weight_packed"] = numerics.pack(tensor, args.bits, args.symmetric, args.format).contiguous().cpu()
            continue
        # Tied means the very same view (e.g. lm_head.weight is embed_tokens.weight); mere
        # slices of one storage, as in fused projections, are saved separately.
        view = (tensor.data_ptr(), tensor.dtype, tuple(tensor.shape), tuple(tensor.stride()))
        if view in seen and tensor.numel():
            tied[name] = seen[view]
            continue
        seen[view] = name
        tensors[name] = tensor.detach().contiguous().cpu()
    return tensors, tied


def save_native(qmodel: QuantizedModel, directory: str | Path) -> Path:
    """Write the checkpoint and manifest into ``directory`` (created if missing)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tensors, tied = native_state(qmodel)
    save_file(tensors, str(directory / WEIGHTS), metadata={"format": FORMAT})
    qmodel.model.config.save_pretrained(directory)
    if qmodel.tokenizer is not None:
        qmodel.tokenizer.save_pretrained(directory)
    manifest = dict(qmodel.manifest)
    manifest.update(
        format=FORMAT,
        format_version=FORMAT_VERSION,
        dtype=str(next(qmodel.model.parameters()).dtype).removeprefix("torch."),
        tied=tied,
        modules={n: _module_entry(m) for n, m in qmodel.quantized_modules().items()},
    )
    (directory / MANIFEST).write_text(json.dumps(manifest, indent=2, default=str) + "\n")
    qmodel.manifest = manifest
    return directory


def read_manifest(directory: str | Path) -> dict[str, Any]:
    path = Path(directory) / MANIFEST
    try:
        manifest = json.loads(path.read_text())
    except FileNotFoundError:
        raise ModelError(f"{directory} is not a qframe output directory (no {MANIFEST})") from None
    except (OSError, json.JSONDecodeError) as exc:
        raise ModelError(f"{path}: unreadable manifest ({exc})") from None
    if manifest.get("format") != FORMAT or manifest.get("format_version") != FORMAT_VERSION:
        raise ModelError(f"{path}: not a {FORMAT} v{FORMAT_VERSION} manifest")
    return manifest


def is_native(directory: str | Path) -> bool:
    return (Path(directory) / MANIFEST).is_file()


def load_native(directory: str | Path) -> QuantizedModel:
    """Rebuild the quantized model exactly as it was saved."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    directory = Path(directory)
    manifest = read_manifest(directory)
    try:
        tensors = load_file(str(directory / WEIGHTS))
    except (SafetensorError, OSError, ValueError) as exc:
        raise ModelError(f"{directory / WEIGHTS}: not a readable safetensors file ({exc})") from None
    dtype = getattr(torch, manifest["dtype"])
    config = AutoConfig.from_pretrained(directory)
    model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    # The saved state is that of the prepared model (e.g. GPT-2's Conv1D turned into nn.Linear).
    find_architecture(model, default_registry()).prepare(model)
    for name, entry in manifest["modules"].items():
        weights = QuantArgs(**entry["weights"]) if entry["weights"] else None
        acts = QuantArgs(**entry["activations"]) if entry["activations"] else None
        outputs = QuantArgs(**entry["outputs"]) if entry.get("outputs") else None
        module = QuantLinear(entry["in_features"], entry["out_features"], entry["bias"], weights, acts, dtype, outputs,
                             prescale=entry.get("input_prescale", False))
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child, module)
        packed = tensors.pop(f"{name}.weight_packed", None)
        if weights is not None:
            if packed is None:
                raise ModelError(f"{directory / WEIGHTS}: missing {name}.weight_packed")
            codes = numerics.unpack(packed, weights.bits, weights.symmetric, entry["in_features"], weights.format)
            tensors[f"{name}.weight_codes"] = codes
    result = model.load_state_dict(tensors, strict=False)
    missing = set(result.missing_keys) - set(manifest.get("tied", {}))
    if missing or result.unexpected_keys:
        raise ModelError(
            f"{directory / WEIGHTS} does not match its manifest: "
            f"missing {sorted(missing)[:5]}, unexpected {sorted(result.unexpected_keys)[:5]}"
        )
    model.tie_weights()
    for module in model.modules():
        if isinstance(module, QuantLinear):
            module.refresh()
    model.eval()
    model.config.use_cache = False
    has_tokenizer = (directory / "tokenizer_config.json").is_file()
    tokenizer = AutoTokenizer.from_pretrained(directory) if has_tokenizer else None
    return QuantizedModel(model, tokenizer, manifest)
