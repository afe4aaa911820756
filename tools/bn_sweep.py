#!/usr/bin/env python
"""Measure what batch norm buys on the digits data; write PNG plots and a JSON of the numbers.

    python tools/bn_sweep.py                 # full run (~10 min on 2 cores), into docs/results/
    python tools/bn_sweep.py --quick --out /tmp/bn   # tiny grid: about 6 s of CPU
    python tools/bn_sweep.py --only curves   # just the Ioffe & Szegedy learning curves

Writes into --out, per sweep network (--models): sweep_<model>.json and sweep_<model>.png (final
validation accuracy against learning rate, with and without BN, per optimizer); and curves.json
and curves.png (validation accuracy against training step, and one last-hidden-layer unit's
sigmoid input over training).
Every training run uses one thread, so the numbers do not depend on the machine's core count.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

# Run from a checkout without installing: the package is one folder up.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bn_onnx.cli._common import positive_int  # noqa: E402
from bn_onnx.errors import BnOnnxError, UsageError  # noqa: E402
from bn_onnx.files import atomic_output  # noqa: E402

Reporter = Callable[[int, int, str], None]


def build_parser() -> argparse.ArgumentParser:
    """The script's options."""
    p = argparse.ArgumentParser(
        prog="bn_sweep.py", description=__doc__.split("\n\n")[0].strip(), allow_abbrev=False
    )
    p.add_argument(
        "--out",
        default="docs/results",
        help="output folder, made if missing (default docs/results)",
    )
    p.add_argument("--quick", action="store_true", help="tiny grid and few steps (for tests)")
    p.add_argument("--only", choices=("sweep", "curves"), help="run one experiment (default: both)")
    p.add_argument(
        "--models",
        default="relu,sigmoid",
        help="sweep networks, comma-separated: relu = (128,64) relu, sigmoid = 3x100 sigmoid",
    )
    p.add_argument(
        "--epochs",
        type=positive_int,
        help="sweep epochs per run instead of the default; files get an _<N>ep suffix",
    )
    p.add_argument("--no-plots", action="store_true", help="write the JSON only")
    p.add_argument("--quiet", action="store_true", help="print nothing but errors")
    return p


def _reporter(quiet: bool) -> tuple[Reporter | None, Callable[[], None]]:
    """A progress callback: a rich bar on a TTY, plain lines otherwise, nothing when quiet."""
    if quiet:
        return None, lambda: None
    if sys.stderr.isatty():
        from rich.progress import Progress

        bar = Progress(transient=True)
        bar.start()
        tasks: dict[str, int] = {}

        def report(done: int, total: int, what: str) -> None:
            name = what.split(":")[0]
            if name not in tasks:
                tasks[name] = bar.add_task(name, total=total)
            bar.update(tasks[name], completed=done, description=what)

        return report, bar.stop

    def plain(done: int, total: int, what: str) -> None:
        print(f"[{done}/{total}] {what}", file=sys.stderr, flush=True)

    return plain, lambda: None


def _write_json(data: dict, path: Path) -> None:
    from bn_onnx.sweep import to_json

    with atomic_output(path) as tmp:
        tmp.write_text(to_json(data))
        tmp.chmod(0o644)


def _save_plot(draw: Callable[[dict, str], None], data: dict, path: Path) -> None:
    with atomic_output(path, suffix=".png") as tmp:
        draw(data, str(tmp))
        tmp.chmod(0o644)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the experiments asked for; return 0, or 2 after printing a one-line error."""
    args = build_parser().parse_args(argv)
    try:
        return _run(args)
    except BnOnnxError as exc:
        print(f"bn_sweep.py: error: {exc}", file=sys.stderr)
        return exc.exit_code


def _models(text: str, known: dict) -> tuple[str, ...]:
    """The --models list, checked against the known sweep networks."""
    models = tuple(m.strip() for m in text.split(",") if m.strip())
    bad = [m for m in models if m not in known]
    if bad or not models:
        name = repr(bad[0]) if bad else "list (empty)"
        raise UsageError(f"unknown sweep model {name}; choose from {', '.join(known)}")
    return models


def _run(args: argparse.Namespace) -> int:
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out must be a folder, but {out} is a file")
    out.mkdir(parents=True, exist_ok=True)
    from bn_onnx import sweep

    report, stop = _reporter(args.quiet)
    try:
        if args.only in (None, "sweep"):
            models = _models(args.models, sweep.SWEEP_MODELS)
            base = sweep.SweepSettings.quick() if args.quick else sweep.SweepSettings()
            # One JSON and one PNG per network, so the networks can be run separately.
            if args.epochs is not None:
                base = dataclasses.replace(base, epochs=args.epochs)
            suffix = "" if args.epochs is None else f"_{args.epochs}ep"
            for model in base.models if args.quick else models:
                settings = dataclasses.replace(base, models=(model,))
                result = sweep.run_sweep(settings, progress=report)
                _write_json(result, out / f"sweep_{model}{suffix}.json")
                if not args.no_plots:
                    part = result["models"][model]
                    _save_plot(sweep.plot_sweep, part, out / f"sweep_{model}{suffix}.png")
                if not args.quiet:
                    print(sweep.format_sweep_summary(result))
        if args.only in (None, "curves"):
            settings = sweep.CurveSettings.quick() if args.quick else sweep.CurveSettings()
            result = sweep.run_curves(settings, progress=report)
            _write_json(result, out / "curves.json")
            if not args.no_plots:
                _save_plot(sweep.plot_curves, result, out / "curves.png")
            if not args.quiet:
                print(sweep.format_curves_summary(result))
    finally:
        stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
