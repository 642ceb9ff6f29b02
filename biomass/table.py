"""Read the CSIRO tables: long train.csv -> one row per image with five targets and masks.

Missing targets (absent rows, empty or NaN values) are "not measured": NaN with mask 0, never zero.
Bad input raises one clear error naming the file and CSV line (header = line 1), or, with
`skip_bad=True`, the offending rows / images are dropped and counted in the log.
"""
from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pandas as pd

from biomass.constants import ID_SEP, SOLUTION_COLUMNS, TARGETS, TEST_COLUMNS, TRAIN_COLUMNS
from common.data.image_check import broken_images
from common.utils.csv_files import read_csv

log = logging.getLogger(__name__)
META_COLUMNS = ("Sampling_Date", "State", "Species", "Pre_GSHH_NDVI", "Height_Ave_cm")


def read_csv_checked(path: Path, required: tuple[str, ...]) -> pd.DataFrame:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: file not found")
    df = read_csv(path, f"a table with columns {list(required)}",
                  dtype={"sample_id": str, "image_path": str, "target_name": str})
    missing = [c for c in required if c not in df.columns]
    if missing:
        raise ValueError(f"{path}: missing column(s) {missing}; expected columns {list(required)}, "
                         f"found {list(df.columns)}")
    df["_line"] = np.arange(len(df)) + 2
    return df


def _bad(path: Path, rows: pd.DataFrame, what: str, skip_bad: bool) -> pd.Index:
    """Raise for the first bad row, or return the bad rows' index to drop."""
    if len(rows) and not skip_bad:
        first = rows.iloc[0]
        raise ValueError(f"{path}: line {first['_line']} (sample_id {first['sample_id']!r}): {what}")
    if len(rows):
        log.warning("%s: skipping %d row(s): %s", path, len(rows), what)
    return rows.index


def _check_target_names(df: pd.DataFrame, path: Path, skip_bad: bool) -> pd.DataFrame:
    bad = df[~df["target_name"].isin(TARGETS)]
    what = f"target_name {bad['target_name'].iloc[0]!r} is not one of {list(TARGETS)}" if len(bad) else ""
    return df.drop(_bad(path, bad, what, skip_bad))


def _check_target_values(df: pd.DataFrame, path: Path, skip_bad: bool) -> pd.DataFrame:
    raw = df["target"]
    values = pd.to_numeric(raw, errors="coerce")
    non_numeric = df[values.isna() & raw.notna() & (raw.astype(str).str.strip() != "")]
    what = f"target {non_numeric['target'].iloc[0]!r} is not a number" if len(non_numeric) else ""
    df = df.drop(_bad(path, non_numeric, what, skip_bad))
    values = values.loc[df.index]
    negative = df[values < 0]
    what = f"target {negative['target'].iloc[0]!r} is negative (grams must be >= 0)" if len(negative) else ""
    df = df.drop(_bad(path, negative, what, skip_bad))
    infinite = df[np.isinf(values.loc[df.index])]
    what = f"target {float(values[infinite.index[0]])} is not finite (grams must be finite)" if len(infinite) else ""
    df = df.drop(_bad(path, infinite, what, skip_bad))
    if not values.loc[df.index].notna().any():
        raise ValueError(f"{path}: none of its {len(df)} target rows holds a finite number (all empty or NaN)")
    return df.assign(target=values.loc[df.index].astype(float))


def _split_sample_ids(df: pd.DataFrame, path: Path) -> pd.Series:
    parts = df["sample_id"].str.split(ID_SEP, n=1, regex=False)
    bad = parts.str.len() != 2
    if bad.any():
        row = df[bad].iloc[0]
        raise ValueError(f"{path}: line {row['_line']}: sample_id {row['sample_id']!r} is not "
                         f"'<image id>{ID_SEP}<target name>'")
    return parts.str[0]


def _check_images(wide: pd.DataFrame, root: Path, path: Path, skip_bad: bool) -> pd.DataFrame:
    exists = wide["image_path"].map(lambda p: (root / p).is_file())
    missing = wide[~exists]
    if len(missing) and not skip_bad:
        row = missing.iloc[0]
        raise FileNotFoundError(f"{path}: line {row['_line']} (image {row['image_id']!r}): image file "
                                f"{root / row['image_path']} does not exist")
    if len(missing):
        log.warning("%s: skipping %d image(s) whose file does not exist", path, len(missing))
    wide = wide[exists]
    broken = broken_images(root / p for p in wide["image_path"])     # every image decoded in full, once
    bad = wide[wide["image_path"].map(lambda p: root / p in broken)]
    if len(bad) and not skip_bad:
        row = bad.iloc[0]
        raise ValueError(f"{path}: line {row['_line']} (image {row['image_id']!r}): {broken[root / row['image_path']]}")
    if len(bad):
        log.warning("%s: skipping %d image(s) that cannot be decoded: %s", path, len(bad),
                    ", ".join(bad["image_path"].head(5)))
    return wide.drop(bad.index)


def _widen(df: pd.DataFrame, path: Path) -> pd.DataFrame:
    dup = df[df.duplicated(["image_id", "target_name"], keep="first")]
    if len(dup):
        row = dup.iloc[0]
        raise ValueError(f"{path}: line {row['_line']}: duplicate target {row['target_name']!r} "
                         f"for image {row['image_id']!r}")
    keep = [c for c in ("image_path", *META_COLUMNS) if c in df.columns]
    first = df.groupby("image_id", sort=False).agg({**{c: "first" for c in keep}, "_line": "min"})
    targets = df.pivot(index="image_id", columns="target_name", values="target")
    targets = targets.reindex(index=first.index, columns=list(TARGETS))
    wide = first.join(targets).reset_index()
    for name in TARGETS:
        wide[f"mask_{name}"] = wide[name].notna().astype(np.float32)
    return wide


def missing_counts(wide: pd.DataFrame) -> dict[str, int]:
    """Per target, the images whose label is missing (NaN / absent row: masked in the loss and metrics)."""
    return {name: int(wide[name].isna().sum()) for name in TARGETS}


def report_missing(wide: pd.DataFrame, path: Path) -> dict[str, int]:
    """Print the number of masked (missing) labels per target at start; returns the counts."""
    counts = missing_counts(wide)
    log.info(f"[data] {path}: {len(wide)} images, {sum(counts.values())} masked (missing) labels: "
             + ", ".join(f"{k} {v}" for k, v in counts.items()))
    return counts


def read_train_table(root: Path, csv_name: str = "train.csv", skip_bad: bool = False) -> pd.DataFrame:
    """train.csv (long) -> one row per image: image_id, image_path, metadata, 5 targets, 5 masks."""
    root = Path(root)
    path = root / csv_name
    df = read_csv_checked(path, TRAIN_COLUMNS)
    df = _check_target_names(df, path, skip_bad)
    df = _check_target_values(df, path, skip_bad)
    df["image_id"] = _split_sample_ids(df, path)
    wide = _check_images(_widen(df, path), root, path, skip_bad)
    if wide.empty:
        raise ValueError(f"{path}: no usable image rows")
    return wide.reset_index(drop=True)


def read_test_table(root: Path, csv_name: str = "test.csv") -> tuple[pd.DataFrame, pd.DataFrame]:
    """test.csv -> (long rows in file order, one row per image). Missing images are errors."""
    root = Path(root)
    path = root / csv_name
    long = read_csv_checked(path, TEST_COLUMNS)
    _check_target_names(long, path, skip_bad=False)
    long["image_id"] = _split_sample_ids(long, path)
    wide = long.groupby("image_id", sort=False).agg(image_path=("image_path", "first"),
                                                    _line=("_line", "min")).reset_index()
    extra = [c for c in META_COLUMNS if c in long.columns]
    if extra:
        wide = wide.merge(long.groupby("image_id", sort=False)[extra].first().reset_index(), on="image_id")
    _check_images(wide, root, path, skip_bad=False)
    return long, wide


def read_solution_table(root: Path, csv_name: str = "test.csv",
                        solution_name: str = "test_solution.csv") -> pd.DataFrame:
    """test.csv joined with test_solution.csv -> the same wide layout as the train table."""
    root = Path(root)
    long, wide = read_test_table(root, csv_name)
    sol_path = root / solution_name
    sol = read_csv_checked(sol_path, SOLUTION_COLUMNS)
    merged = long.merge(sol[["sample_id", "target"]], on="sample_id", how="left", validate="one_to_one")
    merged = _check_target_values(merged, sol_path, skip_bad=False)
    targets = merged.pivot(index="image_id", columns="target_name", values="target")
    targets = targets.reindex(index=wide["image_id"], columns=list(TARGETS)).reset_index(drop=True)
    wide = pd.concat([wide.reset_index(drop=True), targets], axis=1)
    for name in TARGETS:
        wide[f"mask_{name}"] = wide[name].notna().astype(np.float32)
    return wide
