"""Training augmentation of every task: `data.augment`, a list of `_target_` nodes built by `build_augment`, and
the transforms the tasks share.

`data.augment` lists transforms in the order they run, each with its own probability:
`{_target_: albumentations.HorizontalFlip, p: 0.5}`, or a class of the suite (this module's, or a task's
`<task>/augment.py`: `{_target_: common.data.augment.GaussianHighlights, count: [1, 3], ...}`). Containers nest their
transforms under `transforms:` (`albumentations.OneOf` / `SomeOf` / `Sequential` / `Compose`, and
`SequentialOrClean` here: a block skipped as a whole with probability `p_clean`). Training only; the task applies
it to the image (and mask) its dataset has already resized, so what depends on the image size is the task's.
"""
from __future__ import annotations

from typing import Any, Iterator

import albumentations as A
import numpy as np
from hydra.utils import get_class, instantiate
from omegaconf import OmegaConf

TRANSFORM_BASES = (A.BasicTransform, A.BaseCompose)     # what a `_target_` of data.augment may name

SIDES = ("height", "longer")        # what a highlight's size is a fraction of
SIZE_KINDS = ("sigma", "radius")    # what the size means: the Gaussian's sigma, or its 1/e radius sqrt(2) sigma


class GaussianHighlights(A.ImageOnlyTransform):
    """Soft white Gaussian highlights (sun flecks through a canopy, reflections, corneal glints).

    A count drawn from `count` of blobs, each at a uniform random position with a size drawn from `size` (a
    fraction of the image's `relative_to` side: "height" or the "longer" side) and a strength drawn from
    `strength`. Blob i lights pixel x with l_i(x) = strength_i * exp(-|x - c_i|^2 / (2 sigma_i^2)); the
    brightest blob wins where blobs overlap, and the image is blended towards white:
    out = img + (255 - img) * max_i l_i, truncated to the image's dtype. `size_is` says what the drawn size
    is: "sigma" (the Gaussian's standard deviation) or "radius" (where the light falls to 1/e of the centre's,
    sqrt(2) sigma: exp(-d^2 / r^2)); `min_size` is the least size in pixels (0: none).
    """

    def __init__(self, count: tuple[int, int] = (1, 3), size: tuple[float, float] = (0.01, 0.04),
                 strength: tuple[float, float] = (0.3, 0.8), relative_to: str = "longer", size_is: str = "sigma",
                 min_size: float = 0.0, p: float = 0.5):
        super().__init__(p=p)
        if relative_to not in SIDES:
            raise ValueError(f"GaussianHighlights: relative_to={relative_to!r}, expected one of {SIDES}")
        if size_is not in SIZE_KINDS:
            raise ValueError(f"GaussianHighlights: size_is={size_is!r}, expected one of {SIZE_KINDS}")
        self.count, self.size, self.strength = tuple(count), tuple(size), tuple(strength)
        self.relative_to, self.size_is, self.min_size = relative_to, size_is, float(min_size)

    def get_params_dependent_on_data(self, params: dict[str, Any], data: dict[str, Any]) -> dict[str, Any]:
        h, w = params["shape"][:2]
        side = h if self.relative_to == "height" else max(h, w)
        r = self.py_random
        n = r.randint(*self.count)
        # (x, y, size in pixels, strength), drawn in this order per blob
        return {"blobs": [(r.uniform(0, w), r.uniform(0, h), r.uniform(*self.size) * side, r.uniform(*self.strength))
                          for _ in range(n)]}

    def apply(self, img: np.ndarray, blobs: list = (), **params) -> np.ndarray:
        yy, xx = np.mgrid[0:img.shape[0], 0:img.shape[1]].astype(np.float32)
        light = np.zeros(img.shape[:2], np.float32)
        spread = 2.0 if self.size_is == "sigma" else 1.0         # exp(-d^2 / (spread * size^2))
        for x, y, size, strength in blobs:
            light = np.maximum(light, strength * np.exp(-((xx - x) ** 2 + (yy - y) ** 2)
                                                        / (spread * max(size, self.min_size) ** 2)))
        out = img.astype(np.float32)
        out += (255.0 - out) * light[..., None]
        return np.clip(out, 0, 255).astype(img.dtype)

    def get_transform_init_args_names(self) -> tuple[str, ...]:
        return ("count", "size", "strength", "relative_to", "size_is", "min_size")


class SequentialOrClean(A.Sequential):
    """`transforms` in order, each with its own probability, all skipped with probability `p_clean`: that share of
    the samples trains on the clean image (albumentations.Sequential with p = 1 - p_clean)."""

    def __init__(self, transforms: list, p_clean: float = 0.0):
        super().__init__(transforms, p=1.0 - float(p_clean))
        self.p_clean = float(p_clean)


def _check_node(node: Any, where: str) -> None:
    """Every `_target_` of the list (nested ones too) must name a transform class, before anything is built."""
    if isinstance(node, dict):
        if "_target_" in node:
            try:
                cls = get_class(str(node["_target_"]))
            except (ImportError, ValueError) as err:
                raise ValueError(f"{where}._target_={node['_target_']!r} does not name a class ({err})") from err
            if not issubclass(cls, TRANSFORM_BASES):
                raise ValueError(f"{where}._target_={node['_target_']!r} is not an albumentations transform (nor a "
                                 f"container of transforms such as albumentations.OneOf)")
        for key, value in node.items():
            _check_node(value, f"{where}.{key}")
    elif isinstance(node, (list, tuple)):
        for i, item in enumerate(node):
            _check_node(item, f"{where}[{i}]")


def _as_list(specs: Any, where: str) -> list:
    specs = OmegaConf.to_container(specs, resolve=True) if OmegaConf.is_config(specs) else specs
    if specs is None:
        return []
    if not isinstance(specs, (list, tuple)):
        older = (" (a mapping of settings is the shape of configs written before data.augment became a list: "
                 "README, Augmentation)") if isinstance(specs, dict) else ""
        raise ValueError(f"{where}: expected a list of {{_target_: albumentations.<Transform>, ...}} nodes, got a "
                         f"{type(specs).__name__}{older}")
    for i, spec in enumerate(specs):
        if not isinstance(spec, dict) or "_target_" not in spec:
            raise ValueError(f"{where}[{i}]: expected {{_target_: <transform class>, <its arguments>}}, got {spec!r}")
    return list(specs)


def build_augment(specs: Any, where: str = "data.augment") -> A.Compose | None:
    """A list of `_target_` nodes (see the module's docstring) -> one A.Compose running them in order; None for
    null or an empty list (no augmentation)."""
    specs = _as_list(specs, where)
    if not specs:
        return None
    _check_node(specs, where)
    return A.Compose([instantiate(spec, _convert_="all") for spec in specs])


def iter_transforms(specs: Any) -> Iterator[dict]:
    """Every node of an augmentation list, depth first (a container before the transforms under it)."""
    for spec in _as_list(specs, "augment"):
        yield spec
        if isinstance(spec.get("transforms"), (list, tuple)):
            yield from iter_transforms(spec["transforms"])


def find_transform(specs: Any, target: str) -> dict:
    """The one node of an augmentation list (nested ones included) whose `_target_` is `target`."""
    found = [node for node in iter_transforms(specs) if node["_target_"] == target]
    if len(found) != 1:
        raise LookupError(f"{len(found)} transforms {target} in the augmentation list (expected one): "
                          f"{[node['_target_'] for node in iter_transforms(specs)]}")
    return found[0]
