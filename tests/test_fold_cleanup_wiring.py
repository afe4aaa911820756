"""The cleanup after the fold: on by default in `fold_model`, `fold_file`, `bn-onnx fold` and
`export --fold`; `--no-cleanup` leaves every other node as it was; the report's counts and its
`renamed` map, which `bn-onnx verify --locate --fold-report` reads."""

from __future__ import annotations

import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from fold_testing import bn_params, fold_and_compare, model_from_text, run_ort
from onnx import numpy_helper

from bn_onnx.cli import main
from bn_onnx.fold import fold_file, fold_model

HEAD = '<ir_version: 8, opset_import: ["" : 18]>'
# Gemm -> BN with the dynamo exporter's clutter after it: CastLike of the Clip bounds, an
# Expand to its own Shape, Identity nodes (one before a graph output).
CLUTTERED = """{head}
g (float[N, 4] x) => (float[N, 3] y, float[N, 3] z) {{
  h = Gemm (x, W, B)
  n = BatchNormalization (h, s, b, mu, var)
  lo_c = CastLike (lo, n)
  hi_c = CastLike (hi, n)
  c = Clip (n, lo_c, hi_c)
  sh = Shape (c)
  e = Expand (c, sh)
  i = Identity (e)
  r = Mul (i, k)
  y = Identity (r)
  z = Neg (i)
}}"""
CLUTTER_OPS = {"CastLike": 2, "Shape": 1, "Expand": 1, "Identity": 2}


def cluttered() -> onnx.ModelProto:
    rng = np.random.default_rng(7)
    inits = {
        "W": rng.normal(size=(4, 3)).astype(np.float32),
        "B": rng.normal(size=3).astype(np.float32),
        **bn_params(rng, 3),
        "lo": np.array(0.0),  # float64 bounds, cast like the float32 activations
        "hi": np.array(1.5),
        "k": np.array([2.0, 3.0, 4.0], np.float32),
    }
    return model_from_text(CLUTTERED.format(head=HEAD), inits)


def _x(rows: int = 5) -> np.ndarray:
    return np.random.default_rng(1).normal(size=(rows, 4)).astype(np.float32)


def test_cleanup_runs_by_default_and_removes_the_clutter():
    model = cluttered()
    result = fold_and_compare(model, {"x": _x()})
    ops = [n.op_type for n in result.model.graph.node]
    assert ops == ["Gemm", "Clip", "Mul", "Neg"]
    report = result.report.to_dict()
    assert report["cleanup"]["removed_ops"] == CLUTTER_OPS
    assert (report["cleanup"]["nodes_before"], report["cleanup"]["nodes_after"]) == (10, 4)
    assert report["cleanup"]["used_constant_folder"]
    # the report's own counts are taken after the cleanup
    assert (report["nodes_before"], report["nodes_after"]) == (11, 4)
    assert report["initializers_after"] == len(result.model.graph.initializer)


def test_no_cleanup_leaves_every_other_node_and_initializer_as_it_was():
    model = cluttered()
    result = fold_and_compare(model, {"x": _x()}, cleanup=False)
    assert result.report.cleanup is None and result.report.renamed == {}
    # The Gemm now computes the BN's output and takes its name; nothing else changes.
    expected = [_node(n, {"h": "n"}) for n in model.graph.node if n.op_type != "BatchNormalization"]
    assert [_node(n) for n in result.model.graph.node] == expected
    before = {t.name: t.SerializeToString() for t in model.graph.initializer}
    after = {t.name: t.SerializeToString() for t in result.model.graph.initializer}
    rewritten = {"W", "B"}
    bn = {"s", "b", "mu", "var"}  # read only by the BN: swept with it
    assert set(after) == set(before) - bn
    assert {k: v for k, v in after.items() if k not in rewritten} == {
        k: v for k, v in before.items() if k not in rewritten | bn
    }
    assert all(after[k] != before[k] for k in rewritten)
    # interface, metadata and opset as the input's
    assert result.model.graph.input == model.graph.input
    assert result.model.graph.output == model.graph.output
    assert result.model.opset_import == model.opset_import


def _node(node: onnx.NodeProto, rename: dict[str, str] | None = None) -> tuple:
    """A node as data: op, domain, inputs, outputs (renamed), attributes."""
    rename = rename or {}
    return (
        node.op_type,
        node.domain or "",
        list(node.input),
        [rename.get(o, o) for o in node.output],
        [a.SerializeToString() for a in node.attribute],
    )


def test_cleanup_keeps_interface_metadata_and_opset_and_adds_no_domain():
    model = cluttered()
    onnx.helper.set_model_props(model, {"bn_onnx.folded": "false", "other": "kept"})
    result = fold_model(model)
    out = result.model
    assert out.graph.input == model.graph.input and out.graph.output == model.graph.output
    assert out.opset_import == model.opset_import
    meta = {p.key: p.value for p in out.metadata_props}
    assert meta == {"bn_onnx.folded": "true", "other": "kept"}
    assert {n.domain for n in out.graph.node} <= {""}


def test_folded_flag_is_taken_after_the_cleanup():
    # a BN left by the fold (its input is a graph input) that nothing reads: the cleanup
    # removes it as dead code, and the file then holds no BN
    rng = np.random.default_rng(3)
    model = model_from_text(
        f"""{HEAD}
        g (float[N, 3] x) => (float[N, 3] y) {{
          y = Relu (x)
          dead = BatchNormalization (x, s, b, mu, var)
        }}""",
        bn_params(rng, 3),
    )
    onnx.helper.set_model_props(model, {"bn_onnx.folded": "false"})
    kept = fold_model(model, cleanup=False)
    assert [e.status for e in kept.report.entries] == ["left"]
    assert {p.key: p.value for p in kept.model.metadata_props}["bn_onnx.folded"] == "false"
    cleaned = fold_model(model)
    assert "BatchNormalization" not in [n.op_type for n in cleaned.model.graph.node]
    assert cleaned.report.cleanup["removed_ops"] == {"BatchNormalization": 1}
    assert {p.key: p.value for p in cleaned.model.metadata_props}["bn_onnx.folded"] == "true"


def test_renamed_values_compute_what_they_computed_under_their_old_name():
    model = cluttered()
    result = fold_model(model)
    # y = Identity(r) is a graph output: the cleanup gives r's value the name y
    assert result.report.renamed == {"r": "y"}
    x = _x()
    for old, new in result.report.renamed.items():
        (want,) = _run_exposing(model, old, x)
        (got,) = _run_exposing(result.model, new, x)
        np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-4)


def _run_exposing(model: onnx.ModelProto, name: str, x: np.ndarray) -> list[np.ndarray]:
    m = onnx.ModelProto.FromString(model.SerializeToString())
    if name not in {o.name for o in m.graph.output}:
        m.graph.output.append(onnx.helper.make_empty_tensor_value_info(name))
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    sess = ort.InferenceSession(m.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    return sess.run([name], {"x": x})


def test_fold_file_cleans_and_writes_the_counts_into_the_report(tmp_path):
    src, out, rep = tmp_path / "m.onnx", tmp_path / "f.onnx", tmp_path / "r.json"
    onnx.save(cluttered(), src)
    report = fold_file(src, out, report_path=rep)
    data = json.loads(rep.read_text())
    assert data == report.to_dict()
    assert data["cleanup"]["removed_ops"] == CLUTTER_OPS and data["renamed"] == {"r": "y"}
    assert [n.op_type for n in onnx.load(out).graph.node] == ["Gemm", "Clip", "Mul", "Neg"]
    plain = fold_file(src, tmp_path / "p.onnx", cleanup=False)
    assert plain.cleanup is None and plain.nodes_after == 10


def test_fold_cli_prints_the_cleanup_line_and_no_cleanup_turns_it_off(tmp_path, capsys):
    src = tmp_path / "m.onnx"
    onnx.save(cluttered(), src)
    out, rep = tmp_path / "f.onnx", tmp_path / "r.json"
    assert main(["fold", str(src), "-o", str(out), "--report", str(rep)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[-1] == (
        "cleanup: 10 -> 4 nodes (removed CastLike 2, Identity 2, Expand 1, Shape 1)"
    )
    assert json.loads(rep.read_text())["cleanup"]["nodes_after"] == 4
    assert main(["fold", str(src), "-o", str(out), "--report", str(rep), "--no-cleanup"]) == 0
    text = capsys.readouterr().out
    assert "cleanup" not in text and "nodes 11 -> 10" in text
    assert json.loads(rep.read_text())["cleanup"] is None
    assert len(onnx.load(out).graph.node) == 10


def test_cleanup_line_names_added_ops_and_merged_initializers():
    from bn_onnx.fold.report import cleanup_line

    counts = {
        "modified": True,
        "nodes_before": 20,
        "nodes_after": 9,
        "removed_ops": {op: n for n, op in enumerate("ABCDEFGH", start=1)} | {"Cast": -2},
        "deduplicated": 1,
    }
    assert cleanup_line(counts) == (
        "cleanup: 20 -> 9 nodes (removed H 8, G 7, F 6, E 5, D 4, C 3, ...; added Cast 2), "
        "1 initializer merged"
    )
    same = {"modified": False, "nodes_before": 5, "nodes_after": 5}
    assert cleanup_line(same) == "cleanup: nothing to clean (5 nodes)"
    merged = {"modified": True, "nodes_before": 5, "nodes_after": 5, "deduplicated": 2}
    assert cleanup_line(merged) == "cleanup: 5 -> 5 nodes, 2 initializers merged"


def test_verify_locate_reads_the_fold_reports_renamed_map(tmp_path, capsys):
    # fold with --report, break a folded weight, then verify --locate --fold-report
    src, out, rep = tmp_path / "m.onnx", tmp_path / "f.onnx", tmp_path / "r.json"
    onnx.save(cluttered(), src)
    assert main(["fold", str(src), "-o", str(out), "--report", str(rep), "-q"]) == 0
    assert json.loads(rep.read_text())["renamed"] == {"r": "y"}
    args = ["verify", str(src), str(out), "--locate", "--fold-report", str(rep)]
    assert main(args) == 0
    assert "PASS" in capsys.readouterr().out
    folded = onnx.load(out)
    w = next(t for t in folded.graph.initializer if t.name == "W")
    a = numpy_helper.to_array(w).copy()
    a[1, 2] += 1.0
    w.CopyFrom(numpy_helper.from_array(a, "W"))
    onnx.save(folded, out)
    args = ["verify", str(src), str(out), "--locate", "--fold-report", str(rep)]
    assert main(args) == 1
    text = capsys.readouterr().out
    first = text.split("first divergence: ")[1].splitlines()
    assert first[0].startswith("n, computed by") and first[0].endswith("(Gemm)")
    assert "reading initializers W, B" in first[2]


@pytest.mark.parametrize("cleanup", [True, False])
def test_fold_verify_option_works_with_and_without_cleanup(tmp_path, capsys, cleanup):
    src, out = tmp_path / "m.onnx", tmp_path / "f.onnx"
    onnx.save(cluttered(), src)
    flag = [] if cleanup else ["--no-cleanup"]
    assert main(["fold", str(src), "-o", str(out), "--verify", *flag]) == 0
    text = capsys.readouterr().out
    assert "verified: PASS" in text and ("cleanup: 10 -> 4" in text) == cleanup
    x = _x()
    for w, g in zip(run_ort(cluttered(), {"x": x}), run_ort(onnx.load(out), {"x": x}), strict=True):
        np.testing.assert_allclose(g, w, atol=1e-5, rtol=1e-4)


def test_onnxscript_is_imported_only_for_a_model_with_clutter(tmp_path):
    import subprocess
    import sys
    from pathlib import Path

    digits = Path(__file__).resolve().parent.parent / "models" / "digits" / "model.onnx"
    src = tmp_path / "m.onnx"
    onnx.save(cluttered(), src)
    code = (
        "import sys; from bn_onnx.fold import fold_file; "
        "fold_file(sys.argv[1], sys.argv[2]); print('onnxscript' in sys.modules)"
    )
    for path, imported in ((digits, "False"), (src, "True")):
        proc = subprocess.run(
            [sys.executable, "-c", code, str(path), str(tmp_path / "out.onnx")],
            capture_output=True,
            text=True,
            check=True,
        )
        assert proc.stdout.strip() == imported, (path, proc.stderr)
