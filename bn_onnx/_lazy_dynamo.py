"""Training without importing torch._dynamo: about 2 s of CPU that eager training never uses.

torch's optimizers import `torch._dynamo` on their first `step()` (`_use_grad_for_differentiable`
calls `torch._dynamo.graph_break()`, and `torch._disable_dynamo` wraps the update functions in
`torch._dynamo.disable`), both no-ops outside `torch.compile`. While `deferred()` is active,
`torch._dynamo` is a stand-in whose `graph_break` does nothing and whose `disable` returns the
function unchanged; any other attribute imports the real module and answers from it, so a
torch that needs more gets it. The stand-in is removed on exit: a later `torch.onnx.export`
imports the real module as usual.
"""

from __future__ import annotations

import contextlib
import importlib
import sys
import types
from collections.abc import Callable, Iterator
from typing import Any

NAME = "torch._dynamo"


class _Deferred(types.ModuleType):
    def graph_break(self) -> None:
        """A no-op outside torch.compile, as the real one is."""

    def disable(self, fn: Callable[..., Any] | None = None, *args: Any, **kwargs: Any) -> Any:
        """Eager code runs undisturbed: the function itself (or a decorator giving it)."""
        return fn if fn is not None else (lambda f: f)

    def __getattr__(self, name: str) -> Any:
        _remove(self)
        return getattr(importlib.import_module(NAME), name)


def _remove(stub: types.ModuleType) -> None:
    if sys.modules.get(NAME) is stub:
        del sys.modules[NAME]
    torch = sys.modules.get("torch")
    if torch is not None and torch.__dict__.get("_dynamo") is stub:
        del torch.__dict__["_dynamo"]


@contextlib.contextmanager
def deferred() -> Iterator[None]:
    """Run the block with `torch._dynamo` deferred, unless it is imported already."""
    if NAME in sys.modules:
        yield
        return
    stub = _Deferred(NAME)
    sys.modules[NAME] = stub
    try:
        yield
    finally:
        _remove(stub)
