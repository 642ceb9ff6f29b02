"""GPS regions: the nearest of a few named centres (great-circle distance)."""
from __future__ import annotations

import numpy as np

EARTH_RADIUS_KM = 6371.0


def haversine_km(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Distances between (N, 2) and (M, 2) arrays of (lat, lon) degrees -> (N, M) km."""
    a, b = np.radians(np.asarray(a, float))[:, None, :], np.radians(np.asarray(b, float))[None, :, :]
    dlat, dlon = b[..., 0] - a[..., 0], b[..., 1] - a[..., 1]
    h = np.sin(dlat / 2) ** 2 + np.cos(a[..., 0]) * np.cos(b[..., 0]) * np.sin(dlon / 2) ** 2
    return 2 * EARTH_RADIUS_KM * np.arcsin(np.sqrt(np.clip(h, 0.0, 1.0)))


def nearest_region(gps: np.ndarray, known: np.ndarray, regions: dict) -> np.ndarray:
    """Name of the nearest region centre per sample; "unknown" where the GPS is unknown."""
    names = list(regions)
    out = np.full(len(gps), "unknown", dtype=object)
    if len(gps) and known.any():
        dist = haversine_km(np.asarray(gps)[known], np.array([regions[n] for n in names]))
        out[known] = np.array(names, dtype=object)[dist.argmin(1)]
    return out
