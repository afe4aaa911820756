"""`python -m bn_onnx` runs the command line."""

from __future__ import annotations

import sys

from bn_onnx.cli import main

if __name__ == "__main__":
    sys.exit(main())
