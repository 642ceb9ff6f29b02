"""A sweep at a glance, without wandb: a table of its trials and two plots.

    python -m sweeps.report logs/sweeps/<study>                       # SQLite study of that sweep directory
    python -m sweeps.report <dir> --storage postgresql://user@host/db [--study NAME]

Prints one line per trial (number, state, parameters, metric, epochs run, seconds, kind of failure) and each
failure's reason below, as wide as the terminal (--width), what pruning saved (pruned trials, the epoch each stopped
at, epochs run vs every trial run to the end), and writes optimization_history.png, intermediate_values.png and
param_importances.png into the sweep directory (--out), and the curves.png of each trial that has none yet (trials
leave theirs to the sweep's end: `curves: sweep`).
"""
from __future__ import annotations

import argparse
import os
import shutil
import sys
import textwrap
import warnings
from pathlib import Path

import optuna
from optuna.trial import FrozenTrial, TrialState

from common.tracking.reports import write_missing_curves
from common.utils.atomic import atomic_path
from common.utils.secrets import protect_process
from sweeps.storage import load_study

STATE = {TrialState.COMPLETE: "done", TrialState.FAIL: "FAIL", TrialState.RUNNING: "run",
         TrialState.PRUNED: "pruned", TrialState.WAITING: "wait"}


def locate(target: Path, storage: str | None, study: str | None) -> tuple[Path, str, str]:
    """(sweep directory, storage URL, study name) of a sweep directory (or one of its trial directories)."""
    if target.name.startswith("trial-") and (target.parent / "optuna.db").is_file():
        target = target.parent
    if storage is None and (target / "optuna.db").is_file():
        storage = f"sqlite:///{(target / 'optuna.db').resolve()}"
    storage = storage or os.environ.get("OPTUNA_STORAGE")
    if not storage:
        raise SystemExit(f"{target}: no optuna.db there and no --storage / OPTUNA_STORAGE: expected a sweep "
                         f"directory logs/sweeps/<study> or the study's database URL")
    return target, storage, study or target.resolve().name


def short_names(trials: list[FrozenTrial]) -> dict[str, str]:
    """Parameter -> column name: its last dotted part, unless two parameters share it."""
    names = sorted({name for t in trials for name in t.params})
    tails = [name.rsplit(".", 1)[-1] for name in names]
    return {name: tail if tails.count(tail) == 1 else name for name, tail in zip(names, tails)}


def _cell(value) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return "" if value is None else str(value)


def _duration(trial: FrozenTrial) -> str:
    if trial.datetime_start is None or trial.datetime_complete is None:
        return ""
    return f"{(trial.datetime_complete - trial.datetime_start).total_seconds():.0f}"


def rows(trials: list[FrozenTrial], columns: dict[str, str], metric: str) -> list[list[str]]:
    """One row per trial; the fail column holds the reason's category (diverged, out of memory, worker ...); an
    epochs-run column when the trials recorded theirs (a pruned trial's metric is its last reported value)."""
    epochs = any("epochs_run" in t.user_attrs for t in trials)
    header = ["#", "state", *columns.values(), metric, *(["ep"] if epochs else []), "s", "fail"]
    body = [[str(t.number), STATE.get(t.state, t.state.name), *(_cell(t.params.get(p)) for p in columns),
             _cell(t.value if t.state != TrialState.PRUNED else t.user_attrs.get("last_value")),
             *([_cell(t.user_attrs.get("epochs_run"))] if epochs else []), _duration(t),
             t.user_attrs.get("fail_reason", "").split(":", 1)[0][:16]] for t in trials]
    return [header, *body]


def format_table(table: list[list[str]], width: int) -> str:
    """Columns padded to their widest cell; lines cut at `width` characters."""
    widths = [max(len(row[i]) for row in table) for i in range(len(table[0]))]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip()[:width] for row in table)


def fail_reasons(trials: list[FrozenTrial], width: int, max_lines: int = 3) -> str:
    """Each failed trial's full reason, wrapped to `width`, at most `max_lines` lines (the rest: optuna trials)."""
    blocks = []
    for trial in trials:
        reason = trial.user_attrs.get("fail_reason")
        if reason:
            lines = textwrap.wrap(f"#{trial.number} {reason}", width=width, subsequent_indent="    ")
            blocks += lines[:max_lines - 1] + ([lines[max_lines - 1][:width - 1] + "~"] if len(lines) > max_lines
                                               else lines[max_lines - 1:])
    return "\n".join(blocks)


def summary(study: optuna.Study, trials: list[FrozenTrial]) -> str:
    complete = [t for t in trials if t.state == TrialState.COMPLETE]
    budget = study.user_attrs.get("budget", "?")
    counts = ", ".join(f"{sum(t.state == s for t in trials)} {name}" for s, name in STATE.items()
                       if any(t.state == s for t in trials))
    text = f"study {study.study_name}: {len(complete)}/{budget} complete ({counts})"
    if complete:
        best = study.best_trial
        text += f"; best #{best.number} {_cell(best.value)}"
    return text


def pruning_summary(trials: list[FrozenTrial]) -> str | None:
    """Pruned trials (never a surplus one, which did not run), the epoch each stopped at, and the epochs the
    finished trials ran vs what they would have run to the end; None without pruned trials."""
    pruned = [t for t in trials if t.state == TrialState.PRUNED and not t.user_attrs.get("surplus")]
    if not pruned:
        return None
    finished = [t for t in trials if t.state in (TrialState.COMPLETE, TrialState.PRUNED)
                and "epochs_run" in t.user_attrs and "max_epochs" in t.user_attrs]
    ran = sum(t.user_attrs["epochs_run"] for t in finished)
    full = sum(t.user_attrs["max_epochs"] for t in finished)
    stops = ", ".join(f"#{t.number}@{t.user_attrs.get('pruned_epoch', '?')}" for t in pruned)
    saved = f"; epochs run {ran} of {full} ({full - ran} saved, {ran / full:.0%})" if full else ""
    return f"pruned {len(pruned)} (trial@epoch: {stops}){saved}"


def _save(axes, path: Path) -> None:
    figure = axes.figure if hasattr(axes, "figure") else axes.flat[0].figure
    figure.set_size_inches(8, 5)
    figure.tight_layout()
    with atomic_path(path) as tmp:
        figure.savefig(tmp, format="png", dpi=100)


def importance_axes(study: optuna.Study):
    """Bars of optuna's parameter importances (optuna 2.10's own plot calls a matplotlib function removed in 3.9,
    and its default fANOVA evaluator fails on current numpy: mean decrease in impurity instead)."""
    import matplotlib.pyplot as plt
    evaluator = optuna.importance.MeanDecreaseImpurityImportanceEvaluator(seed=0)
    importances = optuna.importance.get_param_importances(study, evaluator=evaluator)
    names = list(importances)[::-1]
    _, axes = plt.subplots()
    axes.barh(names, [importances[n] for n in names])
    axes.set_xlabel("importance (mean decrease in impurity)")
    axes.set_title(f"{study.study_name}: parameter importances")
    return axes


def plot(study: optuna.Study, out: Path) -> list[Path]:
    """optimization_history.png always; intermediate_values.png when trials reported epochs; param_importances.png
    from 2 complete trials on."""
    import matplotlib
    matplotlib.use("Agg")
    from optuna.visualization import matplotlib as optuna_plots
    written = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        _save(optuna_plots.plot_optimization_history(study), out / "optimization_history.png")
        written.append(out / "optimization_history.png")
        if any(t.intermediate_values for t in study.get_trials(deepcopy=False)):
            _save(optuna_plots.plot_intermediate_values(study), out / "intermediate_values.png")
            written.append(out / "intermediate_values.png")
        complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
        if len(complete) >= 2 and any(t.params for t in complete):
            _save(importance_axes(study), out / "param_importances.png")
            written.append(out / "param_importances.png")
        else:
            print(f"param_importances.png not written: it needs 2 complete trials with parameters "
                  f"({len(complete)} so far)")
    return written


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(prog="python -m sweeps.report", description=__doc__.split("\n\n")[0])
    parser.add_argument("sweep_dir", type=Path, help="the sweep directory, logs/sweeps/<study>")
    parser.add_argument("--storage", help="study database URL (default: <sweep_dir>/optuna.db, OPTUNA_STORAGE)")
    parser.add_argument("--study", help="study name (default: the sweep directory's name)")
    parser.add_argument("--out", type=Path, help="folder for the plots (default: the sweep directory)")
    parser.add_argument("--width", type=int, default=shutil.get_terminal_size((100, 24)).columns)
    args = parser.parse_args(argv)
    protect_process(args.storage)
    sweep_dir, storage, name = locate(args.sweep_dir, args.storage, args.study)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = load_study(storage, name)
    trials = study.get_trials(deepcopy=False)
    metric = str(study.user_attrs.get("metric", "value")).rsplit("/", 1)[-1]
    print(summary(study, trials))
    print(format_table(rows(trials, short_names(trials), metric), args.width))
    pruning = pruning_summary(trials)
    if pruning:
        print(pruning)
    reasons = fail_reasons(trials, args.width)
    if reasons:
        print(reasons)
    out = args.out or sweep_dir
    out.mkdir(parents=True, exist_ok=True)
    for path in plot(study, out):
        print(f"wrote {path}")
    curves = write_missing_curves(sweep_dir)     # trials draw none (curves: sweep); a sweep cut short drew none
    if curves:
        print(f"wrote curves.png of {len(curves)} trials")


if __name__ == "__main__":
    main(sys.argv[1:])
