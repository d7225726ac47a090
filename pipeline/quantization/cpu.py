"""What the host CPU offers for int8: VNNI-class dot-product instructions decide reduce_range."""

from __future__ import annotations

import platform
from functools import cache
from pathlib import Path

# x86 VNNI (AVX-512 or AVX) and Arm's dot-product extension: int8 x int8 -> int32 without overflow.
_DOT_PRODUCT_FLAGS = ("avx512_vnni", "avx_vnni", "asimddp")


@cache
def int8_dot_product_flags() -> tuple[str, ...] | None:
    """The CPU's int8 dot-product flags, or None when the CPU cannot be inspected (no /proc/cpuinfo)."""
    cpuinfo = Path("/proc/cpuinfo")
    if not cpuinfo.is_file():
        return None
    words = set(cpuinfo.read_text(errors="replace").split())
    return tuple(flag for flag in _DOT_PRODUCT_FLAGS if flag in words)


def needs_reduce_range() -> tuple[bool, str]:
    """Whether weights should use 7 bits (reduce_range) on this CPU, and why.

    Without VNNI, x86 int8 kernels multiply u8 x s8 pairs into saturating int16 (vpmaddubsw):
    7-bit weights avoid that overflow.
    """
    flags = int8_dot_product_flags()
    if flags is None:
        return False, f"cannot inspect the CPU ({platform.machine()}); full 8-bit range"
    if flags:
        return False, f"CPU has {', '.join(flags)}: full 8-bit range"
    if platform.machine().lower() in ("x86_64", "amd64", "i686"):
        return True, "x86 CPU without VNNI: 7-bit weights avoid int16 saturation"
    return False, f"{platform.machine()} CPU: full 8-bit range"
