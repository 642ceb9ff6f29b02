"""Reading sclera datasets: the SSBC benchmark layout, the SBVPI release, and the mask encodings.

SSBC layout: `<root>/<set>/{Training,Validation}/{Images,Masks}/` and `<root>/Evaluation/<set>/{Images,Masks}/`;
the mask of `<name>.<ext>` is `Masks/<name>.png`. SBVPI release: `<root>/<subject>/<stem>.jpg` with one
binary PNG per region, the sclera one being `<stem>_sclera.png`.
Encodings: "binary" (greyscale, 255 sclera, 0 rest, read as value // 255; other grey values are an error),
"ssbc" (as the SSBC evaluator reads a truth mask: greyscale conversion, value // 255, so any grey value
below 255 is background; colour masks are refused) and "sip" (RGB: red sclera, green iris, blue pupil,
black rest). Any other value is an error naming the file.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import cv2
import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from common.data.feature_cache import FeatureCache, image_key, pixels_or_features
from common.data.image_cache import ImageCache, through
from common.data.image_check import broken_images

log = logging.getLogger(__name__)

IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff")
SIP_ALLOWED = {(0, 0, 0): "black", (255, 0, 0): "red", (0, 255, 0): "green", (0, 0, 255): "blue"}


class BadSample(ValueError):
    """A sample that cannot be used (missing partner file, wrong size, colours outside the encoding)."""


@dataclass(frozen=True)
class Item:
    image: Path
    mask: Optional[Path]
    set: str
    encoding: str
    group: str = ""          # CV group: the subject (SBVPI release) or "<set>/<stem>" (SSBC layout)


def _files(folder: Path, exts: tuple[str, ...]) -> dict[str, Path]:
    if not folder.is_dir():
        raise FileNotFoundError(f"expected a folder {folder} (SSBC layout: <set>/<split>/Images and Masks)")
    files: dict[str, Path] = {}
    for path in sorted(folder.iterdir()):
        if path.suffix.lower() in exts and not path.name.startswith("."):
            if path.stem in files:
                raise BadSample(f"{path}: two files share the base name {path.stem!r} ({files[path.stem].name})")
            files[path.stem] = path
    return files


def scan_ssbc(folder: Path, set_name: str, encoding: str, with_masks: bool = True) -> tuple[list[Item], list[str]]:
    """Pairs `folder/Images/<stem>.*` with `folder/Masks/<stem>.png`. Returns (items, problems)."""
    images = _files(folder / "Images", IMAGE_EXTS)
    if not with_masks:
        return [Item(p, None, set_name, encoding, f"{set_name}/{s}") for s, p in images.items()], []
    masks = _files(folder / "Masks", (".png",))
    problems = [f"{p}: image without a mask (expected {folder / 'Masks' / (s + '.png')})"
                for s, p in images.items() if s not in masks]
    problems += [f"{p}: mask without an image (expected {folder / 'Images'}/{s}.<jpg|png>)"
                 for s, p in masks.items() if s not in images]
    items = [Item(images[s], masks[s], set_name, encoding, f"{set_name}/{s}") for s in images if s in masks]
    return items, problems


def scan_sbvpi(root: Path, set_name: str, encoding: str) -> tuple[list[Item], list[str]]:
    """SBVPI release: every `<stem>.jpg` under `root` needs `<stem>_sclera.png` beside it."""
    if not root.is_dir():
        raise FileNotFoundError(f"expected the SBVPI release folder {root} (<subject>/<stem>.jpg + <stem>_sclera.png)")
    images = sorted(p for p in root.rglob("*") if p.suffix.lower() in (".jpg", ".jpeg"))
    masks = set(root.rglob("*_sclera.png"))
    items, problems, used = [], [], set()
    for image in images:
        mask = image.with_name(f"{image.stem}_sclera.png")
        if mask in masks:
            items.append(Item(image, mask, set_name, encoding, f"{set_name}/{image.parent.name}"))
            used.add(mask)
        else:
            problems.append(f"{image}: image without a mask (expected {mask})")
    problems += [f"{m}: mask without an image (expected {m.name[:-len('_sclera.png')]}.jpg)"
                 for m in sorted(masks - used)]
    return items, problems


def _binary(path: Path, image: Image.Image) -> np.ndarray:
    if image.mode in ("RGB", "RGBA", "P"):
        rgb = np.asarray(image.convert("RGB"))
        if not (np.array_equal(rgb[..., 0], rgb[..., 1]) and np.array_equal(rgb[..., 0], rgb[..., 2])):
            raise BadSample(f"{path}: colour pixels in a mask declared 'binary' (expected greyscale 0/255; "
                            f"4-class SIP masks need encoding 'sip')")
        grey = rgb[..., 0]
    elif image.mode in ("L", "1"):
        grey = np.asarray(image.convert("L"))
    else:
        raise BadSample(f"{path}: mask mode {image.mode!r} not readable as a 2-class mask (expected L or RGB)")
    bad = np.setdiff1d(np.unique(grey), [0, 255])
    if bad.size:
        raise BadSample(f"{path}: grey values {bad[:5].tolist()} outside the 'binary' encoding (expected 0 and 255)")
    return (grey // 255).astype(np.uint8)


def _sip(path: Path, image: Image.Image) -> np.ndarray:
    rgb = np.asarray(image.convert("RGB")).astype(np.int32)
    codes = (rgb[..., 0] << 16) | (rgb[..., 1] << 8) | rgb[..., 2]
    allowed = [(r << 16) | (g << 8) | b for r, g, b in SIP_ALLOWED]
    bad = np.setdiff1d(np.unique(codes), allowed)
    if bad.size:
        colours = [((c >> 16) & 255, (c >> 8) & 255, c & 255) for c in bad[:3].tolist()]
        raise BadSample(f"{path}: colours {colours} outside the 4-class SIP encoding "
                        f"(expected black, red (255,0,0) sclera, green iris, blue pupil)")
    return (codes == (255 << 16)).astype(np.uint8)


def _ssbc(path: Path, image: Image.Image) -> np.ndarray:
    rgb = np.asarray(image.convert("RGB"))
    if not (np.array_equal(rgb[..., 0], rgb[..., 1]) and np.array_equal(rgb[..., 0], rgb[..., 2])):
        raise BadSample(f"{path}: colour pixels in a mask read as SSBC reads it (greyscale // 255); 4-class SIP "
                        f"masks need data.eval_masks=encodings and +data.encodings.<set>=sip")
    return (np.asarray(image.convert("L")) // 255).astype(np.uint8)


MASK_READERS = {"binary": _binary, "ssbc": _ssbc, "sip": _sip}


def read_mask(path: Path, encoding: str) -> np.ndarray:
    """(H, W) uint8 sclera mask in {0, 1}."""
    if encoding not in MASK_READERS:
        raise ValueError(f"mask encoding {encoding!r} for {path}: expected one of {sorted(MASK_READERS)}")
    with Image.open(path) as image:
        return MASK_READERS[encoding](path, image)


def check_item(item: Item) -> None:
    """Raise BadSample if the mask's size differs from the image's or its colours break the encoding."""
    with Image.open(item.image) as image:
        size = image.size
    mask = read_mask(item.mask, item.encoding)
    if mask.shape[::-1] != size:
        raise BadSample(f"{item.mask}: mask is {mask.shape[1]}x{mask.shape[0]} but its image {item.image.name} "
                        f"is {size[0]}x{size[1]} (WxH); they must match")


def validated(items: list[Item], problems: list[str], skip_bad: bool) -> list[Item]:
    """Check every labelled item once; raise on the first problem, or skip and count with skip_bad."""
    good = []
    broken = broken_images(p for item in items for p in (item.image, item.mask) if p is not None)
    for item in items:
        try:
            if item.image in broken or item.mask in broken:
                raise BadSample(broken.get(item.image) or broken[item.mask])
            if item.mask is not None:
                check_item(item)
            good.append(item)
        except BadSample as err:
            problems.append(str(err))
    if problems and not skip_bad:
        raise BadSample(problems[0] + (f" (and {len(problems) - 1} more problems)" if len(problems) > 1 else "")
                        + "; set data.skip_bad=true to skip bad samples")
    if problems:
        log.warning("skipped %d bad sclera samples, first: %s", len(problems), problems[0])
    return good


def image_size(path: Path) -> tuple[int, int]:
    """(height, width) from the file header, without decoding the pixels."""
    with Image.open(path) as image:
        return image.height, image.width


IMAGE_RESIZES = ("pil_bilinear", "cv2_linear")


def resized_rgb(path: Path, size: tuple[int, int], method: str = "pil_bilinear") -> np.ndarray:
    """(H, W, 3) uint8: the image decoded to RGB (by PIL) and resized to `size` (H, W), bilinear: "pil_bilinear"
    is PIL's (its support widened when shrinking, an antialiasing filter), "cv2_linear" is OpenCV's
    cv2.resize INTER_LINEAR (2x2 neighbours, no antialiasing: the reference deck's `cv2.resize(img, (256, 256))`)."""
    if method not in IMAGE_RESIZES:
        raise ValueError(f"data.image_resize={method!r}: expected one of {IMAGE_RESIZES}")
    with Image.open(path) as image:
        rgb = image.convert("RGB")
        if method == "pil_bilinear":
            return np.array(rgb.resize((size[1], size[0]), Image.BILINEAR))
        return cv2.resize(np.array(rgb), (size[1], size[0]), interpolation=cv2.INTER_LINEAR)


def _image_tensor(image: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1).float() / 255.0


def resized_mask(mask: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """(H, W) uint8 0/1 mask resized to `size` (H, W), nearest neighbour."""
    return np.array(Image.fromarray(mask).resize((size[1], size[0]), Image.NEAREST))


class ScleraDataset(Dataset):
    """Image and mask resized together to `size` (H, W); optional albumentations `transform`.

    Items: {"image": (3,H,W) float in [0,1], "mask": (1,H,W) float 0/1 (when labelled), "set", "stem",
    "height"/"width" (original size), and with `full_mask` the original-size mask as a uint8 array}.
    With an `image_cache` the resized image and mask (before `transform`) are read from disk after the
    first time, so later epochs decode nothing (the original size comes from the file header).
    cache_view (backbone features cached): items carry cache_key, and with `feature_cache` their "image" is the
    stored tokens when the cache has them (the image is not decoded; common.data.feature_cache.pixels_or_features).
    """

    def __init__(self, items: list[Item], size: tuple[int, int], transform: Optional[Callable] = None,
                 full_mask: bool = False, cache_view: Optional[str] = None,
                 image_cache: Optional[ImageCache] = None, image_resize: str = "pil_bilinear",
                 feature_cache: Optional[FeatureCache] = None):
        if image_resize not in IMAGE_RESIZES:
            raise ValueError(f"data.image_resize={image_resize!r}: expected one of {IMAGE_RESIZES}")
        if cache_view is not None and transform is not None:
            raise ValueError("cached backbone features are of the clean, resized image: a dataset with a cache_view "
                             "takes no transform (set data.augment=[] or data.cache_features=false)")
        self.items = list(items)
        self.image_resize = image_resize
        self.cache_view = cache_view  # set when backbone features are cached: items carry a cache_key
        self.feature_cache = feature_cache
        self.size = (int(size[0]), int(size[1]))
        self.transform = transform
        self.full_mask = full_mask
        self.image_cache = image_cache

    def __len__(self) -> int:
        return len(self.items)

    def _prepared(self, path: Path, preparation: str, compute: Callable[[], np.ndarray]) -> np.ndarray:
        return through(self.image_cache, path, f"sclera/{preparation}|{self.size[0]}x{self.size[1]}", compute)

    def _mask(self, item: Item, out: dict) -> np.ndarray:
        """The resized mask; with `full_mask` also out["mask_full"], read from the file (never cached)."""
        full = read_mask(item.mask, item.encoding) if self.full_mask else None
        if full is not None:
            out["mask_full"] = full
        compute = lambda: resized_mask(read_mask(item.mask, item.encoding) if full is None else full, self.size)
        return self._prepared(item.mask, f"mask|{item.encoding}|nearest", compute)

    def __getitem__(self, index: int) -> dict:
        item = self.items[index]
        height, width = image_size(item.image)
        out = {"set": item.set, "stem": item.image.stem, "height": height, "width": width}
        preparation = "rgb|bilinear" if self.image_resize == "pil_bilinear" else f"rgb|{self.image_resize}"

        def rgb() -> np.ndarray:
            return self._prepared(item.image, preparation,
                                  lambda: resized_rgb(item.image, self.size, self.image_resize))
        mask = self._mask(item, out) if item.mask is not None else None
        if self.cache_view is not None:          # no transform here (__init__)
            out["cache_key"] = image_key(item.image, self.cache_view)
            out["image"] = pixels_or_features(self.feature_cache, out["cache_key"], lambda: _image_tensor(rgb()))
        else:
            image = rgb()
            if self.transform is not None:
                res = self.transform(image=image, mask=mask) if mask is not None else self.transform(image=image)
                image, mask = res["image"], res.get("mask", mask)
            out["image"] = _image_tensor(image)
        if mask is not None:
            out["mask"] = torch.from_numpy(np.ascontiguousarray(mask)).float()[None]
        return out
