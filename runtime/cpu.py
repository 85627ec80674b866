"""What this CPU computes natively, as Linux reports it in ``/proc/cpuinfo`` (nothing is known elsewhere).

One reader for the runtime (``rd-run info``'s hint) and the benchmark scripts (the machine line
every speed figure is stated with: AVX2 or AVX-512 / VNNI / BF16). Read once per process.
"""

from __future__ import annotations

import functools
import platform
from pathlib import Path

__all__ = ["AVX512_VNNI_FLAGS", "BF16_FLAGS", "cpu_flags", "cpu_name", "has_avx512_vnni", "has_native_bf16",
           "isa_label"]

CPUINFO = Path("/proc/cpuinfo")
#: instruction sets that compute BF16 natively (OpenVINO's BF16 path, torch's bf16 autocast)
BF16_FLAGS = frozenset({"amx_bf16", "avx512_bf16"})
#: 512-bit 8-bit dot products (every AMX-INT8 CPU lists it too). The 256-bit AVX-VNNI of client
#: CPUs (``avx_vnni``) is left out on purpose: imitated, OpenVINO's INT8 there was 1.1x onnxruntime
#: FP32 at 2 steps and 0.96x at 0 (docs/benchmarks.md), too little to change the default precision.
AVX512_VNNI_FLAGS = frozenset({"avx512_vnni"})


@functools.lru_cache(maxsize=1)
def _cpuinfo() -> tuple[str, frozenset[str]]:
    name, flags = "", frozenset()
    try:
        text = CPUINFO.read_text()
    except OSError:
        return name, flags
    for line in text.splitlines():
        key, _, value = line.partition(":")
        key = key.strip()
        if key == "model name" and not name:
            name = value.strip()
        elif key == "flags" and not flags:
            flags = frozenset(value.split())
        if name and flags:
            break
    return name, flags


def cpu_flags() -> frozenset[str]:
    """The first CPU's ``flags`` (empty where ``/proc/cpuinfo`` is absent or has none)."""
    return _cpuinfo()[1]


def cpu_name() -> str:
    """The CPU's model name, else what the platform module knows."""
    return _cpuinfo()[0] or platform.processor() or platform.machine()


def has_native_bf16() -> bool:
    """Whether the CPU lists AMX-BF16 or AVX512_BF16."""
    return bool(cpu_flags() & BF16_FLAGS)


def has_avx512_vnni() -> bool:
    """Whether the CPU lists AVX512_VNNI."""
    return bool(cpu_flags() & AVX512_VNNI_FLAGS)


def isa_label(flags: frozenset[str] | None = None) -> str:
    """A short name of the vector ISA, e.g. "AVX-512 VNNI +avx512_bf16 +amx_bf16 +amx_int8" or "AVX2"."""
    flags = cpu_flags() if flags is None else flags
    label = ("AVX-512 VNNI" if "avx512_vnni" in flags else "AVX-512" if "avx512f" in flags
             else "AVX2 VNNI" if {"avx2", "avx_vnni"} <= flags else "AVX2" if "avx2" in flags else "unknown ISA")
    return label + "".join(f" +{f}" for f in ("avx512_bf16", "amx_bf16", "amx_int8") if f in flags)
