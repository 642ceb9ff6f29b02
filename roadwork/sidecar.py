"""NULL-safe parsing of the optional sidecar metadata (gps, weather, daytime, scene).

Absent, null, "" and the string "null" (any case, surrounding blanks ignored) all mean unknown.
Categories map to an index in a fixed vocabulary from config; index 0 is the NULL (unknown) entry,
so a value never seen in the vocabulary is unknown too, never an error.
"""
from __future__ import annotations

import math
from typing import Any, Callable, Optional, Sequence

NULL_INDEX = 0
_NULL_STRINGS = {"", "null", "none", "nan"}


def is_missing(value: Any) -> bool:
    if value is None:
        return True
    if isinstance(value, float) and math.isnan(value):
        return True
    return isinstance(value, str) and value.strip().lower() in _NULL_STRINGS


def parse_gps(value: Any, where: str) -> Optional[tuple[float, float]]:
    """[lat, lon], (lat, lon) or "lat,lon" -> (lat, lon); unknown -> None; invalid -> ValueError naming `where`."""
    if is_missing(value):
        return None
    if isinstance(value, str):
        parts = [p.strip() for p in value.strip().strip("[]()").split(",")]
    elif isinstance(value, (list, tuple)):
        parts = list(value)
    else:
        raise ValueError(f"{where}: gps must be [lat, lon] or \"lat,lon\", got {value!r}")
    if len(parts) != 2:
        raise ValueError(f"{where}: gps must hold exactly two numbers (lat, lon), got {value!r}")
    if any(is_missing(p) for p in parts):
        return None
    try:
        lat, lon = float(parts[0]), float(parts[1])
    except (TypeError, ValueError) as err:
        raise ValueError(f"{where}: gps values must be numbers, got {value!r}") from err
    if not (math.isfinite(lat) and math.isfinite(lon)) or not -90.0 <= lat <= 90.0 or not -180.0 <= lon <= 180.0:
        raise ValueError(f"{where}: gps {value!r} out of range (lat in [-90, 90], lon in [-180, 180])")
    return lat, lon


def parse_point(value: Any, where: str) -> Optional[tuple[float, float]]:
    """An image point [x, y] in pixels (the validator's `mask_center`); unknown -> None; invalid -> ValueError."""
    if is_missing(value):
        return None
    try:
        x, y = (float(v) for v in value)
    except (TypeError, ValueError) as err:
        raise ValueError(f"{where}: mask_center must be [x, y] in pixels, got {value!r}") from err
    if not (math.isfinite(x) and math.isfinite(y)) or x < 0 or y < 0:
        raise ValueError(f"{where}: mask_center {value!r} must be two finite non-negative numbers")
    return x, y


def category_index(value: Any, vocabulary: Sequence[str]) -> int:
    """1 + position of the value in `vocabulary` (case-insensitive); unknown or unseen -> NULL_INDEX (0)."""
    if is_missing(value):
        return NULL_INDEX
    key = str(value).strip().lower()
    for i, name in enumerate(vocabulary):
        if key == name.lower():
            return i + 1
    return NULL_INDEX


def parse_label(value: Any, where: str, required: bool) -> int:
    """0 or 1 (also "0"/"1", 0.0/1.0, true/false); unknown -> -1 unless required; else ValueError naming `where`."""
    if is_missing(value):
        if required:
            raise ValueError(f"{where}: label is missing; expected 0 (no roadwork) or 1 (roadwork)")
        return -1
    if isinstance(value, bool):
        return int(value)
    try:
        number = float(value)
    except (TypeError, ValueError) as err:
        raise ValueError(f"{where}: label {value!r} is not 0 or 1") from err
    if number not in (0.0, 1.0):
        raise ValueError(f"{where}: label {value!r} is outside {{0, 1}}")
    return int(number)


def parse_metadata(record: dict, vocabularies: dict[str, Sequence[str]], where: str, gps_used: bool = True,
                   report: Optional[Callable[[str, str, str], None]] = None) -> dict:
    """Sidecar/manifest record -> model inputs: category indices (0 = unknown), gps and its known flag.

    report(kind, field, detail), when given, hears of every value outside its vocabulary ("unseen", it
    becomes NULL) and of a malformed gps that no model input uses ("ignored", it becomes unknown); a
    malformed gps that the model uses (gps_used) raises."""
    out: dict[str, Any] = {}
    for name, vocab in vocabularies.items():
        value = record.get(name)
        out[name] = category_index(value, vocab)
        if out[name] == NULL_INDEX and not is_missing(value) and report is not None:
            report("unseen", name, str(value).strip())
    try:
        gps = parse_gps(record.get("gps"), where)
    except ValueError as err:
        if gps_used or report is None:
            raise
        report("ignored", "gps", str(err))
        gps = None
    out["gps"] = (0.0, 0.0) if gps is None else gps
    out["gps_known"] = gps is not None
    return out
