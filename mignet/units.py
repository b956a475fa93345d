"""Sizes, rates and the page size: one place, one unit system.

Sizes are binary (IEC), as QEMU's ``-m``: ``2G`` is 2 GiB. Rates are bytes per second
(``128MiB/s``); bit rates are not accepted, so ``10Mbit/s`` is refused rather than misread.
Nothing here does I/O, so every layer may import it.
"""

from __future__ import annotations

import re

from mignet.errors import SetupError

#: Target page size of QEMU's stream (x86): offsets and page records are in these units.
PAGE_SIZE = 4096
KiB = 1 << 10
MiB = 1 << 20
GiB = 1 << 30

_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]?)(i?B)?\s*$", re.IGNORECASE)
_FACTORS = {"": 1, "K": KiB, "M": MiB, "G": GiB, "T": 1 << 40}


#: A bit rate, as a network people would word one: '10Mbit/s', '1Gbps', '100Mb/s'.
_BIT_RATE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kKMGT]?)(i?)(?:bit|bps|b)\s*(?:/s)?\s*$")
_DECIMAL = {"": 1, "K": 10**3, "M": 10**6, "G": 10**9, "T": 10**12}


def parse_size(text: str) -> int:
    """'2G', '512M', '256MiB', '4096' -> bytes (binary units, as QEMU's -m)."""
    m = _SIZE_RE.match(text)
    if not m:
        raise SetupError(f"bad size {text!r}: use a number with an optional K, M, G or T "
                         "suffix (binary: 1M = 1 MiB)")
    return int(float(m.group(1)) * _FACTORS[m.group(2).upper()])


def parse_rate(text: str) -> int:
    """'128MiB/s', '1G', '0' -> bytes per second (0 = unlimited).

    A bit rate ('10Mbit/s') is refused, never read as bytes: the same figure means 8 times
    less, and silently taking it for MiB/s would run the link 8.4 times faster than asked.
    The refusal says the rate in bytes, so the user can copy it."""
    bits = _BIT_RATE_RE.match(text)
    if bits:
        scale = 1024 ** " KMGT".index(bits.group(2).upper() or " ") if bits.group(3) else \
            _DECIMAL[bits.group(2).upper()]  # 'Mib' is binary, 'Mb' decimal
        per_s = float(bits.group(1)) * scale / 8
        raise SetupError(f"bad rate {text!r}: rates are bytes per second in binary units, bit "
                         f"rates are not accepted ({text.strip()} is {human_bytes(per_s).replace(' ', '')}/s)")
    try:
        return parse_size(text.removesuffix("/s"))
    except SetupError:
        raise SetupError(f"bad rate {text!r}: use bytes per second in binary units, e.g. "
                         "128MiB/s or 1G (0 = unlimited)") from None


def human_bytes(n: float) -> str:
    """Bytes in IEC units with one decimal: '1.5 GiB', '512 B'."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return f"{n:.1f} TiB"  # pragma: no cover


def rate(nbytes: float, seconds: float) -> str:
    """A throughput for tables in the one unit system (``456.0 MiB/s``, ``1.2 GiB/s``; a
    small transfer is ``12.0 KiB/s``, never ``0.00 GB/s``); '-' when no time passed."""
    if seconds <= 0:
        return "-"
    return f"{human_bytes(int(nbytes / seconds))}/s"
