"""onnx.reference kernels corrected for verify: the `new_ops` of every `ReferenceEvaluator`
verify makes, for the float64 graph (`bn_onnx.verify.float64`) and for `--provider reference`
(`bn_onnx.verify.runners.OnnxReferenceRunner`), which rounds each result to the model's dtype.

Each class is named for the op it replaces; the arithmetic is `bn_onnx.float64_kernels`'.
"""

from __future__ import annotations

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

    class Erf(OpRun):  # the class name is the op it replaces
        op_domain = ""

        def _run(self, x: np.ndarray) -> tuple[np.ndarray]:
            return (erf(x).astype(x.dtype),)

    class Conv(OpRun):
        op_domain = ""

        def _run(
            self,
            x,
            w,
            b=None,
            auto_pad=None,
            dilations=None,
            group=None,  # noqa: ANN001
            kernel_shape=None,
            pads=None,
            strides=None,
        ):
            y = conv(
                x,
                w,
                b,
                strides=strides,
                pads=pads,
                dilations=dilations,
                group=group or 1,
                auto_pad=auto_pad or "NOTSET",
            )
            return (y.astype(x.dtype),)

    class ConvTranspose(OpRun):
        op_domain = ""

        def _run(
            self,
            x,
            w,
            b=None,
            auto_pad=None,
            dilations=None,
            group=None,  # noqa: ANN001
            kernel_shape=None,
            output_padding=None,
            output_shape=None,
            pads=None,
            strides=None,
        ):
            y = conv_transpose(
                x,
                w,
                b,
                strides=strides,
                pads=pads,
                dilations=dilations,
                group=group or 1,
                auto_pad=auto_pad or "NOTSET",
                output_padding=output_padding,
                output_shape=output_shape,
            )
            return (y.astype(x.dtype),)

    class BatchNormalization(OpRun):
        op_domain = ""

        def _run(
            self,
            x,
            scale,
            bias,
            mean,
            var,
            epsilon=None,
            momentum=None,  # noqa: ANN001
            training_mode=None,
            is_test=None,
            spatial=None,
            consumed_inputs=None,
        ):
            y = batch_norm_node(x, scale, bias, mean, var, epsilon, training_mode, spatial)
            return (y.astype(x.dtype),)

    class MaxPool(OnnxMaxPool):
        op_domain = ""

        def _run(
            self,
            x,
            auto_pad=None,
            ceil_mode=None,
            dilations=None,  # noqa: ANN001
            kernel_shape=None,
            pads=None,
            storage_order=None,
            strides=None,
        ):
            if len([o for o in self.onnx_node.output if o]) > 1:
                return super()._run(
                    x, auto_pad, ceil_mode, dilations, kernel_shape, pads, storage_order, strides
                )
            y = pool(
                x,
                "max",
                kernel_shape,
                strides=strides,
                pads=pads,
                dilations=dilations,
                ceil_mode=ceil_mode or 0,
                auto_pad=auto_pad or "NOTSET",
            )
            return (y.astype(x.dtype),)

    class AveragePool(OpRun):
        op_domain = ""

        def _run(
            self,
            x,
            auto_pad=None,
            ceil_mode=None,
            count_include_pad=None,  # noqa: ANN001
            dilations=None,
            kernel_shape=None,
            pads=None,
            strides=None,
        ):
            y = pool(
                x,
                "avg",
                kernel_shape,
                strides=strides,
                pads=pads,
                dilations=dilations,
                ceil_mode=ceil_mode or 0,
                count_include_pad=count_include_pad or 0,
                auto_pad=auto_pad or "NOTSET",
            )
            return (y.astype(x.dtype),)

    return [Erf, Conv, ConvTranspose, BatchNormalization, MaxPool, AveragePool, *_legacy_binary()]


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
