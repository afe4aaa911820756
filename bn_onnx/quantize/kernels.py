"""Which INT8 kernels to quantize for: u8s8, with or without reduce_range, or u8u8.

onnxruntime's x86 INT8 kernels multiply uint8 activations by int8 weights (u8s8). Without
VNNI (AVX2, AVX-512 without VNNI) the u8s8 inner product (vpmaddubsw) adds pairs into int16
and saturates; `reduce_range` (7-bit weights) avoids that at the cost of one bit. With VNNI or
AMX the products accumulate in int32 and the full range is safe. u8u8 (`accurate`) never
saturates and is the most accurate, but runs slower.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable
from pathlib import Path

# /proc/cpuinfo flags whose INT8 dot products accumulate in int32 without saturation.
VNNI_FLAGS = ("avx512_vnni", "avx_vnni", "amx_int8")
CPUINFO = Path("/proc/cpuinfo")


@dataclasses.dataclass(frozen=True)
class Kernels:
    """The quantization types chosen.

    Attributes:
        name: "u8s8" or "u8u8" (activation and weight types).
        reduce_range: 7-bit weights (and activations), for CPUs that saturate.
        why: the reason, as printed ("this CPU has avx512_vnni").
    """

    name: str
    reduce_range: bool
    why: str

    @property
    def weight_signed(self) -> bool:
        return self.name == "u8s8"

    def describe(self) -> str:
        """One line: the kernels and why, e.g. "u8s8 (uint8 activations, int8 per-channel
        weights), reduce_range off: this CPU has avx512_vnni"."""
        weights = "int8" if self.weight_signed else "uint8"
        rr = "on" if self.reduce_range else "off"
        return (
            f"{self.name} (uint8 activations, {weights} per-channel weights), reduce_range {rr}:"
            f" {self.why}"
        )


def cpu_flags(path: Path = CPUINFO) -> set[str] | None:
    """The CPU feature flags of /proc/cpuinfo's first `flags` line; None where unreadable
    (not Linux, or no x86 flags)."""
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return None
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() == "flags":
            return set(value.split())
    return None


def choose_kernels(*, accurate: bool = False, flags: Iterable[str] | None = None) -> Kernels:
    """The default kernels for this CPU (`flags`: read from /proc/cpuinfo when None).

    `accurate`: u8u8, never saturating. Otherwise u8s8, with reduce_range unless a flag of
    `VNNI_FLAGS` is present (an unknown CPU gets reduce_range: safe everywhere).
    """
    have = set(flags) if flags is not None else cpu_flags()
    if accurate:
        return Kernels("u8u8", False, "--accurate (uint8 weights never saturate)")
    if have is None:
        return Kernels("u8s8", True, "CPU flags unknown, so 7-bit weights avoid saturation")
    found = [f for f in VNNI_FLAGS if f in have]
    if found:
        return Kernels("u8s8", False, f"this CPU has {found[0]}")
    return Kernels("u8s8", True, "this CPU lacks VNNI, so 7-bit weights avoid AVX2 saturation")
