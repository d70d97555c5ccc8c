"""Parse and format the quantities users type and read: counts, bytes, FLOPs, durations, precisions.

Parsing is exact where the unit is exact: ``2GB`` is 2 * 10^9 bytes, ``1.5GiB`` 1.5 * 2^30, ``0.9B``
parameters 9 * 10^8. A string that is not of the form raises :class:`~moe_scaling.errors.ConfigError`
naming the field (the flag or config key the value came from) and an example of the right form.

Formatting gives people short, stable text: :func:`format_count` (``922M``, ``5.33B``),
:func:`format_bytes` (``1.98 GB``), :func:`format_flops` (``1.84 GFLOP``), :func:`format_duration`
(``2m54s``). All use decimal (SI) units, as the published model cards do.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from decimal import Decimal, InvalidOperation

from moe_scaling.errors import ConfigError

__all__ = ["Precision", "parse_precision", "parse_bytes", "parse_count", "parse_flops", "parse_latency_ms",
           "format_count", "format_bytes", "format_flops", "format_duration"]

_NUMBER = r"\d+(?:\.\d*)?(?:[eE][+-]?\d+)?|\.\d+(?:[eE][+-]?\d+)?"


# --------------------------------------------------------------------------------------
# Precisions
# --------------------------------------------------------------------------------------

_FLOAT_BITS = {"fp32": 32, "f32": 32, "float32": 32, "bf16": 16, "bfloat16": 16, "fp16": 16,
               "f16": 16, "float16": 16, "fp8": 8}
_PRECISION_RE = re.compile(r"^int(?P<bits>[2-8])(?:-g(?P<group>\d+))?(?:-(?P<scale>fp16|bf16|fp32|fp8))?$")


@dataclass(frozen=True)
class Precision:
    """A weight storage format: ``bits`` per value plus one ``scale_bits`` scale per ``group_size``
    values (``group_size=None``: no scales, a float format).

    Bits per value: ``bits + scale_bits / group_size``; INT4 in groups of 32 with fp16 scales is
    ``4 + 16 / 32 = 4.5``.
    """

    name: str
    bits: int
    group_size: int | None = None
    scale_bits: int = 16

    @property
    def bits_per_value(self) -> float:
        return self.bits + (self.scale_bits / self.group_size if self.group_size else 0.0)


def parse_precision(spec: str | Precision, *, field: str = "weights") -> Precision:
    """Parse ``bf16``, ``fp16``, ``fp32``, ``fp8``, ``int8``, ``int4``, ``int4-g64``, ``int4-g32-bf16``
    (a :class:`Precision` passes through).

    Integer formats default to group size 32 with fp16 scales (INT4 -> 4.5 bits per weight).
    """
    if isinstance(spec, Precision):
        return spec
    s = str(spec).strip().lower()
    if s in _FLOAT_BITS:
        return Precision(s, _FLOAT_BITS[s])
    m = _PRECISION_RE.match(s)
    if not m:
        raise ConfigError(f"{field} = {spec!r}: unknown precision; use bf16, fp16, fp32, fp8, int8, "
                          "int4 or intN-gG[-fp16|bf16|fp32] (e.g. int4-g64)")
    group = int(m["group"]) if m["group"] else 32
    if group < 1:
        raise ConfigError(f"{field} = {spec!r}: group size must be >= 1; e.g. int4-g32")
    scale = _FLOAT_BITS[m["scale"]] if m["scale"] else 16
    return Precision(s, int(m["bits"]), group, scale)


# --------------------------------------------------------------------------------------
# Parsing
# --------------------------------------------------------------------------------------

_BYTE_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
               "KiB": 2**10, "MiB": 2**20, "GiB": 2**30, "TiB": 2**40}
_BYTES_RE = re.compile(rf"^\s*(?P<num>{_NUMBER})\s*(?P<unit>[KMGT]i?B|B)?\s*$")
_COUNT_UNITS = {"": 1, "K": 10**3, "M": 10**6, "B": 10**9, "T": 10**12}
_COUNT_RE = re.compile(rf"^\s*(?P<num>{_NUMBER})\s*(?P<unit>[KMBT])?\s*$")
_FLOPS_UNITS = {"": 1, "K": 10**3, "M": 10**6, "G": 10**9, "B": 10**9, "T": 10**12, "P": 10**15}
_FLOPS_RE = re.compile(rf"^\s*(?P<num>{_NUMBER})\s*(?P<unit>[KMGBTP])?\s*(?:FLOPs?)?\s*$")
_DURATION_RE = re.compile(rf"^\s*(?P<num>{_NUMBER})\s*(?P<unit>ms|s)?\s*$")


def parse_bytes(text: str | int, *, field: str = "budget") -> int:
    """Parse a memory size exactly: ``2GB`` (1e9), ``1.5GiB`` (2^30), ``800MB``, ``2e9``, ``512 MiB``.

    Units are case-sensitive (``gb`` is refused: it reads as gigabits). The result must be a whole,
    positive number of bytes.
    """
    if isinstance(text, int) and not isinstance(text, bool):
        value = Decimal(text)
    else:
        m = _BYTES_RE.match(str(text))
        if not m:
            raise ConfigError(f"{field} = {text!r}: not a memory size; write e.g. 2GB, 1.5GiB, 800MB or 2e9")
        try:
            value = Decimal(m["num"]) * _BYTE_UNITS[m["unit"] or ""]
        except InvalidOperation:  # pragma: no cover - the regex admits only decimals
            raise ConfigError(f"{field} = {text!r}: not a number; write e.g. 2GB") from None
    if value <= 0 or value != value.to_integral_value():
        raise ConfigError(f"{field} = {text!r}: must be a positive whole number of bytes; e.g. 2GB")
    return int(value)


def parse_count(text: str | int | float, *, field: str = "count") -> float:
    """Parse a count such as ``0.9B`` (parameters), ``1e12`` or ``300M`` (K/M/B/T = 1e3..1e12)."""
    if isinstance(text, (int, float)) and not isinstance(text, bool):
        value = float(text)
    else:
        m = _COUNT_RE.match(str(text))
        if not m:
            raise ConfigError(f"{field} = {text!r}: not a count; write e.g. 0.9B, 300M or 1e12")
        value = float(Decimal(m["num"]) * _COUNT_UNITS[m["unit"] or ""])
    if not value > 0:
        raise ConfigError(f"{field} = {text!r}: must be positive; e.g. 0.9B")
    return value


def parse_flops(text: str | int | float, *, field: str = "--budget-flops") -> float:
    """``2e9``, ``2G``, ``2GFLOPs``, ``500M`` -> FLOPs (K/M/G/T/P = 1e3..1e15; B = G)."""
    if isinstance(text, (int, float)) and not isinstance(text, bool):
        value = float(text)
    else:
        m = _FLOPS_RE.match(str(text))
        if not m:
            raise ConfigError(f"{field} = {text!r}: not a positive FLOP count; write e.g. 2e9 or 2G")
        value = float(m["num"]) * _FLOPS_UNITS[m["unit"] or ""]
    if not value > 0:
        raise ConfigError(f"{field} = {text!r}: not a positive FLOP count; write e.g. 2e9 or 2G")
    return value


def parse_latency_ms(text: str | int | float, *, field: str = "--budget-latency") -> float:
    """``30ms``, ``0.03s`` or ``30`` (milliseconds) -> milliseconds."""
    m = _DURATION_RE.match(str(text))
    if not m or not float(m["num"]) > 0:
        raise ConfigError(f"{field} = {text!r}: not a positive duration; write e.g. 30ms or 0.03s")
    return float(m["num"]) * (1000.0 if m["unit"] == "s" else 1.0)


# --------------------------------------------------------------------------------------
# Formatting
# --------------------------------------------------------------------------------------

def _scaled(n: float, units: tuple[tuple[str, float], ...], digits: int, sep: str) -> str:
    for unit, scale in units:
        if abs(n) >= scale:
            return f"{n / scale:.{digits}g}{sep}{unit}"
    return f"{n:.{digits}g}{sep}{units[-1][0] if units[-1][1] == 1 else ''}".rstrip()


def format_count(n: float, digits: int = 3) -> str:
    """A count with an SI suffix and ``digits`` significant digits: ``922M``, ``5.33B``, ``20k``."""
    return _scaled(n, (("T", 1e12), ("B", 1e9), ("M", 1e6), ("k", 1e3)), digits, "")


def format_bytes(n: float, digits: int = 3) -> str:
    """A byte count in the largest decimal unit it reaches: ``1.98 GB``, ``512 MB``, ``12 B``."""
    return _scaled(n, (("TB", 1e12), ("GB", 1e9), ("MB", 1e6), ("KB", 1e3), ("B", 1.0)), digits, " ")


def format_flops(n: float, digits: int = 3) -> str:
    """A FLOP count: ``1.84 GFLOP``, ``320 MFLOP``."""
    return _scaled(n, (("TFLOP", 1e12), ("GFLOP", 1e9), ("MFLOP", 1e6), ("kFLOP", 1e3), ("FLOP", 1.0)),
                   digits, " ")


def format_duration(seconds: float) -> str:
    """``2m54s`` below an hour, ``1h05m`` from an hour on."""
    seconds = int(round(seconds))
    if seconds >= 3600:
        return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
    return f"{seconds // 60}m{seconds % 60:02d}s"
