"""Lazy loading: a causal LM built on the meta device whose weights are read from the
checkpoint a part at a time, so that a model larger than memory can be quantized one
decoder layer after another.

:class:`LazyModel` opens a local Hugging Face folder (``model.safetensors``, or shards
listed in ``model.safetensors.index.json``) or a ``.gguf`` file. Its :attr:`~LazyModel.model` starts with every
tensor on the meta device, in the dtype asked for; :meth:`~LazyModel.load_rest` reads what
lies outside the decoder layers (embeddings, final norm, head, computed buffers such as
rotary tables), :meth:`~LazyModel.load_layer` reads one decoder layer, and
:meth:`~LazyModel.free_layer` sends it back to meta. The shards are memory-mapped and
opened afresh for every load, so nothing stays resident between loads. A GGUF file is read
the same way, and only the tensors of the part being loaded are dequantized.

Loading goes through transformers' own machinery, so the result is bit for bit what
``from_pretrained`` gives, renamings included: a legacy Mixtral checkpoint's per-expert
``block_sparse_moe.experts.N.w1`` tensors become the fused expert weights transformers 5
builds; a GGUF tensor goes through transformers' GGUF reader (names, the Llama q/k row order,
fused experts) exactly as ``from_pretrained(folder, gguf_file=name)`` sends it. As in
:func:`qframe.model.load_model`, a weight missing from the files, one of another shape, or a
tensor the model has no place for is a :class:`~qframe.errors.ModelError`; here it names the
layer being loaded.

Example::

    >>> lazy = LazyModel("path/to/model", dtype="bfloat16")      # doctest: +SKIP
    >>> lazy.load_rest()                                          # doctest: +SKIP
    >>> for index in range(lazy.num_layers):                      # doctest: +SKIP
    ...     layer = lazy.load_layer(index)
    ...     ...  # calibrate and quantize it
    ...     lazy.free_layer(index)
"""

from __future__ import annotations

import contextlib
import json
import os
import re
from pathlib import Path
from typing import Any, Callable, Iterator, NamedTuple

import torch
from torch import nn

from .errors import ModelError, shorten
from .model import DTYPES, gguf_name_map_once, listed, one_gguf_reader, quiet_transformers

__all__ = ["LazyModel"]

SINGLE_FILE = "model.safetensors"
SHARD_INDEX = "model.safetensors.index.json"
_REST = -1  # the group of the tensors outside the decoder layers


# -- transformers' private loading API ----------------------------------------------------------
# Everything below reaches into transformers 5.x internals that from_pretrained uses (checked with
# 5.24): the model class behind AutoModelForCausalLM, the meta-device init context, the dtype plan,
# the checkpoint-key renaming and conversion (fused experts), the post-load fix-ups (ignored keys,
# tying, computed buffers). They are private and may change; keep every use of them here.

def _hf_model_class(config: Any) -> type:
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM._model_mapping[type(config)]


def _hf_skeleton(cls: type, config: Any, dtype: torch.dtype) -> nn.Module:
    """The model on the meta device in ``dtype``, untied, as from_pretrained builds it."""
    from transformers.utils.generic import ContextManagers

    config.dtype = dtype
    for key in getattr(config, "sub_configs", None) or {}:  # as from_pretrained: a multimodal model's parts too
        sub = getattr(config, key, None)
        if sub is not None and hasattr(sub, "to_dict"):
            sub.dtype = dtype
    with ContextManagers(cls.get_init_context(dtype, False, False, False)):
        return cls(config)


class _HfLoader:
    """transformers' conversion plan for ``model`` and the calls that load tensors with it."""

    def __init__(self, model: nn.Module, dtype: torch.dtype, where: str) -> None:
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import WeightConverter, WeightRenaming
        from transformers.modeling_utils import LoadStateDictConfig

        self.model = model
        mapping = get_model_conversion_mapping(model, None, None)
        self.renamings = [t for t in mapping if isinstance(t, WeightRenaming)]
        self.converters = [t for t in mapping if isinstance(t, WeightConverter)]
        self.config = LoadStateDictConfig(pretrained_model_name_or_path=where, dtype=dtype,
                                          dtype_plan=model._get_dtype_plan(dtype), weight_mapping=mapping)
        self._meta_state = model.state_dict()

    def target_name(self, key: str) -> str:
        """The model's name for checkpoint key ``key`` (after renamings and conversions)."""
        from transformers.core_model_loading import rename_source_key

        target, _ = rename_source_key(key, self.renamings, self.converters, self.model.base_model_prefix,
                                      self._meta_state)
        return target

    def load(self, tensors: dict[str, Any]) -> Any:
        """Load ``tensors`` (checkpoint names → tensors or safetensors slices) into the model;
        return transformers' loading info (missing keys are those of the whole model)."""
        from transformers.core_model_loading import convert_and_load_state_dict_in_model

        info, _ = convert_and_load_state_dict_in_model(self.model, tensors, self.config)
        self.model._adjust_missing_and_unexpected_keys(info)  # e.g. legacy per-layer rotary inv_freq keys
        return info

    def tie(self, missing: set[str]) -> None:
        """Tie the weights the config ties (both ways: the one the checkpoint holds is kept)."""
        self.model.tie_weights(missing_keys=missing, recompute_mapping=False)

    def compute_buffers(self, module: nn.Module) -> None:
        """Give ``module``'s meta buffers storage and compute them (rotary ``inv_freq``) as
        from_pretrained does; loaded parameters are flagged by transformers and left alone."""
        for name, buffer in list(module._buffers.items()):
            if buffer is not None and buffer.is_meta:
                module._buffers[name] = torch.empty_like(buffer, device="cpu")
        self.model._init_weights(module)


# transformers 5.24 reads a .gguf in one of two ways. Architectures its GGUF quantizer covers
# (integrations/gguf: qwen35, qwen35moe, lfm2) are converted while they load; every other one goes
# through the legacy reader of modeling_gguf_pytorch_utils.load_gguf_checkpoint: the config as parsed
# from the metadata, gguf's name map (get_gguf_hf_weights_map), gguf.dequantize, the architecture's
# TENSOR_PROCESSORS entry (Llama's q/k rows back in Hugging Face order, experts fused), a cast to the
# load dtype, then the ordinary loading above. LazyModel follows the legacy reader, a layer at a time.

def _gguf_quantizer_path(architecture: str) -> bool:
    """Whether from_pretrained loads this GGUF architecture through its GGUF quantizer rather
    than through the legacy reader that :class:`_GgufFile` follows."""
    try:
        from transformers.integrations.gguf import is_gguf_arch_supported
    except ImportError:  # transformers before the quantizer path: everything is legacy
        return False
    return bool(is_gguf_arch_supported(architecture))


def _gguf_parsed_config(file: Path) -> dict[str, Any]:
    """The config as the legacy reader parses it from the metadata, before a config class fills
    in defaults: this dict, not ``config.to_dict()``, is what the tensor processors read (Llama
    leaves q/k alone when the file names no key/value head count)."""
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    return load_gguf_checkpoint(str(file), return_tensors=False)["config"]


def _gguf_processor(architecture: str, parsed_config: dict[str, Any]) -> Any:
    from transformers.modeling_gguf_pytorch_utils import TENSOR_PROCESSORS, TensorProcessor

    return TENSOR_PROCESSORS.get(architecture, TensorProcessor)(config=parsed_config)


def _gguf_name_map(model: nn.Module, processor: Any) -> dict[str, str]:
    """GGUF tensor name → the model's parameter name (gguf's map built once, not once per module)."""
    from transformers.modeling_gguf_pytorch_utils import get_gguf_hf_weights_map

    with gguf_name_map_once():
        return get_gguf_hf_weights_map(model, processor)


# -- checkpoint files ---------------------------------------------------------------------------

def _weight_map(directory: Path) -> dict[str, str]:
    """Checkpoint key → file name, from the shard index or the single file."""
    from safetensors import safe_open

    index = directory / SHARD_INDEX
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise ModelError(f"cannot read the shard index {str(index)!r}: {type(exc).__name__}: {exc}") from None
        if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
            raise ModelError(f"shard index {str(index)!r}: weight_map is not a mapping of tensor names to files")
        missing = sorted({f for f in weight_map.values() if not (directory / f).is_file()})
        if missing:
            raise ModelError(f"model {str(directory)!r}: the shard index names {listed(missing)}, "
                             "which are not in the folder; download the model again")
        return weight_map
    single = directory / SINGLE_FILE
    if not single.is_file():
        raise ModelError(f"model {str(directory)!r} has neither {SINGLE_FILE} nor {SHARD_INDEX}; "
                         "lazy loading reads safetensors checkpoints only")
    try:
        with safe_open(str(single), "pt") as handle:
            return {key: SINGLE_FILE for key in handle.keys()}
    except Exception as exc:
        raise ModelError(f"cannot read {str(single)!r}: {type(exc).__name__}: {exc}") from None


def _checkpoint_dtype(directory: Path, weight_map: dict[str, str]) -> torch.dtype:
    """The dtype of the checkpoint's first floating-point tensor (what ``dtype="auto"`` means
    for a config that names none), float32 if it has none."""
    from safetensors import safe_open

    names = {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16, "F64": torch.float64}
    first = sorted(set(weight_map.values()))[0] if weight_map else None
    if first is not None:
        with safe_open(str(directory / first), "pt") as handle:
            for key in handle.keys():
                found = names.get(handle.get_slice(key).get_dtype())
                if found is not None:
                    return found
    return torch.float32


def _resolve_dtype(dtype: str, config: Any, unconfigured: Callable[[], torch.dtype]) -> torch.dtype:
    """``dtype`` as a torch dtype; ``"auto"`` is the config's, else ``unconfigured()``."""
    if dtype != "auto":
        if dtype not in DTYPES:
            raise ModelError(f"dtype {shorten(dtype)} is not one of auto, {', '.join(DTYPES)}")
        return DTYPES[dtype]
    configured = getattr(config, "dtype", None)
    if isinstance(configured, str):
        configured = getattr(torch, configured, None)
    if isinstance(configured, torch.dtype):
        return configured
    return unconfigured()


def _has_meta_buffers(module: nn.Module) -> bool:
    return any(b is not None and b.is_meta for b in module._buffers.values())


def _find_layers_path(model: nn.Module, count: int | None) -> str:
    """The one ``nn.ModuleList`` of ``count`` modules (the decoder layers)."""
    found = [name for name, module in model.named_modules()
             if isinstance(module, nn.ModuleList) and len(module) == count]
    if len(found) != 1:
        raise ModelError(f"{type(model).__name__}: cannot tell which module list holds its {count} decoder layers "
                         f"(candidates: {listed(found) or 'none'}); pass layers_path")
    return found[0]


# -- GGUF files ---------------------------------------------------------------------------------

class _GgufTensor(NamedTuple):
    """Where one tensor lies in a GGUF file and how gguf's reader views it (the array that
    ``gguf.dequantize`` takes); what is kept of the reader, which is slow to build."""

    ggml_type: Any  # gguf.GGMLQuantizationType
    offset: int  # from the start of the file
    nbytes: int
    dtype: Any  # numpy dtype, byte order included
    shape: tuple[int, ...]


class _GgufFile:
    """A GGUF file read as transformers' legacy reader reads it, a few tensors at a time."""

    def __init__(self, file: Path) -> None:
        from transformers import AutoConfig

        if not file.is_file():
            raise ModelError(f"model file {str(file)!r} does not exist")
        try:
            import gguf  # noqa: F401
        except ImportError:
            raise ModelError(f"reading {str(file)!r} needs the gguf package (pip install gguf)") from None
        self.file = file
        with contextlib.ExitStack() as stack:
            try:
                reader = stack.enter_context(one_gguf_reader(file))
                field = reader.get_field("general.architecture")
                self.architecture = str(field.contents()) if field is not None else None
                self.tensors = {t.name: _GgufTensor(t.tensor_type, int(t.data_offset), int(t.data.nbytes),
                                                    t.data.dtype, tuple(t.data.shape)) for t in reader.tensors}
            except ModelError:
                raise
            except Exception as exc:
                raise ModelError(f"cannot read the GGUF file {str(file)!r} ({type(exc).__name__}: "
                                 f"{_first_line(exc)}); it is damaged or incomplete: download it again") from None
            if self.architecture is None:
                raise ModelError(f"GGUF file {str(file)!r} names no general.architecture; it is damaged")
            if _gguf_quantizer_path(self.architecture):
                raise ModelError(f"GGUF file {str(file)!r}: transformers loads architecture "
                                 f"{self.architecture!r} through its GGUF quantizer, which lazy loading does not "
                                 "follow; load the whole model instead")
            try:
                with quiet_transformers():
                    self.config = AutoConfig.from_pretrained(str(file.parent), gguf_file=file.name)
                    self._parsed_config = _gguf_parsed_config(file)
            except Exception as exc:
                raise ModelError(f"cannot read the config of model {str(file)!r}: {type(exc).__name__}: "
                                 f"{_first_line(exc)}") from None
        self._processor: Any = None
        self.name_map: dict[str, str] = {}
        self.dtype = torch.float32

    def bind(self, model: nn.Module, dtype: torch.dtype) -> None:
        """Name the file's tensors after ``model``'s parameters; tensors are cast to ``dtype``
        right after they are dequantized, as transformers casts them."""
        self._processor = _gguf_processor(self.architecture, self._parsed_config)
        self.name_map = _gguf_name_map(model, self._processor)
        self.dtype = dtype

    def read(self, names: list[str]) -> dict[str, torch.Tensor]:
        """The model's tensors made from the GGUF tensors ``names``, all those of one part of the
        model (a processor fuses the experts of a layer into one tensor). The file is mapped for
        this call only: none of its pages stay mapped, and a file cut short since is an error
        rather than a crash."""
        import gguf
        import numpy as np

        mapped = np.memmap(self.file, mode="r")
        parsed: dict[str, dict[str, Any]] = {"tensors": {}}  # what the processors add to
        for name in names:
            entry = self.tensors[name]
            view = mapped[entry.offset:entry.offset + entry.nbytes].view(entry.dtype).reshape(entry.shape)
            result = self._processor.process(weights=gguf.dequantize(view, entry.ggml_type), name=name,
                                             tensor_key_mapping=self.name_map, parsed_parameters=parsed)
            if result.name in self.name_map:  # else kept by the processor itself, or no weight of the model
                # A copy: a float32 tensor is dequantized to a view of the mapping.
                tensor = torch.from_numpy(np.copy(result.weights)).to(self.dtype)
                parsed["tensors"][self.name_map[result.name]] = tensor
        return parsed["tensors"]


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else ""


# -- the lazy model -----------------------------------------------------------------------------

class LazyModel:
    """A causal LM from a local safetensors folder or ``.gguf`` file, on the meta device until
    its parts are loaded: :meth:`load_rest` for everything outside the decoder layers,
    :meth:`load_layer` and :meth:`free_layer` for one decoder layer at a time.

    ``dtype`` is ``"auto"`` (the config's ``dtype``, else the checkpoint's; float32 for a GGUF,
    as ``from_pretrained`` picks), ``"float32"``, ``"bfloat16"`` or ``"float16"``. ``layers_path``
    is where the decoder layers are (``"model.layers"`` for Llama-like models); by default the
    one module list as long as the config's ``num_hidden_layers``. A folder without config or
    weights, a damaged GGUF file, or weights that cannot all be placed in the model raise
    :class:`~qframe.errors.ModelError`.

    Example::

        >>> folder = _tiny_folder()  # a tiny Llama, saved with save_pretrained
        >>> lazy = LazyModel(folder, dtype="float32")
        >>> lazy.layers_path, lazy.num_layers, lazy.model.lm_head.weight.is_meta
        ('model.layers', 2, True)
        >>> lazy.load_rest(); lazy.model.lm_head.weight.is_meta
        False
        >>> lazy.load_layer(1).self_attn.q_proj.weight.dtype
        torch.float32
        >>> lazy.free_layer(1); lazy.layer(1).self_attn.q_proj.weight.is_meta
        True
        >>> gguf = LazyModel("SmolLM2-135M-Instruct.Q4_1.gguf")   # doctest: +SKIP
        >>> gguf.dtype, gguf.load_layer(0).mlp.up_proj.weight.shape  # doctest: +SKIP
        (torch.float32, torch.Size([1536, 576]))
    """

    def __init__(self, path: str | Path, dtype: str = "auto", *, layers_path: str | None = None) -> None:
        from transformers import AutoConfig

        self.path = Path(path).expanduser()
        self._gguf: _GgufFile | None = None
        self._files: dict[str, str] = {}  # safetensors: checkpoint key -> file name
        if self.path.suffix.lower() == ".gguf" and not self.path.is_dir():
            self._gguf = _GgufFile(self.path)
            config = self._gguf.config
        else:
            if not (self.path / "config.json").is_file():
                raise ModelError(f"model directory {str(self.path)!r} has no config.json; "
                                 "is it a Hugging Face model folder?")
            self._files = _weight_map(self.path)
            try:
                with quiet_transformers():
                    config = AutoConfig.from_pretrained(str(self.path))
            except Exception as exc:
                raise ModelError(f"cannot read the config of model {str(self.path)!r}: "
                                 f"{type(exc).__name__}: {exc}") from None
        try:
            model_class = _hf_model_class(config)
        except KeyError:
            raise ModelError(f"model {str(self.path)!r}: transformers has no causal LM for "
                             f"model_type {getattr(config, 'model_type', None)!r}") from None
        # A GGUF's config names no dtype, and from_pretrained then loads in torch's default one.
        self.dtype = _resolve_dtype(dtype, config, torch.get_default_dtype if self._gguf else
                                    lambda: _checkpoint_dtype(self.path, self._files))
        with quiet_transformers():
            self.model: nn.Module = _hf_skeleton(model_class, config, self.dtype)
        self.model.eval()
        if self._gguf is None and (self.path / "generation_config.json").is_file():  # from_pretrained reads it
            from transformers import GenerationConfig

            with contextlib.suppress(Exception):  # from_pretrained ignores an unreadable one too
                self.model.generation_config = GenerationConfig.from_pretrained(str(self.path))
        self.layers_path = layers_path or _find_layers_path(
            self.model, getattr(self.model.config.get_text_config(), "num_hidden_layers", None))
        self.num_layers = len(self.model.get_submodule(self.layers_path))
        if self._gguf is not None:
            with quiet_transformers():
                self._gguf.bind(self.model, self.dtype)
        self._hf = _HfLoader(self.model, self.dtype, str(self.path.parent if self._gguf else self.path))
        self._groups = self._plan()

    def _plan(self) -> dict[int, list[str]]:
        """Checkpoint keys (GGUF tensor names) by the decoder layer their *target* lies in
        (``_REST`` for the others and for layers the config does not have: those are reported as
        unexpected)."""
        pattern = re.compile(re.escape(self.layers_path) + r"\.(\d+)\.")
        groups: dict[int, list[str]] = {}
        for key in (self._gguf.tensors if self._gguf else self._files):
            if self._gguf is None:
                found = pattern.match(self._hf.target_name(key))
            elif key in self._gguf.name_map:
                found = pattern.match(self._hf.target_name(self._gguf.name_map[key]))
            else:  # e.g. experts that a processor fuses itself: GGUF numbers its blocks as the layers
                found = re.match(r"blk\.(\d+)\.", key)
            index = int(found.group(1)) if found else _REST
            groups.setdefault(index if 0 <= index < self.num_layers else _REST, []).append(key)
        return groups

    def layer(self, index: int) -> nn.Module:
        """Decoder layer ``index`` as it is now (on meta unless loaded).

        Example::

            >>> LazyModel(_tiny_folder()).layer(0).self_attn.q_proj.weight.is_meta
            True
        """
        if not 0 <= index < self.num_layers:
            raise IndexError(f"layer {index} of a model with {self.num_layers} decoder layers")
        return self.model.get_submodule(f"{self.layers_path}.{index}")

    def layer_keys(self, index: int) -> list[str]:
        """The checkpoint keys (GGUF tensor names) :meth:`load_layer` reads for layer ``index``, in
        the checkpoint's order.

        Example::

            >>> LazyModel(_tiny_folder()).layer_keys(0)[0]
            'model.layers.0.input_layernorm.weight'
        """
        self.layer(index)
        return list(self._groups.get(index, []))

    @contextlib.contextmanager
    def _slices(self, keys: list[str]) -> Iterator[dict[str, Any]]:
        """Memory-mapped slices of ``keys``, from handles opened for this load only: a tensor
        read in the checkpoint's dtype is a view of the mapping, and a handle kept open would
        keep the pages of layers already freed (copy-on-write ones if they were modified)."""
        from safetensors import safe_open

        with contextlib.ExitStack() as stack:
            handles: dict[str, Any] = {}
            slices = {}
            for key in keys:
                name = self._files[key]
                if name not in handles:
                    handles[name] = stack.enter_context(safe_open(str(self.path / name), "pt", device="cpu"))
                slices[key] = handles[name].get_slice(key)
            yield slices

    def _load(self, keys: list[str], what: str) -> Any:
        try:
            if self._gguf is not None:
                with quiet_transformers():
                    return self._hf.load(self._gguf.read(keys))
            with self._slices(keys) as slices, quiet_transformers():
                return self._hf.load(slices)
        except ModelError:
            raise
        except Exception as exc:
            raise ModelError(f"model {str(self.path)!r}: cannot load {what}: {type(exc).__name__}: "
                             f"{str(exc).strip().splitlines()[0] if str(exc).strip() else ''}") from None

    def load_rest(self, only: Callable[[str], bool] | None = None) -> None:
        """Load everything outside the decoder layers: embeddings, final norm, head (tied to
        the embeddings where the config says so), and computed buffers such as rotary tables.
        ``only`` (a test on the model's tensor names) loads part of it, e.g. the head without
        the embeddings of an untied model; then only what it selects is checked complete.

        Example::

            >>> lazy = LazyModel(_tiny_folder()); lazy.load_rest()
            >>> lazy.model.model.embed_tokens.weight.is_meta, lazy.model.model.rotary_emb.inv_freq.is_meta
            (False, False)
        """
        keys = self._groups.get(_REST, [])
        if only is not None:
            keys = [k for k in keys if only(self._target(k))]
        info = self._load(keys, "the weights outside the decoder layers")
        inside = self.layers_path + "."
        outside = {k for k in info.missing_keys if not k.startswith(inside)}
        with quiet_transformers():
            self._hf.tie(outside)
        for name, module in self.model.named_modules():
            if not (name + ".").startswith(inside) and _has_meta_buffers(module):
                self._hf.compute_buffers(module)
        # Computed buffers are real by now: what is still on meta was in no file (and tied to nothing).
        tensors = [*self.model.named_parameters(remove_duplicate=False),
                   *self.model.named_buffers(remove_duplicate=False)]
        missing = [name for name, t in tensors if t.is_meta and not name.startswith(inside)
                   and (only is None or only(name))]
        self._check(info, "the weights outside the decoder layers", missing)

    def _target(self, key: str) -> str:
        """The model's name for the checkpoint key ``key``."""
        if self._gguf is not None:
            return self._hf.target_name(self._gguf.name_map.get(key, key))
        return self._hf.target_name(key)

    def load_layer(self, index: int) -> nn.Module:
        """Read decoder layer ``index`` from the checkpoint into the model and return it.

        Example::

            >>> lazy = LazyModel(_tiny_folder())
            >>> lazy.load_layer(0).mlp.down_proj.weight.is_meta, lazy.layer(1).mlp.down_proj.weight.is_meta
            (False, True)
        """
        layer = self.layer(index)
        prefix = f"{self.layers_path}.{index}."
        what = f"decoder layer {index} ({self.layers_path}.{index})"
        info = self._load(self._groups.get(index, []), what)
        for module in layer.modules():
            if _has_meta_buffers(module):
                self._hf.compute_buffers(module)
        missing = sorted(k for k in info.missing_keys if k.startswith(prefix))
        self._check(info, what, missing)
        return layer

    def free_layer(self, index: int) -> None:
        """Send decoder layer ``index`` back to the meta device, releasing its memory.

        Example::

            >>> lazy = LazyModel(_tiny_folder()); _ = lazy.load_layer(0); lazy.free_layer(0)
            >>> lazy.layer(0).mlp.down_proj.weight.is_meta
            True
        """
        self.layer(index).to("meta")

    def _check(self, info: Any, what: str, missing: list[str]) -> None:
        """One sentence naming ``what`` and every missing, mismatched or unexpected key."""
        problems = []
        if missing:
            verb = "are" if len(missing) > 1 else "is"
            problems.append(f"{listed(sorted(missing))} {verb} missing from the checkpoint")
        mismatched = sorted(info.mismatched_keys)
        if mismatched:
            shapes = [f"{name} {list(saved)} in the checkpoint, {list(wanted)} in the model"
                      for name, saved, wanted in mismatched]
            problems.append(f"{listed(shapes, 3)} {'have' if len(shapes) > 1 else 'has'} another shape")
        errors = [f"{name} ({_error_line(text)})" for name, text in sorted(info.conversion_errors.items())]
        if errors:
            problems.append(f"building {listed(errors, 3)} from the checkpoint's tensors failed")
        unexpected = sorted(info.unexpected_keys)
        if unexpected:
            problems.append(f"{listed(unexpected)} {'have' if len(unexpected) > 1 else 'has'} no place in "
                            f"{type(self.model).__name__}")
        if problems:
            raise ModelError(f"model {str(self.path)!r}, {what}: {'; '.join(problems)}; the config does not "
                             "describe these weights, or a weights file is incomplete or from another model")


def _error_line(text: str, limit: int = 200) -> str:
    r"""The exception line of a conversion error that transformers reports with its traceback.

    Example::

        >>> _error_line("Traceback (most recent call last):\n  File ...\nRuntimeError: sizes differ\nError: Cat")
        'RuntimeError: sizes differ'
    """
    lines = [line.strip() for line in str(text).splitlines() if line.strip()]
    found = [line for line in lines if re.match(r"[\w.]*(Error|Exception): ", line) and not line.startswith("Error: ")]
    line = found[-1] if found else (lines[-1] if lines else "")
    return line if len(line) <= limit else line[:limit] + "…"


def _tiny_folder() -> str:
    """A tiny Llama saved in a temporary folder (removed at exit), for the examples above."""
    import atexit
    import shutil
    import tempfile

    from .testing import tiny_llama_model

    folder = tempfile.mkdtemp(prefix="qframe-lazy-")
    atexit.register(shutil.rmtree, folder, True)
    tiny_llama_model().save_pretrained(folder)
    return folder
