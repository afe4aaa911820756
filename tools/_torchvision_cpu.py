"""Import torchvision on the CPU build of torch, for the corpus tools (models only, no ops).

The registry's Linux torchvision wheels are CUDA builds. Installed with `pip install --no-deps`
beside the CPU torch of constraints.txt (torchvision 0.28.0 is the release whose metadata
requires torch==2.13.0), their compiled `_C` library does not load, and torchvision then
runs without its C++ ops - except that `torchvision/_meta_registrations.py` registers fake
(meta) kernels for `torchvision::nms` and `torchvision::qnms` whether or not `_C` loaded,
which fails with "operator torchvision::nms does not exist". Defining those two op schemas
first (the signatures of torchvision's `csrc/ops/nms.cpp`) lets the import finish. The models
need none of the C++ ops (they are detection ops: nms, roi_align, deform_conv2d); calling
one still fails, as it would have without this module.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

_SCHEMAS = {
    "nms": "(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
    "qnms": "(Tensor qdets, Tensor scores, float iou_threshold) -> Tensor",
}


def _c_library_loads(package_dir: Path) -> bool:
    """Whether torchvision's own `_C` library loads here (it then defines the ops itself)."""
    import torch

    for lib in sorted(package_dir.glob("_C*.so")):
        try:
            torch.ops.load_library(str(lib))  # loading it again in torchvision is a no-op
        except OSError:
            return False
        return True
    return False


def import_torchvision() -> ModuleType:
    """Import and return torchvision, defining the two op schemas it needs if `_C` cannot load.

    Raises:
        ImportError: torchvision is not installed (see docs/corpus.md: the `corpus` extra's
            pin, installed with `pip install --no-deps`).
    """
    if "torchvision" in sys.modules:
        return sys.modules["torchvision"]
    spec = importlib.util.find_spec("torchvision")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError("torchvision is not installed (see docs/corpus.md)")
    import torch

    if not _c_library_loads(Path(next(iter(spec.submodule_search_locations)))):
        for name, schema in _SCHEMAS.items():
            torch.library.define(f"torchvision::{name}", schema)
    import torchvision

    return torchvision
