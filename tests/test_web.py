"""The browser page in headless Chromium: the folded digits model in onnxruntime-web (WASM)
must give the same logits as onnxruntime in Python for the shipped sample inputs, and so must
the INT8 (QDQ) one, within one step of its output's quantization grid.

Needs Node.js with npm and Debian's chromium (tools/install_web_deps.sh installs chromium and
runs `npm ci`); skips with the reason where Node or Chromium is missing, and runs `npm ci` in
web/ itself when web/node_modules lacks the packages. The page is built into a temporary
folder, served on 127.0.0.1 and driven by web/scripts/check_page.mjs (playwright-core), which
also refuses and records any request that leaves the page's own origin.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest

from bn_onnx.cli.serve_web import static_server

ROOT = Path(__file__).resolve().parents[1]
WEB = ROOT / "web"
MODEL_DIR = Path(os.environ.get("BN_ONNX_MODEL_DIR", ROOT / "models" / "digits"))
CHROMIUM = os.environ.get("CHROMIUM", "/usr/bin/chromium")
# float32 logits from two builds of onnxruntime (MLAS vs. WASM SIMD kernels).
ATOL, RTOL = 1e-5, 1e-4


NODE_PACKAGES = ("vite", "playwright-core", "onnxruntime-web")


def _missing() -> str | None:
    if shutil.which("node") is None or shutil.which("npm") is None:
        return "node/npm not found (install Node.js 20+; CI runs tools/install_web_deps.sh)"
    if not Path(CHROMIUM).exists():
        return f"chromium not found at {CHROMIUM} (apt-get install chromium)"
    for name in ("model.folded.onnx", "sample_input.npy"):
        if not (MODEL_DIR / name).is_file():
            return f"shipped model file missing: {MODEL_DIR / name}"
    return None


pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(_missing() is not None, reason=str(_missing())),
]


def _npm_ci() -> None:
    """Install the page's npm packages from web/package-lock.json when they are not there."""
    if all((WEB / "node_modules" / p / "package.json").is_file() for p in NODE_PACKAGES):
        return
    run = subprocess.run(
        ["npm", "ci", "--no-audit", "--no-fund", "--loglevel=error"],
        cwd=WEB,
        capture_output=True,
        text=True,
        timeout=600,
    )
    if run.returncode != 0:
        pytest.fail(f"`npm ci` in web/ failed: {(run.stdout + run.stderr)[-2000:]}")


@pytest.fixture(scope="module")
def page_dist(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    _npm_ci()
    out = tmp_path_factory.mktemp("web") / "dist"
    env = dict(os.environ, BN_ONNX_MODEL_DIR=str(MODEL_DIR))
    vite = WEB / "node_modules" / "vite" / "bin" / "vite.js"
    build = subprocess.run(
        ["node", str(vite), "build", "--outDir", str(out), "--emptyOutDir", "--logLevel", "warn"],
        cwd=WEB,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert build.returncode == 0, build.stdout + build.stderr
    assert (out / "index.html").is_file()
    yield out


@contextmanager
def _serving(dist: Path, model: Path | None = None) -> Iterator[str]:
    server = static_server(dist, 0, model=model)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)


@pytest.fixture(scope="module")
def page_url(page_dist: Path) -> Iterator[str]:
    with _serving(page_dist) as url:
        yield url


def _drive(url: str, *extra: str) -> dict:
    run = subprocess.run(
        ["node", "scripts/check_page.mjs", url, "--chromium", CHROMIUM, *extra],
        cwd=WEB,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    return json.loads(run.stdout)


@pytest.mark.cpu_sensitive
def test_page_predictions_match_onnxruntime_in_python(page_url: str, tmp_path: Path) -> None:
    import onnxruntime as ort

    X = np.load(MODEL_DIR / "sample_input.npy", allow_pickle=False)
    assert X.dtype == np.float32 and X.ndim == 2
    rows = np.random.default_rng(0).integers(0, 17, (5, X.shape[1])).astype(np.float32)
    rows_file = tmp_path / "rows.json"
    rows_file.write_text(json.dumps(rows.tolist()))
    shot = tmp_path / "page.png"
    result = _drive(page_url, "--rows", str(rows_file), "--screenshot", str(shot), "--draw")

    session = ort.InferenceSession(
        str(MODEL_DIR / "model.folded.onnx"), providers=["CPUExecutionProvider"]
    )
    name = session.get_inputs()[0].name
    # The page offers exactly the shipped samples and ran them through onnxruntime-web.
    np.testing.assert_array_equal(np.asarray(result["samples"], np.float32), X)
    got = np.asarray(result["logits"], dtype=np.float32)
    want = session.run(None, {name: X})[0]
    assert got.shape == want.shape
    np.testing.assert_allclose(got, want, atol=ATOL, rtol=RTOL)
    assert (got.argmax(axis=1) == want.argmax(axis=1)).all()
    expected_file = MODEL_DIR / "sample_output.npy"
    if expected_file.is_file():
        expected = np.load(expected_file, allow_pickle=False)
        np.testing.assert_allclose(got, expected, atol=ATOL, rtol=RTOL)
    # window.predict takes any rows, not only the samples.
    got_rows = np.asarray(result["rows_logits"], dtype=np.float32)
    np.testing.assert_allclose(got_rows, session.run(None, {name: rows})[0], atol=ATOL, rtol=RTOL)

    # What a person sees: sample 0 is shown with its predicted class on top; drawing a digit
    # with the mouse gives a prediction too. Nothing was fetched from outside the page.
    assert result["shown_class"] == str(int(want[0].argmax()))
    assert result["drawn_class"] in [str(k) for k in range(want.shape[1])]
    assert result["foreign_requests"] == []
    assert result["console_errors"] == []
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def _logits_step(path: Path) -> float:
    """The step of the INT8 model's output grid: the scale of the QuantizeLinear on logits."""
    import onnx
    import onnx.numpy_helper

    inits = {i.name: i for i in onnx.load(path).graph.initializer}
    return float(onnx.numpy_helper.to_array(inits["logits_scale"]))


def _softmax(z: np.ndarray) -> np.ndarray:
    e = np.exp(z - z.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


@pytest.mark.cpu_sensitive
def test_page_runs_the_int8_model_like_onnxruntime_in_python(page_url: str, tmp_path: Path) -> None:
    """onnxruntime-web's WASM backend runs the QDQ model (QuantizeLinear/DequantizeLinear with
    per-channel weight scales); the page says it runs INT8, and the picker switches to float.

    Measured (AMD EPYC, onnxruntime 1.32 CPU against onnxruntime-web 1.30 WASM): all 3,700
    logits of the test split and 100 random rows identical. The logits come out of a
    QuantizeLinear/DequantizeLinear pair, so they lie on a grid of step `logits_scale`; a
    rounding difference in another CPU's int8 kernels moves a logit by one step, which is the
    tolerance. A logit moved by at most d moves each probability p by at most p * (e^2d - 1).
    """
    import onnxruntime as ort

    int8 = MODEL_DIR / "model.int8.onnx"
    if not int8.is_file():
        pytest.skip(f"no INT8 model in {MODEL_DIR} (tools/make_models.py writes it)")
    step = _logits_step(int8)
    X = np.load(MODEL_DIR / "sample_input.npy", allow_pickle=False)
    rows = np.random.default_rng(1).integers(0, 17, (20, X.shape[1])).astype(np.float32)
    rows_file = tmp_path / "rows.json"
    rows_file.write_text(json.dumps(rows.tolist()))
    result = _drive(page_url + "?model=int8", "--rows", str(rows_file), "--pick", "float")

    assert result["models"] == ["float", "int8"]
    assert result["model"] == {"key": "int8", "file": "model.int8.onnx", "kind": "INT8 (QDQ)"}
    assert "model.int8.onnx, INT8 (QDQ)" in result["status"]
    session = ort.InferenceSession(str(int8), providers=["CPUExecutionProvider"])
    for x, got in ((X, result["logits"]), (rows, result["rows_logits"])):
        got = np.asarray(got, dtype=np.float32)
        want = session.run(None, {"input": x})[0]
        assert got.shape == want.shape
        np.testing.assert_allclose(got, want, atol=1.01 * step, rtol=0)
        np.testing.assert_array_equal(got.argmax(axis=1), want.argmax(axis=1))
        p, q = _softmax(got.astype(np.float64)), _softmax(want.astype(np.float64))
        assert np.all(np.abs(p - q) <= q * np.expm1(2.02 * step) + 1e-7)
    want = session.run(None, {"input": X})[0]
    assert result["shown_class"] == str(int(want[0].argmax()))
    # and it still predicts the float model's classes for the samples
    expected = np.load(MODEL_DIR / "sample_output.npy", allow_pickle=False)
    np.testing.assert_array_equal(want.argmax(axis=1), expected.argmax(axis=1))

    # The picker switches to the float model, which gives the float logits.
    picked = result["picked"]
    assert picked["model"]["file"] == "model.folded.onnx" and picked["kind_shown"] == "float32"
    assert "model.folded.onnx, float32" in picked["status"]
    np.testing.assert_allclose(
        np.asarray(picked["logits"], np.float32), expected, atol=ATOL, rtol=RTOL
    )
    assert result["foreign_requests"] == []
    assert result["console_errors"] == []


@pytest.mark.cpu_sensitive
def test_page_runs_the_model_serve_web_serves(page_dist: Path) -> None:
    """`serve-web --model PATH`: the page lists the served model first, runs it and says it is
    INT8; its logits are onnxruntime CPU's for the same file (tolerance as above)."""
    import onnxruntime as ort

    int8 = MODEL_DIR / "model.int8.onnx"
    if not int8.is_file():
        pytest.skip(f"no INT8 model in {MODEL_DIR} (tools/make_models.py writes it)")
    with _serving(page_dist, int8) as url:
        result = _drive(url)
    assert result["models"] == ["served", "float", "int8"]
    assert result["model"] == {"key": "served", "file": "model.int8.onnx", "kind": "INT8 (QDQ)"}
    X = np.asarray(result["samples"], np.float32)
    session = ort.InferenceSession(str(int8), providers=["CPUExecutionProvider"])
    want = session.run(None, {"input": X})[0]
    got = np.asarray(result["logits"], np.float32)
    np.testing.assert_allclose(got, want, atol=1.01 * _logits_step(int8), rtol=0)
    np.testing.assert_array_equal(got.argmax(axis=1), want.argmax(axis=1))
    assert result["console_errors"] == [] and result["foreign_requests"] == []
