"""Which qframe modules read a recipe's ``group_size`` on its way from the TOML to written
checkpoints: quantize a tiny Llama with AWQ g64, export it to ``qframe``, ``tensorrt-llm``
and ``hf``, reload the native checkpoint and export it again, and record the first qframe
frame of every read of ``QuantArgs.group_size``.

Run it at two commits to compare (issue 11's closing note)::

    python bench/group_size_trace.py
"""

from __future__ import annotations

import pathlib
import sys
import tempfile
import warnings


def main() -> None:
    warnings.simplefilter("ignore")
    import qframe
    from qframe.recipe import load_recipe
    from qframe.scheme import QuantArgs
    from qframe.testing import random_tokens, tiny_llama_model

    root = pathlib.Path(qframe.__file__).resolve().parents[1]
    seen: set[str] = set()
    original = QuantArgs.__getattribute__

    def traced(self, name):
        if name == "group_size":
            frame = sys._getframe(1)
            while frame is not None:
                path = pathlib.Path(frame.f_code.co_filename).resolve()
                if root in path.parents and path.suffix == ".py":  # not generated code ("<string>")
                    seen.add(str(path.relative_to(root)))
                    break
                frame = frame.f_back
        return original(self, name)

    QuantArgs.__getattribute__ = traced
    tmp = pathlib.Path(tempfile.mkdtemp())
    recipe = tmp / "awq.toml"
    recipe.write_text('[[stage]]\nquantizer = "awq"\nweights = { bits = 4, group_size = 64 }\n')
    model = tiny_llama_model(hidden_size=128, intermediate_size=256)
    ids = random_tokens(4, 16, vocab=model.config.vocab_size, seed=1)
    qmodel = qframe.quantize(model, load_recipe(recipe), calibration=ids, device="cpu")
    for backend in ("qframe", "tensorrt-llm", "hf"):
        qframe.export(qmodel, backend, tmp / backend)
    reloaded = qframe.load_quantized(tmp / "qframe")
    for backend in ("tensorrt-llm", "hf"):
        qframe.export(reloaded, backend, tmp / f"{backend}-again")
    print(len(seen), "modules:", ", ".join(sorted(seen)))


if __name__ == "__main__":
    main()
