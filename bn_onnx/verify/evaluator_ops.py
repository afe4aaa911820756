"""onnx.reference kernels corrected for verify: the `new_ops` of every `ReferenceEvaluator`
verify makes, for the float64 graph (`bn_onnx.verify.float64`) and for `--provider reference`
(`bn_onnx.verify.runners.OnnxReferenceRunner`), which rounds each result to the model's dtype.

Each class is named for the op it replaces; the arithmetic is `bn_onnx.float64_kernels`'.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np


def corrected_ops() -> list[type]:
    """onnx.reference kernels replaced by `bn_onnx.float64_kernels`' ones.

    Erf: onnx's rounds through float32. Conv and ConvTranspose: onnx's mix up the groups of a
    grouped (depthwise) convolution when the batch has more than one row.
    BatchNormalization: onnx's versions 6-13 use the batch's own statistics (is_test=0 and a
    momentum are their defaults); an inference graph means the running statistics, as
    onnxruntime computes them. MaxPool and AveragePool: onnx's loop over every window in
    Python (30 s for one ResNet-18 pool on 6 images); a MaxPool asked for its Indices output
    keeps onnx's. Add, Sub, Mul, Div: opsets 1-6's broadcast axis (`_legacy_binary`).
    """
    from onnx.reference.op_run import OpRun
    from onnx.reference.ops.op_max_pool import MaxPool as OnnxMaxPool

    from bn_onnx.float64_kernels import batch_norm_node, conv, conv_transpose, erf, pool

    def replacing(name: str, kernel: Callable[..., np.ndarray], base: type = OpRun) -> type:
        # onnx.reference passes every attribute (the node's, else the schema's default) by name.
        def _run(self, x, *inputs, **attrs):  # noqa: ANN001, ANN002, ANN003, ANN202
            return (kernel(x, *inputs, **attrs).astype(x.dtype),)

        return type(name, (base,), {"op_domain": "", "_run": _run})

    def max_pool(self, x, **attrs):  # noqa: ANN001, ANN003, ANN202
        if len([o for o in self.onnx_node.output if o]) > 1:
            return OnnxMaxPool._run(self, x, **attrs)
        return (pool(x, "max", **_pool_attrs(**attrs)).astype(x.dtype),)

    return [
        replacing("Erf", lambda x: erf(x)),
        replacing("Conv", lambda x, w, b=None, **at: conv(x, w, b, **_conv_attrs(**at))),
        replacing("ConvTranspose", _conv_transpose(conv_transpose)),
        replacing("BatchNormalization", _batch_norm(batch_norm_node)),
        type("MaxPool", (OnnxMaxPool,), {"op_domain": "", "_run": max_pool}),
        replacing("AveragePool", lambda x, **at: pool(x, "avg", **_pool_attrs(**at))),
        *_legacy_binary(),
    ]


def _conv_attrs(
    strides: Sequence[int] | None = None,
    pads: Sequence[int] | None = None,
    dilations: Sequence[int] | None = None,
    group: int | None = None,
    auto_pad: str | None = None,
    **_: object,
) -> dict[str, object]:
    """Conv and ConvTranspose attributes as `float64_kernels.conv` takes them."""
    return {
        "strides": strides,
        "pads": pads,
        "dilations": dilations,
        "group": group or 1,
        "auto_pad": auto_pad or "NOTSET",
    }


def _pool_attrs(
    kernel_shape: Sequence[int],
    ceil_mode: int | None = None,
    count_include_pad: int | None = None,
    **attrs: object,
) -> dict[str, object]:
    """MaxPool and AveragePool attributes as `float64_kernels.pool` takes them."""
    conv_attrs = _conv_attrs(**attrs)
    del conv_attrs["group"]
    return {
        "kernel_shape": kernel_shape,
        "ceil_mode": ceil_mode or 0,
        "count_include_pad": count_include_pad or 0,
        **conv_attrs,
    }


def _conv_transpose(kernel: Callable[..., np.ndarray]) -> Callable[..., np.ndarray]:
    def run(
        x: np.ndarray,
        w: np.ndarray,
        b: np.ndarray | None = None,
        output_padding: Sequence[int] | None = None,
        output_shape: Sequence[int] | None = None,
        **attrs: object,
    ) -> np.ndarray:
        extra = {"output_padding": output_padding, "output_shape": output_shape}
        return kernel(x, w, b, **_conv_attrs(**attrs), **extra)

    return run


def _batch_norm(kernel: Callable[..., np.ndarray]) -> Callable[..., np.ndarray]:
    """BatchNormalization of any opset: is_test, momentum and consumed_inputs do not matter in
    inference."""

    def run(
        x: np.ndarray,
        *params: np.ndarray,
        epsilon: float | None = None,
        training_mode: int | None = None,
        spatial: int | None = None,
        **_: object,
    ) -> np.ndarray:
        return kernel(x, *params, epsilon, training_mode, spatial)

    return run


def _legacy_binary() -> list[type]:
    """Add, Sub, Mul and Div that honour opsets 1-6's `broadcast=1, axis=k`: B's dims line up
    with A's from axis k (Caffe2's per-channel Scale layer is `Mul <broadcast=1, axis=1>`).
    onnx.reference ignores both attributes and broadcasts numpy's way, from the last axis, so
    a (C,) scale on (N, C, H, W) with W == C ran along W. From opset 7 on there are no such
    attributes and these are onnx.reference's own kernels."""
    from onnx.reference.ops.op_add import Add
    from onnx.reference.ops.op_div import Div
    from onnx.reference.ops.op_mul import Mul
    from onnx.reference.ops.op_sub import Sub

    def legacy(base: type) -> type:
        def _run(self, a, b):  # noqa: ANN001, ANN202
            axis = getattr(self, "axis", None)
            if getattr(self, "broadcast", None) and axis is not None and 0 < b.ndim < a.ndim:
                b = b.reshape(b.shape + (1,) * (a.ndim - int(axis) - b.ndim))
            return base._run(self, a, b)

        return type(base.__name__, (base,), {"_run": _run})

    return [legacy(op) for op in (Add, Sub, Mul, Div)]
