"""The quantized KV cache on the tensors the attention caches (``qframe.kvcache``): keys after
RoPE (and ``k_norm``), values as cached, for every family the adapters know and every attention
implementation; the same scales as modelopt's ``k_bmm_quantizer``/``v_bmm_quantizer``; the
native checkpoint; what evaluation computes; and the export of the scales beside modelopt's."""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import qframe
from qframe import numerics
from qframe.checkpoint import load_native, save_native
from qframe.errors import ModelError, QFrameError, RecipeError
from qframe.kvcache import FP8, INT8, KVCacheQuant, attach, cache_quantizers, observing
from qframe.pipeline import check_plan
from qframe.plugins import default_registry
from qframe.recipe import parse_recipe, resolve
from qframe.testing import logits, random_tokens, tiny_llama_model, tiny_model

from peer import run_peer_script

FAMILIES = ("gpt2", "gpt_neox", "opt", "phi3", "gemma", "gemma2", "gemma3_text", "gemma3")


def kv_stage(fmt: str = "e4m3", shared: bool | None = None, **more) -> dict:
    acts = {"bits": 8} if fmt == "int8" else {"type": "float", "bits": 8, "format": fmt}
    stage = {"quantizer": "kv_cache", "activations": acts, **more}
    if shared is not None:
        stage["options"] = {"shared": shared}
    return stage


def kv_recipe(*stages: dict, propagate: str = "float", batch_size: int = 2):
    return parse_recipe({"calibration": {"propagate": propagate, "batch_size": batch_size},
                         "stage": list(stages) or [kv_stage()]})


def quantize_kv(model, ids, *stages: dict, device: str = "cpu", **calibration):
    return qframe.quantize(model, kv_recipe(*stages, **calibration), calibration=ids, device=device)


def tiny_qwen3(seed: int = 0):
    """A two-layer random Qwen3 (q_norm/k_norm on each head) whose k_norm weights are random too,
    so that keys before and after it differ."""
    from transformers import Qwen3Config, Qwen3ForCausalLM

    config = Qwen3Config(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         head_dim=16, intermediate_size=128, vocab_size=256, max_position_embeddings=256,
                         tie_word_embeddings=False)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = Qwen3ForCausalLM(config)
        with torch.no_grad():
            for layer in model.model.layers:
                layer.self_attn.k_norm.weight.uniform_(0.5, 3.0)
    model.config.use_cache = False
    return model.eval()


MODELS = {"llama": lambda: tiny_llama_model(hidden_size=64, intermediate_size=128), "qwen3": tiny_qwen3}


def scales(model) -> list[tuple[float, float]]:
    return [(float(c.k_scale), float(c.v_scale)) for c in cache_quantizers(model).values()]


def flat(pairs: list[tuple[float, float]]) -> list[float]:
    return [x for pair in pairs for x in pair]


def by_hand(model, ids) -> list[dict[str, float]]:
    """Per layer: the largest magnitude of the keys recomputed from k_proj, k_norm and the rotary
    tables (what the attention caches), of those keys before RoPE, and of the values."""
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    seen = []

    def grab(attention, args, kwargs):
        hidden = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
        seen.append((attention, hidden, kwargs["position_embeddings"]))

    hooks = [layer.self_attn.register_forward_pre_hook(grab, with_kwargs=True) for layer in model.model.layers]
    try:
        logits(model, ids)
    finally:
        for hook in hooks:
            hook.remove()
    found = []
    with torch.inference_mode():
        for attention, hidden, (cos, sin) in seen:
            shape = (*hidden.shape[:-1], -1, attention.head_dim)
            keys = attention.k_proj(hidden).view(shape)
            before_rope = keys
            if hasattr(attention, "k_norm"):
                keys = attention.k_norm(keys)
            keys = keys.transpose(1, 2)
            _, keys = apply_rotary_pos_emb(torch.zeros_like(keys), keys, cos, sin)
            values = attention.v_proj(hidden).view(shape)
            found.append({"k": float(keys.abs().amax()), "pre_rope": float(before_rope.abs().amax()),
                          "v": float(values.abs().amax())})
    return found


# -- what is calibrated: the cached tensors ------------------------------------------------------

def rope_sensitive(model):
    """``model`` with each key head's channels 0 and ``head_dim / 2`` (the pair RoPE rotates
    fastest) made equal and large: after RoPE their largest magnitude grows by up to √2, so the
    largest key before and after RoPE differ."""
    with torch.no_grad():
        for layer in model.model.layers:
            attention = layer.self_attn
            weight, dim = attention.k_proj.weight, attention.head_dim
            for head in range(weight.shape[0] // dim):
                weight[head * dim] *= 10
                weight[head * dim + dim // 2] = weight[head * dim]
    return model


@pytest.mark.parametrize("family", list(MODELS))
def test_scales_are_the_amax_of_post_rope_keys_and_values(family):
    model = rope_sensitive(MODELS[family]())
    ids = random_tokens(4, 24, vocab=256, seed=1)
    expected = by_hand(model, ids)
    quantize_kv(model, ids)
    got = scales(model)
    assert len(got) == len(expected) == 2
    for (k_scale, v_scale), want in zip(got, expected):
        assert k_scale * 448 == pytest.approx(want["k"], rel=1e-5)
        assert v_scale * 448 == pytest.approx(want["v"], rel=1e-5)
        # the recomputation tells the tensors apart: the keys before RoPE (and k_norm) are others
        assert abs(want["pre_rope"] - want["k"]) > 0.1 * want["k"]


def probe_attention(name: str, keys: dict[int, list[torch.Tensor]], original: str = "sdpa") -> None:
    """Register an attention implementation ``name`` in transformers' global interfaces: it
    records the keys and values it is handed per layer, then runs the ``original`` one."""
    import inspect

    from transformers import AttentionInterface, AttentionMaskInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    def attention(module, query, key, value, *args, **kwargs):
        keys.setdefault(module.layer_idx, []).append((key.detach().clone(), value.detach().clone()))
        run = (inspect.getmodule(type(module)).eager_attention_forward if original == "eager"
               else ALL_ATTENTION_FUNCTIONS[original])
        return run(module, query, key, value, *args, **kwargs)

    AttentionInterface.register(name, attention)
    AttentionMaskInterface.register(name, ALL_MASK_ATTENTION_FUNCTIONS[original])


@pytest.mark.parametrize("family", FAMILIES)
def test_every_family_gets_a_cache_calibrated_on_what_its_attention_is_handed(family):
    """Fused q/k/v families (Phi-3, GPT-NeoX, GPT-2) included: the scales are the amax of the keys
    and values each layer hands its attention function (recorded by an implementation of its
    own), and evaluation changes the logits."""
    model = tiny_model(family)
    vocab = model.get_input_embeddings().num_embeddings
    ids = random_tokens(4, 16, vocab=vocab, seed=2)
    handed: dict[int, list] = {}
    probe = copy.deepcopy(model)
    implementation = model.config._attn_implementation  # eager for Gemma 2 and 3 (softcapping)
    probe_attention(f"qframe_probe_{implementation}", handed, implementation)
    probe.set_attn_implementation(f"qframe_probe_{implementation}")
    logits(probe, ids)
    before = logits(model, ids)
    quantize_kv(model, ids)
    caches = cache_quantizers(model)
    assert len(caches) == 2 and len(handed) == 2
    for (k_scale, v_scale), index in zip(scales(model), sorted(handed)):
        k_amax = max(float(k.abs().amax()) for k, _ in handed[index])
        v_amax = max(float(v.abs().amax()) for _, v in handed[index])
        assert k_scale * 448 == pytest.approx(k_amax, rel=1e-5), family
        assert v_scale * 448 == pytest.approx(v_amax, rel=1e-5), family
    after = logits(model, ids)
    assert torch.isfinite(after).all() and not torch.equal(after, before)


def test_an_adapter_without_attention_is_refused_before_calibration():
    model = tiny_model("falcon")  # served by the structural fallback, which names no attention
    plan = resolve(kv_recipe(), default_registry())
    with pytest.raises(QFrameError, match="attention_path"):
        check_plan(model, plan, default_registry())


# -- side by side with modelopt ----------------------------------------------------------------

MODELOPT = """
import contextlib, io, json, warnings
import torch
warnings.simplefilter("ignore")
import modelopt.torch.quantization as mtq
from modelopt.torch.export import export_hf_checkpoint, export_tensorrt_llm_checkpoint
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

jobs = json.loads((directory / "jobs.json").read_text())
kv_only = {"quant_cfg": [{"quantizer_name": "*", "enable": False}, *mtq.FP8_KV_CFG["quant_cfg"]], "algorithm": "max"}
fp8 = {**mtq.FP8_DEFAULT_CFG, "quant_cfg": list(mtq.FP8_DEFAULT_CFG["quant_cfg"]) + list(mtq.FP8_KV_CFG["quant_cfg"])}
for name, job in jobs.items():
    model = AutoModelForCausalLM.from_pretrained(directory / name, dtype=torch.float32).eval()
    ids = load_file(str(directory / name / "ids.safetensors"))["ids"]

    def calibrate(m):
        with torch.no_grad():
            for batch in ids.split(job["batch_size"]):
                m(input_ids=batch, use_cache=False)

    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        model = mtq.quantize(model, fp8 if job["export"] else kv_only, calibrate)
        amax = {}
        for module_name, module in model.named_modules():
            if hasattr(module, "k_bmm_quantizer"):
                amax[module_name + ".k"] = module.k_bmm_quantizer.amax.detach().float().reshape(())
                amax[module_name + ".v"] = module.v_bmm_quantizer.amax.detach().float().reshape(())
        save_file(amax, str(directory / name / "amax.safetensors"))
        if job["export"]:
            export_hf_checkpoint(model, export_dir=directory / name / "hf")
            export_tensorrt_llm_checkpoint(model, "llama", torch.float16, directory / name / "trt",
                                           inference_tensor_parallel=1)
"""


def save_plain(model, folder: Path, ids: torch.Tensor) -> None:
    """A model folder the peer loads (a GGUF-loaded model refuses save_pretrained), with ``ids``."""
    from safetensors.torch import save_model

    folder.mkdir(parents=True)
    config = copy.deepcopy(model.config)
    config.architectures = [type(model).__name__]  # modelopt's export reads it
    config.save_pretrained(folder)
    save_model(model, str(folder / "model.safetensors"), metadata={"format": "pt"})
    save_file({"ids": ids.contiguous()}, str(folder / "ids.safetensors"))


def modelopt_amax(folder: Path, jobs: dict[str, dict]) -> dict[str, dict[str, torch.Tensor]]:
    """modelopt's k/v_bmm_quantizer amax for each model folder of ``jobs`` (one peer process)."""
    (folder / "jobs.json").write_text(json.dumps(jobs))
    run_peer_script(MODELOPT, folder)
    return {name: load_file(str(folder / name / "amax.safetensors")) for name in jobs}


def wide_llama():
    """A tiny Llama whose keys and values reach beyond 448: modelopt's TensorRT-LLM export clamps
    FP8 KV scales below 1 up to 1, so only caches this wide compare unclamped."""
    model = tiny_llama_model(hidden_size=64, intermediate_size=128, seed=4)
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.k_proj.weight.mul_(3000)
            layer.self_attn.v_proj.weight.mul_(3000)
    return model


@pytest.fixture(scope="module")
def peer_runs(tmp_path_factory):
    """qframe's and modelopt's FP8 KV caches of the same models on the same windows: KV only
    (llama, qwen3), and FP8 weights + FP8 KV with both exports (llama, wide llama)."""
    folder = tmp_path_factory.mktemp("kv-modelopt")
    ids = random_tokens(4, 32, vocab=256, seed=3)
    makers = {"llama": MODELS["llama"], "qwen3": tiny_qwen3, "llama-fp8": MODELS["llama"], "wide-fp8": wide_llama}
    jobs = {name: {"batch_size": 2, "export": name.endswith("-fp8")} for name in makers}
    models = {name: make() for name, make in makers.items()}
    for name, model in models.items():
        save_plain(model, folder / name, ids)
    theirs = modelopt_amax(folder, jobs)
    ours = {}
    for name, model in models.items():
        # The cache stage first, so it calibrates on the float layer as modelopt does (its
        # quantizers do not quantize while they calibrate); then FP8 weights and inputs.
        fp8 = {"quantizer": "fp8", "weights": {"type": "float", "bits": 8, "granularity": "tensor"},
               "activations": {"type": "float", "bits": 8}}
        stages = [kv_stage(), fp8] if jobs[name]["export"] else [kv_stage()]
        ours[name] = quantize_kv(model, ids, *stages)
    return folder, ours, theirs


@pytest.mark.parametrize("name", ["llama", "qwen3", "llama-fp8", "wide-fp8"])
def test_scales_equal_modelopts_k_and_v_bmm_quantizers(peer_runs, name):
    _, ours, theirs = peer_runs
    caches = cache_quantizers(ours[name].model)
    assert len(caches) == 2
    for attention, cache in caches.items():
        k, v = float(theirs[name][f"{attention}.k"]), float(theirs[name][f"{attention}.v"])
        assert float(cache.k_scale) * 448 == pytest.approx(k, rel=0.01), attention
        assert float(cache.v_scale) * 448 == pytest.approx(v, rel=0.01), attention


@pytest.mark.parametrize("name", ["llama-fp8", "wide-fp8"])
def test_exported_hf_kv_scales_equal_modelopts(peer_runs, name, tmp_path):
    """hf: ``self_attn.k_proj.k_scale`` and ``v_proj.v_scale`` (amax / 448), as modelopt's
    ``export_hf_checkpoint`` writes them."""
    folder, ours, _ = peer_runs
    qframe.export(ours[name], "hf", tmp_path / "hf")
    mine = load_file(str(tmp_path / "hf" / "model.safetensors"))
    reference = {}
    for file in (folder / name / "hf").glob("*.safetensors"):
        reference.update(load_file(str(file)))
    names = [n for n in reference if n.endswith((".k_scale", ".v_scale"))]
    assert len(names) == 4
    for tensor in names:
        assert tensor in mine, tensor
        assert float(mine[tensor]) == pytest.approx(float(reference[tensor]), rel=0.01), tensor


@pytest.mark.parametrize("name", ["llama-fp8", "wide-fp8"])
def test_exported_tensorrt_llm_kv_scale_equals_modelopts(peer_runs, name, tmp_path):
    """tensorrt-llm: one ``kv_cache_scaling_factor`` per layer, max(k, v) as modelopt's
    ``export_tensorrt_llm_checkpoint`` writes it. modelopt raises an FP8 scale below 1 to 1 (its
    serving policy): equal to qframe's where the cache reaches beyond 448 (``wide-fp8``)."""
    folder, ours, _ = peer_runs
    with pytest.warns(UserWarning, match=r"options\.shared = true"):  # K and V have a scale each here
        qframe.export(ours[name], "tensorrt-llm", tmp_path / "trt")
    mine = load_file(str(tmp_path / "trt" / "rank0.safetensors"))
    reference = load_file(str(folder / name / "trt" / "rank0.safetensors"))
    names = [n for n in reference if n.endswith("kv_cache_scaling_factor")]
    assert len(names) == 2
    for tensor, (k_scale, v_scale) in zip(sorted(names), scales(ours[name].model)):
        theirs = float(reference[tensor])
        assert theirs == pytest.approx(max(k_scale, v_scale, 1.0), rel=0.01)
        if name == "wide-fp8":
            assert float(mine[tensor]) == pytest.approx(theirs, rel=0.01), tensor


def test_a_shared_cache_exports_to_tensorrt_llm_as_evaluated(tmp_path):
    """With ``shared = true`` TensorRT-LLM's one ``kv_cache_scaling_factor`` per layer is the scale
    qframe evaluated K and V with: no warning, and the same number."""
    import warnings

    fp8 = {"quantizer": "fp8", "weights": {"type": "float", "bits": 8, "granularity": "tensor"},
           "activations": {"type": "float", "bits": 8}}
    qmodel = quantize_kv(tiny_llama_model(), random_tokens(2, 16, vocab=256), kv_stage(shared=True), fp8)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        qframe.export(qmodel, "tensorrt-llm", tmp_path / "trt")
    tensors = load_file(str(tmp_path / "trt" / "rank0.safetensors"))
    for index, (k_scale, v_scale) in enumerate(scales(qmodel.model)):
        assert k_scale == v_scale
        assert float(tensors[f"transformer.layers.{index}.attention.kv_cache_scaling_factor"]) == k_scale


@pytest.mark.slow
def test_smollm2_scales_equal_modelopts(smollm2_float32, tmp_path):
    """The real SmolLM2-135M (30 layers, 3 KV heads), in float32, on the same 4 windows of 128
    tokens: every layer's k and v scale within 1 % of modelopt's amax / 448."""
    import copy

    model = copy.deepcopy(smollm2_float32.model)
    ids = random_tokens(4, 128, vocab=49152, seed=5)
    save_plain(model, tmp_path / "smollm2", ids)
    theirs = modelopt_amax(tmp_path, {"smollm2": {"batch_size": 2, "export": False}})["smollm2"]
    quantize_kv(model, ids)
    caches = cache_quantizers(model)
    assert len(caches) == 30
    worst = 0.0
    for attention, cache in caches.items():
        for role, scale in (("k", cache.k_scale), ("v", cache.v_scale)):
            reference = float(theirs[f"{attention}.{role}"])
            worst = max(worst, abs(float(scale) * 448 / reference - 1))
    print(f"SmolLM2: largest relative difference of a k/v scale from modelopt's over 30 layers: {worst:.2e}")
    assert worst < 0.01


# -- what evaluation computes ----------------------------------------------------------------------

def reference_attention(name: str, fake: dict[int, tuple[torch.Tensor, torch.Tensor, object]]) -> None:
    """An implementation ``name`` that fake-quantizes keys and values by hand, then runs sdpa."""
    from transformers import AttentionInterface, AttentionMaskInterface
    from transformers.integrations.sdpa_attention import sdpa_attention_forward
    from transformers.masking_utils import sdpa_mask

    def attention(module, query, key, value, *args, **kwargs):
        k_scale, v_scale, args_ = fake[module.layer_idx]
        key = numerics.fake_quantize(key, k_scale, None, args_)
        value = numerics.fake_quantize(value, v_scale, None, args_)
        return sdpa_attention_forward(module, query, key, value, *args, **kwargs)

    AttentionInterface.register(name, attention)
    AttentionMaskInterface.register(name, sdpa_mask)


@pytest.mark.parametrize("fmt, shared", [("e4m3", False), ("e5m2", True), ("int8", False), ("int8", True)])
def test_a_cache_changes_the_logits_exactly_by_the_fake_quantization_of_k_and_v(fmt, shared):
    model = tiny_qwen3()
    ids = random_tokens(4, 24, vocab=256, seed=6)
    float_model = copy.deepcopy(model)
    quantize_kv(model, ids, kv_stage(fmt, shared=shared))
    fake = {i: (c.k_scale.clone(), c.v_scale.clone(), c.args) for i, c in enumerate(cache_quantizers(model).values())}
    reference_attention(f"qframe_reference_{fmt}_{shared}", fake)
    float_model.set_attn_implementation(f"qframe_reference_{fmt}_{shared}")
    assert torch.equal(logits(model, ids), logits(float_model, ids))
    assert not torch.equal(logits(model, ids), logits(copy.deepcopy(model).apply(_drop_caches), ids))


def _drop_caches(module):
    module._modules.pop("kv_cache_quant", None)


def test_eager_sdpa_and_a_registered_implementation_all_see_the_quantized_cache():
    ids = random_tokens(4, 24, vocab=256, seed=7)
    eager = tiny_llama_model()
    eager.set_attn_implementation("eager")
    quantize_kv(eager, ids)
    sdpa = tiny_llama_model()
    quantize_kv(sdpa, ids)
    assert flat(scales(eager)) == pytest.approx(flat(scales(sdpa)), rel=1e-5)
    # once quantized, any implementation the model is switched to is handed the quantized cache
    handed: dict[int, list] = {}
    probe_attention("qframe_probe_after", handed)
    sdpa.set_attn_implementation("qframe_probe_after")
    logits(sdpa, ids)
    for (k_scale, v_scale), index in zip(scales(sdpa), sorted(handed)):
        for key, value in handed[index]:
            assert torch.equal(numerics.fake_quantize(key, torch.tensor(k_scale), None, FP8), key)
            assert torch.equal(numerics.fake_quantize(value, torch.tensor(v_scale), None, FP8), value)


@pytest.mark.filterwarnings("ignore:`past_key_values` is deprecated:FutureWarning")  # transformers 5.24; 5.17 has no `cache`
def test_decoding_with_a_cache_serves_the_same_quantized_cache():
    """Token by token with transformers' DynamicCache: the last logits equal one full forward's
    (re-quantizing the cached keys and values with the same static scale changes nothing)."""
    model = tiny_llama_model()
    ids = random_tokens(4, 16, vocab=256, seed=8)
    quantize_kv(model, ids)
    full = logits(model, ids)[:, -1]
    with torch.inference_mode():
        out = model(input_ids=ids[:, :10], use_cache=True)
        for t in range(10, 16):
            out = model(input_ids=ids[:, t:t + 1], past_key_values=out.past_key_values, use_cache=True)
    assert torch.allclose(out.logits[:, -1], full, atol=1e-4, rtol=1e-4)


def test_shared_scales_come_from_the_joint_range():
    ids = random_tokens(4, 24, vocab=256, seed=9)
    apart, joint = tiny_llama_model(), tiny_llama_model()
    quantize_kv(apart, ids, kv_stage("int8"))
    quantize_kv(joint, ids, kv_stage("int8", shared=True))
    for (k, v), (jk, jv) in zip(scales(apart), scales(joint)):
        assert k != v and jk == jv == max(k, v)
    assert all(not c.shared for c in cache_quantizers(apart).values())
    assert all(c.shared for c in cache_quantizers(joint).values())


def test_casting_the_model_keeps_the_scales_in_float32():
    model = tiny_llama_model()
    quantize_kv(model, random_tokens(2, 16, vocab=256))
    before = [c.k_scale.clone() for c in cache_quantizers(model).values()]
    model.half()
    model.to(torch.bfloat16)
    after = [c.k_scale for c in cache_quantizers(model).values()]
    assert all(a.dtype == torch.float32 and torch.equal(a, b) for a, b in zip(after, before))


@pytest.mark.parametrize("device", ["cpu", "cuda"])
def test_calibration_and_evaluation_on_the_device(device):
    if device == "cuda" and not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    ids = random_tokens(4, 24, vocab=256, seed=10)
    on_cpu, on_device = tiny_llama_model(), tiny_llama_model()
    quantize_kv(on_cpu, ids)
    quantize_kv(on_device, ids, device=device)
    assert flat(scales(on_device)) == pytest.approx(flat(scales(on_cpu)), rel=1e-4)
    assert all(c.k_scale.device.type == "cpu" for c in cache_quantizers(on_device).values())  # back home
    on_device.to(device)
    assert all(c.k_scale.device.type == device for c in cache_quantizers(on_device).values())
    got = logits(on_device, ids.to(device)).cpu()
    assert torch.allclose(got, logits(on_cpu, ids), atol=1e-3)


# -- the recipe: targets, options, what it will produce -----------------------------------------------

def test_check_plan_says_which_caches_the_stage_will_produce():
    model, registry = tiny_llama_model(), default_registry()
    plan = resolve(kv_recipe({"quantizer": "rtn", "weights": {"bits": 4}}, kv_stage(shared=True,
                                                                                     ignore=["model.layers.0.*"])),
                   registry)
    description = check_plan(model, plan, registry).description
    assert list(description.caches) == [1]
    cache = description.caches[1]
    assert (cache.attention, cache.args.name, cache.shared, cache.stage) == \
        ("model.layers.1.self_attn", "e4m3", True, "stage[1] (kv_cache)")
    # the kv_cache stage leaves the linears to the weight stage, before or after it
    assert description.linears["model.layers.1.self_attn.k_proj"].weights.name == "int4"


def test_ignore_leaves_a_layers_cache_in_float():
    model = tiny_llama_model()
    quantize_kv(model, random_tokens(2, 16, vocab=256), kv_stage(ignore=["model.layers.0.*"]))
    assert list(cache_quantizers(model)) == ["model.layers.1.self_attn"]


def test_targets_that_reach_no_attention_are_refused_before_calibration():
    registry = default_registry()
    plan = resolve(kv_recipe(kv_stage(targets=["*.mlp.*"])), registry)
    with pytest.raises(RecipeError, match=r"stage\[0\]\.targets.*would quantize nothing"):
        check_plan(tiny_llama_model(), plan, registry)


def test_a_weight_stage_after_the_cache_stage_still_quantizes_k_and_v_proj():
    model = tiny_llama_model()
    qmodel = quantize_kv(model, random_tokens(2, 16, vocab=256), kv_stage(),
                         {"quantizer": "rtn", "weights": {"bits": 4, "group_size": 32}})
    assert {"model.layers.0.self_attn.k_proj", "model.layers.0.self_attn.v_proj"} <= set(qmodel.quantized_modules())
    assert len(cache_quantizers(model)) == 2


def test_two_cache_stages_over_one_attention_are_refused():
    with pytest.raises(QFrameError, match="kv_cache stage quantizes this KV cache already"):
        quantize_kv(tiny_llama_model(), random_tokens(2, 16, vocab=256), kv_stage(targets=["*.k_proj"]),
                    kv_stage(targets=["*.v_proj"]))


@pytest.mark.parametrize("options, key", [({"shared": "yes"}, "stage[0].options.shared"),
                                          ({"per_head": True}, "stage[0].options.per_head")])
def test_bad_options_are_refused(options, key):
    with pytest.raises(RecipeError, match=key.replace("[", r"\[").replace("]", r"\]")):
        resolve(parse_recipe({"stage": [{**kv_stage(), "options": options}]}), default_registry())


@pytest.mark.parametrize("acts, key", [({"bits": 8, "symmetric": False}, "activations.symmetric"),
                                       ({"bits": 4}, "activations.bits"),
                                       ({"type": "float", "bits": 4}, "activations.format"),
                                       ({"type": "float", "bits": 8, "dynamic": True}, "activations.granularity")])
def test_formats_no_cache_stores_are_refused(acts, key):
    with pytest.raises(RecipeError, match=key):
        resolve(parse_recipe({"stage": [{"quantizer": "kv_cache", "activations": acts}]}), default_registry())


# -- the native checkpoint ----------------------------------------------------------------------------

@pytest.mark.parametrize("fmt, shared", [("e4m3", False), ("int8", True)])
def test_native_checkpoint_reloads_the_cache_exactly(fmt, shared, tmp_path):
    model = tiny_qwen3()
    ids = random_tokens(4, 16, vocab=256, seed=11)
    qmodel = quantize_kv(model, ids, kv_stage(fmt, shared=shared))
    save_native(qmodel, tmp_path)
    manifest = json.loads((tmp_path / "qframe.json").read_text())
    assert set(manifest["kv_cache"]) == {"model.layers.0.self_attn", "model.layers.1.self_attn"}
    assert manifest["kv_cache"]["model.layers.0.self_attn"]["shared"] is shared
    saved = load_file(str(tmp_path / "model.safetensors"))
    assert saved["model.layers.1.self_attn.kv_cache_quant.v_scale"].dtype == torch.float32
    loaded = load_native(tmp_path, default_registry())
    assert torch.equal(logits(loaded.model, ids), logits(model, ids))
    again = cache_quantizers(loaded.model)
    for name, cache in cache_quantizers(model).items():
        assert again[name].args == cache.args and again[name].shared == cache.shared
        assert torch.equal(again[name].k_scale, cache.k_scale) and torch.equal(again[name].v_scale, cache.v_scale)


@pytest.fixture
def saved(tmp_path):
    qmodel = quantize_kv(tiny_llama_model(), random_tokens(2, 16, vocab=256))
    save_native(qmodel, tmp_path)
    return tmp_path


def edit_manifest(directory: Path, change) -> None:
    manifest = json.loads((directory / "qframe.json").read_text())
    change(manifest)
    (directory / "qframe.json").write_text(json.dumps(manifest))


def test_a_checkpoint_with_the_old_projection_output_cache_is_refused(saved):
    """Before, the cache was the k_proj/v_proj outputs (``outputs`` in the manifest)."""
    def old(manifest):
        manifest["modules"]["model.layers.0.self_attn.k_proj"] = {
            "in_features": 64, "out_features": 32, "bias": False, "weights": None, "activations": None,
            "outputs": FP8.to_dict(), "input_prescale": False}
        del manifest["kv_cache"]

    edit_manifest(saved, old)
    with pytest.raises(ModelError, match=r"outputs: .*earlier qframe.*quantize the model again"):
        load_native(saved, default_registry())


@pytest.mark.parametrize("damage, match", [
    (lambda m: m["kv_cache"]["model.layers.0.self_attn"].update(shared="no"), r"kv_cache\[.*\]\.shared"),
    (lambda m: m["kv_cache"]["model.layers.0.self_attn"]["args"].update(bits=4), r"kv_cache\[.*\]\.args"),
    (lambda m: m["kv_cache"]["model.layers.0.self_attn"]["args"].update(symmetric=False), r"kv_cache\[.*\]\.args"),
    (lambda m: m.update(kv_cache=[]), r"kv_cache: expected a table"),
    (lambda m: m["kv_cache"].update({"model.layers.7.self_attn": m["kv_cache"]["model.layers.0.self_attn"]}),
     r"names an attention module"),
    (lambda m: m["kv_cache"].update({"model.layers.0.mlp": m["kv_cache"]["model.layers.0.self_attn"]}),
     r"calls no transformers attention function"),
    (lambda m: m["kv_cache"].pop("model.layers.1.self_attn"), r"unexpected \['model\.layers\.1\.self_attn\.kv_cache"),
])
def test_a_damaged_cache_entry_is_refused(saved, damage, match):
    edit_manifest(saved, damage)
    with pytest.raises(ModelError, match=match):
        load_native(saved, default_registry())


@pytest.mark.parametrize("value", [0.0, -1.0, math.nan])
def test_a_damaged_cache_scale_is_refused(saved, value):
    tensors = load_file(str(saved / "model.safetensors"))
    tensors["model.layers.1.self_attn.kv_cache_quant.k_scale"] = torch.tensor(value)
    save_file(tensors, str(saved / "model.safetensors"), metadata={"format": "qframe.native"})
    with pytest.raises(ModelError, match="model.layers.1.self_attn"):
        load_native(saved, default_registry())


# -- the module itself ---------------------------------------------------------------------------------

def test_observing_keeps_no_copy_per_batch_and_needs_the_attention_interface():
    model = tiny_llama_model()
    attention = model.model.layers[0].self_attn
    calls = []

    class Counting:
        def observe(self, x):
            calls.append(tuple(x.shape))

    with observing(attention, Counting(), Counting()) as seen:
        logits(model, random_tokens(3, 5, vocab=256))
    assert seen.calls == 1 and calls == [(3, 2, 5, 16), (3, 2, 5, 16)]  # [batch, kv_heads, seq, head_dim]
    with pytest.raises(ModelError, match="calls no transformers attention function"):
        attach(model.model.layers[0].mlp, KVCacheQuant(INT8))


def test_other_models_of_the_family_compute_as_before():
    """The wrapped attention functions pass every attention without a cache through unchanged."""
    ids = random_tokens(2, 12, vocab=256, seed=12)
    untouched = tiny_llama_model(seed=5)
    before = logits(untouched, ids)
    quantize_kv(tiny_llama_model(), ids)  # wraps the Llama attention functions of this process
    assert torch.equal(logits(untouched, ids), before)
