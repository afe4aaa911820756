"""Provider resolution, checked sessions (simulated silent fallback), and the Predictor."""

from __future__ import annotations

import json
import threading
import warnings

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper
from serve_testing import bare_tabular

from bn_onnx import graphs, runtime
from bn_onnx.errors import (
    InputDataError,
    InputFileError,
    ProviderError,
    UnsupportedModelError,
    UsageError,
)
from bn_onnx.runtime import CPU, CUDA, Predictor, create_session, resolve_providers

WIDTHS = [64, 128, 64, 10]


@pytest.fixture(scope="module")
def model_path(tmp_path_factory):
    model = graphs.build_mlp(WIDTHS, "folded", seed=3)
    helper.set_model_props(
        model,
        {
            "bn_onnx.task": "classification",
            "bn_onnx.class_names": json.dumps([f"digit{i}" for i in range(10)]),
        },
    )
    path = tmp_path_factory.mktemp("rt") / "m.onnx"
    onnx.save(model, path)
    return path


@pytest.fixture(scope="module")
def predictor(model_path):
    return Predictor(model_path, provider="cpu", threads=1)


def _bare(path, x):
    sess = ort.InferenceSession(str(path), providers=[CPU])
    return sess.run(None, {"input": x})[0]


def _x(n, seed=0, width=WIDTHS[0]):
    return np.random.default_rng(seed).standard_normal((n, width)).astype(np.float32)


# ---- providers -----------------------------------------------------------------------------


def test_cpu_and_auto_resolve_to_cpu_without_cuda(monkeypatch):
    monkeypatch.setattr(ort, "get_available_providers", lambda: [CPU])
    assert resolve_providers("cpu") == [CPU]
    assert resolve_providers("auto") == [CPU]
    assert resolve_providers(["CPUExecutionProvider"]) == [CPU]


def test_auto_prefers_cuda_when_present(monkeypatch):
    monkeypatch.setattr(ort, "get_available_providers", lambda: [CUDA, CPU])
    assert resolve_providers("auto") == [CUDA, CPU]
    assert resolve_providers("cuda") == [CUDA, CPU]
    assert resolve_providers("cpu,cuda") == [CPU, CUDA]


def test_cuda_missing_says_install_onnxruntime_gpu_instead(monkeypatch):
    monkeypatch.setattr(ort, "get_available_providers", lambda: [CPU])
    monkeypatch.setattr(runtime, "installed_onnxruntime_packages", lambda: ["onnxruntime"])
    with pytest.raises(ProviderError) as err:
        resolve_providers("cuda")
    msg = str(err.value)
    assert "onnxruntime-gpu" in msg and "instead of onnxruntime" in msg
    assert "\n" not in msg


def test_cuda_missing_with_both_packages_installed_says_so(monkeypatch):
    monkeypatch.setattr(ort, "get_available_providers", lambda: [CPU])
    monkeypatch.setattr(
        runtime, "installed_onnxruntime_packages", lambda: ["onnxruntime", "onnxruntime-gpu"]
    )
    with pytest.raises(ProviderError, match="both onnxruntime and onnxruntime-gpu"):
        resolve_providers("cuda")


def test_installed_packages_are_detected_from_metadata():
    assert "onnxruntime" in runtime.installed_onnxruntime_packages() or (
        "onnxruntime-gpu" in runtime.installed_onnxruntime_packages()
    )


def test_unknown_provider_lists_the_choices():
    with pytest.raises(ProviderError, match="cpu, cuda"):
        resolve_providers("tpu")
    with pytest.raises(ProviderError):
        resolve_providers([])


class _FakeSession:
    """Stands in for InferenceSession when CUDA 'exists' but onnxruntime silently uses the CPU."""

    calls: list[dict] = []

    def __init__(self, model, sess_options=None, providers=None, provider_options=None):
        _FakeSession.calls.append({"providers": providers, "options": provider_options})

    def get_providers(self):
        return [CPU]


@pytest.fixture
def silent_fallback(monkeypatch):
    _FakeSession.calls = []
    monkeypatch.setattr(ort, "get_available_providers", lambda: [CUDA, CPU])
    monkeypatch.setattr(ort, "InferenceSession", _FakeSession)
    return _FakeSession


def test_strict_cuda_fails_when_onnxruntime_falls_back_to_cpu(silent_fallback, model_path):
    with pytest.raises(ProviderError, match="onnxruntime uses cpu"):
        create_session(model_path, provider="cuda")


def test_auto_warns_and_reports_when_onnxruntime_falls_back(silent_fallback, model_path):
    with pytest.warns(runtime.ProviderWarning, match="onnxruntime uses cpu"):
        info = create_session(model_path, provider="auto")
    assert info.providers == [CPU]
    assert info.warnings and "cuda" in info.warnings[0]
    assert info.tf32 is None and info.describe() == "cpu"


def test_cuda_options_carry_device_id_and_tf32_switch(silent_fallback, model_path):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        create_session(model_path, provider="auto", use_tf32=False, device_id=1)
    call = silent_fallback.calls[-1]
    assert call["providers"] == [CUDA, CPU]
    assert call["options"][0] == {"device_id": "1", "use_tf32": "0"}
    assert call["options"][1] == {}


def test_session_options_set_threads_and_optimization_level():
    so = runtime.session_options(threads=2, graph_optimization_level="basic")
    assert so.intra_op_num_threads == 2
    assert so.graph_optimization_level == ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    assert (
        runtime.session_options(graph_optimization_level="disable").graph_optimization_level
        == ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    )
    with pytest.raises(UsageError):
        runtime.session_options(graph_optimization_level="max")
    with pytest.raises(UsageError):
        runtime.session_options(threads=0)


def test_real_cpu_session_reports_what_it_uses(model_path):
    info = create_session(model_path, provider="cpu", threads=1)
    assert info.providers == [CPU] and info.requested == [CPU]
    assert info.warnings == [] and info.main_provider == "cpu"


def test_session_from_bytes(model_path):
    info = create_session(model_path.read_bytes(), provider="cpu")
    x = _x(3)
    np.testing.assert_array_equal(info.session.run(None, {"input": x})[0], _bare(model_path, x))


@pytest.mark.parametrize(
    "content, match", [(b"", "empty"), (b"not an onnx file at all", "ONNX"), (None, "not found")]
)
def test_bad_model_files_are_one_line_input_errors(tmp_path, content, match):
    path = tmp_path / "bad.onnx"
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(InputFileError, match=match) as err:
        Predictor(path, provider="cpu")
    assert "\n" not in str(err.value)


# ---- Predictor -----------------------------------------------------------------------------


def test_predictor_reads_model_facts(predictor):
    assert predictor.n_features == 64
    assert predictor.task == "classification"
    assert predictor.class_names == [f"digit{i}" for i in range(10)]
    assert predictor.providers == [CPU]
    assert predictor.input_name == "input" and predictor.output_names == ["logits"]


@pytest.mark.parametrize("n", [1, 5, 300])
def test_predict_equals_a_bare_session(predictor, model_path, n):
    x = _x(n, seed=n)
    np.testing.assert_array_equal(predictor.predict(x), _bare(model_path, x))


@settings(max_examples=25, deadline=None)
@given(n=st.integers(0, 40), batch=st.integers(1, 16), seed=st.integers(0, 2**16))
def test_chunked_predict_matches_one_call(model_path, n, batch, seed):
    p = _chunky(model_path, batch)
    x = _x(n, seed)
    got = p.predict(x)
    assert got.shape == (n, 10)
    if n:
        np.testing.assert_allclose(got, _bare(model_path, x), rtol=1e-5, atol=1e-6)


_CHUNKY: dict[int, Predictor] = {}


def _chunky(path, batch):
    if batch not in _CHUNKY:
        _CHUNKY[batch] = Predictor(path, provider="cpu", threads=1, batch_size=batch)
    return _CHUNKY[batch]


def test_predict_into_streams_chunks_and_reports_progress(model_path):
    p = Predictor(model_path, provider="cpu", batch_size=7)
    x = _x(30)
    seen = []
    out = p.predict_into(x, progress=seen.append)
    assert seen == [7, 14, 21, 28, 30]
    np.testing.assert_allclose(out, _bare(model_path, x), rtol=1e-5, atol=1e-6)


def test_contiguous_float32_input_is_not_copied(predictor):
    x = _x(4)
    assert predictor.check(x) is x


@pytest.mark.parametrize(
    "make",
    [
        lambda x: x.astype(np.float64),
        lambda x: np.asfortranarray(x),
        lambda x: x.tolist(),
        lambda x: np.round(x * 10).astype(np.int32),
        lambda x: x.astype(str),
    ],
    ids=["float64", "fortran", "list", "int32", "numeric-strings"],
)
def test_convertible_inputs_give_the_float32_result(predictor, model_path, make):
    x = _x(6)
    converted = np.asarray(make(x)).astype(np.float32)
    np.testing.assert_array_equal(predictor.predict(make(x)), _bare(model_path, converted))


@pytest.mark.parametrize(
    "bad, match",
    [
        (np.zeros(64, np.float32), "2-D.*reshape"),
        (np.zeros((2, 3, 64), np.float32), "2-D"),
        (np.zeros((2, 63), np.float32), "63 features.*expects 64"),
        (np.array([["x"] * 64]), "cannot be converted"),
        (np.zeros((2, 64), np.complex64), "cannot be converted|float32"),
    ],
)
def test_bad_inputs_are_one_line_input_data_errors(predictor, bad, match):
    with pytest.raises(InputDataError, match=match) as err:
        predictor.predict(bad)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("value", [np.nan, np.inf, -np.inf])
def test_non_finite_input_names_its_first_position(predictor, value):
    x = _x(5)
    x[3, 17] = value
    x[4, 2] = value
    with pytest.raises(InputDataError, match="2 non-finite.*row 3, column 17"):
        predictor.predict(x)


def test_huge_finite_values_are_not_mistaken_for_non_finite(predictor, model_path):
    # their float32 sum overflows; the exact check must still let them through
    x = np.full((3, 64), 3e38, np.float32)
    np.testing.assert_array_equal(predictor.predict(x), _bare(model_path, x))


def test_allow_nonfinite_runs_anyway(model_path):
    p = Predictor(model_path, provider="cpu", allow_nonfinite=True)
    x = _x(2)
    x[0, 0] = np.nan
    assert np.isnan(p.predict(x)[0]).all()


def test_predict_proba_is_the_softmax_of_the_logits(predictor):
    x = _x(20)
    logits = predictor.predict(x).astype(np.float64)
    e = np.exp(logits - logits.max(1, keepdims=True))
    np.testing.assert_allclose(predictor.predict_proba(x), e / e.sum(1, keepdims=True), atol=1e-6)
    np.testing.assert_allclose(predictor.predict_proba(x).sum(1), 1.0, atol=1e-6)


def test_predict_labels_uses_the_class_names(predictor):
    x = _x(20)
    idx = predictor.predict(x).argmax(1)
    assert predictor.predict_labels(x) == [f"digit{i}" for i in idx]


def test_labels_without_names_are_indices(tmp_path):
    path = tmp_path / "plain.onnx"
    onnx.save(graphs.build_mlp([8, 6, 3], "folded"), path)
    p = Predictor(path, provider="cpu")
    x = _x(4, width=8)
    np.testing.assert_array_equal(p.predict_labels(x), p.predict(x).argmax(1))


def test_regression_model_refuses_probabilities(tmp_path):
    model = graphs.build_mlp([8, 6, 2], "folded")
    helper.set_model_props(model, {"bn_onnx.task": "regression"})
    path = tmp_path / "reg.onnx"
    onnx.save(model, path)
    p = Predictor(path, provider="cpu")
    assert p.task == "regression"
    with pytest.raises(UsageError, match="classifier"):
        p.predict_proba(_x(2, width=8))


def _two_input_model(tmp_path, fixed_batch=None):
    """y = a * 2 + b: a float32 [n, 3], b int64 [n, 3] (a model with two inputs, no schema)."""
    batch = fixed_batch or "n"
    graph = helper.make_graph(
        [
            helper.make_node("Cast", ["b"], ["bf"], to=TensorProto.FLOAT),
            helper.make_node("Mul", ["a", "two"], ["a2"]),
            helper.make_node("Add", ["a2", "bf"], ["y"]),
        ],
        "two",
        [
            helper.make_tensor_value_info("a", TensorProto.FLOAT, [batch, 3]),
            helper.make_tensor_value_info("b", TensorProto.INT64, [batch, 3]),
        ],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [batch, 3])],
        [helper.make_tensor("two", TensorProto.FLOAT, [], [2.0])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 10
    path = tmp_path / "two.onnx"
    onnx.save(model, path)
    return path


def test_multi_input_model_takes_a_dict_of_feeds(tmp_path):
    p = Predictor(_two_input_model(tmp_path), provider="cpu", batch_size=4)
    a = _x(10, width=3)
    b = np.arange(30).reshape(10, 3)
    assert p.input_names == ["a", "b"] and p.n_features is None and p.columns is None
    # 10 rows in chunks of 4; b as a list of lists of ints converts to int64
    np.testing.assert_allclose(p.predict({"a": a, "b": b.tolist()}), a * 2 + b, rtol=1e-6)
    feeds = p.feeds({"a": a.astype(np.float64), "b": b.astype(np.int32)})
    assert feeds["a"].dtype == np.float32 and feeds["b"].dtype == np.int64


def test_fixed_batch_multi_input_model_pads_every_input(tmp_path):
    p = Predictor(_two_input_model(tmp_path, fixed_batch=4), provider="cpu")
    a, b = _x(6, width=3), np.ones((6, 3), np.int64)
    np.testing.assert_allclose(p.predict({"a": a, "b": b}), a * 2 + 1, rtol=1e-6)


@pytest.mark.parametrize(
    "feeds, match",
    [
        ("array", r"dict input name -> array.*a \(float32 \[n, 3\]\), b \(int64 \[n, 3\]\)"),
        ({"a": np.zeros((2, 3))}, "missing input 'b'"),
        ({"a": np.zeros((2, 3)), "b": np.zeros((2, 3)), "c": 1}, "unknown input 'c'"),
        ({"a": np.zeros((2, 3)), "b": np.zeros((3, 3))}, "input 'b' has 3 rows, input 'a' has 2"),
        (
            {"a": np.zeros((2, 4)), "b": np.zeros((2, 3))},
            r"input 'a' has 4 features \(columns\), the model expects 3",
        ),
        ({"a": np.zeros((2, 3)), "b": np.zeros((2, 3, 1))}, "input 'b' must be 2-D"),
        ({"a": np.zeros((2, 3)), "b": np.full((2, 3), 0.5)}, "input 'b'.*0.5.*not an integer"),
        (
            {"a": np.full((2, 3), np.nan), "b": np.zeros((2, 3))},
            "input 'a' has 6 non-finite values",
        ),
        ({"a": np.zeros((2, 3)), "b": [["x", "y", "z"]] * 2}, "input 'b'.*cannot be converted"),
    ],
)
def test_bad_feeds_are_one_line_errors_naming_the_input(tmp_path, feeds, match):
    p = Predictor(_two_input_model(tmp_path), provider="cpu")
    with pytest.raises(InputDataError, match=match) as err:
        p.predict(np.zeros((2, 3)) if feeds == "array" else feeds)
    assert "\n" not in str(err.value)


def test_plain_model_also_takes_its_feeds_by_name(predictor, model_path):
    x = _x(3)
    np.testing.assert_array_equal(predictor.predict({"input": x}), _bare(model_path, x))


def test_batch_size_must_be_positive(model_path):
    with pytest.raises(UsageError):
        Predictor(model_path, batch_size=0)


def test_predictor_is_safe_to_share_between_threads(model_path):
    p = Predictor(model_path, provider="cpu", batch_size=16)
    inputs = [_x(37, seed=s) for s in range(8)]
    expected = [p.predict(x) for x in inputs]
    results: dict[int, list[np.ndarray]] = {}

    def work(t):
        results[t] = [p.predict(inputs[(t + i) % 8]) for i in range(8)]

    threads = [threading.Thread(target=work, args=(t,)) for t in range(4)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    for t, outs in results.items():
        for i, out in enumerate(outs):
            np.testing.assert_array_equal(out, expected[(t + i) % 8])


@pytest.mark.parametrize("n", [1, 16, 17, 200])  # both sides of the small-input fast path
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_finiteness_check_is_exact_for_every_size(n, dtype):
    rng = np.random.default_rng(n)
    x = rng.standard_normal((n, 64)).astype(dtype)
    assert runtime.check_input(x, 64, np.dtype(dtype)) is x
    big = np.full((n, 64), np.finfo(dtype).max / 2, dtype)  # sums overflow, values are finite
    assert runtime.check_input(big, 64, np.dtype(dtype)) is big
    for value in (np.nan, np.inf):
        bad = x.copy()
        bad[n - 1, 63] = value
        with pytest.raises(InputDataError, match=f"row {n - 1}, column 63"):
            runtime.check_input(bad, 64, np.dtype(dtype))
    mixed = x.copy()
    mixed[0, 0], mixed[0, 1] = np.inf, -np.inf  # inf - inf would hide in a sum as nan: caught
    with pytest.raises(InputDataError, match="2 non-finite"):
        runtime.check_input(mixed, 64, np.dtype(dtype))


def test_fast_path_failure_falls_back_to_the_public_run(model_path):
    p = Predictor(model_path, provider="cpu")
    x = _x(3)
    expected = p.predict(x)

    def broken(*args):
        raise RuntimeError("binding changed")

    p._fast = broken
    np.testing.assert_array_equal(p.predict(x), expected)
    p._fast = None
    np.testing.assert_array_equal(p.predict(x), expected)


def test_fixed_batch_model_runs_any_number_of_rows(tmp_path):
    model = graphs.build_mlp([8, 6, 3], "folded", seed=4)
    dim = model.graph.input[0].type.tensor_type.shape.dim[0]
    dim.Clear()
    dim.dim_value = 4
    dim = model.graph.output[0].type.tensor_type.shape.dim[0]
    dim.Clear()
    dim.dim_value = 4
    path = tmp_path / "fixed.onnx"
    onnx.save(model, path)
    p = Predictor(path, provider="cpu", batch_size=1000)
    assert p.fixed_batch == 4 and p.batch_size == 4
    free = tmp_path / "free.onnx"
    onnx.save(graphs.build_mlp([8, 6, 3], "folded", seed=4), free)
    for n in (0, 1, 4, 9):
        x = _x(n, seed=n, width=8)
        got = p.predict(x)
        assert got.shape == (n, 3)
        if n:
            np.testing.assert_allclose(got, _bare(free, x), rtol=1e-6, atol=1e-6)


class _CudaCrashSession:
    """InferenceSession whose CUDA provider fails to start (e.g. missing cuDNN)."""

    def __init__(self, model, sess_options=None, providers=None, provider_options=None):
        if CUDA in providers:
            raise RuntimeError("CUDA failure 100: no CUDA-capable device is detected")
        self.providers = providers

    def get_providers(self):
        return self.providers


def test_cuda_start_failure_is_an_error_when_strict_and_a_cpu_fallback_under_auto(
    monkeypatch, model_path
):
    monkeypatch.setattr(ort, "get_available_providers", lambda: [CUDA, CPU])
    monkeypatch.setattr(ort, "InferenceSession", _CudaCrashSession)
    with pytest.raises(ProviderError, match="failed to start.*no CUDA-capable device"):
        create_session(model_path, provider="cuda")
    with pytest.warns(runtime.ProviderWarning, match="using the CPU"):
        info = create_session(model_path, provider="auto")
    assert info.providers == [CPU] and info.requested == [CPU]


_SPECIAL = st.sampled_from([np.nan, np.inf, -np.inf, 3e38, -3e38, 0.0])


@settings(max_examples=60, deadline=None)
@given(
    rows=st.integers(17, 300),
    dtype=st.sampled_from([np.float32, np.float64, np.float16]),
    cells=st.lists(st.tuples(st.integers(0, 10**6), _SPECIAL), max_size=4),
    seed=st.integers(0, 2**16),
)
def test_large_input_finiteness_check_agrees_with_isfinite(rows, dtype, cells, seed):
    # Above the small-input path: the sum-of-squares test (float32/64) and the plain one (float16)
    # must refuse exactly the arrays np.isfinite refuses, and name the same first position.
    x = np.random.default_rng(seed).standard_normal((rows, 64)).astype(dtype)
    for pos, value in cells:
        with np.errstate(over="ignore"):
            x.flat[pos % x.size] = value  # 3e38 becomes inf in float16: still a real case
    bad = ~np.isfinite(x)
    if not bad.any():
        assert runtime.check_input(x, 64, np.dtype(dtype)) is x
        return
    row, col = np.argwhere(bad)[0]
    with pytest.raises(InputDataError) as err:
        runtime.check_input(x, 64, np.dtype(dtype))
    count = int(bad.sum())
    assert f"{count} non-finite value{'s' if count != 1 else ''}" in str(err.value)
    assert f"row {row}, column {col};" in str(err.value)


def test_finiteness_check_of_huge_values_warns_nothing(predictor):
    x = np.full((100, 64), 3e38, np.float32)  # the sum of squares overflows
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert runtime.check_input(x, 64) is x
        predictor.predict(x)


def test_predict_row_offset_numbers_rows_of_the_whole_input(predictor, model_path):
    x = _x(3000)
    np.testing.assert_array_equal(predictor.predict(x, row_offset=500), _bare(model_path, x))
    x[2100, 5] = np.inf
    with pytest.raises(InputDataError, match="row 2600, column 5"):
        predictor.predict(x, row_offset=500)
    with pytest.raises(InputDataError, match="row 2100, column 5"):
        predictor.predict(x)


# ---- tabular models: rows by column name (metadata bn_onnx.columns) -------------------------


@pytest.fixture(scope="module")
def tabular(tmp_path_factory):
    from serve_testing import make_tabular

    path = tmp_path_factory.mktemp("tab") / "tab.onnx"
    return path, make_tabular(path)


def _records(n, seed=0):
    from serve_testing import tabular_records

    return tabular_records(n, seed)


def _by_column(records):
    return {k: [r.get(k) for r in records] for k in ("age", "city", "income", "grade")}


def test_tabular_predictor_reads_its_columns(tabular):
    p = Predictor(tabular[0], provider="cpu", threads=1)
    assert [c.name for c in p.columns] == ["age", "city", "income", "grade"]
    assert p.input_names == ["continuous", "categorical"]
    assert p.n_features is None and not p.array_input
    assert p.class_names == tabular[1]["names"]


def test_named_columns_in_every_form_equal_a_bare_session_and_the_float64_oracle(tabular):
    import pyarrow as pa
    from serve_testing import tabular_forward

    path, w = tabular
    p = Predictor(path, provider="cpu", threads=1)
    records = _records(60)
    want = bare_tabular(path, records)
    table = pa.Table.from_pylist(records)
    for form in (records, _by_column(records), table, table.to_batches()[0]):
        np.testing.assert_array_equal(p.predict(form), want)
    np.testing.assert_allclose(want, tabular_forward(w, records), rtol=1e-4, atol=1e-5)
    np.testing.assert_array_equal(p.predict(p.feeds(records)), want)  # feeds by input name
    assert p.predict_labels(records) == [w["names"][i] for i in want.argmax(1)]


def test_named_columns_run_in_chunks(tabular):
    records = _records(50, seed=3)
    whole = Predictor(tabular[0], provider="cpu", threads=1).predict(records)
    chunked = Predictor(tabular[0], provider="cpu", threads=1, batch_size=7).predict(records)
    np.testing.assert_allclose(chunked, whole, rtol=1e-6, atol=1e-6)


def test_unseen_missing_and_all_missing_columns_follow_the_python_preprocessing(tabular):
    from serve_testing import tabular_forward

    path, w = tabular
    p = Predictor(path, provider="cpu", threads=1)
    records = [
        {"age": 30, "city": "Atlantis", "income": 2.0, "grade": 9},  # unseen categories
        {"age": None, "city": None, "income": "", "grade": ""},  # every cell missing
        {"age": "41.5", "city": " Seoul ", "income": "nan", "grade": 2.0},  # text, spaces
    ]
    np.testing.assert_allclose(p.predict(records), tabular_forward(w, records), atol=1e-5)
    all_missing = {
        "age": [None] * 3,
        "city": ["a", "b", "c"],
        "income": [1, 2, 3],
        "grade": [1] * 3,
    }
    got = p.predict(all_missing)
    rows = [dict(zip(all_missing, v, strict=True)) for v in zip(*all_missing.values(), strict=True)]
    want = tabular_forward(w, rows)
    np.testing.assert_allclose(got, want, atol=1e-5)


@pytest.mark.parametrize(
    "change, match",
    [
        ({"age": "abc"}, "column 'age' row 1: not a number: 'abc'"),
        ({"income": True}, "column 'income' row 1: not a number: True"),
        ({"age": 1e39}, "column 'age' row 1: not a finite number: inf"),
        ({"age": float("-inf")}, "column 'age' row 1: not a finite number: -inf"),
        ({"income": 10**400}, "column 'income' row 1: number too large"),
        ({"city": None, "drop": "city"}, "missing column 'city' \\(the model reads: age, city"),
    ],
)
def test_wrong_or_missing_columns_are_one_line_errors_naming_them(tabular, change, match):
    p = Predictor(tabular[0], provider="cpu", threads=1)
    records = _records(3)
    change = dict(change)
    drop = change.pop("drop", None)
    records[1].update(change)
    if drop:
        records = [{k: v for k, v in r.items() if k != drop} for r in records]
    for form in (records, _by_column(records) if not drop else {"age": [1, 2, 3]}):
        if drop and not isinstance(form, list):
            continue
        with pytest.raises(InputDataError, match=match) as err:
            p.predict(form)
        assert "\n" not in str(err.value)


def test_error_rows_count_from_row_offset(tabular):
    p = Predictor(tabular[0], provider="cpu", threads=1)
    records = _records(4)
    records[2]["age"] = "x"
    with pytest.raises(InputDataError, match="column 'age' row 102:"):
        p.predict(records, row_offset=100)
    with pytest.raises(InputDataError, match="column 'age' row 102:"):
        p.predict(_by_column(records), row_offset=100)


def test_a_tabular_model_refuses_a_plain_array(tabular):
    p = Predictor(tabular[0], provider="cpu", threads=1)
    with pytest.raises(InputDataError, match="named columns \\(age, city, income, grade\\)"):
        p.predict(np.zeros((2, 4), np.float32))


def test_arrow_dictionary_decimal_and_nested_columns(tabular):
    import decimal

    import pyarrow as pa

    p = Predictor(tabular[0], provider="cpu", threads=1)
    records = _records(8, seed=5)
    table = pa.Table.from_pylist(records)
    want = p.predict(records)
    encoded = table.set_column(1, "city", table.column("city").dictionary_encode())
    np.testing.assert_array_equal(p.predict(encoded), want)
    income = [None if r["income"] is None else decimal.Decimal(str(r["income"])) for r in records]
    dec = table.set_column(2, "income", pa.array(income, pa.decimal128(12, 3)))
    np.testing.assert_allclose(p.predict(dec), want, rtol=1e-6, atol=1e-6)
    nested = table.set_column(0, "age", pa.array([[1.0]] * 8))
    with pytest.raises(InputDataError, match="column 'age' has type list<item: double>"):
        p.predict(nested)


def test_schema_that_does_not_fit_the_graph_is_refused(tmp_path, tabular):
    from bn_onnx.columns import COLUMNS_KEY

    model = onnx.load(tabular[0])
    for prop in model.metadata_props:
        if prop.key == COLUMNS_KEY:
            cols = json.loads(prop.value)
            cols[0]["input"] = "numbers"
            prop.value = json.dumps(cols)
    onnx.save(model, tmp_path / "bad.onnx")
    with pytest.raises(UnsupportedModelError, match="column 'age' is in input 'numbers'"):
        Predictor(tmp_path / "bad.onnx", provider="cpu")
