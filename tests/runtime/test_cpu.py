"""runtime.cpu: what the CPU reports, read once from /proc/cpuinfo; nothing known where it is absent."""

from __future__ import annotations

import pytest

import runtime.cpu as cpu

SPR = """processor\t: 0
model name\t: Intel(R) Xeon(R) Processor
flags\t\t: fpu sse2 avx2 fma avx512f avx512_vnni avx512_bf16 amx_bf16 amx_int8
processor\t: 1
model name\t: other
flags\t\t: fpu
"""
CLX = "model name\t: Xeon CLX\nflags\t\t: avx2 fma avx512f avx512_vnni\n"
ADL = "model name\t: Core ADL\nflags\t\t: avx2 fma avx_vnni\n"
ZEN2 = "model name\t: AMD EPYC\nflags\t\t: avx2 fma\n"


@pytest.fixture
def cpuinfo(monkeypatch, tmp_path):
    def use(text: str | None):
        path = tmp_path / "cpuinfo"
        if text is None:
            path.unlink(missing_ok=True)
        else:
            path.write_text(text)
        monkeypatch.setattr(cpu, "CPUINFO", path)
        cpu._cpuinfo.cache_clear()

    yield use
    cpu._cpuinfo.cache_clear()


@pytest.mark.parametrize(("text", "bf16", "vnni", "label"), [
    (SPR, True, True, "AVX-512 VNNI +avx512_bf16 +amx_bf16 +amx_int8"),
    (CLX, False, True, "AVX-512 VNNI"),
    (ADL, False, False, "AVX2 VNNI"),  # AVX-VNNI: not enough for INT8 by default (runtime.cpu)
    (ZEN2, False, False, "AVX2"),
])
def test_flags_of_the_first_cpu(cpuinfo, text, bf16, vnni, label):
    cpuinfo(text)
    assert cpu.has_native_bf16() is bf16 and cpu.has_avx512_vnni() is vnni
    assert cpu.isa_label() == label
    assert cpu.cpu_name() in ("Intel(R) Xeon(R) Processor", "Xeon CLX", "Core ADL", "AMD EPYC")


def test_no_cpuinfo_knows_nothing(cpuinfo):
    cpuinfo(None)
    assert cpu.cpu_flags() == frozenset()
    assert not cpu.has_native_bf16() and not cpu.has_avx512_vnni()
    assert cpu.isa_label() == "unknown ISA"
    assert cpu.cpu_name()  # the platform module's answer, never empty here
