"""qframe.lazy: a model on meta, loaded a decoder layer at a time from its safetensors files
or a GGUF file, is bit for bit what from_pretrained loads, and a damaged checkpoint names the
layer."""

from __future__ import annotations

import json
from pathlib import Path

import gguf
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM

from qframe.errors import ModelError
from qframe.lazy import LazyModel
from qframe.testing import TINY_MOE_FAMILIES, logits, random_tokens, tiny_llama_model, tiny_model


def _randomize(model):
    """Non-trivial norms and biases too (they start at 1 and 0), so a wrong load shows."""
    with torch.no_grad(), torch.random.fork_rng(devices=[]):
        torch.manual_seed(1)
        for p in model.parameters():
            p.normal_(0, 0.2)
    return model


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A factory of saved tiny checkpoints, each built once per module."""
    made: dict[str, Path] = {}

    def make(name: str) -> Path:
        if name in made:
            return made[name]
        folder = tmp_path_factory.mktemp(name)
        if name == "llama":
            tiny_llama_model().save_pretrained(folder)
        elif name == "llama_tied_sharded":
            model = _randomize(tiny_llama_model(tie_word_embeddings=True)).to(torch.bfloat16)
            model.save_pretrained(folder, max_shard_size="40KB")
        elif name == "mixtral_fused":  # the fused layout transformers 5 holds in memory, as one file
            model = _randomize(tiny_model("mixtral"))
            model.config.save_pretrained(folder)
            save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(folder / "model.safetensors"),
                      metadata={"format": "pt"})
        else:  # a family of qframe.testing, sharded
            _randomize(tiny_model(name)).save_pretrained(folder, max_shard_size="60KB")
        made[name] = folder
        return folder

    return make


def _tensors(module, skip: str | None = None) -> dict[str, torch.Tensor]:
    found = {**dict(module.named_parameters()), **dict(module.named_buffers())}
    return {k: v for k, v in found.items() if skip is None or not k.startswith(skip)}


def _assert_same(ours: dict[str, torch.Tensor], theirs: dict[str, torch.Tensor]) -> None:
    assert ours.keys() == theirs.keys()
    for name, t in ours.items():
        assert t.device.type == "cpu", name
        assert t.dtype == theirs[name].dtype and torch.equal(t, theirs[name]), name


def _checkpoint_keys(folder: Path) -> set[str]:
    keys: set[str] = set()
    for file in folder.glob("*.safetensors"):
        with safe_open(str(file), "pt") as handle:
            keys.update(handle.keys())
    return keys


def _compare(source: Path, dtype: str, reference=None, *, check_logits: bool = True) -> LazyModel:
    """Load the rest, then every layer one by one: the same tensors and logits as from_pretrained
    (of the folder, or of the .gguf file ``source``) or as ``reference``."""
    if reference is None:
        chosen = {} if dtype == "auto" else {"dtype": getattr(torch, dtype)}
        if source.suffix == ".gguf":
            chosen["gguf_file"] = source.name
        reference = AutoModelForCausalLM.from_pretrained(source.parent if source.suffix == ".gguf" else source,
                                                         **chosen)
    lazy = LazyModel(source, dtype)
    model, inside = lazy.model, lazy.layers_path + "."
    assert all(t.is_meta for t in _tensors(model).values())
    lazy.load_rest()
    _assert_same(_tensors(model, skip=inside), _tensors(reference, skip=inside))
    assert all(t.is_meta for name, t in _tensors(model).items() if name.startswith(inside))
    for index in reversed(range(lazy.num_layers)):  # any order
        layer = lazy.load_layer(index)
        assert layer is model.get_submodule(f"{lazy.layers_path}.{index}")
        _assert_same(_tensors(layer), _tensors(reference.get_submodule(f"{lazy.layers_path}.{index}")))
        assert all(t.is_meta for t in _tensors(lazy.layer(index - 1)).values()) if index else True
    _assert_same(_tensors(model), _tensors(reference))
    if check_logits:
        ids = random_tokens(2, 7, vocab=model.config.get_text_config().vocab_size)
        assert torch.equal(logits(model, ids), logits(reference, ids))
    for index in range(lazy.num_layers):
        lazy.free_layer(index)
        assert all(t.is_meta for t in _tensors(lazy.layer(index)).values())
    assert not any(t.is_meta for t in _tensors(model, skip=inside).values())
    return lazy


@pytest.mark.parametrize("dtype", ["auto", "float32", "bfloat16"])
def test_llama_single_file(saved, dtype):
    lazy = _compare(saved("llama"), dtype)
    assert lazy.dtype == (torch.bfloat16 if dtype == "bfloat16" else torch.float32)
    assert lazy.model.lm_head.weight is not lazy.model.model.embed_tokens.weight


@pytest.mark.parametrize("dtype", ["auto", "float32"])
def test_tied_embeddings_over_shards(saved, dtype):
    folder = saved("llama_tied_sharded")
    assert (folder / "model.safetensors.index.json").is_file() and len(list(folder.glob("*.safetensors"))) > 3
    assert "lm_head.weight" not in _checkpoint_keys(folder)
    lazy = _compare(folder, dtype)
    assert lazy.dtype == (torch.bfloat16 if dtype == "auto" else torch.float32)  # auto: the config's dtype
    assert lazy.model.lm_head.weight is lazy.model.model.embed_tokens.weight


def test_legacy_per_expert_mixtral_becomes_fused_experts(saved):
    """transformers 5 saves Mixtral as the hub holds it (block_sparse_moe.experts.N.w1/w2/w3, one
    tensor per expert) and fuses the experts as it loads; the lazy load fuses them the same way."""
    folder = saved("mixtral")
    keys = _checkpoint_keys(folder)
    assert {f"model.layers.1.block_sparse_moe.experts.{e}.w{w}.weight" for e in range(4) for w in (1, 2, 3)} <= keys
    lazy = _compare(folder, "float32")
    assert lazy.layer(0).mlp.experts.gate_up_proj.is_meta
    assert len(lazy.layer_keys(1)) == 4 * 3 + 1 + 4 + 2  # experts, router, attention, norms


def test_fused_mixtral_checkpoint(saved):
    folder = saved("mixtral_fused")
    assert "model.layers.0.mlp.experts.gate_up_proj" in _checkpoint_keys(folder)
    _compare(folder, "bfloat16")


@pytest.mark.parametrize("family", [f for f in TINY_MOE_FAMILIES if f != "mixtral"])
def test_moe_families(saved, family):
    _compare(saved(family), "float32")


def _copy(folder: Path, tmp_path: Path) -> Path:
    target = tmp_path / "model"
    target.mkdir()
    for file in folder.iterdir():
        (target / file.name).write_bytes(file.read_bytes())
    return target


def _rewrite(folder: Path, edit) -> None:
    """Rewrite the shards of ``folder`` through ``edit(tensors) -> tensors`` and fix the index."""
    index_file = folder / "model.safetensors.index.json"
    index = json.loads(index_file.read_text())
    weight_map = {}
    for file in sorted(folder.glob("*.safetensors")):
        with safe_open(str(file), "pt") as handle:
            tensors = edit({k: handle.get_tensor(k) for k in handle.keys()})
        save_file(tensors, str(file), metadata={"format": "pt"})
        weight_map.update({k: file.name for k in tensors})
    index["weight_map"] = weight_map
    index_file.write_text(json.dumps(index))


def test_missing_tensor_names_the_layer(saved, tmp_path):
    folder = _copy(saved("mixtral"), tmp_path)
    gone = "model.layers.1.self_attn.k_proj.weight"
    _rewrite(folder, lambda tensors: {k: v for k, v in tensors.items() if k != gone})
    lazy = LazyModel(folder, "float32")
    lazy.load_rest()
    lazy.load_layer(0)
    with pytest.raises(ModelError, match=r"decoder layer 1 \(model\.layers\.1\): model\.layers\.1\.self_attn\.k_proj\."
                                         r"weight is missing from the checkpoint"):
        lazy.load_layer(1)


def test_missing_expert_names_the_layer(saved, tmp_path):
    """One expert of four gone: the fused weight cannot be built."""
    folder = _copy(saved("mixtral"), tmp_path)
    gone = "model.layers.0.block_sparse_moe.experts.2.w3.weight"
    _rewrite(folder, lambda tensors: {k: v for k, v in tensors.items() if k != gone})
    fused = r"model\.layers\.0\.mlp\.experts\.gate_up_proj"
    with pytest.raises(ModelError, match=rf"decoder layer 0 .*{fused} is missing from the checkpoint; building {fused} "
                                         r"\(RuntimeError: Sizes of tensors must match"):
        LazyModel(folder, "float32").load_layer(0)


def test_unexpected_and_mismatched_tensors(saved, tmp_path):
    folder = _copy(saved("mixtral"), tmp_path)
    extra, wrong = "model.layers.1.self_attn.extra.weight", "model.layers.1.self_attn.q_proj.weight"

    def edit(tensors):
        if wrong in tensors:
            tensors[wrong] = torch.zeros(3, 3)
            tensors[extra] = torch.zeros(2)
        return tensors

    _rewrite(folder, edit)
    lazy = LazyModel(folder, "float32")
    lazy.load_layer(0)
    with pytest.raises(ModelError, match=rf"decoder layer 1 .*{wrong} \[3, 3\] in the checkpoint, \[64, 64\] in the "
                                         rf"model has another shape; {extra} has no place in MixtralForCausalLM"):
        lazy.load_layer(1)


def test_tensors_of_layers_the_config_lacks_are_unexpected(saved, tmp_path):
    folder = _copy(saved("llama_tied_sharded"), tmp_path)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps(dict(config, num_hidden_layers=1)))
    lazy = LazyModel(folder, "float32")
    with pytest.raises(ModelError, match=r"outside the decoder layers: model\.layers\.1\.input_layernorm\.weight, "
                                         r".* and \d+ more .* no place in LlamaForCausalLM"):
        lazy.load_rest()


def test_folder_without_weights(tmp_path):
    tiny_llama_model().config.save_pretrained(tmp_path)
    with pytest.raises(ModelError, match="has neither model.safetensors nor model.safetensors.index.json"):
        LazyModel(tmp_path)


def test_index_naming_a_tensor_its_shard_lacks(saved, tmp_path):
    folder = _copy(saved("llama_tied_sharded"), tmp_path)
    gone = "model.layers.1.mlp.up_proj.weight"
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    shard = folder / index["weight_map"][gone]
    with safe_open(str(shard), "pt") as handle:
        kept = {k: handle.get_tensor(k) for k in handle.keys() if k != gone}
    save_file(kept, str(shard), metadata={"format": "pt"})
    lazy = LazyModel(folder)
    lazy.load_layer(0)
    with pytest.raises(ModelError, match=rf"cannot load decoder layer 1 \(model\.layers\.1\): .*{gone}"):
        lazy.load_layer(1)


# -- GGUF ---------------------------------------------------------------------------------------

Q = gguf.GGMLQuantizationType
GGUF_KINDS = (Q.Q8_0, Q.Q4_1, Q.Q4_0, Q.F16, Q.F32)  # the weights' types in turn; norms stay F32


def _write_gguf(file: Path, *, tied: bool = False, skip: tuple[str, ...] = (), kv_head_count: bool = True,
                **overrides) -> Path:
    """A tiny random Llama as a GGUF file in several ggml types, named by gguf's own name map (its
    q/k rows are left in Hugging Face order: from_pretrained and LazyModel read the same file)."""
    model = _randomize(tiny_llama_model(tie_word_embeddings=tied, **overrides))
    config = model.config
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, config.num_hidden_layers)
    writer = gguf.GGUFWriter(str(file), "llama")
    writer.add_block_count(config.num_hidden_layers)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    if kv_head_count:
        writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_rope_dimension_count(config.hidden_size // config.num_attention_heads)
    writer.add_rope_freq_base(config.rope_parameters["rope_theta"])
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_vocab_size(config.vocab_size)
    weights = 0
    for name, tensor in model.state_dict().items():
        base, suffix = name.rsplit(".", 1)
        key = f"{names.get_name(base)}.{suffix}"
        if (tied and name == "lm_head.weight") or key in skip:
            continue
        if tensor.dim() == 1:
            writer.add_tensor(key, tensor.numpy())
        else:
            kind = GGUF_KINDS[weights % len(GGUF_KINDS)]
            weights += 1
            writer.add_tensor(key, gguf.quants.quantize(tensor.numpy(), kind), raw_dtype=kind)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return file


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory) -> Path:
    return _write_gguf(tmp_path_factory.mktemp("gguf") / "tiny.gguf")


def test_gguf_holds_several_ggml_types(tiny_gguf):
    types = {t.tensor_type for t in gguf.GGUFReader(str(tiny_gguf)).tensors}
    assert set(GGUF_KINDS) <= types


@pytest.mark.parametrize("dtype", ["auto", "float32", "bfloat16", "float16"])
def test_gguf_tiny_llama(tiny_gguf, dtype):
    lazy = _compare(tiny_gguf, dtype)
    assert lazy.dtype == getattr(torch, "float32" if dtype == "auto" else dtype)  # auto: what from_pretrained picks
    assert lazy.layer_keys(1)[0].startswith("blk.1.")
    assert lazy.model.lm_head.weight is not lazy.model.model.embed_tokens.weight


def test_gguf_tied_embeddings(tmp_path):
    """No output.weight in the file: the head is the embedding, as from_pretrained ties it."""
    lazy = _compare(_write_gguf(tmp_path / "tied.gguf", tied=True), "bfloat16")
    assert lazy.model.lm_head.weight is lazy.model.model.embed_tokens.weight


def test_gguf_processor_reads_the_parsed_config(tmp_path):
    """Without attention.head_count_kv in the file transformers leaves the q/k rows as they are
    (its processor reads the metadata, not the config's default of as many kv heads as heads)."""
    file = _write_gguf(tmp_path / "nokv.gguf", kv_head_count=False, num_key_value_heads=4)
    lazy = _compare(file, "float32")
    q = gguf.GGUFReader(str(file)).tensors[1]
    assert q.name == "blk.0.attn_q.weight"
    stored = torch.from_numpy(gguf.dequantize(q.data, q.tensor_type))
    assert torch.equal(lazy.load_layer(0).self_attn.q_proj.weight, stored)


@pytest.mark.parametrize("dtype", ["auto", "float32"])
def test_smollm2_gguf(smollm2_gguf, smollm2_float32, dtype):
    """The real Q4_1/Q8_0 SmolLM2 (30 layers): every tensor as from_pretrained(gguf_file=...)
    dequantizes it in float32, which is also what it picks for "auto" (the reference is shared
    with the other test modules: loading it takes ten seconds). The same tensors give the same
    logits; the tiny models check that, and a forward pass of this one would double the time."""
    lazy = _compare(smollm2_gguf, dtype, reference=smollm2_float32.model, check_logits=False)
    assert lazy.dtype == torch.float32 and lazy.num_layers == 30
    assert lazy.model.lm_head.weight is lazy.model.model.embed_tokens.weight


def test_gguf_missing_tensor_names_the_layer(tmp_path):
    lazy = LazyModel(_write_gguf(tmp_path / "gap.gguf", skip=("blk.1.attn_k.weight",)), "float32")
    lazy.load_rest()
    lazy.load_layer(0)
    with pytest.raises(ModelError, match=r"decoder layer 1 \(model\.layers\.1\): model\.layers\.1\.self_attn\.k_proj\."
                                         r"weight is missing from the checkpoint"):
        lazy.load_layer(1)


@pytest.mark.parametrize("cut", [0.5, 0.99])
def test_truncated_gguf(tiny_gguf, tmp_path, cut):
    data = tiny_gguf.read_bytes()
    file = tmp_path / "cut.gguf"
    file.write_bytes(data[:int(len(data) * cut)])
    with pytest.raises(ModelError, match=r"cannot read the GGUF file .*cut\.gguf.*damaged or incomplete"):
        LazyModel(file)


def test_gguf_cut_short_after_opening_names_the_layer(tiny_gguf, tmp_path):
    """The file is mapped afresh for each load: one truncated since is an error, not a crash."""
    file = tmp_path / "model.gguf"
    data = tiny_gguf.read_bytes()
    file.write_bytes(data)
    lazy = LazyModel(file)
    lazy.load_layer(0)
    lazy.free_layer(0)
    file.write_bytes(data[:len(data) // 2])
    with pytest.raises(ModelError, match=r"cannot load decoder layer 1 \(model\.layers\.1\): ValueError"):
        lazy.load_layer(1)


@pytest.mark.parametrize("content", [b"", b"GGUF" + bytes(range(200)), b"not a gguf file at all"])
def test_garbage_gguf(tmp_path, content):
    file = tmp_path / "model.gguf"
    file.write_bytes(content)
    with pytest.raises(ModelError, match="cannot read the GGUF file"):
        LazyModel(file)


def test_missing_gguf(tmp_path):
    with pytest.raises(ModelError, match="does not exist"):
        LazyModel(tmp_path / "nothing.gguf")
