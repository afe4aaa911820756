"""Regenerate tests/data/fold/: Linear/BatchNorm1d stacks exported by torch's two exporters.

For each placement (pre: Linear -> BN -> ReLU with input normalization; post: Linear -> ReLU ->
BN -> Dropout) and each exporter (dynamo with optimize=False, TorchScript), writes
`<exporter>_<placement>.onnx`, the input `<...>.input.npy` and torch's eval-mode output
`<...>.expected.npy`. tests/test_fold_torch_files.py folds them. Needs torch:

    python tools/make_fold_fixtures.py
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import onnx
import torch
from torch import nn

OUT = Path(__file__).resolve().parent.parent / "tests" / "data" / "fold"


def _stack(placement: str) -> nn.Sequential:
    torch.manual_seed(0)
    if placement == "pre":
        layers = [
            nn.BatchNorm1d(6, affine=False),
            nn.Linear(6, 8),
            nn.BatchNorm1d(8),
            nn.ReLU(),
            nn.Linear(8, 5),
            nn.BatchNorm1d(5),
            nn.ReLU(),
            nn.Linear(5, 3),
        ]
    else:
        layers = [
            nn.Linear(6, 8),
            nn.ReLU(),
            nn.BatchNorm1d(8),
            nn.Dropout(0.3),
            nn.Linear(8, 5),
            nn.Tanh(),
            nn.BatchNorm1d(5),
            nn.Linear(5, 3),
        ]
    model = nn.Sequential(*layers)
    with torch.no_grad():
        for mod in model:
            if isinstance(mod, nn.BatchNorm1d):
                mod.running_mean.uniform_(-1, 1)
                mod.running_var.uniform_(0.3, 3)
                if mod.affine:
                    mod.weight.uniform_(0.5, 1.5)
                    mod.bias.uniform_(-1, 1)
    return model.eval()


def _export(model: nn.Module, x: torch.Tensor, exporter: str) -> onnx.ModelProto:
    names = {"input_names": ["input"], "output_names": ["logits"]}
    if exporter == "dynamo":
        batch = torch.export.Dim("batch")
        prog = torch.onnx.export(
            model, (x,), dynamo=True, optimize=False, dynamic_shapes=({0: batch},), **names
        )
        return prog.model_proto
    buf = io.BytesIO()
    torch.onnx.export(model, (x,), buf, dynamo=False, dynamic_axes={"input": {0: "batch"}}, **names)
    return onnx.load_from_string(buf.getvalue())


def main() -> None:
    OUT.mkdir(parents=True, exist_ok=True)
    x = torch.randn(16, 6, generator=torch.Generator().manual_seed(1))
    for placement in ("pre", "post"):
        model = _stack(placement)
        with torch.no_grad():
            expected = model(x).numpy()
        for exporter in ("dynamo", "torchscript"):
            proto = _export(model, x, exporter)
            n_bn = sum(n.op_type == "BatchNormalization" for n in proto.graph.node)
            assert n_bn >= 2, f"{exporter} {placement}: the exporter folded the BN already"
            stem = OUT / f"{exporter}_{placement}"
            onnx.save(proto, f"{stem}.onnx")
            np.save(f"{stem}.input.npy", x.numpy())
            np.save(f"{stem}.expected.npy", expected)
            print(f"wrote {stem}.onnx ({n_bn} BatchNormalization)")


if __name__ == "__main__":
    main()
