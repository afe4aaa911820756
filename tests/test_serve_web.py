"""`bn-onnx serve-web`: the static server for the browser page (no Node or browser needed)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from bn_onnx.cli import main
from bn_onnx.cli.serve_web import static_server


@pytest.fixture
def dist(tmp_path: Path) -> Path:
    d = tmp_path / "dist"
    (d / "assets").mkdir(parents=True)
    (d / "index.html").write_text("<!doctype html><title>t</title>")
    (d / "assets" / "ort.wasm").write_bytes(b"\0asm\1\0\0\0")
    (d / "assets" / "model.onnx").write_bytes(bytes(range(256)))
    return d


def _get(url: str) -> tuple[int, str, bytes]:
    with urllib.request.urlopen(url, timeout=10) as r:
        return r.status, r.headers.get("content-type", ""), r.read()


def test_static_server_serves_files_with_the_types_the_page_needs(dist: Path) -> None:
    server = static_server(dist, 0)
    host, port = server.server_address[:2]
    assert host == "127.0.0.1"
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        base = f"http://127.0.0.1:{port}"
        status, ctype, body = _get(base + "/")
        assert status == 200 and ctype.startswith("text/html") and b"<title>t" in body
        status, ctype, body = _get(base + "/assets/ort.wasm")
        assert ctype == "application/wasm" and body == b"\0asm\1\0\0\0"
        assert _get(base + "/assets/model.onnx")[2] == bytes(range(256))
        with pytest.raises(urllib.error.HTTPError) as exc:
            _get(base + "/missing.js")
        assert exc.value.code == 404
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)


def test_cli_serve_web_subprocess_serves_then_stops_on_sigterm(dist: Path) -> None:
    cmd = [sys.executable, "-m", "bn_onnx", "serve-web", "--port", "0", "--dist", str(dist)]
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        assert "http://127.0.0.1:" in line, line
        url = line.split(" on ")[1].split()[0]
        assert _get(url)[0] == 200
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=20)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, err
    assert "stopped" in out and "Traceback" not in err


def test_cli_serve_web_without_a_built_page_is_a_one_line_error(tmp_path: Path, capsys) -> None:
    rc = main(["serve-web", "--port", "0", "--dist", str(tmp_path)])
    err = capsys.readouterr().err
    assert rc == 2
    assert err.startswith("bn-onnx serve-web: error: no built page") and "npm run build" in err
    assert len(err.strip().splitlines()) == 1


def test_cli_serve_web_refuses_build_with_dist(tmp_path: Path, capsys) -> None:
    rc = main(["serve-web", "--build", "--dist", str(tmp_path)])
    assert rc == 2
    assert "do not combine it with --dist" in capsys.readouterr().err


DIGITS = Path(__file__).resolve().parent.parent / "models" / "digits"


def test_static_server_with_a_model_serves_it_and_says_what_it_is(dist: Path) -> None:
    import json

    int8 = DIGITS / "model.int8.onnx"
    server = static_server(dist, 0, model=int8)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        base = f"http://127.0.0.1:{server.server_address[1]}"
        status, ctype, body = _get(base + "/served-model.json?x=1")
        assert status == 200 and ctype == "application/json"
        info = {"file": "model.int8.onnx", "kind": "INT8 (QDQ)", "url": "./served-model.onnx"}
        assert json.loads(body) == info
        status, ctype, body = _get(base + "/served-model.onnx")
        assert ctype == "application/octet-stream" and body == int8.read_bytes()
        assert _get(base + "/assets/model.onnx")[2] == bytes(range(256))  # the page's own files
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)
    server = static_server(dist, 0, model=DIGITS / "model.folded.onnx")
    server.server_close()


@pytest.mark.parametrize(
    ("model", "message"),
    [
        ("missing.onnx", "model file not found"),
        ("junk.onnx", "not a readable ONNX model"),
        ("tabular", "the page feeds one input of 64 features (8x8 digits); this model takes 2"),
    ],
)
def test_cli_serve_web_with_a_bad_model_is_a_one_line_error(
    dist: Path, tmp_path: Path, capsys, model: str, message: str
) -> None:
    (tmp_path / "junk.onnx").write_bytes(b"not onnx")
    path = tmp_path / model
    if model == "tabular":
        path = DIGITS.parent / "tabular" / "model.folded.onnx"
    rc = main(["serve-web", "--port", "0", "--dist", str(dist), "--model", str(path)])
    err = capsys.readouterr().err
    assert rc == 2
    assert len(err.strip().splitlines()) == 1 and message in err, err
