"""GPS-weighted training sampling: favour training images close to the deployment region.

Region centres come from k-means over a reference set of coordinates that the user names (where the model
will be deployed). Only coordinates are read from it, never labels. Each training image gets the weight
of its distance bracket to the nearest centre (`brackets_km` edges, one more weight than edges); images
without GPS get `unknown_weight`.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Sequence

import numpy as np
from sklearn.cluster import KMeans

from common.data.sampling import WeightedEpochSampler
from common.utils.csv_files import read_csv
from roadwork.regions import haversine_km
from roadwork.sidecar import parse_gps

log = logging.getLogger(__name__)


def read_reference_coordinates(path: Path) -> np.ndarray:
    """(N, 2) lat, lon from a CSV (`lat,lon` or `gps` columns) or a folder of JSON sidecars (`gps` field)."""
    path = Path(path)
    if path.suffix.lower() == ".csv":
        frame = read_csv(path, "a GPS reference CSV (lat,lon or gps columns)", dtype=str, keep_default_na=False)
        if {"lat", "lon"} <= set(frame.columns):
            values = [f"{a},{b}" for a, b in zip(frame["lat"], frame["lon"])]
        elif "gps" in frame.columns:
            values = list(frame["gps"])
        else:
            raise ValueError(f"{path}: a GPS reference CSV needs lat,lon or gps columns, has {list(frame.columns)}")
        where = [f"{path} row {i + 2}" for i in range(len(values))]
    elif path.is_dir():
        sidecars = sorted(path.rglob("*.json"))
        values = [json.loads(p.read_text()).get("gps") for p in sidecars]
        where = [str(p) for p in sidecars]
    else:
        raise FileNotFoundError(f"{path}: expected a CSV of coordinates or a folder of JSON sidecars")
    coords = [c for c in (parse_gps(v, w) for v, w in zip(values, where)) if c is not None]
    if not coords:
        raise ValueError(f"{path}: no known GPS coordinates in the reference set")
    return np.array(coords, dtype=np.float64)


def _to_unit_vectors(latlon: np.ndarray) -> np.ndarray:
    lat, lon = np.radians(latlon[:, 0]), np.radians(latlon[:, 1])
    return np.stack([np.cos(lat) * np.cos(lon), np.cos(lat) * np.sin(lon), np.sin(lat)], axis=1)


def region_centres(reference: np.ndarray, clusters: int, seed: int) -> np.ndarray:
    """k-means centres (K, 2) in degrees, clustered on the unit sphere (no wrap-around at +-180 degrees)."""
    clusters = min(int(clusters), len(np.unique(reference, axis=0)))
    km = KMeans(n_clusters=clusters, n_init=10, random_state=seed).fit(_to_unit_vectors(reference))
    xyz = km.cluster_centers_ / np.linalg.norm(km.cluster_centers_, axis=1, keepdims=True)
    return np.stack([np.degrees(np.arcsin(np.clip(xyz[:, 2], -1, 1))), np.degrees(np.arctan2(xyz[:, 1], xyz[:, 0]))],
                    axis=1)


def brackets(gps: np.ndarray, known: np.ndarray, centres: np.ndarray, edges_km: Sequence[float]) -> np.ndarray:
    """Bracket index per sample: 0 .. len(edges) by distance to the nearest centre; -1 where GPS is unknown."""
    out = np.full(len(gps), -1, dtype=int)
    if known.any():
        nearest = haversine_km(np.asarray(gps)[known], centres).min(1)
        out[known] = np.digitize(nearest, np.asarray(edges_km, dtype=float), right=False)
    return out


def bracket_weights(bracket: np.ndarray, weights: Sequence[float], unknown_weight: float) -> np.ndarray:
    table = np.asarray(list(weights) + [unknown_weight], dtype=np.float64)   # index -1 -> unknown_weight
    return table[bracket]


def bracket_names(edges_km: Sequence[float]) -> list[str]:
    edges = [float(e) for e in edges_km]
    lows, highs = [0.0] + edges, edges + [float("inf")]
    return [f"{lo:g}-{hi:g} km" for lo, hi in zip(lows, highs)] + ["unknown"]


def distance_check(bracket: np.ndarray, drawn: np.ndarray, edges_km: Sequence[float]) -> str:
    """Table: share of the training items per bracket vs share in one sampled epoch (`drawn` indices)."""
    names = bracket_names(edges_km)
    slots = np.where(bracket < 0, len(names) - 1, bracket)
    data_share = np.bincount(slots, minlength=len(names)) / max(len(slots), 1)
    drawn_share = np.bincount(slots[drawn], minlength=len(names)) / max(len(drawn), 1)
    lines = [f"{'distance to nearest centre':>28} {'items':>7} {'sampled':>8}"]
    lines += [f"{name:>28} {d:7.1%} {s:8.1%}" for name, d, s in zip(names, data_share, drawn_share)]
    return "\n".join(lines)


def sample_weights(samples: Sequence, root: Path, g, seed: int) -> np.ndarray:
    """data.gps_sampling (`g`) -> one weight per sample (roadwork.samples.Sample); prints the distance check."""
    if g.reference is None:
        raise ValueError("data.gps_sampling.enabled=true needs data.gps_sampling.reference: a CSV (lat,lon) or "
                         "a folder of sidecars with the deployment region's coordinates (labels are never read)")
    if len(g.weights) != len(g.brackets_km) + 1:
        raise ValueError(f"data.gps_sampling.weights needs {len(g.brackets_km) + 1} values (one per bracket of "
                         f"brackets_km={list(g.brackets_km)}), got {list(g.weights)}")
    reference = read_reference_coordinates(Path(root) / str(g.reference))
    centres = region_centres(reference, int(g.clusters), seed)
    gps = np.array([s.meta["gps"] for s in samples], dtype=np.float64).reshape(-1, 2)
    known = np.array([bool(s.meta["gps_known"]) for s in samples])
    bracket = brackets(gps, known, centres, g.brackets_km)
    weights = bracket_weights(bracket, g.weights, float(g.unknown_weight))
    drawn = WeightedEpochSampler(weights, 0, 1, seed, 0).global_draw().numpy()
    log.info(f"[data] GPS-weighted sampling: {len(centres)} centres from {len(reference)} reference coordinates "
             f"({g.reference}); one epoch's draw:\n" + distance_check(bracket, drawn, g.brackets_km))
    return weights
