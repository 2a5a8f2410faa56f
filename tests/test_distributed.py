"""Calibration across processes (issue 16), with real gloo process groups on the CPU.

Two ranks run ``qframe.quantize`` under ``torchrun`` (``tests/ranks_worker.py``) for rtn, fp8,
gptq (static and dynamic groups, NVFP4), smoothquant, awq, histogram calibrators with the KV cache,
and GPTQ and AWQ on fused experts; the single-process run on the same windows is the
reference. ``torchrun -m qframe apply`` writes once, from rank 0; a rank killed mid-run stops the
other with a clear error and no output, and ``--resume`` then finishes with the bytes of an
uninterrupted run.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import socket
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from qframe.cli import main
from qframe.distributed import Ranks, combine, spread, split
from qframe.errors import QFrameError
from qframe.pipeline import rank_share
from qframe.testing import random_tokens

sys.path.insert(0, str(Path(__file__).parent))
import ranks_worker  # noqa: E402
from test_resume import args as resume_args  # noqa: E402

ROOT = Path(__file__).parents[1]
WORKER = str(Path(__file__).parent / "ranks_worker.py")
CASES = list(ranks_worker.CASES)
EXACT = ["rtn", "fp8", "smoothquant"]  # statistics that combine exactly (min/max), no float sums
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2"]


# -- the parts, in one process -----------------------------------------------------------------

def test_batches_split_in_order_and_too_few_are_refused():
    assert [list(r) for r in split(7, 3)] == [[0, 1, 2], [3, 4], [5, 6]]
    ids = torch.arange(10).view(5, 2)
    # five windows, three batches of two: rank 0 takes the first two batches, rank 1 the last
    assert rank_share(ids, 2, Ranks(0, 2, torch.device("cpu"))).tolist() == [[0, 1], [2, 3], [4, 5], [6, 7]]
    assert rank_share(ids, 2, Ranks(1, 2, torch.device("cpu"))).tolist() == [[8, 9]]
    assert rank_share(ids, 2, None) is ids
    with pytest.raises(QFrameError, match="makes 2 batches .* fewer than the 3 ranks"):
        rank_share(ids[:4], 2, Ranks(0, 3, torch.device("cpu")))
    assert spread(None, 3, lambda part: torch.arange(3)[part]).tolist() == [0, 1, 2]


def test_an_observer_that_cannot_combine_is_named_before_any_collective():
    class Private:
        def observe(self, x):
            pass

    with pytest.raises(QFrameError, match="Private observed calibration data on one rank of 2 .* combine\\(ranks\\)"):
        combine([Private()], Ranks(0, 2, torch.device("cpu")))
    combine([Private()], None)  # one process: nothing to combine


# -- two ranks against one process ------------------------------------------------------------

@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Path]:
    """Every case quantized by two gloo ranks under torchrun, and by this process alone."""
    two, one = tmp_path_factory.mktemp("two"), tmp_path_factory.mktemp("one")
    ranked = subprocess.Popen([*TORCHRUN, WORKER, str(two), *CASES], stdout=subprocess.DEVNULL,
                              stderr=subprocess.PIPE, text=True)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as torchrun's workers (OMP_NUM_THREADS=1): the same matmul kernels
    try:  # while the ranks start
        for case in CASES:
            ranks_worker.run(case, one, 0)
    finally:
        torch.set_num_threads(threads)
    error = ranked.communicate(timeout=600)[1]
    assert ranked.returncode == 0, error[-3000:]
    return {"two": two, "one": one}


def tensors(where: Path) -> dict[str, torch.Tensor]:
    return load_file(str(where / "model.safetensors"))


@pytest.mark.parametrize("case", CASES)
def test_every_rank_ends_with_the_same_model(runs, case):
    rank0, rank1 = tensors(runs["two"] / case / "rank0"), tensors(runs["two"] / case / "rank1")
    assert rank0.keys() == rank1.keys()
    assert [k for k in rank0 if not torch.equal(rank0[k], rank1[k])] == []


@pytest.mark.parametrize("case", EXACT)
def test_min_max_statistics_give_the_single_process_model_bit_for_bit(runs, case):
    single, ranked = tensors(runs["one"] / case / "rank0"), tensors(runs["two"] / case / "rank0")
    assert single.keys() == ranked.keys()
    assert [k for k in single if not torch.equal(single[k], ranked[k])] == []


def perplexity(case: str, state: dict[str, torch.Tensor]) -> tuple[torch.Tensor, float]:
    """Logits and perplexity, on held-out windows, of ``case``'s model holding ``state``."""
    import qframe
    from qframe.recipe import parse_recipe

    stages, kind = ranks_worker.CASES[case]
    model = ranks_worker.model_for(kind)
    recipe = parse_recipe({"stage": stages, "calibration": {"batch_size": 5}})  # one batch: no ranks needed
    quantized = qframe.quantize(model, recipe, calibration=ranks_worker.windows(model), device="cpu").model
    quantized.load_state_dict(state)
    ids = random_tokens(4, 32, model.config.vocab_size, seed=7)
    with torch.no_grad():
        logits = quantized(ids).logits
    loss = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))
    return logits, float(loss.exp())


@pytest.mark.parametrize("case", [c for c in CASES if c not in EXACT])
def test_summed_statistics_give_the_single_process_model_within_rounding(runs, case):
    """Hessians, Gram matrices, means and candidate losses are float sums, added in another
    order across ranks; histograms merge onto one span. The models still agree: the same
    codes almost everywhere, the same logits to 1e-2 and the same perplexity to 0.2 %."""
    single, ranked = tensors(runs["one"] / case / "rank0"), tensors(runs["two"] / case / "rank0")
    assert single.keys() == ranked.keys()
    codes = [k for k in single if not single[k].is_floating_point()]
    same = sum(int((single[k] == ranked[k]).sum()) for k in codes)
    total = sum(single[k].numel() for k in codes)
    assert same >= 0.99 * total, f"{total - same} of {total} codes differ"
    one, two = perplexity(case, single), perplexity(case, ranked)
    assert float((one[0] - two[0]).norm() / one[0].norm()) < 1e-2
    assert abs(two[1] / one[1] - 1) < 0.002, (one[1], two[1])


def test_searches_choose_what_one_process_chooses(runs):
    """AWQ's scale search and SmoothQuant's alpha search pick the same candidates across ranks
    (their losses are summed over every rank's tokens)."""
    for case, key in (("awq", "awq_ratio"), ("smoothquant", "smoothquant_alpha")):
        chosen = []
        for run in ("one", "two"):
            layers = json.loads((runs[run] / case / "rank0" / "layers.json").read_text())
            chosen.append({name: figures[key] for layer in layers for name, figures in layer["modules"].items()
                           if key in figures})
        assert chosen[0] and chosen[0] == chosen[1]


# -- torchrun -m qframe apply: one writer, a dying rank, a resume -----------------------------

def apply_args(model: Path, out: Path, *extra: str) -> list[str]:
    """test_resume's run (GPTQ on README's text), in four batches of one window, native output only."""
    return resume_args(model, out, "--set", "calibration.batch_size=1", "--set", 'export.backend="qframe"', *extra)


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def torchrun_output(tiny_model_dir, tmp_path_factory) -> tuple[Path, str, Path]:
    """``torchrun -m qframe apply`` on two ranks, and the same run in this process meanwhile."""
    out, single = tmp_path_factory.mktemp("torchrun") / "out", tmp_path_factory.mktemp("single") / "out"
    ranked = subprocess.Popen([*TORCHRUN, "-m", "qframe", *apply_args(tiny_model_dir, out)], stdout=subprocess.DEVNULL,
                              stderr=subprocess.PIPE, text=True)
    assert main(apply_args(tiny_model_dir, single)) == 0
    error = ranked.communicate(timeout=600)[1]
    assert ranked.returncode == 0, error[-3000:]
    return out, error, single


def test_torchrun_apply_writes_once_the_model_one_process_writes(torchrun_output):
    out, error, single = torchrun_output
    assert error.count(f"wrote {out}") == 1  # rank 0 reports; rank 1 is quiet
    assert [p.name for p in out.parent.iterdir()] == ["out"]  # no partial directory left behind
    manifest = json.loads((out / "qframe.json").read_text())
    assert manifest["ranks"] == 2
    ranked, alone = load_file(str(out / "model.safetensors")), load_file(str(single / "model.safetensors"))
    assert ranked.keys() == alone.keys()
    codes = [k for k in alone if not alone[k].is_floating_point()]
    same = sum(int((alone[k] == ranked[k]).sum()) for k in codes)
    assert same >= 0.99 * sum(alone[k].numel() for k in codes)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(arguments: list[str], port: int, pause_rank: int | None = None) -> list[subprocess.Popen]:
    """Two ranks of ``python -m qframe`` joined by the environment torchrun would set; rank
    ``pause_rank`` stops at every finished layer (``QFRAME_PAUSE_AT=layer``)."""
    processes = []
    for rank in (0, 1):
        env = {**os.environ, "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": "2", "LOCAL_WORLD_SIZE": "2",
               "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
        if rank == pause_rank:
            env["QFRAME_PAUSE_AT"] = "layer"
        processes.append(subprocess.Popen([sys.executable, "-m", "qframe", *arguments], stdout=subprocess.DEVNULL,
                                          stderr=subprocess.PIPE, text=True, env=env))
    return processes


def test_a_rank_that_dies_stops_the_others_and_resume_finishes(torchrun_output, tiny_model_dir, tmp_path):
    uninterrupted = torchrun_output[0]
    out = tmp_path / "out"
    rank0, rank1 = launch(apply_args(tiny_model_dir, out), free_port(), pause_rank=1)
    pauses, lines = threading.Semaphore(0), []

    def read() -> None:
        for line in rank1.stderr:
            lines.append(line)
            if line.startswith("qframe: paused at layer"):
                pauses.release()

    threading.Thread(target=read, daemon=True).start()
    try:
        assert pauses.acquire(timeout=240), "".join(lines)[-2000:]
        rank1.send_signal(signal.SIGUSR1)  # layer 0 is written; let it go on
        assert pauses.acquire(timeout=240), "".join(lines)[-2000:]
        rank1.send_signal(signal.SIGKILL)  # layer 1 quantized, not yet written: rank 1 dies
        assert rank1.wait(60) == -signal.SIGKILL
        error = rank0.communicate(timeout=120)[1]
    finally:
        for process in (rank0, rank1):
            if process.poll() is None:
                process.kill()
    assert rank0.returncode == 1, error[-2000:]
    assert "another rank stopped" in error and "--resume" in error
    assert "Traceback" not in error
    assert not out.exists()  # nothing that looks finished
    partial = [p for p in tmp_path.iterdir() if p.name.startswith(".out.partial-")]
    assert len(partial) == 1 and json.loads((partial[0] / ".qframe-resume.json").read_text())["done"] == 1

    resumed = launch(apply_args(tiny_model_dir, out, "--resume"), free_port())
    errors = [p.communicate(timeout=300)[1] for p in resumed]
    assert [p.returncode for p in resumed] == [0, 0], errors[0][-2000:] + errors[1][-2000:]
    assert digest(out / "model.safetensors") == digest(uninterrupted / "model.safetensors")
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out.partial-")]
