"""Finding samples on disk: a folder of image + JSON sidecar pairs, or a CSV manifest.

Every sample becomes a `Sample` with its parsed label and metadata; bad input raises one clear error
naming the file (or row), unless `skip_bad` is set, in which case the sample is dropped and counted.
"""
from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

from common.data.image_check import broken_images
from common.utils.csv_files import read_csv
from roadwork.sidecar import is_missing, parse_label, parse_metadata, parse_point

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp")


@dataclass
class Sample:
    image: Path
    name: str            # path relative to the split's folder (what predictions.csv reports)
    label: int           # 0 / 1, or -1 when unknown (predict time)
    meta: dict           # category indices, gps, gps_known, text presence flags <f> and raw texts <f>_text
    mask_center: tuple[float, float] | None = None   # sidecar [x, y]: a point the validator's crop keeps


@dataclass
class SampleIndex:
    samples: list[Sample]
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (name, "file: reason") of skipped samples
    inputs: list[str] = field(default_factory=list)     # every input's name, in input order
    orphans: list[str] = field(default_factory=list)    # sidecars without an image
    unseen: dict[str, Counter] = field(default_factory=dict)   # field -> values outside its vocabulary
    ignored: dict[str, list[str]] = field(default_factory=dict)  # unused field -> its malformed values

    def report(self, kind: str, name: str, detail: str) -> None:
        """parse_metadata's callback: count an unseen category value or an ignored malformed field."""
        if kind == "unseen":
            self.unseen.setdefault(name, Counter())[detail] += 1
        else:
            self.ignored.setdefault(name, []).append(detail)


def check_image(path: Path, broken: dict[Path, str]) -> None:
    """Broken files (common.data.image_check: decoded in full once, at indexing) fail here, named."""
    if not path.is_file():
        raise FileNotFoundError(f"{path}: image file not found")
    if path in broken:
        raise ValueError(broken[path])


def read_sidecar(path: Path) -> dict | None:
    """The sidecar's record; None when there is no sidecar; ValueError when it is not a JSON object."""
    if not path.is_file():
        return None
    try:
        record = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{path}: sidecar is not valid JSON ({err})") from err
    if not isinstance(record, dict):
        raise ValueError(f"{path}: sidecar must be a JSON object, got {type(record).__name__}")
    return record


def _text_inputs(record: dict, text_fields: Sequence[str], where: str) -> dict:
    """Per text field: presence flag `<field>` (0 / 1) and raw text `<field>_text` ("" when missing)."""
    out: dict = {}
    for name in text_fields:
        value = record.get(name)
        if not is_missing(value) and (isinstance(value, bool) or not isinstance(value, (str, int, float))):
            raise ValueError(f"{where}: {name} must be text, got {type(value).__name__} {value!r}")
        text = "" if is_missing(value) else str(value).strip()
        out[name], out[f"{name}_text"] = int(bool(text)), text
    return out


def _label(record: dict, where: str, require_label: bool, index: SampleIndex | None) -> int:
    """The label; where none is required (predict), a malformed one is reported to `index` and unknown."""
    try:
        return parse_label(record.get("label"), where, required=require_label)
    except ValueError as err:
        if require_label or index is None:
            raise
        index.report("ignored", "label", str(err))
        return -1


def make_sample(image: Path, name: str, record: dict | None, where: str, vocabularies: dict,
                text_fields: Sequence[str], require_label: bool, broken: dict[Path, str], gps_used: bool = True,
                index: SampleIndex | None = None) -> Sample:
    """`index` (when given) hears of unused fields' malformed values and of unseen category values."""
    check_image(image, broken)
    if record is None:
        if require_label:
            raise FileNotFoundError(f"{where}: no sidecar / label for {image}; training and evaluation need labels")
        record = {}
    label = _label(record, where, require_label, index)
    meta = parse_metadata(record, vocabularies, where, gps_used, None if index is None else index.report)
    meta.update(_text_inputs(record, text_fields, where))
    try:
        point = parse_point(record.get("mask_center"), where)
    except ValueError as err:           # it only steers the benchmark crop: never fatal
        if index is None:
            raise
        index.report("ignored", "mask_center", str(err))
        point = None
    return Sample(image=image, name=name, label=label, meta=meta, mask_center=point)


def orphan_sidecars(folder: Path) -> list[str]:
    """Sidecars (<stem>.json) under `folder` with no image of the same stem."""
    stems = {p.with_suffix("") for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file()}
    return sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*.json") if p.with_suffix("") not in stems)


def _folder_entries(folder: Path):
    images = sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    if not images:
        raise FileNotFoundError(f"{folder}: no images ({', '.join(IMAGE_SUFFIXES)}) found")
    for image in images:
        sidecar = image.with_suffix(".json")
        yield image, image.relative_to(folder).as_posix(), sidecar, lambda s=sidecar: read_sidecar(s)


def _manifest_entries(csv_path: Path):
    frame = read_csv(csv_path, "a manifest with an image_path column", dtype=str, keep_default_na=False)
    if "image_path" not in frame.columns:
        raise ValueError(f"{csv_path}: manifest needs an image_path column, has {list(frame.columns)}")
    for row_number, row in enumerate(frame.to_dict("records"), start=2):
        image = (csv_path.parent / row["image_path"]).resolve()
        yield image, row["image_path"], f"{csv_path} row {row_number}", lambda r=row: r


def index_samples(path: Path, vocabularies: dict, text_fields: Sequence[str], require_label: bool,
                  skip_bad: bool, gps_used: bool = True) -> SampleIndex:
    """All samples of a folder (image + sidecar) or a CSV manifest (`image_path,label,...`); a folder's
    sidecars without an image are listed in `orphans`."""
    path = Path(path)
    if path.suffix.lower() == ".csv":
        entries = _manifest_entries(path)
    elif path.is_dir():
        entries = _folder_entries(path)
    else:
        raise FileNotFoundError(f"{path}: expected a folder of images with JSON sidecars or a .csv manifest")
    index = SampleIndex(samples=[], orphans=orphan_sidecars(path) if path.is_dir() else [])
    entries = list(entries)
    broken = broken_images(image for image, *_ in entries if image.is_file())
    for image, name, where, load_record in entries:
        index.inputs.append(name)
        try:
            index.samples.append(make_sample(image, name, load_record(), str(where), vocabularies,
                                             text_fields, require_label, broken, gps_used, index))
        except (ValueError, FileNotFoundError) as err:
            if not skip_bad:
                raise
            index.skipped.append((name, str(err)))
    if not index.samples:
        raise ValueError(f"{path}: no usable samples ({len(index.skipped)} skipped as bad)")
    return index
