"""The config tree composes to the same configs on both dependency lines (README "Two dependency lines"): every
task, every option of each task's own groups, every preset (with its smoke config) and every search space,
composed here with the installed Hydra and in a subprocess with the other line's venv (.venv/ for the stable line,
.venv-modern/ for the modern one), must give the same text. Without the other venv the comparison is skipped
loudly (`make install LINE=modern`); under CI=true it fails, as CI builds both."""
from __future__ import annotations

import difflib
import json
import os
import subprocess

import hydra
import pytest

from common.utils.hydra_lines import HYDRA_WHITELIST
from tests.hydra_lines import ROOT, compose_all, override_sets

OTHER = ROOT / (".venv" if HYDRA_WHITELIST else ".venv-modern") / "bin" / "python"
EXPECTED_MAJOR_MINOR = {True: "1.4", False: "1.3"}


def _other_line(tmp_path) -> dict[str, str]:
    if not OTHER.exists():
        message = f"the other dependency line's venv is missing ({OTHER}; make install LINE=modern builds it)"
        if os.environ.get("CI") == "true":
            pytest.fail(f"CI=true but {message}")
        pytest.skip(message)
    out = tmp_path / "other.json"
    proc = subprocess.run([str(OTHER), "-m", "tests.hydra_lines", str(out)], cwd=ROOT, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-5000:]
    return json.loads(out.read_text())


def test_the_sets_cover_every_task_option_preset_smoke_config_and_search_space():
    names = set(override_sets())
    assert {"task=biomass", "task=sclera", "task=roadwork", "task=sclera model/sclera=cgdseg",
            "task=biomass model/biomass=vitdet_fusion", "experiment=biomass_csiro_vitdet +smoke=biomass_cpu",
            "experiment=roadwork_highres12", "task=sclera sweeps=sclera_adapters"} <= names
    assert len(names) == 44


def test_the_installed_line_is_the_one_its_constraints_name():
    assert hydra.__version__.startswith(EXPECTED_MAJOR_MINOR[HYDRA_WHITELIST])


def test_both_lines_compose_every_config_identically(tmp_path):
    here = compose_all()
    other = _other_line(tmp_path)
    assert sorted(other) == sorted(here)
    for name, text in here.items():
        if text != other[name]:
            diff = "\n".join(difflib.unified_diff(other[name].splitlines(), text.splitlines(), "other line",
                                                  f"hydra {hydra.__version__}", lineterm=""))
            pytest.fail(f"{name} composes differently on the two lines:\n{diff}")
    assert "model/biomass: vitdet_fusion" in here["experiment=biomass_csiro_vitdet"]
    assert "_target_: biomass.heads_pool.LayerFusion" in here["experiment=biomass_csiro_vitdet"]
