"""`bn_onnx.fold` on files written by torch's own exporters, untouched by bn-onnx's export.

Linear/BatchNorm1d stacks in every placement (BN before the activation, after it, on the
inputs, last) exported with `torch.onnx.export(dynamo=True, optimize=False)` and with the
TorchScript exporter (`dynamo=False`). The two write BN differently, and fold must handle both:

- dynamo: one BatchNormalization per BN, parameters as initializers, the model split into
  `.onnx` + `.onnx.data`; a BN without affine parameters gets its scale and bias from
  `Expand(CastLike(Constant), Shape(input))` chains; eval-mode Dropout becomes Identity.
- TorchScript: `training_mode=0` spelled out; affine-free scale and bias as Constant nodes;
  parameters with equal values (an untrained BN: weight == running_var == 1) deduplicated
  into one initializer read through Identity nodes.
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from export_testing import ATOL, RTOL, bn_count, randomize_bn, run_ort

torch = pytest.importorskip("torch")
from torch import nn  # noqa: E402

from bn_onnx.export import _quiet_torch_exporter, _reuse_torchlib_registry  # noqa: E402
from bn_onnx.fold import fold_file  # noqa: E402
from bn_onnx.model import MLP, MLPConfig  # noqa: E402

F, H, C = 6, 10, 3  # features, hidden width, outputs


def _stack(kind: str) -> nn.Module:
    if kind == "pre":
        layers = [nn.Linear(F, H), nn.BatchNorm1d(H), nn.ReLU(), nn.Linear(H, H)]
        layers += [nn.BatchNorm1d(H), nn.ReLU(), nn.Linear(H, C)]
    elif kind == "post":
        layers = [nn.Linear(F, H), nn.ReLU(), nn.BatchNorm1d(H), nn.Linear(H, H), nn.Tanh()]
        layers += [nn.BatchNorm1d(H), nn.Linear(H, C)]
    elif kind == "input":
        layers = [nn.BatchNorm1d(F, affine=False), nn.Linear(F, H), nn.ReLU(), nn.Linear(H, C)]
    elif kind == "input-affine+post":
        layers = [nn.BatchNorm1d(F), nn.Linear(F, H), nn.ReLU(), nn.BatchNorm1d(H)]
        layers += [nn.Linear(H, C)]
    elif kind == "pre+dropout":
        layers = [nn.Linear(F, H), nn.BatchNorm1d(H), nn.ReLU(), nn.Dropout(0.3)]
        layers += [nn.Linear(H, C)]
    elif kind == "bn-last":
        layers = [nn.Linear(F, H), nn.ReLU(), nn.Linear(H, C), nn.BatchNorm1d(C)]
    elif kind == "bn-onnx-mlp":
        return MLP(MLPConfig(in_features=F, out_features=C, hidden=(H, H), bn="pre"))
    else:
        raise ValueError(kind)
    return nn.Sequential(*layers)


KINDS = ["pre", "post", "input", "input-affine+post", "pre+dropout", "bn-last", "bn-onnx-mlp"]


def _model(kind: str, trained: bool) -> nn.Module:
    torch.manual_seed(KINDS.index(kind))
    model = _stack(kind)
    if trained:
        randomize_bn(model, KINDS.index(kind))
    return model.eval()


def _export(model: nn.Module, path, exporter: str) -> None:
    x = torch.randn(3, F)
    with _quiet_torch_exporter(), _reuse_torchlib_registry(), torch.no_grad():
        if exporter == "dynamo":
            torch.onnx.export(
                model,
                (x,),
                str(path),
                dynamo=True,
                optimize=False,
                input_names=["input"],
                output_names=["out"],
                dynamic_shapes=({0: torch.export.Dim("batch")},),
                verbose=False,
            )
        else:
            torch.onnx.export(
                model,
                (x,),
                str(path),
                dynamo=False,
                input_names=["input"],
                output_names=["out"],
                dynamic_axes={"input": {0: "batch"}, "out": {0: "batch"}},
                opset_version=18,
            )


# dynamo exports cost about a second each: trained statistics only. TorchScript exports are
# cheap, so they also run untrained (default statistics), where it deduplicates parameters.
CASES = [(k, "dynamo", True) for k in KINDS]
CASES += [(k, "torchscript", trained) for k in KINDS for trained in (True, False)]


@pytest.mark.parametrize(
    ("kind", "exporter", "trained"),
    CASES,
    ids=[f"{k}-{e}-{'trained' if t else 'untrained'}" for k, e, t in CASES],
)
def test_fold_removes_every_bn_from_torch_exporter_files(tmp_path, kind, exporter, trained):
    model = _model(kind, trained)
    n_bn = sum(isinstance(m, nn.BatchNorm1d) for m in model.modules())
    src = tmp_path / "model.onnx"
    _export(model, src, exporter)
    original = onnx.load(src)
    assert bn_count(original) == n_bn  # optimize=False: torch fused nothing itself

    out = tmp_path / "model.folded.onnx"
    report = fold_file(src, out)
    left = [(e.node, e.reason) for e in report.left]
    assert left == []
    assert (report.n_bn, report.n_folded) == (n_bn, n_bn)
    folded = onnx.load(out)
    assert bn_count(folded) == 0
    onnx.checker.check_model(str(out), full_check=True)
    assert [i.name for i in folded.graph.input] == [i.name for i in original.graph.input]
    assert [o.name for o in folded.graph.output] == [o.name for o in original.graph.output]

    x = np.random.default_rng(1).normal(0.3, 1.5, size=(17, F)).astype(np.float32)
    before = run_ort(src, x)
    after = run_ort(out, x)
    with torch.no_grad():
        expected = model(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(before, expected, atol=ATOL, rtol=RTOL)
    np.testing.assert_allclose(after, before, atol=ATOL, rtol=RTOL)
