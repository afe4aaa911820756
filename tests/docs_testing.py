"""Run the examples of a Markdown document as a reader pastes them (tests/test_docs.py).

Sybil parses the document: fenced ```python blocks run in one namespace per document (Sybil's
own evaluator), ```console blocks run each `$ ` command and compare the lines the document
shows after it with what the command printed, ```bash blocks run each line and compare
nothing. Sybil's `<!-- skip: next "reason" -->` before a block skips that block.

Commands: `bn-onnx ...` runs in this process (`bn_onnx.cli.main`, so torch is imported once
for the whole suite; with a `VAR=value` prefix, in a subprocess); `python ...` in a
subprocess with the checkout on PYTHONPATH; `bn-onnx serve ... --port N` starts a server in
a subprocess on a free port, and `curl` commands that name port N are sent there; `head`,
`cat` and `ls` run as themselves; `pip install` is not run (the suite runs installed). A
`train`, `export` or `verify` that an earlier example ran with the same options on the same
input bytes is not run again: its result is copied and its output replayed (the same bits on
the same machine and build is the project's promise). `&&` and `;` chain commands; a trailing
`\\` or an open quote continues a command on the next line.

Output is compared by format, not value: every number on both sides is one placeholder, runs
of spaces are one, a ruler of dashes is any ruler, `...` inside a line stands for any text and
a line `...` for any lines. curl's JSON is compared with all white space removed (the docs
wrap it).
"""

from __future__ import annotations

import atexit
import contextlib
import hashlib
import io
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import traceback
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from unittest import SkipTest

from sybil import Sybil
from sybil.parsers.markdown import CodeBlockParser, PythonCodeBlockParser, SkipParser

ROOT = Path(__file__).resolve().parent.parent
# (options without the output path, digests of the inputs) -> (output copy, its path, output)
_MEMO: dict[tuple, tuple[Path | None, str | None, str]] = {}


def _digest(path: Path) -> str:
    """sha256 of a file, or of a folder's files with their names."""
    h = hashlib.sha256()
    for f in sorted(path.rglob("*")) if path.is_dir() else [path]:
        if f.is_file():
            h.update(str(f.relative_to(path) if path.is_dir() else "").encode())
            h.update(f.read_bytes())
    return h.hexdigest()


NUMBER = r"[-+]?(?:\d[\d,]*(?:\.\d*)?|\.\d+)(?:[eE][-+]?\d+)?"
_NUMBER_RE = re.compile(NUMBER)


def doc_paths() -> list[Path]:
    """README.md and every docs/*.md, so that a new document is picked up."""
    return [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


# --- output comparison ------------------------------------------------------------------


def _line_pattern(line: str) -> re.Pattern[str]:
    out = []
    for piece in re.split(r"(\.\.\.)", line.strip()):
        if piece == "...":
            out.append(".*")
            continue
        for token in re.split(rf"({NUMBER}|\s+|-{{3,}})", piece):
            if not token:
                continue
            if token.isspace():
                out.append(r"\s+")
            elif re.fullmatch(r"-{3,}", token):  # a table's ruler: as wide as its column
                out.append(r"-{3,}")
            elif _NUMBER_RE.fullmatch(token):
                out.append(NUMBER)
            else:
                out.append(re.escape(token))
    return re.compile("".join(out))


def output_matches(expected: list[str], actual: list[str]) -> bool:
    """Whether `actual` lines have the format of `expected` (see the module docstring)."""
    exp = [None if e.strip() == "..." else _line_pattern(e) for e in expected if e.strip()]
    act = [a.strip() for a in actual if a.strip()]
    memo: dict[tuple[int, int], bool] = {}

    def match(i: int, j: int) -> bool:
        if (i, j) not in memo:
            if i == len(exp):
                ok = j == len(act)
            elif exp[i] is None:  # any lines, none included
                ok = match(i + 1, j) or (j < len(act) and match(i, j + 1))
            else:
                ok = j < len(act) and bool(exp[i].fullmatch(act[j])) and match(i + 1, j + 1)
            memo[(i, j)] = ok
        return memo[(i, j)]

    return match(0, 0)


# --- commands -------------------------------------------------------------------------------


@dataclass
class Command:
    """One command of a block: its text, its line in the document, the output shown after it."""

    text: str
    line: int
    expected: list[str] = field(default_factory=list)


def _complete(text: str) -> bool:
    try:
        shlex.split(text, comments=True)
    except ValueError:  # an open quote: the command goes on
        return False
    return True


def parse_block(source: str, first_line: int, prompt: bool) -> list[Command]:
    """The commands of a console block (`$ ` lines, output below) or bash block (every line)."""
    commands: list[Command] = []
    lines = source.splitlines()
    i = 0
    while i < len(lines):
        raw = lines[i]
        is_cmd = raw.startswith("$ ") if prompt else bool(raw.strip()) and raw.lstrip()[0] != "#"
        if not is_cmd:
            if prompt and commands:
                commands[-1].expected.append(raw)
            i += 1
            continue
        line_no = first_line + i
        text = raw[2:] if prompt else raw
        while (text.rstrip().endswith("\\") or not _complete(text)) and i + 1 < len(lines):
            i += 1
            text = (
                text.rstrip()[:-1].rstrip() + " " if text.rstrip().endswith("\\") else text + "\n"
            )
            text += lines[i].strip()
        commands.append(Command(text, line_no))
        i += 1
    return commands


def _segments(text: str) -> list[tuple[str, list[str]]]:
    """`a && b; c` -> [("", a), ("&&", b), (";", c)] as argument lists."""
    lex = shlex.shlex(text, posix=True, punctuation_chars=";&|<>")
    lex.whitespace_split = True
    lex.commenters = "#"
    tokens = list(lex)
    out: list[tuple[str, list[str]]] = []
    joiner, current = "", []
    for tok in tokens:
        if tok in ("&&", ";"):
            out.append((joiner, current))
            joiner, current = tok, []
        elif tok in ("|", "||", ">", "<", ">>", "&"):
            raise ValueError(f"the docs test does not run shell operator {tok!r}")
        else:
            current.append(tok)
    if current:
        out.append((joiner, current))
    return out


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class DocRunner:
    """Runs one document's commands in `folder`; holds the servers it started."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.ports: dict[str, int] = {}  # port in the doc -> port used
        self.servers: list[tuple[subprocess.Popen, Path]] = []
        self.notes: list[str] = []
        self.env = {
            **os.environ,
            "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
        }

    def close(self) -> None:
        for proc, _ in self.servers:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        self.servers.clear()

    def run(self, text: str) -> tuple[int, str]:
        """Run a command line; its exit code and its stdout and stderr, interleaved."""
        outputs, rc = [], 0
        for joiner, argv in _segments(text):
            if joiner == "&&" and rc != 0:
                break
            rc, out = self._run_one(argv)
            outputs.append(out)
        return rc, "".join(outputs)

    def _run_one(self, argv: list[str]) -> tuple[int, str]:
        env = {}
        while argv and re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*=.*", argv[0]):
            key, value = argv.pop(0).split("=", 1)
            env[key] = value
        name, args = argv[0], argv[1:]
        if name == "pip" or (name.startswith("python") and args[:3] == ["-m", "pip", "install"]):
            self.notes.append("pip install: the suite runs where the project is installed")
            return 0, ""
        if name == "bn-onnx" and args[:1] in (["train"], ["export"], ["verify"]) and not env:
            return self._memoized(args)
        if name == "bn-onnx" and args[:1] == ["serve"]:
            return self._serve(args)
        if name == "bn-onnx" and not env:
            return self._in_process(args)
        if name == "bn-onnx":
            return self._subprocess([sys.executable, "-m", "bn_onnx", *args], env)
        if name in ("python", "python3"):
            return self._subprocess([sys.executable, *args], env)
        if name in ("head", "cat", "ls"):
            return self._subprocess([name, *args], env)
        if name == "curl":
            return self._subprocess(["curl", "--max-time", "30", *map(self._port, args)], env)
        raise ValueError(
            f'the docs test does not run {name!r}: mark the block <!-- skip: next "reason" -->'
        )

    def _memoized(self, args: list[str]) -> tuple[int, str]:
        """`bn-onnx train|export|verify`, once per set of options and inputs in the suite.

        The same options, input bytes and machine give the same checkpoint and ONNX bits (the
        project's promise: tests/test_reproducibility.py), so a command that an earlier
        example ran on the same inputs is not run again: its output file or folder is copied
        to this one's path and its printed output replayed.
        """
        flag = {"train": "--out", "export": "-o"}.get(args[0])
        at = args.index(flag) if flag in args[:-1] else None
        out = args[at + 1] if at is not None else None
        rest = args if at is None else args[:at] + args[at + 2 :]
        key = (tuple(rest), tuple(_digest(Path(a)) for a in rest if Path(a).exists()))
        if key not in _MEMO:
            rc, text = self._in_process(args)
            if rc == 0:
                keep = None
                if out is not None:
                    keep = Path(tempfile.mkdtemp(prefix="bn-docs-")) / "out"
                    atexit.register(shutil.rmtree, keep.parent, True)
                    copy = shutil.copytree if Path(out).is_dir() else shutil.copy2
                    copy(out, keep)
                _MEMO[key] = (keep, out, text)
            return rc, text
        keep, first_out, text = _MEMO[key]
        if keep is not None:
            if keep.is_dir():
                shutil.copytree(keep, out, dirs_exist_ok=True)
            else:
                shutil.copy2(keep, out)
            text = text.replace(str(first_out), str(out))
        self.notes.append(f"bn-onnx {' '.join(args)}: the result of the same earlier command")
        return 0, text

    def _in_process(self, args: list[str]) -> tuple[int, str]:
        from bn_onnx.cli import main

        buf = io.StringIO()
        with contextlib.redirect_stdout(buf), contextlib.redirect_stderr(buf):
            try:
                rc = main(args)
            except SystemExit as exc:
                rc = exc.code if isinstance(exc.code, int) else 1
            except Exception:
                traceback.print_exc(file=buf)
                rc = 1
        return rc, buf.getvalue()

    def _subprocess(self, cmd: list[str], env: dict[str, str]) -> tuple[int, str]:
        done = subprocess.run(
            cmd,
            cwd=self.folder,
            env={**self.env, **env},
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            timeout=300,
        )
        return done.returncode, done.stdout

    def _port(self, arg: str) -> str:
        for doc_port, port in self.ports.items():
            arg = re.sub(rf"(localhost|127\.0\.0\.1):{doc_port}\b", rf"\g<1>:{port}", arg)
        return arg

    def _serve(self, args: list[str]) -> tuple[int, str]:
        if "--port" not in args:
            raise ValueError("a served example names its --port")
        at = args.index("--port") + 1
        doc_port = args[at]
        port = self.ports.setdefault(doc_port, _free_port())
        log = self.folder / f"serve-{doc_port}.log"
        cmd = [sys.executable, "-m", "bn_onnx", *args[:at], str(port), *args[at + 1 :]]
        with open(log, "w") as f:
            proc = subprocess.Popen(
                cmd, cwd=self.folder, env=self.env, stdout=f, stderr=subprocess.STDOUT
            )
        self.servers.append((proc, log))
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                return proc.returncode, log.read_text()
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2):
                    break
            except OSError:
                time.sleep(0.2)
        else:
            return 1, log.read_text() + "\n(server did not answer /health in 60 s)"
        # the doc shows the port it names; the output is compared by format anyway
        return 0, log.read_text().replace(str(port), doc_port)


# --- documents ------------------------------------------------------------------------------


@dataclass
class Outcome:
    """What running a document found: failures (one line each, then details) and skips."""

    failures: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    ran: int = 0


def _where(doc: Path, line: int) -> str:
    return f"{doc.relative_to(ROOT)}:{line}"


def run_document(doc: Path, folder: Path) -> Outcome:
    """Run every example of `doc` in order with `folder` as the working directory."""
    outcome = Outcome()
    runner = DocRunner(folder)

    def shell(prompt: bool):
        def evaluate(example) -> None:
            source = str(example.parsed)
            for cmd in parse_block(source, example.line + 1, prompt):
                try:
                    rc, out = runner.run(cmd.text)
                except (ValueError, OSError, subprocess.TimeoutExpired) as exc:
                    rc, out = 1, str(exc)
                outcome.ran += 1
                where = f"{_where(doc, cmd.line)}: $ {cmd.text}"
                if rc != 0:
                    outcome.failures.append(f"{where}\n  exit {rc}; output:\n{_indent(out)}")
                elif prompt and cmd.expected:
                    actual = out.splitlines()
                    expected = cmd.expected
                    if cmd.text.startswith("curl"):  # JSON the doc wraps over lines
                        actual = ["".join(out.split())]
                        expected = ["".join("".join(expected).split())]
                    if not output_matches(expected, actual):
                        outcome.failures.append(
                            f"{where}\n  output does not have the format shown; the doc:\n"
                            f"{_indent(chr(10).join(cmd.expected))}\n  printed:\n{_indent(out)}"
                        )

        return evaluate

    parsers = [
        PythonCodeBlockParser(),
        CodeBlockParser(language="console", evaluator=shell(prompt=True)),
        CodeBlockParser(language="bash", evaluator=shell(prompt=False)),
        SkipParser(),
    ]
    document = Sybil(parsers=parsers).parse(doc)
    cwd = os.getcwd()
    os.chdir(folder)
    try:
        for example in document:
            is_skip = (
                example.region.evaluator is not None
                and type(example.region.evaluator).__name__ == "Skipper"
            )
            if is_skip:
                action, reason = example.parsed
                if action == "next" and not (reason and reason.strip().strip("\"'")):
                    outcome.failures.append(f"{_where(doc, example.line)}: a skip needs a reason")
            is_python = "Python" in type(example.region.evaluator).__name__
            try:
                example.evaluate()
            except SkipTest as exc:
                outcome.skipped.append(f"{_where(doc, example.line)}: {exc}")
            except Exception:
                outcome.failures.append(
                    f"{_where(doc, example.line)}: block failed\n"
                    + _indent(traceback.format_exc(limit=-3))
                )
            outcome.ran += is_python
    finally:
        os.chdir(cwd)
        runner.close()
    outcome.skipped += runner.notes
    return outcome


def _indent(text: str) -> str:
    return "\n".join("    " + line for line in text.rstrip().splitlines()[-40:])


def prepare_folder(folder: Path) -> None:
    """A fresh working folder holding copies of the checkout's models/, tools/, tests/data/."""
    for name in ("models", "tools", "tests/data"):
        shutil.copytree(ROOT / name, folder / name, ignore=shutil.ignore_patterns("__pycache__"))
