"""The ``qframe`` command: a thin layer over :mod:`qframe.api`.

Exit status: 0 success, 2 bad input (one paragraph on stderr, no traceback), 1 a bug.
"""

from __future__ import annotations

import argparse
import math
import sys
import warnings
from contextlib import contextmanager
from typing import Iterator

from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

from .output import Terminated, raise_on_sigterm, strict_dumps

err = Console(stderr=True)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="qframe", description="Post-training quantization for causal LMs.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("apply", help="run a recipe end to end")
    p.add_argument("recipe")
    p.add_argument("--model", help="hub id, local directory, .gguf file or pkg:MODULE/FILE (overrides [model] id)")
    p.add_argument("--output", help="output directory (default: out/RECIPE_NAME)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a recipe key, e.g. stage.0.weights.group_size=64")
    p.add_argument("--device", help="cpu, cuda or cuda:N (default: CUDA when present)")
    p.add_argument("--dry-run", action="store_true", help="validate and show the plan; load nothing")
    p.add_argument("--resume", action="store_true",
                   help="continue an interrupted run into the same --output from its first unfinished layer")
    p.add_argument("--json", action="store_true", help="print a JSON summary on stdout")

    p = sub.add_parser("eval", help="perplexity of a model or a qframe output directory")
    p.add_argument("model")
    p.add_argument("--dataset", default="generated", help="dataset spec, e.g. text:held_out.txt")
    p.add_argument("--samples", type=int, help="at most this many windows (default: all)")
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--device")
    p.add_argument("--layerwise", action="store_true",
                   help="one decoder layer at a time on the device: the same perplexity, for models larger than it "
                        "(default: when the model would take more than half the CUDA device's free memory)")
    p.add_argument("--json", action="store_true")

    p = sub.add_parser("export", help="re-export a qframe output directory with another backend")
    p.add_argument("directory")
    p.add_argument("--backend", required=True)
    p.add_argument("--output", help="default: DIR/BACKEND")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="a backend option, as the recipe's [export] table takes it, e.g. tp_size=2")

    p = sub.add_parser("plugins", help="list installed plugins")
    p.add_argument("--json", action="store_true")

    p = sub.add_parser("validate", help="check a recipe and the plugins it names, or an exported checkpoint directory")
    p.add_argument("recipe", metavar="RECIPE_OR_DIR")
    p.add_argument("--backend", help="the backend that wrote DIR (default: the one that recognizes it)")
    p.add_argument("--model", help="check RECIPE against this model's config (no weights are read); default: the "
                   "recipe's [model] id, else a Llama-shaped stand-in")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    return parser


@contextmanager
def _layer_progress(enabled: bool = True) -> Iterator:
    columns = (TextColumn("[bold]quantizing"), BarColumn(), TextColumn("{task.completed}/{task.total} {task.description}"),
               TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn())
    progress = Progress(*columns, console=err, disable=not enabled, transient=True)  # gone before the result line
    tasks: list = []

    def update(done: int, total: int, name: str) -> None:
        if not tasks:  # start the clock at the first layer, not while the model loads
            progress.start()
            tasks.append(progress.add_task("", total=total))
        progress.update(tasks[0], completed=done, total=total, description=name)

    try:
        yield update
    finally:
        progress.stop()


def cmd_apply(args) -> int:
    from . import api
    from .distributed import init_from_environment

    # Under torchrun (WORLD_SIZE > 1) every process joins one group and takes a share of the
    # calibration batches; rank 0 reports and writes, the others stay quiet.
    ranks = None if args.dry_run else init_from_environment(args.device)
    if ranks is not None and not ranks.writer:
        warnings.filterwarnings("ignore")  # rank 0 says each of them once
        api.apply(args.recipe, model=args.model, output=args.output, overrides=args.overrides, device=args.device,
                  resume=args.resume)
        return 0
    with _layer_progress() as progress:
        result = api.apply(args.recipe, model=args.model, output=args.output, overrides=args.overrides,
                           device=args.device, dry_run=args.dry_run, progress=progress, resume=args.resume)
    recipe = result.plan.recipe
    if args.dry_run:
        summary = {"dry_run": True, "recipe": recipe.to_dict(),
                   "needs_calibration_data": result.plan.needs_calibration_data}
    else:
        manifest = result.qmodel.manifest
        experts = len(manifest.get("experts") or {})
        summary = {"output": str(result.output), "modules": len(manifest["modules"]) + experts,
                   "experts_modules": experts, "timings": manifest["timings"], "dataset": manifest["dataset"],
                   "coverage": manifest.get("coverage")}
    if args.json:
        print(strict_dumps(summary, "the summary"))
    elif args.dry_run:
        err.print(f"recipe {args.recipe} is valid; stages: "
                  + ", ".join(s.quantizer for s in recipe.stages)
                  + ("; calibrates on " + recipe.calibration.dataset if result.plan.needs_calibration_data else "; needs no calibration data"))
    else:
        experts = summary["experts_modules"]
        of_them = f", {experts} of them fused experts" if experts else ""
        err.print(f"wrote {summary['output']} in {summary['timings']['total_s']:.1f} s ({summary['modules']} quantized "
                  f"modules{of_them}{_coverage_note(summary['coverage'])})", highlight=False, markup=False, soft_wrap=True)
    return 0


def _coverage_note(coverage: dict | None) -> str:
    """``, 9 % of decoder weights; not quantized: mlp.experts.gate_up_proj, ...`` for the summary
    line (names without their layers: the warning above it has those)."""
    if not coverage:
        return ""
    from .coverage import Coverage

    note = f", {Coverage(coverage['quantized_params'], coverage['decoder_params']).percent()} of decoder weights"
    left = [entry.rsplit(" (", 1)[0] for entry in coverage.get("not_quantized", [])]
    return note + (f"; not quantized: {', '.join(left)}" if left else "")


def cmd_eval(args) -> int:
    from . import api
    from .checkpoint import is_native
    from .data import DataContext, check_window_sizes, evaluation_windows
    from .errors import ModelError, QFrameError
    from .checkpoint import NativeParts
    from .lazy import LazyModel
    from .model import LoadedModel, load_model, load_tokenizer, resolve_source
    from .plugins import default_registry

    if args.seq_len < 2 or (args.samples is not None and args.samples < 1) or args.batch_size < 1:
        raise QFrameError("--seq-len must be at least 2, --samples and --batch-size at least 1")
    check_window_sizes(args.samples, args.seq_len, "--samples", "--seq-len")
    check_window_sizes(args.batch_size, 1, "--batch-size", "--seq-len")
    # --layerwise reads both models a layer at a time from their files (a qframe output through
    # NativeParts, a local model through LazyModel): neither is ever whole in memory.
    parts = NativeParts(args.model, default_registry()) if args.layerwise and is_native(args.model) else None
    qmodel = parts.qmodel if parts else api.load_quantized(args.model) if is_native(args.model) else None
    # The unquantized model: the argument itself, or the source a qframe output records.
    source = qmodel.manifest["model"].get("location") if qmodel and "model" in qmodel.manifest else args.model
    base = lazy_base = None
    dtype = qmodel.manifest.get("dtype", "auto") if qmodel else "auto"
    try:
        resolved = resolve_source(source) if source else None
        if resolved is not None and args.layerwise and resolved.kind in ("dir", "gguf"):
            lazy_base = LazyModel(resolved.location, dtype)
            base = LoadedModel(lazy_base.model, load_tokenizer(resolved), resolved)
        elif resolved is not None:
            base = load_model(resolved, dtype)
    except ModelError as exc:
        if qmodel is None:
            raise
        err.print(f"[yellow]warning:[/] not evaluating the unquantized model: {escape(str(exc))}", highlight=False)
    if lazy_base is not None and args.dataset.partition("?")[0].partition(":")[0] == "generated":
        raise QFrameError("--layerwise reads the models a layer at a time, and dataset 'generated' is text the whole "
                          "model writes; evaluate on a text dataset (--dataset text:FILE)")
    tokenizer = base.tokenizer if base else qmodel.tokenizer
    if tokenizer is None:
        raise QFrameError(f"{args.model} holds no tokenizer and records no source model to take one from; "
                          "save the tokenizer beside the checkpoint (qframe.export does when the QuantizedModel has one)")
    # One set of windows for both models (generated text comes from the unquantized model).
    context = DataContext(tokenizer, base.model if base else qmodel.model,
                          samples=args.samples or 16, seq_len=args.seq_len, device=str(api.pick_device(args.device)))
    windows = evaluation_windows(args.dataset, context, default_registry(), args.samples)
    # --layerwise forces it; without it evaluate() decides (never on the CPU, where the model already is).
    common = dict(device=args.device, batch_size=args.batch_size, layerwise=True if args.layerwise else None)
    report: dict = {}
    base_model = lazy_base if lazy_base is not None else base.model if base else None
    if qmodel is not None:
        report.update(api.evaluate(parts or qmodel, windows, **common).to_dict())
        if base is not None:
            baseline = api.evaluate(base_model, windows, **common)
            report["baseline"] = baseline.to_dict()
            report["delta"] = report["perplexity"] - baseline.perplexity
            report["delta_pct"] = 100.0 * report["delta"] / baseline.perplexity
    else:
        report.update(api.evaluate(base_model, windows, **common).to_dict())
    report["dataset"] = args.dataset
    if not math.isfinite(report["perplexity"]) or not math.isfinite(report.get("baseline", {}).get("perplexity", 0.0)):
        which = "the quantized model's" if qmodel is not None and not math.isfinite(report["perplexity"]) else "the model's"
        raise QFrameError(f"{which} perplexity on {args.dataset} is not finite: its logits overflow or hold NaN on "
                          "these windows (an fp16 model often does; evaluate it in bfloat16 or float32)")
    if args.json:
        print(strict_dumps(report, "the report"))
    else:
        line = f"perplexity {report['perplexity']:.4f} on {report['tokens']} tokens"
        if "baseline" in report:
            line += f"; unquantized {report['baseline']['perplexity']:.4f} ({report['delta_pct']:+.2f} %)"
        print(line)
    return 0


def cmd_export(args) -> int:
    from pathlib import Path

    from . import api

    from .recipe import apply_override, parse_overrides

    options: dict = {}
    for key, value in parse_overrides(args.overrides).items():
        apply_override(options, key, value)  # build.max_batch_size=8 -> {"build": {...}}
    out = api.export_directory(args.directory, args.backend,
                               args.output or Path(args.directory) / api.export_subdirectory(args.backend),
                               options=options)
    err.print(f"wrote {out}")
    return 0


def cmd_plugins(args) -> int:
    from .plugins import default_registry

    registry = default_registry()
    for failure in registry.failures:
        err.print(f"[yellow]warning:[/] {escape(str(failure))}", highlight=False)  # plugin text is not markup
    rows = [{"kind": e.kind, "name": e.record.name, "summary": e.record.summary,
             "provider": e.provider, "distribution": e.distribution} for e in registry.entries()]
    if args.json:
        print(strict_dumps({"plugins": rows, "failures": [f.__dict__ for f in registry.failures]}, "the plugin list"))
        return 0
    table = Table("kind", "name", "summary", "provider")
    for row in rows:
        table.add_row(*(escape(text) for text in (row["kind"], row["name"], row["summary"],
                                                  f"{row['provider']} ({row['distribution']})")))
    Console().print(table)
    return 0


def cmd_validate(args) -> int:
    from pathlib import Path

    from .plugins import default_registry
    from .recipe import load_recipe, resolve

    from .api import check_export

    registry = default_registry()
    if Path(args.recipe).is_dir():
        return _validate_directory(Path(args.recipe), args.backend, registry)
    plan = resolve(load_recipe(args.recipe, args.overrides), registry)
    model = args.model or plan.recipe.model.id or None
    description = check_export(plan, model, registry=registry)
    against = f"; checked against {model}'s config" if description is not None and description.shapes_known else ""
    print(f"{args.recipe}: valid ({len(plan.stages)} stage{'s' if len(plan.stages) != 1 else ''}: "
          + ", ".join(s.spec.quantizer for s in plan.stages) + f"; export: {plan.backend.name}{against})")
    return 0


def _validate_directory(directory, backend: str | None, registry) -> int:
    from .errors import QFrameError
    from .recipe import make_exporter

    candidates = [registry.get("backend", backend)] if backend else [e.record for e in registry.entries("backend")]
    validators = []
    for record in candidates:
        try:
            exporter = make_exporter(record, registry=registry)
        except QFrameError:  # a backend whose options have no defaults cannot be asked
            continue
        if hasattr(exporter, "validate") and (backend or exporter.recognizes(directory)):
            validators.append((record.name, exporter))
    if not validators:
        raise QFrameError(f"no installed backend recognizes {directory} as its checkpoint; name one with --backend")
    name, exporter = validators[0]
    problems = exporter.validate(directory)
    for problem in problems:
        print(f"{directory}: {problem}")
    if problems:
        print(f"{directory}: NOT a valid {name} checkpoint ({len(problems)} problem{'s' if len(problems) != 1 else ''})",
              file=sys.stderr)
        return 2
    print(f"{directory}: valid {name} checkpoint")
    return 0


COMMANDS = {"apply": cmd_apply, "eval": cmd_eval, "export": cmd_export, "plugins": cmd_plugins, "validate": cmd_validate}


def _warning_line(message, category, filename, lineno, line=None) -> str:
    return f"qframe: warning: {message}\n"


def main(argv: list[str] | None = None) -> int:
    from .distributed import RankFailure
    from .errors import QFrameError

    warnings.formatwarning = _warning_line  # qframe's warnings read as one line, like its errors

    args = _parser().parse_args(argv)
    if argv is None:  # the console script, not a call from Python: SIGTERM cleans up like Ctrl-C
        raise_on_sigterm()
    try:
        return COMMANDS[args.command](args)
    except RankFailure as exc:  # not the user's input: another process of the run stopped
        print(f"qframe {args.command}: error: {exc}", file=sys.stderr)
        return 1
    except QFrameError as exc:
        paragraph = " ".join(str(exc).split("\n"))  # one paragraph, whatever a message quotes
        print(f"qframe {args.command}: error: {paragraph}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("qframe: interrupted; nothing unfinished was put in place", file=sys.stderr)
        return 130
    except Terminated:
        print("qframe: terminated; nothing unfinished was put in place", file=sys.stderr)
        return 143


if __name__ == "__main__":
    sys.exit(main())
