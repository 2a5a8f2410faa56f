"""A validator for TensorRT-LLM checkpoint directories, written from the format's
description (``config.json`` + ``rank{N}.safetensors``, see TRTLLM_CHECKPOINT.md) and not
from qframe's writer, so that it catches the writer's mistakes.

It checks the config's keys and values, the mapping against the rank files, and for every
rank the exact set of tensors TensorRT-LLM's loader asks for: names, per-rank shapes (tensor-
parallel splits, KV heads repeated when there are fewer than ranks, lm_head rows padded,
pipeline stages with local layer indices) and dtypes per ``quant_algo``; scales must be finite
and positive. An ``engine/`` folder beside the ranks is not looked at.

Example::

    >>> validate_checkpoint(Path("out/awq_w4a16/tensorrt_llm"))      # doctest: +SKIP
    []
    >>> validate_checkpoint(Path("broken"))                           # doctest: +SKIP
    ['rank0.safetensors: transformer.layers.0.attention.qkv.weight: shape (96, 64), expected (48, 64)']
"""

from __future__ import annotations

import fnmatch
import json
import math
import re
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open

ARCHITECTURES = {"LlamaForCausalLM": "llama", "MistralForCausalLM": "llama", "Qwen2ForCausalLM": "qwen2",
                 "GPTForCausalLM": "gpt", "GPT2LMHeadModel": "gpt"}
DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}
QUANT_ALGOS = {"W8A16", "W4A16", "W4A16_AWQ", "W4A8_AWQ", "W4A16_GPTQ", "W8A8_SQ_PER_CHANNEL", "FP8", "NVFP4",
               "W8A16_GPTQ", "FP8_PER_CHANNEL_PER_TOKEN", "FP8_BLOCK_SCALES", "MIXED_PRECISION", "NO_QUANT",
               "W8A8_SQ_PER_CHANNEL_PER_TOKEN_PLUGIN", "W8A8_SQ_PER_CHANNEL_PER_TENSOR_PLUGIN",
               "W8A8_SQ_PER_TENSOR_PER_TOKEN_PLUGIN", "W8A8_SQ_PER_TENSOR_PLUGIN", "W4A8_NVFP4_FP8",
               "W4A8_MXFP4_FP8", "W4A16_MXFP4"}
# The algorithms this validator knows the tensors of; others are reported as unchecked.
CHECKED_ALGOS = {None, "NO_QUANT", "W8A16", "FP8", "W4A16_AWQ", "W4A8_AWQ", "W8A8_SQ_PER_CHANNEL", "NVFP4"}
KV_ALGOS = {None, "FP8", "INT8", "NVFP4"}
QUANT_KEYS = {"quant_algo", "kv_cache_quant_algo", "group_size", "has_zero_point", "pre_quant_scale",
              "exclude_modules"}
REQUIRED = {"architecture": str, "dtype": str, "hidden_size": int, "num_hidden_layers": int,
            "num_attention_heads": int, "vocab_size": int}
# Always left unquantized; an explicit list without them means TensorRT-LLM >= 1.0 quantizes them.
MUST_EXCLUDE = ("lm_head", "vocab_embedding")
F32, I8, U8, FP8 = torch.float32, torch.int8, torch.uint8, torch.float8_e4m3fn
SCALAR = (1,)


def recognizes(directory: Path) -> bool:
    """Whether ``directory`` holds a TensorRT-LLM checkpoint (``config.json`` naming an
    ``architecture``, and ``rank0.safetensors``).

    Example::

        >>> recognizes(Path("."))
        False
    """
    try:
        config = json.loads((Path(directory) / "config.json").read_text())
    except (OSError, ValueError):
        return False
    return isinstance(config, dict) and "architecture" in config and (Path(directory) / "rank0.safetensors").exists()


def validate_checkpoint(directory: Path) -> list[str]:
    """Every problem of the checkpoint in ``directory``, one readable line each (empty: valid)."""
    directory = Path(directory)
    try:
        config = json.loads((directory / "config.json").read_text())
    except FileNotFoundError:
        return [f"{directory}: no config.json"]
    except (OSError, ValueError) as exc:
        return [f"config.json: not readable JSON ({exc})"]
    if not isinstance(config, dict):
        return ["config.json: expected a JSON object"]
    problems = _check_config(config)
    if problems:
        return problems  # the tensors cannot be predicted from a broken config
    mapping = config["mapping"]
    world = mapping["world_size"]
    files = sorted(p.name for p in directory.glob("rank*.safetensors"))
    expected_files = [f"rank{r}.safetensors" for r in range(world)]
    problems += [f"{name}: missing (mapping.world_size is {world})" for name in expected_files if name not in files]
    problems += [f"{name}: unexpected rank file (mapping.world_size is {world})" for name in files
                 if name not in expected_files]
    for rank in range(world):
        path = directory / f"rank{rank}.safetensors"
        if path.exists():
            problems += [f"{path.name}: {p}" for p in _check_rank(path, config, rank)]
    return problems


# -- config.json ---------------------------------------------------------------------------

def _check_config(config: dict[str, Any]) -> list[str]:
    problems = []
    for key, kind in REQUIRED.items():
        value = config.get(key)
        if not isinstance(value, kind) or isinstance(value, bool):
            problems.append(f"config.json: {key}: {value!r}, expected a {kind.__name__}")
    if problems:
        return problems
    if config["architecture"] not in ARCHITECTURES:
        problems.append(f"config.json: architecture {config['architecture']!r} is not one this validator knows "
                        f"({', '.join(ARCHITECTURES)})")
    if config["dtype"] not in DTYPES:
        problems.append(f"config.json: dtype {config['dtype']!r}, expected one of {', '.join(DTYPES)}")
    heads, kv = config["num_attention_heads"], config.get("num_key_value_heads") or config["num_attention_heads"]
    if heads % kv:
        problems.append(f"config.json: num_attention_heads {heads} is not a multiple of num_key_value_heads {kv}")
    problems += _check_mapping(config.get("mapping"), config)
    problems += _check_quantization(config.get("quantization"))
    return problems


def _check_mapping(mapping: Any, config: dict[str, Any]) -> list[str]:
    if not isinstance(mapping, dict):
        return [f"config.json: mapping: {mapping!r}, expected {{world_size, tp_size, pp_size}}"]
    problems = []
    if set(mapping) != {"world_size", "tp_size", "pp_size"}:
        problems.append(f"config.json: mapping has keys {sorted(mapping)}; TensorRT-LLM takes exactly "
                        "world_size, tp_size and pp_size (others raise)")
    values = {k: mapping.get(k) for k in ("world_size", "tp_size", "pp_size")}
    if not all(isinstance(v, int) and not isinstance(v, bool) and v >= 1 for v in values.values()):
        return problems + [f"config.json: mapping {values}: expected positive integers"]
    if values["world_size"] != values["tp_size"] * values["pp_size"]:
        problems.append(f"config.json: mapping.world_size {values['world_size']} is not tp_size x pp_size "
                        f"({values['tp_size']} x {values['pp_size']})")
    if config["num_hidden_layers"] % values["pp_size"]:
        problems.append(f"config.json: {config['num_hidden_layers']} layers do not split into "
                        f"{values['pp_size']} pipeline stages")
    if config["num_attention_heads"] % values["tp_size"]:
        problems.append(f"config.json: {config['num_attention_heads']} attention heads do not split across "
                        f"tp_size {values['tp_size']}")
    return problems


def _check_quantization(quant: Any) -> list[str]:
    if quant is None:
        return []
    if not isinstance(quant, dict):
        return [f"config.json: quantization: {quant!r}, expected an object"]
    problems = [f"config.json: quantization.{key}: unknown key (TensorRT-LLM raises on it); allowed: "
                f"{', '.join(sorted(QUANT_KEYS))}" for key in quant if key not in QUANT_KEYS]
    algo, kv = quant.get("quant_algo"), quant.get("kv_cache_quant_algo")
    if algo is not None and algo not in QUANT_ALGOS:
        problems.append(f"config.json: quantization.quant_algo {algo!r} is not a TensorRT-LLM algorithm")
    elif algo not in CHECKED_ALGOS:
        problems.append(f"config.json: quantization.quant_algo {algo!r}: this validator cannot check its tensors")
    if kv not in KV_ALGOS:
        problems.append(f"config.json: quantization.kv_cache_quant_algo {kv!r}, expected null, FP8, INT8 or NVFP4")
    if algo in ("W4A16_AWQ", "W4A8_AWQ", "NVFP4"):
        group = quant.get("group_size")
        allowed = {"W4A16_AWQ": (64, 128), "W4A8_AWQ": (128,), "NVFP4": (16,)}[algo]
        if group not in allowed:
            problems.append(f"config.json: quantization.group_size {group!r} for {algo}, expected "
                            + " or ".join(map(str, allowed)))
    if quant.get("has_zero_point") not in (None, False):
        problems.append("config.json: quantization.has_zero_point is true; these algorithms take symmetric weights")
    excluded = quant.get("exclude_modules")
    if algo is not None or kv is not None:
        if not isinstance(excluded, list) or not all(isinstance(e, str) for e in excluded):
            problems.append(f"config.json: quantization.exclude_modules: {excluded!r}; write an explicit list "
                            "(an empty or missing one means different things to different TensorRT-LLM versions)")
        else:
            for name in MUST_EXCLUDE:
                if not any(fnmatch.fnmatchcase(f"transformer.{name}", e) or fnmatch.fnmatchcase(name, e) for e in excluded):
                    problems.append(f"config.json: quantization.exclude_modules does not cover {name}")
    return problems


# -- the tensors of one rank ---------------------------------------------------------------

def _check_rank(path: Path, config: dict[str, Any], rank: int) -> list[str]:
    try:
        with safe_open(str(path), "pt") as f:
            found = {name: f.get_slice(name) for name in f.keys()}
            shapes = {name: tuple(s.get_shape()) for name, s in found.items()}
            dtypes = {name: _dtype(s.get_dtype()) for name, s in found.items()}
            expected = expected_tensors(config, rank)
            problems = []
            for name, (shape, dtype) in expected.items():
                if name not in shapes:
                    problems.append(f"{name}: missing (expected {_show(shape)} {_name(dtype)})")
                    continue
                if not _same_shape(shapes[name], shape):
                    problems.append(f"{name}: shape {_show(shapes[name])}, expected {_show(shape)}")
                allowed = dtype if isinstance(dtype, tuple) else (dtype,)
                if dtypes[name] not in allowed:
                    problems.append(f"{name}: dtype {_name(dtypes[name])}, expected {_name(dtype)}")
                elif "scaling_factor" in name and dtypes[name].is_floating_point:
                    problems += _check_scale(name, f.get_tensor(name))
            optional = optional_tensors(config, rank)
            for name in shapes:
                if name in optional and shapes[name] in ((), SCALAR) and dtypes[name] == F32:
                    problems += _check_scale(name, f.get_tensor(name))
                elif name not in expected:
                    problems.append(f"{name}: unexpected tensor")
            return problems
    except SafetensorError as exc:
        return [f"not a readable safetensors file ({exc})"]


def _check_scale(name: str, tensor: torch.Tensor) -> list[str]:
    values = tensor.float()
    if not bool(torch.isfinite(values).all()):
        return [f"{name}: holds NaN or inf"]
    if "prequant" not in name and not bool((values > 0).all()):
        return [f"{name}: holds scales that are not positive"]
    return []


def expected_tensors(config: dict[str, Any], rank: int) -> dict[str, tuple[tuple[int, ...], Any]]:
    """Every tensor ``rank`` must hold: name -> (shape, dtype or a tuple of allowed dtypes).

    Example::

        >>> cfg = {"architecture": "LlamaForCausalLM", "dtype": "float16", "hidden_size": 64,
        ...        "num_hidden_layers": 1, "num_attention_heads": 4, "num_key_value_heads": 2,
        ...        "intermediate_size": 128, "vocab_size": 100,
        ...        "mapping": {"world_size": 2, "tp_size": 2, "pp_size": 1}, "quantization": None}
        >>> expected_tensors(cfg, 1)["transformer.layers.0.attention.qkv.weight"]
        ((32, 64), torch.float16)
    """
    family = ARCHITECTURES[config["architecture"]]
    md = DTYPES[config["dtype"]]
    hidden, layers, vocab = config["hidden_size"], config["num_hidden_layers"], config["vocab_size"]
    heads = config["num_attention_heads"]
    kv_heads = config.get("num_key_value_heads") or heads
    head = config.get("head_size") or hidden // heads
    inter = config.get("intermediate_size") or 4 * hidden
    tp, pp = config["mapping"]["tp_size"], config["mapping"]["pp_size"]
    tp_rank, pp_rank = rank % tp, rank // tp
    quant = config.get("quantization") or {}
    gpt = family == "gpt"

    out: dict[str, tuple[tuple[int, ...], torch.dtype]] = {}
    if pp_rank == 0:
        rows = vocab if not config.get("use_parallel_embedding") else math.ceil(vocab / tp)
        embedding = (rows, hidden) if config.get("embedding_sharding_dim", 0) == 0 else (vocab, hidden // tp)
        out["transformer.vocab_embedding.weight"] = (embedding, md)
        if gpt:
            out["transformer.position_embedding.weight"] = ((config.get("max_position_embeddings", 0), hidden), md)
    if pp_rank == pp - 1:
        out["transformer.ln_f.weight"] = ((hidden,), md)
        if gpt:
            out["transformer.ln_f.bias"] = ((hidden,), md)
        out["lm_head.weight"] = ((math.ceil(vocab / tp), hidden), md)

    per_stage = layers // pp
    q_rank = heads // tp * head
    kv_rank = max(kv_heads // tp, 1) * head  # fewer KV heads than ranks: each rank keeps one
    attn_bias = gpt or family == "qwen2" or bool(config.get("attn_bias"))
    mlp_bias = gpt or bool(config.get("mlp_bias"))
    for local in range(per_stage):
        index = pp_rank * per_stage + local
        prefix = f"transformer.layers.{local}"
        for norm in ("input_layernorm", "post_layernorm"):
            out[f"{prefix}.{norm}.weight"] = ((hidden,), md)
            if gpt:
                out[f"{prefix}.{norm}.bias"] = ((hidden,), md)
        linears = {  # name: (out, in, parallel, bias)
            "attention.qkv": (q_rank + 2 * kv_rank, hidden, "column", attn_bias),
            "attention.dense": (hidden, heads // tp * head, "row", gpt or (attn_bias and family != "qwen2")),
            "mlp.fc": (inter // tp, hidden, "column", mlp_bias),
            "mlp.proj": (hidden, inter // tp, "row", mlp_bias),
        }
        if not gpt:
            linears["mlp.gate"] = (inter // tp, hidden, "column", mlp_bias)
        for name, (rows, cols, parallel, bias) in linears.items():
            excluded = _excluded(quant, f"transformer.layers.{index}.{name}", f"{prefix}.{name}")
            algo = None if excluded else quant.get("quant_algo")
            for suffix, entry in _linear_tensors(algo, quant, rows, cols, parallel, md).items():
                out[f"{prefix}.{name}.{suffix}"] = entry
            if bias:
                out[f"{prefix}.{name}.bias"] = ((rows if parallel == "column" else hidden,), md)
        if quant.get("kv_cache_quant_algo"):
            out[f"{prefix}.attention.kv_cache_scaling_factor"] = (SCALAR, F32)
    return out


def optional_tensors(config: dict[str, Any], rank: int) -> set[str]:
    """Tensors a rank may hold beside the expected ones: the separate K and V cache scales
    that modelopt writes next to ``kv_cache_scaling_factor`` (float32 scalars)."""
    quant = config.get("quantization") or {}
    if not quant.get("kv_cache_quant_algo"):
        return set()
    stages = config["mapping"]["pp_size"]
    return {f"transformer.layers.{i}.attention.{kv}_cache_scaling_factor"
            for i in range(config["num_hidden_layers"] // stages) for kv in "kv"}


def _linear_tensors(algo: str | None, quant: dict, rows: int, cols: int, parallel: str,
                    md: torch.dtype) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    if algo in (None, "NO_QUANT", "W8A16"):  # W8A16: the builder quantizes 16-bit weights itself
        return {"weight": ((rows, cols), md)}
    if algo == "FP8":
        return {"weight": ((rows, cols), FP8), "weights_scaling_factor": (SCALAR, F32),
                "activation_scaling_factor": (SCALAR, F32)}
    if algo == "W8A8_SQ_PER_CHANNEL":
        return {"weight": ((rows, cols), I8), "weights_scaling_factor": ((rows,), F32),
                "activation_scaling_factor": (SCALAR, F32), "prequant_scaling_factor": ((cols,), md)}
    if algo in ("W4A16_AWQ", "W4A8_AWQ"):
        group = quant["group_size"]
        # Group scales: float32 as modelopt writes them, or the model's dtype (the loader casts).
        out = {"weight": ((rows // 2, cols), I8), "weights_scaling_factor": ((rows, cols // group), (F32, md))}
        if quant.get("pre_quant_scale"):
            out["prequant_scaling_factor"] = ((cols,), md)
        if algo == "W4A8_AWQ":
            out["weights_scaling_factor_2"] = (SCALAR, F32)
            out["activation_scaling_factor"] = (SCALAR, F32)
        return out
    if algo == "NVFP4":
        return {"weight": ((rows, cols // 2), U8), "weights_scaling_factor": ((rows, cols // 16), FP8),
                "weights_scaling_factor_2": (SCALAR, F32), "activation_scaling_factor": (SCALAR, F32)}
    return {}


def _excluded(quant: dict, *names: str) -> bool:
    patterns = quant.get("exclude_modules") or []
    return any(fnmatch.fnmatchcase(n, p) for n in names for p in patterns)


def _same_shape(found: tuple[int, ...], expected: tuple[int, ...]) -> bool:
    # The loader takes a 0-d scalar for a one-element scale.
    return found == expected or (expected == SCALAR and found in ((), (1,), (1, 1)))


def _dtype(name: str) -> torch.dtype | str:
    return {"F16": torch.float16, "BF16": torch.bfloat16, "F32": F32, "I8": I8, "U8": U8, "F8_E4M3": FP8,
            "I32": torch.int32, "I64": torch.int64, "F64": torch.float64, "F8_E5M2": torch.float8_e5m2,
            "BOOL": torch.bool}.get(name, name)


def _name(dtype: torch.dtype | str | tuple) -> str:
    if isinstance(dtype, tuple):
        return " or ".join(_name(d) for d in dtype)
    return re.sub(r"^torch\.", "", str(dtype))


def _show(shape: tuple[int, ...]) -> str:
    return "(" + ", ".join(map(str, shape)) + ("," if len(shape) == 1 else "") + ")"
