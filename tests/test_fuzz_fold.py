"""Fuzzing the fold pass: broken models end in a BnOnnxError or a valid, equal model.

Hypothesis mutates valid models (dropped initializers, wrong shapes, wrong attribute types,
dangling inputs, cycles, removed nodes, changed op types, bad parameter values) and valid files
(truncated or flipped bytes). The fold must either return a model that passes the ONNX checker
and computes what the original computed, or raise the project's own error: no other exception,
no hang. CI runs a small fixed budget; set BN_ONNX_FUZZ_EXAMPLES (e.g. 2000) for a longer run.
"""

from __future__ import annotations

import os
import signal
from contextlib import contextmanager

import numpy as np
import onnx
import onnxruntime as ort
from fold_testing import random_mlp
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from onnx import helper

from bn_onnx.errors import BnOnnxError
from bn_onnx.fold import fold_file, fold_model

EXAMPLES = int(os.environ.get("BN_ONNX_FUZZ_EXAMPLES", "60"))
HANG_SECONDS = 30
MUTATIONS = [
    "drop_initializer",
    "wrong_shape",
    "reshape_initializer",
    "wrong_attribute_type",
    "dangling_input",
    "cycle",
    "remove_node",
    "change_op",
    "bad_param",
    "wrong_input_dtype",
    "drop_output",
]


@contextmanager
def _no_hang(seconds: int = HANG_SECONDS):
    def fail(signum, frame):
        raise AssertionError(f"fold did not finish within {seconds} s")

    old = signal.signal(signal.SIGALRM, fail)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


def _base(seed: int) -> tuple[onnx.ModelProto, int]:
    rng = np.random.default_rng(seed)
    return random_mlp(
        lambda lo, hi: int(rng.integers(lo, hi + 1)),
        lambda lo, hi: float(rng.choice([lo, 1.0, hi])),
        lambda: bool(rng.integers(0, 2)),
    )


def _mutate(model: onnx.ModelProto, kind: str, pick: int) -> None:
    g = model.graph
    nodes = list(g.node)
    with_inputs = [n for n in nodes if n.input]
    node = with_inputs[pick % len(with_inputs)]
    if kind == "drop_initializer" and len(g.initializer):
        del g.initializer[pick % len(g.initializer)]
    elif kind == "wrong_shape" and len(g.initializer):
        t = g.initializer[pick % len(g.initializer)]
        t.dims.append(2)  # data no longer matches the dims
    elif kind == "reshape_initializer" and len(g.initializer):
        t = g.initializer[pick % len(g.initializer)]
        n = int(np.prod(t.dims)) if t.dims else 1
        del t.dims[:]
        t.dims.extend([1, n])  # consistent data, wrong rank
    elif kind == "wrong_attribute_type":
        target = next((n for n in nodes if n.attribute), node)
        name = target.attribute[0].name if target.attribute else "transB"
        for a in list(target.attribute):
            if a.name == name:
                target.attribute.remove(a)
        bad = ["text", 1.5, [1, 2], helper.make_tensor("t", 1, [1], [1.0])][pick % 4]
        target.attribute.append(helper.make_attribute(name, bad))
    elif kind == "dangling_input":
        node.input[pick % len(node.input)] = "does_not_exist"
    elif kind == "cycle":
        later = with_inputs[-1 - (pick % len(with_inputs))]
        node.input[0] = later.output[0]
    elif kind == "remove_node":
        g.node.remove(node)
    elif kind == "change_op":
        node.op_type = ["BatchNormalization", "Gemm", "MatMul", "Conv", "Dropout", "Foo"][pick % 6]
    elif kind == "bad_param":
        bn_inputs = [i for n in nodes if n.op_type == "BatchNormalization" for i in n.input[1:]]
        names = {t.name for t in g.initializer}
        targets = [i for i in bn_inputs if i in names] or [t.name for t in g.initializer]
        if targets:
            t = next(t for t in g.initializer if t.name == targets[pick % len(targets)])
            try:
                arr = onnx.numpy_helper.to_array(t).copy()
            except ValueError:  # an earlier mutation broke this tensor already
                return
            arr.flat[0] = [np.nan, np.inf, -1.0, 0.0, 1e30][pick % 5]
            t.CopyFrom(onnx.numpy_helper.from_array(arr, t.name))
    elif kind == "wrong_input_dtype":
        g.input[0].type.tensor_type.elem_type = [onnx.TensorProto.INT64, 0, 99][pick % 3]
    elif kind == "drop_output":
        del g.output[:]


def _runs(model: onnx.ModelProto, x: np.ndarray) -> list[np.ndarray] | None:
    # Graph optimizations off: onnxruntime's own BN fusions would fold the original too, and
    # with a non-finite parameter its fused result differs from the graph's (NaN, not +-inf).
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    try:
        sess = ort.InferenceSession(
            model.SerializeToString(), options, providers=["CPUExecutionProvider"]
        )
        return sess.run(None, {sess.get_inputs()[0].name: x})
    except Exception:
        return None


def _check_outcome(original: onnx.ModelProto, n_in: int) -> None:
    before = original.SerializeToString()
    try:
        with _no_hang():
            result = fold_model(original)
    except BnOnnxError:
        return
    assert original.SerializeToString() == before
    onnx.checker.check_model(result.model, full_check=True)
    x = np.random.default_rng(0).normal(size=(3, n_in)).astype(np.float32)
    want = _runs(original, x)
    if want is None:  # garbage in: the original does not run; valid ONNX out is all we ask
        return
    got = _runs(result.model, x)
    assert got is not None, "the original runs in onnxruntime, the folded model does not"
    for w, g in zip(want, got, strict=True):
        np.testing.assert_allclose(g, w, atol=1e-5, rtol=1e-4, equal_nan=True)


@settings(
    max_examples=EXAMPLES,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
@given(
    seed=st.integers(0, 10_000),
    kinds=st.lists(st.sampled_from(MUTATIONS), min_size=1, max_size=3),
    pick=st.integers(0, 1000),
)
# An inf BN scale: onnxruntime's own fusion (when optimizations were on) gave NaN everywhere.
@example(seed=256, kinds=["bad_param"], pick=256)
def test_fuzz_mutated_graphs_fold_or_raise_bn_onnx_error(seed, kinds, pick):
    model, n_in = _base(seed)
    for i, kind in enumerate(kinds):
        _mutate(model, kind, pick + 7 * i)
    _check_outcome(model, n_in)


@settings(
    max_examples=max(10, EXAMPLES // 3),
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
@given(
    seed=st.integers(0, 10_000),
    cut=st.floats(0.0, 1.0),
    flips=st.lists(st.tuples(st.floats(0.0, 1.0), st.integers(0, 255)), max_size=4),
)
def test_fuzz_damaged_files_fold_or_raise_bn_onnx_error(tmp_path_factory, seed, cut, flips):
    model, n_in = _base(seed)
    data = bytearray(model.SerializeToString())
    for where, value in flips:
        data[int(where * (len(data) - 1))] = value
    data = data[: max(1, int(cut * len(data)))] if cut < 0.9 else data
    folder = tmp_path_factory.mktemp("fuzz")
    src, out = folder / "in.onnx", folder / "out.onnx"
    src.write_bytes(bytes(data))
    try:
        with _no_hang():
            fold_file(src, out)
    except BnOnnxError:
        assert not out.exists()
        assert sorted(p.name for p in folder.iterdir()) == ["in.onnx"]
        return
    assert src.read_bytes() == bytes(data)
    folded = onnx.load(str(out))
    onnx.checker.check_model(folded, full_check=True)
    original = onnx.load_from_string(bytes(data))
    want = _runs(original, np.zeros((2, n_in), np.float32))
    if want is not None:
        got = _runs(folded, np.zeros((2, n_in), np.float32))
        assert got is not None
        for w, g in zip(want, got, strict=True):
            np.testing.assert_allclose(g, w, atol=1e-5, rtol=1e-4, equal_nan=True)
