"""The column-kind registry: each entry complete, and each tabular kind's graph computes what its
numpy preprocessing computes (onnxruntime, optimizations off)."""

from __future__ import annotations

import math

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from bn_onnx.column_kinds import COLUMN_KINDS, NAN_KINDS, TABULAR_KINDS, VOCABULARY_KINDS
from bn_onnx.columns import CATEGORICAL, CONTINUOUS, NUMBER, Column
from bn_onnx.tabular import TabularSpec, fit_spec


def test_registry_lists_the_three_kinds_with_their_inputs():
    assert list(COLUMN_KINDS) == [CONTINUOUS, CATEGORICAL, NUMBER]
    # the exported graph's inputs come in this order: continuous, then categorical
    assert [k.name for k in TABULAR_KINDS] == [CONTINUOUS, CATEGORICAL]
    assert sorted(NAN_KINDS) == [CONTINUOUS] and sorted(VOCABULARY_KINDS) == [CATEGORICAL]
    assert len({k.model_input for k in TABULAR_KINDS}) == len(TABULAR_KINDS)


@pytest.mark.parametrize("name", list(COLUMN_KINDS))
def test_each_kind_reads_a_missing_cell_as_its_missing_value(name):
    kind = COLUMN_KINDS[name]
    want = onnx.helper.tensor_dtype_to_np_dtype(kind.onnx_type)
    assert kind.dtype == (np.dtype(object) if want.kind == "U" else want)
    col = Column("c", name, name, 0)
    got = kind.read([None, "NA", ""], col, 0, frozenset({"", "na"}))
    assert got.dtype == kind.dtype and got.shape == (3,)
    for cell in got:
        if isinstance(kind.missing, float) and math.isnan(kind.missing):
            assert math.isnan(cell)
        else:
            assert cell == kind.missing
    if kind.tabular:
        assert None not in (kind.fit, kind.check, kind.preprocess, kind.graph, kind.model_input)


def _graph_of(kind, spec: TabularSpec, out_dtype: np.dtype) -> bytes:
    import onnx_ir as ir

    tape = ir.tape.Tape()
    raw = ir.val(kind.name, ir.DataType(kind.onnx_type), ir.Shape(["batch", spec.width(kind.name)]))
    out = kind.graph(tape, ir, raw, spec)
    out.name = "out"
    out.type = ir.TensorType(ir.DataType.from_numpy(out_dtype))
    graph = ir.Graph(
        [raw],
        [out],
        nodes=tape.nodes,
        initializers=tape.initializers,
        opset_imports={"": 18, **dict(kind.opsets)},
    )
    return ir.to_proto(ir.Model(graph, ir_version=9)).SerializeToString()


def _data(kind: str, width: int, rng: np.random.Generator, n: int):
    """Training cells per column and a raw input [n, width] with missing and unseen cells."""
    if kind == CONTINUOUS:
        train = {f"x{j}": rng.normal(size=40) * 10 for j in range(width)}
        for j, cells in enumerate(train.values()):
            if j != 1:  # column 1 has no gap: no indicator, so the indicators are gathered
                cells[rng.random(40) < 0.3] = np.nan
        x = rng.normal(size=(n, width)).astype(np.float32) * 10
        x[rng.random((n, width)) < 0.3] = np.nan
        return train, x
    words = np.array(["a", "b", "c", "d", ""], dtype=object)
    train = {f"x{j}": rng.choice(words, size=40) for j in range(width)}
    x = rng.choice(np.array(["a", "b", "c", "", "zz"], dtype=object), size=(n, width))
    return train, x


@pytest.mark.parametrize("width", [1, 3])
@pytest.mark.parametrize("name", [k.name for k in TABULAR_KINDS])
def test_each_kinds_graph_computes_its_numpy_preprocessing(name, width):
    kind = COLUMN_KINDS[name]
    rng = np.random.default_rng(width)
    train, x = _data(name, width, rng, n=64)
    spec = fit_spec(list(train), dict.fromkeys(train, name), train, min_frequency=2)
    want = kind.preprocess(spec, x, np.float32)
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    session = ort.InferenceSession(
        _graph_of(kind, spec, want.dtype), opts, providers=["CPUExecutionProvider"]
    )
    (got,) = session.run(None, {name: x})
    np.testing.assert_array_equal(got, want)  # fills, 0/1 flags and codes: exact
    if name == CONTINUOUS:  # against numpy's own median of the training cells
        fills = np.float32([np.nanmedian(c) for c in train.values()])
        np.testing.assert_array_equal(want[:, :width], np.where(np.isnan(x), fills, x))
        assert spec.indicators == tuple(n for n, c in train.items() if np.isnan(c).any())
    else:  # code 0 for "", 1 for an unseen value, 2 + k for the k-th kept value
        vocab = [c.vocabulary for c in spec.categorical]
        codes = [
            [
                0 if t == "" else 2 + vocab[j].index(t) if t in vocab[j] else 1
                for j, t in enumerate(r)
            ]
            for r in x
        ]
        np.testing.assert_array_equal(want, np.array(codes, dtype=np.int64))
