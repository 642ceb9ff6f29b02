"""Several trained models as one predictor: weighted averaging, validation-metric weights, and the
alignment of mode=cv out-of-fold files that a stacking meta-model is fit on."""
from __future__ import annotations

import math
from typing import Sequence

import numpy as np
import pandas as pd
import torch
from torch import nn


def normalise_weights(weights: Sequence[float] | None, count: int) -> list[float]:
    """Non-negative weights summing to 1 (None = equal weights)."""
    if weights is None:
        return [1.0 / count] * count
    values = [float(w) for w in weights]
    if len(values) != count:
        raise ValueError(f"{len(values)} ensemble weights for {count} models: expected one weight per model")
    if not all(math.isfinite(w) and w >= 0 for w in values) or sum(values) <= 0:
        raise ValueError(f"ensemble weights {values}: expected finite non-negative numbers with a positive sum")
    return [w / sum(values) for w in values]


class WeightedEnsemble(nn.Module):
    """forward(batch) -> the weighted mean of every floating-point output over the members (other outputs
    from the first member). weights=None gives every member the same weight. The default inference.ensemble."""

    def __init__(self, members: Sequence[nn.Module], weights: Sequence[float] | None = None):
        super().__init__()
        if not members:
            raise ValueError("an ensemble needs at least one model")
        self.members = nn.ModuleList(members)
        self.register_buffer("weights", torch.tensor(normalise_weights(weights, len(members)), dtype=torch.float64))

    def forward(self, batch: dict) -> dict:
        outputs = [member(batch) for member in self.members]
        merged = dict(outputs[0])
        for key, value in merged.items():
            if isinstance(value, torch.Tensor) and value.is_floating_point():
                stacked = torch.stack([out[key] for out in outputs])
                w = self.weights.to(stacked.dtype).view(-1, *([1] * value.dim()))
                merged[key] = (w * stacked).sum(0)
        return merged


def metric_weights(ckpts: Sequence[tuple[str, dict]]) -> list[float]:
    """One weight per (source, checkpoint): max(best validation value of the monitored metric, 0), normalised.
    The monitor must be maximised (a loss would give the worst model the largest weight) and the same for all."""
    values, monitors = [], set()
    for source, ckpt in ckpts:
        trainer = ckpt["config"]["trainer"]
        monitor, direction = trainer["monitor"], trainer["monitor_direction"]
        monitors.add(monitor)
        if direction != "maximize":
            raise ValueError(f"inference.weighting=metric: checkpoint {source} monitors {monitor} with direction "
                             f"{direction}; weights need a maximised metric (use inference.weighting=mean)")
        value = (ckpt.get("fit_state") or {}).get("best_value")
        if value is None or not math.isfinite(float(value)):
            raise ValueError(f"inference.weighting=metric: checkpoint {source} has no finite best validation "
                             f"{monitor} (fit_state.best_value={value}); was it validated during training?")
        values.append(max(float(value), 0.0))
    if len(monitors) > 1:
        raise ValueError(f"inference.weighting=metric: the checkpoints monitor different metrics {sorted(monitors)}")
    if sum(values) <= 0:
        raise ValueError(f"inference.weighting=metric: every checkpoint's best {monitors.pop()} is <= 0 "
                         f"({', '.join(source for source, _ in ckpts)}); use inference.weighting=mean")
    return [v / sum(values) for v in values]


def top_k_indices(ckpts: Sequence[tuple[str, dict]], k: int) -> list[int]:
    """Positions (in input order) of the k checkpoints with the best validation value of their monitor
    (fit_state.best_value, by trainer.monitor_direction), e.g. the plan's best 3 of 5 cv folds."""
    if not 1 <= k <= len(ckpts):
        raise ValueError(f"inference.top_k={k}: expected 1..{len(ckpts)} (the number of checkpoints)")
    scores = []
    for source, ckpt in ckpts:
        value = (ckpt.get("fit_state") or {}).get("best_value")
        if value is None or not math.isfinite(float(value)):
            raise ValueError(f"inference.top_k: checkpoint {source} has no finite best validation value "
                             f"(fit_state.best_value={value})")
        sign = 1.0 if ckpt["config"]["trainer"]["monitor_direction"] == "maximize" else -1.0
        scores.append(sign * float(value))
    best = sorted(range(len(ckpts)), key=lambda i: -scores[i])[:k]
    return sorted(best)


def align_oof(frames: dict[str, pd.DataFrame], id_column: str, value_column: str,
              label_column: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Out-of-fold files of several members (source -> frame) joined on the id column:
    (ids (N,), values (N, members), labels (N,)). Every file must cover the same items with the same labels."""
    indexed = {}
    for source, frame in frames.items():
        missing = {id_column, value_column, label_column} - set(frame.columns)
        if missing:
            raise ValueError(f"{source}: missing columns {sorted(missing)}; expected the oof.csv of a mode=cv run")
        values = pd.to_numeric(frame[value_column], errors="coerce").to_numpy(dtype=float)
        bad = np.flatnonzero(~np.isfinite(values))
        if len(bad):
            raise ValueError(f"{source} row {bad[0] + 2}: {value_column}={frame[value_column].iloc[bad[0]]!r} is not "
                             f"a finite number; expected the oof.csv of a mode=cv run")
        duplicated = frame[id_column][frame[id_column].duplicated()]
        if len(duplicated):
            raise ValueError(f"{source}: {id_column} {duplicated.iloc[0]!r} appears more than once")
        indexed[source] = frame.set_index(id_column).sort_index()
    (first, reference), *others = indexed.items()
    for source, frame in others:
        extra, lacking = frame.index.difference(reference.index), reference.index.difference(frame.index)
        if len(extra) or len(lacking):
            raise ValueError(f"out-of-fold files cover different items: {source} has {len(extra)} {id_column}s "
                             f"not in {first} (e.g. {list(extra[:3])}) and lacks {len(lacking)} of its "
                             f"(e.g. {list(lacking[:3])}); stack cv runs of the same data")
        differ = frame[label_column].to_numpy() != reference[label_column].to_numpy()
        if differ.any():
            raise ValueError(f"{source} and {first} disagree on the {label_column} of "
                             f"{id_column} {frame.index[differ][0]!r}")
    values = np.stack([frame[value_column].to_numpy(dtype=float) for frame in indexed.values()], axis=1)
    return reference.index.to_numpy(), values, reference[label_column].to_numpy()
