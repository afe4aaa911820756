"""What a model takes and gives: its inputs and outputs, their dtypes and dims, probe shapes.

Symbolic dims get concrete sizes for the probes. `--shape NAME:1x3x224x224` fixes an input's
dims (as Polygraphy's `--input-shapes` and onnxruntime_perf_test's free-dimension overrides do).
Otherwise a symbolic first dim is the batch and gets the probe batch size, any other dim with the
same name gets the same size, and every other symbolic dim gets `SMALL_DIM`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import onnx

from bn_onnx.errors import UnsupportedModelError, UsageError
from bn_onnx.onnx_check import check_feed_bytes

FLOAT_TYPES = (
    onnx.TensorProto.FLOAT,
    onnx.TensorProto.FLOAT16,
    onnx.TensorProto.BFLOAT16,
    onnx.TensorProto.DOUBLE,
)
# A symbolic dim that is not the batch: small enough to be cheap, big enough for a 3x3 Conv
# with stride 2 a few times over. Pass --shape where a model needs more.
SMALL_DIM = 16
# One probe run holds at most about this many input elements (8 MiB of float64): a batch of
# 256 rows of an MLP, 6 images of 3x224x224.
ELEMENT_BUDGET = 1 << 20
# At most this many runs per probe kind for a model whose batch dim is fixed.
MAX_RUNS = 32

Dim = int | str


@dataclass(frozen=True)
class TensorSpec:
    """One graph input or output: name, ONNX element type, dims (int static, str symbolic).

    `dims` is None when the rank is unknown; an unnamed unknown dim is given a name of its own
    (`?input:1`) so that it is treated like any symbolic dim.
    """

    name: str
    elem_type: int
    dims: tuple[Dim, ...] | None

    @property
    def dtype(self) -> np.dtype:
        """The numpy dtype of the values (object for strings, ml_dtypes' bfloat16)."""
        if self.elem_type == onnx.TensorProto.STRING:
            return np.dtype(object)
        return np.dtype(onnx.helper.tensor_dtype_to_np_dtype(self.elem_type))

    @property
    def kind(self) -> str:
        """`float`, `int`, `bool`, `string` or `other`."""
        if self.elem_type in FLOAT_TYPES:
            return "float"
        if self.elem_type == onnx.TensorProto.STRING:
            return "string"
        if self.elem_type == onnx.TensorProto.BOOL:
            return "bool"
        if self.elem_type == onnx.TensorProto.UNDEFINED:
            return "other"
        return "int" if self.dtype.kind in "iu" else "other"

    @property
    def type_name(self) -> str:
        """numpy's name of the element type (`float32`, `bfloat16`, `int64`, `str`)."""
        if self.elem_type == onnx.TensorProto.UNDEFINED:
            return "?"
        return "str" if self.kind == "string" else self.dtype.name

    def describe(self) -> str:
        """`input float32 [batch, 64]`."""
        dims = "?" if self.dims is None else ", ".join(str(d) for d in self.dims)
        return f"{self.name} {self.type_name} [{dims}]"


@dataclass
class Signature:
    """A model's graph inputs (initializers excluded) and outputs."""

    inputs: list[TensorSpec]
    outputs: list[TensorSpec]

    def input(self, name: str) -> TensorSpec:
        """The input called `name`."""
        return next(s for s in self.inputs if s.name == name)


def _spec(vi: onnx.ValueInfoProto) -> TensorSpec:
    t = vi.type.tensor_type
    if not vi.type.HasField("tensor_type"):
        raise UnsupportedModelError(
            f"graph value {vi.name!r} is not a tensor ({vi.type.WhichOneof('value')}); verify "
            "compares tensors only"
        )
    dims: tuple[Dim, ...] | None = None
    if t.HasField("shape"):
        dims = tuple(
            d.dim_value if d.HasField("dim_value") else (d.dim_param or f"?{vi.name}:{i}")
            for i, d in enumerate(t.shape.dim)
        )
    return TensorSpec(vi.name, int(t.elem_type), dims)


def signature(model: onnx.ModelProto) -> Signature:
    """The inputs a caller feeds (not initializers, which IR < 4 lists as inputs) and outputs."""
    init = {t.name for t in model.graph.initializer}
    return Signature(
        [_spec(i) for i in model.graph.input if i.name not in init],
        [_spec(o) for o in model.graph.output],
    )


_FLOAT_NAMES = {
    onnx.TensorProto.BFLOAT16: "bfloat16",
    onnx.TensorProto.FLOAT16: "float16",
    onnx.TensorProto.FLOAT: "float32",
    onnx.TensorProto.DOUBLE: "float64",
}


def compute_dtype(model: onnx.ModelProto) -> str | None:
    """The float type of least precision the model computes in (its tolerance's dtype).

    Looks at graph inputs and outputs, initializers, Constant values and Cast targets of the
    main graph: a model with float32 inputs and outputs that casts to float16 inside computes
    in float16.
    """
    found = set()
    g = model.graph
    for vi in [*g.input, *g.output]:
        found.add(vi.type.tensor_type.elem_type)
    found.update(t.data_type for t in g.initializer)
    for node in g.node:
        for a in node.attribute:
            if node.op_type == "Cast" and a.name == "to":
                found.add(a.i)
            elif a.type == onnx.AttributeProto.TENSOR:
                found.add(a.t.data_type)
    names = [_FLOAT_NAMES[t] for t in found if t in _FLOAT_NAMES]
    order = list(_FLOAT_NAMES.values())
    return min(names, key=order.index) if names else None


def check_compatible(first: Signature, other: Signature, first_label: str, label: str) -> None:
    """Raise `UsageError` unless `other` takes the same inputs as `first` (names, types, dims)."""
    a = {s.name: s for s in first.inputs}
    b = {s.name: s for s in other.inputs}
    if set(a) != set(b):
        raise UsageError(
            f"{label} takes inputs {sorted(b)}, {first_label} takes {sorted(a)}: verify feeds "
            "both the same inputs by name"
        )
    for name, sa in a.items():
        sb = b[name]
        if sa.elem_type != sb.elem_type:
            raise UsageError(
                f"input {name!r} is {sb.type_name} in {label} but {sa.type_name} in {first_label}"
            )
        if sa.dims is not None and sb.dims is not None:
            if len(sa.dims) != len(sb.dims):
                raise UsageError(
                    f"input {name!r} is [{_dims(sb.dims)}] in {label} but [{_dims(sa.dims)}] in "
                    f"{first_label}"
                )
            for i, (da, db) in enumerate(zip(sa.dims, sb.dims, strict=True)):
                if isinstance(da, int) and isinstance(db, int) and da != db:
                    unit = " features" if len(sa.dims) == 2 and i == 1 else f" in dim {i}"
                    raise UsageError(
                        f"input {name!r}: {label} takes {db}{unit}, {first_label} takes {da}{unit}"
                    )


def _dims(dims: Sequence[Dim]) -> str:
    return ", ".join(str(d) for d in dims)


def parse_shape(text: str) -> tuple[str, tuple[int, ...]]:
    """`NAME:1x3x224x224` (or `NAME:1,3,224,224`) -> (name, dims); the name may hold colons."""
    name, sep, dims = text.rpartition(":")
    if not sep or not name:
        raise UsageError(f"--shape takes NAME:DIMS such as input:1x3x224x224, got {text!r}")
    parts = dims.replace(",", "x").split("x") if dims.strip() else []
    try:
        values = tuple(int(p) for p in parts)
    except ValueError:
        raise UsageError(
            f"--shape {text!r}: dims must be whole numbers such as 1x3x224x224"
        ) from None
    if any(v < 1 for v in values):  # a 0 dim is an empty probe: nothing would be compared
        raise UsageError(f"--shape {text!r}: dims must be >= 1")
    return name, values


@dataclass
class ShapePlan:
    """Concrete input shapes for the random probe, how many runs, and how each was chosen."""

    shapes: dict[str, tuple[int, ...]]
    runs: int
    batch: int | None  # the size given to batch-like dims, None when every dim was fixed
    notes: list[str] = field(default_factory=list)


def plan_shapes(
    inputs: Sequence[TensorSpec],
    overrides: Mapping[str, Sequence[int]] | None = None,
    *,
    rows: int = 256,
    budget: int = ELEMENT_BUDGET,
    max_runs: int = MAX_RUNS,
) -> ShapePlan:
    """Shapes for `rows` probe rows: symbolic dims resolved, split into runs within `budget`.

    Raises:
        UsageError: a `--shape` that names no input, has the wrong rank or contradicts a fixed
            dim or another `--shape` for the same symbolic dim; an input of unknown rank.
    """
    overrides = dict(overrides or {})
    names = {s.name for s in inputs}
    for name in overrides:
        if name not in names:
            raise UsageError(f"--shape names no model input: {name!r} (inputs: {sorted(names)})")
    symbols: dict[str, int] = {}
    for spec in inputs:
        if spec.name not in overrides:
            continue
        given = tuple(int(v) for v in overrides[spec.name])
        if spec.dims is None:
            continue
        if len(given) != len(spec.dims):
            raise UsageError(
                f"--shape {spec.name}: {len(given)} dims given, the input has {len(spec.dims)} "
                f"[{_dims(spec.dims)}]"
            )
        for i, (d, v) in enumerate(zip(spec.dims, given, strict=True)):
            if isinstance(d, int) and d != v:
                raise UsageError(
                    f"--shape {spec.name}: dim {i} is fixed at {d} in the model, got {v}"
                )
            if isinstance(d, str):
                if symbols.get(d, v) != v:
                    raise UsageError(f"--shape gives the symbolic dim {d!r} two sizes")
                symbols[d] = v
    batch_names = {
        s.dims[0]
        for s in inputs
        if s.dims and isinstance(s.dims[0], str) and s.dims[0] not in symbols
    }
    for spec in inputs:
        if spec.dims is None and spec.name not in overrides:
            raise UsageError(
                f"input {spec.name!r} has no declared shape; pass --shape {spec.name}:DIMS"
            )
    # Elements of one batch row (batch-like dims at 1), to fit the batch into the budget.
    per_row = 0
    for spec in inputs:
        dims = overrides.get(spec.name, spec.dims) or ()
        per_row += math.prod(
            1 if d in batch_names else (d if isinstance(d, int) else symbols.get(d, SMALL_DIM))
            for d in dims
        )
    notes = []
    batch = None
    if batch_names:
        batch = max(1, min(int(rows), budget // max(per_row, 1)))
        notes.append(
            f"{', '.join(sorted(batch_names))} = {batch} (batch"
            + (f", {rows} rows asked, fewer fit {budget} elements" if batch < rows else "")
            + ")"
        )
        symbols.update(dict.fromkeys(batch_names, batch))
    small = sorted(
        {
            d
            for s in inputs
            for d in (s.dims or ())
            if isinstance(d, str) and d not in symbols and s.name not in overrides
        }
    )
    for d in small:
        symbols[d] = SMALL_DIM
    if small:
        notes.append(f"{', '.join(small)} = {SMALL_DIM} (symbolic; set with --shape NAME:DIMS)")
    shapes = {}
    for spec in inputs:
        if spec.name in overrides:
            shapes[spec.name] = tuple(int(v) for v in overrides[spec.name])
        else:
            shapes[spec.name] = tuple(
                d if isinstance(d, int) else symbols[d] for d in spec.dims or ()
            )
    for spec in inputs:  # a fixed dim or a --shape too big to sample (float64 copies too)
        check_feed_bytes(
            f"the probe for input {spec.name!r}",
            shapes[spec.name],
            8,
            "give smaller symbolic dims with --shape NAME:DIMS, or data with --input",
        )
    if batch is not None:
        runs = 1
    else:
        first = next((v[0] for v in shapes.values() if len(v)), 1) or 1
        elems = max(1, sum(math.prod(v) for v in shapes.values()))
        runs = max(1, min(max_runs, math.ceil(rows / first), budget // elems))
        notes.append(f"fixed shapes: {runs} runs of {first} rows")
    return ShapePlan(shapes, runs, batch, notes)
