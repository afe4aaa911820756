"""`bn-onnx export`: a checkpoint to one ONNX file, BatchNormalization kept or folded."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from bn_onnx.cli._common import add_command, positive_int

EPILOG = """\
The unfolded file holds one BatchNormalization node per batch-norm layer (the input
normalization included): Gemm -> BatchNormalization -> Relu ... . With --fold every one is
folded into its neighbouring Gemm and none remains. Input `input` float32 [batch, features],
output `logits` (classification) or `prediction` (regression); the metadata holds the model
config, preprocessing and class names. A tabular checkpoint (categorical columns or missing
values) gives a file that takes the raw columns instead, `continuous` float32 (NaN = missing)
and `categorical` strings ("" = missing), with the fill, indicators, category lookup and
embeddings inside the graph and the columns in the metadata `bn_onnx.columns`.

example:
  bn-onnx export runs/digits -o digits.onnx
  bn-onnx export runs/digits -o digits.folded.onnx --fold
  bn-onnx export runs/digits -o digits.int8.onnx --quantize
"""


HELP = "export a checkpoint to ONNX (BatchNormalization kept, or folded with --fold)"
DESCRIPTION = """\
Export a checkpoint directory to ONNX with torch's dynamo exporter (optimize=False, so
every BatchNormalization node is kept unless --fold)."""


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Register `export`."""
    p = add_command(subparsers, "export", HELP, DESCRIPTION, EPILOG)
    p.add_argument("checkpoint", metavar="CHECKPOINT_DIR", help="checkpoint written by train")
    p.add_argument("-o", "--output", required=True, metavar="OUT.onnx", help="ONNX file to write")
    p.add_argument(
        "--fold", action="store_true", help="fold every BatchNormalization into its Gemm"
    )
    p.add_argument(
        "--cleanup",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="with --fold, also fold the constants the exporter left and remove dead code "
        "(default); --no-cleanup changes nothing but the BatchNormalization nodes",
    )
    p.add_argument(
        "--quantize",
        action="store_true",
        help="write an INT8 (QDQ) model instead, calibrated and proven on the checkpoint's "
        "splits as `bn-onnx quantize --checkpoint` does",
    )
    p.add_argument("--accurate", action="store_true", help="with --quantize: u8u8 kernels (slower)")
    p.add_argument(
        "--opset", type=positive_int, default=18, metavar="N", help="ONNX opset (default 18)"
    )
    p.add_argument("--quiet", "-q", action="store_true", help="print nothing on success")
    return p


class _Progress:
    """A spinner on a terminal, one plain line otherwise, nothing with --quiet."""

    def __init__(self, quiet: bool) -> None:
        self.quiet = quiet
        self.status: Any = None

    def start(self, message: str) -> None:
        if self.quiet:
            return
        if sys.stderr.isatty():
            from rich.console import Console

            self.status = Console(stderr=True).status(message + " ...")
            self.status.start()
        else:
            print(message + " ...", file=sys.stderr, flush=True)

    def stop(self) -> None:
        if self.status is not None:
            self.status.stop()
            self.status = None


def run(args: argparse.Namespace) -> int:
    """Export, then print what was written."""
    from bn_onnx.errors import UsageError
    from bn_onnx.export import check_opset, export_checkpoint
    from bn_onnx.files import check_output_path

    if args.accurate and not args.quantize:
        raise UsageError("--accurate needs --quantize (it picks the INT8 kernels)")
    if not args.cleanup and not args.fold:
        raise UsageError("--no-cleanup needs --fold (the cleanup runs only after the fold)")
    check_output_path(args.output)  # a folder or a missing folder: that message first
    suffix = Path(args.output).suffix.lower()
    if suffix != ".onnx":
        raise UsageError(
            f"output {args.output} must be a .onnx file (got {suffix or 'no extension'!r})"
        )
    check_opset(args.opset)
    progress = _Progress(args.quiet)
    if args.quantize:
        from bn_onnx.cli.quantize import export_quantized

        try:
            return export_quantized(args, on_start=progress.start)
        finally:
            progress.stop()
    try:
        result = export_checkpoint(
            args.checkpoint,
            args.output,
            fold=args.fold,
            opset=args.opset,
            on_start=progress.start,
            cleanup=args.cleanup,
        )
    finally:
        progress.stop()
    if args.quiet:
        return 0
    ops = ", ".join(f"{op} {n}" for op, n in result.op_counts.items())
    size = sum(f.stat().st_size for f in result.files)
    print(f"wrote {', '.join(str(f) for f in result.files)} ({size:,} bytes, opset {result.opset})")
    if result.folded:
        print(
            f"BatchNormalization: {result.n_bn_exported} exported, "
            f"{result.n_bn_exported - result.n_bn} folded, {result.n_bn} left"
        )
        cleanup = (result.fold_report or {}).get("cleanup")
        if cleanup is not None:
            from bn_onnx.fold.report import cleanup_line

            print(cleanup_line(cleanup))
    else:
        print(f"BatchNormalization: {result.n_bn} kept (unfolded)")
    print(f"ops: {ops}")
    folding = f", fold {result.fold_seconds:.3f} s" if args.fold else ""
    print(f"time: export {result.export_seconds:.2f} s{folding}")
    return 0
