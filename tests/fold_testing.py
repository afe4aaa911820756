"""Helpers for the fold tests: tiny models from text, runs in onnxruntime or onnx.reference."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
from onnx import numpy_helper, parser
from onnx.reference import ReferenceEvaluator

from bn_onnx.fold import FoldResult, fold_model

ATOL, RTOL = 1e-5, 1e-4
# float16: the fold rounds each weight once (half an ulp, 2**-11 relative), the unfolded model
# rounds the BN output too; both errors are of the order of float16's own precision.
ATOL_F16, RTOL_F16 = 2e-2, 1e-2
ATOL_BF16, RTOL_BF16 = 1e-1, 5e-2


def model_from_text(text: str, inits: dict[str, np.ndarray] | None = None) -> onnx.ModelProto:
    """Parse ONNX text and add `inits` as initializers (arrays keep their dtype)."""
    model = parser.parse_model(text)
    for name, value in (inits or {}).items():
        model.graph.initializer.append(numpy_helper.from_array(np.asarray(value), name))
    return model


def bn_params(rng: np.random.Generator, n: int, dtype=np.float32) -> dict[str, np.ndarray]:
    """Random BN parameters named s, b, mu, var (var in [0.5, 2])."""
    return {
        "s": rng.normal(1.0, 0.5, n).astype(dtype),
        "b": rng.normal(0.0, 0.5, n).astype(dtype),
        "mu": rng.normal(0.0, 0.5, n).astype(dtype),
        "var": rng.uniform(0.5, 2.0, n).astype(dtype),
    }


def run_ort(model: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return sess.run(None, feeds)


def run_ref(model: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    return ReferenceEvaluator(model).run(None, feeds)


def op_count(model: onnx.ModelProto, op: str) -> int:
    return sum(n.op_type == op for n in model.graph.node)


def fold_and_compare(
    model: onnx.ModelProto,
    feeds: dict[str, np.ndarray],
    *,
    folded: int | None = None,
    runner=run_ort,
    atol: float = ATOL,
    rtol: float = RTOL,
) -> FoldResult:
    """Fold `model`, check the output is valid ONNX, and that its outputs equal the original's.

    `folded` is the number of BN nodes the fold must remove (all of them when None).
    """
    before_bytes = model.SerializeToString()
    result = fold_model(model)
    assert model.SerializeToString() == before_bytes, "fold_model changed its input"
    onnx.checker.check_model(result.model, full_check=True)
    n_bn = op_count(model, "BatchNormalization")
    expect = n_bn if folded is None else folded
    assert result.report.n_bn == n_bn
    assert result.report.n_folded == expect, result.report.to_dict()
    assert op_count(result.model, "BatchNormalization") == n_bn - expect
    assert [i.name for i in result.model.graph.input] == [i.name for i in model.graph.input]
    assert [o.name for o in result.model.graph.output] == [o.name for o in model.graph.output]
    assert [(o.domain, o.version) for o in result.model.opset_import] == [
        (o.domain, o.version) for o in model.opset_import
    ]
    want = runner(model, feeds)
    got = runner(result.model, feeds)
    for w, g in zip(want, got, strict=True):
        assert w.shape == g.shape and w.dtype == g.dtype
        np.testing.assert_allclose(g.astype(np.float64), w.astype(np.float64), atol=atol, rtol=rtol)
    return result


def reasons(result: FoldResult) -> list[str]:
    return [e.reason or "" for e in result.report.entries if e.status == "left"]
