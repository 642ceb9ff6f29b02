"""`python run.py <args>` inside the calling process: Hydra's own command-line entry (`run.main`), with sys.argv
as a fresh process would have it and Hydra's global state cleared afterwards, so the next call composes anew.

For callers that run several runs in a row (`make demo`, benchmarks, tests): the modules a run imports stay
imported for the next one, so only the first run pays for them. Hydra configures the root logger (console + run.log
handlers) for each run; `own_logging` closes what the run added and gives the caller its handlers and levels back.
"""
from __future__ import annotations

import contextlib
import logging
import runpy
import sys
from pathlib import Path
from typing import Iterator

RUN_PY = Path(__file__).resolve().parents[2] / "run.py"


def run_main(args: list[str]) -> int | str:
    """The exit code `python run.py *args` would end with: 0, or the code of the SystemExit it raised (an int, or
    the message of `sys.exit("error: ...")`, which a process prints before exiting 1). Any other exception
    propagates."""
    from hydra.core.global_hydra import GlobalHydra
    from hydra.core.hydra_config import HydraConfig

    saved_argv = sys.argv
    sys.argv = [str(RUN_PY), *args]
    try:
        with own_logging():
            runpy.run_path(str(RUN_PY), run_name="__main__")
        return 0
    except SystemExit as exit_:
        return 0 if exit_.code is None else exit_.code
    finally:
        sys.argv = saved_argv
        GlobalHydra.instance().clear()
        HydraConfig.instance().cfg = None


@contextlib.contextmanager
def own_logging() -> Iterator[None]:
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    levels = {name: logger.level for name, logger in logging.root.manager.loggerDict.items()
              if isinstance(logger, logging.Logger)}
    try:
        yield
    finally:
        for handler in root.handlers:
            if handler not in handlers:
                handler.close()
        root.handlers[:] = handlers
        root.setLevel(level)
        for name, logger in logging.root.manager.loggerDict.items():
            if isinstance(logger, logging.Logger):
                logger.setLevel(levels.get(name, logging.NOTSET))
                logger.disabled = False
