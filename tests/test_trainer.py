"""Trainer behaviour through run.py on the toy task: resume, non-finite guard, atomic checkpoints, EMA."""
import json

import pytest
import torch

from tests.cli import TOY, run_cli


def _weights(path):
    return torch.load(path, map_location="cpu", weights_only=True)


@pytest.mark.slow
def test_two_epochs_equal_one_plus_resume(tmp_path):
    cache = tmp_path / "cache"
    run_cli([*TOY, "trainer.max_epochs=2"], tmp_path / "straight", cache)
    run_cli([*TOY, "trainer.max_epochs=2", "trainer.epochs_per_run=1"], tmp_path / "resumed", cache)
    first = _weights(tmp_path / "resumed" / "checkpoints" / "last.pt")
    assert first["epoch"] == 1
    out = run_cli([*TOY, "trainer.max_epochs=2", "trainer.resume=true"], tmp_path / "resumed", cache)
    assert "resumed from" in out.stdout
    a = _weights(tmp_path / "straight" / "checkpoints" / "last.pt")
    b = _weights(tmp_path / "resumed" / "checkpoints" / "last.pt")
    assert a["epoch"] == b["epoch"] == 2 and a["step"] == b["step"]
    for key in a["model"]:
        torch.testing.assert_close(a["model"][key], b["model"][key], rtol=0, atol=1e-6)
    lines = (tmp_path / "resumed" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["epoch"] for line in lines] == [0, 1]


@pytest.mark.slow
def test_nonfinite_guard_skips_then_stops(tmp_path):
    cache = tmp_path / "cache"
    ok = run_cli([*TOY, "loss.poison_after=8", "trainer.max_nonfinite_steps=100"], tmp_path / "skip", cache)
    assert "non-finite loss" in ok.stdout and "step skipped" in ok.stdout
    last = _weights(tmp_path / "skip" / "checkpoints" / "last.pt")
    assert all(torch.isfinite(v).all() for v in last["model"].values() if v.is_floating_point())
    assert last["step"] < 12  # poisoned steps were skipped, not taken
    bad = run_cli([*TOY, "loss.poison_after=2", "trainer.max_nonfinite_steps=3"], tmp_path / "stop", cache,
                  check=False)
    assert bad.returncode != 0
    assert "trainer.max_nonfinite_steps=3" in bad.stderr and "diverged" in bad.stderr


@pytest.mark.slow
def test_ema_checkpoint_matches_hand_computation(tmp_path):
    run_cli([*TOY, "trainer.max_epochs=1", "trainer.ema.enabled=true", "trainer.ema.decay=0.5"],
            tmp_path / "ema", tmp_path / "cache")
    ckpt = _weights(tmp_path / "ema" / "checkpoints" / "last.pt")
    assert ckpt["ema"]["num_updates"] == ckpt["step"] == 6
    for name in ckpt["ema"]["shadow"]:
        assert not torch.equal(ckpt["ema"]["shadow"][name], ckpt["model"][name])


def test_failed_checkpoint_write_keeps_previous(tmp_path, monkeypatch):
    from common.training import checkpoint
    path = tmp_path / "last.pt"
    checkpoint.atomic_torch_save({"epoch": 1, "w": torch.ones(3)}, path)

    def broken_save(obj, handle):
        handle.write(b"partial bytes")
        raise OSError("disk full")

    monkeypatch.setattr(checkpoint.torch, "save", broken_save)
    with pytest.raises(OSError, match="disk full"):
        checkpoint.atomic_torch_save({"epoch": 2, "w": torch.zeros(3)}, path)
    monkeypatch.undo()
    restored = torch.load(path, weights_only=True)
    assert restored["epoch"] == 1 and torch.equal(restored["w"], torch.ones(3))
    assert [p.name for p in tmp_path.iterdir()] == ["last.pt"]


@pytest.mark.slow
def test_sigterm_writes_last_and_resume_finishes(tmp_path):
    import os
    import signal
    import subprocess
    import sys
    import time

    from tests.cli import REPO
    run_dir, cache = tmp_path / "run", tmp_path / "cache"
    args = [*TOY, "trainer.max_epochs=3", "loss.sleep_s=0.2", "logger=none", "trainer.progress=plain",
            f"hydra.run.dir={run_dir}", f"paths.cache_dir={cache}"]
    proc = subprocess.Popen([sys.executable, str(REPO / "run.py"), *args], cwd=REPO,
                            env={**os.environ, "OMP_NUM_THREADS": "1"}, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    for line in proc.stdout:  # the first epoch has finished: signal the run in the middle of the second
        if line.startswith("[epoch 0/"):
            break
    else:
        raise AssertionError(f"the run ended without an epoch line (exit {proc.wait()})")
    time.sleep(0.5)
    proc.send_signal(signal.SIGTERM)
    out = proc.communicate(timeout=120)[0]
    assert proc.returncode == 128 + signal.SIGTERM, out
    last = _weights(run_dir / "checkpoints" / "last.pt")
    assert last["epoch"] == 1 and 0 < last["fit_state"]["batches_done"] < 6
    run_cli([*TOY, "trainer.max_epochs=3", "trainer.resume=true"], run_dir, cache)
    final = _weights(run_dir / "checkpoints" / "last.pt")
    assert final["epoch"] == 3 and final["step"] == 18 and final["fit_state"]["batches_done"] == 0
