"""Helpers for people who write qframe plugins (and for qframe's own tests): fresh plugin
registries and tiny real models. Import what you need (``from qframe.testing import
make_registry, tiny_llama_model``); this module needs no pytest. Its pytest fixtures live in
:mod:`qframe.pytest_plugin`; load them in a test suite's ``conftest.py``::

    pytest_plugins = ["qframe.pytest_plugin"]

Fixtures:

``qframe_registry``
    A factory that builds a *fresh* plugin registry from the plugins you pass; nothing is
    registered in, or read from, the process-wide registry.
``tiny_llama``
    A randomly initialised two-layer Llama (hidden size 64), built in about 50 ms.

Example::

    import qframe
    from qframe import QuantizerPlugin
    from qframe.pipeline import Quantizer


    class Noop(Quantizer):
        def quantize_layer(self, work, targets):
            pass


    class MyPlugin:
        @qframe.hookimpl
        def qframe_quantizers():
            yield QuantizerPlugin(name="noop", summary="leaves every linear alone", factory=Noop)


    def test_noop_is_installed(qframe_registry):
        registry = qframe_registry(MyPlugin)
        assert registry.entry("quantizer", "noop").provider == "MyPlugin"
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Iterable

if TYPE_CHECKING:
    import torch

from .errors import PluginError
from .hookspecs import HOOKS, PROJECT
from .plugins import Registry, build_registry

__all__ = ["make_registry", "tiny_llama_config", "tiny_llama_model"]


def _unknown_hooks(plugin: object) -> list[str]:
    """Names of functions marked ``@qframe.hookimpl`` that match no qframe hook (typos)."""
    marker = f"{PROJECT}_impl"
    found = []
    for attr in dir(plugin):
        try:
            value = getattr(plugin, attr)
        except Exception:  # a property that raises is not a hook
            continue
        if getattr(value, marker, None) is not None and attr not in HOOKS.values():
            found.append(attr)
    return found


def make_registry(
    *plugins: object,
    builtins: bool = True,
    entry_points: bool = False,
    disabled: Iterable[str] = (),
    strict: bool = True,
) -> Registry:
    """Build a fresh :class:`qframe.plugins.Registry` holding ``plugins`` (modules, classes
    or objects with ``@qframe.hookimpl`` functions).

    By default the built-in plugins are included and installed entry points are not, so a
    test sees the same plugins on every machine. ``disabled`` blocks providers by name (a
    built-in by module, e.g. ``"qframe_plugins.rtn"``, an inline plugin by its
    ``__name__``); ``$QFRAME_DISABLE_PLUGINS`` is ignored. With ``strict`` (the default) a
    plugin whose hook raises or yields a bad record, or that marks a function whose name is
    no qframe hook, raises :class:`qframe.PluginError` instead of being reported in
    ``registry.failures``.

    Example::

        >>> from qframe.testing import make_registry
        >>> "rtn" in make_registry().names("quantizer")
        True
        >>> make_registry(builtins=False).names("quantizer")
        []
    """
    if strict:
        for plugin in plugins:
            typos = _unknown_hooks(plugin)
            if typos:
                name = getattr(plugin, "__name__", repr(plugin))
                raise PluginError(
                    f"plugin {name!r} marks {', '.join(typos)} with @qframe.hookimpl, which is no "
                    f"qframe hook; hooks: {', '.join(HOOKS.values())}"
                )
    registry = build_registry(builtins=builtins, entry_points=entry_points, plugins=plugins, disabled=tuple(disabled))
    if strict and registry.failures:
        raise PluginError("; ".join(str(f) for f in registry.failures))
    return registry


def tiny_llama_config(**overrides: Any):
    """A ``transformers.LlamaConfig`` small enough for unit tests: 2 layers, hidden size 64,
    4 attention heads over 2 key/value heads, MLP width 128, 256 tokens.

    Example::

        >>> tiny_llama_config(vocab_size=1000).num_hidden_layers
        2
    """
    from transformers import LlamaConfig

    values: dict[str, Any] = dict(
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=128,
        vocab_size=256,
        max_position_embeddings=512,
        tie_word_embeddings=False,
    )
    values.update(overrides)
    return LlamaConfig(**values)


def tiny_llama_model(*, seed: int = 0, **config: Any):
    """A randomly initialised ``LlamaForCausalLM`` in float32 and eval mode, the same for
    the same ``seed`` and config; the global random state is left as it was.

    Keyword arguments override :func:`tiny_llama_config` (e.g. ``vocab_size=49152`` to
    pair it with a real tokenizer).

    Example::

        >>> model = tiny_llama_model(seed=1)
        >>> len(model.model.layers), model.config.hidden_size
        (2, 64)
    """
    import torch
    from transformers import LlamaForCausalLM

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(tiny_llama_config(**config))
    model.config.use_cache = False
    return model.eval()


def random_tokens(n: int, length: int, vocab: int, seed: int = 0) -> "torch.Tensor":
    """Seeded random token ids ``[n, length]``, for calibration in tests.

    Example::

        >>> random_tokens(2, 3, vocab=10, seed=1).shape
        torch.Size([2, 3])
    """
    import torch

    return torch.randint(0, vocab, (n, length), generator=torch.Generator().manual_seed(seed))


def logits(model, ids) -> "torch.Tensor":
    """The model's logits for ``ids``, without autograd.

    Example::

        >>> logits(tiny_llama_model(vocab_size=64), random_tokens(1, 4, vocab=64)).shape
        torch.Size([1, 4, 64])
    """
    import torch

    with torch.inference_mode():
        return model(input_ids=ids).logits


def relative_error(a, b) -> float:
    """Mean squared difference relative to the mean square of the reference ``b``.

    Example::

        >>> import torch
        >>> relative_error(torch.tensor([1.0, 2.0]), torch.tensor([1.0, 1.0]))
        0.5
    """
    return float((a - b).pow(2).mean() / b.pow(2).mean())


def _tiny_configs() -> dict[str, Any]:
    """Config builders for :func:`tiny_model`: 2 layers, hidden size 32 to 64, 128 tokens."""
    import transformers as tf

    attn = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, vocab_size=128, max_position_embeddings=128)
    gemma = dict(attn, num_key_value_heads=2, head_dim=16, intermediate_size=96)

    def gemma3():
        vision = tf.SiglipVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                                       image_size=28, patch_size=14)
        return tf.Gemma3Config(text_config=tf.Gemma3TextConfig(**gemma), vision_config=vision, mm_tokens_per_image=4)

    return {
        "gpt2": lambda: tf.GPT2Config(n_embd=64, n_layer=2, n_head=4, vocab_size=128, n_positions=128,
                                      bos_token_id=0, eos_token_id=0),
        "gpt_neox": lambda: tf.GPTNeoXConfig(**attn, intermediate_size=128, bos_token_id=0, eos_token_id=0),
        "opt": lambda: tf.OPTConfig(**attn, ffn_dim=128, word_embed_proj_dim=64, bos_token_id=0, eos_token_id=0,
                                    pad_token_id=1),
        "phi3": lambda: tf.Phi3Config(**attn, num_key_value_heads=4, intermediate_size=96, pad_token_id=0,
                                      bos_token_id=0, eos_token_id=0),
        "gemma": lambda: tf.GemmaConfig(**dict(gemma, num_key_value_heads=4)),
        "gemma2": lambda: tf.Gemma2Config(**gemma),
        "gemma3_text": lambda: tf.Gemma3TextConfig(**gemma),
        "gemma3": gemma3,
        "falcon": lambda: tf.FalconConfig(**{k: v for k, v in attn.items() if k != "max_position_embeddings"},
                                          bos_token_id=0, eos_token_id=0),
        "bloom": lambda: tf.BloomConfig(hidden_size=64, n_layer=2, n_head=4, vocab_size=128, bos_token_id=0,
                                        eos_token_id=0),
    }


TINY_FAMILIES = ("gpt2", "gpt_neox", "opt", "phi3", "gemma", "gemma2", "gemma3_text", "gemma3", "falcon", "bloom")


def tiny_model(family: str, *, seed: int = 0):
    """A randomly initialised two-layer causal LM of ``family`` (one of :data:`TINY_FAMILIES`, a
    ``model_type``) with 128 tokens, in float32 and eval mode; the global random state is left
    as it was.

    Example::

        >>> model = tiny_model("gpt_neox")
        >>> type(model).__name__, model.config.num_hidden_layers
        ('GPTNeoXForCausalLM', 2)
    """
    import torch
    from transformers import AutoModelForCausalLM

    config = _tiny_configs()[family]()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config)
    model.config.use_cache = False
    return model.eval()


def assert_smoothing_groups_exact(model, arch, ids: "torch.Tensor | None" = None, seed: int = 0) -> None:
    """Assert that each of ``arch``'s smoothing groups is exact on every decoder layer of the
    (prepared) ``model``: scaling the producer's output channels by a random positive ``s``
    (``arch.fold_scale``) and the consumers' weight columns by ``1 / s`` leaves the layer's
    output unchanged.

    Example::

        >>> from qframe.model import find_architecture
        >>> model = tiny_llama_model(num_key_value_heads=4)
        >>> assert_smoothing_groups_exact(model, find_architecture(model, make_registry()))
    """
    import copy

    import torch
    from torch import nn

    layers = arch.decoder_layers(model)
    vocab = model.get_input_embeddings().num_embeddings
    ids = random_tokens(2, 12, vocab=vocab, seed=seed) if ids is None else ids
    seen: list[tuple[tuple, dict]] = []
    hooks = [layer.register_forward_pre_hook(lambda _m, a, kw: seen.append((a, kw)), with_kwargs=True) for layer in layers]
    try:
        logits(model, ids)
    finally:
        for hook in hooks:
            hook.remove()
    assert len(seen) == len(layers), "every decoder layer runs once"
    generator = torch.Generator().manual_seed(seed)
    first = lambda out: out[0] if isinstance(out, (tuple, list)) else out
    for index, (layer, (args, kwargs)) in enumerate(zip(layers, seen)):
        with torch.inference_mode():
            expected = first(layer(*args, **kwargs))
        for group in arch.smoothing_groups:
            trial = copy.deepcopy(layer)
            consumers = [trial.get_submodule(name) for name in group.consumers]
            assert all(isinstance(c, nn.Linear) for c in consumers), f"{group}: consumers must be nn.Linear"
            scale = torch.empty(consumers[0].in_features).uniform_(0.5, 2.0, generator=generator)
            arch.fold_scale(trial.get_submodule(group.producer), scale)
            with torch.no_grad():
                for linear in consumers:
                    linear.weight.div_(scale)
            with torch.inference_mode():
                got = first(trial(*args, **kwargs))
            assert torch.allclose(got, expected, rtol=1e-4, atol=1e-5 * float(expected.abs().max())), \
                f"layer {index}: {group} is not exact (max difference {float((got - expected).abs().max()):.3g})"


def tiny_llama_with_outliers(**config: Any):
    """:func:`tiny_llama_model` whose norms amplify one channel x50 before attention and before
    the MLP: the activation outliers that SmoothQuant and AWQ exist for.

    Example::

        >>> model = tiny_llama_with_outliers()
        >>> float(model.model.layers[0].input_layernorm.weight[5])
        50.0
    """
    import torch

    model = tiny_llama_model(**config)
    with torch.no_grad():
        for layer in model.model.layers:
            layer.input_layernorm.weight[5] *= 50
            layer.post_attention_layernorm.weight[9] *= 50
    return model
