"""`bn-onnx quantize IN.onnx -o OUT.onnx`: an INT8 (QDQ) model, with the proof of what it costs."""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from bn_onnx.cli._common import add_command, non_negative_float, positive_int

if TYPE_CHECKING:
    from bn_onnx.quantize import Kernels

DEFAULT_CALIBRATION_ROWS = 2048

EPILOG = """\
The BNs are folded first, except one whose fold into the layer after it would widen that
weight's per-channel range past --max-row-range-growth (the quantizer gives it a scale of its
own). Then onnxruntime's basic optimizations and its quantize_static: QDQ, per-channel
weights, MinMax calibration. Kernels by CPU: u8s8 with reduce_range without VNNI, u8s8 with
it, u8u8 with --accurate. The INT8 model is compared with IN.onnx on the calibration data and
the checkpoint's test split; it is written only when the accuracy drop is within budget.
The top-1 gate is for classifiers: a model without bn_onnx.task metadata (another tool's
export) needs --task classification for it, else only SQNR and max error are reported.

example:
  bn-onnx quantize models/digits/model.onnx -o digits.int8.onnx \\
      --checkpoint models/digits/checkpoint
"""


HELP = "quantize a model to INT8 (QDQ) with onnxruntime, after the fold, with a proof"
DESCRIPTION = """\
Fold the batch norm (quantization-aware), pre-process and quantize IN.onnx to INT8 with
onnxruntime's quantize_static, then prove the cost: top-1 agreement, accuracy, SQNR and
max error against IN.onnx, and every op left in float."""


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Register `quantize`."""
    p = add_command(subparsers, "quantize", HELP, DESCRIPTION, EPILOG)
    p.add_argument("model", metavar="IN.onnx", help="the float model")
    p.add_argument("-o", "--output", required=True, metavar="OUT.onnx", help="the INT8 model")
    p.add_argument(
        "--calibrate",
        metavar="X",
        help="calibration data: .npz (one array per input name), .npy, .csv or .parquet, "
        "read as `bn-onnx run` reads inputs (default: the --checkpoint's training split)",
    )
    p.add_argument(
        "--checkpoint",
        metavar="DIR",
        help="the checkpoint IN.onnx was exported from: its training split calibrates (unless "
        "--calibrate) and its test split measures the accuracy",
    )
    p.add_argument("--report", metavar="REPORT.json", help="write the fold report and proof")
    p.add_argument(
        "--task",
        choices=("classification", "regression"),
        help="what the first output is, for a model without bn_onnx.task metadata (one "
        "exported by another tool): classification gates on top-1 agreement against "
        "--max-accuracy-drop; regression on SQNR and max error only (without --task: top-1 "
        "only for a first output named logits)",
    )
    add_options(p)
    return p


def add_options(p: argparse.ArgumentParser) -> None:
    """The quantization options shared with `export --quantize`."""
    p.add_argument(
        "--accurate",
        action="store_true",
        help="u8u8 kernels: uint8 weights, the most accurate, slower (default: u8s8)",
    )
    p.add_argument(
        "--max-accuracy-drop",
        type=non_negative_float,
        default=0.5,
        metavar="POINTS",
        help="fail (exit 1, nothing written) when test accuracy drops more, in percentage "
        "points; without labels, the top-1 disagreement; classifiers only (default: 0.5)",
    )
    p.add_argument(
        "--max-row-range-growth",
        type=non_negative_float,
        default=None,
        metavar="X",
        help="keep a BN whose fold into the next layer would widen that weight's per-channel "
        "max/rms more than X times (default: 2; 0: fold every BN)",
    )
    p.add_argument(
        "--calibration-rows",
        type=positive_int,
        default=DEFAULT_CALIBRATION_ROWS,
        metavar="N",
        help=f"at most N calibration rows, a seeded sample (default: {DEFAULT_CALIBRATION_ROWS})",
    )
    p.add_argument("-q", "--quiet", action="store_true", help="print nothing on success")


def _sample(feeds: Mapping[str, Any], rows: int) -> dict[str, Any]:
    import numpy as np

    n = len(next(iter(feeds.values())))
    if n <= rows:
        return dict(feeds)
    keep = np.sort(np.random.default_rng(0).choice(n, rows, replace=False))
    return {k: np.asarray(v)[keep] for k, v in feeds.items()}


def read_calibration(path: str, predictor: Any) -> dict[str, Any]:
    """The model's feeds from a calibration file, checked by `Predictor.feeds` (one-line
    errors for a wrong shape, dtype, column or non-finite value).

    Raises:
        InputFileError, InputDataError: unreadable file, wrong format, no rows.
    """
    import numpy as np

    from bn_onnx.arrays import input_format, open_columns, read_array
    from bn_onnx.cli.verify import read_inputs
    from bn_onnx.errors import InputDataError
    from bn_onnx.files import check_input_file

    check_input_file(path, "calibration file")
    if path.lower().endswith(".npz"):
        return predictor.feeds(read_inputs(path))
    fmt = input_format(path)
    if predictor.columns is not None or fmt == ".parquet":
        reader = open_columns(path)
        names = [c.name for c in predictor.columns] if predictor.columns is not None else None
        parts = [predictor.feeds(chunk, row_offset=lo) for lo, chunk in reader.chunks(8192, names)]
        if not parts:
            raise InputDataError(f"calibration file {os.path.basename(path)} has no data rows")
        return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
    return predictor.feeds(np.asarray(read_array(path)))


def checkpoint_splits(path: str) -> tuple[Any, dict[str, Any], tuple[dict[str, Any], Any], str]:
    """(checkpoint, training feeds, (test feeds, test labels or None), dataset name)."""
    import numpy as np

    from bn_onnx.checkpoint import read_checkpoint
    from bn_onnx.data import load_split_from_checkpoint_meta
    from bn_onnx.onnx_meta import INPUT_NAME

    ckpt = read_checkpoint(path)
    data = load_split_from_checkpoint_meta(ckpt.meta)
    if data.feeds_train is not None:  # tabular: the raw columns
        train, test = dict(data.feeds_train), dict(data.feeds_test)
    else:
        train, test = {INPUT_NAME: data.x_train}, {INPUT_NAME: data.x_test}
    labels = np.asarray(data.y_test) if data.task == "classification" else None
    return ckpt, train, (test, labels), str(ckpt.meta["dataset"].get("name", "dataset"))


def quantize_file(
    model_path: str,
    output: str,
    *,
    calibrate: str | None,
    checkpoint: str | None,
    accurate: bool,
    max_accuracy_drop: float,
    max_row_range_growth: float | None,
    calibration_rows: int,
    report_path: str | None = None,
    quiet: bool = False,
    protected: tuple[str, ...] = (),
    float_label: str | None = None,
    task: str | None = None,
    kernels: Kernels | None = None,
) -> int:
    """Quantize, prove, print and write atomically; 0 written, 1 over budget (nothing
    written). `protected`: more paths the outputs must not be. `task`: "classification" or
    "regression" for a model without `bn_onnx.task` metadata. `kernels`: instead of this
    CPU's (`choose_kernels`), e.g. the reduce_range kernels a file shipped to any CPU needs.

    Raises:
        UsageError: an output is a file the command reads or the other output; `task`
            contradicts the model's metadata.
    """
    import onnx

    from bn_onnx.checkpoint import CHECKPOINT_FILES
    from bn_onnx.errors import UsageError
    from bn_onnx.files import (
        OutputGroup,
        check_input_file,
        check_output_path,
        check_outputs,
        checkpoint_files,
        model_files,
    )
    from bn_onnx.onnx_io import load_model
    from bn_onnx.quantize import DEFAULT_MAX_GROWTH, choose_kernels, quantize_model
    from bn_onnx.quantize.pipeline import batches
    from bn_onnx.quantize.proof import prove, render
    from bn_onnx.runtime import Predictor

    check_input_file(model_path, "model file")
    out = check_output_path(output)
    outputs = [("output", out)]
    if report_path:
        outputs.append(("--report", check_output_path(report_path)))
    check_outputs(  # no --in-place: the float model, its data and the checkpoint stay
        outputs,
        lambda: [
            *model_files(model_path),
            *checkpoint_files(checkpoint, CHECKPOINT_FILES),
            *([("the calibration file", calibrate)] if calibrate else []),
            *(("the input file", p) for p in protected),
        ],
    )
    if calibrate is None and checkpoint is None:
        raise UsageError("give calibration data: --calibrate X or --checkpoint DIR")
    predictor = Predictor(model_path, provider="cpu")
    if task is not None and predictor.task not in (None, task):
        raise UsageError(f"--task {task}: the model's metadata says its task is {predictor.task}")
    probes: list[tuple[str, Any, Any]] = []
    test = None
    if checkpoint is not None:
        _, train, test, name = checkpoint_splits(checkpoint)
        source = f"the checkpoint's training split ({name}, "
    if calibrate is not None:
        feeds = read_calibration(calibrate, predictor)
        source = f"{calibrate} ("
    else:
        feeds = predictor.feeds(train)
    feeds = _sample(feeds, calibration_rows)
    rows = len(next(iter(feeds.values())))
    source += f"{rows} rows)"
    kernels = kernels or choose_kernels(accurate=accurate)
    growth = DEFAULT_MAX_GROWTH if max_row_range_growth is None else max_row_range_growth
    result = quantize_model(
        load_model(model_path), batches(feeds), kernels, max_row_range_growth=growth or None
    )
    if test is not None:
        test_feeds, labels = test
        n = len(next(iter(test_feeds.values())))
        probes.append(
            (f"the checkpoint's test split ({n} rows)", predictor.feeds(test_feeds), labels)
        )
    probes.append((f"calibration data ({rows} rows)", feeds, None))
    reasons = {
        n: "kept in float: it computes the input of a BatchNormalization the fold left"
        for n in result.excluded
    }
    reasons.update({e.node: "left by the fold (above)" for e in result.fold_report.left})
    first = predictor.output_names[0]
    classifier = [first] if (predictor.task or task) == "classification" else []
    if not classifier and predictor.task is None and task is None and first == "logits":
        classifier = ["logits"]
    notes = []
    if not classifier and predictor.task is None and task is None:
        cols = _columns(predictor, feeds)
        if cols is not None and cols >= 2:
            notes.append(
                f"{os.path.basename(model_path)} has no bn_onnx.task metadata and its first "
                f"output {first} has {cols} columns: the gate is SQNR and max error only; pass "
                "--task classification to gate on top-1 agreement (--max-accuracy-drop)"
            )
    proof = prove(
        model_path,
        result.model,
        probes,
        classifier=classifier,
        max_accuracy_drop=max_accuracy_drop,
        reasons=reasons,
    )
    report = result.fold_report
    lines = [f"kernels: {kernels.describe()}", f"calibration: {source}"]
    lines.append(f"fold: folded {report.n_folded} of {report.n_bn} BatchNormalization nodes")
    lines.extend(f"  left    {e.node}: {e.reason}" for e in report.left)
    lines.append(_quantized_line(result.model, report.nodes_before))
    lines.extend(render(proof))
    for note in notes:
        print(f"bn-onnx quantize: note: {note}", file=sys.stderr)
    if not proof:
        print("\n".join(lines))
        print(f"not written: {out} (over the accuracy budget)")
        if _folded_already(predictor, report.n_bn):
            print(
                "hint: the input normalization of this model is folded already, so the "
                "quantization-aware fold cannot keep that BN; quantize the unfolded model "
                "(model.onnx) instead"
            )
        return 1
    with OutputGroup() as group:
        onnx.save_model(result.model, group.path(out))
        if report_path:
            data = {"kernels": kernels.describe(), "calibration": source}
            data.update(fold=report.to_dict(), proof=proof.to_dict())
            with group.open(report_path, "w") as f:
                f.write(json.dumps(_finite(data), indent=2, default=str) + "\n")
    size = out.stat().st_size
    before = sum(os.path.getsize(p) for _, p in model_files(model_path) if os.path.isfile(p))
    lines.append(f"wrote {out} ({size:,} bytes; {float_label or model_path}: {before:,} bytes)")
    if not quiet:
        print("\n".join(lines))
    return 0


def _columns(predictor: Any, feeds: Mapping[str, Any]) -> int | None:
    """The column count of the first output on one calibration row; None unless 2-D."""
    one = {k: v[:1] for k, v in feeds.items()}
    y = predictor.info.session.run([predictor.output_names[0]], one)
    return int(y[0].shape[1]) if y[0].ndim == 2 else None


def _folded_already(predictor: Any, n_bn: int) -> bool:
    """True for a model bn-onnx folded (`bn_onnx.folded` true) with no BN left to keep."""
    from bn_onnx.onnx_meta import FOLDED

    return n_bn == 0 and str(predictor.metadata.get(FOLDED, "")).lower() == "true"


def _finite(value: Any) -> Any:
    """`value` with every non-finite float (an exact output's SQNR) as None: strict JSON."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value


def _quantized_line(model: Any, nodes_before: int) -> str:
    """ "quantized: Gemm 3 in INT8; QuantizeLinear 4, DequantizeLinear 10; nodes 8 -> 18"."""
    from bn_onnx.quantize.proof import QDQ_OPS, int8_ops

    ops = [n.op_type for n in model.graph.node]
    inside = ", ".join(f"{op} {k}" for op, k in int8_ops(model).items()) or "no op"
    qdq = ", ".join(f"{op} {ops.count(op)}" for op in QDQ_OPS)
    return f"quantized: {inside} in INT8; {qdq}; nodes {nodes_before} -> {len(ops)}"


def export_quantized(args: argparse.Namespace, on_start: Any = None) -> int:
    """`export --quantize`: export the checkpoint (BN kept) to a temporary file beside the
    output, then quantize it calibrated on the checkpoint's training split."""
    import shutil
    import tempfile
    from pathlib import Path

    from bn_onnx.export import export_checkpoint
    from bn_onnx.files import check_output_path

    out = check_output_path(args.output)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
    try:
        exported = export_checkpoint(
            args.checkpoint, tmp / "float.onnx", opset=args.opset, on_start=on_start
        )
        protected = tuple(str(Path(args.checkpoint) / f) for f in os.listdir(args.checkpoint))
        return quantize_file(
            str(exported.path),
            args.output,
            calibrate=None,
            checkpoint=args.checkpoint,
            accurate=args.accurate,
            max_accuracy_drop=0.5,
            max_row_range_growth=None,
            calibration_rows=DEFAULT_CALIBRATION_ROWS,
            quiet=args.quiet,
            protected=protected,
            float_label="the float export",
        )
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def run(args: argparse.Namespace) -> int:
    return quantize_file(
        args.model,
        args.output,
        calibrate=args.calibrate,
        checkpoint=args.checkpoint,
        accurate=args.accurate,
        max_accuracy_drop=args.max_accuracy_drop,
        max_row_range_growth=args.max_row_range_growth,
        calibration_rows=args.calibration_rows,
        report_path=args.report,
        quiet=args.quiet,
        task=args.task,
    )
