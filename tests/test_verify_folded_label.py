"""verify's "(folded)" label comes from the `bn_onnx.folded` metadata that fold and export
write, never from the absence of BatchNormalization nodes."""

from __future__ import annotations

import numpy as np
import onnx
from fold_testing import model_from_text, op_count

from bn_onnx import onnx_meta, verify
from bn_onnx.cli import main


def _chain(path):
    """Gemm -> Mul -> Add by per-channel constants: no BN, but what the fold removes."""
    rng = np.random.default_rng(0)
    text = """
    <ir_version: 8, opset_import: ["" : 18]>
    g (float[N, 5] x) => (float[N, 4] y) {
      h = Gemm(x, w, wb)
      m = Mul(h, k)
      y = Add(m, q)
    }
    """
    inits = {
        "w": rng.normal(size=(5, 4)).astype(np.float32),
        "wb": rng.normal(size=4).astype(np.float32),
        "k": rng.normal(1, 0.5, 4).astype(np.float32),
        "q": rng.normal(0, 0.5, 4).astype(np.float32),
    }
    onnx.save(model_from_text(text, inits), path)
    return path


def test_a_model_without_bn_or_flag_is_not_called_folded_and_the_fold_output_is(tmp_path):
    chain = _chain(tmp_path / "chain.onnx")
    out = tmp_path / "chain.folded.onnx"
    assert main(["fold", str(chain), "-o", str(out)]) == 0
    folded = onnx.load(out)
    assert op_count(folded, "Mul") == op_count(folded, "Add") == 0
    assert onnx_meta.get_metadata(folded)[onnx_meta.FOLDED] == "true"
    report = verify.verify([chain, out], provider="cpu")
    assert report
    assert [m["folded"] for m in report.models] == [None, True]
    text = verify.render(report)
    assert text.splitlines()[0] == "models: chain.onnx, chain.folded.onnx (folded)"
    assert report.folding  # the original (not marked folded) against the folded model
    alone = verify.render(verify.verify([chain], provider="cpu"))
    assert alone.splitlines()[0] == "models: chain.onnx"
