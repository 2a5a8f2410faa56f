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
    """Config builders for :func:`tiny_model`: 2 layers, hidden size 32 to 64, 128 tokens; the
    mixtures of experts have 4 or 8 experts, top 2."""
    import transformers as tf

    attn = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, vocab_size=128, max_position_embeddings=128)
    gemma = dict(attn, num_key_value_heads=2, head_dim=16, intermediate_size=96)
    moe = dict(attn, num_experts_per_tok=2, pad_token_id=0, bos_token_id=0, eos_token_id=0, tie_word_embeddings=False)

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
        # Mixtures of experts: 8 (DeepSeek-V3, gpt-oss) or 4 fused experts of width 32, top 2. Grouped-query
        # attention where the real models have it (Mixtral, Qwen3-MoE, gpt-oss); Qwen2-MoE without it, so v -> o
        # is tested, and with a dense first layer (mlp_only_layers), like DeepSeek-V3's first_k_dense_replace.
        "mixtral": lambda: tf.MixtralConfig(**moe, num_key_value_heads=2, intermediate_size=32, num_local_experts=4),
        "qwen2_moe": lambda: tf.Qwen2MoeConfig(**moe, num_key_value_heads=4, intermediate_size=96, moe_intermediate_size=32,
                                               shared_expert_intermediate_size=48, num_experts=4, norm_topk_prob=True,
                                               mlp_only_layers=[0]),
        "qwen3_moe": lambda: tf.Qwen3MoeConfig(**moe, num_key_value_heads=2, head_dim=16, intermediate_size=96,
                                               moe_intermediate_size=32, num_experts=4, norm_topk_prob=True),
        "deepseek_v3": lambda: tf.DeepseekV3Config(**moe, num_key_value_heads=4, intermediate_size=96,
                                                   moe_intermediate_size=32, n_routed_experts=8, n_shared_experts=1,
                                                   n_group=2, topk_group=1, first_k_dense_replace=1, q_lora_rank=32,
                                                   kv_lora_rank=16, qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=16,
                                                   head_dim=8),
        "gpt_oss": lambda: tf.GptOssConfig(**moe, num_key_value_heads=2, head_dim=16, intermediate_size=32,
                                           num_local_experts=8, sliding_window=8,
                                           rope_parameters={"rope_type": "default", "rope_theta": 10000.0}),
    }


TINY_FAMILIES = ("gpt2", "gpt_neox", "opt", "phi3", "gemma", "gemma2", "gemma3_text", "gemma3", "falcon", "bloom",
                 "mixtral", "qwen2_moe", "qwen3_moe", "deepseek_v3", "gpt_oss")
# The mixtures of experts among them (fused 3-D expert weights in transformers 5).
TINY_MOE_FAMILIES = ("mixtral", "qwen2_moe", "qwen3_moe", "deepseek_v3", "gpt_oss")


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
    output unchanged. A group naming modules a layer lacks (a dense-MLP group in a layer of
    experts) is skipped in that layer, as the smoothing algorithms skip it.

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
            if not all(_has_submodule(layer, name) for name in (group.producer, *group.consumers)):
                continue  # e.g. a dense-MLP group in an MoE layer: the algorithms skip it there too
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


def _has_submodule(module, name: str) -> bool:
    try:
        return module.get_submodule(name) is not None
    except AttributeError:
        return False


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


MOE_FROM_DENSE = ("mixtral", "qwen2_moe")


def moe_from_dense(dense, family: str = "mixtral", *, num_experts: int = 4, top_k: int = 2, seed: int = 0,
                   router_std: float = 1.0):
    """A mixture of experts that computes exactly what the dense Llama-family ``dense`` does:
    the same embeddings, attention, norms and head; each layer's MLP copied into every expert;
    a random router (normal, ``router_std``) choosing ``top_k`` of ``num_experts``. The routing
    weights of the chosen experts sum to 1 per token (Mixtral normalizes its top-k; Qwen2-MoE's
    ``norm_topk_prob`` is set), so the layer's output is ``Σ w_k · MLP(x) = MLP(x)``; Qwen2-MoE's
    shared expert and its sigmoid gate are zero, so they add nothing. The logits equal the
    dense model's up to float rounding, and so does the perplexity: a model whose function is
    known, to measure what quantizing fused experts costs on real weights.

    ``family`` is ``"mixtral"`` (``MixtralForCausalLM``) or ``"qwen2_moe"``
    (``Qwen2MoeForCausalLM``). The experts hold transformers 5's fused layout:
    ``gate_up_proj [E, 2I, H]`` is ``cat(gate_proj, up_proj)`` along the rows (the model splits
    it with ``chunk(2)``: gate first), ``down_proj [E, H, I]`` is ``down_proj.weight``. The
    result has ``dense``'s dtype, is in eval mode, and ``dense`` is not changed.

    Example::

        >>> import torch
        >>> dense = tiny_llama_model()
        >>> moe = moe_from_dense(dense, "qwen2_moe")
        >>> ids = random_tokens(1, 8, vocab=256)
        >>> type(moe).__name__, torch.allclose(logits(moe, ids), logits(dense, ids), atol=1e-5)
        ('Qwen2MoeForCausalLM', True)
    """
    import torch
    import transformers as tf

    if family not in MOE_FROM_DENSE:
        raise ValueError(f"moe_from_dense builds {', '.join(MOE_FROM_DENSE)}, not {family!r}")
    if not 1 <= top_k <= num_experts:
        raise ValueError(f"top_k must be between 1 and num_experts ({num_experts}), not {top_k}")
    c = dense.config
    if getattr(c, "attention_bias", False) or getattr(c, "mlp_bias", False):
        raise ValueError("moe_from_dense needs a dense model without attention or MLP biases (Llama, SmolLM2)")
    common = dict(
        vocab_size=c.vocab_size, hidden_size=c.hidden_size, num_hidden_layers=c.num_hidden_layers,
        num_attention_heads=c.num_attention_heads, num_key_value_heads=c.num_key_value_heads,
        hidden_act=c.hidden_act, max_position_embeddings=c.max_position_embeddings, rms_norm_eps=c.rms_norm_eps,
        rope_parameters=dict(c.rope_parameters), tie_word_embeddings=c.tie_word_embeddings,
        num_experts_per_tok=top_k, pad_token_id=c.pad_token_id, bos_token_id=c.bos_token_id,
        eos_token_id=c.eos_token_id,
    )
    width = c.intermediate_size
    if family == "mixtral":
        config = tf.MixtralConfig(**common, head_dim=getattr(c, "head_dim", None), intermediate_size=width,
                                  num_local_experts=num_experts, sliding_window=None)
    else:
        # The shared expert's width does not matter (it is zero); 1 keeps it small.
        config = tf.Qwen2MoeConfig(**common, intermediate_size=width, moe_intermediate_size=width,
                                   shared_expert_intermediate_size=1, num_experts=num_experts, norm_topk_prob=True,
                                   qkv_bias=False, mlp_only_layers=[], decoder_sparse_step=1, use_sliding_window=False)
    head_dim = lambda cfg: getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    if head_dim(config) != head_dim(c):  # Qwen2-MoE derives it from the hidden size
        raise ValueError(f"{family} cannot hold {type(dense).__name__}'s head_dim {head_dim(c)}")
    dtype = next(dense.parameters()).dtype
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        moe = tf.AutoModelForCausalLM.from_config(config, dtype=dtype)
        routers = [torch.randn(num_experts, c.hidden_size) * router_std for _ in range(c.num_hidden_layers)]
    state = {}
    for name, tensor in dense.state_dict().items():
        if ".mlp." not in name:
            state[name] = tensor
    for index, layer in enumerate(dense.model.layers):
        prefix = f"model.layers.{index}.mlp"
        gate, up, down = (getattr(layer.mlp, p).weight.detach() for p in ("gate_proj", "up_proj", "down_proj"))
        state[f"{prefix}.gate.weight"] = routers[index].to(dtype)
        state[f"{prefix}.experts.gate_up_proj"] = torch.cat([gate, up]).unsqueeze(0).repeat(num_experts, 1, 1)
        state[f"{prefix}.experts.down_proj"] = down.unsqueeze(0).repeat(num_experts, 1, 1)
        if family == "qwen2_moe":
            shared = moe.model.layers[index].mlp
            for key, param in [*shared.shared_expert.named_parameters(prefix="shared_expert"),
                               *shared.shared_expert_gate.named_parameters(prefix="shared_expert_gate")]:
                state[f"{prefix}.{key}"] = torch.zeros_like(param)
    if c.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    missing, unexpected = moe.load_state_dict(state, strict=False)
    missing = [m for m in missing if not (c.tie_word_embeddings and m == "lm_head.weight")]
    if missing or unexpected:
        raise ValueError(f"moe_from_dense: weights missing {missing[:5]}, unexpected {unexpected[:5]}")
    moe.config.use_cache = False
    return moe.eval()


def output_files(directory: "str | Path") -> dict[str, str]:
    """Every file qframe wrote under ``directory`` (relative path → sha256), but the two that
    record times (``qframe.json``, ``.qframe-files.json``)."""
    import hashlib
    from pathlib import Path

    directory = Path(directory)
    return {p.relative_to(directory).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(directory.rglob("*"))
            if p.is_file() and p.name not in ("qframe.json", ".qframe-files.json")}


def without_timings(manifest: Any) -> Any:
    """``manifest`` (a loaded ``qframe.json``) without what differs from run to run: timings
    and the model's location."""
    if isinstance(manifest, dict):
        return {k: without_timings(v) for k, v in manifest.items() if k not in ("timings", "seconds", "model")}
    return [without_timings(v) for v in manifest] if isinstance(manifest, list) else manifest


def streamed_and_in_memory(model: str, recipe: str, out: "str | Path", overrides: list[str],
                           backend: str = "qframe", device: str = "cpu") -> list[str]:
    """Run ``recipe`` on the local ``model`` (a folder or ``.gguf``) with ``backend`` both ways
    and return the files whose bytes differ (none, when the streamed path is right):

    - streamed: ``qframe.apply`` reads the model a layer at a time and writes as layers finish;
    - in memory: the whole model loaded, :func:`qframe.quantize`, saved with ``save_native``
      and exported with :func:`qframe.export`.

    The manifests must agree too, but for their timings (else ``qframe.json`` is listed).

    Example::

        >>> streamed_and_in_memory("model-dir", "recipes/fp8.toml", "out", [], "hf")  # doctest: +SKIP
        []
    """
    import json
    import warnings
    from pathlib import Path

    import qframe
    from qframe.api import export_subdirectory
    from qframe.checkpoint import save_native
    from qframe.model import load_model, resolve_source
    from qframe.recipe import load_recipe

    out = Path(out)
    sets = [*overrides, f'export.backend="{backend}"']
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        qframe.apply(recipe, model=str(model), output=out / "streamed", overrides=sets, device=device)
        loaded = load_model(resolve_source(str(model)))
        qmodel = qframe.quantize(loaded.model, load_recipe(recipe, sets), tokenizer=loaded.tokenizer, device=device)
        save_native(qmodel, out / "memory")
        if backend != "qframe":
            qframe.export(qmodel, backend, out / "memory" / export_subdirectory(backend))
    ours, theirs = output_files(out / "streamed"), output_files(out / "memory")
    differ = sorted(k for k in ours.keys() | theirs.keys() if ours.get(k) != theirs.get(k))
    manifests = [json.loads((out / d / "qframe.json").read_text()) for d in ("streamed", "memory")]
    return differ + (["qframe.json"] if without_timings(manifests[0]) != without_timings(manifests[1]) else [])
