"""Which items make up each stage: training sets mixed with per-set oversampling, per-set
validation, and the evaluation sets under `<root>/<eval_dir>/<set>`; all from `cfg.data`."""
from __future__ import annotations

from pathlib import Path

from omegaconf import DictConfig

from sclera.data import Item, scan_sbvpi, scan_ssbc, validated

SPLITS = ("Training", "Validation")


def encoding_of(data: DictConfig, set_name: str) -> str:
    return str(data.encodings.get(set_name, data.default_encoding))


def _sbvpi_split(items: list[Item], split: str, val_fraction: float) -> list[Item]:
    """Whole subjects go to validation: every k-th subject in sorted order, k = round(1 / fraction)."""
    subjects = sorted({it.group for it in items})
    step = max(1, round(1 / val_fraction)) if val_fraction > 0 else 0
    val = {s for i, s in enumerate(subjects) if step and i % step == step - 1}
    return [it for it in items if (it.group in val) == (split == "Validation")]


def set_split(data: DictConfig, root: Path, name: str, split: str) -> list[Item]:
    """The validated items of one training set's split ("Training" or "Validation")."""
    spec = data.train_sets[name]
    encoding = encoding_of(data, name)
    folder = Path(spec.path) if spec.path else Path(root) / name
    if spec.layout == "ssbc":
        items, problems = scan_ssbc(folder / split, name, encoding)
    elif spec.layout == "sbvpi":
        items, problems = scan_sbvpi(folder, name, encoding)
        items = _sbvpi_split(items, split, float(data.sbvpi_val_fraction))
    else:
        raise ValueError(f"data.train_sets.{name}.layout={spec.layout!r}: expected 'ssbc' or 'sbvpi'")
    return validated(items, problems, bool(data.skip_bad))


def training_items(data: DictConfig, root: Path, splits: tuple[str, ...], oversample: bool) -> list[Item]:
    """Items of every training set; with `oversample`, set `name` repeated `train_sets.<name>.factor` times.
    A factor of 0 leaves the set out (training and validation), so a preset can drop a set."""
    items: list[Item] = []
    for name, spec in data.train_sets.items():
        factor = int(spec.factor)
        if factor != spec.factor or factor < 0:
            raise ValueError(f"data.train_sets.{name}.factor={spec.factor}: expected a whole number >= 0")
        if factor == 0:
            continue
        chunk = [it for split in splits for it in set_split(data, root, name, split)]
        items += chunk * (factor if oversample else 1)
    if not items:
        raise ValueError(f"no {'/'.join(splits)} items: every set in data.train_sets has factor 0 or is empty")
    return items


EVAL_MASKS = ("ssbc", "encodings")


def eval_encoding(data: DictConfig, set_name: str) -> str:
    """How evaluation masks are read: as SSBC reads them (data.eval_masks=ssbc) or per set's encoding."""
    if data.eval_masks not in EVAL_MASKS:
        raise ValueError(f"data.eval_masks={data.eval_masks!r}: expected one of {EVAL_MASKS}")
    return "ssbc" if data.eval_masks == "ssbc" else encoding_of(data, set_name)


def evaluation_items(data: DictConfig, root: Path, with_masks: bool) -> list[Item]:
    """Items of `<root>/<eval_dir>/<set>/{Images,Masks}` for each of `data.eval_sets` (null = every folder);
    a set without any usable image is an error."""
    base = Path(root) / data.eval_dir
    if not base.is_dir():
        raise FileNotFoundError(f"expected the evaluation folder {base} with one sub-folder per evaluation set")
    names = list(data.eval_sets) if data.eval_sets is not None else sorted(p.name for p in base.iterdir() if p.is_dir())
    if not names:
        raise ValueError(f"no evaluation sets: data.eval_sets is empty and {base} has no sub-folders")
    items: list[Item] = []
    for name in names:
        found, problems = scan_ssbc(base / name, name, eval_encoding(data, name), with_masks=with_masks)
        usable = validated(found, problems, bool(data.skip_bad))
        if not usable:
            raise ValueError(f"evaluation set {name}: no usable images in {base / name / 'Images'}"
                             f"{' with masks' if with_masks else ''} (data.eval_sets lists it)")
        items += usable
    return items
