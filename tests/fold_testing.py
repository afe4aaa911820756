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
    cleanup: bool = True,
) -> FoldResult:
    """Fold `model`, check the output is valid ONNX, and that its outputs equal the original's.

    `folded` is the number of BN nodes the fold must remove (all of them when None);
    `cleanup` is `fold_model`'s.
    """
    before_bytes = model.SerializeToString()
    result = fold_model(model, cleanup=cleanup)
    assert model.SerializeToString() == before_bytes, "fold_model changed its input"
    onnx.checker.check_model(result.model, full_check=True)
    n_bn = op_count(model, "BatchNormalization")
    expect = n_bn if folded is None else folded
    assert result.report.n_bn == n_bn
    assert result.report.n_folded == expect, result.report.to_dict()
    assert op_count(result.model, "BatchNormalization") == n_bn - expect
    assert _real_inputs(result.model) == _real_inputs(model)
    assert _interface(result.model) == _interface(model)  # names, dtypes and shapes
    assert [(o.domain, o.version) for o in result.model.opset_import] == [
        (o.domain, o.version) for o in model.opset_import
    ]
    want = runner(model, feeds)
    got = runner(result.model, feeds)
    for w, g in zip(want, got, strict=True):
        assert w.shape == g.shape and w.dtype == g.dtype
        np.testing.assert_allclose(g.astype(np.float64), w.astype(np.float64), atol=atol, rtol=rtol)
    return result


def _real_inputs(model: onnx.ModelProto) -> list[str]:
    """Graph input names, without the initializers IR < 4 lists as inputs."""
    inits = {t.name for t in model.graph.initializer} if model.ir_version < 4 else set()
    return [i.name for i in model.graph.input if i.name not in inits]


def _interface(model: onnx.ModelProto) -> list[tuple[str, bytes]]:
    """The real graph inputs and the outputs, each as (name, serialized TypeProto)."""
    inputs = set(_real_inputs(model))
    values = [vi for vi in model.graph.input if vi.name in inputs] + list(model.graph.output)
    return [(vi.name, vi.type.SerializeToString()) for vi in values]


def reasons(result: FoldResult) -> list[str]:
    return [e.reason or "" for e in result.report.entries if e.status == "left"]


def random_mlp(draw_int, draw_float, draw_bool) -> tuple[onnx.ModelProto, int]:
    """A random MLP-shaped graph where every BN is foldable; returns (model, input width).

    The draw_* callables pick the structure (hypothesis `data.draw` or a numpy generator):
    BN on the input, per layer Gemm (transB, alpha, beta, bias) or MatMul (+Add, either side),
    BN before or after the activation or none, Identity/Dropout after the BN, weights shared
    between layers of one shape, parameters as initializers or Constant nodes.
    """
    rng = np.random.default_rng(draw_int(0, 2**31 - 1))
    inits: dict[str, np.ndarray] = {}
    lines: list[str] = []
    n_in = draw_int(2, 6)
    width, cur, k = n_in, "x", 0

    def name(prefix: str) -> str:
        nonlocal k
        k += 1
        return f"{prefix}{k}"

    def add_bn(src: str, n: int) -> str:
        params = bn_params(rng, n)
        names = []
        as_constant = draw_bool()
        for key, value in params.items():
            nm = name(key)
            if as_constant:
                vals = ", ".join(repr(float(v)) for v in value)
                lines.append(f"{nm} = Constant <value = float[{n}] {{{vals}}}> ()")
            else:
                inits[nm] = value
            names.append(nm)
        out = name("bn")
        lines.append(f"{out} = BatchNormalization ({src}, {', '.join(names)})")
        tail = draw_int(0, 2)
        if tail == 1:
            nxt = name("id")
            lines.append(f"{nxt} = Identity ({out})")
            out = nxt
        elif tail == 2:
            nxt = name("do")
            lines.append(f"{nxt} = Dropout ({out})")
            out = nxt
        return out

    shared: dict[tuple[int, ...], str] = {}

    def weight(shape: tuple[int, ...]) -> str:
        if shape in shared and draw_bool():
            return shared[shape]
        nm = name("W")
        inits[nm] = rng.normal(0, 1 / np.sqrt(shape[0]), size=shape).astype(np.float32)
        shared[shape] = nm
        return nm

    def linear(src: str, n_out: int) -> str:
        out = name("z")
        if draw_bool():  # Gemm
            trans_b = draw_bool()
            alpha = draw_float(0.25, 2.0)
            beta = draw_float(0.0, 2.0)
            w = weight((n_out, width) if trans_b else (width, n_out))
            c = ""
            if draw_bool():
                c = name("C")
                inits[c] = rng.normal(size=(n_out,)).astype(np.float32)
                c = ", " + c
            attrs = f"transB={int(trans_b)}, alpha={alpha!r}, beta={beta!r}"
            lines.append(f"{out} = Gemm <{attrs}> ({src}, {w}{c})")
        else:
            w = weight((width, n_out))
            if draw_bool():
                mid = name("mm")
                lines.append(f"{mid} = MatMul ({src}, {w})")
                b = name("B")
                inits[b] = rng.normal(size=(n_out,)).astype(np.float32)
                args = f"{mid}, {b}" if draw_bool() else f"{b}, {mid}"
                lines.append(f"{out} = Add ({args})")
            else:
                lines.append(f"{out} = MatMul ({src}, {w})")
        return out

    if draw_bool():
        cur = add_bn(cur, width)
    for _ in range(draw_int(1, 3)):
        n_out = draw_int(2, 6)
        z = linear(cur, n_out)
        width = n_out
        act = ["Relu", "Tanh", "Sigmoid"][draw_int(0, 2)]
        placement = draw_int(0, 2)  # 0 pre, 1 post, 2 none
        if placement == 0:
            z = add_bn(z, width)
        a = name("a")
        lines.append(f"{a} = {act} ({z})")
        cur = add_bn(a, width) if placement == 1 else a
    n_out = draw_int(1, 4)
    head = linear(cur, n_out)
    lines.append(f"y = Identity ({head})")
    body = "\n  ".join(lines)
    text = f"""<ir_version: 8, opset_import: ["" : 18]>
g (float[N, {n_in}] x) => (float[N, {n_out}] y) {{
  {body}
}}"""
    return model_from_text(text, inits), n_in


def mlp_with_probe(rng=None, k=5):
    """Gemm -> BN -> Relu -> BN (also the output `probe`) -> MatMul: one BN folds, one stays."""
    rng = rng or np.random.default_rng(40)
    inits = {
        "W1": rng.normal(size=(k, 4)).astype(np.float32),
        "W2": rng.normal(size=(4, 3)).astype(np.float32),
    }
    inits.update({k + "1": v for k, v in bn_params(rng, 4).items()})
    inits.update({k + "2": v for k, v in bn_params(rng, 4).items()})
    model = model_from_text(
        f"""<ir_version: 8, opset_import: ["" : 18]>
        g (float[N, {k}] input) => (float[N, 3] logits, float[N, 4] probe) {{
          h = Gemm (input, W1)
          t = BatchNormalization (h, s1, b1, mu1, var1)
          r = Relu (t)
          probe = BatchNormalization (r, s2, b2, mu2, var2)
          logits = MatMul (probe, W2)
        }}""",
        inits,
    )
    onnx.helper.set_model_props(model, {"bn_onnx.task": "classification"})
    return model
