"""The inputs verify runs: the given data, and seeded random probes spanning each input's range.

Real data shows the models agree where they are used; it cannot show it where the data never
goes (a pixel that is always 0 multiplies a weight column nobody checks). So a random probe
always runs too, spanning each input's range:

- float inputs: N(mean, std) of the checkpoint's input statistics, else of the
  BatchNormalization that normalizes the input in the graph (std = sqrt(var + eps): the scale
  the model itself divides by, so a feature whose training variance was 0 is probed at
  sqrt(eps), not at a scale the model multiplies by 316); else uniform over the given data's
  per-feature [min, max] (axis 1: the column of a table, the channel of an image); else
  N(0, 1). A feature that never varies in the given data (min == max) is spread by
  max(|value|, 1) around its value, so that its weights are exercised too. Columns that the
  model's metadata (`bn_onnx.columns`) marks continuous get 10% NaN (missing values).
- integer inputs: below the size of the axis they index where they feed a Gather,
  GatherElements, GatherND or OneHot (through Cast, Reshape and similar, and Add of a constant
  offset); else the codes of a categorical column's vocabulary; else the keys of an
  ai.onnx.ml LabelEncoder they feed; else the given data's range; else 0..7.
- bool inputs: fair coin flips.
- string inputs: a categorical column's vocabulary from the metadata, or a LabelEncoder's keys,
  plus missing ("") and unseen values; else short strings.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnx
from onnx import numpy_helper

from bn_onnx.column_kinds import NAN_KINDS, VOCABULARY_KINDS
from bn_onnx.compare import is_float_dtype
from bn_onnx.errors import InputDataError
from bn_onnx.verify.signature import ShapePlan, TensorSpec

COLUMNS_KEY = "bn_onnx.columns"
MISSING_FRACTION = 0.1
UNSEEN = "<unseen>"
SHORT_STRINGS = ("a", "b", "c", "d", "e", "f", "g", "h")
DEFAULT_INT_RANGE = (0, 8)
# Ops an index goes through unchanged on its way to a Gather.
_INDEX_PASS = {
    "Cast",
    "Reshape",
    "Squeeze",
    "Unsqueeze",
    "Flatten",
    "Identity",
    "Transpose",
    "Expand",
    "Slice",
    "Split",
    "Tile",
}


@dataclass
class Probe:
    """One kind of inputs: `feeds` holds one name -> array dict per run."""

    kind: str  # "data" | "random"
    source: str
    feeds: list[dict[str, np.ndarray]]
    notes: list[str] = field(default_factory=list)

    @property
    def runs(self) -> int:
        """Number of runs (batches)."""
        return len(self.feeds)

    @property
    def rows(self) -> int:
        """Rows over all runs: the first dim of the first input that has one."""
        total = 0
        for feeds in self.feeds:
            shapes = [np.shape(v) for v in feeds.values()]
            first = next((s for s in shapes if len(s)), None)
            total += first[0] if first else 1
        return total

    def describe(self) -> str:
        """`270 rows` or `64 rows in 32 runs`."""
        runs = f" in {self.runs} runs" if self.runs > 1 else ""
        return f"{self.rows} rows{runs}"


# ---------------------------------------------------------------------------------------------
# Given data


def _feature_axis(ndim: int) -> int | None:
    # The axis BatchNormalization normalizes (1): a table's columns, an image's channels.
    return 1 if ndim >= 2 else None


def _convert(spec: TensorSpec, name: str, value: Any, allow_nan: bool) -> np.ndarray:
    arr = np.asarray(value)
    kind = spec.kind
    if kind == "string":
        if arr.dtype.kind not in "USO":
            raise InputDataError(f"input {name!r} takes strings, got {arr.dtype}")
        return arr.astype(str).astype(object)
    if arr.dtype.kind not in "biuf" and not is_float_dtype(arr.dtype):
        raise InputDataError(f"input {name!r} takes {spec.type_name}, got {arr.dtype} values")
    if kind == "float":
        out = arr.astype(spec.dtype)
        if not allow_nan and out.size and not np.isfinite(out.astype(np.float64)).all():
            bad = ~np.isfinite(out.astype(np.float64))
            first = tuple(int(i) for i in np.argwhere(bad)[0])
            raise InputDataError(
                f"input {name!r} has {int(bad.sum())} non-finite value(s) (NaN or Inf), the "
                f"first at {list(first)}"
            )
        return out
    if kind == "int" and arr.dtype.kind == "f" and not np.array_equal(arr, np.round(arr)):
        raise InputDataError(f"input {name!r} takes integers, got fractional values")
    return arr.astype(spec.dtype)


def data_probe(
    inputs: Sequence[TensorSpec],
    arrays: Mapping[str, Any],
    source: str,
    *,
    allow_nan: Sequence[str] = (),
) -> Probe:
    """The given arrays (one per input name) as feeds, split into runs where the batch is fixed.

    Arrays are converted to the input's dtype. A model whose first dim is fixed at b gets runs
    of b rows; a last run that comes up short is filled with rows from the start.

    Raises:
        InputDataError: a missing or extra input, the wrong rank or dims, symbolic dims of
            different sizes between inputs, no rows, non-finite values (except in `allow_nan`),
            values of the wrong kind.
    """
    names = [s.name for s in inputs]
    missing = [n for n in names if n not in arrays]
    extra = [n for n in arrays if n not in names]
    if missing or extra:
        parts = []
        if missing:
            parts.append(f"no data for input(s) {', '.join(map(repr, missing))}")
        if extra:
            parts.append(f"the model has no input(s) {', '.join(map(repr, extra))}")
        raise InputDataError(f"{'; '.join(parts)} (model inputs: {', '.join(names)})")
    feeds: dict[str, np.ndarray] = {}
    symbols: dict[str, int] = {}
    static_batch: dict[str, int] = {}
    for spec in inputs:
        arr = _convert(spec, spec.name, arrays[spec.name], spec.name in allow_nan)
        dims = spec.dims
        if dims is not None:
            if arr.ndim != len(dims):
                hint = (
                    "; for one row use X.reshape(1, -1)" if arr.ndim == 1 and len(dims) == 2 else ""
                )
                raise InputDataError(
                    f"input {spec.name!r} is {arr.ndim}-D {tuple(arr.shape)}, the model expects "
                    f"{len(dims)}-D [{', '.join(str(d) for d in dims)}]{hint}"
                )
            for i, (d, n) in enumerate(zip(dims, arr.shape, strict=True)):
                if isinstance(d, int) and i == 0 and d > 0:
                    static_batch[spec.name] = d
                elif isinstance(d, int) and d != n:
                    what = "features (columns)" if len(dims) == 2 and i == 1 else f"in dim {i}"
                    raise InputDataError(
                        f"input {spec.name!r} has {n} {what}, the model expects {d}"
                    )
                elif isinstance(d, str) and symbols.setdefault(d, n) != n:
                    raise InputDataError(
                        f"dim {d!r} is {symbols[d]} in one input and {n} in {spec.name!r}"
                    )
        if arr.ndim and arr.shape[0] == 0:
            raise InputDataError(f"input {spec.name!r} has no rows")
        feeds[spec.name] = arr
    notes: list[str] = []
    if not static_batch:
        return Probe("data", source, [feeds], notes)
    sizes = {n: feeds[n].shape[0] for n in static_batch}
    if len(set(sizes.values())) > 1:
        raise InputDataError(f"inputs with a fixed batch dim have different row counts: {sizes}")
    n = next(iter(sizes.values()))
    b = next(iter(static_batch.values()))
    runs = math.ceil(n / b)
    out = []
    for r in range(runs):
        idx = np.arange(r * b, (r + 1) * b) % n  # wrap: a short last run repeats the first rows
        out.append({k: (v[idx] if k in static_batch else v) for k, v in feeds.items()})
    if n % b:
        notes.append(f"the fixed batch of {b} is filled up with the first rows")
    return Probe("data", source, out, notes)


# ---------------------------------------------------------------------------------------------
# Ranges


@dataclass
class InputRange:
    """How random values for one input are drawn; `source` says why, for the report.

    `kind`: `normal` (center=mean, spread=std), `uniform` (center=low, spread=high), both
    per feature along axis 1 or scalars; `integers` in [low, high); `bool`; `choice` from
    `values` (one list per column of axis 1, or one list for all).
    """

    kind: str
    source: str
    center: np.ndarray | float = 0.0
    spread: np.ndarray | float = 1.0
    low: int = 0
    high: int = 8
    values: list[list[str]] | None = None
    missing: float = 0.0

    def sample(self, shape: tuple[int, ...], dtype: np.dtype, rng: np.random.Generator) -> Any:
        """An array of `shape` drawn from this range, as `dtype`."""
        if self.kind == "bool":
            return np.asarray(rng.random(shape) < 0.5)
        if self.kind == "integers":
            return rng.integers(self.low, max(self.high, self.low + 1), shape).astype(dtype)
        if self.kind == "choice":
            return self._choice(shape, rng)
        axis = _feature_axis(len(shape))
        center, spread = self.center, self.spread
        if np.ndim(center) and axis is not None:
            bshape = [1] * len(shape)
            bshape[axis] = -1
            center = np.reshape(center, bshape)
            spread = np.reshape(spread, bshape)
        if self.kind == "normal":
            x = center + spread * rng.standard_normal(shape)
        else:
            x = center + (spread - center) * rng.random(shape)
        if self.missing:
            x = np.where(rng.random(shape) < self.missing, np.nan, x)
        return np.asarray(np.asarray(x).astype(dtype))

    def _choice(self, shape: tuple[int, ...], rng: np.random.Generator) -> np.ndarray:
        values = self.values or [list(SHORT_STRINGS)]
        out = np.empty(shape, dtype=object)
        axis = _feature_axis(len(shape))
        if len(values) == 1 or axis is None:
            pool = np.asarray(values[0], dtype=object)
            out[...] = pool[rng.integers(0, len(pool), shape)]
        else:
            for j in range(shape[axis]):
                pool = np.asarray(values[min(j, len(values) - 1)], dtype=object)
                index = [slice(None)] * len(shape)
                index[axis] = j
                sub = out[tuple(index)]
                sub[...] = pool[rng.integers(0, len(pool), sub.shape)]
        return out


def columns_metadata(model: onnx.ModelProto) -> list[dict[str, Any]]:
    """The model's `bn_onnx.columns` metadata (a JSON list of column records), or []."""
    for p in model.metadata_props:
        if p.key == COLUMNS_KEY:
            try:
                value = json.loads(p.value)
            except (ValueError, RecursionError):
                return []
            return [c for c in value if isinstance(c, dict)] if isinstance(value, list) else []
    return []


def _static_shapes(model: onnx.ModelProto) -> dict[str, tuple[int, ...]]:
    shapes = {t.name: tuple(int(d) for d in t.dims) for t in model.graph.initializer}
    try:
        inferred = onnx.shape_inference.infer_shapes(model)
    except Exception:  # a nicety: initializer dims are what embeddings use
        return shapes
    for vi in [*inferred.graph.value_info, *inferred.graph.input]:
        dims = vi.type.tensor_type.shape.dim
        if vi.name not in shapes and dims and all(d.HasField("dim_value") for d in dims):
            shapes[vi.name] = tuple(d.dim_value for d in dims)
    return shapes


def _constant(model: onnx.ModelProto, name: str) -> np.ndarray | None:
    for t in model.graph.initializer:
        if t.name == name:
            return numpy_helper.to_array(t)
    for node in model.graph.node:
        if node.op_type == "Constant" and node.output[0] == name and node.attribute:
            a = node.attribute[0]
            if a.name == "value":
                return numpy_helper.to_array(a.t)
            if a.name in ("value_int", "value_ints"):
                return np.asarray(onnx.helper.get_attribute_value(a))
    return None


def _attr(node: onnx.NodeProto, name: str, default: Any) -> Any:
    for a in node.attribute:
        if a.name == name:
            return onnx.helper.get_attribute_value(a)
    return default


def index_uses(model: onnx.ModelProto, name: str) -> tuple[int | None, list[str]]:
    """The largest safe exclusive upper bound for index values of input `name`, and its uses.

    Follows `name` through `_INDEX_PASS` ops and constant Add offsets to the Gather-like nodes
    it indexes; the bound is the smallest indexed axis size among them (minus the offset).
    Also returns the LabelEncoder keys it feeds, as strings, in the second item when there
    are no index uses (for the caller to sample).
    """
    consumers: dict[str, list[tuple[onnx.NodeProto, int]]] = {}
    for node in model.graph.node:
        for i, n in enumerate(node.input):
            consumers.setdefault(n, []).append((node, i))
    shapes = _static_shapes(model)
    bounds: list[int] = []
    keys: list[str] = []
    stack = [(name, 0)]
    seen = set()
    while stack:
        tensor, offset = stack.pop()
        if (tensor, offset) in seen:
            continue
        seen.add((tensor, offset))
        for node, pos in consumers.get(tensor, []):
            op = node.op_type
            if op in _INDEX_PASS and pos == 0:
                stack.extend((o, offset) for o in node.output if o)
            elif op == "Add":
                other = _constant(model, node.input[1 - pos]) if len(node.input) == 2 else None
                if other is not None and other.size and np.issubdtype(other.dtype, np.integer):
                    stack.append((node.output[0], offset + int(other.max())))
            elif op in ("Gather", "GatherElements") and pos == 1:
                data = shapes.get(node.input[0])
                if data:
                    axis = int(_attr(node, "axis", 0)) % len(data)
                    bounds.append(data[axis] - offset)
            elif op == "GatherND" and pos == 1:
                data = shapes.get(node.input[0])
                if data:
                    bounds.append(min(data[int(_attr(node, "batch_dims", 0)) :]) - offset)
            elif op == "OneHot" and pos == 0:
                depth = _constant(model, node.input[1])
                if depth is not None and depth.size:
                    bounds.append(int(depth.ravel()[0]) - offset)
            elif op == "LabelEncoder" and pos == 0:
                keys += [str(k) for k in _attr(node, "keys_int64s", []) or []]
                keys += [
                    k.decode() if isinstance(k, bytes) else str(k)
                    for k in _attr(node, "keys_strings", []) or []
                ]
    return (min(bounds) if bounds else None), keys


_PASS_THROUGH = ("Identity", "Cast")


def graph_input_stats(model: onnx.ModelProto) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Per-feature (mean, var + eps) of BatchNormalization nodes that normalize a graph input.

    Only a BN reading the input directly (or through Identity or Cast) with constant
    statistics counts: it is the model's own input normalization.
    """
    init = {t.name: t for t in model.graph.initializer}
    consumers: dict[str, list[onnx.NodeProto]] = {}
    for node in model.graph.node:
        for n in node.input[:1]:
            consumers.setdefault(n, []).append(node)
    out = {}
    for vi in model.graph.input:
        if vi.name in init:
            continue
        frontier = [vi.name]
        while frontier:
            t = frontier.pop()
            for node in consumers.get(t, []):
                if node.op_type in _PASS_THROUGH:
                    frontier.extend(node.output[:1])
                elif (
                    node.op_type == "BatchNormalization"
                    and len(node.input) >= 5
                    and node.input[3] in init
                    and node.input[4] in init
                    and vi.name not in out
                ):
                    eps = float(_attr(node, "epsilon", 1e-5))
                    mean = numpy_helper.to_array(init[node.input[3]]).astype(np.float64)
                    var = numpy_helper.to_array(init[node.input[4]]).astype(np.float64)
                    if mean.ndim == 1:
                        out[vi.name] = (mean, var + eps)
    return out


def _column_values(columns: list[dict[str, Any]], name: str) -> list[list[str]] | None:
    mine = [c for c in columns if c.get("input") == name and c.get("kind") in VOCABULARY_KINDS]
    if not mine:
        return None
    mine.sort(key=lambda c: int(c.get("index", 0)))
    return [[str(v) for v in c.get("vocabulary") or []] + ["", UNSEEN] for c in mine]


def input_ranges(
    model: onnx.ModelProto,
    inputs: Sequence[TensorSpec],
    *,
    data: Probe | None = None,
    stats: Mapping[str, tuple[np.ndarray, np.ndarray]] | None = None,
    stats_source: str = "the checkpoint's input statistics",
) -> dict[str, InputRange]:
    """How to draw random values for each input (see the module docstring for the order)."""
    columns = columns_metadata(model)
    stats = stats or {}
    in_graph = graph_input_stats(model)
    out: dict[str, InputRange] = {}
    for spec in inputs:
        name = spec.name
        given = None
        if data is not None and data.feeds:
            given = (
                np.concatenate(
                    [np.reshape(f[name], (-1, *np.shape(f[name])[1:])) for f in data.feeds]
                )
                if np.ndim(data.feeds[0][name])
                else np.asarray([f[name] for f in data.feeds])
            )
        if spec.kind == "float":
            missing = (
                MISSING_FRACTION
                if any(c.get("input") == name and c.get("kind") in NAN_KINDS for c in columns)
                else 0.0
            )
            if name in stats:
                stat, source = stats[name], stats_source
            else:
                stat, source = in_graph.get(name), "the input's BatchNormalization in the graph"
            out[name] = _float_range(name, given, stat, source, missing)
        elif spec.kind == "int":
            bound, keys = index_uses(model, name)
            vocab = _column_values(columns, name)
            if bound is not None:
                out[name] = InputRange(
                    "integers", f"indices below {bound} (the indexed axis)", high=bound
                )
            elif vocab:
                n = min(len(v) - 2 for v in vocab)
                out[name] = InputRange("integers", "codes of the column vocabulary", high=max(n, 1))
            elif keys:
                ks = sorted({int(k) for k in keys})
                out[name] = InputRange(
                    "integers", "the LabelEncoder's keys and one past", low=ks[0], high=ks[-1] + 2
                )
            elif given is not None and given.size:
                lo, hi = int(np.min(given)), int(np.max(given))
                out[name] = InputRange("integers", "the given data's range", low=lo, high=hi + 1)
            else:
                lo, hi = DEFAULT_INT_RANGE
                out[name] = InputRange("integers", f"integers {lo}..{hi - 1}", low=lo, high=hi)
        elif spec.kind == "bool":
            out[name] = InputRange("bool", "random bools")
        elif spec.kind == "string":
            vocab = _column_values(columns, name)
            _, keys = index_uses(model, name)
            if vocab:
                out[name] = InputRange(
                    "choice", "the columns' vocabularies, missing and unseen values", values=vocab
                )
            elif keys:
                out[name] = InputRange(
                    "choice",
                    "the LabelEncoder's keys and an unseen value",
                    values=[[*keys, UNSEEN]],
                )
            else:
                out[name] = InputRange("choice", "short strings", values=[list(SHORT_STRINGS)])
        else:
            raise InputDataError(f"input {name!r} of type {spec.type_name} cannot be probed")
    return out


def _float_range(
    name: str,
    given: np.ndarray | None,
    stat: tuple[np.ndarray, np.ndarray] | None,
    stats_source: str,
    missing: float,
) -> InputRange:
    extra = f", {int(missing * 100)}% NaN (missing)" if missing else ""
    if stat is not None:
        mean = np.asarray(stat[0], dtype=np.float64)
        std = np.sqrt(np.maximum(np.asarray(stat[1], dtype=np.float64), 0.0))
        std = np.where(std > 0, std, 1.0)  # no epsilon known and no variance: unit spread
        return InputRange(
            "normal", f"N(mean, std) of {stats_source}{extra}", mean, std, missing=missing
        )
    if given is not None and given.size:
        g = given.astype(np.float64)
        axis = _feature_axis(g.ndim)
        reduce = tuple(i for i in range(g.ndim) if i != axis)
        with np.errstate(invalid="ignore"):
            lo = np.nanmin(g, axis=reduce) if np.isfinite(g).any() else np.zeros(1)
            hi = np.nanmax(g, axis=reduce) if np.isfinite(g).any() else np.zeros(1)
        lo = np.where(np.isfinite(lo), lo, 0.0)
        hi = np.where(np.isfinite(hi), hi, 0.0)
        flat = hi == lo
        pad = np.where(flat, np.maximum(np.abs(lo), 1.0), 0.0)
        note = (
            f"; {int(np.sum(flat))} constant feature(s) spread by max(|value|, 1)"
            if np.any(flat)
            else ""
        )
        return InputRange(
            "uniform",
            f"uniform over the given data's per-feature [min, max]{note}{extra}",
            lo - pad,
            hi + pad,
            missing=missing,
        )
    return InputRange("normal", f"N(0, 1){extra}", 0.0, 1.0, missing=missing)


def random_probe(
    inputs: Sequence[TensorSpec],
    plan: ShapePlan,
    ranges: Mapping[str, InputRange],
    seed: int,
) -> Probe:
    """`plan.runs` runs of seeded random inputs of `plan.shapes`, drawn from `ranges`."""
    rng = np.random.default_rng(seed)
    feeds = []
    for _ in range(plan.runs):
        feeds.append(
            {s.name: ranges[s.name].sample(plan.shapes[s.name], s.dtype, rng) for s in inputs}
        )
    words = "; ".join(f"{s.name}: {ranges[s.name].source}" for s in inputs)
    return Probe("random", f"seeded random (seed {seed}); {words}", feeds, list(plan.notes))
