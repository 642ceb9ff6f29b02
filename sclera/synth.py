"""Synthetic periocular images with exact sclera masks, written in the SSBC benchmark layout.

Two visibly different domains stand for the benchmark's synthetic sets (clean, flat, saturated
renders saved as PNG) and its real sets (varied skin, colour cast, shading, noise, blur, JPEG).
Every image shows skin, eyelids with lashes, a sclera with vessels, an iris and a pupil at a
random gaze, specular highlights and a lighting gradient. Masks are exact: the sclera is the eye
opening minus the iris disc.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from common.utils.atomic import atomic_path
from sclera.tiny_clip import write_tiny_clip

WIDTH, HEIGHT = 400, 300
SCLERA, IRIS, PUPIL = 1, 2, 3
SIP_COLOURS = {SCLERA: (255, 0, 0), IRIS: (0, 255, 0), PUPIL: (0, 0, 255)}


@dataclass(frozen=True)
class SetSpec:
    """One synthetic set: its domain ("synthetic" | "real") and mask encoding ("binary" | "sip")."""
    name: str
    domain: str
    encoding: str = "binary"


TRAIN_SETS = (SetSpec("SynCROI", "synthetic"), SetSpec("MASD", "real"), SetSpec("SBVPI", "real"))
# the benchmark ships every evaluation set with 2-class masks (MOBIUS too), at 400x300
EVAL_SETS = (SetSpec("MOBIUS", "real"), SetSpec("SMD+SLD", "real"), SetSpec("Synthetic", "synthetic"))


def _eye_geometry(rng: np.random.Generator) -> dict:
    half_w = rng.uniform(150, 185)
    return dict(cx=WIDTH / 2 + rng.uniform(-20, 20), cy=HEIGHT / 2 + rng.uniform(-15, 15), a=half_w,
                up=rng.uniform(60, 95), low=rng.uniform(45, 75), r_iris=rng.uniform(0.30, 0.38) * half_w,
                gaze=(rng.uniform(-0.45, 0.45) * half_w, rng.uniform(-12, 12)), pupil=rng.uniform(0.3, 0.5))


def label_map(geo: dict) -> np.ndarray:
    """Per-pixel class: 0 rest, 1 sclera, 2 iris, 3 pupil (inside the eye opening only)."""
    yy, xx = np.mgrid[0:HEIGHT, 0:WIDTH].astype(np.float32)
    t = np.clip(1 - ((xx - geo["cx"]) / geo["a"]) ** 2, 0, None) ** 0.8
    opening = (yy > geo["cy"] - geo["up"] * t) & (yy < geo["cy"] + geo["low"] * t) & (t > 0)
    ix, iy = geo["cx"] + geo["gaze"][0], geo["cy"] + geo["gaze"][1]
    dist = np.hypot(xx - ix, yy - iy)
    labels = np.where(opening, SCLERA, 0).astype(np.uint8)
    labels[opening & (dist < geo["r_iris"])] = IRIS
    labels[opening & (dist < geo["r_iris"] * geo["pupil"])] = PUPIL
    return labels


def _palette(rng: np.random.Generator, domain: str) -> dict:
    if domain == "synthetic":
        return dict(skin=np.array([228, 180, 150]) + rng.uniform(-15, 15, 3),
                    sclera=np.array([250, 246, 244]), iris=rng.choice([[40, 90, 200], [120, 70, 30], [50, 140, 70]]),
                    vessel=(200, 40, 40), noise=0.0)
    skin = np.array([190, 140, 110]) * rng.uniform(0.45, 1.1) + rng.uniform(-20, 20, 3)
    return dict(skin=skin, sclera=np.array([215, 200, 185]) + rng.uniform(-25, 10, 3),
                iris=rng.choice([[90, 60, 40], [70, 90, 110], [60, 80, 50]]) * rng.uniform(0.6, 1.2),
                vessel=(170, 60, 60), noise=rng.uniform(4, 10))


def _draw_vessels(img: Image.Image, geo: dict, rng: np.random.Generator, colour: tuple) -> None:
    """Random-walk vessels from the eye corners towards the iris (the caller keeps them on the sclera)."""
    draw = ImageDraw.Draw(img)
    for _ in range(int(rng.integers(6, 14))):
        side = rng.choice([-1, 1])
        x, y = geo["cx"] + side * geo["a"] * rng.uniform(0.6, 0.95), geo["cy"] + rng.uniform(-15, 15)
        for _ in range(int(rng.integers(4, 9))):
            nx, ny = x - side * rng.uniform(8, 22), y + rng.uniform(-9, 9)
            draw.line([(x, y), (nx, ny)], fill=colour, width=int(rng.integers(1, 3)))
            x, y = nx, ny


def _draw_lashes(img: Image.Image, geo: dict, rng: np.random.Generator) -> None:
    """Lashes along the upper lid (the caller keeps them on the skin)."""
    draw = ImageDraw.Draw(img)
    xs = np.linspace(geo["cx"] - geo["a"] * 0.9, geo["cx"] + geo["a"] * 0.9, int(rng.integers(18, 30)))
    for x in xs:
        t = max(1 - ((x - geo["cx"]) / geo["a"]) ** 2, 0) ** 0.8
        y = geo["cy"] - geo["up"] * t - 3
        draw.line([(x, y), (x + rng.uniform(-8, 8), y - rng.uniform(10, 22))], fill=(25, 20, 20), width=2)


def _shade(rgb: np.ndarray, rng: np.random.Generator, domain: str) -> np.ndarray:
    yy, xx = np.mgrid[0:HEIGHT, 0:WIDTH].astype(np.float32)
    angle = rng.uniform(0, 2 * np.pi)
    ramp = (np.cos(angle) * (xx / WIDTH - 0.5) + np.sin(angle) * (yy / HEIGHT - 0.5))
    strength = 0.15 if domain == "synthetic" else rng.uniform(0.2, 0.5)
    gain = rng.uniform(0.9, 1.1) if domain == "synthetic" else rng.uniform(0.6, 1.25)
    return rgb * (gain * (1 + strength * ramp))[..., None]


def _highlights(rgb: np.ndarray, geo: dict, rng: np.random.Generator) -> None:
    yy, xx = np.mgrid[0:HEIGHT, 0:WIDTH].astype(np.float32)
    ix, iy = geo["cx"] + geo["gaze"][0], geo["cy"] + geo["gaze"][1]
    for _ in range(int(rng.integers(1, 3))):
        hx, hy = ix + rng.uniform(-0.6, 0.6) * geo["r_iris"], iy + rng.uniform(-0.6, 0.3) * geo["r_iris"]
        blob = np.exp(-((xx - hx) ** 2 + (yy - hy) ** 2) / (2 * rng.uniform(3, 7) ** 2))
        rgb += (255 - rgb) * blob[..., None]


def render_eye(rng: np.random.Generator, domain: str) -> tuple[np.ndarray, np.ndarray]:
    """One 400x300 RGB uint8 image and its label map (0 rest, 1 sclera, 2 iris, 3 pupil)."""
    if domain not in ("synthetic", "real"):
        raise ValueError(f"domain={domain!r}: expected 'synthetic' or 'real'")
    geo, pal = _eye_geometry(rng), _palette(rng, domain)
    labels = label_map(geo)
    rgb = np.empty((HEIGHT, WIDTH, 3), np.float32)
    rgb[:] = pal["skin"]
    lid = np.zeros((HEIGHT, WIDTH), bool)
    lid[:-6] = (labels[6:] > 0) & (labels[:-6] == 0)          # a dark band just above the opening
    rgb[lid] *= 0.75
    rgb[labels == SCLERA] = pal["sclera"]
    yy, xx = np.mgrid[0:HEIGHT, 0:WIDTH].astype(np.float32)
    ring = np.hypot(xx - geo["cx"] - geo["gaze"][0], yy - geo["cy"] - geo["gaze"][1]) / geo["r_iris"]
    iris_tex = (0.75 + 0.25 * np.cos(ring * 25 + rng.uniform(0, 6)))[..., None]
    rgb = np.where((labels == IRIS)[..., None], np.asarray(pal["iris"], np.float32) * iris_tex, rgb)
    rgb[labels == PUPIL] = 15
    vessels = Image.fromarray(np.clip(rgb, 0, 255).astype(np.uint8))
    lashes = vessels.copy()
    _draw_vessels(vessels, geo, rng, pal["vessel"])
    _draw_lashes(lashes, geo, rng)
    rgb = np.where((labels == SCLERA)[..., None], np.asarray(vessels, np.float32), rgb)
    rgb = np.where((labels == 0)[..., None], np.asarray(lashes, np.float32), rgb)
    _highlights(rgb, geo, rng)
    rgb = _shade(rgb, rng, domain) + rng.normal(0, pal["noise"] + 1e-6, rgb.shape)
    out = Image.fromarray(np.clip(rgb, 0, 255).astype(np.uint8))
    if domain == "real":
        out = out.filter(ImageFilter.GaussianBlur(rng.uniform(0.5, 1.5)))
    return np.asarray(out), labels


def encode_mask(labels: np.ndarray, encoding: str) -> Image.Image:
    """2-class greyscale (sclera 255) or 4-class SIP RGB (red sclera, green iris, blue pupil)."""
    if encoding == "binary":
        return Image.fromarray(np.where(labels == SCLERA, 255, 0).astype(np.uint8))
    if encoding == "sip":
        rgb = np.zeros(labels.shape + (3,), np.uint8)
        for cls, colour in SIP_COLOURS.items():
            rgb[labels == cls] = colour
        return Image.fromarray(rgb)
    raise ValueError(f"mask encoding {encoding!r}: expected 'binary' or 'sip'")


def save_atomic(image: Image.Image, path: Path, **kwargs) -> None:
    fmt = "JPEG" if path.suffix.lower() in (".jpg", ".jpeg") else "PNG"
    with atomic_path(path) as tmp:
        image.save(tmp, format=fmt, **kwargs)


def write_sample(folder: Path, stem: str, spec: SetSpec, rng: np.random.Generator) -> None:
    """`folder/Images/<stem>.(png|jpg)` and `folder/Masks/<stem>.png`."""
    rgb, labels = render_eye(rng, spec.domain)
    if spec.domain == "real":          # JPEG artefacts are part of the "real" look
        save_atomic(Image.fromarray(rgb), folder / "Images" / f"{stem}.jpg", quality=int(rng.integers(60, 90)))
    else:
        save_atomic(Image.fromarray(rgb), folder / "Images" / f"{stem}.png")
    save_atomic(encode_mask(labels, spec.encoding), folder / "Masks" / f"{stem}.png")


def write_dataset(root: Path, seed: int, train_per_set: int, val_per_set: int, eval_per_set: int,
                  train_sets=TRAIN_SETS, eval_sets=EVAL_SETS, text_model: Optional[str] = None) -> None:
    """The SSBC layout: <root>/<set>/{Training,Validation}/{Images,Masks} and <root>/Evaluation/<set>/...;
    with `text_model`, a tiny random CLIP (model + tokenizer) in <root>/<text_model> for text grounding."""
    rng = np.random.default_rng(seed)
    root = Path(root)
    if text_model:
        write_tiny_clip(root / text_model, seed)
    for spec in train_sets:
        for split, count in (("Training", train_per_set), ("Validation", val_per_set)):
            for i in range(count):
                write_sample(root / spec.name / split, f"{spec.name.lower()}_{split[0]}{i:04d}", spec, rng)
    for spec in eval_sets:
        for i in range(eval_per_set):
            write_sample(root / "Evaluation" / spec.name, f"eval_{i:04d}", spec, rng)
