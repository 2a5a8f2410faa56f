"""qframe.spool writes what safetensors.torch.save_file writes, byte for byte, a tensor (and a
chunk) at a time; parts assembled by byte copy are the file saved whole."""

from __future__ import annotations

import random

import pytest
import torch
from safetensors.torch import load_file, save_file

from qframe import spool
from qframe.spool import Spool, entries_of, save_tensors, write_safetensors

DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64, torch.int64, torch.int32, torch.int16,
          torch.int8, torch.uint8, torch.bool, torch.float8_e4m3fn, torch.float8_e5m2]


def _random_tensors(rng: random.Random, count: int) -> dict[str, torch.Tensor]:
    tensors = {}
    for i in range(count):
        dtype = rng.choice(DTYPES)
        shape = tuple(rng.choice([0, 1, 3, 17]) for _ in range(rng.randint(0, 3)))
        values = torch.randn(shape, generator=torch.Generator().manual_seed(i)) * 5
        name = rng.choice(["w", "layers.{}.mlp.up_proj.weight", "größe.{}", "层.{}", "a" * 40 + "{}"]).format(i)
        tensors[f"{name}.{i}"] = values.to(dtype)
    return tensors


@pytest.mark.parametrize("seed", range(5))
def test_save_tensors_is_save_file_byte_for_byte(seed, tmp_path):
    tensors = _random_tensors(random.Random(seed), 12)
    # One key: safetensors orders several metadata keys as its HashMap happens to (differently
    # from one process to the next), where save_tensors keeps the order given.
    metadata = {"format": "ünïcode"} if seed % 2 else None
    save_file(tensors, str(tmp_path / "reference.safetensors"), metadata=metadata)
    save_tensors(tmp_path / "ours.safetensors", tensors, metadata)
    assert (tmp_path / "ours.safetensors").read_bytes() == (tmp_path / "reference.safetensors").read_bytes()


def test_a_tensor_written_in_chunks_is_the_same_bytes(tmp_path, monkeypatch):
    tensors = {"big": torch.randn(1000, 37), "odd": torch.arange(1001, dtype=torch.int8), "empty": torch.ones(0)}
    save_file(tensors, str(tmp_path / "reference.safetensors"))
    monkeypatch.setattr(spool, "_CHUNK_BYTES", 4096)  # the big tensor in 37 chunks, the last one short
    save_tensors(tmp_path / "ours.safetensors", tensors)
    assert (tmp_path / "ours.safetensors").read_bytes() == (tmp_path / "reference.safetensors").read_bytes()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_a_gpu_tensor_comes_over_in_chunks(tmp_path, monkeypatch):
    on_gpu = {"h": torch.randn(64, 128, 256, device="cuda", dtype=torch.bfloat16)}
    save_file({k: v.cpu() for k, v in on_gpu.items()}, str(tmp_path / "reference.safetensors"))
    monkeypatch.setattr(spool, "_CHUNK_BYTES", 1 << 16)
    save_tensors(tmp_path / "ours.safetensors", on_gpu)
    assert (tmp_path / "ours.safetensors").read_bytes() == (tmp_path / "reference.safetensors").read_bytes()


def test_parts_assembled_by_byte_copy_are_the_file_saved_whole(tmp_path):
    whole = _random_tensors(random.Random(7), 30)
    names = list(whole)
    box = Spool(tmp_path / "spool")
    for i in range(0, len(names), 7):  # parts of any size, in any order of names
        box.put("model", f"part-{i:05d}", {n: whole[n] for n in names[i:i + 7]})
    out = box.assemble("model", tmp_path / "model.safetensors", {"format": "pt"})
    save_file(whole, str(tmp_path / "reference.safetensors"), metadata={"format": "pt"})
    assert out.read_bytes() == (tmp_path / "reference.safetensors").read_bytes()
    again = write_safetensors(tmp_path / "copy.safetensors", entries_of(out), {"format": "pt"})
    assert again.read_bytes() == out.read_bytes()
    loaded = load_file(str(out))
    assert all(torch.equal(loaded[n].reshape(-1).view(torch.uint8), whole[n].reshape(-1).view(torch.uint8))
               for n in names)


def test_a_name_in_two_parts_is_an_error(tmp_path):
    box = Spool(tmp_path / "spool")
    box.put("model", "a", {"x": torch.ones(2)})
    box.put("model", "b", {"x": torch.zeros(2)})
    with pytest.raises(ValueError, match="x"):
        box.assemble("model", tmp_path / "model.safetensors")
