"""Rewritten weights computed when the model is written, block by block (rule 14).

A fold scales a weight per channel: `weight * factor` in float64, rounded once to the weight's
dtype (`affine_math.scale_rounded`). Holding every rewritten weight as an array until the
model is saved costs one copy of them all (2.6 GB of a 2.7 GB model). For a weight read from
external data (memory-mapped), `scaled` instead checks the product block by block now (a fold
must be refused before the graph is touched when a value would not be finite, would overflow
or would underflow to zero), keeps nothing of it, and returns a `ScaledTensor`: an onnx-ir
tensor that computes the same blocks again when `onnx_ir.save` writes it (`tofile`), so a save
holds one block of one weight at a time. A weight in memory (a one-file model) is computed at
once, as before: the fold holds a copy of it anyway.

The pages of a memory map that were read stay in the process's resident set until the map is
closed, so after each full read of a big mapped weight they are handed back to the page cache
(`release_pages`, madvise MADV_DONTNEED): peak memory stays about one weight's pages and one
block, not the whole file.
"""

from __future__ import annotations

import contextlib
import mmap
import sys
from collections.abc import Iterator
from typing import Any

import numpy as np
import onnx_ir as ir

from bn_onnx.fold import affine_math as fm

# Weights of more elements than this are rewritten lazily; smaller ones are computed now
# (1M elements: 4 MB of float32; computing twice would cost more than holding them).
LAZY_ELEMENTS = 1 << 20


def _mapping(array: np.ndarray) -> mmap.mmap | None:
    """The memory map behind `array` (numpy views keep their base chain), if any."""
    base: Any = array
    while base is not None and not isinstance(base, mmap.mmap):
        base = base.obj if isinstance(base, memoryview) else getattr(base, "base", None)
    return base


def is_mapped(array: np.ndarray) -> bool:
    """Whether `array` is a view of a memory map (a tensor of an external data file)."""
    return _mapping(array) is not None


def release_pages(array: np.ndarray) -> None:
    """Hand the pages of the memory map behind `array` (if any) back to the page cache.

    The map stays valid: a later read faults the pages in again from the page cache or the
    file. Does nothing for arrays in anonymous memory, or where madvise is not available.
    """
    base = _mapping(array)
    advice = getattr(mmap, "MADV_DONTNEED", None)
    if base is None or advice is None:
        return
    with contextlib.suppress(OSError, ValueError):  # a closed map, an old kernel
        base.madvise(advice)


def _rows(weight: np.ndarray) -> int:
    """Rows (along axis 0) per block: about `math.CHUNK` elements."""
    if weight.ndim == 0:
        return 1
    return max(1, fm.CHUNK // max(1, weight[:1].size))


def _factor(weight: np.ndarray, factor: np.ndarray) -> np.ndarray:
    f = np.asarray(factor, dtype=np.float64)
    return f.reshape((1,) * (weight.ndim - f.ndim) + f.shape)


def _blocks(weight: np.ndarray, factor: np.ndarray) -> Iterator[np.ndarray]:
    """`scale_rounded(weight, factor)` by blocks of rows, in order (ValueError when unsafe)."""
    if weight.ndim == 0 or weight.size <= fm.CHUNK:
        yield fm.scale_rounded(weight, factor)
        return
    step = _rows(weight)
    for i in range(0, weight.shape[0], step):
        fb = factor if factor.shape[0] == 1 else factor[i : i + step]
        yield fm.scale_rounded(weight[i : i + step], fb)


def scaled(weight: np.ndarray, factor: np.ndarray) -> np.ndarray | ScaledTensor:
    """`weight * factor`, rounded once to the weight's dtype, checked now and computed when
    written.

    Args:
        weight: the weight, any float dtype (a view of a memory map is fine: it is only read).
        factor: float64, broadcastable to `weight` (a per-channel factor of `affine_math`).

    Returns:
        A `ScaledTensor` that recomputes the product block by block when written, for a
        memory-mapped weight (external data) of more than `LAZY_ELEMENTS` elements; else the
        rounded array itself.

    Raises:
        ValueError: a folded value would not be finite, would overflow the dtype, or would
            underflow to zero where the weight is not zero (`math.round_to`'s words).
    """
    w = np.asarray(weight)
    f = _factor(w, factor)
    if w.size <= LAZY_ELEMENTS or not is_mapped(w):
        # A weight in memory is read from a copy the fold holds anyway: holding the result
        # instead costs no more, and computing it once is faster.
        return fm.scale_rounded(w, f)
    for _ in _blocks(w, f):  # the checks, block by block; nothing kept
        pass
    release_pages(w)
    return ScaledTensor(w, f)


class ScaledTensor(ir.LazyTensor):
    """An `onnx_ir.LazyTensor` of `scale_rounded(weight, factor)`, written block by block.

    `tofile` (what `onnx_ir.save` calls for external data) writes it one block at a time;
    `numpy()`/`tobytes()` compute it whole (a one-file save, or a later read of the weight).
    `end_bytes(n)` gives its first and last n bytes from two blocks (for deduplication).
    The weight must not change while the tensor lives: it is a read-only view of the input
    (an initializer's data or a memory map of its external data file).
    """

    def __init__(self, weight: np.ndarray, factor: np.ndarray, name: str | None = None) -> None:
        self.weight = weight
        self.factor = _factor(weight, factor)
        super().__init__(
            self._compute,
            dtype=ir.DataType.from_numpy(weight.dtype),
            shape=ir.Shape(weight.shape),
            name=name,
        )

    def __repr__(self) -> str:
        return f"{self._repr_base()}(name={self.name!r})"

    def _compute(self) -> ir.Tensor:
        out = fm.scale_rounded(self.weight, self.factor)
        release_pages(self.weight)
        return ir.Tensor(out, dtype=self.dtype, name=self.name)

    def tofile(self, file: Any) -> None:
        """Write the little-endian bytes block by block (one block in memory at a time)."""
        for block in _blocks(self.weight, self.factor):
            file.write(_little_endian(block).reshape(-1).view(np.uint8).data)
        release_pages(self.weight)

    def end_bytes(self, n: int) -> bytes:
        """The first n and the last n bytes of `tobytes()` (overlapping for a small tensor),
        computed from the first and last blocks only."""
        w, f = self.weight, self.factor
        if w.ndim == 0 or w.nbytes <= 2 * n or w.shape[0] < 2:
            raw = self.tobytes()
            return raw[:n] + raw[-n:]
        k = min(w.shape[0], -(-n // max(1, w[:1].nbytes)))  # rows covering n bytes
        head_f = f if f.shape[0] == 1 else f[:k]
        tail_f = f if f.shape[0] == 1 else f[-k:]
        head = _little_endian(fm.scale_rounded(w[:k], head_f)).tobytes()[:n]
        tail = _little_endian(fm.scale_rounded(w[-k:], tail_f)).tobytes()[-n:]
        return head + tail


def _little_endian(array: np.ndarray) -> np.ndarray:
    """`array`, contiguous and little-endian (ONNX raw data is little-endian)."""
    array = np.ascontiguousarray(array)
    if sys.byteorder == "big" and array.dtype.byteorder in ("=", ">") and array.itemsize > 1:
        array = array.astype(array.dtype.newbyteorder("<"))
    return array
