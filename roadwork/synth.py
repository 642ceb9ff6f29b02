"""Synthetic NATIX-like street scenes: image + JSON sidecar of the same stem.

A scene has sky, buildings, a road with lane marks and cars. Roadwork (label 1) adds orange-and-white
cones, striped barriers or diamond work signs; a configurable fraction of positives carry only small
objects that a downscaled global view hardly resolves (tiles do). Negatives (and some positives) carry
orange distractors without white stripes (orange cars, bins, awnings). Every image gets an object mask
(`<root>/masks/<split dir>/<stem>.png`, single channel, 255 on the roadwork objects, all 0 for negatives),
drawn with the same shapes and without extra random draws, so the images do not depend on it.
Metadata: GPS near a few cities, weather / daytime / scene each present in about `meta_present` of the
samples, otherwise absent, null, "" or "null"; weather and daytime change the rendering.
`scene_description` only for label 1.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from common.utils.atomic import atomic_path, atomic_write_text

CITIES = {"berlin": (52.52, 13.40), "paris": (48.86, 2.35), "austin": (30.27, -97.74),
          "tokyo": (35.68, 139.69), "sao_paulo": (-23.55, -46.63)}
WEATHER = ["clear", "rainy", "foggy", "snowy"]     # spellings of the plan's vocabulary (data.vocabularies)
DAYTIME = ["day", "dusk", "night"]
SCENE = ["urban", "highway", "residential"]
ORANGE = (245, 120, 20)
MASK_DIR = "masks"          # the object masks' folder under the dataset root (data.masks=masks)
DESCRIPTIONS = ["traffic cones narrowing the right lane", "striped barriers closing part of the road",
                "work zone sign ahead of a lane closure", "cones and barriers around an open manhole"]


def _color(rng, base, jitter=25):
    return tuple(int(np.clip(c + rng.integers(-jitter, jitter + 1), 0, 255)) for c in base)


def _background(draw, rng, w, h, daytime):
    sky = {"day": (120, 170, 230), "dusk": (230, 150, 110), "night": (20, 25, 50)}[daytime]
    horizon = int(h * rng.uniform(0.35, 0.5))
    draw.rectangle([0, 0, w, horizon], fill=_color(rng, sky))
    x = 0
    while x < w:
        bw, bh = int(w * rng.uniform(0.08, 0.2)), int(horizon * rng.uniform(0.3, 0.9))
        draw.rectangle([x, horizon - bh, x + bw, horizon], fill=_color(rng, (150, 140, 130), 50))
        for wy in range(horizon - bh + 4, horizon - 6, 10):
            draw.rectangle([x + 3, wy, x + bw - 3, wy + 3], fill=_color(rng, (70, 80, 100), 20))
        x += bw + int(rng.integers(0, 6))
    draw.rectangle([0, horizon, w, h], fill=_color(rng, (110, 110, 105), 10))
    vx = w * rng.uniform(0.4, 0.6)
    draw.polygon([(vx - 4, horizon), (vx + 4, horizon), (w * 0.95, h), (w * 0.05, h)], fill=_color(rng, (70, 70, 72), 8))
    for i in range(6):
        t0, t1 = (i + 0.2) / 6, (i + 0.6) / 6
        y0, y1 = horizon + t0 * (h - horizon), horizon + t1 * (h - horizon)
        draw.line([(vx, y0), (vx, y1)], fill=(230, 230, 210), width=max(1, int(1 + 4 * t1)))
    return horizon


def _car(draw, rng, x, y, s, color):
    draw.rectangle([x, y - 0.5 * s, x + 1.8 * s, y], fill=color)
    draw.rectangle([x + 0.4 * s, y - 0.85 * s, x + 1.4 * s, y - 0.5 * s], fill=color)
    draw.rectangle([x + 0.5 * s, y - 0.8 * s, x + 1.3 * s, y - 0.55 * s], fill=(60, 80, 100))
    for cx in (x + 0.4 * s, x + 1.4 * s):
        draw.ellipse([cx - 0.2 * s, y - 0.2 * s, cx + 0.2 * s, y + 0.2 * s], fill=(15, 15, 15))


def _cone(draw, x, y, s):
    draw.rectangle([x - 0.35 * s, y - 0.08 * s, x + 0.35 * s, y], fill=ORANGE)
    draw.polygon([(x, y - s), (x + 0.25 * s, y - 0.08 * s), (x - 0.25 * s, y - 0.08 * s)], fill=ORANGE)
    for f in (0.35, 0.65):
        half = 0.25 * s * (1 - f) + 0.02 * s
        draw.rectangle([x - half, y - f * s - 0.06 * s, x + half, y - f * s + 0.06 * s], fill=(250, 250, 250))


def _barrier(draw, x, y, s):
    w, top = 1.6 * s, y - 0.7 * s
    for lx in (x + 0.1 * s, x + w - 0.2 * s):
        draw.rectangle([lx, top, lx + 0.1 * s, y], fill=(60, 60, 60))
    stripes = 6
    for i in range(stripes):
        color = ORANGE if i % 2 == 0 else (250, 250, 250)
        x0 = x + i * w / stripes
        draw.polygon([(x0, top), (x0 + w / stripes, top), (x0 + w / stripes - 0.1 * s, top + 0.3 * s),
                      (x0 - 0.1 * s, top + 0.3 * s)], fill=color)


def _sign(draw, x, y, s):
    draw.rectangle([x - 0.04 * s, y - 0.6 * s, x + 0.04 * s, y], fill=(90, 90, 90))
    cy = y - 0.95 * s
    draw.polygon([(x, cy - 0.4 * s), (x + 0.4 * s, cy), (x, cy + 0.4 * s), (x - 0.4 * s, cy)], fill=ORANGE,
                 outline=(10, 10, 10), width=max(1, int(0.05 * s)))
    draw.ellipse([x - 0.06 * s, cy - 0.25 * s, x + 0.06 * s, cy - 0.13 * s], fill=(10, 10, 10))
    draw.line([(x, cy - 0.13 * s), (x, cy + 0.1 * s), (x - 0.12 * s, cy + 0.25 * s)], fill=(10, 10, 10),
              width=max(1, int(0.05 * s)))


def _distractor(draw, rng, w, h, horizon):
    kind = rng.integers(3)
    s = h * rng.uniform(0.1, 0.2)
    x, y = rng.uniform(0, w - 2 * s), rng.uniform(horizon + s, h)
    if kind == 0:
        _car(draw, rng, x, y, s, _color(rng, ORANGE, 15))
    elif kind == 1:
        draw.rounded_rectangle([x, y - s, x + 0.6 * s, y], radius=0.1 * s, fill=_color(rng, ORANGE, 15))
    else:
        bx = rng.uniform(0, w - 3 * s)
        draw.rectangle([bx, horizon - 0.6 * s, bx + 3 * s, horizon - 0.35 * s], fill=_color(rng, ORANGE, 15))


class _ImageAndMask:
    """Forwards every ImageDraw call to the image and, with colour 255, to the object mask."""

    def __init__(self, image_draw: ImageDraw.ImageDraw, mask_draw: ImageDraw.ImageDraw):
        self.image_draw, self.mask_draw = image_draw, mask_draw

    def __getattr__(self, name: str):
        def both(*args, **kwargs):
            getattr(self.image_draw, name)(*args, **kwargs)
            colours = {k: 255 for k in ("fill", "outline") if kwargs.get(k) is not None}
            getattr(self.mask_draw, name)(*args, **{**kwargs, **colours})
        return both


def _roadwork(draw, rng, w, h, horizon, small):
    """Cones / barriers / signs; small ones only (seen in tiles) when `small`."""
    sizes = (0.04, 0.07) if small else (0.16, 0.3)
    for _ in range(int(rng.integers(4, 9))):
        s = h * rng.uniform(*sizes)
        x = rng.uniform(0.05 * w, 0.95 * w - 1.6 * s) if small else rng.uniform(0.15 * w, 0.85 * w - 1.6 * s)
        y = rng.uniform(horizon + s * 0.3, h - 2)
        [_cone, _barrier, _sign][int(rng.integers(3))](draw, x, y, s)


def _weather(img, rng, weather, daytime):
    arr = np.asarray(img).astype(np.float32)
    if weather == "foggy":
        arr = 0.55 * arr + 0.45 * 200.0
    elif weather == "rainy":
        arr *= 0.85
        for _ in range(arr.shape[1] // 3):
            x, y = int(rng.integers(arr.shape[1])), int(rng.integers(arr.shape[0]))
            arr[y:y + 8, x:x + 1] = 190.0
    elif weather == "snowy":
        ys, xs = rng.integers(arr.shape[0], size=arr.shape[1]), rng.integers(arr.shape[1], size=arr.shape[1])
        arr[ys, xs] = 250.0
    if daytime == "night":
        arr *= 0.45
    arr += rng.normal(0.0, 4.0, arr.shape)
    return Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8)).filter(ImageFilter.GaussianBlur(0.5))


def render_scene(rng: np.random.Generator, width: int, height: int, label: int, small: bool,
                 distractor_p: float, weather: str, daytime: str) -> tuple[Image.Image, Image.Image]:
    """(the scene, its roadwork-object mask: mode L, 255 on the objects)."""
    img, mask = Image.new("RGB", (width, height)), Image.new("L", (width, height), 0)
    draw = ImageDraw.Draw(img)
    horizon = _background(draw, rng, width, height, daytime)
    for _ in range(int(rng.integers(0, 4))):
        s = height * rng.uniform(0.06, 0.16)
        car_color = _color(rng, [(200, 30, 30), (30, 60, 160), (220, 220, 220), (30, 30, 30)][rng.integers(4)])
        _car(draw, rng, rng.uniform(0, width - 2 * s), rng.uniform(horizon + s, height), s, car_color)
    if rng.random() < distractor_p:
        for _ in range(int(rng.integers(1, 3))):
            _distractor(draw, rng, width, height, horizon)
    if label:
        _roadwork(_ImageAndMask(draw, ImageDraw.Draw(mask)), rng, width, height, horizon, small)
    return _weather(img, rng, weather, daytime), mask


def _maybe(rng, value, present: float):
    """The value with probability `present`, else one of the four spellings of unknown (None = absent)."""
    if rng.random() < present:
        return value
    return [None, "", "null", "__absent__"][int(rng.integers(4))]


def make_sidecar(rng: np.random.Generator, label: int, weather: str, daytime: str, meta_present: float) -> dict:
    city = list(CITIES.values())[int(rng.integers(len(CITIES)))]
    lat, lon = city[0] + rng.normal(0, 0.05), city[1] + rng.normal(0, 0.05)
    gps = [round(lat, 5), round(lon, 5)] if rng.random() < 0.5 else f"{lat:.5f},{lon:.5f}"
    record = {"label": label,
              "gps": _maybe(rng, gps, meta_present),
              "weather": _maybe(rng, weather, meta_present),
              "daytime": _maybe(rng, daytime, meta_present),
              "scene": _maybe(rng, SCENE[int(rng.integers(len(SCENE)))], meta_present)}
    if label:
        record["scene_description"] = DESCRIPTIONS[int(rng.integers(len(DESCRIPTIONS)))]
    return {k: (None if v == "__absent__" else v) for k, v in record.items() if v != "__absent__"}


def _write_json(path: Path, record: dict) -> None:
    atomic_write_text(path, json.dumps(record))


def write_split(out_dir: Path, mask_dir: Path, count: int, width: int, height: int, seed: int,
                positive_fraction: float, small_fraction: float, distractor_p: float, meta_present: float,
                quality: int) -> None:
    """`count` scenes as <out_dir>/<stem>.jpg + <stem>.json, their masks as <mask_dir>/<stem>.png."""
    rng = np.random.default_rng(seed)
    out_dir.mkdir(parents=True, exist_ok=True)
    mask_dir.mkdir(parents=True, exist_ok=True)
    for i in range(count):
        label = int(rng.random() < positive_fraction)
        weather = WEATHER[int(rng.choice(len(WEATHER), p=[0.55, 0.2, 0.15, 0.1]))]
        daytime = DAYTIME[int(rng.choice(len(DAYTIME), p=[0.6, 0.25, 0.15]))]
        small = bool(label and rng.random() < small_fraction)
        img, mask = render_scene(rng, width, height, label, small, distractor_p, weather, daytime)
        stem = f"{out_dir.name}_{i:05d}"
        with atomic_path(out_dir / f"{stem}.jpg") as tmp:
            img.save(tmp, format="JPEG", quality=quality)
        with atomic_path(mask_dir / f"{stem}.png") as tmp:
            mask.save(tmp, format="PNG")
        _write_json(out_dir / f"{stem}.json", make_sidecar(rng, label, weather, daytime, meta_present))


def synthesize(root: Path, seed: int, splits: dict, positive_fraction: float, small_fraction: float,
               distractor_p: float, meta_present: float, quality: int) -> None:
    """splits: {name: {dir (relative folder), count, width, height}}; masks go to <root>/masks/<dir>."""
    for offset, (_, spec) in enumerate(sorted(splits.items())):
        write_split(Path(root) / spec["dir"], Path(root) / MASK_DIR / spec["dir"], int(spec["count"]),
                    int(spec["width"]), int(spec["height"]), seed * 1000 + offset,
                    positive_fraction, small_fraction, distractor_p, meta_present, quality)
