"""Tabular round trips: read a file -> train -> export -> the ONNX file, fed the raw columns,
gives what the Python preprocessing plus the torch model give, folded or not."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from bn_onnx import onnx_meta
from bn_onnx.checkpoint import load_model, read_checkpoint
from bn_onnx.checkpoint_forward import checkpoint_forward
from bn_onnx.cli import main
from bn_onnx.columns import COLUMNS_KEY, feeds_from_columns, read_columns
from bn_onnx.errors import InputDataError
from bn_onnx.export import export_checkpoint
from bn_onnx.torch_eval import run_checkpoint, run_checkpoint_taps
from bn_onnx.train import TrainSettings, train

ATOL, RTOL = 1e-5, 1e-4
ROOT = Path(__file__).resolve().parent.parent


def people_csv(path: Path, n: int = 160, seed: int = 0, extra: dict | None = None) -> Path:
    """A small CSV: numbers with gaps, a category that decides the label, a zip code."""
    rng = np.random.default_rng(seed)
    cities = ["Busan", "Seoul", "Daegu", "Ulsan"]
    cols = {
        "age": ["" if i % 6 == 0 else f"{rng.normal(40, 10):.0f}" for i in range(n)],
        "city": ["" if i % 9 == 0 else cities[i % 4] for i in range(n)],
        "income": [f"{v:.2f}" for v in rng.lognormal(8, 0.5, n)],
        "zip": [str(rng.choice([100, 200, 300])) for _ in range(n)],
        "label": ["yes" if i % 4 in (0, 1) else "no" for i in range(n)],
    }
    cols.update(extra or {})
    with path.open("w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(list(cols))
        w.writerows(zip(*cols.values(), strict=True))
    return path


def quick(dataset: Path, **kw) -> TrainSettings:
    base = dict(dataset=str(dataset), target="label", hidden=(16, 8), epochs=2, batch_size=32)
    base.update(device="cpu", patience=0, **kw)
    return TrainSettings(**base)


def ort_run(path: Path, feeds: dict[str, np.ndarray]) -> np.ndarray:
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    sess = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    return sess.run(None, feeds)[0]


def torch_run(ckpt_dir: Path, feeds: dict[str, np.ndarray]) -> np.ndarray:
    """The Python preprocessing (TabularSpec.preprocess) then the torch module, by hand."""
    model, ckpt = load_model(ckpt_dir)
    numeric, codes = ckpt.config.tabular.preprocess(feeds)
    inputs = ckpt.config.tabular.model_inputs(numeric, codes)
    with torch.no_grad():
        return model(*(torch.from_numpy(a) for a in inputs)).numpy()


def hard_rows(spec) -> dict[str, np.ndarray]:
    """Rows with every gap: NaN everywhere, unseen and missing categories, big values."""
    k, m = spec.n_continuous, spec.n_categorical
    feeds = {}
    if k:
        cont = np.array(
            [[np.nan] * k, [0.0] * k, [1e4] * k, [-3.5] * k, [np.nan] * k], dtype=np.float32
        )
        feeds["continuous"] = cont
    if m:
        cat = np.array(
            [[""] * m, ["never seen"] * m, ["Busan"] * m, ["100"] * m, ["Seoul"] * m],
            dtype=object,
        )
        feeds["categorical"] = cat
    return feeds


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    root = tmp_path_factory.mktemp("tabular")
    path = people_csv(root / "people.csv")
    result = train(quick(path, categorical=("zip",)), root / "ckpt")
    unfolded = export_checkpoint(root / "ckpt", root / "m.onnx")
    folded = export_checkpoint(root / "ckpt", root / "m.folded.onnx", fold=True)
    return {"root": root, "csv": path, "result": result, "unfolded": unfolded, "folded": folded}


def all_feeds(run) -> dict[str, np.ndarray]:
    data = run["result"].dataset
    extra = hard_rows(data.tabular)
    return {k: np.concatenate([data.feeds_test[k], extra[k]]) for k in data.feeds_test}


@pytest.mark.parametrize("which", ["unfolded", "folded"])
def test_onnx_equals_python_preprocessing_plus_torch(run, which):
    feeds = all_feeds(run)
    got = ort_run(run[which].path, feeds)
    expected = torch_run(run["root"] / "ckpt", feeds)
    np.testing.assert_allclose(got, expected, atol=ATOL, rtol=RTOL)
    exact = checkpoint_forward(run["root"] / "ckpt", feeds).output
    np.testing.assert_allclose(got, exact, atol=ATOL, rtol=RTOL)
    assert np.isfinite(got).all()


def test_onnx_reference_evaluator_agrees(run):
    """A third runner: onnx.reference (LabelEncoder from ai.onnx.ml included)."""
    from onnx.reference import ReferenceEvaluator

    feeds = all_feeds(run)
    ev = ReferenceEvaluator(str(run["folded"].path))
    got = ev.run(None, feeds)[0]
    np.testing.assert_allclose(got, ort_run(run["folded"].path, feeds), atol=ATOL, rtol=RTOL)


def test_torch_eval_and_reference_take_feeds_by_input_name(run):
    feeds = all_feeds(run)
    ckpt = run["root"] / "ckpt"
    out, taps = run_checkpoint_taps(ckpt, feeds)
    np.testing.assert_array_equal(out, torch_run(ckpt, feeds))
    np.testing.assert_array_equal(run_checkpoint(ckpt, feeds), out)
    fwd = checkpoint_forward(read_checkpoint(ckpt), feeds)
    assert [label for label, _ in taps] == [label for label, _ in fwd.taps]
    for (label, a), (_, b) in zip(taps, fwd.taps, strict=True):
        np.testing.assert_allclose(a, b, atol=ATOL, rtol=RTOL, err_msg=label)
    with pytest.raises(InputDataError, match="raw columns by input name"):
        checkpoint_forward(ckpt, np.zeros((2, 3)))
    with pytest.raises(InputDataError, match="raw columns by input name"):
        run_checkpoint(ckpt, np.zeros((2, 3)))


def test_plain_checkpoint_takes_feeds_too():
    digits = ROOT / "models" / "digits" / "checkpoint"
    x = np.load(ROOT / "models" / "digits" / "sample_input.npy")
    np.testing.assert_array_equal(run_checkpoint(digits, {"input": x}), run_checkpoint(digits, x))
    np.testing.assert_array_equal(
        checkpoint_forward(digits, {"input": x}).output, checkpoint_forward(digits, x).output
    )


def test_files_hold_the_raw_inputs_metadata_and_fold_every_bn(run):
    spec = run["result"].model.config.tabular
    for which, flag in (("unfolded", "false"), ("folded", "true")):
        model = onnx.load(run[which].path)
        onnx.checker.check_model(model, full_check=True)
        inputs = {i.name: i.type.tensor_type for i in model.graph.input}
        assert list(inputs) == ["continuous", "categorical"]
        assert inputs["continuous"].elem_type == onnx.TensorProto.FLOAT
        assert inputs["categorical"].elem_type == onnx.TensorProto.STRING
        dims = [d.dim_param or d.dim_value for d in inputs["categorical"].shape.dim]
        assert dims == ["batch", spec.n_categorical]
        assert {o.domain for o in model.opset_import} == {"", "ai.onnx.ml"}
        assert {o.version for o in model.opset_import if o.domain == ""} == {18}
        meta = onnx_meta.get_metadata(model)
        assert meta[onnx_meta.FOLDED] == flag
        assert read_columns(meta) == list(spec.columns)
        assert meta[COLUMNS_KEY] == spec.columns_json()
    unfolded = onnx.load(run["unfolded"].path)
    # input normalization + one BN per hidden block
    assert len(onnx_meta.bn_nodes(unfolded)) == 3
    assert onnx_meta.bn_nodes(onnx.load(run["folded"].path)) == []
    assert run["folded"].fold_report["n_left"] == 0
    ops = onnx_meta.op_counts(onnx.load(run["folded"].path))
    assert ops["LabelEncoder"] == spec.n_categorical and ops["Gemm"] == 3


def test_rows_by_column_name_through_the_metadata_schema(run):
    """The seam: CSV cells by column name -> feeds_from_columns -> the same outputs."""
    with run["csv"].open(newline="") as fh:
        rows = list(csv.DictReader(fh))
    schema = read_columns(onnx_meta.get_metadata(onnx.load(run["folded"].path)))
    feeds = feeds_from_columns(schema, {k: [r[k] for r in rows] for k in rows[0]})
    got = ort_run(run["folded"].path, feeds)
    np.testing.assert_allclose(got, torch_run(run["root"] / "ckpt", feeds), atol=ATOL, rtol=RTOL)


def test_unseen_category_maps_to_the_unknown_embedding(run):
    data = run["result"].dataset
    feeds = {k: v[:4].copy() for k, v in data.feeds_test.items()}
    other = {k: v.copy() for k, v in feeds.items()}
    other["categorical"][:, 0] = "Atlantis"
    also = {k: v.copy() for k, v in feeds.items()}
    also["categorical"][:, 0] = "Neverland"
    path = run["folded"].path
    # two unseen cities are the same code, so the same outputs
    np.testing.assert_array_equal(ort_run(path, other), ort_run(path, also))
    np.testing.assert_allclose(
        ort_run(path, other), torch_run(run["root"] / "ckpt", other), atol=ATOL, rtol=RTOL
    )


def test_parquet_round_trip(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    rng = np.random.default_rng(5)
    n = 120
    table = pa.table(
        {
            "x": pa.array(
                [None if i % 5 == 0 else float(v) for i, v in enumerate(rng.normal(size=n))]
            ),
            "kind": pa.array([None if i % 7 == 0 else "abc"[i % 3] for i in range(n)]),
            "n": pa.array([i % 4 for i in range(n)], pa.int64()),
            "label": pa.array([int(i % 3 == 0) for i in range(n)]),
        }
    )
    pq.write_table(table, tmp_path / "t.parquet")
    train(quick(tmp_path / "t.parquet", categorical=("n",)), tmp_path / "ckpt")
    out = export_checkpoint(tmp_path / "ckpt", tmp_path / "t.onnx", fold=True)
    schema = read_columns(onnx_meta.get_metadata(onnx.load(out.path)))
    # rows by column name straight from the Parquet file, as an app reads them
    back = pq.read_table(tmp_path / "t.parquet")
    feeds = feeds_from_columns(schema, {c: back.column(c).to_pylist() for c in back.column_names})
    assert np.isnan(feeds["continuous"]).any() and "" in feeds["categorical"][:, 0].tolist()
    np.testing.assert_allclose(
        ort_run(out.path, feeds), torch_run(tmp_path / "ckpt", feeds), atol=ATOL, rtol=RTOL
    )
    assert onnx_meta.bn_nodes(onnx.load(out.path)) == []


def test_a_column_that_is_all_missing(tmp_path):
    path = people_csv(tmp_path / "p.csv", n=80, extra={"empty": [""] * 80, "none": [""] * 80})
    train(quick(path, categorical=("none",)), tmp_path / "ckpt")
    spec = read_checkpoint(tmp_path / "ckpt").config.tabular
    by_name = {c.name: c for c in spec.columns}
    assert by_name["empty"].fill == 0.0 and "empty" in spec.indicators
    assert by_name["none"].vocabulary == ()
    for fold in (False, True):
        out = export_checkpoint(tmp_path / "ckpt", tmp_path / f"m{fold}.onnx", fold=fold)
        feeds = hard_rows(spec)
        got = ort_run(out.path, feeds)
        assert np.isfinite(got).all()
        np.testing.assert_allclose(got, torch_run(tmp_path / "ckpt", feeds), atol=ATOL, rtol=RTOL)


@pytest.mark.parametrize(
    ("extra", "kw"),
    [
        ({}, {"bn": "post", "embedding_dropout": 0.2}),
        ({}, {"bn": "none", "input_norm": False}),
        ({"age": None, "income": None, "zip": None}, {}),  # categorical columns only
        ({"city": None}, {"dropout": 0.1}),  # continuous columns only, with gaps
    ],
    ids=["bn-post", "bn-none-no-input-norm", "categorical-only", "continuous-only"],
)
def test_model_variants_export_and_fold(tmp_path, extra, kw):
    path = people_csv(tmp_path / "p.csv", n=80)
    if extra:
        with path.open(newline="") as fh:
            rows = list(csv.DictReader(fh))
        keep = [k for k in rows[0] if k not in extra]
        with path.open("w", newline="") as fh:
            w = csv.DictWriter(fh, keep, extrasaction="ignore")
            w.writeheader()
            w.writerows(rows)
    train(quick(path, epochs=1, **kw), tmp_path / "ckpt")
    spec = read_checkpoint(tmp_path / "ckpt").config.tabular
    feeds = hard_rows(spec)
    expected = torch_run(tmp_path / "ckpt", feeds)
    for fold in (False, True):
        out = export_checkpoint(tmp_path / "ckpt", tmp_path / f"m{fold}.onnx", fold=fold)
        model = onnx.load(out.path)
        assert [i.name for i in model.graph.input] == [
            name for name in ("continuous", "categorical") if name in feeds
        ]
        np.testing.assert_allclose(ort_run(out.path, feeds), expected, atol=ATOL, rtol=RTOL)
        if fold:
            assert onnx_meta.bn_nodes(model) == []
            assert "Dropout" not in onnx_meta.op_counts(model)


def test_cli_trains_and_exports_a_csv_with_categories(tmp_path, capsys):
    path = people_csv(tmp_path / "p.csv", n=80)
    args = ["train", "--dataset", str(path), "--target", "label", "--categorical", "zip"]
    args += ["--hidden", "8", "--epochs", "1", "--device", "cpu", "--out", str(tmp_path / "o")]
    assert main(args) == 0
    assert "p.csv: test accuracy" in capsys.readouterr().out
    cfg = read_checkpoint(tmp_path / "o")
    assert cfg.meta["training"]["categorical"] == ["zip"]
    assert cfg.meta["dataset"]["categorical"] == ["zip"]
    assert main(["export", str(tmp_path / "o"), "-o", str(tmp_path / "m.onnx"), "--fold"]) == 0
    assert "0 left" in capsys.readouterr().out


def test_cli_wrong_column_type_is_one_line_exit_2(tmp_path, capsys):
    path = people_csv(tmp_path / "p.csv", n=40)
    args = ["train", "--dataset", str(path), "--target", "label", "--continuous", "city"]
    assert main([*args, "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "column 'city' is declared continuous" in err
    assert not (tmp_path / "o").exists()


def test_tabular_checkpoint_tensors_are_checked_by_name_and_shape(run, tmp_path):
    import json
    import shutil

    from safetensors.numpy import load_file, save_file

    from bn_onnx.errors import CheckpointError

    ckpt = tmp_path / "ckpt"
    shutil.copytree(run["root"] / "ckpt", ckpt)
    tensors = load_file(str(ckpt / "model.safetensors"))
    rows, width = tensors["embeddings.0.weight"].shape
    bad = dict(tensors, **{"embeddings.0.weight": np.zeros((rows + 1, width), np.float32)})
    save_file(bad, str(ckpt / "model.safetensors"))
    with pytest.raises(CheckpointError, match=r"'embeddings.0.weight' has shape"):
        read_checkpoint(ckpt)
    save_file(tensors, str(ckpt / "model.safetensors"))
    read_checkpoint(ckpt)
    config = json.loads((ckpt / "config.json").read_text())
    config["model"]["tabular"]["embedding_dims"][0] = width + 1
    (ckpt / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="in_features") as info:
        read_checkpoint(ckpt)
    assert "\n" not in str(info.value)
