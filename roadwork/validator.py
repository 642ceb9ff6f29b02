"""The live StreetVision validator's scoring rules, reimplemented for `mode=eval benchmark=true`.

Source read (never copied): natixnetwork/streetvision-subnet at 28a1755 (the commit the suite is compared
with), files `natix/validator/reward.py` (get_rewards), `natix/validator/miner_performance_tracker.py`
(MinerPerformanceTracker, read at b3d83bb), `natix/validator/config.py` (REWARD_CURVE_EXPONENT = 3.0) and
`natix/protocol.py` ("<= 0.5 is considered real"). Per challenge the validator
1. appends the miner's probability and the label to the miner's history (a deque of the last 100);
2. rounds every kept probability with `np.round` (half to even: 0.5 -> 0, so p = 0.5 is "no roadwork");
3. over the last `min(100, n)` entries: MCC of labels vs rounded predictions, floored at 0, and 0 when the
   window's labels hold a single class; over the last `min(10, n)`: accuracy;
4. reward = (0.5 * MCC_100 + 0.5 * accuracy_10) ** 3, and 0 for a probability outside [0, 1];
5. leaves the entries that are -1 (no answer) out of each window's MCC and accuracy, after taking the window.
Every window, weight and the exponent is a config value (`metric.validator`).
"""
from __future__ import annotations

import numpy as np
from sklearn.metrics import accuracy_score, matthews_corrcoef

ORDERS = ("input", "shuffle", "validator")


def validator_round(prob) -> np.ndarray:
    """The validator's hard prediction: numpy's round-half-to-even of the probability (0.5 -> 0)."""
    return np.round(np.asarray(prob, dtype=np.float64)).astype(int)


def window_mcc(label: np.ndarray, pred: np.ndarray) -> float:
    """MCC floored at 0; 0 for an empty window or one whose labels hold a single class."""
    if len(np.unique(label)) < 2:
        return 0.0
    return max(0.0, float(matthews_corrcoef(label, pred)))


def window_accuracy(label: np.ndarray, pred: np.ndarray) -> float:
    return float(accuracy_score(label, pred)) if len(label) else 0.0


def reward_stream(label, prob, mcc_window: int, accuracy_window: int, mcc_weight: float,
                  accuracy_weight: float, exponent: float, no_answer: float = -1.0) -> dict[str, np.ndarray]:
    """Per step t of the stream (images in the order they are scored): the validator's MCC over the last
    `mcc_window`, accuracy over the last `accuracy_window` and the reward after image t.

    As the validator's tracker: a window is the last N entries, and the entries equal to `no_answer` (-1, a
    miner's missing answer) are then left out of its MCC and accuracy (a window of only those scores 0);
    every other probability stays in, rounded, even outside [0, 1]. The reward of a step whose probability
    is outside [0, 1] (-1 included) is 0."""
    label, prob = np.asarray(label, dtype=int), np.asarray(prob, dtype=np.float64)
    pred = validator_round(prob)
    kept = prob != no_answer
    mcc, acc, reward = (np.zeros(len(label)) for _ in range(3))
    for t in range(len(label)):
        m, a = slice(max(0, t + 1 - mcc_window), t + 1), slice(max(0, t + 1 - accuracy_window), t + 1)
        mcc[t] = window_mcc(label[m][kept[m]], pred[m][kept[m]])
        acc[t] = window_accuracy(label[a][kept[a]], pred[a][kept[a]])
        valid = 0.0 <= prob[t] <= 1.0
        reward[t] = (mcc_weight * mcc[t] + accuracy_weight * acc[t]) ** exponent if valid else 0.0
    return {"prediction": pred, "mcc": mcc, "accuracy": acc, "reward": reward}


def stream_order(label: np.ndarray, order: str, seed: int, length: int | None) -> np.ndarray:
    """Indices of the evaluated images in the order they are scored.

    input: the evaluation set's order; shuffle: a seeded permutation; validator: as the live validator draws
    challenges, each step a label 0 / 1 with equal chance, then a random image of that class (with
    replacement), `length` steps (null = as many as images)."""
    if order not in ORDERS:
        raise ValueError(f"metric.validator.order={order!r}: expected one of {', '.join(ORDERS)}")
    rng = np.random.default_rng(seed)
    if order == "input":
        return np.arange(len(label))
    if order == "shuffle":
        return rng.permutation(len(label))
    by_class = [np.flatnonzero(label == c) for c in (0, 1)]
    if not all(len(c) for c in by_class):
        raise ValueError("metric.validator.order=validator draws both labels: the evaluated set needs images "
                         "of both classes")
    steps = len(label) if length is None else int(length)
    classes = rng.integers(0, 2, steps)
    return np.array([by_class[c][rng.integers(len(by_class[c]))] for c in classes], dtype=int)


def validator_scores(label, prob, cfg) -> tuple[dict[str, float], dict[str, np.ndarray]]:
    """cfg: the metric.validator mapping. (summary, curve) of the stream ordered by `cfg["order"]`: the reward
    after the last image (what the validator holds at the end), its mean over the stream, and the final
    windows' MCC and accuracy."""
    label, prob = np.asarray(label, dtype=int), np.asarray(prob, dtype=np.float64)
    order = stream_order(label, str(cfg["order"]), int(cfg["seed"]), cfg["length"])
    curve = reward_stream(label[order], prob[order], int(cfg["mcc_window"]), int(cfg["accuracy_window"]),
                          float(cfg["mcc_weight"]), float(cfg["accuracy_weight"]), float(cfg["exponent"]),
                          float(cfg.get("no_answer", -1.0)))
    curve["index"], curve["label"], curve["probability"] = order, label[order], prob[order]
    if not len(order):
        return {}, curve
    summary = {"reward": float(curve["reward"][-1]), "reward_mean": float(curve["reward"].mean()),
               "mcc_window": float(curve["mcc"][-1]), "accuracy_window": float(curve["accuracy"][-1])}
    return summary, curve
