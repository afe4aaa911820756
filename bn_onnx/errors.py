"""The project's one family of user-facing errors.

The CLI prints any `BnOnnxError` as one line and exits 2. Anything else is a bug and keeps its
traceback.
"""

from __future__ import annotations


def one_line(exc: BaseException, limit: int = 300) -> str:
    """An exception's message as its first non-empty line, of at most `limit` characters (the
    exception's type name when it has no message), for a one-line error that names the cause;
    onnx's and onnxruntime's multi-line texts keep the rest for `--debug` (`detail`).

    onnx-ir wraps errors in `SerdeError("Error calling _deserialize_graph with: ...")`: the
    innermost cause says what is wrong.
    """
    while exc.__cause__ is not None and type(exc).__name__ == "SerdeError":
        exc = exc.__cause__
    lines = [line.strip() for line in str(exc).strip().splitlines() if line.strip()]
    text = lines[0] if lines else type(exc).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


class BnOnnxError(Exception):
    """A user error: bad input, bad usage, an unsupported model. Exit code 2."""

    exit_code = 2
    # The full text behind a one-line message (an onnx or onnxruntime error), for `--debug`.
    detail: str | None = None


class InputFileError(BnOnnxError):
    """A file the user gave is missing, empty, truncated, of the wrong kind or unsafe."""


class UsageError(BnOnnxError):
    """Options or arguments that do not fit together."""


class UnsupportedModelError(BnOnnxError):
    """A model the command cannot handle (ops, opset, shapes, dtypes)."""


class CheckpointError(BnOnnxError):
    """A checkpoint directory that is missing, incomplete, corrupt or disagrees with its config."""


class ProviderError(BnOnnxError):
    """An execution provider that was asked for and is not available."""


class InputDataError(BnOnnxError):
    """Input data of the wrong shape, dtype or with non-finite values."""


class OutputFileError(BnOnnxError):
    """An output that cannot be written: read-only folder, no space left, an I/O error."""


class CellError(InputDataError):
    """A cell of a named column that cannot be used, at a row counted from 0 in the data given.

    A reader that knows where rows sit in a file (a CSV's line numbers) names the place with
    `column`, `row` and `what` instead of the row index.
    """

    def __init__(self, column: str, row: int, what: str) -> None:
        super().__init__(f"column {column!r} row {row}: {what}")
        self.column, self.row, self.what = column, row, what


class NonFiniteError(InputDataError):
    """A NaN or infinity in an array of numbers: `row` (from 0 in the data given), `column`."""

    def __init__(self, message: str, row: int, column: int, value: float) -> None:
        super().__init__(message)
        self.row, self.column, self.value = row, column, value
