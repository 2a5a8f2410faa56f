"""Run code in the peers' own virtual environment (nvidia-modelopt pins its own versions).

The README's test command builds it at ``.peer/`` (override with ``$QFRAME_PEER_PYTHON``).
Tensors cross as safetensors files; the peer script reads ``inputs`` and fills ``outputs``.

Example::

    out = run_peer('''
        import modelopt.torch.quantization as mtq
        outputs["y"] = inputs["x"] * 2
    ''', {"x": torch.ones(3)})
"""

from __future__ import annotations

import functools
import os
import subprocess
import tempfile
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

ROOT = Path(__file__).resolve().parents[1]

_PRELUDE = """
import sys
from safetensors.torch import load_file, save_file
inputs = load_file(sys.argv[1])
outputs = {}
"""
_EPILOGUE = """
save_file({k: v.contiguous() for k, v in outputs.items()}, sys.argv[2])
"""


@functools.cache  # the probe imports modelopt (seconds); once a session is enough
def peer_python() -> Path | None:
    """The peer environment's interpreter, when it exists and has modelopt."""
    candidate = Path(os.environ.get("QFRAME_PEER_PYTHON", ROOT / ".peer" / "bin" / "python"))
    if not candidate.exists():
        return None
    probe = subprocess.run([str(candidate), "-c", "import modelopt.torch.quantization"], capture_output=True)
    return candidate if probe.returncode == 0 else None


def requires_peer():
    """Skip the test where the peer environment is absent (CI builds it)."""
    if peer_python() is None:
        pytest.skip("no peer environment with nvidia-modelopt at .peer/ (see README's test command)")


def run_peer(code: str, inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    requires_peer()
    with tempfile.TemporaryDirectory() as tmp:
        script, src, dst = Path(tmp, "peer.py"), Path(tmp, "in.safetensors"), Path(tmp, "out.safetensors")
        script.write_text(_PRELUDE + textwrap.dedent(code) + _EPILOGUE)
        save_file({k: v.contiguous() for k, v in inputs.items()}, str(src))
        proc = subprocess.run([str(peer_python()), str(script), str(src), str(dst)], capture_output=True, text=True)
        if proc.returncode:
            raise AssertionError(f"peer script failed:\n{proc.stderr[-4000:]}")
        return load_file(str(dst))


def run_peer_script(code: str, directory: Path) -> None:
    """Run ``code`` in the peer environment with ``directory`` (a :class:`pathlib.Path`, the
    script's working folder) to read inputs from and write outputs into. The peer can also
    import ``transformers`` and ``qframe`` from this environment: they come after its own
    packages on ``sys.path``, so modelopt keeps its pinned versions.

    Example::

        run_peer_script('''
            from transformers import AutoModelForCausalLM
            model = AutoModelForCausalLM.from_pretrained(directory / "model")
        ''', tmp_path)
    """
    import sysconfig

    requires_peer()
    prelude = (f"import sys\nfrom pathlib import Path\nsys.path.append({sysconfig.get_paths()['purelib']!r})\n"
               f"sys.path.append({str(ROOT)!r})\ndirectory = Path({str(directory)!r})\n")
    script = Path(directory, "peer_script.py")
    script.write_text(prelude + textwrap.dedent(code))
    proc = subprocess.run([str(peer_python()), str(script)], capture_output=True, text=True, cwd=str(directory))
    if proc.returncode:
        raise AssertionError(f"peer script failed:\n{proc.stderr[-4000:]}")
