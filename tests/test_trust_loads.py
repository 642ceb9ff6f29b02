"""Every load names its file and what was expected (issue 30): image-cache arrays of another layout, a
checkpoint's data.image_cache, biomass's prediction cache, non-UTF-8 CSV files, oof.csv, a full disk."""
from __future__ import annotations

import errno

import numpy as np
import pytest

from common.data.image_cache import ImageCache


def test_a_wrong_shape_image_cache_file_is_named(tmp_path):
    cache = ImageCache(tmp_path / "cache")
    image = tmp_path / "a.png"
    image.write_bytes(b"not really an image, only its bytes are hashed")
    other = tmp_path / "b.png"
    other.write_bytes(b"another one")
    good = np.zeros((4, 4, 3), np.uint8)
    assert cache.get(image, "size=4", lambda: good) is good
    cache.path(other, "size=4").parent.mkdir(parents=True, exist_ok=True)
    np.save(cache.path(other, "size=4"), np.zeros((4, 4), np.float32))       # planted / from an older version
    fresh = ImageCache(tmp_path / "cache")                                   # another process
    with pytest.raises(ValueError, match=rf"image cache file {cache.path(other, 'size=4')} \(of {other}\) holds a "
                                         r"float32 array of shape \(4, 4\); its preparation gives uint8 arrays of 3 "
                                         r"dimensions, 3 in the last"):
        fresh.get(other, "size=4", lambda: pytest.fail("a hit is not recomputed"))
    np.testing.assert_array_equal(fresh.get(image, "size=4", lambda: pytest.fail("hit")), good)


def test_non_utf8_csv_names_the_file_and_the_encoding(tmp_path):
    from biomass.table import read_csv_checked
    from roadwork.samples import _manifest_entries
    path = tmp_path / "train.csv"
    path.write_bytes("sample_id,image_path\nID1,Kühe.jpg\n".encode("latin1"))
    with pytest.raises(ValueError, match=rf"{path} is not UTF-8 text .*re-save it as UTF-8"):
        read_csv_checked(path, ("sample_id",))
    with pytest.raises(ValueError, match=rf"{path} is not UTF-8 text .*expected a manifest with an image_path"):
        list(_manifest_entries(path))


def test_oof_csv_errors_name_the_file(tmp_path):
    from common.inference.predictor import _read_oof
    from roadwork.stacking import stack_members
    run = tmp_path / "cv"
    run.mkdir()
    (run / "oof.csv").write_bytes(b"image,label,probability\n\xff\xfe,1,0.5\n")
    with pytest.raises(ValueError, match=rf"{run / 'oof.csv'} is not UTF-8 text.*the oof.csv of a mode=cv run"):
        _read_oof(run)
    (run / "oof.csv").write_text("image,label,probability\na.jpg,1,0.5\nb.jpg,0,high\n")
    with pytest.raises(ValueError, match=rf"{run / 'oof.csv'} row 3: probability='high' is not a finite number"):
        stack_members([None], {str(run / "oof.csv"): _read_oof(run)}, c=1.0, eps=1e-6)
    (run / "oof.csv").write_text("image,label,probability\na.jpg,1,0.5\nb.jpg,2,0.1\n")
    with pytest.raises(ValueError, match=rf"{run / 'oof.csv'}: label 2 is not 0 or 1"):
        stack_members([None], {str(run / "oof.csv"): _read_oof(run)}, c=1.0, eps=1e-6)


def test_a_full_disk_names_the_path_and_the_fix(tmp_path, monkeypatch):
    import torch

    from common.training import checkpoint
    target = tmp_path / "run" / "checkpoints" / "best.pt"

    def full(obj, handle):
        handle.write(b"PK partial")
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(torch, "save", full)
    with pytest.raises(OSError, match=rf"cannot write {target}: No space left on device; free space on that disk, "
                                      r"or write elsewhere \(hydra.run.dir="):
        checkpoint.atomic_torch_save({"a": 1}, target)
    assert list(target.parent.iterdir()) == []

    def torch_full(obj, handle):     # what torch itself raises on a full disk
        raise RuntimeError("[enforce fail at inline_container.cc:595] . unexpected pos 64 vs 0")
    monkeypatch.setattr(torch, "save", torch_full)
    monkeypatch.setattr(checkpoint.shutil, "disk_usage", lambda p: type("U", (), {"free": 0})())
    with pytest.raises(OSError, match=rf"cannot write {target}: No space left on device"):
        checkpoint.atomic_torch_save({"a": 1}, target)


def test_an_unwritable_folder_names_the_path(tmp_path):
    from common.utils.atomic import atomic_write_text
    (tmp_path / "a_file").write_text("")
    with pytest.raises(OSError, match=rf"cannot write {tmp_path / 'a_file' / 'run' / 'x.json'}: .*a part of the "
                                      r"path is a file"):
        atomic_write_text(tmp_path / "a_file" / "run" / "x.json", "{}")


def test_biomass_prediction_cache_is_loaded_as_data_and_checked(tmp_path):
    import torch

    from biomass.ensemble import _cached_prediction
    path = tmp_path / "p.pt"
    torch.save({"pred": torch.zeros(2, 5), "var": None}, path)
    assert _cached_prediction(path, 2, False, "cpu")[0].shape == (2, 5)
    with pytest.raises(ValueError, match=rf"prediction cache file {path} does not hold .*float \(3, 5\)"):
        _cached_prediction(path, 3, False, "cpu")
    torch.save({"pred": torch.zeros(2, 5), "var": np.zeros(2)}, path)        # a pickled object: not weights-only
    with pytest.raises(ValueError, match=rf"prediction cache file {path} is unreadable \(UnpicklingError"):
        _cached_prediction(path, 2, True, "cpu")


def _entries():
    import torch
    return {"integer tokens": {"tokens": [torch.zeros(4, 3, dtype=torch.int64)], "grid": [2, 2], "cls": None,
                               "registers": None},
            "grid mismatch": {"tokens": [torch.zeros(5, 3)], "grid": [2, 2], "cls": None, "registers": None},
            "cls width": {"tokens": [torch.zeros(4, 3)], "grid": [2, 2], "cls": torch.zeros(5), "registers": None}}


@pytest.mark.parametrize("case", ["integer tokens", "grid mismatch", "cls width", "a pickle"])
def test_a_feature_cache_entry_of_another_shape_or_dtype_is_a_named_miss(tmp_path, case):
    import torch
    from safetensors.torch import save_file

    from common.data.feature_cache import FeatureCache
    cache = FeatureCache(tmp_path, "ident", dtype="float32")
    path = cache.path("k1")
    path.parent.mkdir(parents=True, exist_ok=True)
    if case == "a pickle":        # a file of the first format (torch.save) under this format's name
        torch.save(_entries()["grid mismatch"], path)
    else:
        entry = _entries()[case]
        save_file({**{f"tokens.{i}": t for i, t in enumerate(entry["tokens"])},
                   "grid": torch.tensor(entry["grid"]),
                   **({"cls": entry["cls"]} if entry["cls"] is not None else {})}, path)
    with pytest.warns(UserWarning, match=rf"feature cache: unreadable file {path}"):
        assert cache.get("k1") is None
    assert cache.corrupt == 1


@pytest.mark.slow
def test_cli_unwritable_run_dir_is_named_before_hydra_writes_there(tmp_path):
    """Before: Hydra's own mkdir raised a raw NotADirectoryError."""
    from tests.cli import TOY, run_cli
    (tmp_path / "a_file").write_text("")
    proc = run_cli([*TOY, "mode=synth", f"data.root={tmp_path / 'data'}"], tmp_path / "a_file" / "run",
                   tmp_path / "cache", check=False)
    assert proc.returncode != 0
    assert f"error: hydra.run.dir={tmp_path / 'a_file' / 'run'} is not a writable folder" in proc.stderr
    assert "set hydra.run.dir to a folder this user can write" in proc.stderr
    assert not (tmp_path / "data").exists()


def test_a_full_disk_while_appending_metrics_names_the_file(tmp_path, monkeypatch):
    import builtins

    from common.tracking.tracker import RunFiles
    files = RunFiles(tmp_path)
    real_open = builtins.open

    class Full:
        def __init__(self, *args, **kwargs):
            self.handle = real_open(*args, **kwargs)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.handle.close()

        def write(self, text):
            raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(builtins, "open", Full)
    with pytest.raises(OSError, match=rf"cannot write {tmp_path / 'metrics.jsonl'}: No space left on device; free "
                                      r"space on that disk"):
        files.append_epoch({"epoch": 0})
