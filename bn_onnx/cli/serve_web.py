"""`bn-onnx serve-web`: serve the built browser page (web/dist) on this machine only."""

from __future__ import annotations

import argparse
import functools
import shutil
import signal
import subprocess
from pathlib import Path
from typing import Any

from bn_onnx.cli._common import add_command, port_number
from bn_onnx.errors import InputFileError, UsageError

EPILOG = """\
The page is built from web/ with npm (once, after a change): `cd web && npm ci && npm run build`.
When web/dist is missing and npm and web/node_modules are there, this command builds it first;
--build rebuilds it. The page loads the folded digits model (or its INT8 version: pick it, or
open /?model=int8) and onnxruntime-web's WebAssembly from its own files: it needs no network.
--model PATH serves another model of 64 float features (8x8 digits) as well; the page then runs
it first and says whether it is float or INT8. It listens on 127.0.0.1 only.

example:
  bn-onnx serve-web --port 8080      # then open http://127.0.0.1:8080/
  bn-onnx serve-web --model models/digits/model.int8.onnx
"""

# What the page fetches to learn of a --model; the built page holds a placeholder saying null.
SERVED_INFO = "/served-model.json"
SERVED_MODEL = "/served-model.onnx"
PAGE_FEATURES = 64  # the page draws 8x8 digits

WEB_DIR = Path(__file__).resolve().parents[2] / "web"

# Types the page needs right: browsers compile wasm streaming only as application/wasm.
MIME_TYPES = {
    ".wasm": "application/wasm",
    ".mjs": "text/javascript",
    ".js": "text/javascript",
    ".onnx": "application/octet-stream",
    ".npy": "application/octet-stream",
}


HELP = "serve the browser page (digits with onnxruntime-web) on localhost"
DESCRIPTION = """\
Serve the built browser page, where the folded digits model predicts in the browser with
onnxruntime-web (WASM). Build it first with `npm run build` in web/."""


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Register `serve-web`."""
    p = add_command(subparsers, "serve-web", HELP, DESCRIPTION, EPILOG)
    p.add_argument(
        "--port", type=port_number, default=8080, help="TCP port (default 8080; 0 picks one)"
    )
    p.add_argument(
        "--dist",
        metavar="DIR",
        default=None,
        help="the built page to serve (default web/dist of this checkout)",
    )
    p.add_argument(
        "--model",
        metavar="PATH",
        default=None,
        help="also serve this ONNX model (64 float features, e.g. an INT8 one); the page runs it",
    )
    p.add_argument("--build", action="store_true", help="run `npm run build` in web/ first")
    p.add_argument("--verbose", "-v", action="store_true", help="log every request")
    return p


def build_page(web_dir: Path = WEB_DIR) -> None:
    """Run `npm run build` in `web_dir` (needs npm and `npm ci` done there)."""
    npm = shutil.which("npm")
    if npm is None:
        raise UsageError("npm not found; install Node.js 20+ to build the page")
    if not (web_dir / "node_modules").is_dir():
        raise UsageError(f"run `npm ci` in {web_dir} first (its node_modules is missing)")
    result = subprocess.run([npm, "run", "build"], cwd=web_dir, check=False)
    if result.returncode != 0:
        raise UsageError(f"`npm run build` failed in {web_dir} (exit {result.returncode})")


def served_model_info(path: str | Path) -> dict[str, str]:
    """What the page needs to know of a `--model`: {"file", "kind", "url"}; `kind` is
    "INT8 (QDQ)" for a quantized model, else "float32".

    Raises:
        InputFileError: not a readable ONNX model.
        UsageError: it does not take one float input of 64 features, as the page feeds.
    """
    from bn_onnx.files import check_input_file
    from bn_onnx.runtime import Predictor
    from bn_onnx.verify import is_quantized

    check_input_file(str(path), "model file")
    predictor = Predictor(path, provider="cpu")
    if predictor.n_features != PAGE_FEATURES or len(predictor.input_names) != 1:
        takes = (
            f"{predictor.n_features} features"
            if len(predictor.input_names) == 1
            else f"{len(predictor.input_names)} inputs"
        )
        raise UsageError(
            f"{path}: the page feeds one input of {PAGE_FEATURES} features (8x8 digits); "
            f"this model takes {takes}"
        )
    from bn_onnx.onnx_io import load_model

    kind = "INT8 (QDQ)" if is_quantized(load_model(str(path))) else "float32"
    return {"file": Path(path).name, "kind": kind, "url": "." + SERVED_MODEL}


def static_server(
    dist: Path, port: int = 0, *, verbose: bool = False, model: str | Path | None = None
) -> Any:
    """A threading HTTP server for the files in `dist` on 127.0.0.1:`port` (0: any free).

    With `model`, it also answers SERVED_MODEL with that file and SERVED_INFO with
    `served_model_info(model)` (checked here, so bad input raises before anything listens).
    """
    import json
    import urllib.parse
    from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer

    extra: dict[str, bytes] = {}
    if model is not None:
        extra[SERVED_INFO] = json.dumps(served_model_info(model)).encode()
        extra[SERVED_MODEL] = Path(model).read_bytes()

    class Handler(SimpleHTTPRequestHandler):
        extensions_map = {**SimpleHTTPRequestHandler.extensions_map, **MIME_TYPES}

        def send_head(self) -> Any:
            path = urllib.parse.urlsplit(self.path).path
            body = extra.get(path)
            if body is None:
                return super().send_head()
            import io

            self.send_response(200)
            self.send_header("Content-Type", self.guess_type(path))
            self.send_header("Content-Length", str(len(body)))
            self.send_header("Cache-Control", "no-store")
            self.end_headers()
            return io.BytesIO(body)

        def log_message(self, format: str, *args: Any) -> None:
            if verbose:
                super().log_message(format, *args)

    handler = functools.partial(Handler, directory=str(dist))
    try:
        return ThreadingHTTPServer(("127.0.0.1", port), handler)
    except OSError as exc:
        raise UsageError(f"cannot listen on 127.0.0.1:{port}: {exc.strerror}") from None


class _Stop(Exception):
    pass


def _stop(signum: int, frame: Any) -> None:
    raise _Stop


def run(args: argparse.Namespace) -> int:
    """Build the page if needed, then serve it until Ctrl-C or SIGTERM."""
    dist = Path(args.dist) if args.dist else WEB_DIR / "dist"
    if args.build or (args.dist is None and not (dist / "index.html").is_file()):
        if args.dist is not None:
            raise UsageError("--build builds web/dist; do not combine it with --dist")
        if not WEB_DIR.is_dir():
            raise InputFileError(f"the page's sources are not here: {WEB_DIR}")
        print(f"bn-onnx serve-web: building the page in {WEB_DIR}", flush=True)
        build_page(WEB_DIR)
    if not (dist / "index.html").is_file():
        raise InputFileError(
            f"no built page in {dist} (index.html missing); run `npm ci && npm run build` in web/"
        )
    server = static_server(dist, args.port, verbose=args.verbose, model=args.model)
    port = server.server_address[1]
    served = f", with {args.model}" if args.model else ""
    print(
        f"bn-onnx serve-web: {dist}{served} on http://127.0.0.1:{port}/ (Ctrl-C stops)",
        flush=True,
    )
    previous = signal.signal(signal.SIGTERM, _stop)
    try:
        server.serve_forever()
    except (KeyboardInterrupt, _Stop):
        pass
    finally:
        signal.signal(signal.SIGTERM, previous)
        server.server_close()
    print("bn-onnx serve-web: stopped", flush=True)
    return 0
