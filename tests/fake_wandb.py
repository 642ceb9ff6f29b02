"""A stand-in for the wandb module that records every call (tests of common.tracking.wandb_tracker).

In-process: `install(monkeypatch)` puts it in sys.modules. In a subprocess: `write_package(folder)` writes a `wandb`
package that imports this module; put the folder first on PYTHONPATH and set FAKE_WANDB_RECORD to a JSON file,
which receives the calls when the run finishes.
"""
from __future__ import annotations

import json
import os
import sys
import types
from pathlib import Path

CALLS: list[dict] = []


def _plain(value):
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    return repr(value)


class Settings:
    def __init__(self, **kwargs):
        self.kwargs = kwargs


class _Media:
    def __init__(self, *args, **kwargs):
        self.args, self.kwargs = args, kwargs

    def __repr__(self):
        return f"{type(self).__name__}({self.kwargs})"


class Image(_Media):
    pass


class Table(_Media):
    pass


class Artifact:
    def __init__(self, name, type):
        self.name, self.type, self.files = name, type, []

    def add_file(self, path):
        self.files.append(path)

    def add_dir(self, path):
        self.files.append(path)


plot = types.SimpleNamespace(confusion_matrix=lambda **kw: {"confusion_matrix": kw})


class _Config(dict):
    def update(self, values, allow_val_change=False):
        CALLS.append({"call": "config.update", "values": _plain(values), "allow_val_change": allow_val_change})
        super().update(values)


class Run:
    """Steps as wandb keeps them: `log(row)` commits at the current step and moves to the next; `log(row, step=s)`
    moves to s, and a step below the current one is dropped with a warning (recorded as `dropped`)."""
    id = "fakerun"

    def __init__(self, config, tags=None):
        self.config, self.summary, self._tags = _Config(config or {}), {}, tuple(tags or ())
        self.step = 0

    @property
    def tags(self):
        return self._tags

    @tags.setter
    def tags(self, value):
        CALLS.append({"call": "tags", "tags": list(value)})
        self._tags = tuple(value)

    def define_metric(self, name, step_metric=None, summary=None, **kwargs):
        CALLS.append({"call": "define_metric", "name": name, "step_metric": step_metric, "summary": summary})

    def log(self, row, step=None):
        dropped = step is not None and step < self.step
        at = self.step if step is None or dropped else step
        self.step = at + 1 if step is None else max(self.step, step)
        CALLS.append({"call": "log", "row": _plain(row), "step": step, "at": at, "dropped": dropped})

    def log_artifact(self, artifact):
        CALLS.append({"call": "log_artifact", "name": artifact.name, "type": artifact.type, "files": artifact.files})

    def finish(self, exit_code=0):
        CALLS.append({"call": "finish", "exit_code": exit_code, "summary": _plain(self.summary)})
        record = os.environ.get("FAKE_WANDB_RECORD")
        if record:
            Path(record).write_text(json.dumps(CALLS))


def init(**kwargs):
    kwargs = {**kwargs, "settings": kwargs["settings"].kwargs if kwargs.get("settings") else None}
    CALLS.append({"call": "init", **_plain(kwargs)})
    return Run(kwargs.get("config"), kwargs.get("tags"))


def calls(kind: str) -> list[dict]:
    return [c for c in CALLS if c["call"] == kind]


def install(monkeypatch) -> types.ModuleType:
    """This module as `wandb` for the test, with a fresh record; the tracker module re-imported against it, and
    taken away again after the test (from sys.modules and from its package, where Hydra's `_target_` lookup finds
    it first), so later runs in this process import it against the real wandb."""
    import importlib

    import common.tracking
    module = sys.modules[__name__]
    CALLS.clear()
    monkeypatch.setitem(sys.modules, "wandb", module)
    monkeypatch.setitem(sys.modules, "common.tracking.wandb_tracker", None)      # the state to return to
    monkeypatch.setattr(common.tracking, "wandb_tracker", None, raising=False)
    del sys.modules["common.tracking.wandb_tracker"]
    importlib.import_module("common.tracking.wandb_tracker")
    return module


def write_package(folder: Path) -> Path:
    package = Path(folder) / "wandb"
    package.mkdir(parents=True, exist_ok=True)
    (package / "__init__.py").write_text("from tests.fake_wandb import *  # noqa: F401,F403\n"
                                         "from tests.fake_wandb import CALLS, plot  # noqa: F401\n")
    return Path(folder)
