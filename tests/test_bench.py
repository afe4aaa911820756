"""The timing harness: order of runs, statistics against an independent oracle, ratios, JSON.

No timed assertions: durations come from a fake clock, or only their presence is checked.
"""

from __future__ import annotations

import json
import statistics

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from bn_onnx import bench, graphs, onnx_io
from bn_onnx.errors import UsageError


class FakeClock:
    """A clock that only moves when a fake call says how long it took."""

    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


def _fake_subject(name, clock, durations, log=None, n_features=3):
    """A subject whose k-th call takes durations[k % len] seconds on `clock`."""
    state = {"k": 0}

    def bind(x):
        assert x.shape[1] == n_features and x.dtype == np.float32

        def call():
            clock.t += durations[state["k"] % len(durations)]
            state["k"] += 1
            if log is not None:
                log.append((name, x.shape[0]))

        return call

    return bench.Subject(name=name, bind=bind, n_features=n_features)


def test_time_interleaved_runs_round_robin():
    log = []
    calls = [lambda i=i: log.append(i) for i in range(3)]
    bench.time_interleaved(calls, 4)
    assert log == [0, 1, 2] * 4


def test_time_interleaved_alternate_reverses_every_other_round():
    log = []
    calls = [lambda i=i: log.append(i) for i in range(3)]
    bench.time_interleaved(calls, 3, order="alternate")
    assert log == [0, 1, 2, 2, 1, 0, 0, 1, 2]


@settings(max_examples=40, deadline=None)
@given(n=st.integers(2, 6), repeats=st.integers(1, 12), seed=st.integers(0, 1000))
def test_shuffle_runs_each_subject_once_per_round_never_twice_in_a_row(n, repeats, seed):
    log = []
    calls = [lambda i=i: log.append(i) for i in range(n)]
    bench.time_interleaved(calls, repeats, order="shuffle", seed=seed)
    rounds = [log[k : k + n] for k in range(0, len(log), n)]
    assert len(rounds) == repeats and all(sorted(r) == list(range(n)) for r in rounds)
    assert all(a != b for a, b in zip(log, log[1:], strict=False))
    again = []
    calls = [lambda i=i: again.append(i) for i in range(n)]
    bench.time_interleaved(calls, repeats, order="shuffle", seed=seed)
    assert again == log


def test_alternate_order_repeats_the_end_subjects_back_to_back():
    # Why the suite shuffles: with "alternate" the last subject runs twice in a row.
    log = []
    calls = [lambda i=i: log.append(i) for i in range(3)]
    bench.time_interleaved(calls, 2, order="alternate")
    assert log[2] == log[3] == 2


def test_time_interleaved_times_each_call_and_brackets_it_with_sync():
    clock = FakeClock()
    events = []

    def call_a():
        events.append("a")
        clock.t += 0.5

    def sync():
        events.append("sync")
        clock.t += 100.0

    times = bench.time_interleaved([call_a, lambda: None], 2, syncs=[sync, None], clock=clock)
    # The sync before the clock starts (earlier work) is excluded; the one after the call waits
    # for the call's own asynchronous work, so it counts.
    np.testing.assert_array_equal(times, [[100.5, 100.5], [0.0, 0.0]])
    assert events == ["sync", "a", "sync"] * 2


@settings(max_examples=60, deadline=None)
@given(st.lists(st.floats(1e-6, 10.0), min_size=2, max_size=40))
def test_stats_match_the_statistics_module(values):
    s = bench.Stats.of(values)
    q = statistics.quantiles(values, n=20, method="inclusive")  # 5%, 10%, ..., 95%
    assert s.n == len(values)
    assert s.median_s == pytest.approx(statistics.median(values), rel=1e-12)
    assert s.q1_s == pytest.approx(q[4], rel=1e-12)
    assert s.q3_s == pytest.approx(q[14], rel=1e-12)
    assert s.p90_s == pytest.approx(q[17], rel=1e-12)
    assert s.min_s == min(values) and s.max_s == max(values)
    assert s.min_s <= s.q1_s <= s.median_s <= s.q3_s <= s.p90_s <= s.max_s


def test_stats_of_nothing_is_an_error():
    with pytest.raises(ValueError):
        bench.Stats.of([])


def test_run_benchmark_ratios_throughput_and_order():
    clock = FakeClock()
    log = []
    a = _fake_subject("a", clock, [0.010, 0.030], log)
    b = _fake_subject("b", clock, [0.020, 0.090], log)
    result = bench.run_benchmark([a, b], [1, 4], repeats=4, warmup=2, clock=clock, progress=None)
    # first run + warm-up + timed rounds, A B A B at each batch size
    per_batch = 1 + 2 + 4
    assert log[: 2 * per_batch] == [("a", 1), ("b", 1)] * per_batch
    assert log[2 * per_batch :] == [("a", 4), ("b", 4)] * (2 + 4)
    row_a, row_b = result.row("a", 4), result.row("b", 4)
    # batch 4 rounds: calls 7.. of each subject alternate between the two durations
    ta = np.array([0.030, 0.010, 0.030, 0.010])
    tb = np.array([0.090, 0.020, 0.090, 0.020])
    np.testing.assert_allclose(row_a.times_s, ta)
    np.testing.assert_allclose(row_b.times_s, tb)
    assert row_b.ratio == pytest.approx(np.median(tb) / np.median(ta))
    assert row_a.ratio == 1.0 and row_a.ratio_q1 == row_a.ratio_q3 == 1.0
    paired = tb / ta
    assert row_b.ratio_q1 == pytest.approx(np.percentile(paired, 25))
    assert row_b.ratio_q3 == pytest.approx(np.percentile(paired, 75))
    assert row_b.throughput == pytest.approx(4 / np.median(tb))
    subjects = {s["name"]: s for s in result.subjects}
    assert subjects["a"]["first_run_s"] == pytest.approx(0.010)
    assert subjects["b"]["first_run_s"] == pytest.approx(0.020)


def test_cpu_clock_is_recorded_per_call_with_its_own_ratio():
    clock = FakeClock()
    cpu = FakeClock()

    def subject(name, wall, busy):
        def bind(x):
            def call():
                clock.t += wall
                cpu.t += busy

            return call

        return bench.Subject(name=name, bind=bind, n_features=2)

    result = bench.run_benchmark(
        [subject("a", 1.0, 0.5), subject("b", 3.0, 2.0)],
        [1],
        repeats=3,
        warmup=1,
        clock=clock,
        cpu_clock=cpu,
    )
    b = result.row("b", 1)
    assert b.cpu_times_s == [2.0, 2.0, 2.0] and b.times_s == [3.0, 3.0, 3.0]
    assert b.cpu_ratio == pytest.approx(4.0) and b.ratio == pytest.approx(3.0)
    d = b.to_dict()
    assert d["cpu_median_ms"] == pytest.approx(2000.0) and d["cpu_ratio"] == pytest.approx(4.0)


def test_budget_cuts_repeats_but_not_below_minimum():
    clock = FakeClock()
    a = _fake_subject("a", clock, [1.0])
    result = bench.run_benchmark(
        [a], [1, 2], repeats=50, warmup=1, budget_s=10.0, min_repeats=3, clock=clock
    )
    assert result.settings["repeats_used"] == {"1": 10, "2": 10}
    assert result.row("a", 1).stats.n == 10
    result = bench.run_benchmark(
        [a], [1], repeats=50, warmup=1, budget_s=0.5, min_repeats=3, clock=clock
    )
    assert result.row("a", 1).stats.n == 3


def test_result_json_schema(tmp_path):
    clock = FakeClock()
    subjects = [_fake_subject(n, clock, [0.001 * (i + 1)]) for i, n in enumerate("xyz")]
    result = bench.run_benchmark(subjects, [1, 8], repeats=3, warmup=1, clock=clock)
    path = bench.save_json(result, tmp_path / "r.json")
    data = json.loads(path.read_text())
    assert data["schema"] == "bn-onnx-bench" and data["schema_version"] == 1
    assert {"cpu_count", "onnxruntime", "processor", "time_utc"} <= set(data["machine"])
    assert [s["name"] for s in data["subjects"]] == ["x", "y", "z"]
    assert len(data["rows"]) == 6
    for row in data["rows"]:
        assert {
            "subject",
            "batch",
            "n",
            "median_ms",
            "p90_ms",
            "q1_ms",
            "q3_ms",
            "min_ms",
            "max_ms",
            "throughput_rows_s",
            "ratio",
            "ratio_q1",
            "ratio_q3",
            "times_ms",
        } <= set(row)
        k = "xyz".index(row["subject"])
        assert row["median_ms"] == pytest.approx(1.0 * (k + 1))
        assert row["ratio"] == pytest.approx(k + 1)
        assert len(row["times_ms"]) == row["n"] == 3


@pytest.mark.parametrize(
    ("subjects", "sizes", "word"),
    [
        ([], [1], "nothing"),
        (["a", "a"], [1], "unique"),
        (["a"], [0], "batch"),
        (["a"], [], "batch"),
    ],
)
def test_run_benchmark_rejects_bad_arguments(subjects, sizes, word):
    clock = FakeClock()
    objs = [_fake_subject(n, clock, [0.1]) for n in subjects]
    with pytest.raises(UsageError, match=word):
        bench.run_benchmark(objs, sizes, repeats=1, clock=clock)


def test_models_of_different_widths_are_refused():
    clock = FakeClock()
    with pytest.raises(UsageError, match="widths"):
        bench.run_benchmark(
            [_fake_subject("a", clock, [0.1]), _fake_subject("b", clock, [0.1], n_features=4)],
            [1],
            clock=clock,
        )


@pytest.fixture
def tiny_models(tmp_path):
    widths = [6, 8, 3]
    paths = {}
    for v in graphs.VARIANTS:
        paths[v] = tmp_path / f"{v}.onnx"
        onnx_io.save_model(graphs.build_mlp(widths, v, seed=1), paths[v])
    return widths, paths


def test_ort_and_predictor_subjects_run_the_model_on_the_bound_input(tiny_models):
    widths, paths = tiny_models
    x = np.random.default_rng(0).standard_normal((5, widths[0])).astype(np.float32)
    expected = graphs.mlp_reference(widths, x, "folded", seed=1)
    ort_s = bench.ort_subject(paths["folded"], "ort", provider="cpu", threads=1)
    pred_s = bench.predictor_subject(paths["folded"], "pred", provider="cpu", threads=1)
    assert ort_s.n_features == pred_s.n_features == widths[0]
    assert ort_s.create_s is not None and ort_s.create_s >= 0
    np.testing.assert_allclose(ort_s.bind(x)()[0], expected, atol=1e-5, rtol=1e-4)
    np.testing.assert_allclose(pred_s.bind(x)(), expected, atol=1e-5, rtol=1e-4)
    model_bytes = graphs.build_mlp(widths, "folded", seed=1).SerializeToString()
    from_bytes = bench.ort_subject(model_bytes, "bytes", graph_optimization_level="disable")
    np.testing.assert_allclose(from_bytes.bind(x)()[0], expected, atol=1e-5, rtol=1e-4)
    assert from_bytes.info["path"] is None and not from_bytes.info["iobinding"]


def test_iobinding_subject_binds_input_and_output(tiny_models):
    widths, paths = tiny_models
    x = np.random.default_rng(2).standard_normal((7, widths[0])).astype(np.float32)
    s = bench.ort_subject(paths["folded"], "bound", provider="cpu", threads=1, iobinding=True)
    assert s.info["iobinding"]
    binding = s.bind(x)()
    np.testing.assert_allclose(
        binding.copy_outputs_to_cpu()[0],
        graphs.mlp_reference(widths, x, "folded", seed=1),
        atol=1e-5,
        rtol=1e-4,
    )


def test_torch_subject_matches_numpy():
    torch = pytest.importorskip("torch")
    lin = torch.nn.Linear(4, 2)
    s = bench.torch_subject(lin, "torch", 4, threads=1)
    x = np.random.default_rng(1).standard_normal((3, 4)).astype(np.float32)
    want = x @ lin.weight.detach().numpy().T + lin.bias.detach().numpy()
    np.testing.assert_allclose(s.bind(x)().numpy(), want, rtol=1e-5, atol=1e-6)


def test_real_models_interleaved_and_plotted(tiny_models, tmp_path):
    _, paths = tiny_models
    subjects = [bench.ort_subject(paths[v], v, threads=1) for v in graphs.VARIANTS]
    result = bench.run_benchmark(subjects, [1, 16], repeats=2, warmup=1)
    assert [(r.subject, r.batch) for r in result.rows] == [
        (v, b) for b in (1, 16) for v in graphs.VARIANTS
    ]
    assert all(r.stats.median_s > 0 and r.stats.n == 2 for r in result.rows)
    assert result.row("unfolded", 16).ratio == 1.0
    png = bench.plot_result(result, tmp_path / "p.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    lines = bench.format_table(result)
    assert len(lines) == 2 + len(result.rows) and "median ms" in lines[0]
    assert len(bench.format_subjects(result)) == 3


def test_measure_process_reports_exit_code_output_and_peak_memory():
    import sys

    code = "import sys; b = bytearray(96 * 2**20); b[::4096] = b'x' * len(b[::4096]); print('ok');"
    run = bench.measure_process([sys.executable, "-c", code + " sys.exit(3)"])
    assert run.returncode == 3
    assert run.stdout.strip() == "ok"
    assert run.maxrss_bytes >= 96 * 2**20
    # A child forked from a big process would inherit its peak RSS; the launcher prevents it.
    ballast = bytearray(128 * 2**20)
    ballast[::4096] = b"y" * len(ballast[::4096])
    small = bench.measure_process([sys.executable, "-c", "pass"], sample_rss=True)
    assert small.returncode == 0 and small.maxrss_bytes < 64 * 2**20
    assert small.to_dict()["peak_rss_anon_mb"] < 64
    del ballast
    assert set(run.to_dict()) == {"returncode", "wall_s", "maxrss_mb", "cpu_s"}
    assert run.cpu_s is not None and run.cpu_s > 0


def test_a_tabular_model_is_timed_on_random_batches_of_its_own_inputs(tmp_path):
    """Issue 20: bench refused a model with two inputs (raw continuous and categorical)."""
    from serve_testing import TABULAR_COLUMNS, make_tabular

    path = tmp_path / "tab.onnx"
    make_tabular(path)
    subjects = [
        bench.ort_subject(path, "ort", provider="cpu", threads=1),
        bench.predictor_subject(path, "predictor", provider="cpu", threads=1),
    ]
    assert subjects[0].inputs == subjects[1].inputs
    assert "continuous" in subjects[0].inputs and "categorical" in subjects[0].inputs
    feeds = subjects[0].make_feeds(64, np.random.default_rng(0))
    assert feeds["continuous"].shape == (64, 2) and np.isnan(feeds["continuous"]).any()
    vocab = {v for c in TABULAR_COLUMNS for v in c.get("vocabulary", ())}
    assert vocab & set(feeds["categorical"].ravel())
    result = bench.run_benchmark(subjects, [1, 16], repeats=3, warmup=1)
    assert {(r.subject, r.batch) for r in result.rows} == {
        (s, b) for s in ("ort", "predictor") for b in (1, 16)
    }
    from serve_testing import make_mlp

    plain = tmp_path / "plain.onnx"
    make_mlp(plain, 2, 4, 3, task="classification")
    mixed = [subjects[0], bench.ort_subject(plain, "plain", provider="cpu", threads=1)]
    with pytest.raises(UsageError, match="different inputs"):
        bench.run_benchmark(mixed, [1], repeats=1, warmup=0)
